//! The configuration file (`nft-offload run --config FILE`): TOML, the
//! alternative to command-line flags and to an nft ruleset.
//!
//! ```toml
//! interfaces = ["eth0", "eth1"]     # at least one, no duplicates; or:
//! ruleset = "/etc/nft-offload/ruleset.nft"  # as `--nft` (relative: to this file)
//! mode = "auto"                      # auto | xdp | tc
//! idle_timeout = 30                  # seconds, 1..=86400
//! max_flows = 65536                  # 1..=16777216; unset: sized from RAM (`capacity`)
//! keepalive = "auto"                 # auto | netlink
//! metrics = "/run/nft-offload/metrics.sock"  # or "127.0.0.1:9641"; unset: none
//! [exclude]                          # connections never offloaded
//! addresses = ["192.168.1.50", "10.0.0.0/8", "fd00::/64"]
//! ports = [22, 5060, "10000-20000"]
//! marks = ["0x10/0xff", "7"]
//! protocols = ["udp"]
//! ```
//!
//! This reader only turns the file into a `SettingsInput`: serde reads it
//! into a raw shape whose values carry their byte spans (so unknown keys
//! and type errors come from toml, with its line and caret), and each value
//! keeps its key and line for `validate`, which checks ranges and syntax.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{ExcludeInput, Given, KeepaliveChoice, Origin, Scalar, SettingsError, SettingsInput};
use crate::policy::ModeChoice;

/// Read a configuration file; its values are not checked yet.
pub fn read(path: &Path) -> Result<SettingsInput, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read { path: path.into(), source })?;
    parse_in(&text, Some(path))
}

/// The text of a configuration file, as `read` would give it.
pub fn parse(text: &str) -> Result<SettingsInput, SettingsError> {
    parse_in(text, None)
}

fn parse_in(text: &str, path: Option<&Path>) -> Result<SettingsInput, SettingsError> {
    let raw: RawFile =
        toml::from_str(text).map_err(|source| SettingsError::Toml { path: path.map(Path::to_path_buf), source })?;
    let at = |key: String, span: Range<usize>| Origin::File { key, line: line_of(text, span) };
    let given = |key: String, v: Spanned<String>| Given { origin: at(key, v.span()), value: v.into_inner() };
    let scalar = |key: String, v: Spanned<toml::Value>| {
        let origin = at(key, v.span());
        let value = match v.into_inner() {
            toml::Value::Integer(n) => Scalar::Int(n),
            toml::Value::String(s) => Scalar::Text(s),
            // Named here: toml's own Display comes with its writer, which
            // the engine does not otherwise need (binary size).
            toml::Value::Float(f) => Scalar::Other(f.to_string()),
            toml::Value::Boolean(b) => Scalar::Other(b.to_string()),
            toml::Value::Datetime(d) => Scalar::Other(d.to_string()),
            toml::Value::Array(_) => Scalar::Other("an array".into()),
            toml::Value::Table(_) => Scalar::Other("a table".into()),
        };
        Given { value, origin }
    };

    let ifaces = raw.interfaces.map(|list| {
        let origin = at("interfaces".into(), list.span());
        let names = list.into_inner().into_iter().enumerate();
        Given { value: names.map(|(i, n)| given(format!("interfaces[{i}]"), n)).collect(), origin }
    });
    // Relative to the file, not to wherever the engine was started.
    let ruleset = raw.ruleset.map(|r| {
        let origin = at("ruleset".into(), r.span());
        let name = Path::new(r.get_ref());
        let value = match path.and_then(Path::parent) {
            Some(dir) if name.is_relative() => dir.join(name),
            _ => name.to_path_buf(),
        };
        Given { value, origin }
    });
    let mode = match raw.mode {
        None => None,
        Some(m) => {
            let origin = at("mode".into(), m.span());
            // Through serde, so the accepted names are ModeChoice's own
            // (the same as the --mode flag's).
            let de = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(m.get_ref());
            let value = ModeChoice::deserialize(de)
                .map_err(|e| SettingsError::invalid(&origin, path, format!("{:?} is not a mode ({e})", m.get_ref())))?;
            Some(Given { value, origin })
        }
    };
    let keepalive = match raw.keepalive {
        None => None,
        Some(k) => {
            let origin = at("keepalive".into(), k.span());
            let de = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(k.get_ref());
            let value = KeepaliveChoice::deserialize(de).map_err(|e| {
                SettingsError::invalid(&origin, path, format!("{:?} is not a keepalive ({e})", k.get_ref()))
            })?;
            Some(Given { value, origin })
        }
    };
    let number = |key: &str, v: Spanned<i64>| Given { origin: at(key.into(), v.span()), value: v.into_inner() };
    let ex = raw.exclude;
    let list = |name: &str, i: usize| format!("exclude.{name}[{i}]");
    Ok(SettingsInput {
        file: path.map(Path::to_path_buf),
        ifaces,
        mode,
        idle_timeout: raw.idle_timeout.map(|v| number("idle_timeout", v)),
        max_flows: raw.max_flows.map(|v| number("max_flows", v)),
        keepalive,
        metrics: raw.metrics.map(|m| given("metrics".into(), m)),
        nft: ruleset,
        exclude: ExcludeInput {
            addresses: ex.addresses.into_iter().enumerate().map(|(i, a)| given(list("addresses", i), a)).collect(),
            ports: ex.ports.into_iter().enumerate().map(|(i, p)| scalar(list("ports", i), p)).collect(),
            marks: ex.marks.into_iter().enumerate().map(|(i, m)| scalar(list("marks", i), m)).collect(),
            protocols: ex.protocols.into_iter().enumerate().map(|(i, p)| given(list("protocols", i), p)).collect(),
        },
    })
}

/// 1-based line of a byte offset.
fn line_of(text: &str, span: Range<usize>) -> usize {
    let end = span.start.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

// The file as serde sees it. Numbers are i64 (TOML's integer) and names are
// strings so that range and syntax errors are ours, with key and value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    interfaces: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    ruleset: Option<Spanned<String>>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    idle_timeout: Option<Spanned<i64>>,
    #[serde(default)]
    max_flows: Option<Spanned<i64>>,
    #[serde(default)]
    keepalive: Option<Spanned<String>>,
    #[serde(default)]
    metrics: Option<Spanned<String>>,
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
