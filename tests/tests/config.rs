//! Configuration values from outside (README "Behaviour on bad or unusual input", "The
//! hash key"): the real binary, run in the dispatcher's namespace of a test topology (so
//! the VIP rules see a known set of addresses), with bad values on the command line and
//! in the config file. Each run must exit non-zero with one line on stderr naming the bad
//! value, and attach and pin nothing. Then the hash key file: created (0600) at first
//! start, reused after; a key on the command line and the built-in key are warned about;
//! a changed key file is refused by `reload`; bad control requests are refused while the
//! daemon keeps serving.
//!
//! Needs root and the sip-dispatch binary (`$SIP_DISPATCH_BIN`, else
//! `target/debug/sip-dispatch`): without them the tests fail, they never skip.
//! Run with `--test-threads=1`.
use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use sip_dispatch_common::{HashKey, hash::siphash13, slot_of};
use sip_dispatch_testbed::{
    Family,
    bed::BpfFs,
    dispatcher, link, netns, preflight, scenario,
    topology::{Topology, TopologySpec},
};

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-config")
}

/// How long a run with a bad value may take to refuse it.
const REFUSE_WITHIN: Duration = Duration::from_secs(10);

/// A dispatcher namespace with its VIP, one backend host (nothing runs there: the
/// daemon starts with a static backend it then finds down) and a run directory.
struct Bed {
    binary: PathBuf,
    dir: PathBuf,
    topo: Topology,
}

impl Bed {
    fn build(name: &str) -> Bed {
        preflight::require_root().expect("preflight");
        let binary = dispatcher::binary_path().expect("sip-dispatch binary");
        let dir = scenario::run_dir(&workdir(), name).expect("run dir");
        netns::cleanup_leftovers().expect("cleaning up leftovers");
        let topo = Topology::build(TopologySpec::dispatcher(1)).expect("topology");
        Bed { binary, dir, topo }
    }

    fn ns(&self) -> String {
        self.topo.dispatcher().unwrap().ns_name().to_owned()
    }

    fn iface(&self) -> String {
        self.topo.dispatcher().unwrap().iface.clone()
    }

    fn vip(&self, family: Family) -> SocketAddr {
        SocketAddr::new(self.topo.vip(family), 5060)
    }

    fn backend(&self, family: Family) -> SocketAddr {
        let host = self.topo.backends().next().expect("a backend host");
        SocketAddr::new(host.ip(family), 5060)
    }

    /// The dispatcher host's own (non-VIP) address.
    fn own_address(&self) -> IpAddr {
        self.topo.dispatcher().unwrap().ip(Family::V4)
    }

    fn pins(&self) -> PathBuf {
        self.dir.join("pins")
    }

    fn control(&self) -> PathBuf {
        dispatcher::control_socket(self.topo.tag()).expect("control socket path")
    }

    /// Flags every run gets: where pins, the control socket and the key would go.
    fn common_args(&self, key_file: &Path) -> Vec<String> {
        [
            "--iface".to_owned(),
            self.iface(),
            "--xdp-mode".into(),
            "skb".into(),
            "--pin-path".into(),
            self.pins().display().to_string(),
            "--control".into(),
            self.control().display().to_string(),
            "--hash-key-file".into(),
            key_file.display().to_string(),
        ]
        .into()
    }

    /// Runs `sip-dispatch run ARGS` and expects a refusal: a failure exit status, one
    /// line on stderr that contains each of `expect`, nothing attached or pinned.
    fn refused(&self, label: &str, args: &[String], expect: &[&str]) -> Result<(), String> {
        let mut all = vec!["run".to_owned()];
        all.extend_from_slice(args);
        let ended = dispatcher::run_to_exit(
            &self.binary,
            &self.ns(),
            &all,
            &self.dir,
            label,
            REFUSE_WITHIN,
        )
        .map_err(|e| format!("{label}: {e:#}"))?;
        let stderr = ended.stderr;
        let mut problems = Vec::new();
        if ended.status.success() {
            problems.push("exited 0".to_owned());
        }
        let lines: Vec<&str> = stderr.lines().collect();
        if lines.len() != 1 {
            problems.push(format!("{} lines on stderr", lines.len()));
        }
        for want in expect {
            if !stderr.contains(want) {
                problems.push(format!("no {want:?} on stderr"));
            }
        }
        match link::xdp_prog_id(&self.ns(), &self.iface()) {
            Ok(None) => {}
            Ok(Some(id)) => problems.push(format!("XDP program {id} attached")),
            Err(e) => problems.push(format!("reading the link: {e:#}")),
        }
        if self.pins().exists() {
            problems.push(format!("{} was created", self.pins().display()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{label}: {}; stderr {stderr:?}",
                problems.join(", ")
            ))
        }
    }

    /// Starts a daemon that must come up.
    fn start(&self, label: &str, args: &[String]) -> dispatcher::Dispatcher {
        let mut all = vec!["run".to_owned()];
        all.extend_from_slice(args);
        dispatcher::Dispatcher::start(&self.binary, &self.ns(), &all, &self.dir, label)
            .unwrap_or_else(|e| panic!("starting {label}: {e:#}"))
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        dispatcher::cli(&self.binary, &self.control(), args).expect("running the CLI")
    }

    /// `which CALL_ID --json` (of the IPv4 service): the slot the daemon computes.
    fn slot_of(&self, call_id: &str) -> u64 {
        let vip = self.vip(Family::V4).to_string();
        let out = self.cli(&["which", call_id, "--service", &vip, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "which {call_id}: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        v["slot"]
            .as_u64()
            .unwrap_or_else(|| panic!("no slot in {v}"))
    }
}

const CALL_IDS: [&str; 4] = [
    "a84b4c76e66710@pc33.atlanta.example.com",
    "1-4242@198.18.0.10",
    "f81d4fae-7dec-11d0-a765-00a0c91e6bf6@example.net",
    "x",
];

/// The slots `key` gives [`CALL_IDS`], as `which` computes them.
fn slots(key: HashKey) -> Vec<u64> {
    CALL_IDS
        .iter()
        .map(|c| u64::from(slot_of(siphash13(key, c.as_bytes()))))
        .collect()
}

fn write_key_file(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("writing a key file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Bad values on the command line and in the config file: each is refused with one line
/// naming it, and nothing is attached or pinned. A good configuration of the same bed
/// then starts (so the refusals are the values' doing).
#[test]
fn bad_values_are_refused_with_one_line_and_nothing_attached() {
    let bed = Bed::build("bad-values");
    let key_file = bed.dir.join("hash-key");
    write_key_file(&key_file, "000102030405060708090a0b0c0d0e0f\n", 0o600);
    let (vip, vip6) = (bed.vip(Family::V4), bed.vip(Family::V6));
    let (be, be6) = (bed.backend(Family::V4), bed.backend(Family::V6));
    let own = bed.own_address();
    let service = |vip: &str, backend: &str| -> Vec<String> {
        ["--vip", vip, "--backend", backend]
            .map(str::to_owned)
            .into()
    };
    let v4 = service(&vip.to_string(), &be.to_string());
    let with = |base: &[String], extra: &[&str]| -> Vec<String> {
        let mut a = bed.common_args(&key_file);
        a.extend_from_slice(base);
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    };
    let own_msg = format!("backend {own} is an address of this host (a forwarding loop)");
    let mut failures = Vec::new();
    let flag_cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "interval-1e20",
            with(&v4, &["--health-interval", "1e20s"]),
            vec!["health-interval \"1e20s\" is out of range: 100ms to 3600s"],
        ),
        (
            "timeout-1e30",
            with(&v4, &["--health-timeout", "1e30s"]),
            vec!["health-timeout \"1e30s\" is out of range: 10ms to 3600s"],
        ),
        (
            "interval-nan",
            with(&v4, &["--health-interval", "NaNs"]),
            vec!["health-interval \"NaNs\" is not a duration: expected 100ms to 3600s"],
        ),
        (
            "interval-short",
            with(&v4, &["--health-interval", "50ms"]),
            vec!["50ms", "100ms to 3600s"],
        ),
        (
            "timeout-above-interval",
            with(&v4, &["--health-interval", "1s", "--health-timeout", "2s"]),
            vec!["health-timeout 2s is longer than health-interval 1s"],
        ),
        (
            "down-after-0",
            with(&v4, &["--down-after", "0"]),
            vec!["'0'", "--down-after"],
        ),
        (
            "affinity-entries-small",
            with(&v4, &["--affinity-entries", "100"]),
            vec!["affinity-entries 100 is out of range: must be at least 1024 and at most 8388608"],
        ),
        (
            "affinity-entries-huge",
            with(&v4, &["--affinity-entries", "99999999999999999999"]),
            vec![
                "affinity-entries 99999999999999999999 is out of range: must be at least 1024 and at most 8388608",
            ],
        ),
        (
            "affinity-entries-text",
            with(&v4, &["--affinity-entries", "lots"]),
            vec!["affinity-entries \"lots\" is not a number"],
        ),
        (
            "affinity-maybe",
            with(&v4, &["--affinity", "maybe"]),
            vec!["'maybe'", "--affinity"],
        ),
        (
            "up-after-101",
            with(&v4, &["--up-after", "101"]),
            vec!["'101'", "--up-after"],
        ),
        (
            "dns-min-ttl-0",
            with(&v4, &["--dns-min-ttl", "0"]),
            vec!["'0'", "--dns-min-ttl"],
        ),
        (
            "dns-max-ttl-day",
            with(&v4, &["--dns-max-ttl", "86401"]),
            vec!["'86401'", "--dns-max-ttl"],
        ),
        (
            "vip-any",
            with(&service("0.0.0.0:5060", &be.to_string()), &[]),
            vec!["VIP 0.0.0.0 is the unspecified address"],
        ),
        (
            "vip-v6-any",
            with(&service("[::]:5060", &be6.to_string()), &[]),
            vec!["VIP :: is the unspecified address"],
        ),
        (
            "vip-broadcast",
            with(&service("255.255.255.255:5060", &be.to_string()), &[]),
            vec!["VIP 255.255.255.255 is the broadcast address"],
        ),
        (
            "vip-subnet-broadcast",
            with(&service("198.18.0.255:5060", &be.to_string()), &[]),
            vec!["VIP 198.18.0.255 is not an address of this host"],
        ),
        (
            "vip-multicast",
            with(&service("239.1.2.3:5060", &be.to_string()), &[]),
            vec!["VIP 239.1.2.3 is a multicast address"],
        ),
        (
            "vip-v6-multicast",
            with(&service("[ff02::1]:5060", &be6.to_string()), &[]),
            vec!["VIP ff02::1 is a multicast address"],
        ),
        (
            "vip-elsewhere",
            with(&service("198.18.0.99:5060", &be.to_string()), &[]),
            vec!["VIP 198.18.0.99 is not an address of this host"],
        ),
        (
            "backend-loopback",
            with(&service(&vip.to_string(), "127.0.0.1:5060"), &[]),
            vec!["--backend 127.0.0.1:5060: backend 127.0.0.1 is a loopback address"],
        ),
        (
            "backend-this-host",
            with(&service(&vip.to_string(), &format!("{own}:5062")), &[]),
            vec![own_msg.as_str()],
        ),
    ];
    for (label, args, expect) in &flag_cases {
        if let Err(e) = bed.refused(label, args, expect) {
            failures.push(e);
        }
    }

    // The same values in a config file: `file:line: key`.
    let config = bed.dir.join("sip-dispatch.toml");
    let file_text = format!(
        "health-interval = \"1s\"\nhealth-timeout = \"200ms\"\ndown-after = 3\n\
         dns-min-ttl = 5\n\n[[service]]\nvip = \"{vip}\"\nbackends = [\"{be}\"]\n\n\
         [[service]]\nvip = \"{vip6}\"\nbackends = [\"{be6}\"]\n"
    );
    let path = config.display().to_string();
    let file_cases: Vec<(&str, String, String, String)> = vec![
        (
            "file-interval-1e20",
            "health-interval = \"1s\"".into(),
            "health-interval = \"1e20s\"".into(),
            format!(
                "{path}:1: key `health-interval`: health-interval \"1e20s\" is out of range: 100ms to 3600s"
            ),
        ),
        (
            "file-timeout-1e30",
            "health-timeout = \"200ms\"".into(),
            "health-timeout = \"1e30s\"".into(),
            format!(
                "{path}:2: key `health-timeout`: health-timeout \"1e30s\" is out of range: 10ms to 3600s"
            ),
        ),
        (
            "file-down-after",
            "down-after = 3".into(),
            "down-after = 1000".into(),
            format!("{path}:3: key `down-after`: must be at least 1 and at most 100, not 1000"),
        ),
        (
            "file-ttl",
            "dns-min-ttl = 5".into(),
            "dns-min-ttl = 0".into(),
            format!("{path}:4: key `dns-min-ttl`: must be at least 1 and at most 86400, not 0"),
        ),
        (
            "file-affinity-entries",
            "dns-min-ttl = 5".into(),
            "dns-min-ttl = 5\naffinity-entries = 10".into(),
            format!(
                "{path}:5: key `affinity-entries`: affinity-entries 10 is out of range: must be at least 1024 and at most 8388608"
            ),
        ),
        (
            "file-affinity",
            "dns-min-ttl = 5".into(),
            "dns-min-ttl = 5\naffinity = \"maybe\"".into(),
            format!("{path}:5: key `affinity`: invalid affinity \"maybe\" (on or off)"),
        ),
        (
            "file-vip-any",
            format!("vip = \"{vip}\""),
            "vip = \"0.0.0.0:5060\"".into(),
            format!("{path}:7: key `vip`: VIP 0.0.0.0 is the unspecified address"),
        ),
        (
            "file-vip-v6-any",
            format!("vip = \"{vip6}\""),
            "vip = \"[::]:5060\"".into(),
            format!("{path}:11: key `vip`: VIP :: is the unspecified address"),
        ),
        (
            "file-vip-broadcast",
            format!("vip = \"{vip}\""),
            "vip = \"255.255.255.255:5060\"".into(),
            format!("{path}:7: key `vip`: VIP 255.255.255.255 is the broadcast address"),
        ),
        (
            "file-vip-multicast",
            format!("vip = \"{vip}\""),
            "vip = \"224.0.0.5:5060\"".into(),
            format!("{path}:7: key `vip`: VIP 224.0.0.5 is a multicast address"),
        ),
        (
            "file-vip-elsewhere",
            format!("vip = \"{vip}\""),
            "vip = \"198.18.0.99:5060\"".into(),
            format!("{path}:7: key `vip`: VIP 198.18.0.99 is not an address of this host"),
        ),
        (
            "file-backend-loopback",
            format!("backends = [\"{be}\"]"),
            "backends = [\"127.0.0.1:5060\"]".into(),
            format!("{path}:8: key `backends`: backend 127.0.0.1 is a loopback address"),
        ),
        (
            "file-backend-v6-loopback",
            format!("backends = [\"{be6}\"]"),
            "backends = [\"[::1]:5060\"]".into(),
            format!("{path}:12: key `backends`: backend ::1 is a loopback address"),
        ),
    ];
    let file_args = {
        let mut a = bed.common_args(&key_file);
        a.extend(["--config".to_owned(), path.clone()]);
        a
    };
    for (label, from, to, want) in &file_cases {
        assert!(file_text.contains(from.as_str()), "{label}: {from:?}");
        std::fs::write(&config, file_text.replacen(from.as_str(), to, 1)).unwrap();
        if let Err(e) = bed.refused(label, &file_args, &[want]) {
            failures.push(e);
        }
    }

    // Key files that are not secret or not a key.
    for (label, text, mode, want) in [
        (
            "key-file-mode",
            "000102030405060708090a0b0c0d0e0f\n",
            0o644,
            "has mode 0644: group and others must have no access",
        ),
        (
            "key-file-malformed",
            "not a key\n",
            0o600,
            "is malformed: expected 32 hex digits",
        ),
    ] {
        write_key_file(&key_file, text, mode);
        let want = format!("hash key file {} {want}", key_file.display());
        if let Err(e) = bed.refused(label, &with(&v4, &[]), &[&want]) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad values were not refused as they should be:\n{}",
        failures.len(),
        flag_cases.len() + file_cases.len() + 2,
        failures.join("\n")
    );

    // The good file, with the good key file, starts: both families' VIPs are this host's.
    write_key_file(&key_file, "000102030405060708090a0b0c0d0e0f\n", 0o600);
    std::fs::write(&config, &file_text).unwrap();
    let mut good = file_args.clone();
    let at = good.iter().position(|a| a == "--pin-path").unwrap();
    // The pins go to the bpf filesystem the daemon mounts in its private /sys.
    good.drain(at..at + 2);
    let daemon = bed.start("good", &good);
    // An answer on the control socket: the daemon serves (and handles SIGTERM).
    let out = bed.cli(&["stats", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.stop().expect("a clean stop");

    // A key in a config file others may read is warned about (and used).
    std::fs::write(
        &config,
        format!("hash-key = \"000102030405060708090a0b0c0d0e0f\"\n{file_text}"),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let daemon = bed.start("key-in-file", &good);
    let slots_now = CALL_IDS.map(|c| bed.slot_of(c)).to_vec();
    let log = daemon.log().tail(200);
    daemon.stop().expect("a clean stop");
    assert_eq!(
        slots_now,
        slots(HashKey::from_hex("000102030405060708090a0b0c0d0e0f").unwrap())
    );
    let want = format!(
        "the hash key is in {}, which group or others may read",
        config.display()
    );
    assert!(log.contains(&want), "no {want:?} in {log}");
}

/// The key file: created (0600, directory 0700) with a random key at first start and used
/// (as `which` shows), reused by the next start, warned about when given on the command
/// line or when it is the built-in key; a changed key file is refused by `reload`. Bad
/// control requests get an error and change nothing.
#[test]
fn the_hash_key_file_is_created_once_and_reused() {
    let bed = Bed::build("key-file");
    let key_dir = bed.dir.join("keys");
    let key_file = key_dir.join("hash-key");
    assert!(!key_dir.exists());
    let mut args = bed.common_args(&key_file);
    // The pins go to the bpf filesystem the daemon mounts in its private /sys.
    let at = args.iter().position(|a| a == "--pin-path").unwrap();
    args.drain(at..at + 2);
    let (vip, be) = (bed.vip(Family::V4), bed.backend(Family::V4));
    args.extend(["--vip", &vip.to_string(), "--backend", &be.to_string()].map(str::to_owned));

    // First start: creates the key file.
    let daemon = bed.start("first", &args);
    let text = std::fs::read_to_string(&key_file).expect("the key file was created");
    let key = HashKey::from_hex(text.trim_end()).expect("32 hex digits");
    assert_eq!(text.len(), 33, "32 hex digits and a newline: {text:?}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_file), 0o600);
    assert_eq!(mode(&key_dir), 0o700);
    assert_ne!(key, HashKey::DEFAULT);
    let first = CALL_IDS.map(|c| bed.slot_of(c)).to_vec();
    assert_eq!(first, slots(key), "`which` uses the key of the file");
    assert_ne!(first, slots(HashKey::DEFAULT), "not the built-in key");
    let log = daemon.log().tail(200);
    assert!(log.contains("created (mode 0600)"), "{log}");
    for not in ["--hash-key:", "built-in public key"] {
        assert!(
            !log.contains(not),
            "no warning for a secret key file: {log}"
        );
    }

    // Control requests out of bounds: refused, the daemon serves on, nothing changed.
    let out = bed.cli(&["backends", "add", "127.0.0.1:5060"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success()
            && err.trim_end().lines().count() == 1
            && err.contains("backend 127.0.0.1 is a loopback address"),
        "backends add 127.0.0.1:5060: {err:?}"
    );
    let own = bed.own_address();
    for (request, want) in [
        (
            format!(
                r#"{{"op":"backend-add","address":"{own}:5060","weight":1,"priority":0,"service":null}}"#
            ),
            format!("backend {own} is an address of this host"),
        ),
        (
            r#"{"op":"backend-add","address":"198.18.0.77:0","weight":1,"priority":0,"service":null}"#.into(),
            "port 0".into(),
        ),
        (
            r#"{"op":"backend-add","address":"198.18.0.77:5060","weight":70000,"priority":0,"service":null}"#.into(),
            "weight 70000 is above 65535".into(),
        ),
        (
            format!(
                r#"{{"op":"which","call_id":"{}","service":null}}"#,
                "c".repeat(9000)
            ),
            "Call-ID of 9000 bytes: at most 8192".into(),
        ),
        (
            r#"{"op":"backend-add","address":"198.18.0.77:5060","weight":1,"priority":70000,"service":null}"#.into(),
            "bad request".into(),
        ),
    ] {
        let json: Value = serde_json::from_str(&request).expect("a JSON request");
        let r = dispatcher::control_request(&bed.control(), &json)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let error = r["error"].as_str().unwrap_or_default();
        assert!(
            r["ok"] == false && error.contains(&want) && !error.contains('\n'),
            "{}...: {r} (expected an error with {want:?})",
            &request[..request.len().min(80)]
        );
    }
    let list: Value = serde_json::from_slice(&bed.cli(&["backends", "list", "--json"]).stdout)
        .expect("backends list --json");
    let listed: Vec<&str> = list["services"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter_map(|b| b["address"].as_str())
        .collect();
    assert_eq!(
        listed,
        [be.to_string()],
        "the refused requests changed nothing"
    );

    // A changed key file: reload refuses it.
    write_key_file(&key_file, "000102030405060708090a0b0c0d0e0f\n", 0o600);
    let out = bed.cli(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success()
            && err.trim_end().lines().count() == 1
            && err.contains("`hash-key` changed: that needs a restart (nothing was reloaded)"),
        "reload with a changed key file: {err:?}"
    );
    assert_eq!(
        CALL_IDS.map(|c| bed.slot_of(c)).to_vec(),
        first,
        "the key stays"
    );
    write_key_file(&key_file, &text, 0o600);
    daemon.stop().expect("a clean stop");

    // Second start: the same key, the file untouched.
    let daemon = bed.start("second", &args);
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), text);
    assert_eq!(CALL_IDS.map(|c| bed.slot_of(c)).to_vec(), first);
    let log = daemon.log().tail(200);
    assert!(
        !log.contains("created (mode 0600)"),
        "the key file is reused: {log}"
    );
    daemon.stop().expect("a clean stop");

    // --hash-key (the built-in key) wins over the file, with both warnings.
    let mut flagged = args.clone();
    flagged.extend([
        "--hash-key".to_owned(),
        dispatcher::key_hex(HashKey::DEFAULT),
    ]);
    let daemon = bed.start("flag", &flagged);
    assert_eq!(
        CALL_IDS.map(|c| bed.slot_of(c)).to_vec(),
        slots(HashKey::DEFAULT)
    );
    let log = daemon.log().tail(200);
    for want in [
        "the hash key is given with --hash-key: every local user can read it in /proc/PID/cmdline",
        "the hash key is the built-in public key 7369702d64697370617463682d763121",
        &format!("--hash-key-file {} is not used", key_file.display()),
    ] {
        assert!(log.contains(want), "no {want:?} in the log: {log}");
    }
    daemon.stop().expect("a clean stop");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), text);
}

/// An upgrade from a daemon without a key file (here: one given `--hash-key`) that left
/// its maps pinned: the first start with a key file writes the pinned key into it, so
/// calls keep their backends across the upgrade.
#[test]
fn a_new_key_file_takes_the_key_of_the_pinned_maps() {
    let bed = Bed::build("key-adopt");
    let bpffs = BpfFs::mount(bed.topo.tag());
    let pins = bpffs.path().join(bed.iface());
    let (vip, be) = (bed.vip(Family::V4), bed.backend(Family::V4));
    let key_file = bed.dir.join("keys").join("hash-key");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = bed.common_args(&key_file);
        let at = a.iter().position(|x| x == "--pin-path").unwrap();
        a[at + 1] = pins.display().to_string();
        a.extend(["--vip", &vip.to_string(), "--backend", &be.to_string()].map(str::to_owned));
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    };
    let old = HashKey::from_hex("00112233445566778899aabbccddeeff").unwrap();
    let daemon = bed.start(
        "old",
        &args(&["--hash-key", &dispatcher::key_hex(old), "--keep-attached"]),
    );
    assert_eq!(CALL_IDS.map(|c| bed.slot_of(c)).to_vec(), slots(old));
    daemon.stop().expect("a clean stop");
    assert!(
        link::xdp_prog_id(&bed.ns(), &bed.iface())
            .unwrap()
            .is_some(),
        "--keep-attached left XDP attached"
    );
    assert!(!key_file.exists());

    let daemon = bed.start("new", &args(&[]));
    let text = std::fs::read_to_string(&key_file).expect("the key file was created");
    assert_eq!(text, format!("{}\n", dispatcher::key_hex(old)));
    assert_eq!(CALL_IDS.map(|c| bed.slot_of(c)).to_vec(), slots(old));
    let log = daemon.log().tail(200);
    assert!(
        log.contains(&format!(
            "created (mode 0600) with the key of the maps pinned in {}",
            pins.display()
        )),
        "{log}"
    );
    daemon.stop().expect("a clean stop (detaches)");
    assert_eq!(link::xdp_prog_id(&bed.ns(), &bed.iface()).unwrap(), None);
}

/// A FIFO at the key path (nothing writes to it: opening it for reading would block the
/// start forever) is refused at once with one line naming it; nothing is attached or
/// pinned, and the FIFO is left as it was.
#[test]
fn a_fifo_at_the_key_path_is_refused_at_once() {
    use std::os::unix::fs::FileTypeExt as _;
    let bed = Bed::build("key-fifo");
    let fifo = bed.dir.join("hash-key-fifo");
    let out = std::process::Command::new("mkfifo")
        .args(["-m", "600"])
        .arg(&fifo)
        .output()
        .expect("running mkfifo");
    assert!(
        out.status.success(),
        "mkfifo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut args = bed.common_args(&fifo);
    args.extend(
        [
            "--vip",
            &bed.vip(Family::V4).to_string(),
            "--backend",
            &bed.backend(Family::V4).to_string(),
        ]
        .map(str::to_owned),
    );
    let want = format!("hash key file {} is not a regular file", fifo.display());
    let started = std::time::Instant::now();
    let refused = bed.refused("key-fifo", &args, &[&want]);
    let took = started.elapsed();
    eprintln!("[key-fifo] refused in {took:?} (at most {REFUSE_WITHIN:?})");
    if let Err(e) = refused {
        panic!("{e}");
    }
    let kind = std::fs::symlink_metadata(&fifo).expect("the FIFO is still there");
    assert!(kind.file_type().is_fifo(), "{} changed", fifo.display());
}
