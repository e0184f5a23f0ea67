//! The slow path's handle on the fast path's affinity maps: its own file descriptors of
//! the affinity map, the backend flags and the backends, behind
//! [`AffinityStore`](crate::slowpath::AffinityStore).
use std::net::SocketAddr;

use aya::maps::{Array, HashMap, Map, MapData};
use sip_dispatch_common::{AffinityEntry, AffinityKey, Backend, BackendFlags};

use crate::slowpath::AffinityStore;

/// `BPF_NOEXIST` and `BPF_EXIST` of `bpf_map_update_elem`.
const NOEXIST: u64 = 1;
const EXIST: u64 = 2;

pub struct AffinityMaps {
    service: u32,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    flags: Array<MapData, BackendFlags>,
    backends: Array<MapData, Backend>,
}

impl AffinityMaps {
    /// Over copies (new fds) of the daemon's maps, for service `service`.
    pub fn new(
        service: u32,
        affinity: MapData,
        flags: MapData,
        backends: MapData,
    ) -> anyhow::Result<AffinityMaps> {
        Ok(AffinityMaps {
            service,
            affinity: HashMap::try_from(Map::LruHashMap(affinity))?,
            flags: Array::try_from(Map::Array(flags))?,
            backends: Array::try_from(Map::Array(backends))?,
        })
    }
}

impl AffinityStore for AffinityMaps {
    fn service(&self) -> u32 {
        self.service
    }

    fn entry(&self, key: &AffinityKey) -> Option<AffinityEntry> {
        self.affinity.get(key, 0).ok()
    }

    fn flags(&self, id: u32) -> BackendFlags {
        self.flags.get(&id, 0).unwrap_or_default()
    }

    fn backend(&self, id: u32) -> Option<SocketAddr> {
        let b = self.backends.get(&id, 0).ok()?;
        (b.family != 0).then(|| b.to_socket_addr())
    }

    fn write(&mut self, key: &AffinityKey, entry: &AffinityEntry, create: bool) {
        let flags = if create { NOEXIST } else { EXIST };
        // Lost races (the fast path wrote first, or the LRU evicted the entry) leave the
        // map as the fast path made it; the message still goes where decided.
        if let Err(e) = self.affinity.insert(key, entry, flags) {
            log::debug!("slow path: affinity entry not written: {e}");
        }
    }
}
