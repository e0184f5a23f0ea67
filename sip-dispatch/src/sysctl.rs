//! Per-interface forwarding: `bpf_fib_lookup` answers only for interfaces that forward.
use std::path::PathBuf;

use anyhow::Context as _;

/// Turns forwarding on for one interface and family, and restores the old value on drop.
pub struct Forwarding {
    path: PathBuf,
    old: String,
    keep: bool,
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
                "enabled {family} forwarding on {iface} (needed by bpf_fib_lookup); restored at exit"
            );
        }
        Ok(Forwarding {
            path,
            old,
            keep: false,
        })
    }

    /// Leaves forwarding on at drop: a program left attached still needs it.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        if !self.keep
            && self.old != "1"
            && let Err(e) = std::fs::write(&self.path, &self.old)
        {
            log::warn!("could not restore {}: {e}", self.path.display());
        }
    }
}
