//! The map contract as one table: every map of the XDP object, with its kernel type,
//! key and value sizes, entries, flags and whether the daemon pins it.
//!
//! The eBPF crate declares the maps (`#[btf_map(name = "...")]` takes only a string
//! literal, so the names are typed there again); the daemon checks pinned maps against
//! [`MAPS`] before it reuses them; and a unit test of the daemon parses the embedded
//! object and compares its maps with [`MAPS`], both ways, so that neither side can drift.
use crate::{
    AFFINITY_ENTRIES_MIN, AffinityEntry, AffinityKey, BACKEND_FLAGS_MAP_FLAGS, Backend,
    BackendFlags, BackendStats, Config, Counter, DecapSource, EncapSource, MAP_AFFINITY,
    MAP_BACKEND_FLAGS, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONFIG, MAP_COUNTERS, MAP_DECAP_FROM,
    MAP_ENCAP, MAP_NEXTHOP, MAP_SCRATCH, MAP_SERVICE_PORTS, MAP_SERVICES, MAP_TABLES, MAP_TX_PORTS,
    MAX_BACKENDS, MAX_DECAP_SOURCES, MAX_SERVICES, MAX_TX_PORTS, NextHop, SERVICE_PORT_WORDS,
    SERVICES_MAP_FLAGS, SLOTS, Scratch, ServiceInfo, ServiceKey, TABLE_MAP_FLAGS,
    census::{HELD_SLOTS, MAP_HELD},
};

/// A map's type, with the kernel's number for it (`enum bpf_map_type`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash = 1,
    Array = 2,
    PerCpuArray = 6,
    LruHash = 9,
    ArrayOfMaps = 12,
    DevMapHash = 25,
}

impl MapKind {
    /// The kind of the kernel's map type `raw`, if it is one the object uses.
    pub const fn from_raw(raw: u32) -> Option<MapKind> {
        Some(match raw {
            1 => MapKind::Hash,
            2 => MapKind::Array,
            6 => MapKind::PerCpuArray,
            9 => MapKind::LruHash,
            12 => MapKind::ArrayOfMaps,
            25 => MapKind::DevMapHash,
            _ => return None,
        })
    }
}

/// How many entries a map has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entries {
    /// Fixed by this build.
    Fixed(u32),
    /// Set by the loader (the affinity map: `--affinity-entries`); the object declares
    /// `declared` as a placeholder. A pinned map of another size is resized, not refused.
    AtLoad { declared: u32 },
}

impl Entries {
    /// The entries the object declares.
    pub const fn declared(self) -> u32 {
        match self {
            Entries::Fixed(n) | Entries::AtLoad { declared: n } => n,
        }
    }
}

/// The layout of the inner maps of a map of maps (the template the object declares).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InnerMap {
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// One map of the XDP object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub entries: Entries,
    /// `map_flags` at creation (`BPF_F_*`).
    pub flags: u32,
    /// Pinned under the pin directory by the daemon (and adopted by the next one).
    pub pinned: bool,
    /// A map of maps: the layout of its inner maps.
    pub inner: Option<InnerMap>,
}

/// Size of `T` as the kernel's key or value size.
const fn size<T>() -> u32 {
    size_of::<T>() as u32
}

/// The index of an array map.
const INDEX: u32 = size::<u32>();

/// What a devmap stores per port (`struct bpf_devmap_val`: ifindex, program fd).
const DEVMAP_VALUE: u32 = 8;

const fn map(name: &'static str, kind: MapKind, key: u32, value: u32, entries: u32) -> MapSpec {
    MapSpec {
        name,
        kind,
        key_size: key,
        value_size: value,
        entries: Entries::Fixed(entries),
        flags: 0,
        pinned: true,
        inner: None,
    }
}

/// Every map of the XDP object. The pinned ones come first, in [`ALL_MAPS`] order.
pub const MAPS: &[MapSpec] = &[
    MapSpec {
        flags: SERVICES_MAP_FLAGS,
        ..map(
            MAP_SERVICES,
            MapKind::Hash,
            size::<ServiceKey>(),
            size::<ServiceInfo>(),
            MAX_SERVICES,
        )
    },
    MapSpec {
        inner: Some(InnerMap {
            kind: MapKind::Array,
            key_size: INDEX,
            value_size: size::<u32>(),
            max_entries: SLOTS as u32,
            flags: TABLE_MAP_FLAGS,
        }),
        // The value of a map of maps is the inner map's fd (id, when read).
        ..map(MAP_TABLES, MapKind::ArrayOfMaps, INDEX, 4, MAX_SERVICES)
    },
    map(
        MAP_BACKENDS,
        MapKind::Array,
        INDEX,
        size::<Backend>(),
        MAX_BACKENDS,
    ),
    map(
        MAP_BACKEND_STATS,
        MapKind::PerCpuArray,
        INDEX,
        size::<BackendStats>(),
        MAX_BACKENDS,
    ),
    map(
        MAP_COUNTERS,
        MapKind::PerCpuArray,
        INDEX,
        size::<u64>(),
        Counter::COUNT,
    ),
    map(MAP_CONFIG, MapKind::Array, INDEX, size::<Config>(), 1),
    map(
        MAP_TX_PORTS,
        MapKind::DevMapHash,
        size::<u32>(),
        DEVMAP_VALUE,
        MAX_TX_PORTS,
    ),
    map(
        MAP_SCRATCH,
        MapKind::PerCpuArray,
        INDEX,
        size::<Scratch>(),
        1,
    ),
    MapSpec {
        entries: Entries::AtLoad {
            declared: AFFINITY_ENTRIES_MIN,
        },
        ..map(
            MAP_AFFINITY,
            MapKind::LruHash,
            size::<AffinityKey>(),
            size::<AffinityEntry>(),
            0,
        )
    },
    MapSpec {
        flags: BACKEND_FLAGS_MAP_FLAGS,
        ..map(
            MAP_BACKEND_FLAGS,
            MapKind::Array,
            INDEX,
            size::<BackendFlags>(),
            MAX_BACKENDS,
        )
    },
    map(MAP_ENCAP, MapKind::Array, INDEX, size::<EncapSource>(), 1),
    map(MAP_HELD, MapKind::Array, INDEX, size::<u64>(), HELD_SLOTS),
    map(
        MAP_SERVICE_PORTS,
        MapKind::Array,
        INDEX,
        size::<u64>(),
        SERVICE_PORT_WORDS,
    ),
    map(
        MAP_NEXTHOP,
        MapKind::Array,
        INDEX,
        size::<NextHop>(),
        MAX_BACKENDS,
    ),
    // Filled by `sip-dispatch decap` in its own, unpinned copy of the object.
    MapSpec {
        pinned: false,
        ..map(
            MAP_DECAP_FROM,
            MapKind::Hash,
            size::<DecapSource>(),
            size::<u8>(),
            MAX_DECAP_SOURCES,
        )
    },
];

/// The map of [`MAPS`] called `name`.
pub fn map_spec(name: &str) -> Option<&'static MapSpec> {
    MAPS.iter().find(|m| m.name == name)
}

const fn pinned_count() -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < MAPS.len() {
        if MAPS[i].pinned {
            n += 1;
        }
        i += 1;
    }
    n
}

const fn pinned_names<const N: usize>() -> [&'static str; N] {
    let mut names = [""; N];
    let (mut i, mut n) = (0, 0);
    while i < MAPS.len() {
        if MAPS[i].pinned {
            names[n] = MAPS[i].name;
            n += 1;
        }
        i += 1;
    }
    names
}

/// Every map the daemon pins under the pin directory: the pinned maps of [`MAPS`].
pub const ALL_MAPS: [&str; pinned_count()] = pinned_names();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for n in ALL_MAPS {
            assert!(n.len() <= 15, "{n} is longer than 15 characters");
        }
        for m in MAPS {
            assert!(
                m.name.len() <= 15,
                "{} is longer than 15 characters",
                m.name
            );
        }
        assert!(MAP_DECAP_FROM.len() <= 15);
    }

    #[test]
    fn names_are_unique_and_the_pinned_ones_come_first() {
        for (i, m) in MAPS.iter().enumerate() {
            assert!(
                MAPS[..i].iter().all(|n| n.name != m.name),
                "{} twice",
                m.name
            );
            assert_eq!(map_spec(m.name), Some(m));
        }
        let pinned: usize = MAPS.iter().filter(|m| m.pinned).count();
        assert!(MAPS[..pinned].iter().all(|m| m.pinned));
        assert_eq!(ALL_MAPS.len(), pinned);
        for (name, m) in ALL_MAPS.iter().zip(MAPS) {
            assert_eq!(*name, m.name);
        }
        assert!(!ALL_MAPS.contains(&MAP_DECAP_FROM));
    }

    #[test]
    fn the_kinds_round_trip_through_the_kernel_numbers() {
        for kind in [
            MapKind::Hash,
            MapKind::Array,
            MapKind::PerCpuArray,
            MapKind::LruHash,
            MapKind::ArrayOfMaps,
            MapKind::DevMapHash,
        ] {
            assert_eq!(MapKind::from_raw(kind as u32), Some(kind));
        }
        assert_eq!(MapKind::from_raw(0), None);
    }

    #[test]
    fn only_the_affinity_map_is_sized_at_load() {
        for m in MAPS {
            let at_load = matches!(m.entries, Entries::AtLoad { .. });
            assert_eq!(at_load, m.name == MAP_AFFINITY, "{}", m.name);
        }
    }
}
