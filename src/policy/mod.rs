//! Policy: which interfaces are managed and in which mode. Pure decisions,
//! unit-tested; the engine feeds them facts read from the system.

pub mod exclude;
pub mod include;
pub mod nft;
pub mod verdict;
pub mod xdp;

use crate::dataplane::Mode;
use crate::routes::link::{is_shaper, is_virtual, LinkInfo};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModeChoice {
    Auto,
    Xdp,
    Tc,
}

/// Mode for one interface, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModeDecision {
    pub mode: Mode,
    pub reason: String,
}

/// Choose a mode per interface.
///
/// `auto` picks XDP only where it is both correct and faster: a hardware
/// driver with native XDP and no shaping qdisc on egress (XDP redirect
/// bypasses qdiscs, so SQM would stop working). Software devices (veth,
/// bridges, tunnels) get TC: on veth an XDP redirect target needs NAPI on its
/// peer or frames are silently dropped, locally generated CHECKSUM_PARTIAL
/// frames lose their checksum metadata, and TC measured cheaper there.
/// Because an XDP redirect can only go to another XDP interface, if any
/// interface needs TC all of them use TC.
pub fn choose_modes(links: &[LinkInfo], requested: ModeChoice) -> Vec<ModeDecision> {
    match requested {
        ModeChoice::Xdp => {
            return links
                .iter()
                .map(|l| ModeDecision {
                    mode: Mode::Xdp,
                    reason: if is_virtual(&l.driver) {
                        format!(
                            "requested; note: {} is a software device ({}): directions into it are fast only \
                             while its peer has NAPI (GRO or an XDP program), and segments a local sender left \
                             with a partial checksum (TX checksum offload) go through the kernel",
                            l.name,
                            if l.driver.is_empty() { "unknown driver" } else { &l.driver }
                        )
                    } else {
                        "requested".into()
                    },
                })
                .collect()
        }
        ModeChoice::Tc => {
            return links.iter().map(|_| ModeDecision { mode: Mode::Tc, reason: "requested".into() }).collect();
        }
        ModeChoice::Auto => {}
    }
    let own: Vec<Option<String>> = links
        .iter()
        .map(|l| {
            if l.link_type != libc::ARPHRD_ETHER && l.link_type != libc::ARPHRD_LOOPBACK {
                Some(format!("{} has no Ethernet header (link type {}): only TC can run there", l.name, l.link_type))
            } else if is_virtual(&l.driver) {
                Some(format!(
                    "{} is a software device ({}): TC is correct there and cheaper than XDP",
                    l.name,
                    if l.driver.is_empty() { "unknown driver" } else { &l.driver }
                ))
            } else if let Some(why) = vlan_stripped(l) {
                Some(format!("{why}: TC reads the tag"))
            } else if is_shaper(&l.qdisc) {
                Some(format!("{} has a shaping qdisc ({}): TC keeps it in the path (SQM)", l.name, l.qdisc))
            } else {
                None
            }
        })
        .collect();
    let first_tc = own.iter().enumerate().find_map(|(i, r)| r.as_ref().map(|r| (i, r.clone())));
    links
        .iter()
        .zip(own)
        .map(|(l, r)| match (&first_tc, r) {
            (_, Some(r)) => ModeDecision { mode: Mode::Tc, reason: r },
            (Some((_, why)), None) => ModeDecision {
                mode: Mode::Tc,
                reason: format!("XDP-capable, but XDP can only redirect to XDP interfaces and {why}"),
            },
            (None, None) => ModeDecision {
                mode: Mode::Xdp,
                reason: format!("hardware driver {} without a shaper: native XDP is fastest", l.driver),
            },
        })
        .collect()
}

/// Why XDP cannot run on `l` at all, if it cannot: a bridge has no native
/// XDP (it forwards in br_dev_xmit and br_handle_frame, with no ndo_bpf),
/// so `--mode xdp` on it is refused rather than left to a kernel error;
/// auto picks TC there (`is_virtual`).
pub fn xdp_refused(l: &LinkInfo) -> Option<String> {
    if l.link_type != libc::ARPHRD_ETHER && l.link_type != libc::ARPHRD_LOOPBACK {
        // Checked before anything is attached (Dataplane::attach refuses
        // it too, but only when its turn comes).
        return Some(format!(
            "cannot attach XDP to {}: it has no Ethernet header (link type {}): use --mode tc",
            l.name, l.link_type
        ));
    }
    if l.driver == "bridge" {
        return Some(format!(
            "{} is a bridge, which has no native XDP: use --mode tc (TC on the bridge), or list its ports \
             instead of the bridge to use XDP on them",
            l.name
        ));
    }
    // VLAN tags are `xdp::tags`'s (the frame, the receive metadata or a
    // refusal with the remedy), asked per port when XDP is attached.
    None
}

/// Without the receive metadata (a program bound to the port,
/// `xdp::tags`), XDP cannot see a tag the NIC stripped: a frame of one of
/// the VLANs would look like the port's own. TC reads the tag from the
/// skb, so `auto` picks TC there.
fn vlan_stripped(l: &LinkInfo) -> Option<String> {
    (!l.vlans_stripped.is_empty()).then(|| {
        format!(
            "{} strips VLAN tags before XDP sees them (rx-vlan-offload on) and carries VLAN device(s) {}",
            l.name,
            l.vlans_stripped.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_is_refused_on_a_bridge_only() {
        let why = xdp_refused(&link("br-lan", "bridge", "noqueue")).expect("a bridge");
        assert!(why.starts_with("br-lan is a bridge, which has no native XDP: use --mode tc"), "{why}");
        for l in [link("lan1", "veth", "noqueue"), link("eth0", "mlx5_core", "mq"), link("x", "", "")] {
            assert_eq!(xdp_refused(&l), None, "{l:?}");
        }
        let d = choose_modes(&[link("br-lan", "bridge", "noqueue"), link("eth0", "mlx5_core", "mq")], ModeChoice::Auto);
        assert!(d.iter().all(|d| d.mode == Mode::Tc), "auto picks TC: {d:?}");
    }

    /// eth0 carrying eth0.2 with rx-vlan-offload on: XDP would take a
    /// VLAN 2 frame for one of eth0's own.
    #[test]
    fn xdp_is_refused_before_attaching_on_a_device_without_ethernet() {
        let wg = LinkInfo { link_type: libc::ARPHRD_NONE, ..link("wg0", "wireguard", "noqueue") };
        assert_eq!(
            xdp_refused(&wg).as_deref(),
            Some("cannot attach XDP to wg0: it has no Ethernet header (link type 65534): use --mode tc")
        );
    }

    /// `auto` picks TC on a NIC stripping the tags of its VLAN devices;
    /// `--mode xdp` there is `xdp::tags`'s to judge (metadata or refusal).
    #[test]
    fn a_nic_that_strips_vlan_tags_gets_tc() {
        let eth0 = LinkInfo { vlans_stripped: vec!["eth0.2".into()], ..link("eth0", "mlx5_core", "mq") };
        assert_eq!(xdp_refused(&eth0), None);
        let d = choose_modes(&[eth0, link("eth1", "mlx5_core", "mq")], ModeChoice::Auto);
        assert!(d.iter().all(|d| d.mode == Mode::Tc), "auto picks TC: {d:?}");
        assert!(d[0].reason.ends_with("carries VLAN device(s) eth0.2: TC reads the tag"), "{}", d[0].reason);
    }

    fn link(name: &str, driver: &str, qdisc: &str) -> LinkInfo {
        LinkInfo {
            name: name.into(),
            ifindex: 1,
            up: true,
            driver: driver.into(),
            mtu: 1500,
            qdisc: qdisc.into(),
            link_type: libc::ARPHRD_ETHER,
            vlans_stripped: Vec::new(),
        }
    }

    /// pppoe-wan, wg0: no Ethernet header, so TC there and (XDP redirecting
    /// only to XDP interfaces) everywhere.
    #[test]
    fn a_device_without_ethernet_gets_tc_everywhere() {
        let ppp = LinkInfo { link_type: libc::ARPHRD_PPP, ..link("pppoe-wan", "", "fq_codel") };
        let d = choose_modes(&[link("eth0", "mlx5_core", "mq"), ppp], ModeChoice::Auto);
        assert!(d.iter().all(|d| d.mode == Mode::Tc), "{d:?}");
        assert!(d[1].reason.contains("pppoe-wan has no Ethernet header (link type 512)"), "{}", d[1].reason);
        assert!(d[0].reason.contains("XDP can only redirect to XDP interfaces"), "{}", d[0].reason);
    }

    #[test]
    fn veth_gets_tc_with_reason() {
        let d = choose_modes(&[link("rlan", "veth", "noqueue"), link("rwan", "veth", "noqueue")], ModeChoice::Auto);
        assert!(d.iter().all(|d| d.mode == Mode::Tc));
        assert!(d[0].reason.contains("software device (veth)"));
    }

    #[test]
    fn hardware_without_shaper_gets_xdp() {
        let d = choose_modes(&[link("eth0", "mlx5_core", "mq"), link("eth1", "ixgbe", "fq_codel")], ModeChoice::Auto);
        assert!(d.iter().all(|d| d.mode == Mode::Xdp), "{d:?}");
    }

    #[test]
    fn a_shaper_anywhere_means_tc_everywhere() {
        let d = choose_modes(&[link("eth0", "mlx5_core", "htb"), link("eth1", "ixgbe", "mq")], ModeChoice::Auto);
        assert_eq!(d[0].mode, Mode::Tc);
        assert!(d[0].reason.contains("shaping qdisc (htb)"));
        assert_eq!(d[1].mode, Mode::Tc);
        assert!(d[1].reason.contains("XDP can only redirect to XDP interfaces"));
    }

    #[test]
    fn explicit_modes_are_obeyed_with_warnings() {
        let d = choose_modes(&[link("rlan", "veth", "noqueue")], ModeChoice::Xdp);
        assert_eq!(d[0].mode, Mode::Xdp);
        assert!(d[0].reason.contains("NAPI"));
        let d = choose_modes(&[link("eth0", "ixgbe", "mq")], ModeChoice::Tc);
        assert_eq!(d[0].mode, Mode::Tc);
    }
}
