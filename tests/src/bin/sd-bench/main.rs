//! `sd-bench`: the benchmark behind `cargo xtask bench` (which installs the tools, builds
//! this program and the daemon in release mode, then runs it as root). Not a test: it
//! measures and reports, it asserts nothing.
//!
//! In one run, side by side:
//! 1. **Per-packet cost** (`testrun`): the compiled XDP program through BPF_PROG_TEST_RUN
//!    with a large repeat count, on four packets, next to a minimal MAC-swap program.
//! 2. **Forwarding throughput** (`live`): a generator pinned to CPU 0 sends INVITEs with
//!    distinct Call-IDs at full speed to the VIP on a veth topology; what reaches the
//!    backends is counted, for sip-dispatch (native and skb XDP), the kernel stack to a
//!    UDP socket (XDP not attached), the MAC-swap program (the ceiling) and Kamailio.
//!    The program's live ns/packet comes from `kernel.bpf_stats_enabled`.
//! 3. **End to end** (`e2e`): SIPp calls at a fixed rate through sip-dispatch, directly
//!    to one backend and through Kamailio: median and 99th percentile response times.
//! 4. **Table work** (`tables`): rebuilding and swapping a slot table for 8, 64 and 512
//!    backends, and how many calls move when one backend is removed.
//!
//! Output: `<out>/<UTC stamp>/report.md`, `report.json` and `throughput.svg` (and the
//! logs of the run), with `<out>/latest` pointing at the newest run.
mod e2e;
mod generator;
mod kamailio;
mod live;
mod messages;
mod nsthread;
mod report;
mod svg;
mod tables;
mod testrun;

use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use sip_dispatch_testbed::{cancel, preflight};

use crate::report::{Report, Stamp};

#[derive(Parser, Debug)]
#[command(
    name = "sd-bench",
    about = "Benchmarks sip-dispatch (run it through `cargo xtask bench`)"
)]
struct Cli {
    /// The `sip-dispatch` binary (release build).
    #[arg(long)]
    daemon: PathBuf,
    /// Directory for the reports (a subdirectory per run).
    #[arg(long)]
    out: PathBuf,
    /// The workspace (for the commit stamp).
    #[arg(long, default_value = ".")]
    workspace: PathBuf,
    /// A short run (under 2 minutes): fewer repetitions, shorter windows.
    #[arg(long)]
    quick: bool,
    /// Parts to leave out, comma-separated: testrun, throughput, e2e, tables.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<Part>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Testrun,
    Throughput,
    E2e,
    Tables,
}

/// How long and how often things are measured.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    /// BPF_PROG_TEST_RUN: trials per program and packet, and the time one trial aims at.
    pub testrun_trials: usize,
    pub testrun_trial: Duration,
    /// Throughput: generator calibration, warm-up, measured window, bpf_stats window.
    pub calibrate: Duration,
    pub warmup: Duration,
    pub window: Duration,
    pub stats_window: Duration,
    /// Rounds over all systems (each system's best round is reported).
    pub rounds: usize,
    /// SIPp: calls per second and seconds of calls per variant.
    pub call_rate: u32,
    pub call_seconds: u32,
    /// Tables: timing repetitions, removals tried per size, synthetic Call-IDs.
    pub table_trials: usize,
    pub removals: [usize; 3],
    pub call_ids: usize,
    /// The whole run is cancelled after this long.
    pub deadline: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                testrun_trials: 3,
                testrun_trial: Duration::from_millis(120),
                calibrate: Duration::from_secs(2),
                warmup: Duration::from_millis(800),
                window: Duration::from_secs(3),
                stats_window: Duration::from_secs(1),
                rounds: 1,
                call_rate: 100,
                call_seconds: 5,
                table_trials: 2,
                removals: [4, 4, 4],
                call_ids: 50_000,
                deadline: Duration::from_secs(240),
            }
        } else {
            Plan {
                quick,
                testrun_trials: 5,
                testrun_trial: Duration::from_millis(400),
                calibrate: Duration::from_secs(4),
                warmup: Duration::from_millis(1500),
                window: Duration::from_secs(10),
                stats_window: Duration::from_secs(3),
                rounds: 2,
                call_rate: 200,
                call_seconds: 15,
                table_trials: 5,
                removals: [8, 16, 16],
                call_ids: 200_000,
                deadline: Duration::from_secs(900),
            }
        }
    }
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("sd-bench: error: {e:#}");
            std::process::exit(if cancel::requested() { 130 } else { 1 });
        }
    }
}

/// Prints a step header (the style of `cargo xtask`).
pub fn header(title: &str) {
    println!();
    println!("==> {title}");
}

/// Prints an indented progress line.
pub fn note(msg: impl AsRef<str>) {
    println!("    {}", msg.as_ref());
}

/// An error on one line, cut to a readable length (a verifier log can be megabytes).
pub fn brief(e: &anyhow::Error) -> String {
    let text = format!("{e:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= 600 {
        return text;
    }
    let head: String = chars[..400].iter().collect();
    let tail: String = chars[chars.len() - 150..].iter().collect();
    format!(
        "{head} [... {} characters left out ...] {tail}",
        chars.len() - 550
    )
}

/// Sleeps `d`, returning early with an error on Ctrl-C or the deadline.
pub fn sleep(d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    loop {
        cancel::check()?;
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

fn run(mut cli: Cli) -> Result<()> {
    preflight::require_root()?;
    // Child processes run in their log directory: every path handed on is absolute.
    cli.out = std::path::absolute(&cli.out)?;
    cli.daemon = std::path::absolute(&cli.daemon)?;
    for tool in ["ip", "bridge", "ethtool", "taskset", "bpftool", "sipp"]
        .into_iter()
        .chain(
            (!(cli.skip.contains(&Part::Throughput) && cli.skip.contains(&Part::E2e)))
                .then_some("kamailio"),
        )
    {
        if preflight::which(tool).is_none() {
            bail!("`{tool}` is missing: `cargo xtask bench` installs it");
        }
    }
    if !cli.daemon.is_file() {
        bail!("no sip-dispatch binary at {}", cli.daemon.display());
    }
    let plan = Plan::new(cli.quick);
    ctrlc::set_handler(|| {
        eprintln!("\nsd-bench: interrupted, cleaning up (namespaces, processes, sysctl)...");
        cancel::request();
    })
    .context("installing the Ctrl-C handler")?;
    let deadline = plan.deadline;
    thread::Builder::new()
        .name("deadline".into())
        .spawn(move || {
            thread::sleep(deadline);
            if !cancel::requested() {
                eprintln!("\nsd-bench: the run exceeded {deadline:?}: stopping it");
                cancel::request();
            }
        })
        .context("starting the deadline thread")?;

    let started = Instant::now();
    let stamp = Stamp::collect(&cli.workspace, cli.quick);
    let dir = cli.out.join(&stamp.id);
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    println!(
        "sd-bench: {} run; kernel {}, {} ({} CPUs), commit {}",
        if cli.quick { "quick" } else { "full" },
        stamp.kernel,
        stamp.cpu,
        stamp.cpus,
        stamp.commit
    );
    let mut report = Report::new(stamp);

    if !cli.skip.contains(&Part::Testrun) {
        header("1. per-packet cost: BPF_PROG_TEST_RUN (sip_dispatch vs mac_swap)");
        report.testrun = phase(&mut report.errors, "testrun", || testrun::run(&plan));
    }
    let want_live = !cli.skip.contains(&Part::Throughput) || !cli.skip.contains(&Part::E2e);
    if want_live && !cancel::requested() {
        header("topology: client, dispatcher and 3 backends on a bridge, in network namespaces");
        match live::Bed::build(&cli.daemon, &logs) {
            Ok(bed) => {
                if !cli.skip.contains(&Part::Throughput) && !cancel::requested() {
                    header("2. forwarding throughput: a generator on CPU 0, INVITEs to the VIP");
                    report.throughput =
                        phase(&mut report.errors, "throughput", || live::run(&bed, &plan));
                }
                if !cli.skip.contains(&Part::E2e) && !cancel::requested() {
                    header("3. end to end: SIPp response times");
                    report.e2e = phase(&mut report.errors, "e2e", || e2e::run(&bed, &plan));
                }
                note("removing the topology");
                drop(bed);
            }
            Err(e) => {
                eprintln!("sd-bench: topology: {}", brief(&e));
                report.errors.push(format!("topology: {}", brief(&e)));
            }
        }
    }
    if !cli.skip.contains(&Part::Tables) && !cancel::requested() {
        header("4. table work: rebuild and swap, calls moved on removal");
        report.tables = phase(&mut report.errors, "tables", || tables::run(&plan));
    }
    if cancel::requested() {
        bail!("interrupted; everything the run created was removed");
    }

    report.finish(started.elapsed());
    header("report");
    write_outputs(&report, &cli.out, &dir)?;
    println!();
    println!("{}", report.targets_text());
    if !report.errors.is_empty() {
        println!("    {} part(s) failed: see the report", report.errors.len());
    }
    println!(
        "    took {:.0} s; report: {}",
        started.elapsed().as_secs_f64(),
        dir.join("report.md").display()
    );
    Ok(())
}

/// Runs one part; a failure is recorded (and printed) instead of ending the run, unless
/// it was a Ctrl-C.
fn phase<T>(errors: &mut Vec<String>, name: &str, f: impl FnOnce() -> Result<T>) -> Option<T> {
    if cancel::requested() {
        return None;
    }
    let started = Instant::now();
    match f() {
        Ok(v) => {
            note(format!(
                "{name}: done in {:.1} s",
                started.elapsed().as_secs_f64()
            ));
            Some(v)
        }
        Err(e) => {
            if !cancel::requested() {
                eprintln!("sd-bench: {name} failed: {}", brief(&e));
                errors.push(format!("{name}: {}", brief(&e)));
            }
            None
        }
    }
}

fn write_outputs(report: &Report, out: &Path, dir: &Path) -> Result<()> {
    let md = dir.join("report.md");
    let json = dir.join("report.json");
    let plot = dir.join("throughput.svg");
    std::fs::write(&md, report.markdown()).with_context(|| format!("writing {}", md.display()))?;
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(&plot, svg::throughput(report))
        .with_context(|| format!("writing {}", plot.display()))?;
    let latest = out.join("latest");
    let _ = std::fs::remove_file(&latest);
    if let Some(name) = dir.file_name() {
        std::os::unix::fs::symlink(name, &latest)
            .with_context(|| format!("linking {}", latest.display()))?;
    }
    for p in [&md, &json, &plot] {
        note(format!("wrote {}", p.display()));
    }
    Ok(())
}
