//! The managed interfaces: which are attached, in which mode, and whether
//! they are up. One attach routine serves start and reload.

use anyhow::{anyhow, bail, Context, Result};

use crate::control::IfaceStatus;
use crate::dataplane::{fo_below, Dataplane, Mode};
use crate::flow::EncapStack;
use crate::policy::xdp::{self, PortFacts, Tags};
use crate::policy::{choose_modes, xdp_refused, ModeChoice, ModeDecision};
use crate::routes::link::{self, LinkInfo, LinkTable};
use crate::routes::path::Ports;
use crate::topology::{pppoe_uppers, watch_below, Below, PppoeUpper, Topology};

/// The attached ports, and the listed devices some of them serve.
#[derive(Debug, Default, Clone)]
pub struct Interfaces(pub Vec<IfaceStatus>, pub Vec<Served>);

/// A listed VLAN or ppp device served by XDP on the Ethernet device
/// beneath it (`Topology::beneath`): only frames with its headers there
/// are its connections. The kernel flowtable keys a flow by its input
/// device and headers the same way (flow_offload_tuple's iifidx and
/// encap[]), so listing wan.7 never offloads wan.8 or wan untagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The port it is served on.
    pub port: u32,
    pub name: String,
    /// Its headers on the port, outermost first; None while its stack does
    /// not lead there (the device is gone, or a PPPoE session is being
    /// re-established): nothing of it is offloaded then.
    pub encap: Option<EncapStack>,
}

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

    fn listed_name(&self, ifindex: u32, encap: &EncapStack) -> Option<&str> {
        let i = self.get(ifindex)?;
        if let Some(s) = self.1.iter().find(|s| s.port == ifindex && s.encap.as_ref() == Some(encap)) {
            return Some(&s.name);
        }
        i.listed.then(|| i.stands_for.as_deref().unwrap_or(&i.name))
    }
}

impl Interfaces {
    pub fn get(&self, ifindex: u32) -> Option<&IfaceStatus> {
        self.0.iter().find(|i| i.ifindex == ifindex)
    }

    /// Attached, or served through a port that is.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|i| i.name == name && i.listed) || self.1.iter().any(|s| s.name == name)
    }

    /// Keep what `wanted` (the listed devices after a reload) still names:
    /// served devices no longer listed are dropped, a port no longer listed
    /// but still serving one stays for it. Returns the ports to detach.
    pub fn keep_only(&mut self, wanted: &[String]) -> Vec<u32> {
        self.1.retain(|s| wanted.contains(&s.name));
        for i in self.0.iter_mut() {
            i.listed &= wanted.contains(&i.name) || i.stands_for.is_some();
        }
        let served = &self.1;
        let gone: Vec<u32> = (self.0.iter())
            .filter(|i| !i.listed && !served.iter().any(|s| s.port == i.ifindex))
            .map(|i| i.ifindex)
            .collect();
        self.describe_served();
        gone
    }

    /// Each port's `serves` line for `status`.
    fn describe_served(&mut self) {
        for i in self.0.iter_mut() {
            i.serves = (self.1.iter().filter(|s| s.port == i.ifindex))
                .map(|s| match &s.encap {
                    Some(e) => format!("{} ({e})", s.name),
                    None => format!("{} (not above {} now)", s.name, i.name),
                })
                .collect();
        }
    }

    /// The served devices' headers, from a new topology (a PPPoE session
    /// re-established, a VLAN device re-created); true if any changed.
    pub fn sync_served(&mut self, topo: &Topology) -> bool {
        let mut changed = false;
        for s in self.1.iter_mut() {
            let now = topo.by_name(&s.name).and_then(|l| topo.beneath(l.ifindex)).and_then(|r| r.ok());
            let encap = now.filter(|e| e.port == s.port).map(|e| e.encap);
            if encap != s.encap {
                tracing::info!(dev = %s.name, was = ?s.encap, now = ?encap, "served device's headers changed");
                s.encap = encap;
                changed = true;
            }
        }
        self.describe_served();
        changed
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
    pub fn attach(
        &mut self,
        dp: &mut Dataplane,
        infos: &[LinkInfo],
        topo: &Topology,
        mode: ModeChoice,
    ) -> Result<Vec<u32>> {
        if matches!(mode, ModeChoice::Xdp) {
            return self.attach_xdp(dp, infos, topo);
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
        self.1.retain(|s| !ifindexes.contains(&s.port));
    }

    /// `--mode xdp`: a listed VLAN or ppp device (firewall4's `wan.7`,
    /// `pppoe-wan`) has no XDP of its own; XDP runs on the Ethernet device
    /// beneath it and serves it (`Served`), and only its connections. Each
    /// port's VLAN tags must be readable there (`policy::xdp::tags`: from
    /// the frame, or from the driver's receive metadata by a program bound
    /// to the port), else nothing is attached and the error says what to
    /// change. All or nothing, like `attach`.
    fn attach_xdp(&mut self, dp: &mut Dataplane, infos: &[LinkInfo], topo: &Topology) -> Result<Vec<u32>> {
        let mut added = Vec::new();
        for (port, listed, served, tags) in self.plan_xdp(infos, topo)? {
            if let Err(e) = dp.attach_with(port.ifindex, &port.name, Mode::Xdp, port.link_type, tags == Tags::Metadata)
            {
                self.detach(dp, &added);
                return Err(e);
            }
            let names: Vec<&str> = served.iter().map(|s| s.name.as_str()).collect();
            let reason = match (listed, names.is_empty()) {
                (_, true) => "requested".to_string(),
                (true, false) => {
                    format!("requested; also serves {} (listed), which has no XDP of its own", names.join(", "))
                }
                (false, false) => format!(
                    "requested for {} (listed), which has no XDP of its own: XDP runs on {}, the Ethernet device \
                     beneath, for its connections only",
                    names.join(", "),
                    port.name
                ),
            };
            tracing::info!(iface = %port.name, mode = "xdp", %reason, vlan_tags = %tags, "attached");
            let mut st = status_of(&port, ModeDecision { mode: Mode::Xdp, reason });
            st.listed = listed;
            st.vlan_tags = (tags != Tags::NoVlans).then(|| tags.to_string());
            self.0.push(st);
            self.1.extend(served);
            added.push(port.ifindex);
        }
        self.describe_served();
        Ok(added)
    }

    /// What `attach_xdp` would attach, and how each port reads VLAN tags;
    /// ports already attached take their new served devices here. Changes
    /// nothing else, so `run` can refuse a list before loading anything.
    #[allow(clippy::type_complexity)]
    pub fn plan_xdp(
        &mut self,
        infos: &[LinkInfo],
        topo: &Topology,
    ) -> Result<Vec<(LinkInfo, bool, Vec<Served>, Tags)>> {
        // Ports to attach: (the port, listed itself, devices it serves).
        let mut plan: Vec<(LinkInfo, bool, Vec<Served>)> = Vec::new();
        for info in infos {
            let (port, served) = match topo.beneath(info.ifindex) {
                None => {
                    if let Some(why) = xdp_refused(info) {
                        bail!("{why}");
                    }
                    (info.clone(), None)
                }
                Some(Err(e)) => {
                    bail!("cannot serve {} by XDP on the Ethernet device beneath it: {e}; use --mode tc", info.name)
                }
                Some(Ok(e)) => {
                    let name = topo.link(e.port).map(|l| l.name.clone()).unwrap_or_default();
                    let port = link::info(&name).with_context(|| format!("the device beneath {}", info.name))?;
                    if let Some(why) = xdp_refused(&port) {
                        bail!("{} is served by XDP on {name}: {why}", info.name);
                    }
                    let s = Served { port: e.port, name: info.name.clone(), encap: Some(e.encap) };
                    (port, Some(s))
                }
            };
            let listed = served.is_none();
            match plan.iter_mut().find(|p| p.0.ifindex == port.ifindex) {
                Some(p) => {
                    p.1 |= listed;
                    p.2.extend(served);
                }
                None => plan.push((port, listed, served.into_iter().collect())),
            }
        }
        // A port already attached (a reload listing another VLAN on it)
        // takes the new devices; the others are checked, then attached.
        let table = LinkTable::dump()?;
        let mut todo = Vec::new();
        for (port, listed, served) in plan {
            if let Some(i) = self.0.iter_mut().find(|i| i.ifindex == port.ifindex) {
                i.listed |= listed;
                self.1.extend(served);
                continue;
            }
            let l = table.get(port.ifindex).ok_or_else(|| anyhow!("{} vanished", port.name))?;
            let f = PortFacts::read(&table, l, &port.driver, true);
            let tags = xdp::tags(&f, &topo.vlans_on(port.ifindex))
                .map_err(|e| anyhow!("cannot attach XDP to {}: {e}", port.name))?;
            todo.push((port, listed, served, tags));
        }
        Ok(todo)
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
        xdp_target: None,
        vlan_tags: None,
        serves: Vec::new(),
        listed: true,
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
            let gone_list = gone.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            tracing::info!(ifindexes = %gone_list, "PPPoE devices no longer above a TC port: detached");
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
            match self.ifaces.attach(self.flows.dp_mut(), std::slice::from_ref(&info), &self.facts.topo, ModeChoice::Tc)
            {
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
            xdp_target: None,
            vlan_tags: None,
            serves: Vec::new(),
            listed: true,
            attach: String::new(),
        }
    }

    #[test]
    fn ports_and_link_state() {
        let mut p = Interfaces(vec![iface("lan", 3, false), iface("wan", 4, true)], Vec::new());
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

    /// rwan serves rwan.7 and pppoe-wan (over rwan.7) without being listed
    /// itself: each is named by its headers there, nothing else on rwan is
    /// listed; a reload keeping only pppoe-wan keeps rwan for it, one
    /// keeping neither detaches it; a new PPPoE session moves the headers.
    #[test]
    fn served_devices_are_listed_by_their_headers() {
        use crate::flow::Encap;
        use crate::topology::{Kind, Link, PppoeSession};
        let stack = |h: &[(u16, u16)]| {
            let mut s = EncapStack::default();
            h.iter().for_each(|&(proto, id)| assert!(s.push(Encap { proto, id })));
            s
        };
        let v7 = stack(&[(0x8100, 7)]);
        let ppp = stack(&[(0x8100, 7), (0x8864, 0x1a2b)]);
        let rwan = IfaceStatus { listed: false, ..iface("rwan", 3, true) };
        let mut p = Interfaces(
            vec![iface("rlan", 2, true), rwan],
            vec![
                Served { port: 3, name: "rwan.7".into(), encap: Some(v7) },
                Served { port: 3, name: "pppoe-wan".into(), encap: Some(ppp) },
            ],
        );
        assert_eq!(p.listed_name(3, &v7), Some("rwan.7"));
        assert_eq!(p.listed_name(3, &ppp), Some("pppoe-wan"));
        assert_eq!(p.listed_name(3, &stack(&[(0x8100, 8)])), None, "rwan.8");
        assert_eq!(p.listed_name(3, &EncapStack::default()), None, "rwan untagged");
        assert_eq!(p.listed_name(2, &v7), Some("rlan"), "a listed port answers for any headers");
        assert!(p.has("rwan.7") && p.has("rlan") && !p.has("rwan"));

        // PPPoE reconnects with session 0x2000.
        let link = |ifindex, name: &str, kind, lower, link_type| Link {
            ifindex,
            name: name.into(),
            kind,
            master: None,
            lower,
            mac: [2, 0, 0, 0, 0, ifindex as u8],
            mtu: 1500,
            link_type,
            port_state: None,
            vlans: Vec::new(),
        };
        let topo = Topology::new(
            [
                link(3, "rwan", Kind::Other(Some("veth".into())), None, 1),
                link(4, "rwan.7", Kind::Vlan { id: 7, proto: 0x8100, qos: Default::default() }, Some(3), 1),
                link(9, "pppoe-wan", Kind::Ppp, None, 512),
            ],
            Vec::new(),
            vec![PppoeSession { id: 0x2000, peer: [2; 6], device: "rwan.7".into() }],
        );
        assert!(p.sync_served(&topo));
        let now = stack(&[(0x8100, 7), (0x8864, 0x2000)]);
        assert_eq!(p.listed_name(3, &now), Some("pppoe-wan"));
        assert_eq!(p.listed_name(3, &ppp), None, "the old session's connections are no longer its");
        assert_eq!(p.0[1].serves, ["rwan.7 (VLAN 7)", "pppoe-wan (VLAN 7 + PPPoE 0x2000)"]);
        assert!(!p.sync_served(&topo), "nothing new");

        assert_eq!(p.keep_only(&["rlan".into(), "pppoe-wan".into()]), Vec::<u32>::new());
        assert_eq!(p.listed_name(3, &v7), None);
        assert_eq!(p.keep_only(&["rlan".into()]), vec![3]);
    }

    #[test]
    fn gather_refuses_duplicates_and_missing_interfaces() {
        let e = gather(&["lo".into(), "lo".into()]).unwrap_err().to_string();
        assert_eq!(e, "interface lo given twice");
        let e = gather(&["nfo-no-such0".into()]).unwrap_err().to_string();
        assert!(e.contains("nfo-no-such0"), "{e}");
    }
}
