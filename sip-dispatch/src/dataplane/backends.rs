//! What the fast path knows of each backend id: address, counters, flags, next hop.
//! The ids themselves are the caller's ([`BackendIds`], owned by the controller): the
//! writes that allocate or free one take it, so the two never disagree.
use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use sip_dispatch_common::{
    BF_AFFINITY, Backend, BackendFlags, BackendStats, MAP_BACKEND_FLAGS, MAP_BACKEND_STATS,
    MAP_BACKENDS, MAP_NEXTHOP, MAP_SERVICES, MAX_BACKENDS, NH_VALID, NextHop, ServiceInfo,
    ServiceKey,
};

use super::Dataplane;
use crate::backend_ids::BackendIds;

impl Dataplane {
    /// The id of a backend address, allocating one in `ids` (and writing its map entry,
    /// with zeroed counters) the first time.
    pub fn backend_id(
        &mut self,
        ids: &mut BackendIds,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<u32> {
        let (id, fresh) = ids.allocate(addr)?;
        if fresh
            && let Err(e) = self
                .write_new_backend(id, addr)
                .and_then(|()| self.publish_next_hop_targets(ids))
        {
            ids.unallocate(addr);
            return Err(e);
        }
        Ok(id)
    }

    /// The map entry of a newly allocated id, with zeroed counters.
    fn write_new_backend(&mut self, id: u32, addr: std::net::SocketAddr) -> anyhow::Result<()> {
        self.set_backend(id, Backend::from_socket_addr(addr))?;
        let mut stats: PerCpuArray<&mut MapData, BackendStats> =
            PerCpuArray::try_from(self.map_mut(MAP_BACKEND_STATS)?)?;
        let zero = PerCpuValues::try_from(vec![
            BackendStats::default();
            aya::util::nr_cpus().map_err(|(_, e)| e)?
        ])?;
        stats
            .set(id, zero, 0)
            .with_context(|| format!("zeroing the counters of backend {id}"))?;
        Ok(())
    }

    /// Frees the ids of addresses `listed` rejects, except those an installed table
    /// still references (they go once their table is replaced); returns the freed ones.
    ///
    /// A freed id gets its next generation and no flags: affinity entries written for
    /// its address are not followed any more.
    pub fn release_unlisted(
        &mut self,
        ids: &mut BackendIds,
        listed: impl Fn(std::net::SocketAddr) -> bool,
    ) -> Vec<(std::net::SocketAddr, u32)> {
        let freed = ids.release_unlisted(listed);
        if let Err(e) = self.publish_next_hop_targets(ids) {
            log::warn!("next hops: {e:#}");
        }
        for (addr, id) in &freed {
            if let Err(e) = self.set_backend_flags(ids, *id, 0) {
                // Its entries stay valid until the id is reused and written again.
                log::warn!("backend {addr}: {e:#}");
            }
        }
        freed
    }

    /// The backend ids a previous daemon wrote, so that its tables (still in force until
    /// ours replace them) keep pointing at the right backends; for fresh maps, none.
    pub(super) fn read_backend_ids(&mut self) -> anyhow::Result<BackendIds> {
        let backends: Array<&MapData, Backend> = Array::try_from(self.map(MAP_BACKENDS)?)?;
        let mut found = Vec::new();
        for id in 0..MAX_BACKENDS {
            let b = backends.get(&id, 0)?;
            if b.family != 0 {
                found.push((b.to_socket_addr(), id));
            }
        }
        // The tables the adopted service entries point at may reference any of them.
        let services: HashMap<&MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.map(MAP_SERVICES)?)?;
        let tables: Vec<u32> = services
            .iter()
            .filter_map(Result::ok)
            .map(|(_, info)| info.id)
            .collect();
        let mut ids = BackendIds::new(MAX_BACKENDS);
        ids.adopt(&found, &tables);
        let flags: Array<&MapData, BackendFlags> = Array::try_from(self.map(MAP_BACKEND_FLAGS)?)?;
        let generations = (0..MAX_BACKENDS)
            .map(|id| flags.get(&id, 0).map(|f| f.generation))
            .collect::<Result<Vec<u32>, _>>()
            .context("reading the backend generations")?;
        ids.adopt_generations(&generations);
        self.publish_next_hop_targets(&ids)?;
        Ok(ids)
    }

    pub fn set_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()> {
        let mut backends: Array<&mut MapData, Backend> =
            Array::try_from(self.map_mut(MAP_BACKENDS)?)?;
        backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))?;
        Ok(())
    }

    /// Writes what the fast path needs to know of backend `id` (its generation is ours),
    /// unless that is what the map holds already.
    ///
    /// Flags that end affinity (disabled, or listed by no service) also start a new
    /// generation: the backend's calls do not come back to it when it is enabled again.
    pub fn set_backend_flags(
        &mut self,
        ids: &mut BackendIds,
        id: u32,
        flags: u32,
    ) -> anyhow::Result<()> {
        let had_affinity = self
            .flags_written
            .get(id as usize)
            .copied()
            .flatten()
            .is_some_and(|f| f.flags & BF_AFFINITY != 0);
        if had_affinity && flags & BF_AFFINITY == 0 {
            ids.bump_generation(id);
        }
        let value = BackendFlags {
            generation: ids.generation(id),
            flags,
        };
        let Some(slot) = self.flags_written.get(id as usize) else {
            bail!("backend id {id} out of range");
        };
        if *slot == Some(value) {
            return Ok(());
        }
        let mut map: Array<&mut MapData, BackendFlags> =
            Array::try_from(self.map_mut(MAP_BACKEND_FLAGS)?)?;
        map.set(id, value, 0)
            .with_context(|| format!("writing the flags of backend {id}"))?;
        self.flags_written[id as usize] = Some(value);
        Ok(())
    }

    /// What the backend flags map holds for `id` (as last written by this daemon).
    pub fn backend_flags(&self, id: u32) -> BackendFlags {
        self.flags_written
            .get(id as usize)
            .copied()
            .flatten()
            .unwrap_or_default()
    }

    /// Tells the next-hop cache which ids have which address now. Under its lock, the
    /// entry of an id whose address changed (new, reused or freed) loses its valid bit
    /// first: the fast path asks the FIB for it until the cache resolved the new one.
    fn publish_next_hop_targets(&mut self, ids: &BackendIds) -> anyhow::Result<()> {
        let now: BTreeMap<u32, std::net::IpAddr> =
            ids.assigned().map(|(a, id)| (id, a.ip())).collect();
        let targets = self.next_hop_targets.clone();
        let mut listed = targets.lock();
        let changed: Vec<u32> = listed
            .iter()
            .filter(|(id, ip)| now.get(id) != Some(ip))
            .map(|(&id, _)| id)
            .chain(now.keys().copied().filter(|id| !listed.contains_key(id)))
            .collect();
        for id in changed {
            let hop = self.next_hop(id)?;
            if hop.flags & NH_VALID != 0 {
                self.set_next_hop(
                    id,
                    NextHop {
                        flags: hop.flags & !NH_VALID,
                        ..hop
                    },
                )?;
            }
        }
        *listed = now;
        Ok(())
    }

    /// Starts following the routes and neighbours of the backends into the next-hop
    /// map (`crate::nexthops`); the returned handle stops it when dropped.
    pub fn follow_next_hops(&self) -> anyhow::Result<crate::nexthops::Follower> {
        use std::os::fd::AsFd as _;
        let data = match self.map(MAP_NEXTHOP)? {
            aya::maps::Map::Array(m) => m,
            _ => bail!("map {} has an unexpected type", MAP_NEXTHOP),
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the fd of the next-hop map")?;
        crate::nexthops::follow(MapData::from_fd(fd)?, self.next_hop_targets.clone())
    }

    /// Resolves every backend's next hop once and writes the entries, as the follower
    /// does (for tests and benchmarks, which run no follower); returns how many are
    /// valid.
    pub fn resolve_next_hops(&mut self) -> anyhow::Result<usize> {
        let targets = self.next_hop_targets.lock().clone();
        let resolved = crate::nexthops::Resolver::new()
            .and_then(|mut r| r.resolve(&targets))
            .context("resolving the backends' next hops")?;
        let mut valid = 0;
        for (id, (want, _)) in resolved {
            valid += usize::from(want.is_some());
            for write in crate::nexthops::steps(self.next_hop(id)?, want) {
                self.set_next_hop(id, write)?;
            }
        }
        Ok(valid)
    }

    /// The fast path's next-hop entry of backend `id`.
    pub fn next_hop(&self, id: u32) -> anyhow::Result<NextHop> {
        let map: Array<&MapData, NextHop> = Array::try_from(self.map(MAP_NEXTHOP)?)?;
        map.get(&id, 0)
            .with_context(|| format!("reading the next hop of backend {id}"))
    }

    /// Writes the fast path's next-hop entry of backend `id` (see `nexthops` for the
    /// order of writes that keeps readers from seeing a mix).
    pub fn set_next_hop(&mut self, id: u32, hop: NextHop) -> anyhow::Result<()> {
        let mut map: Array<&mut MapData, NextHop> = Array::try_from(self.map_mut(MAP_NEXTHOP)?)?;
        map.set(id, hop, 0)
            .with_context(|| format!("writing the next hop of backend {id}"))
    }
}
