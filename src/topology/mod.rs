//! The links between the device the FIB names and the port the fast path
//! runs on: a snapshot of the namespace's link topology (`Topology`, read
//! from rtnetlink and /proc/net/pppoe by `read`) and the pure walk down it
//! (`walk`), like `dev_fill_forward_path` (net/core/dev.c) and
//! `nft_dev_path_info` (net/netfilter/nft_flow_offload.c).

mod read;
mod walk;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use walk::{Egress, LowerError};

/// ARPHRD_ETHER: the only link type with an Ethernet header.
pub const ARPHRD_ETHER: u16 = 1;
/// ETH_P_* (include/uapi/linux/if_ether.h), host order.
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_P_PPP_SES: u16 = 0x8864;

/// What a VLAN device's QoS maps (`ip link ... egress-qos-map`,
/// `ingress-qos-map`; IFLA_VLAN_EGRESS_QOS / IFLA_VLAN_INGRESS_QOS) do to
/// the packets the fast path forwards through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VlanQos {
    /// The PCP its egress map gives each priority a forwarded packet can
    /// have (0, 2, 4, 6: `fo_priority` in bpf/fastpath.bpf.c), 3 bits each
    /// (`fo_flow.out_pcp`): vlan_dev_get_egress_qos_mask looks the skb's
    /// priority up exactly, and a priority the map does not name gets 0.
    pub egress: u16,
    /// Its ingress map gives some PCP a priority other than 0
    /// (vlan_do_receive sets skb->priority from it, which ip6_forward
    /// keeps): a fast path below the device never sets that priority.
    pub ingress: bool,
}

impl VlanQos {
    /// From the maps' (from, to) pairs: egress priority -> PCP, ingress
    /// PCP -> priority (vlan_fill_info lists only non-zero ones).
    pub fn from_maps(egress: &[(u32, u32)], ingress: &[(u32, u32)]) -> Self {
        let pcp = |prio: u32| egress.iter().find(|(from, _)| *from == prio).map_or(0, |(_, to)| (*to & 7) as u16);
        VlanQos {
            egress: (0..4u16).map(|k| pcp(2 * u32::from(k)) << (3 * k)).sum(),
            ingress: ingress.iter().any(|(_, to)| *to != 0),
        }
    }
}

/// What kind of device a link is, as far as the walk cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A bridge; with VLAN filtering its ports' VLAN entries decide tagging.
    Bridge { vlan_filtering: bool },
    /// A VLAN device: `proto` is ETH_P_8021Q or ETH_P_8021AD.
    Vlan { id: u16, proto: u16, qos: VlanQos },
    /// A ppp device (PPPoE when a session in /proc/net/pppoe is its).
    Ppp,
    /// A DSA user port: the walk stops there, as the kernel's software
    /// path does (`dsa_user_fill_forward_path` only matters to hardware).
    Dsa,
    /// Anything else (a NIC, veth, WireGuard, a tunnel): the bottom.
    Other(Option<String>),
}

/// A port's (or the bridge's own) membership in one bridge VLAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortVlan {
    pub vid: u16,
    /// Frames of this VLAN leave the port untagged.
    pub untagged: bool,
    /// Untagged frames arriving on the port belong to this VLAN.
    pub pvid: bool,
}

/// IFLA_BRPORT_STATE values (include/uapi/linux/if_bridge.h).
pub const BR_STATE_FORWARDING: u8 = 3;

/// One link of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    pub kind: Kind,
    /// IFLA_MASTER.
    pub master: Option<u32>,
    /// IFLA_LINK in this namespace (a VLAN's lower device).
    pub lower: Option<u32>,
    /// IFLA_ADDRESS when it is a MAC (all zero otherwise).
    pub mac: [u8; 6],
    pub mtu: u32,
    /// ARPHRD_*.
    pub link_type: u16,
    /// IFLA_BRPORT_STATE when the link is a bridge port.
    pub port_state: Option<u8>,
    /// Bridge VLAN entries (a port's, or the bridge's own), from the
    /// AF_BRIDGE link dump with RTEXT_FILTER_BRVLAN.
    pub vlans: Vec<PortVlan>,
}

impl Link {
    /// A device without an Ethernet header (ppp, WireGuard, tun, ...).
    pub fn is_l3(&self) -> bool {
        self.link_type != ARPHRD_ETHER
    }
}

/// One bridge forwarding database entry learned or configured on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    pub bridge: u32,
    pub port: u32,
    pub mac: [u8; 6],
    /// NDA_VLAN; None on a bridge without VLAN filtering.
    pub vlan: Option<u16>,
}

/// One PPPoE session, as /proc/net/pppoe lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PppoeSession {
    /// Host order.
    pub id: u16,
    pub peer: [u8; 6],
    /// The Ethernet device the session runs over, by name.
    pub device: String,
}

/// A snapshot of the links, bridge fdbs and PPPoE sessions of one
/// namespace. Pure data: the walk answers from it alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    links: BTreeMap<u32, Link>,
    fdb: Vec<FdbEntry>,
    pppoe: Vec<PppoeSession>,
}

impl Topology {
    pub fn new(links: impl IntoIterator<Item = Link>, fdb: Vec<FdbEntry>, pppoe: Vec<PppoeSession>) -> Self {
        Topology { links: links.into_iter().map(|l| (l.ifindex, l)).collect(), fdb, pppoe }
    }

    pub fn link(&self, ifindex: u32) -> Option<&Link> {
        self.links.get(&ifindex)
    }

    pub fn links(&self) -> impl Iterator<Item = &Link> {
        self.links.values()
    }

    pub fn by_name(&self, name: &str) -> Option<&Link> {
        self.links.values().find(|l| l.name == name)
    }

    /// The bridge `ifindex` is a port of, by name.
    pub fn bridge_of(&self, ifindex: u32) -> Option<String> {
        let m = self.link(ifindex)?.master?;
        self.link(m).filter(|b| matches!(b.kind, Kind::Bridge { .. })).map(|b| b.name.clone())
    }

    fn name(&self, ifindex: u32) -> String {
        self.link(ifindex).map_or_else(|| format!("ifindex {ifindex}"), |l| l.name.clone())
    }

    /// The fdb entry for `mac` on `bridge` in `vlan`: where the bridge sends
    /// a frame to it (`br_fdb_find_rcu`). Entries on the bridge device
    /// itself are its own addresses, not a port.
    pub fn fdb_port(&self, bridge: u32, mac: [u8; 6], vlan: Option<u16>) -> Option<u32> {
        self.fdb
            .iter()
            .find(|e| e.bridge == bridge && e.mac == mac && e.vlan == vlan && e.port != bridge)
            .map(|e| e.port)
    }

    /// Record fdb changes; returns the MACs learned on another port than
    /// before (a client roamed): the connections sent to them must be
    /// walked again. A forgotten entry is not reported: the bridge ages
    /// out what the fast path forwards (it never sees those frames), and
    /// like the kernel flowtable, which keeps the port it resolved, the
    /// offloaded connection keeps its port; a port going away is a link
    /// event.
    pub fn apply_fdb(&mut self, changes: &[FdbChange]) -> Vec<[u8; 6]> {
        let mut moved = Vec::new();
        for c in changes {
            let e = c.entry;
            let at = self.fdb.iter().position(|x| x.bridge == e.bridge && x.mac == e.mac && x.vlan == e.vlan);
            let before = at.map(|i| self.fdb[i].port);
            match (at, c.gone) {
                (Some(i), true) => {
                    self.fdb.swap_remove(i);
                }
                (Some(i), false) => self.fdb[i] = e,
                (None, true) => {}
                (None, false) => self.fdb.push(e),
            }
            if !c.gone && before != Some(e.port) && !moved.contains(&e.mac) {
                moved.push(e.mac);
            }
        }
        moved
    }

    /// The PPPoE session of ppp device `ppp`. /proc/net/pppoe names the
    /// session's Ethernet device but not its ppp unit, and no netlink
    /// message links the two, so a ppp device is matched to a session only
    /// when that is unambiguous: the namespace has exactly one ppp device
    /// and exactly one session. Anything else is refused with the reason
    /// (several PPPoE uplinks are rare; guessing would send one session's
    /// traffic into another).
    pub fn pppoe_of(&self, ppp: u32) -> Result<&PppoeSession, String> {
        let ppps: Vec<&Link> = self.links.values().filter(|l| l.kind == Kind::Ppp).collect();
        let name = self.name(ppp);
        match (self.pppoe.as_slice(), ppps.len()) {
            ([], _) => Err(format!("{name}: no PPPoE session in /proc/net/pppoe")),
            ([s], 1) => Ok(s),
            (s, n) => Err(format!(
                "{name}: {} PPPoE sessions and {n} ppp devices; /proc/net/pppoe does not say which session is whose",
                s.len()
            )),
        }
    }

    /// The links whose facts differ between `self` and `now`, each with the
    /// devices stacked above it in either snapshot (the walks that may
    /// cross it start there); `None` when the fdbs or PPPoE sessions differ
    /// too (any walk may have changed).
    pub fn changed_links(&self, now: &Topology) -> Option<std::collections::HashSet<u32>> {
        if self.fdb != now.fdb || self.pppoe != now.pppoe {
            return None;
        }
        let ids: std::collections::BTreeSet<u32> = self.links.keys().chain(now.links.keys()).copied().collect();
        let mut out = std::collections::HashSet::new();
        for i in ids.into_iter().filter(|i| self.links.get(i) != now.links.get(i)) {
            out.insert(i);
            out.extend(self.uppers(i));
            out.extend(now.uppers(i));
        }
        Some(out)
    }

    /// Every device stacked above `port`: its bridge, VLAN devices on it
    /// or on those, ppp devices whose PPPoE session runs over any of them
    /// (the devices a walk down to `port` may cross). Sorted, `port` not
    /// included.
    pub fn uppers(&self, port: u32) -> Vec<u32> {
        let mut set = std::collections::BTreeSet::from([port]);
        loop {
            let before = set.len();
            for l in self.links.values() {
                let above = match &l.kind {
                    Kind::Vlan { .. } => l.lower.is_some_and(|i| set.contains(&i)),
                    Kind::Bridge { .. } => {
                        self.links.values().any(|p| p.master == Some(l.ifindex) && set.contains(&p.ifindex))
                    }
                    Kind::Ppp => self
                        .pppoe_of(l.ifindex)
                        .ok()
                        .and_then(|s| self.by_name(&s.device))
                        .is_some_and(|d| set.contains(&d.ifindex)),
                    _ => false,
                };
                if above {
                    set.insert(l.ifindex);
                }
            }
            if set.len() == before || set.len() > walk::MAX_DEPTH * 4 {
                break;
            }
        }
        set.remove(&port);
        set.into_iter().collect()
    }

    /// `uppers` not among the interfaces `named` (those run the fast path
    /// themselves), with their names: the fast path on `port` would skip
    /// their hooks (`hooks::Port::uppers`).
    pub fn uppers_named(&self, port: u32, named: &[String]) -> Vec<(u32, String)> {
        self.uppers(port)
            .into_iter()
            .filter_map(|u| self.link(u).map(|l| (u, l.name.clone())))
            .filter(|(_, n)| !named.contains(n))
            .collect()
    }

    /// What `ifindex` is and what it stands on, for `check` and `status`:
    /// "br-lan: bridge, ports lan1 lan2"; "pppoe-wan: PPPoE session 0x1a2b
    /// over wan.7 (VLAN 7) on eth1".
    pub fn describe(&self, ifindex: u32) -> String {
        let Some(top) = self.link(ifindex) else { return format!("ifindex {ifindex}: not in the link snapshot") };
        let mut chain: Vec<(&str, String)> = Vec::new();
        let mut cur = Some(top);
        while let Some(l) = cur.filter(|_| chain.len() < walk::MAX_DEPTH) {
            let (label, next) = self.label(l);
            chain.push((&l.name, label));
            cur = next.and_then(|i| self.link(i));
        }
        let first = match (&chain[0].1, &top.kind) {
            (l, _) if !l.is_empty() => l.clone(),
            (_, Kind::Other(Some(k))) => format!("{k} port"),
            _ => "Ethernet port".into(),
        };
        let mut out = format!("{}: {first}", chain[0].0);
        let last = chain.len() - 1;
        for (i, (name, label)) in chain.iter().enumerate().skip(1) {
            if i == last && label.is_empty() {
                out.push_str(&format!(" on {name}"));
            } else {
                out.push_str(&format!(" over {name} ({label})"));
            }
        }
        if let Some(m) = top.master.and_then(|m| self.link(m)) {
            out.push_str(&format!(", port of {}", m.name));
        }
        out
    }

    /// One link's label and the link it stands on. A plain port's label is
    /// empty below the top ("on eth1").
    fn label(&self, l: &Link) -> (String, Option<u32>) {
        match &l.kind {
            Kind::Bridge { vlan_filtering } => {
                let ports: Vec<&str> =
                    self.links.values().filter(|p| p.master == Some(l.ifindex)).map(|p| p.name.as_str()).collect();
                let vf = if *vlan_filtering { " with VLAN filtering" } else { "" };
                let ports = if ports.is_empty() { "none".to_string() } else { ports.join(" ") };
                (format!("bridge{vf}, ports {ports}"), None)
            }
            Kind::Vlan { id, proto, .. } => {
                let q = if *proto == ETH_P_8021AD { "802.1ad VLAN" } else { "VLAN" };
                (format!("{q} {id}"), l.lower)
            }
            Kind::Ppp => match self.pppoe_of(l.ifindex) {
                Ok(s) => (format!("PPPoE session {:#x}", s.id), self.by_name(&s.device).map(|d| d.ifindex)),
                Err(why) => (format!("ppp, no link-layer header ({why})"), None),
            },
            Kind::Dsa => ("DSA user port".into(), None),
            Kind::Other(k) if l.is_l3() => {
                (format!("{}, no link-layer header", k.as_deref().unwrap_or("device")), None)
            }
            Kind::Other(_) => (String::new(), None),
        }
    }
}

impl Topology {
    /// For a VLAN or ppp device: the Ethernet device beneath it (through
    /// VLAN devices and a PPPoE session, never a bridge) and the headers
    /// its frames carry there, outermost first; None for any other device.
    /// XDP serves such a device from there: it has no XDP of its own (a
    /// VLAN device has no ndo_bpf; a ppp device no Ethernet header), while
    /// the fast path on the device beneath pops and pushes its headers, as
    /// the kernel flowtable does on the real device `dev_fill_forward_path`
    /// reaches (`nft_dev_path_info`, net/netfilter/nft_flow_offload.c).
    pub fn beneath(&self, ifindex: u32) -> Option<Result<Egress, LowerError>> {
        let l = self.link(ifindex)?;
        if !matches!(l.kind, Kind::Vlan { .. } | Kind::Ppp) {
            return None;
        }
        let bottom = |i: u32| self.link(i).is_some_and(|x| matches!(x.kind, Kind::Other(_) | Kind::Dsa) && !x.is_l3());
        Some(self.egress(ifindex, [0; 6], bottom))
    }

    /// VLAN devices stacked directly on `ifindex`, by name: their tags are
    /// the outermost on its wire, the ones a NIC may take off.
    pub fn vlans_on(&self, ifindex: u32) -> Vec<String> {
        self.links
            .values()
            .filter(|l| matches!(l.kind, Kind::Vlan { .. }) && l.lower == Some(ifindex))
            .map(|l| l.name.clone())
            .collect()
    }
}

/// A ppp device the fast path runs on because the port below it runs TC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PppoeUpper {
    pub ifindex: u32,
    pub name: String,
    /// The managed port its PPPoE session runs over.
    pub port: String,
}

/// The ppp devices whose PPPoE session runs over a port managed in TC mode
/// (`tc_port`), directly or through VLAN devices, and that are not managed
/// themselves. TC cannot take a PPPoE header off (bpf_skb_adjust_room
/// refuses an skb whose protocol is not IP, net/core/filter.c), nor push
/// one on a GSO skb, so TC on eth1 hands PPPoE frames to the kernel, which
/// decapsulates them (pppoe_rcv) and delivers them on pppoe-wan: the fast
/// path on pppoe-wan takes them from there, and its own transmissions go
/// into pppoe-wan, whose driver encapsulates (pppoe_xmit). The same
/// connections the kernel flowtable offloads on eth1 (it pops PPPoE there,
/// nf_flow_skb_encap_protocol); XDP on eth1 pops and pushes itself.
pub fn pppoe_uppers(topo: &Topology, managed: impl Fn(u32) -> bool, tc_port: impl Fn(u32) -> bool) -> Vec<PppoeUpper> {
    let mut v = Vec::new();
    for l in topo.links().filter(|l| l.kind == Kind::Ppp && !managed(l.ifindex)) {
        let Ok(e) = topo.egress(l.ifindex, [0; 6], &managed) else { continue };
        if tc_port(e.port) && e.encap.as_slice().iter().any(|x| x.proto == ETH_P_PPP_SES) {
            let port = topo.link(e.port).map_or_else(|| e.port.to_string(), |p| p.name.clone());
            v.push(PppoeUpper { ifindex: l.ifindex, name: l.name.clone(), port });
        }
    }
    v
}

/// What the egress watcher on each managed device leaves to a managed
/// device stacked above it (`fo_below`, bpf/flow.h): everything on a port
/// of a managed bridge (routed frames reach it only through the bridge),
/// the tagged and PPPoE frames on a device with a managed VLAN or ppp
/// device above (pppoe-wan, which the engine attaches above a TC port).
/// The upper device's watcher saw those packets before its qdisc, where a
/// shaper may hold them across a ruleset change; seen again below, they
/// are no evidence of what the kernel does after it. Devices with nothing
/// managed above them are not listed.
pub fn watch_below(topo: &Topology, managed: &[u32]) -> Vec<(u32, Below)> {
    let is_managed = |i: u32| managed.contains(&i);
    managed
        .iter()
        .filter_map(|&d| {
            let master = topo.link(d).and_then(|l| l.master);
            let bridge = master.and_then(|m| topo.link(m)).is_some_and(|b| matches!(b.kind, Kind::Bridge { .. }));
            if bridge && master.is_some_and(is_managed) {
                Some((d, Below::All))
            } else {
                topo.uppers(d).into_iter().any(is_managed).then_some((d, Below::Encap))
            }
        })
        .collect()
}

/// `fo_below`'s values, for `watch_below`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Below {
    Encap,
    All,
}

/// An fdb entry as an RTM_NEWNEIGH / RTM_DELNEIGH (AF_BRIDGE) states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbChange {
    pub entry: FdbEntry,
    pub gone: bool,
}

pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

pub use read::{fdb_of, read};
