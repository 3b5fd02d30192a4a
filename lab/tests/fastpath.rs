//! Fast-path tables through BPF_PROG_TEST_RUN: input frame -> expected
//! verdict and expected output frame, byte for byte, for both entry points,
//! with the slow-path reason counters asserted. Flow entries are built by
//! the control plane's own code (flow::build_direction) from conntrack
//! tuples, so NAT derivation and checksum differences are tested together.

use nft_offload::conntrack::CtTuple;
use nft_offload::dataplane::{fo_teardown, Dataplane, Probe, SkbIn, STAT_NAMES};
use nft_offload::flow::{build_direction, Hold, NextHop};
use nft_offload_lab::frames::{
    fix_ip4_csum, tcp4, tcp4_seq, tcp6, udp4, udp6, CLIENT_MAC as CLIENT, RTR_LAN_MAC as R_LAN, RTR_WAN_MAC as R_WAN,
    SERVER_MAC as SERVER,
};
use nft_offload_lab::private_router::PrivateRouter;
use nft_offload_lab::table::{check, stat_delta, Outcome};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_NEXT: i32 = -1;
const TC_REDIRECT: i32 = 7;

fn t(s: &str, sp: u16, d: &str, dp: u16, proto: u8) -> CtTuple {
    CtTuple { src: s.parse().unwrap(), dst: d.parse().unwrap(), proto, sport: sp, dport: dp }
}

/// A private netns with two veths standing for the router's LAN and WAN
/// ports, and the fast path loaded with the lab's connections.
fn setup() -> PrivateRouter {
    setup_for(&Probe::kernel())
}

/// The same, the fast path built for `probe` (an older kernel's fallbacks).
fn setup_for(probe: &Probe) -> PrivateRouter {
    let lab = PrivateRouter::enter_for(1024, probe).unwrap_or_else(|e| panic!("private router: {e:#}"));
    let (dp, lan, wan) = (&lab.dp, lab.lan, lab.wan);
    let to_wan = NextHop { ifindex: wan, smac: R_WAN, dmac: SERVER, mtu: 1500, xdp_ok: true };
    let to_lan = NextHop { ifindex: lan, smac: R_LAN, dmac: CLIENT, mtu: 1500, xdp_ok: true };
    let mut conns = vec![
        // masquerade with a port change (port clash with another client)
        (
            t("192.168.1.2", 40000, "203.0.113.2", 5201, 6),
            t("203.0.113.2", 5201, "203.0.113.1", 61000, 6),
            lan,
            to_wan,
            wan,
            to_lan,
        ),
        (
            t("192.168.1.2", 40001, "203.0.113.2", 5201, 17),
            t("203.0.113.2", 5201, "203.0.113.1", 40001, 17),
            lan,
            to_wan,
            wan,
            to_lan,
        ),
        // DNAT port forward 203.0.113.1:8080 -> 192.168.1.2:80
        (
            t("198.51.100.7", 50000, "203.0.113.1", 8080, 6),
            t("192.168.1.2", 80, "198.51.100.7", 50000, 6),
            wan,
            to_lan,
            lan,
            to_wan,
        ),
        // routed IPv6
        (
            t("fd00:1::2", 40002, "fd00:2::2", 5201, 6),
            t("fd00:2::2", 5201, "fd00:1::2", 40002, 6),
            lan,
            to_wan,
            wan,
            to_lan,
        ),
        (
            t("fd00:1::2", 40003, "fd00:2::2", 5201, 17),
            t("fd00:2::2", 5201, "fd00:1::2", 40003, 17),
            lan,
            to_wan,
            wan,
            to_lan,
        ),
    ];
    // IPv6 masquerade (NAT66) with a port change
    conns.push((
        t("fd00:1::2", 40005, "fd00:2::2", 5201, 6),
        t("fd00:2::2", 5201, "fd00:2::1", 50005, 6),
        lan,
        to_wan,
        wan,
        to_lan,
    ));
    conns.push((
        t("fd00:1::2", 40006, "fd00:2::2", 5201, 17),
        t("fd00:2::2", 5201, "fd00:2::1", 50006, 17),
        lan,
        to_wan,
        wan,
        to_lan,
    ));
    // a flow whose route MTU is small, for the MTU cases
    let small = NextHop { mtu: 1000, ..to_wan };
    conns.push((
        t("192.168.1.2", 40004, "203.0.113.2", 5201, 6),
        t("203.0.113.2", 5201, "203.0.113.1", 40004, 6),
        lan,
        small,
        wan,
        to_lan,
    ));
    for (o, r, in_o, nh_o, in_r, nh_r) in conns {
        let d = build_direction(&o, &r, in_o, &nh_o);
        dp.put_flow(&d.key, &d.val).unwrap();
        let d = build_direction(&r, &o, in_r, &nh_r);
        dp.put_flow(&d.key, &d.val).unwrap();
    }
    lab
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// Forwarded out of `lan` / `wan` with exactly this frame.
    Fwd(&'static str),
    /// Handed to the kernel untouched, counted under this reason.
    Slow(&'static str),
}

struct Case {
    name: &'static str,
    /// ingress: "lan" or "wan"
    on: &'static str,
    input: Vec<u8>,
    want: Want,
    expect: Option<Vec<u8>>,
}

fn cases() -> Vec<Case> {
    let pl = b"nft-offload fast path test payload";
    let mut v = vec![
        Case {
            name: "ipv4 tcp masquerade, original direction (SNAT + port)",
            on: "lan",
            input: tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "P", pl),
            want: Want::Fwd("wan"),
            expect: Some(tcp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 61000, 5201, "P", pl)),
        },
        Case {
            name: "ipv4 tcp masquerade, reply direction (de-NAT)",
            on: "wan",
            input: tcp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 50, 5201, 61000, "", pl),
            want: Want::Fwd("lan"),
            expect: Some(tcp4(R_LAN, CLIENT, "203.0.113.2", "192.168.1.2", 49, 5201, 40000, "", pl)),
        },
        Case {
            name: "ipv4 udp masquerade, original direction",
            on: "lan",
            input: udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, pl),
            want: Want::Fwd("wan"),
            expect: Some(udp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 40001, 5201, pl)),
        },
        Case {
            name: "ipv4 udp masquerade, reply direction",
            on: "wan",
            input: udp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 64, 5201, 40001, pl),
            want: Want::Fwd("lan"),
            expect: Some(udp4(R_LAN, CLIENT, "203.0.113.2", "192.168.1.2", 63, 5201, 40001, pl)),
        },
        Case {
            name: "ipv4 tcp DNAT port forward, original direction",
            on: "wan",
            input: tcp4(SERVER, R_WAN, "198.51.100.7", "203.0.113.1", 64, 50000, 8080, "", pl),
            want: Want::Fwd("lan"),
            expect: Some(tcp4(R_LAN, CLIENT, "198.51.100.7", "192.168.1.2", 63, 50000, 80, "", pl)),
        },
        Case {
            name: "ipv4 tcp DNAT port forward, reply direction",
            on: "lan",
            input: tcp4(CLIENT, R_LAN, "192.168.1.2", "198.51.100.7", 64, 80, 50000, "P", pl),
            want: Want::Fwd("wan"),
            expect: Some(tcp4(R_WAN, SERVER, "203.0.113.1", "198.51.100.7", 63, 8080, 50000, "P", pl)),
        },
        Case {
            name: "ipv6 routed tcp",
            on: "lan",
            input: tcp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 40002, 5201, pl),
            want: Want::Fwd("wan"),
            expect: Some(tcp6(R_WAN, SERVER, "fd00:1::2", "fd00:2::2", 63, 40002, 5201, pl)),
        },
        Case {
            name: "ipv6 routed tcp, reply",
            on: "wan",
            input: tcp6(SERVER, R_WAN, "fd00:2::2", "fd00:1::2", 2, 5201, 40002, pl),
            want: Want::Fwd("lan"),
            expect: Some(tcp6(R_LAN, CLIENT, "fd00:2::2", "fd00:1::2", 1, 5201, 40002, pl)),
        },
        Case {
            name: "ipv6 routed udp",
            on: "lan",
            input: udp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 40003, 5201, pl),
            want: Want::Fwd("wan"),
            expect: Some(udp6(R_WAN, SERVER, "fd00:1::2", "fd00:2::2", 63, 40003, 5201, pl)),
        },
        Case {
            name: "ipv6 tcp masquerade (NAT66), original direction",
            on: "lan",
            input: tcp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 40005, 5201, pl),
            want: Want::Fwd("wan"),
            expect: Some(tcp6(R_WAN, SERVER, "fd00:2::1", "fd00:2::2", 63, 50005, 5201, pl)),
        },
        Case {
            name: "ipv6 tcp masquerade (NAT66), reply direction",
            on: "wan",
            input: tcp6(SERVER, R_WAN, "fd00:2::2", "fd00:2::1", 64, 5201, 50005, pl),
            want: Want::Fwd("lan"),
            expect: Some(tcp6(R_LAN, CLIENT, "fd00:2::2", "fd00:1::2", 63, 5201, 40005, pl)),
        },
        Case {
            name: "ipv6 udp masquerade (NAT66)",
            on: "lan",
            input: udp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 40006, 5201, pl),
            want: Want::Fwd("wan"),
            expect: Some(udp6(R_WAN, SERVER, "fd00:2::1", "fd00:2::2", 63, 50006, 5201, pl)),
        },
        Case {
            name: "ipv4 ttl 1: kernel must answer with ICMP time exceeded",
            on: "lan",
            input: tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 1, 40000, 5201, "", pl),
            want: Want::Slow("ttl"),
            expect: None,
        },
        Case {
            name: "ipv6 hop limit 1",
            on: "lan",
            input: tcp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 1, 40002, 5201, pl),
            want: Want::Slow("ttl"),
            expect: None,
        },
        Case {
            name: "tcp syn",
            on: "lan",
            input: tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "S", b""),
            want: Want::Slow("tcp_syn"),
            expect: None,
        },
        Case {
            name: "unknown flow",
            on: "lan",
            input: tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 49999, 5201, "", pl),
            want: Want::Slow("no_flow"),
            expect: None,
        },
        Case {
            name: "known tuple on the wrong interface is unknown",
            on: "wan",
            input: tcp4(CLIENT, R_WAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "", pl),
            want: Want::Slow("no_flow"),
            expect: None,
        },
        Case {
            name: "ipv4 over the route MTU",
            on: "lan",
            input: tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40004, 5201, "", &[7u8; 1100]),
            want: Want::Slow("mtu"),
            expect: None,
        },
        Case {
            name: "arp is not ip",
            on: "lan",
            input: {
                // unicast to the router so it reaches the ethertype check
                let mut f = R_LAN.to_vec();
                f.extend(CLIENT);
                f.extend([0x08, 0x06]);
                f.extend([0u8; 46]);
                f
            },
            want: Want::Slow("not_ip"),
            expect: None,
        },
        Case {
            name: "broadcast frame",
            on: "lan",
            input: udp4(CLIENT, [0xff; 6], "192.168.1.2", "192.168.1.255", 64, 40001, 5201, pl),
            want: Want::Slow("l2_not_host"),
            expect: None,
        },
        Case {
            name: "truncated ipv4 header",
            on: "lan",
            input: tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "", pl)[..24].to_vec(),
            want: Want::Slow("malformed"),
            expect: None,
        },
        Case {
            name: "truncated tcp header",
            on: "lan",
            input: tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "", b"")[..40].to_vec(),
            want: Want::Slow("malformed"),
            expect: None,
        },
    ];

    // fragment: MF set
    let mut f = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, pl);
    f[20] |= 0x20;
    fix_ip4_csum(&mut f);
    v.push(Case { name: "ipv4 first fragment", on: "lan", input: f, want: Want::Slow("fragment"), expect: None });
    // non-first fragment: offset != 0
    let mut f = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, pl);
    f[21] = 0x10;
    fix_ip4_csum(&mut f);
    v.push(Case { name: "ipv4 later fragment", on: "lan", input: f, want: Want::Slow("fragment"), expect: None });

    // IPv4 with a 4-byte option (NOP x3 + EOL): ihl 6
    let base = tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "", pl);
    let mut f = base[..34].to_vec();
    f.extend([1, 1, 1, 0]);
    f.extend(&base[34..]);
    f[14] = 0x46;
    let tl = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&tl.to_be_bytes());
    fix_ip4_csum(&mut f);
    v.push(Case { name: "ipv4 options", on: "lan", input: f, want: Want::Slow("ip_options"), expect: None });

    // IPv6 hop-by-hop extension header in front of TCP
    let base = tcp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 40002, 5201, pl);
    let mut f = base[..54].to_vec();
    f.extend([6, 0, 1, 4, 0, 0, 0, 0]); // next=TCP, len 0, PadN
    f.extend(&base[54..]);
    f[20] = 0; // next header: hop-by-hop
    let pl6 = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&pl6.to_be_bytes());
    v.push(Case { name: "ipv6 extension header", on: "lan", input: f, want: Want::Slow("ipv6_ext"), expect: None });

    // 802.1Q tagged frame of an untagged flow: the tag is part of the key
    // (nf_flow_tuple_encap), so it is another, unknown flow
    let base = tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "", pl);
    let mut f = base[..12].to_vec();
    f.extend([0x81, 0x00, 0x00, 0x64]);
    f.extend(&base[12..]);
    v.push(Case {
        name: "vlan tagged frame of an untagged flow",
        on: "lan",
        input: f,
        want: Want::Slow("no_flow"),
        expect: None,
    });

    // garbage after a valid-looking ethernet header claiming IPv4
    let mut f = CLIENT.to_vec();
    f[0] = 0x02;
    let mut g = R_LAN.to_vec();
    g.extend(CLIENT);
    g.extend([0x08, 0x00]);
    g.extend((0..60u8).map(|i| i.wrapping_mul(37)));
    v.push(Case { name: "garbage ipv4", on: "lan", input: g, want: Want::Slow("malformed"), expect: None });

    // UDP with a zero checksum (no checksum) keeps it zero after NAT
    let mut f = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, pl);
    f[40] = 0;
    f[41] = 0;
    let mut e = udp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 40001, 5201, pl);
    e[40] = 0;
    e[41] = 0;
    v.push(Case {
        name: "ipv4 udp zero checksum stays zero",
        on: "lan",
        input: f,
        want: Want::Fwd("wan"),
        expect: Some(e),
    });

    // Ethernet padding: a frame under the 60-byte minimum arrives padded
    // by the sender's NIC (bytes that need not be zero); ip_rcv_core trims
    // the skb to the IP length (pskb_trim_rcsum), so what leaves carries
    // only what the egress device adds itself.
    let pad = |mut f: Vec<u8>| {
        let n = 60usize.saturating_sub(f.len()).max(2);
        f.extend((0..n).map(|i| 0xa5 ^ i as u8));
        f
    };
    v.push(Case {
        name: "ipv4 udp padded to the Ethernet minimum: the padding is not forwarded",
        on: "lan",
        input: pad(udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, b"x")),
        want: Want::Fwd("wan"),
        expect: Some(udp4(R_WAN, SERVER, "203.0.113.1", "203.0.113.2", 63, 40001, 5201, b"x")),
    });
    v.push(Case {
        name: "ipv4 tcp ack padded to the Ethernet minimum, reply direction",
        on: "wan",
        input: pad(tcp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 50, 5201, 61000, "", b"")),
        want: Want::Fwd("lan"),
        expect: Some(tcp4(R_LAN, CLIENT, "203.0.113.2", "192.168.1.2", 49, 5201, 40000, "", b"")),
    });
    v.push(Case {
        name: "ipv6 udp with trailing bytes after its payload length (ipv6_rcv trims them)",
        on: "lan",
        input: pad(udp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 40003, 5201, b"x")),
        want: Want::Fwd("wan"),
        expect: Some(udp6(R_WAN, SERVER, "fd00:1::2", "fd00:2::2", 63, 40003, 5201, b"x")),
    });
    v
}

fn stat(dp: &Dataplane, name: &str) -> u64 {
    let i = STAT_NAMES.iter().position(|n| *n == name).unwrap_or_else(|| panic!("no counter {name}"));
    dp.stats()[i]
}

/// `csum_ipv6`: use BPF_F_IPV6 (if the kernel has it) or force the fallback.
fn run_table(xdp: bool, csum_ipv6: bool) {
    let mut lab = setup();
    lab.dp.set_csum_ipv6(csum_ipv6 && lab.dp.probe_csum_ipv6());
    let ifx = |n: &str| if n == "lan" { lab.lan } else { lab.wan };
    let mut failures = Vec::new();
    for c in cases() {
        let before = lab.dp.stats();
        let (fwd, out) = if xdp {
            let (ret, out, _) = lab.dp.test_xdp(&c.input, ifx(c.on), 1).unwrap();
            assert!(ret == XDP_PASS || ret == XDP_REDIRECT, "{}: unexpected XDP verdict {ret}", c.name);
            (ret == XDP_REDIRECT, out)
        } else {
            let (ret, out, _) = match lab.dp.test_tc(&c.input, ifx(c.on), None, 1) {
                Ok(r) => r,
                // BPF_PROG_TEST_RUN refuses to build an skb from a frame
                // this short (EINVAL); such frames are covered by XDP.
                Err(_) if c.input.len() < 64 => continue,
                Err(e) => panic!("{}: {e}", c.name),
            };
            assert!(ret == TC_NEXT || ret == TC_REDIRECT, "{}: unexpected TC verdict {ret}", c.name);
            (ret == TC_REDIRECT, out)
        };
        let delta = stat_delta(&before, &lab.dp.stats());
        let outcome = match c.want {
            Want::Fwd(_) => {
                let frame = c.expect.as_deref().expect("a forwarded case has its frame");
                Outcome::Fwd { frame, l3_bytes: (frame.len() - 14) as u64 }
            }
            Want::Slow(reason) => Outcome::Slow(reason),
        };
        failures.extend(check(c.name, outcome, fwd, &c.input, &out, &delta));
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases().len(), failures.join("\n"));
}

#[test]
fn xdp_table() {
    run_table(true, true);
}

#[test]
fn tc_table() {
    run_table(false, true);
}

/// The same table (NAT66 cases included, byte for byte) with the fallback
/// for kernels whose bpf_l4_csum_replace lacks BPF_F_IPV6 (before 6.16).
#[test]
fn tc_table_without_bpf_f_ipv6() {
    run_table(false, false);
}

/// Every forwarded row of the table on a CHECKSUM_COMPLETE skb: skb->csum
/// must still be the sum of the packet afterwards (the test run fails with
/// EBADMSG otherwise: BPF_F_TEST_SKB_CHECKSUM_COMPLETE), as the kernel
/// keeps it (ip6_forward's skb_forward_csum drops a csum the hop limit
/// made stale; a stale one costs the receiver a software check, or a "hw
/// csum failure"). With BPF_F_IPV6 and with the fallback that fixes the
/// IPv6 pseudo-header change up with bpf_csum_update. Padded frames are
/// left out: trimming them makes the skb CHECKSUM_NONE (__skb_trim_rcsum,
/// through bpf_skb_change_tail), whose skb->csum means nothing, but which
/// the test run compares all the same.
#[test]
fn tc_keeps_checksum_complete_right() {
    for csum_ipv6 in [true, false] {
        let mut lab = setup();
        lab.dp.set_csum_ipv6(csum_ipv6 && lab.dp.probe_csum_ipv6());
        let ifx = |n: &str| if n == "lan" { lab.lan } else { lab.wan };
        let skb = SkbIn { csum_complete: true, ..Default::default() };
        let mut failures = Vec::new();
        let mut ran = 0;
        let unpadded = |c: &Case| c.expect.as_ref().is_some_and(|e| e.len() == c.input.len());
        for c in cases().into_iter().filter(|c| matches!(c.want, Want::Fwd(_)) && unpadded(c)) {
            ran += 1;
            match lab.dp.test_tc_skb(&c.input, ifx(c.on), false, &skb) {
                Ok(o) if o.ret == TC_REDIRECT && Some(&o.frame) == c.expect.as_ref() => {}
                Ok(o) => failures.push(format!("{}: verdict {} / frame {:02x?}", c.name, o.ret, o.frame)),
                Err(e) => failures.push(format!("{}: {e:#}", c.name)),
            }
        }
        assert!(
            failures.is_empty(),
            "BPF_F_IPV6 {csum_ipv6}: {} of {ran} forwarded cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// A packet that arrived decrypted (its skb carries a secpath) goes to the
/// kernel, counted as `secpath` (fo_secpath in bpf/fastpath.bpf.c).
/// BPF_PROG_TEST_RUN builds its skb from bytes and cannot attach a secpath
/// (bpf_prog_test_run_skb has no way to add skb extensions), and this kernel
/// has no ESP to decrypt a real packet, so what is tested here is the other
/// half: the loaded program carries the check, and clear packets of
/// offloaded flows, the only ones that reach it, still forward (XDP never
/// sees a decrypted packet and has no such check).
#[test]
fn tc_secpath_check_lets_clear_packets_through() {
    let lab = setup();
    assert!(STAT_NAMES.contains(&"secpath"), "no secpath counter in {STAT_NAMES:?}");
    let pl = b"clear";
    let frames = [
        (lab.lan, udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, pl)),
        (lab.wan, udp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 64, 5201, 40001, pl)),
        (lab.lan, tcp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 40002, 5201, pl)),
    ];
    for (ifindex, f) in &frames {
        assert_eq!(lab.dp.test_tc(f, *ifindex, None, 1).unwrap().0, TC_REDIRECT);
    }
    assert_eq!(stat(&lab.dp, "secpath"), 0);
    assert_eq!(stat(&lab.dp, "fwd_packets"), frames.len() as u64);
}

/// Kernels without bpf_cast_to_kern_ctx (6.1) find a decrypted packet with
/// bpf_skb_get_xfrm_state: clear packets still forward. With no way to tell
/// (no kfunc, helper unknown), TC forwards nothing, counted as `secpath`,
/// while XDP, which never sees a decrypted packet, forwards the same frames.
#[test]
fn tc_secpath_fallbacks_of_older_kernels() {
    let pl = b"clear";
    let frames = |lab: &PrivateRouter| {
        [
            (lab.lan, udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, pl)),
            (lab.wan, udp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 64, 5201, 40001, pl)),
            (lab.lan, tcp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 40002, 5201, pl)),
        ]
    };
    let helper = Probe { kern_ctx: false, xfrm_helper: Some(true), ..Probe::kernel() };
    let lab = setup_for(&helper);
    assert_eq!(lab.dp.features().secpath, nft_offload::dataplane::Secpath::Helper);
    for (ifindex, f) in &frames(&lab) {
        assert_eq!(lab.dp.test_tc(f, *ifindex, None, 1).unwrap().0, TC_REDIRECT);
    }
    assert_eq!((stat(&lab.dp, "secpath"), stat(&lab.dp, "fwd_packets")), (0, 3));
    drop(lab);

    let blind = Probe { kern_ctx: false, xfrm_helper: None, ..Probe::kernel() };
    let lab = setup_for(&blind);
    assert_eq!(lab.dp.features().secpath, nft_offload::dataplane::Secpath::Assumed);
    for (ifindex, f) in &frames(&lab) {
        assert_eq!(lab.dp.test_tc(f, *ifindex, None, 1).unwrap().0, TC_NEXT);
        assert_eq!(lab.dp.test_xdp(f, *ifindex, 1).unwrap().0, XDP_REDIRECT);
    }
    assert_eq!((stat(&lab.dp, "secpath"), stat(&lab.dp, "fwd_packets")), (3, 3));
}

/// The probe asks the kernel: from 6.16 on it must find BPF_F_IPV6.
#[test]
fn bpf_f_ipv6_probe_matches_the_kernel() {
    let lab = setup();
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = rel.trim().split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if (major, minor) >= (6, 16) {
        assert!(lab.dp.probe_csum_ipv6(), "kernel {rel} has BPF_F_IPV6 but the probe did not find it");
    }
}

/// FIN and RST go to the kernel and mark the flow, whose later packets then
/// also go to the kernel until the control plane removes it. (The RST is
/// the sender's next sequence number: see `only_a_rst_in_sequence_ends_the_flow`.)
#[test]
fn fin_and_rst_flag_teardown() {
    for xdp in [true, false] {
        for (flag, reason, td) in [("F", "tcp_fin", fo_teardown::FO_TD_FIN), ("R", "tcp_rst", fo_teardown::FO_TD_RST)] {
            let lab = setup();
            let run = |f: &[u8]| -> bool {
                if xdp {
                    lab.dp.test_xdp(f, lab.lan, 1).unwrap().0 == XDP_REDIRECT
                } else {
                    lab.dp.test_tc(f, lab.lan, None, 1).unwrap().0 == TC_REDIRECT
                }
            };
            let pl = b"x";
            assert!(run(&tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "", pl)));
            let r0 = stat(&lab.dp, reason);
            let close = tcp4_seq(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, flag, (1001, 5000), pl);
            assert!(!run(&close));
            assert_eq!(stat(&lab.dp, reason), r0 + 1);
            let key =
                lab.dp.flow_keys().into_iter().find(|k| k.ifindex == lab.lan && k.sport == 40000u16.to_be()).unwrap();
            assert_eq!(u32::from(lab.dp.get_flow(&key).unwrap().teardown), td.0);
            let t0 = stat(&lab.dp, "teardown");
            assert!(!run(&tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "", pl)));
            assert_eq!(stat(&lab.dp, "teardown"), t0 + 1);
        }
    }
}

/// A RST ends the flow only when its sequence number is one the receiver
/// takes as a close: what the receiver acknowledged last, or the end of
/// what the sender sent (conntrack's tcp_packet closes on
/// `seq == td_maxack` of the receiver, or a RST right after the sender's
/// last segment; RFC 5961 has the receiver act only on RCV.NXT). Any other
/// RST, a blind attacker's 32-bit guess above all, goes to the kernel
/// without ending the offload: conntrack, which sees none of the offloaded
/// packets and is liberal, cannot judge its window, and takes the
/// connection off the fast path only if it changes state itself.
#[test]
fn only_a_rst_in_sequence_ends_the_flow() {
    let pl = b"x";
    let up = |flags: &str, seq: u32, ack: u32, pl: &[u8]| {
        tcp4_seq(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, flags, (seq, ack), pl)
    };
    let down = |flags: &str, seq: u32, ack: u32, pl: &[u8]| {
        tcp4_seq(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 64, 5201, 61000, flags, (seq, ack), pl)
    };
    // The client sent 1000..1001; the server sent 5000..5002 and has
    // acknowledged only up to 1000 so far.
    let cases = [
        ("client, the server's last ACK", up("R", 1000, 5002, b""), true),
        ("client, its own next sequence number", up("R", 1001, 5002, b""), true),
        ("client, a blind guess", up("R", 0x8a5f_3c21, 0, b""), false),
        ("client, one past its next sequence number", up("R", 1002, 5002, b""), false),
        ("server, the client's last ACK", down("RA", 5000, 1001, b""), true),
        ("server, a blind guess", down("R", 0x1234_5678, 0, b""), false),
    ];
    for xdp in [true, false] {
        for (what, rst, closes) in &cases {
            let lab = setup();
            let run = |f: &[u8], on: u32| -> bool {
                if xdp {
                    lab.dp.test_xdp(f, on, 1).unwrap().0 == XDP_REDIRECT
                } else {
                    lab.dp.test_tc(f, on, None, 1).unwrap().0 == TC_REDIRECT
                }
            };
            assert!(run(&up("A", 1000, 5000, pl), lab.lan));
            assert!(run(&down("A", 5000, 1000, b"yy"), lab.wan));
            let on = if rst[..6] == R_LAN { lab.lan } else { lab.wan };
            let before = lab.dp.stats();
            assert!(!run(rst, on), "xdp={xdp} {what}: a RST is the kernel's");
            let counted = stat_delta(&before, &lab.dp.stats());
            let keys = lab.dp.flow_keys();
            let key =
                keys.iter().find(|k| k.ifindex == on && (k.sport == 40000u16.to_be() || k.dport == 61000u16.to_be()));
            let td = u32::from(lab.dp.get_flow(key.unwrap()).unwrap().teardown);
            let want = if *closes { fo_teardown::FO_TD_RST.0 } else { fo_teardown::FO_TD_NONE.0 };
            assert_eq!(td, want, "xdp={xdp} {what}: teardown flag");
            let reason = if *closes { "tcp_rst" } else { "tcp_rst_inexact" };
            assert_eq!(counted, [(reason, 1)], "xdp={xdp} {what}: counted");
            // The direction the RST came in stops (the control plane then
            // removes both), or goes on.
            let next = if on == lab.lan { up("A", 1001, 5002, pl) } else { down("A", 5002, 1001, pl) };
            assert_eq!(run(&next, on), !closes, "xdp={xdp} {what}: the flow afterwards");
        }
    }
}

/// A RST on an entry that has forwarded nothing yet (just installed, or
/// re-pointed) has nothing to be judged by: it goes to the kernel, whose
/// own state is fresh then, and the offload stays until conntrack says
/// otherwise.
#[test]
fn a_rst_before_any_packet_leaves_the_decision_to_conntrack() {
    for xdp in [true, false] {
        let lab = setup();
        let rst = tcp4_seq(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "R", (1000, 0), b"");
        let r = if xdp {
            lab.dp.test_xdp(&rst, lab.lan, 1).unwrap().0 == XDP_REDIRECT
        } else {
            lab.dp.test_tc(&rst, lab.lan, None, 1).unwrap().0 == TC_REDIRECT
        };
        assert!(!r);
        let key = lab.dp.flow_keys().into_iter().find(|k| k.ifindex == lab.lan && k.sport == 40000u16.to_be()).unwrap();
        assert_eq!(u32::from(lab.dp.get_flow(&key).unwrap().teardown), fo_teardown::FO_TD_NONE.0, "xdp={xdp}");
    }
}

/// A held direction goes to the kernel untouched under its own reason,
/// stamps last-seen (keepalive) but counts no packets (conntrack does);
/// the other direction of the same connection stays on the fast path.
#[test]
fn held_direction_goes_to_the_kernel_the_other_stays_fast() {
    for xdp in [true, false] {
        for hold in Hold::ALL {
            let lab = setup();
            let run = |f: &[u8], on: u32| -> (bool, Vec<u8>) {
                if xdp {
                    let (ret, out, _) = lab.dp.test_xdp(f, on, 1).unwrap();
                    (ret == XDP_REDIRECT, out)
                } else {
                    let (ret, out, _) = lab.dp.test_tc(f, on, None, 1).unwrap();
                    (ret == TC_REDIRECT, out)
                }
            };
            let key =
                lab.dp.flow_keys().into_iter().find(|k| k.ifindex == lab.wan && k.dport == 40001u16.to_be()).unwrap();
            let mut v = lab.dp.get_flow(&key).unwrap();
            let mut d = nft_offload::flow::Direction { key, val: v, route_ifindex: key.ifindex };
            d.set_hold(Some(hold));
            v.hold = d.val.hold;
            lab.dp.replace_flow(&key, &v).unwrap();

            let down = udp4(SERVER, R_WAN, "203.0.113.2", "203.0.113.1", 64, 5201, 40001, &[7u8; 100]);
            let r0 = stat(&lab.dp, hold.as_str());
            let (fwd, out) = run(&down, lab.wan);
            assert!(!fwd, "{hold:?} xdp={xdp}: a held direction was forwarded");
            assert_eq!(out, down, "{hold:?} xdp={xdp}: slow-path frame modified");
            assert_eq!(stat(&lab.dp, hold.as_str()), r0 + 1, "{hold:?} xdp={xdp}");
            let after = lab.dp.get_flow(&key).unwrap();
            assert_eq!(after.packets, 0, "{hold:?}: conntrack counts a held direction's packets");
            assert!(after.last_seen_ns > 0, "{hold:?}: a held direction still stamps last-seen");

            let up = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, &[7u8; 100]);
            assert!(run(&up, lab.lan).0, "{hold:?} xdp={xdp}: the other direction left the fast path");
        }
    }
}

/// `frame` (Ethernet, then IPv4 or IPv6 without options, then TCP or UDP)
/// with the L4 checksum a CHECKSUM_PARTIAL skb carries: the folded
/// pseudo-header sum, uncomplemented (tcp_v4_send_check,
/// __tcp_v6_send_check, udp4_hwcsum, udp6_hwcsum_outgoing).
fn partial(mut f: Vec<u8>) -> Vec<u8> {
    let word = |b: &[u8]| b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum::<u32>();
    let (l4, proto, len, addrs) = if f[12..14] == [0x08, 0x00] {
        (34, f[23], u16::from_be_bytes([f[16], f[17]]) - 20, 26..34)
    } else {
        (54, f[20], u16::from_be_bytes([f[18], f[19]]), 22..54)
    };
    let mut sum = word(&f[addrs]) + u32::from(proto) + u32::from(len);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let at = l4 + if proto == 6 { 16 } else { 6 };
    f[at..at + 2].copy_from_slice(&(sum as u16).to_be_bytes());
    f
}

/// XDP cannot see ip_summed: on a port that may see them, a segment whose
/// checksum field holds only the pseudo-header sum (a local sender's
/// CHECKSUM_PARTIAL on a veth) goes to the kernel untouched, counted as
/// csum_partial, where the skb still says the checksum is to be filled in;
/// the same flow's complete segments stay fast. TC keeps ip_summed and
/// forwards it (bpf_l4_csum_replace).
#[test]
fn xdp_passes_a_partial_checksum_to_the_kernel() {
    let lab = setup();
    let pl = b"partial checksum";
    let frames = [
        (lab.lan, tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "", pl)),
        (lab.lan, udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, pl)),
        (lab.lan, tcp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 40002, 5201, pl)),
        (lab.lan, udp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 40006, 5201, pl)),
    ];
    // Only where the control plane says partial checksums may arrive (a
    // veth whose peer has TX checksum offload on): elsewhere the same
    // bytes are a complete checksum that happens to match, and forwarded.
    let f = partial(frames[0].1.clone());
    assert_eq!(lab.dp.test_xdp(&f, lab.lan, 1).unwrap().0, XDP_REDIRECT, "no partial checksums on this port");
    lab.dp.set_csum_port(lab.lan, true).unwrap();
    for (i, (on, full)) in frames.iter().enumerate() {
        let f = partial(full.clone());
        assert_ne!(&f, full, "case {i}: a complete checksum is not the pseudo-header sum");
        let c0 = stat(&lab.dp, "csum_partial");
        let (ret, out, _) = lab.dp.test_xdp(&f, *on, 1).unwrap();
        assert_eq!((ret, &out), (XDP_PASS, &f), "case {i}: passed untouched");
        assert_eq!(stat(&lab.dp, "csum_partial"), c0 + 1, "case {i}");
        assert_eq!(lab.dp.test_xdp(full, *on, 1).unwrap().0, XDP_REDIRECT, "case {i}: complete stays fast");
        assert_eq!(lab.dp.test_tc(&f, *on, None, 1).unwrap().0, TC_REDIRECT, "case {i}: TC forwards it");
    }
}

/// Per-flow packets, bytes and last-seen are maintained by the fast path.
#[test]
fn per_flow_counters_and_last_seen() {
    let lab = setup();
    let f = udp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40001, 5201, &[1u8; 100]);
    for _ in 0..3 {
        assert_eq!(lab.dp.test_tc(&f, lab.lan, None, 1).unwrap().0, TC_REDIRECT);
    }
    let key = lab.dp.flow_keys().into_iter().find(|k| k.ifindex == lab.lan && k.sport == 40001u16.to_be()).unwrap();
    let v = lab.dp.get_flow(&key).unwrap();
    assert_eq!(v.packets, 3);
    assert_eq!(v.bytes, 3 * (f.len() as u64 - 14));
    assert!(v.last_seen_ns > 0);
}

/// GSO super-packets (TC only): fine if each segment fits the MTU
/// (nf_flow_exceeds_mtu), counted as gso_segs packets.
#[test]
fn tc_gso_mtu_is_per_segment() {
    let lab = setup();
    let f = tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40004, 5201, "", &[9u8; 1800]);
    // segments of 900 bytes payload: 20 + 20 + 900 = 940 <= 1000
    let (ret, _, _) = lab.dp.test_tc(&f, lab.lan, Some((2, 900)), 1).unwrap();
    assert_eq!(ret, TC_REDIRECT);
    let key = lab.dp.flow_keys().into_iter().find(|k| k.ifindex == lab.lan && k.sport == 40004u16.to_be()).unwrap();
    assert_eq!(lab.dp.get_flow(&key).unwrap().packets, 2);
    // segments of 1200: too big for the 1000-byte route
    let m0 = stat(&lab.dp, "mtu");
    let (ret, _, _) = lab.dp.test_tc(&f, lab.lan, Some((2, 1200)), 1).unwrap();
    assert_eq!(ret, TC_NEXT);
    assert_eq!(stat(&lab.dp, "mtu"), m0 + 1);
}

/// Random and mutated frames: never a crash, never a verdict other than
/// pass or redirect, and a passed frame is never modified.
#[test]
fn random_frames_never_break_anything() {
    let lab = setup();
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let seeds = [
        tcp4(CLIENT, R_LAN, "192.168.1.2", "203.0.113.2", 64, 40000, 5201, "", b"hello"),
        udp6(CLIENT, R_LAN, "fd00:1::2", "fd00:2::2", 64, 40003, 5201, b"hello"),
    ];
    for i in 0..3000 {
        let mut f = seeds[i % 2].clone();
        let n = (next() % 6) as usize;
        for _ in 0..n {
            let pos = (next() as usize) % f.len();
            f[pos] = next() as u8;
        }
        if next() % 4 == 0 {
            let cut = 14 + (next() as usize) % (f.len() - 14);
            f.truncate(cut);
        }
        let (rx, ox, _) = lab.dp.test_xdp(&f, lab.lan, 1).unwrap();
        assert!(rx == XDP_PASS || rx == XDP_REDIRECT, "xdp verdict {rx} for {f:02x?}");
        if rx == XDP_PASS {
            assert_eq!(ox, f, "xdp modified a passed frame");
        }
        let Ok((rt, ot, _)) = lab.dp.test_tc(&f, lab.lan, None, 1) else {
            assert!(f.len() < 64, "TC test run refused a {}-byte frame", f.len());
            continue;
        };
        assert!(rt == TC_NEXT || rt == TC_REDIRECT, "tc verdict {rt}");
        if rt == TC_NEXT {
            assert_eq!(ot, f, "tc modified a passed frame");
        }
    }
}
