//! The controller: keeps each service's slot table right as DNS and backend health
//! change. Backends are known by address: one health check per address, whatever the
//! number of services that use it. Every change that alters which backends take traffic (or their weights)
//! builds a new table and swaps it in atomically; a table is only rebuilt when the
//! selection really changed, so calls on surviving backends are never moved.
//!
//! This module holds the event loop (health, DNS, commands). The services and what is
//! known of each backend are in [`service`], table publishing in [`publish`], the state
//! file in [`state_file`], control requests and the views they answer with in
//! [`requests`], reload in [`reload`].
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Instant,
};

use sip_dispatch_common::HashKey;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    backend_ids::BackendIds,
    control,
    dataplane::Dataplane,
    health::{self, Admin, HealthConfig, ProbeOutcome},
    protocol::{Reloads, Reply},
    slowpath,
    srv::{SrvAnswer, SrvEvent, Watchers},
    state,
    table_builds::TableBuilds,
};

mod load;
mod publish;
pub mod reload;
mod requests;
mod service;
mod start;
mod state_file;

pub use self::service::{
    MAX_BACKENDS_IN_ALL, SOURCE_STATIC, Service, affinity_flags, backends_adding, backends_with,
    log_answer,
};
pub use self::start::Started;
use self::{reload::Reloader, requests::WaitingReply, service::Known};

pub struct Controller {
    dp: Dataplane,
    key: HashKey,
    health_cfg: HealthConfig,
    services: Vec<Service>,
    backends: BTreeMap<SocketAddr, Known>,
    /// The one owner of backend ids (the dataplane's writes borrow it): an address of
    /// `backends` gets one when a table first lists it, and gives it up once it is
    /// gone from `backends` and from every installed table.
    ids: BackendIds,
    probers: HashMap<SocketAddr, JoinHandle<()>>,
    probe_tx: mpsc::Sender<(SocketAddr, ProbeOutcome)>,
    probe_rx: mpsc::Receiver<(SocketAddr, ProbeOutcome)>,
    pub slow_path: Arc<slowpath::Counters>,
    srv: Watchers,
    /// Reads the settings again for `reload` (and SIGHUP).
    reloader: Option<Reloader>,
    reloads: Reloads,
    pub dns_failures: u64,
    /// SRV names whose last answer was refused (too many backends in all).
    dns_refused: BTreeSet<String>,
    builds: TableBuilds,
    /// Replies to commands that changed tables, held until those tables are in force.
    waiting: Vec<WaitingReply>,
    /// Where the operator's changes are kept (None: nowhere, as in unit tests).
    state_file: Option<std::path::PathBuf>,
    /// Settings of the state file for addresses not listed yet.
    pending: state::Pending,
    /// The held-call census and the requests waiting for it.
    censuses: crate::census::Censuses,
    /// A backend's state may have changed since the flags were last written.
    flags_stale: bool,
    /// `--call-idle`.
    call_idle: std::time::Duration,
    /// Where health checks come from, per family.
    probe_source: crate::addrs::SourceAddrs,
    /// `--latency-aware`.
    latency_aware: bool,
    load_throttle: self::load::LoadThrottle,
}

impl Controller {
    /// The dataplane comes with the backend ids its maps use (from `Dataplane::load`).
    pub fn new(
        (dp, ids): (Dataplane, BackendIds),
        key: HashKey,
        health_cfg: HealthConfig,
        services: Vec<Service>,
        srv: Watchers,
        reloader: Option<Reloader>,
    ) -> Controller {
        let (probe_tx, probe_rx) = mpsc::channel(1024);
        let mut c = Controller {
            dp,
            key,
            health_cfg,
            services,
            backends: BTreeMap::new(),
            ids,
            probers: HashMap::new(),
            probe_tx,
            probe_rx,
            slow_path: Arc::default(),
            srv,
            reloader,
            reloads: Reloads::default(),
            dns_failures: 0,
            dns_refused: BTreeSet::new(),
            builds: TableBuilds::new(key),
            waiting: Vec::new(),
            state_file: None,
            pending: state::Pending::default(),
            censuses: Default::default(),
            flags_stale: true,
            call_idle: crate::cli::CALL_IDLE_DEFAULT,
            probe_source: Default::default(),
            latency_aware: false,
            load_throttle: Default::default(),
        };
        c.sync_backends();
        c
    }

    /// Starts a watcher for every SRV name of the services (`first`: the answers in hand).
    pub fn watch_srv(&mut self, first: &BTreeMap<String, SrvAnswer>) -> anyhow::Result<()> {
        let names = self.srv_names();
        self.srv.sync(&names, first)
    }

    fn srv_names(&self) -> BTreeSet<String> {
        self.services
            .iter()
            .flat_map(|s| s.srv.keys().cloned())
            .collect()
    }

    /// Where health checks come from (set before the first probe).
    pub fn set_probe_source(&mut self, source: crate::addrs::SourceAddrs) {
        self.probe_source = source;
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// Probes every backend once, concurrently, and records the outcomes: this decides
    /// the initial states before the first tables are published.
    pub async fn initial_probe(&mut self) {
        let mut probes = tokio::task::JoinSet::new();
        for addr in self.backends.keys().copied() {
            let timeout = self.health_cfg.timeout;
            let uri = self.health_cfg.uri.clone();
            let source = self.probe_source.get(addr.is_ipv6());
            probes.spawn(async move {
                let outcome = health::Probe::new(addr, &uri)
                    .with_source(source)
                    .once(timeout)
                    .await;
                (addr, outcome)
            });
        }
        while let Some(Ok((addr, outcome))) = probes.join_next().await {
            health::log_clamped_retry_after(addr, &outcome, &mut false);
            self.on_probe(addr, outcome, false);
        }
    }

    /// Tracks every address some service lists, and forgets the others.
    fn sync_backends(&mut self) {
        let listed: std::collections::HashSet<SocketAddr> = self
            .services
            .iter()
            .flat_map(|s| s.candidates())
            .map(|(c, _)| c.addr)
            .collect();
        for addr in &listed {
            if self.backends.contains_key(addr) {
                continue;
            }
            let known = Known::appearing(*addr, &mut self.pending);
            self.backends.insert(*addr, known);
        }
        self.backends.retain(|addr, _| listed.contains(addr));
    }

    /// Starts probers for backends without one, stops those of forgotten or disabled ones.
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
                let source = self.probe_source.get(addr.is_ipv6());
                let task = health::prober(
                    *addr,
                    self.health_cfg.clone(),
                    source,
                    self.probe_tx.clone(),
                );
                self.probers.insert(*addr, tokio::spawn(task));
            }
        }
    }

    fn on_probe(&mut self, addr: SocketAddr, outcome: ProbeOutcome, republish: bool) {
        let Some(k) = self.backends.get_mut(&addr) else {
            return;
        };
        let health_changed = k.health.record(&outcome, &self.health_cfg, Instant::now());
        if health_changed {
            self.flags_stale = true;
            log::info!(
                "backend {addr} state={} reason={:?}",
                k.health.state.name(),
                k.health.reason
            );
        }
        // Load first: a table published for a health change has this answer's load too.
        self.observe_load(addr, &outcome, republish);
        if health_changed && republish {
            self.republish();
        }
    }

    fn on_srv(&mut self, event: SrvEvent) {
        match event {
            SrvEvent::Resolved { name, answer } => self.apply_srv(&name, &answer),
            SrvEvent::Failed { name, error } => {
                self.dns_failures += 1;
                let kept: usize = self
                    .services
                    .iter()
                    .filter_map(|s| s.srv.get(&name))
                    .map(Vec::len)
                    .sum();
                log::warn!(
                    "dns {name} failed: {error} (keeping the last known {kept} backend(s); retrying)"
                );
            }
            SrvEvent::StillFailing { .. } => self.dns_failures += 1,
        }
    }

    /// Takes a new answer for an SRV name (for every service that uses the name).
    /// An answer that would take the backends of all services past `MAX_BACKENDS` is
    /// refused (counted as a DNS failure): the name keeps its last good set.
    fn apply_srv(&mut self, name: &str, answer: &SrvAnswer) {
        let total = backends_with(&self.services, name, answer);
        if total > MAX_BACKENDS_IN_ALL {
            self.dns_failures += 1;
            if self.dns_refused.insert(name.to_string()) {
                log::warn!(
                    "dns {name} refused: the answer would make {total} backends in all, more than \
                     {MAX_BACKENDS_IN_ALL}; keeping its last good set"
                );
            }
            return;
        }
        if self.dns_refused.remove(name) {
            log::info!("dns {name}: answer accepted again ({total} backends in all)");
        }
        log_answer(name, answer);
        let mut changed = false;
        for s in &mut self.services {
            changed |= s.set_srv(name, answer);
        }
        if changed {
            self.changed_backends();
        }
    }

    /// After a backend set changed: track, probe, republish, then free unused ids.
    fn changed_backends(&mut self) {
        self.flags_stale = true;
        self.sync_backends();
        self.sync_probers();
        self.republish();
        self.release_unused_ids();
    }

    /// `--call-idle` (at start, and on reload).
    pub fn set_call_idle(&mut self, idle: std::time::Duration) {
        if idle != self.call_idle {
            self.call_idle = idle;
            self.censuses.invalidate();
        }
    }

    /// Runs until `stop` resolves: health events, DNS answers and the operator's
    /// commands change the tables.
    pub async fn run(
        &mut self,
        mut commands: mpsc::Receiver<control::Command>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        self.sync_probers();
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("no reload on SIGHUP: {e}");
                None
            }
        };
        tokio::pin!(stop);
        loop {
            tokio::select! {
                Some((addr, outcome)) = self.probe_rx.recv() => self.on_probe(addr, outcome, true),
                Some(event) = self.srv.rx.recv() => self.on_srv(event),
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    crate::notify::reloading();
                    let reloaded = self.reload().map(|r| self.saved(Reply::Reload(r)));
                    crate::notify::reloaded(reloaded.is_ok());
                    match reloaded {
                        Ok(done) => log::info!(
                            "reload (SIGHUP): {}",
                            serde_json::to_string(&done).unwrap_or_default()
                        ),
                        Err(e) => log::error!("reload (SIGHUP): {e:#}"),
                    }
                }
                built = self.builds.finished() => self.on_built(built),
                () = load_republish(self.load_throttle.due) => self.load_republish_due(),
                Some((request, reply)) = commands.recv() => self.command(request, reply),
                (waiting, ok) = self.censuses.finished() => self.census_done(waiting, ok),
                _ = &mut stop => break,
            }
            if self.flags_stale {
                self.sync_flags();
            }
        }
        for (_, handle) in self.probers.drain() {
            handle.abort();
        }
        self.srv.stop();
    }

    /// Drops what adopted maps hold that this configuration does not: services of other
    /// VIPs, and the ids of backends no service lists.
    pub fn forget_unconfigured(&mut self) -> anyhow::Result<()> {
        let vips: Vec<SocketAddr> = self.services.iter().map(|s| s.vip).collect();
        self.dp.retain_services(&mut self.ids, &vips)?;
        self.release_unused_ids();
        Ok(())
    }
}

/// Resolves when a load-driven republish is due (never while none waits).
async fn load_republish(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
