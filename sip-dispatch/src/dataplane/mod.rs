//! The loaded XDP object: its maps (pinned under the pin directory) and its attachment.
//!
//! [`Dataplane`] is one type; its methods are split by job:
//! - `load`: the embedded object, loading it, the dispatcher program the kernel gets
//!   (`may_goto` or `bpf_loop`), and the programs loaded on their own (`decap`, benchmarks);
//! - `pins`: the pinned maps and link: the layout check against the map table
//!   (`sip_dispatch_common::MAPS`), adoption across a restart, removal, the affinity
//!   map's resize;
//! - `attach`: attaching to an interface, taking over a pinned link, detaching;
//! - `tables`: service entries, slot tables and the service ports map;
//! - `backends`: what the fast path knows of each backend id (address, counters,
//!   flags, next hop); the ids are the caller's [`crate::backend_ids::BackendIds`]
//!   (the controller's), lent to the writes that allocate or free one;
//! - `affinity`: the affinity map and the held-call census;
//! - `counters`: the fast path's counters.
use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::xdp::XdpLinkId,
};
use sip_dispatch_common::{BackendFlags, Config, EncapSource, HashKey, MAP_CONFIG, MAP_ENCAP};

mod affinity;
mod attach;
mod backends;
mod counters;
mod load;
#[cfg(test)]
mod object_maps;
mod pins;
mod tables;

pub use affinity::Affinity;
pub use attach::{AttachMode, ModeChoice, attach_loaded, attach_pass, attach_program};
#[cfg(feature = "mac-swap")]
pub use load::load_mac_swap;
pub use load::{ENV_FORCE_BPF_LOOP, ScanLoop, load_decap, load_program};
pub use pins::{LINK_PIN, remove_outdated_pins, remove_pins};
pub use tables::slot_ids;

/// Dropping it never detaches: a pinned link (and its maps) outlives the daemon, however
/// it ends. Only `detach`, on a clean stop, removes the pins; an unpinned link (kernel
/// tests, benchmarks) goes with its last fd.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    iface: String,
    link: Option<XdpLinkId>,
    key: HashKey,
    /// Held while this daemon owns the pins (see `bpffs::lock_pin_dir`).
    _pin_lock: Option<crate::bpffs::PinDirLock>,
    /// The pins that were there before `load` (adopted): a failed start keeps them.
    found_pins: Vec<PathBuf>,
    affinity: Affinity,
    /// The forwarding mode of each service id (`FWD_*`; none: rewrite), written with its
    /// service entry.
    forwarding: BTreeMap<u32, u32>,
    /// What was last written to the backend flags map, per id.
    flags_written: Vec<Option<BackendFlags>>,
    /// How the loaded dispatcher's scans loop (which of its two programs it is).
    scan_loop: ScanLoop,
    /// The backends the next-hop cache resolves (see `crate::nexthops`).
    next_hop_targets: crate::nexthops::Targets,
}

impl Dataplane {
    /// The key `write_hash_key` writes (known once the key file is read or created).
    pub fn set_hash_key(&mut self, key: HashKey) {
        self.key = key;
    }

    /// Writes the hash key into the config map the program reads (shared with the
    /// program in an adopted link: call it once this daemon is sure to take over).
    pub fn write_hash_key(&mut self) -> anyhow::Result<()> {
        let key = self.key;
        let mut config: Array<&mut MapData, Config> = Array::try_from(self.map_mut(MAP_CONFIG)?)?;
        config
            .set(
                0,
                Config {
                    hash_key: [key.k0, key.k1],
                },
                0,
            )
            .context("writing the hash key")?;
        Ok(())
    }

    /// The outer source addresses of `ipip`.
    pub fn set_encap_source(&mut self, src: EncapSource) -> anyhow::Result<()> {
        let mut map: Array<&mut MapData, EncapSource> = Array::try_from(self.map_mut(MAP_ENCAP)?)?;
        map.set(0, src, 0)
            .context("writing the encapsulation source")?;
        Ok(())
    }

    fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))
    }

    fn map(&self, name: &str) -> anyhow::Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))
    }
}
