//! Router paths in the lab: the kernel with and without conntrack and NAT,
//! the bare-redirect floor and the offload engine in both modes, each under
//! the same generator load, TCP transfers and pings.

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::floor::attach_floor;
use super::generator::Gen;
use super::offload_rate::offload_rate;
use super::stat::percentile;
use super::{reps, BenchOpts, PathResult, Report, Stat};
use crate::daemon::{Daemon, DaemonOpts};
use crate::frames;
use crate::lab::{cpu, Lab, LabOpts};

pub(super) const PATHS: [&str; 6] =
    ["kernel_ct_nat", "kernel_plain", "floor_tc", "floor_xdp", "offload_tc", "offload_xdp"];

fn mac_of(lab: &Lab, ns: &str, ifc: &str) -> Result<[u8; 6]> {
    let out = lab.exec(ns, &["cat", &format!("/sys/class/net/{ifc}/address")])?;
    let v: Vec<u8> = out.trim().split(':').filter_map(|h| u8::from_str_radix(h, 16).ok()).collect();
    v.try_into().map_err(|_| anyhow!("bad MAC for {ifc}: {out}"))
}

pub(super) fn ifindex_in(lab: &Lab, ns: &str, ifc: &str) -> Result<u32> {
    Ok(lab.exec(ns, &["cat", &format!("/sys/class/net/{ifc}/ifindex")])?.trim().parse()?)
}

fn wan_rx(lab: &Lab) -> Result<u64> {
    Ok(lab.iface_stats(&lab.wan, "wan0")?.0)
}

/// Frames per generator run. Each live-frames run sets up a page pool
/// (about a millisecond), so runs must be large; a run is a burst at the
/// generator's full speed, part of which the router's 256-slot veth input
/// ring drops. CPU per packet divides by what was forwarded, so it is not
/// skewed by those drops.
const BATCH: u32 = 2000;

/// Offer `pps` for `secs` in small paced batches; returns
/// (router CPU ns per forwarded packet, forwarded packets per second).
fn paced(lab: &Lab, g: &Gen, nflows: u32, dport: u16, pps: f64, secs: f64) -> Result<(f64, f64)> {
    let rx0 = wan_rx(lab)?;
    let c0 = cpu::sample(Some(1))?;
    let t0 = Instant::now();
    let mut sent = 0f64;
    while t0.elapsed().as_secs_f64() < secs {
        g.blast_to(BATCH, nflows, dport)?;
        sent += f64::from(BATCH);
        let due = sent / pps;
        let now = t0.elapsed().as_secs_f64();
        if due > now {
            std::thread::sleep(Duration::from_secs_f64(due - now));
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(50));
    let c1 = cpu::sample(Some(1))?;
    let fwd = wan_rx(lab)?.saturating_sub(rx0);
    if fwd == 0 {
        bail!("nothing was forwarded");
    }
    Ok((cpu::busy_ns(&c0, &c1).0 as f64 / fwd as f64, fwd as f64 / wall))
}

/// Forwarded packets per second with the generator running back to back.
fn max_pps(lab: &Lab, g: &Gen, secs: f64) -> Result<f64> {
    let rx0 = wan_rx(lab)?;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        g.blast(50_000, 1)?;
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok(wan_rx(lab)?.saturating_sub(rx0) as f64 / wall)
}

fn iperf(lab: &Lab, streams: u32, secs: u32) -> Result<f64> {
    let (p, t) = (streams.to_string(), secs.to_string());
    let out = lab.exec(&lab.lan, &["iperf3", "-c", "203.0.113.2", "-J", "-t", &t, "-P", &p])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().map(|b| b / 1e6).ok_or_else(|| anyhow!("iperf3: no result"))
}

fn set_gso(lab: &Lab, on: bool) -> Result<()> {
    let v = if on { "on" } else { "off" };
    lab.exec(&lab.lan, &["ethtool", "-K", "lan0", "tso", v, "gso", v])?;
    lab.exec(&lab.wan, &["ethtool", "-K", "wan0", "tso", v, "gso", v])?;
    Ok(())
}

pub(super) fn router_paths(o: &BenchOpts, r: &mut Report) -> Result<()> {
    let prefix = format!("nfb{}", std::process::id() % 100000);
    let lab = Lab::up(&LabOpts { prefix, xdp_safe: true, isolate_router_cpu: true })?;
    lab.warm_neighbours()?;
    if !lab.isolation.enabled {
        r.notes.push(format!("router CPU not isolated: {}", lab.isolation.note));
    }
    // kernel_plain forwards without NAT: the server needs a route back.
    lab.exec(&lab.wan, &["ip", "route", "add", "192.168.1.0/24", "via", "203.0.113.1"])?;
    // The server drops the generator's packets at once (no ICMP replies).
    lab.exec_stdin(&lab.wan, &["nft", "-f", "-"], "table inet sink {\n chain pre {\n  type filter hook prerouting priority -300;\n  udp dport { 9, 10 } drop\n }\n}\n")?;
    let _srv = lab.spawn_pinned(&lab.wan, &["iperf3", "-s"], Some(0))?;
    lab.wait_tcp_listen(&lab.wan, 5201, Duration::from_secs(5))?;
    let lan0 = ifindex_in(&lab, &lab.lan, "lan0")?;
    let rwan = ifindex_in(&lab, &lab.rtr, "rwan")?;
    let (m_lan0, m_rlan, m_rwan, m_wan0) = (
        mac_of(&lab, &lab.lan, "lan0")?,
        mac_of(&lab, &lab.rtr, "rlan")?,
        mac_of(&lab, &lab.rtr, "rwan")?,
        mac_of(&lab, &lab.wan, "wan0")?,
    );
    // 64-byte Ethernet frame (60 + FCS on the wire), as a packet generator sends.
    let frame = frames::udp4(m_lan0, m_rlan, "192.168.1.2", "203.0.113.2", 64, 10000, 9, &[0x5a; 18]);
    let g = Gen::start(&lab.lan, lan0, frame)?;
    let n = reps(o);
    let secs = if o.quick { 0.6 } else { 2.0 };
    let pps = 150_000.0;
    let tcp_secs = if o.quick { 2 } else { 5 };
    for path in PATHS {
        eprintln!("bench:   {path}");
        if path == "kernel_plain" {
            lab.exec(&lab.rtr, &["nft", "flush", "ruleset"])?;
        } else {
            lab.load_ruleset()?;
        }
        let _floor = match path {
            "floor_tc" => Some(attach_floor(&lab, false, rwan, m_rwan, m_wan0)?),
            "floor_xdp" => Some(attach_floor(&lab, true, rwan, m_rwan, m_wan0)?),
            _ => None,
        };
        let engine = match path {
            "offload_tc" => Some(start_engine(&lab, o, "tc")?),
            "offload_xdp" => Some(start_engine(&lab, o, "xdp")?),
            _ => None,
        };
        let mut pr = PathResult { offered_pps: pps, ..Default::default() };
        // warm up: conntrack entries for 1 and 1000 flows, then offload
        for _ in 0..8 {
            g.blast(BATCH, 1000)?;
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(1500));
        if let Some(d) = &engine {
            let st = d.status()?;
            if st["flows_offloaded"].as_u64().unwrap_or(0) < 1000 {
                r.notes.push(format!(
                    "{path}: only {} of 1000 generator flows offloaded at the start",
                    st["flows_offloaded"]
                ));
            }
        }
        let mut v1 = Vec::new();
        let mut vk = Vec::new();
        let mut vm = Vec::new();
        for _ in 0..n {
            v1.push(paced(&lab, &g, 1, 9, pps, secs)?.0);
            vk.push(paced(&lab, &g, 1000, 9, pps, secs)?.0);
            vm.push(max_pps(&lab, &g, secs)?);
        }
        pr.router_ns_per_pkt = Some(Stat::of(v1));
        pr.router_ns_per_pkt_1k = Some(Stat::of(vk));
        pr.max_pps = Some(Stat::of(vm));
        if !path.starts_with("floor") {
            let mut a = Vec::new();
            let mut b = Vec::new();
            let mut c = Vec::new();
            let tcp_reps = if o.quick { 1 } else { 3 };
            for _ in 0..tcp_reps {
                set_gso(&lab, false)?;
                a.push(iperf(&lab, 1, tcp_secs)?);
                set_gso(&lab, true)?;
                b.push(iperf(&lab, 1, tcp_secs)?);
                c.push(iperf(&lab, 4, tcp_secs)?);
            }
            pr.tcp_1stream_1500_mbps = Some(Stat::of(a));
            pr.tcp_1stream_gso_mbps = Some(Stat::of(b));
            pr.tcp_4stream_gso_mbps = Some(Stat::of(c));
            // latency: idle, then under a saturating TCP load
            let dst = "203.0.113.2".parse()?;
            let idle: Vec<f64> =
                (0..20).filter_map(|_| lab.ping(&lab.lan, dst).ok()).map(|d| d.as_secs_f64() * 1e3).collect();
            pr.ping_idle_ms = Some(Stat::of(idle));
            let load = lab.spawn_pinned(
                &lab.lan,
                &["iperf3", "-c", "203.0.113.2", "-t", &(tcp_secs + 2).to_string()],
                Some(0),
            )?;
            std::thread::sleep(Duration::from_millis(700));
            let t0 = Instant::now();
            let mut samples = Vec::new();
            while t0.elapsed() < Duration::from_secs(u64::from(tcp_secs)) {
                if let Ok(d) = lab.ping(&lab.lan, dst) {
                    samples.push(d.as_secs_f64() * 1e3);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = wait_child(load);
            pr.ping_loaded_p50_ms = Some(percentile(&samples, 0.5));
            pr.ping_loaded_p99_ms = Some(percentile(&samples, 0.99));
            pr.ping_loaded_samples = samples;
        }
        if let (Some(d), "offload_tc") = (&engine, path) {
            offload_rate(&lab, d, if o.quick { 2000 } else { 10_000 }, r)?;
        }
        if let Some(d) = engine {
            d.stop()?;
        }
        r.paths.insert(path.to_string(), pr);
    }
    Ok(())
}

/// The engine on the router's ports, pinned to the router CPU.
fn start_engine(lab: &Lab, o: &BenchOpts, mode: &str) -> Result<Daemon> {
    let args = ["--iface", "rlan", "--iface", "rwan", "--mode", mode].map(String::from).to_vec();
    let cpu = lab.isolation.router_cpu;
    Daemon::launch(lab, DaemonOpts { exe: Some(o.exe.clone()), args, cpu, ..Default::default() })
}

fn wait_child(mut c: Child) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if c.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
    Ok(())
}
