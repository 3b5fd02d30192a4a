//! Asking the kernel to resolve a next hop nobody has sent to yet.
//!
//! `bpf_fib_lookup` only reads the neighbour table (`bpf_ipv4_fib_lookup`
//! answers NO_NEIGH without a NUD_VALID entry); it never starts resolution.
//! The kernel's forwarding path does, on the first packet it sends
//! (`neigh_resolve_output` -> `neigh_event_send`). A connection whose reply
//! direction has not carried a packet yet (a one-way UDP stream, or replies
//! still to come) would therefore wait for a neighbour that nothing asks
//! for, while the kernel forwards its packets. The kernel flowtable has no
//! such wait: its transmit path resolves as it sends (`nf_flow_offload_ip_hook`,
//! FLOW_OFFLOAD_XMIT_NEIGH through `neigh_xmit`).
//!
//! So the engine does what `ip neigh replace ADDR dev DEV nud none use`
//! does: RTM_NEWNEIGH with NTF_USE, which makes `neigh_add`
//! (net/core/neighbour.c) create the entry if needed and call
//! `neigh_event_send` instead of setting a state: an ARP request or
//! neighbour solicitation, as the first forwarded packet would have sent.
//! An entry already valid is not changed (STALE is re-confirmed, as on use).
//! The answer arrives as a neighbour event, which retries the waiting
//! connections. Asked at most once a second per neighbour (`Solicits`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::dump::{answers, exchange};

const SOLICIT_SEQ: u32 = 11;

/// How often one neighbour may be asked for: the kernel's own probes
/// (`mcast_solicit`, one a second by default) retry in between.
pub const SOLICIT_EVERY: Duration = Duration::from_secs(1);

/// Neighbours remembered at most; past this the oldest half is forgotten
/// (a scan of unreachable clients must not grow the engine's memory).
const REMEMBERED: usize = 4096;

/// When each neighbour was last asked for.
#[derive(Debug, Default, Clone)]
pub struct Solicits(HashMap<(u32, IpAddr), Instant>);

impl Solicits {
    /// Whether (ifindex, addr) may be asked for at `now`; records it if so.
    pub fn due(&mut self, ifindex: u32, addr: IpAddr, now: Instant) -> bool {
        if let Some(t) = self.0.get(&(ifindex, addr)) {
            if now.saturating_duration_since(*t) < SOLICIT_EVERY {
                return false;
            }
        }
        if self.0.len() >= REMEMBERED {
            let mut ages: Vec<Instant> = self.0.values().copied().collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            self.0.retain(|_, t| *t > cut);
        }
        self.0.insert((ifindex, addr), now);
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// The RTM_NEWNEIGH request `ip neigh replace ADDR dev DEV nud none use`
/// sends.
fn request(ifindex: u32, addr: IpAddr) -> Vec<u8> {
    let mut m = NeighbourMessage::default();
    m.header.family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    m.header.ifindex = ifindex;
    // NUD_NONE: with NTF_USE the state is not applied (neigh_add calls
    // neigh_event_send instead of __neigh_update); NUD_PERMANENT, iproute2's
    // default, would make a new entry exempt from garbage collection.
    m.header.state = NeighbourState::None;
    m.header.flags = NeighbourFlags::Use;
    m.attributes.push(NeighbourAttribute::Destination(match addr {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }));
    let mut msg = NetlinkMessage::new(NetlinkHeader::default(), RouteNetlinkMessage::NewNeighbour(m).into());
    msg.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    msg.header.sequence_number = SOLICIT_SEQ;
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// Make the kernel resolve `addr` on `ifindex` (see the module comment).
pub fn solicit(ifindex: u32, addr: IpAddr) -> Result<()> {
    exchange(&request(ifindex, addr), |datagram| {
        for payload in answers(datagram, SOLICIT_SEQ)? {
            if let NetlinkPayload::Error(e) = payload {
                return match e.code {
                    None => Ok(true),
                    Some(_) => Err(e.to_io().into()),
                };
            }
        }
        Ok(false)
    })
    .map_err(|e| e.context(format!("rtnetlink neighbour solicit {addr} on interface {ifindex}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ask_a_second_per_neighbour() {
        let mut s = Solicits::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(s.due(3, a, t0));
        assert!(!s.due(3, a, t0 + Duration::from_millis(999)));
        // Another neighbour, or the same address on another device, is apart.
        assert!(s.due(3, b, t0));
        assert!(s.due(4, a, t0));
        assert!(s.due(3, a, t0 + SOLICIT_EVERY));
    }

    #[test]
    fn memory_is_bounded() {
        let mut s = Solicits::default();
        let t0 = Instant::now();
        for i in 0..(REMEMBERED as u32 * 3) {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(s.due(1, a, t0 + Duration::from_micros(u64::from(i))));
            assert!(s.len() <= REMEMBERED);
        }
    }

    #[test]
    fn request_is_what_ip_neigh_use_sends() {
        let buf = request(7, "198.51.100.9".parse().unwrap());
        let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();
        assert_eq!(m.header.flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE);
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) = m.payload else {
            panic!("not RTM_NEWNEIGH: {:?}", m.payload)
        };
        assert_eq!(n.header.ifindex, 7);
        assert_eq!(n.header.state, NeighbourState::None);
        assert_eq!(n.header.flags, NeighbourFlags::Use);
        assert_eq!(
            n.attributes,
            vec![NeighbourAttribute::Destination(NeighbourAddress::Inet("198.51.100.9".parse().unwrap()))]
        );
    }
}
