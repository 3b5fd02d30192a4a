//! The path of a connection through the router: for each direction, where
//! its packets arrive and where the kernel forwards them (FIB + neighbour),
//! as the two directional fast-path entries.
//!
//! The original direction arrives where the kernel routes its source (the
//! reverse path, as rp_filter assumes); each direction is routed after DNAT
//! and before SNAT, the prerouting / postrouting order of
//! `nf_nat_inet_fn`. Like `nft_flow_offload_eval`, which takes both
//! directions' dst from the route of the packet in hand, we insist that the
//! reply leaves where the original arrived.
//!
//! Policy routing: each lookup carries the connection's mark when a rule
//! selects on fwmark (see `rules`), and a family with a rule the lookup
//! cannot reproduce has no path, as has a connection under a route whose
//! choice is per packet (its tos, a multipath hash the lookup cannot
//! reproduce: `per_packet`). A direction whose source conntrack
//! rewrote to one of the router's addresses (source NAT) must leave by the
//! interface that owns it (`check_source`).

use std::fmt;
use std::net::IpAddr;

use crate::conntrack::{CtEntry, CtTuple};
use crate::dataplane::Dataplane;
use crate::flow::{build_direction, Direction, LinkLayer, NextHop};
use crate::topology::{Egress, LowerError, Topology};

use super::addrs::AddressTable;
use super::cache::Used;
use super::per_packet::PerPacket;
use super::rules::Selector;
use super::{Packet, RouteFacts, Unroutable, FIB_NO_MARK};

/// The FIB lookups one resolution made (reverse path, original, reply),
/// for `FibCache::pin`: the connection is re-judged when one's answer
/// changes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lookups {
    pub keys: Used,
    pub asked: [Option<Packet>; 3],
}

/// Why a connection has no fast path now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoPath {
    NoInterfaceUp,
    /// Local, or no route to the source at all.
    NoRouteBack,
    InputNotManaged,
    OutputNotManaged,
    Unroutable(i32),
    Asymmetric,
    /// The FIB query itself failed (test run error).
    LookupFailed(String),
    /// An `ip rule` the lookup cannot reproduce.
    Rule(Selector),
    /// A route whose choice depends on what each packet carries (its tos,
    /// a multipath hash of its flow label): no lookup answers for the
    /// whole connection (`per_packet`).
    PerPacket(PerPacket),
    /// Source NAT to this address of the router, which the computed
    /// egress interface does not have: the kernel chose another way out
    /// (masquerade takes the egress interface's address), or the mark the
    /// lookup assumed is not the packets'.
    SourceElsewhere(IpAddr),
    /// The devices between the FIB's and a managed port (bridge, VLAN,
    /// PPPoE) do not lead to one the fast path can use.
    Lower(LowerError),
}

impl NoPath {
    /// Worth retrying soon: neighbours resolve as traffic passes, links
    /// come up, a failed query may succeed next time.
    pub fn transient(&self) -> bool {
        match self {
            NoPath::NoInterfaceUp | NoPath::LookupFailed(_) => true,
            NoPath::Unroutable(code) => Unroutable(*code).transient(),
            NoPath::Lower(l) => l.transient(),
            _ => false,
        }
    }
}

impl fmt::Display for NoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoPath::NoInterfaceUp => f.write_str("no managed interface is up"),
            NoPath::NoRouteBack => f.write_str("no route back to the source (local or unroutable)"),
            NoPath::InputNotManaged => f.write_str("input interface not managed or down"),
            NoPath::OutputNotManaged => f.write_str("output interface not managed or down"),
            NoPath::Unroutable(code) => f.write_str(Unroutable(*code).as_str()),
            NoPath::Asymmetric => f.write_str("asymmetric routing"),
            NoPath::LookupFailed(e) => write!(f, "route lookup failed: {e}"),
            NoPath::Rule(s) => s.fmt(f),
            NoPath::PerPacket(p) => p.fmt(f),
            NoPath::SourceElsewhere(a) => {
                write!(f, "source NAT to {a}, an address the route's egress interface does not have")
            }
            NoPath::Lower(l) => l.fmt(f),
        }
    }
}

/// The interfaces the fast path runs on, as the engine manages them.
pub trait Ports {
    /// Managed and up.
    fn is_up(&self, ifindex: u32) -> bool;
    fn first_up(&self) -> Option<u32>;
    fn name(&self, ifindex: u32) -> Option<&str>;
    /// The name a flowtable lists it by: a device the engine attached on
    /// its own for a listed port (pppoe-wan above a TC eth1) counts as
    /// that port, as the kernel's flowtable on eth1 offloads what arrives
    /// there in PPPoE.
    fn listed_name(&self, ifindex: u32) -> Option<&str> {
        self.name(ifindex)
    }
}

/// Both directions of `e`, or why not.
///
/// The FIB answers with L3 devices (br-lan, pppoe-wan, eth0.2); `topo`
/// walks each direction's output down to the managed port it leaves by,
/// and the other direction arrives on that same port with the same
/// headers, addressed to the MAC this one is sent from (the mirror, as
/// `nft_flow_offload` fills both tuples from the two routes).
pub fn resolve_path(
    dp: &Dataplane,
    ports: &impl Ports,
    facts: &RouteFacts,
    e: &CtEntry,
    lk: &mut Lookups,
) -> Result<[Direction; 2], NoPath> {
    *lk = Lookups::default();
    let first = ports.first_up().ok_or(NoPath::NoInterfaceUp)?;
    let (o, r) = (&e.orig, &e.reply);
    let rules = facts.rules.family(o.src.is_ipv6());
    if let Some(s) = rules.unreproducible {
        return Err(NoPath::Rule(s));
    }
    // Each direction's lookup asks about its destination: the original's
    // after DNAT (the reply's source), the reply's the client.
    if let Some(p) = [r.src, o.src].into_iter().find_map(|dst| facts.routes.per_packet(dst)) {
        return Err(NoPath::PerPacket(p));
    }
    // mwan3 and pbr route on the mark they copy from the connection's
    // (`meta mark set ct mark`); SECURITY.md says why this is safe.
    let mark = if rules.by_mark { e.mark } else { 0 };
    let in_orig = match facts.egress_for(dp, first, o.src) {
        Ok((d, p, k)) => {
            (lk.keys[0], lk.asked[0]) = (k, Some(p));
            d.ok_or(NoPath::NoRouteBack)?
        }
        Err(err) => return Err(NoPath::LookupFailed(format!("{err:#}"))),
    };
    let mut hop = |n: usize, in_ifindex: u32, t: &CtTuple, dst: IpAddr| {
        let p = Packet { in_ifindex, src: t.src, dst, proto: t.proto, sport: t.sport, dport: t.dport, mark };
        match facts.resolve(dp, &p) {
            Ok((a, k)) => {
                (lk.keys[n], lk.asked[n]) = (k, Some(p));
                match a {
                    Ok(nh) => Ok(nh),
                    Err(Unroutable(FIB_NO_MARK)) if mark != 0 => Err(NoPath::Rule(Selector::MarkUnsupported)),
                    Err(u) => Err(NoPath::Unroutable(u.0)),
                }
            }
            Err(err) => Err(NoPath::LookupFailed(format!("{err:#}"))),
        }
    };
    let nh_o = hop(1, in_orig, o, r.src)?;
    let in_reply = nh_o.ifindex;
    let nh_r = hop(2, in_reply, r, o.src)?;
    if nh_r.ifindex != in_orig {
        return Err(NoPath::Asymmetric);
    }
    // Only the source-NATed original direction: the reply's source is the
    // DNAT undone (the address the client asked for), which may be an
    // address of another interface (hairpin NAT) by design.
    check_source(&facts.addrs, nh_o.ifindex, o.src, r.dst)?;
    let out_o = walk(&facts.topo, ports, &nh_o, NoPath::OutputNotManaged)?;
    let out_r = walk(&facts.topo, ports, &nh_r, NoPath::InputNotManaged)?;
    let dir = |seen: &CtTuple, other: &CtTuple, arrive: &Egress, out: &Egress| {
        let nh = NextHop {
            ifindex: out.port,
            smac: out.smac,
            dmac: out.dmac,
            mtu: out.mtu.min(0xffff) as u16,
            xdp_ok: dp.is_xdp_target(out.port),
        };
        build_direction(seen, other, arrive.port, &nh).with_link(&mirror(arrive, out))
    };
    let mut d = [dir(o, r, &out_r, &out_o), dir(r, o, &out_o, &out_r)];
    // Each direction's MTU is its own route's (pppoe-wan's 1492, the LAN's
    // 1500) capped by what its port carries after encapsulation.
    d[0].val.mtu = d[0].val.mtu.min(nh_o.mtu);
    d[1].val.mtu = d[1].val.mtu.min(nh_r.mtu);
    Ok(d)
}

/// Walk the FIB's answer `nh` down to a managed port that is up; `unmanaged`
/// when there is none.
fn walk(topo: &Topology, ports: &impl Ports, nh: &NextHop, unmanaged: NoPath) -> Result<Egress, NoPath> {
    match topo.egress(nh.ifindex, nh.dmac, |i| ports.name(i).is_some()) {
        Ok(e) if ports.is_up(e.port) => Ok(e),
        Ok(_) | Err(LowerError::NotManaged(_)) => Err(unmanaged),
        Err(l) => Err(NoPath::Lower(l)),
    }
}

/// A direction leaving as `out` whose frames arrive the way the other
/// direction's leave (`arrive`): with its headers, addressed to the MAC it
/// is sent from (none on an L3 port).
fn mirror(arrive: &Egress, out: &Egress) -> LinkLayer {
    LinkLayer {
        in_encap: arrive.encap,
        in_dmac: if arrive.l3 { [0; 6] } else { arrive.smac },
        out_encap: out.encap,
        l3_out: out.l3,
    }
}

/// A direction whose source `was` is rewritten to `now` leaves by `egress`.
/// If `now` is one of the router's addresses, `egress` must own it: the
/// kernel's masquerade takes the address of the interface it routed the
/// first packet out of (`nf_nat_masquerade_ipv4`), and a SNAT to the
/// router's own address leaving elsewhere is the mwan3 failure (the second
/// WAN's address out of the first WAN). A SNAT to an address the router
/// does not have (a routed public subnet) proves nothing either way and
/// passes.
pub fn check_source(addrs: &AddressTable, egress: u32, was: IpAddr, now: IpAddr) -> Result<(), NoPath> {
    if was == now || !addrs.is_local(now) || addrs.owns(egress, now) {
        Ok(())
    } else {
        Err(NoPath::SourceElsewhere(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_nat_must_leave_where_its_address_lives() {
        const WAN1: u32 = 4;
        const WAN2: u32 = 6;
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let addrs = AddressTable::from_pairs([(WAN1, ip("203.0.113.1")), (WAN2, ip("198.51.100.1"))]);
        let lan = ip("192.168.1.2");
        let cases = [
            ("masquerade out of its own WAN", WAN2, lan, ip("198.51.100.1"), Ok(())),
            (
                "second WAN's address out of the first (mwan3)",
                WAN1,
                lan,
                ip("198.51.100.1"),
                Err(NoPath::SourceElsewhere(ip("198.51.100.1"))),
            ),
            ("no NAT", WAN1, lan, lan, Ok(())),
            ("snat to a routed subnet the router has no address in", WAN1, lan, ip("192.0.2.77"), Ok(())),
        ];
        for (what, egress, was, now, want) in cases {
            assert_eq!(check_source(&addrs, egress, was, now), want, "{what}");
        }
    }

    /// A direction arrives the way the other leaves: on its port, with its
    /// headers, addressed to the MAC it is sent from; nothing to match on
    /// an L3 port.
    #[test]
    fn each_direction_arrives_as_the_other_leaves() {
        use crate::flow::{Encap, EncapStack};
        let stack = |h: &[(u16, u16)]| {
            let mut s = EncapStack::default();
            h.iter().for_each(|&(proto, id)| assert!(s.push(Encap { proto, id })));
            s
        };
        let eg = |port, encap, smac, l3| Egress { port, encap, dmac: [2; 6], smac, mtu: 1500, l3, bridges: vec![] };
        let wan = eg(2, stack(&[(0x8100, 7), (0x8864, 0x1a2b)]), [2, 0, 0, 0, 0, 3], false);
        let lan = eg(4, EncapStack::default(), [2, 0, 0, 0, 0, 10], false);
        let wg = eg(5, EncapStack::default(), [0; 6], true);
        let cases = [
            (
                "upload: arrives from the LAN port, leaves by PPPoE over VLAN",
                &lan,
                &wan,
                EncapStack::default(),
                [2, 0, 0, 0, 0, 10],
                wan.encap,
                false,
            ),
            (
                "download: arrives tagged, addressed to wan.7's MAC",
                &wan,
                &lan,
                wan.encap,
                [2, 0, 0, 0, 0, 3],
                EncapStack::default(),
                false,
            ),
            (
                "into WireGuard: no link layer out",
                &lan,
                &wg,
                EncapStack::default(),
                [2, 0, 0, 0, 0, 10],
                EncapStack::default(),
                true,
            ),
            (
                "out of WireGuard: no MAC to match",
                &wg,
                &lan,
                EncapStack::default(),
                [0; 6],
                EncapStack::default(),
                false,
            ),
        ];
        for (what, arrive, out, in_encap, in_dmac, out_encap, l3_out) in cases {
            assert_eq!(mirror(arrive, out), LinkLayer { in_encap, in_dmac, out_encap, l3_out }, "{what}");
        }
    }

    #[test]
    fn transient_and_text() {
        let cases = [
            (NoPath::NoInterfaceUp, true, "no managed interface is up"),
            (NoPath::NoRouteBack, false, "no route back to the source (local or unroutable)"),
            (NoPath::InputNotManaged, false, "input interface not managed or down"),
            (NoPath::OutputNotManaged, false, "output interface not managed or down"),
            (NoPath::Unroutable(7), true, "next-hop neighbour not resolved yet"),
            (NoPath::Unroutable(1), false, "blackhole route"),
            (NoPath::Asymmetric, false, "asymmetric routing"),
            (NoPath::LookupFailed("EPERM".into()), true, "route lookup failed: EPERM"),
            (
                NoPath::Rule(Selector::Tos),
                false,
                "an ip rule selects on tos, which each packet carries and conntrack does not record",
            ),
            (
                NoPath::PerPacket(PerPacket::Tos { prefix: "198.51.100.0/24".into() }),
                false,
                "the route to 198.51.100.0/24 selects on tos, which each packet carries and conntrack does not record",
            ),
            (
                NoPath::SourceElsewhere("198.51.100.1".parse().unwrap()),
                false,
                "source NAT to 198.51.100.1, an address the route's egress interface does not have",
            ),
            (
                NoPath::Lower(LowerError::NoFdb {
                    bridge: "br-lan".into(),
                    mac: "02:00:00:00:00:09".into(),
                    vlan: None,
                }),
                true,
                "br-lan has no fdb entry for 02:00:00:00:00:09 yet",
            ),
            (
                NoPath::Lower(LowerError::PortNotForwarding { port: "lan2".into(), state: 4 }),
                false,
                "bridge port lan2 is not forwarding (STP state 4)",
            ),
        ];
        for (p, transient, text) in cases {
            assert_eq!(p.transient(), transient, "{p:?}");
            assert_eq!(p.to_string(), text);
        }
    }
}
