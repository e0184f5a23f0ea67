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
    /// The share of its weight the backend's load leaves it, in percent (RFC 7339
    /// overload, latency; see `sip_dispatch_common::load`): 100 normally, 0 takes no
    /// new calls (like a drained backend).
    pub load_percent: u32,
}

/// The backends in the table and the priority they were taken from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub priority: Option<u16>,
    /// Sorted by address, weights scaled.
    pub members: Vec<(SocketAddr, u32)>,
}

impl Selection {
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
        self.healthy && self.load_percent > 0
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
    let mut members: Vec<(SocketAddr, u32)> = group
        .iter()
        .filter_map(|c| {
            let weight = match (c.weight, any_weighted) {
                (0, true) => return None,
                (0, false) => 1,
                (w, _) => w,
            };
            let scaled = (weight * WEIGHT_SCALE / c.sharing.max(1)).max(1);
            // Fits: 65535 x 2520 x 100 < 2^64.
            let loaded = u64::from(scaled) * u64::from(c.load_percent.min(100)) / 100;
            Some((c.addr, u32::try_from(loaded).unwrap_or(scaled).max(1)))
        })
        .collect();
    members.sort();
    members.dedup_by_key(|m| m.0);
    Selection {
        priority: Some(priority),
        members,
    }
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
            load_percent: 100,
        }
    }

    #[test]
    fn load_scales_a_weight_and_zero_takes_no_new_calls() {
        let mut cands = vec![
            c("198.18.0.1:5060", 10, 1, true),
            c("198.18.0.2:5060", 10, 2, true),
        ];
        cands[0].load_percent = 50;
        let s = select(&cands);
        assert_eq!(
            s.members,
            vec![
                (cands[0].addr, WEIGHT_SCALE / 2),
                (cands[1].addr, 2 * WEIGHT_SCALE)
            ]
        );
        // A backend at 0 % goes like a drained one; with all at 0 % the next priority.
        cands[0].load_percent = 0;
        assert_eq!(
            select(&cands).members,
            vec![(cands[1].addr, 2 * WEIGHT_SCALE)]
        );
        cands[1].load_percent = 0;
        cands.push(c("198.18.0.3:5060", 20, 1, true));
        let s = select(&cands);
        assert_eq!((s.priority, s.members.len()), (Some(20), 1));
        // The smallest share is still a slot's worth of weight.
        cands[2].load_percent = 1;
        cands[2].weight = 1;
        assert_eq!(select(&cands).members[0].1, WEIGHT_SCALE / 100);
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
