//! End-to-end tests of the XDP fast path: SIPp calls through `sip-dispatch run` to three
//! SIPp backends, in native and skb XDP mode, over IPv4 and IPv6.
//!
//! Needs root, SIPp and the sip-dispatch binary (`$SIP_DISPATCH_BIN`, else
//! `target/debug/sip-dispatch`): without them the tests fail, they never skip.
//! Run with `--test-threads=1` (`cargo xtask test` does).
use std::path::PathBuf;

use sip_dispatch_testbed::{Family, ScenarioConfig, XdpMode, dispatcher, preflight, run_scenario};

/// Calls per run: enough for ±4 points to be a meaningful bound (for a 25 % share over
/// 2000 calls, one standard deviation of a fair hash is about 1 point).
const CALLS: u32 = 2000;
/// Calls per second: SIPp on 2 cores keeps this without retransmissions.
const RATE: u32 = 200;
/// Allowed distance of each backend's share from its weight's share, in points.
const TOLERANCE_PP: f64 = 4.0;

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-testbed")
}

fn dispatch(family: Family, mode: XdpMode, weights: &[u32]) {
    preflight::require_all().expect("preflight");
    let binary = dispatcher::binary_path().expect("sip-dispatch binary");
    let mut cfg = ScenarioConfig::new(family, mode, weights, binary);
    cfg.calls = CALLS;
    cfg.rate = RATE;
    cfg.workdir = workdir();
    cfg.verbose = true;
    let summary = run_scenario(&cfg).unwrap_or_else(|e| panic!("{family} {mode} run: {e:#}"));
    eprintln!("{}", summary.table());
    summary
        .check(TOLERANCE_PP)
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Every INVITE, ACK and BYE went out through XDP_TX: stronger than xdp_tx > 0.
    let xdp_tx = summary.exit_stats.counter("xdp_tx");
    assert!(
        xdp_tx >= 3 * summary.uac.successful,
        "xdp_tx = {xdp_tx}, expected at least 3 per call ({} calls); counters {:?}",
        summary.uac.successful,
        summary.exit_stats.counters
    );
    // Keep the logs of failed runs only.
    let _ = std::fs::remove_dir_all(&summary.dir);
}

#[test]
fn native_ipv4_weights_2_1_1() {
    dispatch(Family::V4, XdpMode::Native, &[2, 1, 1]);
}

#[test]
fn native_ipv6_weights_2_1_1() {
    dispatch(Family::V6, XdpMode::Native, &[2, 1, 1]);
}

#[test]
fn skb_ipv4_weights_2_1_1() {
    dispatch(Family::V4, XdpMode::Skb, &[2, 1, 1]);
}

#[test]
fn skb_ipv6_weights_2_1_1() {
    dispatch(Family::V6, XdpMode::Skb, &[2, 1, 1]);
}

#[test]
fn native_ipv4_equal_weights() {
    dispatch(Family::V4, XdpMode::Native, &[1, 1, 1]);
}
