//! The maps and the link pinned under the pin directory: adopting them across a restart
//! (after a layout check against the map table), removing them, and resizing the
//! affinity map.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use aya::{
    EbpfLoader,
    maps::{MapData, MapType},
};
use sip_dispatch_common::{
    ALL_MAPS, Entries, GLOBAL_AFFINITY_ON, HashKey, MAP_AFFINITY, MAPS, MAX_BACKENDS, MapKind,
    MapSpec,
};

use super::{Affinity, Dataplane, load::OBJECT};
use crate::backend_ids::BackendIds;

/// Where a resized affinity map's previous pin waits until the take-over (or goes back
/// on a failed start). No dot: bpffs refuses names with one.
const AFFINITY_OLD_PIN: &str = "sd_affinity_v1_old";

impl Dataplane {
    /// Locks `pin_dir`, loads the object with its maps pinned there and loads the
    /// program into the kernel. Maps a previous daemon left pinned (with
    /// `--keep-attached`, or by crashing) are adopted once their layout is checked, so
    /// forwarding goes on across the restart; `reset` removes them instead. Nothing a
    /// running program uses is written here (missing maps are created and pinned): the
    /// hash key waits for `write_hash_key`, so a daemon that fails to start before its
    /// take-over leaves a pinned, forwarding link as it was.
    ///
    /// Returns the backend ids the adopted maps use (none for fresh maps): the caller owns
    /// them from here on.
    ///
    /// An affinity map pinned with another size is resized: moved aside, replaced by a new
    /// one holding its newest entries, and removed at the take-over.
    pub fn load(
        pin_dir: &Path,
        iface: &str,
        reset: bool,
        key: HashKey,
        affinity: Affinity,
    ) -> anyhow::Result<(Self, BackendIds)> {
        crate::bpffs::prepare_pin_dir(pin_dir)?;
        // Before anything in the directory is read or removed (also by --reset).
        let lock = crate::bpffs::lock_pin_dir(pin_dir)?;
        let pinned: Vec<PathBuf> = ALL_MAPS
            .iter()
            .map(|m| pin_dir.join(m))
            .chain([pin_dir.join(LINK_PIN)])
            .filter(|p| p.exists())
            .collect();
        if reset {
            for p in &pinned {
                std::fs::remove_file(p)
                    .with_context(|| format!("removing stale pin {}", p.display()))?;
            }
            let _ = std::fs::remove_file(pin_dir.join(AFFINITY_OLD_PIN));
        } else {
            check_pinned_layout(pin_dir)?;
        }
        let resized = if reset {
            None
        } else {
            set_affinity_aside(pin_dir, affinity.map_entries())?
        };
        let adopting = !reset && !pinned.is_empty();
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let on = u8::from(affinity.on);
        loader
            .map_max_entries(MAP_AFFINITY, affinity.map_entries())
            .override_global(GLOBAL_AFFINITY_ON, &on, true);
        let loaded = loader
            .load(OBJECT)
            .context("loading the XDP object")
            .and_then(|ebpf| Self::init(ebpf, Some(pin_dir.to_path_buf()), iface, key, affinity));
        let mut dp = match loaded {
            Ok(dp) => dp,
            Err(e) => {
                if resized.is_some() {
                    put_affinity_back(pin_dir);
                }
                return Err(e);
            }
        };
        dp._pin_lock = Some(lock);
        if !reset {
            dp.found_pins = pinned;
            // The new map is ours; the old one is what a failed start puts back.
            dp.found_pins
                .retain(|p| resized.is_none() || !p.ends_with(MAP_AFFINITY));
        }
        let resizing = resized.is_some();
        let adopted = (|| {
            let ids = if adopting {
                let ids = dp.read_backend_ids()?;
                dp.sync_service_ports()?;
                log::info!("adopted the maps pinned in {}", pin_dir.display());
                ids
            } else {
                BackendIds::new(MAX_BACKENDS)
            };
            if let Some(old) = resized {
                dp.copy_affinity_from(old)?;
            }
            anyhow::Ok(ids)
        })();
        match adopted {
            Ok(ids) => Ok((dp, ids)),
            Err(e) => {
                if resizing {
                    put_affinity_back(pin_dir);
                }
                Err(e)
            }
        }
    }

    /// Undoes a start that failed with no pinned link to keep: closes our link, if any,
    /// and removes the pins this daemon made; the pins it found (adopted maps) stay.
    pub fn abandon(&mut self) {
        self.drop_link();
        let Some(dir) = &self.pin_dir else {
            return;
        };
        for name in ALL_MAPS.iter().chain([&LINK_PIN]) {
            let p = dir.join(name);
            if self.found_pins.contains(&p) {
                continue;
            }
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("removing pin {}: {e}", p.display()),
            }
        }
        put_affinity_back(dir);
        let _ = std::fs::remove_dir(dir);
    }
}

/// The pin of the XDP link, next to the maps.
pub const LINK_PIN: &str = "link_v1";

/// Removes the link pin (which detaches the program once nothing else holds the link)
/// and the map pins in `dir`.
pub fn remove_pins(dir: &Path) -> usize {
    let mut removed = remove_outdated_pins(dir);
    let _ = std::fs::remove_file(dir.join(AFFINITY_OLD_PIN));
    for name in ALL_MAPS.iter().chain([&LINK_PIN]) {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("removing pin {}: {e}", p.display()),
        }
    }
    let _ = std::fs::remove_dir(dir);
    removed
}

/// Whether `name` is the pin of a map of another layout version than this build's
/// (`sd_<what>_v<N>` not in [`ALL_MAPS`]).
fn is_outdated_map_pin(name: &str) -> bool {
    let versioned = name.starts_with("sd_")
        && name
            .rsplit_once("_v")
            .is_some_and(|(_, v)| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
    versioned && !ALL_MAPS.contains(&name)
}

/// Removes the map pins an earlier version left in `dir` (once its program is gone from
/// the link, nothing uses them), and a resized affinity map's old pin; returns how many.
pub fn remove_outdated_pins(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for name in entries.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
        if is_outdated_map_pin(&name) || name == AFFINITY_OLD_PIN {
            match std::fs::remove_file(dir.join(&name)) {
                Ok(()) => {
                    log::info!("removed {name}, a map pin of another version");
                    removed += 1;
                }
                Err(e) => log::warn!("removing the outdated pin {name}: {e}"),
            }
        }
    }
    removed
}

/// If the affinity map pinned in `dir` has another size than `entries`, moves its pin
/// aside (the running program keeps using the map) and returns the map, to copy from.
fn set_affinity_aside(dir: &Path, entries: u32) -> anyhow::Result<Option<MapData>> {
    let pin = dir.join(MAP_AFFINITY);
    if !pin.exists() {
        return Ok(None);
    }
    let map = MapData::from_pin(&pin)
        .with_context(|| format!("opening the pinned map {}", pin.display()))?;
    let found = map
        .info()
        .with_context(|| format!("reading the pinned map {}", pin.display()))?
        .max_entries();
    if found == entries {
        return Ok(None);
    }
    let aside = dir.join(AFFINITY_OLD_PIN);
    std::fs::rename(&pin, &aside)
        .with_context(|| format!("moving {} aside to resize it", pin.display()))?;
    log::info!("affinity map: {found} entries pinned, {entries} wanted: resizing");
    Ok(Some(map))
}

/// Undoes `set_affinity_aside` after a failed start (nothing if it did not move a pin).
fn put_affinity_back(dir: &Path) {
    let aside = dir.join(AFFINITY_OLD_PIN);
    if !aside.exists() {
        return;
    }
    let pin = dir.join(MAP_AFFINITY);
    let _ = std::fs::remove_file(&pin);
    if let Err(e) = std::fs::rename(&aside, &pin) {
        log::warn!("putting back {}: {e}", pin.display());
    }
}

/// The kernel's name of a map kind, as aya reads it from a map's info.
fn map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::Array => MapType::Array,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::LruHash => MapType::LruHash,
        MapKind::ArrayOfMaps => MapType::ArrayOfMaps,
        MapKind::DevMapHash => MapType::DevMapHash,
    }
}

/// The layout a pinned map must have: (type, key size, value size, entries). Entries set
/// at load count as 0: a pin of another size is resized, not refused.
fn pinned_layout(spec: &MapSpec) -> (MapType, u32, u32, u32) {
    let entries = match spec.entries {
        Entries::Fixed(n) => n,
        Entries::AtLoad { .. } => 0,
    };
    (map_type(spec.kind), spec.key_size, spec.value_size, entries)
}

/// Refuses pinned maps whose type or sizes differ from this build's (the pinned maps of
/// the table [`MAPS`]).
fn check_pinned_layout(dir: &Path) -> anyhow::Result<()> {
    for spec in MAPS.iter().filter(|m| m.pinned) {
        let (kind, key, value, max) = pinned_layout(spec);
        let path = dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .with_context(|| format!("reading the pinned map {}", path.display()))?;
        let entries = match spec.entries {
            Entries::Fixed(_) => info.max_entries(),
            Entries::AtLoad { .. } => 0,
        };
        let found = (
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            entries,
        );
        if found != (Some(kind), key, value, max) {
            bail!(
                "the map pinned at {} is {:?} with key {} B, value {} B, {} entries; this build needs                  {kind:?} with key {key} B, value {value} B, {max} entries: stop the old daemon and start                  with --reset (or sip-dispatch detach)",
                path.display(),
                found.0,
                found.1,
                found.2,
                found.3
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sip_dispatch_common::MAP_TABLES;

    #[test]
    fn outdated_pins_are_other_versions_of_our_maps() {
        assert!(is_outdated_map_pin("sd_tables_v1"));
        assert!(is_outdated_map_pin("sd_backends_v7"));
        assert!(!is_outdated_map_pin(MAP_TABLES));
        assert!(!is_outdated_map_pin(LINK_PIN));
        for other in [
            "sd_tables_v",
            "sd_tables_vx",
            "tables_v1",
            "sd_notes",
            "link_v1",
        ] {
            assert!(!is_outdated_map_pin(other), "{other}");
        }
    }
}
