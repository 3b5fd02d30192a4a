//! Ctrl-C for long lab runs: the demo installs a SIGINT/SIGTERM handler that
//! only sets a flag, and every waiting loop of the kit checks it, so an
//! interrupt unwinds through the normal error path (and the lab's Drop cleans
//! up) instead of killing the process with namespaces left behind.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// The router's own guard (nft_offload::host): SIGINT/SIGTERM only set a
/// flag while it is installed.
pub use nft_offload::host::SignalGuard;

/// Has SIGINT/SIGTERM arrived while a [`SignalGuard`] was installed?
pub fn interrupted() -> bool {
    nft_offload::host::stop_requested()
}

/// An "interrupted" error if [`interrupted`].
pub fn check() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleep for `d`, waking early with an error on an interrupt.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check()?;
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    Ok(())
}
