//! The MTU metric of the IPv4 route a packet is forwarded by.
//!
//! `bpf_fib_lookup` reports `ip_mtu_from_fib_result` (net/ipv4/route.c),
//! which takes a route's MTU metric only when it is locked (or with
//! `ip_forward_use_pmtu`), else the device MTU. The forwarding path itself,
//! `ip_forward` through `ip_dst_mtu_maybe_forward` (include/net/ip.h),
//! always honours the metric when forwarding. So with `ip route add ...
//! dev wg0 mtu 1400` on a 1420-byte device, the helper says 1420 while the
//! kernel refuses a 1401-byte packet with DF (ICMP fragmentation needed).
//! The kernel's own answer for the packet, `RTM_GETROUTE` with its input
//! interface (`inet_rtm_getroute`, which reports the route's metrics),
//! closes the gap. IPv6 needs nothing: `ip6_dst_mtu_maybe_forward` takes an
//! unlocked metric only for locally generated packets, as the helper does.

use std::net::IpAddr;

use anyhow::{bail, Result};
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::dump::{answers, exchange};
use super::Packet;

const GET_SEQ: u32 = 7;

/// The `RTM_GETROUTE` request for `p` (IPv4 only), as `ip route get DST
/// from SRC iif IF [mark M] ipproto P sport S dport D` asks it.
fn request(p: &Packet) -> Option<RouteMessage> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (p.src, p.dst) else { return None };
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = 32;
    m.header.source_prefix_length = 32;
    m.attributes = vec![
        RouteAttribute::Destination(RouteAddress::Inet(dst)),
        RouteAttribute::Source(RouteAddress::Inet(src)),
        RouteAttribute::Iif(p.in_ifindex),
        RouteAttribute::IpProto(p.proto),
        RouteAttribute::Sport(p.sport),
        RouteAttribute::Dport(p.dport),
    ];
    if p.mark != 0 {
        m.attributes.push(RouteAttribute::Mark(p.mark));
    }
    Some(m)
}

/// Whether any IPv4 route, in any table, carries an MTU metric: only then
/// can the helper's MTU be wrong, so only then is each resolution asked
/// about (one netlink round trip, some 45 µs). Read at start and after each
/// route change; a dump that fails answers true (ask every time).
pub fn any_route_mtu() -> bool {
    let mut req = RouteMessage::default();
    req.header.address_family = AddressFamily::Inet;
    match super::dump::dump(RouteNetlinkMessage::GetRoute(req), "IPv4 route") {
        Ok(msgs) => msgs.iter().any(|m| matches!(m, RouteNetlinkMessage::NewRoute(r) if mtu_of(r).is_some())),
        Err(e) => {
            tracing::warn!("{e:#}: checking each path's route MTU");
            true
        }
    }
}

/// RTAX_MTU of a route the kernel answered with, if it has one.
fn mtu_of(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Metrics(ms) => ms.iter().find_map(|x| match x {
            RouteMetric::Mtu(v) if *v != 0 => Some(*v),
            _ => None,
        }),
        _ => None,
    })
}

/// The MTU metric of the route the kernel forwards `p` by; `None` when it
/// has none (the device MTU applies) or `p` is IPv6.
pub fn forward_mtu_metric(p: &Packet) -> Result<Option<u32>> {
    let Some(req) = request(p) else { return Ok(None) };
    let mut msg = NetlinkMessage::new(NetlinkHeader::default(), RouteNetlinkMessage::GetRoute(req).into());
    msg.header.flags = NLM_F_REQUEST;
    msg.header.sequence_number = GET_SEQ;
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    let mut found: Option<Option<u32>> = None;
    exchange(&buf, |datagram| {
        for payload in answers(datagram, GET_SEQ)? {
            match payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => found = Some(mtu_of(&r)),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io().into()),
                _ => {}
            }
        }
        Ok(found.is_some())
    })
    .map_err(|e| e.context(format!("rtnetlink route get {} from {} iif {}", p.dst, p.src, p.in_ifindex)))?;
    match found {
        Some(m) => Ok(m),
        None => bail!("rtnetlink route get {}: no route in the answer", p.dst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteMetric;

    fn packet(src: &str, dst: &str, mark: u32) -> Packet {
        Packet {
            in_ifindex: 3,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: 6,
            sport: 1,
            dport: 2,
            mark,
        }
    }

    #[test]
    fn the_request_asks_as_the_forwarded_packet() {
        let r = request(&packet("192.168.1.2", "10.100.0.1", 0)).unwrap();
        assert_eq!((r.header.destination_prefix_length, r.header.source_prefix_length), (32, 32));
        assert!(r.attributes.contains(&RouteAttribute::Iif(3)));
        assert!(r.attributes.contains(&RouteAttribute::Destination(RouteAddress::Inet([10, 100, 0, 1].into()))));
        assert!(!r.attributes.iter().any(|a| matches!(a, RouteAttribute::Mark(_))), "no mark: left out");
        let r = request(&packet("192.168.1.2", "10.100.0.1", 9)).unwrap();
        assert!(r.attributes.contains(&RouteAttribute::Mark(9)));
        // IPv6 forwarding takes the helper's answer as it is.
        assert!(request(&packet("fd00:1::2", "fd00:100::1", 0)).is_none());
    }

    #[test]
    fn metric_table() {
        let rows: &[(&str, Vec<RouteAttribute>, Option<u32>)] = &[
            ("no metrics", vec![RouteAttribute::Oif(4)], None),
            ("metrics without MTU", vec![RouteAttribute::Metrics(vec![RouteMetric::Hoplimit(64)])], None),
            (
                "MTU 1400",
                vec![RouteAttribute::Metrics(vec![RouteMetric::Hoplimit(64), RouteMetric::Mtu(1400)])],
                Some(1400),
            ),
            ("MTU 0 is none", vec![RouteAttribute::Metrics(vec![RouteMetric::Mtu(0)])], None),
        ];
        for (what, attrs, want) in rows {
            let mut m = RouteMessage::default();
            m.attributes = attrs.clone();
            assert_eq!(mtu_of(&m), *want, "{what}");
        }
    }
}
