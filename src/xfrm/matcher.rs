//! Would the kernel send a forwarded direction through xfrm (or drop it for
//! xfrm)? Pure: the SPD and one direction in, the policy that applies out.
//!
//! A forwarded packet meets the SPD three times (net/ipv4/ip_forward.c
//! `ip_forward`, and the same in ip6_output.c `ip6_forward`):
//!
//! | where | lookup | the packet's tuple then |
//! |---|---|---|
//! | `xfrm4_policy_check(.., XFRM_POLICY_FWD, ..)` (`__xfrm_policy_check`) | fwd | after DNAT (PREROUTING), turned back into the tuple as it arrived by `nf_nat_decode_session` |
//! | `xfrm4_route_forward` (`__xfrm_route_forward` -> `xfrm_lookup`) | out | after DNAT, before SNAT |
//! | `nf_nat_ipv4_out` -> `nf_xfrm_me_harder` (when SNAT changed it) | out | as it leaves |
//!
//! So fwd policies are matched against the arriving and the routed tuple,
//! out policies against the routed and the leaving one (PREROUTING only
//! changes destinations, POSTROUTING only sources, in either direction of a
//! connection, so the routed tuple is the arriving source and the leaving
//! destination). Matching more tuples than the kernel would only holds more.
//!
//! Per lookup the kernel takes the first matching policy in the SPD's order
//! (`xfrm_policy_lookup_bytype`; `Spd::new` sorts that way) and:
//!
//! | first match | kernel | here |
//! |---|---|---|
//! | action block | drops | held |
//! | allow with templates | encrypts, or drops for lack of an SA; optional (`level use`) templates are skipped without one | held: we do not follow SAs, and the fast path never hands a packet to xfrm |
//! | allow, no template (bypass) | sends as is | not held, and stops the walk |
//! | none | `setdefault .. block`: drops; else sends as is | held / not held |
//!
//! `__xfrm4_selector_match`: addresses by prefix, ports under their masks,
//! protocol (0: any), and `flowi_oif` against the selector's ifindex (`dev`).
//! `__xfrm_decode_session` (net/xfrm/xfrm_policy.c; `decode_session4/6`
//! before 6.7) sets `flowi_oif` to `skb_dst(skb)->dev` unless the lookup is
//! a reverse one (`skb_iif`, only for ICMP errors). `__xfrm_policy_check`
//! takes the reverse bit from `dir`, and `ip_forward` / `ip6_forward` ask
//! plain `XFRM_POLICY_FWD` after `ip_route_input` set the dst: so the fwd
//! check and both out lookups all see the device the FIB routes the packet
//! to (br-lan, wan.7, pppoe-wan), never the input device, and not the port
//! below it that the fast path transmits on. `xfrm_policy_match`: the packet's mark under the
//! policy's mask, and the interface id. The packet mark is the one thing we
//! cannot know (the ruleset may set it per packet), so a policy with a mark
//! mask is taken as matching when it would hold, and ignored when it is a
//! bypass. A policy with an `if_id` only matches lookups made for an xfrm
//! interface (`xfrmi_xmit2`, `xfrm_lookup_with_ifid`); a packet routed into
//! one is encrypted (or dropped) by that device itself, never sent in clear.

use std::fmt;
use std::net::IpAddr;

use crate::flow::entry::words_addr;
use crate::flow::Direction;

use super::policy::{family_matches, Dir, Policy, Prefix, Spd};

/// One form of a direction's packet: addresses and ports (host order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// A forwarded direction as the SPD sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub family: u8,
    pub proto: u8,
    /// As it arrives (before DNAT).
    pub arriving: Flow,
    /// As it is routed (after DNAT, before SNAT).
    pub routed: Flow,
    /// As it leaves (after SNAT).
    pub leaving: Flow,
    /// The route's device (`skb_dst(skb)->dev`): `flowi_oif` of every
    /// lookup made on a forwarded packet.
    pub oif: u32,
}

impl Route {
    /// From a direction's map entries (the key is the arriving packet, the
    /// value its rewrite) and its route's device.
    pub fn of(d: &Direction) -> Route {
        let (k, v) = (&d.key, &d.val);
        let arriving = Flow {
            src: words_addr(k.family, &k.saddr),
            dst: words_addr(k.family, &k.daddr),
            sport: u16::from_be(k.sport),
            dport: u16::from_be(k.dport),
        };
        let leaving = Flow {
            src: words_addr(k.family, &v.new_saddr),
            dst: words_addr(k.family, &v.new_daddr),
            sport: u16::from_be(v.new_sport),
            dport: u16::from_be(v.new_dport),
        };
        let routed = Flow { src: arriving.src, sport: arriving.sport, dst: leaving.dst, dport: leaving.dport };
        Route { family: k.family, proto: k.proto, arriving, routed, leaving, oif: d.route_ifindex }
    }
}

/// Why a direction must stay with the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies<'a> {
    /// This policy encrypts or blocks it; `by_mark`: only if the packet's
    /// mark matches, which is not known.
    Policy { policy: &'a Policy, by_mark: bool },
    /// No policy matches and this direction's default is block.
    DefaultBlock(Dir),
    /// The SPD is not (fully) known.
    Unknown(&'a str),
}

/// The `why` of a held direction: the cause and the remedy.
impl fmt::Display for Applies<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Applies::Policy { policy, by_mark } => {
                let what = if policy.block { "drops it" } else { "sends it through IPsec" };
                write!(f, "xfrm policy `{policy}` {what}")?;
                if *by_mark {
                    f.write_str(" if the packet's mark matches (not known here, so taken as matching)")?;
                }
                f.write_str(
                    ": the kernel keeps it (nothing to do: IPsec traffic takes the slow path by design; \
                     exclude these hosts from the flowtable to stop offering it)",
                )
            }
            Applies::DefaultBlock(d) => write!(
                f,
                "no xfrm policy matches and `ip xfrm policy setdefault {0} block` drops it: the kernel keeps it \
                 (add a bypass policy `dir {0} action allow` for these hosts if they should pass in clear)",
                d.as_str()
            ),
            Applies::Unknown(why) => write!(f, "the xfrm policies are not known ({why}): kept on the slow path"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    No,
    /// Everything but the mark matches.
    ByMark,
    Yes,
}

fn prefix_match(p: &Prefix, a: IpAddr) -> bool {
    let (bytes, bits): ([u8; 16], u8) = match a {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (b, 32)
        }
        IpAddr::V6(v6) => (v6.octets(), 128),
    };
    let len = p.len.min(bits) as usize;
    let (whole, rest) = (len / 8, len % 8);
    if bytes[..whole] != p.addr[..whole] {
        return false;
    }
    rest == 0 || (bytes[whole] ^ p.addr[whole]) & (0xffu8 << (8 - rest)) == 0
}

/// `xfrm_policy_match` for one tuple of route `r`.
fn matches(p: &Policy, r: &Route, f: &Flow) -> Match {
    let s = &p.sel;
    let hit = p.if_id == 0
        && family_matches(s.family, r.family)
        && prefix_match(&s.src, f.src)
        && prefix_match(&s.dst, f.dst)
        && (s.proto == 0 || s.proto == r.proto)
        && (f.sport ^ s.sport) & s.sport_mask == 0
        && (f.dport ^ s.dport) & s.dport_mask == 0
        && (s.ifindex == 0 || s.ifindex as u32 == r.oif);
    match (hit, p.mark.1 != 0) {
        (false, _) => Match::No,
        (true, true) => Match::ByMark,
        (true, false) => Match::Yes,
    }
}

/// One lookup of direction `dir` for tuple `f`: the first policy that
/// decides, as the kernel walks them.
fn lookup<'a>(spd: &'a Spd, dir: Dir, r: &Route, f: &Flow) -> Option<Applies<'a>> {
    for p in spd.policies.iter().filter(|p| p.dir == dir) {
        match (matches(p, r, f), p.bypass()) {
            (Match::No, _) => {}
            // A bypass that might not apply cannot be relied on.
            (Match::ByMark, true) => {}
            (m, false) => return Some(Applies::Policy { policy: p, by_mark: m == Match::ByMark }),
            (Match::Yes, true) => return None,
        }
    }
    let block = match dir {
        Dir::Fwd => spd.fwd_block,
        Dir::Out => spd.out_block,
        Dir::In => false,
    };
    block.then_some(Applies::DefaultBlock(dir))
}

/// Whether the kernel would send direction `r` through xfrm or drop it for
/// xfrm: `Some` (the reason) holds it on the slow path.
pub fn applies<'a>(spd: &'a Spd, r: &Route) -> Option<Applies<'a>> {
    if let Some(why) = &spd.unknown {
        return Some(Applies::Unknown(why));
    }
    [(Dir::Fwd, &r.arriving), (Dir::Fwd, &r.routed), (Dir::Out, &r.routed), (Dir::Out, &r.leaving)]
        .into_iter()
        .find_map(|(dir, f)| lookup(spd, dir, r, f))
}

#[cfg(test)]
#[path = "matcher_tests.rs"]
mod tests;
