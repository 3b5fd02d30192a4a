//! `nft-offload lab up|down|demo`.

use anyhow::{Context, Result};

use super::{demo, lab_down_by_prefix, DemoOpts, Lab, LabOpts};
use crate::cli::LabCmd;

/// Entry point for the `lab` subcommands. Data to stdout, logs to stderr.
pub fn cli(cmd: LabCmd) -> Result<()> {
    match cmd {
        LabCmd::Up { prefix } => {
            // XDP-safe so every offload mode is correct on the veths; no CPU
            // isolation, which only matters for measurements.
            let lab = Lab::up(&LabOpts { prefix: prefix.clone(), xdp_safe: true, isolate_router_cpu: false })?;
            lab.warm_neighbours()?;
            println!(
                "lab up: {} (client 192.168.1.2, fd00:1::2 on {}), {} (router: {} {}), \
                 {} (server 203.0.113.2, fd00:2::2 on {})",
                lab.lan, lab.lan_if, lab.rtr, lab.rtr_lan_if, lab.rtr_wan_if, lab.wan, lab.wan_if
            );
            println!(
                "try: ip netns exec {} nft-offload run --iface {} --iface {}",
                lab.rtr, lab.rtr_lan_if, lab.rtr_wan_if
            );
            println!("remove with: nft-offload lab down --prefix {prefix}");
            lab.persist();
            Ok(())
        }
        LabCmd::Down { prefix } => {
            let removed = lab_down_by_prefix(&prefix)?;
            if removed.is_empty() {
                println!("no lab namespaces with prefix {prefix}");
            } else {
                println!("removed {}", removed.join(" "));
            }
            Ok(())
        }
        LabCmd::Demo { prefix, duration, modes, json } => {
            let exe = std::env::current_exe().context("locating the nft-offload binary")?;
            let report = demo(DemoOpts { exe, prefix, duration_s: duration, modes })?;
            print!("{}", report.render());
            if let Some(path) = json {
                let s = serde_json::to_string_pretty(&report)?;
                std::fs::write(&path, s + "\n").with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
    }
}
