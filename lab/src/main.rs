//! `nft-offload-lab up|down|demo|bench`. Data to stdout, logs to stderr.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use nft_offload_lab::vm::{self, Kernel, Outcome};
use nft_offload_lab::{bench, demo, lab, router_bin, Lab, LabOpts};

#[derive(Parser, Debug)]
#[command(
    name = "nft-offload-lab",
    version,
    about = "The nft-offload lab: network namespaces LAN client - router - WAN server, the demo and the benchmark"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the lab namespaces (nfolab-lan, nfolab-rtr, nfolab-wan).
    Up {
        #[arg(long, default_value = lab::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Remove the lab namespaces.
    Down {
        #[arg(long, default_value = lab::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// iperf3 through the router without and with offload, side by side.
    Demo {
        #[arg(long, default_value = "nfodemo")]
        prefix: String,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 8)]
        duration: u32,
        /// Offload modes to compare with the kernel path.
        #[arg(long, value_delimiter = ',', default_value = "tc,xdp")]
        modes: Vec<String>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Benchmark: offload against the kernel paths and a bare redirect, in
    /// the lab, in one run.
    Bench {
        /// Under two minutes instead of about fifteen.
        #[arg(long)]
        quick: bool,
        /// Write the full results as JSON.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Directory for the SVG plots.
        #[arg(long, default_value = "bench-plots")]
        plots: PathBuf,
        /// Exit non-zero when the run's own sanity checks mark it invalid
        /// (a spread over 25%, a floor costing more than its path); without
        /// it an invalid run is reported as INVALID and exits 0.
        #[arg(long)]
        strict: bool,
        /// Only the live-connections part (with its idle-engine figure):
        /// its own lab, no other figures.
        #[arg(long)]
        live_only: bool,
        /// Development: measure only these router paths (comma-separated),
        /// nothing else, to profile one path at a time.
        #[arg(long, value_delimiter = ',', hide = true)]
        paths: Vec<String>,
        /// Only the offload rate and offload latency phases (offload_tc),
        /// for work on the control plane; no router-cost figures.
        #[arg(long)]
        offload_only: bool,
        /// Only the memory figures: the maps at each table size as loaded
        /// and full, and the daemon's resident memory with live connections.
        #[arg(long)]
        memory_only: bool,
        /// Only the small-router profile: the engine under a 64 MiB memory
        /// limit and 20% of a CPU, offered a growing number of live
        /// connections.
        #[arg(long)]
        small_router: bool,
    },
    /// Boot Debian's 6.1 or 6.12 kernel under qemu and run the VM scenarios
    /// inside (what `cargo test --test vm` does, for one kernel, by hand).
    Vm {
        /// 6.1 or 6.12.
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// Scenario to run (repeat; default: all); `--list` names them.
        #[arg(long)]
        scenario: Vec<String>,
        /// Print the scenario names and exit.
        #[arg(long)]
        list: bool,
        /// Frames per differential run.
        #[arg(long)]
        diff_frames: Option<u32>,
        /// Console, results and logs go here.
        #[arg(long, default_value = "target/vm-manual")]
        work_dir: PathBuf,
    },
    /// Write the router binary's man pages (man/*.8.gz) and bash, zsh and
    /// fish completions (completions/) into DIR, from its clap definition.
    Docs {
        #[arg(long, value_name = "DIR", default_value = "target/assets")]
        out: PathBuf,
    },
    /// Inside the VM: run the scenarios and append their results.
    #[command(hide = true)]
    VmGuest {
        #[arg(long)]
        results: PathBuf,
        #[arg(long)]
        kernel: String,
        #[arg(long)]
        scenario: Vec<String>,
        #[arg(long, default_value_t = nft_offload_lab::vm::scenarios::differential::DEFAULT_FRAMES)]
        diff_frames: u32,
    },
}

fn main() {
    nft_offload::init_logging();
    if let Err(e) = run(Cli::parse().cmd) {
        eprintln!("nft-offload-lab: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Up { prefix } => {
            // XDP-safe so every offload mode is correct on the veths; no CPU
            // isolation, which only matters for measurements.
            let lab = Lab::up(&LabOpts { prefix: prefix.clone(), xdp_safe: true, isolate_router_cpu: false })?;
            lab.warm_neighbours()?;
            println!(
                "lab up: {} (client 192.168.1.2, fd00:1::2 on {}), {} (router: {} {}), \
                 {} (server 203.0.113.2, fd00:2::2 on {})",
                lab.lan, lab.lan_if, lab.rtr, lab.rtr_lan_if, lab.rtr_wan_if, lab.wan, lab.wan_if
            );
            println!(
                "try: ip netns exec {} nft-offload run --iface {} --iface {}",
                lab.rtr, lab.rtr_lan_if, lab.rtr_wan_if
            );
            println!("remove with: nft-offload-lab down --prefix {prefix}");
            lab.persist();
            Ok(())
        }
        Cmd::Down { prefix } => {
            let removed = lab::lab_down_by_prefix(&prefix)?;
            if removed.is_empty() {
                println!("no lab namespaces with prefix {prefix}");
            } else {
                println!("removed {}", removed.join(" "));
            }
            Ok(())
        }
        Cmd::Demo { prefix, duration, modes, json } => {
            let report = demo::demo(demo::DemoOpts { exe: None, prefix, duration_s: duration, modes })?;
            print!("{}", report.render());
            if let Some(path) = json {
                let s = serde_json::to_string_pretty(&report)?;
                std::fs::write(&path, s + "\n").with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Cmd::Docs { out } => {
            for f in nft_offload_lab::docs::generate(&out)? {
                println!("{}", f.display());
            }
            Ok(())
        }
        Cmd::Vm { kernel, scenario, list, diff_frames, work_dir } => vm(&kernel, scenario, list, diff_frames, work_dir),
        Cmd::VmGuest { results, kernel, scenario, diff_frames } => {
            let kernel = Kernel::from_series(&kernel).ok_or_else(|| anyhow::anyhow!("unknown kernel {kernel:?}"))?;
            vm::guest::run(&vm::guest::GuestOpts { results: &results, kernel, only: &scenario, diff_frames })
        }
        Cmd::Bench { quick, json, plots, strict, live_only, paths, offload_only, memory_only, small_router } => {
            let exe = router_bin()?;
            let r = bench::run(&bench::BenchOpts {
                quick,
                json,
                exe,
                plots,
                live_only,
                only_paths: paths,
                offload_only,
                memory_only,
                small_router_only: small_router,
            })?;
            print!("{}", r.render());
            if strict && !r.valid() {
                anyhow::bail!("--strict: the run is invalid: {}", r.invalid.join("; "));
            }
            Ok(())
        }
    }
}

/// `nft-offload-lab vm`: one boot, its results printed.
fn vm(kernel: &str, scenario: Vec<String>, list: bool, diff_frames: Option<u32>, work_dir: PathBuf) -> Result<()> {
    let k = Kernel::from_series(kernel).ok_or_else(|| anyhow::anyhow!("unknown kernel {kernel:?}: 6.1 or 6.12"))?;
    if list {
        for s in vm::scenarios::all().iter().filter(|s| s.kernels.contains(&k)) {
            println!("{}", s.name);
        }
        return Ok(());
    }
    vm::host::ensure_packages()?;
    let lab_bin = std::env::current_exe().context("locating the lab binary")?;
    let guest_args = diff_frames.map(|n| vec!["--diff-frames".to_string(), n.to_string()]).unwrap_or_default();
    let work_dir = std::path::absolute(&work_dir)?.join(k.series());
    let b = vm::host::boot(&vm::host::BootOpts {
        kernel: k,
        scenarios: &scenario,
        lab_bin,
        work_dir,
        timeout: std::time::Duration::from_secs(60 * 60),
        guest_args,
    })?;
    let mut failed = 0;
    for r in &b.results {
        if r.outcome == Outcome::Fail {
            failed += 1;
        }
        println!("{:<36} {:<4} {:>5.0} s  {}", r.name, format!("{:?}", r.outcome).to_lowercase(), r.seconds, r.detail);
    }
    println!(
        "linux {}: {} scenarios, {failed} failed, {:.0} s (console: {})",
        b.kernel.release,
        b.results.len(),
        b.seconds,
        b.console.display()
    );
    if let Some(e) = &b.error {
        anyhow::bail!("{e}\n{}", b.console_tail(30));
    }
    if failed > 0 {
        anyhow::bail!("{failed} scenarios failed");
    }
    Ok(())
}
