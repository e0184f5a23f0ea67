//! Counter snapshots, as JSON for scripts.
use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::dataplane::Dataplane;

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
    pub state: &'static str,
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
}

#[derive(Serialize, Deserialize)]
pub struct BackendSnapshot {
    pub service: String,
    pub address: String,
    pub weight: u32,
    pub priority: u16,
    pub source: String,
    /// Where the backend, its weight and its state came from (see [`BackendInfo`]).
    #[serde(default)]
    pub added_by: String,
    #[serde(default)]
    pub weight_from: String,
    #[serde(default)]
    pub state_from: String,
    pub state: String,
    pub reason: String,
    pub rtt_ms: Option<f64>,
    /// Of the last health check; null when it got no final response.
    #[serde(default)]
    pub last_code: Option<u16>,
    #[serde(default)]
    pub last_rtt_ms: Option<f64>,
    pub consecutive_failures: u32,
    pub last_change: u64,
    pub checks: u64,
    pub check_failures: u64,
    pub packets: u64,
    pub bytes: u64,
    /// See [`BackendInfo::calls`]; left out when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls: Option<u64>,
}

/// Outcomes of `reload` (and SIGHUP) since the daemon started.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reloads {
    pub ok: u64,
    pub failed: u64,
    /// Whether the last one failed (false before any).
    pub last_failed: bool,
}

#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    pub counters: serde_json::Map<String, serde_json::Value>,
    pub backends: Vec<BackendSnapshot>,
    pub dns_failures: u64,
    #[serde(default)]
    pub reloads: Reloads,
    pub slow_path: crate::slowpath::CountersSnapshot,
    /// Entries in the affinity map (0 with `--affinity off`), and its size (0 then).
    #[serde(default)]
    pub affinity_entries: u64,
    #[serde(default)]
    pub affinity_capacity: u64,
}

pub fn snapshot(
    dp: &Dataplane,
    backends: &[BackendInfo],
    dns_failures: u64,
    reloads: Reloads,
    slow_path: &crate::slowpath::Counters,
) -> anyhow::Result<Snapshot> {
    let counters = dp
        .counters()?
        .into_iter()
        .map(|(c, v)| (c.name().to_string(), v.into()))
        .collect();
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
                service: b.service.to_string(),
                address: b.address.to_string(),
                weight: b.weight,
                priority: b.priority,
                source: b.source.clone(),
                added_by: b.added_by.to_string(),
                weight_from: b.weight_from.to_string(),
                state_from: b.state_from.to_string(),
                state: b.state.to_string(),
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
    })
}
