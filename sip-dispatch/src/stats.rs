//! Counter snapshots, as JSON for scripts.
use serde::Serialize;

use crate::dataplane::Dataplane;

#[derive(Serialize)]
pub struct BackendSnapshot {
    pub address: String,
    pub weight: u32,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize)]
pub struct Snapshot {
    pub counters: serde_json::Map<String, serde_json::Value>,
    pub backends: Vec<BackendSnapshot>,
}

/// Reads the counters and the given backends' stats (`(id, address, weight)`).
pub fn snapshot(
    dp: &Dataplane,
    backends: &[(u32, std::net::SocketAddr, u32)],
) -> anyhow::Result<Snapshot> {
    let counters = dp
        .counters()?
        .into_iter()
        .map(|(c, v)| (c.name().to_string(), v.into()))
        .collect();
    let backends = backends
        .iter()
        .map(|(id, addr, weight)| {
            let s = dp.backend_stats(*id)?;
            Ok(BackendSnapshot {
                address: addr.to_string(),
                weight: *weight,
                packets: s.packets,
                bytes: s.bytes,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Snapshot { counters, backends })
}
