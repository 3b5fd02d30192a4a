//! Fail-safe behaviour of the fast path through BPF_PROG_TEST_RUN: it steps
//! aside when the control plane's heartbeat is stale, and a flow map entry
//! is never overwritten by another connection's install.

use nft_offload::conntrack::CtTuple;
use nft_offload::dataplane::{Dataplane, PutError, STAT_NAMES};
use nft_offload::engine::now_ns;
use nft_offload::flow::{build_direction, NextHop};
use nft_offload_lab::frames::{udp4, CLIENT_MAC as CLIENT, RTR_LAN_MAC as R_LAN, RTR_WAN_MAC as R_WAN, SERVER_MAC};
use nft_offload_lab::private_router::PrivateRouter;

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_NEXT: i32 = -1;
const TC_REDIRECT: i32 = 7;
const S: u64 = 1_000_000_000;

fn t(s: &str, sp: u16, d: &str, dp: u16) -> CtTuple {
    CtTuple { src: s.parse().unwrap(), dst: d.parse().unwrap(), proto: 17, sport: sp, dport: dp }
}

fn stat(dp: &Dataplane, name: &str) -> u64 {
    let i = STAT_NAMES.iter().position(|n| *n == name).unwrap_or_else(|| panic!("no counter {name}"));
    dp.stats()[i]
}

/// The original direction of 192.168.1.2:40001 -> 203.0.113.2:5201 from
/// the LAN, masqueraded to `nat`:`port`, leaving by `nh`.
fn lan_udp(lab: &PrivateRouter, nat: &str, port: u16, nh: &NextHop) -> nft_offload::flow::Direction {
    build_direction(&t("192.168.1.2", 40001, "203.0.113.2", 5201), &t("203.0.113.2", 5201, nat, port), lab.lan, nh)
}

/// The router with one masqueraded UDP connection LAN -> WAN offloaded.
fn router() -> PrivateRouter {
    let lab = PrivateRouter::enter(64).unwrap_or_else(|e| panic!("private router: {e:#}"));
    let nh = NextHop { ifindex: lab.wan, smac: R_WAN, dmac: SERVER_MAC, mtu: 1500, xdp_ok: true };
    let d = lan_udp(&lab, "203.0.113.1", 40001, &nh);
    lab.dp.put_flow(&d.key, &d.val).unwrap();
    lab
}

/// (XDP verdict, TC verdict) for one packet of the offloaded connection.
fn send(lab: &PrivateRouter) -> (u32, i32) {
    let f = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, &[7u8; 64]);
    let x = lab.dp.test_xdp(&f, lab.lan, 1).unwrap().0;
    let c = lab.dp.test_tc(&f, lab.lan, None, 1).unwrap().0;
    (x, c)
}

/// Heartbeat age -> expected verdicts. A stale engine may have missed a
/// teardown, route or policy change: every packet goes to the kernel,
/// counted as `stale_engine`, and forwarding resumes with the next beat.
#[test]
fn stale_heartbeat_sends_everything_to_the_kernel() {
    let mut lab = router();
    #[rustfmt::skip]
    let cases: [(&str, Option<u64>, bool); 5] = [
        ("fresh", Some(0), true),
        ("two seconds old", Some(2 * S), true),
        ("five seconds old", Some(5 * S), false),
        ("never beat (0)", None, false),
        ("fresh again", Some(0), true),
    ];
    for (case, age, fwd) in cases {
        lab.dp.set_heartbeat(age.map_or(0, |a| now_ns() - a));
        let before = stat(&lab.dp, "stale_engine");
        let got = send(&lab);
        if fwd {
            assert_eq!(got, (XDP_REDIRECT, TC_REDIRECT), "{case}");
            assert_eq!(stat(&lab.dp, "stale_engine"), before, "{case}");
        } else {
            assert_eq!(got, (XDP_PASS, TC_NEXT), "{case}");
            assert_eq!(stat(&lab.dp, "stale_engine"), before + 2, "{case}: one per entry point");
        }
    }
}

/// Installing a key that is already in the map fails (BPF_NOEXIST) and
/// leaves the first connection's entry as it was; re-pointing our own entry
/// works only while it exists (BPF_EXIST).
#[test]
fn installs_never_overwrite_an_entry() {
    let lab = router();
    let key = lab.dp.flow_keys()[0];
    let first = lab.dp.get_flow(&key).unwrap();
    // Another connection whose direction arrives with the same key (same
    // tuple, same port) but would be rewritten differently.
    let nh = NextHop { ifindex: lab.lan, smac: R_LAN, dmac: CLIENT, mtu: 1400, xdp_ok: false };
    let other = lan_udp(&lab, "203.0.113.9", 40999, &nh);
    assert_eq!(other.key.ifindex, key.ifindex);
    assert_eq!(lab.dp.put_flow(&other.key, &other.val), Err(PutError::KeyTaken));
    let now = lab.dp.get_flow(&key).unwrap();
    assert_eq!((now.out_ifindex, now.new_saddr, now.mtu), (first.out_ifindex, first.new_saddr, first.mtu));
    // our own entry, re-pointed in place
    lab.dp.replace_flow(&key, &other.val).unwrap();
    assert_eq!(lab.dp.get_flow(&key).unwrap().mtu, 1400);
    lab.dp.delete_flow(&key);
    assert!(matches!(lab.dp.replace_flow(&key, &other.val), Err(PutError::Failed(_))));
}

/// XDP: a flow whose egress left the redirect map (detached, or leaving)
/// goes to the kernel unmodified, though its entry still says XDP_OK:
/// the port is looked up before the rewrite.
#[test]
fn xdp_checks_the_redirect_target_before_rewriting() {
    let mut lab = router();
    assert_eq!(send(&lab).0, XDP_REDIRECT);
    let wan = lab.wan;
    lab.dp.detach(wan);
    let f = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, &[7u8; 64]);
    let before = stat(&lab.dp, "xdp_target");
    let (ret, out, _) = lab.dp.test_xdp(&f, lab.lan, 1).unwrap();
    assert_eq!(ret, XDP_PASS);
    assert_eq!(out, f, "the frame was rewritten before the redirect failed");
    assert_eq!(stat(&lab.dp, "xdp_target"), before + 1);
    // TC does not need the map
    assert_eq!(lab.dp.test_tc(&f, lab.lan, None, 1).unwrap().0, TC_REDIRECT);
}
