//! `cargo xtask fuzz [--seconds N] [TARGET...]`: builds the cargo-fuzz (libFuzzer)
//! targets in `fuzz/` with `cargo +nightly fuzz build` and runs each for N seconds,
//! printing one line per target. A crash fails the task and shows how to reproduce it.
//!
//! Needs no root: the targets only call the parsers of `sip-dispatch-common`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::shell::{self, note};

/// Seconds per target of `cargo xtask fuzz`.
pub const DEFAULT_SECONDS: u64 = 60;

/// Options of every `cargo fuzz build` and `cargo fuzz run` (they must match, or `run`
/// rebuilds). No AddressSanitizer: the fuzzed code is safe Rust, whose bounds checks
/// catch what ASan would, and without it the targets run about 3 times faster in a
/// tenth of the memory. Overflow checks and debug assertions stay on.
const BUILD_OPTIONS: &[&str] = &["--sanitizer", "none"];

/// Where the inputs that reach new coverage go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corpus {
    /// Into `fuzz/corpus/TARGET`, which grows.
    Grow,
    /// Into a scratch directory under the target directory; `fuzz/corpus/TARGET` only
    /// seeds the run and is left as it is (`cargo xtask test`).
    Scratch,
}

pub fn fuzz_dir() -> PathBuf {
    shell::workspace_dir().join("fuzz")
}

/// The fuzz targets: the files of `fuzz/fuzz_targets`, sorted.
pub fn all_targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut targets = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem()
        {
            targets.push(stem.to_string_lossy().into_owned());
        }
    }
    targets.sort();
    Ok(targets)
}

/// `cargo +nightly fuzz SUBCOMMAND` (rustup's cargo, for the `+nightly`), in the workspace.
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(shell::workspace_dir())
        .args(["+nightly", "fuzz", subcommand])
        .args(BUILD_OPTIONS);
    c
}

/// Builds the targets, then runs each of `targets` (all when empty) for `seconds`.
pub fn run(seconds: u64, targets: &[String], corpus: Corpus) -> Result<()> {
    let all = all_targets()?;
    let targets = if targets.is_empty() {
        all.clone()
    } else {
        targets.to_vec()
    };
    if let Some(unknown) = targets.iter().find(|t| !all.contains(t)) {
        bail!("no fuzz target {unknown:?} (there are: {})", all.join(", "));
    }
    shell::run(&mut cargo_fuzz("build"))?;

    let logs = shell::target_dir().join("fuzz");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    note(format!(
        "{seconds} s per target; libFuzzer's output goes to {}/TARGET.log",
        logs.display()
    ));
    let mut failed = Vec::new();
    for target in &targets {
        let log = logs.join(format!("{target}.log"));
        match run_target(target, seconds, corpus, &log) {
            Ok(true) => {}
            Ok(false) => failed.push(target.as_str()),
            Err(e) => {
                note(format!("{target:<16} FAILED: {e:#}"));
                failed.push(target.as_str());
            }
        }
    }
    if !failed.is_empty() {
        bail!("fuzz target(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Runs one target for `seconds` with its output in `log` and prints the one-line result:
/// false after a crash (reported with its reproduction command).
fn run_target(target: &str, seconds: u64, corpus: Corpus, log: &Path) -> Result<bool> {
    let seeds = fuzz_dir().join("corpus").join(target);
    let mut cmd = cargo_fuzz("run");
    cmd.arg(target);
    let grown = match corpus {
        Corpus::Grow => seeds.clone(),
        Corpus::Scratch => {
            let scratch = shell::target_dir().join("fuzz").join("corpus").join(target);
            match fs::remove_dir_all(&scratch) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", scratch.display())),
            }
            // libFuzzer adds new inputs to the first corpus directory.
            cmd.arg(&scratch).arg(&seeds);
            scratch
        }
    };
    fs::create_dir_all(&grown).with_context(|| format!("creating {}", grown.display()))?;
    cmd.args(["--", "-print_final_stats=1"])
        .arg(format!("-max_total_time={seconds}"));

    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let started = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .with_context(|| format!("cannot start `{}`", shell::display(&cmd)))?;
    let took = started.elapsed().as_secs();
    let text = fs::read_to_string(log).unwrap_or_default();
    let stats = Stats::parse(&text);
    let (files, bytes) = dir_size(&grown);

    if status.success() {
        note(format!(
            "{target:<16} ok    {} runs in {took} s ({} exec/s), {} new inputs; corpus {files} files, {} KiB",
            stats.runs.as_deref().unwrap_or("?"),
            stats.exec_per_sec.as_deref().unwrap_or("?"),
            stats.new_units.as_deref().unwrap_or("?"),
            bytes.div_ceil(1024),
        ));
        return Ok(true);
    }
    let Some(artifact) = stats.artifact else {
        bail!(
            "`{}` failed ({status}) without a failing input; see {}",
            shell::display(&cmd),
            log.display()
        );
    };
    let artifact = artifact
        .strip_prefix(shell::workspace_dir())
        .unwrap_or(&artifact)
        .to_owned();
    note(format!(
        "{target:<16} CRASH after {took} s: {}",
        stats.panic.as_deref().unwrap_or("see the log")
    ));
    note(format!("    failing input: {}", artifact.display()));
    note(format!(
        "    reproduce:     cargo +nightly fuzz run {} {target} {}",
        BUILD_OPTIONS.join(" "),
        artifact.display()
    ));
    note(format!("    log:           {}", log.display()));
    Ok(false)
}

/// What the log of one run says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    runs: Option<String>,
    exec_per_sec: Option<String>,
    new_units: Option<String>,
    /// The input that failed (libFuzzer's "Test unit written to PATH").
    artifact: Option<PathBuf>,
    /// `file:line: message` of a panic.
    panic: Option<String>,
}

impl Stats {
    fn parse(log: &str) -> Stats {
        let stat = |name: &str| {
            log.lines()
                .filter_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
                .next_back()
        };
        let mut lines = log.lines();
        let mut panic = None;
        while let Some(l) = lines.next() {
            if let Some((_, at)) = l.split_once(" panicked at ") {
                let message = lines.next().unwrap_or_default().trim();
                panic = Some(format!("{at} {message}"));
                break;
            }
        }
        Stats {
            runs: stat("stat::number_of_executed_units"),
            exec_per_sec: stat("stat::average_exec_per_sec"),
            new_units: stat("stat::new_units_added"),
            artifact: log
                .lines()
                .filter_map(|l| l.split_once("Test unit written to "))
                .map(|(_, p)| PathBuf::from(p.trim()))
                .next_back(),
            panic,
        }
    }
}

/// Files and bytes in `dir` (not recursive).
fn dir_size(dir: &Path) -> (usize, u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return (0, 0);
    };
    entries
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .fold((0, 0), |(n, b), m| (n + 1, b + m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targets_are_found() {
        let targets = all_targets().unwrap();
        for t in ["call_id_locator", "hash", "sip_response"] {
            assert!(targets.iter().any(|x| x == t), "{targets:?}");
        }
    }

    #[test]
    fn stats_of_a_clean_run() {
        let log = "#2097152\tpulse  cov: 512 ft: 2048 corp: 300/40Kb exec/s: 69905 rss: 400Mb\n\
                   Done 2097152 runs in 31 second(s)\n\
                   stat::number_of_executed_units: 2097152\n\
                   stat::average_exec_per_sec:     67650\n\
                   stat::new_units_added:          95\n";
        let s = Stats::parse(log);
        assert_eq!(s.runs.as_deref(), Some("2097152"));
        assert_eq!(s.exec_per_sec.as_deref(), Some("67650"));
        assert_eq!(s.new_units.as_deref(), Some("95"));
        assert_eq!((s.artifact, s.panic), (None, None));
    }

    #[test]
    fn stats_of_a_crash() {
        let log = "thread '<unnamed>' (23257) panicked at fuzz_targets/sip_response.rs:18:9:\n\
                   status 20\n\
                   stack backtrace:\n\
                   ==23257== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='/w/fuzz/artifacts/sip_response/'; Test unit written to /w/fuzz/artifacts/sip_response/crash-f11e\n\
                   stat::number_of_executed_units: 2514\n";
        let s = Stats::parse(log);
        assert_eq!(
            s.panic.as_deref(),
            Some("fuzz_targets/sip_response.rs:18:9: status 20")
        );
        assert_eq!(
            s.artifact.as_deref(),
            Some(Path::new("/w/fuzz/artifacts/sip_response/crash-f11e"))
        );
        assert_eq!(s.runs.as_deref(), Some("2514"));
    }
}
