//! Medians with spread, and percentiles.

use serde::Serialize;

/// Median with spread.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
    /// Second-lowest and second-highest value (min and max below 3
    /// values): the range without the two extreme repetitions, shown
    /// beside the spread, never used for validity.
    pub inner_min: f64,
    pub inner_max: f64,
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
        let (inner_min, inner_max) = if n >= 3 { (v[1], v[n - 2]) } else { (v[0], v[n - 1]) };
        Stat { median, min: v[0], max: v[n - 1], n, inner_min, inner_max }
    }

    /// (max - min) / median: how far apart the repetitions were.
    pub fn spread(&self) -> f64 {
        if self.median > 0.0 {
            (self.max - self.min) / self.median
        } else {
            f64::NAN
        }
    }

    /// The spread without the highest and the lowest repetition: how far
    /// apart the rest were when one round was disturbed. Shown, labelled;
    /// validity uses [`Stat::spread`].
    pub fn inner_spread(&self) -> f64 {
        if self.median > 0.0 {
            (self.inner_max - self.inner_min) / self.median
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
        // three values: the inner range is the median alone
        assert_eq!((s.inner_min, s.inner_max, s.inner_spread()), (100.0, 100.0, 0.0));
        // one disturbed round of five widens the spread, not the inner one
        let s = Stat::of(vec![100.0, 102.0, 98.0, 101.0, 300.0]);
        assert!((s.spread() - 2.0).abs() < 1e-12, "{}", s.spread());
        assert_eq!((s.inner_min, s.inner_max), (100.0, 102.0));
        assert!((s.inner_spread() - 0.02 / 1.01).abs() < 1e-12);
        let s = Stat::of(vec![5.0, 7.0]);
        assert_eq!((s.inner_min, s.inner_max), (5.0, 7.0));
        assert!(Stat::default().spread().is_nan());
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.99), 3.0);
    }
}
