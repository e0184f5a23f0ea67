use super::resolve::resolve_within;
use super::test_dns::{Answers, SlowDns};
use super::*;
use std::collections::BTreeSet;

#[test]
fn backoff_doubles_up_to_the_maximum() {
    let max = Duration::from_secs(10);
    let mut d = None;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let next = backoff(d, max);
        seen.push(next.as_secs());
        d = Some(next);
    }
    assert_eq!(seen, [1, 2, 4, 8, 10, 10]);
}

#[test]
fn every_address_of_a_target_is_a_backend_sharing_its_weight() {
    let answer = SrvAnswer {
        targets: vec![
            SrvTarget {
                priority: 10,
                weight: 60,
                port: 5060,
                target: "a.example.net.".into(),
                addrs: vec!["198.18.0.21".parse().unwrap()],
            },
            SrvTarget {
                priority: 10,
                weight: 20,
                port: 5062,
                target: "b.example.net.".into(),
                addrs: vec![
                    "198.18.0.22".parse().unwrap(),
                    "2001:db8::22".parse().unwrap(),
                ],
            },
        ],
        ttl: Duration::from_secs(30),
        reported: Reported::default(),
    };
    // Only addresses of the VIP's family take part, and share the weight among
    // themselves.
    let v4 = answer.candidates(false);
    assert_eq!(v4.len(), 2);
    assert_eq!(v4[0].addr, "198.18.0.21:5060".parse().unwrap());
    assert_eq!((v4[0].weight, v4[0].sharing), (60, 1));
    assert_eq!(v4[1].addr, "198.18.0.22:5062".parse().unwrap());
    assert_eq!((v4[1].weight, v4[1].sharing, v4[1].priority), (20, 1, 10));
    let v6 = answer.candidates(true);
    assert_eq!(v6.len(), 1);
    assert_eq!(v6[0].addr, "[2001:db8::22]:5062".parse().unwrap());
    assert_eq!((v6[0].weight, v6[0].sharing), (20, 1));
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rec(priority: u16, target: &str) -> SrvRecord {
    SrvRecord {
        priority,
        weight: 10,
        port: 5060,
        target: target.into(),
    }
}

#[test]
fn a_lone_dot_target_means_no_service() {
    assert_eq!(
        plan("_sip._udp.x.", vec![rec(0, ".")]).unwrap(),
        Plan::NoService
    );
    // "." among real targets is left out; several "." records are not a usable set.
    match plan("_sip._udp.x.", vec![rec(0, "."), rec(10, "b1.x.")]).unwrap() {
        Plan::Targets(t, 0, _) => assert_eq!(t.len(), 1),
        other => panic!("{other:?}"),
    }
    let e = plan("_sip._udp.x.", vec![rec(0, "."), rec(0, ".")]).unwrap_err();
    assert!(format!("{e}").contains("no usable target"), "{e}");
    let e = plan("_sip._udp.x.", vec![]).unwrap_err();
    assert!(format!("{e}").contains("no records"), "{e}");
}

#[test]
fn records_with_port_0_are_left_out() {
    let mut zero = rec(10, "B0.x.");
    zero.port = 0;
    match plan("n", vec![zero.clone(), rec(10, "b1.x.")]).unwrap() {
        Plan::Targets(t, 0, port_zero) => {
            assert_eq!(t.len(), 1);
            assert_eq!((t[0].target.as_str(), t[0].port), ("b1.x.", 5060));
            assert_eq!(port_zero, BTreeSet::from(["b0.x.".to_string()]));
        }
        other => panic!("{other:?}"),
    }
    // Only port-0 records: an error naming them, not "no service" and no backend.
    let e = plan("n", vec![zero.clone()]).unwrap_err().to_string();
    assert!(e.contains("port 0 for b0.x."), "{e}");
    // A lone "." (RFC 2782 writes it with port 0) still means no service.
    let mut dot = rec(0, ".");
    dot.port = 0;
    assert_eq!(plan("n", vec![dot]).unwrap(), Plan::NoService);
}

#[tokio::test]
async fn a_port_0_target_is_no_backend_and_is_reported_once() {
    let dns = SlowDns::start(Answers {
        targets: 3,
        port_zero: 1,
        ..Answers::default()
    })
    .await;
    let resolver = dns.resolver();
    let mut state = NameState::default();
    for _ in 0..2 {
        let answer = resolve_with(&resolver, "_sip._udp.test.", &mut state)
            .await
            .unwrap();
        let targets: Vec<&str> = answer.targets.iter().map(|t| t.target.as_str()).collect();
        assert_eq!(targets, ["t1.test.", "t2.test."]);
        assert!(
            answer
                .candidates(false)
                .iter()
                .all(|c| c.addr.port() == 5060)
        );
        // Remembered, so the next resolution does not log it again.
        assert_eq!(
            state.reported.port_zero,
            BTreeSet::from(["t0.test.".to_string()])
        );
    }
}

#[test]
fn targets_are_capped_keeping_the_lowest_priorities() {
    let mut records: Vec<SrvRecord> = (0..100u16)
        .map(|i| rec(100 - i, &format!("t{i}.x.")))
        .collect();
    records.push(rec(1, &format!("{}.x.", "a".repeat(300))));
    match plan("n", records).unwrap() {
        Plan::Targets(t, capped, _) => {
            assert_eq!(t.len(), MAX_TARGETS);
            assert_eq!(capped, 100 - MAX_TARGETS);
            // Priorities 1..=64 kept, in order; the over-long name is gone.
            assert_eq!(t[0].priority, 1);
            assert_eq!(t[0].target, "t99.x.");
            assert_eq!(t[MAX_TARGETS - 1].priority, MAX_TARGETS as u16);
            assert!(t.iter().all(|t| t.target.len() <= MAX_NAME_LEN));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn special_and_local_addresses_are_refused_one_by_one() {
    let local = [ip("198.18.0.2"), ip("198.18.0.100")];
    let (kept, refused) = admit(
        &[
            ip("198.18.0.21"),
            ip("127.0.0.1"),
            ip("224.0.0.1"),
            ip("0.0.0.0"),
            ip("169.254.0.9"),
            ip("255.255.255.255"),
            ip("198.18.0.2"),
            ip("fe80::1"),
            ip("2001:db8::21"),
            ip("198.18.0.21"),
        ],
        &local,
    );
    assert_eq!(kept, [ip("198.18.0.21"), ip("2001:db8::21")]);
    let refused: Vec<IpAddr> = refused.into_iter().map(|(a, _)| a).collect();
    assert_eq!(refused.len(), 7, "{refused:?}");
    for bad in [
        "127.0.0.1",
        "224.0.0.1",
        "198.18.0.2",
        "fe80::1",
        "255.255.255.255",
    ] {
        assert!(refused.contains(&ip(bad)), "{bad}");
    }
}

#[test]
fn addresses_per_target_and_family_are_capped() {
    let many: Vec<IpAddr> = (1..=40u8)
        .map(|i| IpAddr::from([198, 18, 1, i]))
        .chain([ip("2001:db8::21")])
        .collect();
    let (kept, refused) = admit(&many, &[]);
    assert_eq!(
        kept.iter().filter(|a| a.is_ipv4()).count(),
        MAX_ADDRS_PER_FAMILY
    );
    assert!(kept.contains(&ip("2001:db8::21")));
    assert_eq!(refused.len(), 40 - MAX_ADDRS_PER_FAMILY);
    assert!(refused[0].1.contains("cap"), "{:?}", refused[0]);
}

#[test]
fn a_failed_lookup_keeps_the_last_known_addresses() {
    let last = SrvAnswer {
        targets: vec![
            SrvTarget {
                priority: 10,
                weight: 50,
                port: 5060,
                target: "B2.example.net.".into(),
                addrs: vec![ip("198.18.0.22"), ip("2001:db8::22")],
            },
            SrvTarget {
                priority: 20,
                weight: 0,
                port: 5070,
                target: "b2.example.net.".into(),
                addrs: vec![ip("198.18.0.22")],
            },
        ],
        ttl: Duration::from_secs(2),
        reported: Reported::default(),
    };
    let v4 = last.addrs_of("b2.example.net.", false);
    assert_eq!(v4, [ip("198.18.0.22")]);
    assert_eq!(last.addrs_of("b2.example.net.", true), [ip("2001:db8::22")]);
    assert!(last.addrs_of("b3.example.net.", false).is_empty());
    let failed = Lookup::Failed("NXDOMAIN".into());
    assert_eq!(with_last_known(&failed, &v4), (v4.clone(), true));
    assert_eq!(with_last_known(&failed, &[]), (vec![], false));
    let found = Lookup::Found(vec![ip("198.18.0.23")]);
    assert_eq!(
        with_last_known(&found, &v4),
        (vec![ip("198.18.0.23")], false)
    );
}

#[test]
fn ttl_bounds_never_panic() {
    let cfg = DnsConfig {
        server: None,
        min_ttl: Duration::from_secs(5),
        max_ttl: Duration::from_secs(300),
    };
    assert_eq!(
        cfg.wait_for(Duration::from_secs(u64::from(u32::MAX))),
        Duration::from_secs(300)
    );
    assert_eq!(cfg.wait_for(Duration::ZERO), Duration::from_secs(5));
    // Inverted bounds (a bad configuration) give the maximum, not a panic.
    let inverted = DnsConfig {
        min_ttl: Duration::from_secs(300),
        max_ttl: Duration::from_secs(5),
        ..cfg
    };
    assert_eq!(
        inverted.wait_for(Duration::from_secs(60)),
        Duration::from_secs(5)
    );
    assert_eq!(backoff(Some(Duration::MAX), Duration::MAX), Duration::MAX);
}

#[tokio::test]
async fn address_lookups_run_concurrently_within_the_bound() {
    let dns = SlowDns::start(Answers {
        targets: 20,
        addr_delay: Some(Duration::from_millis(200)),
        ..Answers::default()
    })
    .await;
    let started = std::time::Instant::now();
    let answer = resolve(&dns.resolver(), "_sip._udp.test.").await.unwrap();
    let took = started.elapsed();
    let most = dns.max_in_flight.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(answer.targets.len(), 20);
    assert!(
        answer
            .targets
            .iter()
            .all(|t| t.addrs.len() == 1 && t.addrs[0].is_ipv4())
    );
    // 40 lookups (A and AAAA of 20 targets) of 200 ms each: one by one 8 s, eight at
    // a time about 1 s.
    assert!(
        (LOOKUP_CONCURRENCY / 2..=LOOKUP_CONCURRENCY).contains(&most),
        "{most} at once"
    );
    assert!(took < Duration::from_secs(4), "took {took:?}");
    eprintln!("20 targets resolved in {took:?}, at most {most} lookups at once");
}

#[tokio::test]
async fn a_resolution_ends_in_time_and_unanswered_targets_keep_their_addresses() {
    let dns = SlowDns::start(Answers {
        targets: 3,
        addr_delay: None,
        ..Answers::default()
    })
    .await;
    let last = SrvAnswer {
        targets: vec![SrvTarget {
            priority: 10,
            weight: 1,
            port: 5060,
            target: "t1.test.".into(),
            addrs: vec![ip("198.18.1.1")],
        }],
        ttl: Duration::from_secs(60),
        reported: Reported::default(),
    };
    let mut state = NameState::new(Some(last));
    let started = std::time::Instant::now();
    let limit = Duration::from_millis(700);
    let answer = resolve_within(&dns.resolver(), "_sip._udp.test.", &mut state, limit)
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(took < limit + Duration::from_millis(300), "took {took:?}");
    // t0 and t2 never answered and were not known: left out; t1 keeps its address.
    assert_eq!(answer.targets.len(), 1);
    assert_eq!(answer.targets[0].target, "t1.test.");
    assert_eq!(answer.targets[0].addrs, [ip("198.18.1.1")]);
    assert!(
        state
            .reported
            .stale
            .contains(&("t1.test.".to_string(), false))
    );
}
