//! Encapsulation in the fast path through BPF_PROG_TEST_RUN (issue 9):
//! VLAN, QinQ, PPPoE and VLAN+PPPoE in and out, devices without a
//! link-layer header, the router-MAC check, the MTU with PPPoE's overhead
//! and malformed encapsulations; both entry points, output byte for byte,
//! the slow reason counted. Entries come from flow::build_direction, then
//! get the encapsulation, router MAC and flags path resolution gives them.
//!
//! What a test run cannot show: the skb's VLAN metadata. The kernel builds
//! the skb with eth_type_trans and accepts only a few __sk_buff fields
//! (bpf_prog_test_run_skb), so a tag arriving in metadata cannot be fed in
//! (TC's tags are tested in-band, the same parser after the metadata tag),
//! and the tag TC pushes last, the outermost, goes to metadata
//! (bpf_skb_vlan_push, as a VLAN device leaves it) and so is not in TC's
//! output bytes: TC's expected frames lack it (`tc_view`). An L3 device's
//! packet starts at its IP header, but the test run still takes
//! skb->protocol from bytes 12-13 (eth_type_trans): the L3 cases use
//! addresses that put the right ethertype there (IPv4 source 8.0.x.x, IPv6
//! source 2001:db8:86dd::/48), so the program sees what the device gives it.

use nft_offload::conntrack::CtTuple;
use nft_offload::dataplane::{fo_flow_flag, Dataplane, Probe, SkbIn, STAT_NAMES};
use nft_offload::flow::{build_direction, egress_key, Direction, NextHop};
use nft_offload_lab::frames::{
    encap, fo_encaps, tcp4, tcp6, udp4, Encap, CLIENT_MAC as CLIENT, ETH_P_8021AD, ETH_P_8021Q, ETH_P_PPP_SES,
    RTR_LAN_MAC as R_LAN, RTR_WAN_MAC as R_WAN, SERVER_MAC as SERVER,
};
use nft_offload_lab::private_router::PrivateRouter;
use nft_offload_lab::table::{check, stat_delta, Outcome};

use Encap::{Pppoe, Svlan, Vlan};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_NEXT: i32 = -1;
const TC_REDIRECT: i32 = 7;
/// Another host on the LAN segment (a frame to it is being bridged).
const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
/// The bridge's MAC, not the port's: what a bridge port's flow names.
const BRIDGE: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xbb];
const SID: u16 = 0x1a2b;

fn t(s: &str, sp: u16, d: &str, dp: u16, proto: u8) -> CtTuple {
    CtTuple { src: s.parse().unwrap(), dst: d.parse().unwrap(), proto, sport: sp, dport: dp }
}

/// One side of a connection: the port, its encapsulation, whether it is a
/// device without a link-layer header, the MAC its frames are addressed to.
#[derive(Clone, Copy)]
struct Side {
    ifindex: u32,
    encap: &'static [Encap],
    l3: bool,
    router_mac: [u8; 6],
    peer_mac: [u8; 6],
    mtu: u16,
}

/// The direction arriving on `from` and leaving through `to`.
fn direction(seen: &CtTuple, other: &CtTuple, from: Side, to: Side) -> Direction {
    let nh = NextHop { ifindex: to.ifindex, smac: to.router_mac, dmac: to.peer_mac, mtu: to.mtu, xdp_ok: !to.l3 };
    let mut d = build_direction(seen, other, from.ifindex, &nh);
    (d.key.encap, d.key.encap_num) = fo_encaps(from.encap);
    (d.val.out_encap, d.val.out_encap_num) = fo_encaps(to.encap);
    d.val.in_dmac = if from.l3 { [0; 6] } else { from.router_mac };
    // Arriving in a PPPoE session: only from the concentrator (the peer
    // routes::path's mirror names, as pppoe_rcv's get_item keys on it).
    if from.encap.iter().any(|e| matches!(e, Pppoe(_))) {
        d.val.in_smac = from.peer_mac;
    }
    if to.l3 {
        d.val.flags |= fo_flow_flag::FO_F_L3_OUT.0 as u8;
        (d.val.smac, d.val.dmac) = ([0; 6], [0; 6]);
    }
    d
}

struct Lab {
    lab: PrivateRouter,
    conns: Vec<[Direction; 2]>,
}

fn lan(lab: &PrivateRouter, encap: &'static [Encap]) -> Side {
    Side { ifindex: lab.lan, encap, l3: false, router_mac: R_LAN, peer_mac: CLIENT, mtu: 1500 }
}

fn wan(lab: &PrivateRouter, encap: &'static [Encap], mtu: u16) -> Side {
    Side { ifindex: lab.wan, encap, l3: false, router_mac: R_WAN, peer_mac: SERVER, mtu }
}

fn l3(s: Side) -> Side {
    Side { l3: true, encap: &[], ..s }
}

fn setup() -> Lab {
    setup_for(&Probe::kernel())
}

fn setup_for(probe: &Probe) -> Lab {
    let lab = PrivateRouter::enter_for(1024, probe).unwrap_or_else(|e| panic!("private router: {e:#}"));
    let masq = |p: u16, proto: u8| {
        (t("192.168.1.2", p, "203.0.113.2", 5201, proto), t("203.0.113.2", 5201, "203.0.113.1", p + 20000, proto))
    };
    let routed6 = |p: u16, server: &str| (t("fd00:1::2", p, server, 5201, 6), t(server, 5201, "fd00:1::2", p, 6));
    let specs: Vec<((CtTuple, CtTuple), Side, Side)> = vec![
        // 41000: untagged LAN, VLAN 7 WAN
        (masq(41000, 6), lan(&lab, &[]), wan(&lab, &[Vlan(7)], 1500)),
        // 41001: QinQ on both sides
        (masq(41001, 17), lan(&lab, &[Svlan(100), Vlan(200)]), wan(&lab, &[Svlan(300), Vlan(400)], 1500)),
        // 41002 / 41003: PPPoE WAN, 1492 on a 1500 link
        (masq(41002, 6), lan(&lab, &[]), wan(&lab, &[Pppoe(SID)], 1492)),
        (routed6(41003, "2001:db8::2"), lan(&lab, &[]), wan(&lab, &[Pppoe(SID)], 1492)),
        // 41004: PPPoE over VLAN 7 (the usual DSL / fibre WAN)
        (masq(41004, 6), lan(&lab, &[]), wan(&lab, &[Vlan(7), Pppoe(SID)], 1492)),
        // 41005 / 41006: WAN without a link-layer header (pppoe-wan, wg0)
        (
            (t("192.168.1.2", 41005, "8.0.0.7", 5201, 6), t("8.0.0.7", 5201, "8.0.0.1", 61005, 6)),
            lan(&lab, &[]),
            l3(wan(&lab, &[], 1420)),
        ),
        (routed6(41006, "2001:db8:86dd::7"), lan(&lab, &[]), l3(wan(&lab, &[], 1420))),
        // 41007: VLAN 10 LAN, L3 WAN
        (
            (t("192.168.1.2", 41007, "8.0.0.7", 5201, 6), t("8.0.0.7", 5201, "8.0.0.1", 61007, 6)),
            lan(&lab, &[Vlan(10)]),
            l3(wan(&lab, &[], 1420)),
        ),
        // 41008: L3 LAN (a WireGuard peer) to a PPPoE WAN
        (
            (t("8.0.0.9", 41008, "203.0.113.2", 5201, 6), t("203.0.113.2", 5201, "203.0.113.1", 61008, 6)),
            l3(lan(&lab, &[])),
            wan(&lab, &[Pppoe(SID)], 1492),
        ),
        // 41009: the LAN port is a bridge port: frames for the router carry
        // the bridge's MAC
        (masq(41009, 6), Side { router_mac: BRIDGE, ..lan(&lab, &[]) }, wan(&lab, &[], 1500)),
    ];
    let mut conns = Vec::new();
    for ((o, r), a, b) in specs {
        let dirs = [direction(&o, &r, a, b), direction(&r, &o, b, a)];
        for d in &dirs {
            lab.dp.put_flow(&d.key, &d.val).unwrap();
        }
        conns.push(dirs);
    }
    Lab { lab, conns }
}

#[derive(Clone, Debug)]
enum Want {
    /// Forwarded with exactly this frame.
    Fwd(Vec<u8>),
    /// Handed to the kernel untouched, counted under this reason.
    Slow(&'static str),
    /// This entry point never sees such a packet (XDP on an L3 device).
    NotHere,
}

struct Case {
    name: String,
    /// "lan" or "wan"
    on: &'static str,
    /// The input starts at the IP header (a device without link layer).
    l3: bool,
    input: Vec<u8>,
    gso: Option<(u32, u32)>,
    xdp: Want,
    tc: Want,
}

/// What TC's output bytes show of `out`: the outermost tag goes to the
/// skb's metadata.
fn tc_view(out: &[Encap]) -> &[Encap] {
    match out.first() {
        Some(Vlan(_) | Svlan(_)) => &out[1..],
        _ => out,
    }
}

fn fwd(base: &[u8], out: &[Encap]) -> (Want, Want) {
    (Want::Fwd(encap(base, out)), Want::Fwd(encap(base, tc_view(out))))
}

fn case(name: &str, on: &'static str, input: Vec<u8>, (xdp, tc): (Want, Want)) -> Case {
    Case { name: name.into(), on, l3: false, input, gso: None, xdp, tc }
}

fn slow(reason: &'static str) -> (Want, Want) {
    (Want::Slow(reason), Want::Slow(reason))
}

/// A PPPoE frame with one byte of its session header changed.
fn pppoe_edit(f: &[u8], at: usize, v: u8) -> Vec<u8> {
    let mut f = f.to_vec();
    f[at] = v;
    f
}

fn cases() -> Vec<Case> {
    let pl = b"nft-offload encapsulation test payload";
    let up4 = |p: u16, dmac| tcp4(CLIENT, dmac, "192.168.1.2", "203.0.113.2", 64, p, 5201, "P", pl);
    let down4 = |p: u16| tcp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 64, 5201, p + 20000, "", pl);
    let up4_out = |p: u16| tcp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, p + 20000, 5201, "P", pl);
    let down4_out = |p: u16| tcp4(R_LAN, CLIENT, "203.0.113.2", "192.168.1.2", 63, 5201, p, "", pl);
    let q_up = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 41001, 5201, pl);
    let q_up_out = udp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 61001, 5201, pl);
    let q_down = udp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 64, 5201, 61001, pl);
    let q_down_out = udp4(R_LAN, CLIENT, "203.0.113.2", "192.168.1.2", 63, 5201, 41001, pl);
    let v6_up = tcp6(CLIENT, R_LAN, "fd00:1::2", "2001:db8::2", 64, 41003, 5201, pl);
    let v6_up_out = tcp6(R_WAN, SERVER, "fd00:1::2", "2001:db8::2", 63, 41003, 5201, pl);
    let v6_down = tcp6(SERVER, R_WAN, "2001:db8::2", "fd00:1::2", 64, 5201, 41003, pl);
    let v6_down_out = tcp6(R_LAN, CLIENT, "2001:db8::2", "fd00:1::2", 63, 5201, 41003, pl);
    let ppp = [Pppoe(SID)];
    let vppp = [Vlan(7), Pppoe(SID)];
    let mut v = vec![
        case("untagged in, VLAN out", "lan", up4(41000, R_LAN), fwd(&up4_out(41000), &[Vlan(7)])),
        case("VLAN in, untagged out", "wan", encap(&down4(41000), &[Vlan(7)]), fwd(&down4_out(41000), &[])),
        case(
            "VLAN in with priority bits: keyed on the VLAN id",
            "wan",
            encap(&down4(41000), &[Vlan(0xe007)]),
            fwd(&down4_out(41000), &[]),
        ),
        case(
            "QinQ in, QinQ out",
            "lan",
            encap(&q_up, &[Svlan(100), Vlan(200)]),
            fwd(&q_up_out, &[Svlan(300), Vlan(400)]),
        ),
        case(
            "QinQ in, QinQ out, reply",
            "wan",
            encap(&q_down, &[Svlan(300), Vlan(400)]),
            fwd(&q_down_out, &[Svlan(100), Vlan(200)]),
        ),
        case("ipv4 untagged in, PPPoE out", "lan", up4(41002, R_LAN), fwd(&up4_out(41002), &ppp)),
        case("ipv6 untagged in, PPPoE out", "lan", v6_up.clone(), fwd(&v6_up_out, &ppp)),
        case("ipv4 VLAN+PPPoE out", "lan", up4(41004, R_LAN), fwd(&up4_out(41004), &vppp)),
    ];
    // TC cannot take PPPoE off (bpf_skb_adjust_room refuses a PPPoE skb)
    for (name, input, out) in [
        ("ipv4 PPPoE in, untagged out", encap(&down4(41002), &ppp), down4_out(41002)),
        ("ipv6 PPPoE in, untagged out", encap(&v6_down, &ppp), v6_down_out.clone()),
        ("ipv4 VLAN+PPPoE in, untagged out", encap(&down4(41004), &vppp), down4_out(41004)),
    ] {
        v.push(case(name, "wan", input, (Want::Fwd(out), Want::Slow("pppoe_tc_pop"))));
    }

    // MTU: the flow's is the L3 MTU, PPPoE's 8 bytes already taken off
    let big = |n: usize| tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 41002, 5201, "", &vec![5u8; n - 40]);
    let big_out = tcp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 61002, 5201, "", &[5u8; 1452]);
    v.push(case("PPPoE out: 1492-byte IP packet fits", "lan", big(1492), fwd(&big_out, &ppp)));
    v.push(case("PPPoE out: 1493-byte IP packet is too big", "lan", big(1493), slow("mtu")));
    v.push(Case {
        gso: Some((2, 700)),
        ..case(
            "PPPoE out of a GSO skb: its segments would share one length",
            "lan",
            big(1492),
            (Want::NotHere, Want::Slow("pppoe_tc_offload")),
        )
    });

    // the key's encapsulation must match exactly
    v.push(case("tagged frame of an untagged flow", "lan", encap(&up4(41000, R_LAN), &[Vlan(7)]), slow("no_flow")));
    v.push(case("untagged frame of a tagged flow", "wan", down4(41000), slow("no_flow")));
    v.push(case("wrong VLAN id", "wan", encap(&down4(41000), &[Vlan(8)]), slow("no_flow")));
    v.push(case("802.1ad tag where the flow has 802.1Q", "wan", encap(&down4(41000), &[Svlan(7)]), slow("no_flow")));
    // TC counts any PPPoE frame as one it cannot pop, before the lookup.
    let pppoe_miss = (Want::Slow("no_flow"), Want::Slow("pppoe_tc_pop"));
    v.push(case("PPPoE frame of an untagged flow", "lan", encap(&up4(41000, R_LAN), &ppp), pppoe_miss.clone()));
    v.push(case("inner tag only of a QinQ flow", "lan", encap(&q_up, &[Vlan(200)]), slow("no_flow")));
    let wrong_sid = encap(&down4(41002), &[Pppoe(SID + 1)]);
    v.push(case("wrong PPPoE session id", "wan", wrong_sid, pppoe_miss));
    // The session's id with another host's MAC: pppoe_rcv drops it
    // (get_item finds no session for that peer), so the kernel must see it.
    let from_other = |f: Vec<u8>| {
        let mut f = f;
        f[6..12].copy_from_slice(&OTHER);
        f
    };
    let spoof = (Want::Slow("pppoe_peer"), Want::Slow("pppoe_tc_pop"));
    v.push(case(
        "PPPoE session frame from another MAC than the concentrator's",
        "wan",
        from_other(encap(&down4(41002), &ppp)),
        spoof.clone(),
    ));
    v.push(case(
        "VLAN+PPPoE session frame from another MAC than the concentrator's",
        "wan",
        from_other(encap(&down4(41004), &vppp)),
        spoof,
    ));

    // malformed and unhandled encapsulation
    let p = encap(&down4(41002), &ppp);
    let mut long = p.clone();
    long[18..20].copy_from_slice(&((p.len() - 20 + 10) as u16).to_be_bytes());
    let mut short = p.clone();
    short[18..20].copy_from_slice(&((p.len() - 20 - 4) as u16).to_be_bytes());
    v.extend([
        case("VLAN tag cut short", "lan", encap(&q_up, &[Svlan(100), Vlan(200)])[..16].to_vec(), slow("malformed")),
        case("PPPoE length beyond the frame", "wan", long, slow("malformed")),
        case("PPPoE length shorter than the IP packet", "wan", short, slow("malformed")),
        case("PPPoE discovery ethertype", "wan", pppoe_edit(&p, 13, 0x63), slow("not_ip")),
        case("PPPoE session frame with a discovery code (PADT)", "wan", pppoe_edit(&p, 15, 0xa7), slow("malformed")),
        case("PPPoE version 2", "wan", pppoe_edit(&p, 14, 0x21), slow("malformed")),
        {
            let mut lcp = p.clone();
            lcp[20..22].copy_from_slice(&0xc021u16.to_be_bytes());
            case("PPP LCP", "wan", lcp, slow("not_ip"))
        },
        case("three tags", "lan", encap(&q_up, &[Svlan(100), Vlan(200), Vlan(300)]), slow("encap")),
        case("two tags and PPPoE", "wan", encap(&down4(41004), &[Svlan(1), Vlan(7), Pppoe(SID)]), slow("encap")),
    ]);

    // Ethernet padding (a short frame padded to the minimum by the sender's
    // NIC): ip_rcv_core trims it before the kernel forwards, so it must not
    // end up after a pushed tag or PPPoE header, or inside a packet sent
    // into an L3 device
    let pad = |mut f: Vec<u8>, to: usize| {
        let n = to.saturating_sub(f.len());
        f.extend((0..n).map(|i| 0x5a ^ i as u8));
        f
    };
    let ack4 = |p: u16| tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, p, 5201, "", b"");
    let ack4_out = |p: u16| tcp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, p + 20000, 5201, "", b"");
    v.push(case("padded frame, VLAN out", "lan", pad(ack4(41000), 60), fwd(&ack4_out(41000), &[Vlan(7)])));
    v.push(case("padded frame, PPPoE out", "lan", pad(ack4(41002), 60), fwd(&ack4_out(41002), &ppp)));
    v.push(case(
        "padded VLAN frame, untagged out",
        "wan",
        pad(encap(&tcp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 64, 5201, 61000, "", b""), &[Vlan(7)]), 64),
        fwd(&tcp4(R_LAN, CLIENT, "203.0.113.2", "192.168.1.2", 63, 5201, 41000, "", b""), &[]),
    ));
    v.push(case(
        "padded frame, L3 out",
        "lan",
        pad(tcp4(CLIENT, R_LAN, "192.168.1.2", "8.0.0.7", 64, 41005, 5201, "", b""), 60),
        (Want::Slow("xdp_target"), Want::Fwd(tcp4(CLIENT, R_LAN, "8.0.0.1", "8.0.0.7", 63, 61005, 5201, "", b""))),
    ));

    // the router's MAC
    v.push(case("frame for another host (being bridged)", "lan", up4(41000, OTHER), slow("l2_not_host")));
    v.push(case(
        "bridge port: frame for the bridge's MAC",
        "lan",
        up4(41009, BRIDGE),
        fwd(&tcp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 61009, 5201, "P", pl), &[]),
    ));
    v.push(case("bridge port: frame for the port's own MAC", "lan", up4(41009, R_LAN), slow("l2_not_host")));

    // devices without a link-layer header
    let l3_in4 = tcp4(SERVER, R_WAN, "8.0.0.7", "8.0.0.1", 64, 5201, 61005, "", pl)[14..].to_vec();
    let l3_in6 = tcp6(SERVER, R_WAN, "2001:db8:86dd::7", "fd00:1::2", 64, 5201, 41006, pl)[14..].to_vec();
    let l3_case = |name: &str, on: &'static str, input: Vec<u8>, tc: Want| Case {
        l3: true,
        ..case(name, on, input, (Want::NotHere, tc))
    };
    v.extend([
        l3_case(
            "ipv4 L3 in, Ethernet out",
            "wan",
            l3_in4,
            Want::Fwd(tcp4(R_LAN, CLIENT, "8.0.0.7", "192.168.1.2", 63, 5201, 41005, "", pl)),
        ),
        l3_case(
            "ipv6 L3 in, Ethernet out",
            "wan",
            l3_in6,
            Want::Fwd(tcp6(R_LAN, CLIENT, "2001:db8:86dd::7", "fd00:1::2", 63, 5201, 41006, pl)),
        ),
        l3_case(
            "L3 in, VLAN out",
            "wan",
            tcp4(SERVER, R_WAN, "8.0.0.7", "8.0.0.1", 64, 5201, 61007, "", pl)[14..].to_vec(),
            Want::Fwd(encap(
                &tcp4(R_LAN, CLIENT, "8.0.0.7", "192.168.1.2", 63, 5201, 41007, "", pl),
                tc_view(&[Vlan(10)]),
            )),
        ),
        l3_case(
            "L3 in, PPPoE out",
            "lan",
            tcp4(CLIENT, R_LAN, "8.0.0.9", "203.0.113.2", 64, 41008, 5201, "", pl)[14..].to_vec(),
            Want::Fwd(encap(&tcp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 61008, 5201, "", pl), &ppp)),
        ),
    ]);
    // towards an L3 device TC writes no MAC: the redirect pulls everything
    // before the IP header (__bpf_redirect_no_mac); XDP cannot go there
    let to_l3 = |p: u16, s: &str, d: &str| tcp4(CLIENT, R_LAN, s, d, 64, p, 5201, "P", pl);
    v.push(case(
        "ipv4 Ethernet in, L3 out",
        "lan",
        to_l3(41005, "192.168.1.2", "8.0.0.7"),
        (Want::Slow("xdp_target"), Want::Fwd(tcp4(CLIENT, R_LAN, "8.0.0.1", "8.0.0.7", 63, 61005, 5201, "P", pl))),
    ));
    v.push(case(
        "ipv6 Ethernet in, L3 out",
        "lan",
        tcp6(CLIENT, R_LAN, "fd00:1::2", "2001:db8:86dd::7", 64, 41006, 5201, pl),
        (
            Want::Slow("xdp_target"),
            Want::Fwd(tcp6(CLIENT, R_LAN, "fd00:1::2", "2001:db8:86dd::7", 63, 41006, 5201, pl)),
        ),
    ));
    v.push(case(
        "VLAN in, L3 out: the tag comes off",
        "lan",
        encap(&to_l3(41007, "192.168.1.2", "8.0.0.7"), &[Vlan(10)]),
        (Want::Slow("xdp_target"), Want::Fwd(tcp4(CLIENT, R_LAN, "8.0.0.1", "8.0.0.7", 63, 61007, 5201, "P", pl))),
    ));
    v.push(case(
        "PPPoE in, L3 out",
        "wan",
        encap(&tcp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 64, 5201, 61008, "", pl), &ppp),
        (Want::Slow("xdp_target"), Want::Slow("pppoe_tc_pop")),
    ));
    v
}

fn stat(dp: &Dataplane, name: &str) -> u64 {
    let i = STAT_NAMES.iter().position(|n| *n == name).unwrap_or_else(|| panic!("no counter {name}"));
    dp.stats()[i]
}

/// IP bytes of a forwarded frame, as fwd_bytes counts them.
fn l3_len(frame: &[u8]) -> u64 {
    let mut off = 12;
    loop {
        match u16::from_be_bytes([frame[off], frame[off + 1]]) {
            ETH_P_8021Q | ETH_P_8021AD => off += 4,
            ETH_P_PPP_SES => return u64::from(u16::from_be_bytes([frame[off + 6], frame[off + 7]])) - 2,
            _ => return (frame.len() - off - 2) as u64,
        }
    }
}

/// Whether a frame leaves with a PPPoE header (after any VLAN tags).
fn leaves_pppoe(frame: &[u8]) -> bool {
    let mut at = 12;
    while let Some(t) = frame.get(at..at + 2) {
        match u16::from_be_bytes([t[0], t[1]]) {
            0x8100 | 0x88a8 => at += 4,
            t => return t == 0x8864,
        }
    }
    false
}

fn run_table(xdp: bool) {
    run_table_for(xdp, &Probe::kernel())
}

/// The table with the fast path built for `probe`. Without
/// bpf_cast_to_kern_ctx TC takes every skb as CHECKSUM_PARTIAL, so what
/// would leave with a PPPoE header takes the slow path instead.
fn run_table_for(xdp: bool, probe: &Probe) {
    let lab = setup_for(probe);
    let (dp, lan, wan) = (&lab.lab.dp, lab.lab.lan, lab.lab.wan);
    let mut failures = Vec::new();
    let all = cases();
    let (mut ran, mut pppoe_to_slow) = (0, 0);
    for c in &all {
        let ifindex = if c.on == "lan" { lan } else { wan };
        let want = if xdp { &c.xdp } else { &c.tc };
        if matches!(want, Want::NotHere) {
            continue;
        }
        let partial = Want::Slow("pppoe_tc_offload");
        let want = match want {
            Want::Fwd(frame) if !xdp && !probe.kern_ctx && leaves_pppoe(frame) => {
                pppoe_to_slow += 1;
                &partial
            }
            w => w,
        };
        ran += 1;
        let before = dp.stats();
        let (fwd, out) = if xdp {
            let (ret, out, _) = dp.test_xdp(&c.input, ifindex, 1).unwrap();
            assert!(ret == XDP_PASS || ret == XDP_REDIRECT, "{}: unexpected XDP verdict {ret}", c.name);
            (ret == XDP_REDIRECT, out)
        } else {
            let r =
                if c.l3 { dp.test_tc_l3(&c.input, ifindex, c.gso, 1) } else { dp.test_tc(&c.input, ifindex, c.gso, 1) };
            let (ret, out, _) = r.unwrap_or_else(|e| panic!("{}: {e:#}", c.name));
            assert!(ret == TC_NEXT || ret == TC_REDIRECT, "{}: unexpected TC verdict {ret}", c.name);
            (ret == TC_REDIRECT, out)
        };
        let delta = stat_delta(&before, &dp.stats());
        let outcome = match want {
            Want::Fwd(frame) => Outcome::Fwd { frame, l3_bytes: l3_len(frame) },
            Want::Slow(reason) => Outcome::Slow(reason),
            Want::NotHere => unreachable!(),
        };
        failures.extend(check(&c.name, outcome, fwd, &c.input, &out, &delta));
    }
    let which = if xdp { "XDP" } else { "TC" };
    assert!(xdp || probe.kern_ctx || pppoe_to_slow >= 4, "only {pppoe_to_slow} PPPoE pushes in the table");
    assert!(failures.is_empty(), "{which}: {} of {ran} cases failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn xdp_encap_table() {
    run_table(true);
}

#[test]
fn tc_encap_table() {
    run_table(false);
}

/// A kernel without bpf_cast_to_kern_ctx (6.1): TC pushes no PPPoE header
/// (it cannot tell a CHECKSUM_PARTIAL skb, see fo_csum_partial), and
/// finds decrypted packets with the helper; everything else is the same,
/// byte for byte.
#[test]
fn tc_encap_table_without_kern_ctx() {
    let probe = Probe { kern_ctx: false, ..Probe::kernel() };
    run_table_for(false, &probe);
}

/// PCP per priority 0, 2, 4, 6 as `fo_flow.out_pcp` holds it: 3 bits each.
fn pcp_table(pcp: [u16; 4]) -> u16 {
    pcp.iter().enumerate().map(|(k, p)| p << (3 * k)).sum()
}

/// `frame` (untagged IPv4) with this TOS byte.
fn with_tos(mut f: Vec<u8>, tos: u8) -> Vec<u8> {
    f[15] = tos;
    nft_offload_lab::frames::fix_ip4_csum(&mut f);
    f
}

/// The kernel without offload: ip_forward sets skb->priority from the TOS
/// (rt_tos2priority; net.ipv4.ip_forward_update_priority, on by default;
/// ip6_forward leaves it alone), and each VLAN device maps it through its
/// egress QoS map into its tag's PCP (vlan_dev_hard_start_xmit,
/// vlan_dev_get_egress_qos_mask). The fast path sets skb->priority in TC,
/// and writes each pushed tag's PCP from the map the control plane gives
/// the flow for the priorities a forwarded packet can get (0, 2, 4, 6).
/// TOS 0x10 (low delay) is priority 6, 0x08 (throughput) 2, 0x18 4, 0 0;
/// only the bits 0x18 count (IPTOS_TOS takes 0x1e, and ip_tos2prio gives
/// 0x04, reliability, and 0x02, ECN's, nothing of their own): DSCP EF
/// (0xb8) is 4, AF41 (0x88) 2, CS6 (0xc0) 0, 0x1f 4, 0x07 0.
#[test]
fn pushed_tags_carry_the_pcp_of_the_packets_priority() {
    let mut lab = setup();
    // The default of a new namespace, said here so the table does not
    // depend on it.
    lab.lab.dp.set_fwd_update_priority(true);
    let (dp, l) = (&lab.lab.dp, &lab.lab);
    // 41001 leaves QinQ 802.1ad 300 + 802.1Q 400: the outer device maps
    // priority 0 to PCP 1, 2 to 3, 4 to 5, 6 to 7; the inner one 2 to 2,
    // 6 to 6 (the rest 0).
    let (outer, inner) = (pcp_table([1, 3, 5, 7]), pcp_table([0, 2, 0, 6]));
    let key = lab.conns[1][0].key;
    let mut v = dp.get_flow(&key).unwrap();
    v.out_pcp = [outer, inner];
    dp.replace_flow(&key, &v).unwrap();
    let pl = b"802.1p";
    let up = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 41001, 5201, pl);
    let out = udp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 61001, 5201, pl);
    let mut failures = Vec::new();
    for (tos, prio, pcp_o, pcp_i) in [
        (0x00u8, 0u32, 1u16, 0u16),
        (0x08, 2, 3, 2),
        (0x18, 4, 5, 0),
        (0x10, 6, 7, 6),
        (0xb8, 4, 5, 0),
        (0x88, 2, 3, 2),
        (0xc0, 0, 1, 0),
        (0x1f, 4, 5, 0),
        (0x07, 0, 1, 0),
    ] {
        let input = encap(&with_tos(up.clone(), tos), &[Svlan(100), Vlan(200)]);
        let tags = [Svlan(300 | (pcp_o << 13)), Vlan(400 | (pcp_i << 13))];
        let want = encap(&with_tos(out.clone(), tos), &tags);
        let (ret, got, _) = dp.test_xdp(&input, l.lan, 1).unwrap();
        if (ret, &got) != (XDP_REDIRECT, &want) {
            failures.push(format!("XDP tos {tos:#04x}: verdict {ret}, frame\n got    {got:02x?}\n expect {want:02x?}"));
        }
        // TC: the outer tag goes to the skb's metadata; the inner one is
        // in the frame, and skb->priority is the kernel's.
        let o = dp.test_tc_skb(&input, l.lan, false, &SkbIn::default()).unwrap();
        let want = encap(&with_tos(out.clone(), tos), &tags[1..]);
        if (o.ret, &o.frame, o.priority) != (TC_REDIRECT, &want, prio) {
            failures.push(format!(
                "TC tos {tos:#04x}: verdict {}, priority {} (want {prio}), frame\n got    {:02x?}\n expect {want:02x?}",
                o.ret, o.priority, o.frame
            ));
        }
    }
    // IPv6: ip6_forward leaves skb->priority as it came.
    let v6 = tcp6(CLIENT, R_LAN, "fd00:1::2", "2001:db8::2", 64, 41003, 5201, pl);
    let o = dp.test_tc_skb(&v6, l.lan, false, &SkbIn { priority: 5, ..Default::default() }).unwrap();
    if (o.ret, o.priority) != (TC_REDIRECT, 5) {
        failures.push(format!("TC IPv6: verdict {}, priority {} (want 5, untouched)", o.ret, o.priority));
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));

    // net.ipv4.ip_forward_update_priority=0: ip_forward leaves the priority
    // as it came (0: a port's driver, veth's __dev_forward_skb and a VLAN
    // device without an ingress map all give 0), and the tags carry the
    // PCP of that.
    lab.lab.dp.set_fwd_update_priority(false);
    let (dp, l) = (&lab.lab.dp, &lab.lab);
    let input = encap(&with_tos(up.clone(), 0x10), &[Svlan(100), Vlan(200)]);
    let tags = [Svlan(300 | (1 << 13)), Vlan(400)];
    let want = encap(&with_tos(out.clone(), 0x10), &tags);
    let (ret, got, _) = dp.test_xdp(&input, l.lan, 1).unwrap();
    assert_eq!((ret, got), (XDP_REDIRECT, want), "XDP, priority not from the TOS");
    // TC has the skb: the priority it came with stays, and its PCP is the
    // one the maps give it (vlan_dev_get_egress_qos_mask looks it up as is).
    let mut tc_failures = Vec::new();
    for (prio, pcp_o, pcp_i) in [(0u32, 1u16, 0u16), (2, 3, 2), (6, 7, 6)] {
        let o = dp.test_tc_skb(&input, l.lan, false, &SkbIn { priority: prio, ..Default::default() }).unwrap();
        let want = encap(&with_tos(out.clone(), 0x10), &[Vlan(400 | (pcp_i << 13))]);
        if (o.ret, &o.frame, o.priority) != (TC_REDIRECT, &want, prio) {
            tc_failures.push(format!(
                "update off, priority {prio} (outer PCP {pcp_o}, in metadata): verdict {}, priority {}, frame\n got    \
                 {:02x?}\n expect {want:02x?}",
                o.ret, o.priority, o.frame
            ));
        }
    }
    // A priority the maps are not read for (something before the fast path
    // gave it: a tc action on a legacy hook) leaves a tagged direction to
    // the kernel; one that pushes no tag forwards, the priority untouched.
    let o = dp.test_tc_skb(&input, l.lan, false, &SkbIn { priority: 3, ..Default::default() }).unwrap();
    if o.ret != TC_NEXT {
        tc_failures.push(format!("update off, priority 3, tags to push: verdict {} (want the slow path)", o.ret));
    }
    let pppoe = with_tos(tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 41002, 5201, "P", pl), 0x10);
    let o = dp.test_tc_skb(&pppoe, l.lan, false, &SkbIn { priority: 3, ..Default::default() }).unwrap();
    if (o.ret, o.priority) != (TC_REDIRECT, 3) {
        tc_failures.push(format!("update off, priority 3, PPPoE: verdict {}, priority {}", o.ret, o.priority));
    }
    assert!(tc_failures.is_empty(), "{} failures:\n{}", tc_failures.len(), tc_failures.join("\n"));
}

/// The egress watcher parses through the encapsulation, and on devices
/// without a link-layer header, and looks up the key with neither (egress
/// keys name no interface and no encapsulation: flow::egress_key).
#[test]
fn egress_watcher_sees_through_encapsulation_and_on_l3_devices() {
    let lab = setup();
    let dp = &lab.lab.dp;
    let pl = b"kernel-forwarded";
    // 41004 leaves through VLAN+PPPoE, 41005 through the L3 WAN
    let keys = [egress_key(&lab.conns[4][0]), egress_key(&lab.conns[5][0])];
    keys.iter().for_each(|k| dp.watch_dormant(k).expect("watching a dormant key"));
    dp.set_watching(keys.len());
    let leaving =
        encap(&tcp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 61004, 5201, "", pl), &[Vlan(7), Pppoe(SID)]);
    let (ret, out, _) = dp.test_tc_egress(&leaving, lab.lab.wan, 1).unwrap();
    assert_eq!((ret, &out), (TC_NEXT, &leaving), "the watcher lets the frame go unchanged");
    assert!(dp.dormant_seen(&keys[0]).unwrap() > 0, "a VLAN+PPPoE frame leaving did not stamp its connection");
    // skb->protocol from bytes 12-13: source 8.0.0.1 (the masquerade address) reads as ETH_P_IP
    let l3 = tcp4(R_WAN, SERVER, "8.0.0.1", "8.0.0.7", 63, 61005, 5201, "", pl)[14..].to_vec();
    assert_eq!(dp.test_tc_egress_l3(&l3, lab.lab.wan, 1).unwrap().0, TC_NEXT);
    assert!(dp.dormant_seen(&keys[1]).unwrap() > 0, "a packet leaving an L3 device did not stamp its connection");
    assert_eq!(stat(dp, "fwd_packets"), 0);
}

/// The one way a test run shows TC's VLAN metadata: BPF_PROG_TEST_RUN
/// repeats on the same skb. A ping-pong pair on the LAN port, the first
/// arriving with `arrive` and leaving untagged, the second arriving
/// untagged and leaving with `push`: the second repetition pushes the tag
/// into metadata (the frame's bytes stay untagged) and the third is a hit
/// only if the metadata tag is exactly the first flow's key (protocol and
/// id), which it then pops again.
fn metadata_round_trip(arrive: &'static [Encap], push: &'static [Encap]) -> (i32, Vec<u8>, [u64; 2], u64) {
    let lab = setup();
    let (dp, r) = (&lab.lab.dp, &lab.lab);
    let a = (t("192.168.1.2", 42000, "203.0.113.2", 5201, 6), t("203.0.113.2", 5201, "203.0.113.1", 42000, 6));
    let b = (t("203.0.113.1", 42000, "203.0.113.2", 5201, 6), t("203.0.113.2", 5201, "192.168.1.2", 42000, 6));
    // each output is addressed to the router again, so the next
    // repetition passes the router-MAC check
    let back = |e| Side { peer_mac: R_LAN, ..lan(r, e) };
    let dirs = [direction(&a.0, &a.1, lan(r, arrive), back(&[])), direction(&b.0, &b.1, lan(r, &[]), back(push))];
    for d in &dirs {
        dp.put_flow(&d.key, &d.val).unwrap();
    }
    let pl = b"metadata";
    let input = encap(&tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 42000, 5201, "", pl), arrive);
    let no_flow = stat(dp, "no_flow");
    let (ret, out, _) = dp.test_tc(&input, r.lan, None, 3).unwrap();
    let packets = dirs.map(|d| dp.get_flow(&d.key).unwrap().packets);
    (ret, out, packets, stat(dp, "no_flow") - no_flow)
}

#[test]
fn tc_vlan_push_lands_in_metadata_and_is_keyed_and_popped_from_there() {
    let (ret, out, packets, misses) = metadata_round_trip(&[Vlan(7)], &[Vlan(7)]);
    assert_eq!((ret, packets, misses), (TC_REDIRECT, [2, 1], 0), "arrive VLAN 7, pushed VLAN 7");
    // three hops of TTL, NATed twice: the first flow's output, untagged
    let pl = b"metadata";
    assert_eq!(out, tcp4(R_LAN, R_LAN, "203.0.113.1", "203.0.113.2", 61, 42000, 5201, "", pl));
    // a pushed tag with another id is another key: the third repetition
    // misses, and the skb it leaves still carries the tag
    let (ret, _, packets, misses) = metadata_round_trip(&[Vlan(7)], &[Vlan(8)]);
    assert_eq!((ret, packets, misses), (TC_NEXT, [1, 1], 1), "arrive VLAN 7, pushed VLAN 8");
    let (ret, _, packets, misses) = metadata_round_trip(&[Vlan(7)], &[Svlan(7)]);
    assert_eq!((ret, packets, misses), (TC_NEXT, [1, 1], 1), "arrive 802.1Q 7, pushed 802.1ad 7");
}

/// A TC egress program for the host's end of the WAN veth that puts a
/// VLAN 7 tag into the skb's metadata (bpf_skb_vlan_push on an untagged
/// skb sets the hwaccel tag), as a VLAN device over a veth with
/// tx-vlan-hw-insert on does: the tag crosses veth_xmit as metadata, the
/// frame's bytes stay untagged.
const PUSH_TAG_C: &str = r#"
#include <linux/bpf.h>
static long (*bpf_skb_vlan_push)(void *skb, __u16 proto, __u16 tci) = (void *)18;
__attribute__((section("tc"), used)) int push7(struct __sk_buff *skb)
{
	bpf_skb_vlan_push(skb, __builtin_bswap16(0x8100), 7);
	return 0;
}
char _l[] __attribute__((section("license"), used)) = "GPL";
"#;

/// Send `frame` out of `ifname` through a packet socket (it passes the
/// device's TC egress, as a host's own traffic does).
fn send_raw(ifname: &str, frame: &[u8]) {
    let ifindex = nft_offload::routes::link::ifindex(ifname).expect("the host end");
    // SAFETY: plain socket calls on a local fd; the address is a zeroed
    // sockaddr_ll with the fields set that packet_snd reads.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        let n = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        libc::close(fd);
        assert_eq!(n, frame.len() as isize, "sendto: {}", std::io::Error::last_os_error());
    }
}

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().expect(args[0]);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// XDP on a real veth reading the VLAN tag from the receive metadata
/// (fo_xdp_md, bound to rwan, bpf_xdp_metadata_rx_vlan_tag through
/// veth_xdp_rx_vlan_tag), which a test run cannot show: its frame comes
/// from no driver (no skb, no descriptor) to carry a tag, and the kfunc is
/// the driver's. The host end pushes VLAN 7 into the skb's metadata; the
/// frame's bytes are untagged. Bound, the program finds the connection
/// keyed with VLAN 7 and forwards it; the plain program takes the frame
/// for an untagged one and misses, which is why a port carrying VLANs
/// whose tags arrive so gets the bound program or is refused. Needs 6.8+
/// (the kfunc and veth's implementation); skipped before.
#[test]
fn xdp_reads_a_stripped_vlan_tag_from_the_receive_metadata() {
    use nft_offload::dataplane::Mode;
    use nft_offload::routes::link::{has_rx_vlan_kfunc, netdev};
    for bound in [true, false] {
        let lab = setup();
        let wan = lab.lab.wan;
        let md = netdev::xdp_features(wan).ok().flatten().is_some_and(|f| f.rx_vlan_tag());
        if !has_rx_vlan_kfunc() || !md {
            eprintln!("no bpf_xdp_metadata_rx_vlan_tag for veth on this kernel: skipped");
            return;
        }
        // 41000 is keyed VLAN 7 on the WAN port (setup()).
        let mut dp = lab.lab.dp;
        dp.attach_with(wan, "rwan", Mode::Xdp, libc::ARPHRD_ETHER, bound).unwrap_or_else(|e| panic!("{e:#}"));
        let dir = std::env::temp_dir().join(format!("nfo-push7-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, obj) = (dir.join("push7.c"), dir.join("push7.o"));
        std::fs::write(&src, PUSH_TAG_C).unwrap();
        let inc = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
        sh(&["clang", "-O2", "-target", "bpf", &inc, "-c", src.to_str().unwrap(), "-o", obj.to_str().unwrap()]);
        sh(&["ip", "link", "set", "pwan", "up"]);
        sh(&["ip", "link", "set", "plan", "up"]);
        sh(&["ethtool", "-K", "plan", "gro", "on"]);
        sh(&["tc", "qdisc", "add", "dev", "pwan", "clsact"]);
        sh(&["tc", "filter", "add", "dev", "pwan", "egress", "bpf", "da", "obj", obj.to_str().unwrap(), "sec", "tc"]);
        let _ = std::fs::remove_dir_all(&dir);
        let key = lab.conns[0][1].key;
        assert_eq!(key.ifindex, wan);
        let (fwd0, miss0) = (stat(&dp, "fwd_packets"), stat(&dp, "no_flow"));
        let down = tcp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 64, 5201, 61000, "", b"tag in metadata");
        for _ in 0..5 {
            send_raw("pwan", &down);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (fwd, miss) = (stat(&dp, "fwd_packets") - fwd0, stat(&dp, "no_flow") - miss0);
        let packets = dp.get_flow(&key).unwrap().packets;
        println!("bound={bound}: forwarded {fwd}, no_flow {miss}, flow packets {packets}");
        if bound {
            assert_eq!((fwd, packets), (5, 5), "the metadata tag keys the frame as VLAN 7");
        } else {
            assert_eq!((fwd, packets), (0, 0), "without the metadata the frame looks untagged");
            assert!(miss >= 5, "{miss}");
        }
        dp.detach_all();
    }
}
