//! Services: their entries, their slot tables (swapped in whole) and the ports map.
use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use aya::maps::{Array, ArrayOfMaps, HashMap, IterableMap as _, MapData};
use sip_dispatch_common::{
    FWD_REWRITE, MAP_SERVICE_PORTS, MAP_SERVICES, MAP_TABLES, MAX_SERVICES, NO_BACKEND,
    SERVICE_PORT_WORDS, SLOTS, ServiceInfo, ServiceKey, TABLE_MAP_FLAGS, service_port_bit,
    table::SlotTable,
};

use super::Dataplane;
use crate::backend_ids::BackendIds;

impl Dataplane {
    /// Installs a service's slot table (entries are backend ids, or NO_BACKEND) with one
    /// atomic swap of the inner map, then makes sure the service entry points at it.
    pub fn publish_table(
        &mut self,
        ids: &mut BackendIds,
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
        ids.table_installed(service_id, referenced);
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

    /// Swaps in a service's slot table, allocating ids for new backends.
    /// Returns (id, address, weight) per table member, in the table's order.
    pub fn install_service(
        &mut self,
        ids: &mut BackendIds,
        service_id: u32,
        vip: std::net::SocketAddr,
        table: &SlotTable,
    ) -> anyhow::Result<Vec<(u32, std::net::SocketAddr, u32)>> {
        let mut members = Vec::with_capacity(table.members.len());
        for m in &table.members {
            let addr = m.backend.to_socket_addr();
            members.push((self.backend_id(ids, addr)?, addr, m.weight));
        }
        let member_ids: Vec<u32> = members.iter().map(|(id, _, _)| *id).collect();
        let slots = slot_ids(table, &member_ids);
        self.publish_table(ids, service_id, ServiceKey::from_socket_addr(vip), &slots)?;
        Ok(members)
    }

    /// Removes the service entries of VIPs not in `vips`.
    pub fn retain_services(
        &mut self,
        ids: &mut BackendIds,
        vips: &[std::net::SocketAddr],
    ) -> anyhow::Result<()> {
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
                ids.table_removed(table);
            }
        }
        self.sync_service_ports()
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

    /// The forwarding mode (`FWD_*`) of service `service_id` from its next table on.
    pub fn set_forwarding(&mut self, service_id: u32, mode: u32) {
        self.forwarding.insert(service_id, mode);
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
    pub(super) fn sync_service_ports(&mut self) -> anyhow::Result<()> {
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
}

/// A table's slots as backend ids: `member_ids` holds the id of each of its members.
pub fn slot_ids(table: &SlotTable, member_ids: &[u32]) -> Vec<u32> {
    table
        .slots
        .iter()
        .map(|&m| {
            if m == NO_BACKEND {
                NO_BACKEND
            } else {
                member_ids[m as usize]
            }
        })
        .collect()
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
