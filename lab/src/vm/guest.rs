//! `nft-offload-lab vm-guest`: runs inside the VM (PID 1's child), runs the
//! scenarios one at a time, and appends one JSON line per scenario to the
//! results file on the host's share as soon as it ends, so a crash later
//! still leaves the earlier results.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::scenarios::{self, Ctx, Evidence};
use super::{Kernel, Outcome, ScenarioResult};

/// A scenario that has not finished by then is reported failed and the
/// next one starts (its thread is left behind; the VM ends soon anyway).
const SCENARIO_LIMIT: Duration = Duration::from_secs(240);

pub struct GuestOpts<'a> {
    pub results: &'a Path,
    pub kernel: Kernel,
    /// Names to run; all of this kernel's when empty.
    pub only: &'a [String],
    pub diff_frames: u32,
}

pub fn run(opts: &GuestOpts<'_>) -> Result<()> {
    let all = scenarios::all();
    for n in opts.only {
        if !all.iter().any(|s| s.name == n.as_str()) {
            bail!("no scenario named {n:?}");
        }
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.results)
        .with_context(|| format!("opening {}", opts.results.display()))?;
    let out_dir = opts.results.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let ctx = Ctx { kernel: opts.kernel, diff_frames: opts.diff_frames, out_dir };
    for s in all.into_iter().filter(|s| s.kernels.contains(&opts.kernel)) {
        if !opts.only.is_empty() && !opts.only.iter().any(|n| n == s.name) {
            continue;
        }
        eprintln!("=== {} (linux {})", s.name, opts.kernel.series());
        let start = Instant::now();
        let (tx, rx) = mpsc::channel();
        let run = s.run;
        let c = ctx.clone();
        std::thread::Builder::new().name(s.name.to_string()).spawn(move || {
            // The evidence gathered so far is kept when the scenario fails:
            // it says how far it got.
            let mut ev = Evidence::default();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&c, &mut ev)));
            let _ = tx.send((r, ev));
        })?;
        let r = match rx.recv_timeout(SCENARIO_LIMIT) {
            Ok((Ok(Ok(())), ev)) => ScenarioResult {
                name: s.name.into(),
                outcome: Outcome::Pass,
                detail: ev.summary(),
                evidence: ev.figures,
                seconds: 0.0,
            },
            Ok((Ok(Err(e)), ev)) => fail(s.name, format!("{e:#}"), ev),
            Ok((Err(panic), ev)) => fail(s.name, format!("panicked: {}", panic_text(&panic)), ev),
            Err(_) => {
                fail(s.name, format!("did not finish within {} s", SCENARIO_LIMIT.as_secs()), Evidence::default())
            }
        };
        let r = ScenarioResult { seconds: start.elapsed().as_secs_f64(), ..r };
        eprintln!("=== {}: {:?} in {:.1} s: {}", s.name, r.outcome, r.seconds, r.detail);
        writeln!(out, "{}", serde_json::to_string(&r)?)?;
        out.sync_data().ok();
    }
    Ok(())
}

fn fail(name: &str, detail: String, ev: Evidence) -> ScenarioResult {
    let detail = if ev.figures.is_empty() { detail } else { format!("{detail}\n  evidence so far: {}", ev.summary()) };
    ScenarioResult { name: name.into(), outcome: Outcome::Fail, detail, evidence: ev.figures, seconds: 0.0 }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}
