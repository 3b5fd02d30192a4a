//! CPU placement for measurements: pinning processes and NAPI kthreads, and
//! reading per-CPU busy time from /proc/stat.

use std::collections::HashSet;
use std::mem;
use std::os::unix::process::CommandExt;
use std::process::Command;

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
                set_affinity(pid, cpu)
                    .with_context(|| format!("sched_setaffinity({pid} {comm}, cpu {cpu})"))?;
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

/// Busy jiffies (user+nice+system+irq+softirq+steal; idle and iowait left
/// out) of one CPU, or of the whole machine for `None`.
pub(crate) fn busy_jiffies(cpu: Option<usize>) -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    busy_jiffies_from(&stat, cpu)
}

pub(crate) fn busy_jiffies_from(stat: &str, cpu: Option<usize>) -> Result<u64> {
    let want = match cpu {
        Some(c) => format!("cpu{c}"),
        None => "cpu".to_string(),
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
        return Ok(f[0] + f[1] + f[2] + f[5] + f[6] + f[7]);
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
        let s = "cpu  10 1 5 100 7 2 3 4 0 0\ncpu0 1 0 1 50 1 0 0 0 0 0\ncpu1 9 1 4 50 6 2 3 4 0 0\n";
        assert_eq!(busy_jiffies_from(s, None).unwrap(), 10 + 1 + 5 + 2 + 3 + 4);
        assert_eq!(busy_jiffies_from(s, Some(1)).unwrap(), 9 + 1 + 4 + 2 + 3 + 4);
        assert_eq!(busy_jiffies_from(s, Some(0)).unwrap(), 2);
        assert!(busy_jiffies_from(s, Some(2)).is_err());
    }
}
