//! How many connections the flow table holds when `--max-flows` is not
//! given: what conntrack itself is allowed (a connection the engine
//! offloads is a conntrack entry first) and what this host's memory can
//! spare, whichever is smaller.

use std::fmt;

/// Facts the default is sized from, read by `host::memory_facts`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryFacts {
    /// MemTotal (/proc/meminfo), bytes.
    pub mem_total: Option<u64>,
    /// The smallest `memory.max` of the engine's cgroup and its ancestors
    /// (cgroup v2), bytes; None when none is set.
    pub cgroup_max: Option<u64>,
    /// net.netfilter.nf_conntrack_max in the engine's namespace.
    pub ct_max: Option<u64>,
}

/// What one offloaded connection can cost the engine at most, bytes: its
/// two `fo_flows` entries (2 x (240 + 16), bpf/maps.h), its two
/// `fo_dormant` buckets (2 x 16; elements only while dormant), and the
/// daemon's state for it (1,862 bytes measured by `bench --memory-only`
/// at 65,536 one-way UDP connections), rounded up.
pub const BYTES_PER_FLOW: u64 = 2560;

/// The share of the host's RAM the engine may plan for at a full table:
/// 1/16 (8 MiB of a 128 MiB router).
pub const RAM_SHARE: u64 = 16;

/// Never fewer: a table this small costs under 3 MiB in all.
pub const MIN_FLOWS: u32 = 1024;

/// With nothing known (no /proc/meminfo, no conntrack yet).
pub const FALLBACK_FLOWS: u32 = 65_536;

/// The default and how it was reached, for `check` and the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    pub flows: u32,
    pub why: String,
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} connections ({})", self.flows, self.why)
    }
}

fn mib(b: u64) -> String {
    format!("{} MiB", b >> 20)
}

/// `--max-flows` when not given. The memory budget is 1/16 of RAM, or
/// 3/4 of the engine's cgroup limit when that is smaller (a limit set for
/// the service is the engine's own; the quarter left is for the daemon's
/// fixed part). Capped by nf_conntrack_max: more could never be used.
pub fn auto_max_flows(f: &MemoryFacts) -> Capacity {
    let ram = f.mem_total.map(|m| (m / RAM_SHARE, format!("1/{RAM_SHARE} of {} RAM", mib(m))));
    let cg = f.cgroup_max.map(|m| (m / 4 * 3, format!("3/4 of the cgroup's memory.max {}", mib(m))));
    let budget = match (ram, cg) {
        (Some(r), Some(c)) => Some(if c.0 < r.0 { c } else { r }),
        (r, c) => r.or(c),
    };
    let by_mem = budget.map(|(b, why)| (b / BYTES_PER_FLOW, why));
    let (flows, why) = match (by_mem, f.ct_max) {
        (Some((n, why)), Some(ct)) if ct <= n => (ct, format!("nf_conntrack_max; {why} would allow {n}")),
        (Some((n, why)), Some(ct)) => {
            (n, format!("{why} at {BYTES_PER_FLOW} bytes a connection; nf_conntrack_max {ct}"))
        }
        (Some((n, why)), None) => (n, format!("{why} at {BYTES_PER_FLOW} bytes a connection")),
        (None, Some(ct)) => (ct, "nf_conntrack_max; RAM unknown".to_string()),
        (None, None) => (u64::from(FALLBACK_FLOWS), "neither RAM nor nf_conntrack_max readable".to_string()),
    };
    let max = u64::from(*super::MAX_FLOWS_RANGE.end());
    let clamped = flows.clamp(u64::from(MIN_FLOWS), max) as u32;
    let why = if u64::from(clamped) != flows { format!("{why}; bounded to {MIN_FLOWS}..={max}") } else { why };
    Capacity { flows: clamped, why }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn sized_by_the_smaller_of_memory_and_conntrack() {
        let cases: [(&str, MemoryFacts, u32, &str); 8] = [
            // OpenWrt's 16,384 conntrack entries on 128 MiB: memory decides.
            (
                "small router",
                MemoryFacts { mem_total: Some(128 * MIB), cgroup_max: None, ct_max: Some(16_384) },
                3276,
                "1/16 of 128 MiB RAM at 2560 bytes a connection; nf_conntrack_max 16384",
            ),
            (
                "512 MiB router",
                MemoryFacts { mem_total: Some(512 * MIB), cgroup_max: None, ct_max: Some(16_384) },
                13_107,
                "1/16 of 512 MiB RAM at 2560 bytes a connection; nf_conntrack_max 16384",
            ),
            (
                "big host: conntrack's own limit",
                MemoryFacts { mem_total: Some(24 * GIB), cgroup_max: None, ct_max: Some(262_144) },
                262_144,
                "nf_conntrack_max; 1/16 of 24576 MiB RAM would allow 629145",
            ),
            (
                "a service limit below the RAM share",
                MemoryFacts { mem_total: Some(24 * GIB), cgroup_max: Some(64 * MIB), ct_max: Some(262_144) },
                19_660,
                "3/4 of the cgroup's memory.max 64 MiB at 2560 bytes a connection; nf_conntrack_max 262144",
            ),
            (
                "a cgroup limit above the RAM share does not raise it",
                MemoryFacts { mem_total: Some(128 * MIB), cgroup_max: Some(GIB), ct_max: None },
                3276,
                "1/16 of 128 MiB RAM at 2560 bytes a connection",
            ),
            (
                "conntrack not loaded yet",
                MemoryFacts { mem_total: None, cgroup_max: None, ct_max: Some(2048) },
                2048,
                "nf_conntrack_max; RAM unknown",
            ),
            ("nothing known", MemoryFacts::default(), FALLBACK_FLOWS, "neither RAM nor nf_conntrack_max readable"),
            (
                "floor",
                MemoryFacts { mem_total: Some(16 * MIB), cgroup_max: None, ct_max: Some(100) },
                MIN_FLOWS,
                "nf_conntrack_max; 1/16 of 16 MiB RAM would allow 409; bounded to 1024..=16777216",
            ),
        ];
        for (name, facts, flows, why) in cases {
            let c = auto_max_flows(&facts);
            assert_eq!((c.flows, c.why.as_str()), (flows, why), "{name}");
        }
    }
}
