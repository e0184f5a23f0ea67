//! Operating a running daemon (README "Operating a running daemon", "Restarts and
//! upgrades without a dropped call", "The slow path", "Inspecting with bpftool"): the CLI
//! against a live daemon while SIPp calls flow, bpftool on the pinned maps, a restart with
//! `--keep-attached` under load, and large (fragmented) INVITEs through the slow path;
//! the slow path's fixed sockets, per-backend counts and 503 (rport/received, size cap),
//! and the control socket's and metrics endpoint's limits (non-root peers, idle
//! connections).
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
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;
use sip_dispatch_testbed::{
    Family, XdpMode,
    dispatcher::{self, BackendArg, Dispatcher, ExitStats, RunConfig},
    link, netns, preflight, rawnet, scenario,
    sipp::{
        self, Scenario, UacReport, UacSpec, Uas, UasReport, backends_by_call, exactly_one_backend,
    },
    topology::{Topology, TopologySpec},
};

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-operations")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A test network with SIPp backends b1..bN (IPv4) and the XDP_PASS peer program.
/// Fields drop in order: the daemon slot is the caller's; here backends, then the pass
/// program, then the namespaces.
struct Bed {
    binary: PathBuf,
    dir: PathBuf,
    uas: Vec<Option<Uas>>,
    xdp_pass: Option<Dispatcher>,
    vip: SocketAddr,
    control: PathBuf,
    topo: Topology,
}

impl Bed {
    fn build(name: &str, backends: u8, bound: Duration) -> Bed {
        Bed::build_family(name, backends, bound, Family::V4)
    }

    /// A bed whose VIP and SIPp backends are of `family`.
    fn build_family(name: &str, backends: u8, bound: Duration, family: Family) -> Bed {
        preflight::require_all().expect("preflight");
        let binary = dispatcher::binary_path().expect("sip-dispatch binary");
        let dir = scenario::run_dir(&workdir(), name).expect("run dir");
        netns::cleanup_leftovers().expect("cleaning up leftovers");
        let topo = Topology::build(TopologySpec::dispatcher(backends)).expect("topology");
        let uas = scenario::start_backends(&topo, family, &dir, bound)
            .expect("UAS backends")
            .into_iter()
            .map(Some)
            .collect();
        let xdp_pass = scenario::start_xdp_pass(&topo, &binary, XdpMode::Native, &dir, true)
            .expect("xdp-pass on the peer");
        let vip = SocketAddr::new(topo.vip(family), sipp::SIP_PORT);
        let control = dispatcher::control_socket(topo.tag()).expect("control socket path");
        Bed {
            binary,
            dir,
            uas,
            xdp_pass,
            vip,
            control,
            topo,
        }
    }

    /// Backend `n` (from 1).
    fn backend(&self, n: usize) -> SocketAddr {
        self.uas[n - 1].as_ref().expect("backend running").address
    }

    fn disp_ns(&self) -> String {
        self.topo.dispatcher().unwrap().ns_name().to_owned()
    }

    fn iface(&self) -> String {
        self.topo.dispatcher().unwrap().iface.clone()
    }

    /// A run configuration with backends `1..=n`, weight 1 each, and the control socket.
    fn run_config(&self, n: usize) -> RunConfig {
        let mut run = RunConfig::new(&self.iface(), self.vip, XdpMode::Native);
        run.control = Some(self.control.clone());
        run.backends = (1..=n)
            .map(|i| BackendArg::new(self.backend(i), 1))
            .collect();
        run
    }

    fn start_daemon(&self, run: &RunConfig) -> Dispatcher {
        Dispatcher::run(&self.binary, &self.disp_ns(), run, &self.dir)
            .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"))
    }

    fn uac_spec(&self, calls: u32, rate: u32) -> UacSpec {
        UacSpec::calls(self.topo.client().ip(Family::V4), self.vip, calls, rate)
    }

    fn start_uac(&self, spec: &UacSpec, label: &str) -> sipp::Uac {
        sipp::Uac::start(self.topo.client().ns_name(), spec, &self.dir, label).expect("UAC")
    }

    /// Stops every backend and returns what each saw.
    fn stop_backends(&mut self) -> Vec<UasReport> {
        self.uas
            .iter_mut()
            .filter_map(Option::take)
            .map(|u| u.stop().expect("stopping a UAS"))
            .collect()
    }

    /// The CLI (from the root namespace: the control socket is a file path).
    fn cli(&self, args: &[&str]) -> Output {
        dispatcher::cli(&self.binary, &self.control, args).expect("running the CLI")
    }

    /// The CLI, expecting success and JSON on stdout.
    fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`sip-dispatch {}` failed ({}): {}",
            args.join(" "),
            out.status,
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`sip-dispatch {}` printed no JSON ({e}): {}",
                args.join(" "),
                text(&out.stdout)
            )
        })
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for u in self.uas.iter_mut().filter_map(Option::take) {
            let _ = u.stop();
        }
        if let Some(p) = self.xdp_pass.take() {
            let _ = p.stop();
        }
    }
}

/// A bpf filesystem mounted on a fresh directory of the root namespace; unmounted (and
/// the directory removed) on drop.
struct BpfFs(PathBuf);

impl BpfFs {
    fn mount(tag: &str) -> BpfFs {
        let dir = PathBuf::from(format!("/run/sdt-bpffs-{tag}"));
        std::fs::create_dir_all(&dir).expect("creating the bpffs mount point");
        let fs = BpfFs(dir);
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&fs.0)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mount -t bpf bpf {}: {}",
            fs.0.display(),
            text(&out.stderr)
        );
        fs
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The backends of the first service in `backends list --json`: address → entry.
fn listed(list: &Value) -> BTreeMap<SocketAddr, Value> {
    list["services"][0]["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no services[0].backends in {list}"))
        .iter()
        .map(|b| {
            let a = b["address"].as_str().expect("address").parse().unwrap();
            (a, b.clone())
        })
        .collect()
}

fn share_sum(list: &BTreeMap<SocketAddr, Value>) -> f64 {
    list.values()
        .map(|b| b["share"].as_f64().unwrap_or(0.0))
        .sum()
}

/// Polls `backends list --json` until `accept` likes it (bounded).
fn wait_list(
    bed: &Bed,
    timeout: Duration,
    what: &str,
    accept: impl Fn(&BTreeMap<SocketAddr, Value>) -> bool,
) -> BTreeMap<SocketAddr, Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = listed(&bed.cli_json(&["backends", "list", "--json"]));
        if accept(&list) {
            return list;
        }
        if Instant::now() >= deadline {
            panic!("backends list never showed {what} within {timeout:?}: {list:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn state(list: &BTreeMap<SocketAddr, Value>, a: SocketAddr) -> Option<&str> {
    list.get(&a).and_then(|b| b["state"].as_str())
}

fn uac_problems(uac: &UacReport, calls: u32) -> Vec<String> {
    let mut p = Vec::new();
    if uac.failed != 0 || uac.exit_code != Some(0) || uac.successful != u64::from(calls) {
        p.push(format!("UAC: {}", uac.failure_summary()));
    }
    p
}

fn verdict(name: &str, dir: &Path, problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{name}:\n  - {}\nlogs: {}",
        problems.join("\n  - "),
        dir.display()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The CLI against a live daemon: list, add, drain, enable, set-weight, remove, which,
/// stats, and its one-line errors; then a burst of 50 changes while SIPp calls flow.
#[test]
fn cli_round_trips_against_a_live_daemon() {
    const NAME: &str = "cli";
    let mut bed = Bed::build(NAME, 4, Duration::from_secs(60));
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
    let mut bed = Bed::build(NAME, 3, Duration::from_secs(60));
    let (b1, b2, b3) = (bed.backend(1), bed.backend(2), bed.backend(3));
    let config = bed.dir.join("sip-dispatch.toml");
    write_config(&bed, &config, &[b1.to_string(), b2.to_string()], "");
    let args: Vec<String> = vec![
        "run".into(),
        "--config".into(),
        config.to_string_lossy().into_owned(),
        "--control".into(),
        bed.control.to_string_lossy().into_owned(),
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
    let bed = Bed::build(NAME, 2, Duration::from_secs(60));
    let bpffs = BpfFs::mount(bed.topo.tag());
    let pins = bpffs.path().join(bed.iface());
    let mut run = bed.run_config(2);
    run.extra = vec!["--pin-path".into(), pins.to_string_lossy().into_owned()];
    let daemon = bed.start_daemon(&run);
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
    let counters = dump("sd_counters_v1");
    eprintln!(
        "[{NAME}] sd_backends_v1[0]: {}\nsd_services_v1[0]: {}\nsd_counters_v1[0]: {}",
        backends[0], services[0], counters[0]
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
                "sd_counters_v1 entry without {cpus} per-cpu {{cpu, value}}: {e}"
            ));
            break;
        }
    }
    if counters.as_array().map_or(0, Vec::len) < 4 {
        problems.push(format!("sd_counters_v1 has too few counters: {counters}"));
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
    let mut bed = Bed::build(NAME, 3, Duration::from_secs(90));
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
        let log = next.log();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.tail(400).contains("took over the XDP link") {
            assert!(
                Instant::now() < deadline,
                "{label} never logged `took over the XDP link`:\n{}",
                log.tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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

/// A SIPp scenario like the built-in `uac` whose INVITE carries an SDP body of about
/// `sdp_bytes` bytes (padding attributes), so it leaves the client fragmented.
fn big_invite_scenario(dir: &Path, sdp_bytes: usize) -> PathBuf {
    let mut pad = String::new();
    let mut i = 0;
    while pad.len() < sdp_bytes {
        let _ = writeln!(pad, "a=x-pad-{i:04}:{}", "0123456789abcdef".repeat(4));
        i += 1;
    }
    let xml = format!(
        r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="large INVITE">
  <send retrans="500">
    <![CDATA[

      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: [service] <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Subject: Large INVITE
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
{pad}
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true"/>
  <send>
    <![CDATA[

      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: [service] <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <pause/>
  <send retrans="500">
    <![CDATA[

      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: [service] <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
"#
    );
    let path = dir.join("large-invite.xml");
    std::fs::write(&path, xml).expect("writing the scenario");
    path
}

/// INVITEs of ~3 kB leave the client in fragments: the fast path passes them, the stack
/// reassembles, the slow path forwards each to the backend of its Call-ID.
#[test]
fn large_invite_goes_through_the_slow_path() {
    const NAME: &str = "slow-path";
    let calls = 200;
    let mut bed = Bed::build(NAME, 2, Duration::from_secs(60));
    let daemon = bed.start_daemon(&bed.run_config(2));
    let mut spec = bed.uac_spec(calls, 50);
    spec.scenario = Scenario::File(big_invite_scenario(&bed.dir, 3000));
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

/// Runs `f` on a thread inside network namespace `ns` (sockets it opens live there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        rawnet::enter_netns(&ns).unwrap_or_else(|e| panic!("entering {ns}: {e:#}"));
        f()
    })
    .join()
    .expect("the thread in the namespace panicked")
}

/// The socket inodes among the open files of process `pid`.
fn socket_inodes(pid: i32) -> BTreeSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The inodes of the raw sockets in the network namespace of process `pid`.
fn raw_socket_inodes(pid: i32) -> BTreeSet<u64> {
    ["raw", "raw6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(9)?.parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// Bytes waiting in the receive queue of the daemon's UDP socket on `vip`.
fn vip_receive_queue(pid: i32, vip: SocketAddr) -> Option<u64> {
    let file = if vip.is_ipv4() { "udp" } else { "udp6" };
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local = sip_dispatch_testbed::process::parse_proc_net_addr(f.get(1)?)?;
        (local == (vip.ip(), vip.port()))
            .then(|| u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok())?
    })
}

/// The UDP counters of namespace `ns` (`Udp:` of /proc/net/snmp, or `Udp6*` of
/// /proc/net/snmp6 with the prefix cut), by name.
fn udp_counters(ns: &str, family: Family) -> BTreeMap<String, u64> {
    let (file, prefix) = match family {
        Family::V4 => ("/proc/net/snmp", "Udp:"),
        Family::V6 => ("/proc/net/snmp6", "Udp6"),
    };
    let text =
        netns::exec(ns, "cat", [file]).unwrap_or_else(|e| panic!("reading {file} in {ns}: {e:#}"));
    match family {
        Family::V4 => {
            let rows: Vec<Vec<&str>> = text
                .lines()
                .filter(|l| l.starts_with(prefix))
                .map(|l| l.split_whitespace().skip(1).collect())
                .collect();
            match rows.as_slice() {
                [names, values, ..] => names
                    .iter()
                    .zip(values)
                    .filter_map(|(n, v)| Some(((*n).to_owned(), v.parse().ok()?)))
                    .collect(),
                _ => BTreeMap::new(),
            }
        }
        Family::V6 => text
            .lines()
            .filter_map(|l| {
                let (n, v) = l.split_once(char::is_whitespace)?;
                Some((n.strip_prefix(prefix)?.to_owned(), v.trim().parse().ok()?))
            })
            .collect(),
    }
}

/// The receive queue (bytes) and drop count of the raw socket `inode` in the network
/// namespace of process `pid`.
fn raw_socket_queue_and_drops(pid: i32, inode: u64) -> Option<(u64, u64)> {
    ["raw", "raw6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .find_map(|table| {
            table.lines().skip(1).find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.get(9)?.parse::<u64>().ok()? != inode {
                    return None;
                }
                let queue = u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?;
                Some((queue, f.last()?.parse().ok()?))
            })
        })
}

/// A SIP OPTIONS request of exactly `len` bytes (padded with an X-Pad header) from
/// `from` to `vip`, with Call-ID `call_id` and `via_params` after the top Via's sent-by.
fn padded_options(
    from: SocketAddr,
    vip: SocketAddr,
    call_id: &str,
    via_params: &str,
    len: usize,
) -> Vec<u8> {
    let head = format!(
        "OPTIONS sip:svc@{vip} SIP/2.0\r\nVia: SIP/2.0/UDP {from}{via_params};branch=z9hG4bK-{call_id}\r\n\
         From: <sip:test@{from}>;tag=1\r\nTo: <sip:svc@{vip}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n\
         Max-Forwards: 70\r\n"
    );
    let tail = "Content-Length: 0\r\n\r\n";
    let pad = len.saturating_sub(head.len() + tail.len() + "X-Pad: \r\n".len());
    let msg = format!("{head}X-Pad: {}\r\n{tail}", "p".repeat(pad));
    assert_eq!(msg.len(), len, "padding {call_id}");
    msg.into_bytes()
}

/// `count` datagrams of `len` bytes (fragmented on the way: larger than the MTU) from a
/// UDP socket on the client to the VIP, while another thread lists the daemon's sockets
/// as fast as it can. The slow path forwards all of them through the sockets it had
/// before (one raw socket per service): no socket appears, and the per-backend counters
/// hold exactly what it forwarded, bytes counted like the fast path's frames.
fn slow_path_sockets_and_counters(name: &str, family: Family) {
    const DATAGRAMS: usize = 2000;
    const LEN: usize = 3000;
    let mut bed = Bed::build_family(name, 2, Duration::from_secs(60), family);
    let mut run = bed.run_config(2);
    // No health-check sockets come and go during the measurement.
    run.extra = vec!["--health-interval".into(), "60s".into()];
    let daemon = bed.start_daemon(&run);
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    wait_list(&bed, Duration::from_secs(10), "both backends up", |l| {
        [b1, b2].iter().all(|&a| state(l, a) == Some("up"))
    });
    let pid = daemon.pid();
    let before = socket_inodes(pid);
    let raw_before: BTreeSet<u64> = raw_socket_inodes(pid)
        .intersection(&before)
        .copied()
        .collect();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut seen, mut samples, mut most) = (BTreeSet::new(), 0u64, 0usize);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let now = socket_inodes(pid);
                most = most.max(now.len());
                seen.extend(now);
                samples += 1;
            }
            (seen, samples, most)
        })
    };
    let client = SocketAddr::new(bed.topo.client().ip(family), 0);
    let vip = bed.vip;
    let started = Instant::now();
    let (sock, from) = in_netns(bed.topo.client().ns_name(), move || {
        let sock = std::net::UdpSocket::bind(client).expect("client socket");
        let from = sock.local_addr().expect("client address");
        (sock, from)
    });
    rawnet::set_option(
        &sock,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        &(8i32 << 20),
        "SO_RCVBUF",
    )
    .expect("client receive buffer");
    // The backends (SIPp, -aa) answer each OPTIONS with 200 to where it came from: an
    // answer proves the backend got the datagram whole, with the client's address and
    // port as its source. The Via names another port, so only the source can lead there.
    let answers = {
        let sock = sock.try_clone().expect("client socket clone");
        std::thread::spawn(move || {
            sock.set_read_timeout(Some(Duration::from_secs(3)))
                .expect("read timeout");
            let mut ids = BTreeSet::new();
            let mut buf = vec![0u8; 65536];
            while ids.len() < DATAGRAMS {
                let Ok(n) = sock.recv(&mut buf) else { break };
                let msg = String::from_utf8_lossy(&buf[..n]);
                if msg.starts_with("SIP/2.0 200")
                    && let Some(id) = msg.lines().find_map(|l| l.strip_prefix("Call-ID: "))
                {
                    ids.insert(id.trim().to_owned());
                }
            }
            ids.len()
        })
    };
    let via_from = SocketAddr::new(from.ip(), 9);
    let mut sent = 0;
    for i in 0..DATAGRAMS {
        let msg = padded_options(via_from, vip, &format!("sockets-{i}"), "", LEN);
        if sock.send_to(&msg, vip).is_ok() {
            sent += 1;
        }
        // Paced (at most ~4000/s) so that the VIP socket's buffer never overflows.
        if i % 8 == 7 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // Wait (bounded) until the daemon has read every datagram from the VIP socket, with
    // no CLI call meanwhile (each would be a control connection: a socket of its own).
    let deadline = Instant::now() + Duration::from_secs(30);
    while vip_receive_queue(pid, vip) != Some(0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (seen, samples, most) = sampler.join().expect("sampler");
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = bed.cli_json(&["stats", "--json"]);
        if stats["slow_path"]["received"].as_u64() >= Some(sent as u64) || Instant::now() > deadline
        {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let after = socket_inodes(pid);
    let raw_queue: Vec<_> = raw_before
        .iter()
        .map(|&i| raw_socket_queue_and_drops(pid, i))
        .collect();
    let answered = answers.join().expect("answer counter");
    let udp: Vec<BTreeMap<String, u64>> = bed
        .topo
        .backends()
        .map(|b| udp_counters(b.ns_name(), family))
        .collect();
    drop(daemon);
    bed.stop_backends();

    let slow = &stats["slow_path"];
    let forwarded = slow["forwarded"].as_u64().unwrap_or(0);
    let packets: u64 = stats["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| b["packets"].as_u64().unwrap_or(0))
        .sum();
    let bytes: u64 = stats["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| b["bytes"].as_u64().unwrap_or(0))
        .sum();
    let ip_header = if family == Family::V4 { 20 } else { 40 };
    let frame = (14 + ip_header + 8 + LEN) as u64;
    let new_sockets: Vec<&u64> = seen.difference(&before).collect();
    eprintln!(
        "[{name}] {sent} datagrams of {LEN} bytes in {:.2}s; slow_path {slow}; backends: {packets} packets, {bytes} bytes; \
         daemon sockets {} before, {} after, at most {most} in {samples} samples, {} new; raw sockets {raw_before:?}",
        elapsed.as_secs_f64(),
        before.len(),
        after.len(),
        new_sockets.len()
    );
    let total = |k: &str| {
        udp.iter()
            .map(|c| c.get(k).copied().unwrap_or(0))
            .sum::<u64>()
    };
    eprintln!(
        "[{name}] the backends answered {answered} of the {sent} OPTIONS at the client's source port; \
         their kernels: InDatagrams {}, RcvbufErrors {}, InCsumErrors {}, InErrors {}",
        total("InDatagrams"),
        total("RcvbufErrors"),
        total("InCsumErrors"),
        total("InErrors")
    );
    let mut problems = Vec::new();
    if sent != DATAGRAMS {
        problems.push(format!("sent only {sent} of {DATAGRAMS}"));
    }
    // Every datagram reached a backend's kernel whole (reassembled, checksum right)...
    if total("InCsumErrors") != 0
        || total("InErrors") != 0
        || total("InDatagrams") + total("RcvbufErrors") < DATAGRAMS as u64
    {
        problems.push(format!(
            "not every datagram reached a backend intact: {udp:?}"
        ));
    }
    // ... from the client's address and port: SIPp answers there, and only there. (SIPp
    // itself may miss a few of a burst; the kernel counters above are exact.)
    if answered < DATAGRAMS * 99 / 100 {
        problems.push(format!(
            "the backends answered {answered} of {DATAGRAMS} at the client's source {from}"
        ));
    }
    if slow["received"].as_u64() != Some(DATAGRAMS as u64) || forwarded != DATAGRAMS as u64 {
        problems.push(format!(
            "the slow path did not forward every datagram: {slow}"
        ));
    }
    // Sockets may close (the CLI's last control connection), none may appear.
    if !new_sockets.is_empty() || !after.is_subset(&before) {
        problems.push(format!(
            "the daemon opened sockets while forwarding: {new_sockets:?} new in {samples} samples; {} before, {} after",
            before.len(),
            after.len()
        ));
    }
    // The copies of incoming datagrams the raw socket gets are dropped by its filter
    // before they are queued: without the filter one would sit in its receive queue and
    // the others would be counted as drops (receive buffer full).
    eprintln!("[{name}] raw socket (receive queue, drops): {raw_queue:?}");
    if raw_queue
        .iter()
        .any(|q| !q.is_some_and(|(queue, drops)| queue == 0 && drops == 0))
    {
        problems.push(format!(
            "the raw socket queued what it received (queue, drops): {raw_queue:?}"
        ));
    }
    if raw_before.len() != 1 {
        problems.push(format!(
            "expected one raw socket for the one service, found {raw_before:?}"
        ));
    }
    if samples < 100 {
        problems.push(format!("only {samples} samples of the daemon's sockets"));
    }
    if packets != forwarded || bytes != forwarded * frame {
        problems.push(format!(
            "per-backend counters {packets} packets, {bytes} bytes; the slow path forwarded {forwarded} of {frame}-byte frames: {}",
            stats["backends"]
        ));
    }
    verdict(name, &bed.dir.clone(), problems);
}

#[test]
fn slow_path_forwards_through_fixed_sockets_and_counts_per_backend_ipv4() {
    slow_path_sockets_and_counters("slow-sockets-v4", Family::V4);
}

#[test]
fn slow_path_forwards_through_fixed_sockets_and_counts_per_backend_ipv6() {
    slow_path_sockets_and_counters("slow-sockets-v6", Family::V6);
}

/// The first datagram on `sock` within `wait`, as text; None when none came.
fn receive_text(sock: &std::net::UdpSocket, wait: Duration) -> Option<String> {
    sock.set_read_timeout(Some(wait)).expect("read timeout");
    let mut buf = vec![0u8; 65536];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// With no healthy backend the slow path answers requests with a 503 whose top Via
/// carries the client's address and port (RFC 3581 rport and received) where the request
/// asked for them or named another host, and stays silent (counted) when the 503 would
/// not fit in one datagram.
fn no_backend_503(name: &str, family: Family) {
    let mut bed = Bed::build_family(name, 1, Duration::from_secs(60), family);
    let run = bed.run_config(1);
    // The only backend is gone before the daemon starts: its first probe fails.
    bed.stop_backends();
    let daemon = bed.start_daemon(&run);
    wait_list(&bed, Duration::from_secs(10), "the backend down", |l| {
        l.values().all(|b| b["state"] != "up")
    });
    let client = SocketAddr::new(bed.topo.client().ip(family), 0);
    let vip = bed.vip;
    let sock = in_netns(bed.topo.client().ns_name(), move || {
        std::net::UdpSocket::bind(client).expect("client socket")
    });
    let from = sock.local_addr().expect("client address");
    let nat: SocketAddr = match family {
        Family::V4 => "10.0.0.5:5060".parse().unwrap(),
        Family::V6 => "[fd00::5]:5060".parse().unwrap(),
    };
    let top_via = |answer: &str| {
        answer
            .lines()
            .find_map(|l| l.strip_prefix("Via: "))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let mut problems = Vec::new();

    // Behind a NAT: the Via names a private address and asks for rport.
    let req = padded_options(nat, vip, "nat-1", ";rport", 600);
    sock.send_to(&req, vip).expect("sending");
    let answer = receive_text(&sock, Duration::from_secs(5));
    let want = format!(
        "SIP/2.0/UDP {nat};rport={};branch=z9hG4bK-nat-1;received={}",
        from.port(),
        from.ip()
    );
    match &answer {
        Some(a) if a.starts_with("SIP/2.0 503 ") && top_via(a) == want => {}
        other => problems.push(format!(
            "rport request: wanted a 503 with Via {want}, got {other:?}"
        )),
    }

    // The Via is the source itself, without rport: nothing is added.
    let req = padded_options(from, vip, "plain-1", "", 600);
    sock.send_to(&req, vip).expect("sending");
    let answer = receive_text(&sock, Duration::from_secs(5));
    let want = format!("SIP/2.0/UDP {from};branch=z9hG4bK-plain-1");
    match &answer {
        Some(a) if a.starts_with("SIP/2.0 503 ") && top_via(a) == want => {}
        other => problems.push(format!(
            "plain request: wanted a 503 with Via {want}, got {other:?}"
        )),
    }

    // 40 Via headers of ~100 bytes: the 503 would be over 4 kB. No answer.
    let vias: String = (0..40)
        .map(|i| format!("Via: SIP/2.0/UDP {nat};branch=z9hG4bK-{i:0>70}\r\n"))
        .collect();
    let req = String::from_utf8(padded_options(from, vip, "big-1", "", 600))
        .unwrap()
        .replacen("From:", &format!("{vias}From:"), 1);
    sock.send_to(req.as_bytes(), vip).expect("sending");
    // Awaited below through the counters; this only checks nothing arrives meanwhile.
    let big_answer = receive_text(&sock, Duration::from_secs(2));
    if let Some(a) = &big_answer {
        problems.push(format!(
            "an answer to the request whose 503 is too large: {a}"
        ));
    }
    let exit = daemon.stop_with_stats().expect("exit stats");
    let slow = &exit.raw["slow_path"];
    eprintln!(
        "[{name}] slow_path {slow}; pass_no_backend={} pass_fragment={}",
        exit.counter("pass_no_backend"),
        exit.counter("pass_fragment")
    );
    if slow["answered_503"] != 2 || slow["too_large_503"] != 1 {
        problems.push(format!(
            "expected answered_503 2 and too_large_503 1: {slow}"
        ));
    }
    verdict(name, &bed.dir.clone(), problems);
}

#[test]
fn no_backend_503_fills_in_rport_and_received_and_fits_a_datagram_ipv4() {
    no_backend_503("503-v4", Family::V4);
}

#[test]
fn no_backend_503_fills_in_rport_and_received_and_fits_a_datagram_ipv6() {
    no_backend_503("503-v6", Family::V6);
}

/// `sip-dispatch COMMAND ARGS` run as user `nobody` against the bed's control socket.
fn cli_as_nobody(bed: &Bed, command: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bed.binary)
        .arg(command)
        .arg(format!("--control={}", bed.control.display()))
        .args(args)
        .output()
        .expect("running setpriv")
}

/// A non-root user cannot use the control socket: the file mode stops it, and where the
/// mode would let it through (a socket made world-writable by hand), the daemon checks
/// the peer's credentials and refuses in one line. Root is served throughout.
#[test]
fn control_socket_refuses_non_root_peers() {
    const NAME: &str = "control-peers";
    let bed = Bed::build(NAME, 1, Duration::from_secs(60));
    let daemon = bed.start_daemon(&bed.run_config(1));
    let mut problems = Vec::new();
    let mode = std::fs::metadata(&bed.control)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or(0);
    if mode != 0o600 {
        problems.push(format!("control socket mode {mode:o}, expected 600"));
    }
    let by_mode = cli_as_nobody(&bed, "stats", &["--json"]);
    let stderr = text(&by_mode.stderr);
    eprintln!(
        "[{NAME}] nobody, socket 0600: {} {stderr:?}",
        by_mode.status
    );
    if by_mode.status.success()
        || stderr.lines().count() != 1
        || !stderr.contains("permission denied")
    {
        problems.push(format!(
            "nobody on a 0600 socket: {} {stderr:?} {}",
            by_mode.status,
            text(&by_mode.stdout)
        ));
    }
    std::fs::set_permissions(
        &bed.control,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .expect("chmod 0666 on the control socket");
    let by_cred = cli_as_nobody(&bed, "stats", &["--json"]);
    let stderr = text(&by_cred.stderr);
    eprintln!(
        "[{NAME}] nobody, socket 0666: {} {stderr:?}",
        by_cred.status
    );
    if by_cred.status.success()
        || stderr.lines().count() != 1
        || !stderr.contains("refused: the control socket is for root only (you are uid 65534)")
    {
        problems.push(format!(
            "nobody on a 0666 socket: {} {stderr:?} {}",
            by_cred.status,
            text(&by_cred.stdout)
        ));
    }
    // The refused peers changed nothing, and root is still served.
    let stats = bed.cli_json(&["stats", "--json"]);
    if stats["backends"].as_array().map(Vec::len) != Some(1) {
        problems.push(format!("root's stats after the refusals: {stats}"));
    }
    drop(daemon);
    verdict(NAME, &bed.dir.clone(), problems);
}

/// One HTTP GET on `stream`; the whole answer (the server closes after it).
fn http_get(mut stream: std::net::TcpStream) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: sd\r\n\r\n")?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out)
}

/// 200 connections that send nothing do not keep a scrape out: it is answered at once,
/// and so is each of them once it sends its request; a burst of 100 scrapes is answered
/// from the cached page.
#[test]
fn metrics_answer_a_scrape_past_200_idle_connections() {
    const NAME: &str = "metrics-idle";
    const IDLE: usize = 200;
    let bed = Bed::build(NAME, 1, Duration::from_secs(60));
    let metrics: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let mut run = bed.run_config(1);
    run.extra = vec!["--metrics".into(), metrics.to_string()];
    let daemon = bed.start_daemon(&run);
    let (idle, scrape, idle_then_asked, burst) = in_netns(&bed.disp_ns(), move || {
        let connect = || std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(5));
        let idle: Vec<_> = (0..IDLE)
            .map(|_| connect().expect("idle connection"))
            .collect();
        let started = Instant::now();
        let page = connect().and_then(http_get);
        let scrape = (started.elapsed(), page);
        // The idle ones were kept (not closed for the newcomer): they get pages too.
        let mut idle = idle.into_iter();
        let asked: Vec<_> = idle.by_ref().take(3).map(http_get).collect();
        let started = Instant::now();
        let burst_ok = (0..100)
            .filter(|_| {
                connect()
                    .and_then(http_get)
                    .is_ok_and(|p| p.starts_with("HTTP/1.1 200 OK"))
            })
            .count();
        (IDLE, scrape, asked, (burst_ok, started.elapsed()))
    });
    drop(daemon);
    let (took, page) = scrape;
    eprintln!(
        "[{NAME}] a scrape past {idle} idle connections took {took:?}; 100 scrapes: {} answered in {:?}",
        burst.0, burst.1
    );
    let mut problems = Vec::new();
    match &page {
        Ok(p) if p.starts_with("HTTP/1.1 200 OK") && p.contains("sip_dispatch_backend_up{") => {}
        other => problems.push(format!("the scrape: {other:?}")),
    }
    // Well inside the idle connections' 5 s request timeout: nobody had to time out.
    if took > Duration::from_secs(2) {
        problems.push(format!("the scrape took {took:?}"));
    }
    for (i, p) in idle_then_asked.iter().enumerate() {
        if !p.as_ref().is_ok_and(|p| p.starts_with("HTTP/1.1 200 OK")) {
            problems.push(format!("idle connection {i} asking later: {p:?}"));
        }
    }
    if burst.0 != 100 {
        problems.push(format!("{} of 100 scrapes of the burst answered", burst.0));
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// CPU time (user + system, clock ticks) process `pid` has used.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// With its file descriptors used up (RLIMIT_NOFILE lowered to what it holds plus a
/// few), connections to the metrics port make `accept` fail with EMFILE: the daemon backs
/// off instead of spinning, and serves scrapes again once the connections are gone.
#[test]
fn metrics_accept_backs_off_when_file_descriptors_run_out() {
    const NAME: &str = "metrics-emfile";
    const CONNECTIONS: usize = 100;
    let bed = Bed::build(NAME, 1, Duration::from_secs(60));
    let metrics: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let mut run = bed.run_config(1);
    run.extra = vec!["--metrics".into(), metrics.to_string()];
    let daemon = bed.start_daemon(&run);
    let pid = daemon.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .expect("the daemon's fds");
    let limit = open + 8;
    let out = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .expect("running prlimit");
    assert!(out.status.success(), "prlimit: {}", text(&out.stderr));

    let (conns, ticks, busy) = in_netns(&bed.disp_ns(), move || {
        let conns: Vec<_> = (0..CONNECTIONS)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(5)).ok()
            })
            .collect();
        // The kernel completes the handshakes; the daemon cannot accept most of them.
        let before = cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(2));
        let ticks = cpu_ticks(pid) - before;
        let busy = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        (conns, ticks, busy)
    });
    let connected = conns.len();
    drop(conns);
    // Back to normal: the accepted connections time out, the others were closed by us.
    let closed = Instant::now();
    let deadline = closed + Duration::from_secs(20);
    let scrape = loop {
        let page = in_netns(&bed.disp_ns(), move || {
            std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(5))
                .and_then(http_get)
        });
        if page
            .as_ref()
            .is_ok_and(|p| p.starts_with("HTTP/1.1 200 OK"))
            || Instant::now() > deadline
        {
            break page;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let recovered = closed.elapsed();
    let log = daemon.log().tail(400);
    drop(daemon);
    let emfile_lines = log
        .lines()
        .filter(|l| {
            l.contains("metrics listener: accept failed") && l.contains("Too many open files")
        })
        .count();
    let ticks_per_sec = procfs_ticks_per_second();
    eprintln!(
        "[{NAME}] fd limit {limit} ({open} open at start, {busy} with {connected} connections waiting); \
         CPU over 2 s of EMFILE: {ticks} ticks ({:.0} %); {emfile_lines} accept-failure log lines; \
         a scrape answered {:.2} s after the connections closed",
        ticks as f64 * 100.0 / (2.0 * ticks_per_sec as f64),
        recovered.as_secs_f64()
    );
    let mut problems = Vec::new();
    if emfile_lines == 0 {
        problems.push(format!(
            "the daemon never ran out of file descriptors:\n{log}"
        ));
    }
    // Spinning on accept would burn a whole core (2 s of ticks); backing off, a few.
    if ticks * 10 > 2 * ticks_per_sec {
        problems.push(format!(
            "{ticks} ticks of CPU in 2 s of EMFILE: the accept loop spins"
        ));
    }
    if !scrape
        .as_ref()
        .is_ok_and(|p| p.starts_with("HTTP/1.1 200 OK"))
    {
        problems.push(format!(
            "no scrape answered after the connections closed: {scrape:?}"
        ));
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// Clock ticks per second of /proc/PID/stat (sysconf(_SC_CLK_TCK)).
fn procfs_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).unwrap_or(100)
}
