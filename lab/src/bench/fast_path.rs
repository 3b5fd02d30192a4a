//! The fast path alone: ns per packet by BPF_PROG_TEST_RUN.

use anyhow::{bail, Result};

use super::private::{client_of, hops, in_thread, install, tcp_frame, tuple};
use super::{BenchOpts, FastPathAlone, Stat};
use crate::private_router::PrivateRouter;
use nft_offload::flow::build_direction;

/// BPF_PROG_TEST_RUN reuses one packet for all repetitions, and the fast
/// path rewrites it (NAT, TTL), so a naive repeat would measure one hit and
/// then misses. Here the NATed packet is itself a flow that NATs back, the
/// TTL starts at 255 and each run repeats 200 times: every repetition is a
/// hit with NAT. The figure is the kernel's per-repetition average, which
/// includes the test-run loop's own small overhead (compare with `miss`).
pub(super) fn fast_path_alone(o: &BenchOpts) -> Result<FastPathAlone> {
    // XDP runs with repeat > 1 switch the XDP dispatcher, one RCU grace
    // period per run (bpf_prog_test_run_xdp): few runs, many repetitions.
    let (runs, reps) = if o.quick { (20, 3) } else { (50, 7) };
    let repeat = 200u32;
    in_thread(move || {
        let PrivateRouter { mut dp, lan, wan } = PrivateRouter::enter(1024)?;
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
            // As the engine's loop would: the fast path forwards only while
            // the control plane is alive.
            dp.set_heartbeat(nft_offload::engine::now_ns());
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
                dp.set_heartbeat(nft_offload::engine::now_ns());
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
