//! The last full view of a connection, and merging events into it.
//!
//! ctnetlink sends an attribute in an update event only when it changed:
//! `ctnetlink_conntrack_event` (net/netfilter/nf_conntrack_netlink.c) dumps
//! CTA_PROTOINFO only on IPCT_PROTOINFO and CTA_LABELS only on IPCT_LABEL.
//! A dump (and a NEW event) is a full view: there a missing attribute means
//! "none". The engine keeps one `Memo` per connection it has heard of and
//! merges every entry through `merge`, so everything downstream sees full
//! views.

use super::msg::{CtEntry, CT_LABELS_LEN};

/// Whether a message describes the whole entry or only what changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A dump entry or a NEW event: absent attributes are absent.
    Full,
    /// An UPDATE event: absent attributes are unchanged.
    Changes,
}

/// What an update event may leave out, as last seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memo {
    pub tcp_state: Option<u8>,
    pub tcp_flags: Option<[u8; 2]>,
    pub labels: Option<[u8; CT_LABELS_LEN]>,
    pub has_helper: bool,
    /// The mark is always current in events (sent when non-zero or
    /// changed); remembered so a change can be recognised.
    pub mark: u32,
    /// The last reason it was not offloaded for (a hash of its text), so
    /// `status` counts connections, not the events that repeat a reason.
    pub refused: Option<u32>,
}

impl Memo {
    pub fn of(e: &CtEntry) -> Memo {
        Memo {
            tcp_state: e.tcp_state,
            tcp_flags: e.tcp_flags,
            labels: e.labels,
            has_helper: e.has_helper,
            mark: e.mark,
            refused: None,
        }
    }
}

/// Complete `e` from `last` and return the new memo.
///
/// A helper, once attached, stays for the connection's life
/// (`nf_ct_helper_ext_add` happens before confirmation), so it is carried
/// forward even from a full view that misses it.
pub fn merge(mut e: CtEntry, seen: Seen, last: Option<&Memo>) -> (CtEntry, Memo) {
    if let Some(m) = last {
        if seen == Seen::Changes {
            e.tcp_state = e.tcp_state.or(m.tcp_state);
            e.tcp_flags = e.tcp_flags.or(m.tcp_flags);
            e.labels = e.labels.or(m.labels);
        }
        e.has_helper |= m.has_helper;
    }
    let memo = Memo::of(&e);
    (e, memo)
}

/// Whether `fresh` says nothing new about a connection last seen as
/// `stored` (both merged): only what moves without a change of state
/// differs, the time left and the counters. Such an entry needs no verdict
/// (the event of the engine's own timeout refresh, a resync's dump line of a
/// connection it already follows).
pub fn only_timers_moved(stored: &CtEntry, fresh: &CtEntry) -> bool {
    let strip = |e: &CtEntry| CtEntry { timeout: None, counters_orig: None, counters_reply: None, ..e.clone() };
    strip(stored) == strip(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::tcp_state;
    use crate::flow::tests::tcp_masq;

    fn label(bit: usize) -> [u8; CT_LABELS_LEN] {
        let mut l = [0u8; CT_LABELS_LEN];
        l[bit / 8] |= 1 << (bit % 8);
        l
    }

    #[test]
    fn table() {
        let full = tcp_masq();
        let mut bare = full.clone();
        bare.tcp_state = None;
        bare.tcp_flags = None;
        bare.labels = None;
        bare.has_helper = false;
        let mut memo = Memo::of(&full);
        memo.labels = Some(label(127));
        memo.tcp_flags = Some([0x20, 0x20]);
        memo.has_helper = true;
        let mut newer = full.clone();
        newer.tcp_state = Some(tcp_state::FIN_WAIT);
        newer.labels = Some(label(3));
        newer.mark = 9;

        // (case, entry, seen, last, expected tcp_state, labels, flags, helper, mark)
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            &str,
            &CtEntry,
            Seen,
            Option<&Memo>,
            Option<u8>,
            Option<[u8; 16]>,
            Option<[u8; 2]>,
            bool,
            u32,
        )> = vec![
            ("first sight of an update", &bare, Seen::Changes, None, None, None, None, false, 0),
            (
                "update fills from memo",
                &bare,
                Seen::Changes,
                Some(&memo),
                full.tcp_state,
                memo.labels,
                memo.tcp_flags,
                true,
                0,
            ),
            (
                "update keeps what it carries",
                &newer,
                Seen::Changes,
                Some(&memo),
                Some(tcp_state::FIN_WAIT),
                Some(label(3)),
                memo.tcp_flags,
                true,
                9,
            ),
            ("full view: absent labels are none", &bare, Seen::Full, Some(&memo), None, None, None, true, 0),
            ("full view as is", &newer, Seen::Full, None, Some(tcp_state::FIN_WAIT), Some(label(3)), None, false, 9),
        ];
        for (case, e, seen, last, st, labels, flags, helper, mark) in cases {
            let (m, memo2) = merge(e.clone(), seen, last);
            assert_eq!(m.tcp_state, st, "{case}: tcp_state");
            assert_eq!(m.labels, labels, "{case}: labels");
            assert_eq!(m.tcp_flags, flags, "{case}: tcp_flags");
            assert_eq!(m.has_helper, helper, "{case}: helper");
            assert_eq!(m.mark, mark, "{case}: mark");
            assert_eq!(memo2, Memo::of(&m), "{case}: memo is the merged view");
            // everything else passes through untouched
            assert_eq!((m.orig, m.reply, m.status, m.zone), (e.orig, e.reply, e.status, e.zone), "{case}");
        }
    }

    #[test]
    fn only_timers_moved_ignores_time_left_and_counters_only() {
        let base = tcp_masq();
        let mut timers = base.clone();
        timers.timeout = Some(7);
        timers.counters_orig = Some((5, 500));
        timers.counters_reply = Some((3, 300));
        assert!(only_timers_moved(&base, &base), "same entry");
        assert!(only_timers_moved(&base, &timers), "time left and counters");
        type Change = fn(&mut CtEntry);
        let changed: Vec<(&str, Change)> = vec![
            ("mark", |e| e.mark ^= 1),
            ("status", |e| e.status ^= crate::conntrack::status::SEEN_REPLY),
            ("tcp state", |e| e.tcp_state = Some(tcp_state::FIN_WAIT)),
            ("tcp flags", |e| e.tcp_flags = Some([0x08, 0])),
            ("labels", |e| e.labels = Some(label(5))),
            ("helper", |e| e.has_helper = true),
            ("id (a new entry on the same tuple)", |e| e.id += 1),
            ("zone", |e| e.zone += 1),
            ("reply tuple", |e| e.reply.dport ^= 1),
        ];
        for (what, f) in changed {
            let mut e = timers.clone();
            f(&mut e);
            assert!(!only_timers_moved(&base, &e), "{what} changed");
        }
    }
}
