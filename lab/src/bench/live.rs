//! Scaling with live connections: real conntrack entries through the lab's
//! router, offloaded by the engine (offload_tc), and traffic spread over all
//! of them while the router's cost is measured as in the path rounds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::cost::Cost;
use super::paths::{measure, start_engine, Bench, PPS, RUN_FRAMES};
use super::{BenchOpts, Report, Stat};
use crate::daemon::Daemon;
use crate::lab::cpu::{task_cpu_ns, ThreadPin};
use crate::lab::Lab;

/// First destination port of the scaling flows (the sink drops 100-109).
const DPORT: u16 = 100;
/// While creating connections: the gap between frames (a new conntrack
/// entry costs the kernel path more than a forwarded packet: 50k new flows
/// per second, in groups of 16, so the router's ring does not overflow and
/// drop the first packets, which create the entries).
const WARM_GAP_NS: u32 = 20_000;

/// One size of the live-connection scaling figure.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LiveRow {
    /// Connections the engine had offloaded when measuring.
    pub offloaded: u64,
    /// Conntrack entries in the router's namespace.
    pub conntrack: u64,
    /// Router cost (NAPI kthreads + engine threads), ns per forwarded packet.
    pub router_ns_per_pkt: Stat,
    pub napi_ns_per_pkt: Stat,
    pub engine_ns_per_pkt: Stat,
    /// CPU-wide, labelled as such.
    pub cpu_wide_ns_per_pkt: Stat,
    /// Forwarded packets/s while measuring.
    pub forwarded_pps: Stat,
    /// Share of forwarded packets the kernel's forward hook saw (slow path).
    pub slow_share: f64,
    /// Seconds from the first packet to the engine reporting the connections
    /// offloaded.
    pub setup_s: f64,
    /// Full conntrack dumps the engine took after lost events, and the
    /// conntrack events it read, during this size's set-up and measurement.
    pub resyncs: u64,
    pub events: u64,
    /// With no traffic afterwards: the engine's on-CPU time (every thread,
    /// /proc/<pid>/task/*/schedstat) as a percentage of one core over
    /// [`IDLE_SECS`], and the connections offloaded when that began and
    /// when it ended.
    pub idle_engine_cpu_pct: f64,
    pub idle_offloaded: (u64, u64),
    /// The engine's own account at the end: teardowns and connections not
    /// offloaded, by reason.
    pub teardowns: serde_json::Value,
    pub not_offloaded: serde_json::Value,
    /// The fast path's slow-path packets by reason (non-zero ones), over the
    /// engine's life so far.
    pub slow_reasons: serde_json::Value,
}

/// How long the engine is watched with its connections idle.
const IDLE_SECS: f64 = 10.0;

/// The engine's share of one core while nothing is sent: its connections
/// stay offloaded (they go idle only after the engine's idle timeout, 30 s
/// by default) and the engine only follows their keepalive schedule.
/// Returns (percent of one core, offloaded before, offloaded after).
fn idle_engine_cpu(d: &Daemon, secs: f64) -> Result<(f64, u64, u64)> {
    let offloaded = || -> Result<u64> { Ok(d.status()?["flows_offloaded"].as_u64().unwrap_or(0)) };
    // The status call itself is engine work: asked outside the window.
    let before = offloaded()?;
    std::thread::sleep(Duration::from_millis(500));
    let pid = d.pid() as libc::pid_t;
    let (c0, t0) = (task_cpu_ns(pid), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (c1, wall) = (task_cpu_ns(pid), t0.elapsed());
    Ok((c1.saturating_sub(c0) as f64 / wall.as_nanos() as f64 * 100.0, before, offloaded()?))
}

fn conntrack_count(lab: &Lab) -> Result<u64> {
    Ok(lab.exec(&lab.rtr, &["conntrack", "-C"])?.trim().parse()?)
}

pub(super) fn live_scaling(b: &Bench, o: &BenchOpts, r: &mut Report) -> Result<()> {
    let lab = &b.lab;
    let sizes: Vec<u32> = if o.quick { vec![1, 2000] } else { vec![1, 1000, 100_000, 250_000] };
    let (rounds, secs) = if o.quick { (2, 0.6) } else { (3, 3.0) };
    let max = sizes.iter().max().copied().unwrap_or(1);
    lab.load_ruleset()?;
    // Only this phase's connections: the earlier phases' UDP entries would
    // otherwise be offloaded too (the engine starts with a conntrack dump)
    // and count against the conntrack limit (262,144 here).
    lab.exec(&lab.rtr, &["conntrack", "-F"])?;
    let cap = (max + max / 5 + 1024).to_string();
    let d = start_engine(lab, o, "tc", &["--max-flows", &cap])?;
    let pid = Some(d.pid());
    for n in sizes {
        eprintln!("bench:   {n} live connections");
        let t0 = Instant::now();
        let want = u64::from(n) * 99 / 100;
        // The generator cycles through all n flows until the engine reports
        // them offloaded, or a minute. The engine is asked from another
        // thread: a busy engine answers late, and the generator must not
        // wait for it (its connections would go idle meanwhile).
        let st0 = d.status()?;
        let count = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or(0);
        let done = AtomicBool::new(false);
        let offloaded = std::thread::scope(|sc| -> Result<u64> {
            let watcher = sc.spawn(|| -> Result<u64> {
                let _pin = ThreadPin::to(lab.isolation.generator_cpu);
                let mut offloaded = 0;
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(500));
                    let s = d.status()?;
                    offloaded = count(&s, "flows_offloaded");
                    eprintln!(
                        "bench:     {:.1} s: {offloaded} offloaded, {} in conntrack, {} resyncs, {} events",
                        t0.elapsed().as_secs_f64(),
                        conntrack_count(lab)?,
                        count(&s, "conntrack_resyncs") - count(&st0, "conntrack_resyncs"),
                        count(&s, "conntrack_events") - count(&st0, "conntrack_events"),
                    );
                    if offloaded >= want {
                        done.store(true, Ordering::Relaxed);
                    }
                }
                Ok(offloaded)
            });
            let sent = (|| -> Result<()> {
                while !done.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                    b.g.paced(RUN_FRAMES, n, DPORT, WARM_GAP_NS, 16)?;
                }
                Ok(())
            })();
            done.store(true, Ordering::Relaxed);
            let offloaded = watcher.join().map_err(|_| anyhow::anyhow!("the engine watcher panicked"))?;
            sent?;
            offloaded
        })?;
        let setup_s = t0.elapsed().as_secs_f64();
        if offloaded < want {
            r.notes.push(format!("live scaling: only {offloaded} of {n} connections offloaded after {setup_s:.0} s"));
        }
        let fwd0 = lab.counter_packets("fwd_all")?;
        let mut costs: Vec<Cost> = Vec::new();
        let mut pps = Vec::new();
        for _ in 0..rounds {
            let (c, p) = measure(lab, &b.g, pid, (n, DPORT, PPS), secs)?;
            costs.push(c);
            pps.push(p);
        }
        let forwarded: f64 = pps.iter().map(|p| p * secs).sum();
        let slow = lab.counter_packets("fwd_all")?.saturating_sub(fwd0) as f64;
        let st = |f: fn(&Cost) -> f64| Stat::of(costs.iter().map(f).collect());
        let conntrack = conntrack_count(lab)?;
        let idle_secs = if o.quick { 2.0 } else { IDLE_SECS };
        let (idle_pct, idle0, idle1) = idle_engine_cpu(&d, idle_secs)?;
        let st1 = d.status()?;
        let row = LiveRow {
            // Right after the measurement.
            offloaded: idle0,
            conntrack,
            idle_engine_cpu_pct: idle_pct,
            idle_offloaded: (idle0, idle1),
            teardowns: st1["teardowns"].clone(),
            not_offloaded: st1["not_offloaded"].clone(),
            slow_reasons: st1["slow_path"]
                .as_object()
                .map(|m| m.iter().filter(|(_, v)| v.as_u64() != Some(0)).map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            resyncs: count(&st1, "conntrack_resyncs") - count(&st0, "conntrack_resyncs"),
            events: count(&st1, "conntrack_events") - count(&st0, "conntrack_events"),
            router_ns_per_pkt: st(|c| c.router),
            napi_ns_per_pkt: st(|c| c.napi),
            engine_ns_per_pkt: st(|c| c.engine),
            cpu_wide_ns_per_pkt: st(|c| c.cpu_wide),
            forwarded_pps: Stat::of(pps),
            slow_share: slow / forwarded.max(1.0),
            setup_s,
        };
        r.live_scaling.insert(u64::from(n), row);
    }
    d.stop()?;
    Ok(())
}
