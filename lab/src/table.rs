//! One row of a fast-path table (lab/tests/fastpath*.rs) checked against
//! what a BPF_PROG_TEST_RUN did: the verdict, the output frame byte for
//! byte, and exactly which counters moved.

use nft_offload::dataplane::STAT_NAMES;

/// What a row expects.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// Forwarded as exactly `frame`, counting `l3_bytes` (IP bytes).
    Fwd { frame: &'a [u8], l3_bytes: u64 },
    /// Handed to the kernel untouched, counted once under this reason.
    Slow(&'a str),
}

/// Counters that changed between two `Dataplane::stats` snapshots.
pub fn stat_delta(before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    STAT_NAMES
        .iter()
        .zip(after.iter().zip(before))
        .filter(|(_, (a, b))| a != b)
        .map(|(n, (a, b))| (*n, a - b))
        .collect()
}

/// Everything that differs from `want` (empty: the row passed).
pub fn check(
    name: &str,
    want: Outcome<'_>,
    forwarded: bool,
    input: &[u8],
    out: &[u8],
    delta: &[(&str, u64)],
) -> Vec<String> {
    let mut failures = Vec::new();
    match want {
        Outcome::Fwd { frame, l3_bytes } => {
            if !forwarded {
                failures.push(format!("{name}: expected forward, got slow path {delta:?}"));
                return failures;
            }
            if out != frame {
                failures.push(format!("{name}: output differs\n got    {out:02x?}\n expect {frame:02x?}"));
            }
            let want_delta = [("fwd_packets", 1), ("fwd_bytes", l3_bytes)];
            if delta != want_delta {
                failures.push(format!("{name}: counters {delta:?}, want {want_delta:?}"));
            }
        }
        Outcome::Slow(reason) => {
            if forwarded {
                failures.push(format!("{name}: expected slow path ({reason}), got forward"));
                return failures;
            }
            if out != input {
                failures.push(format!("{name}: slow-path frame was modified"));
            }
            if delta != [(reason, 1)] {
                failures.push(format!("{name}: counters {delta:?}, want [({reason:?}, 1)]"));
            }
        }
    }
    failures
}
