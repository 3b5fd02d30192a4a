//! A cgroup with a memory limit and a CPU quota for the engine, as a
//! router's service manager would give it (systemd's MemoryMax= and
//! CPUQuota=): the unified hierarchy (v2) where it has the memory and cpu
//! controllers, else v1's memory and cpu hierarchies (this project's
//! machines mount v1 for both). Removed on drop.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const ROOT: &str = "/sys/fs/cgroup";

/// A private cgroup (one directory per hierarchy used).
pub struct Limited {
    dirs: Vec<PathBuf>,
    /// Where the memory figures are read.
    memory: PathBuf,
    v2: bool,
}

impl Limited {
    /// `name` under the root of each hierarchy, limited to `memory` bytes
    /// and `cpu_percent` of one CPU.
    pub fn create(name: &str, memory: u64, cpu_percent: u32) -> Result<Limited> {
        let period = 100_000u64;
        let quota = period * u64::from(cpu_percent) / 100;
        let v2_controllers = std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers")).unwrap_or_default();
        if ["memory", "cpu"].iter().all(|c| v2_controllers.split_whitespace().any(|x| x == *c)) {
            let _ = std::fs::write(Path::new(ROOT).join("cgroup.subtree_control"), "+memory +cpu");
            let dir = Path::new(ROOT).join(name);
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let l = Limited { dirs: vec![dir.clone()], memory: dir.clone(), v2: true };
            write(&dir.join("memory.max"), &memory.to_string())?;
            write(&dir.join("memory.swap.max"), "0").ok();
            write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
            return Ok(l);
        }
        let (mem, cpu) = (Path::new(ROOT).join("memory").join(name), Path::new(ROOT).join("cpu").join(name));
        if !mem.parent().is_some_and(Path::is_dir) || !cpu.parent().is_some_and(Path::is_dir) {
            bail!("no cgroup hierarchy with the memory and cpu controllers under {ROOT}");
        }
        std::fs::create_dir(&mem).with_context(|| format!("creating {}", mem.display()))?;
        let mut l = Limited { dirs: vec![mem.clone()], memory: mem.clone(), v2: false };
        std::fs::create_dir(&cpu).with_context(|| format!("creating {}", cpu.display()))?;
        l.dirs.push(cpu.clone());
        write(&mem.join("memory.limit_in_bytes"), &memory.to_string())?;
        write(&cpu.join("cpu.cfs_period_us"), &period.to_string())?;
        write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        Ok(l)
    }

    /// The directories a process joins.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Memory charged now and at most so far (kernel memory, BPF maps
    /// included), bytes.
    pub fn memory(&self) -> (u64, u64) {
        let read = |f: &str| {
            std::fs::read_to_string(self.memory.join(f)).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0)
        };
        if self.v2 {
            (read("memory.current"), read("memory.peak"))
        } else {
            (read("memory.usage_in_bytes"), read("memory.max_usage_in_bytes"))
        }
    }

    /// How often the limit was hit (v2: memory.events max; v1: failcnt).
    pub fn limit_hits(&self) -> u64 {
        if self.v2 {
            let ev = std::fs::read_to_string(self.memory.join("memory.events")).unwrap_or_default();
            ev.lines().find_map(|l| l.strip_prefix("max ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        } else {
            std::fs::read_to_string(self.memory.join("memory.failcnt"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        }
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        for d in &self.dirs {
            // Empty once the engine has exited; a cgroup directory is
            // removed with rmdir, its files go with it.
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

fn write(p: &Path, v: &str) -> Result<()> {
    std::fs::write(p, v).with_context(|| format!("writing {v} to {}", p.display()))
}

/// Make `cmd`'s process join each of `dirs` before it execs.
pub(crate) fn join_command(cmd: &mut Command, dirs: &[PathBuf]) -> Result<()> {
    let procs: Vec<CString> = dirs
        .iter()
        .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_encoded_bytes()).context("cgroup path"))
        .collect::<Result<_>>()?;
    if procs.is_empty() {
        return Ok(());
    }
    // SAFETY: open, write and close are async-signal-safe syscalls; the
    // closure only reads the paths prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let r = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if r != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process started with `join_command` lives in the new cgroup, whose
    /// limit is what was asked; the directories go with the value.
    #[test]
    fn a_command_joins_the_limited_cgroup() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let name = format!("nft-offload-test-{}", std::process::id());
        let cg = Limited::create(&name, 32 << 20, 10).expect("a cgroup with memory and cpu limits");
        let mut c = Command::new("sleep");
        c.arg("30");
        join_command(&mut c, cg.dirs()).unwrap();
        let mut child = c.spawn().unwrap();
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(own.contains(&name), "{own}");
        let limit_file = if cg.v2 { "memory.max" } else { "memory.limit_in_bytes" };
        let limit = std::fs::read_to_string(cg.memory.join(limit_file)).unwrap();
        assert_eq!(limit.trim(), (32u64 << 20).to_string());
        let dirs = cg.dirs().to_vec();
        drop(cg);
        assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?} left behind");
    }
}
