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
    // Room for bursts: the reader is a debug build under TCG.
    let size: libc::c_int = 16 << 20;
    // SAFETY: valid fd and option (SO_RCVBUFFORCE: root).
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    Ok(fd)
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
            let mut buf = vec![0u8; 65536];
            let mut stopped_at = None;
            loop {
                // SAFETY: valid fd and buffer. PACKET_OUTGOING frames
                // (sent by this namespace) are kept out below.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: as above.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut len,
                    )
                };
                if n > 0 && from.sll_pkttype != libc::PACKET_OUTGOING {
                    frames.push(buf[..n as usize].to_vec());
                }
                // Stopped: drain until the queue is empty (a timeout), or
                // for at most 2 s under continuous traffic.
                if stop2.load(Ordering::Relaxed) {
                    let since = *stopped_at.get_or_insert_with(std::time::Instant::now);
                    if n <= 0 || since.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                }
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
