//! Ethernet frames for fast-path tests and the benchmark, built with
//! etherparse (so checksums and lengths are right by construction), and the
//! MAC addresses of the lab router's two ports and their peers.

// Frame builders take one argument per header field they set.
#![allow(clippy::too_many_arguments)]

use std::net::IpAddr;

use etherparse::PacketBuilder;
use nft_offload::dataplane::fo_encap;

/// The LAN client's MAC.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
/// The WAN server's MAC.
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x05];
/// The router's LAN port.
pub const RTR_LAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
/// The router's WAN port.
pub const RTR_WAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];

/// An IPv4 address literal as bytes.
pub fn v4(s: &str) -> [u8; 4] {
    match s.parse::<IpAddr>().expect("an IP address") {
        IpAddr::V4(a) => a.octets(),
        _ => panic!("{s} is not an IPv4 address"),
    }
}

/// An IPv6 address literal as bytes.
pub fn v6(s: &str) -> [u8; 16] {
    match s.parse::<IpAddr>().expect("an IP address") {
        IpAddr::V6(a) => a.octets(),
        _ => panic!("{s} is not an IPv6 address"),
    }
}

/// IPv4 TCP, seq 1000, ACK 5000, window 64000, plus the `flags` named by
/// letters: S(YN) F(IN) R(ST) P(SH).
pub fn tcp4(
    smac: [u8; 6],
    dmac: [u8; 6],
    s: &str,
    d: &str,
    ttl: u8,
    sp: u16,
    dp: u16,
    flags: &str,
    payload: &[u8],
) -> Vec<u8> {
    tcp4_seq(smac, dmac, s, d, ttl, sp, dp, flags, (1000, 5000), payload)
}

/// [`tcp4`] with this (sequence, acknowledgement) number.
pub fn tcp4_seq(
    smac: [u8; 6],
    dmac: [u8; 6],
    s: &str,
    d: &str,
    ttl: u8,
    sp: u16,
    dp: u16,
    flags: &str,
    (seq, ack): (u32, u32),
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(smac, dmac).ipv4(v4(s), v4(d), ttl).tcp(sp, dp, seq, 64000);
    b = b.ack(ack);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('F') {
        b = b.fin();
    }
    if flags.contains('R') {
        b = b.rst();
    }
    if flags.contains('P') {
        b = b.psh();
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("writing a frame to a Vec");
    v
}

/// IPv4 UDP.
pub fn udp4(smac: [u8; 6], dmac: [u8; 6], s: &str, d: &str, ttl: u8, sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(v4(s), v4(d), ttl)
        .udp(sp, dp)
        .write(&mut v, payload)
        .expect("writing a frame to a Vec");
    v
}

/// IPv6 TCP, seq 1000, ACK 5000, window 64000.
pub fn tcp6(smac: [u8; 6], dmac: [u8; 6], s: &str, d: &str, hl: u8, sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv6(v6(s), v6(d), hl)
        .tcp(sp, dp, 1000, 64000)
        .ack(5000)
        .write(&mut v, payload)
        .expect("writing a frame to a Vec");
    v
}

/// IPv6 UDP.
pub fn udp6(smac: [u8; 6], dmac: [u8; 6], s: &str, d: &str, hl: u8, sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv6(v6(s), v6(d), hl)
        .udp(sp, dp)
        .write(&mut v, payload)
        .expect("writing a frame to a Vec");
    v
}

/// One header between Ethernet and IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    /// 802.1Q tag with this VLAN id.
    Vlan(u16),
    /// 802.1ad (QinQ service) tag with this VLAN id.
    Svlan(u16),
    /// PPPoE session header with this session id, then the PPP protocol.
    Pppoe(u16),
}

pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_P_PPP_SES: u16 = 0x8864;

/// `e` as a flow entry holds it (fo_flow_key.encap / fo_flow.out_encap):
/// the slots and how many are used.
pub fn fo_encaps(e: &[Encap]) -> ([fo_encap; 2], u8) {
    assert!(e.len() <= 2, "at most two headers (FO_ENCAP_MAX): {e:?}");
    let mut a = [fo_encap::default(); 2];
    for (slot, e) in a.iter_mut().zip(e) {
        let (proto, id) = match *e {
            Encap::Vlan(id) => (ETH_P_8021Q, id),
            Encap::Svlan(id) => (ETH_P_8021AD, id),
            Encap::Pppoe(sid) => (ETH_P_PPP_SES, sid),
        };
        *slot = fo_encap { proto: proto.to_be(), id };
    }
    (a, e.len() as u8)
}

/// `frame` (an Ethernet II frame from the builders above, no padding) with
/// `encap` between its MACs and its IP header, outermost first: each header
/// takes the previous one's type field, a PPPoE header carries the PPP
/// protocol (0x0021 IPv4, 0x0057 IPv6) and the length of what follows it.
pub fn encap(frame: &[u8], encap: &[Encap]) -> Vec<u8> {
    let (ethertype, l3) = (u16::from_be_bytes([frame[12], frame[13]]), &frame[14..]);
    let mut v = frame[..12].to_vec();
    for e in encap {
        match *e {
            Encap::Vlan(id) => {
                v.extend(ETH_P_8021Q.to_be_bytes());
                v.extend(id.to_be_bytes());
            }
            Encap::Svlan(id) => {
                v.extend(ETH_P_8021AD.to_be_bytes());
                v.extend(id.to_be_bytes());
            }
            Encap::Pppoe(sid) => {
                v.extend(ETH_P_PPP_SES.to_be_bytes());
                v.extend([0x11, 0]);
                v.extend(sid.to_be_bytes());
                v.extend((l3.len() as u16 + 2).to_be_bytes());
            }
        }
    }
    match encap.last() {
        Some(Encap::Pppoe(_)) => v.extend(
            match ethertype {
                0x0800 => 0x0021u16,
                0x86dd => 0x0057,
                t => panic!("no PPP protocol for ethertype {t:#06x}"),
            }
            .to_be_bytes(),
        ),
        _ => v.extend(ethertype.to_be_bytes()),
    }
    v.extend(l3);
    v
}

/// Recompute the IPv4 header checksum after a test edits the header.
pub fn fix_ip4_csum(f: &mut [u8]) {
    let ihl = (f[14] & 0x0f) as usize * 4;
    f[24] = 0;
    f[25] = 0;
    let mut s: u32 = 0;
    for c in f[14..14 + ihl].chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    let c = !(s as u16);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}
