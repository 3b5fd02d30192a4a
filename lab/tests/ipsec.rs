//! IPsec end to end: xfrm policies on the lab router, whose kernel has XFRM
//! but no ESP, so a policy whose template has no SA makes the kernel drop
//! what it covers (`xfrm_lookup` finds no state; the fwd check finds no
//! secpath). Whatever the fast path still delivers to the other side left
//! the router in clear: the evidence is what the peer received, and when.
//!
//! Run under the machine-wide e2e lock, like tests/e2e.rs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nft_offload_lab::{Background, Daemon, Lab};
use serde_json::Value;

/// How long a policy change may take to reach an offloaded connection.
const BUDGET: Duration = Duration::from_secs(1);

fn lab() -> Lab {
    Lab::up_unique("ips").unwrap_or_else(|e| panic!("lab up: {e:#}"))
}

fn spawn(lab: &Lab, ns: &str, py: &str, args: &[&str]) -> Background {
    let mut argv = vec!["python3", "-c", py];
    argv.extend(args);
    let mut c = lab.command(ns, &argv);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
    Background(lab.spawn_cmd(c).unwrap_or_else(|e| panic!("{e:#}")))
}

/// CLOCK_MONOTONIC in ns: what python's time.monotonic_ns() reads in every
/// namespace.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The WAN host's echo server on port 9999 (`udp` or `tcp`): echoes what it
/// receives and writes one line per arrival, `<monotonic ns> <bytes>`.
fn server(lab: &Lab, proto: &str, log: &Path) -> Background {
    let py = r#"
import socket,sys,time
proto,log=sys.argv[1],open(sys.argv[2],'w',buffering=1)
def note(d): log.write('%d %d\n'%(time.monotonic_ns(),len(d)))
if proto=='udp':
    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0',9999))
    while True:
        d,a=s.recvfrom(4096); note(d); s.sendto(d,a)
l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); l.bind(('0.0.0.0',9999)); l.listen(8)
while True:
    c,_=l.accept(); c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)
    while True:
        d=c.recv(65536)
        if not d: break
        note(d); c.sendall(d)
"#;
    spawn(lab, &lab.wan, py, &[proto, log.to_str().unwrap()])
}

/// The LAN client: from `sport`, a line every 5 ms (200 pps) to the server,
/// reading the echoes, until killed. `log` gets a line per echo received.
fn client(lab: &Lab, proto: &str, sport: u16, log: &Path) -> Background {
    let py = r#"
import socket,sys,time
proto,sport,log=sys.argv[1],int(sys.argv[2]),open(sys.argv[3],'w',buffering=1)
kind=socket.SOCK_DGRAM if proto=='udp' else socket.SOCK_STREAM
s=socket.socket(socket.AF_INET,kind); s.bind(('192.168.1.2',sport))
if proto=='tcp': s.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)
s.connect(('203.0.113.2',9999)); s.setblocking(False)
i=0
while True:
    try: s.send(b'%d\n'%i)
    except OSError: pass
    try:
        while True:
            d=s.recv(65536)
            log.write('%d %d\n'%(time.monotonic_ns(),len(d)))
    except OSError: pass
    i+=1; time.sleep(0.005)
"#;
    spawn(lab, &lab.lan, py, &[proto, &sport.to_string(), log.to_str().unwrap()])
}

/// Arrival times (monotonic ns) in a log written by `server` or `client`.
fn arrivals(log: &Path) -> Vec<u64> {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    s.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect()
}

fn ip(lab: &Lab, args: &str) {
    let argv: Vec<&str> = std::iter::once("ip").chain(args.split_whitespace()).collect();
    lab.exec(&lab.rtr, &argv).unwrap_or_else(|e| panic!("ip {args}: {e:#}"));
}

/// Our connection in `flows -o json` (by its client port), if offloaded.
fn flow(d: &Daemon, sport: u16) -> Option<Value> {
    d.flows().unwrap_or_else(|e| panic!("{e:#}")).into_iter().find(|f| f["orig"]["sport"] == sport)
}

/// Wait up to `within` for the connection's flows entry to satisfy `ok`;
/// returns it and how long it took.
fn wait_flow(d: &Daemon, sport: u16, within: Duration, what: &str, ok: impl Fn(&Value) -> bool) -> (Value, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(f) = flow(d, sport).filter(|f| ok(f)) {
            return (f, t0.elapsed());
        }
        assert!(t0.elapsed() < within, "{what}: not within {within:?}; flows: {:?}", flow(d, sport));
        sleep(Duration::from_millis(10));
    }
}

fn slow(f: &Value, dir: usize) -> Option<&str> {
    f["slow"][dir].as_str()
}

fn both_fast(f: &Value) -> bool {
    f["slow"][0].is_null() && f["slow"][1].is_null()
}

fn status(d: &Daemon) -> Value {
    d.status().unwrap_or_else(|e| panic!("{e:#}"))
}

struct Run {
    _dir: tempfile::TempDir,
    server_log: PathBuf,
    client_log: PathBuf,
}

fn logs() -> Run {
    let dir = tempfile::Builder::new().prefix("nfo-ipsec-").tempdir().unwrap();
    let (server_log, client_log) = (dir.path().join("server.log"), dir.path().join("client.log"));
    Run { _dir: dir, server_log, client_log }
}

/// A policy added while the connection is offloaded reaches it within a
/// second: no packet of the covered direction reaches the peer after that
/// (the kernel drops them, lacking an SA), `flows` shows the direction on
/// the slow path with the policy, the other direction stays fast; deleted,
/// both directions are fast again. Returns the ms from `ip xfrm policy add`
/// to the last packet the peer received.
fn policy_while_offloaded(proto: &str, sport: u16, policy: &str) -> u64 {
    let lab = lab();
    let run = logs();
    let _server = server(&lab, proto, &run.server_log);
    let d = Daemon::start(&lab, &[]).unwrap_or_else(|e| panic!("{e:#}"));
    let _client = client(&lab, proto, sport, &run.client_log);
    wait_flow(&d, sport, Duration::from_secs(5), "offloaded, both directions used", |f| {
        both_fast(f) && f["packets_orig"].as_u64() > Some(20) && f["packets_reply"].as_u64() > Some(20)
    });

    let held0 = status(&d)["slow_path"]["held_xfrm"].as_u64().unwrap_or(0);
    let t_add = mono_ns();
    ip(&lab, &format!("xfrm policy add {policy}"));
    // The client keeps sending: everything after the budget is dropped.
    sleep(BUDGET + Duration::from_millis(500));
    let got = arrivals(&run.server_log);
    let after: Vec<u64> = got.iter().filter(|&&t| t > t_add).map(|&t| (t - t_add) / 1_000_000).collect();
    let late = after.iter().filter(|&&ms| ms > BUDGET.as_millis() as u64).count();
    assert_eq!(late, 0, "{late} packets reached the peer in clear more than {BUDGET:?} after the policy: {after:?}");
    let last_ms = after.iter().copied().max().unwrap_or(0);
    eprintln!("{proto}: last clear packet {last_ms} ms after `ip xfrm policy add` ({} after it)", after.len());
    let f = flow(&d, sport).expect("still offloaded: only one direction is covered");
    let why = slow(&f, 0).unwrap_or_else(|| panic!("the original direction is not shown held: {f}"));
    assert!(why.starts_with("xfrm policy `") && why.contains("tmpl esp tunnel"), "{why}");
    assert_eq!(slow(&f, 1), None, "the reply direction is not covered: {f}");
    let held = status(&d)["slow_path"]["held_xfrm"].as_u64().unwrap_or(0) - held0;
    // (TCP backs off once its segments are lost: fewer than UDP's 300.)
    assert!(held >= 10, "the client kept sending and the fast path handed them to the kernel: {held} held");

    ip(&lab, &format!("xfrm policy del {}", selector(policy)));
    let (f, took) = wait_flow(&d, sport, BUDGET, "both directions fast again", both_fast);
    eprintln!("{proto}: policy deleted, both directions fast again after {took:?}");
    // Traffic resumes on the fast path both ways (TCP first retransmits
    // what was dropped, after its backed-off timeout).
    let (o, r) = (f["packets_orig"].as_u64().unwrap(), f["packets_reply"].as_u64().unwrap());
    wait_flow(&d, sport, Duration::from_secs(8), "packets on the fast path both ways", |f| {
        f["packets_orig"].as_u64() > Some(o + 20) && f["packets_reply"].as_u64() > Some(r + 20)
    });
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
    last_ms
}

/// `ip xfrm policy del` takes the selector and direction, not the template.
fn selector(policy: &str) -> &str {
    policy.split(" tmpl ").next().unwrap()
}

const OUT_ESP: &str =
    "src 192.168.1.0/24 dst 203.0.113.2/32 dir out tmpl src 203.0.113.1 dst 203.0.113.9 proto esp mode tunnel";

#[test]
fn out_policy_added_while_a_udp_connection_is_offloaded() {
    policy_while_offloaded("udp", 42100, OUT_ESP);
}

#[test]
fn out_policy_added_while_a_tcp_connection_is_offloaded() {
    policy_while_offloaded("tcp", 42101, OUT_ESP);
}

/// A fwd policy: the kernel checks arriving forwarded packets against its
/// templates (`__xfrm_policy_check`) and drops clear ones.
#[test]
fn fwd_policy_added_while_a_udp_connection_is_offloaded() {
    policy_while_offloaded(
        "udp",
        42102,
        "src 192.168.1.0/24 dst 203.0.113.2/32 dir fwd tmpl src 203.0.113.9 dst 203.0.113.1 proto esp mode tunnel",
    );
}

/// A policy there before the connection: the direction it covers is never
/// fast (here the replies: the kernel drops them, and the client receives
/// none), the other is. Covering the original direction too takes the
/// connection off the fast path; with both policies gone it comes back.
#[test]
fn policy_present_before_the_connection_holds_its_direction_from_the_start() {
    let lab = lab();
    let run = logs();
    let reply_esp =
        "src 203.0.113.2/32 dst 192.168.1.0/24 dir out tmpl src 203.0.113.1 dst 192.168.1.9 proto esp mode tunnel";
    ip(&lab, &format!("xfrm policy add {reply_esp}"));
    let _server = server(&lab, "udp", &run.server_log);
    let d = Daemon::start(&lab, &[]).unwrap_or_else(|e| panic!("{e:#}"));
    let sport = 42103;
    let _client = client(&lab, "udp", sport, &run.client_log);
    let (f, _) = wait_flow(&d, sport, Duration::from_secs(5), "offloaded, the original direction used", |f| {
        f["packets_orig"].as_u64() > Some(100)
    });
    let why = slow(&f, 1).unwrap_or_else(|| panic!("the reply direction is not held: {f}"));
    assert!(why.contains("dir out src 203.0.113.2/32 dst 192.168.1.0/24"), "{why}");
    assert_eq!(slow(&f, 0), None, "{f}");
    assert_eq!(f["packets_reply"], 0, "no reply was fast-pathed: {f}");
    let (sent, echoed) = (arrivals(&run.server_log).len(), arrivals(&run.client_log).len());
    assert!(sent > 100, "the server received {sent}");
    assert_eq!(echoed, 0, "{echoed} replies reached the client in clear");

    // Both directions covered: the connection leaves the fast path.
    ip(&lab, &format!("xfrm policy add {OUT_ESP}"));
    let t0 = Instant::now();
    while flow(&d, sport).is_some() {
        assert!(t0.elapsed() < BUDGET, "still offloaded with both directions covered: {:?}", flow(&d, sport));
        sleep(Duration::from_millis(10));
    }
    assert_eq!(status(&d)["teardowns"]["held"], 1, "{}", status(&d));
    let n = arrivals(&run.server_log).len();
    sleep(Duration::from_millis(500));
    assert_eq!(arrivals(&run.server_log).len(), n, "packets reached the server with both directions covered");

    // Both gone: offloaded again, both directions fast.
    ip(&lab, &format!("xfrm policy del {}", selector(OUT_ESP)));
    ip(&lab, &format!("xfrm policy del {}", selector(reply_esp)));
    wait_flow(&d, sport, Duration::from_secs(3), "offloaded again, both ways", |f| {
        both_fast(f) && f["packets_orig"].as_u64() > Some(20) && f["packets_reply"].as_u64() > Some(20)
    });
    assert!(!arrivals(&run.client_log).is_empty(), "replies reach the client again");
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

/// For the note: the time from `ip xfrm policy add` to the last packet in
/// clear, over a few runs (UDP at 200 pps).
#[test]
fn time_for_a_policy_to_reach_an_offloaded_connection() {
    let mut ms: Vec<u64> = (0..5).map(|i| policy_while_offloaded("udp", 42110 + i, OUT_ESP)).collect();
    ms.sort_unstable();
    eprintln!("xfrm policy to last clear packet: median {} ms, max {} ms, all {ms:?}", ms[2], ms[4]);
}

/// `check` names the policy that keeps traffic on the slow path, with the
/// remedy, and says nothing while there is none.
#[test]
fn check_names_the_policies_with_a_remedy() {
    let lab = lab();
    let exe = nft_offload_lab::router_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let ipsec = || {
        let argv = [exe.to_str().unwrap(), "check", "--iface", "rlan", "--iface", "rwan", "-o", "json"];
        let out = lab.command(&lab.rtr, &argv).output().unwrap();
        let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("check -o json: {e}"));
        r["host"].as_array().unwrap().iter().find(|f| f["item"] == "ipsec").cloned().expect("an ipsec finding")
    };
    assert_eq!(ipsec()["status"], "ok", "{}", ipsec());
    ip(&lab, &format!("xfrm policy add {OUT_ESP}"));
    let f = ipsec();
    assert_eq!(f["status"], "warn", "{f}");
    let detail = f["detail"].as_str().unwrap();
    assert!(detail.contains("`dir out src 192.168.1.0/24 dst 203.0.113.2/32 tmpl esp tunnel`"), "{detail}");
    assert!(f["remedy"].as_str().is_some_and(|r| r.contains("slow path by design")), "{f}");
}
