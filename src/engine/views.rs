//! `status` and `flows` as the engine sees itself.

use std::collections::{BTreeMap, HashMap};

use crate::conntrack::CtTuple;
use crate::control::{FlowView, HostView, IfaceStatus, KernelView, NotOffloadedView, SlowView, Status, TupleView};
use crate::dataplane::{key_bytes, KEY_LEN};
use crate::flow::ConnId;

use super::hosts::{host_of, through_router, Totals};
use crate::dataplane::{fo_stat, Mode, TcAttach, STAT_NAMES};
use crate::flow::entry::words_addr;
use crate::flow::{Held, Hold};
use crate::proto::{self, AF_INET, IPPROTO_TCP};

use crate::policy::verdict::Holds;

use super::rates::Sample;
use super::{now_ns, Core};

/// The first slow-path reason in `fo_stat` (bpf/flow.h): the counters
/// before it are not slow-path exits.
fn first_reason() -> usize {
    fo_stat::FO_STAT_HDR_PULLED.0 as usize + 1
}

/// The slow-path exits' counters by name: every reason, not the failed
/// transmissions at the end (dropped, not handed on).
fn slow_reasons(stats: &[u64]) -> impl Iterator<Item = (&'static str, u64)> + '_ {
    let end = fo_stat::FO_STAT_TX_FAILED.0 as usize;
    STAT_NAMES.iter().zip(stats).take(end).skip(first_reason()).map(|(n, v)| (*n, *v))
}

impl Core {
    /// The fast path's counters now, for the rates.
    pub(super) fn rate_sample(&self) -> Sample {
        let stats = self.flows.dp().stats();
        Sample {
            at: std::time::Instant::now(),
            fast_packets: stats[fo_stat::FO_STAT_FWD_PACKETS.0 as usize],
            fast_bytes: stats[fo_stat::FO_STAT_FWD_BYTES.0 as usize],
            slow_packets: slow_reasons(&stats).map(|(_, v)| v).sum(),
        }
    }

    pub(super) fn status(&self) -> Status {
        let stats = self.flows.dp().stats();
        // The fast path's totals, then the slow-path reasons.
        let (fwd_packets, fwd_bytes) =
            (stats[fo_stat::FO_STAT_FWD_PACKETS.0 as usize], stats[fo_stat::FO_STAT_FWD_BYTES.0 as usize]);
        let slow = STAT_NAMES.iter().zip(&stats).skip(first_reason()).map(|(n, v)| (n.to_string(), *v)).collect();
        let (offloaded, waiting, dormant) = self.flows.len();
        let c = &self.flows.counters;
        let mut lat: Vec<u32> = c.offload_us.iter().copied().collect();
        lat.sort_unstable();
        let pct = |p: f64| lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(0);
        Status {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            mode_requested: self.cfg.mode,
            kernel: Some(KernelView {
                release: crate::host::kernel_release(),
                tc_attach: match self.flows.dp().features().tc_attach {
                    TcAttach::Tcx => "tcx".into(),
                    TcAttach::Clsact => "clsact".into(),
                },
                features: self.flows.dp().features().lines(),
            }),
            interfaces: self
                .ifaces
                .0
                .iter()
                .map(|i| IfaceStatus {
                    topology: self.facts.topo.describe(i.ifindex),
                    attach: self.flows.dp().attach_description(i.ifindex).unwrap_or_default(),
                    ..i.clone()
                })
                .collect(),
            flows_offloaded: offloaded,
            flows_waiting_for_neighbour: waiting,
            flows_dormant: dormant,
            flow_capacity: self.flows.dp().flow_capacity(),
            map_memory_bytes: self.flows.dp().map_memory().iter().map(|(_, b)| b).sum(),
            daemon_rss_bytes: crate::host::own_rss_bytes().unwrap_or(0),
            idle_timeout_s: self.cfg.idle_timeout.as_secs(),
            fast_path_packets: fwd_packets,
            fast_path_bytes: fwd_bytes,
            rates: self.rates.view(&self.rate_sample()),
            slow_path: slow,
            offloads_total: c.offloads,
            teardowns: c.teardowns.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            not_offloaded: {
                let mut v: Vec<NotOffloadedView> = c
                    .not_offloaded
                    .iter()
                    .map(|(reason, r)| NotOffloadedView {
                        code: r.code.to_string(),
                        reason: reason.clone(),
                        connections: r.connections,
                    })
                    .collect();
                v.sort_by(|a, b| (&a.code, &a.reason).cmp(&(&b.code, &b.reason)));
                v
            },
            conntrack_events: self.ct_events,
            conntrack_resyncs: self.ct_resyncs,
            conntrack_refreshes: c.refreshes,
            flows_unwatched: self.flows.unwatched(),
            fast_path_ct_refreshes: stats[fo_stat::FO_STAT_CT_REFRESHED.0 as usize],
            fast_path_ct_gone: stats[fo_stat::FO_STAT_CT_GONE.0 as usize],
            fast_path_header_pulls: stats[fo_stat::FO_STAT_HDR_PULLED.0 as usize],
            conntrack_rst_restores: c.rst_restores,
            path_resolutions: self.path_resolutions,
            fib_queries: self.facts.cache.borrow().stats.queries,
            fib_cache_hits: self.facts.cache.borrow().stats.hits,
            reresolve_last: self.rework.last,
            offload_latency_us: BTreeMap::from([("p50".to_string(), pct(0.5)), ("p99".to_string(), pct(0.99))]),
        }
    }

    /// Per-host totals (`hosts`): what ended, plus every conntrack entry's
    /// counters and every offloaded connection's fast-path counters now
    /// (one conntrack dump and one batched walk of the flow map).
    pub(super) fn host_list(&mut self) -> Vec<HostView> {
        let all = match self.flows.ct.dump() {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!("hosts: conntrack dump failed: {e}");
                Vec::new()
            }
        };
        let mut fast: HashMap<[u8; KEY_LEN], (u64, u64)> = HashMap::with_capacity(2 * self.flows.offloaded.len());
        if let Err(e) = self.flows.dp().for_each_flow(4096, |k, v| {
            fast.insert(key_bytes(&k), (v.packets, v.bytes));
        }) {
            tracing::warn!("hosts: reading the flow map: {e:#}");
        }
        let mut live: HashMap<std::net::IpAddr, (Totals, usize)> = HashMap::new();
        for e in all.iter().filter(|e| through_router(e, |ip| self.facts.addrs.is_local(ip))) {
            let (host, sent_orig) = host_of(e);
            let mut d = [e.counters_orig.unwrap_or_default(), e.counters_reply.unwrap_or_default()];
            if let Some(f) = self.flows.offloaded.get(&ConnId::of(e)) {
                for (i, dir) in d.iter_mut().enumerate() {
                    let w =
                        fast.get(&key_bytes(&f.dirs[i].key)).copied().unwrap_or((f.last[i].packets, f.last[i].bytes));
                    dir.0 += f.base[i].0 + w.0;
                    dir.1 += f.base[i].1 + w.1;
                }
            }
            let slot = live.entry(host).or_default();
            slot.0.add(sent_orig, d);
            slot.1 += 1;
        }
        self.flows.hosts.view(&live)
    }

    /// `flows --all`'s other half: what is on the kernel's path, and why.
    pub(super) fn slow_list(&self) -> Vec<SlowView> {
        let mut v: Vec<SlowView> = self
            .flows
            .slow_list()
            .into_iter()
            .map(|(id, code, reason)| SlowView {
                proto: proto::name(id.proto).into(),
                protonum: id.proto,
                orig: TupleView { src: id.src, dst: id.dst, sport: id.sport, dport: id.dport },
                zone: id.zone,
                code: code.to_string(),
                reason,
            })
            .collect();
        v.sort_by(|a, b| {
            (&a.code, a.orig.src, a.orig.dst, a.orig.sport).cmp(&(&b.code, b.orig.src, b.orig.dst, b.orig.sport))
        });
        v
    }

    pub(super) fn flow_list(&mut self) -> Vec<FlowView> {
        // conntrack's own timeout column, as `conntrack -L` shows it: one
        // dump per request (an operator's command, not a per-packet cost).
        let timeouts: HashMap<u32, u32> = match self.flows.ct.dump() {
            Ok(all) => all.into_iter().filter_map(|e| Some((e.id, e.timeout?))).collect(),
            Err(e) => {
                tracing::warn!("flows: conntrack dump for the timeouts failed: {e}");
                HashMap::new()
            }
        };
        let now = now_ns();
        let name = |i: u32| self.ifaces.get(i).map(|x| x.name.clone()).unwrap_or_else(|| i.to_string());
        let tuple = |t: &CtTuple| TupleView { src: t.src, dst: t.dst, sport: t.sport, dport: t.dport };
        let mut v: Vec<FlowView> = self
            .flows
            .offloaded
            .values()
            .map(|f| {
                let o = &f.dirs[0];
                // Keepalive reads the map only when a connection is due:
                // counters as of now.
                let cur = [0, 1].map(|i| self.flows.dp().get_written(&f.dirs[i].key).unwrap_or(f.last[i]));
                let tcp = f.entry.orig.proto == IPPROTO_TCP;
                FlowView {
                    id: f.entry.id,
                    proto: proto::name(f.entry.orig.proto).into(),
                    state: tcp.then(|| "ESTABLISHED".into()),
                    orig: tuple(&f.entry.orig),
                    reply: tuple(&f.entry.reply),
                    packets_orig: f.base[0].0 + cur[0].packets,
                    bytes_orig: f.base[0].1 + cur[0].bytes,
                    packets_reply: f.base[1].0 + cur[1].packets,
                    bytes_reply: f.base[1].1 + cur[1].bytes,
                    idle_ms: now
                        .saturating_sub(cur.iter().map(|v| v.last_seen_ns).fold(f.clock.installed_ns, u64::max))
                        / 1_000_000,
                    timeout_s: timeouts.get(&f.entry.id).copied(),
                    mode: self.ifaces.get(o.key.ifindex).map(|x| x.mode).unwrap_or(Mode::Tc),
                    iif: name(o.key.ifindex),
                    oif: name(o.val.out_ifindex),
                    mark: f.entry.mark,
                    zone: f.entry.zone,
                    family: if o.key.family == AF_INET { 4 } else { 6 },
                    nat_src: words_addr(o.key.family, &o.val.new_saddr) != f.entry.orig.src,
                    nat_dst: words_addr(o.key.family, &o.val.new_daddr) != f.entry.orig.dst,
                    // Recomputed from the current facts, which the
                    // installed hold followed within ROUTE_SETTLE.
                    slow: [0, 1].map(|i| {
                        f.dirs[i].hold().map(|h| match h {
                            Hold::Dormant => Held::dormant().why,
                            _ => self
                                .holds
                                .held(&f.entry, i, &f.dirs[i])
                                .map_or_else(|| h.as_str().to_string(), |x| x.why),
                        })
                    }),
                    encap: [0, 1].map(|i| {
                        let (arrive, leave) = f.dirs[i].encap();
                        (!arrive.as_slice().is_empty() || !leave.as_slice().is_empty())
                            .then(|| format!("arrives {arrive}, leaves {leave}"))
                    }),
                }
            })
            .collect();
        v.sort_by_key(|f| f.id);
        v
    }
}
