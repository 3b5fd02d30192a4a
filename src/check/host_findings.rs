//! Host findings: one pure function per item, listed in `HOST_FINDINGS` in
//! the order they are reported.

use super::facts::HostFacts;
use super::Verdict;
use crate::dataplane::{FeatureLine, Features};
use crate::host::{has_cap, CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN};

/// What host findings may look at besides the host's facts.
pub(super) struct HostCtx<'a> {
    /// Some interface uses TC (or none is known, so TC may well be needed).
    pub tc_needed: bool,
    /// Interfaces that exist and failed nothing of their own.
    pub usable: Vec<&'a str>,
    /// The ifindex of every checked interface that exists.
    pub ifindexes: Vec<u32>,
}

type HostFinding = fn(&HostFacts, &HostCtx) -> Verdict;

/// Every host item, in report order. The names are stable: scripts match on them.
pub(super) const HOST_FINDINGS: &[(&str, HostFinding)] = &[
    ("privileges", privileges),
    ("bpf_syscall", bpf_syscall),
    ("bpf_jit", bpf_jit),
    ("btf", btf),
    ("fast_path", fast_path),
    ("tcx", tcx),
    ("secpath", secpath),
    ("csum_partial", csum_partial),
    ("csum_ipv6", csum_ipv6),
    ("fib_skip_neigh", fib_skip_neigh),
    ("fib_mark", fib_mark),
    ("conntrack_kfuncs", conntrack_kfuncs),
    ("keepalive", keepalive),
    ("max_flows", max_flows),
    ("nf_flow_table", nf_flow_table),
    ("conntrack", conntrack),
    ("conntrack_events", conntrack_events),
    ("conntrack_acct", conntrack_acct),
    ("nft", nft),
    ("ip_forward", ip_forward),
    ("interfaces", interfaces),
    ("policy_routing", policy_routing),
    ("ipsec", ipsec),
];

const ROOT_REMEDY: &str = "run as root (or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)";

fn privileges(h: &HostFacts, _: &HostCtx) -> Verdict {
    let Some(caps) = h.cap_eff else {
        return Verdict::warn("could not read CapEff from /proc/thread-self/status", ROOT_REMEDY);
    };
    let has = |c| has_cap(caps, c);
    let named: Vec<&str> = [
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]
    .into_iter()
    .filter(|(c, _)| has(*c))
    .map(|(_, n)| n)
    .collect();
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN): loading BPF programs");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN: attaching to interfaces, ctnetlink");
    }
    if missing.is_empty() {
        Verdict::ok(format!("effective: {}", named.join(", ")))
    } else {
        Verdict::fail(format!("missing {}", missing.join("; ")), ROOT_REMEDY)
    }
}

/// What the engine does with the `ip rule` tables (`routes::rules`).
fn policy_routing(h: &HostFacts, _: &HostCtx) -> Verdict {
    let (v4, v6) = (h.rules.v4, h.rules.v6);
    let blocked: Vec<String> = [("IPv4", v4), ("IPv6", v6)]
        .iter()
        .filter_map(|(fam, r)| r.unreproducible.map(|s| format!("{fam}: {s}")))
        .collect();
    if !blocked.is_empty() {
        return Verdict::warn(
            format!("no connection of the family is offloaded: {}", blocked.join("; ")),
            "select on a mark instead: set it in the ruleset (`meta mark set ...` from `ip dscp`, or \
             `ct mark`) and route with `ip rule fwmark`; or leave those connections to the kernel",
        );
    }
    if v4.by_mark || v6.by_mark {
        return Verdict::ok(
            "ip rules select on fwmark: each connection is routed with its conntrack mark, as mwan3 and pbr \
             copy it (`meta mark set ct mark`); a masqueraded connection the kernel routed otherwise stays \
             on the slow path",
        );
    }
    Verdict::ok("no ip rule the route lookups cannot reproduce")
}

/// What the xfrm policies mean for offload (`xfrm::matcher`): the forwarded
/// directions a policy encrypts or blocks stay with the kernel.
fn ipsec(h: &HostFacts, ctx: &HostCtx) -> Verdict {
    let spd = &h.xfrm;
    if let Some(why) = &spd.unknown {
        return Verdict::warn(
            format!("the xfrm policies could not be read ({why}): the engine offloads nothing until they can"),
            "run with CAP_NET_ADMIN; check `ip xfrm policy list` works",
        );
    }
    // A policy bound to another interface never sees a managed one's packets.
    let covering: Vec<String> = spd
        .policies
        .iter()
        .filter(|p| !p.bypass() && p.if_id == 0)
        .filter(|p| p.sel.ifindex == 0 || ctx.ifindexes.contains(&(p.sel.ifindex as u32)))
        .map(|p| format!("`{p}`"))
        .chain(spd.fwd_block.then(|| "`setdefault fwd block`".to_string()))
        .chain(spd.out_block.then(|| "`setdefault out block`".to_string()))
        .collect();
    if covering.is_empty() {
        return Verdict::ok("no xfrm policy encrypts or blocks forwarded traffic");
    }
    Verdict::warn(
        format!(
            "xfrm policies cover forwarded traffic: the directions they match stay on the slow path (the kernel \
             encrypts them, or drops them without an SA): {}",
            covering.join("; ")
        ),
        "nothing to do if that traffic is IPsec: it takes the slow path by design (a policy with a mark is taken \
         as matching every packet, the packet mark not being known); to keep those hosts from being offered at \
         all, exclude them (`[exclude]` in the config file, or leave them out of `flow add` in the ruleset)",
    )
}

fn errno_name(e: i32) -> String {
    format!("{} (errno {e})", std::io::Error::from_raw_os_error(e))
}

fn bpf_syscall(h: &HostFacts, _: &HostCtx) -> Verdict {
    match h.bpf_load {
        Ok(()) => Verdict::ok("the kernel loads a trivial XDP program (libbpf probe)"),
        Err(e) if e == libc::ENOSYS => {
            Verdict::fail("bpf() is not implemented by this kernel", "a kernel built with CONFIG_BPF_SYSCALL=y")
        }
        Err(e) if e == libc::EPERM || e == libc::EACCES => Verdict::fail(
            format!("loading a trivial XDP program was refused: {}", errno_name(e)),
            "run as root (see privileges); if root is refused, a security module or lockdown \
             (kernel.unprivileged_bpf_disabled does not apply to root) denies bpf()",
        ),
        Err(e) => Verdict::fail(
            format!("loading a trivial XDP program failed: {}", errno_name(e)),
            "a kernel with CONFIG_BPF_SYSCALL=y and XDP; see dmesg",
        ),
    }
}

fn bpf_jit(h: &HostFacts, _: &HostCtx) -> Verdict {
    let remedy = "sysctl -w net.core.bpf_jit_enable=1";
    let unknown = |config: &str| {
        Verdict::warn(
            format!(
                "net.core.bpf_jit_enable is not visible here (not the initial network namespace?) and \
                 {config}: JIT state unknown"
            ),
            format!("check `sysctl net.core.bpf_jit_enable` in the initial namespace; if 0: {remedy}"),
        )
    };
    match (h.jit_enable, h.jit_always_on) {
        (Some(1), _) => Verdict::ok("net.core.bpf_jit_enable = 1"),
        (Some(2), _) => Verdict::ok("net.core.bpf_jit_enable = 2 (on, with debug output to the log)"),
        (_, Some(true)) => Verdict::ok("CONFIG_BPF_JIT_ALWAYS_ON=y: programs are always JIT-compiled"),
        (Some(n), _) => Verdict::warn(
            format!("net.core.bpf_jit_enable = {n}: programs run in the interpreter, several times slower"),
            remedy,
        ),
        // net.core.bpf_jit_enable only exists in the initial network namespace.
        (None, Some(false)) => unknown("CONFIG_BPF_JIT_ALWAYS_ON is not set"),
        (None, None) => unknown("the kernel config is not readable (CONFIG_BPF_JIT_ALWAYS_ON unknown)"),
    }
}

fn btf(h: &HostFacts, _: &HostCtx) -> Verdict {
    if h.btf_vmlinux {
        Verdict::ok("/sys/kernel/btf/vmlinux present")
    } else {
        Verdict::fail(
            "/sys/kernel/btf/vmlinux missing: the fast path's CO-RE relocations need kernel BTF",
            "a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    }
}

/// Loading the whole fast path, as `run` does (nothing attached).
fn fast_path(h: &HostFacts, _: &HostCtx) -> Verdict {
    match &h.fastpath {
        Ok(_) => Verdict::ok(format!(
            "loads on kernel {} (the verifier accepts every program; checked without attaching)",
            h.kernel_release
        )),
        Err(e) => Verdict::fail(
            e.clone(),
            "the error names what this kernel lacks: nft-offload needs Linux 6.1 or newer with BTF              (CONFIG_DEBUG_INFO_BTF=y); `NFT_OFFLOAD_LOG=debug nft-offload run ...` shows libbpf's warnings",
        ),
    }
}

/// The feature line `name` as `status` shows it: from the probe for what
/// decides the build, from the loaded fast path for what it asked since.
fn feature(h: &HostFacts, name: &str) -> Option<FeatureLine> {
    let f = match (&h.fastpath, name) {
        (Ok(f), _) => *f,
        (Err(_), "tc_attach" | "secpath" | "csum_partial") => Features::from_probe(&h.probe),
        (Err(_), _) => return None,
    };
    f.lines().into_iter().find(|l| l.name == name)
}

const NOT_LOADED: &str = "unknown: the fast path did not load (see fast_path)";

/// TCX or clsact: probed (BPF_PROG_QUERY for BPF_TCX_INGRESS), not read
/// off the version. Both modes need it: the egress watcher is on TC.
fn tcx(h: &HostFacts, _: &HostCtx) -> Verdict {
    let Some(l) = feature(h, "tc_attach") else { return Verdict::ok(NOT_LOADED) };
    match l.value.as_str() {
        "tcx" => Verdict::ok(format!("tcx: {}", l.detail)),
        _ => Verdict::ok(format!(
            "clsact: TC mode, and the egress watcher of both modes, work without TCX: {}. Unlike TCX links, \
             filters run in priority order: ours take the lowest number, a filter added later with a lower one \
             runs first (see README, \"Using it on a router\")",
            l.detail
        )),
    }
}

/// How decrypted packets are told apart in TC (fastpath.bpf.c fo_secpath).
fn secpath(h: &HostFacts, ctx: &HostCtx) -> Verdict {
    let Some(l) = feature(h, "secpath") else { return Verdict::ok(NOT_LOADED) };
    if l.value == "assumed" && ctx.tc_needed {
        return Verdict::warn(
            l.detail,
            "a kernel with CONFIG_XFRM (bpf_skb_get_xfrm_state) or 6.2+ (bpf_cast_to_kern_ctx); or --mode xdp on \
             NICs with native XDP",
        );
    }
    Verdict::ok(format!("{}: {}", l.value, l.detail))
}

/// One informational feature line: what this kernel got, and the cost of
/// the fallback if it is one.
fn informational(h: &HostFacts, name: &str) -> Verdict {
    match feature(h, name) {
        Some(l) => Verdict::ok(format!("{}: {}", l.value, l.detail)),
        None => Verdict::ok(NOT_LOADED),
    }
}

fn csum_partial(h: &HostFacts, _: &HostCtx) -> Verdict {
    informational(h, "csum_partial")
}

fn csum_ipv6(h: &HostFacts, _: &HostCtx) -> Verdict {
    informational(h, "csum_ipv6")
}

fn fib_skip_neigh(h: &HostFacts, _: &HostCtx) -> Verdict {
    informational(h, "fib_skip_neigh")
}

/// BPF_FIB_LOOKUP_MARK matters only where ip rules select on fwmark.
fn fib_mark(h: &HostFacts, _: &HostCtx) -> Verdict {
    let Some(l) = feature(h, "fib_mark") else { return Verdict::ok(NOT_LOADED) };
    let by_mark = h.rules.v4.by_mark || h.rules.v6.by_mark;
    if l.value == "no" && by_mark {
        return Verdict::warn(
            format!("ip rules select on fwmark and {}", l.detail),
            "a kernel whose bpf_fib_lookup takes BPF_FIB_LOOKUP_MARK (6.10+), or routing that does not select \
             on the mark",
        );
    }
    Verdict::ok(format!("{}: {}", l.value, l.detail))
}

/// Who keeps offloaded connections' conntrack entries alive, as the fast
/// path loaded here: the fast path, or the engine over ctnetlink (the
/// detail says why; a refusal by the verifier is worth a look).
fn keepalive(h: &HostFacts, _: &HostCtx) -> Verdict {
    let Some(l) = feature(h, "keepalive") else { return Verdict::ok(NOT_LOADED) };
    if l.degraded && l.detail.starts_with("the verifier refused") {
        return Verdict::warn(
            format!("{}: {}", l.value, l.detail),
            "report it with this kernel's version: NFT_OFFLOAD_LOG=debug nft-offload run ... shows the verifier's log",
        );
    }
    Verdict::ok(format!("{}: {}", l.value, l.detail))
}

/// The flow table `run` sizes when `--max-flows` is not given, and what a
/// full one costs. Only informative: any size works, a smaller one leaves
/// the excess connections to the kernel.
fn max_flows(h: &HostFacts, _: &HostCtx) -> Verdict {
    let c = crate::settings::capacity::auto_max_flows(&h.memory);
    let full = u64::from(c.flows) * crate::settings::capacity::BYTES_PER_FLOW;
    Verdict::ok(format!(
        "{c} unless --max-flows (or max_flows in the config) says otherwise; a full table costs about {} MiB \
         (maps and daemon), an empty one its map buckets",
        full.div_ceil(1 << 20)
    ))
}

/// The conntrack kfuncs the fast path keeps entries alive with: without
/// them the engine does it over ctnetlink, which works and costs engine CPU
/// per offloaded connection (the `keepalive` feature line says which runs).
fn conntrack_kfuncs(h: &HostFacts, _: &HostCtx) -> Verdict {
    let Some(k) = &h.kfuncs else {
        return Verdict::warn(
            "kernel BTF not readable: the fast path cannot keep conntrack entries alive itself",
            "a kernel with CONFIG_DEBUG_INFO_BTF; until then the engine refreshes entries over ctnetlink",
        );
    };
    let (have, miss): (Vec<_>, Vec<_>) = k.iter().partition(|(_, f)| *f);
    let names = |v: &[&(&str, bool)]| v.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
    if miss.is_empty() {
        Verdict::ok(format!("{}: the fast path keeps conntrack entries alive as it forwards", names(&have)))
    } else {
        Verdict::warn(
            format!(
                "{} not in kernel BTF: the engine refreshes conntrack entries over ctnetlink (about 20 us of \
                 engine CPU per offloaded connection, a third of its timeout apart)",
                names(&miss)
            ),
            "Linux >= 6.0 with CONFIG_NF_CONNTRACK and BTF for it (CONFIG_DEBUG_INFO_BTF_MODULES when it is a \
             module, loaded)",
        )
    }
}

fn nf_flow_table(h: &HostFacts, _: &HostCtx) -> Verdict {
    match &h.flowtable {
        None => {
            Verdict::ok("not present: nft-offload does its job; `flowtable` objects in nft rulesets are translated")
        }
        Some(seen) => Verdict::ok(format!(
            "present ({seen}): kernel flowtable available; nft-offload takes over offload for rulesets \
             loaded through it, do not also load `flow add` rules directly or both will try to offload"
        )),
    }
}

fn conntrack(h: &HostFacts, _: &HostCtx) -> Verdict {
    if h.conntrack {
        Verdict::ok("nf_conntrack active in this namespace")
    } else {
        Verdict::fail(
            "no conntrack in this namespace (no /proc/net/nf_conntrack, no nf_conntrack_max sysctl): \
             nothing to follow",
            "modprobe nf_conntrack (a ruleset with `ct state` rules loads it too)",
        )
    }
}

fn conntrack_events(h: &HostFacts, _: &HostCtx) -> Verdict {
    match h.ct_events {
        Some(0) => Verdict::fail(
            "net.netfilter.nf_conntrack_events = 0: the engine learns about connections from events",
            "sysctl -w net.netfilter.nf_conntrack_events=1",
        ),
        Some(1) => Verdict::ok("net.netfilter.nf_conntrack_events = 1"),
        Some(n) => {
            Verdict::ok(format!("net.netfilter.nf_conntrack_events = {n}: on once a listener (nft-offload) subscribes"))
        }
        None => Verdict::fail(
            "no net.netfilter.nf_conntrack_events sysctl: no conntrack, or a kernel without \
             CONFIG_NF_CONNTRACK_EVENTS",
            "modprobe nf_conntrack; the kernel needs CONFIG_NF_CONNTRACK_EVENTS=y and CONFIG_NF_CT_NETLINK",
        ),
    }
}

/// conntrack's counters never include what the fast path forwards
/// (ctnetlink cannot add to them), whatever the sysctl: say where the
/// totals are.
fn conntrack_acct(h: &HostFacts, _: &HostCtx) -> Verdict {
    let remedy = "sysctl -w net.netfilter.nf_conntrack_acct=1";
    match h.ct_acct {
        Some(0) => Verdict::warn(
            "nf_conntrack_acct = 0: conntrack counts no packets, so `nft-offload hosts` has only the offloaded \
             ones; with it on, hosts adds the slow path's",
            remedy,
        ),
        Some(_) => Verdict::ok(
            "nf_conntrack_acct = 1; conntrack's counters (conntrack -L, nlbwmon, LuCI) miss the packets nft-offload \
             forwards, which ctnetlink cannot add to them: `nft-offload hosts` has per-host totals with them, \
             `flows` per connection",
        ),
        None => Verdict::warn(
            "no net.netfilter.nf_conntrack_acct sysctl: conntrack counters unavailable; \
             `nft-offload hosts` and `flows` count the offloaded packets",
            remedy,
        ),
    }
}

fn nft(h: &HostFacts, _: &HostCtx) -> Verdict {
    match &h.nft_version {
        Some(ver) => Verdict::ok(ver.clone()),
        None => Verdict::warn(
            "`nft --version` failed: nft not installed; `run --nft` and ruleset translation need it",
            "install nftables (apt install nftables)",
        ),
    }
}

fn ip_forward(h: &HostFacts, _: &HostCtx) -> Verdict {
    let fwd =
        [("IPv4", h.ipv4_forward, "net.ipv4.ip_forward"), ("IPv6", h.ipv6_forward, "net.ipv6.conf.all.forwarding")];
    let off: Vec<_> = fwd.iter().filter(|(_, v, _)| *v != Some(1)).collect();
    if off.is_empty() {
        return Verdict::ok("IPv4 and IPv6 forwarding on");
    }
    let what = off.iter().map(|(f, _, _)| *f).collect::<Vec<_>>().join(" and ");
    let detail = if off.len() == fwd.len() {
        format!("{what} forwarding off: this host does not forward")
    } else {
        format!("{what} forwarding off: this host does not forward {what}")
    };
    Verdict::warn(detail, off.iter().map(|(_, _, k)| format!("sysctl -w {k}=1")).collect::<Vec<_>>().join("; "))
}

fn interfaces(h: &HostFacts, ctx: &HostCtx) -> Verdict {
    match ctx.usable[..] {
        [] => Verdict::fail(
            match &h.links_unreadable {
                None => "no usable interface".to_string(),
                Some(e) => format!("no usable interface: interfaces not readable ({e})"),
            },
            "name existing interfaces (`ip link`), run check in the router's namespace \
             (`ip netns exec NS nft-offload check`), and fix the interfaces' failures below",
        ),
        [one] => Verdict::warn(
            format!("only one usable interface ({one}): offload forwards between interfaces"),
            "forwarding between two ports needs both; one interface only serves a one-armed router",
        ),
        ref all => Verdict::ok(format!("{} usable: {}", all.len(), all.join(", "))),
    }
}
