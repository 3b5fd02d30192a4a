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
        let masq =
            if self.masquerade { format!("oifname \"{wan}\" meta nfproto ipv4 masquerade") } else { String::new() };
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

	chain forward {{
		type filter hook forward priority filter; policy drop;
		counter name "fwd_all"
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
        let lab = &self.lab;
        let (server_ns, client_ns) = (lab.wan.clone(), lab.lan.clone());
        let t = Transfer {
            server_ns: &server_ns,
            server: SocketAddr::new(self.server_bind, port),
            client_ns: &client_ns,
            connect_to: SocketAddr::new(self.server, port),
            warmup: WARMUP_BYTES,
            bulk: BULK_BYTES,
            seed: u64::from(port) * 7919 + 1,
            rate: 0,
            direction: dir,
            timeout: Duration::from_secs(60),
        };
        let fwd0 = self.fwd_packets()?;
        let (rep, (offloaded_after, fwd1), fwd2) = t.run(
            || {
                let waited = self.wait_offloaded(port, d);
                if let Some(d) = d {
                    // How the engine says it carries the connection (its
                    // headers per direction, held directions), for the record.
                    let flows = d.flows().unwrap_or_default();
                    if let Some(f) = flows.iter().find(|x| x["orig"]["dport"] == port) {
                        ev.put(&format!("{tag}_engine_encap"), f["encap"].clone());
                        ev.put(&format!("{tag}_engine_slow"), f["slow"].clone());
                    }
                }
                Ok((waited, self.fwd_packets()?))
            },
            || self.fwd_packets(),
        )?;
        let during = fwd2 - fwd1;
        ev.put(&format!("{tag}_bytes"), rep.received.bytes);
        ev.put(&format!("{tag}_intact"), rep.intact(t.total()));
        ev.put(&format!("{tag}_digest"), rep.received.digest.clone());
        ev.put(&format!("{tag}_fwd_warmup"), fwd1 - fwd0);
        ev.put(&format!("{tag}_fwd_bulk"), during);
        ev.put(&format!("{tag}_bulk_segments"), BULK_BYTES / 1448);
        ev.put(
            &format!("{tag}_bulk_mbit_s"),
            ((BULK_BYTES as f64 * 8.0 / rep.bulk_seconds / 1e6) * 10.0).round() / 10.0,
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
        let offloaded_after = offloaded_after.with_context(|| format!("{tag}: after the warm-up"))?;
        ev.put(&format!("{tag}_offloaded_after_ms"), offloaded_after.as_millis() as u64);
        if during > 0 {
            bail!(
                "{tag}: the forward chain counted {during} packets during the {BULK_BYTES}-byte bulk (~{} data \
                 segments): not offloaded",
                BULK_BYTES / 1448
            );
        }
        Ok(())
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

    /// The engine's own figures, next to the independent ones.
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
        if st["offloads_total"].as_u64().unwrap_or(0) == 0 || st["fast_path_packets"].as_u64().unwrap_or(0) == 0 {
            bail!("the engine offloaded nothing: {st}");
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
