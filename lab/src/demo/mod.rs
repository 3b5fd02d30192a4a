//! `nft-offload-lab demo`: the same iperf3 TCP and UDP runs through the
//! lab's router on the kernel path and on each offload mode, with router CPU
//! cost per forwarded packet and the number of packets the firewall's
//! forward chain still saw.

mod report;

pub use report::{DemoReport, PathReport, RunReport};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::daemon::{log_tail, Daemon, DaemonOpts};
use crate::interrupt::{self, interrupted, SignalGuard};
use crate::iperf::parse_iperf;
use crate::lab::{cpu, Lab, LabOpts, LAN_IF, RTR_LAN_IF, RTR_WAN_IF, SERVER_V4, WAN_IF};

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOpts {
    /// The router binary (runs the `run`, `status` and `flows` commands);
    /// `None`: [`crate::router_bin`]. Not needed without offload modes.
    pub exe: Option<PathBuf>,
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
            exe: None,
            prefix: crate::lab::DEFAULT_PREFIX.to_string(),
            duration_s: 10,
            modes: vec!["tc".into(), "xdp".into()],
        }
    }
}

struct Ctx<'a> {
    lab: &'a Lab,
    exe: PathBuf,
    logdir: PathBuf,
    duration_s: u32,
}

impl Ctx<'_> {
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

    /// The offload daemon on the router's ports, pinned to the router CPU
    /// (it is router control plane: its CPU is billed to the router).
    fn start_daemon(&self, mode: &str) -> Result<Daemon> {
        let lab = self.lab;
        let args = ["--iface", RTR_LAN_IF, "--iface", RTR_WAN_IF, "--mode", mode].map(String::from).to_vec();
        let opts = DaemonOpts {
            exe: Some(self.exe.clone()),
            args,
            cpu: lab.isolation.router_cpu,
            log_dir: Some(self.logdir.clone()),
            ..Default::default()
        };
        Daemon::launch(lab, opts)
    }

    /// One iperf3 client run from the LAN host, with router CPU, forwarded
    /// packets and forward-chain counter sampled around it. With
    /// `capture_flows`, `flows` output is taken ~2 s in.
    fn measure(
        &self,
        label: &str,
        udp: bool,
        capture_flows: bool,
        daemon: Option<&Daemon>,
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
        threads.extend(daemon.map(|d| d.pid() as libc::pid_t));
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
            if let Some(d) = daemon.filter(|_| capture_flows && flows.is_none() && start.elapsed() >= capture_at) {
                flows = Some(match d.cli(&["flows"]) {
                    Ok(s) => s,
                    Err(e) => format!("(`nft-offload flows` failed: {e:#})"),
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
    crate::lab::require_root()?;
    let modes = canonical_modes(&opts.modes)?;
    if opts.duration_s == 0 {
        bail!("duration must be at least 1 s");
    }
    let exe = match (&opts.exe, modes.is_empty()) {
        (_, true) => PathBuf::new(),
        (Some(e), false) => std::fs::canonicalize(e).with_context(|| format!("offload binary {}", e.display()))?,
        (None, false) => crate::router_bin()?,
    };
    let _signals = SignalGuard::install()?;

    // Private (mkdtemp), removed after a good run, kept after a failure.
    let logdir = tempfile::Builder::new()
        .prefix(&format!("nft-offload-demo-{}-", opts.prefix))
        .tempdir()
        .context("creating the demo's log directory")?;
    let res = run_demo(&opts, &modes, exe, logdir.path());
    if res.is_err() {
        let kept = logdir.keep();
        tracing::info!("demo logs kept in {}", kept.display());
        return res.with_context(|| format!("demo failed (logs in {})", kept.display()));
    }
    res
}

fn run_demo(opts: &DemoOpts, modes: &[&str], exe: PathBuf, logdir: &Path) -> Result<DemoReport> {
    let lab = Lab::up(&LabOpts { prefix: opts.prefix.clone(), xdp_safe: true, isolate_router_cpu: true })?;
    interrupt::check()?;
    // Keep the demo's own helper commands (stat reads, `status` polls) off
    // the router CPU.
    let _pin = cpu::ThreadPin::to(lab.isolation.generator_cpu);
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
        interrupt::sleep(Duration::from_millis(500))?;
        let (tcp, flows) = ctx.measure(&label, false, true, daemon.as_ref())?;
        interrupt::sleep(Duration::from_millis(500))?;
        let (udp, _) = ctx.measure(&label, true, false, daemon.as_ref())?;
        if let Some(d) = daemon {
            d.stop()?;
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
    use crate::lab::tests::{netns_list, prefix};

    #[test]
    fn modes_are_validated_and_ordered() {
        let m = canonical_modes(&["xdp".into(), "tc".into()]).unwrap();
        assert_eq!(m, vec!["tc", "xdp"]);
        assert!(canonical_modes(&["dpdk".into()]).is_err());
        assert!(canonical_modes(&[]).unwrap().is_empty());
        assert!(canonical_modes(&["".into()]).unwrap().is_empty());
    }

    /// Needs root. Kernel path only (the offload binary is not involved).
    #[test]
    fn demo_kernel_path() {
        let p = prefix();
        let report = demo(DemoOpts {
            // Not needed with no offload modes.
            exe: None,
            prefix: p.clone(),
            duration_s: 2,
            modes: vec![],
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!("{}", report.render());
        assert_eq!(report.paths.len(), 1);
        let k = &report.paths[0];
        assert_eq!(k.path, "kernel");
        assert!(k.tcp.bits_per_second > 10e6, "{k:?}");
        assert!(k.udp.bits_per_second > 10e6, "{k:?}");
        // On the kernel path every forwarded packet crosses the forward chain.
        assert!(k.tcp.fwd_chain_packets > 100, "{k:?}");
        assert!(k.tcp.forwarded_packets > 0 && k.tcp.cpu_ns_per_packet.is_some());
        // ... and the two ways of counting agree (UDP is not aggregated).
        assert!(k.udp.fwd_chain_packets * 10 >= k.udp.forwarded_packets * 9, "{k:?}");
        assert!(!netns_list().contains(&format!("{p}-")));
    }
}
