//! The Debian package as a router owner gets it: `./run.sh deb` builds it
//! (run.sh's test command builds it first); this installs it with dpkg on
//! this machine, runs the installed binary against the lab (check, an
//! offloaded transfer, reload, a clean stop), purges it, and checks that
//! nothing is left behind: no file of the package, no configuration, no
//! program loaded, the forward chain seeing traffic again.
//!
//! The package to test: `$NFT_OFFLOAD_DEB`, else the newest
//! `target/debian/nft-offload_*.deb`.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nft_offload_lab::{Daemon, DaemonOpts, Lab, LabOpts};

const BIN: &str = "/usr/sbin/nft-offload";
const CONFIG: &str = "/etc/nft-offload/config.toml";

fn package() -> PathBuf {
    if let Some(p) = std::env::var_os("NFT_OFFLOAD_DEB") {
        return PathBuf::from(p);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let newest = std::fs::read_dir(&dir).ok().and_then(|rd| {
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("nft-offload_"))
            .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
            .map(|e| e.path())
    });
    newest.unwrap_or_else(|| panic!("no package in {}: build it with `./run.sh deb`", dir.display()))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dpkg(args: &[&str]) -> String {
    run(Command::new("dpkg").args(args).env("DEBIAN_FRONTEND", "noninteractive"))
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "nft-offload"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The BPF programs process `pid` holds (its fds' `prog_id` in fdinfo):
/// exactly the installed engine's, whatever else runs on the machine.
fn progs_of(pid: u32) -> BTreeSet<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    let Ok(rd) = std::fs::read_dir(&dir) else { return BTreeSet::new() };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| t.lines().find_map(|l| l.strip_prefix("prog_id:")).and_then(|v| v.trim().parse().ok()))
        .collect()
}

/// Of `ids`, the programs still loaded.
fn still_loaded(ids: &BTreeSet<u32>) -> Vec<u32> {
    libbpf_rs::query::ProgInfoIter::default().map(|p| p.id).filter(|id| ids.contains(id)).collect()
}

/// Purges the package if the test stops half-way, so a failure leaves no
/// package behind either.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if installed() {
            let _ = Command::new("dpkg").args(["--purge", "nft-offload"]).stdin(Stdio::null()).output();
        }
    }
}

#[test]
fn installed_package_runs_against_the_lab_and_purges_clean() {
    assert!(
        !installed(),
        "nft-offload is already installed on this machine: this test installs and purges its own package, so it \
         does not run over an installation it did not make"
    );
    let deb = package();
    let info = dpkg(&["--info", deb.to_str().unwrap()]);
    assert!(info.contains("Package: nft-offload") && info.contains("libelf1"), "{info}");

    let guard = Installed;
    dpkg(&["--install", deb.to_str().unwrap()]);
    assert!(installed());
    let files: Vec<PathBuf> = dpkg(&["--listfiles", "nft-offload"]).lines().map(PathBuf::from).collect();
    for want in [
        BIN,
        CONFIG,
        "/usr/lib/systemd/system/nft-offload.service",
        "/usr/share/man/man8/nft-offload.8.gz",
        "/usr/share/man/man8/nft-offload-run.8.gz",
        "/usr/share/man/man8/nft-offload-hosts.8.gz",
        "/usr/share/bash-completion/completions/nft-offload",
        "/usr/share/zsh/vendor-completions/_nft-offload",
        "/usr/share/fish/vendor_completions.d/nft-offload.fish",
    ] {
        assert!(files.iter().any(|f| f == Path::new(want)), "{want} not in the package: {files:?}");
        assert!(Path::new(want).is_file(), "{want} not installed");
    }
    // The configuration is a conffile: an upgrade keeps the owner's edits.
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "nft-offload"]));
    assert!(conffiles.contains(CONFIG), "{conffiles}");
    // The man page is the CLI's own help, as man reads it.
    let mut page = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open("/usr/share/man/man8/nft-offload-run.8.gz").unwrap())
        .read_to_string(&mut page)
        .unwrap();
    assert!(page.contains(".TH nft-offload-run 8") && page.contains("\\-\\-config"), "{page}");
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/nft-offload.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/sbin/nft-offload run --config /etc/nft-offload/config.toml"), "{unit}");
    assert!(unit.contains("ExecReload="), "{unit}");

    let version = run(Command::new(BIN).arg("--version"));
    assert_eq!(version.trim(), format!("nft-offload {}", env!("CARGO_PKG_VERSION")));

    // The installed binary against the lab: the example configuration's
    // shape with the lab's ports, as an owner would edit it.
    let prefix = format!("deb{}", std::process::id() % 100000);
    let lab = Lab::up(&LabOpts { prefix, xdp_safe: false, isolate_router_cpu: false }).expect("lab up");
    lab.warm_neighbours().expect("neighbours");
    let check = lab.command(&lab.rtr, &[BIN, "check", "--iface", "rlan", "--iface", "rwan"]).output().unwrap();
    assert!(check.status.success(), "check: {}", String::from_utf8_lossy(&check.stdout));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let example = std::fs::read_to_string(CONFIG).unwrap();
    assert!(example.contains("interfaces = [\"eth0\", \"eth1\"]"), "{example}");
    std::fs::write(&cfg, example.replace("[\"eth0\", \"eth1\"]", "[\"rlan\", \"rwan\"]")).unwrap();
    let d = Daemon::launch(
        &lab,
        DaemonOpts {
            exe: Some(BIN.into()),
            args: vec!["--config".into(), cfg.to_str().unwrap().into()],
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let srv = lab.spawn(&lab.wan, &["iperf3", "-s", "-p", "5201"]).unwrap();
    let _srv = nft_offload_lab::Background(srv);
    lab.wait_tcp_listen(&lab.wan, 5201, Duration::from_secs(5)).unwrap();
    let out = lab.command(&lab.lan, &["iperf3", "-c", "203.0.113.2", "-p", "5201", "-t", "3"]).output().unwrap();
    assert!(out.status.success(), "iperf3: {}", String::from_utf8_lossy(&out.stderr));
    let st = d.status().unwrap();
    assert!(st["fast_path_packets"].as_u64().unwrap() > 1000, "the installed engine fast-pathed nothing: {st}");
    let out = d.cli(&["reload"]).expect("reload");
    assert!(out.contains("nothing changed"), "{out}");
    let engine_progs = progs_of(d.pid());
    assert!(engine_progs.len() >= 2, "the engine holds no programs? {engine_progs:?}");
    d.stop().unwrap_or_else(|e| panic!("clean exit on SIGTERM: {e:#}"));

    dpkg(&["--purge", "nft-offload"]);
    drop(guard);
    assert!(!installed());
    let left: Vec<&PathBuf> = files.iter().filter(|f| f.is_file()).collect();
    assert!(left.is_empty(), "files left behind by the purge: {left:?}");
    assert!(!Path::new("/etc/nft-offload").exists(), "/etc/nft-offload left behind by the purge");
    let t = Instant::now();
    loop {
        let left = still_loaded(&engine_progs);
        if left.is_empty() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(3), "programs still loaded: {left:?}");
        sleep(Duration::from_millis(100));
    }
    for ifc in ["rlan", "rwan"] {
        let out = lab.exec(&lab.rtr, &["ip", "-d", "link", "show", ifc]).unwrap();
        assert!(!out.contains("prog/xdp"), "XDP still attached to {ifc}: {out}");
        let out = lab.exec(&lab.rtr, &["tc", "filter", "show", "dev", ifc, "ingress"]).unwrap_or_default();
        assert!(!out.contains("fo_"), "a filter left on {ifc}: {out}");
    }
    let c0 = lab.counter_packets("fwd_all").unwrap();
    lab.ping(&lab.lan, "203.0.113.2".parse().unwrap()).unwrap();
    assert!(lab.counter_packets("fwd_all").unwrap() > c0, "the forward chain sees no traffic after the purge");
}
