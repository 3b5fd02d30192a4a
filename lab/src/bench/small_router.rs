//! The small-router profile (issue 18): the engine in a cgroup with 64 MiB
//! of memory (its BPF maps charged there too) and 20% of one CPU, as a
//! service manager would run it on a 128-256 MB router, its table sized as
//! the engine sizes it under that limit (`settings::capacity`). The lab offers
//! a growing number of live UDP connections (traffic over all of them, as
//! the live phase) and the phase reports, per step, how many the engine
//! offloaded, why the rest were not, the cgroup's memory and the engine's
//! CPU share; the profile's figure is the most connections held with none
//! left on the slow path for lack of table, memory or engine time.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::paths::{Bench, RUN_FRAMES};
use super::{BenchOpts, Report};
use crate::daemon::{Daemon, DaemonOpts};
use crate::lab::cgroup::Limited;
use crate::lab::cpu::task_cpu_ns;

/// The budget: systemd's MemoryMax=64M and CPUQuota=20%.
pub(super) const MEMORY: u64 = 64 << 20;
pub(super) const CPU_PERCENT: u32 = 20;

/// Steps of live connections; the phase stops at the first one not held.
const STEPS: [u32; 7] = [2_000, 8_000, 16_000, 24_000, 32_000, 48_000, 64_000];

/// Destination ports 100.. (the sink drops them), as the live phase.
const DPORT: u16 = 100;
const WARM_GAP_NS: u32 = 20_000;
/// How long a step may take to be offloaded.
const STEP_LIMIT: Duration = Duration::from_secs(60);

pub(super) fn small_router(b: &Bench, o: &BenchOpts, r: &mut Report) -> Result<()> {
    let lab = &b.lab;
    lab.load_ruleset()?;
    lab.exec(&lab.rtr, &["conntrack", "-F"])?;
    let cg = Limited::create(&format!("nft-offload-bench-{}", std::process::id()), MEMORY, CPU_PERCENT)?;
    // The table the engine sizes for itself under this limit. It cannot
    // see the limit here: `ip netns exec` mounts a fresh sysfs over /sys
    // in the engine's mount namespace, and /sys/fs/cgroup goes with it
    // (a service on a router sees its cgroup). Measured without it, the
    // engine sized its table for the host's 24 GiB and the memory cgroup
    // killed it at 24,000 connections.
    let mut facts = nft_offload::host::memory_facts();
    facts.cgroup_max = Some(MEMORY);
    let sized = nft_offload::settings::capacity::auto_max_flows(&facts);
    r.notes.push(format!("small router: the table as the engine sizes it under the limit: {sized}"));
    let mut args = ["--iface", "rlan", "--iface", "rwan", "--mode", "tc"].map(String::from).to_vec();
    args.extend(["--max-flows".to_string(), sized.flows.to_string()]);
    let d = Daemon::launch(
        lab,
        DaemonOpts {
            exe: Some(o.exe.clone()),
            args,
            cpu: lab.isolation.router_cpu,
            cgroups: cg.dirs().to_vec(),
            ..Default::default()
        },
    )?;
    let pid = d.pid() as libc::pid_t;
    let st = d.status()?;
    let capacity = st["flow_capacity"].as_u64().unwrap_or(0);
    let m = &mut r.small_router;
    m.insert("memory_max_mib".into(), (MEMORY >> 20) as f64);
    m.insert("cpu_max_percent".into(), f64::from(CPU_PERCENT));
    m.insert("flow_capacity".into(), capacity as f64);
    let mut held = 0u32;
    for n in STEPS {
        eprintln!("bench:   small router: {n} live connections (table {capacity})");
        let t0 = Instant::now();
        let cpu0 = task_cpu_ns(pid);
        let want = u64::from(n) * 99 / 100;
        let mut offloaded = 0;
        while t0.elapsed() < STEP_LIMIT {
            b.g.paced(RUN_FRAMES, n, DPORT, WARM_GAP_NS, 16)?;
            let Ok(s) = d.status() else { break };
            offloaded = s["flows_offloaded"].as_u64().unwrap_or(0);
            if offloaded >= want {
                break;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = task_cpu_ns(pid).saturating_sub(cpu0) as f64 / (secs * 1e9) * 100.0;
        let alive = d.status().is_ok();
        let (mem_now, mem_peak) = cg.memory();
        let key = |k: &str| format!("{n}_{k}");
        m.insert(key("offloaded"), offloaded as f64);
        m.insert(key("seconds"), secs);
        m.insert(key("engine_cpu_percent"), cpu);
        m.insert(key("cgroup_memory_mib"), mem_now as f64 / f64::from(1u32 << 20));
        m.insert(key("cgroup_memory_peak_mib"), mem_peak as f64 / f64::from(1u32 << 20));
        m.insert(key("memory_limit_hits"), cg.limit_hits() as f64);
        if let Ok(s) = d.status() {
            for (why, count) in crate::not_offloaded(&s) {
                r.notes.push(format!("small router, {n} connections: {count} not offloaded: {why}"));
            }
            if let Some(p99) = s["offload_latency_us"]["p99"].as_u64() {
                m.insert(key("offload_p99_us_engine_clock"), p99 as f64);
            }
        }
        if !alive {
            r.notes.push(format!("small router: the engine died at {n} connections ({})", d.log_tail(5)));
            r.small_router.insert("held_connections".into(), f64::from(held));
            drop(d);
            return Ok(());
        }
        if offloaded < want {
            break;
        }
        held = n;
    }
    r.small_router.insert("held_connections".into(), f64::from(held));
    d.stop()
}
