//! An L3 "VPN" link for the lab: a tun device in one namespace, a tun
//! device in another, and a relay in this process copying packets between
//! them both ways. To the router it looks like wg0 or ppp0: a device with
//! no link layer (ARPHRD_NONE), whose packets start at the IP header.
//!
//! The device is opened by hand (`/dev/net/tun`, `TUNSETIFF` with
//! `IFF_TUN | IFF_NO_PI`): libc already defines the ioctl, the flags and
//! `ifreq`, and the relay needs nothing but the file descriptor, while the
//! tun crates add device configuration (addresses, MTU through ioctls, the
//! lab does that with `ip`) and async runtimes around the same ioctl.
//!
//! `tun_chr_open` takes the network namespace of the opening task, so each
//! device is opened on a thread that has joined its namespace; the fd then
//! works from anywhere. Dropping the link stops the relay (its threads poll
//! with a short timeout), closes the fds (which deletes the non-persistent
//! devices) and removes the peer namespace it created, with anything left
//! running in it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::lab::{children, cmd, netns};

/// Largest packet a tun device hands out (its MTU is at most 65535).
const MAX_PACKET: usize = 65_536;
/// How often a relay thread looks at the stop flag while idle.
const POLL_MS: i32 = 100;

/// Open tun device `name` in namespace `ns` (created, not persistent: it
/// goes when the returned fd is closed).
pub fn open_tun(ns: &str, name: &str) -> Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || !name.is_ascii() {
        bail!("invalid tun device name {name:?}: 1-{} ASCII characters", libc::IFNAMSIZ - 1);
    }
    let (ns_s, name_s) = (ns.to_string(), name.to_string());
    netns::in_netns(ns, move || {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .context("opening /dev/net/tun (is the tun module loaded?)")?;
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name_s.bytes()) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and writes back the name into) a valid ifreq.
        if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } != 0 {
            bail!("TUNSETIFF {name_s} in {ns_s}: {}", std::io::Error::last_os_error());
        }
        Ok(f)
    })
}

/// Two tun devices joined by the relay, and the peer namespace they live in
/// one end of.
#[derive(Debug)]
pub struct TunLink {
    /// The namespace created for the far end (removed on drop).
    pub peer_ns: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Packets relayed, near to far and far to near.
    counts: [Arc<AtomicU64>; 2],
}

impl TunLink {
    /// Create namespace `peer_ns`, tun `near_if` in `near_ns` and tun
    /// `far_if` in `peer_ns`, and start relaying. Both devices are left
    /// down and unaddressed: the caller configures them with `ip`.
    pub fn up(near_ns: &str, near_if: &str, peer_ns: &str, far_if: &str) -> Result<TunLink> {
        cmd::run(Command::new("ip").args(["netns", "add", peer_ns]))?;
        let mut link = TunLink {
            peer_ns: peer_ns.to_string(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            counts: [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))],
        };
        // From here on a failure drops `link`, which removes the namespace.
        let near = Arc::new(open_tun(near_ns, near_if)?);
        let far = Arc::new(open_tun(peer_ns, far_if)?);
        for (i, (from, to)) in [(near.clone(), far.clone()), (far, near)].into_iter().enumerate() {
            let (stop, count) = (link.stop.clone(), link.counts[i].clone());
            let t = std::thread::Builder::new()
                .name(format!("tun-relay-{i}"))
                .spawn(move || pump(&from, &to, &stop, &count))
                .context("spawning a relay thread")?;
            link.threads.push(t);
        }
        Ok(link)
    }

    /// Packets relayed so far: (near to far, far to near).
    pub fn packets(&self) -> (u64, u64) {
        (self.counts[0].load(Ordering::Relaxed), self.counts[1].load(Ordering::Relaxed))
    }
}

/// Copy packets from `from` to `to` until `stop`. A write that fails (the
/// far device down, its queue full) drops that packet, as a lossy link does.
fn pump(from: &File, to: &File, stop: &AtomicBool, count: &AtomicU64) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut pfd = libc::pollfd { fd: from.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, POLL_MS) } <= 0 {
            continue;
        }
        // Drain what is queued (non-blocking fd) before polling again.
        loop {
            match (&*from).read(&mut buf) {
                Ok(n) if n > 0 => {
                    if (&*to).write(&buf[..n]).is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => break,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => break,
                // EIO while the device is down: wait for the next poll.
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(POLL_MS as u64));
                    break;
                }
            }
        }
    }
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The threads held the last references to the fds: the devices are gone.
        children::kill_netns_pids(&self.peer_ns);
        if let Err(e) = cmd::run(Command::new("ip").args(["netns", "del", &self.peer_ns])) {
            eprintln!("nft-offload-lab: removing {}: {e:#}", self.peer_ns);
        }
    }
}
