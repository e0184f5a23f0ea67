//! Operating a running daemon (README "Operating a running daemon", "Restarts and
//! upgrades without a dropped call", "The slow path", "Inspecting with bpftool"): the CLI
//! against a live daemon while SIPp calls flow, bpftool on the pinned maps, a restart with
//! `--keep-attached` under load, and large (fragmented) INVITEs through the slow path.
//!
//! Each test builds its own namespaces (client, dispatcher, SIPp UAS backends). The
//! daemon runs in native XDP mode (with an XDP_PASS program on the dispatcher's veth
//! peer). Pins go to a bpf filesystem the test mounts on a directory of its own in the
//! root namespace (visible to every `ip netns exec`) and unmounts on drop.
//!
//! Needs root, SIPp, bpftool and the sip-dispatch binary (`$SIP_DISPATCH_BIN`, else
//! `target/debug/sip-dispatch`): without them the tests fail, they never skip.
//! Run with `--test-threads=1`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use sip_dispatch_testbed::{
    bed::{
        Bed, BpfFs, listed, share_sum, state, text, uac_problems, verdict, wait_list, wait_takeover,
    },
    dispatcher::{self, Dispatcher, ExitStats},
    link, netns, scenario,
    sipp::{Scenario, Uas, backends_by_call, exactly_one_backend},
};

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-operations")
}

/// The CLI against a live daemon: list, add, drain, enable, set-weight, remove, which,
/// stats, and its one-line errors; then a burst of 50 changes while SIPp calls flow.
#[test]
fn cli_round_trips_against_a_live_daemon() {
    const NAME: &str = "cli";
    let mut bed = Bed::build(&workdir(), NAME, 4, Duration::from_secs(60));
    let (b1, b2, b3, b4) = (
        bed.backend(1),
        bed.backend(2),
        bed.backend(3),
        bed.backend(4),
    );
    let daemon = bed.start_daemon(&bed.run_config(3));

    // list: three backends, up (after their first probe), shares summing to 1.
    let list = wait_list(&bed, Duration::from_secs(10), "three backends up", |l| {
        l.len() == 3 && [b1, b2, b3].iter().all(|&a| state(l, a) == Some("up"))
    });
    let sum = share_sum(&list);
    assert!((sum - 1.0).abs() < 0.001, "shares sum to {sum}: {list:#?}");

    // add a fourth with weight 2: listed, up after its first probe, share ~ 2/5.
    let added = bed.cli_json(&[
        "backends",
        "add",
        &b4.to_string(),
        "--weight",
        "2",
        "--json",
    ]);
    assert_eq!(added["added"], b4.to_string(), "{added}");
    let list = wait_list(
        &bed,
        Duration::from_secs(10),
        "the fourth backend up",
        |l| l.len() == 4 && state(l, b4) == Some("up"),
    );
    assert_eq!(list[&b4]["weight"], 2, "{:#?}", list[&b4]);
    let s4 = list[&b4]["share"].as_f64().unwrap();
    assert!(
        (s4 - 0.4).abs() < 0.01,
        "share of the weight-2 backend {s4}"
    );
    assert!((share_sum(&list) - 1.0).abs() < 0.001);

    // drain: state drained, share 0; enable: back up with its share.
    let drained = bed.cli_json(&["backends", "drain", &b1.to_string(), "--json"]);
    assert_eq!(drained["state"], "drained", "{drained}");
    let list = listed(&bed.cli_json(&["backends", "list", "--json"]));
    assert_eq!(state(&list, b1), Some("drained"));
    assert_eq!(list[&b1]["share"].as_f64(), Some(0.0), "{:#?}", list[&b1]);
    assert!((share_sum(&list) - 1.0).abs() < 0.001);
    let out = bed.cli(&["backends", "enable", &b1.to_string(), "--json"]);
    assert!(out.status.success(), "enable: {}", text(&out.stderr));
    let list = wait_list(&bed, Duration::from_secs(10), "b1 up again", |l| {
        state(l, b1) == Some("up") && l[&b1]["share"].as_f64().unwrap_or(0.0) > 0.15
    });
    assert!((share_sum(&list) - 1.0).abs() < 0.001);

    // set-weight: the weight changes and the shares follow (weights 1,5,1,2 of 9).
    let set = bed.cli_json(&["backends", "set-weight", &b2.to_string(), "5", "--json"]);
    assert_eq!(set["weight"], 5, "{set}");
    let list = listed(&bed.cli_json(&["backends", "list", "--json"]));
    assert_eq!(list[&b2]["weight"], 5);
    for (a, w) in [(b1, 1.0), (b2, 5.0), (b3, 1.0), (b4, 2.0)] {
        let s = list[&a]["share"].as_f64().unwrap();
        assert!(
            (s - w / 9.0).abs() < 0.01,
            "share of {a} (weight {w} of 9) is {s}"
        );
    }

    // remove: gone.
    let out = bed.cli(&["backends", "remove", &b4.to_string(), "--json"]);
    assert!(out.status.success(), "remove: {}", text(&out.stderr));
    let list = listed(&bed.cli_json(&["backends", "list", "--json"]));
    assert!(!list.contains_key(&b4), "{b4} still listed: {list:#?}");
    assert!((share_sum(&list) - 1.0).abs() < 0.001);
    bed.cli_json(&["backends", "set-weight", &b2.to_string(), "1", "--json"]);

    // which: one of the backends, the same answer twice.
    let w1 = bed.cli_json(&["which", "a84b4c76e66710@pc33.atlanta.com", "--json"]);
    let w2 = bed.cli_json(&["which", "a84b4c76e66710@pc33.atlanta.com", "--json"]);
    let chosen: SocketAddr = w1["backend"].as_str().expect("backend").parse().unwrap();
    assert!([b1, b2, b3].contains(&chosen), "which chose {chosen}");
    assert_eq!(w1, w2, "which answered differently twice");

    // stats: the fast-path counters.
    let stats = bed.cli_json(&["stats", "--json"]);
    for c in ["seen", "xdp_tx"] {
        assert!(stats["counters"][c].is_u64(), "no counter {c} in {stats}");
    }
    assert!(stats["slow_path"].is_object(), "no slow_path in {stats}");

    // Errors: one line each.
    let nowhere = "198.18.0.29:5060";
    let out = bed.cli(&["backends", "drain", nowhere]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "drain of an unknown backend succeeded"
    );
    assert_eq!(
        err.trim_end(),
        format!("sip-dispatch: error: unknown backend {nowhere}"),
        "stderr: {err:?}"
    );
    assert_eq!(err.trim_end().lines().count(), 1);
    let dead = bed.control.with_extension("nobody.sock");
    let out = dispatcher::cli(&bed.binary, &dead, &["backends", "list", "--json"])
        .expect("running the CLI");
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.starts_with("sip-dispatch: error: the daemon is not running")
            && err.trim_end().lines().count() == 1,
        "stderr: {err:?}"
    );

    // Changes while calls flow: 50 in a burst (drain/enable b1, set-weight b2).
    let calls = 1500;
    let mut uac = bed.start_uac(&bed.uac_spec(calls, 100), "uac");
    uac.run_for(Duration::from_secs(3)).expect("calls flowing");
    let burst = Instant::now();
    for i in 0..50 {
        let out = match i % 2 {
            0 => {
                let verb = if i % 4 == 0 { "drain" } else { "enable" };
                bed.cli(&["backends", verb, &b1.to_string()])
            }
            _ => bed.cli(&[
                "backends",
                "set-weight",
                &b2.to_string(),
                &(1 + i % 3).to_string(),
            ]),
        };
        assert!(out.status.success(), "change {i}: {}", text(&out.stderr));
    }
    let burst = burst.elapsed();
    let uac = uac.finish().expect("UAC");
    let per_call = uac.calls().expect("UAC calls");
    let log = daemon.log();
    let exit = daemon.stop_with_stats().expect("exit stats");
    let reports = bed.stop_backends();

    // Failed calls, by the backends that saw them.
    let by = backends_by_call(&reports);
    let mut failed_at: BTreeMap<String, u64> = BTreeMap::new();
    let mut stayed_failures = Vec::new();
    for (id, c) in per_call.iter().filter(|(_, c)| !c.ok) {
        let at = by.get(id).cloned().unwrap_or_default();
        let key = format!("{at:?}");
        *failed_at.entry(key).or_default() += 1;
        // Calls that touched b1 or b2 were in flight while their backend changed: a
        // stateless dispatcher moves them. Calls only ever at b3 must not fail.
        if !at.contains(&b1) && !at.contains(&b2) {
            stayed_failures.push((id.clone(), at, c.invite_at));
        }
    }
    let split = by.values().filter(|s| s.len() > 1).count();
    let tables = log.tables().len();
    eprintln!(
        "[{NAME}] 50 changes in {:.2} s, {tables} tables; UAC {} ok / {} failed of {calls}; \
         failed by backend {failed_at:?}; {split} calls split across backends (a SIPp UAS \
         answers an unknown BYE with 200); xdp_tx={}",
        burst.as_secs_f64(),
        uac.successful,
        uac.failed,
        exit.counter("xdp_tx")
    );
    let mut problems = Vec::new();
    if !stayed_failures.is_empty() {
        problems.push(format!(
            "{} failed calls on the backend that stayed unchanged ({b3}), e.g. {:?}",
            stayed_failures.len(),
            &stayed_failures[..stayed_failures.len().min(3)]
        ));
    }
    if uac.created != u64::from(calls) {
        problems.push(format!("UAC: {}", uac.failure_summary()));
    }
    if exit.counter("xdp_tx") == 0 {
        problems.push("xdp_tx is 0".into());
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// A config file for the bed's VIP with `backends` (each `ADDR:PORT[,weight=N]`) and
/// `extra` top-level lines.
fn write_config(bed: &Bed, path: &Path, backends: &[String], extra: &str) {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    let text = format!(
        "iface = \"{}\"\nxdp-mode = \"native\"\n{extra}\n[[service]]\nvip = \"{}\"\nbackends = [{}]\n",
        bed.iface(),
        bed.vip,
        list.join(", ")
    );
    std::fs::write(path, text).expect("writing the config file");
}

/// `reload` (and SIGHUP) read the config file again: backends added, removed and
/// re-weighted take effect, a broken file or a restart-only change is refused with a
/// one-line error and changes nothing, and calls then go to the reloaded set only.
#[test]
fn reload_rereads_the_config_file() {
    const NAME: &str = "reload";
    let mut bed = Bed::build(&workdir(), NAME, 3, Duration::from_secs(60));
    let (b1, b2, b3) = (bed.backend(1), bed.backend(2), bed.backend(3));
    let config = bed.dir.join("sip-dispatch.toml");
    write_config(&bed, &config, &[b1.to_string(), b2.to_string()], "");
    let args: Vec<String> = vec![
        "run".into(),
        "--config".into(),
        config.to_string_lossy().into_owned(),
        "--control".into(),
        bed.control.to_string_lossy().into_owned(),
        "--hash-key-file".into(),
        dispatcher::test_key_file().to_string_lossy().into_owned(),
    ];
    let daemon = Dispatcher::start(&bed.binary, &bed.disp_ns(), &args, &bed.dir, "daemon")
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    wait_list(&bed, Duration::from_secs(10), "b1 and b2 up", |l| {
        l.len() == 2 && [b1, b2].iter().all(|&a| state(l, a) == Some("up"))
    });
    bed.cli_json(&["backends", "set-weight", &b1.to_string(), "5", "--json"]);

    // b1 re-weighted, b2 removed, b3 added.
    write_config(
        &bed,
        &config,
        &[format!("{b1},weight=2"), b3.to_string()],
        "",
    );
    let reloaded = bed.cli_json(&["reload", "--json"]);
    let changes: Vec<&str> = reloaded["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no changes in {reloaded}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let vip = bed.vip;
    for want in [
        format!("{vip}: backend {b1} now weight 2 priority 0"),
        format!("{vip}: backend {b3} added"),
        format!("{vip}: backend {b2} removed"),
        "1 set-weight override(s) replaced by the configured weights".to_string(),
    ] {
        assert!(
            changes.contains(&want.as_str()),
            "no {want:?} in {changes:#?}"
        );
    }
    assert_eq!(reloaded["config"], config.to_string_lossy().as_ref());
    let list = wait_list(
        &bed,
        Duration::from_secs(10),
        "b1 (weight 2) and b3 up",
        |l| l.len() == 2 && [b1, b3].iter().all(|&a| state(l, a) == Some("up")),
    );
    assert_eq!(list[&b1]["weight"], 2, "{:#?}", list[&b1]);
    let s1 = list[&b1]["share"].as_f64().unwrap_or(0.0);
    assert!(
        (s1 - 2.0 / 3.0).abs() < 0.01,
        "share of b1 (2 of 3) is {s1}"
    );

    // Refused, one line each, nothing changed: a broken file, then a restart-only key.
    let refused = |what: &str, expect: &str| {
        let out = bed.cli(&["reload"]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "reload of {what} succeeded");
        assert!(
            err.starts_with("sip-dispatch: error: ")
                && err.contains(expect)
                && err.trim_end().lines().count() == 1,
            "reload of {what}: stderr {err:?} (expected one line with {expect:?})"
        );
        let now = listed(&bed.cli_json(&["backends", "list", "--json"]));
        assert_eq!(
            now.keys().collect::<Vec<_>>(),
            [&b1, &b3].into_iter().collect::<Vec<_>>(),
            "reload of {what} changed the backends"
        );
    };
    write_config(&bed, &config, &["198.18.0.23".to_string()], "");
    refused(
        "a bad address",
        &format!("{}:6: key `backends`: invalid address", config.display()),
    );
    write_config(
        &bed,
        &config,
        &[b2.to_string()],
        "hash-key = \"000102030405060708090a0b0c0d0e0f\"",
    );
    refused(
        "a new hash key",
        "`hash-key` changed: that needs a restart (nothing was reloaded)",
    );

    // SIGHUP: b1 removed, b2 back.
    write_config(&bed, &config, &[b2.to_string(), b3.to_string()], "");
    // SAFETY: kill(2) on the daemon's pid, which this test started and still holds.
    let hup = unsafe { libc::kill(daemon.pid(), libc::SIGHUP) };
    assert_eq!(hup, 0, "kill -HUP: {}", std::io::Error::last_os_error());
    wait_list(
        &bed,
        Duration::from_secs(10),
        "b2 and b3 up after SIGHUP",
        |l| l.len() == 2 && [b2, b3].iter().all(|&a| state(l, a) == Some("up")),
    );
    let reloads = &bed.cli_json(&["stats", "--json"])["reloads"];
    assert_eq!(
        (&reloads["ok"], &reloads["failed"], &reloads["last_failed"]),
        (&Value::from(2), &Value::from(2), &Value::from(false)),
        "stats: reloads {reloads} (expected 2 applied, 2 refused, the last applied)"
    );

    // Calls go to the reloaded set only.
    let calls = 300;
    let uac = bed
        .start_uac(&bed.uac_spec(calls, 100), "uac")
        .finish()
        .expect("UAC");
    let log = daemon.log();
    let stopped = daemon.stop();
    let reports = bed.stop_backends();
    let mut problems = uac_problems(&uac, calls);
    let per_backend: BTreeMap<SocketAddr, usize> =
        reports.iter().map(|r| (r.address, r.calls.len())).collect();
    if per_backend.get(&b1) != Some(&0) || per_backend.values().sum::<usize>() != calls as usize {
        problems.push(format!(
            "calls per backend {per_backend:?}: expected all {calls} at {b2} and {b3}"
        ));
    }
    if [b2, b3].iter().any(|a| per_backend.get(a) == Some(&0)) {
        problems.push(format!(
            "a backend of the reloaded set took no call: {per_backend:?}"
        ));
    }
    if !log.tail(400).contains("reload (SIGHUP):") {
        problems.push("no `reload (SIGHUP):` line in the daemon log".into());
    }
    if let Err(e) = stopped {
        problems.push(format!("daemon: {e:#}"));
    }
    eprintln!("[{NAME}] calls per backend after the reloads: {per_backend:?}");
    verdict(NAME, &bed.dir.clone(), problems);
}

/// `bpftool -j map dump pinned` of the daemon's pinned maps prints field names (BTF).
#[test]
fn bpftool_dumps_pinned_maps_with_field_names() {
    const NAME: &str = "bpftool";
    let bed = Bed::build(&workdir(), NAME, 2, Duration::from_secs(60));
    let bpffs = BpfFs::mount(bed.topo.tag());
    let pins = bpffs.path().join(bed.iface());
    let mut run = bed.run_config(2);
    run.extra = vec!["--pin-path".into(), pins.to_string_lossy().into_owned()];
    let daemon = bed.start_daemon(&run);
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    wait_list(&bed, Duration::from_secs(10), "both backends up", |l| {
        [b1, b2].iter().all(|&a| state(l, a) == Some("up"))
    });
    // Two calls through the VIP (fast path) leave entries in the affinity map to dump.
    let calls = 2;
    let uac = bed
        .start_uac(&bed.uac_spec(calls, 10), "uac")
        .finish()
        .expect("UAC");
    let dump = |map: &str| -> Value {
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(pins.join(map))
            .output()
            .expect("running bpftool");
        assert!(out.status.success(), "bpftool {map}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("bpftool {map}: not JSON ({e}): {}", text(&out.stdout)))
    };
    let backends = dump("sd_backends_v1");
    let services = dump("sd_services_v1");
    let counters = dump("sd_counters_v5");
    let flags = dump("sd_bflags_v1");
    let affinity = dump("sd_affinity_v1");
    eprintln!(
        "[{NAME}] sd_backends_v1[0]: {}\nsd_services_v1[0]: {}\nsd_counters_v5[0]: {}\nsd_bflags_v1[0]: {}",
        backends[0], services[0], counters[0], flags[0]
    );
    let stopped = daemon.stop();

    // Addresses and ports are in network byte order: the first u32 word and the u16 as
    // bpftool prints them (host order on this little-endian machine) hold the wire bytes.
    let addr_of = |v: &Value| -> SocketAddr {
        let w = v["addr"][0].as_u64().expect("addr[0]") as u32;
        let port = u16::from_be(v["port"].as_u64().expect("port") as u16);
        SocketAddr::from((std::net::Ipv4Addr::from(w.to_ne_bytes()), port))
    };
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for e in backends.as_array().expect("backends dump is an array") {
        let v = &e["formatted"]["value"];
        for f in ["addr", "port", "family"] {
            if v.get(f).is_none() {
                problems.push(format!("sd_backends_v1 entry without field {f}: {e}"));
            }
        }
        if v["family"] == 4 {
            seen.insert(addr_of(v));
        }
    }
    let want: BTreeSet<SocketAddr> = [bed.backend(1), bed.backend(2)].into();
    if !want.is_subset(&seen) {
        problems.push(format!("sd_backends_v1 shows {seen:?}, expected {want:?}"));
    }
    let svc = services.as_array().expect("services dump is an array");
    if svc.len() != 1
        || addr_of(&svc[0]["formatted"]["key"]) != bed.vip
        || svc[0]["formatted"]["key"]["family"] != 4
        || svc[0]["formatted"]["value"].get("id").is_none()
        || svc[0]["formatted"]["value"].get("flags").is_none()
    {
        problems.push(format!(
            "sd_services_v1: expected one key {{addr, port, family}} = {} with value {{id, flags}}: {services}",
            bed.vip
        ));
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    for e in counters.as_array().expect("counters dump is an array") {
        let values = e["formatted"]["values"].as_array();
        let ok = values.is_some_and(|v| {
            v.len() == cpus && v.iter().all(|c| c["cpu"].is_u64() && c["value"].is_u64())
        });
        if !ok {
            problems.push(format!(
                "sd_counters_v5 entry without {cpus} per-cpu {{cpu, value}}: {e}"
            ));
            break;
        }
    }
    if counters.as_array().map_or(0, Vec::len) < 4 {
        problems.push(format!("sd_counters_v5 has too few counters: {counters}"));
    }
    // Both backends are up and take calls: affinity, up and new (1 | 2 | 4).
    let taking_calls = flags
        .as_array()
        .expect("flags dump is an array")
        .iter()
        .filter(|e| {
            let v = &e["formatted"]["value"];
            v.get("generation").is_some() && v["flags"] == 7
        })
        .count();
    if taking_calls != 2 {
        problems.push(format!(
            "sd_bflags_v1: expected 2 entries {{generation, flags: 7}}, found {taking_calls}"
        ));
    }
    problems.extend(uac_problems(&uac, calls));
    let has_fields = |v: &Value, fields: &[&str]| fields.iter().all(|f| v.get(f).is_some());
    let calls_known = affinity.as_array().map_or(0, |entries| {
        entries
            .iter()
            .filter(|e| {
                has_fields(&e["formatted"]["key"], &["hash", "service"])
                    && has_fields(
                        &e["formatted"]["value"],
                        &["backend", "generation", "last_seen_ns", "flags"],
                    )
            })
            .count()
    });
    eprintln!("[{NAME}] sd_affinity_v1 entries with field names: {calls_known}");
    if calls_known == 0 {
        problems.push(format!(
            "sd_affinity_v1: no entry {{hash, service}} -> {{backend, generation, last_seen_ns, flags}} after {calls} calls: {affinity}"
        ));
    }
    if let Err(e) = stopped {
        problems.push(format!("daemon: {e:#}"));
    }
    drop(bpffs);
    verdict(NAME, &bed.dir.clone(), problems);
}

/// `--keep-attached` under load: daemon A, started from the binary of an earlier build,
/// gets SIGTERM; after a gap with no daemon, B (the build under test) takes over the
/// pinned link and maps: an upgrade. B is then restarted the same way as C: a restart.
/// No call may fail. Then `detach` removes the program.
#[test]
fn upgrade_and_restart_with_keep_attached_drop_no_call() {
    const NAME: &str = "restart";
    // 30 s of calls: A runs 5 s, then each handover (stop, 2 s gap, start, takeover) and
    // 4 s under the new daemon, twice, with room to spare.
    let calls = 3000;
    let mut bed = Bed::build(&workdir(), NAME, 3, Duration::from_secs(90));
    let previous = dispatcher::previous_binary_path().expect("the binary to upgrade from");
    let bpffs = BpfFs::mount(bed.topo.tag());
    let pins = bpffs.path().join(bed.iface());
    let mut run = bed.run_config(3);
    run.extra = vec![
        "--keep-attached".into(),
        "--pin-path".into(),
        pins.to_string_lossy().into_owned(),
    ];
    let (disp_ns, iface) = (bed.disp_ns(), bed.iface());
    let start = |binary: &Path, label: &str| {
        Dispatcher::start(binary, &disp_ns, &run.args(), &bed.dir, label)
            .unwrap_or_else(|e| panic!("starting daemon {label}: {e:#}"))
    };
    let mut problems = Vec::new();
    if std::fs::read(&previous).ok() == std::fs::read(&bed.binary).ok() {
        problems.push(format!(
            "{} is the same executable as {}: no upgrade",
            previous.display(),
            bed.binary.display()
        ));
    }

    let a = start(&previous, "daemon-a-previous");
    let mut programs = vec![link::xdp_prog_id(&disp_ns, &iface).ok().flatten()];
    let mut uac = bed.start_uac(&bed.uac_spec(calls, 100), "uac");
    uac.run_for(Duration::from_secs(5)).expect("calls flowing");
    let mut outputs = Vec::new();
    let mut gaps = Vec::new();
    let mut running = a;
    for (binary, label) in [
        (&bed.binary, "daemon-b-upgrade"),
        (&bed.binary, "daemon-c-restart"),
    ] {
        let stop_at = Instant::now();
        outputs.push(running.stop().expect("the daemon exits cleanly on SIGTERM"));
        uac.run_for(Duration::from_secs(2))
            .expect("calls flowing without a daemon");
        let next = start(binary, label);
        wait_takeover(&next, label);
        gaps.push(stop_at.elapsed());
        programs.push(link::xdp_prog_id(&disp_ns, &iface).ok().flatten());
        uac.run_for(Duration::from_secs(4)).expect("calls flowing");
        running = next;
    }
    let uac = uac.finish().expect("UAC");
    let per_call = uac.calls().expect("UAC calls");
    outputs.push(running.stop().expect("daemon C exits cleanly"));
    let reports = bed.stop_backends();

    problems.extend(uac_problems(&uac, calls));
    problems.extend(exactly_one_backend(&per_call, &reports));
    if per_call.len() != calls as usize {
        problems.push(format!("UAC log has {} calls of {calls}", per_call.len()));
    }
    for (who, out) in ["A", "B", "C"].iter().zip(&outputs) {
        if !out.contains(dispatcher::EXIT_STATS_PREFIX) {
            problems.push(format!("daemon {who} printed no exit-stats: {out}"));
        }
    }
    // Each takeover put its own program into the link.
    let distinct: BTreeSet<_> = programs.iter().flatten().collect();
    if programs.iter().any(Option::is_none) || distinct.len() != 3 {
        problems.push(format!(
            "XDP program ids on {iface} under A, B, C: {programs:?} (expected three different)"
        ));
    }

    // detach: the program is gone from the interface.
    let detach = netns::command(&disp_ns, &bed.binary.to_string_lossy())
        .args(["detach", "--iface", &iface, "--pin-path"])
        .arg(&pins)
        .output()
        .expect("running detach");
    if !detach.status.success() {
        problems.push(format!("detach failed: {}", text(&detach.stderr)));
    }
    if let Some(id) = link::xdp_prog_id(&disp_ns, &iface).ok().flatten() {
        problems.push(format!("XDP program {id} is still attached after detach"));
    }
    eprintln!(
        "[{NAME}] A ({}) -> B (upgrade) took over {:.2} s after A's SIGTERM, B -> C \
         (restart) {:.2} s; programs {programs:?}; UAC {} ok / {} failed of {calls}, {} \
         retransmissions",
        previous.display(),
        gaps[0].as_secs_f64(),
        gaps[1].as_secs_f64(),
        uac.successful,
        uac.failed,
        uac.retransmissions
    );
    drop(bpffs);
    verdict(NAME, &bed.dir.clone(), problems);
}

/// A backend that answers every OPTIONS oddly but well-formed: `100 Trying`, then `503`
/// with `Retry-After: 18446744073709551615 (gone fishing);duration=1` (the top of u64)
/// and a 2000-byte header. Written to `dir/odd-options.xml`.
fn odd_options_scenario(dir: &Path) -> PathBuf {
    let pad = "x".repeat(2000);
    let xml = format!(
        r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="odd OPTIONS answers">
  <recv request="OPTIONS"/>
  <send>
    <![CDATA[

      SIP/2.0 100 Trying
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
  <send>
    <![CDATA[

      SIP/2.0 503 Service Unavailable
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]odd[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Retry-After: 18446744073709551615 (gone fishing);duration=1
      X-Padding: {pad}
      Content-Length: 0

    ]]>
  </send>
</scenario>
"#
    );
    let path = dir.join("odd-options.xml");
    std::fs::write(&path, xml).expect("writing the scenario");
    path
}

/// A backend answering the health check with `503` and a Retry-After at the top of the
/// u64 range (after a 100, with a 2000-byte header) once panicked the daemon at every
/// start. Now: the daemon starts and stays up, that backend is down and held (for the
/// clamped hour, logged), the others take every call (each at one backend), a restart
/// with that backend still listed works, the probes go to `--health-uri
/// sip:ping@{backend}`, and `backends list --json` shows each one's last code and RTT.
#[test]
fn a_hostile_health_answer_holds_its_backend_and_crashes_nothing() {
    const NAME: &str = "hostile_health";
    const CALLS: u32 = 200;
    let mut bed = Bed::build(&workdir(), NAME, 3, Duration::from_secs(120));
    let (b1, b2, b3) = (bed.backend(1), bed.backend(2), bed.backend(3));
    // b3 becomes the odd backend: same address, a scenario answering OPTIONS only.
    bed.uas[2].take().expect("b3").stop().expect("stopping b3");
    let scenario = odd_options_scenario(&bed.dir);
    let ns = bed
        .topo
        .backends()
        .nth(2)
        .expect("third backend host")
        .ns_name()
        .to_owned();
    bed.uas[2] = Some(
        Uas::start_scenario(
            &ns,
            b3.ip(),
            &bed.dir,
            "odd-b3",
            Duration::from_secs(120),
            &scenario,
        )
        .expect("the odd backend"),
    );
    let mut run = bed.run_config(3);
    run.extra = vec!["--health-uri".into(), "sip:ping@{backend}".into()];

    let mut problems = Vec::new();
    let mut uac_runs = Vec::new();
    for round in ["first start", "restart"] {
        let mut daemon = bed.start_daemon(&run);
        let list = wait_list(
            &bed,
            Duration::from_secs(15),
            "b1, b2 up and b3 held down",
            |l| {
                state(l, b1) == Some("up")
                    && state(l, b2) == Some("up")
                    && state(l, b3) == Some("down")
            },
        );
        let reason = list[&b3]["reason"].as_str().unwrap_or_default();
        println!(
            "{round}: b3 {} ({reason}), last_code {}; b1 last_code {} last_rtt_ms {}; b2 last_rtt_ms {}",
            list[&b3]["state"],
            list[&b3]["last_code"],
            list[&b1]["last_code"],
            list[&b1]["last_rtt_ms"],
            list[&b2]["last_rtt_ms"]
        );
        if !reason.contains("held for 3600s by 503 with Retry-After 18446744073709551615s") {
            problems.push(format!("{round}: b3's reason {reason:?} does not say held"));
        }
        if list[&b3]["last_code"] != 503 {
            problems.push(format!(
                "{round}: b3's last_code {}",
                list[&b3]["last_code"]
            ));
        }
        for b in [b1, b2] {
            let rtt = list[&b]["last_rtt_ms"].as_f64();
            if list[&b]["last_code"] != 200 || !rtt.is_some_and(|r| r > 0.0 && r < 1000.0) {
                problems.push(format!(
                    "{round}: {b} last_code {} last_rtt_ms {:?}",
                    list[&b]["last_code"], rtt
                ));
            }
            // The fields that were there before stay.
            for field in [
                "rtt_ms",
                "checks",
                "check_failures",
                "state",
                "reason",
                "share",
            ] {
                if list[&b].get(field).is_none() {
                    problems.push(format!("{round}: {b} lost the field {field}"));
                }
            }
        }
        let table = text(&bed.cli(&["backends", "list"]).stdout);
        if !(table.contains("last ms") && table.contains(" 503 ")) {
            problems.push(format!("{round}: the table lacks last code/RTT:\n{table}"));
        }

        let mut spec = bed.uac_spec(CALLS, 100);
        // Call-IDs of their own per round: the UAS would take a known one for a retransmission.
        spec.call_id = format!("%u-r{}-sdt@%s", uac_runs.len());
        let uac = bed.start_uac(&spec, &format!("uac-{}", uac_runs.len()));
        let report = uac.finish().expect("UAC");
        problems.extend(
            uac_problems(&report, CALLS)
                .into_iter()
                .map(|p| format!("{round}: {p}")),
        );
        uac_runs.push(report);
        if let Err(e) = daemon.check_running() {
            problems.push(format!("{round}: the daemon died: {e:#}"));
        }
        let log = daemon.log().tail(400);
        if !log.contains("Retry-After 18446744073709551615s clamped to 3600s") {
            problems.push(format!("{round}: no clamp in the daemon's log:\n{log}"));
        }
        if log.contains("panicked") {
            problems.push(format!("{round}: a panic in the daemon's log:\n{log}"));
        }
        daemon.stop().expect("the daemon stops cleanly");
    }

    // Where each probe and call landed.
    let odd = bed.uas[2].as_ref().expect("b3");
    let probes_b1 = bed.uas[0]
        .as_ref()
        .expect("b1")
        .received_request_lines()
        .expect("b1 log");
    let probes_b3 = odd.received_request_lines().expect("b3 log");
    for (b, lines) in [(b1, &probes_b1), (b3, &probes_b3)] {
        let options: Vec<&String> = lines.iter().filter(|l| l.starts_with("OPTIONS ")).collect();
        let expected = format!("OPTIONS sip:ping@{b} SIP/2.0");
        if options.is_empty() || options.iter().any(|l| **l != expected) {
            problems.push(format!(
                "{b}: OPTIONS lines {options:?}, expected {expected:?}"
            ));
        }
    }
    if let Some(l) = probes_b3.iter().find(|l| !l.starts_with("OPTIONS ")) {
        problems.push(format!("the held backend b3 got a call: {l}"));
    }
    let reports = bed.stop_backends();
    let by_call = backends_by_call(&reports);
    for uac in &uac_runs {
        let calls = uac.calls().expect("UAC calls");
        problems.extend(exactly_one_backend(&calls, &reports));
        let mut per_backend: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for call_id in calls.keys() {
            for b in by_call.get(call_id).into_iter().flatten() {
                *per_backend.entry(*b).or_default() += 1;
            }
        }
        if per_backend.contains_key(&b3) || per_backend.values().sum::<usize>() != CALLS as usize {
            problems.push(format!("calls per backend {per_backend:?}"));
        }
        println!(
            "{}: {} calls ok, {} failed; per backend {per_backend:?}",
            uac.label, uac.successful, uac.failed
        );
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// INVITEs of ~3 kB leave the client in fragments: the fast path passes them, the stack
/// reassembles, the slow path forwards each to the backend of its Call-ID.
#[test]
fn large_invite_goes_through_the_slow_path() {
    const NAME: &str = "slow-path";
    let calls = 200;
    let mut bed = Bed::build(&workdir(), NAME, 2, Duration::from_secs(60));
    let daemon = bed.start_daemon(&bed.run_config(2));
    let mut spec = bed.uac_spec(calls, 50);
    spec.scenario =
        Scenario::File(scenario::big_invite(&bed.dir, 3000).expect("writing the scenario"));
    let uac = bed.start_uac(&spec, "uac").finish().expect("UAC");
    let per_call = uac.calls().expect("UAC calls");
    let exit: ExitStats = daemon.stop_with_stats().expect("exit stats");
    let reports = bed.stop_backends();

    let forwarded = exit.raw["slow_path"]["forwarded"].as_u64().unwrap_or(0);
    let fragments = exit.counter("pass_fragment");
    eprintln!(
        "[{NAME}] UAC {} ok / {} failed of {calls}; slow_path {}; pass_fragment={fragments} \
         xdp_tx={}; calls per backend {:?}",
        uac.successful,
        uac.failed,
        exit.raw["slow_path"],
        exit.counter("xdp_tx"),
        reports
            .iter()
            .map(|r| (r.address.to_string(), r.calls.len()))
            .collect::<Vec<_>>()
    );
    let mut problems = uac_problems(&uac, calls);
    problems.extend(exactly_one_backend(&per_call, &reports));
    if forwarded < u64::from(calls) {
        problems.push(format!(
            "slow_path.forwarded = {forwarded}, expected at least {calls}: {}",
            exit.raw["slow_path"]
        ));
    }
    if fragments == 0 {
        problems.push(format!("pass_fragment is 0: {:?}", exit.counters));
    }
    verdict(NAME, &bed.dir.clone(), problems);
}
