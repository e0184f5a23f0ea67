//! The slow path's counters: outcomes, and what was forwarded per backend, counted as
//! the fast path counts.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Serialize;
use sip_dispatch_common::MAX_BACKENDS;

/// Ethernet header bytes, added to what the slow path forwards so that its byte count
/// reads like the fast path's (which counts frames).
const ETH_HLEN: u64 = 14;

/// Counters of the slow path.
#[derive(Default, Debug)]
pub struct Counters {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    pub answered_503: AtomicU64,
    pub dropped_not_sip: AtomicU64,
    pub dropped_no_call_id: AtomicU64,
    pub dropped_no_backend: AtomicU64,
    pub rate_limited_503: AtomicU64,
    pub send_errors: AtomicU64,
    /// 503s not sent because they would not fit in one datagram (see [`super::max_503_len`]).
    pub too_large_503: AtomicU64,
    /// Messages that followed their call's affinity entry.
    pub affinity_followed: AtomicU64,
    /// Affinity entries created or rewritten.
    pub affinity_written: AtomicU64,
    /// l2dsr: datagrams dropped because their backend has no neighbour entry on the
    /// interface.
    pub not_on_link: AtomicU64,
    /// l2dsr, ipip: datagrams dropped because one IP datagram cannot carry them (a guard:
    /// the kernel reassembles nothing that large).
    pub too_big: AtomicU64,
    /// What was forwarded, per backend.
    pub(super) per_backend: Mutex<HashMap<SocketAddr, Forwarded>>,
}

/// Packets and bytes the slow path forwarded to one backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub packets: u64,
    /// Counted as the fast path counts: the whole unfragmented frame (Ethernet, IP and
    /// UDP headers and the payload).
    pub bytes: u64,
}

/// Backends counted at once: every backend the tables can hold, twice over (removed
/// ones linger until the next stats snapshot forgets them).
pub(super) const MAX_COUNTED_BACKENDS: usize = 2 * MAX_BACKENDS as usize;

#[derive(Serialize, serde::Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub received: u64,
    pub forwarded: u64,
    pub answered_503: u64,
    pub dropped_not_sip: u64,
    pub dropped_no_call_id: u64,
    pub dropped_no_backend: u64,
    pub rate_limited_503: u64,
    pub send_errors: u64,
    #[serde(default)]
    pub too_large_503: u64,
    #[serde(default)]
    pub affinity_followed: u64,
    #[serde(default)]
    pub affinity_written: u64,
    #[serde(default)]
    pub not_on_link: u64,
    #[serde(default)]
    pub too_big: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CountersSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            received: g(&self.received),
            forwarded: g(&self.forwarded),
            answered_503: g(&self.answered_503),
            dropped_not_sip: g(&self.dropped_not_sip),
            dropped_no_call_id: g(&self.dropped_no_call_id),
            dropped_no_backend: g(&self.dropped_no_backend),
            rate_limited_503: g(&self.rate_limited_503),
            send_errors: g(&self.send_errors),
            too_large_503: g(&self.too_large_503),
            affinity_followed: g(&self.affinity_followed),
            affinity_written: g(&self.affinity_written),
            not_on_link: g(&self.not_on_link),
            too_big: g(&self.too_big),
        }
    }

    pub(super) fn count_forwarded(&self, backend: SocketAddr, payload_len: usize) {
        let ip_header: u64 = if backend.is_ipv6() { 40 } else { 20 };
        let bytes = ETH_HLEN + ip_header + 8 + payload_len as u64;
        let mut map = self
            .per_backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_COUNTED_BACKENDS && !map.contains_key(&backend) {
            // Only reachable with a churn of backends between two snapshots; the
            // datagram is still in `forwarded`.
            return;
        }
        let f = map.entry(backend).or_default();
        f.packets = f.packets.saturating_add(1);
        f.bytes = f.bytes.saturating_add(bytes);
    }

    /// What the slow path forwarded to `backend`.
    pub fn forwarded_to(&self, backend: SocketAddr) -> Forwarded {
        let map = self
            .per_backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(&backend).copied().unwrap_or_default()
    }

    /// Forgets the per-backend counts of backends no longer known.
    pub fn retain_backends(&self, known: &std::collections::HashSet<SocketAddr>) {
        let mut map = self
            .per_backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.retain(|b, _| known.contains(b));
    }
}

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
