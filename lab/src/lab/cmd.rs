//! Running external tools (`ip`, `nft`, `ethtool`, ...) with errors that name
//! the failed command and carry its stderr, so a broken lab step is obvious.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// `prog arg1 arg2 ...`, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn check(cmd: &Command, out: Output) -> Result<String> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    let detail =
        if stderr.is_empty() { String::from_utf8_lossy(&out.stdout).trim().to_string() } else { stderr.to_string() };
    bail!("`{}` failed ({}): {}", describe(cmd), out.status, detail)
}

/// Run to completion; stdout on success, an error naming the command and its
/// stderr otherwise.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("failed to start `{}`", describe(cmd)))?;
    check(cmd, out)
}

/// Like [`run`] but feeds `input` on stdin (used for `nft -f -`, which loads
/// the whole script as one atomic transaction).
pub(crate) fn run_stdin(cmd: &mut Command, input: &str) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{}`", describe(cmd)))?;
    // The scripts are small (a few KiB), far below the pipe buffer, so writing
    // everything before reading the output cannot deadlock.
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin for `{}`", describe(cmd)))?;
    stdin.write_all(input.as_bytes()).with_context(|| format!("writing stdin of `{}`", describe(cmd)))?;
    drop(stdin);
    let out = child.wait_with_output().with_context(|| format!("waiting for `{}`", describe(cmd)))?;
    check(cmd, out)
}

/// `ip netns exec NS args...`.
pub(crate) fn netns_command(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// `ip [-n NS] -batch -` with `lines` on stdin: many ip commands, one
/// process (each `ip netns exec` costs a process and a mount namespace).
/// `ip` stops at the first failing line and names it.
pub(crate) fn ip_batch(ns: Option<&str>, lines: &[String]) -> Result<String> {
    let mut c = Command::new("ip");
    if let Some(ns) = ns {
        c.args(["-n", ns]);
    }
    c.args(["-batch", "-"]);
    run_stdin(&mut c, &(lines.join("\n") + "\n"))
}
