//! The lab's floor: a bare redirect with a MAC rewrite and no lookup, no
//! NAT, no counters, on the router's LAN port.

use std::mem::MaybeUninit;

use anyhow::{anyhow, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags};

use super::paths::ifindex_in;
use super::skel;
use crate::lab::{netns, Lab};

/// A bare redirect program on the router's LAN port, held by a thread in
/// the router namespace until dropped.
pub(super) struct Floor {
    stop: Option<std::sync::mpsc::Sender<()>>,
    th: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.th.take() {
            let _ = t.join();
        }
    }
}

/// Attach a TCX ingress program; `flags` 0 appends to the chain,
/// `BPF_F_BEFORE` (with no relative program) puts it first.
pub(super) fn attach_tcx(prog: &libbpf_rs::Program<'_>, ifindex: u32, flags: u32) -> Result<Link> {
    use libbpf_rs::AsRawLibbpf;
    let opts = libbpf_sys::bpf_tcx_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_tcx_opts>() as _,
        flags,
        ..Default::default()
    };
    // SAFETY: valid loaded program and options; NULL + errno on failure.
    let raw = unsafe { libbpf_sys::bpf_program__attach_tcx(prog.as_libbpf_object().as_ptr(), ifindex as i32, &opts) };
    let p = std::ptr::NonNull::new(raw)
        .ok_or_else(|| anyhow!("tcx attach on ifindex {ifindex}: {}", std::io::Error::last_os_error()))?;
    // SAFETY: valid link pointer we own.
    Ok(unsafe { Link::from_ptr(p) })
}

pub(super) fn attach_floor(lab: &Lab, xdp: bool, rwan: u32, smac: [u8; 6], dmac: [u8; 6]) -> Result<Floor> {
    let rlan = ifindex_in(lab, &lab.rtr, "rlan")?;
    let ns = netns::NetnsHandle::open(&lab.rtr)?;
    let (stop, wait) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel::<Result<()>>();
    let th = std::thread::spawn(move || {
        let r = (|| -> Result<Vec<Link>> {
            ns.join()?;
            let storage = Box::leak(Box::new(MaybeUninit::uninit()));
            let s = Box::leak(Box::new(skel::BenchSkelBuilder::default().open(storage)?.load()?));
            let cfg = skel::types::bench_cfg { out_ifindex: rwan, nflows: 1, smac, dmac, ..Default::default() };
            super::set_cfg(&s.maps.bench_cfg, &cfg)?;
            s.maps.bench_ports.update(&rwan.to_ne_bytes(), &rwan.to_ne_bytes(), MapFlags::ANY)?;
            let mut links = Vec::new();
            if xdp {
                links.push(s.progs.floor_xdp.attach_xdp(rlan as i32)?);
                // like nft-offload, an XDP program on the egress port too
                links.push(s.progs.floor_xdp.attach_xdp(rwan as i32)?);
            } else {
                links.push(attach_tcx(&s.progs.floor_tc, rlan, 0)?);
            }
            Ok(links)
        })();
        match r {
            Ok(links) => {
                let _ = ready_tx.send(Ok(()));
                let _ = wait.recv();
                drop(links);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    });
    ready.recv().map_err(|_| anyhow!("floor thread died"))??;
    Ok(Floor { stop: Some(stop), th: Some(th) })
}
