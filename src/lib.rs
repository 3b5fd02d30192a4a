//! nft-offload: flow offload for Linux routers.
//!
//! The fast path is BPF (bpf/*.bpf.c); this crate is the control plane that
//! follows conntrack and programs the fast path's maps.

pub mod check;
pub mod cli;
pub mod conntrack;
pub mod control;
pub mod dataplane;
pub mod engine;
pub mod flow;
pub mod hooks;
pub mod host;
pub mod metrics;
pub mod nlwatch;
pub mod policy;
pub mod proto;
pub mod routes;
pub mod settings;
pub mod topology;
pub mod xfrm;

/// Logs to stderr at `info`, filtered by `NFT_OFFLOAD_LOG` when set: the
/// lab's default.
pub fn init_logging() {
    init_logging_at(0);
}

/// Logs to stderr. `verbosity` moves the level from `info`: -1 `warn`, -2
/// `error`, 1 `debug`, 2 `trace` (`-q`/`-v`); `NFT_OFFLOAD_LOG` (an
/// `Targets` directive: `debug`, `nft_offload=debug,warn`) overrides it. Plain lines wherever nothing reads
/// them on a terminal: journald, procd's logd and syslog stamp each line
/// themselves, so a timestamp is written only on a terminal or into a file
/// (where nothing else would), colour only on a terminal and never with
/// `NO_COLOR` set (no-color.org).
pub fn init_logging_at(verbosity: i8) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = match verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter: tracing_subscriber::filter::Targets = std::env::var("NFT_OFFLOAD_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| level.parse().expect("a level name"));
    let terminal = std::io::stderr().is_terminal();
    let style = log_style(terminal, stderr_is_file(), std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()));
    let b = tracing_subscriber::fmt().with_writer(std::io::stderr).with_max_level(tracing::Level::TRACE);
    let b = b.with_ansi(style.colour);
    if style.timestamp {
        b.finish().with(filter).init();
    } else {
        b.without_time().finish().with(filter).init();
    }
}

/// How log lines look (`init_logging_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStyle {
    pub colour: bool,
    pub timestamp: bool,
}

/// Colour on a terminal unless `NO_COLOR`; a timestamp on a terminal or in
/// a regular file, none into a pipe or socket (journald, logd, syslog).
pub fn log_style(terminal: bool, file: bool, no_colour: bool) -> LogStyle {
    LogStyle { colour: terminal && !no_colour, timestamp: terminal || file }
}

/// Whether stderr is a regular file (`2>engine.log`).
fn stderr_is_file() -> bool {
    // SAFETY: fstat on fd 2 writes only into the struct it is given.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    unsafe { libc::fstat(2, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFREG }
}

/// An error as one line, each cause once: `anyhow`'s `{:#}` joins the
/// chain with ": ", and an error whose message already quotes its source
/// (`cannot read X: No such file or directory`) would say the cause twice.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if c.is_empty() || out.contains(&c) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_plain_unless_a_terminal_reads_them() {
        // (terminal, file, NO_COLOR) -> (colour, timestamp)
        let cases = [
            ((true, false, false), (true, true)),
            ((true, false, true), (false, true)),
            ((false, true, false), (false, true)),
            ((false, false, false), (false, false)),
            ((false, false, true), (false, false)),
        ];
        for ((t, f, n), (colour, timestamp)) in cases {
            assert_eq!(log_style(t, f, n), LogStyle { colour, timestamp }, "terminal {t} file {f} NO_COLOR {n}");
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let msg = format!("cannot read /x: {io}");
        let e = anyhow::Error::new(io).context(msg.clone());
        assert_eq!(format!("{e:#}"), format!("{msg}: entity not found"), "anyhow repeats it");
        assert_eq!(error_text(&e), msg);
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(error_text(&e), "outer: middle: inner");
    }
}
