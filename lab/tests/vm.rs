//! The VM tier: Debian's 6.1 and 6.12 kernels under qemu (TCG), each booted
//! once with every scenario run inside (`nft_offload_lab::vm`), each
//! scenario reported here as a test of its own:
//! `linux_6_12::vlan::tc`, ... Functional evidence only: TCG timings are
//! never performance figures.
//!
//! Filters work as with any test binary (`cargo test --test vm -- vlan`):
//! only the kernels and scenarios they select are booted and run.
//! `NFO_VM_DIFF_FRAMES` sets the differential's frames per run (the long
//! option; CI uses the default).

use std::path::PathBuf;
use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};
use nft_offload_lab::vm::host::{self, BootOpts};
use nft_offload_lab::vm::{scenarios, Kernel, Outcome};

/// One boot's limit: every scenario of a kernel plus the boot.
const BOOT_LIMIT: Duration = Duration::from_secs(25 * 60);

fn name(k: Kernel, scenario: &str) -> String {
    format!("{}::{scenario}", k.test_prefix())
}

/// libtest's own selection: substring (or exact) filter, then skips.
fn selected(args: &Arguments, name: &str) -> bool {
    let hit = |f: &str| if args.exact { name == f } else { name.contains(f) };
    if let Some(f) = &args.filter {
        if !hit(f) {
            return false;
        }
    }
    !args.skip.iter().any(|s| hit(s))
}

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let all = scenarios::all();
    let mut plan: Vec<(Kernel, Vec<String>)> = Vec::new();
    for k in Kernel::ALL {
        let names: Vec<String> = all
            .iter()
            .filter(|s| s.kernels.contains(&k) && selected(&args, &name(k, s.name)))
            .map(|s| s.name.to_string())
            .collect();
        plan.push((k, names));
    }
    if args.list {
        let trials = plan.iter().flat_map(|(k, ns)| ns.iter().map(|n| Trial::test(name(*k, n), || Ok(())))).collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }

    let mut trials = Vec::new();
    let nothing = plan.iter().all(|(_, n)| n.is_empty());
    if !nothing {
        if let Err(e) = host::ensure_packages() {
            let msg = format!("{e:#}");
            for (k, names) in &plan {
                for n in names {
                    let m = msg.clone();
                    trials.push(Trial::test(name(*k, n), move || Err(m.into())));
                }
            }
            return libtest_mimic::run(&args, trials).exit_code();
        }
    }
    let lab_bin = lab_binary();
    let diff_frames = std::env::var("NFO_VM_DIFF_FRAMES").ok();
    for (k, names) in plan {
        if names.is_empty() {
            continue;
        }
        let work = target_dir().join("vm").join(k.series());
        // Selected scenarios only, unless every one of the kernel's is.
        let total = all.iter().filter(|s| s.kernels.contains(&k)).count();
        let only: Vec<String> = if names.len() == total { Vec::new() } else { names.clone() };
        let mut guest_args = Vec::new();
        if let Some(n) = &diff_frames {
            guest_args.extend(["--diff-frames".to_string(), n.clone()]);
        }
        eprintln!(
            "vm: booting Debian's {} kernel for {} scenarios (console: {})",
            k.series(),
            names.len(),
            work.display()
        );
        let boot = lab_bin.as_ref().map_err(|e| e.clone()).and_then(|bin| {
            host::boot(&BootOpts {
                kernel: k,
                scenarios: &only,
                lab_bin: bin.clone(),
                work_dir: work.clone(),
                timeout: BOOT_LIMIT,
                guest_args,
            })
            .map_err(|e| format!("{e:#}"))
        });
        match boot {
            Err(e) => {
                for n in names {
                    let m = format!("the {} VM could not start: {e}", k.series());
                    trials.push(Trial::test(name(k, &n), move || Err(m.into())));
                }
            }
            Ok(b) => {
                eprintln!(
                    "vm: {} ({}) ran {} scenarios in {:.0} s{}",
                    k.series(),
                    b.kernel.release,
                    b.results.len(),
                    b.seconds,
                    b.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                );
                let tail = b.console_tail(40);
                let guest_log = work.join("results").join("guest.log");
                for n in names {
                    let r = b.results.iter().find(|r| r.name == n).cloned();
                    let release = b.kernel.release.clone();
                    let err = b.error.clone();
                    let tail = tail.clone();
                    let glog = guest_log.clone();
                    trials.push(Trial::test(name(k, &n), move || -> Result<(), Failed> {
                        match r {
                            Some(r) if r.outcome == Outcome::Pass => {
                                println!("linux {release}: {} ({:.0} s)", r.detail, r.seconds);
                                Ok(())
                            }
                            Some(r) => {
                                Err(format!("linux {release}: {}\n(guest log: {})", r.detail, glog.display()).into())
                            }
                            None => Err(format!(
                                "linux {release}: not run: {}\n{tail}",
                                err.unwrap_or_else(|| "the guest did not report it".into())
                            )
                            .into()),
                        }
                    }));
                }
            }
        }
    }
    libtest_mimic::run(&args, trials).exit_code()
}

/// `target/` of this build (the test binary is `target/<profile>/deps/vm-*`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors().nth(3).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target"))
}

/// The lab binary the guest runs: next to the router binary.
fn lab_binary() -> Result<PathBuf, String> {
    let router = nft_offload_lab::router_bin().map_err(|e| format!("{e:#}"))?;
    let lab = router.with_file_name("nft-offload-lab");
    if lab.is_file() {
        Ok(lab)
    } else {
        Err(format!("no lab binary at {} (cargo build --workspace)", lab.display()))
    }
}
