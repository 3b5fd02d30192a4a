//! What `status` and `flows` show: the engine fills these, the protocol
//! carries them as JSON, the CLI renders them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::dataplane::Mode;
use crate::policy::ModeChoice;

/// A managed interface: where the fast path is attached, how, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub driver: String,
    pub mode: Mode,
    pub reason: String,
    pub up: bool,
    /// What it is and what it stands on ("br-lan: bridge, ports lan1
    /// lan2"), as of the last link change.
    #[serde(default)]
    pub topology: String,
    /// Attached by the engine for this listed port, not listed itself (the
    /// ppp device above a TC port: `topology::pppoe_uppers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stands_for: Option<String>,
    /// XDP mode: whether the port takes XDP redirects, and if not why and
    /// what to change (`policy::xdp::Target`); directions leaving by a port
    /// that does not are held on the slow path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp_target: Option<String>,
    /// XDP mode, a port carrying VLAN devices: how the program reads their
    /// tags (`policy::xdp::Tags`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan_tags: Option<String>,
    /// Listed devices the fast path on this port serves (a VLAN or PPPoE
    /// device above it, in XDP mode), each with its headers: "rwan.7
    /// (VLAN 7)". Only their connections are offloaded through it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serves: Vec<String>,
    /// Listed itself (false: attached only to serve `serves`).
    #[serde(default = "yes")]
    pub listed: bool,
    /// How the programs are attached: "tcx ingress and egress links", or
    /// "clsact (created): cls_bpf ingress pref 1 handle 0x1, ..." where the
    /// kernel has no TCX (filled in by `status`).
    #[serde(default)]
    pub attach: String,
}

fn yes() -> bool {
    true
}

fn neither(v: &[Option<String>; 2]) -> bool {
    v[0].is_none() && v[1].is_none()
}

/// The kernel the engine runs on, and what it gave the fast path
/// (`dataplane::Features`, probed at start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelView {
    pub release: String,
    /// "tcx" or "clsact" (also the first feature line).
    pub tc_attach: String,
    pub features: Vec<crate::dataplane::FeatureLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub uptime_s: u64,
    pub mode_requested: ModeChoice,
    /// What this kernel gave the fast path (None from an older engine).
    #[serde(default)]
    pub kernel: Option<KernelView>,
    pub interfaces: Vec<IfaceStatus>,
    pub flows_offloaded: usize,
    pub flows_waiting_for_neighbour: usize,
    pub flows_dormant: usize,
    /// Dormant connections fo_dormant has no room for yet (watched as room
    /// frees; until then the kernel keeps them).
    #[serde(default)]
    pub flows_unwatched: usize,
    pub flow_capacity: u32,
    /// Kernel memory of the fast path's maps (memlock in their fdinfo):
    /// grows with the connections installed (bpf/maps.h).
    #[serde(default)]
    pub map_memory_bytes: u64,
    /// The engine process's resident memory (VmRSS).
    #[serde(default)]
    pub daemon_rss_bytes: u64,
    pub idle_timeout_s: u64,
    pub fast_path_packets: u64,
    pub fast_path_bytes: u64,
    /// Over the last seconds (None in the first second).
    #[serde(default)]
    pub rates: Option<RatesView>,
    pub slow_path: BTreeMap<String, u64>,
    pub offloads_total: u64,
    pub teardowns: BTreeMap<String, u64>,
    /// Connections not offloaded, by reason (each connection once per
    /// reason), ordered by code.
    pub not_offloaded: Vec<NotOffloadedView>,
    pub conntrack_events: u64,
    pub conntrack_resyncs: u64,
    /// Conntrack timeouts the engine refreshed over ctnetlink (the
    /// fallback keepalive, and connections the fast path cannot refresh).
    pub conntrack_refreshes: u64,
    /// Conntrack entries the fast path refreshed itself (`keepalive`
    /// feature "fast_path"), and its lookups that found none.
    #[serde(default)]
    pub fast_path_ct_refreshes: u64,
    #[serde(default)]
    pub fast_path_ct_gone: u64,
    /// TC packets whose headers were not all in the skb's linear part and
    /// were pulled into it (`fo_pull_headers`): a cost, not a slow path.
    #[serde(default)]
    pub fast_path_header_pulls: u64,
    /// Conntrack timeouts put back after the fast path handed conntrack a
    /// RST it could not take as a close (`keepalive::restore_after_rst`).
    #[serde(default)]
    pub conntrack_rst_restores: u64,
    /// Two-way route resolutions (three FIB lookups each) since start: what
    /// route, neighbour and policy changes cost.
    #[serde(default)]
    pub path_resolutions: u64,
    /// FIB lookups made (BPF_PROG_TEST_RUN) and answered from the cache
    /// (`routes::cache`) since start.
    #[serde(default)]
    pub fib_queries: u64,
    #[serde(default)]
    pub fib_cache_hits: u64,
    /// The last re-resolution after a route, rule, address or link change.
    #[serde(default)]
    pub reresolve_last: Option<ReresolveView>,
    /// From a conntrack event reaching the engine to both map entries
    /// installed, over the last 10k offloads.
    #[serde(default)]
    pub offload_latency_us: BTreeMap<String, u32>,
}

/// The fast path's rates over the last seconds (`engine::rates`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatesView {
    /// What the rates are averaged over.
    pub window_ms: u64,
    pub fast_packets_per_s: u64,
    pub fast_bits_per_s: u64,
    /// Packets the fast path handed to the kernel (every reason): on the
    /// managed ports, what still took the kernel's path.
    pub slow_packets_per_s: u64,
    /// Fast packets among both, in percent to a tenth; None without
    /// packets.
    pub fast_share_pct: Option<f64>,
}

/// One host's traffic through the router, offloaded packets included
/// (`engine::hosts`): upload is what it sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// Its address, or `other` for hosts beyond the table's bound.
    pub host: String,
    /// Its live connections.
    pub connections: usize,
    pub upload_packets: u64,
    pub upload_bytes: u64,
    pub download_packets: u64,
    pub download_bytes: u64,
}

/// A connection on the kernel's path, and why (`flows --all`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowView {
    pub proto: String,
    /// The IP protocol number, as conntrack -L prints it after the name.
    pub protonum: u8,
    /// Conntrack's original tuple.
    pub orig: TupleView,
    pub zone: u16,
    /// Stable: a `not_offloaded` code, or `dormant`, `waiting`, `asleep`,
    /// `not_asked`.
    pub code: String,
    pub reason: String,
}

/// Connections not offloaded for one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotOffloadedView {
    /// Stable: `excluded`, `ineligible`, `no_path`, `not_in_flowtable`,
    /// `table_full`, `no_memory`, `conntrack_update_failed`,
    /// `key_collision`, `held`.
    pub code: String,
    /// The particulars, for people ("excluded by port 22").
    pub reason: String,
    pub connections: u64,
}

/// One re-resolution (`engine::reroute`), from the settled change to its
/// last connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReresolveView {
    /// Offloaded connections when it started.
    pub offloaded: usize,
    /// Connections judged again.
    pub rejudged: usize,
    /// FIB lookups it made (the revalidation's and the connections').
    pub fib_queries: u64,
    /// Loop passes it took.
    pub passes: u32,
    pub micros: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TupleView {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// One offloaded connection, conntrack style.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowView {
    pub id: u32,
    pub proto: String,
    pub family: u8,
    pub state: Option<String>,
    pub orig: TupleView,
    pub reply: TupleView,
    pub packets_orig: u64,
    pub bytes_orig: u64,
    pub packets_reply: u64,
    pub bytes_reply: u64,
    /// Since either direction's last packet, milliseconds.
    pub idle_ms: u64,
    /// Seconds until conntrack would expire the entry (its timeout column);
    /// None when conntrack could not be asked.
    #[serde(default)]
    pub timeout_s: Option<u32>,
    pub mode: Mode,
    pub iif: String,
    pub oif: String,
    pub mark: u32,
    pub zone: u16,
    pub nat_src: bool,
    pub nat_dst: bool,
    /// Per direction (original, reply): why it goes through the kernel
    /// (`flow::Held`), if it does.
    /// Absent when both go the fast path.
    #[serde(default, skip_serializing_if = "neither")]
    pub slow: [Option<String>; 2],
    /// Per direction: the VLAN/PPPoE headers it arrives and leaves with,
    /// if any (absent when neither has any).
    #[serde(default, skip_serializing_if = "neither")]
    pub encap: [Option<String>; 2],
}
