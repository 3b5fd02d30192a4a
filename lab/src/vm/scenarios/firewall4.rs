//! firewall4's own render (tests/fixtures/firewall4/offload-on.nft: what
//! `fw4 print` gives for a stock OpenWrt configuration with software flow
//! offloading on), as the OpenWrt package runs it: loaded by nft as is (the
//! kernel's flowtable, the reference), then by `nft-offload run --nft` in
//! each mode. fw4's `include "/etc/nftables.d/*.nft"` brings in the
//! counting chain the evidence needs, as an owner's file would.

use anyhow::{Context, Result};

use super::net::{finish, Router};
use super::{step, Ctx, Evidence, Offload};
use crate::Daemon;

const RENDER: &str = include_str!("../../../../tests/fixtures/firewall4/offload-on.nft");

/// Counts every forwarded packet the kernel sees, ahead of fw4's chains
/// (priority filter - 1): what an offload takes away from it.
const COUNTING: &str =
    "counter fwd_all {\n}\n\nchain count_forward {\n\ttype filter hook forward priority filter - 1; \
                        policy accept;\n\tcounter name \"fwd_all\"\n}\n";

pub fn run(_ctx: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    step("lab up");
    let r = Router::up("f4", how)?;
    let inc = r.dir.join("nftables.d");
    std::fs::create_dir_all(&inc).context("include directory")?;
    std::fs::write(inc.join("10-count.nft"), COUNTING).context("writing the include")?;
    // The lab's devices in place of the render's (br-lan, eth1), the
    // include directory in place of /etc/nftables.d; nothing else changed.
    let text = RENDER
        .replace("\"br-lan\"", &format!("\"{}\"", r.lan_dev))
        .replace("\"eth1\"", &format!("\"{}\"", r.wan_dev))
        .replace("/etc/nftables.d/", &format!("{}/", inc.display()));
    let file = r.dir.join("fw4-render.nft");
    std::fs::write(&file, text).context("writing the render")?;
    let f = file.to_str().context("path")?;
    // fw4's render replaces the lab's table of the same name.
    r.rtr(&["nft", "delete", "table", "inet", "fw4"])?;
    step("offload");
    let d = match how {
        Offload::Kernel => {
            r.rtr(&["nft", "-f", f]).context("loading fw4's render with the kernel's flowtable")?;
            None
        }
        Offload::Tc | Offload::Xdp => Some(Daemon::start_raw(&r.lab, &["--nft", f, "--mode", how.as_str()])?),
    };
    step("transfer");
    r.prove_download(ev, "download", 5321, d.as_ref())?;
    step("finish");
    finish(&r, ev, d)?;
    step("down");
    Ok(())
}
