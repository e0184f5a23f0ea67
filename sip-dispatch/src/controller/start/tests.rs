use std::{sync::atomic::Ordering, time::Duration};

use super::*;
use crate::srv::test_dns::{Answers, SlowDns};

#[test]
fn dsr_services_get_a_probe_source_that_is_not_a_vip() {
    let settings = |argv: &[&str]| {
        let mut all = vec!["sip-dispatch", "run", "--iface", "eth1"];
        all.extend_from_slice(argv);
        match <crate::cli::Cli as clap::Parser>::try_parse_from(all)
            .unwrap()
            .command
        {
            crate::cli::Command::Run(a) => Settings::resolve(&a).unwrap(),
            _ => unreachable!(),
        }
    };
    let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
    let iface = [
        ip("198.18.0.100"),
        ip("fe80::1"),
        ip("198.18.0.1"),
        ip("2001:db8::100"),
        ip("2001:db8::1"),
    ];
    let v4 = [
        "--vip",
        "198.18.0.100:5060",
        "--backend",
        "198.18.0.21:5060",
    ];
    let with = |extra: &[&str]| {
        let mut a = v4.to_vec();
        a.extend_from_slice(extra);
        source_addresses(&settings(&a), &iface)
    };
    let (probe, encap) = with(&[]).unwrap();
    assert_eq!((probe, encap), Default::default(), "rewrite: routing picks");
    let (probe, encap) = with(&["--forwarding", "l2dsr"]).unwrap();
    assert_eq!(probe.iter().collect::<Vec<_>>(), [ip("198.18.0.1")]);
    assert_eq!(encap, SourceAddrs::default(), "no ipip service");
    let (probe, encap) = with(&["--forwarding", "ipip"]).unwrap();
    assert_eq!(probe.get(false), Some(ip("198.18.0.1")));
    assert_eq!(encap.get(false), Some(ip("198.18.0.1")), "the probe source");
    let (probe, encap) = with(&["--forwarding", "ipip", "--encap-source", "198.18.0.5"]).unwrap();
    assert_eq!(
        (probe.get(false), encap.get(false)),
        (Some(ip("198.18.0.1")), Some(ip("198.18.0.5")))
    );
    let e = source_addresses(
        &settings(&[
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.21:5060",
            "--forwarding",
            "ipip",
        ]),
        &[ip("198.18.0.100"), ip("2001:db8::1")],
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "service 198.18.0.100:5060 forwards in ipip mode, so health checks must not come from its VIP, and eth1 has no other IPv4 address: give --probe-source"
    );
    let (probe, _) = source_addresses(
        &settings(&[
            "--vip",
            "[2001:db8::100]:5060",
            "--backend",
            "[2001:db8::21]:5060",
            "--forwarding",
            "l2dsr",
        ]),
        &iface,
    )
    .unwrap();
    assert_eq!(
        probe.iter().collect::<Vec<_>>(),
        [ip("2001:db8::1")],
        "not link-local"
    );
}

#[tokio::test]
async fn start_up_resolves_srv_names_concurrently_within_the_bound() {
    let delay = Duration::from_millis(300);
    let dns = SlowDns::start(Answers {
        srv_delay: delay,
        ..Answers::default()
    })
    .await;
    let resolver = dns.resolver();
    let names: BTreeSet<String> = (0..12).map(|i| format!("_sip._udp.s{i}.test.")).collect();
    let started = std::time::Instant::now();
    let answers = resolve_names(&resolver, &names).await;
    let took = started.elapsed();
    let most = dns.max_in_flight.load(Ordering::SeqCst);
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        names.iter().collect::<Vec<_>>()
    );
    for (name, answer) in &answers {
        let answer = answer.as_ref().unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(answer.targets.len(), 1, "{name}");
    }
    // 12 names of 300 ms each: one by one 3.6 s, four at a time about 0.9 s.
    assert!(
        (2..=START_RESOLVE_CONCURRENCY).contains(&most),
        "{most} SRV queries at once"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    eprintln!("12 names resolved in {took:?}, at most {most} at once");
}
