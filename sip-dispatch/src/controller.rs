//! The controller: keeps each service's slot table right as DNS and backend health
//! change. Backends are known by address: one health check per address, whatever the
//! number of services that use it. Every change that alters which backends take traffic (or their weights)
//! builds a new table and swaps it in atomically; a table is only rebuilt when the
//! selection really changed, so calls on surviving backends are never moved.
//!
//! This module holds the state machine and the table publishing; control requests and
//! the views they answer with are in [`requests`], reload in [`reload`].
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Instant,
};

use sip_dispatch_common::{HashKey, MAX_BACKENDS, table::SlotTable};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    control,
    dataplane::Dataplane,
    health::{self, Admin, Health, HealthConfig, ProbeOutcome},
    protocol::{BackendState, Reloads, Reply, check_weight},
    select::{Candidate, Selection, select},
    slowpath,
    srv::{SrvAnswer, SrvEvent, Watchers},
    state::{self, AdminSetting, OperatorState},
    table_builds::{Built, TableBuilds},
};

pub mod reload;
mod requests;

use self::{reload::Reloader, requests::WaitingReply};

/// Where a backend came from.
pub const SOURCE_STATIC: &str = "static";

/// A service (VIP:port) with its backends and the table in force.
pub struct Service {
    pub id: u32,
    pub vip: SocketAddr,
    pub statics: Vec<Candidate>,
    /// The last good answer of each of this service's SRV names (empty until the first).
    pub srv: BTreeMap<String, Vec<Candidate>>,
    published: Option<Selection>,
    /// The newest selection sent to be built and not back yet (its request number).
    requested: Option<(u64, Selection)>,
    /// The request number of the last build that came back (installed or failed).
    built_seq: u64,
    generation: u64,
    /// The slow path reads the table in force from here.
    tables: watch::Sender<Option<Arc<slowpath::InstalledTable>>>,
    /// Static backends added with `backends add` (the others come from the settings).
    pub cli_added: BTreeSet<SocketAddr>,
    /// Configured static backends removed with `backends remove`.
    pub removed: BTreeSet<SocketAddr>,
    /// How its packets reach the backends (shown by `backends list`).
    pub forwarding: crate::cli::ForwardingMode,
}

impl Service {
    pub fn new(id: u32, vip: SocketAddr, statics: Vec<Candidate>, srv_names: &[String]) -> Service {
        Service {
            id,
            vip,
            statics,
            srv: srv_names.iter().map(|n| (n.clone(), Vec::new())).collect(),
            published: None,
            requested: None,
            built_seq: 0,
            generation: 0,
            tables: watch::channel(None).0,
            cli_added: BTreeSet::new(),
            removed: BTreeSet::new(),
            forwarding: Default::default(),
        }
    }

    /// Takes an SRV answer for one of this service's names; false when nothing changed.
    /// Addresses of the other family than the VIP's, and the VIP itself, are left out
    /// (and take no part of their target's weight).
    pub fn set_srv(&mut self, name: &str, answer: &SrvAnswer) -> bool {
        let cands = self.srv_candidates(answer);
        let Some(current) = self.srv.get_mut(name) else {
            return false;
        };
        if *current == cands {
            return false;
        }
        *current = cands;
        true
    }

    /// The SRV backends `answer` gives this service.
    fn srv_candidates(&self, answer: &SrvAnswer) -> Vec<Candidate> {
        let mut cands = answer.candidates(self.vip.is_ipv6());
        cands.retain(|c| c.addr != self.vip);
        cands
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

    /// A member of `selection` this service no longer lists (removed since it was made).
    fn unlisted_member(&self, selection: &Selection) -> Option<SocketAddr> {
        let listed: std::collections::HashSet<SocketAddr> =
            self.candidates().into_iter().map(|(c, _)| c.addr).collect();
        selection
            .members
            .iter()
            .map(|(a, _)| *a)
            .find(|a| !listed.contains(a))
    }

    pub fn has_backends(&self) -> bool {
        !self.statics.is_empty() || self.srv.values().any(|v| !v.is_empty())
    }

    /// The table in force, for the slow path.
    pub fn tables(&self) -> slowpath::TableWatch {
        self.tables.subscribe()
    }

    fn table(&self) -> Option<Arc<slowpath::InstalledTable>> {
        self.tables.borrow().clone()
    }
}

struct Known {
    health: Health,
    /// `set-weight` from the operator, kept across DNS updates.
    weight_override: Option<u32>,
}

impl Known {
    /// A backend that some service lists now, with what the state file kept for it.
    fn appearing(addr: SocketAddr, pending: &mut state::Pending) -> Known {
        let mut known = Known {
            health: Health::unprobed(),
            weight_override: None,
        };
        known.take_pending(addr, pending);
        known
    }

    /// Takes what the state file kept for `addr`, if anything.
    fn take_pending(&mut self, addr: SocketAddr, pending: &mut state::Pending) {
        let (admin, weight) = pending.take(addr);
        if let Some(admin) = admin {
            self.health.admin = match admin {
                AdminSetting::Drained => Admin::Drained,
                AdminSetting::Disabled => Admin::Disabled,
            };
            self.health.reason = "set by the operator (state file)".into();
            log::info!(
                "backend {addr} state={} reason=\"set by the operator (state file)\"",
                BackendState::of(&self.health)
            );
        }
        if let Some(weight) = weight {
            log::info!("backend {addr} weight={weight} (set-weight, state file)");
            self.weight_override = Some(weight);
        }
    }
}

pub fn log_answer(name: &str, answer: &SrvAnswer) {
    log::info!(
        "dns {name} records={} backends={} ttl={}s",
        answer.targets.len(),
        answer.targets.iter().map(|t| t.addrs.len()).sum::<usize>(),
        answer.ttl.as_secs()
    );
}

/// The most backends all services may list together: half the ids of the maps
/// (`MAX_BACKENDS`). The ids an installed table references stay reserved until that
/// table is replaced, so replacing every backend at once needs twice as many ids as
/// backends listed. DNS answers, `backends add` and the configuration are held to it.
pub const MAX_BACKENDS_IN_ALL: usize = (MAX_BACKENDS / 2) as usize;

/// How many distinct backend addresses all `services` would list with `answer` as
/// the answer for SRV name `name` (backend ids are per address, shared by services).
pub fn backends_with(services: &[Service], name: &str, answer: &SrvAnswer) -> usize {
    let mut all = std::collections::HashSet::new();
    for s in services {
        all.extend(s.statics.iter().map(|c| c.addr));
        for (n, cands) in &s.srv {
            if n == name {
                all.extend(s.srv_candidates(answer).iter().map(|c| c.addr));
            } else {
                all.extend(cands.iter().map(|c| c.addr));
            }
        }
    }
    all.len()
}

/// How many distinct backend addresses all `services` would list with `addr` added as
/// a static backend of one of them.
pub fn backends_adding(services: &[Service], addr: SocketAddr) -> usize {
    let mut all: std::collections::HashSet<SocketAddr> = services
        .iter()
        .flat_map(|s| s.candidates())
        .map(|(c, _)| c.addr)
        .collect();
    all.insert(addr);
    all.len()
}

/// The fast path's flags of a listed backend (see `sip_dispatch_common::affinity`):
/// its calls keep it unless the operator disabled it; it takes a retransmitted INVITE
/// while up; it keeps the INVITEs of its calls while it takes new ones (not drained,
/// not set to weight 0).
pub fn affinity_flags(health: &Health, weight_zero: bool) -> u32 {
    use sip_dispatch_common::{BF_AFFINITY, BF_NEW, BF_UP, health::State};
    if health.admin == Admin::Disabled {
        return 0;
    }
    let mut flags = BF_AFFINITY;
    if health.probed && health.state == State::Up {
        flags |= BF_UP;
    }
    if health.admin == Admin::Enabled && !weight_zero {
        flags |= BF_NEW;
    }
    flags
}

pub struct Controller {
    dp: Dataplane,
    key: HashKey,
    health_cfg: HealthConfig,
    services: Vec<Service>,
    backends: BTreeMap<SocketAddr, Known>,
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
}

impl Controller {
    pub fn new(
        dp: Dataplane,
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
        if k.health.record(&outcome, &self.health_cfg, Instant::now()) {
            self.flags_stale = true;
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

    /// Frees the ids of addresses no service lists any more, once no installed table
    /// references them (a table whose publish failed stays in force with its ids).
    fn release_unused_ids(&mut self) {
        let backends = &self.backends;
        for (addr, id) in self.dp.release_unlisted(|a| backends.contains_key(&a)) {
            log::debug!("backend {addr} gave up id {id}");
        }
    }

    fn candidates_with_health(&self, service: &Service) -> Vec<Candidate> {
        service
            .candidates()
            .into_iter()
            .map(|(c, _)| {
                let k = self.backends.get(&c.addr);
                Candidate {
                    healthy: k.is_some_and(|k| k.health.takes_traffic()),
                    weight: k.and_then(|k| k.weight_override).unwrap_or(c.weight),
                    ..c
                }
            })
            .collect()
    }

    /// Starts a build of a new table for every service whose selection changed (since the
    /// table in force, or the newest one being built). Tables are installed as their
    /// builds come back ([`Controller::on_built`]).
    pub fn republish(&mut self) {
        for i in 0..self.services.len() {
            self.republish_service(i);
        }
    }

    fn republish_service(&mut self, i: usize) {
        let selection = select(&self.candidates_with_health(&self.services[i]));
        let service = &self.services[i];
        let latest = match &service.requested {
            Some((_, requested)) => Some(requested),
            None => service.published.as_ref(),
        };
        if latest == Some(&selection) {
            return;
        }
        let seq = self.builds.request(i, selection.clone());
        self.services[i].requested = Some((seq, selection));
    }

    /// Publishes every service's table now, waiting for the builds (at start).
    pub async fn publish_all(&mut self) {
        self.republish();
        while !self.builds.idle() {
            let built = self.builds.finished().await;
            self.on_built(built);
        }
    }

    /// A build came back: install its table (an older one never comes after a newer one),
    /// then free the ids no table needs and answer the commands waiting for it.
    ///
    /// A build that lists a backend the service removed meanwhile is not installed while
    /// a newer build for the service is on its way: that backend would get traffic (and
    /// possibly a fresh id) again for one build time. Its request does not count as back,
    /// so the replies waiting for it wait for the newer table, which has their change
    /// too. Only such builds are skipped: skipping every superseded build would install
    /// nothing while backends flap faster than a build takes.
    fn on_built(&mut self, built: Built) {
        let Built {
            service: i,
            seq,
            selection,
            table,
            took,
        } = built;
        let Some(service) = self.services.get_mut(i) else {
            return;
        };
        if self.builds.newer_pending(i, seq)
            && let Some(gone) = service.unlisted_member(&selection)
        {
            log::debug!(
                "table {}: build {seq} skipped, it lists {gone}, removed since; a newer build follows",
                service.vip
            );
            return;
        }
        service.built_seq = service.built_seq.max(seq);
        if service.requested.as_ref().is_some_and(|(r, _)| *r == seq) {
            service.requested = None;
        }
        let vip = service.vip;
        let installed = table.and_then(|table| self.install(i, table));
        match installed {
            // The old table stays in force; the next change tries again.
            Err(e) => log::error!("table {vip}: {e:#}"),
            Ok(()) => self.published(i, selection, took),
        }
        self.release_unused_ids();
        self.answer_waiting();
    }

    fn published(&mut self, i: usize, selection: Selection, took: std::time::Duration) {
        let vip = self.services[i].vip;
        self.services[i].generation += 1;
        log::debug!("table {vip} built in {took:?}");
        let weights: HashMap<SocketAddr, u32> = self
            .candidates_with_health(&self.services[i])
            .iter()
            .map(|c| (c.addr, c.weight))
            .collect();
        let list: Vec<String> = selection
            .members
            .iter()
            .map(|(a, _)| format!("{a}/{}", weights.get(a).copied().unwrap_or(0)))
            .collect();
        let service = &mut self.services[i];
        log::info!(
            "table {vip} generation={} priority={} backends={}",
            service.generation,
            selection
                .priority
                .map_or("none".to_string(), |p| p.to_string()),
            list.join(",")
        );
        service.published = Some(selection);
    }

    /// Swaps a built table in. Ids are allocated for its members only: a service whose
    /// table fits keeps failing over however many ids other services need. A backend
    /// keeps its id (and its counters) for as long as it is listed.
    fn install(&mut self, i: usize, table: SlotTable) -> anyhow::Result<()> {
        // New members get their ids and flags before a table sends calls to them.
        for m in &table.members {
            self.dp.backend_id(m.backend.to_socket_addr())?;
        }
        self.sync_flags();
        let service = &self.services[i];
        let members = self.dp.install_service(service.id, service.vip, &table)?;
        let ids = members.iter().map(|(id, _, _)| *id).collect();
        service
            .tables
            .send_replace(Some(Arc::new(slowpath::InstalledTable { table, ids })));
        Ok(())
    }

    /// Tells the fast path what each backend id's state means for call affinity (the
    /// map is written only where it changes). Runs after the events that change a
    /// state (`flags_stale`), not after every event: with hundreds of backends probed
    /// every second, a pass per probe answer would be most of the event loop's time.
    fn sync_flags(&mut self) {
        self.flags_stale = false;
        for (addr, id) in self.dp.backend_ids() {
            let flags = self.backends.get(&addr).map_or(0, |k| {
                affinity_flags(&k.health, k.weight_override == Some(0))
            });
            if let Err(e) = self.dp.set_backend_flags(id, flags) {
                log::warn!("backend {addr}: {e:#}");
            }
        }
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
                    match self.reload().map(|r| self.saved(Reply::Reload(r))) {
                        Ok(done) => log::info!(
                            "reload (SIGHUP): {}",
                            serde_json::to_string(&done).unwrap_or_default()
                        ),
                        Err(e) => log::error!("reload (SIGHUP): {e:#}"),
                    }
                }
                built = self.builds.finished() => self.on_built(built),
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
        self.dp.retain_services(&vips)?;
        self.release_unused_ids();
        Ok(())
    }

    /// Takes the operator's state read from `path` at start (before the first tables):
    /// removes what it removed, adds what it added (with the rules of `backends add`; a
    /// bad entry is skipped with a warning), and sets states and weights of the
    /// addresses listed, the others when they appear. Changes are written back there.
    pub fn restore(&mut self, path: std::path::PathBuf, saved: OperatorState) {
        let file = path.display().to_string();
        for r in saved.removed {
            let Some(s) = self.services.iter_mut().find(|s| s.vip == r.service) else {
                log::warn!(
                    "state file {file}: removal of {} skipped: no service {}",
                    r.address,
                    r.service
                );
                continue;
            };
            let before = s.statics.len();
            s.statics.retain(|c| c.addr != r.address);
            if s.statics.len() == before {
                log::info!(
                    "state file {file}: removal of {} from {} dropped: the configuration no longer lists it",
                    r.address,
                    r.service
                );
            } else {
                log::info!(
                    "backend {} removed from {} (state file)",
                    r.address,
                    r.service
                );
                s.removed.insert(r.address);
            }
        }
        for a in saved.added {
            let checked = self.service_index(Some(a.service)).and_then(|i| {
                let priority = u16::try_from(a.priority)
                    .map_err(|_| anyhow::anyhow!("priority {} is above 65535", a.priority))?;
                self.check_add(i, a.address, a.weight)?;
                Ok((i, priority))
            });
            match checked {
                Ok((i, priority)) => {
                    log::info!("backend {} added to {} (state file)", a.address, a.service);
                    self.services[i].statics.push(Candidate {
                        addr: a.address,
                        priority,
                        weight: a.weight,
                        sharing: 1,
                        healthy: true,
                    });
                    self.services[i].cli_added.insert(a.address);
                }
                Err(e) => log::warn!(
                    "state file {file}: added backend {} of {} skipped: {e:#}",
                    a.address,
                    a.service
                ),
            }
        }
        self.pending = state::Pending {
            admin: saved.admin,
            weights: saved
                .weights
                .into_iter()
                .filter(|(addr, w)| {
                    let ok = check_weight(*w).is_ok();
                    if !ok {
                        log::warn!("state file {file}: weight {w} of {addr} skipped: above 65535");
                    }
                    ok
                })
                .collect(),
        };
        self.state_file = Some(path);
        for (addr, k) in self.backends.iter_mut() {
            k.take_pending(*addr, &mut self.pending);
        }
        self.sync_backends();
    }

    /// The operator's state as the state file keeps it.
    fn operator_state(&self) -> OperatorState {
        let mut st = OperatorState {
            admin: self.pending.admin.clone(),
            weights: self.pending.weights.clone(),
            ..OperatorState::default()
        };
        for (addr, k) in &self.backends {
            match k.health.admin {
                Admin::Drained => st.admin.insert(*addr, AdminSetting::Drained),
                Admin::Disabled => st.admin.insert(*addr, AdminSetting::Disabled),
                Admin::Enabled => st.admin.remove(addr),
            };
            if let Some(w) = k.weight_override {
                st.weights.insert(*addr, w);
            }
        }
        for s in &self.services {
            for c in s.statics.iter().filter(|c| s.cli_added.contains(&c.addr)) {
                st.added.push(state::Added {
                    service: s.vip,
                    address: c.addr,
                    weight: c.weight,
                    priority: u32::from(c.priority),
                });
            }
            for addr in &s.removed {
                st.removed.push(state::Removed {
                    service: s.vip,
                    address: *addr,
                });
            }
        }
        st
    }

    /// Writes the state file after a change, before its reply: a failure is logged and
    /// told in the reply (`warning`); the change itself stays applied.
    fn saved(&mut self, mut reply: Reply) -> Reply {
        let Some(path) = &self.state_file else {
            return reply;
        };
        if let Err(e) = state::write(path, &self.operator_state()) {
            let warning = format!("applied, but not saved (it is lost at restart): {e:#}");
            log::warn!("{warning}");
            reply.warn(warning);
        }
        reply
    }
}

#[cfg(test)]
mod backend_limit_tests {
    use std::{collections::BTreeSet, net::IpAddr, time::Duration};

    use super::{reload::backends_reconfigured, *};
    use crate::{
        backend_ids::{BackendIds, Full},
        cli::BackendSpec,
        config::ServiceSpec,
        srv::SrvTarget,
    };

    fn addr(i: u32) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000 + i)), 5060)
    }

    fn answer(first: u32, n: u32) -> SrvAnswer {
        let addrs: Vec<IpAddr> = (first..first + n).map(|i| addr(i).ip()).collect();
        SrvAnswer {
            targets: addrs
                .chunks(16)
                .enumerate()
                .map(|(i, a)| SrvTarget {
                    priority: 10,
                    weight: 1,
                    port: 5060,
                    target: format!("t{i}.example.net."),
                    addrs: a.to_vec(),
                })
                .collect(),
            ttl: Duration::from_secs(60),
            reported: Default::default(),
        }
    }

    fn statics(first: u32, n: u32) -> Vec<Candidate> {
        (first..first + n)
            .map(|i| Candidate {
                addr: addr(i),
                priority: 0,
                weight: 1,
                sharing: 1,
                healthy: true,
            })
            .collect()
    }

    /// [`statics`] as the configuration gives them.
    fn static_specs(first: u32, n: u32) -> Vec<BackendSpec> {
        statics(first, n)
            .iter()
            .map(|c| BackendSpec {
                addr: c.addr,
                weight: 1,
                priority: 0,
            })
            .collect()
    }

    fn vip(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 19, 0, n], 5060))
    }

    #[test]
    fn affinity_flags_follow_the_backend_states() {
        use crate::health::State;
        use sip_dispatch_common::{BF_AFFINITY as A, BF_NEW as N, BF_UP as U};
        let with = |state, admin| Health {
            admin,
            ..Health::new(state, "test")
        };
        let cases = [
            (with(State::Up, Admin::Enabled), false, A | U | N),
            (with(State::Up, Admin::Enabled), true, A | U),
            (with(State::Up, Admin::Drained), false, A | U),
            (with(State::Down, Admin::Enabled), false, A | N),
            (with(State::Down, Admin::Drained), false, A),
            (with(State::Up, Admin::Disabled), false, 0),
            (Health::unprobed(), false, A | N),
        ];
        for (health, weight_zero, want) in cases {
            assert_eq!(
                affinity_flags(&health, weight_zero),
                want,
                "{:?} {:?} weight 0: {weight_zero}",
                health.state,
                health.admin
            );
        }
    }

    #[test]
    fn the_limit_is_half_the_ids() {
        assert_eq!(MAX_BACKENDS_IN_ALL, 2048);
        assert_eq!(MAX_BACKENDS_IN_ALL * 2, MAX_BACKENDS as usize);
    }

    #[test]
    fn a_dns_answer_past_2048_backends_in_all_is_refused() {
        let a = Service::new(0, vip(1), statics(0, 1000), &[]);
        let b = Service::new(1, vip(2), vec![], &["b.".to_string()]);
        let services = vec![a, b];
        assert_eq!(backends_with(&services, "b.", &answer(1000, 1048)), 2048);
        assert!(backends_with(&services, "b.", &answer(1000, 1048)) <= MAX_BACKENDS_IN_ALL);
        assert_eq!(backends_with(&services, "b.", &answer(1000, 1049)), 2049);
        assert!(backends_with(&services, "b.", &answer(1000, 1049)) > MAX_BACKENDS_IN_ALL);
    }

    #[test]
    fn backends_add_counts_every_service_and_a_known_address_once() {
        let mut a = Service::new(0, vip(1), statics(0, 1000), &["a.".to_string()]);
        a.set_srv("a.", &answer(1000, 1000));
        let b = Service::new(1, vip(2), statics(2000, 48), &[]);
        let services = vec![a, b];
        // 2048 listed: an address already listed (by the other service) adds nothing.
        assert_eq!(backends_adding(&services, addr(5)), 2048);
        assert_eq!(backends_adding(&services, addr(1500)), 2048);
        // A new one would be backend 2049.
        assert_eq!(backends_adding(&services, addr(3000)), 2049);
        assert!(backends_adding(&services, addr(3000)) > MAX_BACKENDS_IN_ALL);
    }

    #[test]
    fn a_reload_counts_its_static_backends_with_the_kept_dns_answers() {
        let mut a = Service::new(0, vip(1), statics(0, 10), &["a.".to_string()]);
        a.set_srv("a.", &answer(1000, 2000));
        let b = Service::new(1, vip(2), statics(5000, 5), &[]);
        let services = vec![a, b];
        let spec = |vip, first, n, srv: &[&str]| ServiceSpec {
            vip,
            backends: static_specs(first, n),
            srv: srv.iter().map(|s| s.to_string()).collect(),
            forwarding: Default::default(),
        };
        // a keeps its SRV name (2000 from DNS) and gets 43 statics; b, not in the
        // reloaded set, keeps its 5.
        let next = [spec(vip(1), 3000, 43, &["a."])];
        assert_eq!(backends_reconfigured(&services, &next), 2048);
        let next = [spec(vip(1), 3000, 44, &["a."])];
        assert_eq!(backends_reconfigured(&services, &next), 2049);
        // Dropping the SRV name drops its answer from the count.
        let next = [spec(vip(1), 3000, 44, &[]), spec(vip(2), 0, 0, &[])];
        assert_eq!(backends_reconfigured(&services, &next), 44);
    }

    /// The brief's example: 3000 backends could be listed before, and an answer that
    /// replaced 1100 of them needed 4100 ids. Now at most 2048 are listed, and even a
    /// replacement of all of them gets ids while the old tables still hold theirs; the
    /// old ids are freed once the new tables are in.
    #[test]
    fn a_full_replacement_of_2048_backends_installs() {
        let limit = MAX_BACKENDS_IN_ALL as u32;
        let mut ids = BackendIds::new(MAX_BACKENDS);
        let mut first = 0;
        for round in 0..3 {
            // Two services share the backends half and half; their tables are installed.
            let listed: Vec<SocketAddr> = (first..first + limit).map(addr).collect();
            for (table, half) in listed.chunks(MAX_BACKENDS_IN_ALL / 2).enumerate() {
                let mut in_table = BTreeSet::new();
                for a in half {
                    let (id, _) = ids
                        .allocate(*a)
                        .unwrap_or_else(|e| panic!("round {round}, {a}: {e}"));
                    in_table.insert(id);
                }
                ids.table_installed(table as u32, in_table);
            }
            let now: BTreeSet<SocketAddr> = listed.iter().copied().collect();
            let freed = ids.release_unlisted(|a| now.contains(&a));
            let expect_freed = if round == 0 { 0 } else { MAX_BACKENDS_IN_ALL };
            assert_eq!(freed.len(), expect_freed, "round {round}");
            // The next round replaces every address.
            first += limit;
        }
    }

    /// One backend more than the limit, and replacing all of them runs out of ids.
    #[test]
    fn past_the_limit_a_full_replacement_would_run_out_of_ids() {
        let over = MAX_BACKENDS_IN_ALL as u32 + 1;
        let mut ids = BackendIds::new(MAX_BACKENDS);
        let old: BTreeSet<u32> = (0..over)
            .map(|i| ids.allocate(addr(i)).unwrap().0)
            .collect();
        ids.table_installed(0, old);
        let replaced: Vec<_> = (over..2 * over).map(|i| ids.allocate(addr(i))).collect();
        assert_eq!(replaced.last(), Some(&Err(Full(MAX_BACKENDS))));
    }

    /// `reload` semantics for the state file: the reloaded configuration's static
    /// backends replace those added with the CLI and bring back those removed with it,
    /// so neither is kept (nor written) any more.
    #[test]
    fn a_reload_replaces_cli_added_backends_and_brings_back_removed_ones() {
        let mut s = Service::new(0, vip(1), statics(0, 3), &[]);
        s.statics.retain(|c| c.addr != addr(1));
        s.removed.insert(addr(1));
        s.statics.extend(statics(7, 1));
        s.cli_added.insert(addr(7));
        let spec = ServiceSpec {
            vip: vip(1),
            backends: static_specs(0, 3),
            srv: vec![],
            forwarding: Default::default(),
        };
        let changes = s.reconfigure(&spec);
        let listed: Vec<SocketAddr> = s.candidates().into_iter().map(|(c, _)| c.addr).collect();
        assert_eq!(listed, [addr(0), addr(1), addr(2)]);
        assert!(s.cli_added.is_empty() && s.removed.is_empty());
        assert_eq!(changes.len(), 2, "{changes:?}");
    }

    /// The state file's settings of an address no service listed at start (an SRV
    /// backend not resolved yet) apply when it appears, once.
    #[test]
    fn pending_state_applies_when_the_address_appears() {
        let mut pending = state::Pending {
            admin: [
                (addr(1), AdminSetting::Drained),
                (addr(2), AdminSetting::Disabled),
            ]
            .into(),
            weights: [(addr(1), 3)].into(),
        };
        let k = Known::appearing(addr(1), &mut pending);
        assert_eq!(k.health.admin, Admin::Drained);
        assert_eq!(k.weight_override, Some(3));
        assert!(!k.health.takes_traffic());
        let k = Known::appearing(addr(2), &mut pending);
        assert_eq!(k.health.display_state(), "disabled");
        assert_eq!(k.weight_override, None);
        // Applied once: the next appearance of addr(1) is a plain new backend.
        let k = Known::appearing(addr(1), &mut pending);
        assert_eq!((k.health.admin, k.weight_override), (Admin::Enabled, None));
        assert_eq!(pending, state::Pending::default());
    }

    #[test]
    fn a_build_listing_a_removed_backend_is_known_as_such() {
        let mut s = Service::new(0, vip(1), statics(0, 3), &[]);
        let built = Selection {
            priority: Some(0),
            members: vec![(addr(0), 1), (addr(1), 1), (addr(2), 1)],
        };
        assert_eq!(s.unlisted_member(&built), None);
        s.statics.retain(|c| c.addr != addr(1));
        assert_eq!(s.unlisted_member(&built), Some(addr(1)));
    }

    #[test]
    fn backends_in_all_counts_every_service_and_shared_addresses_once() {
        let vip_a: SocketAddr = "198.18.0.100:5060".parse().unwrap();
        let vip_b: SocketAddr = "198.18.0.101:5060".parse().unwrap();
        let mut a = Service::new(0, vip_a, vec![], &["a.".to_string()]);
        let b = Service::new(1, vip_b, vec![], &["b.".to_string()]);
        a.set_srv("a.", &answer(1000, 2000));
        let mut services = vec![a, b];
        // b's answer overlaps a's by 1000 addresses: counted once.
        assert_eq!(backends_with(&services, "b.", &answer(2000, 2000)), 3000);
        // 2000 + 2097 new ones pass MAX_BACKENDS.
        let big = answer(4000, 2097);
        assert!(backends_with(&services, "b.", &big) > MAX_BACKENDS as usize);
        // Replacing a's own answer does not count its old set.
        assert_eq!(backends_with(&services, "a.", &big), 2097);
        services[1].set_srv("b.", &answer(3000, 100));
        assert_eq!(backends_with(&services, "a.", &answer(0, 0)), 100);
    }
}
