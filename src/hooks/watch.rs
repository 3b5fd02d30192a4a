//! nf_tables change notifications (NFNLGRP_NFTABLES). Any committed change
//! to the ruleset (a rule, set element, set, chain, table, object or
//! flowtable added, deleted or replaced, by anyone) may change what the
//! kernel does with an offloaded connection's next packet: the engine sends
//! every offloaded connection back through the kernel (`NftChanges::ruleset`).
//! A table or chain change may also add or remove a device chain: the device
//! hooks are read again (`NftChanges::chains`). Set updates from the packet
//! path (`update @set`, `add @set` in rules: nft_dynset) are not notified,
//! so fw4's dynamic sets cause none of this. tc changes come through the
//! route watcher (RTMGRP_TC).

use std::io;
use std::os::fd::RawFd;

use crate::nlwatch::Subscription;

use super::nft::NFNL_SUBSYS_NFTABLES;

/// include/uapi/linux/netfilter/nfnetlink.h.
const NFNLGRP_NFTABLES: u32 = 7;

/// NFT_MSG_{NEW,DEL}TABLE, NFT_MSG_{NEW,DEL}CHAIN, and the DESTROY variants
/// (6.3): include/uapi/linux/netfilter/nf_tables.h.
const TABLE_OR_CHAIN: [u16; 6] = [0, 2, 3, 5, 26, 27];

/// Every message that changes the ruleset (nf_tables.h): NEW/DEL of
/// tables, chains, rules, sets, set elements (0-14, the GETs excepted),
/// objects (18, 20) and flowtables (22, 24), and the DESTROY variants
/// (26-32). Not NEWGEN (15), which ends every transaction, nor GETs, traces
/// or resets.
fn changes_ruleset(t: u16) -> bool {
    matches!(t, 0 | 2 | 3 | 5 | 6 | 8 | 9 | 11 | 12 | 14 | 18 | 20 | 22 | 24 | 26..=32)
}

/// What a batch of notifications changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NftChanges {
    /// A table or chain: the device chains may have changed.
    pub chains: bool,
    /// Anything in the ruleset.
    pub ruleset: bool,
    /// The netlink ports of the sockets that committed those ruleset
    /// changes (a notification's nlmsg_pid is the committer's port,
    /// nf_tables_api.c `nft_notify_enqueue` via `ctx->portid`; nft binds
    /// with an automatic port, its pid unless taken): who changed it.
    pub committers: Vec<u32>,
    /// Notifications were lost: any committer, ours or not.
    pub lost: bool,
}

impl NftChanges {
    /// Whether some of these ruleset changes were committed by another
    /// process than the nft runs in `own` (or cannot be told: lost).
    pub fn by_others(&self, own: &[u32]) -> bool {
        self.lost || self.committers.iter().any(|p| !own.contains(p))
    }
}

pub struct NftWatch {
    sub: Subscription,
}

impl NftWatch {
    pub fn new() -> io::Result<Self> {
        Ok(NftWatch {
            sub: Subscription::new(netlink_sys::protocols::NETLINK_NETFILTER, &[NFNLGRP_NFTABLES], 1 << 20)?,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.sub.fd()
    }

    /// Read everything queued (lost notifications count as every change).
    pub fn drain(&mut self) -> NftChanges {
        let mut changed = NftChanges::default();
        let lost = self.sub.drain(|d| {
            let c = summarise(d);
            changed.chains |= c.chains;
            changed.ruleset |= c.ruleset;
            changed.lost |= c.lost;
            for p in c.committers {
                if !changed.committers.contains(&p) {
                    changed.committers.push(p);
                }
            }
        });
        if lost {
            changed = NftChanges { chains: true, ruleset: true, committers: Vec::new(), lost: true };
        }
        changed
    }
}

/// What this datagram of notifications changes.
pub fn summarise(datagram: &[u8]) -> NftChanges {
    let mut c = NftChanges::default();
    for m in crate::conntrack::nla::NlMsgIter::new(datagram) {
        match m {
            Ok((h, _)) if h.msg_type >> 8 == NFNL_SUBSYS_NFTABLES => {
                let t = h.msg_type & 0xff;
                c.chains |= TABLE_OR_CHAIN.contains(&t);
                if changes_ruleset(t) {
                    c.ruleset = true;
                    if !c.committers.contains(&h.pid) {
                        c.committers.push(h.pid);
                    }
                }
            }
            Ok(_) => {}
            // Unreadable: assume the worst.
            Err(_) => return NftChanges { chains: true, ruleset: true, committers: Vec::new(), lost: true },
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::nla::NlMsgBuilder;

    #[test]
    fn what_each_notification_changes() {
        let msg = |t: u16| NlMsgBuilder::new((NFNL_SUBSYS_NFTABLES << 8) | t, 0, 0).finish();
        let what = |d: &[u8]| {
            let c = summarise(d);
            (c.chains, c.ruleset)
        };
        let (both, rules_only, none) = ((true, true), (false, true), (false, false));
        #[rustfmt::skip]
        let cases = [
            (0, both, "NEWTABLE"), (2, both, "DELTABLE"), (3, both, "NEWCHAIN"), (5, both, "DELCHAIN"),
            (27, both, "DESTROYCHAIN"), (6, rules_only, "NEWRULE"), (8, rules_only, "DELRULE"),
            (12, rules_only, "NEWSETELEM"), (14, rules_only, "DELSETELEM"), (9, rules_only, "NEWSET"),
            (18, rules_only, "NEWOBJ"), (22, rules_only, "NEWFLOWTABLE"), (30, rules_only, "DESTROYSETELEM"),
            (15, none, "NEWGEN"), (16, none, "GETGEN"), (17, none, "TRACE"), (4, none, "GETCHAIN"),
        ];
        for (t, want, name) in cases {
            assert_eq!(what(&msg(t)), want, "NFT_MSG_{name}");
        }
        let mut d = msg(15);
        d.extend(msg(3));
        assert_eq!(what(&d), both, "a chain anywhere in the batch");
        assert_eq!(what(&NlMsgBuilder::new((1 << 8) | 3, 0, 0).finish()), none, "ctnetlink, not nf_tables");
        assert_eq!(what(&[0xff; 7]), both, "garbage");
        assert!(summarise(&[0xff; 7]).lost);
    }

    /// Who committed: each ruleset change's port, once; not NEWGEN's.
    #[test]
    fn committers_are_the_changes_ports() {
        let from = |t: u16, port: u32| {
            let mut m = NlMsgBuilder::new((NFNL_SUBSYS_NFTABLES << 8) | t, 0, 0).finish();
            m[12..16].copy_from_slice(&port.to_ne_bytes());
            m
        };
        let mut d = from(6, 4242);
        d.extend(from(6, 4242));
        d.extend(from(12, 77));
        d.extend(from(15, 9));
        let c = summarise(&d);
        assert_eq!(c.committers, vec![4242, 77]);
        assert!(!c.lost);
    }
}
