//! What holds a direction of a connection on the slow path
//! (`flow::Hold`): the engine's facts about what the fast path would skip.
//! Each source owns its facts and a pure per-direction test; `held` asks
//! them in order. When a source's facts change, the engine calls
//! `Core::facts_changed`, and every offloaded and waiting connection is
//! judged again (its holds recomputed, flipped in place in the map).

use std::collections::BTreeMap;

use crate::conntrack::CtEntry;
use crate::dataplane::Mode;
use crate::flow::{Direction, Held, Hold};
use crate::hooks::{self, HookFacts, Port, Side};
use crate::policy::verdict::Holds;
use crate::policy::xdp::{self, PortFacts, Target};
use crate::routes::link::LinkTable;
use crate::xfrm::{self, Spd};

#[derive(Default)]
pub(super) struct HoldFacts {
    /// The xfrm policies (`xfrm::watch`): a direction the kernel would
    /// encrypt, or drop for xfrm, is the kernel's.
    pub xfrm: Spd,
    /// tc filters, nftables device chains and (XDP) shapers on the managed
    /// ports (`hooks`), re-read on RTMGRP_TC and nf_tables notifications.
    pub hooks: HookFacts,
    /// Whether each XDP port takes XDP redirects, asked at start, on link
    /// changes and every second (`Core::probe_xdp_targets`).
    pub xdp: XdpTargets,
}

/// The ports running XDP, by ifindex: name and whether they take XDP
/// redirects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct XdpTargets(pub BTreeMap<u32, (String, Target)>);

impl XdpTargets {
    /// A direction arriving by XDP on `input` and leaving by `output` that
    /// cannot take the redirect: why, and the remedy.
    fn refuses(&self, input: u32, output: u32) -> Option<String> {
        self.0.get(&input)?;
        match self.0.get(&output)? {
            (_, Target::Takes(_)) => None,
            (name, Target::Refuses { why, remedy }) => {
                Some(format!("{name} cannot take XDP redirects: {why}; remedy: {remedy}"))
            }
        }
    }
}

impl Holds for HoldFacts {
    fn held(&self, _e: &CtEntry, _dir: usize, d: &Direction) -> Option<Held> {
        if let Some(a) = xfrm::applies(&self.xfrm, &xfrm::Route::of(d)) {
            return Some(Held { hold: Hold::Xfrm, why: a.to_string() });
        }
        if let Some(b) = self.hooks.bypass(d.key.ifindex, d.val.out_ifindex) {
            return Some(Held {
                hold: match b.side {
                    Side::Ingress => Hold::IngressHook,
                    Side::Egress => Hold::EgressHook,
                },
                why: b.why,
            });
        }
        self.xdp.refuses(d.key.ifindex, d.val.out_ifindex).map(|why| Held { hold: Hold::XdpTarget, why })
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

impl super::Core {
    /// Ask each port running XDP whether it takes XDP redirects (a veth
    /// whose peer gained or lost NAPI, a driver that does not) and whether
    /// its frames may carry partial checksums (a veth whose peer sends with
    /// TX checksum offload): at start, after link changes and every second,
    /// so a direction is never fast-pathed into a target that drops it, or
    /// a partial checksum forwarded, for longer than that. A target change
    /// re-judges every connection (holds flip in place); the checksum flag
    /// is the fast path's to apply per packet (fo_csum_ports). A veth's
    /// peer is read where it is: the namespace, once found, is kept.
    pub(super) fn probe_xdp_targets(&mut self) {
        let ports: Vec<(u32, String, String)> = (self.ifaces.0.iter())
            .filter(|i| i.mode == Mode::Xdp)
            .map(|i| (i.ifindex, i.name.clone(), i.driver.clone()))
            .collect();
        if ports.is_empty() && self.holds.xdp.0.is_empty() {
            return;
        }
        let table = match LinkTable::dump() {
            Ok(t) => t,
            Err(e) => return tracing::warn!("reading the links to ask the XDP ports: {e:#}"),
        };
        let mut now = XdpTargets::default();
        for (ifindex, name, driver) in ports {
            let Some(l) = table.get(ifindex) else { continue };
            let f = PortFacts::read(&table, l, &driver, true);
            let t = xdp::target(&f);
            let prev = self.holds.xdp.0.get(&ifindex).map(|(_, t)| t);
            if prev != Some(&t) {
                match &t {
                    Target::Takes(how) => tracing::info!(iface = %name, "takes XDP redirects: {how}"),
                    Target::Refuses { why, remedy } => tracing::warn!(
                        iface = %name,
                        "cannot take XDP redirects: {why}; directions leaving by it stay on the slow path; {remedy}"
                    ),
                }
            }
            let partial = xdp::partial_csum(&f);
            if partial != self.csum_ports.contains(&ifindex) {
                if partial {
                    tracing::info!(
                        iface = %name,
                        "its peer sends with TX checksum offload: segments with a partial checksum go to the kernel \
                         (csum_partial)"
                    );
                    self.csum_ports.insert(ifindex);
                } else {
                    self.csum_ports.remove(&ifindex);
                }
            }
            if let Err(e) = self.flows.dp().set_csum_port(ifindex, partial) {
                tracing::warn!(iface = %name, "{e:#}");
            }
            now.0.insert(ifindex, (name, t));
        }
        for s in self.ifaces.0.iter_mut() {
            s.xdp_target = now.0.get(&s.ifindex).map(|(_, t)| t.to_string());
        }
        if now != self.holds.xdp {
            self.holds.xdp = now;
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
        };
        let mut wan = DeviceHooks { name: "rwan".into(), ..Default::default() };
        wan.ingress_chains.push("netdev t i".into());
        wan.egress_chains.push("netdev t e".into());
        let lan = DeviceHooks { name: "rlan".into(), ..Default::default() };
        let h =
            HoldFacts { hooks: HookFacts { ports: [(3, lan), (4, wan)].into_iter().collect() }, ..Default::default() };
        // (XDP targets below.)
        let e = crate::flow::tests::tcp_masq();
        let down = h.held(&e, 1, &dir(4, 3)).expect("arrives on rwan");
        assert_eq!(down.hold, Hold::IngressHook);
        assert!(down.why.starts_with("nft chain netdev t i on rwan ingress"), "{}", down.why);
        let up = h.held(&e, 0, &dir(3, 4)).expect("leaves by rwan");
        assert_eq!(up.hold, Hold::EgressHook);
        assert_eq!(h.held(&e, 0, &dir(3, 9)), None, "neither port hooked");
    }

    /// XDP in and a target that refuses: held, naming the target, the
    /// cause and the remedy; a target that takes, or TC in, is not.
    #[test]
    fn xdp_targets_hold_what_would_be_lost() {
        let dir = |ifindex, out_ifindex| Direction {
            key: fo_flow_key { ifindex, ..Default::default() },
            val: fo_flow { out_ifindex, ..Default::default() },
        };
        let refuses =
            Target::Refuses { why: "its peer wan0 has no NAPI".into(), remedy: "ethtool -K wan0 gro on".into() };
        let h = HoldFacts {
            xdp: XdpTargets(
                [
                    (3, ("rlan".to_string(), Target::Takes("peer has GRO on".into()))),
                    (4, ("rwan".to_string(), refuses)),
                ]
                .into_iter()
                .collect(),
            ),
            ..Default::default()
        };
        let e = crate::flow::tests::tcp_masq();
        let up = h.held(&e, 0, &dir(3, 4)).expect("into rwan");
        assert_eq!(up.hold, Hold::XdpTarget);
        assert_eq!(up.why, "rwan cannot take XDP redirects: its peer wan0 has no NAPI; remedy: ethtool -K wan0 gro on");
        assert_eq!(h.held(&e, 1, &dir(4, 3)), None, "into rlan, which takes them");
        assert_eq!(h.held(&e, 0, &dir(9, 4)), None, "not arriving by XDP");
    }
}
