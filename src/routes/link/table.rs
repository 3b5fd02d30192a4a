//! Every link in the calling thread's network namespace, from one rtnetlink
//! dump (RTM_GETLINK, NLM_F_DUMP), as typed records keyed by ifindex.
//!
//! rtnetlink answers for the namespace the socket was created in, which is
//! the calling thread's: right for a thread that entered another namespace,
//! where /sys/class/net would still show the one /sys was mounted in.
//! Records keep the relations between links (master, lower link, veth peer)
//! so paths through VLANs, bridges and tunnels can be walked from the table.

use std::collections::BTreeMap;
use std::io;

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    parse_string, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::link::{
    self as rt, LinkAttribute, LinkExtentMask, LinkFlags, LinkMessage, LinkXdp, XdpAttached,
};
use netlink_packet_route::RouteNetlinkMessage;

pub use netlink_packet_route::link::State as OperState;

/// A link another link points at (IFLA_LINK): a VLAN's or macvlan's lower
/// device, a veth's peer, a tunnel's underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkRef {
    pub ifindex: u32,
    /// IFLA_LINK_NETNSID: the index is valid in the namespace with this id
    /// (relative to ours), not in ours. None: it is one of ours.
    pub netnsid: Option<i32>,
}

/// How the XDP program(s) on a link are attached (IFLA_XDP_ATTACHED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// Native, in the driver.
    Driver,
    /// Generic (skb) XDP.
    Generic,
    /// Offloaded to the NIC.
    Hardware,
    /// More than one of the above at once.
    Multiple,
}

/// XDP programs attached to a link, by mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpProgs {
    pub mode: XdpMode,
    pub driver: Option<u32>,
    pub generic: Option<u32>,
    pub hardware: Option<u32>,
}

impl XdpProgs {
    /// The program that occupies the link's XDP hook: the native one first,
    /// since that is where nft-offload attaches.
    pub fn id(&self) -> Option<u32> {
        self.driver.or(self.generic).or(self.hardware)
    }
}

/// One link as rtnetlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    pub ifindex: u32,
    pub name: String,
    /// IFF_UP: administratively up.
    pub admin_up: bool,
    /// IFF_LOWER_UP: carrier.
    pub lower_up: bool,
    /// IFLA_OPERSTATE (RFC 2863).
    pub oper_state: OperState,
    /// IFLA_INFO_KIND ("veth", "bridge", "vlan", ...); None for hardware NICs.
    pub kind: Option<String>,
    /// IFLA_MASTER: the bridge or bond this link is a port of.
    pub master: Option<u32>,
    /// IFLA_LINK, when it names another link.
    pub link: Option<LinkRef>,
    pub mtu: u32,
    /// IFLA_QDISC: kind of the root egress qdisc ("noop" until the link has
    /// been up once).
    pub qdisc: Option<String>,
    /// IFLA_ADDRESS (6 bytes on Ethernet; empty when the link has none).
    pub mac: Vec<u8>,
    /// ARPHRD_* (1 = Ethernet, 772 = loopback, 65534 = none, ...).
    pub link_type: u16,
    /// None: no XDP program attached.
    pub xdp: Option<XdpProgs>,
}

impl LinkFacts {
    /// Up in the sense that matters for forwarding: admin up with carrier.
    pub fn up(&self) -> bool {
        self.admin_up && self.lower_up
    }

    fn from_message(m: &LinkMessage) -> Self {
        let mut f = LinkFacts {
            ifindex: m.header.index,
            name: String::new(),
            admin_up: m.header.flags.contains(LinkFlags::Up),
            lower_up: m.header.flags.contains(LinkFlags::LowerUp),
            oper_state: OperState::Unknown,
            kind: None,
            master: None,
            link: None,
            mtu: 0,
            qdisc: None,
            mac: Vec::new(),
            link_type: m.header.link_layer_type.into(),
            xdp: None,
        };
        let (mut netnsid, mut link) = (None, 0);
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => f.name = n.clone(),
                LinkAttribute::OperState(s) => f.oper_state = *s,
                LinkAttribute::LinkInfo(infos) => {
                    f.kind = infos.iter().find_map(|i| match i {
                        rt::LinkInfo::Kind(k) => Some(k.to_string()),
                        _ => None,
                    })
                }
                LinkAttribute::Controller(i) => f.master = Some(*i),
                LinkAttribute::Link(i) => link = *i,
                LinkAttribute::LinkNetNsId(id) => netnsid = Some(*id),
                LinkAttribute::Mtu(mtu) => f.mtu = *mtu,
                LinkAttribute::Qdisc(q) => f.qdisc = Some(q.clone()),
                LinkAttribute::Address(mac) => f.mac = mac.clone(),
                LinkAttribute::Xdp(x) => f.xdp = xdp_progs(x),
                _ => {}
            }
        }
        // The kernel sends IFLA_LINK only when it differs from the link
        // itself; 0 means "none" (e.g. a tunnel without underlay). In
        // another namespace the same index is another link (a veth pair
        // whose ends are both ifindex 2 in their namespaces).
        if link != 0 && (link != f.ifindex || netnsid.is_some()) {
            f.link = Some(LinkRef { ifindex: link, netnsid });
        }
        f
    }
}

fn xdp_progs(attrs: &[LinkXdp]) -> Option<XdpProgs> {
    let mut p = XdpProgs { mode: XdpMode::Driver, driver: None, generic: None, hardware: None };
    let mut single = None;
    for a in attrs {
        match a {
            LinkXdp::Attached(XdpAttached::Driver) => p.mode = XdpMode::Driver,
            LinkXdp::Attached(XdpAttached::SocketBuffer) => p.mode = XdpMode::Generic,
            LinkXdp::Attached(XdpAttached::Hardware) => p.mode = XdpMode::Hardware,
            LinkXdp::Attached(XdpAttached::Multiple) => p.mode = XdpMode::Multiple,
            LinkXdp::Attached(_) => return None,
            LinkXdp::ProgId(id) => single = Some(*id),
            LinkXdp::DrvProgId(id) => p.driver = Some(*id),
            LinkXdp::SkbProgId(id) => p.generic = Some(*id),
            LinkXdp::HwProgId(id) => p.hardware = Some(*id),
            _ => {}
        }
    }
    // Kernels report the per-mode id next to IFLA_XDP_PROG_ID; fill it in
    // from the latter should one only send that.
    if let (Some(id), None) = (single, p.id()) {
        match p.mode {
            XdpMode::Driver | XdpMode::Multiple => p.driver = Some(id),
            XdpMode::Generic => p.generic = Some(id),
            XdpMode::Hardware => p.hardware = Some(id),
        }
    }
    p.id().map(|_| p)
}

/// All links of a namespace, keyed by ifindex.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkTable {
    links: BTreeMap<u32, LinkFacts>,
    undecoded: Vec<Undecoded>,
}

/// Sequence number of the dump request; replies carry it back.
const DUMP_SEQ: u32 = 1;
const RTM_NEWLINK: u16 = 16;

impl LinkTable {
    /// Dump the calling thread's namespace. A dump the kernel marks as
    /// interrupted by a concurrent change (NLM_F_DUMP_INTR) is repeated.
    pub fn dump() -> Result<LinkTable> {
        for _ in 0..3 {
            if let (table, false) = dump_once().context("rtnetlink link dump")? {
                return Ok(table);
            }
        }
        bail!("rtnetlink link dump: interrupted by concurrent link changes three times in a row")
    }

    pub fn get(&self, ifindex: u32) -> Option<&LinkFacts> {
        self.links.get(&ifindex)
    }

    pub fn by_name(&self, name: &str) -> Option<&LinkFacts> {
        self.links.values().find(|l| l.name == name)
    }

    /// In ifindex order.
    pub fn iter(&self) -> impl Iterator<Item = &LinkFacts> {
        self.links.values()
    }

    /// Links whose attributes the decoder rejected, with their name read raw.
    pub fn undecoded(&self) -> &[Undecoded] {
        &self.undecoded
    }

    /// Take the replies in one datagram. Returns whether the dump is done,
    /// and sets `*intr` if a reply says it was interrupted.
    fn absorb(&mut self, mut datagram: &[u8], intr: &mut bool) -> Result<bool> {
        while !datagram.is_empty() {
            let nl = NetlinkBuffer::new_checked(datagram).map_err(|e| anyhow!("undecodable reply: {e}"))?;
            let (len, flags, seq, ty) = (nl.length() as usize, nl.flags(), nl.sequence_number(), nl.message_type());
            let msg = &datagram[..len];
            datagram = &datagram[len.next_multiple_of(4).min(datagram.len())..];
            if seq != DUMP_SEQ {
                continue;
            }
            *intr |= flags & NLM_F_DUMP_INTR != 0;
            let payload = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(msg) {
                Ok(m) => m.payload,
                // One link the decoder does not understand must not hide the others.
                Err(e) if ty == RTM_NEWLINK => {
                    self.undecoded.push(Undecoded::read(nl.payload(), e.to_string()));
                    continue;
                }
                Err(e) => bail!("undecodable reply: {e}"),
            };
            match payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                    let f = LinkFacts::from_message(&m);
                    self.links.insert(f.ifindex, f);
                }
                NetlinkPayload::Done(d) if d.code != 0 => return Err(io::Error::from_raw_os_error(d.code.abs()).into()),
                NetlinkPayload::Done(_) => return Ok(true),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io().into()),
                _ => {}
            }
        }
        Ok(false)
    }
}

/// A link in the dump whose attributes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecoded {
    pub ifindex: u32,
    /// IFLA_IFNAME, read without the decoder (empty if even that failed).
    pub name: String,
    pub error: String,
}

impl Undecoded {
    /// From the payload of an RTM_NEWLINK: struct ifinfomsg, then attributes.
    fn read(payload: &[u8], error: String) -> Self {
        const IFLA_IFNAME: u16 = 3;
        let ifindex = payload.get(4..8).map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        let name = NlasIterator::new(payload.get(16..).unwrap_or_default())
            .map_while(Result::ok)
            .find(|a| a.kind() == IFLA_IFNAME)
            .and_then(|a| parse_string(a.value()).ok())
            .unwrap_or_default();
        Undecoded { ifindex, name, error }
    }
}

/// One dump: the table and whether the kernel flagged it as interrupted.
fn dump_once() -> Result<(LinkTable, bool)> {
    let mut table = LinkTable::default();
    let mut intr = false;
    crate::routes::dump::exchange(&dump_request(), |datagram| table.absorb(datagram, &mut intr))?;
    Ok((table, intr))
}

fn dump_request() -> Vec<u8> {
    let mut get = LinkMessage::default();
    // Counters are not facts we need; leaving them out halves the dump.
    get.attributes.push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
    let mut msg = NetlinkMessage::new(NetlinkHeader::default(), RouteNetlinkMessage::GetLink(get).into());
    msg.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    msg.header.sequence_number = DUMP_SEQ;
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{DefaultNla, DoneMessage, NLM_F_MULTIPART};
    use netlink_packet_route::link::{InfoKind, LinkLayerType};

    fn link_msg(index: u32, flags: LinkFlags, attrs: Vec<LinkAttribute>) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = flags;
        m.header.link_layer_type = LinkLayerType::Ether;
        m.attributes = attrs;
        m
    }

    fn bytes(payload: NetlinkPayload<RouteNetlinkMessage>, seq: u32, flags: u16) -> Vec<u8> {
        let mut msg = NetlinkMessage::new(NetlinkHeader::default(), payload);
        msg.header.sequence_number = seq;
        msg.header.flags = flags;
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    fn new_link(m: LinkMessage) -> Vec<u8> {
        bytes(RouteNetlinkMessage::NewLink(m).into(), DUMP_SEQ, NLM_F_MULTIPART)
    }

    fn done(code: i32) -> Vec<u8> {
        let mut d = DoneMessage::default();
        d.code = code;
        bytes(NetlinkPayload::Done(d), DUMP_SEQ, NLM_F_MULTIPART)
    }

    fn veth(index: u32, name: &str, peer: u32, netnsid: Option<i32>) -> LinkMessage {
        let mut attrs = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Mtu(1500),
            LinkAttribute::Qdisc("noqueue".into()),
            LinkAttribute::OperState(OperState::Up),
            LinkAttribute::Link(peer),
            LinkAttribute::LinkInfo(vec![rt::LinkInfo::Kind(InfoKind::Veth)]),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, index as u8]),
        ];
        attrs.extend(netnsid.map(LinkAttribute::LinkNetNsId));
        link_msg(index, LinkFlags::Up | LinkFlags::LowerUp | LinkFlags::Running, attrs)
    }

    #[test]
    fn a_dump_becomes_typed_records_keyed_by_ifindex() {
        let eth = link_msg(
            2,
            LinkFlags::Up,
            vec![
                LinkAttribute::IfName("eth0".into()),
                LinkAttribute::Mtu(9000),
                LinkAttribute::Qdisc("mq".into()),
                LinkAttribute::OperState(OperState::Down),
                LinkAttribute::Controller(5),
                LinkAttribute::Xdp(vec![
                    LinkXdp::Attached(XdpAttached::Driver),
                    LinkXdp::DrvProgId(41),
                    LinkXdp::ProgId(41),
                ]),
            ],
        );
        let mut one = new_link(eth);
        one.extend(new_link(veth(3, "va", 4, None)));
        let mut two = new_link(veth(4, "vb", 3, None));
        two.extend(new_link(veth(6, "vx", 2, Some(0))));
        two.extend(done(0));

        let mut t = LinkTable::default();
        let mut intr = false;
        assert!(!t.absorb(&one, &mut intr).unwrap(), "no DONE yet");
        assert!(t.absorb(&two, &mut intr).unwrap());
        assert!(!intr);
        assert_eq!(t.iter().map(|l| l.ifindex).collect::<Vec<_>>(), [2, 3, 4, 6]);

        let e = t.by_name("eth0").unwrap();
        assert!(e.admin_up && !e.lower_up && !e.up(), "no carrier");
        assert_eq!((e.mtu, e.qdisc.as_deref(), e.kind.as_deref()), (9000, Some("mq"), None));
        assert_eq!((e.master, e.link, e.link_type), (Some(5), None, 1));
        assert_eq!(e.oper_state, OperState::Down);
        let x = e.xdp.unwrap();
        assert_eq!((x.mode, x.id()), (XdpMode::Driver, Some(41)));

        let va = t.get(3).unwrap();
        assert!(va.up());
        assert_eq!(va.kind.as_deref(), Some("veth"));
        assert_eq!(va.link, Some(LinkRef { ifindex: 4, netnsid: None }));
        assert_eq!(va.mac, [2, 0, 0, 0, 0, 3]);
        assert_eq!(va.xdp, None);
        assert_eq!(t.get(va.link.unwrap().ifindex).unwrap().name, "vb");
        assert_eq!(t.by_name("vx").unwrap().link, Some(LinkRef { ifindex: 2, netnsid: Some(0) }));
    }

    #[test]
    fn xdp_in_several_modes_reports_the_native_program() {
        let x = xdp_progs(&[LinkXdp::Attached(XdpAttached::Multiple), LinkXdp::SkbProgId(7), LinkXdp::DrvProgId(8)])
            .unwrap();
        assert_eq!((x.mode, x.id(), x.generic), (XdpMode::Multiple, Some(8), Some(7)));
        let g = xdp_progs(&[LinkXdp::Attached(XdpAttached::SocketBuffer), LinkXdp::ProgId(9)]).unwrap();
        assert_eq!((g.mode, g.generic, g.driver), (XdpMode::Generic, Some(9), None));
        assert_eq!(xdp_progs(&[LinkXdp::Attached(XdpAttached::None)]), None);
    }

    #[test]
    fn errors_interruptions_and_foreign_replies() {
        let mut t = LinkTable::default();
        let mut intr = false;
        let e = t.absorb(&done(-libc::EPERM), &mut intr).unwrap_err();
        assert_eq!(e.downcast_ref::<io::Error>().unwrap().raw_os_error(), Some(libc::EPERM));

        // A reply to another request is not ours to take.
        let mut other = bytes(RouteNetlinkMessage::NewLink(veth(3, "va", 4, None)).into(), 99, NLM_F_MULTIPART);
        other.extend(bytes(
            RouteNetlinkMessage::NewLink(veth(4, "vb", 3, None)).into(),
            DUMP_SEQ,
            NLM_F_MULTIPART | NLM_F_DUMP_INTR,
        ));
        assert!(!t.absorb(&other, &mut intr).unwrap());
        assert!(intr);
        assert_eq!(t.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["vb"]);

        assert!(t.absorb(&[0xff; 20], &mut intr).is_err(), "garbage is an error, not a panic");
    }

    #[test]
    fn a_link_the_decoder_rejects_is_kept_by_name_and_does_not_hide_the_others() {
        // IFLA_MTU (4) with two bytes instead of four.
        let bad = link_msg(
            9,
            LinkFlags::Up,
            vec![LinkAttribute::IfName("odd0".into()), LinkAttribute::Other(DefaultNla::new(4, vec![1, 2]))],
        );
        let mut d = new_link(bad);
        d.extend(new_link(veth(3, "va", 4, None)));
        d.extend(done(0));
        let mut t = LinkTable::default();
        assert!(t.absorb(&d, &mut false).unwrap());
        assert_eq!(t.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["va"]);
        let [u] = t.undecoded() else { panic!("{t:?}") };
        assert_eq!((u.ifindex, u.name.as_str()), (9, "odd0"));
        assert!(!u.error.is_empty());
    }

    #[test]
    fn the_request_is_a_link_dump_without_stats() {
        let req = dump_request();
        let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&req).unwrap();
        assert_eq!(m.header.flags, NLM_F_REQUEST | NLM_F_DUMP);
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(g)) = m.payload else { panic!("{m:?}") };
        assert_eq!(g.attributes, [LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats])]);
    }

    /// The live dump, in a fresh namespace with a veth pair: the peer
    /// relation, flags and qdiscs as the kernel reports them.
    #[test]
    fn the_live_dump_of_a_fresh_namespace() {
        // A dedicated thread: unshare moves only it (and what it spawns).
        std::thread::spawn(|| {
            // SAFETY: plain syscall, affects only this thread.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare(CLONE_NEWNET) needs root: {}", io::Error::last_os_error());
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("ip").args(args).status().expect("running ip");
                assert!(st.success(), "ip {args:?}");
            };
            ip(&["link", "add", "ta", "mtu", "1400", "type", "veth", "peer", "name", "tb"]);
            ip(&["link", "set", "ta", "up"]);
            let t = LinkTable::dump().unwrap();
            let mut names: Vec<&str> = t.iter().map(|l| l.name.as_str()).collect();
            names.sort();
            assert_eq!(names, ["lo", "ta", "tb"]);
            let lo = t.by_name("lo").unwrap();
            assert_eq!((lo.link_type, lo.kind.as_deref(), lo.link), (772, None, None), "ARPHRD_LOOPBACK");
            let (ta, tb) = (t.by_name("ta").unwrap(), t.by_name("tb").unwrap());
            assert_eq!(Some(ta.ifindex), super::super::ifindex("ta"));
            assert_eq!(ta.link, Some(LinkRef { ifindex: tb.ifindex, netnsid: None }));
            assert_eq!(tb.link, Some(LinkRef { ifindex: ta.ifindex, netnsid: None }));
            assert_eq!((ta.kind.as_deref(), ta.mtu, ta.mac.len(), ta.link_type), (Some("veth"), 1400, 6, 1));
            assert!(ta.admin_up && !ta.lower_up, "no carrier while the peer is down");
            assert_eq!(ta.qdisc.as_deref(), Some("noqueue"));
            assert_eq!(tb.qdisc.as_deref(), Some("noop"), "never up: no qdisc yet");
            assert!(!tb.admin_up && ta.xdp.is_none());
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    }
}
