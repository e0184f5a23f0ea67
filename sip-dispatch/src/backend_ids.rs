//! Backend ids: the index of a backend's entry (address and counters) in the kernel's
//! backend map, which slot tables name. One per address for as long as the address is
//! listed by a service, so that its counters survive table rebuilds.
//!
//! An id is freed only when no service lists its address AND no installed slot table
//! references it: a table still in the kernel (because a later publish failed, or the
//! XDP program is on an older one) would otherwise send calls to whatever address the
//! id is given next. Freed ids are reused lowest first.
//!
//! Each id has a generation, bumped when the id is freed: an affinity entry written for
//! the id's earlier address no longer matches its generation, so it is never followed to
//! the next address the id is given.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

#[derive(Debug)]
pub struct BackendIds {
    by_addr: HashMap<SocketAddr, u32>,
    free: BTreeSet<u32>,
    /// Ids below this were handed out at least once.
    next: u32,
    capacity: u32,
    /// Per table index (a service id): the ids its installed table references.
    installed: BTreeMap<u32, BTreeSet<u32>>,
    /// Per id: its generation (see the module docs).
    generations: Vec<u32>,
}

/// Every id is in use.
#[derive(Debug, PartialEq, Eq)]
pub struct Full(pub u32);

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "more than {} backends", self.0)
    }
}

impl std::error::Error for Full {}

impl BackendIds {
    /// Ids `0..capacity`.
    pub fn new(capacity: u32) -> BackendIds {
        BackendIds {
            by_addr: HashMap::new(),
            free: BTreeSet::new(),
            next: 0,
            capacity,
            installed: BTreeMap::new(),
            generations: vec![0; capacity as usize],
        }
    }

    /// The generation of `id` (0 for an id beyond the capacity).
    pub fn generation(&self, id: u32) -> u32 {
        self.generations.get(id as usize).copied().unwrap_or(0)
    }

    /// Starts a new generation of `id`: the affinity entries written for it so far no
    /// longer match (an operator's disable ends affinity for good).
    pub fn bump_generation(&mut self, id: u32) {
        if let Some(g) = self.generations.get_mut(id as usize) {
            *g = g.wrapping_add(1);
        }
    }

    /// Takes over the generations a previous daemon left (index = id).
    pub fn adopt_generations(&mut self, generations: &[u32]) {
        for (g, found) in self.generations.iter_mut().zip(generations) {
            *g = *found;
        }
    }

    /// The id of an address that has one.
    pub fn get(&self, addr: SocketAddr) -> Option<u32> {
        self.by_addr.get(&addr).copied()
    }

    /// Every address that has an id, with it.
    pub fn assigned(&self) -> impl Iterator<Item = (SocketAddr, u32)> + '_ {
        self.by_addr.iter().map(|(a, id)| (*a, *id))
    }

    /// The id of `addr`, and whether it was just allocated (its map entry is then to be
    /// written; [`BackendIds::unallocate`] undoes it if that fails).
    pub fn allocate(&mut self, addr: SocketAddr) -> Result<(u32, bool), Full> {
        if let Some(id) = self.get(addr) {
            return Ok((id, false));
        }
        let id = match self.free.pop_first() {
            Some(id) => {
                // Bumped again on reuse: an entry a packet still on an old table wrote
                // for the freed id (with the generation of the free) must not name the
                // new address either.
                if let Some(g) = self.generations.get_mut(id as usize) {
                    *g = g.wrapping_add(1);
                }
                id
            }
            None if self.next < self.capacity => {
                self.next += 1;
                self.next - 1
            }
            None => return Err(Full(self.capacity)),
        };
        self.by_addr.insert(addr, id);
        Ok((id, true))
    }

    /// Takes back an id [`BackendIds::allocate`] just handed out, before any table used it.
    pub fn unallocate(&mut self, addr: SocketAddr) {
        if let Some(id) = self.by_addr.remove(&addr) {
            self.free.insert(id);
        }
    }

    /// Takes over ids a previous daemon wrote (`found`: address and id). Which ids its
    /// tables reference is not read back: each of `tables` (the table indexes its service
    /// entries point at) is taken to reference all of them until replaced.
    pub fn adopt(&mut self, found: &[(SocketAddr, u32)], tables: &[u32]) {
        for &(addr, id) in found {
            if id >= self.capacity {
                continue;
            }
            self.by_addr.insert(addr, id);
            self.next = self.next.max(id + 1);
        }
        let used: BTreeSet<u32> = self.by_addr.values().copied().collect();
        self.free = (0..self.next).filter(|i| !used.contains(i)).collect();
        for &table in tables {
            self.installed.insert(table, used.clone());
        }
    }

    /// The table at index `table` was swapped in and references `ids` (its slots).
    pub fn table_installed(&mut self, table: u32, ids: BTreeSet<u32>) {
        self.installed.insert(table, ids);
    }

    /// The table at index `table` can no longer be reached (no service entry points at it).
    pub fn table_removed(&mut self, table: u32) {
        self.installed.remove(&table);
    }

    /// Whether an installed table references `id`.
    pub fn referenced(&self, id: u32) -> bool {
        self.installed.values().any(|ids| ids.contains(&id))
    }

    /// Frees the ids of addresses for which `listed` is false and that no installed table
    /// references; returns them (address, id).
    pub fn release_unlisted(
        &mut self,
        listed: impl Fn(SocketAddr) -> bool,
    ) -> Vec<(SocketAddr, u32)> {
        let gone: Vec<(SocketAddr, u32)> = self
            .by_addr
            .iter()
            .map(|(a, id)| (*a, *id))
            .filter(|(a, id)| !listed(*a) && !self.referenced(*id))
            .collect();
        for (addr, id) in &gone {
            self.by_addr.remove(addr);
            self.free.insert(*id);
            if let Some(g) = self.generations.get_mut(*id as usize) {
                *g = g.wrapping_add(1);
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, n], 5060))
    }

    fn set(ids: &[u32]) -> BTreeSet<u32> {
        ids.iter().copied().collect()
    }

    #[test]
    fn ids_are_stable_and_reused_lowest_first() {
        let mut ids = BackendIds::new(8);
        assert_eq!(ids.allocate(addr(1)), Ok((0, true)));
        assert_eq!(ids.allocate(addr(2)), Ok((1, true)));
        assert_eq!(ids.allocate(addr(3)), Ok((2, true)));
        assert_eq!(ids.allocate(addr(2)), Ok((1, false)));
        let freed = ids.release_unlisted(|a| a != addr(2));
        assert_eq!(freed, vec![(addr(2), 1)]);
        // Then addr(1) goes too; the lowest free id comes first.
        assert_eq!(ids.release_unlisted(|a| a == addr(3)), vec![(addr(1), 0)]);
        assert_eq!(ids.allocate(addr(4)), Ok((0, true)));
        assert_eq!(ids.allocate(addr(5)), Ok((1, true)));
        assert_eq!(ids.allocate(addr(6)), Ok((3, true)));
    }

    #[test]
    fn a_freed_id_comes_back_with_the_next_generation() {
        let mut ids = BackendIds::new(4);
        let (a, _) = ids.allocate(addr(1)).unwrap();
        assert_eq!(ids.generation(a), 0);
        ids.release_unlisted(|_| false);
        assert_eq!(ids.generation(a), 1);
        assert_eq!(ids.allocate(addr(2)), Ok((a, true)));
        assert_eq!(ids.generation(a), 2, "reusing it bumps it again");
        // Taking back an id no table used is no new user.
        ids.unallocate(addr(2));
        assert_eq!(ids.generation(a), 2);
        ids.adopt_generations(&[u32::MAX - 1, 7]);
        assert_eq!((ids.generation(0), ids.generation(1)), (u32::MAX - 1, 7));
        ids.allocate(addr(3)).unwrap();
        ids.release_unlisted(|_| false);
        assert_eq!(ids.generation(0), 0, "generations wrap");
        assert_eq!(ids.generation(99), 0);
    }

    #[test]
    fn full_when_every_id_is_taken() {
        let mut ids = BackendIds::new(2);
        ids.allocate(addr(1)).unwrap();
        ids.allocate(addr(2)).unwrap();
        assert_eq!(ids.allocate(addr(3)), Err(Full(2)));
        assert_eq!(Full(2).to_string(), "more than 2 backends");
        ids.unallocate(addr(2));
        assert_eq!(ids.allocate(addr(3)), Ok((1, true)));
    }

    #[test]
    fn an_id_in_an_installed_table_is_not_freed() {
        let mut ids = BackendIds::new(8);
        let (a, _) = ids.allocate(addr(1)).unwrap();
        let (b, _) = ids.allocate(addr(2)).unwrap();
        ids.table_installed(0, set(&[a, b]));
        // addr(2) is no longer listed, but the table in force still sends calls to it.
        assert!(ids.release_unlisted(|x| x == addr(1)).is_empty());
        assert_eq!(ids.get(addr(2)), Some(b));
        // A new address must not get b while that table is installed.
        assert_eq!(ids.allocate(addr(3)), Ok((2, true)));
        // The replacement table no longer references b: now it goes.
        ids.table_installed(0, set(&[a, 2]));
        assert_eq!(ids.release_unlisted(|x| x != addr(2)), vec![(addr(2), b)]);
        assert_eq!(ids.allocate(addr(4)), Ok((b, true)));
    }

    /// Two services share backend addr(2). Service 1's new table drops it, the operator
    /// removed it, and service 2's publish fails: service 2's old table (still in the
    /// kernel) references its id, so the id is kept and never given to another address.
    #[test]
    fn failed_publish_of_service_2_keeps_the_id_of_its_old_table() {
        let mut ids = BackendIds::new(8);
        let a = ids.allocate(addr(1)).unwrap().0;
        let b = ids.allocate(addr(2)).unwrap().0;
        ids.table_installed(1, set(&[a, b]));
        ids.table_installed(2, set(&[a, b]));
        // addr(2) removed from both services; service 1 publishes, service 2 fails
        // (no table_installed for 2).
        ids.table_installed(1, set(&[a]));
        let listed = |x: SocketAddr| x == addr(1) || x == addr(9);
        assert!(ids.release_unlisted(listed).is_empty());
        assert!(ids.referenced(b));
        let (c, fresh) = ids.allocate(addr(9)).unwrap();
        assert!(fresh);
        assert_ne!(
            c,
            b,
            "the id of service 2's old table was reused for {}",
            addr(9)
        );
        assert_eq!(ids.get(addr(2)), Some(b));
        // Service 2's retry succeeds: the id is released with the next sweep.
        ids.table_installed(2, set(&[a, c]));
        assert_eq!(ids.release_unlisted(listed), vec![(addr(2), b)]);
    }

    #[test]
    fn a_table_no_service_reaches_holds_nothing() {
        let mut ids = BackendIds::new(8);
        let b = ids.allocate(addr(2)).unwrap().0;
        ids.table_installed(3, set(&[b]));
        assert!(ids.release_unlisted(|_| false).is_empty());
        ids.table_removed(3);
        assert_eq!(ids.release_unlisted(|_| false), vec![(addr(2), b)]);
    }

    #[test]
    fn adopted_ids_are_held_by_the_adopted_tables_until_replaced() {
        let mut ids = BackendIds::new(8);
        ids.adopt(&[(addr(1), 0), (addr(2), 3), (addr(7), 99)], &[0, 1]);
        assert_eq!(ids.get(addr(2)), Some(3));
        assert_eq!(
            ids.get(addr(7)),
            None,
            "an id beyond the capacity is ignored"
        );
        // The gaps are free, lowest first.
        assert_eq!(ids.allocate(addr(4)), Ok((1, true)));
        // Only addr(4) is listed; both adopted tables still reference ids 0 and 3.
        assert!(ids.release_unlisted(|a| a == addr(4)).is_empty());
        ids.table_installed(0, set(&[1]));
        assert!(ids.release_unlisted(|a| a == addr(4)).is_empty());
        ids.table_removed(1);
        let mut freed = ids.release_unlisted(|a| a == addr(4));
        freed.sort();
        assert_eq!(freed, vec![(addr(1), 0), (addr(2), 3)]);
        assert_eq!(ids.allocate(addr(5)), Ok((0, true)));
        assert_eq!(ids.allocate(addr(6)), Ok((2, true)));
    }
}
