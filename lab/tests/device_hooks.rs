//! What runs on a managed device that a fast-path redirect would skip
//! (`hooks`), end to end: sqm-scripts' shape (an HTB upload shaper on the
//! WAN's egress, the WAN's ingress redirected by u32 + mirred to an ifb
//! carrying the download shaper) and `table netdev` chains that set DSCP on
//! the LAN's ingress or the WAN's egress. The affected direction stays on
//! the slow path, so the kernel applies the hook to every packet; the other
//! direction stays fast. Changes made while a connection is offloaded reach
//! it within a second, both ways.
//!
//! Evidence is outside the engine: throughput at the client against the
//! shaper's rate, and a DSCP counter in the server's namespace.

use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nft_offload_lab::Background as Bg;
use nft_offload_lab::{Daemon, Lab, LabOpts};

/// The shapers' rate, and what a shaped transfer may reach at most.
const SHAPER_MBIT: f64 = 30.0;
const SHAPED_MAX_MBIT: f64 = SHAPER_MBIT * 1.5;
const ECHO_PORT: u16 = 9999;

fn lab() -> Lab {
    lab_with(false)
}

/// `xdp_safe`: veth ends set up for native XDP redirect (see `LabOpts`).
fn lab_with(xdp_safe: bool) -> Lab {
    static N: AtomicU32 = AtomicU32::new(0);
    let prefix = format!("dh{}x{}", std::process::id() % 100000, N.fetch_add(1, Ordering::SeqCst));
    let lab = Lab::up(&LabOpts { prefix, xdp_safe, isolate_router_cpu: false }).expect("lab up");
    lab.warm_neighbours().expect("neighbours");
    lab.load_ruleset().expect("ruleset");
    lab
}

fn run(lab: &Lab, ns: &str, cmd: &str) {
    let args: Vec<&str> = cmd.split_whitespace().collect();
    lab.exec(ns, &args).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
}

fn nft(lab: &Lab, ns: &str, script: &str) {
    lab.exec_stdin(ns, &["nft", "-f", "-"], script).unwrap_or_else(|e| panic!("nft {script}: {e:#}"));
}

fn daemon(lab: &Lab) -> Daemon {
    Daemon::start(lab, &[]).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The server's receive rate over `window`, in Mbit/s.
fn server_rx_mbit(lab: &Lab, window: Duration) -> f64 {
    let b0 = lab.iface_stats(&lab.wan, "wan0").unwrap().1;
    sleep(window);
    let b1 = lab.iface_stats(&lab.wan, "wan0").unwrap().1;
    (b1 - b0) as f64 * 8.0 / window.as_secs_f64() / 1e6
}

/// sqm-scripts' download side: an ifb with the shaper (TBF here: this
/// kernel has no cake), ready for the WAN's ingress to be redirected to.
fn ifb_shaper(lab: &Lab) {
    run(lab, &lab.rtr, "ip link add ifb4rwan type ifb");
    run(lab, &lab.rtr, "ip link set ifb4rwan up");
    run(lab, &lab.rtr, &format!("tc qdisc add dev ifb4rwan root tbf rate {SHAPER_MBIT}mbit burst 32k latency 100ms"));
    run(lab, &lab.rtr, "tc qdisc add dev rwan handle ffff: ingress");
}

const REDIRECT: &str =
    "tc filter add dev rwan parent ffff: pref 10 protocol all u32 match u32 0 0 action mirred egress redirect dev ifb4rwan";
const UNREDIRECT: &str = "tc filter del dev rwan parent ffff: pref 10";

/// sqm-scripts' upload side: HTB on the WAN's egress.
fn htb_upload_shaper(lab: &Lab) {
    run(lab, &lab.rtr, "tc qdisc add dev rwan root handle 1: htb default 10");
    run(lab, &lab.rtr, &format!("tc class add dev rwan parent 1: classid 1:10 htb rate {SHAPER_MBIT}mbit"));
}

fn iperf_server(lab: &Lab) -> Bg {
    let c = lab.spawn(&lab.wan, &["iperf3", "-s", "-p", "5201"]).unwrap();
    lab.wait_tcp_listen(&lab.wan, 5201, Duration::from_secs(5)).unwrap();
    Bg(c)
}

/// A TCP transfer from the client (`-R`: the server sends, a download).
fn iperf(lab: &Lab, cport: u16, extra: &[&str]) -> Child {
    let cp = cport.to_string();
    let mut a = vec!["iperf3", "-c", "203.0.113.2", "-p", "5201", "-J", "--cport", &cp];
    a.extend(extra);
    let mut cmd = lab.command(&lab.lan, &a);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().expect("iperf3 client")
}

/// What the receiver got, in Mbit/s.
fn iperf_mbit(c: Child) -> f64 {
    let out = c.wait_with_output().unwrap();
    let r = nft_offload_lab::iperf::parse_iperf(&String::from_utf8_lossy(&out.stdout), false)
        .unwrap_or_else(|e| panic!("{e:#}: {}", String::from_utf8_lossy(&out.stderr)));
    r.bits_per_second / 1e6
}

/// The offloaded connection from the client's `sport`.
fn flow(d: &Daemon, sport: u16) -> Option<serde_json::Value> {
    d.flows().unwrap_or_else(|e| panic!("{e:#}")).into_iter().find(|f| f["orig"]["sport"] == sport)
}

/// Why direction `dir` (0 original, 1 reply) of the connection goes
/// through the kernel, if it does; panics if it is not offloaded.
fn slow(d: &Daemon, sport: u16, dir: usize) -> Option<String> {
    let f = flow(d, sport).unwrap_or_else(|| panic!("connection from {sport} not offloaded: {:?}", d.flows()));
    f["slow"][dir].as_str().map(String::from)
}

/// Whether direction `dir` of the connection became `held` (or not)
/// within 1 s.
fn held_within_1s(d: &Daemon, sport: u16, dir: usize, held: bool) -> bool {
    let t0 = Instant::now();
    while slow(d, sport, dir).is_some() != held {
        if t0.elapsed() > Duration::from_secs(1) {
            return false;
        }
        sleep(Duration::from_millis(5));
    }
    true
}

/// `held_within_1s` or fail, naming the change.
fn wait_held(d: &Daemon, sport: u16, dir: usize, held: bool, what: &str) {
    assert!(held_within_1s(d, sport, dir, held), "{what}: not applied within 1 s");
}

/// After an nftables change: every offloaded connection went back through
/// the kernel's new rules and returns on its next packet the kernel
/// forwards. One datagram every 20 ms stands for the traffic until the
/// connection is back with direction `dir` held (or not), within 1 s.
fn wait_held_after_nft(lab: &Lab, d: &Daemon, sport: u16, dir: usize, held: bool, what: &str) {
    let t0 = Instant::now();
    loop {
        match flow(d, sport) {
            Some(f) if f["slow"][dir].is_string() == held => return,
            Some(_) => {}
            None => udp_burst_now(lab, sport, 1),
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "{what}: not applied within 1 s: {:?}", d.flows());
        sleep(Duration::from_millis(20));
    }
}

/// The client's receive rate over `window`, in Mbit/s.
fn client_rx_mbit(lab: &Lab, window: Duration) -> f64 {
    let b0 = lab.iface_stats(&lab.lan, &lab.lan_if).unwrap().1;
    sleep(window);
    let b1 = lab.iface_stats(&lab.lan, &lab.lan_if).unwrap().1;
    (b1 - b0) as f64 * 8.0 / window.as_secs_f64() / 1e6
}

fn ms(d: &[Duration]) -> String {
    let mut v: Vec<u128> = d.iter().map(|d| d.as_millis()).collect();
    v.sort();
    format!("median {} ms, max {} ms ({v:?})", v[v.len() / 2], v[v.len() - 1])
}

/// sqm-scripts' shape in place before the engine starts: downloads stay
/// under the ifb's shaper (the reply direction is held, with the reason),
/// uploads stay under the HTB and are offloaded (a TC redirect goes
/// through the WAN's qdisc).
#[test]
fn sqm_shape_keeps_downloads_and_uploads_shaped() {
    let lab = lab();
    ifb_shaper(&lab);
    run(&lab, &lab.rtr, REDIRECT);
    htb_upload_shaper(&lab);
    let d = daemon(&lab);
    let _srv = iperf_server(&lab);

    let down = iperf(&lab, 40001, &["-R", "-t", "4"]);
    sleep(Duration::from_millis(1500));
    let slow_down = [slow(&d, 40001, 0), slow(&d, 40001, 1)];
    let mbit = iperf_mbit(down);
    assert!(mbit < SHAPED_MAX_MBIT && mbit > 5.0, "download at {mbit:.1} Mbit/s through a {SHAPER_MBIT} Mbit/s shaper");
    eprintln!("sqm shape: download {mbit:.1} Mbit/s");
    let why = slow_down[1].clone().expect("the download direction is held");
    assert!(why.starts_with("tc ingress filter u32 on rwan redirects to ifb4rwan (shaping qdisc tbf there"), "{why}");
    assert!(why.contains("shape on the egress of rlan"), "the remedy names the LAN port: {why}");
    assert_eq!(slow_down[0], None, "the ACKs (upload direction) stay fast");
    let st = d.status().unwrap();
    // Counted per skb: the server's veth sends GSO packets.
    assert!(st["slow_path"]["held_ingress_hook"].as_u64() > Some(100), "{st}");

    let up = iperf(&lab, 40002, &["-t", "4"]);
    sleep(Duration::from_millis(1500));
    let f = flow(&d, 40002).expect("the upload is offloaded");
    assert!(f["slow"][0].is_null(), "uploads leave by rwan's HTB through a TC redirect: {f}");
    let p0 = f["packets_orig"].as_u64().unwrap();
    sleep(Duration::from_millis(1000));
    let p1 = flow(&d, 40002).unwrap()["packets_orig"].as_u64().unwrap();
    assert!(p1 - p0 > 500, "upload packets on the fast path in 1 s: {}", p1 - p0);
    let mbit = iperf_mbit(up);
    assert!(mbit < SHAPED_MAX_MBIT && mbit > 5.0, "upload at {mbit:.1} Mbit/s through a {SHAPER_MBIT} Mbit/s HTB");
    eprintln!("sqm shape: upload {mbit:.1} Mbit/s, offloaded");
}

/// SQM enabled while a download is offloaded: within a second its
/// direction is held and the download runs at the shaper's rate; the
/// filter removed, it is back on the fast path. A few rounds measure how
/// long a change takes to reach the connection.
#[test]
fn sqm_enabled_while_offloaded_shapes_within_a_second() {
    let lab = lab();
    ifb_shaper(&lab);
    let d = daemon(&lab);
    let _srv = iperf_server(&lab);
    let down = iperf(&lab, 40003, &["-R", "-t", "14"]);
    sleep(Duration::from_millis(1500));
    assert_eq!(slow(&d, 40003, 1), None, "offloaded, fast");
    let fast = client_rx_mbit(&lab, Duration::from_millis(500));
    assert!(fast > 3.0 * SHAPED_MAX_MBIT, "unshaped and offloaded: {fast:.0} Mbit/s");
    let (mut on, mut off, mut cmd) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        let t0 = Instant::now();
        run(&lab, &lab.rtr, REDIRECT);
        cmd.push(t0.elapsed());
        let held = held_within_1s(&d, 40003, 1, true);
        on.push(t0.elapsed());
        sleep(Duration::from_millis(1000).saturating_sub(t0.elapsed()));
        let shaped = client_rx_mbit(&lab, Duration::from_millis(1000));
        assert!(shaped < SHAPED_MAX_MBIT, "round {round}: {shaped:.1} Mbit/s from 1 s after the shaper came on");
        assert!(held, "tc filter add: not applied within 1 s");
        assert_eq!(slow(&d, 40003, 0), None, "the other direction stays fast");
        let t0 = Instant::now();
        run(&lab, &lab.rtr, UNREDIRECT);
        wait_held(&d, 40003, 1, false, "tc filter del");
        off.push(t0.elapsed());
        sleep(Duration::from_millis(500));
        let fast = client_rx_mbit(&lab, Duration::from_millis(500));
        assert!(fast > 3.0 * SHAPED_MAX_MBIT, "round {round}: back on the fast path at {fast:.0} Mbit/s");
    }
    eprintln!("tc filter add -> download held: {} (the tc command itself: {})", ms(&on), ms(&cmd));
    eprintln!("tc filter del -> download fast again: {}", ms(&off));
    iperf_mbit(down);
}

/// `--mode xdp`: an XDP redirect would skip the WAN's qdisc, so a shaper
/// added there while an upload is offloaded holds the upload within a
/// second and the kernel shapes it; the ACKs stay on the XDP fast path.
#[test]
fn xdp_mode_never_redirects_past_a_shaper() {
    let lab = lab_with(true);
    let d = Daemon::start(&lab, &["--mode", "xdp"]).unwrap_or_else(|e| panic!("{e:#}"));
    let _srv = iperf_server(&lab);
    let up = iperf(&lab, 40004, &["-t", "8"]);
    sleep(Duration::from_millis(1500));
    assert_eq!(flow(&d, 40004).expect("offloaded")["mode"], "xdp");
    assert_eq!(slow(&d, 40004, 0), None, "no shaper yet: fast");
    let t0 = Instant::now();
    htb_upload_shaper(&lab);
    let held = held_within_1s(&d, 40004, 0, true);
    eprintln!("xdp: htb added -> upload held after {} ms", t0.elapsed().as_millis());
    sleep(Duration::from_millis(1000));
    let shaped = server_rx_mbit(&lab, Duration::from_millis(1500));
    assert!(shaped < SHAPED_MAX_MBIT, "upload at {shaped:.1} Mbit/s through a {SHAPER_MBIT} Mbit/s HTB");
    assert!(held, "tc qdisc add htb: not applied within 1 s");
    let why = slow(&d, 40004, 0).unwrap();
    assert!(why.starts_with("shaping qdisc htb on rwan: an XDP redirect (ndo_xdp_xmit) skips"), "{why}");
    assert!(why.ends_with("use --mode tc (a TC redirect keeps the qdisc and tc egress filters)"), "{why}");
    assert_eq!(slow(&d, 40004, 1), None, "the ACKs leave by rlan, which has no shaper");
    let st = d.status().unwrap();
    assert!(st["slow_path"]["held_egress_hook"].as_u64() > Some(100), "{st}");
    iperf_mbit(up);
}

/// The server's count of echo datagrams that arrived marked cs1.
fn marked_at_server(lab: &Lab) -> u64 {
    let out = lab.exec(&lab.wan, &["nft", "-j", "list", "counter", "netdev", "srv", "cs1"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nftables"][1]["counter"]["packets"].as_u64().unwrap_or_else(|| panic!("no counter in {out}"))
}

/// A UDP echo server on the WAN side, and the counter of cs1-marked
/// datagrams arriving at it.
fn echo_server(lab: &Lab) -> Bg {
    nft(
        lab,
        &lab.wan,
        "table netdev srv {\n counter cs1 {}\n chain in {\n  type filter hook ingress device wan0 priority 0;\n  \
         udp dport 9999 ip dscp cs1 counter name cs1\n }\n}\n",
    );
    let py = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',{ECHO_PORT}))\n\
         while True:\n    b,a=s.recvfrom(2048)\n    s.sendto(b,a)\n"
    );
    Bg(lab.spawn(&lab.wan, &["python3", "-c", &py]).unwrap())
}

/// `count` datagrams from the client's `sport` to the echo server, and
/// time for the counts to settle.
fn udp_burst(lab: &Lab, sport: u16, count: u32) {
    udp_burst_now(lab, sport, count);
    // The last echoes arrive, and the engine reads the fast path's
    // counters every 250 ms (keepalive).
    sleep(Duration::from_millis(600));
}

/// `count` datagrams from `sport` to the echo server, 4 ms apart, without
/// waiting for the echoes.
fn udp_burst_now(lab: &Lab, sport: u16, count: u32) {
    let py = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('192.168.1.2',{sport}))\n\
         for i in range({count}):\n    s.sendto(b'x'*200,('203.0.113.2',{ECHO_PORT}))\n    time.sleep(0.004)\n"
    );
    lab.exec(&lab.lan, &["python3", "-c", &py]).unwrap();
}

/// A chain on `hook` of `dev` setting cs1 on the echo traffic.
fn dscp_chain(hook: &str, dev: &str) -> String {
    format!(
        "table netdev nfo_dscp {{\n chain dscp {{\n  type filter hook {hook} device {dev} priority 0;\n  \
         udp dport {ECHO_PORT} ip dscp set cs1\n }}\n}}\n"
    )
}

/// A DSCP-setting netdev chain present before the connection starts, then
/// removed and added again while it is offloaded: every upload datagram
/// the chain's hook sees arrives marked, replies stay on the fast path,
/// and the changes reach the connection within a second.
fn dscp_chain_marks_every_packet(hook: &str, dev: &str, why_start: &str) {
    let lab = lab();
    let _echo = echo_server(&lab);
    nft(&lab, &lab.rtr, &dscp_chain(hook, dev));
    let d = daemon(&lab);
    let sport = 42100;
    udp_burst(&lab, sport, 20);
    let (m0, r0) = (marked_at_server(&lab), flow(&d, sport).unwrap()["packets_reply"].as_u64().unwrap());
    udp_burst(&lab, sport, 300);
    let (m1, r1) = (marked_at_server(&lab), flow(&d, sport).unwrap()["packets_reply"].as_u64().unwrap());
    assert_eq!(m1 - m0, 300, "every upload datagram marked by the {hook} chain on {dev}");
    assert!(r1 - r0 >= 290, "the echoes (download direction) stay on the fast path: {} of 300", r1 - r0);
    let why = slow(&d, sport, 0).expect("the upload direction is held");
    assert!(why.starts_with(why_start), "{why}");

    let (mut on, mut off, mut cmd) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let t0 = Instant::now();
        run(&lab, &lab.rtr, "nft delete table netdev nfo_dscp");
        wait_held_after_nft(&lab, &d, sport, 0, false, "nft delete table");
        off.push(t0.elapsed());
        let t0 = Instant::now();
        nft(&lab, &lab.rtr, &dscp_chain(hook, dev));
        cmd.push(t0.elapsed());
        wait_held_after_nft(&lab, &d, sport, 0, true, "nft add chain");
        on.push(t0.elapsed());
    }
    eprintln!("nft add chain netdev ({hook} {dev}) -> upload held: {} (nft itself: {})", ms(&on), ms(&cmd));
    eprintln!("nft delete table netdev ({hook} {dev}) -> upload fast again: {}", ms(&off));
    let m0 = marked_at_server(&lab);
    udp_burst(&lab, sport, 300);
    assert_eq!(marked_at_server(&lab) - m0, 300, "held again: every datagram marked");

    // Removed: back on the fast path, unmarked.
    run(&lab, &lab.rtr, "nft delete table netdev nfo_dscp");
    wait_held_after_nft(&lab, &d, sport, 0, false, "nft delete table");
    let (m0, p0) = (marked_at_server(&lab), flow(&d, sport).unwrap()["packets_orig"].as_u64().unwrap());
    udp_burst(&lab, sport, 300);
    let (m1, p1) = (marked_at_server(&lab), flow(&d, sport).unwrap()["packets_orig"].as_u64().unwrap());
    assert_eq!(m1 - m0, 0, "no chain, no mark");
    assert!(p1 - p0 >= 290, "the upload direction is fast again: {} of 300", p1 - p0);
}

#[test]
fn netdev_ingress_chain_on_the_lan_marks_every_upload_packet() {
    dscp_chain_marks_every_packet("ingress", "rlan", "nft chain netdev nfo_dscp dscp on rlan ingress: ");
}

#[test]
fn netdev_egress_chain_on_the_wan_marks_every_upload_packet() {
    dscp_chain_marks_every_packet(
        "egress",
        "rwan",
        "nft chain netdev nfo_dscp dscp on rwan egress: a TC redirect skips netdev egress chains",
    );
}

/// A `--nft` ruleset: a flowtable for both ports, masquerade, and with
/// `dscp` the marking chain on the LAN's ingress.
fn nft_mode_ruleset(dscp: bool) -> String {
    let chain = if dscp { dscp_chain("ingress", "rlan") } else { String::new() };
    format!(
        "table inet fw4 {{\n flowtable ft {{\n  hook ingress priority 0;\n  devices = {{ \"rlan\", \"rwan\" }};\n }}\n \
         chain forward {{\n  type filter hook forward priority filter; policy drop;\n  \
         meta l4proto {{ tcp, udp }} flow offload @ft\n  ct state vmap {{ established : accept, related : accept }}\n  \
         iifname \"rlan\" oifname \"rwan\" accept\n }}\n chain srcnat {{\n  \
         type nat hook postrouting priority srcnat; policy accept;\n  oifname \"rwan\" meta nfproto ipv4 masquerade\n \
         }}\n}}\n{chain}"
    )
}

/// The engine's own ruleset (`run --nft`) counts: its netdev chain holds
/// the uploads (every one marked), and a reload without it brings them back
/// to the fast path, unmarked.
#[test]
fn nft_mode_ruleset_with_a_netdev_chain_holds_its_direction() {
    let lab = lab();
    let _echo = echo_server(&lab);
    let dir = std::env::temp_dir().join(format!("nfo-{}", lab.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let (with, without) = (dir.join("with.nft"), dir.join("without.nft"));
    std::fs::write(&with, nft_mode_ruleset(true)).unwrap();
    std::fs::write(&without, nft_mode_ruleset(false)).unwrap();
    let d = Daemon::start_raw(&lab, &["--nft", with.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e:#}"));
    let sport = 42200;
    udp_burst(&lab, sport, 20);
    let m0 = marked_at_server(&lab);
    udp_burst(&lab, sport, 300);
    assert_eq!(marked_at_server(&lab) - m0, 300, "every upload datagram marked by the ruleset's own chain");
    let why = slow(&d, sport, 0).expect("the upload direction is held");
    assert!(why.starts_with("nft chain netdev nfo_dscp dscp on rlan ingress: "), "{why}");
    assert_eq!(slow(&d, sport, 1), None, "the echoes stay fast");

    let out = d.cli(&["reload", "--nft", without.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.contains("reloaded"), "{out}");
    udp_burst(&lab, sport, 20);
    let (m0, p0) =
        (marked_at_server(&lab), flow(&d, sport).expect("offloaded again")["packets_orig"].as_u64().unwrap());
    udp_burst(&lab, sport, 300);
    let (m1, p1) = (marked_at_server(&lab), flow(&d, sport).unwrap()["packets_orig"].as_u64().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(m1 - m0, 0, "the chain went with the reload");
    assert!(p1 - p0 >= 290, "the upload direction is fast: {} of 300", p1 - p0);
    assert_eq!(slow(&d, sport, 0), None);
}
