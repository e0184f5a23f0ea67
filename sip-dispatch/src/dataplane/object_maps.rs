//! The embedded XDP object's maps against the map table [`MAPS`], both ways. The object is
//! parsed, not loaded: no root, no kernel.
use std::collections::BTreeMap;

use aya_obj::{EbpfSectionKind, Map, Object};
use sip_dispatch_common::{MAPS, MapKind, map_spec};

use super::load::OBJECT;

/// The maps the object declares in `.maps` (`#[btf_map]`), by name.
fn declared_maps(object: &Object) -> BTreeMap<&str, &Map> {
    object
        .maps
        .iter()
        .filter(|(_, m)| m.section_kind() == EbpfSectionKind::BtfMaps)
        .map(|(name, m)| (name.as_str(), m))
        .collect()
}

#[test]
fn every_map_of_the_object_is_in_the_table_with_its_layout() {
    let object = Object::parse(OBJECT).expect("parsing the embedded XDP object");
    for (name, map) in &object.maps {
        // The program's globals (`.rodata`, `.bss`, `.data`) are maps too, of no table.
        let kind = map.section_kind();
        assert!(
            matches!(
                kind,
                EbpfSectionKind::BtfMaps
                    | EbpfSectionKind::Rodata
                    | EbpfSectionKind::Bss
                    | EbpfSectionKind::Data
            ),
            "map {name} comes from a {kind:?} section"
        );
    }
    let declared = declared_maps(&object);
    assert!(!declared.is_empty(), "the object declares no map");
    for (name, map) in declared {
        let spec = map_spec(name)
            .unwrap_or_else(|| panic!("map {name} of the object is not in the table (MAPS)"));
        assert_eq!(
            MapKind::from_raw(map.map_type()),
            Some(spec.kind),
            "{name}: type {} in the object",
            map.map_type()
        );
        assert_eq!(map.key_size(), spec.key_size, "{name}: key size");
        assert_eq!(map.value_size(), spec.value_size, "{name}: value size");
        assert_eq!(
            map.max_entries(),
            spec.entries.declared(),
            "{name}: max entries"
        );
        assert_eq!(map.map_flags(), spec.flags, "{name}: flags");
        match (map.inner(), spec.inner) {
            (None, None) => {}
            (Some(inner), Some(want)) => {
                assert_eq!(
                    MapKind::from_raw(inner.map_type()),
                    Some(want.kind),
                    "{name}: inner type"
                );
                assert_eq!(inner.key_size(), want.key_size, "{name}: inner key size");
                assert_eq!(
                    inner.value_size(),
                    want.value_size,
                    "{name}: inner value size"
                );
                assert_eq!(
                    inner.max_entries(),
                    want.max_entries,
                    "{name}: inner max entries"
                );
                assert_eq!(inner.map_flags(), want.flags, "{name}: inner flags");
            }
            (found, want) => panic!(
                "{name}: inner map {} in the object, {} in the table",
                if found.is_some() {
                    "declared"
                } else {
                    "missing"
                },
                if want.is_some() {
                    "listed"
                } else {
                    "not listed"
                },
            ),
        }
    }
}

#[test]
fn every_map_of_the_table_is_in_the_object() {
    let object = Object::parse(OBJECT).expect("parsing the embedded XDP object");
    let declared = declared_maps(&object);
    for spec in MAPS {
        assert!(
            declared.contains_key(spec.name),
            "map {} of the table (MAPS) is not in the object",
            spec.name
        );
    }
    assert_eq!(declared.len(), MAPS.len());
}

fn programs_of(object: &[u8]) -> std::collections::BTreeSet<String> {
    let parsed = Object::parse(object).expect("the embedded object parses");
    parsed.programs.into_keys().collect()
}

#[test]
fn the_daemon_object_has_no_benchmark_baseline() {
    let programs = programs_of(OBJECT);
    assert!(
        programs.contains(sip_dispatch_common::PROG_DISPATCH),
        "{programs:?}"
    );
    assert!(
        !programs.contains(sip_dispatch_common::PROG_MAC_SWAP),
        "{programs:?}"
    );
}

#[cfg(feature = "mac-swap")]
#[test]
fn the_mac_swap_object_holds_the_baseline_alone() {
    let programs = programs_of(super::load::MAC_SWAP_OBJECT);
    assert_eq!(
        programs.into_iter().collect::<Vec<_>>(),
        [sip_dispatch_common::PROG_MAC_SWAP]
    );
}
