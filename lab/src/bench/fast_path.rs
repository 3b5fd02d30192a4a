//! The fast path alone: ns per packet by BPF_PROG_TEST_RUN.

use anyhow::{bail, Result};

use super::private::{client_of, hops, in_thread, install, tcp_frame, tuple};
use super::{BenchOpts, FastPathAlone, Stat};
use crate::frames::{encap, fo_encaps, Encap, CLIENT_MAC, RTR_LAN_MAC};
use crate::private_router::PrivateRouter;
use nft_offload::dataplane::Dataplane;
use nft_offload::flow::{build_direction, NextHop};

/// One measured frame, and whether it is a hit.
struct Row {
    name: &'static str,
    frame: Vec<u8>,
    hit: bool,
}

/// The ping-pong pair of client port `port` (see `fast_path_alone`), both
/// on the LAN port: the first arrives with `e` and leaves without, the
/// second arrives without and leaves with it, so each repetition crosses
/// one encapsulation boundary, as each packet through a router with a
/// VLAN or PPPoE WAN does.
/// A direction that arrives in a PPPoE session takes frames from the
/// concentrator's MAC only (`fo_flow.in_smac`, pppoe_rcv's check): here the
/// client's, which the frame starts with and the push writes back.
fn ping_pong(dp: &Dataplane, lan: u32, to_wan: &NextHop, port: u16, e: &[Encap]) -> Result<()> {
    let (client, nat) = ("192.168.1.2", "203.0.113.1");
    let pppoe = e.iter().any(|x| matches!(x, Encap::Pppoe(_)));
    let back_to_client = NextHop { smac: CLIENT_MAC, dmac: RTR_LAN_MAC, ..*to_wan };
    let to_wan = if pppoe { &back_to_client } else { to_wan };
    let pairs = [
        (tuple(client, port, "203.0.113.2", 5201), tuple("203.0.113.2", 5201, nat, port), true),
        (tuple(nat, port, "203.0.113.2", 5201), tuple("203.0.113.2", 5201, client, port), false),
    ];
    for (seen, other, arrives_with) in pairs {
        let mut d = build_direction(&seen, &other, lan, to_wan);
        let (with, without) = (fo_encaps(e), fo_encaps(&[]));
        let (k, o) = if arrives_with { (with, without) } else { (without, with) };
        (d.key.encap, d.key.encap_num) = k;
        (d.val.out_encap, d.val.out_encap_num) = o;
        if pppoe && arrives_with {
            d.val.in_smac = CLIENT_MAC;
        }
        dp.put_flow(&d.key, &d.val)?;
    }
    Ok(())
}

/// BPF_PROG_TEST_RUN reuses one packet for all repetitions, and the fast
/// path rewrites it (NAT, TTL), so a naive repeat would measure one hit and
/// then misses. Here the NATed packet is itself a flow that NATs back, the
/// TTL starts at 255 and each run repeats 200 times: every repetition is a
/// hit with NAT. The figure is the kernel's per-repetition average, which
/// includes the test-run loop's own small overhead (compare with `miss`).
/// The VLAN and PPPoE hits alternate between popping and pushing their
/// header; TC's tags after the first repetition are in skb metadata, where
/// its push left them (the common case on a real port). TC takes PPPoE in
/// to the slow path, so it has no PPPoE ping-pong: its PPPoE push is
/// tested for correctness only (a one-repetition run is all test-run
/// overhead). All rows are interleaved run by run, so a busy machine slows
/// them alike.
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
        let (vlan, pppoe) = ([Encap::Vlan(7)], [Encap::Pppoe(0x1a2b)]);
        ping_pong(&dp, lan, &to_wan, 10001, &vlan)?;
        ping_pong(&dp, lan, &to_wan, 10002, &pppoe)?;
        let c = client_of(0).0;
        let row = |name, frame, hit| Row { name, frame, hit };
        let rows = [
            // TTL 255: it drops by one per repetition
            row("ipv4 nat tcp hit", tcp_frame(false, c, 10000, 255), true),
            row("ipv4 vlan nat tcp hit", encap(&tcp_frame(false, c, 10001, 255), &vlan), true),
            row("ipv4 pppoe nat tcp hit", encap(&tcp_frame(false, c, 10002, 255), &pppoe), true),
            row("ipv6 tcp hit", tcp_frame(true, [0; 4], 40002, 255), true),
            row("miss", tcp_frame(false, c, 9999, 64), false),
        ];
        // TC cannot take PPPoE off: that row is XDP's only
        let tc_of = |r: &Row| !r.name.contains("pppoe nat");
        for r in &rows {
            // As the engine's loop would: the fast path forwards only while
            // the control plane is alive.
            dp.set_heartbeat(nft_offload::engine::now_ns());
            for n in [1, repeat] {
                // the last of `repeat` repetitions must still be a hit
                let vx = dp.test_xdp(&r.frame, lan, n)?.0 == 4;
                let vt = if tc_of(r) { dp.test_tc(&r.frame, lan, None, n)?.0 == 7 } else { r.hit };
                if vx != r.hit || vt != r.hit {
                    bail!("fast-path benchmark frame {:?}, {n} repetitions: xdp hit {vx} / tc hit {vt}", r.name);
                }
            }
        }
        let mut x = vec![Vec::new(); rows.len()];
        let mut t = vec![Vec::new(); rows.len()];
        for _ in 0..reps {
            let (mut sx, mut st) = (vec![0u64; rows.len()], vec![0u64; rows.len()]);
            dp.set_heartbeat(nft_offload::engine::now_ns());
            for _ in 0..runs {
                for (i, r) in rows.iter().enumerate() {
                    sx[i] += dp.test_xdp(&r.frame, lan, repeat)?.2;
                    if tc_of(r) {
                        st[i] += dp.test_tc(&r.frame, lan, None, repeat)?.2;
                    }
                }
            }
            for i in 0..rows.len() {
                x[i].push(sx[i] as f64 / f64::from(runs));
                t[i].push(st[i] as f64 / f64::from(runs));
            }
        }
        let mut out = FastPathAlone::default();
        for (i, r) in rows.iter().enumerate() {
            out.ns_per_pkt.insert(format!("xdp {}", r.name), Stat::of(std::mem::take(&mut x[i])));
            if tc_of(r) {
                out.ns_per_pkt.insert(format!("tc {}", r.name), Stat::of(std::mem::take(&mut t[i])));
            }
        }
        Ok(out)
    })
}
