//! Project tasks: `cargo xtask test`, `cargo xtask run [-- ARGS]`, `cargo xtask bench`,
//! `cargo xtask fuzz`, `cargo xtask package`, `cargo xtask prereqs`.
mod bench;
mod demo;
mod fuzz;
mod package;
mod prereqs;
mod privilege;
mod shell;
mod test;

use std::os::unix::process::CommandExt as _;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use sip_dispatch_testbed::{Family, XdpMode};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "sip-dispatch project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Install prerequisites, build sip-dispatch, run the unit tests of the host crates
    /// and the namespace/XDP integration tests (as root).
    Test {
        /// Do not check or install prerequisites.
        #[arg(long)]
        skip_install: bool,
    },
    /// Install prerequisites, build sip-dispatch (release) and run it as root:
    /// `cargo xtask run -- --iface IF --vip ... --backend ...` runs `sip-dispatch run ARGS`;
    /// without ARGS, a self-contained demo in network namespaces.
    Run {
        /// Demo: address family (v4 or v6).
        #[arg(long, default_value = "v4")]
        family: Family,
        /// Demo: XDP mode (native, skb or auto).
        #[arg(long, default_value = "native")]
        mode: XdpMode,
        /// Demo: backend weights, comma-separated.
        #[arg(long, default_value = "2,1,1", value_delimiter = ',')]
        weights: Vec<u32>,
        /// Demo: calls per second.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// Demo: seconds of calls.
        #[arg(long, default_value_t = 20)]
        seconds: u32,
        /// Do not check or install prerequisites.
        #[arg(long)]
        skip_install: bool,
        /// Arguments for `sip-dispatch run` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Install prerequisites (plus Kamailio), build in release mode and
    /// benchmark sip-dispatch against a MAC-swap XDP baseline and Kamailio (as root):
    /// per-packet cost, forwarding throughput, SIPp response times, table rebuilds.
    /// Writes a Markdown report, JSON and an SVG plot to target/bench/. Not a test.
    Bench {
        /// A shorter run (under 2 minutes) with fewer repetitions.
        #[arg(long)]
        quick: bool,
        /// Do not check or install prerequisites.
        #[arg(long)]
        skip_install: bool,
        /// Further arguments for the benchmark program (after `--`; `-- --help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the libFuzzer targets in fuzz/ (`cargo +nightly fuzz build`) and run each
    /// for a while, growing fuzz/corpus/TARGET; fails on a crash. No root needed.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS,
              value_parser = clap::value_parser!(u64).range(1..))]
        seconds: u64,
        /// Do not check or install cargo-fuzz.
        #[arg(long)]
        skip_install: bool,
        /// Targets to run (default: all of fuzz/fuzz_targets).
        targets: Vec<String>,
    },
    /// Build the Debian package target/debian/sip-dispatch_<version>_<arch>.deb (release
    /// build, man pages, shell completions, the systemd unit, docs) with cargo-deb,
    /// installing cargo-deb first if it is missing. No root needed.
    Package {
        /// Do not check or install the toolchain and cargo-deb.
        #[arg(long)]
        skip_install: bool,
        /// Then install it with dpkg, check the files, the unit (systemd-analyze verify)
        /// and the man pages, and remove it again, as `cargo xtask test` does (as root).
        #[arg(long)]
        check: bool,
    },
    /// Only check and install the prerequisites.
    Prereqs,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli.command) {
        eprintln!("xtask: error: {e:#}");
        // 128 + SIGINT after a Ctrl-C, as shells report it.
        std::process::exit(if sip_dispatch_testbed::cancel::requested() {
            130
        } else {
            1
        });
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Test { skip_install } => {
            privilege::ensure_root("test")?;
            test::run(skip_install)
        }
        Task::Bench {
            quick,
            skip_install,
            args,
        } => {
            privilege::ensure_root("bench")?;
            bench::run(bench::BenchOptions {
                quick,
                skip_install,
                args,
            })
        }
        Task::Fuzz {
            seconds,
            skip_install,
            targets,
        } => {
            if !skip_install {
                prereqs::ensure_cargo_fuzz()?;
            }
            shell::header(&format!("fuzz ({seconds} s per target)"));
            fuzz::run(seconds, &targets, fuzz::Corpus::Grow)
        }
        Task::Package {
            skip_install,
            check,
        } => {
            if check {
                privilege::ensure_root("package --check")?;
            }
            if !skip_install {
                shell::header("prerequisites: the toolchain and cargo-deb");
                prereqs::ensure_nightly()?;
                prereqs::ensure_bpf_linker()?;
                prereqs::ensure_cargo_deb()?;
            }
            shell::header("package: cargo build --release, generate-docs, cargo deb");
            let deb = package::build(package::Profile::Release)?;
            if check {
                shell::header("package check: dpkg -i, systemd-analyze verify, man -l, dpkg -r");
                package::check(&deb)?;
            }
            Ok(())
        }
        Task::Prereqs => {
            privilege::ensure_root("prereqs")?;
            shell::header("prerequisites");
            prereqs::ensure_all()
        }
        Task::Run {
            family,
            mode,
            weights,
            rate,
            seconds,
            skip_install,
            args,
        } => {
            privilege::ensure_root("run")?;
            if !skip_install {
                shell::header("prerequisites");
                prereqs::ensure_all()?;
            }
            shell::header("build: cargo build --release -p sip-dispatch");
            shell::run(
                shell::cargo()
                    .current_dir(shell::workspace_dir())
                    .args(["build", "--release", "-p", "sip-dispatch"])
                    .env_remove("AYA_BUILD_SKIP"),
            )?;
            let binary = shell::target_dir().join("release").join("sip-dispatch");
            if !binary.is_file() {
                bail!("the build left no binary at {}", binary.display());
            }
            if args.is_empty() {
                shell::header("demo");
                demo::run(
                    binary,
                    &demo::DemoOptions {
                        family,
                        mode,
                        weights,
                        rate,
                        seconds,
                    },
                )
            } else {
                shell::header(&format!("sip-dispatch run {}", args.join(" ")));
                let err = std::process::Command::new(&binary)
                    .arg("run")
                    .args(&args)
                    .exec();
                Err(err).with_context(|| format!("executing {}", binary.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn fuzz_takes_seconds_and_targets() {
        let cli = Cli::try_parse_from(["xtask", "fuzz", "--seconds", "5", "hash"]).unwrap();
        match cli.command {
            Task::Fuzz {
                seconds, targets, ..
            } => assert_eq!((seconds, targets), (5, vec!["hash".to_owned()])),
            other => panic!("{other:?}"),
        }
        match Cli::try_parse_from(["xtask", "fuzz"]).unwrap().command {
            Task::Fuzz {
                seconds, targets, ..
            } => assert_eq!((seconds, targets.len()), (fuzz::DEFAULT_SECONDS, 0)),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["xtask", "fuzz", "--seconds", "0"]).is_err());
    }

    #[test]
    fn package_takes_check_and_skip_install() {
        match Cli::try_parse_from(["xtask", "package"]).unwrap().command {
            Task::Package {
                skip_install,
                check,
            } => assert!(!skip_install && !check),
            other => panic!("{other:?}"),
        }
        match Cli::try_parse_from(["xtask", "package", "--check", "--skip-install"])
            .unwrap()
            .command
        {
            Task::Package {
                skip_install,
                check,
            } => assert!(skip_install && check),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn run_takes_trailing_args() {
        let cli = Cli::try_parse_from([
            "xtask",
            "run",
            "--",
            "--iface",
            "v-disp",
            "--vip",
            "198.18.0.100:5060",
        ])
        .unwrap();
        match cli.command {
            Task::Run { args, weights, .. } => {
                assert_eq!(args, ["--iface", "v-disp", "--vip", "198.18.0.100:5060"]);
                assert_eq!(weights, [2, 1, 1]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn demo_options_parse() {
        let cli = Cli::try_parse_from([
            "xtask",
            "run",
            "--family",
            "v6",
            "--mode",
            "skb",
            "--weights",
            "1,1",
        ])
        .unwrap();
        match cli.command {
            Task::Run {
                family,
                mode,
                weights,
                args,
                ..
            } => {
                assert_eq!(family, Family::V6);
                assert_eq!(mode, XdpMode::Skb);
                assert_eq!(weights, [1, 1]);
                assert!(args.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }
}
