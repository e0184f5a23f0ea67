//! The address and service rules: VIPs of this host, backends and sources that may be
//! used, at most so many backends, service sets that make sense.
use super::*;

fn error_on_host(argv: &[&str]) -> String {
    let mut all = vec![
        "--iface",
        "eth1",
        "--hash-key",
        "000102030405060708090a0b0c0d0e0f",
    ];
    all.extend_from_slice(argv);
    format!(
        "{:#}",
        Settings::resolve_on_host(&args(&all), &local()).unwrap_err()
    )
}

#[test]
fn vips_must_be_unicast_addresses_of_this_host() {
    let good = Settings::resolve_on_host(
        &args(&[
            "--iface",
            "eth1",
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.21:5060",
        ]),
        &local(),
    );
    assert!(good.is_ok(), "{:#}", good.unwrap_err());
    for (vip, why) in [
        ("0.0.0.0:5060", "VIP 0.0.0.0 is the unspecified address"),
        ("[::]:5060", "VIP :: is the unspecified address"),
        (
            "255.255.255.255:5060",
            "VIP 255.255.255.255 is the broadcast address",
        ),
        ("239.1.1.1:5060", "VIP 239.1.1.1 is a multicast address"),
        ("[ff02::1]:5060", "VIP ff02::1 is a multicast address"),
        ("127.0.0.1:5060", "VIP 127.0.0.1 is a loopback address"),
        (
            "198.18.0.101:5060",
            "VIP 198.18.0.101 is not an address of this host",
        ),
    ] {
        let backend = if vip.starts_with('[') {
            "[2001:db8::21]:5060"
        } else {
            "198.18.0.21:5060"
        };
        let e = error_on_host(&["--vip", vip, "--backend", backend]);
        assert!(
            e.starts_with(&format!("--vip {vip}: ")) && e.contains(why),
            "{vip}: {e}"
        );
        assert!(!e.contains('\n'), "{e}");
        // Without the host's addresses (unit tests of other parts) VIPs pass.
        let mut argv = vec!["--iface", "eth1", "--vip", vip, "--backend", backend];
        argv.extend_from_slice(&["--hash-key", "000102030405060708090a0b0c0d0e0f"]);
        assert!(Settings::resolve(&args(&argv)).is_ok(), "{vip}");
    }
}

#[test]
fn at_most_2048_static_backends_in_all_services() {
    let backend = |i: usize| format!("198.18.{}.{}:5060", i / 250 + 1, i % 250 + 1);
    const KEY: [&str; 2] = ["--hash-key", "000102030405060708090a0b0c0d0e0f"];
    // Flags: one service.
    let flags = |n: usize| {
        let mut argv: Vec<String> = ["--iface", "eth1", "--vip", "198.19.0.100:5060"]
            .iter()
            .chain(&KEY)
            .map(|s| s.to_string())
            .collect();
        for i in 0..n {
            argv.extend(["--backend".to_string(), backend(i)]);
        }
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        Settings::resolve(&args(&argv))
    };
    assert!(flags(2048).is_ok(), "{:#}", flags(2048).unwrap_err());
    let e = format!("{:#}", flags(2049).unwrap_err());
    assert_eq!(e, "2049 backends in all services: at most 2048");
    // File: two services, a shared address counted once.
    let file = |n: usize| {
        let list = |r: std::ops::Range<usize>| {
            r.map(|i| format!("\"{}\"", backend(i)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text = format!(
            "iface = \"eth1\"\n[[service]]\nvip = \"198.19.0.100:5060\"\nbackends = [{}]\n\
             [[service]]\nvip = \"198.19.0.101:5060\"\nbackends = [{}]\n",
            list(0..1000),
            list(999..n)
        );
        let p = write(&format!("limit{n}.toml"), &text);
        let mut argv = vec!["--config", p.to_str().unwrap()];
        argv.extend_from_slice(&KEY);
        Settings::resolve(&args(&argv))
    };
    assert!(file(2048).is_ok(), "{:#}", file(2048).unwrap_err());
    let e = format!("{:#}", file(2049).unwrap_err());
    assert!(
        e.contains("2049 backends in all services: at most 2048"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn static_backends_follow_the_dns_rules() {
    for (backend, why) in [
        ("127.0.0.1:5060", "backend 127.0.0.1 is a loopback address"),
        ("0.0.0.0:5060", "backend 0.0.0.0 is the unspecified address"),
        ("224.0.0.1:5060", "backend 224.0.0.1 is a multicast address"),
        (
            "255.255.255.255:5060",
            "backend 255.255.255.255 is the broadcast address",
        ),
        (
            "169.254.0.9:5060",
            "backend 169.254.0.9 is a link-local address",
        ),
        (
            "198.18.0.100:5061",
            "backend 198.18.0.100 is an address of this host",
        ),
    ] {
        let e = error_on_host(&["--vip", "198.18.0.100:5060", "--backend", backend]);
        assert!(
            e.starts_with(&format!("--backend {backend}: ")) && e.contains(why),
            "{backend}: {e}"
        );
    }
    // Host-independent rules hold without the host's addresses too.
    let e = Settings::resolve(&args(&[
        "--iface",
        "eth1",
        "--vip",
        "198.18.0.100:5060",
        "--backend",
        "127.0.0.1:5060",
    ]))
    .unwrap_err();
    assert!(e.to_string().contains("loopback"), "{e}");
}

#[test]
fn probe_and_encap_sources_are_addresses_of_this_host_and_not_vips() {
    let base = [
        "--vip",
        "198.18.0.100:5060",
        "--backend",
        "198.18.0.21:5060",
    ];
    let with = |extra: &[&str]| {
        let mut all = base.to_vec();
        all.extend_from_slice(extra);
        error_on_host(&all)
    };
    assert_eq!(
        with(&["--probe-source", "198.18.0.100"]),
        "probe-source 198.18.0.100 is the VIP of service 198.18.0.100:5060: health checks must come from another address"
    );
    assert_eq!(
        with(&["--probe-source", "198.18.0.7"]),
        "--probe-source 198.18.0.7 is not an address of this host"
    );
    assert_eq!(
        with(&["--encap-source", "224.0.0.1"]),
        "--encap-source 224.0.0.1 is a multicast address, not a unicast address"
    );
    assert_eq!(
        with(&["--encap-source", "198.18.0.100"]),
        "encap-source 198.18.0.100 is the VIP of service 198.18.0.100:5060: the backends hold the VIP too, and drop packets from their own address"
    );
    assert_eq!(
        with(&["--encap-source", "127.0.0.1", "--encap-source", "127.0.0.1"]),
        "--encap-source 127.0.0.1 is a loopback address, not a unicast address"
    );
    assert_eq!(
        with(&[
            "--encap-source",
            "2001:db8::100",
            "--encap-source",
            "2001:db8::100"
        ]),
        "encap-source 2001:db8::100: one address per family (IPv4 and IPv6) at most"
    );
    assert!(
        Settings::resolve_on_host(
            &args(&[
                "--iface",
                "eth1",
                "--hash-key",
                "000102030405060708090a0b0c0d0e0f",
                "--vip",
                "198.18.0.100:5060",
                "--backend",
                "198.18.0.21:5060",
                "--probe-source",
                "2001:db8::100",
            ]),
            &local()
        )
        .is_ok(),
        "another family's VIP is not this service's"
    );
}

#[test]
fn services_are_validated() {
    let e =
        Settings::resolve(&args(&["--iface", "x", "--backend", "198.18.0.21:5060"])).unwrap_err();
    assert!(e.to_string().contains("need --vip"), "{e}");
    let e = Settings::resolve(&args(&[
        "--iface",
        "x",
        "--vip",
        "198.18.0.100:5060",
        "--backend",
        "198.18.0.100:5060",
    ]))
    .unwrap_err();
    assert!(e.to_string().contains("forwarding loop"), "{e}");
    let e = Settings::resolve(&args(&[
        "--vip",
        "198.18.0.100:5060",
        "--backend",
        "198.18.0.21:5060",
    ]))
    .unwrap_err();
    assert!(e.to_string().contains("no interface"), "{e}");
}
