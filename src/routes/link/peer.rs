//! A veth's peer, wherever it is. Whether frames XDP redirects into a veth
//! arrive depends on the peer: `veth_xdp_xmit` (drivers/net/veth.c) queues
//! them on the peer's receive queue only while that queue has NAPI
//! (`rcu_access_pointer(rq->napi)`), which `veth_open` / `veth_set_features`
//! / `veth_xdp_set` give it while the peer is up with an XDP program or GRO;
//! otherwise the frames are dropped and counted only in the peer's stats.
//! And a VLAN device over the peer hands its tag over in the skb's metadata
//! while the peer has tx-vlan-hw-insert on (`vlan_dev_hard_start_xmit`
//! puts it there, `validate_xmit_vlan` pushes it into the frame only for a
//! device without the feature), where XDP on this end sees no tag.
//!
//! The peer is often in another namespace (a container, the ISP side of a
//! lab): rtnetlink names it by ifindex there plus the namespace's id as this
//! namespace numbers it (IFLA_LINK_NETNSID). No syscall opens a namespace by
//! that id, so the candidates are opened (`ip netns`'s /run/netns, then
//! every process's /proc/PID/ns/net) and the kernel asked each one's id
//! (RTM_GETNSID with NETNSA_FD, `rtnl_net_getid` in net/core/net_namespace.c).
//! The peer is then read from a thread that entered that namespace; nothing
//! there is changed.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{anyhow, Result};
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::RouteNetlinkMessage;

use super::{features, gro, LinkFacts, LinkRef, LinkTable};
use crate::routes::dump::{answers, exchange};

/// What matters about a veth's peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFacts {
    pub name: String,
    pub ifindex: u32,
    /// Where it is; None: this namespace.
    pub netns: Option<Netns>,
    /// Administratively up (its NAPI exists only while it is).
    pub up: bool,
    /// GRO on (None: not readable).
    pub gro: Option<bool>,
    /// An XDP program attached to it (its id).
    pub xdp_prog: Option<u32>,
    /// tx-vlan-hw-insert, tx-vlan-stag-hw-insert: VLAN devices on it hand
    /// their 802.1Q / 802.1ad tag over in the skb's metadata.
    pub tx_vlan: [Option<bool>; 2],
    /// Any TX checksum offload on (tx-checksum-ip-generic, -ipv4, -ipv6):
    /// what it sends from a local socket carries a partial checksum
    /// (CHECKSUM_PARTIAL). None: not readable.
    pub tx_csum: Option<bool>,
}

/// A network namespace, as a user would name it in a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    /// /run/netns/NAME (`ip netns`).
    Named(String),
    /// Only a process is in it.
    Pid { pid: u32, comm: String },
}

impl Netns {
    /// The prefix that runs a command there.
    pub fn exec_prefix(&self) -> String {
        match self {
            Netns::Named(n) => format!("ip netns exec {n} "),
            Netns::Pid { pid, .. } => format!("nsenter -t {pid} -n "),
        }
    }
}

impl std::fmt::Display for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Netns::Named(n) => write!(f, "namespace {n}"),
            Netns::Pid { pid, comm } => write!(f, "the namespace of pid {pid} ({comm})"),
        }
    }
}

impl PeerFacts {
    /// "wan0 (namespace nfolab-wan)", or just the name in this namespace.
    pub fn describe(&self) -> String {
        match &self.netns {
            None => self.name.clone(),
            Some(n) => format!("{} ({n})", self.name),
        }
    }

    /// `cmd` (an ethtool invocation naming the peer) as run where the peer is.
    pub fn run_there(&self, cmd: &str) -> String {
        match &self.netns {
            None => cmd.to_string(),
            Some(n) => format!("{}{cmd}", n.exec_prefix()),
        }
    }
}

/// The peer of veth `l` (from `table`, this namespace's links), read where
/// it is. Err: why it cannot be read.
pub fn veth_peer(table: &LinkTable, l: &LinkFacts) -> Result<PeerFacts, String> {
    let Some(LinkRef { ifindex, netnsid }) = l.link else {
        return Err(format!("rtnetlink names no peer for {} (IFLA_LINK)", l.name));
    };
    match netnsid {
        None => {
            let p = table.get(ifindex).ok_or_else(|| format!("peer ifindex {ifindex} of {} not found", l.name))?;
            Ok(read_local(p, None))
        }
        Some(id) => {
            let (fd, ns) = open_netns(id).ok_or_else(|| {
                format!("the namespace of {}'s peer (id {id}) is neither in /run/netns nor any process's", l.name)
            })?;
            read_in(&fd, ifindex).map(|p| PeerFacts { netns: Some(ns), ..p })
        }
    }
}

/// The facts of link `p` of the calling thread's namespace.
fn read_local(p: &LinkFacts, netns: Option<Netns>) -> PeerFacts {
    let tx = features(
        &p.name,
        &[
            "tx-vlan-hw-insert",
            "tx-vlan-stag-hw-insert",
            "tx-checksum-ip-generic",
            "tx-checksum-ipv4",
            "tx-checksum-ipv6",
        ],
    )
    .unwrap_or_default();
    let csum: Vec<Option<bool>> = tx.iter().skip(2).copied().collect();
    PeerFacts {
        tx_csum: (!csum.is_empty() && csum.iter().all(Option::is_some)).then(|| csum.contains(&Some(true))),
        name: p.name.clone(),
        ifindex: p.ifindex,
        netns,
        up: p.admin_up,
        gro: gro(&p.name),
        xdp_prog: p.xdp.and_then(|x| x.id()),
        tx_vlan: [tx.first().copied().flatten(), tx.get(1).copied().flatten()],
    }
}

/// Read link `ifindex` of namespace `fd` from a thread that enters it (the
/// calling thread stays where it is).
fn read_in(fd: &OwnedFd, ifindex: u32) -> Result<PeerFacts, String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a namespace fd we own; only this short-lived thread moves.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("entering the peer's namespace: {}", std::io::Error::last_os_error()));
            }
            let table = LinkTable::dump().map_err(|e| format!("{e:#}"))?;
            let p = table.get(ifindex).ok_or_else(|| format!("ifindex {ifindex} not in the peer's namespace"))?;
            Ok(read_local(p, None))
        })
        .join()
        .unwrap_or_else(|_| Err("reading the peer panicked".into()))
    })
}

/// Open the namespace this one calls `nsid`, with a name for it. What was
/// found is kept while it is asked for (the engine reads its veth peers
/// every second) and the kernel still gives it that id; otherwise the
/// candidates are scanned. An entry not asked for in 10 s is dropped: its
/// fd would keep a deleted namespace alive.
fn open_netns(nsid: i32) -> Option<(OwnedFd, Netns)> {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    type Kept = (i32, OwnedFd, Netns, Instant);
    static KEPT: Mutex<Vec<Kept>> = Mutex::new(Vec::new());
    let mut kept = KEPT.lock().ok()?;
    kept.retain(|(id, fd, _, used)| used.elapsed() < Duration::from_secs(10) && nsid_of(fd).ok() == Some(*id));
    if let Some((_, fd, ns, used)) = kept.iter_mut().find(|(id, ..)| *id == nsid) {
        *used = Instant::now();
        return Some((fd.try_clone().ok()?, ns.clone()));
    }
    let (fd, ns) = scan_netns(nsid)?;
    kept.push((nsid, fd.try_clone().ok()?, ns.clone(), Instant::now()));
    Some((fd, ns))
}

/// `open_netns` the slow way: every candidate asked for its id.
fn scan_netns(nsid: i32) -> Option<(OwnedFd, Netns)> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut candidates: Vec<(std::path::PathBuf, Netns)> = Vec::new();
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                candidates.push((e.path(), Netns::Named(e.file_name().to_string_lossy().into_owned())));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
            candidates.push((e.path().join("ns/net"), Netns::Pid { pid, comm }));
        }
    }
    for (path, ns) in candidates {
        let Ok(f) = File::open(&path) else { continue };
        let Ok(m) = f.metadata() else { continue };
        if !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        let fd = OwnedFd::from(f);
        if nsid_of(&fd).ok() == Some(nsid) {
            return Some((fd, ns));
        }
    }
    None
}

/// The id the calling thread's namespace gives namespace `fd` (-1: none).
fn nsid_of(fd: &OwnedFd) -> Result<i32> {
    const SEQ: u32 = 7;
    let mut m = NsidMessage::default();
    m.attributes.push(NsidAttribute::Fd(fd.as_raw_fd() as u32));
    let mut msg = NetlinkMessage::new(NetlinkHeader::default(), RouteNetlinkMessage::GetNsId(m).into());
    msg.header.flags = NLM_F_REQUEST;
    msg.header.sequence_number = SEQ;
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    let mut id = None;
    exchange(&buf, |datagram| {
        for p in answers(datagram, SEQ)? {
            match p {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                    id = m.attributes.iter().find_map(|a| match a {
                        NsidAttribute::Id(i) => Some(*i),
                        _ => None,
                    });
                    return Ok(true);
                }
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io().into()),
                _ => {}
            }
        }
        Ok(false)
    })?;
    id.ok_or_else(|| anyhow!("RTM_GETNSID: no id in the answer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) {
        let st = std::process::Command::new("sh").args(["-ec", script]).status().expect("sh");
        assert!(st.success(), "{script}");
    }

    /// A veth pair with one end in a named namespace: the peer is found
    /// there, by name, with its GRO and VLAN offloads as set.
    #[test]
    fn a_peer_in_another_namespace_is_found_and_read() {
        let ns = format!("nfo-peer-{}", std::process::id());
        std::thread::spawn(move || {
            // SAFETY: plain syscall, affects only this thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "needs root");
            sh(&format!(
                "ip netns add {ns}; ip link add pa type veth peer name pb netns {ns}; ip link set pa up; \
                 ip netns exec {ns} ip link set pb up; ip netns exec {ns} ethtool -K pb gro on txvlan off"
            ));
            let t = LinkTable::dump().unwrap();
            let pa = t.by_name("pa").unwrap();
            let p = veth_peer(&t, pa);
            sh(&format!("ip netns exec {ns} ethtool -K pb gro off; ip netns exec {ns} ip link set pb down"));
            let q = veth_peer(&t, pa);
            let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).status();
            let p = p.unwrap();
            assert_eq!(p.name, "pb");
            assert_eq!(p.netns, Some(Netns::Named(ns.clone())));
            assert_eq!((p.up, p.gro, p.xdp_prog), (true, Some(true), None));
            assert_eq!(p.tx_vlan[0], Some(false));
            assert_eq!(p.tx_vlan[1], Some(true), "veth's default");
            assert_eq!(p.describe(), format!("pb (namespace {ns})"));
            assert_eq!(p.run_there("ethtool -K pb gro on"), format!("ip netns exec {ns} ethtool -K pb gro on"));
            let q = q.unwrap();
            assert_eq!((q.up, q.gro), (false, Some(false)));
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    }

    #[test]
    fn a_peer_in_the_same_namespace() {
        std::thread::spawn(|| {
            // SAFETY: plain syscall, affects only this thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "needs root");
            sh("ip link add pa type veth peer name pb; ip link set pb up");
            let t = LinkTable::dump().unwrap();
            let p = veth_peer(&t, t.by_name("pa").unwrap()).unwrap();
            assert_eq!((p.name.as_str(), p.netns.as_ref(), p.up, p.gro), ("pb", None, true, Some(false)));
            assert_eq!(p.describe(), "pb");
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    }
}
