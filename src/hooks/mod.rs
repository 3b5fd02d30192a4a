//! What runs on a managed device that a fast-path redirect would skip: the
//! facts, read from the kernel (`read`), and the pure decision of which
//! directions must stay on the slow path (`DeviceHooks::bypass`).
//!
//! Where each hook runs, and what our redirects skip (net/core/dev.c):
//!
//! * `__netif_receive_skb_core` runs `sch_handle_ingress` (TCX programs,
//!   then, only if they all return TCX_NEXT, the classic ingress/clsact
//!   filters through `tc_run`) and after it `nf_ingress` (netdev and inet
//!   `ingress` chains). Our TCX program redirects first, so a classic
//!   ingress filter (sqm-scripts' u32 + mirred to an ifb, police,
//!   skbedit) and every ingress chain are skipped; XDP runs before all of
//!   them. The kernel flowtable is itself a netdev ingress hook
//!   (nf_flow_offload_ip_hook, net/netfilter/nf_flow_table_ip.c): tc
//!   ingress ran before it.
//! * A TC redirect (`bpf_redirect` -> `__bpf_redirect_common` ->
//!   `dev_queue_xmit`, net/core/filter.c) goes through `__dev_queue_xmit`
//!   with `skb->nf_skip_egress` still set by `sch_handle_ingress`, so
//!   `nf_hook_egress` (netdev `egress` chains) is skipped, while tc egress
//!   (`sch_handle_egress`) and the root qdisc run. The kernel flowtable
//!   transmits through `neigh_xmit` / `dev_queue_xmit` with the egress
//!   chains applied.
//! * An XDP redirect (`bpf_redirect_map` into a devmap, `ndo_xdp_xmit`)
//!   skips all of egress: netdev chains, tc filters, the qdisc.
//!
//! A direction crossing such a hook is held (`crate::flow::Hold`): the
//! fast path hands its packets to the kernel, which applies the hook.

pub mod legacy;
pub mod nft;
pub mod tc;
mod watch;

use std::collections::BTreeMap;

pub use nft::Side;
pub use watch::NftWatch;

use crate::routes::link::{ifname, is_shaper};

/// A managed port as the facts need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub ifindex: u32,
    pub name: String,
    /// Attached in XDP mode: what it forwards leaves by XDP redirect.
    pub xdp: bool,
    /// The bridge it is a port of: routed frames through it pass the
    /// bridge family's chains, which the fast path on the port skips.
    pub bridge: Option<String>,
    /// Unmanaged devices stacked above it (its bridge, VLAN and PPPoE
    /// devices: `Topology::uppers`). The fast path on the port pops and
    /// pushes their headers itself, so their hooks never see its packets.
    pub uppers: Vec<(u32, String)>,
}

/// A classic tc filter, with where it redirects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcFilter {
    pub kind: String,
    pub actions: Vec<String>,
    /// mirred target: its name and its shaping qdisc, if any (sqm-scripts'
    /// download shaper lives on the ifb its ingress is redirected to).
    pub target: Option<(String, Option<String>)>,
}

/// What a fast-path redirect would skip on one managed device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceHooks {
    pub name: String,
    pub xdp: bool,
    /// `netdev t c`: chains on the ingress hook (netdev or inet family).
    pub ingress_chains: Vec<String>,
    pub egress_chains: Vec<String>,
    pub ingress_filters: Vec<TcFilter>,
    pub egress_filters: Vec<TcFilter>,
    /// A shaping qdisc on the device's egress (root or below it).
    pub shaper: Option<String>,
    /// The hooks could not be read (why): both sides count as hooked.
    pub unreadable: Option<String>,
    /// The hooks of the unmanaged devices above it (`Port::uppers`).
    pub uppers: Vec<DeviceHooks>,
}

/// A direction that must stay on the slow path: which hook, and one line
/// naming the device, the chain or filter, and the remedy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bypass {
    pub side: Side,
    pub why: String,
}

/// The facts for every managed port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HookFacts {
    pub ports: BTreeMap<u32, DeviceHooks>,
}

impl TcFilter {
    fn describe(&self, side: &str, dev: &str) -> String {
        let mut s = format!("tc {side} filter {} on {dev}", self.kind);
        match &self.target {
            Some((t, Some(q))) => s += &format!(" redirects to {t} (shaping qdisc {q} there: a download shaper)"),
            Some((t, None)) => s += &format!(" redirects to {t}"),
            None if !self.actions.is_empty() => s += &format!(" (actions: {})", self.actions.join(", ")),
            None => {}
        }
        s
    }
}

/// One hook a redirect would skip: what it is and what to do about it.
#[derive(Debug, Clone)]
pub struct Cause {
    pub what: String,
    /// `out`: the port the direction leaves by, when known (the remedy for
    /// an ifb download shaper names it).
    remedy: fn(&DeviceHooks, Option<&str>) -> String,
    /// The device above the port it is on (`DeviceHooks::uppers`): the
    /// remedy names it, not the port.
    upper: Option<String>,
}

impl Cause {
    pub fn remedy(&self, d: &DeviceHooks, out: Option<&str>) -> String {
        match &self.upper {
            Some(u) => list_upper(u),
            None => (self.remedy)(d, out),
        }
    }
}

fn remove_it(_: &DeviceHooks, _: Option<&str>) -> String {
    "remove it to offload this direction".into()
}

fn shape_on_egress(d: &DeviceHooks, out: Option<&str>) -> String {
    format!(
        "to offload it, shape on the egress of {} (htb or cake there) instead of an ifb on {}'s ingress",
        out.unwrap_or("the port the traffic leaves by"),
        d.name
    )
}

fn use_tc(_: &DeviceHooks, _: Option<&str>) -> String {
    "use --mode tc (a TC redirect keeps the qdisc and tc egress filters)".into()
}

fn list_upper(upper: &str) -> String {
    format!("list {upper} itself (the fast path then runs on it and keeps its hooks) or remove it")
}

fn move_to_tc_egress(_: &DeviceHooks, _: Option<&str>) -> String {
    "move its rules to tc egress (which a TC redirect keeps) or remove it".into()
}

impl DeviceHooks {
    /// What a packet arriving on this device would skip.
    pub fn ingress_causes(&self) -> Vec<Cause> {
        let mut v: Vec<Cause> = self
            .ingress_chains
            .iter()
            .map(|c| Cause { what: format!("nft chain {c} on {} ingress", self.name), remedy: remove_it, upper: None })
            .collect();
        v.extend(self.ingress_filters.iter().map(|f| Cause {
            what: f.describe("ingress", &self.name),
            remedy: if f.target.is_some() { shape_on_egress } else { remove_it },
            upper: None,
        }));
        v.extend(self.upper_ingress_causes());
        v
    }

    /// Frames the port's fast path decapsulates never reach the devices
    /// above it: whatever runs on their ingress is skipped.
    fn upper_ingress_causes(&self) -> Vec<Cause> {
        let up = self.uppers.iter().flat_map(|u| u.ingress_causes().into_iter().map(|c| (u.name.clone(), c)));
        up.map(|(u, c)| Cause { upper: Some(u), ..c }).collect()
    }

    /// A frame pushed straight onto the port skips all of an upper's
    /// egress: its chains, tc filters and qdisc (SQM on pppoe-wan).
    fn upper_egress_causes(&self) -> Vec<Cause> {
        let up = self.uppers.iter().flat_map(|u| u.egress_causes(true).into_iter().map(|c| (u.name.clone(), c)));
        up.map(|(u, c)| Cause { upper: Some(u), ..c }).collect()
    }

    /// What a packet redirected into this device would skip; `xdp`: by an
    /// XDP redirect (skips all of egress), else by a TC one.
    pub fn egress_causes(&self, xdp: bool) -> Vec<Cause> {
        let chain_remedy = if xdp { use_tc } else { move_to_tc_egress };
        let mut v: Vec<Cause> = self
            .egress_chains
            .iter()
            .map(|c| Cause {
                what: format!("nft chain {c} on {} egress", self.name),
                remedy: chain_remedy,
                upper: None,
            })
            .collect();
        if xdp {
            v.extend(self.egress_filters.iter().map(|f| Cause {
                what: f.describe("egress", &self.name),
                remedy: use_tc,
                upper: None,
            }));
            if let Some(q) = &self.shaper {
                v.push(Cause { what: format!("shaping qdisc {q} on {}", self.name), remedy: use_tc, upper: None });
            }
        }
        v.extend(self.upper_egress_causes());
        v
    }
}

/// One line: the causes, why they are skipped, the remedies (each once).
fn why(d: &DeviceHooks, causes: &[Cause], how: &str, out: Option<&str>) -> String {
    let mut remedies: Vec<String> = Vec::new();
    for c in causes {
        let r = c.remedy(d, out);
        if !remedies.contains(&r) {
            remedies.push(r);
        }
    }
    let what: Vec<&str> = causes.iter().map(|c| c.what.as_str()).collect();
    format!("{}: {how}, so this direction stays on the slow path; {}", what.join(", "), remedies.join("; "))
}

impl HookFacts {
    /// Whether a direction arriving on `in_if` and leaving by `out_if`
    /// would skip a hook the kernel applies; ingress first (its packets
    /// meet it first). Unmanaged devices have no facts: the path
    /// resolution refuses them before this is asked.
    pub fn bypass(&self, in_if: u32, out_if: u32) -> Option<Bypass> {
        let (inp, out) = (self.ports.get(&in_if), self.ports.get(&out_if));
        for d in [inp, out].into_iter().flatten() {
            if let Some(e) = &d.unreadable {
                return Some(Bypass {
                    side: if Some(d) == inp { Side::Ingress } else { Side::Egress },
                    why: format!(
                        "the tc and nftables hooks on {} could not be read ({e}): kept on the slow path until they \
                         can",
                        d.name
                    ),
                });
            }
        }
        if let Some(d) = inp {
            let (own, up) = (d.ingress_causes(), d.upper_ingress_causes());
            if own.len() > up.len() {
                let how = "the fast path runs before it";
                let own = &own[..own.len() - up.len()];
                return Some(Bypass { side: Side::Ingress, why: why(d, own, how, out.map(|o| o.name.as_str())) });
            }
            if !up.is_empty() {
                let how = format!("the fast path on {} takes their headers off before them", d.name);
                return Some(Bypass { side: Side::Ingress, why: why(d, &up, &how, None) });
            }
        }
        // The redirect into `out` is XDP only if the input port is XDP
        // (an XDP port redirects only to XDP ports, FO_F_XDP_OK).
        let xdp = inp.is_some_and(|d| d.xdp);
        if let Some(d) = out {
            let (own, up) = (d.egress_causes(xdp), d.upper_egress_causes());
            if own.len() > up.len() {
                let how = if xdp {
                    "an XDP redirect (ndo_xdp_xmit) skips netdev egress chains, tc egress and the qdisc"
                } else {
                    "a TC redirect skips netdev egress chains (nf_skip_egress)"
                };
                return Some(Bypass { side: Side::Egress, why: why(d, &own[..own.len() - up.len()], how, None) });
            }
            if !up.is_empty() {
                let how = format!("the fast path pushes their headers and transmits on {} itself", d.name);
                return Some(Bypass { side: Side::Egress, why: why(d, &up, &how, None) });
            }
        }
        None
    }

    /// Every hooked port and what is on it, for `check` and the log.
    pub fn summary(&self) -> Vec<(String, Vec<String>)> {
        self.ports
            .values()
            .map(|d| {
                let mut v: Vec<String> = d.ingress_causes().into_iter().map(|c| c.what).collect();
                v.extend(d.egress_causes(d.xdp).into_iter().map(|c| c.what));
                if let Some(e) = &d.unreadable {
                    v.push(format!("unreadable: {e}"));
                }
                (d.name.clone(), v)
            })
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }
}

/// Which cls_bpf programs are the fast path's own (attached through
/// clsact where the kernel has no TCX): not a hook it would skip.
pub type Own<'a> = &'a dyn Fn(&tc::BpfProg) -> bool;

/// A cls_bpf filter whose every program is `own`.
fn is_own(f: &tc::Filter, own: Own) -> bool {
    f.kind == "bpf" && !f.bpf.is_empty() && f.bpf.iter().all(own)
}

/// Read the hooks of `ports` from the kernel (one nf_tables chain dump,
/// one qdisc dump, filter dumps per port with an ingress or clsact qdisc).
/// What cannot be read marks the ports unreadable: held, never guessed.
/// Filters whose programs are `own` are left out.
pub fn read(ports: &[Port], own: Own) -> HookFacts {
    let chains = nft::device_chains();
    let qdiscs = tc::qdiscs();
    let mut facts = HookFacts::default();
    for p in ports {
        let mut d = device(p.ifindex, &p.name, p.xdp, &chains, &qdiscs, own);
        if let (Some(b), Ok(chains)) = (&p.bridge, &chains) {
            // TC on the bridge device itself runs after its input hooks
            // and redirects into br_dev_xmit, which runs its output ones:
            // only its ports skip them.
            for c in chains.iter().filter(|c| c.family == "bridge") {
                let label = format!("{} (bridge {b})", c.label());
                match c.side {
                    Side::Ingress => d.ingress_chains.push(label),
                    Side::Egress => d.egress_chains.push(label),
                }
            }
        }
        for (ifindex, name) in &p.uppers {
            let u = device(*ifindex, name, false, &chains, &qdiscs, own);
            if let Some(e) = &u.unreadable {
                d.unreadable.get_or_insert_with(|| format!("{name}, above it: {e}"));
            }
            d.uppers.push(u);
        }
        facts.ports.insert(p.ifindex, d);
    }
    facts
}

/// The hooks on one device, from the chain and qdisc dumps.
fn device(
    ifindex: u32,
    name: &str,
    xdp: bool,
    chains: &anyhow::Result<Vec<nft::DeviceChain>>,
    qdiscs: &anyhow::Result<Vec<tc::Qdisc>>,
    own: Own,
) -> DeviceHooks {
    let mut d = DeviceHooks { name: name.to_string(), xdp, ..Default::default() };
    let (chains, qdiscs) = match (chains, qdiscs) {
        (Ok(c), Ok(q)) => (c, q),
        (Err(e), _) | (_, Err(e)) => {
            d.unreadable = Some(format!("{e:#}"));
            return d;
        }
    };
    for c in chains.iter().filter(|c| c.devices.iter().any(|n| n == name)) {
        match c.side {
            Side::Ingress => d.ingress_chains.push(c.label()),
            Side::Egress => d.egress_chains.push(c.label()),
        }
    }
    d.shaper = shaper_of(qdiscs, ifindex);
    if let Some(hook) = qdiscs.iter().find(|q| q.ifindex == ifindex && q.is_hook()) {
        // Only clsact has an egress side: the ingress qdisc's
        // `ingress_tcf_block` answers any parent with its one (ingress)
        // block.
        let egress = match hook.kind.as_str() {
            "clsact" => tc::filters(ifindex, tc::PARENT_EGRESS),
            _ => Ok(Vec::new()),
        };
        match (tc::filters(ifindex, tc::PARENT_INGRESS), egress) {
            (Ok(i), Ok(e)) => {
                let theirs = |v: Vec<tc::Filter>| -> Vec<TcFilter> {
                    v.iter().filter(|f| !is_own(f, own)).map(|f| filter_fact(f, qdiscs)).collect()
                };
                d.ingress_filters = theirs(i);
                d.egress_filters = theirs(e);
            }
            (Err(e), _) | (_, Err(e)) => d.unreadable = Some(format!("{e:#}")),
        }
    }
    d
}

/// The first shaping qdisc on `ifindex`'s egress (root or a child, so an
/// mq with htb leaves counts too).
fn shaper_of(qdiscs: &[tc::Qdisc], ifindex: u32) -> Option<String> {
    qdiscs.iter().find(|q| q.ifindex == ifindex && !q.is_hook() && is_shaper(&q.kind)).map(|q| q.kind.clone())
}

fn filter_fact(f: &tc::Filter, qdiscs: &[tc::Qdisc]) -> TcFilter {
    TcFilter {
        kind: f.kind.clone(),
        actions: f.actions.iter().map(|a| a.kind.clone()).collect(),
        target: f.redirects_to().map(|t| (ifname(t).unwrap_or_else(|| format!("ifindex {t}")), shaper_of(qdiscs, t))),
    }
}

#[cfg(test)]
mod tests;
