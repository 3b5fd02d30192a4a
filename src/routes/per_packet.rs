//! Routes whose choice depends on something each packet carries beyond
//! conntrack's tuple, which the engine's FIB query (one per connection and
//! direction, `bpf_fib_lookup` without a packet) cannot be given:
//!
//! - a route with a tos (`ip route add ... tos T`, IPv4 only: IPv6 routes
//!   take none): `fib_table_lookup` (net/ipv4/fib_trie.c) skips an alias
//!   whose `fa_dscp` the flow's dscp does not match, and the query always
//!   asks with tos 0, so a packet that carries T takes a route the query
//!   never sees;
//! - a multipath route (RTA_MULTIPATH, or a nexthop group) whose hash of a
//!   forwarded packet the query cannot reproduce. `fib_select_path` /
//!   `fib6_select_path` hash the packet (`fib_multipath_hash`,
//!   `rt6_multipath_hash`, net/ipv4/route.c, net/ipv6/route.c); the query
//!   gets the flowi variant of the same function, without the skb:
//!
//!   | policy | IPv4 | IPv6 |
//!   |---|---|---|
//!   | 0 (L3) | addresses: same | addresses and the flow label, which the query passes as 0 |
//!   | 1 (L4) | `skb->l4_hash`'s hash when the packet has one (a NIC's receive hash): not the 5-tuple's | same |
//!   | 2 (L3 or inner L3) | outer addresses of a TCP/UDP packet: same | the flow label again |
//!   | 3 (custom fields) | `jhash_2words(outer, inner)` for an skb, the outer hash alone for a flowi | same |
//!
//!   so only IPv4 under policies 0 and 2 is reproduced. IPv6 flow labels
//!   change within a connection by design (`sk_rethink_txhash` on a
//!   retransmission timeout), so no one label could be asked either.
//!
//! A connection that either direction's lookup asks about a destination
//! under such a route stays on the slow path (`NoPath::PerPacket`): a
//! superset, since a more specific plain route may win, and routes of every
//! table count, whichever the rules select.

use std::fmt;
use std::net::IpAddr;

use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::policy::exclude::Cidr;

/// What makes a route's choice per packet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PerPacket {
    /// A route to `prefix` selects on tos.
    Tos { prefix: String },
    /// A multipath route to `prefix` hashes `on` to pick its path.
    Multipath { prefix: String, on: HashInput },
    /// The routes could not be read: nothing is known.
    Unread,
}

/// What a multipath hash takes from each packet that the query lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashInput {
    /// IPv6 policies 0 and 2.
    FlowLabel,
    /// Policy 1: a receive hash the NIC gave the packet.
    ReceiveHash,
    /// Policy 3: the inner headers' hash mixed in for a packet.
    Custom,
    /// A policy this engine does not know, or unreadable.
    Unknown(Option<u32>),
}

impl fmt::Display for PerPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PerPacket::Tos { prefix } => {
                write!(
                    f,
                    "the route to {prefix} selects on tos, which each packet carries and conntrack does not record"
                )
            }
            PerPacket::Multipath { prefix, on } => {
                write!(f, "the multipath route to {prefix} picks its path by a hash of {on}, which the route lookup cannot be given")
            }
            PerPacket::Unread => f.write_str("the routes could not be read"),
        }
    }
}

impl fmt::Display for HashInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashInput::FlowLabel => f.write_str("each packet's IPv6 flow label (fib_multipath_hash_policy 0 or 2)"),
            HashInput::ReceiveHash => {
                f.write_str("the receive hash a NIC gives each packet (fib_multipath_hash_policy 1)")
            }
            HashInput::Custom => f.write_str("each packet's inner headers too (fib_multipath_hash_policy 3)"),
            HashInput::Unknown(Some(p)) => write!(f, "what fib_multipath_hash_policy {p} takes"),
            HashInput::Unknown(None) => f.write_str("what an unreadable fib_multipath_hash_policy takes"),
        }
    }
}

/// What a multipath hash of a forwarded packet takes that the query cannot
/// be given, by family and `fib_multipath_hash_policy` (`None`: the sysctl
/// could not be read); `None` when the query hashes the same (see the
/// module's table).
pub fn hash_per_packet(v6: bool, policy: Option<u32>) -> Option<HashInput> {
    match (v6, policy) {
        (false, Some(0 | 2)) => None,
        (true, Some(0 | 2)) => Some(HashInput::FlowLabel),
        (_, Some(1)) => Some(HashInput::ReceiveHash),
        (_, Some(3)) => Some(HashInput::Custom),
        (_, p) => Some(HashInput::Unknown(p)),
    }
}

/// `net.ipv{4,6}.fib_multipath_hash_policy` of this namespace.
pub fn read_hash_policy(v6: bool) -> Option<u32> {
    let path = format!("/proc/sys/net/ipv{}/fib_multipath_hash_policy", if v6 { 6 } else { 4 });
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Both families' routes and hash policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    pub v4: FamilyRoutes,
    pub v6: FamilyRoutes,
    /// Each family's `fib_multipath_hash_policy` (v4, v6); `None`:
    /// unreadable.
    pub policy: (Option<u32>, Option<u32>),
}

impl Routes {
    pub fn read() -> Self {
        Routes {
            v4: FamilyRoutes::read(false),
            v6: FamilyRoutes::read(true),
            policy: (read_hash_policy(false), read_hash_policy(true)),
        }
    }

    pub fn family(&self, v6: bool) -> &FamilyRoutes {
        if v6 {
            &self.v6
        } else {
            &self.v4
        }
    }

    /// Whether the routes to `dst` depend on what each packet carries: then
    /// no lookup answers for the whole connection.
    pub fn per_packet(&self, dst: IpAddr) -> Option<PerPacket> {
        let policy = if dst.is_ipv6() { self.policy.1 } else { self.policy.0 };
        self.family(dst.is_ipv6()).per_packet(dst, policy)
    }

    /// The hash policies read again (a sysctl changes them, which nothing
    /// announces), and the routes after a failed read: whether anything
    /// `per_packet` answers from changed.
    pub fn recheck(&mut self) -> bool {
        let before = self.clone();
        self.policy = (read_hash_policy(false), read_hash_policy(true));
        if self.v4.unread || self.v6.unread {
            (self.v4, self.v6) = (FamilyRoutes::read(false), FamilyRoutes::read(true));
        }
        before != *self
    }
}

/// The routes of one family, as far as the lookups care.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyRoutes {
    /// Some route is multipath or names a nexthop object: answers hash the
    /// flow and are not cached (`cache`).
    pub multipath: bool,
    /// Destinations of routes with a tos.
    pub tos: Vec<Cidr>,
    /// Destinations of routes whose path a hash picks: RTA_MULTIPATH, or a
    /// nexthop object the dump does not show as one path (a group; with
    /// `nexthop_compat_mode` 0 every object, as its paths are not shown).
    pub hashed: Vec<Cidr>,
    /// The dump failed.
    pub unread: bool,
}

impl FamilyRoutes {
    /// The namespace's routes of the family, every table (RTM_GETROUTE
    /// dump). A failed dump is `unread`, which keeps the family's
    /// connections on the slow path until a read succeeds.
    pub fn read(v6: bool) -> Self {
        let mut req = RouteMessage::default();
        req.header.address_family = if v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
        match super::dump::dump(RouteNetlinkMessage::GetRoute(req), "route") {
            Ok(msgs) => Self::from_routes(msgs.iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })),
            Err(e) => {
                tracing::warn!("{e:#}: the family's connections stay on the slow path until the routes can be read");
                FamilyRoutes { multipath: true, unread: true, ..Default::default() }
            }
        }
    }

    pub fn from_routes<'a>(routes: impl IntoIterator<Item = &'a RouteMessage>) -> Self {
        let mut f = FamilyRoutes::default();
        for r in routes {
            let a = &r.attributes;
            let nh_object = a.iter().any(|x| matches!(x, RouteAttribute::NhId(_)));
            let paths = a.iter().any(|x| matches!(x, RouteAttribute::MultiPath(_)));
            // In nexthop_compat_mode (the default) a route through an
            // object also shows its path(s): one as RTA_OIF, a group as
            // RTA_MULTIPATH (fib_dump_info, rt6_fill_node).
            let one_path = a.iter().any(|x| matches!(x, RouteAttribute::Oif(_)));
            f.multipath |= paths || nh_object;
            if r.header.tos != 0 {
                f.tos.push(destination(r));
            }
            if paths || (nh_object && !one_path) {
                f.hashed.push(destination(r));
            }
        }
        f
    }

    /// The first route under which `dst`'s lookups depend on each packet,
    /// given the family's hash policy.
    pub fn per_packet(&self, dst: IpAddr, policy: Option<u32>) -> Option<PerPacket> {
        if self.unread {
            return Some(PerPacket::Unread);
        }
        if let Some(c) = self.tos.iter().find(|c| c.contains(dst)) {
            return Some(PerPacket::Tos { prefix: c.to_string() });
        }
        let on = hash_per_packet(dst.is_ipv6(), policy)?;
        let c = self.hashed.iter().find(|c| c.contains(dst))?;
        Some(PerPacket::Multipath { prefix: c.to_string(), on })
    }
}

/// A route's destination prefix (the default route when it has none).
/// The kernel keeps host bits zero; anything else covers the family.
fn destination(r: &RouteMessage) -> Cidr {
    let v6 = r.header.address_family == AddressFamily::Inet6;
    let addr = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    });
    let any: IpAddr = if v6 { [0u16; 8].into() } else { [0u8; 4].into() };
    addr.and_then(|a| Cidr::new(a, r.header.destination_prefix_length))
        .unwrap_or_else(|| Cidr::new(any, 0).expect("the default route"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteNextHop;

    fn route(dst: &str, len: u8, tos: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let a: IpAddr = dst.parse().unwrap();
        let mut r = RouteMessage::default();
        r.header.address_family = if a.is_ipv6() { AddressFamily::Inet6 } else { AddressFamily::Inet };
        r.header.destination_prefix_length = len;
        r.header.tos = tos;
        let d = match a {
            IpAddr::V4(v) => RouteAddress::Inet(v),
            IpAddr::V6(v) => RouteAddress::Inet6(v),
        };
        r.attributes = [vec![RouteAttribute::Destination(d)], attrs].concat();
        r
    }

    #[test]
    fn which_hash_the_lookup_reproduces() {
        use HashInput::*;
        #[rustfmt::skip]
        let cases = [
            (false, Some(0), None), (false, Some(2), None),
            (false, Some(1), Some(ReceiveHash)), (false, Some(3), Some(Custom)),
            (true, Some(0), Some(FlowLabel)), (true, Some(2), Some(FlowLabel)),
            (true, Some(1), Some(ReceiveHash)), (true, Some(3), Some(Custom)),
            (false, Some(9), Some(Unknown(Some(9)))), (true, None, Some(Unknown(None))),
        ];
        for (v6, policy, want) in cases {
            assert_eq!(hash_per_packet(v6, policy), want, "v6 {v6}, policy {policy:?}");
        }
    }

    /// Which destinations a table of routes makes per packet, by policy.
    #[test]
    fn routes_on_tos_and_hashed_paths() {
        use RouteAttribute as A;
        let two = || A::MultiPath(vec![RouteNextHop::default(), RouteNextHop::default()]);
        let v4 = FamilyRoutes::from_routes(&[
            route("0.0.0.0", 0, 0, vec![A::Oif(2)]),
            route("198.51.100.0", 24, 0x10, vec![A::Oif(2)]),
            route("192.0.2.0", 24, 0, vec![two()]),
            // a nexthop object with one path (compat mode shows it)
            route("203.0.113.0", 24, 0, vec![A::NhId(1), A::Oif(2)]),
            // a nexthop object whose paths the dump does not show
            route("100.64.0.0", 10, 0, vec![A::NhId(2)]),
        ]);
        assert!(v4.multipath && !v4.unread);
        let v6 = FamilyRoutes::from_routes(&[route("2001:db8::", 32, 0, vec![two()])]);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let tos = |p: &str| Some(PerPacket::Tos { prefix: p.into() });
        let mp = |p: &str, on| Some(PerPacket::Multipath { prefix: p.into(), on });
        #[rustfmt::skip]
        let cases = [
            ("plain", &v4, "10.1.2.3", Some(0), None),
            ("tos route", &v4, "198.51.100.7", Some(0), tos("198.51.100.0/24")),
            ("ECMP, addresses hashed", &v4, "192.0.2.9", Some(0), None),
            ("ECMP, L4 hash", &v4, "192.0.2.9", Some(1), mp("192.0.2.0/24", HashInput::ReceiveHash)),
            ("one-path object, L4 hash", &v4, "203.0.113.9", Some(1), None),
            ("object of unknown paths, L4 hash", &v4, "100.64.1.1", Some(1), mp("100.64.0.0/10", HashInput::ReceiveHash)),
            ("IPv6 ECMP, flow label hashed", &v6, "2001:db8::1", Some(0), mp("2001:db8::/32", HashInput::FlowLabel)),
            ("IPv6 outside it", &v6, "2001:db9::1", Some(0), None),
        ];
        for (what, routes, dst, policy, want) in cases {
            assert_eq!(routes.per_packet(ip(dst), policy), want, "{what}");
        }
        let unread = FamilyRoutes { unread: true, ..Default::default() };
        assert_eq!(unread.per_packet(ip("10.0.0.1"), Some(0)), Some(PerPacket::Unread));
        assert_eq!(
            tos("198.51.100.0/24").unwrap().to_string(),
            "the route to 198.51.100.0/24 selects on tos, which each packet carries and conntrack does not record"
        );
        assert_eq!(
            mp("2001:db8::/32", HashInput::FlowLabel).unwrap().to_string(),
            "the multipath route to 2001:db8::/32 picks its path by a hash of each packet's IPv6 flow label \
             (fib_multipath_hash_policy 0 or 2), which the route lookup cannot be given"
        );
    }
}
