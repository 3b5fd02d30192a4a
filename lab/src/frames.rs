//! Ethernet frames for fast-path tests and the benchmark, built with
//! etherparse (so checksums and lengths are right by construction), and the
//! MAC addresses of the lab router's two ports and their peers.

// Frame builders take one argument per header field they set.
#![allow(clippy::too_many_arguments)]

use std::net::IpAddr;

use etherparse::PacketBuilder;

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
    let mut b = PacketBuilder::ethernet2(smac, dmac).ipv4(v4(s), v4(d), ttl).tcp(sp, dp, 1000, 64000);
    b = b.ack(5000);
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
