//! Re-resolving offloaded connections after a route, rule, address, link
//! or netconf change: only those whose FIB answer changed (the cache asks
//! the kernel once per distinct key in use, `routes::cache`) or whose
//! devices changed, unless the change can move any path (a rule, lost
//! messages, a hold source, the router's addresses, the bridge fdb or
//! PPPoE sessions read anew); then all, as before.
//!
//! The work runs in chunks of at most `CHUNK` per loop pass, so conntrack
//! events, the control socket and the engine's heartbeat keep being served
//! during a re-resolution of many connections. A connection not re-judged
//! yet keeps its old entries: no longer than the queue ahead of it takes
//! (the whole re-resolution took as long in one piece before), after the
//! ROUTE_SETTLE that batches bursts of route messages.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::flow::ConnId;

use super::Core;

/// Time spent re-judging per loop pass, at most (checked every few
/// connections).
pub const CHUNK: Duration = Duration::from_millis(5);
/// Connections re-judged between two looks at the clock.
const CLOCK_EVERY: usize = 8;

/// What the changes since the last re-resolution ask for.
#[derive(Debug, Default)]
pub struct Plan {
    /// Every offloaded connection is judged again.
    pub all: bool,
    /// Devices whose link facts changed, with those stacked above them:
    /// the connections whose FIB answers name one are judged again.
    pub devices: HashSet<u32>,
}

/// The connections left to re-judge, and what the last re-resolution cost.
#[derive(Debug, Default)]
pub struct Queue {
    todo: VecDeque<ConnId>,
    queued: HashSet<ConnId>,
    started: Option<Instant>,
    pub last: Option<Report>,
    current: Report,
}

pub use crate::control::view::ReresolveView as Report;

impl Queue {
    /// Start a re-resolution of `ids` (among `offloaded`), begun `since`
    /// with `queries` FIB lookups so far (the revalidation). Anything still
    /// queued stays queued.
    pub fn start(&mut self, ids: impl IntoIterator<Item = ConnId>, offloaded: usize, queries: u64, since: Instant) {
        if self.started.is_none() {
            self.started = Some(since);
            self.current = Report { offloaded, ..Default::default() };
        }
        self.current.fib_queries += queries;
        for id in ids {
            if self.queued.insert(id) {
                self.todo.push_back(id);
            }
        }
    }

    pub fn busy(&self) -> bool {
        self.started.is_some()
    }

    /// The next chunk: connections to judge now, until `budget` is spent
    /// (`judge` is called for each). Returns true when this pass ended the
    /// re-resolution.
    pub fn run(&mut self, budget: Duration, mut judge: impl FnMut(&ConnId) -> u64) -> bool {
        let Some(started) = self.started else { return false };
        let t0 = Instant::now();
        let mut n = 0usize;
        while let Some(id) = self.todo.pop_front() {
            self.queued.remove(&id);
            self.current.fib_queries += judge(&id);
            self.current.rejudged += 1;
            n += 1;
            if n.is_multiple_of(CLOCK_EVERY) && t0.elapsed() >= budget {
                break;
            }
        }
        self.current.passes += 1;
        if !self.todo.is_empty() {
            return false;
        }
        self.current.micros = started.elapsed().as_micros() as u64;
        self.last = Some(self.current);
        self.started = None;
        true
    }
}

impl Core {
    /// Something in routes, rules, addresses, links or holds changed:
    /// the FIB answers in use are asked again, and the offloaded
    /// connections whose answer or devices changed (all of them, if the
    /// plan says so) are queued to follow the kernel's current decision,
    /// in chunks (`reresolve_some`); those waiting try again at the end.
    pub(super) fn reresolve_all(&mut self) {
        self.release_pins();
        let plan = std::mem::take(&mut self.plan);
        let since = Instant::now();
        let before = self.facts.cache.borrow().stats.queries;
        let changed = self.facts.revalidate(self.flows.dp(), &plan.devices);
        let queries = self.facts.cache.borrow().stats.queries - before;
        let offloaded = self.flows.len().0;
        let ids = if plan.all { self.flows.offloaded_ids() } else { changed };
        tracing::debug!(all = plan.all, queued = ids.len(), offloaded, queries, "re-resolving");
        self.rework.start(ids, offloaded, queries, since);
        self.reresolve_some();
    }

    /// One chunk of the queued re-resolution (`CHUNK`).
    pub(super) fn reresolve_some(&mut self) {
        if !self.rework.busy() {
            return;
        }
        let mut q = std::mem::take(&mut self.rework);
        let done = q.run(CHUNK, |id| {
            if !self.flows.is_offloaded(id) {
                // Installed by nobody (a failed install) or gone since.
                self.facts.cache.borrow_mut().unpin(id);
                return 0;
            }
            let before = self.facts.cache.borrow().stats.queries;
            self.rejudge(id, None, true);
            self.facts.cache.borrow().stats.queries - before
        });
        self.rework = q;
        if done {
            if let Some(r) = self.rework.last {
                tracing::debug!(?r, "re-resolved");
            }
            self.retry_waiting();
        }
    }

    /// Connections no longer offloaded leave the cache's index.
    pub(super) fn release_pins(&mut self) {
        let mut c = self.facts.cache.borrow_mut();
        self.flows.released.drain(..).for_each(|id| c.unpin(&id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u16) -> ConnId {
        ConnId {
            src: "192.0.2.1".parse().unwrap(),
            dst: "198.51.100.1".parse().unwrap(),
            proto: 17,
            sport: n,
            dport: 53,
            zone: 0,
        }
    }

    /// A large re-resolution takes several passes, each within its budget
    /// (give or take one clock check), each connection once; a second
    /// change while it runs adds to it.
    #[test]
    fn chunks_are_bounded_and_complete() {
        let mut q = Queue::default();
        assert!(!q.run(CHUNK, |_| 0), "nothing to do");
        q.start((0..1000).map(id), 1000, 7, Instant::now());
        assert!(q.busy());
        let mut seen = Vec::new();
        let slow = |seen: &mut Vec<ConnId>, i: &ConnId| {
            seen.push(*i);
            std::thread::sleep(Duration::from_micros(100));
            1
        };
        let t = Instant::now();
        assert!(!q.run(Duration::from_millis(2), |i| slow(&mut seen, i)));
        assert!(seen.len() >= CLOCK_EVERY && seen.len() < 1000, "one chunk: {}", seen.len());
        assert!(t.elapsed() < Duration::from_millis(500), "the budget bounds the pass");
        q.start([id(0), id(999), id(5000)], 1000, 2, Instant::now());
        while !q.run(Duration::from_millis(2), |i| slow(&mut seen, i)) {}
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 1001, "each once, plus the one added");
        let r = q.last.unwrap();
        assert_eq!((r.offloaded, r.rejudged), (1000, seen.len()));
        assert_eq!(r.fib_queries, 9 + seen.len() as u64);
        assert!(r.passes > 1 && !q.busy());
    }
}
