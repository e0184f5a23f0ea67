//! `sip-dispatch reload` (and SIGHUP): the flags and the config file are read again
//! ([`Reloader`]), and what they say about backends, SRV names, health checks and DNS
//! takes effect without a restart ([`Controller::reload`]). Settings that only a restart
//! can change (interface, XDP mode, hash key, pin directory, control socket, metrics
//! address, the set of VIPs) must be unchanged, or nothing at all is applied.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
};

use anyhow::bail;

use super::{Controller, MAX_BACKENDS_IN_ALL, Service};
use crate::{
    cli::RunArgs,
    config::{ServiceSpec, Settings},
    hashkey::KeyOrigin,
    protocol::ReloadReply,
    select::Candidate,
};

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

/// How the controller takes reloaded settings.
impl Controller {
    /// Reads the settings again and applies them (all or nothing), then resolves every
    /// SRV name now. Counted for `stats` and the metrics.
    pub(super) fn reload(&mut self) -> anyhow::Result<ReloadReply> {
        self.flags_stale = true;
        let result = self.try_reload();
        let failed = result.is_err();
        self.reloads.last_failed = failed;
        if failed {
            self.reloads.failed += 1;
        } else {
            self.reloads.ok += 1;
        }
        result
    }

    fn try_reload(&mut self) -> anyhow::Result<ReloadReply> {
        let mut changes = Vec::new();
        let mut config = None;
        if let Some(mut reloader) = self.reloader.take() {
            let applied = reloader.reread().and_then(|next| {
                changes = self.apply(&next)?;
                reloader.accept(next);
                Ok(())
            });
            config = reloader.config_path().map(|p| p.display().to_string());
            self.reloader = Some(reloader);
            applied?;
        }
        self.srv.resolve_now();
        for change in &changes {
            log::info!("reload: {change}");
        }
        Ok(ReloadReply {
            reloaded: self.srv_names().into_iter().collect(),
            config,
            changes,
            warning: None,
        })
    }

    /// Takes reloaded settings (the same VIPs: [`Reloader::reread`] checked that):
    /// backends, SRV names, health checks and DNS. Operator states (drained, disabled)
    /// of backends still listed are kept; `set-weight` overrides are not, since the
    /// file says what the weights are. Returns what changed, for the log and the CLI.
    fn apply(&mut self, next: &Settings) -> anyhow::Result<Vec<String>> {
        // The only steps that can fail come first, so a failure changes nothing.
        let total = backends_reconfigured(&self.services, &next.services);
        if total > MAX_BACKENDS_IN_ALL {
            bail!(
                "{total} backends in all services with the last DNS answers, at most \
                 {MAX_BACKENDS_IN_ALL} (nothing was reloaded)"
            );
        }
        let dns_changed = self.srv.reconfigure(next.dns)?;
        if next.services.iter().any(|s| !s.srv.is_empty()) {
            self.srv.resolver()?;
        }
        let mut changes = Vec::new();
        if dns_changed {
            changes.push("dns settings changed: SRV names are resolved again".to_string());
        }
        for spec in &next.services {
            let Some(service) = self.services.iter_mut().find(|s| s.vip == spec.vip) else {
                continue;
            };
            changes.extend(service.reconfigure(spec));
        }
        let overridden = self
            .backends
            .values_mut()
            .filter_map(|k| k.weight_override.take())
            .count();
        self.pending.reloaded();
        if overridden > 0 {
            changes.push(format!(
                "{overridden} set-weight override(s) replaced by the configured weights"
            ));
        }
        if next.health != self.health_cfg {
            self.health_cfg = next.health.clone();
            // Every prober restarts with the new settings; the states so far stay.
            for (_, handle) in self.probers.drain() {
                handle.abort();
            }
            changes.push("health-check settings changed".to_string());
        }
        if next.call_idle != self.call_idle {
            changes.push(format!(
                "call-idle {} (was {})",
                crate::cli::show_duration(next.call_idle),
                crate::cli::show_duration(self.call_idle)
            ));
            self.set_call_idle(next.call_idle);
        }
        if next.latency_aware != self.latency_aware {
            changes.push(format!(
                "latency-aware {}",
                if next.latency_aware { "on" } else { "off" }
            ));
            self.set_latency_aware(next.latency_aware);
        }
        self.censuses.invalidate();
        self.watch_srv(&BTreeMap::new())?;
        self.changed_backends();
        Ok(changes)
    }
}

impl Service {
    /// Takes the static backends and SRV names of a reloaded configuration; returns
    /// what changed. SRV names kept keep their last answer.
    pub(super) fn reconfigure(&mut self, spec: &ServiceSpec) -> Vec<String> {
        let vip = self.vip;
        let statics: Vec<Candidate> = spec.backends.iter().map(Candidate::from).collect();
        let mut changes = Vec::new();
        for c in &statics {
            match self.statics.iter().find(|o| o.addr == c.addr) {
                None => changes.push(format!("{vip}: backend {} added", c.addr)),
                Some(o) if (o.weight, o.priority) != (c.weight, c.priority) => {
                    changes.push(format!(
                        "{vip}: backend {} now weight {} priority {}",
                        c.addr, c.weight, c.priority
                    ))
                }
                Some(_) => {}
            }
        }
        for o in &self.statics {
            if !statics.iter().any(|c| c.addr == o.addr) {
                changes.push(format!("{vip}: backend {} removed", o.addr));
            }
        }
        self.statics = statics;
        self.cli_added.clear();
        self.removed.clear();
        let names: BTreeSet<&String> = spec.srv.iter().collect();
        self.srv.retain(|name, _| {
            let keep = names.contains(name);
            if !keep {
                changes.push(format!("{vip}: srv {name} removed"));
            }
            keep
        });
        for name in names {
            if !self.srv.contains_key(name) {
                changes.push(format!("{vip}: srv {name} added"));
                self.srv.insert(name.clone(), Vec::new());
            }
        }
        changes
    }
}

/// How many distinct backend addresses all `services` would list once the services
/// of `specs` take their static backends (their SRV names keep their last answers).
pub fn backends_reconfigured(services: &[Service], specs: &[ServiceSpec]) -> usize {
    let mut all = std::collections::HashSet::new();
    for s in services {
        match specs.iter().find(|spec| spec.vip == s.vip) {
            Some(spec) => {
                all.extend(spec.backends.iter().map(|b| b.addr));
                for name in &spec.srv {
                    let kept = s.srv.get(name).into_iter().flatten();
                    all.extend(kept.map(|c| c.addr));
                }
            }
            None => all.extend(s.candidates().into_iter().map(|(c, _)| c.addr)),
        }
    }
    all.len()
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
