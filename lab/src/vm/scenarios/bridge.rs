//! The LAN as a VLAN-filtering bridge, as OpenWrt's DSA configs have it:
//! `br-lan` with `vlan_filtering 1`, the LAN in VLAN 10, one port untagged
//! (`rlan`: pvid 10, untagged: the first client) and one port tagged
//! (`rlan2`: the second client, in its own namespace, speaks VLAN 10 on
//! `lan0.10`), the bridge itself a member of VLAN 10 (pvid, untagged) with
//! the router's LAN address. Both of firewall4's lists: the ports
//! (`{ rlan, rlan2, rwan }`, hardware-offload style) and the bridge
//! (`{ br-lan, rwan }`).
//!
//! The second client inserts its tags in software (`txvlan off`), as on a
//! wire (see `vlan.rs`).

use anyhow::Result;

use super::net::{finish, ExtraNs, Router};
use super::{step, Ctx, Evidence, Offload};
use crate::vm::stream::Direction;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    Ports,
    Bridge,
}

/// Build the bridge; returns the second client's namespace.
pub fn vlan_bridge(r: &mut Router) -> Result<ExtraNs> {
    r.rtr(&["modprobe", "8021q"])?;
    let lan2 = ExtraNs::add(&format!("{}-lan2", r.lab.prefix))?;
    let rtr = r.lab.rtr.clone();
    r.sh(
        &lan2.name,
        &format!(
            "ip link set lo up\n\
             ip link add rlan2 netns {rtr} type veth peer name lan0\n\
             ip link set lan0 up\n\
             ethtool -K lan0 txvlan off 2>/dev/null || true\n\
             ip link add link lan0 name lan0.10 type vlan id 10\n\
             ip addr add 192.168.1.3/24 dev lan0.10\n\
             ip addr add fd00:1::3/64 dev lan0.10 nodad\n\
             ip link set lan0.10 up\n\
             ip route add default via 192.168.1.1\n"
        ),
    )?;
    if r.xdp_ready {
        r.sh(&lan2.name, "ethtool -K lan0 tx off gro on\n")?;
    }
    r.sh(
        &rtr,
        "ip addr flush dev rlan\n\
         ip link add br-lan type bridge vlan_filtering 1 vlan_default_pvid 0\n\
         ip link set rlan master br-lan\n\
         ip link set rlan2 master br-lan\n\
         bridge vlan add dev rlan vid 10 pvid untagged\n\
         bridge vlan add dev rlan2 vid 10\n\
         bridge vlan add dev br-lan vid 10 pvid untagged self\n\
         ip link set rlan2 up\n\
         ip link set br-lan up\n\
         ip addr add 192.168.1.1/24 dev br-lan\n\
         ip addr add fd00:1::1/64 dev br-lan nodad\n",
    )?;
    r.lan_dev = "br-lan".into();
    // Three transfers: less data each.
    r.bulk = 4 << 20;
    // Both clients reach the router through the bridge before anything is
    // measured (the fdb learns their ports).
    r.lab.ping(&r.lab.lan, "192.168.1.1".parse()?)?;
    r.lab.ping(&lan2.name, "192.168.1.1".parse()?)?;
    Ok(lan2)
}

pub fn run(_ctx: &Ctx, ev: &mut Evidence, how: Offload, listed: Listed) -> Result<()> {
    step("lab up");
    let mut r = Router::up("br", how)?;
    step("bridge");
    let lan2 = vlan_bridge(&mut r)?;
    let devices: &[&str] = match listed {
        Listed::Ports => &["rlan", "rlan2", "rwan"],
        Listed::Bridge => &["br-lan", "rwan"],
    };
    ev.put("listed", devices.join(" "));
    step("offload");
    if how == Offload::Xdp && listed == Listed::Bridge {
        // A bridge has no native XDP: refused, naming what to list instead.
        return r.expect_xdp_refused(ev, devices, &["br-lan", "bridge", "ports"]);
    }
    let d = r.offload(how, devices)?;
    step("untagged port");
    r.prove_transfer(ev, "untagged", 5341, Direction::Download, d.as_ref())?;
    step("tagged port");
    r.prove_transfer_from(ev, "tagged", 5342, Direction::Download, d.as_ref(), &lan2.name)?;
    r.prove_transfer_from(ev, "tagged_up", 5343, Direction::Upload, d.as_ref(), &lan2.name)?;
    finish(&r, ev, d)
}

pub fn ports(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run(c, ev, how, Listed::Ports)
}

pub fn bridge(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run(c, ev, how, Listed::Bridge)
}
