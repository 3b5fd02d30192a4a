//! `nft-offload bench`: offload against the paths a router would otherwise
//! use, measured in one run on the lab (DESIGN.md section 7).
//!
//! Router work is isolated on CPU 1 (threaded NAPI of the router's ports and
//! the engine pinned there), the generator and the hosts run on CPU 0. Router
//! CPU time is CPU 1's non-idle time from /proc/stat. The generator is an XDP
//! program run with BPF_PROG_RUN and BPF_F_TEST_XDP_LIVE_FRAMES on the LAN
//! host's port: it transmits 64-byte UDP frames far faster than sendmmsg.
//! Every figure is the median of several repetitions with min and max.

pub mod plot;

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
#[allow(unused_imports)]
use libbpf_rs::{Link, MapCore, MapFlags};
use serde::Serialize;

use crate::conntrack::CtTuple;
use crate::dataplane::Dataplane;
use crate::flow::{build_direction, NextHop};
use crate::lab::{cpu, netns, Lab, LabOpts};

#[allow(clippy::all, dead_code, non_camel_case_types, non_snake_case, unused_imports)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/bench.skel.rs"));
}

#[derive(Debug, Clone)]
pub struct BenchOpts {
    pub quick: bool,
    pub json: Option<PathBuf>,
    pub exe: PathBuf,
    /// Where SVG plots go.
    pub plots: PathBuf,
}

/// Median with spread.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(mut v: Vec<f64>) -> Stat {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Stat::default();
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Stat { median, min: v[0], max: v[n - 1], n }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct PathResult {
    /// Router CPU ns per forwarded packet at a fixed offered load, 1 flow.
    pub router_ns_per_pkt: Option<Stat>,
    /// Same with 1000 flows.
    pub router_ns_per_pkt_1k: Option<Stat>,
    pub offered_pps: f64,
    /// Forwarded packets/s with the generator at full speed.
    pub max_pps: Option<Stat>,
    pub tcp_1stream_1500_mbps: Option<Stat>,
    pub tcp_1stream_gso_mbps: Option<Stat>,
    pub tcp_4stream_gso_mbps: Option<Stat>,
    pub ping_idle_ms: Option<Stat>,
    pub ping_loaded_p50_ms: Option<f64>,
    pub ping_loaded_p99_ms: Option<f64>,
    #[serde(skip)]
    pub ping_loaded_samples: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct FastPathAlone {
    /// ns per packet by BPF_PROG_TEST_RUN, keyed "xdp ipv4 nat hit" etc.
    pub ns_per_pkt: BTreeMap<String, Stat>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub machine: String,
    pub quick: bool,
    pub paths: BTreeMap<String, PathResult>,
    pub fast_path: FastPathAlone,
    /// flows -> ns per packet (TC entry, one packet per run, keys at random
    /// among the installed flows). Entries installed directly in the map.
    pub scaling_ns_per_pkt: BTreeMap<u64, Stat>,
    pub memory: BTreeMap<String, f64>,
    pub offload: BTreeMap<String, f64>,
    pub ratios: BTreeMap<String, f64>,
    pub targets: BTreeMap<String, String>,
    pub notes: Vec<String>,
}

fn reps(o: &BenchOpts) -> usize {
    if o.quick {
        2
    } else {
        5
    }
}

pub fn run(opts: &BenchOpts) -> Result<Report> {
    crate::lab::require_root()?;
    let mut r = Report { machine: machine(), quick: opts.quick, ..Default::default() };
    eprintln!("bench: fast path alone (BPF_PROG_TEST_RUN)");
    r.fast_path = fast_path_alone(opts)?;
    eprintln!("bench: scaling with the number of flows");
    r.scaling_ns_per_pkt = scaling(opts)?;
    eprintln!("bench: map memory per flow");
    r.memory = memory(opts)?;
    eprintln!("bench: router paths in the lab");
    router_paths(opts, &mut r)?;
    ratios(&mut r);
    if let Some(p) = &opts.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)?).with_context(|| format!("writing {}", p.display()))?;
    }
    std::fs::create_dir_all(&opts.plots)?;
    plot::write_all(&r, &opts.plots)?;
    Ok(r)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{n} x {cpu}, kernel {}", kernel.trim())
}

// ---------------------------------------------------------------- frames

const MAC_C: [u8; 6] = [2, 0, 0, 0, 0, 0x0c];
const MAC_S: [u8; 6] = [2, 0, 0, 0, 0, 0x05];
const MAC_RL: [u8; 6] = [2, 0, 0, 0, 1, 1];
const MAC_RW: [u8; 6] = [2, 0, 0, 0, 2, 1];

/// 64-byte Ethernet frame (60 + FCS on the wire) with IPv4 + UDP, as a
/// packet generator sends.
pub fn udp4_frame(src_mac: [u8; 6], dst_mac: [u8; 6], s: [u8; 4], d: [u8; 4], sp: u16, dp: u16) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(s, d, 64)
        .udp(sp, dp)
        .write(&mut v, &[0x5a; 18])
        .expect("frame");
    v
}

/// Client address and port of the i-th installed benchmark connection.
fn client_of(i: u32) -> ([u8; 4], u16) {
    let hi = i / 50000;
    ([192, 168, (1 + hi / 250) as u8, (2 + hi % 250) as u8], (10000 + i % 50000) as u16)
}

/// A TCP ACK from the LAN client: IPv4 from `src4`, or the IPv6 client.
fn tcp_frame(v6: bool, src4: [u8; 4], sp: u16, ttl: u8) -> Vec<u8> {
    let mut v = Vec::new();
    let eth = etherparse::PacketBuilder::ethernet2(MAC_C, MAC_RL);
    let ip = if v6 {
        eth.ipv6(
            [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            ttl,
        )
    } else {
        eth.ipv4(src4, [203, 0, 113, 2], ttl)
    };
    ip.tcp(sp, 5201, 1, 65000).ack(1).write(&mut v, &[0u8; 6]).expect("frame");
    v
}

fn tuple(s: &str, sp: u16, d: &str, dp: u16) -> CtTuple {
    CtTuple { src: s.parse().expect("addr"), dst: d.parse().expect("addr"), proto: 6, sport: sp, dport: dp }
}

/// A private netns with the router's two ports, and a loaded fast path.
fn private_router(max_flows: u32) -> Result<(Dataplane, u32, u32)> {
    // SAFETY: affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    for args in [
        vec!["link", "add", "rlan", "type", "veth", "peer", "name", "plan"],
        vec!["link", "add", "rwan", "type", "veth", "peer", "name", "pwan"],
        vec!["link", "set", "rlan", "address", "02:00:00:00:01:01", "up"],
        vec!["link", "set", "rwan", "address", "02:00:00:00:02:01", "up"],
    ] {
        let st = Command::new("ip").args(&args).status()?;
        if !st.success() {
            bail!("ip {args:?} failed");
        }
    }
    let lan = crate::routes::link::ifindex("rlan").ok_or_else(|| anyhow!("rlan missing"))?;
    let wan = crate::routes::link::ifindex("rwan").ok_or_else(|| anyhow!("rwan missing"))?;
    let dp = Dataplane::load(max_flows)?;
    dp.add_xdp_target(lan)?;
    dp.add_xdp_target(wan)?;
    Ok((dp, lan, wan))
}

fn hops(lan: u32, wan: u32) -> (NextHop, NextHop) {
    (
        NextHop { ifindex: wan, smac: MAC_RW, dmac: MAC_S, mtu: 1500, xdp_ok: true },
        NextHop { ifindex: lan, smac: MAC_RL, dmac: MAC_C, mtu: 1500, xdp_ok: true },
    )
}

/// Install `n` masqueraded IPv4 TCP connections (both directions) with
/// client ports 10000.. and fd00:1::2 -> fd00:2::2 port 40002 (IPv6).
fn install(dp: &Dataplane, lan: u32, wan: u32, n: u32) -> Result<()> {
    let (to_wan, to_lan) = hops(lan, wan);
    for i in 0..n {
        let (addr, cport) = client_of(i);
        let client = std::net::Ipv4Addr::from(addr).to_string();
        let o = tuple(&client, cport, "203.0.113.2", 5201);
        let rp = tuple("203.0.113.2", 5201, "203.0.113.1", cport);
        let d = build_direction(&o, &rp, lan, &to_wan);
        dp.put_flow(&d.key, &d.val)?;
        let d = build_direction(&rp, &o, wan, &to_lan);
        dp.put_flow(&d.key, &d.val)?;
    }
    let o = tuple("fd00:1::2", 40002, "fd00:2::2", 5201);
    let rp = tuple("fd00:2::2", 5201, "fd00:1::2", 40002);
    let d = build_direction(&o, &rp, lan, &to_wan);
    dp.put_flow(&d.key, &d.val)?;
    Ok(())
}

fn in_thread<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    std::thread::spawn(f).join().map_err(|_| anyhow!("benchmark thread panicked"))?
}

/// BPF_PROG_TEST_RUN reuses one packet for all repetitions, and the fast
/// path rewrites it (NAT, TTL), so a naive repeat would measure one hit and
/// then misses. Here the NATed packet is itself a flow that NATs back, the
/// TTL starts at 255 and each run repeats 200 times: every repetition is a
/// hit with NAT. The figure is the kernel's per-repetition average, which
/// includes the test-run loop's own small overhead (compare with `miss`).
fn fast_path_alone(o: &BenchOpts) -> Result<FastPathAlone> {
    // XDP runs with repeat > 1 switch the XDP dispatcher, one RCU grace
    // period per run (bpf_prog_test_run_xdp): few runs, many repetitions.
    let (runs, reps) = if o.quick { (20, 3) } else { (50, 7) };
    let repeat = 200u32;
    in_thread(move || {
        let (dp, lan, wan) = private_router(1024)?;
        install(&dp, lan, wan, 1)?;
        // ping-pong partner of the IPv4 flow: after NAT the packet is
        // 203.0.113.1:10000 -> 203.0.113.2:5201 on the same port
        let (to_wan, _) = hops(lan, wan);
        let natted = tuple("203.0.113.1", 10000, "203.0.113.2", 5201);
        let back = tuple("203.0.113.2", 5201, "192.168.1.2", 10000);
        let d = build_direction(&natted, &back, lan, &to_wan);
        dp.put_flow(&d.key, &d.val)?;
        let frames = [
            // TTL 255: it drops by one per repetition
            ("ipv4 nat tcp hit", tcp_frame(false, client_of(0).0, 10000, 255)),
            ("ipv6 tcp hit", tcp_frame(true, [0; 4], 40002, 255)),
            ("miss", tcp_frame(false, client_of(0).0, 9999, 64)),
        ];
        let mut out = FastPathAlone::default();
        for (name, f) in &frames {
            let hit = !name.starts_with("miss");
            let (vx, _, _) = dp.test_xdp(f, lan, 1)?;
            let (vt, _, _) = dp.test_tc(f, lan, None, 1)?;
            if (vx == 4) != hit || (vt == 7) != hit {
                bail!("fast-path benchmark frame {name:?} got verdicts xdp {vx} / tc {vt}");
            }
            // the last of `repeat` repetitions must still be a hit
            let (vx, _, _) = dp.test_xdp(f, lan, repeat)?;
            let (vt, _, _) = dp.test_tc(f, lan, None, repeat)?;
            if (vx == 4) != hit || (vt == 7) != hit {
                bail!("{name:?} stopped hitting within {repeat} repetitions (xdp {vx} / tc {vt})");
            }
            let mut x = Vec::new();
            let mut t = Vec::new();
            for _ in 0..reps {
                let (mut sx, mut st) = (0u64, 0u64);
                for _ in 0..runs {
                    sx += dp.test_xdp(f, lan, repeat)?.2;
                    st += dp.test_tc(f, lan, None, repeat)?.2;
                }
                x.push(sx as f64 / f64::from(runs));
                t.push(st as f64 / f64::from(runs));
            }
            out.ns_per_pkt.insert(format!("xdp {name}"), Stat::of(x));
            out.ns_per_pkt.insert(format!("tc {name}"), Stat::of(t));
        }
        Ok(out)
    })
}

fn scaling(o: &BenchOpts) -> Result<BTreeMap<u64, Stat>> {
    let sizes: Vec<u32> = if o.quick { vec![1, 1000, 100_000] } else { vec![1, 1000, 100_000, 1_000_000] };
    let (samples, reps) = if o.quick { (5000, 2) } else { (20_000, 5) };
    let mut out = BTreeMap::new();
    for n in sizes {
        let st = in_thread(move || {
            let (dp, lan, wan) = private_router(n + 1)?;
            install(&dp, lan, wan, n)?;
            // frames of random installed flows, one packet per run
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let frames: Vec<Vec<u8>> = (0..512)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let (addr, port) = client_of((x % u64::from(n)) as u32);
                    tcp_frame(false, addr, port, 64)
                })
                .collect();
            let mut per = Vec::new();
            for _ in 0..reps {
                let mut total = 0u64;
                for k in 0..samples {
                    let (ret, _, ns) = dp.test_tc(&frames[k % frames.len()], lan, None, 1)?;
                    if ret != 7 {
                        bail!("scaling frame not forwarded (verdict {ret})");
                    }
                    total += ns;
                }
                per.push(total as f64 / samples as f64);
            }
            Ok(Stat::of(per))
        })?;
        out.insert(u64::from(n), st);
    }
    Ok(out)
}

/// Kernel memory of all fast-path maps (memlock in fdinfo), per flow.
fn memory(o: &BenchOpts) -> Result<BTreeMap<String, f64>> {
    let mut m = BTreeMap::new();
    let sizes: Vec<u32> = if o.quick { vec![65536] } else { vec![65536, 1_048_576] };
    for n in sizes {
        let bytes = in_thread(move || {
            let (dp, _, _) = private_router(n)?;
            Ok(dp.map_memory())
        })?;
        let label = if n == 65536 { "64k" } else { "1m" };
        m.insert(format!("map_bytes_per_flow_{label}"), bytes as f64 / f64::from(n));
        m.insert(format!("map_bytes_total_{label}"), bytes as f64);
    }
    Ok(m)
}

// ---------------------------------------------------------------- lab paths

const PATHS: [&str; 6] = ["kernel_ct_nat", "kernel_plain", "floor_tc", "floor_xdp", "offload_tc", "offload_xdp"];

fn mac_of(lab: &Lab, ns: &str, ifc: &str) -> Result<[u8; 6]> {
    let out = lab.exec(ns, &["cat", &format!("/sys/class/net/{ifc}/address")])?;
    let v: Vec<u8> = out.trim().split(':').filter_map(|h| u8::from_str_radix(h, 16).ok()).collect();
    v.try_into().map_err(|_| anyhow!("bad MAC for {ifc}: {out}"))
}

fn ifindex_in(lab: &Lab, ns: &str, ifc: &str) -> Result<u32> {
    Ok(lab.exec(ns, &["cat", &format!("/sys/class/net/{ifc}/ifindex")])?.trim().parse()?)
}

/// The traffic generator: a thread inside the LAN namespace that owns the
/// loaded generator program and runs it on request.
struct Gen {
    tx: std::sync::mpsc::Sender<(u32, u32, u16)>,
    rx: std::sync::mpsc::Receiver<Result<Duration>>,
}

impl Gen {
    fn start(lan_ns: &str, lan0: u32, frame: Vec<u8>) -> Result<Gen> {
        let (tx, req) = std::sync::mpsc::channel::<(u32, u32, u16)>();
        let (resp, rx) = std::sync::mpsc::channel::<Result<Duration>>();
        let ns = netns::NetnsHandle::open(lan_ns)?;
        std::thread::spawn(move || {
            if let Err(e) = ns.join() {
                let _ = resp.send(Err(e));
                return;
            }
            let storage = Box::leak(Box::new(MaybeUninit::uninit()));
            let s = match skel::BenchSkelBuilder::default().open(storage).and_then(|o| o.load()) {
                Ok(s) => s,
                Err(e) => {
                    let _ = resp.send(Err(anyhow!("loading the generator: {e}")));
                    return;
                }
            };
            let _ = resp.send(Ok(Duration::ZERO));
            while let Ok((count, nflows, dport)) = req.recv() {
                let r = (|| -> Result<Duration> {
                    let cfg = skel::types::bench_cfg { nflows, base_port: 10000, ..Default::default() };
                    // SAFETY: plain data struct.
                    let cb = unsafe {
                        std::slice::from_raw_parts(
                            (&cfg as *const skel::types::bench_cfg).cast::<u8>(),
                            std::mem::size_of_val(&cfg),
                        )
                    };
                    s.maps.bench_cfg.update(&0u32.to_ne_bytes(), cb, MapFlags::ANY)?;
                    let mut f = frame.clone();
                    f[36..38].copy_from_slice(&dport.to_be_bytes());
                    // xdp_md: data_end at 4, ingress_ifindex at 12
                    let mut ctx = vec![0u8; 24];
                    ctx[4..8].copy_from_slice(&(f.len() as u32).to_ne_bytes());
                    ctx[12..16].copy_from_slice(&lan0.to_ne_bytes());
                    let t0 = Instant::now();
                    let input = libbpf_rs::ProgramInput {
                        data_in: Some(&f),
                        context_in: Some(&mut ctx),
                        repeat: count,
                        flags: 1 << 1, // BPF_F_TEST_XDP_LIVE_FRAMES
                        ..Default::default()
                    };
                    s.progs.bench_gen.test_run(input).context("live-frames generator")?;
                    Ok(t0.elapsed())
                })();
                if resp.send(r).is_err() {
                    break;
                }
            }
        });
        let g = Gen { tx, rx };
        g.rx.recv().map_err(|_| anyhow!("generator thread died"))??;
        Ok(g)
    }

    /// Send `count` frames spread over `nflows` source ports as fast as
    /// possible; returns the time taken.
    fn blast(&self, count: u32, nflows: u32) -> Result<Duration> {
        self.blast_to(count, nflows, 9)
    }

    fn blast_to(&self, count: u32, nflows: u32, dport: u16) -> Result<Duration> {
        self.tx.send((count, nflows, dport)).map_err(|_| anyhow!("generator thread gone"))?;
        self.rx.recv().map_err(|_| anyhow!("generator thread gone"))?
    }
}

/// A bare redirect program on the router's LAN port, held by a thread in
/// the router namespace until dropped.
struct Floor {
    stop: Option<std::sync::mpsc::Sender<()>>,
    th: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.th.take() {
            let _ = t.join();
        }
    }
}

fn attach_floor(lab: &Lab, xdp: bool, rwan: u32, smac: [u8; 6], dmac: [u8; 6]) -> Result<Floor> {
    let rlan = ifindex_in(lab, &lab.rtr, "rlan")?;
    let ns = netns::NetnsHandle::open(&lab.rtr)?;
    let (stop, wait) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel::<Result<()>>();
    let th = std::thread::spawn(move || {
        let r = (|| -> Result<Vec<Link>> {
            ns.join()?;
            let storage = Box::leak(Box::new(MaybeUninit::uninit()));
            let s = Box::leak(Box::new(skel::BenchSkelBuilder::default().open(storage)?.load()?));
            let cfg = skel::types::bench_cfg { out_ifindex: rwan, nflows: 1, base_port: 0, smac, dmac, pad: 0 };
            // SAFETY: plain data struct.
            let cb = unsafe {
                std::slice::from_raw_parts(
                    (&cfg as *const skel::types::bench_cfg).cast::<u8>(),
                    std::mem::size_of_val(&cfg),
                )
            };
            s.maps.bench_cfg.update(&0u32.to_ne_bytes(), cb, MapFlags::ANY)?;
            s.maps.bench_ports.update(&rwan.to_ne_bytes(), &rwan.to_ne_bytes(), MapFlags::ANY)?;
            let mut links = Vec::new();
            if xdp {
                links.push(s.progs.floor_xdp.attach_xdp(rlan as i32)?);
                // like nft-offload, an XDP program on the egress port too
                links.push(s.progs.floor_xdp.attach_xdp(rwan as i32)?);
            } else {
                use libbpf_rs::AsRawLibbpf;
                // SAFETY: valid loaded program; NULL + errno on failure.
                let raw = unsafe {
                    libbpf_sys::bpf_program__attach_tcx(
                        s.progs.floor_tc.as_libbpf_object().as_ptr(),
                        rlan as i32,
                        std::ptr::null(),
                    )
                };
                let p = std::ptr::NonNull::new(raw)
                    .ok_or_else(|| anyhow!("tcx attach: {}", std::io::Error::last_os_error()))?;
                // SAFETY: valid link pointer we own.
                links.push(unsafe { Link::from_ptr(p) });
            }
            Ok(links)
        })();
        match r {
            Ok(links) => {
                let _ = ready_tx.send(Ok(()));
                let _ = wait.recv();
                drop(links);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    });
    ready.recv().map_err(|_| anyhow!("floor thread died"))??;
    Ok(Floor { stop: Some(stop), th: Some(th) })
}

struct EngineProc {
    child: Child,
}

impl EngineProc {
    fn start(lab: &Lab, exe: &std::path::Path, mode: &str) -> Result<EngineProc> {
        let mut cmd = lab.command(
            &lab.rtr,
            &[exe.to_str().unwrap_or("nft-offload"), "run", "--iface", "rlan", "--iface", "rwan", "--mode", mode],
        );
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().context("starting nft-offload run")?;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if lab.command(&lab.rtr, &[exe.to_str().unwrap_or(""), "status", "-o", "json"]).output()?.status.success() {
                if let Ok(pid) = lab.exec(&lab.rtr, &["pgrep", "-f", "nft-offload run --iface rlan"]) {
                    for p in pid.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                        let _ = lab.pin_pid(p, 1);
                    }
                }
                return Ok(EngineProc { child });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("nft-offload did not start");
    }

    fn status(lab: &Lab, exe: &std::path::Path) -> Result<serde_json::Value> {
        let out = lab.exec(&lab.rtr, &[exe.to_str().unwrap_or(""), "status", "-o", "json"])?;
        Ok(serde_json::from_str(&out)?)
    }
}

impl Drop for EngineProc {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our child; it detaches on SIGTERM.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn wan_rx(lab: &Lab) -> Result<u64> {
    Ok(lab.iface_stats(&lab.wan, "wan0")?.0)
}

/// Offered load fixed at `pps` for `secs`: router CPU ns per forwarded packet.
/// Frames per generator run. Each live-frames run sets up a page pool
/// (about a millisecond), so runs must be large; a run is a burst at the
/// generator's full speed, part of which the router's 256-slot veth input
/// ring drops. CPU per packet divides by what was forwarded, so it is not
/// skewed by those drops.
const BATCH: u32 = 2000;

/// Offer `pps` for `secs` in small paced batches; returns
/// (router CPU ns per forwarded packet, forwarded packets per second).
fn paced(lab: &Lab, g: &Gen, nflows: u32, dport: u16, pps: f64, secs: f64) -> Result<(f64, f64)> {
    let rx0 = wan_rx(lab)?;
    let c0 = cpu::sample(Some(1))?;
    let t0 = Instant::now();
    let mut sent = 0f64;
    while t0.elapsed().as_secs_f64() < secs {
        g.blast_to(BATCH, nflows, dport)?;
        sent += f64::from(BATCH);
        let due = sent / pps;
        let now = t0.elapsed().as_secs_f64();
        if due > now {
            std::thread::sleep(Duration::from_secs_f64(due - now));
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(50));
    let c1 = cpu::sample(Some(1))?;
    let fwd = wan_rx(lab)?.saturating_sub(rx0);
    if fwd == 0 {
        bail!("nothing was forwarded");
    }
    Ok((cpu::busy_ns(&c0, &c1).0 as f64 / fwd as f64, fwd as f64 / wall))
}

/// Forwarded packets per second with the generator running back to back.
fn max_pps(lab: &Lab, g: &Gen, secs: f64) -> Result<f64> {
    let rx0 = wan_rx(lab)?;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        g.blast(50_000, 1)?;
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok(wan_rx(lab)?.saturating_sub(rx0) as f64 / wall)
}

fn iperf(lab: &Lab, streams: u32, secs: u32) -> Result<f64> {
    let (p, t) = (streams.to_string(), secs.to_string());
    let out = lab.exec(&lab.lan, &["iperf3", "-c", "203.0.113.2", "-J", "-t", &t, "-P", &p])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().map(|b| b / 1e6).ok_or_else(|| anyhow!("iperf3: no result"))
}

fn set_gso(lab: &Lab, on: bool) -> Result<()> {
    let v = if on { "on" } else { "off" };
    lab.exec(&lab.lan, &["ethtool", "-K", "lan0", "tso", v, "gso", v])?;
    lab.exec(&lab.wan, &["ethtool", "-K", "wan0", "tso", v, "gso", v])?;
    Ok(())
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn router_paths(o: &BenchOpts, r: &mut Report) -> Result<()> {
    let prefix = format!("nfb{}", std::process::id() % 100000);
    let lab = Lab::up(&LabOpts { prefix, xdp_safe: true, isolate_router_cpu: true })?;
    lab.warm_neighbours()?;
    if !lab.isolation.enabled {
        r.notes.push(format!("router CPU not isolated: {}", lab.isolation.note));
    }
    // kernel_plain forwards without NAT: the server needs a route back.
    lab.exec(&lab.wan, &["ip", "route", "add", "192.168.1.0/24", "via", "203.0.113.1"])?;
    // The server drops the generator's packets at once (no ICMP replies).
    lab.exec_stdin(&lab.wan, &["nft", "-f", "-"], "table inet sink {\n chain pre {\n  type filter hook prerouting priority -300;\n  udp dport { 9, 10 } drop\n }\n}\n")?;
    let _srv = lab.spawn_pinned(&lab.wan, &["iperf3", "-s"], Some(0))?;
    lab.wait_tcp_listen(&lab.wan, 5201, Duration::from_secs(5))?;
    let lan0 = ifindex_in(&lab, &lab.lan, "lan0")?;
    let rwan = ifindex_in(&lab, &lab.rtr, "rwan")?;
    let (m_lan0, m_rlan, m_rwan, m_wan0) = (
        mac_of(&lab, &lab.lan, "lan0")?,
        mac_of(&lab, &lab.rtr, "rlan")?,
        mac_of(&lab, &lab.rtr, "rwan")?,
        mac_of(&lab, &lab.wan, "wan0")?,
    );
    let g = Gen::start(&lab.lan, lan0, udp4_frame(m_lan0, m_rlan, [192, 168, 1, 2], [203, 0, 113, 2], 10000, 9))?;
    let n = reps(o);
    let secs = if o.quick { 0.6 } else { 2.0 };
    let pps = 150_000.0;
    let tcp_secs = if o.quick { 2 } else { 5 };
    for path in PATHS {
        eprintln!("bench:   {path}");
        if path == "kernel_plain" {
            lab.exec(&lab.rtr, &["nft", "flush", "ruleset"])?;
        } else {
            lab.load_ruleset()?;
        }
        let _floor = match path {
            "floor_tc" => Some(attach_floor(&lab, false, rwan, m_rwan, m_wan0)?),
            "floor_xdp" => Some(attach_floor(&lab, true, rwan, m_rwan, m_wan0)?),
            _ => None,
        };
        let _engine = match path {
            "offload_tc" => Some(EngineProc::start(&lab, &o.exe, "tc")?),
            "offload_xdp" => Some(EngineProc::start(&lab, &o.exe, "xdp")?),
            _ => None,
        };
        let mut pr = PathResult { offered_pps: pps, ..Default::default() };
        // warm up: conntrack entries for 1 and 1000 flows, then offload
        for _ in 0..8 {
            g.blast(BATCH, 1000)?;
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(1500));
        if path.starts_with("offload") {
            let st = EngineProc::status(&lab, &o.exe)?;
            if st["flows_offloaded"].as_u64().unwrap_or(0) < 1000 {
                r.notes.push(format!(
                    "{path}: only {} of 1000 generator flows offloaded at the start",
                    st["flows_offloaded"]
                ));
            }
        }
        let mut v1 = Vec::new();
        let mut vk = Vec::new();
        let mut vm = Vec::new();
        for _ in 0..n {
            v1.push(paced(&lab, &g, 1, 9, pps, secs)?.0);
            vk.push(paced(&lab, &g, 1000, 9, pps, secs)?.0);
            vm.push(max_pps(&lab, &g, secs)?);
        }
        pr.router_ns_per_pkt = Some(Stat::of(v1));
        pr.router_ns_per_pkt_1k = Some(Stat::of(vk));
        pr.max_pps = Some(Stat::of(vm));
        if !path.starts_with("floor") {
            let mut a = Vec::new();
            let mut b = Vec::new();
            let mut c = Vec::new();
            let tcp_reps = if o.quick { 1 } else { 3 };
            for _ in 0..tcp_reps {
                set_gso(&lab, false)?;
                a.push(iperf(&lab, 1, tcp_secs)?);
                set_gso(&lab, true)?;
                b.push(iperf(&lab, 1, tcp_secs)?);
                c.push(iperf(&lab, 4, tcp_secs)?);
            }
            pr.tcp_1stream_1500_mbps = Some(Stat::of(a));
            pr.tcp_1stream_gso_mbps = Some(Stat::of(b));
            pr.tcp_4stream_gso_mbps = Some(Stat::of(c));
            // latency: idle, then under a saturating TCP load
            let dst = "203.0.113.2".parse()?;
            let idle: Vec<f64> =
                (0..20).filter_map(|_| lab.ping(&lab.lan, dst).ok()).map(|d| d.as_secs_f64() * 1e3).collect();
            pr.ping_idle_ms = Some(Stat::of(idle));
            let load = lab.spawn_pinned(
                &lab.lan,
                &["iperf3", "-c", "203.0.113.2", "-t", &(tcp_secs + 2).to_string()],
                Some(0),
            )?;
            std::thread::sleep(Duration::from_millis(700));
            let t0 = Instant::now();
            let mut samples = Vec::new();
            while t0.elapsed() < Duration::from_secs(u64::from(tcp_secs)) {
                if let Ok(d) = lab.ping(&lab.lan, dst) {
                    samples.push(d.as_secs_f64() * 1e3);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = wait_child(load);
            pr.ping_loaded_p50_ms = Some(percentile(&samples, 0.5));
            pr.ping_loaded_p99_ms = Some(percentile(&samples, 0.99));
            pr.ping_loaded_samples = samples;
        }
        if path == "offload_tc" {
            offload_rate(&lab, &o.exe, if o.quick { 2000 } else { 10_000 }, r)?;
        }
        r.paths.insert(path.to_string(), pr);
    }
    Ok(())
}

fn wait_child(mut c: Child) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if c.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
    Ok(())
}

/// New flows per second the control plane offloads, and how long one
/// takes from its conntrack event to both map entries installed. The new
/// flows come from a UDP sender opening one socket per flow.
fn offload_rate(lab: &Lab, exe: &std::path::Path, n: u32, r: &mut Report) -> Result<()> {
    let before = EngineProc::status(lab, exe)?;
    let pid = before["pid"].as_u64().unwrap_or(0);
    let flows0 = before["flows_offloaded"].as_f64().unwrap_or(0.0);
    let rss0 = rss_kb(pid);
    let o0 = before["offloads_total"].as_u64().unwrap_or(0);
    let py = format!(
        "import socket\nfor p in range(20000, 20000 + {n}):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.bind(('192.168.1.2', p))\n    s.sendto(b'x', ('203.0.113.2', 10))\n    s.close()\n"
    );
    let t0 = Instant::now();
    lab.exec(&lab.lan, &["python3", "-c", &py])?;
    let sent = t0.elapsed().as_secs_f64();
    // Until all are offloaded or nothing moved for a second; the rate
    // counts up to the last offload seen.
    let (mut done, mut last) = (0u64, t0.elapsed());
    while t0.elapsed() < Duration::from_secs(20) && t0.elapsed() < last + Duration::from_secs(1) {
        let st = EngineProc::status(lab, exe)?;
        let d = st["offloads_total"].as_u64().unwrap_or(0) - o0;
        if d > done {
            done = d;
            last = t0.elapsed();
        }
        if done >= u64::from(n) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = last.as_secs_f64().max(1e-3);
    let st = EngineProc::status(lab, exe)?;
    r.offload.insert("new_flows_offered".into(), f64::from(n));
    r.offload.insert("sender_new_flows_per_s".into(), f64::from(n) / sent);
    r.offload.insert("flows_offloaded".into(), done as f64);
    r.offload.insert("offloads_per_s".into(), done as f64 / secs);
    // The daemon's resident memory, before and after these flows.
    let flows1 = st["flows_offloaded"].as_f64().unwrap_or(0.0);
    if let (Some(a), Some(b)) = (rss0, rss_kb(pid)) {
        r.memory.insert("daemon_rss_kb_before".into(), a);
        r.memory.insert("daemon_rss_kb_after".into(), b);
        r.memory.insert("daemon_flows_after".into(), flows1);
        if flows1 > flows0 {
            let per = (b - a).max(0.0) * 1024.0 / (flows1 - flows0);
            r.memory.insert("daemon_rss_bytes_per_flow".into(), per);
            r.memory.insert("daemon_rss_mb_at_64k_estimated".into(), (a * 1024.0 + per * 65536.0) / 1048576.0);
        }
    }
    if done >= u64::from(n) && secs < sent + 0.05 {
        r.notes.push("offloads_per_s is bounded by the sender: the engine kept up with every new flow".into());
    }
    if let Some(p) = st["offload_latency_us"].as_object() {
        for (k, v) in p {
            r.offload.insert(format!("event_to_installed_us_{k}"), v.as_f64().unwrap_or(f64::NAN));
        }
    }
    Ok(())
}

/// VmRSS of a process, in KiB.
fn rss_kb(pid: u64) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn ratios(r: &mut Report) {
    let ns = |p: &str| r.paths.get(p).and_then(|x| x.router_ns_per_pkt.map(|s| s.median));
    let best = if ns("offload_tc").unwrap_or(f64::MAX) <= ns("offload_xdp").unwrap_or(f64::MAX) { "tc" } else { "xdp" };
    let off = ns(&format!("offload_{best}"));
    let mut put = |k: &str, v: Option<f64>, target: &str| {
        if let Some(v) = v {
            r.ratios.insert(k.to_string(), v);
        }
        r.targets.insert(k.to_string(), target.to_string());
    };
    put("offload_vs_floor", ratio(off, ns(&format!("floor_{best}"))), "<= 1.10");
    put("offload_vs_kernel_ct_nat", ratio(off, ns("kernel_ct_nat")), "<= 0.55");
    put("offload_vs_kernel_plain", ratio(off, ns("kernel_plain")), "<= 1.05");
    let sc = |n: u64| r.scaling_ns_per_pkt.get(&n).map(|s| s.median);
    let big = if r.scaling_ns_per_pkt.contains_key(&1_000_000) { 1_000_000 } else { 100_000 };
    put(if big == 1_000_000 { "scaling_1m_vs_1" } else { "scaling_100k_vs_1" }, ratio(sc(big), sc(1)), "<= 1.3");
    let tcp = |p: &str| r.paths.get(p).and_then(|x| x.tcp_1stream_1500_mbps.map(|s| s.median));
    let best_tcp = match (tcp("offload_tc"), tcp("offload_xdp")) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    put("tcp_1500_vs_kernel_ct_nat", ratio(best_tcp, tcp("kernel_ct_nat")), ">= 1.5");
    let p99 = |p: &str| r.paths.get(p).and_then(|x| x.ping_loaded_p99_ms);
    put("ping_p99_loaded_vs_kernel_ct_nat", ratio(p99(&format!("offload_{best}")), p99("kernel_ct_nat")), "<= 0.5");
    // Absolute figures with targets, shown beside the ratios.
    let fp = r.fast_path.ns_per_pkt.get("xdp ipv4 nat tcp hit").map(|s| s.median);
    let p99 = r.offload.get("event_to_installed_us_p99").copied();
    let rate = r.offload.get("offloads_per_s").copied();
    let mem = r.memory.get("map_bytes_per_flow_64k").copied();
    let mut abs = |k: &str, v: Option<f64>, t: &str| {
        if let Some(v) = v {
            r.ratios.insert(k.to_string(), v);
        }
        r.targets.insert(k.to_string(), t.to_string());
    };
    abs("fast_path_ipv4_nat_hit_ns", fp, "<= 60");
    abs("offload_p99_us", p99, "<= 5000");
    abs("offloads_per_s", rate, ">= 50000");
    abs("map_bytes_per_flow", mem, "<= 256");
}

impl Report {
    pub fn render(&self) -> String {
        let mut o = format!("nft-offload bench ({}){}\n\n", self.machine, if self.quick { ", --quick" } else { "" });
        let f =
            |s: &Option<Stat>| s.map(|s| format!("{:.0} ({:.0}-{:.0})", s.median, s.min, s.max)).unwrap_or("-".into());
        o += &format!(
            "{:<14} {:>22} {:>22} {:>22} {:>10} {:>10} {:>10} {:>12}\n",
            "path",
            "router ns/pkt 1 flow",
            "ns/pkt 1k flows",
            "max pps",
            "TCP 1500",
            "TCP GSO",
            "TCP x4",
            "ping p99 ms"
        );
        for p in PATHS {
            if let Some(x) = self.paths.get(p) {
                let m = |s: &Option<Stat>| s.map(|s| format!("{:.0}", s.median)).unwrap_or("-".into());
                o += &format!(
                    "{:<14} {:>22} {:>22} {:>22} {:>10} {:>10} {:>10} {:>12}\n",
                    p,
                    f(&x.router_ns_per_pkt),
                    f(&x.router_ns_per_pkt_1k),
                    f(&x.max_pps),
                    m(&x.tcp_1stream_1500_mbps),
                    m(&x.tcp_1stream_gso_mbps),
                    m(&x.tcp_4stream_gso_mbps),
                    x.ping_loaded_p99_ms.map(|v| format!("{v:.2}")).unwrap_or("-".into())
                );
            }
        }
        o += "\nFast path alone (BPF_PROG_TEST_RUN, ns/pkt):\n";
        for (k, s) in &self.fast_path.ns_per_pkt {
            o += &format!("  {k:<24} {:.1} ({:.1}-{:.1})\n", s.median, s.min, s.max);
        }
        o += "\nScaling (ns/pkt, one packet per run, random installed flow; entries installed directly):\n";
        for (k, s) in &self.scaling_ns_per_pkt {
            o += &format!("  {k:>8} flows  {:.1} ({:.1}-{:.1})\n", s.median, s.min, s.max);
        }
        o += "\nMemory:\n";
        for (k, v) in &self.memory {
            o += &format!("  {k:<28} {v:.0}\n");
        }
        o += "\nOffload:\n";
        for (k, v) in &self.offload {
            o += &format!("  {k:<28} {v:.1}\n");
        }
        o += "\nRatios (measured, target):\n";
        for (k, t) in &self.targets {
            let v = self.ratios.get(k).map(|v| format!("{v:.2}")).unwrap_or("-".into());
            o += &format!("  {k:<36} {v:>8}   target {t}\n");
        }
        for n in &self.notes {
            o += &format!("note: {n}\n");
        }
        o
    }
}
