//! Running as root: the tests and the demo create network namespaces and attach XDP.
use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::shell;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Environment a re-executed xtask needs to find the same toolchains and settings.
const KEEP_ENV: &[&str] = &[
    "PATH",
    "CARGO",
    "CARGO_HOME",
    "RUSTUP_HOME",
    "RUSTUP_TOOLCHAIN",
    "CARGO_TARGET_DIR",
    "CI",
    "SIP_DISPATCH_BIN",
    "RUST_LOG",
    "RUST_BACKTRACE",
];

/// Returns if already root; otherwise replaces this process with itself under `sudo`,
/// or fails with one line when sudo is not available.
pub fn ensure_root(what: &str) -> Result<()> {
    if is_root() {
        return Ok(());
    }
    let Some(sudo) = shell::which("sudo") else {
        bail!(
            "`cargo xtask {what}` must run as root (network namespaces, XDP) and sudo is not installed"
        );
    };
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let mut cmd = Command::new(sudo);
    cmd.arg("env");
    for key in KEEP_ENV {
        if let Some(v) = std::env::var_os(key) {
            let mut kv = std::ffi::OsString::from(format!("{key}="));
            kv.push(v);
            cmd.arg(kv);
        }
    }
    // Keep the user's toolchains even though HOME changes under sudo.
    if let Some(home) = std::env::var_os("HOME") {
        let home = std::path::PathBuf::from(home);
        for (key, dir) in [("CARGO_HOME", ".cargo"), ("RUSTUP_HOME", ".rustup")] {
            if std::env::var_os(key).is_none() {
                let mut kv = std::ffi::OsString::from(format!("{key}="));
                kv.push(home.join(dir));
                cmd.arg(kv);
            }
        }
    }
    cmd.arg(exe).args(std::env::args_os().skip(1));
    eprintln!("xtask: `{what}` needs root, re-running under sudo");
    let err = cmd.exec();
    Err(err).context("re-running under sudo")
}
