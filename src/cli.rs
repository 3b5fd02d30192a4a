//! Command line: parsing and rendering. Data goes to stdout, logs to stderr.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

mod render;

use crate::control::Client;
use crate::engine::Engine;
use crate::policy::ModeChoice;
use crate::settings::{self, Given, KeepaliveChoice, Settings, SettingsInput};
pub use render::{render_flows, render_hosts, render_status};

#[derive(Parser, Debug)]
#[command(
    name = "nft-offload",
    version,
    about = "Flow offload for Linux routers: eBPF fast path driven by conntrack",
    // The man page takes these paragraphs as they are: no alignment that
    // its filling would break.
    disable_help_subcommand = true,
    after_long_help = "\
Files: /etc/nft-offload/config.toml holds the service's settings \
(nft-offload.service runs `nft-offload run --config` on it).

Signals to `run`: SIGTERM and SIGINT detach the fast path and exit 0, \
connections continue through the kernel; SIGHUP reads the --config and \
ruleset files again, as `reload` does.

Exit status: 0 success; 1 failure; 2 bad input (a flag or a value in the \
configuration), nothing applied.

Environment: NFT_OFFLOAD_LOG (a tracing filter such as `debug`) overrides \
-v and -q; NO_COLOR turns colour off on a terminal."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    /// More log lines: -v debug, -vv trace (NFT_OFFLOAD_LOG overrides)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Fewer log lines: -q warnings and errors only, -qq errors only
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    pub quiet: u8,
}

impl Cli {
    /// `-v`/`-q` as a step from the default level (`init_logging_at`).
    pub fn verbosity(&self) -> i8 {
        let v = i8::try_from(self.verbose).unwrap_or(i8::MAX);
        let q = i8::try_from(self.quiet).unwrap_or(i8::MAX);
        v.saturating_sub(q)
    }
}

/// The exit status for an error: 2 for input the user can correct (a flag
/// or configuration value, as clap's own usage errors), 1 for the rest.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.chain().any(|c| c.is::<settings::SettingsError>()) {
        2
    } else {
        1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the offload engine in the foreground (SIGINT/SIGTERM detach it).
    Run(RunArgs),
    /// Apply changed settings to the running engine, all or nothing. Without
    /// --nft (or on SIGHUP) it reads its --config and ruleset files again:
    /// a new ruleset is loaded atomically and every offloaded connection
    /// goes back through it; new exclusions and idle timeout apply at once;
    /// interfaces, mode, max_flows, keepalive and metrics need a restart.
    Reload {
        /// A new ruleset for a ruleset engine, read with your permissions and
        /// sent to it (it must keep a flowtable and `flow add @ft`)
        #[arg(long, value_name = "FILE")]
        nft: Option<PathBuf>,
    },
    /// What this host supports and what each interface would use, with a
    /// remedy per problem; exits non-zero if offload cannot work at all.
    Check {
        /// Interfaces to examine (default: all but lo).
        #[arg(long = "iface")]
        ifaces: Vec<String>,
        /// The mode `run` would be given: the report says what each
        /// interface would use under it
        #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
        mode: ModeChoice,
        /// Output format: text for people, json for scripts
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Where the engine is attached, how, and what it did.
    Status {
        /// Output format: text for people, json for scripts
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Traffic per host through the router, offloaded packets included
    /// (conntrack's own counters, which nlbwmon and LuCI read, miss them):
    /// what each host uploaded and downloaded, the hosts of NATed
    /// connections being the inside ones.
    Hosts {
        /// Output format: text for people, json for scripts
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Offloaded connections, in conntrack -L's layout; with --all also
    /// those on the kernel's path, each with why.
    Flows {
        /// Output format: text for people, json for scripts
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Also list the connections on the kernel's path, with the reason
        /// per connection
        #[arg(short = 'a', long)]
        all: bool,
        #[command(flatten)]
        filter: FlowFilter,
    },
}

/// conntrack -L's filters, on the original direction.
#[derive(Args, Debug, Default, Clone)]
pub struct FlowFilter {
    /// Original source address
    #[arg(short = 's', long = "src", value_name = "ADDR")]
    pub src: Option<std::net::IpAddr>,
    /// Original destination address
    #[arg(short = 'd', long = "dst", value_name = "ADDR")]
    pub dst: Option<std::net::IpAddr>,
    /// Protocol: tcp or udp
    #[arg(short = 'p', long = "proto", value_name = "PROTO", value_parser = ["tcp", "udp"])]
    pub proto: Option<String>,
    /// Original source port
    #[arg(long, value_name = "PORT")]
    pub sport: Option<u16>,
    /// Original destination port
    #[arg(long, value_name = "PORT")]
    pub dport: Option<u16>,
    /// Conntrack mark (offloaded connections; the kernel's path lists none
    /// under a mark filter)
    #[arg(short = 'm', long, value_name = "MARK", value_parser = parse_mark)]
    pub mark: Option<u32>,
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    v.map_err(|_| format!("{s:?} is not a mark (a number, or 0x followed by hex)"))
}

impl FlowFilter {
    fn tuple(&self, proto: &str, t: &crate::control::TupleView) -> bool {
        self.src.is_none_or(|a| a == t.src)
            && self.dst.is_none_or(|a| a == t.dst)
            && self.proto.as_deref().is_none_or(|p| p == proto)
            && self.sport.is_none_or(|p| p == t.sport)
            && self.dport.is_none_or(|p| p == t.dport)
    }

    pub fn flow(&self, f: &crate::control::FlowView) -> bool {
        self.tuple(&f.proto, &f.orig) && self.mark.is_none_or(|m| m == f.mark)
    }

    pub fn slow(&self, f: &crate::control::SlowView) -> bool {
        self.mark.is_none() && self.tuple(&f.proto, &f.orig)
    }
}

/// `run`: the engine's settings as flags, a TOML file, or both (flags
/// override the file's values). Defaults and ranges are the settings
/// module's, not clap's, so flags and file agree.
#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("what").args(["ifaces", "config", "nft"]).multiple(true).required(true))]
pub struct RunArgs {
    /// Interface to offload between (repeat; at least two to forward).
    #[arg(long = "iface", conflicts_with = "nft")]
    pub ifaces: Vec<String>,
    /// TOML configuration (interfaces or a ruleset, mode, exclusions,
    /// timeouts); flags given as well override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// nftables ruleset with a flowtable and `flow add @ft` (as for
    /// kmod-nft-offload / firewall4): loaded atomically; it decides what is
    /// offloaded and its flowtable's devices are the interfaces.
    #[arg(long, value_name = "FILE")]
    pub nft: Option<PathBuf>,
    #[arg(long, value_enum, help = format!(
        "auto: XDP where it is correct and faster, else TC (status says why) [default: {}]",
        settings::DEFAULT_MODE.to_possible_value().expect("a visible value").get_name()
    ))]
    pub mode: Option<ModeChoice>,
    #[arg(long, value_name = "SECONDS", help = format!(
        "Take a flow off the fast path after this many idle seconds [default: {}]",
        settings::DEFAULT_IDLE_TIMEOUT.as_secs()
    ))]
    pub idle_timeout: Option<i64>,
    /// Maximum number of offloaded connections [default: nf_conntrack_max,
    /// or fewer where 1/16 of RAM (or 3/4 of the service's cgroup
    /// memory.max) at 2.5 KiB a connection allows fewer; `check` shows it]
    #[arg(long, value_name = "N")]
    pub max_flows: Option<i64>,
    /// Who keeps offloaded connections' conntrack entries alive. auto: the
    /// fast path as it forwards, where the kernel has the conntrack kfuncs
    /// (`status` and `check` say), else the engine over ctnetlink; netlink:
    /// always the engine [default: auto]
    #[arg(long, value_enum, value_name = "WHO")]
    pub keepalive: Option<KeepaliveChoice>,
    /// Serve Prometheus metrics (GET /metrics), per-host traffic included,
    /// at ADDR: an absolute path makes a unix socket only root may connect
    /// to (e.g. /run/nft-offload/metrics.sock); IP:PORT listens on TCP,
    /// readable by every local user (and the network, unless loopback)
    /// [default: none]
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

impl RunArgs {
    /// The file's values (if any) with the flags given on top, validated.
    pub fn settings(&self) -> Result<Settings> {
        let mut input = match &self.config {
            Some(path) => settings::file::read(path)?,
            None => SettingsInput::default(),
        };
        if !self.ifaces.is_empty() {
            let names = self.ifaces.iter().map(|i| Given::flag("--iface", i.clone())).collect();
            input.ifaces = Some(Given::flag("--iface", names));
        }
        input.mode = self.mode.map(|v| Given::flag("--mode", v)).or(input.mode);
        input.idle_timeout = self.idle_timeout.map(|v| Given::flag("--idle-timeout", v)).or(input.idle_timeout);
        input.max_flows = self.max_flows.map(|v| Given::flag("--max-flows", v)).or(input.max_flows);
        input.keepalive = self.keepalive.map(|v| Given::flag("--keepalive", v)).or(input.keepalive);
        input.metrics = self.metrics.clone().map(|v| Given::flag("--metrics", v)).or(input.metrics);
        input.nft = self.nft.clone().map(|v| Given::flag("--nft", v)).or(input.nft);
        let s = settings::validate(input)?;
        if let Some(path) = &self.config {
            tracing::info!(file = %path.display(), exclusions = !s.exclude.is_empty(), "configuration loaded");
        }
        if let [one] = s.ifaces.as_slice() {
            tracing::warn!(
                "only one interface ({one}): only connections that arrive and leave by it are offloaded; \
                 name every interface the router forwards between"
            );
        }
        Ok(s)
    }
}

pub fn main_with(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(args) => {
            let mut engine = Engine::start(args.settings()?)?;
            if args.config.is_some() || args.nft.is_some() {
                engine.reread_with(Box::new(move || args.settings()));
            }
            engine.run()?;
            drop(engine);
            tracing::info!("stopped; nothing left attached");
            Ok(())
        }
        Cmd::Reload { nft: Some(nft) } => {
            let path = std::path::absolute(&nft).unwrap_or(nft);
            println!("{}", Client::reload(&path)?);
            Ok(())
        }
        Cmd::Reload { nft: None } => {
            println!("{}", Client::reload_files()?);
            Ok(())
        }
        Cmd::Check { ifaces, mode, output } => {
            let report = crate::check::run(&crate::check::CheckOpts { ifaces, mode });
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Text => print!("{}", report.render()),
            }
            std::process::exit(report.exit_code());
        }
        Cmd::Status { output } => {
            let st = Client::status()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&st)?),
                Output::Text => print!("{}", render_status(&st)),
            }
            Ok(())
        }
        Cmd::Hosts { output } => {
            let hosts = Client::hosts()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&hosts)?),
                Output::Text => print!("{}", render_hosts(&hosts, crate::host::conntrack_acct())),
            }
            Ok(())
        }
        Cmd::Flows { output, all, filter } => {
            let mut flows = Client::flows()?;
            flows.retain(|f| filter.flow(f));
            let slow = if all {
                let mut s = Client::slow_flows()?;
                s.retain(|f| filter.slow(f));
                Some(s)
            } else {
                None
            };
            match (output, &slow) {
                (Output::Json, None) => println!("{}", serde_json::to_string_pretty(&flows)?),
                (Output::Json, Some(s)) => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "offloaded": flows, "slow_path": s }))?
                ),
                (Output::Text, _) => print!("{}", render_flows(&flows, slow.as_deref())),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::settings::tests::{flags, FULL};
    use crate::settings::validate;

    /// `nft-offload run ARGS` through clap and `RunArgs::settings`.
    fn run(args: &[&str]) -> anyhow::Result<Settings> {
        use clap::Parser;
        let cli = Cli::try_parse_from([&["nft-offload", "run"], args].concat())?;
        match cli.cmd {
            Cmd::Run(a) => a.settings(),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn run_command_line_goes_through_the_validator() {
        let s = run(&["--iface", "lan0", "--iface", "wan0"]).unwrap();
        assert_eq!(s, validate(flags(&["lan0", "wan0"])).unwrap(), "defaults are the validator's, not clap's");
        let e = run(&["--iface", "lan0", "--idle-timeout", "0"]).unwrap_err().to_string();
        assert_eq!(e, "--idle-timeout: 0 is out of range 1..=86400");
        let e = run(&["--iface", "lan0", "--max-flows", "99999999"]).unwrap_err().to_string();
        assert_eq!(e, "--max-flows: 99999999 is out of range 1..=16777216");

        let dir = std::env::temp_dir().join(format!("nft-offload-run-args-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, FULL).unwrap();
        let f = f.to_str().unwrap();
        let s = run(&["--config", f, "--mode", "xdp", "--idle-timeout", "7"]).unwrap();
        assert_eq!((s.mode, s.idle_timeout, s.max_flows), (ModeChoice::Xdp, Duration::from_secs(7), Some(131072)));
        assert_eq!((s.ifaces.len(), s.exclude.ports.len()), (2, 3), "the rest is the file's");
        let e = run(&["--config", f, "--nft", "x.nft"]).unwrap_err();
        assert!(e.to_string().contains("interfaces[0]: with a ruleset"), "{e}");
        assert_eq!(exit_code(&e), 2, "bad input exits as clap's usage errors do");

        // A file that names a ruleset runs `--nft` mode: one service
        // definition for every mode. Relative names are the file's.
        let g = dir.join("nft.toml");
        std::fs::write(&g, "ruleset = \"fw.nft\"\nidle_timeout = 9\n").unwrap();
        let s = run(&["--config", g.to_str().unwrap()]).unwrap();
        assert_eq!((s.nft, s.ifaces.len()), (Some(dir.join("fw.nft")), 0));
        let s = run(&["--config", g.to_str().unwrap(), "--nft", "/etc/other.nft"]).unwrap();
        assert_eq!(s.nft.as_deref(), Some(std::path::Path::new("/etc/other.nft")), "the flag overrides the file");
        let e = run(&["--config", g.to_str().unwrap(), "--iface", "eth0"]).unwrap_err().to_string();
        assert!(e.starts_with("--iface: with a ruleset"), "{e}");
        std::fs::write(&g, "mode = \"tc\"\n").unwrap();
        let e = run(&["--config", g.to_str().unwrap()]).unwrap_err().to_string();
        assert!(e.starts_with("no interfaces given") && e.contains("ruleset"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flow_filters_are_conntracks() {
        use crate::control::{SlowView, TupleView};
        let parse = |args: &[&str]| match Cli::try_parse_from([&["nft-offload", "flows"], args].concat()) {
            Ok(Cli { cmd: Cmd::Flows { filter, .. }, .. }) => filter,
            other => panic!("{other:?}"),
        };
        let t = TupleView {
            src: "192.168.1.2".parse().unwrap(),
            dst: "203.0.113.2".parse().unwrap(),
            sport: 40000,
            dport: 22,
        };
        let slow = SlowView {
            proto: "tcp".into(),
            protonum: 6,
            orig: t,
            zone: 0,
            code: "excluded".into(),
            reason: String::new(),
        };
        // (arguments, matches the slow tcp 192.168.1.2:40000 -> 203.0.113.2:22)
        for (args, want) in [
            (&[][..], true),
            (&["-s", "192.168.1.2"][..], true),
            (&["-s", "192.168.1.3"][..], false),
            (&["-d", "203.0.113.2", "-p", "tcp", "--dport", "22"][..], true),
            (&["-p", "udp"][..], false),
            (&["--sport", "40001"][..], false),
            (&["--mark", "0x10"][..], false),
        ] {
            assert_eq!(parse(args).slow(&slow), want, "{args:?}");
        }
        assert_eq!(parse(&["-m", "0x1f"]).mark, Some(31));
        assert!(Cli::try_parse_from(["nft-offload", "flows", "--mark", "x"]).is_err());
        assert!(Cli::try_parse_from(["nft-offload", "flows", "-p", "icmp"]).is_err());
    }

    #[test]
    fn run_alone_names_every_way_to_say_what_to_offload() {
        let e = Cli::try_parse_from(["nft-offload", "run"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let text = e.to_string();
        for flag in ["--iface", "--config", "--nft"] {
            assert!(text.contains(flag), "{flag} missing from: {text}");
        }
    }

    #[test]
    fn loopback_is_refused_by_name() {
        let e = run(&["--iface", "lo", "--iface", "eth0"]).unwrap_err();
        assert_eq!(e.to_string(), "--iface: \"lo\" is the loopback device: the kernel forwards nothing through it");
        assert_eq!(exit_code(&e), 2);
    }

    #[test]
    fn metrics_take_a_socket_path_or_an_address_and_nothing_else() {
        use crate::settings::MetricsListen;
        let e = run(&["--iface", "eth0", "--metrics", "localhost:9641"]).unwrap_err();
        assert!(e.to_string().starts_with("--metrics: \"localhost:9641\" is neither an absolute socket path"), "{e}");
        assert_eq!(exit_code(&e), 2);
        assert!(run(&["--iface", "eth0", "--metrics", "metrics.sock"]).is_err(), "a relative path");
        let s = run(&["--iface", "eth0", "--metrics", "[::1]:9641"]).unwrap();
        assert_eq!(s.metrics, Some(MetricsListen::Tcp("[::1]:9641".parse().unwrap())));
        let s = run(&["--iface", "eth0", "--metrics", "/run/nft-offload/metrics.sock"]).unwrap();
        assert_eq!(s.metrics, Some(MetricsListen::Unix("/run/nft-offload/metrics.sock".into())));
        assert_eq!(run(&["--iface", "eth0"]).unwrap().metrics, None, "nothing is served unless asked");
    }

    #[test]
    fn verbosity_steps_from_info() {
        let v = |args: &[&str]| Cli::try_parse_from([&["nft-offload"], args].concat()).map(|c| c.verbosity());
        assert_eq!(v(&["status"]).unwrap(), 0);
        assert_eq!(v(&["-vv", "status"]).unwrap(), 2);
        assert_eq!(v(&["status", "-q"]).unwrap(), -1, "global: after the subcommand too");
        assert!(v(&["-v", "-q", "status"]).is_err(), "-v and -q contradict each other");
    }
}
