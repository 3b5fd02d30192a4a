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
