//! CPU placement for measurements: pinning processes and NAPI kthreads, and
//! reading per-CPU busy time from /proc/stat.

use std::collections::HashSet;
use std::mem;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

fn cpu_set_of(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bitmask; CPU_SET only writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

/// Pin task `tid` (0 = calling thread) to a single CPU.
pub(crate) fn set_affinity(tid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    let set = cpu_set_of(cpu);
    // SAFETY: valid set and size.
    let rc = unsafe { libc::sched_setaffinity(tid, mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Current affinity mask of the calling thread.
pub(crate) fn get_affinity() -> std::io::Result<libc::cpu_set_t> {
    // SAFETY: zeroed set is valid; the kernel fills it.
    unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        if libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(set)
    }
}

pub(crate) fn restore_affinity(set: &libc::cpu_set_t) {
    // SAFETY: valid set and size. Best effort: nothing sensible to do on error.
    unsafe {
        libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), set);
    }
}

/// Pins the calling thread (and so every helper command it starts) to one
/// CPU, e.g. the generator CPU; restores the old mask when dropped.
pub(crate) struct ThreadPin(Option<libc::cpu_set_t>);

impl ThreadPin {
    pub(crate) fn to(cpu: Option<usize>) -> ThreadPin {
        let Some(cpu) = cpu else { return ThreadPin(None) };
        match get_affinity() {
            Ok(old) if set_affinity(0, cpu).is_ok() => ThreadPin(Some(old)),
            _ => ThreadPin(None),
        }
    }
}

impl Drop for ThreadPin {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            restore_affinity(old);
        }
    }
}

/// CPUs this process may run on (respects cpusets/affinity, not just nproc).
pub(crate) fn usable_cpus() -> Vec<usize> {
    match get_affinity() {
        Ok(set) => (0..libc::CPU_SETSIZE as usize)
            // SAFETY: index is within the set.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect(),
        Err(_) => vec![0],
    }
}

/// Make the spawned process start pinned to `cpu`. Done in the child between
/// fork and exec (no `taskset` needed); the affinity survives the exec of
/// `ip netns exec` and then of the real program.
pub(crate) fn pin_command(cmd: &mut Command, cpu: usize) {
    let set = cpu_set_of(cpu);
    // SAFETY: sched_setaffinity is a single async-signal-safe syscall and the
    // closure only touches the copied set.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// All NAPI kthreads (`napi/<dev>-<napi id>`) as (pid, comm).
pub(crate) fn napi_threads() -> Vec<(libc::pid_t, String)> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) {
            let comm = comm.trim_end();
            if comm.starts_with("napi/") {
                v.push((pid, comm.to_string()));
            }
        }
    }
    v
}

/// Pin the NAPI threads of the given devices that are not in `foreign`
/// (threads that existed before the lab was built belong to other labs or
/// the host, which also use names like `napi/rlan-*`). Returns the pinned
/// (pid, comm, cpu) triples.
pub(crate) fn pin_napi(
    foreign: &HashSet<libc::pid_t>,
    placement: &[(&str, usize)],
) -> Result<Vec<(libc::pid_t, String, usize)>> {
    let mut done = Vec::new();
    for (pid, comm) in napi_threads() {
        if foreign.contains(&pid) {
            continue;
        }
        for &(dev, cpu) in placement {
            if comm.starts_with(&format!("napi/{dev}-")) {
                set_affinity(pid, cpu).with_context(|| format!("sched_setaffinity({pid} {comm}, cpu {cpu})"))?;
                done.push((pid, comm.clone(), cpu));
            }
        }
    }
    Ok(done)
}

/// Nanoseconds on CPU of all threads of `pid` (from schedstat; 0 if the
/// process is gone).
pub(crate) fn task_cpu_ns(pid: libc::pid_t) -> u64 {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|x| x.parse::<u64>().ok()))
        .sum()
}

/// One /proc/stat reading of a CPU (or of all CPUs for `None`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSample {
    at: Instant,
    /// user+nice+system+irq+softirq+steal, in USER_HZ ticks.
    busy: u64,
    /// idle+iowait, in USER_HZ ticks.
    idle: u64,
    /// CPUs the line covers.
    ncpu: u64,
}

/// Busy time between two samples, in ns, computed two ways:
/// `(precise, tick_sampled)`.
///
/// `tick_sampled` is the textbook sum of the busy fields. On kernels with
/// tick-based accounting (CONFIG_TICK_CPU_ACCOUNTING, the common default)
/// those fields are sampled at each scheduler tick, and a NO_HZ CPU whose
/// work comes in bursts shorter than a tick (e.g. a NAPI thread woken per
/// few packets) is badly under-counted: we saw 20 ms reported for ~460 ms
/// of real work. Idle time, however, is measured exactly on NO_HZ kernels
/// (timestamps at idle entry/exit), so `precise` = wall time x CPUs - idle.
pub(crate) fn busy_ns(a: &CpuSample, b: &CpuSample) -> (u64, u64) {
    let tck = clk_tck();
    let wall = b.at.duration_since(a.at).as_nanos() as u64 * a.ncpu;
    let idle = b.idle.saturating_sub(a.idle) * 1_000_000_000 / tck;
    let ticks = b.busy.saturating_sub(a.busy) * 1_000_000_000 / tck;
    (wall.saturating_sub(idle), ticks)
}

pub(crate) fn sample(cpu: Option<usize>) -> Result<CpuSample> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let at = Instant::now();
    let (busy, idle, ncpu) = parse_stat(&stat, cpu)?;
    Ok(CpuSample { at, busy, idle, ncpu })
}

/// (busy, idle+iowait, number of CPUs covered) from a /proc/stat dump.
pub(crate) fn parse_stat(stat: &str, cpu: Option<usize>) -> Result<(u64, u64, u64)> {
    let want = match cpu {
        Some(c) => format!("cpu{c}"),
        None => "cpu".to_string(),
    };
    let ncpu = match cpu {
        Some(_) => 1,
        None => stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count()
            .max(1) as u64,
    };
    for line in stat.lines() {
        let mut it = line.split_whitespace();
        if it.next() != Some(want.as_str()) {
            continue;
        }
        let f: Vec<u64> = it.map(|x| x.parse().unwrap_or(0)).collect();
        if f.len() < 8 {
            bail!("short /proc/stat line: {line}");
        }
        // user nice system idle iowait irq softirq steal [guest guest_nice];
        // guest time is already included in user.
        return Ok((f[0] + f[1] + f[2] + f[5] + f[6] + f[7], f[3] + f[4], ncpu));
    }
    bail!("no `{want}` line in /proc/stat")
}

pub(crate) fn clk_tck() -> u64 {
    // SAFETY: plain libc query.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let s = "cpu  10 1 5 100 7 2 3 4 0 0\ncpu0 1 0 1 50 1 0 0 0 0 0\ncpu1 9 1 4 50 6 2 3 4 0 0\nintr 5\n";
        assert_eq!(parse_stat(s, None).unwrap(), (10 + 1 + 5 + 2 + 3 + 4, 107, 2));
        assert_eq!(parse_stat(s, Some(1)).unwrap(), (9 + 1 + 4 + 2 + 3 + 4, 56, 1));
        assert_eq!(parse_stat(s, Some(0)).unwrap(), (2, 51, 1));
        assert!(parse_stat(s, Some(2)).is_err());
    }

    #[test]
    fn busy_from_idle() {
        let tck = clk_tck();
        let t = Instant::now();
        let a = CpuSample { at: t, busy: 0, idle: 0, ncpu: 2 };
        // 1 s on 2 CPUs with 0.5 s idle in total: 1.5 s busy.
        let b = CpuSample { at: t + std::time::Duration::from_secs(1), busy: tck, idle: tck / 2, ncpu: 2 };
        assert_eq!(busy_ns(&a, &b), (1_500_000_000, 1_000_000_000));
    }
}
