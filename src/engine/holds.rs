//! What holds a direction of a connection on the slow path
//! (`flow::Hold`): the engine's facts about what the fast path would skip.
//! Each source owns its facts and a pure per-direction test; `held` asks
//! them in order. When a source's facts change, the engine calls
//! `Core::facts_changed`, and every offloaded and waiting connection is
//! judged again (its holds recomputed, flipped in place in the map).

use crate::conntrack::CtEntry;
use crate::flow::{Direction, Held};
use crate::policy::verdict::Holds;

#[derive(Default)]
pub(super) struct HoldFacts {}

impl Holds for HoldFacts {
    fn held(&self, _e: &CtEntry, _dir: usize, _d: &Direction) -> Option<Held> {
        None
    }
}
