//! Facts about the host that `check` reports and the engine relies on:
//! capabilities, sysctls, the preflight that must pass before anything is
//! touched, and a SIGINT/SIGTERM guard for long-running loops.
//!
//! Everything is read for the calling thread: capabilities are per thread
//! (/proc/thread-self/status) and /proc/sys/net follows the thread's network
//! namespace, so a thread that entered another namespace sees that one.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};

use crate::flow::CtTimeouts;

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// Kernel BTF: the fast path's CO-RE relocations need it.
pub const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Effective capability set of the calling thread (None: not readable).
pub fn effective_caps() -> Option<u64> {
    fs::read_to_string("/proc/thread-self/status").ok().and_then(|s| parse_cap_eff(&s))
}

/// Whether capability number `cap` is in the set `caps`.
pub fn has_cap(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

pub(crate) fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// A sysctl by its dotted name ("net.ipv4.ip_forward"), trimmed; None when
/// it does not exist here (module not loaded, not the initial namespace).
/// The running kernel's release (`uname -r`); empty if uname fails.
pub fn kernel_release() -> String {
    // SAFETY: uname fills a zeroed struct; release is NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return String::new();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr()).to_string_lossy().into_owned()
    }
}

pub fn sysctl(name: &str) -> Option<String> {
    fs::read_to_string(Path::new("/proc/sys").join(name.replace('.', "/"))).ok().map(|s| s.trim().to_string())
}

/// A numeric sysctl; None when missing or not a number.
pub fn sysctl_u32(name: &str) -> Option<u32> {
    sysctl(name)?.parse().ok()
}

/// Checks that must pass before anything is touched: privileges to load BPF
/// and attach to interfaces, and kernel BTF.
pub fn preflight() -> Result<()> {
    let caps = effective_caps().unwrap_or(0);
    let has = |c| has_cap(caps, c);
    if !has(CAP_NET_ADMIN) || !(has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        bail!("insufficient privileges: nft-offload needs CAP_BPF and CAP_NET_ADMIN (run as root)");
    }
    if !Path::new(BTF_VMLINUX).exists() {
        bail!("this kernel has no BTF (/sys/kernel/btf/vmlinux missing): it needs CONFIG_DEBUG_INFO_BTF=y");
    }
    Ok(())
}

/// net.ipv4.ip_forward_update_priority: whether ip_forward sets
/// skb->priority from the TOS (the default, 1, where it cannot be read).
/// net.netfilter.nf_conntrack_acct: whether conntrack counts packets and
/// bytes per connection (None: unreadable, nf_conntrack not loaded).
pub fn conntrack_acct() -> Option<bool> {
    sysctl_u32("net.netfilter.nf_conntrack_acct").map(|v| v != 0)
}

pub fn ip_forward_update_priority() -> bool {
    sysctl_u32("net.ipv4.ip_forward_update_priority").unwrap_or(1) != 0
}

/// Conntrack's timeouts in this namespace, the kernel defaults where a
/// sysctl is missing.
pub fn ct_timeouts() -> CtTimeouts {
    let d = CtTimeouts::default();
    let ct = |key: &str| sysctl_u32(&format!("net.netfilter.{key}"));
    CtTimeouts {
        tcp_established: ct("nf_conntrack_tcp_timeout_established").unwrap_or(d.tcp_established),
        udp: ct("nf_conntrack_udp_timeout").unwrap_or(d.udp),
        udp_stream: ct("nf_conntrack_udp_timeout_stream").unwrap_or(d.udp_stream),
    }
}

/// What `--max-flows` is sized from when not given
/// (`settings::capacity::auto_max_flows`).
pub fn memory_facts() -> crate::settings::capacity::MemoryFacts {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    crate::settings::capacity::MemoryFacts {
        mem_total: parse_mem_total(&meminfo),
        cgroup_max: cgroup_v2_path(&cgroup)
            .and_then(|p| cgroup_memory_max(Path::new("/sys/fs/cgroup"), p, "memory.max"))
            .or_else(|| {
                let p = cgroup_v1_memory_path(&cgroup)?;
                cgroup_memory_max(Path::new("/sys/fs/cgroup/memory"), p, "memory.limit_in_bytes")
            }),
        ct_max: sysctl("net.netfilter.nf_conntrack_max").and_then(|v| v.parse().ok()),
    }
}

/// This process's resident memory (VmRSS), bytes.
pub fn own_rss_bytes() -> Option<u64> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    let kb = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?.trim();
    kb.parse::<u64>().ok().map(|k| k * 1024)
}

/// MemTotal of /proc/meminfo, bytes.
pub(crate) fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let kb = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?.trim();
    kb.parse::<u64>().ok().map(|k| k * 1024)
}

/// The unified (v2) hierarchy's path in /proc/self/cgroup ("0::/path").
pub(crate) fn cgroup_v2_path(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The v1 memory hierarchy's path in /proc/self/cgroup ("4:memory:/path"),
/// where v1 still holds the memory controller.
pub(crate) fn cgroup_v1_memory_path(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        ctrl.split(',').any(|c| c == "memory").then_some(path)
    })
}

/// The smallest limit in `file` (v2 memory.max, v1 memory.limit_in_bytes)
/// from the cgroup at `path` up to the root: a parent's limit binds its
/// children too. None when none is set (v2 "max"; v1's page counter
/// maximum, near 2^63).
pub(crate) fn cgroup_memory_max(root: &Path, path: &str, file: &str) -> Option<u64> {
    let mut dir = root.join(path.trim_start_matches('/'));
    let mut least: Option<u64> = None;
    while dir.starts_with(root) && dir != root {
        let limit = fs::read_to_string(dir.join(file)).ok().and_then(|s| s.trim().parse::<u64>().ok());
        if let Some(v) = limit.filter(|v| *v < 1 << 62) {
            least = Some(least.map_or(v, |l| l.min(v)));
        }
        if !dir.pop() {
            break;
        }
    }
    least
}

/// Set by the handler `SignalGuard` installs.
static STOP: AtomicBool = AtomicBool::new(false);
/// SIGHUP since the last `reload_requested`.
static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    if sig == libc::SIGHUP {
        RELOAD.store(true, Ordering::SeqCst);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
}

/// Has SIGHUP (a service manager's reload) arrived since the last call?
pub fn reload_requested() -> bool {
    RELOAD.swap(false, Ordering::SeqCst)
}

/// Has SIGINT/SIGTERM arrived since the current `SignalGuard` was installed?
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// While alive, SIGINT and SIGTERM only set the flag `stop_requested` reads
/// (and SIGHUP the one `reload_requested` reads),
/// so loops end through their normal path (and Drop impls clean up) instead
/// of the process dying with programs attached or namespaces left behind.
/// Dropping it restores the handlers that were there before.
pub struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    /// Installs the handler and clears the flag.
    pub fn install() -> io::Result<SignalGuard> {
        STOP.store(false, Ordering::SeqCst);
        RELOAD.store(false, Ordering::SeqCst);
        let mut g = SignalGuard { old: Vec::new() };
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: sigaction structs are plain data; the handler only
            // performs an atomic store.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                // Blocking reads and waits resume; poll(2) still returns EINTR.
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &sa, &mut old) != 0 {
                    // `g` restores what was already replaced.
                    return Err(io::Error::last_os_error());
                }
                g.old.push((sig, old));
            }
        }
        Ok(g)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, old) in &self.old {
            // SAFETY: restoring what sigaction gave us.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_is_parsed_from_status() {
        assert_eq!(parse_cap_eff("Name:\tx\nCapEff:\t000001fffeffffff\n"), Some(0x1fffeffffff));
        assert_eq!(parse_cap_eff("nothing"), None);
        assert!(has_cap(0x1fffeffffff, CAP_BPF) && !has_cap(1 << CAP_NET_ADMIN, CAP_SYS_ADMIN));
    }

    #[test]
    fn sysctls_are_read_by_dotted_name() {
        let v = sysctl_u32("net.ipv4.ip_forward").expect("net.ipv4.ip_forward exists in every namespace");
        assert!(v <= 1);
        assert_eq!(sysctl("net.no_such_key"), None);
    }

    #[test]
    fn memory_facts_are_parsed() {
        assert_eq!(parse_mem_total("MemTotal:       24683772 kB\nMemFree: 1 kB\n"), Some(24_683_772 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(cgroup_v2_path("0::/system.slice/nft-offload.service\n"), Some("/system.slice/nft-offload.service"));
        assert_eq!(cgroup_v2_path("1:name=systemd:/x\n"), None);
        // A parent's limit binds the child; "max" is no limit.
        let root = std::env::temp_dir().join(format!("fo-cg-{}", std::process::id()));
        let leaf = root.join("a/b");
        // create_dir: refuses a directory someone else made there first.
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(root.join("a/memory.max"), "67108864\n").unwrap();
        std::fs::write(leaf.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_memory_max(&root, "/a/b", "memory.max"), Some(64 << 20));
        std::fs::write(leaf.join("memory.max"), "1048576\n").unwrap();
        assert_eq!(cgroup_memory_max(&root, "/a/b", "memory.max"), Some(1 << 20));
        std::fs::write(root.join("memory.max"), "1\n").unwrap();
        assert_eq!(cgroup_memory_max(&root, "/a/b", "memory.max"), Some(1 << 20), "the root's own file is not a limit");
        assert_eq!(cgroup_memory_max(&root, "/", "memory.max"), None);
        // v1: no limit is the page counter's maximum
        std::fs::write(leaf.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(cgroup_memory_max(&root, "/a/b", "memory.limit_in_bytes"), None);
        assert_eq!(cgroup_v1_memory_path("5:devices:/\n4:memory:/process_api/x\n0::/\n"), Some("/process_api/x"));
        assert_eq!(cgroup_v1_memory_path("0::/system.slice\n"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A signal to ourselves while the guard is installed only sets the flag;
    /// after Drop the previous disposition is back.
    #[test]
    fn signal_guard_sets_the_flag_and_restores_the_old_handler() {
        // SAFETY: querying the current disposition into a zeroed struct.
        let disposition = || unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut sa);
            sa.sa_sigaction
        };
        let before = disposition();
        let g = SignalGuard::install().unwrap();
        assert!(!stop_requested());
        // SAFETY: raise delivers to this thread; our handler is installed.
        assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
        assert!(!stop_requested(), "SIGHUP asks for a reload, not a stop");
        assert!(reload_requested());
        assert!(!reload_requested(), "once per signal");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        assert!(stop_requested());
        drop(g);
        assert_eq!(disposition(), before);
        assert!(SignalGuard::install().map(|_| stop_requested()).is_ok_and(|s| !s), "install clears the flag");
    }
}
