use super::*;

#[test]
fn backend_specs() {
    let b: BackendSpec = "198.18.0.21:5060,weight=2".parse().unwrap();
    assert_eq!(b.addr, "198.18.0.21:5060".parse().unwrap());
    assert_eq!(b.weight, 2);
    let b: BackendSpec = "[2001:db8::21]:5062".parse().unwrap();
    assert_eq!((b.weight, b.priority), (1, 0));
    assert_eq!(b.addr.port(), 5062);
    let b: BackendSpec = "198.18.0.21:5060,priority=20,weight=0".parse().unwrap();
    assert_eq!((b.weight, b.priority), (0, 20));
    for bad in [
        "198.18.0.21:5060,priority=-1",
        "198.18.0.21:5060,weight=70000",
        "198.18.0.21",
        "198.18.0.21:5060,weight=x",
        "198.18.0.21:5060,w=2",
        "host:5060",
        "198.18.0.21:0",
    ] {
        assert!(bad.parse::<BackendSpec>().is_err(), "{bad}");
    }
}

#[test]
fn decap_needs_unicast_from_addresses() {
    let parse = |argv: &[&str]| {
        let mut all = vec!["sip-dispatch", "decap", "--iface", "eth1"];
        all.extend_from_slice(argv);
        Cli::try_parse_from(all).map(|c| match c.command {
            Command::Decap(a) => a.from,
            _ => unreachable!(),
        })
    };
    assert_eq!(
        parse(&["--from", "198.18.0.2", "--from", "2001:db8::2"]).unwrap(),
        ["198.18.0.2", "2001:db8::2"].map(|a| a.parse::<IpAddr>().unwrap())
    );
    assert!(parse(&[]).is_err(), "--from is required");
    for bad in [
        "198.18.0.2:5060",
        "decap.example",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
        "127.0.0.1",
        "::ffff:0.0.0.0",
    ] {
        let e = parse(&["--from", bad]).unwrap_err().to_string();
        let first = e.lines().next().unwrap_or_default();
        assert!(first.contains(bad), "{bad}: {first}");
    }
    let e = parse_decap_source("224.0.0.1").unwrap_err();
    assert_eq!(
        e,
        "decap source 224.0.0.1 is a multicast address, not a unicast address"
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
    assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
    for bad in ["", "1", "s", "-1s", "0s", "1m", "NaNs"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn durations_never_panic_and_name_the_value() {
    for bad in [
        "1e20s",
        "1e30s",
        "1e308s",
        "1e400s",
        "NaNs",
        "nans",
        "-nans",
        "infs",
        "-infs",
        "infinitys",
        "0s",
        "0ms",
        "-1s",
        "-0s",
        "1e-12ms",
        "ms",
        "",
    ] {
        let e = parse_duration(bad).unwrap_err();
        assert!(
            e.contains(&format!("{bad:?}")) && !e.contains('\n'),
            "{bad:?}: {e}"
        );
        assert!(parse_health_interval(bad).is_err(), "{bad:?}");
        assert!(parse_health_timeout(bad).is_err(), "{bad:?}");
    }
    // Parses, but outside the range: the message names the value and the range.
    assert_eq!(
        parse_health_interval("1e15s").unwrap_err(),
        "health-interval \"1e15s\" is out of range: 100ms to 3600s"
    );
    assert_eq!(
        parse_health_interval("99ms").unwrap_err(),
        "health-interval \"99ms\" is out of range: 100ms to 3600s"
    );
    assert_eq!(
        parse_health_timeout("9ms").unwrap_err(),
        "health-timeout \"9ms\" is out of range: 10ms to 3600s"
    );
    assert_eq!(
        parse_health_interval("100ms"),
        Ok(Duration::from_millis(100))
    );
    assert_eq!(
        parse_health_interval("3600s"),
        Ok(Duration::from_secs(3600))
    );
    assert!(parse_health_interval("3600.001s").is_err());
    assert_eq!(parse_health_timeout("10ms"), Ok(Duration::from_millis(10)));
    for (bad, why) in [
        ("1e20s", "is out of range: 100ms to 3600s"),
        ("1e308s", "is out of range: 100ms to 3600s"),
        ("0s", "is out of range: 100ms to 3600s"),
        ("-1s", "is out of range: 100ms to 3600s"),
        (
            "NaNs",
            "is not a duration: expected 100ms to 3600s, e.g. 500ms",
        ),
        (
            "infs",
            "is not a duration: expected 100ms to 3600s, e.g. 500ms",
        ),
        (
            "1h",
            "is not a duration: expected 100ms to 3600s, e.g. 500ms",
        ),
    ] {
        let e = parse_health_interval(bad).unwrap_err();
        assert!(
            e.starts_with(&format!("health-interval {bad:?} {why}")),
            "{e}"
        );
    }
    assert_eq!(
        parse_health_timeout("1e30s").unwrap_err(),
        "health-timeout \"1e30s\" is out of range: 10ms to 3600s"
    );
}

#[test]
fn call_idle_is_bounded_and_takes_minutes_and_hours() {
    let s = Duration::from_secs;
    for (given, want) in [
        ("10s", s(10)),
        ("10m", s(600)),
        ("1.5h", s(5400)),
        ("24h", s(86_400)),
        ("86400s", s(86_400)),
        ("10000ms", s(10)),
    ] {
        assert_eq!(parse_call_idle(given), Ok(want), "{given}");
    }
    for bad in ["9s", "9999ms", "24.001h", "0m", "-1m", "1e300h", "1e20s"] {
        assert_eq!(
            parse_call_idle(bad).unwrap_err(),
            format!("call-idle {bad:?} is out of range: 10s to 24h")
        );
    }
    for bad in [
        "", "10", "m", "10 m", "tenm", "NaNh", "infm", "10d", "1h30m",
    ] {
        let e = parse_call_idle(bad).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "call-idle {bad:?} is not a duration: expected 10s to 24h"
            )),
            "{e}"
        );
    }
    let run = |args: &[&str]| {
        Cli::try_parse_from([["sip-dispatch", "run", "--iface", "d0"].as_slice(), args].concat())
            .map_err(|e| e.to_string())
    };
    let Ok(Cli {
        command: Command::Run(a),
        ..
    }) = run(&["--call-idle", "2h"])
    else {
        panic!("--call-idle 2h")
    };
    assert_eq!(a.call_idle, Some(s(7200)));
    let e = run(&["--call-idle", "5s"]).unwrap_err();
    assert!(
        e.contains("call-idle \"5s\" is out of range: 10s to 24h"),
        "{e}"
    );
}

#[test]
fn drain_takes_wait_and_a_timeout_only_with_it() {
    let parse = |args: &[&str]| {
        Cli::try_parse_from(
            [
                ["sip-dispatch", "backends", "drain", "198.18.0.22:5060"].as_slice(),
                args,
            ]
            .concat(),
        )
        .map_err(|e| e.to_string())
    };
    let drain = |args: &[&str]| match parse(args) {
        Ok(Cli {
            command:
                Command::Backends {
                    command: BackendsCommand::Drain { wait, timeout, .. },
                    ..
                },
            ..
        }) => (wait, timeout),
        other => panic!("{args:?}: {:?}", other.err()),
    };
    assert_eq!(drain(&[]), (false, None));
    assert_eq!(drain(&["--wait"]), (true, None));
    assert_eq!(
        drain(&["--wait", "--timeout", "30s"]),
        (true, Some(Duration::from_secs(30)))
    );
    assert!(
        parse(&["--timeout", "30s"]).is_err(),
        "--timeout needs --wait"
    );
    let e = parse(&["--wait", "--timeout", "0s"]).unwrap_err();
    assert!(e.contains("timeout \"0s\" is out of range"), "{e}");
}

#[test]
fn counts_and_ttls_are_bounded_on_the_command_line() {
    let run = |flag: &str, value: &str| {
        Cli::try_parse_from(["sip-dispatch", "run", "--iface", "d0", flag, value])
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    for flag in ["--down-after", "--up-after"] {
        assert_eq!(run(flag, "1"), Ok(()));
        assert_eq!(run(flag, "100"), Ok(()));
        for bad in ["0", "101", "4294967296", "-1"] {
            let e = run(flag, bad).unwrap_err();
            assert!(e.contains(bad), "{flag} {bad}: {e}");
        }
    }
    for flag in ["--dns-min-ttl", "--dns-max-ttl"] {
        assert_eq!(run(flag, "1"), Ok(()));
        assert_eq!(run(flag, "86400"), Ok(()));
        for bad in ["0", "86401", "18446744073709551616"] {
            let e = run(flag, bad).unwrap_err();
            assert!(e.contains(bad), "{flag} {bad}: {e}");
        }
    }
    let e = run("--health-interval", "1e20s").unwrap_err();
    assert!(e.contains("1e20s"), "{e}");
    let e = run("--health-timeout", "1e30s").unwrap_err();
    assert!(e.contains("1e30s"), "{e}");
    assert_eq!(
        check_count("down-after", 0, MAX_CHECK_COUNT.into()).unwrap_err(),
        "down-after 0 is out of range: must be at least 1 and at most 100"
    );
}

#[test]
fn cli_parses_the_documented_form() {
    let cli = Cli::try_parse_from([
        "sip-dispatch",
        "run",
        "--iface",
        "d0",
        "--vip",
        "198.18.0.100:5060",
        "--backend",
        "198.18.0.21:5060,weight=2",
        "--backend",
        "198.18.0.22:5060",
        "--xdp-mode",
        "skb",
        "--hash-key",
        "7369702d64697370617463682d763121",
    ])
    .unwrap();
    let Command::Run(args) = cli.command else {
        panic!("not run")
    };
    assert_eq!(args.backends.len(), 2);
    assert_eq!(args.xdp_mode, Some(XdpModeArg::Skb));
    assert_eq!(args.hash_key, Some(HashKey::DEFAULT));
    let err = Cli::try_parse_from([
        "sip-dispatch",
        "run",
        "--iface",
        "d0",
        "--vip",
        "nope",
        "--backend",
        "198.18.0.21:5060",
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("invalid address \"nope\""), "{err}");
}
