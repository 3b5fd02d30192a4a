//! What this kernel gives the fast path, asked of the kernel itself and
//! never read off its version number (Debian's 6.1 carries backports: its
//! bpf_fib_lookup knows BPF_FIB_LOOKUP_SKIP_NEIGH in 6.1.192, not in
//! 6.1.0). Probed once by `Dataplane::load`: what decides how the fast path
//! is built (.rodata constants), how it is attached (TCX or clsact) and
//! which FIB flags the control plane may use; `status` and `check` show the
//! same lines (`Features::lines`).

use serde::{Deserialize, Serialize};

/// How TC programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcAttach {
    /// TCX links (6.6+): owned by the process, detached by the kernel when
    /// it exits, run before every classic filter.
    Tcx,
    /// A clsact qdisc and cls_bpf direct-action filters (every kernel with
    /// BPF): they outlive a killed engine (see `tc_legacy`).
    Clsact,
}

/// How the TC entry tells a packet xfrm decrypted (`enum fo_secpath_how`,
/// bpf/flow.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Secpath {
    /// bpf_cast_to_kern_ctx (6.2+): the skb's extension bits, one load.
    Kfunc,
    /// bpf_skb_get_xfrm_state (CONFIG_XFRM): one helper call.
    Helper,
    /// No CONFIG_XFRM: no packet is ever decrypted.
    NoXfrm,
    /// No way to tell: every TC packet is taken as decrypted (slow path).
    Assumed,
}

impl Secpath {
    /// The best method the kernel offers. `xfrm_helper`: whether TC
    /// programs may call bpf_skb_get_xfrm_state (None: the probe failed).
    pub fn choose(kern_ctx: bool, xfrm_helper: Option<bool>) -> Self {
        match (kern_ctx, xfrm_helper) {
            (true, _) => Secpath::Kfunc,
            (false, Some(true)) => Secpath::Helper,
            (false, Some(false)) => Secpath::NoXfrm,
            (false, None) => Secpath::Assumed,
        }
    }

    /// Its `enum fo_secpath_how` value.
    pub(super) fn code(self) -> u8 {
        use super::skel::types::fo_secpath_how as H;
        let h = match self {
            Secpath::Kfunc => H::FO_SECPATH_KFUNC,
            Secpath::Helper => H::FO_SECPATH_HELPER,
            Secpath::NoXfrm => H::FO_SECPATH_NONE,
            Secpath::Assumed => H::FO_SECPATH_ASSUME,
        };
        h.0 as u8
    }
}

/// What the kernel was asked before the fast path is opened: these decide
/// how it is built and attached. Tests may give their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// BPF_PROG_QUERY for BPF_TCX_INGRESS on lo: Ok, or the errno.
    pub tcx: Result<(), i32>,
    /// bpf_cast_to_kern_ctx is a function of the kernel's BTF.
    pub kern_ctx: bool,
    /// TC programs may call bpf_skb_get_xfrm_state (None: not known).
    pub xfrm_helper: Option<bool>,
    /// Who keeps offloaded connections' conntrack entries alive, as far as
    /// the probe can tell (`Keepalive`).
    pub keepalive: Keepalive,
}

impl Probe {
    /// Ask this kernel.
    pub fn kernel() -> Self {
        Probe {
            tcx: probe_tcx(),
            kern_ctx: probe_kern_ctx(),
            xfrm_helper: probe_xfrm_helper(),
            keepalive: if probe_ct_kfuncs() { Keepalive::FastPath } else { Keepalive::NoKfuncs },
        }
    }

    /// TCX when the query works; clsact when the kernel does not know the
    /// attach type (6.1 to 6.5: `bpf_prog_query` in kernel/bpf/syscall.c
    /// answers -EINVAL for it; built without CONFIG_NET_XGRESS, the same).
    /// Any other error (no permission) leaves TCX to fail with its own
    /// error when attaching.
    pub fn tc_attach(&self) -> TcAttach {
        match self.tcx {
            Err(e) if e == libc::EINVAL || e == libc::EOPNOTSUPP || e == ENOTSUPP => TcAttach::Clsact,
            _ => TcAttach::Tcx,
        }
    }
}

/// Who refreshes an offloaded connection's conntrack entry while the fast
/// path forwards its packets (bpf/keepalive.h; `engine::keepalive` for the
/// netlink side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keepalive {
    /// The fast path, through the conntrack kfuncs, as it forwards: the
    /// engine does nothing per connection while traffic flows.
    FastPath,
    /// The engine over ctnetlink: chosen (`--keepalive netlink`).
    Chosen,
    /// The engine over ctnetlink: the kernel lacks the kfuncs (before 6.0,
    /// no CONFIG_NF_CONNTRACK BTF, nf_conntrack not loaded).
    NoKfuncs,
    /// The engine over ctnetlink: the verifier refused the fast path with
    /// them, and took it without (the engine's log has the error).
    Refused,
}

/// The kernel's internal ENOTSUPP, which reaches user space as 524.
const ENOTSUPP: i32 = 524;

/// What the fast path got on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    pub tc_attach: TcAttach,
    /// The TCX probe's errno when it failed.
    pub tcx_errno: Option<i32>,
    /// bpf_cast_to_kern_ctx: secpath and CHECKSUM_PARTIAL read from the skb.
    pub kern_ctx: bool,
    pub secpath: Secpath,
    /// bpf_l4_csum_replace accepts BPF_F_IPV6.
    pub csum_ipv6: bool,
    /// bpf_fib_lookup accepts BPF_FIB_LOOKUP_SKIP_NEIGH (6.3+, backported).
    pub fib_skip_neigh: bool,
    /// bpf_fib_lookup accepts BPF_FIB_LOOKUP_MARK (6.10+).
    pub fib_mark: bool,
    pub keepalive: Keepalive,
    /// The fast path's keepalive reads a UDP entry's `stream_ts`
    /// (bpf/keepalive.h fo_udp_stream); false where the verifier refused
    /// the read, or keepalive is not the fast path's.
    #[serde(default)]
    pub ct_stream_ts: bool,
}

impl Features {
    /// The features a probe decides, before the program runs anything;
    /// the FIB and checksum flags are filled in after loading.
    pub fn from_probe(p: &Probe) -> Self {
        Features {
            tc_attach: p.tc_attach(),
            tcx_errno: p.tcx.err(),
            kern_ctx: p.kern_ctx,
            secpath: Secpath::choose(p.kern_ctx, p.xfrm_helper),
            csum_ipv6: false,
            fib_skip_neigh: false,
            fib_mark: false,
            keepalive: p.keepalive,
            ct_stream_ts: p.keepalive == Keepalive::FastPath,
        }
    }

    /// One line per feature, as `status` and `check` show them.
    pub fn lines(&self) -> Vec<FeatureLine> {
        let l = |name: &str, value: &str, degraded: bool, detail: String| FeatureLine {
            name: name.into(),
            value: value.into(),
            degraded,
            detail,
        };
        let errno = self.tcx_errno.map(strerror).unwrap_or_else(|| "refused".into());
        vec![
            match self.tc_attach {
                TcAttach::Tcx => l(
                    "tc_attach",
                    "tcx",
                    false,
                    "TCX links: the kernel detaches them when the engine exits; they run before classic tc filters"
                        .into(),
                ),
                TcAttach::Clsact => l(
                    "tc_attach",
                    "clsact",
                    true,
                    format!(
                        "no TCX (BPF_PROG_QUERY for BPF_TCX_INGRESS: {errno}; TCX is 6.6+): a clsact qdisc and \
                         cls_bpf direct-action filters, put before the other filters; after a kill -9 they stay, \
                         forwarding nothing (stale heartbeat), until the next start removes them"
                    ),
                ),
            },
            match self.secpath {
                Secpath::Kfunc => l(
                    "secpath",
                    "kfunc",
                    false,
                    "decrypted packets found by the skb's extensions (bpf_cast_to_kern_ctx)".into(),
                ),
                Secpath::Helper => l(
                    "secpath",
                    "helper",
                    false,
                    "no bpf_cast_to_kern_ctx (6.2+): decrypted packets found with bpf_skb_get_xfrm_state, one helper \
                     call per TC packet of an offloaded connection"
                        .into(),
                ),
                Secpath::NoXfrm => l(
                    "secpath",
                    "no_xfrm",
                    false,
                    "kernel without xfrm (CONFIG_XFRM): no packet arrives decrypted".into(),
                ),
                Secpath::Assumed => l(
                    "secpath",
                    "assumed",
                    true,
                    "neither bpf_cast_to_kern_ctx (6.2+) nor bpf_skb_get_xfrm_state tells a decrypted packet: TC \
                     forwards nothing (every packet counted secpath); XDP, which never sees one, forwards"
                        .into(),
                ),
            },
            if self.kern_ctx {
                l("csum_partial", "read", false, "CHECKSUM_PARTIAL read from the skb (bpf_cast_to_kern_ctx)".into())
            } else {
                l(
                    "csum_partial",
                    "assumed",
                    true,
                    "no bpf_cast_to_kern_ctx (6.2+): every skb taken as CHECKSUM_PARTIAL, so TC pushes no PPPoE \
                     header (those packets take the slow path, counted pppoe_tc_offload); nothing else changes"
                        .into(),
                )
            },
            if self.csum_ipv6 {
                l("csum_ipv6", "yes", false, "bpf_l4_csum_replace takes BPF_F_IPV6".into())
            } else {
                l(
                    "csum_ipv6",
                    "no",
                    false,
                    "bpf_l4_csum_replace lacks BPF_F_IPV6 (6.16+, some stable trees): IPv6 NAT puts the pseudo-header \
                     change back into skb->csum with bpf_csum_update (same result)"
                        .into(),
                )
            },
            if self.fib_skip_neigh {
                l("fib_skip_neigh", "yes", false, "bpf_fib_lookup takes BPF_FIB_LOOKUP_SKIP_NEIGH".into())
            } else {
                l(
                    "fib_skip_neigh",
                    "no",
                    false,
                    "bpf_fib_lookup refuses BPF_FIB_LOOKUP_SKIP_NEIGH (6.3+): reverse-path lookups look the \
                     neighbour up and take a 'no neighbour' answer's interface (same result)"
                        .into(),
                )
            },
            if self.fib_mark {
                l("fib_mark", "yes", false, "bpf_fib_lookup takes BPF_FIB_LOOKUP_MARK (ip rules on fwmark)".into())
            } else {
                l(
                    "fib_mark",
                    "no",
                    true,
                    "bpf_fib_lookup refuses BPF_FIB_LOOKUP_MARK (6.10+): where ip rules select on fwmark, \
                     connections are not offloaded (not_offloaded says so); without such rules nothing changes"
                        .into(),
                )
            },
            match self.keepalive {
                Keepalive::FastPath => l(
                    "keepalive",
                    "fast_path",
                    !self.ct_stream_ts,
                    format!(
                        "the fast path refreshes conntrack entries as it forwards (conntrack kfuncs, at most once \
                         per eighth of the timeout, 1 to 10 s, per direction); the engine does nothing per \
                         connection while traffic flows{}",
                        if self.ct_stream_ts {
                            ""
                        } else {
                            "; a replied UDP entry's stream_ts is unreadable here (the verifier refused the read), \
                             so it counts as a stream at once: up to 120 s and ASSURED where conntrack gives 30 s in \
                             its first 2 s"
                        }
                    ),
                ),
                Keepalive::Chosen => l(
                    "keepalive",
                    "netlink",
                    false,
                    "chosen (--keepalive netlink): the engine refreshes conntrack entries over ctnetlink".into(),
                ),
                Keepalive::NoKfuncs => l(
                    "keepalive",
                    "netlink",
                    true,
                    "no conntrack kfuncs (bpf_skb_ct_lookup, bpf_ct_change_timeout, bpf_ct_change_status: 6.0+ \
                     with BTF for nf_conntrack): the engine refreshes conntrack entries over ctnetlink, about \
                     20 us each, a third of their timeout apart"
                        .into(),
                ),
                Keepalive::Refused => l(
                    "keepalive",
                    "netlink",
                    true,
                    "the verifier refused the fast path with the conntrack kfuncs (the engine's log says why): \
                     loaded without them, the engine refreshes conntrack entries over ctnetlink"
                        .into(),
                ),
            },
        ]
    }
}

/// "Invalid argument (errno 22)".
fn strerror(e: i32) -> String {
    let s = std::io::Error::from_raw_os_error(e).to_string();
    let msg = s.split(" (os error").next().unwrap_or(&s);
    format!("{msg} (errno {e})")
}

/// One feature as `status` and `check` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureLine {
    pub name: String,
    /// What this kernel got: "tcx" or "clsact", "kfunc", "helper", "yes" ...
    pub value: String,
    /// Less than the newest kernels give (a fallback with a cost).
    pub degraded: bool,
    pub detail: String,
}

/// BPF_PROG_QUERY for BPF_TCX_INGRESS on lo (ifindex 1 in every network
/// namespace): 0 on a kernel with TCX, -EINVAL where the attach type is
/// unknown. Queries, attaches nothing.
pub fn probe_tcx() -> Result<(), i32> {
    let mut ids = [0u32; 8];
    let mut opts = libbpf_sys::bpf_prog_query_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_prog_query_opts>() as _,
        prog_ids: ids.as_mut_ptr(),
        ..Default::default()
    };
    opts.__bindgen_anon_1.count = ids.len() as u32;
    // SAFETY: prog_ids points at `count` u32s that outlive the call.
    let r = unsafe { libbpf_sys::bpf_prog_query_opts(1, libbpf_sys::BPF_TCX_INGRESS, &mut opts) };
    if r == 0 {
        Ok(())
    } else {
        Err(-r)
    }
}

/// bpf_cast_to_kern_ctx (6.2+) among the functions of the kernel's BTF,
/// where libbpf looks kfuncs up.
pub fn probe_kern_ctx() -> bool {
    match libbpf_rs::btf::Btf::from_vmlinux() {
        Ok(btf) => btf.type_by_name::<libbpf_rs::btf::types::Func>("bpf_cast_to_kern_ctx").is_some(),
        Err(e) => {
            tracing::debug!("kernel BTF not readable ({e}): no kfuncs");
            false
        }
    }
}

/// The conntrack kfuncs bpf/keepalive.h calls, among the functions of the
/// kernel's BTF or of nf_conntrack's (a module on Debian and OpenWrt, with
/// its own BTF), where libbpf resolves them.
pub fn probe_ct_kfuncs() -> bool {
    const NAMES: [&std::ffi::CStr; 5] = [
        c"bpf_skb_ct_lookup",
        c"bpf_xdp_ct_lookup",
        c"bpf_ct_change_timeout",
        c"bpf_ct_change_status",
        c"bpf_ct_release",
    ];
    let has_all = |btf: *const libbpf_sys::btf| {
        NAMES.iter().all(|n| {
            // SAFETY: btf is a live BTF object, n a NUL-terminated name.
            unsafe { libbpf_sys::btf__find_by_name_kind(btf, n.as_ptr(), libbpf_sys::BTF_KIND_FUNC) >= 0 }
        })
    };
    // SAFETY: libbpf allocates both objects, freed below; the module's BTF
    // is split on the vmlinux one and freed first.
    unsafe {
        let base = libbpf_sys::btf__load_vmlinux_btf();
        if base.is_null() {
            tracing::debug!("kernel BTF not readable: no conntrack kfuncs");
            return false;
        }
        let mut ok = has_all(base);
        if !ok {
            let m = libbpf_sys::btf__parse_split(c"/sys/kernel/btf/nf_conntrack".as_ptr(), base);
            if !m.is_null() {
                ok = has_all(m);
                libbpf_sys::btf__free(m);
            }
        }
        libbpf_sys::btf__free(base);
        ok
    }
}

/// Whether TC programs may call bpf_skb_get_xfrm_state: `tc_cls_act_func_proto`
/// (net/core/filter.c) offers it only with CONFIG_XFRM. libbpf loads a
/// program calling it and reads the verifier's answer.
pub fn probe_xfrm_helper() -> Option<bool> {
    // SAFETY: no pointers in (opts must be NULL); returns 1, 0 or -errno.
    let r = unsafe {
        libbpf_sys::libbpf_probe_bpf_helper(
            libbpf_sys::BPF_PROG_TYPE_SCHED_CLS,
            libbpf_sys::BPF_FUNC_skb_get_xfrm_state,
            std::ptr::null(),
        )
    };
    match r {
        1 => Some(true),
        0 => Some(false),
        e => {
            tracing::debug!("probing bpf_skb_get_xfrm_state failed: errno {}", -e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(tcx: Result<(), i32>, kern_ctx: bool, xfrm_helper: Option<bool>) -> Probe {
        Probe { tcx, kern_ctx, xfrm_helper, keepalive: Keepalive::FastPath }
    }

    /// Each kernel gets the best method it has; unknown means conservative.
    #[test]
    fn the_probe_decides_attach_and_secpath() {
        #[rustfmt::skip]
        let table = [
            // (what, probe, attach, secpath)
            ("6.18: everything", probe(Ok(()), true, Some(true)), TcAttach::Tcx, Secpath::Kfunc),
            ("6.2-6.5: kfunc, no TCX", probe(Err(libc::EINVAL), true, Some(true)), TcAttach::Clsact, Secpath::Kfunc),
            ("6.1", probe(Err(libc::EINVAL), false, Some(true)), TcAttach::Clsact, Secpath::Helper),
            ("6.1 without XFRM", probe(Err(libc::EINVAL), false, Some(false)), TcAttach::Clsact, Secpath::NoXfrm),
            ("helper probe failed", probe(Err(libc::EOPNOTSUPP), false, None), TcAttach::Clsact, Secpath::Assumed),
            ("ENOTSUPP", probe(Err(524), false, None), TcAttach::Clsact, Secpath::Assumed),
            // not a missing attach type: TCX is tried and fails on its own
            ("no permission", probe(Err(libc::EPERM), true, None), TcAttach::Tcx, Secpath::Kfunc),
        ];
        for (what, p, attach, secpath) in table {
            let f = Features::from_probe(&p);
            assert_eq!((f.tc_attach, f.secpath), (attach, secpath), "{what}");
            assert_eq!(f.tcx_errno, p.tcx.err(), "{what}");
        }
    }

    /// The lines say what each kernel got and flag the fallbacks that cost
    /// something.
    #[test]
    fn lines_name_each_fallback() {
        let new = Features {
            csum_ipv6: true,
            fib_skip_neigh: true,
            fib_mark: true,
            ..Features::from_probe(&probe(Ok(()), true, Some(true)))
        };
        let old = Features::from_probe(&probe(Err(libc::EINVAL), false, Some(true)));
        let get = |f: &Features, n: &str| f.lines().into_iter().find(|l| l.name == n).unwrap();
        let names: Vec<String> = new.lines().into_iter().map(|l| l.name).collect();
        assert_eq!(
            names,
            ["tc_attach", "secpath", "csum_partial", "csum_ipv6", "fib_skip_neigh", "fib_mark", "keepalive"]
        );
        assert!(new.lines().iter().all(|l| !l.degraded), "{:?}", new.lines());
        let t = get(&old, "tc_attach");
        assert_eq!((t.value.as_str(), t.degraded), ("clsact", true));
        assert!(t.detail.contains("Invalid argument (errno 22)") && t.detail.contains("cls_bpf"), "{}", t.detail);
        assert_eq!(get(&old, "secpath").value, "helper");
        let c = get(&old, "csum_partial");
        assert!(c.degraded && c.detail.contains("pppoe_tc_offload"), "{c:?}");
        assert_eq!((get(&old, "fib_skip_neigh").value.as_str(), get(&old, "fib_mark").value.as_str()), ("no", "no"));
        let a = Features::from_probe(&probe(Err(libc::EINVAL), false, None));
        assert!(get(&a, "secpath").detail.contains("TC forwards nothing"));
        // Keepalive: the fallbacks that cost per connection say so; the
        // one the operator chose is no degradation.
        for (k, value, degraded) in [
            (Keepalive::FastPath, "fast_path", false),
            (Keepalive::Chosen, "netlink", false),
            (Keepalive::NoKfuncs, "netlink", true),
            (Keepalive::Refused, "netlink", true),
        ] {
            let line = get(&Features { keepalive: k, ..new }, "keepalive");
            assert_eq!((line.value.as_str(), line.degraded), (value, degraded), "{k:?}");
        }
    }
}
