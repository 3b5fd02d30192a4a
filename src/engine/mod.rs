//! The engine: one thread, one poll loop; every source of change is a file
//! descriptor. The loop only reads sources and applies verdicts:
//!
//! * conntrack events and dumps -> `policy::verdict` -> `FlowTable::apply`
//! * rtnetlink changes -> link state, then the FIB answers in use are
//!   asked again and the offloaded connections whose answer or devices
//!   changed are judged again, in chunks (`reroute`; a neighbour change:
//!   only the connections through it); tc changes -> the device hooks
//! * xfrm policy and nf_tables changes -> the holds (`holds`); any ruleset
//!   change sends the offloaded connections back through the kernel
//! * `fo_wake` (TC egress saw a dormant connection's packet leave) ->
//!   dormant connections that woke; the 250 ms tick -> `keepalive` for the
//!   connections due, retries
//! * the control socket's eventfd -> `status`, `flows`, `reload`
//!   (`ruleset`), read and checked by the control thread (`control::server`)
//!
//! What is decided where: `policy::verdict` (offload or not, and why),
//! `flow::lifecycle` (keepalive and idle), `routes::path` (next hops),
//! `policy::choose_modes` (XDP or TC per interface).

mod exposition;
mod flowtable;
mod holds;
mod hosts;
mod keepalive;
mod ports;
mod rates;
mod reconfigure;
mod reroute;
mod ruleset;
mod views;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::conntrack::{CtEntry, CtError, CtEvent, CtSocket, Seen};
use crate::control::{ControlServer, Request, Response};
use crate::dataplane::{fo_flow_key, Dataplane, WakeEvents};
use crate::flow::{ConnId, CtTimeouts, TeardownReason};
use crate::hooks::NftWatch;
use crate::host;
use crate::metrics::MetricsServer;
use crate::policy::nft::Ruleset;
use crate::policy::verdict::{verdict, Known, Rules, Verdict, World};
use crate::routes::path::{resolve_path, Lookups};
use crate::routes::{NeighbourTable, RouteFacts, RouteWatch};
use crate::settings::Settings;
use crate::xfrm::XfrmWatch;

use flowtable::FlowTable;
use holds::HoldFacts;
use ports::Interfaces;

/// How long rtnetlink changes settle before paths are resolved again.
const ROUTE_SETTLE: Duration = Duration::from_millis(50);
const TICK: Duration = Duration::from_millis(250);
/// Connections keepalive looks at per pass of the loop; when more are due,
/// the loop reads its sources without waiting and looks at the next chunk
/// (about 0.5 ms each in a release build), so a new connection's events
/// wait for one chunk, not for all that are due.
const KEEPALIVE_CHUNK: usize = 64;
/// Unwatched dormant connections a tick tries to watch (a lookup and an
/// update per key, ~10 us each): at most ~20 ms a tick, 100,000 in 50.
const REWATCH_CHUNK: usize = 2048;
/// How often conntrack's timeout sysctls are read again (three small files,
/// and net.ipv4.ip_forward_update_priority), so a change reaches offloaded
/// connections at their next refresh (the priority: at their next packet).
const TIMEOUTS_EVERY: Duration = Duration::from_secs(1);

pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer. CLOCK_MONOTONIC_COARSE is what the fast path's
    // bpf_ktime_get_coarse_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The file descriptors the loop waits on.
struct Sources {
    ct_events: CtSocket,
    wake: WakeEvents,
    routes: RouteWatch,
    control: ControlServer,
    /// None: this kernel has no xfrm netlink interface (no policies).
    xfrm: Option<XfrmWatch>,
    /// nf_tables table and chain changes (device chains: `hooks`).
    nft: NftWatch,
    /// Scrapes of the opt-in metrics endpoint.
    metrics: Option<MetricsServer>,
}

pub struct Engine {
    src: Sources,
    core: Core,
}

/// Everything the loop's handlers change.
struct Core {
    cfg: Settings,
    /// The settings as given (before `--nft`'s devices filled in the
    /// interfaces), what a reload compares its new reading with.
    given: Settings,
    /// Where `reload_files` reads them again, if from a file.
    reread: Option<reconfigure::Reread>,
    /// The fast path's counters, once a second, for `status`'s rates.
    rates: rates::Rates,
    started: Instant,
    /// The loaded ruleset in `--nft` mode.
    ruleset: Option<Ruleset>,
    /// The nft processes that loaded it (the last few): their change
    /// notifications are the engine's own.
    own_nft: Vec<u32>,
    /// Someone else changed the ruleset since the engine's was loaded, so
    /// a reload of the same text must load it again (firewall4 may have
    /// put its own table back in its place).
    ruleset_foreign: bool,
    ifaces: Interfaces,
    flows: FlowTable,
    timeouts: CtTimeouts,
    timeouts_read: Instant,
    ct_events: u64,
    ct_resyncs: u64,
    route_dirty: Option<Instant>,
    /// A hold source or an `ip rule` changed: with the re-resolution,
    /// judge every conntrack entry again (a dump), so connections refused
    /// for it (both directions held, a rule the lookup cannot reproduce)
    /// come back when it goes.
    rescan: bool,
    /// `Dataplane::wake_lost` when last scanned.
    wake_lost: u64,
    /// The legacy x_tables rulesets as last polled (`hooks::legacy`): they
    /// send no notification.
    legacy: crate::hooks::legacy::Snapshot,
    /// Keys `fo_rst` announced since the last tick, and those of the tick
    /// before, whose conntrack timeouts this tick puts back (a tick later:
    /// conntrack has seen their RSTs by then); `Dataplane::rst_lost` then.
    rst_new: Vec<fo_flow_key>,
    rst_due: Vec<fo_flow_key>,
    rst_lost: u64,
    /// Rules and addresses the path resolution depends on.
    facts: RouteFacts,
    /// Each neighbour's last answer, so only real changes count.
    neigh: NeighbourTable,
    /// Connections through a neighbour that changed, re-resolved after
    /// ROUTE_SETTLE (everything is, if `route_dirty`).
    neigh_dirty: Option<Instant>,
    neigh_ids: HashSet<ConnId>,
    path_resolutions: u64,
    /// What the route changes since the last re-resolution ask for, and
    /// the connections left to re-judge (`reroute`).
    plan: reroute::Plan,
    rework: reroute::Queue,
    /// What holds directions on the slow path.
    holds: HoldFacts,
    /// ppp devices attached because the port below runs TC
    /// (`ports::pppoe_uppers`).
    pppoe_uppers: Vec<u32>,
    /// XDP ports whose frames may carry partial checksums (as last set in
    /// fo_csum_ports; `probe_xdp_targets`).
    csum_ports: std::collections::BTreeSet<u32>,
}

impl Engine {
    /// Validate, load, attach. On any error nothing stays attached: the
    /// dataplane's links are dropped with it.
    pub fn start(mut cfg: Settings) -> Result<Self> {
        host::preflight()?;
        let given = cfg.clone();
        let ruleset = match &cfg.nft {
            Some(path) => {
                if !cfg.ifaces.is_empty() {
                    anyhow::bail!(
                        "--iface and --nft exclude each other: the devices come from the ruleset's flowtables"
                    );
                }
                let rs = ruleset::prepare(Ruleset::read(path)?, &[])?;
                cfg.ifaces = rs.devices();
                Some(rs)
            }
            None => None,
        };
        if cfg.ifaces.is_empty() {
            anyhow::bail!("no interfaces given: use --iface IF (at least two for forwarding)");
        }
        let infos = ports::gather(&cfg.ifaces)?;
        let control = ControlServer::bind()?;
        // Before anything is attached: a bad address fails the start whole.
        let metrics = cfg.metrics.as_ref().map(MetricsServer::start).transpose()?;
        // What stands beneath a listed VLAN or ppp device (XDP serves it
        // from there). A list XDP cannot serve is refused before anything
        // is loaded.
        let topo = crate::topology::read().context("reading the link topology")?;
        if cfg.mode == crate::policy::ModeChoice::Xdp {
            Interfaces::default().plan_xdp(&infos, &topo)?;
        }
        // Subscribe before dumping so no change falls between the two;
        // before loading, so nf_conntrack (a module on most routers) is
        // loaded and its BTF there for the keepalive kfuncs' probe.
        let ct_events = CtSocket::events().context("subscribing to conntrack events")?;
        let ct_req = CtSocket::request().context("opening a conntrack request socket")?;
        let mut probe = crate::dataplane::Probe::kernel();
        if cfg.keepalive == crate::settings::KeepaliveChoice::Netlink {
            probe.keepalive = crate::dataplane::Keepalive::Chosen;
        }
        let max_flows = match cfg.max_flows {
            Some(n) => n,
            None => {
                let c = crate::settings::capacity::auto_max_flows(&crate::host::memory_facts());
                tracing::info!("flow table sized for {c}; --max-flows sets it");
                c.flows
            }
        };
        let mut dp = Dataplane::load_for(max_flows, &probe)?;
        let keepalive = serde_json::to_value(dp.features().keepalive).ok();
        let keepalive = keepalive.as_ref().and_then(|v| v.as_str()).unwrap_or("?");
        tracing::info!(keepalive, max_flows, "fast path loaded");
        let mut ifaces = Interfaces::default();
        ifaces.attach(&mut dp, &infos, &topo, cfg.mode)?;
        let routes = RouteWatch::new().context("subscribing to rtnetlink")?;
        let nft = NftWatch::new().context("subscribing to nf_tables notifications")?;
        let xfrm = match XfrmWatch::new() {
            Ok(w) => Some(w),
            Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => None,
            Err(e) => return Err(e).context("subscribing to xfrm policy changes"),
        };
        let wake = dp.wake_events()?;
        let mut own_nft = Vec::new();
        if let Some(rs) = &ruleset {
            // Attached first, ruleset second: if nft fails now the engine is
            // dropped and detaches; nothing stays half-applied.
            own_nft.push(rs.apply(&[], false)?);
            tracing::info!(file = %rs.name, flowtables = rs.translated.flowtables.len(), "ruleset loaded");
        }
        // Our own load's notifications: nothing is offloaded yet (the hooks
        // are read below anyway). Anyone else's since is noted.
        let mut nft = nft;
        let ruleset_foreign = nft.drain().by_others(&own_nft);
        let bits = ruleset::label_bits(ruleset.as_ref());
        let mut core = Core {
            cfg,
            given,
            reread: None,
            rates: rates::Rates::default(),
            started: Instant::now(),
            ruleset,
            own_nft,
            ruleset_foreign,
            ifaces,
            flows: FlowTable::new(dp, ct_req, bits),
            timeouts: host::ct_timeouts(),
            timeouts_read: Instant::now(),
            ct_events: 0,
            ct_resyncs: 0,
            route_dirty: None,
            rescan: false,
            wake_lost: 0,
            legacy: crate::hooks::legacy::read(),
            rst_new: Vec::new(),
            rst_due: Vec::new(),
            rst_lost: 0,
            facts: RouteFacts::read().context("reading ip rules and addresses")?,
            // After subscribing (`routes`): no change falls in between.
            neigh: NeighbourTable::read().context("reading the neighbour table")?,
            neigh_dirty: None,
            neigh_ids: HashSet::new(),
            path_resolutions: 0,
            plan: Default::default(),
            rework: Default::default(),
            // After subscribing (`xfrm`), likewise.
            holds: HoldFacts { xfrm: crate::xfrm::read_spd(), ..Default::default() },
            pppoe_uppers: Vec::new(),
            csum_ports: Default::default(),
        };
        core.sync_pppoe_uppers();
        // After attaching (the modes are known) and after the ruleset (its
        // device chains count), before the first verdict.
        core.read_hooks();
        // Before the first verdict too: no direction is offloaded into a
        // port that would drop its XDP frames.
        core.probe_xdp_targets();
        core.resync().context("initial conntrack dump")?;
        Ok(Engine { src: Sources { ct_events, wake, routes, control, xfrm, nft, metrics }, core })
    }

    /// `reload` without a file and SIGHUP read the settings again with
    /// `reread` (the start's `--config` and ruleset files).
    pub fn reread_with(&mut self, reread: reconfigure::Reread) {
        self.core.reread = Some(reread);
    }

    /// Run until SIGINT/SIGTERM. Dropping the engine afterwards detaches.
    pub fn run(&mut self) -> Result<()> {
        let _signals = host::SignalGuard::install().context("installing the SIGINT/SIGTERM handlers")?;
        tracing::info!(flows = self.core.flows.len().0, "running");
        let mut last_tick = Instant::now();
        // Keepalive has more connections due than one chunk.
        let mut looking = false;
        while !host::stop_requested() {
            let (src, core) = (&mut self.src, &mut self.core);
            // Every pass: the fast path steps aside if these stop (a
            // stalled engine follows nothing; see FO_STALE_ENGINE_NS).
            core.flows.dp_mut().set_heartbeat(now_ns());
            let mut fds = [
                libc::pollfd { fd: src.ct_events.fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: src.routes.fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: src.control.fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: src.wake.fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: src.xfrm.as_ref().map_or(-1, XfrmWatch::fd), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: src.nft.fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd {
                    fd: src.metrics.as_ref().map_or(-1, MetricsServer::fd),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // Wake when pending changes have settled, not up to 100 ms later.
            let pending = [core.route_dirty, core.neigh_dirty].into_iter().flatten().min();
            let wait = match pending {
                _ if looking || core.rework.busy() => 0,
                None => 100,
                Some(t) => ROUTE_SETTLE.saturating_sub(t.elapsed()).as_millis().min(99) + 1,
            };
            // SAFETY: valid array of pollfds.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, wait as libc::c_int) };
            // Links before conntrack: a link going down makes the kernel
            // flush the conntrack entries masqueraded through it
            // (nf_nat_masquerade's device notifier, from a work item, so
            // after the link message), and the link is the reason.
            if fds[1].revents != 0 {
                let ch = src.routes.drain();
                core.on_route_changes(&ch);
            }
            if fds[0].revents != 0 {
                match src.ct_events.recv_events() {
                    Ok(batch) => {
                        core.on_ct_events(batch.events);
                        // A message we could not read was an event we
                        // missed: the table is the truth, as after an overrun.
                        if let Some(e) = batch.malformed {
                            core.resync_after(&e);
                        }
                    }
                    Err(e @ CtError::Overrun) => core.resync_after(&e),
                    Err(e) => tracing::warn!("conntrack events: {e}"),
                }
            }
            // Ruleset changes before requests: a `reload` that follows
            // someone else's change (firewall4's, then its include asking
            // for ours) must know of it.
            if fds[5].revents != 0 {
                let ch = src.nft.drain();
                if ch.ruleset {
                    core.ruleset_foreign |= ch.by_others(&core.own_nft);
                    core.on_ruleset_change();
                }
                if ch.chains {
                    core.read_hooks();
                }
            }
            if fds[2].revents != 0 {
                src.control.serve(|req| core.answer(req));
            }
            if let (true, Some(m)) = (fds[6].revents != 0, &src.metrics) {
                let waiting = m.take();
                if !waiting.is_empty() {
                    let text = core.metrics_text();
                    for r in waiting {
                        let _ = r.send(text.clone());
                    }
                }
            }
            if host::reload_requested() {
                if let Err(e) = core.reload_files() {
                    tracing::error!("reload on SIGHUP: {}", crate::error_text(&e));
                }
            }
            if fds[3].revents != 0 {
                let keys = src.wake.drain();
                core.wake(Some(&keys));
                core.rst_new.extend(src.wake.take_rsts());
            }
            if fds[4].revents != 0 && src.xfrm.as_mut().is_some_and(XfrmWatch::drain) {
                core.on_xfrm_change();
            }
            if core.neigh_dirty.is_some_and(|t| t.elapsed() >= ROUTE_SETTLE) {
                core.neigh_dirty = None;
                core.reresolve_neighbours();
            }
            core.reresolve_some();
            if core.route_dirty.is_some_and(|t| t.elapsed() >= ROUTE_SETTLE) {
                core.route_dirty = None;
                core.reresolve_all();
                if std::mem::take(&mut core.rescan) {
                    if let Err(e) = core.resync() {
                        tracing::error!("conntrack dump after a hold or rule change failed: {e:#}");
                    }
                }
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                looking = core.tick();
            } else if looking {
                looking = core.keepalive();
            }
        }
        tracing::info!("stopping: detaching; connections continue through the kernel");
        Ok(())
    }

    pub fn status(&self) -> crate::control::Status {
        self.core.status()
    }

    pub fn flow_list(&mut self) -> Vec<crate::control::FlowView> {
        self.core.flow_list()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Links go with the dataplane; be explicit about order: nothing is
        // redirected to a port after it left the map.
        self.core.flows.dp_mut().detach_all();
    }
}

impl Core {
    fn on_ct_events(&mut self, evs: Vec<CtEvent>) {
        self.flows.events_at = Some(Instant::now());
        self.flows.begin_batch();
        for ev in evs {
            self.ct_events += 1;
            match ev {
                CtEvent::New(e) => self.consider(e, Seen::Full),
                CtEvent::Update(e) => self.consider(e, Seen::Changes),
                CtEvent::Destroy(e) => {
                    // Its final conntrack counters (nf_conntrack_acct):
                    // the slow path's share of its traffic.
                    let d = [e.counters_orig.unwrap_or_default(), e.counters_reply.unwrap_or_default()];
                    if hosts::through_router(&e, |ip| self.facts.addrs.is_local(ip)) {
                        self.flows.hosts.retire(&e, d);
                    }
                    self.flows.destroyed(&ConnId::of(&e));
                }
            }
        }
        self.flows.end_batch();
        self.flows.events_at = None;
    }

    /// Events were lost (`why`: overrun or an undecodable message): the
    /// table is the truth (as conntrackd).
    fn resync_after(&mut self, why: &CtError) {
        tracing::warn!("{why}; resyncing from a full dump");
        self.ct_resyncs += 1;
        if let Err(e) = self.resync() {
            tracing::error!("conntrack resync failed: {e:#}");
        }
    }

    /// Full dump: judge every entry, forget what vanished.
    fn resync(&mut self) -> Result<()> {
        let all = self.flows.ct.dump()?;
        let present: HashSet<ConnId> = all.iter().map(ConnId::of).collect();
        self.flows.retain_present(&present);
        self.flows.begin_batch();
        for (i, e) in all.into_iter().enumerate() {
            // Judging 150,000 new entries takes seconds (a path each): the
            // engine is busy, not stalled, so the fast path keeps going
            // (FO_STALE_ENGINE_NS would send every packet to the kernel).
            if i % 1024 == 0 {
                self.flows.dp_mut().set_heartbeat(now_ns());
            }
            self.consider(e, Seen::Full);
        }
        self.flows.end_batch();
        Ok(())
    }

    /// A conntrack entry appeared or changed.
    fn consider(&mut self, e: CtEntry, seen: Seen) {
        let e = self.flows.merge(e, seen);
        // Nothing new about an offloaded connection: no map reads, no
        // verdict. Every refresh keepalive sends comes back as such an
        // event, and a resync lists every offloaded connection.
        if self.flows.timers_only(&e) {
            return;
        }
        let known = self.flows.known(&ConnId::of(&e));
        self.judge(e, known, false);
    }

    /// Ask the verdict, resolving the path when it needs it (or always,
    /// with `reroute`), and apply it.
    fn judge(&mut self, e: CtEntry, known: Known, reroute: bool) {
        self.release_pins();
        let rules = Rules {
            exclude: &self.cfg.exclude,
            flowtables: self.ruleset.as_ref().map(|r| &r.translated.flowtables[..]),
        };
        self.path_resolutions += u64::from(reroute);
        let mut lk = Lookups::default();
        let path = reroute.then(|| resolve_path(self.flows.dp(), &self.ifaces, &self.facts, &e, &mut lk));
        let mut v =
            verdict(&e, &known, &rules, &World { ports: &self.ifaces, holds: &self.holds, path: path.as_ref() });
        if matches!(v, Verdict::NeedsPath) {
            self.path_resolutions += 1;
            let path = resolve_path(self.flows.dp(), &self.ifaces, &self.facts, &e, &mut lk);
            v = verdict(&e, &known, &rules, &World { ports: &self.ifaces, holds: &self.holds, path: Some(&path) });
        }
        tracing::trace!(id = e.id, ?known, verdict = ?v, "verdict");
        // Offloaded with these answers: re-judged when one changes.
        if matches!(v, Verdict::Offload(_)) {
            self.facts.cache.borrow_mut().pin(ConnId::of(&e), &lk.keys, &lk.asked);
        }
        self.flows.apply(e, v);
    }

    fn on_route_changes(&mut self, ch: &crate::routes::Changes) {
        let first = crate::routes::path::Ports::first_up(&self.ifaces);
        // What `refresh` is about to read again, to see what it changed.
        let topo = (!ch.links.is_empty() || ch.lost).then(|| self.facts.topo.clone());
        let addrs = (ch.addresses || ch.lost).then(|| self.facts.addrs.clone());
        let routes = (ch.routes || ch.lost).then(|| self.facts.routes.clone());
        for &(ifindex, up) in &ch.links {
            if self.ifaces.set_up(ifindex, up) {
                for id in self.flows.offloaded_via(ifindex) {
                    self.flows.teardown(&id, TeardownReason::InterfaceDown);
                }
            }
        }
        // A MAC moved to another bridge port (a client roamed): the
        // connections sent to it are walked again, like a neighbour change.
        for mac in self.facts.refresh(ch) {
            self.neigh_ids.extend(self.flows.offloaded_via_mac(mac));
            self.neigh_dirty.get_or_insert_with(Instant::now);
        }
        // What the re-resolution must cover beyond the FIB answers that
        // changed: a rule may change every lookup's key (the mark), the
        // first port is every reverse-path key's input, the addresses
        // decide the source-NAT check, and a new fdb or PPPoE snapshot may
        // move any walk; otherwise the walks through the links that changed.
        let p = &mut self.plan;
        p.all |= ch.rules || ch.lost || first != crate::routes::path::Ports::first_up(&self.ifaces);
        if addrs.is_some_and(|a| a != self.facts.addrs) {
            p.all = true;
        }
        // A route on tos or a hashed multipath route came or went: the FIB
        // answers the lookups get may be the same, the connections under
        // it are not (`routes::per_packet`); those it kept off come back
        // through a dump, as after a rule change.
        if routes.is_some_and(|r| r != self.facts.routes) {
            p.all = true;
            self.rescan = true;
        }
        if let Some(t) = topo.filter(|t| *t != self.facts.topo) {
            match t.changed_links(&self.facts.topo) {
                Some(devs) => p.devices.extend(devs),
                None => p.all = true,
            }
        }
        if ch.lost || !ch.links.is_empty() {
            self.sync_pppoe_uppers();
            // Before the re-resolution below: it admits a served device's
            // connections by its headers now.
            if self.ifaces.sync_served(&self.facts.topo) {
                self.plan.all = true;
                self.route_dirty.get_or_insert_with(Instant::now);
            }
        }
        // A link event too: a mirred target renamed, a port's qdisc
        // replaced as it comes up.
        if ch.tc || ch.lost || !ch.links.is_empty() {
            self.read_hooks();
        }
        // A link change here (a veth coming up, an XDP program on a port)
        // may change what takes XDP redirects.
        if ch.lost || !ch.links.is_empty() {
            self.probe_xdp_targets();
        }
        if ch.routes || ch.rules || ch.links.iter().any(|l| self.ifaces.get(l.0).is_some()) || ch.lost {
            self.flows.discount_wakes();
        }
        // A neighbour's answer changing moves only the connections whose
        // next hop it is (by its old MAC); one first usable may give the
        // waiting ones a path. STALE/REACHABLE churn changes nothing.
        if ch.lost {
            // Messages were lost: start the table again (everything is
            // re-resolved below anyway).
            match NeighbourTable::read() {
                Ok(t) => self.neigh = t,
                Err(e) => tracing::warn!("reading the neighbour table: {e:#}"),
            }
        }
        for n in self.neigh.changes(&ch.neighbours) {
            if let Some(mac) = n.was {
                self.neigh_ids.extend(self.flows.offloaded_via_mac(mac));
                self.facts.cache.borrow_mut().neighbour_changed(n.ifindex, mac);
            }
            self.neigh_dirty.get_or_insert_with(Instant::now);
        }
        if ch.beyond_neighbours() {
            self.route_dirty.get_or_insert_with(Instant::now);
        }
        // Connections refused for an `ip rule` are in no list: a dump
        // brings them back when the rule goes (rules change rarely).
        if ch.rules || ch.lost {
            self.rescan = true;
        }
    }

    /// Someone changed the nftables ruleset: what it does with an
    /// offloaded connection's next packet is not known, so every one goes
    /// back through the kernel and returns on evidence that the new rules
    /// forward it (the kernel flowtable keeps forwarding stale flows after
    /// a firewall reload; we do not). Set updates from the packet path are
    /// not notified, so this follows admin changes (a reload, a blocklist
    /// entry), not traffic.
    fn on_ruleset_change(&mut self) {
        // What the kernel forwarded before the change is no evidence for
        // the connections already dormant either (an idle one whose packet
        // left just before the rule that now drops it).
        self.flows.discount_wakes();
        let n = self.flows.send_back_through_new_rules();
        if n > 0 {
            tracing::info!(connections = n, "nftables ruleset changed: offloaded connections go back through it");
        }
    }

    /// iptables-legacy, ip6tables-legacy, arptables-legacy and
    /// ebtables-legacy tell nobody of a change: each tick reads their tables
    /// (`hooks::legacy`, only those that exist), and a change is one of the
    /// ruleset, as for nftables.
    fn poll_legacy_tables(&mut self) {
        let now = crate::hooks::legacy::read();
        let changed = now.changed(&self.legacy);
        if changed.is_empty() {
            return;
        }
        tracing::info!(tables = %changed.join(", "), "legacy x_tables ruleset changed");
        self.legacy = now;
        self.on_ruleset_change();
    }

    /// Re-resolve the connections through changed neighbours.
    fn reresolve_neighbours(&mut self) {
        for id in std::mem::take(&mut self.neigh_ids) {
            self.rejudge(&id, None, true);
        }
        self.retry_waiting();
    }

    /// A source of holds (`holds::HoldFacts`) changed: within ROUTE_SETTLE
    /// every offloaded and waiting connection is judged again with its
    /// path resolved again, so its holds follow, then every conntrack entry
    /// (per change, not per tick: these changes are rare).
    fn facts_changed(&mut self) {
        self.plan.all = true;
        self.route_dirty.get_or_insert_with(Instant::now);
        self.rescan = true;
    }

    fn retry_waiting(&mut self) {
        for id in self.flows.waiting_ids() {
            self.rejudge(&id, None, false);
        }
    }

    /// Judge a tracked connection again from its stored entry.
    fn rejudge(&mut self, id: &ConnId, known: Option<Known>, reroute: bool) {
        let Some(e) = self.flows.entry(id).cloned() else { return };
        let known = known.unwrap_or_else(|| self.flows.known(id));
        self.judge(e, known, reroute);
    }

    /// Periodic work: keepalive, dormant connections the kernel forwarded,
    /// connections waiting for their path.
    /// Returns whether keepalive has more connections due (`keepalive`).
    fn tick(&mut self) -> bool {
        // Teardowns between events (destroys, keepalive) leave the index
        // at least this often.
        self.release_pins();
        if self.rates.due(Instant::now()) {
            let s = self.rate_sample();
            self.rates.push(s);
        }
        // An SPD that could not be read holds everything: try again.
        if self.holds.xfrm.unknown.is_some() {
            self.on_xfrm_change();
        }
        if self.timeouts_read.elapsed() >= TIMEOUTS_EVERY {
            self.timeouts_read = Instant::now();
            // Read with the timeouts: whether forwarding sets skb->priority.
            self.flows.dp_mut().set_fwd_update_priority(host::ip_forward_update_priority());
            let t = host::ct_timeouts();
            if t != self.timeouts {
                tracing::info!(
                    tcp_established_s = t.tcp_established,
                    udp_s = t.udp,
                    udp_stream_s = t.udp_stream,
                    "conntrack timeouts changed"
                );
                self.timeouts = t;
                self.flows.dp_mut().set_ct_timeouts(&t);
                // Every deadline was planned with the old timeouts.
                self.flows.all_due(now_ns());
            }
            // Unreadable hooks hold their ports' directions: try again.
            if self.holds.hooks.ports.values().any(|d| d.unreadable.is_some()) {
                self.read_hooks();
            }
            // A sysctl changed the multipath hash (nothing announces it),
            // or unreadable routes can be read now.
            if self.facts.routes.recheck() {
                tracing::info!("multipath hash policy or routes read anew: paths are judged again");
                self.facts_changed();
            }
            // A veth's peer in another namespace changes without a word to
            // this one (its GRO, its XDP program): ask every second.
            self.probe_xdp_targets();
        }
        self.poll_legacy_tables();
        // RSTs conntrack could not judge: their timeouts put back, a tick
        // after they were announced (and all of them if some were lost).
        let lost = self.flows.dp().rst_lost();
        let all = std::mem::replace(&mut self.rst_lost, lost) != lost;
        let due = std::mem::replace(&mut self.rst_due, std::mem::take(&mut self.rst_new));
        if all || !due.is_empty() {
            keepalive::restore_after_rst(&mut self.flows, &due, all, now_ns(), &self.timeouts);
        }
        let more = self.keepalive();
        // The scan catches what the wake-up ring buffer dropped, only
        // when it dropped something: O(dormant) per loss, not per tick.
        let lost = self.flows.dp().wake_lost();
        if lost != self.wake_lost {
            self.wake_lost = lost;
            self.wake(None);
        }
        // Dormant connections fo_dormant had no room for, watched as room
        // frees (a burst of new UDP connections larger than the map).
        self.flows.rewatch(REWATCH_CHUNK);
        self.retry_waiting();
        self.flows.compact();
        more
    }

    /// One chunk of the connections keepalive must look at; whether more
    /// are due.
    fn keepalive(&mut self) -> bool {
        keepalive::tick(&mut self.flows, now_ns(), self.cfg.idle_timeout, &self.timeouts, KEEPALIVE_CHUNK)
    }

    /// Connections with a dormant direction the kernel forwarded a packet
    /// of (TC egress announced or stamped its egress key): the evidence is
    /// recorded for that direction alone, and the connection judged again
    /// (an offloaded one with its path, so its holds are set anew).
    fn wake(&mut self, keys: Option<&[fo_flow_key]>) {
        // One batch, like a batch of conntrack events: a burst of new UDP
        // connections wakes on their second packets (`Verdict::Watch`),
        // installed together, the wake-up counting as their event.
        self.flows.events_at = Some(Instant::now());
        self.flows.begin_batch();
        for (id, ev) in self.flows.woken(keys) {
            if self.flows.prove(&id, ev) {
                let offloaded = self.flows.is_offloaded(&id);
                self.rejudge(&id, None, offloaded);
            }
        }
        self.flows.end_batch();
        self.flows.events_at = None;
    }

    fn answer(&mut self, req: Request) -> Result<Response, String> {
        match req {
            Request::Status => Ok(Response::Status(Box::new(self.status()))),
            Request::Flows => Ok(Response::Flows(self.flow_list())),
            Request::Hosts => Ok(Response::Hosts(self.host_list())),
            Request::SlowFlows => Ok(Response::Slow(self.slow_list())),
            Request::Reload { name, ruleset } => {
                self.reload(&name, &ruleset).map(Response::Done).map_err(|e| crate::error_text(&e))
            }
            Request::ReloadFiles => self.reload_files().map(Response::Done).map_err(|e| crate::error_text(&e)),
        }
    }
}
