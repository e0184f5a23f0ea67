//! Per-interface forwarding: `bpf_fib_lookup` answers only for interfaces that forward.
use std::path::PathBuf;

use anyhow::Context as _;

/// Turns forwarding on for one interface and family. Nothing is undone on drop (a
/// daemon that crashes leaves its program forwarding, and that needs the sysctl): only
/// an explicit `restore`, on a clean stop that detaches, puts the old value back.
pub struct Forwarding {
    path: PathBuf,
    old: String,
}

impl Forwarding {
    pub fn enable(iface: &str, ipv6: bool) -> anyhow::Result<Forwarding> {
        let family = if ipv6 { "ipv6" } else { "ipv4" };
        let path = PathBuf::from(format!("/proc/sys/net/{family}/conf/{iface}/forwarding"));
        let old = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string();
        if old != "1" {
            std::fs::write(&path, "1")
                .with_context(|| format!("writing 1 to {}", path.display()))?;
            log::info!(
                "enabled {family} forwarding on {iface} (needed by bpf_fib_lookup); restored when the daemon stops and detaches"
            );
        }
        Ok(Forwarding { path, old })
    }

    /// Puts the value found at `enable` back (once nothing of ours is attached).
    pub fn restore(self) {
        if self.old != "1"
            && let Err(e) = std::fs::write(&self.path, &self.old)
        {
            log::warn!("could not restore {}: {e}", self.path.display());
        }
    }
}
