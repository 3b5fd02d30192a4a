//! The VM tier: the same kind of end-to-end scenarios as `lab/tests/`, run
//! inside a VM on Debian's own kernels (6.1 and 6.12), where the devices a
//! real router has exist: VLAN, PPPoE, WireGuard, ESP, cake, fq_codel,
//! bridge VLAN filtering, and the kernel's own flowtable, which every
//! scenario runs first as the reference.
//!
//! - [`host`]: packages, kernels, the qemu boot (TCG: functional evidence
//!   only, never performance), results read back.
//! - [`initramfs`]: the busybox initramfs that makes the host's root the
//!   guest's (read-only, under an overlay).
//! - [`guest`]: `nft-offload-lab vm-guest`, the scenario runner inside.
//! - [`scenarios`]: the scenarios, by name.
//!
//! `lab/tests/vm.rs` boots each kernel once, runs every scenario inside, and
//! reports each as a test of its own.

pub mod capture;
pub mod guest;
pub mod host;
pub mod initramfs;
pub mod scenarios;
pub mod stream;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The kernels the tier boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kernel {
    /// Debian 12's kernel.
    Linux6_1,
    /// Debian 13's and OpenWrt 25.12's series (Debian 12 ships it too).
    Linux6_12,
}

impl Kernel {
    pub const ALL: [Kernel; 2] = [Kernel::Linux6_1, Kernel::Linux6_12];

    /// The version prefix of the kernel's release (`vmlinuz-6.1.*`).
    pub fn series(self) -> &'static str {
        match self {
            Kernel::Linux6_1 => "6.1",
            Kernel::Linux6_12 => "6.12",
        }
    }

    /// Name used in test names: `linux_6_12`.
    pub fn test_prefix(self) -> &'static str {
        match self {
            Kernel::Linux6_1 => "linux_6_1",
            Kernel::Linux6_12 => "linux_6_12",
        }
    }

    pub fn from_series(s: &str) -> Option<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.series() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
}

/// What a scenario reported, one JSON line each in the results file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub name: String,
    pub outcome: Outcome,
    /// The failure, or a one-line summary of the evidence.
    pub detail: String,
    /// Figures independent of the engine where possible (forward-chain
    /// counters, bytes compared, rates), by name.
    #[serde(default)]
    pub evidence: BTreeMap<String, serde_json::Value>,
    pub seconds: f64,
}
