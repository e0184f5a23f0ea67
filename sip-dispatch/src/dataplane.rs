//! The loaded XDP object: its maps (pinned under the pin directory) and its attachment.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::backend_ids::BackendIds;
use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, ArrayOfMaps, HashMap, IterableMap as _, MapData, MapType, PerCpuArray, PerCpuValues,
        xdp::DevMapHash,
    },
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use sip_dispatch_common::{
    AFFINITY_ENTRIES_DEFAULT, AFFINITY_ENTRIES_MIN, ALL_MAPS, AffinityEntry, AffinityKey,
    BF_AFFINITY, Backend, BackendFlags, BackendStats, Config, Counter, DecapSource, EncapSource,
    FWD_REWRITE, GLOBAL_AFFINITY_ON, HashKey, MAP_AFFINITY, MAP_BACKEND_FLAGS, MAP_BACKEND_STATS,
    MAP_BACKENDS, MAP_CONFIG, MAP_COUNTERS, MAP_DECAP_FROM, MAP_ENCAP, MAP_SCRATCH,
    MAP_SERVICE_PORTS, MAP_SERVICES, MAP_TABLES, MAP_TX_PORTS, MAX_BACKENDS, MAX_DECAP_SOURCES,
    MAX_SERVICES, NO_BACKEND, PROG_DECAP, PROG_DISPATCH, PROG_DISPATCH_CALLBACK,
    PROG_MAY_GOTO_PROBE, PROG_PASS, SERVICE_PORT_WORDS, SLOTS, Scratch, ServiceInfo, ServiceKey,
    TABLE_MAP_FLAGS, service_port_bit,
};

/// The XDP object built from the sip-dispatch-ebpf crate by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sip-dispatch"));

/// The benchmarks' MAC-swap baseline, an object of its own built beside [`OBJECT`].
#[cfg(feature = "mac-swap")]
static MAC_SWAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mac-swap"));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Native,
    Skb,
}

impl AttachMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Skb => "skb",
        }
    }
}

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

/// Where a resized affinity map's previous pin waits until the take-over (or goes back
/// on a failed start). No dot: bpffs refuses names with one.
const AFFINITY_OLD_PIN: &str = "sd_affinity_v1_old";

/// Dropping it never detaches: a pinned link (and its maps) outlives the daemon, however
/// it ends. Only `detach`, on a clean stop, removes the pins; an unpinned link (kernel
/// tests, benchmarks) goes with its last fd.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    iface: String,
    link: Option<XdpLinkId>,
    ids: BackendIds,
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

/// Setting this environment variable to `1` makes the daemon load the `bpf_loop`
/// dispatcher even on a kernel that knows `may_goto` (tests of the fallback).
pub const ENV_FORCE_BPF_LOOP: &str = "SIP_DISPATCH_FORCE_BPF_LOOP";

/// How the dispatcher's Call-ID and To-tag scans loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanLoop {
    /// Inside the program, bounded by `may_goto` (kernel 6.9+): no call per step.
    MayGoto,
    /// In `bpf_loop` callbacks, a few scanner steps per call (kernel 5.17+).
    BpfLoop,
}

impl ScanLoop {
    pub fn name(self) -> &'static str {
        match self {
            ScanLoop::MayGoto => "may_goto",
            ScanLoop::BpfLoop => "bpf_loop",
        }
    }

    fn program(self) -> &'static str {
        match self {
            ScanLoop::MayGoto => PROG_DISPATCH,
            ScanLoop::BpfLoop => PROG_DISPATCH_CALLBACK,
        }
    }

    /// `may_goto` when the kernel loads the probe program, unless [`ENV_FORCE_BPF_LOOP`]
    /// is `1`.
    fn choose(ebpf: &mut Ebpf) -> ScanLoop {
        if std::env::var(ENV_FORCE_BPF_LOOP).is_ok_and(|v| v == "1") {
            log::info!("{ENV_FORCE_BPF_LOOP}=1: the scans loop with bpf_loop");
            return ScanLoop::BpfLoop;
        }
        let probe = ebpf
            .program_mut(PROG_MAY_GOTO_PROBE)
            .and_then(|p| <&mut Xdp>::try_from(p).ok());
        let Some(probe) = probe else {
            log::warn!("program {PROG_MAY_GOTO_PROBE} missing: the scans loop with bpf_loop");
            return ScanLoop::BpfLoop;
        };
        match load_retrying(probe) {
            Ok(()) => {
                // Only a probe: its fd is not needed any more.
                let _ = probe.unload();
                ScanLoop::MayGoto
            }
            Err(e) => {
                log::info!("the kernel does not load may_goto ({e}): the scans loop with bpf_loop");
                ScanLoop::BpfLoop
            }
        }
    }
}

impl Dataplane {
    /// Locks `pin_dir`, loads the object with its maps pinned there and loads the
    /// program into the kernel. Maps a previous daemon left pinned (with
    /// `--keep-attached`, or by crashing) are adopted once their layout is checked, so
    /// forwarding goes on across the restart; `reset` removes them instead. Nothing a
    /// running program uses is written here (missing maps are created and pinned): the
    /// hash key waits for `write_hash_key`, so a daemon that fails to start before its
    /// take-over leaves a pinned, forwarding link as it was.
    ///
    /// An affinity map pinned with another size is resized: moved aside, replaced by a new
    /// one holding its newest entries, and removed at the take-over.
    pub fn load(
        pin_dir: &Path,
        iface: &str,
        reset: bool,
        key: HashKey,
        affinity: Affinity,
    ) -> anyhow::Result<Self> {
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
            if adopting {
                dp.adopt_backend_ids()?;
                dp.sync_service_ports()?;
                log::info!("adopted the maps pinned in {}", pin_dir.display());
            }
            if let Some(old) = resized {
                dp.copy_affinity_from(old)?;
            }
            anyhow::Ok(())
        })();
        if let Err(e) = adopted {
            if resizing {
                put_affinity_back(pin_dir);
            }
            return Err(e);
        }
        Ok(dp)
    }

    /// Fills the (new) affinity map with the newest entries of `old`, as many as fit.
    fn copy_affinity_from(&mut self, old: MapData) -> anyhow::Result<()> {
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

    /// The size of the affinity map, and whether the program uses it.
    pub fn affinity(&self) -> Affinity {
        self.affinity
    }

    /// Writes what the fast path needs to know of backend `id` (its generation is ours),
    /// unless that is what the map holds already.
    ///
    /// Flags that end affinity (disabled, or listed by no service) also start a new
    /// generation: the backend's calls do not come back to it when it is enabled again.
    pub fn set_backend_flags(&mut self, id: u32, flags: u32) -> anyhow::Result<()> {
        let had_affinity = self
            .flags_written
            .get(id as usize)
            .copied()
            .flatten()
            .is_some_and(|f| f.flags & BF_AFFINITY != 0);
        if had_affinity && flags & BF_AFFINITY == 0 {
            self.ids.bump_generation(id);
        }
        let value = BackendFlags {
            generation: self.ids.generation(id),
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

    /// What the backend flags map holds for `id` (as last written by this daemon).
    pub fn backend_flags(&self, id: u32) -> BackendFlags {
        self.flags_written
            .get(id as usize)
            .copied()
            .flatten()
            .unwrap_or_default()
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

    /// The ids that have an address, with it.
    pub fn backend_ids(&self) -> Vec<(std::net::SocketAddr, u32)> {
        self.ids
            .addrs()
            .filter_map(|a| Some((a, self.ids.get(a)?)))
            .collect()
    }

    /// Takes over the backend ids a previous daemon wrote, so that its tables (still in
    /// force until ours replace them) keep pointing at the right backends.
    fn adopt_backend_ids(&mut self) -> anyhow::Result<()> {
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
        self.ids.adopt(&found, &tables);
        let flags: Array<&MapData, BackendFlags> = Array::try_from(self.map(MAP_BACKEND_FLAGS)?)?;
        let generations = (0..MAX_BACKENDS)
            .map(|id| flags.get(&id, 0).map(|f| f.generation))
            .collect::<Result<Vec<u32>, _>>()
            .context("reading the backend generations")?;
        self.ids.adopt_generations(&generations);
        self.publish_next_hop_targets()?;
        Ok(())
    }

    /// The service id each VIP has in the services map (those of adopted maps).
    pub fn service_ids(&self) -> anyhow::Result<BTreeMap<std::net::SocketAddr, u32>> {
        let services: HashMap<&MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.map(MAP_SERVICES)?)?;
        let mut ids = BTreeMap::new();
        for entry in services.iter() {
            let (key, info) = entry.context("reading the services map")?;
            ids.insert(key.to_socket_addr(), info.id);
        }
        Ok(ids)
    }

    /// Detaches on purpose (a clean stop without --keep-attached; a failed start uses
    /// `abandon`): closes our link fd and removes the pins, the link pin last of all
    /// holders, which detaches the program.
    pub fn detach(&mut self) {
        self.drop_link();
        if let Some(dir) = &self.pin_dir {
            remove_pins(dir);
        }
    }

    /// Detaches our link, if we attached one.
    fn drop_link(&mut self) {
        if let Some(link) = self.link.take()
            && let Some(p) = self.ebpf.program_mut(self.scan_loop.program())
            && let Ok(prog) = <&mut Xdp>::try_from(p)
            && let Err(e) = prog.detach(link)
        {
            log::warn!("detaching XDP from {}: {e}", self.iface);
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

    /// The forwarding mode (`FWD_*`) of service `service_id` from its next table on.
    pub fn set_forwarding(&mut self, service_id: u32, mode: u32) {
        self.forwarding.insert(service_id, mode);
    }

    /// The outer source addresses of `ipip`.
    pub fn set_encap_source(&mut self, src: EncapSource) -> anyhow::Result<()> {
        let mut map: Array<&mut MapData, EncapSource> = Array::try_from(self.map_mut(MAP_ENCAP)?)?;
        map.set(0, src, 0)
            .context("writing the encapsulation source")?;
        Ok(())
    }

    /// The key `write_hash_key` writes (known once the key file is read or created).
    pub fn set_hash_key(&mut self, key: HashKey) {
        self.key = key;
    }

    /// Loads the object with private, unpinned maps (kernel tests, benchmarks). Its
    /// link, once attached, goes when the value is dropped.
    pub fn load_unpinned(key: HashKey, affinity: Affinity) -> anyhow::Result<Self> {
        let on = u8::from(affinity.on);
        let ebpf = EbpfLoader::new()
            .map_max_entries(MAP_AFFINITY, affinity.map_entries())
            .override_global(GLOBAL_AFFINITY_ON, &on, true)
            .load(OBJECT)
            .context("loading the XDP object")?;
        let mut dp = Self::init(ebpf, None, "", key, affinity)?;
        dp.write_hash_key()?;
        Ok(dp)
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

    fn init(
        ebpf: Ebpf,
        pin_dir: Option<PathBuf>,
        iface: &str,
        key: HashKey,
        affinity: Affinity,
    ) -> anyhow::Result<Self> {
        let mut dp = Dataplane {
            ebpf,
            pin_dir,
            iface: iface.to_string(),
            link: None,
            ids: BackendIds::new(MAX_BACKENDS),
            key,
            _pin_lock: None,
            found_pins: Vec::new(),
            affinity,
            forwarding: BTreeMap::new(),
            flags_written: vec![None; MAX_BACKENDS as usize],
            scan_loop: ScanLoop::BpfLoop,
            next_hop_targets: Default::default(),
        };
        dp.scan_loop = ScanLoop::choose(&mut dp.ebpf);
        log::info!(
            "loading {} (the scans loop with {})",
            dp.scan_loop.program(),
            dp.scan_loop.name()
        );
        load_retrying(dp.dispatch_program()?)
            .context("the kernel verifier rejected the XDP program")?;
        // Loaded for the held-call census (`crate::census`), never attached.
        load_retrying(census_program(&mut dp.ebpf)?)
            .context("the kernel verifier rejected the census program")?;
        Ok(dp)
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

    /// The dispatcher program (loaded into the kernel by `load`): `sip_dispatch`, or
    /// `sip_dispatch_cb` on kernels without `may_goto` (see [`ScanLoop`]).
    pub fn dispatch_program(&mut self) -> anyhow::Result<&mut Xdp> {
        let name = self.scan_loop.program();
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
            .try_into()?)
    }

    /// How the loaded dispatcher's scans loop.
    pub fn scan_loop(&self) -> ScanLoop {
        self.scan_loop
    }

    /// Attaches the dispatcher and pins the link. If a previous daemon left its link
    /// pinned, this program replaces the old one in it atomically instead (and the mode
    /// stays what it was). `Auto` tries native first, then skb.
    pub fn attach(&mut self, mode: crate::cli::XdpModeArg) -> anyhow::Result<AttachMode> {
        if let Some(dir) = self.pin_dir.clone()
            && dir.join(LINK_PIN).exists()
        {
            return self.replace_pinned(&dir.join(LINK_PIN));
        }
        let got = self.attach_new(mode)?;
        if let Some(dir) = self.pin_dir.clone()
            && let Some(id) = self.link.take()
        {
            let prog = self.dispatch_program()?;
            let link = prog.take_link(id)?;
            let fd_link = FdLink::try_from(link).context("the kernel gave no bpf_link for XDP")?;
            let pinned = fd_link
                .pin(dir.join(LINK_PIN))
                .with_context(|| format!("pinning the XDP link in {}", dir.display()))?;
            self.link = Some(
                self.dispatch_program()?
                    .attach_to_link(XdpLink::try_from(FdLink::from(pinned))?)?,
            );
        }
        Ok(got)
    }

    /// Whether the pinned link opens as an XDP link (what `attach` will replace the
    /// program in), checked before anything is written.
    pub fn check_pinned_link(&self) -> anyhow::Result<()> {
        let Some(pin) = self.pin_dir.as_ref().map(|d| d.join(LINK_PIN)) else {
            return Ok(());
        };
        let pinned = PinnedLink::from_pin(&pin)
            .with_context(|| format!("opening the pinned link {}", pin.display()))?;
        XdpLink::try_from(FdLink::from(pinned))
            .with_context(|| format!("the pinned link {} is not an XDP link", pin.display()))?;
        Ok(())
    }

    fn replace_pinned(&mut self, pin: &Path) -> anyhow::Result<AttachMode> {
        let pinned = PinnedLink::from_pin(pin)
            .with_context(|| format!("opening the pinned link {}", pin.display()))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .context("the pinned link is not an XDP link")?;
        let id = self
            .dispatch_program()?
            .attach_to_link(link)
            .context("replacing the program in the pinned XDP link")?;
        self.link = Some(id);
        let mode = attached_mode(&self.iface);
        log::info!(
            "took over the XDP link pinned at {} ({} mode)",
            pin.display(),
            mode.name()
        );
        Ok(mode)
    }

    fn attach_new(&mut self, mode: crate::cli::XdpModeArg) -> anyhow::Result<AttachMode> {
        use crate::cli::XdpModeArg;
        let iface = self.iface.clone();
        let prog = self.dispatch_program()?;
        let attempt = |prog: &mut Xdp, m: AttachMode| {
            let flags = match m {
                AttachMode::Native => XdpMode::Driver,
                AttachMode::Skb => XdpMode::Skb,
            };
            prog.attach(&iface, flags)
        };
        let (link, got) = match mode {
            XdpModeArg::Native => (attempt(prog, AttachMode::Native), AttachMode::Native),
            XdpModeArg::Skb => (attempt(prog, AttachMode::Skb), AttachMode::Skb),
            XdpModeArg::Auto => match attempt(prog, AttachMode::Native) {
                Ok(l) => (Ok(l), AttachMode::Native),
                Err(e) => {
                    log::info!("native XDP on {iface} failed ({e}); falling back to skb mode");
                    (attempt(prog, AttachMode::Skb), AttachMode::Skb)
                }
            },
        };
        let link =
            link.with_context(|| format!("attaching XDP to {iface} in {} mode", got.name()))?;
        self.link = Some(link);
        Ok(got)
    }

    /// Lets XDP_REDIRECT reach this interface.
    pub fn add_tx_port(&mut self, ifindex: u32) -> anyhow::Result<()> {
        let mut ports: DevMapHash<&mut MapData> =
            DevMapHash::try_from(self.map_mut(MAP_TX_PORTS)?)?;
        ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }

    pub fn set_backend(&mut self, id: u32, backend: Backend) -> anyhow::Result<()> {
        let mut backends: Array<&mut MapData, Backend> =
            Array::try_from(self.map_mut(MAP_BACKENDS)?)?;
        backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))?;
        Ok(())
    }

    /// Tells the next-hop cache which ids have which address now. Under its lock, the
    /// entry of an id whose address changed (new, reused or freed) loses its valid bit
    /// first: the fast path asks the FIB for it until the cache resolved the new one.
    fn publish_next_hop_targets(&mut self) -> anyhow::Result<()> {
        let now: BTreeMap<u32, std::net::IpAddr> = self
            .ids
            .addrs()
            .filter_map(|a| Some((self.ids.get(a)?, a.ip())))
            .collect();
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
            if hop.flags & sip_dispatch_common::NH_VALID != 0 {
                self.set_next_hop(
                    id,
                    sip_dispatch_common::NextHop {
                        flags: hop.flags & !sip_dispatch_common::NH_VALID,
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
        let data = match self.map(sip_dispatch_common::MAP_NEXTHOP)? {
            aya::maps::Map::Array(m) => m,
            _ => bail!(
                "map {} has an unexpected type",
                sip_dispatch_common::MAP_NEXTHOP
            ),
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
    pub fn next_hop(&self, id: u32) -> anyhow::Result<sip_dispatch_common::NextHop> {
        let map: Array<&MapData, sip_dispatch_common::NextHop> =
            Array::try_from(self.map(sip_dispatch_common::MAP_NEXTHOP)?)?;
        map.get(&id, 0)
            .with_context(|| format!("reading the next hop of backend {id}"))
    }

    /// Writes the fast path's next-hop entry of backend `id` (see `nexthops` for the
    /// order of writes that keeps readers from seeing a mix).
    pub fn set_next_hop(
        &mut self,
        id: u32,
        hop: sip_dispatch_common::NextHop,
    ) -> anyhow::Result<()> {
        let mut map: Array<&mut MapData, sip_dispatch_common::NextHop> =
            Array::try_from(self.map_mut(sip_dispatch_common::MAP_NEXTHOP)?)?;
        map.set(id, hop, 0)
            .with_context(|| format!("writing the next hop of backend {id}"))
    }

    /// Installs a service's slot table (entries are backend ids, or NO_BACKEND) with one
    /// atomic swap of the inner map, then makes sure the service entry points at it.
    pub fn publish_table(
        &mut self,
        service_id: u32,
        key: ServiceKey,
        slots: &[u32],
    ) -> anyhow::Result<()> {
        if slots.len() != SLOTS {
            bail!("slot table has {} entries, expected {SLOTS}", slots.len());
        }
        let inner: Array<MapData, u32> =
            Array::create(SLOTS as u32, TABLE_MAP_FLAGS).context("creating a slot table map")?;
        fill_mmapable(inner.map(), slots).context("filling a slot table")?;
        let mut tables: ArrayOfMaps<&mut MapData, Array<MapData, u32>> =
            ArrayOfMaps::try_from(self.map_mut(MAP_TABLES)?)?;
        tables
            .set(service_id, &inner, 0)
            .context("swapping in the slot table")?;
        // From here on the kernel may send calls to these ids: they stay allocated until
        // this table is replaced or unreachable.
        let referenced = slots
            .iter()
            .copied()
            .filter(|&id| id != NO_BACKEND)
            .collect();
        self.ids.table_installed(service_id, referenced);
        let flags = self
            .forwarding
            .get(&service_id)
            .copied()
            .unwrap_or(FWD_REWRITE);
        // The port first: until its bit is set the program passes the service's traffic.
        self.add_service_port(u16::from_be(key.port))?;
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.map_mut(MAP_SERVICES)?)?;
        services
            .insert(
                key,
                ServiceInfo {
                    id: service_id,
                    flags,
                },
                0,
            )
            .context("writing the service entry")?;
        Ok(())
    }

    /// The id of a backend address, allocating one (and writing its map entry, with
    /// zeroed counters) the first time.
    pub fn backend_id(&mut self, addr: std::net::SocketAddr) -> anyhow::Result<u32> {
        let (id, fresh) = self.ids.allocate(addr)?;
        if fresh
            && let Err(e) = self
                .write_new_backend(id, addr)
                .and_then(|()| self.publish_next_hop_targets())
        {
            self.ids.unallocate(addr);
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

    /// The id of a backend address that has one.
    pub fn known_backend_id(&self, addr: std::net::SocketAddr) -> Option<u32> {
        self.ids.get(addr)
    }

    /// The addresses that have an id.
    pub fn backend_addrs(&self) -> impl Iterator<Item = std::net::SocketAddr> + '_ {
        self.ids.addrs()
    }

    /// Frees the ids of addresses `listed` rejects, except those an installed table
    /// still references (they go once their table is replaced); returns the freed ones.
    ///
    /// A freed id gets its next generation and no flags: affinity entries written for
    /// its address are not followed any more.
    pub fn release_unlisted(
        &mut self,
        listed: impl Fn(std::net::SocketAddr) -> bool,
    ) -> Vec<(std::net::SocketAddr, u32)> {
        let freed = self.ids.release_unlisted(listed);
        if let Err(e) = self.publish_next_hop_targets() {
            log::warn!("next hops: {e:#}");
        }
        for (addr, id) in &freed {
            if let Err(e) = self.set_backend_flags(*id, 0) {
                // Its entries stay valid until the id is reused and written again.
                log::warn!("backend {addr}: {e:#}");
            }
        }
        freed
    }

    /// Swaps in a service's slot table, allocating ids for new backends.
    /// Returns (id, address, weight) per table member, in the table's order.
    pub fn install_service(
        &mut self,
        service_id: u32,
        vip: std::net::SocketAddr,
        table: &sip_dispatch_common::table::SlotTable,
    ) -> anyhow::Result<Vec<(u32, std::net::SocketAddr, u32)>> {
        let mut members = Vec::with_capacity(table.members.len());
        for m in &table.members {
            let addr = m.backend.to_socket_addr();
            members.push((self.backend_id(addr)?, addr, m.weight));
        }
        let slots: Vec<u32> = table
            .slots
            .iter()
            .map(|&m| {
                if m == NO_BACKEND {
                    NO_BACKEND
                } else {
                    members[m as usize].0
                }
            })
            .collect();
        self.publish_table(service_id, ServiceKey::from_socket_addr(vip), &slots)?;
        Ok(members)
    }

    /// Removes the service entries of VIPs not in `vips`.
    pub fn retain_services(&mut self, vips: &[std::net::SocketAddr]) -> anyhow::Result<()> {
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.map_mut(MAP_SERVICES)?)?;
        let stale: Vec<ServiceKey> = services
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !vips.contains(&k.to_socket_addr()))
            .collect();
        for k in stale {
            log::info!("removing the adopted service {}", k.to_socket_addr());
            services.remove(&k)?;
        }
        // A table no service entry points at is never read again: its ids are free to go.
        let reached: std::collections::BTreeSet<u32> = services
            .iter()
            .filter_map(Result::ok)
            .map(|(_, info)| info.id)
            .collect();
        for table in 0..MAX_SERVICES {
            if !reached.contains(&table) {
                self.ids.table_removed(table);
            }
        }
        self.sync_service_ports()
    }

    /// Sets the bit of a service's UDP port (host order) in the ports map.
    fn add_service_port(&mut self, port: u16) -> anyhow::Result<()> {
        let (word, bit) = service_port_bit(port);
        let mut ports: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(MAP_SERVICE_PORTS)?)?;
        let old = ports
            .get(&word, 0)
            .context("reading the service ports map")?;
        if old & bit == 0 {
            ports
                .set(word, old | bit, 0)
                .with_context(|| format!("marking UDP port {port} in the service ports map"))?;
        }
        Ok(())
    }

    /// Makes the ports map say exactly which ports the service entries use (after a
    /// removal, and at load: a map new to this version gets the adopted services' ports).
    fn sync_service_ports(&mut self) -> anyhow::Result<()> {
        let services: HashMap<&MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.map(MAP_SERVICES)?)?;
        let mut wanted = vec![0u64; SERVICE_PORT_WORDS as usize];
        for key in services.keys() {
            let (word, bit) = service_port_bit(u16::from_be(key?.port));
            wanted[word as usize] |= bit;
        }
        let mut ports: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(MAP_SERVICE_PORTS)?)?;
        for (word, want) in (0..SERVICE_PORT_WORDS).zip(wanted) {
            let old = ports
                .get(&word, 0)
                .context("reading the service ports map")?;
            if old != want {
                ports
                    .set(word, want, 0)
                    .context("writing the service ports map")?;
            }
        }
        Ok(())
    }

    /// Fast-path counters summed over CPUs, in `Counter` order.
    pub fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(MAP_COUNTERS)?)?;
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = map.get(&(*c as u32), 0)?;
                Ok((*c, saturating_sum(per_cpu.iter().copied())))
            })
            .collect()
    }

    pub fn backend_stats(&self, id: u32) -> anyhow::Result<BackendStats> {
        let map: PerCpuArray<&MapData, BackendStats> =
            PerCpuArray::try_from(self.map(MAP_BACKEND_STATS)?)?;
        let per_cpu = map.get(&id, 0)?;
        Ok(sum_backend_stats(per_cpu.iter()))
    }
}

/// Per-CPU kernel counters summed without overflow: a counter at the top of its range
/// (a wrapped or hostile map) stays there instead of panicking the daemon.
fn saturating_sum(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0, u64::saturating_add)
}

fn sum_backend_stats<'a>(per_cpu: impl Iterator<Item = &'a BackendStats>) -> BackendStats {
    per_cpu.fold(BackendStats::default(), |a, s| BackendStats {
        packets: a.packets.saturating_add(s.packets),
        bytes: a.bytes.saturating_add(s.bytes),
    })
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

fn census_program(ebpf: &mut Ebpf) -> anyhow::Result<&mut Xdp> {
    use sip_dispatch_common::census::PROG_CENSUS;
    Ok(ebpf
        .program_mut(PROG_CENSUS)
        .ok_or_else(|| anyhow!("program {PROG_CENSUS} missing from the XDP object"))?
        .try_into()?)
}

/// The layout each map must have: (name, type, key size, value size, max entries).
/// The affinity map's size is not checked here: a pin of another size is resized.
fn expected_layout() -> [(&'static str, MapType, u32, u32, u32); 14] {
    use std::mem::size_of;
    [
        (
            MAP_SERVICES,
            MapType::Hash,
            size_of::<ServiceKey>() as u32,
            size_of::<ServiceInfo>() as u32,
            MAX_SERVICES,
        ),
        (MAP_TABLES, MapType::ArrayOfMaps, 4, 4, MAX_SERVICES),
        (
            MAP_BACKENDS,
            MapType::Array,
            4,
            size_of::<Backend>() as u32,
            MAX_BACKENDS,
        ),
        (
            MAP_BACKEND_STATS,
            MapType::PerCpuArray,
            4,
            size_of::<BackendStats>() as u32,
            MAX_BACKENDS,
        ),
        (MAP_COUNTERS, MapType::PerCpuArray, 4, 8, Counter::COUNT),
        (MAP_CONFIG, MapType::Array, 4, size_of::<Config>() as u32, 1),
        (MAP_TX_PORTS, MapType::DevMapHash, 4, 8, 64),
        (
            MAP_SCRATCH,
            MapType::PerCpuArray,
            4,
            size_of::<Scratch>() as u32,
            1,
        ),
        (
            MAP_AFFINITY,
            MapType::LruHash,
            size_of::<AffinityKey>() as u32,
            size_of::<AffinityEntry>() as u32,
            0,
        ),
        (
            MAP_BACKEND_FLAGS,
            MapType::Array,
            4,
            size_of::<BackendFlags>() as u32,
            MAX_BACKENDS,
        ),
        (
            sip_dispatch_common::census::MAP_HELD,
            MapType::Array,
            4,
            8,
            sip_dispatch_common::census::HELD_SLOTS,
        ),
        (
            MAP_ENCAP,
            MapType::Array,
            4,
            size_of::<EncapSource>() as u32,
            1,
        ),
        (MAP_SERVICE_PORTS, MapType::Array, 4, 8, SERVICE_PORT_WORDS),
        (
            sip_dispatch_common::MAP_NEXTHOP,
            MapType::Array,
            4,
            size_of::<sip_dispatch_common::NextHop>() as u32,
            MAX_BACKENDS,
        ),
    ]
}

/// Refuses pinned maps whose type or sizes differ from this build's.
fn check_pinned_layout(dir: &Path) -> anyhow::Result<()> {
    for (name, kind, key, value, max) in expected_layout() {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .with_context(|| format!("reading the pinned map {}", path.display()))?;
        let entries = if name == MAP_AFFINITY {
            0
        } else {
            info.max_entries()
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

/// The mode the XDP program on `iface` runs in, as `ip link` reports it.
fn attached_mode(iface: &str) -> AttachMode {
    let out = std::process::Command::new("ip")
        .args(["-d", "link", "show", "dev", iface])
        .output();
    match out {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("xdpgeneric") => AttachMode::Skb,
        _ => AttachMode::Native,
    }
}

/// Attaches the pass-everything program to `iface` (see [`attach_program`]).
pub fn attach_pass(iface: &str) -> anyhow::Result<(Ebpf, XdpLinkId)> {
    attach_program(iface, PROG_PASS)
}

/// Attaches XDP program `name` of the object (`xdp_pass`, `ipip_decap`: programs
/// without maps of their own) to `iface` (kernel's choice of mode) and returns what keeps
/// it attached.
pub fn attach_program(iface: &str, name: &str) -> anyhow::Result<(Ebpf, XdpLinkId)> {
    let mut ebpf = EbpfLoader::new()
        .load(OBJECT)
        .context("loading the XDP object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
        .try_into()?;
    load_retrying(prog).with_context(|| format!("loading {name}"))?;
    let link = prog
        .attach(iface, XdpMode::Default)
        .with_context(|| format!("attaching {name} to {iface}"))?;
    Ok((ebpf, link))
}

/// Loads the object with private, unpinned maps and loads only the XDP program `name`
/// into the kernel. Get it back with `ebpf.program_mut(name)` to test-run or attach it.
pub fn load_program(name: &str) -> anyhow::Result<Ebpf> {
    load_program_of(OBJECT, name)
}

/// Loads the benchmarks' MAC-swap baseline ([`PROG_MAC_SWAP`], from its own object) into
/// the kernel; get it back with `ebpf.program_mut(PROG_MAC_SWAP)`.
///
/// [`PROG_MAC_SWAP`]: sip_dispatch_common::PROG_MAC_SWAP
#[cfg(feature = "mac-swap")]
pub fn load_mac_swap() -> anyhow::Result<Ebpf> {
    load_program_of(MAC_SWAP_OBJECT, sip_dispatch_common::PROG_MAC_SWAP)
}

fn load_program_of(object: &[u8], name: &str) -> anyhow::Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .load(object)
        .context("loading the XDP object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
        .try_into()?;
    load_retrying(prog).with_context(|| format!("loading {name}"))?;
    Ok(ebpf)
}

/// Loads `ipip_decap` with private, unpinned maps and fills its accepted outer sources
/// (`decap --from`; at most [`MAX_DECAP_SOURCES`] distinct ones). Attach it with
/// [`attach_loaded`], or get it back with `ebpf.program_mut(PROG_DECAP)` to test-run it.
pub fn load_decap(from: &[IpAddr]) -> anyhow::Result<Ebpf> {
    let from: BTreeSet<IpAddr> = from.iter().copied().collect();
    if from.len() > MAX_DECAP_SOURCES as usize {
        bail!(
            "{} decap sources given, at most {MAX_DECAP_SOURCES} are accepted",
            from.len()
        );
    }
    let mut ebpf = load_program(PROG_DECAP)?;
    let map = ebpf
        .map_mut(MAP_DECAP_FROM)
        .ok_or_else(|| anyhow!("map {MAP_DECAP_FROM} missing from the XDP object"))?;
    let mut map: HashMap<&mut MapData, DecapSource, u8> = HashMap::try_from(map)?;
    for ip in from {
        map.insert(DecapSource::new(ip), 1, 0)
            .with_context(|| format!("adding decap source {ip} to {MAP_DECAP_FROM}"))?;
    }
    Ok(ebpf)
}

/// Attaches the XDP program `name` of `ebpf`, loaded already, to `iface`.
pub fn attach_loaded(ebpf: &mut Ebpf, iface: &str, name: &str) -> anyhow::Result<XdpLinkId> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
        .try_into()?;
    prog.attach(iface, XdpMode::Default)
        .with_context(|| format!("attaching {name} to {iface}"))
}

/// Loads `prog` into the kernel, again when the verifier was interrupted: it gives up
/// with EAGAIN when a signal is pending for the loading thread (a child process of
/// another thread exiting, say), which a long verification (hundreds of ms for the
/// `bpf_loop` dispatcher) meets now and then. libbpf retries the same way, 5 attempts.
fn load_retrying(prog: &mut Xdp) -> Result<(), aya::programs::ProgramError> {
    let mut attempts = 5;
    loop {
        match prog.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts > 1 =>
            {
                attempts -= 1;
                log::debug!("the verifier was interrupted (EAGAIN): loading again");
            }
            other => return other,
        }
    }
}

/// Writes `values` into an mmap-able array map of as many u32 entries: one copy through
/// a shared mapping of the map's memory instead of one syscall per entry. The kernel
/// lays array elements out 8-byte aligned, so each u32 takes 8 bytes there.
fn fill_mmapable(map: &MapData, values: &[u32]) -> anyhow::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const ELEM: usize = 8;
    let len = values.len() * ELEM;
    let fd = map.fd().as_fd().as_raw_fd();
    // SAFETY: a fresh shared mapping of the map's memory (the kernel checks the length
    // against the map's size); nothing else aliases it in this process.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        bail!("mmap of the map: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `mem` is a writable, page-aligned mapping of `len` bytes: room for one
    // aligned u32 every ELEM bytes.
    unsafe {
        let base = mem.cast::<u8>();
        for (i, v) in values.iter().enumerate() {
            base.add(i * ELEM).cast::<u32>().write(*v);
        }
        libc::munmap(mem, len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn programs_of(object: &[u8]) -> BTreeSet<String> {
        let parsed = aya_obj::Object::parse(object).expect("the embedded object parses");
        parsed.programs.into_keys().collect()
    }

    #[test]
    fn the_daemon_object_has_no_benchmark_baseline() {
        let programs = programs_of(OBJECT);
        assert!(programs.contains(PROG_DISPATCH), "{programs:?}");
        assert!(
            !programs.contains(sip_dispatch_common::PROG_MAC_SWAP),
            "{programs:?}"
        );
    }

    #[cfg(feature = "mac-swap")]
    #[test]
    fn the_mac_swap_object_holds_the_baseline_alone() {
        let programs = programs_of(MAC_SWAP_OBJECT);
        assert_eq!(
            programs.into_iter().collect::<Vec<_>>(),
            [sip_dispatch_common::PROG_MAC_SWAP]
        );
    }

    #[test]
    fn per_cpu_sums_saturate_instead_of_overflowing() {
        assert_eq!(saturating_sum([1, 2, 3].into_iter()), 6);
        assert_eq!(saturating_sum([u64::MAX, 1, 5].into_iter()), u64::MAX);
        let per_cpu = [
            BackendStats {
                packets: u64::MAX - 1,
                bytes: 10,
            },
            BackendStats {
                packets: 7,
                bytes: u64::MAX,
            },
        ];
        let sum = sum_backend_stats(per_cpu.iter());
        assert_eq!((sum.packets, sum.bytes), (u64::MAX, u64::MAX));
    }

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
