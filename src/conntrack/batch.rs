//! Many ctnetlink requests in one send. `netlink_rcv_skb`
//! (net/netlink/af_netlink.c) handles the messages of a datagram one after
//! the other, and answers each with its own NLMSG_ERROR carrying the
//! request's sequence number (code 0 for NLM_F_ACK, the error otherwise), so
//! a batch is one `sendto` and one reply per request, each attributed to its
//! own request: one failing connection does not fail the others. The pure
//! parts (packing, splitting, attribution) are here; `CtSocket::update_many`
//! does the I/O.

use std::collections::HashMap;
use std::ops::Range;

use super::msg::ParsedMsg;
use super::nla::align4;
use super::CtError;

/// Requests per datagram. The kernel handles a datagram's requests in the
/// sender's `sendto` (netlink_unicast_kernel) and queues every reply on our
/// socket before it returns; a reply that does not fit the receive buffer is
/// dropped (netlink_ack, then ENOBUFS). 64 replies of at most a few hundred
/// bytes of truesize each stay far below the default 208 KiB.
pub const MAX_BATCH_MSGS: usize = 64;
/// Bytes per datagram, well under what netlink_sendmsg accepts (sk_sndbuf).
pub const MAX_BATCH_BYTES: usize = 32 << 10;

/// Split messages of lengths `lens` into consecutive groups of at most
/// `max_msgs` messages and `max_bytes` bytes (aligned); a message longer
/// than `max_bytes` goes alone. Returns index ranges covering every message.
pub fn split(lens: &[usize], max_msgs: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &len) in lens.iter().enumerate() {
        let len = align4(len);
        if i > start && (i - start >= max_msgs || bytes + len > max_bytes) {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

/// One datagram of `msgs`, each padded to NLMSG_ALIGN (netlink_rcv_skb
/// steps by NLMSG_ALIGN(nlmsg_len)).
pub fn pack<'a>(msgs: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut buf = Vec::new();
    for m in msgs {
        buf.extend_from_slice(m);
        buf.resize(align4(buf.len()), 0);
    }
    buf
}

/// The replies to one datagram of requests, by sequence number.
#[derive(Debug)]
pub struct Replies {
    by_seq: HashMap<u32, usize>,
    /// Per request: None (no answer yet), or the errno (0: accepted).
    got: Vec<Option<i32>>,
    left: usize,
}

impl Replies {
    /// Waiting for one reply per sequence number in `seqs` (distinct).
    pub fn new(seqs: &[u32]) -> Self {
        Replies {
            by_seq: seqs.iter().enumerate().map(|(i, &s)| (s, i)).collect(),
            got: vec![None; seqs.len()],
            left: seqs.len(),
        }
    }

    /// A reply with sequence `seq`. Anything but an ACK or an error, a
    /// sequence not ours (a stale reply to an earlier request) or a second
    /// answer to the same request is ignored; returns whether it counted.
    pub fn note(&mut self, seq: u32, msg: &ParsedMsg) -> bool {
        let code = match msg {
            ParsedMsg::Ack => 0,
            ParsedMsg::Error(errno) => *errno,
            _ => return false,
        };
        match self.by_seq.get(&seq).map(|&i| &mut self.got[i]) {
            Some(slot @ None) => {
                *slot = Some(code);
                self.left -= 1;
                true
            }
            _ => false,
        }
    }

    /// Every request has its answer.
    pub fn done(&self) -> bool {
        self.left == 0
    }

    /// The outcome of each request, in order: accepted, `NotFound`
    /// (ENOENT: the entry is gone), the kernel's error, or for a request
    /// never answered what `unanswered` says (the receive failed).
    pub fn finish(self, op: &'static str, unanswered: impl Fn() -> CtError) -> Vec<Result<(), CtError>> {
        self.got
            .into_iter()
            .map(|g| match g {
                Some(0) => Ok(()),
                Some(libc::ENOENT) => Err(CtError::NotFound),
                Some(errno) => Err(CtError::Kernel { errno, op }),
                None => Err(unanswered()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::nla::NlMsgIter;

    #[test]
    fn split_at_count_and_size_limits() {
        // (lengths, max msgs, max bytes) -> groups (start, end)
        type Row = (&'static [usize], usize, usize, &'static [(usize, usize)]);
        let rows: &[Row] = &[
            (&[], 4, 100, &[]),
            (&[10], 4, 100, &[(0, 1)]),
            (&[10, 10, 10, 10, 10], 2, 100, &[(0, 2), (2, 4), (4, 5)]),
            // 10 pads to 12: 12 * 3 = 36 > 30, so two then the rest.
            (&[10, 10, 10, 10], 8, 30, &[(0, 2), (2, 4)]),
            (&[12, 12], 8, 24, &[(0, 2)]),
            // Too long alone: still sent, by itself.
            (&[8, 200, 8], 8, 100, &[(0, 1), (1, 2), (2, 3)]),
            (&[200], 8, 100, &[(0, 1)]),
        ];
        for (lens, n, b, want) in rows {
            let want: Vec<Range<usize>> = want.iter().map(|&(a, z)| a..z).collect();
            assert_eq!(split(lens, *n, *b), want, "{lens:?} max {n} msgs {b} bytes");
        }
    }

    #[test]
    fn pack_aligns_each_message_and_frames_back() {
        let nl = |seq: u32, extra: usize| {
            let mut m = vec![0u8; 16 + extra];
            m[..4].copy_from_slice(&((16 + extra) as u32).to_ne_bytes());
            m[6..8].copy_from_slice(&1u16.to_ne_bytes()); // NLM_F_REQUEST
            m[8..12].copy_from_slice(&seq.to_ne_bytes());
            m
        };
        let msgs = [nl(7, 5), nl(8, 0), nl(9, 3)];
        let buf = pack(msgs.iter().map(Vec::as_slice));
        assert_eq!(buf.len(), 24 + 16 + 20, "each message padded to 4 bytes");
        let seqs: Vec<u32> = NlMsgIter::new(&buf).map(|f| f.unwrap().0.seq).collect();
        assert_eq!(seqs, [7, 8, 9], "the kernel's framing finds every request");
    }

    #[test]
    fn replies_are_attributed_by_sequence() {
        let mut r = Replies::new(&[10, 11, 12, 13]);
        // Out of order, a stale sequence, a duplicate, a non-reply.
        assert!(r.note(12, &ParsedMsg::Error(libc::ENOENT)));
        assert!(!r.note(9, &ParsedMsg::Ack), "an earlier request's late reply");
        assert!(r.note(10, &ParsedMsg::Ack));
        assert!(!r.note(10, &ParsedMsg::Error(libc::EPERM)), "second answer to the same request");
        assert!(!r.note(11, &ParsedMsg::Done), "not an answer");
        assert!(r.note(13, &ParsedMsg::Error(libc::EINVAL)));
        assert!(!r.done(), "11 is still unanswered");
        let out = r.finish("update", || CtError::Malformed("no reply".into()));
        assert!(matches!(out[0], Ok(())));
        assert!(matches!(out[1], Err(CtError::Malformed(_))), "unanswered: the receive's error");
        assert!(matches!(out[2], Err(CtError::NotFound)));
        assert!(matches!(out[3], Err(CtError::Kernel { errno: libc::EINVAL, op: "update" })));

        let mut r = Replies::new(&[u32::MAX, 1]);
        assert!(r.note(1, &ParsedMsg::Ack) && r.note(u32::MAX, &ParsedMsg::Ack));
        assert!(r.done(), "sequence numbers across the wrap");
        assert!(r.finish("update", || unreachable!()).iter().all(Result::is_ok));
    }
}
