//! Graceful drain (README "Graceful drain"): `backends list` counts the calls each
//! backend still holds, and `backends drain ADDR --wait` returns when the drained
//! backend's last call has ended, with the exit status saying how it ended; occupancy
//! in `stats` and the metrics; `call-idle` reloads and changes only the count.
//!
//! Real SIPp calls held 4 s, ACK and BYE through the VIP, a real daemon in native XDP
//! mode; when each call ended at each backend comes from the SIPp UAS message logs.
//!
//! Needs root, SIPp and the sip-dispatch binary (`$SIP_DISPATCH_BIN`, else
//! `target/debug/sip-dispatch`): without them the tests fail, they never skip.
//! Run with `--test-threads=1`.
use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use sip_dispatch_testbed::{
    bed::{Bed, listed, text, uac_problems, verdict, wait_list},
    sipp::{Received, exactly_one_backend},
};

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-drain")
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn calls(list: &std::collections::BTreeMap<SocketAddr, Value>, a: SocketAddr) -> Option<u64> {
    list.get(&a).and_then(|b| b["calls"].as_u64())
}

/// The CLI with `args`, as a child whose stdout lines arrive on the returned channel.
/// `backends drain ADDR --wait --timeout TIMEOUT` in the background.
fn drain_wait(
    bed: &Bed,
    addr: SocketAddr,
    timeout: &str,
) -> (std::process::Child, mpsc::Receiver<String>) {
    spawn_cli(
        bed,
        &[
            "backends",
            "drain",
            &addr.to_string(),
            "--wait",
            "--timeout",
            timeout,
        ],
    )
}

fn spawn_cli(bed: &Bed, args: &[&str]) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    all.insert(1, format!("--control={}", bed.control.display()));
    let mut child = Command::new(&bed.binary)
        .args(&all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the CLI");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits (bounded) for a child to exit; kills it (by its own pid) if it does not.
fn wait_exit(child: &mut std::process::Child, within: Duration, what: &str) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the CLI") {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `N calls held` of a `drain --wait` progress line for `a`.
fn held_in(line: &str, a: SocketAddr) -> Option<u64> {
    line.strip_prefix(&format!("{a}: "))?
        .strip_suffix(" calls held")?
        .parse()
        .ok()
}

/// Calls held 4 s at 10 calls/s over three backends. `backends list` shows each holding
/// calls; `drain b1 --wait` ends with 3 when b1 is enabled meanwhile; `drain b2 --wait
/// --timeout 1s` ends with 2 while b2 holds calls; `drain b2 --wait --timeout 30s` ends
/// with 0 once b2's last BYE has passed, not before, and soon after. Every call completes
/// at exactly one backend, and b2 takes no new call after the drain.
#[test]
fn drain_wait_returns_when_the_drained_backends_calls_are_done() {
    const NAME: &str = "drain-wait";
    const CALLS: u32 = 150;
    let mut bed = Bed::build(&workdir(), NAME, 3, Duration::from_secs(90));
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    let metrics: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let mut run = bed.run_config(3);
    run.extra = vec!["--metrics".into(), metrics.to_string()];
    let daemon = bed.start_daemon(&run);
    wait_list(&bed, Duration::from_secs(10), "three backends up", |l| {
        l.len() == 3 && l.values().all(|b| b["state"] == "up")
    });
    let idle = listed(&bed.cli_json(&["backends", "list", "--json"]));
    assert!(
        idle.values().all(|b| b["calls"] == 0),
        "no call yet, yet: {idle:#?}"
    );

    // Errors exit 1 (2 and 3 have their meanings): a bad address, an unknown backend.
    for (args, says) in [
        (
            ["backends", "drain", "198.18.0.29", "--wait"],
            "invalid address",
        ),
        (
            ["backends", "drain", "198.18.0.29:5060", "--wait"],
            "unknown backend",
        ),
    ] {
        let out = bed.cli(&args);
        let err = text(&out.stderr);
        assert!(
            out.status.code() == Some(1) && err.contains(says) && err.lines().count() == 1,
            "{args:?}: {} {err:?}",
            out.status
        );
    }

    let mut spec = bed.uac_spec(CALLS, 10);
    spec.extra = vec!["-d".into(), "4000".into()];
    let mut uac = bed.start_uac(&spec, "uac");
    let mut problems = Vec::new();

    // Every backend holds calls; the table output has the column too.
    let list = wait_list(
        &bed,
        Duration::from_secs(10),
        "calls held at b1 and b2",
        |l| calls(l, b1).is_some_and(|n| n >= 3) && calls(l, b2).is_some_and(|n| n >= 3),
    );
    let held_b2 = calls(&list, b2).unwrap_or(0);
    let table = text(&bed.cli(&["backends", "list"]).stdout);
    assert!(
        table.lines().nth(1).is_some_and(|h| h.contains("calls")),
        "{table}"
    );
    let stats = bed.cli_json(&["stats", "--json"]);
    let entries = stats["affinity_entries"].as_u64().unwrap_or(0);
    assert!(entries >= 6, "affinity_entries {entries}: {stats}");
    assert_eq!(stats["affinity_capacity"], 262_144, "{stats}");
    let page = bed.scrape_metrics(metrics);
    let gauge = |name: &str| -> Option<u64> {
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
    };
    assert!(
        gauge("sip_dispatch_affinity_entries").is_some_and(|n| n >= 6)
            && gauge("sip_dispatch_affinity_capacity") == Some(262_144),
        "{page}"
    );

    // The drain of b1 ends meanwhile (enable): exit 3.
    let (mut wait_b1, lines_b1) =
        spawn_cli(&bed, &["backends", "drain", &b1.to_string(), "--wait"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_b1.recv_timeout(left) {
            Ok(l) if held_in(&l, b1).is_some() => break l,
            Ok(_) => {}
            Err(e) => {
                let _ = wait_b1.kill();
                let _ = wait_b1.wait();
                panic!("drain b1 --wait printed no count within 10 s ({e})");
            }
        }
    };
    let enabled = bed.cli(&["backends", "enable", &b1.to_string()]);
    assert!(
        enabled.status.success(),
        "enable: {}",
        text(&enabled.stderr)
    );
    let code = wait_exit(&mut wait_b1, Duration::from_secs(10), "drain b1 --wait");
    assert_eq!(
        code, 3,
        "drain b1 --wait after enable (first line {first:?})"
    );

    // b2 holds calls: a 1 s timeout ends with 2 (and b2 stays drained). The drain is in
    // force from its reply (`ok: ...`, printed once the tables are in force): no call
    // begun after that may reach b2.
    let started = Instant::now();
    let (mut timed, lines_timed) = drain_wait(&bed, b2, "1s");
    let drained_at = match lines_timed.recv_timeout(Duration::from_secs(5)) {
        Ok(l) if l.starts_with("ok") => now_epoch(),
        other => {
            let _ = timed.kill();
            let _ = timed.wait();
            panic!("drain b2 --timeout 1s: no `ok` reply first within 5 s: {other:?}");
        }
    };
    let code = wait_exit(&mut timed, Duration::from_secs(5), "drain b2 --timeout 1s");
    let took = started.elapsed();
    let mut err = String::new();
    if let Some(mut stderr) = timed.stderr.take() {
        std::io::Read::read_to_string(&mut stderr, &mut err).expect("reading the CLI's stderr");
    }
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("calls held after 1s"), "{err}");
    assert!(took < Duration::from_secs(5), "--timeout 1s took {took:?}");

    // Waiting for real: exit 0 after b2's last BYE.
    let started = Instant::now();
    let (mut wait_b2, lines_b2) = drain_wait(&bed, b2, "30s");
    let code = wait_exit(&mut wait_b2, Duration::from_secs(40), "drain b2 --wait");
    let returned_at = now_epoch();
    let waited = started.elapsed();
    let counts: Vec<u64> = lines_b2
        .try_iter()
        .filter_map(|l| held_in(&l, b2))
        .collect();
    assert_eq!(code, 0, "drain b2 --wait: counts {counts:?}");
    if let Err(e) = uac.check_running() {
        problems.push(format!("the UAC ended before the drain was done: {e:#}"));
    }

    let uac = uac.finish().expect("UAC");
    problems.extend(uac_problems(&uac, CALLS));
    let uac_calls = uac.calls().expect("UAC calls");
    let reports = bed.stop_backends();
    problems.extend(exactly_one_backend(&uac_calls, &reports));
    let received: Vec<Received> = reports
        .iter()
        .find(|r| r.address == b2)
        .expect("b2's report")
        .received()
        .expect("b2's message log");
    let stopped = daemon.stop();
    if let Err(e) = stopped {
        problems.push(format!("daemon: {e:#}"));
    }

    let last_bye = received
        .iter()
        .filter(|r| r.method == "BYE")
        .map(|r| r.at)
        .fold(f64::NEG_INFINITY, f64::max);
    // New calls only: a retransmitted INVITE of an earlier call still follows its call.
    let mut first_invite: std::collections::BTreeMap<&str, f64> = Default::default();
    for r in received.iter().filter(|r| r.method == "INVITE") {
        first_invite.entry(&r.call_id).or_insert(r.at);
    }
    let late_invites: Vec<(&&str, &f64)> = first_invite
        .iter()
        .filter(|(_, at)| **at > drained_at)
        .collect();
    let started_after = uac_calls
        .values()
        .filter(|c| c.invite_at > drained_at)
        .count();
    eprintln!(
        "[{NAME}] b2 held {held_b2} calls; drain --wait printed {counts:?}, waited {waited:?}, \
         returned {:.2} s after b2's last BYE; {started_after} calls started after the drain \
         was in force, {} of them reached b2",
        returned_at - last_bye,
        late_invites.len()
    );
    if returned_at < last_bye {
        problems.push(format!(
            "drain --wait returned {:.2} s before b2's last BYE",
            last_bye - returned_at
        ));
    }
    // One census a second, one poll a second: within 3 s, with margin for the load.
    if returned_at - last_bye > 3.5 {
        problems.push(format!(
            "drain --wait returned {:.2} s after b2's last BYE",
            returned_at - last_bye
        ));
    }
    if counts.first().is_none_or(|&n| n == 0) || counts.last() != Some(&0) {
        problems.push(format!(
            "drain --wait counts {counts:?}: from some calls down to 0"
        ));
    }
    if !late_invites.is_empty() {
        problems.push(format!(
            "{} new calls reached b2 after the drain, e.g. {:?}",
            late_invites.len(),
            late_invites[0]
        ));
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// With `--affinity off` the daemon cannot see calls: `backends list` has no `calls`,
/// the occupancy is 0, and `drain --wait` is refused with one line before it drains.
#[test]
fn drain_wait_is_refused_with_affinity_off() {
    const NAME: &str = "drain-off";
    let bed = Bed::build(&workdir(), NAME, 2, Duration::from_secs(60));
    let b2 = bed.backend(2);
    let mut run = bed.run_config(2);
    run.extra = vec!["--affinity".into(), "off".into()];
    let daemon = bed.start_daemon(&run);
    let list = wait_list(&bed, Duration::from_secs(10), "b2 up", |l| {
        l.get(&b2).is_some_and(|b| b["state"] == "up")
    });
    let mut problems = Vec::new();
    if list.values().any(|b| b.get("calls").is_some()) {
        problems.push(format!("calls listed with affinity off: {list:#?}"));
    }
    let out: Output = bed.cli(&["backends", "drain", &b2.to_string(), "--wait"]);
    let err = text(&out.stderr);
    if out.status.code() != Some(1) || !err.contains("--affinity off") || err.lines().count() != 1 {
        problems.push(format!("drain --wait: {} {err:?}", out.status));
    }
    let list = listed(&bed.cli_json(&["backends", "list", "--json"]));
    if list[&b2]["state"] != "up" {
        problems.push(format!(
            "the refused drain --wait drained b2: {:#?}",
            list[&b2]
        ));
    }
    let stats = bed.cli_json(&["stats", "--json"]);
    if stats["affinity_entries"] != 0 || stats["affinity_capacity"] != 0 {
        problems.push(format!(
            "occupancy with affinity off: {} of {}",
            stats["affinity_entries"], stats["affinity_capacity"]
        ));
    }
    if let Err(e) = daemon.stop() {
        problems.push(format!("daemon: {e:#}"));
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// The calls every backend of the first service holds, summed (None if one has no count).
fn calls_in_all(list: &std::collections::BTreeMap<SocketAddr, Value>) -> Option<u64> {
    list.values().map(|b| b["calls"].as_u64()).sum()
}

/// The calls in progress at `t` (epoch seconds) by the backends' message logs: the
/// INVITE arrived before `t`, the BYE had not arrived by then.
fn in_progress_at_backends(received: &[Received], t: f64) -> usize {
    let mut invited = std::collections::BTreeSet::new();
    let mut ended = std::collections::BTreeSet::new();
    for r in received.iter().filter(|r| r.at < t) {
        match r.method.as_str() {
            "INVITE" => invited.insert(&r.call_id),
            "BYE" => ended.insert(&r.call_id),
            _ => false,
        };
    }
    invited.difference(&ended).count()
}

/// `call-idle` is reloadable and changes only the count: 50 calls held 40 s all count
/// with 10m; after a reload to 10s none does once they have been silent for 10 s; after
/// a reload back to 10m all count again (their entries were there all along), and the
/// calls complete. A bad value is refused at reload with one line, changing nothing.
/// The counts expected are those of the calls in progress by the backends' logs at each
/// check: the 40 s hold outlasts the bounded waits, so that is all 50 unless the waits ran
/// late.
#[test]
fn call_idle_reloads_and_changes_only_the_count() {
    const NAME: &str = "call-idle";
    const CALLS: u32 = 50;
    let mut bed = Bed::build(&workdir(), NAME, 2, Duration::from_secs(120));
    let config = bed.dir.join("sip-dispatch.toml");
    let write = |idle: &str| {
        std::fs::write(&config, format!("call-idle = \"{idle}\"\n")).expect("writing the config")
    };
    write("10m");
    let mut run = bed.run_config(2);
    run.extra = vec!["--config".into(), config.to_string_lossy().into_owned()];
    let daemon = bed.start_daemon(&run);
    wait_list(&bed, Duration::from_secs(10), "two backends up", |l| {
        l.len() == 2 && l.values().all(|b| b["state"] == "up")
    });

    let mut spec = bed.uac_spec(CALLS, 10);
    // Held 40 s: longer than placing them (5 s) and the bounded waits below (15 s + 20 s).
    spec.extra = vec!["-d".into(), "40000".into()];
    spec.bound = Duration::from_secs(80);
    let uac = bed.start_uac(&spec, "uac");
    let mut problems = Vec::new();
    let all = |l: &std::collections::BTreeMap<SocketAddr, Value>| calls_in_all(l) == Some(50);
    wait_list(&bed, Duration::from_secs(15), "50 calls held", all);
    let all_held_at = now_epoch();

    let reload = |bed: &Bed| -> Vec<String> {
        let v = bed.cli_json(&["reload", "--json"]);
        v["changes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(String::from))
            .collect()
    };
    write("10s");
    let changes = reload(&bed);
    if !changes.iter().any(|c| c == "call-idle 10s (was 600s)") {
        problems.push(format!("reload to 10s: changes {changes:?}"));
    }
    let silent = Instant::now();
    wait_list(
        &bed,
        Duration::from_secs(20),
        "no call held after 10 s of silence",
        |l| calls_in_all(l) == Some(0),
    );
    eprintln!(
        "[{NAME}] 0 calls held {:?} after the reload to 10s",
        silent.elapsed()
    );

    write("5s");
    let out = bed.cli(&["reload"]);
    let err = text(&out.stderr);
    if out.status.success()
        || err.lines().count() != 1
        || !err.contains("call-idle \"5s\" is out of range: 10s to 24h")
    {
        problems.push(format!("reload of call-idle 5s: {} {err:?}", out.status));
    }

    write("10m");
    let changes = reload(&bed);
    if !changes.iter().any(|c| c == "call-idle 600s (was 10s)") {
        problems.push(format!("reload to 10m: changes {changes:?}"));
    }
    let list = listed(&bed.cli_json(&["backends", "list", "--json"]));
    let listed_at = now_epoch();

    let uac = uac.finish().expect("UAC");
    problems.extend(uac_problems(&uac, CALLS));
    let received: Vec<Received> = bed
        .stop_backends()
        .iter()
        .flat_map(|r| r.received().expect("a backend's message log"))
        .collect();
    let (at_first, at_last) = (
        in_progress_at_backends(&received, all_held_at),
        in_progress_at_backends(&received, listed_at),
    );
    eprintln!(
        "[{NAME}] in progress by the backends' logs: {at_first} when 50 were counted, \
         {at_last} at the last list ({:.1} s later); listed then: {:?}",
        listed_at - all_held_at,
        calls_in_all(&list)
    );
    if at_first != 50 {
        problems.push(format!(
            "50 calls counted while the backends' logs show {at_first} in progress"
        ));
    }
    if calls_in_all(&list) != Some(at_last as u64) {
        problems.push(format!(
            "after the reload back to 10m, {at_last} calls in progress by the backends' logs: \
             {list:#?}"
        ));
    }
    if let Err(e) = daemon.stop() {
        problems.push(format!("daemon: {e:#}"));
    }
    verdict(NAME, &bed.dir.clone(), problems);
}
