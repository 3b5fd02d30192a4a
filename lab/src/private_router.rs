//! The router's two ports in a private network namespace, with the fast path
//! loaded but attached nowhere: what fast-path tests and the benchmark's
//! fast-path figures run frames through with BPF_PROG_TEST_RUN. Nothing
//! touches the host, and nothing is left behind: the namespace goes away
//! with the thread that made it.

use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use nft_offload::dataplane::{Dataplane, Probe};

use crate::frames::{RTR_LAN_MAC, RTR_WAN_MAC};

/// The loaded fast path and the ifindexes of its two ports (veths named
/// `rlan` and `rwan`, with [`RTR_LAN_MAC`] and [`RTR_WAN_MAC`]), both XDP
/// redirect targets.
pub struct PrivateRouter {
    pub dp: Dataplane,
    pub lan: u32,
    pub wan: u32,
}

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl PrivateRouter {
    /// Move the calling thread into a new network namespace (child
    /// processes it starts inherit it) and build the router there, with a
    /// fast path sized for `max_flows`. Needs root.
    pub fn enter(max_flows: u32) -> Result<PrivateRouter> {
        Self::enter_for(max_flows, &Probe::kernel())
    }

    /// The same with the fast path built for `probe`: an older kernel's
    /// fallbacks, run on this one.
    pub fn enter_for(max_flows: u32, probe: &Probe) -> Result<PrivateRouter> {
        crate::lab::require_root()?;
        // SAFETY: affects only the calling thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        let (lan_mac, wan_mac) = (mac(RTR_LAN_MAC), mac(RTR_WAN_MAC));
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", "rlan", "type", "veth", "peer", "name", "plan"],
            &["link", "add", "rwan", "type", "veth", "peer", "name", "pwan"],
            &["link", "set", "rlan", "address", &lan_mac, "up"],
            &["link", "set", "rwan", "address", &wan_mac, "up"],
        ] {
            ip(args)?;
        }
        let ifindex = |n: &str| nft_offload::routes::link::ifindex(n).ok_or_else(|| anyhow!("{n} missing"));
        let (lan, wan) = (ifindex("rlan")?, ifindex("rwan")?);
        let mut dp = Dataplane::load_for(max_flows, probe)?;
        // A live control plane, as far as the fast path can tell.
        dp.set_heartbeat(nft_offload::engine::now_ns());
        dp.add_xdp_target(lan)?;
        dp.add_xdp_target(wan)?;
        Ok(PrivateRouter { dp, lan, wan })
    }
}
