//! Counter snapshots, as JSON for scripts.
use std::{net::SocketAddr, time::Duration};

use serde::Serialize;

use crate::dataplane::Dataplane;

/// What the controller knows of a backend.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    pub id: Option<u32>,
    pub address: SocketAddr,
    pub weight: u32,
    pub priority: u16,
    /// `static`, or the SRV name it came from.
    pub source: String,
    pub state: &'static str,
    pub reason: String,
    /// Smoothed health-check round trip.
    pub rtt: Option<Duration>,
}

#[derive(Serialize)]
pub struct BackendSnapshot {
    pub address: String,
    pub weight: u32,
    pub priority: u16,
    pub source: String,
    pub state: &'static str,
    pub reason: String,
    pub rtt_ms: Option<f64>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize)]
pub struct Snapshot {
    pub counters: serde_json::Map<String, serde_json::Value>,
    pub backends: Vec<BackendSnapshot>,
    pub dns_failures: u64,
    pub slow_path: crate::slowpath::CountersSnapshot,
}

pub fn snapshot(
    dp: &Dataplane,
    backends: &[BackendInfo],
    dns_failures: u64,
    slow_path: crate::slowpath::CountersSnapshot,
) -> anyhow::Result<Snapshot> {
    let counters = dp
        .counters()?
        .into_iter()
        .map(|(c, v)| (c.name().to_string(), v.into()))
        .collect();
    let backends = backends
        .iter()
        .map(|b| {
            let s = match b.id {
                Some(id) => dp.backend_stats(id)?,
                None => Default::default(),
            };
            Ok(BackendSnapshot {
                address: b.address.to_string(),
                weight: b.weight,
                priority: b.priority,
                source: b.source.clone(),
                state: b.state,
                reason: b.reason.clone(),
                rtt_ms: b.rtt.map(|d| d.as_secs_f64() * 1000.0),
                packets: s.packets,
                bytes: s.bytes,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Snapshot {
        counters,
        backends,
        dns_failures,
        slow_path,
    })
}
