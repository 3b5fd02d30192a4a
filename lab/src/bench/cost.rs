//! Router cost: on-CPU time of the threads that do the router's work, per
//! forwarded packet.
//!
//! The lab makes the router's veth ports threaded NAPI (GRO on, so veth has
//! a NAPI instance: drivers/net/veth.c veth_napi_add; `threaded` = 1 turns
//! its poll loop into a `napi/<dev>-<id>` kthread, net/core/dev.c
//! napi_threaded_poll), and so do the hosts' ports: the sink's receive runs
//! in its own kthread on the other CPU instead of in the router's (veth_xmit
//! queues to the peer's ring and schedules the peer's NAPI). Router cost is
//! then the first field of /proc/<tid>/schedstat (ns on CPU,
//! sched_info/se.sum_exec_runtime) of the router's NAPI kthreads plus every
//! thread of the engine, so whatever else runs on that CPU is not counted.
//! The CPU-wide figure (CPU non-idle time from /proc/stat) is kept beside it,
//! labelled as such, because it shows what the thread figure cannot: work
//! the router causes outside its threads.

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::lab::{cpu, Lab, LAN_IF, RTR_LAN_IF, RTR_WAN_IF, WAN_IF};

/// ns on CPU of one task, from /proc/<tid>/schedstat.
fn schedstat_ns(tid: i32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/schedstat"))
        .with_context(|| format!("reading /proc/{tid}/schedstat"))?;
    s.split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .with_context(|| format!("unexpected /proc/{tid}/schedstat: {s:?}"))
}

/// Real-time priority of the lab's NAPI kthreads while measuring. On a
/// router NAPI runs in softirq, ahead of every process; as plain kthreads
/// they would wait behind whatever else runs on their CPU (other builds on
/// a shared machine), the veth rings would overflow meanwhile and the batch
/// per poll, hence the cost per packet, would follow the machine's load.
const NAPI_FIFO_PRIO: i32 = 50;

fn set_fifo(tid: i32) -> Result<()> {
    let p = libc::sched_param { sched_priority: NAPI_FIFO_PRIO };
    // SAFETY: plain syscall with a valid parameter.
    if unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &p) } != 0 {
        bail!("sched_setscheduler({tid}, SCHED_FIFO): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The threads whose time is counted, found anew for each measurement
/// (attaching XDP may recreate a veth's NAPI instance and so its kthread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Threads {
    router_napi: Vec<i32>,
    sink_napi: Vec<i32>,
    engine: Option<i32>,
    router_cpu: usize,
}

/// One reading of the counted threads and of the router CPU.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    router_napi: u64,
    engine: u64,
    sink: u64,
    cpu: cpu::CpuSample,
}

/// What one measurement cost, in ns per forwarded packet.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Cost {
    /// Router NAPI kthreads + engine threads: the router cost.
    pub router: f64,
    pub napi: f64,
    pub engine: f64,
    /// The sink's NAPI kthread (on the other CPU; must not be zero, or the
    /// sink's receive ran inside the router's thread).
    pub sink: f64,
    /// CPU-wide: the router CPU's non-idle time, everything on it counted.
    pub cpu_wide: f64,
    /// Packets the veth ends dropped (rings full), per forwarded packet:
    /// the paths should all be near 0, or they forward different packets.
    pub ring_drops: f64,
    /// Packets forwarded during the measurement (the WAN host's receive).
    pub forwarded: u64,
}

impl Threads {
    /// Re-pins the lab's NAPI kthreads (router ones to the router CPU, the
    /// hosts' to the other), gives them softirq-like priority and lists
    /// them, with the engine's pid if any.
    pub(super) fn of(lab: &Lab, engine: Option<u32>) -> Result<Threads> {
        let Some(router_cpu) = lab.isolation.router_cpu.filter(|_| lab.isolation.enabled) else {
            bail!("router cost needs the lab's CPU isolation (threaded NAPI pinned per CPU): {}", lab.isolation.note);
        };
        let pinned = lab.pin_napi_threads()?;
        let of = |devs: &[&str]| -> Vec<i32> {
            let mut v: Vec<i32> = pinned
                .iter()
                .filter(|(_, c, _)| devs.iter().any(|d| c.starts_with(&format!("napi/{d}-"))))
                .map(|(p, _, _)| *p)
                .collect();
            v.sort_unstable();
            v
        };
        let t = Threads {
            router_napi: of(&[RTR_LAN_IF, RTR_WAN_IF]),
            sink_napi: of(&[WAN_IF, LAN_IF]),
            engine: engine.map(|p| p as i32),
            router_cpu,
        };
        if t.router_napi.is_empty() || t.sink_napi.is_empty() {
            bail!("no NAPI kthreads for the router's or the hosts' ports (pinned: {pinned:?})");
        }
        for &tid in t.router_napi.iter().chain(&t.sink_napi) {
            set_fifo(tid)?;
        }
        Ok(t)
    }

    pub(super) fn sample(&self) -> Result<Sample> {
        let sum = |v: &[i32]| -> Result<u64> { v.iter().map(|&t| schedstat_ns(t)).sum() };
        Ok(Sample {
            router_napi: sum(&self.router_napi)?,
            engine: self.engine.map_or(0, cpu::task_cpu_ns),
            sink: sum(&self.sink_napi)?,
            cpu: cpu::sample(Some(self.router_cpu))?,
        })
    }
}

impl Cost {
    pub(super) fn between(a: &Sample, b: &Sample, forwarded: u64, drops: u64) -> Cost {
        let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / forwarded.max(1) as f64;
        let napi = per(a.router_napi, b.router_napi);
        let engine = per(a.engine, b.engine);
        Cost {
            router: napi + engine,
            napi,
            engine,
            sink: per(a.sink, b.sink),
            cpu_wide: cpu::busy_ns(&a.cpu, &b.cpu).0 as f64 / forwarded.max(1) as f64,
            ring_drops: drops as f64 / forwarded.max(1) as f64,
            forwarded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_schedstat() {
        // SAFETY: plain getter.
        let tid = unsafe { libc::gettid() };
        let cpu_ns = || {
            let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: valid clock id and out pointer.
            assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) }, 0);
            t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
        };
        let a = schedstat_ns(tid).unwrap();
        // 20 ms on this thread's CPU clock, however long that takes on a
        // busy machine: schedstat must show about as much.
        let c0 = cpu_ns();
        while cpu_ns() < c0 + 20_000_000 {
            std::hint::black_box(0u64);
        }
        let b = schedstat_ns(tid).unwrap();
        assert!(b >= a + 10_000_000, "20 ms of this thread's CPU time showed as {} ns", b - a);
        assert!(schedstat_ns(i32::MAX).is_err());
    }
}
