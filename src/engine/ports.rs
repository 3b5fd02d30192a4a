//! The managed interfaces: which are attached, in which mode, and whether
//! they are up. One attach routine serves start and reload.

use anyhow::{bail, Result};

use crate::control::IfaceStatus;
use crate::dataplane::{fo_below, Dataplane, Mode};
use crate::policy::{choose_modes, xdp_refused, ModeChoice, ModeDecision};
use crate::routes::link::{self, LinkInfo};
use crate::routes::path::Ports;
use crate::topology::{pppoe_uppers, watch_below, Below, PppoeUpper};

#[derive(Debug, Default, Clone)]
pub struct Interfaces(pub Vec<IfaceStatus>);

impl Ports for Interfaces {
    fn is_up(&self, ifindex: u32) -> bool {
        self.get(ifindex).is_some_and(|i| i.up)
    }

    fn first_up(&self) -> Option<u32> {
        self.0.iter().find(|i| i.up).map(|i| i.ifindex)
    }

    fn name(&self, ifindex: u32) -> Option<&str> {
        self.get(ifindex).map(|i| i.name.as_str())
    }

    fn listed_name(&self, ifindex: u32) -> Option<&str> {
        self.get(ifindex).map(|i| i.stands_for.as_deref().unwrap_or(&i.name))
    }
}

impl Interfaces {
    pub fn get(&self, ifindex: u32) -> Option<&IfaceStatus> {
        self.0.iter().find(|i| i.ifindex == ifindex)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|i| i.name == name)
    }

    /// A link event: returns true if a managed interface went down.
    pub fn set_up(&mut self, ifindex: u32, up: bool) -> bool {
        let Some(i) = self.0.iter_mut().find(|i| i.ifindex == ifindex) else { return false };
        if i.up != up {
            tracing::info!(iface = %i.name, up, "link state changed");
        }
        i.up = up;
        !up
    }

    /// Attach the fast path to every interface in `infos`, each in the mode
    /// `choose_modes` gives it. All or nothing: on an error, what this call
    /// attached is detached again and the error says which one failed.
    ///
    /// XDP is native only; when `auto` chose it and a driver turns out to
    /// have none, every interface of this call gets TC instead (an XDP
    /// redirect only reaches XDP interfaces), never generic XDP.
    pub fn attach(&mut self, dp: &mut Dataplane, infos: &[LinkInfo], mode: ModeChoice) -> Result<Vec<u32>> {
        if matches!(mode, ModeChoice::Xdp) {
            if let Some(why) = infos.iter().find_map(xdp_refused) {
                bail!("{why}");
            }
        }
        let decisions = choose_modes(infos, mode);
        match self.attach_as(dp, infos, decisions.clone()) {
            Err((e, Mode::Xdp)) if matches!(mode, ModeChoice::Auto) => {
                tracing::warn!("{e:#}; using TC");
                let why = format!("auto: native XDP unavailable ({e})");
                let tc = decisions.into_iter().map(|_| ModeDecision { mode: Mode::Tc, reason: why.clone() }).collect();
                self.attach_as(dp, infos, tc).map_err(|(e, _)| e)
            }
            r => r.map_err(|(e, _)| e),
        }
    }

    /// Attach each interface as decided; on an error, what was attached is
    /// detached and the failing mode comes with the error.
    fn attach_as(
        &mut self,
        dp: &mut Dataplane,
        infos: &[LinkInfo],
        decisions: Vec<ModeDecision>,
    ) -> Result<Vec<u32>, (anyhow::Error, Mode)> {
        let mut added = Vec::new();
        for (info, d) in infos.iter().zip(decisions) {
            if let Err(e) = dp.attach(info.ifindex, &info.name, d.mode, info.link_type) {
                self.detach(dp, &added);
                return Err((e, d.mode));
            }
            tracing::info!(iface = %info.name, mode = d.mode.as_str(), reason = %d.reason, "attached");
            added.push(info.ifindex);
            self.0.push(status_of(info, d));
        }
        Ok(added)
    }

    pub fn detach(&mut self, dp: &mut Dataplane, ifindexes: &[u32]) {
        for i in ifindexes {
            dp.detach(*i);
        }
        self.0.retain(|i| !ifindexes.contains(&i.ifindex));
    }
}

fn status_of(info: &LinkInfo, d: ModeDecision) -> IfaceStatus {
    IfaceStatus {
        name: info.name.clone(),
        ifindex: info.ifindex,
        driver: info.driver.clone(),
        mode: d.mode,
        reason: d.reason,
        up: info.up,
        // Filled in by `status` from the current topology.
        topology: String::new(),
        stands_for: None,
        attach: String::new(),
    }
}

impl super::Core {
    /// Attach TC to the ppp devices `pppoe_uppers` names now, detach the
    /// ones it no longer names (a PPPoE reconnect makes a new ppp device).
    /// Called after the topology is read or changed.
    pub(super) fn sync_pppoe_uppers(&mut self) {
        let implied = &self.pppoe_uppers;
        let managed = |i: u32| self.ifaces.get(i).is_some() && !implied.contains(&i);
        let tc_port = |i: u32| self.ifaces.get(i).is_some_and(|p| p.mode == Mode::Tc);
        let want = pppoe_uppers(&self.facts.topo, managed, tc_port);
        let gone: Vec<u32> = implied.iter().copied().filter(|i| !want.iter().any(|w| w.ifindex == *i)).collect();
        if !gone.is_empty() {
            self.ifaces.detach(self.flows.dp_mut(), &gone);
            self.pppoe_uppers.retain(|i| !gone.contains(i));
            tracing::info!(?gone, "PPPoE devices no longer above a TC port: detached");
        }
        let new: Vec<PppoeUpper> = want.into_iter().filter(|w| !self.pppoe_uppers.contains(&w.ifindex)).collect();
        for w in new {
            let info = match link::info(&w.name) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(iface = %w.name, "PPPoE device above {}: {e:#}", w.port);
                    continue;
                }
            };
            match self.ifaces.attach(self.flows.dp_mut(), std::slice::from_ref(&info), ModeChoice::Tc) {
                Ok(_) => {
                    if let Some(s) = self.ifaces.0.iter_mut().find(|s| s.ifindex == w.ifindex) {
                        s.stands_for = Some(w.port.clone());
                        s.reason = format!(
                            "TC on the PPPoE device above {}, which runs TC: TC cannot take a PPPoE header off or \
                             push one on a GSO packet, the ppp device does",
                            w.port
                        );
                    }
                    self.pppoe_uppers.push(w.ifindex);
                }
                Err(e) => tracing::warn!(iface = %w.name, "PPPoE device above {}: {e:#}", w.port),
            }
        }
        self.sync_watch_below();
    }

    /// Tell each managed device's egress watcher what it leaves to a
    /// managed device above it (`topology::watch_below`). After any change
    /// of the managed devices or the topology.
    pub(super) fn sync_watch_below(&mut self) {
        let managed: Vec<u32> = self.ifaces.0.iter().map(|i| i.ifindex).collect();
        let below: Vec<(u32, fo_below)> = watch_below(&self.facts.topo, &managed)
            .into_iter()
            .map(|(i, b)| {
                (
                    i,
                    match b {
                        Below::Encap => fo_below::FO_BELOW_ENCAP,
                        Below::All => fo_below::FO_BELOW_ALL,
                    },
                )
            })
            .collect();
        self.flows.dp().set_watch_below(&below);
    }
}

/// Facts about each named interface; a name given twice or missing is an
/// error.
pub fn gather(names: &[String]) -> Result<Vec<LinkInfo>> {
    let mut infos: Vec<LinkInfo> = Vec::new();
    for name in names {
        if infos.iter().any(|i| &i.name == name) {
            bail!("interface {name} given twice");
        }
        infos.push(link::info(name)?);
    }
    Ok(infos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Mode;

    fn iface(name: &str, ifindex: u32, up: bool) -> IfaceStatus {
        IfaceStatus {
            name: name.into(),
            ifindex,
            driver: "veth".into(),
            mode: Mode::Tc,
            reason: String::new(),
            up,
            topology: String::new(),
            stands_for: None,
            attach: String::new(),
        }
    }

    #[test]
    fn ports_and_link_state() {
        let mut p = Interfaces(vec![iface("lan", 3, false), iface("wan", 4, true)]);
        assert_eq!(p.first_up(), Some(4));
        assert!(!p.is_up(3) && p.is_up(4) && !p.is_up(9), "unmanaged counts as down");
        assert_eq!((p.name(3), p.name(9)), (Some("lan"), None));
        assert!(p.has("wan") && !p.has("dmz"));
        // link events: only a managed interface going down asks for teardowns
        assert!(!p.set_up(3, true));
        assert!(p.is_up(3));
        assert!(p.set_up(4, false));
        assert!(!p.set_up(9, false), "not ours");
        assert_eq!(p.first_up(), Some(3));
    }

    #[test]
    fn gather_refuses_duplicates_and_missing_interfaces() {
        let e = gather(&["lo".into(), "lo".into()]).unwrap_err().to_string();
        assert_eq!(e, "interface lo given twice");
        let e = gather(&["nfo-no-such0".into()]).unwrap_err().to_string();
        assert!(e.contains("nfo-no-such0"), "{e}");
    }
}
