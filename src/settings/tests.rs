//! Settings from the file and from flags: one validator, the same
//! defaults and ranges, errors that say where the value came from.

use std::time::Duration;

use super::*;
use crate::policy::exclude::tests::entry;
use crate::policy::exclude::Excluded;

pub(crate) const FULL: &str = r#"
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

fn invalid(text: &str) -> (String, String) {
    match parse(text) {
        Err(e @ SettingsError::Invalid { .. }) => (e.key().unwrap().to_string(), e.to_string()),
        other => panic!("expected a value error for {text:?}, got {other:?}"),
    }
}

fn toml_error(text: &str) -> String {
    match parse(text) {
        Err(e @ SettingsError::Toml { .. }) => e.to_string(),
        other => panic!("expected a toml error for {text:?}, got {other:?}"),
    }
}

#[test]
fn full_file() {
    let c = parse(FULL).unwrap();
    assert_eq!(c.ifaces, ["eth0", "eth1"]);
    assert_eq!(c.mode, ModeChoice::Tc);
    assert_eq!(c.idle_timeout, Duration::from_secs(120));
    assert_eq!(c.max_flows, Some(131072));
    assert_eq!(c.nft, None, "the file is the alternative to a ruleset");
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
    assert_eq!(c.idle_timeout, Duration::from_secs(30));
    // Not given: sized from the host when the engine starts.
    assert_eq!(c.max_flows, None);
    assert_eq!(c.keepalive, KeepaliveChoice::Auto);
    assert!(c.exclude.is_empty());
    assert_eq!(c.exclude.excludes(&entry(IPPROTO_TCP, 0)), None);
    // Same defaults as the command line's: they are the same validator's.
    let flags = validate(flags(&["eth0"])).unwrap();
    assert_eq!(flags, c);
    // An empty [exclude] table is fine too.
    assert!(parse("interfaces = [\"eth0\"]\n[exclude]\n").unwrap().exclude.is_empty());
}

/// `keepalive`: the file's key, the flag on top, a wrong value named.
#[test]
fn keepalive_from_the_file_and_the_flag() {
    let c = parse("interfaces = [\"eth0\"]\nkeepalive = \"netlink\"\n").unwrap();
    assert_eq!(c.keepalive, KeepaliveChoice::Netlink);
    let mut input = flags(&["eth0"]);
    input.keepalive = Some(Given::flag("--keepalive", KeepaliveChoice::Netlink));
    assert_eq!(validate(input).unwrap().keepalive, KeepaliveChoice::Netlink);
    let (key, msg) = invalid("interfaces = [\"eth0\"]\nkeepalive = \"kfunc\"\n");
    assert_eq!(key, "keepalive");
    assert!(msg.starts_with("line 2: keepalive: \"kfunc\" is not a keepalive"), "{msg}");
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
        ("interfaces = [\"eth0\"]\n[exclude]\naddresses = [\"fd00::/129\"]", "exclude.addresses[0]", "longer than 128"),
        ("interfaces = [\"eth0\"]\n[exclude]\naddresses = [\"10.0.0.0/+8\"]", "exclude.addresses[0]", "not a number"),
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
    // Neither interfaces nor a ruleset: ours, naming both.
    assert!(matches!(parse("mode = \"auto\"\n"), Err(SettingsError::NoInterfaces)));
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
    assert_eq!(load(&f).unwrap().ifaces, ["eth0"]);
    let missing = dir.join("missing.toml");
    assert!(matches!(load(&missing), Err(SettingsError::Read { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn excludes_by_protocol() {
    let c = parse("interfaces = [\"eth0\"]\n[exclude]\nprotocols = [\"udp\"]\n").unwrap();
    assert_eq!(c.exclude.excludes(&entry(IPPROTO_UDP, 0)), Some(Excluded::Protocol(IPPROTO_UDP)));
    assert_eq!(c.exclude.excludes(&entry(IPPROTO_TCP, 0)), None);
    let c = parse("interfaces = [\"eth0\"]\n[exclude]\nprotocols = [\"tcp\", \"udp\", \"tcp\"]\n").unwrap();
    assert_eq!(c.exclude.protocols, [IPPROTO_TCP, IPPROTO_UDP]);
}

#[test]
fn full_file_exclusions_together() {
    let c = parse(FULL).unwrap();
    assert_eq!(c.exclude.excludes(&entry(IPPROTO_TCP, 0)), None);
    assert_eq!(
        c.exclude.excludes(&entry(IPPROTO_UDP, 0)).map(|x| x.to_string()).as_deref(),
        Some("excluded by protocol udp")
    );
    assert_eq!(
        c.exclude.excludes(&entry(IPPROTO_TCP, 0x310)).map(|x| x.to_string()).as_deref(),
        Some("excluded by mark 0x10/0xff")
    );
    let mut ssh = entry(IPPROTO_TCP, 0);
    ssh.orig.dport = 22;
    assert_eq!(c.exclude.excludes(&ssh).map(|x| x.to_string()).as_deref(), Some("excluded by port 22"));
    let mut nas = entry(IPPROTO_TCP, 0);
    nas.orig.src = "192.168.1.50".parse().unwrap();
    assert_eq!(c.exclude.excludes(&nas).map(|x| x.to_string()).as_deref(), Some("excluded by address 192.168.1.50"));
}

/// What `run --iface ...` gives the validator.
pub(crate) fn flags(ifaces: &[&str]) -> SettingsInput {
    let names = ifaces.iter().map(|i| Given::flag("--iface", i.to_string())).collect();
    SettingsInput { ifaces: Some(Given::flag("--iface", names)), ..Default::default() }
}

#[test]
fn flag_errors_name_the_flag_and_use_the_file_s_ranges() {
    let err = |input: SettingsInput| validate(input).unwrap_err();
    let e = err(SettingsInput { idle_timeout: Some(Given::flag("--idle-timeout", 0)), ..flags(&["eth0"]) });
    assert_eq!(e.to_string(), "--idle-timeout: 0 is out of range 1..=86400");
    assert_eq!(e.key(), Some("--idle-timeout"));
    let e = err(SettingsInput { idle_timeout: Some(Given::flag("--idle-timeout", 86_401)), ..flags(&["eth0"]) });
    assert_eq!(e.to_string(), "--idle-timeout: 86401 is out of range 1..=86400");
    let e = err(SettingsInput { max_flows: Some(Given::flag("--max-flows", 0)), ..flags(&["eth0"]) });
    assert_eq!(e.to_string(), "--max-flows: 0 is out of range 1..=16777216");
    let e = err(SettingsInput { max_flows: Some(Given::flag("--max-flows", 1 << 24 | 1)), ..flags(&["eth0"]) });
    assert_eq!(e.to_string(), "--max-flows: 16777217 is out of range 1..=16777216");
    let e = err(flags(&["eth0", "eth0"]));
    assert_eq!(e.to_string(), "--iface: \"eth0\" is listed twice");
    let e = err(flags(&["eth0:1"]));
    assert!(e.to_string().starts_with("--iface: \"eth0:1\" is not an interface name"), "{e}");
    assert!(matches!(err(SettingsInput::default()), SettingsError::NoInterfaces));
    let nft = Some(Given::flag("--nft", "rules.nft".into()));
    let e = err(SettingsInput { nft: nft.clone(), ..flags(&["eth0"]) });
    assert!(e.to_string().starts_with("--iface: with a ruleset (--nft, or `ruleset` in the file)"), "{e}");

    // --nft alone: the ruleset names the interfaces; the path is absolute.
    let s = validate(SettingsInput { nft, ..Default::default() }).unwrap();
    assert!(s.ifaces.is_empty());
    let path = s.nft.unwrap();
    assert!(path.is_absolute() && path.ends_with("rules.nft"), "{path:?}");
}

#[test]
fn flags_override_the_file_errors_still_point_at_their_source() {
    let mut input = file::parse(FULL).unwrap();
    input.idle_timeout = Some(Given::flag("--idle-timeout", 5));
    input.ifaces = flags(&["lan0", "wan0"]).ifaces;
    let s = validate(input).unwrap();
    assert_eq!(s.idle_timeout, Duration::from_secs(5));
    assert_eq!(s.ifaces, ["lan0", "wan0"]);
    // The rest is the file's.
    assert_eq!((s.mode, s.max_flows, s.exclude.ports.len()), (ModeChoice::Tc, Some(131072), 3));

    // A bad flag is the flag's error even with a file; a bad file value
    // keeps the file's path and line.
    let dir = std::env::temp_dir().join(format!("nft-offload-settings-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("c.toml");
    std::fs::write(&f, "interfaces = [\"eth0\"]\nmax_flows = 0\n").unwrap();
    let mut input = file::read(&f).unwrap();
    input.mode = Some(Given::flag("--mode", ModeChoice::Xdp));
    let e = validate(input.clone()).unwrap_err().to_string();
    assert_eq!(e, format!("{}:2: max_flows: 0 is out of range 1..=16777216", f.display()));
    input.max_flows = Some(Given::flag("--max-flows", -1));
    let e = validate(input).unwrap_err().to_string();
    assert_eq!(e, "--max-flows: -1 is out of range 1..=16777216");
    std::fs::remove_dir_all(&dir).unwrap();
}
