//! The controller's side of the control socket: carrying out requests, answering them
//! once the tables they caused are in force, and the views (`backends list`, `stats`,
//! `which`) the replies show.
use std::{collections::HashMap, net::SocketAddr};

use anyhow::{Context as _, bail};
use tokio::task::JoinHandle;

use super::{Controller, Known, MAX_BACKENDS_IN_ALL, SOURCE_STATIC, backends_adding};
use crate::{
    control,
    health::{Admin, Health},
    protocol::{
        Added, AdminChanged, AffinityView, Answer, BackendState, BackendView, BackendsList,
        Removed, Reply, Request, ServiceView, WeightSet, WhichReply, check_weight,
    },
    select::Candidate,
    slowpath, state,
    stats::BackendInfo,
};

/// Longest Call-ID `which` takes: longer than any Call-ID of a real call (a SIP message
/// over UDP is rarely above 8 KiB), short enough to hash at once.
const MAX_WHICH_CALL_ID: usize = 8192;

/// A reply sent once every service `(index, request number)` names has its build back.
pub(super) struct WaitingReply {
    builds: Vec<(usize, u64)>,
    answer: Deferred,
    reply: tokio::sync::oneshot::Sender<Answer>,
}

/// The answer a waiting reply gets.
enum Deferred {
    Ready(Answer),
    /// `backends list`, made when sent (its shares come from the tables in force).
    BackendsList,
}

/// A request's result as the control socket tells it.
fn answer_of(result: anyhow::Result<Reply>) -> Answer {
    result.map_err(|e| format!("{e:#}"))
}

impl Controller {
    /// Sends the replies whose tables are all back.
    pub(super) fn answer_waiting(&mut self) {
        let services = &self.services;
        let (ready, waiting): (Vec<WaitingReply>, Vec<WaitingReply>) =
            std::mem::take(&mut self.waiting)
                .into_iter()
                .partition(|w| {
                    w.builds
                        .iter()
                        .all(|(i, seq)| services.get(*i).is_none_or(|s| s.built_seq >= *seq))
                });
        self.waiting = waiting;
        for w in ready {
            let _ = w.reply.send(self.answer(w.answer));
        }
    }

    fn answer(&self, answer: Deferred) -> Answer {
        match answer {
            Deferred::Ready(r) => r,
            Deferred::BackendsList => answer_of(self.backends_list().map(Reply::BackendsList)),
        }
    }

    /// Answers a request. `backends list` shows held calls, so it first waits for a
    /// census unless the last one is under a second old; `stats` (hence the metrics)
    /// starts one then but answers with the occupancy it has.
    pub(super) fn command(
        &mut self,
        request: Request,
        reply: tokio::sync::oneshot::Sender<Answer>,
    ) {
        use Request::{BackendsList, Stats};
        let counts = matches!(request, BackendsList | Stats) && self.dp.affinity().on;
        if !counts || self.censuses.fresh() {
            return self.command_now(request, reply);
        }
        if !self.censuses.running() {
            match self.start_census() {
                Ok(census) => self.censuses.start(census),
                Err(e) => {
                    log::warn!("affinity census: {e:#}");
                    return self.command_now(request, reply);
                }
            }
        }
        // `stats` (and the metrics) answer at once with the last occupancy and leave the
        // census to refresh it; `backends list` waits for the calls each backend holds.
        if matches!(request, Stats) {
            return self.command_now(request, reply);
        }
        self.censuses.wait((request, reply));
    }

    /// Starts a census of held calls on the blocking pool.
    fn start_census(
        &mut self,
    ) -> anyhow::Result<JoinHandle<anyhow::Result<crate::census::Census>>> {
        let runner = self.dp.census_runner()?;
        let ids: Vec<u32> = self.ids.assigned().map(|(_, id)| id).collect();
        let idle = self.call_idle;
        Ok(tokio::task::spawn_blocking(move || runner.run(&ids, idle)))
    }

    /// Answers the requests that waited for a census; those that a change of state made
    /// it too old for wait for the next one.
    pub(super) fn census_done(&mut self, waiting: Vec<control::Command>, ok: bool) {
        for (request, reply) in waiting {
            if ok && !self.censuses.current() {
                self.command(request, reply);
            } else {
                self.command_now(request, reply);
            }
        }
    }

    /// Carries out a control request and answers it: `stats` and `which` at once;
    /// changes once the tables they caused are in force, and `backends list` once the
    /// tables being built are (so that its shares match its states).
    fn command_now(&mut self, request: Request, reply: tokio::sync::oneshot::Sender<Answer>) {
        use Request::{BackendsList, Stats, Which};
        let answer = match request {
            Stats | Which { .. } => {
                let _ = reply.send(answer_of(self.handle(request)));
                return;
            }
            BackendsList => Deferred::BackendsList,
            change => {
                let result = self.handle(change).map(|r| self.saved(r));
                Deferred::Ready(answer_of(result))
            }
        };
        let builds: Vec<(usize, u64)> = self
            .services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.requested.as_ref().map(|(seq, _)| (i, *seq)))
            .collect();
        let failed = matches!(&answer, Deferred::Ready(Err(_)));
        if builds.is_empty() || failed {
            let _ = reply.send(self.answer(answer));
            return;
        }
        self.waiting.push(WaitingReply {
            builds,
            answer,
            reply,
        });
    }

    /// Carries out one control request.
    fn handle(&mut self, request: Request) -> anyhow::Result<Reply> {
        use Request::*;
        if !matches!(request, BackendsList | Stats | Which { .. }) {
            self.flags_stale = true;
        }
        match request {
            BackendsList => self.backends_list().map(Reply::BackendsList),
            Stats => Ok(Reply::Stats(Box::new(self.snapshot()?))),
            Which { call_id, service } => {
                if call_id.len() > MAX_WHICH_CALL_ID {
                    bail!(
                        "Call-ID of {} bytes: at most {MAX_WHICH_CALL_ID}",
                        call_id.len()
                    );
                }
                self.which(&call_id, service).map(Reply::Which)
            }
            Reload => self.reload().map(Reply::Reload),
            BackendAdd {
                address,
                weight,
                priority,
                service,
            } => {
                let i = self.service_index(service)?;
                let vip = self.services[i].vip;
                self.check_add(i, address, weight)?;
                self.services[i].statics.push(Candidate {
                    addr: address,
                    priority,
                    weight,
                    sharing: 1,
                    healthy: true,
                    latency_percent: 100,
                    overload_percent: 0,
                });
                self.services[i].cli_added.insert(address);
                self.changed_backends();
                Ok(Reply::Added(Added {
                    added: address,
                    service: vip,
                    warning: None,
                }))
            }
            BackendRemove { address } => {
                self.known(address)?;
                let mut removed = false;
                for s in &mut self.services {
                    let before = s.statics.len();
                    s.statics.retain(|c| c.addr != address);
                    if s.statics.len() != before {
                        removed = true;
                        if !s.cli_added.remove(&address) {
                            s.removed.insert(address);
                        }
                    }
                }
                if !removed {
                    bail!("backend {address} comes from DNS SRV: change the zone, or disable it");
                }
                self.censuses.invalidate();
                self.changed_backends();
                Ok(Reply::Removed(Removed {
                    removed: address,
                    warning: None,
                }))
            }
            BackendAdmin { address, admin } => {
                let admin = admin.admin();
                self.known(address)?;
                self.censuses.invalidate();
                let k = self.known_mut(address)?;
                if k.health.admin == Admin::Disabled && admin != Admin::Disabled {
                    // Back in service: its first probe decides again.
                    k.health = Health::unprobed();
                }
                k.health.admin = admin;
                k.health.reason = "set by the operator".into();
                let state = BackendState::of(&k.health);
                log::info!("backend {address} state={state} reason=\"set by the operator\"");
                self.sync_probers();
                self.republish();
                Ok(Reply::AdminChanged(AdminChanged {
                    address,
                    state,
                    warning: None,
                }))
            }
            BackendWeight { address, weight } => {
                check_weight(weight)?;
                self.known_mut(address)?.weight_override = Some(weight);
                self.republish();
                Ok(Reply::WeightSet(WeightSet {
                    address,
                    weight,
                    warning: None,
                }))
            }
        }
    }

    /// Whether `address` may be added to service `i` with `weight`: the rules of
    /// `backends add`, also applied to the backends the state file adds.
    pub(super) fn check_add(
        &self,
        i: usize,
        address: SocketAddr,
        weight: u32,
    ) -> anyhow::Result<()> {
        let vip = self.services[i].vip;
        if address.port() == 0 {
            bail!("backend {address}: port 0");
        }
        let local = crate::addrs::local_addresses().context("listing this host's addresses")?;
        crate::addrs::check_backend(address.ip(), &local).map_err(anyhow::Error::msg)?;
        if address.is_ipv6() != vip.is_ipv6() {
            bail!("backend {address} and VIP {vip} are of different address families");
        }
        if self.services.iter().any(|s| s.vip == address) {
            bail!("backend {address} is a VIP of this dispatcher (a forwarding loop)");
        }
        if self.services[i]
            .candidates()
            .iter()
            .any(|(c, _)| c.addr == address)
        {
            bail!("backend {address} is already configured for {vip}");
        }
        check_weight(weight)?;
        let total = backends_adding(&self.services, address);
        if total > MAX_BACKENDS_IN_ALL {
            bail!(
                "backend {address}: {total} backends in all services, at most \
                 {MAX_BACKENDS_IN_ALL}"
            );
        }
        Ok(())
    }

    /// The service a command names, or the only one.
    pub(super) fn service_index(&self, vip: Option<SocketAddr>) -> anyhow::Result<usize> {
        match vip {
            Some(v) => self
                .services
                .iter()
                .position(|s| s.vip == v)
                .with_context(|| {
                    let all: Vec<String> =
                        self.services.iter().map(|s| s.vip.to_string()).collect();
                    format!(
                        "unknown service {v} (this daemon serves {})",
                        all.join(", ")
                    )
                }),
            None if self.services.len() == 1 => Ok(0),
            None => bail!("this daemon serves several services: name one with --service VIP:PORT"),
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

    /// Which backend a Call-ID value goes to now.
    fn which(&self, call_id: &str, service: Option<SocketAddr>) -> anyhow::Result<WhichReply> {
        let service = &self.services[self.service_index(service)?];
        let hash = sip_dispatch_common::hash::call_id_hash(self.key, call_id.trim().as_bytes());
        let backend = service.table().and_then(|t| {
            t.table
                .member_for_hash(hash)
                .map(|m| m.backend.to_socket_addr())
        });
        Ok(WhichReply {
            call_id: call_id.to_string(),
            service: service.vip,
            slot: sip_dispatch_common::slot_of(hash),
            backend,
            affinity: self.affinity_view(service.id, hash)?,
        })
    }

    /// `which`: the call's affinity entry, if the map has one.
    fn affinity_view(&self, service: u32, hash: u64) -> anyhow::Result<Option<AffinityView>> {
        use sip_dispatch_common::{AFF_BYE, AFF_CANCEL, AffinityKey, BF_AFFINITY};
        let key = AffinityKey {
            hash,
            service,
            _zero: 0,
        };
        let Some(e) = self.dp.affinity_entry(&key)? else {
            return Ok(None);
        };
        let backend = self
            .ids
            .assigned()
            .find(|(_, id)| *id == e.backend)
            .map(|(addr, _)| addr);
        let flags = self.dp.backend_flags(e.backend);
        let idle = slowpath::monotonic_ns().saturating_sub(e.last_seen_ns);
        Ok(Some(AffinityView {
            backend,
            valid: backend.is_some()
                && flags.generation == e.generation
                && flags.flags & BF_AFFINITY != 0,
            idle_s: idle / 1_000_000_000,
            bye_seen: e.flags & AFF_BYE != 0,
            cancel_seen: e.flags & AFF_CANCEL != 0,
        }))
    }

    /// `backends list`: every backend of every service, with its share of the slots.
    fn backends_list(&self) -> anyhow::Result<BackendsList> {
        let snap = self.snapshot()?;
        let services = self
            .services
            .iter()
            .map(|s| {
                let shares: HashMap<SocketAddr, f64> = s
                    .table()
                    .map(|t| {
                        t.table
                            .members
                            .iter()
                            .zip(t.table.shares())
                            .map(|(m, x)| (m.backend.to_socket_addr(), x))
                            .collect()
                    })
                    .unwrap_or_default();
                let backends = snap
                    .backends
                    .iter()
                    .filter(|b| b.service == s.vip)
                    .map(|b| BackendView {
                        backend: b.clone(),
                        share: shares.get(&b.address).copied().unwrap_or(0.0),
                    })
                    .collect();
                ServiceView {
                    vip: s.vip,
                    forwarding: s.forwarding.name().to_string(),
                    generation: s.generation,
                    priority: s.published.as_ref().and_then(|p| p.priority),
                    backends,
                }
            })
            .collect();
        Ok(BackendsList { services })
    }

    /// What the stats and the exit line show of each backend, per service.
    pub fn backend_infos(&self) -> Vec<BackendInfo> {
        let mut out = Vec::new();
        for s in &self.services {
            let effective = self.candidates_with_health(s);
            // What the table gives each for new calls (as the next build would).
            let selection = crate::select::select(&effective);
            for ((c, source), eff) in s.candidates().into_iter().zip(effective) {
                let Some(k) = self.backends.get(&c.addr) else {
                    continue;
                };
                out.push(BackendInfo {
                    id: self.ids.get(c.addr),
                    service: s.vip,
                    address: c.addr,
                    weight: eff.weight,
                    priority: c.priority,
                    added_by: state::added_by(s.cli_added.contains(&c.addr)),
                    weight_from: state::weight_from(
                        k.weight_override.is_some() || s.cli_added.contains(&c.addr),
                        source != SOURCE_STATIC,
                    ),
                    state_from: state::state_from(k.health.admin != Admin::Enabled),
                    source,
                    state: BackendState::of(&k.health),
                    reason: k.health.reason.clone(),
                    rtt: k.health.srtt,
                    last_code: k.health.last_code,
                    last_rtt: k.health.last_rtt,
                    consecutive_failures: k.health.consecutive_failures,
                    last_change: k
                        .health
                        .last_change
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    checks: k.health.checks,
                    check_failures: k.health.check_failures,
                    calls: self.calls_held(c.addr),
                    load: self.load_view(k, selection.effective_weight(c.addr)),
                });
            }
        }
        out
    }

    /// Counters and backend states, as the exit line and the stats show them.
    pub fn snapshot(&self) -> anyhow::Result<crate::protocol::Snapshot> {
        let mut s = crate::stats::snapshot(
            &self.dp,
            &self.backend_infos(),
            self.dns_failures,
            self.reloads,
            &self.slow_path,
        )?;
        let affinity = self.dp.affinity();
        if affinity.on {
            s.affinity_entries = self.censuses.last().map_or(0, |c| c.entries);
            s.affinity_capacity = affinity.entries.into();
        }
        s.tables = self
            .services
            .iter()
            .map(|service| crate::protocol::TableSnapshot {
                service: service.vip,
                generation: service.generation,
                publish_failures: service.publish_failures,
                last_publish_failed: service.last_publish_failed,
            })
            .collect();
        Ok(s)
    }

    /// The calls the last census saw `addr` hold (None with affinity off, before the
    /// first census, or when the last one is older than the last change).
    fn calls_held(&self, addr: SocketAddr) -> Option<u64> {
        if !self.dp.affinity().on {
            return None;
        }
        // Only a census started after the last change counts: an older one (or none, when
        // the last one failed) would show calls the drain or enable since has changed.
        if !self.censuses.current() {
            return None;
        }
        let census = self.censuses.last()?;
        let id = self.ids.get(addr);
        Some(id.and_then(|id| census.held.get(&id).copied()).unwrap_or(0))
    }
}
