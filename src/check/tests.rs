use std::fs;
use std::process::Command;

use super::facts::{config_enabled, ProgRef, TcProg, KFUNCS};
use super::iface_findings::native_xdp;
use super::*;
use crate::dataplane::{Features, Keepalive, Probe};
use crate::host::CAP_NET_ADMIN;
use crate::routes::link;
use crate::routes::link::peer::{Netns, PeerFacts};
use crate::routes::link::XdpPortFacts;

// ------------------------------------------------ pure verdicts (no root)

fn good_host() -> HostFacts {
    HostFacts {
        cap_eff: Some(0x1ff_ffff_ffff),
        bpf_load: Ok(()),
        jit_enable: Some(1),
        jit_always_on: Some(false),
        btf_vmlinux: true,
        kernel_release: "6.8.0-45-generic".into(),
        kfuncs: Some(KFUNCS.iter().map(|k| (*k, true)).collect()),
        flowtable: None,
        conntrack: true,
        ct_events: Some(1),
        ct_acct: Some(1),
        nft_version: Some("nftables v1.0.9 (Old Doc Yak #3)".into()),
        ipv4_forward: Some(1),
        ipv6_forward: Some(1),
        links_unreadable: None,
        rules: Default::default(),
        xfrm: Default::default(),
        probe: new_kernel(),
        fastpath: Ok(Features {
            csum_ipv6: true,
            fib_skip_neigh: true,
            fib_mark: true,
            ..Features::from_probe(&new_kernel())
        }),
        memory: crate::settings::capacity::MemoryFacts {
            mem_total: Some(512 << 20),
            cgroup_max: None,
            ct_max: Some(16_384),
        },
    }
}

/// A kernel with everything (6.16+).
fn new_kernel() -> Probe {
    Probe { tcx: Ok(()), kern_ctx: true, xfrm_helper: Some(true), keepalive: Keepalive::FastPath }
}

/// Debian 12's 6.1.176 as probed in a VM: no TCX, no bpf_cast_to_kern_ctx,
/// xfrm built in; BPF_F_IPV6 and SKIP_NEIGH backported, no MARK.
fn debian_6_1() -> HostFacts {
    let probe =
        Probe { tcx: Err(libc::EINVAL), kern_ctx: false, xfrm_helper: Some(true), keepalive: Keepalive::NoKfuncs };
    HostFacts {
        kernel_release: "6.1.0-50-amd64".into(),
        probe,
        fastpath: Ok(Features { csum_ipv6: true, fib_skip_neigh: true, ..Features::from_probe(&probe) }),
        ..good_host()
    }
}

fn iface(name: &str, driver: &str, qdisc: &str) -> IfaceFacts {
    IfaceFacts {
        name: name.into(),
        link: Ok(LinkInfo {
            name: name.into(),
            ifindex: 7,
            up: true,
            driver: driver.into(),
            mtu: 1500,
            qdisc: qdisc.into(),
            link_type: libc::ARPHRD_ETHER,
            vlans_stripped: Vec::new(),
        }),
        xdp: XdpPortFacts { name: name.into(), driver: driver.into(), ..Default::default() },
        vlans: Vec::new(),
        beneath: None,
        xdp_prog: None,
        tc_ingress: Vec::new(),
        own_filters: Vec::new(),
        hooks: Default::default(),
        topology: None,
    }
}

fn missing(name: &str) -> IfaceFacts {
    IfaceFacts { link: Err(format!("{name} does not exist in this network namespace")), ..iface(name, "", "") }
}

/// A veth whose peer `p` (in namespace "ns-p") is read or not, on a kernel
/// without xdp-features (the peer decides).
fn veth(name: &str, peer: Result<PeerFacts, String>) -> IfaceFacts {
    let mut f = iface(name, "veth", "noqueue");
    f.xdp.peer = Some(peer);
    f
}

fn peer(name: &str, gro: bool, xdp_prog: Option<u32>) -> Result<PeerFacts, String> {
    Ok(PeerFacts {
        name: name.into(),
        ifindex: 2,
        netns: Some(Netns::Named("ns-p".into())),
        up: true,
        gro: Some(gro),
        xdp_prog,
        tx_vlan: [Some(true), Some(true)],
        tx_csum: Some(false),
    })
}

fn hw_pair() -> Vec<IfaceFacts> {
    vec![iface("eth0", "ixgbe", "mq"), iface("eth1", "mlx5_core", "fq_codel")]
}

fn host_finding<'a>(r: &'a CheckReport, item: &str) -> &'a Finding {
    r.host.iter().find(|f| f.item == item).unwrap_or_else(|| panic!("no host finding {item}: {r:#?}"))
}

fn finding<'a>(i: &'a IfaceReport, item: &str) -> &'a Finding {
    i.findings.iter().find(|f| f.item == item).unwrap_or_else(|| panic!("no {item} for {}: {i:#?}", i.name))
}

fn judged(h: &HostFacts) -> CheckReport {
    judge(h, &hw_pair(), ModeChoice::Auto)
}

#[test]
fn max_flows_says_what_run_would_size_and_why() {
    let f = host_finding(&judged(&good_host()), "max_flows").clone();
    assert_eq!(f.status, Status::Ok);
    assert_eq!(
        f.detail,
        "13107 connections (1/16 of 512 MiB RAM at 2560 bytes a connection; nf_conntrack_max 16384) unless \
         --max-flows (or max_flows in the config) says otherwise; a full table costs about 32 MiB (maps and \
         daemon), an empty one its map buckets"
    );
    let mut h = good_host();
    h.memory.mem_total = Some(128 << 20);
    let f = host_finding(&judged(&h), "max_flows").clone();
    assert!(f.detail.starts_with("3276 connections (1/16 of 128 MiB RAM at 2560 bytes a connection;"), "{f:?}");
    assert!(f.detail.contains("about 8 MiB"), "{f:?}");
}

#[test]
fn a_good_host_is_all_ok_and_exits_zero() {
    let r = judged(&good_host());
    for f in r.host.iter().chain(r.interfaces.iter().flat_map(|i| &i.findings)) {
        assert_eq!(f.status, Status::Ok, "{f:?}");
        assert!(f.remedy.is_none(), "{f:?}");
    }
    assert!(r.offload_possible);
    assert_eq!(r.exit_code(), 0);
    assert!(r.interfaces.iter().all(|i| i.mode == Some(Mode::Xdp) && i.native_xdp == Some(true)));
    assert_eq!(host_finding(&r, "interfaces").detail, "2 usable: eth0, eth1");
}

#[test]
fn every_host_failure_has_a_remedy_and_makes_exit_nonzero() {
    type Breaker = fn(&mut HostFacts);
    let cases: [(&str, Breaker, &str); 7] = [
        ("privileges", |h| h.cap_eff = Some(1 << CAP_NET_ADMIN), "CAP_BPF (or CAP_SYS_ADMIN)"),
        ("bpf_syscall", |h| h.bpf_load = Err(libc::EPERM), "refused"),
        ("bpf_syscall", |h| h.bpf_load = Err(libc::ENOSYS), "not implemented"),
        ("btf", |h| h.btf_vmlinux = false, "/sys/kernel/btf/vmlinux missing"),
        ("conntrack", |h| h.conntrack = false, "no conntrack"),
        ("conntrack_events", |h| h.ct_events = Some(0), "nf_conntrack_events = 0"),
        ("conntrack_events", |h| h.ct_events = None, "no net.netfilter.nf_conntrack_events"),
    ];
    for (item, brk, detail) in cases {
        let mut h = good_host();
        brk(&mut h);
        let r = judged(&h);
        let f = host_finding(&r, item);
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(f.detail.contains(detail), "{f:?}");
        assert!(f.remedy.is_some(), "{f:?}");
        assert!(!r.offload_possible);
        assert_eq!(r.exit_code(), 1);
    }
    let mut h = good_host();
    h.ct_events = Some(0);
    assert_eq!(
        host_finding(&judged(&h), "conntrack_events").remedy.as_deref(),
        Some("sysctl -w net.netfilter.nf_conntrack_events=1")
    );
    // events = 2 is "on when a listener subscribes": fine for us.
    h.ct_events = Some(2);
    assert_eq!(host_finding(&judged(&h), "conntrack_events").status, Status::Ok);
}

/// Each kernel's features, one row per host item they decide: what 6.1
/// gets is said, and only what costs offload where it matters warns.
#[test]
fn kernel_features_say_what_each_kernel_got() {
    let veths = || [iface("a", "veth", "noqueue"), iface("b", "veth", "noqueue")];
    let r = judge(&debian_6_1(), &veths(), ModeChoice::Tc);
    assert!(r.offload_possible, "6.1 runs TC through clsact");
    #[rustfmt::skip]
    let want = [
        ("fast_path", Status::Ok, "loads on kernel 6.1.0-50-amd64"),
        ("tcx", Status::Ok, "clsact: TC mode, and the egress watcher of both modes, work without TCX"),
        ("secpath", Status::Ok, "helper: no bpf_cast_to_kern_ctx (6.2+)"),
        ("csum_partial", Status::Ok, "assumed: no bpf_cast_to_kern_ctx (6.2+)"),
        ("csum_ipv6", Status::Ok, "yes: "),
        ("fib_skip_neigh", Status::Ok, "yes: "),
        ("fib_mark", Status::Ok, "no: bpf_fib_lookup refuses BPF_FIB_LOOKUP_MARK (6.10+)"),
    ];
    for (item, status, start) in want {
        let f = host_finding(&r, item);
        assert_eq!(f.status, status, "{f:?}");
        assert!(f.detail.starts_with(start), "{item}: {}", f.detail);
    }
    let t = host_finding(&r, "tcx");
    assert!(t.detail.contains("clsact qdisc and cls_bpf") && t.detail.contains("after a kill -9 they stay"), "{t:?}");
    assert!(t.detail.contains("Invalid argument (errno 22)"), "{t:?}");
    let r = judged(&good_host());
    assert!(host_finding(&r, "tcx").detail.starts_with("tcx: TCX links: the kernel detaches them"));
    assert!(host_finding(&r, "secpath").detail.starts_with("kfunc: "));

    // fwmark rules on a kernel without BPF_FIB_LOOKUP_MARK: those
    // connections stay with the kernel.
    let mut h = debian_6_1();
    h.rules.v4.by_mark = true;
    let f = host_finding(&judge(&h, &veths(), ModeChoice::Tc), "fib_mark").clone();
    assert_eq!(f.status, Status::Warn, "{f:?}");
    assert!(f.detail.starts_with("ip rules select on fwmark and bpf_fib_lookup refuses"), "{f:?}");

    // No way to tell a decrypted packet: TC forwards nothing.
    h.probe.xfrm_helper = None;
    h.fastpath = Ok(Features::from_probe(&h.probe));
    let r = judge(&h, &veths(), ModeChoice::Tc);
    assert_eq!(host_finding(&r, "secpath").status, Status::Warn);
    let r = judge(&h, &hw_pair(), ModeChoice::Xdp);
    assert_eq!(host_finding(&r, "secpath").status, Status::Ok, "XDP never sees a decrypted packet");

    // The fast path does not load: the error names the missing feature,
    // the probed items still say what they know, the others say why not.
    h.fastpath =
        Err("loading the BPF fast path failed: kernel lacks kfunc bpf_cast_to_kern_ctx (needs Linux >= 6.2)".into());
    let r = judge(&h, &veths(), ModeChoice::Tc);
    let f = host_finding(&r, "fast_path");
    assert_eq!(f.status, Status::Fail);
    assert!(f.detail.contains("kernel lacks kfunc bpf_cast_to_kern_ctx"), "{f:?}");
    assert!(!r.offload_possible);
    assert!(host_finding(&r, "tcx").detail.starts_with("clsact: TC mode"));
    assert!(host_finding(&r, "csum_ipv6").detail.starts_with("unknown: the fast path did not load"));
}

#[test]
fn warnings_do_not_make_exit_nonzero() {
    let mut h = good_host();
    h.jit_enable = Some(0);
    h.ct_acct = Some(0);
    h.nft_version = None;
    h.ipv4_forward = Some(0);
    h.ipv6_forward = Some(0);
    let r = judged(&h);
    for item in ["bpf_jit", "conntrack_acct", "nft", "ip_forward"] {
        let f = host_finding(&r, item);
        assert_eq!(f.status, Status::Warn, "{f:?}");
        assert!(f.remedy.is_some(), "{f:?}");
    }
    assert!(host_finding(&r, "ip_forward").detail.contains("this host does not forward"));
    assert_eq!(
        host_finding(&r, "ip_forward").remedy.as_deref(),
        Some("sysctl -w net.ipv4.ip_forward=1; sysctl -w net.ipv6.conf.all.forwarding=1")
    );
    assert!(host_finding(&r, "conntrack_acct").detail.contains("`nft-offload hosts` has only the offloaded"));
    assert_eq!(
        host_finding(&r, "conntrack_acct").remedy.as_deref(),
        Some("sysctl -w net.netfilter.nf_conntrack_acct=1")
    );
    assert!(r.offload_possible);
    assert_eq!(r.exit_code(), 0);
}

#[test]
fn jit_state_outside_the_initial_namespace() {
    let mut h = good_host();
    h.jit_enable = None;
    h.jit_always_on = Some(true);
    assert_eq!(host_finding(&judged(&h), "bpf_jit").status, Status::Ok);
    h.jit_always_on = None;
    let r = judged(&h);
    let f = host_finding(&r, "bpf_jit");
    assert_eq!(f.status, Status::Warn);
    assert!(f.detail.contains("CONFIG_BPF_JIT_ALWAYS_ON unknown"), "{f:?}");
    h.jit_enable = Some(0);
    h.jit_always_on = Some(true);
    assert_eq!(host_finding(&judged(&h), "bpf_jit").status, Status::Ok);
}

#[test]
fn missing_kfuncs_warn_and_the_flowtable_is_informational() {
    let mut h = good_host();
    h.kfuncs = Some(KFUNCS.iter().map(|k| (*k, *k != "bpf_ct_change_status")).collect());
    h.flowtable = Some("module nf_flow_table loaded".into());
    let r = judged(&h);
    // Missing kfuncs cost engine CPU, not correctness: a warning that
    // names them.
    let k = host_finding(&r, "conntrack_kfuncs");
    assert_eq!(k.status, Status::Warn);
    assert!(k.detail.starts_with("bpf_ct_change_status not in kernel BTF: the engine refreshes"), "{k:?}");
    assert_eq!(host_finding(&judged(&good_host()), "conntrack_kfuncs").status, Status::Ok);
    let ft = host_finding(&r, "nf_flow_table");
    assert_eq!(ft.status, Status::Ok);
    assert!(ft.detail.contains("do not also load `flow add` rules directly"), "{ft:?}");
    let ft = host_finding(&judged(&good_host()), "nf_flow_table").clone();
    assert!(ft.detail.starts_with("not present: nft-offload does its job"), "{ft:?}");
}

#[test]
fn each_interface_says_what_it_is() {
    let br =
        IfaceFacts { topology: Some("br-lan: bridge, ports lan1 lan2".into()), ..iface("br-lan", "bridge", "noqueue") };
    let r = judge(&good_host(), &[br, iface("eth0", "ixgbe", "mq")], ModeChoice::Auto);
    let t = finding(&r.interfaces[0], "topology");
    assert_eq!((t.status, t.detail.as_str()), (Status::Ok, "br-lan: bridge, ports lan1 lan2"));
    assert!(r.interfaces[1].findings.iter().all(|f| f.item != "topology"), "not read: no finding");
}

#[test]
fn interface_counts() {
    let h = good_host();
    let r = judge(&h, &[iface("eth0", "ixgbe", "mq"), missing("nosuch")], ModeChoice::Auto);
    let f = host_finding(&r, "interfaces");
    assert_eq!(f.status, Status::Warn, "one-armed router still works");
    assert!(f.remedy.as_deref().unwrap().contains("two ports"));
    assert_eq!(r.exit_code(), 0);
    let r = judge(&h, &[missing("nosuch")], ModeChoice::Auto);
    assert_eq!(host_finding(&r, "interfaces").status, Status::Fail);
    assert_eq!(r.exit_code(), 1);
    let nosuch = &r.interfaces[0];
    assert!(!nosuch.exists && nosuch.mode.is_none());
    assert_eq!(nosuch.findings.len(), 1);
    assert_eq!(nosuch.findings[0].status, Status::Fail);
    assert!(nosuch.findings[0].detail.contains("does not exist"));
    // An interface that fails on its own is not usable.
    let mut busy = iface("eth1", "ixgbe", "mq");
    busy.xdp_prog = Some(ProgRef { id: 9, name: "xdp_fw".into() });
    let r = judge(&h, &[iface("eth0", "ixgbe", "mq"), busy], ModeChoice::Xdp);
    assert_eq!(host_finding(&r, "interfaces").status, Status::Warn);
}

#[test]
fn veth_redirect_target_depends_on_the_peer_and_matters_only_for_xdp() {
    let h = good_host();
    let no_napi = peer("p", false, None);
    let r = judge(&h, &[veth("a", no_napi.clone()), veth("b", no_napi.clone())], ModeChoice::Auto);
    let a = &r.interfaces[0];
    assert_eq!(a.mode, Some(Mode::Tc));
    assert!(a.reason.contains("software device (veth)"));
    assert_eq!(a.xdp_redirect_target, Some(false));
    assert_eq!(finding(a, "xdp_redirect_target").status, Status::Ok);
    assert!(finding(a, "xdp_redirect_target").detail.contains("matters only with --mode xdp"));
    assert!(finding(a, "native_xdp").detail.contains("CHECKSUM_PARTIAL"));

    // XDP: `run` holds those directions (nothing is lost), so a warning
    // saying so, with the command to run where the peer is.
    let r = judge(&h, &[veth("a", no_napi.clone()), veth("b", no_napi)], ModeChoice::Xdp);
    let f = finding(&r.interfaces[0], "xdp_redirect_target");
    assert_eq!(f.status, Status::Warn);
    assert!(f.detail.starts_with("no: its peer p (namespace ns-p) has neither GRO nor an XDP program"), "{f:?}");
    assert!(f.detail.contains("held_xdp_target"), "{f:?}");
    assert!(f
        .remedy
        .as_deref()
        .unwrap()
        .starts_with("enable GRO on the peer (ip netns exec ns-p ethtool -K p gro on)"));

    let r = judge(
        &h,
        &[veth("a", peer("p", true, None)), veth("b", peer("q", false, Some(3))), veth("c", Err("gone".into()))],
        ModeChoice::Xdp,
    );
    assert_eq!(r.interfaces[0].xdp_redirect_target, Some(true));
    assert_eq!(finding(&r.interfaces[0], "xdp_redirect_target").status, Status::Ok);
    assert_eq!(r.interfaces[1].xdp_redirect_target, Some(true));
    assert!(finding(&r.interfaces[1], "xdp_redirect_target").detail.contains("XDP program (id 3)"));
    let c = finding(&r.interfaces[2], "xdp_redirect_target");
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("cannot be told (gone)"), "{c:?}");
    // Not veth, no xdp-features: no such finding.
    let r = judged(&h);
    assert!(r.interfaces[0].findings.iter().all(|f| f.item != "xdp_redirect_target"));
}

/// `check --mode xdp` on firewall4's VLAN device: which device serves it
/// and how its tags are read, judged on that device; without a device
/// beneath (an ambiguous PPPoE session) it fails with the way out.
#[test]
fn a_vlan_device_in_xdp_mode_is_judged_on_the_device_beneath() {
    use super::facts::Beneath;
    use crate::routes::link::netdev::XdpFeatures;
    let h = good_host();
    let mut w = iface("w0.7", "802.1Q VLAN Support", "noqueue");
    let port = |strip: bool, md: bool| XdpPortFacts {
        name: "w0".into(),
        driver: "virtio_net".into(),
        features: Some(XdpFeatures { act: 0x7f, rx_metadata: if md { 4 } else { 0 } }),
        rx_vlan_strip: [Some(strip), Some(strip)],
        vlan_kfunc: true,
        ..Default::default()
    };
    let b = |strip, md| Beneath {
        port: "w0".into(),
        headers: "VLAN 7".into(),
        driver: "virtio_net".into(),
        xdp: port(strip, md),
        vlans: vec!["w0.7".into()],
    };
    w.beneath = Some(Ok(b(true, true)));
    let r = judge(&h, &[w.clone(), iface("lan0", "virtio_net", "mq")], ModeChoice::Xdp);
    let i = &r.interfaces[0];
    let f = finding(i, "served_by");
    assert_eq!(f.status, Status::Ok);
    assert!(f.detail.starts_with("XDP runs on w0, the Ethernet device beneath, for w0.7: its frames carry VLAN 7"));
    assert!(
        finding(i, "native_xdp").detail.starts_with("w0: native, with caveats")
            || finding(i, "native_xdp").detail.starts_with("w0: native (virtio_net)"),
        "{:?}",
        finding(i, "native_xdp")
    );
    assert_eq!(finding(i, "native_xdp").status, Status::Ok);
    assert!(finding(i, "vlan_tags").detail.contains("receive metadata"), "{:?}", finding(i, "vlan_tags"));
    assert_eq!(finding(i, "xdp_redirect_target").status, Status::Ok);
    // The NIC strips tags and its driver does not expose them: refused,
    // naming the ethtool command on w0.
    w.beneath = Some(Ok(b(true, false)));
    let r = judge(&h, &[w.clone()], ModeChoice::Xdp);
    let f = finding(&r.interfaces[0], "vlan_tags");
    assert_eq!(f.status, Status::Fail, "{f:?}");
    assert!(f.remedy.as_deref().unwrap().contains("ethtool -K w0 rxvlan off"), "{f:?}");
    // TC runs on the VLAN device itself: nothing served.
    let r = judge(&h, &[w.clone()], ModeChoice::Tc);
    assert!(r.interfaces[0].findings.iter().all(|f| f.item != "served_by"));
    w.beneath = Some(Err("pppoe-wan: 2 PPPoE sessions and 1 ppp devices".into()));
    let f = finding(&judge(&h, &[w], ModeChoice::Xdp).interfaces[0], "served_by").clone();
    assert_eq!((f.status, f.remedy.as_deref()), (Status::Fail, Some("--mode tc")));
}

#[test]
fn other_programs_and_shapers() {
    let h = good_host();
    let mut a = iface("eth0", "ixgbe", "htb");
    a.xdp_prog = Some(ProgRef { id: 11, name: "xdp_fw".into() });
    a.tc_ingress = vec![
        TcProg::Tcx(ProgRef { id: 12, name: "cilium".into() }),
        TcProg::Legacy { kind: "bpf".into(), prog: Some(ProgRef { id: 13, name: "fo_tc".into() }) },
        TcProg::Legacy { kind: "u32".into(), prog: None },
    ];
    let r = judge(&h, &[a.clone(), iface("eth1", "ixgbe", "mq")], ModeChoice::Auto);
    let i = &r.interfaces[0];
    assert_eq!(i.mode, Some(Mode::Tc));
    assert!(i.shaper);
    assert_eq!(finding(i, "egress_qdisc").status, Status::Ok);
    let x = finding(i, "xdp_program");
    assert_eq!(x.status, Status::Warn, "TC mode: another XDP program is only a caveat");
    assert!(x.detail.contains("xdp_fw (id 11)"));
    let t = finding(i, "tc_ingress");
    assert_eq!(t.status, Status::Warn);
    assert!(t.detail.contains("tcx cilium (id 12)"), "{t:?}");
    assert!(t.detail.contains("cls_bpf fo_tc (id 13, nft-offload's own"), "{t:?}");
    assert!(t.detail.contains("cls_u32 filter"), "{t:?}");
    assert!(t.detail.contains("fine if it returns TCX_NEXT/TC_ACT_UNSPEC"));
    assert_eq!(i.tc_ingress_programs.len(), 3);

    let r = judge(&h, &[a, iface("eth1", "ixgbe", "mq")], ModeChoice::Xdp);
    let i = &r.interfaces[0];
    assert_eq!(finding(i, "xdp_program").status, Status::Fail);
    assert_eq!(finding(i, "egress_qdisc").status, Status::Warn, "XDP bypasses the shaper");
}

/// Without TCX the fast path sits in cls_bpf filters, which a killed
/// engine leaves behind: check names them and the command that removes them.
#[test]
fn own_filters_left_by_a_killed_engine_say_how_to_go() {
    use crate::dataplane::tc_legacy::OwnFilter;
    let f = |ingress, name: &str, beat_age_ns| OwnFilter {
        ingress,
        pref: 1,
        handle: 1,
        prog_id: 40,
        name: name.into(),
        beat_age_ns,
    };
    let mut a = iface("eth0", "ixgbe", "mq");
    let item = |a: &IfaceFacts| {
        let r = judge(&debian_6_1(), &[a.clone(), iface("eth1", "ixgbe", "mq")], ModeChoice::Tc);
        r.interfaces[0].findings.iter().find(|f| f.item == "own_filters").cloned()
    };
    assert_eq!(item(&a), None, "nothing to say without them");
    a.own_filters = vec![f(true, "fo_tc", Some(100_000_000)), f(false, "fo_tc_egress", Some(50_000_000))];
    let o = item(&a).unwrap();
    assert_eq!(o.status, Status::Ok);
    assert!(o.detail.starts_with("a running nft-offload engine's tc filters: ingress pref 1"), "{o:?}");
    a.own_filters = vec![f(true, "fo_tc", Some(60_000_000_000)), f(false, "fo_tc_egress", None)];
    let o = item(&a).unwrap();
    assert_eq!(o.status, Status::Warn);
    assert!(o.detail.contains("fo_tc (id 40), heartbeat 60.0 s old") && o.detail.contains("forward nothing"), "{o:?}");
    assert_eq!(
        o.remedy.as_deref(),
        Some(
            "the next `nft-offload run` on eth0 removes them; or now: tc filter del dev eth0 ingress pref 1 handle \
             0x1 bpf; tc filter del dev eth0 egress pref 1 handle 0x1 bpf"
        )
    );
}

#[test]
fn device_hooks_name_what_the_fast_path_would_skip() {
    use crate::hooks::{DeviceHooks, TcFilter};
    let h = good_host();
    let mut a = iface("eth0", "ixgbe", "htb");
    a.hooks = DeviceHooks { name: "eth0".into(), shaper: Some("htb".into()), ..Default::default() };
    let r = judge(&h, &[a.clone(), iface("eth1", "ixgbe", "mq")], ModeChoice::Tc);
    let f = finding(&r.interfaces[0], "device_hooks");
    assert_eq!(f.status, Status::Ok, "TC keeps the shaper: {f:?}");
    assert!(f.detail.starts_with("no tc filter"), "{f:?}");
    let r = judge(&h, &[a.clone(), iface("eth1", "ixgbe", "mq")], ModeChoice::Xdp);
    let f = finding(&r.interfaces[0], "device_hooks");
    assert_eq!(f.status, Status::Warn);
    assert!(f.detail.starts_with("shaping qdisc htb on eth0: the fast path would skip it"), "{f:?}");
    assert_eq!(f.remedy.as_deref(), Some("use --mode tc (a TC redirect keeps the qdisc and tc egress filters)"));
    a.hooks.ingress_filters.push(TcFilter {
        kind: "u32".into(),
        actions: vec!["mirred".into()],
        target: Some(("ifb4eth0".into(), Some("cake".into()))),
    });
    a.hooks.ingress_chains.push("netdev t mark".into());
    let r = judge(&h, &[a.clone(), iface("eth1", "ixgbe", "mq")], ModeChoice::Tc);
    let f = finding(&r.interfaces[0], "device_hooks");
    assert!(f.detail.starts_with("nft chain netdev t mark on eth0 ingress, tc ingress filter u32 on eth0"), "{f:?}");
    assert_eq!(
        f.remedy.as_deref(),
        Some(
            "remove it to offload this direction; to offload it, shape on the egress of the port the traffic leaves \
             by (htb or cake there) instead of an ifb on eth0's ingress"
        )
    );
    a.hooks = DeviceHooks { name: "eth0".into(), unreadable: Some("EPERM".into()), ..Default::default() };
    let r = judge(&h, &[a, iface("eth1", "ixgbe", "mq")], ModeChoice::Tc);
    assert_eq!(finding(&r.interfaces[0], "device_hooks").status, Status::Warn);
}

#[test]
fn down_and_generic_only_interfaces_warn() {
    let mut d = iface("br0", "bridge", "noqueue");
    d.link.as_mut().unwrap().up = false;
    let r = judge(&good_host(), &[d, iface("eth1", "ixgbe", "mq")], ModeChoice::Xdp);
    let i = &r.interfaces[0];
    assert_eq!(finding(i, "link_state").status, Status::Warn);
    assert_eq!(i.native_xdp, Some(false));
    assert_eq!(finding(i, "native_xdp").status, Status::Warn);
    assert_eq!(native_xdp("some_new_nic").0, None);
    assert_eq!(native_xdp("ifb").0, Some(false));
    // A never-up interface has the noop qdisc (rtnetlink says so; tc lists none).
    let d = iface("eth0", "ixgbe", "noop");
    let r = judge(&good_host(), &[d], ModeChoice::Auto);
    assert_eq!(finding(&r.interfaces[0], "egress_qdisc").status, Status::Ok);
    assert!(finding(&r.interfaces[0], "egress_qdisc").detail.starts_with("noop"));
}

#[test]
fn render_and_json() {
    let mut h = good_host();
    h.ct_events = Some(0);
    let r = judge(&h, &[iface("eth0", "ixgbe", "mq"), missing("nosuch")], ModeChoice::Auto);
    let text = r.render();
    let w = r.host.iter().chain(r.interfaces.iter().flat_map(|i| &i.findings)).map(|f| f.item.len()).max();
    let w = w.unwrap();
    let line = format!("  FAIL  {:<w$}  net.netfilter.nf_conntrack_events = 0", "conntrack_events");
    assert!(text.contains(&line), "{text}");
    let remedy = format!("  {:<4}  {:<w$}  remedy: sysctl -w net.netfilter.nf_conntrack_events=1", "", "");
    assert!(text.contains(&remedy), "{text}");
    assert!(text.contains("Interface eth0 (driver ixgbe, mode xdp):"), "{text}");
    assert!(text.contains("Interface nosuch:"), "{text}");
    assert!(text.ends_with("Offload NOT possible: 2 failed, 1 warnings\n"), "{text}");
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j["host"][0]["status"], "ok");
    assert_eq!(j["interfaces"][1]["findings"][0]["status"], "fail");
    assert_eq!(j["interfaces"][0]["mode"], "xdp");
    assert_eq!(j["offload_possible"], false);
}

#[test]
fn parsers() {
    assert!(config_enabled("# x\nCONFIG_BPF_JIT_ALWAYS_ON=y\n", "CONFIG_BPF_JIT_ALWAYS_ON"));
    assert!(!config_enabled("# CONFIG_BPF_JIT_ALWAYS_ON is not set\n", "CONFIG_BPF_JIT_ALWAYS_ON"));
    assert!(!config_enabled("CONFIG_BPF_JIT_ALWAYS_ON_X=y\n", "CONFIG_BPF_JIT_ALWAYS_ON"));
}

// ------------------------------------------------ the real thing (root)

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e} (is it installed?)"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Tiny programs for the test to attach: XDP pass, a legacy cls_bpf and a
/// TCX program that both hand the packet on.
const PROGS_C: &str = r#"
#include <linux/bpf.h>
__attribute__((section("xdp"), used)) int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }
__attribute__((section("classifier"), used)) int cls_pass(struct __sk_buff *skb) { return -1; }
__attribute__((section("tcx/ingress"), used)) int tcx_pass(struct __sk_buff *skb) { return -1; }
char _license[] __attribute__((section("license"), used)) = "GPL";
"#;

/// Runs `check` in a fresh network namespace against veth pairs set up to
/// trigger each per-interface finding. Needs root; fails (does not skip)
/// without it.
#[test]
fn check_in_a_fresh_netns() {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        panic!("check_in_a_fresh_netns needs root (unshare(CLONE_NEWNET), veth, XDP); run `cargo test` as root");
    }
    // A dedicated thread: unshare moves only it (and what it spawns).
    let r = std::thread::spawn(netns_scenario).join();
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
}

fn netns_scenario() {
    // SAFETY: plain syscall, affects only this thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());

    let dir = std::env::temp_dir().join(format!("nft-offload-check-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let src = dir.join("progs.c");
    let obj = dir.join("progs.o");
    fs::write(&src, PROGS_C).unwrap();
    let inc = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    sh(&["clang", "-O2", "-g", "-target", "bpf", &inc, "-c", src.to_str().unwrap(), "-o", obj.to_str().unwrap()]);
    let obj_s = obj.to_str().unwrap();

    for (a, b) in [("ca", "cb"), ("cc", "cd")] {
        sh(&["ip", "link", "add", a, "type", "veth", "peer", "name", b]);
    }
    for i in ["ca", "cb", "cc", "cd"] {
        sh(&["ip", "link", "set", "dev", i, "up"]);
    }
    // cb's peer gets GRO, ca's peer (cb) keeps the veth default (off).
    sh(&["ethtool", "-K", "ca", "gro", "on"]);
    sh(&["ethtool", "-K", "cb", "gro", "off"]);
    sh(&["ip", "link", "set", "dev", "cc", "xdpdrv", "obj", obj_s, "sec", "xdp"]);
    sh(&["tc", "qdisc", "add", "dev", "cb", "root", "handle", "1:", "htb"]);
    sh(&["tc", "qdisc", "add", "dev", "ca", "clsact"]);
    sh(&["tc", "filter", "add", "dev", "ca", "ingress", "bpf", "da", "obj", obj_s, "sec", "classifier"]);
    // sqm-scripts' download shaper on ca (after the cls_bpf: pref 60000),
    // a netdev egress chain on cb and an inet ingress chain on cc.
    sh(&["ip", "link", "add", "cifb", "type", "ifb"]);
    sh(&["ip", "link", "set", "dev", "cifb", "up"]);
    sh(&["tc", "qdisc", "add", "dev", "cifb", "root", "tbf", "rate", "30mbit", "burst", "32k", "latency", "50ms"]);
    sh(&[
        "tc", "filter", "add", "dev", "ca", "ingress", "pref", "60000", "protocol", "all", "u32", "match", "u32", "0",
        "0", "action", "mirred", "egress", "redirect", "dev", "cifb",
    ]);
    sh(&["nft", "add table netdev nfo_t; add chain netdev nfo_t e { type filter hook egress device cb priority 0; }"]);
    sh(&["nft", "add table inet nfo_i; add chain inet nfo_i i { type filter hook ingress device cc priority 0; }"]);
    // A TCX program on cb, held by a link for the duration of the test.
    let mut open = libbpf_rs::ObjectBuilder::default().open_file(&obj).unwrap();
    for mut p in open.progs_mut() {
        p.set_autoload(p.name() == "tcx_pass");
    }
    let loaded = open.load().unwrap();
    let tcx_prog = loaded.progs().find(|p| p.name() == "tcx_pass").unwrap();
    let cb_index = link::ifindex("cb").unwrap();
    // SAFETY: valid loaded program; NULL opts; link owned below.
    let raw = unsafe {
        use libbpf_rs::AsRawLibbpf;
        libbpf_sys::bpf_program__attach_tcx(tcx_prog.as_libbpf_object().as_ptr(), cb_index as i32, std::ptr::null())
    };
    let ptr = std::ptr::NonNull::new(raw).expect("attaching TCX to cb");
    // SAFETY: a valid link pointer we now own.
    let _tcx_link = unsafe { libbpf_rs::Link::from_ptr(ptr) };
    fs::write("/proc/sys/net/netfilter/nf_conntrack_events", "0").unwrap();

    let opts = CheckOpts { ifaces: ["ca", "cb", "cc", "nosuch"].map(String::from).to_vec(), mode: ModeChoice::Auto };
    let r = run(&opts);
    let text = r.render();
    println!("{text}");
    let _ = fs::remove_dir_all(&dir);

    // Host.
    let ev = host_finding(&r, "conntrack_events");
    assert_eq!(ev.status, Status::Fail, "{text}");
    assert_eq!(ev.remedy.as_deref(), Some("sysctl -w net.netfilter.nf_conntrack_events=1"));
    for ok in ["btf", "privileges", "bpf_syscall", "fast_path", "tcx", "conntrack", "interfaces"] {
        assert_eq!(host_finding(&r, ok).status, Status::Ok, "{ok}\n{text}");
    }
    // A fresh namespace does not forward.
    assert_eq!(host_finding(&r, "ip_forward").status, Status::Warn);
    assert!(host_finding(&r, "interfaces").detail.starts_with("3 usable: ca, cb, cc"), "{text}");

    let [ca, cb, cc, nosuch] = &r.interfaces[..] else { panic!("{text}") };
    assert!(!nosuch.exists);
    assert_eq!(nosuch.findings.len(), 1);
    assert_eq!(nosuch.findings[0].status, Status::Fail);
    assert!(nosuch.findings[0].detail.contains("does not exist"), "{text}");

    assert!(ca.exists);
    assert_eq!(ca.driver, "veth");
    assert_eq!(ca.mode, Some(Mode::Tc));
    assert!(ca.reason.contains("software device (veth)"), "{}", ca.reason);
    assert_eq!(finding(ca, "link_state").status, Status::Ok, "up, via netlink not the host's sysfs");
    assert_eq!(ca.xdp_redirect_target, Some(false), "peer cb: no GRO, no XDP");
    // `tc -j` lists u32 twice (the filter and its hash-table node).
    assert_eq!(ca.tc_ingress_programs.len(), 3, "{text}");
    assert!(ca.tc_ingress_programs[0].starts_with("cls_bpf cls_pass (id "), "{text}");
    assert_eq!(finding(ca, "tc_ingress").status, Status::Warn);
    // What the fast path would skip, read from the kernel: the filters (one
    // with its mirred target and the shaper there), the chains by name.
    let h = finding(ca, "device_hooks");
    assert_eq!(h.status, Status::Warn, "{text}");
    assert!(
        h.detail.starts_with(
            "tc ingress filter bpf on ca, tc ingress filter u32 on ca redirects to cifb (shaping qdisc tbf there: a \
             download shaper): "
        ),
        "{text}"
    );
    assert!(h.remedy.as_deref().unwrap().contains("instead of an ifb on ca's ingress"), "{text}");
    let h = finding(cb, "device_hooks");
    assert!(h.detail.starts_with("nft chain netdev nfo_t e on cb egress: "), "TC keeps cb's htb: {text}");
    assert!(finding(cc, "device_hooks").detail.starts_with("nft chain inet nfo_i i on cc ingress: "), "{text}");

    assert!(cb.shaper);
    assert_eq!(cb.egress_qdisc, "htb");
    assert_eq!(cb.xdp_redirect_target, Some(true), "peer ca has GRO on");
    assert_eq!(cb.tc_ingress_programs.len(), 1, "{text}");
    assert!(cb.tc_ingress_programs[0].starts_with("tcx tcx_pass (id "), "{text}");

    let id = cc.xdp_prog_id.expect("cc has an XDP program");
    let x = finding(cc, "xdp_program");
    assert_eq!(x.status, Status::Warn, "TC mode: a caveat, not a failure");
    assert!(x.detail.contains(&format!("xdp_pass (id {id})")), "{text}");
    assert_eq!(cc.xdp_redirect_target, Some(false), "peer cd has neither");
    assert!(finding(cc, "tc_ingress").detail.contains("no other"));

    // A host failure makes offload impossible: exit 1.
    assert!(!r.offload_possible);
    assert_eq!(r.exit_code(), 1);
    for item in r.host.iter().chain(r.interfaces.iter().flat_map(|i| &i.findings)).map(|f| &f.item) {
        assert!(text.contains(item.as_str()));
    }

    // Fix it: warnings and a missing interface do not stop offload.
    fs::write("/proc/sys/net/netfilter/nf_conntrack_events", "1").unwrap();
    let r = run(&opts);
    assert!(r.offload_possible, "{}", r.render());
    assert_eq!(r.exit_code(), 0);

    // No interfaces named: everything but lo.
    let r = run(&CheckOpts { ifaces: Vec::new(), mode: ModeChoice::Auto });
    let mut names: Vec<&str> = r.interfaces.iter().map(|i| i.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["ca", "cb", "cc", "cd", "cifb"]);
    let cd = r.interfaces.iter().find(|i| i.name == "cd").unwrap();
    assert_eq!(cd.xdp_redirect_target, Some(true), "peer cc has an XDP program");
}

#[test]
fn policy_routing_says_what_the_rules_mean() {
    use crate::routes::rules::{FamilyRules, Selector};
    let r = judged(&good_host());
    assert_eq!(host_finding(&r, "policy_routing").status, Status::Ok);
    let mut h = good_host();
    h.rules.v4 = FamilyRules { by_mark: true, ..Default::default() };
    let f = host_finding(&judged(&h), "policy_routing").clone();
    assert_eq!(f.status, Status::Ok);
    assert!(f.detail.contains("conntrack mark"), "{f:?}");
    h.rules.v6 = FamilyRules { unreproducible: Some(Selector::Tos), ..Default::default() };
    let f = host_finding(&judged(&h), "policy_routing").clone();
    assert_eq!(f.status, Status::Warn);
    assert!(f.detail.contains("IPv6: an ip rule selects on tos") && f.remedy.is_some(), "{f:?}");
}

#[test]
fn ipsec_names_the_policies_that_keep_traffic_on_the_slow_path() {
    use crate::xfrm::policy::{Dir, Policy, Prefix, Selector, Spd, Template};
    let r = judged(&good_host());
    assert_eq!(host_finding(&r, "ipsec").status, Status::Ok);
    let pol = |dir, tmpl: bool, ifindex: i32| Policy {
        dir,
        block: false,
        priority: 0,
        index: 0,
        sub: false,
        sel: Selector {
            family: 2,
            src: Prefix::new("192.168.1.0".parse().unwrap(), 24),
            dst: Prefix::new("203.0.113.2".parse().unwrap(), 32),
            ifindex,
            ..Default::default()
        },
        templates: if tmpl { vec![Template { proto: 50, mode: 1, optional: false }] } else { vec![] },
        mark: (0, 0),
        if_id: 0,
    };
    let mut h = good_host();
    // a bypass, and an ESP policy bound to an interface that is not checked
    h.xfrm = Spd::new(vec![pol(Dir::Out, false, 0), pol(Dir::Out, true, 99)], Default::default(), None);
    assert_eq!(host_finding(&judged(&h), "ipsec").status, Status::Ok);
    h.xfrm = Spd::new(vec![pol(Dir::Fwd, true, 0)], Default::default(), None);
    let f = host_finding(&judged(&h), "ipsec").clone();
    assert_eq!(f.status, Status::Warn);
    assert!(f.detail.contains("`dir fwd src 192.168.1.0/24 dst 203.0.113.2/32 tmpl esp tunnel`"), "{f:?}");
    assert!(f.remedy.as_deref().is_some_and(|r| r.contains("exclude")), "{f:?}");
    h.xfrm = Spd::new(vec![], netlink_packet_xfrm::UserPolicyDefault { input: 2, forward: 1, output: 2 }, None);
    let f = host_finding(&judged(&h), "ipsec").clone();
    assert!(f.status == Status::Warn && f.detail.contains("setdefault fwd block"), "{f:?}");
    h.xfrm = Spd::unreadable("xfrm policy dump: EPERM".into());
    let f = host_finding(&judged(&h), "ipsec").clone();
    assert!(f.status == Status::Warn && f.detail.contains("offloads nothing"), "{f:?}");
}
