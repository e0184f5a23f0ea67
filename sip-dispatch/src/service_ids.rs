//! Service ids (the index of a VIP's slot table in the tables map), kept across
//! restarts: a VIP the adopted maps already know keeps its id, so a reordered
//! configuration never points a VIP at another service's table, not even between the
//! adoption and the first publish.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use anyhow::bail;

/// One id per entry of `vips` (in that order). `adopted` is what the pinned services map
/// holds. New VIPs get the lowest ids no adopted VIP uses; only when none is left do they
/// take the ids of adopted VIPs that are no longer configured (listed in `reclaimed`,
/// whose service entries must go before the first publish).
pub fn assign(
    vips: &[SocketAddr],
    adopted: &BTreeMap<SocketAddr, u32>,
    max: u32,
) -> anyhow::Result<Assignment> {
    let mut ids: Vec<Option<u32>> = vec![None; vips.len()];
    let mut taken = BTreeSet::new();
    for (i, vip) in vips.iter().enumerate() {
        if let Some(&id) = adopted.get(vip)
            && id < max
            && taken.insert(id)
        {
            ids[i] = Some(id);
        }
    }
    let configured: BTreeSet<&SocketAddr> = vips.iter().collect();
    let held_by_others: BTreeSet<u32> = adopted
        .iter()
        .filter(|(vip, _)| !configured.contains(vip))
        .map(|(_, id)| *id)
        .collect();
    let mut fresh = (0..max).filter(|id| !taken.contains(id) && !held_by_others.contains(id));
    let mut reclaim = held_by_others
        .iter()
        .copied()
        .filter(|id| !taken.contains(id));
    let mut reclaimed = Vec::new();
    for (i, slot) in ids.iter_mut().enumerate() {
        if slot.is_some() {
            continue;
        }
        let id = match fresh.next() {
            Some(id) => id,
            None => match reclaim.next() {
                Some(id) => {
                    reclaimed.extend(
                        adopted
                            .iter()
                            .filter(|(_, v)| **v == id)
                            .map(|(vip, _)| *vip),
                    );
                    id
                }
                None => bail!(
                    "{} services: more than {max}, the most one dispatcher serves",
                    vips.len()
                ),
            },
        };
        log::debug!("service {} gets the new id {id}", vips[i]);
        *slot = Some(id);
    }
    Ok(Assignment {
        ids: ids.into_iter().flatten().collect(),
        reclaimed,
    })
}

#[derive(Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The id of each configured VIP, in configuration order.
    pub ids: Vec<u32>,
    /// Adopted, unconfigured VIPs whose id went to a new VIP.
    pub reclaimed: Vec<SocketAddr>,
}

impl Assignment {
    /// The adopted VIPs whose service entries stay until the link step: all but the
    /// reclaimed ones, whose ids new VIPs take (their entries must go before the new
    /// tables do). `None` when nothing is reclaimed: no entry goes before the link step.
    pub fn kept_before_attach(
        &self,
        adopted: &BTreeMap<SocketAddr, u32>,
    ) -> Option<Vec<SocketAddr>> {
        if self.reclaimed.is_empty() {
            return None;
        }
        Some(
            adopted
                .keys()
                .filter(|vip| !self.reclaimed.contains(vip))
                .copied()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn fresh_start_numbers_in_configuration_order() {
        let vips = [a("198.18.0.1:5060"), a("198.18.0.2:5060")];
        let got = assign(&vips, &BTreeMap::new(), 64).expect("assign");
        assert_eq!(got.ids, vec![0, 1]);
        assert!(got.reclaimed.is_empty());
    }

    #[test]
    fn reordered_vips_keep_their_adopted_ids() {
        let adopted = BTreeMap::from([(a("198.18.0.1:5060"), 0), (a("198.18.0.2:5060"), 1)]);
        let vips = [a("198.18.0.2:5060"), a("198.18.0.1:5060")];
        assert_eq!(assign(&vips, &adopted, 64).expect("assign").ids, vec![1, 0]);
    }

    #[test]
    fn new_vips_avoid_every_adopted_id() {
        // .3 is adopted but no longer configured: its id stays off limits while free ids last.
        let adopted = BTreeMap::from([(a("198.18.0.1:5060"), 2), (a("198.18.0.3:5060"), 0)]);
        let vips = [
            a("198.18.0.9:5060"),
            a("198.18.0.1:5060"),
            a("198.18.0.8:5060"),
        ];
        let got = assign(&vips, &adopted, 64).expect("assign");
        assert_eq!(got.ids, vec![1, 2, 3]);
        assert!(got.reclaimed.is_empty());
    }

    #[test]
    fn ids_of_unconfigured_vips_are_reclaimed_only_when_nothing_else_is_free() {
        let adopted = BTreeMap::from([(a("198.18.0.1:5060"), 0), (a("198.18.0.3:5060"), 1)]);
        let vips = [a("198.18.0.9:5060"), a("198.18.0.1:5060")];
        let got = assign(&vips, &adopted, 2).expect("assign");
        assert_eq!(got.ids, vec![1, 0]);
        assert_eq!(got.reclaimed, vec![a("198.18.0.3:5060")]);
    }

    #[test]
    fn only_reclaimed_entries_go_before_the_link_step() {
        let gone = a("198.18.0.3:5060");
        let adopted = BTreeMap::from([
            (a("198.18.0.1:5060"), 0),
            (gone, 1),
            (a("198.18.0.4:5060"), 2),
        ]);
        // Room left: the unconfigured .3 and .4 keep their entries until the link step.
        let vips = [a("198.18.0.9:5060"), a("198.18.0.1:5060")];
        let roomy = assign(&vips, &adopted, 64).expect("assign");
        assert_eq!(roomy.kept_before_attach(&adopted), None);
        // No id left but .3's and .4's: the lowest (.3's) is reclaimed, only it goes early.
        let tight = assign(&vips, &adopted, 3).expect("assign");
        assert_eq!(tight.ids, vec![1, 0]);
        assert_eq!(
            tight.kept_before_attach(&adopted),
            Some(vec![a("198.18.0.1:5060"), a("198.18.0.4:5060")])
        );
    }

    #[test]
    fn out_of_range_or_duplicate_adopted_ids_are_not_reused() {
        let adopted = BTreeMap::from([
            (a("198.18.0.1:5060"), 70),
            (a("198.18.0.2:5060"), 5),
            (a("198.18.0.3:5060"), 5),
        ]);
        let vips = [
            a("198.18.0.1:5060"),
            a("198.18.0.2:5060"),
            a("198.18.0.3:5060"),
        ];
        let got = assign(&vips, &adopted, 64).expect("assign");
        assert_eq!(got.ids[1], 5);
        assert!(got.ids[0] != 5 && got.ids[2] != 5 && got.ids[0] != got.ids[2]);
        assert!(got.ids.iter().all(|id| *id < 64));
    }

    #[test]
    fn too_many_services_is_an_error() {
        let vips: Vec<SocketAddr> = (1..=3).map(|i| a(&format!("198.18.0.{i}:5060"))).collect();
        let err = assign(&vips, &BTreeMap::new(), 2).expect_err("3 > 2");
        assert!(format!("{err}").contains("more than 2"));
    }
}
