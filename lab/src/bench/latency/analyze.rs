//! From the taps' events to per-connection timelines (pure).

use std::collections::{HashMap, HashSet};

const FIN_SYN_RST: u8 = 0x07;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// One tap event (struct lat_event in bench.bpf.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Event {
    pub ts_ns: u64,
    pub id: u32,
    pub len: u32,
    /// The client's port.
    pub port: u16,
    /// 0: from the LAN (client to server), 1: from the WAN.
    pub dir: u8,
    /// 0: lat_pre (every packet), 1: lat_post (slow path).
    pub kind: u8,
    pub tcp_flags: u8,
}

impl Event {
    pub(super) const SIZE: usize = 24;

    pub(super) fn parse(b: &[u8]) -> Option<Event> {
        if b.len() < Self::SIZE {
            return None;
        }
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Some(Event {
            ts_ns: u64::from_ne_bytes(b[0..8].try_into().expect("8 bytes")),
            id: u32_at(8),
            len: u32_at(12),
            port: u16::from_ne_bytes([b[16], b[17]]),
            dir: b[18],
            kind: b[19],
            tcp_flags: b[20],
        })
    }
}

/// One connection as the router's ingress saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Timeline {
    pub port: u16,
    /// The nth connection from this client port (0 first).
    pub nth: usize,
    /// The client's ACK completing the handshake: conntrack makes the entry
    /// ASSURED on it.
    pub eligible_ns: Option<u64>,
    /// The first packet after that which the fast path forwarded.
    pub first_fast_ns: Option<u64>,
    pub pkts: u64,
    pub fast_pkts: u64,
    pub bytes: u64,
    pub fast_bytes: u64,
    synack_seen: bool,
}

impl Timeline {
    pub(super) fn latency_ns(&self) -> Option<u64> {
        Some(self.first_fast_ns?.saturating_sub(self.eligible_ns?))
    }

    /// (packet share, byte share) that took the fast path.
    pub(super) fn fast_shares(&self) -> (f64, f64) {
        let r = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        (r(self.fast_pkts, self.pkts), r(self.fast_bytes, self.bytes))
    }
}

/// Split the events into connections (a client SYN starts one on its port)
/// and mark each packet fast (seen by lat_pre only) or slow.
pub(super) fn connections(events: &[Event]) -> Vec<Timeline> {
    let slow: HashSet<u32> = events.iter().filter(|e| e.kind == 1).map(|e| e.id).collect();
    let mut pre: Vec<&Event> = events.iter().filter(|e| e.kind == 0).collect();
    pre.sort_by_key(|e| (e.ts_ns, e.id));
    let mut out: Vec<Timeline> = Vec::new();
    let mut current: HashMap<u16, usize> = HashMap::new();
    let mut count: HashMap<u16, usize> = HashMap::new();
    for e in pre {
        let f = e.tcp_flags;
        if e.dir == 0 && f & (SYN | ACK) == SYN {
            let nth = count.entry(e.port).or_default();
            // A retransmitted SYN belongs to the connection it opened.
            let retransmit = current.get(&e.port).is_some_and(|&i| out[i].pkts == 1 && !out[i].synack_seen);
            if !retransmit {
                current.insert(e.port, out.len());
                out.push(Timeline { port: e.port, nth: *nth, ..Default::default() });
                *nth += 1;
            }
        }
        let Some(&i) = current.get(&e.port) else { continue };
        let t = &mut out[i];
        t.pkts += 1;
        t.bytes += u64::from(e.len);
        if e.dir == 1 && f & (SYN | ACK) == SYN | ACK {
            t.synack_seen = true;
        }
        if e.dir == 0 && t.synack_seen && t.eligible_ns.is_none() && f & FIN_SYN_RST == 0 && f & ACK != 0 {
            t.eligible_ns = Some(e.ts_ns);
        }
        if !slow.contains(&e.id) {
            t.fast_pkts += 1;
            t.fast_bytes += u64::from(e.len);
            if t.eligible_ns.is_some() && t.first_fast_ns.is_none() {
                t.first_fast_ns = Some(e.ts_ns);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: u32, ts: u64, port: u16, dir: u8, flags: u8, slow: bool) -> Vec<Event> {
        let e = Event { ts_ns: ts, id, len: 100, port, dir, kind: 0, tcp_flags: flags };
        let mut v = vec![e];
        if slow {
            v.push(Event { kind: 1, ts_ns: ts + 1, ..e });
        }
        v
    }

    #[test]
    fn handshake_then_fast_path() {
        let mut v = Vec::new();
        v.extend(ev(0, 1000, 40000, 0, SYN, true));
        v.extend(ev(1, 2000, 40000, 1, SYN | ACK, true));
        v.extend(ev(2, 3000, 40000, 0, ACK, true)); // makes it ASSURED
        v.extend(ev(3, 4000, 40000, 0, ACK | 0x08, true));
        v.extend(ev(5, 9000, 40000, 0, ACK, false)); // first fast
        v.extend(ev(6, 9500, 40000, 1, ACK, false));
        // another port's connection in between, never offloaded
        v.extend(ev(4, 5000, 40001, 0, SYN, true));
        let c = connections(&v);
        assert_eq!(c.len(), 2);
        let a = &c[0];
        assert_eq!((a.port, a.nth, a.pkts, a.fast_pkts), (40000, 0, 6, 2));
        assert_eq!(a.eligible_ns, Some(3000));
        assert_eq!(a.latency_ns(), Some(6000));
        assert_eq!(a.fast_shares(), (2.0 / 6.0, 2.0 / 6.0));
        assert_eq!(c[1].latency_ns(), None);
        assert_eq!(c[1].fast_shares(), (0.0, 0.0));
    }

    #[test]
    fn port_reuse_starts_a_new_connection_and_syn_retransmit_does_not() {
        let mut v = Vec::new();
        v.extend(ev(0, 10, 40000, 0, SYN, true));
        v.extend(ev(1, 20, 40000, 0, SYN, true)); // retransmit
        v.extend(ev(2, 30, 40000, 1, SYN | ACK, true));
        v.extend(ev(3, 40, 40000, 0, ACK, true));
        v.extend(ev(4, 50, 40000, 0, ACK | 0x01, true));
        v.extend(ev(5, 60, 40000, 0, SYN, true)); // reused port
        let c = connections(&v);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].nth, c[0].pkts, c[1].nth, c[1].pkts), (0, 5, 1, 1));
    }

    #[test]
    fn parses_the_bpf_struct() {
        let mut b = vec![0u8; Event::SIZE];
        b[0..8].copy_from_slice(&7u64.to_ne_bytes());
        b[8..12].copy_from_slice(&3u32.to_ne_bytes());
        b[12..16].copy_from_slice(&1514u32.to_ne_bytes());
        b[16..18].copy_from_slice(&40123u16.to_ne_bytes());
        b[18] = 1;
        b[19] = 1;
        b[20] = ACK;
        let e = Event::parse(&b).unwrap();
        assert_eq!(e, Event { ts_ns: 7, id: 3, len: 1514, port: 40123, dir: 1, kind: 1, tcp_flags: ACK });
        assert!(Event::parse(&b[..10]).is_none());
    }
}
