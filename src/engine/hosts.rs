//! Per-host accounting: packets and bytes each host sent and received
//! through the router, offloaded traffic included. conntrack's own
//! counters (`nf_conntrack_acct`, which nlbwmon, LuCI and conntrack
//! exporters read) count only what conntrack sees, and ctnetlink cannot add
//! to them, so an offloaded connection's fast-path packets are missing
//! there. Here a host's total is:
//!
//! - retired: connections that ended (conntrack's DESTROY event carries its
//!   final counters) and fast-path entries that were taken down (their map
//!   counters read just before), added up when it happens;
//! - live: every conntrack entry's counters now, plus each offloaded
//!   connection's fast-path counters now (`Core::host_list`).
//!
//! Fast-path and conntrack packets never overlap (a fast-pathed packet
//! skips conntrack), so the sum counts each packet once, and it only grows:
//! what leaves the live part enters the retired part at the same moment.
//! Counters lost with conntrack events (an overrun) are lost here too.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::conntrack::{status, CtEntry};
use crate::control::HostView;

/// Hosts kept in the retired totals; beyond, their traffic is counted under
/// `other` (a router without NAT routes for whole networks).
pub const MAX_HOSTS: usize = 4096;

/// Which host a connection is accounted to, and whether that host sent
/// its original direction: a source-NATed connection (masquerade) to its
/// inside source, a destination-NATed one (a port forward) to the inside
/// server it reaches, any other to the host that opened it.
pub fn host_of(e: &CtEntry) -> (IpAddr, bool) {
    if e.status & status::SRC_NAT == 0 && e.status & status::DST_NAT != 0 {
        (e.reply.src, false)
    } else {
        (e.orig.src, true)
    }
}

/// Whether a connection passes through the router rather than ends at it:
/// neither opened by one of its addresses (the original source) nor
/// answered by one (the reply's source; a port forward's original
/// destination is the router's, but the LAN server answers). Router-local
/// traffic (its DNS, pings, management) is not a host's traffic through it.
pub fn through_router(e: &CtEntry, is_local: impl Fn(IpAddr) -> bool) -> bool {
    !is_local(e.orig.src) && !is_local(e.reply.src)
}

/// (packets, bytes) per direction.
pub type Dirs = [(u64, u64); 2];

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub up_packets: u64,
    pub up_bytes: u64,
    pub down_packets: u64,
    pub down_bytes: u64,
}

impl Totals {
    /// Add a connection's original and reply counters, `sent_orig`: whether
    /// the host is the original direction's sender.
    pub fn add(&mut self, sent_orig: bool, d: Dirs) {
        let (up, down) = if sent_orig { (d[0], d[1]) } else { (d[1], d[0]) };
        self.up_packets += up.0;
        self.up_bytes += up.1;
        self.down_packets += down.0;
        self.down_bytes += down.1;
    }

    fn merge(&mut self, o: &Totals) {
        self.up_packets += o.up_packets;
        self.up_bytes += o.up_bytes;
        self.down_packets += o.down_packets;
        self.down_bytes += o.down_bytes;
    }
}

/// The totals of what has ended, per host (None: `other`).
#[derive(Debug, Default)]
pub struct Hosts {
    retired: HashMap<Option<IpAddr>, Totals>,
}

impl Hosts {
    /// Count what a connection carried, now that it is no longer live.
    pub fn retire(&mut self, e: &CtEntry, d: Dirs) {
        if d == [(0, 0), (0, 0)] {
            return;
        }
        let (host, sent_orig) = host_of(e);
        let key =
            if self.retired.contains_key(&Some(host)) || self.retired.len() < MAX_HOSTS { Some(host) } else { None };
        self.retired.entry(key).or_default().add(sent_orig, d);
    }

    /// Hosts with their totals: the retired ones plus `live` (per host, the
    /// totals of its live connections and their number), sorted by address.
    pub fn view(&self, live: &HashMap<IpAddr, (Totals, usize)>) -> Vec<HostView> {
        let mut all: HashMap<Option<IpAddr>, (Totals, usize)> =
            self.retired.iter().map(|(h, t)| (*h, (*t, 0))).collect();
        for (h, (t, n)) in live {
            let key = if all.contains_key(&Some(*h)) || all.len() < MAX_HOSTS { Some(*h) } else { None };
            let e = all.entry(key).or_default();
            e.0.merge(t);
            e.1 += n;
        }
        let mut v: Vec<HostView> = all
            .into_iter()
            .map(|(h, (t, n))| HostView {
                host: h.map_or_else(|| "other".to_string(), |a| a.to_string()),
                connections: n,
                upload_packets: t.up_packets,
                upload_bytes: t.up_bytes,
                download_packets: t.down_packets,
                download_bytes: t.down_bytes,
            })
            .collect();
        v.sort_by(|a, b| {
            (a.host == "other", a.host.parse::<IpAddr>().ok()).cmp(&(b.host == "other", b.host.parse().ok()))
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::tests::{tcp_masq, tuple};

    fn entry(o: (&str, &str), r: (&str, &str), st: u32) -> CtEntry {
        let t = |(s, d): (&str, &str)| tuple(s, 1, d, 2, 6);
        CtEntry { orig: t(o), reply: t(r), status: st, ..tcp_masq() }
    }

    #[test]
    fn the_inside_host_is_accounted() {
        // (orig, reply, status) -> (host, host sent the original direction)
        let cases = [
            // masquerade: the LAN client
            ((("192.168.1.2", "203.0.113.2"), ("203.0.113.2", "203.0.113.1"), status::SRC_NAT), ("192.168.1.2", true)),
            // port forward: the LAN server it reaches, which sends the reply
            (
                (("198.51.100.7", "203.0.113.1"), ("192.168.1.5", "198.51.100.7"), status::DST_NAT),
                ("192.168.1.5", false),
            ),
            // both (hairpin NAT): the inside client
            (
                (("192.168.1.2", "203.0.113.1"), ("192.168.1.5", "192.168.1.1"), status::SRC_NAT | status::DST_NAT),
                ("192.168.1.2", true),
            ),
            // routed, no NAT (IPv6): who opened it
            ((("fd00:1::2", "fd00:2::2"), ("fd00:2::2", "fd00:1::2"), 0), ("fd00:1::2", true)),
        ];
        for ((o, r, st), (host, sent)) in cases {
            assert_eq!(host_of(&entry(o, r, st)), (host.parse().unwrap(), sent), "{o:?} {r:?} {st:#x}");
        }
    }

    #[test]
    fn router_local_connections_are_no_hosts_traffic() {
        let local = |ip: IpAddr| ["192.168.1.1", "203.0.113.1"].contains(&ip.to_string().as_str());
        for (o, r, st, through) in [
            // the router pings a LAN host; a LAN host asks the router's DNS
            (("192.168.1.1", "192.168.1.2"), ("192.168.1.2", "192.168.1.1"), 0, false),
            (("192.168.1.2", "192.168.1.1"), ("192.168.1.1", "192.168.1.2"), 0, false),
            // masqueraded through it; a port forward to a LAN server
            (("192.168.1.2", "198.51.100.7"), ("198.51.100.7", "203.0.113.1"), status::SRC_NAT, true),
            (("198.51.100.7", "203.0.113.1"), ("192.168.1.5", "198.51.100.7"), status::DST_NAT, true),
        ] {
            assert_eq!(through_router(&entry(o, r, st), local), through, "{o:?} {r:?}");
        }
    }

    #[test]
    fn totals_grow_from_retired_and_live_parts() {
        let mut h = Hosts::default();
        let masq = entry(("192.168.1.2", "203.0.113.2"), ("203.0.113.2", "203.0.113.1"), status::SRC_NAT);
        let fwd = entry(("198.51.100.7", "203.0.113.1"), ("192.168.1.5", "198.51.100.7"), status::DST_NAT);
        h.retire(&masq, [(10, 1_000), (20, 30_000)]);
        h.retire(&fwd, [(5, 500), (7, 7_000)]);
        h.retire(&fwd, [(0, 0), (0, 0)]);
        let live = HashMap::from([(
            "192.168.1.2".parse().unwrap(),
            (Totals { up_packets: 1, up_bytes: 100, down_packets: 2, down_bytes: 2_000 }, 1),
        )]);
        let v = h.view(&live);
        assert_eq!(v.len(), 2);
        assert_eq!(
            (&v[0].host[..], v[0].connections, v[0].upload_bytes, v[0].download_bytes, v[0].download_packets),
            ("192.168.1.2", 1, 1_100, 32_000, 22)
        );
        // The port-forwarded server uploads what it sends back.
        assert_eq!((&v[1].host[..], v[1].upload_bytes, v[1].download_bytes), ("192.168.1.5", 7_000, 500));
    }

    #[test]
    fn hosts_beyond_the_bound_are_other() {
        let mut h = Hosts::default();
        for i in 0..MAX_HOSTS + 10 {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).to_string();
            h.retire(&entry((&a, "203.0.113.2"), ("203.0.113.2", &a), 0), [(1, 10), (1, 10)]);
        }
        let v = h.view(&HashMap::new());
        assert_eq!(v.len(), MAX_HOSTS + 1);
        let other = v.last().unwrap();
        assert_eq!((&other.host[..], other.upload_bytes), ("other", 100));
    }
}
