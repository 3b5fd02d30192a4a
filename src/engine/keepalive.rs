//! Keepalive: read the fast path's counters and stamps of an offloaded
//! connection when it is due (`flow::next_check`: when it could go idle or
//! need a refresh), keep its conntrack entry alive while packets flow, and
//! take it off when it goes idle or the fast path saw it close. A tick reads
//! only the connections due, so 100,000 idle ones cost little. The
//! decisions are `flow::lifecycle::decide` (pure); this reads and applies
//! them.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::conntrack::{status, CtError, CtUpdate};
use crate::dataplane::{fo_flow_key, key_bytes, KEY_LEN};
use crate::flow::{
    decide, decide_end, next_check, next_end_check, udp_status_seen, Action, ConnId, CtTimeouts, TeardownReason,
    FO_F_CT_REFRESH,
};
use crate::proto::IPPROTO_TCP;

use super::flowtable::{FlowTable, Written};

/// Entries per BPF_MAP_LOOKUP_BATCH when keepalive walks the whole map.
const WALK_CHUNK: usize = 4096;

/// Whether reading `keys` map entries costs less by walking all `entries`
/// of the map in batches than by one lookup each. Measured on the lab
/// machine (500,000 entries): a walk costs 0.9-1.4 us per entry, a lookup
/// 1.6-3.9 us (a syscall each), so a walk pays from about half the map.
/// Keepalive looks in chunks (the engine's KEEPALIVE_CHUNK, so events are
/// read between them), so this pays only for small tables; a walk of a big
/// map would hold the loop as long as the looks it saves.
fn walk_pays(keys: usize, entries: usize) -> bool {
    keys > 0 && keys * 2 >= entries
}

/// Both map entries of each connection due, by walking the map in batches
/// when that pays, else one lookup each; a key the walk did not return
/// (the walk may miss entries changed meanwhile) is looked up on its own.
fn read_due(ft: &FlowTable, due: &[ConnId]) -> Vec<[Option<Written>; 2]> {
    let mut got = vec![[None; 2]; due.len()];
    let keys = |i: usize| ft.offloaded.get(&due[i]).map(|f| [f.dirs[0].key, f.dirs[1].key]);
    if walk_pays(due.len() * 2, ft.offloaded.len() * 2) {
        let mut at: HashMap<[u8; KEY_LEN], (usize, usize)> = HashMap::with_capacity(due.len() * 2);
        for i in 0..due.len() {
            for (d, k) in keys(i).into_iter().flatten().enumerate() {
                at.insert(key_bytes(&k), (i, d));
            }
        }
        let walked = ft.dp.for_each_flow(WALK_CHUNK, |k, v| {
            if let Some(&(i, d)) = at.get(&key_bytes(&k)) {
                got[i][d] = Some(Written::from(&v));
            }
        });
        if let Err(e) = walked {
            tracing::warn!("keepalive: {e:#}; reading the entries one by one");
        }
    }
    for (i, g) in got.iter_mut().enumerate() {
        for (d, k) in keys(i).into_iter().flatten().enumerate() {
            if g[d].is_none() {
                g[d] = ft.dp.get_written(&k);
            }
        }
    }
    got
}

/// Looks at up to `max` of the connections due; returns whether more are
/// due, for the caller to look at them after reading its events (a burst of
/// 10,000 new connections is due at once a tick after it was installed, and
/// looking at all of them in one pass would hold up every new offload).
pub fn tick(ft: &mut FlowTable, now: u64, idle: Duration, timeouts: &CtTimeouts, max: usize) -> bool {
    // Refreshes are sent together after the look (one ctnetlink send per
    // 64, `CtSocket::update_many`): (connection, new timeout, its timeout
    // for next_check).
    let mut refresh = Vec::new();
    let due = ft.due_at_most(now, max);
    let read = read_due(ft, &due);
    for (id, read) in due.into_iter().zip(read) {
        let (action, timeout) = {
            let f = ft.offloaded.get_mut(&id).expect("listed");
            let mut td = 0;
            let mut missing = false;
            for (i, r) in read.into_iter().enumerate() {
                match r {
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
            } else if fast(f) {
                // The fast path refreshes the entry as it forwards.
                (decide_end(now, &f.clock, td, idle), 0)
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
    let mut reqs: Vec<_> = refresh
        .iter()
        .map(|&(id, t, _)| {
            let e = &ft.offloaded[&id].entry;
            (e.orig, e.zone, CtUpdate { timeout: Some(t), ..Default::default() })
        })
        .collect();
    // A UDP connection refreshed had packets since: the status bits
    // conntrack would have set on them, as a request of their own so a
    // refusal (EBUSY: the entry is dying) costs no refresh.
    let assure: Vec<(ConnId, u32)> = refresh
        .iter()
        .filter_map(|&(id, _, _)| {
            let f = &ft.offloaded[&id];
            let udp = f.entry.orig.proto == crate::proto::IPPROTO_UDP;
            udp.then(|| udp_status_seen(f.entry.status, f.last[1].packets > 0)).flatten().map(|st| (id, st))
        })
        .collect();
    reqs.extend(assure.iter().map(|&(id, st)| {
        let e = &ft.offloaded[&id].entry;
        (e.orig, e.zone, CtUpdate { status: Some(st), ..Default::default() })
    }));
    let mut results = if reqs.is_empty() { Vec::new() } else { ft.ct.update_many(&reqs) };
    let assured = results.split_off(refresh.len().min(results.len()));
    for ((id, st), r) in assure.into_iter().zip(assured) {
        match r {
            Ok(()) | Err(CtError::NotFound) => {}
            Err(err) => tracing::debug!(%id, "conntrack status update refused: {err}"),
        }
        // Asked once: the event of the change brings the entry's own word.
        if let Some(f) = ft.offloaded.get_mut(&id) {
            f.entry.status = st;
        }
    }
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

/// Put back the conntrack timeout of the connections whose fast path handed
/// the kernel a RST it could not take as a close (`fo_rst` in bpf/maps.h;
/// `keys`, or with `all` every offloaded TCP connection, after the ring
/// lost some). Conntrack, liberal and blind to the window while the
/// connection is offloaded, keeps such a connection ESTABLISHED but
/// shortens its timeout (6.12: the unacknowledged timeout; 6.18: the close
/// timeout), which the connection's next packets would lengthen again had
/// they not taken the fast path; the kernel without offload, which sees the
/// window, would have found a blind RST out of window and left the entry
/// alone. The timeout is what keepalive last gave the entry, counted down.
/// Run a tick after the RSTs were announced, so conntrack has seen them.
pub fn restore_after_rst(ft: &mut FlowTable, keys: &[fo_flow_key], all: bool, now: u64, timeouts: &CtTimeouts) {
    let ids: HashSet<ConnId> = if all {
        ft.offloaded.keys().filter(|id| id.proto == IPPROTO_TCP).copied().collect()
    } else {
        keys.iter().filter_map(|k| ft.conn_of_key(k)).collect()
    };
    let reqs: Vec<_> = ids
        .iter()
        .filter_map(|id| ft.offloaded.get(id))
        .map(|f| {
            // Where the fast path refreshes the entry: the established
            // timeout from the last packet it forwarded (its refresh is at
            // most a second older), until its next packet refreshes it.
            let expires = if fast(f) {
                let seen = f.dirs.iter().filter_map(|d| ft.dp.get_written(&d.key)).map(|w| w.last_seen_ns).max();
                let seen = seen.unwrap_or(0).max(f.clock.last_seen_ns).max(f.clock.installed_ns);
                seen + u64::from(timeouts.tcp_established) * 1_000_000_000
            } else {
                f.clock.ct_expires_ns
            };
            let left = expires.saturating_sub(now) / 1_000_000_000;
            let t = u32::try_from(left).unwrap_or(u32::MAX).max(1);
            (f.entry.orig, f.entry.zone, CtUpdate { timeout: Some(t), ..Default::default() })
        })
        .collect();
    if reqs.is_empty() {
        return;
    }
    for r in ft.ct.update_many(&reqs) {
        match r {
            // Gone: its DESTROY event takes it off.
            Ok(()) | Err(CtError::NotFound) => {}
            Err(err) => tracing::warn!("restoring a conntrack timeout after a RST: {err}"),
        }
    }
    ft.counters.rst_restores += reqs.len() as u64;
}

/// Whether the fast path keeps `f`'s conntrack entry alive
/// (`FlowTable::keepalive_flags`).
fn fast(f: &super::flowtable::Offloaded) -> bool {
    f.dirs[0].val.flags & FO_F_CT_REFRESH != 0
}

/// Look at `id` again when `flow::next_check` says (`next_end_check` where
/// the fast path refreshes the entry: only idleness is left to see).
fn schedule(ft: &mut FlowTable, id: ConnId, now: u64, idle: Duration, timeout: u32) {
    if let Some(f) = ft.offloaded.get(&id) {
        let at = if fast(f) { next_end_check(now, &f.clock, idle) } else { next_check(now, &f.clock, idle, timeout) };
        ft.schedule(id, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_pays_from_half_the_map() {
        for (keys, entries, walk) in [
            (0, 0, false),
            (0, 10, false),
            (1, 1, true),
            (4, 10, false),
            (5, 10, true),
            (10, 10, true),
            (12_500, 500_000, false),
        ] {
            assert_eq!(walk_pays(keys, entries), walk, "{keys} keys of {entries}");
        }
    }
}
