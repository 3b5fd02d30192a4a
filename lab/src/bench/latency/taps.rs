//! The two TCX taps around the engine's program on the router's ports, and
//! the reader of their ring buffer.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::RingBufferBuilder;

use super::analyze::Event;
use super::traffic::{PORT_HI, PORT_LO};
use crate::bench::floor::attach_tcx;
use crate::bench::paths::ifindex_in;
use crate::bench::skel;
use crate::lab::{cpu, netns, Lab};

/// BPF_F_BEFORE (uapi bpf.h): with no relative program, first in the chain.
const BPF_F_BEFORE: u32 = 1 << 3;

pub(super) struct Taps {
    stop: mpsc::Sender<()>,
    th: std::thread::JoinHandle<Result<(Vec<Event>, u64)>>,
}

impl Taps {
    /// Attach the taps (the engine's program must be attached already, so
    /// that "first" and "last" are around it) and start reading events.
    pub(super) fn start(lab: &Lab) -> Result<Taps> {
        let rlan = ifindex_in(lab, &lab.rtr, "rlan")?;
        let rwan = ifindex_in(lab, &lab.rtr, "rwan")?;
        let ns = netns::NetnsHandle::open(&lab.rtr)?;
        let gen_cpu = lab.isolation.generator_cpu;
        let (stop, wait) = mpsc::channel::<()>();
        let (ready_tx, ready) = mpsc::channel::<Result<()>>();
        let th = std::thread::spawn(move || {
            let r = (|| {
                // The reader is the benchmark's work, not the router's.
                if let Some(c) = gen_cpu {
                    cpu::set_affinity(0, c)?;
                }
                ns.join()?;
                let mut storage = MaybeUninit::uninit();
                let s = skel::BenchSkelBuilder::default().open(&mut storage)?.load()?;
                let cfg = skel::types::bench_cfg {
                    lat_lo: PORT_LO,
                    lat_hi: PORT_HI,
                    lan_ifindex: rlan,
                    ..Default::default()
                };
                crate::bench::set_cfg(&s.maps.bench_cfg, &cfg)?;
                let mut links = Vec::new();
                for ifi in [rlan, rwan] {
                    links.push(attach_tcx(&s.progs.lat_pre, ifi, BPF_F_BEFORE)?);
                    links.push(attach_tcx(&s.progs.lat_post, ifi, 0)?);
                }
                let events = Rc::new(RefCell::new(Vec::new()));
                let lost = Rc::new(RefCell::new(0u64));
                let mut b = RingBufferBuilder::new();
                let (ev, lo) = (events.clone(), lost.clone());
                b.add(&s.maps.lat_events, move |d: &[u8]| {
                    match Event::parse(d) {
                        Some(e) => ev.borrow_mut().push(e),
                        None => *lo.borrow_mut() += 1,
                    }
                    0
                })?;
                let rb = b.build()?;
                let _ = ready_tx.send(Ok(()));
                // Until `stop` is dropped.
                while matches!(wait.try_recv(), Err(mpsc::TryRecvError::Empty)) {
                    rb.poll(Duration::from_millis(20))?;
                }
                drop(links);
                rb.consume()?;
                drop(rb);
                let v = events.borrow().clone();
                let l = *lost.borrow();
                Ok((v, l))
            })();
            if let Err(e) = &r {
                let _ = ready_tx.send(Err(anyhow!("{e:#}")));
            }
            r
        });
        ready.recv().map_err(|_| anyhow!("latency taps thread died"))??;
        Ok(Taps { stop, th })
    }

    /// Detach, read what is left; (events, events that did not parse).
    pub(super) fn stop(self) -> Result<(Vec<Event>, u64)> {
        drop(self.stop);
        self.th.join().map_err(|_| anyhow!("latency taps thread panicked"))?
    }
}
