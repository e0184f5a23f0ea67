//! `cargo xtask test`: prerequisites, build, unit tests of the host crates, a short run of
//! the fuzz targets, then the namespace/XDP integration tests against the freshly built
//! binary.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    fuzz, package, prereqs,
    shell::{self, header},
};

/// Under the target directory: the binary the upgrade test starts from (the testbed
/// looks there too).
const UPGRADE_FROM_DIR: &str = "upgrade-from";

/// Seconds per fuzz target: a smoke run, with the committed corpus as the seeds.
const FUZZ_SECONDS: u64 = 10;

struct Outcome {
    name: String,
    ok: bool,
    took: Duration,
}

/// Runs one step, timing it and recording the outcome.
fn step(outcomes: &mut Vec<Outcome>, name: &str, f: impl FnOnce() -> Result<()>) -> bool {
    header(name);
    let started = Instant::now();
    let result = f();
    if let Err(e) = &result {
        eprintln!("xtask: {name}: {e:#}");
    }
    outcomes.push(Outcome {
        name: name.to_owned(),
        ok: result.is_ok(),
        took: started.elapsed(),
    });
    result.is_ok()
}

/// A cargo command for the workspace, with the real eBPF build (no `AYA_BUILD_SKIP`).
fn cargo(args: &[&str]) -> Command {
    let mut c = shell::cargo();
    c.current_dir(shell::workspace_dir())
        .args(args)
        .env_remove("AYA_BUILD_SKIP");
    c
}

fn build_upgrade_from() -> Result<()> {
    shell::run(&mut cargo(&[
        "build",
        "-p",
        "sip-dispatch",
        "--config",
        "profile.dev.package.sip-dispatch.opt-level=1",
    ]))?;
    let dir = shell::target_dir().join(UPGRADE_FROM_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let from = shell::target_dir().join("debug").join("sip-dispatch");
    std::fs::copy(&from, dir.join("sip-dispatch"))
        .with_context(|| format!("copying {} to {}", from.display(), dir.display()))?;
    Ok(())
}

/// The Prometheus alert rules are valid, and fire (and stay quiet) as their unit tests
/// say. The dashboard and the rules are checked against a live daemon's metrics by the
/// integration test `monitoring`.
fn check_alert_rules() -> Result<()> {
    let dir = shell::workspace_dir().join("sip-dispatch/dist/prometheus");
    shell::run(
        Command::new("promtool")
            .args(["check", "rules", "sip-dispatch.rules.yml"])
            .current_dir(&dir),
    )?;
    shell::run(
        Command::new("promtool")
            .args(["test", "rules", "sip-dispatch.rules.test.yml"])
            .current_dir(&dir),
    )
}

pub fn run(skip_install: bool) -> Result<()> {
    let mut outcomes = Vec::new();
    let total = Instant::now();

    let prepared = if skip_install {
        true
    } else {
        step(&mut outcomes, "prerequisites", prereqs::ensure_all)
    };
    if prepared {
        step(
            &mut outcomes,
            "alert rules: promtool check rules, promtool test rules",
            check_alert_rules,
        );
    }
    // The upgrade test needs a second, different executable to upgrade from: the same
    // source with the daemon crate at another optimisation level (only that crate is
    // rebuilt). It is built first and copied away; the build under test comes next.
    let built = prepared
        && step(
            &mut outcomes,
            "build: the binary the upgrade test starts from",
            build_upgrade_from,
        )
        && step(&mut outcomes, "build: cargo build -p sip-dispatch", || {
            shell::run(&mut cargo(&["build", "-p", "sip-dispatch"]))
        });
    if built {
        let unit: [(&str, &[&str]); 3] = [
            (
                "unit tests: sip-dispatch-common",
                &["test", "-p", "sip-dispatch-common", "--features", "user"],
            ),
            ("unit tests: sip-dispatch", &["test", "-p", "sip-dispatch"]),
            ("unit tests: xtask", &["test", "-p", "xtask"]),
        ];
        for (name, args) in unit {
            step(&mut outcomes, name, || shell::run(&mut cargo(args)));
        }
        step(
            &mut outcomes,
            "kernel tests: the bpf_loop dispatcher (kernels without may_goto)",
            || {
                shell::run(
                    cargo(&["test", "-p", "sip-dispatch", "--test", "kernel"])
                        // sip_dispatch::dataplane::ENV_FORCE_BPF_LOOP (xtask does not
                        // link the daemon's library).
                        .env("SIP_DISPATCH_FORCE_BPF_LOOP", "1"),
                )
            },
        );
        step(
            &mut outcomes,
            "package: cargo deb, dpkg -i/-r, systemd-analyze verify, man -l",
            || package::check(&package::build(package::Profile::Dev)?),
        );
        step(
            &mut outcomes,
            &format!("fuzz ({FUZZ_SECONDS} s per target)"),
            || fuzz::run(FUZZ_SECONDS, &[], fuzz::Corpus::Scratch),
        );
        let bin = shell::target_dir().join("debug").join("sip-dispatch");
        step(
            &mut outcomes,
            "integration tests: sip-dispatch-testbed (namespaces, SIPp, XDP)",
            || {
                shell::run(
                    cargo(&[
                        "test",
                        "-p",
                        "sip-dispatch-testbed",
                        "--",
                        "--test-threads=1",
                    ])
                    .env("SIP_DISPATCH_BIN", &bin),
                )
            },
        );
    }

    header("summary");
    for o in &outcomes {
        println!(
            "    {} {:<66} {:>6.1} s",
            if o.ok { "ok  " } else { "FAIL" },
            o.name,
            o.took.as_secs_f64()
        );
    }
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    println!(
        "    {} step(s), {failed} failed, {:.1} s",
        outcomes.len(),
        total.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} step(s) failed");
    }
    Ok(())
}
