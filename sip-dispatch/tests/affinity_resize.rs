//! The affinity map across restarts on the same pins: a daemon started with another
//! `--affinity-entries` gets a map of the new size holding the newest calls of the old
//! one, and a start that fails puts the old map back.
//!
//! Needs root (CAP_BPF, mount): fails loudly without it.
use std::{path::PathBuf, process::Command};

use aya::maps::MapData;
use sip_dispatch::dataplane::{self, Affinity, Dataplane};
use sip_dispatch_common::{AffinityEntry, AffinityKey, HashKey, MAP_AFFINITY};

/// A bpf filesystem of this test's own, unmounted at the end (also on failure).
struct BpfFs(PathBuf);

impl BpfFs {
    fn mount() -> BpfFs {
        let dir = PathBuf::from(format!("/run/sdt-bpffs-resize-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fs = BpfFs(dir);
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&fs.0)
            .status()
            .expect("running mount");
        assert!(ok.success(), "mount -t bpf bpf {} (root?)", fs.0.display());
        fs
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn entries(n: u32) -> Affinity {
    Affinity {
        on: true,
        entries: n,
    }
}

fn key(i: u64) -> AffinityKey {
    AffinityKey {
        hash: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        service: 0,
        _zero: 0,
    }
}

fn pinned_size(pins: &std::path::Path) -> u32 {
    MapData::from_pin(pins.join(MAP_AFFINITY))
        .and_then(|m| m.info())
        .expect("the pinned affinity map")
        .max_entries()
}

#[test]
fn a_resized_affinity_map_keeps_the_newest_calls_and_a_failed_start_puts_it_back() {
    let fs = BpfFs::mount();
    let pins = fs.0.join("kt-resize");
    // (The backend ids the loads return are not used here.)
    let load = |n: u32| {
        Dataplane::load(&pins, "kt-none", false, HashKey::DEFAULT, entries(n)).map(|(dp, _ids)| dp)
    };

    let mut dp = load(4096).expect("first load");
    for i in 0..3000u64 {
        let e = AffinityEntry {
            backend: 1,
            generation: 0,
            last_seen_ns: i,
            flags: 0,
            _zero: 0,
        };
        dp.set_affinity_entry(&key(i), &e).unwrap();
    }
    drop(dp);
    assert_eq!(pinned_size(&pins), 4096);

    // Smaller: the newest 1024 calls are carried over (an LRU map may evict a few of
    // its own before it is full).
    let dp = load(1024).expect("load with a smaller map");
    assert_eq!(pinned_size(&pins), 1024);
    let kept: Vec<u64> = (0..3000u64)
        .filter(|i| dp.affinity_entry(&key(*i)).unwrap().is_some())
        .collect();
    assert!(
        kept.len() >= 900,
        "only {} of the newest 1024 calls were carried over",
        kept.len()
    );
    assert!(
        kept.iter().all(|i| *i >= 3000 - 1024),
        "an older call was kept: {:?}",
        kept.iter().min()
    );
    // The old map's pin waits for the take-over, which removes it.
    assert!(pins.join("sd_affinity_v1_old").exists());
    dataplane::remove_outdated_pins(&pins);
    assert!(!pins.join("sd_affinity_v1_old").exists());
    drop(dp);

    // A start that fails after the resize puts the old map back, entries and all.
    let mut dp = load(2048).expect("load with a larger map");
    assert_eq!(pinned_size(&pins), 2048);
    dp.abandon();
    drop(dp);
    assert_eq!(pinned_size(&pins), 1024);
    assert!(!pins.join("sd_affinity_v1_old").exists());
    let dp = load(1024).expect("load with the size pinned");
    let still = (0..3000u64)
        .filter(|i| dp.affinity_entry(&key(*i)).unwrap().is_some())
        .count();
    assert_eq!(still, kept.len(), "the put-back map lost entries");
    drop(dp);
}
