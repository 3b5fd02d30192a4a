//! Gathering: everything `check` looks at, read and never changed. It loads
//! libbpf's probe programs and the fast path itself (as `run` would, to
//! learn what this kernel gives it), each closed at once; nothing is
//! attached.
//!
//! Everything is read in the calling thread's network namespace: per-netns
//! proc files through /proc/thread-self/net and /proc/sys/net (both follow the
//! thread), interfaces through rtnetlink, ioctl and BPF queries, and spawned
//! `tc`/`nft` (children inherit the thread's namespace). /sys/class/net is
//! avoided: it shows the namespace sysfs was mounted in.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::host::{self, sysctl, sysctl_u32};
use crate::routes::link::{self, LinkInfo, LinkTable};

/// Host facts; `None` means "could not be read".
#[derive(Debug, Clone)]
pub(super) struct HostFacts {
    pub cap_eff: Option<u64>,
    /// Result of loading a trivial XDP program: Ok, or the errno.
    pub bpf_load: Result<(), i32>,
    pub jit_enable: Option<u32>,
    /// CONFIG_BPF_JIT_ALWAYS_ON from the kernel config (None: no config found).
    pub jit_always_on: Option<bool>,
    pub btf_vmlinux: bool,
    pub kernel_release: String,
    /// Each conntrack kfunc and whether kernel BTF names it (None: BTF unreadable).
    pub kfuncs: Option<Vec<(&'static str, bool)>>,
    /// Where nf_flow_table was seen, if anywhere.
    pub flowtable: Option<String>,
    pub conntrack: bool,
    pub ct_events: Option<u32>,
    pub ct_acct: Option<u32>,
    pub nft_version: Option<String>,
    pub ipv4_forward: Option<u32>,
    pub ipv6_forward: Option<u32>,
    /// Why the interfaces could not be listed (the rtnetlink dump failed).
    pub links_unreadable: Option<String>,
    /// The `ip rule` tables, judged as the engine judges them.
    pub rules: crate::routes::rules::PolicyRules,
    /// The xfrm policies, as the engine reads them.
    pub xfrm: crate::xfrm::Spd,
    /// What the kernel was asked before the fast path is built (TCX,
    /// bpf_cast_to_kern_ctx, bpf_skb_get_xfrm_state).
    pub probe: crate::dataplane::Probe,
    /// The fast path loaded (not attached) as `run` loads it: what it got,
    /// or why it did not load (the error names the missing feature).
    pub fastpath: Result<crate::dataplane::Features, String>,
    /// What `run` sizes its flow table from when `--max-flows` is not given.
    pub memory: crate::settings::capacity::MemoryFacts,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ProgRef {
    pub id: u32,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TcProg {
    /// Attached through TCX (multi-program, ordered; ours is appended last).
    Tcx(ProgRef),
    /// A filter under the legacy clsact/ingress qdisc (runs after all TCX programs).
    Legacy { kind: String, prog: Option<ProgRef> },
}

/// The Ethernet device beneath a VLAN or ppp device, as XDP would run there.
#[derive(Debug, Clone)]
pub(super) struct Beneath {
    pub port: String,
    /// The device's headers there ("VLAN 7 + PPPoE 0x1a2b").
    pub headers: String,
    pub driver: String,
    pub xdp: link::XdpPortFacts,
    pub vlans: Vec<String>,
}

#[derive(Debug, Clone)]
pub(super) struct IfaceFacts {
    pub name: String,
    /// Err: why it cannot be looked at ("IF does not exist in this network
    /// namespace", or why the links were not readable).
    pub link: Result<LinkInfo, String>,
    /// What XDP on it would meet: whether it takes XDP redirects (a
    /// veth's peer, read where it is; the driver's xdp-features), how VLAN
    /// tags reach it (`policy::xdp`).
    pub xdp: link::XdpPortFacts,
    /// VLAN devices stacked on it, by name.
    pub vlans: Vec<String>,
    /// A VLAN or ppp device: the Ethernet device XDP would serve it from
    /// (`Topology::beneath`), or why there is none.
    pub beneath: Option<Result<Beneath, String>>,
    pub xdp_prog: Option<ProgRef>,
    pub tc_ingress: Vec<TcProg>,
    /// cls_bpf filters of nft-offload's own programs (a running engine's
    /// where there is no TCX, or ones a killed engine left).
    pub own_filters: Vec<crate::dataplane::tc_legacy::OwnFilter>,
    /// What a fast-path redirect would skip on it (read as for TC mode;
    /// the findings apply the mode).
    pub hooks: crate::hooks::DeviceHooks,
    /// What it is and what it stands on (`topology::Topology::describe`);
    /// None when the topology could not be read.
    pub topology: Option<String>,
}

/// What the fast path's keepalive calls (bpf/keepalive.h).
pub(super) const KFUNCS: [&str; 5] =
    ["bpf_skb_ct_lookup", "bpf_xdp_ct_lookup", "bpf_ct_change_timeout", "bpf_ct_change_status", "bpf_ct_release"];

/// The host, and the interfaces named (none: every one but lo).
pub(super) fn gather(names: &[String]) -> (HostFacts, Vec<IfaceFacts>) {
    let mut host = gather_host();
    let table = LinkTable::dump().map_err(|e| format!("{e:#}"));
    host.links_unreadable = table.as_ref().err().cloned();
    let names: Vec<String> = match (&table, names.is_empty()) {
        (Ok(t), true) => t
            .iter()
            .map(|l| l.name.clone())
            .chain(t.undecoded().iter().map(|u| u.name.clone()))
            .filter(|n| n != "lo")
            .collect(),
        _ => names.to_vec(),
    };
    let topo = crate::topology::read().ok();
    let ports: Vec<crate::hooks::Port> = match &table {
        Ok(t) => names
            .iter()
            .filter_map(|n| t.by_name(n))
            .map(|l| crate::hooks::Port {
                ifindex: l.ifindex,
                name: l.name.clone(),
                xdp: false,
                bridge: bridge_of(t, l.master),
                uppers: topo.as_ref().map_or_else(Vec::new, |t| t.uppers_named(l.ifindex, &names)),
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    // nft-offload's own filters (a running engine's, or a killed one's:
    // the `own_filters` item reports them) are not hooks it would skip.
    let own = |p: &crate::hooks::tc::BpfProg| crate::dataplane::tc_legacy::OWN_TC_PROGS.contains(&p.name.as_str());
    let mut hooks = crate::hooks::read(&ports, &own);
    let ifaces = names
        .iter()
        .map(|n| match &table {
            Ok(t) => {
                let mut f = gather_iface(t, n);
                if let Some(l) = t.by_name(n) {
                    f.hooks = hooks.ports.remove(&l.ifindex).unwrap_or_default();
                    f.topology = topo.as_ref().map(|t| t.describe(l.ifindex));
                    f.beneath = topo.as_ref().and_then(|topo| beneath(t, topo, l.ifindex));
                }
                f
            }
            Err(e) => IfaceFacts::absent(n, format!("interfaces not readable: {e}")),
        })
        .collect();
    (host, ifaces)
}

/// What XDP would serve VLAN or ppp device `ifindex` from.
fn beneath(t: &LinkTable, topo: &crate::topology::Topology, ifindex: u32) -> Option<Result<Beneath, String>> {
    Some(topo.beneath(ifindex)?.map_err(|e| e.to_string()).and_then(|e| {
        let l = t.get(e.port).ok_or_else(|| format!("ifindex {} is not in the link table", e.port))?;
        let driver = link::driver(&l.name);
        Ok(Beneath {
            port: l.name.clone(),
            headers: e.encap.to_string(),
            xdp: link::XdpPortFacts::read(t, l, &driver, true),
            driver,
            vlans: topo.vlans_on(e.port),
        })
    }))
}

/// The name of the bridge `master` is, if it is one.
fn bridge_of(t: &LinkTable, master: Option<u32>) -> Option<String> {
    master.and_then(|m| t.get(m)).filter(|b| b.kind.as_deref() == Some("bridge")).map(|b| b.name.clone())
}

fn gather_host() -> HostFacts {
    let release = host::kernel_release();
    let config = kernel_config(&release);
    HostFacts {
        cap_eff: host::effective_caps(),
        bpf_load: probe_bpf_load(),
        jit_enable: sysctl_u32("net.core.bpf_jit_enable"),
        jit_always_on: config.as_deref().map(|c| config_enabled(c, "CONFIG_BPF_JIT_ALWAYS_ON")),
        btf_vmlinux: Path::new(host::BTF_VMLINUX).exists(),
        kfuncs: scan_kfuncs(),
        flowtable: find_flowtable(),
        conntrack: Path::new("/proc/thread-self/net/nf_conntrack").exists()
            || sysctl("net.netfilter.nf_conntrack_max").is_some(),
        ct_events: sysctl_u32("net.netfilter.nf_conntrack_events"),
        ct_acct: sysctl_u32("net.netfilter.nf_conntrack_acct"),
        nft_version: Command::new("nft")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
        ipv4_forward: sysctl_u32("net.ipv4.ip_forward"),
        ipv6_forward: sysctl_u32("net.ipv6.conf.all.forwarding"),
        kernel_release: release,
        links_unreadable: None,
        rules: crate::routes::rules::PolicyRules::read(),
        xfrm: crate::xfrm::read_spd(),
        probe: crate::dataplane::Probe::kernel(),
        fastpath: load_fastpath(),
        memory: host::memory_facts(),
    }
}

/// Load the fast path as `run` would (a small flow table; nothing is
/// attached, and it is closed at once), for what the kernel gives it.
fn load_fastpath() -> Result<crate::dataplane::Features, String> {
    crate::dataplane::Dataplane::load(16).map(|dp| *dp.features()).map_err(|e| {
        // The first line names the cause; the log's tail follows it.
        format!("{e:#}").lines().next().unwrap_or_default().to_string()
    })
}

/// libbpf's own feature probe: BPF_PROG_LOAD of `r0 = 0; exit` as XDP.
fn probe_bpf_load() -> Result<(), i32> {
    // SAFETY: no pointers in (opts must be NULL); returns 1 / 0 / -errno.
    let r = unsafe { libbpf_sys::libbpf_probe_bpf_prog_type(libbpf_sys::BPF_PROG_TYPE_XDP, std::ptr::null()) };
    // On 0 libbpf leaves the load's errno in place (it only closes a valid fd).
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    match r {
        1 => Ok(()),
        0 => Err(errno),
        e => Err(-e),
    }
}

/// The running kernel's build config, from /boot or /proc/config.gz.
fn kernel_config(release: &str) -> Option<String> {
    if let Ok(c) = fs::read_to_string(format!("/boot/config-{release}")) {
        return Some(c);
    }
    if !Path::new("/proc/config.gz").exists() {
        return None;
    }
    // No gzip crate in the tree; gzip(1) is on every distribution.
    let out = Command::new("gzip").args(["-dc", "/proc/config.gz"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn config_enabled(config: &str, key: &str) -> bool {
    config.lines().any(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')).is_some_and(|v| v == "y"))
}

/// Kfunc names in the kernel's BTF. Strings in the BTF string section are
/// NUL-separated, so splitting on NUL and comparing whole names is exact.
/// nf_conntrack built as a module carries its kfuncs in its own BTF.
fn scan_kfuncs() -> Option<Vec<(&'static str, bool)>> {
    let mut found = [false; KFUNCS.len()];
    let mut any = false;
    for path in [host::BTF_VMLINUX, "/sys/kernel/btf/nf_conntrack"] {
        let Ok(raw) = fs::read(path) else { continue };
        any = true;
        for s in raw.split(|b| *b == 0) {
            for (i, k) in KFUNCS.iter().enumerate() {
                found[i] |= s == k.as_bytes();
            }
        }
    }
    any.then(|| KFUNCS.iter().copied().zip(found).collect())
}

fn find_flowtable() -> Option<String> {
    if Path::new("/proc/thread-self/net/nf_flowtable").exists() {
        return Some("/proc/net/nf_flowtable".into());
    }
    if Path::new("/sys/module/nf_flow_table").exists() {
        return Some("module nf_flow_table loaded".into());
    }
    let syms = fs::read_to_string("/proc/kallsyms").ok()?;
    syms.lines()
        .any(|l| l.split_whitespace().nth(2) == Some("nf_flow_table_init"))
        .then(|| "nf_flow_table_init in /proc/kallsyms".into())
}

impl IfaceFacts {
    fn absent(name: &str, why: String) -> Self {
        IfaceFacts {
            name: name.into(),
            link: Err(why),
            xdp: Default::default(),
            vlans: Vec::new(),
            beneath: None,
            xdp_prog: None,
            tc_ingress: Vec::new(),
            own_filters: Vec::new(),
            hooks: Default::default(),
            topology: None,
        }
    }
}

fn gather_iface(table: &LinkTable, name: &str) -> IfaceFacts {
    let Some(l) = table.by_name(name) else { return IfaceFacts::absent(name, table.why_missing(name)) };
    let info = LinkInfo::new(l, link::driver(name));
    let xdp_prog = l.xdp.and_then(|x| x.id()).map(|id| ProgRef { id, name: prog_name(id) });
    let mut tc_ingress: Vec<TcProg> = tcx_ingress(l.ifindex).into_iter().map(TcProg::Tcx).collect();
    tc_ingress.extend(legacy_tc_ingress(name));
    IfaceFacts {
        name: name.into(),
        link: Ok(info),
        xdp: link::XdpPortFacts::read(table, l, &link::driver(name), true),
        beneath: None,
        vlans: table
            .iter()
            .filter(|v| {
                v.kind.as_deref() == Some("vlan")
                    && v.link.is_some_and(|r| r.ifindex == l.ifindex && r.netnsid.is_none())
            })
            .map(|v| v.name.clone())
            .collect(),
        xdp_prog,
        tc_ingress,
        own_filters: crate::dataplane::tc_legacy::own_filters(l.ifindex).unwrap_or_default(),
        hooks: Default::default(),
        topology: None,
    }
}

fn prog_name(id: u32) -> String {
    // SAFETY: fd from the kernel, closed below; info is a zeroed plain struct
    // whose size we pass in.
    unsafe {
        let fd = libbpf_sys::bpf_prog_get_fd_by_id(id);
        if fd < 0 {
            return String::new();
        }
        let mut info: libbpf_sys::bpf_prog_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
        let r = libbpf_sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len);
        libc::close(fd);
        if r != 0 {
            return String::new();
        }
        std::ffi::CStr::from_ptr(info.name.as_ptr()).to_string_lossy().into_owned()
    }
}

/// Programs on TCX ingress. BPF_PROG_QUERY resolves the ifindex in the
/// caller's namespace, so unlike walking all links (whose ifindex could be in
/// any namespace) the answer is exactly this interface's.
fn tcx_ingress(ifindex: u32) -> Vec<ProgRef> {
    let mut ids = [0u32; 64];
    let mut opts = libbpf_sys::bpf_prog_query_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_prog_query_opts>() as _,
        prog_ids: ids.as_mut_ptr(),
        ..Default::default()
    };
    opts.__bindgen_anon_1.count = ids.len() as u32;
    // SAFETY: prog_ids points at `count` u32s that outlive the call.
    let r = unsafe { libbpf_sys::bpf_prog_query_opts(ifindex as i32, libbpf_sys::BPF_TCX_INGRESS, &mut opts) };
    if r != 0 {
        return Vec::new(); // no TCX in this kernel (reported by the tcx item) or no permission
    }
    // SAFETY: both union members are the same u32.
    let n = unsafe { opts.__bindgen_anon_1.count } as usize;
    ids[..n.min(ids.len())].iter().map(|&id| ProgRef { id, name: prog_name(id) }).collect()
}

/// Filters under a legacy clsact/ingress qdisc, from `tc -j`.
fn legacy_tc_ingress(name: &str) -> Vec<TcProg> {
    let json = |args: &[&str]| -> Option<serde_json::Value> {
        let out = Command::new("tc").args(args).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    let has_ingress_qdisc = json(&["-j", "qdisc", "show", "dev", name])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .any(|q| matches!(q.get("kind").and_then(|k| k.as_str()), Some("clsact" | "ingress")));
    if !has_ingress_qdisc {
        return Vec::new();
    }
    let filters =
        json(&["-j", "filter", "show", "dev", name, "ingress"]).and_then(|v| v.as_array().cloned()).unwrap_or_default();
    // tc prints a header entry per priority without "options"; the filter
    // itself is the entry with options.
    filters
        .iter()
        .filter(|f| f.get("options").is_some())
        .map(|f| {
            let kind = f.get("kind").and_then(|k| k.as_str()).unwrap_or("?").to_string();
            let prog = f.pointer("/options/prog").and_then(|p| {
                Some(ProgRef {
                    id: p.get("id")?.as_u64()? as u32,
                    name: p.get("name").and_then(|n| n.as_str()).unwrap_or("").to_string(),
                })
            });
            TcProg::Legacy { kind, prog }
        })
        .collect()
}
