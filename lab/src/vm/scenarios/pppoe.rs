//! The WAN as a PPPoE session, as a DSL router has it: rp-pppoe's
//! `pppoe-server` in the ISP's namespace on `wan0` (user mode: Debian's is
//! built without `-k`; only the router's side matters here), and in the
//! router `pppd` with the kernel PPPoE plugin on `rwan`, its ppp device named
//! `pppoe-wan` (OpenWrt's name). Both device lists firewall4 users write:
//! the ppp device (`{ rlan, pppoe-wan }`) and the Ethernet beneath
//! (`{ rlan, rwan }`).
//!
//! MTU: the session's MTU is 1492 (1500 less the 8-byte PPPoE and PPP
//! headers, RFC 2516). TCP never needs more (the server's MSS follows its
//! own 1492 link), so an offloaded UDP flow carries the proof: a 1500-byte
//! datagram with DF from the client is answered with "fragmentation
//! needed" and the client learns 1492 (`Router::prove_mtu`). IPv4 only (no
//! IPv6CP here).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::net::{finish, Router};
use super::{step, Ctx, Evidence, Offload};
use crate::vm::stream::Direction;

/// Which devices the flowtable lists on the WAN side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// `pppoe-wan`, the ppp device.
    Ppp,
    /// `rwan`, the Ethernet device the session runs on.
    Lower,
}

/// Start the session: returns once `pppoe-wan` has its address.
pub fn pppoe_wan(r: &mut Router) -> Result<()> {
    for m in ["ppp_generic", "pppoe"] {
        r.rtr(&["modprobe", m]).with_context(|| format!("modprobe {m}"))?;
    }
    // The ISP: no address on the Ethernet, only the session.
    let opts = r.dir.join("pppoe-server-options");
    std::fs::write(&opts, "noauth\nlcp-echo-interval 5\nlcp-echo-failure 4\nmtu 1492\nmru 1492\nnodefaultroute\n")?;
    r.sh(&r.lab.wan, "ip addr flush dev wan0\n")?;
    let opts_s = opts.to_str().context("path")?;
    // It daemonizes; the lab kills what is left in its namespaces.
    r.lab.exec(
        &r.lab.wan,
        &["pppoe-server", "-I", "wan0", "-L", "203.0.113.2", "-R", "203.0.113.1", "-N", "4", "-O", opts_s],
    )?;
    // The router: the session on rwan, no address on it otherwise.
    r.sh(&r.lab.rtr, "ip addr flush dev rwan\n")?;
    r.lab.spawn(
        &r.lab.rtr,
        &[
            "pppd",
            "plugin",
            "pppoe.so",
            "nic-rwan",
            "ifname",
            "pppoe-wan",
            "nodetach",
            "noauth",
            "noipdefault",
            "nodefaultroute",
            "mtu",
            "1492",
            "mru",
            "1492",
            "lcp-echo-interval",
            "5",
            "lcp-echo-failure",
            "4",
            "user",
            "nfo",
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = r.rtr(&["ip", "-4", "addr", "show", "dev", "pppoe-wan"]).unwrap_or_default();
        if a.contains("inet 203.0.113.1") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the PPPoE session did not come up within 30 s (pppoe-wan: {a:?})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    r.wan_dev = "pppoe-wan".into();
    // The ISP's user-mode server moves every frame through a pty and a
    // process of its own: slow under TCG, so less data.
    r.bulk = 2 << 20;
    Ok(())
}

pub fn run(_ctx: &Ctx, ev: &mut Evidence, how: Offload, listed: Listed) -> Result<()> {
    step("lab up");
    let mut r = Router::up("pp", how)?;
    step("pppoe session");
    pppoe_wan(&mut r)?;
    let mtu = r.rtr(&["cat", "/sys/class/net/pppoe-wan/mtu"])?;
    ev.put("pppoe_wan_mtu", mtu.trim());
    let wan_listed = match listed {
        Listed::Ppp => "pppoe-wan",
        Listed::Lower => "rwan",
    };
    ev.put("wan", format!("pppoe-wan listed as {wan_listed}"));
    step("offload");
    let d = r.offload(how, &["rlan", wan_listed])?;
    step("download");
    r.prove_download(ev, "download", 5321, d.as_ref())?;
    step("upload");
    r.prove_transfer(ev, "upload", 5322, Direction::Upload, d.as_ref())?;
    step("mtu");
    r.prove_mtu(ev, 5323, 1492, d.as_ref())?;
    finish(&r, ev, d)
}

/// `{ rlan, pppoe-wan }`.
pub fn ppp(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run(c, ev, how, Listed::Ppp)
}

/// `{ rlan, rwan }`.
pub fn lower(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run(c, ev, how, Listed::Lower)
}
