//! The benchmark's text report.

use super::paths::PATHS;
use super::{Report, Stat};

impl Report {
    pub fn render(&self) -> String {
        let mut o = format!("nft-offload bench ({}){}\n\n", self.machine, if self.quick { ", --quick" } else { "" });
        let f =
            |s: &Option<Stat>| s.map(|s| format!("{:.0} ({:.0}-{:.0})", s.median, s.min, s.max)).unwrap_or("-".into());
        o += &format!(
            "{:<14} {:>22} {:>22} {:>22} {:>10} {:>10} {:>10} {:>12}\n",
            "path",
            "router ns/pkt 1 flow",
            "ns/pkt 1k flows",
            "max pps",
            "TCP 1500",
            "TCP GSO",
            "TCP x4",
            "ping p99 ms"
        );
        for p in PATHS {
            if let Some(x) = self.paths.get(p) {
                let m = |s: &Option<Stat>| s.map(|s| format!("{:.0}", s.median)).unwrap_or("-".into());
                o += &format!(
                    "{:<14} {:>22} {:>22} {:>22} {:>10} {:>10} {:>10} {:>12}\n",
                    p,
                    f(&x.router_ns_per_pkt),
                    f(&x.router_ns_per_pkt_1k),
                    f(&x.max_pps),
                    m(&x.tcp_1stream_1500_mbps),
                    m(&x.tcp_1stream_gso_mbps),
                    m(&x.tcp_4stream_gso_mbps),
                    x.ping_loaded_p99_ms.map(|v| format!("{v:.2}")).unwrap_or("-".into())
                );
            }
        }
        o += "\nFast path alone (BPF_PROG_TEST_RUN, ns/pkt):\n";
        for (k, s) in &self.fast_path.ns_per_pkt {
            o += &format!("  {k:<24} {:.1} ({:.1}-{:.1})\n", s.median, s.min, s.max);
        }
        o += "\nScaling (ns/pkt, one packet per run, random installed flow; entries installed directly):\n";
        for (k, s) in &self.scaling_ns_per_pkt {
            o += &format!("  {k:>8} flows  {:.1} ({:.1}-{:.1})\n", s.median, s.min, s.max);
        }
        o += "\nMemory:\n";
        for (k, v) in &self.memory {
            o += &format!("  {k:<28} {v:.0}\n");
        }
        o += "\nOffload:\n";
        for (k, v) in &self.offload {
            o += &format!("  {k:<28} {v:.1}\n");
        }
        o += "\nRatios (measured, target):\n";
        for (k, t) in &self.targets {
            let v = self.ratios.get(k).map(|v| format!("{v:.2}")).unwrap_or("-".into());
            o += &format!("  {k:<36} {v:>8}   target {t}\n");
        }
        for n in &self.notes {
            o += &format!("note: {n}\n");
        }
        o
    }
}
