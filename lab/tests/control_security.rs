//! The control channel's threat model (SECURITY.md, "Control channel"), end
//! to end on the lab router: local users without CAP_NET_ADMIN (setpriv to
//! uid 65534 inside the router's namespace) can neither change nor read
//! what is root's, cannot get a file's content into an error, cannot stall
//! the engine, cannot pose as it, and cannot steer its temporary files.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nft_offload_lab::Background as Bg;
use nft_offload_lab::{router_bin, Daemon, Lab, LabOpts};

/// setpriv arguments: uid/gid 65534, no groups, and the given capability
/// (empty: none at all).
fn nobody_with(cap: &str) -> Vec<String> {
    let mut a: Vec<String> =
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"].iter().map(|s| s.to_string()).collect();
    if cap.is_empty() {
        a.push("--inh-caps=-all".into());
    } else {
        a.push(format!("--inh-caps=+{cap}"));
        a.push(format!("--ambient-caps=+{cap}"));
    }
    a
}

fn exe() -> &'static str {
    static EXE: OnceLock<String> = OnceLock::new();
    EXE.get_or_init(|| router_bin().unwrap_or_else(|e| panic!("{e:#}")).to_str().expect("UTF-8 path").to_string())
}

fn lab() -> Lab {
    static N: AtomicU32 = AtomicU32::new(0);
    let prefix = format!("sec{}x{}", std::process::id() % 100000, N.fetch_add(1, Ordering::SeqCst));
    let lab = Lab::up(&LabOpts { prefix, xdp_safe: false, isolate_router_cpu: false }).expect("lab up");
    lab.warm_neighbours().expect("neighbours");
    lab
}

/// A directory every user may read (as a user's home would be), removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(lab: &Lab, what: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("{}-{what}", lab.prefix));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        Dir(d)
    }

    /// A world-readable file.
    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p.to_str().unwrap().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The router's forward chain with a flowtable; `policy` is its verdict for
/// what no rule accepts.
fn ruleset(policy: &str) -> String {
    format!(
        r#"table inet fw4 {{
	flowtable ft {{
		hook ingress priority 0;
		devices = {{ "rlan", "rwan" }};
	}}

	chain forward {{
		type filter hook forward priority filter; policy {policy};
		meta l4proto {{ tcp, udp }} flow offload @ft
		ct state established,related accept
		iifname "rlan" oifname "rwan" accept
	}}
	chain srcnat {{ type nat hook postrouting priority srcnat; oifname "rwan" masquerade; }}
}}
"#
    )
}

/// `nft-offload ARGS` in the router's namespace as `user` (setpriv args).
fn cli_as(lab: &Lab, user: &[String], args: &[&str]) -> Output {
    let mut argv: Vec<&str> = user.iter().map(String::as_str).collect();
    argv.push(exe());
    argv.extend(args);
    lab.command(&lab.rtr, &argv).output().unwrap()
}

/// Run `c` to completion, killing it (and failing) after `limit`.
fn within(mut c: std::process::Command, limit: Duration) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("still running after {limit:?}: {}", stderr(&o));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn forward_policy(lab: &Lab) -> String {
    let out = lab.exec(&lab.rtr, &["nft", "list", "chain", "inet", "fw4", "forward"]).unwrap();
    let l = out.lines().find(|l| l.contains("hook forward")).unwrap_or_else(|| panic!("no forward hook in {out}"));
    l.trim().to_string()
}

/// The system's python, which every user may run (root's PATH may lead to a
/// private one).
const PYTHON: &str = "/usr/bin/python3";

/// A python program in the router's namespace as `user`, started once it
/// printed its first line.
fn python_ready(lab: &Lab, user: &[String], py: &str) -> Bg {
    let mut argv: Vec<&str> = user.iter().map(String::as_str).collect();
    argv.extend([PYTHON, "-u", "-c", py]);
    let mut c = lab.command(&lab.rtr, &argv);
    c.stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the helper did not start");
    Bg(child)
}

/// A local user without CAP_NET_ADMIN can neither reload (the forward chain
/// keeps its policy) nor read status and flows; root and a CAP_NET_ADMIN
/// holder can.
#[test]
fn unprivileged_clients_are_refused_and_the_ruleset_stays() {
    let lab = lab();
    let dir = Dir::new(&lab, "rules");
    let good = dir.file("fw.nft", &ruleset("drop"));
    let open = dir.file("open.nft", &ruleset("accept"));
    let d = Daemon::start_raw(&lab, &["--nft", &good]).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(forward_policy(&lab).contains("policy drop"), "{}", forward_policy(&lab));
    let nobody = nobody_with("");

    let o = cli_as(&lab, &nobody, &["reload", "--nft", &open]);
    assert!(!o.status.success(), "an unprivileged reload succeeded: {}", String::from_utf8_lossy(&o.stdout));
    assert!(stderr(&o).contains("permission denied") && stderr(&o).contains("uid 65534"), "{}", stderr(&o));
    assert!(forward_policy(&lab).contains("policy drop"), "the forward chain changed: {}", forward_policy(&lab));

    // status and flows disclose every host's connections: root's too
    for what in [&["status", "-o", "json"][..], &["flows", "-o", "json"][..]] {
        let o = cli_as(&lab, &nobody, what);
        assert!(!o.status.success(), "{what:?} answered an unprivileged user: {}", String::from_utf8_lossy(&o.stdout));
        assert!(stderr(&o).contains("permission denied"), "{what:?}: {}", stderr(&o));
    }
    // refused at the socket, whatever the client does
    let py = "import socket\ns=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM)\ns.connect('\\0nft-offload.ctl')\n\
              s.sendall(b'{\"request\":\"flows\"}\\n')\nprint(s.recv(4096).decode())\n";
    let mut argv: Vec<&str> = nobody.iter().map(String::as_str).collect();
    argv.extend([PYTHON, "-c", py]);
    let raw = lab.exec(&lab.rtr, &argv).unwrap();
    assert!(raw.starts_with("{\"error\":\"permission denied"), "{raw}");

    // CAP_NET_ADMIN without uid 0 is trusted, as for nft and conntrack
    let o = cli_as(&lab, &nobody_with("net_admin"), &["status", "-o", "json"]);
    assert!(o.status.success(), "CAP_NET_ADMIN refused: {}", stderr(&o));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["pid"].as_u64(), Some(u64::from(d.pid())));
    assert!(d.flows().is_ok() && d.status().is_ok());
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

/// The engine opens no file for a client: the CLI reads the ruleset and
/// the files it includes with its caller's permissions and sends one text,
/// and an `include` in what a client sends is refused, so no file's content
/// reaches an error the caller could not have read. Root's own `run --nft`
/// and `reload --nft` still include.
#[test]
fn a_reload_reads_no_file_for_its_client() {
    let lab = lab();
    let dir = Dir::new(&lab, "rules");
    dir.file("extra.nft", "table inet extra {\n}\n");
    let good = dir.file("fw.nft", &format!("include \"extra.nft\"\n{}", ruleset("drop")));
    let d = Daemon::start_raw(&lab, &["--nft", &good]).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(lab.exec(&lab.rtr, &["nft", "list", "table", "inet", "extra"]).is_ok(), "root's include was not loaded");
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap();
    let secret_lines: Vec<&str> = shadow.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!secret_lines.is_empty());
    let leaks = |e: &str| secret_lines.iter().find(|l| e.contains(*l)).map(|l| l.to_string());
    let admin = nobody_with("net_admin");

    let o = cli_as(&lab, &admin, &["reload", "--nft", "/etc/shadow"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot read /etc/shadow"), "{}", stderr(&o));
    assert_eq!(leaks(&stderr(&o)), None);

    // An include the caller may not read fails in the caller, as `nft -f`
    // run by it would.
    let incl = dir.file("incl.nft", &format!("{}include \"/etc/shadow\"\n", ruleset("accept")));
    let o = cli_as(&lab, &admin, &["reload", "--nft", &incl]);
    let e = stderr(&o);
    assert!(!o.status.success(), "a ruleset including /etc/shadow was loaded");
    assert_eq!(leaks(&e), None, "a line of /etc/shadow reached the client: {e}");
    assert!(e.contains("include \"/etc/shadow\"") && e.contains("cannot read /etc/shadow"), "{e}");
    assert!(forward_policy(&lab).contains("policy drop"));
    // The engine itself still takes no include from any client (a request
    // written by hand, as root).
    let raw = "import socket,json\ns=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM)\n\
               s.connect('\\0nft-offload.ctl')\n\
               s.sendall((json.dumps({'request':'reload','name':'x.nft','ruleset':'include \"/etc/shadow\"\\n'})+'\\n').encode())\n\
               print(s.makefile().read())\n";
    let out = lab.exec(&lab.rtr, &["python3", "-c", raw]).unwrap();
    assert!(out.contains("`include` is not accepted") && leaks(&out).is_none(), "{out}");
    // Root's own reload of a file with includes: read by the CLI, loaded.
    let out = d.cli(&["reload", "--nft", &good]).expect("root's reload with an include");
    assert!(out.contains("reloaded"), "{out}");
    assert!(lab.exec(&lab.rtr, &["nft", "list", "table", "inet", "extra"]).is_ok(), "the included table is gone");
    // a CAP_NET_ADMIN holder's own, include-free ruleset is loaded
    let open = dir.file("open.nft", &ruleset("accept"));
    let o = cli_as(&lab, &admin, &["reload", "--nft", &open]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(forward_policy(&lab).contains("policy accept"));
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

const SILENT: &str = "import socket,time\nss=[]\nfor i in range(16):\n    \
    s=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM)\n    s.connect('\\0nft-offload.ctl')\n    ss.append(s)\n\
    print('ready')\ntime.sleep(30)\n";

/// 16 silent unprivileged and 16 silent privileged connections: `status`
/// still answers within a second and a new connection is offloaded.
#[test]
fn silent_clients_delay_neither_status_nor_offload() {
    let lab = lab();
    let sink = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',9999))\n\
                while True: s.recv(2048)\n";
    let _sink = Bg(lab.spawn(&lab.wan, &["python3", "-c", sink]).unwrap());
    let d = Daemon::start(&lab, &[]).unwrap_or_else(|e| panic!("{e:#}"));
    let _quiet_nobody = python_ready(&lab, &nobody_with(""), SILENT);
    let _quiet_root = python_ready(&lab, &[], SILENT);
    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        let t = Instant::now();
        let st = d.status();
        let took = t.elapsed();
        assert!(st.is_ok() && took < Duration::from_secs(1), "status took {took:?} with 32 silent clients: {st:?}");
        worst = worst.max(took);
    }
    eprintln!("status with 32 silent clients connected: worst of 3 = {worst:?}");
    // a new UDP connection, 40 packets at 100/s, while they stay connected
    let py = "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('192.168.1.2',41300))\n\
              for i in range(40):\n    s.sendto(b'x'*200,('203.0.113.2',9999))\n    time.sleep(0.01)\n";
    lab.exec(&lab.lan, &["python3", "-c", py]).unwrap();
    let st = d.status().unwrap();
    assert_eq!(st["flows_offloaded"], 1, "not offloaded while silent clients were connected: {st}");
    assert!(st["fast_path_packets"].as_u64().unwrap() > 20, "{st}");
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

/// An unprivileged process that binds the control socket's name first
/// neither passes for the engine with clients nor goes unnoticed by `run`.
#[test]
fn a_squatter_on_the_socket_name_is_refused_by_both_ends() {
    let lab = lab();
    let dir = Dir::new(&lab, "rules");
    let good = dir.file("fw.nft", &ruleset("drop"));
    // answers every request with success, as an impostor would
    let py = "import socket\nl=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM)\nl.bind('\\0nft-offload.ctl')\n\
              l.listen(64)\nprint('ready')\nwhile True:\n    c,_=l.accept()\n    try:\n        c.recv(65536)\n        \
              c.sendall(b'{\"ok\":\"reloaded\"}')\n    except OSError:\n        pass\n    c.close()\n";
    let squatter = python_ready(&lab, &nobody_with(""), py);
    let o = cli_as(&lab, &[], &["reload", "--nft", &good]);
    assert!(
        !o.status.success(),
        "the client believed an unprivileged impostor: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(stderr(&o).contains("refusing to talk") && stderr(&o).contains("uid 65534"), "{}", stderr(&o));
    let o = within(lab.command(&lab.rtr, &[exe(), "run", "--nft", &good]), Duration::from_secs(20));
    assert!(!o.status.success(), "the engine started beside a squatter");
    let e = stderr(&o);
    let holder = format!("is held by pid {} (uid 65534)", squatter.0.id());
    assert!(e.contains(&holder) && e.contains("refusing to start"), "{e}");
}

/// The ruleset reaches nft through its stdin: a directory an unprivileged
/// user pre-created at the old predictable path, with symlinks to a root
/// file, is neither written through nor used.
#[test]
fn no_predictable_temporary_path_is_followed() {
    let lab = lab();
    let dir = Dir::new(&lab, "rules");
    let good = dir.file("fw.nft", &ruleset("drop"));
    let victim_dir = Dir::new(&lab, "victim");
    let victim = victim_dir.0.join("precious");
    std::fs::write(&victim, "precious\n").unwrap();
    let d = Daemon::start_raw(&lab, &["--nft", &good]).unwrap_or_else(|e| panic!("{e:#}"));
    let trap = std::env::temp_dir().join(format!("nft-offload-{}", d.pid()));
    let trap_s = trap.to_str().unwrap();
    let mut argv: Vec<String> = nobody_with("");
    let sh = format!(
        "mkdir -m 0777 {trap_s} && ln -s {v} {trap_s}/ruleset.nft && ln -s {v} {trap_s}/load.nft",
        v = victim.display()
    );
    argv.extend(["sh".to_string(), "-c".to_string(), sh]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    lab.exec(&lab.rtr, &argv).unwrap();
    let again = dir.file("again.nft", &ruleset("drop"));
    let r = d.cli(&["reload", "--nft", &again]);
    let left: Vec<_> =
        std::fs::read_dir(&trap).map(|r| r.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    let precious = std::fs::read_to_string(&victim).unwrap();
    let _ = std::fs::remove_dir_all(&trap);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(precious, "precious\n", "the reload wrote through a symlink in {trap_s}");
    assert_eq!(left.len(), 2, "the pre-created directory was touched: {left:?}");
    assert!(Path::new(&victim).exists());
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

/// The upload bytes of 192.168.1.2 in a scrape.
fn host_upload(scrape: &str) -> u64 {
    let key = "nft_offload_host_bytes_total{host=\"192.168.1.2\",direction=\"upload\"} ";
    scrape.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// conntrack's own byte counters for the iperf3 connections' original
/// direction (nf_conntrack_acct).
fn conntrack_upload(lab: &Lab) -> u64 {
    let ct = lab.exec(&lab.rtr, &["conntrack", "-L", "-p", "tcp", "--dport", "5201"]).unwrap_or_default();
    ct.lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("bytes=")))
        .filter_map(|w| w["bytes=".len()..].parse::<u64>().ok())
        .sum()
}

/// The metrics endpoint is opt-in. On a unix socket only root may connect
/// (mode 0600 from bind on; an unprivileged user gets nothing, not even
/// with CAP_NET_ADMIN's file-less reach); a scrape during a transfer shows
/// the host's bytes rising while conntrack's counters do not; the socket
/// goes with the engine. A named TCP address is the only one bound.
#[test]
fn metrics_are_root_only_on_a_socket_and_count_what_conntrack_misses() {
    let lab = lab();
    lab.exec(&lab.rtr, &["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"]).unwrap();
    let dir = Dir::new(&lab, "metrics");
    let sock = dir.0.join("m.sock");
    let sock_s = sock.to_str().unwrap();
    let d = Daemon::start(&lab, &["--metrics", sock_s]).unwrap_or_else(|e| panic!("{e:#}"));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    for who in [nobody_with(""), nobody_with("net_admin")] {
        let mut argv: Vec<&str> = who.iter().map(String::as_str).collect();
        argv.extend(["curl", "-sS", "--max-time", "3", "--unix-socket", sock_s, "http://localhost/metrics"]);
        let o = within(lab.command(&lab.rtr, &argv), Duration::from_secs(5));
        assert!(!o.status.success() && o.stdout.is_empty(), "{who:?} read the metrics");
        assert!(stderr(&o).contains("ermission denied") || stderr(&o).contains("Couldn't connect"), "{}", stderr(&o));
    }
    let scrape = || {
        lab.exec(&lab.rtr, &["curl", "-sS", "--max-time", "5", "--unix-socket", sock_s, "http://localhost/metrics"])
            .unwrap()
    };
    assert!(scrape().lines().any(|l| l == "nft_offload_up 1"));

    let _srv = Bg(lab.spawn(&lab.wan, &["iperf3", "-s", "-p", "5201"]).unwrap());
    lab.wait_tcp_listen(&lab.wan, 5201, Duration::from_secs(5)).unwrap();
    let mut client = lab
        .command(&lab.lan, &["iperf3", "-c", "203.0.113.2", "-p", "5201", "-t", "5", "-b", "200M"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (m1, c1) = (host_upload(&scrape()), conntrack_upload(&lab));
    std::thread::sleep(Duration::from_millis(1500));
    let (m2, c2) = (host_upload(&scrape()), conntrack_upload(&lab));
    assert!(client.wait().unwrap().success());
    assert!(m2 > m1 + 1_000_000, "the host's bytes did not rise with the transfer: {m1} -> {m2}");
    assert!(c2 - c1 < (m2 - m1) / 10, "conntrack counted {} of {} bytes", c2 - c1, m2 - m1);
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!sock.exists(), "the socket outlived the engine");

    let d = Daemon::start(&lab, &["--metrics", "127.0.0.1:9641"]).unwrap_or_else(|e| panic!("{e:#}"));
    let listening = lab.exec(&lab.rtr, &["ss", "-ltnH"]).unwrap();
    assert!(listening.contains("127.0.0.1:9641"), "{listening}");
    assert!(!listening.contains("0.0.0.0:9641") && !listening.contains("*:9641"), "{listening}");
    let t = lab.exec(&lab.rtr, &["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9641/metrics"]).unwrap();
    assert!(t.lines().any(|l| l == "nft_offload_up 1"), "{t}");
    let code =
        lab.exec(&lab.rtr, &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:9641/"]).unwrap();
    assert_eq!(code.trim(), "404");
    d.stop().unwrap_or_else(|e| panic!("{e:#}"));
}
