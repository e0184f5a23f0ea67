//! A crash never stops forwarding (README "A daemon that crashes", "Restarts and
//! upgrades without a dropped call"): SIGKILL and SIGABRT of the daemon under SIPp load
//! leave the pinned link forwarding on the last tables and the next daemon adopts it;
//! daemons that cannot start (pin directory locked, a bad value, a late failure) leave
//! that link alone; a restart with the services in another order keeps each VIP's
//! service id. Every call's messages are counted at the backends (exactly one each).
//!
//! Each test builds its own namespaces and a bpf filesystem of its own for the pins.
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
    Family,
    bed::{Bed, BpfFs, text, uac_problems, verdict, wait_takeover},
    dispatcher::{self, Dispatcher, FailedStart},
    link, netns,
    sipp::{UacSpec, backends_by_call, exactly_one_backend},
};

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-crash")
}

/// The pins a daemon leaves: the link and every map of this build.
const PINS: [&str; 15] = [
    "link_v1",
    "sd_services_v1",
    "sd_tables_v2",
    "sd_backends_v1",
    "sd_bstats_v1",
    "sd_counters_v5",
    "sd_config_v1",
    "sd_txports_v1",
    "sd_scratch_v2",
    "sd_affinity_v1",
    "sd_bflags_v1",
    "sd_held_v1",
    "sd_encap_v1",
    "sd_ports_v1",
    "sd_nexthop_v1",
];

/// The names in the pin directory (empty if it is gone).
fn pins_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn missing_pins(dir: &Path) -> Vec<&'static str> {
    let present = pins_in(dir);
    PINS.into_iter().filter(|p| !present.contains(*p)).collect()
}

/// `/proc/sys/net/ipv4/conf/IFACE/forwarding` in the dispatcher's namespace.
fn forwarding(bed: &Bed) -> String {
    let path = format!("/proc/sys/net/ipv4/conf/{}/forwarding", bed.iface());
    netns::exec(&bed.disp_ns(), "cat", [path.as_str()])
        .expect("reading the forwarding sysctl")
        .trim()
        .to_owned()
}

fn prog_id(bed: &Bed) -> Option<u32> {
    link::xdp_prog_id(&bed.disp_ns(), &bed.iface()).expect("ip link")
}

/// The service id of each VIP in the pinned services map, read with bpftool.
fn pinned_service_ids(pins: &Path) -> BTreeMap<SocketAddr, u32> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pins.join("sd_services_v1"))
        .output()
        .expect("running bpftool");
    assert!(out.status.success(), "bpftool: {}", text(&out.stderr));
    let dump: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool printed no JSON ({e}): {}", text(&out.stdout)));
    dump.as_array()
        .expect("services dump is an array")
        .iter()
        .map(|e| {
            let key = &e["formatted"]["key"];
            // Address and port in network byte order, printed as host-order integers.
            let w = key["addr"][0].as_u64().expect("addr[0]") as u32;
            let port = u16::from_be(key["port"].as_u64().expect("port") as u16);
            let vip = SocketAddr::from((std::net::Ipv4Addr::from(w.to_ne_bytes()), port));
            let id = e["formatted"]["value"]["id"].as_u64().expect("id") as u32;
            (vip, id)
        })
        .collect()
}

/// The daemon's arguments with pins in `pins` (no --keep-attached: a crash must keep
/// forwarding without it).
fn pinned_args(bed: &Bed, pins: &Path) -> Vec<String> {
    let mut run = bed.run_config(3);
    run.extra = vec!["--pin-path".into(), pins.to_string_lossy().into_owned()];
    run.args()
}

/// How daemon A ends.
#[derive(Clone, Copy, Debug)]
enum Crash {
    /// The test sends this signal.
    Signal(i32),
    /// A panic in the controller task, injected (debug builds only) through
    /// `SIP_DISPATCH_TEST_PANIC_AFTER_MS`.
    Panic,
}

/// A crash of a daemon under load: forwarding goes on with the last table (no failed
/// call, each at exactly one backend), the link, its program, the pins and the
/// forwarding sysctl stay; the next daemon takes the link over with its own program,
/// and its clean stop (SIGTERM, no --keep-attached) detaches.
fn crash_under_load(name: &str, crash: Crash) {
    let calls = 1500;
    let mut bed = Bed::build(&workdir(), name, 3, Duration::from_secs(60));
    let bpffs = BpfFs::mount(bed.topo.tag());
    let pins = bpffs.path().join(bed.iface());
    let args = pinned_args(&bed, &pins);
    let (ns, dir) = (bed.disp_ns(), bed.dir.clone());
    let start = |label: &str| {
        Dispatcher::start(&bed.binary, &ns, &args, &dir, label)
            .unwrap_or_else(|e| panic!("starting {label}: {e:#}"))
    };
    let forwarding_before = forwarding(&bed);
    let mut problems = Vec::new();

    let a = match crash {
        Crash::Signal(_) => start("daemon-a"),
        Crash::Panic => {
            let mut with_env = vec![
                "SIP_DISPATCH_TEST_PANIC_AFTER_MS=3000".to_owned(),
                bed.binary.to_string_lossy().into_owned(),
            ];
            with_env.extend(args.iter().cloned());
            Dispatcher::start(Path::new("env"), &ns, &with_env, &dir, "daemon-a")
                .expect("starting daemon A")
        }
    };
    let prog_a = prog_id(&bed);
    let mut uac = bed.start_uac(&bed.uac_spec(calls, 100), "uac");
    match crash {
        Crash::Signal(signal) => {
            uac.run_for(Duration::from_secs(3)).expect("calls flowing");
            a.kill(signal).expect("the daemon ends by the signal");
        }
        Crash::Panic => {
            let log = a.log();
            let status = a
                .wait_exit(Duration::from_secs(15))
                .expect("the daemon ends after its panic");
            use std::os::unix::process::ExitStatusExt as _;
            if status.signal() != Some(libc::SIGABRT) {
                problems.push(format!(
                    "after the panic the daemon ended with {status}, not by SIGABRT"
                ));
            }
            let tail = log.tail(400);
            let panics: Vec<&str> = tail
                .lines()
                .filter(|l| l.contains("panic in thread"))
                .collect();
            match panics.as_slice() {
                [line]
                    if line.contains("injected by SIP_DISPATCH_TEST_PANIC_AFTER_MS")
                        && line.contains("aborting") => {}
                other => problems.push(format!(
                    "expected one panic line that names the panic and says aborting, got {other:?}"
                )),
            }
            if tail.contains("detached from") {
                problems.push("the panicking daemon logged `detached from`".to_owned());
            }
        }
    }
    let killed_at = Instant::now();

    let prog_after_crash = prog_id(&bed);
    if prog_after_crash.is_none() || prog_after_crash != prog_a {
        problems.push(format!(
            "XDP program after the crash: {prog_after_crash:?}, before: {prog_a:?} (expected the same)"
        ));
    }
    let missing = missing_pins(&pins);
    if !missing.is_empty() {
        problems.push(format!("pins gone after the crash: {missing:?}"));
    }
    let forwarding_after_crash = forwarding(&bed);
    if forwarding_after_crash != "1" {
        problems.push(format!(
            "forwarding is {forwarding_after_crash} after the crash, expected 1"
        ));
    }
    uac.run_for(Duration::from_secs(4))
        .expect("calls flowing without a daemon");

    let b = start("daemon-b");
    wait_takeover(&b, "daemon-b");
    let adopted_after = killed_at.elapsed();
    let prog_b = prog_id(&bed);
    if prog_b.is_none() || prog_b == prog_a {
        problems.push(format!(
            "XDP program under B: {prog_b:?}, under A: {prog_a:?} (expected a new one)"
        ));
    }
    uac.run_for(Duration::from_secs(3)).expect("calls flowing");
    let uac = uac.finish().expect("UAC");
    let per_call = uac.calls().expect("UAC calls");
    let b_out = b.stop();
    let reports = bed.stop_backends();

    problems.extend(uac_problems(&uac, calls));
    problems.extend(exactly_one_backend(&per_call, &reports));
    if per_call.len() != calls as usize {
        problems.push(format!("UAC log has {} calls of {calls}", per_call.len()));
    }
    match &b_out {
        Ok(out) if out.contains(dispatcher::EXIT_STATS_PREFIX) => {}
        other => problems.push(format!("daemon B did not stop cleanly: {other:?}")),
    }
    // B's clean stop without --keep-attached detached and removed the pins.
    if let Some(id) = prog_id(&bed) {
        problems.push(format!(
            "XDP program {id} still attached after B's clean stop"
        ));
    }
    let left = pins_in(&pins);
    if !left.is_empty() {
        problems.push(format!("pins left after B's clean stop: {left:?}"));
    }
    // B restores what it found at its start: the 1 A's crash left (what A found before
    // is lost with A; README "A daemon that crashes").
    let forwarding_end = forwarding(&bed);
    if forwarding_end != forwarding_after_crash {
        problems.push(format!(
            "forwarding {forwarding_end} after B's clean stop, {forwarding_after_crash} when B started"
        ));
    }
    eprintln!(
        "[{name}] {crash:?}: program {prog_a:?} kept after the crash, B ({prog_b:?}) \
         took over {:.2} s after it; forwarding {forwarding_before} before A, \
         {forwarding_after_crash} after the crash, {forwarding_end} at the end; UAC {} ok / {} failed of {calls}, {} retransmissions; \
         calls per backend {:?}",
        adopted_after.as_secs_f64(),
        uac.successful,
        uac.failed,
        uac.retransmissions,
        reports
            .iter()
            .map(|r| (r.address.to_string(), r.calls.len()))
            .collect::<Vec<_>>()
    );
    drop(bpffs);
    verdict(name, &bed.dir.clone(), problems);
}

#[test]
fn sigkill_under_load_leaves_forwarding_and_the_next_daemon_adopts() {
    crash_under_load("sigkill", Crash::Signal(libc::SIGKILL));
}

#[test]
fn sigabrt_under_load_leaves_forwarding_and_the_next_daemon_adopts() {
    crash_under_load("sigabrt", Crash::Signal(libc::SIGABRT));
}

/// A panic at run time (in the controller task, where the health-check panic
/// happened) aborts with one log line and does not run the detaching cleanup.
#[test]
fn a_panic_under_load_leaves_forwarding_and_the_next_daemon_adopts() {
    crash_under_load("panic", Crash::Panic);
}

/// `args` with the value after `flag` replaced.
fn with_value(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut out = args.to_vec();
    let i = out
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} not in {args:?}"));
    out[i + 1] = value.to_owned();
    out
}

/// The one error line of a failed start, checked to name `what`; its problems.
fn failed_start_problems(label: &str, failed: &FailedStart, what: &[&str]) -> Vec<String> {
    let mut p = Vec::new();
    if failed.status.success() {
        p.push(format!("{label} exited with success"));
    }
    match failed.errors.as_slice() {
        [line] => {
            for w in what {
                if !line.contains(w) {
                    p.push(format!("{label}: error line does not name {w:?}: {line}"));
                }
            }
        }
        lines => p.push(format!(
            "{label}: expected one error line, got {lines:?}; stderr:\n{}",
            failed.stderr
        )),
    }
    p
}

/// While daemon A forwards with pinned maps: a second daemon on the same pins is refused
/// (naming the directory and A's pid) and creates no key file. After A is killed,
/// daemons that cannot start (a bad value; a control socket that cannot be created,
/// which fails only after the XDP object is loaded against the pins, and creates no key
/// file; a state file that cannot be read) change nothing: the same program stays in the link and calls keep succeeding.
/// Then a good daemon B takes over; fresh starts that fail (before and at the link step,
/// where B holds the interface) remove the pins they made and no others, and leave B's
/// link alone.
#[test]
fn daemons_that_cannot_start_leave_the_pinned_link_alone() {
    const NAME: &str = "failed-start";
    let calls = 2000;
    let mut bed = Bed::build(&workdir(), NAME, 3, Duration::from_secs(60));
    let bpffs = BpfFs::mount(bed.topo.tag());
    let pins = bpffs.path().join(bed.iface());
    let args = pinned_args(&bed, &pins);
    let (ns, dir) = (bed.disp_ns(), bed.dir.clone());
    let mut problems = Vec::new();

    let a = Dispatcher::start(&bed.binary, &ns, &args, &dir, "daemon-a").expect("daemon A");
    let prog_a = prog_id(&bed);
    let mut uac = bed.start_uac(&bed.uac_spec(calls, 100), "uac");
    uac.run_for(Duration::from_secs(2)).expect("calls flowing");

    let check_untouched = |label: &str, problems: &mut Vec<String>| {
        let now = prog_id(&bed);
        if now.is_none() || now != prog_a {
            problems.push(format!(
                "after {label}: XDP program {now:?}, expected A's {prog_a:?}"
            ));
        }
        let missing = missing_pins(&pins);
        if !missing.is_empty() {
            problems.push(format!("after {label}: pins gone: {missing:?}"));
        }
    };

    // A second daemon on the same pins (its own control socket, so only the lock stops it).
    let other_control =
        dispatcher::control_socket(&format!("{}-2", bed.topo.tag())).expect("control socket path");
    let second = with_value(&args, "--control", &other_control.to_string_lossy());
    // A key file that does not exist yet: a refused start must not create it.
    let second_key = dir.join("second-key").join("hash-key");
    let second = with_value(&second, "--hash-key-file", &second_key.to_string_lossy());
    let failed = dispatcher::run_failing(&bed.binary, &ns, &second, &dir, "second-daemon")
        .expect("the second daemon");
    if second_key.exists() || second_key.parent().is_some_and(Path::exists) {
        problems.push(format!(
            "the daemon refused by the lock created {}",
            second_key.display()
        ));
    }
    let pid_a = format!("pid {}", a.pid());
    let pins_text = pins.to_string_lossy().into_owned();
    problems.extend(failed_start_problems(
        "second daemon",
        &failed,
        &[&pins_text, "locked", &pid_a],
    ));
    let second_error = failed.errors.first().cloned().unwrap_or_default();
    check_untouched("the second daemon", &mut problems);
    uac.run_for(Duration::from_secs(2)).expect("calls flowing");

    a.kill(libc::SIGKILL).expect("daemon A killed");
    uac.run_for(Duration::from_secs(1))
        .expect("calls flowing without a daemon");

    // A bad value.
    let mut bad_value = args.clone();
    let b1 = bed.backend(1).to_string();
    if let Some(i) = bad_value.iter().position(|a| a.starts_with(&b1)) {
        bad_value[i] = format!("{b1},weight=x");
    }
    let failed = dispatcher::run_failing(&bed.binary, &ns, &bad_value, &dir, "bad-value")
        .expect("the daemon with a bad value");
    problems.extend(failed_start_problems("bad value", &failed, &["weight=x"]));
    let bad_value_error = failed.errors.first().cloned().unwrap_or_default();
    check_untouched("a bad value", &mut problems);
    uac.run_for(Duration::from_secs(2)).expect("calls flowing");

    // A failure after the object is loaded against the pins (lock taken, maps opened).
    let late = with_value(&args, "--control", "/proc/sdt-no-such-dir/ctl.sock");
    let late_key = dir.join("late-key");
    let late = with_value(&late, "--hash-key-file", &late_key.to_string_lossy());
    let failed = dispatcher::run_failing(&bed.binary, &ns, &late, &dir, "late-failure")
        .expect("the daemon failing late");
    if late_key.exists() {
        problems.push(format!(
            "the daemon that failed before its take-over created {}",
            late_key.display()
        ));
    }
    if !failed.stderr.contains(
        "start failed before taking over: the pinned XDP link and its maps are left as they were",
    ) {
        problems.push(format!(
            "late failure: no log line saying the link was left as it was:\n{}",
            failed.stderr
        ));
    }
    problems.extend(failed_start_problems(
        "late failure",
        &failed,
        &["/proc/sdt-no-such-dir"],
    ));
    if !failed.stderr.contains("adopted the maps pinned in") {
        problems.push(format!(
            "late failure: it failed before loading against the pins:\n{}",
            failed.stderr
        ));
    }
    let late_error = failed.errors.first().cloned().unwrap_or_default();
    check_untouched("a late failure", &mut problems);
    uac.run_for(Duration::from_secs(2)).expect("calls flowing");

    // A state file this daemon cannot read (read under the pin lock, after the object
    // is loaded against the pins): refused with one line naming it, nothing changed.
    let bad_state = dir.join("bad-state.json");
    std::fs::write(&bad_state, "{\"version\":1,\"admin\":[]}").expect("writing the state file");
    let state_key = dir.join("state-key");
    let bad_state_args: Vec<String> =
        with_value(&args, "--hash-key-file", &state_key.to_string_lossy())
            .into_iter()
            .chain([
                "--state-file".to_owned(),
                bad_state.to_string_lossy().into_owned(),
            ])
            .collect();
    let failed = dispatcher::run_failing(&bed.binary, &ns, &bad_state_args, &dir, "bad-state")
        .expect("the daemon with a bad state file");
    let bad_state_text = format!("state file {}", bad_state.display());
    problems.extend(failed_start_problems(
        "bad state file",
        &failed,
        &[&bad_state_text, "malformed"],
    ));
    if !failed.stderr.contains(
        "start failed before taking over: the pinned XDP link and its maps are left as they were",
    ) {
        problems.push(format!(
            "bad state file: no log line saying the link was left as it was:\n{}",
            failed.stderr
        ));
    }
    if state_key.exists() {
        problems.push(format!(
            "the daemon refused for its state file created {}",
            state_key.display()
        ));
    }
    let bad_state_error = failed.errors.first().cloned().unwrap_or_default();
    check_untouched("a bad state file", &mut problems);

    let b = Dispatcher::start(&bed.binary, &ns, &args, &dir, "daemon-b").expect("daemon B");
    wait_takeover(&b, "daemon-b");
    let prog_b = prog_id(&bed);
    if prog_b.is_none() || prog_b == prog_a {
        problems.push(format!(
            "XDP program under B: {prog_b:?}, under A: {prog_a:?} (expected a new one)"
        ));
    }
    // A fresh start (no pins in its directory) that fails after loading removes the
    // map pins it made and leaves B's link alone.
    let fresh = bpffs.path().join("fresh");
    let fresh_args = with_value(
        &with_value(&args, "--pin-path", &fresh.to_string_lossy()),
        "--control",
        "/proc/sdt-no-such-dir/ctl.sock",
    );
    let failed = dispatcher::run_failing(&bed.binary, &ns, &fresh_args, &dir, "fresh-failure")
        .expect("the fresh daemon failing late");
    if failed.status.success() || failed.errors.len() != 1 {
        problems.push(format!(
            "fresh failure: expected one error line and a failure, got {:?} ({})",
            failed.errors, failed.status
        ));
    }
    let fresh_left = pins_in(&fresh);
    if !fresh_left.is_empty() {
        problems.push(format!("a failed fresh start left pins: {fresh_left:?}"));
    }
    if prog_id(&bed) != prog_b {
        problems.push(format!(
            "the failed fresh start changed the program in B's link: {:?}, B's {prog_b:?}",
            prog_id(&bed)
        ));
    }
    // A fresh start that gets through its whole take-over on its own maps and fails
    // only at the link step, for real: B's link holds the interface. (Its VIP has
    // another port: B's slow path holds the VIP's.)
    let other_port = SocketAddr::new(bed.vip.ip(), 5099).to_string();
    let fresh_control =
        dispatcher::control_socket(&format!("{}-3", bed.topo.tag())).expect("control socket path");
    let attach_args = with_value(
        &with_value(
            &with_value(&args, "--pin-path", &fresh.to_string_lossy()),
            "--control",
            &fresh_control.to_string_lossy(),
        ),
        "--vip",
        &other_port,
    );
    let failed = dispatcher::run_failing(&bed.binary, &ns, &attach_args, &dir, "attach-failure")
        .expect("the fresh daemon failing to attach");
    problems.extend(failed_start_problems(
        "attach failure",
        &failed,
        &["attaching XDP"],
    ));
    let attach_error = failed.errors.first().cloned().unwrap_or_default();
    let fresh_left = pins_in(&fresh);
    if !fresh_left.is_empty() {
        problems.push(format!(
            "a fresh start that failed at the link step left pins: {fresh_left:?}"
        ));
    }
    if prog_id(&bed) != prog_b {
        problems.push(format!(
            "the failed attach changed the program in B's link: {:?}, B's {prog_b:?}",
            prog_id(&bed)
        ));
    }
    // A start that found maps but no link keeps them: only the pins it made go.
    let leftover = bpffs.path().join("leftover");
    std::fs::create_dir_all(&leftover).expect("creating the leftover pin directory");
    let map = leftover.join("sd_config_v1");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&map)
        .args(["type", "array", "key", "4", "value", "16", "entries", "1"])
        .args(["name", "sd_config_v1"])
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        text(&out.stderr)
    );
    let leftover_args = with_value(
        &with_value(
            &with_value(&args, "--pin-path", &leftover.to_string_lossy()),
            "--control",
            "/proc/sdt-no-such-dir/ctl.sock",
        ),
        "--vip",
        &other_port,
    );
    let failed =
        dispatcher::run_failing(&bed.binary, &ns, &leftover_args, &dir, "leftover-failure")
            .expect("the daemon on leftover maps failing");
    problems.extend(failed_start_problems(
        "leftover maps",
        &failed,
        &["/proc/sdt-no-such-dir"],
    ));
    let kept = pins_in(&leftover);
    if kept != BTreeSet::from(["sd_config_v1".to_owned()]) {
        problems.push(format!(
            "a failed start on a leftover map should keep just it, left: {kept:?}"
        ));
    }
    let uac = uac.finish().expect("UAC");
    let per_call = uac.calls().expect("UAC calls");
    if let Err(e) = b.stop() {
        problems.push(format!("daemon B: {e:#}"));
    }
    let reports = bed.stop_backends();
    problems.extend(uac_problems(&uac, calls));
    problems.extend(exactly_one_backend(&per_call, &reports));
    eprintln!(
        "[{NAME}] program {prog_a:?} stayed through: {second_error:?}; {bad_value_error:?}; \
         {late_error:?}; {bad_state_error:?}; B took over with {prog_b:?} and stayed through {attach_error:?}; \
         UAC {} ok / {} failed of {calls}",
        uac.successful, uac.failed
    );
    drop(bpffs);
    verdict(NAME, &bed.dir.clone(), problems);
}

/// A config file with `iface`, native mode and one `[[service]]` per (VIP, backends).
fn write_services(bed: &Bed, path: &Path, services: &[(SocketAddr, Vec<SocketAddr>)]) {
    let mut text = format!("iface = \"{}\"\nxdp-mode = \"native\"\n", bed.iface());
    for (vip, backends) in services {
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        text.push_str(&format!(
            "\n[[service]]\nvip = \"{vip}\"\nbackends = [{}]\n",
            list.join(", ")
        ));
    }
    std::fs::write(path, text).expect("writing the config file");
}

/// Two services (VIP:5060 on b1, b2; VIP:5080 on b3) under load; a start configured with
/// service a only that fails at the link step leaves service b's entry (and its calls)
/// alone; a restart with the services listed in the other order keeps each VIP's id in
/// the pinned services map, and no call of either service lands on the other's backends.
#[test]
fn a_restart_with_reordered_services_keeps_each_service_id() {
    const NAME: &str = "service-ids";
    let calls = 800;
    let mut bed = Bed::build(&workdir(), NAME, 3, Duration::from_secs(60));
    let bpffs = BpfFs::mount(bed.topo.tag());
    let pins = bpffs.path().join(bed.iface());
    let (b1, b2, b3) = (bed.backend(1), bed.backend(2), bed.backend(3));
    let vip_a = bed.vip;
    let vip_b = SocketAddr::new(bed.vip.ip(), 5080);
    let config = bed.dir.join("services.toml");
    let service_a = (vip_a, vec![b1, b2]);
    let service_b = (vip_b, vec![b3]);
    write_services(&bed, &config, &[service_a.clone(), service_b.clone()]);
    let args = |keep: bool| {
        let mut a: Vec<String> = vec![
            "run".into(),
            "--config".into(),
            config.to_string_lossy().into(),
            "--pin-path".into(),
            pins.to_string_lossy().into(),
            "--control".into(),
            bed.control.to_string_lossy().into(),
            "--hash-key-file".into(),
            dispatcher::test_key_file().to_string_lossy().into(),
        ];
        if keep {
            a.push("--keep-attached".into());
        }
        a
    };
    let (ns, dir) = (bed.disp_ns(), bed.dir.clone());
    let mut problems = Vec::new();

    let first =
        Dispatcher::start(&bed.binary, &ns, &args(true), &dir, "daemon-1").expect("daemon 1");
    let ids_before = pinned_service_ids(&pins);
    let client = bed.topo.client().ip(Family::V4);
    let spec_a = UacSpec::calls(client, vip_a, calls, 80);
    let mut spec_b = UacSpec::calls(client, vip_b, calls, 80);
    spec_b.local_port = 5071;
    spec_b.call_id = "%u-svcb@%s".into();
    let mut uac_a = bed.start_uac(&spec_a, "uac-a");
    let mut uac_b = bed.start_uac(&spec_b, "uac-b");
    uac_a
        .run_for(Duration::from_secs(3))
        .expect("calls flowing");
    uac_b.check_running().expect("calls flowing");
    if let Err(e) = first.stop() {
        problems.push(format!("daemon 1: {e:#}"));
    }

    // A daemon configured with service a only that fails at the link step, after all its
    // map writes (a failure injected in debug builds): service b, which it would remove
    // only once the link is its own, keeps its entry, and its calls keep flowing.
    let only_a = bed.dir.join("only-a.toml");
    write_services(&bed, &only_a, std::slice::from_ref(&service_a));
    let mut failing = vec![
        "SIP_DISPATCH_TEST_FAIL_ATTACH=1".to_owned(),
        bed.binary.to_string_lossy().into_owned(),
    ];
    failing.extend(with_value(
        &args(false),
        "--config",
        &only_a.to_string_lossy(),
    ));
    let failed = dispatcher::run_failing(Path::new("env"), &ns, &failing, &dir, "fails-attaching")
        .expect("the daemon failing at the link step");
    problems.extend(failed_start_problems(
        "failure at the link step",
        &failed,
        &["SIP_DISPATCH_TEST_FAIL_ATTACH"],
    ));
    if !failed.stderr.contains(
        "start failed after taking over the maps: the pinned XDP link keeps its old program",
    ) {
        problems.push(format!(
            "failure at the link step: no log line saying how the link forwards now:\n{}",
            failed.stderr
        ));
    }
    let ids_after_failure = pinned_service_ids(&pins);
    if ids_after_failure != ids_before {
        problems.push(format!(
            "service ids after the failed start: {ids_after_failure:?}, before: {ids_before:?}"
        ));
    }
    uac_a
        .run_for(Duration::from_secs(1))
        .expect("calls flowing after the failed start");
    uac_b.check_running().expect("calls of service b flowing");

    write_services(&bed, &config, &[service_b, service_a]);
    let second =
        Dispatcher::start(&bed.binary, &ns, &args(false), &dir, "daemon-2").expect("daemon 2");
    wait_takeover(&second, "daemon-2");
    let ids_after = pinned_service_ids(&pins);
    let kept_log = second.log().tail(400);
    let uac_a = uac_a.finish().expect("UAC a");
    let uac_b = uac_b.finish().expect("UAC b");
    if let Err(e) = second.stop() {
        problems.push(format!("daemon 2: {e:#}"));
    }
    let reports = bed.stop_backends();

    let want_before = BTreeMap::from([(vip_a, 0), (vip_b, 1)]);
    if ids_before != want_before {
        problems.push(format!(
            "service ids under daemon 1: {ids_before:?}, expected {want_before:?}"
        ));
    }
    if ids_after != ids_before {
        problems.push(format!(
            "service ids after the reordered restart: {ids_after:?}, before: {ids_before:?}"
        ));
    }
    if !kept_log.contains(&format!("service {vip_a} keeps its id 0")) {
        problems.push(format!("daemon 2 did not log that {vip_a} keeps id 0"));
    }
    let by_call = backends_by_call(&reports);
    for (uac, allowed, label) in [
        (&uac_a, BTreeSet::from([b1, b2]), "service a"),
        (&uac_b, BTreeSet::from([b3]), "service b"),
    ] {
        let per_call = uac.calls().expect("UAC calls");
        problems.extend(uac_problems(uac, calls));
        problems.extend(exactly_one_backend(&per_call, &reports));
        let misrouted: Vec<_> = per_call
            .keys()
            .filter(|id| by_call.get(*id).is_some_and(|at| !at.is_subset(&allowed)))
            .collect();
        if !misrouted.is_empty() {
            problems.push(format!(
                "{label}: {} calls reached another service's backend, e.g. {:?}",
                misrouted.len(),
                &misrouted[..misrouted.len().min(3)]
            ));
        }
    }
    eprintln!(
        "[{NAME}] ids before {ids_before:?}, after a start that failed at the link step \
         {ids_after_failure:?}, after the reordered restart {ids_after:?}; \
         service a {} ok / {} failed, service b {} ok / {} failed of {calls} each; calls per \
         backend {:?}",
        uac_a.successful,
        uac_a.failed,
        uac_b.successful,
        uac_b.failed,
        reports
            .iter()
            .map(|r| (r.address.to_string(), r.calls.len()))
            .collect::<Vec<_>>()
    );
    drop(bpffs);
    verdict(NAME, &bed.dir.clone(), problems);
}

/// How daemon A ends in the operator-state test.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Sigkill,
    /// SIGTERM with `--keep-attached`: a clean stop that leaves forwarding on.
    SigtermKeepAttached,
}

/// The backends of the first service in `backends list --json`.
fn listed_now(bed: &Bed) -> BTreeMap<SocketAddr, Value> {
    sip_dispatch_testbed::bed::listed(&bed.cli_json(&["backends", "list", "--json"]))
}

/// The state file, parsed.
fn state_file(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

/// Operator state outlives the daemon (README "What survives a restart"): under SIPp
/// load, drain b1, set-weight b2 3 and add b4 by CLI; daemon A then ends (SIGKILL, or a
/// clean SIGTERM with --keep-attached) and B starts on the same pins and state file.
/// B lists b1 drained, b2 at weight 3 and b4, each from the CLI; no call started after
/// the drain reply reaches b1, before or after the restart; no call fails. A `reload`
/// then drops the weight override and the CLI-added backend, and the state file keeps
/// only the drain.
fn operator_state_survives(name: &str, ending: Ending) {
    let calls = 1500;
    let mut bed = Bed::build(&workdir(), name, 4, Duration::from_secs(60));
    let bpffs = BpfFs::mount(bed.topo.tag());
    let pins = bpffs.path().join(bed.iface());
    let mut args = pinned_args(&bed, &pins);
    if matches!(ending, Ending::SigtermKeepAttached) {
        args.push("--keep-attached".into());
    }
    let state_path = dispatcher::private_state_file(&bed.dir, &args);
    let (b1, b2, b3, b4) = (
        bed.backend(1),
        bed.backend(2),
        bed.backend(3),
        bed.backend(4),
    );
    let (ns, dir) = (bed.disp_ns(), bed.dir.clone());
    let start = |label: &str| {
        Dispatcher::start(&bed.binary, &ns, &args, &dir, label)
            .unwrap_or_else(|e| panic!("starting {label}: {e:#}"))
    };
    let mut problems = Vec::new();

    let a = start("daemon-a");
    sip_dispatch_testbed::bed::wait_list(&bed, Duration::from_secs(10), "b1..b3 up", |l| {
        [b1, b2, b3]
            .iter()
            .all(|&b| sip_dispatch_testbed::bed::state(l, b) == Some("up"))
    });
    let mut uac = bed.start_uac(&bed.uac_spec(calls, 100), "uac");
    uac.run_for(Duration::from_secs(1)).expect("calls flowing");
    let drain = bed.cli_json(&["backends", "drain", &b1.to_string(), "--json"]);
    // Every INVITE sent from here on was sent while the drain was in force.
    let drained_at = epoch_secs();
    let replies = [
        drain,
        bed.cli_json(&["backends", "set-weight", &b2.to_string(), "3", "--json"]),
        bed.cli_json(&["backends", "add", &b4.to_string(), "--json"]),
    ];
    for r in &replies {
        if r.get("warning").is_some() {
            problems.push(format!("a change was not saved: {r}"));
        }
    }
    let saved = state_file(&state_path);
    let expect_saved = serde_json::json!({
        "version": 1,
        "admin": {b1.to_string(): "drained"},
        "weights": {b2.to_string(): 3},
        "added": [{"service": bed.vip.to_string(), "address": b4.to_string(), "weight": 1, "priority": 0}],
        "removed": [],
    });
    if saved != expect_saved {
        problems.push(format!(
            "state file after the changes: {saved}, expected {expect_saved}"
        ));
    }
    uac.run_for(Duration::from_secs(2)).expect("calls flowing");

    match ending {
        Ending::Sigkill => a.kill(libc::SIGKILL).expect("daemon A ends by SIGKILL"),
        Ending::SigtermKeepAttached => {
            a.stop().expect("daemon A stops cleanly on SIGTERM");
        }
    }
    uac.run_for(Duration::from_secs(2))
        .expect("calls flowing without a daemon");
    let b = start("daemon-b");
    wait_takeover(&b, "daemon-b");
    let after_restart = listed_now(&bed);
    let field =
        |a: SocketAddr, f: &str| after_restart.get(&a).map_or(Value::Null, |b| b[f].clone());
    for (addr, f, want) in [
        (b1, "state", "drained"),
        (b1, "state_from", "cli"),
        (b2, "weight_from", "cli"),
        (b4, "added_by", "cli"),
        (b3, "added_by", "config"),
        (b3, "weight_from", "config"),
    ] {
        if field(addr, f) != want {
            problems.push(format!(
                "after the restart {addr} has {f} {}, expected {want:?}",
                field(addr, f)
            ));
        }
    }
    if field(b2, "weight") != 3 {
        problems.push(format!(
            "after the restart b2 has weight {}, expected 3",
            field(b2, "weight")
        ));
    }
    uac.run_for(Duration::from_secs(2)).expect("calls flowing");

    let reloaded = bed.cli_json(&["reload", "--json"]);
    let after_reload = listed_now(&bed);
    let saved_after_reload = state_file(&state_path);
    let expect_after_reload = serde_json::json!({
        "version": 1,
        "admin": {b1.to_string(): "drained"},
        "weights": {},
        "added": [],
        "removed": [],
    });
    if saved_after_reload != expect_after_reload {
        problems.push(format!(
            "state file after reload: {saved_after_reload}, expected {expect_after_reload}"
        ));
    }
    if after_reload.contains_key(&b4) {
        problems.push(format!("{b4} (added by the CLI) still listed after reload"));
    }
    let b2_after = after_reload.get(&b2).cloned().unwrap_or_default();
    if b2_after["weight"] != 1 || b2_after["weight_from"] != "config" {
        problems.push(format!(
            "b2 after reload: {b2_after}, expected weight 1 from config"
        ));
    }
    if sip_dispatch_testbed::bed::state(&after_reload, b1) != Some("drained") {
        problems.push(format!("b1 not drained after reload: {after_reload:?}"));
    }

    let uac = uac.finish().expect("UAC");
    let per_call = uac.calls().expect("UAC calls");
    let b_out = b.stop();
    let reports = bed.stop_backends();
    problems.extend(uac_problems(&uac, calls));
    if per_call.len() != calls as usize {
        problems.push(format!("UAC log has {} calls of {calls}", per_call.len()));
    }
    let by_call = backends_by_call(&reports);
    let started_after: Vec<&String> = per_call
        .iter()
        .filter(|(_, c)| c.invite_at > drained_at)
        .map(|(id, _)| id)
        .collect();
    let on_b1: Vec<&&String> = started_after
        .iter()
        .filter(|id| by_call.get(**id).is_some_and(|s| s.contains(&b1)))
        .collect();
    if !on_b1.is_empty() {
        problems.push(format!(
            "{} of {} calls started after the drain reply reached b1 {b1}, e.g. {:?}",
            on_b1.len(),
            started_after.len(),
            &on_b1[..on_b1.len().min(3)]
        ));
    }
    let mut started_after_per_backend: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for id in &started_after {
        for addr in by_call.get(*id).into_iter().flatten() {
            *started_after_per_backend.entry(*addr).or_default() += 1;
        }
    }
    if started_after_per_backend.get(&b4).copied().unwrap_or(0) == 0 {
        problems.push(format!("b4 {b4} (added by the CLI) took no call"));
    }
    match &b_out {
        Ok(out) if out.contains(dispatcher::EXIT_STATS_PREFIX) => {}
        other => problems.push(format!("daemon B did not stop cleanly: {other:?}")),
    }
    eprintln!(
        "[{name}] {ending:?}: UAC {} ok / {} failed of {calls}; {} calls started after the \
         drain reply, per backend {:?}; reload changes {}",
        uac.successful,
        uac.failed,
        started_after.len(),
        started_after_per_backend
            .iter()
            .map(|(a, n)| (a.to_string(), *n))
            .collect::<Vec<_>>(),
        reloaded["changes"]
    );
    drop(bpffs);
    verdict(name, &bed.dir.clone(), problems);
}

fn epoch_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

#[test]
fn operator_state_survives_sigkill_and_a_restart_on_the_same_pins() {
    operator_state_survives("state-sigkill", Ending::Sigkill);
}

#[test]
fn operator_state_survives_a_clean_stop_with_keep_attached() {
    operator_state_survives("state-keep", Ending::SigtermKeepAttached);
}
