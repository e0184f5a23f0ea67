use super::*;
use crate::{hashkey, health::HealthUri};
use clap::Parser as _;

mod addresses;

fn args(extra: &[&str]) -> RunArgs {
    let mut argv = vec!["sip-dispatch", "run"];
    argv.extend_from_slice(extra);
    match crate::cli::Cli::try_parse_from(argv).unwrap().command {
        crate::cli::Command::Run(a) => *a,
        _ => unreachable!(),
    }
}

fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const FILE: &str = r#"
iface = "eth1"
health-interval = "2s"
down-after = 4
dns-server = "198.18.0.53:53"

[[service]]
vip = "198.18.0.100:5060"
backends = ["198.18.0.21:5060,weight=2", "198.18.0.22:5060"]

[[service]]
vip = "[2001:db8::100]:5060"
srv = ["_sip._udp.example.net"]
"#;

#[test]
fn the_file_gives_settings_and_flags_override_it() {
    let p = write("good.toml", FILE);
    let s = Settings::resolve(&args(&[
        "--config",
        p.to_str().unwrap(),
        "--down-after",
        "5",
    ]))
    .unwrap();
    assert_eq!(s.iface, "eth1");
    assert_eq!(s.health.interval, Duration::from_secs(2));
    assert_eq!(s.health.down_after, 5, "the flag wins");
    assert_eq!(s.health.up_after, 2, "the default stays");
    assert_eq!(s.dns.server, Some("198.18.0.53:53".parse().unwrap()));
    assert_eq!(s.services.len(), 2);
    assert_eq!(s.services[0].backends[0].weight, 2);
    assert_eq!(s.services[1].srv, ["_sip._udp.example.net"]);
    assert_eq!(s.control, PathBuf::from("/run/sip-dispatch/eth1.sock"));
    // A --vip replaces the file's service with the same VIP.
    let s = Settings::resolve(&args(&[
        "--config",
        p.to_str().unwrap(),
        "--vip",
        "198.18.0.100:5060",
        "--backend",
        "198.18.0.23:5060",
    ]))
    .unwrap();
    assert_eq!(s.services[0].backends.len(), 1);
    assert_eq!(
        s.services[0].backends[0].addr,
        "198.18.0.23:5060".parse().unwrap()
    );
}

#[test]
fn health_uri_from_the_file_or_the_flag_is_checked() {
    let p = write(
        "health-uri.toml",
        &FILE.replace("down-after = 4", "health-uri = \"sip:ping@{backend}\""),
    );
    let s = Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap();
    assert_eq!(s.health.uri.template(), "sip:ping@{backend}");
    let s = Settings::resolve(&args(&[
        "--config",
        p.to_str().unwrap(),
        "--health-uri",
        "sip:health@{backend};transport=udp",
    ]))
    .unwrap();
    assert_eq!(
        s.health.uri.template(),
        "sip:health@{backend};transport=udp"
    );
    let s = Settings::resolve(&args(&[
        "--config",
        write("plain.toml", FILE).to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(s.health.uri, HealthUri::default());

    let p = write(
        "bad-health-uri.toml",
        &FILE.replace("down-after = 4", "health-uri = \"ping@{backend}\""),
    );
    let e = format!(
        "{:#}",
        Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap_err()
    );
    assert!(
        e.contains(
            "bad-health-uri.toml:4: key `health-uri`: invalid health URI \"ping@{backend}\""
        ),
        "{e}"
    );
    let e = crate::cli::Cli::try_parse_from([
        "sip-dispatch",
        "run",
        "--health-uri",
        "sip:a b@{backend}",
    ])
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("invalid health URI \"sip:a b@{backend}\": character ' ' not allowed"),
        "{e}"
    );
}

#[test]
fn errors_name_file_line_and_key() {
    let p = write(
        "bad-vip.toml",
        &FILE.replace("198.18.0.100:5060", "198.18.0.100"),
    );
    let e = format!(
        "{:#}",
        Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap_err()
    );
    assert!(
        e.contains("bad-vip.toml:8: key `vip`: invalid address"),
        "{e}"
    );
    let p = write("bad-key.toml", &FILE.replace("down-after", "down-afterr"));
    let e = format!(
        "{:#}",
        Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap_err()
    );
    assert!(
        e.contains("bad-key.toml:4:") && e.contains("down-afterr"),
        "{e}"
    );
    let p = write(
        "bad-backend.toml",
        &FILE.replace("198.18.0.22:5060\"", "198.18.0.22:5060,weight=x\""),
    );
    let e = format!(
        "{:#}",
        Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap_err()
    );
    assert!(
        e.contains("bad-backend.toml:9: key `backends`: invalid weight"),
        "{e}"
    );
    let p = write(
        "bad-count.toml",
        &FILE.replace("down-after = 4", "down-after = 0"),
    );
    let e = format!(
        "{:#}",
        Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap_err()
    );
    assert!(
        e.contains("bad-count.toml:4: key `down-after`: must be at least 1"),
        "{e}"
    );
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The addresses of the host these tests pretend to run on.
fn local() -> Vec<IpAddr> {
    vec![ip("198.18.0.100"), ip("2001:db8::100"), ip("127.0.0.1")]
}

#[test]
fn file_values_are_checked_with_file_line_and_key() {
    let on_host = |name: &str, text: &str| {
        let p = write(name, text);
        format!(
            "{:#}",
            Settings::resolve_on_host(&args(&["--config", p.to_str().unwrap()]), &local())
                .unwrap_err()
        )
    };
    let keyed = FILE.replace(
        "iface = \"eth1\"",
        "iface = \"eth1\"\nhash-key = \"000102030405060708090a0b0c0d0e0f\"",
    );
    for (name, from, to, want) in [
        (
            "vip-any.toml",
            "198.18.0.100:5060",
            "0.0.0.0:5060",
            "vip-any.toml:9: key `vip`: VIP 0.0.0.0 is the unspecified address",
        ),
        (
            "vip-v6any.toml",
            "[2001:db8::100]:5060",
            "[::]:5060",
            "vip-v6any.toml:13: key `vip`: VIP :: is the unspecified address",
        ),
        (
            "vip-far.toml",
            "198.18.0.100:5060",
            "198.18.0.7:5060",
            "vip-far.toml:9: key `vip`: VIP 198.18.0.7 is not an address of this host",
        ),
        (
            "be-lo.toml",
            "198.18.0.22:5060\"",
            "127.0.0.1:5060\"",
            "be-lo.toml:10: key `backends`: backend 127.0.0.1 is a loopback address",
        ),
        (
            "interval.toml",
            "health-interval = \"2s\"",
            "health-interval = \"1e20s\"",
            "interval.toml:4: key `health-interval`: health-interval \"1e20s\" is out of range: 100ms to 3600s",
        ),
        (
            "interval-range.toml",
            "health-interval = \"2s\"",
            "health-interval = \"2h\"",
            "interval-range.toml:4: key `health-interval`: health-interval \"2h\" is not a duration: expected 100ms to 3600s",
        ),
        (
            "interval-long.toml",
            "health-interval = \"2s\"",
            "health-interval = \"7200s\"",
            "interval-long.toml:4: key `health-interval`: health-interval \"7200s\" is out of range: 100ms to 3600s",
        ),
        (
            "timeout.toml",
            "health-interval = \"2s\"",
            "health-timeout = \"1e30s\"",
            "timeout.toml:4: key `health-timeout`: health-timeout \"1e30s\" is out of range: 10ms to 3600s",
        ),
        (
            "timeout-nan.toml",
            "health-interval = \"2s\"",
            "health-timeout = \"NaNs\"",
            "timeout-nan.toml:4: key `health-timeout`: health-timeout \"NaNs\" is not a duration",
        ),
        (
            "idle.toml",
            "health-interval = \"2s\"",
            "call-idle = \"5s\"",
            "idle.toml:4: key `call-idle`: call-idle \"5s\" is out of range: 10s to 24h",
        ),
        (
            "idle-unit.toml",
            "health-interval = \"2s\"",
            "call-idle = \"10\"",
            "idle-unit.toml:4: key `call-idle`: call-idle \"10\" is not a duration: expected 10s to 24h",
        ),
        (
            "down.toml",
            "down-after = 4",
            "down-after = 101",
            "down.toml:5: key `down-after`: must be at least 1 and at most 100, not 101",
        ),
        (
            "up.toml",
            "down-after = 4",
            "up-after = 0",
            "up.toml:5: key `up-after`: must be at least 1 and at most 100, not 0",
        ),
        (
            "ttl.toml",
            "down-after = 4",
            "dns-min-ttl = 0",
            "ttl.toml:5: key `dns-min-ttl`: must be at least 1 and at most 86400, not 0",
        ),
        (
            "ttl-max.toml",
            "down-after = 4",
            "dns-max-ttl = 86401",
            "ttl-max.toml:5: key `dns-max-ttl`: must be at least 1 and at most 86400, not 86401",
        ),
    ] {
        assert!(keyed.contains(from), "{name}");
        let e = on_host(name, &keyed.replace(from, to));
        assert!(e.contains(want) && !e.contains('\n'), "{name}: {e}");
    }
    // A too large TTL (not even a u64) is a file error too, not a panic.
    let e = on_host(
        "ttl-huge.toml",
        &keyed.replace("down-after = 4", "dns-max-ttl = 18446744073709551616"),
    );
    assert!(e.contains("ttl-huge.toml:5"), "{e}");
}

#[test]
fn a_key_beats_a_key_file_and_a_missing_key_file_gets_a_new_key() {
    let dir = std::env::temp_dir().join(format!("sd-config-key-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let key_file = dir.join("hash-key");
    let base = [
        "--iface",
        "eth1",
        "--vip",
        "198.18.0.100:5060",
        "--backend",
        "198.18.0.21:5060",
        "--hash-key-file",
        key_file.to_str().unwrap(),
    ];
    let s = Settings::resolve(&args(&base)).unwrap();
    assert_eq!(s.hash_key_origin, KeyOrigin::NewKeyFile(key_file.clone()));
    assert!(!key_file.exists(), "resolving writes nothing");
    let key = hashkey::persist(&key_file, s.hash_key).unwrap();
    let s = Settings::resolve(&args(&base)).unwrap();
    assert_eq!(
        (s.hash_key, s.hash_key_origin),
        (key, KeyOrigin::KeyFile(key_file.clone()))
    );
    let mut flagged = base.to_vec();
    flagged.extend_from_slice(&["--hash-key", "7369702d64697370617463682d763121"]);
    let s = Settings::resolve(&args(&flagged)).unwrap();
    assert_eq!(
        (s.hash_key, s.hash_key_origin),
        (HashKey::DEFAULT, KeyOrigin::Flag)
    );
    // `hash-key-file` in the config file.
    let p = write(
        "key-file.toml",
        &FILE.replace(
            "iface = \"eth1\"",
            &format!(
                "iface = \"eth1\"\nhash-key-file = \"{}\"",
                key_file.display()
            ),
        ),
    );
    let s = Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap();
    assert_eq!(
        (s.hash_key, s.hash_key_origin),
        (key, KeyOrigin::KeyFile(key_file.clone()))
    );
    // A key file others may read is refused, naming it.
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let e = format!("{:#}", Settings::resolve(&args(&base)).unwrap_err());
    assert!(
        e.contains(key_file.to_str().unwrap()) && e.contains("0644"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The settings of one service on eth1 with one backend, plus `extra` flags.
fn with_one_service(extra: &[&str]) -> anyhow::Result<Settings> {
    let mut all = vec![
        "--iface",
        "eth1",
        "--vip",
        "198.18.0.100:5060",
        "--backend",
        "198.18.0.21:5060",
    ];
    all.extend_from_slice(extra);
    Settings::resolve(&args(&all))
}

#[test]
fn the_default_health_timeout_fits_a_short_interval() {
    let with = with_one_service;
    let s = with(&["--health-interval", "200ms"]).unwrap();
    assert_eq!(s.health.timeout, Duration::from_millis(200));
    let s = with(&["--health-interval", "5s"]).unwrap();
    assert_eq!(s.health.timeout, Duration::from_millis(500));
    let e = with(&["--health-interval", "200ms", "--health-timeout", "300ms"]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "health-timeout 300ms is longer than health-interval 200ms"
    );
}

#[test]
fn latency_aware_comes_from_the_flag_the_file_or_the_default() {
    let with = with_one_service;
    assert!(!with(&[]).unwrap().latency_aware, "off by default");
    assert!(
        with(&["--latency-aware"]).unwrap().latency_aware,
        "alone: on"
    );
    assert!(with(&["--latency-aware", "on"]).unwrap().latency_aware);
    let dir = std::env::temp_dir().join(format!("sd-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, "latency-aware = true\n").unwrap();
    let file = cfg.to_str().unwrap();
    assert!(with(&["--config", file]).unwrap().latency_aware);
    assert!(
        !with(&["--config", file, "--latency-aware", "off"])
            .unwrap()
            .latency_aware,
        "the flag wins"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn call_idle_comes_from_the_flag_the_file_or_the_default() {
    let with = with_one_service;
    assert_eq!(with(&[]).unwrap().call_idle, Duration::from_secs(600));
    let s = with(&["--call-idle", "90s"]).unwrap();
    assert_eq!(s.call_idle, Duration::from_secs(90));
    let dir = std::env::temp_dir().join(format!("sd-call-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, "call-idle = \"2h\"\n").unwrap();
    let file = cfg.to_str().unwrap();
    assert_eq!(
        with(&["--config", file]).unwrap().call_idle,
        Duration::from_secs(7200)
    );
    assert_eq!(
        with(&["--config", file, "--call-idle", "30s"])
            .unwrap()
            .call_idle,
        Duration::from_secs(30),
        "the flag wins"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn forwarding_comes_from_the_service_the_flag_the_file_or_the_default() {
    let cfg = write(
        "forwarding.toml",
        r#"
forwarding = "ipip"
probe-source = ["198.18.0.1", "2001:db8::1"]

[[service]]
vip = "198.18.0.100:5060"
backends = ["198.18.0.21:5060"]

[[service]]
vip = "198.18.0.101:5060"
backends = ["198.18.0.21:5060"]
forwarding = "l2dsr"
"#,
    );
    let file = cfg.to_str().unwrap();
    let modes =
        |s: Settings| -> Vec<ForwardingMode> { s.services.iter().map(|s| s.forwarding).collect() };
    use ForwardingMode::*;
    let s = with_one_service(&["--config", file]).unwrap();
    assert_eq!(s.probe_source.get(false), Some(ip("198.18.0.1")));
    assert_eq!(s.probe_source.get(true), Some(ip("2001:db8::1")));
    assert_eq!(s.encap_source, SourceAddrs::default());
    // --vip 198.18.0.100:5060 replaces the file's service of that VIP.
    assert_eq!(modes(s), [Ipip, L2dsr], "the file's default, the own key");
    assert_eq!(
        modes(with_one_service(&["--config", file, "--forwarding", "rewrite"]).unwrap()),
        [Rewrite, L2dsr],
        "the flag beats the file's default, not a service's own key"
    );
    assert_eq!(modes(with_one_service(&[]).unwrap()), [Rewrite]);
    let s = with_one_service(&[
        "--config",
        file,
        "--probe-source",
        "198.18.0.2",
        "--encap-source",
        "198.18.0.3",
    ])
    .unwrap();
    assert_eq!(
        s.probe_source.iter().collect::<Vec<_>>(),
        [ip("198.18.0.2")]
    );
    assert_eq!(s.encap_source.get(false), Some(ip("198.18.0.3")));

    let bad = write(
        "bad-forwarding.toml",
        "[[service]]\nvip = \"198.18.0.100:5060\"\nbackends = [\"198.18.0.21:5060\"]\nforwarding = \"dsr\"\n",
    );
    let e = format!(
        "{:#}",
        Settings::resolve(&args(&["--iface", "x", "--config", bad.to_str().unwrap()])).unwrap_err()
    );
    assert!(
        e.contains(":4: key `forwarding`") && e.contains("invalid forwarding \"dsr\""),
        "{e}"
    );
}
