//! The controller: keeps each service's slot table right as DNS and backend health
//! change. Every change that alters which backends take traffic (or their weights)
//! builds a new table and swaps it in atomically; a table is only rebuilt when the
//! selection really changed, so calls on surviving backends are never moved.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context as _, bail};
use sip_dispatch_common::{
    HashKey,
    table::{SlotTable, build_table},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    control,
    dataplane::Dataplane,
    health::{self, Admin, Health, HealthConfig, ProbeOutcome},
    select::{Candidate, Selection, select},
    slowpath,
    srv::{SrvAnswer, SrvEvent},
    stats::BackendInfo,
};

/// Where a backend came from.
pub const SOURCE_STATIC: &str = "static";

pub struct Service {
    pub id: u32,
    pub vip: SocketAddr,
    pub statics: Vec<Candidate>,
    /// The last good answer of each SRV name (empty until the first one).
    pub srv: BTreeMap<String, Vec<Candidate>>,
}

impl Service {
    /// Takes an SRV answer; false when nothing changed. Targets of the other address
    /// family than the VIP's, and the VIP itself, are left out.
    pub fn set_srv(&mut self, name: &str, answer: &SrvAnswer) -> bool {
        let mut cands = answer.candidates();
        cands.retain(|c| c.addr.is_ipv6() == self.vip.is_ipv6() && c.addr != self.vip);
        if self.srv.get(name) == Some(&cands) {
            return false;
        }
        self.srv.insert(name.to_string(), cands);
        true
    }

    /// Static backends first, then SRV ones; an address listed twice keeps its first
    /// appearance.
    fn candidates(&self) -> Vec<(Candidate, String)> {
        let mut out: Vec<(Candidate, String)> = self
            .statics
            .iter()
            .map(|c| (*c, SOURCE_STATIC.to_string()))
            .collect();
        for (name, cands) in &self.srv {
            out.extend(cands.iter().map(|c| (*c, name.clone())));
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|(c, _)| seen.insert(c.addr));
        out
    }
}

struct Known {
    health: Health,
    candidate: Candidate,
    source: String,
    /// `set-weight` from the operator, kept across DNS updates.
    weight_override: Option<u32>,
}

pub fn log_answer(name: &str, answer: &SrvAnswer) {
    log::info!(
        "dns {name} records={} backends={} ttl={}s",
        answer.targets.len(),
        answer.targets.iter().map(|t| t.addrs.len()).sum::<usize>(),
        answer.ttl.as_secs()
    );
}

pub struct Controller {
    dp: Dataplane,
    key: HashKey,
    health_cfg: HealthConfig,
    service: Service,
    backends: BTreeMap<SocketAddr, Known>,
    probers: HashMap<SocketAddr, JoinHandle<()>>,
    probe_tx: mpsc::Sender<(SocketAddr, ProbeOutcome)>,
    probe_rx: mpsc::Receiver<(SocketAddr, ProbeOutcome)>,
    published: Option<Selection>,
    generation: u64,
    /// The slow path reads the table in force from here.
    tables: watch::Sender<Option<Arc<SlotTable>>>,
    pub slow_path: Arc<slowpath::Counters>,
    /// Wakes the SRV watchers for an immediate re-resolution.
    pub reload: Arc<tokio::sync::Notify>,
    pub dns_failures: u64,
}

impl Controller {
    pub fn new(
        dp: Dataplane,
        key: HashKey,
        health_cfg: HealthConfig,
        service: Service,
    ) -> Controller {
        let (probe_tx, probe_rx) = mpsc::channel(1024);
        let mut c = Controller {
            dp,
            key,
            health_cfg,
            service,
            backends: BTreeMap::new(),
            probers: HashMap::new(),
            probe_tx,
            probe_rx,
            published: None,
            generation: 0,
            tables: watch::channel(None).0,
            slow_path: Arc::default(),
            reload: Arc::default(),
            dns_failures: 0,
        };
        c.sync_backends();
        c
    }

    /// The table in force, for the slow path.
    pub fn tables(&self) -> slowpath::TableWatch {
        self.tables.subscribe()
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// Probes every backend once, concurrently, and records the outcomes: this decides
    /// the initial states before the first table is published.
    pub async fn initial_probe(&mut self) {
        let mut probes = tokio::task::JoinSet::new();
        for addr in self.backends.keys().copied() {
            let timeout = self.health_cfg.timeout;
            probes.spawn(async move {
                let outcome = match health::probe_socket(addr).await {
                    Ok(sock) => health::probe_once(&sock, 0, timeout).await,
                    Err(e) => ProbeOutcome::Unreachable(format!("{e}")),
                };
                (addr, outcome)
            });
        }
        while let Some(Ok((addr, outcome))) = probes.join_next().await {
            self.on_probe(addr, outcome, false);
        }
    }

    /// Adds what the service's candidates list and this controller does not know yet,
    /// and forgets (and stops probing) what is no longer listed.
    fn sync_backends(&mut self) {
        let current = self.service.candidates();
        for (c, source) in &current {
            match self.backends.get_mut(&c.addr) {
                Some(k) => {
                    k.candidate = *c;
                    k.source.clone_from(source);
                }
                None => {
                    self.backends.insert(
                        c.addr,
                        Known {
                            health: Health::unprobed(),
                            candidate: *c,
                            source: source.clone(),
                            weight_override: None,
                        },
                    );
                }
            }
        }
        let listed: std::collections::HashSet<SocketAddr> =
            current.iter().map(|(c, _)| c.addr).collect();
        self.backends.retain(|addr, _| listed.contains(addr));
    }

    /// Starts probers for backends without one, stops those of forgotten backends.
    fn sync_probers(&mut self) {
        self.probers.retain(|addr, handle| {
            let keep = self
                .backends
                .get(addr)
                .is_some_and(|k| k.health.admin != Admin::Disabled);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (addr, k) in &self.backends {
            if k.health.admin != Admin::Disabled && !self.probers.contains_key(addr) {
                let task = health::prober(*addr, self.health_cfg.clone(), self.probe_tx.clone());
                self.probers.insert(*addr, tokio::spawn(task));
            }
        }
    }

    fn on_probe(&mut self, addr: SocketAddr, outcome: ProbeOutcome, republish: bool) {
        let Some(k) = self.backends.get_mut(&addr) else {
            return;
        };
        let changed = k.health.record(&outcome, &self.health_cfg, Instant::now());
        if changed {
            log::info!(
                "backend {addr} state={} reason={:?}",
                k.health.state.name(),
                k.health.reason
            );
            if republish {
                self.republish();
            }
        }
    }

    fn on_srv(&mut self, event: SrvEvent) {
        match event {
            SrvEvent::Resolved { name, answer } => self.apply_srv(name, &answer),
            SrvEvent::Failed { name, error } => {
                self.dns_failures += 1;
                let kept = self.service.srv.get(&name).map_or(0, Vec::len);
                log::warn!(
                    "dns {name} failed: {error} (keeping the last known {kept} backend(s); retrying)"
                );
            }
            SrvEvent::StillFailing { .. } => self.dns_failures += 1,
        }
    }

    /// Takes a new answer for an SRV name.
    fn apply_srv(&mut self, name: String, answer: &SrvAnswer) {
        log_answer(&name, answer);
        if !self.service.set_srv(&name, answer) {
            return;
        }
        self.sync_backends();
        self.sync_probers();
        self.republish();
        self.release_forgotten();
    }

    /// Frees the ids of backends that no longer appear anywhere (after the table that
    /// stopped using them is in place).
    fn release_forgotten(&mut self) {
        let gone: Vec<SocketAddr> = self
            .dp
            .backend_addrs()
            .filter(|a| !self.backends.contains_key(a))
            .collect();
        for addr in gone {
            self.dp.release_backend(addr);
        }
    }

    fn candidates_with_health(&self) -> Vec<Candidate> {
        self.backends
            .values()
            .map(|k| Candidate {
                healthy: k.health.takes_traffic(),
                weight: k.weight_override.unwrap_or(k.candidate.weight),
                ..k.candidate
            })
            .collect()
    }

    /// Builds and swaps in a new table if the selection changed.
    pub fn republish(&mut self) {
        let selection = select(&self.candidates_with_health());
        if self.published.as_ref() == Some(&selection) {
            return;
        }
        let started = Instant::now();
        if let Err(e) = self.publish(&selection) {
            // The old table stays in force; the next change tries again.
            log::error!("table {}: {e:#}", self.service.vip);
            return;
        }
        self.generation += 1;
        log::debug!(
            "table {} built and swapped in {:?}",
            self.service.vip,
            started.elapsed()
        );
        let list: Vec<String> = selection
            .members
            .iter()
            .map(|(a, _)| {
                format!(
                    "{a}/{}",
                    self.backends.get(a).map_or(0, |k| k.candidate.weight)
                )
            })
            .collect();
        log::info!(
            "table {} generation={} priority={} backends={}",
            self.service.vip,
            self.generation,
            selection
                .priority
                .map_or("none".to_string(), |p| p.to_string()),
            list.join(",")
        );
        self.published = Some(selection);
    }

    fn publish(&mut self, selection: &Selection) -> anyhow::Result<()> {
        let table =
            build_table(&selection.weighted(), self.key).context("building the slot table")?;
        // Every known backend keeps an id (and its counters), in the table or not.
        for addr in self.backends.keys() {
            self.dp.backend_id(*addr)?;
        }
        self.dp
            .install_service(self.service.id, self.service.vip, &table)?;
        self.tables.send_replace(Some(Arc::new(table)));
        Ok(())
    }

    /// Runs until `stop` resolves: health events and DNS answers change the tables.
    pub async fn run(
        &mut self,
        mut srv_rx: mpsc::Receiver<SrvEvent>,
        mut commands: mpsc::Receiver<control::Command>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        self.sync_probers();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                Some((addr, outcome)) = self.probe_rx.recv() => self.on_probe(addr, outcome, true),
                Some(event) = srv_rx.recv() => self.on_srv(event),
                Some((request, reply)) = commands.recv() => {
                    let response = match self.handle(request) {
                        Ok(result) => control::Response::ok(result),
                        Err(e) => control::Response::error(format!("{e:#}")),
                    };
                    let _ = reply.send(response);
                }
                _ = &mut stop => break,
            }
        }
        for (_, handle) in self.probers.drain() {
            handle.abort();
        }
    }

    /// Carries out one control request.
    fn handle(&mut self, request: control::Request) -> anyhow::Result<serde_json::Value> {
        use control::Request::*;
        match request {
            BackendsList => Ok(self.backends_json()?),
            Stats => Ok(serde_json::to_value(self.snapshot()?)?),
            Which { call_id, service } => self.which(&call_id, service),
            Reload => {
                self.reload.notify_waiters();
                Ok(serde_json::json!({"reloaded": self.service.srv.keys().collect::<Vec<_>>()}))
            }
            BackendAdd {
                address,
                weight,
                priority,
                service,
            } => {
                self.check_service(service)?;
                if address.is_ipv6() != self.service.vip.is_ipv6() {
                    bail!(
                        "backend {address} and VIP {} are of different address families",
                        self.service.vip
                    );
                }
                if address == self.service.vip {
                    bail!("backend {address} is the VIP itself (a forwarding loop)");
                }
                if self.backends.contains_key(&address) {
                    bail!("backend {address} is already configured");
                }
                if weight > u16::MAX as u32 {
                    bail!("weight {weight} is above 65535");
                }
                self.service.statics.push(Candidate {
                    addr: address,
                    priority,
                    weight,
                    sharing: 1,
                    healthy: true,
                });
                self.changed_backends();
                Ok(serde_json::json!({"added": address}))
            }
            BackendRemove { address } => {
                let known = self.known(address)?;
                if known.source != SOURCE_STATIC {
                    bail!(
                        "backend {address} comes from DNS SRV {}: change the zone, or disable it",
                        known.source
                    );
                }
                self.service.statics.retain(|c| c.addr != address);
                self.changed_backends();
                Ok(serde_json::json!({"removed": address}))
            }
            BackendAdmin { address, admin } => {
                let admin = match admin.as_str() {
                    "enable" => Admin::Enabled,
                    "drain" => Admin::Drained,
                    "disable" => Admin::Disabled,
                    other => bail!("unknown admin state {other:?} (enable, drain or disable)"),
                };
                let k = self.known_mut(address)?;
                if k.health.admin == Admin::Disabled && admin != Admin::Disabled {
                    // Back in service: its first probe decides again.
                    k.health = Health::unprobed();
                }
                k.health.admin = admin;
                k.health.reason = "set by the operator".into();
                log::info!(
                    "backend {address} state={} reason=\"set by the operator\"",
                    k.health.display_state()
                );
                self.sync_probers();
                self.republish();
                Ok(
                    serde_json::json!({"address": address, "state": self.known(address)?.health.display_state()}),
                )
            }
            BackendWeight { address, weight } => {
                if weight > u16::MAX as u32 {
                    bail!("weight {weight} is above 65535");
                }
                self.known_mut(address)?.weight_override = Some(weight);
                self.republish();
                Ok(serde_json::json!({"address": address, "weight": weight}))
            }
        }
    }

    fn check_service(&self, service: Option<SocketAddr>) -> anyhow::Result<()> {
        match service {
            Some(s) if s != self.service.vip => bail!(
                "unknown service {s} (this daemon serves {})",
                self.service.vip
            ),
            _ => Ok(()),
        }
    }

    fn known(&self, address: SocketAddr) -> anyhow::Result<&Known> {
        self.backends
            .get(&address)
            .with_context(|| format!("unknown backend {address}"))
    }

    fn known_mut(&mut self, address: SocketAddr) -> anyhow::Result<&mut Known> {
        self.backends
            .get_mut(&address)
            .with_context(|| format!("unknown backend {address}"))
    }

    /// After the static set changed: track, probe, republish, free.
    fn changed_backends(&mut self) {
        self.sync_backends();
        self.sync_probers();
        self.republish();
        self.release_forgotten();
    }

    /// Which backend a Call-ID value goes to now.
    fn which(
        &self,
        call_id: &str,
        service: Option<SocketAddr>,
    ) -> anyhow::Result<serde_json::Value> {
        self.check_service(service)?;
        let compact: Vec<u8> = call_id
            .trim()
            .bytes()
            .filter(|b| *b != b' ' && *b != b'\t')
            .collect();
        let hash = sip_dispatch_common::hash::siphash13(self.key, &compact);
        let table = self.tables.borrow().clone();
        let backend = table
            .as_ref()
            .and_then(|t| t.member_for_hash(hash))
            .map(|m| m.backend.to_socket_addr());
        Ok(serde_json::json!({
            "call_id": call_id,
            "service": self.service.vip,
            "slot": sip_dispatch_common::slot_of(hash),
            "backend": backend,
        }))
    }

    /// `backends list`: every backend of the service with its share of the slots.
    fn backends_json(&self) -> anyhow::Result<serde_json::Value> {
        let table = self.tables.borrow().clone();
        let shares: HashMap<SocketAddr, f64> = table
            .as_ref()
            .map(|t| {
                t.members
                    .iter()
                    .zip(t.shares())
                    .map(|(m, s)| (m.backend.to_socket_addr(), s))
                    .collect()
            })
            .unwrap_or_default();
        let snap = self.snapshot()?;
        let backends: Vec<serde_json::Value> = snap
            .backends
            .iter()
            .map(|b| {
                let mut v = serde_json::to_value(b).unwrap_or_default();
                let addr: Option<SocketAddr> = b.address.parse().ok();
                v["share"] =
                    serde_json::json!(addr.and_then(|a| shares.get(&a)).copied().unwrap_or(0.0));
                v
            })
            .collect();
        Ok(serde_json::json!({
            "services": [{
                "vip": self.service.vip,
                "generation": self.generation,
                "priority": self.published.as_ref().and_then(|p| p.priority),
                "backends": backends,
            }]
        }))
    }

    /// What the stats and the exit line show of each backend.
    pub fn backend_infos(&self) -> Vec<BackendInfo> {
        self.backends
            .iter()
            .map(|(addr, k)| BackendInfo {
                id: self.dp.known_backend_id(*addr),
                address: *addr,
                weight: k.weight_override.unwrap_or(k.candidate.weight),
                priority: k.candidate.priority,
                source: k.source.clone(),
                state: k.health.display_state(),
                reason: k.health.reason.clone(),
                rtt: k.health.srtt,
                consecutive_failures: k.health.consecutive_failures,
                last_change: k
                    .health
                    .last_change
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                checks: k.health.checks,
                check_failures: k.health.check_failures,
            })
            .collect()
    }

    /// Counters and backend states, as the exit line and the stats show them.
    pub fn snapshot(&self) -> anyhow::Result<crate::stats::Snapshot> {
        crate::stats::snapshot(
            &self.dp,
            &self.backend_infos(),
            self.dns_failures,
            self.slow_path.snapshot(),
        )
    }
}
