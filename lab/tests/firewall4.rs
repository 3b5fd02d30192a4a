//! firewall4's own rulesets through `run --nft`: what `fw4 print` renders
//! for a stock OpenWrt configuration (tests/fixtures/firewall4, the lab's
//! device names substituted), loaded by the engine in place of fw4's, as
//! the OpenWrt init script runs it. fw4's rule decides what is offloaded
//! (a `flow offload @ft` in an included /etc/nftables.d file is translated
//! too), and fw4's policy still holds: a new connection from the WAN into
//! the LAN is rejected, its port forward reaches the LAN host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nft_offload_lab::{Daemon, Lab, LabOpts};

const SERVER: &str = "203.0.113.2";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/firewall4")
}

/// A recorded render with the lab's devices (br-lan -> rlan, eth1 -> rwan)
/// and `includes` in place of /etc/nftables.d.
fn for_lab(name: &str, includes: &Path) -> String {
    std::fs::read_to_string(fixtures().join(name))
        .unwrap()
        .replace("\"br-lan\"", "\"rlan\"")
        .replace("\"eth1\"", "\"rwan\"")
        .replace("/etc/nftables.d/", &format!("{}/", includes.display()))
}

struct Setup {
    lab: Lab,
    dir: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!("fw4{}x{}", std::process::id() % 100000, N.fetch_add(1, Ordering::SeqCst));
        let lab = Lab::up(&LabOpts { prefix, ..Default::default() }).expect("lab up");
        lab.warm_neighbours().expect("neighbours");
        let dir = std::env::temp_dir().join(format!("{}-fw4", lab.prefix));
        std::fs::create_dir_all(dir.join("nftables.d")).unwrap();
        Setup { lab, dir }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stat(d: &Daemon, key: &str) -> u64 {
    d.status().unwrap()[key].as_u64().unwrap_or_else(|| panic!("status has no {key}"))
}

/// 100 datagrams client -> server (UDP 9999), one every 10 ms; how many
/// arrived (a sink on the server counts them).
fn udp_stream(lab: &Lab, sport: u16) -> u64 {
    let mut c = lab.command(
        &lab.wan,
        &[
            "python3",
            "-c",
            "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',9999))\n\
             s.settimeout(5)\nn=0\ntry:\n    while True:\n        s.recv(2048); n+=1\nexcept socket.timeout:\n    pass\n\
             print(n)\n",
        ],
    );
    c.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped());
    let sink = lab.spawn_cmd(c).unwrap();
    lab.wait_udp_bound(&lab.wan, 9999, Duration::from_secs(5)).unwrap();
    let py = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('192.168.1.2',{sport}))\n\
         for i in range(100):\n    s.sendto(b'z'*200,('{SERVER}',9999))\n    time.sleep(0.01)\n"
    );
    lab.exec(&lab.lan, &["python3", "-c", &py]).unwrap();
    let out = sink.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// fw4's policy, with the engine running on its ruleset: the port forward
/// (wan tcp 8080 -> 192.168.1.2:80) reaches the LAN host and answers; a new
/// connection from the WAN straight to the LAN host (IPv6, routed) is
/// rejected by handle_reject's TCP reset.
fn policy_holds(lab: &Lab) {
    let echo = lab
        .spawn(
            &lab.lan,
            &[
                "python3",
                "-c",
                "import socket\nl=socket.socket(socket.AF_INET6,socket.SOCK_STREAM)\n\
                 l.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\nl.bind(('::',80))\nl.listen(4)\n\
                 while True:\n    c,_=l.accept(); c.sendall(c.recv(64)); c.close()\n",
            ],
        )
        .unwrap();
    let _kill = Kill(echo);
    lab.wait_tcp_listen(&lab.lan, 80, Duration::from_secs(5)).unwrap();
    let forwarded = lab
        .exec(
            &lab.wan,
            &[
                "python3",
                "-c",
                "import socket\nc=socket.create_connection(('203.0.113.1',8080),timeout=5)\nc.sendall(b'fw4-dnat')\n\
                 print(c.recv(64).decode())\n",
            ],
        )
        .unwrap();
    assert_eq!(forwarded.trim(), "fw4-dnat", "the port forward reaches the LAN host");
    let direct = lab
        .exec(
            &lab.wan,
            &[
                "python3",
                "-c",
                "import socket\ntry:\n    socket.create_connection(('fd00:1::2',80),timeout=5)\n    print('connected')\n\
                 except ConnectionRefusedError:\n    print('refused')\nexcept OSError as e:\n    print('error', e)\n",
            ],
        )
        .unwrap();
    assert_eq!(direct.trim(), "refused", "fw4 rejects a new WAN -> LAN connection (tcp reset)");
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Offloaded: the engine counts the connection and fast-paths most of the
/// stream (half: the first packets go through the kernel, which labels
/// the connection, and a loaded machine delays the offload), and every
/// datagram arrives.
fn offloads(lab: &Lab, d: &Daemon, sport: u16, what: &str) {
    let (offloads, fast) = (stat(d, "offloads_total"), stat(d, "fast_path_packets"));
    let got = udp_stream(lab, sport);
    assert_eq!(got, 100, "{what}: datagrams lost");
    let t0 = Instant::now();
    while stat(d, "offloads_total") <= offloads && t0.elapsed() < Duration::from_secs(2) {
        sleep(Duration::from_millis(50));
    }
    assert!(stat(d, "offloads_total") > offloads, "{what}: not offloaded: {}", d.status().unwrap());
    assert!(stat(d, "fast_path_packets") > fast + 50, "{what}: {}", d.status().unwrap());
}

/// The OpenWrt init script's render_fw4 run against a stand-in `fw4` that
/// prints the recorded render `name` (lab devices listed as the owner's
/// interfaces): the ruleset the engine is started on, and fw4's own render.
fn render_with_init(s: &Setup, name: &str) -> (PathBuf, PathBuf) {
    let render = s.dir.join("render.nft");
    std::fs::write(&render, for_lab(name, &s.dir.join("nftables.d"))).unwrap();
    let fw4 = s.dir.join("fw4");
    std::fs::write(&fw4, format!("#!/bin/sh\ncat '{}'\n", render.display())).unwrap();
    Command::new("chmod").arg("755").arg(&fw4).status().unwrap();
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/openwrt/nft-offload.init");
    let out = Command::new("sh")
        .arg("-c")
        .arg(". \"$INIT\" && logger() { echo \"$*\" >&2; } && IFACES='rlan rwan' && render_fw4")
        .env("INIT", &init)
        .env("FW4", &fw4)
        .env("NFT_OFFLOAD_RUNDIR", s.dir.join("run"))
        .output()
        .unwrap();
    assert!(out.status.success(), "render_fw4: {}", String::from_utf8_lossy(&out.stderr));
    (s.dir.join("run/fw4.nft"), render)
}

/// firewall4 with offloading on renders its flowtable and rule; the owner
/// adds a chain of their own in /etc/nftables.d with its own `flow offload`.
#[test]
fn fw4_render_offloading_on() {
    let s = Setup::new();
    std::fs::write(
        s.dir.join("nftables.d/10-mine.nft"),
        "chain mine_offload {\n\ttype filter hook forward priority filter - 1; policy accept;\n\
         \tudp dport 9999 ct original packets ge 5 flow offload @ft\n}\n",
    )
    .unwrap();
    let rules = s.dir.join("fw4.nft");
    std::fs::write(&rules, for_lab("offload-on.nft", &s.dir.join("nftables.d"))).unwrap();
    let d = Daemon::start_raw(&s.lab, &["--nft", rules.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e:#}"));
    // fw4's table is the engine's now: no kernel flowtable, the rules kept.
    let listed = s.lab.exec(&s.lab.rtr, &["nft", "list", "table", "inet", "fw4"]).unwrap();
    assert!(!listed.contains("flowtable") && !listed.contains("flow add") && !listed.contains("flow offload"));
    assert!(listed.contains("chain mine_offload") && listed.contains("Allow-ICMPv6-Forward"), "{listed}");
    offloads(&s.lab, &d, 40001, "offload-on");
    policy_holds(&s.lab);
    d.stop().unwrap();
}

/// The owner chose nft-offload where the kernel has a flowtable: fw4's
/// offloading is off, and the init script adds the flowtable and rule fw4's
/// template would (its render_fw4, run here against the recorded render).
#[test]
fn fw4_render_offloading_off_through_the_init_script() {
    let s = Setup::new();
    let (rules, _) = render_with_init(&s, "offload-off.nft");
    let d = Daemon::start_raw(&s.lab, &["--nft", rules.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e:#}"));
    offloads(&s.lab, &d, 40002, "offload-off + the template's rule");
    policy_holds(&s.lab);
    d.stop().unwrap();
}

/// firewall4 reloads its own table over the engine's (an interface came up:
/// its hotplug script runs `fw4 reload`; with its offloading off the table
/// has no offload rule), then its include asks the engine to reload the
/// same render. The engine must load it again, though the text did not
/// change; asked with nothing changed in between, it leaves it alone.
#[test]
fn fw4_reloading_its_own_table_is_followed() {
    let s = Setup::new();
    let (rules, render) = render_with_init(&s, "offload-off.nft");
    let d = Daemon::start_raw(&s.lab, &["--nft", rules.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e:#}"));
    let out = d.cli(&["reload"]).unwrap();
    assert!(out.contains("unchanged"), "nothing changed, nothing reloaded: {out}");
    offloads(&s.lab, &d, 40003, "before fw4's reload");

    // fw4 loads its own table: nothing labels connections any more.
    s.lab.exec(&s.lab.rtr, &["nft", "-f", render.to_str().unwrap()]).unwrap();
    let before = stat(&d, "offloads_total");
    let got = udp_stream(&s.lab, 40004);
    assert_eq!(got, 100);
    assert_eq!(stat(&d, "offloads_total"), before, "fw4's own table offloads nothing");

    // Its include: the same render again, which the engine must reload.
    let out = d.cli(&["reload"]).unwrap();
    assert!(!out.contains("unchanged") && out.contains("reloaded"), "{out}");
    let listed = s.lab.exec(&s.lab.rtr, &["nft", "list", "chain", "inet", "fw4", "forward"]).unwrap();
    assert!(listed.contains("ct label set"), "the engine's table is back: {listed}");
    offloads(&s.lab, &d, 40005, "after the include's reload");
    d.stop().unwrap();
}
