//! Checks that the machine can run the testbed at all: root, and the external tools.
use std::path::PathBuf;

use anyhow::{Result, bail};

/// Tools the testbed runs (Debian packages in parentheses).
pub const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("sipp", "sip-tester"),
];

/// Fails unless running as root (network namespaces and XDP need it).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the sip-dispatch testbed needs root (network namespaces, veths, XDP): \
             run it as root, e.g. via `cargo xtask test`"
        );
    }
    Ok(())
}

/// Where `program` is found on `$PATH` (or in /usr/sbin, /sbin).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Tools the controller tests add: a real DNS server and a client to query it.
pub const DNS_TOOLS: &[(&str, &str)] = &[("named", "bind9"), ("dig", "bind9-dnsutils")];

/// The firewall the affinity test blocks a backend's health checks with.
pub const NFT_TOOLS: &[(&str, &str)] = &[("nft", "nftables")];

/// The connected-socket SIP client of the forwarding tests.
pub const SIPSAK_TOOLS: &[(&str, &str)] = &[("sipsak", "sipsak")];

/// [`require_nft`] and the [`SIPSAK_TOOLS`] (the forwarding tests use both).
pub fn require_forwarding() -> Result<()> {
    require_nft()?;
    require(SIPSAK_TOOLS)
}

/// Fails with one message naming every missing tool and its package.
pub fn require_tools() -> Result<()> {
    require(TOOLS)
}

/// [`require_all`] and the [`DNS_TOOLS`].
pub fn require_dns() -> Result<()> {
    require_all()?;
    require(DNS_TOOLS)
}

fn require(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .map(|(tool, pkg)| format!("{tool} (Debian package {pkg})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {}; `cargo xtask test` installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// [`require_all`] and the [`NFT_TOOLS`].
pub fn require_nft() -> Result<()> {
    require_all()?;
    require(NFT_TOOLS)
}

/// [`require_root`] and [`require_tools`].
pub fn require_all() -> Result<()> {
    require_root()?;
    require_tools()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_finds_sh() {
        assert!(which("sh").is_some());
        assert!(which("no-such-tool-sdt").is_none());
    }
}
