//! Who is at the other end of the control socket, and whether they may talk
//! to us (server side) or be believed (client side).
//!
//! The kernel tells us the peer's pid and uid (SO_PEERCRED, taken at
//! connect/listen time and translated into our namespaces). Capabilities
//! come from `/proc/<pid>/status`, read while the connection is open; a
//! pidfd (SO_PEERPIDFD) checked afterwards proves the pid still named the
//! same process when we read it.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use crate::host::{has_cap, parse_cap_eff, CAP_NET_ADMIN};

/// SO_PEERPIDFD (Linux 6.5); not in every libc crate version.
const SO_PEERPIDFD: libc::c_int = 77;

/// What we know of a peer, gathered by [`Peer::of`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    /// Effective uid at connect time, in our user namespace.
    pub uid: u32,
    /// CapEff of the process, if it could be read reliably.
    pub caps: Option<u64>,
    /// The peer lives in our user namespace (its capabilities mean
    /// something over our network namespace).
    pub same_userns: bool,
}

/// May this peer use the engine (or, client side, be trusted as one)?
/// Root in our user namespace, or CAP_NET_ADMIN held in it.
pub fn authorize(p: &Peer) -> Result<(), String> {
    if p.uid == 0 {
        return Ok(());
    }
    match p.caps {
        Some(c) if p.same_userns && has_cap(c, CAP_NET_ADMIN) => Ok(()),
        Some(c) if has_cap(c, CAP_NET_ADMIN) => {
            Err(format!("pid {} (uid {}) holds CAP_NET_ADMIN only in another user namespace", p.pid, p.uid))
        }
        Some(_) => Err(format!("pid {} (uid {}) has neither uid 0 nor CAP_NET_ADMIN", p.pid, p.uid)),
        None => Err(format!("pid {} (uid {}): its capabilities cannot be read", p.pid, p.uid)),
    }
}

impl Peer {
    /// The process at the other end of `s`.
    pub fn of(s: &UnixStream) -> std::io::Result<Peer> {
        let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: u32::MAX };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: valid fd, buffer and length.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut p = Peer { pid: cred.pid, uid: cred.uid, caps: None, same_userns: false };
        if p.uid == 0 || p.pid <= 0 {
            // Root needs no /proc read; pid 0: not visible from our pid
            // namespace, so nothing more can be known.
            return Ok(p);
        }
        let pidfd = peer_pidfd(s);
        let status = fs::read_to_string(format!("/proc/{}/status", p.pid)).unwrap_or_default();
        let userns = fs::read_link(format!("/proc/{}/ns/user", p.pid)).ok();
        // The pid could have been reused between connect and our read:
        // believe the read only if the process behind the pidfd is still
        // alive (then the pid is still its own) and has the uid the kernel
        // recorded at connect.
        let same_proc = pidfd.as_ref().is_some_and(alive);
        if same_proc && euid_of(&status) == Some(p.uid) {
            p.caps = parse_cap_eff(&status);
            p.same_userns = userns.is_some() && userns == fs::read_link("/proc/self/ns/user").ok();
        }
        Ok(p)
    }
}

fn euid_of(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn peer_pidfd(s: &UnixStream) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd, buffer and length.
    let r = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, SO_PEERPIDFD, (&mut fd as *mut libc::c_int).cast(), &mut len)
    };
    // SAFETY: on success the kernel gave us a new fd that we now own.
    (r == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The pidfd's process has not exited (a zombie still holds its pid).
fn alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: signal 0 only checks; the fd is valid.
    let r = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), 0, std::ptr::null::<libc::siginfo_t>(), 0)
    };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, caps: Option<u64>, same_userns: bool) -> Peer {
        Peer { pid: 4242, uid, caps, same_userns }
    }

    #[test]
    fn who_may_use_the_engine() {
        let na = 1u64 << CAP_NET_ADMIN;
        let all = 0x1ff_ffff_ffff;
        for (p, ok, why) in [
            (peer(0, None, false), true, ""),
            (peer(0, Some(0), true), true, ""),
            (peer(1000, Some(na), true), true, ""),
            (peer(1000, Some(all), true), true, ""),
            (peer(65534, Some(0), true), false, "neither uid 0 nor CAP_NET_ADMIN"),
            (peer(1000, Some(all & !na), true), false, "neither uid 0 nor CAP_NET_ADMIN"),
            // root of a container's own user namespace: uid maps to
            // something else here, its capabilities are its namespace's
            (peer(100000, Some(all), false), false, "another user namespace"),
            (peer(1000, None, true), false, "cannot be read"),
        ] {
            let r = authorize(&p);
            assert_eq!(r.is_ok(), ok, "{p:?}: {r:?}");
            if let Err(e) = r {
                assert!(e.contains(why) && e.contains("pid 4242"), "{p:?}: {e}");
            }
        }
    }

    #[test]
    fn uid_from_proc_status() {
        let s = "Name:\tx\nUid:\t1000\t65534\t65534\t65534\nCapEff:\t0000000000001000\n";
        assert_eq!(euid_of(s), Some(65534));
        assert_eq!(parse_cap_eff(s), Some(1 << CAP_NET_ADMIN));
        assert_eq!(euid_of("Name:\tx\n"), None);
    }

    #[test]
    fn a_peer_seen_through_a_socket_pair_is_ourselves() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = Peer::of(&a).unwrap();
        assert_eq!(p.pid as u32, std::process::id());
        // SAFETY: plain getter.
        assert_eq!(p.uid, unsafe { libc::geteuid() });
        if p.uid != 0 {
            assert!(p.same_userns && p.caps.is_some(), "{p:?}");
        }
    }
}
