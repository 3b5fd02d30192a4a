//! BPF_PROG_TEST_RUN of the fast path's entry points on one frame, for the
//! tests and the benchmark (and the control plane's own probe).

use anyhow::{Context, Result};

use super::{skel, Dataplane};

type Sk = skel::types::__sk_buff;

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

/// One BPF_PROG_TEST_RUN of `prog` on `frame` with context bytes `ctx`:
/// (return value, output frame, ns per repetition).
pub(super) fn test_run(
    prog: &libbpf_rs::ProgramMut<'_>,
    frame: &[u8],
    ctx: &mut [u8],
    repeat: u32,
) -> Result<(u32, Vec<u8>, u64)> {
    test_run_with(prog, frame, ctx, None, 0, repeat)
}

/// The same, with the context the program left (`ctx_out`, as long as
/// `ctx`) and BPF_F_TEST_* `flags`.
fn test_run_with(
    prog: &libbpf_rs::ProgramMut<'_>,
    frame: &[u8],
    ctx: &mut [u8],
    ctx_out: Option<&mut [u8]>,
    flags: u32,
    repeat: u32,
) -> Result<(u32, Vec<u8>, u64)> {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = libbpf_rs::ProgramInput {
        data_in: Some(frame),
        data_out: Some(&mut out),
        context_in: Some(ctx),
        context_out: ctx_out,
        flags,
        repeat,
        ..Default::default()
    };
    let r = prog.test_run(opts)?;
    let n = r.data.as_ref().map(|d| d.len()).unwrap_or(0);
    let (ret, ns) = (r.return_value, r.duration.as_nanos() as u64);
    out.truncate(n);
    Ok((ret, out, ns))
}

/// uapi bpf.h (6.0): the test run makes its skb CHECKSUM_COMPLETE and
/// fails the run with EBADMSG if the program leaves skb->csum wrong
/// (bpf_prog_test_run_skb, net/bpf/test_run.c).
const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// What a TC test run's skb carries beyond its bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct SkbIn {
    /// (gso_segs, gso_size).
    pub gso: Option<(u32, u32)>,
    /// skb->priority as the program finds it.
    pub priority: u32,
    /// CHECKSUM_COMPLETE, and the run fails unless skb->csum is still the
    /// sum of the packet afterwards.
    pub csum_complete: bool,
}

/// What a TC test run left.
#[derive(Debug, Clone)]
pub struct SkbOut {
    pub ret: i32,
    pub frame: Vec<u8>,
    /// skb->priority afterwards.
    pub priority: u32,
}

/// A TC program on `frame` arriving on (or leaving) `ifindex`. The kernel
/// builds the skb with eth_type_trans on the frame, whatever the program:
/// skb->protocol comes from bytes 12-13, and the skb's VLAN metadata
/// cannot be set (bpf_prog_test_run_skb accepts only a few __sk_buff
/// fields), so tags are tested in-band.
fn run_skb(
    prog: &libbpf_rs::ProgramMut<'_>,
    frame: &[u8],
    ifindex: u32,
    skb: &SkbIn,
    repeat: u32,
) -> Result<(SkbOut, u64)> {
    let mut ctx_bytes = vec![0u8; std::mem::size_of::<Sk>()];
    put_u32(&mut ctx_bytes, std::mem::offset_of!(Sk, ifindex), ifindex);
    put_u32(&mut ctx_bytes, std::mem::offset_of!(Sk, priority), skb.priority);
    if let Some((segs, size)) = skb.gso {
        put_u32(&mut ctx_bytes, std::mem::offset_of!(Sk, gso_segs), segs);
        put_u32(&mut ctx_bytes, std::mem::offset_of!(Sk, gso_size), size);
    }
    let mut ctx_out = vec![0u8; ctx_bytes.len()];
    let flags = if skb.csum_complete { BPF_F_TEST_SKB_CHECKSUM_COMPLETE } else { 0 };
    let (ret, frame, ns) = test_run_with(prog, frame, &mut ctx_bytes, Some(&mut ctx_out), flags, repeat)?;
    let at = std::mem::offset_of!(Sk, priority);
    let priority = u32::from_ne_bytes(ctx_out[at..at + 4].try_into().expect("4 bytes"));
    Ok((SkbOut { ret: ret as i32, frame, priority }, ns))
}

fn tc_tuple((o, ns): (SkbOut, u64)) -> (i32, Vec<u8>, u64) {
    (o.ret, o.frame, ns)
}

impl Dataplane {
    /// Run the XDP entry on one frame (BPF_PROG_TEST_RUN); for tests and the
    /// benchmark. Returns (verdict, output frame).
    pub fn test_xdp(&self, frame: &[u8], ingress_ifindex: u32, repeat: u32) -> Result<(u32, Vec<u8>, u64)> {
        // Built in zeroed bytes: the kernel rejects a context whose unused
        // fields (and padding) are not zero.
        type Md = skel::types::xdp_md;
        let mut ctx_bytes = vec![0u8; std::mem::size_of::<Md>()];
        put_u32(&mut ctx_bytes, std::mem::offset_of!(Md, data_end), frame.len() as u32);
        put_u32(&mut ctx_bytes, std::mem::offset_of!(Md, ingress_ifindex), ingress_ifindex);
        test_run(&self.skel.progs.fo_xdp, frame, &mut ctx_bytes, repeat).context("XDP test run")
    }

    /// Run the TC entry on one frame; `ifindex` is the device the skb
    /// arrives on (its MAC decides pkt_type, as eth_type_trans does).
    pub fn test_tc(
        &self,
        frame: &[u8],
        ifindex: u32,
        gso: Option<(u32, u32)>,
        repeat: u32,
    ) -> Result<(i32, Vec<u8>, u64)> {
        let skb = SkbIn { gso, ..Default::default() };
        run_skb(&self.skel.progs.fo_tc, frame, ifindex, &skb, repeat).map(tc_tuple).context("TC test run")
    }

    /// Run the TC entry (`l3`: of devices without a link-layer header) once
    /// on an skb described by `skb`; what it left.
    pub fn test_tc_skb(&self, frame: &[u8], ifindex: u32, l3: bool, skb: &SkbIn) -> Result<SkbOut> {
        let prog = if l3 { &self.skel.progs.fo_tc_l3 } else { &self.skel.progs.fo_tc };
        run_skb(prog, frame, ifindex, skb, 1).map(|(o, _)| o).context("TC test run")
    }

    /// Run the TC entry of devices without a link-layer header on `packet`
    /// (it starts at the IP header). See `run_skb` for what skb->protocol
    /// is in a test run.
    pub fn test_tc_l3(
        &self,
        packet: &[u8],
        ifindex: u32,
        gso: Option<(u32, u32)>,
        repeat: u32,
    ) -> Result<(i32, Vec<u8>, u64)> {
        let skb = SkbIn { gso, ..Default::default() };
        run_skb(&self.skel.progs.fo_tc_l3, packet, ifindex, &skb, repeat)
            .map(tc_tuple)
            .context("TC (L3 device) test run")
    }

    /// Run the TC egress watcher on one frame leaving through `ifindex`.
    /// Returns (verdict, output frame, ns per repetition).
    pub fn test_tc_egress(&self, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(i32, Vec<u8>, u64)> {
        run_skb(&self.skel.progs.fo_tc_egress, frame, ifindex, &SkbIn::default(), repeat)
            .map(tc_tuple)
            .context("TC egress test run")
    }

    /// The egress watcher of devices without a link-layer header.
    pub fn test_tc_egress_l3(&self, packet: &[u8], ifindex: u32, repeat: u32) -> Result<(i32, Vec<u8>, u64)> {
        run_skb(&self.skel.progs.fo_tc_egress_l3, packet, ifindex, &SkbIn::default(), repeat)
            .map(tc_tuple)
            .context("TC egress (L3) test run")
    }
}
