//! The BPF fast path: loading the skeleton, attaching it to interfaces
//! (XDP or TCX links owned by this process, so the kernel detaches them if
//! the process dies; clsact + cls_bpf where the kernel has no TCX, see
//! `tc_legacy`), and the maps the control plane programs. What the kernel
//! offers is probed first (`features`), and decides how it is built and
//! attached.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{AsRawLibbpf, Link, MapCore, MapFlags, PrintLevel};

#[allow(clippy::all, dead_code, non_camel_case_types, non_snake_case, unused_imports)]
pub mod skel {
    include!(concat!(env!("OUT_DIR"), "/fastpath.skel.rs"));
}

pub mod features;
pub mod load_error;
pub mod tc_legacy;
mod test_run;
mod walk;

pub use features::{FeatureLine, Features, Keepalive, Probe, Secpath, TcAttach};
pub use test_run::{SkbIn, SkbOut};

pub use skel::types::{
    fo_below, fo_encap, fo_fib_req, fo_flow, fo_flow_flag, fo_flow_key, fo_hold, fo_stat, fo_teardown,
};
use skel::{FastpathSkel, FastpathSkelBuilder};

/// uapi bpf.h (6.16+); the build headers may predate it.
const BPF_F_IPV6: u64 = 1 << 7;

/// bpf_fib_lookup flags the control plane may use (include/uapi/linux/bpf.h).
pub mod routes_flags {
    /// 6.3 (and some stable trees): skip the neighbour lookup.
    pub const SKIP_NEIGH: u32 = 1 << 2;
    /// 6.10: `mark` is the packet's mark for the rules.
    pub const MARK: u32 = 1 << 5;
}

// STAT_NAMES, derived from `enum fo_stat` in bpf/flow.h (see build.rs).
include!(concat!(env!("OUT_DIR"), "/fastpath_stats.rs"));

/// Why a flow map write failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PutError {
    #[error("flow key already in the flow table")]
    KeyTaken,
    /// ENOMEM: the map is not preallocated (bpf/maps.h), so an insert
    /// allocates, charged to the engine's memory cgroup.
    #[error("no kernel memory for the flow table entry")]
    NoMemory,
    /// Full (E2BIG), or gone when replacing (ENOENT), or anything else.
    #[error("flow table update failed: {0}")]
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Xdp,
    Tc,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Xdp => "xdp",
            Mode::Tc => "tc",
        }
    }
}

/// Id of the XDP program attached to `ifindex` in any mode, if one is.
pub fn xdp_prog_id(ifindex: u32) -> Option<u32> {
    let mut id: u32 = 0;
    // SAFETY: out-pointer to a local; flags 0 = any mode.
    let r = unsafe { libbpf_sys::bpf_xdp_query_id(ifindex as i32, 0, &mut id) };
    (r == 0 && id != 0).then_some(id)
}

/// View a plain C struct as bytes for a map operation.
fn bytes_of<T: Copy>(t: &T) -> &[u8] {
    // SAFETY: T is a #[repr(C)] plain-data type generated from BTF without
    // padding holes that matter to the kernel (keys are zero-initialised).
    unsafe { std::slice::from_raw_parts((t as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn from_bytes<T: Copy + Default>(b: &[u8]) -> T {
    let mut t = T::default();
    let n = b.len().min(std::mem::size_of::<T>());
    // SAFETY: plain data; copying at most size_of::<T>() bytes.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut t as *mut T).cast::<u8>(), n) };
    t
}

// libbpf's log, kept so a failed load can show the verifier's last lines.
static LIBBPF_LOG: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

fn libbpf_print(level: PrintLevel, msg: String) {
    if let Ok(mut log) = LIBBPF_LOG.lock() {
        for line in msg.lines() {
            if log.len() >= 400 {
                log.pop_front();
            }
            log.push_back(line.to_string());
        }
    }
    if matches!(level, PrintLevel::Warn) {
        tracing::debug!(target: "libbpf", "{}", msg.trim_end());
    }
}

fn log_tail(n: usize) -> String {
    let log = LIBBPF_LOG.lock().map(|l| l.clone()).unwrap_or_default();
    let start = log.len().saturating_sub(n);
    log.iter().skip(start).cloned().collect::<Vec<_>>().join("\n")
}

/// What keeps the TC programs of one interface attached: dropping it
/// detaches them (held only for its Drop, hence never read).
#[allow(dead_code)]
enum TcHeld {
    /// TCX links: ingress (TC mode only) and the egress watcher.
    Tcx { ingress: Option<Link>, egress: Link },
    /// cls_bpf filters under clsact (no TCX on this kernel).
    Clsact(tc_legacy::Clsact),
}

struct Attachment {
    ifindex: u32,
    mode: Mode,
    /// XDP mode: the XDP link's fd. Dropped first (fields drop in order),
    /// so no XDP program redirects into a port whose TC side is leaving.
    _xdp: Option<std::os::fd::OwnedFd>,
    /// The TC ingress program (TC mode) and `fo_tc_egress`, which tells
    /// which dormant connections the kernel forwarded.
    tc: TcHeld,
    /// The device-bound instance `_xdp` runs, if any (`load_bound`),
    /// dropped after it.
    _bound: Option<Box<FastpathSkel<'static>>>,
}

impl Attachment {
    /// How it is attached, for `status`.
    fn describe(&self) -> String {
        let xdp = if self._xdp.is_some() { "xdp link (native), egress watcher: " } else { "" };
        match &self.tc {
            TcHeld::Tcx { ingress: Some(_), .. } => format!("{xdp}tcx ingress and egress links"),
            TcHeld::Tcx { ingress: None, .. } => format!("{xdp}tcx egress link"),
            TcHeld::Clsact(c) => format!("{xdp}{}", c.describe()),
        }
    }
}

/// A TCX link of `prog` on `ifindex` (the program's section says ingress
/// or egress; `what` only names it in the error).
fn attach_tcx(prog: &libbpf_rs::ProgramMut<'_>, ifindex: u32, ifname: &str, what: &str) -> Result<Link> {
    let prog = prog.as_libbpf_object();
    // SAFETY: valid loaded program; libbpf returns NULL and sets errno on
    // failure.
    let raw = unsafe { libbpf_sys::bpf_program__attach_tcx(prog.as_ptr(), ifindex as i32, std::ptr::null()) };
    let ptr = NonNull::new(raw)
        .ok_or_else(|| anyhow!("cannot attach TC (tcx {what}) to {ifname}: {}", std::io::Error::last_os_error()))?;
    // SAFETY: a valid link pointer we now own.
    Ok(unsafe { Link::from_ptr(ptr) })
}

/// An XDP link of `prog` in the driver's native mode only
/// (XDP_FLAGS_DRV_MODE). Without the flag the kernel silently falls back to
/// generic XDP on a driver without native support, which runs after the
/// skb is built and is slower than TC: never wanted. The link's fd is the
/// link.
fn attach_native_xdp(prog: std::os::fd::BorrowedFd<'_>, ifindex: u32, ifname: &str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: plain C struct; zero is its documented default.
    let mut opts: libbpf_sys::bpf_link_create_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as _;
    opts.flags = libbpf_sys::XDP_FLAGS_DRV_MODE;
    // SAFETY: valid program fd and options; returns a new fd or -errno.
    let fd = unsafe { libbpf_sys::bpf_link_create(prog.as_raw_fd(), ifindex as i32, libbpf_sys::BPF_XDP, &opts) };
    if fd < 0 {
        let err = std::io::Error::from_raw_os_error(-fd);
        if matches!(-fd, libc::EOPNOTSUPP | libc::EINVAL) {
            bail!(
                "cannot attach XDP to {ifname}: its driver has no native XDP ({err}); generic XDP is never \
                 used (slower than TC): use --mode tc"
            );
        }
        bail!("cannot attach XDP to {ifname}: {err}");
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// What a device's frames start with, from its ARPHRD link type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    /// An Ethernet header (ARPHRD_ETHER; loopback uses Ethernet's too).
    Ethernet,
    /// The IP header: the types dev_is_mac_header_xmit
    /// (include/linux/if_arp.h) lists as sending without a MAC header
    /// (ppp, WireGuard and tun are ARPHRD_NONE / ARPHRD_PPP).
    Ip,
}

impl LinkLayer {
    const ARPHRD_RAWIP: u16 = 519;
    const ARPHRD_IP6GRE: u16 = 823;

    /// Any other type is refused, naming the device: the fast path would
    /// misparse its frames.
    pub fn of(ifname: &str, link_type: u16) -> Result<Self> {
        match link_type {
            libc::ARPHRD_ETHER | libc::ARPHRD_LOOPBACK => Ok(LinkLayer::Ethernet),
            libc::ARPHRD_NONE
            | libc::ARPHRD_VOID
            | libc::ARPHRD_PPP
            | libc::ARPHRD_TUNNEL
            | libc::ARPHRD_TUNNEL6
            | libc::ARPHRD_SIT
            | libc::ARPHRD_IPGRE
            | libc::ARPHRD_PIMREG
            | Self::ARPHRD_RAWIP
            | Self::ARPHRD_IP6GRE => Ok(LinkLayer::Ip),
            t => bail!(
                "cannot attach to {ifname}: its link type {t} (ARPHRD) is neither Ethernet nor a device without \
                 a link-layer header"
            ),
        }
    }
}

/// fo_dormant's size for small `--max-flows`: room for a burst of 8,192
/// new UDP connections watched at once (256 KiB of buckets).
const DORMANT_MIN_KEYS: u32 = 16_384;

/// The loaded fast path. Dropping it detaches everything.
pub struct Dataplane {
    skel: FastpathSkel<'static>,
    attached: Vec<Attachment>,
    features: Features,
    /// What fo_watching was last set to (`set_watching`).
    watching: std::cell::Cell<Option<bool>>,
}

impl Dataplane {
    /// Load the fast path with room for `max_flows` connections (two map
    /// entries each), built for what this kernel offers.
    pub fn load(max_flows: u32) -> Result<Self> {
        Self::load_for(max_flows, &Probe::kernel())
    }

    /// Load it built for `probe` (tests give one to run a fallback on a
    /// kernel that has the real thing).
    pub fn load_for(max_flows: u32, probe: &Probe) -> Result<Self> {
        libbpf_rs::set_print(Some((PrintLevel::Debug, libbpf_print)));
        let mut features = Features::from_probe(probe);
        // The keepalive kfuncs are the one optional part a verifier may
        // still refuse where the probe found them (a kernel whose nf_conn
        // or kfunc rules differ): first without the stream_ts read, then
        // without the kfuncs (the engine keeping entries alive over
        // ctnetlink). Each refusal is logged with the verifier's words.
        let mut built = Self::build(max_flows, &features);
        if let (Err(e), true) = (&built, features.ct_stream_ts) {
            tracing::warn!("{e:#}");
            tracing::warn!("loading the fast path again without reading UDP entries' stream_ts");
            features.ct_stream_ts = false;
            built = Self::build(max_flows, &features);
        }
        if let (Err(e), Keepalive::FastPath) = (&built, features.keepalive) {
            tracing::warn!("{e:#}");
            tracing::warn!("loading the fast path again without the conntrack kfuncs (keepalive over ctnetlink)");
            features.keepalive = Keepalive::Refused;
            built = Self::build(max_flows, &features);
        }
        let skel = built?;
        let mut dp = Dataplane { skel, attached: Vec::new(), features, watching: std::cell::Cell::new(None) };
        features.csum_ipv6 = dp.probe_csum_ipv6();
        features.fib_skip_neigh = dp.probe_fib_flag(routes_flags::SKIP_NEIGH);
        features.fib_mark = dp.probe_fib_flag(routes_flags::MARK);
        dp.features = features;
        dp.set_csum_ipv6(features.csum_ipv6);
        dp.set_fwd_update_priority(crate::host::ip_forward_update_priority());
        dp.set_ct_timeouts(&crate::host::ct_timeouts());
        // A running engine, as far as another one looking at our filters
        // can tell (tc_legacy::sweep), from the start.
        dp.set_heartbeat(crate::engine::now_ns());
        tracing::debug!(?features, "what this kernel gives the fast path");
        Ok(dp)
    }

    /// Open, size and load the object with the .rodata `features` decide.
    fn build(max_flows: u32, features: &Features) -> Result<FastpathSkel<'static>> {
        if let Ok(mut l) = LIBBPF_LOG.lock() {
            l.clear();
        }
        // The skeleton borrows its object storage for its whole life; the
        // dataplane lives as long as the process, so leak the few bytes.
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open =
            FastpathSkelBuilder::default().open(storage).map_err(|e| anyhow!("opening the BPF object failed: {e}"))?;
        open.maps.fo_flows.set_max_entries(max_flows.saturating_mul(2).max(2)).context("sizing the flow table")?;
        // Two keys per watched connection, as many as offloaded ones at
        // least (a new UDP connection is watched until its second packet;
        // idle ones until they speak). Not preallocated: the buckets cost
        // 16 bytes a slot, the keys only while watched.
        let dormant = max_flows.saturating_mul(2).max(DORMANT_MIN_KEYS);
        open.maps.fo_dormant.set_max_entries(dormant).context("sizing the dormant watch")?;
        // Loaded per port, bound to it, by `load_bound` (the kernel refuses
        // its metadata kfunc in a program that is not device-bound).
        open.progs.fo_xdp_md.set_autoload(false);
        // Constants the verifier prunes by (fastpath.bpf.c): a kfunc or
        // helper this kernel lacks sits in a branch it never walks.
        let ro = open.maps.rodata_data.as_deref_mut().expect("the fast path has a .rodata");
        ro.fo_have_kern_ctx = u8::from(features.kern_ctx);
        ro.fo_secpath_how = features.secpath.code();
        ro.fo_ct_kfuncs = features.keepalive == Keepalive::FastPath;
        ro.fo_ct_stream_ts = features.ct_stream_ts;
        // The tcx/* programs' expected attach type (BPF_TCX_*) stays: a
        // sched_cls program is loaded whatever it says
        // (bpf_prog_load_check_attach in 6.1's kernel/bpf/syscall.c has no
        // case for it), and cls_bpf does not read it.
        open.load().map_err(|e| {
            let log: Vec<String> = LIBBPF_LOG.lock().map(|l| l.iter().cloned().collect()).unwrap_or_default();
            match load_error::explain(&log) {
                Some(why) => anyhow!(
                    "loading the BPF fast path failed: {why}\n(libbpf: {e}; NFT_OFFLOAD_LOG=debug shows libbpf's warnings)\n\
                     --- libbpf / verifier log (last lines) ---\n{}",
                    log_tail(8)
                ),
                None => anyhow!(
                    "loading the BPF fast path failed: {e}\n--- libbpf / verifier log (last lines) ---\n{}",
                    log_tail(25)
                ),
            }
        })
    }

    /// What this kernel gave the fast path.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// Pretend the kernel lacks what a test says (the control plane's
    /// fallbacks, on a kernel that has the real thing).
    #[cfg(test)]
    pub fn features_mut(&mut self) -> &mut Features {
        &mut self.features
    }

    /// Does this kernel's bpf_fib_lookup take `flag`? It refuses a flag it
    /// does not know with -EINVAL before anything else
    /// (`BPF_CALL_4(bpf_xdp_fib_lookup` in net/core/filter.c); ifindex 1
    /// (lo) exists in every namespace, so any other answer means yes.
    fn probe_fib_flag(&self, flag: u32) -> bool {
        let req =
            fo_fib_req { family: 2, ifindex_in: 1, flags: flag, dst: [0x0100_007f, 0, 0, 0], ..Default::default() };
        match self.fib_query(&req) {
            Ok(r) => r.ret != -libc::EINVAL,
            Err(e) => {
                tracing::warn!("probing bpf_fib_lookup flag {flag:#x} failed ({e:#}): not used");
                false
            }
        }
    }

    /// The ids of the programs this fast path attaches with TC: a cls_bpf
    /// filter running one of them is ours (`hooks`).
    pub fn own_prog_ids(&self) -> Vec<u32> {
        use std::os::fd::AsRawFd;
        let p = &self.skel.progs;
        [&p.fo_tc, &p.fo_tc_l3, &p.fo_tc_egress, &p.fo_tc_egress_l3]
            .iter()
            .filter_map(|p| tc_legacy::prog_id(p.as_fd().as_raw_fd()))
            .collect()
    }

    /// How `ifindex` is attached ("tcx ingress and egress links", "clsact
    /// (created): cls_bpf ingress pref 1 handle 0x1, ..."), if it is.
    pub fn attach_description(&self, ifindex: u32) -> Option<String> {
        self.attached.iter().find(|a| a.ifindex == ifindex).map(Attachment::describe)
    }

    /// Does this kernel's bpf_l4_csum_replace accept BPF_F_IPV6 (6.16+)?
    /// Asked of the kernel itself, not its version (stable trees have it).
    pub fn probe_csum_ipv6(&self) -> bool {
        type Sk = skel::types::__sk_buff;
        let mut ctx = vec![0u8; std::mem::size_of::<Sk>()];
        let frame = [0u8; 64];
        match test_run::test_run(&self.skel.progs.fo_probe_csum_ipv6, &frame, &mut ctx, 1) {
            Ok((ret, _, _)) => ret == 0,
            Err(e) => {
                tracing::warn!("probing BPF_F_IPV6 failed ({e:#}): using the fallback");
                false
            }
        }
    }

    /// Use BPF_F_IPV6 for IPv6 NAT checksum fixes (`true`), or the
    /// fallback that works on every kernel (see fo_csum_ipv6_flag).
    pub fn set_csum_ipv6(&mut self, use_flag: bool) {
        let flag = if use_flag { BPF_F_IPV6 } else { 0 };
        let bss = self.skel.maps.bss_data.as_deref_mut().expect("the fast path has a .bss");
        // SAFETY: as in set_heartbeat.
        unsafe { std::ptr::write_volatile(&mut bss.fo_csum_ipv6_flag, flag) };
    }

    /// Whether ip_forward sets skb->priority from the TOS here
    /// (net.ipv4.ip_forward_update_priority): the fast path does the same
    /// (fo_ip_fwd_update_priority in bpf/fastpath.bpf.c).
    /// Conntrack's timeouts, which the fast path's keepalive gives the
    /// entries it refreshes (bpf/keepalive.h).
    pub fn set_ct_timeouts(&mut self, t: &crate::flow::CtTimeouts) {
        let bss = self.skel.maps.bss_data.as_deref_mut().expect("the fast path has a .bss");
        // SAFETY: as in set_heartbeat.
        unsafe {
            std::ptr::write_volatile(&mut bss.fo_ct_tcp_established_s, t.tcp_established);
            std::ptr::write_volatile(&mut bss.fo_ct_udp_s, t.udp);
            std::ptr::write_volatile(&mut bss.fo_ct_udp_stream_s, t.udp_stream);
        }
    }

    /// Whether the fast path keeps conntrack entries alive (`Keepalive`).
    pub fn fast_keepalive(&self) -> bool {
        self.features.keepalive == Keepalive::FastPath
    }

    pub fn set_fwd_update_priority(&mut self, on: bool) {
        let bss = self.skel.maps.bss_data.as_deref_mut().expect("the fast path has a .bss");
        // SAFETY: as in set_heartbeat.
        unsafe { std::ptr::write_volatile(&mut bss.fo_ip_fwd_update_priority, u32::from(on)) };
    }

    /// The control plane is alive at `now_ns` (CLOCK_MONOTONIC_COARSE, the
    /// fast path's bpf_ktime_get_coarse_ns): the fast path forwards only
    /// while this is fresher than FO_STALE_ENGINE_NS (bpf/flow.h).
    pub fn set_heartbeat(&mut self, now_ns: u64) {
        let bss = self.skel.maps.bss_data.as_deref_mut().expect("the fast path has a .bss");
        // SAFETY: a valid pointer into the mmaped .bss; volatile so the
        // store is not elided (the reader is the BPF program).
        unsafe { std::ptr::write_volatile(&mut bss.fo_engine_beat_ns, now_ns) };
    }

    /// How many wake-ups TC egress could not put in the ring buffer so
    /// far (the dormant connections must then be scanned).
    pub fn wake_lost(&self) -> u64 {
        let bss = self.skel.maps.bss_data.as_deref().expect("the fast path has a .bss");
        // SAFETY: a valid pointer into the mmaped .bss; volatile because the
        // BPF program writes it.
        unsafe { std::ptr::read_volatile(&bss.fo_wake_lost) }
    }

    /// How many RSTs of offloaded connections the fast path could not put
    /// in `fo_rst` so far (every TCP connection's timeout must then be put
    /// back).
    pub fn rst_lost(&self) -> u64 {
        let bss = self.skel.maps.bss_data.as_deref().expect("the fast path has a .bss");
        // SAFETY: as in wake_lost.
        unsafe { std::ptr::read_volatile(&bss.fo_rst_lost) }
    }

    pub fn flow_capacity(&self) -> u32 {
        self.skel.maps.fo_flows.max_entries() / 2
    }

    /// Attach to `ifindex` in `mode`. XDP is attached in the driver's native
    /// mode when it has one; TC as a TCX ingress link (kernel >= 6.6), else
    /// as a cls_bpf filter under clsact. In both modes the egress watcher
    /// (`fo_tc_egress`) goes on TC egress the same way. `link_type`
    /// (ARPHRD_*, rtnetlink's ifi_type) picks the programs for devices
    /// without an Ethernet header, where XDP is refused.
    pub fn attach(&mut self, ifindex: u32, ifname: &str, mode: Mode, link_type: u16) -> Result<()> {
        self.attach_with(ifindex, ifname, mode, link_type, false)
    }

    /// `attach`; with `rx_vlan_md`, XDP runs `fo_xdp_md` bound to the
    /// device, reading VLAN tags from the driver's receive metadata
    /// (`policy::xdp::Tags::Metadata`).
    pub fn attach_with(
        &mut self,
        ifindex: u32,
        ifname: &str,
        mode: Mode,
        link_type: u16,
        rx_vlan_md: bool,
    ) -> Result<()> {
        let layer = LinkLayer::of(ifname, link_type)?;
        let (ingress, egress_prog) = match layer {
            LinkLayer::Ethernet => (&self.skel.progs.fo_tc, &self.skel.progs.fo_tc_egress),
            LinkLayer::Ip => (&self.skel.progs.fo_tc_l3, &self.skel.progs.fo_tc_egress_l3),
        };
        if mode == Mode::Xdp && layer == LinkLayer::Ip {
            bail!(
                "cannot attach XDP to {ifname}: it has no Ethernet header (link type {link_type}), and the XDP \
                 fast path parses and redirects Ethernet frames; use --mode tc"
            );
        }
        // One XDP program per interface (without a dispatcher): refuse
        // clearly instead of failing inside the attach.
        if mode == Mode::Xdp {
            if let Some(id) = xdp_prog_id(ifindex) {
                bail!(
                    "cannot attach XDP to {ifname}: another XDP program (id {id}) is already attached; detach it \
                     (ip link set dev {ifname} xdp off) or use --mode tc"
                );
            }
        }
        // Filters a killed engine left on the device go first (and a
        // running engine's refuse the start): see tc_legacy.
        tc_legacy::sweep(ifindex, ifname)?;
        let tc = match self.features.tc_attach {
            TcAttach::Tcx => {
                let ingress = match mode {
                    Mode::Tc => Some(attach_tcx(ingress, ifindex, ifname, "ingress")?),
                    Mode::Xdp => None,
                };
                // On an error here the ingress link above is dropped (detached).
                TcHeld::Tcx { ingress, egress: attach_tcx(egress_prog, ifindex, ifname, "egress")? }
            }
            TcAttach::Clsact => {
                use std::os::fd::AsRawFd;
                let mut c = tc_legacy::Clsact::open(ifindex, ifname)?;
                // On an error the filters added so far are removed (Drop).
                let mut add = |p: &libbpf_rs::ProgramMut<'_>, at_ingress: bool, what: &str| {
                    let fd = p.as_fd().as_raw_fd();
                    c.attach(fd, tc_legacy::prog_id(fd).unwrap_or(0), at_ingress, what)
                };
                if mode == Mode::Tc {
                    add(ingress, true, "ingress")?;
                }
                add(egress_prog, false, "egress")?;
                TcHeld::Clsact(c)
            }
        };
        // Attached after TC, so an XDP program never redirects to a port
        // whose egress watcher is missing; dropped (detached) before it.
        let (xdp, bound) = match mode {
            Mode::Xdp if rx_vlan_md => {
                let b = self.load_bound(ifindex, ifname)?;
                (Some(attach_native_xdp(b.progs.fo_xdp_md.as_fd(), ifindex, ifname)?), Some(b))
            }
            Mode::Xdp => (Some(attach_native_xdp(self.skel.progs.fo_xdp.as_fd(), ifindex, ifname)?), None),
            Mode::Tc => (None, None),
        };
        if mode == Mode::Xdp {
            self.skel
                .maps
                .fo_tx_ports
                .update(&ifindex.to_ne_bytes(), &ifindex.to_ne_bytes(), MapFlags::ANY)
                .with_context(|| format!("adding {ifname} to the XDP redirect map"))?;
        }
        self.attached.push(Attachment { ifindex, mode, _xdp: xdp, tc, _bound: bound });
        Ok(())
    }

    /// A second instance of the fast path whose only program, `fo_xdp_md`,
    /// is bound to `ifindex` (BPF_F_XDP_DEV_BOUND_ONLY with its prog_ifindex,
    /// as the metadata kfuncs require: `bpf_dev_bound_kfunc_check`,
    /// kernel/bpf/offload.c) and uses every map of this one (`reuse_fd`,
    /// .bss included: one heartbeat, one set of counters).
    fn load_bound(&self, ifindex: u32, ifname: &str) -> Result<Box<FastpathSkel<'static>>> {
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open =
            FastpathSkelBuilder::default().open(storage).map_err(|e| anyhow!("opening the BPF object failed: {e}"))?;
        let m = &self.skel.maps;
        let o = &mut open.maps;
        for (to, from) in [
            (&mut o.fo_tx_ports, m.fo_tx_ports.as_fd()),
            (&mut o.fo_flows, m.fo_flows.as_fd()),
            (&mut o.fo_dormant, m.fo_dormant.as_fd()),
            (&mut o.fo_watching, m.fo_watching.as_fd()),
            (&mut o.fo_wake, m.fo_wake.as_fd()),
            (&mut o.fo_rst, m.fo_rst.as_fd()),
            (&mut o.fo_stats, m.fo_stats.as_fd()),
            (&mut o.fo_csum_ports, m.fo_csum_ports.as_fd()),
            (&mut o.bss, m.bss.as_fd()),
        ] {
            to.reuse_fd(from).context("sharing the fast path's maps with a device-bound program")?;
        }
        // Its own .rodata: the same constants as the first instance's
        // (`load`), and the one that lets it read the metadata.
        let rodata = open.maps.rodata_data.as_deref_mut().expect("the fast path has a .rodata");
        rodata.fo_have_kern_ctx = u8::from(self.features.kern_ctx);
        rodata.fo_secpath_how = self.features.secpath.code();
        rodata.fo_ct_kfuncs = self.features.keepalive == Keepalive::FastPath;
        rodata.fo_ct_stream_ts = self.features.ct_stream_ts;
        rodata.fo_rx_vlan_md = true;
        let p = &mut open.progs;
        for prog in [
            &mut p.fo_xdp,
            &mut p.fo_tc,
            &mut p.fo_tc_l3,
            &mut p.fo_tc_egress,
            &mut p.fo_tc_egress_l3,
            &mut p.fo_probe_csum_ipv6,
            &mut p.fo_fib_query,
        ] {
            prog.set_autoload(false);
        }
        p.fo_xdp_md.set_autoload(true);
        p.fo_xdp_md.set_ifindex(ifindex);
        p.fo_xdp_md.set_flags(libbpf_sys::BPF_F_XDP_DEV_BOUND_ONLY);
        let skel = open.load().map_err(|e| {
            anyhow!(
                "loading the XDP program bound to {ifname} (to read VLAN tags from its receive metadata) failed: \
                 {e}\n--- libbpf / verifier log (last lines) ---\n{}",
                log_tail(25)
            )
        })?;
        Ok(Box::new(skel))
    }

    /// Whether `ifindex` can receive XDP redirects from this fast path.
    pub fn is_xdp_target(&self, ifindex: u32) -> bool {
        self.attached.iter().any(|a| a.ifindex == ifindex && a.mode == Mode::Xdp)
    }

    /// Detach from every interface (links are released).
    pub fn detach_all(&mut self) {
        // Links first, then ports: no program left running redirects to a
        // port that already left the map.
        let gone: Vec<Attachment> = self.attached.drain(..).collect();
        let ports: Vec<u32> = gone.iter().filter(|a| a.mode == Mode::Xdp).map(|a| a.ifindex).collect();
        drop(gone);
        for i in ports {
            let _ = self.skel.maps.fo_tx_ports.delete(&i.to_ne_bytes());
            let _ = self.skel.maps.fo_csum_ports.delete(&i.to_ne_bytes());
        }
    }

    pub fn detach(&mut self, ifindex: u32) {
        self.attached.retain(|a| a.ifindex != ifindex);
        let _ = self.skel.maps.fo_tx_ports.delete(&ifindex.to_ne_bytes());
        let _ = self.skel.maps.fo_csum_ports.delete(&ifindex.to_ne_bytes());
    }

    /// Install a new map entry. Never overwrites: a key that is already
    /// there belongs to another connection (or to one we lost track of), and
    /// replacing it would silently steal its packets (BPF_NOEXIST).
    pub fn put_flow(&self, key: &fo_flow_key, val: &fo_flow) -> Result<(), PutError> {
        self.write_flow(key, val, MapFlags::NO_EXIST)
    }

    /// Rewrite an entry we installed (re-pointing after a route change);
    /// fails if it is gone (BPF_EXIST).
    pub fn replace_flow(&self, key: &fo_flow_key, val: &fo_flow) -> Result<(), PutError> {
        self.write_flow(key, val, MapFlags::EXIST)
    }

    fn write_flow(&self, key: &fo_flow_key, val: &fo_flow, how: MapFlags) -> Result<(), PutError> {
        self.skel.maps.fo_flows.update(bytes_of(key), bytes_of(val), how).map_err(|e| match e.kind() {
            libbpf_rs::ErrorKind::AlreadyExists => PutError::KeyTaken,
            libbpf_rs::ErrorKind::OutOfMemory => PutError::NoMemory,
            _ => PutError::Failed(e.to_string()),
        })
    }

    /// Write new map entries in one BPF_MAP_UPDATE_BATCH. A batch takes no
    /// BPF_NOEXIST: generic_map_update_batch (kernel/bpf/syscall.c) refuses
    /// every element flag but BPF_F_LOCK, so this writes like BPF_ANY and
    /// the caller must know that none of the keys is in the map (FlowTable,
    /// the map's only writer, keeps an index of its keys). The kernel stops
    /// at the first entry it cannot write: returns how many were written
    /// and, if it stopped, why.
    pub fn put_new_flows(&self, entries: &[(fo_flow_key, fo_flow)]) -> (usize, Option<PutError>) {
        use std::os::fd::AsRawFd;
        if entries.is_empty() {
            return (0, None);
        }
        let keys: Vec<u8> = entries.iter().flat_map(|(k, _)| bytes_of(k).iter().copied()).collect();
        let vals: Vec<u8> = entries.iter().flat_map(|(_, v)| bytes_of(v).iter().copied()).collect();
        let opts = libbpf_sys::bpf_map_batch_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
            ..Default::default()
        };
        let mut count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        // SAFETY: keys and values hold `count` entries of the map's key and
        // value sizes; count and opts are valid for the call.
        let rc = unsafe {
            libbpf_sys::bpf_map_update_batch(
                self.skel.maps.fo_flows.as_fd().as_raw_fd(),
                keys.as_ptr().cast(),
                vals.as_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let done = (count as usize).min(entries.len());
        match rc {
            0 => (done, None),
            e if -e == libc::ENOMEM => (done, Some(PutError::NoMemory)),
            e => (done, Some(PutError::Failed(std::io::Error::from_raw_os_error(-e).to_string()))),
        }
    }

    pub fn get_flow(&self, key: &fo_flow_key) -> Option<fo_flow> {
        match self.skel.maps.fo_flows.lookup(bytes_of(key), MapFlags::ANY) {
            Ok(Some(v)) => Some(from_bytes(&v)),
            _ => None,
        }
    }

    pub fn delete_flow(&self, key: &fo_flow_key) {
        let _ = self.skel.maps.fo_flows.delete(bytes_of(key));
    }

    pub fn flow_keys(&self) -> Vec<fo_flow_key> {
        self.skel.maps.fo_flows.keys().map(|k| from_bytes(&k)).collect()
    }

    /// Sum of the per-CPU counters, in `STAT_NAMES` order.
    pub fn stats(&self) -> Vec<u64> {
        (0..STAT_NAMES.len() as u32)
            .map(|i| {
                self.skel
                    .maps
                    .fo_stats
                    .lookup_percpu(&i.to_ne_bytes(), MapFlags::ANY)
                    .ok()
                    .flatten()
                    .map(|per_cpu| per_cpu.iter().map(|v| from_bytes::<u64>(v)).sum())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Ask the kernel's FIB (and neighbour table) how a packet would be
    /// forwarded, through `bpf_fib_lookup` run by BPF_PROG_TEST_RUN.
    pub fn fib_query(&self, req: &fo_fib_req) -> Result<fo_fib_req> {
        let input = bytes_of(req).to_vec();
        let mut out = vec![0u8; input.len()];
        let opts = libbpf_rs::ProgramInput { data_in: Some(&input), data_out: Some(&mut out), ..Default::default() };
        let r = self.skel.progs.fo_fib_query.test_run(opts).context("route lookup (bpf_fib_lookup) failed")?;
        if r.return_value != 2 {
            bail!("route lookup program returned {}", r.return_value);
        }
        Ok(from_bytes(&out))
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach_all();
    }
}

impl Dataplane {
    /// Watch an egress key of a connection taken off the fast path: the
    /// next packet of it the kernel forwards stamps the entry (see
    /// fo_dormant in bpf/maps.h). Fails when the map is full (a key
    /// already watched is re-armed even then).
    pub fn watch_dormant(&self, key: &fo_flow_key) -> Result<()> {
        self.skel
            .maps
            .fo_dormant
            .update(bytes_of(key), &0u64.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| anyhow!("fo_dormant ({} keys at most): {e}", self.skel.maps.fo_dormant.max_entries()))
    }

    /// Time of the last forwarded packet seen for a watched egress key (0 =
    /// none yet, None = not watched).
    pub fn dormant_seen(&self, key: &fo_flow_key) -> Option<u64> {
        match self.skel.maps.fo_dormant.lookup(bytes_of(key), MapFlags::ANY) {
            Ok(Some(v)) => Some(from_bytes::<u64>(&v)),
            _ => None,
        }
    }

    /// Stamp a watched key as TC egress does (unit tests of the engine).
    #[cfg(test)]
    pub fn test_mark_dormant(&self, key: &fo_flow_key, at_ns: u64) {
        self.skel.maps.fo_dormant.update(bytes_of(key), &at_ns.to_ne_bytes(), MapFlags::ANY).expect("stamp");
    }

    pub fn unwatch_dormant(&self, key: &fo_flow_key) {
        let _ = self.skel.maps.fo_dormant.delete(bytes_of(key));
    }

    /// Tell TC egress how many keys are watched; with none it does not
    /// look at packets at all (see fo_watching in bpf/maps.h).
    pub fn set_watching(&self, n: usize) {
        // TC egress only asks whether anything is watched: write when that
        // changes, not on every key (a burst of new UDP connections arms
        // and drops two keys each).
        let any = n > 0;
        if self.watching.get() == Some(any) {
            return;
        }
        match self.skel.maps.fo_watching.update(&0u32.to_ne_bytes(), &u32::from(any).to_ne_bytes(), MapFlags::ANY) {
            Ok(()) => self.watching.set(Some(any)),
            Err(e) => tracing::warn!("cannot update the dormant watch flag: {e}"),
        }
    }

    /// Tell each managed device's egress watcher what it leaves to a
    /// managed device above it (`fo_watch_below` in bpf/maps.h; pairs of
    /// ifindex and `fo_below` code). New entries first, then the stale
    /// ones go: a watcher never counts what it should leave in between.
    pub fn set_watch_below(&self, below: &[(u32, fo_below)]) {
        let m = &self.skel.maps.fo_watch_below;
        for (i, b) in below {
            if let Err(e) = m.update(&i.to_ne_bytes(), &b.0.to_ne_bytes(), MapFlags::ANY) {
                tracing::warn!("cannot tell the egress watcher on ifindex {i} what is above it: {e}");
            }
        }
        let stale: Vec<Vec<u8>> =
            m.keys().filter(|k| !below.iter().any(|(i, _)| i.to_ne_bytes()[..] == k[..])).collect();
        for k in stale {
            let _ = m.delete(&k);
        }
    }

    /// The channel on which TC egress announces the first forwarded packet
    /// of a dormant connection (fo_wake in bpf/maps.h), by its egress key,
    /// and the fast path the offloaded directions that handed the kernel a
    /// RST it could not judge (fo_rst), by their key: one epoll fd.
    pub fn wake_events(&self) -> Result<WakeEvents> {
        let keys: Rc<RefCell<Vec<fo_flow_key>>> = Rc::default();
        let rsts: Rc<RefCell<Vec<fo_flow_key>>> = Rc::default();
        let mut b = libbpf_rs::RingBufferBuilder::new();
        for (map, sink) in [(&self.skel.maps.fo_wake, Rc::clone(&keys)), (&self.skel.maps.fo_rst, Rc::clone(&rsts))] {
            b.add(map, move |data: &[u8]| {
                if data.len() >= std::mem::size_of::<fo_flow_key>() {
                    sink.borrow_mut().push(from_bytes(data));
                }
                0
            })?;
        }
        // The ring buffer mmaps the maps, which keeps them alive on its own.
        Ok(WakeEvents { rb: b.build().context("opening the wake-up ring buffers")?, keys, rsts })
    }
}

pub const KEY_LEN: usize = std::mem::size_of::<fo_flow_key>();

/// A flow key as the bytes the maps hash, for indexing by key.
pub fn key_bytes(k: &fo_flow_key) -> [u8; KEY_LEN] {
    bytes_of(k).try_into().expect("KEY_LEN bytes")
}

/// Egress keys of dormant connections the kernel forwarded a packet of.
pub struct WakeEvents {
    rb: libbpf_rs::RingBuffer<'static>,
    keys: Rc<RefCell<Vec<fo_flow_key>>>,
    rsts: Rc<RefCell<Vec<fo_flow_key>>>,
}

impl WakeEvents {
    pub fn fd(&self) -> i32 {
        self.rb.epoll_fd()
    }

    /// Everything announced since the last call.
    pub fn drain(&mut self) -> Vec<fo_flow_key> {
        if let Err(e) = self.rb.consume() {
            tracing::warn!("wake-up ring buffer: {e}");
        }
        std::mem::take(&mut *self.keys.borrow_mut())
    }

    /// The keys `fo_rst` announced by the `drain`s so far.
    pub fn take_rsts(&mut self) -> Vec<fo_flow_key> {
        std::mem::take(&mut *self.rsts.borrow_mut())
    }
}

impl Dataplane {
    /// Whether frames arriving by XDP on `ifindex` may carry a partial
    /// checksum (a veth whose peer sends with TX checksum offload on); XDP
    /// hands those to the kernel (fo_csum_ports in bpf/maps.h).
    pub fn set_csum_port(&self, ifindex: u32, partial: bool) -> Result<()> {
        let m = &self.skel.maps.fo_csum_ports;
        let k = ifindex.to_ne_bytes();
        if partial {
            m.update(&k, &[1], MapFlags::ANY).map_err(|e| anyhow!("fo_csum_ports: {e}"))
        } else {
            let _ = m.delete(&k);
            Ok(())
        }
    }

    /// Let XDP redirect to `ifindex` without attaching there (tests, bench).
    pub fn add_xdp_target(&self, ifindex: u32) -> Result<()> {
        self.skel
            .maps
            .fo_tx_ports
            .update(&ifindex.to_ne_bytes(), &ifindex.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| anyhow!("adding ifindex {ifindex} to the XDP redirect map: {e}"))
    }
}

impl Dataplane {
    /// Kernel memory charged to each of the fast path's maps (memlock in
    /// fdinfo: the map's `map_mem_usage`, e.g. htab_map_mem_usage in
    /// kernel/bpf/hashtab.c), by map name.
    pub fn map_memory(&self) -> Vec<(&'static str, u64)> {
        use std::os::fd::AsRawFd;
        let m = &self.skel.maps;
        let fds = [
            ("fo_flows", m.fo_flows.as_fd().as_raw_fd()),
            ("fo_dormant", m.fo_dormant.as_fd().as_raw_fd()),
            ("fo_watching", m.fo_watching.as_fd().as_raw_fd()),
            ("fo_watch_below", m.fo_watch_below.as_fd().as_raw_fd()),
            ("fo_wake", m.fo_wake.as_fd().as_raw_fd()),
            ("fo_rst", m.fo_rst.as_fd().as_raw_fd()),
            ("fo_stats", m.fo_stats.as_fd().as_raw_fd()),
            ("fo_tx_ports", m.fo_tx_ports.as_fd().as_raw_fd()),
            ("fo_csum_ports", m.fo_csum_ports.as_fd().as_raw_fd()),
        ];
        fds.iter()
            .map(|&(name, fd)| {
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
                let memlock = info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok());
                (name, memlock.unwrap_or(0))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_layer_follows_the_arphrd_type() {
        assert_eq!(LinkLayer::of("eth0", libc::ARPHRD_ETHER).unwrap(), LinkLayer::Ethernet);
        assert_eq!(LinkLayer::of("wg0", libc::ARPHRD_NONE).unwrap(), LinkLayer::Ip);
        assert_eq!(LinkLayer::of("pppoe-wan", libc::ARPHRD_PPP).unwrap(), LinkLayer::Ip);
        let e = LinkLayer::of("ib0", 32).unwrap_err().to_string();
        assert!(e.contains("ib0") && e.contains("link type 32"), "{e}");
    }

    /// `--mode xdp` on a device without an Ethernet header is refused
    /// before anything is attached, naming the device and the way out.
    #[test]
    fn xdp_is_refused_on_a_device_without_ethernet() {
        let mut dp = Dataplane::load(16).expect("loading the fast path");
        let e = dp.attach(1, "pppoe-wan", Mode::Xdp, libc::ARPHRD_PPP).unwrap_err().to_string();
        assert!(e.contains("pppoe-wan") && e.contains("no Ethernet header") && e.contains("--mode tc"), "{e}");
        assert!(dp.attached.is_empty());
    }

    /// Rust's view of `enum fo_stat` is the C one: one name per counter, in
    /// index order, and the names `status` shows (and the tests assert)
    /// still sit at their enumerators.
    #[test]
    fn stat_names_follow_enum_fo_stat() {
        assert_eq!(STAT_NAMES.len(), fo_stat::FO_STAT_MAX.0 as usize);
        for (i, n) in STAT_NAMES.iter().enumerate() {
            assert!(!n.is_empty() && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            assert_eq!(STAT_NAMES.iter().position(|m| m == n), Some(i), "{n} named twice");
        }
        let at = |s: fo_stat| STAT_NAMES[s.0 as usize];
        assert_eq!(at(fo_stat::FO_STAT_FWD_PACKETS), "fwd_packets");
        assert_eq!(at(fo_stat::FO_STAT_FWD_BYTES), "fwd_bytes");
        assert_eq!(at(fo_stat::FO_SLOW_NOT_IP), "not_ip");
        assert_eq!(at(fo_stat::FO_SLOW_ENCAP), "encap");
        assert_eq!(at(fo_stat::FO_SLOW_L2_NOT_HOST), "l2_not_host");
        assert_eq!(at(fo_stat::FO_SLOW_MALFORMED), "malformed");
        assert_eq!(at(fo_stat::FO_SLOW_FRAGMENT), "fragment");
        assert_eq!(at(fo_stat::FO_SLOW_IP_OPTIONS), "ip_options");
        assert_eq!(at(fo_stat::FO_SLOW_IPV6_EXT), "ipv6_ext");
        assert_eq!(at(fo_stat::FO_SLOW_NOT_TCP_UDP), "not_tcp_udp");
        assert_eq!(at(fo_stat::FO_SLOW_TTL), "ttl");
        assert_eq!(at(fo_stat::FO_SLOW_TCP_SYN), "tcp_syn");
        assert_eq!(at(fo_stat::FO_SLOW_TCP_FIN), "tcp_fin");
        assert_eq!(at(fo_stat::FO_SLOW_TCP_RST), "tcp_rst");
        assert_eq!(at(fo_stat::FO_SLOW_NO_FLOW), "no_flow");
        assert_eq!(at(fo_stat::FO_SLOW_TEARDOWN), "teardown");
        assert_eq!(at(fo_stat::FO_SLOW_MTU), "mtu");
        assert_eq!(at(fo_stat::FO_SLOW_XDP_TARGET), "xdp_target");
        assert_eq!(at(fo_stat::FO_SLOW_STALE_ENGINE), "stale_engine");
    }
}
