//! A WireGuard tunnel (`wg0`) from the router to a peer in the WAN
//! namespace, over the lab's WAN veth (203.0.113.1 <-> 203.0.113.2:51820).
//! The server sits behind the tunnel (10.10.0.2 on the peer's `wg0`); LAN
//! traffic to it is routed into `wg0` and masqueraded there, as a VPN
//! client zone in firewall4 would be. The flowtable lists `{ rlan, wg0 }`.
//!
//! `wg0` has no link-layer header: TC runs there, XDP cannot (no Ethernet
//! frames to parse, no native XDP), so `::xdp` expects the refusal by name
//! with its remedy, and nothing left attached.

use anyhow::Result;

use super::net::{finish, Router};
use super::{step, Ctx, Evidence, Offload};
use crate::vm::stream::Direction;

/// Keys and the two ends of the tunnel; the server moves behind it.
pub fn wireguard_wan(r: &mut Router) -> Result<()> {
    r.rtr(&["modprobe", "wireguard"])?;
    let dir = r.dir.to_str().unwrap_or("/tmp").to_string();
    // Keys from `wg` itself, into the scenario's private directory.
    r.sh(
        &r.lab.rtr,
        &format!(
            "umask 077; cd {dir}; wg genkey > rtr.key; wg pubkey < rtr.key > rtr.pub; wg genkey > peer.key; \
             wg pubkey < peer.key > peer.pub"
        ),
    )?;
    let read = |f: &str| std::fs::read_to_string(r.dir.join(f)).map(|s| s.trim().to_string());
    let (rtr_pub, peer_pub) = (read("rtr.pub")?, read("peer.pub")?);
    r.sh(
        &r.lab.rtr,
        &format!(
            "ip link add wg0 type wireguard\n\
             wg set wg0 private-key {dir}/rtr.key peer {peer_pub} allowed-ips 10.10.0.0/24 endpoint 203.0.113.2:51820\n\
             ip addr add 10.10.0.1/24 dev wg0\n\
             ip link set wg0 up\n"
        ),
    )?;
    r.sh(
        &r.lab.wan,
        &format!(
            "ip link add wg0 type wireguard\n\
             wg set wg0 private-key {dir}/peer.key listen-port 51820 peer {rtr_pub} allowed-ips 10.10.0.0/24\n\
             ip addr add 10.10.0.2/24 dev wg0\n\
             ip link set wg0 up\n"
        ),
    )?;
    r.wan_dev = "wg0".into();
    r.server = "10.10.0.2".parse()?;
    r.server_bind = r.server;
    // Encryption under TCG is slow: less data.
    r.bulk = 2 << 20;
    // The first handshake, before anything is measured.
    r.lab.ping(&r.lab.rtr, r.server)?;
    Ok(())
}

pub fn run(_ctx: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    step("lab up");
    let mut r = Router::up("wg", how)?;
    step("wireguard");
    wireguard_wan(&mut r)?;
    step("offload");
    if how == Offload::Xdp {
        return r.expect_xdp_refused(ev, &["rlan", "wg0"], &["wg0", "--mode tc"]);
    }
    let d = r.offload(how, &["rlan", "wg0"])?;
    step("download");
    r.prove_download(ev, "download", 5331, d.as_ref())?;
    step("upload");
    r.prove_transfer(ev, "upload", 5332, Direction::Upload, d.as_ref())?;
    // The tunnel carried it: the peer's handshake and byte counters.
    let show = r.wan(&["wg", "show", "wg0", "transfer"])?;
    ev.put("peer_wg_transfer", show.trim());
    finish(&r, ev, d)
}
