//! Sanity checks inside the run: figures that contradict themselves mark
//! the run invalid (`bench --strict` then exits non-zero).

use super::paths::PATHS;
use super::Report;

/// A figure whose repetitions spread more than this is not a measurement.
pub(super) const MAX_SPREAD: f64 = 0.25;

/// An offload path on which fewer of the forwarded packets took the fast
/// path measured the kernel (flows not offloaded, or not matching).
pub(super) const MIN_FAST_SHARE: f64 = 0.99;

/// Over the limit, or not a number (no median to compare with).
fn too_wide(spread: f64) -> bool {
    spread.is_nan() || spread > MAX_SPREAD
}

pub(super) fn check(r: &mut Report) {
    let mut bad = Vec::new();
    let ns = |p: &str| r.paths.get(p).and_then(|x| x.router_ns_per_pkt);
    for p in PATHS {
        let Some(s) = ns(p) else { continue };
        if too_wide(s.spread()) {
            bad.push(format!(
                "{p}: router cost spread {:.0}% over {} rounds ({:.0}-{:.0} ns, median {:.0}) exceeds {:.0}%",
                s.spread() * 100.0,
                s.n,
                s.min,
                s.max,
                s.median,
                MAX_SPREAD * 100.0
            ));
        }
        if let Some(f) = r.paths.get(p).and_then(|x| x.fast_path_share) {
            if f.min.is_nan() || f.min < MIN_FAST_SHARE {
                bad.push(format!(
                    "{p}: only {:.0}% of the forwarded packets took the fast path in its worst round \
                     (median {:.0}%, need {:.0}%): it measured the kernel",
                    f.min * 100.0,
                    f.median * 100.0,
                    MIN_FAST_SHARE * 100.0
                ));
            }
        }
        if let Some(sink) = r.paths.get(p).and_then(|x| x.sink_ns_per_pkt) {
            if sink.median <= 0.0 {
                bad.push(format!(
                    "{p}: the sink's NAPI kthread did no work, so its receive ran inside the router's thread"
                ));
            }
        }
    }
    for hook in ["tc", "xdp"] {
        let (f, o) = (ns(&format!("floor_{hook}")), ns(&format!("offload_{hook}")));
        if let (Some(f), Some(o)) = (f, o) {
            if f.median > o.median {
                bad.push(format!(
                    "floor_{hook} ({:.0} ns) costs more than offload_{hook} ({:.0} ns), which does the floor's work and more",
                    f.median, o.median
                ));
            }
        }
    }
    for (n, row) in &r.live_scaling {
        let s = row.router_ns_per_pkt;
        if too_wide(s.spread()) {
            bad.push(format!("live scaling, {n} connections: router cost spread {:.0}%", s.spread() * 100.0));
        }
    }
    r.invalid.extend(bad);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{PathResult, Stat};

    fn path(median: f64, min: f64, max: f64) -> PathResult {
        PathResult {
            router_ns_per_pkt: Some(Stat::of(vec![min, median, max])),
            sink_ns_per_pkt: Some(Stat::of(vec![90.0, 100.0, 110.0])),
            ..Default::default()
        }
    }

    #[test]
    fn flags_spread_and_floor_above_path() {
        let mut r = Report::default();
        r.paths.insert("floor_tc".into(), path(600.0, 590.0, 610.0));
        r.paths.insert("offload_tc".into(), path(620.0, 600.0, 640.0));
        check(&mut r);
        assert!(r.valid(), "{:?}", r.invalid);

        r.paths.insert("floor_tc".into(), path(700.0, 690.0, 710.0));
        r.paths.insert("kernel_plain".into(), path(1000.0, 800.0, 1300.0));
        check(&mut r);
        assert_eq!(r.invalid.len(), 2, "{:?}", r.invalid);
        assert!(r.invalid.iter().any(|m| m.starts_with("kernel_plain: router cost spread 50%")));
        assert!(r.invalid.iter().any(|m| m.starts_with("floor_tc (700 ns) costs more than offload_tc")));
    }

    #[test]
    fn flags_offload_path_that_was_not_fast_pathed() {
        let mut r = Report::default();
        let mut p = path(600.0, 590.0, 610.0);
        p.fast_path_share = Some(Stat::of(vec![1.0, 1.002, 0.999]));
        r.paths.insert("offload_tc".into(), p.clone());
        check(&mut r);
        assert!(r.valid(), "{:?}", r.invalid);
        p.fast_path_share = Some(Stat::of(vec![1.0, 0.0, 1.0]));
        r.paths.insert("offload_xdp".into(), p);
        check(&mut r);
        assert_eq!(r.invalid.len(), 1, "{:?}", r.invalid);
        assert!(r.invalid[0].starts_with("offload_xdp: only 0% of the forwarded packets took the fast path"));
    }

    #[test]
    fn flags_sink_work_in_router_thread() {
        let mut r = Report::default();
        let mut p = path(600.0, 590.0, 610.0);
        p.sink_ns_per_pkt = Some(Stat::default());
        r.paths.insert("kernel_ct_nat".into(), p);
        check(&mut r);
        assert_eq!(r.invalid.len(), 1);
        assert!(r.invalid[0].contains("sink's NAPI kthread did no work"));
    }
}
