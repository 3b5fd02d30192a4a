//! The directional flow entries the fast path matches on. Like the kernel
//! flowtable (`flow_offload_fill_dir`, net/netfilter/nf_flow_table_core.c)
//! each connection is two entries: the original direction matches the
//! conntrack original tuple and is rewritten to the inverse of the reply
//! tuple; the reply direction the other way round.

use std::net::IpAddr;

use crate::conntrack::CtTuple;
use crate::dataplane::skel::types::{fo_encap, fo_flow, fo_flow_flag, fo_flow_key};
// Re-exported for the modules that imported the families from here.
pub use crate::proto::{AF_INET, AF_INET6};

/// `enum fo_flow_flag` (bpf/flow.h) as the one-byte `fo_flow.flags` holds it.
pub const FO_F_SNAT: u8 = flag_bit(fo_flow_flag::FO_F_SNAT);
pub const FO_F_DNAT: u8 = flag_bit(fo_flow_flag::FO_F_DNAT);
pub const FO_F_XDP_OK: u8 = flag_bit(fo_flow_flag::FO_F_XDP_OK);
pub const FO_F_L3_OUT: u8 = flag_bit(fo_flow_flag::FO_F_L3_OUT);
pub const FO_F_CT_REFRESH: u8 = flag_bit(fo_flow_flag::FO_F_CT_REFRESH);
pub const FO_F_CT_REPLY: u8 = flag_bit(fo_flow_flag::FO_F_CT_REPLY);

/// Fails the build if flow.h grows a flag that no longer fits the field.
const fn flag_bit(f: fo_flow_flag) -> u8 {
    assert!(f.0 != 0 && f.0 <= u8::MAX as u32, "fo_flow.flags is one byte");
    f.0 as u8
}

/// Where a direction's packets leave, as the kernel's FIB and neighbour
/// table say (from `bpf_fib_lookup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub mtu: u16,
    pub xdp_ok: bool,
}

/// One header between Ethernet and IP (`struct fo_encap`): a VLAN tag or a
/// PPPoE session. Both fields in host order here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Encap {
    /// ETH_P_8021Q, ETH_P_8021AD or ETH_P_PPP_SES.
    pub proto: u16,
    /// VLAN id or PPPoE session id.
    pub id: u16,
}

/// Up to FO_ENCAP_MAX headers, outermost first (`flow_offload_tuple.encap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncapStack {
    len: u8,
    hdr: [Encap; EncapStack::CAP],
}

impl EncapStack {
    /// FO_ENCAP_MAX (bpf/flow.h); a test checks it against the map layout.
    pub const CAP: usize = 2;

    /// Append below the headers already there; false when full.
    pub fn push(&mut self, e: Encap) -> bool {
        let Some(slot) = self.hdr.get_mut(usize::from(self.len)) else { return false };
        *slot = e;
        self.len += 1;
        true
    }

    pub fn as_slice(&self) -> &[Encap] {
        &self.hdr[..usize::from(self.len)]
    }

    pub fn from_map(n: u8, hdr: &[fo_encap; EncapStack::CAP]) -> Self {
        let mut s = EncapStack::default();
        for h in hdr.iter().take(usize::from(n)) {
            s.push(Encap { proto: u16::from_be(h.proto), id: h.id });
        }
        s
    }

    fn to_map(self) -> (u8, [fo_encap; EncapStack::CAP]) {
        let mut out = [fo_encap::default(); EncapStack::CAP];
        for (o, e) in out.iter_mut().zip(self.as_slice()) {
            *o = fo_encap { proto: e.proto.to_be(), id: e.id };
        }
        (self.len, out)
    }
}

impl std::fmt::Display for EncapStack {
    /// "untagged", "VLAN 7 + PPPoE 0x1a2b", "802.1ad 100 + VLAN 7".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.len == 0 {
            return f.write_str("untagged");
        }
        for (i, e) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" + ")?;
            }
            match e.proto {
                0x8100 => write!(f, "VLAN {}", e.id)?,
                0x88a8 => write!(f, "802.1ad {}", e.id)?,
                0x8864 => write!(f, "PPPoE {:#x}", e.id)?,
                p => write!(f, "ethertype {p:#06x} id {}", e.id)?,
            }
        }
        Ok(())
    }
}

/// What the devices between the FIB's and the fast path's ports add to a
/// direction (`topology::Topology::egress`): the headers its frames arrive
/// with and the MAC they are addressed to, the headers to push on the way
/// out, and whether the egress has no link-layer header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkLayer {
    pub in_encap: EncapStack,
    /// All zero when the input has no link-layer header.
    pub in_dmac: [u8; 6],
    /// The PPPoE concentrator's MAC when the frames arrive in a PPPoE
    /// session (the only source `pppoe_rcv` takes them from); zero
    /// otherwise.
    pub in_smac: [u8; 6],
    pub out_encap: EncapStack,
    /// The PCP per priority of each tag of `out_encap`, in its order
    /// (`fo_flow.out_pcp`, `topology::VlanQos::egress`).
    pub out_pcp: [u16; EncapStack::CAP],
    pub l3_out: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Direction {
    pub key: fo_flow_key,
    pub val: fo_flow,
    /// The device the FIB names for this direction's packets (br-lan,
    /// wan.7, pppoe-wan), before the walk down to the port it leaves by
    /// (`val.out_ifindex`): the kernel's `skb_dst(skb)->dev`, which xfrm
    /// selectors are matched against. Not in the map.
    pub route_ifindex: u32,
}

/// Address as the four 32-bit words of the map layout (network order in
/// memory; IPv4 in word 0).
pub fn addr_words(a: IpAddr) -> [u32; 4] {
    let mut w = [0u32; 4];
    match a {
        IpAddr::V4(v4) => w[0] = u32::from_ne_bytes(v4.octets()),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            for (i, c) in o.chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    w
}

pub fn words_addr(family: u8, w: &[u32; 4]) -> IpAddr {
    let mut b = [0u8; 16];
    for (i, x) in w.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&x.to_ne_bytes());
    }
    if family == AF_INET {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(b)
    }
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// One's-complement difference of replacing `old` by `new` (RFC 1624):
/// the sum of ~old and new as 16-bit words loaded from memory, folded.
/// Zero when nothing changes, so the fast path can skip the update.
pub fn csum_diff(old: &[u8], new: &[u8]) -> u16 {
    assert_eq!(old.len(), new.len());
    assert!(old.len().is_multiple_of(2));
    let mut sum: u64 = 0;
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        sum += u64::from(!u16::from_ne_bytes([o[0], o[1]]));
        sum += u64::from(u16::from_ne_bytes([n[0], n[1]]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if sum == 0xffff {
        0
    } else {
        sum as u16
    }
}

/// Build the entry for packets that arrive on `in_ifindex` looking like
/// `seen` and must leave looking like the inverse of `other` (the tuple of
/// the opposite direction).
pub fn build_direction(seen: &CtTuple, other: &CtTuple, in_ifindex: u32, nh: &NextHop) -> Direction {
    let family = if seen.src.is_ipv4() { AF_INET } else { AF_INET6 };
    let key = fo_flow_key {
        ifindex: in_ifindex,
        family,
        proto: seen.proto,
        sport: seen.sport.to_be(),
        dport: seen.dport.to_be(),
        saddr: addr_words(seen.src),
        daddr: addr_words(seen.dst),
        ..Default::default()
    };
    // After NAT this direction's packet carries the reverse of the other
    // direction's tuple.
    let (nsrc, ndst, nsport, ndport) = (other.dst, other.src, other.dport, other.sport);

    let mut old_addrs = addr_bytes(seen.src);
    old_addrs.extend(addr_bytes(seen.dst));
    let mut new_addrs = addr_bytes(nsrc);
    new_addrs.extend(addr_bytes(ndst));
    let pseudo = csum_diff(&old_addrs, &new_addrs);
    let old_ports = [seen.sport.to_be_bytes(), seen.dport.to_be_bytes()].concat();
    let new_ports = [nsport.to_be_bytes(), ndport.to_be_bytes()].concat();
    let ports = csum_diff(&old_ports, &new_ports);

    let mut flags = 0u8;
    if seen.src != nsrc || seen.sport != nsport {
        flags |= FO_F_SNAT;
    }
    if seen.dst != ndst || seen.dport != ndport {
        flags |= FO_F_DNAT;
    }
    if nh.xdp_ok {
        flags |= FO_F_XDP_OK;
    }
    let val = fo_flow {
        new_saddr: addr_words(nsrc),
        new_daddr: addr_words(ndst),
        new_sport: nsport.to_be(),
        new_dport: ndport.to_be(),
        csum_l3: if family == AF_INET { pseudo } else { 0 },
        csum_l4_pseudo: pseudo,
        csum_l4_ports: ports,
        out_ifindex: nh.ifindex,
        mtu: nh.mtu,
        flags,
        dmac: nh.dmac,
        smac: nh.smac,
        ..Default::default()
    };
    Direction { key, val, route_ifindex: nh.ifindex }
}

impl Direction {
    /// This direction with its link layer: keyed by the headers it arrives
    /// with, so a tagged and an untagged frame are different flows.
    pub fn with_link(mut self, l: &LinkLayer) -> Direction {
        (self.key.encap_num, self.key.encap) = l.in_encap.to_map();
        (self.val.out_encap_num, self.val.out_encap) = l.out_encap.to_map();
        self.val.in_dmac = l.in_dmac;
        self.val.in_smac = l.in_smac;
        self.val.out_pcp = l.out_pcp;
        if l.l3_out {
            self.val.flags |= FO_F_L3_OUT;
        }
        self
    }

    /// The headers this direction arrives with and leaves with.
    pub fn encap(&self) -> (EncapStack, EncapStack) {
        (
            EncapStack::from_map(self.key.encap_num, &self.key.encap),
            EncapStack::from_map(self.val.out_encap_num, &self.val.out_encap),
        )
    }
}

/// What a packet of direction `d` looks like when the kernel forwards it:
/// the tuple after NAT. TC egress watches dormant connections by this key
/// (fo_dormant in bpf/maps.h), so only a packet the kernel let through
/// wakes one. The interface is left out (0): the watcher runs on every
/// managed interface, and after a route change the kernel may send the
/// connection out of another one; the verdict resolves the path again
/// before anything is offloaded. Conntrack keeps tuples after NAT unique
/// (a clash is remapped or dropped), so the key names one connection.
pub fn egress_key(d: &Direction) -> fo_flow_key {
    fo_flow_key {
        ifindex: 0,
        family: d.key.family,
        proto: d.key.proto,
        sport: d.val.new_sport,
        dport: d.val.new_dport,
        saddr: d.val.new_saddr,
        daddr: d.val.new_daddr,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::key_bytes;
    use crate::flow::tests::{tcp_masq, tuple};
    use crate::proto::IPPROTO_TCP;

    /// Full Internet checksum over `data`, for checking the incremental one.
    fn csum(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 { [c[0], c[1]] } else { [c[0], 0] };
            s += u32::from(u16::from_ne_bytes(w));
        }
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    fn apply(check: u16, diff: u16) -> u16 {
        let mut s = u32::from(!check) + u32::from(diff);
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn incremental_equals_full_recompute() {
        // A fake header: 4 address bytes + 2 port bytes + payload.
        let old = [192u8, 168, 1, 2, 0x9c, 0x40, 1, 2, 3, 4];
        let new = [203u8, 0, 113, 1, 0x9c, 0x40, 1, 2, 3, 4];
        let d = csum_diff(&old[..4], &new[..4]);
        assert_eq!(apply(csum(&old), d), csum(&new));
        assert_eq!(csum_diff(&old, &old), 0);
        // many random replacements
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let mut a = [0u8; 20];
            let mut b = [0u8; 20];
            for i in 0..20 {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                a[i] = (x >> 16) as u8;
                b[i] = a[i];
            }
            for v in b.iter_mut().take(8) {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                *v = (x >> 8) as u8;
            }
            let d = csum_diff(&a[..8], &b[..8]);
            let got = apply(csum(&a), d);
            let want = csum(&b);
            // 0x0000 and 0xffff are the same one's-complement value
            assert!(got == want || (got ^ want) == 0xffff, "{got:#x} {want:#x}");
        }
    }

    fn nh(ifindex: u32) -> NextHop {
        NextHop { ifindex, smac: [2, 0, 0, 0, 0, 1], dmac: [2, 0, 0, 0, 0, 2], mtu: 1500, xdp_ok: false }
    }

    #[test]
    fn flag_bits_are_flow_h_s() {
        let c = [
            fo_flow_flag::FO_F_SNAT,
            fo_flow_flag::FO_F_DNAT,
            fo_flow_flag::FO_F_XDP_OK,
            fo_flow_flag::FO_F_L3_OUT,
            fo_flow_flag::FO_F_CT_REFRESH,
            fo_flow_flag::FO_F_CT_REPLY,
        ];
        let rust = [FO_F_SNAT, FO_F_DNAT, FO_F_XDP_OK, FO_F_L3_OUT, FO_F_CT_REFRESH, FO_F_CT_REPLY];
        for (c, r) in c.iter().zip(rust) {
            assert_eq!(c.0, u32::from(r));
            assert!(r.is_power_of_two(), "{r:#x} is one bit");
        }
        assert_eq!(rust.iter().fold(0, |a, b| a | b).count_ones(), 6, "distinct bits");
    }

    #[test]
    fn link_layer_goes_into_key_and_value() {
        let k = fo_flow_key::default();
        assert_eq!(k.encap.len(), EncapStack::CAP, "FO_ENCAP_MAX");
        let e = tcp_masq();
        let plain = build_direction(&e.orig, &e.reply, 3, &nh(4));
        let mut in_encap = EncapStack::default();
        assert!(in_encap.push(Encap { proto: 0x8100, id: 7 }));
        assert!(in_encap.push(Encap { proto: 0x8864, id: 0x1a2b }));
        assert!(!in_encap.push(Encap { proto: 0x8100, id: 8 }), "full at FO_ENCAP_MAX");
        let mut out_encap = EncapStack::default();
        out_encap.push(Encap { proto: 0x88a8, id: 100 });
        let l = LinkLayer {
            in_encap,
            in_dmac: [2, 0, 0, 0, 0, 9],
            in_smac: [2, 0, 0, 0, 0, 8],
            out_encap,
            out_pcp: [0o7531, 0],
            l3_out: true,
        };
        let d = plain.with_link(&l);
        assert_eq!(d.val.in_smac, [2, 0, 0, 0, 0, 8], "the concentrator's MAC");
        assert_eq!(d.val.out_pcp, [0o7531, 0], "the tags' PCP per priority");
        assert_eq!(d.key.encap_num, 2);
        assert_eq!((d.key.encap[0].proto, d.key.encap[0].id), (0x8100u16.to_be(), 7), "proto big-endian, id host");
        assert_eq!((d.key.encap[1].proto, d.key.encap[1].id), (0x8864u16.to_be(), 0x1a2b));
        assert_eq!((d.val.out_encap_num, d.val.out_encap[1].proto), (1, 0), "unused slot zero");
        assert_eq!(d.val.in_dmac, [2, 0, 0, 0, 0, 9]);
        assert_eq!(d.val.flags & FO_F_L3_OUT, FO_F_L3_OUT);
        assert_eq!(d.encap(), (in_encap, out_encap), "read back");
        assert_eq!(in_encap.to_string(), "VLAN 7 + PPPoE 0x1a2b");
        assert_eq!(
            (out_encap.to_string(), EncapStack::default().to_string()),
            ("802.1ad 100".into(), "untagged".into())
        );
        assert_ne!(key_bytes(&d.key), key_bytes(&plain.key), "a tagged flow is another flow");
        assert_eq!(plain.with_link(&LinkLayer::default()).val.flags, plain.val.flags);
    }

    #[test]
    fn masquerade_both_directions() {
        let e = tcp_masq();
        let o = build_direction(&e.orig, &e.reply, 3, &nh(4));
        assert_eq!(o.key.ifindex, 3);
        assert_eq!(o.key.sport, 40000u16.to_be());
        assert_eq!(words_addr(AF_INET, &o.key.saddr), "192.168.1.2".parse::<IpAddr>().unwrap());
        // original direction leaves with the router's address as source
        assert_eq!(words_addr(AF_INET, &o.val.new_saddr), "203.0.113.1".parse::<IpAddr>().unwrap());
        assert_eq!(words_addr(AF_INET, &o.val.new_daddr), "203.0.113.2".parse::<IpAddr>().unwrap());
        assert_eq!(o.val.flags & (FO_F_SNAT | FO_F_DNAT), FO_F_SNAT);
        assert_eq!(o.val.out_ifindex, 4);
        assert_ne!(o.val.csum_l3, 0);
        assert_eq!(o.val.csum_l4_ports, 0);

        let r = build_direction(&e.reply, &e.orig, 4, &nh(3));
        assert_eq!(words_addr(AF_INET, &r.key.daddr), "203.0.113.1".parse::<IpAddr>().unwrap());
        assert_eq!(words_addr(AF_INET, &r.val.new_daddr), "192.168.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(r.val.flags & (FO_F_SNAT | FO_F_DNAT), FO_F_DNAT);
    }

    #[test]
    fn egress_key_is_the_packet_as_it_leaves() {
        let e = tcp_masq();
        let o = build_direction(&e.orig, &e.reply, 3, &nh(4));
        let k = egress_key(&o);
        assert_eq!((k.ifindex, k.family, k.proto, k.encap_num), (0, AF_INET, IPPROTO_TCP, 0));
        // masqueraded: the router's address, the server's port
        assert_eq!(words_addr(AF_INET, &k.saddr), "203.0.113.1".parse::<IpAddr>().unwrap());
        assert_eq!(words_addr(AF_INET, &k.daddr), "203.0.113.2".parse::<IpAddr>().unwrap());
        assert_eq!((k.sport, k.dport), (e.reply.dport.to_be(), e.reply.sport.to_be()));
        // the reply leaves on the LAN side towards the client, un-NATed
        let r = build_direction(&e.reply, &e.orig, 4, &nh(3));
        let k = egress_key(&r);
        assert_eq!(words_addr(AF_INET, &k.daddr), "192.168.1.2".parse::<IpAddr>().unwrap());
        assert_eq!((k.sport, k.dport), (e.orig.dport.to_be(), e.orig.sport.to_be()));
        // routed, no NAT: the tuple it arrived with
        let orig = tuple("fd00:1::2", 40000, "fd00:2::2", 5201, IPPROTO_TCP);
        let reply = tuple("fd00:2::2", 5201, "fd00:1::2", 40000, IPPROTO_TCP);
        let d = build_direction(&orig, &reply, 3, &nh(4));
        assert_eq!(key_bytes(&egress_key(&d)), key_bytes(&fo_flow_key { ifindex: 0, ..d.key }));
    }

    #[test]
    fn dnat_port_forward_rewrites_port() {
        let orig = tuple("198.51.100.7", 50000, "203.0.113.1", 8080, IPPROTO_TCP);
        let reply = tuple("192.168.1.2", 80, "198.51.100.7", 50000, IPPROTO_TCP);
        let o = build_direction(&orig, &reply, 4, &nh(3));
        assert_eq!(o.val.new_dport, 80u16.to_be());
        assert_eq!(o.val.new_sport, 50000u16.to_be());
        assert_ne!(o.val.csum_l4_ports, 0);
        let r = build_direction(&reply, &orig, 3, &nh(4));
        assert_eq!(r.val.new_sport, 8080u16.to_be());
        assert_eq!(words_addr(AF_INET, &r.val.new_saddr), "203.0.113.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn routed_ipv6_has_no_rewrite() {
        let orig = tuple("fd00:1::2", 40000, "fd00:2::2", 5201, IPPROTO_TCP);
        let reply = tuple("fd00:2::2", 5201, "fd00:1::2", 40000, IPPROTO_TCP);
        let o = build_direction(&orig, &reply, 3, &nh(4));
        assert_eq!(o.key.family, AF_INET6);
        assert_eq!(o.val.flags & (FO_F_SNAT | FO_F_DNAT), 0);
        assert_eq!(o.val.csum_l4_pseudo, 0);
        assert_eq!(o.val.csum_l4_ports, 0);
        assert_eq!(o.val.new_saddr, o.key.saddr);
    }
}
