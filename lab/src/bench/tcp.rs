//! TCP throughput (iperf3) and ping latency through the router, idle and
//! under a saturating TCP stream.

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use super::stat::percentile;
use super::{PathResult, Stat};
use crate::lab::Lab;

/// Samples over the rounds that measure TCP.
#[derive(Default)]
pub(super) struct TcpAcc {
    mss_1500: Vec<f64>,
    gso: Vec<f64>,
    gso_x4: Vec<f64>,
    ping_idle: Vec<f64>,
    ping_loaded: Vec<f64>,
}

impl TcpAcc {
    pub(super) fn into_result(self, pr: &mut PathResult) {
        if self.mss_1500.is_empty() {
            return;
        }
        pr.tcp_1stream_1500_mbps = Some(Stat::of(self.mss_1500));
        pr.tcp_1stream_gso_mbps = Some(Stat::of(self.gso));
        pr.tcp_4stream_gso_mbps = Some(Stat::of(self.gso_x4));
        pr.ping_idle_ms = Some(Stat::of(self.ping_idle));
        pr.ping_loaded_p50_ms = Some(percentile(&self.ping_loaded, 0.5));
        pr.ping_loaded_p99_ms = Some(percentile(&self.ping_loaded, 0.99));
        pr.ping_loaded_samples = self.ping_loaded;
    }
}

fn iperf(lab: &Lab, streams: u32, secs: u32) -> Result<f64> {
    let (p, t) = (streams.to_string(), secs.to_string());
    let out = lab.exec(&lab.lan, &["iperf3", "-c", "203.0.113.2", "-J", "-t", &t, "-P", &p])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().map(|b| b / 1e6).ok_or_else(|| anyhow!("iperf3: no result"))
}

/// TCP segmentation offloads at both hosts and TSO on the router's ports:
/// off gives 1500-byte frames through the router, as on a wire.
pub(super) fn set_gso(lab: &Lab, on: bool) -> Result<()> {
    let v = if on { "on" } else { "off" };
    lab.exec(&lab.lan, &["ethtool", "-K", "lan0", "tso", v, "gso", v])?;
    lab.exec(&lab.wan, &["ethtool", "-K", "wan0", "tso", v, "gso", v])?;
    router_tso(lab, on)
}

/// TSO on the router's ports. Off for the UDP measurements: veth hands a
/// packet to the peer's NAPI (here the sink's own kthread) only if the
/// sending device cannot make TSO packets (drivers/net/veth.c veth_xmit,
/// veth_skb_is_eligible_for_gro); otherwise it goes through netif_rx into
/// a backlog, outside the sink's thread.
pub(super) fn router_tso(lab: &Lab, on: bool) -> Result<()> {
    let v = if on { "on" } else { "off" };
    for dev in ["rlan", "rwan"] {
        lab.exec(&lab.rtr, &["ethtool", "-K", dev, "tso", v])?;
    }
    Ok(())
}

/// One round: iperf3 with 1500-byte frames, with GSO, with 4 streams; then
/// pings idle and during a saturating stream.
pub(super) fn tcp_and_ping(lab: &Lab, quick: bool, acc: &mut TcpAcc) -> Result<()> {
    let secs = if quick { 1 } else { 4 };
    set_gso(lab, false)?;
    acc.mss_1500.push(iperf(lab, 1, secs)?);
    set_gso(lab, true)?;
    acc.gso.push(iperf(lab, 1, secs)?);
    acc.gso_x4.push(iperf(lab, 4, secs)?);
    let dst = "203.0.113.2".parse()?;
    acc.ping_idle.extend((0..20).filter_map(|_| lab.ping(&lab.lan, dst).ok()).map(|d| d.as_secs_f64() * 1e3));
    let load = lab.spawn_pinned(
        &lab.lan,
        &["iperf3", "-c", "203.0.113.2", "-t", &(secs + 2).to_string()],
        lab.isolation.generator_cpu,
    )?;
    std::thread::sleep(Duration::from_millis(700));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(u64::from(secs)) {
        if let Ok(d) = lab.ping(&lab.lan, dst) {
            acc.ping_loaded.push(d.as_secs_f64() * 1e3);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_child(load);
    router_tso(lab, false)
}

fn wait_child(mut c: Child) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if matches!(c.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}
