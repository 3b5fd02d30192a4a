//! The VM scenarios, by name: `<topology>::<who offloads>`.
//!
//! Every topology is proven three ways on the same ruleset (a firewall4
//! shape with `flowtable ft` and `flow add @ft`):
//! - `kernel`: the kernel's own flowtable (nf_flow_table), the reference
//!   that says the kernel offloads this topology at all;
//! - `tc` and `xdp`: `nft-offload run --nft` with that ruleset, in each mode
//!   where the hook allows it, and a refusal by name where it does not.
//!
//! The evidence does not come from the engine: a checked transfer (every
//! byte compared with the sender's stream), and the ruleset's first
//! forward rule, a named counter, which stops counting once the connection
//! is offloaded while the data keeps arriving.

pub mod bridge;
pub mod differential;
pub mod firewall4;
pub mod ipsec;
pub mod net;
pub mod plain;
pub mod pppoe;
pub mod shaping;
pub mod vlan;
pub mod wireguard;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use serde_json::Value;

use super::Kernel;

/// What every scenario gets.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub kernel: Kernel,
    /// Frames per differential run.
    pub diff_frames: u32,
    /// Where a scenario may leave reports for the host (the results share).
    pub out_dir: std::path::PathBuf,
}

/// Figures a scenario proved, by name.
#[derive(Debug, Default)]
pub struct Evidence {
    pub figures: BTreeMap<String, Value>,
}

impl Evidence {
    pub fn put(&mut self, k: &str, v: impl Into<Value>) {
        self.figures.insert(k.to_string(), v.into());
    }

    /// Every figure on one line, for the log and the test's output.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.figures {
            if !s.is_empty() {
                s.push_str(", ");
            }
            let _ = write!(s, "{k}={v}");
        }
        s
    }
}

/// Log a scenario's step with the time since the guest started, so a slow
/// step shows in the guest log.
pub fn step(what: &str) {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:7.1}] {what}");
}

/// Who does the offload in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offload {
    /// The kernel's flowtable (nf_flow_table), loaded from the ruleset as is.
    Kernel,
    /// `nft-offload run --nft FILE --mode tc`.
    Tc,
    /// `nft-offload run --nft FILE --mode xdp`.
    Xdp,
}

impl Offload {
    pub fn as_str(self) -> &'static str {
        match self {
            Offload::Kernel => "kernel",
            Offload::Tc => "tc",
            Offload::Xdp => "xdp",
        }
    }
}

/// One named scenario.
pub struct Scenario {
    pub name: &'static str,
    pub kernels: &'static [Kernel],
    pub run: fn(&Ctx, &mut Evidence) -> Result<()>,
}

const BOTH: &[Kernel] = &[Kernel::Linux6_1, Kernel::Linux6_12];

/// The three runs of a topology: the kernel's flowtable (on `$refk`, both
/// kernels unless said), then the engine in TC and in XDP mode.
macro_rules! three_ways {
    ($topo:literal, $f:path) => {
        three_ways!($topo, $f, BOTH)
    };
    ($topo:literal, $f:path, $refk:expr) => {
        [
            Scenario { name: concat!($topo, "::kernel"), kernels: $refk, run: |c, e| $f(c, e, Offload::Kernel) },
            Scenario { name: concat!($topo, "::tc"), kernels: BOTH, run: |c, e| $f(c, e, Offload::Tc) },
            Scenario { name: concat!($topo, "::xdp"), kernels: BOTH, run: |c, e| $f(c, e, Offload::Xdp) },
        ]
    };
}

/// Debian's 6.1 flowtable stalls QinQ connections now and then (in 2 of 4
/// boots one of the two QinQ references never delivered its bulk after the
/// offload; 6.12 never did): a reference that is not one. QinQ's reference
/// is taken on 6.12; the engine is proven on both.
const QINQ_REFERENCE: &[Kernel] = &[Kernel::Linux6_12];

/// Every scenario, in the order they run.
pub fn all() -> Vec<Scenario> {
    let mut v = Vec::new();
    v.extend(three_ways!("plain", plain::run));
    v.extend(three_ways!("firewall4", firewall4::run));
    v.extend(three_ways!("vlan", vlan::vlan));
    v.extend(three_ways!("vlan_lower", vlan::vlan_lower));
    v.extend(three_ways!("vlan_stripped", vlan::vlan_stripped));
    v.push(Scenario {
        name: "vlan_lower_gateway_mac::tc",
        kernels: BOTH,
        run: |c, e| vlan::gateway_mac(c, e, Offload::Tc),
    });
    v.push(Scenario {
        name: "vlan_lower_gateway_mac::xdp",
        kernels: BOTH,
        run: |c, e| vlan::gateway_mac(c, e, Offload::Xdp),
    });
    v.extend(three_ways!("qinq", vlan::qinq, QINQ_REFERENCE));
    v.extend(three_ways!("qinq_lower", vlan::qinq_lower, QINQ_REFERENCE));
    v.extend(three_ways!("pppoe", pppoe::ppp));
    v.extend(three_ways!("pppoe_lower", pppoe::lower));
    v.extend(three_ways!("wireguard", wireguard::run));
    v.extend(three_ways!("bridge_ports", bridge::ports));
    v.extend(three_ways!("bridge", bridge::bridge));
    v.extend(three_ways!("ipsec", ipsec::run));
    // The engine in TC only: the kernel flowtable, with rwan listed below
    // rwan.7, leaves the decrypted download to the forward chain here (no
    // reference), and XDP through the wire tap's switch does not offload
    // even the uncovered control with the tags in the frame (not pursued:
    // the holds are the same in both modes).
    v.push(Scenario { name: "ipsec_vlan_dev::tc", kernels: BOTH, run: |c, e| ipsec::vlan_dev(c, e, Offload::Tc) });
    v.extend(three_ways!("sqm_cake", shaping::cake));
    v.extend(three_ways!("sqm_fq_codel", shaping::fq_codel));
    v.push(Scenario { name: "differential::vs_kernel", kernels: BOTH, run: differential::run });
    v
}
