//! sip-dispatch's controller, as a library: the binary (`main.rs`) is its CLI, and the
//! kernel tests drive the same [`dataplane::Dataplane`] the daemon uses.
// Every unsafe block says why it is sound (`clippy --all-targets -- -D warnings` checks).
#![warn(clippy::undocumented_unsafe_blocks)]
pub mod addrs;
pub mod affinity_maps;
pub mod backend_ids;
pub mod bpffs;
pub mod census;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod controller;
pub mod dataplane;
pub mod docs;
pub mod forwarder;
pub mod hashkey;
pub mod health;
pub mod ippacket;
pub mod logging;
pub mod metrics;
pub mod neighbours;
pub mod netlink;
pub mod nexthops;
pub mod notify;
pub mod protocol;
pub mod rawudp;
pub mod run;
pub mod select;
pub mod service_ids;
pub mod slowpath;
pub mod srv;
pub mod state;
pub mod stats;
pub mod sysctl;
pub mod table_builds;
