//! `nft-offload-lab bench`: offload against the paths a router would otherwise
//! use, measured in one run on the lab (DESIGN.md section 7).
//!
//! Router work is isolated on CPU 1 (threaded NAPI of the router's ports and
//! the engine pinned there), the generator and the hosts run on CPU 0. Router
//! CPU time is CPU 1's non-idle time from /proc/stat. The generator is an XDP
//! program run with BPF_PROG_RUN and BPF_F_TEST_XDP_LIVE_FRAMES on the LAN
//! host's port: it transmits 64-byte UDP frames far faster than sendmmsg.
//! Every figure is the median of several repetitions with min and max.

mod fast_path;
mod floor;
mod generator;
mod memory;
mod offload_rate;
mod paths;
pub mod plot;
mod private;
mod ratios;
mod render;
mod scaling;
mod stat;

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
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct PathResult {
    /// Router CPU ns per forwarded packet at a fixed offered load, 1 flow.
    pub router_ns_per_pkt: Option<Stat>,
    /// Same with 1000 flows.
    pub router_ns_per_pkt_1k: Option<Stat>,
    pub offered_pps: f64,
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
    pub memory: BTreeMap<String, f64>,
    pub offload: BTreeMap<String, f64>,
    pub ratios: BTreeMap<String, f64>,
    pub targets: BTreeMap<String, String>,
    pub notes: Vec<String>,
}

fn reps(o: &BenchOpts) -> usize {
    if o.quick {
        2
    } else {
        5
    }
}

pub fn run(opts: &BenchOpts) -> Result<Report> {
    crate::lab::require_root()?;
    let mut r = Report { machine: machine(), quick: opts.quick, ..Default::default() };
    eprintln!("bench: fast path alone (BPF_PROG_TEST_RUN)");
    r.fast_path = fast_path::fast_path_alone(opts)?;
    eprintln!("bench: scaling with the number of flows");
    r.scaling_ns_per_pkt = scaling::scaling(opts)?;
    eprintln!("bench: map memory per flow");
    r.memory = memory::memory(opts)?;
    eprintln!("bench: router paths in the lab");
    paths::router_paths(opts, &mut r)?;
    ratios::ratios(&mut r);
    if let Some(p) = &opts.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)?).with_context(|| format!("writing {}", p.display()))?;
    }
    std::fs::create_dir_all(&opts.plots)?;
    plot::write_all(&r, &opts.plots)?;
    Ok(r)
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
