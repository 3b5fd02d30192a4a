//! Fast-path cost against the number of installed flows.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use super::private::{client_of, in_thread, install, tcp_frame};
use super::{BenchOpts, Stat};
use crate::private_router::PrivateRouter;

pub(super) fn scaling(o: &BenchOpts) -> Result<BTreeMap<u64, Stat>> {
    let sizes: Vec<u32> = if o.quick { vec![1, 1000, 100_000] } else { vec![1, 1000, 100_000, 1_000_000] };
    let (samples, reps) = if o.quick { (5000, 2) } else { (20_000, 5) };
    let mut out = BTreeMap::new();
    for n in sizes {
        let st = in_thread(move || {
            let PrivateRouter { mut dp, lan, wan } = PrivateRouter::enter(n + 1)?;
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
                // As the engine's loop would: the fast path forwards only
                // while the control plane is alive.
                dp.set_heartbeat(nft_offload::engine::now_ns());
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
