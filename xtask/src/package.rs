//! `cargo xtask package`: the Debian package, built with cargo-deb from the metadata in
//! sip-dispatch/Cargo.toml; and the check `cargo xtask test` runs on it (real dpkg, real
//! systemd-analyze, real man).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::shell::{self, note};

/// Where the daemon writes its man pages and completions, under the release directory
/// (cargo-deb's `target/release/` asset prefix stands for it).
const DOCS_DIR: &str = "sip-dispatch-docs";

/// Which build goes into the package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `cargo xtask package`: the release build, target/debian/.
    Release,
    /// The package test in `cargo xtask test`: the debug build the test step has just
    /// made (a release build would add minutes), target/debian/dev/. Same metadata and
    /// assets; cargo-deb warns that dev profiles are not meant for releases.
    Dev,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "debug",
        }
    }
}

/// Builds sip-dispatch_<version>_<arch>.deb and returns its path.
pub fn build(profile: Profile) -> Result<PathBuf> {
    let mut build = shell::cargo();
    build
        .current_dir(shell::workspace_dir())
        .args(["build", "-p", "sip-dispatch"])
        .env_remove("AYA_BUILD_SKIP");
    if profile == Profile::Release {
        build.arg("--release");
    }
    shell::run(&mut build)?;
    let out = shell::target_dir().join(profile.dir());
    let docs = out.join(DOCS_DIR);
    match std::fs::remove_dir_all(&docs) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", docs.display())),
    }
    // The man pages and completions come from the daemon's own clap definitions.
    shell::run(
        Command::new(out.join("sip-dispatch"))
            .args(["generate-docs", "--out"])
            .arg(&docs),
    )?;
    // Debian policy: man pages gzipped (-n: no name or time inside, reproducible).
    let man = docs.join("man");
    let pages = files_with_suffix(&man, ".1")?;
    if pages.is_empty() {
        bail!("generate-docs wrote no man page into {}", man.display());
    }
    shell::run(Command::new("gzip").args(["-9nf"]).args(&pages))?;

    let deb = deb_path(profile)?;
    let mut cargo_deb = shell::cargo();
    cargo_deb
        .current_dir(shell::workspace_dir())
        .args(["deb", "-p", "sip-dispatch", "--no-build", "--output"])
        .arg(&deb);
    if profile == Profile::Dev {
        // Lighter compression: this package is installed once and thrown away.
        cargo_deb.args(["--profile", "dev", "--fast"]);
    }
    shell::run(&mut cargo_deb)?;
    if !deb.is_file() {
        bail!("cargo deb left no package at {}", deb.display());
    }
    note(format!("package: {}", deb.display()));
    Ok(deb)
}

/// target/debian/[dev/]sip-dispatch_<version>_<arch>.deb (the metadata sets no
/// revision).
fn deb_path(profile: Profile) -> Result<PathBuf> {
    let arch = shell::capture(Command::new("dpkg").arg("--print-architecture"))
        .context("`dpkg --print-architecture` failed")?;
    let mut dir = shell::target_dir().join("debian");
    if profile == Profile::Dev {
        dir.push("dev");
    }
    Ok(dir.join(format!(
        "sip-dispatch_{}_{}.deb",
        env!("CARGO_PKG_VERSION"),
        arch.trim()
    )))
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    Ok(files)
}

/// What the package installs, and the test expects present after `dpkg -i` and absent
/// after `dpkg -r`.
const INSTALLED: &[&str] = &[
    "/usr/bin/sip-dispatch",
    "/lib/systemd/system/sip-dispatch@.service",
    "/usr/share/man/man1/sip-dispatch.1.gz",
    "/usr/share/man/man1/sip-dispatch-run.1.gz",
    "/usr/share/man/man1/sip-dispatch-detach.1.gz",
    "/usr/share/man/man1/sip-dispatch-backends-drain.1.gz",
    "/usr/share/bash-completion/completions/sip-dispatch",
    "/usr/share/zsh/vendor-completions/_sip-dispatch",
    "/usr/share/fish/vendor_completions.d/sip-dispatch.fish",
    "/usr/share/doc/sip-dispatch/examples/eth1.toml",
    "/usr/share/doc/sip-dispatch/sip-dispatch.rules.yml",
    "/usr/share/doc/sip-dispatch/sip-dispatch.json",
];

const UNIT: &str = "/lib/systemd/system/sip-dispatch@.service";

/// Removes the package when dropped, so a failed check leaves the machine as it was.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if let Err(e) = shell::run(Command::new("dpkg").args(["-r", "sip-dispatch"])) {
            eprintln!("xtask: removing the package again: {e:#}");
        }
    }
}

/// Installs `deb` with dpkg, checks what it installed (the files, the unit with
/// systemd-analyze, the man pages with man), removes it and checks that the files are
/// gone. Refuses to run over an installed sip-dispatch (it would remove it).
/// The maintainer scripts' systemd branches run only under systemd (not on a test
/// machine whose PID 1 is something else): at least `sh -n` reads each of them whole.
fn check_maintainer_scripts(deb: &Path) -> Result<()> {
    let control = std::env::temp_dir().join(format!("sd-deb-control-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&control);
    shell::run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control))?;
    let bad: Vec<&str> = ["postinst", "prerm", "postrm"]
        .into_iter()
        .filter(|script| {
            !Command::new("sh")
                .arg("-n")
                .arg(control.join(script))
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    let _ = std::fs::remove_dir_all(&control);
    if !bad.is_empty() {
        bail!(
            "maintainer scripts missing or not valid sh: {}",
            bad.join(", ")
        );
    }
    note("maintainer scripts: postinst, prerm and postrm are there and valid sh (sh -n)");
    Ok(())
}

pub fn check(deb: &Path) -> Result<()> {
    if shell::capture(Command::new("dpkg-query").args(["-W", "-f", "${Status}", "sip-dispatch"]))
        .is_some_and(|s| s.contains("installed") && !s.contains("not-installed"))
    {
        bail!(
            "a sip-dispatch package is installed on this machine; the package test installs and removes its own: `dpkg -r sip-dispatch` first"
        );
    }
    if let Some(found) = INSTALLED.iter().find(|p| Path::new(p).exists()) {
        bail!("{found} exists before the package is installed: remove it first");
    }

    check_maintainer_scripts(deb)?;
    shell::run(Command::new("dpkg").arg("-i").arg(deb))?;
    let installed = Installed;
    let missing: Vec<&str> = INSTALLED
        .iter()
        .copied()
        .filter(|p| !Path::new(p).is_file())
        .collect();
    if !missing.is_empty() {
        bail!("the package did not install {}", missing.join(", "));
    }
    note(format!("installed: {} files checked", INSTALLED.len()));

    // Verify passes most findings (unknown keys, a bad ExecStart path, missing man pages
    // of Documentation=) as messages with status 0: any output fails the check.
    let verify = quiet_output(Command::new("systemd-analyze").args(["verify", UNIT]))?;
    if !verify.0 || !verify.1.trim().is_empty() {
        bail!(
            "systemd-analyze verify {UNIT}: {}",
            if verify.1.trim().is_empty() {
                "failed"
            } else {
                verify.1.trim()
            }
        );
    }
    note("systemd-analyze verify: the unit is accepted (no findings)");

    for (page, expect) in [
        ("sip-dispatch.1.gz", "sip-dispatch-run(1)"),
        ("sip-dispatch-run.1.gz", "--keep-attached"),
    ] {
        let path = format!("/usr/share/man/man1/{page}");
        let (ok, text) = quiet_output(
            Command::new("man")
                .args(["-l", &path])
                .env("LC_ALL", "C")
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "100"),
        )?;
        if !ok || !text.contains(expect) {
            bail!("man -l {path} does not render a page that mentions {expect:?}:\n{text}");
        }
        note(format!(
            "man -l {path}: {} lines, mentions {expect}",
            text.lines().count()
        ));
    }

    drop(installed);
    let left: Vec<&str> = INSTALLED
        .iter()
        .copied()
        .filter(|p| Path::new(p).exists())
        .collect();
    if !left.is_empty() {
        bail!("dpkg -r left {}", left.join(", "));
    }
    note("removed: none of the files is left");
    Ok(())
}

/// Runs `cmd` and returns whether it succeeded and its stdout and stderr together.
fn quiet_output(cmd: &mut Command) -> Result<(bool, String)> {
    let line = shell::display(cmd);
    println!("    $ {line}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}
