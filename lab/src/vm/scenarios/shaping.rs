//! sqm-scripts' shape on the WAN: the upload shaped by a root qdisc on
//! `rwan`, the download by the same on `ifb4rwan`, which `rwan`'s ingress
//! feeds through a u32 + mirred filter (sqm-scripts' own commands), with
//! cake (piece_of_cake.qos) or htb + fq_codel (simple.qos).
//!
//! The shaped rate must hold whoever offloads: the bytes of each transfer
//! go through the shaper (its own counters) and arrive no faster than the
//! shaped rate. How each offloader keeps it: the kernel flowtable transmits
//! through the qdisc, and never sees what the ifb re-injects (see `run`);
//! the engine in TC mode redirects into the qdisc (the LAN-to-WAN direction
//! offloaded) and leaves the direction arriving under the ingress filter to
//! the kernel; in XDP mode (which would skip both) it leaves both
//! directions to the kernel.

use anyhow::{bail, Context, Result};

use super::net::{finish, Router};
use super::{step, Ctx, Evidence, Offload};
use crate::vm::stream::Direction;

/// Shaped rates, kbit/s: far below what TCG forwards, so the shaper binds.
const UP_KBIT: u64 = 4000;
const DOWN_KBIT: u64 = 6000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shaper {
    Cake,
    FqCodel,
}

/// The qdisc commands for `dev` at `kbit`.
fn shaper_cmds(s: Shaper, dev: &str, kbit: u64) -> String {
    match s {
        Shaper::Cake => format!("tc qdisc replace dev {dev} root cake bandwidth {kbit}kbit besteffort\n"),
        Shaper::FqCodel => format!(
            "tc qdisc replace dev {dev} root handle 1: htb default 11\n\
             tc class add dev {dev} parent 1: classid 1:1 htb rate {kbit}kbit\n\
             tc class add dev {dev} parent 1:1 classid 1:11 htb rate {kbit}kbit\n\
             tc qdisc add dev {dev} parent 1:11 handle 110: fq_codel\n"
        ),
    }
}

fn sqm(r: &Router, s: Shaper) -> Result<()> {
    let m = match s {
        Shaper::Cake => "sch_cake",
        Shaper::FqCodel => "sch_fq_codel",
    };
    for module in [m, "sch_htb", "ifb", "cls_u32", "act_mirred"] {
        let _ = r.rtr(&["modprobe", module]);
    }
    let script = shaper_cmds(s, "rwan", UP_KBIT)
        + "ip link add ifb4rwan type ifb\nip link set ifb4rwan up\n"
        + "tc qdisc add dev rwan handle ffff: ingress\n"
        + "tc filter add dev rwan parent ffff: protocol all prio 10 u32 match u32 0 0 flowid 1:1 action mirred \
           egress redirect dev ifb4rwan\n"
        + &shaper_cmds(s, "ifb4rwan", DOWN_KBIT);
    r.sh(&r.lab.rtr, &script)?;
    Ok(())
}

/// Bytes the root qdisc of `dev` has sent.
fn qdisc_bytes(r: &Router, dev: &str) -> Result<u64> {
    let out = r.rtr(&["tc", "-s", "qdisc", "show", "dev", dev, "root"])?;
    out.split_whitespace()
        .skip_while(|w| *w != "Sent")
        .nth(1)
        .and_then(|b| b.parse().ok())
        .with_context(|| format!("no byte count for {dev}'s root qdisc in {out:?}"))
}

pub fn run(_ctx: &Ctx, ev: &mut Evidence, how: Offload, s: Shaper) -> Result<()> {
    step("lab up");
    let mut r = Router::up("sq", how)?;
    step("sqm");
    sqm(&r, s)?;
    r.bulk = 1 << 20;
    step("offload");
    let d = r.offload(how, &["rlan", "rwan"])?;
    let lan = r.lab.lan.clone();
    for (tag, port, dir, dev, kbit) in [
        ("upload", 5361, Direction::Upload, "rwan", UP_KBIT),
        ("download", 5362, Direction::Download, "ifb4rwan", DOWN_KBIT),
    ] {
        step(tag);
        let q0 = qdisc_bytes(&r, dev)?;
        let m = r.measure_transfer(ev, tag, port, dir, d.as_ref(), &lan, how != Offload::Xdp)?;
        let through = qdisc_bytes(&r, dev)? - q0;
        ev.put(&format!("{tag}_shaper_bytes"), through);
        let rate = ev.figures[&format!("{tag}_bulk_mbit_s")].as_f64().unwrap_or(f64::MAX) * 1000.0;
        ev.put(&format!("{tag}_shaped_kbit"), kbit);
        // Everything went through the shaper, and no faster than it lets.
        if through < r.bulk {
            bail!("{tag}: only {through} bytes went through {dev}'s shaper for a {}-byte bulk", r.bulk);
        }
        if rate > kbit as f64 * 1.10 {
            bail!("{tag}: {rate:.0} kbit/s through a {kbit} kbit/s shaper");
        }
        if let Ok(t) = &m.offloaded_after {
            ev.put(&format!("{tag}_offloaded_after_ms"), t.as_millis() as u64);
        }
        // The direction from the LAN leaves by the shaped rwan: the kernel
        // flowtable and TC offload it through the qdisc (the forward chain
        // sees none of it); XDP would skip the qdisc, so it stays with the
        // kernel. The direction from the WAN arrives under the ifb filter:
        // the kernel keeps it whoever offloads (ifb re-injects packets
        // with tc_skip_classify, which also skips the netfilter ingress hook
        // of the kernel flowtable: __netif_receive_skb_core), so the
        // forward chain sees it.
        match how {
            Offload::Kernel | Offload::Tc => {
                m.offloaded_after.with_context(|| format!("{tag}: not offloaded"))?;
                if m.fwd_bulk_from_lan > 0 {
                    bail!("{tag}: {} packets from the LAN reached the forward chain", m.fwd_bulk_from_lan);
                }
            }
            Offload::Xdp if m.fwd_bulk_from_lan == 0 => bail!("{tag}: XDP mode fast-pathed past a shaper"),
            Offload::Xdp => {}
        }
        if m.fwd_bulk_from_wan == 0 {
            bail!("{tag}: packets from the WAN bypassed the forward chain past the ifb download shaper");
        }
    }
    if let Some(d) = &d {
        let st = d.status()?;
        for k in ["held_egress_hook", "held_ingress_hook"] {
            ev.put(&format!("engine_{k}"), st["slow_path"][k].clone());
        }
    }
    finish(&r, ev, d)
}

pub fn cake(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run(c, ev, how, Shaper::Cake)
}

pub fn fq_codel(c: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    run(c, ev, how, Shaper::FqCodel)
}
