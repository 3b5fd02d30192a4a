//! Packaging checks that need no root and no router: the Debian example
//! configuration parses, the systemd unit has what it must, and the OpenWrt
//! procd script, run against stand-ins for rc.common's functions, starts the
//! daemon with the right command line (or not at all) for firewall4's
//! flow-offloading settings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use nft_offload::policy::ModeChoice;
use nft_offload::settings;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A fresh directory per call; tests run in parallel.
fn scratch(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "nft-offload-packaging-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn have(prog: &str, args: &[&str]) -> bool {
    Command::new(prog).args(args).output().map(|o| o.status.success()).unwrap_or(false)
}

// ---- Debian example configuration ----

#[test]
fn debian_example_config_parses() {
    let text = read("packaging/debian/config.toml");
    let c = settings::parse(&text).unwrap_or_else(|e| panic!("packaging/debian/config.toml: {e}"));
    assert!(!c.ifaces.is_empty());
    assert_eq!(c.mode, ModeChoice::Auto);
    assert_eq!(c.idle_timeout.as_secs(), 30);
    // Left to the engine, which sizes it from the host (`check` says).
    assert_eq!(c.max_flows, None);
    assert!(c.exclude.is_empty(), "the example must not exclude anything by default");
}

/// The commented-out examples in `[exclude]` are valid too, once enabled.
#[test]
fn debian_example_config_commented_exclusions_parse() {
    let text = read("packaging/debian/config.toml");
    let keys = ["addresses", "ports", "marks", "protocols"];
    let mut out = String::new();
    let mut enabled = 0;
    for line in text.lines() {
        let t = line.trim_start();
        if keys.iter().any(|k| t.starts_with(&format!("{k} ="))) {
            continue; // the active empty list, replaced by the example
        }
        if let Some(rest) = t.strip_prefix("# ") {
            if keys.iter().any(|k| rest.starts_with(&format!("{k} ="))) {
                out += rest;
                out += "\n";
                enabled += 1;
                continue;
            }
        }
        out += line;
        out += "\n";
    }
    assert_eq!(enabled, keys.len(), "one commented example per exclusion key");
    let c = settings::parse(&out).unwrap_or_else(|e| panic!("enabled examples: {e}\n{out}"));
    assert!(!c.exclude.addresses.is_empty() && !c.exclude.ports.is_empty());
    assert!(!c.exclude.marks.is_empty() && !c.exclude.protocols.is_empty());
}

// ---- systemd unit ----

type Ini = BTreeMap<String, Vec<(String, String)>>;

/// The subset of systemd's unit syntax the file uses: `[Section]`,
/// `Key=Value`, `#`/`;` comments, blank lines, `\` continuations.
fn parse_ini(text: &str) -> Result<Ini, String> {
    let mut ini = Ini::new();
    let mut section: Option<String> = None;
    let mut pending: Option<(usize, String)> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = match pending.take() {
            Some((_, mut acc)) => {
                acc.push(' ');
                acc.push_str(raw.trim());
                acc
            }
            None => raw.trim().to_string(),
        };
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(body) = line.strip_suffix('\\') {
            pending = Some((n, body.trim_end().to_string()));
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            let name = name.strip_suffix(']').ok_or(format!("line {}: unterminated section header", n + 1))?;
            if ini.contains_key(name) {
                return Err(format!("line {}: section [{name}] repeated", n + 1));
            }
            ini.insert(name.to_string(), Vec::new());
            section = Some(name.to_string());
            continue;
        }
        let (k, v) = line.split_once('=').ok_or(format!("line {}: not Key=Value: {line:?}", n + 1))?;
        let k = k.trim();
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(format!("line {}: bad key {k:?}", n + 1));
        }
        let s = section.as_ref().ok_or(format!("line {}: key before any section", n + 1))?;
        ini.get_mut(s).unwrap().push((k.to_string(), v.trim().to_string()));
    }
    if let Some((n, _)) = pending {
        return Err(format!("line {}: continuation at end of file", n + 1));
    }
    Ok(ini)
}

/// The single value of `key` in `section` (systemd would take the last;
/// a repeated key here is a mistake).
fn one<'a>(ini: &'a Ini, section: &str, key: &str) -> &'a str {
    let vals: Vec<&str> = ini
        .get(section)
        .unwrap_or_else(|| panic!("no [{section}]"))
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(vals.len(), 1, "[{section}] {key} must appear exactly once, found {vals:?}");
    vals[0]
}

fn words(s: &str) -> Vec<&str> {
    let mut w: Vec<&str> = s.split_whitespace().collect();
    w.sort_unstable();
    w
}

#[test]
fn ini_parser_rejects_garbage() {
    assert!(parse_ini("Key=1\n").is_err());
    assert!(parse_ini("[Unit\n").is_err());
    assert!(parse_ini("[Unit]\nno equals sign\n").is_err());
    assert!(parse_ini("[Unit]\nA=1\n[Unit]\n").is_err());
    assert!(parse_ini("[Unit]\nA=1 \\\n").is_err());
    let ini = parse_ini("# c\n[Unit]\n; c\nA = x \\\n  y\n").unwrap();
    assert_eq!(one(&ini, "Unit", "A"), "x y");
}

#[test]
fn systemd_unit_has_the_required_keys() {
    let ini = parse_ini(&read("packaging/systemd/nft-offload.service")).unwrap();
    assert_eq!(ini.keys().collect::<Vec<_>>(), ["Install", "Service", "Unit"]);

    assert_eq!(words(one(&ini, "Unit", "After")), ["network-online.target", "nftables.service"]);
    assert_eq!(one(&ini, "Unit", "Wants"), "network-online.target");

    assert_eq!(one(&ini, "Service", "Type"), "simple");
    assert_eq!(one(&ini, "Service", "ExecStart"), "/usr/sbin/nft-offload run --config /etc/nft-offload/config.toml");
    // `systemctl reload`: the engine reads its files again on SIGHUP.
    assert_eq!(one(&ini, "Service", "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one(&ini, "Service", "Restart"), "on-failure");
    assert_eq!(one(&ini, "Service", "KillSignal"), "SIGTERM");
    let caps = ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_SYS_RESOURCE"];
    assert_eq!(words(one(&ini, "Service", "AmbientCapabilities")), caps);
    // The bounding set, if any, must not take away what the daemon needs.
    if ini["Service"].iter().any(|(k, _)| k == "CapabilityBoundingSet") {
        let bounding = words(one(&ini, "Service", "CapabilityBoundingSet"));
        assert!(caps.iter().all(|c| bounding.contains(c)), "{bounding:?}");
    }
    assert_eq!(one(&ini, "Service", "ProtectSystem"), "strict");
    assert_eq!(one(&ini, "Service", "ProtectHome"), "yes");
    assert_eq!(one(&ini, "Service", "NoNewPrivileges"), "yes");
    assert_eq!(one(&ini, "Service", "PrivateTmp"), "yes");

    assert_eq!(one(&ini, "Install", "WantedBy"), "multi-user.target");
}

/// systemd's own check, where it is installed: unknown keys, bad values, a
/// missing executable (pointed at the test build of the daemon).
#[test]
fn systemd_analyze_verify() {
    if !have("systemd-analyze", &["--version"]) {
        eprintln!("systemd-analyze not installed; skipped");
        return;
    }
    let dir = scratch("systemd");
    let unit = dir.join("nft-offload.service");
    let text = read("packaging/systemd/nft-offload.service")
        .replace("/usr/sbin/nft-offload", env!("CARGO_BIN_EXE_nft-offload"));
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("nft-offload.service")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify complains about the unit:\n{stderr}");
    if !out.status.success() {
        // Nothing about our unit: the environment (no systemd state).
        eprintln!("systemd-analyze verify failed for reasons outside the unit; ignored:\n{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- OpenWrt procd init script ----

const INIT: &str = "packaging/openwrt/nft-offload.init";

/// Stand-ins for what rc.common provides (/lib/functions.sh,
/// /lib/functions/procd.sh), for network.sh and for logger. UCI files under
/// $STUB_ROOT/etc/config are real UCI syntax, which is shell once `config`,
/// `option` and `list` are functions. Calls are recorded in $STUB_LOG.
const STUBS: &str = r#"
_stub_n=0
_stub_sections=""
config() {
	_stub_n=$((_stub_n + 1))
	_stub_sec=${2:-cfg$_stub_n}
	_stub_sections="$_stub_sections $_stub_sec"
	eval "_stub_type_$_stub_sec=\$1"
}
option() { eval "CONFIG_${_stub_sec}_$1=\$2"; }
list() {
	eval "_stub_v=\${CONFIG_${_stub_sec}_$1-}"
	eval "CONFIG_${_stub_sec}_$1=\"\${_stub_v:+\$_stub_v }\$2\""
}
config_load() {
	echo "config_load $1" >> "$STUB_LOG"
	_stub_sections=""
	if [ -f "$STUB_ROOT/etc/config/$1" ]; then . "$STUB_ROOT/etc/config/$1"; fi
	return 0
}
config_foreach() {
	for _stub_s in $_stub_sections; do
		eval "_stub_st=\$_stub_type_$_stub_s"
		if [ "$_stub_st" = "$2" ]; then "$1" "$_stub_s"; fi
	done
	return 0
}
config_get() { eval "$1=\${CONFIG_${2}_${3}:-\${4-}}"; }
config_get_bool() {
	config_get _stub_b "$2" "$3" "$4"
	case "$_stub_b" in
	1 | on | true | yes | enabled) _stub_b=1 ;;
	0 | off | false | no | disabled) _stub_b=0 ;;
	*) _stub_b=$4 ;;
	esac
	eval "$1=\$_stub_b"
}
network_get_device() {
	eval "_stub_d=\${STUB_NETDEV_$2-}"
	[ -n "$_stub_d" ] || return 1
	eval "$1=\$_stub_d"
}
_stub_args() { for _stub_a in "$@"; do printf '<%s>' "$_stub_a"; done; }
procd_open_instance() {
	_stub_cmd=""
	_stub_argv=""
	echo "open_instance" >> "$STUB_LOG"
}
procd_set_param() {
	_stub_p=$1
	shift
	if [ "$_stub_p" = command ]; then
		_stub_cmd="$*"
		_stub_argv=$(_stub_args "$@")
	fi
	echo "param $_stub_p $*" >> "$STUB_LOG"
}
procd_append_param() {
	_stub_p=$1
	shift
	if [ "$_stub_p" = command ]; then
		_stub_cmd="$_stub_cmd $*"
		_stub_argv="$_stub_argv$(_stub_args "$@")"
	fi
	echo "append $_stub_p $*" >> "$STUB_LOG"
}
procd_close_instance() {
	echo "command $_stub_cmd" >> "$STUB_LOG"
	echo "argv $_stub_argv" >> "$STUB_LOG"
	echo "close_instance" >> "$STUB_LOG"
}
procd_add_reload_trigger() { echo "reload_trigger $*" >> "$STUB_LOG"; }
procd_add_interface_trigger() { echo "interface_trigger $*" >> "$STUB_LOG"; }
logger() { echo "logger $*" >> "$STUB_LOG"; }
# rc.common's start, as reload_service calls it.
start() { start_service "$@"; }
"#;

/// Shells to run the script under: OpenWrt's is busybox ash; dash is the
/// closest strict POSIX shell on Debian.
fn shells() -> Vec<Vec<&'static str>> {
    let mut v = vec![vec!["sh"]];
    if have("dash", &["-c", "true"]) {
        v.push(vec!["dash"]);
    }
    if have("busybox", &["sh", "-c", "true"]) {
        v.push(vec!["busybox", "sh"]);
    }
    if have("bash", &["-c", "true"]) {
        v.push(vec!["bash", "--posix"]);
    }
    v
}

struct Router {
    firewall: String,
    own: Option<String>,
    netdevs: Vec<(&'static str, &'static str)>,
    /// The kernel has its own flowtable (nf_flow_table loaded).
    kmod: bool,
    /// firewall4 installed: what its `fw4 print` prints (None: it fails).
    fw4: Option<Option<String>>,
}

/// What `run` leaves: the calls, and the ruleset the script rendered.
struct Ran {
    log: Vec<String>,
    ruleset: Option<(String, u32, u32)>,
    dir: PathBuf,
}

fn fixture(name: &str) -> String {
    read(&format!("tests/fixtures/firewall4/{name}"))
}

impl Router {
    fn new(firewall: &str) -> Router {
        Router { firewall: firewall.to_string(), own: None, netdevs: Vec::new(), kmod: false, fw4: None }
    }

    fn fw4(mut self, render: Option<&str>) -> Router {
        self.fw4 = Some(render.map(str::to_string));
        self
    }

    fn kmod(mut self) -> Router {
        self.kmod = true;
        self
    }

    fn own(mut self, uci: &str) -> Router {
        self.own = Some(uci.to_string());
        self
    }

    fn netdev(mut self, net: &'static str, dev: &'static str) -> Router {
        self.netdevs.push((net, dev));
        self
    }

    /// Source the stubs and the init script (its `#!/bin/sh /etc/rc.common`
    /// line is a comment when sourced), call `func`, return the record.
    fn run(&self, shell: &[&str], func: &str) -> Vec<String> {
        let ran = self.run_full(shell, func);
        let _ = std::fs::remove_dir_all(&ran.dir);
        ran.log
    }

    fn run_full(&self, shell: &[&str], func: &str) -> Ran {
        let dir = scratch("procd");
        std::fs::create_dir_all(dir.join("etc/config")).unwrap();
        std::fs::write(dir.join("etc/config/firewall"), &self.firewall).unwrap();
        if let Some(own) = &self.own {
            // @DIR@: this run's scratch directory (a path under it).
            std::fs::write(dir.join("etc/config/nft-offload"), own.replace("@DIR@", dir.to_str().unwrap())).unwrap();
        }
        std::fs::create_dir_all(dir.join("modules")).unwrap();
        // The devices that exist: the networks' and those the tests' zones
        // name (firewall4 leaves out the others).
        for dev in self.netdevs.iter().map(|n| n.1).chain(["tun0"]) {
            std::fs::create_dir_all(dir.join("sys/class/net").join(dev)).unwrap();
        }
        if self.kmod {
            std::fs::create_dir_all(dir.join("sys/module/nf_flow_table")).unwrap();
        }
        let stubs = dir.join("stubs.sh");
        std::fs::write(&stubs, STUBS).unwrap();
        let fw4 = dir.join("sbin/fw4");
        if let Some(render) = &self.fw4 {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(dir.join("sbin")).unwrap();
            let body = match render {
                Some(text) => {
                    std::fs::write(dir.join("render.nft"), text).unwrap();
                    format!(
                        "#!/bin/sh\n[ \"$*\" = \"-q print\" ] || exit 9\ncat '{}'\n",
                        dir.join("render.nft").display()
                    )
                }
                None => "#!/bin/sh\necho 'Unable to parse firewall config' >&2\nexit 1\n".to_string(),
            };
            std::fs::write(&fw4, body).unwrap();
            std::fs::set_permissions(&fw4, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let log = dir.join("log");
        std::fs::write(&log, "").unwrap();
        let mut cmd = Command::new(shell[0]);
        cmd.args(&shell[1..])
            .arg("-c")
            .arg(format!(". \"$STUBS\" && . \"$INIT\" && {func}"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("STUBS", &stubs)
            .env("INIT", repo(INIT))
            .env("STUB_ROOT", &dir)
            .env("STUB_LOG", &log)
            .env("SYSFS", dir.join("sys"))
            .env("MODDIR", dir.join("modules"))
            .env("NFT_OFFLOAD_CONF", dir.join("run/nft-offload.toml"))
            .env("NFT_OFFLOAD_RUNDIR", dir.join("run/nft-offload"))
            .env("FW4", &fw4);
        for (net, dev) in &self.netdevs {
            cmd.env(format!("STUB_NETDEV_{net}"), dev);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{shell:?} {func}: {:?}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines: Vec<String> = std::fs::read_to_string(&log).unwrap().lines().map(str::to_string).collect();
        // The configuration file it generated, if any.
        if let Ok(conf) = std::fs::read_to_string(dir.join("run/nft-offload.toml")) {
            lines.extend(conf.lines().map(|l| format!("conf {l}")));
        }
        let ruleset = std::fs::read_to_string(dir.join("run/nft-offload/fw4.nft")).ok().map(|text| {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            (text, mode(dir.join("run/nft-offload/fw4.nft")), mode(dir.join("run/nft-offload")))
        });
        Ran { log: lines, ruleset, dir }
    }
}

const FW_ON: &str = "
config defaults
	option input 'REJECT'
	option forward 'REJECT'
	option flow_offloading '1'

config zone
	option name 'lan'
	list network 'lan'

config zone
	option name 'wan'
	list network 'wan'
	list network 'wan6'
";

const FW_ON_HW: &str = "
config defaults
	option flow_offloading '1'
	option flow_offloading_hw '1'
";

const FW_OFF: &str = "
config defaults
	option flow_offloading '0'
	option flow_offloading_hw '1'
";

const OWN_ETH: &str = "
config nft-offload 'main'
	list interface 'eth0'
	list interface 'eth1'
";

fn commands(log: &[String]) -> Vec<&str> {
    log.iter().filter_map(|l| l.strip_prefix("command ")).collect()
}

fn loggers(log: &[String]) -> Vec<&str> {
    log.iter().filter_map(|l| l.strip_prefix("logger ")).collect()
}

fn opened(log: &[String]) -> usize {
    log.iter().filter(|l| *l == "open_instance").count()
}

#[test]
fn procd_flow_offloading_on_with_listed_interfaces() {
    for sh in shells() {
        let log = Router::new(FW_ON).own(OWN_ETH).run(&sh, "start_service");
        assert_eq!(opened(&log), 1, "{sh:?}: {log:#?}");
        assert_eq!(
            commands(&log),
            ["/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --iface eth0 --iface eth1"],
            "{sh:?}"
        );
        let argv = log.iter().find_map(|l| l.strip_prefix("argv ")).unwrap();
        assert_eq!(
            argv,
            "</usr/sbin/nft-offload><run><--mode><auto><--idle-timeout><30><--iface><eth0><--iface><eth1>"
        );
        assert!(log.iter().any(|l| l.starts_with("param respawn")), "{log:#?}");
        assert!(log.contains(&"param stderr 1".to_string()), "{log:#?}");
        assert!(log.contains(&"close_instance".to_string()));
        assert!(loggers(&log).is_empty(), "{sh:?}: nothing to complain about: {log:#?}");
    }
}

#[test]
fn procd_hardware_offload_falls_back_to_software() {
    for sh in shells() {
        let log = Router::new(FW_ON_HW).own(OWN_ETH).run(&sh, "start_service");
        let msgs = loggers(&log);
        assert_eq!(
            msgs,
            ["-t nft-offload hardware flow offloading is not available; using software (eBPF) flow offloading"],
            "{sh:?}"
        );
        assert_eq!(opened(&log), 1, "{sh:?}: still starts, in software");
        assert_eq!(
            commands(&log),
            ["/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --iface eth0 --iface eth1"]
        );
    }
}

#[test]
fn procd_flow_offloading_off_starts_nothing() {
    for sh in shells() {
        for fw in [FW_OFF, "\nconfig defaults\n\toption input 'ACCEPT'\n", ""] {
            let log = Router::new(fw).own(OWN_ETH).run(&sh, "start_service");
            assert_eq!(opened(&log), 0, "{sh:?} {fw:?}: {log:#?}");
            let msgs = loggers(&log);
            assert_eq!(msgs.len(), 1, "{sh:?}: says why, once: {log:#?}");
            assert!(msgs[0].contains("flow offloading is off"), "{msgs:?}");
        }
    }
}

#[test]
fn procd_only_the_first_defaults_section_counts() {
    let fw = "config defaults\n\toption flow_offloading '0'\n\nconfig defaults\n\toption flow_offloading '1'\n";
    let log = Router::new(fw).own(OWN_ETH).run(&["sh"], "start_service");
    assert_eq!(opened(&log), 0, "{log:#?}");
    let fw = "config defaults\n\toption flow_offloading 'on'\n\nconfig defaults\n\toption flow_offloading '0'\n";
    let log = Router::new(fw).own(OWN_ETH).run(&["sh"], "start_service");
    assert_eq!(opened(&log), 1, "{log:#?}");
}

#[test]
fn procd_own_settings() {
    let own = "config nft-offload 'main'\n\toption mode 'tc'\n\toption idle_timeout '120'\n\tlist interface 'br-lan'\n";
    let log = Router::new(FW_ON).own(own).run(&["sh"], "start_service");
    assert_eq!(commands(&log), ["/usr/sbin/nft-offload run --mode tc --idle-timeout 120 --iface br-lan"]);

    // Bad values fall back to the defaults, with a word in the log, rather
    // than leaving procd to respawn a daemon that refuses them.
    let own = "config nft-offload 'main'\n\toption mode 'fast'\n\toption idle_timeout '0'\n\tlist interface 'eth0'\n";
    let log = Router::new(FW_ON).own(own).run(&["sh"], "start_service");
    assert_eq!(commands(&log), ["/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --iface eth0"]);
    assert_eq!(loggers(&log).len(), 2, "{log:#?}");
    for bad in ["99999", "30s", "99999999999999999999999"] {
        let own = format!("config nft-offload 'main'\n\toption idle_timeout '{bad}'\n\tlist interface 'eth0'\n");
        let log = Router::new(FW_ON).own(&own).run(&["sh"], "start_service");
        assert_eq!(commands(&log), ["/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --iface eth0"], "{bad}");
    }
}

#[test]
fn procd_default_interfaces_from_every_zone() {
    for sh in shells() {
        // No /etc/config/nft-offload at all.
        let log = Router::new(FW_ON)
            .netdev("wan", "pppoe-wan")
            .netdev("wan6", "pppoe-wan")
            .netdev("lan", "br-lan")
            .run(&sh, "start_service");
        assert_eq!(
            commands(&log),
            ["/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --iface br-lan --iface pppoe-wan"],
            "{sh:?}: {log:#?}"
        );
    }
    // A router on a stick: one device for both, named once.
    let log = Router::new(FW_ON).netdev("wan", "eth0").netdev("lan", "eth0").run(&["sh"], "start_service");
    assert_eq!(commands(&log), ["/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --iface eth0"]);
    // wan down at boot: lan alone; the interface trigger brings wan in later.
    let log = Router::new(FW_ON).netdev("lan", "br-lan").run(&["sh"], "start_service");
    assert_eq!(commands(&log), ["/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --iface br-lan"]);
    // Nothing at all: no instance, and the log says why.
    let log = Router::new(FW_ON).run(&["sh"], "start_service");
    assert_eq!(opened(&log), 0, "{log:#?}");
    assert!(loggers(&log)[0].contains("no interfaces"), "{log:#?}");
}

/// firewall4 depends on kmod-nft-offload: where the kernel has its own
/// flowtable, firewall4's switch is the kernel's (in hardware too), and
/// nft-offload never runs beside it; it runs where the owner turned
/// firewall4's off and chose it.
#[test]
fn procd_one_engine_at_a_time() {
    let own_on = "config nft-offload 'main'\n\toption enabled '1'\n\tlist interface 'eth0'\n";
    for sh in shells() {
        for fw in [FW_ON, FW_ON_HW] {
            let log = Router::new(fw).own(own_on).kmod().run(&sh, "start_service");
            assert_eq!(opened(&log), 0, "{sh:?}: two engines: {log:#?}");
            let msgs = loggers(&log);
            assert_eq!(msgs.len(), 1, "{log:#?}");
            assert!(msgs[0].contains("kmod-nft-offload") && msgs[0].contains("one engine at a time"), "{msgs:?}");
            assert_eq!(msgs[0].contains("in hardware"), fw == FW_ON_HW, "{msgs:?}");
        }
        // The owner's choice, with firewall4's offloading off.
        let log = Router::new(FW_OFF).own(own_on).kmod().run(&sh, "start_service");
        assert_eq!(commands(&log), ["/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --iface eth0"], "{sh:?}");
        assert!(loggers(&log).is_empty(), "{log:#?}");
        // Not chosen: nothing.
        let log = Router::new(FW_OFF).own(OWN_ETH).kmod().run(&sh, "start_service");
        assert_eq!(opened(&log), 0, "{log:#?}");
        // No kernel flowtable: chosen alone is enough too.
        let log = Router::new(FW_OFF).own(own_on).run(&sh, "start_service");
        assert_eq!(opened(&log), 1, "{log:#?}");
    }
}

/// Every zone's devices (its networks' L3 devices and its own `device`
/// entries), not only lan and wan.
#[test]
fn procd_every_zone_device() {
    let fw = format!(
        "{FW_ON}\nconfig zone\n\toption name 'guest'\n\toption network 'guest'\n\tlist device 'tun0'\n\
         \tlist device 'tun+'\n\tlist device 'wg9'\n"
    );
    let log = Router::new(&fw)
        .netdev("lan", "br-lan")
        .netdev("wan", "eth0.2")
        .netdev("guest", "br-guest")
        .run(&["sh"], "start_service");
    assert_eq!(
        commands(&log),
        ["/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --iface br-lan --iface eth0.2 --iface br-guest \
          --iface tun0"],
        "{log:#?}"
    );
    let log = Router::new(&fw).run(&["sh"], "service_triggers");
    for net in ["lan", "wan", "wan6", "guest"] {
        assert!(log.iter().any(|l| l.starts_with(&format!("interface_trigger interface.* {net} "))), "{net}: {log:#?}");
    }
}

/// max_flows, metrics and exclusions from UCI: flags, and a generated
/// configuration file the daemon's own parser accepts; values that could
/// break out of it are refused with a word in the log.
#[test]
fn procd_every_option_has_a_uci_name() {
    let own = "config nft-offload 'main'\n\toption max_flows '16384'\n\toption metrics '/var/run/nft-offload/m.sock'\n\
               \tlist exclude_address '192.168.1.50'\n\tlist exclude_address 'fd00::/64'\n\tlist exclude_port '22'\n\
               \tlist exclude_port '10000-20000'\n\tlist exclude_mark '0x10/0xff'\n\tlist exclude_protocol 'udp'\n\
               \tlist exclude_port '22\"]\n'\n\tlist interface 'eth0'\n";
    for sh in shells() {
        let log = Router::new(FW_ON).own(own).run(&sh, "start_service");
        let cmd = commands(&log);
        assert_eq!(cmd.len(), 1, "{sh:?}: {log:#?}");
        assert!(
            cmd[0].starts_with(
                "/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --max-flows 16384 --metrics \
                 /var/run/nft-offload/m.sock --config "
            ) && cmd[0].ends_with("nft-offload.toml --iface eth0"),
            "{sh:?}: {cmd:?}"
        );
        let conf: Vec<&str> = log.iter().filter_map(|l| l.strip_prefix("conf ")).collect();
        let text = conf.join("\n") + "\n";
        let mut input = nft_offload::settings::file::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        input.ifaces = Some(nft_offload::settings::Given::flag(
            "--iface",
            vec![nft_offload::settings::Given::flag("--iface", "eth0".to_string())],
        ));
        let s = nft_offload::settings::validate(input).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            (s.exclude.addresses.len(), s.exclude.ports.len(), s.exclude.marks.len(), s.exclude.protocols.len()),
            (2, 2, 1, 1),
            "{text}"
        );
        let msgs = loggers(&log);
        assert_eq!(msgs.len(), 1, "{sh:?}: {log:#?}");
        assert!(msgs[0].contains("ignoring exclude_port"), "{msgs:?}");
    }
    // Bad numbers are dropped with a word, not handed to a daemon that
    // would refuse them (and be respawned forever).
    let own = "config nft-offload 'main'\n\toption max_flows 'lots'\n\toption metrics 'a b'\n\tlist interface 'eth0'\n";
    let log = Router::new(FW_ON).own(own).run(&["sh"], "start_service");
    assert_eq!(commands(&log), ["/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --iface eth0"]);
    assert_eq!(loggers(&log).len(), 2, "{log:#?}");
}

#[test]
fn procd_triggers_and_header() {
    let log = Router::new(FW_ON).run(&["sh"], "service_triggers");
    assert!(log.contains(&"reload_trigger firewall nft-offload".to_string()), "{log:#?}");
    assert!(log.iter().any(|l| l.starts_with("interface_trigger interface.* wan ")), "{log:#?}");
    let log = Router::new(FW_ON).run(&["sh"], "echo \"vars $USE_PROCD $START\" >> \"$STUB_LOG\"");
    assert_eq!(log, ["vars 1 21"]);
    let text = read(INIT);
    assert_eq!(text.lines().next(), Some("#!/bin/sh /etc/rc.common"));
}

#[test]
fn procd_script_syntax() {
    let path = repo(INIT);
    let mut checked = 0;
    for sh in [&["sh"][..], &["dash"], &["busybox", "sh"], &["bash", "--posix"]] {
        if !have(sh[0], &[&sh[1..], &["-c", "true"]].concat()) {
            continue;
        }
        let out = Command::new(sh[0]).args(&sh[1..]).arg("-n").arg(&path).output().unwrap();
        assert!(out.status.success(), "{sh:?} -n: {}", String::from_utf8_lossy(&out.stderr));
        checked += 1;
    }
    assert!(checked >= 1);
    if have("checkbashisms", &["--version"]) {
        let out = Command::new("checkbashisms").arg("--posix").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "checkbashisms: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("checkbashisms not installed; skipped");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{INIT} must be executable (installed as /etc/init.d/nft-offload)");
    }
}

// ---- firewall4's own ruleset ----

fn translate(text: &str) -> nft_offload::policy::nft::Translated {
    nft_offload::policy::nft::translate(text).unwrap_or_else(|e| panic!("line {}: {}\n{text}", e.line, e.msg))
}

/// With firewall4's offloading on and no kernel flowtable, the engine runs
/// on exactly what `fw4 print` renders: fw4's devices, fw4's rule, in a
/// file only root can read.
#[test]
fn procd_fw4_offloading_on_runs_on_its_render() {
    let on = fixture("offload-on.nft");
    for sh in shells() {
        let ran = Router::new(FW_ON).fw4(Some(&on)).run_full(&sh, "start_service");
        let rs = ran.dir.join("run/nft-offload/fw4.nft");
        assert_eq!(
            commands(&ran.log),
            [format!("/usr/sbin/nft-offload run --mode auto --idle-timeout 30 --nft {}", rs.display())],
            "{sh:?}: {:#?}",
            ran.log
        );
        assert!(ran.log.contains(&"open_instance".to_string()));
        let (text, file_mode, dir_mode) = ran.ruleset.expect("rendered");
        assert_eq!(text, on, "{sh:?}: fw4's render, unchanged");
        assert_eq!((file_mode, dir_mode), (0o600, 0o700), "{sh:?}");
        assert!(loggers(&ran.log).is_empty(), "{sh:?}: {:#?}", ran.log);
        let _ = std::fs::remove_dir_all(&ran.dir);
    }
}

/// `list interface` names the flowtable's devices (ports, for XDP) in
/// fw4's render; nothing else of it changes.
#[test]
fn procd_fw4_listed_interfaces_replace_the_flowtable_devices() {
    let on = fixture("offload-on.nft");
    let own = "config nft-offload 'main'\n\tlist interface 'lan1'\n\tlist interface 'lan2'\n\tlist interface 'eth1'\n";
    for sh in shells() {
        let ran = Router::new(FW_ON).own(own).fw4(Some(&on)).run_full(&sh, "start_service");
        let (text, ..) = ran.ruleset.expect("rendered");
        let t = translate(&text);
        assert_eq!(t.flowtables.len(), 1);
        let mut devices = t.flowtables[0].devices.clone();
        devices.sort();
        assert_eq!(devices, ["eth1", "lan1", "lan2"], "{sh:?}");
        assert_eq!(t.offload_statements, 1);
        let changed: Vec<_> = on.lines().zip(text.lines()).filter(|(a, b)| a != b).collect();
        assert_eq!(changed.len(), 1, "{sh:?}: only the devices line: {changed:#?}");
        assert_eq!(on.lines().count(), text.lines().count());
        let _ = std::fs::remove_dir_all(&ran.dir);
    }
    // A name that could break out of the ruleset is refused, with a word.
    let own = "config nft-offload 'main'\n\tlist interface 'eth0};'\n\tlist interface 'a/b'\n\tlist interface 'eth1'\n";
    let ran = Router::new(FW_ON).own(own).fw4(Some(&on)).run_full(&["sh"], "start_service");
    let (text, ..) = ran.ruleset.expect("rendered");
    assert_eq!(translate(&text).flowtables[0].devices, ["eth1"]);
    assert_eq!(loggers(&ran.log).len(), 2, "{:#?}", ran.log);
    let _ = std::fs::remove_dir_all(&ran.dir);
}

/// The owner chose nft-offload where the kernel has a flowtable, so
/// firewall4's offloading is off and its render has neither flowtable nor
/// rule: they are added where fw4's template puts them, over every zone's
/// devices, and the result is the render fw4 gives with offloading on.
#[test]
fn procd_fw4_offloading_off_gets_the_templates_flowtable_and_rule() {
    let off = fixture("offload-off.nft");
    let on = fixture("offload-on.nft");
    let own_on = "config nft-offload 'main'\n\toption enabled '1'\n\toption metrics '@DIR@/run/nft-offload/m.sock'\n";
    let fw_off_zones = FW_ON.replace("option flow_offloading '1'", "option flow_offloading '0'");
    for sh in shells() {
        let ran = Router::new(&fw_off_zones)
            .own(own_on)
            .kmod()
            .netdev("lan", "br-lan")
            .netdev("wan", "eth1")
            .netdev("wan6", "eth1")
            .fw4(Some(&off))
            .run_full(&sh, "start_service");
        assert_eq!(commands(&ran.log).len(), 1, "{sh:?}: {:#?}", ran.log);
        let (text, file_mode, dir_mode) = ran.ruleset.expect("rendered");
        assert_eq!((file_mode, dir_mode), (0o600, 0o700), "{sh:?}: the added rule's file too");
        let (got, want) = (translate(&text), translate(&on));
        assert_eq!(got.flowtables[0].devices, want.flowtables[0].devices, "{sh:?}");
        assert_eq!(got.offload_statements, 1);
        // The same rule, first in the forward chain, as in fw4's own render.
        let first_rule = |t: &str| {
            let l: Vec<&str> = t.lines().collect();
            let at = l.iter().position(|x| x.contains("type filter hook forward priority filter;")).unwrap();
            l[at + 1..].iter().find(|x| !x.trim().is_empty()).unwrap().trim().to_string()
        };
        assert_eq!(first_rule(&text), first_rule(&on), "{sh:?}");
        assert_eq!(first_rule(&got.text), first_rule(&want.text), "{sh:?}");
        let _ = std::fs::remove_dir_all(&ran.dir);
    }
    // No zone device up: nothing to offload between, said once.
    let log = Router::new(&fw_off_zones).own(own_on).kmod().fw4(Some(&off)).run(&["sh"], "start_service");
    assert_eq!(opened(&log), 0, "{log:#?}");
    assert!(loggers(&log)[0].contains("no interfaces"), "{log:#?}");
}

/// fw4 failing, or a render without firewall4's table: not started, and
/// the log says why; never an engine on half a ruleset.
#[test]
fn procd_fw4_render_failures_start_nothing() {
    let log = Router::new(FW_ON).fw4(None).run(&["sh"], "start_service");
    assert_eq!(opened(&log), 0, "{log:#?}");
    assert!(loggers(&log)[0].contains("fw4 print failed: Unable to parse firewall config"), "{log:#?}");
    let own_on = "config nft-offload 'main'\n\toption enabled '1'\n\tlist interface 'eth0'\n";
    let log = Router::new(FW_OFF).own(own_on).fw4(Some("table inet other {\n}\n")).run(&["sh"], "start_service");
    assert_eq!(opened(&log), 0, "{log:#?}");
    assert!(loggers(&log)[0].contains("no table inet fw4"), "{log:#?}");
}

/// One engine at a time holds with firewall4 too: its render is never
/// run where the kernel flowtable is firewall4's.
#[test]
fn procd_fw4_one_engine_at_a_time() {
    let on = fixture("offload-on.nft");
    let own_on = "config nft-offload 'main'\n\toption enabled '1'\n";
    for fw in [FW_ON, FW_ON_HW] {
        let ran = Router::new(fw).own(own_on).kmod().fw4(Some(&on)).run_full(&["sh"], "start_service");
        assert_eq!(opened(&ran.log), 0, "{:#?}", ran.log);
        assert!(ran.ruleset.is_none(), "nothing rendered");
        let _ = std::fs::remove_dir_all(&ran.dir);
    }
}

/// Reload renders again (firewall4 changed) and, with no engine answering,
/// does nothing else; the triggers leave interfaces to firewall4's include.
#[test]
fn procd_fw4_reload_and_triggers() {
    let on = fixture("offload-on.nft");
    let ran = Router::new(FW_ON).fw4(Some(&on)).run_full(&["sh"], "reload_service");
    assert_eq!(commands(&ran.log).len(), 1, "{:#?}", ran.log);
    assert_eq!(ran.ruleset.map(|r| r.0), Some(on.clone()));
    let _ = std::fs::remove_dir_all(&ran.dir);
    let log = Router::new(FW_ON).fw4(Some(&on)).run(&["sh"], "service_triggers");
    assert_eq!(log, ["reload_trigger firewall nft-offload"], "fw4's include follows its reloads");
}

/// The include firewall4 runs and the uci-defaults script that registers
/// it: valid shell, and pointing at each other.
#[test]
fn openwrt_fw4_include_and_registration() {
    for f in ["packaging/openwrt/fw4.include", "packaging/openwrt/nft-offload.uci-defaults"] {
        let out = Command::new("sh").arg("-n").arg(repo(f)).output().unwrap();
        assert!(out.status.success(), "{f}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let defaults = read("packaging/openwrt/nft-offload.uci-defaults");
    assert!(defaults.contains("set firewall.nft_offload.type=script"));
    assert!(defaults.contains("set firewall.nft_offload.path=/usr/share/nft-offload/fw4.include"));
    let include = read("packaging/openwrt/fw4.include");
    assert!(include.contains("/etc/init.d/nft-offload reload"));
    let makefile = read("packaging/openwrt/Makefile");
    for (from, to) in [
        ("./fw4.include", "$(1)/usr/share/nft-offload/fw4.include"),
        ("./nft-offload.uci-defaults", "$(1)/etc/uci-defaults/90-nft-offload"),
        ("./nft-offload.init", "$(1)/etc/init.d/nft-offload"),
        ("./nft-offload.config", "$(1)/etc/config/nft-offload"),
    ] {
        assert!(makefile.lines().any(|l| l.contains(from) && l.contains(to)), "the Makefile installs {from} as {to}");
    }
}

/// The OpenWrt Makefile, evaluated by make against stand-ins for the build
/// system's include files: its Build/Prepare copies a source tree cargo can
/// build, its install definition puts every file where the init script and
/// firewall4 look for it, with the right modes; its version is one apk and
/// opkg accept; it is only offered for kernels with BTF.
#[test]
fn openwrt_makefile_prepares_and_installs() {
    use std::os::unix::fs::PermissionsExt;
    assert!(have("make", &["--version"]), "make is needed (./run.sh installs it; libbpf-sys builds with it too)");
    let dir = scratch("openwrt-make");
    let top = dir.join("top");
    std::fs::create_dir_all(top.join("include")).unwrap();
    std::fs::create_dir_all(top.join("feeds/packages/lang/rust")).unwrap();
    std::fs::write(top.join("rules.mk"), "").unwrap();
    std::fs::write(
        top.join("include/package.mk"),
        "INSTALL_DIR:=install -d -m0755\nINSTALL_BIN:=install -m0755\nINSTALL_DATA:=install -m0644\n\
         INSTALL_CONF:=install -m0600\nCP:=cp -fpR\n\
         define BuildPackage\n$$(eval $$(Package/$(1)))\nprepare:\n\t$$(Build/Prepare)\n\
         stage:\n\t$$(call Package/$(1)/install,$$(DEST))\n\
         show:\n\t@echo 'version=$$(PKG_VERSION)-r$$(PKG_RELEASE)'\n\t@echo 'depends=$$(strip $$(DEPENDS))'\n\
         \t@echo 'profile=$$(CARGO_PKG_PROFILE)'\nendef\n",
    )
    .unwrap();
    std::fs::write(top.join("include/bpf.mk"), "BPF_DEPENDS:=@HAS_BPF_TOOLCHAIN\nCLANG:=/bpf/clang\n").unwrap();
    std::fs::write(top.join("feeds/packages/lang/rust/rust-package.mk"), "define RustBinPackage\nendef\n").unwrap();
    let inst = dir.join("inst");
    std::fs::create_dir_all(inst.join("bin")).unwrap();
    std::fs::write(inst.join("bin/nft-offload"), "#!/bin/sh\n").unwrap();
    let make = |target: &str| {
        let out = Command::new("make")
            .current_dir(repo("packaging/openwrt"))
            .args(["-s", "-f", "Makefile", target])
            .arg(format!("TOPDIR={}", top.display()))
            .arg(format!("INCLUDE_DIR={}", top.join("include").display()))
            .arg(format!("PKG_INSTALL_DIR={}", inst.display()))
            .arg(format!("PKG_BUILD_DIR={}", dir.join("build").display()))
            .arg(format!("DEST={}", dir.join("root").display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "make {target}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let shown = make("show");
    assert!(shown.contains("version=0.1.0-r1"), "{shown}");
    assert!(shown.contains("@KERNEL_DEBUG_INFO_BTF") && shown.contains("+kmod-nf-conntrack-netlink"), "{shown}");
    assert!(shown.contains("profile=router"), "{shown}");
    let cargo_version =
        read("Cargo.toml").lines().find_map(|l| l.strip_prefix("version = ")).map(|v| v.trim_matches('"').to_string());
    assert_eq!(cargo_version.as_deref(), Some("0.1.0"), "PKG_VERSION follows Cargo.toml");

    make("prepare");
    for f in ["Cargo.toml", "Cargo.lock", "build.rs", "src/main.rs", "bpf/fastpath.bpf.c", "lab/Cargo.toml"] {
        assert!(dir.join("build").join(f).is_file(), "Build/Prepare copies {f}");
    }
    make("stage");
    let root = dir.join("root");
    for (path, mode) in [
        ("usr/sbin/nft-offload", 0o755),
        ("etc/init.d/nft-offload", 0o755),
        ("etc/config/nft-offload", 0o600),
        ("etc/uci-defaults/90-nft-offload", 0o755),
        ("usr/share/nft-offload/fw4.include", 0o644),
    ] {
        let m = std::fs::metadata(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(m.permissions().mode() & 0o777, mode, "{path}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
