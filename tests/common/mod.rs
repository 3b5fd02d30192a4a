//! Shared helpers for tests that need root: a private network namespace
//! per test thread, so nothing touches the host and nothing leaks.
#![allow(dead_code)]

use std::process::Command;

pub fn require_root() {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (BPF, network namespaces); run the suite as root, as CI does");
    }
}

/// Move the calling thread into a new, empty network namespace. Child
/// processes started from this thread inherit it.
pub fn private_netns() {
    require_root();
    // SAFETY: affects only the calling thread.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "unshare(CLONE_NEWNET) failed: {}", std::io::Error::last_os_error());
    sh(&["ip", "link", "set", "lo", "up"]);
}

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn ifindex(name: &str) -> u32 {
    nft_offload::routes::link::ifindex(name).unwrap_or_else(|| panic!("no interface {name}"))
}
