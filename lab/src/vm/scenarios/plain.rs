//! The lab as it is: Ethernet on both sides (veth), masquerade. The
//! baseline every other topology adds a device to.

use anyhow::Result;

use super::net::{finish, Router};
use super::{step, Ctx, Evidence, Offload};

pub fn run(_ctx: &Ctx, ev: &mut Evidence, how: Offload) -> Result<()> {
    step("lab up");
    let r = Router::up("pl", how)?;
    step("offload");
    let d = r.offload(how, &["rlan", "rwan"])?;
    step("transfer");
    r.prove_download(ev, "download", 5301, d.as_ref())?;
    step("finish");
    finish(&r, ev, d)?;
    step("down");
    Ok(())
}
