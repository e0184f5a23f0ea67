//! `cargo xtask bench`: installs what the benchmark needs, builds the daemon and the
//! benchmark program (`sd-bench`, the `bench` feature of the testbed package: it links the
//! sip-dispatch library and so the XDP object), then replaces this process with it.
//! Everything measured, and how, is described in `tests/src/bin/sd-bench/main.rs`.
use std::os::unix::process::CommandExt as _;

use anyhow::{Context as _, Result, bail};

use crate::{prereqs, shell};

pub struct BenchOptions {
    pub quick: bool,
    pub skip_install: bool,
    /// Arguments passed on to `sd-bench` (after `--`).
    pub args: Vec<String>,
}

pub fn run(opts: BenchOptions) -> Result<()> {
    if !opts.skip_install {
        shell::header("prerequisites");
        prereqs::ensure_all()?;
        prereqs::ensure_bench_packages()?;
    }
    let builds: [&[&str]; 2] = [
        &["build", "--release", "-p", "sip-dispatch"],
        &[
            "build",
            "--release",
            "-p",
            "sip-dispatch-testbed",
            "--features",
            "bench",
            "--bin",
            "sd-bench",
        ],
    ];
    for args in builds {
        shell::header(&format!("build: cargo {}", args.join(" ")));
        shell::run(
            shell::cargo()
                .current_dir(shell::workspace_dir())
                .args(args)
                .env_remove("AYA_BUILD_SKIP"),
        )?;
    }
    let release = shell::target_dir().join("release");
    let daemon = release.join("sip-dispatch");
    let bench = release.join("sd-bench");
    for p in [&daemon, &bench] {
        if !p.is_file() {
            bail!("the build left no binary at {}", p.display());
        }
    }
    shell::header("bench");
    let mut cmd = std::process::Command::new(&bench);
    cmd.arg("--daemon")
        .arg(&daemon)
        .arg("--out")
        .arg(shell::target_dir().join("bench"))
        .arg("--workspace")
        .arg(shell::workspace_dir());
    if opts.quick {
        cmd.arg("--quick");
    }
    cmd.args(&opts.args);
    println!("    $ {}", shell::display(&cmd));
    let err = cmd.exec();
    Err(err).with_context(|| format!("executing {}", bench.display()))
}
