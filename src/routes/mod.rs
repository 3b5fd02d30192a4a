//! Routes, neighbours and links: where a flow's packets leave and whether
//! that changed.
//!
//! Next hops come from the kernel's own forwarding decision: `bpf_fib_lookup`
//! run through BPF_PROG_TEST_RUN (see `Dataplane::fib_query`), so policy
//! routing, ECMP and neighbour state are exactly the kernel's. Changes are
//! learnt from rtnetlink multicast groups; the engine then re-resolves the
//! offloaded flows whose answers may have moved (the kernel flowtable only
//! checks its cached dst, `nf_flow_dst_check`): answers are cached and
//! asked again once per distinct key on a change (`cache`).

pub mod addrs;
pub mod cache;
pub(crate) mod dump;
pub mod link;
mod metric;
pub mod path;
pub mod per_packet;
pub mod rules;
pub mod solicit;

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;

use anyhow::{Context, Result};
use netlink_packet_core::Parseable;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::RouteNetlinkMessage;

use crate::dataplane::{fo_fib_req, Dataplane};
use crate::flow::entry::{addr_words, AF_INET, AF_INET6};
use crate::flow::NextHop;
use crate::nlwatch::Subscription;

/// bpf_fib_lookup results (include/uapi/linux/bpf.h, BPF_FIB_LKUP_RET_*).
pub fn fib_ret_str(ret: i32) -> &'static str {
    match ret {
        0 => "ok",
        1 => "blackhole route",
        2 => "unreachable route",
        3 => "prohibited route",
        4 => "destination is local (not forwarded)",
        5 => "forwarding disabled on the input interface",
        6 => "unsupported lightweight tunnel",
        7 => "next-hop neighbour not resolved yet",
        8 => "fragmentation needed",
        _ if ret < 0 => "lookup error",
        _ => "unknown",
    }
}

pub const FIB_NO_NEIGH: i32 = 7;
use crate::dataplane::routes_flags::{MARK as BPF_FIB_LOOKUP_MARK, SKIP_NEIGH as BPF_FIB_LOOKUP_SKIP_NEIGH};
/// What a kernel without BPF_FIB_LOOKUP_MARK (6.10) answers it with: it
/// refuses unknown flags (`bpf_xdp_fib_lookup`, net/core/filter.c).
pub const FIB_NO_MARK: i32 = -libc::EINVAL;

/// Why a direction could not be resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unroutable(pub i32);

impl Unroutable {
    pub fn as_str(self) -> &'static str {
        fib_ret_str(self.0)
    }
    /// Worth retrying soon: the kernel resolves neighbours as traffic passes.
    pub fn transient(self) -> bool {
        self.0 == FIB_NO_NEIGH
    }
}

#[allow(clippy::too_many_arguments)] // one argument per bpf_fib_lookup input
fn req(
    family: u8,
    in_ifindex: u32,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    flags: u32,
    mark: u32,
) -> fo_fib_req {
    fo_fib_req {
        family: u32::from(family),
        ifindex_in: in_ifindex,
        proto: u32::from(proto),
        sport: sport.to_be(),
        dport: dport.to_be(),
        src: addr_words(src),
        dst: addr_words(dst),
        flags: if mark != 0 { flags | BPF_FIB_LOOKUP_MARK } else { flags },
        mark,
        ..Default::default()
    }
}

fn family_of(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

/// One packet to route: what `ip_route_input` keys its lookup on that
/// conntrack knows (the tos is not: see `rules`).
#[derive(Debug, Clone, Copy)]
pub struct Packet {
    pub in_ifindex: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// The packet's mark as the rules see it; 0 leaves it out.
    pub mark: u32,
}

/// The kernel's forwarding decision for packet `p`. A mark on a kernel
/// whose lookup cannot take one is `Ok(Err(Unroutable(-EINVAL)))`.
pub fn resolve(dp: &Dataplane, p: &Packet) -> Result<std::result::Result<NextHop, Unroutable>> {
    Ok(answer(&ask(dp, p)?))
}

/// The FIB oracle's raw answer for `p`.
fn ask(dp: &Dataplane, p: &Packet) -> Result<fo_fib_req> {
    dp.fib_query(&req(family_of(p.src), p.in_ifindex, p.src, p.dst, p.proto, p.sport, p.dport, 0, p.mark))
}

fn answer(r: &fo_fib_req) -> std::result::Result<NextHop, Unroutable> {
    if r.ret != 0 {
        return Err(Unroutable(r.ret));
    }
    Ok(NextHop { ifindex: r.ifindex_out, smac: r.smac, dmac: r.dmac, mtu: r.mtu.min(0xffff) as u16, xdp_ok: false })
}

/// `resolve`, with the MTU metric of `p`'s route when some route has one
/// (`facts.route_mtus`): the helper's MTU leaves out an unlocked metric
/// that forwarding honours (see `metric`).
pub fn resolve_with(
    dp: &Dataplane,
    facts: &RouteFacts,
    p: &Packet,
) -> Result<std::result::Result<NextHop, Unroutable>> {
    let raw = ask(dp, p)?;
    if raw.ret == FIB_NO_NEIGH {
        facts.solicit(raw.ifindex_out, crate::flow::entry::words_addr(family_of(p.dst), &raw.nh));
    }
    let mut r = answer(&raw);
    if let (Ok(nh), true) = (&mut r, facts.route_mtus) {
        if let Some(m) = metric::forward_mtu_metric(p)? {
            nh.mtu = nh.mtu.min(m.min(0xffff) as u16);
        }
    }
    Ok(r)
}

/// Which interface the kernel would forward packets for `dst` out of
/// (neighbour not needed). Used to find where a connection's
/// original direction arrives: the reverse path, as rp_filter assumes.
pub fn egress_for(dp: &Dataplane, any_ifindex: u32, dst: IpAddr) -> Result<Option<u32>> {
    let p = reverse_packet(any_ifindex, dst);
    // BPF_FIB_LOOKUP_OUTPUT would take the interface as oif and needs a
    // device, so ask as a forwarded packet from any managed interface and
    // skip the neighbour. A kernel without SKIP_NEIGH (before 6.3 unless
    // backported) refuses the flag with -EINVAL: ask it with the neighbour
    // lookup instead, whose NO_NEIGH answer still names the interface
    // (bpf_ipv4_fib_lookup / bpf_ipv6_fib_lookup set params->ifindex
    // before looking the neighbour up), so the answer is the same.
    let flags = if dp.features().fib_skip_neigh { BPF_FIB_LOOKUP_SKIP_NEIGH } else { 0 };
    let r = dp.fib_query(&req(family_of(dst), any_ifindex, p.src, dst, 0, 0, 0, flags, 0))?;
    if r.ret == 0 || r.ret == FIB_NO_NEIGH {
        Ok(Some(r.ifindex_out))
    } else {
        Ok(None)
    }
}

/// The packet `egress_for` asks about.
fn reverse_packet(any_ifindex: u32, dst: IpAddr) -> Packet {
    let unspecified: IpAddr = if dst.is_ipv4() { [0u8; 4].into() } else { [0u8; 16].into() };
    Packet { in_ifindex: any_ifindex, src: unspecified, dst, proto: 0, sport: 0, dport: 0, mark: 0 }
}

/// A neighbour as an rtnetlink message states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub addr: IpAddr,
    /// Its link-layer address while bpf_fib_lookup would use it (NUD_VALID
    /// states: `bpf_ipv4_fib_lookup` answers NO_NEIGH otherwise); `None`
    /// when deleted, failed or still resolving.
    pub lladdr: Option<[u8; 6]>,
}

/// A neighbour whose forwarding answer changed (not STALE <-> REACHABLE
/// churn): `was` is the MAC the fast path may have installed for it,
/// `None` if it had none usable (then no installed flow uses it; waiting
/// ones may now have a path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeighChange {
    pub ifindex: u32,
    pub was: Option<[u8; 6]>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// (ifindex, up) for link events.
    pub links: Vec<(u32, bool)>,
    /// Neighbour messages, in order; `RouteWatch::drain` keeps only those
    /// that change a forwarding answer.
    pub neighbours: Vec<Neighbour>,
    /// Bridge fdb messages (RTM_NEWNEIGH / RTM_DELNEIGH, AF_BRIDGE), in
    /// order.
    pub fdb: Vec<crate::topology::FdbChange>,
    pub routes: bool,
    pub addresses: bool,
    /// `ip rule` added or removed.
    pub rules: bool,
    /// A qdisc or tc filter added, changed or removed (RTMGRP_TC): the
    /// device hooks are read again (`hooks`). Not in `any`: routes did not
    /// move.
    pub tc: bool,
    /// Overrun: assume everything changed.
    pub lost: bool,
}

impl Changes {
    pub fn any(&self) -> bool {
        !self.links.is_empty() || !self.neighbours.is_empty() || !self.fdb.is_empty() || self.beyond_neighbours()
    }

    /// Something other than a neighbour changed: any path may have moved.
    pub fn beyond_neighbours(&self) -> bool {
        !self.links.is_empty() || self.routes || self.addresses || self.rules || self.lost
    }
}

/// The last answer heard for each neighbour, so that only messages that
/// change one count: a busy LAN's neighbours go STALE and REACHABLE all the
/// time with the same MAC, which changes no path. Started from a dump, so
/// a neighbour first heard of was not usable before (no flow can use it).
#[derive(Debug, Default)]
pub struct NeighbourTable(HashMap<(u32, IpAddr), Option<[u8; 6]>>);

impl NeighbourTable {
    pub fn read() -> Result<Self> {
        let mut t = NeighbourTable::default();
        t.changes(&dump_neighbours()?);
        Ok(t)
    }

    /// The changes among `heard`, recorded.
    pub fn changes(&mut self, heard: &[Neighbour]) -> Vec<NeighChange> {
        let mut out = Vec::new();
        for n in heard {
            let before = self.0.insert((n.ifindex, n.addr), n.lladdr).flatten();
            if before != n.lladdr {
                out.push(NeighChange { ifindex: n.ifindex, was: before });
            }
            if n.lladdr.is_none() {
                // Gone or failed: forget it, so the table stays the size of
                // the live neighbours (it is heard of anew when it returns).
                self.0.remove(&(n.ifindex, n.addr));
            }
        }
        out
    }
}

/// What the engine's route lookups depend on besides the FIB: the rules'
/// selectors and the router's addresses, re-read when they change.
#[derive(Debug, Clone)]
pub struct RouteFacts {
    pub rules: rules::PolicyRules,
    pub addrs: addrs::AddressTable,
    /// The devices below the FIB's (bridges, VLANs, PPPoE).
    pub topo: crate::topology::Topology,
    /// Some IPv4 route carries an MTU metric (`metric::any_route_mtu`).
    pub route_mtus: bool,
    /// The routes as far as the lookups care: multipath (answers hash the
    /// flow, `cache`), and the destinations under a route whose choice is
    /// per packet (`per_packet`).
    pub routes: per_packet::Routes,
    /// The FIB's answers (`cache`): each new connection from a known client
    /// to a known destination costs no lookup, and a change costs one per
    /// distinct key in use.
    pub cache: std::cell::RefCell<cache::FibCache>,
    /// Next hops the engine asked the kernel to resolve (`solicit`).
    pub solicits: std::cell::RefCell<solicit::Solicits>,
}

impl RouteFacts {
    pub fn read() -> Result<Self> {
        Ok(RouteFacts {
            rules: rules::PolicyRules::read(),
            addrs: addrs::AddressTable::dump()?,
            topo: crate::topology::read().context("reading the link topology")?,
            route_mtus: metric::any_route_mtu(),
            routes: per_packet::Routes::read(),
            cache: Default::default(),
            solicits: Default::default(),
        })
    }

    /// A resolution found no usable neighbour `addr` on `ifindex`: have
    /// the kernel resolve it, as its first forwarded packet would
    /// (`solicit`); its answer comes back as a neighbour event.
    pub fn solicit(&self, ifindex: u32, addr: IpAddr) {
        if ifindex == 0
            || addr.is_unspecified()
            || !self.solicits.borrow_mut().due(ifindex, addr, std::time::Instant::now())
        {
            return;
        }
        match solicit::solicit(ifindex, addr) {
            Ok(()) => tracing::debug!(%addr, ifindex, "asked the kernel to resolve a next hop"),
            Err(e) => tracing::warn!("{e:#}"),
        }
    }

    /// After `ch`: re-read what it touched. Returns the MACs whose bridge
    /// port changed (a client roamed, an entry was learned or forgotten).
    pub fn refresh(&mut self, ch: &Changes) -> Vec<[u8; 6]> {
        // A link event covers bridge port state and VLAN changes (the
        // bridge notifies them as RTM_NEWLINK) and a PPPoE reconnect (a new
        // ppp device): read the whole snapshot again.
        let moved = if !ch.links.is_empty() || ch.lost {
            match crate::topology::read() {
                Ok(t) => self.topo = t,
                // Fail safe: nothing below the FIB's devices is known, so
                // only directions on managed L3 devices resolve.
                Err(e) => {
                    tracing::warn!("reading the link topology: {e:#}");
                    self.topo = Default::default();
                }
            }
            Vec::new()
        } else {
            self.topo.apply_fdb(&ch.fdb)
        };
        if ch.beyond_neighbours() {
            self.cache.borrow_mut().go_stale();
        }
        if ch.rules || ch.lost {
            self.rules = rules::PolicyRules::read();
        }
        if ch.routes || ch.lost {
            self.route_mtus = metric::any_route_mtu();
            self.routes = per_packet::Routes::read();
        }
        if ch.addresses || ch.lost {
            match addrs::AddressTable::dump() {
                Ok(t) => self.addrs = t,
                // Fail safe: no address is known, so no source-NATed
                // direction passes the check until a later change reads them.
                Err(e) => {
                    tracing::warn!("reading addresses: {e:#}");
                    self.addrs = addrs::AddressTable::default();
                }
            }
        }
        moved
    }
}

/// rtnetlink multicast listener for links, neighbours, routes, addresses,
/// rules, netconf (forwarding settings) and tc.
pub struct RouteWatch {
    sub: Subscription,
}

/// The groups followed, by number (include/uapi/linux/rtnetlink.h, enum
/// rtnetlink_groups): links, neighbours, tc, IPv4/IPv6 addresses, routes,
/// rules, netconf and nexthop objects.
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_TC: u32 = 4;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_IPV6_RULE: u32 = 19;
const RTNLGRP_IPV4_NETCONF: u32 = 24;
const RTNLGRP_IPV6_NETCONF: u32 = 25;
/// Nexthop objects (`ip nexthop`, FRR's default): deleting one flushes the
/// IPv4 routes through it without an RTM_DELROUTE (`remove_nexthop` ->
/// `__remove_nexthop_fib` -> `fib_flush`, net/ipv4/nexthop.c), and
/// replacing one moves them the same way: only this group says so.
const RTNLGRP_NEXTHOP: u32 = 32;

impl RouteWatch {
    pub fn new() -> io::Result<Self> {
        let groups = [
            RTNLGRP_LINK,
            RTNLGRP_NEIGH,
            RTNLGRP_TC,
            RTNLGRP_IPV4_IFADDR,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV4_RULE,
            RTNLGRP_IPV6_IFADDR,
            RTNLGRP_IPV6_ROUTE,
            RTNLGRP_IPV6_RULE,
            RTNLGRP_IPV4_NETCONF,
            RTNLGRP_IPV6_NETCONF,
            RTNLGRP_NEXTHOP,
        ];
        Ok(RouteWatch { sub: Subscription::new(netlink_sys::protocols::NETLINK_ROUTE, &groups, 4 << 20)? })
    }

    pub fn fd(&self) -> RawFd {
        self.sub.fd()
    }

    /// Read everything queued and summarise it.
    pub fn drain(&mut self) -> Changes {
        let mut ch = Changes::default();
        let lost = self.sub.drain(|d| parse_rtnl(d, &mut ch));
        ch.lost |= lost;
        ch
    }
}

/// Summarise a datagram of rtnetlink messages into `ch`.
pub fn parse_rtnl(mut b: &[u8], ch: &mut Changes) {
    const RTM_NEWLINK: u16 = 16;
    const RTM_DELLINK: u16 = 17;
    const RTM_NEWADDR: u16 = 20;
    const RTM_DELADDR: u16 = 21;
    const RTM_NEWROUTE: u16 = 24;
    const RTM_DELROUTE: u16 = 25;
    const RTM_NEWNEIGH: u16 = 28;
    const RTM_DELNEIGH: u16 = 29;
    const RTM_NEWRULE: u16 = 32;
    const RTM_DELRULE: u16 = 33;
    const RTM_NEWQDISC: u16 = 36;
    const RTM_DELQDISC: u16 = 37;
    const RTM_NEWTFILTER: u16 = 44;
    const RTM_DELTFILTER: u16 = 45;
    const RTM_NEWNETCONF: u16 = 80;
    const RTM_DELNETCONF: u16 = 81;
    const RTM_NEWNEXTHOP: u16 = 104;
    const RTM_DELNEXTHOP: u16 = 105;
    const AF_BRIDGE: u8 = 7;
    const IFF_UP: u32 = 0x1;
    const IFF_LOWER_UP: u32 = 0x10000;
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            ch.lost = true;
            return;
        }
        let body = &b[16..len];
        match ty {
            RTM_NEWLINK | RTM_DELLINK if body.len() >= 16 => {
                let idx = i32::from_ne_bytes([body[4], body[5], body[6], body[7]]) as u32;
                let flags = u32::from_ne_bytes([body[8], body[9], body[10], body[11]]);
                let up = ty == RTM_NEWLINK && flags & IFF_UP != 0 && flags & IFF_LOWER_UP != 0;
                ch.links.push((idx, up));
            }
            RTM_NEWADDR | RTM_DELADDR => ch.addresses = true,
            // A device's forwarding setting (`inet_netconf_notify_devconf`)
            // decides the lookup's answer (BPF_FIB_LKUP_RET_FWD_DISABLED)
            // like a route: cached answers may no longer hold.
            // A nexthop object changed or went: the routes through it moved
            // or went with it, unannounced (see RTNLGRP_NEXTHOP).
            RTM_NEWROUTE | RTM_DELROUTE | RTM_NEWNETCONF | RTM_DELNETCONF | RTM_NEWNEXTHOP | RTM_DELNEXTHOP => {
                ch.routes = true
            }
            // The bridge's fdb arrives on the same group (ndm_family
            // AF_BRIDGE, no NDA_DST).
            RTM_NEWNEIGH | RTM_DELNEIGH if body.first() == Some(&AF_BRIDGE) => {
                // None: a port's own address list (NTF_SELF), not the bridge's.
                if let Some(entry) = NeighbourMessage::parse(body).ok().as_ref().and_then(crate::topology::fdb_of) {
                    ch.fdb.push(crate::topology::FdbChange { entry, gone: ty == RTM_DELNEIGH });
                }
            }
            RTM_NEWNEIGH | RTM_DELNEIGH => match parse_neigh(ty == RTM_NEWNEIGH, body) {
                Some(n) => ch.neighbours.push(n),
                None => ch.lost = true,
            },
            RTM_NEWRULE | RTM_DELRULE => ch.rules = true,
            RTM_NEWQDISC | RTM_DELQDISC | RTM_NEWTFILTER | RTM_DELTFILTER => ch.tc = true,
            _ => {}
        }
        let adv = (len + 3) & !3;
        if adv >= b.len() {
            break;
        }
        b = &b[adv..];
    }
}

/// An ndmsg (include/uapi/linux/neighbour.h) with its NDA_DST and
/// NDA_LLADDR, decoded by netlink-packet-route.
fn parse_neigh(new: bool, body: &[u8]) -> Option<Neighbour> {
    let m = NeighbourMessage::parse(body).ok()?;
    neighbour_of(new, &m)
}

/// What the fast path depends on in a neighbour message; `None` for one
/// without a destination address.
pub fn neighbour_of(new: bool, m: &NeighbourMessage) -> Option<Neighbour> {
    use NeighbourState as N;
    let mut addr = None;
    let mut lladdr = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => addr = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => addr = Some(IpAddr::V6(*v6)),
            NeighbourAttribute::LinkLayerAddress(ll) => lladdr = <[u8; 6]>::try_from(&ll[..]).ok(),
            _ => {}
        }
    }
    // NUD_VALID (include/net/neighbour.h): the states in which
    // bpf_ipv4_fib_lookup / bpf_ipv6_fib_lookup use the neighbour's MAC.
    let valid =
        new && matches!(m.header.state, N::Reachable | N::Stale | N::Delay | N::Probe | N::Permanent | N::Noarp);
    Some(Neighbour { ifindex: m.header.ifindex, addr: addr?, lladdr: lladdr.filter(|_| valid) })
}

/// The neighbour table as it is now (RTM_GETNEIGH dump), to start from.
pub fn dump_neighbours() -> Result<Vec<Neighbour>> {
    let msgs = dump::dump(RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()), "neighbour")?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => neighbour_of(true, n),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::cache::Answer;
    use super::*;
    use std::collections::HashSet;

    fn msg(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(((16 + body.len()) as u32).to_ne_bytes());
        v.extend(ty.to_ne_bytes());
        v.extend([0u8; 10]);
        v.extend(body);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn link_down_and_route_events_are_summarised() {
        let mut ifi = vec![0u8; 16];
        ifi[4..8].copy_from_slice(&7i32.to_ne_bytes());
        ifi[8..12].copy_from_slice(&0x1u32.to_ne_bytes()); // UP but no LOWER_UP
        let mut d = msg(16, &ifi);
        d.extend(msg(24, &[0u8; 12]));
        let mut nc = Changes::default();
        parse_rtnl(&msg(80, &[0u8; 4]), &mut nc);
        assert!(nc.routes && nc.beyond_neighbours(), "a forwarding setting changed (RTM_NEWNETCONF)");
        for ty in [104, 105] {
            let mut nh = Changes::default();
            parse_rtnl(&msg(ty, &[0u8; 8]), &mut nh);
            assert!(nh.routes && nh.beyond_neighbours(), "a nexthop object changed or went ({ty})");
        }
        d.extend(msg(28, &ndmsg(7, 0x02, [192, 0, 2, 1], Some([2, 0, 0, 0, 0, 9]))));
        let mut ch = Changes::default();
        parse_rtnl(&d, &mut ch);
        assert_eq!(ch.links, vec![(7, false)]);
        assert!(ch.routes && !ch.addresses && !ch.rules && !ch.lost);
        let n = Neighbour { ifindex: 7, addr: "192.0.2.1".parse().unwrap(), lladdr: Some([2, 0, 0, 0, 0, 9]) };
        assert_eq!(ch.neighbours, vec![n]);
        let mut ch = Changes::default();
        parse_rtnl(&msg(33, &[0u8; 12]), &mut ch);
        assert!(ch.rules && ch.any(), "RTM_DELRULE");
        for ty in [36, 37, 44, 45] {
            let mut ch = Changes::default();
            parse_rtnl(&msg(ty, &[0u8; 20]), &mut ch);
            assert!(ch.tc && !ch.any(), "tc message {ty}: hooks re-read, routes untouched");
        }
        ifi[8..12].copy_from_slice(&0x10001u32.to_ne_bytes());
        let mut ch = Changes::default();
        parse_rtnl(&msg(16, &ifi), &mut ch);
        assert_eq!(ch.links, vec![(7, true)]);
    }

    /// Without BPF_FIB_LOOKUP_SKIP_NEIGH (refused by kernels before 6.3
    /// that lack the backport) the reverse-path question gets the same
    /// answers, neighbour resolved or not. Needs root.
    #[test]
    fn egress_for_answers_the_same_without_skip_neigh() {
        in_private_netns(|| {
            sh("ip link set lo up; ip link add ra type veth peer name rb; ip link set ra up; ip link set rb up; \
                ip addr add 10.0.0.1/24 dev ra; ip addr add 10.0.1.1/24 dev rb; \
                ip route add 198.51.100.0/24 via 10.0.1.2 dev rb; \
                ip neigh replace 10.0.0.2 lladdr 02:00:00:00:00:02 dev ra nud permanent; \
                sysctl -qw net.ipv4.ip_forward=1");
            let (ra, rb) = (link::ifindex("ra").unwrap(), link::ifindex("rb").unwrap());
            let mut dp = Dataplane::load(16).expect("loading the fast path");
            let ask = |dp: &Dataplane, dst: &str| egress_for(dp, ra, dst.parse().unwrap()).unwrap();
            // resolved neighbour, unresolved gateway, unresolved on-link host, no route
            let cases =
                [("10.0.0.2", Some(ra)), ("198.51.100.7", Some(rb)), ("10.0.1.9", Some(rb)), ("192.0.2.1", None)];
            for skip in [true, false] {
                dp.features_mut().fib_skip_neigh = skip;
                for (dst, want) in cases {
                    assert_eq!(ask(&dp, dst), want, "{dst}, SKIP_NEIGH {skip}");
                }
            }
        });
    }

    /// `cmd` run by sh, which must succeed.
    pub(crate) fn sh(cmd: &str) {
        let out = std::process::Command::new("sh").args(["-ec", cmd]).output().expect("running sh");
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `f` on a thread of its own in a private network namespace (needs
    /// root); its panic is the test's.
    fn in_private_netns(f: impl FnOnce() + Send + 'static) {
        // SAFETY: trivial syscall.
        assert_eq!(unsafe { libc::geteuid() }, 0, "needs root (a private network namespace)");
        let r = std::thread::spawn(|| {
            // SAFETY: affects only this thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            f()
        })
        .join();
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    }

    /// Deleting a nexthop object removes the IPv4 routes through it with
    /// no RTM_DELROUTE: the watch hears it through RTNLGRP_NEXTHOP. Needs
    /// root (a private namespace).
    #[test]
    fn a_deleted_nexthop_object_is_a_route_change() {
        in_private_netns(|| {
            // No IPv6: its link-local addresses and routes would come
            // later and be heard as route changes of their own.
            sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1; \
                ip link add ra type veth peer name rb; ip link set ra up; ip link set rb up; \
                ip addr add 10.0.0.1/24 dev ra; ip nexthop add id 42 via 10.0.0.2 dev ra; \
                ip route add 198.51.100.0/24 nhid 42");
            let mut w = RouteWatch::new().expect("subscribing");
            let _ = w.drain();
            sh("ip nexthop del id 42");
            let t0 = std::time::Instant::now();
            let mut ch = Changes::default();
            while !ch.routes && t0.elapsed() < std::time::Duration::from_secs(2) {
                std::thread::sleep(std::time::Duration::from_millis(20));
                ch = w.drain();
            }
            assert!(ch.routes && !ch.lost, "no route change heard: {ch:?}");
        });
    }

    /// An ndmsg with NDA_DST (IPv4) and, if given, NDA_LLADDR.
    fn ndmsg(ifindex: i32, state: u16, dst: [u8; 4], ll: Option<[u8; 6]>) -> Vec<u8> {
        let mut b = vec![2u8, 0, 0, 0];
        b.extend(ifindex.to_ne_bytes());
        b.extend(state.to_ne_bytes());
        b.extend([0u8, 1]);
        b.extend(8u16.to_ne_bytes());
        b.extend(1u16.to_ne_bytes());
        b.extend(dst);
        if let Some(ll) = ll {
            b.extend(10u16.to_ne_bytes());
            b.extend(2u16.to_ne_bytes());
            b.extend(ll);
            b.extend([0u8, 0]);
        }
        b
    }

    /// Only messages that change a forwarding answer count: STALE and
    /// REACHABLE with the same MAC do not; a new MAC, a failure or a
    /// deletion do, with the MAC that may be installed.
    #[test]
    fn neighbour_churn_is_not_a_change() {
        const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
        const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
        let (reachable, stale, failed, incomplete) = (0x02, 0x04, 0x20, 0x01);
        let mut t = NeighbourTable::default();
        let heard = |d: Vec<u8>| {
            let mut ch = Changes::default();
            parse_rtnl(&d, &mut ch);
            assert!(!ch.lost);
            ch.neighbours
        };
        let gw = [192, 0, 2, 1];
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<u8>, Vec<NeighChange>)> = vec![
            ("first heard of", msg(28, &ndmsg(4, reachable, gw, Some(MAC_A))), vec![NeighChange { ifindex: 4, was: None }]),
            ("reachable again", msg(28, &ndmsg(4, reachable, gw, Some(MAC_A))), vec![]),
            ("stale, same MAC", msg(28, &ndmsg(4, stale, gw, Some(MAC_A))), vec![]),
            ("same address on another link", msg(28, &ndmsg(5, stale, gw, Some(MAC_A))), vec![NeighChange { ifindex: 5, was: None }]),
            ("moved to another MAC", msg(28, &ndmsg(4, reachable, gw, Some(MAC_B))), vec![NeighChange { ifindex: 4, was: Some(MAC_A) }]),
            ("failed", msg(28, &ndmsg(4, failed, gw, Some(MAC_B))), vec![NeighChange { ifindex: 4, was: Some(MAC_B) }]),
            ("resolving, never usable", msg(28, &ndmsg(4, incomplete, gw, None)), vec![]),
            ("resolved", msg(28, &ndmsg(4, reachable, gw, Some(MAC_A))), vec![NeighChange { ifindex: 4, was: None }]),
            ("deleted", msg(29, &ndmsg(4, stale, gw, Some(MAC_A))), vec![NeighChange { ifindex: 4, was: Some(MAC_A) }]),
            ("deleted again", msg(29, &ndmsg(4, stale, gw, Some(MAC_A))), vec![]),
        ];
        for (case, d, want) in cases {
            assert_eq!(t.changes(&heard(d)), want, "{case}");
        }
        let mut ch = Changes::default();
        parse_rtnl(&msg(28, &[0u8; 8]), &mut ch);
        assert!(ch.lost, "a short ndmsg is a lost event");
    }

    #[test]
    fn answers_last_until_something_beyond_neighbours_changes() {
        let mut f = RouteFacts::read().expect("route facts");
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let p = reverse_packet(3, a);
        let k = f.key(&p, true).expect("no multipath or port rules here");
        let cached = |f: &RouteFacts| f.cache.borrow_mut().get(&k);
        let put = |f: &RouteFacts| f.cache.borrow_mut().put(k, p, Answer::Reverse(Some(4)));
        put(&f);
        let neigh = Neighbour { ifindex: 4, addr: a, lladdr: Some([2, 0, 0, 0, 0, 1]) };
        f.refresh(&Changes { neighbours: vec![neigh], ..Default::default() });
        assert_eq!(cached(&f), Some(Answer::Reverse(Some(4))), "a neighbour changes no reverse path (SKIP_NEIGH)");
        let cases = [
            ("route", Changes { routes: true, ..Default::default() }),
            ("rule", Changes { rules: true, ..Default::default() }),
            ("address", Changes { addresses: true, ..Default::default() }),
            ("link", Changes { links: vec![(4, false)], ..Default::default() }),
            ("overrun", Changes { lost: true, ..Default::default() }),
        ];
        for (what, ch) in cases {
            f.cache.borrow_mut().revalidate(|_, _| None, &HashSet::new());
            put(&f);
            assert!(cached(&f).is_some());
            f.refresh(&ch);
            assert_eq!(cached(&f), None, "{what}");
        }
    }

    /// A bridge learning or moving a MAC: an fdb change, not a lost
    /// neighbour event.
    #[test]
    fn fdb_events_are_fdb_changes() {
        use netlink_packet_core::Emitable;
        use netlink_packet_route::AddressFamily;
        let mut n = NeighbourMessage::default();
        n.header.family = AddressFamily::Bridge;
        n.header.ifindex = 4;
        n.attributes = vec![
            NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 9]),
            NeighbourAttribute::Controller(10),
            NeighbourAttribute::Vlan(1),
        ];
        let mut body = vec![0u8; n.buffer_len()];
        n.emit(&mut body);
        let entry = crate::topology::FdbEntry { bridge: 10, port: 4, mac: [2, 0, 0, 0, 0, 9], vlan: Some(1) };
        for (ty, gone) in [(28, false), (29, true)] {
            let mut ch = Changes::default();
            parse_rtnl(&msg(ty, &body), &mut ch);
            assert_eq!(ch.fdb, vec![crate::topology::FdbChange { entry, gone }]);
            assert!(!ch.lost && ch.neighbours.is_empty() && ch.any() && !ch.beyond_neighbours());
        }
        // A port's own address (NTF_SELF, no NDA_MASTER): nothing.
        n.attributes.remove(1);
        let mut body = vec![0u8; n.buffer_len()];
        n.emit(&mut body);
        let mut ch = Changes::default();
        parse_rtnl(&msg(28, &body), &mut ch);
        assert!(!ch.any());
    }

    #[test]
    fn garbage_marks_lost_without_panicking() {
        let mut ch = Changes::default();
        parse_rtnl(&[0xff; 40], &mut ch);
        assert!(ch.lost);
        let mut ch = Changes::default();
        parse_rtnl(&[1, 2, 3], &mut ch);
        assert!(!ch.any());
    }
}
