//! IPsec: the kernel's xfrm policies (the SPD) and what they mean for
//! offload. A direction the kernel would send through xfrm, or drop for
//! xfrm, is held on the slow path: the fast path never encrypts, so
//! forwarding it would send in clear what the policy says must be
//! encrypted (nft_flow_offload keeps such a route as FLOW_OFFLOAD_XMIT_XFRM
//! and hands the packet to xfrm; we hand it to the kernel). Packets that
//! arrived decrypted are kept off the fast path by the fast path itself
//! (FO_SLOW_SECPATH, bpf/fastpath.bpf.c).
//!
//! `policy`: the SPD, decoded; `matcher`: which policy applies to a
//! direction (pure, table-tested); `watch`: the dump and the change
//! subscription.

pub mod matcher;
pub mod policy;
pub mod watch;

pub use matcher::{applies, Applies, Route};
pub use policy::{Dir, Policy, Spd};
pub use watch::{read_spd, XfrmWatch};
