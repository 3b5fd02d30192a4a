//! Protocol numbers, in one place: the kernel's uapi values as libc has
//! them, typed as the flow maps and conntrack carry them (one byte).

/// `IPPROTO_*`: the L4 protocol of a conntrack tuple or a flow key.
pub const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
pub const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;
pub const IPPROTO_DCCP: u8 = libc::IPPROTO_DCCP as u8;
pub const IPPROTO_GRE: u8 = libc::IPPROTO_GRE as u8;
pub const IPPROTO_SCTP: u8 = libc::IPPROTO_SCTP as u8;
pub const IPPROTO_UDPLITE: u8 = libc::IPPROTO_UDPLITE as u8;

/// `AF_*`: the L3 family of a flow key or a netfilter message.
pub const AF_INET: u8 = libc::AF_INET as u8;
pub const AF_INET6: u8 = libc::AF_INET6 as u8;

/// The name nft and conntrack use for the protocols the fast path handles.
pub fn name(proto: u8) -> &'static str {
    // conntrack -L's names (libnetfilter_conntrack's proto table).
    match proto {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        1 => "icmp",
        58 => "icmpv6",
        47 => "gre",
        33 => "dccp",
        132 => "sctp",
        136 => "udplite",
        _ => "unknown",
    }
}

/// The protocol `name` gives that name.
pub fn by_name(name: &str) -> Option<u8> {
    [IPPROTO_TCP, IPPROTO_UDP].into_iter().find(|&p| self::name(p) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_values() {
        // The wire values, written out once: these are what the maps and
        // ctnetlink carry, whatever libc calls them.
        assert_eq!((IPPROTO_TCP, IPPROTO_UDP, IPPROTO_DCCP, IPPROTO_GRE), (6, 17, 33, 47));
        assert_eq!((IPPROTO_SCTP, IPPROTO_UDPLITE), (132, 136));
        assert_eq!((AF_INET, AF_INET6), (2, 10));
        assert_eq!((name(IPPROTO_TCP), name(IPPROTO_UDP), name(1), name(58)), ("tcp", "udp", "icmp", "icmpv6"));
        assert_eq!(name(253), "unknown");
        // Only TCP and UDP are names the configuration takes.
        assert_eq!((by_name("tcp"), by_name("udp"), by_name("icmp")), (Some(IPPROTO_TCP), Some(IPPROTO_UDP), None));
    }
}
