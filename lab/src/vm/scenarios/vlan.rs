//! The WAN on a VLAN (`rwan.7`, 802.1Q id 7) and on QinQ (`rwan.100.7`:
//! 802.1ad id 100, then 802.1Q id 7), with both device lists firewall4 users
//! write: the VLAN device itself, or the Ethernet device beneath it.
//!
//! The ISP side (`wan0.7`) inserts its tags in software (`txvlan off` on
//! its veth end), as a frame on a wire carries them: a veth would otherwise
//! hand the tag over in the skb's metadata, which is what a NIC stripping
//! tags on receive (rx-vlan-offload) looks like to XDP. `vlan_stripped`
//! leaves txvlan on, so the tag reaches rwan in metadata: XDP reads it with
//! bpf_xdp_metadata_rx_vlan_tag (6.8+, a program bound to rwan), and before
//! that kernel `run` refuses, naming the command for the ISP side.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::net::{finish, Router};
use super::{step, Ctx, Evidence, Offload};
use crate::Background;

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
    vlan_wan_tagged(r, tags, true)
}

/// `vlan_wan`; `in_band`: the WAN host puts its tags in the frame (txvlan
/// off), else it hands them over in the skb's metadata (veth's default).
pub fn vlan_wan_tagged(r: &mut Router, tags: &[(&str, u16)], in_band: bool) -> Result<String> {
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
        // Every tag beyond the first needs 4 bytes more than a 1500-byte
        // Ethernet frame allows (is_skb_forwardable takes MTU + one
        // VLAN_HLEN): a QinQ link carries baby giants, so the veth pair
        // gets the room and the VLAN devices keep 1500. The kernel's own
        // path hides this while the outer tag rides in skb metadata and GSO
        // skbs are let through, which XDP on rwan ends (veth turns GSO off
        // at its peer).
        let extra = 4 * tags.len().saturating_sub(1);
        if extra > 0 {
            script += &format!("ip link set {base} mtu {}\n", 1500 + extra);
        }
        let devs = stack(base);
        for (name, lower, proto, id) in &devs {
            script += &format!("ip link add link {lower} name {name} type vlan protocol {proto} id {id}\n");
            script += &format!("ip link set {name} mtu 1500 up\n");
        }
        let top = &devs.last().expect("at least one tag").0;
        script += &format!("ip addr add {v4} dev {top}\nip addr add {v6} dev {top} nodad\n{routes}");
        if base == "wan0" && in_band {
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

pub fn run(ctx: &Ctx, ev: &mut Evidence, how: Offload, tags: &[(&str, u16)], listed: Listed) -> Result<()> {
    run_tagged(ctx, ev, how, tags, listed, true)
}

fn run_tagged(
    ctx: &Ctx,
    ev: &mut Evidence,
    how: Offload,
    tags: &[(&str, u16)],
    listed: Listed,
    in_band: bool,
) -> Result<()> {
    step("lab up");
    let mut r = Router::up("vl", how)?;
    r.rtr(&["modprobe", "8021q"])?;
    let top = vlan_wan_tagged(&mut r, tags, in_band)?;
    let wan_listed = match listed {
        Listed::Vlan => top.clone(),
        Listed::Lower => "rwan".to_string(),
    };
    ev.put("wan", format!("{top} listed as {wan_listed}"));
    step("offload");
    if !in_band && how == Offload::Xdp && ctx.kernel == crate::vm::Kernel::Linux6_1 {
        // No bpf_xdp_metadata_rx_vlan_tag before 6.8: refused by name.
        let e = match r.offload(how, &["rlan", &wan_listed]) {
            Ok(_) => anyhow::bail!("XDP started although rwan's VLAN tags arrive in metadata it cannot read"),
            Err(e) => format!("{e:#}"),
        };
        if !e.contains("ethtool -K wan0 txvlan off") {
            anyhow::bail!("refused without the remedy: {e}");
        }
        ev.put("refused", e);
        return Ok(());
    }
    let d = r.offload(how, &["rlan", &wan_listed])?;
    step("download");
    r.prove_download(ev, "download", 5311, d.as_ref())?;
    step("upload");
    r.prove_transfer(ev, "upload", 5312, crate::vm::stream::Direction::Upload, d.as_ref())?;
    if listed == Listed::Vlan && tags.len() == 1 && in_band {
        step("unlisted");
        prove_unlisted(&r, ev, d.as_ref())?;
    }
    finish(&r, ev, d)
}

/// With `{ rlan, rwan.7 }` listed, connections through rwan.8 (VLAN 8 on
/// the same port) and through rwan untagged are not the flowtable's: the
/// kernel's hooks only run on listed devices, and XDP on rwan (serving
/// rwan.7) must not take them either. Each is a checked download whose bulk
/// the forward chain counts (the kernel forwarded it) and, with the
/// engine, which `flows` does not list and `status` counts as not listed.
/// Unmasqueraded: the WAN host routes the LAN back over each.
fn prove_unlisted(r: &Router, ev: &mut Evidence, d: Option<&crate::Daemon>) -> Result<()> {
    use std::net::SocketAddr;
    use std::time::Duration;

    use crate::vm::stream::{Direction, Transfer};
    r.sh(
        &r.lab.rtr,
        "ip link add link rwan name rwan.8 type vlan id 8\nip link set rwan.8 up\n\
         ip addr add 198.51.100.1/24 dev rwan.8\nip addr add 192.0.2.1/24 dev rwan\n\
         nft add rule inet fw4 forward iifname rlan oifname '{ rwan.8, rwan }' accept\n",
    )?;
    r.sh(
        &r.lab.wan,
        "ip link add link wan0 name wan0.8 type vlan id 8\nip link set wan0.8 up\n\
         ip addr add 198.51.100.2/24 dev wan0.8\nip addr add 192.0.2.2/24 dev wan0\n\
         ip rule add from 198.51.100.2 table 108\nip route add 192.168.1.0/24 via 198.51.100.1 table 108\n\
         ip rule add from 192.0.2.2 table 100\nip route add 192.168.1.0/24 via 192.0.2.1 table 100\n",
    )?;
    r.lab.warm_neighbours()?;
    for (tag, server, port) in [("vlan8", "198.51.100.2", 5321u16), ("untagged", "192.0.2.2", 5322)] {
        let at: SocketAddr = format!("{server}:{port}").parse()?;
        let t = Transfer {
            server_ns: &r.lab.wan,
            server: at,
            client_ns: &r.lab.lan,
            connect_to: at,
            warmup: 256 << 10,
            bulk: 2 << 20,
            seed: u64::from(port),
            rate: 0,
            direction: Direction::Download,
            timeout: Duration::from_secs(60),
        };
        // Time enough for an offload, had it been one.
        let settle = || {
            std::thread::sleep(Duration::from_millis(1500));
            r.fwd_packets()
        };
        let (rep, fwd1, fwd2) = t.run(settle, || r.fwd_packets())?;
        if !rep.intact(t.total()) {
            anyhow::bail!("{tag}: {} of {} bytes arrived intact", rep.received.bytes, t.total());
        }
        let during = fwd2 - fwd1;
        ev.put(&format!("{tag}_unlisted_fwd_bulk"), during);
        // ~1450 data segments and their ACKs (fewer packets where GSO
        // lets a veth carry super-packets): an offloaded bulk shows none.
        if during < 20 {
            anyhow::bail!("{tag}: the forward chain counted only {during} packets of the bulk: offloaded?");
        }
        if let Some(d) = d {
            let flows = d.flows()?;
            if flows.iter().any(|f| f["orig"]["dport"] == port) {
                anyhow::bail!("{tag}: the engine lists the connection to port {port}: {flows:?}");
            }
        }
    }
    if let Some(d) = d {
        let st = d.status()?;
        let why: Vec<String> = crate::not_offloaded(&st).into_keys().collect();
        ev.put("unlisted_reasons", why.join(" | "));
    }
    Ok(())
}

/// firewall4's list for a VLAN WAN: `{ rlan, rwan.7 }`.
pub fn vlan(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run(c, ev, how, &[("802.1Q", 7)], Listed::Vlan)
}

/// firewall4's list, the ISP side handing its tags over in the skb's
/// metadata (txvlan on, veth's default): read from the receive metadata.
pub fn vlan_stripped(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run_tagged(c, ev, how, &[("802.1Q", 7)], Listed::Vlan, false)
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

/// The WAN next hop on the VLAN (here the server itself, on `wan0.7`)
/// changes its MAC (a replaced upstream box, a VRRP failover without a
/// virtual MAC) while a UDP stream to it is offloaded, with the Ethernet
/// device beneath listed (`{ rlan, rwan }`): the router's neighbour entry
/// names `rwan.7`, the offloaded direction leaves by `rwan` with the tag
/// pushed. From a second after the change the stream must reach the new
/// MAC on the fast path, as the kernel's next packet would (`neigh_update`).
/// The engine's runs only.
///
/// Measured against what the LAN client really sent, so a slow machine
/// (TCG, other guests) sending fewer than its ~100 datagrams a second
/// does not fail it: in a window before the change and one starting a
/// second after it, the client's UDP OutDatagrams against the server's
/// InDatagrams (both read from /proc/PID/net/snmp of the two processes,
/// microseconds apart), and the forward chain's counter around each
/// window. Each window must deliver at least 80% of what was sent, and the
/// forward chain count at most a tenth of it (the fast path, not the
/// kernel). The old MAC delivers nothing: the server's devices drop it.
pub fn gateway_mac(_ctx: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    step("lab up");
    let mut r = Router::up("vg", how)?;
    r.rtr(&["modprobe", "8021q"])?;
    // Tags in the frame from the ISP side (txvlan off on wan0), as every
    // vlan scenario: XDP on 6.1 cannot read them from the metadata.
    let top = vlan_wan(&mut r, &[("802.1Q", 7)])?;
    step("offload");
    let d = r.offload(how, &["rlan", "rwan"])?.context("the engine's runs only")?;
    let sink = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',9997))\n\
                while True:\n    s.recv(2048)\n";
    let sink = Background(r.lab.spawn(&r.lab.wan, &["python3", "-c", sink])?);
    let stream = "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                  s.bind(('192.168.1.2',41900))\nend=time.time()+300\nwhile time.time()<end:\n\
                  \x20   s.sendto(b'x'*200,('203.0.113.2',9997))\n    time.sleep(0.01)\n";
    let stream = Background(r.lab.spawn(&r.lab.lan, &["python3", "-c", stream])?);
    let t0 = Instant::now();
    while !d.flows()?.iter().any(|f| f["orig"]["dport"] == 9997) {
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("the stream was not offloaded within 20 s: {}", d.status()?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids = (stream.0.id(), sink.0.id());
    let window = |tag: &str, ev: &mut Evidence| -> Result<(u64, u64, u64)> {
        let fwd0 = r.fwd_packets()?;
        let (sent0, got0) = udp_counts(pids)?;
        std::thread::sleep(Duration::from_secs(2));
        let (sent1, got1) = udp_counts(pids)?;
        let fwd = r.fwd_packets()? - fwd0;
        let (sent, got) = (sent1 - sent0, got1 - got0);
        ev.put(&format!("{tag}_sent"), sent);
        ev.put(&format!("{tag}_delivered"), got);
        ev.put(&format!("{tag}_forward_chain"), fwd);
        Ok((sent, got, fwd))
    };
    let judge = |tag: &str, (sent, got, fwd): (u64, u64, u64)| -> Result<()> {
        // Fewer than 10 a second: too slow a machine to tell anything.
        if sent < 20 {
            bail!("{tag}: the client sent only {sent} datagrams in 2 s");
        }
        if got * 10 < sent * 8 || fwd * 10 > sent {
            bail!("{tag}: {got} of {sent} datagrams delivered, {fwd} packets through the forward chain");
        }
        Ok(())
    };
    step("before the change");
    let before = window("before", ev)?;
    judge("before the change", before)?;
    step("the gateway's MAC changes");
    let new_mac = "02:00:00:00:77:01";
    // The Ethernet device too: a frame to its old MAC would otherwise
    // still be the host's, and the VLAN device on it takes what its lower
    // device took (vlan_do_receive).
    r.sh(&r.lab.wan, &format!("ip link set dev wan0 address {new_mac}\nip link set dev wan0.7 address {new_mac}\n"))?;
    let changed = Instant::now();
    r.rtr(&["ip", "neigh", "replace", "203.0.113.2", "lladdr", new_mac, "dev", &top, "nud", "reachable"])?;
    // The engine's time to hear the neighbour event and re-point.
    std::thread::sleep(Duration::from_secs(1).saturating_sub(changed.elapsed()));
    let after = window("after", ev)?;
    judge("from a second after the MAC change", after)?;
    drop((stream, sink));
    finish(&r, ev, Some(d))
}

/// (UDP OutDatagrams of the client, UDP InDatagrams of the server) from
/// /proc/PID/net/snmp: each process's namespace, read back to back.
fn udp_counts((client, server): (u32, u32)) -> Result<(u64, u64)> {
    let a = std::fs::read_to_string(format!("/proc/{client}/net/snmp")).context("the client's snmp")?;
    let b = std::fs::read_to_string(format!("/proc/{server}/net/snmp")).context("the server's snmp")?;
    Ok((udp_field(&a, "OutDatagrams")?, udp_field(&b, "InDatagrams")?))
}

/// One `Udp:` field of a /proc/net/snmp text.
fn udp_field(snmp: &str, field: &str) -> Result<u64> {
    let mut rows = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (rows.next().context("Udp: names")?, rows.next().context("Udp: values")?);
    let col = names.split_whitespace().position(|n| n == field).with_context(|| format!("Udp {field}"))?;
    values.split_whitespace().nth(col).context("Udp value")?.parse().with_context(|| format!("Udp {field}"))
}
