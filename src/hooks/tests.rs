//! The decision table: one row per hook, side and mode.

use super::*;

const LAN: u32 = 3;
const WAN: u32 = 4;

fn port(name: &str, xdp: bool) -> DeviceHooks {
    DeviceHooks { name: name.into(), xdp, ..Default::default() }
}

fn sqm_ingress() -> TcFilter {
    TcFilter {
        kind: "u32".into(),
        actions: vec!["mirred".into()],
        target: Some(("ifb4rwan".into(), Some("tbf".into()))),
    }
}

fn facts(lan: DeviceHooks, wan: DeviceHooks) -> HookFacts {
    HookFacts { ports: [(LAN, lan), (WAN, wan)].into_iter().collect() }
}

/// (what, lan, wan, download (WAN->LAN) bypass side, upload (LAN->WAN) bypass side)
type Row = (&'static str, DeviceHooks, DeviceHooks, Option<Side>, Option<Side>);

#[test]
fn which_directions_skip_a_hook() {
    let tc = |f: fn(&mut DeviceHooks), xdp: bool, name: &str| {
        let mut d = port(name, xdp);
        f(&mut d);
        d
    };
    let rows: Vec<Row> = vec![
        ("nothing on either port", port("rlan", false), port("rwan", false), None, None),
        (
            "sqm download shaper: tc ingress on the WAN holds downloads only",
            port("rlan", false),
            tc(|d| d.ingress_filters.push(sqm_ingress()), false, "rwan"),
            Some(Side::Ingress),
            None,
        ),
        (
            "sqm upload shaper: htb on the WAN egress is kept by a TC redirect",
            port("rlan", false),
            tc(|d| d.shaper = Some("htb".into()), false, "rwan"),
            None,
            None,
        ),
        (
            "htb on the WAN egress in XDP mode: uploads would bypass it",
            port("rlan", true),
            tc(|d| d.shaper = Some("htb".into()), true, "rwan"),
            None,
            Some(Side::Egress),
        ),
        (
            "tc egress filter: kept by TC",
            port("rlan", false),
            tc(
                |d| d.egress_filters.push(TcFilter { kind: "matchall".into(), actions: vec![], target: None }),
                false,
                "rwan",
            ),
            None,
            None,
        ),
        (
            "tc egress filter: skipped by XDP",
            port("rlan", true),
            tc(
                |d| d.egress_filters.push(TcFilter { kind: "matchall".into(), actions: vec![], target: None }),
                true,
                "rwan",
            ),
            None,
            Some(Side::Egress),
        ),
        (
            "netdev ingress chain on the LAN: uploads arrive through it",
            tc(|d| d.ingress_chains.push("netdev t dscp".into()), false, "rlan"),
            port("rwan", false),
            None,
            Some(Side::Ingress),
        ),
        (
            "netdev egress chain on the WAN: a TC redirect skips it (nf_skip_egress)",
            port("rlan", false),
            tc(|d| d.egress_chains.push("netdev t dscp_out".into()), false, "rwan"),
            None,
            Some(Side::Egress),
        ),
        (
            "netdev egress chain on the WAN in XDP mode",
            port("rlan", true),
            tc(|d| d.egress_chains.push("netdev t dscp_out".into()), true, "rwan"),
            None,
            Some(Side::Egress),
        ),
        (
            "ingress and egress chains: ingress is named first",
            tc(|d| d.egress_chains.push("netdev t e".into()), false, "rlan"),
            tc(|d| d.ingress_chains.push("inet fw i".into()), false, "rwan"),
            Some(Side::Ingress),
            None,
        ),
        (
            "unreadable WAN: both directions held",
            port("rlan", false),
            tc(|d| d.unreadable = Some("EPERM".into()), false, "rwan"),
            Some(Side::Ingress),
            Some(Side::Egress),
        ),
    ];
    for (what, lan, wan, down, up) in rows {
        let f = facts(lan, wan);
        assert_eq!(f.bypass(WAN, LAN).map(|b| b.side), down, "{what}: download");
        assert_eq!(f.bypass(LAN, WAN).map(|b| b.side), up, "{what}: upload");
    }
}

#[test]
fn why_names_device_hook_and_remedy() {
    let mut wan = port("rwan", false);
    wan.ingress_filters.push(sqm_ingress());
    let why = facts(port("rlan", false), wan).bypass(WAN, LAN).unwrap().why;
    assert_eq!(
        why,
        "tc ingress filter u32 on rwan redirects to ifb4rwan (shaping qdisc tbf there: a download shaper): the fast \
         path runs before it, so this direction stays on the slow path; to offload it, shape on the egress of rlan \
         (htb or cake there) instead of an ifb on rwan's ingress"
    );
    let mut lan = port("rlan", false);
    lan.ingress_chains.push("netdev t dscp".into());
    let why = facts(lan, port("rwan", false)).bypass(LAN, WAN).unwrap().why;
    assert_eq!(
        why,
        "nft chain netdev t dscp on rlan ingress: the fast path runs before it, so this direction stays on the slow \
         path; remove it to offload this direction"
    );
    let mut wan = port("rwan", true);
    wan.shaper = Some("tbf".into());
    let why = facts(port("rlan", true), wan).bypass(LAN, WAN).unwrap().why;
    assert!(why.starts_with("shaping qdisc tbf on rwan: an XDP redirect (ndo_xdp_xmit)"), "{why}");
    assert!(why.ends_with("use --mode tc (a TC redirect keeps the qdisc and tc egress filters)"), "{why}");
    let mut wan = port("rwan", false);
    wan.ingress_filters.push(TcFilter { kind: "matchall".into(), actions: vec!["police".into()], target: None });
    let why = facts(port("rlan", false), wan).bypass(WAN, LAN).unwrap().why;
    assert!(why.starts_with("tc ingress filter matchall on rwan (actions: police): "), "{why}");
}

#[test]
fn summary_lists_only_hooked_ports() {
    let mut wan = port("rwan", false);
    wan.ingress_filters.push(sqm_ingress());
    wan.shaper = Some("htb".into());
    let s = facts(port("rlan", false), wan.clone()).summary();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, "rwan");
    assert_eq!(s[0].1.len(), 1, "a TC port keeps its shaper: {s:?}");
    wan.xdp = true;
    let s = facts(port("rlan", true), wan).summary();
    assert_eq!(s[0].1.len(), 2, "an XDP port's shaper is skipped: {s:?}");
}

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e} (is it installed?)"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// `read` against the kernel, in a fresh network namespace: chains by
/// name and side, an ingress qdisc's filters (and no egress side for it),
/// clsact's egress filters, a mirred target and its shaper, a shaper under
/// a root qdisc. Needs root; fails (does not skip) without it.
#[test]
fn read_from_the_kernel() {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        panic!("read_from_the_kernel needs root (unshare(CLONE_NEWNET), veth, tc, nft)");
    }
    let r = std::thread::spawn(|| {
        // SAFETY: plain syscall, affects only this thread (and its children).
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        sh(&["ip", "link", "add", "ha", "type", "veth", "peer", "name", "hb"]);
        sh(&["ip", "link", "add", "hifb", "type", "ifb"]);
        for i in ["ha", "hb", "hifb"] {
            sh(&["ip", "link", "set", "dev", i, "up"]);
        }
        sh(&["tc", "qdisc", "add", "dev", "hifb", "root", "handle", "1:", "htb", "default", "1"]);
        sh(&["tc", "class", "add", "dev", "hifb", "parent", "1:", "classid", "1:1", "htb", "rate", "10mbit"]);
        sh(&[
            "tc", "qdisc", "add", "dev", "hifb", "parent", "1:1", "tbf", "rate", "5mbit", "burst", "8k", "latency",
            "50ms",
        ]);
        sh(&["tc", "qdisc", "add", "dev", "ha", "handle", "ffff:", "ingress"]);
        sh(&[
            "tc", "filter", "add", "dev", "ha", "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0",
            "action", "mirred", "egress", "redirect", "dev", "hifb",
        ]);
        sh(&["tc", "qdisc", "add", "dev", "hb", "clsact"]);
        // This kernel has neither matchall nor gact: u32 with a mirror.
        sh(&[
            "tc", "filter", "add", "dev", "hb", "egress", "protocol", "all", "u32", "match", "u32", "0", "0", "action",
            "mirred", "egress", "mirror", "dev", "hifb",
        ]);
        sh(&[
            "nft",
            "add table netdev t; add chain netdev t i { type filter hook ingress devices = { ha, hb } priority 0; }",
        ]);
        // Bridge chains: ha is (said to be) a port of hbr, hb of none; the
        // forward hook sees bridged frames only.
        sh(&[
            "nft",
            "add table bridge bt; add chain bridge bt pre { type filter hook prerouting priority 0; }; \
             add chain bridge bt out { type filter hook postrouting priority 0; }; \
             add chain bridge bt fw { type filter hook forward priority 0; }",
        ]);
        let ports = |xdp| {
            ["ha", "hb"]
                .map(|n| Port {
                    ifindex: crate::routes::link::ifindex(n).unwrap(),
                    name: n.into(),
                    xdp,
                    bridge: (n == "ha").then(|| "hbr".into()),
                    uppers: Vec::new(),
                })
                .to_vec()
        };
        let f = read(&ports(false), &|_| false);
        let [a, b] = [&f.ports[&ports(false)[0].ifindex], &f.ports[&ports(false)[1].ifindex]];
        assert_eq!((a.unreadable.as_deref(), b.unreadable.as_deref()), (None, None));
        assert_eq!(a.ingress_chains, ["netdev t i", "bridge bt pre (bridge hbr)"]);
        assert_eq!(a.egress_chains, ["bridge bt out (bridge hbr)"]);
        assert_eq!(b.ingress_chains, ["netdev t i"]);
        assert!(b.egress_chains.is_empty(), "{b:?}");
        assert_eq!(a.ingress_filters.len(), 1, "{a:?}");
        assert_eq!(a.ingress_filters[0].kind, "u32");
        assert_eq!(a.ingress_filters[0].target, Some(("hifb".into(), Some("htb".into()))));
        assert!(a.egress_filters.is_empty(), "the ingress qdisc has no egress side: {a:?}");
        assert!(b.ingress_filters.is_empty(), "{b:?}");
        assert_eq!(b.egress_filters.len(), 1, "{b:?}");
        assert_eq!(b.egress_filters[0].actions, ["mirred"]);
        assert_eq!(b.egress_filters[0].target.as_ref().map(|t| t.0.as_str()), Some("hifb"));
        assert_eq!((a.shaper.as_deref(), b.shaper.as_deref()), (None, None), "veth: noqueue");
        // Chains and filters gone: nothing left to hold for.
        sh(&["nft", "delete table netdev t"]);
        sh(&["nft", "delete table bridge bt"]);
        sh(&["tc", "qdisc", "del", "dev", "ha", "ingress"]);
        sh(&["tc", "qdisc", "del", "dev", "hb", "clsact"]);
        sh(&["tc", "qdisc", "add", "dev", "hb", "root", "handle", "1:", "htb"]);
        let f = read(&ports(true), &|_| false);
        assert_eq!(f.summary(), vec![("hb".to_string(), vec!["shaping qdisc htb on hb".to_string()])]);
        assert!(f.bypass(ports(true)[0].ifindex, ports(true)[1].ifindex).is_some(), "XDP into hb's htb");
        assert!(f.bypass(ports(true)[1].ifindex, ports(true)[0].ifindex).is_none());
    })
    .join();
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
}

/// The fast path on a port below pppoe-wan (or br-lan, wan.7) pops and
/// pushes their headers itself: their hooks see nothing of it.
#[test]
fn hooks_on_the_devices_above_a_port_hold_it() {
    let mut ppp = port("pppoe-wan", false);
    ppp.shaper = Some("cake".into());
    let mut wan = port("eth1", false);
    wan.uppers.push(ppp);
    let f = facts(port("br-lan", false), wan.clone());
    let up = f.bypass(LAN, WAN).expect("an upload skips cake on pppoe-wan even by TC");
    assert_eq!(up.side, Side::Egress);
    assert_eq!(
        up.why,
        "shaping qdisc cake on pppoe-wan: the fast path pushes their headers and transmits on eth1 itself, so this \
         direction stays on the slow path; list pppoe-wan itself (the fast path then runs on it and keeps its \
         hooks) or remove it"
    );
    assert_eq!(f.bypass(WAN, LAN), None, "a shaper holds nothing arriving");

    let mut ppp = port("pppoe-wan", false);
    ppp.ingress_filters.push(sqm_ingress());
    let mut wan = port("eth1", true);
    wan.uppers.push(ppp);
    let f = facts(port("br-lan", true), wan);
    let down = f.bypass(WAN, LAN).expect("a download skips the ifb redirect on pppoe-wan's ingress");
    assert_eq!(down.side, Side::Ingress);
    assert!(down.why.contains("on pppoe-wan redirects to ifb4rwan"), "{}", down.why);
    assert!(down.why.contains("the fast path on eth1 takes their headers off before them"), "{}", down.why);
    assert_eq!(f.bypass(LAN, WAN), None, "an ingress filter holds nothing leaving");

    // The port's own hook is named before its uppers'.
    let mut vlan = port("wan.7", false);
    vlan.egress_chains.push("netdev t out7".into());
    let mut wan = port("eth1", false);
    wan.egress_chains.push("netdev t out".into());
    wan.uppers.push(vlan);
    let why = facts(port("br-lan", false), wan).bypass(LAN, WAN).unwrap().why;
    assert!(why.starts_with("nft chain netdev t out on eth1 egress: a TC redirect skips"), "{why}");
    assert!(!why.contains("wan.7"), "{why}");
}

/// Where the kernel has no TCX the fast path is itself a cls_bpf filter:
/// not a hook to step aside for, unless it shares a pref with another.
#[test]
fn our_own_cls_bpf_filters_are_no_hook() {
    let f = |bpf: Vec<tc::BpfProg>| tc::Filter { pref: 1, kind: "bpf".into(), actions: vec![], bpf };
    let p = |id| tc::BpfProg { id, name: "fo_tc".into(), handle: 1 };
    let own: Own = &|b| b.id == 42;
    assert!(is_own(&f(vec![p(42)]), own));
    assert!(!is_own(&f(vec![p(42), p(7)]), own), "another program under the same pref");
    assert!(!is_own(&f(vec![]), own), "no program read: counts as someone else's");
    assert!(!is_own(&tc::Filter { kind: "u32".into(), ..f(vec![p(42)]) }, own));
}
