//! Router paths in the lab: the kernel with and without conntrack and NAT,
//! the bare-redirect floor and the offload engine in both modes, measured
//! in interleaved rounds (every path once per round, rounds repeated) so
//! that drift on the shared machine hits all paths alike.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::cost::{Cost, Threads};
use super::floor::{attach_floor, Floor};
use super::generator::Gen;
use super::offload_rate::offload_rate;
use super::stat::percentile;
use super::tcp::{tcp_and_ping, TcpAcc};
use super::{BenchOpts, PathResult, Report, Stat};
use crate::daemon::{Daemon, DaemonOpts};
use crate::frames;
use crate::lab::{cpu, Lab, LabOpts};

pub(super) const PATHS: [&str; 6] =
    ["kernel_ct_nat", "kernel_plain", "floor_tc", "floor_xdp", "offload_tc", "offload_xdp"];

/// Flows of the fixed-load figure, as in the independent
/// measurement.
pub(super) const FLOWS: u32 = 64;
/// Offered load of the fixed-load figure while the generator runs (it
/// pauses for a grace period between runs, see [`RUN_FRAMES`]).
pub(super) const PPS: f64 = BURST_PPS;

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

/// Frames per paced generator run, most of them dropped by the generator
/// itself (it lets through groups of [`GROUP`] at [`BURST_PPS`]). Each
/// live-frames run with repeat > 1 switches the XDP dispatcher and so waits
/// for an RCU grace period (net/bpf/test_run.c bpf_prog_test_run_xdp),
/// milliseconds to tens of them on a busy machine, so runs must be long.
pub(super) const RUN_FRAMES: u32 = 1_000_000;
/// Frame rate inside a run, in groups of [`GROUP`]: below what the slowest
/// path (kernel_ct_nat, ~8 us per packet on a busy machine) forwards, so the
/// router's 256-slot veth ring does not overflow, every path forwards the
/// same packets in the same batches, and the batches do not depend on how
/// late its thread got the CPU.
pub(super) const BURST_PPS: f64 = 100_000.0;
/// Frames sent back to back, one NAPI budget: the router polls up to 64 per
/// round, as a loaded router would.
pub(super) const GROUP: u32 = 64;
/// New connections of the offload-rate burst (the target is
/// stated over a 10k burst), quick runs included: the sender takes 0.1 s.
const BURST_FLOWS: u32 = 10_000;

/// Offer `pps` over `nflows` flows (flow i: destination port `dport` +
/// i / 50,000) for `secs` and measure the router's cost; returns (cost,
/// forwarded packets/s). Measured again if the NAPI kthreads changed
/// meanwhile.
pub(super) fn measure(
    lab: &Lab,
    g: &Gen,
    engine: Option<u32>,
    load: (u32, u16, f64),
    secs: f64,
) -> Result<(Cost, f64)> {
    let (nflows, dport, pps) = load;
    for _ in 0..3 {
        let th = Threads::of(lab, engine)?;
        let rx0 = wan_rx(lab)?;
        let d0 = lab.veth_drops()?;
        let Ok(s0) = th.sample() else { continue };
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < secs {
            g.paced(RUN_FRAMES, nflows, dport, (1e9 / pps) as u32, GROUP)?;
        }
        let wall = t0.elapsed().as_secs_f64();
        // let the rings drain into the counted threads
        std::thread::sleep(Duration::from_millis(50));
        let Ok(s1) = th.sample() else { continue };
        let fwd = wan_rx(lab)?.saturating_sub(rx0);
        let drops = lab.veth_drops()?.saturating_sub(d0);
        if Threads::of(lab, engine)? != th {
            continue;
        }
        if fwd == 0 {
            let (rlan, rwan) = (lab.iface_stats(&lab.rtr, "rlan")?, lab.iface_stats(&lab.rtr, "rwan")?);
            bail!(
                "nothing was forwarded ({nflows} flows to port {dport}; router rlan rx {} packets, rwan tx {})",
                rlan.0,
                rwan.2
            );
        }
        return Ok((Cost::between(&s0, &s1, fwd, drops), fwd as f64 / wall));
    }
    bail!("the router's NAPI kthreads or engine threads kept changing during the measurement")
}

/// Forwarded packets per second with the generator running back to back.
fn max_pps(lab: &Lab, g: &Gen, secs: f64) -> Result<f64> {
    let rx0 = wan_rx(lab)?;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        g.blast(50_000, FLOWS)?;
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok(wan_rx(lab)?.saturating_sub(rx0) as f64 / wall)
}

/// The lab as the benchmark uses it: router CPU isolated, a sink that
/// drops the generator's packets, an iperf3 server, the generator.
pub(super) struct Bench {
    pub lab: Lab,
    pub g: Gen,
    rwan: u32,
    m_rwan: [u8; 6],
    m_wan0: [u8; 6],
}

impl Bench {
    fn up() -> Result<Bench> {
        let prefix = format!("nfb{}", std::process::id() % 100000);
        let lab = Lab::up(&LabOpts { prefix, xdp_safe: true, isolate_router_cpu: true })?;
        lab.warm_neighbours()?;
        // kernel_plain forwards without NAT: the server needs a route back.
        lab.exec(&lab.wan, &["ip", "route", "add", "192.168.1.0/24", "via", "203.0.113.1"])?;
        // The server drops the generator's packets at once (no ICMP replies):
        // dports 9 and 10, and 100-109 for the live-connection scaling.
        lab.exec_stdin(&lab.wan, &["nft", "-f", "-"], "table inet sink {\n chain pre {\n  type filter hook prerouting priority -300;\n  udp dport { 9, 10, 100-109 } drop\n }\n}\n")?;
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
        let g = Gen::start(&lab.lan, lan0, frame, lab.isolation.generator_cpu)?;
        super::tcp::router_tso(&lab, false)?;
        Ok(Bench { lab, g, rwan, m_rwan, m_wan0 })
    }
}

/// One path set up on the router: its ruleset, floor program or engine.
struct Active {
    _floor: Option<Floor>,
    engine: Option<Daemon>,
}

fn enter(b: &Bench, o: &BenchOpts, path: &str) -> Result<Active> {
    let lab = &b.lab;
    // Every path starts from the generator's flows alone: connections left
    // by the tests of the path before (TCP, offload rate) would otherwise
    // be offloaded and kept alive by the engine, whose time is counted
    // against the 64 measured flows (118-230 ns a packet in a quick run).
    lab.exec(&lab.rtr, &["conntrack", "-F"])?;
    if path == "kernel_plain" {
        lab.exec(&lab.rtr, &["nft", "flush", "ruleset"])?;
    } else {
        lab.load_ruleset()?;
    }
    let floor = match path {
        "floor_tc" => Some(attach_floor(lab, false, b.rwan, b.m_rwan, b.m_wan0)?),
        "floor_xdp" => Some(attach_floor(lab, true, b.rwan, b.m_rwan, b.m_wan0)?),
        _ => None,
    };
    let engine = match path {
        "offload_tc" => Some(start_engine(lab, o, "tc", &[])?),
        "offload_xdp" => Some(start_engine(lab, o, "xdp", &[])?),
        _ => None,
    };
    Ok(Active { _floor: floor, engine })
}

/// Conntrack entries for the generator's flows, and with an engine, wait
/// until it has offloaded them.
fn warm(b: &Bench, a: &Active, notes: &mut Vec<String>, path: &str) -> Result<()> {
    for _ in 0..4 {
        b.g.blast(256, FLOWS)?;
        std::thread::sleep(Duration::from_millis(5));
    }
    let Some(d) = &a.engine else {
        std::thread::sleep(Duration::from_millis(100));
        return Ok(());
    };
    let t0 = Instant::now();
    loop {
        let n = d.status()?["flows_offloaded"].as_u64().unwrap_or(0);
        if n >= u64::from(FLOWS) {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            notes.push(format!("{path}: only {n} of {FLOWS} generator flows offloaded after 10 s"));
            return Ok(());
        }
        b.g.blast(256, FLOWS)?;
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Default)]
struct Acc {
    cost: Vec<Cost>,
    fast_share: Vec<f64>,
    fwd_pps: Vec<f64>,
    max_pps: Vec<f64>,
    tcp: TcpAcc,
}

/// The lab with the router CPU isolated, or the run is invalid.
fn isolated(r: &mut Report) -> Result<Bench> {
    let b = Bench::up()?;
    if !b.lab.isolation.enabled {
        r.invalid.push(format!("router CPU not isolated: {}", b.lab.isolation.note));
        bail!("the benchmark needs 2 CPUs for its method: {}", b.lab.isolation.note);
    }
    Ok(b)
}

/// One part of the benchmark alone on its own isolated lab (`--live-only`,
/// `--small-router`), the generator on its CPU, saying which generator ran.
pub(super) fn part_alone(
    o: &BenchOpts,
    r: &mut Report,
    part: fn(&Bench, &BenchOpts, &mut Report) -> Result<()>,
) -> Result<()> {
    let b = isolated(r)?;
    let _pin = cpu::ThreadPin::to(b.lab.isolation.generator_cpu);
    let done = part(&b, o, r);
    note_generator(&b, r);
    done
}

/// Say which generator offered the load when it was not live frames.
fn note_generator(b: &Bench, r: &mut Report) {
    if b.g.fell_back() {
        r.notes.push(
            "generator: an AF_PACKET socket on the LAN host (this kernel refused live frames): the router's \
             figures are measured the same way but not comparable with runs whose load came from live frames"
                .into(),
        );
    }
}

pub(super) fn router_paths(o: &BenchOpts, r: &mut Report) -> Result<()> {
    let b = isolated(r)?;
    let lab = &b.lab;
    // Helper commands started from here run on the generator's CPU.
    let _pin = cpu::ThreadPin::to(lab.isolation.generator_cpu);
    let _srv = lab.spawn_pinned(&lab.wan, &["iperf3", "-s"], lab.isolation.generator_cpu)?;
    lab.wait_tcp_listen(&lab.wan, 5201, Duration::from_secs(5))?;
    let (rounds, secs, tcp_rounds) = if o.quick { (2, 0.6, 1) } else { (5, 3.0, 2) };
    let only = !o.only_paths.is_empty();
    let paths: Vec<&str> = PATHS.into_iter().filter(|p| !only || o.only_paths.iter().any(|q| q == p)).collect();
    let mut acc: BTreeMap<&str, Acc> = BTreeMap::new();
    for round in 0..rounds {
        for &path in &paths {
            eprintln!("bench:   round {}/{rounds}: {path}", round + 1);
            let a = enter(&b, o, path)?;
            warm(&b, &a, &mut r.notes, path)?;
            let pid = a.engine.as_ref().map(Daemon::pid);
            let x = acc.entry(path).or_default();
            let fast = |d: &Daemon| -> Result<u64> { Ok(d.status()?["fast_path_packets"].as_u64().unwrap_or(0)) };
            let f0 = a.engine.as_ref().map(fast).transpose()?;
            let (c, pps) = measure(lab, &b.g, pid, (FLOWS, 9, PPS), secs)?;
            if let (Some(d), Some(f0)) = (&a.engine, f0) {
                // includes a repeated attempt inside measure, if any: only ever more
                x.fast_share.push(fast(d)?.saturating_sub(f0) as f64 / c.forwarded.max(1) as f64);
            }
            x.cost.push(c);
            x.fwd_pps.push(pps);
            x.max_pps.push(max_pps(lab, &b.g, secs.min(1.0))?);
            if only {
                // profiling one path at a time: each measurement shown, nothing else run
                eprintln!("bench:     {c:?}, forwarded {pps:.0}/s");
                if let Some(d) = &a.engine {
                    eprintln!("bench:     engine status: {}", d.status()?);
                }
            } else if round < tcp_rounds && !path.starts_with("floor") {
                tcp_and_ping(lab, o.quick, &mut x.tcp)?;
            }
            if let (Some(d), "offload_tc", 0, false) = (&a.engine, path, round, only) {
                offload_rate(lab, d, BURST_FLOWS, r)?;
                r.offload_latency = super::latency::offload_latency(lab, o.quick)?;
            }
            if let Some(d) = a.engine {
                d.stop()?;
            }
        }
    }
    for (path, x) in acc {
        let st = |f: fn(&Cost) -> f64| Some(Stat::of(x.cost.iter().map(f).collect()));
        let mut pr = PathResult {
            offered_pps: PPS,
            router_ns_per_pkt: st(|c| c.router),
            router_ns_rounds: x.cost.iter().map(|c| c.router).collect(),
            napi_ns_per_pkt: st(|c| c.napi),
            engine_ns_per_pkt: st(|c| c.engine),
            sink_ns_per_pkt: st(|c| c.sink),
            cpu_wide_ns_per_pkt: st(|c| c.cpu_wide),
            ring_drops_per_fwd: st(|c| c.ring_drops),
            forwarded_pps: Some(Stat::of(x.fwd_pps)),
            fast_path_share: (!x.fast_share.is_empty()).then(|| Stat::of(x.fast_share)),
            max_pps: Some(Stat::of(x.max_pps)),
            ..Default::default()
        };
        x.tcp.into_result(&mut pr);
        r.paths.insert(path.to_string(), pr);
    }
    if only {
        return Ok(());
    }
    eprintln!("bench: daemon memory with live connections");
    super::memory::daemon_rss(&b, o, r)?;
    eprintln!("bench: live offloaded connections");
    super::live::live_scaling(&b, o, r)?;
    if !o.quick {
        eprintln!("bench: the small-router profile");
        super::small_router::small_router(&b, o, r)?;
    }
    note_generator(&b, r);
    Ok(())
}

/// The memory figures alone: the maps at each table size (no lab), then
/// the daemon with live connections (its own lab).
pub(super) fn memory_only(o: &BenchOpts, r: &mut Report) -> Result<()> {
    let maps = super::memory::memory(o)?;
    let b = isolated(r)?;
    let _pin = cpu::ThreadPin::to(b.lab.isolation.generator_cpu);
    match super::memory::daemon_rss(&b, o, r) {
        Err(e) if super::generator::refused(&e) => r.invalid.push(format!("{e:#}: no daemon memory figure")),
        other => other?,
    }
    note_generator(&b, r);
    r.memory.extend(maps);
    Ok(())
}

/// The offload rate and latency phases alone, on a fresh engine, as the
/// full run has them after offload_tc's first round.
pub(super) fn offload_only(o: &BenchOpts, r: &mut Report) -> Result<()> {
    let b = Bench::up()?;
    let lab = &b.lab;
    let _pin = cpu::ThreadPin::to(lab.isolation.generator_cpu);
    let d = start_engine(lab, o, "tc", &[])?;
    offload_rate(lab, &d, BURST_FLOWS, r)?;
    r.offload_latency = super::latency::offload_latency(lab, o.quick)?;
    d.stop()
}

/// The engine on the router's ports, pinned to the router CPU.
pub(super) fn start_engine(lab: &Lab, o: &BenchOpts, mode: &str, extra: &[&str]) -> Result<Daemon> {
    let mut args = ["--iface", "rlan", "--iface", "rwan", "--mode", mode].map(String::from).to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    let cpu = lab.isolation.router_cpu;
    Daemon::launch(lab, DaemonOpts { exe: Some(o.exe.clone()), args, cpu, ..Default::default() })
}

/// p50 and p99 of a sample set (NaN when empty).
pub(super) fn p50_p99(v: &[f64]) -> (f64, f64) {
    (percentile(v, 0.5), percentile(v, 0.99))
}
