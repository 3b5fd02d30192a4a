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
    let mut out = vec![0u8; frame.len() + 256];
    let opts = libbpf_rs::ProgramInput {
        data_in: Some(frame),
        data_out: Some(&mut out),
        context_in: Some(ctx),
        repeat,
        ..Default::default()
    };
    let r = prog.test_run(opts)?;
    let n = r.data.as_ref().map(|d| d.len()).unwrap_or(0);
    let (ret, ns) = (r.return_value, r.duration.as_nanos() as u64);
    out.truncate(n);
    Ok((ret, out, ns))
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
    gso: Option<(u32, u32)>,
    repeat: u32,
) -> Result<(i32, Vec<u8>, u64)> {
    let mut ctx_bytes = vec![0u8; std::mem::size_of::<Sk>()];
    put_u32(&mut ctx_bytes, std::mem::offset_of!(Sk, ifindex), ifindex);
    if let Some((segs, size)) = gso {
        put_u32(&mut ctx_bytes, std::mem::offset_of!(Sk, gso_segs), segs);
        put_u32(&mut ctx_bytes, std::mem::offset_of!(Sk, gso_size), size);
    }
    let (ret, out, ns) = test_run(prog, frame, &mut ctx_bytes, repeat)?;
    Ok((ret as i32, out, ns))
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
        run_skb(&self.skel.progs.fo_tc, frame, ifindex, gso, repeat).context("TC test run")
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
        run_skb(&self.skel.progs.fo_tc_l3, packet, ifindex, gso, repeat).context("TC (L3 device) test run")
    }

    /// Run the TC egress watcher on one frame leaving through `ifindex`.
    /// Returns (verdict, output frame, ns per repetition).
    pub fn test_tc_egress(&self, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(i32, Vec<u8>, u64)> {
        run_skb(&self.skel.progs.fo_tc_egress, frame, ifindex, None, repeat).context("TC egress test run")
    }

    /// The egress watcher of devices without a link-layer header.
    pub fn test_tc_egress_l3(&self, packet: &[u8], ifindex: u32, repeat: u32) -> Result<(i32, Vec<u8>, u64)> {
        run_skb(&self.skel.progs.fo_tc_egress_l3, packet, ifindex, None, repeat).context("TC egress (L3) test run")
    }
}
