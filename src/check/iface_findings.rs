//! Interface findings: one pure function per item, listed in
//! `IFACE_FINDINGS` in the order they are reported, and the report of one
//! interface built from them.

use super::facts::{IfaceFacts, ProgRef, TcProg};
use super::{IfaceReport, Verdict};
use crate::dataplane::Mode;
use crate::policy::xdp::{self, Target};
use crate::policy::ModeDecision;
use crate::routes::link::{self, LinkInfo};

/// What interface findings may look at besides the interface's facts: the
/// interface as mode selection saw it, and the mode `run` would pick.
pub(super) struct IfaceCtx<'a> {
    pub link: &'a LinkInfo,
    pub mode: Mode,
    pub reason: &'a str,
}

impl IfaceCtx<'_> {
    fn xdp(&self) -> bool {
        self.mode == Mode::Xdp
    }
}

/// None: the item does not apply to this interface.
type IfaceFinding = fn(&IfaceFacts, &IfaceCtx) -> Option<Verdict>;

/// Every interface item, in report order. The names are stable: scripts match on them.
pub(super) const IFACE_FINDINGS: &[(&str, IfaceFinding)] = &[
    ("exists", exists),
    ("topology", topology),
    ("link_state", link_state),
    ("mode", mode),
    ("served_by", served_by),
    ("native_xdp", native_xdp_finding),
    ("xdp_redirect_target", xdp_redirect_target),
    ("vlan_tags", vlan_tags),
    ("egress_qdisc", egress_qdisc),
    ("xdp_program", xdp_program),
    ("tc_ingress", tc_ingress),
    ("own_filters", own_filters),
    ("device_hooks", device_hooks),
];

/// nft-offload's own program names (bpf/fastpath.bpf.c): a previous or
/// running `nft-offload run` is reported as such, not as a stranger.
const OWN_PROGS: [&str; 6] = ["fo_xdp", "fo_xdp_md", "fo_tc", "fo_tc_l3", "fo_tc_egress", "fo_tc_egress_l3"];

/// The report of one interface; `decision` is None when it does not exist.
pub(super) fn report(f: &IfaceFacts, decision: Option<ModeDecision>) -> IfaceReport {
    let (Ok(l), Some(d)) = (&f.link, decision) else {
        let why = f.link.as_ref().err().cloned().unwrap_or_default();
        return IfaceReport {
            name: f.name.clone(),
            exists: false,
            driver: String::new(),
            mode: None,
            reason: String::new(),
            native_xdp: None,
            xdp_redirect_target: None,
            egress_qdisc: String::new(),
            shaper: false,
            xdp_prog_id: None,
            tc_ingress_programs: Vec::new(),
            findings: vec![Verdict::fail(
                why,
                "check the name (`ip link`), or run check where the interface is: \
                 `ip netns exec NS nft-offload check`",
            )
            .named("exists")],
        };
    };
    let ctx = IfaceCtx { link: l, mode: d.mode, reason: &d.reason };
    let findings = IFACE_FINDINGS.iter().filter_map(|(item, judge)| judge(f, &ctx).map(|v| v.named(item))).collect();
    IfaceReport {
        name: l.name.clone(),
        exists: true,
        driver: l.driver.clone(),
        mode: Some(d.mode),
        native_xdp: native_xdp(&l.driver).0,
        xdp_redirect_target: redirect_target(xdp_port(f, &ctx).facts),
        egress_qdisc: l.qdisc.clone(),
        shaper: link::is_shaper(&l.qdisc),
        xdp_prog_id: f.xdp_prog.as_ref().map(|p| p.id),
        tc_ingress_programs: tc_descriptions(&f.tc_ingress),
        reason: d.reason,
        findings,
    }
}

fn or_unknown(driver: &str) -> &str {
    if driver.is_empty() {
        "?"
    } else {
        driver
    }
}

fn exists(_: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    Some(Verdict::ok(format!("ifindex {}, driver {}", c.link.ifindex, or_unknown(&c.link.driver))))
}

/// What the device is (bridge, VLAN, PPPoE, L3) and what it stands on.
fn topology(f: &IfaceFacts, _: &IfaceCtx) -> Option<Verdict> {
    f.topology.as_ref().map(|d| Verdict::ok(d.clone()))
}

fn link_state(_: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    Some(if c.link.up {
        Verdict::ok("up")
    } else {
        Verdict::warn(
            "down or no carrier: nothing is forwarded through it until it comes up",
            format!("ip link set dev {} up (and check the cable or peer)", c.link.name),
        )
    })
}

fn mode(_: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    Some(Verdict::ok(format!("{}: {}", c.mode.as_str(), c.reason)))
}

/// What the XDP findings are about: the interface itself, or in XDP mode
/// the Ethernet device beneath a VLAN or ppp device, which `run` attaches
/// to and which serves it (`engine::ports`).
struct XdpPort<'a> {
    name: &'a str,
    driver: &'a str,
    facts: &'a link::XdpPortFacts,
    vlans: &'a [String],
}

fn xdp_port<'a>(f: &'a IfaceFacts, c: &'a IfaceCtx) -> XdpPort<'a> {
    match &f.beneath {
        Some(Ok(b)) if c.xdp() => XdpPort { name: &b.port, driver: &b.driver, facts: &b.xdp, vlans: &b.vlans },
        _ => XdpPort { name: &c.link.name, driver: &c.link.driver, facts: &f.xdp, vlans: &f.vlans },
    }
}

/// XDP mode, a VLAN or ppp device: which device serves it and how.
fn served_by(f: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    if !c.xdp() {
        return None;
    }
    Some(match f.beneath.as_ref()? {
        Ok(b) => Verdict::ok(format!(
            "XDP runs on {}, the Ethernet device beneath, for {}: its frames carry {} there, which the fast path \
             pops and pushes; only {}'s connections are offloaded through {}",
            b.port, c.link.name, b.headers, c.link.name, b.port
        )),
        Err(e) => Verdict::fail(
            format!("{} has no XDP of its own and no Ethernet device beneath it to serve it from: {e}", c.link.name),
            "--mode tc",
        ),
    })
}

/// Known native-XDP support by driver name (ETHTOOL_GDRVINFO), with caveats.
pub(super) fn native_xdp(driver: &str) -> (Option<bool>, String) {
    const NATIVE: &[&str] = &[
        "mlx4_en",
        "mlx5_core",
        "ixgbe",
        "ixgbevf",
        "i40e",
        "ice",
        "igb",
        "igc",
        "idpf",
        "bnxt_en",
        "nfp",
        "qede",
        "ena",
        "sfc",
        "gve",
        "hv_netvsc",
        "mana",
        "ionic",
        "atlantic",
        "fsl_dpaa2_eth",
        "enetc",
        "fec",
        "mvneta",
        "mvpp2",
        "st_gmac",
        "txgbe",
        "ngbe",
        "thunder-nicvf",
        "tsnep",
    ];
    // Software devices link::is_virtual does not list; none has native XDP.
    const SOFTWARE: &[&str] =
        &["ifb", "ipip", "ip_gre", "ip6_gre", "sit", "ip6_tunnel", "geneve", "vrf", "team", "openvswitch", "netkit"];
    match driver {
        "veth" => (
            Some(true),
            "native, with caveats: a redirect into a veth needs NAPI on its peer (GRO or an XDP program), \
             and locally generated CHECKSUM_PARTIAL frames lose their checksum"
                .into(),
        ),
        "virtio_net" => (
            Some(true),
            "native (virtio_net); attaching may need the host's guest offloads (GRO_HW, guest TSO) off \
             and enough queues for XDP_TX"
                .into(),
        ),
        "tun" => (Some(true), "native (tun/tap)".into()),
        "bonding" => (None, "native only if every slave's driver has it".into()),
        "" => (None, "driver unknown".into()),
        d if link::is_virtual(d) || SOFTWARE.contains(&d) => {
            (Some(false), format!("{d} is a software device without native XDP"))
        }
        d if NATIVE.contains(&d) => (Some(true), format!("native ({d})")),
        d => (None, format!("{d} is not in nft-offload's list of native-XDP drivers (not probed)")),
    }
}

fn native_xdp_finding(f: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    let p = xdp_port(f, c);
    let (native, why) = native_xdp(p.driver);
    let why = if p.name == c.link.name { why } else { format!("{}: {why}", p.name) };
    Some(if c.xdp() && native != Some(true) {
        let fallback = if native == Some(false) { "runs as" } else { "may fall back to" };
        Verdict::warn(format!("{why}: XDP mode {fallback} generic XDP, slower than TC"), "--mode tc")
    } else {
        Verdict::ok(why)
    })
}

/// Whether XDP frames redirected into it arrive (`policy::xdp::target`):
/// known for a veth (its peer's NAPI) and wherever the kernel reports
/// xdp-features; None otherwise.
fn redirect_target(f: &link::XdpPortFacts) -> Option<bool> {
    (f.peer.is_some() || f.features.is_some()).then(|| xdp::target(f).takes())
}

/// What a redirect into it meets, and in XDP mode what `run` does about a
/// target that cannot take it: the directions leaving by it stay on the
/// kernel's path (held), so nothing is lost, but they are not fast.
fn xdp_redirect_target(f: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    let p = xdp_port(f, c);
    redirect_target(p.facts)?;
    let only = if c.xdp() { "" } else { " (matters only with --mode xdp)" };
    Some(match xdp::target(p.facts) {
        Target::Takes(how) => Verdict::ok(format!("yes: {how}")),
        Target::Refuses { why, .. } if !c.xdp() => Verdict::ok(format!("no: {why}{only}")),
        Target::Refuses { why, remedy } => Verdict::warn(
            format!(
                "no: {why}: a frame XDP redirected into {} would be dropped, so `run` keeps the directions leaving \
                 by it on the kernel's path (held_xdp_target)",
                p.name
            ),
            remedy,
        ),
    })
}

/// How XDP there would tell its VLAN devices' frames apart
/// (`policy::xdp::tags`); only for a port carrying VLAN devices.
fn vlan_tags(f: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    let p = xdp_port(f, c);
    if p.vlans.is_empty() {
        return None;
    }
    Some(match (xdp::tags(p.facts, p.vlans), c.xdp()) {
        (Ok(t), _) => Verdict::ok(t.to_string()),
        (Err(e), false) => Verdict::ok(format!("{e} (matters only with --mode xdp; TC reads the tag from the skb)")),
        (Err(e), true) => {
            let (why, remedy) = e.split_once("; ").map_or((e.as_str(), "--mode tc"), |(a, b)| (a, b));
            Verdict::fail(format!("XDP cannot tell the VLANs apart: {why}"), remedy)
        }
    })
}

fn egress_qdisc(_: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    Some(match (c.link.qdisc.as_str(), link::is_shaper(&c.link.qdisc)) {
        ("noop", _) => Verdict::ok("noop: no qdisc while the interface is down; the one it gets when up decides"),
        ("", _) => Verdict::warn(
            "unknown: rtnetlink reported no root qdisc (IFLA_QDISC)",
            "a shaper on egress matters for the mode: check `tc qdisc show dev IF`",
        ),
        (q, true) if c.xdp() => Verdict::warn(
            format!(
                "{q} is a shaper and an XDP redirect would bypass it: directions leaving by {} stay on the slow path",
                c.link.name
            ),
            "--mode auto or tc (TC keeps the qdisc in the path)",
        ),
        (q, true) => Verdict::ok(format!("{q} (a shaper: TC mode keeps it in the path)")),
        (q, false) => Verdict::ok(q.to_string()),
    })
}

fn prog_desc(p: &ProgRef) -> String {
    let name = if p.name.is_empty() { "?" } else { &p.name };
    if OWN_PROGS.contains(&p.name.as_str()) {
        format!("{name} (id {}, nft-offload's own: is `nft-offload run` running?)", p.id)
    } else {
        format!("{name} (id {})", p.id)
    }
}

fn xdp_program(f: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    let name = &c.link.name;
    Some(match &f.xdp_prog {
        None => Verdict::ok("none attached"),
        Some(p) if c.xdp() => Verdict::fail(
            format!("{} already attached: XDP mode cannot attach (one program per interface)", prog_desc(p)),
            format!("ip link set dev {name} xdp off, or --mode tc"),
        ),
        Some(p) => Verdict::warn(
            format!(
                "{} attached: it runs before nft-offload's TC hook; fine if it returns XDP_PASS for \
                 forwarded traffic",
                prog_desc(p)
            ),
            format!("make sure it passes forwarded traffic, or remove it: ip link set dev {name} xdp off"),
        ),
    })
}

fn tc_descriptions(progs: &[TcProg]) -> Vec<String> {
    progs
        .iter()
        .map(|t| match t {
            TcProg::Tcx(p) => format!("tcx {}", prog_desc(p)),
            TcProg::Legacy { kind, prog: Some(p) } => format!("cls_{kind} {}", prog_desc(p)),
            TcProg::Legacy { kind, prog: None } => format!("cls_{kind} filter"),
        })
        .collect()
}

fn tc_ingress(f: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    let desc = tc_descriptions(&f.tc_ingress);
    if desc.is_empty() {
        return Some(Verdict::ok("no other TC ingress programs"));
    }
    let order = if c.xdp() {
        "packets nft-offload redirects in XDP never reach them"
    } else {
        "TCX programs attached earlier run before nft-offload, legacy filters after it"
    };
    Some(Verdict::warn(
        format!(
            "{}: runs before/after nft-offload ({order}); fine if it returns TCX_NEXT/TC_ACT_UNSPEC",
            desc.join(", ")
        ),
        "check what they return for forwarded traffic, or detach them",
    ))
}

/// cls_bpf filters of nft-offload's programs (kernels without TCX): a
/// running engine's, or ones a killed engine left, which forward nothing
/// (stale heartbeat) until the next start removes them.
fn own_filters(f: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    if f.own_filters.is_empty() {
        return None;
    }
    let (stale, live): (Vec<_>, Vec<_>) = f.own_filters.iter().partition(|o| o.stale());
    if stale.is_empty() {
        let what: Vec<String> = live.iter().map(|o| o.describe()).collect();
        return Some(Verdict::ok(format!("a running nft-offload engine's tc filters: {}", what.join("; "))));
    }
    let what: Vec<String> = stale.iter().map(|o| o.describe()).collect();
    let cmds: Vec<String> = stale.iter().map(|o| o.remove_command(&c.link.name)).collect();
    Some(Verdict::warn(
        format!(
            "tc filters a stopped nft-offload engine left (killed before it could remove them): {}; they forward \
             nothing (stale heartbeat: every packet goes on to the kernel)",
            what.join("; ")
        ),
        format!("the next `nft-offload run` on {} removes them; or now: {}", c.link.name, cmds.join("; ")),
    ))
}

/// tc filters, nftables device chains and (in XDP mode) shapers a fast-path
/// redirect would skip: the directions crossing them are held
/// (`hooks::HookFacts::bypass` decides; this reports the same causes).
fn device_hooks(f: &IfaceFacts, c: &IfaceCtx) -> Option<Verdict> {
    let h = &f.hooks;
    if let Some(e) = &h.unreadable {
        return Some(Verdict::warn(
            format!("the tc and nftables hooks could not be read ({e}): `run` keeps every direction through it on the slow path"),
            "run check (and the engine) as root with CAP_NET_ADMIN",
        ));
    }
    let mut causes = h.ingress_causes();
    causes.extend(h.egress_causes(c.xdp()));
    if causes.is_empty() {
        return Some(Verdict::ok("no tc filter, nftables device chain or bypassed shaper on it"));
    }
    let mut remedies: Vec<String> = Vec::new();
    for r in causes.iter().map(|x| x.remedy(h, None)) {
        if !remedies.contains(&r) {
            remedies.push(r);
        }
    }
    let what: Vec<&str> = causes.iter().map(|x| x.what.as_str()).collect();
    Some(Verdict::warn(
        format!(
            "{}: the fast path would skip it, so the directions crossing it stay on the slow path (`flows` says which)",
            what.join(", ")
        ),
        remedies.join("; "),
    ))
}
