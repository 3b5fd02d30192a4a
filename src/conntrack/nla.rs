//! Minimal netlink codec on raw bytes: `nlmsghdr` framing, `nfgenmsg` and
//! `nlattr` TLVs, for both directions.
//!
//! Layouts follow include/uapi/linux/netlink.h and
//! include/uapi/linux/netfilter/nfnetlink.h. Netlink headers and attribute
//! headers are in host byte order; ctnetlink attribute *payloads* are mostly
//! big-endian, which is the business of `msg.rs`.
//!
//! Every read is bounds-checked and reports `CtError::Malformed` instead of
//! panicking: the input comes from a socket.

use super::CtError;

/// `sizeof(struct nlmsghdr)`.
pub const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct nlattr)`.
pub const NLA_HDRLEN: usize = 4;
/// `sizeof(struct nfgenmsg)`.
pub const NFGENMSG_LEN: usize = 4;

/// Attribute carries nested attributes.
pub const NLA_F_NESTED: u16 = 1 << 15;
/// Attribute payload is in network byte order (informational only).
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
/// Mask giving the attribute type without the two flag bits above.
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

pub const NLM_F_REQUEST: u16 = 0x001;
pub const NLM_F_MULTI: u16 = 0x002;
pub const NLM_F_ACK: u16 = 0x004;
/// `NLM_F_ROOT | NLM_F_MATCH`.
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;

pub const NLMSG_NOOP: u16 = 0x1;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLMSG_DONE: u16 = 0x3;
pub const NLMSG_OVERRUN: u16 = 0x4;

/// `NLMSG_ALIGN` / `NLA_ALIGN`: both round up to 4 bytes.
pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn malformed(what: impl Into<String>) -> CtError {
    CtError::Malformed(what.into())
}

/// A decoded `struct nlmsghdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NlHeader {
    pub len: u32,
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
}

impl NlHeader {
    fn decode(b: &[u8]) -> NlHeader {
        // Callers guarantee b.len() >= NLMSG_HDRLEN.
        NlHeader {
            len: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            msg_type: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
            seq: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            pid: u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// Iterates the netlink messages packed in one datagram, yielding each
/// header and its payload (the bytes after the header, up to `nlmsg_len`).
/// After a framing error it yields that error once and then stops, since the
/// position of the next message is unknown.
pub struct NlMsgIter<'a> {
    buf: &'a [u8],
}

impl<'a> NlMsgIter<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        NlMsgIter { buf }
    }
}

impl<'a> Iterator for NlMsgIter<'a> {
    type Item = Result<(NlHeader, &'a [u8]), CtError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let buf = std::mem::take(&mut self.buf);
        if buf.len() < NLMSG_HDRLEN {
            return Some(Err(malformed(format!("{} trailing bytes, shorter than a netlink header", buf.len()))));
        }
        let hdr = NlHeader::decode(buf);
        let len = hdr.len as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Some(Err(malformed(format!("nlmsg_len {len} invalid for {} remaining bytes", buf.len()))));
        }
        let payload = &buf[NLMSG_HDRLEN..len];
        // The last message of a datagram may lack its alignment padding.
        self.buf = &buf[align4(len).min(buf.len())..];
        Some(Ok((hdr, payload)))
    }
}

/// One netlink attribute: its type (flag bits stripped), whether
/// `NLA_F_NESTED` was set, and its payload without padding.
#[derive(Debug, Clone, Copy)]
pub struct Nla<'a> {
    pub kind: u16,
    pub nested_flag: bool,
    pub payload: &'a [u8],
}

impl<'a> Nla<'a> {
    /// The payload interpreted as a nested attribute stream. The kernel does
    /// not always set `NLA_F_NESTED` (older `nla_nest_start` did not), so
    /// the flag is not required.
    pub fn nested(&self) -> NlaIter<'a> {
        NlaIter::new(self.payload)
    }

    fn fixed<const N: usize>(&self) -> Result<[u8; N], CtError> {
        self.payload.try_into().map_err(|_| {
            malformed(format!("attribute type {} has {} bytes, expected {N}", self.kind, self.payload.len()))
        })
    }

    pub fn get_u8(&self) -> Result<u8, CtError> {
        Ok(self.fixed::<1>()?[0])
    }

    pub fn get_be16(&self) -> Result<u16, CtError> {
        Ok(u16::from_be_bytes(self.fixed()?))
    }

    pub fn get_be32(&self) -> Result<u32, CtError> {
        Ok(u32::from_be_bytes(self.fixed()?))
    }

    pub fn get_be64(&self) -> Result<u64, CtError> {
        Ok(u64::from_be_bytes(self.fixed()?))
    }

    pub fn get_array<const N: usize>(&self) -> Result<[u8; N], CtError> {
        self.fixed()
    }
}

/// Iterates a stream of attributes. Like `NlMsgIter`, a framing error is
/// yielded once and ends the iteration.
pub struct NlaIter<'a> {
    buf: &'a [u8],
}

impl<'a> NlaIter<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        NlaIter { buf }
    }
}

impl<'a> Iterator for NlaIter<'a> {
    type Item = Result<Nla<'a>, CtError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let buf = std::mem::take(&mut self.buf);
        if buf.len() < NLA_HDRLEN {
            return Some(Err(malformed(format!("{} trailing bytes, shorter than an attribute header", buf.len()))));
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let raw_type = u16::from_ne_bytes([buf[2], buf[3]]);
        if len < NLA_HDRLEN || len > buf.len() {
            return Some(Err(malformed(format!(
                "nla_len {len} invalid for {} remaining bytes (type {})",
                buf.len(),
                raw_type & NLA_TYPE_MASK
            ))));
        }
        self.buf = &buf[align4(len).min(buf.len())..];
        Some(Ok(Nla {
            kind: raw_type & NLA_TYPE_MASK,
            nested_flag: raw_type & NLA_F_NESTED != 0,
            payload: &buf[NLA_HDRLEN..len],
        }))
    }
}

/// Builds one netlink message: header, optional `nfgenmsg`, attributes.
/// `nlmsg_len` and nest lengths are patched in as the message grows.
#[derive(Debug)]
pub struct NlMsgBuilder {
    buf: Vec<u8>,
}

impl NlMsgBuilder {
    /// Starts a message; `nlmsg_pid` is 0 so the kernel fills in our port.
    pub fn new(msg_type: u16, flags: u16, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        NlMsgBuilder { buf }
    }

    /// Appends `struct nfgenmsg` (version NFNETLINK_V0, `res_id` big-endian).
    pub fn nfgenmsg(&mut self, family: u8, res_id: u16) -> &mut Self {
        self.buf.push(family);
        self.buf.push(0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self
    }

    fn pad(&mut self) {
        let aligned = align4(self.buf.len());
        self.buf.resize(aligned, 0);
    }

    /// Appends an attribute. Panics if `data` cannot fit a u16 `nla_len`;
    /// ctnetlink attributes are a few bytes, so that would be a caller bug.
    pub fn put(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = u16::try_from(NLA_HDRLEN + data.len()).expect("netlink attribute too large");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    pub fn put_u8(&mut self, kind: u16, v: u8) -> &mut Self {
        self.put(kind, &[v])
    }

    pub fn put_be16(&mut self, kind: u16, v: u16) -> &mut Self {
        self.put(kind, &v.to_be_bytes())
    }

    pub fn put_be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_be_bytes())
    }

    /// Opens a nested attribute (type | NLA_F_NESTED); returns the token
    /// that `nest_end` needs to patch the length.
    pub fn nest_start(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub fn nest_end(&mut self, start: usize) -> &mut Self {
        let len = u16::try_from(self.buf.len() - start).expect("nested attribute too large");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// Patches `nlmsg_len` and returns the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.pad();
        let len = u32::try_from(self.buf.len()).expect("netlink message too large");
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_round_trips_through_iterators() {
        let mut b = NlMsgBuilder::new(0x0100, NLM_F_REQUEST | NLM_F_ACK, 42);
        b.nfgenmsg(2, 0);
        let n = b.nest_start(1);
        b.put_u8(7, 0xab);
        b.put_be16(8, 0x1234);
        b.nest_end(n);
        b.put_be32(3, 0xdead_beef);
        let bytes = b.finish();
        assert_eq!(bytes.len() % 4, 0);

        let msgs: Vec<_> = NlMsgIter::new(&bytes).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 1);
        let (hdr, payload) = msgs[0];
        assert_eq!(hdr.len as usize, bytes.len());
        assert_eq!(hdr.msg_type, 0x0100);
        assert_eq!(hdr.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(hdr.seq, 42);
        assert_eq!(payload[..4], [2, 0, 0, 0]);

        let attrs: Vec<_> = NlaIter::new(&payload[NFGENMSG_LEN..]).collect::<Result<_, _>>().unwrap();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0].kind, 1);
        assert!(attrs[0].nested_flag);
        let inner: Vec<_> = attrs[0].nested().collect::<Result<_, _>>().unwrap();
        assert_eq!(inner[0].kind, 7);
        assert_eq!(inner[0].get_u8().unwrap(), 0xab);
        assert_eq!(inner[1].get_be16().unwrap(), 0x1234);
        assert_eq!(attrs[1].get_be32().unwrap(), 0xdead_beef);
        // Width mismatches are errors, not panics.
        assert!(attrs[1].get_be16().is_err());
        assert!(attrs[1].get_be64().is_err());
    }

    #[test]
    fn framing_errors_are_reported() {
        // nlmsg_len larger than the buffer.
        let mut b = NlMsgBuilder::new(3, 0, 1).finish();
        b[0] = 200;
        assert!(matches!(NlMsgIter::new(&b).next(), Some(Err(CtError::Malformed(_)))));
        // nlmsg_len smaller than a header.
        b[0] = 4;
        assert!(matches!(NlMsgIter::new(&b).next(), Some(Err(CtError::Malformed(_)))));
        // Attribute overrunning its container, and a 2-byte tail.
        assert!(matches!(NlaIter::new(&[9, 0, 1, 0, 0]).next(), Some(Err(_))));
        assert!(matches!(NlaIter::new(&[1, 0]).next(), Some(Err(_))));
        // After an error the iterator stops.
        let mut it = NlaIter::new(&[2, 0, 1, 0]);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
    }
}
