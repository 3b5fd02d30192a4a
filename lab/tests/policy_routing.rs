//! Policy routing end to end, in mwan3's shape: the lab router gets a second
//! WAN (`rwan2` 198.51.100.1 - `wan1` 198.51.100.2 in the server's
//! namespace), `ip rule fwmark 2 table 102` sends marked connections out of
//! it, the ruleset sets `ct mark set 2` for UDP to port 9999 and copies it
//! (`meta mark set ct mark`), and both WANs masquerade.
//!
//! Evidence is the server's side: which of its two interfaces received the
//! connection's packets.

use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nft_offload_lab::Background as Bg;
use nft_offload_lab::{Daemon, Lab, LabOpts};

const SINK_PORT: u16 = 9999;

/// The lab with the second WAN, its rule and table, and `ruleset` loaded.
fn two_wan_lab(ruleset: &str) -> Lab {
    static N: AtomicU32 = AtomicU32::new(0);
    let prefix = format!("pr{}x{}", std::process::id() % 100000, N.fetch_add(1, Ordering::SeqCst));
    let lab = Lab::up(&LabOpts { prefix, xdp_safe: false, isolate_router_cpu: false }).expect("lab up");
    lab.warm_neighbours().expect("neighbours");
    let (rtr, wan) = (lab.rtr.clone(), lab.wan.clone());
    let run = |ns: &str, cmd: &str| {
        let args: Vec<&str> = cmd.split_whitespace().collect();
        lab.exec(ns, &args).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    };
    run(&rtr, "ip link add rwan2 type veth peer name wan1");
    run(&rtr, &format!("ip link set wan1 netns {wan}"));
    run(&rtr, "ip addr add 198.51.100.1/24 dev rwan2");
    run(&rtr, "ip link set rwan2 up");
    run(&wan, "ip addr add 198.51.100.2/24 dev wan1");
    run(&wan, "ip link set wan1 up");
    // Replies of the second WAN arrive on rwan2 from an address main routes
    // via rwan: strict reverse-path filtering would drop them (mwan3 turns
    // it off too).
    for conf in ["all", "default", "rlan", "rwan", "rwan2"] {
        run(&rtr, &format!("sysctl -qw net.ipv4.conf.{conf}.rp_filter=0"));
    }
    // Table 102 is main with the second WAN as the way out, as mwan3 builds it.
    run(&rtr, "ip route add 192.168.1.0/24 dev rlan table 102");
    run(&rtr, "ip route add default via 198.51.100.2 dev rwan2 table 102");
    run(&rtr, "ip rule add fwmark 2 table 102 pref 1000");
    lab.exec_stdin(&rtr, &["nft", "-f", "-"], ruleset).expect("ruleset");
    lab.ping(&rtr, "198.51.100.2".parse().unwrap()).expect("second WAN neighbour");
    lab.ping(&wan, "198.51.100.1".parse().unwrap()).expect("second WAN neighbour");
    lab
}

/// fw4's shape with two WANs; `mangle` goes into a prerouting chain at the
/// mangle priority.
fn ruleset(mangle: &str) -> String {
    format!(
        r#"add table inet fw4
delete table inet fw4
table inet fw4 {{
	counter fwd_all {{
	}}
	chain mangle_prerouting {{
		type filter hook prerouting priority mangle; policy accept;
		{mangle}
	}}
	chain forward {{
		type filter hook forward priority filter; policy drop;
		counter name "fwd_all"
		ct state vmap {{ established : accept, related : accept }}
		iifname "rlan" oifname {{ "rwan", "rwan2" }} accept
	}}
	chain srcnat {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname {{ "rwan", "rwan2" }} meta nfproto ipv4 masquerade
	}}
}}
"#
    )
}

/// mwan3: mark the connection, copy the mark to every packet of it.
const MWAN3: &str = "udp dport 9999 ct state new ct mark set 2\n\t\tmeta mark set ct mark";

fn daemon(lab: &Lab) -> Daemon {
    Daemon::start_raw(lab, &["--iface", "rlan", "--iface", "rwan", "--iface", "rwan2"])
        .unwrap_or_else(|e| panic!("{e:#}"))
}

fn udp_sink(lab: &Lab) -> Bg {
    let py = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',{SINK_PORT}))\n\
         while True: s.recv(2048)\n"
    );
    Bg(lab.spawn(&lab.wan, &["python3", "-c", &py]).unwrap())
}

/// `count` datagrams from the client's `sport` to the server at `pps`.
fn udp_burst(lab: &Lab, sport: u16, count: u32, pps: u32) {
    let py = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('192.168.1.2',{sport}))\n\
         for i in range({count}):\n    s.sendto(b'x'*200,('203.0.113.2',{SINK_PORT}))\n    time.sleep({})\n",
        1.0 / f64::from(pps)
    );
    lab.exec(&lab.lan, &["python3", "-c", &py]).unwrap();
}

/// Packets received by the server on (wan0, wan1): first and second WAN.
fn server_rx(lab: &Lab) -> (u64, u64) {
    (lab.iface_stats(&lab.wan, "wan0").unwrap().0, lab.iface_stats(&lab.wan, "wan1").unwrap().0)
}

fn status(d: &Daemon) -> serde_json::Value {
    d.status().unwrap_or_else(|e| panic!("{e:#}"))
}

fn fast_path_packets(d: &Daemon) -> u64 {
    status(d)["fast_path_packets"].as_u64().unwrap()
}

/// The connection's source as the server sees it: the address conntrack
/// masqueraded it to (the reply tuple's destination).
fn nat_source(lab: &Lab, sport: u16) -> String {
    let out = lab
        .exec(&lab.rtr, &["conntrack", "-L", "-p", "udp", "--orig-port-src", &sport.to_string()])
        .unwrap_or_default();
    let reply = out.split("src=203.0.113.2").nth(1).unwrap_or_else(|| panic!("no entry for {sport}:\n{out}"));
    reply.split_whitespace().find_map(|w| w.strip_prefix("dst=")).unwrap().to_string()
}

/// mwan3's connection stays on the second WAN once offloaded: the route
/// is looked up with its mark, and every packet reaches the server through
/// wan1 with the second WAN's address.
#[test]
fn marked_connection_leaves_through_the_wan_its_mark_routes_to() {
    let lab = two_wan_lab(&ruleset(MWAN3));
    let _sink = udp_sink(&lab);
    let d = daemon(&lab);
    udp_burst(&lab, 42000, 40, 100);
    assert_eq!(nat_source(&lab, 42000), "198.51.100.1", "the kernel masqueraded to the second WAN");
    let st = status(&d);
    assert_eq!(st["flows_offloaded"], 1, "the marked connection is offloaded: {st}");
    let (fp0, rx0) = (fast_path_packets(&d), server_rx(&lab));
    udp_burst(&lab, 42000, 200, 200);
    let (fp1, rx1) = (fast_path_packets(&d), server_rx(&lab));
    assert!(fp1 - fp0 >= 190, "the fast path forwarded {} of 200 packets", fp1 - fp0);
    assert!(rx1.1 - rx0.1 >= 200, "the second WAN received {} of 200 packets", rx1.1 - rx0.1);
    // ARP or a stray packet at most; the 200 datagrams are not there.
    assert!(rx1.0 - rx0.0 < 5, "{} packets left through the first WAN", rx1.0 - rx0.0);
}

/// The engine routes with the connection's mark because mwan3 and pbr copy
/// it to the packets; a ruleset that does not leaves the packets on the
/// first WAN (masqueraded to its address), and the source check catches the
/// disagreement: not offloaded, with the reason.
#[test]
fn mark_not_copied_to_the_packets_is_caught_by_the_source_check() {
    let lab = two_wan_lab(&ruleset("udp dport 9999 ct state new ct mark set 2"));
    let _sink = udp_sink(&lab);
    let d = daemon(&lab);
    let rx0 = server_rx(&lab);
    udp_burst(&lab, 42001, 60, 100);
    assert_eq!(nat_source(&lab, 42001), "203.0.113.1", "the kernel routed by main: the first WAN");
    let st = status(&d);
    assert_eq!(st["flows_offloaded"], 0, "{st}");
    let why = "source NAT to 203.0.113.1, an address the route's egress interface does not have";
    assert!(nft_offload_lab::not_offloaded(&st).get(why) >= Some(&1), "no `{why}` in {st}");
    let rx1 = server_rx(&lab);
    assert!(rx1.0 - rx0.0 >= 60 && rx1.1 - rx0.1 < 5, "the kernel's way: {rx0:?} -> {rx1:?}");
}

/// An `ip rule` added while a connection is offloaded takes effect within
/// a second: here the connection's NAT address is the first WAN's, the
/// rule sends it out of the second, so it leaves the fast path and the
/// kernel forwards it where the rule says.
#[test]
fn ip_rule_added_while_offloaded_reroutes_within_a_second() {
    let lab = two_wan_lab(&ruleset("meta mark set ct mark"));
    let _sink = udp_sink(&lab);
    let d = daemon(&lab);
    udp_burst(&lab, 42002, 40, 100);
    assert_eq!(status(&d)["flows_offloaded"], 1, "{}", status(&d));
    lab.exec(&lab.rtr, &["ip", "rule", "add", "ipproto", "udp", "dport", "9999", "table", "102", "pref", "900"])
        .unwrap();
    let t0 = Instant::now();
    while status(&d)["flows_offloaded"] != 0 {
        assert!(t0.elapsed() < Duration::from_secs(1), "ip rule not applied within 1 s");
        sleep(Duration::from_millis(20));
    }
    eprintln!("ip rule reached the offloaded connection after {:?}", t0.elapsed());
    assert_eq!(status(&d)["teardowns"]["route_change"], 1);
    let rx0 = server_rx(&lab);
    udp_burst(&lab, 42002, 100, 200);
    let rx1 = server_rx(&lab);
    assert!(rx1.1 - rx0.1 >= 95, "the rule's WAN received {} of 100 packets", rx1.1 - rx0.1);
    assert!(rx1.0 - rx0.0 < 5, "{} packets still left through the first WAN", rx1.0 - rx0.0);
    // and the rule going away is seen too: a new connection is offloaded
    // through the first WAN again
    lab.exec(&lab.rtr, &["ip", "rule", "del", "pref", "900"]).unwrap();
    sleep(Duration::from_millis(300));
    let rx0 = server_rx(&lab);
    udp_burst(&lab, 42003, 100, 200);
    let rx1 = server_rx(&lab);
    assert_eq!(status(&d)["flows_offloaded"], 1, "{}", status(&d));
    assert!(rx1.0 - rx0.0 >= 100 && rx1.1 - rx0.1 < 5, "{rx0:?} -> {rx1:?}");
}

/// A stream of 100 datagrams a second to `dst`:9999 from the client's
/// `sport` for 40 s, with IP tos `tos` (IPv4) or over IPv6; a send that
/// fails (no route) is retried next tick.
fn stream(lab: &Lab, dst: &str, sport: u16, tos: u8) -> Bg {
    let (fam, src) = if dst.contains(':') { ("AF_INET6", "fd00:1::2") } else { ("AF_INET", "192.168.1.2") };
    let py = format!(
        "import socket,time\ns=socket.socket(socket.{fam},socket.SOCK_DGRAM)\ns.bind(('{src}',{sport}))\n\
         if {tos}:\n    s.setsockopt(socket.IPPROTO_IP,socket.IP_TOS,{tos})\nend=time.time()+40\n\
         while time.time()<end:\n    try:\n        s.sendto(b'x'*200,('{dst}',{SINK_PORT}))\n\
         \x20   except OSError:\n        pass\n    time.sleep(0.01)\n"
    );
    Bg(lab.spawn(&lab.lan, &["python3", "-c", &py]).unwrap())
}

/// Both families' sink on the server (V6ONLY: each socket its own family).
fn dual_sink(lab: &Lab) -> Bg {
    let py = format!(
        "import socket,threading\ndef run(f,a):\n    s=socket.socket(f,socket.SOCK_DGRAM)\n\
         \x20   if f==socket.AF_INET6:\n        s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,1)\n\
         \x20   s.bind((a,{SINK_PORT}))\n    while True:\n        s.recv(2048)\n\
         threading.Thread(target=run,args=(socket.AF_INET6,'::'),daemon=True).start()\nrun(socket.AF_INET,'0.0.0.0')\n"
    );
    Bg(lab.spawn(&lab.wan, &["python3", "-c", &py]).unwrap())
}

/// Polls `done` on the status for up to `limit`; how long it took.
fn within(d: &Daemon, limit: Duration, done: impl Fn(&serde_json::Value) -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if done(&status(d)) {
            return Some(t0.elapsed());
        }
        sleep(Duration::from_millis(20));
    }
    None
}

/// A route on tos: the kernel sends a packet carrying that tos by it
/// (`fib_table_lookup` skips an alias whose dscp the flow's does not
/// match), the engine's lookup always asks with tos 0. A blackhole for tos
/// 0x10 added while a tos-0x10 stream is offloaded must stop it within a
/// second, as the kernel does; a connection under such a route is not
/// offloaded (status says why), and comes back when the route goes.
#[test]
fn a_route_on_tos_keeps_the_connections_under_it_on_the_slow_path() {
    let lab = Lab::up_unique("prt").unwrap_or_else(|e| panic!("{e:#}"));
    let _sink = dual_sink(&lab);
    let d = Daemon::start(&lab, &["--mode", "tc", "--idle-timeout", "60"]).unwrap_or_else(|e| panic!("{e:#}"));
    let _s = stream(&lab, "203.0.113.2", 42010, 0x10);
    assert!(within(&d, Duration::from_secs(5), |s| s["flows_offloaded"] == 1).is_some(), "{}", status(&d));
    lab.exec(&lab.rtr, &["ip", "route", "add", "blackhole", "203.0.113.2/32", "tos", "0x10"]).unwrap();
    let off = within(&d, Duration::from_secs(1), |s| s["flows_offloaded"] == 0);
    let (rx0, fp0) = (server_rx_v4(&lab), fast_path_packets(&d));
    sleep(Duration::from_secs(1));
    let (rx, fp) = (server_rx_v4(&lab) - rx0, fast_path_packets(&d) - fp0);
    eprintln!("tos route: off the fast path after {off:?}; then in a second {rx} packets reached the server, {fp} by the fast path");
    assert!(off.is_some() && rx < 5 && fp == 0, "the tos route was not followed: off after {off:?}, {rx} packets reached the server in a second, {fp} through the fast path");
    let why = "the route to 203.0.113.2 selects on tos";
    let _new = stream(&lab, "203.0.113.2", 42011, 0);
    let refused =
        within(&d, Duration::from_secs(3), |s| nft_offload_lab::not_offloaded(s).keys().any(|k| k.starts_with(why)));
    assert!(refused.is_some() && status(&d)["flows_offloaded"] == 0, "no `{why}` reason: {}", status(&d));
    lab.exec(&lab.rtr, &["ip", "route", "del", "blackhole", "203.0.113.2/32", "tos", "0x10"]).unwrap();
    let back = within(&d, Duration::from_secs(3), |s| s["flows_offloaded"] == 2);
    assert!(back.is_some(), "not offloaded again once the route went: {}", status(&d));
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

/// Multipath routes whose hash the lookup cannot reproduce. IPv6 hashes
/// each packet's flow label under the default policy 0 (`rt6_multipath_hash`):
/// a connection under such a route is not offloaded, and is once the route
/// is a single path. IPv4 hashes the addresses under policy 0, which the
/// lookup reproduces: offloaded; policy 1 takes a NIC's receive hash when
/// the packet has one (`fib_multipath_hash`: `skb->l4_hash`), so a
/// sysctl switching to it takes the connection off within the engine's
/// one-second look at it.
#[test]
fn multipath_routes_are_offloaded_only_where_the_lookup_hashes_as_the_kernel() {
    let lab = Lab::up_unique("prm").unwrap_or_else(|e| panic!("{e:#}"));
    let (rtr, wan) = (lab.rtr.clone(), lab.wan.clone());
    let run = |ns: &str, cmd: &str| {
        let args: Vec<&str> = cmd.split_whitespace().collect();
        lab.exec(ns, &args).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    };
    // Two gateways (both the server), a destination behind them per family.
    run(&wan, "ip addr add 203.0.113.3/24 dev wan0");
    run(&wan, "ip -6 addr add fd00:2::3/64 dev wan0 nodad");
    run(&wan, "ip addr add 198.51.100.7/32 dev lo");
    run(&wan, "ip -6 addr add fd00:9::7/128 dev lo");
    run(&rtr, "ip route add 198.51.100.0/24 nexthop via 203.0.113.2 dev rwan nexthop via 203.0.113.3 dev rwan");
    run(&rtr, "ip -6 route add fd00:9::/64 nexthop via fd00:2::2 dev rwan nexthop via fd00:2::3 dev rwan");
    run(&rtr, "sysctl -qw net.ipv4.fib_multipath_hash_policy=0 net.ipv6.fib_multipath_hash_policy=0");
    let _sink = dual_sink(&lab);
    let d = Daemon::start(&lab, &["--mode", "tc", "--idle-timeout", "60"]).unwrap_or_else(|e| panic!("{e:#}"));
    let _v4 = stream(&lab, "198.51.100.7", 42020, 0);
    let _v6 = stream(&lab, "fd00:9::7", 42021, 0);
    let why6 = "the multipath route to fd00:9::/64 picks its path by a hash of each packet's IPv6 flow label";
    let refused = |s: &serde_json::Value| nft_offload_lab::not_offloaded(s).keys().any(|k| k.starts_with(why6));
    let settled = within(&d, Duration::from_secs(5), |s| s["flows_offloaded"] == 1 && refused(s));
    let flows = d.flows().unwrap();
    let offloaded: Vec<String> = flows.iter().map(|f| f["orig"]["dst"].as_str().unwrap().to_string()).collect();
    eprintln!("offloaded: {offloaded:?}; {}", status(&d)["not_offloaded"]);
    assert!(
        settled.is_some() && offloaded == ["198.51.100.7"],
        "IPv4 by addresses offloaded, IPv6 by flow label not: {offloaded:?}\n{}",
        status(&d)
    );

    // IPv6 by one path: offloaded (the rescan after the route change).
    run(&rtr, "ip -6 route replace fd00:9::/64 via fd00:2::2 dev rwan");
    assert!(within(&d, Duration::from_secs(3), |s| s["flows_offloaded"] == 2).is_some(), "{}", status(&d));

    // IPv4 under the L4 policy: off within the second the engine takes to
    // read the sysctl again, plus the re-resolution.
    run(&rtr, "sysctl -qw net.ipv4.fib_multipath_hash_policy=1");
    let off = within(&d, Duration::from_secs(2), |s| s["flows_offloaded"] == 1);
    eprintln!("IPv4 off the fast path {off:?} after policy 1");
    let left: Vec<String> = d.flows().unwrap().iter().map(|f| f["orig"]["dst"].as_str().unwrap().to_string()).collect();
    assert!(off.is_some() && left == ["fd00:9::7"], "policy 1 not followed: {left:?}\n{}", status(&d));
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

/// Packets received by the server on wan0.
fn server_rx_v4(lab: &Lab) -> u64 {
    lab.iface_stats(&lab.wan, "wan0").unwrap().0
}
