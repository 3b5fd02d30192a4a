//! Keepalive in the fast path (bpf/keepalive.h) through BPF_PROG_TEST_RUN:
//! a frame of a flagged flow, forwarded by either entry point, does to the
//! connection's real conntrack entry what conntrack would have done had it
//! seen the packet (its state's timeout; SEEN_REPLY, then ASSURED, for UDP),
//! at most once per eighth of its timeout (1 to 10 s) per direction. Entries are made with `conntrack -I`
//! in the test's private namespace and read back with `conntrack -G`.

use std::process::Command;
use std::time::Duration;

use nft_offload::conntrack::CtTuple;
use nft_offload::dataplane::{Keepalive, Probe};
use nft_offload::flow::{build_direction, CtTimeouts, NextHop, FO_F_CT_REFRESH, FO_F_CT_REPLY};
use nft_offload_lab::frames::{
    tcp4, udp4, udp6, CLIENT_MAC as CLIENT, RTR_LAN_MAC as R_LAN, RTR_WAN_MAC as R_WAN, SERVER_MAC as SERVER,
};
use nft_offload_lab::private_router::PrivateRouter;
use nft_offload_lab::table::stat_delta;

const XDP_REDIRECT: u32 = 4;
const TC_REDIRECT: i32 = 7;

/// Timeouts the fast path is given: unlike any default, so a refresh shows;
/// an eighth of the unreplied UDP one is a second (the refresh interval:
/// bpf/keepalive.h, fo_ct_interval_ns).
const TIMEOUTS: CtTimeouts = CtTimeouts { tcp_established: 1000, udp: 8, udp_stream: 200 };

fn t(s: &str, sp: u16, d: &str, dp: u16, proto: u8) -> CtTuple {
    CtTuple { src: s.parse().unwrap(), dst: d.parse().unwrap(), proto, sport: sp, dport: dp }
}

/// A conntrack entry as `conntrack -G` shows it.
#[derive(Debug, PartialEq)]
struct Ct {
    timeout: u32,
    replied: bool,
    assured: bool,
}

fn conntrack(args: &[&str]) -> (bool, String) {
    let out = Command::new("conntrack").args(args).output().expect("running conntrack");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn proto_name(p: u8) -> &'static str {
    if p == 6 {
        "tcp"
    } else {
        "udp"
    }
}

/// `conntrack -I`: the entry (`o` original, `r` reply tuple) with a 5 s
/// timeout, unreplied; TCP established.
fn insert(o: &CtTuple, r: &CtTuple) {
    let (sp, dp, rsp, rdp) = (o.sport.to_string(), o.dport.to_string(), r.sport.to_string(), r.dport.to_string());
    let (s, d, rs, rd) = (o.src.to_string(), o.dst.to_string(), r.src.to_string(), r.dst.to_string());
    let mut args = vec!["-I", "-p", proto_name(o.proto), "-s", &s, "-d", &d, "--sport", &sp, "--dport", &dp];
    args.extend(["-r", &rs, "-q", &rd, "--reply-port-src", &rsp, "--reply-port-dst", &rdp, "--timeout", "5"]);
    if o.proto == 6 {
        args.extend(["--state", "ESTABLISHED"]);
    }
    let (ok, out) = conntrack(&args);
    assert!(ok, "conntrack {}: {out}", args.join(" "));
}

/// `conntrack -G` of the entry with original tuple `o`.
fn get(o: &CtTuple) -> Ct {
    let (sp, dp, s, d) = (o.sport.to_string(), o.dport.to_string(), o.src.to_string(), o.dst.to_string());
    let args = ["-G", "-p", proto_name(o.proto), "-s", &s, "-d", &d, "--sport", &sp, "--dport", &dp];
    let (ok, out) = conntrack(&args);
    assert!(ok, "conntrack {}: {out}", args.join(" "));
    let line = out.lines().find(|l| l.starts_with(proto_name(o.proto))).unwrap_or_else(|| panic!("no entry: {out}"));
    let timeout = line.split_whitespace().nth(2).and_then(|f| f.parse().ok()).unwrap_or_else(|| panic!("{line}"));
    Ct { timeout, replied: !line.contains("[UNREPLIED]"), assured: line.contains("[ASSURED]") }
}

/// The private router with each connection's two directions installed,
/// flagged for fast-path keepalive unless `plain`.
fn router(probe: &Probe, conns: &[(CtTuple, CtTuple)], plain: bool) -> PrivateRouter {
    let mut lab = PrivateRouter::enter_for(64, probe).unwrap_or_else(|e| panic!("private router: {e:#}"));
    lab.dp.set_ct_timeouts(&TIMEOUTS);
    let to_wan = NextHop { ifindex: lab.wan, smac: R_WAN, dmac: SERVER, mtu: 1500, xdp_ok: true };
    let to_lan = NextHop { ifindex: lab.lan, smac: R_LAN, dmac: CLIENT, mtu: 1500, xdp_ok: true };
    for (o, r) in conns {
        let mut d = [build_direction(o, r, lab.lan, &to_wan), build_direction(r, o, lab.wan, &to_lan)];
        if !plain {
            d[0].val.flags |= FO_F_CT_REFRESH;
            d[1].val.flags |= FO_F_CT_REFRESH | FO_F_CT_REPLY;
        }
        for d in d {
            lab.dp.put_flow(&d.key, &d.val).unwrap();
        }
    }
    lab
}

/// Counter changes named as `status` names them.
fn delta(lab: &PrivateRouter, before: &[u64]) -> Vec<(&'static str, u64)> {
    stat_delta(before, &lab.dp.stats()).into_iter().filter(|(n, _)| n.starts_with("ct_")).collect()
}

/// (case, frame, entry point, ingress ifindex, the entry's original tuple,
/// the entry after, the keepalive counters that moved)
type Row<'a> = (&'a str, &'a [u8], &'a str, u32, &'a CtTuple, Ct, Vec<(&'static str, u64)>);

/// Each row: a frame through one entry point, the verdict, then the entry
/// as conntrack shows it and the keepalive counters that moved.
#[test]
fn forwarded_packets_refresh_their_conntrack_entry() {
    let udp = (t("192.168.1.2", 41001, "203.0.113.2", 5201, 17), t("203.0.113.2", 5201, "203.0.113.1", 61001, 17));
    let tcp = (t("192.168.1.2", 41002, "203.0.113.2", 5201, 6), t("203.0.113.2", 5201, "203.0.113.1", 61002, 6));
    let v6 = (t("fd00:1::2", 41003, "fd00:2::2", 5201, 17), t("fd00:2::2", 5201, "fd00:1::2", 41003, 17));
    let gone = (t("192.168.1.2", 41004, "203.0.113.2", 5201, 17), t("203.0.113.2", 5201, "203.0.113.1", 61004, 17));
    let lab = router(&Probe::kernel(), &[udp, tcp, v6, gone], false);
    assert_eq!(
        lab.dp.features().keepalive,
        Keepalive::FastPath,
        "this machine's kernel has the conntrack kfuncs (6.0+, nf_conntrack with BTF)"
    );
    for c in [&udp, &tcp, &v6] {
        insert(&c.0, &c.1);
    }
    let pl = b"keepalive";
    let udp_out = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 41001, 5201, pl);
    let udp_back = udp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 64, 5201, 61001, pl);
    let tcp_out = tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 41002, 5201, "A", pl);
    let v6_out = udp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 41003, 5201, pl);
    let gone_out = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 41004, 5201, pl);
    let unreplied = |timeout| Ct { timeout, replied: false, assured: false };

    // (case, frame, entry point, ingress, entry looked at, entry after, counters)
    #[rustfmt::skip]
    let rows: Vec<Row> = vec![
        ("udp, original direction: the unreplied timeout", &udp_out, "tc", lab.lan, &udp.0,
         unreplied(8), vec![("ct_refreshed", 1)]),
        ("the same direction again within the second: nothing", &udp_out, "xdp", lab.lan, &udp.0,
         unreplied(8), vec![]),
        // An entry conntrack -I made has no first-packet time (stream_ts 0):
        // a stream at once, as nf_conntrack_udp_packet would judge it.
        ("udp, reply direction: SEEN_REPLY, ASSURED and the stream timeout", &udp_back, "xdp", lab.wan, &udp.0,
         Ct { timeout: 200, replied: true, assured: true }, vec![("ct_refreshed", 1)]),
        ("tcp established: the established timeout", &tcp_out, "tc", lab.lan, &tcp.0,
         unreplied(1000), vec![("ct_refreshed", 1)]),
        ("ipv6 udp", &v6_out, "xdp", lab.lan, &v6.0, unreplied(8), vec![("ct_refreshed", 1)]),
    ];
    for (case, frame, entry, on, ct, want, moved) in rows {
        let before = lab.dp.stats();
        let fwd = if entry == "tc" {
            lab.dp.test_tc(frame, on, None, 1).unwrap().0 == TC_REDIRECT
        } else {
            lab.dp.test_xdp(frame, on, 1).unwrap().0 == XDP_REDIRECT
        };
        assert!(fwd, "{case}: not forwarded");
        let got = get(ct);
        // conntrack -G rounds down what is left: the full timeout, or a
        // second less.
        let near = got.timeout + 1 >= want.timeout && got.timeout <= want.timeout;
        assert!(near && (got.replied, got.assured) == (want.replied, want.assured), "{case}: {got:?}, want {want:?}");
        assert_eq!(delta(&lab, &before), moved, "{case}");
    }

    // The original direction a second later: the stream timeout now.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(lab.dp.test_tc(&udp_out, lab.lan, None, 1).unwrap().0, TC_REDIRECT);
    let got = get(&udp.0);
    assert!(got.assured && got.replied && got.timeout >= 199, "after the reply: {got:?}");
    // TCP's interval is 10 s (an eighth of 1000 s, capped): not due yet.
    let before = lab.dp.stats();
    assert_eq!(lab.dp.test_tc(&tcp_out, lab.lan, None, 1).unwrap().0, TC_REDIRECT);
    assert_eq!(delta(&lab, &before), vec![], "a TCP direction refreshed 1.1 s after the last time");

    // A flow whose entry is gone (being destroyed: the engine hears of it)
    // is still forwarded, and counted.
    let before = lab.dp.stats();
    assert_eq!(lab.dp.test_tc(&gone_out, lab.lan, None, 1).unwrap().0, TC_REDIRECT);
    assert_eq!(delta(&lab, &before), vec![("ct_gone", 1)]);
}

/// Without the flag (a connection in another zone, or the engine doing
/// keepalive over ctnetlink), and on a fast path built without the kfuncs
/// (`Keepalive::NoKfuncs`, as on a kernel that lacks them), a forwarded
/// packet leaves the entry alone.
#[test]
fn unflagged_flows_and_a_fast_path_without_kfuncs_leave_conntrack_alone() {
    let udp = (t("192.168.1.2", 41011, "203.0.113.2", 5201, 17), t("203.0.113.2", 5201, "203.0.113.1", 61011, 17));
    let frame = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 41011, 5201, b"x");
    for (what, probe, plain) in [
        ("unflagged", Probe::kernel(), true),
        ("no kfuncs", Probe { keepalive: Keepalive::NoKfuncs, ..Probe::kernel() }, false),
    ] {
        // Each in a namespace of its own (a thread each).
        let (frame, udp) = (frame.clone(), udp);
        std::thread::spawn(move || {
            let lab = router(&probe, &[udp], plain);
            insert(&udp.0, &udp.1);
            let before = lab.dp.stats();
            assert_eq!(lab.dp.test_tc(&frame, lab.lan, None, 1).unwrap().0, TC_REDIRECT, "{what}");
            assert_eq!(lab.dp.test_xdp(&frame, lab.lan, 1).unwrap().0, XDP_REDIRECT, "{what}");
            let got = get(&udp.0);
            assert!(got.timeout <= 5 && !got.replied, "{what}: {got:?}");
            assert_eq!(delta(&lab, &before), vec![], "{what}");
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    }
}
