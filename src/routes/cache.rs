//! FIB answers cached by what the kernel's lookup keys on, and the
//! offloaded connections that were resolved with each, so a route, rule,
//! address or link change costs one query per distinct key in use (not
//! three per connection) and re-judges only the connections whose answer
//! changed.
//!
//! What a forwarded packet's lookup depends on (`bpf_ipv4_fib_lookup` /
//! `bpf_ipv6_fib_lookup`, net/core/filter.c, like `ip_route_input_slow`):
//! the rules (`fib_rule_match`, net/core/fib_rules.c: iif, oif, mark,
//! tun_id, l3mdev, uid range; then `fib4_rule_match` / `fib6_rule_match`:
//! source and destination prefixes, dscp, ip_proto, sport and dport
//! ranges), the table lookup on the destination (and source, IPv6
//! subtrees), the path chosen (`fib_select_path`), the input device's
//! forwarding setting, the neighbour. So the key is (input interface,
//! source, destination, mark) and an answer is valid only when nothing
//! else can vary between two packets with that key:
//!
//! * no rule selects on ipproto, sport or dport (`RuleFacts::by_flow`):
//!   those would have to be in the key. The uid range needs nothing: a
//!   forwarded packet's and our lookup's uid are both `sock_net_uid(net,
//!   NULL)`, one value per namespace; tos/dscp/flowlabel rules already
//!   refuse the family (`rules`).
//! * no multipath route or nexthop object (`fib_select_multipath` hashes
//!   the flow with `fib_multipath_hash`, ports included under policy 1;
//!   where the hash takes what only each packet carries, its connections
//!   get no path at all: `per_packet`).
//!
//! Otherwise the family bypasses the cache (every lookup asks the kernel,
//! every change re-judges its connections, as before). A next hop's MAC
//! is part of an answer: a neighbour change drops the answers sent to its
//! old MAC (`neighbour_changed`); an unresolved neighbour (NO_NEIGH) is not
//! cached, since the change that resolves it names no old MAC. Route,
//! rule, address, link and netconf changes and lost messages make every
//! answer stale (`go_stale`): until `revalidate` asks again, lookups go to
//! the kernel.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use anyhow::Result;

use crate::dataplane::Dataplane;
use crate::flow::{ConnId, NextHop};

use super::{egress_for, resolve_with, reverse_packet, Packet, RouteFacts, Unroutable};

/// One lookup as the cache tells it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FibKey {
    pub in_ifindex: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub mark: u32,
    /// `egress_for`'s reverse-path question (no source, no neighbour).
    pub reverse: bool,
}

/// What the kernel answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Forward(Result<NextHop, Unroutable>),
    Reverse(Option<u32>),
}

impl Answer {
    /// Worth keeping: a neighbour not resolved yet is asked again.
    fn cacheable(&self) -> bool {
        !matches!(self, Answer::Forward(Err(u)) if u.transient())
    }

    /// The FIB device it names, if any.
    fn device(&self) -> Option<u32> {
        match self {
            Answer::Forward(Ok(nh)) => Some(nh.ifindex),
            Answer::Reverse(d) => *d,
            Answer::Forward(Err(_)) => None,
        }
    }
}

/// The keys one connection's path was resolved with: reverse path,
/// original direction, reply direction. `None`: a lookup that bypassed the
/// cache (the connection is re-judged on every change).
pub type Used = [Option<FibKey>; 3];

#[derive(Debug, Clone)]
struct Slot {
    key: FibKey,
    /// What the packets of its first user ask, for `revalidate`: the
    /// answer does not depend on its ports (they are cacheable only then).
    packet: Packet,
    /// `None`: unknown (dropped by a neighbour change, or pinned while
    /// stale); lookups ask the kernel and a revalidation counts it changed.
    answer: Option<Answer>,
    users: u32,
}

/// Answers kept besides the ones offloaded connections use; beyond this the
/// unused ones are dropped.
pub const UNUSED_MAX: usize = 65536;

#[derive(Debug, Clone, Default)]
pub struct FibCache {
    ids: HashMap<FibKey, u32>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    unused: usize,
    /// Every answer is stale until `revalidate`.
    stale: bool,
    /// Offloaded connections by the slots they were resolved with.
    conns: HashMap<ConnId, [u32; 3]>,
    /// Offloaded connections resolved with a lookup the cache bypassed.
    unkeyed: HashSet<ConnId>,
    pub stats: CacheStats,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that went to the kernel (BPF_PROG_TEST_RUN).
    pub queries: u64,
}

impl FibCache {
    /// The answer for `key`, if one is cached and current.
    pub fn get(&mut self, key: &FibKey) -> Option<Answer> {
        if self.stale {
            return None;
        }
        let a = self.ids.get(key).and_then(|&i| self.slot(i).answer)?;
        self.stats.hits += 1;
        Some(a)
    }

    fn slot(&self, i: u32) -> &Slot {
        self.slots[i as usize].as_ref().expect("a live slot id")
    }

    fn slot_mut(&mut self, i: u32) -> &mut Slot {
        self.slots[i as usize].as_mut().expect("a live slot id")
    }

    /// The kernel answered `a` for `key` (asked as `packet`).
    pub fn put(&mut self, key: FibKey, packet: Packet, a: Answer) {
        if !a.cacheable() {
            return;
        }
        if let Some(&i) = self.ids.get(&key) {
            // While stale the old answer stays: it is what the users were
            // resolved with, and `revalidate` compares against it.
            if !self.stale || self.slot(i).answer.is_none() {
                self.slot_mut(i).answer = Some(a);
            }
            return;
        }
        if self.stale {
            return;
        }
        if self.unused >= UNUSED_MAX {
            self.drop_unused();
        }
        self.insert(key, packet, Some(a));
    }

    fn insert(&mut self, key: FibKey, packet: Packet, answer: Option<Answer>) -> u32 {
        let slot = Slot { key, packet, answer, users: 0 };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                (self.slots.len() - 1) as u32
            }
        };
        self.ids.insert(key, i);
        self.unused += 1;
        i
    }

    fn remove(&mut self, i: u32) {
        if let Some(s) = self.slots[i as usize].take() {
            self.ids.remove(&s.key);
            self.free.push(i);
            if s.users == 0 {
                self.unused -= 1;
            }
        }
    }

    fn drop_unused(&mut self) {
        let unused: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&i| self.slots[i as usize].as_ref().is_some_and(|s| s.users == 0))
            .collect();
        unused.into_iter().for_each(|i| self.remove(i));
    }

    /// Connection `id` is offloaded with the path resolved by `used` (and
    /// the packets `asked`): it is re-judged when one of these answers
    /// changes. Replaces what it used before.
    pub fn pin(&mut self, id: ConnId, used: &Used, asked: &[Option<Packet>; 3]) {
        self.unpin(&id);
        let (Some(a), Some(b), Some(c)) = (used[0], used[1], used[2]) else {
            self.unkeyed.insert(id);
            return;
        };
        let mut ids = [0u32; 3];
        for (n, key) in [a, b, c].into_iter().enumerate() {
            let i = match self.ids.get(&key) {
                Some(&i) => i,
                // Dropped since (bounded, or stale): known again at the
                // next revalidation.
                None => match asked[n] {
                    Some(p) => self.insert(key, p, None),
                    None => {
                        self.unkeyed.insert(id);
                        return;
                    }
                },
            };
            let s = self.slot_mut(i);
            s.users += 1;
            if s.users == 1 {
                self.unused -= 1;
            }
            ids[n] = i;
        }
        self.conns.insert(id, ids);
    }

    /// Connection `id` is no longer offloaded.
    pub fn unpin(&mut self, id: &ConnId) {
        self.unkeyed.remove(id);
        let Some(ids) = self.conns.remove(id) else { return };
        for i in ids {
            let s = self.slot_mut(i);
            s.users -= 1;
            if s.users == 0 {
                self.unused += 1;
            }
        }
    }

    /// A neighbour on `ifindex` that had MAC `was` changed: the answers
    /// sent to it are unknown now (its connections are re-resolved through
    /// the engine's next-hop index).
    pub fn neighbour_changed(&mut self, ifindex: u32, was: [u8; 6]) {
        for s in self.slots.iter_mut().flatten() {
            if matches!(s.answer, Some(Answer::Forward(Ok(nh))) if nh.ifindex == ifindex && nh.dmac == was) {
                s.answer = None;
            }
        }
    }

    /// Routes, rules, addresses or links changed: no answer is trusted
    /// until `revalidate`; the unused ones are dropped now.
    pub fn go_stale(&mut self) {
        self.drop_unused();
        self.stale = true;
    }

    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Ask the kernel again for every answer in use (`ask`: `None` when the
    /// key may no longer be cached, or the query failed) and return the
    /// offloaded connections whose answer changed, or whose answer names a
    /// device in `devices` (a link below it changed), and those resolved
    /// without the cache; those whose path the kernel now refuses first.
    /// O(distinct keys) queries, one pass over the pinned connections.
    pub fn revalidate(
        &mut self,
        mut ask: impl FnMut(&FibKey, &Packet) -> Option<Answer>,
        devices: &HashSet<u32>,
    ) -> Vec<ConnId> {
        self.stale = false;
        self.drop_unused();
        let mut changed = vec![false; self.slots.len()];
        // Now refused (blackhole, unreachable, prohibit, no route back):
        // the kernel drops what the fast path still forwards, so these go
        // first.
        let mut refused = vec![false; self.slots.len()];
        for (i, s) in self.slots.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            let now = ask(&s.key, &s.packet).filter(Answer::cacheable);
            let moved = |a: &Option<Answer>| a.and_then(|a| a.device()).is_some_and(|d| devices.contains(&d));
            changed[i] = now.is_none() || now != s.answer || moved(&s.answer) || moved(&now);
            refused[i] = changed[i] && now.is_some_and(|a| a.device().is_none());
            s.answer = now;
        }
        let (mut first, mut then) = (Vec::new(), Vec::new());
        for (id, ids) in &self.conns {
            if ids.iter().any(|&i| refused[i as usize]) {
                first.push(*id);
            } else if ids.iter().any(|&i| changed[i as usize]) {
                then.push(*id);
            }
        }
        first.extend(then);
        first.extend(self.unkeyed.iter().copied());
        first
    }

    /// Every offloaded connection the cache knows of.
    pub fn pinned(&self) -> usize {
        self.conns.len() + self.unkeyed.len()
    }

    /// Keys known (answered, or pinned without an answer).
    pub fn keys(&self) -> usize {
        self.ids.len()
    }
}

/// The engine's lookups through the cache.
impl RouteFacts {
    /// Whether the family's answers may be cached (see `cache`).
    pub fn cacheable(&self, v6: bool) -> bool {
        let mp = self.routes.family(v6).multipath;
        !mp && !self.rules.family(v6).by_flow
    }

    /// The key of `p`'s lookup, if its answer may be cached.
    pub(super) fn key(&self, p: &Packet, reverse: bool) -> Option<FibKey> {
        self.cacheable(p.dst.is_ipv6()).then_some(FibKey {
            in_ifindex: p.in_ifindex,
            src: p.src,
            dst: p.dst,
            mark: p.mark,
            reverse,
        })
    }

    /// Ask the kernel (a test run, and the route's MTU when it may matter).
    fn ask(&self, dp: &Dataplane, p: &Packet, reverse: bool) -> Result<Answer> {
        self.cache.borrow_mut().stats.queries += 1;
        Ok(if reverse {
            Answer::Reverse(egress_for(dp, p.in_ifindex, p.dst)?)
        } else {
            Answer::Forward(resolve_with(dp, self, p)?)
        })
    }

    fn cached(&self, dp: &Dataplane, p: &Packet, reverse: bool) -> Result<(Answer, Option<FibKey>)> {
        let key = self.key(p, reverse);
        if let Some(a) = key.and_then(|k| self.cache.borrow_mut().get(&k)) {
            return Ok((a, key));
        }
        let a = self.ask(dp, p, reverse)?;
        if let Some(k) = key {
            self.cache.borrow_mut().put(k, *p, a);
        }
        Ok((a, key))
    }

    /// `egress_for(dp, any_ifindex, dst)`, from the cache when it can be,
    /// with the key it was answered under.
    pub fn egress_for(
        &self,
        dp: &Dataplane,
        any_ifindex: u32,
        dst: IpAddr,
    ) -> Result<(Option<u32>, Packet, Option<FibKey>)> {
        let p = reverse_packet(any_ifindex, dst);
        match self.cached(dp, &p, true)? {
            (Answer::Reverse(d), k) => Ok((d, p, k)),
            (Answer::Forward(_), _) => unreachable!("a reverse key holds reverse answers"),
        }
    }

    /// `resolve_with(dp, self, p)`, from the cache when it can be, with the
    /// key it was answered under.
    pub fn resolve(
        &self,
        dp: &Dataplane,
        p: &Packet,
    ) -> Result<(std::result::Result<NextHop, Unroutable>, Option<FibKey>)> {
        match self.cached(dp, p, false)? {
            (Answer::Forward(a), k) => Ok((a, k)),
            (Answer::Reverse(_), _) => unreachable!("a forward key holds forward answers"),
        }
    }

    /// Ask the kernel again for every answer offloaded connections use
    /// (after a route, rule, address, link or netconf change) and return
    /// those whose answer changed or names a device in `devices`.
    pub fn revalidate(&self, dp: &Dataplane, devices: &HashSet<u32>) -> Vec<crate::flow::ConnId> {
        let mut c = std::mem::take(&mut *self.cache.borrow_mut());
        let out = c.revalidate(
            |k, p| {
                if !self.cacheable(k.dst.is_ipv6()) {
                    return None;
                }
                match self.ask(dp, p, k.reverse) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::debug!("route lookup while revalidating: {e:#}");
                        None
                    }
                }
            },
            devices,
        );
        // The queries were counted on the placeholder.
        c.stats.queries += self.cache.borrow().stats.queries;
        *self.cache.borrow_mut() = c;
        out
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod measure;
