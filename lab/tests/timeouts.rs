//! End to end, the engine and time: offloaded connections follow conntrack's
//! current timeouts (a sysctl changed while the engine runs), and the fast
//! path steps aside while the engine is stalled (its heartbeat goes stale).
//! Run under the machine-wide e2e lock, like tests/e2e.rs.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nft_offload_lab::Background as Bg;
use nft_offload_lab::{Daemon, Lab, LabOpts};

fn lab() -> Lab {
    static N: AtomicU32 = AtomicU32::new(0);
    let prefix = format!("tmo{}x{}", std::process::id() % 100000, N.fetch_add(1, Ordering::SeqCst));
    let lab = Lab::up(&LabOpts { prefix, xdp_safe: false, isolate_router_cpu: false }).expect("lab up");
    lab.warm_neighbours().expect("neighbours");
    lab
}

/// A UDP echo server on the WAN host (port 9999): replies make the
/// connection a stream in conntrack's eyes (SEEN_REPLY).
fn udp_echo(lab: &Lab) -> Bg {
    let py = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',9999))\n\
              while True:\n    d,a=s.recvfrom(2048)\n    s.sendto(d,a)\n";
    let bg = Bg(lab.spawn(&lab.wan, &["python3", "-c", py]).unwrap());
    lab.wait_udp_bound(&lab.wan, 9999, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e:#}"));
    bg
}

/// The LAN client sends from `sport` to the echo server at `pps` for
/// `secs`, in the background.
fn udp_stream(lab: &Lab, sport: u16, pps: u32, secs: u32) -> Bg {
    let py = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('192.168.1.2',{sport}))\n\
         s.setblocking(False)\nend=time.time()+{secs}\nwhile time.time()<end:\n    s.sendto(b'x'*200,('203.0.113.2',9999))\n\
         \x20   try:\n        s.recv(2048)\n    except BlockingIOError:\n        pass\n    time.sleep({})\n",
        1.0 / f64::from(pps)
    );
    Bg(lab.spawn(&lab.lan, &["python3", "-c", &py]).unwrap())
}

/// Conntrack ids of the router's UDP entries toward port 9999.
fn ct_ids(lab: &Lab) -> Vec<u64> {
    let out = lab.exec(&lab.rtr, &["conntrack", "-L", "-p", "udp", "--dport", "9999", "-o", "id"]).unwrap_or_default();
    out.split_whitespace().filter_map(|w| w.strip_prefix("id=")).filter_map(|v| v.parse().ok()).collect()
}

/// A sysctl of the router's namespace, set for the guard's life and
/// restored when it drops (also when an assertion fails).
struct Sysctl<'a> {
    lab: &'a Lab,
    key: &'static str,
    old: String,
}

impl<'a> Sysctl<'a> {
    fn set(lab: &'a Lab, key: &'static str, value: &str) -> Sysctl<'a> {
        let old = lab.exec(&lab.rtr, &["sysctl", "-n", key]).unwrap().trim().to_string();
        lab.exec(&lab.rtr, &["sysctl", "-qw", &format!("{key}={value}")]).unwrap();
        Sysctl { lab, key, old }
    }
}

impl Drop for Sysctl<'_> {
    fn drop(&mut self) {
        let _ = self.lab.exec(&self.lab.rtr, &["sysctl", "-qw", &format!("{}={}", self.key, self.old)]);
    }
}

fn wait_offloaded(d: &Daemon, n: u64) {
    let t0 = Instant::now();
    while d.status().unwrap()["flows_offloaded"].as_u64() != Some(n) {
        assert!(t0.elapsed() < Duration::from_secs(5), "not offloaded: {}", d.status().unwrap());
        sleep(Duration::from_millis(100));
    }
}

/// The stream timeout is shortened to 8 s while the engine runs, then a
/// UDP stream starts and runs for 30 s on the fast path. Conntrack gave the
/// entry its unreplied timeout (30 s) from the slow-path packets; an engine
/// refreshing with the cached start-up values (120 s, every 40 s) let the
/// entry expire and be recreated. Now: the same entry all along, and once
/// the stream stops it expires within the 8 s conntrack would give it (not
/// 120 s later), whoever keeps it alive: `keepalive` is the `--keepalive`
/// value.
fn stream_keeps_its_entry_and_ages_out(keepalive: &str) {
    let lab = lab();
    let args = ["--mode", "tc", "--idle-timeout", "60", "--keepalive", keepalive];
    let d = Daemon::start(&lab, &args).unwrap_or_else(|e| panic!("{e:#}"));
    let fast = keepalive == "auto";
    let feature = d.status().unwrap()["kernel"]["features"]
        .as_array()
        .and_then(|f| f.iter().find(|l| l["name"] == "keepalive").cloned())
        .unwrap_or_default();
    assert_eq!(feature["value"], if fast { "fast_path" } else { "netlink" }, "{feature}");
    let _echo = udp_echo(&lab);
    let _short = Sysctl::set(&lab, "net.netfilter.nf_conntrack_udp_timeout_stream", "8");
    // the engine reads the sysctls once a second
    sleep(Duration::from_millis(1500));
    let stream = udp_stream(&lab, 41500, 20, 30);
    wait_offloaded(&d, 1);
    let ids = ct_ids(&lab);
    assert_eq!(ids.len(), 1, "one conntrack entry: {ids:?}");
    let t0 = Instant::now();
    let fwd0 = lab.counter_packets("fwd_all").unwrap();
    while t0.elapsed() < Duration::from_secs(27) {
        sleep(Duration::from_secs(3));
        assert_eq!(ct_ids(&lab), ids, "the entry expired and was recreated after {:?}", t0.elapsed());
    }
    // still offloaded: the forward chain saw (almost) none of the ~550 packets
    let fwd = lab.counter_packets("fwd_all").unwrap() - fwd0;
    assert!(fwd < 50, "forward chain counted {fwd} packets: not on the fast path");
    let st = d.status().unwrap();
    let (engine, fast_path) = (st["conntrack_refreshes"].as_u64(), st["fast_path_ct_refreshes"].as_u64());
    if fast {
        // Kept alive through three timeouts without one engine refresh.
        assert!(engine == Some(0) && fast_path.unwrap_or(0) >= 20, "{st}");
    } else {
        assert!(engine.unwrap_or(0) >= 7 && fast_path == Some(0), "{st}");
    }
    drop(stream);
    let t1 = Instant::now();
    if fast {
        // Refreshed at most an eighth of the 8 s (1 s, the floor) before the
        // last packet: conntrack
        // keeps the entry at least 7 of the 8 s after it.
        sleep(Duration::from_millis(5500));
        assert_eq!(ct_ids(&lab), ids, "expired early: gone {:?} after the last packet", t1.elapsed());
    }
    // The last refresh gave it at most 8 s (the engine's, over ctnetlink, a
    // tick or a few later than the last packet).
    let limit = Duration::from_secs(if fast { 10 } else { 14 });
    while !ct_ids(&lab).is_empty() {
        assert!(t1.elapsed() < limit, "entry outlived the 8 s stream timeout: {:?}", t1.elapsed());
        sleep(Duration::from_millis(250));
    }
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

/// The fast path keeps the entry alive itself (conntrack kfuncs): the
/// engine sends no refresh at all.
#[test]
fn fast_path_keepalive_keeps_a_stream_s_entry_without_the_engine() {
    stream_keeps_its_entry_and_ages_out("auto");
}

/// The fallback, forced: the engine refreshes over ctnetlink.
#[test]
fn netlink_keepalive_follows_a_shortened_udp_stream_timeout() {
    stream_keeps_its_entry_and_ages_out("netlink");
}

/// SIGCONT on drop, so a failed assertion never leaves the engine stopped.
struct Stopped(u32);

impl Stopped {
    fn stop(pid: u32) -> Stopped {
        signal(pid, "-STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Forward-chain packets counted over `window`.
fn fwd_over(lab: &Lab, window: Duration) -> u64 {
    let c0 = lab.counter_packets("fwd_all").unwrap();
    sleep(window);
    lab.counter_packets("fwd_all").unwrap() - c0
}

/// A stalled engine (SIGSTOP, not dead: its links stay attached) no longer
/// follows conntrack, routes or the ruleset: within a few seconds its
/// offloaded connections go back to the kernel, and they return to the
/// fast path when it runs again.
#[test]
fn stalled_engine_steps_aside() {
    let lab = lab();
    let d = Daemon::start(&lab, &["--mode", "tc", "--idle-timeout", "60"]).unwrap_or_else(|e| panic!("{e:#}"));
    let _echo = udp_echo(&lab);
    let _stream = udp_stream(&lab, 41600, 100, 30);
    wait_offloaded(&d, 1);
    sleep(Duration::from_millis(500));
    let fast = fwd_over(&lab, Duration::from_secs(1));
    assert!(fast < 10, "offloaded, yet the forward chain counted {fast} packets in 1 s");
    let stopped = Instant::now();
    let guard = Stopped::stop(d.pid());
    // FO_STALE_ENGINE_NS is 3 s; measured from 4 s on
    sleep(Duration::from_secs(4).saturating_sub(stopped.elapsed()));
    let slow = fwd_over(&lab, Duration::from_secs(1));
    assert!(slow > 100, "engine stopped for 4 s, yet only {slow} packets in 1 s took the slow path");
    drop(guard);
    sleep(Duration::from_millis(1500));
    let back = fwd_over(&lab, Duration::from_secs(1));
    assert!(back < 10, "engine running again, yet {back} packets in 1 s took the slow path");
    let st = d.status().unwrap();
    assert!(st["slow_path"]["stale_engine"].as_u64().unwrap_or(0) > 100, "{st}");
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

/// A short request/response exchange (ten in half a second) is no stream
/// yet: `nf_conntrack_udp_packet` gives a replied entry the unreplied
/// timeout and no ASSURED until two seconds after its first packet
/// (`stream_ts`). The fast path, which forwards all but the first packets
/// here and refreshes the entry on them, must leave it so: at most 30 s, not
/// ASSURED (before: 120 s and ASSURED, outliving what conntrack would give).
#[test]
fn a_short_udp_exchange_is_no_stream_yet() {
    let lab = lab();
    let d = Daemon::start(&lab, &["--mode", "tc", "--idle-timeout", "60"]).unwrap_or_else(|e| panic!("{e:#}"));
    let _echo = udp_echo(&lab);
    let py = "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('192.168.1.2',41710))\n\
              s.settimeout(3)\nfor i in range(10):\n    s.sendto(b'q'*40,('203.0.113.2',9999))\n    s.recv(2048)\n\
              \x20   time.sleep(0.05)\n";
    lab.exec(&lab.lan, &["python3", "-c", py]).unwrap_or_else(|e| panic!("the exchange failed: {e:#}"));
    let line = ct_line(&lab, 41710);
    let st = d.status().unwrap();
    let flow = d.flows().unwrap().into_iter().find(|f| f["orig"]["sport"] == 41710);
    let fast = flow.as_ref().and_then(|f| f["packets_orig"].as_u64()).unwrap_or(0);
    // Offloaded on its second packet: the fast path forwarded the rest and
    // refreshed the entry as it did.
    assert!(fast >= 5 && st["fast_path_ct_refreshes"].as_u64().unwrap_or(0) >= 1, "{flow:?}\n{st}");
    assert!(!line.contains("UNREPLIED") && !line.contains("ASSURED"), "{line}");
    assert!(ct_timeout(&line) <= 30, "a half-second exchange got the stream timeout: {line}");
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

/// The router's conntrack line for the UDP connection from `sport`.
fn ct_line(lab: &Lab, sport: u16) -> String {
    lab.exec(&lab.rtr, &["conntrack", "-L", "-p", "udp", "--orig-port-src", &sport.to_string()]).unwrap_or_default()
}

/// The timeout conntrack shows (`udp 17 TIMEOUT src=...`).
fn ct_timeout(line: &str) -> u64 {
    line.split_whitespace().nth(2).and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("no timeout in {line:?}"))
}

/// UDP as the kernel's flowtable takes it: `flow add` (`nft_flow_offload_eval`)
/// offloads only a confirmed entry, so never on a connection's first packet;
/// a request's reply passes conntrack first. So a DNS-like exchange (one
/// query, one answer) leaves the entry replied, with the 30 s conntrack
/// gives it then (not the 120 s stream timeout); a stream of them becomes
/// ASSURED (early_drop spares it), as conntrack makes it on the packet
/// after the reply; and its later slow-path packets are `ct state
/// established` to the ruleset, not `new`.
#[test]
fn udp_replies_pass_conntrack_before_offload() {
    let lab = lab();
    let d = Daemon::start(&lab, &["--mode", "tc", "--idle-timeout", "2"]).unwrap_or_else(|e| panic!("{e:#}"));
    let _echo = udp_echo(&lab);
    let nft = |cmd: &str| lab.exec(&lab.rtr, &["nft", cmd]).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    nft("add counter inet fw4 ctnew");
    nft("insert rule inet fw4 forward udp dport 9999 ct state new counter name ctnew");

    // One query, one answer.
    let query = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('192.168.1.2',41700))\n\
                 s.settimeout(2)\ns.sendto(b'q'*40,('203.0.113.2',9999))\ns.recv(2048)\n";
    lab.exec(&lab.lan, &["python3", "-c", query]).unwrap_or_else(|e| panic!("the query got no answer: {e:#}"));
    // Past keepalive's first look (250 ms) and a refresh's minimum gap.
    sleep(Duration::from_millis(1500));
    let one = ct_line(&lab, 41700);
    let (unreplied, timeout) = (one.contains("UNREPLIED"), ct_timeout(&one));
    eprintln!("after one exchange: unreplied {unreplied}, timeout {timeout} s: {}", one.trim());

    // A request/response stream, 50 a second for 4 s.
    let stream = udp_stream(&lab, 41701, 50, 4);
    let t0 = Instant::now();
    while !d.flows().unwrap().iter().any(|f| f["orig"]["sport"] == 41701) {
        assert!(t0.elapsed() < Duration::from_secs(5), "the stream was not offloaded: {}", d.status().unwrap());
        sleep(Duration::from_millis(50));
    }
    sleep(Duration::from_secs(3));
    let busy = ct_line(&lab, 41701);
    let fast = d.flows().unwrap().iter().find(|f| f["orig"]["sport"] == 41701).map(|f| f["packets_orig"].clone());
    eprintln!("stream: {} (fast path packets {fast:?})", busy.trim());
    drop(stream);
    // Idle (2 s), then one more packet through the kernel.
    sleep(Duration::from_secs(4));
    let new0 = lab.counter_packets("ctnew").unwrap();
    let again = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('192.168.1.2',41701))\n\
                 s.sendto(b'x'*200,('203.0.113.2',9999))\n";
    lab.exec(&lab.lan, &["python3", "-c", again]).unwrap();
    sleep(Duration::from_millis(200));
    let new_later = lab.counter_packets("ctnew").unwrap() - new0;
    eprintln!("a packet after the idle teardown counted as ct state new: {new_later}");

    assert!(!unreplied && timeout <= 30, "one exchange: the reply skipped conntrack or got the stream timeout: {one}");
    assert!(busy.contains("ASSURED") && !busy.contains("UNREPLIED"), "the stream is not replied and assured: {busy}");
    assert!(fast.and_then(|p| p.as_u64()).is_some_and(|p| p > 50), "the stream was not on the fast path");
    assert_eq!(new_later, 0, "the ruleset saw a later packet of a replied stream as new");
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}
