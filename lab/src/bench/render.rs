//! The benchmark's text report.

use super::paths::{FLOWS, PATHS, PPS};
use super::{Report, Stat};

fn med_range(s: &Option<Stat>) -> String {
    s.map(|s| format!("{:.0} ({:.0}-{:.0})", s.median, s.min, s.max)).unwrap_or("-".into())
}

/// The spread, and in brackets the inner spread (without the highest and
/// lowest round).
fn spread(s: &Option<Stat>) -> String {
    s.map(|s| format!("{:.0}% ({:.0}%)", s.spread() * 100.0, s.inner_spread() * 100.0)).unwrap_or("-".into())
}

impl Report {
    pub fn render(&self) -> String {
        let mut o = format!("nft-offload bench ({}){}\n\n", self.machine, if self.quick { ", --quick" } else { "" });
        o += &format!(
            "Router cost: on-CPU ns of the router's NAPI kthreads + engine threads per forwarded packet \
             (64-byte UDP, {FLOWS} flows, {:.0} kpps offered); medians (min-max) over interleaved rounds; \
             spread = (max-min)/median, in brackets without the highest and lowest round (shown only, \
             validity uses the full spread). \
             CPU-wide = the router CPU's non-idle time, everything on it counted. \
             drops = packets the veth ends dropped per forwarded packet.\n",
            PPS / 1e3
        );
        o += &format!(
            "{:<14} {:>20} {:>11} {:>8} {:>8} {:>22} {:>9} {:>6} {:>18} {:>8} {:>8} {:>8} {:>8}\n",
            "path",
            "router ns/pkt",
            "spread",
            "napi",
            "engine",
            "CPU-wide ns/pkt",
            "fwd pps",
            "drops",
            "max pps",
            "TCP 1500",
            "TCP GSO",
            "TCP x4",
            "ping p99"
        );
        let m = |s: &Option<Stat>| s.map(|s| format!("{:.0}", s.median)).unwrap_or("-".into());
        for p in PATHS {
            if let Some(x) = self.paths.get(p) {
                o += &format!(
                    "{:<14} {:>20} {:>11} {:>8} {:>8} {:>22} {:>9} {:>6} {:>18} {:>8} {:>8} {:>8} {:>8}\n",
                    p,
                    med_range(&x.router_ns_per_pkt),
                    spread(&x.router_ns_per_pkt),
                    m(&x.napi_ns_per_pkt),
                    m(&x.engine_ns_per_pkt),
                    med_range(&x.cpu_wide_ns_per_pkt),
                    m(&x.forwarded_pps),
                    x.ring_drops_per_fwd.map(|s| format!("{:.2}", s.median)).unwrap_or("-".into()),
                    med_range(&x.max_pps),
                    m(&x.tcp_1stream_1500_mbps),
                    m(&x.tcp_1stream_gso_mbps),
                    m(&x.tcp_4stream_gso_mbps),
                    x.ping_loaded_p99_ms.map(|v| format!("{v:.2}")).unwrap_or("-".into())
                );
            }
        }
        for p in PATHS {
            if let Some(f) = self.paths.get(p).and_then(|x| x.fast_path_share) {
                o += &format!(
                    "{p}: fast-path packets / forwarded packets {:.3} (lowest round {:.3})\n",
                    f.median, f.min
                );
            }
        }
        o += "\nLive offloaded connections (offload_tc, traffic spread over all of them; router cost ns/pkt):\n";
        for (n, x) in &self.live_scaling {
            o += &format!(
                "  {n:>7} conns: offloaded {:>7}, conntrack {:>7}, router {} (napi {:.0}, engine {:.0}), \
                 CPU-wide {:.0}, {:.0} pkt/s forwarded, slow-path share {:.3}, set up in {:.1} s \
                 ({} resyncs, {} events); then idle: engine {:.2}% of a core ({} -> {} offloaded)\n",
                x.offloaded,
                x.conntrack,
                med_range(&Some(x.router_ns_per_pkt)),
                x.napi_ns_per_pkt.median,
                x.engine_ns_per_pkt.median,
                x.cpu_wide_ns_per_pkt.median,
                x.forwarded_pps.median,
                x.slow_share,
                x.setup_s,
                x.resyncs,
                x.events,
                x.idle_engine_cpu_pct,
                x.idle_offloaded.0,
                x.idle_offloaded.1
            );
        }
        let l = &self.offload_latency;
        o += &format!(
            "\nOffload latency (packet timestamps at the router's ingress, handshake-completing ACK to first \
             fast-pathed packet, offload_tc): p50 {:.0} us, p99 {:.0} us, max {:.0} us over {} connections \
             ({} not offloaded within {:.1} s; one packet every {:.0} us)\n",
            l.p50_us, l.p99_us, l.max_us, l.connections, l.not_offloaded, l.send_s, l.send_interval_us
        );
        for (k, t) in &l.transfers {
            o += &format!(
                "  {k:>6} transfer: fast-path share {:.3} of packets, {:.3} of bytes (medians of {}), \
                 {} of {} had a fast-pathed packet\n",
                t.fast_packet_share.median, t.fast_byte_share.median, t.n, t.offloaded, t.n
            );
        }
        o += "\nFast path alone (BPF_PROG_TEST_RUN, ns/pkt):\n";
        for (k, s) in &self.fast_path.ns_per_pkt {
            o += &format!("  {k:<32} {:.1} ({:.1}-{:.1})\n", s.median, s.min, s.max);
        }
        for (k, t) in self.targets.iter().filter(|(k, _)| k.starts_with("fast_path_") && k.contains("_vs_")) {
            let v = self.ratios.get(k).map(|v| format!("{v:.2}")).unwrap_or("-".into());
            o += &format!("  {k:<40} {v:>6}x  target {t}\n");
        }
        o += "\nScaling (ns/pkt, one packet per run, random installed flow; entries installed directly):\n";
        for (k, s) in &self.scaling_ns_per_pkt {
            o += &format!("  {k:>8} flows  {:.1} ({:.1}-{:.1})\n", s.median, s.min, s.max);
        }
        o += "\nMemory:\n";
        for (k, v) in &self.memory {
            o += &format!("  {k:<28} {v:.0}\n");
        }
        if !self.small_router.is_empty() {
            o += "\nSmall router (engine under a 64 MiB memory limit and 20% of a CPU):\n";
            for (k, v) in &self.small_router {
                o += &format!("  {k:<36} {v:.1}\n");
            }
        }
        o += "\nOffload:\n";
        for (k, v) in &self.offload {
            o += &format!("  {k:<28} {v:.1}\n");
        }
        o += "\nRatios and figures (measured, target; targets are not asserted):\n";
        for (k, t) in &self.targets {
            let v = self.ratios.get(k).map(|v| format!("{v:.2}")).unwrap_or("-".into());
            o += &format!("  {k:<40} {v:>10}   target {t}\n");
        }
        for n in &self.notes {
            o += &format!("note: {n}\n");
        }
        if self.valid() {
            o += "\nrun VALID: every spread within 25%, floors below their paths\n";
        } else {
            for m in &self.invalid {
                o += &format!("\nINVALID: {m}");
            }
            o += "\n";
        }
        o
    }
}
