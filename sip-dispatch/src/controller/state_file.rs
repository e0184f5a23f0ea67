//! The state file: the operator's changes (admin states, weights, backends added and
//! removed) taken back at start ([`Controller::restore`]) and written after each change.
use super::Controller;
use crate::{
    health::Admin,
    protocol::{MAX_WEIGHT, Reply},
    select::Candidate,
    state::{self, AdminSetting, OperatorState},
};

impl Controller {
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
                        latency_percent: 100,
                        overload_percent: 0,
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
                    let ok = *w <= MAX_WEIGHT;
                    if !ok {
                        log::warn!(
                            "state file {file}: weight {w} of {addr} skipped: above {MAX_WEIGHT}"
                        );
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
    pub(super) fn operator_state(&self) -> OperatorState {
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
    pub(super) fn saved(&mut self, mut reply: Reply) -> Reply {
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
