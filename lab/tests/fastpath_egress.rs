//! The TC egress watcher (`fo_tc_egress`) through BPF_PROG_TEST_RUN: a
//! dormant connection is woken only by a packet the kernel forwarded (seen
//! leaving, with its tuple after NAT), never by one that merely arrived; the
//! watcher announces the first one on `fo_wake` and never changes a packet.

use nft_offload::conntrack::CtTuple;
use nft_offload::dataplane::{fo_flow_key, key_bytes, Dataplane, WakeEvents, KEY_LEN};
use nft_offload::flow::{build_direction, egress_key, Direction, NextHop};
use nft_offload_lab::frames::{
    tcp4, udp4, udp6, CLIENT_MAC as CLIENT, RTR_LAN_MAC as R_LAN, RTR_WAN_MAC as R_WAN, SERVER_MAC as SERVER,
};
use nft_offload_lab::private_router::PrivateRouter;

const TC_NEXT: i32 = -1;

fn t(s: &str, sp: u16, d: &str, dp: u16, proto: u8) -> CtTuple {
    CtTuple { src: s.parse().unwrap(), dst: d.parse().unwrap(), proto, sport: sp, dport: dp }
}

/// Both directions of a connection between the private router's ports.
fn conn(lab: &PrivateRouter, orig: CtTuple, reply: CtTuple) -> [Direction; 2] {
    let to_wan = NextHop { ifindex: lab.wan, smac: R_WAN, dmac: SERVER, mtu: 1500, xdp_ok: false };
    let to_lan = NextHop { ifindex: lab.lan, smac: R_LAN, dmac: CLIENT, mtu: 1500, xdp_ok: false };
    [build_direction(&orig, &reply, lab.lan, &to_wan), build_direction(&reply, &orig, lab.wan, &to_lan)]
}

/// UDP from the client's port `sport` to the server's 5201, masqueraded
/// to the router's WAN address with the same port.
fn masq_udp(lab: &PrivateRouter, sport: u16) -> [Direction; 2] {
    conn(lab, t("192.168.1.2", sport, "203.0.113.2", 5201, 17), t("203.0.113.2", 5201, "203.0.113.1", sport, 17))
}

/// Run the watcher on `frame` leaving through `ifindex`: it always lets the
/// packet go, byte for byte as it came.
fn leave(dp: &Dataplane, frame: &[u8], ifindex: u32) {
    let (ret, out, _) = dp.test_tc_egress(frame, ifindex, 1).unwrap();
    assert_eq!(ret, TC_NEXT, "the watcher must let every packet go");
    assert_eq!(out, frame, "the watcher modified a packet");
}

fn announced(wake: &mut WakeEvents) -> Vec<[u8; KEY_LEN]> {
    wake.drain().iter().map(key_bytes).collect()
}

fn watch(dp: &Dataplane, keys: &[fo_flow_key]) {
    keys.iter().for_each(|k| dp.watch_dormant(k).expect("watching a dormant key"));
    dp.set_watching(keys.len());
}

#[test]
fn forwarded_packets_wake_arriving_ones_do_not() {
    let lab = PrivateRouter::enter(64).unwrap_or_else(|e| panic!("private router: {e:#}"));
    let dp = &lab.dp;
    let mut wake = dp.wake_events().unwrap();
    // masqueraded UDP: 192.168.1.2:40001 -> 203.0.113.2:5201, leaving as
    // 203.0.113.1:40001
    let dirs = masq_udp(&lab, 40001);
    let out_keys = dirs.map(|d| egress_key(&d));
    // the arriving (pre-NAT) keys are watched too: an arriving packet must
    // not stamp even those
    let in_keys = dirs.map(|d| d.key);
    watch(dp, &[out_keys[0], out_keys[1], in_keys[0], in_keys[1]]);
    let pl = [7u8; 64];
    let arriving = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, &pl);
    let leaving = udp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 40001, 5201, &pl);
    let reply_leaving = udp4(R_LAN, CLIENT, "203.0.113.2", "192.168.1.2", 63, 5201, 40001, &pl);

    // It arrives (no flow entry: slow path) and the kernel drops it: nothing.
    let (ret, out, _) = dp.test_tc(&arriving, lab.lan, None, 1).unwrap();
    assert_eq!((ret, &out[..]), (TC_NEXT, &arriving[..]));
    for k in out_keys.iter().chain(&in_keys) {
        assert_eq!(dp.dormant_seen(k), Some(0), "an arriving packet stamped a dormant connection");
    }
    assert!(announced(&mut wake).is_empty(), "an arriving packet announced a wake-up");

    // An unwatched connection leaving: nothing.
    leave(dp, &udp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 40002, 5201, &pl), lab.wan);
    leave(dp, &tcp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 40001, 5201, "", &pl), lab.wan);
    assert!(out_keys.iter().all(|k| dp.dormant_seen(k) == Some(0)));
    assert!(announced(&mut wake).is_empty());

    // The kernel forwarded it: stamped and announced once, by egress key.
    leave(dp, &leaving, lab.wan);
    let t1 = dp.dormant_seen(&out_keys[0]).unwrap();
    assert!(t1 > 0, "a forwarded packet of a dormant connection was not stamped");
    assert_eq!(announced(&mut wake), vec![key_bytes(&out_keys[0])]);
    leave(dp, &leaving, lab.wan);
    assert!(dp.dormant_seen(&out_keys[0]).unwrap() >= t1);
    assert!(announced(&mut wake).is_empty(), "announced twice");
    // the reply direction, leaving on the LAN side
    leave(dp, &reply_leaving, lab.lan);
    assert!(dp.dormant_seen(&out_keys[1]).unwrap() > 0);
    assert_eq!(announced(&mut wake), vec![key_bytes(&out_keys[1])]);
    assert!(in_keys.iter().all(|k| dp.dormant_seen(k) == Some(0)), "pre-NAT keys never match a leaving packet");

    // Nothing watched: the watcher does not even look.
    dp.unwatch_dormant(&out_keys[0]);
    dp.watch_dormant(&out_keys[0]).expect("re-arming a dormant key");
    dp.set_watching(0);
    leave(dp, &leaving, lab.wan);
    assert_eq!(dp.dormant_seen(&out_keys[0]), Some(0));
    assert!(announced(&mut wake).is_empty());
}

#[test]
fn routed_ipv6_and_odd_frames_pass_untouched() {
    let lab = PrivateRouter::enter(64).unwrap_or_else(|e| panic!("private router: {e:#}"));
    let dp = &lab.dp;
    let mut wake = dp.wake_events().unwrap();
    let dirs = conn(&lab, t("fd00:1::2", 40003, "fd00:2::2", 5201, 17), t("fd00:2::2", 5201, "fd00:1::2", 40003, 17));
    let k = egress_key(&dirs[0]);
    watch(dp, &[k]);
    let pl = [1u8; 80];
    let leaving = udp6(R_WAN, SERVER, "fd00:1::2", "fd00:2::2", 63, 40003, 5201, &pl);
    leave(dp, &leaving, lab.wan);
    assert!(dp.dormant_seen(&k).unwrap() > 0);
    assert_eq!(announced(&mut wake), vec![key_bytes(&k)]);

    // Truncations and corruptions of a watched packet: let go unchanged,
    // whatever the parser makes of them.
    let mut x: u32 = 0x2545f491;
    for i in 0..300 {
        let mut f = leaving.clone();
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        let at = (x >> 8) as usize % f.len();
        f[at] ^= (x >> 24) as u8 | 1;
        if i % 3 == 0 {
            f.truncate(64.max(at));
        }
        leave(dp, &f, lab.wan);
    }
}

/// A watcher below a managed device (`fo_watch_below`) leaves it what came
/// down through it, which it saw before its qdisc: on a port of a managed
/// bridge everything, below a managed VLAN or ppp device the tagged and
/// PPPoE frames (plain frames routed on the device itself still count).
#[test]
fn a_watcher_below_a_managed_device_leaves_it_its_packets() {
    use nft_offload::dataplane::fo_below;
    use nft_offload_lab::frames::{encap, Encap};
    let lab = PrivateRouter::enter(64).unwrap_or_else(|e| panic!("private router: {e:#}"));
    let dp = &lab.dp;
    let mut wake = dp.wake_events().unwrap();
    let k = egress_key(&masq_udp(&lab, 40005)[0]);
    watch(dp, &[k]);
    let plain = udp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 40005, 5201, &[3u8; 64]);
    let cases: [(&str, fo_below, Vec<u8>, bool); 5] = [
        ("a port of a managed bridge: plain", fo_below::FO_BELOW_ALL, plain.clone(), false),
        ("below a managed ppp device: PPPoE", fo_below::FO_BELOW_ENCAP, encap(&plain, &[Encap::Pppoe(0x1a2b)]), false),
        ("below a managed VLAN device: tagged", fo_below::FO_BELOW_ENCAP, encap(&plain, &[Encap::Vlan(7)]), false),
        ("below a managed VLAN device: routed on the port itself", fo_below::FO_BELOW_ENCAP, plain.clone(), true),
        ("nothing managed above", fo_below::FO_BELOW_NONE, encap(&plain, &[Encap::Pppoe(0x1a2b)]), true),
    ];
    for (what, below, frame, counts) in cases {
        dp.watch_dormant(&k).unwrap();
        let set: Vec<(u32, fo_below)> =
            if below == fo_below::FO_BELOW_NONE { Vec::new() } else { vec![(lab.wan, below)] };
        dp.set_watch_below(&set);
        leave(dp, &frame, lab.wan);
        assert_eq!(dp.dormant_seen(&k).is_some_and(|t| t > 0), counts, "{what}");
        assert_eq!(announced(&mut wake).len(), usize::from(counts), "{what}");
    }
}
