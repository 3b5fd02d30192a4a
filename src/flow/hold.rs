//! Holds: a direction of an offloaded connection that the kernel must
//! forward itself, because something the fast path would skip applies to
//! it (an xfrm policy, a tc filter or netdev chain on its input device, a
//! netdev chain on its output), because it arrives by XDP and its output
//! cannot take XDP frames, or because it is still dormant: the connection
//! came back on evidence for the other direction only. The other direction
//! may stay fast. The
//! codes are `enum fo_hold` of bpf/flow.h; what holds a direction is
//! decided by the sources in `engine::holds`, pure per direction.

use std::fmt;

use crate::dataplane::fo_hold;

use super::Direction;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    Xfrm,
    IngressHook,
    EgressHook,
    /// Not seen forwarded by the kernel since the connection was taken off
    /// the fast path (`policy::verdict::Known`): evidence is per direction.
    Dormant,
    /// Arrives by XDP; its output cannot take XDP redirects
    /// (`policy::xdp::target`).
    XdpTarget,
}

impl Hold {
    pub const ALL: [Hold; 5] = [Hold::Xfrm, Hold::IngressHook, Hold::EgressHook, Hold::Dormant, Hold::XdpTarget];

    pub fn code(self) -> u8 {
        let c = match self {
            Hold::Xfrm => fo_hold::FO_HOLD_XFRM,
            Hold::IngressHook => fo_hold::FO_HOLD_INGRESS_HOOK,
            Hold::EgressHook => fo_hold::FO_HOLD_EGRESS_HOOK,
            Hold::Dormant => fo_hold::FO_HOLD_DORMANT,
            Hold::XdpTarget => fo_hold::FO_HOLD_XDP_TARGET,
        };
        c.0 as u8
    }

    pub fn from_code(c: u8) -> Option<Hold> {
        Hold::ALL.into_iter().find(|h| h.code() == c)
    }

    /// The fast path's counter for packets of a held direction (`status`).
    pub fn as_str(self) -> &'static str {
        match self {
            Hold::Xfrm => "held_xfrm",
            Hold::IngressHook => "held_ingress_hook",
            Hold::EgressHook => "held_egress_hook",
            Hold::Dormant => "held_dormant",
            Hold::XdpTarget => "held_xdp_target",
        }
    }
}

/// A hold and its cause in one line, naming the device, chain, filter or
/// policy and, where there is one, the remedy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Held {
    pub hold: Hold,
    pub why: String,
}

impl Held {
    /// A direction still dormant (`Hold::Dormant`).
    pub fn dormant() -> Held {
        Held {
            hold: Hold::Dormant,
            why: "not seen forwarded by the kernel yet (a new UDP connection's first packets) or since the \
                  connection left the fast path (idle, route, link or ruleset change); the other direction was: the \
                  kernel keeps this one until one of its own packets is seen leaving"
                .into(),
        }
    }
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.why)
    }
}

impl Direction {
    pub fn hold(&self) -> Option<Hold> {
        Hold::from_code(self.val.hold)
    }

    pub fn set_hold(&mut self, h: Option<Hold>) {
        self.val.hold = h.map_or(fo_hold::FO_HOLD_NONE.0 as u8, Hold::code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{fo_flow, fo_flow_key};

    /// Rust and flow.h agree on every code, and "none" is the zeroed entry.
    #[test]
    fn codes_are_flow_h_s() {
        let mut d = Direction { key: fo_flow_key::default(), val: fo_flow::default(), route_ifindex: 0 };
        assert_eq!(d.hold(), None);
        for h in Hold::ALL {
            d.set_hold(Some(h));
            assert_eq!(d.hold(), Some(h));
            assert_ne!(d.val.hold, 0);
        }
        d.set_hold(None);
        assert_eq!(d.val.hold, 0);
        let names: Vec<&str> = crate::dataplane::STAT_NAMES.to_vec();
        for h in Hold::ALL {
            assert!(names.contains(&h.as_str()), "{} is a fast-path counter", h.as_str());
        }
    }
}
