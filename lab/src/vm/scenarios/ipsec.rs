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

use anyhow::{bail, Context, Result};

use super::net::{finish, Router};
use super::{step, Ctx, Evidence, Offload};
use crate::vm::capture::{ipv4_of, Capture};
use crate::vm::stream::Direction;

const LAN: &str = "192.168.1.0/24";
const SITE: &str = "10.99.0.0/24";
const SERVER: &str = "10.99.0.2";

/// The SAs and policies of both ends. Keys are fixed test keys (20 bytes:
/// a 16-byte AES key and the 4-byte salt of RFC 4106). `wan`: the router's
/// and the WAN host's devices the tunnel runs over; `scoped`: the router's
/// out policy names its device (`dev rwan.7`), which the kernel matches
/// against the route's device (`skb_dst(skb)->dev`), not the port below.
fn tunnel(r: &mut Router, wan: (&str, &str), scoped: bool) -> Result<()> {
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
    // The router's out policy, on its WAN device when `scoped`.
    let out = pol(LAN, SITE, "out", "203.0.113.1", "203.0.113.2", 1);
    let out = if scoped { out.replace(" dir out", &format!(" dev {} dir out", wan.0)) } else { out };
    let (rtr_ip, wan_ip) = ("203.0.113.1", "203.0.113.2");
    let states = sa(rtr_ip, wan_ip, "0x1001", 1, key_out) + &sa(wan_ip, rtr_ip, "0x1002", 2, key_in);
    // The router forwards: out for the LAN's packets, fwd (and in) for the
    // far site's decrypted ones (__xfrm_policy_check in ip_forward).
    let rtr_script = states.clone()
        + &out
        + &pol(SITE, LAN, "fwd", wan_ip, rtr_ip, 2)
        + &pol(SITE, LAN, "in", wan_ip, rtr_ip, 2)
        + &format!("ip route add {SITE} via {wan_ip} dev {}\n", wan.0);
    r.sh(&r.lab.rtr, &rtr_script)?;
    let wan_script = states
        + &pol(SITE, LAN, "out", wan_ip, rtr_ip, 2)
        + &pol(LAN, SITE, "in", rtr_ip, wan_ip, 1)
        + &format!("ip addr add {SERVER}/32 dev lo\nip route add {LAN} via {rtr_ip} dev {} src {SERVER}\n", wan.1);
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
    // The VLAN variant's frames carry their tag (put back by Capture).
    let untagged = |f: &[u8]| -> Vec<u8> {
        if f.len() > 18 && f[12..14] == [0x81, 0x00] {
            [&f[..12], &f[16..]].concat()
        } else {
            f.to_vec()
        }
    };
    let in_site = |a: [u8; 4]| a[0] == 10 && a[1] == 99 && a[2] == 0;
    let in_lan = |a: [u8; 4]| a[0] == 192 && a[1] == 168 && a[2] == 1;
    let (mut esp, mut clear) = (0, 0);
    for fr in &frames {
        if let Some((proto, s, d)) = ipv4_of(&untagged(fr)) {
            if proto == 50 {
                esp += 1;
            } else if (in_site(s) && in_lan(d)) || (in_lan(s) && in_site(d)) {
                clear += 1;
            }
        }
    }
    // A transfer that failed says what the router sent meanwhile (clear
    // packets the far end drops stall it).
    let out = out
        .with_context(|| format!("meanwhile the router sent {clear} clear packets between the sites and {esp} ESP"))?;
    Ok((out, esp, clear))
}

/// The WAN on `rwan`, policies without a device.
pub fn run(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    with(c, ev, how, false)
}

/// The WAN on a VLAN device (`rwan.7`, the WAN host's `wan1.7`), the out
/// policy scoped to it (`dev rwan.7`), and the Ethernet beneath listed
/// (`{ rlan, rwan }`): the route's device is rwan.7, the fast path's port
/// rwan (issue 17 defect 2: the selector's device was compared with the
/// port, so the LAN's packets to the far site were offloaded in clear).
pub fn vlan_dev(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    with(c, ev, how, true)
}

fn with(_ctx: &Ctx, ev: &mut Evidence, how: Offload, vlan: bool) -> Result<()> {
    step("lab up");
    let mut r = Router::up(if vlan { "iv" } else { "ip" }, how)?;
    step("tunnel");
    let sw = r.wire_tap()?;
    let wan = if vlan {
        let (rtr, wan) = (r.lab.rtr.clone(), r.lab.wan.clone());
        r.rtr(&["modprobe", "8021q"])?;
        r.sh(
            &rtr,
            "ip addr flush dev rwan\nip link add link rwan name rwan.7 type vlan id 7\nip link set rwan.7 up\n\
             ip addr add 203.0.113.1/24 dev rwan.7\n",
        )?;
        // Tags on the wire, not in the skb's metadata (see vlan.rs).
        r.sh(
            &wan,
            "ip addr flush dev wan1\nip link add link wan1 name wan1.7 type vlan id 7\nip link set wan1.7 up\n\
             ip addr add 203.0.113.2/24 dev wan1.7\nethtool -K wan1 txvlan off 2>/dev/null || true\n",
        )?;
        r.wan_dev = "rwan.7".into();
        r.lab.ping(&rtr, "203.0.113.2".parse()?)?;
        ev.put("wan", "rwan.7 (VLAN 7) over rwan, rwan listed; out policy dev rwan.7");
        ("rwan.7", "wan1.7")
    } else {
        ("rwan", "wan1")
    };
    tunnel(&mut r, wan, vlan)?;
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
