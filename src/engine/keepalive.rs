//! Keepalive: read the fast path's counters and stamps of an offloaded
//! connection when it is due (`flow::next_check`: when it could go idle or
//! need a refresh), keep its conntrack entry alive while packets flow, and
//! take it off when it goes idle or the fast path saw it close. A tick reads
//! only the connections due, so 100,000 idle ones cost little. The
//! decisions are `flow::lifecycle::decide` (pure); this reads and applies
//! them.

use std::time::Duration;

use crate::conntrack::{status, CtError, CtUpdate};
use crate::flow::{decide, next_check, Action, CtTimeouts, TeardownReason};

use super::flowtable::FlowTable;

/// Looks at up to `max` of the connections due; returns whether more are
/// due, for the caller to look at them after reading its events (a burst of
/// 10,000 new connections is due at once a tick after it was installed, and
/// looking at all of them in one pass would hold up every new offload).
pub fn tick(ft: &mut FlowTable, now: u64, idle: Duration, timeouts: &CtTimeouts, max: usize) -> bool {
    // Refreshes are sent together after the look (one ctnetlink send per
    // 64, `CtSocket::update_many`): (connection, new timeout, its timeout
    // for next_check).
    let mut refresh = Vec::new();
    for id in ft.due_at_most(now, max) {
        let (action, timeout) = {
            let f = ft.offloaded.get_mut(&id).expect("listed");
            let mut td = 0;
            let mut missing = false;
            for (i, d) in f.dirs.iter().enumerate() {
                match ft.dp.get_written(&d.key) {
                    Some(v) => {
                        f.last[i] = v;
                        td = td.max(u32::from(v.teardown));
                        f.clock.last_seen_ns = f.clock.last_seen_ns.max(v.last_seen_ns);
                    }
                    None => missing = true,
                }
            }
            if missing {
                // An entry removed behind our back (map edited by hand):
                // take the connection off the fast path entirely.
                (Action::Teardown(TeardownReason::Policy), 0)
            } else {
                let seen_reply = f.entry.status & status::SEEN_REPLY != 0 || f.last[1].packets > 0;
                let timeout = timeouts.for_flow(f.entry.orig.proto, seen_reply);
                (decide(now, &f.clock, td, idle, timeout), timeout)
            }
        };
        match action {
            Action::Keep => schedule(ft, id, now, idle, timeout),
            Action::Teardown(r) => ft.teardown(&id, r),
            Action::Refresh(t) => refresh.push((id, t, timeout)),
        }
    }
    let reqs: Vec<_> = refresh
        .iter()
        .map(|&(id, t, _)| {
            let e = &ft.offloaded[&id].entry;
            (e.orig, e.zone, CtUpdate { timeout: Some(t), ..Default::default() })
        })
        .collect();
    let results = if reqs.is_empty() { Vec::new() } else { ft.ct.update_many(&reqs) };
    for ((id, t, timeout), r) in refresh.into_iter().zip(results) {
        let f = ft.offloaded.get_mut(&id).expect("listed");
        match r {
            Ok(()) => {
                f.clock.last_refresh_ns = now;
                f.clock.ct_expires_ns = now + u64::from(t) * 1_000_000_000;
                f.clock.refreshed_seen_ns = f.clock.last_seen_ns;
                ft.counters.refreshes += 1;
            }
            Err(CtError::NotFound) => {
                ft.teardown(&id, TeardownReason::ConntrackDestroyed);
                continue;
            }
            Err(err) => tracing::warn!(proto = f.entry.orig.proto, "conntrack timeout refresh failed: {err}"),
        }
        schedule(ft, id, now, idle, timeout);
    }
    ft.any_due(now)
}

/// Look at `id` again when `flow::next_check` says.
fn schedule(ft: &mut FlowTable, id: crate::flow::ConnId, now: u64, idle: Duration, timeout: u32) {
    if let Some(f) = ft.offloaded.get(&id) {
        let at = next_check(now, &f.clock, idle, timeout);
        ft.schedule(id, at);
    }
}
