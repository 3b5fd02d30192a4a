//! XDP, per port: can it receive this fast path's redirects (`target`), and
//! how do VLAN tags reach the XDP program there (`tags`). Pure: the facts
//! come from `routes::link` (the netdev family's xdp-features, the veth
//! peer read where it is, ethtool features); `run` (engine::ports) and
//! `check` ask the same functions.
//!
//! A redirect the target cannot take is lost without a trace on the
//! forwarding side: `bpf_redirect_map` returns XDP_REDIRECT, then either
//! `__xdp_enqueue` (kernel/bpf/devmap.c, 6.3+: the target's xdp_features
//! lacks NETDEV_XDP_ACT_NDO_XMIT) or the driver's `ndo_xdp_xmit` (veth:
//! `veth_xdp_xmit` returns -ENXIO while the peer's queue has no NAPI)
//! refuses it and the frame is freed, counted only in the target's or its
//! peer's drop counters. So a direction is never fast-pathed into such a
//! target: it is held (`flow::Hold::XdpTarget`) and goes through the kernel.

use std::fmt;

use crate::routes::link::peer::PeerFacts;
pub use crate::routes::link::XdpPortFacts as PortFacts;

/// Can the port receive XDP redirects?
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Yes, and how that is known.
    Takes(String),
    /// No: why, and what to change.
    Refuses { why: String, remedy: String },
}

impl Target {
    pub fn takes(&self) -> bool {
        matches!(self, Target::Takes(_))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Takes(how) => write!(f, "takes XDP redirects ({how})"),
            Target::Refuses { why, remedy } => write!(f, "cannot take XDP redirects: {why}; remedy: {remedy}"),
        }
    }
}

/// The remedy for a veth whose peer has no NAPI, run where the peer is.
fn peer_remedy(p: &PeerFacts) -> String {
    format!(
        "enable GRO on the peer ({}) or attach an XDP program there, or --mode tc",
        p.run_there(&format!("ethtool -K {} gro on", p.name))
    )
}

/// Whether XDP frames redirected into `f`'s port arrive.
///
/// The netdev family's xdp-features decide where the kernel has them: it
/// is what `__xdp_enqueue` checks, and a veth keeps NDO_XMIT there in step
/// with its peer (`veth_set_xdp_features`, `xdp_features_set_redirect_target`,
/// drivers/net/veth.c). Without it (before 6.3) a veth's peer is read as
/// `veth_xdp_xmit` would find it (up, with an XDP program or GRO), and any
/// other driver is assumed to take them: nft-offload only redirects to
/// ports where its own XDP program runs, which is what drivers that
/// implement `ndo_xdp_xmit` require.
pub fn target(f: &PortFacts) -> Target {
    let veth = f.driver == "veth";
    let peer = f.peer.as_ref().and_then(|p| p.as_ref().ok());
    if let Some(x) = f.features {
        if x.ndo_xmit() {
            let how = match peer {
                Some(p) if veth => format!("peer {} has {}", p.describe(), napi_source(p)),
                _ => "xdp-features: ndo-xmit".into(),
            };
            return Target::Takes(how);
        }
        return match (veth, peer) {
            (true, Some(p)) => Target::Refuses {
                why: format!("its peer {} has neither GRO nor an XDP program (no NAPI)", p.describe()),
                remedy: peer_remedy(p),
            },
            (true, None) => Target::Refuses {
                why: format!(
                    "its peer has neither GRO nor an XDP program (xdp-features of {} lacks ndo-xmit; the peer \
                     itself could not be read: {})",
                    f.name,
                    f.peer.as_ref().and_then(|p| p.as_ref().err()).map_or("not a veth?", |e| e.as_str())
                ),
                remedy: "enable GRO on the veth's peer (ethtool -K PEER gro on, where it is) or attach an XDP \
                         program there, or --mode tc"
                    .into(),
            },
            (false, _) => Target::Refuses {
                why: format!(
                    "its driver ({}) does not take XDP frames (xdp-features lacks ndo-xmit: no ndo_xdp_xmit)",
                    if f.driver.is_empty() { "?" } else { &f.driver }
                ),
                remedy: "--mode tc".into(),
            },
        };
    }
    match (veth, &f.peer) {
        (true, Some(Ok(p))) if p.up && (p.xdp_prog.is_some() || p.gro == Some(true)) => {
            Target::Takes(format!("peer {} has {}", p.describe(), napi_source(p)))
        }
        (true, Some(Ok(p))) if !p.up => {
            Target::Refuses { why: format!("its peer {} is down", p.describe()), remedy: peer_remedy(p) }
        }
        (true, Some(Ok(p))) => Target::Refuses {
            why: format!("its peer {} has neither GRO nor an XDP program (no NAPI)", p.describe()),
            remedy: peer_remedy(p),
        },
        (true, Some(Err(e))) => Target::Refuses {
            why: format!("whether its peer has NAPI cannot be told ({e}) and this kernel has no xdp-features"),
            remedy: "--mode tc".into(),
        },
        (true, None) => Target::Refuses {
            why: "its peer is unknown and this kernel has no xdp-features".into(),
            remedy: "--mode tc".into(),
        },
        (false, _) => Target::Takes(
            "assumed: this kernel reports no xdp-features, and nft-offload's XDP program \
                                     runs there"
                .into(),
        ),
    }
}

/// Whether frames arriving on `f`'s port may carry a partial L4 checksum,
/// which XDP must hand to the kernel (fo_csum_ports, fo_l4_csum_partial):
/// on a veth whose peer sends with TX checksum offload on (or whose peer
/// cannot be read); never from a NIC, whose frames come off a wire.
pub fn partial_csum(f: &PortFacts) -> bool {
    f.driver == "veth" && f.peer.as_ref().and_then(|p| p.as_ref().ok()).is_none_or(|p| p.tx_csum != Some(false))
}

fn napi_source(p: &PeerFacts) -> String {
    match p.xdp_prog {
        Some(id) => format!("an XDP program (id {id})"),
        None => "GRO on".into(),
    }
}

/// How the XDP program on a port reads the VLAN tags of the VLAN devices
/// stacked on it (or served through it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tags {
    /// No VLAN device to tell apart: a tagged frame reaches no connection
    /// the fast path carries.
    NoVlans,
    /// From the frame: the NIC (or the veth's peer) leaves them in it.
    InFrame(String),
    /// From the driver's receive metadata, by a device-bound program
    /// (`bpf_xdp_metadata_rx_vlan_tag`), tags in the frame too: right
    /// whichever way the tag comes.
    Metadata,
}

impl fmt::Display for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tags::NoVlans => f.write_str("no VLAN devices on it"),
            Tags::InFrame(why) => write!(f, "VLAN tags read in the frame ({why})"),
            Tags::Metadata => f.write_str(
                "VLAN tags read from the driver's receive metadata (bpf_xdp_metadata_rx_vlan_tag, a device-bound \
                 program) and from the frame",
            ),
        }
    }
}

/// How tags reach XDP on `f`'s port, which carries the VLAN devices
/// `vlans` (empty: none); Err: XDP cannot tell them apart there, with
/// exactly what to change.
///
/// A tag taken off before XDP runs is in the skb's (or descriptor's)
/// metadata only: on a NIC with rx-vlan-offload, and on a veth whose peer
/// has tx-vlan-hw-insert on (the sender's VLAN device leaves the tag in
/// the skb, `vlan_dev_hard_start_xmit`, and veth passes the skb on). XDP
/// would take such a frame for one of the port's own. Where the driver
/// exposes the tag (`xdp-rx-metadata-features: vlan-tag`, 6.8+; veth:
/// `veth_xdp_rx_vlan_tag`) the program reads it; a frame then keys like
/// `nf_flow_tuple_encap` keys it (metadata tag outermost, then the frame's).
pub fn tags(f: &PortFacts, vlans: &[String]) -> Result<Tags, String> {
    if vlans.is_empty() {
        return Ok(Tags::NoVlans);
    }
    if f.vlan_kfunc && f.features.is_some_and(|x| x.rx_vlan_tag()) {
        return Ok(Tags::Metadata);
    }
    let on = |v: &[Option<bool>; 2]| v.iter().any(|x| *x != Some(false));
    let list = vlans.join(", ");
    let why_no_md = if !f.vlan_kfunc {
        "this kernel has no bpf_xdp_metadata_rx_vlan_tag (6.8+)".to_string()
    } else {
        format!("{}'s driver does not expose it to XDP", f.name)
    };
    if f.driver == "veth" {
        return match &f.peer {
            Some(Ok(p)) if !on(&p.tx_vlan) => Ok(Tags::InFrame(format!("peer {} inserts them", p.describe()))),
            Some(Ok(p)) => Err(format!(
                "{} carries {list} and its peer {} hands tags over in the skb's metadata (tx-vlan-hw-insert or \
                 tx-vlan-stag-hw-insert on), which XDP cannot read: {why_no_md}; turn that off ({}), or --mode tc",
                f.name,
                p.describe(),
                p.run_there(&format!("ethtool -K {} txvlan off tx-vlan-stag-hw-insert off", p.name))
            )),
            Some(Err(e)) => Err(format!(
                "{} carries {list}, and whether its peer hands tags over in the skb's metadata cannot be told \
                 ({e}): {why_no_md}; use --mode tc",
                f.name
            )),
            None => Err(format!("{} carries {list} and its peer is unknown: use --mode tc", f.name)),
        };
    }
    if !on(&f.rx_vlan_strip) {
        return Ok(Tags::InFrame("rx-vlan-offload off".into()));
    }
    Err(format!(
        "{} strips VLAN tags before XDP sees them (rx-vlan-offload on) and carries {list}: {why_no_md}; turn that \
         off (ethtool -K {} rxvlan off rx-vlan-stag-hw-parse off), or --mode tc",
        f.name, f.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::link::netdev::XdpFeatures;
    use crate::routes::link::peer::Netns;

    fn peer(gro: bool, xdp: Option<u32>, up: bool) -> PeerFacts {
        PeerFacts {
            name: "wan0".into(),
            ifindex: 2,
            netns: Some(Netns::Named("lab-wan".into())),
            up,
            gro: Some(gro),
            xdp_prog: xdp,
            tx_vlan: [Some(true), Some(true)],
            tx_csum: Some(false),
        }
    }

    fn veth(features: Option<u64>, p: Option<Result<PeerFacts, String>>) -> PortFacts {
        PortFacts {
            name: "rwan".into(),
            driver: "veth".into(),
            features: features.map(|act| XdpFeatures { act, rx_metadata: 0 }),
            peer: p,
            ..Default::default()
        }
    }

    /// The kernel's xdp-features decide where it has them; the peer names
    /// the remedy, run in the peer's namespace.
    #[test]
    fn a_veth_without_napi_at_its_peer_refuses_with_the_command_to_run_there() {
        let t = target(&veth(Some(0x23), Some(Ok(peer(false, None, true)))));
        let Target::Refuses { why, remedy } = &t else { panic!("{t:?}") };
        assert_eq!(why, "its peer wan0 (namespace lab-wan) has neither GRO nor an XDP program (no NAPI)");
        assert_eq!(
            remedy,
            "enable GRO on the peer (ip netns exec lab-wan ethtool -K wan0 gro on) or attach an XDP program there, or \
             --mode tc"
        );
        assert!(t.to_string().starts_with("cannot take XDP redirects: its peer wan0"), "{t}");
        // NDO_XMIT set: takes, whatever the peer read said.
        let t = target(&veth(Some(0x67), Some(Ok(peer(true, None, true)))));
        assert_eq!(t, Target::Takes("peer wan0 (namespace lab-wan) has GRO on".into()));
        // The peer unreadable: still refused, by the features.
        let t = target(&veth(Some(0x23), Some(Err("gone".into()))));
        assert!(matches!(&t, Target::Refuses { why, .. } if why.contains("could not be read: gone")), "{t:?}");
    }

    /// Before 6.3 the peer alone decides, as veth_xdp_xmit would.
    #[test]
    fn without_xdp_features_a_veth_peer_decides() {
        assert!(target(&veth(None, Some(Ok(peer(true, None, true))))).takes());
        let t = target(&veth(None, Some(Ok(peer(false, Some(9), true)))));
        assert_eq!(t, Target::Takes("peer wan0 (namespace lab-wan) has an XDP program (id 9)".into()));
        assert!(!target(&veth(None, Some(Ok(peer(true, None, false))))).takes(), "down: no NAPI");
        assert!(!target(&veth(None, Some(Ok(peer(false, None, true))))).takes());
        assert!(!target(&veth(None, Some(Err("x".into())))).takes(), "unknown is not taken");
        // A NIC: assumed without features, refused by them.
        let nic = PortFacts { name: "eth0".into(), driver: "ixgbe".into(), ..Default::default() };
        assert!(target(&nic).takes());
        let t = target(&PortFacts { features: Some(XdpFeatures { act: 3, rx_metadata: 0 }), ..nic.clone() });
        assert!(matches!(&t, Target::Refuses { why, remedy } if why.contains("ixgbe") && remedy == "--mode tc"));
        assert!(target(&PortFacts { features: Some(XdpFeatures { act: 7, rx_metadata: 0 }), ..nic }).takes());
    }

    #[test]
    fn partial_checksums_come_only_from_a_veth_peer_with_tx_offload() {
        let mut p = peer(true, None, true);
        assert!(!partial_csum(&veth(None, Some(Ok(p.clone())))), "tx off at the peer");
        p.tx_csum = Some(true);
        assert!(partial_csum(&veth(None, Some(Ok(p.clone())))));
        p.tx_csum = None;
        assert!(partial_csum(&veth(None, Some(Ok(p)))), "unknown: assume it");
        assert!(partial_csum(&veth(None, Some(Err("gone".into())))));
        assert!(!partial_csum(&PortFacts { driver: "ixgbe".into(), ..Default::default() }), "off a wire");
    }

    #[test]
    fn tags_in_the_frame_in_metadata_or_refused_with_the_remedy() {
        let v = vec!["rwan.7".to_string()];
        let mut p = peer(true, None, true);
        // No VLAN devices: nothing to read.
        assert_eq!(tags(&veth(None, Some(Ok(p.clone()))), &[]), Ok(Tags::NoVlans));
        // The peer inserts tags in the frame.
        p.tx_vlan = [Some(false), Some(false)];
        assert!(matches!(tags(&veth(None, Some(Ok(p.clone()))), &v), Ok(Tags::InFrame(_))));
        // It hands them over in metadata: refused, naming the peer and the
        // command in its namespace, unless the kernel and driver read it.
        p.tx_vlan = [Some(true), Some(false)];
        let e = tags(&veth(None, Some(Ok(p.clone()))), &v).unwrap_err();
        assert!(e.contains("rwan carries rwan.7 and its peer wan0 (namespace lab-wan) hands tags over"), "{e}");
        assert!(e.contains("ip netns exec lab-wan ethtool -K wan0 txvlan off tx-vlan-stag-hw-insert off"), "{e}");
        assert!(e.contains("6.8+"), "{e}");
        let mut md = veth(Some(0x67), Some(Ok(p)));
        md.features = Some(XdpFeatures { act: 0x67, rx_metadata: 4 });
        md.vlan_kfunc = true;
        assert_eq!(tags(&md, &v), Ok(Tags::Metadata));
        // A NIC stripping tags, without metadata: ethtool on the NIC.
        let nic = PortFacts {
            name: "w0".into(),
            driver: "virtio_net".into(),
            rx_vlan_strip: [Some(true), None],
            vlan_kfunc: true,
            ..Default::default()
        };
        let e = tags(&nic, &["w0.7".into()]).unwrap_err();
        assert!(e.contains("w0's driver does not expose it") && e.contains("ethtool -K w0 rxvlan off"), "{e}");
        let off = PortFacts { rx_vlan_strip: [Some(false), Some(false)], ..nic };
        assert_eq!(tags(&off, &["w0.7".into()]), Ok(Tags::InFrame("rx-vlan-offload off".into())));
    }
}
