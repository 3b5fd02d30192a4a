//! The traffic generator: an XDP program run with BPF_PROG_RUN and
//! BPF_F_TEST_XDP_LIVE_FRAMES on the LAN host's port.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};

use super::skel;
use crate::lab::netns;

/// The traffic generator: a thread inside the LAN namespace that owns the
/// loaded generator program and runs it on request.
pub(super) struct Gen {
    tx: std::sync::mpsc::Sender<(u32, u32, u16)>,
    rx: std::sync::mpsc::Receiver<Result<Duration>>,
}

impl Gen {
    pub(super) fn start(lan_ns: &str, lan0: u32, frame: Vec<u8>) -> Result<Gen> {
        let (tx, req) = std::sync::mpsc::channel::<(u32, u32, u16)>();
        let (resp, rx) = std::sync::mpsc::channel::<Result<Duration>>();
        let ns = netns::NetnsHandle::open(lan_ns)?;
        std::thread::spawn(move || {
            if let Err(e) = ns.join() {
                let _ = resp.send(Err(e));
                return;
            }
            let storage = Box::leak(Box::new(MaybeUninit::uninit()));
            let s = match skel::BenchSkelBuilder::default().open(storage).and_then(|o| o.load()) {
                Ok(s) => s,
                Err(e) => {
                    let _ = resp.send(Err(anyhow!("loading the generator: {e}")));
                    return;
                }
            };
            let _ = resp.send(Ok(Duration::ZERO));
            while let Ok((count, nflows, dport)) = req.recv() {
                let r = (|| -> Result<Duration> {
                    let cfg = skel::types::bench_cfg { nflows, base_port: 10000, ..Default::default() };
                    super::set_cfg(&s.maps.bench_cfg, &cfg)?;
                    let mut f = frame.clone();
                    f[36..38].copy_from_slice(&dport.to_be_bytes());
                    // xdp_md: data_end at 4, ingress_ifindex at 12
                    let mut ctx = vec![0u8; 24];
                    ctx[4..8].copy_from_slice(&(f.len() as u32).to_ne_bytes());
                    ctx[12..16].copy_from_slice(&lan0.to_ne_bytes());
                    let t0 = Instant::now();
                    let input = libbpf_rs::ProgramInput {
                        data_in: Some(&f),
                        context_in: Some(&mut ctx),
                        repeat: count,
                        flags: 1 << 1, // BPF_F_TEST_XDP_LIVE_FRAMES
                        ..Default::default()
                    };
                    s.progs.bench_gen.test_run(input).context("live-frames generator")?;
                    Ok(t0.elapsed())
                })();
                if resp.send(r).is_err() {
                    break;
                }
            }
        });
        let g = Gen { tx, rx };
        g.rx.recv().map_err(|_| anyhow!("generator thread died"))??;
        Ok(g)
    }

    /// Send `count` frames spread over `nflows` source ports as fast as
    /// possible; returns the time taken.
    pub(super) fn blast(&self, count: u32, nflows: u32) -> Result<Duration> {
        self.blast_to(count, nflows, 9)
    }

    pub(super) fn blast_to(&self, count: u32, nflows: u32, dport: u16) -> Result<Duration> {
        self.tx.send((count, nflows, dport)).map_err(|_| anyhow!("generator thread gone"))?;
        self.rx.recv().map_err(|_| anyhow!("generator thread gone"))?
    }
}
