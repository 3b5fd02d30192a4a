//! The configuration file (`nft-offload run --config FILE`): TOML, the
//! alternative to command-line flags and to an nft ruleset.
//!
//! ```toml
//! interfaces = ["eth0", "eth1"]     # required, at least one, no duplicates
//! mode = "auto"                      # auto | xdp | tc
//! idle_timeout = 30                  # seconds, 1..=86400
//! max_flows = 65536                  # 1..=16777216
//! [exclude]                          # connections never offloaded
//! addresses = ["192.168.1.50", "10.0.0.0/8", "fd00::/64"]
//! ports = [22, 5060, "10000-20000"]
//! marks = ["0x10/0xff", "7"]
//! protocols = ["udp"]
//! ```
//!
//! Parsing is two steps: serde reads the file into a raw shape whose values
//! carry their byte spans (so unknown keys and type errors come from toml,
//! with its line and caret), then `validate` checks ranges and syntax of the
//! values itself so each error names the key, the value and the line.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::conntrack::{CtEntry, CtTuple};
use crate::policy::ModeChoice;

/// 30 s: the kernel flowtable's NF_FLOW_TIMEOUT, as for `--idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: u64 = 30;
pub const DEFAULT_MAX_FLOWS: u32 = 65_536;
/// Up to a day: longer would keep idle connections pinned in the fast path
/// (and alive in conntrack) far past any conntrack default.
pub const IDLE_TIMEOUT_RANGE: RangeInclusive<u64> = 1..=86_400;
/// 2^24 entries: beyond that the flow map's memory (two entries per
/// connection) is no longer something a router can spare.
pub const MAX_FLOWS_RANGE: RangeInclusive<u32> = 1..=16_777_216;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// A validated configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileConfig {
    pub interfaces: Vec<String>,
    pub mode: ModeChoice,
    pub idle_timeout: u64,
    pub max_flows: u32,
    pub exclude: Exclusions,
}

impl FileConfig {
    /// The engine's settings. A struct literal on purpose: a field added to
    /// `engine::Config` must be decided here, not defaulted silently.
    pub fn engine_config(&self) -> crate::engine::Config {
        crate::engine::Config {
            ifaces: self.interfaces.clone(),
            mode: self.mode,
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout),
            max_flows: self.max_flows,
            // The config file is the alternative to a ruleset, not a wrapper.
            nft: None,
            exclude: self.exclude.clone(),
        }
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// TOML syntax, unknown keys, missing `interfaces`, wrong value types:
    /// toml's message already names the key and shows the line.
    #[error("{}{}", Location(path.as_deref(), None), source.to_string().trim_end())]
    Toml { path: Option<PathBuf>, source: toml::de::Error },
    /// A well-typed value that is not acceptable, e.g. `idle_timeout: 0 is
    /// out of range 1..=86400`.
    #[error("{}{key}: {problem}", Location(path.as_deref(), *line))]
    Invalid { path: Option<PathBuf>, line: Option<usize>, key: String, problem: String },
}

impl ConfigError {
    /// The key the error is about, when it is one of ours (toml's own
    /// errors carry the key in their message instead).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    fn in_file(mut self, file: &Path) -> Self {
        match &mut self {
            ConfigError::Toml { path, .. } | ConfigError::Invalid { path, .. } => *path = Some(file.to_path_buf()),
            ConfigError::Read { .. } => {}
        }
        self
    }
}

/// `FILE:LINE: `, `FILE: `, `line LINE: ` or nothing, before a message.
struct Location<'a>(Option<&'a Path>, Option<usize>);

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(p), Some(l)) => write!(f, "{}:{l}: ", p.display()),
            (Some(p), None) => write!(f, "{}: ", p.display()),
            (None, Some(l)) => write!(f, "line {l}: "),
            (None, None) => Ok(()),
        }
    }
}

/// Read and validate a configuration file.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    parse(&text).map_err(|e| e.in_file(path))
}

/// Parse and validate the text of a configuration file.
pub fn parse(text: &str) -> Result<FileConfig, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|source| ConfigError::Toml { path: None, source })?;
    Validator { text }.file(raw)
}

// The file as serde sees it. Numbers are i64 (TOML's integer) and names are
// strings so that range and syntax errors are ours, with key and value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    interfaces: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    idle_timeout: Option<Spanned<i64>>,
    #[serde(default)]
    max_flows: Option<Spanned<i64>>,
    #[serde(default)]
    exclude: RawExclude,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawExclude {
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    /// Integers or strings ("22", "10000-20000").
    #[serde(default)]
    ports: Vec<Spanned<toml::Value>>,
    /// Strings ("0x10/0xff", "7") or integers.
    #[serde(default)]
    marks: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    protocols: Vec<Spanned<String>>,
}

struct Validator<'a> {
    text: &'a str,
}

impl Validator<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    fn err(&self, span: Range<usize>, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: None, line: Some(self.line(span)), key: key.into(), problem: problem.into() }
    }

    fn file(&self, raw: RawFile) -> Result<FileConfig, ConfigError> {
        let list_span = raw.interfaces.span();
        let mut interfaces: Vec<String> = Vec::new();
        for (i, name) in raw.interfaces.into_inner().into_iter().enumerate() {
            let key = format!("interfaces[{i}]");
            if !valid_ifname(name.get_ref()) {
                return Err(self.err(
                    name.span(),
                    key,
                    format!("{:?} is not an interface name (1 to 15 bytes, no '/', ':' or whitespace)", name.get_ref()),
                ));
            }
            if interfaces.contains(name.get_ref()) {
                return Err(self.err(name.span(), key, format!("{:?} is listed twice", name.get_ref())));
            }
            interfaces.push(name.into_inner());
        }
        if interfaces.is_empty() {
            return Err(self.err(list_span, "interfaces", "[] is empty: name at least one interface"));
        }

        let mode = match raw.mode {
            None => ModeChoice::Auto,
            Some(m) => {
                // Through serde, so the accepted names are ModeChoice's own.
                let de = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(m.get_ref());
                ModeChoice::deserialize(de)
                    .map_err(|e| self.err(m.span(), "mode", format!("{:?} is not a mode ({e})", m.get_ref())))?
            }
        };
        let idle_timeout = match raw.idle_timeout {
            None => DEFAULT_IDLE_TIMEOUT,
            Some(v) => self.in_range(&v, "idle_timeout", &IDLE_TIMEOUT_RANGE)?,
        };
        let max_flows = match raw.max_flows {
            None => DEFAULT_MAX_FLOWS,
            Some(v) => {
                let r = u64::from(*MAX_FLOWS_RANGE.start())..=u64::from(*MAX_FLOWS_RANGE.end());
                self.in_range(&v, "max_flows", &r)? as u32
            }
        };
        let exclude = self.exclusions(raw.exclude)?;
        Ok(FileConfig { interfaces, mode, idle_timeout, max_flows, exclude })
    }

    fn in_range(&self, v: &Spanned<i64>, key: &str, range: &RangeInclusive<u64>) -> Result<u64, ConfigError> {
        match u64::try_from(*v.get_ref()) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(self.err(
                v.span(),
                key,
                format!("{} is out of range {}..={}", v.get_ref(), range.start(), range.end()),
            )),
        }
    }

    fn exclusions(&self, raw: RawExclude) -> Result<Exclusions, ConfigError> {
        let mut ex = Exclusions::default();
        for (i, a) in raw.addresses.iter().enumerate() {
            let c = a.get_ref().parse::<Cidr>().map_err(|e| {
                self.err(
                    a.span(),
                    format!("exclude.addresses[{i}]"),
                    format!("{:?} is not an address or CIDR ({e})", a.get_ref()),
                )
            })?;
            ex.addresses.push(c);
        }
        for (i, p) in raw.ports.iter().enumerate() {
            let key = format!("exclude.ports[{i}]");
            let r = match p.get_ref() {
                toml::Value::Integer(n) => match u16::try_from(*n) {
                    Ok(n) if n != 0 => PortRange { first: n, last: n },
                    _ => return Err(self.err(p.span(), key, format!("{n} is out of range 1..=65535"))),
                },
                toml::Value::String(s) => s
                    .parse::<PortRange>()
                    .map_err(|e| self.err(p.span(), key, format!("{s:?} is not a port or port range ({e})")))?,
                other => {
                    return Err(self.err(
                        p.span(),
                        key,
                        format!("{other} is not a port (expected 22 or \"10000-20000\")"),
                    ))
                }
            };
            ex.ports.push(r);
        }
        for (i, m) in raw.marks.iter().enumerate() {
            let key = format!("exclude.marks[{i}]");
            let mark = match m.get_ref() {
                toml::Value::Integer(n) => match u32::try_from(*n) {
                    Ok(n) => MarkMatch { value: n, mask: u32::MAX },
                    Err(_) => return Err(self.err(m.span(), key, format!("{n} is out of range 0..=0xffffffff"))),
                },
                toml::Value::String(s) => s
                    .parse::<MarkMatch>()
                    .map_err(|e| self.err(m.span(), key, format!("{s:?} is not a mark or mark/mask ({e})")))?,
                other => {
                    return Err(self.err(m.span(), key, format!("{other} is not a mark (expected \"0x10/0xff\" or 7)")))
                }
            };
            ex.marks.push(mark);
        }
        for (i, p) in raw.protocols.iter().enumerate() {
            let proto = match p.get_ref().as_str() {
                "tcp" => IPPROTO_TCP,
                "udp" => IPPROTO_UDP,
                other => {
                    return Err(self.err(
                        p.span(),
                        format!("exclude.protocols[{i}]"),
                        format!("{other:?} is not a protocol (expected \"tcp\" or \"udp\")"),
                    ))
                }
            };
            if !ex.protocols.contains(&proto) {
                ex.protocols.push(proto);
            }
        }
        Ok(ex)
    }
}

/// The kernel's `dev_valid_name()`: what `ip link` would accept as a name.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16 // IFNAMSIZ, with the NUL
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Connections never offloaded. Empty (the default) excludes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclusions {
    /// Matches any address of the original or the reply tuple.
    pub addresses: Vec<Cidr>,
    /// Matches any port of the original or the reply tuple.
    pub ports: Vec<PortRange>,
    /// Matches the conntrack mark.
    pub marks: Vec<MarkMatch>,
    /// IP protocol numbers (6 TCP, 17 UDP).
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
    pub fn excludes(&self, e: &CtEntry) -> Option<String> {
        let tuples: [&CtTuple; 2] = [&e.orig, &e.reply];
        if let Some(p) = self.protocols.iter().find(|&&p| p == e.orig.proto) {
            return Some(format!("excluded by protocol {}", proto_name(*p)));
        }
        if let Some(m) = self.marks.iter().find(|m| m.matches(e.mark)) {
            return Some(format!("excluded by mark {m}"));
        }
        let ports = || tuples.into_iter().flat_map(|t| [t.sport, t.dport]);
        if let Some(r) = self.ports.iter().find(|r| ports().any(|p| r.contains(p))) {
            return Some(format!("excluded by port {r}"));
        }
        let addrs = || tuples.into_iter().flat_map(|t| [t.src, t.dst]);
        if let Some(c) = self.addresses.iter().find(|c| addrs().any(|a| c.contains(a))) {
            return Some(format!("excluded by address {c}"));
        }
        None
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
            protocols: self.protocols.iter().map(|&p| proto_name(p)).collect(),
        }
        .serialize(s)
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        _ => "other",
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
mod tests {
    use super::*;

    const FULL: &str = r#"
interfaces = ["eth0", "eth1"]
mode = "tc"
idle_timeout = 120
max_flows = 131072

[exclude]
addresses = ["192.168.1.50", "10.0.0.0/8", "fd00::/64"]
ports = [22, 5060, "10000-20000"]
marks = ["0x10/0xff", "7", 9]
protocols = ["udp"]
"#;

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

    fn entry(proto: u8, mark: u32) -> CtEntry {
        ct(
            tuple("192.168.1.10", "203.0.113.5", proto, 40000, 443),
            tuple("203.0.113.5", "198.51.100.2", proto, 443, 61000),
            mark,
        )
    }

    fn entry6(src: &str, dst: &str) -> CtEntry {
        ct(tuple(src, dst, IPPROTO_TCP, 40000, 443), tuple(dst, src, IPPROTO_TCP, 443, 40000), 0)
    }

    fn invalid(text: &str) -> (String, String) {
        match parse(text) {
            Err(e @ ConfigError::Invalid { .. }) => (e.key().unwrap().to_string(), e.to_string()),
            other => panic!("expected a value error for {text:?}, got {other:?}"),
        }
    }

    fn toml_error(text: &str) -> String {
        match parse(text) {
            Err(e @ ConfigError::Toml { .. }) => e.to_string(),
            other => panic!("expected a toml error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn full_file() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.interfaces, ["eth0", "eth1"]);
        assert_eq!(c.mode, ModeChoice::Tc);
        assert_eq!(c.idle_timeout, 120);
        assert_eq!(c.max_flows, 131072);
        let x = &c.exclude;
        assert_eq!(
            x.addresses,
            [
                Cidr::new("192.168.1.50".parse().unwrap(), 32).unwrap(),
                Cidr::new("10.0.0.0".parse().unwrap(), 8).unwrap(),
                Cidr::new("fd00::".parse().unwrap(), 64).unwrap(),
            ]
        );
        assert_eq!(
            x.ports,
            [
                PortRange { first: 22, last: 22 },
                PortRange { first: 5060, last: 5060 },
                PortRange { first: 10000, last: 20000 }
            ]
        );
        assert_eq!(
            x.marks,
            [
                MarkMatch { value: 0x10, mask: 0xff },
                MarkMatch { value: 7, mask: u32::MAX },
                MarkMatch { value: 9, mask: u32::MAX }
            ]
        );
        assert_eq!(x.protocols, [IPPROTO_UDP]);

        let e = c.engine_config();
        assert_eq!(e.ifaces, ["eth0", "eth1"]);
        assert_eq!(e.idle_timeout, std::time::Duration::from_secs(120));
        assert_eq!(e.max_flows, 131072);

        let json = serde_json::to_value(x).unwrap();
        assert_eq!(json["addresses"][1], "10.0.0.0/8");
        assert_eq!(json["marks"][0], "0x10/0xff");
        assert_eq!(json["ports"][2], "10000-20000");
        assert_eq!(json["protocols"][0], "udp");
    }

    #[test]
    fn defaults() {
        let c = parse("interfaces = [\"eth0\"]\n").unwrap();
        assert_eq!(c.mode, ModeChoice::Auto);
        assert_eq!(c.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(c.max_flows, DEFAULT_MAX_FLOWS);
        assert!(c.exclude.is_empty());
        assert_eq!(c.exclude.excludes(&entry(IPPROTO_TCP, 0)), None);
        // Same defaults as the command line's.
        let d = crate::engine::Config::default();
        assert_eq!((d.mode, d.idle_timeout.as_secs(), d.max_flows), (c.mode, c.idle_timeout, c.max_flows));
        // An empty [exclude] table is fine too.
        assert!(parse("interfaces = [\"eth0\"]\n[exclude]\n").unwrap().exclude.is_empty());
    }

    #[test]
    fn value_errors_name_key_value_and_line() {
        let cases: &[(&str, &str, &str)] = &[
            ("interfaces = []", "interfaces", "line 1: interfaces: [] is empty"),
            ("interfaces = [\"eth0\", \"eth1\", \"eth0\"]", "interfaces[2]", "\"eth0\" is listed twice"),
            ("interfaces = [\"a-very-long-name0\"]", "interfaces[0]", "\"a-very-long-name0\" is not an interface name"),
            ("interfaces = [\"eth0:1\"]", "interfaces[0]", "\"eth0:1\" is not an interface name"),
            ("interfaces = [\"\"]", "interfaces[0]", "\"\" is not an interface name"),
            ("interfaces = [\"eth0\"]\nmode = \"fast\"", "mode", "line 2: mode: \"fast\" is not a mode"),
            (
                "interfaces = [\"eth0\"]\nidle_timeout = 0",
                "idle_timeout",
                "line 2: idle_timeout: 0 is out of range 1..=86400",
            ),
            ("interfaces = [\"eth0\"]\nidle_timeout = 86401", "idle_timeout", "86401 is out of range 1..=86400"),
            ("interfaces = [\"eth0\"]\nidle_timeout = -5", "idle_timeout", "-5 is out of range"),
            ("interfaces = [\"eth0\"]\nmax_flows = 0", "max_flows", "max_flows: 0 is out of range 1..=16777216"),
            ("interfaces = [\"eth0\"]\nmax_flows = 16777217", "max_flows", "16777217 is out of range"),
            (
                "interfaces = [\"eth0\"]\n[exclude]\naddresses = [\"10.0.0.1\", \"10.0.0.0/33\"]",
                "exclude.addresses[1]",
                "line 3: exclude.addresses[1]: \"10.0.0.0/33\" is not an address or CIDR",
            ),
            (
                "interfaces = [\"eth0\"]\n[exclude]\naddresses = [\"10.0.0.1/8\"]",
                "exclude.addresses[0]",
                "host bits are set; the network is 10.0.0.0/8",
            ),
            (
                "interfaces = [\"eth0\"]\n[exclude]\naddresses = [\"eth0\"]",
                "exclude.addresses[0]",
                "\"eth0\" is not an address",
            ),
            (
                "interfaces = [\"eth0\"]\n[exclude]\naddresses = [\"fd00::/129\"]",
                "exclude.addresses[0]",
                "longer than 128",
            ),
            (
                "interfaces = [\"eth0\"]\n[exclude]\naddresses = [\"10.0.0.0/+8\"]",
                "exclude.addresses[0]",
                "not a number",
            ),
            ("interfaces = [\"eth0\"]\n[exclude]\nports = [0]", "exclude.ports[0]", "0 is out of range 1..=65535"),
            ("interfaces = [\"eth0\"]\n[exclude]\nports = [22, 65536]", "exclude.ports[1]", "65536 is out of range"),
            ("interfaces = [\"eth0\"]\n[exclude]\nports = [\"20-10\"]", "exclude.ports[0]", "\"20-10\" is not a port"),
            ("interfaces = [\"eth0\"]\n[exclude]\nports = [\"ssh\"]", "exclude.ports[0]", "\"ssh\" is not a port"),
            ("interfaces = [\"eth0\"]\n[exclude]\nports = [2.5]", "exclude.ports[0]", "2.5 is not a port"),
            (
                "interfaces = [\"eth0\"]\n[exclude]\nmarks = [\"0x10/0xzz\"]",
                "exclude.marks[0]",
                "\"0x10/0xzz\" is not a mark",
            ),
            ("interfaces = [\"eth0\"]\n[exclude]\nmarks = [\"0x100/0xff\"]", "exclude.marks[0]", "never matches"),
            ("interfaces = [\"eth0\"]\n[exclude]\nmarks = [\"0x100000000\"]", "exclude.marks[0]", "32 bits"),
            ("interfaces = [\"eth0\"]\n[exclude]\nmarks = [-1]", "exclude.marks[0]", "-1 is out of range"),
            (
                "interfaces = [\"eth0\"]\n[exclude]\nprotocols = [\"icmp\"]",
                "exclude.protocols[0]",
                "\"icmp\" is not a protocol",
            ),
        ];
        for &(text, key, msg) in cases {
            let (k, m) = invalid(text);
            assert_eq!(k, key, "{text}");
            assert!(m.contains(msg), "{text}: {m:?} lacks {msg:?}");
            assert!(m.contains(&format!("{key}: ")), "{text}: {m:?} does not name {key}");
        }
    }

    #[test]
    fn toml_errors_name_the_key_and_line() {
        let m = toml_error("interfaces = [\"eth0\"]\nmod = \"auto\"\n");
        assert!(m.contains("unknown field `mod`") && m.contains("line 2"), "{m}");
        let m = toml_error("interfaces = [\"eth0\"]\n[exclude]\nport = [22]\n");
        assert!(m.contains("unknown field `port`") && m.contains("line 3"), "{m}");
        let m = toml_error("interfaces = [\"eth0\"]\n[exclusions]\n");
        assert!(m.contains("unknown field `exclusions`"), "{m}");
        let m = toml_error("mode = \"auto\"\n");
        assert!(m.contains("missing field `interfaces`"), "{m}");
        let m = toml_error("interfaces = \"eth0\"\n");
        assert!(m.contains("line 1") && m.contains("interfaces = \"eth0\""), "{m}");
        let m = toml_error("interfaces = [\"eth0\"]\nidle_timeout = \"30\"\n");
        assert!(m.contains("line 2") && m.contains("idle_timeout"), "{m}");
        let m = toml_error("interfaces = [\"eth0\"\n");
        assert!(m.contains("line"), "{m}");
    }

    #[test]
    fn load_prefixes_the_path() {
        let dir = std::env::temp_dir().join(format!("nft-offload-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "interfaces = [\"eth0\"]\nidle_timeout = 0\n").unwrap();
        let m = load(&f).unwrap_err().to_string();
        assert_eq!(m, format!("{}:2: idle_timeout: 0 is out of range 1..=86400", f.display()));
        std::fs::write(&f, "interfaces = [\"eth0\"]\n").unwrap();
        assert_eq!(load(&f).unwrap().interfaces, ["eth0"]);
        let missing = dir.join("missing.toml");
        assert!(matches!(load(&missing), Err(ConfigError::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
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
        assert_eq!(x("192.168.1.0/24").excludes(&entry(6, 0)).as_deref(), Some("excluded by address 192.168.1.0/24"));
        // Original destination.
        assert_eq!(x("203.0.113.5").excludes(&entry(6, 0)).as_deref(), Some("excluded by address 203.0.113.5"));
        // Only in the reply tuple: the masquerade address.
        assert_eq!(x("198.51.100.0/30").excludes(&entry(6, 0)).as_deref(), Some("excluded by address 198.51.100.0/30"));
        assert_eq!(x("10.0.0.0/8").excludes(&entry(6, 0)), None);
        assert_eq!(x("fd00::/8").excludes(&entry(6, 0)), None);
    }

    #[test]
    fn excludes_by_v6_address() {
        let x = Exclusions { addresses: vec!["fd00::/64".parse().unwrap()], ..Default::default() };
        assert_eq!(x.excludes(&entry6("fd00::10", "2001:db8::1")).as_deref(), Some("excluded by address fd00::/64"));
        assert_eq!(x.excludes(&entry6("2001:db8::1", "fd00::20")).as_deref(), Some("excluded by address fd00::/64"));
        assert_eq!(x.excludes(&entry6("fd00:0:0:1::10", "2001:db8::1")), None);
        assert_eq!(x.excludes(&entry(6, 0)), None);
    }

    #[test]
    fn excludes_by_port_either_tuple() {
        let x = |p: &str| Exclusions { ports: vec![p.parse().unwrap()], ..Default::default() };
        assert_eq!(x("443").excludes(&entry(6, 0)).as_deref(), Some("excluded by port 443"));
        assert_eq!(x("40000").excludes(&entry(6, 0)).as_deref(), Some("excluded by port 40000"));
        // The NATed source port exists only in the reply tuple.
        assert_eq!(x("60000-62000").excludes(&entry(17, 0)).as_deref(), Some("excluded by port 60000-62000"));
        assert_eq!(x("22").excludes(&entry(6, 0)), None);
    }

    #[test]
    fn excludes_by_mark_with_mask() {
        let x = |m: &str| Exclusions { marks: vec![m.parse().unwrap()], ..Default::default() };
        assert_eq!(x("0x10/0xff").excludes(&entry(6, 0xab10)).as_deref(), Some("excluded by mark 0x10/0xff"));
        assert_eq!(x("0x10/0xff").excludes(&entry(6, 0x11)), None);
        assert_eq!(x("0x10/0xff").excludes(&entry(6, 0)), None);
        assert_eq!(x("7").excludes(&entry(6, 7)).as_deref(), Some("excluded by mark 0x7"));
        assert_eq!(x("7").excludes(&entry(6, 0x107)), None, "no mask: the whole mark must match");
        assert_eq!(x("16/240").excludes(&entry(6, 0x1f)).as_deref(), Some("excluded by mark 0x10/0xf0"));
        // Mark 0 with a mask: "the flag bit is clear".
        assert_eq!(x("0/0x1").excludes(&entry(6, 2)).as_deref(), Some("excluded by mark 0x0/0x1"));
        assert_eq!(x("0/0x1").excludes(&entry(6, 3)), None);
        assert!("0x10/".parse::<MarkMatch>().is_err());
        assert!("".parse::<MarkMatch>().is_err());
    }

    #[test]
    fn excludes_by_protocol() {
        let c = parse("interfaces = [\"eth0\"]\n[exclude]\nprotocols = [\"udp\"]\n").unwrap();
        assert_eq!(c.exclude.excludes(&entry(IPPROTO_UDP, 0)).as_deref(), Some("excluded by protocol udp"));
        assert_eq!(c.exclude.excludes(&entry(IPPROTO_TCP, 0)), None);
        let c = parse("interfaces = [\"eth0\"]\n[exclude]\nprotocols = [\"tcp\", \"udp\", \"tcp\"]\n").unwrap();
        assert_eq!(c.exclude.protocols, [IPPROTO_TCP, IPPROTO_UDP]);
    }

    #[test]
    fn full_file_exclusions_together() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.exclude.excludes(&entry(IPPROTO_TCP, 0)), None);
        assert_eq!(c.exclude.excludes(&entry(IPPROTO_UDP, 0)).as_deref(), Some("excluded by protocol udp"));
        assert_eq!(c.exclude.excludes(&entry(IPPROTO_TCP, 0x310)).as_deref(), Some("excluded by mark 0x10/0xff"));
        let mut ssh = entry(IPPROTO_TCP, 0);
        ssh.orig.dport = 22;
        assert_eq!(c.exclude.excludes(&ssh).as_deref(), Some("excluded by port 22"));
        let mut nas = entry(IPPROTO_TCP, 0);
        nas.orig.src = "192.168.1.50".parse().unwrap();
        assert_eq!(c.exclude.excludes(&nas).as_deref(), Some("excluded by address 192.168.1.50"));
    }
}
