//! Installs what building and testing sip-dispatch needs and a fresh Debian machine lacks:
//! the tools of the test bed (Debian packages), the nightly toolchain with `rust-src` (the
//! eBPF crate is built with `-Z build-std=core`), and `bpf-linker` 0.13.0 linked against
//! the LLVM of that nightly, `cargo-fuzz` for the fuzz targets in `fuzz/`, and `cargo-deb`
//! for the Debian package. Everything
//! already present is reported in one line and left alone, so a second run is quick.
use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::shell::{self, note};

/// Debian packages: (package, binary that proves it is there, why it is needed).
const PACKAGES: &[(&str, &str, &str)] = &[
    (
        "sip-tester",
        "sipp",
        "SIPp places the test calls and plays the backends",
    ),
    (
        "bpftool",
        "bpftool",
        "inspects the loaded XDP program and its maps",
    ),
    (
        "iproute2",
        "ip",
        "builds the namespaces, veths and bridge of the test topology",
    ),
    (
        "ethtool",
        "ethtool",
        "turns TX checksum offload off on the test veths",
    ),
    (
        "bind9",
        "named",
        "a real DNS server serving the SRV records of the controller tests",
    ),
    (
        "bind9-dnsutils",
        "dig",
        "checks what the test DNS server answers after a zone reload",
    ),
    (
        "nftables",
        "nft",
        "blocks a backend's health checks (OPTIONS only) for the affinity test's health flap",
    ),
    (
        "man-db",
        "man",
        "renders the packaged man pages in the package test (man -l)",
    ),
    (
        "systemd",
        "systemd-analyze",
        "checks the packaged unit in the package test (systemd-analyze verify)",
    ),
    (
        "sipsak",
        "sipsak",
        "a connected-socket SIP client: answers must come from the VIP (forwarding tests)",
    ),
    (
        "prometheus",
        "promtool",
        "promtool checks and unit-tests the alert rules (sip-dispatch/dist/prometheus) and the dashboard's queries",
    ),
];

/// What `cargo xtask bench` adds to the test bed's packages (same columns).
pub const BENCH_PACKAGES: &[(&str, &str, &str)] = &[(
    "kamailio",
    "kamailio",
    "the stateless Kamailio dispatcher the benchmark compares against",
)];

pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Everything, in order.
pub fn ensure_all() -> Result<()> {
    ensure_packages()?;
    ensure_nightly()?;
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()?;
    ensure_cargo_deb()?;
    Ok(())
}

/// cargo-deb's version: a newer one may refuse the dev profile the package test uses.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// `cargo-deb` from crates.io: `cargo deb` builds the Debian package (`cargo xtask
/// package`, and the package test in `cargo xtask test`).
pub fn ensure_cargo_deb() -> Result<()> {
    let wanted = format!("cargo-deb {CARGO_DEB_VERSION}");
    if let Some(path) = shell::which("cargo-deb") {
        let version = shell::capture(Command::new(&path).arg("--version")).unwrap_or_default();
        if version.trim() == wanted {
            note(format!("{wanted}: already installed ({})", path.display()));
            return Ok(());
        }
        note(format!(
            "reinstalling cargo-deb: found {:?}, need {wanted}",
            version.trim()
        ));
    } else {
        note(format!(
            "installing {wanted} from crates.io: it builds the Debian package"
        ));
    }
    shell::run(shell::cargo().args([
        "install",
        "cargo-deb",
        "--locked",
        "--force",
        "--version",
        CARGO_DEB_VERSION,
    ]))?;
    if shell::which("cargo-deb").is_none() {
        bail!("cargo-deb was installed but is still not found");
    }
    Ok(())
}

/// `cargo-fuzz` from crates.io: `cargo +nightly fuzz` builds and runs the libFuzzer
/// targets in `fuzz/` (`cargo xtask fuzz`, and a short run in `cargo xtask test`).
pub fn ensure_cargo_fuzz() -> Result<()> {
    if let Some(path) = shell::which("cargo-fuzz") {
        note(format!(
            "cargo-fuzz: already installed ({})",
            path.display()
        ));
        return Ok(());
    }
    note("installing cargo-fuzz from crates.io: it builds and runs the fuzz targets in fuzz/");
    shell::run(shell::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    if shell::which("cargo-fuzz").is_none() {
        bail!("cargo-fuzz was installed but is still not found");
    }
    Ok(())
}

/// The Debian packages of the test bed.
pub fn ensure_packages() -> Result<()> {
    ensure_debian_packages(PACKAGES)
}

/// The Debian packages only the benchmark needs.
pub fn ensure_bench_packages() -> Result<()> {
    ensure_debian_packages(BENCH_PACKAGES)
}

/// Installs those of `packages` whose binary is missing, saying which and why.
fn ensure_debian_packages(packages: &[(&str, &str, &str)]) -> Result<()> {
    let mut missing = Vec::new();
    for &(pkg, binary, why) in packages {
        match shell::which(binary) {
            Some(path) => note(format!("{pkg}: already installed ({})", path.display())),
            None => missing.push((pkg, binary, why)),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if shell::which("apt-get").is_none() {
        bail!(
            "missing {} and there is no apt-get: install them by hand",
            missing.iter().map(|m| m.0).collect::<Vec<_>>().join(", ")
        );
    }
    for (pkg, binary, why) in &missing {
        note(format!("installing {pkg} (no `{binary}` found): {why}"));
    }
    shell::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get update")?;
    shell::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(missing.iter().map(|m| m.0))
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install")?;
    for (pkg, binary, _) in &missing {
        if shell::which(binary).is_none() {
            bail!("{pkg} was installed but `{binary}` is still not found");
        }
    }
    Ok(())
}

fn rustup() -> Result<Command> {
    match shell::which("rustup") {
        Some(p) => Ok(Command::new(p)),
        None => bail!("rustup is not installed: install it from https://rustup.rs first"),
    }
}

/// Whether `rustup toolchain list` shows a nightly toolchain.
fn has_nightly() -> Result<bool> {
    let list = shell::capture(rustup()?.args(["toolchain", "list"]))
        .context("`rustup toolchain list` failed")?;
    Ok(list.lines().any(|l| l.starts_with("nightly")))
}

/// The nightly toolchain with `rust-src`.
pub fn ensure_nightly() -> Result<()> {
    if !has_nightly()? {
        note(
            "installing the nightly toolchain with rust-src: the eBPF crate needs nightly and -Z build-std=core",
        );
        return shell::run(rustup()?.args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    let installed = shell::capture(rustup()?.args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        note("nightly toolchain with rust-src: already installed");
        Ok(())
    } else {
        note("adding rust-src to the nightly toolchain: -Z build-std=core builds core from it");
        shell::run(rustup()?.args(["component", "add", "rust-src", "--toolchain", "nightly"]))
    }
}

/// The nightly's sysroot and LLVM major version.
fn nightly_llvm() -> Result<(String, String)> {
    let sysroot = shell::capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("`rustc +nightly --print sysroot` failed")?
        .trim()
        .to_owned();
    let vv = shell::capture(Command::new("rustc").args(["+nightly", "-vV"]))
        .context("`rustc +nightly -vV` failed")?;
    let major = llvm_major(&vv).context("no `LLVM version:` in `rustc +nightly -vV`")?;
    Ok((sysroot, major))
}

/// `LLVM version: 22.1.4` → `22`.
pub fn llvm_major(rustc_vv: &str) -> Option<String> {
    let v = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))?;
    let major: String = v.chars().take_while(char::is_ascii_digit).collect();
    (!major.is_empty()).then_some(major)
}

/// The LLVM major version the installed bpf-linker is linked against (from `ldd`), if
/// it can be told.
fn linked_llvm_major(binary: &Path) -> Option<String> {
    let out = shell::capture(Command::new("ldd").arg(binary))?;
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("libLLVM.so."))
        .or_else(|| {
            out.split_whitespace()
                .find_map(|w| w.strip_prefix("libLLVM-"))
        })
        .map(|rest| rest.chars().take_while(char::is_ascii_digit).collect())
}

/// `bpf-linker` 0.13.0 against the nightly's LLVM.
pub fn ensure_bpf_linker() -> Result<()> {
    let (sysroot, major) = nightly_llvm()?;
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}");
    let existing = shell::which("bpf-linker");
    if let Some(path) = &existing {
        let version = shell::capture(Command::new(path).arg("--version"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let linked = linked_llvm_major(path);
        if version == wanted && linked.as_deref().is_none_or(|l| l == major) {
            note(format!(
                "{wanted}: already installed ({}, LLVM {})",
                path.display(),
                linked.as_deref().unwrap_or("?")
            ));
            return Ok(());
        }
        note(format!(
            "reinstalling bpf-linker: found {:?} linked against LLVM {}, need {wanted} for LLVM {major}",
            if version.is_empty() {
                "a broken binary"
            } else {
                &version
            },
            linked.as_deref().unwrap_or("?")
        ));
    } else {
        note(format!(
            "installing {wanted} against the nightly's LLVM {major}: it links the eBPF program"
        ));
    }

    // bpf-linker links the libLLVM the nightly ships; it looks for `libLLVM.so`.
    let lib = Path::new(&sysroot).join("lib");
    let versioned = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let link = lib.join("libLLVM.so");
    note(format!("linking {} -> {versioned}", link.display()));
    match std::fs::remove_file(&link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", link.display())),
    }
    std::os::unix::fs::symlink(&versioned, &link)
        .with_context(|| format!("creating {}", link.display()))?;

    shell::run(
        shell::cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            // Replace a same-version binary linked against another LLVM.
            .args(existing.is_some().then_some("--force"))
            .env("LLVM_PREFIX", &sysroot),
    )?;
    let path = shell::which("bpf-linker").context("bpf-linker is still not on PATH")?;
    let version = shell::capture(Command::new(&path).arg("--version")).unwrap_or_default();
    if version.trim() != wanted {
        bail!(
            "installed bpf-linker reports {:?}, not {wanted:?}",
            version.trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc() {
        let vv =
            "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv).as_deref(), Some("22"));
        assert_eq!(llvm_major("rustc 1.0"), None);
    }
}
