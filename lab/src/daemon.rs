//! The one way the kit runs the offload engine: `nft-offload run ...` on the
//! lab router, driven and observed only through the router binary's command
//! line (`status -o json`, `flows -o json`, ...), never through the engine's
//! library, so the kit tests what a user runs.
//!
//! Used by the end-to-end tests, the demo and the benchmark.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;

use crate::lab::{cmd, cpu, Lab, RTR_LAN_IF, RTR_WAN_IF};

/// Environment variable naming the router binary (overrides the search).
pub const BIN_ENV: &str = "NFT_OFFLOAD_BIN";

/// How long the engine may take after SIGTERM (it detaches its programs).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The router binary: `$NFT_OFFLOAD_BIN` if set, else the `nft-offload`
/// built next to the running program in the same target profile directory
/// (`target/<profile>/nft-offload-lab`, or a test binary in
/// `target/<profile>/deps/`). Cargo does not rebuild that binary for
/// `cargo test -p nft-offload-lab` alone: build the workspace first
/// (`cargo build --workspace`, as run.sh does).
pub fn router_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(BIN_ENV) {
        let p = std::path::absolute(PathBuf::from(p)).context("resolving $NFT_OFFLOAD_BIN")?;
        if !p.is_file() {
            bail!("{BIN_ENV}={} is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the running program")?;
    let dir = exe.parent().ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") { dir.parent().unwrap_or(dir) } else { dir };
    let bin = profile_dir.join("nft-offload");
    if bin.is_file() {
        return Ok(bin);
    }
    bail!(
        "no router binary at {}: build it with `cargo build --workspace` (with --release for a release \
         lab), or name it with {BIN_ENV}=PATH",
        bin.display()
    )
}

/// `status`'s `not_offloaded` list as reason text -> connections: what the
/// tests look reasons up by (each entry also has its stable `code`).
pub fn not_offloaded(status: &serde_json::Value) -> std::collections::BTreeMap<String, u64> {
    status["not_offloaded"]
        .as_array()
        .map(|v| {
            v.iter().filter_map(|r| Some((r["reason"].as_str()?.to_string(), r["connections"].as_u64()?))).collect()
        })
        .unwrap_or_default()
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
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

/// How to start the engine.
#[derive(Debug, Clone)]
pub struct DaemonOpts {
    /// The router binary; `None`: [`router_bin`].
    pub exe: Option<PathBuf>,
    /// Arguments after `run`.
    pub args: Vec<String>,
    /// Start the engine pinned to this CPU (every thread, from exec on).
    pub cpu: Option<usize>,
    /// Write the log into this directory (which the caller keeps or removes);
    /// `None`: a private temporary directory, removed with the daemon unless
    /// something went wrong.
    pub log_dir: Option<PathBuf>,
    /// How long `status` may keep failing after the start.
    pub ready_timeout: Duration,
    /// Cgroup directories the engine joins before it execs (its memory,
    /// BPF maps included, and CPU are charged there from the start).
    pub cgroups: Vec<PathBuf>,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        DaemonOpts {
            exe: None,
            args: Vec::new(),
            cpu: None,
            log_dir: None,
            ready_timeout: Duration::from_secs(15),
            cgroups: Vec::new(),
        }
    }
}

/// A running `nft-offload run` in the lab router's namespace. Dropping it
/// sends SIGTERM (SIGKILL if it does not exit), like [`Daemon::stop`] without
/// the checks.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    ns: String,
    exe: PathBuf,
    /// `nft-offload run ...`, for messages.
    what: String,
    log: PathBuf,
    /// The private log directory, if the daemon owns one.
    dir: Option<TempDir>,
}

impl Daemon {
    /// `run --iface rlan --iface rwan <extra>`: the engine on the lab
    /// router's two ports.
    pub fn start(lab: &Lab, extra: &[&str]) -> Result<Daemon> {
        let mut args = vec!["--iface", RTR_LAN_IF, "--iface", RTR_WAN_IF];
        args.extend(extra);
        Daemon::start_raw(lab, &args)
    }

    /// `run <args>`, exactly these arguments.
    pub fn start_raw(lab: &Lab, args: &[&str]) -> Result<Daemon> {
        Daemon::launch(lab, DaemonOpts { args: args.iter().map(|a| a.to_string()).collect(), ..Default::default() })
    }

    /// Start with `opts` and wait until `status -o json` answers from this
    /// process. On failure the error carries the end of the engine's log.
    pub fn launch(lab: &Lab, opts: DaemonOpts) -> Result<Daemon> {
        let exe = match opts.exe {
            Some(e) => e,
            None => router_bin()?,
        };
        let (dir, log_dir) = match &opts.log_dir {
            Some(d) => (None, d.clone()),
            None => {
                let d = tempfile::Builder::new().prefix("nft-offload-daemon-").tempdir().context("log directory")?;
                let p = d.path().to_path_buf();
                (Some(d), p)
            }
        };
        static N: AtomicU32 = AtomicU32::new(0);
        let log = log_dir.join(format!("daemon-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let f = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let exe_s = exe.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", exe.display()))?;
        let mut argv = vec![exe_s, "run"];
        argv.extend(opts.args.iter().map(String::as_str));
        let what = format!("nft-offload run {}", opts.args.join(" "));
        let mut c = lab.command(&lab.rtr, &argv);
        c.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        if let Some(cpu) = opts.cpu {
            cpu::pin_command(&mut c, cpu);
        }
        crate::lab::cgroup::join_command(&mut c, &opts.cgroups)?;
        let child = lab.spawn_cmd(c)?;
        let mut d = Daemon { child: Some(child), ns: lab.rtr.clone(), exe, what, log, dir };
        d.wait_ready(opts.ready_timeout).inspect_err(|_| d.keep_log())?;
        Ok(d)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            crate::interrupt::check()?;
            if let Some(st) = self.child_mut().try_wait()? {
                bail!("`{}` exited during startup ({st}); {}", self.what, self.log_tail(20));
            }
            // Ready when the answer comes from this process: an engine left
            // running in the namespace would answer too (and ours would
            // then exit with "already running").
            if let Ok(st) = self.status() {
                if st["pid"].as_u64() == Some(u64::from(self.pid())) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "`{}` not ready after {timeout:?} (`nft-offload status -o json` kept failing); {}",
                    self.what,
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("a Daemon owns its child until stop/kill9")
    }

    /// The engine's pid (`ip netns exec` execs it, so it is our child's).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("a Daemon owns its child until stop/kill9")
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// `nft-offload ARGS` in the router namespace: stdout on success; the
    /// error carries the command's stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut c = cmd::netns_command(&self.ns, &[]);
        c.arg(&self.exe).args(args);
        cmd::run(&mut c)
    }

    /// `status -o json`.
    pub fn status(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.cli(&["status", "-o", "json"])?).context("decoding `status -o json`")
    }

    /// `flows -o json`.
    pub fn flows(&self) -> Result<Vec<serde_json::Value>> {
        serde_json::from_str(&self.cli(&["flows", "-o", "json"])?).context("decoding `flows -o json`")
    }

    /// The idle round trip of one connection, for an engine started with
    /// `--idle-timeout 2`: `burst(n)` sends `n` packets of it at 100 a
    /// second. It is offloaded, leaves the fast path (dormant) once idle,
    /// and its next packets put it back (a second offload) and go fast.
    pub fn assert_idle_round_trip(&self, burst: impl Fn(u32)) {
        burst(40);
        let st = self.status().unwrap();
        assert_eq!(st["flows_offloaded"], 1, "{st}");
        let fp0 = st["fast_path_packets"].as_u64().unwrap();
        assert!(fp0 > 20, "{st}");
        std::thread::sleep(Duration::from_secs(4));
        let st = self.status().unwrap();
        assert_eq!((st["flows_offloaded"].as_u64(), st["flows_dormant"].as_u64()), (Some(0), Some(1)), "{st}");
        assert_eq!(st["teardowns"]["idle"], 1, "{st}");
        burst(60);
        let st = self.status().unwrap();
        assert_eq!(st["flows_offloaded"], 1, "not re-offloaded: {st}");
        assert_eq!(st["offloads_total"], 2, "{st}");
        assert!(st["fast_path_packets"].as_u64().unwrap() > fp0 + 30, "{st}");
    }

    /// SIGTERM; an error unless the engine exits 0 within 5 s (then it is
    /// SIGKILLed). The log is kept on error.
    pub fn stop(mut self) -> Result<()> {
        let r = self.terminate();
        let r = match r {
            Ok(st) if st.success() => Ok(()),
            Ok(st) => Err(anyhow!("`{}` exited with {st} after SIGTERM; {}", self.what, self.log_tail(20))),
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.keep_log();
        }
        r
    }

    /// SIGKILL, as a crash would; waits until it is gone.
    pub fn kill9(mut self) -> Result<()> {
        let mut c = self.child.take().expect("a Daemon owns its child until stop/kill9");
        let killed = c.kill().context("SIGKILL");
        // Reaped even if it had already exited (then kill fails).
        c.wait().context("reaping the engine")?;
        killed
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], SIGKILL if still there.
    fn terminate(&mut self) -> Result<ExitStatus> {
        let Some(mut c) = self.child.take() else { bail!("`{}` already stopped", self.what) };
        // SAFETY: our own unreaped child, so the pid cannot have been reused.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("`{}` did not exit within {STOP_GRACE:?} of SIGTERM; {}", self.what, self.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Keep the private log directory (the caller reports a failure).
    fn keep_log(&mut self) {
        if let Some(d) = self.dir.take() {
            let p = d.keep();
            eprintln!("nft-offload-lab: engine log kept in {}", p.display());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.terminate();
        }
        // A failing test unwinds through here: keep what the engine said.
        if std::thread::panicking() {
            self.keep_log();
        }
    }
}
