//! Part 4: table work. How long rebuilding a service's slot table and swapping it into
//! the kernel takes for 8, 64 and 512 backends with mixed weights (1, 2, 3, 4 cycling)
//! (`build_table`, then `Dataplane::install_service`, which fills a new inner map and
//! swaps it in with one update); how close every backend's share of the slots is to its
//! weight share; and what removing one of N backends does: the fraction of the calls that
//! moves, against the removed backend's own share (ideal 1x), the load of the most loaded
//! survivor against its new ideal share (ideal 1x), and the largest share of the moved
//! calls that one survivor takes. Moves are counted over the 65536 slots and over
//! synthetic Call-IDs hashed like the XDP program hashes them. For context, the same
//! Call-IDs through Kamailio's `hash % n` (a model with this hash: the proportions do not
//! depend on it).
use std::{collections::HashMap, net::SocketAddr, time::Instant};

use anyhow::Result;
use serde::Serialize;
use sip_dispatch::dataplane::Dataplane;
use sip_dispatch_common::{
    Backend, HashKey,
    hash::siphash13,
    table::{SlotTable, Weighted, build_table},
};
use sip_dispatch_testbed::cancel;

use crate::{Plan, note};

pub const SIZES: [usize; 3] = [8, 64, 512];

#[derive(Clone, Debug, Serialize)]
pub struct TableSize {
    pub backends: usize,
    /// build_table, median (ms).
    pub build_ms: f64,
    /// The first install: backend ids and entries written, the table filled and swapped.
    pub first_install_ms: f64,
    /// Later installs (a new inner map filled and swapped in), median (ms).
    pub swap_ms: f64,
    /// build_ms + swap_ms: what a health change costs before the kernel uses the table.
    pub rebuild_and_swap_ms: f64,
    /// Largest relative deviation of a backend's share of the slots from its weight
    /// share, full table: max |share / weight share - 1|.
    pub max_share_deviation: f64,
    /// Backends removed, one at a time (each against the full table).
    pub removals: usize,
    /// 1/N (the weights are mixed: the removed backends' own shares are in
    /// `moved_over_share_max`).
    pub ideal_moved: f64,
    /// Fraction of the slots whose backend changed: mean and worst over the removals.
    pub moved_slots_mean: f64,
    pub moved_slots_max: f64,
    /// The same over the synthetic Call-IDs.
    pub moved_calls_mean: f64,
    pub moved_calls_max: f64,
    /// Moved fraction of the slots divided by the removed backend's weight share
    /// (ideal 1), worst removal.
    pub moved_over_share_max: f64,
    /// After a removal, the most loaded survivor's share of the slots divided by its new
    /// ideal (weight) share (ideal 1), worst removal.
    pub largest_survivor_load: f64,
    pub call_ids: usize,
    /// 1/(N-1): an equal-weight reference for the next two (context, not a target since
    /// issue 13: with mixed weights a heavy survivor should take more).
    pub ideal_survivor_share: f64,
    /// Largest share of the moved slots (calls) one survivor took, worst removal.
    pub largest_survivor_share: f64,
    pub largest_survivor_share_calls: f64,
    /// Kamailio `hash % n` model: a destination marked inactive (its calls step to the
    /// next index) and the list reloaded without it (`hash % (n-1)`).
    pub kamailio_inactive_moved: f64,
    pub kamailio_inactive_largest_share: f64,
    pub kamailio_reload_moved: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TableResults {
    pub sizes: Vec<TableSize>,
}

fn backend_addr(k: usize) -> SocketAddr {
    SocketAddr::from(([198, 19, (k / 250) as u8, (k % 250) as u8 + 1], 5060))
}

/// Mixed weights: 1, 2, 3, 4, 1, 2, ...
fn members(n: usize) -> Vec<Weighted> {
    (0..n)
        .map(|k| Weighted {
            backend: Backend::from_socket_addr(backend_addr(k)),
            weight: k as u32 % 4 + 1,
        })
        .collect()
}

/// Each live member's slot share divided by its weight share.
fn loads(t: &SlotTable) -> Vec<f64> {
    let total: f64 = t.members.iter().map(|m| f64::from(m.weight)).sum();
    t.members
        .iter()
        .zip(t.shares())
        .filter(|(m, _)| m.weight > 0)
        .map(|(m, share)| share / (f64::from(m.weight) / total))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Owner (as an address) of each slot.
fn owners(t: &SlotTable) -> Vec<Option<SocketAddr>> {
    t.slots
        .iter()
        .map(|&m| {
            t.members
                .get(m as usize)
                .map(|w| w.backend.to_socket_addr())
        })
        .collect()
}

/// (fraction moved, largest share of the moved items one new owner took).
fn movement<'a>(
    pairs: impl Iterator<Item = (&'a Option<SocketAddr>, &'a Option<SocketAddr>)>,
) -> (f64, f64) {
    let mut total = 0usize;
    let mut moved = 0usize;
    let mut by_owner: HashMap<Option<SocketAddr>, usize> = HashMap::new();
    for (a, b) in pairs {
        total += 1;
        if a != b {
            moved += 1;
            *by_owner.entry(*b).or_default() += 1;
        }
    }
    let largest = by_owner.values().copied().max().unwrap_or(0);
    (
        moved as f64 / total.max(1) as f64,
        largest as f64 / moved.max(1) as f64,
    )
}

/// Kamailio's `ds_select_dst(set, "0")`: `hash % n`; with the destination `removed`
/// inactive its calls step to the next index; reloaded without it, `hash % (n-1)`.
fn kamailio_model(hashes: &[u64], n: usize, removed: usize) -> (f64, f64, f64) {
    let before: Vec<usize> = hashes.iter().map(|h| (h % n as u64) as usize).collect();
    let inactive: Vec<usize> = before
        .iter()
        .map(|&i| if i == removed { (i + 1) % n } else { i })
        .collect();
    let survivors: Vec<usize> = (0..n).filter(|&i| i != removed).collect();
    let reload: Vec<usize> = hashes
        .iter()
        .map(|h| survivors[(h % (n as u64 - 1)) as usize])
        .collect();
    let as_addr = |v: &[usize]| -> Vec<Option<SocketAddr>> {
        v.iter().map(|&i| Some(backend_addr(i))).collect()
    };
    let (b, i, r) = (as_addr(&before), as_addr(&inactive), as_addr(&reload));
    let (inactive_moved, inactive_largest) = movement(b.iter().zip(&i));
    let (reload_moved, _) = movement(b.iter().zip(&r));
    (inactive_moved, inactive_largest, reload_moved)
}

pub fn run(plan: &Plan) -> Result<TableResults> {
    let key = HashKey::DEFAULT;
    let mut dp = Dataplane::load_unpinned(key, Default::default())?;
    let mut ids = sip_dispatch::backend_ids::BackendIds::new(sip_dispatch_common::MAX_BACKENDS);
    let call_hashes: Vec<u64> = (0..plan.call_ids)
        .map(|i| siphash13(key, format!("{i}-sdbench-7f3a@198.18.0.10").as_bytes()))
        .collect();
    let mut sizes = Vec::new();
    for (idx, &n) in SIZES.iter().enumerate() {
        cancel::check()?;
        let all = members(n);
        let vip = SocketAddr::from(([198, 18, 3, 100 + idx as u8], 5060));

        let mut builds = Vec::new();
        let mut table = None;
        for _ in 0..plan.table_trials {
            let t = Instant::now();
            table = Some(build_table(&all, key)?);
            builds.push(ms_since(t));
        }
        let table = table.expect("at least one trial");
        let t = Instant::now();
        dp.install_service(&mut ids, idx as u32, vip, &table)?;
        let first_install_ms = ms_since(t);
        let mut swaps = Vec::new();
        for _ in 0..plan.table_trials {
            let t = Instant::now();
            dp.install_service(&mut ids, idx as u32, vip, &table)?;
            swaps.push(ms_since(t));
        }

        let full = owners(&table);
        let full_calls: Vec<Option<SocketAddr>> = call_hashes
            .iter()
            .map(|&h| table.member_for_hash(h).map(|m| m.backend.to_socket_addr()))
            .collect();
        let max_share_deviation = loads(&table)
            .into_iter()
            .map(|l| (l - 1.0).abs())
            .fold(0.0, f64::max);
        let total_weight: f64 = all.iter().map(|m| f64::from(m.weight)).sum();
        let removals = plan.removals[idx].clamp(1, n);
        let mut moved_over_share: f64 = 0.0;
        let mut survivor_load: f64 = 0.0;
        let mut moved_slots = Vec::new();
        let mut moved_calls = Vec::new();
        let mut largest: f64 = 0.0;
        let mut largest_calls: f64 = 0.0;
        let mut kam = (0.0f64, 0.0f64, 0.0f64);
        for j in 0..removals {
            cancel::check()?;
            // Spread over the set, and over the weights (they cycle with period 4).
            let removed = (j * n / removals + j) % n;
            let rest: Vec<Weighted> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, m)| *m)
                .collect();
            let smaller = build_table(&rest, key)?;
            let (m, l) = movement(full.iter().zip(&owners(&smaller)));
            moved_slots.push(m);
            moved_over_share =
                moved_over_share.max(m / (f64::from(all[removed].weight) / total_weight));
            survivor_load = loads(&smaller).into_iter().fold(survivor_load, f64::max);
            largest = largest.max(l);
            let after: Vec<Option<SocketAddr>> = call_hashes
                .iter()
                .map(|&h| {
                    smaller
                        .member_for_hash(h)
                        .map(|m| m.backend.to_socket_addr())
                })
                .collect();
            let (m, l) = movement(full_calls.iter().zip(&after));
            moved_calls.push(m);
            largest_calls = largest_calls.max(l);
            let k = kamailio_model(&call_hashes, n, removed);
            kam = (kam.0.max(k.0), kam.1.max(k.1), kam.2.max(k.2));
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let maxf = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let size = TableSize {
            backends: n,
            build_ms: median(builds),
            first_install_ms,
            swap_ms: median(swaps.clone()),
            rebuild_and_swap_ms: 0.0,
            max_share_deviation,
            removals,
            ideal_moved: 1.0 / n as f64,
            moved_slots_mean: mean(&moved_slots),
            moved_slots_max: maxf(&moved_slots),
            moved_calls_mean: mean(&moved_calls),
            moved_calls_max: maxf(&moved_calls),
            moved_over_share_max: moved_over_share,
            largest_survivor_load: survivor_load,
            call_ids: call_hashes.len(),
            ideal_survivor_share: 1.0 / (n as f64 - 1.0),
            largest_survivor_share: largest,
            largest_survivor_share_calls: largest_calls,
            kamailio_inactive_moved: kam.0,
            kamailio_inactive_largest_share: kam.1,
            kamailio_reload_moved: kam.2,
        };
        let size = TableSize {
            rebuild_and_swap_ms: size.build_ms + size.swap_ms,
            ..size
        };
        note(format!(
            "{:>3} backends: build {:.1} ms + swap {:.1} ms; shares within {:.2}% of the weights; \
             one removed: moved {:.2}x its share, largest survivor load {:.4}x its ideal, \
             largest share of the moved slots {:.4} (1/(N-1) = {:.4})",
            n,
            size.build_ms,
            size.swap_ms,
            size.max_share_deviation * 100.0,
            size.moved_over_share_max,
            size.largest_survivor_load,
            size.largest_survivor_share,
            size.ideal_survivor_share
        ));
        sizes.push(size);
    }
    Ok(TableResults { sizes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kamailio_inactive_puts_everything_on_one_neighbour() {
        let hashes: Vec<u64> = (0..10_000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let (moved, largest, reload) = kamailio_model(&hashes, 8, 3);
        assert!((moved - 0.125).abs() < 0.02, "{moved}");
        assert_eq!(largest, 1.0);
        assert!(reload > 0.8, "{reload}");
    }
}
