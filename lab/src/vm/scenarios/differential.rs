//! The differential harness: the same frames through the kernel's own
//! flowtable and through nft-offload, the frames leaving the router
//! captured on both sides and compared byte for byte. The kernel is the
//! oracle, not a model of ours.
//!
//! The router (the lab's, reconfigured): LAN untagged on `rlan` and VLAN 10
//! on `rlan.10`, WAN untagged on `rwan` and VLAN 7 on `rwan.7`; the
//! flowtable lists the Ethernet devices (`{ rlan, rwan }`) so both paths
//! take tags on and off in the fast path. The endpoints are addresses no
//! namespace owns: the router has static neighbours for them, the lab's
//! client and server namespaces only inject frames (AF_PACKET) and capture
//! what arrives; a netdev chain drops everything after the capture, so
//! their own stacks never answer.
//!
//! Connections: IPv4 TCP and UDP masqueraded (the source port stays, so
//! every run chooses the same), IPv4 TCP and UDP port-forwarded (DNAT),
//! IPv6 TCP and UDP routed; each over one of the four tagged/untagged
//! combinations. Each is set up by a real handshake through the router,
//! then offloaded; then the seeded random frames go through, both
//! directions: TTL / hop limit (1 to 255), DSCP/ECN, IP ID and DF, IPv6 flow
//! label, payload from 1 byte to the MTU, IPv4 options, IPv6 extension
//! headers, TCP flags, VLAN PCP, UDP checksum zero.
//!
//! TCP segments carry ACK with any of PSH, URG, ECE, CWR, now and then a
//! SYN; after all of them each TCP connection is closed by a FIN or an RST
//! from either end (what would follow a close is conntrack's state
//! machine, which both hand to the kernel alike).
//!
//! Runs: the kernel flowtable (the reference), the kernel without a
//! flowtable (`plain`: the same ruleset without `flow add`), the engine in
//! TC mode, in XDP mode, and the kernel flowtable again: the two flowtable
//! runs must be identical, which shows the harness itself is deterministic.
//! Every difference of an engine run is either gone or explained: in
//! [`EXPLAINED`] with the kernel function behind it, or because the kernel
//! without offload, the authority, sends exactly the engine's frame where
//! its flowtable sends another (a frame only the flowtable sent that the
//! kernel without it did not send either, and a frame only the engine sent
//! that it did). The VLAN devices map priorities to PCPs
//! (`egress-qos-map`), and some short frames arrive with Ethernet padding:
//! there the flowtable differs from its kernel (it sends the priority the
//! skb arrived with, and the padding). An unexplained difference fails.
//! Every difference is listed in `differential-<kernel>-<mode>.txt` beside
//! the results.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{step, Ctx, Evidence, Offload};
use crate::frames::{CLIENT_MAC, RTR_LAN_MAC, RTR_WAN_MAC, SERVER_MAC};
use crate::lab::{Lab, LabOpts};
use crate::vm::capture::{inject, xdp_pass, Capture};
use crate::Daemon;

/// Frames per engine run in CI (`NFO_VM_DIFF_FRAMES` or `--diff-frames`
/// for more).
pub const DEFAULT_FRAMES: u32 = 10_000;

/// Connections per kind (masquerade, port forward, IPv6) and protocol.
const PER_KIND: u16 = 4;

/// Frames a second each endpoint sends: what a debug-build capture and a
/// veth's 256-frame NAPI ring keep up with under TCG on a busy machine (a
/// run that loses any outside the router is run again, see `run_valid`).
const PPS: u32 = 700;

/// A small deterministic PRNG (xorshift64*), seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// LAN client -> WAN server, masqueraded.
    Masq,
    /// WAN client -> the router's WAN address, port-forwarded to a LAN host.
    PortForward,
    /// IPv6, routed.
    Routed6,
}

/// One connection and its addresses as each side's frames carry them.
#[derive(Debug, Clone)]
struct Conn {
    kind: Kind,
    tcp: bool,
    lan_tag: Option<u16>,
    wan_tag: Option<u16>,
    lan_ip: IpAddr,
    lan_port: u16,
    /// The WAN peer: the server (masquerade, IPv6) or the remote client
    /// (port forward).
    wan_ip: IpAddr,
    wan_port: u16,
    /// The router's address on the WAN side (masquerade source, port
    /// forward destination).
    rtr_wan_ip: IpAddr,
    /// The port on the router's WAN address (masquerade: the client's,
    /// kept; port forward: the forwarded one).
    rtr_port: u16,
}

impl Conn {
    /// (src, sport, dst, dport) of a frame the LAN side sends: the LAN
    /// host opening (masquerade, IPv6) or answering (port forward) speaks
    /// to the WAN host directly.
    fn lan_sends(&self) -> (IpAddr, u16, IpAddr, u16) {
        (self.lan_ip, self.lan_port, self.wan_ip, self.wan_port)
    }
    /// ... and one the WAN side sends: to the router's address (masquerade
    /// reply, port forward) or to the LAN host (IPv6, routed).
    fn wan_sends(&self) -> (IpAddr, u16, IpAddr, u16) {
        match self.kind {
            Kind::Masq | Kind::PortForward => (self.wan_ip, self.wan_port, self.rtr_wan_ip, self.rtr_port),
            Kind::Routed6 => (self.wan_ip, self.wan_port, self.lan_ip, self.lan_port),
        }
    }
    /// The side that opens the connection: LAN for masquerade and IPv6,
    /// WAN for the port forward.
    fn opener_is_lan(&self) -> bool {
        self.kind != Kind::PortForward
    }
}

fn conns() -> Vec<Conn> {
    let mut v = Vec::new();
    let tags = [(None, None), (Some(10), None), (None, Some(7)), (Some(10), Some(7))];
    for kind in [Kind::Masq, Kind::PortForward, Kind::Routed6] {
        for tcp in [false, true] {
            for i in 0..PER_KIND {
                let n = v.len() as u16;
                let (lan_tag, wan_tag) = tags[usize::from(i) % tags.len()];
                let host = 100 + n;
                let (lan_ip, wan_ip, rtr_wan_ip): (IpAddr, IpAddr, IpAddr) = match kind {
                    Kind::Routed6 => (
                        Ipv6Addr::new(0xfd00, if lan_tag.is_some() { 0x10 } else { 1 }, 0, 0, 0, 0, 0, host).into(),
                        Ipv6Addr::new(0xfd00, if wan_tag.is_some() { 7 } else { 2 }, 0, 0, 0, 0, 0, host).into(),
                        Ipv6Addr::UNSPECIFIED.into(),
                    ),
                    _ => (
                        Ipv4Addr::new(192, 168, if lan_tag.is_some() { 10 } else { 1 }, host as u8).into(),
                        if wan_tag.is_some() {
                            Ipv4Addr::new(198, 51, 100, host as u8).into()
                        } else {
                            Ipv4Addr::new(203, 0, 113, host as u8).into()
                        },
                        if wan_tag.is_some() {
                            Ipv4Addr::new(198, 51, 100, 1).into()
                        } else {
                            Ipv4Addr::new(203, 0, 113, 1).into()
                        },
                    ),
                };
                let lan_port = 20000 + n;
                let (wan_port, rtr_port) = match kind {
                    Kind::PortForward => (30000 + n, 8000 + n),
                    _ => (40000 + n, lan_port),
                };
                v.push(Conn { kind, tcp, lan_tag, wan_tag, lan_ip, lan_port, wan_ip, wan_port, rtr_wan_ip, rtr_port });
            }
        }
    }
    v
}

/// What the ruleset forwards to the LAN hosts of the port forwards.
fn dnat_rules(cs: &[Conn]) -> String {
    cs.iter()
        .filter(|c| c.kind == Kind::PortForward)
        .map(|c| {
            format!(
                "\t\tip daddr {} {} dport {} dnat ip to {}:{}\n",
                c.rtr_wan_ip,
                if c.tcp { "tcp" } else { "udp" },
                c.rtr_port,
                c.lan_ip,
                c.lan_port
            )
        })
        .collect()
}

/// The router's ruleset; without `flow add` for the kernel without a
/// flowtable.
fn ruleset(cs: &[Conn], flow_add: bool) -> String {
    format!(
        r#"add table inet fw4
delete table inet fw4
table inet fw4 {{
	counter fwd_all {{
	}}

	flowtable ft {{
		hook ingress priority 0
		devices = {{ "rlan", "rwan" }}
	}}

	chain forward {{
		type filter hook forward priority filter; policy drop;
		counter name "fwd_all"
{flow}		ct state invalid drop
		ct state {{ established, related }} accept
		meta l4proto {{ icmp, ipv6-icmp }} accept
		iifname {{ "rlan", "rlan.10" }} oifname {{ "rwan", "rwan.7" }} accept
		ct status dnat accept
	}}

	chain dstnat {{
		type nat hook prerouting priority dstnat; policy accept;
{dnat}	}}

	chain srcnat {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname {{ "rwan", "rwan.7" }} meta nfproto ipv4 masquerade
	}}
}}
"#,
        dnat = dnat_rules(cs),
        flow = if flow_add { "\t\tmeta l4proto { tcp, udp } flow add @ft\n" } else { "" }
    )
}

/// RFC 1071 sum, folded.
fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut b = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            b.extend(s.octets());
            b.extend(d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            b.extend(s.octets());
            b.extend(d.octets());
        }
        _ => unreachable!("one family"),
    }
    b.extend([0, proto]);
    b.extend((len as u16).to_be_bytes());
    if len > 0xffff {
        unreachable!("no jumbograms here");
    }
    b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum()
}

/// Everything a test frame varies.
#[derive(Debug, Clone, Default)]
struct Shape {
    ttl: u8,
    tos: u8,
    ip_id: u16,
    df: bool,
    flow_label: u32,
    /// IPv4 options (a multiple of 4 bytes) or IPv6 extension headers.
    ext: Vec<u8>,
    /// IPv6: the next-header chain of `ext` (first header's type).
    ext_first: u8,
    tcp_flags: u8,
    seq: u32,
    ack: u32,
    udp_csum_zero: bool,
    pcp: u8,
    payload: Vec<u8>,
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;

struct Macs {
    lan_host: [u8; 6],
    wan_host: [u8; 6],
    rlan: [u8; 6],
    rwan: [u8; 6],
}

/// One frame of `c` sent from the LAN side (`from_lan`) or the WAN side.
fn frame(c: &Conn, from_lan: bool, s: &Shape, m: &Macs) -> Vec<u8> {
    let (src, sport, dst, dport) = if from_lan { c.lan_sends() } else { c.wan_sends() };
    let (smac, dmac, tag) = if from_lan { (m.lan_host, m.rlan, c.lan_tag) } else { (m.wan_host, m.rwan, c.wan_tag) };
    let proto = if c.tcp { 6u8 } else { 17u8 };
    // L4
    let mut l4 = Vec::new();
    l4.extend(sport.to_be_bytes());
    l4.extend(dport.to_be_bytes());
    if c.tcp {
        l4.extend(s.seq.to_be_bytes());
        l4.extend(s.ack.to_be_bytes());
        l4.extend([0x50, s.tcp_flags]);
        l4.extend(64240u16.to_be_bytes());
        l4.extend([0, 0, 0, 0]); // checksum, urgent pointer
    } else {
        l4.extend(((8 + s.payload.len()) as u16).to_be_bytes());
        l4.extend([0, 0]);
    }
    l4.extend(&s.payload);
    let ck_at = if c.tcp { 16 } else { 6 };
    let ck = csum(&l4, pseudo_sum(src, dst, proto, l4.len()));
    let ck = if !c.tcp && ck == 0 { 0xffff } else { ck };
    let ck = if !c.tcp && s.udp_csum_zero && src.is_ipv4() { 0 } else { ck };
    l4[ck_at..ck_at + 2].copy_from_slice(&ck.to_be_bytes());
    // L3
    let mut l3 = Vec::new();
    match (src, dst) {
        (IpAddr::V4(sa), IpAddr::V4(da)) => {
            let ihl = 5 + s.ext.len() / 4;
            l3.push(0x40 | ihl as u8);
            l3.push(s.tos);
            l3.extend(((ihl * 4 + l4.len()) as u16).to_be_bytes());
            l3.extend(s.ip_id.to_be_bytes());
            l3.extend(if s.df { [0x40, 0] } else { [0, 0] });
            l3.extend([s.ttl, proto, 0, 0]);
            l3.extend(sa.octets());
            l3.extend(da.octets());
            l3.extend(&s.ext);
            let hc = csum(&l3, 0);
            l3[10..12].copy_from_slice(&hc.to_be_bytes());
        }
        (IpAddr::V6(sa), IpAddr::V6(da)) => {
            let vtcfl: u32 = (6 << 28) | (u32::from(s.tos) << 20) | (s.flow_label & 0xfffff);
            l3.extend(vtcfl.to_be_bytes());
            l3.extend(((s.ext.len() + l4.len()) as u16).to_be_bytes());
            l3.push(if s.ext.is_empty() { proto } else { s.ext_first });
            l3.push(s.ttl);
            l3.extend(sa.octets());
            l3.extend(da.octets());
            l3.extend(&s.ext);
        }
        _ => unreachable!("one family"),
    }
    let mut f = Vec::new();
    f.extend(dmac);
    f.extend(smac);
    if let Some(vid) = tag {
        f.extend([0x81, 0x00]);
        f.extend(((u16::from(s.pcp) << 13) | vid).to_be_bytes());
    }
    f.extend(if src.is_ipv4() { [0x08, 0x00] } else { [0x86, 0xdd] });
    f.extend(l3);
    f.extend(l4);
    f
}

/// IPv4 options: NOPs and End, Record Route (the router writes itself in:
/// ip_forward_options), Router Alert; padded to 4 bytes.
fn v4_options(r: &mut Rng) -> Vec<u8> {
    let mut o = Vec::new();
    match r.below(3) {
        0 => o.extend([1, 1, 1, 0]),
        1 => {
            // Record Route with room for 2 addresses: type, len, pointer.
            o.extend([7, 11, 4]);
            o.extend([0u8; 8]);
            o.push(0);
        }
        _ => o.extend([148, 4, 0, 0]),
    }
    o
}

/// IPv6 extension headers before the transport: Hop-by-Hop and/or
/// Destination Options, each 8 bytes of PadN. Returns (bytes, first type).
fn v6_ext(r: &mut Rng, proto: u8) -> (Vec<u8>, u8) {
    let hbh = |next: u8| vec![next, 0, 1, 4, 0, 0, 0, 0];
    match r.below(3) {
        0 => (hbh(proto), 0),
        1 => (hbh(proto), 60),
        _ => {
            let mut v = hbh(60);
            v.extend(hbh(proto));
            (v, 0)
        }
    }
}

/// The fields every frame draws at random: DSCP/ECN, IP ID, DF, flow
/// label, PCP, TCP sequence and acknowledgement numbers.
fn random_fields(r: &mut Rng) -> Shape {
    Shape {
        tos: r.next() as u8,
        ip_id: r.next() as u16,
        df: r.chance(50),
        flow_label: r.next() as u32 & 0xfffff,
        pcp: r.below(8) as u8,
        seq: r.next() as u32,
        ack: r.next() as u32,
        ..Default::default()
    }
}

/// One side's frames: from the LAN side, from the WAN side.
type Sides = (Vec<Vec<u8>>, Vec<Vec<u8>>);

/// The seeded frames of one run, each side's in sending order: the body,
/// then the closing FIN/RST frames, which are sent only once both sides
/// have sent their whole body (a close followed by more frames of the
/// connection would test conntrack's state machine, not forwarding).
fn test_frames(cs: &[Conn], n: u32, seed: u64, m: &Macs) -> (Sides, Sides) {
    let mut r = Rng(seed | 1);
    let (mut lan, mut wan) = (Vec::new(), Vec::new());
    for i in 0..n {
        let c = &cs[r.below(cs.len() as u64) as usize];
        let from_lan = r.chance(50);
        let v4 = c.lan_ip.is_ipv4();
        let hdr = if v4 { 20 } else { 40 } + if c.tcp { 20 } else { 8 };
        let ttl = match r.below(10) {
            0 => r.below(3) as u8, // 0, 1, 2: expiry and its edge
            1 => 255,
            _ => 2 + r.below(254) as u8,
        };
        let mut s = Shape { ttl, udp_csum_zero: r.chance(15), ..random_fields(&mut r) };
        if r.chance(8) {
            if v4 {
                s.ext = v4_options(&mut r);
            } else {
                let (e, first) = v6_ext(&mut r, if c.tcp { 6 } else { 17 });
                s.ext = e;
                s.ext_first = first;
            }
        }
        if c.tcp {
            // An established connection's segments: ACK, with any of PSH,
            // URG, ECE, CWR. FIN, RST and SYN come after all of these, each
            // as its connection's last frame (below): what follows them is
            // conntrack's state machine (a SYN it ignores leaves state that
            // judges the next segments), not forwarding.
            s.tcp_flags =
                [TCP_PSH, TCP_URG, TCP_ECE, TCP_CWR].iter().filter(|_| r.chance(40)).fold(TCP_ACK, |a, b| a | b);
        }
        // Payload: 1 byte to what fills the MTU, extremes often; it starts
        // with the frame's number so every frame (and what the router makes
        // of it) is unique.
        let max = 1500 - hdr - s.ext.len();
        let len = match r.below(8) {
            0 => 1 + r.below(3) as usize,
            1 => max,
            2 => max - r.below(4) as usize,
            _ => 1 + r.below(max as u64) as usize,
        };
        let mut p = i.to_be_bytes().to_vec();
        p.extend(r.bytes(len.saturating_sub(4)));
        p.truncate(len);
        if len < 4 {
            // Too short to carry the number: the IP ID / flow label do.
            s.ip_id = i as u16;
            s.flow_label = i & 0xfffff;
        }
        s.payload = p;
        let mut f = frame(c, from_lan, &s, m);
        // Half the frames under Ethernet's 60-byte minimum arrive padded
        // to it, as a NIC sends them, with bytes that need not be zero.
        if f.len() < 60 && r.chance(50) {
            f.extend(r.bytes(60 - f.len()));
        }
        if from_lan {
            lan.push(f);
        } else {
            wan.push(f);
        }
    }
    // Then every TCP connection gets its last frame from one of its ends:
    // a FIN (with data), an RST, or a SYN (a new attempt on a connection
    // the router has as established).
    let body = (std::mem::take(&mut lan), std::mem::take(&mut wan));
    for (k, c) in cs.iter().filter(|c| c.tcp).enumerate() {
        let from_lan = r.chance(50);
        let mut p = (n + k as u32).to_be_bytes().to_vec();
        let extra = r.below(200) as usize;
        p.extend(r.bytes(extra));
        let ttl = 2 + r.below(254) as u8;
        let s = Shape {
            ttl,
            tcp_flags: match k % 3 {
                0 => TCP_FIN | TCP_ACK | TCP_PSH,
                1 => TCP_RST | TCP_ACK,
                _ => TCP_SYN,
            },
            payload: if k % 3 == 0 { p } else { Vec::new() },
            ..random_fields(&mut r)
        };
        let f = frame(c, from_lan, &s, m);
        if from_lan {
            lan.push(f);
        } else {
            wan.push(f);
        }
    }
    (body, (lan, wan))
}

/// One run: a fresh lab, the offloader, the connections set up and
/// offloaded, the test frames sent; the frames each side received.
struct RunOut {
    lan: Vec<Vec<u8>>,
    wan: Vec<Vec<u8>>,
    engine: Option<serde_json::Value>,
    /// Frames lost outside the router during the test frames ([`wire_drops`]).
    dropped: u64,
}

/// Frames dropped on the way that no offloader chose to drop: the veth
/// pairs' drops (a full NAPI ring or backlog: veth_xmit counts them on the
/// sender, the receiver as rx_dropped) and the backlog queues' drops
/// (/proc/net/softnet_stat, second column). A run during which any grew
/// measured the machine, not the router.
fn wire_drops(lab: &Lab) -> Result<u64> {
    let mut total = lab.veth_drops()?;
    let softnet = std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
    total += softnet
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|v| u64::from_str_radix(v, 16).ok()))
        .sum::<u64>();
    Ok(total)
}

/// Who forwards in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// The kernel with its flowtable: the reference.
    Flowtable,
    /// The kernel without one (no `flow add`): the authority where the
    /// flowtable and it differ.
    Plain,
    /// nft-offload, in this mode.
    Engine(Offload),
}

impl Who {
    fn as_str(self) -> &'static str {
        match self {
            Who::Flowtable => "kernel",
            Who::Plain => "plain",
            Who::Engine(o) => o.as_str(),
        }
    }
}

/// The VLAN devices' egress QoS map (priority:PCP): every priority a
/// forwarded packet can get has a PCP of its own, and 0 is not 0, so a
/// tag written without the map shows.
const EGRESS_QOS: [(u32, u16); 4] = [(0, 1), (2, 3), (4, 5), (6, 7)];

/// [`run_once`], again (up to three times) when the machine dropped frames
/// on the way: those runs compare nothing.
fn run_valid(how: Who, n: u32, seed: u64, ev: &mut Evidence) -> Result<RunOut> {
    let mut why = String::new();
    for attempt in 0..3 {
        match run_once(how, n, seed) {
            Ok(r) if r.dropped == 0 => {
                if attempt > 0 {
                    ev.put(&format!("{}_retries", how.as_str()), attempt);
                }
                return Ok(r);
            }
            Ok(r) => why = format!("{} frames dropped by the veths or backlogs", r.dropped),
            Err(e) if format!("{e:#}").contains("dropped") => why = format!("{e:#}"),
            Err(e) => return Err(e),
        }
        step(&format!("differential: {} run invalid ({why}), again", how.as_str()));
    }
    bail!("three {} runs in a row lost frames outside the router ({why}): the machine is too busy", how.as_str())
}

fn run_once(how: Who, n: u32, seed: u64) -> Result<RunOut> {
    let lab = Lab::up(&LabOpts {
        prefix: format!("df{}{}", how.as_str(), seed % 1000),
        xdp_safe: false,
        isolate_router_cpu: false,
    })?;
    let cs = conns();
    let (rtr, lan_ns, wan_ns) = (lab.rtr.clone(), lab.lan.clone(), lab.wan.clone());
    lab.exec(&rtr, &["modprobe", "8021q"])?;
    // Fixed MACs: every run's frames must be the same bytes (a lab's veths
    // get random ones).
    let macs = Macs { lan_host: CLIENT_MAC, wan_host: SERVER_MAC, rlan: RTR_LAN_MAC, rwan: RTR_WAN_MAC };
    let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    for (ns, dev, m) in [
        (&lan_ns, "lan0", macs.lan_host),
        (&wan_ns, "wan0", macs.wan_host),
        (&rtr, "rlan", macs.rlan),
        (&rtr, "rwan", macs.rwan),
    ] {
        lab.exec(ns, &["ip", "link", "set", "dev", dev, "address", &mac(m)])?;
    }
    // One `ip -batch` (each ip process costs ~0.2 s under TCG).
    let qos: Vec<String> = EGRESS_QOS.iter().map(|(p, c)| format!("{p}:{c}")).collect();
    let qos = qos.join(" ");
    let mut script = format!(
        "link add link rlan name rlan.10 type vlan id 10 egress-qos-map {qos}\n\
         link add link rwan name rwan.7 type vlan id 7 egress-qos-map {qos}\n\
         addr add 192.168.10.1/24 dev rlan.10\n\
         addr add fd00:10::1/64 dev rlan.10 nodad\n\
         addr add 198.51.100.1/24 dev rwan.7\n\
         addr add fd00:7::1/64 dev rwan.7 nodad\n\
         link set rlan.10 up\n\
         link set rwan.7 up\n",
    );
    // The endpoints are static neighbours: nobody answers ARP or ND for them.
    for c in &cs {
        let lan_dev = if c.lan_tag.is_some() { "rlan.10" } else { "rlan" };
        let wan_dev = if c.wan_tag.is_some() { "rwan.7" } else { "rwan" };
        script += &format!("neigh replace {} lladdr {} dev {lan_dev} nud permanent\n", c.lan_ip, mac(macs.lan_host));
        script += &format!("neigh replace {} lladdr {} dev {wan_dev} nud permanent\n", c.wan_ip, mac(macs.wan_host));
    }
    lab.exec_stdin(&rtr, &["ip", "-batch", "-"], &script)?;
    // The engine serves tagged traffic in XDP only where tags stay in the
    // frame; a veth peer that inserts them in hardware (txvlan) hands them
    // over in the skb's metadata instead, which 6.1 cannot read. The
    // endpoints inject whole frames (AF_PACKET), tags inline, whatever
    // this says; it is turned off in every run alike, as the engine's
    // remedy says.
    for (ns, dev) in [(&lan_ns, "lan0"), (&wan_ns, "wan0")] {
        let _ = lab.exec(ns, &["ethtool", "-K", dev, "txvlan", "off", "tx-vlan-stag-hw-insert", "off"]);
    }
    // The endpoints' own stacks stay silent: no IPv6 of their own, and a
    // netdev chain drops what arrives (after the capture has seen it).
    for (ns, dev) in [(&lan_ns, "lan0"), (&wan_ns, "wan0")] {
        crate::lab::netns::sysctl(ns, &[("net.ipv6.conf.all.disable_ipv6", "1")])?;
        lab.exec_stdin(
            ns,
            &["nft", "-f", "-"],
            &format!("table netdev quiet {{\n chain in {{\n type filter hook ingress device {dev} priority 0; policy drop;\n }}\n}}\n"),
        )?;
        xdp_pass(ns, dev)?;
    }
    let file = std::env::temp_dir().join(format!("{}-fw4.nft", lab.prefix));
    std::fs::write(&file, ruleset(&cs, how != Who::Plain))?;
    let f = file.to_str().context("path")?;
    let d = match how {
        Who::Flowtable | Who::Plain => {
            lab.exec(&rtr, &["nft", "-f", f])?;
            None
        }
        Who::Engine(o) => Some(Daemon::start_raw(&lab, &["--nft", f, "--mode", o.as_str()])?),
    };
    // Window tracking liberal (the test frames carry random sequence
    // numbers) in both kinds of run alike. No ICMP rate limits: which
    // errors a token bucket lets through depends on timing
    // (icmpv4_xrlim_allow, icmp_global_allow), and every run must send all.
    crate::lab::netns::sysctl(
        &rtr,
        &[
            ("net.netfilter.nf_conntrack_tcp_be_liberal", "1"),
            ("net.netfilter.nf_conntrack_tcp_loose", "1"),
            ("net.ipv4.icmp_ratelimit", "0"),
            ("net.ipv4.icmp_msgs_per_sec", "1000000"),
            ("net.ipv4.icmp_msgs_burst", "1000000"),
            ("net.ipv6.icmp.ratelimit", "0"),
        ],
    )?;
    step("differential: handshakes");
    handshakes(&lab, &cs, &macs)?;
    if how != Who::Plain {
        wait_offloaded(&lab, cs.len(), d.as_ref())?;
    }
    step("differential: frames");
    let (body, closing) = test_frames(&cs, n, seed, &macs);
    let drops0 = wire_drops(&lab)?;
    let cap_lan = Capture::start(&lan_ns, "lan0")?;
    let cap_wan = Capture::start(&wan_ns, "wan0")?;
    for (lan_frames, wan_frames) in [body, closing] {
        let a = inject(&lan_ns, "lan0", lan_frames, PPS)?;
        let b = inject(&wan_ns, "wan0", wan_frames, PPS)?;
        a.join().map_err(|_| anyhow::anyhow!("injector panicked"))??;
        b.join().map_err(|_| anyhow::anyhow!("injector panicked"))??;
        std::thread::sleep(Duration::from_millis(500));
    }
    // Only what the router addressed to the endpoints: its own multicast
    // (MLD reports, ...) comes at times of its own.
    let to = |frames: Vec<Vec<u8>>, mac: [u8; 6]| -> Vec<Vec<u8>> {
        frames.into_iter().filter(|f| f.len() > 14 && f[..6] == mac).collect()
    };
    let (lan, wan) = (to(cap_lan.stop()?, macs.lan_host), to(cap_wan.stop()?, macs.wan_host));
    let dropped = wire_drops(&lab)? - drops0;
    let engine = match d {
        Some(d) => {
            let st = d.status()?;
            d.stop()?;
            Some(st)
        }
        None => None,
    };
    let _ = std::fs::remove_file(&file);
    Ok(RunOut { lan, wan, engine, dropped })
}

/// Open every connection through the router (the kernel path), so each is
/// ESTABLISHED and ASSURED in conntrack: UDP one datagram each way; TCP
/// SYN, SYN-ACK, ACK and a segment each way. Sides alternate in rounds.
fn handshakes(lab: &Lab, cs: &[Conn], m: &Macs) -> Result<()> {
    let base = Shape { ttl: 64, payload: b"hello".to_vec(), ..Default::default() };
    let rounds: &[(bool, u8)] = &[
        (true, TCP_SYN),
        (false, TCP_SYN | TCP_ACK),
        (true, TCP_ACK),
        (true, TCP_ACK | TCP_PSH),
        (false, TCP_ACK | TCP_PSH),
    ];
    for (k, (opener, flags)) in rounds.iter().enumerate() {
        let (mut lan, mut wan) = (Vec::new(), Vec::new());
        for c in cs {
            if !c.tcp && k > 1 {
                continue;
            }
            let from_lan = *opener == c.opener_is_lan();
            let s = Shape {
                tcp_flags: *flags,
                seq: 1000 + k as u32,
                ack: 1,
                payload: if c.tcp && *flags & TCP_PSH == 0 { Vec::new() } else { base.payload.clone() },
                ..base.clone()
            };
            let f = frame(c, from_lan, &s, m);
            if from_lan {
                lan.push(f);
            } else {
                wan.push(f);
            }
        }
        for (ns, dev, frames) in [(&lab.lan, "lan0", lan), (&lab.wan, "wan0", wan)] {
            if !frames.is_empty() {
                inject(ns, dev, frames, 0)?.join().map_err(|_| anyhow::anyhow!("injector panicked"))??;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

fn wait_offloaded(lab: &Lab, n: usize, d: Option<&Daemon>) -> Result<()> {
    let start = Instant::now();
    loop {
        let have = match d {
            None => lab.exec(&lab.rtr, &["conntrack", "-L"]).map(|o| o.matches("[OFFLOAD]").count()).unwrap_or(0),
            Some(d) => d.flows().map(|f| f.len()).unwrap_or(0),
        };
        if have >= n {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            let ct = lab.exec(&lab.rtr, &["conntrack", "-L"]).unwrap_or_default();
            bail!("{have} of {n} connections offloaded after 20 s; conntrack:\n{ct}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A frame's bytes with what the router makes up per run blanked: the IP
/// ID and header checksum of an ICMP error the router itself sends
/// (ip_select_ident hashes a per-boot secret with a counter, so two runs
/// never agree; icmp_send builds the header). Nothing else is touched.
fn normalize(f: &[u8]) -> Vec<u8> {
    let mut f = f.to_vec();
    let mut l3 = 12;
    while f.len() > l3 + 2 && matches!(u16::from_be_bytes([f[l3], f[l3 + 1]]), 0x8100 | 0x88a8) {
        l3 += 4;
    }
    let ip = l3 + 2;
    if f.len() >= ip + 20 && f[l3..ip] == [0x08, 0x00] && f[ip + 9] == 1 {
        let ihl = usize::from(f[ip] & 0xf) * 4;
        let icmp_type = f.get(ip + ihl).copied().unwrap_or(0);
        if matches!(icmp_type, 3 | 11 | 12) {
            f[ip + 4] = 0;
            f[ip + 5] = 0;
            f[ip + 10] = 0;
            f[ip + 11] = 0;
        }
    }
    f
}

/// Frames of `a` not in `b` (as multisets).
fn missing(a: &[Vec<u8>], b: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut count: BTreeMap<&[u8], i64> = BTreeMap::new();
    for f in b {
        *count.entry(f).or_default() += 1;
    }
    let mut out = Vec::new();
    for f in a {
        let c = count.entry(f).or_default();
        if *c > 0 {
            *c -= 1;
        } else {
            out.push(f.clone());
        }
    }
    out
}

/// The differences between a reference run and another, per side:
/// (frames only the reference sent, frames only the other sent).
struct Diff {
    only_ref: Vec<Vec<u8>>,
    only_other: Vec<Vec<u8>>,
}

fn diff(r: &RunOut, o: &RunOut) -> Diff {
    let norm = |v: &[Vec<u8>]| v.iter().map(|f| normalize(f)).collect::<Vec<_>>();
    let (rl, rw, ol, ow) = (norm(&r.lan), norm(&r.wan), norm(&o.lan), norm(&o.wan));
    let mut only_ref = missing(&rl, &ol);
    only_ref.extend(missing(&rw, &ow));
    let mut only_other = missing(&ol, &rl);
    only_other.extend(missing(&ow, &rw));
    Diff { only_ref, only_other }
}

/// Differences written down: a name, the kernel behaviour that explains
/// them, and a test that recognizes one (frame only the reference sent,
/// frame only the other sent — either may be absent).
type Explain = fn(Option<&[u8]>, Option<&[u8]>) -> bool;

const EXPLAINED: &[(&str, &str, Explain)] = &[
    (
        "tcp_syn_on_an_offloaded_connection",
        "A SYN on an established, offloaded connection that only the kernel flowtable forwarded: its fast path \
     forwards it (nf_flow_state_check tears a flow down on FIN/RST only), while nft-offload hands every SYN \
     to the kernel (FO_SLOW_TCP_SYN), where conntrack's tcp_packet may ignore a SYN in ESTABLISHED \
     (TCP_CONNTRACK_IGNORE: no conntrack entry for that packet) and the ruleset's `ct state invalid drop` \
     drops it, as the kernel does without any offload. Seen on 6.1; 6.12 forwarded the same frames both ways.",
        |r, o| o.is_none() && r.is_some_and(|f| tcp_flags(f).is_some_and(|fl| fl & TCP_SYN != 0)),
    ),
    (
        "router_reset_answering_an_ignored_syn",
        "The SYN above, when addressed to the router's own WAN address (a port forward, or the reply side of a \
     masquerade): a packet conntrack found invalid is not NATed (nf_nat_inet_fn needs a conntrack entry), so \
     it is delivered to the router itself and its TCP answers with a reset (tcp_v4_send_reset), as the kernel \
     does without any offload.",
        |r, o| {
            r.is_none()
                && o.is_some_and(|f| {
                    let from_router = l3_l4(f).is_some_and(|(ip, _, _)| {
                        f[ip] >> 4 == 4
                            && (f[ip + 12..ip + 16] == [203, 0, 113, 1] || f[ip + 12..ip + 16] == [198, 51, 100, 1])
                    });
                    from_router && tcp_flags(f).is_some_and(|fl| fl & TCP_RST != 0)
                })
        },
    ),
];

/// The TCP flags of a frame, if it is TCP.
fn tcp_flags(f: &[u8]) -> Option<u8> {
    let (_, proto, l4) = l3_l4(f)?;
    (proto == 6).then(|| f.get(l4 + 13).copied()).flatten()
}

/// (offset of the IP header, transport protocol, offset of the transport
/// header) of a frame, past VLAN tags and IPv6 extension headers.
fn l3_l4(f: &[u8]) -> Option<(usize, u8, usize)> {
    let mut at = 12;
    while f.len() >= at + 4 && matches!(u16::from_be_bytes([f[at], f[at + 1]]), 0x8100 | 0x88a8) {
        at += 4;
    }
    let ip = at + 2;
    match u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]) {
        0x0800 if f.len() >= ip + 20 => Some((ip, f[ip + 9], ip + usize::from(f[ip] & 0xf) * 4)),
        0x86dd if f.len() >= ip + 40 => {
            let (mut nh, mut l4) = (f[ip + 6], ip + 40);
            while matches!(nh, 0 | 60) && f.len() >= l4 + 8 {
                nh = f[l4];
                l4 += (usize::from(f[l4 + 1]) + 1) * 8;
            }
            Some((ip, nh, l4))
        }
        _ => None,
    }
}

/// Pair the frames only one side sent by their payload (the frame number
/// in it), and name each pair's first differing byte's field.
fn describe(d: &Diff) -> Vec<String> {
    let key = |f: &[u8]| -> Vec<u8> { f[f.len().saturating_sub(12)..].to_vec() };
    let mut by_key: BTreeMap<Vec<u8>, &Vec<u8>> = BTreeMap::new();
    for f in &d.only_other {
        by_key.insert(key(f), f);
    }
    let mut out = Vec::new();
    for f in &d.only_ref {
        match by_key.remove(&key(f)) {
            Some(o) => {
                let at = f.iter().zip(o.iter()).position(|(a, b)| a != b).unwrap_or(f.len().min(o.len()));
                out.push(format!(
                    "{}: differs at byte {at}: ref {} / engine {}",
                    decode(f),
                    hex(&f[at.saturating_sub(4)..(at + 8).min(f.len())]),
                    hex(&o[at.saturating_sub(4)..(at + 8).min(o.len())])
                ));
            }
            None => out.push(format!("only the kernel sent: {}", decode(f))),
        }
    }
    for o in by_key.values() {
        out.push(format!("only the engine sent: {}", decode(o)));
    }
    out
}

/// What a frame is, for a difference's report: tags, addresses, ports,
/// TTL, TCP flags, and the frame number its payload starts with.
fn decode(f: &[u8]) -> String {
    let mut at = 12;
    let mut tags = Vec::new();
    while f.len() >= at + 4 && matches!(u16::from_be_bytes([f[at], f[at + 1]]), 0x8100 | 0x88a8) {
        let tci = u16::from_be_bytes([f[at + 2], f[at + 3]]);
        tags.push(format!("vid {} pcp {}", tci & 0xfff, tci >> 13));
        at += 4;
    }
    let et = f.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]])).unwrap_or(0);
    let ip = at + 2;
    let (src, dst, ttl, proto, l4) = match et {
        0x0800 if f.len() >= ip + 20 => {
            let ihl = usize::from(f[ip] & 0xf) * 4;
            let a = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]).to_string();
            (a(ip + 12), a(ip + 16), f[ip + 8], f[ip + 9], ip + ihl)
        }
        0x86dd if f.len() >= ip + 40 => {
            let a = |o: usize| {
                let b: [u8; 16] = f[o..o + 16].try_into().expect("16 bytes");
                Ipv6Addr::from(b).to_string()
            };
            // Skip extension headers (8-byte PadN ones here).
            let (mut nh, mut l4) = (f[ip + 6], ip + 40);
            while matches!(nh, 0 | 60) && f.len() >= l4 + 8 {
                nh = f[l4];
                l4 += (usize::from(f[l4 + 1]) + 1) * 8;
            }
            (a(ip + 8), a(ip + 24), f[ip + 7], nh, l4)
        }
        _ => return format!("ethertype {et:#06x}, {} bytes", f.len()),
    };
    let port = |o: usize| f.get(o..o + 2).map(|b| u16::from_be_bytes([b[0], b[1]])).unwrap_or(0);
    let (flags, data) = match proto {
        6 => (format!(" flags {:#04x}", f.get(l4 + 13).copied().unwrap_or(0)), l4 + 20),
        17 => (String::new(), l4 + 8),
        p => return format!("{tags:?} {src} -> {dst} ttl {ttl} proto {p}, {} bytes", f.len()),
    };
    let n = f.get(data..data + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    format!(
        "#{} {tags:?} {src}:{} -> {dst}:{} {} ttl {ttl}{flags}, {} bytes",
        n.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
        port(l4),
        port(l4 + 2),
        if proto == 6 { "tcp" } else { "udp" },
        f.len()
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether a frame carries bytes after its IP packet (Ethernet padding).
fn padded(f: &[u8]) -> bool {
    let Some((ip, _, _)) = l3_l4(f) else { return false };
    let len = match f[ip] >> 4 {
        4 => usize::from(u16::from_be_bytes([f[ip + 2], f[ip + 3]])),
        _ => 40 + usize::from(u16::from_be_bytes([f[ip + 4], f[ip + 5]])),
    };
    f.len() > ip + len
}

/// What a frame on which the flowtable and the kernel without it disagree
/// shows: its padding, a tag's PCP, or something else.
fn kind_of(f: &[u8]) -> &'static str {
    if padded(f) || f.len() < 60 {
        "padding"
    } else if matches!(u16::from_be_bytes([f[12], f[13]]), 0x8100 | 0x88a8) {
        "pcp"
    } else {
        "other"
    }
}

/// Count what `d` shows: (explained by name, unexplained descriptions). A
/// frame only the engine sent is explained when the kernel without offload
/// (`plain`'s frames) sent it too, one only the flowtable sent when that
/// kernel did not send it either: there the two kernels disagree and the
/// one without offload is the authority.
fn judge(d: &Diff, plain: &RunOut) -> (BTreeMap<String, u64>, Vec<String>) {
    let mut explained: BTreeMap<String, u64> = BTreeMap::new();
    let mut rest = Diff { only_ref: Vec::new(), only_other: Vec::new() };
    let mut plain_frames: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    for f in plain.lan.iter().chain(&plain.wan) {
        *plain_frames.entry(normalize(f)).or_default() += 1;
    }
    for f in &d.only_ref {
        if let Some((n, _, _)) = EXPLAINED.iter().find(|(_, _, t)| t(Some(f), None)) {
            *explained.entry(n.to_string()).or_default() += 1;
        } else if !plain_frames.contains_key(f) {
            *explained.entry(format!("only_the_flowtable_sends:{}", kind_of(f))).or_default() += 1;
        } else {
            rest.only_ref.push(f.clone());
        }
    }
    for f in &d.only_other {
        if let Some((n, _, _)) = EXPLAINED.iter().find(|(_, _, t)| t(None, Some(f))) {
            *explained.entry(n.to_string()).or_default() += 1;
        } else if plain_frames.get_mut(f).is_some_and(|c| *c > 0) {
            *plain_frames.get_mut(f).expect("counted") -= 1;
            *explained.entry(format!("as_the_kernel_without_offload:{}", kind_of(f))).or_default() += 1;
        } else {
            rest.only_other.push(f.clone());
        }
    }
    (explained, describe(&rest))
}

pub fn run(ctx: &Ctx, ev: &mut Evidence) -> Result<()> {
    let n = ctx.diff_frames;
    let seed = 0x5eed_0000 + u64::from(n) + if ctx.kernel == crate::vm::Kernel::Linux6_1 { 61 } else { 612 };
    ev.put("frames", n);
    ev.put("seed", format!("{seed:#x}"));
    step("differential: kernel reference");
    let reference = run_valid(Who::Flowtable, n, seed, ev)?;
    ev.put("kernel_out", (reference.lan.len() + reference.wan.len()) as u64);
    step("differential: the kernel without its flowtable");
    let plain = run_valid(Who::Plain, n, seed, ev)?;
    let d = diff(&reference, &plain);
    ev.put("kernel_vs_plain_differences", (d.only_ref.len() + d.only_other.len()) as u64);
    let mut unexplained_all = Vec::new();
    for how in [Offload::Tc, Offload::Xdp] {
        step(&format!("differential: {}", how.as_str()));
        let other = run_valid(Who::Engine(how), n, seed, ev)?;
        let d = diff(&reference, &other);
        let (explained, unexplained) = judge(&d, &plain);
        let tag = how.as_str();
        ev.put(&format!("{tag}_out"), (other.lan.len() + other.wan.len()) as u64);
        ev.put(&format!("{tag}_differences"), (d.only_ref.len() + d.only_other.len()) as u64);
        ev.put(&format!("{tag}_explained"), serde_json::to_value(&explained)?);
        ev.put(&format!("{tag}_unexplained"), unexplained.len() as u64);
        if let Some(st) = &other.engine {
            ev.put(&format!("{tag}_fast_path_packets"), st["fast_path_packets"].clone());
        }
        ev.put(&format!("{tag}_unexplained_first"), unexplained.iter().take(6).cloned().collect::<Vec<_>>());
        // Every difference, for whoever has to explain them.
        let report = ctx.out_dir.join(format!("differential-{}-{tag}.txt", ctx.kernel.series()));
        let mut text = format!("{} frames, seed {seed:#x}; unexplained:\n", n);
        for u in &unexplained {
            text += &format!("{u}\n");
        }
        text += &format!("explained: {explained:?}\n");
        let _ = std::fs::write(&report, text);
        if let Some(st) = &other.engine {
            ev.put(&format!("{tag}_slow_path"), st["slow_path"].clone());
        }
        for u in unexplained.iter().take(8) {
            unexplained_all.push(format!("{tag}: {u}"));
        }
    }
    // The harness itself: the kernel again must give the same frames.
    step("differential: kernel again");
    let again = run_valid(Who::Flowtable, n, seed, ev)?;
    let d = diff(&reference, &again);
    ev.put("kernel_vs_kernel_differences", (d.only_ref.len() + d.only_other.len()) as u64);
    if !d.only_ref.is_empty() || !d.only_other.is_empty() {
        bail!("the kernel flowtable did not repeat itself: {:?}", describe(&d).iter().take(8).collect::<Vec<_>>());
    }
    if !unexplained_all.is_empty() {
        bail!("unexplained differences:\n{}", unexplained_all.join("\n"));
    }
    Ok(())
}
