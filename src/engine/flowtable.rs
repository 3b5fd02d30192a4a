//! The connections the engine handles and their fast-path map entries:
//! offloaded (both directions in `fo_flows`), waiting for their path, and
//! dormant (taken off while alive). A dormant connection comes back only on
//! evidence that the kernel, applying the current ruleset, forwarded a
//! packet of it: in `--nft` mode its flowtable label set anew by `flow add`
//! (a conntrack event), otherwise TC egress seeing the packet leave
//! (`fo_dormant`, by egress key). Verdicts come from `policy::verdict`;
//! this applies them. It also keeps the one memo per connection that
//! completes ctnetlink's update events (`conntrack::merge`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Instant;

use indexmap::IndexMap;

use crate::conntrack::{merge, CtEntry, CtError, CtSocket, CtTuple, CtUpdate, Memo, Seen};
use crate::dataplane::{fo_flow, fo_flow_key, key_bytes, Dataplane, PutError, KEY_LEN};
use crate::flow::entry::words_addr;
use crate::flow::{egress_key, ConnId, Direction, FlowClock, TeardownReason, FO_F_CT_REFRESH, FO_F_CT_REPLY};
use crate::policy::nft;
use crate::policy::verdict::{Known, NotOffloaded, Verdict};

use super::now_ns;

mod install;

use install::{forget_key, note_key, Pending};

/// A new offload's first keepalive look (then `flow::next_check`).
const FIRST_LOOK_NS: u64 = 250_000_000;

/// The 4-byte name a connection's memo keeps of its last refusal's text
/// (`Memo::refused`); the texts themselves are the keys of
/// `Counters::not_offloaded`, few and shared.
fn reason_hash(text: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish() as u32
}

/// Why a connection conntrack told of is not on the fast path, for
/// `flows --all`: (code, text).
pub(super) fn slow_reason(
    dormant: bool,
    waiting: bool,
    asleep: bool,
    refused: Option<&(&'static str, String)>,
) -> (&'static str, String) {
    if dormant {
        return (
            "dormant",
            "taken off while alive (idle, or a change of the world); back once the kernel is seen forwarding it".into(),
        );
    }
    if waiting {
        return ("waiting", "waiting for its next hop to resolve".into());
    }
    if asleep {
        return ("asleep", "its flowtable label was cleared; back when the ruleset's `flow add` sets it again".into());
    }
    match refused {
        Some((code, text)) => (code, text.clone()),
        None => ("not_asked", "not sent to offload (no `flow add`, or not eligible yet: e.g. a TCP handshake)".into()),
    }
}

/// Tables smaller than this are not worth compacting (`compact`).
const COMPACT_MIN: usize = 4096;

/// The capacity a table of `len` entries in room for `cap` is rebuilt
/// with, if it is sparse enough to be worth it (`FlowTable::compact`).
fn compacted_capacity(len: usize, cap: usize) -> Option<usize> {
    (cap >= COMPACT_MIN && len < cap / 4).then_some(len * 2)
}

pub(super) struct Offloaded {
    pub entry: CtEntry,
    pub dirs: [Direction; 2],
    pub clock: FlowClock,
    /// Counters of map entries this connection had before a rewrite.
    pub base: [(u64, u64); 2],
    /// What the fast path wrote to each map entry, as keepalive last read
    /// it (only these fields: the rest is `dirs`).
    pub last: [Written; 2],
    /// When keepalive reads its map entries next (`due`).
    pub check_at: u64,
    /// Back from dormant on evidence for one direction only: the other's
    /// egress key is still watched (and the direction held) until the
    /// kernel is seen forwarding one of its own packets.
    watch: Option<Box<Watch>>,
}

/// The fields of a map entry the fast path writes (bpf/flow.h `fo_flow`).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Written {
    pub packets: u64,
    pub bytes: u64,
    pub last_seen_ns: u64,
    pub teardown: u8,
}

impl From<&fo_flow> for Written {
    fn from(v: &fo_flow) -> Self {
        Written { packets: v.packets, bytes: v.bytes, last_seen_ns: v.last_seen_ns, teardown: v.teardown }
    }
}

impl Dataplane {
    /// What the fast path wrote to the entry of `key`, if it is there.
    pub(super) fn get_written(&self, key: &fo_flow_key) -> Option<Written> {
        self.get_flow(key).as_ref().map(Written::from)
    }
}

/// A dormant connection in `--iface` mode, watched by its two egress keys.
struct Dormant {
    entry: CtEntry,
    watch: Watch,
}

/// What TC egress watches for a connection off the fast path: each
/// direction's egress key, and which directions it has seen the kernel
/// forward since `since_ns` (when it slept, or the world last changed).
/// Evidence is per direction: a packet seen leaving one way says nothing
/// about the other (a drop rule may cover one direction only).
#[derive(Debug, Clone, Copy)]
struct Watch {
    keys: [fo_flow_key; 2],
    since_ns: u64,
    proven: [bool; 2],
    /// The direction's route device is above the port it is watched on
    /// (br-lan, wan.7, pppoe-wan not managed themselves): see QUEUE_GRACE_NS.
    grace: [bool; 2],
}

/// How much later than `since_ns` a packet seen leaving a port must be to
/// count, when an unmanaged device above the port lies between the forward
/// and the watcher. A shaper there holds the direction anyway (`hooks`), so
/// what can wait there is a non-shaping qdisc's backlog (pfifo_fast,
/// fq_codel on a ppp, VLAN or bridge device, whose drivers hand every
/// packet straight down and never stop their queue): gone within a qdisc
/// run or a TX softirq, well under this. A managed device's own watcher
/// runs before its qdisc (`fo_below` leaves it the packets it saw).
const QUEUE_GRACE_NS: u64 = 200_000_000;

impl Watch {
    /// Watching the directions `dirs` leave as.
    fn new(dirs: &[Direction; 2]) -> Watch {
        Watch {
            keys: dirs.map(|d| egress_key(&d)),
            since_ns: now_ns(),
            proven: [false, false],
            grace: dirs.map(|d| d.route_ifindex != d.val.out_ifindex),
        }
    }

    /// The directions TC egress stamped after `since_ns` (and the grace).
    fn seen(&self, dp: &Dataplane) -> [bool; 2] {
        [0, 1].map(|i| {
            let after = self.since_ns + if self.grace[i] { QUEUE_GRACE_NS } else { 0 };
            dp.dormant_seen(&self.keys[i]).is_some_and(|t| t > after)
        })
    }

    /// The directions still without evidence.
    fn dormant(&self) -> [bool; 2] {
        self.proven.map(|p| !p)
    }
}

/// Connections not offloaded for one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusals {
    /// `NotOffloaded::code`.
    pub code: &'static str,
    pub connections: u64,
}

#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub offloads: u64,
    pub refreshes: u64,
    /// `keepalive::restore_after_rst`'s conntrack updates.
    pub rst_restores: u64,
    pub teardowns: BTreeMap<&'static str, u64>,
    /// By the reason's text.
    pub not_offloaded: BTreeMap<String, Refusals>,
    /// Event-to-installed times of recent offloads, microseconds.
    pub offload_us: VecDeque<u32>,
}

pub struct FlowTable {
    pub(super) dp: Dataplane,
    /// Request socket: liberal TCP, label clearing, timeout refresh, dumps.
    pub(super) ct: CtSocket,
    /// Dense (see `Offloaded`'s size): a HashMap's table would hold every
    /// entry in a slot of its own, up to half of them empty.
    pub(super) offloaded: IndexMap<ConnId, Offloaded>,
    /// Offloaded connections by the MAC a direction is sent to, so a
    /// neighbour change or a bridge fdb move re-resolves only the
    /// connections through it. By MAC alone: a neighbour message names the
    /// FIB's device (br-lan, wan.7), a direction the port below it (lan1,
    /// eth0) that the topology walk found, and the MAC is the same at both.
    by_hop: HashMap<[u8; 6], HashSet<ConnId>>,
    /// Offloaded connections by when keepalive next looks at them
    /// (`flow::next_check`), so a tick reads only the entries due.
    due: BTreeSet<(u64, ConnId)>,
    waiting: HashMap<ConnId, CtEntry>,
    /// Dense, like `offloaded` (a `Dormant` is 288 bytes).
    dormant: IndexMap<ConnId, Dormant>,
    /// Dormant connections by either direction's egress key.
    dormant_keys: HashMap<[u8; KEY_LEN], ConnId>,
    /// `--nft` mode's dormant connections: their label is cleared, so the
    /// engine does not track them (the ruleset's `flow add` brings them
    /// back as new requests); kept only so `status` can count them.
    asleep: HashSet<ConnId>,
    /// Dense, like `offloaded`: one per connection conntrack told us of.
    memos: IndexMap<ConnId, Memo>,
    /// The ruleset's flowtable label bits: cleared on a policy teardown so
    /// that only the ruleset can bring the connection back.
    label_bits: Vec<u32>,
    pub counters: Counters,
    /// Per-host totals of what ended (`hosts`).
    pub(super) hosts: super::hosts::Hosts,
    /// When the batch of conntrack events (or of wake-ups) being handled
    /// was read.
    pub events_at: Option<Instant>,
    /// Offloads waiting for `flush`, and their ids: anything else done to
    /// one of them (`merge`, `apply`, `teardown`) flushes first, so the
    /// state machine sees each connection's events in order.
    pending: Vec<Pending>,
    pending_ids: HashSet<ConnId>,
    /// Inside `begin_batch` .. `end_batch`: installs wait for `flush`.
    batching: bool,
    /// The keys this table wrote to `fo_flows`, by hash (a count each: two
    /// keys may share one). The engine is the map's only writer, so a key
    /// whose hash is absent is not in the map and may go into a batch
    /// write, which cannot say BPF_NOEXIST; a hash present (a collision,
    /// or its key really taken) goes through the kernel's BPF_NOEXIST.
    keys: HashMap<u64, u32>,
    /// Connections taken off since the engine last looked: they leave the
    /// FIB cache's index (`routes::cache`).
    pub(super) released: Vec<ConnId>,
    /// Label clears decided in a batch, sent with its installs (`flush`).
    clears: Vec<(CtTuple, u16, CtUpdate)>,
    /// Dormant connections fo_dormant had no room for: watched as soon as
    /// it has (`rewatch`), or a burst of new UDP connections larger than
    /// the map would leave the excess with the kernel for good.
    unwatched: Vec<ConnId>,
}

impl FlowTable {
    pub fn new(dp: Dataplane, ct: CtSocket, label_bits: Vec<u32>) -> Self {
        FlowTable {
            dp,
            ct,
            offloaded: IndexMap::new(),
            due: BTreeSet::new(),
            by_hop: HashMap::new(),
            waiting: HashMap::new(),
            dormant: IndexMap::new(),
            dormant_keys: HashMap::new(),
            asleep: HashSet::new(),
            memos: IndexMap::new(),
            label_bits,
            counters: Counters::default(),
            hosts: Default::default(),
            events_at: None,
            pending: Vec::new(),
            pending_ids: HashSet::new(),
            batching: false,
            keys: HashMap::new(),
            released: Vec::new(),
            unwatched: Vec::new(),
            clears: Vec::new(),
        }
    }

    pub fn dp(&self) -> &Dataplane {
        &self.dp
    }

    pub fn dp_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    pub fn set_label_bits(&mut self, bits: Vec<u32>) {
        self.label_bits = bits;
    }

    /// Give back the memory of tables that emptied: a burst of new UDP
    /// connections fills `dormant` (each is watched until its second
    /// packet), a mass close `offloaded`, and a hash table or vector keeps
    /// its largest size until told otherwise (the bench's daemon memory with
    /// 65,536 new one-way UDP connections: 152 MB before, 128 MB settled
    /// with this). Checked every tick, O(1) unless a
    /// table is at most a quarter full; then it is rebuilt at twice its
    /// length, so a table that refills does not shrink and grow in turn.
    pub fn compact(&mut self) {
        fn small<T>(len: usize, cap: usize, shrink: impl FnOnce(usize) -> T) {
            if let Some(n) = compacted_capacity(len, cap) {
                shrink(n);
            }
        }
        small(self.dormant.len(), self.dormant.capacity(), |n| self.dormant.shrink_to(n));
        small(self.dormant_keys.len(), self.dormant_keys.capacity(), |n| self.dormant_keys.shrink_to(n));
        small(self.offloaded.len(), self.offloaded.capacity(), |n| self.offloaded.shrink_to(n));
        small(self.memos.len(), self.memos.capacity(), |n| self.memos.shrink_to(n));
        small(self.waiting.len(), self.waiting.capacity(), |n| self.waiting.shrink_to(n));
        small(self.asleep.len(), self.asleep.capacity(), |n| self.asleep.shrink_to(n));
        small(self.keys.len(), self.keys.capacity(), |n| self.keys.shrink_to(n));
        small(self.pending_ids.len(), self.pending_ids.capacity(), |n| self.pending_ids.shrink_to(n));
        for set in self.by_hop.values_mut() {
            small(set.len(), set.capacity(), |n| set.shrink_to(n));
        }
    }

    /// Every connection conntrack told of that is not offloaded, with why
    /// (`slow_reason`), as (id, code, text).
    pub fn slow_list(&self) -> Vec<(ConnId, &'static str, String)> {
        let texts: HashMap<u32, (&'static str, String)> =
            self.counters.not_offloaded.iter().map(|(t, r)| (reason_hash(t), (r.code, t.clone()))).collect();
        self.memos
            .iter()
            .filter(|(id, _)| !self.offloaded.contains_key(*id))
            .map(|(id, m)| {
                let refused = m.refused.and_then(|h| texts.get(&h));
                let (code, text) = slow_reason(
                    self.dormant.contains_key(id),
                    self.waiting.contains_key(id),
                    self.asleep.contains(id),
                    refused,
                );
                (*id, code, text)
            })
            .collect()
    }

    pub fn len(&self) -> (usize, usize, usize) {
        (self.offloaded.len(), self.waiting.len(), self.dormant.len() + self.asleep.len())
    }

    /// Complete an entry from the connection's memo (see conntrack::merge).
    pub fn merge(&mut self, e: CtEntry, seen: Seen) -> CtEntry {
        let id = ConnId::of(&e);
        self.settle(&id);
        let refused = self.memos.get(&id).and_then(|m| m.refused);
        let (e, mut memo) = merge(e, seen, self.memos.get(&id));
        memo.refused = refused;
        self.memos.insert(id, memo);
        e
    }

    /// An offloaded connection's merged entry `e` that differs from the
    /// stored one only in its timers (`conntrack::merge::only_timers_moved`:
    /// the event of our own refresh, a resync's dump line): conntrack's
    /// deadline taken over, looked at soon only if it moved earlier, and no
    /// verdict (it would be `Update`: eligibility follows the entry, and
    /// changes of the world judge again on their own). Returns whether `e`
    /// was taken so.
    pub fn timers_only(&mut self, e: &CtEntry) -> bool {
        let id = ConnId::of(e);
        let Some(f) = self.offloaded.get_mut(&id) else { return false };
        if !crate::conntrack::merge::only_timers_moved(&f.entry, e) {
            return false;
        }
        (f.entry.timeout, f.entry.counters_orig, f.entry.counters_reply) =
            (e.timeout, e.counters_orig, e.counters_reply);
        let Some(t) = e.timeout else { return true };
        let now = now_ns();
        let expires = now + u64::from(t) * 1_000_000_000;
        let earlier = expires + 1_000_000_000 < f.clock.ct_expires_ns;
        f.clock.ct_expires_ns = expires;
        if earlier {
            let at = f.check_at.min(now + FIRST_LOOK_NS);
            self.schedule(id, at);
        }
        true
    }

    /// What the engine does with `id` now, for the verdict, with the
    /// evidence `prove` recorded.
    pub fn known(&self, id: &ConnId) -> Known {
        if let Some(f) = self.offloaded.get(id) {
            // Read now, not at keepalive's last look: a conntrack event
            // about the close may come first, and RST outranks FIN.
            let close = f.dirs.iter().filter_map(|d| self.dp.get_flow(&d.key)).map(|v| v.teardown).max().unwrap_or(0);
            let dormant = f.watch.as_ref().map_or([false, false], |w| w.dormant());
            Known::Offloaded { mark: f.entry.mark, close: close.into(), dormant }
        } else if let Some(d) = self.dormant.get(id) {
            Known::Dormant { mark: d.entry.mark, woke: d.watch.proven }
        } else if let Some(e) = self.waiting.get(id) {
            Known::Waiting { mark: e.mark }
        } else if self.asleep.contains(id) {
            Known::Asleep
        } else {
            Known::Untracked
        }
    }

    /// The stored entry of a tracked connection.
    pub fn entry(&self, id: &ConnId) -> Option<&CtEntry> {
        self.offloaded
            .get(id)
            .map(|f| &f.entry)
            .or_else(|| self.dormant.get(id).map(|d| &d.entry))
            .or_else(|| self.waiting.get(id))
    }

    pub fn is_offloaded(&self, id: &ConnId) -> bool {
        self.offloaded.contains_key(id)
    }

    pub fn offloaded_ids(&self) -> Vec<ConnId> {
        self.offloaded.keys().copied().collect()
    }

    /// At most `max` of the offloaded connections keepalive must look at by
    /// `now`, the earliest first, taken off the schedule (`schedule` puts
    /// each back): keepalive looks in chunks, so events are read between
    /// them (`keepalive::tick`).
    pub fn due_at_most(&mut self, now: u64, max: usize) -> Vec<ConnId> {
        let mut out = Vec::new();
        while out.len() < max && self.any_due(now) {
            out.extend(self.due.pop_first().map(|(_, id)| id));
        }
        out
    }

    /// Whether a connection is due by `now`.
    pub fn any_due(&self, now: u64) -> bool {
        self.due.first().is_some_and(|&(t, _)| t <= now)
    }

    /// Keepalive looks at offloaded connection `id` next at `at`.
    pub fn schedule(&mut self, id: ConnId, at: u64) {
        let Some(f) = self.offloaded.get_mut(&id) else { return };
        self.due.remove(&(f.check_at, id));
        f.check_at = at;
        self.due.insert((at, id));
    }

    /// Every offloaded connection is due at `now` (the timeouts changed).
    pub fn all_due(&mut self, now: u64) {
        for id in self.offloaded_ids() {
            self.schedule(id, now);
        }
    }

    pub fn waiting_ids(&self) -> Vec<ConnId> {
        self.waiting.keys().copied().collect()
    }

    /// Offloaded connections with a direction sent to `mac`, whichever
    /// device names it: a neighbour that changed its MAC (the kernel's
    /// `neigh_update` makes every route through it use the new one), or a
    /// bridge fdb entry that moved (a direction sent to a client and the
    /// other arriving from it: the port may have changed for both). A MAC
    /// that is a neighbour on two devices costs a re-resolution too many,
    /// never one too few.
    pub fn offloaded_via_mac(&self, mac: [u8; 6]) -> Vec<ConnId> {
        self.by_hop.get(&mac).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    fn index_hops(&mut self, id: ConnId, dirs: &[Direction; 2], add: bool) {
        for d in dirs {
            let hop = d.val.dmac;
            if add {
                self.by_hop.entry(hop).or_default().insert(id);
            } else if let Some(set) = self.by_hop.get_mut(&hop) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_hop.remove(&hop);
                }
            }
        }
    }

    /// Offloaded connections that enter or leave through `ifindex`.
    pub fn offloaded_via(&self, ifindex: u32) -> Vec<ConnId> {
        self.offloaded
            .iter()
            .filter(|(_, f)| f.dirs.iter().any(|d| d.key.ifindex == ifindex || d.val.out_ifindex == ifindex))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The watch of a connection off the fast path, or of an offloaded one
    /// with a direction still dormant.
    fn watch_of(&self, id: &ConnId) -> Option<&Watch> {
        self.dormant.get(id).map(|d| &d.watch).or_else(|| self.offloaded.get(id)?.watch.as_deref())
    }

    /// Connections with new evidence: directions TC egress saw the kernel
    /// forward since they slept (or since the last change of the world,
    /// see `discount_wakes`) that were not proven yet, per connection
    /// (original, reply); among those TC egress announced (`keys`) or,
    /// with `None`, all watched. Record it with `prove`.
    pub fn woken(&self, keys: Option<&[fo_flow_key]>) -> Vec<(ConnId, [bool; 2])> {
        // Two map reads per connection (its two stamps), once: a burst of
        // new UDP connections wakes thousands at a time.
        let fresh = |w: &Watch| {
            let seen = w.seen(&self.dp);
            [0, 1].map(|i| seen[i] && !w.proven[i])
        };
        let mut found: Vec<(ConnId, [bool; 2])> = match keys {
            None => {
                let mut ids: Vec<ConnId> = self.dormant_keys.values().copied().collect();
                ids.sort_unstable();
                ids.dedup();
                ids.into_iter().filter_map(|id| Some((id, fresh(self.watch_of(&id)?)))).collect()
            }
            Some(keys) => {
                let mut seen: HashMap<ConnId, [bool; 2]> = HashMap::with_capacity(keys.len());
                for k in keys {
                    let Some(id) = self.dormant_keys.get(&key_bytes(k)) else { continue };
                    let Some(w) = self.watch_of(id) else { continue };
                    let ev = *seen.entry(*id).or_insert_with(|| fresh(w));
                    // Announced but stamped no later than it slept (the
                    // same coarse-clock tick): re-arm, or the next packet
                    // would not be announced.
                    let i = usize::from(key_bytes(&w.keys[1]) == key_bytes(k));
                    if !ev[i] && !w.proven[i] {
                        let _ = self.dp.watch_dormant(k);
                    }
                }
                seen.into_iter().collect()
            }
        };
        found.retain(|(_, ev)| *ev != [false, false]);
        found.sort_unstable_by_key(|(id, _)| *id);
        found
    }

    /// Record evidence `ev` (from `woken`) for `id`. An offloaded
    /// connection's direction proven stops being watched. Returns whether
    /// anything changed (the connection must then be judged again).
    pub fn prove(&mut self, id: &ConnId, ev: [bool; 2]) -> bool {
        let (w, offloaded) = match (self.dormant.get_mut(id), self.offloaded.get_mut(id)) {
            (Some(d), _) => (&mut d.watch, false),
            (None, Some(Offloaded { watch: Some(w), .. })) => (&mut **w, true),
            _ => return false,
        };
        let new = [0, 1].map(|i| ev[i] && !w.proven[i]);
        if new == [false, false] {
            return false;
        }
        w.proven = [0, 1].map(|i| w.proven[i] || ev[i]);
        if offloaded {
            let (keys, all) = (w.keys, w.proven == [true, true]);
            for (k, _) in keys.iter().zip(new).filter(|(_, n)| *n) {
                self.unwatch(k);
            }
            if all {
                if let Some(f) = self.offloaded.get_mut(id) {
                    f.watch = None;
                }
            }
        }
        true
    }

    fn unwatch(&mut self, k: &fo_flow_key) {
        self.dp.unwatch_dormant(k);
        self.dormant_keys.remove(&key_bytes(k));
        self.dp.set_watching(self.dormant_keys.len());
    }

    /// The world changed (routes, neighbours, links, the ruleset): a packet
    /// the kernel forwarded before the change says nothing about what it
    /// does with the connection now, so it no longer counts as evidence.
    /// A dormant connection's evidence is forgotten; an offloaded one's
    /// dormant directions must find theirs anew.
    pub fn discount_wakes(&mut self) {
        let now = now_ns();
        let watches = self
            .dormant
            .values_mut()
            .map(|d| {
                d.watch.proven = [false, false];
                &mut d.watch
            })
            .chain(self.offloaded.values_mut().filter_map(|f| f.watch.as_deref_mut()));
        for w in watches {
            w.since_ns = now;
            // Re-arm the first-packet notification.
            for (k, _) in w.keys.iter().zip(w.proven).filter(|(_, p)| !p) {
                let _ = self.dp.watch_dormant(k);
            }
        }
    }

    /// Apply a verdict about connection `e`.
    pub fn apply(&mut self, e: CtEntry, v: Verdict) {
        let id = ConnId::of(&e);
        self.settle(&id);
        match v {
            Verdict::Ignore => {}
            // The engine resolves the path before applying; reaching here
            // means it did not, so nothing changes.
            Verdict::NeedsPath => tracing::debug!(%id, "verdict applied without a path"),
            Verdict::NotYet(_) => {
                self.waiting.remove(&id);
            }
            Verdict::Update => {
                if let Some(f) = self.offloaded.get_mut(&id) {
                    // Conntrack's own word on when the entry expires (a
                    // slow-path packet or our refresh set it).
                    if let Some(t) = e.timeout {
                        f.clock.ct_expires_ns = now_ns() + u64::from(t) * 1_000_000_000;
                    }
                    f.entry = e;
                    // Its deadline may have moved: look soon, then plan anew.
                    let at = f.check_at.min(now_ns() + FIRST_LOOK_NS);
                    self.schedule(id, at);
                } else if let Some(d) = self.dormant.get_mut(&id) {
                    d.entry = e;
                } else if let Some(w) = self.waiting.get_mut(&id) {
                    *w = e;
                }
            }
            Verdict::Wait(why) => {
                tracing::trace!(%id, %why, "waiting");
                // A dormant connection waits with its evidence (`known`
                // still says dormant): what it proved decides its holds.
                self.waiting.insert(id, e);
            }
            Verdict::Offload(dirs) if self.offloaded.contains_key(&id) => {
                let dirs = self.keepalive_flags(&e, dirs);
                self.repath(&id, dirs)
            }
            Verdict::Offload(dirs) => {
                let dirs = self.keepalive_flags(&e, dirs);
                self.install(id, e, dirs)
            }
            Verdict::Watch(dirs) => {
                self.waiting.remove(&id);
                match self.dormant.get_mut(&id) {
                    // Watched already: its watch and evidence stand.
                    Some(d) => d.entry = e,
                    None => self.sleep(id, e, &dirs),
                }
            }
            Verdict::Teardown(r) => self.teardown(&id, r),
            Verdict::NotOffloaded(why) => {
                self.waiting.remove(&id);
                self.wake(&id);
                self.not_offloaded(&id, why);
            }
        }
    }

    /// Count `id` under `why`, once: the same reason again (every update
    /// event of a connection that stays excluded) is not another refusal.
    pub fn not_offloaded(&mut self, id: &ConnId, why: NotOffloaded) {
        let text = why.to_string();
        let h = reason_hash(&text);
        if let Some(m) = self.memos.get_mut(id) {
            if m.refused == Some(h) {
                return;
            }
            m.refused = Some(h);
        }
        let r = self.counters.not_offloaded.entry(text).or_insert(Refusals { code: why.code(), connections: 0 });
        r.connections += 1;
    }

    /// Stop watching a dormant connection.
    fn wake(&mut self, id: &ConnId) {
        self.asleep.remove(id);
        if let Some(d) = self.dormant.swap_remove(id) {
            self.unwatch_all(&d.watch);
        }
    }

    /// Stop watching every key `w` still watches.
    fn unwatch_all(&mut self, w: &Watch) {
        for k in &w.keys {
            if self.dormant_keys.remove(&key_bytes(k)).is_some() {
                self.dp.unwatch_dormant(k);
            }
        }
        self.dp.set_watching(self.dormant_keys.len());
    }

    /// A dormant connection is installed again (`installed`): the
    /// directions proven stop being watched; one still dormant keeps its
    /// watch (and its hold, from the verdict) into the offload.
    fn carry_watch(&mut self, id: &ConnId) -> Option<Box<Watch>> {
        let w = self.dormant.swap_remove(id)?.watch;
        if w.proven == [true, true] {
            self.unwatch_all(&w);
            return None;
        }
        for (k, _) in w.keys.iter().zip(w.proven).filter(|(_, p)| *p) {
            self.dp.unwatch_dormant(k);
            self.dormant_keys.remove(&key_bytes(k));
        }
        self.dp.set_watching(self.dormant_keys.len());
        // Stamps up to now were looked at: re-arm so the next is announced.
        for (k, _) in w.keys.iter().zip(w.proven).filter(|(_, p)| !p) {
            let _ = self.dp.watch_dormant(k);
        }
        Some(Box::new(w))
    }

    /// Park a connection that is still alive (taken off the fast path, or
    /// not offloaded yet: `Verdict::Watch`): it comes back only on evidence
    /// that the kernel forwarded a packet of it again. In `--nft` mode that
    /// is its label set anew by `flow add`, so the label is cleared and the
    /// connection untracked but for `asleep`; otherwise TC egress watches
    /// for its packets leaving by `dirs`.
    fn sleep(&mut self, id: ConnId, entry: CtEntry, dirs: &[Direction; 2]) {
        if !self.label_bits.is_empty() {
            self.forget_offload_request(&entry);
            self.asleep.insert(id);
            return;
        }
        let watch = Watch::new(dirs);
        let mut full = false;
        for k in &watch.keys {
            if let Err(e) = self.dp.watch_dormant(k) {
                // fo_dormant is full: the connection stays with the kernel
                // until `rewatch` finds room (said once per episode).
                if self.unwatched.is_empty() {
                    tracing::warn!("cannot watch dormant connections, the kernel keeps them until there is room: {e}");
                }
                full = true;
            }
            self.dormant_keys.insert(key_bytes(k), id);
        }
        if full {
            self.unwatched.push(id);
        }
        self.dp.set_watching(self.dormant_keys.len());
        self.dormant.insert(id, Dormant { entry, watch });
    }

    /// Watch up to `max` of the dormant connections fo_dormant had no room
    /// for, oldest first, until it is full again. Their evidence counts
    /// from when they slept: the watch stamps only packets from now on.
    pub fn rewatch(&mut self, max: usize) {
        let mut done = 0;
        while done < self.unwatched.len().min(max) {
            let id = self.unwatched[done];
            let Some(d) = self.dormant.get(&id) else {
                done += 1;
                continue;
            };
            let missing: Vec<fo_flow_key> =
                d.watch.keys.iter().filter(|k| self.dp.dormant_seen(k).is_none()).copied().collect();
            if missing.iter().any(|k| self.dp.watch_dormant(k).is_err()) {
                break;
            }
            done += 1;
        }
        self.unwatched.drain(..done);
    }

    /// How many dormant connections wait for room in fo_dormant.
    pub fn unwatched(&self) -> usize {
        self.unwatched.len()
    }

    /// Who keeps `e`'s conntrack entry alive: the fast path as it forwards
    /// (FO_F_CT_REFRESH, FO_F_CT_REPLY on conntrack's reply direction,
    /// `dirs[1]`) where it has the kfuncs and can name the entry (zone 0:
    /// 6.1's lookup options have no zone), else keepalive over ctnetlink.
    fn keepalive_flags(&self, e: &CtEntry, mut dirs: [Direction; 2]) -> [Direction; 2] {
        if self.dp.fast_keepalive() && e.zone == 0 {
            dirs[0].val.flags |= FO_F_CT_REFRESH;
            dirs[1].val.flags |= FO_F_CT_REFRESH | FO_F_CT_REPLY;
        }
        dirs
    }

    /// An offloaded connection's path was resolved again: rewrite the map
    /// entries that changed, keeping counters, stamps and the close flag.
    fn repath(&mut self, id: &ConnId, new: [Direction; 2]) {
        let Some(old) = self.offloaded.get(id).map(|f| f.dirs) else { return };
        self.index_hops(*id, &old, false);
        self.rewrite(id, new);
        let now = self.offloaded.get(id).map(|f| f.dirs).unwrap_or(old);
        self.index_hops(*id, &now, true);
    }

    fn rewrite(&mut self, id: &ConnId, new: [Direction; 2]) {
        let mut collided = false;
        let Some(f) = self.offloaded.get_mut(id) else { return };
        for (i, nd) in new.iter().enumerate() {
            let old = &f.dirs[i];
            let moved = key_bytes(&old.key) != key_bytes(&nd.key);
            if !moved
                && old.val.out_ifindex == nd.val.out_ifindex
                && old.val.dmac == nd.val.dmac
                && old.val.smac == nd.val.smac
                && old.val.in_dmac == nd.val.in_dmac
                && old.val.in_smac == nd.val.in_smac
                && old.val.out_pcp == nd.val.out_pcp
                && old.encap().1 == nd.encap().1
                && old.val.mtu == nd.val.mtu
                && old.val.flags == nd.val.flags
                && old.val.hold == nd.val.hold
            {
                // The map entry stands; the route's device may not (xfrm
                // selectors and the wake-up watch read it).
                f.dirs[i].route_ifindex = nd.route_ifindex;
                continue;
            }
            // What the fast path wrote since keepalive last looked (a FIN or
            // RST's flag, the stamp, the counters), read before the entry
            // can go.
            let cur = self.dp.get_written(&old.key).unwrap_or(f.last[i]);
            if moved {
                // Arrives elsewhere now (another port, other headers):
                // replace the entry.
                self.dp.delete_flow(&old.key);
                forget_key(&mut self.keys, &old.key);
            }
            f.base[i].0 += cur.packets;
            f.base[i].1 += cur.bytes;
            let mut v = nd.val;
            v.last_seen_ns = cur.last_seen_ns;
            v.teardown = cur.teardown;
            // Same key: our own entry, rewritten in place. A new key (it
            // arrives elsewhere now) must not take another connection's.
            let put = if !moved { self.dp.replace_flow(&nd.key, &v) } else { self.dp.put_flow(&nd.key, &v) };
            if let Err(err) = put {
                tracing::warn!(%id, "re-pointing: {err}");
                collided |= err == PutError::KeyTaken;
                continue;
            }
            if moved {
                note_key(&mut self.keys, &nd.key);
            }
            f.dirs[i] = Direction { key: nd.key, val: nd.val, route_ifindex: nd.route_ifindex };
            f.last[i] = Written::from(&v);
        }
        if collided {
            self.not_offloaded(id, NotOffloaded::KeyCollision);
        }
    }

    /// The offloaded connection one of whose map keys is `k`: the original
    /// direction's key is conntrack's original tuple; the reply
    /// direction's rewrite is that tuple reversed (`flow::build_direction`).
    pub(super) fn conn_of_key(&self, k: &fo_flow_key) -> Option<ConnId> {
        let id = |src, dst, sport: u16, dport: u16| ConnId {
            src: words_addr(k.family, src),
            dst: words_addr(k.family, dst),
            proto: k.proto,
            sport: u16::from_be(sport),
            dport: u16::from_be(dport),
            zone: 0,
        };
        let is =
            |id: &ConnId, i: usize| self.offloaded.get(id).is_some_and(|f| key_bytes(&f.dirs[i].key) == key_bytes(k));
        let orig = id(&k.saddr, &k.daddr, k.sport, k.dport);
        if is(&orig, 0) {
            return Some(orig);
        }
        let v = self.dp.get_flow(k)?;
        let orig = id(&v.new_daddr, &v.new_saddr, v.new_dport, v.new_sport);
        is(&orig, 1).then_some(orig)
    }

    /// Take a connection off the fast path (or stop waiting for or
    /// watching it). Connections still alive in conntrack after an idle
    /// period, a route change or a link going down come back once the
    /// kernel forwards a packet of theirs again (`sleep`); after a policy
    /// change only the ruleset can bring them back.
    pub fn teardown(&mut self, id: &ConnId, reason: TeardownReason) {
        self.settle(id);
        self.asleep.remove(id);
        // Offloaded or not: an install that failed was indexed too.
        self.released.push(*id);
        let entry = if let Some(f) = self.offloaded.swap_remove(id) {
            self.due.remove(&(f.check_at, *id));
            self.index_hops(*id, &f.dirs, false);
            // What the fast path carried for it, read before the entries go:
            // per-host accounting keeps it (`hosts`).
            let carried = [0, 1].map(|i| {
                let w = self.dp.get_written(&f.dirs[i].key).unwrap_or(f.last[i]);
                (f.base[i].0 + w.packets, f.base[i].1 + w.bytes)
            });
            self.hosts.retire(&f.entry, carried);
            for d in &f.dirs {
                self.dp.delete_flow(&d.key);
                forget_key(&mut self.keys, &d.key);
            }
            *self.counters.teardowns.entry(reason.as_str()).or_default() += 1;
            tracing::debug!(%id, reason = reason.as_str(), "teardown");
            if let Some(w) = &f.watch {
                self.unwatch_all(w);
            }
            if matches!(
                reason,
                TeardownReason::Idle
                    | TeardownReason::RouteChange
                    | TeardownReason::InterfaceDown
                    | TeardownReason::RulesetChange
            ) {
                self.sleep(*id, f.entry, &f.dirs);
                return;
            }
            f.entry
        } else if let Some(d) = self.dormant.get(id) {
            let e = d.entry.clone();
            self.wake(id);
            e
        } else if let Some(e) = self.waiting.remove(id) {
            e
        } else {
            return;
        };
        if reason == TeardownReason::Policy {
            self.forget_offload_request(&entry);
        }
    }

    /// The conntrack entry is gone.
    pub fn destroyed(&mut self, id: &ConnId) {
        self.teardown(id, TeardownReason::ConntrackDestroyed);
        self.memos.swap_remove(id);
    }

    /// After a full dump: forget every connection it did not list.
    pub fn retain_present(&mut self, present: &HashSet<ConnId>) {
        let gone: Vec<ConnId> = self.offloaded.keys().filter(|id| !present.contains(id)).copied().collect();
        for id in gone {
            self.teardown(&id, TeardownReason::ConntrackDestroyed);
        }
        self.waiting.retain(|id, _| present.contains(id));
        self.asleep.retain(|id| present.contains(id));
        let gone: Vec<ConnId> = self.dormant.keys().filter(|id| !present.contains(id)).copied().collect();
        gone.iter().for_each(|id| self.wake(id));
        self.memos.retain(|id, _| present.contains(id));
    }

    /// The nftables ruleset changed (anyone's change): every offloaded
    /// connection goes back through the kernel's new rules, parked like an
    /// idle one, so it returns only on evidence that they forward it (its
    /// packet seen leaving, or in `--nft` mode `flow add` labelling it
    /// again). Returns how many were offloaded.
    pub fn send_back_through_new_rules(&mut self) -> usize {
        let ids = self.offloaded_ids();
        for id in &ids {
            self.teardown(id, TeardownReason::RulesetChange);
        }
        ids.len()
    }

    /// A new ruleset: every connection goes back through it; returns how
    /// many were offloaded.
    pub fn send_all_back(&mut self) -> usize {
        let ids = self.offloaded_ids();
        let n = ids.len();
        for id in ids {
            self.teardown(&id, TeardownReason::Policy);
        }
        let dormant: Vec<ConnId> = self.dormant.keys().copied().collect();
        for id in dormant {
            self.teardown(&id, TeardownReason::Policy);
        }
        let waiting = self.waiting_ids();
        for id in waiting {
            self.teardown(&id, TeardownReason::Policy);
        }
        n
    }

    /// Clear our label bits on the conntrack entry.
    pub fn forget_offload_request(&mut self, e: &CtEntry) {
        if self.label_bits.is_empty() {
            return;
        }
        let mask = nft::label_mask(&self.label_bits);
        // Events already queued may carry no labels (they only do when
        // labels change) and would otherwise be completed with the old ones.
        let memo = self.memos.entry(ConnId::of(e)).or_insert_with(|| Memo::of(e));
        let mut now = memo.labels.or(e.labels).unwrap_or_default();
        for (b, m) in now.iter_mut().zip(mask) {
            *b &= !m;
        }
        memo.labels = Some(now);
        let upd = CtUpdate { labels: Some(([0u8; 16], mask)), ..Default::default() };
        // Within a batch of events (every new UDP connection is watched,
        // so a burst of them is many): with the batch's other conntrack
        // changes, in one send (`flush`).
        if self.batching {
            self.clears.push((e.orig, e.zone, upd));
            return;
        }
        label_cleared(self.ct.update(&e.orig, e.zone, &upd));
    }
}

/// How clearing an offload label went.
fn label_cleared(r: Result<(), CtError>) {
    match r {
        Ok(()) | Err(CtError::NotFound) => {}
        Err(err) => tracing::warn!("cannot clear the offload label: {err}"),
    }
}

/// The state machine against real maps: a private network namespace, the
/// fast path loaded (not attached), conntrack's request socket. UDP entries,
/// so no conntrack entry has to exist for an install. Needs root (CI is).
#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn only_sparse_big_tables_are_compacted() {
        let cases = [
            // (len, capacity, rebuilt with)
            (0, 100_000, Some(0)),    // a burst's watch, drained
            (1000, 8192, Some(2000)), // under a quarter: twice its length
            (2048, 8192, None),       // a quarter full: left alone
            (10, 4095, None),         // small tables are not worth it
            (65_536, 131_072, None),  // half full after growing: left
        ];
        for (len, cap, want) in cases {
            assert_eq!(compacted_capacity(len, cap), want, "len {len} cap {cap}");
        }
    }
    use crate::conntrack::{status, CtTuple};
    use crate::dataplane::fo_teardown;
    use crate::flow::{build_direction, NextHop};
    use crate::proto::IPPROTO_TCP;

    const LO: u32 = 1;

    /// `bits`: the ruleset's label bits (`--nft` mode), none for `--iface`.
    fn private_table(bits: Vec<u32>) -> FlowTable {
        // SAFETY: affects only this test's thread.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET) needs root");
        let dp = Dataplane::load(64).expect("loading the fast path (needs root, BPF and BTF)");
        let ct = CtSocket::request().expect("conntrack request socket");
        FlowTable::new(dp, ct, bits)
    }

    fn udp(sport: u16) -> CtEntry {
        let t = |s: &str, sp, d: &str, dp| CtTuple {
            src: s.parse::<IpAddr>().unwrap(),
            dst: d.parse::<IpAddr>().unwrap(),
            proto: 17,
            sport: sp,
            dport: dp,
        };
        CtEntry {
            orig: t("192.168.1.2", sport, "203.0.113.2", 53),
            reply: t("203.0.113.2", 53, "203.0.113.1", sport),
            status: status::CONFIRMED,
            tcp_state: None,
            ..crate::flow::tests::tcp_masq()
        }
    }

    /// A next hop on lo with MAC 02:00:00:00:00:`dmac`.
    fn hop(dmac: u8) -> NextHop {
        NextHop { ifindex: LO, smac: [2, 0, 0, 0, 0, 1], dmac: [2, 0, 0, 0, 0, dmac], mtu: 1500, xdp_ok: false }
    }

    fn dirs(e: &CtEntry, dmac: u8) -> [Direction; 2] {
        [build_direction(&e.orig, &e.reply, LO, &hop(dmac)), build_direction(&e.reply, &e.orig, LO, &hop(dmac))]
    }

    /// A UDP frame on lo (the Ethernet addresses are lo's, zero).
    fn frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else { unreachable!() };
        let mut f = vec![0u8; 12];
        f.extend([0x08, 0x00]);
        f.extend([0x45, 0, 0, 36, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend(s.octets());
        f.extend(d.octets());
        f.extend(sport.to_be_bytes());
        f.extend(dport.to_be_bytes());
        f.extend([0, 16, 0, 0]);
        f.extend([0u8; 8]);
        f
    }

    #[test]
    fn install_repoint_sleep_wake_forget() {
        let mut ft = private_table(vec![]);
        let e = udp(40000);
        let id = ConnId::of(&e);
        let d = dirs(&e, 2);

        ft.apply(e.clone(), Verdict::Offload(d));
        assert_eq!(ft.len(), (1, 0, 0));
        assert!(matches!(ft.known(&id), Known::Offloaded { close: 0, .. }));
        assert!(d.iter().all(|x| ft.dp().get_flow(&x.key).is_some()), "both directions installed");
        assert_eq!(ft.counters.offloads, 1);

        // Re-pointed: the changed next hop is written, the entry stays.
        ft.apply(e.clone(), Verdict::Offload(dirs(&e, 3)));
        assert_eq!(ft.dp().get_flow(&d[0].key).unwrap().dmac[5], 3);
        assert_eq!(ft.counters.offloads, 1, "a re-point is no new offload");
        // Found by the MAC it is sent to now, whatever device a neighbour
        // message names.
        assert_eq!((ft.offloaded_via_mac(hop(2).dmac), ft.offloaded_via_mac(hop(3).dmac)), (vec![], vec![id]));

        // Idle: off the fast path, watched as dormant.
        ft.teardown(&id, TeardownReason::Idle);
        assert_eq!(ft.len(), (0, 0, 1));
        assert!(d.iter().all(|x| ft.dp().get_flow(&x.key).is_none()));
        assert_eq!(ft.dp().dormant_seen(&egress_key(&d[0])), Some(0), "watched as it would leave");
        assert!(ft.woken(None).is_empty(), "no packet yet");

        let mut wake = ft.dp().wake_events().unwrap();
        // Stamps are coarse-clock (a jiffy): a packet counts when it comes
        // after the connection slept.
        std::thread::sleep(std::time::Duration::from_millis(20));
        // A packet arriving is no evidence: the kernel may still drop it.
        let (verdict, _, _) = ft.dp().test_tc(&frame(e.orig.src, e.orig.dst, 40000, 53), LO, None, 1).unwrap();
        assert_eq!(verdict, -1, "a dormant connection's packet goes to the kernel (TC_ACT_UNSPEC)");
        assert!(wake.drain().is_empty() && ft.woken(None).is_empty(), "arrival wakes nothing");
        // The same packet leaving, after the kernel's NAT, is.
        let (verdict, _, _) = ft.dp().test_tc_egress(&frame(e.reply.dst, e.reply.src, 40000, 53), LO, 1).unwrap();
        assert_eq!(verdict, -1, "the egress watcher lets every packet go");
        let keys = wake.drain();
        assert_eq!(keys.len(), 1, "announced once");
        // Evidence for the original direction only.
        assert_eq!(ft.woken(Some(&keys)), vec![(id, [true, false])]);
        assert_eq!(ft.woken(None), vec![(id, [true, false])]);

        // A route change voids that evidence and re-arms the watch.
        ft.discount_wakes();
        assert!(ft.woken(None).is_empty());

        // Waking into "not offloaded" forgets it and counts the reason.
        ft.apply(e.clone(), Verdict::NotOffloaded(NotOffloaded::TableFull));
        assert_eq!(ft.len(), (0, 0, 0));
        assert_eq!(ft.dp().dormant_seen(&egress_key(&d[0])), None, "no longer watched");
        assert_eq!(
            ft.counters.not_offloaded.get("flow table full").map(|r| (r.code, r.connections)),
            Some(("table_full", 1))
        );
        assert!(matches!(ft.known(&id), Known::Untracked));
    }

    /// A UDP connection from `sport` offloaded, then parked for `why`, a
    /// coarse-clock tick ago (so a stamp now postdates it); its egress keys.
    fn parked(
        ft: &mut FlowTable,
        sport: u16,
        why: TeardownReason,
    ) -> (CtEntry, ConnId, [Direction; 2], [fo_flow_key; 2]) {
        let e = udp(sport);
        let id = ConnId::of(&e);
        let d = dirs(&e, 2);
        ft.apply(e.clone(), Verdict::Offload(d));
        ft.teardown(&id, why);
        std::thread::sleep(std::time::Duration::from_millis(20));
        (e, id, d, d.map(|x| egress_key(&x)))
    }

    /// Evidence is per direction: a packet of the reply seen leaving brings
    /// the connection back with the original direction still held and
    /// watched; that direction's own packet seen leaving releases it. A
    /// teardown stops every watch.
    #[test]
    fn each_direction_needs_its_own_evidence() {
        let mut ft = private_table(vec![]);
        let (e, id, d, k) = parked(&mut ft, 40013, TeardownReason::RulesetChange);
        // The server's packet to the client leaves: the reply's evidence.
        ft.dp().test_mark_dormant(&k[1], now_ns());
        assert_eq!(ft.woken(Some(&[k[1]])), vec![(id, [false, true])]);
        assert!(ft.prove(&id, [false, true]));
        assert!(!ft.prove(&id, [false, true]), "nothing new");
        assert!(matches!(ft.known(&id), Known::Dormant { woke: [false, true], .. }));
        // The verdict holds the original direction (`Hold::Dormant`).
        let mut held = d;
        held[0].set_hold(Some(crate::flow::Hold::Dormant));
        ft.apply(e.clone(), Verdict::Offload(held));
        assert!(matches!(ft.known(&id), Known::Offloaded { dormant: [true, false], .. }));
        assert_eq!(ft.dp().dormant_seen(&k[0]), Some(0), "the original direction is still watched, re-armed");
        assert_eq!(ft.dp().dormant_seen(&k[1]), None, "the reply's watch ended");
        assert!(ft.woken(None).is_empty());
        // Its own packet seen leaving: proven.
        std::thread::sleep(std::time::Duration::from_millis(20));
        ft.dp().test_mark_dormant(&k[0], now_ns());
        assert_eq!(ft.woken(Some(&[k[0]])), vec![(id, [true, false])]);
        assert!(ft.prove(&id, [true, false]));
        assert!(matches!(ft.known(&id), Known::Offloaded { dormant: [false, false], .. }));
        assert_eq!(ft.dp().dormant_seen(&k[0]), None, "no longer watched");

        // Again, and a teardown while one direction is watched ends it.
        ft.teardown(&id, TeardownReason::Idle);
        std::thread::sleep(std::time::Duration::from_millis(20));
        ft.dp().test_mark_dormant(&k[1], now_ns());
        let ev = ft.woken(None);
        assert_eq!(ev, vec![(id, [false, true])]);
        ft.prove(&id, ev[0].1);
        ft.apply(e.clone(), Verdict::Offload(held));
        ft.teardown(&id, TeardownReason::Policy);
        assert!(k.iter().all(|k| ft.dp().dormant_seen(k).is_none()), "nothing watched");
        assert_eq!(ft.len(), (0, 0, 0));
    }

    /// A change of the world voids the evidence a dormant connection
    /// gathered before it.
    #[test]
    fn a_change_voids_evidence_gathered_before_it() {
        let mut ft = private_table(vec![]);
        let (_, id, _, k) = parked(&mut ft, 40014, TeardownReason::Idle);
        ft.dp().test_mark_dormant(&k[0], now_ns());
        let ev = ft.woken(None);
        ft.prove(&id, ev[0].1);
        assert!(matches!(ft.known(&id), Known::Dormant { woke: [true, false], .. }));
        ft.discount_wakes();
        assert!(matches!(ft.known(&id), Known::Dormant { woke: [false, false], .. }), "forgotten");
        assert!(ft.woken(None).is_empty(), "the stamp predates the change");
        assert_eq!(ft.dp().dormant_seen(&k[0]), Some(0), "re-armed");
    }

    /// A connection slept while fo_dormant is full is watched once there is
    /// room, not left with the kernel for good.
    #[test]
    fn a_connection_slept_while_the_watch_is_full_is_watched_when_room_frees() {
        let mut ft = private_table(vec![]);
        // Fill fo_dormant with keys of no connection.
        let filler = |i: u32| fo_flow_key { ifindex: 1000 + i, family: 2, proto: 17, ..Default::default() };
        let mut n = 0;
        while ft.dp().watch_dormant(&filler(n)).is_ok() {
            n += 1;
        }
        let e = udp(40060);
        let d = dirs(&e, 2);
        ft.apply(e.clone(), Verdict::Watch(d));
        let keys = d.map(|x| egress_key(&x));
        assert_eq!((ft.unwatched(), ft.dp().dormant_seen(&keys[0])), (1, None), "no room: not watched");
        ft.rewatch(16);
        assert_eq!(ft.unwatched(), 1, "still no room");
        for i in 0..2 {
            ft.dp().unwatch_dormant(&filler(i));
        }
        ft.rewatch(16);
        assert_eq!(ft.unwatched(), 0);
        assert!(keys.iter().all(|k| ft.dp().dormant_seen(k) == Some(0)), "both directions watched");
        for i in 2..n {
            ft.dp().unwatch_dormant(&filler(i));
        }
    }

    /// Where the fast path has the conntrack kfuncs (this kernel), it keeps
    /// a zone-0 connection's entry alive: both directions flagged, the
    /// reply marked as conntrack's; a connection in another zone, which
    /// 6.1's lookup cannot name, is left to keepalive over ctnetlink.
    #[test]
    fn the_fast_path_keeps_zone_0_entries_alive() {
        let mut ft = private_table(vec![]);
        assert!(ft.dp().fast_keepalive(), "this kernel has the conntrack kfuncs");
        let flags = |ft: &FlowTable, d: &[Direction; 2]| d.map(|x| ft.dp().get_flow(&x.key).unwrap().flags);
        let e = udp(40050);
        let d = dirs(&e, 2);
        ft.apply(e.clone(), Verdict::Offload(d));
        let both = FO_F_CT_REFRESH | FO_F_CT_REPLY;
        assert_eq!(flags(&ft, &d).map(|f| f & both), [FO_F_CT_REFRESH, both]);
        // A re-point keeps them.
        ft.apply(e.clone(), Verdict::Offload(dirs(&e, 3)));
        assert_eq!(flags(&ft, &d).map(|f| f & both), [FO_F_CT_REFRESH, both]);
        let z = CtEntry { zone: 5, ..udp(40051) };
        let dz = dirs(&z, 2);
        ft.apply(z, Verdict::Offload(dz));
        assert_eq!(flags(&ft, &dz).map(|f| f & both), [0, 0]);
    }

    /// A re-point that moves a direction's key (the client roamed to
    /// another port, a VLAN or PPPoE session changed) keeps what the fast
    /// path wrote to the old entry since keepalive last read it: its
    /// FIN/RST flag, last-seen stamp and counters.
    #[test]
    fn a_moved_key_keeps_the_close_flag_stamp_and_counters() {
        let mut ft = private_table(vec![]);
        let e = udp(40030);
        let id = ConnId::of(&e);
        let d = dirs(&e, 2);
        ft.apply(e.clone(), Verdict::Offload(d));
        // What the fast path writes per packet (bpf/fastpath.bpf.c):
        // counters, the stamp, and a FIN or RST's teardown code.
        let mut v = ft.dp().get_flow(&d[0].key).unwrap();
        (v.packets, v.bytes, v.last_seen_ns, v.teardown) = (5, 500, 123_456_789, fo_teardown::FO_TD_RST.0 as u8);
        ft.dp().replace_flow(&d[0].key, &v).unwrap();

        // The original direction now arrives on another port: a new key.
        let moved = [build_direction(&e.orig, &e.reply, 7, &hop(2)), d[1]];
        assert_ne!(key_bytes(&moved[0].key), key_bytes(&d[0].key));
        ft.apply(e.clone(), Verdict::Offload(moved));
        assert!(ft.dp().get_flow(&d[0].key).is_none(), "the old key is gone");
        let now = ft.dp().get_flow(&moved[0].key).expect("the new key is installed");
        // (close flag, last-seen, counters before the move)
        let kept = (now.teardown, now.last_seen_ns, ft.offloaded[&id].base[0]);
        assert_eq!(kept, (fo_teardown::FO_TD_RST.0 as u8, 123_456_789, (5, 500)), "what the fast path wrote is kept");
        assert!(matches!(ft.known(&id), Known::Offloaded { close, .. } if close == fo_teardown::FO_TD_RST.0));
    }

    /// A UDP connection the kernel has handled only the first packet of is
    /// watched, not offloaded: in `--iface` mode by its egress keys, and a
    /// packet of it leaving wakes it; in `--nft` mode its label is cleared
    /// (with the batch's other conntrack changes) and it is asleep.
    #[test]
    fn a_watched_connection_is_offloaded_on_its_next_forwarded_packet() {
        let mut ft = private_table(vec![]);
        let e = udp(40040);
        let id = ConnId::of(&e);
        let d = dirs(&e, 2);
        ft.apply(e.clone(), Verdict::Watch(d));
        assert_eq!(ft.len(), (0, 0, 1));
        assert!(d.iter().all(|x| ft.dp().get_flow(&x.key).is_none()), "not on the fast path");
        assert!(matches!(ft.known(&id), Known::Dormant { woke: [false, false], .. }));
        std::thread::sleep(std::time::Duration::from_millis(20));
        ft.dp().test_tc_egress(&frame(e.reply.dst, e.reply.src, 40040, 53), LO, 1).unwrap();
        assert_eq!(ft.woken(None), vec![(id, [true, false])], "the kernel forwarded its second packet");
        assert!(ft.prove(&id, [true, false]));
        ft.apply(e.clone(), Verdict::Watch(d));
        assert!(
            matches!(ft.known(&id), Known::Dormant { woke: [true, false], .. }),
            "a second watch keeps the evidence"
        );
        ft.apply(e.clone(), Verdict::Offload(d));
        assert_eq!(ft.len(), (1, 0, 0));
        assert!(ft.counters.teardowns.is_empty(), "a watch is no teardown");

        let mut ft = private_table(vec![127]);
        let labelled = CtEntry { labels: Some(nft::label_mask(&[127])), ..udp(40041) };
        let id = ConnId::of(&labelled);
        let merged = ft.merge(labelled.clone(), Seen::Full);
        ft.begin_batch();
        ft.apply(merged, Verdict::Watch(dirs(&labelled, 2)));
        assert_eq!(ft.clears.len(), 1, "the label clear waits for the batch's end");
        ft.end_batch();
        assert!(ft.clears.is_empty());
        assert_eq!((ft.len(), ft.known(&id)), ((0, 0, 1), Known::Asleep));
        let next = ft.merge(CtEntry { labels: None, ..labelled }, Seen::Changes);
        assert!(!nft::has_label(next.labels.as_ref(), 127), "the engine's own clear is remembered");
    }

    /// Keepalive's schedule: a new offload is due one look later, taken
    /// off when looked at until put back, and gone with the connection.
    #[test]
    fn keepalive_reads_only_what_is_due() {
        let mut ft = private_table(vec![]);
        let (a, b) = (udp(40010), udp(40011));
        let (ia, ib) = (ConnId::of(&a), ConnId::of(&b));
        let t0 = now_ns();
        ft.apply(a.clone(), Verdict::Offload(dirs(&a, 2)));
        ft.apply(b.clone(), Verdict::Offload(dirs(&b, 2)));
        assert!(ft.due_at_most(t0, usize::MAX).is_empty(), "nothing due before the first look");
        let first = now_ns() + FIRST_LOOK_NS;
        assert_eq!(ft.due_at_most(first, usize::MAX), vec![ia, ib]);
        assert!(ft.due_at_most(first, usize::MAX).is_empty(), "taken off when listed");
        ft.schedule(ia, first + 10);
        ft.schedule(ib, first + 20);
        ft.schedule(ia, first + 30);
        assert_eq!(ft.due_at_most(first + 25, usize::MAX), vec![ib], "a new time replaces the old");
        ft.teardown(&ia, TeardownReason::Policy);
        assert!(ft.due_at_most(u64::MAX - 1, usize::MAX).is_empty(), "a torn-down connection leaves the schedule");
        ft.apply(a.clone(), Verdict::Offload(dirs(&a, 2)));
        ft.all_due(first);
        assert!(ft.any_due(first), "every offloaded connection");
        assert_eq!(ft.due_at_most(first, 1), vec![ia], "a chunk: the earliest first");
        assert!(ft.any_due(first) && !ft.any_due(first - 1));
        assert_eq!(ft.due_at_most(first, 5), vec![ib], "the rest");
        assert!(!ft.any_due(u64::MAX - 1));
    }

    /// An offloaded connection's entry that moved only its timers (the
    /// event of our own refresh, a resync's line) takes no verdict: the
    /// deadline is taken over and the look stays where it was unless the
    /// deadline came earlier. Anything else, or a connection not offloaded,
    /// goes to the verdict.
    #[test]
    fn timers_only_takes_the_deadline_without_a_verdict() {
        let mut ft = private_table(vec![]);
        let mut e = udp(40020);
        e.timeout = Some(30);
        let id = ConnId::of(&e);
        assert!(!ft.timers_only(&e), "not offloaded: judged");
        ft.apply(e.clone(), Verdict::Offload(dirs(&e, 2)));
        let look = ft.offloaded[&id].check_at;
        ft.schedule(id, look + 5_000_000_000);
        let planned = ft.offloaded[&id].check_at;

        let mut later = e.clone();
        later.timeout = Some(120);
        later.counters_orig = Some((9, 900));
        let t = now_ns();
        assert!(ft.timers_only(&later), "only the timers moved");
        let f = &ft.offloaded[&id];
        assert!(f.clock.ct_expires_ns >= t + 120_000_000_000, "conntrack's deadline taken over");
        assert_eq!((f.entry.timeout, f.entry.counters_orig), (Some(120), Some((9, 900))));
        assert_eq!(f.check_at, planned, "a later deadline moves no look");

        let mut sooner = later.clone();
        sooner.timeout = Some(10);
        assert!(ft.timers_only(&sooner));
        assert!(ft.offloaded[&id].check_at <= now_ns() + FIRST_LOOK_NS, "an earlier deadline is looked at soon");

        let mut marked = sooner.clone();
        marked.mark = 7;
        assert!(!ft.timers_only(&marked), "a new mark goes to the verdict");
        assert_eq!(ft.offloaded[&id].entry.mark, sooner.mark, "and is not taken here");
    }

    /// A wake-up announced for a packet stamped in the tick the connection
    /// slept in does not wake it, and re-arms the watch so the next one is
    /// announced.
    #[test]
    fn an_early_announcement_rearms_the_watch() {
        let mut ft = private_table(vec![]);
        let e = udp(40012);
        let d = dirs(&e, 2);
        ft.apply(e.clone(), Verdict::Offload(d));
        ft.teardown(&ConnId::of(&e), TeardownReason::Idle);
        let k = egress_key(&d[0]);
        // What TC egress leaves after announcing: a stamp, here one that
        // does not postdate the sleep.
        ft.dp().test_mark_dormant(&k, 1);
        assert!(ft.woken(Some(&[k])).is_empty());
        assert_eq!(ft.dp().dormant_seen(&k), Some(0), "re-armed");
    }

    /// A TCP entry with sport `sport`, like `udp`.
    fn tcp(sport: u16) -> CtEntry {
        let mut e = udp(sport);
        e.orig.proto = IPPROTO_TCP;
        e.reply.proto = IPPROTO_TCP;
        e.tcp_state = Some(crate::conntrack::tcp_state::ESTABLISHED);
        e.status |= status::ASSURED;
        e
    }

    /// A batch's offloads are installed at its end, conntrack first: a TCP
    /// connection conntrack does not know (its liberal-mode update fails)
    /// gets no map entries and costs only itself; anything done to a
    /// pending connection installs it first.
    #[test]
    fn a_batch_installs_at_its_end_and_a_failure_stays_its_own() {
        let mut ft = private_table(vec![]);
        let known = tcp(40100);
        // This thread's private namespace: conntrack-tools adds the entry
        // there, so its liberal-mode update is accepted.
        let t = &known.orig;
        let (src, dst, sport, dport) = (t.src.to_string(), t.dst.to_string(), t.sport.to_string(), t.dport.to_string());
        #[rustfmt::skip]
        let out = std::process::Command::new("conntrack")
            .args(["-I", "-p", "tcp", "-s", &src, "-d", &dst, "--sport", &sport, "--dport", &dport,
                "--state", "ESTABLISHED", "-u", "ASSURED", "-t", "60"])
            .output()
            .expect("running `conntrack` (conntrack-tools)");
        assert!(out.status.success(), "conntrack -I: {}", String::from_utf8_lossy(&out.stderr));
        let (unknown, plain) = (tcp(40101), udp(40102));
        let all = [&known, &unknown, &plain];

        ft.begin_batch();
        for e in all {
            ft.apply(e.clone(), Verdict::Offload(dirs(e, 2)));
        }
        assert_eq!(ft.len(), (0, 0, 0), "nothing installed before the batch ends");
        assert!(all.iter().all(|e| ft.dp().get_flow(&dirs(e, 2)[0].key).is_none()));
        ft.end_batch();
        let installed = |ft: &FlowTable, e: &CtEntry| dirs(e, 2).iter().all(|d| ft.dp().get_flow(&d.key).is_some());
        assert!(installed(&ft, &known) && installed(&ft, &plain));
        assert!(dirs(&unknown, 2).iter().all(|d| ft.dp().get_flow(&d.key).is_none()), "refused: no map entry");
        assert_eq!(ft.len(), (2, 0, 0));
        assert_eq!(ft.counters.offloads, 2);
        assert!(ft.counters.not_offloaded.is_empty(), "gone from conntrack is no failure");

        // Events about a pending connection: each sees it installed.
        let (a, b) = (udp(40103), udp(40104));
        ft.begin_batch();
        ft.apply(a.clone(), Verdict::Offload(dirs(&a, 2)));
        ft.apply(b.clone(), Verdict::Offload(dirs(&b, 2)));
        ft.merge(a.clone(), Seen::Changes);
        assert!(matches!(ft.known(&ConnId::of(&a)), Known::Offloaded { .. }), "merged after its install");
        assert_eq!(ft.len().0, 4, "the pending ones before it went too");
        ft.end_batch();
        ft.begin_batch();
        let c = udp(40105);
        ft.apply(c.clone(), Verdict::Offload(dirs(&c, 2)));
        ft.teardown(&ConnId::of(&c), TeardownReason::Policy);
        ft.end_batch();
        assert!(dirs(&c, 2).iter().all(|d| ft.dp().get_flow(&d.key).is_none()), "installed, then torn down");
        assert_eq!(ft.counters.teardowns.get("policy"), Some(&1));
        assert_eq!(ft.len(), (4, 0, 0));
    }

    /// A batch write cannot say BPF_NOEXIST: a key another connection
    /// holds, or one two connections of the same batch want, still goes to
    /// the first one only (the key index sends the rest through the
    /// kernel's BPF_NOEXIST).
    #[test]
    fn a_batch_never_overwrites_a_taken_key() {
        let mut ft = private_table(vec![]);
        let a = udp(40200);
        ft.apply(a.clone(), Verdict::Offload(dirs(&a, 2)));
        // Same original tuple in another zone: another connection, the
        // same key (keys carry no zone); its reply key differs.
        let mut b = CtEntry { zone: 5, ..a.clone() };
        b.reply.dport = 40201;
        let (c, d) = (udp(40202), udp(40203));
        let e = CtEntry { zone: 6, ..d.clone() };
        ft.begin_batch();
        ft.apply(b.clone(), Verdict::Offload(dirs(&b, 9)));
        ft.apply(c.clone(), Verdict::Offload(dirs(&c, 2)));
        ft.apply(d.clone(), Verdict::Offload(dirs(&d, 2)));
        ft.apply(e.clone(), Verdict::Offload(dirs(&e, 9)));
        ft.end_batch();
        assert_eq!(ft.len().0, 3, "a, c and d");
        let taken = NotOffloaded::KeyCollision.to_string();
        assert_eq!(ft.counters.not_offloaded.get(&taken).map(|r| r.connections), Some(2), "b and e");
        for x in [&a, &d] {
            assert_eq!(ft.dp().get_flow(&dirs(x, 2)[0].key).unwrap().dmac[5], 2, "the first owner's entry");
        }
        assert!(ft.dp().get_flow(&dirs(&b, 9)[1].key).is_none(), "nothing of b was written");
        assert!(dirs(&c, 2).iter().all(|x| ft.dp().get_flow(&x.key).is_some()));
        // Torn down, a key is free again for the batch.
        ft.teardown(&ConnId::of(&a), TeardownReason::Policy);
        ft.begin_batch();
        ft.apply(b.clone(), Verdict::Offload(dirs(&b, 9)));
        ft.end_batch();
        assert_eq!(ft.dp().get_flow(&dirs(&b, 9)[0].key).unwrap().dmac[5], 9);
    }

    #[test]
    fn waiting_policy_and_vanished_connections() {
        let mut ft = private_table(vec![127]);
        let (a, b) = (udp(40001), udp(40002));
        ft.apply(a.clone(), Verdict::Wait(crate::routes::path::NoPath::Unroutable(7)));
        assert_eq!(ft.len(), (0, 1, 0));
        assert_eq!(ft.waiting_ids(), vec![ConnId::of(&a)]);
        ft.apply(a.clone(), Verdict::NotYet(crate::flow::Ineligible::NotConfirmed));
        assert_eq!(ft.len(), (0, 0, 0), "not eligible any more: no longer waited for");

        // A policy teardown clears the flowtable label in the memo, so a
        // later update event without labels is not read with the old ones.
        let mut labelled = b.clone();
        labelled.labels = Some(nft::label_mask(&[127]));
        let merged = ft.merge(labelled.clone(), Seen::Full);
        ft.apply(merged, Verdict::Offload(dirs(&b, 2)));
        ft.teardown(&ConnId::of(&b), TeardownReason::Policy);
        assert_eq!(ft.len(), (0, 0, 0), "policy teardowns do not park the connection");
        assert_eq!(ft.counters.teardowns.get("policy"), Some(&1));
        let next = ft.merge(CtEntry { labels: None, ..b.clone() }, Seen::Changes);
        assert!(!nft::has_label(next.labels.as_ref(), 127), "the engine's own clear is remembered");

        // A resync that no longer lists a connection forgets it.
        ft.apply(a.clone(), Verdict::Offload(dirs(&a, 2)));
        ft.retain_present(&HashSet::new());
        assert_eq!(ft.len(), (0, 0, 0));
        assert_eq!(ft.counters.teardowns.get("conntrack_destroyed"), Some(&1));
    }
}
