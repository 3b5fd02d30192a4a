//! End to end, a device without an Ethernet header (issue 9, item 4): the
//! lab router gets a "VPN" link, a tun device `rvpn` (ARPHRD_NONE, as wg0
//! or ppp0 are L3 devices) whose far end `tvpn` is a tun device in a
//! namespace of its own, joined by the lab's packet relay
//! (`nft_offload_lab::tun_relay`). The router routes the VPN's networks
//! through it and masquerades out of it, as a VPN client does.
//!
//! ```text
//!  {p}-lan              {p}-rtr                          {p}-vpn
//!  lan0 ---------- rlan        rvpn ==relay== tvpn 10.99.0.2 fd00:99::2
//!  192.168.1.2     10.99.0.1/24 fd00:99::1/64  lo 10.100.0.1 fd00:100::1
//!                  10.100.0.0/24, fd00:100::/64 dev rvpn
//! ```
//!
//! Proves, in TC mode: upload (Ethernet in, FO_F_L3_OUT out) and download
//! (`fo_tc_l3` in, Ethernet header pushed) take the fast path for IPv4 and
//! IPv6 (the forward chain stops counting while data flows, `flows` shows
//! the directions, the fast path counts); a TCP transfer each way arrives
//! byte for byte (the download through a DNAT on the tun); an idle flow
//! leaves and comes back; `--mode xdp` on the tun is refused by name with
//! nothing left attached, and `--mode auto` picks TC for it. Run under the
//! machine-wide e2e lock, like tests/e2e.rs.

use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nft_offload_lab::tun_relay::TunLink;
use nft_offload_lab::{Background as Bg, Daemon, Lab};

/// The lab and its VPN link; the link (and its namespace) goes first.
struct Vpn {
    link: TunLink,
    lab: Lab,
}

const MTU: &str = "1420";

fn vpn_lab() -> Vpn {
    let lab = Lab::up_unique("l3").unwrap_or_else(|e| panic!("lab up: {e:#}"));
    let peer = format!("{}-vpn", lab.prefix);
    let link = TunLink::up(&lab.rtr, "rvpn", &peer, "tvpn").unwrap_or_else(|e| panic!("tun link: {e:#}"));
    let sh = |ns: &str, script: &str| {
        lab.exec(ns, &["sh", "-c", &format!("set -e; {script}")]).unwrap_or_else(|e| panic!("{ns}: {e:#}"));
    };
    // WireGuard's default MTU: smaller than the LAN's, so the router's MTU
    // check (and PMTU discovery through it) is part of every transfer.
    sh(
        &lab.rtr,
        &format!(
            "ip link set rvpn mtu {MTU} up; ip addr add 10.99.0.1/24 dev rvpn; \
             ip addr add fd00:99::1/64 dev rvpn nodad; \
             ip route add 10.100.0.0/24 dev rvpn; ip -6 route add fd00:100::/64 dev rvpn"
        ),
    );
    sh(
        &peer,
        &format!(
            "ip link set lo up; ip link set tvpn mtu {MTU} up; ip addr add 10.99.0.2/24 dev tvpn; \
             ip addr add fd00:99::2/64 dev tvpn nodad; ip addr add 10.100.0.1/32 dev lo; \
             ip addr add fd00:100::1/128 dev lo; ip route add default dev tvpn; ip -6 route add default dev tvpn"
        ),
    );
    let rules = nft_offload_lab::lab::router_ruleset()
        .replace(
            "\t\tiifname \"rlan\" oifname \"rwan\" accept\n",
            "\t\tiifname \"rlan\" oifname \"rwan\" accept\n\t\tiifname \"rlan\" oifname \"rvpn\" accept\n\
             \t\tiifname \"rvpn\" oifname \"rlan\" ct status dnat accept\n",
        )
        .replace(
            "\t\toifname \"rwan\" meta nfproto ipv4 masquerade\n",
            "\t\toifname \"rwan\" meta nfproto ipv4 masquerade\n\t\toifname \"rvpn\" masquerade\n",
        )
        .replace(
            "\t\tiifname \"rwan\" meta nfproto ipv4 tcp dport 8080 dnat ip to 192.168.1.2:80\n",
            "\t\tiifname \"rwan\" meta nfproto ipv4 tcp dport 8080 dnat ip to 192.168.1.2:80\n\
             \t\tiifname \"rvpn\" meta nfproto ipv4 tcp dport 8080 dnat ip to 192.168.1.2:80\n",
        );
    assert!(rules.contains("oifname \"rvpn\" masquerade") && rules.contains("iifname \"rvpn\" meta"), "{rules}");
    lab.exec_stdin(&lab.rtr, &["nft", "-f", "-"], &rules).unwrap_or_else(|e| panic!("vpn ruleset: {e:#}"));
    for dst in ["10.100.0.1", "fd00:100::1"] {
        lab.ping(&lab.lan, dst.parse().unwrap()).unwrap_or_else(|e| panic!("LAN -> {dst} over the tun: {e:#}"));
    }
    Vpn { link, lab }
}

fn daemon(v: &Vpn, mode: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--iface", "rlan", "--iface", "rvpn", "--mode", mode];
    args.extend(extra);
    Daemon::start_raw(&v.lab, &args).unwrap_or_else(|e| panic!("{e:#}"))
}

fn iperf(v: &Vpn, dst: &str, extra: &[&str]) -> Child {
    let mut a = vec!["iperf3", "-c", dst, "-J"];
    a.extend(extra);
    let mut c = v.lab.command(&v.lab.lan, &a);
    c.stdout(Stdio::piped()).stderr(Stdio::null());
    c.spawn().expect("iperf3 client")
}

/// Received bits per second of a finished iperf3 client.
fn iperf_bps(c: Child) -> f64 {
    let out = c.wait_with_output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 output: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(j.get("error").is_none(), "iperf3 failed: {}", j["error"]);
    j["end"]["sum_received"]["bits_per_second"].as_f64().unwrap()
}

/// Bytes received by the receiving end of a transfer: the VPN server's
/// tun for an upload, the client's port for a download.
fn rx_bytes(v: &Vpn, upload: bool) -> u64 {
    if upload {
        v.lab.iface_stats(&v.link.peer_ns, "tvpn").unwrap().1
    } else {
        v.lab.iface_stats(&v.lab.lan, "lan0").unwrap().1
    }
}

fn fast_packets(d: &Daemon) -> u64 {
    d.status().unwrap()["fast_path_packets"].as_u64().unwrap()
}

/// While a transfer runs, well after offload: the forward chain counts
/// (almost) nothing, the receiver keeps receiving, the fast path counts.
fn assert_fast(v: &Vpn, d: &Daemon, what: &str, upload: bool) {
    sleep(Duration::from_millis(1500));
    let (c0, b0, f0) = (v.lab.counter_packets("fwd_all").unwrap(), rx_bytes(v, upload), fast_packets(d));
    sleep(Duration::from_millis(1500));
    let (c1, b1, f1) = (v.lab.counter_packets("fwd_all").unwrap(), rx_bytes(v, upload), fast_packets(d));
    let (data, fwd, fast) = (b1 - b0, c1 - c0, f1 - f0);
    assert!(data > 2_000_000, "{what}: only {data} bytes arrived in 1.5 s");
    assert!(fwd < 20, "{what}: the forward chain still counted {fwd} packets while {data} bytes flowed");
    // at least one fast-path packet per full-size segment that arrived
    assert!(fast > data / 1500, "{what}: {fast} fast-path packets for {data} bytes\n{:?}", d.status());
}

/// The busy TCP connection to `dst`:5201, offloaded both ways, through rvpn.
fn assert_flow(d: &Daemon, dst: &str, nat: &str) {
    let flows = d.flows().unwrap();
    let f = flows
        .iter()
        .find(|f| f["proto"] == "tcp" && f["orig"]["dst"] == dst && f["orig"]["dport"] == 5201)
        .unwrap_or_else(|| panic!("no offloaded connection to {dst} in {flows:?}"));
    assert_eq!(f["mode"], "tc", "{f}");
    assert_eq!((f["iif"].as_str(), f["oif"].as_str()), (Some("rlan"), Some("rvpn")), "{f}");
    assert_eq!(f["reply"]["dst"], nat, "masquerade on the tun: {f}");
    let text = d.cli(&["flows"]).unwrap();
    assert!(text.contains(dst) && text.contains("[OFFLOAD]"), "{text}");
}

fn both_ways(family: &str, dst: &str, nat: &str) {
    let v = vpn_lab();
    let _srv = Bg(v.lab.spawn(&v.link.peer_ns, &["iperf3", "-s"]).unwrap());
    v.lab.wait_tcp_listen(&v.link.peer_ns, 5201, Duration::from_secs(5)).unwrap();
    // The kernel alone first, for the figures.
    let slow_up = iperf_bps(iperf(&v, dst, &["-t", "3"]));
    let slow_down = iperf_bps(iperf(&v, dst, &["-t", "3", "-R"]));

    let d = daemon(&v, "tc", &[]);
    let st = d.status().unwrap();
    let ifs = st["interfaces"].as_array().unwrap();
    assert!(ifs.iter().all(|i| i["mode"] == "tc"), "{st}");
    let tun = ifs.iter().find(|i| i["name"] == "rvpn").unwrap_or_else(|| panic!("{st}"));
    assert_eq!(tun["topology"], "rvpn: tun, no link-layer header", "{st}");
    let text = d.cli(&["status"]).unwrap();
    assert!(text.contains("rvpn"), "{text}");

    let up = iperf(&v, dst, &["-t", "5"]);
    assert_fast(&v, &d, &format!("{family} upload"), true);
    assert_flow(&d, dst, nat);
    let fast_up = iperf_bps(up);
    let down = iperf(&v, dst, &["-t", "5", "-R"]);
    assert_fast(&v, &d, &format!("{family} download"), false);
    assert_flow(&d, dst, nat);
    let fast_down = iperf_bps(down);
    eprintln!(
        "{family} over tun, Mbit/s: upload {:.0} slow / {:.0} fast, download {:.0} slow / {:.0} fast; relay {:?}",
        slow_up / 1e6,
        fast_up / 1e6,
        slow_down / 1e6,
        fast_down / 1e6,
        v.link.packets()
    );
    assert_eq!(v.lab.counter_packets("fwd_invalid").unwrap(), 0, "conntrack INVALID drops");
    d.stop().unwrap_or_else(|e| panic!("clean exit on SIGTERM: {e:#}"));
}

#[test]
fn tc_offloads_ipv4_both_ways_through_a_tun_device() {
    both_ways("IPv4", "10.100.0.1", "10.99.0.1");
}

#[test]
fn tc_offloads_ipv6_both_ways_through_a_tun_device() {
    both_ways("IPv6", "fd00:100::1", "fd00:99::1");
}

/// 24 MiB of pseudo-random data.
fn blob() -> Vec<u8> {
    let mut x: u64 = 0x9E3779B97F4A7C15;
    (0..24 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Upload (LAN to the VPN server) and download (the VPN side fetching from
/// the LAN through a DNAT on the tun) of the same file, each paced so the
/// connection is offloaded early on: both arrive intact, and the forward
/// chain saw only their starts and ends.
#[test]
fn tcp_transfers_through_the_tun_arrive_intact() {
    let v = vpn_lab();
    let d = daemon(&v, "tc", &[]);
    let dir = tempfile::Builder::new().prefix(&format!("{}-", v.lab.prefix)).tempdir().unwrap();
    let data = blob();
    let file = dir.path().join("blob");
    std::fs::write(&file, &data).unwrap();
    let (f, got) = (file.to_str().unwrap().to_string(), dir.path().join("got").to_str().unwrap().to_string());

    // Upload: a sink on the VPN server writes what it receives to a file.
    let sink = format!(
        "import socket\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         l.bind(('10.100.0.1',7000))\nl.listen(1)\nc,_=l.accept()\nw=open('{got}','wb')\nwhile True:\n\
         \x20   b=c.recv(65536)\n    if not b:\n        break\n    w.write(b)\nw.close()\n"
    );
    let mut sink = v.lab.spawn(&v.link.peer_ns, &["python3", "-c", &sink]).unwrap();
    v.lab.wait_tcp_listen(&v.link.peer_ns, 7000, Duration::from_secs(5)).unwrap();
    let send = format!(
        "import socket,time\ns=socket.create_connection(('10.100.0.1',7000))\nd=open('{f}','rb').read()\n\
         for i in range(0,len(d),65536):\n    s.sendall(d[i:i+65536])\n    time.sleep(0.008)\ns.close()\n"
    );
    let (fwd0, fast0) = (v.lab.counter_packets("fwd_all").unwrap(), fast_packets(&d));
    v.lab.exec(&v.lab.lan, &["python3", "-c", &send]).unwrap();
    let t0 = Instant::now();
    while sink.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the upload sink did not finish");
        sleep(Duration::from_millis(100));
    }
    let up = std::fs::read(&got).unwrap();
    assert_eq!(up.len(), data.len(), "upload length");
    assert!(up == data, "the uploaded file differs from the sent one");
    let (fwd_up, fast_up) = (v.lab.counter_packets("fwd_all").unwrap() - fwd0, fast_packets(&d) - fast0);

    // Download through the DNAT: 24 MiB is > 17k segments of 1380 bytes.
    let _http = Bg(v
        .lab
        .spawn(
            &v.lab.lan,
            &[
                "python3",
                "-m",
                "http.server",
                "80",
                "--bind",
                "192.168.1.2",
                "--directory",
                dir.path().to_str().unwrap(),
            ],
        )
        .unwrap());
    v.lab.wait_tcp_listen(&v.lab.lan, 80, Duration::from_secs(10)).unwrap();
    std::fs::remove_file(&got).unwrap();
    let (fwd1, fast1) = (v.lab.counter_packets("fwd_all").unwrap(), fast_packets(&d));
    v.lab
        .exec(
            &v.link.peer_ns,
            &["curl", "-sS", "--fail", "--limit-rate", "8M", "-o", &got, "http://10.99.0.1:8080/blob"],
        )
        .unwrap_or_else(|e| panic!("download through the DNAT: {e:#}"));
    let down = std::fs::read(&got).unwrap();
    assert_eq!(down.len(), data.len(), "download length");
    assert!(down == data, "the downloaded file differs from the served one");
    let (fwd_down, fast_down) = (v.lab.counter_packets("fwd_all").unwrap() - fwd1, fast_packets(&d) - fast1);
    eprintln!(
        "24 MiB over the tun: upload {fwd_up} forward-chain / {fast_up} fast-path packets, \
         download {fwd_down} / {fast_down}"
    );
    for (what, fwd, fast) in [("upload", fwd_up, fast_up), ("download", fwd_down, fast_down)] {
        assert!(fwd < 3000, "{what}: the forward chain counted {fwd} packets of 24 MiB");
        assert!(fast > 15_000, "{what}: only {fast} fast-path packets");
    }
    let st = d.status().unwrap();
    assert!(st["offloads_total"].as_u64().unwrap() >= 2, "{st}");
    assert_eq!(v.lab.counter_packets("fwd_invalid").unwrap(), 0, "conntrack INVALID drops");
}

/// UDP from the LAN to the VPN server: `count` datagrams at 100 a second.
fn udp_burst(v: &Vpn, count: u32) {
    let py = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('192.168.1.2',41000))\n\
         for i in range({count}):\n    s.sendto(b'x'*200,('10.100.0.1',9999))\n    time.sleep(0.01)\n"
    );
    v.lab.exec(&v.lab.lan, &["python3", "-c", &py]).unwrap();
}

/// An idle flow through the tun leaves the fast path and comes back on its
/// next packet: the kernel forwards it out of the tun, where the L3 egress
/// watcher (`fo_tc_egress_l3`) sees it and wakes the connection.
#[test]
fn idle_flow_through_the_tun_leaves_and_comes_back() {
    let v = vpn_lab();
    let _sink = udp_sink(&v);
    let d = daemon(&v, "tc", &["--idle-timeout", "2"]);
    d.assert_idle_round_trip(|n| udp_burst(&v, n));
}

fn udp_sink(v: &Vpn) -> Bg {
    let py = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('10.100.0.1',9999))\n\
              while True: s.recv(2048)\n";
    Bg(v.lab.spawn(&v.link.peer_ns, &["python3", "-c", py]).unwrap())
}

/// The tun going down (a VPN disconnecting) takes its connections off the
/// fast path within a second, and the kernel decides for them again.
#[test]
fn tun_going_down_takes_its_flows_off_the_fast_path() {
    let v = vpn_lab();
    let _sink = udp_sink(&v);
    let d = daemon(&v, "tc", &[]);
    udp_burst(&v, 30);
    assert_eq!(d.status().unwrap()["flows_offloaded"], 1, "{}", d.status().unwrap());
    v.lab.exec(&v.lab.rtr, &["ip", "link", "set", "rvpn", "down"]).unwrap();
    let t0 = Instant::now();
    while d.status().unwrap()["flows_offloaded"] != 0 {
        assert!(t0.elapsed() < Duration::from_secs(1), "rvpn down not applied within 1 s: {}", d.status().unwrap());
        sleep(Duration::from_millis(20));
    }
    let st = d.status().unwrap();
    assert_eq!(st["teardowns"]["interface_down"], 1, "{st}");
    let rvpn = st["interfaces"].as_array().unwrap().iter().find(|i| i["name"] == "rvpn").cloned();
    assert_eq!(rvpn.map(|i| i["up"].clone()), Some(serde_json::Value::Bool(false)), "{st}");
    // Back up (routes through it are gone with the link: put them back),
    // the connection is offloaded again.
    v.lab
        .exec(&v.lab.rtr, &["sh", "-c", "set -e; ip link set rvpn up; ip route replace 10.100.0.0/24 dev rvpn"])
        .unwrap();
    udp_burst(&v, 30);
    let st = d.status().unwrap();
    assert_eq!(st["flows_offloaded"], 1, "not offloaded again after rvpn came back: {st}");
}

/// Names of the fast-path programs loaded now, system wide.
fn our_progs() -> std::collections::BTreeSet<u32> {
    libbpf_rs::query::ProgInfoIter::default()
        .filter(|p| p.name.to_string_lossy().starts_with("fo_"))
        .map(|p| p.id)
        .collect()
}

/// `--mode xdp` naming the tun fails at startup, names it and says what to
/// use, and leaves nothing attached; `--mode auto` gives it TC.
#[test]
fn xdp_on_a_tun_device_is_refused_and_auto_picks_tc() {
    let v = vpn_lab();
    let before = our_progs();
    let err = format!(
        "{:#}",
        Daemon::start_raw(&v.lab, &["--iface", "rlan", "--iface", "rvpn", "--mode", "xdp"]).unwrap_err()
    );
    assert!(err.contains("exited during startup"), "{err}");
    assert!(err.contains("rvpn") && err.contains("no Ethernet header") && err.contains("--mode tc"), "{err}");
    for ifc in ["rlan", "rvpn"] {
        let out = v.lab.exec(&v.lab.rtr, &["ip", "-d", "link", "show", ifc]).unwrap();
        assert!(!out.contains("prog/xdp"), "XDP left on {ifc}: {out}");
    }
    let t0 = Instant::now();
    while our_progs().difference(&before).next().is_some() {
        assert!(t0.elapsed() < Duration::from_secs(3), "programs left loaded after the refusal");
        sleep(Duration::from_millis(100));
    }
    let c0 = v.lab.counter_packets("fwd_all").unwrap();
    v.lab.ping(&v.lab.lan, "10.100.0.1".parse().unwrap()).unwrap();
    assert!(v.lab.counter_packets("fwd_all").unwrap() > c0, "the forward chain no longer sees the traffic");

    let d = daemon(&v, "auto", &[]);
    let st = d.status().unwrap();
    let ifs = st["interfaces"].as_array().unwrap();
    assert!(ifs.iter().all(|i| i["mode"] == "tc"), "{st}");
    let tun = ifs.iter().find(|i| i["name"] == "rvpn").unwrap_or_else(|| panic!("{st}"));
    assert!(tun["reason"].as_str().unwrap().contains("Ethernet"), "auto's reason for rvpn: {st}");
    d.stop().unwrap_or_else(|e| panic!("clean exit on SIGTERM: {e:#}"));
}

/// UDP to the VPN server that counts what arrives by size: `{file}` holds
/// "small fits big" after each datagram (under 1000 bytes of payload, the
/// largest that fits the tun's MTU, one byte more).
fn sized_sink(v: &Vpn, file: &str, fits: usize) -> Bg {
    let py = format!(
        "import os,socket,threading\nn={{}}\ndef run(f,a):\n    s=socket.socket(f,socket.SOCK_DGRAM)\n\
         \x20   if f==socket.AF_INET6:\n        s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,1)\n\
         \x20   s.bind((a,9999))\n    while True:\n        b=len(s.recv(4096))\n\
         \x20       k=(f,'small' if b<1000 else 'fits' if b<={fits} else 'big')\n        n[k]=n.get(k,0)+1\n\
         \x20       t='{file}.%d'%f\n        open(t+'.t','w').write(' '.join(str(n.get((f,x),0)) for x in ('small','fits','big')))\n\
         \x20       os.replace(t+'.t',t)\n\
         threading.Thread(target=run,args=(socket.AF_INET6,'fd00:100::1'),daemon=True).start()\n\
         run(socket.AF_INET,'10.100.0.1')\n"
    );
    Bg(v.lab.spawn(&v.link.peer_ns, &["python3", "-c", &py]).unwrap())
}

/// A packet one byte over the tun's MTU, on an offloaded flow with DF set
/// (IPv6 never fragments on the way): the fast path leaves it to the
/// kernel (`mtu`), which refuses it with ICMP "fragmentation needed" /
/// "packet too big", so the sender learns the path MTU and its next send
/// fails with EMSGSIZE; the largest packet that fits stays on the fast path.
/// The last row lowers the route's MTU (`ip route replace ... mtu 1400`,
/// a metric `bpf_fib_lookup` does not report, see src/routes/metric.rs):
/// the engine looks the path up again and the fast path follows.
#[test]
fn packet_over_the_tun_mtu_goes_to_the_kernel_which_answers_icmp() {
    let v = vpn_lab();
    let dir = tempfile::Builder::new().prefix(&format!("{}-", v.lab.prefix)).tempdir().unwrap();
    let file = dir.path().join("sizes").to_str().unwrap().to_string();
    let d = daemon(&v, "tc", &[]);
    let dev_mtu: usize = MTU.parse().unwrap();
    for (fam, af, dst, hdr, sock_opt, mtu) in [
        (4, "AF_INET", "10.100.0.1", 28, "socket.IPPROTO_IP,10,2", dev_mtu),
        (6, "AF_INET6", "fd00:100::1", 48, "socket.IPPROTO_IPV6,23,2", dev_mtu),
        (4, "AF_INET", "10.100.0.1", 28, "socket.IPPROTO_IP,10,2", 1400),
    ] {
        if mtu != dev_mtu {
            let r0 = d.status().unwrap()["path_resolutions"].as_u64().unwrap();
            let m = mtu.to_string();
            v.lab.exec(&v.lab.rtr, &["ip", "route", "replace", "10.100.0.0/24", "dev", "rvpn", "mtu", &m]).unwrap();
            let t0 = Instant::now();
            while d.status().unwrap()["path_resolutions"].as_u64().unwrap() == r0 {
                assert!(t0.elapsed() < Duration::from_secs(2), "the route change was not followed");
                sleep(Duration::from_millis(50));
            }
        }
        let fits = mtu - hdr;
        let _sink = sized_sink(&v, &file, fits);
        v.lab.exec(&v.link.peer_ns, &["sh", "-c", "sleep 0.3"]).unwrap();
        // IP_MTU_DISCOVER / IPV6_MTU_DISCOVER = *_PMTUDISC_DO: DF, never
        // fragment locally; a connected socket learns the path MTU.
        let py = format!(
            "import socket,time,errno\ns=socket.socket(socket.{af},socket.SOCK_DGRAM)\ns.setsockopt({sock_opt})\n\
             s.connect(('{dst}',9999))\nfor i in range(40):\n    s.send(b'x'*200)\n    time.sleep(0.01)\n\
             time.sleep(0.5)\nfor i in range(5):\n    s.send(b'f'*{fits})\n    time.sleep(0.01)\n\
             refused=False\nfor i in range(10):\n    try:\n        s.send(b'b'*{over})\n    except OSError as e:\n\
             \x20       assert e.errno==errno.EMSGSIZE, e\n        refused=True\n        break\n    time.sleep(0.3)\n\
             print('refused' if refused else 'sent')\n",
            over = fits + 1
        );
        let mtu0 = d.status().unwrap()["slow_path"]["mtu"].as_u64().unwrap_or(0);
        let out = v.lab.exec(&v.lab.lan, &["python3", "-c", &py]).unwrap_or_else(|e| panic!("IPv{fam}: {e:#}"));
        assert_eq!(out.trim(), "refused", "IPv{fam}, MTU {mtu}: the sender never learned the path MTU");
        sleep(Duration::from_millis(300));
        let st = d.status().unwrap();
        let got = std::fs::read_to_string(format!("{file}.{}", if fam == 4 { 2 } else { 10 })).unwrap();
        assert_eq!(got, "40 5 0", "IPv{fam}, MTU {mtu}: datagrams arrived (small fits big)\n{st}");
        let mtu1 = st["slow_path"]["mtu"].as_u64().unwrap_or(0);
        assert!(mtu1 > mtu0, "IPv{fam}, MTU {mtu}: no `mtu` slow-path packet\n{st}");
        let flows = d.flows().unwrap();
        assert!(
            flows.iter().any(|f| f["proto"] == "udp" && f["family"] == fam && f["oif"] == "rvpn"),
            "IPv{fam}: the flow was not offloaded: {flows:?}"
        );
    }
}
