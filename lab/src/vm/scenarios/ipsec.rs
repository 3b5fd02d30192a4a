//! IPsec tunnel mode with real ESP SAs (AES-GCM), site to site: the LAN
//! (192.168.1.0/24) and the far site (10.99.0.0/24, the server on the WAN
//! host's loopback) are joined by a tunnel between the router's and the WAN
//! host's WAN addresses. Covered traffic is routed, not masqueraded; other
//! traffic to the WAN host is masqueraded and not covered.
//!
//! The proof is on the WAN wire, captured in a switch between the router
//! and the WAN host (`Router::wire_tap`): during a covered transfer the
//! router sends only ESP, never a clear packet between the two sites,
//! whoever offloads. The kernel's
//! flowtable offloads covered traffic through xfrm (its
//! FLOW_OFFLOAD_XMIT_XFRM path, nf_flow_xmit_xfrm); nft-offload leaves both
//! directions to the kernel (the xfrm policies hold them: `flows`/`status`
//! say so) while an uncovered connection of the same router is offloaded.

use std::net::IpAddr;

use anyhow::{bail, Result};

use super::net::{finish, Router};
use super::{step, Ctx, Evidence, Offload};
use crate::vm::capture::{ipv4_of, Capture};
use crate::vm::stream::Direction;

const LAN: &str = "192.168.1.0/24";
const SITE: &str = "10.99.0.0/24";
const SERVER: &str = "10.99.0.2";

/// The SAs and policies of both ends. Keys are fixed test keys (20 bytes:
/// a 16-byte AES key and the 4-byte salt of RFC 4106).
fn tunnel(r: &mut Router) -> Result<()> {
    for m in ["esp4", "xfrm_user"] {
        r.rtr(&["modprobe", m])?;
    }
    let key_out = "0x0102030405060708090a0b0c0d0e0f1011121314";
    let key_in = "0x2122232425262728292a2b2c2d2e2f3031323334";
    let sa = |src: &str, dst: &str, spi: &str, reqid: u32, key: &str| {
        format!(
            "ip xfrm state add src {src} dst {dst} proto esp spi {spi} reqid {reqid} mode tunnel \
             aead 'rfc4106(gcm(aes))' {key} 128\n"
        )
    };
    let pol = |src: &str, dst: &str, dir: &str, tsrc: &str, tdst: &str, reqid: u32| {
        format!(
            "ip xfrm policy add src {src} dst {dst} dir {dir} tmpl src {tsrc} dst {tdst} proto esp reqid {reqid} \
             mode tunnel\n"
        )
    };
    let (rtr_ip, wan_ip) = ("203.0.113.1", "203.0.113.2");
    let states = sa(rtr_ip, wan_ip, "0x1001", 1, key_out) + &sa(wan_ip, rtr_ip, "0x1002", 2, key_in);
    // The router forwards: out for the LAN's packets, fwd (and in) for the
    // far site's decrypted ones (__xfrm_policy_check in ip_forward).
    let rtr_script = states.clone()
        + &pol(LAN, SITE, "out", rtr_ip, wan_ip, 1)
        + &pol(SITE, LAN, "fwd", wan_ip, rtr_ip, 2)
        + &pol(SITE, LAN, "in", wan_ip, rtr_ip, 2)
        + &format!("ip route add {SITE} via {wan_ip} dev rwan\n");
    r.sh(&r.lab.rtr, &rtr_script)?;
    let wan_script = states
        + &pol(SITE, LAN, "out", wan_ip, rtr_ip, 2)
        + &pol(LAN, SITE, "in", rtr_ip, wan_ip, 1)
        + &format!("ip addr add {SERVER}/32 dev lo\nip route add {LAN} via {rtr_ip} dev wan1 src {SERVER}\n");
    r.sh(&r.lab.wan, &wan_script)?;
    // Covered traffic is routed as is; the rest is masqueraded.
    r.masq_match = format!("ip daddr != {SITE}");
    Ok(())
}

/// Frames the router put on the WAN wire during `f` (captured in the
/// switch, `Router::wire_tap`): (ESP packets, clear IPv4 packets between
/// the two sites).
fn on_the_wire<T>(sw: &str, f: impl FnOnce() -> Result<T>) -> Result<(T, usize, usize)> {
    let cap = Capture::start(sw, "wan0")?;
    let out = f();
    let frames = cap.stop()?;
    let out = out?;
    let in_site = |a: [u8; 4]| a[0] == 10 && a[1] == 99 && a[2] == 0;
    let in_lan = |a: [u8; 4]| a[0] == 192 && a[1] == 168 && a[2] == 1;
    let (mut esp, mut clear) = (0, 0);
    for fr in &frames {
        if let Some((proto, s, d)) = ipv4_of(fr) {
            if proto == 50 {
                esp += 1;
            } else if (in_site(s) && in_lan(d)) || (in_lan(s) && in_site(d)) {
                clear += 1;
            }
        }
    }
    Ok((out, esp, clear))
}

pub fn run(_ctx: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    step("lab up");
    let mut r = Router::up("ip", how)?;
    step("tunnel");
    let sw = r.wire_tap()?;
    tunnel(&mut r)?;
    r.bulk = 2 << 20;
    step("offload");
    let d = r.offload(how, &["rlan", "rwan"])?;
    // The uncovered control: the WAN host's own address, masqueraded.
    step("uncovered");
    r.prove_transfer(ev, "uncovered", 5351, Direction::Download, d.as_ref())?;
    // Covered, both ways.
    r.server = SERVER.parse::<IpAddr>()?;
    r.server_bind = r.server;
    for (tag, port, dir) in [("covered_down", 5352, Direction::Download), ("covered_up", 5353, Direction::Upload)] {
        step(tag);
        let lan = r.lab.lan.clone();
        let (m, esp, clear) =
            on_the_wire(&sw.name, || r.measure_transfer(ev, tag, port, dir, d.as_ref(), &lan, how == Offload::Kernel))?;
        ev.put(&format!("{tag}_wire_esp"), esp as u64);
        ev.put(&format!("{tag}_wire_clear"), clear as u64);
        // The router sends the data (download: ACKs) as ESP: hundreds at least.
        if clear > 0 || esp < 200 {
            bail!("{tag}: the router sent {clear} clear packets between the sites and {esp} ESP packets");
        }
        match how {
            // The reference offloads through xfrm.
            Offload::Kernel => {
                m.offloaded_after?;
                if m.fwd_bulk > 0 {
                    bail!("{tag}: the kernel flowtable left {} packets to the forward chain", m.fwd_bulk);
                }
            }
            // The engine leaves covered directions to the kernel: the
            // forward chain sees the bulk.
            Offload::Tc | Offload::Xdp => {
                if m.fwd_bulk == 0 {
                    bail!("{tag}: covered traffic bypassed the forward chain (xfrm policy not applied)");
                }
            }
        }
    }
    if let Some(d) = &d {
        let st = d.status()?;
        ev.put("engine_not_offloaded", st["not_offloaded"].clone());
        ev.put("engine_slow_path", st["slow_path"].clone());
    }
    finish(&r, ev, d)
}
