//! Installing offloads in batches: the offloads decided while one batch of
//! conntrack events (or a dump) is handled wait here and are installed
//! together at its end, conntrack first (one ctnetlink send), then the map
//! entries (BPF_MAP_UPDATE_BATCH) of the connections conntrack accepted.

use std::collections::{HashMap, HashSet};

use super::FlowTable;
use crate::conntrack::{CtEntry, CtError, CtUpdate};
use crate::dataplane::{fo_flow, fo_flow_key, key_bytes, PutError};
use crate::flow::{ConnId, Direction, FlowClock};
use crate::policy::verdict::NotOffloaded;
use crate::proto::IPPROTO_TCP;

use super::{now_ns, Offloaded, Written, FIRST_LOOK_NS};

/// Offloads decided in a batch of events are installed at its end, or
/// once this many wait (so the first of a long batch does not wait for
/// the whole batch to be judged).
const MAX_PENDING: usize = 256;

/// An offload decided but not yet installed (`FlowTable::flush`).
pub(super) struct Pending {
    id: ConnId,
    entry: CtEntry,
    dirs: [Direction; 2],
}

fn key_hash(k: &fo_flow_key) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    key_bytes(k).hash(&mut h);
    h.finish()
}

/// `k` was written to the map.
pub(super) fn note_key(keys: &mut HashMap<u64, u32>, k: &fo_flow_key) {
    *keys.entry(key_hash(k)).or_default() += 1;
}

/// `k` was deleted from the map.
pub(super) fn forget_key(keys: &mut HashMap<u64, u32>, k: &fo_flow_key) {
    let h = key_hash(k);
    if let Some(n) = keys.get_mut(&h) {
        *n -= 1;
        if *n == 0 {
            keys.remove(&h);
        }
    }
}

impl FlowTable {
    /// Offloads decided from here to `end_batch` are installed together
    /// (`flush`): one ctnetlink send for their conntrack changes, then
    /// their map entries.
    pub fn begin_batch(&mut self) {
        self.batching = true;
    }

    pub fn end_batch(&mut self) {
        self.batching = false;
        self.flush();
    }

    /// Install `id` now if its offload is pending: something else is about
    /// to happen to it.
    pub(super) fn settle(&mut self, id: &ConnId) {
        if self.pending_ids.contains(id) {
            self.flush();
        }
    }

    pub(super) fn install(&mut self, id: ConnId, e: CtEntry, dirs: [Direction; 2]) {
        self.waiting.remove(&id);
        // A dormant connection stays watched until it is installed
        // (`installed`): one that cannot be stays dormant.
        self.asleep.remove(&id);
        self.pending_ids.insert(id);
        self.pending.push(Pending { id, entry: e, dirs });
        if !self.batching || self.pending.len() >= MAX_PENDING {
            self.flush();
        }
    }

    /// Install the pending offloads. Conntrack first, for all of them in one
    /// send: it will miss the packets we forward, so it must stop judging
    /// windows it cannot see, as nft_flow_offload_eval does
    /// (IP_CT_TCP_FLAG_BE_LIBERAL both ways). Only a connection conntrack
    /// accepted that for gets map entries; one it refused (or that is gone)
    /// costs only itself.
    pub fn flush(&mut self) {
        let clears = std::mem::take(&mut self.clears);
        if !clears.is_empty() {
            self.ct.update_many(&clears).into_iter().for_each(super::label_cleared);
        }
        let batch = std::mem::take(&mut self.pending);
        self.pending_ids.clear();
        let tcp: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].entry.orig.proto == IPPROTO_TCP).collect();
        let reqs: Vec<_> = tcp
            .iter()
            .map(|&i| {
                let e = &batch[i].entry;
                (e.orig, e.zone, CtUpdate { tcp_liberal: true, ..Default::default() })
            })
            .collect();
        let mut accepted = vec![true; batch.len()];
        let results = if reqs.is_empty() { Vec::new() } else { self.ct.update_many(&reqs) };
        for (&i, r) in tcp.iter().zip(results) {
            match r {
                Ok(()) => {}
                Err(CtError::NotFound) => accepted[i] = false,
                Err(err) => {
                    tracing::warn!(id = %batch[i].id, "cannot set TCP liberal mode: {err}; not offloading");
                    self.not_offloaded(&batch[i].id, NotOffloaded::ConntrackUpdateFailed);
                    accepted[i] = false;
                }
            }
        }
        // Keys known free go into one batch write; the others (a hash this
        // table already wrote, or one twice in this batch) one by one with
        // BPF_NOEXIST after it, which tells a taken key from a hash
        // collision and finds the keys the batch just wrote.
        let (mut fresh, mut slow) = (Vec::new(), Vec::new());
        let mut in_batch = HashSet::new();
        for (p, ok) in batch.into_iter().zip(accepted) {
            if !ok {
                continue;
            }
            let h = p.dirs.map(|d| key_hash(&d.key));
            if h[0] != h[1] && h.iter().all(|x| !self.keys.contains_key(x) && !in_batch.contains(x)) {
                in_batch.extend(h);
                fresh.push(p);
            } else {
                slow.push(p);
            }
        }
        self.put_batch(fresh);
        for p in slow {
            self.put_one_by_one(p);
        }
    }

    /// Map entries for offloads whose keys are not in the map, in batch
    /// writes; an entry the kernel cannot write (the table is full) costs
    /// its own connection, and the writes go on after it.
    fn put_batch(&mut self, batch: Vec<Pending>) {
        let entries: Vec<(fo_flow_key, fo_flow)> = batch.iter().flat_map(|p| p.dirs.map(|d| (d.key, d.val))).collect();
        let mut ok = vec![true; batch.len()];
        let mut at = 0;
        while at < entries.len() {
            let (n, err) = self.dp.put_new_flows(&entries[at..]);
            let Some(err) = err.filter(|_| at + n < entries.len()) else { break };
            let bad = (at + n) / 2;
            if (at + n) % 2 == 1 {
                // Its first direction went in: both or neither.
                self.dp.delete_flow(&entries[at + n - 1].0);
            }
            tracing::warn!(id = %batch[bad].id, "{err}");
            self.not_offloaded(&batch[bad].id, refused(&err));
            ok[bad] = false;
            at = (bad + 1) * 2;
        }
        for (p, ok) in batch.into_iter().zip(ok) {
            if ok {
                self.installed(p);
            }
        }
    }

    /// Both map entries of an offload with BPF_NOEXIST each, or neither.
    fn put_one_by_one(&mut self, p: Pending) {
        for (i, d) in p.dirs.iter().enumerate() {
            if let Err(err) = self.dp.put_flow(&d.key, &d.val) {
                tracing::warn!(id = %p.id, "{err}");
                for prev in &p.dirs[..i] {
                    self.dp.delete_flow(&prev.key);
                }
                self.not_offloaded(&p.id, refused(&err));
                return;
            }
        }
        self.installed(p);
    }

    /// Both map entries are in: the connection is offloaded.
    fn installed(&mut self, p: Pending) {
        let Pending { id, entry: e, dirs } = p;
        dirs.iter().for_each(|d| note_key(&mut self.keys, &d.key));
        let now = now_ns();
        let c = &mut self.counters;
        c.offloads += 1;
        if let Some(t) = self.events_at {
            if c.offload_us.len() >= 10_000 {
                c.offload_us.pop_front();
            }
            c.offload_us.push_back(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        }
        tracing::debug!(%id, "offloaded");
        // The entry's remaining timeout as conntrack reported it; unknown
        // counts as expiring now, so the first packet refreshes it.
        let ct_expires_ns = now + u64::from(e.timeout.unwrap_or(0)) * 1_000_000_000;
        let clock =
            FlowClock { installed_ns: now, last_seen_ns: 0, last_refresh_ns: now, refreshed_seen_ns: 0, ct_expires_ns };
        let last = [Written::default(); 2];
        // First look a tick from now; from then on `flow::next_check`.
        let check_at = now + FIRST_LOOK_NS;
        self.due.insert((check_at, id));
        self.index_hops(id, &dirs, true);
        let watch = self.carry_watch(&id);
        self.offloaded.insert(id, Offloaded { entry: e, dirs, clock, base: [(0, 0); 2], last, check_at, watch });
    }
}

/// Why the map refused an offload's entries, as `status` counts it.
fn refused(err: &PutError) -> NotOffloaded {
    match err {
        PutError::KeyTaken => NotOffloaded::KeyCollision,
        PutError::NoMemory => NotOffloaded::NoMemory,
        // E2BIG, the only other refusal an insert into our own map meets.
        PutError::Failed(_) => NotOffloaded::TableFull,
    }
}
