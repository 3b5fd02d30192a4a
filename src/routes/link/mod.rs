//! Facts about network interfaces: every link from one rtnetlink dump
//! (`LinkTable`), plus the driver name and GRO state from the ethtool ioctl,
//! the two facts rtnetlink does not carry. Both answer for the calling
//! thread's network namespace.

mod ethtool;
pub mod netdev;
pub mod peer;
mod table;

use std::ffi::CString;

use anyhow::{bail, Result};

pub use ethtool::{driver, features, gro, rx_vlan_offload};
pub use table::{LinkFacts, LinkRef, LinkTable, OperState, Undecoded, XdpMode, XdpProgs};

/// An interface as mode selection and the engine see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    /// Admin up with carrier.
    pub up: bool,
    pub driver: String,
    pub mtu: u32,
    /// Root egress qdisc kind ("noqueue", "fq_codel", "htb", ...; "noop"
    /// while an interface has never been up).
    pub qdisc: String,
    /// ARPHRD_* (1: Ethernet; ppp, WireGuard, tun have no link-layer header).
    pub link_type: u16,
    /// VLAN devices stand on it while its NIC strips tags on receive
    /// (rx-vlan-offload): XDP would see their frames untagged, as if they
    /// were its own. Their names.
    pub vlans_stripped: Vec<String>,
}

impl LinkInfo {
    /// From the link's record and its driver (see `driver`).
    pub fn new(l: &LinkFacts, driver: String) -> Self {
        LinkInfo {
            name: l.name.clone(),
            ifindex: l.ifindex,
            up: l.up(),
            driver,
            mtu: l.mtu,
            qdisc: l.qdisc.clone().unwrap_or_default(),
            link_type: l.link_type,
            vlans_stripped: Vec::new(),
        }
    }
}

impl LinkTable {
    /// `LinkInfo` of the link called `name`, with its driver.
    pub fn info(&self, name: &str) -> Result<LinkInfo> {
        match self.by_name(name) {
            Some(l) => {
                let vlans: Vec<String> = self
                    .iter()
                    .filter(|v| {
                        v.kind.as_deref() == Some("vlan")
                            && v.link.as_ref().is_some_and(|r| r.ifindex == l.ifindex && r.netnsid.is_none())
                    })
                    .map(|v| v.name.clone())
                    .collect();
                let stripped = !vlans.is_empty() && rx_vlan_offload(name).unwrap_or(true);
                Ok(LinkInfo {
                    vlans_stripped: if stripped { vlans } else { Vec::new() },
                    ..LinkInfo::new(l, driver(name))
                })
            }
            None => bail!("interface {}", self.why_missing(name)),
        }
    }

    /// Why there is no record for `name`: no such link, or one the decoder
    /// rejected.
    pub fn why_missing(&self, name: &str) -> String {
        match self.undecoded().iter().find(|u| u.name == name) {
            Some(u) => format!("{name}: its rtnetlink attributes could not be decoded ({})", u.error),
            None => format!("{name} does not exist in this network namespace"),
        }
    }
}

/// Name to index in the calling thread's namespace (the kernel's own
/// lookup, SIOCGIFINDEX: no dump needed for one name).
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buffer of IF_NAMESIZE as required.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated string.
    Some(unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// What `policy::xdp` judges a port by: read here, judged there.
#[derive(Debug, Clone, Default)]
pub struct XdpPortFacts {
    pub name: String,
    pub driver: String,
    /// The netdev family's answer (6.3+); None: not available.
    pub features: Option<netdev::XdpFeatures>,
    /// veth only: its peer, or why it could not be read.
    pub peer: Option<Result<peer::PeerFacts, String>>,
    /// Not veth: the NIC takes 802.1Q / 802.1ad tags off on receive
    /// (rx-vlan-hw-parse, rx-vlan-stag-hw-parse); None: not readable.
    pub rx_vlan_strip: [Option<bool>; 2],
    /// The kernel's BTF has `bpf_xdp_metadata_rx_vlan_tag` (6.8+).
    pub vlan_kfunc: bool,
}

impl XdpPortFacts {
    /// Read link `l` of `table` (this namespace's links); `peer`: read a
    /// veth's peer too (it may take a scan of the namespaces, see `peer`).
    pub fn read(table: &LinkTable, l: &LinkFacts, driver: &str, peer: bool) -> Self {
        let veth = driver == "veth";
        let strip = if veth {
            Vec::new()
        } else {
            features(&l.name, &["rx-vlan-hw-parse", "rx-vlan-stag-hw-parse"]).unwrap_or_default()
        };
        XdpPortFacts {
            name: l.name.clone(),
            driver: driver.to_string(),
            features: netdev::xdp_features(l.ifindex).unwrap_or_else(|e| {
                tracing::debug!(iface = %l.name, "netdev xdp-features: {e:#}");
                None
            }),
            peer: (veth && peer).then(|| peer::veth_peer(table, l)),
            rx_vlan_strip: [strip.first().copied().flatten(), strip.get(1).copied().flatten()],
            vlan_kfunc: has_rx_vlan_kfunc(),
        }
    }
}

/// Whether the kernel's BTF has `bpf_xdp_metadata_rx_vlan_tag` (6.8+):
/// read once (BTF is a few MB), kept as the answer only. Names in the BTF
/// string section are NUL-separated: whole-name match.
pub fn has_rx_vlan_kfunc() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let raw = std::fs::read(crate::host::BTF_VMLINUX).unwrap_or_default();
        raw.split(|b| *b == 0).any(|s| s == b"bpf_xdp_metadata_rx_vlan_tag")
    })
}

/// One interface, from a fresh dump.
pub fn info(name: &str) -> Result<LinkInfo> {
    LinkTable::dump()?.info(name)
}

/// Qdiscs that shape or schedule: with one of these on egress, XDP
/// redirect would bypass it, so auto mode picks TC (keeps SQM working).
/// "noop" is what a never-up interface has: it gets its real qdisc on up.
pub fn is_shaper(qdisc: &str) -> bool {
    !matches!(qdisc, "" | "noop" | "noqueue" | "pfifo_fast" | "mq" | "fq_codel" | "pfifo" | "bfifo" | "fq")
}

/// Drivers that are software devices (veth, bridges, tunnels): XDP on
/// them either runs in generic mode or has pitfalls (veth needs NAPI on the
/// peer and loses CHECKSUM_PARTIAL metadata), and TC measured cheaper.
pub fn is_virtual(driver: &str) -> bool {
    matches!(
        driver,
        "veth"
            | "bridge"
            | "tun"
            | "vxlan"
            | "wireguard"
            | "ppp"
            | "802.1Q VLAN Support"
            | "bonding"
            | "dummy"
            | "macvlan"
            | "ipvlan"
            | "ifb"
            | "geneve"
            | "gre"
            | "ip_gre"
            | "ip6_gre"
            | "ipip"
            | "sit"
            | "nlmon"
            | "team"
            | ""
    )
}
