//! Named network namespaces (`ip netns`) owned by this process: creation, commands run
//! inside, teardown (processes first, then the namespace, which takes its veths along), and
//! removal of what crashed earlier runs left behind.
use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::cmd;

/// Prefix of every namespace this testbed creates: `sdt<pid>n<seq>-<role>`.
pub const PREFIX: &str = "sdt";

static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);

/// A tag unique to this process and call: `sdt<pid>n<seq>`.
pub fn unique_tag() -> String {
    format!(
        "{PREFIX}{}n{}",
        std::process::id(),
        NEXT_SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// `ip netns exec NS program` as a [`Command`] to complete with arguments.
pub fn command(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Runs `program args...` inside namespace `ns` to completion and returns its stdout.
pub fn exec<I, S>(ns: &str, program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    cmd::stdout(command(ns, program).args(args))
}

/// A network namespace that is deleted (after killing whatever runs in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` and brings its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        anyhow::ensure!(name.len() <= 64, "namespace name {name:?} too long");
        cmd::run("ip", ["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NS args...`.
    pub fn ip<I, S>(&self, args: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args);
        cmd::output(&mut c).map(drop)
    }

    /// Runs `program args...` inside the namespace to completion and returns its stdout.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        exec(&self.name, program, args)
    }

    /// Kills what still runs inside (SIGTERM, then SIGKILL after `grace`).
    pub fn kill_processes(&self, grace: Duration) {
        kill_processes_in(&self.name, grace);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_processes_in(&self.name, Duration::from_secs(3));
        if let Err(e) = cmd::run("ip", ["netns", "del", &self.name]) {
            eprintln!("testbed: cannot delete namespace {}: {e:#}", self.name);
        }
    }
}

/// PIDs of the processes inside namespace `ns` (`ip netns pids`).
pub fn pids(ns: &str) -> Vec<i32> {
    cmd::stdout(Command::new("ip").args(["netns", "pids", ns]))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p: &i32| p > 1 && p != std::process::id() as i32)
        .collect()
}

/// SIGTERM to every process in `ns`, then SIGKILL to the ones still there after `grace`.
/// These are processes this testbed started in a namespace it created.
pub fn kill_processes_in(ns: &str, grace: Duration) {
    let victims = pids(ns);
    if victims.is_empty() {
        return;
    }
    for &p in &victims {
        // SAFETY: kill(2) with a PID found inside our own namespace.
        unsafe { libc::kill(p, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && victims.iter().any(|&p| alive(p)) {
        thread::sleep(Duration::from_millis(20));
    }
    for &p in &victims {
        if alive(p) {
            // SAFETY: as above.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

/// Whether a process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the ")" closing the command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Names of all named network namespaces.
pub fn list() -> Result<Vec<String>> {
    let out = cmd::stdout(Command::new("ip").args(["netns", "list"]))?;
    // Lines look like "name (id: 3)" or "name".
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// The PID encoded in a namespace name of this testbed (`sdt<pid>n<seq>-<role>`).
pub fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let after = &rest[digits.len()..];
    if digits.is_empty() || !after.starts_with('n') {
        return None;
    }
    digits.parse().ok()
}

/// Deletes namespaces (and the processes in them) left by earlier runs of this testbed
/// whose process is gone. Returns the names removed.
pub fn cleanup_leftovers() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in list().context("listing network namespaces")? {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid as u32 == std::process::id() || alive(pid) {
            continue;
        }
        kill_processes_in(&name, Duration::from_secs(2));
        cmd::run("ip", ["netns", "del", &name])
            .with_context(|| format!("removing leftover namespace {name}"))?;
        removed.push(name);
    }
    if !removed.is_empty() {
        eprintln!(
            "testbed: removed leftovers of earlier runs: {}",
            removed.join(" ")
        );
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("sdt1234n0-sw"), Some(1234));
        assert_eq!(owner_pid("sdt77n12-b3"), Some(77));
        assert_eq!(owner_pid("sdt-sw"), None);
        assert_eq!(owner_pid("sdt12-sw"), None);
        assert_eq!(owner_pid("other"), None);
        assert_eq!(owner_pid("sdtx1n0-sw"), None);
    }

    #[test]
    fn tags_are_unique() {
        let a = unique_tag();
        let b = unique_tag();
        assert_ne!(a, b);
        assert_eq!(
            owner_pid(&format!("{a}-sw")),
            Some(std::process::id() as i32)
        );
    }

    #[test]
    fn self_is_alive() {
        assert!(alive(std::process::id() as i32));
        assert!(!alive(i32::MAX));
    }
}
