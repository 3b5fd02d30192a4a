//! The engine's settings, from command-line flags (`run --iface ...`), the
//! TOML file (`run --config FILE`, see `file`), or both: flags given next to
//! `--config` replace the file's value for that key.
//!
//! Two steps. Each source fills a `SettingsInput`: values as given, each
//! remembering where (the flag, or the file's key and line). `validate`
//! then applies the defaults and the ranges, once for every source, and
//! names the flag or the key, value and line of whatever it rejects.

pub mod capacity;
pub mod file;
#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::policy::exclude::{Cidr, Exclusions, MarkMatch, PortRange};
use crate::policy::ModeChoice;
use crate::proto::{self, IPPROTO_TCP, IPPROTO_UDP};

pub const DEFAULT_MODE: ModeChoice = ModeChoice::Auto;

/// Who keeps offloaded connections' conntrack entries alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KeepaliveChoice {
    /// The fast path as it forwards, where the kernel has the conntrack
    /// kfuncs; else the engine over ctnetlink.
    #[default]
    Auto,
    /// The engine over ctnetlink, always.
    Netlink,
}
/// 30 s: the kernel flowtable's NF_FLOW_TIMEOUT.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Seconds, up to a day: longer would keep idle connections pinned in the
/// fast path (and alive in conntrack) far past any conntrack default.
pub const IDLE_TIMEOUT_RANGE: RangeInclusive<u64> = 1..=86_400;
/// 2^24 entries: beyond that the flow map's memory (two entries per
/// connection) is no longer something a router can spare.
pub const MAX_FLOWS_RANGE: RangeInclusive<u32> = 1..=16_777_216;

/// Validated settings: what the engine runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Empty only with `nft`: then the ruleset's flowtables name them.
    pub ifaces: Vec<String>,
    pub mode: ModeChoice,
    pub idle_timeout: Duration,
    /// None: sized from this host at start (`capacity::auto_max_flows`).
    pub max_flows: Option<u32>,
    pub keepalive: KeepaliveChoice,
    /// An nftables ruleset with flowtables (absolute path): loaded by the
    /// engine, its `flow add` statements decide what is offloaded.
    pub nft: Option<PathBuf>,
    /// Connections never offloaded (the file's `[exclude]`).
    pub exclude: Exclusions,
    /// Where the Prometheus metrics are served, if anywhere (opt-in).
    pub metrics: Option<MetricsListen>,
}

/// Where `--metrics` serves: a unix socket (owner-only, the default way) or
/// a TCP address, readable by every local user (and beyond, unless it is
/// a loopback address): only what is named is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl std::str::FromStr for MetricsListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with('/') {
            return Ok(MetricsListen::Unix(PathBuf::from(s)));
        }
        s.parse().map(MetricsListen::Tcp).map_err(|_| {
            format!(
                "{s:?} is neither an absolute socket path (/run/nft-offload/metrics.sock) nor an address and port \
                 (127.0.0.1:9641, [::1]:9641)"
            )
        })
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsListen::Unix(p) => write!(f, "unix:{}", p.display()),
            MetricsListen::Tcp(a) => write!(f, "http://{a}/metrics"),
        }
    }
}

/// Where a value was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag, e.g. `--idle-timeout`.
    Flag(&'static str),
    /// A key of the configuration file, e.g. `exclude.ports[1]`, and the
    /// line its value is on.
    File { key: String, line: usize },
}

impl Origin {
    /// The flag or the key.
    pub fn key(&self) -> &str {
        match self {
            Origin::Flag(f) => f,
            Origin::File { key, .. } => key,
        }
    }
}

/// A value and where it was given.
#[derive(Debug, Clone, PartialEq)]
pub struct Given<T> {
    pub value: T,
    pub origin: Origin,
}

impl<T> Given<T> {
    pub fn flag(flag: &'static str, value: T) -> Self {
        Given { value, origin: Origin::Flag(flag) }
    }
}

/// A value that may be written as a number or as text (ports: `22` or
/// `"10000-20000"`; marks: `7` or `"0x10/0xff"`).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Int(i64),
    Text(String),
    /// A value of some other type, as written (e.g. `2.5`).
    Other(String),
}

/// Settings as given, before any check. Each source fills what it has;
/// `None` means "not given" (the default applies).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SettingsInput {
    /// The file the `Origin::File` values come from, for error messages.
    pub file: Option<PathBuf>,
    /// The list's own origin (for "empty") and each name's.
    pub ifaces: Option<Given<Vec<Given<String>>>>,
    pub mode: Option<Given<ModeChoice>>,
    /// Seconds. i64: what a TOML integer holds, so range errors are ours.
    pub idle_timeout: Option<Given<i64>>,
    pub max_flows: Option<Given<i64>>,
    pub keepalive: Option<Given<KeepaliveChoice>>,
    pub nft: Option<Given<PathBuf>>,
    pub metrics: Option<Given<String>>,
    pub exclude: ExcludeInput,
}

/// The `[exclude]` lists as given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExcludeInput {
    pub addresses: Vec<Given<String>>,
    pub ports: Vec<Given<Scalar>>,
    pub marks: Vec<Given<Scalar>>,
    pub protocols: Vec<Given<String>>,
}

/// Why settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// TOML syntax, unknown keys, missing `interfaces`, wrong value types:
    /// toml's message already names the key and shows the line.
    #[error("{}{}", Location(path.as_deref(), None), source.to_string().trim_end())]
    Toml { path: Option<PathBuf>, source: toml::de::Error },
    /// A value that is not acceptable, e.g. `idle_timeout: 0 is out of
    /// range 1..=86400` (with the file and line), or `--idle-timeout: ...`.
    #[error("{}{key}: {problem}", Location(path.as_deref(), *line))]
    Invalid { path: Option<PathBuf>, line: Option<usize>, key: String, problem: String },
    #[error(
        "no interfaces given: use --iface IF (at least two for forwarding), --nft FILE, or --config FILE \
         naming `interfaces` or a `ruleset`"
    )]
    NoInterfaces,
}

impl SettingsError {
    /// The flag or key the error is about, when it is one of ours (toml's
    /// own errors carry the key in their message instead).
    pub fn key(&self) -> Option<&str> {
        match self {
            SettingsError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    /// A rejected value: `file` is where `Origin::File` values come from.
    fn invalid(origin: &Origin, file: Option<&Path>, problem: impl Into<String>) -> Self {
        let (path, line) = match origin {
            Origin::Flag(_) => (None, None),
            Origin::File { line, .. } => (file.map(Path::to_path_buf), Some(*line)),
        };
        SettingsError::Invalid { path, line, key: origin.key().to_string(), problem: problem.into() }
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

/// Read and validate a configuration file on its own.
pub fn load(path: &Path) -> Result<Settings, SettingsError> {
    validate(file::read(path)?)
}

/// Parse and validate the text of a configuration file.
pub fn parse(text: &str) -> Result<Settings, SettingsError> {
    validate(file::parse(text)?)
}

/// The one check of settings, whatever their source: defaults, ranges,
/// syntax of the exclusion rules, and the rules between fields.
pub fn validate(input: SettingsInput) -> Result<Settings, SettingsError> {
    let file = input.file.as_deref();
    let bad = |origin: &Origin, problem: String| SettingsError::invalid(origin, file, problem);

    let ifaces = match input.ifaces {
        None if input.nft.is_some() => Vec::new(),
        None => return Err(SettingsError::NoInterfaces),
        Some(list) => {
            if let (Some(first), Some(_)) = (list.value.first(), &input.nft) {
                return Err(bad(
                    &first.origin,
                    "with a ruleset (--nft, or `ruleset` in the file) the interfaces are its flowtables' devices"
                        .into(),
                ));
            }
            let mut names: Vec<String> = Vec::new();
            for name in list.value {
                let n = &name.value;
                if !valid_ifname(n) {
                    let why = format!("{n:?} is not an interface name (1 to 15 bytes, no '/', ':' or whitespace)");
                    return Err(bad(&name.origin, why));
                }
                if n == "lo" {
                    let why = "\"lo\" is the loopback device: the kernel forwards nothing through it".to_string();
                    return Err(bad(&name.origin, why));
                }
                if names.contains(n) {
                    return Err(bad(&name.origin, format!("{n:?} is listed twice")));
                }
                names.push(name.value);
            }
            if names.is_empty() {
                return Err(bad(&list.origin, "[] is empty: name at least one interface".into()));
            }
            names
        }
    };
    let mode = input.mode.map_or(DEFAULT_MODE, |m| m.value);
    let idle_timeout = match input.idle_timeout {
        None => DEFAULT_IDLE_TIMEOUT,
        Some(v) => Duration::from_secs(in_range(&v, &IDLE_TIMEOUT_RANGE).map_err(|p| bad(&v.origin, p))?),
    };
    let max_flows = match input.max_flows {
        None => None,
        Some(v) => {
            let r = u64::from(*MAX_FLOWS_RANGE.start())..=u64::from(*MAX_FLOWS_RANGE.end());
            Some(in_range(&v, &r).map_err(|p| bad(&v.origin, p))? as u32)
        }
    };
    // Absolute: the daemon may change directory, and `reload` sends paths.
    let nft = input.nft.map(|p| std::path::absolute(&p.value).unwrap_or(p.value));
    let exclude = exclusions(input.exclude, &bad)?;
    let keepalive = input.keepalive.map_or_else(KeepaliveChoice::default, |k| k.value);
    let metrics = match input.metrics {
        None => None,
        Some(m) => Some(m.value.parse::<MetricsListen>().map_err(|p| bad(&m.origin, p))?),
    };
    Ok(Settings { ifaces, mode, idle_timeout, max_flows, keepalive, nft, exclude, metrics })
}

fn in_range(v: &Given<i64>, range: &RangeInclusive<u64>) -> Result<u64, String> {
    match u64::try_from(v.value) {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!("{} is out of range {}..={}", v.value, range.start(), range.end())),
    }
}

fn exclusions(raw: ExcludeInput, bad: &dyn Fn(&Origin, String) -> SettingsError) -> Result<Exclusions, SettingsError> {
    let mut ex = Exclusions::default();
    for a in &raw.addresses {
        let c = a.value.parse::<Cidr>();
        ex.addresses.push(c.map_err(|e| bad(&a.origin, format!("{:?} is not an address or CIDR ({e})", a.value)))?);
    }
    for p in &raw.ports {
        let r = match &p.value {
            Scalar::Int(n) => match u16::try_from(*n) {
                Ok(n) if n != 0 => PortRange { first: n, last: n },
                _ => return Err(bad(&p.origin, format!("{n} is out of range 1..=65535"))),
            },
            Scalar::Text(s) => s
                .parse::<PortRange>()
                .map_err(|e| bad(&p.origin, format!("{s:?} is not a port or port range ({e})")))?,
            Scalar::Other(v) => {
                return Err(bad(&p.origin, format!("{v} is not a port (expected 22 or \"10000-20000\")")));
            }
        };
        ex.ports.push(r);
    }
    for m in &raw.marks {
        let mark = match &m.value {
            Scalar::Int(n) => match u32::try_from(*n) {
                Ok(n) => MarkMatch { value: n, mask: u32::MAX },
                Err(_) => return Err(bad(&m.origin, format!("{n} is out of range 0..=0xffffffff"))),
            },
            Scalar::Text(s) => {
                s.parse::<MarkMatch>().map_err(|e| bad(&m.origin, format!("{s:?} is not a mark or mark/mask ({e})")))?
            }
            Scalar::Other(v) => {
                return Err(bad(&m.origin, format!("{v} is not a mark (expected \"0x10/0xff\" or 7)")));
            }
        };
        ex.marks.push(mark);
    }
    for p in &raw.protocols {
        let proto = match proto::by_name(&p.value) {
            Some(n @ (IPPROTO_TCP | IPPROTO_UDP)) => n,
            _ => return Err(bad(&p.origin, format!("{:?} is not a protocol (expected \"tcp\" or \"udp\")", p.value))),
        };
        if !ex.protocols.contains(&proto) {
            ex.protocols.push(proto);
        }
    }
    Ok(ex)
}

/// The kernel's `dev_valid_name()`: what `ip link` would accept as a name.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16 // IFNAMSIZ, with the NUL
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}
