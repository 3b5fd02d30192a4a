//! One netlink multicast subscription, as the engine's three watchers use
//! it (rtnetlink, nf_tables, xfrm): a non-blocking socket joined to some
//! groups, read until empty, with an overrun (ENOBUFS) reported rather
//! than hidden, since each watcher then re-reads what it follows.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use netlink_sys::Socket;

pub struct Subscription {
    sock: Socket,
}

impl Subscription {
    /// Join `groups` (group numbers, e.g. RTNLGRP_LINK, not the legacy
    /// bitmasks) of netlink `protocol`, with a receive buffer of `rcvbuf`
    /// bytes (SO_RCVBUFFORCE as root, so a burst of changes fits).
    pub fn new(protocol: isize, groups: &[u32], rcvbuf: usize) -> io::Result<Self> {
        let mut sock = Socket::new(protocol)?;
        sock.bind_auto()?;
        for g in groups {
            sock.add_membership(*g)?;
        }
        sock.set_non_blocking(true)?;
        let sz = rcvbuf as libc::c_int;
        // SAFETY: setsockopt on our own socket with a valid int. Without
        // CAP_NET_ADMIN it fails and the default buffer stays: an overrun
        // then costs a re-read, nothing more.
        let forced = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&sz as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if forced < 0 {
            let _ = sock.set_rx_buf_sz(rcvbuf);
        }
        Ok(Subscription { sock })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Hand every queued datagram to `take`; true if messages were lost
    /// (an overrun, or a read error, after which nothing is known).
    pub fn drain(&mut self, mut take: impl FnMut(&[u8])) -> bool {
        let mut lost = false;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match self.sock.recv(&mut &mut buf[..], 0) {
                Ok(0) => break,
                Ok(n) => take(&buf[..n.min(buf.len())]),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => lost = true,
                    _ => {
                        tracing::warn!("netlink events: {e}");
                        return true;
                    }
                },
            }
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscription sees a change made after it joined, and an empty
    /// queue reads as nothing lost (a private netns, so nothing else
    /// writes to it).
    #[test]
    fn sees_a_change_and_drains_to_empty() {
        std::thread::spawn(|| {
            // SAFETY: affects only this thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET) needs root");
            const RTNLGRP_LINK: u32 = 1;
            let mut s = Subscription::new(netlink_sys::protocols::NETLINK_ROUTE, &[RTNLGRP_LINK], 1 << 20)
                .expect("rtnetlink subscription");
            let mut n = 0;
            assert!(!s.drain(|_| n += 1));
            assert_eq!(n, 0, "nothing happened yet");
            let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap();
            assert!(up.success());
            let mut seen = 0;
            for _ in 0..50 {
                s.drain(|d| seen += d.len());
                if seen > 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert!(seen > 0, "the link change was not seen");
        })
        .join()
        .unwrap();
    }
}
