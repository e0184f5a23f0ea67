//! The held-call census (graceful drain): which affinity entries still hold a call.
//!
//! The `affinity_census` XDP program (loaded, never attached, run through
//! BPF_PROG_TEST_RUN) walks the affinity map in the kernel and counts, per backend id,
//! the entries [`holds_call`] accepts; userspace reads the counts from [`MAP_HELD`].
use crate::{
    AFF_BYE, AFF_CANCEL, AFF_INVITE, AffinityEntry, BF_AFFINITY, BackendFlags, MAX_BACKENDS,
};

/// Array of u64, [`HELD_SLOTS`] entries: per backend id, the calls it holds; then the
/// number of entries in the affinity map ([`HELD_ENTRIES`]) and of those that hold no
/// call ([`HELD_STALE`]). Written by the census only.
pub const MAP_HELD: &str = "sd_held_v1";
/// The census program.
pub const PROG_CENSUS: &str = "affinity_census";
/// Index in [`MAP_HELD`] of the affinity map's entry count.
pub const HELD_ENTRIES: u32 = MAX_BACKENDS;
/// Index in [`MAP_HELD`] of the entries that hold no call.
pub const HELD_STALE: u32 = MAX_BACKENDS + 1;
/// Entries of [`MAP_HELD`].
pub const HELD_SLOTS: u32 = MAX_BACKENDS + 2;

/// What the census program reads from its test-run input. An XDP test run needs at
/// least an Ethernet header's worth of input, hence the padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CensusInput {
    /// `--call-idle`: an entry untouched this long holds no call any more.
    pub idle_ns: u64,
    pub _pad: [u64; 1],
}

impl CensusInput {
    pub const SIZE: usize = core::mem::size_of::<CensusInput>();

    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&self.idle_ns.to_ne_bytes());
        b
    }
}

/// Whether `entry` holds a call of its backend, whose flags are `flags`: made by an
/// INVITE, written for the backend's current generation, the backend keeps its calls
/// (not disabled or removed), no BYE or CANCEL seen, and touched less than `idle_ns`
/// before `now_ns`. `now_ns` is
/// the coarse monotonic clock, which may lag an entry's time by a tick: the age
/// saturates at 0.
#[inline(always)]
pub fn holds_call(entry: &AffinityEntry, flags: BackendFlags, now_ns: u64, idle_ns: u64) -> bool {
    entry.generation == flags.generation
        && flags.flags & BF_AFFINITY != 0
        && entry.flags & (AFF_INVITE | AFF_BYE | AFF_CANCEL) == AFF_INVITE
        && now_ns.saturating_sub(entry.last_seen_ns) < idle_ns
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BF_NEW, BF_UP};

    const S: u64 = 1_000_000_000;

    /// An entry an INVITE made, with `flags` besides.
    fn entry(generation: u32, last_seen_ns: u64, flags: u32) -> AffinityEntry {
        AffinityEntry {
            backend: 7,
            generation,
            last_seen_ns,
            flags: AFF_INVITE | flags,
            _zero: 0,
        }
    }

    fn bflags(generation: u32, flags: u32) -> BackendFlags {
        BackendFlags { generation, flags }
    }

    #[test]
    fn counting_rule() {
        let now = 1000 * S;
        let idle = 600 * S;
        let live = bflags(3, BF_AFFINITY | BF_UP | BF_NEW);
        // (entry, backend flags, held?, why)
        let cases = [
            (entry(3, now - S, 0), live, true, "fresh call"),
            (
                entry(3, now - S, 0),
                bflags(3, BF_AFFINITY),
                true,
                "drained and down",
            ),
            (
                entry(3, now - idle + 1, 0),
                live,
                true,
                "just under the idle limit",
            ),
            (entry(3, now - idle, 0), live, false, "idle for the limit"),
            (entry(3, 0, 0), live, false, "idle for ages"),
            (
                entry(3, now + S / 100, 0),
                live,
                true,
                "clock lags the entry: age 0",
            ),
            (
                entry(2, now - S, 0),
                live,
                false,
                "older generation (id reused)",
            ),
            (entry(4, now - S, 0), live, false, "other generation"),
            (entry(3, now - S, AFF_BYE), live, false, "BYE seen"),
            (entry(3, now - S, AFF_CANCEL), live, false, "CANCEL seen"),
            (
                entry(3, now - S, 0),
                bflags(3, BF_UP | BF_NEW),
                false,
                "disabled",
            ),
            (entry(3, now - S, 0), bflags(3, 0), false, "removed"),
            (
                AffinityEntry {
                    flags: 0,
                    ..entry(3, now - S, 0)
                },
                live,
                false,
                "made by an OPTIONS or REGISTER, not a call",
            ),
        ];
        for (e, f, held, why) in cases {
            assert_eq!(holds_call(&e, f, now, idle), held, "{why}");
        }
        // Nothing overflows at the ends of the clock.
        assert!(holds_call(&entry(3, u64::MAX, 0), live, 0, 1));
        assert!(!holds_call(&entry(3, 0, 0), live, u64::MAX, u64::MAX));
    }

    #[test]
    fn input_layout() {
        let b = CensusInput {
            idle_ns: 0x0102_0304_0506_0708,
            _pad: [0],
        }
        .to_bytes();
        assert_eq!(b.len(), 16);
        assert_eq!(
            u64::from_ne_bytes(b[..8].try_into().unwrap()),
            0x0102_0304_0506_0708
        );
    }
}
