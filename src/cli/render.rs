//! Text rendering of `status` and `flows` (JSON output is the view types'
//! own serialisation).

use crate::control::{FlowView, HostView, SlowView, Status};
use crate::proto::{self, IPPROTO_TCP, IPPROTO_UDP};

pub fn render_status(s: &Status) -> String {
    let mut o = String::new();
    let mode =
        clap::ValueEnum::to_possible_value(&s.mode_requested).map(|v| v.get_name().to_string()).unwrap_or_default();
    o += &format!("nft-offload running (pid {}, up {}s, mode {mode})\n", s.pid, s.uptime_s);
    if let Some(k) = &s.kernel {
        o += &format!("Kernel {} (what it gave the fast path):\n", k.release);
        for f in &k.features {
            o += &format!("  {:<14} {:<8} {}\n", f.name, f.value, f.detail);
        }
    }
    o += "Interfaces:\n";
    for i in &s.interfaces {
        o += &format!(
            "  {:<12} ifindex {:<4} {:<4} {:<5} driver {:<10} {}\n",
            i.name,
            i.ifindex,
            i.mode.as_str(),
            if i.up { "up" } else { "DOWN" },
            if i.driver.is_empty() { "?" } else { &i.driver },
            i.reason
        );
        if !i.topology.is_empty() {
            o += &format!("  {:<12} {}\n", "", i.topology);
        }
        if !i.attach.is_empty() {
            o += &format!("  {:<12} attached: {}\n", "", i.attach);
        }
        for line in [i.xdp_target.as_deref(), i.vlan_tags.as_deref()].into_iter().flatten() {
            o += &format!("  {:<12} {line}\n", "");
        }
        if !i.serves.is_empty() {
            let me = if i.listed { "also serves" } else { "not listed itself; serves" };
            o += &format!("  {:<12} {me} the listed {}\n", "", i.serves.join(", "));
        }
    }
    o += &format!(
        "Flows: {} offloaded / {} capacity, {} waiting for a neighbour, {} dormant (idle > {}s)\n",
        s.flows_offloaded, s.flow_capacity, s.flows_waiting_for_neighbour, s.flows_dormant, s.idle_timeout_s
    );
    if s.map_memory_bytes > 0 || s.daemon_rss_bytes > 0 {
        o += &format!(
            "Memory: {} in the fast path's maps, {} resident in the engine\n",
            mib(s.map_memory_bytes),
            mib(s.daemon_rss_bytes)
        );
    }
    if s.flows_unwatched > 0 {
        o += &format!(
            "  {} dormant connections wait for room in the watch map (the kernel keeps them)\n",
            s.flows_unwatched
        );
    }
    o += &format!("Fast path: {} packets, {} bytes\n", s.fast_path_packets, s.fast_path_bytes);
    if let Some(r) = &s.rates {
        o += &format!(
            "Rates (last {:.0} s): fast path {} packets/s, {}; handed to the kernel {} packets/s; fast share {}\n",
            r.window_ms as f64 / 1000.0,
            r.fast_packets_per_s,
            bits(r.fast_bits_per_s),
            r.slow_packets_per_s,
            r.fast_share_pct.map_or_else(|| "- (no packets)".to_string(), |p| format!("{p:.1}%")),
        );
    }
    o += "Slow path (packets handed to the kernel, by reason):\n";
    for (k, v) in s.slow_path.iter().filter(|(_, v)| **v > 0) {
        o += &format!("  {k:<14} {v}\n");
    }
    o += &format!(
        "Offloads: {}   conntrack events: {}   resyncs: {}   keepalives: {} by the engine, {} by the fast path   \
         path resolutions: {}\n",
        s.offloads_total,
        s.conntrack_events,
        s.conntrack_resyncs,
        s.conntrack_refreshes,
        s.fast_path_ct_refreshes,
        s.path_resolutions
    );
    if !s.teardowns.is_empty() {
        o += "Teardowns:";
        for (k, v) in &s.teardowns {
            o += &format!(" {k}={v}");
        }
        o += "\n";
    }
    if !s.not_offloaded.is_empty() {
        o += "Not offloaded (connections, by reason):\n";
        for r in &s.not_offloaded {
            o += &format!("  {:>6}  {:<24} {}\n", r.connections, r.code, r.reason);
        }
    }
    o
}

/// Bits per second in the largest unit that keeps a digit before the point.
fn bits(b: u64) -> String {
    match b {
        0..1_000 => format!("{b} bit/s"),
        1_000..1_000_000 => format!("{:.1} kbit/s", b as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} Mbit/s", b as f64 / 1e6),
        _ => format!("{:.2} Gbit/s", b as f64 / 1e9),
    }
}

/// Bytes as MiB with one decimal.
fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20))
}

/// `hosts`: one line per host; `acct`: net.netfilter.nf_conntrack_acct
/// (None: unreadable), without which the slow path's packets are missing.
pub fn render_hosts(hosts: &[HostView], acct: Option<bool>) -> String {
    let mut o = format!(
        "{:<39} {:>5} {:>12} {:>14} {:>12} {:>14}\n",
        "HOST", "CONNS", "UP PACKETS", "UP BYTES", "DOWN PACKETS", "DOWN BYTES"
    );
    for h in hosts {
        o += &format!(
            "{:<39} {:>5} {:>12} {:>14} {:>12} {:>14}\n",
            h.host, h.connections, h.upload_packets, h.upload_bytes, h.download_packets, h.download_bytes
        );
    }
    if acct == Some(false) {
        o += "conntrack accounting is off (net.netfilter.nf_conntrack_acct = 0): only offloaded packets are counted; \
              turn it on for the slow path's too\n";
    }
    o
}

/// conntrack -L style: one line per connection, original then reply tuple;
/// with `slow`, the connections on the kernel's path after them, with why.
pub fn render_flows(flows: &[FlowView], slow: Option<&[SlowView]>) -> String {
    let mut o = String::new();
    for f in flows {
        let pnum = if f.proto == proto::name(IPPROTO_TCP) { IPPROTO_TCP } else { IPPROTO_UDP };
        o += &format!(
            "{:<8} {} {}{}src={} dst={} sport={} dport={} packets={} bytes={} src={} dst={} sport={} dport={} packets={} bytes={} [OFFLOAD] mode={} {}->{} idle={}s mark={} id={}\n",
            f.proto,
            pnum,
            // conntrack -L's layout: protocol name padded to 8, number,
            // seconds left, state.
            f.timeout_s.map(|t| format!("{t} ")).unwrap_or_default(),
            f.state.as_ref().map(|s| format!("{s} ")).unwrap_or_default(),
            f.orig.src,
            f.orig.dst,
            f.orig.sport,
            f.orig.dport,
            f.packets_orig,
            f.bytes_orig,
            f.reply.src,
            f.reply.dst,
            f.reply.sport,
            f.reply.dport,
            f.packets_reply,
            f.bytes_reply,
            f.mode.as_str(),
            f.iif,
            f.oif,
            f.idle_ms / 1000,
            f.mark,
            f.id
        );
        for (which, why) in ["original", "reply"].iter().zip(&f.slow) {
            if let Some(why) = why {
                o += &format!("     {which} direction on the slow path: {why}\n");
            }
        }
        for (which, encap) in ["original", "reply"].iter().zip(&f.encap) {
            if let Some(encap) = encap {
                o += &format!("     {which} direction {encap}\n");
            }
        }
    }
    if let Some(slow) = slow {
        for f in slow {
            // Ports only where the protocol has them, as conntrack -L.
            let ports = if matches!(f.protonum, IPPROTO_TCP | IPPROTO_UDP | 33 | 132 | 136) {
                format!(" sport={} dport={}", f.orig.sport, f.orig.dport)
            } else {
                String::new()
            };
            o += &format!(
                "{:<8} {} src={} dst={}{ports} [SLOW] code={} reason=\"{}\"\n",
                f.proto, f.protonum, f.orig.src, f.orig.dst, f.code, f.reason
            );
        }
        o += &format!("nft-offload: {} flow entries offloaded, {} on the kernel's path.\n", flows.len(), slow.len());
        return o;
    }
    o += &format!("nft-offload: {} flow entries offloaded.\n", flows.len());
    o
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::control::{IfaceStatus, TupleView};
    use crate::dataplane::Mode;
    use crate::policy::ModeChoice;

    fn status() -> Status {
        let iface = |name: &str, ifindex, up| IfaceStatus {
            name: name.into(),
            ifindex,
            driver: String::new(),
            mode: Mode::Tc,
            reason: "software device".into(),
            up,
            topology: if name == "lan0" { "lan0: bridge, ports lan1 lan2".into() } else { String::new() },
            stands_for: None,
            xdp_target: None,
            vlan_tags: None,
            serves: Vec::new(),
            listed: true,
            attach: if name == "wan0" {
                "clsact (created): cls_bpf ingress pref 1 handle 0x1".into()
            } else {
                String::new()
            },
        };
        let probe = crate::dataplane::Probe {
            tcx: Err(libc::EINVAL),
            kern_ctx: false,
            xfrm_helper: Some(true),
            keepalive: crate::dataplane::Keepalive::NoKfuncs,
        };
        Status {
            pid: 42,
            uptime_s: 7,
            mode_requested: ModeChoice::Auto,
            kernel: Some(crate::control::KernelView {
                release: "6.1.0-50-amd64".into(),
                tc_attach: "clsact".into(),
                features: crate::dataplane::Features::from_probe(&probe).lines(),
            }),
            interfaces: vec![iface("lan0", 2, true), iface("wan0", 3, false)],
            flows_offloaded: 1,
            flows_waiting_for_neighbour: 0,
            flows_dormant: 2,
            flow_capacity: 65536,
            idle_timeout_s: 30,
            fast_path_packets: 1000,
            fast_path_bytes: 64000,
            rates: Some(crate::control::RatesView {
                window_ms: 10_000,
                fast_packets_per_s: 8_300,
                fast_bits_per_s: 98_765_432,
                slow_packets_per_s: 12,
                fast_share_pct: Some(99.9),
            }),
            slow_path: BTreeMap::from([("no_flow".into(), 5), ("ttl".into(), 0)]),
            offloads_total: 3,
            teardowns: BTreeMap::from([("idle".into(), 2)]),
            not_offloaded: vec![crate::control::NotOffloadedView {
                code: "excluded".into(),
                reason: "excluded by port 22".into(),
                connections: 4,
            }],
            conntrack_events: 9,
            conntrack_resyncs: 0,
            conntrack_refreshes: 1,
            flows_unwatched: 0,
            map_memory_bytes: 4_404_019,
            daemon_rss_bytes: 6 << 20,
            fast_path_ct_refreshes: 7,
            fast_path_ct_gone: 0,
            fast_path_header_pulls: 0,
            conntrack_rst_restores: 0,
            path_resolutions: 6,
            fib_queries: 12,
            fib_cache_hits: 6,
            reresolve_last: None,
            offload_latency_us: BTreeMap::new(),
        }
    }

    #[test]
    fn status_text() {
        let t = render_status(&status());
        assert!(t.starts_with("nft-offload running (pid 42, up 7s, mode auto)\n"), "{t}");
        // an unknown driver shows as ?, a down link as DOWN
        assert!(t.contains("  wan0         ifindex 3    tc   DOWN  driver ?          software device\n"), "{t}");
        assert!(t.contains("software device\n               lan0: bridge, ports lan1 lan2\n  wan0"), "{t}");
        assert!(
            t.contains("software device\n               attached: clsact (created): cls_bpf ingress pref 1"),
            "{t}"
        );
        assert!(
            t.contains("\nKernel 6.1.0-50-amd64 (what it gave the fast path):\n  tc_attach      clsact   no TCX"),
            "{t}"
        );
        assert!(t.contains("\n  secpath        helper   no bpf_cast_to_kern_ctx (6.2+)"), "{t}");
        assert!(t.contains("\n  fib_mark       no       bpf_fib_lookup refuses"), "{t}");
        assert!(t.contains("Flows: 1 offloaded / 65536 capacity, 0 waiting for a neighbour, 2 dormant (idle > 30s)"));
        assert!(t.contains("\nMemory: 4.2 MiB in the fast path's maps, 6.0 MiB resident in the engine\n"), "{t}");
        // zero counters are left out
        assert!(t.contains("  no_flow        5\n") && !t.contains("ttl"), "{t}");
        assert!(t.contains("Teardowns: idle=2\n"), "{t}");
        assert!(
            t.contains(
                "Rates (last 10 s): fast path 8300 packets/s, 98.8 Mbit/s; handed to the kernel 12 packets/s; \
                 fast share 99.9%\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("connections, by reason):\n       4  excluded                 excluded by port 22\n"),
            "{t}"
        );
        // XDP on wan0 for a listed wan0.7 (engine::ports::Served)
        let mut s = status();
        s.interfaces[1].mode = Mode::Xdp;
        s.interfaces[1].listed = false;
        s.interfaces[1].serves = vec!["wan0.7 (VLAN 7)".into()];
        s.interfaces[1].vlan_tags = Some("VLAN tags read in the frame (rx-vlan-offload off)".into());
        s.interfaces[1].xdp_target = Some("takes XDP redirects (xdp-features: ndo-xmit)".into());
        let t = render_status(&s);
        assert!(
            t.contains(
                "pref 1 handle 0x1\n               takes XDP redirects (xdp-features: ndo-xmit)\n               VLAN \
                 tags read in the frame (rx-vlan-offload off)\n               not listed itself; serves the listed \
                 wan0.7 (VLAN 7)\n"
            ),
            "{t}"
        );
    }

    #[test]
    fn hosts_text_has_a_column_each_and_says_when_conntrack_counts_nothing() {
        let h = HostView {
            host: "192.168.1.2".into(),
            connections: 3,
            upload_packets: 14_000,
            upload_bytes: 20_000_000,
            download_packets: 200,
            download_bytes: 10_000,
        };
        let t = render_hosts(std::slice::from_ref(&h), Some(true));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["192.168.1.2", "3", "14000", "20000000", "200", "10000"]
        );
        assert!(render_hosts(&[h], Some(false)).contains("nf_conntrack_acct = 0"));
    }

    #[test]
    fn flows_text_is_conntrack_style() {
        let tuple = |s: &str, sp, d: &str, dp| TupleView {
            src: s.parse().unwrap(),
            dst: d.parse().unwrap(),
            sport: sp,
            dport: dp,
        };
        let f = FlowView {
            id: 77,
            proto: "udp".into(),
            family: 4,
            state: None,
            orig: tuple("192.168.1.2", 40000, "203.0.113.2", 53),
            reply: tuple("203.0.113.2", 53, "203.0.113.1", 40000),
            packets_orig: 3,
            bytes_orig: 300,
            packets_reply: 2,
            bytes_reply: 200,
            idle_ms: 1400,
            timeout_s: Some(117),
            mode: Mode::Xdp,
            iif: "lan0".into(),
            oif: "wan0".into(),
            mark: 0,
            zone: 0,
            nat_src: true,
            nat_dst: false,
            slow: [None, None],
            encap: [None, None],
        };
        let t = render_flows(std::slice::from_ref(&f), None);
        assert_eq!(
            t,
            "udp      17 117 src=192.168.1.2 dst=203.0.113.2 sport=40000 dport=53 packets=3 bytes=300 \
             src=203.0.113.2 dst=203.0.113.1 sport=53 dport=40000 packets=2 bytes=200 [OFFLOAD] mode=xdp \
             lan0->wan0 idle=1s mark=0 id=77\nnft-offload: 1 flow entries offloaded.\n"
        );
        assert_eq!(render_flows(&[], None), "nft-offload: 0 flow entries offloaded.\n");
        // JSON: integers where they are integers, nothing where nothing is.
        let j = serde_json::to_value(&f).unwrap();
        assert_eq!((j["idle_ms"].as_u64(), j["timeout_s"].as_u64()), (Some(1400), Some(117)), "{j}");
        assert!(j.get("slow").is_none() && j.get("encap").is_none(), "{j}");
        let unknown = render_flows(&[FlowView { timeout_s: None, ..f.clone() }], None);
        assert!(unknown.starts_with("udp      17 src="), "no timeout, no column: {unknown}");
        let held = FlowView { slow: [None, Some("tc ingress filter on wan0".into())], ..f.clone() };
        let t = render_flows(&[held], None);
        assert!(t.contains(" id=77\n     reply direction on the slow path: tc ingress filter on wan0\n"), "{t}");
        assert!(!t.contains("original direction"), "{t}");
        // --all: the kernel's path after, each with its code and reason.
        let slow = SlowView {
            proto: "tcp".into(),
            protonum: 6,
            orig: tuple("192.168.1.2", 40022, "203.0.113.2", 22),
            zone: 0,
            code: "excluded".into(),
            reason: "excluded by port 22".into(),
        };
        let t = render_flows(std::slice::from_ref(&f), Some(std::slice::from_ref(&slow)));
        assert!(
            t.ends_with(
                "tcp      6 src=192.168.1.2 dst=203.0.113.2 sport=40022 dport=22 [SLOW] code=excluded \
                 reason=\"excluded by port 22\"\nnft-offload: 1 flow entries offloaded, 1 on the kernel's path.\n"
            ),
            "{t}"
        );
        let ping = SlowView { proto: "icmp".into(), protonum: 1, code: "ineligible".into(), ..slow };
        let t = render_flows(&[], Some(&[ping]));
        assert!(t.starts_with("icmp     1 src=192.168.1.2 dst=203.0.113.2 [SLOW] code=ineligible"), "{t}");
        let tagged = FlowView { encap: [Some("arrives untagged, leaves VLAN 7 + PPPoE 0x1a2b".into()), None], ..f };
        let t = render_flows(&[tagged], None);
        assert!(t.contains(" id=77\n     original direction arrives untagged, leaves VLAN 7 + PPPoE 0x1a2b\n"), "{t}");
    }
}
