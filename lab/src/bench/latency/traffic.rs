//! The latency phase's TCP connections: paced ones (a small write every
//! `interval`, long enough to be offloaded) and transfers of fixed sizes,
//! from the LAN client to a sink on the WAN server.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::lab::{cpu, netns, Lab};

/// The client's ephemeral ports during the phase (set as the LAN
/// namespace's ip_local_port_range), which the taps filter on.
pub(super) const PORT_LO: u16 = 40000;
pub(super) const PORT_HI: u16 = 40999;
const SINK_PORT: u16 = 7000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Kind {
    Paced,
    /// A transfer, by its size label.
    Transfer(String),
}

/// A connection that was made: its client port, which connection from
/// that port it was, and what it did.
#[derive(Debug, Clone)]
pub(super) struct Done {
    pub port: u16,
    pub nth: usize,
    pub kind: Kind,
}

pub(super) struct Plan {
    pub paced: usize,
    /// Paced connections open at once (their starts are staggered).
    pub concurrent: usize,
    pub interval: Duration,
    pub paced_for: Duration,
    /// (label, bytes, how many).
    pub transfers: Vec<(&'static str, usize, usize)>,
}

impl Plan {
    pub(super) fn new(quick: bool) -> Plan {
        let per = if quick { 2 } else { 5 };
        Plan {
            paced: if quick { 10 } else { 60 },
            concurrent: 5,
            interval: Duration::from_micros(200),
            paced_for: Duration::from_millis(if quick { 300 } else { 1000 }),
            transfers: vec![("100KB", 100_000, per), ("1MB", 1_000_000, per), ("10MB", 10_000_000, per)],
        }
    }
}

/// A sink on the server that reads every connection to its end.
struct Sink {
    stop: Arc<AtomicBool>,
    th: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start(lab: &Lab) -> Result<Sink> {
        let ns = netns::NetnsHandle::open(&lab.wan)?;
        let gen_cpu = lab.isolation.generator_cpu;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<()>>();
        let st = stop.clone();
        let th = std::thread::spawn(move || {
            let l = (|| -> Result<TcpListener> {
                if let Some(c) = gen_cpu {
                    cpu::set_affinity(0, c)?;
                }
                ns.join()?;
                let l = TcpListener::bind(("203.0.113.2", SINK_PORT)).context("binding the latency sink")?;
                l.set_nonblocking(true)?;
                Ok(l)
            })();
            let l = match l {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        std::thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let mut buf = vec![0u8; 1 << 16];
                            while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        ready.recv().map_err(|_| anyhow!("latency sink thread died"))??;
        Ok(Sink { stop, th: Some(th) })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.th.take() {
            let _ = t.join();
        }
    }
}

/// One connection: write `bytes` (a transfer) or a small write every
/// `interval` for `paced_for`, then close and wait for the server's close.
/// Returns the client port.
fn connection(what: Option<usize>, interval: Duration, paced_for: Duration) -> Result<u16> {
    let to = SocketAddr::from(([203, 0, 113, 2], SINK_PORT));
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).context("connecting to the latency sink")?;
    s.set_nodelay(true)?;
    let port = s.local_addr()?.port();
    match what {
        Some(bytes) => {
            let buf = vec![0x5au8; 1 << 16];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len());
                s.write_all(&buf[..n])?;
                left -= n;
            }
        }
        None => {
            let t0 = Instant::now();
            while t0.elapsed() < paced_for {
                s.write_all(&[0x5a; 64])?;
                std::thread::sleep(interval);
            }
        }
    }
    s.shutdown(Shutdown::Write)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let _ = s.read(&mut [0u8; 16]);
    Ok(port)
}

/// Make the plan's connections from the LAN client, on the generator CPU.
pub(super) fn run(lab: &Lab, plan: &Plan) -> Result<Vec<Done>> {
    let _sink = Sink::start(lab)?;
    let ns = netns::NetnsHandle::open(&lab.lan)?;
    let gen_cpu = lab.isolation.generator_cpu;
    let (paced, conc, interval, paced_for) = (plan.paced, plan.concurrent, plan.interval, plan.paced_for);
    let transfers = plan.transfers.clone();
    let th = std::thread::spawn(move || -> Result<Vec<(u16, Kind)>> {
        if let Some(c) = gen_cpu {
            cpu::set_affinity(0, c)?;
        }
        ns.join()?;
        // Staggered, about `conc` open at a time: each handshake reaches the
        // engine alone, so every connection is a sample of its own. Opened
        // together, a group's handshakes were judged in one pass of the
        // engine and measured one delay `conc` times.
        let gap = paced_for / conc.max(1) as u32;
        let mut open = Vec::new();
        for i in 0..paced {
            if i > 0 {
                std::thread::sleep(gap);
            }
            // threads inherit this thread's namespace and affinity
            open.push(std::thread::spawn(move || connection(None, interval, paced_for)));
        }
        let mut made = Vec::new();
        for h in open {
            made.push((h.join().map_err(|_| anyhow!("paced connection panicked"))??, Kind::Paced));
        }
        for (label, bytes, n) in transfers {
            for _ in 0..n {
                made.push((connection(Some(bytes), interval, paced_for)?, Kind::Transfer(label.to_string())));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(made)
    });
    let made = th.join().map_err(|_| anyhow!("latency client thread panicked"))??;
    // nth connection from each port, in the order they were made; paced
    // connections open at once never share a port.
    let mut seen: HashMap<u16, usize> = HashMap::new();
    Ok(made
        .into_iter()
        .map(|(port, kind)| {
            let n = seen.entry(port).or_default();
            *n += 1;
            Done { port, nth: *n - 1, kind }
        })
        .collect())
}
