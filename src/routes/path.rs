//! The path of a connection through the router: for each direction, where
//! its packets arrive and where the kernel forwards them (FIB + neighbour),
//! as the two directional fast-path entries.
//!
//! The original direction arrives where the kernel routes its source (the
//! reverse path, as rp_filter assumes); each direction is routed after DNAT
//! and before SNAT, the prerouting / postrouting order of
//! `nf_nat_inet_fn`. Like `nft_flow_offload_eval`, which takes both
//! directions' dst from the route of the packet in hand, we insist that the
//! reply leaves where the original arrived.

use std::fmt;
use std::net::IpAddr;

use crate::conntrack::{CtEntry, CtTuple};
use crate::dataplane::Dataplane;
use crate::flow::{build_direction, Direction};

use super::{egress_for, resolve, Unroutable};

/// Why a connection has no fast path now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoPath {
    NoInterfaceUp,
    /// Local, or no route to the source at all.
    NoRouteBack,
    InputNotManaged,
    OutputNotManaged,
    Unroutable(i32),
    Asymmetric,
    /// The FIB query itself failed (test run error).
    LookupFailed(String),
}

impl NoPath {
    /// Worth retrying soon: neighbours resolve as traffic passes, links
    /// come up, a failed query may succeed next time.
    pub fn transient(&self) -> bool {
        match self {
            NoPath::NoInterfaceUp | NoPath::LookupFailed(_) => true,
            NoPath::Unroutable(code) => Unroutable(*code).transient(),
            _ => false,
        }
    }
}

impl fmt::Display for NoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoPath::NoInterfaceUp => f.write_str("no managed interface is up"),
            NoPath::NoRouteBack => f.write_str("no route back to the source (local or unroutable)"),
            NoPath::InputNotManaged => f.write_str("input interface not managed or down"),
            NoPath::OutputNotManaged => f.write_str("output interface not managed or down"),
            NoPath::Unroutable(code) => f.write_str(Unroutable(*code).as_str()),
            NoPath::Asymmetric => f.write_str("asymmetric routing"),
            NoPath::LookupFailed(e) => write!(f, "route lookup failed: {e}"),
        }
    }
}

/// The interfaces the fast path runs on, as the engine manages them.
pub trait Ports {
    /// Managed and up.
    fn is_up(&self, ifindex: u32) -> bool;
    fn first_up(&self) -> Option<u32>;
    fn name(&self, ifindex: u32) -> Option<&str>;
}

/// Both directions of `e`, or why not.
pub fn resolve_path(dp: &Dataplane, ports: &impl Ports, e: &CtEntry) -> Result<[Direction; 2], NoPath> {
    let first = ports.first_up().ok_or(NoPath::NoInterfaceUp)?;
    let (o, r) = (&e.orig, &e.reply);
    let in_orig = match egress_for(dp, first, o.src) {
        Ok(Some(i)) => i,
        Ok(None) => return Err(NoPath::NoRouteBack),
        Err(err) => return Err(NoPath::LookupFailed(format!("{err:#}"))),
    };
    if !ports.is_up(in_orig) {
        return Err(NoPath::InputNotManaged);
    }
    let hop = |in_if: u32, t: &CtTuple, dst: IpAddr| match resolve(dp, in_if, t.src, dst, t.proto, t.sport, t.dport) {
        Ok(Ok(nh)) => Ok(nh),
        Ok(Err(u)) => Err(NoPath::Unroutable(u.0)),
        Err(err) => Err(NoPath::LookupFailed(format!("{err:#}"))),
    };
    let mut nh_o = hop(in_orig, o, r.src)?;
    if !ports.is_up(nh_o.ifindex) {
        return Err(NoPath::OutputNotManaged);
    }
    let in_reply = nh_o.ifindex;
    let mut nh_r = hop(in_reply, r, o.src)?;
    if nh_r.ifindex != in_orig {
        return Err(NoPath::Asymmetric);
    }
    nh_o.xdp_ok = dp.is_xdp_target(nh_o.ifindex);
    nh_r.xdp_ok = dp.is_xdp_target(nh_r.ifindex);
    Ok([build_direction(o, r, in_orig, &nh_o), build_direction(r, o, in_reply, &nh_r)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_and_text() {
        let cases = [
            (NoPath::NoInterfaceUp, true, "no managed interface is up"),
            (NoPath::NoRouteBack, false, "no route back to the source (local or unroutable)"),
            (NoPath::InputNotManaged, false, "input interface not managed or down"),
            (NoPath::OutputNotManaged, false, "output interface not managed or down"),
            (NoPath::Unroutable(7), true, "next-hop neighbour not resolved yet"),
            (NoPath::Unroutable(1), false, "blackhole route"),
            (NoPath::Asymmetric, false, "asymmetric routing"),
            (NoPath::LookupFailed("EPERM".into()), true, "route lookup failed: EPERM"),
        ];
        for (p, transient, text) in cases {
            assert_eq!(p.transient(), transient, "{p:?}");
            assert_eq!(p.to_string(), text);
        }
    }
}
