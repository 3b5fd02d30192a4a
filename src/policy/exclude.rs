//! Exclusions: connections never offloaded, whatever else says yes (the
//! configuration file's `[exclude]` table). Each rule matches either tuple
//! of a conntrack entry; the first match says why, as a typed `Excluded`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::Serialize;

use crate::conntrack::{CtEntry, CtTuple};
use crate::proto;

/// Connections never offloaded. Empty (the default) excludes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclusions {
    /// Matches any address of the original or the reply tuple.
    pub addresses: Vec<Cidr>,
    /// Matches any port of the original or the reply tuple.
    pub ports: Vec<PortRange>,
    /// Matches the conntrack mark.
    pub marks: Vec<MarkMatch>,
    /// IP protocol numbers (`proto::IPPROTO_TCP`, `proto::IPPROTO_UDP`).
    pub protocols: Vec<u8>,
}

impl Exclusions {
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.ports.is_empty() && self.marks.is_empty() && self.protocols.is_empty()
    }

    /// Why `e` must stay on the kernel path, or `None` if nothing here
    /// excludes it. Both tuples are checked because NAT makes them differ:
    /// a port forward's internal server appears only in the reply tuple,
    /// a masqueraded client's public address only in the reply's dst.
    pub fn excludes(&self, e: &CtEntry) -> Option<Excluded> {
        let tuples: [&CtTuple; 2] = [&e.orig, &e.reply];
        if let Some(&p) = self.protocols.iter().find(|&&p| p == e.orig.proto) {
            return Some(Excluded::Protocol(p));
        }
        if let Some(&m) = self.marks.iter().find(|m| m.matches(e.mark)) {
            return Some(Excluded::Mark(m));
        }
        let ports = || tuples.into_iter().flat_map(|t| [t.sport, t.dport]);
        if let Some(&r) = self.ports.iter().find(|r| ports().any(|p| r.contains(p))) {
            return Some(Excluded::Port(r));
        }
        let addrs = || tuples.into_iter().flat_map(|t| [t.src, t.dst]);
        if let Some(&c) = self.addresses.iter().find(|c| addrs().any(|a| c.contains(a))) {
            return Some(Excluded::Address(c));
        }
        None
    }
}

/// The rule that keeps a connection on the kernel path. Its text (shown
/// under "Not offloaded" in `status`) names the rule as the file writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Excluded {
    Address(Cidr),
    Port(PortRange),
    Mark(MarkMatch),
    /// An IP protocol number.
    Protocol(u8),
}

impl fmt::Display for Excluded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Excluded::Address(c) => write!(f, "excluded by address {c}"),
            Excluded::Port(r) => write!(f, "excluded by port {r}"),
            Excluded::Mark(m) => write!(f, "excluded by mark {m}"),
            Excluded::Protocol(p) => write!(f, "excluded by protocol {}", proto::name(*p)),
        }
    }
}

/// For `status -o json`: every entry as it would be written in the file.
impl Serialize for Exclusions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View {
            addresses: Vec<String>,
            ports: Vec<String>,
            marks: Vec<String>,
            protocols: Vec<&'static str>,
        }
        View {
            addresses: self.addresses.iter().map(ToString::to_string).collect(),
            ports: self.ports.iter().map(ToString::to_string).collect(),
            marks: self.marks.iter().map(ToString::to_string).collect(),
            protocols: self.protocols.iter().map(|&p| proto::name(p)).collect(),
        }
        .serialize(s)
    }
}

/// An IPv4 or IPv6 network: an address and a prefix length, host bits zero.
/// A plain address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `None` if the prefix is too long for the family or host bits are set.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let c = Cidr { addr, prefix };
        (prefix <= max_prefix(addr) && c.network() == addr).then_some(c)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Same family and the first `prefix` bits equal. A v4 network never
    /// contains a v6 address: conntrack keeps the families apart.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask32(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask128(self.prefix) == u128::from(n),
            _ => false,
        }
    }

    /// `addr` with the host bits cleared.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.prefix))),
        }
    }
}

fn max_prefix(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

// checked_shl: a /0 shifts by the full width, which `<<` would reject.
fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("not an IPv4 or IPv6 address")]
    Address,
    #[error("prefix length {0:?} is not a number")]
    Prefix(String),
    #[error("prefix length {len} is longer than {max}")]
    TooLong { len: u32, max: u8 },
    #[error("host bits are set; the network is {0}")]
    HostBits(Cidr),
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| CidrError::Address)?;
        let max = max_prefix(addr);
        let prefix = match p {
            None => max,
            Some(p) => {
                // Digits only: u32::from_str would also take "+8".
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CidrError::Prefix(p.to_string()));
                }
                let len: u32 = p.parse().map_err(|_| CidrError::Prefix(p.to_string()))?;
                if len > u32::from(max) {
                    return Err(CidrError::TooLong { len, max });
                }
                len as u8
            }
        };
        // A typo such as 10.0.0.1/8 is more likely than intent; say so
        // rather than silently widening or narrowing the match.
        let c = Cidr { addr, prefix };
        if c.network() != addr {
            return Err(CidrError::HostBits(Cidr { addr: c.network(), prefix }));
        }
        Ok(c)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == max_prefix(self.addr) {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// An inclusive port range; a single port has `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<PortRange, String> {
        let port = |t: &str| -> Result<u16, String> {
            let t = t.trim();
            match t.parse::<u16>() {
                Ok(n) if n != 0 && t.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
                _ => Err(format!("{t:?} is not in 1..=65535")),
            }
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!("{first} is above {last}"));
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A conntrack mark test, as nft's `ct mark and MASK == VALUE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MarkMatch {
    pub value: u32,
    pub mask: u32,
}

impl MarkMatch {
    pub fn matches(&self, mark: u32) -> bool {
        mark & self.mask == self.value
    }
}

/// `0x1f` or `31`.
fn parse_u32(t: &str) -> Result<u32, String> {
    let t = t.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) if !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()) => u32::from_str_radix(h, 16),
        None if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => t.parse(),
        _ => return Err(format!("{t:?} is not a decimal or 0x hex number")),
    };
    r.map_err(|_| format!("{t:?} does not fit in 32 bits"))
}

impl FromStr for MarkMatch {
    type Err = String;

    fn from_str(s: &str) -> Result<MarkMatch, String> {
        let (value, mask) = match s.split_once('/') {
            Some((v, m)) => (parse_u32(v)?, parse_u32(m)?),
            None => (parse_u32(s)?, u32::MAX),
        };
        // Such a pair can never match: certainly a mistake.
        if value & !mask != 0 {
            return Err(format!("value {value:#x} has bits outside mask {mask:#x}, so it never matches"));
        }
        Ok(MarkMatch { value, mask })
    }
}

impl fmt::Display for MarkMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mask == u32::MAX {
            write!(f, "{:#x}", self.value)
        } else {
            write!(f, "{:#x}/{:#x}", self.value, self.mask)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proto::{IPPROTO_TCP, IPPROTO_UDP};

    fn tuple(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> CtTuple {
        CtTuple { src: src.parse().unwrap(), dst: dst.parse().unwrap(), proto, sport, dport }
    }

    /// A masqueraded connection: client 192.168.1.10 to 203.0.113.5, seen
    /// back at the router's public 198.51.100.2.
    fn ct(orig: CtTuple, reply: CtTuple, mark: u32) -> CtEntry {
        CtEntry {
            id: 1,
            orig,
            reply,
            status: 0,
            timeout: None,
            mark,
            zone: 0,
            tcp_state: None,
            tcp_flags: None,
            has_helper: false,
            labels: None,
            counters_orig: None,
            counters_reply: None,
        }
    }

    pub(crate) fn entry(proto: u8, mark: u32) -> CtEntry {
        ct(
            tuple("192.168.1.10", "203.0.113.5", proto, 40000, 443),
            tuple("203.0.113.5", "198.51.100.2", proto, 443, 61000),
            mark,
        )
    }

    fn entry6(src: &str, dst: &str) -> CtEntry {
        ct(tuple(src, dst, IPPROTO_TCP, 40000, 443), tuple(dst, src, IPPROTO_TCP, 443, 40000), 0)
    }

    #[test]
    fn cidr_parse_display_contains() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.255.1.2".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::a00:1".parse().unwrap()), "no match across families");
        assert_eq!(c.to_string(), "10.0.0.0/8");
        let host: Cidr = "192.168.1.50".parse().unwrap();
        assert_eq!((host.prefix(), host.to_string()), (32, "192.168.1.50".to_string()));
        assert!(host.contains("192.168.1.50".parse().unwrap()) && !host.contains("192.168.1.51".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6: Cidr = "fd00::/64".parse().unwrap();
        assert!(v6.contains("fd00::1:2".parse().unwrap()));
        assert!(!v6.contains("fd00:0:0:1::1".parse().unwrap()));
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains("2001:db8::1".parse().unwrap()) && !all6.contains("1.2.3.4".parse().unwrap()));
        let odd: Cidr = "2001:db8:8000::/33".parse().unwrap();
        assert!(
            odd.contains("2001:db8:ffff::1".parse().unwrap()) && !odd.contains("2001:db8:7fff::1".parse().unwrap())
        );
        assert_eq!("10.0.0.0/33".parse::<Cidr>(), Err(CidrError::TooLong { len: 33, max: 32 }));
        assert!(matches!("10.0.0.0/".parse::<Cidr>(), Err(CidrError::Prefix(_))));
        assert!(matches!("10.0.0.0/99999999999".parse::<Cidr>(), Err(CidrError::Prefix(_))));
        assert_eq!("fe80::1%eth0".parse::<Cidr>(), Err(CidrError::Address));
        assert_eq!(Cidr::new("10.0.0.1".parse().unwrap(), 8), None);
        assert_eq!(Cidr::new("10.0.0.0".parse().unwrap(), 33), None);
    }

    #[test]
    fn excludes_by_v4_address_either_tuple() {
        let x = |a: &str| Exclusions { addresses: vec![a.parse().unwrap()], ..Default::default() };
        // Original source (the LAN client).
        assert_eq!(
            x("192.168.1.0/24").excludes(&entry(IPPROTO_TCP, 0)).map(|x| x.to_string()).as_deref(),
            Some("excluded by address 192.168.1.0/24")
        );
        // Original destination.
        assert_eq!(
            x("203.0.113.5").excludes(&entry(IPPROTO_TCP, 0)).map(|x| x.to_string()).as_deref(),
            Some("excluded by address 203.0.113.5")
        );
        // Only in the reply tuple: the masquerade address.
        assert_eq!(
            x("198.51.100.0/30").excludes(&entry(IPPROTO_TCP, 0)).map(|x| x.to_string()).as_deref(),
            Some("excluded by address 198.51.100.0/30")
        );
        assert_eq!(x("10.0.0.0/8").excludes(&entry(IPPROTO_TCP, 0)), None);
        assert_eq!(x("fd00::/8").excludes(&entry(IPPROTO_TCP, 0)), None);
    }

    #[test]
    fn excludes_by_v6_address() {
        let x = Exclusions { addresses: vec!["fd00::/64".parse().unwrap()], ..Default::default() };
        assert_eq!(
            x.excludes(&entry6("fd00::10", "2001:db8::1")).map(|x| x.to_string()).as_deref(),
            Some("excluded by address fd00::/64")
        );
        assert_eq!(
            x.excludes(&entry6("2001:db8::1", "fd00::20")).map(|x| x.to_string()).as_deref(),
            Some("excluded by address fd00::/64")
        );
        assert_eq!(x.excludes(&entry6("fd00:0:0:1::10", "2001:db8::1")), None);
        assert_eq!(x.excludes(&entry(IPPROTO_TCP, 0)), None);
    }

    #[test]
    fn excludes_by_port_either_tuple() {
        let x = |p: &str| Exclusions { ports: vec![p.parse().unwrap()], ..Default::default() };
        assert_eq!(
            x("443").excludes(&entry(IPPROTO_TCP, 0)).map(|x| x.to_string()).as_deref(),
            Some("excluded by port 443")
        );
        assert_eq!(
            x("40000").excludes(&entry(IPPROTO_TCP, 0)).map(|x| x.to_string()).as_deref(),
            Some("excluded by port 40000")
        );
        // The NATed source port exists only in the reply tuple.
        assert_eq!(
            x("60000-62000").excludes(&entry(IPPROTO_UDP, 0)).map(|x| x.to_string()).as_deref(),
            Some("excluded by port 60000-62000")
        );
        assert_eq!(x("22").excludes(&entry(IPPROTO_TCP, 0)), None);
    }

    #[test]
    fn excludes_by_mark_with_mask() {
        let x = |m: &str| Exclusions { marks: vec![m.parse().unwrap()], ..Default::default() };
        assert_eq!(
            x("0x10/0xff").excludes(&entry(IPPROTO_TCP, 0xab10)).map(|x| x.to_string()).as_deref(),
            Some("excluded by mark 0x10/0xff")
        );
        assert_eq!(x("0x10/0xff").excludes(&entry(IPPROTO_TCP, 0x11)), None);
        assert_eq!(x("0x10/0xff").excludes(&entry(IPPROTO_TCP, 0)), None);
        assert_eq!(
            x("7").excludes(&entry(IPPROTO_TCP, 7)).map(|x| x.to_string()).as_deref(),
            Some("excluded by mark 0x7")
        );
        assert_eq!(x("7").excludes(&entry(IPPROTO_TCP, 0x107)), None, "no mask: the whole mark must match");
        assert_eq!(
            x("16/240").excludes(&entry(IPPROTO_TCP, 0x1f)).map(|x| x.to_string()).as_deref(),
            Some("excluded by mark 0x10/0xf0")
        );
        // Mark 0 with a mask: "the flag bit is clear".
        assert_eq!(
            x("0/0x1").excludes(&entry(IPPROTO_TCP, 2)).map(|x| x.to_string()).as_deref(),
            Some("excluded by mark 0x0/0x1")
        );
        assert_eq!(x("0/0x1").excludes(&entry(IPPROTO_TCP, 3)), None);
        assert!("0x10/".parse::<MarkMatch>().is_err());
        assert!("".parse::<MarkMatch>().is_err());
    }

    #[test]
    fn excludes_by_protocol() {
        let x = Exclusions { protocols: vec![IPPROTO_UDP], ..Default::default() };
        assert_eq!(x.excludes(&entry(IPPROTO_UDP, 0)), Some(Excluded::Protocol(IPPROTO_UDP)));
        assert_eq!(
            x.excludes(&entry(IPPROTO_UDP, 0)).map(|x| x.to_string()).as_deref(),
            Some("excluded by protocol udp")
        );
        assert_eq!(x.excludes(&entry(IPPROTO_TCP, 0)), None);
    }

    #[test]
    fn first_matching_kind_wins_and_is_typed() {
        let x = Exclusions {
            addresses: vec!["192.168.1.0/24".parse().unwrap()],
            ports: vec!["443".parse().unwrap()],
            marks: vec!["7".parse().unwrap()],
            protocols: vec![IPPROTO_UDP],
        };
        assert_eq!(x.excludes(&entry(IPPROTO_UDP, 7)), Some(Excluded::Protocol(IPPROTO_UDP)));
        assert_eq!(x.excludes(&entry(IPPROTO_TCP, 7)), Some(Excluded::Mark(MarkMatch { value: 7, mask: u32::MAX })));
        assert_eq!(x.excludes(&entry(IPPROTO_TCP, 0)), Some(Excluded::Port(PortRange { first: 443, last: 443 })));
        let mut e = entry(IPPROTO_TCP, 0);
        e.orig.dport = 80;
        e.reply.sport = 80;
        assert_eq!(x.excludes(&e), Some(Excluded::Address("192.168.1.0/24".parse().unwrap())));
    }
}
