//! Every branch of `verdict`, one row each.

use super::*;
use crate::conntrack::status;
use crate::dataplane::fo_teardown;
use crate::flow::tests::tcp_masq;
use crate::flow::{build_direction, Hold, NextHop};
use crate::routes::per_packet::PerPacket;
use crate::routes::rules::Selector;
use crate::topology::LowerError;

const LAN: u32 = 3;
const WAN: u32 = 4;
const DMZ: u32 = 5;
/// pppoe-wan, attached by the engine above WAN (a TC port under PPPoE).
const PPP: u32 = 6;

struct FakePorts;

impl Ports for FakePorts {
    fn is_up(&self, ifindex: u32) -> bool {
        self.name(ifindex).is_some()
    }
    fn first_up(&self) -> Option<u32> {
        Some(LAN)
    }
    fn name(&self, ifindex: u32) -> Option<&str> {
        match ifindex {
            LAN => Some("lan"),
            WAN => Some("wan"),
            DMZ => Some("dmz"),
            PPP => Some("pppoe-wan"),
            _ => None,
        }
    }
    fn listed_name(&self, ifindex: u32, encap: &crate::flow::EncapStack) -> Option<&str> {
        match ifindex {
            PPP => self.name(WAN),
            // XDP on "wan" serves only "wan.7" (VLAN 7) when WAN_VLAN is
            // asked: see `served_vlan`.
            WAN if !encap.as_slice().is_empty() => {
                (encap.as_slice() == [crate::flow::Encap { proto: 0x8100, id: 7 }]).then_some("wan.7")
            }
            _ => self.name(ifindex),
        }
    }
}

/// Holds each direction as listed (original, reply).
struct FakeHolds([Option<Hold>; 2]);

impl Holds for FakeHolds {
    fn held(&self, _: &CtEntry, dir: usize, d: &Direction) -> Option<Held> {
        self.0[dir].map(|hold| Held { hold, why: format!("{hold:?} on {}", d.key.ifindex) })
    }
}

const NO_HOLDS: FakeHolds = FakeHolds([None, None]);

fn label(bit: u32) -> [u8; 16] {
    let mut l = [0u8; 16];
    l[(bit / 8) as usize] |= 1 << (bit % 8);
    l
}

fn flowtables() -> Vec<Flowtable> {
    let ft = |name: &str, devices: &[&str], label_bit| Flowtable {
        family: "inet".into(),
        table: "fw4".into(),
        name: name.into(),
        devices: devices.iter().map(|d| d.to_string()).collect(),
        hw_offload: false,
        counter: false,
        label_bit,
        line: 1,
    };
    vec![ft("ft", &["lan", "wan"], 127), ft("ft_dmz", &["dmz", "lan"], 126), ft("ft_vlan", &["lan", "wan.7"], 125)]
}

/// `path(WAN)` leaving (and coming back) with VLAN tag `id` on the port.
fn tagged(id: u16) -> PathAnswer {
    use crate::flow::{Encap, EncapStack, LinkLayer};
    let mut tag = EncapStack::default();
    tag.push(Encap { proto: 0x8100, id });
    let [o, r] = path(WAN)?;
    let none = EncapStack::default();
    let up = LinkLayer { in_encap: none, out_encap: tag, ..Default::default() };
    let down = LinkLayer { in_encap: tag, out_encap: none, ..Default::default() };
    Ok([o.with_link(&up), r.with_link(&down)])
}

/// The masqueraded TCP connection, routed LAN -> `out`.
fn path(out: u32) -> PathAnswer {
    let e = tcp_masq();
    let nh =
        |ifindex| NextHop { ifindex, smac: [2, 0, 0, 0, 0, 1], dmac: [2, 0, 0, 0, 0, 2], mtu: 1500, xdp_ok: false };
    Ok([build_direction(&e.orig, &e.reply, LAN, &nh(out)), build_direction(&e.reply, &e.orig, out, &nh(LAN))])
}

fn exclusions() -> Exclusions {
    Exclusions { ports: vec!["5060".parse().unwrap()], ..Default::default() }
}

type PathAnswer = Result<[Direction; 2], NoPath>;
/// (case, mode, entry, known, path, expected)
type Case<'a> = (&'static str, Mode, CtEntry, Known, Option<&'a PathAnswer>, Verdict);

#[derive(Clone, Copy)]
enum Mode {
    Iface,
    Nft,
}

/// Entry variations.
fn labelled(bit: u32) -> CtEntry {
    CtEntry { labels: Some(label(bit)), ..tcp_masq() }
}
fn plain() -> CtEntry {
    tcp_masq()
}
fn marked() -> CtEntry {
    CtEntry { mark: 7, ..labelled(127) }
}
fn sip() -> CtEntry {
    let mut e = labelled(127);
    e.orig.dport = 5060;
    e.reply.sport = 5060;
    e
}
fn state(s: u8) -> CtEntry {
    CtEntry { tcp_state: Some(s), ..labelled(127) }
}
fn not_assured() -> CtEntry {
    CtEntry { status: status::CONFIRMED | status::SEEN_REPLY, ..labelled(127) }
}
fn helper() -> CtEntry {
    CtEntry { has_helper: true, ..labelled(127) }
}
fn zoned() -> CtEntry {
    CtEntry { zone: 5, ..labelled(127) }
}
fn udp_unconfirmed() -> CtEntry {
    let mut e = labelled(127);
    e.orig.proto = 17;
    e.reply.proto = 17;
    e.tcp_state = None;
    e.status = 0;
    e
}

/// A UDP connection as its first packet's confirmation shows it (the NEW
/// event), and once its reply passed conntrack.
fn udp_first() -> CtEntry {
    CtEntry { status: status::CONFIRMED, ..udp_unconfirmed() }
}
fn udp_replied() -> CtEntry {
    CtEntry { status: status::CONFIRMED | status::SEEN_REPLY, ..udp_unconfirmed() }
}
fn udp_first_unlabelled() -> CtEntry {
    CtEntry { labels: None, ..udp_first() }
}

const OFF: Known = Known::Offloaded { mark: 0, close: 0, dormant: [false, false] };
const DORMANT: Known = Known::Dormant { mark: 0, woke: [false, false] };
/// Both directions seen forwarded since it slept.
const WOKE: Known = Known::Dormant { mark: 0, woke: [true, true] };
/// Only the reply seen forwarded (the server retransmitting to a client
/// whose uploads the ruleset now drops).
const WOKE_REPLY: Known = Known::Dormant { mark: 0, woke: [false, true] };
/// Offloaded again on the reply's evidence; the original still dormant.
const OFF_REPLY_ONLY: Known = Known::Offloaded { mark: 0, close: 0, dormant: [true, false] };
const WAITING: Known = Known::Waiting { mark: 0 };

#[test]
fn every_branch() {
    let ok = path(WAN);
    let to_dmz = path(DMZ);
    let to_ppp = path(PPP);
    let neigh = Err(NoPath::Unroutable(7));
    let asym = Err(NoPath::Asymmetric);
    let elsewhere = Err(NoPath::SourceElsewhere("198.51.100.1".parse().unwrap()));
    let by_tos = Err(NoPath::Rule(Selector::Tos));
    let tos_route = PerPacket::Tos { prefix: "203.0.113.0/24".into() };
    let by_tos_route = Err(NoPath::PerPacket(tos_route.clone()));
    let no_fdb = LowerError::NoFdb { bridge: "br-lan".into(), mac: "02:00:00:00:00:02".into(), vlan: None };
    let blocked = LowerError::PortNotForwarding { port: "lan2".into(), state: 4 };
    let too_deep = LowerError::TooDeep("pppoe-wan".into());
    let (no_fdb_p, blocked_p, too_deep_p) =
        (Err(NoPath::Lower(no_fdb.clone())), Err(NoPath::Lower(blocked.clone())), Err(NoPath::Lower(too_deep.clone())));
    let dirs = ok.clone().unwrap();
    let dirs_dmz = to_dmz.clone().unwrap();
    let dirs_ppp = to_ppp.clone().unwrap();
    let (vlan7, vlan8) = (tagged(7), tagged(8));
    let dirs_vlan7 = vlan7.clone().unwrap();
    use Known::Untracked as U;
    use Mode::*;
    use TeardownReason as T;
    use Verdict as V;
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        // the ruleset decides
        ("never reached flow add", Nft, plain(), U, None, V::Ignore),
        ("label cleared while offloaded", Nft, plain(), OFF, None, V::Teardown(T::Policy)),
        ("mark changed while offloaded", Nft, marked(), OFF, None, V::Teardown(T::Policy)),
        ("label cleared while dormant", Nft, plain(), DORMANT, None, V::Teardown(T::Policy)),
        ("mark changed while waiting", Nft, marked(), WAITING, None, V::Teardown(T::Policy)),
        ("mark change without a ruleset is no policy change: the path is asked again", Iface, marked(), OFF, None, V::NeedsPath),
        ("mark changed, path follows it", Iface, marked(), OFF, Some(&ok), V::Offload(dirs)),
        ("labelled: candidate", Nft, labelled(127), U, None, V::NeedsPath),
        // exclusions
        ("excluded, new", Iface, sip(), U, None, V::NotOffloaded(NotOffloaded::Excluded(Excluded::Port("5060".parse().unwrap())))),
        ("excluded, waiting", Iface, sip(), WAITING, None, V::NotOffloaded(NotOffloaded::Excluded(Excluded::Port("5060".parse().unwrap())))),
        ("excluded, offloaded", Iface, sip(), OFF, None, V::Teardown(T::Policy)),
        ("excluded, dormant", Iface, sip(), DORMANT, None, V::Teardown(T::Policy)),
        // offloaded connections
        ("offloaded, RST seen", Iface, state(tcp_state::CLOSE), Known::Offloaded { mark: 0, close: fo_teardown::FO_TD_RST.0, dormant: [false, false] }, None, V::Teardown(T::TcpRst)),
        ("offloaded, FIN seen", Iface, state(tcp_state::FIN_WAIT), Known::Offloaded { mark: 0, close: fo_teardown::FO_TD_FIN.0, dormant: [false, false] }, None, V::Teardown(T::TcpFin)),
        ("offloaded, conntrack closing", Iface, state(tcp_state::TIME_WAIT), OFF, None, V::Teardown(T::TcpFin)),
        ("offloaded, helper attached", Iface, helper(), OFF, None, V::Teardown(T::NoLongerEligible)),
        ("offloaded, still eligible", Iface, plain(), OFF, None, V::Update),
        ("offloaded, path re-resolved", Iface, plain(), OFF, Some(&ok), V::Offload(dirs)),
        ("offloaded, path gone", Iface, plain(), OFF, Some(&asym), V::Teardown(T::RouteChange)),
        ("offloaded, neighbour gone", Iface, plain(), OFF, Some(&neigh), V::Teardown(T::RouteChange)),
        ("offloaded, an ip rule moved it away from its NAT address", Iface, plain(), OFF, Some(&elsewhere), V::Teardown(T::RouteChange)),
        ("offloaded, an ip rule on tos appeared", Iface, plain(), OFF, Some(&by_tos), V::Teardown(T::RouteChange)),
        ("offloaded, a route on tos appeared", Iface, plain(), OFF, Some(&by_tos_route), V::Teardown(T::RouteChange)),
        ("offloaded, rerouted out of its flowtable", Nft, labelled(127), OFF, Some(&to_dmz), V::Teardown(T::RouteChange)),
        // dormant connections
        ("dormant, ineligible", Iface, state(tcp_state::FIN_WAIT), DORMANT, None, V::Teardown(T::NoLongerEligible)),
        ("dormant, asleep", Iface, plain(), DORMANT, None, V::Update),
        ("dormant, woke", Iface, plain(), WOKE, None, V::NeedsPath),
        ("dormant, woke, path", Iface, plain(), WOKE, Some(&ok), V::Offload(dirs)),
        ("dormant, woke, no path", Iface, plain(), WOKE, Some(&asym), V::NotOffloaded(NotOffloaded::NoPath(NoPath::Asymmetric))),
        ("dormant, woke, neighbour", Iface, plain(), WOKE, Some(&neigh), V::Wait(NoPath::Unroutable(7))),
        // new and waiting connections
        ("handshake", Iface, state(tcp_state::SYN_RECV), U, None, V::NotYet(Ineligible::TcpNotEstablished)),
        ("handshake while waiting", Iface, state(tcp_state::SYN_RECV), WAITING, None, V::NotYet(Ineligible::TcpNotEstablished)),
        ("not assured", Iface, not_assured(), U, None, V::NotYet(Ineligible::NotAssured)),
        ("helper", Iface, helper(), U, None, V::NotOffloaded(NotOffloaded::Ineligible(Ineligible::Helper))),
        ("udp unconfirmed", Iface, udp_unconfirmed(), U, None, V::NotOffloaded(NotOffloaded::Ineligible(Ineligible::NotConfirmed))),
        ("zoned", Nft, zoned(), U, None, V::NotOffloaded(NotOffloaded::Ineligible(Ineligible::Zoned))),
        ("eligible", Iface, plain(), U, None, V::NeedsPath),
        ("neighbour resolving", Iface, plain(), U, Some(&neigh), V::Wait(NoPath::Unroutable(7))),
        ("unroutable", Iface, plain(), U, Some(&asym), V::NotOffloaded(NotOffloaded::NoPath(NoPath::Asymmetric))),
        ("masqueraded, routed out of another interface", Iface, plain(), U, Some(&elsewhere), V::NotOffloaded(NotOffloaded::NoPath(NoPath::SourceElsewhere("198.51.100.1".parse().unwrap())))),
        ("bridge has not learned the next hop yet", Iface, plain(), U, Some(&no_fdb_p), V::Wait(NoPath::Lower(no_fdb))),
        ("bridge port blocked", Iface, plain(), U, Some(&blocked_p), V::NotOffloaded(NotOffloaded::NoPath(NoPath::Lower(blocked)))),
        ("three VLAN/PPPoE headers", Iface, plain(), U, Some(&too_deep_p), V::NotOffloaded(NotOffloaded::NoPath(NoPath::Lower(too_deep)))),
        ("an ip rule the lookup cannot reproduce", Iface, plain(), U, Some(&by_tos), V::NotOffloaded(NotOffloaded::NoPath(NoPath::Rule(Selector::Tos)))),
        ("a route chosen per packet", Iface, plain(), U, Some(&by_tos_route), V::NotOffloaded(NotOffloaded::NoPath(NoPath::PerPacket(tos_route)))),
        ("routed", Iface, plain(), U, Some(&ok), V::Offload(dirs)),
        ("waiting, routed", Iface, plain(), WAITING, Some(&ok), V::Offload(dirs)),
        ("any interface without a ruleset", Iface, plain(), U, Some(&to_dmz), V::Offload(dirs_dmz)),
        ("between its flowtable's devices", Nft, labelled(127), U, Some(&ok), V::Offload(dirs)),
        ("outside its flowtable's devices", Nft, labelled(127), U, Some(&to_dmz), V::NotOffloaded(NotOffloaded::NotInFlowtable)),
        ("the other flowtable's devices", Nft, labelled(126), U, Some(&to_dmz), V::Offload(dirs_dmz)),
        ("the other flowtable, wrong devices", Nft, labelled(126), U, Some(&ok), V::NotOffloaded(NotOffloaded::NotInFlowtable)),
        ("through the ppp device above a listed port", Nft, labelled(127), U, Some(&to_ppp), V::Offload(dirs_ppp)),
        // XDP on wan serving a listed wan.7: its tag is its name there
        ("through wan.7, served on wan", Nft, labelled(125), U, Some(&vlan7), V::Offload(dirs_vlan7)),
        ("through wan.8 on the port serving wan.7", Nft, labelled(125), U, Some(&vlan8), V::NotOffloaded(NotOffloaded::NotInFlowtable)),
        ("through wan untagged, only wan.7 listed", Nft, labelled(125), U, Some(&ok), V::NotOffloaded(NotOffloaded::NotInFlowtable)),
        // UDP: `flow add` takes a confirmed entry, so a later packet
        ("udp, first packet only: watched for a later one", Iface, udp_first(), U, Some(&ok), V::Watch(dirs)),
        ("udp, first packet only, waiting for its neighbour", Iface, udp_first(), WAITING, Some(&ok), V::Watch(dirs)),
        ("udp, its reply passed conntrack", Iface, udp_replied(), U, Some(&ok), V::Offload(dirs)),
        ("udp watched, the kernel forwarded another packet", Iface, udp_first(), WOKE, Some(&ok), V::Offload(dirs)),
        ("udp watched, nothing forwarded yet", Iface, udp_first(), DORMANT, None, V::Update),
        ("udp, first packet, --nft", Nft, udp_first(), U, Some(&ok), V::Watch(dirs)),
        ("asleep, label set again by flow add", Nft, udp_first(), Known::Asleep, None, V::NeedsPath),
        ("asleep, label set again: a later packet", Nft, udp_first(), Known::Asleep, Some(&ok), V::Offload(dirs)),
        ("asleep, the engine's own label clear heard", Nft, udp_first_unlabelled(), Known::Asleep, None, V::Ignore),
        ("asleep, excluded", Nft, CtEntry { labels: Some(label(127)), ..sip() }, Known::Asleep, None, V::NotOffloaded(NotOffloaded::Excluded(Excluded::Port("5060".parse().unwrap())))),
    ];
    let fts = flowtables();
    let ex = exclusions();
    for (case, mode, e, known, p, want) in cases {
        let rules = Rules { exclude: &ex, flowtables: matches!(mode, Nft).then_some(&fts[..]) };
        let world = World { ports: &FakePorts, holds: &NO_HOLDS, path: p };
        let got = verdict(&e, &known, &rules, &world);
        // Direction has no PartialEq (generated type): compare its bytes.
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "{case}");
    }
}

#[test]
fn reasons_read_as_before() {
    let cases = [
        (NotOffloaded::Excluded(Excluded::Port("22".parse().unwrap())), "excluded by port 22"),
        (NotOffloaded::Ineligible(Ineligible::Helper), "conntrack helper attached (ALG)"),
        (NotOffloaded::NoPath(NoPath::Asymmetric), "asymmetric routing"),
        (NotOffloaded::NotInFlowtable, "interfaces not in the flowtable the connection was added to"),
        (NotOffloaded::TableFull, "flow table full"),
        (NotOffloaded::NoMemory, "no kernel memory for its flow table entries"),
        (NotOffloaded::ConntrackUpdateFailed, "conntrack update failed"),
        (NotOffloaded::KeyCollision, "flow key already used by another connection"),
        (NotOffloaded::Ineligible(Ineligible::Zoned), "conntrack zone other than 0"),
    ];
    for (r, text) in cases {
        assert_eq!(r.to_string(), text);
    }
}

/// (case, known, holds of original and reply, path, expected)
type HoldCase<'a> = (&'static str, Known, [Option<Hold>; 2], Option<&'a PathAnswer>, Verdict);

/// One held direction is still offloaded, with the hold in its entry;
/// both held is no offload (or a teardown); a path not re-resolved keeps
/// what is installed.
#[test]
fn holds_per_direction() {
    let ok = path(WAN);
    let dirs = ok.clone().unwrap();
    let held = |h: [Option<Hold>; 2]| {
        let mut d = dirs;
        d[0].set_hold(h[0]);
        d[1].set_hold(h[1]);
        d
    };
    let why = |hold, ifindex| Held { hold, why: format!("{hold:?} on {ifindex}") };
    use Hold::*;
    use Known::Untracked as U;
    use Verdict as V;
    #[rustfmt::skip]
    let cases: Vec<HoldCase> = vec![
        ("none", U, [None, None], Some(&ok), V::Offload(dirs)),
        ("download held (ifb on the WAN)", U, [None, Some(IngressHook)], Some(&ok), V::Offload(held([None, Some(IngressHook)]))),
        ("upload held (xfrm out)", U, [Some(Xfrm), None], Some(&ok), V::Offload(held([Some(Xfrm), None]))),
        ("both held", U, [Some(Xfrm), Some(EgressHook)], Some(&ok), V::NotOffloaded(NotOffloaded::Held(Box::new([why(Xfrm, LAN), why(EgressHook, WAN)])))),
        ("offloaded, a hold appears", OFF, [None, Some(IngressHook)], Some(&ok), V::Offload(held([None, Some(IngressHook)]))),
        ("offloaded, both held now", OFF, [Some(Xfrm), Some(Xfrm)], Some(&ok), V::Teardown(TeardownReason::Held)),
        ("offloaded, not re-resolved", OFF, [Some(Xfrm), Some(Xfrm)], None, V::Update),
        ("dormant woke into a hold", WOKE, [Some(EgressHook), None], Some(&ok), V::Offload(held([Some(EgressHook), None]))),
        // Evidence is per direction: one seen leaving wakes only itself.
        ("dormant, only the reply seen forwarded", WOKE_REPLY, [None, None], Some(&ok), V::Offload(held([Some(Dormant), None]))),
        ("dormant, reply seen, not yet a path", WOKE_REPLY, [None, None], None, V::NeedsPath),
        ("a hold outranks dormant", WOKE_REPLY, [Some(Xfrm), None], Some(&ok), V::Offload(held([Some(Xfrm), None]))),
        ("held, and the other direction dormant: installed, both with the kernel", WOKE_REPLY, [None, Some(Xfrm)], Some(&ok), V::Offload(held([Some(Dormant), Some(Xfrm)]))),
        ("offloaded on one direction's evidence: the other stays held", OFF_REPLY_ONLY, [None, None], Some(&ok), V::Offload(held([Some(Dormant), None]))),
        ("offloaded, the dormant direction's evidence came", OFF, [None, None], Some(&ok), V::Offload(dirs)),
        ("offloaded, one direction dormant, the other now held", OFF_REPLY_ONLY, [None, Some(IngressHook)], Some(&ok), V::Offload(held([Some(Dormant), Some(IngressHook)]))),
        ("waiting, both held", WAITING, [Some(IngressHook), Some(IngressHook)], Some(&ok), V::NotOffloaded(NotOffloaded::Held(Box::new([why(IngressHook, LAN), why(IngressHook, WAN)])))),
    ];
    let ex = exclusions();
    for (case, known, h, p, want) in cases {
        let rules = Rules { exclude: &ex, flowtables: None };
        let holds = FakeHolds(h);
        let got = verdict(&plain(), &known, &rules, &World { ports: &FakePorts, holds: &holds, path: p });
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "{case}");
    }
    let both = NotOffloaded::Held(Box::new([why(Xfrm, 3), why(IngressHook, 4)]));
    assert_eq!(both.to_string(), "original: Xfrm on 3; reply: IngressHook on 4");
    let same = NotOffloaded::Held(Box::new([why(Xfrm, 3), why(Xfrm, 3)]));
    assert_eq!(same.to_string(), "both directions: Xfrm on 3");
}
