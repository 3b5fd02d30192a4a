//! What the demo measured, and the side-by-side table it prints.

use serde::Serialize;

use crate::lab::{CLIENT_V4, SERVER_V4};

/// One iperf3 run and what the router spent on it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RunReport {
    /// "tcp" or "udp".
    pub proto: String,
    /// Throughput seen by the receiver, bits/s.
    pub bits_per_second: f64,
    /// Sender's rate, bits/s.
    pub sender_bits_per_second: f64,
    /// UDP only.
    pub lost_percent: Option<f64>,
    /// TCP only.
    pub retransmits: Option<u64>,
    /// Non-idle time of the router CPU (or the whole machine, see
    /// `DemoReport::cpu_scope`) during the run: wall time minus idle and
    /// iowait from /proc/stat (exact on NO_HZ kernels).
    pub cpu_ns: u64,
    /// The same from the sum of /proc/stat's busy fields
    /// (user+nice+system+irq+softirq+steal). Tick-sampled on most kernels,
    /// so it under-counts bursty light load; kept for comparison.
    pub cpu_ns_ticks: u64,
    /// rx_packets delta of wan0 plus lan0: everything the router forwarded,
    /// both directions (counted at the receivers because with XDP redirect
    /// the router's own tx counters do not see the frames). With GRO/GSO on
    /// the kernel path these are aggregated packets, not wire frames.
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub cpu_ns_per_packet: Option<f64>,
    /// `cpu_ns` per 1500 bytes forwarded: comparable across paths even when
    /// GRO/TSO aggregation makes packet counts differ.
    pub cpu_ns_per_1500b: Option<f64>,
    /// On-CPU time of just the router's NAPI kthreads and the offload
    /// daemon (from /proc/PID/task/*/schedstat): a cross-check that is
    /// immune to unrelated load on the router CPU. None without isolation.
    pub router_threads_cpu_ns: Option<u64>,
    pub router_threads_ns_per_packet: Option<f64>,
    /// Delta of the forward chain's `fwd_all` counter: packets the slow
    /// path still handled.
    pub fwd_chain_packets: u64,
}

/// Results for one forwarding path.
#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    /// "kernel", "offload-tc" or "offload-xdp".
    pub path: String,
    pub tcp: RunReport,
    pub udp: RunReport,
    /// `nft-offload flows` output captured ~2 s into the TCP run (offload
    /// paths only).
    pub flows: Option<String>,
}

/// Everything the demo measured.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub prefix: String,
    pub duration_s: u32,
    /// True when router work was confined to `router_cpu`.
    pub cpu_isolated: bool,
    pub router_cpu: Option<usize>,
    /// What the CPU figures cover.
    pub cpu_scope: String,
    pub paths: Vec<PathReport>,
}

fn mbit(bps: f64) -> String {
    format!("{:.1}", bps / 1e6)
}

fn opt_f(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}")).unwrap_or_else(|| "-".into())
}

/// Plain-text table: first column left-aligned labels, others right-aligned.
fn table(header: &[String], rows: &[(String, Vec<String>)]) -> String {
    let ncol = header.len();
    let mut w = vec![0usize; ncol];
    for (i, h) in header.iter().enumerate() {
        w[i] = h.chars().count();
    }
    for (label, vals) in rows {
        w[0] = w[0].max(label.chars().count());
        for (i, v) in vals.iter().enumerate() {
            w[i + 1] = w[i + 1].max(v.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 0 {
                s.push_str(&format!("{c:<width$}", width = w[0]));
            } else {
                s.push_str(&format!("  {c:>width$}", width = w[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.iter().map(String::as_str).collect(), &mut out);
    let total: usize = w.iter().sum::<usize>() + 2 * (ncol - 1);
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for (label, vals) in rows {
        let mut cells = vec![label.as_str()];
        cells.extend(vals.iter().map(String::as_str));
        line(cells, &mut out);
    }
    out
}

impl DemoReport {
    /// Side-by-side table of the paths plus the captured flow listings.
    pub fn render(&self) -> String {
        let mut header = vec!["metric".to_string()];
        header.extend(self.paths.iter().map(|p| p.path.replace('-', " ")));
        let col = |f: &dyn Fn(&PathReport) -> String| -> Vec<String> { self.paths.iter().map(f).collect() };
        // What the offload changes first, at the same offered load (the
        // UDP run: every path is offered the same packets), then the TCP
        // run, whose rate the hosts bound, not the router.
        let per_pkt = |r: &RunReport| opt_f(r.router_threads_ns_per_packet.or(r.cpu_ns_per_packet), 0);
        let wall_ns = f64::from(self.duration_s) * 1e9;
        let free = |r: &RunReport| {
            (self.cpu_isolated && wall_ns > 0.0).then(|| (100.0 - r.cpu_ns as f64 / wall_ns * 100.0).clamp(0.0, 100.0))
        };
        let rows: Vec<(String, Vec<String>)> = vec![
            ("UDP: router CPU per forwarded packet (ns)".into(), col(&|p| per_pkt(&p.udp))),
            ("UDP: packets the firewall's forward chain saw".into(), col(&|p| p.udp.fwd_chain_packets.to_string())),
            ("UDP: router CPU left free (%)".into(), col(&|p| opt_f(free(&p.udp), 0))),
            ("UDP: packets forwarded".into(), col(&|p| p.udp.forwarded_packets.to_string())),
            ("UDP: loss (%)".into(), col(&|p| opt_f(p.udp.lost_percent, 2))),
            ("TCP: router CPU per 1500 B forwarded (ns)".into(), col(&|p| opt_f(p.tcp.cpu_ns_per_1500b, 0))),
            ("TCP: packets the firewall's forward chain saw".into(), col(&|p| p.tcp.fwd_chain_packets.to_string())),
            ("TCP: throughput, bound by the hosts (Mbit/s)".into(), col(&|p| mbit(p.tcp.bits_per_second))),
            ("TCP: retransmits".into(), col(&|p| p.tcp.retransmits.map(|r| r.to_string()).unwrap_or("-".into()))),
            ("UDP: throughput (Mbit/s)".into(), col(&|p| mbit(p.udp.bits_per_second))),
            ("UDP: router CPU non-idle (ms)".into(), col(&|p| format!("{:.0}", p.udp.cpu_ns as f64 / 1e6))),
            ("TCP: router CPU non-idle (ms)".into(), col(&|p| format!("{:.0}", p.tcp.cpu_ns as f64 / 1e6))),
            ("TCP: router CPU per packet (ns)".into(), col(&|p| per_pkt(&p.tcp))),
        ];
        let mut out = format!(
            "nft-offload demo: {} -> router -> {} ({} s per run)\n\
             What offload changes on the router: the CPU it spends per forwarded packet and the packets its \
             firewall must still see,\nfirst at the same offered load (UDP, 300 Mbit/s of 1400-byte datagrams), \
             then for a bulk TCP transfer.\n\n",
            CLIENT_V4, SERVER_V4, self.duration_s
        );
        out.push_str(&table(&header, &rows));
        out.push_str(
            "\nTCP throughput here is not the router's: on veth the sending and receiving hosts share this \
             machine's CPUs with the router and bound the rate\n(a faster path can even show less, the hosts \
             being starved differently). The rows above it are the offload's effect; the benchmark\n\
             (`./run.sh bench`, BENCHMARKS.md) measures the router's cost per packet by its own threads' CPU time.\n",
        );
        out.push_str(&format!("\nRouter CPU: {}.\n", self.cpu_scope));
        out.push_str(
            "  Non-idle time = wall time minus idle from /proc/stat (exact with NO_HZ; the \
             tick-sampled busy fields, kept in the JSON as cpu_ns_ticks, miss short bursts).\n\
             Packets forwarded = rx_packets of lan0 + wan0, both directions (GRO/TSO aggregates \
             count once, hence the per-1500-byte row).\n",
        );
        if self.cpu_isolated {
            out.push_str(
                "\"Router threads only\" = scheduler run time of the router's NAPI threads and the \
                 offload daemon: immune to unrelated load, but leaves out wakeup/IRQ overhead.\n",
            );
        }
        for p in &self.paths {
            if let Some(f) = &p.flows {
                out.push_str(&format!("\nOffloaded flows ({}, ~2 s into the TCP run):\n", p.path.replace('-', " ")));
                let f = f.trim_end();
                if f.is_empty() {
                    out.push_str("  (none)\n");
                } else {
                    for l in f.lines() {
                        out.push_str("  ");
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_aligns_columns() {
        let run = |bps: f64| RunReport {
            proto: "tcp".into(),
            bits_per_second: bps,
            cpu_ns_per_packet: Some(999.0),
            router_threads_ns_per_packet: Some(1234.4),
            lost_percent: Some(0.5),
            ..Default::default()
        };
        let r = DemoReport {
            prefix: "x".into(),
            duration_s: 1,
            cpu_isolated: true,
            router_cpu: Some(1),
            cpu_scope: "cpu1".into(),
            paths: vec![
                PathReport { path: "kernel".into(), tcp: run(1e9), udp: run(3e8), flows: None },
                PathReport {
                    path: "offload-xdp".into(),
                    tcp: run(12.5e9),
                    udp: run(3e8),
                    flows: Some("flow a\nflow b\n".into()),
                },
            ],
        };
        let s = r.render();
        let lines: Vec<&str> = s.lines().collect();
        let hdr = lines.iter().position(|l| l.starts_with("metric")).unwrap();
        assert!(lines[hdr].ends_with("offload xdp"));
        // What the offload changes leads; throughput comes later, said
        // to be the hosts'.
        let first = lines[hdr + 2];
        assert!(first.starts_with("UDP: router CPU per forwarded packet"), "{s}");
        assert_eq!(
            first.split_whitespace().rev().take(2).collect::<Vec<_>>(),
            ["1234", "1234"],
            "threads only: {first}"
        );
        let tcp = lines.iter().find(|l| l.starts_with("TCP: throughput, bound by the hosts")).unwrap();
        assert!(s.contains("TCP throughput here is not the router's"), "{s}");
        // Right-aligned: values end at the same column as the header.
        assert_eq!(tcp.len(), lines[hdr].len());
        assert!(tcp.ends_with("12500.0"));
        assert!(s.contains("  flow b"));
        serde_json::to_string(&r).unwrap();
    }
}
