//! `nft-offload demo`: the same iperf3 TCP and UDP runs through the lab's
//! router on the kernel path and on each offload mode, with router CPU cost
//! per forwarded packet and the number of packets the firewall's forward
//! chain still saw.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use super::{cmd, cpu, Lab, LabOpts, LAN_IF, RTR_LAN_IF, RTR_WAN_IF, SERVER_V4, WAN_IF};

/// Set by the SIGINT/SIGTERM handler the demo installs; every waiting loop
/// checks it so Ctrl-C unwinds through the normal error path (and Lab's Drop
/// cleans up) instead of killing the process with namespaces left behind.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Has SIGINT/SIGTERM arrived while the demo's handler was installed?
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handler; restores the previous dispositions when dropped.
struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    fn install() -> Result<SignalGuard> {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let mut g = SignalGuard { old: Vec::new() };
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: sigaction structs are plain data; the handler only
            // performs an atomic store.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &sa, &mut old) != 0 {
                    bail!("sigaction: {}", std::io::Error::last_os_error());
                }
                g.old.push((sig, old));
            }
        }
        Ok(g)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, old) in &self.old {
            // SAFETY: restoring what sigaction gave us.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
    }
}

/// Pins the calling thread (and so every helper command it starts) to the
/// generator CPU for the demo; restores the old mask when dropped.
struct ThreadPin(Option<libc::cpu_set_t>);

impl ThreadPin {
    fn to(cpu: Option<usize>) -> ThreadPin {
        let Some(cpu) = cpu else { return ThreadPin(None) };
        match cpu::get_affinity() {
            Ok(old) if cpu::set_affinity(0, cpu).is_ok() => ThreadPin(Some(old)),
            _ => ThreadPin(None),
        }
    }
}

impl Drop for ThreadPin {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            cpu::restore_affinity(old);
        }
    }
}

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOpts {
    /// The nft-offload binary (runs the `run`, `status` and `flows` commands).
    pub exe: PathBuf,
    /// Lab namespace prefix.
    pub prefix: String,
    /// Seconds per iperf3 run (each path has a TCP and a UDP run).
    pub duration_s: u32,
    /// Offload modes to compare with the kernel path: "tc", "xdp". Empty
    /// measures the kernel path only.
    pub modes: Vec<String>,
}

impl Default for DemoOpts {
    fn default() -> Self {
        DemoOpts {
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("nft-offload")),
            prefix: super::DEFAULT_PREFIX.to_string(),
            duration_s: 10,
            modes: vec!["tc".into(), "xdp".into()],
        }
    }
}

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
        let rows: Vec<(String, Vec<String>)> = vec![
            ("TCP throughput (Mbit/s)".into(), col(&|p| mbit(p.tcp.bits_per_second))),
            ("TCP router CPU (ns/pkt)".into(), col(&|p| opt_f(p.tcp.cpu_ns_per_packet, 0))),
            ("TCP router CPU (ns per 1500 B)".into(), col(&|p| opt_f(p.tcp.cpu_ns_per_1500b, 0))),
            ("UDP throughput (Mbit/s)".into(), col(&|p| mbit(p.udp.bits_per_second))),
            ("UDP loss (%)".into(), col(&|p| opt_f(p.udp.lost_percent, 2))),
            ("UDP router CPU (ns/pkt)".into(), col(&|p| opt_f(p.udp.cpu_ns_per_packet, 0))),
            ("packets seen by fw forward chain (TCP)".into(), col(&|p| p.tcp.fwd_chain_packets.to_string())),
            ("packets seen by fw forward chain (UDP)".into(), col(&|p| p.udp.fwd_chain_packets.to_string())),
            ("TCP packets forwarded".into(), col(&|p| p.tcp.forwarded_packets.to_string())),
            ("UDP packets forwarded".into(), col(&|p| p.udp.forwarded_packets.to_string())),
            ("TCP router CPU non-idle (ms)".into(), col(&|p| format!("{:.0}", p.tcp.cpu_ns as f64 / 1e6))),
            ("UDP router CPU non-idle (ms)".into(), col(&|p| format!("{:.0}", p.udp.cpu_ns as f64 / 1e6))),
            ("TCP router threads only (ns/pkt)".into(), col(&|p| opt_f(p.tcp.router_threads_ns_per_packet, 0))),
            ("UDP router threads only (ns/pkt)".into(), col(&|p| opt_f(p.udp.router_threads_ns_per_packet, 0))),
            ("TCP retransmits".into(), col(&|p| p.tcp.retransmits.map(|r| r.to_string()).unwrap_or("-".into()))),
        ];
        let mut out = format!(
            "nft-offload demo: {} -> router -> {} ({} s per run; UDP offered at 300 Mbit/s, 1400 B)\n\n",
            super::CLIENT_V4,
            SERVER_V4,
            self.duration_s
        );
        out.push_str(&table(&header, &rows));
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

/// Values pulled out of iperf3's `-J` output.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct IperfResult {
    pub bits_per_second: f64,
    pub sender_bits_per_second: f64,
    pub lost_percent: Option<f64>,
    pub retransmits: Option<u64>,
}

pub(crate) fn parse_iperf(json: &str, udp: bool) -> Result<IperfResult> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing iperf3 JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let end = v.get("end").ok_or_else(|| anyhow!("iperf3 JSON without `end`"))?;
    let f = |o: Option<&serde_json::Value>, k: &str| o.and_then(|o| o.get(k)).and_then(|x| x.as_f64());
    if udp {
        // `end.sum` carries the sender's rate and the receiver's loss;
        // `sum_received` (iperf3 >= 3.?) the receiver's rate, which is what
        // made it through the router. Fall back to `sum` without it.
        let sum = end.get("sum");
        let sender = f(sum, "bits_per_second").ok_or_else(|| anyhow!("no end.sum.bits_per_second"))?;
        let recv = f(end.get("sum_received"), "bits_per_second").unwrap_or(sender);
        Ok(IperfResult {
            bits_per_second: recv,
            sender_bits_per_second: sender,
            lost_percent: Some(f(sum, "lost_percent").unwrap_or(0.0)),
            retransmits: None,
        })
    } else {
        let recv = f(end.get("sum_received"), "bits_per_second")
            .ok_or_else(|| anyhow!("no end.sum_received.bits_per_second"))?;
        let sent = end.get("sum_sent");
        Ok(IperfResult {
            bits_per_second: recv,
            sender_bits_per_second: f(sent, "bits_per_second").unwrap_or(recv),
            lost_percent: None,
            retransmits: sent.and_then(|s| s.get("retransmits")).and_then(|x| x.as_u64()),
        })
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
        let _ = f.read_to_string(&mut s);
    }
    let all: Vec<&str> = s.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.trim().is_empty() {
        format!("({} is empty)", path.display())
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}

fn sleep_checked(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    Ok(())
}

struct Ctx<'a> {
    lab: &'a Lab,
    exe: PathBuf,
    logdir: PathBuf,
    duration_s: u32,
}

impl Ctx<'_> {
    fn exe_str(&self) -> Result<&str> {
        self.exe.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", self.exe.display()))
    }

    fn forwarded(&self) -> Result<(u64, u64)> {
        let lab = self.lab;
        let w = lab.iface_stats(&lab.wan, WAN_IF)?;
        let l = lab.iface_stats(&lab.lan, LAN_IF)?;
        Ok((w.0 + l.0, w.1 + l.1))
    }

    /// `iperf3 -s -1` in the WAN namespace on the generator CPU, listening.
    fn start_server(&self) -> Result<Child> {
        let lab = self.lab;
        let log = self.logdir.join("iperf3-server.log");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut c = lab.command(&lab.wan, &["iperf3", "-s", "-1"]);
        c.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        if let Some(g) = lab.isolation.generator_cpu {
            cpu::pin_command(&mut c, g);
        }
        let mut server = lab.spawn_cmd(c)?;
        if let Err(e) = lab.wait_tcp_listen(&lab.wan, 5201, Duration::from_secs(10)) {
            let _ = server.kill();
            let _ = server.wait();
            return Err(e.context(log_tail(&log, 5)));
        }
        Ok(server)
    }

    /// Start the offload daemon in the router and wait for `status` to work.
    fn start_daemon(&self, mode: &str) -> Result<(Child, PathBuf)> {
        let lab = self.lab;
        let exe = self.exe_str()?;
        let log = self.logdir.join(format!("daemon-{mode}.log"));
        let f = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut c = lab.command(&lab.rtr, &[exe, "run", "--iface", RTR_LAN_IF, "--iface", RTR_WAN_IF, "--mode", mode]);
        c.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        // The daemon is router control plane: bill its CPU to the router.
        if let Some(r) = lab.isolation.router_cpu {
            cpu::pin_command(&mut c, r);
        }
        let mut child = lab.spawn_cmd(c)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if interrupted() {
                bail!("interrupted");
            }
            if let Some(st) = child.try_wait()? {
                bail!("offload daemon (--mode {mode}) exited during startup ({st}); {}", log_tail(&log, 20));
            }
            if cmd::run(&mut lab.command(&lab.rtr, &[exe, "status", "-o", "json"])).is_ok() {
                return Ok((child, log));
            }
            if Instant::now() > deadline {
                bail!(
                    "offload daemon (--mode {mode}) not ready after 15 s (`{exe} status -o json` \
                     kept failing); {}",
                    log_tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM the daemon and require a clean exit within 5 s.
    fn stop_daemon(&self, mut child: Child, log: &Path, mode: &str) -> Result<()> {
        // SAFETY: our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        let st: ExitStatus = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                // Lab's Drop will SIGKILL it.
                bail!("offload daemon (--mode {mode}) did not exit within 5 s of SIGTERM; {}", log_tail(log, 20));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !st.success() {
            bail!("offload daemon (--mode {mode}) exited with {st} after SIGTERM; {}", log_tail(log, 20));
        }
        Ok(())
    }

    /// One iperf3 client run from the LAN host, with router CPU, forwarded
    /// packets and forward-chain counter sampled around it. With
    /// `capture_flows`, `flows` output is taken ~2 s in.
    fn measure(
        &self,
        label: &str,
        udp: bool,
        capture_flows: bool,
        daemon_pid: Option<u32>,
    ) -> Result<(RunReport, Option<String>)> {
        let lab = self.lab;
        let proto = if udp { "udp" } else { "tcp" };
        let json_path = self.logdir.join(format!("iperf3-{label}-{proto}.json"));
        let dur = self.duration_s.to_string();
        let server = SERVER_V4.to_string();
        let mut args = vec!["iperf3", "-c", &server, "-t", &dur, "-P", "1", "-J"];
        if udp {
            args.extend(["-u", "-b", "300M", "-l", "1400"]);
        }
        let mut c = lab.command(&lab.lan, &args);
        // Output goes to a file: a pipe could fill up with long runs' JSON
        // while we are only polling for exit.
        let out = File::create(&json_path).with_context(|| format!("creating {}", json_path.display()))?;
        c.stdin(Stdio::null()).stdout(out).stderr(Stdio::null());
        if let Some(g) = lab.isolation.generator_cpu {
            cpu::pin_command(&mut c, g);
        }
        let cpu_sel = lab.isolation.router_cpu;

        // A fresh one-off server per run: a server that died or got stuck in
        // one run cannot spoil the next.
        let mut server = self.start_server()?;
        let mut threads = lab.router_napi_threads();
        threads.extend(daemon_pid.map(|p| p as libc::pid_t));
        let thread_ns = || -> u64 { threads.iter().map(|&p| cpu::task_cpu_ns(p)).sum() };

        let (pk0, by0) = self.forwarded()?;
        let fwd0 = lab.counter_packets("fwd_all")?;
        let th0 = thread_ns();
        let cpu0 = cpu::sample(cpu_sel)?;
        let mut child = lab.spawn_cmd(c)?;
        let start = Instant::now();
        let limit = Duration::from_secs(u64::from(self.duration_s) + 30);
        let mut flows = None;
        // ~2 s in (earlier for very short runs) so the flow is established
        // and offloaded but still running.
        let capture_at = Duration::from_secs(2).min(Duration::from_secs(u64::from(self.duration_s)) / 2);
        let status = loop {
            if interrupted() {
                let _ = child.kill();
                let _ = child.wait();
                bail!("interrupted");
            }
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if capture_flows && flows.is_none() && start.elapsed() >= capture_at {
                let exe = self.exe_str()?;
                flows = Some(match cmd::run(&mut lab.command(&lab.rtr, &[exe, "flows"])) {
                    Ok(s) => s,
                    Err(e) => format!("(`{exe} flows` failed: {e:#})"),
                });
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                bail!("iperf3 {proto} client did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if interrupted() {
            // Ctrl-C in a terminal also hits the client; report the cause.
            bail!("interrupted");
        }
        let cpu1 = cpu::sample(cpu_sel)?;
        let th1 = thread_ns();
        let fwd1 = lab.counter_packets("fwd_all")?;
        let (pk1, by1) = self.forwarded()?;

        // The one-off server exits after its test; don't leave it behind if
        // the test went wrong.
        let deadline = Instant::now() + Duration::from_secs(3);
        while server.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = server.kill();
                let _ = server.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }

        let json = std::fs::read_to_string(&json_path).with_context(|| format!("reading {}", json_path.display()))?;
        let r = parse_iperf(&json, udp)
            .with_context(|| format!("iperf3 {proto} client ({status}), output in {}", json_path.display()))?;
        if !status.success() {
            bail!("iperf3 {proto} client exited with {status}; output in {}", json_path.display());
        }
        let (cpu_ns, cpu_ns_ticks) = cpu::busy_ns(&cpu0, &cpu1);
        let packets = pk1.saturating_sub(pk0);
        let bytes = by1.saturating_sub(by0);
        let per_pkt = |ns: u64| (packets > 0).then(|| ns as f64 / packets as f64);
        let threads_ns = (lab.isolation.enabled && !threads.is_empty()).then(|| th1.saturating_sub(th0));
        Ok((
            RunReport {
                proto: proto.into(),
                bits_per_second: r.bits_per_second,
                sender_bits_per_second: r.sender_bits_per_second,
                lost_percent: r.lost_percent,
                retransmits: r.retransmits,
                cpu_ns,
                cpu_ns_ticks,
                forwarded_packets: packets,
                forwarded_bytes: bytes,
                cpu_ns_per_packet: per_pkt(cpu_ns),
                cpu_ns_per_1500b: (bytes > 0).then(|| cpu_ns as f64 * 1500.0 / bytes as f64),
                router_threads_cpu_ns: threads_ns,
                router_threads_ns_per_packet: threads_ns.and_then(per_pkt),
                fwd_chain_packets: fwd1.saturating_sub(fwd0),
            },
            flows,
        ))
    }
}

fn canonical_modes(modes: &[String]) -> Result<Vec<&'static str>> {
    let mut out = Vec::new();
    for m in modes {
        match m.trim() {
            // `--modes ""` (clap gives [""]) means kernel path only.
            "tc" | "xdp" | "" => {}
            other => bail!("unknown offload mode {other:?} (expected \"tc\" or \"xdp\")"),
        }
    }
    // Fixed column order: kernel, tc, xdp.
    for m in ["tc", "xdp"] {
        if modes.iter().any(|x| x.trim() == m) {
            out.push(m);
        }
    }
    Ok(out)
}

/// Run the demo: lab up, iperf3 TCP + UDP on the kernel path and on each
/// requested offload mode, lab down. Ctrl-C (SIGINT/SIGTERM) stops it with
/// an "interrupted" error after cleaning up.
pub fn demo(opts: DemoOpts) -> Result<DemoReport> {
    super::require_root()?;
    let modes = canonical_modes(&opts.modes)?;
    if opts.duration_s == 0 {
        bail!("duration must be at least 1 s");
    }
    let exe = if modes.is_empty() {
        opts.exe.clone()
    } else {
        std::fs::canonicalize(&opts.exe).with_context(|| format!("offload binary {}", opts.exe.display()))?
    };
    let _signals = SignalGuard::install()?;

    let logdir = std::env::temp_dir().join(format!("nft-offload-demo-{}-{}", opts.prefix, std::process::id()));
    std::fs::create_dir_all(&logdir).with_context(|| format!("creating {}", logdir.display()))?;

    let res = run_demo(&opts, &modes, exe, &logdir);
    match &res {
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&logdir);
        }
        Err(_) => {
            tracing::info!("demo logs kept in {}", logdir.display());
        }
    }
    res.with_context(|| format!("demo failed (logs in {})", logdir.display()))
}

fn run_demo(opts: &DemoOpts, modes: &[&str], exe: PathBuf, logdir: &Path) -> Result<DemoReport> {
    let lab = Lab::up(&LabOpts { prefix: opts.prefix.clone(), xdp_safe: true, isolate_router_cpu: true })?;
    if interrupted() {
        bail!("interrupted");
    }
    // Keep the demo's own helper commands (stat reads, `status` polls) off
    // the router CPU.
    let _pin = ThreadPin::to(lab.isolation.generator_cpu);
    lab.warm_neighbours()?;

    let ctx = Ctx { lab: &lab, exe, logdir: logdir.to_path_buf(), duration_s: opts.duration_s };
    let cpu_scope = if lab.isolation.enabled {
        format!(
            "non-idle time of CPU {} (router NAPI threads{} pinned there; iperf3, host NAPI \
             and demo helpers on CPU {}; anything else the scheduler puts on CPU {0} counts \
             too)",
            lab.isolation.router_cpu.unwrap_or(1),
            if modes.is_empty() { "" } else { " and the offload daemon" },
            lab.isolation.generator_cpu.unwrap_or(0)
        )
    } else {
        format!("whole-machine non-idle time, iperf3 itself included ({})", lab.isolation.note)
    };

    let mut paths = Vec::new();
    let all: Vec<Option<&str>> = std::iter::once(None).chain(modes.iter().map(|m| Some(*m))).collect();
    for mode in all {
        let label = match mode {
            None => "kernel".to_string(),
            Some(m) => format!("offload-{m}"),
        };
        tracing::info!("demo: measuring {label}");
        let daemon = match mode {
            Some(m) => Some(ctx.start_daemon(m)?),
            None => None,
        };
        // Attaching programs may recreate a veth's NAPI instance: re-pin.
        lab.pin_napi_threads()?;
        // Let the path settle (e.g. programs attached, maps synced).
        sleep_checked(Duration::from_millis(500))?;
        let dpid = daemon.as_ref().map(|(c, _)| c.id());
        let (tcp, flows) = ctx.measure(&label, false, mode.is_some(), dpid)?;
        sleep_checked(Duration::from_millis(500))?;
        let (udp, _) = ctx.measure(&label, true, false, dpid)?;
        if let (Some((child, log)), Some(m)) = (daemon, mode) {
            ctx.stop_daemon(child, &log, m)?;
        }
        paths.push(PathReport { path: label, tcp, udp, flows });
    }

    let report = DemoReport {
        prefix: opts.prefix.clone(),
        duration_s: opts.duration_s,
        cpu_isolated: lab.isolation.enabled,
        router_cpu: lab.isolation.router_cpu,
        cpu_scope,
        paths,
    };
    lab.down();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP_JSON: &str = r#"{"start":{},"intervals":[],"end":{"streams":[],
        "sum_sent":{"bits_per_second":2.0e9,"retransmits":3,"sender":true},
        "sum_received":{"bits_per_second":1.9e9,"sender":true}}}"#;
    const UDP_JSON: &str = r#"{"end":{"sum":{"bits_per_second":3.0e8,"lost_percent":1.5,"sender":true},
        "sum_received":{"bits_per_second":2.9e8,"sender":false}}}"#;

    #[test]
    fn parses_iperf_tcp_and_udp() {
        let t = parse_iperf(TCP_JSON, false).unwrap();
        assert_eq!(t.bits_per_second, 1.9e9);
        assert_eq!(t.sender_bits_per_second, 2.0e9);
        assert_eq!(t.retransmits, Some(3));
        let u = parse_iperf(UDP_JSON, true).unwrap();
        assert_eq!(u.bits_per_second, 2.9e8);
        assert_eq!(u.lost_percent, Some(1.5));
        let old = r#"{"end":{"sum":{"bits_per_second":3.0e8,"lost_percent":0}}}"#;
        assert_eq!(parse_iperf(old, true).unwrap().bits_per_second, 3.0e8);
        let err = parse_iperf(r#"{"error":"unable to connect"}"#, false).unwrap_err();
        assert!(err.to_string().contains("unable to connect"));
    }

    #[test]
    fn modes_are_validated_and_ordered() {
        let m = canonical_modes(&["xdp".into(), "tc".into()]).unwrap();
        assert_eq!(m, vec!["tc", "xdp"]);
        assert!(canonical_modes(&["dpdk".into()]).is_err());
        assert!(canonical_modes(&[]).unwrap().is_empty());
        assert!(canonical_modes(&["".into()]).unwrap().is_empty());
    }

    #[test]
    fn render_aligns_columns() {
        let run = |bps: f64| RunReport {
            proto: "tcp".into(),
            bits_per_second: bps,
            cpu_ns_per_packet: Some(1234.4),
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
        let tcp = lines.iter().find(|l| l.starts_with("TCP throughput")).unwrap();
        // Right-aligned: values end at the same column as the header.
        assert_eq!(tcp.len(), lines[hdr].len());
        assert!(tcp.ends_with("12500.0"));
        assert!(s.contains("  flow b"));
        serde_json::to_string(&r).unwrap();
    }
}
