//! Rates for `status`: the fast path's packets and bits per second, the
//! packets it handed to the kernel, and the fast path's share, over the
//! last seconds. Sampled once a second from the counters the fast path
//! keeps anyway (one map read), so nothing is added per packet. The slow
//! path's bytes are not counted by the fast path (a packet it hands on is
//! not measured), so its rate is in packets only.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::control::RatesView;

/// What the rates are averaged over.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How often a sample is kept.
pub const EVERY: Duration = Duration::from_secs(1);

/// The fast path's counters at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub fast_packets: u64,
    pub fast_bytes: u64,
    /// Packets handed to the kernel, all reasons.
    pub slow_packets: u64,
}

#[derive(Debug, Default)]
pub struct Rates {
    samples: VecDeque<Sample>,
}

impl Rates {
    /// Whether a sample is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.samples.back().is_none_or(|s| now.duration_since(s.at) >= EVERY)
    }

    /// Keep `s`, dropping samples older than the window needs.
    pub fn push(&mut self, s: Sample) {
        self.samples.push_back(s);
        while self.samples.len() > 2 && s.at.duration_since(self.samples[1].at) >= WINDOW {
            self.samples.pop_front();
        }
    }

    /// From the oldest sample kept to `now` (the counters as `status` reads
    /// them); None before the first sample.
    pub fn view(&self, now: &Sample) -> Option<RatesView> {
        self.samples.front().map(|from| between(from, now))
    }
}

/// The rates from `a` to `b`.
pub fn between(a: &Sample, b: &Sample) -> RatesView {
    let ms = b.at.duration_since(a.at).as_millis().max(1) as u64;
    let per_s = |n: u64| n.saturating_mul(1000) / ms;
    let fast = b.fast_packets.saturating_sub(a.fast_packets);
    let slow = b.slow_packets.saturating_sub(a.slow_packets);
    let bytes = b.fast_bytes.saturating_sub(a.fast_bytes);
    RatesView {
        window_ms: ms,
        fast_packets_per_s: per_s(fast),
        fast_bits_per_s: per_s(bytes.saturating_mul(8)),
        slow_packets_per_s: per_s(slow),
        // Tenths of a percent, so 99.96 does not show as 100.
        fast_share_pct: (fast + slow > 0).then(|| (fast as f64 * 1000.0 / (fast + slow) as f64).round() / 10.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64, fast: u64, bytes: u64, slow: u64) -> Sample {
        Sample { at: t0 + Duration::from_millis(ms), fast_packets: fast, fast_bytes: bytes, slow_packets: slow }
    }

    #[test]
    fn rates_over_the_window() {
        let t0 = Instant::now();
        let r = between(&at(t0, 0, 100, 1_000, 10), &at(t0, 2_000, 20_100, 2_501_000, 30));
        assert_eq!(
            (r.window_ms, r.fast_packets_per_s, r.fast_bits_per_s, r.slow_packets_per_s),
            (2_000, 10_000, 10_000_000, 10)
        );
        assert_eq!(r.fast_share_pct, Some(99.9));
        assert_eq!(between(&at(t0, 0, 5, 5, 5), &at(t0, 1_000, 5, 5, 5)).fast_share_pct, None, "no packets");
        assert_eq!(between(&at(t0, 0, 0, 0, 0), &at(t0, 1_000, 0, 0, 7)).fast_share_pct, Some(0.0));
    }

    #[test]
    fn the_window_keeps_its_length() {
        let t0 = Instant::now();
        let mut r = Rates::default();
        assert!(r.due(t0) && r.view(&at(t0, 0, 0, 0, 0)).is_none());
        for s in 0..30 {
            let now = t0 + Duration::from_secs(s);
            assert!(r.due(now));
            r.push(at(t0, s * 1000, s * 100, 0, 0));
            assert!(!r.due(now + Duration::from_millis(500)));
        }
        let v = r.view(&at(t0, 30_000, 3_000, 0, 0)).unwrap();
        // The oldest kept is at most WINDOW (plus one sample) back.
        assert!((10_000..=11_000).contains(&v.window_ms), "{v:?}");
        assert_eq!(v.fast_packets_per_s, 100);
    }
}
