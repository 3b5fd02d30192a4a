//! The traffic generator: an XDP program run with BPF_PROG_RUN and
//! BPF_F_TEST_XDP_LIVE_FRAMES on the LAN host's port.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags};

use super::packet_gen::PacketGen;
use super::skel;
use crate::lab::netns;

/// Ethernet + IPv4 without options + UDP: the headers the generator
/// writes into every frame (bench.bpf.c `bench_hdr`).
const HDR_LEN: usize = 14 + 20 + 8;

/// The generator's frame must be the one it can rewrite: IPv4 with no
/// options, UDP.
fn check_frame(f: &[u8]) -> Result<()> {
    if f.len() < HDR_LEN || f[12..14] != [0x08, 0x00] || f[14] != 0x45 || f[23] != 17 {
        anyhow::bail!("the generator's frame must be Ethernet + IPv4 without options + UDP ({} bytes given)", f.len());
    }
    Ok(())
}

/// The kernel refused to run the generator (BPF_PROG_RUN with
/// BPF_F_TEST_XDP_LIVE_FRAMES answered EPERM, as this project's machines
/// began to in December 2026 while plain test runs still work): the
/// generator falls back to `packet_gen`, and only if that fails too do
/// the phases that need offered load stop.
#[derive(Debug)]
pub(super) struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the kernel refused the live-frames generator (BPF_F_TEST_XDP_LIVE_FRAMES: {})", self.0)
    }
}

impl std::error::Error for Refused {}

/// Whether `e` is, or was caused by, the generator's refusal.
pub(super) fn refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Refused>())
}

/// The traffic generator: a thread inside the LAN namespace that owns the
/// loaded generator program and runs it on request.
pub(super) struct Gen {
    tx: std::sync::mpsc::Sender<(u32, u32, u16, u32, u32)>,
    rx: std::sync::mpsc::Receiver<Result<Duration>>,
    /// The kernel refused live frames and `packet_gen` sends instead.
    fallback_used: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Gen {
    /// `cpu`: where the generator thread runs (the generator CPU, away from
    /// the router's threads).
    pub(super) fn start(lan_ns: &str, lan0: u32, frame: Vec<u8>, cpu: Option<usize>) -> Result<Gen> {
        check_frame(&frame)?;
        let (tx, req) = std::sync::mpsc::channel::<(u32, u32, u16, u32, u32)>();
        let (resp, rx) = std::sync::mpsc::channel::<Result<Duration>>();
        let ns = netns::NetnsHandle::open(lan_ns)?;
        let fallback_used = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fell_back = fallback_used.clone();
        std::thread::spawn(move || {
            if let Some(c) = cpu {
                if let Err(e) = crate::lab::cpu::set_affinity(0, c) {
                    let _ = resp.send(Err(anyhow!("pinning the generator to CPU {c}: {e}")));
                    return;
                }
            }
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
            let mut fallback: Option<PacketGen> = None;
            while let Ok((count, nflows, dport, gap_ns, burst)) = req.recv() {
                if let Some(p) = fallback.as_mut() {
                    if resp.send(p.run(count, nflows, dport, gap_ns, burst)).is_err() {
                        break;
                    }
                    continue;
                }
                let r = (|| -> Result<Duration> {
                    let cfg = skel::types::bench_cfg { nflows, base_port: 10000, gap_ns, burst, ..Default::default() };
                    super::set_cfg(&s.maps.bench_cfg, &cfg)?;
                    let mut f = frame.clone();
                    f[36..38].copy_from_slice(&dport.to_be_bytes());
                    // No UDP checksum (legal over IPv4), or the new port would
                    // make it wrong and conntrack would call the packet invalid.
                    f[40..42].copy_from_slice(&[0, 0]);
                    // written into every frame: pages come back rewritten (bench.bpf.c)
                    s.maps.bench_frame.update(&0u32.to_ne_bytes(), &f[..HDR_LEN], MapFlags::ANY)?;
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
                    s.progs.bench_gen.test_run(input).map_err(|e| match e.kind() {
                        libbpf_rs::ErrorKind::PermissionDenied => anyhow!(Refused(e.to_string())),
                        _ => anyhow!(e).context("live-frames generator"),
                    })?;
                    Ok(t0.elapsed())
                })();
                // Refused: the same frames through an AF_PACKET socket from
                // now on (packet_gen), or the refusal if that fails too.
                let r = match r {
                    Err(e) if refused(&e) => match PacketGen::open(lan0, frame.clone()) {
                        Ok(mut p) => {
                            eprintln!("bench: {e:#}; the generator sends through an AF_PACKET socket instead");
                            fell_back.store(true, std::sync::atomic::Ordering::Relaxed);
                            let r = p.run(count, nflows, dport, gap_ns, burst);
                            fallback = Some(p);
                            r
                        }
                        Err(p) => Err(e.context(format!("{p:#}"))),
                    },
                    r => r,
                };
                if resp.send(r).is_err() {
                    break;
                }
            }
        });
        let g = Gen { tx, rx, fallback_used };
        g.rx.recv().map_err(|_| anyhow!("generator thread died"))??;
        Ok(g)
    }

    /// Whether the AF_PACKET fallback has been sending (figures from it
    /// are not comparable with live-frames runs).
    pub(super) fn fell_back(&self) -> bool {
        self.fallback_used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Send `count` frames spread over `nflows` flows as fast as possible;
    /// returns the time taken. Flow i has source port 10000 + i % 50000 and
    /// destination port `dport` + i / 50000 (bench.bpf.c bench_gen).
    pub(super) fn blast(&self, count: u32, nflows: u32) -> Result<Duration> {
        self.blast_to(count, nflows, 9)
    }

    pub(super) fn blast_to(&self, count: u32, nflows: u32, dport: u16) -> Result<Duration> {
        self.paced(count, nflows, dport, 0, 1)
    }

    /// [`Gen::blast_to`] in groups of `burst` frames, `burst * gap_ns`
    /// apart.
    pub(super) fn paced(&self, count: u32, nflows: u32, dport: u16, gap_ns: u32, burst: u32) -> Result<Duration> {
        self.tx.send((count, nflows, dport, gap_ns, burst)).map_err(|_| anyhow!("generator thread gone"))?;
        self.rx.recv().map_err(|_| anyhow!("generator thread gone"))?
    }
}
