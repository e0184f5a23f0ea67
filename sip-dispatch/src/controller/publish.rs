//! Table publishing: a new selection per service goes to be built off the event loop,
//! and a build that comes back is installed (ids and flags of its members first); the
//! ids no installed table needs are freed after.
use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use sip_dispatch_common::table::SlotTable;

use super::{Controller, Service, affinity_flags};
use crate::{
    select::{Candidate, Selection, select},
    slowpath,
    table_builds::Built,
};

impl Controller {
    /// Frees the ids of addresses no service lists any more, once no installed table
    /// references them (a table whose publish failed stays in force with its ids).
    pub(super) fn release_unused_ids(&mut self) {
        let backends = &self.backends;
        for (addr, id) in self
            .dp
            .release_unlisted(&mut self.ids, |a| backends.contains_key(&a))
        {
            log::debug!("backend {addr} gave up id {id}");
        }
    }

    pub(super) fn candidates_with_health(&self, service: &Service) -> Vec<Candidate> {
        service
            .candidates()
            .into_iter()
            .map(|(c, _)| {
                let k = self.backends.get(&c.addr);
                Candidate {
                    healthy: k.is_some_and(|k| k.health.takes_traffic()),
                    overload_percent: k.map_or(0, |k| u32::from(self.load_factors(k).0)),
                    latency_percent: k.map_or(100, |k| u32::from(self.load_factors(k).1)),
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

    pub(super) fn republish_service(&mut self, i: usize) {
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
    pub(super) fn on_built(&mut self, built: Built) {
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
            Err(e) => {
                log::error!("table {vip}: {e:#}");
                let service = &mut self.services[i];
                service.publish_failures += 1;
                service.last_publish_failed = true;
            }
            Ok(()) => {
                self.services[i].last_publish_failed = false;
                self.published(i, selection, took);
            }
        }
        self.release_unused_ids();
        self.answer_waiting();
    }

    pub(super) fn published(&mut self, i: usize, selection: Selection, took: std::time::Duration) {
        let vip = self.services[i].vip;
        self.services[i].generation += 1;
        log::debug!("table {vip} built in {took:?}");
        let candidates = self.candidates_with_health(&self.services[i]);
        let weights: HashMap<SocketAddr, u32> =
            candidates.iter().map(|c| (c.addr, c.weight)).collect();
        // What the table would give each without load: a weight the load changed shows
        // the percentage of that it gets.
        let unloaded = select(
            &candidates
                .iter()
                .map(|c| Candidate {
                    overload_percent: 0,
                    latency_percent: 100,
                    ..*c
                })
                .collect::<Vec<_>>(),
        );
        let list: Vec<String> = selection
            .members
            .iter()
            .map(|(a, _)| {
                let w = weights.get(a).copied().unwrap_or(0);
                let normal = unloaded.effective_weight(*a);
                let percent = (selection.effective_weight(*a) * 100.0 / normal).round();
                if normal <= 0.0 || (percent - 100.0).abs() < 1.0 {
                    format!("{a}/{w}")
                } else {
                    format!("{a}/{w}@{percent}%")
                }
            })
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
    pub(super) fn install(&mut self, i: usize, table: SlotTable) -> anyhow::Result<()> {
        // New members get their ids and flags before a table sends calls to them.
        let mut ids = Vec::with_capacity(table.members.len());
        for m in &table.members {
            ids.push(
                self.dp
                    .backend_id(&mut self.ids, m.backend.to_socket_addr())?,
            );
        }
        self.sync_flags();
        let service = &self.services[i];
        let slots = crate::dataplane::slot_ids(&table, &ids);
        let key = sip_dispatch_common::ServiceKey::from_socket_addr(service.vip);
        self.dp
            .publish_table(&mut self.ids, service.id, key, &slots)?;
        service
            .tables
            .send_replace(Some(Arc::new(slowpath::InstalledTable { table, ids })));
        Ok(())
    }

    /// Tells the fast path what each backend id's state means for call affinity (the
    /// map is written only where it changes). Runs after the events that change a
    /// state (`flags_stale`), not after every event: with hundreds of backends probed
    /// every second, a pass per probe answer would be most of the event loop's time.
    pub(super) fn sync_flags(&mut self) {
        self.flags_stale = false;
        let assigned: Vec<(SocketAddr, u32)> = self.ids.assigned().collect();
        for (addr, id) in assigned {
            let flags = self.backends.get(&addr).map_or(0, |k| {
                affinity_flags(
                    &k.health,
                    k.weight_override == Some(0) || self.load_factors(k).0 >= 100,
                )
            });
            if let Err(e) = self.dp.set_backend_flags(&mut self.ids, id, flags) {
                log::warn!("backend {addr}: {e:#}");
            }
        }
    }
}
