//! End-to-end offload latency from packet timestamps, and the share of short
//! transfers that took the fast path (offload_tc).
//!
//! Two TCX ingress taps on each router port (bench.bpf.c): `lat_pre` first
//! in the chain, before the engine's program, stamps every TCP packet of the
//! benchmark's connections with bpf_ktime_get_ns; `lat_post` last, after
//! it, sees only the packets the engine's program passed to the kernel (it
//! redirects the ones it fast-paths, which ends the chain: net/core/dev.c
//! tcx_run stops at the first verdict other than TCX_NEXT). So a packet is
//! fast-pathed iff lat_pre saw it and lat_post did not. The connection
//! becomes eligible with the packet that makes its conntrack entry ASSURED:
//! the client's ACK completing the handshake (net/netfilter/
//! nf_conntrack_proto_tcp.c nf_conntrack_tcp_packet sets IPS_ASSURED on
//! SYN_RECV -> ESTABLISHED). Latency = first fast-pathed packet's stamp -
//! that ACK's stamp, both at the router's ingress, on one clock, with no
//! engine-internal clock involved. TC mode only: in XDP mode a fast-pathed
//! packet never reaches TCX, and no program runs before the engine's XDP
//! program to stamp it.

mod analyze;
mod taps;
mod traffic;

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use super::tcp::set_gso;
use super::Stat;
use crate::lab::Lab;
use analyze::connections;
use traffic::{Kind, PORT_HI, PORT_LO};

/// Fast-path share of one transfer size.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TransferShare {
    pub n: usize,
    /// Share of the transfer's packets (both directions) fast-pathed.
    pub fast_packet_share: Stat,
    pub fast_byte_share: Stat,
    /// Transfers that had at least one fast-pathed packet.
    pub offloaded: usize,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct OffloadLatency {
    /// Eligible (handshake-completing ACK) to first fast-pathed packet, us.
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Paced connections measured, and how many never got a fast-pathed
    /// packet while they sent.
    pub connections: usize,
    pub not_offloaded: usize,
    /// Interval between the paced connections' packets: the resolution.
    pub send_interval_us: f64,
    /// Seconds each paced connection sent for.
    pub send_s: f64,
    /// "100KB", "1MB", "10MB".
    pub transfers: BTreeMap<String, TransferShare>,
    /// Ring buffer events lost (none expected).
    pub lost_events: u64,
}

/// Run with the offload_tc engine running on the lab's router.
pub(super) fn offload_latency(lab: &Lab, quick: bool) -> Result<OffloadLatency> {
    eprintln!("bench:   offload latency (packet timestamps) and fast-path share of transfers");
    let range = format!("{PORT_LO} {PORT_HI}");
    lab.exec(&lab.lan, &["sysctl", "-q", "-w", &format!("net.ipv4.ip_local_port_range={range}")])?;
    set_gso(lab, false)?;
    let taps = taps::Taps::start(lab)?;
    let plan = traffic::Plan::new(quick);
    let run = traffic::run(lab, &plan);
    let (events, lost) = taps.stop()?;
    set_gso(lab, true)?;
    super::tcp::router_tso(lab, false)?;
    lab.exec(&lab.lan, &["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=32768 60999"])?;
    let done = run?;
    let conns = connections(&events);
    let mut out = OffloadLatency {
        send_interval_us: plan.interval.as_secs_f64() * 1e6,
        send_s: plan.paced_for.as_secs_f64(),
        lost_events: lost,
        ..Default::default()
    };
    let mut lat = Vec::new();
    let mut shares: BTreeMap<String, Vec<(f64, f64, bool)>> = BTreeMap::new();
    for c in &done {
        let Some(t) = conns.iter().find(|t| t.port == c.port && t.nth == c.nth) else {
            anyhow::bail!("no packets seen at the router for connection from port {} (#{})", c.port, c.nth);
        };
        match &c.kind {
            Kind::Paced => {
                out.connections += 1;
                match t.latency_ns() {
                    Some(ns) => lat.push(ns as f64 / 1e3),
                    None => out.not_offloaded += 1,
                }
            }
            Kind::Transfer(label) => {
                let (p, b) = t.fast_shares();
                shares.entry(label.clone()).or_default().push((p, b, t.fast_pkts > 0));
            }
        }
    }
    let (p50, p99) = super::paths::p50_p99(&lat);
    out.p50_us = p50;
    out.p99_us = p99;
    out.max_us = lat.iter().copied().fold(f64::NAN, f64::max);
    for (label, v) in shares {
        out.transfers.insert(
            label,
            TransferShare {
                n: v.len(),
                fast_packet_share: Stat::of(v.iter().map(|x| x.0).collect()),
                fast_byte_share: Stat::of(v.iter().map(|x| x.1).collect()),
                offloaded: v.iter().filter(|x| x.2).count(),
            },
        );
    }
    Ok(out)
}
