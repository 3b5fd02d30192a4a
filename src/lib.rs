//! nft-offload: flow offload for Linux routers.
//!
//! The fast path is BPF (bpf/*.bpf.c); this crate is the control plane that
//! follows conntrack and programs the fast path's maps.

pub mod check;
pub mod cli;
pub mod conntrack;
pub mod control;
pub mod dataplane;
pub mod engine;
pub mod flow;
pub mod hooks;
pub mod host;
pub mod nlwatch;
pub mod policy;
pub mod proto;
pub mod routes;
pub mod settings;
pub mod topology;
pub mod xfrm;

/// Logs to stderr, filtered by `NFT_OFFLOAD_LOG` (default `info`): the same
/// for the router binary and the lab's.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NFT_OFFLOAD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
}
