//! The slot table builder: weighted Maglev hashing (Katran's MaglevHashV2 idea).
//!
//! Every member with weight `w > 0` gets, from its keyed seed (SipHash of the hash key
//! and its identity), an offset and an odd skip; its walk visits slot
//! `(offset + j * skip) mod SLOTS` at step `j`, which is a full permutation of the slots
//! because `SLOTS` is a power of two and the skip is odd. The members take turns in
//! rounds: each earns its weight per round and a turn costs the heaviest weight, so the
//! `k`-th turn of a member with weight `w` falls in round `ceil(k * heaviest / w)`;
//! within a round the turns go in canonical order. A turn takes the first still-free
//! slot of the member's walk, until every slot is taken. What holds:
//! - the table is a pure function of the member *set* and the key (order of the input is
//!   irrelevant); only integer arithmetic is involved, so every machine builds the same
//!   table (pinned by a golden test);
//! - member `m` owns `w_m / sum(w)` of the slots to within a couple of slots (its turns
//!   are whole, and the last round is cut short), so at 512 backends with weights 1 to 4
//!   every share is within 1% (relative) of its weight share, and so is every survivor's
//!   after a removal;
//! - weight 0 owns no slot, and no live member gives an all-`NO_BACKEND` table;
//! - removing (or adding) a member moves its own slots plus some others: the other
//!   members' walks claim slots in a different order. With 65536 slots that is close to
//!   minimal for a few backends (1.06 x its share at 8, within 1.1 x up to about 12, some
//!   5000 slots each, weights 1 to 4) but not for many (1.6 x at 64, about 7 x at 512,
//!   where each backend owns only ~128 slots). Rendezvous hashing, used
//!   before, moved only the member's own slots but gave binomial shares (about 9% spread
//!   at 512 backends) and took ~240 ms to build at 512 backends; this takes ~2 ms.
use core::cmp::{Ordering, Reverse};
use core::fmt;
use std::collections::BinaryHeap;
use std::vec::Vec;

use crate::hash::{HashKey, siphash13};
use crate::maps::{Backend, NO_BACKEND, SLOTS, slot_of};

pub use crate::addr::backend_display;

/// A backend and its weight; weight 0 (failed or drained) owns no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weighted {
    pub backend: Backend,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableError {
    /// The same backend (family, address and port) is listed twice.
    Duplicate(Backend),
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::Duplicate(b) => write!(f, "backend {} is listed twice", backend_display(b)),
        }
    }
}

impl std::error::Error for TableError {}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotTable {
    /// The members in canonical order: ascending by family, then the 16 address bytes,
    /// then the 2 port bytes, all compared as unsigned bytes in network order (so IPv4
    /// sorts before IPv6, and addresses and ports sort numerically). Weight-0 members
    /// are kept here; they just own no slot.
    pub members: Vec<Weighted>,
    /// `SLOTS` entries; each is an index into `members`, or `NO_BACKEND` when no member
    /// has a weight above 0.
    pub slots: Vec<u32>,
}

/// The bytes that identify a backend: family, address bytes, port bytes, in network
/// order. `_pad` is not part of it. Both the canonical order and the seed use it.
fn identity(b: &Backend) -> [u8; 19] {
    let mut id = [0u8; 19];
    id[0] = b.family;
    for (chunk, word) in id[1..17].chunks_exact_mut(4).zip(b.addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    id[17..].copy_from_slice(&b.port.to_ne_bytes());
    id
}

fn canonical_order(a: &Weighted, b: &Weighted) -> Ordering {
    identity(&a.backend).cmp(&identity(&b.backend))
}

/// The splitmix64 output function (Stafford's mix13): a bijection with full avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// A live member's walk through the slots: slot `(offset + j * skip) mod SLOTS` at step
/// `j`. `SLOTS` is a power of two and `skip` is odd, so the walk visits every slot once.
struct Walk {
    index: u32,
    weight: u64,
    offset: u32,
    skip: u32,
    /// Steps taken so far.
    next: u32,
    /// Turns (slots) taken so far.
    turns: u64,
}

impl Walk {
    fn new(index: u32, m: &Weighted, key: HashKey) -> Walk {
        let seed = siphash13(key, &identity(&m.backend));
        let mask = SLOTS as u64 - 1;
        Walk {
            index,
            weight: u64::from(m.weight),
            offset: (mix64(seed) & mask) as u32,
            skip: ((mix64(seed ^ SKIP_STREAM) & mask) | 1) as u32,
            next: 0,
            turns: 0,
        }
    }

    /// The round of this member's next turn: it earns `weight` per round and spends the
    /// heaviest weight per turn, so its `k`-th turn (from 1) falls in round
    /// `ceil(k * heaviest / weight)`, and it never has two turns in one round.
    fn next_round(&self, heaviest: u64) -> u64 {
        ((self.turns + 1) * heaviest).div_ceil(self.weight)
    }

    /// Takes the first slot of this member's walk that is still free. The caller
    /// guarantees that one is.
    fn take_next_free(&mut self, slots: &mut [u32]) {
        loop {
            let slot = (self.offset.wrapping_add(self.next.wrapping_mul(self.skip))
                & (SLOTS as u32 - 1)) as usize;
            self.next += 1;
            if slots[slot] == NO_BACKEND {
                slots[slot] = self.index;
                self.turns += 1;
                return;
            }
        }
    }
}

/// Separates the skip's hash stream from the offset's.
const SKIP_STREAM: u64 = 0x9e3779b97f4a7c15;

/// Builds a service's slot table from its weighted backends.
///
/// Members with weight 0 (failed or drained backends) never own a slot; if no member has
/// a weight above 0 (including an empty set) every slot is `NO_BACKEND`. The same backend
/// listed twice is an error, whatever the weights.
pub fn build_table(members: &[Weighted], key: HashKey) -> Result<SlotTable, TableError> {
    let mut sorted = members.to_vec();
    sorted.sort_unstable_by(canonical_order);
    if let Some(pair) = sorted
        .windows(2)
        .find(|p| canonical_order(&p[0], &p[1]).is_eq())
    {
        return Err(TableError::Duplicate(pair[0].backend));
    }

    let mut walks: Vec<Walk> = sorted
        .iter()
        .enumerate()
        .filter(|(_, m)| m.weight > 0)
        .map(|(i, m)| Walk::new(i as u32, m, key))
        .collect();
    let heaviest = walks.iter().map(|w| w.weight).max().unwrap_or(0);
    // Turns in order of (round, canonical index): Katran's cumulative-weight rounds,
    // without visiting the members that have no turn in a round.
    let mut turns: BinaryHeap<Reverse<(u64, usize)>> = walks
        .iter()
        .enumerate()
        .map(|(w, walk)| Reverse((walk.next_round(heaviest), w)))
        .collect();
    let mut slots = std::vec![NO_BACKEND; SLOTS];
    for _ in 0..SLOTS {
        let Some(Reverse((_, w))) = turns.pop() else {
            break;
        };
        let walk = &mut walks[w];
        walk.take_next_free(&mut slots);
        turns.push(Reverse((walk.next_round(heaviest), w)));
    }

    Ok(SlotTable {
        members: sorted,
        slots,
    })
}

impl SlotTable {
    /// Slots per member index.
    pub fn slot_counts(&self) -> Vec<usize> {
        let mut counts = std::vec![0usize; self.members.len()];
        for &s in &self.slots {
            if let Some(c) = counts.get_mut(s as usize) {
                *c += 1;
            }
        }
        counts
    }

    /// Fraction of all slots (0..=1) per member index.
    pub fn shares(&self) -> Vec<f64> {
        let total = self.slots.len().max(1) as f64;
        self.slot_counts()
            .into_iter()
            .map(|c| c as f64 / total)
            .collect()
    }

    /// The member a Call-ID hash maps to; `None` for a `NO_BACKEND` slot.
    pub fn member_for_hash(&self, hash: u64) -> Option<&Weighted> {
        let slot = *self.slots.get(slot_of(hash) as usize)?;
        self.members.get(slot as usize)
    }

    /// The backend of a slot; `None` for `NO_BACKEND`.
    fn backend_at(&self, slot: usize) -> Option<&Backend> {
        let index = *self.slots.get(slot)?;
        self.members.get(index as usize).map(|m| &m.backend)
    }
}

/// Fraction of slots whose *backend* (not member index) differs between two tables. A
/// slot that is `NO_BACKEND` in one table and not in the other counts as moved.
pub fn moved_fraction(a: &SlotTable, b: &SlotTable) -> f64 {
    let n = a.slots.len().max(b.slots.len());
    if n == 0 {
        return 0.0;
    }
    let moved = (0..n)
        .filter(|&s| a.backend_at(s).map(identity) != b.backend_at(s).map(identity))
        .count();
    moved as f64 / n as f64
}

#[cfg(test)]
mod tests;
