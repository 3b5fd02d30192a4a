//! nft-offload: flow offload for Linux routers.
//!
//! The fast path is BPF (bpf/*.bpf.c); this crate is the control plane that
//! follows conntrack and programs the fast path's maps.

pub mod bench;
pub mod check;
pub mod cli;
pub mod conntrack;
pub mod control;
pub mod dataplane;
pub mod engine;
pub mod flow;
pub mod host;
pub mod lab;
pub mod policy;
pub mod proto;
pub mod routes;
pub mod settings;
