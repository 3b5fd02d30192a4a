//! End to end, neighbours: the engine re-resolves only the connections
//! whose next hop changed. A busy LAN's neighbours go STALE and REACHABLE
//! all the time with the same MAC, which changes no path and costs no
//! lookup; a next hop that moves to another MAC is followed on the fast
//! path. Run under the machine-wide e2e lock, like tests/e2e.rs.

use std::thread::sleep;
use std::time::{Duration, Instant};

use nft_offload_lab::{Background as Bg, Daemon, Lab};

/// UDP datagrams delivered to sockets in namespace `ns` so far.
fn udp_in(lab: &Lab, ns: &str) -> u64 {
    let snmp = lab.exec(ns, &["cat", "/proc/net/snmp"]).unwrap();
    let mut rows = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
    let col = names.split_whitespace().position(|n| n == "InDatagrams").unwrap();
    values.split_whitespace().nth(col).unwrap().parse().unwrap()
}

fn resolutions(d: &Daemon) -> u64 {
    d.status().unwrap()["path_resolutions"].as_u64().expect("status has path_resolutions")
}

#[test]
fn neighbour_churn_costs_nothing_and_a_moved_next_hop_is_followed() {
    let lab = Lab::up_unique("ngh").unwrap_or_else(|e| panic!("{e:#}"));
    let d = Daemon::start(&lab, &["--mode", "tc", "--idle-timeout", "60"]).unwrap_or_else(|e| panic!("{e:#}"));
    let py = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',9999))\n\
              while True:\n    s.recvfrom(2048)\n";
    let _sink = Bg(lab.spawn(&lab.wan, &["python3", "-c", py]).unwrap());
    let stream = "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                  s.bind(('192.168.1.2',41700))\nend=time.time()+40\nwhile time.time()<end:\n\
                  \x20   s.sendto(b'x'*200,('203.0.113.2',9999))\n    time.sleep(0.01)\n";
    let _stream = Bg(lab.spawn(&lab.lan, &["python3", "-c", stream]).unwrap());
    // UDP one way is eligible once conntrack confirms it: offloaded.
    let t0 = Instant::now();
    while d.status().unwrap()["flows_offloaded"].as_u64() != Some(1) {
        assert!(t0.elapsed() < Duration::from_secs(5), "not offloaded: {}", d.status().unwrap());
        sleep(Duration::from_millis(100));
    }

    // Churn: the WAN next hop and the LAN client flip between STALE and
    // REACHABLE with the same MAC, 40 times. Each flip is an RTM_NEWNEIGH.
    let before = resolutions(&d);
    for i in 0..40 {
        let nud = if i % 2 == 0 { "stale" } else { "reachable" };
        for (addr, dev) in [("203.0.113.2", &lab.rtr_wan_if), ("192.168.1.2", &lab.rtr_lan_if)] {
            lab.exec(&lab.rtr, &["ip", "neigh", "change", addr, "dev", dev, "nud", nud]).unwrap();
        }
        sleep(Duration::from_millis(60));
    }
    sleep(Duration::from_millis(300));
    let churn = resolutions(&d) - before;
    // Before: every neighbour message re-resolved every offloaded
    // connection (one per 50 ms settle here: about 40).
    assert_eq!(churn, 0, "STALE/REACHABLE churn with unchanged MACs re-resolved {churn} paths");

    // The WAN host's MAC changes (a replaced upstream box) and the router
    // learns it: the offloaded direction follows within a second.
    let new_mac = "02:00:00:00:99:01";
    lab.exec(&lab.wan, &["ip", "link", "set", "dev", &lab.wan_if, "address", new_mac]).unwrap();
    let moved = Instant::now();
    lab.exec(
        &lab.rtr,
        &["ip", "neigh", "replace", "203.0.113.2", "lladdr", new_mac, "dev", &lab.rtr_wan_if, "nud", "reachable"],
    )
    .unwrap();
    sleep(Duration::from_secs(1).saturating_sub(moved.elapsed()));
    let (got0, fwd0) = (udp_in(&lab, &lab.wan), lab.counter_packets("fwd_all").unwrap());
    sleep(Duration::from_secs(1));
    let (got, fwd) = (udp_in(&lab, &lab.wan) - got0, lab.counter_packets("fwd_all").unwrap() - fwd0);
    // ~100 datagrams a second are sent; a stale MAC would deliver none.
    assert!(got >= 50, "only {got} datagrams reached the moved host in the second after the change");
    assert!(fwd < 10, "{fwd} packets took the slow path: not on the fast path after the move");
    assert!(resolutions(&d) > before, "the moved next hop was not re-resolved");
    let st = d.status().unwrap();
    assert_eq!(st["flows_offloaded"].as_u64(), Some(1), "{st}");
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

/// A one-way stream whose reply direction's next hop the router has never
/// resolved: nothing the router sends goes to the client, so the kernel
/// never asks for its MAC. The engine asks (RTM_NEWNEIGH with NTF_USE, as
/// the kernel's first forwarded packet would) and offloads the connection;
/// before, it waited for that neighbour for as long as the stream lasted.
#[test]
fn a_one_way_stream_to_an_unresolved_client_is_offloaded() {
    let lab = Lab::up_unique("ngs").unwrap_or_else(|e| panic!("{e:#}"));
    // The client knows the router for good (it never ARPs for it, so the
    // router never learns the client from a request), and the router
    // forgets the client.
    let rtr_mac = lab.exec(&lab.rtr, &["cat", &format!("/sys/class/net/{}/address", lab.rtr_lan_if)]).unwrap();
    let rtr_mac = rtr_mac.trim();
    lab.exec(
        &lab.lan,
        &["ip", "neigh", "replace", "192.168.1.1", "lladdr", rtr_mac, "dev", &lab.lan_if, "nud", "permanent"],
    )
    .unwrap();
    lab.exec(&lab.rtr, &["ip", "neigh", "flush", "dev", &lab.rtr_lan_if]).unwrap();
    let neigh =
        |lab: &Lab| lab.exec(&lab.rtr, &["ip", "neigh", "show", "192.168.1.2", "dev", &lab.rtr_lan_if]).unwrap();
    let shown = neigh(&lab);
    assert!(
        shown.trim().is_empty() || shown.contains("FAILED") || !shown.contains("lladdr"),
        "the router still knows the client: {shown}"
    );
    let d = Daemon::start(&lab, &["--mode", "tc", "--idle-timeout", "60"]).unwrap_or_else(|e| panic!("{e:#}"));
    // A listening sink: a closed port would answer with ICMP, which the
    // router forwards to the client, resolving it the kernel's way.
    let py = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',9998))\n\
              while True:\n    s.recvfrom(2048)\n";
    let _sink = Bg(lab.spawn(&lab.wan, &["python3", "-c", py]).unwrap());
    sleep(Duration::from_millis(300));
    let stream = "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                  s.bind(('192.168.1.2',41701))\nend=time.time()+30\nwhile time.time()<end:\n\
                  \x20   s.sendto(b'x'*200,('203.0.113.2',9998))\n    time.sleep(0.01)\n";
    let _stream = Bg(lab.spawn(&lab.lan, &["python3", "-c", stream]).unwrap());
    let t0 = Instant::now();
    while d.status().unwrap()["flows_offloaded"].as_u64() != Some(1) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "not offloaded within 10 s; router's neighbour entry: {:?}; {}",
            neigh(&lab),
            d.status().unwrap()
        );
        sleep(Duration::from_millis(100));
    }
    let shown = neigh(&lab);
    assert!(shown.contains("lladdr"), "offloaded, yet the router has not resolved the client: {shown}");
    let st = d.status().unwrap();
    assert_eq!(st["flows_waiting_for_neighbour"].as_u64(), Some(0), "{st}");
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}
