//! The WAN on a VLAN (`rwan.7`, 802.1Q id 7) and on QinQ (`rwan.100.7`:
//! 802.1ad id 100, then 802.1Q id 7), with both device lists firewall4 users
//! write: the VLAN device itself, or the Ethernet device beneath it.
//!
//! The ISP side (`wan0.7`) inserts its tags in software (`txvlan off` on
//! its veth end), as a frame on a wire carries them: a veth would otherwise
//! hand the tag over in the skb's metadata, which is what a NIC stripping
//! tags on receive (rx-vlan-offload) looks like to XDP.

use anyhow::Result;

use super::net::{finish, Router};
use super::{step, Ctx, Evidence, Offload};

/// Which devices the flowtable lists on the WAN side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// The L3 device (`rwan.7`): what firewall4 writes for a VLAN WAN.
    Vlan,
    /// The Ethernet device beneath (`rwan`).
    Lower,
}

/// Move the WAN addresses from the plain veth onto a VLAN stack over it, on
/// both the router and the WAN host. `tags`: (protocol, id) outermost
/// first. Returns the router's top device.
pub fn vlan_wan(r: &mut Router, tags: &[(&str, u16)]) -> Result<String> {
    let stack = |base: &str| -> Vec<(String, String, String, u16)> {
        let mut v = Vec::new();
        let mut lower = base.to_string();
        for (proto, id) in tags {
            let name = format!("{lower}.{id}");
            v.push((name.clone(), lower.clone(), proto.to_string(), *id));
            lower = name;
        }
        v
    };
    for (ns, base, v4, v6, routes) in [
        (r.lab.rtr.clone(), "rwan", "203.0.113.1/24", "fd00:2::1/64", ""),
        (
            r.lab.wan.clone(),
            "wan0",
            "203.0.113.2/24",
            "fd00:2::2/64",
            "ip -6 route replace default via fd00:2::1\nip -6 route replace fd00:1::/64 via fd00:2::1\n",
        ),
    ] {
        let mut script = format!("ip addr flush dev {base}\n");
        let devs = stack(base);
        for (name, lower, proto, id) in &devs {
            script += &format!("ip link add link {lower} name {name} type vlan protocol {proto} id {id}\n");
            script += &format!("ip link set {name} up\n");
        }
        let top = &devs.last().expect("at least one tag").0;
        script += &format!("ip addr add {v4} dev {top}\nip addr add {v6} dev {top} nodad\n{routes}");
        if base == "wan0" {
            // Tags on the wire, not in the skb's metadata (see the module
            // comment).
            script += "ethtool -K wan0 txvlan off 2>/dev/null || true\nethtool -K wan0 tx-vlan-stag-hw-insert off 2>/dev/null || true\n";
        }
        r.sh(&ns, &script)?;
    }
    let top = stack("rwan").last().expect("at least one tag").0.clone();
    r.wan_dev = top.clone();
    r.lab.warm_neighbours()?;
    Ok(top)
}

pub fn run(_ctx: &Ctx, ev: &mut Evidence, how: Offload, tags: &[(&str, u16)], listed: Listed) -> Result<()> {
    step("lab up");
    let mut r = Router::up("vl", how)?;
    r.rtr(&["modprobe", "8021q"])?;
    let top = vlan_wan(&mut r, tags)?;
    let wan_listed = match listed {
        Listed::Vlan => top.clone(),
        Listed::Lower => "rwan".to_string(),
    };
    ev.put("wan", format!("{top} listed as {wan_listed}"));
    step("offload");
    let d = r.offload(how, &["rlan", &wan_listed])?;
    step("download");
    r.prove_download(ev, "download", 5311, d.as_ref())?;
    step("upload");
    r.prove_transfer(ev, "upload", 5312, crate::vm::stream::Direction::Upload, d.as_ref())?;
    finish(&r, ev, d)
}

/// firewall4's list for a VLAN WAN: `{ rlan, rwan.7 }`.
pub fn vlan(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run(c, ev, how, &[("802.1Q", 7)], Listed::Vlan)
}

/// The Ethernet device beneath listed instead: `{ rlan, rwan }`.
pub fn vlan_lower(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run(c, ev, how, &[("802.1Q", 7)], Listed::Lower)
}

/// QinQ: an 802.1ad service tag 100 carrying 802.1Q 7, top device listed.
pub fn qinq(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run(c, ev, how, &[("802.1ad", 100), ("802.1Q", 7)], Listed::Vlan)
}

/// QinQ with the Ethernet device listed.
pub fn qinq_lower(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run(c, ev, how, &[("802.1ad", 100), ("802.1Q", 7)], Listed::Lower)
}
