//! Built-in network-namespace lab: a LAN client, a firewall4-shaped router
//! and a WAN server joined by veth pairs. Used by `nft-offload-lab demo`, the
//! end-to-end tests and the benchmark.
//!
//! ```text
//!  {p}-lan            {p}-rtr                    {p}-wan
//!  lan0 ---------- rlan      rwan ------------- wan0
//!  192.168.1.2     192.168.1.1  203.0.113.1     203.0.113.2
//!  fd00:1::2       fd00:1::1    fd00:2::1       fd00:2::2
//! ```
//!
//! The router masquerades LAN traffic leaving `rwan` and forwards
//! 203.0.113.1:8080 to 192.168.1.2:80. The WAN server has no IPv4 default
//! route, so IPv4 replies only find their way back through masquerade.
//!
//! Everything is driven with the real tools (`ip`, `nft`, `ethtool`, ...),
//! so the lab behaves like a small router would.

pub mod cgroup;
pub(crate) mod children;
pub(crate) mod cmd;
pub(crate) mod cpu;
pub(crate) mod netns;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

/// Prefix used by the CLI when none is given.
pub const DEFAULT_PREFIX: &str = "nfolab";

/// Client interface (lan namespace).
pub const LAN_IF: &str = "lan0";
/// Router interface facing the LAN.
pub const RTR_LAN_IF: &str = "rlan";
/// Router interface facing the WAN.
pub const RTR_WAN_IF: &str = "rwan";
/// Server interface (wan namespace).
pub const WAN_IF: &str = "wan0";

pub const ROUTER_LAN_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
pub const ROUTER_WAN_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const ROUTER_LAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
pub const ROUTER_WAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2);
/// Port forwarded on the router's WAN address ...
pub const DNAT_PORT: u16 = 8080;
/// ... to this port on the client.
pub const DNAT_TARGET_PORT: u16 = 80;

/// The router's nftables ruleset, shaped like OpenWrt's firewall4, as a
/// complete `nft -f` script. The leading `add table`/`delete table` makes it
/// idempotent: loading it again atomically replaces the table.
///
/// Named counters: `fwd_all` counts every packet the forward hook sees (tests
/// use it to prove offloaded packets bypass the slow path), `fwd_invalid`
/// counts conntrack-INVALID drops (should stay 0 when offload keeps conntrack
/// state right).
pub fn router_ruleset() -> String {
    r#"add table inet fw4
delete table inet fw4
table inet fw4 {
	counter fwd_all {
	}

	counter fwd_invalid {
	}

	chain forward {
		type filter hook forward priority filter; policy drop;
		counter name "fwd_all"
		ct state invalid counter name "fwd_invalid" drop
		ct state vmap { established : accept, related : accept }
		meta l4proto { icmp, ipv6-icmp } accept
		iifname "rlan" oifname "rwan" accept
		iifname "rwan" oifname "rlan" ct status dnat accept
	}

	chain srcnat {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "rwan" meta nfproto ipv4 masquerade
	}

	chain dstnat {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "rwan" meta nfproto ipv4 tcp dport 8080 dnat ip to 192.168.1.2:80
	}

	chain input {
		type filter hook input priority filter; policy accept;
	}
}
"#
    .to_string()
}

/// Options for [`Lab::up`].
#[derive(Debug, Clone)]
pub struct LabOpts {
    /// Namespaces are `{prefix}-lan`, `{prefix}-rtr`, `{prefix}-wan`.
    pub prefix: String,
    /// Make the hosts' veth ends friendly to native XDP redirect: TX checksum
    /// offload off (a redirected frame loses the CHECKSUM_PARTIAL metadata,
    /// so the sender must put a full checksum in) and GRO on (a veth only
    /// accepts XDP-redirected frames if the receiving end has NAPI).
    pub xdp_safe: bool,
    /// Keep router forwarding work on CPU 1 and the traffic generators on
    /// CPU 0 so router CPU cost can be read from /proc/stat's `cpu1`.
    pub isolate_router_cpu: bool,
}

impl Default for LabOpts {
    fn default() -> Self {
        LabOpts { prefix: DEFAULT_PREFIX.to_string(), xdp_safe: false, isolate_router_cpu: false }
    }
}

/// Outcome of the CPU isolation request.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CpuIsolation {
    /// Router NAPI work is pinned to `router_cpu`, generators to `generator_cpu`.
    pub enabled: bool,
    pub router_cpu: Option<usize>,
    pub generator_cpu: Option<usize>,
    /// Human-readable explanation (why it was skipped, what got pinned).
    pub note: String,
}

/// A running lab. Dropping it removes the namespaces it created and kills
/// the processes it spawned (unless [`Lab::persist`] was called).
#[derive(Debug)]
pub struct Lab {
    pub prefix: String,
    /// Namespace names.
    pub lan: String,
    pub rtr: String,
    pub wan: String,
    /// Interface names (fixed inside the namespaces).
    pub lan_if: String,
    pub rtr_lan_if: String,
    pub rtr_wan_if: String,
    pub wan_if: String,
    pub isolation: CpuIsolation,
    /// Namespaces this Lab created; only these are removed on teardown.
    created: Vec<String>,
    /// Pids of spawned children, terminated on teardown.
    children: Mutex<Vec<u32>>,
    /// NAPI kthreads that existed before this lab: never ours to pin.
    foreign_napi: HashSet<libc::pid_t>,
    persistent: bool,
}

/// Fail early with a clear message: everything here needs CAP_SYS_ADMIN and
/// CAP_NET_ADMIN.
pub fn require_root() -> Result<()> {
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the nft-offload lab needs root (it creates network namespaces, veth \
             pairs and nftables rulesets); run it as root, e.g. with sudo"
        );
    }
    Ok(())
}

/// `[{prefix}-lan, {prefix}-rtr, {prefix}-wan]`.
pub fn ns_names(prefix: &str) -> [String; 3] {
    [format!("{prefix}-lan"), format!("{prefix}-rtr"), format!("{prefix}-wan")]
}

fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("invalid lab prefix {prefix:?}: use 1-64 characters from [A-Za-z0-9_-]");
    }
    Ok(())
}

/// Remove the namespaces a `nft-offload-lab up` left behind: kills every
/// process still inside them, then deletes them. Returns the names removed
/// (empty if there was nothing to do).
pub fn lab_down_by_prefix(prefix: &str) -> Result<Vec<String>> {
    require_root()?;
    validate_prefix(prefix)?;
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for ns in ns_names(prefix) {
        if !netns::netns_exists(&ns) {
            continue;
        }
        children::kill_netns_pids(&ns);
        match cmd::run(Command::new("ip").args(["netns", "del", &ns])) {
            Ok(_) => removed.push(ns),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("lab down: {}", errors.join("; "));
    }
    Ok(removed)
}

/// A background process of a test, killed and reaped when dropped (before
/// its lab goes, whose teardown would kill it too).
#[derive(Debug)]
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Lab {
    /// A test's lab: namespaces named `{tag}{pid}x{n}`, unique per process
    /// and call, neighbours resolved.
    pub fn up_unique(tag: &str) -> Result<Lab> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let prefix = format!("{tag}{}x{n}", std::process::id() % 100000);
        let lab = Lab::up(&LabOpts { prefix, xdp_safe: false, isolate_router_cpu: false })?;
        lab.warm_neighbours()?;
        Ok(lab)
    }

    /// Build the topology. On failure everything created so far is removed
    /// and the error names the failed command and its stderr.
    pub fn up(opts: &LabOpts) -> Result<Lab> {
        require_root()?;
        validate_prefix(&opts.prefix)?;
        let [lan, rtr, wan] = ns_names(&opts.prefix);
        for ns in [&lan, &rtr, &wan] {
            if netns::netns_exists(ns) {
                bail!(
                    "network namespace {ns} already exists (a lab with prefix {:?} is \
                     running or was left behind; remove it with `nft-offload-lab down` \
                     or `ip netns del {ns}`)",
                    opts.prefix
                );
            }
        }
        let mut lab = Lab {
            prefix: opts.prefix.clone(),
            lan,
            rtr,
            wan,
            lan_if: LAN_IF.into(),
            rtr_lan_if: RTR_LAN_IF.into(),
            rtr_wan_if: RTR_WAN_IF.into(),
            wan_if: WAN_IF.into(),
            isolation: CpuIsolation::default(),
            created: Vec::new(),
            children: Mutex::new(Vec::new()),
            foreign_napi: cpu::napi_threads().into_iter().map(|(p, _)| p).collect(),
            persistent: false,
        };
        // On error `lab` is dropped here, which tears down what was built.
        lab.build(opts).with_context(|| format!("lab up (prefix {:?}) failed", opts.prefix))?;
        Ok(lab)
    }

    fn build(&mut self, opts: &LabOpts) -> Result<()> {
        let (lan, rtr, wan) = (self.lan.clone(), self.rtr.clone(), self.wan.clone());
        for ns in [&lan, &rtr, &wan] {
            cmd::run(Command::new("ip").args(["netns", "add", ns]))?;
            self.created.push(ns.clone());
            // DAD off before any interface exists so link-local addresses are
            // usable at once too (nodad only covers the addresses we add).
            netns::sysctl(ns, &[("net.ipv6.conf.all.accept_dad", "0"), ("net.ipv6.conf.default.accept_dad", "0")])?;
        }

        // One veth end directly in each namespace: no temporary names in the
        // host namespace, so labs with different prefixes never collide.
        let veths: Vec<String> = [(RTR_LAN_IF, LAN_IF, &lan), (RTR_WAN_IF, WAN_IF, &wan)]
            .iter()
            .map(|(r_if, peer_if, peer_ns)| {
                format!("link add {r_if} netns {rtr} mtu 1500 type veth peer name {peer_if} netns {peer_ns} mtu 1500")
            })
            .collect();
        cmd::ip_batch(None, &veths)?;

        // Per namespace, one `ip -batch`: addresses, links up, then routes
        // (the kernel rejects gateways on a down link).
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        cmd::ip_batch(
            Some(&lan),
            &lines(&[
                "link set lo up",
                "addr add 192.168.1.2/24 dev lan0",
                "addr add fd00:1::2/64 dev lan0 nodad",
                "link set lan0 up",
                "route add default via 192.168.1.1",
                "route add default via fd00:1::1",
            ]),
        )?;
        netns::sysctl(&rtr, &[("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")])?;
        cmd::ip_batch(
            Some(&rtr),
            &lines(&[
                "link set lo up",
                "addr add 192.168.1.1/24 dev rlan",
                "addr add fd00:1::1/64 dev rlan nodad",
                "addr add 203.0.113.1/24 dev rwan",
                "addr add fd00:2::1/64 dev rwan nodad",
            ]),
        )?;
        cmd::run_stdin(&mut cmd::netns_command(&rtr, &["nft", "-f", "-"]), &router_ruleset())?;
        cmd::ip_batch(Some(&rtr), &lines(&["link set rlan up", "link set rwan up"]))?;
        // No IPv4 default on the server on purpose: replies must be
        // masqueraded to reach the client.
        cmd::ip_batch(
            Some(&wan),
            &lines(&[
                "link set lo up",
                "addr add 203.0.113.2/24 dev wan0",
                "addr add fd00:2::2/64 dev wan0 nodad",
                "link set wan0 up",
                "route add default via fd00:2::1",
                "route replace fd00:1::/64 via fd00:2::1",
            ]),
        )?;

        if opts.xdp_safe {
            self.exec(&lan, &["ethtool", "-K", LAN_IF, "tx", "off", "gro", "on"])?;
            self.exec(&wan, &["ethtool", "-K", WAN_IF, "tx", "off", "gro", "on"])?;
        }

        if opts.isolate_router_cpu {
            self.isolate_cpus()?;
        }
        Ok(())
    }

    fn isolate_cpus(&mut self) -> Result<()> {
        let cpus = cpu::usable_cpus();
        if !(cpus.contains(&0) && cpus.contains(&1)) {
            self.isolation = CpuIsolation {
                enabled: false,
                router_cpu: None,
                generator_cpu: None,
                note: format!(
                    "router CPU isolation skipped: needs CPUs 0 and 1, usable CPUs are {cpus:?}; \
                     CPU figures are whole-machine"
                ),
            };
            tracing::warn!("{}", self.isolation.note);
            return Ok(());
        }
        let (rtr, lan, wan) = (self.rtr.clone(), self.lan.clone(), self.wan.clone());
        // A veth only has NAPI (hence a pollable, pinnable context) with GRO
        // or XDP enabled; without it forwarding runs in the sender's softirq
        // on whatever CPU the generator happens to use.
        self.exec(&rtr, &["ethtool", "-K", RTR_LAN_IF, "gro", "on"])?;
        self.exec(&rtr, &["ethtool", "-K", RTR_WAN_IF, "gro", "on"])?;
        // Same for the hosts' ends: their receive NAPI would otherwise run in
        // softirq on the router CPU (veth schedules the peer's NAPI on the
        // transmitting CPU) and be billed to the router.
        self.exec(&lan, &["ethtool", "-K", LAN_IF, "gro", "on"])?;
        self.exec(&wan, &["ethtool", "-K", WAN_IF, "gro", "on"])?;
        // Threaded NAPI turns each poll loop into a kthread
        // (`napi/<dev>-<id>`) that can be pinned like a process.
        for (ns, dev) in [(&rtr, RTR_LAN_IF), (&rtr, RTR_WAN_IF), (&lan, LAN_IF), (&wan, WAN_IF)] {
            let script = format!("echo 1 > /sys/class/net/{dev}/threaded");
            self.exec(ns, &["sh", "-c", &script])?;
        }
        // RPS keeps any protocol processing the hosts do outside their NAPI
        // thread (backlog) on the generator CPU as well.
        for (ns, dev) in [(&lan, LAN_IF), (&wan, WAN_IF)] {
            let script = format!("echo 1 > /sys/class/net/{dev}/queues/rx-0/rps_cpus");
            self.exec(ns, &["sh", "-c", &script])?;
        }
        self.isolation =
            CpuIsolation { enabled: true, router_cpu: Some(1), generator_cpu: Some(0), note: String::new() };
        // The kthreads are created when `threaded` is written; give them a
        // moment in case of a slow system.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let pinned = self.pin_napi_threads()?;
            let has = |d: &str| pinned.iter().any(|(_, c, _)| c.starts_with(&format!("napi/{d}-")));
            if has(RTR_LAN_IF) && has(RTR_WAN_IF) {
                self.isolation.note = format!(
                    "router NAPI threads pinned to CPU 1, generators and host NAPI to CPU 0: {}",
                    pinned.iter().map(|(p, c, cpu)| format!("{c}[{p}]->cpu{cpu}")).collect::<Vec<_>>().join(", ")
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("threaded NAPI enabled but no napi/{RTR_LAN_IF}-*/napi/{RTR_WAN_IF}-* kthreads appeared");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// (Re-)pin this lab's NAPI kthreads: router ones to the router CPU, the
    /// hosts' to the generator CPU. Call again after something may have
    /// recreated NAPI instances (e.g. attaching XDP to a veth). No-op
    /// without isolation. Returns (pid, comm, cpu) of each pinned thread.
    pub fn pin_napi_threads(&self) -> Result<Vec<(i32, String, usize)>> {
        let (Some(r), Some(g)) = (self.isolation.router_cpu, self.isolation.generator_cpu) else {
            return Ok(Vec::new());
        };
        cpu::pin_napi(&self.foreign_napi, &[(RTR_LAN_IF, r), (RTR_WAN_IF, r), (LAN_IF, g), (WAN_IF, g)])
    }

    /// Pids of this lab's router NAPI kthreads (`napi/rlan-*`,
    /// `napi/rwan-*`; only present with CPU isolation, which makes NAPI
    /// threaded).
    pub fn router_napi_threads(&self) -> Vec<i32> {
        cpu::napi_threads()
            .into_iter()
            .filter(|(p, c)| {
                !self.foreign_napi.contains(p)
                    && (c.starts_with(&format!("napi/{RTR_LAN_IF}-")) || c.starts_with(&format!("napi/{RTR_WAN_IF}-")))
            })
            .map(|(p, _)| p)
            .collect()
    }

    /// Tear down now (same as dropping).
    pub fn down(self) {
        drop(self)
    }

    /// Leave the lab running after this value is gone (`nft-offload-lab up`);
    /// remove it later with [`lab_down_by_prefix`]. Children spawned so far
    /// keep running.
    pub fn persist(mut self) {
        self.persistent = true;
    }

    /// `ip netns exec NS args...` as a Command, for custom stdio etc.
    pub fn command(&self, ns: &str, args: &[&str]) -> Command {
        cmd::netns_command(ns, args)
    }

    /// Run `args` inside namespace `ns`; stdout on success, an error with
    /// the command and its stderr otherwise.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        cmd::run(&mut cmd::netns_command(ns, args))
    }

    /// Like [`Lab::exec`] with `input` on stdin.
    pub fn exec_stdin(&self, ns: &str, args: &[&str], input: &str) -> Result<String> {
        cmd::run_stdin(&mut cmd::netns_command(ns, args), input)
    }

    /// Start `args` in `ns` in the background (stdio to /dev/null). The lab
    /// remembers it and kills it on teardown if it is still running.
    pub fn spawn(&self, ns: &str, args: &[&str]) -> Result<Child> {
        self.spawn_pinned(ns, args, None)
    }

    /// [`Lab::spawn`], started pinned to `cpu` (if given).
    pub fn spawn_pinned(&self, ns: &str, args: &[&str], cpu: Option<usize>) -> Result<Child> {
        let mut c = cmd::netns_command(ns, args);
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        if let Some(cpu) = cpu {
            cpu::pin_command(&mut c, cpu);
        }
        self.spawn_cmd(c)
    }

    /// Spawn a prepared command (e.g. from [`Lab::command`] with redirected
    /// output) and track it like [`Lab::spawn`].
    pub fn spawn_cmd(&self, mut c: Command) -> Result<Child> {
        let child = c.spawn().with_context(|| format!("failed to start `{}`", cmd::describe(&c)))?;
        self.children.lock().unwrap_or_else(|e| e.into_inner()).push(child.id());
        Ok(child)
    }

    /// (packets, bytes) of a named counter in the router's `inet fw4` table.
    pub fn counter(&self, name: &str) -> Result<(u64, u64)> {
        let out = self.exec(&self.rtr, &["nft", "-j", "list", "counter", "inet", "fw4", name])?;
        parse_counter_json(&out, name)
    }

    /// Packets of a named counter in the router's `inet fw4` table.
    pub fn counter_packets(&self, name: &str) -> Result<u64> {
        Ok(self.counter(name)?.0)
    }

    /// (rx_packets, rx_bytes, tx_packets, tx_bytes) of `iface` in `ns`, from
    /// sysfs as mounted by `ip netns exec` (sysfs shows the mounting
    /// namespace's devices, so it must be read from inside).
    pub fn iface_stats(&self, ns: &str, iface: &str) -> Result<(u64, u64, u64, u64)> {
        let files: Vec<String> = ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes"]
            .iter()
            .map(|f| format!("/sys/class/net/{iface}/statistics/{f}"))
            .collect();
        let mut args = vec!["cat"];
        args.extend(files.iter().map(String::as_str));
        let out = self.exec(ns, &args)?;
        let v: Vec<u64> = out
            .split_whitespace()
            .map(|x| x.parse::<u64>())
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("parsing statistics of {iface} in {ns}: {out:?}"))?;
        if v.len() != 4 {
            bail!("unexpected statistics of {iface} in {ns}: {out:?}");
        }
        Ok((v[0], v[1], v[2], v[3]))
    }

    /// rx_dropped + tx_dropped summed over the lab's four veth ends: frames
    /// a full NAPI ring or backlog lost (veth_xmit counts them on the
    /// sender, the receiver as rx_dropped).
    pub fn veth_drops(&self) -> Result<u64> {
        let mut n = 0;
        for (ns, dev) in [(&self.lan, LAN_IF), (&self.rtr, RTR_LAN_IF), (&self.rtr, RTR_WAN_IF), (&self.wan, WAN_IF)] {
            let rx = format!("/sys/class/net/{dev}/statistics/rx_dropped");
            let tx = format!("/sys/class/net/{dev}/statistics/tx_dropped");
            let out = self.exec(ns, &["cat", &rx, &tx])?;
            for v in out.split_whitespace() {
                n += v.parse::<u64>().with_context(|| format!("drop counters of {dev} in {ns}: {out:?}"))?;
            }
        }
        Ok(n)
    }

    /// ICMP echo from `ns` to `dst` (implemented in-process, iputils is not
    /// needed); returns the RTT. Retries for up to 3 s.
    pub fn ping(&self, ns: &str, dst: IpAddr) -> Result<Duration> {
        netns::ping(ns, dst, Duration::from_secs(3))
    }

    /// Ping every directly connected peer once in both directions, v4 and
    /// v6, so all neighbour entries are resolved before a test starts.
    pub fn warm_neighbours(&self) -> Result<()> {
        let pairs: [(&str, IpAddr); 8] = [
            (&self.lan, ROUTER_LAN_V4.into()),
            (&self.lan, ROUTER_LAN_V6.into()),
            (&self.wan, ROUTER_WAN_V4.into()),
            (&self.wan, ROUTER_WAN_V6.into()),
            (&self.rtr, CLIENT_V4.into()),
            (&self.rtr, CLIENT_V6.into()),
            (&self.rtr, SERVER_V4.into()),
            (&self.rtr, SERVER_V6.into()),
        ];
        for (ns, dst) in pairs {
            self.ping(ns, dst).with_context(|| format!("warming neighbours: {ns} -> {dst}"))?;
        }
        Ok(())
    }

    /// Reload [`router_ruleset`] (resets counters and rules).
    pub fn load_ruleset(&self) -> Result<()> {
        self.exec_stdin(&self.rtr, &["nft", "-f", "-"], &router_ruleset()).map(|_| ())
    }

    /// Wait until something in `ns` listens on TCP `port` (v4 or v6).
    pub fn wait_tcp_listen(&self, ns: &str, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.exec(ns, &["cat", "/proc/net/tcp", "/proc/net/tcp6"])?;
            if tcp_listening(&out, port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing listens on TCP port {port} in {ns} after {timeout:?}");
            }
            crate::interrupt::check()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until a UDP socket is bound to `port` in `ns`: a datagram sent
    /// to it before that is lost, and a test's single request with it.
    pub fn wait_udp_bound(&self, ns: &str, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.exec(ns, &["cat", "/proc/net/udp", "/proc/net/udp6"])?;
            if socket_in_state(&out, port, "07") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing is bound to UDP port {port} in {ns} after {timeout:?}");
            }
            crate::interrupt::check()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn teardown(&mut self) {
        let pids = std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        children::terminate_children(&pids, children::CHILD_TERM_GRACE);
        for ns in std::mem::take(&mut self.created).into_iter().rev() {
            // Anything else still inside (e.g. started with `exec` by a
            // test and left running) would keep the namespace alive.
            children::kill_netns_pids(&ns);
            if let Err(e) = cmd::run(Command::new("ip").args(["netns", "del", &ns])) {
                tracing::warn!("lab teardown: {e:#}");
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.persistent {
            self.teardown();
        }
    }
}

fn parse_counter_json(out: &str, name: &str) -> Result<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(out).with_context(|| format!("parsing nft JSON for {name}"))?;
    let items = v
        .get("nftables")
        .and_then(|x| x.as_array())
        .ok_or_else(|| anyhow!("nft JSON without `nftables` array: {out}"))?;
    for it in items {
        if let Some(c) = it.get("counter") {
            if c.get("name").and_then(|n| n.as_str()) == Some(name) {
                let p = c.get("packets").and_then(|x| x.as_u64()).unwrap_or(0);
                let b = c.get("bytes").and_then(|x| x.as_u64()).unwrap_or(0);
                return Ok((p, b));
            }
        }
    }
    bail!("counter {name} not found in nft output: {out}")
}

/// Does a /proc/net/tcp{,6} dump show a listener (state 0A) on `port`?
fn tcp_listening(proc_net_tcp: &str, port: u16) -> bool {
    socket_in_state(proc_net_tcp, port, "0A")
}

/// A line of /proc/net/{tcp,udp}{,6} with local port `port` in `state`
/// (hex: 0A TCP_LISTEN, 07 TCP_CLOSE, which an unconnected UDP socket is).
fn socket_in_state(proc_net: &str, port: u16, state: &str) -> bool {
    let want = format!("{port:04X}");
    proc_net.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[3] == state && f[1].rsplit(':').next() == Some(want.as_str())
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Unique per test process and call: parallel test runs never share
    /// namespaces.
    pub(crate) fn prefix() -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!("nfo{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
    }

    pub(crate) fn netns_list() -> String {
        cmd::run(Command::new("ip").args(["netns", "list"])).unwrap()
    }

    #[test]
    fn parses_nft_counter_json() {
        let j = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "inet", "name": "fwd_all", "table": "fw4", "handle": 5, "packets": 42, "bytes": 4200}}]}"#;
        assert_eq!(parse_counter_json(j, "fwd_all").unwrap(), (42, 4200));
        assert!(parse_counter_json(j, "other").is_err());
    }

    #[test]
    fn detects_tcp_listener() {
        let t = "  sl  local_address rem_address   st\n   0: 00000000000000000000000000000000:1451 00000000000000000000000000000000:0000 0A 0\n   1: 0100007F:0050 0200007F:1F90 01 0\n";
        assert!(tcp_listening(t, 5201));
        // Port 80 only appears in an ESTABLISHED (01) line.
        assert!(!tcp_listening(t, 80));
        let u = "  sl  local_address rem_address   st\n  12: 00000000:270F 00000000:0000 07 0\n";
        assert!(socket_in_state(u, 9999, "07") && !socket_in_state(u, 9998, "07"));
    }

    #[test]
    fn rejects_bad_prefix() {
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("a b").is_err());
        assert!(validate_prefix("nfo123x0").is_ok());
    }

    /// Needs root: fails (does not skip) with a "needs root" message
    /// otherwise.
    #[test]
    fn lab_end_to_end() {
        let p = prefix();
        let names = ns_names(&p);
        let srv_pid;
        {
            let lab = Lab::up(&LabOpts { prefix: p.clone(), xdp_safe: false, isolate_router_cpu: false })
                .unwrap_or_else(|e| panic!("{e:#}"));
            let list = netns_list();
            for n in &names {
                assert!(list.contains(n.as_str()), "{n} missing from {list}");
            }
            // A second lab with the same prefix must refuse, not clobber.
            let e = Lab::up(&LabOpts { prefix: p.clone(), ..Default::default() }).unwrap_err();
            assert!(format!("{e:#}").contains("already exists"), "{e:#}");

            lab.warm_neighbours().unwrap();
            let fwd0 = lab.counter_packets("fwd_all").unwrap();

            // Client -> server through the router, both families. The server
            // has no IPv4 route back to 192.168.1.0/24, so a v4 reply proves
            // masquerade works.
            lab.ping(&lab.lan, SERVER_V4.into()).unwrap();
            lab.ping(&lab.lan, SERVER_V6.into()).unwrap();
            lab.ping(&lab.wan, CLIENT_V6.into()).unwrap();
            // ... and the server really has no IPv4 path to the LAN.
            assert!(lab.ping(&lab.wan, CLIENT_V4.into()).is_err());

            let fwd1 = lab.counter_packets("fwd_all").unwrap();
            assert!(fwd1 >= fwd0 + 6, "forward chain saw {fwd0} -> {fwd1}");

            // conntrack shows the masqueraded ICMP flow: reply goes to the
            // router's WAN address.
            let ct = lab.exec(&lab.rtr, &["conntrack", "-L", "-p", "icmp"]).unwrap();
            assert!(
                ct.lines()
                    .any(|l| l.contains("src=192.168.1.2 dst=203.0.113.2")
                        && l.contains("src=203.0.113.2 dst=203.0.113.1")),
                "no masqueraded entry in:\n{ct}"
            );

            // DNAT port forward: WAN -> 203.0.113.1:8080 -> 192.168.1.2:80.
            // Left running on purpose: Drop must kill and reap it.
            #[allow(clippy::zombie_processes)]
            let srv = lab.spawn(&lab.lan, &["iperf3", "-s", "-p", "80"]).unwrap();
            srv_pid = srv.id();
            lab.wait_tcp_listen(&lab.lan, 80, Duration::from_secs(5)).unwrap();
            let out = lab.exec(&lab.wan, &["iperf3", "-c", "203.0.113.1", "-p", "8080", "-t", "1", "-J"]).unwrap();
            let r = crate::iperf::parse_iperf(&out, false).unwrap();
            assert!(r.bits_per_second > 1e6, "DNAT transfer too slow: {r:?}");
            let ct = lab.exec(&lab.rtr, &["conntrack", "-L", "-p", "tcp"]).unwrap();
            assert!(
                ct.lines().any(|l| l.contains("dst=203.0.113.1")
                    && l.contains("dport=8080")
                    && l.contains("src=192.168.1.2")),
                "no DNAT entry in:\n{ct}"
            );

            assert_eq!(lab.counter_packets("fwd_invalid").unwrap(), 0);
            let (rx_p, rx_b, tx_p, tx_b) = lab.iface_stats(&lab.wan, WAN_IF).unwrap();
            assert!(rx_p > 0 && rx_b > 0 && tx_p > 0 && tx_b > 0);
        }
        assert!(!std::path::Path::new(&format!("/proc/{srv_pid}")).exists(), "lab child {srv_pid} survived");
        let list = netns_list();
        for n in &names {
            assert!(!list.contains(n.as_str()), "{n} left behind: {list}");
        }
    }

    /// Needs root. XDP-safe + CPU isolation settings are applied, and a
    /// persisted lab is removed by `lab_down_by_prefix`.
    #[test]
    fn lab_isolation_and_down_by_prefix() {
        let p = prefix();
        let lab = Lab::up(&LabOpts { prefix: p.clone(), xdp_safe: true, isolate_router_cpu: true })
            .unwrap_or_else(|e| panic!("{e:#}"));
        let k = lab.exec(&lab.lan, &["ethtool", "-k", LAN_IF]).unwrap();
        assert!(k.contains("tx-checksumming: off"), "{k}");
        assert!(k.contains("generic-receive-offload: on"), "{k}");
        if lab.isolation.enabled {
            let t = lab.exec(&lab.rtr, &["cat", "/sys/class/net/rlan/threaded"]).unwrap();
            assert_eq!(t.trim(), "1");
            let pinned = lab.pin_napi_threads().unwrap();
            assert!(pinned.iter().any(|(_, c, cpu)| c.starts_with("napi/rlan-") && *cpu == 1));
            let rps = lab.exec(&lab.wan, &["cat", "/sys/class/net/wan0/queues/rx-0/rps_cpus"]).unwrap();
            assert_eq!(rps.trim().replace(',', "").trim_start_matches('0'), "1");
        } else {
            assert!(lab.isolation.note.contains("skipped"));
        }
        lab.warm_neighbours().unwrap();
        lab.ping(&lab.lan, SERVER_V4.into()).unwrap();
        lab.persist();
        assert!(netns_list().contains(&format!("{p}-rtr")));
        let removed = lab_down_by_prefix(&p).unwrap();
        assert_eq!(removed.len(), 3);
        let list = netns_list();
        assert!(!list.contains(&format!("{p}-")), "{list}");
        assert!(lab_down_by_prefix(&p).unwrap().is_empty());
    }
}
