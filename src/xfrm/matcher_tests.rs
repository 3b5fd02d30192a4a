use super::*;
use crate::flow::Direction;
use crate::xfrm::policy::{Selector, Template};
use netlink_packet_xfrm::UserPolicyDefault;

const LAN: u32 = 2;
const WAN: u32 = 3;

fn flow(src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
    Flow { src: src.parse().unwrap(), dst: dst.parse().unwrap(), sport, dport }
}

/// The lab's masqueraded UDP connection 192.168.1.2:5000 -> 203.0.113.2:9999
/// (router WAN address 203.0.113.1), original and reply direction.
fn masq_orig() -> Route {
    let arriving = flow("192.168.1.2", 5000, "203.0.113.2", 9999);
    Route {
        family: 2,
        proto: 17,
        arriving,
        routed: arriving,
        leaving: flow("203.0.113.1", 5000, "203.0.113.2", 9999),
        oif: WAN,
    }
}
fn masq_reply() -> Route {
    Route {
        family: 2,
        proto: 17,
        arriving: flow("203.0.113.2", 9999, "203.0.113.1", 5000),
        routed: flow("203.0.113.2", 9999, "192.168.1.2", 5000),
        leaving: flow("203.0.113.2", 9999, "192.168.1.2", 5000),
        oif: LAN,
    }
}
/// A port forward: 203.0.113.2:40000 -> 203.0.113.1:8080, DNATed to 192.168.1.2:80.
fn dnat_orig() -> Route {
    Route {
        family: 2,
        proto: 6,
        arriving: flow("203.0.113.2", 40000, "203.0.113.1", 8080),
        routed: flow("203.0.113.2", 40000, "192.168.1.2", 80),
        leaving: flow("203.0.113.2", 40000, "192.168.1.2", 80),
        oif: LAN,
    }
}
fn v6() -> Route {
    let f = flow("fd00:1::2", 5000, "fd00:2::2", 443);
    Route { family: 10, proto: 6, arriving: f, routed: f, leaving: f, oif: WAN }
}

/// `dir` policy from `src` to `dst` (prefixes), ESP tunnel unless changed.
fn pol(dir: Dir, src: &str, dst: &str) -> Policy {
    let pfx = |s: &str| {
        let (a, l) = s.split_once('/').unwrap();
        Prefix::new(a.parse().unwrap(), l.parse().unwrap())
    };
    let family = if src.contains(':') { 10 } else { 2 };
    Policy {
        dir,
        block: false,
        priority: 0,
        index: 0,
        sub: false,
        sel: Selector { family, src: pfx(src), dst: pfx(dst), ..Default::default() },
        templates: vec![Template { proto: 50, mode: 1, optional: false }],
        mark: (0, 0),
        if_id: 0,
    }
}
fn bypass(mut p: Policy) -> Policy {
    p.templates.clear();
    p
}
fn prio(mut p: Policy, priority: u32) -> Policy {
    p.priority = priority;
    p
}
fn spd(policies: Vec<Policy>) -> Spd {
    Spd::new(policies, UserPolicyDefault::default(), None)
}

/// What `applies` says, shortened: None, or the policy's text / the cause.
fn judged(s: &Spd, r: &Route) -> Option<String> {
    applies(s, r).map(|a| match a {
        Applies::Policy { policy, by_mark } => format!("{policy}{}", if by_mark { " (mark)" } else { "" }),
        Applies::DefaultBlock(d) => format!("default {} block", d.as_str()),
        Applies::Unknown(w) => format!("unknown: {w}"),
    })
}

#[test]
fn each_kind_of_policy_is_judged() {
    use Dir::{Fwd, In, Out};
    let esp_out = || pol(Out, "192.168.1.0/24", "203.0.113.2/32");
    let mut udp_9999 = esp_out();
    udp_9999.sel.proto = 17;
    udp_9999.sel.dport = 9999;
    udp_9999.sel.dport_mask = 0xffff;
    let mut tcp_only = esp_out();
    tcp_only.sel.proto = 6;
    let mut other_port = udp_9999.clone();
    other_port.sel.dport = 9998;
    let mut port_range = esp_out(); // 9984-9999: a mask on the port
    port_range.sel.dport = 9984;
    port_range.sel.dport_mask = 0xfff0;
    let mut block = bypass(pol(Fwd, "0.0.0.0/0", "203.0.113.0/24"));
    block.block = true;
    let mut marked = esp_out();
    marked.mark = (2, 0xff);
    let mut marked_bypass = bypass(prio(esp_out(), 0));
    marked_bypass.mark = (2, 0xff);
    let mut if_id = esp_out();
    if_id.if_id = 7;
    let mut on_wan = esp_out();
    on_wan.sel.ifindex = WAN as i32;
    let mut on_other = esp_out();
    on_other.sel.ifindex = 9;
    let mut on_lan = esp_out();
    on_lan.sel.ifindex = LAN as i32;
    let mut fwd_on_wan = pol(Fwd, "192.168.1.2/32", "0.0.0.0/0");
    fwd_on_wan.sel.ifindex = WAN as i32;
    let mut fwd_on_lan = fwd_on_wan.clone();
    fwd_on_lan.sel.ifindex = LAN as i32;
    let mut sub = bypass(prio(esp_out(), 50));
    sub.sub = true;
    let esp = "dir out src 192.168.1.0/24 dst 203.0.113.2/32 tmpl esp tunnel";
    let r = masq_orig();
    let cases: Vec<(&str, Vec<Policy>, Route, Option<&str>)> = vec![
        ("no policy", vec![], r, None),
        ("out esp for LAN -> the host", vec![esp_out()], r, Some(esp)),
        ("the reply is not LAN -> host", vec![esp_out()], masq_reply(), None),
        ("in policies never apply to forwarding", vec![pol(In, "0.0.0.0/0", "0.0.0.0/0")], r, None),
        (
            "fwd esp, as it arrives",
            vec![pol(Fwd, "192.168.1.2/32", "0.0.0.0/0")],
            r,
            Some("dir fwd src 192.168.1.2/32 dst 0.0.0.0/0 tmpl esp tunnel"),
        ),
        ("another host", vec![pol(Out, "192.168.1.0/24", "203.0.113.3/32")], r, None),
        ("another family", vec![pol(Out, "::/0", "::/0")], r, None),
        (
            "v6 policy, v6 flow",
            vec![pol(Out, "fd00:1::/64", "fd00:2::/64")],
            v6(),
            Some("dir out src fd00:1::/64 dst fd00:2::/64 tmpl esp tunnel"),
        ),
        ("v6 prefix not covering", vec![pol(Out, "fd00:1::/64", "fd00:3::/64")], v6(), None),
        (
            "protocol and port match",
            vec![udp_9999],
            r,
            Some("dir out src 192.168.1.0/24 dst 203.0.113.2/32 proto udp dport 9999 tmpl esp tunnel"),
        ),
        ("other protocol", vec![tcp_only], r, None),
        ("other port", vec![other_port], r, None),
        (
            "port under a mask",
            vec![port_range],
            r,
            Some("dir out src 192.168.1.0/24 dst 203.0.113.2/32 dport 9984 tmpl esp tunnel"),
        ),
        ("action block", vec![block.clone()], r, Some("dir fwd src 0.0.0.0/0 dst 203.0.113.0/24 action block")),
        ("bypass: sent in clear", vec![bypass(esp_out())], r, None),
        (
            "bypass of higher precedence wins",
            vec![esp_out(), bypass(prio(esp_out(), 0))]
                .into_iter()
                .map(|p| if p.bypass() { p } else { prio(p, 10) })
                .collect(),
            r,
            None,
        ),
        ("esp of higher precedence wins", vec![prio(bypass(esp_out()), 10), esp_out()], r, Some(esp)),
        ("equal priority: the non-bypass is assumed first", vec![bypass(esp_out()), esp_out()], r, Some(esp)),
        (
            "a bypass in out does not help fwd",
            vec![bypass(esp_out()), block],
            r,
            Some("dir fwd src 0.0.0.0/0 dst 203.0.113.0/24 action block"),
        ),
        (
            "mark: taken as matching",
            vec![marked],
            r,
            Some("dir out src 192.168.1.0/24 dst 203.0.113.2/32 mark 0x2/0xff tmpl esp tunnel (mark)"),
        ),
        (
            "a marked bypass is not relied on",
            vec![marked_bypass, prio(esp_out(), 5)],
            r,
            Some("dir out src 192.168.1.0/24 dst 203.0.113.2/32 priority 5 tmpl esp tunnel"),
        ),
        ("if_id: only through an xfrm interface", vec![if_id], r, None),
        (
            "selector on the output device",
            vec![on_wan],
            r,
            Some("dir out src 192.168.1.0/24 dst 203.0.113.2/32 dev #3 tmpl esp tunnel"),
        ),
        ("selector on another device", vec![on_other], r, None),
        // flowi_oif is skb_dst(skb)->dev for the fwd check too, never the
        // device the packet arrived on.
        ("selector on the input device", vec![on_lan], r, None),
        (
            "fwd selector on the output device",
            vec![fwd_on_wan],
            r,
            Some("dir fwd src 192.168.1.2/32 dst 0.0.0.0/0 dev #3 tmpl esp tunnel"),
        ),
        ("fwd selector on the input device", vec![fwd_on_lan], r, None),
        ("a sub policy bypass comes before main", vec![sub, esp_out()], r, None),
    ];
    for (what, policies, route, want) in cases {
        assert_eq!(judged(&spd(policies), &route).as_deref(), want, "{what}");
    }
}

/// Which tuple each lookup sees: out after SNAT and before it, fwd before
/// DNAT (nf_nat_decode_session) and after it.
#[test]
fn nat_forms_of_the_packet_are_each_looked_up() {
    use Dir::{Fwd, Out};
    let cases: Vec<(&str, Policy, Route, bool)> = vec![
        ("out on the masqueraded source", pol(Out, "203.0.113.1/32", "203.0.113.2/32"), masq_orig(), true),
        ("out on the source before SNAT", pol(Out, "192.168.1.2/32", "203.0.113.2/32"), masq_orig(), true),
        ("fwd on the masqueraded source: never seen so", pol(Fwd, "203.0.113.1/32", "0.0.0.0/0"), masq_orig(), false),
        (
            "out on the reply's destination after un-NAT",
            pol(Out, "203.0.113.2/32", "192.168.1.2/32"),
            masq_reply(),
            true,
        ),
        ("fwd on the reply as it arrives", pol(Fwd, "203.0.113.2/32", "203.0.113.1/32"), masq_reply(), true),
        ("out on the reply as it arrives: no", pol(Out, "203.0.113.2/32", "203.0.113.1/32"), masq_reply(), false),
        ("out on the DNAT target", pol(Out, "0.0.0.0/0", "192.168.1.2/32"), dnat_orig(), true),
        ("fwd on the address before DNAT", pol(Fwd, "0.0.0.0/0", "203.0.113.1/32"), dnat_orig(), true),
        ("fwd on the DNAT target", pol(Fwd, "0.0.0.0/0", "192.168.1.2/32"), dnat_orig(), true),
        ("out on the address before DNAT: no", pol(Out, "0.0.0.0/0", "203.0.113.1/32"), dnat_orig(), false),
    ];
    for (what, p, r, held) in cases {
        assert_eq!(applies(&spd(vec![p]), &r).is_some(), held, "{what}");
    }
}

#[test]
fn defaults_and_an_unknown_spd_hold() {
    let mut s = spd(vec![bypass(pol(Dir::Fwd, "192.168.1.0/24", "0.0.0.0/0"))]);
    s.fwd_block = true;
    // the LAN's bypass covers fwd; out has no policy and allows
    assert_eq!(judged(&s, &masq_orig()), None);
    // the reply matches no fwd policy: dropped by default
    assert_eq!(judged(&s, &masq_reply()).as_deref(), Some("default fwd block"));
    s.fwd_block = false;
    s.out_block = true;
    assert_eq!(judged(&s, &masq_orig()).as_deref(), Some("default out block"));
    let u = Spd::unreadable("dump failed".into());
    assert_eq!(judged(&u, &masq_orig()).as_deref(), Some("unknown: dump failed"));
}

#[test]
fn the_why_names_the_policy_and_the_remedy() {
    let s = spd(vec![pol(Dir::Out, "192.168.1.0/24", "203.0.113.2/32")]);
    let why = applies(&s, &masq_orig()).unwrap().to_string();
    assert!(why.starts_with("xfrm policy `dir out src 192.168.1.0/24 dst 203.0.113.2/32 tmpl esp tunnel`"), "{why}");
    assert!(why.contains("sends it through IPsec") && why.contains("exclude these hosts"), "{why}");
    let d = Applies::DefaultBlock(Dir::Out).to_string();
    assert!(d.contains("setdefault out block") && d.contains("action allow"), "{d}");
}

/// A selector's `dev` names the device the FIB routes to, which is not
/// the port the fast path transmits on when a bridge, a VLAN device or a
/// ppp device stands above it: br-lan above the LAN port, wan.7 (then
/// pppoe-wan) above the WAN port. `route_ifindex` carries it from the path
/// resolution; the ports must not match.
#[test]
fn a_selectors_device_is_the_routes_not_the_port() {
    use crate::flow::tests::tuple;
    use crate::flow::{build_direction, NextHop};
    const BR_LAN: u32 = 7;
    const WAN_VLAN: u32 = 8;
    const PPPOE_WAN: u32 = 9;
    let orig = tuple("192.168.1.2", 5000, "203.0.113.2", 9999, 17);
    let reply = tuple("203.0.113.2", 9999, "203.0.113.1", 5000, 17);
    let nh = NextHop { ifindex: WAN, smac: [0; 6], dmac: [0; 6], mtu: 1500, xdp_ok: false };
    let up = |route| Direction { route_ifindex: route, ..build_direction(&orig, &reply, LAN, &nh) };
    let down = |route| Direction {
        route_ifindex: route,
        ..build_direction(&reply, &orig, WAN, &NextHop { ifindex: LAN, ..nh })
    };
    let on = |dir, src: &str, dst: &str, dev: u32| {
        let mut p = pol(dir, src, dst);
        p.sel.ifindex = dev as i32;
        spd(vec![p])
    };
    let download = |dev| on(Dir::Out, "203.0.113.2/32", "192.168.1.0/24", dev);
    let upload = |dev| on(Dir::Out, "192.168.1.0/24", "203.0.113.2/32", dev);
    let fwd_down = |dev| on(Dir::Fwd, "203.0.113.2/32", "0.0.0.0/0", dev);
    let cases: Vec<(&str, Spd, Direction, bool)> = vec![
        ("out dev br-lan, leaving by br-lan through its port", download(BR_LAN), down(BR_LAN), true),
        ("out dev <the LAN port>: not what the kernel matches", download(LAN), down(BR_LAN), false),
        ("fwd dev br-lan", fwd_down(BR_LAN), down(BR_LAN), true),
        ("fwd dev <the LAN port>", fwd_down(LAN), down(BR_LAN), false),
        ("out dev wan.7 above the WAN port", upload(WAN_VLAN), up(WAN_VLAN), true),
        ("out dev pppoe-wan over wan.7", upload(PPPOE_WAN), up(PPPOE_WAN), true),
        ("out dev wan.7, routed to pppoe-wan over it", upload(WAN_VLAN), up(PPPOE_WAN), false),
        ("out dev <the WAN port> under pppoe-wan", upload(WAN), up(PPPOE_WAN), false),
        ("no bridge: the port is the route's device", download(LAN), down(LAN), true),
    ];
    for (what, s, d, held) in cases {
        assert_eq!(applies(&s, &Route::of(&d)).is_some(), held, "{what}");
    }
}

#[test]
fn a_route_is_read_from_the_map_entries() {
    use crate::flow::tests::tuple;
    use crate::flow::{build_direction, NextHop};
    // masquerade: orig 192.168.1.2:5000 -> 203.0.113.2:9999, reply from the server to 203.0.113.1
    let orig = tuple("192.168.1.2", 5000, "203.0.113.2", 9999, 17);
    let reply = tuple("203.0.113.2", 9999, "203.0.113.1", 5000, 17);
    let nh = NextHop { ifindex: WAN, smac: [0; 6], dmac: [0; 6], mtu: 1500, xdp_ok: false };
    assert_eq!(Route::of(&build_direction(&orig, &reply, LAN, &nh)), masq_orig());
    let nh = NextHop { ifindex: LAN, ..nh };
    assert_eq!(Route::of(&build_direction(&reply, &orig, WAN, &nh)), masq_reply());
}
