//! The SPD from the kernel: one dump (XFRM_MSG_GETPOLICY with NLM_F_DUMP,
//! plus XFRM_MSG_GETDEFAULT), and a NETLINK_XFRM socket subscribed to
//! XFRMNLGRP_POLICY, which carries every add, update, delete, flush and
//! default change (`xfrm_notify_policy`, `xfrm_notify_policy_flush`,
//! `xfrm_notify_userpolicy` in net/xfrm/xfrm_user.c).
//!
//! Events are not applied one by one: any message on the group, an
//! undecodable one and an overrun (ENOBUFS) alike, means "read the SPD
//! again". The SPD of a router is small (a dump is one round trip), a dump
//! is the kernel's exact set, and it needs none of the bookkeeping events
//! would (deletes by index or by selector, flushes by type, expiries), so
//! there is nothing to get out of step.

use std::io;
use std::os::fd::RawFd;

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST};
use netlink_packet_xfrm::policy::{DefaultMessage, DelGetMessage};
use netlink_packet_xfrm::{UserPolicyDefault, XfrmMessage, XFRMNLGRP_POLICY};
use netlink_sys::protocols::NETLINK_XFRM;

use super::policy::{decode_datagram, Policy, Spd};
use crate::nlwatch::Subscription;
use crate::routes::dump::exchange_on;

const DUMP_SEQ: u32 = 1;

fn request(msg: XfrmMessage, flags: u16) -> Vec<u8> {
    let mut m = NetlinkMessage::new(NetlinkHeader::default(), msg.into());
    m.header.flags = flags;
    m.header.sequence_number = DUMP_SEQ;
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

/// Every policy (both types, every direction), or an error; `bad` names the
/// messages that could not be decoded (the others are kept).
fn dump_policies() -> Result<(Vec<Policy>, Vec<String>)> {
    let req = request(XfrmMessage::GetPolicy(DelGetMessage::default()), NLM_F_REQUEST | NLM_F_DUMP);
    for _ in 0..3 {
        let (mut policies, mut bad, mut intr) = (Vec::new(), Vec::new(), false);
        exchange_on(NETLINK_XFRM, &req, |datagram| {
            intr |= datagram.len() >= 8 && u16::from_ne_bytes([datagram[6], datagram[7]]) & NLM_F_DUMP_INTR != 0;
            let d = decode_datagram(datagram, Some(DUMP_SEQ));
            policies.extend(d.policies);
            bad.extend(d.bad);
            match d.error {
                Some(c) if c != 0 => Err(io::Error::from_raw_os_error(c.abs()).into()),
                _ => Ok(d.done),
            }
        })
        .context("xfrm policy dump")?;
        if !intr {
            return Ok((policies, bad));
        }
    }
    bail!("xfrm policy dump: interrupted by concurrent changes three times in a row")
}

/// The per-direction defaults; a kernel before 5.17 has none (allow).
fn read_defaults() -> Result<UserPolicyDefault> {
    let req = request(XfrmMessage::GetPolicyDefault(DefaultMessage::default()), NLM_F_REQUEST);
    let mut out = None;
    exchange_on(NETLINK_XFRM, &req, |datagram| {
        let d = decode_datagram(datagram, Some(DUMP_SEQ));
        if let Some(e) = d.bad.first() {
            return Err(anyhow!("xfrm default policy reply: {e}"));
        }
        match (d.defaults, d.error) {
            (Some(p), _) => out = Some(Ok(p)),
            (None, Some(c)) if c == -libc::EINVAL || c == -libc::EOPNOTSUPP => out = Some(Ok(Default::default())),
            (None, Some(c)) if c != 0 => out = Some(Err(io::Error::from_raw_os_error(c.abs()).into())),
            _ => {}
        }
        Ok(out.is_some())
    })
    .context("xfrm default policy")?;
    out.unwrap_or_else(|| Ok(Default::default()))
}

/// Read the SPD. A kernel without the xfrm netlink interface
/// (CONFIG_XFRM_USER) has no policies this engine could see: empty. Any
/// other failure, or a policy that could not be decoded, leaves the SPD
/// unknown, which holds every direction (fail safe).
pub fn read_spd() -> Spd {
    let policies = match dump_policies() {
        Ok(p) => p,
        Err(e) if no_xfrm(&e) => {
            tracing::info!("this kernel has no xfrm netlink interface: no IPsec policy to follow");
            return Spd::default();
        }
        Err(e) => {
            tracing::warn!("{e:#}; nothing is offloaded until the xfrm policies can be read");
            return Spd::unreadable(format!("{e:#}"));
        }
    };
    let (policies, bad) = policies;
    let (defaults, unknown) = match read_defaults() {
        Ok(d) => (d, None),
        Err(e) => (Default::default(), Some(format!("{e:#}"))),
    };
    let unknown = unknown.or_else(|| (!bad.is_empty()).then(|| format!("undecodable policy: {}", bad.join("; "))));
    if let Some(u) = &unknown {
        tracing::warn!("xfrm policies: {u}; nothing is offloaded until they are read in full");
    }
    Spd::new(policies, defaults, unknown)
}

fn no_xfrm(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error) == Some(libc::EPROTONOSUPPORT))
}

/// Subscription to XFRMNLGRP_POLICY.
pub struct XfrmWatch {
    sub: Subscription,
}

impl XfrmWatch {
    /// Subscribe (before the first dump, so no change falls between).
    pub fn new() -> io::Result<Self> {
        // A burst of changes (an IKE daemon starting) is summarised anyway;
        // an overrun only costs a dump.
        Ok(XfrmWatch { sub: Subscription::new(NETLINK_XFRM, &[XFRMNLGRP_POLICY], 1 << 20)? })
    }

    pub fn fd(&self) -> RawFd {
        self.sub.fd()
    }

    /// Read everything queued: true if the SPD may have changed (a message,
    /// an overrun or a read error).
    pub fn drain(&mut self) -> bool {
        let mut changed = false;
        let lost = self.sub.drain(|_| changed = true);
        if lost {
            tracing::debug!("xfrm events overran; reading the policies again");
        }
        changed || lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    fn ip(args: &str) {
        let st = Command::new("ip").args(args.split_whitespace()).status().expect("running ip");
        assert!(st.success(), "ip {args}: {st}");
    }

    /// In a network namespace of its own (this thread only): a policy added
    /// is announced on the group and read back by the dump, and so are its
    /// deletion and a default change.
    #[test]
    fn changes_are_announced_and_the_dump_follows_them() {
        std::thread::spawn(|| {
            // SAFETY: unshare affects this thread only; `ip` forks from it.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET): run as root");
            assert_eq!(read_spd(), Spd::default(), "a new namespace has no policy");
            let mut w = XfrmWatch::new().expect("subscribing to XFRMNLGRP_POLICY");
            let wait = |w: &mut XfrmWatch| {
                let t0 = Instant::now();
                while !w.drain() {
                    assert!(t0.elapsed() < Duration::from_secs(2), "no xfrm event within 2 s");
                    std::thread::sleep(Duration::from_millis(5));
                }
            };
            assert!(!w.drain(), "nothing happened yet");
            ip("xfrm policy add src 192.168.1.0/24 dst 203.0.113.2/32 dir out tmpl proto esp mode tunnel");
            wait(&mut w);
            let spd = read_spd();
            assert_eq!(spd.policies.len(), 1, "{spd:?}");
            assert_eq!(spd.policies[0].to_string(), "dir out src 192.168.1.0/24 dst 203.0.113.2/32 tmpl esp tunnel");
            ip("xfrm policy setdefault in accept fwd block out accept");
            wait(&mut w);
            assert!(read_spd().fwd_block);
            ip("xfrm policy flush");
            wait(&mut w);
            assert!(read_spd().policies.is_empty());
        })
        .join()
        .unwrap();
    }
}
