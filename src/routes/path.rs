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
use crate::flow::{build_direction, Direction, EncapStack, LinkLayer, NextHop};
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
    /// It goes through a port the fast path runs on only to serve other
    /// devices (XDP on rwan for a listed rwan.7): this device (rwan.8, or
    /// rwan untagged) is not listed.
    NotListed {
        dev: String,
        port: String,
    },
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
            NoPath::NotListed { dev, port } => {
                write!(f, "{dev} is not listed (the fast path on {port} serves only the devices listed above it)")
            }
        }
    }
}

/// The interfaces the fast path runs on, as the engine manages them.
pub trait Ports {
    /// Managed and up.
    fn is_up(&self, ifindex: u32) -> bool;
    fn first_up(&self) -> Option<u32>;
    fn name(&self, ifindex: u32) -> Option<&str>;
    /// The device a flowtable lists for frames that arrive on (or leave
    /// by) port `ifindex` with headers `encap`; None: no listed device,
    /// and the connection is not offloaded (kernel flowtable: no hook of it
    /// sees those frames). A device the engine attached on its own for a
    /// listed port (pppoe-wan above a TC eth1) counts as that port, as the
    /// kernel's flowtable on eth1 offloads what arrives there in PPPoE; a
    /// port XDP runs on for a listed VLAN or PPPoE device above it answers
    /// only for that device's headers (`engine::ports::Served`).
    fn listed_name(&self, ifindex: u32, _encap: &EncapStack) -> Option<&str> {
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
    arrival_priority(&out_o, &out_r)?;
    let dir = |seen: &CtTuple, other: &CtTuple, arrive: &Egress, out: &Egress| {
        let xdp_ok = dp.is_xdp_target(out.port);
        let nh = NextHop {
            ifindex: out.port,
            smac: out.smac,
            dmac: out.dmac,
            mtu: xdp_mtu(out, xdp_ok).min(0xffff) as u16,
            xdp_ok,
        };
        build_direction(seen, other, arrive.port, &nh).with_link(&mirror(arrive, out))
    };
    let mut d = [dir(o, r, &out_r, &out_o), dir(r, o, &out_o, &out_r)];
    // The FIB's own devices, before the walks (xfrm selectors name them).
    d[0].route_ifindex = nh_o.ifindex;
    d[1].route_ifindex = nh_r.ifindex;
    // Each direction's MTU is its own route's (pppoe-wan's 1492, the LAN's
    // 1500) capped by what its port carries after encapsulation.
    d[0].val.mtu = d[0].val.mtu.min(nh_o.mtu);
    d[1].val.mtu = d[1].val.mtu.min(nh_r.mtu);
    Ok(d)
}

/// Each walk is how the other direction arrives: through a VLAN device
/// with an ingress QoS map, the kernel gives a packet the priority its PCP
/// maps to (vlan_do_receive), before the forwarding the fast path stands
/// in for, which runs below that device and cannot. ip6_forward keeps that
/// priority, as ip_forward does with net.ipv4.ip_forward_update_priority=0
/// (a sysctl that may change under an offloaded connection): no fast path
/// for either family.
fn arrival_priority(out_o: &Egress, out_r: &Egress) -> Result<(), NoPath> {
    match out_o.ingress_qos.as_ref().or(out_r.ingress_qos.as_ref()) {
        Some(dev) => Err(NoPath::Lower(LowerError::IngressQos(dev.clone()))),
        None => Ok(()),
    }
}

/// The IP MTU of a direction leaving as `out`. An Ethernet frame may carry
/// one VLAN tag beyond the MTU (`is_skb_forwardable`, and `veth_xdp_xmit`'s
/// `rcv->mtu + rcv->hard_header_len + VLAN_HLEN`); the kernel's own path
/// leaves the outermost tag in skb metadata (a VLAN device over a port with
/// tx-vlan-hw-insert, as TC's bpf_skb_vlan_push does), but XDP writes every
/// tag into the frame, so with two a full-sized packet would be 4 bytes too
/// long for the target and dropped there: XDP gives up 4 bytes of MTU per
/// tag beyond the first, and such packets take the kernel's path (`mtu`).
fn xdp_mtu(out: &Egress, xdp: bool) -> u32 {
    let tags = out.encap.as_slice().iter().filter(|e| e.proto != crate::topology::ETH_P_PPP_SES).count() as u32;
    if xdp {
        out.mtu.saturating_sub(4 * tags.saturating_sub(1))
    } else {
        out.mtu
    }
}

/// Walk the FIB's answer `nh` down to a managed port that is up; `unmanaged`
/// when there is none.
fn walk(topo: &Topology, ports: &impl Ports, nh: &NextHop, unmanaged: NoPath) -> Result<Egress, NoPath> {
    match topo.egress(nh.ifindex, nh.dmac, |i| ports.name(i).is_some()) {
        Ok(e) if ports.is_up(e.port) && ports.listed_name(e.port, &e.encap).is_none() => Err(NoPath::NotListed {
            dev: topo.link(nh.ifindex).map_or_else(|| nh.ifindex.to_string(), |l| l.name.clone()),
            port: ports.name(e.port).unwrap_or_default().to_string(),
        }),
        Ok(e) if ports.is_up(e.port) => Ok(e),
        Ok(_) | Err(LowerError::NotManaged(_)) => Err(unmanaged),
        Err(l) => Err(NoPath::Lower(l)),
    }
}

/// A direction leaving as `out` whose frames arrive the way the other
/// direction's leave (`arrive`): with its headers, addressed to the MAC it
/// is sent from (none on an L3 port), and in a PPPoE session only from the
/// concentrator the other direction is sent to.
fn mirror(arrive: &Egress, out: &Egress) -> LinkLayer {
    let pppoe = arrive.encap.as_slice().iter().any(|e| e.proto == crate::topology::ETH_P_PPP_SES);
    LinkLayer {
        in_encap: arrive.encap,
        in_dmac: if arrive.l3 { [0; 6] } else { arrive.smac },
        in_smac: if pppoe { arrive.dmac } else { [0; 6] },
        out_pcp: out.pcp,
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
        const AC: [u8; 6] = [2, 0xac, 0, 0, 0, 1];
        let eg = |port, encap, smac, l3| Egress { port, encap, dmac: AC, smac, mtu: 1500, l3, ..Default::default() };
        let wan = eg(2, stack(&[(0x8100, 7), (0x8864, 0x1a2b)]), [2, 0, 0, 0, 0, 3], false);
        let vlan = eg(2, stack(&[(0x8100, 8)]), [2, 0, 0, 0, 0, 3], false);
        let lan = eg(4, EncapStack::default(), [2, 0, 0, 0, 0, 10], false);
        let wg = eg(5, EncapStack::default(), [0; 6], true);
        let ll = |in_encap, in_dmac, in_smac, out_encap, l3_out| LinkLayer {
            in_encap,
            in_dmac,
            in_smac,
            out_encap,
            l3_out,
            ..Default::default()
        };
        let none = EncapStack::default();
        let cases = [
            (
                "upload: arrives from the LAN port, leaves by PPPoE over VLAN",
                &lan,
                &wan,
                ll(none, [2, 0, 0, 0, 0, 10], [0; 6], wan.encap, false),
            ),
            (
                "download: arrives tagged, addressed to wan.7's MAC, only from the concentrator",
                &wan,
                &lan,
                ll(wan.encap, [2, 0, 0, 0, 0, 3], AC, none, false),
            ),
            (
                "VLAN without PPPoE: any source, as the kernel takes it",
                &vlan,
                &lan,
                ll(vlan.encap, [2, 0, 0, 0, 0, 3], [0; 6], none, false),
            ),
            ("into WireGuard: no link layer out", &lan, &wg, ll(none, [2, 0, 0, 0, 0, 10], [0; 6], none, true)),
            ("out of WireGuard: no MAC to match", &wg, &lan, ll(none, [0; 6], [0; 6], none, false)),
        ];
        for (what, arrive, out, want) in cases {
            assert_eq!(mirror(arrive, out), want, "{what}");
        }
    }

    /// XDP writes every tag into the frame: a second one costs 4 bytes of
    /// MTU there (one fits the frame size every Ethernet device takes), TC
    /// leaves the outer one in metadata and keeps the full MTU.
    /// A VLAN device with an ingress QoS map on either side keeps the
    /// connection on the slow path, in both directions, and says which.
    #[test]
    fn an_ingress_qos_map_on_either_side_keeps_the_connection_off() {
        let plain = Egress { port: 2, mtu: 1500, ..Default::default() };
        let mapped = Egress { ingress_qos: Some("rwan.7".into()), ..plain.clone() };
        assert_eq!(arrival_priority(&plain, &plain), Ok(()));
        let refused = NoPath::Lower(LowerError::IngressQos("rwan.7".into()));
        assert_eq!(arrival_priority(&mapped, &plain), Err(refused.clone()));
        assert_eq!(arrival_priority(&plain, &mapped), Err(refused.clone()));
        assert!(!refused.transient(), "re-judged when the link changes, not retried");
        assert_eq!(
            refused.to_string(),
            "rwan.7 has an ingress-qos-map: the priority it gives arriving packets cannot be reproduced"
        );
    }

    #[test]
    fn xdp_pays_for_the_second_vlan_tag() {
        use crate::flow::{Encap, EncapStack};
        let mut qinq = EncapStack::default();
        assert!(qinq.push(Encap { proto: 0x88a8, id: 100 }) && qinq.push(Encap { proto: 0x8100, id: 7 }));
        let mut vlan_pppoe = EncapStack::default();
        assert!(vlan_pppoe.push(Encap { proto: 0x8100, id: 7 }) && vlan_pppoe.push(Encap { proto: 0x8864, id: 1 }));
        let eg = |encap, mtu| Egress { port: 2, encap, mtu, ..Default::default() };
        assert_eq!(xdp_mtu(&eg(qinq, 1500), true), 1496);
        assert_eq!(xdp_mtu(&eg(qinq, 1500), false), 1500);
        assert_eq!(xdp_mtu(&eg(vlan_pppoe, 1492), true), 1492, "PPPoE is in the MTU already");
        assert_eq!(xdp_mtu(&eg(EncapStack::default(), 1500), true), 1500);
    }

    /// XDP on rwan serving only a listed rwan.7: a walk down to rwan is
    /// the fast path's only with rwan.7's headers; rwan.8 and rwan itself
    /// are not listed, and say so (like the kernel flowtable, whose hook
    /// on rwan.7 never sees their frames).
    #[test]
    fn a_port_serving_a_listed_vlan_takes_only_its_connections() {
        use crate::flow::{Encap, EncapStack};
        use crate::topology::{Kind, Link};
        let link = |ifindex, name: &str, kind, lower| Link {
            ifindex,
            name: name.into(),
            kind,
            master: None,
            lower,
            mac: [2, 0, 0, 0, 0, ifindex as u8],
            mtu: 1500,
            link_type: 1,
            port_state: None,
            vlans: Vec::new(),
        };
        let vlan = |id| Kind::Vlan { id, proto: 0x8100, qos: Default::default() };
        let topo = Topology::new(
            [
                link(3, "rwan", Kind::Other(Some("veth".into())), None),
                link(4, "rwan.7", vlan(7), Some(3)),
                link(5, "rwan.8", vlan(8), Some(3)),
            ],
            Vec::new(),
            Vec::new(),
        );
        struct ServesVlan7;
        impl Ports for ServesVlan7 {
            fn is_up(&self, i: u32) -> bool {
                i == 3
            }
            fn first_up(&self) -> Option<u32> {
                Some(3)
            }
            fn name(&self, i: u32) -> Option<&str> {
                (i == 3).then_some("rwan")
            }
            fn listed_name(&self, i: u32, encap: &EncapStack) -> Option<&str> {
                (i == 3 && encap.as_slice() == [Encap { proto: 0x8100, id: 7 }]).then_some("rwan.7")
            }
        }
        let nh = |ifindex| NextHop { ifindex, smac: [0; 6], dmac: [2; 6], mtu: 1500, xdp_ok: true };
        let e = walk(&topo, &ServesVlan7, &nh(4), NoPath::OutputNotManaged).expect("rwan.7 is served");
        assert_eq!((e.port, e.encap.as_slice()), (3, &[Encap { proto: 0x8100, id: 7 }][..]));
        for (dev, i) in [("rwan.8", 5), ("rwan", 3)] {
            let err = walk(&topo, &ServesVlan7, &nh(i), NoPath::OutputNotManaged).unwrap_err();
            assert_eq!(err, NoPath::NotListed { dev: dev.into(), port: "rwan".into() });
            assert_eq!(
                err.to_string(),
                format!("{dev} is not listed (the fast path on rwan serves only the devices listed above it)")
            );
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
