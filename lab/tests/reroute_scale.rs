//! End to end, route changes at scale: with 10k offloaded connections to
//! four destinations, a route change for one costs one FIB lookup per
//! distinct key in use and re-judges only the connections to it; with an
//! `ip rule` that selects on the protocol (answers cannot be cached) the
//! same change re-judges every connection with three lookups each, as
//! every change did before. Prints both (engine-internal timing, from
//! `status`). Run under the machine-wide e2e lock, like tests/e2e.rs.

use std::thread::sleep;
use std::time::{Duration, Instant};

use nft_offload_lab::{Daemon, Lab};
use serde_json::Value;

const PER_DEST: u32 = 2500;
const DESTS: u32 = 4;

fn offloaded(d: &Daemon) -> u64 {
    d.status().unwrap()["flows_offloaded"].as_u64().unwrap()
}

/// Run `change` in the router and wait for the re-resolution it causes to
/// end with `want` connections offloaded; its report.
fn after(lab: &Lab, d: &Daemon, change: &[&str], want: u64) -> Value {
    let before = d.status().unwrap()["reresolve_last"].clone();
    lab.exec(&lab.rtr, change).unwrap();
    let t0 = Instant::now();
    loop {
        let st = d.status().unwrap();
        if st["reresolve_last"] != before && st["flows_offloaded"].as_u64() == Some(want) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{change:?} not followed: {st}");
        sleep(Duration::from_millis(50));
    }
    // Anything still settling settles.
    sleep(Duration::from_millis(300));
    let st = d.status().unwrap();
    assert_eq!(st["flows_offloaded"].as_u64(), Some(want), "{st}");
    st["reresolve_last"].clone()
}

fn field(r: &Value, k: &str) -> u64 {
    r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"))
}

#[test]
fn a_route_change_re_judges_only_the_connections_it_moves() {
    let lab = Lab::up_unique("rrs").unwrap_or_else(|e| panic!("{e:#}"));
    let d = Daemon::start(&lab, &["--mode", "tc", "--idle-timeout", "600"]).unwrap_or_else(|e| panic!("{e:#}"));
    lab.exec(&lab.rtr, &["ip", "route", "add", "198.51.100.0/24", "via", "203.0.113.2"]).unwrap();
    for addr in ["203.0.113.2", "192.168.1.2"] {
        lab.exec(&lab.rtr, &["ping", "-c1", "-W1", addr]).unwrap();
    }
    // Replied (SEEN_REPLY), as a DNS exchange leaves them: an entry
    // without is offloaded only once the kernel forwards a second packet
    // of it (`flow add` takes a confirmed entry), and these carry none.
    let insert = format!(
        "for d in $(seq 1 {DESTS}); do for p in $(seq 10000 $((10000 + {PER_DEST} - 1))); do \
         conntrack -I -p udp -s 192.168.1.2 -d 198.51.100.$d --sport $p --dport 53 -t 600 -u SEEN_REPLY 2>/dev/null \
         || exit 1; done; done"
    );
    lab.exec(&lab.rtr, &["sh", "-c", &insert]).unwrap();
    let n = u64::from(PER_DEST * DESTS);
    let t0 = Instant::now();
    while offloaded(&d) != n {
        assert!(t0.elapsed() < Duration::from_secs(60), "not all offloaded: {}", d.status().unwrap());
        sleep(Duration::from_millis(200));
    }

    // Changes that move no path: nothing is judged again.
    let unrelated = after(&lab, &d, &["ip", "route", "add", "10.99.0.0/24", "via", "203.0.113.2"], n);
    let link = after(&lab, &d, &["ip", "link", "add", "rrs-v0", "type", "veth", "peer", "name", "rrs-v1"], n);
    let cached = after(&lab, &d, &["ip", "route", "add", "blackhole", "198.51.100.1/32"], n - 2500);
    // Answers per connection from now on: every change re-judges all.
    let rule = ["ip", "rule", "add", "ipproto", "132", "lookup", "main", "pref", "5000"];
    let all = after(&lab, &d, &rule, n - 2500);
    let uncached = after(&lab, &d, &["ip", "route", "add", "blackhole", "198.51.100.2/32"], n - 5000);
    eprintln!("unrelated route added:            {unrelated}");
    eprintln!("unrelated link added:             {link}");
    eprintln!("route change, answers cached:     {cached}");
    eprintln!("rule change (every connection):   {all}");
    eprintln!("route change, answers per flow:   {uncached}");
    for r in [&unrelated, &link] {
        assert_eq!(field(r, "rejudged"), 0, "{r}");
        assert!(field(r, "fib_queries") < 20, "{r}");
    }
    assert_eq!(field(&cached, "rejudged"), u64::from(PER_DEST), "only the connections to 198.51.100.1");
    assert!(field(&cached, "fib_queries") < 20, "one query per distinct key in use: {cached}");
    assert_eq!(field(&uncached, "rejudged"), n - 2500, "every connection, as before");
    assert!(field(&uncached, "fib_queries") >= 2 * (n - 2500), "{uncached}");
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}
