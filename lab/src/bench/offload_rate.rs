//! How fast the control plane offloads new connections, and what the
//! engine's memory grows by.

use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::paths::{BURST_PPS, GROUP};
use super::Report;
use crate::daemon::Daemon;
use crate::lab::{cpu, netns, Lab};

/// The burst's flows: from the client's port [`SPORT`] to the server's
/// ports from [`DPORT_LO`] up, two datagrams each (the server drops them):
/// the first is confirmed, the second is the later packet the kernel's
/// `flow add` (and so the engine) offloads a UDP connection on.
const SPORT: u16 = 5999;
const DPORT_LO: u16 = 20000;

/// New flows per second the control plane offloads, and how long one
/// takes from its event (the second datagram's wake-up) to both map
/// entries installed. The new flows come from one UDP socket on the
/// generator CPU sending a datagram to each of `n` server ports, then,
/// once the engine watches them all, a second to each (the clock runs
/// from there), with sendmmsg, in groups of [`GROUP`] at
/// [`BURST_PPS`] (the 256-slot veth ring must not overflow): about 17 us of
/// sender CPU per group, so the figure is the engine's, not the sender's.
pub(super) fn offload_rate(lab: &Lab, engine: &Daemon, n: u32, r: &mut Report) -> Result<()> {
    if n == 0 || u32::from(DPORT_LO) + n > 65536 {
        bail!("offload_rate: {n} flows do not fit the server's ports from {DPORT_LO}");
    }
    let hi = u32::from(DPORT_LO) + n - 1;
    lab.exec(
        &lab.wan,
        &["nft", "add", "rule", "inet", "sink", "pre", "udp", "dport", &format!("{DPORT_LO}-{hi}"), "drop"],
    )?;
    let before = engine.status()?;
    let pid = before["pid"].as_u64().unwrap_or(0);
    let flows0 = before["flows_offloaded"].as_f64().unwrap_or(0.0);
    let rss0 = rss_kb(pid);
    let o0 = before["offloads_total"].as_u64().unwrap_or(0);
    // A queue on the client's port: veth stops it while the router's ring
    // is full (drivers/net/veth.c veth_xmit, since 6.17) instead of dropping,
    // so every flow of the burst reaches the router, at the rate its kernel
    // takes new connections.
    let limit = (n + 1024).to_string();
    lab.exec(&lab.lan, &["tc", "qdisc", "replace", "dev", "lan0", "root", "pfifo", "limit", &limit])?;
    // The first datagrams make the connections (conntrack confirms them,
    // the engine watches each for its next packet); the clock starts with
    // the second ones, the packets that get the connections offloaded, as
    // `flow add` offloads on a packet after the first. Sent right after the
    // first, most of them would pass before the engine had heard of their
    // connection and wake nothing (a UDP connection is then offloaded on a
    // later packet): the figure would time the race, not the offloads.
    let armed = send_burst(lab, n).and_then(|_| wait_watched(engine, &before, n));
    let t0 = Instant::now();
    let sent = armed.and_then(|()| send_burst(lab, n));
    lab.exec(&lab.lan, &["tc", "qdisc", "del", "dev", "lan0", "root"])?;
    let sent = sent?.as_secs_f64();
    // Until all are offloaded or nothing moved for a second; the rate
    // counts up to the last offload seen.
    let (mut done, mut last) = (0u64, t0.elapsed());
    while t0.elapsed() < Duration::from_secs(30) && t0.elapsed() < last + Duration::from_secs(1) {
        let st = engine.status()?;
        let d = st["offloads_total"].as_u64().unwrap_or(0) - o0;
        if d > done {
            done = d;
            last = t0.elapsed();
        }
        if done >= u64::from(n) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
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

/// Until the engine watches `n` more connections than in `before` (99%),
/// at most 20 s.
fn wait_watched(engine: &Daemon, before: &serde_json::Value, n: u32) -> Result<()> {
    let d0 = before["flows_dormant"].as_u64().unwrap_or(0);
    let want = u64::from(n) * 99 / 100;
    let t0 = Instant::now();
    loop {
        let d = engine.status()?["flows_dormant"].as_u64().unwrap_or(0).saturating_sub(d0);
        if d >= want {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("the engine watches {d} of the burst's {n} new connections after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one datagram from [`SPORT`] to each of `n` server ports from
/// [`DPORT_LO`], in the LAN namespace on the generator CPU; returns how long
/// it took.
fn send_burst(lab: &Lab, n: u32) -> Result<Duration> {
    let ns = netns::NetnsHandle::open(&lab.lan)?;
    let gen_cpu = lab.isolation.generator_cpu;
    let th = std::thread::spawn(move || -> Result<Duration> {
        if let Some(c) = gen_cpu {
            cpu::set_affinity(0, c)?;
        }
        ns.join()?;
        let sock =
            std::net::UdpSocket::bind((Ipv4Addr::new(192, 168, 1, 2), SPORT)).context("binding the burst sender")?;
        let group = GROUP as usize;
        let every = Duration::from_secs_f64(GROUP as f64 / BURST_PPS);
        let payload = [0x5au8; 18];
        let t0 = Instant::now();
        let mut next = t0;
        let mut port = u32::from(DPORT_LO);
        let end = port + n;
        while port < end {
            let k = group.min((end - port) as usize);
            let ports: Vec<u16> = (port..port + k as u32).map(|p| p as u16).collect();
            send_group(&sock, Ipv4Addr::new(203, 0, 113, 2), &ports, &payload)?;
            port += k as u32;
            next += every;
            if let Some(w) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
        }
        Ok(t0.elapsed())
    });
    th.join().map_err(|_| anyhow!("burst sender panicked"))?
}

/// One sendmmsg: `payload` to `dst` on each of `ports`.
fn send_group(sock: &std::net::UdpSocket, dst: Ipv4Addr, ports: &[u16], payload: &[u8]) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain C structs, all-zero is a valid value.
    let mut addrs: Vec<libc::sockaddr_in> = ports
        .iter()
        .map(|&p| {
            let mut a: libc::sockaddr_in = unsafe { zeroed() };
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_port = p.to_be();
            a.sin_addr.s_addr = u32::from(dst).to_be();
            a
        })
        .collect();
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: payload.len() };
    let mut msgs: Vec<libc::mmsghdr> = addrs
        .iter_mut()
        .map(|a| {
            // SAFETY: as above.
            let mut m: libc::mmsghdr = unsafe { zeroed() };
            m.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut at = 0;
    while at < msgs.len() {
        // SAFETY: `msgs[at..]` point at live addresses and one iovec over
        // `payload`, all outliving the call.
        let sent =
            unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs[at..].as_mut_ptr(), (msgs.len() - at) as libc::c_uint, 0) };
        if sent < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e).context("sendmmsg of the burst");
        }
        at += sent as usize;
    }
    Ok(())
}

/// VmRSS of a process, in KiB.
fn rss_kb(pid: u64) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}
