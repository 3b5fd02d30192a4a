//! Processes in lab namespaces: the lab's own children (terminated and
//! reaped on teardown, never signalled once someone else reaped them) and
//! anything else still inside a namespace that is about to be deleted.

use std::process::Command;
use std::time::{Duration, Instant};

use super::cmd;

/// How long Drop waits after SIGTERM before SIGKILLing lab children (the
/// offload daemon needs a moment to detach its programs).
pub(super) const CHILD_TERM_GRACE: Duration = Duration::from_secs(3);

/// SIGTERM, then SIGKILL, every process inside `ns` (a process left in a
/// namespace keeps it, and its veths, alive after `ip netns del`).
pub(crate) fn kill_netns_pids(ns: &str) {
    let pids = |ns: &str| -> Vec<libc::pid_t> {
        cmd::run(Command::new("ip").args(["netns", "pids", ns]))
            .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    };
    let first = pids(ns);
    if first.is_empty() {
        return;
    }
    for &p in &first {
        // SAFETY: plain syscall.
        unsafe { libc::kill(p, libc::SIGTERM) };
    }
    let deadline = Instant::now() + CHILD_TERM_GRACE;
    while Instant::now() < deadline {
        if pids(ns).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in pids(ns) {
        // SAFETY: plain syscall.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

/// State of a tracked child, probed with WNOWAIT so nothing is reaped.
#[derive(PartialEq)]
enum ChildState {
    Running,
    /// Exited, not reaped yet.
    Zombie,
    /// Already reaped by its `Child` owner: the pid is no longer ours and
    /// must not be signalled.
    Gone,
}

fn child_state(pid: u32) -> ChildState {
    // SAFETY: zeroed siginfo is valid output storage.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT);
        match (rc, info.si_pid()) {
            (0, 0) => ChildState::Running,
            (0, _) => ChildState::Zombie,
            _ => ChildState::Gone,
        }
    }
}

fn child_running(pid: u32) -> bool {
    child_state(pid) == ChildState::Running
}

/// Terminate tracked children: SIGTERM, up to `grace` to exit, then SIGKILL;
/// then reap every tracked child nobody reaped yet (no zombies piling up in
/// long-running test processes). `Child` handles of lab children must not be
/// waited on after the lab is gone.
pub(super) fn terminate_children(pids: &[u32], grace: Duration) {
    let ours: Vec<u32> = pids.iter().copied().filter(|&p| child_state(p) != ChildState::Gone).collect();
    let live: Vec<u32> = ours.iter().copied().filter(|&p| child_running(p)).collect();
    for &p in &live {
        // SAFETY: p is our unreaped child, so the pid cannot have been reused.
        unsafe { libc::kill(p as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while !live.is_empty() && Instant::now() < deadline && live.iter().any(|&p| child_running(p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &p in &live {
        if child_running(p) {
            tracing::warn!(pid = p, "lab child ignored SIGTERM, sending SIGKILL");
            // SAFETY: as above.
            unsafe { libc::kill(p as libc::pid_t, libc::SIGKILL) };
        }
    }
    for &p in &ours {
        // SAFETY: p is our child; blocking is fine, it was SIGKILLed at worst.
        unsafe { libc::waitpid(p as libc::pid_t, std::ptr::null_mut(), 0) };
    }
}
