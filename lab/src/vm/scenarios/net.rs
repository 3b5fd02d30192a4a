//! The router every scenario starts from (the lab's LAN client - router -
//! WAN server over veth), the firewall4-shaped ruleset with a flowtable, and
//! the proof that a connection was offloaded with its bytes intact.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{Evidence, Offload};
use crate::lab::{Lab, LabOpts, CLIENT_V4, SERVER_V4};
use crate::vm::stream::{Direction, Transfer};
use crate::Daemon;

/// A checked transfer's two phases: a warm-up that gets the connection
/// offloaded, then the bulk the evidence is about (~6,000 data segments;
/// short enough for TCG).
pub const WARMUP_BYTES: u64 = 256 << 10;
pub const BULK_BYTES: u64 = 8 << 20;

/// Named counters of the ruleset, by name.
pub type Counters = std::collections::BTreeMap<String, u64>;

/// A scenario's router: the lab plus what the scenario made of it.
pub struct Router {
    pub lab: Lab,
    /// The router's L3 devices the ruleset names (`iifname`/`oifname`).
    pub lan_dev: String,
    pub wan_dev: String,
    /// The address the client connects to, and the one the server binds.
    pub server: IpAddr,
    pub server_bind: IpAddr,
    /// Lines added to the forward chain before the accept rules (IPsec
    /// policies, extra marks).
    pub forward_extra: String,
    /// Private directory for rulesets and logs.
    pub dir: PathBuf,
    /// Masquerade on the WAN device (false where the scenario routes).
    pub masquerade: bool,
    /// More matches on the masquerade rule (`ip daddr != ...`).
    pub masq_match: String,
    /// Bytes of each transfer's bulk phase.
    pub bulk: u64,
    /// The hosts' ports were made ready for XDP redirects (`Router::up`).
    pub xdp_ready: bool,
}

/// A namespace prefix unique in this guest: `{tag}{n}`.
fn unique_prefix(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}{}", N.fetch_add(1, Ordering::Relaxed))
}

impl Router {
    /// The lab with its usual addresses. `xdp_ready`: the hosts' veth ends
    /// take XDP redirects (GRO on, so their NAPI runs) and put full
    /// checksums in (TX checksum offload off), as real NICs would.
    pub fn up(tag: &str, how: Offload) -> Result<Router> {
        let lab =
            Lab::up(&LabOpts { prefix: unique_prefix(tag), xdp_safe: how == Offload::Xdp, isolate_router_cpu: false })?;
        lab.warm_neighbours()?;
        let dir = tempfile::Builder::new().prefix(&format!("{}-", lab.prefix)).tempdir()?.keep();
        Ok(Router {
            lab,
            lan_dev: "rlan".into(),
            wan_dev: "rwan".into(),
            server: SERVER_V4.into(),
            server_bind: SERVER_V4.into(),
            forward_extra: String::new(),
            dir,
            masquerade: true,
            masq_match: String::new(),
            bulk: BULK_BYTES,
            xdp_ready: how == Offload::Xdp,
        })
    }

    pub fn rtr(&self, args: &[&str]) -> Result<String> {
        self.lab.exec(&self.lab.rtr, args)
    }

    pub fn lan(&self, args: &[&str]) -> Result<String> {
        self.lab.exec(&self.lab.lan, args)
    }

    pub fn wan(&self, args: &[&str]) -> Result<String> {
        self.lab.exec(&self.lab.wan, args)
    }

    /// `sh -c script` in `ns`, for the multi-step device set-ups.
    pub fn sh(&self, ns: &str, script: &str) -> Result<String> {
        self.lab.exec(ns, &["sh", "-ec", script])
    }

    /// The firewall4 shape with a flowtable over `devices`: policy drop,
    /// the `fwd_all` counter first, `flow add @ft` for TCP and UDP,
    /// established/related accepted, invalid dropped (and counted),
    /// LAN -> WAN accepted, masquerade on the WAN device.
    pub fn ruleset(&self, devices: &[&str]) -> String {
        let devs = devices.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(", ");
        let (lan, wan) = (&self.lan_dev, &self.wan_dev);
        let masq = if self.masquerade {
            format!("oifname \"{wan}\" meta nfproto ipv4 {} masquerade", self.masq_match)
        } else {
            String::new()
        };
        format!(
            r#"add table inet fw4
delete table inet fw4
table inet fw4 {{
	counter fwd_all {{
	}}

	counter fwd_invalid {{
	}}

	flowtable ft {{
		hook ingress priority 0
		devices = {{ {devs} }}
	}}

	counter fwd_lan_in {{
	}}

	counter fwd_wan_in {{
	}}

	chain forward {{
		type filter hook forward priority filter; policy drop;
		counter name "fwd_all"
		iifname "{lan}" counter name "fwd_lan_in"
		iifname "{wan}" counter name "fwd_wan_in"
{extra}
		meta l4proto {{ tcp, udp }} flow add @ft
		ct state invalid counter name "fwd_invalid" drop
		ct state {{ established, related }} accept
		meta l4proto {{ icmp, ipv6-icmp }} accept
		iifname "{lan}" oifname "{wan}" accept
	}}

	chain srcnat {{
		type nat hook postrouting priority srcnat; policy accept;
		{masq}
	}}
}}
"#,
            extra = self.forward_extra
        )
    }

    /// Write the ruleset for `devices` into the scenario's directory.
    pub fn ruleset_file(&self, devices: &[&str]) -> Result<PathBuf> {
        let p = self.dir.join("fw4.nft");
        std::fs::write(&p, self.ruleset(devices)).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }

    /// Put `how` in charge of offloading `devices`' connections: the
    /// kernel's flowtable, or the engine in a mode. The engine's handle
    /// stops it when dropped.
    pub fn offload(&self, how: Offload, devices: &[&str]) -> Result<Option<Daemon>> {
        let file = self.ruleset_file(devices)?;
        let f = file.to_str().context("path")?;
        match how {
            Offload::Kernel => {
                self.rtr(&["nft", "-f", f]).context("loading the ruleset with the kernel's flowtable")?;
                Ok(None)
            }
            Offload::Tc | Offload::Xdp => {
                // Make sure the kernel flowtable is not what offloads: the
                // engine blanks the flowtable and loads the rest.
                Ok(Some(Daemon::start_raw(&self.lab, &["--nft", f, "--mode", how.as_str()])?))
            }
        }
    }

    /// Put a switch between the router's WAN port and the WAN host: a
    /// namespace holding the router's veth peer (`wan0`) in a bridge with a
    /// new veth to the WAN host (`wan1` there, with the host's addresses).
    /// Capturing what `wan0` receives there is the wire: nothing in the
    /// switch decrypts or re-injects (on the WAN host itself, xfrm
    /// re-injects decrypted packets on the receiving device, so a capture
    /// there sees them as if from the wire). Returns the switch namespace.
    pub fn wire_tap(&mut self) -> Result<ExtraNs> {
        let sw = ExtraNs::add(&format!("{}-sw", self.lab.prefix))?;
        let (wan, sw_name) = (self.lab.wan.clone(), sw.name.clone());
        self.sh(
            &wan,
            &format!(
                "ip addr flush dev wan0\n\
                 ip link set wan0 netns {sw_name}\n\
                 ip link add wan1 type veth peer name swp1 netns {sw_name}\n\
                 ip addr add 203.0.113.2/24 dev wan1\n\
                 ip addr add fd00:2::2/64 dev wan1 nodad\n\
                 ip link set wan1 up\n\
                 ip -6 route replace default via fd00:2::1\n\
                 ip -6 route replace fd00:1::/64 via fd00:2::1\n"
            ),
        )?;
        self.sh(
            &sw_name,
            "ip link set lo up\n\
             ip link add br0 type bridge\n\
             ip link set wan0 master br0\n\
             ip link set swp1 master br0\n\
             ip link set wan0 up\n\
             ip link set swp1 up\n\
             ip link set br0 up\n",
        )?;
        if self.xdp_ready {
            // The router's XDP redirects land on wan0: it needs NAPI.
            self.sh(&sw_name, "ethtool -K wan0 gro on\n")?;
            self.sh(&wan, "ethtool -K wan1 tx off\n")?;
        }
        // The WAN host's MAC changed: forget the old one.
        self.sh(&self.lab.rtr, "ip neigh flush dev rwan\n")?;
        self.lab.ping(&self.lab.rtr, "203.0.113.2".parse()?)?;
        Ok(sw)
    }

    /// `nft-offload run --nft` with `devices` in `--mode xdp` must be
    /// refused before anything runs, its error naming each of `names`, and
    /// leave no XDP program behind (TC would be TCX links, gone with the
    /// process that held them).
    pub fn expect_xdp_refused(&self, ev: &mut Evidence, devices: &[&str], names: &[&str]) -> Result<()> {
        let file = self.ruleset_file(devices)?;
        let exe = crate::router_bin()?;
        let args = [exe.to_str().context("path")?, "run", "--nft", file.to_str().context("path")?, "--mode", "xdp"];
        let out = self.lab.command(&self.lab.rtr, &args).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or_default().to_string();
        ev.put("refusal", last.clone());
        if out.status.success() || !names.iter().all(|n| last.contains(n)) {
            bail!("--mode xdp with {devices:?} listed should be refused naming {names:?}: {:?}: {err}", out.status);
        }
        let links = self.rtr(&["ip", "-d", "link", "show"])?;
        if links.contains("prog/xdp") {
            bail!("the refused start left an XDP program attached: {links}");
        }
        Ok(())
    }

    /// Packets of every named counter of the ruleset, read in one `nft`
    /// call.
    pub fn counters(&self) -> Result<Counters> {
        let out = self.rtr(&["nft", "-j", "list", "counters", "table", "inet", "fw4"])?;
        let v: Value = serde_json::from_str(&out).context("nft -j list counters")?;
        let mut m = Counters::new();
        for it in v["nftables"].as_array().into_iter().flatten() {
            if let Some(c) = it.get("counter") {
                if let (Some(n), Some(p)) = (c["name"].as_str(), c["packets"].as_u64()) {
                    m.insert(n.to_string(), p);
                }
            }
        }
        if !m.contains_key("fwd_all") {
            bail!("no fwd_all counter in the ruleset: {out}");
        }
        Ok(m)
    }

    pub fn fwd_packets(&self) -> Result<u64> {
        self.lab.counter_packets("fwd_all")
    }

    /// A checked download (server -> client) proving the offload; see
    /// [`Router::prove_transfer`].
    pub fn prove_download(&self, ev: &mut Evidence, tag: &str, port: u16, d: Option<&Daemon>) -> Result<()> {
        self.prove_transfer(ev, tag, port, Direction::Download, d)
    }

    /// A checked transfer through the router proving the offload: after a
    /// warm-up the connection is offloaded (the offloader says so: the
    /// kernel's conntrack entry shows [OFFLOAD], or the engine lists it),
    /// then the bulk, during which the forward chain's first rule, a
    /// counter, must not count a single packet, and every byte must arrive
    /// as sent. `d`: the engine, when it is the one offloading.
    pub fn prove_transfer(
        &self,
        ev: &mut Evidence,
        tag: &str,
        port: u16,
        dir: Direction,
        d: Option<&Daemon>,
    ) -> Result<()> {
        self.prove_transfer_from(ev, tag, port, dir, d, &self.lab.lan)
    }

    /// [`Router::prove_transfer`] with the client in namespace `client_ns`.
    pub fn prove_transfer_from(
        &self,
        ev: &mut Evidence,
        tag: &str,
        port: u16,
        dir: Direction,
        d: Option<&Daemon>,
        client_ns: &str,
    ) -> Result<()> {
        let m = self.measure_transfer(ev, tag, port, dir, d, client_ns, true)?;
        let offloaded_after = m.offloaded_after.with_context(|| format!("{tag}: after the warm-up"))?;
        ev.put(&format!("{tag}_offloaded_after_ms"), offloaded_after.as_millis() as u64);
        // Offloaded: the forward chain stops counting. A stray packet or two
        // (seen once from the kernel flowtable itself on 6.1) is tolerated up
        // to 0.5% of the bulk's segments; not offloaded, it counts them all.
        if m.fwd_bulk * 200 > self.bulk / 1448 {
            bail!(
                "{tag}: the forward chain counted {} packets during the {}-byte bulk (~{} data segments): not \
                 offloaded",
                m.fwd_bulk,
                self.bulk,
                self.bulk / 1448
            );
        }
        Ok(())
    }

    /// A checked transfer (see [`Router::prove_transfer`]) that asserts only
    /// that every byte arrived: what the forward chain counted is returned
    /// for the caller to judge. `wait`: give the offloader up to 10 s after
    /// the warm-up (false where nothing is expected to offload).
    #[allow(clippy::too_many_arguments)]
    pub fn measure_transfer(
        &self,
        ev: &mut Evidence,
        tag: &str,
        port: u16,
        dir: Direction,
        d: Option<&Daemon>,
        client_ns: &str,
        wait: bool,
    ) -> Result<Measured> {
        let lab = &self.lab;
        let (server_ns, client_ns) = (lab.wan.clone(), client_ns.to_string());
        let t = Transfer {
            server_ns: &server_ns,
            server: SocketAddr::new(self.server_bind, port),
            client_ns: &client_ns,
            connect_to: SocketAddr::new(self.server, port),
            warmup: WARMUP_BYTES,
            bulk: self.bulk,
            seed: u64::from(port) * 7919 + 1,
            rate: 0,
            direction: dir,
            timeout: Duration::from_secs(60),
        };
        let c0 = self.counters()?;
        let (rep, (offloaded_after, c1), c2) = t.run(
            || {
                let waited = if wait { self.wait_offloaded(port, d) } else { Err(anyhow::anyhow!("not waited for")) };
                if let Some(d) = d {
                    // How the engine says it carries the connection (its
                    // headers per direction, held directions), for the record.
                    let flows = d.flows().unwrap_or_default();
                    if let Some(f) = flows.iter().find(|x| x["orig"]["dport"] == port) {
                        ev.put(&format!("{tag}_engine_encap"), f["encap"].clone());
                        ev.put(&format!("{tag}_engine_slow"), f["slow"].clone());
                    }
                }
                Ok((waited, self.counters()?))
            },
            || self.counters(),
        )?;
        let delta =
            |a: &Counters, b: &Counters, k: &str| b.get(k).copied().unwrap_or(0) - a.get(k).copied().unwrap_or(0);
        let during = delta(&c1, &c2, "fwd_all");
        let (lan_in, wan_in) = (delta(&c1, &c2, "fwd_lan_in"), delta(&c1, &c2, "fwd_wan_in"));
        let (fwd0, fwd1) = (c0["fwd_all"], c1["fwd_all"]);
        ev.put(&format!("{tag}_bytes"), rep.received.bytes);
        ev.put(&format!("{tag}_intact"), rep.intact(t.total()));
        ev.put(&format!("{tag}_digest"), rep.received.digest.clone());
        ev.put(&format!("{tag}_fwd_warmup"), fwd1 - fwd0);
        ev.put(&format!("{tag}_fwd_bulk"), during);
        ev.put(&format!("{tag}_fwd_bulk_from_lan"), lan_in);
        ev.put(&format!("{tag}_fwd_bulk_from_wan"), wan_in);
        ev.put(&format!("{tag}_bulk_segments"), self.bulk / 1448);
        ev.put(
            &format!("{tag}_bulk_mbit_s"),
            ((self.bulk as f64 * 8.0 / rep.bulk_seconds / 1e6) * 10.0).round() / 10.0,
        );
        if !rep.intact(t.total()) {
            bail!(
                "{tag}: {} of {} bytes arrived, first difference at {:?}, digest {} vs sent {}",
                rep.received.bytes,
                t.total(),
                rep.received.first_bad,
                rep.received.digest,
                rep.sent_digest
            );
        }
        Ok(Measured { fwd_bulk: during, fwd_bulk_from_lan: lan_in, fwd_bulk_from_wan: wan_in, offloaded_after })
    }

    /// The egress MTU handled as the kernel does, on an offloaded UDP flow:
    /// once the flow is offloaded (small datagrams both ways), the client
    /// sends a datagram that fills its own 1500-byte link with DF set. The
    /// router must not forward it but answer "fragmentation needed" with
    /// the egress MTU (ip_forward: ip_exceeds_mtu, icmp_send), so the
    /// client's route cache learns `mtu` and its next send of that size
    /// fails locally (EMSGSIZE); a datagram of exactly `mtu` bytes then
    /// passes. The server must never see the oversized one.
    pub fn prove_mtu(&self, ev: &mut Evidence, port: u16, mtu: u16, d: Option<&Daemon>) -> Result<()> {
        use std::net::UdpSocket;
        let server = SocketAddr::new(self.server_bind, port);
        let to = SocketAddr::new(self.server, port);
        // The echo server reports the sizes it received.
        let (tx, rx) = std::sync::mpsc::channel::<usize>();
        let sock = crate::lab::netns::in_netns(&self.lab.wan, move || {
            UdpSocket::bind(server).with_context(|| format!("binding {server}"))
        })?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let echo = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(40) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if n == 1 && buf[0] == b'q' {
                        break;
                    }
                    let _ = sock.send_to(&buf[..n.min(64)], from);
                    if tx.send(n).is_err() {
                        break;
                    }
                }
            }
        });
        // Not connected: a connected socket would also report the ICMP
        // error itself on a later call (sk_err), which would mix with the
        // local path MTU check this looks at.
        let client = crate::lab::netns::in_netns(&self.lab.lan, move || {
            let c = UdpSocket::bind("0.0.0.0:0")?;
            c.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok(c)
        })?;
        let res = (|| -> Result<()> {
            // IP_PMTUDISC_DO: DF on every datagram, and the kernel's
            // learned path MTU enforced on send.
            let one: libc::c_int = 2;
            use std::os::fd::AsRawFd;
            // SAFETY: valid socket and option buffer.
            let rc = unsafe {
                libc::setsockopt(
                    client.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if rc != 0 {
                bail!("IP_MTU_DISCOVER: {}", std::io::Error::last_os_error());
            }
            let mut buf = [0u8; 64];
            // Small datagrams both ways until the flow is offloaded.
            let start = Instant::now();
            loop {
                client.send_to(b"hello", to)?;
                let _ = client.recv_from(&mut buf);
                if self.udp_offloaded(port, d) {
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    bail!("the UDP flow to port {port} was not offloaded within 10 s");
                }
            }
            while rx.try_recv().is_ok() {}
            let big = vec![0x5au8; 1500 - 28];
            client.send_to(&big, to).context("sending the first oversized datagram (no path MTU known yet)")?;
            std::thread::sleep(Duration::from_millis(500));
            let second = client.send_to(&big, to);
            let cache = self.lan(&["ip", "-4", "route", "get", &self.server.to_string()])?;
            let learned = cache.split_whitespace().skip_while(|w| *w != "mtu").nth(1).unwrap_or("none").to_string();
            ev.put("mtu_learned_by_client", learned.clone());
            ev.put("mtu_second_send", format!("{:?}", second.as_ref().map_err(|e| e.raw_os_error())));
            let fits = vec![0xa5u8; mtu as usize - 28];
            client.send_to(&fits, to).context("sending a datagram of exactly the MTU")?;
            std::thread::sleep(Duration::from_millis(500));
            let seen: Vec<usize> = rx.try_iter().collect();
            ev.put("mtu_server_saw", format!("{seen:?}"));
            if seen.contains(&big.len()) {
                bail!(
                    "the server received the {}-byte datagram: the router forwarded it past its {mtu} MTU",
                    big.len() + 28
                );
            }
            if learned != mtu.to_string() {
                bail!("the client's route cache did not learn MTU {mtu} from the router: {cache:?}");
            }
            if second.as_ref().map_err(|e| e.raw_os_error()) != Err(Some(libc::EMSGSIZE)) {
                bail!("the second oversized send should fail with EMSGSIZE, got {second:?}");
            }
            if !seen.contains(&fits.len()) {
                bail!("a datagram of exactly {mtu} bytes did not arrive (server saw {seen:?})");
            }
            Ok(())
        })();
        let _ = client.send_to(b"q", to);
        let _ = echo.join();
        res
    }

    /// Whether the offloader says the UDP flow to `port` is offloaded.
    fn udp_offloaded(&self, port: u16, d: Option<&Daemon>) -> bool {
        match d {
            None => self
                .rtr(&["conntrack", "-L", "-p", "udp", "--dport", &port.to_string()])
                .map(|o| o.contains("[OFFLOAD]"))
                .unwrap_or(false),
            Some(d) => d.flows().map(|f| f.iter().any(|x| x["orig"]["dport"] == port)).unwrap_or(false),
        }
    }

    /// Wait until the offloader says the connection to `port` is offloaded:
    /// the kernel flowtable's [OFFLOAD] status bit in conntrack, or the
    /// engine's `flows`. How long it took.
    fn wait_offloaded(&self, port: u16, d: Option<&Daemon>) -> Result<Duration> {
        let start = Instant::now();
        let p = port.to_string();
        loop {
            let done = match d {
                None => self
                    .rtr(&["conntrack", "-L", "-p", "tcp", "--dport", &p])
                    .map(|o| o.contains("[OFFLOAD]") || o.contains("[HW_OFFLOAD]"))
                    .unwrap_or(false),
                Some(d) => d
                    .flows()
                    .map(|f| f.iter().any(|x| x["orig"]["dport"] == port || x["reply"]["sport"] == port))
                    .unwrap_or(false),
            };
            if done {
                return Ok(start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the connection to port {port} was not offloaded within 10 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The engine's own figures, next to the independent ones (recorded, not
    /// judged: the forward-chain counter is the evidence).
    pub fn engine_figures(&self, ev: &mut Evidence, d: &Daemon) -> Result<Value> {
        let st = d.status()?;
        for k in ["offloads_total", "fast_path_packets"] {
            ev.put(&format!("engine_{k}"), st[k].clone());
        }
        let modes: Vec<String> = st["interfaces"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| format!("{}:{}", i["name"].as_str().unwrap_or("?"), i["mode"].as_str().unwrap_or("?")))
                    .collect()
            })
            .unwrap_or_default();
        ev.put("engine_attached", modes.join(" "));
        // Debian's kernels carry nf_conntrack's BTF and the kfuncs (6.0+):
        // the fast path keeps conntrack entries alive itself there.
        // And reads a UDP entry's stream_ts there (not degraded).
        let line = st["kernel"]["features"]
            .as_array()
            .and_then(|f| f.iter().find(|l| l["name"] == "keepalive"))
            .cloned()
            .unwrap_or_default();
        let keepalive = line["value"].as_str().unwrap_or("?").to_string();
        ev.put("engine_keepalive", keepalive.clone());
        ev.put("engine_ct_refreshes", st["fast_path_ct_refreshes"].clone());
        ev.put("engine_netlink_refreshes", st["conntrack_refreshes"].clone());
        if keepalive != "fast_path" || line["degraded"] != false {
            bail!(
                "keepalive is {keepalive:?}, not the fast path's, on this Debian kernel: {}\n--- engine log ---\n{}",
                st["kernel"],
                d.log_tail(60)
            );
        }
        Ok(st)
    }
}

/// The client address the router masquerades.
pub fn client_v4() -> IpAddr {
    CLIENT_V4.into()
}

/// Common ending of a scenario run by the engine: its figures and a clean
/// stop (exit 0, everything detached).
pub fn finish(r: &Router, ev: &mut Evidence, d: Option<Daemon>) -> Result<()> {
    if let Some(d) = d {
        r.engine_figures(ev, &d)?;
        d.stop().context("stopping the engine")?;
    }
    let _ = std::fs::remove_dir_all(&r.dir);
    Ok(())
}

/// What [`Router::measure_transfer`] saw besides the bytes (which it
/// checks itself).
pub struct Measured {
    /// Packets the forward chain counted during the bulk: all, and those
    /// that arrived on the LAN or the WAN device (one per direction).
    pub fwd_bulk: u64,
    pub fwd_bulk_from_lan: u64,
    pub fwd_bulk_from_wan: u64,
    /// How long until the offloader listed the connection, or why not.
    pub offloaded_after: Result<Duration>,
}

/// A namespace a scenario adds to the lab (a second LAN client): removed
/// when dropped, with whatever still runs inside, even on failure.
pub struct ExtraNs {
    pub name: String,
}

impl ExtraNs {
    pub fn add(name: &str) -> Result<ExtraNs> {
        crate::lab::cmd::run(std::process::Command::new("ip").args(["netns", "add", name]))?;
        let ns = ExtraNs { name: name.to_string() };
        crate::lab::netns::sysctl(
            name,
            &[("net.ipv6.conf.all.accept_dad", "0"), ("net.ipv6.conf.default.accept_dad", "0")],
        )?;
        Ok(ns)
    }
}

impl Drop for ExtraNs {
    fn drop(&mut self) {
        crate::lab::children::kill_netns_pids(&self.name);
        let _ = crate::lab::cmd::run(std::process::Command::new("ip").args(["netns", "del", &self.name]));
    }
}
