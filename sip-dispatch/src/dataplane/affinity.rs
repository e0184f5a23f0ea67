//! Call affinity: the size the program is loaded with, the affinity map, and the
//! held-call census.
use anyhow::{Context as _, bail};
use aya::maps::{HashMap, MapData};
use sip_dispatch_common::{
    AFFINITY_ENTRIES_DEFAULT, AFFINITY_ENTRIES_MIN, AffinityEntry, AffinityKey, MAP_AFFINITY,
    MAP_BACKEND_FLAGS, MAP_BACKENDS,
};

use super::{Dataplane, load::census_program};

/// Call affinity as the program is loaded with it (`--affinity`, `--affinity-entries`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affinity {
    pub on: bool,
    /// Entries of the affinity map.
    pub entries: u32,
}

impl Default for Affinity {
    fn default() -> Self {
        Affinity {
            on: true,
            entries: AFFINITY_ENTRIES_DEFAULT,
        }
    }
}

impl Affinity {
    /// The map's size: with affinity off nothing uses it, so it takes the least room.
    pub fn map_entries(self) -> u32 {
        if self.on {
            self.entries
        } else {
            AFFINITY_ENTRIES_MIN
        }
    }
}

impl Dataplane {
    /// The size of the affinity map, and whether the program uses it.
    pub fn affinity(&self) -> Affinity {
        self.affinity
    }

    /// Fills the (new) affinity map with the newest entries of `old`, as many as fit.
    pub(super) fn copy_affinity_from(&mut self, old: MapData) -> anyhow::Result<()> {
        let old = aya::maps::Map::LruHashMap(old);
        let old: HashMap<&MapData, AffinityKey, AffinityEntry> = HashMap::try_from(&old)?;
        let mut entries: Vec<(AffinityKey, AffinityEntry)> =
            old.iter().filter_map(Result::ok).collect();
        let capacity = self.affinity.map_entries() as usize;
        // Newest first, then inserted oldest first, so that the LRU keeps the newest.
        entries.sort_unstable_by_key(|(_, e)| std::cmp::Reverse(e.last_seen_ns));
        entries.truncate(capacity);
        let mut map: HashMap<&mut MapData, AffinityKey, AffinityEntry> =
            HashMap::try_from(self.map_mut(MAP_AFFINITY)?)?;
        let mut copied = 0usize;
        for (k, e) in entries.iter().rev() {
            if map.insert(k, e, 0).is_ok() {
                copied += 1;
            }
        }
        log::info!("affinity map resized to {capacity} entries: {copied} call(s) carried over");
        Ok(())
    }

    /// The affinity entry of a call, if the map has one.
    pub fn affinity_entry(&self, key: &AffinityKey) -> anyhow::Result<Option<AffinityEntry>> {
        let map: HashMap<&MapData, AffinityKey, AffinityEntry> =
            HashMap::try_from(self.map(MAP_AFFINITY)?)?;
        match map.get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading the affinity map"),
        }
    }

    /// Every entry of the affinity map, walked from userspace (two syscalls an entry:
    /// for tests and measurements; the daemon counts with `census_runner`).
    pub fn affinity_entries(&self) -> anyhow::Result<Vec<AffinityEntry>> {
        let map: HashMap<&MapData, AffinityKey, AffinityEntry> =
            HashMap::try_from(self.map(MAP_AFFINITY)?)?;
        map.iter()
            .map(|r| r.map(|(_, e)| e))
            .collect::<Result<_, _>>()
            .context("walking the affinity map")
    }

    /// Writes a call's affinity entry (the slow path's writes, and tests).
    pub fn set_affinity_entry(
        &mut self,
        key: &AffinityKey,
        entry: &AffinityEntry,
    ) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, AffinityKey, AffinityEntry> =
            HashMap::try_from(self.map_mut(MAP_AFFINITY)?)?;
        map.insert(key, entry, 0)
            .context("writing the affinity map")
    }

    /// Removes a call's affinity entry, if there is one (tests).
    pub fn remove_affinity_entry(&mut self, key: &AffinityKey) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, AffinityKey, AffinityEntry> =
            HashMap::try_from(self.map_mut(MAP_AFFINITY)?)?;
        match map.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing an affinity entry"),
        }
    }

    /// The slow path's view of the affinity maps for service `service` (None with
    /// affinity off): copies of the map fds, so it works beside the controller.
    pub fn affinity_maps(
        &self,
        service: u32,
    ) -> anyhow::Result<Option<crate::affinity_maps::AffinityMaps>> {
        if !self.affinity.on {
            return Ok(None);
        }
        let dup = |name: &str| -> anyhow::Result<MapData> {
            use std::os::fd::AsFd as _;
            let data = match self.map(name)? {
                aya::maps::Map::Array(m) | aya::maps::Map::LruHashMap(m) => m,
                _ => bail!("map {name} has an unexpected type"),
            };
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .with_context(|| format!("duplicating the fd of {name}"))?;
            Ok(MapData::from_fd(fd)?)
        };
        Ok(Some(crate::affinity_maps::AffinityMaps::new(
            service,
            dup(MAP_AFFINITY)?,
            dup(MAP_BACKEND_FLAGS)?,
            dup(MAP_BACKENDS)?,
        )?))
    }

    /// The held-call census on fds of its own, to run off the controller's thread.
    pub fn census_runner(&mut self) -> anyhow::Result<crate::census::Runner> {
        use std::os::fd::AsFd as _;
        let held = match self.map(sip_dispatch_common::census::MAP_HELD)? {
            aya::maps::Map::Array(m) => m,
            _ => bail!(
                "map {} is not an array",
                sip_dispatch_common::census::MAP_HELD
            ),
        };
        let held = MapData::from_fd(crate::census::dup(held.fd().as_fd())?)
            .context("opening the census counts")?;
        let program = crate::census::dup(census_program(&mut self.ebpf)?.fd()?.as_fd())?;
        Ok(crate::census::Runner::new(program, held))
    }
}
