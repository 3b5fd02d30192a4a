//! The opt-in Prometheus endpoint (`--metrics`, `metrics` in the
//! configuration): plain HTTP/1.1, `GET /metrics`, the text format.
//!
//! Threat model (SECURITY.md): per-host traffic is what `hosts` keeps
//! behind CAP_NET_ADMIN, and any local user can connect to a TCP port, so
//! the way meant for it is a filesystem unix socket that only its owner
//! (root) may connect to (mode 0600, made so at bind time, not after); a
//! TCP address is bound only when the operator names one, and then every
//! local user can read it (and the network, unless it is a loopback
//! address), which the documentation says. Nothing is bound by default.
//!
//! A thread accepts and reads requests, so a slow or silent client holds
//! that thread (2 s at most), never the engine: the engine only renders the
//! text when a complete request asks for it (`Request` over a channel, the
//! poll loop woken by an eventfd).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::settings::MetricsListen;

/// How long a client may take to send its request, and to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request waits for the engine.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// A scrape waiting for the engine's text.
pub type Reply = mpsc::SyncSender<String>;

/// The engine's end: `fd` becomes readable when scrapes wait; `take` them.
pub struct MetricsServer {
    /// Shared with the thread, so its descriptor stays open (and its
    /// number is not reused) while the thread may still write to it.
    wake: Arc<OwnedFd>,
    requests: mpsc::Receiver<Reply>,
    /// The socket file to remove at exit.
    unix_path: Option<PathBuf>,
    pub listen: MetricsListen,
}

impl MetricsServer {
    /// Bind `listen` and start the accepting thread.
    pub fn start(listen: &MetricsListen) -> Result<MetricsServer> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("metrics: eventfd");
        }
        // SAFETY: a descriptor just created and owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let (tx, rx) = mpsc::channel();
        let unix_path = match listen {
            MetricsListen::Unix(path) => {
                let l = bind_unix(path)?;
                let w = wake.clone();
                spawn(move || serve(l.incoming(), &tx, &w))?;
                Some(path.clone())
            }
            MetricsListen::Tcp(addr) => {
                let l =
                    std::net::TcpListener::bind(addr).with_context(|| format!("metrics: cannot listen on {addr}"))?;
                let w = wake.clone();
                spawn(move || serve(l.incoming(), &tx, &w))?;
                None
            }
        };
        tracing::info!(at = %listen, "metrics served");
        Ok(MetricsServer { wake, requests: rx, unix_path, listen: listen.clone() })
    }

    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The scrapes waiting now (the eventfd read, so poll rests again).
    pub fn take(&self) -> Vec<Reply> {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into a u64 from our own eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        self.requests.try_iter().collect()
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn spawn(f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new().name("metrics".into()).spawn(f).context("metrics: starting its thread")?;
    Ok(())
}

/// A unix socket at `path` that only its owner may connect to. A socket
/// left there by an engine that died is replaced; anything else there, or
/// a socket something still listens on, is an error.
fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            bail!("metrics: {} exists and is not a socket; not replacing it", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("metrics: something already serves {} (another engine?)", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("metrics: removing the stale {}", path.display()))?;
    }
    // The mode comes from the umask at bind: 0600 from the start, so no
    // one can connect in a window before a chmod. The umask is the
    // process's; the engine starts no other thread that creates files yet.
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let l = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring it.
    unsafe { libc::umask(old) };
    l.with_context(|| format!("metrics: cannot listen on {}", path.display()))
}

/// Accept forever (the thread ends with the process).
fn serve<S: Read + Write + SetTimeouts>(
    incoming: impl Iterator<Item = std::io::Result<S>>,
    tx: &mpsc::Sender<Reply>,
    wake: &OwnedFd,
) {
    for s in incoming.flatten() {
        let _ = answer(s, tx, wake.as_raw_fd());
    }
}

/// Read timeouts on both kinds of stream.
trait SetTimeouts {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()>;
}

impl SetTimeouts for std::net::TcpStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl SetTimeouts for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

fn answer<S: Read + Write + SetTimeouts>(mut s: S, tx: &mpsc::Sender<Reply>, wake: RawFd) -> std::io::Result<()> {
    s.set_timeouts(CLIENT_TIMEOUT)?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = s.read(&mut buf)?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (status, body) = match route(&head) {
        Route::Metrics => {
            let (rtx, rrx) = mpsc::sync_channel(1);
            let _ = tx.send(rtx);
            let one: u64 = 1;
            // SAFETY: writes 8 bytes to the engine's eventfd.
            unsafe { libc::write(wake, (&one as *const u64).cast(), 8) };
            match rrx.recv_timeout(ENGINE_TIMEOUT) {
                Ok(text) => ("200 OK", text),
                Err(_) => ("503 Service Unavailable", "the engine did not answer in time\n".into()),
            }
        }
        Route::NotFound => ("404 Not Found", "nft-offload serves GET /metrics\n".into()),
        Route::BadMethod => ("405 Method Not Allowed", "only GET\n".into()),
        Route::Bad => ("400 Bad Request", "not an HTTP request\n".into()),
    };
    let ctype = if status.starts_with("200") {
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(msg.as_bytes())
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
    Bad,
}

/// What a request head asks for.
fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut w = line.split_whitespace();
    match (w.next(), w.next(), w.next()) {
        (Some(m), Some(path), Some(v)) if v.starts_with("HTTP/1.") => {
            if m != "GET" && m != "HEAD" {
                Route::BadMethod
            } else if path == "/metrics" || path.starts_with("/metrics?") {
                Route::Metrics
            } else {
                Route::NotFound
            }
        }
        _ => Route::Bad,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn requests_are_routed() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"\x16\x03\x01 tls"), Route::Bad);
        assert_eq!(route(b""), Route::Bad);
    }

    #[test]
    fn the_unix_socket_is_owner_only_and_replaces_only_a_dead_socket() {
        let dir = std::env::temp_dir().join(format!("nft-offload-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.sock");
        let s = MetricsServer::start(&MetricsListen::Unix(path.clone())).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        // A live one is not taken over.
        let e = MetricsServer::start(&MetricsListen::Unix(path.clone())).err().unwrap();
        assert!(format!("{e:#}").contains("already serves"), "{e:#}");
        // A scrape reaches the engine's end and gets its text.
        let t = std::thread::spawn({
            let path = path.clone();
            move || {
                let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
                c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
                let mut out = String::new();
                c.read_to_string(&mut out).unwrap();
                out
            }
        });
        let mut pfd = libc::pollfd { fd: s.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
        for r in s.take() {
            r.send("nft_offload_up 1\n".into()).unwrap();
        }
        let out = t.join().unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\nnft_offload_up 1\n"), "{out}");
        drop(s);
        assert!(!path.exists(), "the socket is removed at exit");
        // A file that is not a socket is never replaced.
        std::fs::write(&path, "mine").unwrap();
        let e = MetricsServer::start(&MetricsListen::Unix(path.clone())).err().unwrap();
        assert!(format!("{e:#}").contains("is not a socket"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
