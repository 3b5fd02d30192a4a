//! How fast the control plane offloads new connections, and what the
//! engine's memory grows by.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::Report;
use crate::daemon::Daemon;
use crate::lab::Lab;

/// New flows per second the control plane offloads, and how long one
/// takes from its conntrack event to both map entries installed. The new
/// flows come from a UDP sender opening one socket per flow.
pub(super) fn offload_rate(lab: &Lab, engine: &Daemon, n: u32, r: &mut Report) -> Result<()> {
    let before = engine.status()?;
    let pid = before["pid"].as_u64().unwrap_or(0);
    let flows0 = before["flows_offloaded"].as_f64().unwrap_or(0.0);
    let rss0 = rss_kb(pid);
    let o0 = before["offloads_total"].as_u64().unwrap_or(0);
    let py = format!(
        "import socket\nfor p in range(20000, 20000 + {n}):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.bind(('192.168.1.2', p))\n    s.sendto(b'x', ('203.0.113.2', 10))\n    s.close()\n"
    );
    let t0 = Instant::now();
    lab.exec(&lab.lan, &["python3", "-c", &py])?;
    let sent = t0.elapsed().as_secs_f64();
    // Until all are offloaded or nothing moved for a second; the rate
    // counts up to the last offload seen.
    let (mut done, mut last) = (0u64, t0.elapsed());
    while t0.elapsed() < Duration::from_secs(20) && t0.elapsed() < last + Duration::from_secs(1) {
        let st = engine.status()?;
        let d = st["offloads_total"].as_u64().unwrap_or(0) - o0;
        if d > done {
            done = d;
            last = t0.elapsed();
        }
        if done >= u64::from(n) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = last.as_secs_f64().max(1e-3);
    let st = engine.status()?;
    r.offload.insert("new_flows_offered".into(), f64::from(n));
    r.offload.insert("sender_new_flows_per_s".into(), f64::from(n) / sent);
    r.offload.insert("flows_offloaded".into(), done as f64);
    r.offload.insert("offloads_per_s".into(), done as f64 / secs);
    // The daemon's resident memory, before and after these flows.
    let flows1 = st["flows_offloaded"].as_f64().unwrap_or(0.0);
    if let (Some(a), Some(b)) = (rss0, rss_kb(pid)) {
        r.memory.insert("daemon_rss_kb_before".into(), a);
        r.memory.insert("daemon_rss_kb_after".into(), b);
        r.memory.insert("daemon_flows_after".into(), flows1);
        if flows1 > flows0 {
            let per = (b - a).max(0.0) * 1024.0 / (flows1 - flows0);
            r.memory.insert("daemon_rss_bytes_per_flow".into(), per);
        }
    }
    if done >= u64::from(n) && secs < sent + 0.05 {
        r.notes.push("offloads_per_s is bounded by the sender: the engine kept up with every new flow".into());
    }
    if let Some(p) = st["offload_latency_us"].as_object() {
        for (k, v) in p {
            r.offload.insert(format!("event_to_installed_us_{k}"), v.as_f64().unwrap_or(f64::NAN));
        }
    }
    Ok(())
}

/// VmRSS of a process, in KiB.
fn rss_kb(pid: u64) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}
