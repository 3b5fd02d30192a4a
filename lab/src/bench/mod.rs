//! `nft-offload-lab bench`: offload against the paths a router would otherwise
//! use, measured in one run on the lab (DESIGN.md section 7).
//!
//! Router work runs in its own threads on CPU 1 (threaded NAPI of the
//! router's ports and the engine pinned there), the generator and the hosts'
//! NAPI threads on CPU 0. Router cost is the on-CPU time of the router's
//! threads (schedstat) per forwarded packet (`cost`), so other work on the
//! machine is not counted; CPU 1's non-idle time is kept as a second,
//! CPU-wide column. Paths are measured in interleaved rounds. The generator
//! is an XDP program run with BPF_PROG_RUN and BPF_F_TEST_XDP_LIVE_FRAMES on
//! the LAN host's port. Every figure is a median with its spread; a run whose
//! figures contradict themselves is marked invalid (`validity`).

mod cost;
mod fast_path;
mod floor;
mod generator;
mod latency;
mod live;
mod memory;
mod offload_rate;
mod packet_gen;
mod paths;
pub mod plot;
mod private;
mod ratios;
mod render;
mod scaling;
mod small_router;
mod stat;
mod tcp;
mod validity;

pub use latency::OffloadLatency;
pub use live::LiveRow;
pub use stat::Stat;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags};
use serde::Serialize;

#[allow(clippy::all, dead_code, non_camel_case_types, non_snake_case, unused_imports)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/bench.skel.rs"));
}

#[derive(Debug, Clone)]
pub struct BenchOpts {
    pub quick: bool,
    pub json: Option<PathBuf>,
    /// The router binary.
    pub exe: PathBuf,
    /// Where SVG plots go.
    pub plots: PathBuf,
    /// Only the live-connections part.
    pub live_only: bool,
    /// Development (`bench --paths`): measure only these router paths, in
    /// interleaved rounds, and nothing else (empty: the whole benchmark).
    pub only_paths: Vec<String>,
    /// Only the offload rate and offload latency phases (offload_tc), for
    /// work on the control plane.
    pub offload_only: bool,
    /// Only the memory figures (maps by table size, daemon RSS).
    pub memory_only: bool,
    /// Only the small-router profile.
    pub small_router_only: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct PathResult {
    /// Router cost: on-CPU ns of the router's NAPI kthreads and the engine's
    /// threads per forwarded packet, at a fixed offered load, 64 flows.
    pub router_ns_per_pkt: Option<Stat>,
    /// The same per round, in round order (each round measures the paths
    /// one after the other, seconds apart, so per-round ratios drift less
    /// than ratios of medians).
    pub router_ns_rounds: Vec<f64>,
    /// Its two parts.
    pub napi_ns_per_pkt: Option<Stat>,
    pub engine_ns_per_pkt: Option<Stat>,
    /// The sink's NAPI kthread on the other CPU (not router cost).
    pub sink_ns_per_pkt: Option<Stat>,
    /// CPU-wide: router CPU non-idle ns per forwarded packet, everything
    /// that ran on that CPU included.
    pub cpu_wide_ns_per_pkt: Option<Stat>,
    pub offered_pps: f64,
    /// Packets dropped at the veth ends (rings full) per forwarded packet.
    pub ring_drops_per_fwd: Option<Stat>,
    /// Offload paths: the engine's fast-path packet count over the packets
    /// forwarded in the same measurement (1 when every packet was
    /// fast-pathed; below `validity::MIN_FAST_SHARE` the path measured the
    /// kernel and the run is invalid).
    pub fast_path_share: Option<Stat>,
    /// Forwarded packets/s during the router-cost measurement.
    pub forwarded_pps: Option<Stat>,
    /// Forwarded packets/s with the generator at full speed.
    pub max_pps: Option<Stat>,
    pub tcp_1stream_1500_mbps: Option<Stat>,
    pub tcp_1stream_gso_mbps: Option<Stat>,
    pub tcp_4stream_gso_mbps: Option<Stat>,
    pub ping_idle_ms: Option<Stat>,
    pub ping_loaded_p50_ms: Option<f64>,
    pub ping_loaded_p99_ms: Option<f64>,
    #[serde(skip)]
    pub ping_loaded_samples: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct FastPathAlone {
    /// ns per packet by BPF_PROG_TEST_RUN, keyed "xdp ipv4 nat hit" etc.
    pub ns_per_pkt: BTreeMap<String, Stat>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub machine: String,
    pub quick: bool,
    pub paths: BTreeMap<String, PathResult>,
    pub fast_path: FastPathAlone,
    /// flows -> ns per packet (TC entry, one packet per run, keys at random
    /// among the installed flows). Entries installed directly in the map.
    pub scaling_ns_per_pkt: BTreeMap<u64, Stat>,
    /// live connections -> router cost with traffic over all of them.
    pub live_scaling: BTreeMap<u64, LiveRow>,
    /// Eligible-to-fast-path latency from packet timestamps.
    pub offload_latency: OffloadLatency,
    pub memory: BTreeMap<String, f64>,
    /// The small-router profile (`small_router`): the engine under a 64 MiB
    /// memory limit and 20% of a CPU.
    pub small_router: BTreeMap<String, f64>,
    pub offload: BTreeMap<String, f64>,
    pub ratios: BTreeMap<String, f64>,
    pub targets: BTreeMap<String, String>,
    pub notes: Vec<String>,
    /// Why the run is invalid (empty: valid).
    pub invalid: Vec<String>,
}

impl Report {
    pub fn valid(&self) -> bool {
        self.invalid.is_empty()
    }
}

pub fn run(opts: &BenchOpts) -> Result<Report> {
    crate::lab::require_root()?;
    let mut r = Report { machine: machine(), quick: opts.quick, ..Default::default() };
    // One part alone: its figures, the ratios they allow, the JSON.
    type Part = fn(&BenchOpts, &mut Report) -> Result<()>;
    let alone: Option<(&str, Part)> = if opts.live_only {
        Some(("the live-connections part", |o, r| paths::part_alone(o, r, live::live_scaling)))
    } else if opts.small_router_only {
        Some(("the small-router profile", |o, r| paths::part_alone(o, r, small_router::small_router)))
    } else if opts.memory_only {
        Some(("memory (maps by table size, daemon with live connections)", paths::memory_only))
    } else {
        None
    };
    if let Some((what, part)) = alone {
        eprintln!("bench: {what} only");
        part(opts, &mut r)?;
        ratios::ratios(&mut r);
        write_json(opts, &r)?;
        return Ok(r);
    }
    if let Some(bad) = opts.only_paths.iter().find(|p| !paths::PATHS.contains(&p.as_str())) {
        anyhow::bail!("unknown router path {bad:?} (known: {})", paths::PATHS.join(", "));
    }
    if opts.offload_only {
        eprintln!("bench: offload rate and latency only (offload_tc)");
        paths::offload_only(opts, &mut r)?;
        ratios::ratios(&mut r);
        return Ok(r);
    }
    if opts.only_paths.is_empty() {
        eprintln!("bench: fast path alone (BPF_PROG_TEST_RUN)");
        r.fast_path = fast_path::fast_path_alone(opts)?;
        eprintln!("bench: scaling with the number of flows");
        r.scaling_ns_per_pkt = scaling::scaling(opts)?;
        eprintln!("bench: map memory per connection");
        r.memory = memory::memory(opts)?;
    }
    eprintln!("bench: router paths in the lab");
    match paths::router_paths(opts, &mut r) {
        Err(e) if generator::refused(&e) => {
            // Say so and measure what needs no generator: the offload
            // rate and latency send from sockets.
            eprintln!("bench: {e:#}; offload rate and latency only");
            r.invalid.push(format!("{e:#}: no router-path, live-connection or daemon-memory figures on this machine"));
            r.paths.clear();
            paths::offload_only(opts, &mut r)?;
        }
        other => other?,
    }
    ratios::ratios(&mut r);
    validity::check(&mut r);
    write_json(opts, &r)?;
    std::fs::create_dir_all(&opts.plots)?;
    plot::write_all(&r, &opts.plots)?;
    Ok(r)
}

fn write_json(opts: &BenchOpts, r: &Report) -> Result<()> {
    if let Some(p) = &opts.json {
        std::fs::write(p, serde_json::to_string_pretty(r)?).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{n} x {cpu}, kernel {}", kernel.trim())
}

/// Write the programs' configuration (map `bench_cfg`, one entry).
fn set_cfg(map: &impl MapCore, cfg: &skel::types::bench_cfg) -> Result<()> {
    // SAFETY: plain data struct, viewed as its bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts((cfg as *const skel::types::bench_cfg).cast::<u8>(), std::mem::size_of_val(cfg))
    };
    map.update(&0u32.to_ne_bytes(), bytes, MapFlags::ANY)?;
    Ok(())
}
