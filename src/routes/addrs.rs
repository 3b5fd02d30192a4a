//! The router's own addresses, per interface (RTM_GETADDR dump), re-read
//! when an address changes. They tell whether a source-NATed direction
//! leaves where the kernel's masquerade put its source.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::Result;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::RouteNetlinkMessage;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AddressTable(BTreeSet<(u32, IpAddr)>);

impl AddressTable {
    pub fn dump() -> Result<Self> {
        let msgs = super::dump::dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()), "address")?;
        Ok(Self::from_messages(msgs.iter().filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => Some(a),
            _ => None,
        })))
    }

    pub fn from_messages<'a>(msgs: impl IntoIterator<Item = &'a AddressMessage>) -> Self {
        let mut t = AddressTable::default();
        for m in msgs {
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the
            // peer's on a point-to-point link, and the only one for IPv6.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(addr) {
                t.0.insert((m.header.index, ip));
            }
        }
        t
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (u32, IpAddr)>) -> Self {
        AddressTable(pairs.into_iter().collect())
    }

    /// `ip` is an address of interface `ifindex`.
    pub fn owns(&self, ifindex: u32, ip: IpAddr) -> bool {
        self.0.contains(&(ifindex, ip))
    }

    /// `ip` is an address of some interface of this router.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|&(_, a)| a == ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_wins_over_peer_address() {
        let msg = |index, attrs| {
            let mut m = AddressMessage::default();
            m.attributes = attrs;
            m.header.index = index;
            m
        };
        let ptp = msg(
            5,
            vec![
                AddressAttribute::Address("10.9.0.2".parse().unwrap()),
                AddressAttribute::Local("10.9.0.1".parse().unwrap()),
            ],
        );
        let v6 = msg(6, vec![AddressAttribute::Address("fd00:2::1".parse().unwrap())]);
        let t = AddressTable::from_messages([&ptp, &v6]);
        assert!(t.owns(5, "10.9.0.1".parse().unwrap()));
        assert!(!t.is_local("10.9.0.2".parse().unwrap()), "the peer's address is not ours");
        assert!(t.owns(6, "fd00:2::1".parse().unwrap()) && !t.owns(5, "fd00:2::1".parse().unwrap()));
    }

    #[test]
    fn loopback_is_in_this_namespace() {
        let t = AddressTable::dump().unwrap();
        assert!(t.owns(1, "127.0.0.1".parse().unwrap()), "{t:?}");
    }
}
