//! Frames as a device in some namespace receives them: an AF_PACKET socket
//! (ETH_P_ALL) bound to the device, read on a thread of its own until
//! stopped. What the wire carried, independent of the engine.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::lab::netns::spawn_in_netns;

/// A running capture; [`Capture::stop`] returns the frames, in order.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<Vec<u8>>>>,
}

const ETH_P_ALL: u16 = 0x0003;

fn open(dev: &str) -> Result<OwnedFd> {
    // SAFETY: plain socket call; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ETH_P_ALL.to_be())) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no device {dev}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: zeroed sockaddr_ll, then the fields bind needs.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: valid fd and address of the right size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        bail!("binding the capture to {dev}: {}", std::io::Error::last_os_error());
    }
    // A 100 ms receive timeout so the thread sees `stop`.
    let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    // SAFETY: valid fd and option.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    // The tags the kernel takes off, reported beside each frame.
    let _ = set_int(&fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, 1);
    // Room for a whole run: the reader is a debug build under TCG, which a
    // busy machine may leave behind for seconds. Frames are only queued
    // while it is behind; drops are counted (see `stop`). (SO_RCVBUFFORCE:
    // root.)
    let _ = set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 192 << 20);
    Ok(fd)
}

/// An int socket option.
fn set_int(fd: &OwnedFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> std::io::Result<()> {
    // SAFETY: valid fd; the option's value is an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What one read gave.
enum Got {
    /// A frame the device received.
    Frame(Vec<u8>),
    /// One this namespace sent (PACKET_OUTGOING): not part of the capture.
    Sent,
    /// Nothing within the socket's timeout.
    Timeout,
}

/// One received frame (not one this namespace sent), with the VLAN tag
/// the kernel took into the skb's metadata put back where it was on the
/// wire: __netif_receive_skb_core untags (skb_vlan_untag) before packet
/// taps see the frame, and AF_PACKET reports the tag only as
/// PACKET_AUXDATA (as libpcap reinserts it).
fn recv_frame(fd: &OwnedFd) -> Result<Got> {
    let mut buf = vec![0u8; 65536];
    // cmsghdr is read in place: 8-byte aligned storage.
    let mut cbuf = [0u64; 32];
    // SAFETY: zeroed plain C structs filled in below.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: valid fd and message buffers.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted => {
                Ok(Got::Timeout)
            }
            _ => Err(anyhow!("reading the capture: {e}")),
        };
    }
    if from.sll_pkttype == libc::PACKET_OUTGOING {
        return Ok(Got::Sent);
    }
    let n = (n as usize).min(buf.len());
    let mut frame = buf[..n].to_vec();
    // SAFETY: walking the control messages the kernel wrote into cbuf.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                let aux: libc::tpacket_auxdata = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 && frame.len() >= 12 {
                    let tpid =
                        if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 { aux.tp_vlan_tpid } else { 0x8100 };
                    let mut tag = tpid.to_be_bytes().to_vec();
                    tag.extend_from_slice(&aux.tp_vlan_tci.to_be_bytes());
                    frame.splice(12..12, tag);
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Got::Frame(frame))
}

/// Frames the socket dropped since the last call (PACKET_STATISTICS resets
/// its counters when read).
fn packet_drops(fd: &OwnedFd) -> Result<u32> {
    let mut st = libc::tpacket_stats { tp_packets: 0, tp_drops: 0 };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as u32;
    // SAFETY: valid fd and buffer of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut st as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("PACKET_STATISTICS: {}", std::io::Error::last_os_error());
    }
    Ok(st.tp_drops)
}

impl Capture {
    /// Start capturing what `dev` in namespace `ns` receives. Returns once
    /// the socket is bound, so nothing sent afterwards is missed.
    pub fn start(ns: &str, dev: &str) -> Result<Capture> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (dev, stop2) = (dev.to_string(), Arc::clone(&stop));
        let thread = spawn_in_netns(ns, move || {
            let fd = match open(&dev) {
                Ok(fd) => {
                    let _ = ready_tx.send(Ok(()));
                    fd
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            let mut frames = Vec::new();
            let mut stopped_at = None;
            // Read (and reset) the drop counter once now: frames the socket
            // saw before its queue was drained do not count.
            let _ = packet_drops(&fd);
            loop {
                let got = recv_frame(&fd)?;
                let timeout = matches!(got, Got::Timeout);
                if let Got::Frame(f) = got {
                    frames.push(f);
                }
                // Stopped: read on until the queue is empty (a read times
                // out). Frames this namespace sent itself are in the same
                // queue (skipped, not an end). Nothing is sent after the
                // stop, so the queue does empty; if it never does, that is
                // an error, not a shorter capture.
                if stop2.load(Ordering::Relaxed) {
                    let since = *stopped_at.get_or_insert_with(std::time::Instant::now);
                    if timeout {
                        break;
                    }
                    if since.elapsed() > Duration::from_secs(120) {
                        bail!("the capture on {dev} never went quiet after its stop (120 s)");
                    }
                }
            }
            let drops = packet_drops(&fd)?;
            if drops > 0 {
                bail!(
                    "the capture on {dev} dropped {drops} frames (its reader fell behind: the machine is too busy \
                     for this rate)"
                );
            }
            Ok(frames)
        })?;
        ready_rx.recv_timeout(Duration::from_secs(10)).context("capture thread did not start")??;
        Ok(Capture { stop, thread })
    }

    /// Stop after the frames still queued are read; the frames received.
    pub fn stop(self) -> Result<Vec<Vec<u8>>> {
        // Let what is in flight arrive.
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow!("capture thread panicked"))?
    }
}

/// IPv4 header fields of an Ethernet frame (no tags): (protocol, source,
/// destination), if it is one.
pub fn ipv4_of(frame: &[u8]) -> Option<(u8, [u8; 4], [u8; 4])> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    Some((ip[9], ip[12..16].try_into().ok()?, ip[16..20].try_into().ok()?))
}

/// Send `frames` out of `dev` in namespace `ns` as they are (AF_PACKET), at
/// most `pps` a second; returns once all are sent.
pub fn inject(ns: &str, dev: &str, frames: Vec<Vec<u8>>, pps: u32) -> Result<std::thread::JoinHandle<Result<()>>> {
    let dev = dev.to_string();
    spawn_in_netns(ns, move || {
        let fd = open(&dev)?;
        let name = std::ffi::CString::new(dev.as_str())?;
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: zeroed sockaddr_ll, then the fields sendto needs.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        let start = std::time::Instant::now();
        for (i, f) in frames.iter().enumerate() {
            // SAFETY: valid fd, buffer and address.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n < 0 {
                bail!("sending frame {i} ({} bytes) on {dev}: {}", f.len(), std::io::Error::last_os_error());
            }
            if pps > 0 {
                let due = Duration::from_secs_f64((i + 1) as f64 / f64::from(pps));
                if let Some(w) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(w);
                }
            }
        }
        Ok(())
    })
}

/// Send `frame` out of `dev` in namespace `ns` as a CHECKSUM_PARTIAL skb
/// whose L4 checksum, at `csum_offset` past `csum_start`, is left to the
/// device whatever the field holds: the virtio_net_hdr a packet socket
/// takes with PACKET_VNET_HDR (virtio_net_hdr_to_skb,
/// skb_partial_csum_set), as a VM's virtio NIC hands its packets to a tap
/// device. The packet leaves a veth with TX checksum offload still partial.
pub fn inject_partial(ns: &str, dev: &str, frame: Vec<u8>, csum_start: u16, csum_offset: u16) -> Result<()> {
    const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
    let dev = dev.to_string();
    spawn_in_netns(ns, move || {
        let fd = open(&dev)?;
        set_int(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1).context("PACKET_VNET_HDR")?;
        // struct virtio_net_hdr (little-endian on this host: vio_le()):
        // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
        let mut buf = vec![VIRTIO_NET_HDR_F_NEEDS_CSUM, 0];
        for v in [0u16, 0, csum_start, csum_offset] {
            buf.extend(v.to_le_bytes());
        }
        buf.extend(&frame);
        // SAFETY: valid fd and buffer; the socket is bound to the device.
        let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n != buf.len() as isize {
            bail!("sending a partial-checksum frame on {dev}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    })?
    .join()
    .map_err(|_| anyhow!("injector panicked"))?
}

/// Attach a program that passes every frame (XDP_PASS) to `dev` in `ns`,
/// by netlink (it stays until the device goes). A veth takes XDP-redirected
/// frames only when its peer runs NAPI, which an XDP program gives it
/// without the GRO that would merge the frames a capture must see as sent
/// (netif_elide_gro: no GRO while a device has an XDP program).
pub fn xdp_pass(ns: &str, dev: &str) -> Result<()> {
    let dev = dev.to_string();
    spawn_in_netns(ns, move || {
        // r0 = XDP_PASS (2); exit
        let insns = [
            libbpf_sys::bpf_insn {
                code: 0xb7,
                _bitfield_1: libbpf_sys::bpf_insn::new_bitfield_1(0, 0),
                off: 0,
                imm: 2,
                ..Default::default()
            },
            libbpf_sys::bpf_insn { code: 0x95, ..Default::default() },
        ];
        let name = std::ffi::CString::new("nfo_pass")?;
        let lic = std::ffi::CString::new("GPL")?;
        // SAFETY: valid instructions and strings; NULL opts.
        let fd = unsafe {
            libbpf_sys::bpf_prog_load(
                libbpf_sys::BPF_PROG_TYPE_XDP,
                name.as_ptr(),
                lic.as_ptr(),
                insns.as_ptr(),
                insns.len() as _,
                std::ptr::null_mut(),
            )
        };
        if fd < 0 {
            bail!("loading an XDP_PASS program: {}", std::io::Error::from_raw_os_error(-fd));
        }
        // SAFETY: a new fd we own.
        let prog = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(dev.as_str())?;
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        // SAFETY: valid program fd; NULL opts.
        let rc = unsafe {
            libbpf_sys::bpf_xdp_attach(
                ifindex as i32,
                prog.as_raw_fd(),
                libbpf_sys::XDP_FLAGS_DRV_MODE,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            bail!("attaching XDP_PASS to {dev}: {}", std::io::Error::from_raw_os_error(-rc));
        }
        Ok(())
    })?
    .join()
    .map_err(|_| anyhow!("xdp_pass thread panicked"))?
}
