//! What a device's driver says it can do with XDP, from the `netdev`
//! generic netlink family (Linux 6.3+, `Documentation/netlink/specs/
//! netdev.yaml`): `xdp-features` (can it receive XDP redirects:
//! NETDEV_XDP_ACT_NDO_XMIT) and `xdp-rx-metadata-features` (6.8+: can a
//! device-bound program read a VLAN tag the NIC stripped,
//! NETDEV_XDP_RX_METADATA_VLAN_TAG). `netdev_nl_dev_fill`
//! (net/core/netdev-genl.c) reports `dev->xdp_features` as the driver keeps
//! it: veth sets NDO_XMIT only while its peer has NAPI (an XDP program or
//! GRO on the peer: `veth_set_xdp_features`, `xdp_features_set_redirect_target`
//! in drivers/net/veth.c), so for a veth the answer already reflects the
//! peer; a driver without `ndo_xdp_xmit` never sets it, and
//! `__xdp_enqueue` (kernel/bpf/devmap.c) then refuses the redirect.
//!
//! Without the family (older kernels) the answer is `None`: not known.

use anyhow::{anyhow, bail, Result};
use netlink_packet_core::{NetlinkBuffer, NLM_F_ACK, NLM_F_REQUEST};
use netlink_sys::protocols::NETLINK_GENERIC;

use super::super::dump::exchange_on;

/// include/uapi/linux/netdev.h
const NETDEV_FAMILY_NAME: &str = "netdev";
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NETDEV_A_DEV_XDP_RX_METADATA_FEATURES: u16 = 5;
pub const NETDEV_XDP_ACT_NDO_XMIT: u64 = 4;
pub const NETDEV_XDP_RX_METADATA_VLAN_TAG: u64 = 4;

/// include/uapi/linux/genetlink.h
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLA_F_MASK: u16 = !(1 << 15 | 1 << 14);

/// One device's XDP capabilities as its driver reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XdpFeatures {
    /// `xdp-features` (NETDEV_XDP_ACT_*).
    pub act: u64,
    /// `xdp-rx-metadata-features` (NETDEV_XDP_RX_METADATA_*); 0 on kernels
    /// before 6.3's metadata kfuncs, and before 6.8 for the VLAN tag.
    pub rx_metadata: u64,
}

impl XdpFeatures {
    /// The driver implements `ndo_xdp_xmit` and can take frames now.
    pub fn ndo_xmit(&self) -> bool {
        self.act & NETDEV_XDP_ACT_NDO_XMIT != 0
    }

    /// A device-bound program can read a stripped VLAN tag
    /// (`bpf_xdp_metadata_rx_vlan_tag`).
    pub fn rx_vlan_tag(&self) -> bool {
        self.rx_metadata & NETDEV_XDP_RX_METADATA_VLAN_TAG != 0
    }
}

/// The device's XDP capabilities, in the calling thread's namespace.
/// `Ok(None)`: this kernel has no `netdev` family (before 6.3).
pub fn xdp_features(ifindex: u32) -> Result<Option<XdpFeatures>> {
    let Some(family) = family_id(NETDEV_FAMILY_NAME)? else { return Ok(None) };
    let mut attrs = Vec::new();
    put_attr(&mut attrs, NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes());
    let req = genl_request(family, NETDEV_CMD_DEV_GET, &attrs);
    let mut out = None;
    request(&req, |attrs| {
        let mut f = XdpFeatures::default();
        for &(kind, v) in attrs {
            match kind {
                NETDEV_A_DEV_XDP_FEATURES => f.act = read_uint(v),
                NETDEV_A_DEV_XDP_RX_METADATA_FEATURES => f.rx_metadata = read_uint(v),
                _ => {}
            }
        }
        out = Some(f);
    })?;
    out.map(Some).ok_or_else(|| anyhow!("netdev dev-get for ifindex {ifindex}: no answer"))
}

/// The id of generic netlink family `name`; `None` when the kernel has
/// no such family (ENOENT).
fn family_id(name: &str) -> Result<Option<u16>> {
    let mut attrs = Vec::new();
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, &n);
    let req = genl_request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &attrs);
    let mut id = None;
    match request(&req, |attrs| {
        id = attrs.iter().find(|(k, v)| *k == CTRL_ATTR_FAMILY_ID && v.len() >= 2).map(|(_, v)| read_uint(v) as u16)
    }) {
        Ok(()) => id.map(Some).ok_or_else(|| anyhow!("genetlink: no id for family {name}")),
        Err(e) if e.downcast_ref::<std::io::Error>().and_then(|e| e.raw_os_error()) == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The attributes (type, value) in `b`, up to the first malformed one.
fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_F_MASK;
        if len < 4 || len > b.len() {
            break;
        }
        v.push((kind, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    v
}

/// A u8/u16/u32/u64 attribute in host order (the netdev family sends its
/// feature masks as uint, 4 or 8 bytes).
fn read_uint(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[..n].copy_from_slice(&v[..n]);
    u64::from_ne_bytes(b)
}

fn put_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

const SEQ: u32 = 1;

/// nlmsghdr + genlmsghdr (cmd, version 1) + attributes; asks for an ACK
/// so an answer without a message still ends the exchange.
fn genl_request(family: u16, cmd: u8, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&family.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    b.extend_from_slice(&SEQ.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&[cmd, 1, 0, 0]);
    b.extend_from_slice(attrs);
    b
}

/// Send `req`, hand the attributes of each answer to `take`; ends at the
/// ACK, fails with the kernel's errno.
fn request(req: &[u8], mut take: impl FnMut(&[(u16, &[u8])])) -> Result<()> {
    exchange_on(NETLINK_GENERIC, req, |datagram| absorb(datagram, &mut take))
}

/// One datagram of answers; true once the ACK (or an error) came.
fn absorb(mut datagram: &[u8], take: &mut impl FnMut(&[(u16, &[u8])])) -> Result<bool> {
    while !datagram.is_empty() {
        let nl = NetlinkBuffer::new_checked(datagram).map_err(|e| anyhow!("undecodable genetlink answer: {e}"))?;
        let len = nl.length() as usize;
        let (ty, seq, payload) = (nl.message_type(), nl.sequence_number(), nl.payload());
        let done = if seq != SEQ {
            false
        } else if ty == NLMSG_ERROR {
            let code = payload.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            if code != 0 {
                return Err(std::io::Error::from_raw_os_error(-code).into());
            }
            true
        } else {
            let Some(body) = payload.get(4..) else { bail!("genetlink answer without its header") };
            take(&attributes(body));
            false
        };
        if done {
            return Ok(true);
        }
        datagram = &datagram[len.next_multiple_of(4).min(datagram.len())..];
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(payload);
        b.resize(b.len().next_multiple_of(4), 0);
        b
    }

    /// A dev-get answer (ifindex, 8-byte features, metadata) then the ACK:
    /// the attributes are handed over, the exchange ends at the ACK.
    #[test]
    fn answers_and_the_ack() {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, NETDEV_A_DEV_IFINDEX, &3u32.to_ne_bytes());
        put_attr(&mut attrs, NETDEV_A_DEV_XDP_FEATURES, &0x47u64.to_ne_bytes());
        put_attr(&mut attrs, NETDEV_A_DEV_XDP_RX_METADATA_FEATURES, &7u64.to_ne_bytes());
        let mut body = vec![NETDEV_CMD_DEV_GET, 1, 0, 0];
        body.extend(&attrs);
        let mut d = answer(30, SEQ, &body);
        d.extend(answer(30, 99, &body)); // another request's: ignored
        let mut seen = Vec::new();
        assert!(!absorb(&d, &mut |a: &[(u16, &[u8])]| seen
            .push(a.iter().map(|(k, v)| (*k, read_uint(v))).collect::<Vec<_>>()))
        .unwrap());
        assert_eq!(seen, vec![vec![(1, 3), (3, 0x47), (5, 7)]]);
        let f = XdpFeatures { act: 0x47, rx_metadata: 7 };
        assert!(f.ndo_xmit() && f.rx_vlan_tag());
        assert!(!XdpFeatures { act: 0x23, rx_metadata: 3 }.ndo_xmit());
        let ack = answer(NLMSG_ERROR, SEQ, &0i32.to_ne_bytes());
        assert!(absorb(&ack, &mut |_: &[(u16, &[u8])]| {}).unwrap());
        let err = answer(NLMSG_ERROR, SEQ, &(-libc::ENODEV).to_ne_bytes());
        let e = absorb(&err, &mut |_: &[(u16, &[u8])]| {}).unwrap_err();
        assert_eq!(e.downcast_ref::<std::io::Error>().unwrap().raw_os_error(), Some(libc::ENODEV));
    }

    #[test]
    fn the_request_names_the_family_command_and_attributes() {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, b"netdev\0");
        assert_eq!(attrs.len(), 12, "4 + 7, padded to 4");
        let r = genl_request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &attrs);
        assert_eq!(r.len(), 32);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), GENL_ID_CTRL);
        assert_eq!(&r[16..20], &[CTRL_CMD_GETFAMILY, 1, 0, 0]);
    }

    /// A veth takes redirects exactly while its peer has NAPI: GRO turned
    /// on at the (up) peer sets NDO_XMIT on this end, off clears it.
    #[test]
    fn a_veth_reports_its_peers_napi() {
        std::thread::spawn(|| {
            // SAFETY: plain syscall, affects only this thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "needs root");
            let sh = |s: &str| assert!(std::process::Command::new("sh").args(["-ec", s]).status().unwrap().success());
            sh("ip link add pa type veth peer name pb; ip link set pa up; ip link set pb up");
            let pa = super::super::ifindex("pa").unwrap();
            let Some(f) = xdp_features(pa).unwrap() else { return eprintln!("no netdev family") };
            assert!(!f.ndo_xmit(), "GRO is off on a new veth: {f:?}");
            sh("ethtool -K pb gro on");
            assert!(xdp_features(pa).unwrap().unwrap().ndo_xmit());
            sh("ethtool -K pb gro off");
            assert!(!xdp_features(pa).unwrap().unwrap().ndo_xmit());
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    }

    /// On this kernel (6.3+): loopback answers, without NDO_XMIT.
    #[test]
    fn the_live_kernel_answers_for_loopback() {
        match xdp_features(1) {
            Ok(Some(f)) => assert!(!f.ndo_xmit(), "{f:?}"),
            Ok(None) => eprintln!("no netdev family on this kernel"),
            Err(e) => panic!("{e:#}"),
        }
    }
}
