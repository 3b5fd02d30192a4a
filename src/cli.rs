//! Command line: parsing and rendering. Data goes to stdout, logs to stderr.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

mod render;

use crate::control::Client;
use crate::engine::Engine;
use crate::policy::ModeChoice;
use crate::settings::{self, Given, KeepaliveChoice, Settings, SettingsInput};
pub use render::{render_flows, render_status};

#[derive(Parser, Debug)]
#[command(name = "nft-offload", version, about = "Flow offload for Linux routers: eBPF fast path driven by conntrack")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
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
    /// Replace the ruleset of a running `run --nft`, atomically; offloaded
    /// connections go back through the new rules.
    Reload {
        #[arg(long, value_name = "FILE")]
        nft: PathBuf,
    },
    /// What this host supports and what each interface would use, with a
    /// remedy per problem; exits non-zero if offload cannot work at all.
    Check {
        /// Interfaces to examine (default: all but lo).
        #[arg(long = "iface")]
        ifaces: Vec<String>,
        #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
        mode: ModeChoice,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Where the engine is attached, how, and what it did.
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Offloaded connections, conntrack style.
    Flows {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// `run`: the engine's settings as flags, a TOML file, or both (flags
/// override the file's values). Defaults and ranges are the settings
/// module's, not clap's, so flags and file agree.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Interface to offload between (repeat; at least two to forward).
    #[arg(long = "iface", required_unless_present_any = ["nft", "config"], conflicts_with = "nft")]
    pub ifaces: Vec<String>,
    /// TOML configuration (interfaces, mode, exclusions, timeouts); flags
    /// given as well override its values.
    #[arg(long, value_name = "FILE", conflicts_with = "nft")]
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
}

impl RunArgs {
    /// The file's values (if any) with the flags given on top, validated.
    pub fn settings(self) -> Result<Settings> {
        let mut input = match &self.config {
            Some(path) => settings::file::read(path)?,
            None => SettingsInput::default(),
        };
        if !self.ifaces.is_empty() {
            let names = self.ifaces.into_iter().map(|i| Given::flag("--iface", i)).collect();
            input.ifaces = Some(Given::flag("--iface", names));
        }
        input.mode = self.mode.map(|v| Given::flag("--mode", v)).or(input.mode);
        input.idle_timeout = self.idle_timeout.map(|v| Given::flag("--idle-timeout", v)).or(input.idle_timeout);
        input.max_flows = self.max_flows.map(|v| Given::flag("--max-flows", v)).or(input.max_flows);
        input.keepalive = self.keepalive.map(|v| Given::flag("--keepalive", v)).or(input.keepalive);
        input.nft = self.nft.map(|v| Given::flag("--nft", v));
        let s = settings::validate(input)?;
        if let Some(path) = &self.config {
            tracing::info!(file = %path.display(), exclusions = !s.exclude.is_empty(), "configuration loaded");
        }
        Ok(s)
    }
}

pub fn main_with(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(args) => {
            let mut engine = Engine::start(args.settings()?)?;
            engine.run()?;
            drop(engine);
            tracing::info!("stopped; nothing left attached");
            Ok(())
        }
        Cmd::Reload { nft } => {
            let path = std::path::absolute(&nft).unwrap_or(nft);
            println!("{}", Client::reload(&path)?);
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
        Cmd::Flows { output } => {
            let flows = Client::flows()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&flows)?),
                Output::Text => print!("{}", render_flows(&flows)),
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
        assert!(run(&["--config", f, "--nft", "x.nft"]).is_err(), "--nft and --config exclude each other");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
