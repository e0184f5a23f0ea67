//! Test bed for sip-dispatch: network-namespace topologies with RAII cleanup, child
//! processes inside them, SIPp drivers with exact call accounting, and an end-to-end
//! scenario runner shared by the integration tests (`tests/`) and `cargo xtask run`; the
//! kernel tests' frames and BPF_PROG_TEST_RUN harness (`frames`, `testrun`); and the
//! benchmark `sd-bench` (`src/bin/sd-bench/`, feature `bench`); a scripted UAS (`uas`) for
//! backends whose health-probe answers a test changes at run time.
//!
//! Everything runs inside namespaces this crate creates (`sdt<pid>n<seq>-<role>`), using
//! only 198.18.0.0/24 and 2001:db8::/64 (and 198.19.0.0/16 for the flood generator's
//! spoofed sources); nothing touches the root namespace's interfaces.
//! Needs root, `ip`, `ethtool` and `sipp`; the controller tests also `named` and `dig`, the
//! affinity test `nft`.
pub mod bed;
pub mod cancel;
pub mod cmd;
pub mod controller;
pub mod dispatcher;
pub mod dns;
pub mod dsr;
pub mod events;
pub mod flood;
pub mod frames;
pub mod link;
pub mod netns;
pub mod nft;
pub mod preflight;
pub mod process;
pub mod rawnet;
pub mod responder;
pub mod scenario;
pub mod sipp;
pub mod testrun;
pub mod topology;
pub mod uas;

pub use dispatcher::XdpMode;
pub use scenario::{ScenarioConfig, ScenarioSummary, run_direct, run_scenario};
pub use topology::Family;
