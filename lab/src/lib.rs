//! nft-offload-lab: the test kit of nft-offload, kept out of the router
//! binary. A network-namespace lab (LAN client - firewall4-shaped router -
//! WAN server), the demo and the benchmark run in it, the one launcher for
//! the offload engine ([`Daemon`]), and frame builders for fast-path tests.
//!
//! The kit drives the engine through the router binary's command line only;
//! [`router_bin`] says where that binary is found.

pub mod bench;
pub mod daemon;
pub mod demo;
pub mod docs;
pub mod frames;
pub mod interrupt;
pub mod iperf;
pub mod lab;
pub mod private_router;
pub mod table;
pub mod tun_relay;
pub mod vm;

pub use daemon::{not_offloaded, router_bin, Daemon, DaemonOpts};
pub use lab::{Background, Lab, LabOpts};
