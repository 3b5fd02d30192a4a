//! The offload verdict: what happens to one connection, decided from the
//! merged conntrack view, what the engine already does with it, the user's
//! rules and facts about the world. Pure: no I/O, table-tested below.
//!
//! This is the one function to read for "why was this connection not
//! offloaded" (`status` shows the reasons it returns, counted).
//!
//! The rules mirror the kernel flowtable: `nft_flow_offload_eval`
//! (net/netfilter/nft_flow_offload.c) offloads a connection that reached
//! `flow add @ft`, is eligible (`flow::eligible`) and whose route goes
//! between devices of that flowtable; `nf_flow_offload_gc_step` /
//! `flow_offload_teardown` (nf_flow_table_core.c) take it off when it ends.

use std::fmt;

use crate::conntrack::{tcp_state, CtEntry};
use crate::flow::{awaits_later_packet, eligible, Direction, Held, Hold, Ineligible, TeardownReason};
use crate::routes::path::{NoPath, Ports};

use super::exclude::{Excluded, Exclusions};
use super::nft::{has_label, Flowtable};

/// The user's rules.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// Connections never offloaded (`[exclude]` of the config file).
    pub exclude: &'a Exclusions,
    /// `run --nft`: the ruleset's flowtables; only connections that reached
    /// one's `flow add` (its label bit) are offloaded, between its devices.
    /// `None` (`--iface`, `--config`): every eligible connection between
    /// the managed interfaces.
    pub flowtables: Option<&'a [Flowtable]>,
}

impl Rules<'_> {
    /// Did the ruleset ask for this connection to be offloaded?
    pub fn requested(&self, e: &CtEntry) -> bool {
        match self.flowtables {
            None => true,
            Some(fts) => fts.iter().any(|ft| has_label(e.labels.as_ref(), ft.label_bit)),
        }
    }

    /// A flowtable the connection was added to lists both devices (the
    /// kernel's flowtable hooks only its own devices).
    fn admits(&self, e: &CtEntry, devices: [Option<&str>; 2]) -> bool {
        let Some(fts) = self.flowtables else { return true };
        fts.iter().any(|ft| {
            has_label(e.labels.as_ref(), ft.label_bit)
                && devices.iter().all(|d| d.is_some_and(|d| ft.devices.iter().any(|x| x == d)))
        })
    }
}

/// What the engine does with the connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    Untracked,
    /// Eligible and requested; its path was not resolvable yet.
    Waiting {
        mark: u32,
    },
    /// On the fast path. `close` is the fast path's FO_TD_* flag (a FIN or
    /// RST it saw), 0 if none. `dormant`: the directions (original, reply)
    /// still without evidence since it came back from `Dormant`, held
    /// (`Hold::Dormant`) until the kernel is seen forwarding one of their
    /// own packets.
    Offloaded {
        mark: u32,
        close: u32,
        dormant: [bool; 2],
    },
    /// Taken off while still alive (idle, route change, link down, ruleset
    /// change); `woke`, per direction (original, reply): the kernel,
    /// applying the current ruleset, forwarded a packet of that direction
    /// since it slept and since the last change of the world (TC egress saw
    /// it leave). Never a packet that merely arrived: the kernel may have
    /// dropped it. Nor a packet of the other direction: a drop rule may
    /// cover only one (a blocked client, a server retransmitting to it). In
    /// `--nft` mode a dormant connection has its label cleared and is
    /// `Untracked`: the label set anew by `flow add` is the evidence, and it
    /// comes back as a new request.
    Dormant {
        mark: u32,
        woke: [bool; 2],
    },
    /// `--nft` mode's dormant connection: its flowtable label was cleared
    /// and only its return counts. The label set again is the ruleset's
    /// `flow add` taking a packet of it, the evidence a `Dormant` one waits
    /// for; no label, and the event is the engine's own clear or about
    /// something else.
    Asleep,
}

impl Known {
    fn mark(&self) -> Option<u32> {
        match *self {
            Known::Untracked | Known::Asleep => None,
            Known::Waiting { mark } | Known::Offloaded { mark, .. } | Known::Dormant { mark, .. } => Some(mark),
        }
    }
}

/// What holds a direction on the slow path (`flow::Hold`): xfrm policies,
/// hooks on its devices. `dir` 0 is the original direction, 1 the reply;
/// `d` arrives on `d.key.ifindex` and leaves by `d.val.out_ifindex`.
pub trait Holds {
    fn held(&self, e: &CtEntry, dir: usize, d: &Direction) -> Option<Held>;
}

/// Facts about the world.
#[derive(Clone, Copy)]
pub struct World<'a> {
    pub ports: &'a dyn Ports,
    pub holds: &'a dyn Holds,
    /// Both directions' path, once resolved (`routes::path`); `None`: not
    /// asked yet (the verdict says `NeedsPath` when it needs it).
    pub path: Option<&'a Result<[Direction; 2], NoPath>>,
}

/// Why a connection that asked for offload is not offloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotOffloaded {
    /// An `[exclude]` rule matched.
    Excluded(Excluded),
    Ineligible(Ineligible),
    NoPath(NoPath),
    NotInFlowtable,
    /// Found when applying: the flow map is full.
    TableFull,
    /// Found when applying: the kernel had no memory for the map entry
    /// (the engine's memory cgroup or the host is out).
    NoMemory,
    /// Found when applying: conntrack refused the liberal-TCP update.
    ConntrackUpdateFailed,
    /// Found when applying: a direction's flow key is another connection's
    /// map entry (installs never overwrite one).
    KeyCollision,
    /// Both directions must go through the kernel (original, reply).
    Held(Box<[Held; 2]>),
}

impl NotOffloaded {
    /// A stable name for the kind of reason, for scripts and metrics (the
    /// text says the particulars: which rule, which route).
    pub fn code(&self) -> &'static str {
        match self {
            NotOffloaded::Excluded(_) => "excluded",
            NotOffloaded::Ineligible(_) => "ineligible",
            NotOffloaded::NoPath(_) => "no_path",
            NotOffloaded::NotInFlowtable => "not_in_flowtable",
            NotOffloaded::TableFull => "table_full",
            NotOffloaded::NoMemory => "no_memory",
            NotOffloaded::ConntrackUpdateFailed => "conntrack_update_failed",
            NotOffloaded::KeyCollision => "key_collision",
            NotOffloaded::Held(_) => "held",
        }
    }
}

impl fmt::Display for NotOffloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotOffloaded::Excluded(rule) => rule.fmt(f),
            NotOffloaded::Ineligible(i) => f.write_str(i.as_str()),
            NotOffloaded::NoPath(p) => p.fmt(f),
            NotOffloaded::NotInFlowtable => f.write_str("interfaces not in the flowtable the connection was added to"),
            NotOffloaded::TableFull => f.write_str("flow table full"),
            NotOffloaded::NoMemory => f.write_str("no kernel memory for its flow table entries"),
            NotOffloaded::ConntrackUpdateFailed => f.write_str("conntrack update failed"),
            NotOffloaded::KeyCollision => f.write_str("flow key already used by another connection"),
            NotOffloaded::Held(h) if h[0] == h[1] => write!(f, "both directions: {}", h[0]),
            NotOffloaded::Held(h) => write!(f, "original: {}; reply: {}", h[0], h[1]),
        }
    }
}

/// No PartialEq: the generated map types have none. Large, but it lives on
/// the stack for one call and is never stored.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Verdict {
    /// Not ours (never reached `flow add`): nothing to do.
    Ignore,
    /// Not eligible yet (e.g. TCP handshake): a later event brings it
    /// back; stop waiting for it, count nothing.
    NotYet(Ineligible),
    /// Stays as it is; remember the new entry.
    Update,
    /// Everything else allows it: resolve the path and ask again.
    NeedsPath,
    /// Its path is about to exist (neighbour resolving): retry soon.
    Wait(NoPath),
    /// Install (or, when offloaded, re-point) both directions.
    Offload([Direction; 2]),
    /// Eligible and routed, but the kernel has handled only its first
    /// packet (`flow::awaits_later_packet`): watched like a dormant
    /// connection (by these directions' egress keys, or in `--nft` mode its
    /// label cleared) until the kernel forwards another.
    Watch([Direction; 2]),
    /// Off the fast path, or stop tracking it.
    Teardown(TeardownReason),
    /// Final: counted under this reason in `status`.
    NotOffloaded(NotOffloaded),
}

/// The verdict for connection `e` (a merged, full view).
pub fn verdict(e: &CtEntry, known: &Known, rules: &Rules, world: &World) -> Verdict {
    let requested = rules.requested(e);
    // The user's ruleset changed its mind about this connection (our label
    // cleared, its mark changed): the kernel's firewall decides again.
    if rules.flowtables.is_some() && known.mark().is_some_and(|m| !requested || m != e.mark) {
        return Verdict::Teardown(TeardownReason::Policy);
    }
    if !requested {
        return Verdict::Ignore;
    }
    if let Some(why) = rules.exclude.excludes(e) {
        return match known {
            Known::Untracked | Known::Waiting { .. } | Known::Asleep => {
                Verdict::NotOffloaded(NotOffloaded::Excluded(why))
            }
            _ => Verdict::Teardown(TeardownReason::Policy),
        };
    }
    let ineligible = eligible(e).err();
    match *known {
        Known::Offloaded { close, dormant, .. } => match (ineligible, world.path) {
            (Some(_), _) => Verdict::Teardown(closing(close, e.tcp_state)),
            // Rules on fwmark route on the mark: follow it (in --nft mode a
            // changed mark already took it off above).
            (None, None) if known.mark() != Some(e.mark) => Verdict::NeedsPath,
            (None, None) => Verdict::Update,
            (None, Some(Ok(dirs))) if admitted(e, dirs, rules, world) => match with_holds(e, dirs, world, dormant) {
                Ok(dirs) => Verdict::Offload(dirs),
                Err(_) => Verdict::Teardown(TeardownReason::Held),
            },
            (None, Some(_)) => Verdict::Teardown(TeardownReason::RouteChange),
        },
        Known::Dormant { woke, .. } => match ineligible {
            Some(_) => Verdict::Teardown(TeardownReason::NoLongerEligible),
            None if woke == [false, false] => Verdict::Update,
            // Back, with the directions not seen forwarded held.
            None => candidate(e, rules, world, woke.map(|w| !w)),
        },
        Known::Untracked | Known::Waiting { .. } | Known::Asleep => match ineligible {
            // Every connection passes through these on its way to
            // ESTABLISHED: not a final verdict.
            Some(i @ (Ineligible::TcpNotEstablished | Ineligible::NotAssured)) => Verdict::NotYet(i),
            Some(i) => Verdict::NotOffloaded(NotOffloaded::Ineligible(i)),
            // An asleep connection's label set again is its later packet.
            None => match candidate(e, rules, world, [false, false]) {
                Verdict::Offload(dirs) if *known != Known::Asleep && awaits_later_packet(e) => Verdict::Watch(dirs),
                v => v,
            },
        },
    }
}

/// Eligible, requested, not excluded: the path decides. `dormant`: the
/// directions to hold until they have evidence of their own.
fn candidate(e: &CtEntry, rules: &Rules, world: &World, dormant: [bool; 2]) -> Verdict {
    match world.path {
        None => Verdict::NeedsPath,
        Some(Err(p)) if p.transient() => Verdict::Wait(p.clone()),
        Some(Err(p)) => Verdict::NotOffloaded(NotOffloaded::NoPath(p.clone())),
        Some(Ok(dirs)) if admitted(e, dirs, rules, world) => match with_holds(e, dirs, world, dormant) {
            Ok(dirs) => Verdict::Offload(dirs),
            Err(held) => Verdict::NotOffloaded(held),
        },
        Some(Ok(_)) => Verdict::NotOffloaded(NotOffloaded::NotInFlowtable),
    }
}

/// The resolved directions with their holds set; both held is no offload,
/// unless a direction is only waiting for evidence (`dormant`): then the
/// connection stays installed, both directions with the kernel, so that
/// evidence can still release the dormant one.
fn with_holds(
    e: &CtEntry,
    dirs: &[Direction; 2],
    world: &World,
    dormant: [bool; 2],
) -> Result<[Direction; 2], NotOffloaded> {
    let mut out = *dirs;
    let held = [0, 1].map(|i| world.holds.held(e, i, &dirs[i]).or_else(|| dormant[i].then(Held::dormant)));
    for (d, h) in out.iter_mut().zip(&held) {
        d.set_hold(h.as_ref().map(|h| h.hold));
    }
    match held {
        [Some(a), Some(b)] if a.hold != Hold::Dormant && b.hold != Hold::Dormant => {
            Err(NotOffloaded::Held(Box::new([a, b])))
        }
        _ => Ok(out),
    }
}

fn admitted(e: &CtEntry, dirs: &[Direction; 2], rules: &Rules, world: &World) -> bool {
    rules.admits(e, dirs.map(|d| world.ports.listed_name(d.key.ifindex, &d.encap().0)))
}

/// Why an offloaded connection that stopped being eligible ends: the fast
/// path's FIN/RST flag first, then conntrack's TCP state.
fn closing(close: u32, state: Option<u8>) -> TeardownReason {
    match (TeardownReason::from_fast_path(close), state) {
        (Some(r), _) => r,
        (None, Some(s)) if s > tcp_state::ESTABLISHED => TeardownReason::TcpFin,
        _ => TeardownReason::NoLongerEligible,
    }
}

#[cfg(test)]
mod tests;
