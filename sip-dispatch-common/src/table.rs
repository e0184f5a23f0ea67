//! The slot table builder: weighted rendezvous hashing, evaluated per slot.
//!
//! Every member `m` with weight `w > 0` draws, for every slot `s`, a uniform `u(m, s)` in
//! (0, 1) from its seed and the slot number; its score is `-ln(u) / w` (an exponential
//! variable with rate `w`) and the slot goes to the lowest score, ties to the lower
//! canonical index. A member's draws depend only on the hash key, its own identity and
//! the slot, never on the other members, which gives the properties the dispatcher
//! relies on:
//! - the table is a pure function of the member *set* (order of the input is irrelevant);
//! - member `m` wins a slot with probability `w_m / sum(w)`;
//! - removing (or zero-weighting) a member moves only its own slots, and those spread over
//!   the others in proportion to their weights (the minimum of exponentials is
//!   memoryless); adding a member moves slots only to it.
//!
//! Only integer arithmetic, basic IEEE-754 `f64` operations and `libm`'s software `log` are
//! involved, so every machine builds the same table (pinned by a golden test).
use core::cmp::Ordering;
use core::fmt;
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

const GOLDEN_GAMMA: u64 = 0x9e3779b97f4a7c15;

/// `-ln(u)` for the member with `seed` at slot `s`, with `u` uniform in (0, 1): the top
/// 53 bits of the splitmix64 stream element `s + 1` of the seed, offset by half a step so
/// that neither 0 nor 1 can come out.
fn exp_draw(seed: u64, s: usize) -> f64 {
    let x = mix64(seed.wrapping_add((s as u64 + 1).wrapping_mul(GOLDEN_GAMMA)));
    let u = ((x >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    -libm::log(u)
}

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

    // (canonical index, seed, 1/weight) of the members that take part.
    let live: Vec<(u32, u64, f64)> = sorted
        .iter()
        .enumerate()
        .filter(|(_, m)| m.weight > 0)
        .map(|(i, m)| {
            (
                i as u32,
                siphash13(key, &identity(&m.backend)),
                1.0 / m.weight as f64,
            )
        })
        .collect();

    let slots = (0..SLOTS)
        .map(|s| {
            let mut best = NO_BACKEND;
            let mut best_score = f64::INFINITY;
            for &(index, seed, inv_weight) in &live {
                let score = exp_draw(seed, s) * inv_weight;
                // Strictly lower: a tie keeps the lower canonical index.
                if score < best_score {
                    best = index;
                    best_score = score;
                }
            }
            best
        })
        .collect();

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
