//! Why the fast path did not load, read from libbpf's log (its own lines and
//! the verifier's): the kernel feature that is missing, named, with the
//! kernel or config that has it. libbpf's error is only an errno ("Invalid
//! argument"); the cause is a line somewhere in hundreds.

/// Kfuncs the fast path may call, and the first kernel that has each.
const KFUNCS: &[(&str, &str)] = &[
    ("bpf_cast_to_kern_ctx", "Linux >= 6.2"),
    ("bpf_rdonly_cast", "Linux >= 6.2"),
    ("bpf_xdp_ct_lookup", "Linux >= 6.0 with CONFIG_NF_CONNTRACK"),
    ("bpf_skb_ct_lookup", "Linux >= 6.0 with CONFIG_NF_CONNTRACK"),
    ("bpf_ct_change_timeout", "Linux >= 6.0 with CONFIG_NF_CONNTRACK"),
    ("bpf_ct_release", "Linux >= 6.0 with CONFIG_NF_CONNTRACK"),
];

/// Helpers the fast path calls, and what a kernel needs to offer them.
const HELPERS: &[(&str, &str)] = &[
    ("bpf_skb_get_xfrm_state", "CONFIG_XFRM"),
    ("bpf_ktime_get_coarse_ns", "Linux >= 5.11"),
    ("bpf_ringbuf_output", "Linux >= 5.8"),
    ("bpf_fib_lookup", "Linux >= 4.18 with CONFIG_INET"),
    ("bpf_skb_adjust_room", "Linux >= 4.13"),
    ("bpf_redirect_map", "Linux >= 4.14"),
    ("bpf_csum_update", "Linux >= 4.9"),
    ("bpf_skb_pull_data", "Linux >= 4.9"),
    ("bpf_skb_change_head", "Linux >= 4.10"),
    ("bpf_xdp_adjust_head", "Linux >= 4.10"),
];

/// Maps of the fast path whose type an old kernel may not have.
const MAPS: &[(&str, &str)] = &[
    ("fo_wake", "BPF_MAP_TYPE_RINGBUF (Linux >= 5.8)"),
    ("fo_tx_ports", "BPF_MAP_TYPE_DEVMAP_HASH (Linux >= 5.4)"),
    ("fo_dormant", "BPF_MAP_TYPE_HASH with BPF_F_NO_PREALLOC"),
];

/// libbpf turns an unresolved weak kfunc call into a call of this helper
/// number plus the extern's index (POISON_CALL_KFUNC_BASE, libbpf.c), and a
/// failed CO-RE relocation into this one (0xbad2310).
const POISON_KFUNC: u64 = 2_002_000_000;
const POISON_CORE: u64 = 195_896_080;

fn quoted(line: &str) -> Option<&str> {
    let start = line.find('\'')? + 1;
    let len = line[start..].find('\'')?;
    Some(&line[start..start + len])
}

fn needs(table: &[(&str, &'static str)], name: &str) -> Option<&'static str> {
    table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// The program whose load failed ("prog 'fo_tc': BPF program load failed").
fn failed_prog(log: &[String]) -> Option<&str> {
    log.iter().find(|l| l.contains("BPF program load failed") || l.contains("failed to load program")).and_then(|l| {
        let at = l.find("prog '")? + 6;
        Some(&l[at..at + l[at..].find('\'')?])
    })
}

/// The missing kernel feature, when the log names one: "kernel lacks X
/// (needs Linux >= N or CONFIG_Y)". None: the log says nothing known
/// (the caller shows its last lines).
pub fn explain(log: &[String]) -> Option<String> {
    let prog = failed_prog(log).map(|p| format!(" (program {p})")).unwrap_or_default();
    for l in log {
        // libbpf resolving externs against vmlinux and module BTF.
        if l.contains("not found in kernel or module BTFs") || l.contains("not found in kernel BTF") {
            let name = quoted(l).unwrap_or("?");
            let need = needs(KFUNCS, name).unwrap_or("a newer kernel");
            let what = if l.contains("func ksym") { "kfunc" } else { "kernel symbol" };
            return Some(format!("kernel lacks {what} {name} (needs {need})"));
        }
        if l.contains("failed to find valid kernel BTF") || l.contains("Error loading vmlinux BTF") {
            return Some(
                "kernel lacks BTF (/sys/kernel/btf/vmlinux: needs CONFIG_DEBUG_INFO_BTF=y): the fast path's CO-RE \
                 relocations and kfuncs need it"
                    .into(),
            );
        }
        // "map 'fo_wake': failed to create: Invalid argument(-22)"
        if l.contains("failed to create") && l.contains("map '") {
            let name = quoted(l).unwrap_or("?");
            if let Some(ty) = needs(MAPS, name) {
                return Some(format!("kernel lacks map type {ty} for map {name}"));
            }
            return Some(format!("kernel refused to create map {name}: {}", l.trim()));
        }
    }
    // The verifier's own words.
    for l in log {
        let l = l.trim_start_matches("libbpf: ").trim();
        if let Some(rest) = l.strip_prefix("unknown func ").or_else(|| l.split("cannot use helper ").nth(1)) {
            let name = rest.split('#').next().unwrap_or(rest);
            let need = needs(HELPERS, name).unwrap_or("a newer kernel");
            return Some(format!("kernel lacks helper {name} for this program type{prog} (needs {need})"));
        }
        if let Some(rest) = l.strip_prefix("invalid func unknown#") {
            let n: u64 = rest.trim().parse().unwrap_or(0);
            if (POISON_KFUNC..POISON_KFUNC + 100_000).contains(&n) {
                return Some(format!(
                    "a kfunc this kernel lacks is called where the program did not guard it{prog} (libbpf: \
                     unresolved weak kfunc reached): a bug of nft-offload, please report it with this kernel's \
                     version"
                ));
            }
            if n == POISON_CORE {
                return Some(format!(
                    "kernel BTF lacks a type or field the fast path reads{prog} (a failed CO-RE relocation)"
                ));
            }
            return Some(format!("kernel lacks helper number {n}{prog} (a newer kernel has it)"));
        }
        if let Some(rest) = l.strip_prefix("calling kernel function ") {
            let name = rest.split_whitespace().next().unwrap_or("?");
            return Some(format!("kernel does not allow kfunc {name} in this program type{prog}"));
        }
        if l.contains("BPF program is too large") || l.contains("too complex") {
            return Some(format!("this kernel's verifier gives up on the program as too complex{prog}: {l}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|s| s.to_string()).collect()
    }

    /// One row per cause: libbpf's and the verifier's lines as 6.1 and
    /// older kernels print them, and what the error then says.
    #[test]
    fn the_missing_feature_is_named() {
        #[rustfmt::skip]
        let table: &[(&[&str], Option<&str>)] = &[
            // Debian 12's 6.1 with a strong kfunc reference
            (&["libbpf: loaded kernel BTF from '/sys/kernel/btf/vmlinux'",
               "libbpf: extern (func ksym) 'bpf_cast_to_kern_ctx': not found in kernel or module BTFs",
               "libbpf: failed to load BPF skeleton 'fastpath_bpf': -EINVAL"],
             Some("kernel lacks kfunc bpf_cast_to_kern_ctx (needs Linux >= 6.2)")),
            (&["libbpf: extern (func ksym) 'bpf_ct_change_timeout': not found in kernel or module BTFs"],
             Some("kernel lacks kfunc bpf_ct_change_timeout (needs Linux >= 6.0 with CONFIG_NF_CONNTRACK)")),
            // a helper the kernel was built without
            (&["libbpf: prog 'fo_tc': BPF program load failed: Invalid argument",
               "libbpf: prog 'fo_tc': -- BEGIN PROG LOAD LOG --",
               "612: (85) call bpf_skb_get_xfrm_state#66",
               "unknown func bpf_skb_get_xfrm_state#66"],
             Some("kernel lacks helper bpf_skb_get_xfrm_state for this program type (program fo_tc) (needs CONFIG_XFRM)")),
            (&["libbpf: prog 'fo_xdp': BPF program load failed: Invalid argument",
               "program of this type cannot use helper bpf_ktime_get_coarse_ns#160"],
             Some("kernel lacks helper bpf_ktime_get_coarse_ns for this program type (program fo_xdp) (needs Linux >= 5.11)")),
            // a helper newer than the kernel's whole list
            (&["libbpf: prog 'fo_tc': BPF program load failed: Invalid argument", "invalid func unknown#212"],
             Some("kernel lacks helper number 212 (program fo_tc) (a newer kernel has it)")),
            // our own guard missing: libbpf's poisoned call reached
            (&["libbpf: prog 'fo_tc': BPF program load failed: Invalid argument", "invalid func unknown#2002000001"],
             Some("a kfunc this kernel lacks is called where the program did not guard it (program fo_tc)")),
            (&["libbpf: prog 'fo_tc': BPF program load failed: Invalid argument", "invalid func unknown#195896080"],
             Some("kernel BTF lacks a type or field the fast path reads (program fo_tc)")),
            (&["libbpf: map 'fo_wake': failed to create: Invalid argument(-22)"],
             Some("kernel lacks map type BPF_MAP_TYPE_RINGBUF (Linux >= 5.8) for map fo_wake")),
            (&["libbpf: failed to find valid kernel BTF"], Some("kernel lacks BTF (/sys/kernel/btf/vmlinux")),
            (&["libbpf: prog 'fo_tc': BPF program load failed: Invalid argument",
               "calling kernel function bpf_cast_to_kern_ctx is not allowed"],
             Some("kernel does not allow kfunc bpf_cast_to_kern_ctx in this program type (program fo_tc)")),
            (&["BPF program is too large. Processed 1000001 insn"], Some("this kernel's verifier gives up on the program as too complex")),
            // nothing known: the caller shows the log
            (&["libbpf: prog 'fo_tc': BPF program load failed: Permission denied", "R1 invalid mem access 'scalar'"],
             None),
            (&[], None),
        ];
        for (lines, want) in table {
            let got = explain(&log(lines));
            match (want, &got) {
                (Some(w), Some(g)) => assert!(g.starts_with(w), "{lines:?}:\n got {g}\nwant {w}"),
                (None, None) => {}
                _ => panic!("{lines:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
