//! What every end-to-end test file needs: a lab of its own with a unique
//! prefix, and background processes that are killed when the test ends,
//! also when an assertion fails.

use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Lab, LabOpts};

/// A lab for one test: namespaces named `<tag><pid>x<n>`, unique across
/// concurrent test processes and tests, neighbours resolved. Panics with
/// the reason if the lab cannot be built (a test never skips).
pub fn test_lab(tag: &str) -> Lab {
    static N: AtomicU32 = AtomicU32::new(0);
    let prefix = format!("{tag}{}x{}", std::process::id() % 100000, N.fetch_add(1, Ordering::SeqCst));
    let lab = Lab::up(&LabOpts { prefix, xdp_safe: false, isolate_router_cpu: false })
        .unwrap_or_else(|e| panic!("building the lab: {e:#}"));
    lab.warm_neighbours().unwrap_or_else(|e| panic!("{e:#}"));
    lab
}

/// A background process, killed and reaped when dropped.
pub struct Bg(pub Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
