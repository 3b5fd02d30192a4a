//! Doing things inside a network namespace from Rust, without spawning tools:
//! a short-lived thread joins the namespace (`setns` only affects the calling
//! thread), so the rest of the process stays where it was.
//!
//! Used for ICMP echo ("ping"): the lab must not depend on iputils being
//! installed, and a raw socket created inside the namespace stays bound to it.

use std::fs::File;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Where `ip netns add` bind-mounts named namespaces.
pub(crate) const NETNS_RUN_DIR: &str = "/var/run/netns";

pub(crate) fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from(NETNS_RUN_DIR).join(ns)
}

pub(crate) fn netns_exists(ns: &str) -> bool {
    netns_path(ns).exists()
}

/// A handle on namespace `ns`, opened now so a missing namespace is an
/// error at the call site; `join` moves the calling thread into it.
pub(crate) struct NetnsHandle {
    file: File,
    name: String,
}

impl NetnsHandle {
    pub(crate) fn open(ns: &str) -> Result<Self> {
        let path = netns_path(ns);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(NetnsHandle { file, name: ns.to_string() })
    }

    pub(crate) fn join(&self) -> Result<()> {
        // SAFETY: plain syscall on a valid fd; only the calling thread moves.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns({}): {} (needs root)", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Start `f` on a fresh thread that has joined network namespace `ns`.
pub(crate) fn spawn_in_netns<T, F>(ns: &str, f: F) -> Result<std::thread::JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let h = NetnsHandle::open(ns)?;
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            h.join()?;
            f()
        })
        .context("spawning netns thread")
}

/// Run `f` on a fresh thread that has joined network namespace `ns`.
pub(crate) fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    spawn_in_netns(ns, f)?.join().map_err(|_| anyhow!("netns thread for {ns} panicked"))?
}

/// Set sysctls (`net.ipv4.ip_forward`, ...) as seen from namespace `ns`:
/// written from a thread that joined it (net sysctls resolve through the
/// writing task's namespace, net/sysctl_net.c `net_ctl_header_lookup`), so
/// no `ip netns exec sysctl` process is spawned (~0.25 s each under TCG).
pub(crate) fn sysctl(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let settings: Vec<(String, String)> = settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    in_netns(ns, move || {
        for (k, v) in &settings {
            let path = format!("/proc/sys/{}", k.replace('.', "/"));
            std::fs::write(&path, v).with_context(|| format!("sysctl {k}={v}"))?;
        }
        Ok(())
    })
}

const PAYLOAD: &[u8; 16] = b"nft-offload-lab!";

fn next_ident() -> u16 {
    // Raw ICMP sockets see every echo reply in the namespace: a per-call
    // identifier keeps concurrent pings (and other labs' tests) apart.
    static SEQ: AtomicU16 = AtomicU16::new(0);
    (std::process::id() as u16).wrapping_mul(31) ^ SEQ.fetch_add(1, Ordering::Relaxed)
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for ch in data.chunks(2) {
        let w = if ch.len() == 2 { u16::from_be_bytes([ch[0], ch[1]]) } else { u16::from_be_bytes([ch[0], 0]) };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo_request(v6: bool, ident: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(PAYLOAD);
    if !v6 {
        // ICMPv6 checksums are filled in by the kernel on raw sockets (it
        // needs the pseudo header); ICMPv4 ones are ours to compute.
        let c = inet_checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

fn raw_socket(v6: bool) -> Result<OwnedFd> {
    let (dom, proto) = if v6 { (libc::AF_INET6, libc::IPPROTO_ICMPV6) } else { (libc::AF_INET, libc::IPPROTO_ICMP) };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(dom, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        bail!("raw ICMP socket: {} (needs root)", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, owned descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_to(fd: &OwnedFd, dst: IpAddr, pkt: &[u8]) -> Result<()> {
    // SAFETY: zeroed sockaddr structs are valid; lengths match the types.
    let rc = unsafe {
        match dst {
            IpAddr::V4(a) => {
                let mut sa: libc::sockaddr_in = mem::zeroed();
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
                libc::sendto(
                    fd.as_raw_fd(),
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&sa as *const libc::sockaddr_in).cast(),
                    mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            IpAddr::V6(a) => {
                let mut sa: libc::sockaddr_in6 = mem::zeroed();
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_addr.s6_addr = a.octets();
                libc::sendto(
                    fd.as_raw_fd(),
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if rc < 0 {
        bail!("sendto {dst}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Wait up to `wait` for the matching echo reply; Ok(false) on timeout.
fn recv_reply(fd: &OwnedFd, dst: IpAddr, ident: u16, seq: u16, wait: Duration) -> Result<bool> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("poll: {e}");
        }
        if n == 0 {
            return Ok(false);
        }
        // SAFETY: sockaddr_storage is large enough for either family.
        let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let mut sl = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let len = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut sl,
            )
        };
        if len < 0 {
            continue;
        }
        let pkt = &buf[..len as usize];
        let (src, icmp): (IpAddr, &[u8]) = match dst {
            IpAddr::V4(_) => {
                // IPv4 raw sockets deliver the IP header too.
                if pkt.is_empty() {
                    continue;
                }
                let ihl = usize::from(pkt[0] & 0x0f) * 4;
                if pkt.len() < ihl + 8 {
                    continue;
                }
                // SAFETY: family is AF_INET for this socket.
                let sa: &libc::sockaddr_in = unsafe { &*(&ss as *const libc::sockaddr_storage).cast() };
                let src = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
                (IpAddr::V4(src), &pkt[ihl..])
            }
            IpAddr::V6(_) => {
                if pkt.len() < 8 {
                    continue;
                }
                // SAFETY: family is AF_INET6 for this socket.
                let sa: &libc::sockaddr_in6 = unsafe { &*(&ss as *const libc::sockaddr_storage).cast() };
                (IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)), pkt)
            }
        };
        let reply_type = if dst.is_ipv6() { 129 } else { 0 };
        if src == dst
            && icmp[0] == reply_type
            && u16::from_be_bytes([icmp[4], icmp[5]]) == ident
            && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
        {
            return Ok(true);
        }
    }
}

/// ICMP echo from inside `ns` to `dst`; returns the round-trip time of the
/// first answered request. Re-sends every second until `timeout`.
pub(crate) fn ping(ns: &str, dst: IpAddr, timeout: Duration) -> Result<Duration> {
    let ns_name = ns.to_string();
    in_netns(ns, move || {
        let fd = raw_socket(dst.is_ipv6())?;
        let ident = next_ident();
        let deadline = Instant::now() + timeout;
        let mut seq: u16 = 0;
        while Instant::now() < deadline {
            seq += 1;
            let start = Instant::now();
            send_to(&fd, dst, &echo_request(dst.is_ipv6(), ident, seq))?;
            let wait = deadline.saturating_duration_since(start).min(Duration::from_secs(1));
            if recv_reply(&fd, dst, ident, seq, wait)? {
                return Ok(start.elapsed());
            }
        }
        bail!("ping {dst} from netns {ns_name}: no reply within {timeout:?}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_echo_request_verifies() {
        let p = echo_request(false, 0x1234, 7);
        // A correct checksum makes the sum over the whole message 0xffff.
        assert_eq!(inet_checksum(&p), 0);
        assert_eq!(p[0], 8);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }
}
