//! Medians with spread, and percentiles.

use serde::Serialize;

/// Median with spread.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(mut v: Vec<f64>) -> Stat {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Stat::default();
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Stat { median, min: v[0], max: v[n - 1], n }
    }

    /// (max - min) / median: how far apart the repetitions were.
    pub fn spread(&self) -> f64 {
        if self.median > 0.0 {
            (self.max - self.min) / self.median
        } else {
            f64::NAN
        }
    }
}

pub(super) fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[((s.len() - 1) as f64 * p).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Stat::of(vec![110.0, 90.0, 100.0, f64::NAN]);
        assert_eq!((s.median, s.min, s.max, s.n), (100.0, 90.0, 110.0, 3));
        assert!((s.spread() - 0.2).abs() < 1e-12);
        assert!(Stat::default().spread().is_nan());
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.99), 3.0);
    }
}
