//! The loaded XDP object: its maps (pinned under the pin directory) and its attachment.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray, PerCpuValues, xdp::DevMapHash},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use sip_dispatch_common::{
    ALL_MAPS, Backend, BackendStats, Config, Counter, HashKey, MAP_BACKEND_STATS, MAP_BACKENDS,
    MAP_CONFIG, MAP_COUNTERS, MAP_SERVICES, MAP_TABLES, MAP_TX_PORTS, MAX_BACKENDS, NO_BACKEND,
    PROG_DISPATCH, PROG_PASS, SLOTS, ServiceInfo, ServiceKey,
};

/// The XDP object built from the sip-dispatch-ebpf crate by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sip-dispatch"));

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

pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    iface: String,
    link: Option<XdpLinkId>,
    ids: BackendIds,
}

/// Backend ids: one per backend address for as long as the address is configured, so
/// that its counters survive table rebuilds. Freed ids are reused lowest first.
#[derive(Default)]
struct BackendIds {
    by_addr: std::collections::HashMap<std::net::SocketAddr, u32>,
    free: std::collections::BTreeSet<u32>,
    next: u32,
}

impl Dataplane {
    /// Loads the object with its maps pinned in `pin_dir` (which must be empty unless
    /// `reset` is given), sets the hash key and loads the program into the kernel.
    pub fn load(pin_dir: &Path, iface: &str, reset: bool, key: HashKey) -> anyhow::Result<Self> {
        crate::bpffs::prepare_pin_dir(pin_dir)?;
        let stale: Vec<PathBuf> = ALL_MAPS
            .iter()
            .map(|m| pin_dir.join(m))
            .filter(|p| p.exists())
            .collect();
        if !stale.is_empty() {
            if !reset {
                bail!(
                    "maps are already pinned in {} (another sip-dispatch on {iface}, or one that \
                     did not exit cleanly): stop it, or start with --reset",
                    pin_dir.display()
                );
            }
            for p in stale {
                std::fs::remove_file(&p)
                    .with_context(|| format!("removing stale pin {}", p.display()))?;
            }
        }
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(OBJECT).context("loading the XDP object")?;
        Self::init(ebpf, Some(pin_dir.to_path_buf()), iface, key)
    }

    /// Loads the object with private, unpinned maps (kernel tests, benchmarks).
    pub fn load_unpinned(key: HashKey) -> anyhow::Result<Self> {
        let ebpf = EbpfLoader::new()
            .load(OBJECT)
            .context("loading the XDP object")?;
        Self::init(ebpf, None, "", key)
    }

    fn init(
        ebpf: Ebpf,
        pin_dir: Option<PathBuf>,
        iface: &str,
        key: HashKey,
    ) -> anyhow::Result<Self> {
        let mut dp = Dataplane {
            ebpf,
            pin_dir,
            iface: iface.to_string(),
            link: None,
            ids: BackendIds::default(),
        };
        dp.dispatch_program()?
            .load()
            .context("the kernel verifier rejected the XDP program")?;
        let mut config: Array<&mut MapData, Config> = Array::try_from(dp.map_mut(MAP_CONFIG)?)?;
        config
            .set(
                0,
                Config {
                    hash_key: [key.k0, key.k1],
                },
                0,
            )
            .context("writing the hash key")?;
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

    /// The dispatcher program (loaded into the kernel by `load`).
    pub fn dispatch_program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(PROG_DISPATCH)
            .ok_or_else(|| anyhow!("program {PROG_DISPATCH} missing from the XDP object"))?
            .try_into()?)
    }

    /// Attaches the dispatcher. `Auto` tries native first, then skb.
    pub fn attach(&mut self, mode: crate::cli::XdpModeArg) -> anyhow::Result<AttachMode> {
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
        let mut inner: Array<MapData, u32> =
            Array::create(SLOTS as u32, 0).context("creating a slot table map")?;
        for (i, b) in slots.iter().enumerate() {
            inner.set(i as u32, *b, 0).context("filling a slot table")?;
        }
        let mut tables: ArrayOfMaps<&mut MapData, Array<MapData, u32>> =
            ArrayOfMaps::try_from(self.map_mut(MAP_TABLES)?)?;
        tables
            .set(service_id, &inner, 0)
            .context("swapping in the slot table")?;
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.map_mut(MAP_SERVICES)?)?;
        services
            .insert(
                key,
                ServiceInfo {
                    id: service_id,
                    flags: 0,
                },
                0,
            )
            .context("writing the service entry")?;
        Ok(())
    }

    /// The id of a backend address, allocating one (and writing its map entry, with
    /// zeroed counters) the first time.
    pub fn backend_id(&mut self, addr: std::net::SocketAddr) -> anyhow::Result<u32> {
        if let Some(id) = self.ids.by_addr.get(&addr) {
            return Ok(*id);
        }
        let id = match self.ids.free.pop_first() {
            Some(id) => id,
            None if self.ids.next < MAX_BACKENDS => {
                self.ids.next += 1;
                self.ids.next - 1
            }
            None => bail!("more than {MAX_BACKENDS} backends"),
        };
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
        self.ids.by_addr.insert(addr, id);
        Ok(id)
    }

    /// The id of a backend address that has one.
    pub fn known_backend_id(&self, addr: std::net::SocketAddr) -> Option<u32> {
        self.ids.by_addr.get(&addr).copied()
    }

    /// The addresses that have an id.
    pub fn backend_addrs(&self) -> impl Iterator<Item = std::net::SocketAddr> + '_ {
        self.ids.by_addr.keys().copied()
    }

    /// Frees a backend's id. Call only once no published table refers to it.
    pub fn release_backend(&mut self, addr: std::net::SocketAddr) {
        if let Some(id) = self.ids.by_addr.remove(&addr) {
            self.ids.free.insert(id);
        }
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

    /// Fast-path counters summed over CPUs, in `Counter` order.
    pub fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(MAP_COUNTERS)?)?;
        Counter::ALL
            .iter()
            .map(|c| Ok((*c, map.get(&(*c as u32), 0)?.iter().sum())))
            .collect()
    }

    pub fn backend_stats(&self, id: u32) -> anyhow::Result<BackendStats> {
        let map: PerCpuArray<&MapData, BackendStats> =
            PerCpuArray::try_from(self.map(MAP_BACKEND_STATS)?)?;
        let per_cpu = map.get(&id, 0)?;
        Ok(per_cpu
            .iter()
            .fold(BackendStats::default(), |a, s| BackendStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
            }))
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if let Some(link) = self.link.take()
            && let Some(p) = self.ebpf.program_mut(PROG_DISPATCH)
            && let Ok(prog) = <&mut Xdp>::try_from(p)
            && let Err(e) = prog.detach(link)
        {
            log::warn!("detaching XDP from {}: {e}", self.iface);
        }
        let Some(dir) = &self.pin_dir else { return };
        for m in ALL_MAPS {
            let p = dir.join(m);
            if let Err(e) = std::fs::remove_file(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                log::warn!("removing pin {}: {e}", p.display());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
}

/// Attaches the pass-everything program to `iface` (kernel's choice of mode) and returns
/// what keeps it attached.
pub fn attach_pass(iface: &str) -> anyhow::Result<(Ebpf, XdpLinkId)> {
    let mut ebpf = EbpfLoader::new()
        .load(OBJECT)
        .context("loading the XDP object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_PASS)
        .ok_or_else(|| anyhow!("program {PROG_PASS} missing from the XDP object"))?
        .try_into()?;
    prog.load().context("loading xdp_pass")?;
    let link = prog
        .attach(iface, XdpMode::Default)
        .with_context(|| format!("attaching xdp_pass to {iface}"))?;
    Ok((ebpf, link))
}

/// Loads the object with private, unpinned maps and loads only the XDP program `name`
/// into the kernel (benchmarks: the MAC-swap baseline). Get it back with
/// `ebpf.program_mut(name)` to test-run or attach it.
pub fn load_program(name: &str) -> anyhow::Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .load(OBJECT)
        .context("loading the XDP object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
        .try_into()?;
    prog.load().with_context(|| format!("loading {name}"))?;
    Ok(ebpf)
}
