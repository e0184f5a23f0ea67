//! The operator's changes (`drain`, `disable`, `set-weight`, `backends add` and
//! `remove`) kept in a state file, so that they survive a restart, an upgrade and a
//! crash. Pinned maps would not: a clean stop, `--reset`, `detach` and a reboot remove
//! them.
use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::hashkey::{Placing, write_private};

/// The format this daemon reads and writes.
pub const VERSION: u32 = 1;
/// Larger files are refused at start: a real one holds at most a few thousand entries.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// Where the state of the daemon on `iface` lives unless `--state-file` says otherwise.
pub fn default_path(iface: &str) -> PathBuf {
    PathBuf::from(format!("/var/lib/sip-dispatch/{iface}.state.json"))
}

/// An operator's admin state other than enabled (enabled is the default, not stored).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AdminSetting {
    Drained,
    Disabled,
}

/// A backend added with `backends add`. Weight and priority are checked when applied
/// (like the command's), so an out-of-range value skips this entry only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Added {
    pub service: SocketAddr,
    pub address: SocketAddr,
    pub weight: u32,
    pub priority: u32,
}

/// A configured backend removed with `backends remove`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Removed {
    pub service: SocketAddr,
    pub address: SocketAddr,
}

/// The contents of a state file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OperatorState {
    pub version: u32,
    #[serde(default)]
    pub admin: BTreeMap<SocketAddr, AdminSetting>,
    #[serde(default)]
    pub weights: BTreeMap<SocketAddr, u32>,
    #[serde(default)]
    pub added: Vec<Added>,
    #[serde(default)]
    pub removed: Vec<Removed>,
}

impl Default for OperatorState {
    fn default() -> OperatorState {
        OperatorState {
            version: VERSION,
            admin: BTreeMap::new(),
            weights: BTreeMap::new(),
            added: Vec::new(),
            removed: Vec::new(),
        }
    }
}

/// Only the version, read first: a file of another version is refused as such, not as
/// malformed.
#[derive(Deserialize)]
struct Versioned {
    version: u32,
}

/// Reads the state file: a missing file is the empty state; anything else that is not
/// a state of [`VERSION`] is an error naming the file.
pub fn read(path: &Path) -> anyhow::Result<OperatorState> {
    let text = match std::fs::metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(OperatorState::default()),
        Err(e) => return Err(e).with_context(|| format!("state file {}", path.display())),
        Ok(meta) if !meta.is_file() => {
            anyhow::bail!("state file {}: not a regular file", path.display())
        }
        Ok(meta) if meta.len() > MAX_FILE_BYTES => anyhow::bail!(
            "state file {}: {} bytes, at most {MAX_FILE_BYTES}",
            path.display(),
            meta.len()
        ),
        Ok(_) => std::fs::read_to_string(path)
            .with_context(|| format!("state file {}", path.display()))?,
    };
    parse(&text).with_context(|| format!("state file {}", path.display()))
}

fn parse(text: &str) -> anyhow::Result<OperatorState> {
    let Versioned { version } =
        serde_json::from_str(text).context("malformed (expected JSON with a \"version\")")?;
    if version != VERSION {
        anyhow::bail!("unknown version {version} (this daemon reads version {VERSION})");
    }
    serde_json::from_str(text).context("malformed")
}

/// Writes `state` to `path` atomically (mode 0600; the directory is created with mode
/// 0700 when missing).
pub fn write(path: &Path, state: &OperatorState) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(state).context("encoding the state")?;
    text.push('\n');
    write_private(path, text.as_bytes(), Placing::Replace)
        .with_context(|| format!("writing state file {}", path.display()))
}

/// The lock on a state file (on `PATH.lock`): held for the daemon's life, so that two
/// daemons never overwrite each other's state. The kernel releases it when the daemon
/// ends, however it ends.
pub struct StateLock {
    _file: std::fs::File,
}

/// Takes the lock of the state file `path` without waiting (creating its directory,
/// mode 0700, when missing).
pub fn lock(path: &Path) -> anyhow::Result<StateLock> {
    use std::os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    };
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {} (mode 0700)", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    // SAFETY: flock on the valid descriptor `file` owns; the result is checked.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            anyhow::bail!(
                "state file {} is in use by another sip-dispatch ({} is locked): give each daemon its own --state-file",
                path.display(),
                lock_path.display()
            );
        }
        return Err(err).with_context(|| format!("locking {}", lock_path.display()));
    }
    Ok(StateLock { _file: file })
}

/// Settings of the file for addresses no service lists yet (an SRV name not resolved
/// yet): they apply when the address appears.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub admin: BTreeMap<SocketAddr, AdminSetting>,
    pub weights: BTreeMap<SocketAddr, u32>,
}

impl Pending {
    /// What the file says of `addr`, taken out (it applies once).
    pub fn take(&mut self, addr: SocketAddr) -> (Option<AdminSetting>, Option<u32>) {
        (self.admin.remove(&addr), self.weights.remove(&addr))
    }

    /// A reload drops `set-weight` overrides: those not applied yet too.
    pub fn reloaded(&mut self) {
        self.weights.clear();
    }
}

/// Which part of the settings gave a backend's weight: `cli` (`set-weight`, or the
/// weight of `backends add`), `dns` (an SRV record) or `config`.
pub fn weight_from(set_by_cli: bool, from_srv: bool) -> &'static str {
    match (set_by_cli, from_srv) {
        (true, _) => "cli",
        (false, true) => "dns",
        (false, false) => "config",
    }
}

/// Who put a backend in the service: `cli` (`backends add`) or `config` (the
/// configuration, or DNS for an SRV backend).
pub fn added_by(by_cli: bool) -> &'static str {
    if by_cli { "cli" } else { "config" }
}

/// Who set a backend's state: `cli` (drained or disabled by the operator) or `health`.
pub fn state_from(set_by_operator: bool) -> &'static str {
    if set_by_operator { "cli" } else { "health" }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sd-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn sample() -> OperatorState {
        OperatorState {
            admin: [
                (a("198.18.0.21:5060"), AdminSetting::Drained),
                (a("[2001:db8::22]:5060"), AdminSetting::Disabled),
            ]
            .into(),
            weights: [(a("198.18.0.22:5060"), 3)].into(),
            added: vec![Added {
                service: a("198.18.0.100:5060"),
                address: a("198.18.0.24:5060"),
                weight: 2,
                priority: 10,
            }],
            removed: vec![Removed {
                service: a("198.18.0.100:5060"),
                address: a("198.18.0.23:5060"),
            }],
            ..OperatorState::default()
        }
    }

    #[test]
    fn a_written_state_reads_back_the_same_in_the_documented_format() {
        let d = dir("roundtrip");
        let path = d.join("sub").join("eth1.state.json");
        write(&path, &sample()).unwrap();
        assert_eq!(read(&path).unwrap(), sample());
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["admin"]["198.18.0.21:5060"], "drained");
        assert_eq!(v["admin"]["[2001:db8::22]:5060"], "disabled");
        assert_eq!(v["weights"]["198.18.0.22:5060"], 3);
        assert_eq!(v["added"][0]["service"], "198.18.0.100:5060");
        assert_eq!(v["added"][0]["priority"], 10);
        assert_eq!(v["removed"][0]["address"], "198.18.0.23:5060");
        // Rewritten in place: the newer state wins, no temporary file stays.
        write(&path, &OperatorState::default()).unwrap();
        assert_eq!(read(&path).unwrap(), OperatorState::default());
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["eth1.state.json"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_file_is_mode_0600_in_a_new_directory_of_mode_0700() {
        let d = dir("mode");
        let path = d.join("eth1.state.json");
        write(&path, &sample()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&d), 0o700);
        // A file another tool left readable becomes private when rewritten.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, &sample()).unwrap();
        assert_eq!(mode(&path), 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn one_daemon_per_state_file() {
        let d = dir("lock");
        let path = d.join("eth1.state.json");
        let held = lock(&path).unwrap();
        let e = format!("{:#}", lock(&path).err().expect("a second lock is refused"));
        assert!(e.contains("in use by another sip-dispatch"), "{e}");
        drop(held);
        lock(&path).expect("free again once the first one is gone");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_missing_file_is_the_empty_state() {
        let d = dir("missing");
        assert_eq!(
            read(&d.join("none.json")).unwrap(),
            OperatorState::default()
        );
    }

    #[test]
    fn a_malformed_file_is_refused_naming_the_file() {
        let d = dir("malformed");
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("s.json");
        for bad in [
            "",
            "{",
            "[]",
            "{\"admin\":{}}",
            "{\"version\":1,\"admin\":{\"198.18.0.21:5060\":\"sleeping\"}}",
            "{\"version\":1,\"admin\":{\"not-an-address\":\"drained\"}}",
            "{\"version\":1,\"weights\":{\"198.18.0.21:5060\":-1}}",
            "{\"version\":1,\"added\":[{\"service\":\"198.18.0.100:5060\"}]}",
            "{\"version\":1,\"extra\":true}",
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = format!("{:#}", read(&path).unwrap_err());
            assert!(
                e.starts_with(&format!("state file {}: ", path.display())),
                "{bad}: {e}"
            );
            assert!(!e.contains('\n'), "{bad}: one line: {e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unknown_version_is_refused_as_such() {
        let d = dir("version");
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("s.json");
        std::fs::write(&path, "{\"version\":2,\"whatever\":[1]}").unwrap();
        let e = format!("{:#}", read(&path).unwrap_err());
        assert!(e.contains("unknown version 2"), "{e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pending_settings_apply_once_and_a_reload_drops_pending_weights() {
        let s = sample();
        let mut p = Pending {
            admin: s.admin.clone(),
            weights: s.weights.clone(),
        };
        assert_eq!(
            p.take(a("198.18.0.21:5060")),
            (Some(AdminSetting::Drained), None)
        );
        assert_eq!(p.take(a("198.18.0.21:5060")), (None, None));
        p.reloaded();
        assert_eq!(p.take(a("198.18.0.22:5060")), (None, None));
        assert_eq!(
            p.take(a("[2001:db8::22]:5060")),
            (Some(AdminSetting::Disabled), None)
        );
    }

    #[test]
    fn provenance_names() {
        assert_eq!(weight_from(true, true), "cli");
        assert_eq!(weight_from(false, true), "dns");
        assert_eq!(weight_from(false, false), "config");
        assert_eq!(added_by(true), "cli");
        assert_eq!(added_by(false), "config");
        assert_eq!(state_from(true), "cli");
        assert_eq!(state_from(false), "health");
    }
}
