use super::*;
use crate::routes::Packet;

const LAN: u32 = 3;
const WAN: u32 = 4;
const GW: [u8; 6] = [2, 0, 0, 0, 0, 1];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn packet(src: &str, dst: &str) -> Packet {
    Packet { in_ifindex: LAN, src: ip(src), dst: ip(dst), proto: 6, sport: 40000, dport: 443, mark: 0 }
}

fn key(p: &Packet) -> FibKey {
    FibKey { in_ifindex: p.in_ifindex, src: p.src, dst: p.dst, mark: p.mark, reverse: false }
}

fn via(ifindex: u32, dmac: [u8; 6]) -> Answer {
    Answer::Forward(Ok(NextHop { ifindex, smac: [2, 0, 0, 0, 0, 9], dmac, mtu: 1500, xdp_ok: false }))
}

fn conn(n: u16) -> ConnId {
    ConnId { src: ip("192.168.1.2"), dst: ip("203.0.113.5"), proto: 6, sport: n, dport: 443, zone: 0 }
}

/// A connection's three lookups: reverse path, original, reply.
fn lookups(c: &mut FibCache, dst: &str) -> (Used, [Option<Packet>; 3]) {
    let r =
        Packet { in_ifindex: LAN, src: ip("0.0.0.0"), dst: ip("192.168.1.2"), proto: 0, sport: 0, dport: 0, mark: 0 };
    let rk = FibKey { reverse: true, ..key(&r) };
    let o = packet("192.168.1.2", dst);
    let back = Packet { in_ifindex: WAN, ..packet(dst, "192.168.1.2") };
    c.put(rk, r, Answer::Reverse(Some(LAN)));
    c.put(key(&o), o, via(WAN, GW));
    c.put(key(&back), back, via(LAN, [2, 0, 0, 0, 0, 2]));
    ([Some(rk), Some(key(&o)), Some(key(&back))], [Some(r), Some(o), Some(back)])
}

/// What is cached and for how long: an unresolved neighbour is asked
/// again; an answer sent to a neighbour that changed is dropped, others
/// stay; a change beyond neighbours trusts nothing until revalidated.
#[test]
fn validity() {
    let mut c = FibCache::default();
    let (a, b) = (packet("192.168.1.2", "203.0.113.5"), packet("192.168.1.3", "203.0.113.5"));
    c.put(key(&a), a, Answer::Forward(Err(Unroutable(crate::routes::FIB_NO_NEIGH))));
    assert_eq!(c.get(&key(&a)), None, "NO_NEIGH is not kept");
    c.put(key(&a), a, Answer::Forward(Err(Unroutable(2))));
    assert_eq!(c.get(&key(&a)), Some(Answer::Forward(Err(Unroutable(2)))), "unreachable is an answer");
    c.put(key(&a), a, via(WAN, GW));
    c.put(key(&b), b, via(WAN, [2, 0, 0, 0, 0, 7]));
    assert_eq!(c.get(&key(&a)), Some(via(WAN, GW)), "the newer answer");
    c.neighbour_changed(LAN, GW);
    assert!(c.get(&key(&a)).is_some(), "same MAC, another link");
    c.neighbour_changed(WAN, GW);
    assert_eq!(c.get(&key(&a)), None, "sent to the neighbour that changed");
    assert!(c.get(&key(&b)).is_some(), "another neighbour");
    c.go_stale();
    assert_eq!(c.get(&key(&b)), None, "stale");
    c.put(key(&b), b, via(WAN, GW));
    assert_eq!(c.get(&key(&b)), None, "nothing is cached while stale");
    assert!(c.revalidate(|_, _| Some(via(WAN, GW)), &HashSet::new()).is_empty(), "nobody offloaded");
    assert_eq!(c.keys(), 0, "unused answers dropped by the change");
    c.put(key(&b), b, via(WAN, GW));
    assert_eq!(c.get(&key(&b)), Some(via(WAN, GW)), "cached again");
    assert!(c.stats.hits >= 3);
}

/// A revalidation asks once per distinct key in use and returns only
/// the connections whose answer changed, or whose answer names a device
/// that changed; connections resolved around the cache always.
#[test]
fn revalidation_reports_only_what_moved() {
    let mut c = FibCache::default();
    let (used_a, asked_a) = lookups(&mut c, "203.0.113.5");
    let (used_b, asked_b) = lookups(&mut c, "198.51.100.9");
    for n in 0..100 {
        c.pin(conn(n), &used_a, &asked_a);
    }
    c.pin(conn(1000), &used_b, &asked_b);
    c.pin(conn(2000), &[None, used_b[1], used_b[2]], &asked_b);
    assert_eq!(c.pinned(), 102);
    c.go_stale();
    let mut asked = 0;
    // 203.0.113.5 now leaves by another gateway.
    let moved = |k: &FibKey| k.dst == ip("203.0.113.5") && !k.reverse;
    let mut ask = |k: &FibKey, _: &Packet| {
        asked += 1;
        Some(if moved(k) { via(WAN, [2, 0, 0, 0, 0, 0x33]) } else { c_answer(k) })
    };
    let mut out = c.revalidate(&mut ask, &HashSet::new());
    out.sort_unstable();
    assert_eq!(asked, 5, "the distinct keys in use (one reverse key shared)");
    let mut want: Vec<ConnId> = (0..100).map(conn).chain([conn(2000)]).collect();
    want.sort_unstable();
    assert_eq!(out, want, "the connections to .5 and the unkeyed one");
    // Nothing changed: only the unkeyed one.
    assert_eq!(c.revalidate(|k, _| c_answer_now(k), &HashSet::new()), vec![conn(2000)]);
    // The LAN device below the reply answers changed: everyone.
    assert_eq!(c.revalidate(|k, _| c_answer_now(k), &HashSet::from([LAN])).len(), 102);
    // A device no path uses: nobody (but the unkeyed one).
    assert_eq!(c.revalidate(|k, _| c_answer_now(k), &HashSet::from([99])), vec![conn(2000)]);
    // 198.51.100.9 is blackholed while .5 moves: its connection first.
    let hole = |k: &FibKey, _: &Packet| {
        Some(if k.dst == ip("198.51.100.9") && !k.reverse { Answer::Forward(Err(Unroutable(1))) } else { c_answer(k) })
    };
    let out = c.revalidate(hole, &HashSet::new());
    assert_eq!(out.len(), 102);
    assert_eq!(out[0], conn(1000), "refused first");
    assert_eq!(*out.last().unwrap(), conn(2000), "unkeyed last");
    // A query that fails counts as changed.
    assert_eq!(c.revalidate(|_, _| None, &HashSet::new()).len(), 102);
    for n in 0..100 {
        c.unpin(&conn(n));
    }
    c.unpin(&conn(1000));
    c.unpin(&conn(2000));
    assert_eq!(c.pinned(), 0);
    c.go_stale();
    c.revalidate(|_, _| None, &HashSet::new());
    assert_eq!(c.keys(), 0, "unpinned answers go with the next change");
}

/// The answers `lookups` put, and after the route change of the test.
fn c_answer(k: &FibKey) -> Answer {
    if k.reverse {
        Answer::Reverse(Some(LAN))
    } else if k.in_ifindex == WAN {
        via(LAN, [2, 0, 0, 0, 0, 2])
    } else {
        via(WAN, GW)
    }
}

fn c_answer_now(k: &FibKey) -> Option<Answer> {
    Some(if k.dst == ip("203.0.113.5") && !k.reverse { via(WAN, [2, 0, 0, 0, 0, 0x33]) } else { c_answer(k) })
}

/// A connection pinned while the cache is stale is re-judged at the
/// revalidation unless its answer is the new one; one whose key was
/// dropped is known again.
#[test]
fn pins_made_while_stale() {
    let mut c = FibCache::default();
    let (used, asked) = lookups(&mut c, "203.0.113.5");
    c.pin(conn(1), &used, &asked);
    c.go_stale();
    c.pin(conn(2), &used, &asked);
    let mut out = c.revalidate(|k, _| c_answer_now(k), &HashSet::new());
    out.sort_unstable();
    assert_eq!(out, vec![conn(1), conn(2)], "both resolved with the old answer, or unknown which");
    let fresh = Packet { in_ifindex: LAN, ..packet("192.168.1.9", "203.0.113.5") };
    c.go_stale();
    c.pin(conn(3), &[used[0], Some(key(&fresh)), used[2]], &[asked[0], Some(fresh), asked[2]]);
    let out = c.revalidate(|k, _| c_answer_now(k), &HashSet::new());
    assert_eq!(out, vec![conn(3)], "a key first seen while stale has no answer to compare");
}

/// Unused answers are bounded; answers in use are never dropped.
#[test]
fn unused_answers_are_bounded() {
    let mut c = FibCache::default();
    let (used, asked) = lookups(&mut c, "203.0.113.5");
    c.pin(conn(1), &used, &asked);
    for n in 0..(UNUSED_MAX as u32 + 10) {
        let p = packet("192.168.1.2", &std::net::Ipv4Addr::from(0x0a00_0000 + n).to_string());
        c.put(key(&p), p, via(WAN, GW));
    }
    assert!(c.keys() <= UNUSED_MAX + 3, "{}", c.keys());
    assert!(used.iter().flatten().all(|k| c.get(k).is_some()), "pinned answers stay");
}
