//! TC without TCX (kernels before 6.6): a clsact qdisc and cls_bpf
//! direct-action filters, through libbpf's netlink calls.
//!
//! A TCX link belongs to the process: the kernel detaches it when the last
//! fd goes. A cls_bpf filter belongs to the device, so:
//!
//! * a clean stop (Drop) removes exactly the filters this engine added,
//!   each by its handle and priority and only while it still runs our
//!   program (`bpf_tc_query`), then the clsact qdisc, only if this engine
//!   created it and no filter is left on it;
//! * a killed engine (kill -9, a crash) cannot: its filters stay, but they
//!   forward nothing, since the fast path steps aside once the engine's
//!   heartbeat is older than FO_STALE_ENGINE_NS (3 s: every packet then
//!   goes on to the kernel, counted `stale_engine`, and TC_ACT_UNSPEC lets
//!   the next filter or the stack have it: `cls_bpf_classify`,
//!   net/sched/cls_bpf.c);
//! * the next start on that interface removes such leftovers (`sweep`),
//!   read by program name and judged by that program's own heartbeat: a
//!   leftover whose heartbeat is fresh belongs to an engine that runs, and
//!   the start is refused instead; `check` lists them with the command that
//!   removes them.
//!
//! Our filters are put before the other filters on the device (the lowest
//! priority number), as TCX programs run before every classic filter
//! (`sch_handle_ingress`, net/core/dev.c), so the device hooks
//! (`crate::hooks`) mean the same thing in both cases.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Result};

use crate::hooks::tc::{self, PARENT_EGRESS, PARENT_INGRESS};

/// The fast path's programs that go on TC (bpf/fastpath.bpf.c): a cls_bpf
/// filter running one of them is ours, or a leftover of ours.
pub const OWN_TC_PROGS: [&str; 4] = ["fo_tc", "fo_tc_l3", "fo_tc_egress", "fo_tc_egress_l3"];

/// FO_STALE_ENGINE_NS (bpf/flow.h): past it a fast path forwards nothing.
const STALE_NS: u64 = 3_000_000_000;

fn errno(r: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(-r)
}

fn hook(ifindex: u32, attach_point: u32) -> libbpf_sys::bpf_tc_hook {
    libbpf_sys::bpf_tc_hook {
        sz: std::mem::size_of::<libbpf_sys::bpf_tc_hook>() as _,
        ifindex: ifindex as i32,
        attach_point,
        ..Default::default()
    }
}

fn opts(handle: u32, priority: u32) -> libbpf_sys::bpf_tc_opts {
    libbpf_sys::bpf_tc_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_tc_opts>() as _,
        handle,
        priority,
        ..Default::default()
    }
}

fn side(attach_point: u32) -> &'static str {
    if attach_point == libbpf_sys::BPF_TC_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// One filter we added.
#[derive(Debug, Clone, Copy)]
struct Added {
    attach_point: u32,
    handle: u32,
    priority: u32,
    prog_id: u32,
}

/// Our filters on one device, and whether we created its clsact qdisc.
/// Dropping it removes them (see the module's comment).
#[derive(Debug)]
pub struct Clsact {
    ifindex: u32,
    ifname: String,
    created: bool,
    added: Vec<Added>,
}

impl Clsact {
    /// The device's clsact qdisc, created if it has none.
    pub fn open(ifindex: u32, ifname: &str) -> Result<Self> {
        let mut h = hook(ifindex, libbpf_sys::BPF_TC_INGRESS | libbpf_sys::BPF_TC_EGRESS);
        // SAFETY: a valid hook struct; returns 0 or -errno.
        let r = unsafe { libbpf_sys::bpf_tc_hook_create(&mut h) };
        let created = match -r {
            0 => true,
            libc::EEXIST => false,
            _ => bail!("cannot add a clsact qdisc to {ifname} (no TCX on this kernel): {}", errno(r)),
        };
        Ok(Clsact { ifindex, ifname: ifname.into(), created, added: Vec::new() })
    }

    /// Add `prog` as a direct-action filter on the ingress or egress side,
    /// before the filters already there.
    pub fn attach(&mut self, prog_fd: i32, prog_id: u32, ingress: bool, what: &str) -> Result<()> {
        let (ap, parent) = if ingress {
            (libbpf_sys::BPF_TC_INGRESS, PARENT_INGRESS)
        } else {
            (libbpf_sys::BPF_TC_EGRESS, PARENT_EGRESS)
        };
        // Lower numbers run first (tcf_classify walks the chain in
        // priority order). 0 lets the kernel pick (tcf_auto_prio).
        let lowest = tc::filters(self.ifindex, parent).ok().and_then(|v| v.iter().map(|f| f.pref).min());
        let priority = match lowest {
            None => 1,
            Some(p) if p > 1 => u32::from(p) - 1,
            Some(_) => 0,
        };
        let h = hook(self.ifindex, ap);
        let mut o = libbpf_sys::bpf_tc_opts { prog_fd, ..opts(0, priority) };
        // SAFETY: valid hook and opts; libbpf fills in handle, priority and
        // prog_id from the kernel's echo.
        let r = unsafe { libbpf_sys::bpf_tc_attach(&h, &mut o) };
        if r < 0 {
            let hint = if ingress {
                ""
            } else {
                " (an `ingress` qdisc instead of clsact has no egress side: replace it with clsact)"
            };
            bail!(
                "cannot attach TC ({what}) to {} as a cls_bpf filter (no TCX on this kernel): {}{hint}",
                self.ifname,
                errno(r)
            );
        }
        let prog_id = if o.prog_id != 0 { o.prog_id } else { prog_id };
        self.added.push(Added { attach_point: ap, handle: o.handle, priority: o.priority, prog_id });
        Ok(())
    }

    /// "clsact (ours): ingress pref 1 handle 0x1, egress pref 1 handle 0x1".
    pub fn describe(&self) -> String {
        let f: Vec<String> = self
            .added
            .iter()
            .map(|a| format!("{} pref {} handle {:#x}", side(a.attach_point), a.priority, a.handle))
            .collect();
        format!("clsact{}: cls_bpf {}", if self.created { " (created)" } else { "" }, f.join(", "))
    }
}

impl Drop for Clsact {
    fn drop(&mut self) {
        for a in self.added.drain(..).rev() {
            let h = hook(self.ifindex, a.attach_point);
            let mut q = opts(a.handle, a.priority);
            // SAFETY: valid hook and opts.
            let r = unsafe { libbpf_sys::bpf_tc_query(&h, &mut q) };
            if r < 0 {
                // Gone already (the device, the qdisc, or someone deleted it).
                tracing::debug!(iface = %self.ifname, "our tc filter is gone: {}", errno(r));
                continue;
            }
            if q.prog_id != a.prog_id {
                tracing::warn!(
                    iface = %self.ifname,
                    "tc {} filter pref {} handle {:#x} now runs program {}, not ours: left in place",
                    side(a.attach_point),
                    a.priority,
                    a.handle,
                    q.prog_id
                );
                continue;
            }
            let d = opts(a.handle, a.priority);
            // SAFETY: valid hook and opts (handle and priority only).
            let r = unsafe { libbpf_sys::bpf_tc_detach(&h, &d) };
            if r < 0 {
                tracing::warn!(iface = %self.ifname, "removing our tc filter: {}", errno(r));
            }
        }
        if !self.created {
            return;
        }
        let empty = |parent| tc::filters(self.ifindex, parent).is_ok_and(|v| v.is_empty());
        if empty(PARENT_INGRESS) && empty(PARENT_EGRESS) {
            let mut h = hook(self.ifindex, libbpf_sys::BPF_TC_INGRESS | libbpf_sys::BPF_TC_EGRESS);
            // SAFETY: a valid hook; ingress|egress deletes the qdisc.
            let r = unsafe { libbpf_sys::bpf_tc_hook_destroy(&mut h) };
            if r < 0 && -r != libc::ENOENT {
                tracing::warn!(iface = %self.ifname, "removing the clsact qdisc we added: {}", errno(r));
            }
        } else {
            tracing::info!(iface = %self.ifname, "other tc filters on it: the clsact qdisc we added stays");
        }
    }
}

/// A cls_bpf filter of one of our programs on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnFilter {
    pub ingress: bool,
    pub pref: u16,
    pub handle: u32,
    pub prog_id: u32,
    pub name: String,
    /// How long ago its engine last beat (None: not readable).
    pub beat_age_ns: Option<u64>,
}

impl OwnFilter {
    /// Its engine no longer runs: the program forwards nothing.
    pub fn stale(&self) -> bool {
        self.beat_age_ns.is_none_or(|a| a > STALE_NS)
    }

    /// The tc(8) command that removes it.
    pub fn remove_command(&self, ifname: &str) -> String {
        format!(
            "tc filter del dev {ifname} {} pref {} handle {:#x} bpf",
            if self.ingress { "ingress" } else { "egress" },
            self.pref,
            self.handle
        )
    }

    /// "ingress pref 1 handle 0x1: fo_tc (id 42), heartbeat 12.3 s old".
    pub fn describe(&self) -> String {
        let beat = match self.beat_age_ns {
            Some(a) => format!("heartbeat {:.1} s old", a as f64 / 1e9),
            None => "heartbeat unreadable".into(),
        };
        format!(
            "{} pref {} handle {:#x}: {} (id {}), {beat}",
            if self.ingress { "ingress" } else { "egress" },
            self.pref,
            self.handle,
            self.name,
            self.prog_id
        )
    }
}

/// The cls_bpf filters of our programs on `ifindex` (none without a clsact
/// or ingress qdisc), each with its engine's heartbeat.
pub fn own_filters(ifindex: u32) -> Result<Vec<OwnFilter>> {
    let hooked = tc::qdiscs()?.iter().any(|q| q.ifindex == ifindex && q.is_hook());
    if !hooked {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (ingress, parent) in [(true, PARENT_INGRESS), (false, PARENT_EGRESS)] {
        // The ingress qdisc has no egress side: nothing there.
        let Ok(filters) = tc::filters(ifindex, parent) else { continue };
        for f in filters.iter().filter(|f| f.kind == "bpf") {
            for p in &f.bpf {
                let name = prog_name(p.id).unwrap_or_else(|| p.name.clone());
                if OWN_TC_PROGS.contains(&name.as_str()) {
                    let beat_age_ns = engine_beat(p.id).map(|b| crate::engine::now_ns().saturating_sub(b));
                    out.push(OwnFilter { ingress, pref: f.pref, handle: p.handle, prog_id: p.id, name, beat_age_ns });
                }
            }
        }
    }
    Ok(out)
}

/// Before attaching to `ifname`: remove the filters a killed engine left
/// there; refuse if a running engine's are there.
pub fn sweep(ifindex: u32, ifname: &str) -> Result<()> {
    let found = match own_filters(ifindex) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(iface = %ifname, "cannot look for leftover tc filters: {e:#}");
            return Ok(());
        }
    };
    for f in found {
        if !f.stale() {
            bail!(
                "another nft-offload engine is attached to {ifname} (tc {}): stop it first, or run one engine per \
                 interface",
                f.describe()
            );
        }
        let ap = if f.ingress { libbpf_sys::BPF_TC_INGRESS } else { libbpf_sys::BPF_TC_EGRESS };
        let d = opts(f.handle, u32::from(f.pref));
        // SAFETY: valid hook and opts (handle and priority only).
        let r = unsafe { libbpf_sys::bpf_tc_detach(&hook(ifindex, ap), &d) };
        if r < 0 {
            tracing::warn!(iface = %ifname, "cannot remove a leftover tc filter ({}): {}", f.describe(), errno(r));
        } else {
            tracing::warn!(
                iface = %ifname,
                "removed a tc filter a stopped nft-offload engine left ({}); it was forwarding nothing",
                f.describe()
            );
        }
    }
    Ok(())
}

/// A loaded program's name (BPF_OBJ_GET_INFO_BY_FD).
pub fn prog_name(id: u32) -> Option<String> {
    let fd = prog_fd(id)?;
    // SAFETY: a zeroed plain struct whose size we pass in.
    let mut info: libbpf_sys::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: valid fd and buffer.
    if unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) } != 0 {
        return None;
    }
    // SAFETY: the kernel NUL-terminates the name.
    Some(unsafe { CStr::from_ptr(info.name.as_ptr()) }.to_string_lossy().into_owned())
}

fn prog_fd(id: u32) -> Option<OwnedFd> {
    // SAFETY: returns a new fd or -errno.
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(id) };
    // SAFETY: a new fd we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The id of the program behind `fd`.
pub fn prog_id(fd: i32) -> Option<u32> {
    // SAFETY: as in prog_name.
    let mut info: libbpf_sys::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: valid buffer; a bad fd is an error return.
    (unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len) } == 0).then_some(info.id)
}

/// The heartbeat (`fo_engine_beat_ns`) of the engine that loaded program
/// `id`: read from the program's own .bss map, at the offset its BTF gives
/// the variable.
fn engine_beat(id: u32) -> Option<u64> {
    let fd = prog_fd(id)?;
    let mut maps = [0u32; 16];
    // SAFETY: zeroed plain struct; map_ids points at `nr_map_ids` u32s.
    let mut info: libbpf_sys::bpf_prog_info = unsafe { std::mem::zeroed() };
    info.nr_map_ids = maps.len() as u32;
    info.map_ids = maps.as_mut_ptr() as u64;
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: valid fd and buffers.
    if unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) } != 0 {
        return None;
    }
    let offset = beat_offset(id)?;
    for &map_id in &maps[..(info.nr_map_ids as usize).min(maps.len())] {
        // SAFETY: returns a new fd or -errno.
        let mfd = unsafe { libbpf_sys::bpf_map_get_fd_by_id(map_id) };
        if mfd < 0 {
            continue;
        }
        // SAFETY: a new fd we own.
        let mfd = unsafe { OwnedFd::from_raw_fd(mfd) };
        // SAFETY: as above, for a map.
        let mut mi: libbpf_sys::bpf_map_info = unsafe { std::mem::zeroed() };
        let mut mlen = std::mem::size_of::<libbpf_sys::bpf_map_info>() as u32;
        // SAFETY: valid fd and buffer.
        if unsafe { libbpf_sys::bpf_map_get_info_by_fd(mfd.as_raw_fd(), &mut mi, &mut mlen) } != 0 {
            continue;
        }
        // SAFETY: NUL-terminated by the kernel.
        let name = unsafe { CStr::from_ptr(mi.name.as_ptr()) }.to_string_lossy();
        if !name.ends_with(".bss") || (mi.value_size as usize) < offset + 8 {
            continue;
        }
        let mut value = vec![0u8; mi.value_size as usize];
        let key = 0u32;
        // SAFETY: key and value of the map's sizes.
        let r = unsafe {
            libbpf_sys::bpf_map_lookup_elem(mfd.as_raw_fd(), (&key as *const u32).cast(), value.as_mut_ptr().cast())
        };
        if r == 0 {
            return Some(u64::from_ne_bytes(value[offset..offset + 8].try_into().ok()?));
        }
    }
    None
}

/// Where `fo_engine_beat_ns` sits in the .bss of program `id`'s object.
fn beat_offset(id: u32) -> Option<usize> {
    use libbpf_rs::btf::types::{DataSec, Var};
    let btf = libbpf_rs::btf::Btf::from_prog_id(id).ok()?;
    let bss: DataSec = btf.type_by_name(".bss")?;
    let found = bss.iter().find_map(|v| {
        let var: Var = btf.type_by_id(v.ty)?;
        (var.name()?.to_str()? == "fo_engine_beat_ns").then_some(v.offset as usize)
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{Dataplane, Mode, Probe};
    use std::process::Command;

    #[test]
    fn a_leftover_says_how_to_remove_it() {
        let f = OwnFilter {
            ingress: true,
            pref: 1,
            handle: 1,
            prog_id: 42,
            name: "fo_tc".into(),
            beat_age_ns: Some(12_300_000_000),
        };
        assert!(f.stale());
        assert_eq!(f.remove_command("eth0"), "tc filter del dev eth0 ingress pref 1 handle 0x1 bpf");
        assert_eq!(f.describe(), "ingress pref 1 handle 0x1: fo_tc (id 42), heartbeat 12.3 s old");
        let live = OwnFilter { ingress: false, beat_age_ns: Some(100_000_000), ..f.clone() };
        assert!(!live.stale());
        assert!(OwnFilter { beat_age_ns: None, ..f }.stale(), "unreadable counts as stopped");
    }

    /// Another engine's heartbeat is read from its program's .bss.
    #[test]
    fn the_heartbeat_of_a_program_is_read_from_its_bss() {
        let mut dp = Dataplane::load(16).expect("loading the fast path");
        let ids = dp.own_prog_ids();
        for beat in [12_345u64, 1 << 40] {
            dp.set_heartbeat(beat);
            for id in &ids {
                assert_eq!(engine_beat(*id), Some(beat), "program {id}");
            }
        }
    }

    fn sh(args: &[&str]) {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn clsact_on(ifindex: u32) -> bool {
        tc::qdiscs().unwrap().iter().any(|q| q.ifindex == ifindex && q.is_hook() && q.kind == "clsact")
    }

    /// The clsact path on this (TCX) kernel, as a 6.1 engine runs it: our
    /// filters go before the others and leave with a clean stop (the qdisc
    /// too, when we made it and nothing else is on it); a second engine is
    /// refused while the first beats; a killed engine's filters are
    /// removed by the next start. Needs root.
    #[test]
    fn clsact_filters_are_ours_to_remove() {
        // SAFETY: trivial syscall.
        assert_eq!(unsafe { libc::geteuid() }, 0, "needs root (netns, BPF)");
        let r = std::thread::spawn(|| {
            // SAFETY: affects only this thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            sh(&["ip", "link", "set", "lo", "up"]);
            sh(&["ip", "link", "add", "ta", "type", "veth", "peer", "name", "tb"]);
            sh(&["ip", "link", "set", "ta", "up"]);
            sh(&["ip", "link", "set", "tb", "up"]);
            let (ta, tb) = (crate::routes::link::ifindex("ta").unwrap(), crate::routes::link::ifindex("tb").unwrap());
            let probe = Probe { tcx: Err(libc::EINVAL), ..Probe::kernel() };
            let load = || Dataplane::load_for(16, &probe).expect("loading the fast path");
            let eth = libc::ARPHRD_ETHER;

            let mut dp = load();
            dp.attach(ta, "ta", Mode::Tc, eth).unwrap();
            assert!(clsact_on(ta));
            let own = own_filters(ta).unwrap();
            let names: Vec<&str> = own.iter().map(|o| o.name.as_str()).collect();
            assert_eq!(names, ["fo_tc", "fo_tc_egress"]);
            assert!(own.iter().all(|o| !o.stale() && o.pref == 1), "{own:?}");
            let ids = dp.own_prog_ids();
            assert!(own.iter().all(|o| ids.contains(&o.prog_id)), "{own:?} vs {ids:?}");
            assert!(dp.attach_description(ta).unwrap().starts_with("clsact (created): cls_bpf ingress pref 1"));
            // Not a hook the fast path skips.
            let port = crate::hooks::Port { ifindex: ta, name: "ta".into(), xdp: false, bridge: None, uppers: vec![] };
            let h = crate::hooks::read(std::slice::from_ref(&port), &|p| ids.contains(&p.id));
            assert!(h.ports[&ta].ingress_filters.is_empty() && h.ports[&ta].egress_filters.is_empty(), "{h:?}");
            let h = crate::hooks::read(std::slice::from_ref(&port), &|_| false);
            assert_eq!(h.ports[&ta].ingress_filters[0].kind, "bpf", "someone else's would count");

            // A second engine on the same port while this one beats.
            let mut other = load();
            let e = other.attach(ta, "ta", Mode::Tc, eth).unwrap_err().to_string();
            assert!(e.contains("another nft-offload engine is attached to ta"), "{e}");

            // Someone else's filter on tb: ours go before it, and only ours
            // (and no qdisc of theirs) leave with us.
            sh(&["tc", "qdisc", "add", "dev", "tb", "clsact"]);
            sh(&[
                "tc", "filter", "add", "dev", "tb", "ingress", "pref", "5", "protocol", "all", "u32", "match", "u32",
                "0", "0", "classid", "1:1",
            ]);
            dp.attach(tb, "tb", Mode::Xdp, eth).unwrap_or_else(|e| panic!("{e:#}"));
            let own = own_filters(tb).unwrap();
            assert_eq!(own.len(), 1, "XDP mode: the egress watcher only: {own:?}");
            assert!(dp.attach_description(tb).unwrap().starts_with("xdp link (native), egress watcher: clsact: "));
            let before = tc::filters(tb, PARENT_INGRESS).unwrap();
            drop(dp);
            assert!(!clsact_on(ta), "we made it, nothing else is on it: gone");
            assert!(own_filters(ta).unwrap().is_empty());
            assert!(clsact_on(tb), "not ours");
            assert_eq!(tc::filters(tb, PARENT_INGRESS).unwrap(), before, "their filter stays");
            assert!(tc::filters(tb, PARENT_EGRESS).unwrap().is_empty());

            // kill -9: no Drop, and the heartbeat stops.
            let mut dead = load();
            dead.attach(ta, "ta", Mode::Tc, eth).unwrap();
            dead.set_heartbeat(1);
            std::mem::forget(dead);
            let left = own_filters(ta).unwrap();
            assert!(left.len() == 2 && left.iter().all(OwnFilter::stale), "{left:?}");
            other.attach(ta, "ta", Mode::Tc, eth).unwrap_or_else(|e| panic!("{e:#}"));
            let now = own_filters(ta).unwrap();
            let ids = other.own_prog_ids();
            assert!(now.len() == 2 && now.iter().all(|o| ids.contains(&o.prog_id) && !o.stale()), "{now:?}");
            drop(other);
            assert!(own_filters(ta).unwrap().is_empty());
            assert!(clsact_on(ta), "the killed engine's qdisc: not known to be ours, left (empty, harmless)");
        })
        .join();
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    }
}
