//! What holds a direction of a connection on the slow path
//! (`flow::Hold`): the engine's facts about what the fast path would skip.
//! Each source owns its facts and a pure per-direction test; `held` asks
//! them in order. When a source's facts change, the engine calls
//! `Core::facts_changed`, and every offloaded and waiting connection is
//! judged again (its holds recomputed, flipped in place in the map).

use crate::conntrack::CtEntry;
use crate::dataplane::Mode;
use crate::flow::{Direction, Held, Hold};
use crate::hooks::{self, HookFacts, Port, Side};
use crate::policy::verdict::Holds;
use crate::xfrm::{self, Spd};

#[derive(Default)]
pub(super) struct HoldFacts {
    /// The xfrm policies (`xfrm::watch`): a direction the kernel would
    /// encrypt, or drop for xfrm, is the kernel's.
    pub xfrm: Spd,
    /// tc filters, nftables device chains and (XDP) shapers on the managed
    /// ports (`hooks`), re-read on RTMGRP_TC and nf_tables notifications.
    pub hooks: HookFacts,
}

impl Holds for HoldFacts {
    fn held(&self, _e: &CtEntry, _dir: usize, d: &Direction) -> Option<Held> {
        if let Some(a) = xfrm::applies(&self.xfrm, &xfrm::Route::of(d)) {
            return Some(Held { hold: Hold::Xfrm, why: a.to_string() });
        }
        self.hooks.bypass(d.key.ifindex, d.val.out_ifindex).map(|b| Held {
            hold: match b.side {
                Side::Ingress => Hold::IngressHook,
                Side::Egress => Hold::EgressHook,
            },
            why: b.why,
        })
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

    /// Read the managed ports' device hooks again (a tc or nf_tables change,
    /// a link event, or a retry after they could not be read); a change
    /// re-judges.
    pub(super) fn read_hooks(&mut self) {
        let managed: Vec<String> = self.ifaces.0.iter().map(|i| i.name.clone()).collect();
        let ports: Vec<Port> = self
            .ifaces
            .0
            .iter()
            .map(|i| Port {
                ifindex: i.ifindex,
                name: i.name.clone(),
                xdp: i.mode == Mode::Xdp,
                bridge: self.facts.topo.bridge_of(i.ifindex),
                uppers: self.facts.topo.uppers_named(i.ifindex, &managed),
            })
            .collect();
        // Our own cls_bpf filters (clsact where there is no TCX) are not
        // hooks the fast path skips.
        let own = self.flows.dp().own_prog_ids();
        let new = hooks::read(&ports, &|p| own.contains(&p.id));
        if new != self.holds.hooks {
            for (dev, what) in new.summary() {
                tracing::info!(iface = %dev, hooks = %what.join("; "), "the fast path steps aside for these");
            }
            self.holds.hooks = new;
            self.facts_changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{fo_flow, fo_flow_key};
    use crate::hooks::DeviceHooks;

    /// The hooks' side becomes the hold code the fast path counts by, and
    /// the direction is found by its input and output ports.
    #[test]
    fn device_hooks_hold_by_side() {
        let dir = |ifindex, out_ifindex| Direction {
            key: fo_flow_key { ifindex, ..Default::default() },
            val: fo_flow { out_ifindex, ..Default::default() },
            route_ifindex: out_ifindex,
        };
        let mut wan = DeviceHooks { name: "rwan".into(), ..Default::default() };
        wan.ingress_chains.push("netdev t i".into());
        wan.egress_chains.push("netdev t e".into());
        let lan = DeviceHooks { name: "rlan".into(), ..Default::default() };
        let h =
            HoldFacts { hooks: HookFacts { ports: [(3, lan), (4, wan)].into_iter().collect() }, ..Default::default() };
        let e = crate::flow::tests::tcp_masq();
        let down = h.held(&e, 1, &dir(4, 3)).expect("arrives on rwan");
        assert_eq!(down.hold, Hold::IngressHook);
        assert!(down.why.starts_with("nft chain netdev t i on rwan ingress"), "{}", down.why);
        let up = h.held(&e, 0, &dir(3, 4)).expect("leaves by rwan");
        assert_eq!(up.hold, Hold::EgressHook);
        assert_eq!(h.held(&e, 0, &dir(3, 9)), None, "neither port hooked");
    }
}
