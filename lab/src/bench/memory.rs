//! Kernel memory of the fast path's maps.

use std::collections::BTreeMap;

use anyhow::Result;

use super::private::in_thread;
use super::BenchOpts;
use crate::private_router::PrivateRouter;

/// Kernel memory of all fast-path maps (memlock in fdinfo), per flow.
pub(super) fn memory(o: &BenchOpts) -> Result<BTreeMap<String, f64>> {
    let mut m = BTreeMap::new();
    let sizes: Vec<u32> = if o.quick { vec![65536] } else { vec![65536, 1_048_576] };
    for n in sizes {
        let bytes = in_thread(move || {
            let PrivateRouter { dp, .. } = PrivateRouter::enter(n)?;
            Ok(dp.map_memory())
        })?;
        let label = if n == 65536 { "64k" } else { "1m" };
        m.insert(format!("map_bytes_per_flow_{label}"), bytes as f64 / f64::from(n));
        m.insert(format!("map_bytes_total_{label}"), bytes as f64);
    }
    Ok(m)
}
