//! The kernel's security policy database (SPD), as the xfrm netlink dump
//! gives it: each policy's selector, direction, action, priority, templates,
//! mark and interface id, decoded with `netlink-packet-xfrm` (rust-netlink,
//! the same family as the rtnetlink crates, on the same netlink-packet-core).

use std::fmt;
use std::net::IpAddr;

use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLMSG_DONE, NLMSG_ERROR};
use netlink_packet_xfrm::policy::ModifyMessage;
use netlink_packet_xfrm::{
    UserPolicyDefault, XfrmAttrs, XfrmMessage, XFRM_MSG_GETDEFAULT, XFRM_MSG_NEWPOLICY, XFRM_MSG_SETDEFAULT,
    XFRM_MSG_UPDPOLICY, XFRM_POLICY_BLOCK, XFRM_POLICY_FWD, XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_POLICY_TYPE_SUB,
    XFRM_USERPOLICY_BLOCK, XFRM_USER_POLICY_DEFAULT_LEN, XFRM_USER_POLICY_INFO_LEN,
};

use crate::flow::entry::{AF_INET, AF_INET6};

/// A policy's direction (XFRM_POLICY_IN / OUT / FWD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Packets delivered to the router itself: never a forwarded one.
    In,
    /// Packets leaving: `xfrm_lookup` on every forwarded packet's route.
    Out,
    /// Forwarded packets, checked as they arrive (`ip_forward`).
    Fwd,
}

impl Dir {
    fn from_raw(d: u8) -> Option<Dir> {
        match d {
            XFRM_POLICY_IN => Some(Dir::In),
            XFRM_POLICY_OUT => Some(Dir::Out),
            XFRM_POLICY_FWD => Some(Dir::Fwd),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dir::In => "in",
            Dir::Out => "out",
            Dir::Fwd => "fwd",
        }
    }
}

/// An address and prefix length of a selector (`xfrm_address_t`: IPv4 in
/// the first four bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prefix {
    pub addr: [u8; 16],
    pub len: u8,
}

impl Prefix {
    pub fn new(a: IpAddr, len: u8) -> Prefix {
        let mut addr = [0u8; 16];
        match a {
            IpAddr::V4(v4) => addr[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => addr = v6.octets(),
        }
        Prefix { addr, len }
    }

    fn show(&self, family: u16) -> String {
        let a: IpAddr = if family == u16::from(AF_INET6) {
            self.addr.into()
        } else {
            [self.addr[0], self.addr[1], self.addr[2], self.addr[3]].into()
        };
        format!("{a}/{}", self.len)
    }
}

/// `struct xfrm_selector`. Ports and masks in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Selector {
    pub family: u16,
    pub src: Prefix,
    pub dst: Prefix,
    /// 0: any protocol.
    pub proto: u8,
    pub sport: u16,
    pub sport_mask: u16,
    pub dport: u16,
    pub dport_mask: u16,
    /// 0: any interface.
    pub ifindex: i32,
}

/// One `struct xfrm_user_tmpl`: a transform the kernel applies (or, on
/// input, requires).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template {
    /// IPPROTO_ESP, IPPROTO_AH or IPPROTO_COMP.
    pub proto: u8,
    /// XFRM_MODE_TRANSPORT, XFRM_MODE_TUNNEL, ...
    pub mode: u8,
    /// `level use`: applied when an SA exists, else skipped.
    pub optional: bool,
}

/// One policy of the SPD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub dir: Dir,
    /// XFRM_POLICY_BLOCK: matching packets are dropped.
    pub block: bool,
    /// Lower is first (`xfrm_policy_lookup_bytype`).
    pub priority: u32,
    pub index: u32,
    /// XFRM_POLICY_TYPE_SUB: looked up before every main policy.
    pub sub: bool,
    pub sel: Selector,
    pub templates: Vec<Template>,
    /// XFRMA_MARK (value, mask): matches packets with `mark & mask == value`.
    pub mark: (u32, u32),
    /// XFRMA_IF_ID: only lookups made for an xfrm interface with this id.
    pub if_id: u32,
}

impl Policy {
    /// `allow` with no template: the kernel sends matching packets as they
    /// are (a bypass, as IKE daemons install for traffic that must not be
    /// tunnelled).
    pub fn bypass(&self) -> bool {
        !self.block && self.templates.is_empty()
    }
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "ipv6-icmp".into(),
        50 => "esp".into(),
        51 => "ah".into(),
        108 => "comp".into(),
        n => n.to_string(),
    }
}

/// In `ip xfrm policy` words, e.g. `dir out src 192.168.1.0/24 dst
/// 203.0.113.2/32 proto udp tmpl esp tunnel`.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.sel;
        write!(f, "dir {} src {} dst {}", self.dir.as_str(), s.src.show(s.family), s.dst.show(s.family))?;
        if s.proto != 0 {
            write!(f, " proto {}", proto_name(s.proto))?;
        }
        if s.sport_mask != 0 {
            write!(f, " sport {}", s.sport)?;
        }
        if s.dport_mask != 0 {
            write!(f, " dport {}", s.dport)?;
        }
        if s.ifindex != 0 {
            write!(f, " dev #{}", s.ifindex)?;
        }
        if self.mark.1 != 0 {
            write!(f, " mark {:#x}/{:#x}", self.mark.0, self.mark.1)?;
        }
        if self.priority != 0 {
            write!(f, " priority {}", self.priority)?;
        }
        if self.block {
            f.write_str(" action block")?;
        }
        for t in &self.templates {
            let mode = match t.mode {
                0 => "transport",
                1 => "tunnel",
                4 => "beet",
                _ => "mode?",
            };
            write!(f, " tmpl {} {mode}{}", proto_name(t.proto), if t.optional { " level use" } else { "" })?;
        }
        Ok(())
    }
}

/// The SPD as last read, with the per-direction defaults of `ip xfrm
/// policy setdefault` (5.17+).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spd {
    /// Forwarded directions' policies (out and fwd; `in` never applies to
    /// a forwarded packet), in the order the kernel tries them.
    pub policies: Vec<Policy>,
    /// `setdefault fwd block` / `out block`: packets no policy matches are dropped.
    pub fwd_block: bool,
    pub out_block: bool,
    /// Why the SPD is not (fully) known: nothing may be offloaded then.
    pub unknown: Option<String>,
}

impl Spd {
    /// From decoded policies, sorted as the kernel looks them up: sub
    /// policies before main ones (`xfrm_policy_lookup`), lower priority
    /// first; among equals the kernel takes the one inserted first, which
    /// the dump does not say, so a non-bypass one goes first (the
    /// conservative guess).
    pub fn new(mut policies: Vec<Policy>, defaults: UserPolicyDefault, unknown: Option<String>) -> Spd {
        policies.retain(|p| p.dir != Dir::In);
        policies.sort_by_key(|p| (!p.sub, p.priority, p.bypass()));
        Spd {
            policies,
            fwd_block: defaults.forward == XFRM_USERPOLICY_BLOCK,
            out_block: defaults.output == XFRM_USERPOLICY_BLOCK,
            unknown,
        }
    }

    /// The SPD could not be read at all: every direction is held.
    pub fn unreadable(why: String) -> Spd {
        Spd { unknown: Some(why), ..Default::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && !self.fwd_block && !self.out_block && self.unknown.is_none()
    }
}

/// A policy from an XFRM_MSG_NEWPOLICY (dump reply or event) message.
pub fn decode_policy(m: &ModifyMessage) -> Result<Policy, String> {
    let info = &m.user_policy_info;
    let dir = Dir::from_raw(info.direction).ok_or_else(|| format!("unknown policy direction {}", info.direction))?;
    let s = &info.selector;
    if s.prefixlen_s > 128 || s.prefixlen_d > 128 {
        return Err(format!("selector prefix length {}/{} out of range", s.prefixlen_s, s.prefixlen_d));
    }
    let mut p = Policy {
        dir,
        block: info.action == XFRM_POLICY_BLOCK,
        priority: info.priority,
        index: info.index,
        sub: false,
        sel: Selector {
            family: s.family,
            src: Prefix { addr: s.saddr.addr, len: s.prefixlen_s },
            dst: Prefix { addr: s.daddr.addr, len: s.prefixlen_d },
            proto: s.proto,
            sport: s.sport,
            sport_mask: s.sport_mask,
            dport: s.dport,
            dport_mask: s.dport_mask,
            ifindex: s.ifindex,
        },
        templates: Vec::new(),
        mark: (0, 0),
        if_id: 0,
    };
    for a in &m.nlas {
        match a {
            XfrmAttrs::Template(ts) => p.templates.extend(ts.iter().map(|t| Template {
                proto: t.id.proto,
                mode: t.mode,
                optional: t.optional != 0,
            })),
            XfrmAttrs::Mark(mk) => p.mark = (mk.value, mk.mask),
            XfrmAttrs::IfId(id) => p.if_id = *id,
            XfrmAttrs::PolicyType(t) => p.sub = t.ptype == XFRM_POLICY_TYPE_SUB,
            _ => {}
        }
    }
    Ok(p)
}

/// What one netlink datagram of the xfrm family held.
#[derive(Debug, Default)]
pub struct Datagram {
    pub policies: Vec<Policy>,
    pub defaults: Option<UserPolicyDefault>,
    /// Messages that could not be decoded, with the reason.
    pub bad: Vec<String>,
    /// NLMSG_DONE seen, or the error code of NLMSG_ERROR (0: an ack).
    pub done: bool,
    pub error: Option<i32>,
    /// Messages of the dump's sequence (or any, without one).
    pub messages: usize,
}

/// Decode the messages of one datagram (a dump reply or events). A message
/// that cannot be decoded is named in `bad`; the others are kept.
pub fn decode_datagram(mut b: &[u8], seq: Option<u32>) -> Datagram {
    let mut out = Datagram::default();
    while !b.is_empty() {
        let nl = match NetlinkBuffer::new_checked(b) {
            Ok(nl) => nl,
            Err(e) => {
                out.bad.push(format!("undecodable netlink header: {e}"));
                return out;
            }
        };
        let (len, ty, msg_seq) = (nl.length() as usize, nl.message_type(), nl.sequence_number());
        let msg = &b[..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        if seq.is_some_and(|s| s != msg_seq) {
            continue;
        }
        out.messages += 1;
        // Only the replies of a dump are decoded (events only say that
        // something changed). netlink-packet-xfrm slices a message's fixed
        // header without checking its length: a short one must not reach it.
        let min = match ty {
            XFRM_MSG_NEWPOLICY | XFRM_MSG_UPDPOLICY => XFRM_USER_POLICY_INFO_LEN,
            XFRM_MSG_GETDEFAULT | XFRM_MSG_SETDEFAULT => XFRM_USER_POLICY_DEFAULT_LEN,
            NLMSG_ERROR | NLMSG_DONE => 4,
            _ => continue,
        };
        if msg.len() < 16 + min {
            out.bad.push(format!("message type {ty} of {} bytes, shorter than its header", msg.len()));
            continue;
        }
        match NetlinkMessage::<XfrmMessage>::deserialize(msg) {
            Ok(m) => match m.payload {
                NetlinkPayload::InnerMessage(XfrmMessage::AddPolicy(p) | XfrmMessage::UpdatePolicy(p)) => {
                    match decode_policy(&p) {
                        Ok(p) => out.policies.push(p),
                        Err(e) => out.bad.push(e),
                    }
                }
                NetlinkPayload::InnerMessage(XfrmMessage::GetPolicyDefault(d) | XfrmMessage::SetPolicyDefault(d)) => {
                    out.defaults = Some(d.user_policy)
                }
                NetlinkPayload::Done(_) => out.done = true,
                NetlinkPayload::Error(e) => out.error = Some(e.code.map_or(0, |c| c.get())),
                _ => {}
            },
            Err(e) => out.bad.push(format!("message type {ty}: {e}")),
        }
    }
    out
}

/// The address family a selector applies to, for the matcher. Selectors
/// are AF_INET or AF_INET6 (`verify_newpolicy_info`); anything else is
/// treated as either.
pub fn family_matches(sel_family: u16, family: u8) -> bool {
    sel_family == u16::from(family) || (sel_family != u16::from(AF_INET) && sel_family != u16::from(AF_INET6))
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
