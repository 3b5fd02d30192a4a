//! The generator's fallback where the kernel refuses live frames: the same
//! frames, sent from the LAN host's port through an AF_PACKET socket
//! (sendmmsg, qdisc bypassed). The flows are bench_gen's (bench.bpf.c):
//! frame i of a run goes from port 10000 + i % 50000 to `dport` + i /
//! 50000, with no UDP checksum. Pacing waits on the generator's own CPU
//! instead of dropping: groups of `burst` frames `burst * gap_ns` apart,
//! for one slice per call (the callers loop until their time is up).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// bench.bpf.c FLOWS_PER_DPORT.
const FLOWS_PER_DPORT: u32 = 50_000;
/// First source port (bench_cfg.base_port).
const BASE_PORT: u32 = 10_000;
/// Frames per sendmmsg.
const BATCH: usize = 64;
/// How long one paced call sends.
const SLICE: Duration = Duration::from_millis(50);

pub(super) struct PacketGen {
    fd: OwnedFd,
    ifindex: u32,
    frame: Vec<u8>,
    /// Flow of the next frame, across calls (as bench_seq).
    seq: u64,
}

impl PacketGen {
    /// A socket bound to `ifindex` in the calling thread's namespace.
    pub(super) fn open(ifindex: u32, frame: Vec<u8>) -> Result<PacketGen> {
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: raw is a socket we own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: an int option of the right size. Best effort: without it
        // the frames go through lan0's qdisc (noqueue on a veth anyway).
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Ok(PacketGen { fd, ifindex, frame, seq: 0 })
    }

    /// Like a live-frames run: `gap_ns` 0 sends `count` frames back to
    /// back; otherwise groups of `burst` frames, `burst * gap_ns` apart,
    /// for one slice. Returns the time taken.
    pub(super) fn run(&mut self, count: u32, nflows: u32, dport: u16, gap_ns: u32, burst: u32) -> Result<Duration> {
        let t0 = Instant::now();
        let nflows = nflows.max(1);
        if gap_ns == 0 || burst == 0 {
            let mut left = count as usize;
            while left > 0 {
                let n = left.min(BATCH);
                self.send(n, nflows, dport)?;
                left -= n;
            }
            return Ok(t0.elapsed());
        }
        let every = Duration::from_nanos(u64::from(gap_ns) * u64::from(burst));
        let mut due = t0;
        while t0.elapsed() < SLICE {
            let mut left = burst as usize;
            while left > 0 {
                let n = left.min(BATCH);
                self.send(n, nflows, dport)?;
                left -= n;
            }
            due += every;
            // Behind (a slow send, a preemption): start the next group at
            // once rather than bursting to catch up, as bench_gen does.
            let now = Instant::now();
            if due + Duration::from_millis(1) < now {
                due = now;
            }
            while Instant::now() < due {
                std::hint::spin_loop();
            }
        }
        Ok(t0.elapsed())
    }

    /// `n` frames of the next flows in one sendmmsg (all of them: a short
    /// count is sent again from where it stopped).
    fn send(&mut self, n: usize, nflows: u32, dport: u16) -> Result<()> {
        let len = self.frame.len();
        let mut bufs = vec![0u8; n * len];
        let template_sport = self.port_in_frame();
        for (j, b) in bufs.chunks_mut(len).enumerate() {
            b.copy_from_slice(&self.frame);
            let (sport, dport) = ports(self.seq + j as u64, nflows, dport, template_sport);
            b[34..36].copy_from_slice(&sport.to_be_bytes());
            b[36..38].copy_from_slice(&dport.to_be_bytes());
            b[40..42].copy_from_slice(&[0, 0]);
        }
        // SAFETY: zeroed sockaddr_ll is valid; the fields set name the port.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&self.frame[..6]);
        let mut iovs: Vec<libc::iovec> =
            bufs.chunks_mut(len).map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: len }).collect();
        let mut sent = 0;
        while sent < n {
            // SAFETY: zeroed mmsghdr is valid; each points at one iovec and
            // at sll, all alive for the call.
            let mut msgs: Vec<libc::mmsghdr> = iovs[sent..]
                .iter_mut()
                .map(|iov| {
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
                    m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                    m.msg_hdr.msg_iov = iov;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            // SAFETY: msgs holds msgs.len() valid headers.
            let r = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == std::io::ErrorKind::WouldBlock {
                    std::thread::yield_now();
                    continue;
                }
                bail!("AF_PACKET sendmmsg on ifindex {}: {e}", self.ifindex);
            }
            sent += r as usize;
        }
        self.seq += n as u64;
        Ok(())
    }

    fn port_in_frame(&self) -> u16 {
        u16::from_be_bytes([self.frame[34], self.frame[35]])
    }
}

/// Ports of frame `seq` over `nflows` flows, as bench_gen writes them.
fn ports(seq: u64, nflows: u32, dport: u16, template_sport: u16) -> (u16, u16) {
    if nflows <= 1 {
        return (template_sport, dport);
    }
    let i = (seq % u64::from(nflows)) as u32;
    ((BASE_PORT + i % FLOWS_PER_DPORT) as u16, dport.wrapping_add((i / FLOWS_PER_DPORT) as u16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_bench_gen_s() {
        assert_eq!(ports(5, 1, 9, 10_000), (10_000, 9));
        assert_eq!(ports(0, 64, 9, 1), (10_000, 9));
        assert_eq!(ports(65, 64, 9, 1), (10_001, 9), "round robin over the flows");
        // Past 50,000 flows the destination port moves on.
        assert_eq!(ports(50_000, 100_000, 100, 1), (10_000, 101));
        assert_eq!(ports(99_999, 100_000, 100, 1), (59_999, 101));
    }
}
