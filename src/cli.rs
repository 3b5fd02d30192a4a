//! Command line: parsing and rendering. Data goes to stdout, logs to stderr.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::control::{Client, FlowView, Status};
use crate::engine::Engine;
use crate::policy::ModeChoice;
use crate::settings::{self, Given, Settings, SettingsInput};

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
    #[arg(long, value_name = "N", help = format!(
        "Maximum number of offloaded connections [default: {}]",
        settings::DEFAULT_MAX_FLOWS
    ))]
    pub max_flows: Option<i64>,
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

pub fn render_status(s: &Status) -> String {
    let mut o = String::new();
    o += &format!("nft-offload running (pid {}, up {}s, mode {:?})\n", s.pid, s.uptime_s, s.mode_requested);
    o += "Interfaces:\n";
    for i in &s.interfaces {
        o += &format!(
            "  {:<12} ifindex {:<4} {:<4} {:<5} driver {:<10} {}\n",
            i.name,
            i.ifindex,
            i.mode.as_str(),
            if i.up { "up" } else { "DOWN" },
            if i.driver.is_empty() { "?" } else { &i.driver },
            i.reason
        );
    }
    o += &format!(
        "Flows: {} offloaded / {} capacity, {} waiting for a neighbour, {} dormant (idle > {}s)\n",
        s.flows_offloaded, s.flow_capacity, s.flows_waiting_for_neighbour, s.flows_dormant, s.idle_timeout_s
    );
    o += &format!("Fast path: {} packets, {} bytes\n", s.fast_path_packets, s.fast_path_bytes);
    o += "Slow path (packets handed to the kernel, by reason):\n";
    for (k, v) in s.slow_path.iter().filter(|(_, v)| **v > 0) {
        o += &format!("  {k:<14} {v}\n");
    }
    o += &format!(
        "Offloads: {}   conntrack events: {}   resyncs: {}   keepalives: {}\n",
        s.offloads_total, s.conntrack_events, s.conntrack_resyncs, s.conntrack_refreshes
    );
    if !s.teardowns.is_empty() {
        o += "Teardowns:";
        for (k, v) in &s.teardowns {
            o += &format!(" {k}={v}");
        }
        o += "\n";
    }
    if !s.not_offloaded.is_empty() {
        o += "Not offloaded:\n";
        for (k, v) in &s.not_offloaded {
            o += &format!("  {v:>6}  {k}\n");
        }
    }
    o
}

/// conntrack -L style: one line per connection, original then reply tuple.
pub fn render_flows(flows: &[FlowView]) -> String {
    let mut o = String::new();
    for f in flows {
        let pnum = if f.proto == "tcp" { 6 } else { 17 };
        o += &format!(
            "{:<4} {:<2} {}src={} dst={} sport={} dport={} packets={} bytes={} src={} dst={} sport={} dport={} packets={} bytes={} [OFFLOAD] mode={} {}->{} idle={:.0}s mark={} id={}\n",
            f.proto,
            pnum,
            f.state.as_ref().map(|s| format!("{s} ")).unwrap_or_default(),
            f.orig.src,
            f.orig.dst,
            f.orig.sport,
            f.orig.dport,
            f.packets_orig,
            f.bytes_orig,
            f.reply.src,
            f.reply.dst,
            f.reply.sport,
            f.reply.dport,
            f.packets_reply,
            f.bytes_reply,
            f.mode.as_str(),
            f.iif,
            f.oif,
            f.idle_s,
            f.mark,
            f.id
        );
    }
    o += &format!("nft-offload: {} flow entries offloaded.\n", flows.len());
    o
}
