//! A TCP transfer whose every byte is checked: the sender writes a
//! deterministic pseudo-random stream (xorshift64 from a seed), the receiver
//! regenerates it and compares, so corruption, loss or reordering anywhere
//! on the path shows up at its offset. Both ends also fold what they saw
//! into an FNV-1a digest, reported as the evidence.
//!
//! Each end runs on a thread that joined its network namespace, so no tool
//! has to start (python takes seconds under TCG).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

/// The pseudo-random stream of `seed`: xorshift64, eight bytes a step
/// (cheap enough for a debug build under TCG, where a byte-wise loop was
/// the transfer's bottleneck).
pub struct Pattern {
    x: u64,
    /// Bytes of the current word not handed out yet (a chunk may end
    /// mid-word).
    pending: [u8; 8],
    npending: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern { x: seed | 1, pending: [0; 8], npending: 0 }
    }

    fn word(&mut self) -> [u8; 8] {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.x.to_le_bytes()
    }

    pub fn fill(&mut self, mut buf: &mut [u8]) {
        while self.npending > 0 && !buf.is_empty() {
            buf[0] = self.pending[8 - self.npending];
            self.npending -= 1;
            buf = &mut buf[1..];
        }
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.word());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.pending = self.word();
            let n = rest.len();
            rest.copy_from_slice(&self.pending[..n]);
            self.npending = 8 - n;
        }
    }
}

/// FNV-1a over the stream's bytes taken eight at a time (as little-endian
/// words, with a byte-wise tail): 64 bits, the same for any chunking only
/// when fed whole words, so both ends feed it through [`Digest::update`]
/// with their own carry.
#[derive(Clone, Copy)]
pub struct Digest {
    h: u64,
    carry: [u8; 8],
    ncarry: usize,
}

impl Default for Digest {
    fn default() -> Self {
        Digest { h: 0xcbf2_9ce4_8422_2325, carry: [0; 8], ncarry: 0 }
    }
}

impl Digest {
    fn mix(&mut self, w: u64) {
        self.h ^= w;
        self.h = self.h.wrapping_mul(0x0100_0000_01b3);
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while self.ncarry > 0 && self.ncarry < 8 && !data.is_empty() {
            self.carry[self.ncarry] = data[0];
            self.ncarry += 1;
            data = &data[1..];
            if self.ncarry == 8 {
                let w = u64::from_le_bytes(self.carry);
                self.mix(w);
                self.ncarry = 0;
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        for &b in chunks.remainder() {
            self.carry[self.ncarry] = b;
            self.ncarry += 1;
        }
    }

    pub fn hex(mut self) -> String {
        for i in 0..self.ncarry {
            let b = self.carry[i];
            self.mix(u64::from(b));
        }
        format!("{:016x}", self.h)
    }
}

use crate::lab::netns::spawn_in_netns as spawn_in;

/// What the receiving end saw.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    pub bytes: u64,
    /// Offset of the first byte that differs from the stream, if any.
    pub first_bad: Option<u64>,
    pub digest: String,
    pub seconds: f64,
}

impl Received {
    pub fn intact(&self, expected: u64) -> bool {
        self.first_bad.is_none() && self.bytes == expected
    }
}

/// Sending side: the parts of the stream of `seed`, one after the other,
/// each at most `rate` bytes/s (0: as fast as the path takes). Before each
/// part but the first, and before closing, it waits for a go on `gate`.
/// Returns the digest of everything sent.
fn send(mut s: TcpStream, parts: &[u64], seed: u64, rate: u64, gate: &Receiver<()>) -> Result<String> {
    let mut p = Pattern::new(seed);
    let mut d = Digest::default();
    let mut buf = vec![0u8; 16 * 1024];
    for (i, &bytes) in parts.iter().enumerate() {
        if i > 0 {
            gate.recv().context("waiting to send the next part")?;
        }
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            p.fill(&mut buf[..n]);
            d.update(&buf[..n]);
            s.write_all(&buf[..n]).context("sending")?;
            sent += n as u64;
            if rate > 0 {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
    gate.recv().context("waiting to close")?;
    s.shutdown(std::net::Shutdown::Write).ok();
    // Wait for the receiver to close, so the last bytes are not cut by an RST.
    let mut sink = [0u8; 64];
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    Ok(d.hex())
}

/// Receiving side: reads until EOF and compares with the stream of `seed`;
/// tells `progress` each time the bytes received reach the next of `marks`.
fn receive(mut s: TcpStream, seed: u64, timeout: Duration, marks: &[u64], progress: &Sender<u64>) -> Result<Received> {
    s.set_read_timeout(Some(timeout)).ok();
    let mut p = Pattern::new(seed);
    let mut d = Digest::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let mut first_bad = None;
    let mut next_mark = 0;
    let start = Instant::now();
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => bail!("receiving after {got} bytes: {e}"),
        };
        p.fill(&mut want[..n]);
        d.update(&buf[..n]);
        // Slice equality is a memcmp even in a debug build; the byte
        // search only runs on a mismatch.
        if first_bad.is_none() && buf[..n] != want[..n] {
            let i = (0..n).find(|&i| buf[i] != want[i]).unwrap_or(0);
            first_bad = Some(got + i as u64);
        }
        got += n as u64;
        while next_mark < marks.len() && got >= marks[next_mark] {
            let _ = progress.send(got);
            next_mark += 1;
        }
    }
    Ok(Received { bytes: got, first_bad, digest: d.hex(), seconds: start.elapsed().as_secs_f64() })
}

/// Which way the checked bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The server sends (a download through the router).
    Download,
    /// The client sends.
    Upload,
}

/// One checked transfer between a client in `client_ns` and a server
/// listening on `server` in `server_ns`; `connect_to` is the address the
/// client dials (differs from `server` through a DNAT). It runs in two
/// phases on one connection: `warmup` bytes, a pause for the caller
/// (`between`: wait for the offload, read the counters), then `bulk` bytes,
/// and a second pause (`after`: read the counters again) before the close,
/// so what the caller measures is exactly the bulk, without the handshake
/// and the close.
pub struct Transfer<'a> {
    pub server_ns: &'a str,
    pub server: SocketAddr,
    pub client_ns: &'a str,
    pub connect_to: SocketAddr,
    pub warmup: u64,
    pub bulk: u64,
    pub seed: u64,
    /// Bytes per second the sender keeps to (0: unlimited).
    pub rate: u64,
    pub direction: Direction,
    pub timeout: Duration,
}

/// What a transfer showed.
#[derive(Debug, Clone, Serialize)]
pub struct TransferReport {
    pub sent_digest: String,
    pub received: Received,
    /// How long the bulk took to arrive.
    pub bulk_seconds: f64,
}

impl TransferReport {
    pub fn intact(&self, expected: u64) -> bool {
        self.received.intact(expected) && self.received.digest == self.sent_digest
    }
}

impl Transfer<'_> {
    pub fn total(&self) -> u64 {
        self.warmup + self.bulk
    }

    /// Run it; `between` and `after` run on the calling thread at the two
    /// pauses. An error in either still lets the connection close.
    pub fn run<A, B>(
        &self,
        between: impl FnOnce() -> Result<A>,
        after: impl FnOnce() -> Result<B>,
    ) -> Result<(TransferReport, A, B)> {
        let listener = {
            let addr = self.server;
            spawn_in(self.server_ns, move || TcpListener::bind(addr).with_context(|| format!("binding {addr}")))?
                .join()
                .map_err(|_| anyhow!("bind thread panicked"))??
        };
        let (seed, rate, timeout, dir) = (self.seed, self.rate, self.timeout, self.direction);
        let parts = [self.warmup, self.bulk];
        let marks = [self.warmup, self.warmup + self.bulk];
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (prog_tx, prog_rx) = mpsc::channel::<u64>();
        // Each end either sends (through the gate) or receives (reporting
        // progress); which one is the server depends on the direction.
        let mut gate_rx = Some(gate_rx);
        let mut prog_tx = Some(prog_tx);
        let mut end = |server: bool| -> Box<dyn FnOnce(TcpStream) -> Result<Side> + Send> {
            let sends = (dir == Direction::Download) == server;
            if sends {
                let g = gate_rx.take().expect("one sender");
                Box::new(move |s| send(s, &parts, seed, rate, &g).map(Side::Sent))
            } else {
                let p = prog_tx.take().expect("one receiver");
                Box::new(move |s| receive(s, seed, timeout, &marks, &p).map(Side::Got))
            }
        };
        let server_end = end(true);
        let client_end = end(false);
        let server = spawn_in(self.server_ns, move || {
            let (s, _) = listener.accept().context("accepting")?;
            server_end(s)
        })?;
        let to = self.connect_to;
        let client = spawn_in(self.client_ns, move || {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
                .with_context(|| format!("connecting to {to}"))?;
            client_end(s)
        })?;
        let wait = |what: &str| -> Result<()> {
            prog_rx.recv_timeout(timeout).map(|_| ()).map_err(|_| anyhow!("no {what} within {} s", timeout.as_secs()))
        };
        let phases = (|| -> Result<(A, B, f64)> {
            wait("warm-up data")?;
            let a = between();
            let t = Instant::now();
            let _ = gate_tx.send(());
            let a = a?;
            wait("bulk data")?;
            let secs = t.elapsed().as_secs_f64();
            let b = after()?;
            Ok((a, b, secs))
        })();
        // Let the sender close whatever happened (and a sender still before
        // its bulk see a closed gate).
        let _ = gate_tx.send(());
        drop(gate_tx);
        let c = client.join().map_err(|_| anyhow!("client thread panicked"))?;
        if c.is_err() {
            // The server is stuck in accept() if the client never connected.
            let to = self.server;
            let _ = spawn_in(self.server_ns, move || Ok(TcpStream::connect_timeout(&to, Duration::from_secs(1))));
        }
        let s = server.join().map_err(|_| anyhow!("server thread panicked"))?;
        let (a, b, bulk_seconds) = phases?;
        let (c, s) = (c.context("client side")?, s.context("server side")?);
        match (c, s) {
            (Side::Got(received), Side::Sent(sent_digest)) | (Side::Sent(sent_digest), Side::Got(received)) => {
                Ok((TransferReport { sent_digest, received, bulk_seconds }, a, b))
            }
            _ => unreachable!("one side sends, the other receives"),
        }
    }
}

enum Side {
    Sent(String),
    Got(Received),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_is_deterministic_and_not_trivial() {
        let (mut a, mut b) = (Pattern::new(7), Pattern::new(7));
        let (mut x, mut y) = ([0u8; 4096], [0u8; 4096]);
        a.fill(&mut x[..1001]);
        a.fill(&mut x[1001..1003]);
        a.fill(&mut x[1003..]);
        b.fill(&mut y);
        assert_eq!(x, y, "chunking must not change the stream");
        let distinct = x.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(distinct > 200, "{distinct}");
        let mut c = Pattern::new(8);
        c.fill(&mut y);
        assert_ne!(x, y);
    }

    #[test]
    fn the_digest_does_not_depend_on_chunking() {
        let mut data = [0u8; 1000];
        Pattern::new(3).fill(&mut data);
        let mut a = Digest::default();
        a.update(&data);
        let mut b = Digest::default();
        for c in data.chunks(7) {
            b.update(c);
        }
        assert_eq!(a.hex(), b.hex());
        let mut c = Digest::default();
        data[500] ^= 1;
        c.update(&data);
        assert_ne!(a.hex(), c.hex());
    }
}
