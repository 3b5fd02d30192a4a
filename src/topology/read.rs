//! Reading the snapshot: the link dump (kinds, VLAN ids, bridge port
//! state), the AF_BRIDGE link dump with RTEXT_FILTER_BRVLAN (bridge VLAN
//! entries), the AF_BRIDGE neighbour dump (the fdb) and /proc/net/pppoe
//! (PPPoE sessions have no netlink of their own).

use anyhow::{Context, Result};
use netlink_packet_route::link::{
    AfSpecBridge, BridgeVlanInfoFlags, InfoBridge, InfoBridgePort, InfoData, InfoPortData, InfoVlan, LinkAttribute,
    LinkExtentMask, LinkInfo, LinkMessage, VlanQosMapping,
};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::routes::dump::dump_map;

use super::{FdbEntry, Kind, Link, PortVlan, PppoeSession, Topology, VlanQos};

/// The calling thread's namespace as it is now.
pub fn read() -> Result<Topology> {
    let mut links = dump_links()?;
    for (ifindex, vlans) in dump_bridge_vlans()? {
        if let Some(l) = links.iter_mut().find(|l| l.ifindex == ifindex) {
            l.vlans = vlans;
        }
    }
    let fdb = dump_fdb()?;
    let pppoe = match std::fs::read_to_string("/proc/net/pppoe") {
        Ok(s) => parse_pppoe(&s).context("/proc/net/pppoe")?,
        // No pppoe module loaded: no sessions.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).context("reading /proc/net/pppoe"),
    };
    Ok(Topology::new(links, fdb, pppoe))
}

/// Every link; one the decoder rejects is left out (the walk reports it
/// as not in the snapshot).
fn dump_links() -> Result<Vec<Link>> {
    let mut get = LinkMessage::default();
    get.attributes.push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
    dump_map(RouteNetlinkMessage::GetLink(get), "link", |m| {
        Ok(match m {
            Ok(RouteNetlinkMessage::NewLink(m)) => Some(link_of(&m)),
            _ => None,
        })
    })
}

pub(super) fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        ifindex: m.header.index,
        name: String::new(),
        kind: Kind::Other(None),
        master: None,
        lower: None,
        mac: [0; 6],
        mtu: 0,
        link_type: m.header.link_layer_type.into(),
        port_state: None,
        vlans: Vec::new(),
    };
    let mut netns = false;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Controller(i) => l.master = Some(*i),
            LinkAttribute::Link(i) if *i != 0 && *i != l.ifindex => l.lower = Some(*i),
            LinkAttribute::LinkNetNsId(_) => netns = true,
            LinkAttribute::Mtu(mtu) => l.mtu = *mtu,
            LinkAttribute::Address(mac) => l.mac = <[u8; 6]>::try_from(&mac[..]).unwrap_or_default(),
            LinkAttribute::LinkInfo(infos) => kind_of(infos, &mut l),
            _ => {}
        }
    }
    // A lower device in another namespace (a veth's peer) is not one we
    // can walk to.
    if netns {
        l.lower = None;
    }
    l
}

fn kind_of(infos: &[LinkInfo], l: &mut Link) {
    let mut kind = None;
    for i in infos {
        match i {
            LinkInfo::Kind(k) => kind = Some(k.to_string()),
            LinkInfo::Data(InfoData::Vlan(v)) => {
                let (mut id, mut proto) = (0, super::ETH_P_8021Q);
                let (mut egress, mut ingress) = (Vec::new(), Vec::new());
                let pairs = |m: &[VlanQosMapping]| -> Vec<(u32, u32)> {
                    m.iter()
                        .filter_map(|x| match x {
                            VlanQosMapping::Mapping(from, to) => Some((*from, *to)),
                            _ => None,
                        })
                        .collect()
                };
                for a in v {
                    match a {
                        InfoVlan::Id(i) => id = *i,
                        InfoVlan::Protocol(p) => proto = (*p).into(),
                        InfoVlan::EgressQos(m) => egress = pairs(m),
                        InfoVlan::IngressQos(m) => ingress = pairs(m),
                        _ => {}
                    }
                }
                l.kind = Kind::Vlan { id, proto, qos: VlanQos::from_maps(&egress, &ingress) };
            }
            LinkInfo::Data(InfoData::Bridge(b)) => {
                let vf = b.iter().any(|a| matches!(a, InfoBridge::VlanFiltering(true)));
                l.kind = Kind::Bridge { vlan_filtering: vf };
            }
            LinkInfo::PortData(InfoPortData::BridgePort(p)) => {
                l.port_state = p.iter().find_map(|a| match a {
                    InfoBridgePort::State(s) => Some(u8::from(*s)),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    if l.kind == Kind::Other(None) {
        l.kind = match kind.as_deref() {
            Some("bridge") => Kind::Bridge { vlan_filtering: false },
            Some("ppp") => Kind::Ppp,
            Some("dsa") => Kind::Dsa,
            _ => Kind::Other(kind),
        };
    }
}

/// Bridge VLAN entries of every port and bridge (`bridge vlan show`).
fn dump_bridge_vlans() -> Result<Vec<(u32, Vec<PortVlan>)>> {
    let mut get = LinkMessage::default();
    get.header.interface_family = AddressFamily::Bridge;
    get.attributes.push(LinkAttribute::ExtMask(vec![LinkExtentMask::Brvlan]));
    dump_map(RouteNetlinkMessage::GetLink(get), "bridge VLAN", |m| {
        Ok(match m {
            Ok(RouteNetlinkMessage::NewLink(m)) => Some((m.header.index, vlans_of(&m))),
            _ => None,
        })
    })
}

pub(super) fn vlans_of(m: &LinkMessage) -> Vec<PortVlan> {
    let mut out = Vec::new();
    for a in &m.attributes {
        let LinkAttribute::AfSpecBridge(spec) = a else { continue };
        for s in spec {
            if let AfSpecBridge::VlanInfo(v) = s {
                out.push(PortVlan {
                    vid: v.vid,
                    untagged: v.flags.contains(BridgeVlanInfoFlags::Untagged),
                    pvid: v.flags.contains(BridgeVlanInfoFlags::Pvid),
                });
            }
        }
    }
    out
}

/// The bridges' forwarding databases (`bridge fdb show`).
fn dump_fdb() -> Result<Vec<FdbEntry>> {
    let mut get = NeighbourMessage::default();
    get.header.family = AddressFamily::Bridge;
    dump_map(RouteNetlinkMessage::GetNeighbour(get), "bridge fdb", |m| {
        Ok(match m {
            Ok(RouteNetlinkMessage::NewNeighbour(n)) => fdb_of(&n),
            _ => None,
        })
    })
}

/// An AF_BRIDGE neighbour message as an fdb entry; None for one that is
/// not a bridge's (a port's own NTF_SELF addresses carry no NDA_MASTER).
pub fn fdb_of(m: &NeighbourMessage) -> Option<FdbEntry> {
    if m.header.family != AddressFamily::Bridge {
        return None;
    }
    let (mut mac, mut vlan, mut bridge) = (None, None, None);
    for a in &m.attributes {
        match a {
            NeighbourAttribute::LinkLayerAddress(ll) => mac = <[u8; 6]>::try_from(&ll[..]).ok(),
            NeighbourAttribute::Vlan(v) => vlan = Some(*v),
            NeighbourAttribute::Controller(b) => bridge = Some(*b),
            _ => {}
        }
    }
    Some(FdbEntry { bridge: bridge?, port: m.header.ifindex, mac: mac?, vlan })
}

/// /proc/net/pppoe (`pppoe_seq_show`, drivers/net/ppp/pppoe.c): a header,
/// then "%08X %pM %8s" per session. The id is the __be16 printed as a
/// host integer, so it reads byte-swapped on little-endian machines.
pub fn parse_pppoe(s: &str) -> Result<Vec<PppoeSession>> {
    let mut out = Vec::new();
    for line in s.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let mut f = line.split_whitespace();
        let (Some(id), Some(mac), Some(dev)) = (f.next(), f.next(), f.next()) else {
            anyhow::bail!("malformed line {line:?}: want id, peer MAC, device");
        };
        let raw = u32::from_str_radix(id, 16).with_context(|| format!("session id {id:?}"))?;
        let raw = u16::try_from(raw).with_context(|| format!("session id {id:?} is over 16 bits"))?;
        let mut peer = [0u8; 6];
        let bytes: Vec<&str> = mac.split(':').collect();
        if bytes.len() != 6 {
            anyhow::bail!("peer MAC {mac:?}");
        }
        for (o, b) in peer.iter_mut().zip(bytes) {
            *o = u8::from_str_radix(b, 16).with_context(|| format!("peer MAC {mac:?}"))?;
        }
        out.push(PppoeSession { id: u16::from_be(raw), peer, device: dev.to_string() });
    }
    Ok(out)
}
