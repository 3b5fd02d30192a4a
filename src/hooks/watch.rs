//! nf_tables change notifications (NFNLGRP_NFTABLES): a table or chain
//! added or deleted means the device chains are read again. Rule and set
//! changes do not move a base chain and are ignored (sets change often:
//! banIP, fw4's dynamic sets). tc changes come through the route watcher
//! (RTMGRP_TC).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::nft::NFNL_SUBSYS_NFTABLES;

/// include/uapi/linux/netfilter/nfnetlink.h.
const NFNLGRP_NFTABLES: libc::c_int = 7;

/// NFT_MSG_{NEW,DEL}TABLE, NFT_MSG_{NEW,DEL}CHAIN, and the DESTROY variants
/// (6.3): include/uapi/linux/netfilter/nf_tables.h.
const TABLE_OR_CHAIN: [u16; 6] = [0, 2, 3, 5, 26, 27];

pub struct NftWatch {
    fd: OwnedFd,
}

impl NftWatch {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket syscalls with checked results; the fd is
        // owned right after creation.
        unsafe {
            let raw = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_NETFILTER,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(raw);
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            if libc::bind(
                raw,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            let g = NFNLGRP_NFTABLES;
            if libc::setsockopt(
                raw,
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                (&g as *const libc::c_int).cast(),
                4,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(NftWatch { fd })
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Read everything queued: true if a table or chain changed (or
    /// notifications were lost).
    pub fn drain(&mut self) -> bool {
        let mut changed = false;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: reading into an owned buffer.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        changed = true;
                        continue;
                    }
                    _ => break,
                }
            }
            if n == 0 {
                break;
            }
            changed |= touches_chains(&buf[..n as usize]);
        }
        changed
    }
}

/// Does this datagram of notifications add or remove a table or chain?
pub fn touches_chains(datagram: &[u8]) -> bool {
    crate::conntrack::nla::NlMsgIter::new(datagram).any(|m| match m {
        Ok((h, _)) => h.msg_type >> 8 == NFNL_SUBSYS_NFTABLES && TABLE_OR_CHAIN.contains(&(h.msg_type & 0xff)),
        // Unreadable: assume the worst.
        Err(_) => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::nla::NlMsgBuilder;

    #[test]
    fn chain_and_table_changes_count_rules_and_sets_do_not() {
        let msg = |t: u16| NlMsgBuilder::new((NFNL_SUBSYS_NFTABLES << 8) | t, 0, 0).finish();
        for (t, want) in [(3, true), (5, true), (0, true), (2, true), (27, true), (6, false), (12, false), (16, false)]
        {
            assert_eq!(touches_chains(&msg(t)), want, "NFT_MSG type {t}");
        }
        let mut d = msg(6);
        d.extend(msg(3));
        assert!(touches_chains(&d), "a chain anywhere in the batch");
        assert!(!touches_chains(&NlMsgBuilder::new((1 << 8) | 3, 0, 0).finish()), "ctnetlink, not nf_tables");
        assert!(touches_chains(&[0xff; 7]), "garbage");
    }
}
