//! `cargo xtask run` without arguments: a self-contained demonstration. Builds an IPv4
//! topology in namespaces, three SIPp backends weighted 2:1:1, the dispatcher in native
//! XDP mode, places calls for about 20 seconds and prints who took what. Everything is
//! removed at the end, on error and on Ctrl-C.
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use sip_dispatch_testbed::{Family, ScenarioConfig, XdpMode, cancel, run_scenario};

/// Share tolerance (percentage points) for the verdict line.
const TOLERANCE_PP: f64 = 4.0;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub family: Family,
    pub mode: XdpMode,
    pub weights: Vec<u32>,
    pub rate: u32,
    pub seconds: u32,
}

pub fn run(binary: PathBuf, opts: &DemoOptions) -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("\nxtask: interrupted, cleaning up (namespaces, processes)...");
        cancel::request();
    })
    .context("installing the Ctrl-C handler")?;

    let mut cfg = ScenarioConfig::new(opts.family, opts.mode, &opts.weights, binary);
    cfg.rate = opts.rate.clamp(1, 1000);
    cfg.calls = cfg.rate.saturating_mul(opts.seconds.clamp(1, 600));
    cfg.verbose = true;
    // Logs go to a directory of this demo, removed at the end unless the run failed.
    cfg.workdir = std::env::temp_dir().join(format!("sip-dispatch-demo-{}", std::process::id()));
    println!(
        "demo: {} calls at {} cps (about {} s) through sip-dispatch ({} XDP, {}) to {} SIPp backends weighted {}",
        cfg.calls,
        cfg.rate,
        cfg.calls / cfg.rate,
        cfg.mode,
        cfg.family,
        cfg.weights.len(),
        cfg.weights
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(":")
    );
    let result = run_scenario(&cfg);
    if cancel::requested() {
        // The topology is gone by now (Drop guards ran inside run_scenario).
        let _ = std::fs::remove_dir_all(&cfg.workdir);
        bail!("interrupted; everything the demo created was removed");
    }
    let summary = result
        .with_context(|| format!("demo run failed (logs kept in {})", cfg.workdir.display()))?;
    println!();
    println!("{}", summary.table());
    println!();
    let problems = summary.problems(TOLERANCE_PP);
    if problems.is_empty() {
        println!(
            "verdict: OK: no failed calls, every call reached exactly one backend, \
             shares within {TOLERANCE_PP} points of the weights, xdp_tx={}",
            summary.exit_stats.counter("xdp_tx")
        );
        let _ = std::fs::remove_dir_all(&cfg.workdir);
        return Ok(());
    }
    println!("verdict: FAILED (logs kept in {}):", summary.dir.display());
    for p in &problems {
        println!("  - {p}");
    }
    bail!("the demo run failed")
}
