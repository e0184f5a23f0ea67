use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use super::{reload::backends_reconfigured, *};
use sip_dispatch_common::MAX_BACKENDS;

use crate::{
    backend_ids::{BackendIds, Full},
    cli::BackendSpec,
    config::ServiceSpec,
    health::Health,
    select::{Candidate, Selection},
    srv::SrvTarget,
    state::AdminSetting,
};

fn addr(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000 + i)), 5060)
}

fn answer(first: u32, n: u32) -> SrvAnswer {
    let addrs: Vec<IpAddr> = (first..first + n).map(|i| addr(i).ip()).collect();
    SrvAnswer {
        targets: addrs
            .chunks(16)
            .enumerate()
            .map(|(i, a)| SrvTarget {
                priority: 10,
                weight: 1,
                port: 5060,
                target: format!("t{i}.example.net."),
                addrs: a.to_vec(),
            })
            .collect(),
        ttl: Duration::from_secs(60),
        reported: Default::default(),
    }
}

fn statics(first: u32, n: u32) -> Vec<Candidate> {
    (first..first + n)
        .map(|i| Candidate {
            addr: addr(i),
            priority: 0,
            weight: 1,
            sharing: 1,
            healthy: true,
            latency_percent: 100,
            overload_percent: 0,
        })
        .collect()
}

/// [`statics`] as the configuration gives them.
fn static_specs(first: u32, n: u32) -> Vec<BackendSpec> {
    statics(first, n)
        .iter()
        .map(|c| BackendSpec {
            addr: c.addr,
            weight: 1,
            priority: 0,
        })
        .collect()
}

fn vip(n: u8) -> SocketAddr {
    SocketAddr::from(([198, 19, 0, n], 5060))
}

#[test]
fn affinity_flags_follow_the_backend_states() {
    use crate::health::State;
    use sip_dispatch_common::{BF_AFFINITY as A, BF_NEW as N, BF_UP as U};
    let with = |state, admin| Health {
        admin,
        ..Health::new(state, "test")
    };
    let cases = [
        (with(State::Up, Admin::Enabled), false, A | U | N),
        (with(State::Up, Admin::Enabled), true, A | U),
        (with(State::Up, Admin::Drained), false, A | U),
        (with(State::Down, Admin::Enabled), false, A | N),
        (with(State::Down, Admin::Drained), false, A),
        (with(State::Up, Admin::Disabled), false, 0),
        (Health::unprobed(), false, A | N),
    ];
    for (health, weight_zero, want) in cases {
        assert_eq!(
            affinity_flags(&health, weight_zero),
            want,
            "{:?} {:?} weight 0: {weight_zero}",
            health.state,
            health.admin
        );
    }
}

#[test]
fn the_limit_is_half_the_ids() {
    assert_eq!(MAX_BACKENDS_IN_ALL, 2048);
    assert_eq!(MAX_BACKENDS_IN_ALL * 2, MAX_BACKENDS as usize);
}

#[test]
fn a_dns_answer_past_2048_backends_in_all_is_refused() {
    let a = Service::new(0, vip(1), statics(0, 1000), &[]);
    let b = Service::new(1, vip(2), vec![], &["b.".to_string()]);
    let services = vec![a, b];
    assert_eq!(backends_with(&services, "b.", &answer(1000, 1048)), 2048);
    assert!(backends_with(&services, "b.", &answer(1000, 1048)) <= MAX_BACKENDS_IN_ALL);
    assert_eq!(backends_with(&services, "b.", &answer(1000, 1049)), 2049);
    assert!(backends_with(&services, "b.", &answer(1000, 1049)) > MAX_BACKENDS_IN_ALL);
}

#[test]
fn backends_add_counts_every_service_and_a_known_address_once() {
    let mut a = Service::new(0, vip(1), statics(0, 1000), &["a.".to_string()]);
    a.set_srv("a.", &answer(1000, 1000));
    let b = Service::new(1, vip(2), statics(2000, 48), &[]);
    let services = vec![a, b];
    // 2048 listed: an address already listed (by the other service) adds nothing.
    assert_eq!(backends_adding(&services, addr(5)), 2048);
    assert_eq!(backends_adding(&services, addr(1500)), 2048);
    // A new one would be backend 2049.
    assert_eq!(backends_adding(&services, addr(3000)), 2049);
    assert!(backends_adding(&services, addr(3000)) > MAX_BACKENDS_IN_ALL);
}

#[test]
fn a_reload_counts_its_static_backends_with_the_kept_dns_answers() {
    let mut a = Service::new(0, vip(1), statics(0, 10), &["a.".to_string()]);
    a.set_srv("a.", &answer(1000, 2000));
    let b = Service::new(1, vip(2), statics(5000, 5), &[]);
    let services = vec![a, b];
    let spec = |vip, first, n, srv: &[&str]| ServiceSpec {
        vip,
        backends: static_specs(first, n),
        srv: srv.iter().map(|s| s.to_string()).collect(),
        forwarding: Default::default(),
    };
    // a keeps its SRV name (2000 from DNS) and gets 43 statics; b, not in the
    // reloaded set, keeps its 5.
    let next = [spec(vip(1), 3000, 43, &["a."])];
    assert_eq!(backends_reconfigured(&services, &next), 2048);
    let next = [spec(vip(1), 3000, 44, &["a."])];
    assert_eq!(backends_reconfigured(&services, &next), 2049);
    // Dropping the SRV name drops its answer from the count.
    let next = [spec(vip(1), 3000, 44, &[]), spec(vip(2), 0, 0, &[])];
    assert_eq!(backends_reconfigured(&services, &next), 44);
}

/// The brief's example: 3000 backends could be listed before, and an answer that
/// replaced 1100 of them needed 4100 ids. Now at most 2048 are listed, and even a
/// replacement of all of them gets ids while the old tables still hold theirs; the
/// old ids are freed once the new tables are in.
#[test]
fn a_full_replacement_of_2048_backends_installs() {
    let limit = MAX_BACKENDS_IN_ALL as u32;
    let mut ids = BackendIds::new(MAX_BACKENDS);
    let mut first = 0;
    for round in 0..3 {
        // Two services share the backends half and half; their tables are installed.
        let listed: Vec<SocketAddr> = (first..first + limit).map(addr).collect();
        for (table, half) in listed.chunks(MAX_BACKENDS_IN_ALL / 2).enumerate() {
            let mut in_table = BTreeSet::new();
            for a in half {
                let (id, _) = ids
                    .allocate(*a)
                    .unwrap_or_else(|e| panic!("round {round}, {a}: {e}"));
                in_table.insert(id);
            }
            ids.table_installed(table as u32, in_table);
        }
        let now: BTreeSet<SocketAddr> = listed.iter().copied().collect();
        let freed = ids.release_unlisted(|a| now.contains(&a));
        let expect_freed = if round == 0 { 0 } else { MAX_BACKENDS_IN_ALL };
        assert_eq!(freed.len(), expect_freed, "round {round}");
        // The next round replaces every address.
        first += limit;
    }
}

/// One backend more than the limit, and replacing all of them runs out of ids.
#[test]
fn past_the_limit_a_full_replacement_would_run_out_of_ids() {
    let over = MAX_BACKENDS_IN_ALL as u32 + 1;
    let mut ids = BackendIds::new(MAX_BACKENDS);
    let old: BTreeSet<u32> = (0..over)
        .map(|i| ids.allocate(addr(i)).unwrap().0)
        .collect();
    ids.table_installed(0, old);
    let replaced: Vec<_> = (over..2 * over).map(|i| ids.allocate(addr(i))).collect();
    assert_eq!(replaced.last(), Some(&Err(Full(MAX_BACKENDS))));
}

/// `reload` semantics for the state file: the reloaded configuration's static
/// backends replace those added with the CLI and bring back those removed with it,
/// so neither is kept (nor written) any more.
#[test]
fn a_reload_replaces_cli_added_backends_and_brings_back_removed_ones() {
    let mut s = Service::new(0, vip(1), statics(0, 3), &[]);
    s.statics.retain(|c| c.addr != addr(1));
    s.removed.insert(addr(1));
    s.statics.extend(statics(7, 1));
    s.cli_added.insert(addr(7));
    let spec = ServiceSpec {
        vip: vip(1),
        backends: static_specs(0, 3),
        srv: vec![],
        forwarding: Default::default(),
    };
    let changes = s.reconfigure(&spec);
    let listed: Vec<SocketAddr> = s.candidates().into_iter().map(|(c, _)| c.addr).collect();
    assert_eq!(listed, [addr(0), addr(1), addr(2)]);
    assert!(s.cli_added.is_empty() && s.removed.is_empty());
    assert_eq!(changes.len(), 2, "{changes:?}");
}

/// The state file's settings of an address no service listed at start (an SRV
/// backend not resolved yet) apply when it appears, once.
#[test]
fn pending_state_applies_when_the_address_appears() {
    let mut pending = state::Pending {
        admin: [
            (addr(1), AdminSetting::Drained),
            (addr(2), AdminSetting::Disabled),
        ]
        .into(),
        weights: [(addr(1), 3)].into(),
    };
    let k = Known::appearing(addr(1), &mut pending);
    assert_eq!(k.health.admin, Admin::Drained);
    assert_eq!(k.weight_override, Some(3));
    assert!(!k.health.takes_traffic());
    let k = Known::appearing(addr(2), &mut pending);
    assert_eq!(
        crate::protocol::BackendState::of(&k.health),
        crate::protocol::BackendState::Disabled
    );
    assert_eq!(k.weight_override, None);
    // Applied once: the next appearance of addr(1) is a plain new backend.
    let k = Known::appearing(addr(1), &mut pending);
    assert_eq!((k.health.admin, k.weight_override), (Admin::Enabled, None));
    assert_eq!(pending, state::Pending::default());
}

#[test]
fn a_build_listing_a_removed_backend_is_known_as_such() {
    let mut s = Service::new(0, vip(1), statics(0, 3), &[]);
    let built = Selection {
        priority: Some(0),
        members: vec![(addr(0), 1), (addr(1), 1), (addr(2), 1)],
        shed: 0,
        divisor: 1,
    };
    assert_eq!(s.unlisted_member(&built), None);
    s.statics.retain(|c| c.addr != addr(1));
    assert_eq!(s.unlisted_member(&built), Some(addr(1)));
}

#[test]
fn backends_in_all_counts_every_service_and_shared_addresses_once() {
    let vip_a: SocketAddr = "198.18.0.100:5060".parse().unwrap();
    let vip_b: SocketAddr = "198.18.0.101:5060".parse().unwrap();
    let mut a = Service::new(0, vip_a, vec![], &["a.".to_string()]);
    let b = Service::new(1, vip_b, vec![], &["b.".to_string()]);
    a.set_srv("a.", &answer(1000, 2000));
    let mut services = vec![a, b];
    // b's answer overlaps a's by 1000 addresses: counted once.
    assert_eq!(backends_with(&services, "b.", &answer(2000, 2000)), 3000);
    // 2000 + 2097 new ones pass MAX_BACKENDS.
    let big = answer(4000, 2097);
    assert!(backends_with(&services, "b.", &big) > MAX_BACKENDS as usize);
    // Replacing a's own answer does not count its old set.
    assert_eq!(backends_with(&services, "a.", &big), 2097);
    services[1].set_srv("b.", &answer(3000, 100));
    assert_eq!(backends_with(&services, "a.", &answer(0, 0)), 100);
}
