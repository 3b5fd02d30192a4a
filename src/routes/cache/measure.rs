//! What a route change costs with 10k offloaded connections to four
//! destinations, against the kernel's FIB in a private namespace: every
//! path resolved again without the cache (as before) against one
//! revalidation plus the connections whose answer changed. The routing
//! part only (`resolve_path`), not the map writes of a re-judge. Needs
//! root, BPF and `ip` (CI has them).

use crate::routes::tests::sh;
use std::net::IpAddr;
use std::time::Instant;

use super::*;
use crate::conntrack::{CtEntry, CtTuple};
use crate::dataplane::Dataplane;
use crate::routes::path::{resolve_path, Lookups, Ports};
use crate::routes::RouteFacts;

struct Two {
    lan: u32,
    wan: u32,
}

impl Ports for Two {
    fn is_up(&self, i: u32) -> bool {
        i == self.lan || i == self.wan
    }
    fn first_up(&self) -> Option<u32> {
        Some(self.lan)
    }
    fn name(&self, i: u32) -> Option<&str> {
        [(self.lan, "lan0"), (self.wan, "wan0")].into_iter().find(|(x, _)| *x == i).map(|(_, n)| n)
    }
}

/// By a socket of this thread's namespace (sysfs shows the process's).
fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "{name}: no such device");
    i
}

const CLIENTS: u32 = 50;
const DESTS: u32 = 4;
const CONNS: u32 = 10_000;

fn conn(n: u32) -> CtEntry {
    let client: IpAddr = format!("192.168.1.{}", 10 + n % CLIENTS).parse().unwrap();
    let dest: IpAddr = format!("198.51.100.{}", 1 + n % DESTS).parse().unwrap();
    let sport = 10_000 + (n / CLIENTS) as u16;
    let t = |src, sport, dst, dport| CtTuple { src, dst, proto: 6, sport, dport };
    CtEntry {
        orig: t(client, sport, dest, 443),
        reply: t(dest, 443, "203.0.113.1".parse().unwrap(), sport),
        ..crate::flow::tests::tcp_masq()
    }
}

#[test]
fn a_route_change_costs_its_distinct_destinations() {
    // SAFETY: affects only this test's thread (and what it spawns).
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET) needs root");
    let mut neigh = String::new();
    for c in 0..CLIENTS {
        neigh += &format!("ip neigh add 192.168.1.{} lladdr 02:00:00:00:01:{:02x} dev lan0 nud permanent\n", 10 + c, c);
    }
    sh(&format!(
        "ip link set lo up
         ip link add lan0 type veth peer name lan0p
         ip link add wan0 type veth peer name wan0p
         for d in lan0 lan0p wan0 wan0p; do ip link set $d up; done
         ip addr add 192.168.1.1/24 dev lan0
         ip addr add 203.0.113.1/24 dev wan0
         echo 1 > /proc/sys/net/ipv4/ip_forward
         ip neigh add 203.0.113.254 lladdr 02:00:00:00:02:54 dev wan0 nud permanent
         ip neigh add 203.0.113.253 lladdr 02:00:00:00:02:53 dev wan0 nud permanent
         ip route add default via 203.0.113.254
         {neigh}"
    ));
    let dp = Dataplane::load(64).expect("loading the fast path (needs root, BPF and BTF)");
    let ports = Two { lan: ifindex("lan0"), wan: ifindex("wan0") };
    let facts = RouteFacts::read().expect("route facts");
    assert!(facts.cacheable(false), "{:?}", facts.rules);
    let conns: Vec<CtEntry> = (0..CONNS).map(conn).collect();
    let mut lk = Lookups::default();
    for e in &conns {
        let d = resolve_path(&dp, &ports, &facts, e, &mut lk).unwrap_or_else(|p| panic!("{e:?}: {p}"));
        assert_eq!(d[0].val.dmac, [2, 0, 0, 0, 2, 0x54]);
        facts.cache.borrow_mut().pin(crate::flow::ConnId::of(e), &lk.keys, &lk.asked);
    }
    let first = facts.cache.borrow().stats;
    let distinct = facts.cache.borrow().keys();
    eprintln!(
        "offloading {CONNS} connections ({CLIENTS} clients, {DESTS} destinations): {} FIB queries, {} hits, {distinct} keys",
        first.queries, first.hits
    );
    let pairs: HashSet<(u32, u32)> = (0..CONNS).map(|n| (n % CLIENTS, n % DESTS)).collect();
    assert_eq!(distinct, CLIENTS as usize + 2 * pairs.len(), "one reverse key per client, two per pair");

    // One destination moves to the other gateway.
    sh("ip route add 198.51.100.1/32 via 203.0.113.253");

    // Before: every connection resolved again, three lookups each.
    let uncached = without_cache(&facts);
    let t = Instant::now();
    let mut moved_before = 0;
    for e in &conns {
        let d = resolve_path(&dp, &ports, &uncached, e, &mut lk).unwrap();
        moved_before += usize::from(d[0].val.dmac == [2, 0, 0, 0, 2, 0x53]);
    }
    let before = t.elapsed();
    assert_eq!(uncached.cache.borrow().stats.queries, 3 * u64::from(CONNS));

    // After: one query per key in use, then the connections that moved.
    let by_id: HashMap<crate::flow::ConnId, &CtEntry> = conns.iter().map(|e| (crate::flow::ConnId::of(e), e)).collect();
    let q0 = facts.cache.borrow().stats.queries;
    let t = Instant::now();
    facts.cache.borrow_mut().go_stale();
    let changed = facts.revalidate(&dp, &HashSet::new());
    let revalidate = t.elapsed();
    let mut moved_after = 0;
    for id in &changed {
        let e = &by_id[id];
        let d = resolve_path(&dp, &ports, &facts, e, &mut lk).unwrap();
        moved_after += usize::from(d[0].val.dmac == [2, 0, 0, 0, 2, 0x53]);
    }
    let after = t.elapsed();
    let queries = facts.cache.borrow().stats.queries - q0;
    eprintln!(
        "route change, routing part: before {} FIB queries in {before:?}; after {queries} queries, \
         revalidation {revalidate:?}, {} connections re-resolved, {after:?} in all",
        3 * CONNS,
        changed.len()
    );
    // For scale: every connection resolved from the (fresh) cache.
    let t = Instant::now();
    for e in &conns {
        resolve_path(&dp, &ports, &facts, e, &mut lk).unwrap();
    }
    eprintln!("all {CONNS} resolved from the cache (no query): {:?}", t.elapsed());
    assert_eq!(moved_before, (CONNS / DESTS) as usize);
    assert_eq!(changed.len(), (CONNS / DESTS) as usize, "only the connections to 198.51.100.1");
    assert_eq!(moved_after, changed.len());
    assert_eq!(queries as usize, distinct, "one query per key in use, none for the connections");
}

/// The same facts with an empty cache that keeps nothing (ports rules).
fn without_cache(f: &RouteFacts) -> RouteFacts {
    let mut g = f.clone();
    g.rules.v4.by_flow = true;
    g.cache = Default::default();
    g
}
