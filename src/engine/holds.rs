//! What holds a direction of a connection on the slow path
//! (`flow::Hold`): the engine's facts about what the fast path would skip.
//! Each source owns its facts and a pure per-direction test; `held` asks
//! them in order. When a source's facts change, the engine calls
//! `Core::facts_changed`, and every offloaded and waiting connection is
//! judged again (its holds recomputed, flipped in place in the map).

use crate::conntrack::CtEntry;
use crate::flow::{Direction, Held, Hold};
use crate::policy::verdict::Holds;
use crate::xfrm::{self, Spd};

#[derive(Default)]
pub(super) struct HoldFacts {
    /// The xfrm policies (`xfrm::watch`): a direction the kernel would
    /// encrypt, or drop for xfrm, is the kernel's.
    pub xfrm: Spd,
}

impl Holds for HoldFacts {
    fn held(&self, _e: &CtEntry, _dir: usize, d: &Direction) -> Option<Held> {
        xfrm::applies(&self.xfrm, &xfrm::Route::of(d)).map(|a| Held { hold: Hold::Xfrm, why: a.to_string() })
    }
}

impl super::Core {
    /// XFRMNLGRP_POLICY said something (or overran): read the SPD again,
    /// and if it differs, judge the connections again.
    pub(super) fn on_xfrm_change(&mut self) {
        let spd = xfrm::read_spd();
        if spd != self.holds.xfrm {
            tracing::info!(policies = spd.policies.len(), unknown = ?spd.unknown, "xfrm policies changed");
            self.holds.xfrm = spd;
            self.facts_changed();
        }
    }
}
