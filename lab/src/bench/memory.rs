//! Memory per offloaded connection: the kernel memory of the fast path's
//! maps with the connections installed (both directions), and the daemon's
//! resident memory with live connections it offloaded itself.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nft_offload::dataplane::fo_flow_key;

use super::paths::{start_engine, Bench, RUN_FRAMES};
use super::private::{in_thread, install};
use super::{BenchOpts, Report};
use crate::private_router::PrivateRouter;

/// Dormant connections watched for the per-dormant-connection figure.
const DORMANT: u32 = 4096;

/// Their first destination port (the sink drops 100-109).
const DPORT: u16 = 100;
/// Gap between the frames that create them (as in the live scaling phase:
/// the kernel path must not drop the packets that create the entries).
const WARM_GAP_NS: u32 = 20_000;

/// Kernel memory of every fast-path map (memlock in fdinfo), in a fast path
/// sized for `n` connections: as loaded (before one packet), and with `n`
/// installed, whose per-connection figure counts both directions and the
/// buckets. Then the extra cost of a dormant connection (its two egress
/// keys in fo_dormant).
pub(super) fn memory(o: &BenchOpts) -> Result<BTreeMap<String, f64>> {
    let mut m = BTreeMap::new();
    let sizes: Vec<u32> = if o.quick { vec![65536] } else { vec![1024, 16_384, 65536, 262_144, 1_048_576] };
    for n in sizes {
        let (start, maps, with_dormant, entries) = in_thread(move || {
            let PrivateRouter { dp, lan, wan } = PrivateRouter::enter(n)?;
            let start: u64 = dp.map_memory().iter().map(|(_, b)| b).sum();
            // n - 1 IPv4 connections and one IPv6 direction: 2n - 1 entries.
            install(&dp, lan, wan, n - 1)?;
            let entries = dp.flow_keys().len();
            let maps = dp.map_memory();
            for i in 0..DORMANT * 2 {
                let mut k = fo_flow_key { family: 2, proto: 17, sport: (i as u16).to_be(), ..Default::default() };
                k.saddr[0] = 0x0a00_0000 | (i >> 16);
                dp.watch_dormant(&k)?;
            }
            let with_dormant: u64 = dp.map_memory().iter().map(|(_, b)| b).sum();
            Ok((start, maps, with_dormant, entries))
        })?;
        let label = size_label(n);
        m.insert(format!("map_bytes_start_{label}"), start as f64);
        let conns = entries as f64 / 2.0;
        let total: u64 = maps.iter().map(|(_, b)| b).sum();
        m.insert(format!("map_bytes_per_conn_{label}"), total as f64 / conns);
        m.insert(format!("map_bytes_total_{label}"), total as f64);
        for (name, bytes) in &maps {
            m.insert(format!("map_bytes_per_conn_{label}_{name}"), *bytes as f64 / conns);
        }
        m.insert(
            format!("map_bytes_per_dormant_conn_{label}"),
            with_dormant.saturating_sub(total) as f64 / f64::from(DORMANT),
        );
    }
    Ok(m)
}

/// 1024 -> "1k", 1048576 -> "1m".
fn size_label(n: u32) -> String {
    if n >= 1 << 20 {
        format!("{}m", n >> 20)
    } else {
        format!("{}k", n >> 10)
    }
}

/// The daemon's resident set (VmRSS), bytes.
fn rss(pid: u32) -> Result<u64> {
    status_kb(pid, "VmRSS:")
}

/// A `kB` line of /proc/<pid>/status (VmRSS, VmHWM), in bytes.
fn status_kb(pid: u32, key: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}"))?;
    let kb = s
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no {key} in /proc/<pid>/status"))?;
    Ok(kb * 1024)
}

/// The daemon's resident memory with 64k live UDP connections through the
/// lab (8k with `--quick`) that it offloaded itself (real conntrack
/// entries, real events), against the same daemon before any: measured,
/// not extrapolated.
pub(super) fn daemon_rss(b: &Bench, o: &BenchOpts, r: &mut Report) -> Result<()> {
    let (live, label): (u32, &str) = if o.quick { (8192, "8k") } else { (65_536, "64k") };
    let lab = &b.lab;
    lab.load_ruleset()?;
    lab.exec(&lab.rtr, &["conntrack", "-F"])?;
    let cap = (live + live / 5 + 1024).to_string();
    let d = start_engine(lab, o, "tc", &["--max-flows", &cap])?;
    let before = rss(d.pid())?;
    let want = u64::from(live) * 99 / 100;
    let (t0, mut offloaded) = (Instant::now(), 0);
    while t0.elapsed() < Duration::from_secs(180) && offloaded < want {
        b.g.paced(RUN_FRAMES, live, DPORT, WARM_GAP_NS, 16)?;
        offloaded = d.status()?["flows_offloaded"].as_u64().unwrap_or(0);
    }
    if offloaded < want {
        r.notes.push(format!("daemon memory: only {offloaded} of {live} connections offloaded in 180 s"));
    }
    // Settled: the burst's transient state (each new UDP connection is
    // watched until its second packet) is gone and the engine's tables
    // have been compacted (FlowTable::compact, every tick); VmHWM keeps
    // the burst's peak.
    std::thread::sleep(Duration::from_secs(2));
    let after = rss(d.pid())?;
    let peak = status_kb(d.pid(), "VmHWM:")?;
    d.stop()?;
    let m = &mut r.memory;
    m.insert("daemon_rss_mb_start".into(), before as f64 / 1e6);
    m.insert(format!("daemon_rss_mb_{label}"), after as f64 / 1e6);
    m.insert(format!("daemon_peak_rss_mb_{label}"), peak as f64 / 1e6);
    m.insert(format!("daemon_live_conns_{label}"), offloaded as f64);
    m.insert("daemon_rss_bytes_per_conn".into(), after.saturating_sub(before) as f64 / offloaded.max(1) as f64);
    Ok(())
}
