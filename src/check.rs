//! `nft-offload check`: what this host supports, and per interface which mode
//! `run` would pick, why, and what could get in its way, with remedies.
//!
//! Two halves: `gather_host` / `gather_iface` read facts (they never attach,
//! load into an interface or change anything), `judge` turns facts into
//! findings and is pure, so every verdict is unit-tested without root.
//!
//! Everything is read in the calling thread's network namespace: per-netns
//! proc files through /proc/thread-self/net and /proc/sys/net (both follow the
//! thread), interfaces through ioctl/netlink and spawned `ip`/`tc`/`ethtool`
//! (children inherit the thread's namespace). /sys/class/net is avoided: it
//! shows the namespace sysfs was mounted in, not necessarily ours.

use std::fs;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::dataplane::{self, Mode};
use crate::policy::{choose_modes, ModeChoice};
use crate::routes::link::{self, LinkInfo};

/// What to check: the interfaces `run` would get (empty = every interface in
/// this namespace except lo) and the mode it would be asked for.
#[derive(Debug, Clone)]
pub struct CheckOpts {
    pub ifaces: Vec<String>,
    pub mode: ModeChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable identifier ("bpf_syscall", "xdp_program", ...): scripts match on it.
    pub item: String,
    pub status: Status,
    pub detail: String,
    /// What to do about it; set whenever status is not ok.
    pub remedy: Option<String>,
}

impl Finding {
    fn ok(item: &str, detail: impl Into<String>) -> Self {
        Finding { item: item.into(), status: Status::Ok, detail: detail.into(), remedy: None }
    }
    fn warn(item: &str, detail: impl Into<String>, remedy: impl Into<String>) -> Self {
        Finding { item: item.into(), status: Status::Warn, detail: detail.into(), remedy: Some(remedy.into()) }
    }
    fn fail(item: &str, detail: impl Into<String>, remedy: impl Into<String>) -> Self {
        Finding { item: item.into(), status: Status::Fail, detail: detail.into(), remedy: Some(remedy.into()) }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct IfaceReport {
    pub name: String,
    pub exists: bool,
    pub driver: String,
    /// What `run` would attach in (None: the interface does not exist).
    pub mode: Option<Mode>,
    pub reason: String,
    /// Whether the driver has native XDP (None: not known to nft-offload).
    pub native_xdp: Option<bool>,
    /// veth only: whether XDP frames redirected into it arrive, i.e. whether
    /// its peer has NAPI (GRO on or an XDP program). None: unknown / not veth.
    pub xdp_redirect_target: Option<bool>,
    pub egress_qdisc: String,
    pub shaper: bool,
    /// Id of an XDP program already attached (nft-offload's own included).
    pub xdp_prog_id: Option<u32>,
    /// Other programs on TC ingress, one description each.
    pub tc_ingress_programs: Vec<String>,
    pub findings: Vec<Finding>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub host: Vec<Finding>,
    pub interfaces: Vec<IfaceReport>,
    /// No host check failed and at least one interface is usable.
    pub offload_possible: bool,
}

/// Gather facts from this host and judge them. Changes nothing: the only
/// load is libbpf's probe program, closed at once; nothing is attached.
pub fn run(opts: &CheckOpts) -> CheckReport {
    let names = if opts.ifaces.is_empty() { list_ifaces() } else { opts.ifaces.clone() };
    let ifaces: Vec<IfaceFacts> = names.iter().map(|n| gather_iface(n)).collect();
    judge(&gather_host(), &ifaces, opts.mode)
}

impl CheckReport {
    /// Aligned text: one line per finding (`STATUS item detail`), the remedy
    /// on an indented line under it, host first, then each interface.
    pub fn render(&self) -> String {
        let width = self
            .host
            .iter()
            .chain(self.interfaces.iter().flat_map(|i| &i.findings))
            .map(|f| f.item.len())
            .max()
            .unwrap_or(0);
        let line = |o: &mut String, f: &Finding| {
            *o += &format!("  {:<4}  {:<width$}  {}\n", f.status.label(), f.item, f.detail);
            if let Some(r) = &f.remedy {
                *o += &format!("  {:<4}  {:<width$}  remedy: {r}\n", "", "");
            }
        };
        let mut o = String::from("Host:\n");
        for f in &self.host {
            line(&mut o, f);
        }
        for i in &self.interfaces {
            o += &match (i.exists, i.mode) {
                (true, Some(m)) => format!(
                    "Interface {} (driver {}, mode {}):\n",
                    i.name,
                    if i.driver.is_empty() { "?" } else { &i.driver },
                    m.as_str()
                ),
                _ => format!("Interface {}:\n", i.name),
            };
            for f in &i.findings {
                line(&mut o, f);
            }
        }
        let (fails, warns) =
            self.host.iter().chain(self.interfaces.iter().flat_map(|i| &i.findings)).fold((0, 0), |(f, w), x| {
                (f + (x.status == Status::Fail) as u32, w + (x.status == Status::Warn) as u32)
            });
        o += &format!(
            "{}: {fails} failed, {warns} warnings\n",
            if self.offload_possible { "Offload possible" } else { "Offload NOT possible" }
        );
        o
    }

    /// 0 when offload can work here (warnings allowed, and interfaces that
    /// fail on their own do not count as long as one usable interface is
    /// left); 1 when it cannot work at all: a host check failed or no named
    /// interface is usable.
    pub fn exit_code(&self) -> i32 {
        if self.offload_possible {
            0
        } else {
            1
        }
    }
}

// ---------------------------------------------------------------- facts

/// Host facts, everything `judge` needs; `None` means "could not be read".
#[derive(Debug, Clone)]
struct HostFacts {
    cap_eff: Option<u64>,
    /// Result of loading a trivial XDP program: Ok, or the errno.
    bpf_load: Result<(), i32>,
    jit_enable: Option<u32>,
    /// CONFIG_BPF_JIT_ALWAYS_ON from the kernel config (None: no config found).
    jit_always_on: Option<bool>,
    btf_vmlinux: bool,
    kernel_release: String,
    /// Each conntrack kfunc and whether kernel BTF names it (None: BTF unreadable).
    kfuncs: Option<Vec<(&'static str, bool)>>,
    /// Where nf_flow_table was seen, if anywhere.
    flowtable: Option<String>,
    conntrack: bool,
    ct_events: Option<u32>,
    ct_acct: Option<u32>,
    nft_version: Option<String>,
    ipv4_forward: Option<u32>,
    ipv6_forward: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ProgRef {
    id: u32,
    name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TcProg {
    /// Attached through TCX (multi-program, ordered; ours is appended last).
    Tcx(ProgRef),
    /// A filter under the legacy clsact/ingress qdisc (runs after all TCX programs).
    Legacy { kind: String, prog: Option<ProgRef> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Peer {
    /// veth peer in another network namespace: its NAPI state is not visible here.
    OtherNetns,
    /// Could not be determined (why).
    Unknown(String),
    Local {
        name: String,
        gro: Option<bool>,
        xdp_prog: Option<u32>,
    },
}

#[derive(Debug, Clone)]
struct IfaceFacts {
    name: String,
    /// None: no such interface in this namespace.
    link: Option<LinkInfo>,
    /// Root qdisc per rtnetlink, for when tc lists none (see IpLink::qdisc).
    ip_qdisc: Option<String>,
    /// veth only.
    peer: Option<Peer>,
    xdp_prog: Option<ProgRef>,
    tc_ingress: Vec<TcProg>,
}

pub(crate) const CAP_NET_ADMIN: u32 = 12;
pub(crate) const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
pub(crate) const CAP_BPF: u32 = 39;

/// Effective capabilities of the calling thread (they are per thread).
pub(crate) fn effective_caps() -> Option<u64> {
    fs::read_to_string("/proc/thread-self/status").ok().and_then(|s| parse_cap_eff(&s))
}

const KFUNCS: [&str; 2] = ["bpf_xdp_ct_lookup", "bpf_ct_change_timeout"];

/// nft-offload's own program names (bpf/fastpath.bpf.c): a previous or
/// running `nft-offload run` is reported as such, not as a stranger.
const OWN_PROGS: [&str; 2] = ["fo_xdp", "fo_tc"];

fn read_trim(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn read_u32(path: &str) -> Option<u32> {
    read_trim(path)?.parse().ok()
}

fn gather_host() -> HostFacts {
    let release = kernel_release();
    let config = kernel_config(&release);
    HostFacts {
        // thread-self: capabilities are per thread.
        cap_eff: effective_caps(),
        bpf_load: probe_bpf_load(),
        jit_enable: read_u32("/proc/sys/net/core/bpf_jit_enable"),
        jit_always_on: config.as_deref().map(|c| config_enabled(c, "CONFIG_BPF_JIT_ALWAYS_ON")),
        btf_vmlinux: Path::new("/sys/kernel/btf/vmlinux").exists(),
        kfuncs: scan_kfuncs(),
        flowtable: find_flowtable(),
        conntrack: Path::new("/proc/thread-self/net/nf_conntrack").exists()
            || Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists(),
        ct_events: read_u32("/proc/sys/net/netfilter/nf_conntrack_events"),
        ct_acct: read_u32("/proc/sys/net/netfilter/nf_conntrack_acct"),
        nft_version: Command::new("nft")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
        ipv4_forward: read_u32("/proc/sys/net/ipv4/ip_forward"),
        ipv6_forward: read_u32("/proc/sys/net/ipv6/conf/all/forwarding"),
        kernel_release: release,
    }
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
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

fn kernel_release() -> String {
    // SAFETY: uname fills a zeroed struct; release is NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return String::new();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr()).to_string_lossy().into_owned()
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

fn config_enabled(config: &str, key: &str) -> bool {
    config.lines().any(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')).is_some_and(|v| v == "y"))
}

/// Kfunc names in the kernel's BTF. Strings in the BTF string section are
/// NUL-separated, so splitting on NUL and comparing whole names is exact.
/// nf_conntrack built as a module carries its kfuncs in its own BTF.
fn scan_kfuncs() -> Option<Vec<(&'static str, bool)>> {
    let mut found = [false; KFUNCS.len()];
    let mut any = false;
    for path in ["/sys/kernel/btf/vmlinux", "/sys/kernel/btf/nf_conntrack"] {
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

/// Every interface in this namespace except lo, in ifindex order.
fn list_ifaces() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry (or
    // NULL), freed with if_freenameindex; glibc asks netlink in our netns.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Vec::new();
        }
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    out.sort();
    out.into_iter().map(|(_, n)| n).filter(|n| n != "lo").collect()
}

/// What `ip -j link show dev IF` says (netlink, so right in any namespace).
#[derive(Debug, Default)]
struct IpLink {
    up: Option<bool>,
    mtu: Option<u32>,
    /// Root qdisc as rtnetlink reports it: "noop" on a down interface,
    /// which `tc qdisc show` does not list.
    qdisc: Option<String>,
    /// veth peer (IFLA_LINK): by name when it is in this namespace, else
    /// only an index valid in the namespace `link_netnsid` names.
    link_name: Option<String>,
    link_index: Option<u32>,
    link_netnsid: bool,
}

fn ip_link(name: &str) -> Option<IpLink> {
    let out = Command::new("ip").args(["-j", "link", "show", "dev", name]).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let l = v.as_array()?.first()?;
    let flags: Vec<&str> =
        l.get("flags").and_then(|f| f.as_array()).map(|a| a.iter().filter_map(|x| x.as_str()).collect())?;
    Some(IpLink {
        up: Some(flags.contains(&"UP") && flags.contains(&"LOWER_UP")),
        mtu: l.get("mtu").and_then(|m| m.as_u64()).map(|m| m as u32),
        qdisc: l.get("qdisc").and_then(|q| q.as_str()).map(String::from),
        link_name: l.get("link").and_then(|n| n.as_str()).map(String::from),
        link_index: l.get("link_index").and_then(|i| i.as_u64()).map(|i| i as u32),
        link_netnsid: l.get("link_netnsid").is_some(),
    })
}

fn gro_on(name: &str) -> Option<bool> {
    let out = Command::new("ethtool").args(["-k", name]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.lines().find_map(|l| l.trim().strip_prefix("generic-receive-offload:"))?;
    Some(v.trim().starts_with("on"))
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

fn gather_iface(name: &str) -> IfaceFacts {
    let Ok(mut l) = link::info(name) else {
        return IfaceFacts {
            name: name.into(),
            link: None,
            ip_qdisc: None,
            peer: None,
            xdp_prog: None,
            tc_ingress: Vec::new(),
        };
    };
    // link::info reads up/mtu from sysfs, which may belong to another
    // namespace (a thread that unshared, no sysfs remount): netlink wins.
    let ipl = ip_link(name);
    if let Some(ipl) = &ipl {
        l.up = ipl.up.unwrap_or(l.up);
        l.mtu = ipl.mtu.unwrap_or(l.mtu);
    }
    let peer = (l.driver == "veth").then(|| match &ipl {
        None => Peer::Unknown("`ip -j link` failed (iproute2 missing?)".into()),
        Some(i) if i.link_netnsid => Peer::OtherNetns,
        Some(i) => {
            // iproute2 names a same-namespace peer and gives a bare index otherwise.
            let local = match (&i.link_name, i.link_index) {
                (Some(n), _) => link::ifindex(n).map(|idx| (n.clone(), idx)),
                (None, Some(idx)) => link::ifname(idx).map(|n| (n, idx)),
                (None, None) => None,
            };
            match local {
                Some((p, idx)) => Peer::Local { gro: gro_on(&p), xdp_prog: dataplane::xdp_prog_id(idx), name: p },
                None => Peer::Unknown("peer not found in this namespace".into()),
            }
        }
    });
    let xdp_prog = dataplane::xdp_prog_id(l.ifindex).map(|id| ProgRef { id, name: prog_name(id) });
    let mut tc_ingress: Vec<TcProg> = tcx_ingress(l.ifindex).into_iter().map(TcProg::Tcx).collect();
    tc_ingress.extend(legacy_tc_ingress(name));
    let ip_qdisc = ipl.and_then(|i| i.qdisc);
    IfaceFacts { name: name.into(), link: Some(l), ip_qdisc, peer, xdp_prog, tc_ingress }
}

// ---------------------------------------------------------------- verdicts

fn judge(host: &HostFacts, ifaces: &[IfaceFacts], requested: ModeChoice) -> CheckReport {
    // Modes are chosen over the existing interfaces only, exactly as `run`
    // would choose them (one TC interface makes all of them TC in auto).
    let existing: Vec<LinkInfo> = ifaces.iter().filter_map(|i| i.link.clone()).collect();
    let mut decisions = choose_modes(&existing, requested).into_iter();
    let interfaces: Vec<IfaceReport> = ifaces
        .iter()
        .map(|f| {
            let d = f.link.as_ref().and_then(|_| decisions.next());
            judge_iface(f, d.map(|d| (d.mode, d.reason)))
        })
        .collect();
    // No interfaces known: TC may well be needed, judge TCX as if it were.
    let tc_needed = existing.is_empty() || interfaces.iter().any(|i| i.mode == Some(Mode::Tc));
    let mut hostf = judge_host(host, tc_needed);
    hostf.push(judge_usable(&interfaces));
    let offload_possible = hostf.iter().all(|f| f.status != Status::Fail);
    CheckReport { host: hostf, interfaces, offload_possible }
}

fn judge_usable(interfaces: &[IfaceReport]) -> Finding {
    let usable: Vec<&str> = interfaces
        .iter()
        .filter(|i| i.exists && i.findings.iter().all(|f| f.status != Status::Fail))
        .map(|i| i.name.as_str())
        .collect();
    match usable.len() {
        0 => Finding::fail(
            "interfaces",
            "no usable interface",
            "name existing interfaces (`ip link`), run check in the router's namespace \
             (`ip netns exec NS nft-offload check`), and fix the interfaces' failures below",
        ),
        1 => Finding::warn(
            "interfaces",
            format!("only one usable interface ({}): offload forwards between interfaces", usable[0]),
            "forwarding between two ports needs both; one interface only serves a one-armed router",
        ),
        _ => Finding::ok("interfaces", format!("{} usable: {}", usable.len(), usable.join(", "))),
    }
}

fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn errno_name(e: i32) -> String {
    format!("{} (errno {e})", std::io::Error::from_raw_os_error(e))
}

fn judge_host(h: &HostFacts, tc_needed: bool) -> Vec<Finding> {
    let mut v = Vec::new();

    v.push(match h.cap_eff {
        None => Finding::warn(
            "privileges",
            "could not read CapEff from /proc/thread-self/status",
            "run as root (or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)",
        ),
        Some(caps) => {
            let has = |c: u32| caps & (1u64 << c) != 0;
            let named = [
                (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
                (CAP_BPF, "CAP_BPF"),
                (CAP_PERFMON, "CAP_PERFMON"),
                (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
            ]
            .into_iter()
            .filter(|(c, _)| has(*c))
            .map(|(_, n)| n)
            .collect::<Vec<_>>();
            let mut missing = Vec::new();
            if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
                missing.push("CAP_BPF (or CAP_SYS_ADMIN): loading BPF programs");
            }
            if !has(CAP_NET_ADMIN) {
                missing.push("CAP_NET_ADMIN: attaching to interfaces, ctnetlink");
            }
            if missing.is_empty() {
                Finding::ok("privileges", format!("effective: {}", named.join(", ")))
            } else {
                Finding::fail(
                    "privileges",
                    format!("missing {}", missing.join("; ")),
                    "run as root (or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)",
                )
            }
        }
    });

    v.push(match h.bpf_load {
        Ok(()) => Finding::ok("bpf_syscall", "the kernel loads a trivial XDP program (libbpf probe)"),
        Err(e) if e == libc::ENOSYS => Finding::fail(
            "bpf_syscall",
            "bpf() is not implemented by this kernel",
            "a kernel built with CONFIG_BPF_SYSCALL=y",
        ),
        Err(e) if e == libc::EPERM || e == libc::EACCES => Finding::fail(
            "bpf_syscall",
            format!("loading a trivial XDP program was refused: {}", errno_name(e)),
            "run as root (see privileges); if root is refused, a security module or lockdown \
             (kernel.unprivileged_bpf_disabled does not apply to root) denies bpf()",
        ),
        Err(e) => Finding::fail(
            "bpf_syscall",
            format!("loading a trivial XDP program failed: {}", errno_name(e)),
            "a kernel with CONFIG_BPF_SYSCALL=y and XDP; see dmesg",
        ),
    });

    let jit_remedy = "sysctl -w net.core.bpf_jit_enable=1";
    v.push(match (h.jit_enable, h.jit_always_on) {
        (Some(1), _) => Finding::ok("bpf_jit", "net.core.bpf_jit_enable = 1"),
        (Some(2), _) => Finding::ok("bpf_jit", "net.core.bpf_jit_enable = 2 (on, with debug output to the log)"),
        (_, Some(true)) => Finding::ok("bpf_jit", "CONFIG_BPF_JIT_ALWAYS_ON=y: programs are always JIT-compiled"),
        (Some(n), _) => Finding::warn(
            "bpf_jit",
            format!("net.core.bpf_jit_enable = {n}: programs run in the interpreter, several times slower"),
            jit_remedy,
        ),
        // net.core.bpf_jit_enable only exists in the initial network namespace.
        (None, Some(false)) => Finding::warn(
            "bpf_jit",
            "net.core.bpf_jit_enable is not visible here (not the initial network namespace?) and \
             CONFIG_BPF_JIT_ALWAYS_ON is not set: JIT state unknown",
            format!("check `sysctl net.core.bpf_jit_enable` in the initial namespace; if 0: {jit_remedy}"),
        ),
        (None, None) => Finding::warn(
            "bpf_jit",
            "net.core.bpf_jit_enable is not visible here (not the initial network namespace?) and \
             the kernel config is not readable (CONFIG_BPF_JIT_ALWAYS_ON unknown): JIT state unknown",
            format!("check `sysctl net.core.bpf_jit_enable` in the initial namespace; if 0: {jit_remedy}"),
        ),
    });

    v.push(if h.btf_vmlinux {
        Finding::ok("btf", "/sys/kernel/btf/vmlinux present")
    } else {
        Finding::fail(
            "btf",
            "/sys/kernel/btf/vmlinux missing: the fast path's CO-RE relocations need kernel BTF",
            "a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    });

    v.push(match kernel_version(&h.kernel_release) {
        Some(ver) if ver >= (6, 6) => {
            Finding::ok("tcx", format!("kernel {}: TC mode attaches through TCX links", h.kernel_release))
        }
        ver => {
            let what = match ver {
                Some(_) => format!("kernel {} is older than 6.6: no TCX, so no TC mode", h.kernel_release),
                None => format!("kernel release {:?} not understood: TCX (6.6+) unknown", h.kernel_release),
            };
            let remedy = "kernel 6.6 or newer, or --mode xdp on hardware NICs without a shaper";
            if tc_needed {
                Finding::fail("tcx", what, remedy)
            } else {
                Finding::warn("tcx", format!("{what} (not needed: every interface uses XDP)"), remedy)
            }
        }
    });

    // Informational: the engine uses ctnetlink today, not these kfuncs.
    v.push(match &h.kfuncs {
        None => Finding::ok("conntrack_kfuncs", "kernel BTF not readable; not needed by the engine today"),
        Some(k) => {
            let (have, miss): (Vec<_>, Vec<_>) = k.iter().partition(|(_, f)| *f);
            let names = |v: &[&(&str, bool)]| v.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
            if miss.is_empty() {
                Finding::ok("conntrack_kfuncs", format!("{} available (not needed by the engine today)", names(&have)))
            } else {
                Finding::ok(
                    "conntrack_kfuncs",
                    format!(
                        "{} not in kernel BTF (needs CONFIG_NF_CONNTRACK and BTF); not needed by the engine today",
                        names(&miss)
                    ),
                )
            }
        }
    });

    v.push(match &h.flowtable {
        None => Finding::ok(
            "nf_flow_table",
            "not present: nft-offload does its job; `flowtable` objects in nft rulesets are translated",
        ),
        Some(seen) => Finding::ok(
            "nf_flow_table",
            format!(
                "present ({seen}): kernel flowtable available; nft-offload takes over offload for rulesets \
                 loaded through it, do not also load `flow add` rules directly or both will try to offload"
            ),
        ),
    });

    v.push(if h.conntrack {
        Finding::ok("conntrack", "nf_conntrack active in this namespace")
    } else {
        Finding::fail(
            "conntrack",
            "no conntrack in this namespace (no /proc/net/nf_conntrack, no nf_conntrack_max sysctl): \
             nothing to follow",
            "modprobe nf_conntrack (a ruleset with `ct state` rules loads it too)",
        )
    });

    let events_remedy = "sysctl -w net.netfilter.nf_conntrack_events=1";
    v.push(match h.ct_events {
        Some(0) => Finding::fail(
            "conntrack_events",
            "net.netfilter.nf_conntrack_events = 0: the engine learns about connections from events",
            events_remedy,
        ),
        Some(1) => Finding::ok("conntrack_events", "net.netfilter.nf_conntrack_events = 1"),
        Some(n) => Finding::ok(
            "conntrack_events",
            format!("net.netfilter.nf_conntrack_events = {n}: on once a listener (nft-offload) subscribes"),
        ),
        None => Finding::fail(
            "conntrack_events",
            "no net.netfilter.nf_conntrack_events sysctl: no conntrack, or a kernel without \
             CONFIG_NF_CONNTRACK_EVENTS",
            "modprobe nf_conntrack; the kernel needs CONFIG_NF_CONNTRACK_EVENTS=y and CONFIG_NF_CT_NETLINK",
        ),
    });

    let acct_remedy = "sysctl -w net.netfilter.nf_conntrack_acct=1";
    v.push(match h.ct_acct {
        Some(0) => Finding::warn(
            "conntrack_acct",
            "nf_conntrack_acct = 0: conntrack counters do not include offloaded packets; \
             `nft-offload flows` has them",
            acct_remedy,
        ),
        Some(_) => Finding::ok("conntrack_acct", "net.netfilter.nf_conntrack_acct = 1"),
        None => Finding::warn(
            "conntrack_acct",
            "no net.netfilter.nf_conntrack_acct sysctl: conntrack counters unavailable; \
             `nft-offload flows` has per-flow counters",
            acct_remedy,
        ),
    });

    v.push(match &h.nft_version {
        Some(ver) => Finding::ok("nft", ver.clone()),
        None => Finding::warn(
            "nft",
            "`nft --version` failed: nft not installed; `run --nft` and ruleset translation need it",
            "install nftables (apt install nftables)",
        ),
    });

    let fwd =
        [("IPv4", h.ipv4_forward, "net.ipv4.ip_forward"), ("IPv6", h.ipv6_forward, "net.ipv6.conf.all.forwarding")];
    let off: Vec<_> = fwd.iter().filter(|(_, v, _)| *v != Some(1)).collect();
    v.push(if off.is_empty() {
        Finding::ok("ip_forward", "IPv4 and IPv6 forwarding on")
    } else {
        let what = off.iter().map(|(f, _, _)| *f).collect::<Vec<_>>().join(" and ");
        let detail = if off.len() == fwd.len() {
            format!("{what} forwarding off: this host does not forward")
        } else {
            format!("{what} forwarding off: this host does not forward {what}")
        };
        Finding::warn(
            "ip_forward",
            detail,
            off.iter().map(|(_, _, k)| format!("sysctl -w {k}=1")).collect::<Vec<_>>().join("; "),
        )
    });
    v
}

/// Known native-XDP support by driver name (ETHTOOL_GDRVINFO), with caveats.
fn native_xdp(driver: &str) -> (Option<bool>, String) {
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

fn prog_desc(p: &ProgRef) -> String {
    let name = if p.name.is_empty() { "?" } else { &p.name };
    if OWN_PROGS.contains(&p.name.as_str()) {
        format!("{name} (id {}, nft-offload's own: is `nft-offload run` running?)", p.id)
    } else {
        format!("{name} (id {})", p.id)
    }
}

fn judge_iface(f: &IfaceFacts, decision: Option<(Mode, String)>) -> IfaceReport {
    let (Some(l), Some((mode, reason))) = (&f.link, decision) else {
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
            findings: vec![Finding::fail(
                "exists",
                format!("{} does not exist in this network namespace", f.name),
                "check the name (`ip link`), or run check where the interface is: \
                 `ip netns exec NS nft-offload check`",
            )],
        };
    };
    let xdp = mode == Mode::Xdp;
    let mut v = vec![Finding::ok(
        "exists",
        format!("ifindex {}, driver {}", l.ifindex, if l.driver.is_empty() { "?" } else { &l.driver }),
    )];

    v.push(if l.up {
        Finding::ok("link_state", "up")
    } else {
        Finding::warn(
            "link_state",
            "down or no carrier: nothing is forwarded through it until it comes up",
            format!("ip link set dev {} up (and check the cable or peer)", l.name),
        )
    });

    v.push(Finding::ok("mode", format!("{}: {reason}", mode.as_str())));

    let (native, why) = native_xdp(&l.driver);
    v.push(if xdp && native != Some(true) {
        let fallback = if native == Some(false) { "runs as" } else { "may fall back to" };
        Finding::warn("native_xdp", format!("{why}: XDP mode {fallback} generic XDP, slower than TC"), "--mode tc")
    } else {
        Finding::ok("native_xdp", why)
    });

    let redirect_target = match &f.peer {
        Some(Peer::Local { gro, xdp_prog, .. }) => match (gro, xdp_prog) {
            (_, Some(_)) | (Some(true), _) => Some(true),
            (Some(false), None) => Some(false),
            (None, None) => None,
        },
        _ => None,
    };
    if let Some(peer) = &f.peer {
        let only = if xdp { "" } else { " (matters only with --mode xdp)" };
        let (detail, peer_name) = match peer {
            Peer::Local { name, xdp_prog, .. } => (
                match (redirect_target, xdp_prog) {
                    (Some(true), Some(id)) => format!("yes: peer {name} has an XDP program (id {id})"),
                    (Some(true), None) => format!("yes: peer {name} has GRO on"),
                    (Some(false), _) => format!("no: peer {name} has neither GRO nor an XDP program{only}"),
                    _ => format!("unknown: GRO state of peer {name} not readable (`ethtool -k` failed){only}"),
                },
                name.clone(),
            ),
            Peer::OtherNetns => (format!("unknown (peer in another namespace){only}"), "PEER".to_string()),
            Peer::Unknown(why) => (format!("unknown: {why}{only}"), "PEER".to_string()),
        };
        let remedy = format!(
            "ethtool -K {peer_name} gro on (in the peer's namespace), or attach an XDP program to it, or --mode tc"
        );
        v.push(match (redirect_target, xdp) {
            (Some(true), _) | (_, false) => Finding::ok("xdp_redirect_target", detail),
            (Some(false), true) => Finding::fail(
                "xdp_redirect_target",
                format!("{detail}: frames redirected into {} are silently dropped", l.name),
                remedy,
            ),
            (None, true) => Finding::warn("xdp_redirect_target", detail, remedy),
        });
    }

    let shaper = link::is_shaper(&l.qdisc);
    v.push(match (l.qdisc.as_str(), shaper) {
        ("", _) if f.ip_qdisc.as_deref() == Some("noop") => {
            Finding::ok("egress_qdisc", "noop: no qdisc while the interface is down; the one it gets when up decides")
        }
        ("", _) => Finding::warn(
            "egress_qdisc",
            "unknown: `tc -j qdisc show` gave nothing",
            "install iproute2 (tc); a shaper on egress matters for the mode",
        ),
        (q, true) if xdp => Finding::warn(
            "egress_qdisc",
            format!("{q} is a shaper and XDP redirect bypasses it: offloaded flows are not shaped"),
            "--mode auto or tc (TC keeps the qdisc in the path)",
        ),
        (q, true) => Finding::ok("egress_qdisc", format!("{q} (a shaper: TC mode keeps it in the path)")),
        (q, false) => Finding::ok("egress_qdisc", q.to_string()),
    });

    v.push(match &f.xdp_prog {
        None => Finding::ok("xdp_program", "none attached"),
        Some(p) if xdp => Finding::fail(
            "xdp_program",
            format!("{} already attached: XDP mode cannot attach (one program per interface)", prog_desc(p)),
            format!("ip link set dev {} xdp off, or --mode tc", l.name),
        ),
        Some(p) => Finding::warn(
            "xdp_program",
            format!(
                "{} attached: it runs before nft-offload's TC hook; fine if it returns XDP_PASS for \
                 forwarded traffic",
                prog_desc(p)
            ),
            format!("make sure it passes forwarded traffic, or remove it: ip link set dev {} xdp off", l.name),
        ),
    });

    let tc_desc: Vec<String> = f
        .tc_ingress
        .iter()
        .map(|t| match t {
            TcProg::Tcx(p) => format!("tcx {}", prog_desc(p)),
            TcProg::Legacy { kind, prog: Some(p) } => format!("cls_{kind} {}", prog_desc(p)),
            TcProg::Legacy { kind, prog: None } => format!("cls_{kind} filter"),
        })
        .collect();
    v.push(if tc_desc.is_empty() {
        Finding::ok("tc_ingress", "no other TC ingress programs")
    } else {
        let order = if xdp {
            "packets nft-offload redirects in XDP never reach them"
        } else {
            "TCX programs attached earlier run before nft-offload, legacy filters after it"
        };
        Finding::warn(
            "tc_ingress",
            format!(
                "{}: runs before/after nft-offload ({order}); fine if it returns TCX_NEXT/TC_ACT_UNSPEC",
                tc_desc.join(", ")
            ),
            "check what they return for forwarded traffic, or detach them",
        )
    });

    IfaceReport {
        name: l.name.clone(),
        exists: true,
        driver: l.driver.clone(),
        mode: Some(mode),
        reason,
        native_xdp: native,
        xdp_redirect_target: redirect_target,
        egress_qdisc: l.qdisc.clone(),
        shaper,
        xdp_prog_id: f.xdp_prog.as_ref().map(|p| p.id),
        tc_ingress_programs: tc_desc,
        findings: v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    fn iface(name: &str, driver: &str, qdisc: &str) -> IfaceFacts {
        IfaceFacts {
            name: name.into(),
            link: Some(LinkInfo {
                name: name.into(),
                ifindex: 7,
                up: true,
                driver: driver.into(),
                mtu: 1500,
                qdisc: qdisc.into(),
            }),
            ip_qdisc: None,
            peer: None,
            xdp_prog: None,
            tc_ingress: Vec::new(),
        }
    }

    fn missing(name: &str) -> IfaceFacts {
        IfaceFacts { link: None, ..iface(name, "", "") }
    }

    fn veth(name: &str, peer: Peer) -> IfaceFacts {
        IfaceFacts { peer: Some(peer), ..iface(name, "veth", "noqueue") }
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

    #[test]
    fn tcx_fails_only_when_tc_mode_is_needed() {
        let mut h = good_host();
        h.kernel_release = "6.1.0-18-amd64".into();
        let r = judge(&h, &hw_pair(), ModeChoice::Auto);
        assert_eq!(host_finding(&r, "tcx").status, Status::Warn, "hardware pair uses XDP");
        assert!(r.offload_possible);
        let r = judge(&h, &hw_pair(), ModeChoice::Tc);
        assert_eq!(host_finding(&r, "tcx").status, Status::Fail);
        assert!(host_finding(&r, "tcx").detail.contains("older than 6.6"));
        let r = judge(&h, &[iface("a", "veth", "noqueue"), iface("b", "veth", "noqueue")], ModeChoice::Auto);
        assert_eq!(host_finding(&r, "tcx").status, Status::Fail);
        h.kernel_release = "6.6.0".into();
        assert_eq!(host_finding(&judged(&h), "tcx").status, Status::Ok);
        assert_eq!(kernel_version("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(kernel_version("garbage"), None);
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
        assert!(host_finding(&r, "conntrack_acct").detail.contains("`nft-offload flows` has them"));
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
    fn informational_items_are_ok_either_way() {
        let mut h = good_host();
        h.kfuncs = Some(KFUNCS.iter().map(|k| (*k, false)).collect());
        h.flowtable = Some("module nf_flow_table loaded".into());
        let r = judged(&h);
        let k = host_finding(&r, "conntrack_kfuncs");
        assert_eq!(k.status, Status::Ok);
        assert!(k.detail.contains("bpf_xdp_ct_lookup, bpf_ct_change_timeout not in kernel BTF"), "{k:?}");
        let ft = host_finding(&r, "nf_flow_table");
        assert_eq!(ft.status, Status::Ok);
        assert!(ft.detail.contains("do not also load `flow add` rules directly"), "{ft:?}");
        let ft = host_finding(&judged(&good_host()), "nf_flow_table").clone();
        assert!(ft.detail.starts_with("not present: nft-offload does its job"), "{ft:?}");
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
        let no_napi = Peer::Local { name: "p".into(), gro: Some(false), xdp_prog: None };
        let r = judge(&h, &[veth("a", no_napi.clone()), veth("b", no_napi.clone())], ModeChoice::Auto);
        let a = &r.interfaces[0];
        assert_eq!(a.mode, Some(Mode::Tc));
        assert!(a.reason.contains("software device (veth)"));
        assert_eq!(a.xdp_redirect_target, Some(false));
        assert_eq!(finding(a, "xdp_redirect_target").status, Status::Ok);
        assert!(finding(a, "xdp_redirect_target").detail.contains("matters only with --mode xdp"));
        assert!(finding(a, "native_xdp").detail.contains("CHECKSUM_PARTIAL"));

        let r = judge(&h, &[veth("a", no_napi.clone()), veth("b", no_napi)], ModeChoice::Xdp);
        let f = finding(&r.interfaces[0], "xdp_redirect_target");
        assert_eq!(f.status, Status::Fail);
        assert!(f.detail.contains("silently dropped"));
        assert!(f.remedy.as_deref().unwrap().starts_with("ethtool -K p gro on"));

        let gro = Peer::Local { name: "p".into(), gro: Some(true), xdp_prog: None };
        let prog = Peer::Local { name: "q".into(), gro: Some(false), xdp_prog: Some(3) };
        let r = judge(&h, &[veth("a", gro), veth("b", prog), veth("c", Peer::OtherNetns)], ModeChoice::Xdp);
        assert_eq!(r.interfaces[0].xdp_redirect_target, Some(true));
        assert_eq!(finding(&r.interfaces[0], "xdp_redirect_target").status, Status::Ok);
        assert_eq!(r.interfaces[1].xdp_redirect_target, Some(true));
        assert!(finding(&r.interfaces[1], "xdp_redirect_target").detail.contains("XDP program (id 3)"));
        let c = finding(&r.interfaces[2], "xdp_redirect_target");
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("unknown (peer in another namespace)"));
        // Not veth: no such finding.
        let r = judged(&h);
        assert!(r.interfaces[0].findings.iter().all(|f| f.item != "xdp_redirect_target"));
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
        // A down interface has the noop qdisc, which tc does not list.
        let mut d = iface("eth0", "ixgbe", "");
        d.ip_qdisc = Some("noop".into());
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
        assert_eq!(parse_cap_eff("Name:\tx\nCapEff:\t000001fffeffffff\n"), Some(0x1fffeffffff));
        assert_eq!(parse_cap_eff("nothing"), None);
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

        let opts =
            CheckOpts { ifaces: ["ca", "cb", "cc", "nosuch"].map(String::from).to_vec(), mode: ModeChoice::Auto };
        let r = run(&opts);
        let text = r.render();
        println!("{text}");
        let _ = fs::remove_dir_all(&dir);

        // Host.
        let ev = host_finding(&r, "conntrack_events");
        assert_eq!(ev.status, Status::Fail, "{text}");
        assert_eq!(ev.remedy.as_deref(), Some("sysctl -w net.netfilter.nf_conntrack_events=1"));
        for ok in ["btf", "privileges", "bpf_syscall", "tcx", "conntrack", "interfaces"] {
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
        assert_eq!(ca.tc_ingress_programs.len(), 1, "{text}");
        assert!(ca.tc_ingress_programs[0].starts_with("cls_bpf cls_pass (id "), "{text}");
        assert_eq!(finding(ca, "tc_ingress").status, Status::Warn);

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
        assert_eq!(names, ["ca", "cb", "cc", "cd"]);
        let cd = r.interfaces.iter().find(|i| i.name == "cd").unwrap();
        assert_eq!(cd.xdp_redirect_target, Some(true), "peer cc has an XDP program");
    }
}
