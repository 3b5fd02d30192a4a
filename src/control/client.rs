//! The client side, used by the CLI.

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;

use super::peer::{authorize, Peer};
use super::{check_ruleset_size, Envelope, FlowView, Request, Status, NAME};

/// The engine running in this network namespace.
pub struct Client;

impl Client {
    pub fn status() -> Result<Status> {
        call(&Request::Status)
    }

    pub fn flows() -> Result<Vec<FlowView>> {
        call(&Request::Flows)
    }

    pub fn slow_flows() -> Result<Vec<crate::control::SlowView>> {
        call(&Request::SlowFlows)
    }

    pub fn hosts() -> Result<Vec<crate::control::HostView>> {
        call(&Request::Hosts)
    }

    /// Send the ruleset at `path`, read here with the caller's own
    /// permissions (the engine opens no file for a client). Returns the
    /// engine's summary of what changed.
    /// Ask the engine to read the files it was started with again.
    pub fn reload_files() -> Result<String> {
        call(&Request::ReloadFiles)
    }

    pub fn reload(path: &std::path::Path) -> Result<String> {
        // Its includes too, here, as the caller (`policy::include`).
        let ruleset = crate::policy::include::read_inlined(path)?;
        check_ruleset_size(ruleset.len()).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        call(&Request::Reload { name: path.display().to_string(), ruleset })
    }
}

fn call<T: DeserializeOwned>(req: &Request) -> Result<T> {
    let addr = SocketAddr::from_abstract_name(NAME)?;
    let mut s = UnixStream::connect_addr(&addr).map_err(|e| {
        if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) {
            anyhow!("nft-offload is not running in this network namespace (start it with `nft-offload run`)")
        } else {
            anyhow!("cannot reach the running nft-offload: {e}")
        }
    })?;
    // Anyone in the namespace can bind the abstract name first: talk only
    // to a process that could be the engine (root or CAP_NET_ADMIN here).
    let server = Peer::of(&s).context("identifying the process behind the control socket")?;
    if let Err(e) = authorize(&server) {
        bail!("refusing to talk to the process holding nft-offload's control socket: {e}; it is not the engine");
    }
    // A reload runs nft and attaches programs: allow it time.
    s.set_read_timeout(Some(Duration::from_secs(130)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out).context("reading the engine's answer")?;
    if out.is_empty() {
        bail!("the running nft-offload closed the connection without answering");
    }
    match serde_json::from_str::<Envelope<T>>(&out) {
        Ok(Envelope::Ok(v)) => Ok(v),
        Ok(Envelope::Error(e)) => bail!("{e}"),
        Err(e) => bail!("unexpected answer from the engine ({e}): {}", out.chars().take(200).collect::<String>()),
    }
}
