//! The benchmark's connections in a private router (see
//! [`crate::private_router`]): installed directly in the fast path's map,
//! for the measurements that run the fast path with BPF_PROG_TEST_RUN.

use anyhow::{anyhow, Result};

use nft_offload::conntrack::CtTuple;
use nft_offload::dataplane::Dataplane;
use nft_offload::flow::{build_direction, NextHop};

use crate::frames::{CLIENT_MAC, RTR_LAN_MAC, RTR_WAN_MAC, SERVER_MAC};

/// Client address and port of the i-th installed benchmark connection.
pub(super) fn client_of(i: u32) -> ([u8; 4], u16) {
    let hi = i / 50000;
    ([192, 168, (1 + hi / 250) as u8, (2 + hi % 250) as u8], (10000 + i % 50000) as u16)
}

/// The masquerade address of client `i`: client ports repeat every 50,000
/// clients, so each block gets its own address (as conntrack would remap
/// instead of letting two reply tuples clash; installs refuse a taken key).
fn nat_of(i: u32) -> String {
    match i / 50000 {
        0 => "203.0.113.1".to_string(),
        hi => format!("198.18.{}.{}", hi / 250, 1 + hi % 250),
    }
}

/// A TCP ACK from the LAN client: IPv4 from `src4`, or the IPv6 client.
pub(super) fn tcp_frame(v6: bool, src4: [u8; 4], sp: u16, ttl: u8) -> Vec<u8> {
    let mut v = Vec::new();
    let eth = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, RTR_LAN_MAC);
    let ip = if v6 {
        eth.ipv6(
            [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            ttl,
        )
    } else {
        eth.ipv4(src4, [203, 0, 113, 2], ttl)
    };
    ip.tcp(sp, 5201, 1, 65000).ack(1).write(&mut v, &[0u8; 6]).expect("frame");
    v
}

pub(super) fn tuple(s: &str, sp: u16, d: &str, dp: u16) -> CtTuple {
    CtTuple { src: s.parse().expect("addr"), dst: d.parse().expect("addr"), proto: 6, sport: sp, dport: dp }
}

pub(super) fn hops(lan: u32, wan: u32) -> (NextHop, NextHop) {
    (
        NextHop { ifindex: wan, smac: RTR_WAN_MAC, dmac: SERVER_MAC, mtu: 1500, xdp_ok: true },
        NextHop { ifindex: lan, smac: RTR_LAN_MAC, dmac: CLIENT_MAC, mtu: 1500, xdp_ok: true },
    )
}

/// Install `n` masqueraded IPv4 TCP connections (both directions) with
/// client ports 10000.. and fd00:1::2 -> fd00:2::2 port 40002 (IPv6).
pub(super) fn install(dp: &Dataplane, lan: u32, wan: u32, n: u32) -> Result<()> {
    let (to_wan, to_lan) = hops(lan, wan);
    for i in 0..n {
        let (addr, cport) = client_of(i);
        let client = std::net::Ipv4Addr::from(addr).to_string();
        let o = tuple(&client, cport, "203.0.113.2", 5201);
        let rp = tuple("203.0.113.2", 5201, &nat_of(i), cport);
        let d = build_direction(&o, &rp, lan, &to_wan);
        dp.put_flow(&d.key, &d.val)?;
        let d = build_direction(&rp, &o, wan, &to_lan);
        dp.put_flow(&d.key, &d.val)?;
    }
    let o = tuple("fd00:1::2", 40002, "fd00:2::2", 5201);
    let rp = tuple("fd00:2::2", 5201, "fd00:1::2", 40002);
    let d = build_direction(&o, &rp, lan, &to_wan);
    dp.put_flow(&d.key, &d.val)?;
    Ok(())
}

/// Run `f` on a thread of its own: [`crate::private_router::PrivateRouter::enter`]
/// moves the calling thread into a new namespace, which must not be ours.
pub(super) fn in_thread<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    std::thread::spawn(f).join().map_err(|_| anyhow!("benchmark thread panicked"))?
}
