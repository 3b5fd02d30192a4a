//! The walk over each OpenWrt shape, from snapshots built as plain data
//! (and, for the decoders, from constructed rtnetlink messages).

use netlink_packet_route::link::{
    self as rt, AfSpecBridge, BridgeVlanInfo, BridgeVlanInfoFlags, InfoBridge, InfoBridgePort, InfoData, InfoKind,
    InfoPortData, InfoPortKind, InfoVlan, LinkAttribute, LinkLayerType, LinkMessage, VlanProtocol,
};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::AddressFamily;

use super::read::{link_of, parse_pppoe, vlans_of};
use super::*;
use crate::flow::{Encap, EncapStack};

const ARPHRD_PPP: u16 = 512;
const ARPHRD_NONE: u16 = 65534;
const CLIENT: [u8; 6] = [2, 0xc, 0, 0, 0, 1];
const PEER: [u8; 6] = [2, 0xac, 0, 0, 0, 1];
const GW: [u8; 6] = [2, 0x99, 0, 0, 0, 1];

fn mac(i: u32) -> [u8; 6] {
    [2, 0, 0, 0, 0, i as u8]
}

fn link(ifindex: u32, name: &str, kind: Kind) -> Link {
    Link {
        ifindex,
        name: name.into(),
        kind,
        master: None,
        lower: None,
        mac: mac(ifindex),
        mtu: 1500,
        link_type: ARPHRD_ETHER,
        port_state: None,
        vlans: Vec::new(),
    }
}

fn port(ifindex: u32, name: &str, kind: Kind, bridge: u32) -> Link {
    Link { master: Some(bridge), port_state: Some(BR_STATE_FORWARDING), ..link(ifindex, name, kind) }
}

fn vlan(ifindex: u32, name: &str, id: u16, proto: u16, lower: u32) -> Link {
    Link { lower: Some(lower), ..link(ifindex, name, Kind::Vlan { id, proto, qos: VlanQos::default() }) }
}

fn ppp(ifindex: u32, name: &str) -> Link {
    Link { mac: [0; 6], mtu: 1492, link_type: ARPHRD_PPP, ..link(ifindex, name, Kind::Ppp) }
}

fn pv(vid: u16, untagged: bool, pvid: bool) -> PortVlan {
    PortVlan { vid, untagged, pvid }
}

fn stack(h: &[(u16, u16)]) -> EncapStack {
    let mut s = EncapStack::default();
    for &(proto, id) in h {
        assert!(s.push(Encap { proto, id }));
    }
    s
}

/// eth0 is the DSA conduit; lan1, lan2 (ports of br-lan) and wan are user
/// ports; eth0.2 a VLAN WAN; the client is on lan2.
fn dsa_router(lan2_state: u8) -> Topology {
    let br = Link { vlans: Vec::new(), ..link(10, "br-lan", Kind::Bridge { vlan_filtering: false }) };
    let links = [
        link(2, "eth0", Kind::Other(None)),
        Link { lower: Some(2), ..port(3, "lan1", Kind::Dsa, 10) },
        Link { lower: Some(2), port_state: Some(lan2_state), ..port(4, "lan2", Kind::Dsa, 10) },
        Link { lower: Some(2), ..link(5, "wan", Kind::Dsa) },
        vlan(6, "eth0.2", 2, ETH_P_8021Q, 2),
        br,
    ];
    let fdb = vec![
        FdbEntry { bridge: 10, port: 4, mac: CLIENT, vlan: None },
        // The bridge's own address: not a port.
        FdbEntry { bridge: 10, port: 10, mac: mac(10), vlan: None },
    ];
    Topology::new(links, fdb, Vec::new())
}

/// pppoe-wan over wan.7 (VLAN 7) over eth1; wg0; QinQ eth1.100.7 and a
/// PPPoE session over it in the `deep` variant.
fn wan_router(sessions: Vec<PppoeSession>, second_ppp: bool) -> Topology {
    let mut links = vec![
        link(2, "eth1", Kind::Other(None)),
        vlan(3, "wan.7", 7, ETH_P_8021Q, 2),
        ppp(4, "pppoe-wan"),
        Link {
            mac: [0; 6],
            mtu: 1420,
            link_type: ARPHRD_NONE,
            ..link(5, "wg0", Kind::Other(Some("wireguard".into())))
        },
        vlan(6, "eth1.100", 100, ETH_P_8021AD, 2),
        vlan(7, "eth1.100.7", 7, ETH_P_8021Q, 6),
    ];
    if second_ppp {
        links.push(ppp(8, "pppoe-wan2"));
    }
    Topology::new(links, Vec::new(), sessions)
}

fn session(id: u16, device: &str) -> PppoeSession {
    PppoeSession { id, peer: PEER, device: device.into() }
}

/// br-lan with VLAN filtering: its own PVID 1; lan1 untagged member of 1
/// (PVID) and tagged member of 10; lan2 tagged member of 1; lan3 sends 1
/// untagged but its PVID is 20; br-lan.10 a VLAN device on the bridge.
fn filtering_bridge() -> Topology {
    let links = [
        Link { vlans: vec![pv(1, true, true)], ..link(10, "br-lan", Kind::Bridge { vlan_filtering: true }) },
        Link { vlans: vec![pv(1, true, true), pv(10, false, false)], ..port(3, "lan1", Kind::Other(None), 10) },
        Link { vlans: vec![pv(1, false, false)], ..port(4, "lan2", Kind::Other(None), 10) },
        Link { vlans: vec![pv(1, true, false), pv(20, true, true)], ..port(5, "lan3", Kind::Other(None), 10) },
        vlan(11, "br-lan.10", 10, ETH_P_8021Q, 10),
    ];
    Topology::new(links, Vec::new(), Vec::new())
}

fn with_fdb(mut t: Topology, entries: &[(u32, [u8; 6], Option<u16>)]) -> Topology {
    let changes: Vec<FdbChange> = entries
        .iter()
        .map(|&(port, mac, vlan)| FdbChange { entry: FdbEntry { bridge: 10, port, mac, vlan }, gone: false })
        .collect();
    t.apply_fdb(&changes);
    t
}

type Want = Result<(u32, EncapStack, [u8; 6], [u8; 6], u32, bool), LowerError>;
/// What, snapshot, FIB device, next hop, managed ports, answer.
type Case<'a> = (&'a str, Topology, u32, [u8; 6], &'a [u32], Want);

#[test]
fn each_openwrt_shape_walks_to_its_port() {
    const Q: u16 = ETH_P_8021Q;
    const AD: u16 = ETH_P_8021AD;
    const S: u16 = ETH_P_PPP_SES;
    let none = EncapStack::default();
    let one = || wan_router(vec![session(0x1a2b, "wan.7")], false);
    let deep = || wan_router(vec![session(0x1a2b, "eth1.100.7")], false);
    let fb = || filtering_bridge();
    let fdb1 = |port| with_fdb(fb(), &[(port, CLIENT, Some(1))]);
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("DSA + br-lan, ports listed (hardware-offload style)", dsa_router(3), 10, CLIENT, &[3, 4, 5],
            Ok((4, none, CLIENT, mac(10), 1500, false))),
        ("DSA + br-lan, the bridge listed (firewall4 software style)", dsa_router(3), 10, CLIENT, &[10, 5],
            Ok((10, none, CLIENT, mac(10), 1500, false))),
        ("DSA user port listed directly", dsa_router(3), 5, GW, &[3, 4, 5],
            Ok((5, none, GW, mac(5), 1500, false))),
        ("DSA: the walk stops at the user port, not the conduit", dsa_router(3), 10, CLIENT, &[2],
            Err(LowerError::NotManaged("lan2".into()))),
        ("blocked bridge port", dsa_router(4), 10, CLIENT, &[3, 4],
            Err(LowerError::PortNotForwarding { port: "lan2".into(), state: 4 })),
        ("no fdb entry for the next hop", dsa_router(3), 10, GW, &[3, 4],
            Err(LowerError::NoFdb { bridge: "br-lan".into(), mac: mac_str(&GW), vlan: None })),
        ("VLAN WAN eth0.2, the NIC listed", dsa_router(3), 6, GW, &[2],
            Ok((2, stack(&[(Q, 2)]), GW, mac(6), 1500, false))),
        ("VLAN WAN eth0.2 listed itself", dsa_router(3), 6, GW, &[6],
            Ok((6, none, GW, mac(6), 1500, false))),
        ("PPPoE over VLAN, the NIC listed", one(), 4, [0; 6], &[2],
            Ok((2, stack(&[(Q, 7), (S, 0x1a2b)]), PEER, mac(3), 1492, false))),
        ("PPPoE over VLAN, the VLAN device listed", one(), 4, [0; 6], &[3],
            Ok((3, stack(&[(S, 0x1a2b)]), PEER, mac(3), 1492, false))),
        ("PPPoE device listed itself: L3", one(), 4, [0; 6], &[4],
            Ok((4, none, [0; 6], [0; 6], 1492, true))),
        ("PPPoE, two ppp devices: which session is whose?", wan_router(vec![session(1, "wan.7")], true), 4, [0; 6], &[2],
            Err(LowerError::Pppoe("pppoe-wan: 1 PPPoE sessions and 2 ppp devices; /proc/net/pppoe does not say which session is whose".into()))),
        ("ppp without a session", wan_router(vec![], false), 4, [0; 6], &[2],
            Err(LowerError::Pppoe("pppoe-wan: no PPPoE session in /proc/net/pppoe".into()))),
        ("WireGuard listed: L3", one(), 5, [0; 6], &[2, 5],
            Ok((5, none, [0; 6], [0; 6], 1420, true))),
        ("WireGuard not listed", one(), 5, [0; 6], &[2],
            Err(LowerError::NotManaged("wg0".into()))),
        ("QinQ", one(), 7, GW, &[2],
            Ok((2, stack(&[(AD, 100), (Q, 7)]), GW, mac(7), 1500, false))),
        ("PPPoE over QinQ: three headers", deep(), 4, [0; 6], &[2],
            Err(LowerError::TooDeep("pppoe-wan".into()))),
        ("PPPoE over QinQ, the outer VLAN device listed: two", deep(), 4, [0; 6], &[6],
            Ok((6, stack(&[(Q, 7), (S, 0x1a2b)]), PEER, mac(7), 1492, false))),
        ("VLAN filtering, untagged member", fdb1(3), 10, CLIENT, &[3, 4, 5],
            Ok((3, none, CLIENT, mac(10), 1500, false))),
        ("VLAN filtering, tagged member", fdb1(4), 10, CLIENT, &[3, 4, 5],
            Ok((4, stack(&[(Q, 1)]), CLIENT, mac(10), 1500, false))),
        ("VLAN filtering, untagged but another PVID", fdb1(5), 10, CLIENT, &[3, 4, 5],
            Err(LowerError::PvidMismatch { port: "lan3".into(), vid: 1 })),
        ("VLAN filtering, fdb entry in another VLAN", with_fdb(fb(), &[(3, CLIENT, Some(20))]), 10, CLIENT, &[3],
            Err(LowerError::NoFdb { bridge: "br-lan".into(), mac: mac_str(&CLIENT), vlan: Some(1) })),
        ("VLAN device on a filtering bridge: the tag is the bridge VLAN", with_fdb(fb(), &[(3, CLIENT, Some(10))]), 11, CLIENT, &[3, 4],
            Ok((3, stack(&[(Q, 10)]), CLIENT, mac(11), 1500, false))),
        ("VLAN device on a filtering bridge, port not a member", with_fdb(fb(), &[(4, CLIENT, Some(10))]), 11, CLIENT, &[3, 4],
            Err(LowerError::PortNotInVlan { port: "lan2".into(), vid: 10 })),
        ("device not in the snapshot", one(), 99, GW, &[2],
            Err(LowerError::Unknown(99))),
    ];
    for (what, topo, dev, dmac, managed, want) in cases {
        let got =
            topo.egress(dev, dmac, |i| managed.contains(&i)).map(|e| (e.port, e.encap, e.dmac, e.smac, e.mtu, e.l3));
        assert_eq!(got, want, "{what}");
    }
}

/// A VLAN device's egress QoS map becomes its tag's PCP per priority
/// (0, 2, 4, 6), in the order of the headers pushed; a bridge's own tag
/// has none, the tag of a VLAN device above a filtering bridge keeps that
/// device's; an ingress map anywhere on the way is reported.
#[test]
fn vlan_qos_maps_follow_their_tags() {
    const Q: u16 = ETH_P_8021Q;
    const AD: u16 = ETH_P_8021AD;
    // egress-qos-map 0:1 2:3 4:5 6:7 5:2 (5 is never a forwarded packet's)
    let q = VlanQos::from_maps(&[(0, 1), (2, 3), (4, 5), (6, 7), (5, 2)], &[]);
    assert_eq!(q, VlanQos { egress: 1 | 3 << 3 | 5 << 6 | 7 << 9, ingress: false });
    assert_eq!(VlanQos::from_maps(&[(6, 6)], &[(3, 0)]), VlanQos { egress: 6 << 9, ingress: false });
    assert!(VlanQos::from_maps(&[], &[(5, 2)]).ingress, "ingress-qos-map 5:2");
    let with_qos = |mut l: Link, qos: VlanQos| {
        if let Kind::Vlan { qos: q, .. } = &mut l.kind {
            *q = qos;
        }
        l
    };
    let inner = VlanQos { egress: 2 << 3, ingress: false };
    let links = [
        link(2, "eth1", Kind::Other(None)),
        with_qos(vlan(6, "eth1.100", 100, AD, 2), q),
        with_qos(vlan(7, "eth1.100.7", 7, Q, 6), inner),
        with_qos(vlan(8, "eth1.9", 9, Q, 2), VlanQos { egress: 0, ingress: true }),
    ];
    let topo = Topology::new(links, Vec::new(), Vec::new());
    let e = topo.egress(7, GW, |i| i == 2).unwrap();
    assert_eq!((e.encap, e.pcp, e.ingress_qos), (stack(&[(AD, 100), (Q, 7)]), [q.egress, inner.egress], None));
    let e = topo.egress(7, GW, |i| i == 6).unwrap();
    assert_eq!((e.encap, e.pcp), (stack(&[(Q, 7)]), [inner.egress, 0]), "the outer device pushes its own");
    assert_eq!(topo.egress(8, GW, |i| i == 2).unwrap().ingress_qos.as_deref(), Some("eth1.9"));
    assert_eq!(topo.egress(8, GW, |i| i == 8).unwrap().ingress_qos.as_deref(), Some("eth1.9"), "listed itself");

    // br-lan.10 on a filtering bridge: lan1 sends VLAN 10 tagged, with
    // br-lan.10's PCP; lan2's bridge VLAN 1 tag (the PVID) has none.
    let mut fb = filtering_bridge();
    fb = Topology::new(
        fb.links().map(|l| if l.ifindex == 11 { with_qos(l.clone(), q) } else { l.clone() }),
        Vec::new(),
        Vec::new(),
    );
    let fb = with_fdb(fb, &[(3, CLIENT, Some(10)), (4, CLIENT, Some(1))]);
    let e = fb.egress(11, CLIENT, |i| [3, 4].contains(&i)).unwrap();
    assert_eq!((e.port, e.encap, e.pcp), (3, stack(&[(Q, 10)]), [q.egress, 0]));
    let e = fb.egress(10, CLIENT, |i| [3, 4].contains(&i)).unwrap();
    assert_eq!((e.port, e.encap, e.pcp), (4, stack(&[(Q, 1)]), [0, 0]));
}

#[test]
fn bridges_crossed_are_reported() {
    let e = dsa_router(3).egress(10, CLIENT, |i| i == 4).unwrap();
    assert_eq!(e.bridges, [10]);
    let e = dsa_router(3).egress(6, GW, |i| i == 2).unwrap();
    assert!(e.bridges.is_empty());
}

#[test]
fn only_the_fdb_and_transient_errors_are_retried() {
    let no_fdb = LowerError::NoFdb { bridge: "br-lan".into(), mac: mac_str(&GW), vlan: Some(1) };
    assert!(no_fdb.transient());
    assert_eq!(no_fdb.to_string(), "br-lan has no fdb entry for 02:99:00:00:00:01 in VLAN 1 yet");
    assert!(LowerError::Unknown(3).transient());
    for e in [
        LowerError::NotManaged("wg0".into()),
        LowerError::PortNotForwarding { port: "lan2".into(), state: 4 },
        LowerError::TooDeep("pppoe-wan".into()),
        LowerError::Loop,
    ] {
        assert!(!e.transient(), "{e}");
    }
}

#[test]
fn a_client_roaming_moves_its_fdb_entry() {
    let mut t = dsa_router(3);
    let at = |p: u32| FdbChange { entry: FdbEntry { bridge: 10, port: p, mac: CLIENT, vlan: None }, gone: false };
    assert_eq!(t.apply_fdb(&[at(4)]), Vec::<[u8; 6]>::new(), "refreshed on the same port");
    assert_eq!(t.apply_fdb(&[at(3)]), vec![CLIENT], "moved to lan1");
    assert_eq!(t.egress(10, CLIENT, |i| i == 3 || i == 4).unwrap().port, 3);
    assert_eq!(t.apply_fdb(&[FdbChange { gone: true, ..at(3) }]), Vec::<[u8; 6]>::new(), "aged out: kept");
    assert!(matches!(t.egress(10, CLIENT, |i| i == 3), Err(LowerError::NoFdb { .. })), "new walks need it");
    assert_eq!(t.apply_fdb(&[at(3)]), vec![CLIENT], "learned again");
}

#[test]
fn a_loop_is_refused() {
    let t = Topology::new([vlan(2, "a", 1, ETH_P_8021Q, 3), vlan(3, "b", 2, ETH_P_8021Q, 2)], vec![], vec![]);
    assert_eq!(t.egress(2, GW, |_| false), Err(LowerError::Loop));
}

#[test]
fn describe_says_what_each_device_is() {
    let one = wan_router(vec![session(0x1a2b, "wan.7")], false);
    let dsa = dsa_router(3);
    let cases = [
        (&one, 4, "pppoe-wan: PPPoE session 0x1a2b over wan.7 (VLAN 7) on eth1"),
        (&one, 3, "wan.7: VLAN 7 on eth1"),
        (&one, 7, "eth1.100.7: VLAN 7 over eth1.100 (802.1ad VLAN 100) on eth1"),
        (&one, 5, "wg0: wireguard, no link-layer header"),
        (&one, 2, "eth1: Ethernet port"),
        (&dsa, 10, "br-lan: bridge, ports lan1 lan2"),
        (&dsa, 4, "lan2: DSA user port, port of br-lan"),
        (&filtering_bridge(), 10, "br-lan: bridge with VLAN filtering, ports lan1 lan2 lan3"),
    ];
    for (t, i, want) in cases {
        assert_eq!(t.describe(i), want);
    }
}

#[test]
fn proc_net_pppoe_is_read_as_the_kernel_prints_it() {
    // pppoe_seq_show prints the __be16 id with %08X.
    let text = format!(
        "Id       Address              Device\n{:08X} 02:ac:00:00:00:01    wan.7\n",
        u32::from(0x1a2bu16.to_be())
    );
    assert_eq!(parse_pppoe(&text).unwrap(), vec![session(0x1a2b, "wan.7")]);
    assert_eq!(parse_pppoe("Id       Address              Device\n").unwrap(), vec![]);
    let bad = parse_pppoe("Id Address Device\n00002B1A 02:ac:00 wan\n").unwrap_err();
    assert!(format!("{bad:#}").contains("peer MAC"), "{bad:#}");
    assert!(parse_pppoe("Id Address Device\nzz 02:ac:00:00:00:01 wan\n").is_err());
}

/// The decoders over messages as the kernel sends them.
#[test]
fn rtnetlink_messages_decode_into_links_vlans_and_fdb() {
    let msg = |index: u32, ty: LinkLayerType, attrs: Vec<LinkAttribute>| {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.link_layer_type = ty;
        m.attributes = attrs;
        m
    };
    let vlan = msg(
        6,
        LinkLayerType::Ether,
        vec![
            LinkAttribute::IfName("wan.7".into()),
            LinkAttribute::Link(2),
            LinkAttribute::Mtu(1500),
            LinkAttribute::Address(mac(6).to_vec()),
            LinkAttribute::LinkInfo(vec![
                rt::LinkInfo::Kind(InfoKind::Vlan),
                rt::LinkInfo::Data(InfoData::Vlan(vec![
                    InfoVlan::Id(7),
                    InfoVlan::Protocol(VlanProtocol::Ieee8021Ad),
                    InfoVlan::EgressQos(vec![rt::VlanQosMapping::Mapping(2, 5), rt::VlanQosMapping::Mapping(6, 7)]),
                    InfoVlan::IngressQos(vec![rt::VlanQosMapping::Mapping(3, 4)]),
                ])),
            ]),
        ],
    );
    let l = link_of(&vlan);
    assert_eq!(
        (l.name.as_str(), l.kind.clone(), l.lower, l.mac),
        (
            "wan.7",
            Kind::Vlan { id: 7, proto: ETH_P_8021AD, qos: VlanQos { egress: 5 << 3 | 7 << 9, ingress: true } },
            Some(2),
            mac(6)
        )
    );
    let br = msg(
        10,
        LinkLayerType::Ether,
        vec![LinkAttribute::LinkInfo(vec![
            rt::LinkInfo::Kind(InfoKind::Bridge),
            rt::LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::VlanFiltering(true)])),
        ])],
    );
    assert_eq!(link_of(&br).kind, Kind::Bridge { vlan_filtering: true });
    let p = msg(
        3,
        LinkLayerType::Ether,
        vec![
            LinkAttribute::Controller(10),
            LinkAttribute::LinkInfo(vec![
                rt::LinkInfo::Kind(InfoKind::Veth),
                rt::LinkInfo::PortKind(InfoPortKind::Bridge),
                rt::LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::State(
                    rt::BridgePortState::Blocking,
                )])),
            ]),
        ],
    );
    let p = link_of(&p);
    assert_eq!((p.master, p.port_state, p.kind), (Some(10), Some(4), Kind::Other(Some("veth".into()))));
    let wg = msg(5, LinkLayerType::None, vec![LinkAttribute::LinkInfo(vec![rt::LinkInfo::Kind(InfoKind::Wireguard)])]);
    assert!(link_of(&wg).is_l3());

    let mut bv = msg(3, LinkLayerType::Ether, vec![]);
    bv.header.interface_family = AddressFamily::Bridge;
    bv.attributes.push(LinkAttribute::AfSpecBridge(vec![
        AfSpecBridge::VlanInfo(BridgeVlanInfo {
            flags: BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged,
            vid: 1,
        }),
        AfSpecBridge::VlanInfo(BridgeVlanInfo { flags: BridgeVlanInfoFlags::empty(), vid: 10 }),
    ]));
    assert_eq!(vlans_of(&bv), [pv(1, true, true), pv(10, false, false)]);

    let mut n = NeighbourMessage::default();
    n.header.family = AddressFamily::Bridge;
    n.header.ifindex = 4;
    n.attributes = vec![
        NeighbourAttribute::LinkLayerAddress(CLIENT.to_vec()),
        NeighbourAttribute::Vlan(1),
        NeighbourAttribute::Controller(10),
    ];
    assert_eq!(fdb_of(&n), Some(FdbEntry { bridge: 10, port: 4, mac: CLIENT, vlan: Some(1) }));
    n.attributes.pop();
    assert_eq!(fdb_of(&n), None, "a port's own address list (no NDA_MASTER)");
}

/// What a port's fast path may skip lives on the devices above it.
#[test]
fn uppers_are_every_device_a_walk_may_cross() {
    let one = wan_router(vec![session(0x1a2b, "wan.7")], false);
    let dsa = dsa_router(3);
    let cases: [(&str, &Topology, u32, &[u32]); 6] = [
        ("NIC under VLAN, QinQ and PPPoE", &one, 2, &[3, 4, 6, 7]),
        ("VLAN under PPPoE", &one, 3, &[4]),
        ("ppp device: nothing above", &one, 4, &[]),
        ("WireGuard", &one, 5, &[]),
        ("DSA port of br-lan", &dsa, 3, &[10]),
        ("DSA conduit: VLAN on it, not the user ports' bridge", &dsa, 2, &[6]),
    ];
    for (what, t, port, want) in cases {
        assert_eq!(t.uppers(port), want, "{what}");
    }
    let fb = filtering_bridge();
    assert_eq!(fb.uppers(3), vec![10, 11], "a bridge port: the bridge and the VLAN device on it");
    let two = wan_router(vec![session(1, "wan.7"), session(2, "eth1")], true);
    assert_eq!(two.uppers(2), vec![3, 6, 7], "an ambiguous ppp device counts above nothing");
}

/// Which ppp devices get the fast path because TC runs below them.
#[test]
fn pppoe_devices_above_a_tc_port_are_attached_too() {
    let one = wan_router(vec![session(0x1a2b, "wan.7")], false);
    let names = |v: Vec<PppoeUpper>| v.into_iter().map(|u| (u.name, u.port)).collect::<Vec<_>>();
    let pick = |t: &Topology, managed: &[u32], tc: bool| {
        names(pppoe_uppers(t, |i| managed.contains(&i), |i| tc && managed.contains(&i)))
    };
    let want = vec![("pppoe-wan".to_string(), "eth1".to_string())];
    assert_eq!(pick(&one, &[2], true), want, "eth1 listed, TC: through the VLAN to the session");
    assert_eq!(pick(&one, &[3], true), vec![("pppoe-wan".into(), "wan.7".into())], "wan.7 listed");
    assert_eq!(pick(&one, &[2], false), vec![], "XDP on eth1 pops and pushes PPPoE itself");
    assert_eq!(pick(&one, &[2, 4], true), vec![], "pppoe-wan listed already");
    assert_eq!(pick(&one, &[5], true), vec![], "no port below it is managed");
    let two = wan_router(vec![session(1, "wan.7"), session(2, "eth1")], true);
    assert_eq!(pick(&two, &[2], true), vec![], "ambiguous sessions: neither");
}

/// Which managed devices leave packets to a managed device above them
/// (`watch_below`): its watcher saw them before its qdisc.
#[test]
fn watchers_below_a_managed_device_leave_it_its_packets() {
    let one = wan_router(vec![session(0x1a2b, "wan.7")], false);
    let dsa = dsa_router(3);
    let fb = filtering_bridge();
    type Case<'a> = (&'a str, &'a Topology, &'a [u32], &'a [(u32, Below)]);
    let cases: [Case; 7] = [
        ("eth1 alone", &one, &[2], &[]),
        ("eth1 and the pppoe-wan attached above it (TC)", &one, &[2, 4], &[(2, Below::Encap)]),
        ("wan.7 and pppoe-wan: both below it", &one, &[2, 3, 4], &[(2, Below::Encap), (3, Below::Encap)]),
        ("ports of br-lan, br-lan not listed", &dsa, &[3, 4, 5], &[]),
        ("br-lan and its ports", &dsa, &[3, 4, 10], &[(3, Below::All), (4, Below::All)]),
        ("the conduit under eth0.2", &dsa, &[2, 6], &[(2, Below::Encap)]),
        ("a port under br-lan.10 only", &fb, &[3, 11], &[(3, Below::Encap)]),
    ];
    for (what, t, managed, want) in cases {
        assert_eq!(watch_below(t, managed), want, "{what}");
    }
}

/// What XDP serves a VLAN or PPPoE device from: the Ethernet device
/// beneath, with the headers on the way; nothing for other devices.
#[test]
fn the_ethernet_device_beneath_a_vlan_or_ppp_device() {
    let links = [
        link(2, "wan", Kind::Other(Some("veth".into()))),
        vlan(3, "wan.7", 7, ETH_P_8021Q, 2),
        vlan(4, "wan.100", 100, ETH_P_8021AD, 2),
        vlan(5, "wan.100.7", 7, ETH_P_8021Q, 4),
        ppp(6, "pppoe-wan"),
        link(7, "lan", Kind::Other(None)),
    ];
    let pppoe = vec![PppoeSession { id: 0x1a2b, peer: PEER, device: "wan.7".into() }];
    let t = Topology::new(links, Vec::new(), pppoe);
    let under = |i| t.beneath(i).map(|r| r.map(|e| (e.port, e.encap)));
    assert_eq!(under(3), Some(Ok((2, stack(&[(ETH_P_8021Q, 7)])))));
    assert_eq!(under(5), Some(Ok((2, stack(&[(ETH_P_8021AD, 100), (ETH_P_8021Q, 7)])))));
    assert_eq!(under(6), Some(Ok((2, stack(&[(ETH_P_8021Q, 7), (ETH_P_PPP_SES, 0x1a2b)])))));
    assert_eq!(under(2), None, "an Ethernet device serves itself");
    assert_eq!(under(7), None);
    assert_eq!(t.vlans_on(2), ["wan.7", "wan.100"]);
    assert!(t.vlans_on(3).is_empty());
    // Two ppp devices: which session is whose cannot be told.
    let mut two = t.clone();
    two.links.insert(8, ppp(8, "ppp1"));
    assert!(matches!(two.beneath(6), Some(Err(LowerError::Pppoe(_)))));
}
