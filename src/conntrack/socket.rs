//! NETLINK_NETFILTER sockets speaking ctnetlink: an event listener and a
//! request/response socket for dumps, updates and deletes.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::batch::{pack, split, Replies, MAX_BATCH_BYTES, MAX_BATCH_MSGS};
use super::msg::{
    build_delete, build_dump_request, build_update, decode_msg, CtEntry, CtEvent, CtTuple, CtUpdate, ParsedMsg,
};
use super::nla::{NlHeader, NlMsgIter};

/// Errors of the ctnetlink layer.
#[derive(thiserror::Error, Debug)]
pub enum CtError {
    #[error("ctnetlink socket: {0}")]
    Io(#[from] io::Error),
    /// The kernel dropped events (ENOBUFS): the caller must resync from a
    /// dump.
    #[error("conntrack event queue overrun (ENOBUFS), resync required")]
    Overrun,
    #[error("conntrack entry not found")]
    NotFound,
    #[error("ctnetlink {op} failed: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { errno: i32, op: &'static str },
    #[error("malformed ctnetlink message: {0}")]
    Malformed(String),
}

/// What one drain of the event socket decoded.
#[derive(Debug, Default)]
pub struct CtBatch {
    pub events: Vec<CtEvent>,
    /// The first message that failed to decode, if any: events were lost.
    pub malformed: Option<CtError>,
}

/// Decode one datagram of events into `out`: every message that decodes is
/// kept, also after one that does not; returns the first error. A broken
/// netlink header ends the datagram (nothing after it can be framed).
pub fn decode_events(buf: &[u8], out: &mut Vec<CtEvent>) -> Option<CtError> {
    let mut bad = None;
    for frame in NlMsgIter::new(buf) {
        match frame.and_then(|(hdr, payload)| decode_msg(&hdr, payload)) {
            Ok(Some(ParsedMsg::Event(ev))) => out.push(ev),
            Ok(_) => {}
            Err(e) => {
                bad.get_or_insert(e);
            }
        }
    }
    bad
}

// enum nfnetlink_groups
const NFNLGRP_CONNTRACK_NEW: libc::c_int = 1;
const NFNLGRP_CONNTRACK_UPDATE: libc::c_int = 2;
const NFNLGRP_CONNTRACK_DESTROY: libc::c_int = 3;

/// Receive buffer for the event socket, so bursts of connection churn do not
/// overflow it while the control plane is busy. An event is its own skb of
/// about 1.3 KB truesize (`ctnetlink_conntrack_event` allocates
/// `nlmsg_new(ctnetlink_nlmsg_size())`, ~400 bytes of data): 32 MB hold
/// ~25,000 events, half a second at 50,000 new connections per second,
/// longer than a dump of 250,000 entries takes. Memory is charged only
/// while events wait.
const EVENT_RCVBUF: libc::c_int = 32 << 20;
/// Kernel dump skbs are at most 32 KiB (netlink_recvmsg caps
/// max_recvmsg_len) and events are single small messages.
const RECV_BUF_LEN: usize = 128 << 10;
const REQUEST_TIMEOUT_SECS: libc::time_t = 2;
/// Replies read per recvmmsg, and the room for each: with NETLINK_CAP_ACK an
/// ACK or error is a 36-byte nlmsgerr without the request echoed.
const REPLY_SLOTS: usize = MAX_BATCH_MSGS;
const REPLY_SLOT_LEN: usize = 512;
/// Upper bound of datagrams per `recv_events` call so a flood cannot starve
/// the caller, and a burst's first connections are judged and installed
/// before the rest is read (each event is its own datagram); the fd stays
/// readable and the next poll resumes.
const MAX_DATAGRAMS_PER_DRAIN: usize = 256;
/// Event datagrams read per recvmmsg, each into its own slot of the
/// receive buffer: a conntrack event is one message of a few hundred bytes
/// (ctnetlink_conntrack_event), so one syscall reads up to 32 of them.
const EVENT_SLOTS: usize = 32;
const EVENT_SLOT_LEN: usize = RECV_BUF_LEN / EVENT_SLOTS;
/// What an overrun discards at most (a dump supersedes it): the whole queue,
/// which holds at most EVENT_RCVBUF of ~1.3 KB events; the bound only keeps
/// a socket that never empties from holding the loop forever.
const MAX_DATAGRAMS_DISCARDED: usize = 1 << 20;

/// A received event datagram: its offset in the receive buffer and its
/// length (None: cut to its slot).
type Slot = (usize, Option<usize>);

/// One NETLINK_NETFILTER socket, bound to a kernel-assigned port.
pub struct CtSocket {
    fd: OwnedFd,
    portid: u32,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for CtSocket {
    // Manual so the 128 KiB receive buffer is not printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtSocket")
            .field("fd", &self.fd.as_raw_fd())
            .field("portid", &self.portid)
            .field("seq", &self.seq)
            .finish()
    }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: val points to a live T of the size passed.
    cvt(unsafe { libc::setsockopt(fd, level, name, (val as *const T).cast(), mem::size_of::<T>() as libc::socklen_t) })
        .map(drop)
}

fn kernel_addr() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain data; all-zero is valid (pid 0 = kernel).
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

/// What one slot of a [`recv_many`] received.
struct Received {
    /// The sender's port id (0: the kernel).
    pid: u32,
    len: usize,
    /// The datagram was longer than its slot.
    cut: bool,
}

/// One recvmmsg of up to `buf.len() / slot_len` datagrams, datagram i into
/// `buf[i * slot_len..]`. EINTR is retried; EAGAIN is returned as an error.
fn recv_many(fd: RawFd, buf: &mut [u8], slot_len: usize, flags: libc::c_int) -> io::Result<Vec<Received>> {
    let slots = buf.len() / slot_len;
    // SAFETY: all-zero sockaddr_nl / mmsghdr are valid values; the pointers
    // set below stay valid for the call.
    let mut from: Vec<libc::sockaddr_nl> = vec![unsafe { mem::zeroed() }; slots];
    let mut iov: Vec<libc::iovec> = buf
        .chunks_exact_mut(slot_len)
        .map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = (0..slots)
        .map(|i| {
            let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
            h.msg_hdr.msg_name = (&mut from[i] as *mut libc::sockaddr_nl).cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut iov[i];
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let n = loop {
        // SAFETY: hdrs describes `slots` writable slots of buf and names.
        let n = unsafe { libc::recvmmsg(fd, hdrs.as_mut_ptr(), slots as libc::c_uint, flags, std::ptr::null_mut()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    };
    Ok(hdrs
        .iter()
        .zip(&from)
        .take(n)
        .map(|(h, f)| Received {
            pid: f.nl_pid,
            len: (h.msg_len as usize).min(slot_len),
            cut: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        })
        .collect())
}

impl CtSocket {
    fn open(nonblocking: bool) -> Result<CtSocket, CtError> {
        let mut ty = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
        if nonblocking {
            ty |= libc::SOCK_NONBLOCK;
        }
        // SAFETY: plain syscall; the fd is owned right after the check.
        let raw = cvt(unsafe { libc::socket(libc::AF_NETLINK, ty, libc::NETLINK_NETFILTER) })?;
        // SAFETY: raw is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // nl_pid 0: let the kernel pick a unique port id.
        let addr = kernel_addr();
        let alen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_nl of length alen.
        cvt(unsafe { libc::bind(raw, (&addr as *const libc::sockaddr_nl).cast(), alen) })?;
        let mut bound = kernel_addr();
        let mut blen = alen;
        // SAFETY: bound/blen describe a writable sockaddr_nl.
        cvt(unsafe { libc::getsockname(raw, (&mut bound as *mut libc::sockaddr_nl).cast(), &mut blen) })?;
        Ok(CtSocket { fd, portid: bound.nl_pid, seq: 0, buf: vec![0; RECV_BUF_LEN] })
    }

    /// Event listener: member of the NEW, UPDATE and DESTROY conntrack
    /// groups, 8 MiB receive buffer, non-blocking.
    pub fn events() -> Result<CtSocket, CtError> {
        let sock = Self::open(true)?;
        let fd = sock.fd.as_raw_fd();
        // SO_RCVBUFFORCE ignores net.core.rmem_max but needs CAP_NET_ADMIN.
        if let Err(e) = setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &EVENT_RCVBUF) {
            tracing::debug!("SO_RCVBUFFORCE failed ({e}), falling back to SO_RCVBUF");
            setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &EVENT_RCVBUF)?;
        }
        for group in [NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY] {
            setsockopt(fd, libc::SOL_NETLINK, libc::NETLINK_ADD_MEMBERSHIP, &group)?;
        }
        Ok(sock)
    }

    /// Request socket: blocking, each receive times out after 2 s. Errors
    /// and ACKs come without the request echoed (NETLINK_CAP_ACK), so a
    /// batch's replies are small.
    pub fn request() -> Result<CtSocket, CtError> {
        let sock = Self::open(false)?;
        let fd = sock.fd.as_raw_fd();
        let tv = libc::timeval { tv_sec: REQUEST_TIMEOUT_SECS, tv_usec: 0 };
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        setsockopt(fd, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, &1i32)?;
        Ok(sock)
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Netlink port id the kernel assigned to this socket.
    pub fn portid(&self) -> u32 {
        self.portid
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        if self.seq == 0 {
            self.seq = 1;
        }
        self.seq
    }

    fn send(&self, msg: &[u8]) -> Result<(), CtError> {
        let addr = kernel_addr();
        loop {
            // SAFETY: msg and addr are valid for the lengths passed.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&addr as *const libc::sockaddr_nl).cast(),
                    mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if n as usize != msg.len() {
                return Err(io::Error::other("short netlink send").into());
            }
            return Ok(());
        }
    }

    /// Receives one datagram from the kernel into `self.buf`. `Ok(None)` on
    /// EAGAIN (empty non-blocking queue, or SO_RCVTIMEO expiry). Datagrams
    /// not sent by the kernel (another process can unicast to our port) are
    /// dropped.
    fn recv_datagram(&mut self, dontwait: bool) -> io::Result<Option<usize>> {
        let flags = libc::MSG_TRUNC | if dontwait { libc::MSG_DONTWAIT } else { 0 };
        loop {
            let mut from = kernel_addr();
            let mut flen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: buf and from are writable for the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    flags,
                    (&mut from as *mut libc::sockaddr_nl).cast(),
                    &mut flen,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return Ok(None),
                    _ => return Err(e),
                }
            }
            // With MSG_TRUNC netlink_recvmsg returns the full datagram size.
            let n = n as usize;
            if n > self.buf.len() {
                return Err(io::Error::other(format!(
                    "{n}-byte netlink datagram exceeds the {}-byte buffer",
                    self.buf.len()
                )));
            }
            if from.nl_pid != 0 {
                tracing::warn!(pid = from.nl_pid, "ignoring netlink datagram not sent by the kernel");
                continue;
            }
            return Ok(Some(n));
        }
    }

    /// Reads every queued event datagram (up to a bound). ENOBUFS (the
    /// kernel dropped events) discards what is still queued, since the dump
    /// the caller must now take supersedes it, and returns
    /// `CtError::Overrun`. A message that fails to decode does not cost the
    /// events around it: they are all returned, and `malformed` tells the
    /// caller that something was lost, so it must resync from a dump.
    pub fn recv_events(&mut self) -> Result<CtBatch, CtError> {
        let mut batch = CtBatch::default();
        let mut left = MAX_DATAGRAMS_PER_DRAIN;
        while left > 0 {
            let want = left.min(EVENT_SLOTS);
            let (received, got) = match self.recv_event_datagrams(want) {
                Ok(r) => r,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.discard_queue();
                    return Err(CtError::Overrun);
                }
                Err(e) => return Err(e.into()),
            };
            for &(at, len) in &got {
                let Some(len) = len else {
                    // Cut to its slot: an event lost, as after an overrun.
                    let e = CtError::Malformed(format!("event datagram over {EVENT_SLOT_LEN} bytes"));
                    tracing::warn!("undecodable conntrack event: {e}");
                    batch.malformed.get_or_insert(e);
                    continue;
                };
                if let Some(e) = decode_events(&self.buf[at..at + len], &mut batch.events) {
                    tracing::warn!("undecodable conntrack event: {e}");
                    batch.malformed.get_or_insert(e);
                }
            }
            if received < want {
                break;
            }
            left -= received;
        }
        Ok(batch)
    }

    /// Up to `want` queued event datagrams with one recvmmsg, into slots of
    /// `self.buf` (events are one small message each): each one's (offset,
    /// length), length None if it was cut to its slot, after how many were
    /// received. Datagrams not sent by the kernel are left out. None
    /// received when nothing is queued.
    fn recv_event_datagrams(&mut self, want: usize) -> io::Result<(usize, Vec<Slot>)> {
        let want = want.min(EVENT_SLOTS);
        let got = match recv_many(
            self.fd.as_raw_fd(),
            &mut self.buf[..want * EVENT_SLOT_LEN],
            EVENT_SLOT_LEN,
            libc::MSG_DONTWAIT,
        ) {
            Ok(got) => got,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok((0, Vec::new())),
            Err(e) => return Err(e),
        };
        let mut out = Vec::with_capacity(got.len());
        for (i, r) in got.iter().enumerate() {
            if r.pid != 0 {
                tracing::warn!(pid = r.pid, "ignoring netlink datagram not sent by the kernel");
                continue;
            }
            out.push((i * EVENT_SLOT_LEN, (!r.cut).then_some(r.len)));
        }
        Ok((got.len(), out))
    }

    /// Empty the queue before the caller's dump. After an overrun the kernel
    /// marks the socket congested and then refuses every event, without
    /// another ENOBUFS, until a read finds the queue empty
    /// (net/netlink/af_netlink.c: netlink_overrun sets sk_err only when it
    /// sets NETLINK_S_CONGESTED, netlink_broadcast_deliver refuses while it
    /// is set, netlink_rcv_wake clears it on an empty queue). Stopping
    /// early (this stopped at 4,096) left it congested through the dump:
    /// connections created while the dump ran were in neither, and 8,448 of
    /// 100,000 in the live bench were never offloaded.
    fn discard_queue(&mut self) {
        for _ in 0..MAX_DATAGRAMS_DISCARDED {
            match self.recv_datagram(true) {
                Ok(Some(_)) => {}
                // A second ENOBUFS just means more was lost; keep going.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                _ => return,
            }
        }
    }

    /// Receives the next datagram of a request, mapping a receive timeout
    /// to `TimedOut`.
    fn recv_reply(&mut self, op: &'static str) -> Result<usize, CtError> {
        match self.recv_datagram(false)? {
            Some(n) => Ok(n),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no ctnetlink reply to {op} within {REQUEST_TIMEOUT_SECS} s"),
            )
            .into()),
        }
    }

    /// Whether `hdr` answers the request with sequence `seq`; stale replies
    /// to an earlier request that timed out are skipped this way.
    fn is_reply(&self, hdr: &NlHeader, seq: u32) -> bool {
        hdr.seq == seq && (hdr.pid == self.portid || hdr.pid == 0)
    }

    /// The whole conntrack table of the socket's netns, IPv4 and IPv6,
    /// reading the multi-part reply until NLMSG_DONE.
    pub fn dump(&mut self) -> Result<Vec<CtEntry>, CtError> {
        const OP: &str = "dump";
        let seq = self.next_seq();
        self.send(&build_dump_request(seq, libc::AF_UNSPEC as u8))?;
        let mut entries = Vec::new();
        // A bad message is remembered but reading goes on to NLMSG_DONE so
        // the kernel's dump state for this socket is finished; otherwise the
        // next dump request would fail with EBUSY (netlink_dump_start()).
        let mut bad: Option<CtError> = None;
        loop {
            let n = match self.recv_reply(OP) {
                Ok(n) => n,
                // NLMSG_DONE may have been inside the undecodable datagram.
                Err(e) => return Err(bad.unwrap_or(e)),
            };
            for frame in NlMsgIter::new(&self.buf[..n]) {
                let (hdr, payload) = match frame {
                    Ok(f) => f,
                    Err(e) => {
                        bad.get_or_insert(e);
                        break;
                    }
                };
                if !self.is_reply(&hdr, seq) {
                    continue;
                }
                match decode_msg(&hdr, payload) {
                    Ok(Some(ParsedMsg::Event(ev))) => entries.push(ev.into_entry()),
                    Ok(Some(ParsedMsg::Done)) => {
                        return match bad {
                            Some(e) => Err(e),
                            None => Ok(entries),
                        };
                    }
                    Ok(Some(ParsedMsg::Error(errno))) => {
                        return Err(CtError::Kernel { errno, op: OP });
                    }
                    Ok(Some(ParsedMsg::Ack)) | Ok(None) => {}
                    Err(e) => {
                        bad.get_or_insert(e);
                    }
                }
            }
        }
    }

    /// Sends a request built for `seq` and waits for its ACK.
    fn transact(&mut self, op: &'static str, build: impl FnOnce(u32) -> Vec<u8>) -> Result<(), CtError> {
        let seq = self.next_seq();
        self.send(&build(seq))?;
        loop {
            let n = self.recv_reply(op)?;
            for frame in NlMsgIter::new(&self.buf[..n]) {
                let (hdr, payload) = frame?;
                if !self.is_reply(&hdr, seq) {
                    continue;
                }
                match decode_msg(&hdr, payload)? {
                    Some(ParsedMsg::Ack) => return Ok(()),
                    Some(ParsedMsg::Error(libc::ENOENT)) => return Err(CtError::NotFound),
                    Some(ParsedMsg::Error(errno)) => return Err(CtError::Kernel { errno, op }),
                    _ => {}
                }
            }
        }
    }

    /// Changes an existing entry, identified by its original tuple and zone.
    /// `NotFound` if it does not exist (it is never created).
    pub fn update(&mut self, orig: &CtTuple, zone: u16, upd: &CtUpdate) -> Result<(), CtError> {
        self.transact("update", |seq| build_update(seq, orig, zone, upd))
    }

    /// Changes many existing entries, `MAX_BATCH_MSGS` requests per send,
    /// and returns each one's outcome in order (as `update` would, one by
    /// one): each reply is matched to its request by sequence number.
    pub fn update_many(&mut self, reqs: &[(CtTuple, u16, CtUpdate)]) -> Vec<Result<(), CtError>> {
        let msgs: Vec<(u32, Vec<u8>)> = reqs
            .iter()
            .map(|(t, zone, upd)| {
                let seq = self.next_seq();
                (seq, build_update(seq, t, *zone, upd))
            })
            .collect();
        let lens: Vec<usize> = msgs.iter().map(|m| m.1.len()).collect();
        let mut out = Vec::with_capacity(msgs.len());
        for r in split(&lens, MAX_BATCH_MSGS, MAX_BATCH_BYTES) {
            out.extend(self.transact_batch("update", &msgs[r]));
        }
        out
    }

    /// One datagram of requests, then their replies until each has one.
    fn transact_batch(&mut self, op: &'static str, msgs: &[(u32, Vec<u8>)]) -> Vec<Result<(), CtError>> {
        let seqs: Vec<u32> = msgs.iter().map(|m| m.0).collect();
        let mut replies = Replies::new(&seqs);
        let failed = |e: &io::Error| {
            let (kind, text) = (e.kind(), e.to_string());
            move || CtError::Io(io::Error::new(kind, text.clone()))
        };
        if let Err(e) = self.send(&pack(msgs.iter().map(|m| m.1.as_slice()))) {
            let e = match e {
                CtError::Io(e) => e,
                other => io::Error::other(other.to_string()),
            };
            return replies.finish(op, failed(&e));
        }
        while !replies.done() {
            if let Err(e) = self.recv_replies(&mut replies) {
                return replies.finish(op, failed(&e));
            }
        }
        replies.finish(op, || unreachable!("every request was answered"))
    }

    /// Reads the replies queued on the socket (blocking for the first, up
    /// to SO_RCVTIMEO) in one recvmmsg, into `replies`.
    fn recv_replies(&mut self, replies: &mut Replies) -> io::Result<()> {
        let mut buf = vec![0u8; REPLY_SLOTS * REPLY_SLOT_LEN];
        let got = match recv_many(self.fd.as_raw_fd(), &mut buf, REPLY_SLOT_LEN, libc::MSG_WAITFORONE) {
            Ok(got) => got,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no ctnetlink reply within {REQUEST_TIMEOUT_SECS} s"),
                ))
            }
            Err(e) => return Err(e),
        };
        for (i, r) in got.iter().enumerate() {
            // Not from the kernel, or cut short (no reply of ours is).
            if r.pid != 0 || r.cut {
                continue;
            }
            let at = i * REPLY_SLOT_LEN;
            for (hdr, payload) in NlMsgIter::new(&buf[at..at + r.len]).flatten() {
                if !self.is_reply(&hdr, hdr.seq) {
                    continue;
                }
                if let Ok(Some(msg)) = decode_msg(&hdr, payload) {
                    replies.note(hdr.seq, &msg);
                }
            }
        }
        Ok(())
    }

    /// Deletes an entry; the kernel then emits a Destroy event.
    pub fn delete(&mut self, orig: &CtTuple, zone: u16) -> Result<(), CtError> {
        self.transact("delete", |seq| build_delete(seq, orig, zone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::msg::{status, tcp_state, IP_CT_TCP_FLAG_BE_LIBERAL};
    use std::net::IpAddr;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// Moves the calling thread (and so the commands it spawns) into a new,
    /// empty network namespace with its own conntrack table. libtest runs
    /// each test on its own thread, so nothing else is affected.
    fn enter_fresh_netns() {
        // SAFETY: trivial syscalls.
        if unsafe { libc::geteuid() } != 0 {
            panic!(
                "this test needs root (CAP_SYS_ADMIN for unshare(CLONE_NEWNET) and \
                 CAP_NET_ADMIN for ctnetlink); run `cargo test` as root"
            );
        }
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
    }

    fn conntrack(args: &[&str]) {
        let out = Command::new("conntrack")
            .args(args)
            .output()
            .expect("running `conntrack` (conntrack-tools) failed; is it installed?");
        assert!(out.status.success(), "conntrack {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Receives events until `want` has matched one each, or panics after 5 s.
    fn wait_for_events(sock: &mut CtSocket, want: &[&dyn Fn(&CtEvent) -> bool]) -> Vec<CtEvent> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut found: Vec<Option<CtEvent>> = vec![None; want.len()];
        let mut seen = Vec::new();
        while found.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for events; got {seen:#?}");
            let mut pfd = libc::pollfd { fd: sock.fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
            assert!(rc >= 0, "poll: {}", io::Error::last_os_error());
            for ev in sock.recv_events().expect("recv_events").events {
                for (slot, pred) in found.iter_mut().zip(want) {
                    if slot.is_none() && pred(&ev) {
                        *slot = Some(ev.clone());
                        break;
                    }
                }
                seen.push(ev);
            }
        }
        found.into_iter().map(Option::unwrap).collect()
    }

    /// Sends an update whose CTA_PROTOINFO_TCP flags clear BE_LIBERAL
    /// (flags 0, mask BE_LIBERAL), which `CtUpdate` cannot express.
    fn clear_liberal(req: &mut CtSocket, t: &CtTuple) {
        fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
            let mut v = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
            v.extend_from_slice(&kind.to_ne_bytes());
            v.extend_from_slice(payload);
            v.resize(v.len().next_multiple_of(4), 0);
            v
        }
        let flags = [nla(4, &[0, 8]), nla(5, &[0, 8])].concat(); // FLAGS_ORIGINAL/REPLY
        let protoinfo = nla(4 | 0x8000, &nla(1 | 0x8000, &flags)); // CTA_PROTOINFO{TCP{..}}
        req.transact("clear liberal", |seq| {
            let mut m = build_update(seq, t, 0, &CtUpdate::default());
            m.extend_from_slice(&protoinfo);
            let len = m.len() as u32;
            m[..4].copy_from_slice(&len.to_ne_bytes());
            m
        })
        .unwrap();
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn tuple(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> CtTuple {
        CtTuple { src: ip(src), dst: ip(dst), proto, sport, dport }
    }

    fn find<'a>(entries: &'a [CtEntry], orig: &CtTuple) -> &'a CtEntry {
        entries.iter().find(|e| e.orig == *orig).unwrap_or_else(|| panic!("{orig:?} not in dump {entries:#?}"))
    }

    #[test]
    fn ctnetlink_against_kernel_in_fresh_netns() {
        enter_fresh_netns();
        let mut events = CtSocket::events().expect("events socket");
        let mut req = CtSocket::request().expect("request socket");
        assert!(events.recv_events().unwrap().events.is_empty(), "fresh netns has no events");
        assert!(req.dump().unwrap().is_empty(), "fresh netns has an empty table");

        // Accounting on, so dumps carry (zero) counters. /proc/sys/net
        // follows the opening thread's netns, i.e. this new one.
        std::fs::write("/proc/sys/net/netfilter/nf_conntrack_acct", "1").unwrap();

        let udp = tuple("10.99.0.1", "10.99.0.2", 17, 40000, 5353);
        let tcp = tuple("10.99.0.1", "10.99.0.2", 6, 40001, 80);
        #[rustfmt::skip]
        conntrack(&["-I", "-p", "udp", "-s", "10.99.0.1", "-d", "10.99.0.2",
            "--sport", "40000", "--dport", "5353", "-t", "30"]);
        #[rustfmt::skip]
        conntrack(&["-I", "-p", "tcp", "-s", "10.99.0.1", "-d", "10.99.0.2",
            "--sport", "40001", "--dport", "80", "--state", "ESTABLISHED",
            "-u", "ASSURED", "-t", "50"]);

        let new = wait_for_events(
            &mut events,
            &[
                &|e: &CtEvent| matches!(e, CtEvent::New(x) if x.orig == udp),
                &|e: &CtEvent| matches!(e, CtEvent::New(x) if x.orig == tcp),
            ],
        );
        let (udp_ev, tcp_ev) = (new[0].entry(), new[1].entry());
        assert_eq!(udp_ev.reply, tuple("10.99.0.2", "10.99.0.1", 17, 5353, 40000));
        assert!(matches!(udp_ev.timeout, Some(28..=30)), "{udp_ev:?}");
        assert_eq!(tcp_ev.tcp_state, Some(tcp_state::ESTABLISHED));
        assert_ne!(udp_ev.id, tcp_ev.id);

        let dump = req.dump().unwrap();
        assert_eq!(dump.len(), 2, "{dump:#?}");
        let u = find(&dump, &udp);
        assert_eq!(u.id, udp_ev.id);
        assert_eq!(u.reply, udp_ev.reply);
        assert_eq!(u.status & status::CONFIRMED, status::CONFIRMED);
        assert_eq!(u.status & status::SEEN_REPLY, 0);
        assert!(matches!(u.timeout, Some(27..=30)), "{u:?}");
        assert_eq!((u.mark, u.zone, u.tcp_state, u.tcp_flags), (0, 0, None, None));
        assert!(!u.has_helper);
        assert_eq!(u.counters_orig, Some((0, 0)));
        assert_eq!(u.counters_reply, Some((0, 0)));
        let t = find(&dump, &tcp);
        assert_eq!(t.id, tcp_ev.id);
        assert_eq!(t.reply, tuple("10.99.0.2", "10.99.0.1", 6, 80, 40001));
        assert_eq!(t.status & (status::ASSURED | status::CONFIRMED), status::ASSURED | status::CONFIRMED);
        assert!(matches!(t.timeout, Some(47..=50)), "{t:?}");
        assert_eq!(t.tcp_state, Some(tcp_state::ESTABLISHED));
        assert!(t.tcp_flags.is_some(), "TCP entry has protoinfo flags: {t:?}");

        // Timeout.
        let upd = CtUpdate { timeout: Some(777), ..CtUpdate::default() };
        req.update(&udp, 0, &upd).unwrap();
        let dump = req.dump().unwrap();
        assert!(matches!(find(&dump, &udp).timeout, Some(770..=777)), "{dump:#?}");
        assert!(matches!(find(&dump, &tcp).timeout, Some(40..=50)));

        // Status bits set as conntrack sets them on a reply and the packet
        // after it (what keepalive does for a UDP stream it forwards).
        let before = find(&dump, &udp).status;
        let assure = CtUpdate { status: Some(before | status::SEEN_REPLY | status::ASSURED), ..CtUpdate::default() };
        req.update(&udp, 0, &assure).unwrap();
        let after = find(&req.dump().unwrap(), &udp).status;
        assert_eq!(after, before | status::SEEN_REPLY | status::ASSURED, "{before:#x} -> {after:#x}");

        // Liberal window tracking on both directions, state untouched.
        // conntrack-tools creates TCP entries already liberal, so clear the
        // bit first to make the update observable.
        clear_liberal(&mut req, &tcp);
        let flags = find(&req.dump().unwrap(), &tcp).tcp_flags.unwrap();
        assert_eq!(flags[0] & IP_CT_TCP_FLAG_BE_LIBERAL, 0, "{flags:?}");
        assert_eq!(flags[1] & IP_CT_TCP_FLAG_BE_LIBERAL, 0, "{flags:?}");
        let liberal = CtUpdate { tcp_liberal: true, ..CtUpdate::default() };
        req.update(&tcp, 0, &liberal).unwrap();
        let t = find(&req.dump().unwrap(), &tcp).clone();
        let flags = t.tcp_flags.unwrap();
        assert_eq!(flags[0] & IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL);
        assert_eq!(flags[1] & IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL);
        assert_eq!(t.tcp_state, Some(tcp_state::ESTABLISHED));

        // Mark, also visible in the Update event it triggers.
        let mark = CtUpdate { mark: Some(0x42), ..CtUpdate::default() };
        req.update(&tcp, 0, &mark).unwrap();
        assert_eq!(find(&req.dump().unwrap(), &tcp).mark, 0x42);
        let upd_ev = wait_for_events(
            &mut events,
            &[&|e: &CtEvent| matches!(e, CtEvent::Update(x) if x.orig == tcp && x.mark == 0x42)],
        );
        assert_eq!(upd_ev[0].entry().id, tcp_ev.id);

        // Delete -> Destroy event with the same identity.
        req.delete(&udp, 0).unwrap();
        let gone = wait_for_events(&mut events, &[&|e: &CtEvent| matches!(e, CtEvent::Destroy(x) if x.orig == udp)]);
        assert_eq!(gone[0].entry().id, udp_ev.id);
        let dump = req.dump().unwrap();
        assert_eq!(dump.len(), 1);
        assert_eq!(dump[0].orig, tcp);

        // Missing entries.
        assert!(matches!(req.update(&udp, 0, &upd), Err(CtError::NotFound)));
        assert!(matches!(req.delete(&udp, 0), Err(CtError::NotFound)));
        // Same tuple in another zone is a different entry.
        assert!(matches!(req.update(&tcp, 7, &upd), Err(CtError::NotFound)));

        // IPv6.
        let udp6 = tuple("2001:db8::1", "2001:db8::2", 17, 1000, 2000);
        #[rustfmt::skip]
        conntrack(&["-I", "-p", "udp", "-s", "2001:db8::1", "-d", "2001:db8::2",
            "--sport", "1000", "--dport", "2000", "-t", "40"]);
        let new6 = wait_for_events(&mut events, &[&|e: &CtEvent| matches!(e, CtEvent::New(x) if x.orig == udp6)]);
        let dump = req.dump().unwrap();
        assert_eq!(dump.len(), 2);
        let e6 = find(&dump, &udp6);
        assert_eq!(e6.id, new6[0].entry().id);
        assert_eq!(e6.reply, tuple("2001:db8::2", "2001:db8::1", 17, 2000, 1000));
        assert!(matches!(e6.timeout, Some(37..=40)));
        req.update(&udp6, 0, &upd).unwrap();
        assert!(matches!(find(&req.dump().unwrap(), &udp6).timeout, Some(770..=777)));

        // ICMP: parsed with ports 0.
        #[rustfmt::skip]
        conntrack(&["-I", "-p", "icmp", "-s", "10.99.0.1", "-d", "10.99.0.2",
            "--icmp-type", "8", "--icmp-code", "0", "--icmp-id", "77", "-t", "20"]);
        let dump = req.dump().unwrap();
        let icmp = dump.iter().find(|e| e.orig.proto == 1).expect("ICMP entry in dump");
        assert_eq!(icmp.orig, tuple("10.99.0.1", "10.99.0.2", 1, 0, 0));
        assert_eq!(icmp.reply, tuple("10.99.0.2", "10.99.0.1", 1, 0, 0));
    }

    /// More requests than one datagram carries, one of them for an entry
    /// that does not exist: each gets its own answer, in order.
    #[test]
    fn update_many_answers_each_request() {
        enter_fresh_netns();
        let mut req = CtSocket::request().expect("request socket");
        let n = MAX_BATCH_MSGS as u16 + 6;
        for p in 0..n {
            #[rustfmt::skip]
            conntrack(&["-I", "-p", "udp", "-s", "10.97.0.1", "-d", "10.97.0.2",
                "--sport", &(30000 + p).to_string(), "--dport", "53", "-t", "30"]);
        }
        let missing = MAX_BATCH_MSGS as u16 - 1;
        let upd = CtUpdate { timeout: Some(600), ..CtUpdate::default() };
        let reqs: Vec<_> = (0..=n)
            .map(|p| {
                let sport = if p == missing { 29999 } else { 30000 + p };
                (tuple("10.97.0.1", "10.97.0.2", 17, sport, 53), 0, upd.clone())
            })
            .collect();
        let out = req.update_many(&reqs);
        assert_eq!(out.len(), reqs.len());
        for (p, r) in out.iter().enumerate() {
            let p = p as u16;
            if p == missing || p == n {
                assert!(matches!(r, Err(CtError::NotFound)), "request {p}: {r:?}");
            } else {
                assert!(r.is_ok(), "request {p}: {r:?}");
            }
        }
        let dump = req.dump().unwrap();
        let refreshed = dump.iter().filter(|e| matches!(e.timeout, Some(590..=600))).count();
        assert_eq!(refreshed, usize::from(n) - 1, "every existing entry but the one not asked for");
        // The socket still answers one-by-one requests in step.
        req.update(&reqs[0].0, 0, &upd).unwrap();
    }

    #[test]
    fn labels_update_in_fresh_netns() {
        enter_fresh_netns();
        // Conntrack only gives entries a label extension once labels are in
        // use in the netns; an nft rule using `ct label` does that.
        for args in [
            &["add", "table", "inet", "t"][..],
            &["add", "chain", "inet", "t", "c", "{ type filter hook prerouting priority 0; }"],
            &["add", "rule", "inet", "t", "c", "ct", "label", "set", "3"],
        ] {
            let out = Command::new("nft").args(args).output().expect("run nft");
            assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut req = CtSocket::request().unwrap();
        let t = tuple("10.98.0.1", "10.98.0.2", 6, 1234, 443);
        #[rustfmt::skip]
        conntrack(&["-I", "-p", "tcp", "-s", "10.98.0.1", "-d", "10.98.0.2",
            "--sport", "1234", "--dport", "443", "--state", "ESTABLISHED", "-t", "60"]);
        assert_eq!(find(&req.dump().unwrap(), &t).labels, None);

        let mut value = [0u8; 16];
        value[0] = 0b0000_0101; // bits 0 and 2
        let mut mask = [0u8; 16];
        mask[0] = 0b0000_0111;
        let upd = CtUpdate { labels: Some((value, mask)), ..CtUpdate::default() };
        req.update(&t, 0, &upd).unwrap();
        assert_eq!(find(&req.dump().unwrap(), &t).labels, Some(value));

        // Clearing bit 2 only.
        let upd = CtUpdate {
            labels: Some(([0; 16], {
                let mut m = [0u8; 16];
                m[0] = 0b100;
                m
            })),
            ..CtUpdate::default()
        };
        req.update(&t, 0, &upd).unwrap();
        let mut want = [0u8; 16];
        want[0] = 1;
        assert_eq!(find(&req.dump().unwrap(), &t).labels, Some(want));
    }

    /// Events queued past one recvmmsg (EVENT_SLOTS) are all returned by
    /// one drain, each once, in the order they happened.
    #[test]
    fn one_drain_reads_events_past_one_recvmmsg() {
        enter_fresh_netns();
        let mut events = CtSocket::events().expect("events socket");
        let n = EVENT_SLOTS as u16 + 9;
        for i in 0..n {
            let sport = (41000 + i).to_string();
            conntrack(&[
                "-I",
                "-p",
                "udp",
                "-s",
                "10.98.0.1",
                "-d",
                "10.98.0.2",
                "--sport",
                &sport,
                "--dport",
                "53",
                "-t",
                "30",
            ]);
        }
        let batch = events.recv_events().expect("recv_events");
        assert!(batch.malformed.is_none(), "{:?}", batch.malformed);
        let ports: Vec<u16> = batch
            .events
            .iter()
            .map(|e| match e {
                CtEvent::New(x) => x.orig.sport,
                other => panic!("only NEW events expected, got {other:?}"),
            })
            .collect();
        assert_eq!(ports, (41000..41000 + n).collect::<Vec<_>>());
        assert!(events.recv_events().unwrap().events.is_empty(), "nothing read twice");
    }
}
