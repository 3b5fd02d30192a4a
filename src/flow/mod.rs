//! Pure decision logic, free of I/O so it is unit-tested directly:
//! eligibility (mirrors `nft_flow_offload_eval`), the two directional flow
//! entries with their NAT rewrite and checksum differences, and the lifecycle
//! of an offloaded flow (keepalive, idle timeout, teardown).

pub mod entry;
pub mod hold;
pub mod lifecycle;

pub use entry::{
    build_direction, csum_diff, egress_key, Direction, Encap, EncapStack, LinkLayer, NextHop, FO_F_CT_REFRESH,
    FO_F_CT_REPLY,
};
pub use hold::{Held, Hold};
pub use lifecycle::{
    decide, decide_end, next_check, next_end_check, udp_status_seen, Action, CtTimeouts, FlowClock, TeardownReason,
};

use std::net::IpAddr;

use crate::conntrack::{status, tcp_state, CtEntry};

/// A connection: its original tuple and zone, as conntrack identifies it
/// (`nf_conntrack_find_get` hashes the tuple within a zone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub zone: u16,
}

impl ConnId {
    /// The least id in `Ord`, for ranges.
    pub const MIN: ConnId = ConnId {
        src: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        dst: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        proto: 0,
        sport: 0,
        dport: 0,
        zone: 0,
    };

    pub fn of(e: &CtEntry) -> Self {
        let o = &e.orig;
        ConnId { src: o.src, dst: o.dst, proto: o.proto, sport: o.sport, dport: o.dport, zone: e.zone }
    }
}

/// For log lines: `tcp 192.168.1.2:40000 -> 203.0.113.2:5201` (and the
/// zone when it is not 0), not Rust's struct notation.
impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ep = |a: IpAddr, p: u16| match a {
            IpAddr::V4(v4) => format!("{v4}:{p}"),
            IpAddr::V6(v6) => format!("[{v6}]:{p}"),
        };
        write!(f, "{} {} -> {}", crate::proto::name(self.proto), ep(self.src, self.sport), ep(self.dst, self.dport))?;
        if self.zone != 0 {
            write!(f, " zone {}", self.zone)?;
        }
        Ok(())
    }
}

use crate::proto::{IPPROTO_TCP, IPPROTO_UDP};

/// Why a conntrack entry cannot be offloaded (yet). Shown by `flows`/`status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ineligible {
    NotTcpUdp,
    TcpNotEstablished,
    NotAssured,
    NotConfirmed,
    Helper,
    SeqAdjust,
    NatClash,
    Dying,
    /// In a conntrack zone other than 0: the fast path cannot know a
    /// packet's zone before conntrack assigns it (`ct zone set` rules), so
    /// its key could match another zone's connection with the same tuple.
    Zoned,
}

impl Ineligible {
    pub fn as_str(self) -> &'static str {
        match self {
            Ineligible::NotTcpUdp => "protocol is not TCP or UDP",
            Ineligible::TcpNotEstablished => "TCP not in ESTABLISHED state",
            Ineligible::NotAssured => "TCP connection not ASSURED yet",
            Ineligible::NotConfirmed => "conntrack entry not confirmed",
            Ineligible::Helper => "conntrack helper attached (ALG)",
            Ineligible::SeqAdjust => "sequence adjustment in use",
            Ineligible::NatClash => "NAT clash entry",
            Ineligible::Dying => "conntrack entry is dying",
            Ineligible::Zoned => "conntrack zone other than 0",
        }
    }
}

/// The kernel's rules for whether a connection may be offloaded, from
/// `nft_flow_offload_eval` (net/netfilter/nft_flow_offload.c): TCP only when
/// ESTABLISHED and ASSURED (`nf_conntrack_tcp_established`), UDP once
/// confirmed, never with a helper, seq-adjust or NAT clash.
pub fn eligible(e: &CtEntry) -> Result<(), Ineligible> {
    match e.orig.proto {
        IPPROTO_TCP => {
            if e.tcp_state != Some(tcp_state::ESTABLISHED) {
                return Err(Ineligible::TcpNotEstablished);
            }
            if e.status & status::ASSURED == 0 {
                return Err(Ineligible::NotAssured);
            }
        }
        IPPROTO_UDP => {}
        _ => return Err(Ineligible::NotTcpUdp),
    }
    if e.status & status::CONFIRMED == 0 {
        return Err(Ineligible::NotConfirmed);
    }
    if e.has_helper || e.status & status::HELPER != 0 {
        return Err(Ineligible::Helper);
    }
    if e.status & status::SEQ_ADJUST != 0 {
        return Err(Ineligible::SeqAdjust);
    }
    if e.status & status::NAT_CLASH != 0 {
        return Err(Ineligible::NatClash);
    }
    if e.status & status::DYING != 0 {
        return Err(Ineligible::Dying);
    }
    if e.zone != 0 {
        return Err(Ineligible::Zoned);
    }
    Ok(())
}

/// Whether the kernel's `flow add` could not have taken this connection
/// yet. `nft_flow_offload_eval` (net/netfilter/nft_flow_offload.c) takes
/// only a confirmed entry (`nf_ct_is_confirmed`), so never on a
/// connection's first packet, whose confirmation is conntrack's NEW event:
/// it offloads on a later packet. TCP gets here on its third handshake
/// packet (ESTABLISHED and ASSURED), a later packet already. A UDP entry
/// whose reply passed conntrack (IPS_SEEN_REPLY, set in `nf_conntrack_in`)
/// has had its later packet too. One without is known only to have had its
/// first: offloading it then would let the reply skip conntrack, leaving
/// the entry UNREPLIED (`ct state new` to the ruleset), never ASSURED, on
/// the stream timeout. Such a connection is watched until the kernel
/// forwards another packet of it (`Verdict::Watch`).
pub fn awaits_later_packet(e: &CtEntry) -> bool {
    e.orig.proto == IPPROTO_UDP && e.status & status::SEEN_REPLY == 0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::conntrack::{CtEntry, CtTuple};
    use std::net::IpAddr;

    pub fn tuple(s: &str, sp: u16, d: &str, dp: u16, proto: u8) -> CtTuple {
        CtTuple { src: s.parse::<IpAddr>().unwrap(), dst: d.parse::<IpAddr>().unwrap(), proto, sport: sp, dport: dp }
    }

    /// An ESTABLISHED+ASSURED TCP entry masqueraded behind 203.0.113.1.
    pub fn tcp_masq() -> CtEntry {
        CtEntry {
            id: 7,
            orig: tuple("192.168.1.2", 40000, "203.0.113.2", 5201, IPPROTO_TCP),
            reply: tuple("203.0.113.2", 5201, "203.0.113.1", 40000, IPPROTO_TCP),
            status: status::CONFIRMED | status::ASSURED | status::SEEN_REPLY | status::SRC_NAT,
            timeout: Some(432000),
            mark: 0,
            zone: 0,
            tcp_state: Some(tcp_state::ESTABLISHED),
            tcp_flags: None,
            has_helper: false,
            labels: None,
            counters_orig: None,
            counters_reply: None,
        }
    }

    #[test]
    fn a_connection_reads_as_a_log_line() {
        let mut id = ConnId::of(&tcp_masq());
        assert_eq!(id.to_string(), "tcp 192.168.1.2:40000 -> 203.0.113.2:5201");
        id.src = "fd00:1::2".parse().unwrap();
        id.zone = 3;
        assert_eq!(id.to_string(), "tcp [fd00:1::2]:40000 -> 203.0.113.2:5201 zone 3");
    }

    #[test]
    fn tcp_needs_established_and_assured() {
        let mut e = tcp_masq();
        assert_eq!(eligible(&e), Ok(()));
        e.tcp_state = Some(tcp_state::SYN_RECV);
        assert_eq!(eligible(&e), Err(Ineligible::TcpNotEstablished));
        e.tcp_state = Some(tcp_state::FIN_WAIT);
        assert_eq!(eligible(&e), Err(Ineligible::TcpNotEstablished));
        e.tcp_state = Some(tcp_state::ESTABLISHED);
        e.status &= !status::ASSURED;
        assert_eq!(eligible(&e), Err(Ineligible::NotAssured));
    }

    #[test]
    fn udp_needs_only_confirmation() {
        let mut e = tcp_masq();
        e.orig.proto = IPPROTO_UDP;
        e.reply.proto = IPPROTO_UDP;
        e.tcp_state = None;
        e.status = status::CONFIRMED;
        assert_eq!(eligible(&e), Ok(()));
        e.status = 0;
        assert_eq!(eligible(&e), Err(Ineligible::NotConfirmed));
    }

    /// Only a UDP entry whose reply has not passed conntrack waits for a
    /// later packet; TCP and replied UDP are past their first.
    #[test]
    fn what_awaits_a_later_packet() {
        let tcp = tcp_masq();
        let udp = |status| {
            let mut e = tcp_masq();
            (e.orig.proto, e.reply.proto, e.tcp_state, e.status) = (IPPROTO_UDP, IPPROTO_UDP, None, status);
            e
        };
        let cases = [
            ("tcp", tcp, false),
            ("udp, first packet confirmed", udp(status::CONFIRMED), true),
            ("udp, reply seen", udp(status::CONFIRMED | status::SEEN_REPLY), false),
            ("udp, assured", udp(status::CONFIRMED | status::SEEN_REPLY | status::ASSURED), false),
        ];
        for (what, e, want) in cases {
            assert_eq!(awaits_later_packet(&e), want, "{what}");
        }
    }

    #[test]
    fn helpers_seqadj_clash_dying_other_protocols_refused() {
        let base = tcp_masq();
        let mut e = base.clone();
        e.has_helper = true;
        assert_eq!(eligible(&e), Err(Ineligible::Helper));
        let mut e = base.clone();
        e.status |= status::SEQ_ADJUST;
        assert_eq!(eligible(&e), Err(Ineligible::SeqAdjust));
        let mut e = base.clone();
        e.status |= status::NAT_CLASH;
        assert_eq!(eligible(&e), Err(Ineligible::NatClash));
        let mut e = base.clone();
        e.status |= status::DYING;
        assert_eq!(eligible(&e), Err(Ineligible::Dying));
        let mut e = base;
        e.orig.proto = 1;
        assert_eq!(eligible(&e), Err(Ineligible::NotTcpUdp));
    }
}
