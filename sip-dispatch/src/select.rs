//! Which backends get traffic: RFC 2782 priority and weight, made deterministic.
//!
//! All traffic goes to the lowest-numbered priority that has at least one healthy
//! backend; within it, healthy backends share the slot table by weight. When every
//! backend of that priority is down the next priority takes over, and traffic returns as
//! soon as one comes back.
//!
//! Weight 0 (RFC 2782: "a very small chance"): a weight-0 backend gets no traffic while
//! a backend of its priority with a weight above 0 is healthy; when only weight-0
//! backends are healthy in the chosen priority, they share it equally.
//!
//! An SRV target with several addresses contributes each address, sharing the record's
//! weight; weights are therefore scaled by [`WEIGHT_SCALE`] before they are split.
//!
//! Load (new calls only; see `sip_dispatch_common::load`): a latency factor scales a
//! backend's weight. RFC 7339 overload `oc=N` cuts the backend's share by N %: what it
//! sheds goes to the backends of its priority that report no overload, in proportion to
//! their shares; when every one of them reports some, the shed share is left to no
//! backend ([`Selection::shed`]: those new calls get a 503 from the slow path, as RFC 7339
//! has a client reject what it cannot send elsewhere). A backend at `oc=100` takes no new
//! calls, as a drained one does.
use std::net::SocketAddr;

use sip_dispatch_common::{Backend, table::Weighted};

/// Divisible by every address count from 1 to 10, and small enough that 65535 x SCALE
/// fits in a u32.
pub const WEIGHT_SCALE: u32 = 2520;

/// A backend as the selection sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub priority: u16,
    /// The configured (or SRV record's) weight.
    pub weight: u32,
    /// How many addresses share that weight (the addresses of one SRV target).
    pub sharing: u32,
    pub healthy: bool,
    /// The share of its weight its latency leaves the backend, in percent (100 normally).
    pub latency_percent: u32,
    /// The RFC 7339 overload in force (`oc`): the percentage of its share of new calls it
    /// sheds; 100 takes none.
    pub overload_percent: u32,
}

/// The backends in the table and the priority they were taken from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub priority: Option<u16>,
    /// Sorted by address, weights scaled.
    pub members: Vec<(SocketAddr, u32)>,
    /// The weight of the share no backend takes (overload with nowhere to go), in the
    /// members' units; 0 normally.
    pub shed: u32,
    /// Member weights are scaled weights divided by this (above 1 only when the largest
    /// had to be made to fit a u32).
    pub divisor: u32,
}

impl Selection {
    /// The weight `addr` has in this selection, in configured-weight units (0 when it is
    /// not a member): what the table gives it for new calls.
    pub fn effective_weight(&self, addr: SocketAddr) -> f64 {
        self.members.iter().find(|m| m.0 == addr).map_or(0.0, |m| {
            f64::from(m.1) * f64::from(self.divisor.max(1)) / f64::from(WEIGHT_SCALE)
        })
    }

    pub fn weighted(&self) -> Vec<Weighted> {
        self.members
            .iter()
            .map(|(a, w)| Weighted {
                backend: Backend::from_socket_addr(*a),
                weight: *w,
            })
            .collect()
    }
}

impl Candidate {
    fn takes_new_calls(&self) -> bool {
        self.healthy && self.overload_percent < 100
    }
}

pub fn select(candidates: &[Candidate]) -> Selection {
    let Some(priority) = candidates
        .iter()
        .filter(|c| c.takes_new_calls())
        .map(|c| c.priority)
        .min()
    else {
        return Selection::default();
    };
    let group: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.takes_new_calls() && c.priority == priority)
        .collect();
    let any_weighted = group.iter().any(|c| c.weight > 0);
    // (address, weight with latency, overload %); u64: the shares moved below add up.
    let mut weighed: Vec<(SocketAddr, u64, u64)> = group
        .iter()
        .filter_map(|c| {
            let weight = match (c.weight, any_weighted) {
                (0, true) => return None,
                (0, false) => 1,
                (w, _) => w,
            };
            let scaled = u64::from((weight * WEIGHT_SCALE / c.sharing.max(1)).max(1));
            let latency = u64::from(c.latency_percent.clamp(1, 100));
            let overload = u64::from(c.overload_percent.min(99));
            Some((c.addr, (scaled * latency / 100).max(1), overload))
        })
        .collect();
    weighed.sort();
    weighed.dedup_by_key(|m| m.0);
    let shed = shed_overload(&mut weighed);
    // Back into the builder's u32 weights, keeping the proportions.
    let heaviest = weighed.iter().map(|m| m.1).chain([shed]).max().unwrap_or(1);
    let divisor = heaviest.div_ceil(u64::from(u32::MAX)).max(1);
    let fit = |w: u64| u32::try_from(w / divisor).unwrap_or(u32::MAX);
    Selection {
        priority: Some(priority),
        members: weighed
            .iter()
            .map(|&(addr, w, _)| (addr, fit(w).max(1)))
            .collect(),
        shed: fit(shed),
        divisor: u32::try_from(divisor).unwrap_or(u32::MAX),
    }
}

/// Cuts each overloaded member's weight by its overload and gives what it sheds to the
/// members without overload, in proportion to their weights; returns what is left for no
/// backend (all that was shed, when every member reports overload).
fn shed_overload(members: &mut [(SocketAddr, u64, u64)]) -> u64 {
    let mut shed = 0;
    for m in members.iter_mut().filter(|m| m.2 > 0) {
        let cut = m.1 * m.2 / 100;
        m.1 = (m.1 - cut).max(1);
        shed += cut;
    }
    let free: u64 = members.iter().filter(|m| m.2 == 0).map(|m| m.1).sum();
    if free == 0 {
        return shed;
    }
    for m in members.iter_mut().filter(|m| m.2 == 0) {
        // u128: 2048 backends of the largest weight shed up to ~2^38, times a weight of
        // up to ~2^28 is past u64. The quotient is at most `shed`.
        let gets = u128::from(shed) * u128::from(m.1) / u128::from(free);
        m.1 += u64::try_from(gets).unwrap_or(shed);
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(addr: &str, priority: u16, weight: u32, healthy: bool) -> Candidate {
        Candidate {
            addr: addr.parse().unwrap(),
            priority,
            weight,
            sharing: 1,
            healthy,
            latency_percent: 100,
            overload_percent: 0,
        }
    }

    #[test]
    fn overload_cuts_a_share_and_gives_it_to_the_free_backends() {
        let (a, b, d) = ("198.18.0.1:5060", "198.18.0.2:5060", "198.18.0.3:5060");
        let mut cands = vec![c(a, 10, 1, true), c(b, 10, 1, true)];
        // oc=50 on a: a gets half its normal half (1/4), b the rest.
        cands[0].overload_percent = 50;
        let s = select(&cands);
        let share = |s: &Selection, i: usize| {
            let total: u32 = s.members.iter().map(|m| m.1).sum::<u32>() + s.shed;
            f64::from(s.members[i].1) / f64::from(total)
        };
        assert_eq!(s.shed, 0);
        assert!((share(&s, 0) - 0.25).abs() < 1e-6, "{s:?}");
        assert!((share(&s, 1) - 0.75).abs() < 1e-6, "{s:?}");
        // Both overloaded: each keeps (1 - oc) of its share, the rest is shed (503).
        cands[1].overload_percent = 20;
        let s = select(&cands);
        assert!((share(&s, 0) - 0.25).abs() < 1e-6, "{s:?}");
        assert!((share(&s, 1) - 0.40).abs() < 1e-6, "{s:?}");
        assert_eq!(s.shed, WEIGHT_SCALE * 7 / 10, "{s:?}");
        // oc=100 takes no new calls, like a drained backend; all at 100: the next
        // priority takes them.
        cands[0].overload_percent = 100;
        cands[1].overload_percent = 0;
        assert_eq!(select(&cands).members, vec![(cands[1].addr, WEIGHT_SCALE)]);
        cands[1].overload_percent = 100;
        cands.push(c(d, 20, 1, true));
        let s = select(&cands);
        assert_eq!((s.priority, s.members.len(), s.shed), (Some(20), 1, 0));
    }

    #[test]
    fn latency_scales_a_weight() {
        let mut cands = vec![
            c("198.18.0.1:5060", 10, 1, true),
            c("198.18.0.2:5060", 10, 2, true),
        ];
        cands[0].latency_percent = 10;
        let s = select(&cands);
        assert_eq!(
            s.members,
            vec![
                (cands[0].addr, WEIGHT_SCALE / 10),
                (cands[1].addr, 2 * WEIGHT_SCALE)
            ]
        );
        // With an overload on top: a third of a's already smaller share is shed to b.
        cands[0].overload_percent = 30;
        let s = select(&cands);
        let cut = WEIGHT_SCALE / 10 * 30 / 100;
        assert_eq!(
            s.members,
            vec![
                (cands[0].addr, WEIGHT_SCALE / 10 - cut),
                (cands[1].addr, 2 * WEIGHT_SCALE + cut)
            ]
        );
    }

    #[test]
    fn the_most_backends_at_the_largest_weight_shed_without_overflow() {
        let mut cands: Vec<Candidate> = (0..2048u32)
            .map(|i| {
                c(
                    &format!("198.18.{}.{}:5060", i / 256, i % 256),
                    0,
                    65535,
                    true,
                )
            })
            .collect();
        for cand in cands.iter_mut().skip(1) {
            cand.overload_percent = 99;
        }
        let s = select(&cands);
        let total: u64 = s.members.iter().map(|m| u64::from(m.1)).sum();
        // The one free backend takes what 2047 shed: 1 + 2047 x 0.99 of 2048 shares.
        let first = s.members[0].1 as f64 / total as f64;
        let want = (1.0 + 2047.0 * 0.99) / 2048.0;
        assert!((first - want).abs() < 1e-4, "{first} vs {want}");
    }

    #[test]
    fn the_largest_weights_with_overload_keep_their_proportions() {
        let mut cands: Vec<Candidate> = (1..=40)
            .map(|i| c(&format!("198.18.0.{i}:5060"), 0, 65535, true))
            .collect();
        cands[0].overload_percent = 50;
        let s = select(&cands);
        let total: u64 = s.members.iter().map(|m| u64::from(m.1)).sum();
        let first = s.members[0].1 as f64 / total as f64;
        assert!((first - 0.5 / 40.0).abs() < 1e-6, "{first}");
    }

    fn weights(s: &Selection) -> Vec<(String, u32)> {
        s.members
            .iter()
            .map(|(a, w)| (a.to_string(), w / WEIGHT_SCALE))
            .collect()
    }

    fn rfc2782_example(healthy: [bool; 5]) -> Vec<Candidate> {
        vec![
            c("198.18.0.21:5060", 10, 60, healthy[0]),
            c("198.18.0.22:5060", 10, 20, healthy[1]),
            c("198.18.0.23:5060", 10, 10, healthy[2]),
            c("198.18.0.24:5060", 10, 10, healthy[3]),
            c("198.18.0.25:5060", 20, 0, healthy[4]),
        ]
    }

    #[test]
    fn lowest_priority_with_a_healthy_backend_takes_all() {
        let s = select(&rfc2782_example([true; 5]));
        assert_eq!(s.priority, Some(10));
        assert_eq!(
            weights(&s),
            [
                ("198.18.0.21:5060", 60),
                ("198.18.0.22:5060", 20),
                ("198.18.0.23:5060", 10),
                ("198.18.0.24:5060", 10)
            ]
            .map(|(a, w)| (a.to_string(), w))
        );
    }

    #[test]
    fn a_dead_backend_leaves_and_the_rest_keep_their_weights() {
        let s = select(&rfc2782_example([false, true, true, true, true]));
        assert_eq!(s.priority, Some(10));
        assert_eq!(
            weights(&s).iter().map(|m| m.1).collect::<Vec<_>>(),
            [20, 10, 10]
        );
    }

    #[test]
    fn the_next_priority_takes_over_and_gives_back() {
        let s = select(&rfc2782_example([false, false, false, false, true]));
        assert_eq!(s.priority, Some(20));
        // The only healthy backend has weight 0: it still takes the traffic.
        assert_eq!(s.members.len(), 1);
        let s = select(&rfc2782_example([false, false, true, false, true]));
        assert_eq!(s.priority, Some(10));
        assert_eq!(s.members.len(), 1);
    }

    #[test]
    fn nothing_healthy_selects_nothing() {
        assert_eq!(select(&rfc2782_example([false; 5])), Selection::default());
        assert_eq!(select(&[]), Selection::default());
    }

    #[test]
    fn weight_zero_only_when_nothing_else_is_healthy_in_the_priority() {
        let cands = vec![
            c("198.18.0.21:5060", 1, 0, true),
            c("198.18.0.22:5060", 1, 5, true),
        ];
        assert_eq!(
            weights(&select(&cands)),
            [("198.18.0.22:5060".to_string(), 5)]
        );
        let cands = vec![
            c("198.18.0.21:5060", 1, 0, true),
            c("198.18.0.22:5060", 1, 0, true),
        ];
        let s = select(&cands);
        assert_eq!(s.members.len(), 2);
        assert_eq!(s.members[0].1, s.members[1].1);
    }

    #[test]
    fn addresses_of_one_target_share_its_weight() {
        let mut cands = vec![
            c("198.18.0.21:5060", 1, 30, true),
            c("198.18.0.22:5060", 1, 30, true),
            c("[2001:db8::22]:5060", 1, 30, true),
        ];
        cands[1].sharing = 2;
        cands[2].sharing = 2;
        let s = select(&cands);
        let w: Vec<u32> = s.members.iter().map(|m| m.1).collect();
        assert_eq!(w, [30 * WEIGHT_SCALE, 15 * WEIGHT_SCALE, 15 * WEIGHT_SCALE]);
    }

    #[test]
    fn order_of_candidates_does_not_matter() {
        let mut cands = rfc2782_example([true, false, true, true, true]);
        let a = select(&cands);
        cands.reverse();
        assert_eq!(select(&cands), a);
    }

    #[test]
    fn largest_srv_weight_does_not_overflow() {
        let s = select(&[c("198.18.0.21:5060", 0, 65535, true)]);
        assert_eq!(s.members[0].1, 65535 * WEIGHT_SCALE);
    }
}
