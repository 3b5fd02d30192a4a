//! ctnetlink message model: conntrack entries and events, the decoder for
//! kernel messages and the builders for our requests.
//!
//! Attribute numbers come from include/uapi/linux/netfilter/
//! nfnetlink_conntrack.h; the layout the kernel emits is that of
//! `ctnetlink_fill_info()` and `ctnetlink_conntrack_event()` in
//! net/netfilter/nf_conntrack_netlink.c.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::nla::{
    NlHeader, NlMsgBuilder, NlMsgIter, Nla, NlaIter, NFGENMSG_LEN, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use super::CtError;
use crate::proto::{
    AF_INET, AF_INET6, IPPROTO_DCCP, IPPROTO_GRE, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE,
};

/// nfnetlink subsystem id of ctnetlink (high byte of `nlmsg_type`).
pub const NFNL_SUBSYS_CTNETLINK: u16 = 1;
pub const IPCTNL_MSG_CT_NEW: u16 = 0;
pub const IPCTNL_MSG_CT_GET: u16 = 1;
pub const IPCTNL_MSG_CT_DELETE: u16 = 2;

/// `nfnl_msg_type(NFNL_SUBSYS_CTNETLINK, op)`.
pub const fn ct_msg_type(op: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | op
}

// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_HELP: u16 = 5;
const CTA_TIMEOUT: u16 = 7;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_MARK_MASK: u16 = 21;
const CTA_LABELS: u16 = 22;
const CTA_LABELS_MASK: u16 = 23;
// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto (the ICMP ones are deliberately not decoded)
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
// enum ctattr_protoinfo / ctattr_protoinfo_tcp
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: u16 = 4;
const CTA_PROTOINFO_TCP_FLAGS_REPLY: u16 = 5;
// enum ctattr_counters
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_COUNTERS32_PACKETS: u16 = 3;
const CTA_COUNTERS32_BYTES: u16 = 4;

/// Size of the conntrack label bitmap (NF_CT_LABELS_MAX_SIZE, 128 bits).
pub const CT_LABELS_LEN: usize = 16;

/// `enum ip_conntrack_status` bits (include/uapi/linux/netfilter/
/// nf_conntrack_common.h).
pub mod status {
    pub const EXPECTED: u32 = 1 << 0;
    pub const SEEN_REPLY: u32 = 1 << 1;
    pub const ASSURED: u32 = 1 << 2;
    pub const CONFIRMED: u32 = 1 << 3;
    pub const SRC_NAT: u32 = 1 << 4;
    pub const DST_NAT: u32 = 1 << 5;
    pub const NAT_MASK: u32 = SRC_NAT | DST_NAT;
    pub const SEQ_ADJUST: u32 = 1 << 6;
    pub const SRC_NAT_DONE: u32 = 1 << 7;
    pub const DST_NAT_DONE: u32 = 1 << 8;
    pub const NAT_DONE_MASK: u32 = SRC_NAT_DONE | DST_NAT_DONE;
    pub const DYING: u32 = 1 << 9;
    pub const FIXED_TIMEOUT: u32 = 1 << 10;
    pub const TEMPLATE: u32 = 1 << 11;
    pub const UNTRACKED: u32 = 1 << 12;
    /// The kernel reuses the obsolete UNTRACKED bit to flag entries whose
    /// NAT clashed with another and were merged (IPS_NAT_CLASH in
    /// include/linux/netfilter/nf_conntrack_common.h); such entries must not
    /// be offloaded.
    pub const NAT_CLASH: u32 = UNTRACKED;
    pub const HELPER: u32 = 1 << 13;
    pub const OFFLOAD: u32 = 1 << 14;
    pub const HW_OFFLOAD: u32 = 1 << 15;
    /// Bits userspace may not change (IPS_UNCHANGEABLE_MASK).
    pub const UNCHANGEABLE_MASK: u32 = NAT_DONE_MASK
        | NAT_MASK
        | EXPECTED
        | CONFIRMED
        | DYING
        | SEQ_ADJUST
        | TEMPLATE
        | UNTRACKED
        | OFFLOAD
        | HW_OFFLOAD;
}

/// `enum tcp_conntrack` (include/uapi/linux/netfilter/nf_conntrack_tcp.h).
pub mod tcp_state {
    pub const NONE: u8 = 0;
    pub const SYN_SENT: u8 = 1;
    pub const SYN_RECV: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    pub const FIN_WAIT: u8 = 4;
    pub const CLOSE_WAIT: u8 = 5;
    pub const LAST_ACK: u8 = 6;
    pub const TIME_WAIT: u8 = 7;
    pub const CLOSE: u8 = 8;
    /// Formerly LISTEN.
    pub const SYN_SENT2: u8 = 9;
}

/// Per-direction TCP tracking flags (`struct ip_ct_tcp_state.flags`).
pub const IP_CT_TCP_FLAG_WINDOW_SCALE: u8 = 0x01;
pub const IP_CT_TCP_FLAG_SACK_PERM: u8 = 0x02;
pub const IP_CT_TCP_FLAG_CLOSE_INIT: u8 = 0x04;
/// Skip window checks for this direction; needed once packets bypass
/// conntrack in the fast path and its window tracking falls behind.
pub const IP_CT_TCP_FLAG_BE_LIBERAL: u8 = 0x08;
pub const IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED: u8 = 0x10;
pub const IP_CT_TCP_FLAG_MAXACK_SET: u8 = 0x20;

/// One direction of a connection. For protocols without ports (ICMP, GRE
/// keys aside) `sport` and `dport` are 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CtTuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl CtTuple {
    /// `AF_INET` or `AF_INET6`, from the source address.
    pub fn family(&self) -> u8 {
        match self.src {
            IpAddr::V4(_) => AF_INET,
            IpAddr::V6(_) => AF_INET6,
        }
    }
}

/// Whether the kernel's l4 tracker keys tuples on CTA_PROTO_SRC/DST_PORT,
/// i.e. uses `nf_ct_port_nlattr_to_tuple()` (TCP, UDP, DCCP, GRE, SCTP,
/// UDP-Lite) and so requires both ports in a request tuple.
fn proto_has_ports(proto: u8) -> bool {
    matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_DCCP | IPPROTO_GRE | IPPROTO_SCTP | IPPROTO_UDPLITE)
}

/// A conntrack entry as reported by a dump or an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEntry {
    /// CTA_ID; 0 if absent (the kernel always sends it).
    pub id: u32,
    pub orig: CtTuple,
    pub reply: CtTuple,
    /// CTA_STATUS, `status::*` bits.
    pub status: u32,
    /// Seconds left. Absent for offloaded entries (ctnetlink_dump_info skips
    /// it when IPS_OFFLOAD is set) and in most destroy events.
    pub timeout: Option<u32>,
    pub mark: u32,
    pub zone: u16,
    /// `tcp_state::*`. Dumps always carry it for TCP (unless offloaded);
    /// Update events only when the protocol info changed
    /// (ctnetlink_conntrack_event() checks IPCT_PROTOINFO), so `None` in an
    /// event means "unchanged", not "no state".
    pub tcp_state: Option<u8>,
    /// `[original, reply]` `.flags` of `struct nf_ct_tcp_flags`; same
    /// presence rules as `tcp_state`.
    pub tcp_flags: Option<[u8; 2]>,
    pub has_helper: bool,
    pub labels: Option<[u8; CT_LABELS_LEN]>,
    /// (packets, bytes); present only with net.netfilter.nf_conntrack_acct.
    pub counters_orig: Option<(u64, u64)>,
    pub counters_reply: Option<(u64, u64)>,
}

/// A ctnetlink event (multicast) or, for `Update`, also a dump entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtEvent {
    New(CtEntry),
    Update(CtEntry),
    Destroy(CtEntry),
}

impl CtEvent {
    pub fn entry(&self) -> &CtEntry {
        match self {
            CtEvent::New(e) | CtEvent::Update(e) | CtEvent::Destroy(e) => e,
        }
    }

    pub fn into_entry(self) -> CtEntry {
        match self {
            CtEvent::New(e) | CtEvent::Update(e) | CtEvent::Destroy(e) => e,
        }
    }
}

/// One decoded netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedMsg {
    /// IPCTNL_MSG_CT_NEW (New with NLM_F_CREATE, else Update; dump entries
    /// arrive as Update) or IPCTNL_MSG_CT_DELETE (Destroy).
    Event(CtEvent),
    /// NLMSG_DONE, end of a dump.
    Done,
    /// NLMSG_ERROR with a non-zero code, as a positive errno; also a dump
    /// aborted with a negative NLMSG_DONE status.
    Error(i32),
    /// NLMSG_ERROR with code 0.
    Ack,
}

/// Changes applied to an existing entry by `build_update`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtUpdate {
    /// New timeout in seconds (CTA_TIMEOUT).
    pub timeout: Option<u32>,
    /// Set IP_CT_TCP_FLAG_BE_LIBERAL in both directions. Only emitted for
    /// TCP tuples: other trackers ignore CTA_PROTOINFO_TCP anyway.
    pub tcp_liberal: bool,
    /// New mark (CTA_MARK, replaces the whole mark).
    pub mark: Option<u32>,
    /// (value, mask) for CTA_LABELS / CTA_LABELS_MASK: bits in mask are set
    /// to value. nf_connlabels_replace() computes (old & !mask) ^ value, so
    /// value must be a subset of mask. The kernel answers ENOSPC if the
    /// entry has no label extension (labels unused in the netns when it was
    /// created).
    pub labels: Option<([u8; CT_LABELS_LEN], [u8; CT_LABELS_LEN])>,
    /// CTA_STATUS: the entry's status with bits to set. ctnetlink_change_status()
    /// refuses (EBUSY) a value that differs from the entry's in EXPECTED,
    /// CONFIRMED or DYING, or clears SEEN_REPLY or ASSURED; of the rest it
    /// sets the bits given, clears none and ignores IPS_UNCHANGEABLE_MASK.
    pub status: Option<u32>,
}

/// Every ctnetlink attribute we understand, all optional: the decoded form
/// of both kernel messages and our own requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtAttrs {
    pub orig: Option<CtTuple>,
    pub reply: Option<CtTuple>,
    pub id: Option<u32>,
    pub status: Option<u32>,
    pub timeout: Option<u32>,
    pub mark: Option<u32>,
    pub mark_mask: Option<u32>,
    pub zone: Option<u16>,
    pub tcp_state: Option<u8>,
    /// (flags, mask) of struct nf_ct_tcp_flags, original direction.
    pub tcp_flags_orig: Option<(u8, u8)>,
    pub tcp_flags_reply: Option<(u8, u8)>,
    pub has_helper: bool,
    pub labels: Option<[u8; CT_LABELS_LEN]>,
    pub labels_mask: Option<[u8; CT_LABELS_LEN]>,
    pub counters_orig: Option<(u64, u64)>,
    pub counters_reply: Option<(u64, u64)>,
}

/// A single ctnetlink message decoded without interpretation; used to check
/// what the builders produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCtMsg {
    pub header: NlHeader,
    /// `nfgenmsg.nfgen_family`.
    pub family: u8,
    pub attrs: CtAttrs,
}

fn malformed(what: impl Into<String>) -> CtError {
    CtError::Malformed(what.into())
}

fn parse_tuple(nla: &Nla<'_>) -> Result<CtTuple, CtError> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut sport, mut dport) = (0u16, 0u16);
    for a in nla.nested() {
        let a = a?;
        match a.kind {
            CTA_TUPLE_IP => {
                for ip in a.nested() {
                    let ip = ip?;
                    match ip.kind {
                        CTA_IP_V4_SRC => src = Some(IpAddr::V4(Ipv4Addr::from(ip.get_array()?))),
                        CTA_IP_V4_DST => dst = Some(IpAddr::V4(Ipv4Addr::from(ip.get_array()?))),
                        CTA_IP_V6_SRC => src = Some(IpAddr::V6(Ipv6Addr::from(ip.get_array()?))),
                        CTA_IP_V6_DST => dst = Some(IpAddr::V6(Ipv6Addr::from(ip.get_array()?))),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for p in a.nested() {
                    let p = p?;
                    match p.kind {
                        CTA_PROTO_NUM => proto = Some(p.get_u8()?),
                        CTA_PROTO_SRC_PORT => sport = p.get_be16()?,
                        CTA_PROTO_DST_PORT => dport = p.get_be16()?,
                        // CTA_PROTO_ICMP{,V6}_{ID,TYPE,CODE} and anything
                        // newer: not part of our tuple model.
                        _ => {}
                    }
                }
            }
            // CTA_TUPLE_ZONE (direction-specific zone) and unknown.
            _ => {}
        }
    }
    let (src, dst) = match (src, dst) {
        (Some(s), Some(d)) if s.is_ipv4() == d.is_ipv4() => (s, d),
        (Some(_), Some(_)) => return Err(malformed("tuple mixes IPv4 and IPv6 addresses")),
        _ => return Err(malformed("tuple without source and destination address")),
    };
    let proto = proto.ok_or_else(|| malformed("tuple without CTA_PROTO_NUM"))?;
    Ok(CtTuple { src, dst, proto, sport, dport })
}

fn parse_counters(nla: &Nla<'_>) -> Result<(u64, u64), CtError> {
    let (mut packets, mut bytes) = (0u64, 0u64);
    for c in nla.nested() {
        let c = c?;
        match c.kind {
            CTA_COUNTERS_PACKETS => packets = c.get_be64()?,
            CTA_COUNTERS_BYTES => bytes = c.get_be64()?,
            CTA_COUNTERS32_PACKETS => packets = c.get_be32()?.into(),
            CTA_COUNTERS32_BYTES => bytes = c.get_be32()?.into(),
            // CTA_COUNTERS_PAD (64-bit alignment filler) and unknown.
            _ => {}
        }
    }
    Ok((packets, bytes))
}

fn tcp_flags_attr(nla: &Nla<'_>) -> Result<(u8, u8), CtError> {
    // struct nf_ct_tcp_flags { __u8 flags; __u8 mask; }; the kernel policy
    // only bounds the length from below, so accept a longer payload.
    match nla.payload {
        [flags, mask, ..] => Ok((*flags, *mask)),
        _ => Err(malformed("CTA_PROTOINFO_TCP_FLAGS shorter than 2 bytes")),
    }
}

fn parse_protoinfo(nla: &Nla<'_>, out: &mut CtAttrs) -> Result<(), CtError> {
    for p in nla.nested() {
        let p = p?;
        if p.kind != CTA_PROTOINFO_TCP {
            continue; // DCCP / SCTP state: not used
        }
        for t in p.nested() {
            let t = t?;
            match t.kind {
                CTA_PROTOINFO_TCP_STATE => out.tcp_state = Some(t.get_u8()?),
                CTA_PROTOINFO_TCP_FLAGS_ORIGINAL => out.tcp_flags_orig = Some(tcp_flags_attr(&t)?),
                CTA_PROTOINFO_TCP_FLAGS_REPLY => out.tcp_flags_reply = Some(tcp_flags_attr(&t)?),
                _ => {}
            }
        }
    }
    Ok(())
}

fn labels_attr(nla: &Nla<'_>) -> Result<[u8; CT_LABELS_LEN], CtError> {
    if nla.payload.len() > CT_LABELS_LEN {
        return Err(malformed(format!("CTA_LABELS of {} bytes exceeds {CT_LABELS_LEN}", nla.payload.len())));
    }
    let mut out = [0u8; CT_LABELS_LEN];
    out[..nla.payload.len()].copy_from_slice(nla.payload);
    Ok(out)
}

/// Decodes the top-level ctnetlink attributes following the `nfgenmsg`.
/// Unknown attributes are skipped; a known attribute with the wrong size or
/// a broken TLV structure is `Malformed`.
pub fn parse_ct_attrs(buf: &[u8]) -> Result<CtAttrs, CtError> {
    let mut out = CtAttrs::default();
    for a in NlaIter::new(buf) {
        let a = a?;
        match a.kind {
            CTA_TUPLE_ORIG => out.orig = Some(parse_tuple(&a)?),
            CTA_TUPLE_REPLY => out.reply = Some(parse_tuple(&a)?),
            CTA_STATUS => out.status = Some(a.get_be32()?),
            CTA_PROTOINFO => parse_protoinfo(&a, &mut out)?,
            CTA_HELP => out.has_helper = true,
            CTA_TIMEOUT => out.timeout = Some(a.get_be32()?),
            CTA_MARK => out.mark = Some(a.get_be32()?),
            CTA_MARK_MASK => out.mark_mask = Some(a.get_be32()?),
            CTA_COUNTERS_ORIG => out.counters_orig = Some(parse_counters(&a)?),
            CTA_COUNTERS_REPLY => out.counters_reply = Some(parse_counters(&a)?),
            CTA_ID => out.id = Some(a.get_be32()?),
            CTA_ZONE => out.zone = Some(a.get_be16()?),
            CTA_LABELS => out.labels = Some(labels_attr(&a)?),
            CTA_LABELS_MASK => out.labels_mask = Some(labels_attr(&a)?),
            _ => {}
        }
    }
    Ok(out)
}

impl CtAttrs {
    /// Turns kernel-reported attributes into an entry; both tuples are
    /// mandatory (ctnetlink_fill_info always emits them).
    pub fn into_entry(self) -> Result<CtEntry, CtError> {
        let orig = self.orig.ok_or_else(|| malformed("conntrack message without CTA_TUPLE_ORIG"))?;
        let reply = self.reply.ok_or_else(|| malformed("conntrack message without CTA_TUPLE_REPLY"))?;
        let tcp_flags = match (self.tcp_flags_orig, self.tcp_flags_reply) {
            (None, None) => None,
            (o, r) => Some([o.map_or(0, |f| f.0), r.map_or(0, |f| f.0)]),
        };
        Ok(CtEntry {
            id: self.id.unwrap_or(0),
            orig,
            reply,
            status: self.status.unwrap_or(0),
            timeout: self.timeout,
            mark: self.mark.unwrap_or(0),
            zone: self.zone.unwrap_or(0),
            tcp_state: self.tcp_state,
            tcp_flags,
            has_helper: self.has_helper,
            labels: self.labels,
            counters_orig: self.counters_orig,
            counters_reply: self.counters_reply,
        })
    }
}

fn split_nfgenmsg(payload: &[u8]) -> Result<(u8, &[u8]), CtError> {
    if payload.len() < NFGENMSG_LEN {
        return Err(malformed("nfnetlink message shorter than nfgenmsg"));
    }
    Ok((payload[0], &payload[NFGENMSG_LEN..]))
}

fn read_i32(payload: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

/// Decodes one framed message. `Ok(None)` for messages that are neither
/// ctnetlink entries nor control messages we act on (NLMSG_NOOP, other
/// nfnetlink subsystems or ctnetlink operations).
pub fn decode_msg(hdr: &NlHeader, payload: &[u8]) -> Result<Option<ParsedMsg>, CtError> {
    match hdr.msg_type {
        NLMSG_ERROR => {
            // struct nlmsgerr { int error; struct nlmsghdr msg; ... }: only
            // the code matters; the echoed request and extended-ACK TLVs
            // that may follow are ignored.
            let code = read_i32(payload).ok_or_else(|| malformed("NLMSG_ERROR without code"))?;
            Ok(Some(if code == 0 { ParsedMsg::Ack } else { ParsedMsg::Error(code.saturating_neg()) }))
        }
        // netlink_dump_done() puts the dump's final status in NLMSG_DONE;
        // a negative one means the dump failed part-way.
        NLMSG_DONE => Ok(Some(match read_i32(payload) {
            Some(code) if code < 0 => ParsedMsg::Error(code.saturating_neg()),
            _ => ParsedMsg::Done,
        })),
        t if t >> 8 == NFNL_SUBSYS_CTNETLINK => {
            let op = t & 0xff;
            if op != IPCTNL_MSG_CT_NEW && op != IPCTNL_MSG_CT_DELETE {
                return Ok(None);
            }
            let (_family, attrs) = split_nfgenmsg(payload)?;
            let entry = parse_ct_attrs(attrs)?.into_entry()?;
            // ctnetlink_conntrack_event(): IPCT_NEW is sent as CT_NEW with
            // NLM_F_CREATE|NLM_F_EXCL, other changes as plain CT_NEW,
            // IPCT_DESTROY as CT_DELETE.
            let ev = if op == IPCTNL_MSG_CT_DELETE {
                CtEvent::Destroy(entry)
            } else if hdr.flags & NLM_F_CREATE != 0 {
                CtEvent::New(entry)
            } else {
                CtEvent::Update(entry)
            };
            Ok(Some(ParsedMsg::Event(ev)))
        }
        _ => Ok(None),
    }
}

/// Like `parse_message`, keeping each message's header (for sequence
/// matching).
pub fn parse_message_with_header(buf: &[u8]) -> Result<Vec<(NlHeader, ParsedMsg)>, CtError> {
    let mut out = Vec::new();
    for frame in NlMsgIter::new(buf) {
        let (hdr, payload) = frame?;
        if let Some(m) = decode_msg(&hdr, payload)? {
            out.push((hdr, m));
        }
    }
    Ok(out)
}

/// Splits a datagram holding one or more netlink messages and decodes each.
/// Messages we do not act on are left out; any structural error makes the
/// whole datagram `Malformed`.
pub fn parse_message(buf: &[u8]) -> Result<Vec<ParsedMsg>, CtError> {
    Ok(parse_message_with_header(buf)?.into_iter().map(|(_, m)| m).collect())
}

/// Decodes a single ctnetlink message of any operation without requiring a
/// complete entry (e.g. our own requests).
pub fn parse_request(buf: &[u8]) -> Result<RawCtMsg, CtError> {
    let mut frames = NlMsgIter::new(buf);
    let (header, payload) = frames.next().ok_or_else(|| malformed("empty buffer"))??;
    if frames.next().is_some() {
        return Err(malformed("more than one message"));
    }
    if header.msg_type >> 8 != NFNL_SUBSYS_CTNETLINK {
        return Err(malformed(format!("message type {:#x} is not ctnetlink", header.msg_type)));
    }
    let (family, attrs) = split_nfgenmsg(payload)?;
    Ok(RawCtMsg { header, family, attrs: parse_ct_attrs(attrs)? })
}

fn put_addr(b: &mut NlMsgBuilder, v4: u16, v6: u16, addr: &IpAddr) {
    // nla_put_in_addr / nla_put_in6_addr: network byte order, i.e. octets.
    match addr {
        IpAddr::V4(a) => b.put(v4, &a.octets()),
        IpAddr::V6(a) => b.put(v6, &a.octets()),
    };
}

/// Encodes a tuple as ctnetlink_parse_tuple() expects it: CTA_TUPLE_IP with
/// both addresses and CTA_TUPLE_PROTO with the protocol and, for port-based
/// trackers, both ports. Tuples mixing address families are encoded as given
/// and rejected by the kernel (EINVAL).
fn put_tuple(b: &mut NlMsgBuilder, kind: u16, t: &CtTuple) {
    let tuple = b.nest_start(kind);
    let ip = b.nest_start(CTA_TUPLE_IP);
    put_addr(b, CTA_IP_V4_SRC, CTA_IP_V6_SRC, &t.src);
    put_addr(b, CTA_IP_V4_DST, CTA_IP_V6_DST, &t.dst);
    b.nest_end(ip);
    let proto = b.nest_start(CTA_TUPLE_PROTO);
    b.put_u8(CTA_PROTO_NUM, t.proto);
    if proto_has_ports(t.proto) {
        b.put_be16(CTA_PROTO_SRC_PORT, t.sport);
        b.put_be16(CTA_PROTO_DST_PORT, t.dport);
    }
    b.nest_end(proto);
    b.nest_end(tuple);
}

/// The zone is its own top-level attribute: ctnetlink_parse_zone() reads
/// CTA_ZONE for lookups, zone 0 being the default when it is absent.
fn put_zone(b: &mut NlMsgBuilder, zone: u16) {
    if zone != 0 {
        b.put_be16(CTA_ZONE, zone);
    }
}

/// IPCTNL_MSG_CT_GET dump of the whole table. `family` AF_UNSPEC (0) dumps
/// every family; otherwise ctnetlink_filter_match() keeps only that one.
pub fn build_dump_request(seq: u32, family: u8) -> Vec<u8> {
    let mut b = NlMsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_GET), NLM_F_REQUEST | NLM_F_DUMP, seq);
    b.nfgenmsg(family, 0);
    b.finish()
}

/// IPCTNL_MSG_CT_NEW without NLM_F_CREATE: ctnetlink_new_conntrack() then
/// only changes an existing entry (ctnetlink_change_conntrack()) and answers
/// ENOENT instead of creating one. NLM_F_ACK asks for an explicit ACK.
pub fn build_update(seq: u32, orig: &CtTuple, zone: u16, upd: &CtUpdate) -> Vec<u8> {
    let mut b = NlMsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_NEW), NLM_F_REQUEST | NLM_F_ACK, seq);
    b.nfgenmsg(orig.family(), 0);
    put_tuple(&mut b, CTA_TUPLE_ORIG, orig);
    put_zone(&mut b, zone);
    if let Some(t) = upd.timeout {
        b.put_be32(CTA_TIMEOUT, t);
    }
    if let Some(st) = upd.status {
        b.put_be32(CTA_STATUS, st);
    }
    if upd.tcp_liberal && orig.proto == IPPROTO_TCP {
        // nlattr_to_tcp() (nf_conntrack_proto_tcp.c) does
        // seen[dir].flags = (flags & ~mask) | (value & mask), so flags=mask=
        // BE_LIBERAL sets that bit alone. CTA_PROTOINFO_TCP_STATE is left
        // out so the state is unchanged.
        let liberal = [IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL];
        let pi = b.nest_start(CTA_PROTOINFO);
        let tcp = b.nest_start(CTA_PROTOINFO_TCP);
        b.put(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &liberal);
        b.put(CTA_PROTOINFO_TCP_FLAGS_REPLY, &liberal);
        b.nest_end(tcp);
        b.nest_end(pi);
    }
    if let Some(m) = upd.mark {
        // Without CTA_MARK_MASK ctnetlink_change_mark() replaces the mark.
        b.put_be32(CTA_MARK, m);
    }
    if let Some((value, mask)) = &upd.labels {
        // ctnetlink_attach_labels(): mask must have the labels' length.
        b.put(CTA_LABELS, value);
        b.put(CTA_LABELS_MASK, mask);
    }
    b.finish()
}

/// IPCTNL_MSG_CT_DELETE of one entry. The tuple is mandatory here: without
/// one ctnetlink_del_conntrack() flushes the whole table.
pub fn build_delete(seq: u32, orig: &CtTuple, zone: u16) -> Vec<u8> {
    let mut b = NlMsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_DELETE), NLM_F_REQUEST | NLM_F_ACK, seq);
    b.nfgenmsg(orig.family(), 0);
    put_tuple(&mut b, CTA_TUPLE_ORIG, orig);
    put_zone(&mut b, zone);
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::nla::{NLM_F_EXCL, NLM_F_MULTI};

    // Fixture helpers deliberately independent of NlMsgBuilder and of the
    // named constants above: attribute numbers are written as literals from
    // nfnetlink_conntrack.h, so a wrong constant cannot cancel itself out.
    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn nest(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    fn nlmsg(msg_type: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&msg_type.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn ct_msg(msg_type: u16, flags: u16, family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut payload = vec![family, 0, 0, 0];
        payload.extend_from_slice(&attrs.concat());
        nlmsg(msg_type, flags, 0, &payload)
    }

    fn v4_tuple(kind: u16, src: [u8; 4], dst: [u8; 4], proto: u8, sp: u16, dp: u16) -> Vec<u8> {
        nest(
            kind,
            &[
                nest(1, &[attr(1, &src), attr(2, &dst)]), // CTA_TUPLE_IP{V4_SRC,V4_DST}
                nest(
                    2, // CTA_TUPLE_PROTO
                    &[
                        attr(1, &[proto]),          // CTA_PROTO_NUM
                        attr(2, &sp.to_be_bytes()), // CTA_PROTO_SRC_PORT
                        attr(3, &dp.to_be_bytes()), // CTA_PROTO_DST_PORT
                    ],
                ),
            ],
        )
    }

    fn v6_tuple(kind: u16, src: Ipv6Addr, dst: Ipv6Addr, proto: u8, sp: u16, dp: u16) -> Vec<u8> {
        nest(
            kind,
            &[
                nest(1, &[attr(3, &src.octets()), attr(4, &dst.octets())]),
                nest(2, &[attr(1, &[proto]), attr(2, &sp.to_be_bytes()), attr(3, &dp.to_be_bytes())]),
            ],
        )
    }

    const LABELS: [u8; 16] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80];

    /// An IPv4 TCP SNAT'ed connection as ctnetlink_conntrack_event() would
    /// report it for IPCT_NEW, plus attributes we do not decode.
    fn ipv4_tcp_nat_new() -> Vec<u8> {
        let st = 0x2 | 0x4 | 0x8 | 0x10 | 0x80 | 0x100; // SEEN_REPLY..DST_NAT_DONE
        ct_msg(
            0x0100, // NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
            NLM_F_CREATE | NLM_F_EXCL,
            2, // AF_INET
            &[
                v4_tuple(1, [192, 168, 1, 10], [203, 0, 113, 2], 6, 40000, 80),
                v4_tuple(2, [203, 0, 113, 2], [203, 0, 113, 1], 6, 80, 61000),
                attr(18, &5u16.to_be_bytes()),           // CTA_ZONE
                attr(12, &0xdead_beefu32.to_be_bytes()), // CTA_ID
                attr(3, &(st as u32).to_be_bytes()),     // CTA_STATUS
                attr(7, &431_999u32.to_be_bytes()),      // CTA_TIMEOUT
                nest(
                    4, // CTA_PROTOINFO
                    &[nest(
                        1, // CTA_PROTOINFO_TCP
                        &[
                            attr(1, &[3]),       // STATE = ESTABLISHED
                            attr(2, &[7]),       // WSCALE_ORIGINAL
                            attr(3, &[7]),       // WSCALE_REPLY
                            attr(4, &[0x23, 0]), // FLAGS_ORIGINAL
                            attr(5, &[0x2b, 0]), // FLAGS_REPLY (incl. BE_LIBERAL)
                        ],
                    )],
                ),
                nest(
                    9, // CTA_COUNTERS_ORIG, with a CTA_COUNTERS_PAD filler
                    &[attr(5, &[]), attr(1, &10u64.to_be_bytes()), attr(2, &1500u64.to_be_bytes())],
                ),
                nest(
                    10, // CTA_COUNTERS_REPLY, old 32-bit variants
                    &[attr(3, &8u32.to_be_bytes()), attr(4, &4000u32.to_be_bytes())],
                ),
                nest(5, &[attr(1, b"ftp\0")]),             // CTA_HELP{CTA_HELP_NAME}
                attr(8, &0x10u32.to_be_bytes()),           // CTA_MARK
                attr(22, &LABELS),                         // CTA_LABELS
                nest(20, &[attr(1, &1u64.to_be_bytes())]), // CTA_TIMESTAMP: skipped
                attr(11, &1u32.to_be_bytes()),             // CTA_USE: skipped
                attr(0x7ff, &[1, 2, 3]),                   // unknown future attribute
            ],
        )
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// IPv6 UDP entry as a dump part (CT_NEW with NLM_F_MULTI), followed in
    /// the same datagram by its destroy event and NLMSG_DONE.
    fn ipv6_udp_datagram() -> Vec<u8> {
        let (a, b) = (v6("2001:db8::1"), v6("2001:db8::53"));
        let common = |extra: Vec<Vec<u8>>| {
            let mut v = vec![
                v6_tuple(1, a, b, 17, 5000, 53),
                v6_tuple(2, b, a, 17, 53, 5000),
                attr(3, &(0x2u32 | 0x8).to_be_bytes()),
                attr(12, &7u32.to_be_bytes()),
            ];
            v.extend(extra);
            v
        };
        let mut d = ct_msg(
            0x0100,
            NLM_F_MULTI,
            10, // AF_INET6
            &common(vec![attr(7, &120u32.to_be_bytes())]),
        );
        d.extend(ct_msg(0x0102, 0, 10, &common(vec![])));
        d.extend(nlmsg(3, NLM_F_MULTI, 0, &0i32.to_ne_bytes())); // NLMSG_DONE
        d
    }

    #[test]
    fn parses_ipv4_tcp_nat_entry() {
        let msgs = parse_message(&ipv4_tcp_nat_new()).unwrap();
        assert_eq!(msgs.len(), 1);
        let ParsedMsg::Event(CtEvent::New(e)) = &msgs[0] else {
            panic!("expected a New event, got {msgs:?}");
        };
        let ip = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        assert_eq!(
            e.orig,
            CtTuple { src: ip(192, 168, 1, 10), dst: ip(203, 0, 113, 2), proto: 6, sport: 40000, dport: 80 }
        );
        assert_eq!(
            e.reply,
            CtTuple { src: ip(203, 0, 113, 2), dst: ip(203, 0, 113, 1), proto: 6, sport: 80, dport: 61000 }
        );
        assert_eq!(e.id, 0xdead_beef);
        assert_eq!(
            e.status,
            status::SEEN_REPLY
                | status::ASSURED
                | status::CONFIRMED
                | status::SRC_NAT
                | status::SRC_NAT_DONE
                | status::DST_NAT_DONE
        );
        assert_eq!(e.timeout, Some(431_999));
        assert_eq!(e.mark, 0x10);
        assert_eq!(e.zone, 5);
        assert_eq!(e.tcp_state, Some(tcp_state::ESTABLISHED));
        assert_eq!(e.tcp_flags, Some([0x23, 0x2b]));
        assert_eq!(e.tcp_flags.unwrap()[1] & IP_CT_TCP_FLAG_BE_LIBERAL, 0x08);
        assert!(e.has_helper);
        assert_eq!(e.labels, Some(LABELS));
        assert_eq!(e.counters_orig, Some((10, 1500)));
        assert_eq!(e.counters_reply, Some((8, 4000)));
    }

    #[test]
    fn parses_ipv6_udp_update_destroy_done() {
        let msgs = parse_message(&ipv6_udp_datagram()).unwrap();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        let expected = CtEntry {
            id: 7,
            orig: CtTuple {
                src: IpAddr::V6(v6("2001:db8::1")),
                dst: IpAddr::V6(v6("2001:db8::53")),
                proto: 17,
                sport: 5000,
                dport: 53,
            },
            reply: CtTuple {
                src: IpAddr::V6(v6("2001:db8::53")),
                dst: IpAddr::V6(v6("2001:db8::1")),
                proto: 17,
                sport: 53,
                dport: 5000,
            },
            status: status::SEEN_REPLY | status::CONFIRMED,
            timeout: Some(120),
            mark: 0,
            zone: 0,
            tcp_state: None,
            tcp_flags: None,
            has_helper: false,
            labels: None,
            counters_orig: None,
            counters_reply: None,
        };
        assert_eq!(msgs[0], ParsedMsg::Event(CtEvent::Update(expected.clone())));
        let destroyed = CtEntry { timeout: None, ..expected };
        assert_eq!(msgs[1], ParsedMsg::Event(CtEvent::Destroy(destroyed)));
        assert_eq!(msgs[2], ParsedMsg::Done);
    }

    #[test]
    fn icmp_tuple_parses_with_zero_ports() {
        let icmp = |kind| {
            nest(
                kind,
                &[
                    nest(1, &[attr(1, &[10, 0, 0, 1]), attr(2, &[10, 0, 0, 2])]),
                    nest(
                        2,
                        &[
                            attr(1, &[1]),                 // ICMP
                            attr(4, &77u16.to_be_bytes()), // CTA_PROTO_ICMP_ID
                            attr(5, &[8]),                 // CTA_PROTO_ICMP_TYPE
                            attr(6, &[0]),                 // CTA_PROTO_ICMP_CODE
                        ],
                    ),
                ],
            )
        };
        let buf = ct_msg(0x0100, NLM_F_CREATE, 2, &[icmp(1), icmp(2)]);
        let msgs = parse_message(&buf).unwrap();
        let ParsedMsg::Event(CtEvent::New(e)) = &msgs[0] else { panic!("{msgs:?}") };
        assert_eq!(e.orig.proto, 1);
        assert_eq!((e.orig.sport, e.orig.dport), (0, 0));
        assert_eq!(e.orig.dst, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(e.tcp_state, None);
    }

    #[test]
    fn parses_ack_error_and_failed_done() {
        let mut err = (-libc::ENOENT).to_ne_bytes().to_vec();
        err.extend(nlmsg(0x0100, 5, 9, &[])); // echoed request header
        let mut d = nlmsg(2, 0, 9, &err);
        d.extend(nlmsg(2, 0x100, 10, &0i32.to_ne_bytes())); // ACK (capped)
        d.extend(nlmsg(1, 0, 0, &[])); // NLMSG_NOOP: dropped
        d.extend(nlmsg(3, 2, 11, &(-libc::EINTR).to_ne_bytes()));
        d.extend(nlmsg(0x0105, 0, 0, &[0, 0, 0, 0])); // CT_GET_STATS: dropped
        let with_hdr = parse_message_with_header(&d).unwrap();
        let seqs: Vec<u32> = with_hdr.iter().map(|(h, _)| h.seq).collect();
        assert_eq!(seqs, [9, 10, 11]);
        assert_eq!(
            parse_message(&d).unwrap(),
            [ParsedMsg::Error(libc::ENOENT), ParsedMsg::Ack, ParsedMsg::Error(libc::EINTR)]
        );
        assert!(matches!(parse_message(&nlmsg(2, 0, 1, &[0, 0])), Err(CtError::Malformed(_))));
    }

    #[test]
    fn truncated_buffers_are_malformed() {
        for fixture in [ipv4_tcp_nat_new(), ipv6_udp_datagram()] {
            // Cutting exactly between two messages leaves a valid datagram.
            let mut boundaries = Vec::new();
            let mut off = 0;
            for frame in NlMsgIter::new(&fixture) {
                off += crate::conntrack::nla::align4(frame.unwrap().0.len as usize);
                boundaries.push(off);
            }
            for cut in (1..fixture.len()).filter(|c| !boundaries.contains(c)) {
                let r = parse_message(&fixture[..cut]);
                assert!(matches!(r, Err(CtError::Malformed(_))), "cut at {cut}/{} gave {r:?}", fixture.len());
            }
        }
        // Intact framing but an inner attribute claims more than its nest.
        let mut buf = ipv4_tcp_nat_new();
        // First attribute of the payload is CTA_TUPLE_ORIG; its first child
        // (CTA_TUPLE_IP) starts at 16 + 4 + 4.
        let off = 16 + 4 + 4;
        buf[off..off + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(matches!(parse_message(&buf), Err(CtError::Malformed(_))));
        // Missing reply tuple.
        let buf = ct_msg(0x0100, 0, 2, &[v4_tuple(1, [1, 1, 1, 1], [2, 2, 2, 2], 17, 1, 2)]);
        assert!(matches!(parse_message(&buf), Err(CtError::Malformed(_))));
        // Wrong-width scalar (CTA_STATUS with 2 bytes).
        let mut attrs =
            vec![v4_tuple(1, [1, 1, 1, 1], [2, 2, 2, 2], 17, 1, 2), v4_tuple(2, [2, 2, 2, 2], [1, 1, 1, 1], 17, 2, 1)];
        attrs.push(attr(3, &[0, 1]));
        assert!(matches!(parse_message(&ct_msg(0x0100, 0, 2, &attrs)), Err(CtError::Malformed(_))));
    }

    /// [valid, garbage, valid] in one datagram: both valid events survive
    /// and the garbage is reported (the engine then resyncs). Old code
    /// returned only the error, losing the events around it.
    #[test]
    fn events_around_a_malformed_message_are_kept() {
        let mut bad = ipv4_tcp_nat_new();
        let off = 16 + 4 + 4;
        bad[off..off + 2].copy_from_slice(&200u16.to_ne_bytes());
        let first = ipv4_tcp_nat_new();
        // Fixture messages are whole multiples of 4 bytes: no padding.
        let d = [first.clone(), bad, ipv6_udp_datagram()].concat();
        let mut evs = Vec::new();
        let err = crate::conntrack::decode_events(&d, &mut evs);
        assert!(matches!(err, Some(CtError::Malformed(_))), "{err:?}");
        let want: Vec<CtEvent> = [first, ipv6_udp_datagram()]
            .iter()
            .flat_map(|m| parse_message(m).unwrap())
            .filter_map(|m| match m {
                ParsedMsg::Event(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(want.len(), evs.len());
        assert!(want.len() >= 2);
        assert_eq!(format!("{evs:?}"), format!("{want:?}"));
        // A clean datagram reports nothing.
        let mut evs = Vec::new();
        assert!(crate::conntrack::decode_events(&ipv6_udp_datagram(), &mut evs).is_none());
        assert!(!evs.is_empty());
    }

    /// xorshift64*, so the fuzz loop is deterministic without a rand crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut errors = 0;
        for _ in 0..5000 {
            let len = (rng.next() % 300) as usize;
            let buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if parse_message(&buf).is_err() {
                errors += 1;
            }
            let _ = parse_request(&buf);
        }
        // Pure noise almost never frames correctly.
        assert!(errors > 4500, "only {errors} of 5000 random buffers rejected");

        // Byte flips inside well-formed messages reach the attribute code.
        let fixtures = [ipv4_tcp_nat_new(), ipv6_udp_datagram()];
        for i in 0..20_000 {
            let mut buf = fixtures[i % 2].clone();
            for _ in 0..1 + rng.next() % 4 {
                let pos = (rng.next() as usize) % buf.len();
                buf[pos] = rng.next() as u8;
            }
            let _ = parse_message(&buf);
            let _ = parse_request(&buf);
        }
    }

    fn tcp4() -> CtTuple {
        CtTuple {
            src: IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
            dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2)),
            proto: 6,
            sport: 40000,
            dport: 80,
        }
    }

    #[test]
    fn update_request_round_trips() {
        let mut value = [0u8; 16];
        value[0] = 0x04;
        let mut mask = [0u8; 16];
        mask[0] = 0x0c;
        let upd = CtUpdate {
            timeout: Some(777),
            tcp_liberal: true,
            mark: Some(0x42),
            labels: Some((value, mask)),
            status: Some(0x0e),
        };
        let buf = build_update(0x1234, &tcp4(), 9, &upd);
        let raw = parse_request(&buf).unwrap();
        assert_eq!(raw.header.len as usize, buf.len());
        assert_eq!(raw.header.msg_type, 0x0100);
        assert_eq!(raw.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(raw.header.flags & NLM_F_CREATE, 0);
        assert_eq!(raw.header.seq, 0x1234);
        assert_eq!(raw.family, AF_INET);
        let want = CtAttrs {
            orig: Some(tcp4()),
            zone: Some(9),
            timeout: Some(777),
            status: Some(0x0e),
            tcp_flags_orig: Some((0x08, 0x08)),
            tcp_flags_reply: Some((0x08, 0x08)),
            mark: Some(0x42),
            labels: Some(value),
            labels_mask: Some(mask),
            ..CtAttrs::default()
        };
        assert_eq!(raw.attrs, want);

        // Zone 0 is implicit; nothing requested means only the tuple.
        let raw = parse_request(&build_update(1, &tcp4(), 0, &CtUpdate::default())).unwrap();
        assert_eq!(raw.attrs, CtAttrs { orig: Some(tcp4()), ..CtAttrs::default() });
        // tcp_liberal is not sent for UDP.
        let udp = CtTuple { proto: 17, ..tcp4() };
        let liberal = CtUpdate { tcp_liberal: true, ..CtUpdate::default() };
        let raw = parse_request(&build_update(1, &udp, 0, &liberal)).unwrap();
        assert_eq!(raw.attrs.tcp_flags_orig, None);
    }

    #[test]
    fn delete_and_dump_requests_round_trip() {
        let t6 = CtTuple {
            src: IpAddr::V6(v6("2001:db8::1")),
            dst: IpAddr::V6(v6("2001:db8::2")),
            proto: 17,
            sport: 1000,
            dport: 2000,
        };
        let raw = parse_request(&build_delete(77, &t6, 3)).unwrap();
        assert_eq!(raw.header.msg_type, 0x0102);
        assert_eq!(raw.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(raw.header.seq, 77);
        assert_eq!(raw.family, AF_INET6);
        assert_eq!(raw.attrs.orig, Some(t6));
        assert_eq!(raw.attrs.zone, Some(3));

        let dump = build_dump_request(5, libc::AF_UNSPEC as u8);
        let raw = parse_request(&dump).unwrap();
        assert_eq!(raw.header.msg_type, 0x0101);
        assert_eq!(raw.header.flags, 0x301); // REQUEST | ROOT | MATCH
        assert_eq!(raw.family, 0);
        assert_eq!(raw.attrs, CtAttrs::default());
        assert_eq!(dump.len(), 20);
    }

    #[test]
    fn delete_request_matches_hand_encoded_bytes() {
        let t = CtTuple {
            src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            proto: 17,
            sport: 1000,
            dport: 53,
        };
        let want = ct_msg(0x0102, 0x0005, 2, &[v4_tuple(1, [10, 0, 0, 1], [10, 0, 0, 2], 17, 1000, 53)]);
        let mut want = want;
        want[8..12].copy_from_slice(&1u32.to_ne_bytes()); // seq
        assert_eq!(want.len(), 72);
        assert_eq!(build_delete(1, &t, 0), want);
    }

    #[test]
    fn icmp_request_tuple_has_no_ports() {
        let t = CtTuple { proto: 1, sport: 0, dport: 0, ..tcp4() };
        let raw = parse_request(&build_delete(1, &t, 0)).unwrap();
        assert_eq!(raw.attrs.orig, Some(t));
        // 16 hdr + 4 nfgenmsg + ORIG(4 + IP 20 + PROTO 4+8).
        assert_eq!(build_delete(1, &t, 0).len(), 56);
    }
}
