//! The host side of the VM tier: the packages it needs, finding Debian's
//! kernels, booting one under qemu (TCG) with the host's root shared
//! read-only, and reading back what the scenarios inside reported.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::initramfs::{self, GuestJob};
use super::{Kernel, Outcome, ScenarioResult};

/// Debian packages the tier needs on the host, by what needs them. The
/// kernels come from their metapackages: Debian 12's 6.1
/// (`linux-image-amd64`) and 6.12 (`linux-image-6.12-amd64`, what Debian 13
/// ships), so a pinned ABI that the archive drops never breaks the tier.
pub const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
    "zstd",
    "linux-image-amd64",
    "linux-image-6.12-amd64",
    // used inside the guest, from the host's root
    "ppp",
    "pppoe",
    "wireguard-tools",
    "tcpdump",
    "iproute2",
    "nftables",
    "conntrack",
    "iperf3",
    "python3",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Install what is missing with apt-get (root only). The kernel packages'
/// postinst would build an initramfs the tier never uses: `INITRD=No`
/// (read by /etc/kernel/postinst.d/initramfs-tools) skips it.
pub fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the VM tier needs these Debian packages: {} (run as root to install them)", missing.join(" "));
    }
    eprintln!("vm: installing {}", missing.join(" "));
    let run = |args: &[&str]| -> Result<()> {
        let st = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("INITRD", "No")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .context("running apt-get")?;
        if !st.success() {
            bail!("apt-get {} failed ({st})", args.join(" "));
        }
        Ok(())
    };
    run(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    run(&args)
}

/// A Debian kernel installed on the host: its image and its modules.
#[derive(Debug, Clone)]
pub struct KernelImage {
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// Compare kernel release strings as version numbers (6.1.0-57 > 6.1.0-50).
fn version_key(release: &str) -> Vec<u64> {
    release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap_or(0)).collect()
}

/// The newest installed kernel of a series ("6.1": `vmlinuz-6.1.*`), with
/// its modules.
pub fn find_kernel(series: &str) -> Result<KernelImage> {
    let prefix = format!("vmlinuz-{series}.");
    let mut found: Vec<KernelImage> = std::fs::read_dir("/boot")
        .context("reading /boot")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let release = name.strip_prefix("vmlinuz-")?.to_string();
            if !name.starts_with(&prefix) {
                return None;
            }
            let modules = PathBuf::from("/lib/modules").join(&release);
            modules.join("modules.dep").is_file().then(|| KernelImage { release, vmlinuz: e.path(), modules })
        })
        .collect();
    found.sort_by_key(|k| version_key(&k.release));
    found.pop().ok_or_else(|| {
        anyhow!("no Debian {series} kernel installed (/boot/{prefix}* with /lib/modules/<release>/modules.dep)")
    })
}

/// What one boot produced.
#[derive(Debug)]
pub struct Boot {
    pub kernel: KernelImage,
    pub results: Vec<ScenarioResult>,
    /// The guest's serial console, kept for failures.
    pub console: PathBuf,
    /// Set when the VM did not finish on its own (timeout, crash).
    pub error: Option<String>,
    pub seconds: f64,
}

impl Boot {
    /// The last `n` lines of the console.
    pub fn console_tail(&self, n: usize) -> String {
        crate::daemon::log_tail(&self.console, n)
    }
}

/// Options of one boot.
pub struct BootOpts<'a> {
    pub kernel: Kernel,
    /// Scenario names to run inside (all when empty).
    pub scenarios: &'a [String],
    /// The lab binary the guest runs (from the host's root).
    pub lab_bin: PathBuf,
    /// Where the console log and results go (created).
    pub work_dir: PathBuf,
    pub timeout: Duration,
    /// Extra arguments for `vm-guest` (e.g. the differential's frame count).
    pub guest_args: Vec<String>,
}

/// Boot `opts.kernel`, run the scenarios, power off, and return what they
/// reported. An error only when the VM could not be started at all; a VM
/// that died or timed out returns what it reported so far, with `error` set.
pub fn boot(opts: &BootOpts<'_>) -> Result<Boot> {
    let k = find_kernel(opts.kernel.series())?;
    std::fs::create_dir_all(&opts.work_dir).with_context(|| format!("creating {}", opts.work_dir.display()))?;
    let results_dir = opts.work_dir.join("results");
    let _ = std::fs::remove_dir_all(&results_dir);
    std::fs::create_dir_all(&results_dir)?;
    let results_file = results_dir.join("results.jsonl");

    let lab = opts.lab_bin.to_str().ok_or_else(|| anyhow!("lab binary path is not UTF-8"))?;
    let mut command =
        format!("{} vm-guest --results /nfo-results/results.jsonl --kernel {}", shell_quote(lab), opts.kernel.series());
    for s in opts.scenarios {
        command += &format!(" --scenario {}", shell_quote(s));
    }
    for a in &opts.guest_args {
        command += &format!(" {}", shell_quote(a));
    }
    command += " >/nfo-results/guest.log 2>&1";
    let initrd = initramfs::build(&k.modules, &GuestJob { command }, &opts.work_dir.join("initrd.cpio"))?;

    let console = opts.work_dir.join("console.log");
    let console_file = std::fs::File::create(&console)?;
    let root_share = "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap".to_string();
    let results_share = format!(
        "local,path={},mount_tag=results,security_model=none,multidevs=remap",
        results_dir.to_str().ok_or_else(|| anyhow!("work dir path is not UTF-8"))?
    );
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-m", "3072", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-monitor", "none", "-nic", "none"])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        // panic=-1: a panic reboots, and -no-reboot turns that into an exit.
        .args(["-append", "console=ttyS0 quiet panic=-1 oops=panic"])
        .args(["-virtfs", &root_share, "-virtfs", &results_share])
        .stdin(Stdio::null())
        .stdout(console_file.try_clone()?)
        .stderr(console_file);
    let start = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
    let mut error = None;
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                error = Some(format!("qemu exited with {st}"));
            }
            break;
        }
        if start.elapsed() > opts.timeout {
            let _ = child.kill();
            let _ = child.wait();
            error = Some(format!("the VM did not finish within {} s and was stopped", opts.timeout.as_secs()));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let seconds = start.elapsed().as_secs_f64();
    let results = read_results(&results_file)?;
    let done = std::fs::read_to_string(&console).unwrap_or_default().contains("nfo-vm: job exited 0");
    if error.is_none() && !done {
        error = Some("the guest powered off without finishing its job (see the console)".into());
    }
    Ok(Boot { kernel: k, results, console, error, seconds })
}

fn read_results(path: &Path) -> Result<Vec<ScenarioResult>> {
    let Ok(f) = std::fs::File::open(path) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<ScenarioResult>(&line) {
            Ok(r) => out.push(r),
            // A line cut short by a crash: say so rather than lose it.
            Err(e) => out.push(ScenarioResult {
                name: "(unreadable result)".into(),
                outcome: Outcome::Fail,
                detail: format!("{e}: {line}"),
                evidence: Default::default(),
                seconds: 0.0,
            }),
        }
    }
    Ok(out)
}

fn shell_quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-=,:".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_sort_as_versions() {
        let mut v = ["6.1.0-9-amd64", "6.1.0-57-amd64", "6.1.0-50-amd64"];
        v.sort_by_key(|r| version_key(r));
        assert_eq!(v, ["6.1.0-9-amd64", "6.1.0-50-amd64", "6.1.0-57-amd64"]);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/a/b-c"), "/a/b-c");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
