//! What holds a direction of a connection on the slow path
//! (`flow::Hold`): the engine's facts about what the fast path would skip.
//! Each source owns its facts and a pure per-direction test; `held` asks
//! them in order. When a source's facts change, the engine calls
//! `Core::facts_changed`, and every offloaded and waiting connection is
//! judged again (its holds recomputed, flipped in place in the map).

use crate::conntrack::CtEntry;
use crate::flow::{Direction, Held, Hold};
use crate::hooks::{HookFacts, Side};
use crate::policy::verdict::Holds;

#[derive(Default)]
pub(super) struct HoldFacts {
    /// tc filters, nftables device chains and (XDP) shapers on the managed
    /// ports (`hooks`), re-read on RTMGRP_TC and nf_tables notifications.
    pub hooks: HookFacts,
}

impl Holds for HoldFacts {
    fn held(&self, _e: &CtEntry, _dir: usize, d: &Direction) -> Option<Held> {
        self.hooks.bypass(d.key.ifindex, d.val.out_ifindex).map(|b| Held {
            hold: match b.side {
                Side::Ingress => Hold::IngressHook,
                Side::Egress => Hold::EgressHook,
            },
            why: b.why,
        })
    }
}
