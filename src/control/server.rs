//! The engine's side of the control socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::time::Duration;

use anyhow::{anyhow, Result};

use super::{encode_reply, parse_request, Request, Response, MAX_REQUEST, NAME};

pub struct ControlServer {
    l: UnixListener,
}

impl ControlServer {
    pub fn bind() -> Result<Self> {
        let l = UnixListener::bind_addr(&SocketAddr::from_abstract_name(NAME)?).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                anyhow!("another nft-offload is already running in this network namespace")
            } else {
                anyhow!("cannot open the control socket: {e}")
            }
        })?;
        l.set_nonblocking(true)?;
        Ok(ControlServer { l })
    }

    pub fn fd(&self) -> RawFd {
        self.l.as_raw_fd()
    }

    /// Serve every pending connection: read one request line (at most
    /// MAX_REQUEST bytes), answer with `handler`'s reply, close.
    pub fn serve(&self, mut handler: impl FnMut(Request) -> Result<Response, String>) {
        while let Ok((s, _)) = self.l.accept() {
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            if BufReader::new((&s).take(MAX_REQUEST)).read_line(&mut line).is_err() {
                continue;
            }
            let reply = parse_request(&line).and_then(&mut handler);
            let _ = (&s).write_all(encode_reply(&reply).as_bytes());
        }
    }
}
