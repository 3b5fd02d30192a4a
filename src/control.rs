//! Local control socket through which `status` and `flows` talk to a running
//! `run`. An abstract unix socket belongs to the network namespace it was
//! created in, which is exactly the scope of one engine instance.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

const NAME: &[u8] = b"nft-offload.ctl";

fn addr() -> std::io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(NAME)
}

pub struct ControlServer {
    l: Option<UnixListener>,
}

impl ControlServer {
    pub fn bind() -> Result<Self> {
        let l = UnixListener::bind_addr(&addr()?).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                anyhow!("another nft-offload is already running in this network namespace")
            } else {
                anyhow!("cannot open the control socket: {e}")
            }
        })?;
        l.set_nonblocking(true)?;
        Ok(ControlServer { l: Some(l) })
    }

    /// Stand-in while the real server is borrowed for serving.
    pub fn placeholder() -> Self {
        ControlServer { l: None }
    }

    pub fn fd(&self) -> RawFd {
        self.l.as_ref().map(|l| l.as_raw_fd()).unwrap_or(-1)
    }

    /// Serve every pending connection: read one request line, answer with
    /// `handler`'s output, close.
    pub fn serve(&self, mut handler: impl FnMut(&str) -> String) {
        let Some(l) = &self.l else { return };
        while let Ok((s, _)) = l.accept() {
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let mut r = BufReader::new(&s);
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let resp = handler(line.trim());
            let mut w = &s;
            let _ = w.write_all(resp.as_bytes());
        }
    }
}

/// Send one request to the engine running in this network namespace.
pub fn request(req: &str) -> Result<String> {
    let mut s = UnixStream::connect_addr(&addr()?).map_err(|e| {
        if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) {
            anyhow!("nft-offload is not running in this network namespace (start it with `nft-offload run`)")
        } else {
            anyhow!("cannot reach the running nft-offload: {e}")
        }
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out).context("reading the engine's answer")?;
    if out.is_empty() {
        bail!("the running nft-offload closed the connection without answering");
    }
    Ok(out)
}
