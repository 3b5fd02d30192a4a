//! The engine: follows conntrack, decides which connections take the fast
//! path, programs the maps, keeps offloaded connections alive in conntrack,
//! and takes them off the fast path when they end or the network changes.
//! One thread, one poll loop; every source of change is a file descriptor.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::conntrack::{status, CtEntry, CtError, CtEvent, CtSocket, CtTuple, CtUpdate};
use crate::control::ControlServer;
use crate::dataplane::{fo_flow, Dataplane, Mode, STAT_NAMES};
use crate::flow::entry::words_addr;
use crate::flow::{build_direction, decide, eligible, Action, CtTimeouts, Direction, FlowClock, TeardownReason};
use crate::policy::nft::{self, Ruleset};
use crate::policy::{choose_modes, ModeChoice};
use crate::routes::{self, link, RouteWatch};
use crate::settings::Settings;

/// A connection is identified by its original tuple and zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FlowId {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    zone: u16,
}

impl FlowId {
    fn of(e: &CtEntry) -> Self {
        FlowId {
            src: e.orig.src,
            dst: e.orig.dst,
            proto: e.orig.proto,
            sport: e.orig.sport,
            dport: e.orig.dport,
            zone: e.zone,
        }
    }
}

struct Offloaded {
    entry: CtEntry,
    dirs: [Direction; 2],
    clock: FlowClock,
    /// Counters of map entries this connection had before a rewrite.
    base: [(u64, u64); 2],
    /// Latest map values, for display.
    last: [fo_flow; 2],
}

struct Dormant {
    entry: CtEntry,
    keys: [crate::dataplane::fo_flow_key; 2],
    since_ns: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct IfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub driver: String,
    pub mode: Mode,
    pub reason: String,
    pub up: bool,
}

impl IfaceStatus {
    fn new(info: &link::LinkInfo, d: crate::policy::ModeDecision) -> Self {
        IfaceStatus {
            name: info.name.clone(),
            ifindex: info.ifindex,
            driver: info.driver.clone(),
            mode: d.mode,
            reason: d.reason,
            up: info.up,
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
struct Counters {
    offloads: u64,
    ct_events: u64,
    ct_resyncs: u64,
    ct_refreshes: u64,
    teardowns: BTreeMap<&'static str, u64>,
    not_offloaded: BTreeMap<String, u64>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer. CLOCK_MONOTONIC_COARSE is what the fast path's
    // bpf_ktime_get_coarse_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn read_sysctl(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}")).ok()?.trim().parse().ok()
}

fn ct_timeouts() -> CtTimeouts {
    let d = CtTimeouts::default();
    CtTimeouts {
        tcp_established: read_sysctl("nf_conntrack_tcp_timeout_established").unwrap_or(d.tcp_established),
        udp: read_sysctl("nf_conntrack_udp_timeout").unwrap_or(d.udp),
        udp_stream: read_sysctl("nf_conntrack_udp_timeout_stream").unwrap_or(d.udp_stream),
    }
}

/// Checks that must pass before anything is touched.
pub fn preflight() -> Result<()> {
    use crate::check::{effective_caps, CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN};
    let caps = effective_caps().unwrap_or(0);
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    if !has(CAP_NET_ADMIN) || !(has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        bail!("insufficient privileges: nft-offload needs CAP_BPF and CAP_NET_ADMIN (run as root)");
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("this kernel has no BTF (/sys/kernel/btf/vmlinux missing): it needs CONFIG_DEBUG_INFO_BTF=y");
    }
    Ok(())
}

pub struct Engine {
    cfg: Settings,
    dp: Dataplane,
    ifaces: Vec<IfaceStatus>,
    flows: HashMap<FlowId, Offloaded>,
    pending: HashMap<FlowId, CtEntry>,
    dormant: HashMap<FlowId, Dormant>,
    ct_ev: CtSocket,
    ct_req: CtSocket,
    rtw: RouteWatch,
    ctl: ControlServer,
    timeouts: CtTimeouts,
    n: Counters,
    started: Instant,
    route_dirty: Option<Instant>,
    /// The loaded ruleset in nft mode.
    ruleset: Option<Ruleset>,
    /// Last labels seen per connection (nft mode): events carry labels only
    /// when they change, and the `flow add` label is usually set on the
    /// first packet, long before the connection is ESTABLISHED.
    labels_seen: HashMap<FlowId, [u8; 16]>,
    /// When the batch of conntrack events being handled was read.
    events_at: Option<Instant>,
    /// Event-to-installed times of recent offloads, microseconds.
    offload_us: std::collections::VecDeque<u32>,
}

impl Engine {
    /// Validate, load, attach. On any error nothing stays attached: the
    /// dataplane's links are dropped with it.
    pub fn start(mut cfg: Settings) -> Result<Self> {
        preflight()?;
        let ruleset = match &cfg.nft {
            Some(path) => {
                let rs = Ruleset::read(path)?;
                if rs.translated.flowtables.is_empty() {
                    bail!(
                        "{} declares no flowtable, so nothing would be offloaded: add one \
                         (flowtable ft {{ hook ingress priority 0; devices = {{ lan0, wan0 }}; }}) \
                         and `flow add @ft` in the forward chain",
                        path.display()
                    );
                }
                if !cfg.ifaces.is_empty() {
                    bail!("--iface and --nft exclude each other: the devices come from the ruleset's flowtables");
                }
                // nft's dry run first: a ruleset nft rejects loads nothing
                // and attaches nothing.
                rs.apply(&[], true)?;
                cfg.ifaces = rs.devices();
                announce_flowtables(&rs);
                Some(rs)
            }
            None => None,
        };
        if cfg.ifaces.is_empty() {
            bail!("no interfaces given: use --iface IF (at least two for forwarding)");
        }
        let mut infos = Vec::new();
        for name in &cfg.ifaces {
            if infos.iter().any(|i: &link::LinkInfo| &i.name == name) {
                bail!("interface {name} given twice");
            }
            infos.push(link::info(name)?);
        }
        let ctl = ControlServer::bind()?;
        let mut dp = Dataplane::load(cfg.max_flows)?;
        let decisions = choose_modes(&infos, cfg.mode);
        let mut ifaces = Vec::new();
        for (info, d) in infos.iter().zip(decisions) {
            dp.attach(info.ifindex, &info.name, d.mode)?;
            tracing::info!(iface = %info.name, mode = d.mode.as_str(), reason = %d.reason, "attached");
            ifaces.push(IfaceStatus::new(info, d));
        }
        // Subscribe before dumping so no change falls between the two.
        let ct_ev = CtSocket::events().context("subscribing to conntrack events")?;
        let ct_req = CtSocket::request().context("opening a conntrack request socket")?;
        let rtw = RouteWatch::new().context("subscribing to rtnetlink")?;
        if let Some(rs) = &ruleset {
            // Attached first, ruleset second: if nft fails now the engine is
            // dropped and detaches; nothing stays half-applied.
            rs.apply(&[], false)?;
            tracing::info!(file = %rs.path.display(), flowtables = rs.translated.flowtables.len(), "ruleset loaded");
        }
        let mut e = Engine {
            cfg,
            dp,
            ifaces,
            flows: HashMap::new(),
            pending: HashMap::new(),
            dormant: HashMap::new(),
            ct_ev,
            ct_req,
            rtw,
            ctl,
            timeouts: ct_timeouts(),
            n: Counters::default(),
            started: Instant::now(),
            route_dirty: None,
            ruleset,
            labels_seen: HashMap::new(),
            events_at: None,
            offload_us: std::collections::VecDeque::new(),
        };
        e.resync().context("initial conntrack dump")?;
        Ok(e)
    }

    /// Run until SIGINT/SIGTERM. Dropping the engine afterwards detaches.
    pub fn run(&mut self) -> Result<()> {
        install_signal_handlers();
        tracing::info!(flows = self.flows.len(), "running");
        let mut last_tick = Instant::now();
        while !STOP.load(Ordering::SeqCst) {
            let mut fds = [
                libc::pollfd { fd: self.ct_ev.fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.rtw.fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.ctl.fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: valid array of pollfds.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 100) };
            if fds[0].revents != 0 {
                self.on_ct_events();
            }
            if fds[1].revents != 0 {
                self.on_route_events();
            }
            if fds[2].revents != 0 {
                let ctl = std::mem::replace(&mut self.ctl, ControlServer::placeholder());
                ctl.serve(|req| self.answer(req));
                self.ctl = ctl;
            }
            if self.route_dirty.is_some_and(|t| t.elapsed() >= Duration::from_millis(50)) {
                self.route_dirty = None;
                self.reresolve_all();
            }
            if last_tick.elapsed() >= Duration::from_millis(250) {
                last_tick = Instant::now();
                self.tick();
            }
        }
        tracing::info!("stopping: detaching; connections continue through the kernel");
        Ok(())
    }

    fn managed(&self, ifindex: u32) -> Option<&IfaceStatus> {
        self.ifaces.iter().find(|i| i.ifindex == ifindex)
    }

    fn not_offloaded(&mut self, why: impl Into<String>) {
        *self.n.not_offloaded.entry(why.into()).or_default() += 1;
    }

    fn on_ct_events(&mut self) {
        match self.ct_ev.recv_events() {
            Ok(evs) => {
                self.events_at = Some(Instant::now());
                for ev in evs {
                    self.n.ct_events += 1;
                    self.on_ct_event(ev);
                }
                self.events_at = None;
            }
            Err(CtError::Overrun) => {
                // Events were lost: the table is the truth (as conntrackd).
                tracing::warn!("conntrack event overrun; resyncing from a full dump");
                self.n.ct_resyncs += 1;
                if let Err(e) = self.resync() {
                    tracing::error!("conntrack resync failed: {e:#}");
                }
            }
            Err(e) => tracing::warn!("conntrack events: {e}"),
        }
    }

    fn on_ct_event(&mut self, ev: CtEvent) {
        match ev {
            CtEvent::New(e) | CtEvent::Update(e) => self.consider(e),
            CtEvent::Destroy(e) => {
                let id = FlowId::of(&e);
                self.pending.remove(&id);
                self.labels_seen.remove(&id);
                if let Some(d) = self.dormant.remove(&id) {
                    d.keys.iter().for_each(|k| self.dp.unwatch_dormant(k));
                }
                if self.flows.contains_key(&id) {
                    self.teardown(&id, TeardownReason::ConntrackDestroyed);
                }
            }
        }
    }

    /// Full dump: offload what is eligible, drop what vanished.
    fn resync(&mut self) -> Result<()> {
        let all = self.ct_req.dump()?;
        let present: std::collections::HashSet<FlowId> = all.iter().map(FlowId::of).collect();
        let gone: Vec<FlowId> = self.flows.keys().filter(|id| !present.contains(id)).copied().collect();
        for id in gone {
            self.teardown(&id, TeardownReason::ConntrackDestroyed);
        }
        self.pending.retain(|id, _| present.contains(id));
        self.labels_seen.retain(|id, _| present.contains(id));
        self.dormant.retain(|id, _| present.contains(id));
        for e in all {
            self.consider(e);
        }
        Ok(())
    }

    /// A conntrack entry appeared or changed.
    fn consider(&mut self, mut e: CtEntry) {
        let id = FlowId::of(&e);
        // Update events carry the TCP state only when it changed
        // (ctnetlink_conntrack_event sends CTA_PROTOINFO on IPCT_PROTOINFO),
        // and labels likewise only on IPCT_LABEL.
        if self.ruleset.is_some() {
            tracing::trace!(?id, labels = ?e.labels, state = ?e.tcp_state, status = e.status, "conntrack entry");
            match e.labels {
                Some(l) => {
                    self.labels_seen.insert(id, l);
                }
                None => e.labels = self.labels_seen.get(&id).copied(),
            }
        }
        let known = self
            .flows
            .get(&id)
            .map(|f| f.entry.clone())
            .or_else(|| self.dormant.get(&id).map(|d| d.entry.clone()))
            .or_else(|| self.pending.get(&id).cloned());
        if let Some(k) = &known {
            if e.tcp_state.is_none() {
                e.tcp_state = k.tcp_state;
            }
            e.has_helper |= k.has_helper;
            // The user's ruleset changed its mind about this connection
            // (our label cleared, its mark changed): the kernel's firewall
            // decides again.
            if self.ruleset.is_some() && (!self.offload_requested(&e) || k.mark != e.mark) {
                if self.flows.contains_key(&id) {
                    self.teardown(&id, TeardownReason::Policy);
                } else if let Some(d) = self.dormant.remove(&id) {
                    d.keys.iter().for_each(|k| self.dp.unwatch_dormant(k));
                    self.forget_offload_request(&d.entry);
                }
                self.pending.remove(&id);
                return;
            }
        }
        if self.flows.contains_key(&id) && self.cfg.exclude.excludes(&e).is_some() {
            self.teardown(&id, TeardownReason::Policy);
            return;
        }
        if let Some(f) = self.flows.get_mut(&id) {
            match eligible(&e) {
                Ok(()) => f.entry = e,
                Err(_) => {
                    let td = f.last.iter().map(|v| v.teardown).max().unwrap_or(0);
                    let reason = match (TeardownReason::from_fast_path(td), e.tcp_state) {
                        (Some(r), _) => r,
                        (None, Some(s)) if s > crate::conntrack::tcp_state::ESTABLISHED => TeardownReason::TcpFin,
                        _ => TeardownReason::NoLongerEligible,
                    };
                    self.teardown(&id, reason);
                }
            }
            return;
        }
        if let Some(d) = self.dormant.get_mut(&id) {
            if eligible(&e).is_ok() {
                d.entry = e;
            } else {
                let d = self.dormant.remove(&id).expect("present");
                d.keys.iter().for_each(|k| self.dp.unwatch_dormant(k));
            }
            return;
        }
        if !self.offload_requested(&e) {
            // The connection has not reached a `flow add` statement.
            return;
        }
        if let Some(why) = self.cfg.exclude.excludes(&e) {
            self.pending.remove(&id);
            self.not_offloaded(why.to_string());
            return;
        }
        if let Err(why) = eligible(&e) {
            self.pending.remove(&id);
            // Most entries pass through ineligible states on their way to
            // ESTABLISHED; only count final verdicts.
            if !matches!(why, crate::flow::Ineligible::TcpNotEstablished | crate::flow::Ineligible::NotAssured) {
                self.not_offloaded(why.as_str());
            }
            return;
        }
        self.try_offload(e);
    }

    /// Resolve both directions with the kernel's FIB. Err = why not.
    fn resolve(&mut self, e: &CtEntry) -> std::result::Result<[Direction; 2], (String, bool)> {
        let first = self
            .ifaces
            .iter()
            .find(|i| i.up)
            .map(|i| i.ifindex)
            .ok_or(("no managed interface is up".to_string(), true))?;
        let (o, r) = (&e.orig, &e.reply);
        // The original direction arrives where the kernel routes its source.
        let in_orig = match routes::egress_for(&self.dp, first, o.src) {
            Ok(Some(i)) => i,
            Ok(None) => return Err(("no route back to the source (local or unroutable)".into(), false)),
            Err(err) => return Err((format!("route lookup failed: {err}"), true)),
        };
        if !self.managed(in_orig).is_some_and(|i| i.up) {
            return Err(("input interface not managed or down".into(), false));
        }
        let hop = |dp: &Dataplane, in_if: u32, t: &CtTuple, dst: IpAddr| {
            routes::resolve(dp, in_if, t.src, dst, t.proto, t.sport, t.dport)
        };
        // Routed after DNAT, before SNAT (prerouting / postrouting order).
        let mut nh_o = match hop(&self.dp, in_orig, o, r.src) {
            Ok(Ok(nh)) => nh,
            Ok(Err(u)) => return Err((u.as_str().into(), u.transient())),
            Err(err) => return Err((format!("route lookup failed: {err}"), true)),
        };
        if !self.managed(nh_o.ifindex).is_some_and(|i| i.up) {
            return Err(("output interface not managed or down".into(), false));
        }
        let in_reply = nh_o.ifindex;
        let mut nh_r = match hop(&self.dp, in_reply, r, o.src) {
            Ok(Ok(nh)) => nh,
            Ok(Err(u)) => return Err((u.as_str().into(), u.transient())),
            Err(err) => return Err((format!("route lookup failed: {err}"), true)),
        };
        if nh_r.ifindex != in_orig {
            return Err(("asymmetric routing".into(), false));
        }
        nh_o.xdp_ok = self.dp.is_xdp_target(nh_o.ifindex);
        nh_r.xdp_ok = self.dp.is_xdp_target(nh_r.ifindex);
        Ok([build_direction(o, r, in_orig, &nh_o), build_direction(r, o, in_reply, &nh_r)])
    }

    fn try_offload(&mut self, e: CtEntry) {
        let id = FlowId::of(&e);
        let dirs = match self.resolve(&e) {
            Ok(d) => d,
            Err((why, transient)) => {
                if transient {
                    self.pending.insert(id, e);
                } else {
                    self.pending.remove(&id);
                    self.not_offloaded(why);
                }
                return;
            }
        };
        self.pending.remove(&id);
        if let Some(why) = self.flowtable_mismatch(&e, &dirs) {
            self.not_offloaded(why);
            return;
        }
        // Conntrack will miss the packets we forward: stop it from judging
        // windows it cannot see, as nft_flow_offload_eval does
        // (IP_CT_TCP_FLAG_BE_LIBERAL both ways).
        if e.orig.proto == 6 {
            let upd = CtUpdate { timeout: None, tcp_liberal: true, mark: None, labels: None };
            match self.ct_req.update(&e.orig, e.zone, &upd) {
                Ok(()) => {}
                Err(CtError::NotFound) => return,
                Err(err) => {
                    tracing::warn!("cannot set TCP liberal mode: {err}; not offloading");
                    self.not_offloaded("conntrack update failed");
                    return;
                }
            }
        }
        for (i, d) in dirs.iter().enumerate() {
            if let Err(err) = self.dp.put_flow(&d.key, &d.val) {
                tracing::warn!("{err}");
                for prev in &dirs[..i] {
                    self.dp.delete_flow(&prev.key);
                }
                self.not_offloaded("flow table full");
                return;
            }
            self.dp.unwatch_dormant(&d.key);
        }
        let now = now_ns();
        self.n.offloads += 1;
        if let Some(t) = self.events_at {
            if self.offload_us.len() >= 10_000 {
                self.offload_us.pop_front();
            }
            self.offload_us.push_back(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        }
        tracing::debug!(?id, "offloaded");
        self.flows.insert(
            id,
            Offloaded {
                entry: e,
                dirs,
                clock: FlowClock { installed_ns: now, last_seen_ns: 0, last_refresh_ns: now, refreshed_seen_ns: 0 },
                base: [(0, 0); 2],
                last: [dirs[0].val, dirs[1].val],
            },
        );
    }

    fn teardown(&mut self, id: &FlowId, reason: TeardownReason) {
        let Some(f) = self.flows.remove(id) else { return };
        for d in &f.dirs {
            self.dp.delete_flow(&d.key);
        }
        *self.n.teardowns.entry(reason.as_str()).or_default() += 1;
        tracing::debug!(?id, reason = reason.as_str(), "teardown");
        if reason == TeardownReason::Policy {
            // Only a packet passing the ruleset again may bring it back.
            self.forget_offload_request(&f.entry);
            return;
        }
        // Connections still alive in conntrack come back on their next
        // packet (see fo_dormant).
        if matches!(reason, TeardownReason::Idle | TeardownReason::RouteChange | TeardownReason::InterfaceDown) {
            let keys = [f.dirs[0].key, f.dirs[1].key];
            keys.iter().for_each(|k| self.dp.watch_dormant(k));
            self.dormant.insert(*id, Dormant { entry: f.entry, keys, since_ns: now_ns() });
        }
    }

    /// Periodic work: read the fast path's stamps, keep conntrack alive,
    /// tear down what ended, retry what waited.
    fn tick(&mut self) {
        let now = now_ns();
        let ids: Vec<FlowId> = self.flows.keys().copied().collect();
        for id in ids {
            let (action, proto) = {
                let f = self.flows.get_mut(&id).expect("listed");
                let mut td = 0;
                let mut missing = false;
                for (i, d) in f.dirs.iter().enumerate() {
                    if let Some(v) = self.dp.get_flow(&d.key) {
                        f.last[i] = v;
                        td = td.max(v.teardown);
                        f.clock.last_seen_ns = f.clock.last_seen_ns.max(v.last_seen_ns);
                    } else {
                        missing = true;
                    }
                }
                // An entry removed behind our back (map edited by hand):
                // take the connection off the fast path entirely.
                if missing {
                    (Action::Teardown(TeardownReason::Policy), 0)
                } else {
                    let seen_reply = f.entry.status & status::SEEN_REPLY != 0 || f.last[1].packets > 0;
                    let t = self.timeouts.for_flow(f.entry.orig.proto, seen_reply);
                    (decide(now, &f.clock, td, self.cfg.idle_timeout, t), f.entry.orig.proto)
                }
            };
            match action {
                Action::Keep => {}
                Action::Teardown(r) => self.teardown(&id, r),
                Action::Refresh(t) => {
                    let f = self.flows.get_mut(&id).expect("listed");
                    let upd = CtUpdate { timeout: Some(t), tcp_liberal: false, mark: None, labels: None };
                    match self.ct_req.update(&f.entry.orig, f.entry.zone, &upd) {
                        Ok(()) => {
                            f.clock.last_refresh_ns = now;
                            f.clock.refreshed_seen_ns = f.clock.last_seen_ns;
                            self.n.ct_refreshes += 1;
                        }
                        Err(CtError::NotFound) => self.teardown(&id, TeardownReason::ConntrackDestroyed),
                        Err(err) => tracing::warn!(proto, "conntrack timeout refresh failed: {err}"),
                    }
                }
            }
        }
        // Dormant connections that saw a packet come back.
        let woke: Vec<FlowId> = self
            .dormant
            .iter()
            .filter(|(_, d)| d.keys.iter().any(|k| self.dp.dormant_seen(k).is_some_and(|t| t > d.since_ns)))
            .map(|(id, _)| *id)
            .collect();
        for id in woke {
            if let Some(d) = self.dormant.remove(&id) {
                d.keys.iter().for_each(|k| self.dp.unwatch_dormant(k));
                self.try_offload(d.entry);
            }
        }
        let waiting: Vec<CtEntry> = self.pending.values().cloned().collect();
        for e in waiting {
            self.try_offload(e);
        }
    }

    fn on_route_events(&mut self) {
        let ch = self.rtw.drain();
        for (ifindex, up) in &ch.links {
            if let Some(i) = self.ifaces.iter_mut().find(|i| i.ifindex == *ifindex) {
                if i.up != *up {
                    tracing::info!(iface = %i.name, up, "link state changed");
                }
                i.up = *up;
                if !*up {
                    let ids: Vec<FlowId> = self
                        .flows
                        .iter()
                        .filter(|(_, f)| {
                            f.dirs.iter().any(|d| d.key.ifindex == *ifindex || d.val.out_ifindex == *ifindex)
                        })
                        .map(|(id, _)| *id)
                        .collect();
                    for id in ids {
                        self.teardown(&id, TeardownReason::InterfaceDown);
                    }
                }
            }
        }
        if ch.any() {
            self.route_dirty.get_or_insert_with(Instant::now);
        }
    }

    /// Something in routes, neighbours, addresses or links changed: make
    /// every offloaded connection follow the kernel's current decision.
    fn reresolve_all(&mut self) {
        let ids: Vec<FlowId> = self.flows.keys().copied().collect();
        for id in ids {
            let entry = self.flows[&id].entry.clone();
            match self.resolve(&entry) {
                Ok(new) => {
                    let f = self.flows.get_mut(&id).expect("listed");
                    for (i, nd) in new.iter().enumerate() {
                        let old = &f.dirs[i];
                        if old.key.ifindex != nd.key.ifindex {
                            // Arrives elsewhere now: replace the entry.
                            self.dp.delete_flow(&old.key);
                        } else if old.val.out_ifindex == nd.val.out_ifindex
                            && old.val.dmac == nd.val.dmac
                            && old.val.smac == nd.val.smac
                            && old.val.mtu == nd.val.mtu
                            && old.val.flags == nd.val.flags
                        {
                            continue;
                        }
                        let cur = self.dp.get_flow(&old.key).unwrap_or(f.last[i]);
                        f.base[i].0 += cur.packets;
                        f.base[i].1 += cur.bytes;
                        let mut v = nd.val;
                        v.last_seen_ns = cur.last_seen_ns;
                        v.teardown = cur.teardown;
                        if self.dp.put_flow(&nd.key, &v).is_err() {
                            continue;
                        }
                        f.dirs[i] = Direction { key: nd.key, val: nd.val };
                        f.last[i] = v;
                    }
                }
                Err((why, _)) => {
                    tracing::debug!(?id, why, "no longer routable through the fast path");
                    self.teardown(&id, TeardownReason::RouteChange);
                }
            }
        }
        let waiting: Vec<CtEntry> = self.pending.values().cloned().collect();
        for e in waiting {
            self.try_offload(e);
        }
    }

    fn answer(&mut self, req: &str) -> String {
        match req {
            "status" => serde_json::to_string(&self.status()).unwrap_or_default(),
            "flows" => serde_json::to_string(&self.flow_list()).unwrap_or_default(),
            r if r.starts_with("reload ") => match self.reload(std::path::Path::new(&r[7..])) {
                Ok(summary) => serde_json::json!({ "ok": summary }).to_string(),
                Err(e) => serde_json::json!({ "error": format!("{e:#}") }).to_string(),
            },
            _ => serde_json::json!({"error": format!("unknown request {req:?}")}).to_string(),
        }
    }

    pub fn status(&self) -> Status {
        let stats = self.dp.stats();
        let mut slow = BTreeMap::new();
        for (i, name) in STAT_NAMES.iter().enumerate().skip(2) {
            slow.insert(name.to_string(), stats[i]);
        }
        Status {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            mode_requested: self.cfg.mode,
            interfaces: self.ifaces.clone(),
            flows_offloaded: self.flows.len(),
            flows_waiting_for_neighbour: self.pending.len(),
            flows_dormant: self.dormant.len(),
            flow_capacity: self.dp.flow_capacity(),
            idle_timeout_s: self.cfg.idle_timeout.as_secs(),
            fast_path_packets: stats[0],
            fast_path_bytes: stats[1],
            slow_path: slow,
            offloads_total: self.n.offloads,
            teardowns: self.n.teardowns.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            not_offloaded: self.n.not_offloaded.clone(),
            conntrack_events: self.n.ct_events,
            conntrack_resyncs: self.n.ct_resyncs,
            conntrack_refreshes: self.n.ct_refreshes,
            offload_latency_us: {
                let mut v: Vec<u32> = self.offload_us.iter().copied().collect();
                v.sort_unstable();
                let pct = |p: f64| v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(0);
                BTreeMap::from([("p50".to_string(), pct(0.5)), ("p99".to_string(), pct(0.99))])
            },
        }
    }

    pub fn flow_list(&self) -> Vec<FlowView> {
        let now = now_ns();
        let mut v: Vec<FlowView> = self
            .flows
            .values()
            .map(|f| {
                let name = |i: u32| self.managed(i).map(|x| x.name.clone()).unwrap_or_else(|| i.to_string());
                let mode = self.managed(f.dirs[0].key.ifindex).map(|x| x.mode).unwrap_or(Mode::Tc);
                let tuple = |t: &CtTuple| TupleView { src: t.src, dst: t.dst, sport: t.sport, dport: t.dport };
                let seen = f.clock.last_seen_ns.max(f.clock.installed_ns);
                FlowView {
                    id: f.entry.id,
                    proto: if f.entry.orig.proto == 6 { "tcp" } else { "udp" }.into(),
                    state: if f.entry.orig.proto == 6 { Some("ESTABLISHED".into()) } else { None },
                    orig: tuple(&f.entry.orig),
                    reply: tuple(&f.entry.reply),
                    packets_orig: f.base[0].0 + f.last[0].packets,
                    bytes_orig: f.base[0].1 + f.last[0].bytes,
                    packets_reply: f.base[1].0 + f.last[1].packets,
                    bytes_reply: f.base[1].1 + f.last[1].bytes,
                    idle_s: now.saturating_sub(seen) as f64 / 1e9,
                    mode,
                    iif: name(f.dirs[0].key.ifindex),
                    oif: name(f.dirs[0].val.out_ifindex),
                    mark: f.entry.mark,
                    zone: f.entry.zone,
                    family: if f.dirs[0].key.family == 2 { 4 } else { 6 },
                    nat_src: words_addr(f.dirs[0].key.family, &f.dirs[0].val.new_saddr) != f.entry.orig.src,
                    nat_dst: words_addr(f.dirs[0].key.family, &f.dirs[0].val.new_daddr) != f.entry.orig.dst,
                }
            })
            .collect();
        v.sort_by_key(|f| f.id);
        v
    }
}

fn announce_flowtables(rs: &Ruleset) {
    for ft in &rs.translated.flowtables {
        if ft.hw_offload {
            // As firewall4 does when flow_offloading_hw finds no driver.
            tracing::warn!(
                flowtable = %ft.name,
                "`flags offload` asks for hardware offload; no hardware backend here, using software (eBPF) offload"
            );
        }
    }
    if std::path::Path::new("/sys/module/nf_flow_table").exists() {
        tracing::info!(
            "this kernel has nf_flow_table; the ruleset's flowtables are handled by nft-offload instead \
             (they are not created in the kernel, so the two never offload the same connection)"
        );
    }
}

impl Engine {
    /// Flowtable label bits of the loaded ruleset.
    fn label_bits(&self) -> Vec<u32> {
        self.ruleset.as_ref().map(|r| r.translated.flowtables.iter().map(|f| f.label_bit).collect()).unwrap_or_default()
    }

    /// Without a ruleset every eligible connection is offloaded; with one,
    /// only those that reached a `flow add @ft` statement.
    fn offload_requested(&self, e: &CtEntry) -> bool {
        match &self.ruleset {
            None => true,
            Some(_) => self.label_bits().iter().any(|b| nft::has_label(e.labels.as_ref(), *b)),
        }
    }

    /// The flowtable a connection was added to must list both interfaces
    /// (the kernel's flowtable hooks only its own devices).
    fn flowtable_mismatch(&self, e: &CtEntry, dirs: &[Direction; 2]) -> Option<String> {
        let rs = self.ruleset.as_ref()?;
        let names: Vec<String> =
            dirs.iter().map(|d| self.managed(d.key.ifindex).map(|i| i.name.clone()).unwrap_or_default()).collect();
        let ok =
            rs.translated.flowtables.iter().any(|ft| {
                nft::has_label(e.labels.as_ref(), ft.label_bit) && names.iter().all(|n| ft.devices.contains(n))
            });
        (!ok).then(|| "interfaces not in the flowtable the connection was added to".to_string())
    }

    /// Clear our label bits on the conntrack entry.
    fn forget_offload_request(&mut self, e: &CtEntry) {
        let bits = self.label_bits();
        if bits.is_empty() {
            return;
        }
        let mask = nft::label_mask(&bits);
        // Events already queued may carry no labels (they only do when
        // labels change) and would otherwise be read with the old ones.
        let id = FlowId::of(e);
        let mut now = self.labels_seen.get(&id).copied().or(e.labels).unwrap_or_default();
        for (b, m) in now.iter_mut().zip(mask) {
            *b &= !m;
        }
        self.labels_seen.insert(id, now);
        let upd = CtUpdate { labels: Some(([0u8; 16], mask)), ..Default::default() };
        match self.ct_req.update(&e.orig, e.zone, &upd) {
            Ok(()) | Err(CtError::NotFound) => {}
            Err(err) => tracing::warn!("cannot clear the offload label: {err}"),
        }
    }

    /// Replace the ruleset of a running `run --nft`: check, attach new
    /// devices, load atomically, detach devices that left, and send every
    /// offloaded connection back through the new rules.
    pub fn reload(&mut self, path: &std::path::Path) -> Result<String> {
        let Some(old) = self.ruleset.clone() else {
            bail!("this engine was started with --iface, not --nft: there is no ruleset to reload");
        };
        let rs = Ruleset::read(path)?;
        if rs.translated.flowtables.is_empty() {
            bail!("{} declares no flowtable: refusing to reload (nothing would be offloaded)", path.display());
        }
        rs.apply(&old.translated.tables, true)?;
        let wanted = rs.devices();
        let mut infos = Vec::new();
        for name in &wanted {
            if !self.ifaces.iter().any(|i| &i.name == name) {
                infos.push(link::info(name)?);
            }
        }
        let mut added = Vec::new();
        let decisions = choose_modes(&infos, self.cfg.mode);
        for (info, d) in infos.iter().zip(decisions) {
            if let Err(e) = self.dp.attach(info.ifindex, &info.name, d.mode) {
                for i in &added {
                    self.dp.detach(*i);
                }
                return Err(e.context("reload aborted, the previous ruleset stays"));
            }
            added.push(info.ifindex);
            self.ifaces.push(IfaceStatus::new(info, d));
        }
        if let Err(e) = rs.apply(&old.translated.tables, false) {
            for i in &added {
                self.dp.detach(*i);
            }
            self.ifaces.retain(|i| !added.contains(&i.ifindex));
            return Err(e.context("reload aborted, the previous ruleset stays"));
        }
        announce_flowtables(&rs);
        // Every offloaded connection goes back to the kernel and returns
        // only if the new rules send it to `flow add` again.
        let ids: Vec<FlowId> = self.flows.keys().copied().collect();
        let n = ids.len();
        for id in ids {
            self.teardown(&id, TeardownReason::Policy);
        }
        for (_, d) in self.dormant.drain() {
            d.keys.iter().for_each(|k| self.dp.unwatch_dormant(k));
        }
        self.pending.clear();
        // Entries that carry the old label but were not offloaded yet.
        if let Ok(all) = self.ct_req.dump() {
            let old_bits = self.label_bits();
            for e in all.iter().filter(|e| old_bits.iter().any(|b| nft::has_label(e.labels.as_ref(), *b))) {
                self.forget_offload_request(e);
            }
        }
        let removed: Vec<u32> = self.ifaces.iter().filter(|i| !wanted.contains(&i.name)).map(|i| i.ifindex).collect();
        for i in &removed {
            self.dp.detach(*i);
        }
        self.ifaces.retain(|i| wanted.contains(&i.name));
        self.ruleset = Some(rs);
        tracing::info!(file = %path.display(), reoffload = n, "ruleset reloaded");
        Ok(format!(
            "reloaded {}: {} interface(s) added, {} removed, {} offloaded connection(s) sent back through the new rules",
            path.display(),
            added.len(),
            removed.len(),
            n
        ))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Links go with the dataplane; be explicit about order: nothing is
        // redirected to a port after it left the map.
        self.dp.detach_all();
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub pid: u32,
    pub uptime_s: u64,
    pub mode_requested: ModeChoice,
    pub interfaces: Vec<IfaceStatus>,
    pub flows_offloaded: usize,
    pub flows_waiting_for_neighbour: usize,
    pub flows_dormant: usize,
    pub flow_capacity: u32,
    pub idle_timeout_s: u64,
    pub fast_path_packets: u64,
    pub fast_path_bytes: u64,
    pub slow_path: BTreeMap<String, u64>,
    pub offloads_total: u64,
    pub teardowns: BTreeMap<String, u64>,
    pub not_offloaded: BTreeMap<String, u64>,
    pub conntrack_events: u64,
    pub conntrack_resyncs: u64,
    pub conntrack_refreshes: u64,
    /// From a conntrack event reaching the engine to both map entries
    /// installed, over the last 10k offloads.
    #[serde(default)]
    pub offload_latency_us: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TupleView {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FlowView {
    pub id: u32,
    pub proto: String,
    pub family: u8,
    pub state: Option<String>,
    pub orig: TupleView,
    pub reply: TupleView,
    pub packets_orig: u64,
    pub bytes_orig: u64,
    pub packets_reply: u64,
    pub bytes_reply: u64,
    pub idle_s: f64,
    pub mode: Mode,
    pub iif: String,
    pub oif: String,
    pub mark: u32,
    pub zone: u16,
    pub nat_src: bool,
    pub nat_dst: bool,
}
