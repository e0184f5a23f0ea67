//! A service and the backends it lists (static and from DNS), what the controller
//! knows of each backend address, and the limit on backends in all.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
};

use sip_dispatch_common::MAX_BACKENDS;
use tokio::sync::watch;

use crate::{
    health::{Admin, Health},
    protocol::BackendState,
    select::{Candidate, Selection},
    slowpath,
    srv::SrvAnswer,
    state::{self, AdminSetting},
};

/// Where a backend came from.
pub const SOURCE_STATIC: &str = "static";

/// A service (VIP:port) with its backends and the table in force.
pub struct Service {
    pub id: u32,
    pub vip: SocketAddr,
    pub statics: Vec<Candidate>,
    /// The last good answer of each of this service's SRV names (empty until the first).
    pub srv: BTreeMap<String, Vec<Candidate>>,
    pub(super) published: Option<Selection>,
    /// The newest selection sent to be built and not back yet (its request number).
    pub(super) requested: Option<(u64, Selection)>,
    /// The request number of the last build that came back (installed or failed).
    pub(super) built_seq: u64,
    pub(super) generation: u64,
    /// Tables that could not be built or swapped in, and whether the last one was such.
    pub(super) publish_failures: u64,
    pub(super) last_publish_failed: bool,
    /// The slow path reads the table in force from here.
    pub(super) tables: watch::Sender<Option<Arc<slowpath::InstalledTable>>>,
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
            publish_failures: 0,
            last_publish_failed: false,
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
    pub(super) fn srv_candidates(&self, answer: &SrvAnswer) -> Vec<Candidate> {
        let mut cands = answer.candidates(self.vip.is_ipv6());
        cands.retain(|c| c.addr != self.vip);
        cands
    }

    /// Static backends first, then SRV ones; an address listed twice keeps its first
    /// appearance.
    pub(super) fn candidates(&self) -> Vec<(Candidate, String)> {
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
    pub(super) fn unlisted_member(&self, selection: &Selection) -> Option<SocketAddr> {
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

    pub(super) fn table(&self) -> Option<Arc<slowpath::InstalledTable>> {
        self.tables.borrow().clone()
    }
}

pub(super) struct Known {
    pub(super) health: Health,
    /// What its probe answers say of its load (see `controller::load`).
    pub(super) load: super::load::BackendLoad,
    /// `set-weight` from the operator, kept across DNS updates.
    pub(super) weight_override: Option<u32>,
}

impl Known {
    /// A backend that some service lists now, with what the state file kept for it.
    pub(super) fn appearing(addr: SocketAddr, pending: &mut state::Pending) -> Known {
        let mut known = Known {
            health: Health::unprobed(),
            load: Default::default(),
            weight_override: None,
        };
        known.take_pending(addr, pending);
        known
    }

    /// Takes what the state file kept for `addr`, if anything.
    pub(super) fn take_pending(&mut self, addr: SocketAddr, pending: &mut state::Pending) {
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
