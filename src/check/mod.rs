//! `nft-offload check`: what this host supports, and per interface which mode
//! `run` would pick, why, and what could get in its way, with remedies.
//!
//! Two halves: `facts` reads (it never attaches, loads into an interface or
//! changes anything); judging is pure, one small function per finding, listed
//! in `HOST_FINDINGS` and `IFACE_FINDINGS`, so every verdict is unit-tested
//! without root.

mod facts;
mod host_findings;
mod iface_findings;
#[cfg(test)]
mod tests;

use serde::Serialize;

use crate::dataplane::Mode;
use crate::policy::{choose_modes, ModeChoice};
use crate::routes::link::LinkInfo;
use facts::{HostFacts, IfaceFacts};
use host_findings::{HostCtx, HOST_FINDINGS};

/// What to check: the interfaces `run` would get (empty = every interface in
/// this namespace except lo) and the mode it would be asked for.
#[derive(Debug, Clone)]
pub struct CheckOpts {
    pub ifaces: Vec<String>,
    pub mode: ModeChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable identifier ("bpf_syscall", "xdp_program", ...): scripts match on it.
    pub item: String,
    pub status: Status,
    pub detail: String,
    /// What to do about it; set whenever status is not ok.
    pub remedy: Option<String>,
}

/// A finding before it is named: what a finding function returns; the
/// tables give the item names.
struct Verdict {
    status: Status,
    detail: String,
    remedy: Option<String>,
}

impl Verdict {
    fn ok(detail: impl Into<String>) -> Self {
        Verdict { status: Status::Ok, detail: detail.into(), remedy: None }
    }
    fn warn(detail: impl Into<String>, remedy: impl Into<String>) -> Self {
        Verdict { status: Status::Warn, detail: detail.into(), remedy: Some(remedy.into()) }
    }
    fn fail(detail: impl Into<String>, remedy: impl Into<String>) -> Self {
        Verdict { status: Status::Fail, detail: detail.into(), remedy: Some(remedy.into()) }
    }
    fn named(self, item: &str) -> Finding {
        Finding { item: item.into(), status: self.status, detail: self.detail, remedy: self.remedy }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct IfaceReport {
    pub name: String,
    pub exists: bool,
    pub driver: String,
    /// What `run` would attach in (None: the interface does not exist).
    pub mode: Option<Mode>,
    pub reason: String,
    /// Whether the driver has native XDP (None: not known to nft-offload).
    pub native_xdp: Option<bool>,
    /// veth only: whether XDP frames redirected into it arrive, i.e. whether
    /// its peer has NAPI (GRO on or an XDP program). None: unknown / not veth.
    pub xdp_redirect_target: Option<bool>,
    pub egress_qdisc: String,
    pub shaper: bool,
    /// Id of an XDP program already attached (nft-offload's own included).
    pub xdp_prog_id: Option<u32>,
    /// Other programs on TC ingress, one description each.
    pub tc_ingress_programs: Vec<String>,
    pub findings: Vec<Finding>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub host: Vec<Finding>,
    pub interfaces: Vec<IfaceReport>,
    /// No host check failed and at least one interface is usable.
    pub offload_possible: bool,
}

/// Gather facts from this host and judge them. Changes nothing: the
/// programs it loads (libbpf's probes, the fast path) are closed at once;
/// nothing is attached.
pub fn run(opts: &CheckOpts) -> CheckReport {
    let (host, ifaces) = facts::gather(&opts.ifaces);
    judge(&host, &ifaces, opts.mode)
}

fn judge(host: &HostFacts, ifaces: &[IfaceFacts], requested: ModeChoice) -> CheckReport {
    // Modes are chosen over the existing interfaces only, exactly as `run`
    // would choose them (one TC interface makes all of them TC in auto).
    let existing: Vec<LinkInfo> = ifaces.iter().filter_map(|i| i.link.as_ref().ok().cloned()).collect();
    let mut decisions = choose_modes(&existing, requested).into_iter();
    let interfaces: Vec<IfaceReport> =
        ifaces.iter().map(|f| iface_findings::report(f, f.link.as_ref().ok().and_then(|_| decisions.next()))).collect();
    let ctx = HostCtx {
        // No interfaces known: TC may well be needed, judge TCX as if it were.
        tc_needed: existing.is_empty() || interfaces.iter().any(|i| i.mode == Some(Mode::Tc)),
        usable: interfaces
            .iter()
            .filter(|i| i.exists && i.findings.iter().all(|f| f.status != Status::Fail))
            .map(|i| i.name.as_str())
            .collect(),
        ifindexes: existing.iter().map(|l| l.ifindex).collect(),
    };
    let host: Vec<Finding> = HOST_FINDINGS.iter().map(|(item, judge)| judge(host, &ctx).named(item)).collect();
    let offload_possible = host.iter().all(|f| f.status != Status::Fail);
    CheckReport { host, interfaces, offload_possible }
}

impl CheckReport {
    /// Aligned text: one line per finding (`STATUS item detail`), the remedy
    /// on an indented line under it, host first, then each interface.
    pub fn render(&self) -> String {
        let width = self
            .host
            .iter()
            .chain(self.interfaces.iter().flat_map(|i| &i.findings))
            .map(|f| f.item.len())
            .max()
            .unwrap_or(0);
        let line = |o: &mut String, f: &Finding| {
            *o += &format!("  {:<4}  {:<width$}  {}\n", f.status.label(), f.item, f.detail);
            if let Some(r) = &f.remedy {
                *o += &format!("  {:<4}  {:<width$}  remedy: {r}\n", "", "");
            }
        };
        let mut o = String::from("Host:\n");
        for f in &self.host {
            line(&mut o, f);
        }
        for i in &self.interfaces {
            o += &match (i.exists, i.mode) {
                (true, Some(m)) => format!(
                    "Interface {} (driver {}, mode {}):\n",
                    i.name,
                    if i.driver.is_empty() { "?" } else { &i.driver },
                    m.as_str()
                ),
                _ => format!("Interface {}:\n", i.name),
            };
            for f in &i.findings {
                line(&mut o, f);
            }
        }
        let (fails, warns) =
            self.host.iter().chain(self.interfaces.iter().flat_map(|i| &i.findings)).fold((0, 0), |(f, w), x| {
                (f + (x.status == Status::Fail) as u32, w + (x.status == Status::Warn) as u32)
            });
        o += &format!(
            "{}: {fails} failed, {warns} warnings\n",
            if self.offload_possible { "Offload possible" } else { "Offload NOT possible" }
        );
        o
    }

    /// 0 when offload can work here (warnings allowed, and interfaces that
    /// fail on their own do not count as long as one usable interface is
    /// left); 1 when it cannot work at all: a host check failed or no named
    /// interface is usable.
    pub fn exit_code(&self) -> i32 {
        if self.offload_possible {
            0
        } else {
            1
        }
    }
}
