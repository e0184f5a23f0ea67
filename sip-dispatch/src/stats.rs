//! Counter snapshots: what the controller knows of each backend, joined with the
//! kernel's and the slow path's counters into a [`Snapshot`].
use std::{net::SocketAddr, time::Duration};

use crate::{
    dataplane::Dataplane,
    protocol::{BackendSnapshot, BackendState, FastPathCounters, Reloads, Snapshot},
};

/// What the controller knows of a backend.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    pub id: Option<u32>,
    /// The service (VIP:port) this entry is about.
    pub service: SocketAddr,
    pub address: SocketAddr,
    pub weight: u32,
    pub priority: u16,
    /// `static`, or the SRV name it came from.
    pub source: String,
    /// `config` or `cli` (`backends add`).
    pub added_by: &'static str,
    /// `config`, `dns` or `cli` (`set-weight`).
    pub weight_from: &'static str,
    /// `health`, or `cli` (drained or disabled by the operator).
    pub state_from: &'static str,
    pub state: BackendState,
    pub reason: String,
    /// Smoothed health-check round trip.
    pub rtt: Option<Duration>,
    /// Status code and round trip of the last health check (None: no final response).
    pub last_code: Option<u16>,
    pub last_rtt: Option<Duration>,
    pub consecutive_failures: u32,
    /// Seconds since the Unix epoch of the last state change.
    pub last_change: u64,
    pub checks: u64,
    pub check_failures: u64,
    /// Calls it holds as far as the dispatcher can tell (the census); None with
    /// `--affinity off` or before the first census.
    pub calls: Option<u64>,
    pub load: crate::protocol::LoadView,
}

pub fn snapshot(
    dp: &Dataplane,
    backends: &[BackendInfo],
    dns_failures: u64,
    reloads: Reloads,
    slow_path: &crate::slowpath::Counters,
) -> anyhow::Result<Snapshot> {
    let counters = FastPathCounters(
        dp.counters()?
            .into_iter()
            .map(|(c, v)| (c.name().to_string(), v))
            .collect(),
    );
    let per_backend = backends
        .iter()
        .map(|b| {
            let s = match b.id {
                Some(id) => dp.backend_stats(id)?,
                None => Default::default(),
            };
            // What the slow path forwarded counts too: one backend, one set of numbers.
            let slow = slow_path.forwarded_to(b.address);
            Ok(BackendSnapshot {
                service: b.service,
                address: b.address,
                weight: b.weight,
                priority: b.priority,
                source: b.source.clone(),
                added_by: b.added_by.to_string(),
                weight_from: b.weight_from.to_string(),
                state_from: b.state_from.to_string(),
                state: b.state,
                reason: b.reason.clone(),
                rtt_ms: b.rtt.map(|d| d.as_secs_f64() * 1000.0),
                last_code: b.last_code,
                last_rtt_ms: b.last_rtt.map(|d| d.as_secs_f64() * 1000.0),
                consecutive_failures: b.consecutive_failures,
                last_change: b.last_change,
                checks: b.checks,
                check_failures: b.check_failures,
                packets: s.packets.saturating_add(slow.packets),
                bytes: s.bytes.saturating_add(slow.bytes),
                calls: b.calls,
                load: b.load.clone(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    // Backends gone since the last snapshot take their slow-path counts with them.
    slow_path.retain_backends(&backends.iter().map(|b| b.address).collect());
    Ok(Snapshot {
        counters,
        backends: per_backend,
        dns_failures,
        reloads,
        slow_path: slow_path.snapshot(),
        affinity_entries: 0,
        affinity_capacity: 0,
        tables: Vec::new(),
    })
}
