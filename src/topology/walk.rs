//! The walk from the device the FIB names down to the managed port the
//! fast path transmits from, collecting what the devices on the way would
//! have done to the frame: `dev_fill_forward_path` (net/core/dev.c) with
//! `vlan_dev_fill_forward_path` (net/8021q/vlan_dev.c),
//! `br_fill_forward_path` (net/bridge/br_device.c, with
//! `br_vlan_fill_forward_path_pvid` / `_mode` in br_vlan.c) and
//! `pppoe_fill_forward_path` (drivers/net/ppp/pppoe.c), turned into a
//! direction by `nft_dev_path_info` (net/netfilter/nft_flow_offload.c).

use std::fmt;

use crate::flow::{Encap, EncapStack};

use super::{mac_str, Kind, Topology, BR_STATE_FORWARDING, ETH_P_8021Q, ETH_P_PPP_SES};

/// More devices than this between the FIB's and a port is a loop or a
/// stack no router has.
pub const MAX_DEPTH: usize = 8;

/// PPPoE session header (6) and PPP protocol (2): what a session costs of
/// the Ethernet MTU (1492 on a 1500 link).
const PPPOE_OVERHEAD: u32 = 8;

/// Where and how a direction's frames leave.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Egress {
    /// The managed device the fast path transmits from.
    pub port: u32,
    /// Headers to push, outermost first.
    pub encap: EncapStack,
    /// The PCP per priority of each tag in `encap` (`VlanQos::egress` of
    /// the VLAN device that puts it there; 0 for a bridge's own tag and
    /// for PPPoE), in the same order.
    pub pcp: [u16; EncapStack::CAP],
    /// A VLAN device on the way (the port included) whose ingress QoS map
    /// gives some PCP a priority: frames arriving this way would get that
    /// priority from it (vlan_do_receive), which the fast path cannot give.
    pub ingress_qos: Option<String>,
    /// Next hop (PPPoE: the access concentrator's MAC).
    pub dmac: [u8; 6],
    /// The first MAC from the top (the bridge's, the VLAN device's): what
    /// the kernel sends from, and so what the other direction's frames are
    /// addressed to.
    pub smac: [u8; 6],
    /// IP MTU the port can carry after the encapsulation.
    pub mtu: u32,
    /// The port has no link-layer header (ppp, WireGuard, tun managed
    /// themselves).
    pub l3: bool,
    /// Bridges crossed on the way down.
    pub bridges: Vec<u32>,
}

/// Why the walk found no managed port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LowerError {
    /// The walk ended on this device and nothing on the way is managed.
    NotManaged(String),
    /// A device on the way is not in the snapshot (it just appeared).
    Unknown(u32),
    /// The bridge has not learned where the next hop is (yet).
    NoFdb { bridge: String, mac: String, vlan: Option<u16> },
    /// The bridge port is not forwarding (STP blocking, learning, disabled).
    PortNotForwarding { port: String, state: u8 },
    /// The port is not a member of the VLAN the frame belongs to.
    PortNotInVlan { port: String, vid: u16 },
    /// The port sends `vid` untagged but untagged frames arriving on it
    /// belong to another VLAN: the two directions would not mirror.
    PvidMismatch { port: String, vid: u16 },
    /// The bridge filters VLANs but has no PVID of its own.
    BridgeNoPvid(String),
    /// More than two headers to push.
    TooDeep(String),
    /// This VLAN device gives arriving frames a priority by their PCP
    /// (ingress-qos-map), which ip6_forward keeps (and ip_forward with
    /// net.ipv4.ip_forward_update_priority=0): the fast path cannot.
    IngressQos(String),
    /// A ppp device whose PPPoE session cannot be told.
    Pppoe(String),
    /// More than MAX_DEPTH devices: a loop.
    Loop,
}

impl LowerError {
    /// Worth retrying soon: the bridge learns the address from the next
    /// frame, a device that just appeared is in the next snapshot.
    pub fn transient(&self) -> bool {
        matches!(self, LowerError::NoFdb { .. } | LowerError::Unknown(_))
    }
}

impl fmt::Display for LowerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LowerError::NotManaged(d) => write!(f, "{d} and the devices above it are not managed"),
            LowerError::Unknown(i) => write!(f, "ifindex {i} is not in the link snapshot yet"),
            LowerError::NoFdb { bridge, mac, vlan } => match vlan {
                Some(v) => write!(f, "{bridge} has no fdb entry for {mac} in VLAN {v} yet"),
                None => write!(f, "{bridge} has no fdb entry for {mac} yet"),
            },
            LowerError::PortNotForwarding { port, state } => {
                write!(f, "bridge port {port} is not forwarding (STP state {state})")
            }
            LowerError::PortNotInVlan { port, vid } => write!(f, "bridge port {port} is not a member of VLAN {vid}"),
            LowerError::PvidMismatch { port, vid } => {
                write!(f, "bridge port {port} sends VLAN {vid} untagged but its PVID is another VLAN")
            }
            LowerError::BridgeNoPvid(b) => write!(f, "{b} filters VLANs but has no PVID of its own"),
            LowerError::TooDeep(d) => write!(f, "more than two VLAN/PPPoE headers below {d}"),
            LowerError::IngressQos(d) => {
                write!(f, "{d} has an ingress-qos-map: the priority it gives arriving packets cannot be reproduced")
            }
            LowerError::Pppoe(why) => f.write_str(why),
            LowerError::Loop => write!(f, "more than {MAX_DEPTH} devices stacked (a loop?)"),
        }
    }
}

impl Topology {
    /// Walk from `dev` (the FIB's output device) with next hop `dmac` down
    /// to the first device `managed` accepts (the device itself if it is
    /// managed: the flowtable may list br-lan or pppoe-wan, or the ports
    /// below them).
    pub fn egress(&self, dev: u32, dmac: [u8; 6], managed: impl Fn(u32) -> bool) -> Result<Egress, LowerError> {
        // Headers in the order the walk meets them, innermost first, each
        // with its PCP per priority.
        let mut pushed: Vec<(Encap, u16)> = Vec::new();
        let mut ingress_qos = None;
        let (mut dmac, mut smac, mut overhead) = (dmac, [0u8; 6], 0u32);
        let mut bridges = Vec::new();
        // A VLAN device's tag directly above a VLAN-filtering bridge is
        // the bridge VLAN, not a header (br_vlan_fill_forward_path_pvid).
        let mut above_was_vlan = false;
        let mut cur = dev;
        for _ in 0..MAX_DEPTH {
            let l = self.link(cur).ok_or(LowerError::Unknown(cur))?;
            if smac == [0; 6] {
                smac = l.mac;
            }
            if matches!(l.kind, Kind::Vlan { qos, .. } if qos.ingress) && ingress_qos.is_none() {
                ingress_qos = Some(l.name.clone());
            }
            if managed(cur) {
                if pushed.len() > EncapStack::CAP {
                    return Err(LowerError::TooDeep(self.name(dev)));
                }
                let (mut encap, mut pcp) = (EncapStack::default(), [0; EncapStack::CAP]);
                for (slot, (e, p)) in pcp.iter_mut().zip(pushed.iter().rev()) {
                    encap.push(*e);
                    *slot = *p;
                }
                let mtu = l.mtu.saturating_sub(overhead);
                return Ok(Egress { port: cur, encap, pcp, ingress_qos, dmac, smac, mtu, l3: l.is_l3(), bridges });
            }
            let was_vlan = above_was_vlan;
            above_was_vlan = false;
            cur = match &l.kind {
                Kind::Vlan { id, proto, qos } => {
                    above_was_vlan = true;
                    pushed.push((Encap { proto: *proto, id: *id }, qos.egress));
                    l.lower.ok_or_else(|| LowerError::NotManaged(l.name.clone()))?
                }
                Kind::Bridge { vlan_filtering } => {
                    bridges.push(cur);
                    // The tag of a VLAN device above the bridge is the bridge
                    // VLAN: a tagged port sends it with that device's PCP
                    // (br_handle_vlan keeps skb->vlan_tci), the bridge's
                    // own PVID tag with none (br_allowed_ingress).
                    let mut pcp = 0;
                    let vid = if !vlan_filtering {
                        None
                    } else if was_vlan && pushed.last().is_some_and(|(e, _)| e.proto == ETH_P_8021Q) {
                        pushed.pop().map(|(e, p)| {
                            pcp = p;
                            e.id
                        })
                    } else {
                        Some(l.vlans.iter().find(|v| v.pvid).ok_or(LowerError::BridgeNoPvid(l.name.clone()))?.vid)
                    };
                    let port = self.fdb_port(cur, dmac, vid).ok_or_else(|| LowerError::NoFdb {
                        bridge: l.name.clone(),
                        mac: mac_str(&dmac),
                        vlan: vid,
                    })?;
                    let p = self.link(port).ok_or(LowerError::Unknown(port))?;
                    let state = p.port_state.unwrap_or(BR_STATE_FORWARDING);
                    if state != BR_STATE_FORWARDING {
                        return Err(LowerError::PortNotForwarding { port: p.name.clone(), state });
                    }
                    if let Some(vid) = vid {
                        let v = p.vlans.iter().find(|v| v.vid == vid);
                        let v = v.ok_or_else(|| LowerError::PortNotInVlan { port: p.name.clone(), vid })?;
                        if !v.untagged {
                            pushed.push((Encap { proto: ETH_P_8021Q, id: vid }, pcp));
                        } else if !v.pvid {
                            return Err(LowerError::PvidMismatch { port: p.name.clone(), vid });
                        }
                    }
                    port
                }
                Kind::Ppp => {
                    let s = self.pppoe_of(cur).map_err(LowerError::Pppoe)?;
                    let lower = self.by_name(&s.device).ok_or_else(|| {
                        LowerError::Pppoe(format!("{}: PPPoE device {} does not exist", l.name, s.device))
                    })?;
                    pushed.push((Encap { proto: ETH_P_PPP_SES, id: s.id }, 0));
                    dmac = s.peer;
                    overhead += PPPOE_OVERHEAD;
                    lower.ifindex
                }
                Kind::Dsa | Kind::Other(_) => return Err(LowerError::NotManaged(l.name.clone())),
            };
        }
        Err(LowerError::Loop)
    }
}
