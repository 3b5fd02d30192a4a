//! What the policy routing rules (`ip rule`) ask of a lookup, judged per
//! selector: can the engine's FIB query (`bpf_fib_lookup` as a forwarded
//! packet) reproduce the kernel's answer for every packet of a connection?
//!
//! The kernel routes each forwarded packet with `ip_route_input_slow`'s flow
//! key: input interface, addresses, the packet's mark (`skb->mark`) and
//! DSCP, protocol and ports, uid 0, no tunnel id, oif 0. `bpf_fib_lookup`
//! builds the same key (`bpf_ipv4_fib_lookup` / `bpf_ipv6_fib_lookup`,
//! net/core/filter.c) from its parameters, except the mark (only with
//! BPF_FIB_LOOKUP_MARK, 6.10) and the packet's own tos/flow label, which
//! conntrack does not record and may differ per packet. So:
//!
//! | selector | judgement |
//! |---|---|
//! | from, to, iif, oif, ipproto, sport, dport, uidrange, suppress_* | reproduced: same key |
//! | fwmark / fwmask | reproduced with the conntrack mark as the packet mark (`meta mark set ct mark`, mwan3 and pbr) |
//! | tos / dsfield, dscp, flowlabel | per packet, unknown: no connection of that family is offloaded |
//! | tun_id | set by collect-md tunnels, lookup has none: not offloaded |
//! | l3mdev (VRF) | not judged: not offloaded |

use std::fmt;

use anyhow::Result;
use netlink_packet_core::Nla;
use netlink_packet_route::rule::{RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

/// A rule selector the engine's lookup cannot reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    Tos,
    Dscp,
    FlowLabel,
    TunnelId,
    L3mdev,
    /// Rules on the mark, and this kernel's `bpf_fib_lookup` takes no mark.
    MarkUnsupported,
    /// The rules could not be read: nothing is known.
    Unread,
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Selector::Tos => "an ip rule selects on tos, which each packet carries and conntrack does not record",
            Selector::Dscp => "an ip rule selects on dscp, which each packet carries and conntrack does not record",
            Selector::FlowLabel => "an ip rule selects on the IPv6 flow label, which each packet carries",
            Selector::TunnelId => "an ip rule selects on a tunnel id, which the route lookup cannot be given",
            Selector::L3mdev => "an ip rule sends lookups to a VRF (l3mdev), which is not supported",
            Selector::MarkUnsupported => {
                "ip rules select on fwmark and this kernel's bpf_fib_lookup takes no mark (6.10+)"
            }
            Selector::Unread => "the ip rules could not be read",
        })
    }
}

/// What the rules of one address family mean for the engine's lookups.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FamilyRules {
    /// Some rule selects on fwmark: the lookup must carry the mark.
    pub by_mark: bool,
    /// Some rule the lookup cannot reproduce: no path for this family.
    pub unreproducible: Option<Selector>,
    /// Some rule selects on ipproto, sport or dport: answers depend on the
    /// connection's ports, so they are not cached (`cache`).
    pub by_flow: bool,
}

impl FamilyRules {
    fn add(&mut self, r: &RuleMessage) {
        let (mark, blocker) = judge(r);
        self.by_mark |= mark;
        self.unreproducible = self.unreproducible.or(blocker);
        self.by_flow |= selects_on_flow(r);
    }
}

/// The `ip rule` tables of both families, judged.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyRules {
    pub v4: FamilyRules,
    pub v6: FamilyRules,
}

impl PolicyRules {
    /// Read the namespace's rules (RTM_GETRULE dump, both families). When
    /// they cannot be read, nothing is offloaded (`Selector::Unread`).
    pub fn read() -> Self {
        match dump_rules() {
            Ok(rules) => Self::from_rules(&rules),
            Err(e) => {
                tracing::warn!("reading ip rules: {e:#}; nothing is offloaded until they can be read");
                let unread = FamilyRules { by_mark: false, unreproducible: Some(Selector::Unread), by_flow: true };
                PolicyRules { v4: unread, v6: unread }
            }
        }
    }

    pub fn from_rules(rules: &[RuleMessage]) -> Self {
        let mut p = PolicyRules::default();
        for r in rules {
            match r.header.family {
                AddressFamily::Inet => p.v4.add(r),
                AddressFamily::Inet6 => p.v6.add(r),
                _ => {}
            }
        }
        p
    }

    pub fn family(&self, v6: bool) -> FamilyRules {
        if v6 {
            self.v6
        } else {
            self.v4
        }
    }
}

/// FRA_* numbers newer than the decoder (include/uapi/linux/fib_rules.h).
const FRA_DSCP: u16 = 25;
const FRA_FLOWLABEL: u16 = 26;
const FRA_FLOWLABEL_MASK: u16 = 27;
const FRA_DSCP_MASK: u16 = 30;

/// (selects on the mark, a selector the lookup cannot reproduce).
fn judge(r: &RuleMessage) -> (bool, Option<Selector>) {
    let mut mark = false;
    let mut blocker = (r.header.tos != 0).then_some(Selector::Tos);
    for a in &r.attributes {
        let b = match a {
            // The kernel matches (skb->mark ^ mark) & mask: a mask alone
            // (`fwmark 0/0xff`) selects on the mark too.
            RuleAttribute::FwMark(m) | RuleAttribute::FwMask(m) => {
                mark |= *m != 0;
                None
            }
            RuleAttribute::TunId(id) if *id != 0 => Some(Selector::TunnelId),
            RuleAttribute::L3MDev(true) => Some(Selector::L3mdev),
            RuleAttribute::Other(nla) => match nla.kind() {
                FRA_DSCP | FRA_DSCP_MASK => Some(Selector::Dscp),
                FRA_FLOWLABEL | FRA_FLOWLABEL_MASK => Some(Selector::FlowLabel),
                _ => None,
            },
            _ => None,
        };
        blocker = blocker.or(b);
    }
    (mark, blocker)
}

/// Whether `r` matches on the protocol or ports (`fib4_rule_match` /
/// `fib6_rule_match`: ip_proto, sport_range, dport_range).
fn selects_on_flow(r: &RuleMessage) -> bool {
    r.attributes.iter().any(|a| {
        matches!(
            a,
            RuleAttribute::IpProtocol(_) | RuleAttribute::SourcePortRange(_) | RuleAttribute::DestinationPortRange(_)
        )
    })
}

fn dump_rules() -> Result<Vec<RuleMessage>> {
    // AF_UNSPEC: both families in one dump.
    let msgs = super::dump::dump(RouteNetlinkMessage::GetRule(RuleMessage::default()), "rule")?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRule(r) => Some(r),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::DefaultNla;

    fn rule(family: AddressFamily, tos: u8, attributes: Vec<RuleAttribute>) -> RuleMessage {
        let mut r = RuleMessage::default();
        r.attributes = attributes;
        r.header.family = family;
        r.header.tos = tos;
        r
    }
    fn v4(attrs: Vec<RuleAttribute>) -> RuleMessage {
        rule(AddressFamily::Inet, 0, attrs)
    }

    #[test]
    fn each_selector_is_judged() {
        use RuleAttribute as A;
        let other = |kind| A::Other(DefaultNla::new(kind, vec![0; 4]));
        let cases: Vec<(&str, RuleMessage, bool, Option<Selector>)> = vec![
            ("main table", v4(vec![A::Priority(32766), A::Table(254)]), false, None),
            ("fwmark 2 table 102 (mwan3)", v4(vec![A::FwMark(2), A::FwMask(0xffffffff), A::Table(102)]), true, None),
            ("fwmark 0/0xff00 (mask alone)", v4(vec![A::FwMask(0xff00)]), true, None),
            ("iif", v4(vec![A::Iifname("lan".into())]), false, None),
            ("oif", v4(vec![A::Oifname("wan".into())]), false, None),
            ("from", v4(vec![A::Source("192.168.1.0".parse().unwrap())]), false, None),
            ("tos", rule(AddressFamily::Inet, 0x10, vec![]), false, Some(Selector::Tos)),
            ("ipv6 dsfield", rule(AddressFamily::Inet6, 0x10, vec![]), false, Some(Selector::Tos)),
            ("dscp", v4(vec![other(FRA_DSCP)]), false, Some(Selector::Dscp)),
            ("dscp mask", v4(vec![other(FRA_DSCP_MASK)]), false, Some(Selector::Dscp)),
            ("flowlabel", v4(vec![other(FRA_FLOWLABEL)]), false, Some(Selector::FlowLabel)),
            ("tun_id", v4(vec![A::TunId(5)]), false, Some(Selector::TunnelId)),
            ("l3mdev", v4(vec![A::L3MDev(true)]), false, Some(Selector::L3mdev)),
            ("fwmark and tos", rule(AddressFamily::Inet, 4, vec![A::FwMark(1)]), true, Some(Selector::Tos)),
        ];
        for (what, r, mark, blocker) in cases {
            assert_eq!(judge(&r), (mark, blocker), "{what}");
        }
    }

    #[test]
    fn families_are_judged_apart() {
        let p = PolicyRules::from_rules(&[
            v4(vec![RuleAttribute::FwMark(2)]),
            rule(AddressFamily::Inet6, 0x20, vec![]),
            v4(vec![RuleAttribute::Table(254)]),
        ]);
        assert_eq!(p.family(false), FamilyRules { by_mark: true, ..Default::default() });
        assert_eq!(p.family(true), FamilyRules { unreproducible: Some(Selector::Tos), ..Default::default() });
    }

    /// Protocol and port selectors make answers per connection: no cache.
    #[test]
    fn port_and_protocol_rules_select_on_the_flow() {
        use netlink_packet_route::rule::RulePortRange;
        use netlink_packet_route::IpProtocol;
        use RuleAttribute as A;
        let range = RulePortRange { start: 53, end: 53 };
        let cases = [
            ("ipproto", vec![A::IpProtocol(IpProtocol::Tcp)], true),
            ("sport", vec![A::SourcePortRange(range)], true),
            ("dport", vec![A::DestinationPortRange(range)], true),
            ("fwmark", vec![A::FwMark(1)], false),
            ("from", vec![A::Source("192.168.1.0".parse().unwrap())], false),
        ];
        for (what, attrs, want) in cases {
            let p = PolicyRules::from_rules(&[v4(attrs)]);
            assert_eq!((p.v4.by_flow, p.v6.by_flow), (want, false), "{what}");
        }
    }

    #[test]
    fn this_namespace_can_be_read() {
        // The default rules (local, main, default) select on nothing.
        let p = PolicyRules::read();
        assert_ne!(p.v4.unreproducible, Some(Selector::Unread), "{p:?}");
    }
}
