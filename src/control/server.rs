//! The engine's side of the control socket: a thread accepts, checks who
//! connected, reads the request with a deadline and hands it to the engine
//! loop through a channel and an eventfd (which the loop polls); the loop
//! answers through a reply channel and the connection's thread writes it.
//! So a slow or silent client costs a thread, never the loop's time.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use super::peer::{authorize, Peer};
use super::{encode_reply, parse_request, Request, Response, MAX_REQUEST, NAME};

/// A whole request must arrive within this (a 8 MiB line over a local
/// socket takes milliseconds).
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// Writing a reply; the client reads as fast as it can.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A reload attaches and runs nft: seconds at worst.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// Privileged connections served at once; more are told to retry.
/// Unprivileged ones never count: they are refused at accept.
const MAX_CONNECTIONS: usize = 64;

type Reply = Result<Response, String>;

/// A request read and checked by the control thread, waiting for the loop.
pub struct Pending {
    req: Request,
    reply: SyncSender<Reply>,
}

pub struct ControlServer {
    rx: Receiver<Pending>,
    /// Readable when requests wait in `rx`.
    ready: Arc<OwnedFd>,
    /// Written on drop: the accept thread ends.
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Bind the abstract name and start the control thread. If the name is
    /// taken, say by whom: an engine, or a squatter that must be removed.
    pub fn bind() -> Result<Self> {
        let addr = SocketAddr::from_abstract_name(NAME)?;
        let l = UnixListener::bind_addr(&addr).map_err(|e| {
            if e.kind() == ErrorKind::AddrInUse {
                anyhow!("{}", name_holder(&addr))
            } else {
                anyhow!("cannot open the control socket: {e}")
            }
        })?;
        let ready = Arc::new(eventfd()?);
        let stop = Arc::new(eventfd()?);
        let (tx, rx) = mpsc::channel();
        let (r, s) = (ready.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("nfo-control".into())
            .spawn(move || accept_loop(l, tx, r, s))
            .context("starting the control thread")?;
        Ok(ControlServer { rx, ready, stop, thread: Some(thread) })
    }

    /// Polled by the engine loop: readable when requests wait.
    pub fn fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    /// Answer every waiting request with `handler`.
    pub fn serve(&self, mut handler: impl FnMut(Request) -> Reply) {
        // Reset first, drain second: a request queued after the drain
        // writes the eventfd again.
        let mut n = 0u64;
        // SAFETY: 8-byte read from our nonblocking eventfd.
        unsafe { libc::read(self.ready.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        while let Ok(p) = self.rx.try_recv() {
            let _ = p.reply.send(handler(p.req));
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        signal(&self.stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Who holds our name, for the refusal to start.
fn name_holder(addr: &SocketAddr) -> String {
    let who = UnixStream::connect_addr(addr).and_then(|s| Peer::of(&s));
    match who {
        Ok(p) if authorize(&p).is_ok() => {
            format!("another nft-offload is already running in this network namespace (pid {})", p.pid)
        }
        Ok(p) => format!(
            "the control socket's name @{} is held by pid {} (uid {}), which is not a privileged nft-offload: \
             refusing to start (stop that process; it could otherwise pose as the engine)",
            String::from_utf8_lossy(NAME),
            p.pid,
            p.uid
        ),
        Err(e) => format!(
            "the control socket's name @{} is already bound in this network namespace ({e})",
            String::from_utf8_lossy(NAME)
        ),
    }
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is ours on success.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("eventfd");
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn signal(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: 8-byte write to an eventfd.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Refused connections waiting for their client to close: closing a unix
/// socket with unread data makes the client's read fail (ECONNRESET) before
/// it sees the refusal, so the refusal is sent, our side shut for writing,
/// and what the client sends is read and dropped until it closes or
/// LINGER passes. Bounded: the oldest goes first.
const LINGER: Duration = Duration::from_secs(1);
const MAX_LINGERING: usize = 256;

fn accept_loop(l: UnixListener, tx: Sender<Pending>, ready: Arc<OwnedFd>, stop: Arc<OwnedFd>) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut lingering: Vec<(UnixStream, Instant)> = Vec::new();
    let _ = l.set_nonblocking(true);
    loop {
        let mut fds = vec![
            libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        fds.extend(lingering.iter().map(|(s, _)| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }));
        let timeout = if lingering.is_empty() { -1 } else { 100 };
        // SAFETY: valid array of pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, timeout) };
        if fds[1].revents != 0 {
            return;
        }
        let mut k = 0;
        lingering.retain(|(s, since)| {
            k += 1;
            let gone = fds[k + 1].revents != 0 && !drain(s);
            !gone && since.elapsed() < LINGER
        });
        while let Ok((s, _)) = l.accept() {
            // Credentials first, before reading a byte: an unprivileged
            // client costs one getsockopt and a short refusal.
            let peer = Peer::of(&s).map_err(|e| format!("cannot identify the peer: {e}"));
            let refusal = match peer.and_then(|p| authorize(&p)) {
                Err(e) => {
                    tracing::debug!("control connection refused: {e}");
                    Some(format!("permission denied: {e}; nft-offload answers only root or CAP_NET_ADMIN"))
                }
                Ok(()) if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS => {
                    Some(format!("busy: {MAX_CONNECTIONS} control requests are in progress, try again"))
                }
                Ok(()) => None,
            };
            if let Some(msg) = refusal {
                refuse(&s, &msg);
                if lingering.len() >= MAX_LINGERING {
                    lingering.remove(0);
                }
                lingering.push((s, Instant::now()));
                continue;
            }
            active.fetch_add(1, Ordering::Relaxed);
            let (tx, ready, count) = (tx.clone(), ready.clone(), active.clone());
            let spawned = std::thread::Builder::new().name("nfo-control-conn".into()).spawn(move || {
                serve_one(s, &tx, &ready);
                count.fetch_sub(1, Ordering::Relaxed);
            });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// One short error line without waiting (the socket buffer takes it),
/// then end of stream for the client.
fn refuse(s: &UnixStream, msg: &str) {
    let _ = s.set_nonblocking(true);
    let _ = (&*s).write_all(encode_reply(&Err(msg.to_string())).as_bytes());
    let _ = s.shutdown(std::net::Shutdown::Write);
}

/// Read and drop what a refused client sent; false once it closed.
fn drain(s: &UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match (&*s).read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) => return e.kind() == ErrorKind::WouldBlock,
        }
    }
}

fn serve_one(s: UnixStream, tx: &Sender<Pending>, ready: &OwnedFd) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
    let reply = read_request(&s, MAX_REQUEST, READ_DEADLINE).and_then(|line| parse_request(&line)).and_then(|req| {
        let (reply, rx) = mpsc::sync_channel(1);
        tx.send(Pending { req, reply }).map_err(|_| "the engine is stopping".to_string())?;
        signal(ready);
        rx.recv_timeout(ANSWER_TIMEOUT).map_err(|_| "the engine did not answer".to_string())?
    });
    let _ = (&s).write_all(encode_reply(&reply).as_bytes());
}

/// One request line (up to a newline or the end of the stream), at most
/// `limit` bytes, complete within `deadline` of the call.
fn read_request(s: &UnixStream, limit: usize, deadline: Duration) -> Result<String, String> {
    let until = Instant::now() + deadline;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no complete request within {deadline:?}"));
        }
        let _ = s.set_read_timeout(Some(left));
        match (&*s).read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                let nl = chunk[..n].iter().position(|&b| b == b'\n');
                buf.extend_from_slice(&chunk[..nl.unwrap_or(n)]);
                if buf.len() > limit {
                    return Err(format!("request longer than {limit} bytes"));
                }
                if nl.is_some() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("no complete request within {deadline:?}"));
            }
            Err(e) => return Err(format!("reading the request: {e}")),
        }
    }
    String::from_utf8(buf).map_err(|_| "the request is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_bounded_in_size() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let w = std::thread::spawn(move || {
            let _ = b.write_all(&[b'x'; 5000]);
            b
        });
        let e = read_request(&a, 4096, Duration::from_secs(2)).unwrap_err();
        assert_eq!(e, "request longer than 4096 bytes");
        drop(w.join());
        // exactly the limit, then a newline: accepted, newline dropped
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[b'y'; 4096]).unwrap();
        b.write_all(b"\nignored").unwrap();
        assert_eq!(read_request(&a, 4096, Duration::from_secs(2)).unwrap().len(), 4096);
    }

    #[test]
    fn requests_are_bounded_in_time() {
        // silent
        let (a, _b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        let e = read_request(&a, 4096, Duration::from_millis(200)).unwrap_err();
        assert!(e.starts_with("no complete request within"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // trickling bytes does not extend the deadline
        let (a, mut b) = UnixStream::pair().unwrap();
        let w = std::thread::spawn(move || {
            for _ in 0..20 {
                if b.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let t = Instant::now();
        let e = read_request(&a, 4096, Duration::from_millis(300)).unwrap_err();
        assert!(e.starts_with("no complete request within"), "{e}");
        assert!(t.elapsed() < Duration::from_millis(600), "{:?}", t.elapsed());
        drop(a);
        w.join().unwrap();
    }

    #[test]
    fn end_of_stream_ends_the_request() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(br#"{"request":"status"}"#).unwrap();
        drop(b);
        assert_eq!(parse_request(&read_request(&a, 4096, Duration::from_secs(1)).unwrap()), Ok(Request::Status));
    }
}
