//! `sip-dispatch reload` (and SIGHUP): the flags and the config file are read again, and
//! what they say about backends, SRV names, health checks and DNS takes effect without a
//! restart. Settings that only a restart can change (interface, XDP mode, hash key, pin
//! directory, control socket, metrics address, the set of VIPs) must be unchanged, or
//! nothing at all is applied.
use std::{collections::BTreeSet, net::SocketAddr, path::Path};

use anyhow::bail;

use crate::{cli::RunArgs, config::Settings, hashkey::KeyOrigin};

/// Re-reads the settings the daemon was started with.
pub struct Reloader {
    args: RunArgs,
    running: Settings,
}

impl Reloader {
    pub fn new(args: RunArgs, running: Settings) -> Reloader {
        Reloader { args, running }
    }

    /// The config file, if the daemon was started with one.
    pub fn config_path(&self) -> Option<&Path> {
        self.args.config.as_deref()
    }

    /// Reads flags and file again; an error (nothing applied) when the file is invalid or
    /// a restart-only setting changed.
    pub fn reread(&self) -> anyhow::Result<Settings> {
        let next = Settings::load(&self.args)?;
        let changed = restart_only_changes(&self.running, &next);
        if !changed.is_empty() {
            bail!(
                "{} changed: that needs a restart (nothing was reloaded)",
                changed.join(", ")
            );
        }
        Ok(next)
    }

    /// Records the settings now in force.
    pub fn accept(&mut self, settings: Settings) {
        self.running = settings;
    }
}

/// Whether the hash key differs. A key file that is missing on both sides has no key
/// yet (each read draws a fresh one), so only its path counts; a key file that went
/// missing since the start is a changed key (a restart would create a new one).
fn key_changed(running: &Settings, next: &Settings) -> bool {
    match (&running.hash_key_origin, &next.hash_key_origin) {
        (KeyOrigin::NewKeyFile(a), KeyOrigin::NewKeyFile(b)) => a != b,
        _ => running.hash_key != next.hash_key,
    }
}

/// The settings that differ between `running` and `next` but cannot change while the
/// daemon runs, by their config-file key.
pub fn restart_only_changes(running: &Settings, next: &Settings) -> Vec<String> {
    let mut changed: Vec<String> = [
        ("iface", running.iface != next.iface),
        ("xdp-mode", running.xdp_mode != next.xdp_mode),
        ("hash-key", key_changed(running, next)),
        ("pin-path", running.pin_path != next.pin_path),
        ("control", running.control != next.control),
        ("state-file", running.state_file != next.state_file),
        ("metrics", running.metrics != next.metrics),
        ("affinity", running.affinity.on != next.affinity.on),
        (
            "affinity-entries",
            running.affinity.entries != next.affinity.entries,
        ),
        ("probe-source", running.probe_source != next.probe_source),
        ("encap-source", running.encap_source != next.encap_source),
    ]
    .into_iter()
    .filter(|(_, differs)| *differs)
    .map(|(key, _)| format!("`{key}`"))
    .collect();
    let vips =
        |s: &Settings| -> BTreeSet<SocketAddr> { s.services.iter().map(|s| s.vip).collect() };
    let (before, after) = (vips(running), vips(next));
    let added: Vec<String> = after.difference(&before).map(|v| v.to_string()).collect();
    let removed: Vec<String> = before.difference(&after).map(|v| v.to_string()).collect();
    if !added.is_empty() {
        changed.push(format!("services added ({})", added.join(", ")));
    }
    if !removed.is_empty() {
        changed.push(format!("services removed ({})", removed.join(", ")));
    }
    let moved: Vec<String> = running
        .services
        .iter()
        .filter_map(|r| {
            let n = next.services.iter().find(|n| n.vip == r.vip)?;
            (n.forwarding != r.forwarding)
                .then(|| format!("{} {} -> {}", r.vip, r.forwarding, n.forwarding))
        })
        .collect();
    if !moved.is_empty() {
        changed.push(format!("`forwarding` ({})", moved.join(", ")));
    }
    changed
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn settings(args: &[&str]) -> Settings {
        let mut all = vec!["sip-dispatch", "run", "--iface", "eth1"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).expect("valid flags").command {
            Command::Run(run) => Settings::resolve(&run).expect("valid settings"),
            _ => unreachable!(),
        }
    }

    #[test]
    fn backends_srv_and_health_may_change() {
        let a = settings(&[
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.21:5060",
        ]);
        let b = settings(&[
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.22:5060,weight=3",
            "--srv",
            "_sip._udp.example.net",
            "--health-interval",
            "2s",
            "--dns-max-ttl",
            "60",
        ]);
        assert_eq!(restart_only_changes(&a, &b), Vec::<String>::new());
    }

    #[test]
    fn the_health_uri_reloads() {
        let base = [
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.21:5060",
        ];
        let a = settings(&base);
        let b = settings(&[&base[..], &["--health-uri", "sip:ping@{backend}"]].concat());
        assert_ne!(a.health, b.health, "a change the controller applies");
        assert_eq!(restart_only_changes(&a, &b), Vec::<String>::new());
    }

    #[test]
    fn a_changed_or_missing_key_file_is_a_changed_key() {
        let dir = std::env::temp_dir().join(format!("sd-reload-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("hash-key");
        let flags = [
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.21:5060",
            "--hash-key-file",
            file.to_str().unwrap(),
        ];
        // Missing on both sides: no key yet, nothing changed.
        assert_eq!(
            restart_only_changes(&settings(&flags), &settings(&flags)),
            Vec::<String>::new()
        );
        crate::hashkey::persist(&file, crate::hashkey::generate().unwrap()).unwrap();
        let running = settings(&flags);
        assert_eq!(
            restart_only_changes(&running, &settings(&flags)),
            Vec::<String>::new()
        );
        std::fs::remove_file(&file).unwrap();
        crate::hashkey::persist(&file, crate::hashkey::generate().unwrap()).unwrap();
        assert_eq!(
            restart_only_changes(&running, &settings(&flags)),
            ["`hash-key`"]
        );
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            restart_only_changes(&running, &settings(&flags)),
            ["`hash-key`"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// One service with one backend and a fixed key, and `extra` flags.
    fn one_service_with(extra: &[&str]) -> Settings {
        let mut a = vec![
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.21:5060",
            "--hash-key",
            "000102030405060708090a0b0c0d0e0f",
        ];
        a.extend_from_slice(extra);
        settings(&a)
    }

    #[test]
    fn affinity_settings_need_a_restart() {
        let with = one_service_with;
        assert_eq!(
            restart_only_changes(&with(&[]), &with(&["--affinity", "on"])),
            Vec::<String>::new(),
            "on is the default"
        );
        assert_eq!(
            restart_only_changes(&with(&[]), &with(&["--affinity", "off"])),
            ["`affinity`"]
        );
        assert_eq!(
            restart_only_changes(&with(&[]), &with(&["--affinity-entries", "2048"])),
            ["`affinity-entries`"]
        );
    }

    #[test]
    fn forwarding_and_its_addresses_need_a_restart() {
        let with = one_service_with;
        assert_eq!(
            restart_only_changes(&with(&[]), &with(&["--forwarding", "rewrite"])),
            Vec::<String>::new(),
            "rewrite is the default"
        );
        assert_eq!(
            restart_only_changes(&with(&[]), &with(&["--forwarding", "l2dsr"])),
            ["`forwarding` (198.18.0.100:5060 rewrite -> l2dsr)"]
        );
        assert_eq!(
            restart_only_changes(
                &with(&["--forwarding", "ipip"]),
                &with(&[
                    "--forwarding",
                    "ipip",
                    "--probe-source",
                    "198.18.0.1",
                    "--encap-source",
                    "198.18.0.2"
                ])
            ),
            ["`probe-source`", "`encap-source`"]
        );
    }

    #[test]
    fn restart_only_settings_are_named() {
        let a = settings(&[
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.21:5060",
        ]);
        let b = settings(&[
            "--vip",
            "198.18.0.101:5060",
            "--backend",
            "198.18.0.21:5060",
            "--hash-key",
            "000102030405060708090a0b0c0d0e0f",
            "--xdp-mode",
            "skb",
            "--metrics",
            "127.0.0.1:9464",
        ]);
        assert_eq!(
            restart_only_changes(&a, &b),
            [
                "`xdp-mode`",
                "`hash-key`",
                "`metrics`",
                "services added (198.18.0.101:5060)",
                "services removed (198.18.0.100:5060)"
            ]
        );
    }
}
