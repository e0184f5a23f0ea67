//! DNS answers that must not hurt the daemon (issue 10, "Input from peers"), served by a
//! real BIND 9 while SIPp calls flow through the XDP fast path:
//! - a record set whose only target is "." (RFC 2782: no service here) empties the
//!   name's backends without an error; the static backend takes the calls, and without
//!   one every INVITE gets a 503 from the slow path;
//! - a target whose address records disappear (its A/AAAA lookups fail) keeps its last
//!   known addresses: calls keep reaching it, and the table never changes;
//! - targets at 127.0.0.1, a multicast, a link-local address and the dispatcher's own
//!   addresses are refused address by address (logged), the others used;
//! - a record with port 0 is left out (logged once), the others used.
//!
//! The bed is the controller tests' one (tests/src/controller.rs): named at 198.18.0.53
//! serving `example.net` with a TTL of 2 s, `--dns-min-ttl 1`. Needs root, SIPp, named,
//! dig and the sip-dispatch binary (`$SIP_DISPATCH_BIN`, else `target/debug/sip-dispatch`):
//! without them the tests fail, they never skip. Run with `--test-threads=1`.
use std::{path::PathBuf, time::Duration};

use sip_dispatch_testbed::{
    controller::{
        ControllerBed, Outcome, SRV_NAME, Shares, Target, ZONE_TTL, place_calls, remove_logs,
        report, sorted, test_bed, tolerance_pp, verdict, wait_for_set,
    },
    dispatcher::{BackendArg, RunConfig},
    dns::Record,
    events::{DaemonLog, Event, Moment, TableEvent, Timed},
};

/// How long the daemon may take to publish a table or log a line the test waits for.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);
/// The SRV owner name inside the zone.
const SRV_OWNER: &str = "_sip._udp";

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-dns-answers")
}

/// The bed of test `name` with `hosts` backend hosts; the zone's SRV targets are b1 and
/// b2, both at priority 10 with weight 50.
fn two_target_bed(name: &str, hosts: u8) -> ControllerBed {
    test_bed(workdir(), name, |cfg| {
        cfg.hosts = hosts;
        cfg.targets = vec![Target::new(1, 10, 50), Target::new(2, 10, 50)];
    })
}

/// Starts the daemon with `run` and waits for its first table: b1 and b2 at priority 10.
fn start_daemon(bed: &mut ControllerBed, run: &RunConfig) -> (DaemonLog, Timed<TableEvent>) {
    let log = bed
        .start_daemon(run)
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    let first = wait_for_set(
        &log,
        0,
        EVENT_TIMEOUT,
        10,
        &[bed.backend(1), bed.backend(2)],
    );
    (log, first)
}

/// The `dns NAME records=.. backends=..` lines from line `from` on: (records, backends).
fn resolutions(log: &DaemonLog, from: usize) -> Vec<(u32, u32)> {
    log.events()
        .into_iter()
        .filter(|e| e.index >= from)
        .filter_map(|e| match e.event {
            Event::Dns {
                name,
                records,
                backends,
                ..
            } if name == SRV_NAME => Some((records, backends)),
            _ => None,
        })
        .collect()
}

fn dns_failures(out: &Outcome, from: usize) -> usize {
    out.events
        .iter()
        .filter(|e| e.index >= from)
        .filter(|e| matches!(&e.event, Event::DnsFailed { name, .. } if name == SRV_NAME))
        .count()
}

/// The zone goes from two targets to a lone "." target mid-run: the name then has no
/// backends (logged once, no `dns ... failed`, resolutions go on at the TTL), and the
/// static backend b3 (priority 30) takes every new call.
#[test]
fn dot_target_means_no_service_and_statics_take_over() {
    let name = "dot-target";
    let mut bed = two_target_bed(name, 3);
    let (b1, b2, b3) = (bed.backend(1), bed.backend(2), bed.backend(3));
    let mut run = bed.run_config().expect("run config");
    run.backends.push(BackendArg {
        address: b3,
        weight: 1,
        priority: Some(30),
    });
    let (log, first) = start_daemon(&mut bed, &run);

    let calls = 2400;
    let (started, uac) = place_calls(&bed, calls, Duration::from_secs(3));
    let cursor = log.cursor();
    let mut zone = bed.dns.zone().clone();
    zone.records.retain(|r| !matches!(r, Record::Srv { .. }));
    zone.srv(SRV_OWNER, 0, 0, 0, ".");
    let reload = bed.dns.reload(zone).expect("reload");
    let statics = wait_for_set(&log, cursor, EVENT_TIMEOUT, 30, &[b3]);
    let notice = log
        .wait_message(cursor, EVENT_TIMEOUT, &[SRV_NAME, "no service here"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let out = bed.finish(uac).unwrap_or_else(|e| panic!("{e:#}"));

    let before = Shares::of(out.steady(started.epoch(), reload.signalled.epoch()));
    let after = Shares::of(out.between(statics.epoch(), f64::INFINITY));
    let after_dot = resolutions(&log, statics.index);
    let notices = log.messages_with(&[SRV_NAME, "no service here"]);
    let failures = dns_failures(&out, cursor);
    report(
        name,
        format!(
            "first table generation {}; \".\" served {:.1} s into the run; static table {:.3} s \
             after the zone was served; notice: {:?}; {} resolution(s) after it, {:?}; \
             `dns ... failed` lines: {failures}",
            first.event.generation,
            started.secs_to(reload.served.at),
            reload.served.secs_to(statics.at),
            notice.event,
            after_dot.len(),
            after_dot
        ),
    );
    report(
        name,
        format!(
            "{} calls, {}; before the reload {} calls (b1 {}, b2 {}); after the static table \
             {} calls, {} at b3",
            out.calls.len(),
            out.failure_breakdown(),
            before.total,
            before.calls(b1),
            before.calls(b2),
            after.total,
            after.calls(b3)
        ),
    );

    let mut problems = out.basic_problems();
    problems.extend(before.problems(&[(b1, 50), (b2, 50)], tolerance_pp(before.total)));
    problems.extend(after.all_at(b3, "after the static table"));
    if after.total < 200 {
        problems.push(format!(
            "only {} calls after the static table: too few to judge",
            after.total
        ));
    }
    if failures != 0 {
        problems.push(format!(
            "{failures} `dns {SRV_NAME} failed` line(s) after \".\""
        ));
    }
    if notices.len() != 1 {
        problems.push(format!(
            "the \".\" notice was logged {} times, not once: {notices:?}",
            notices.len()
        ));
    }
    // The name keeps being resolved at its TTL, each time with no backends.
    if after_dot.len() < 2 || after_dot.iter().any(|&r| r != (0, 0)) {
        problems.push(format!(
            "resolutions after \".\" should be several, each records=0 backends=0: {after_dot:?}"
        ));
    }
    problems.extend(out.routing_problems(&[], 0.5));
    verdict(name, &out, &started, problems);
}

/// b2's A and AAAA records are removed mid-run while its SRV record stays: its address
/// lookups fail, and it keeps its last known addresses (logged once per family), so
/// the table never changes and b2 keeps its share. When the records come back the
/// daemon says so.
#[test]
fn failed_address_lookup_keeps_the_last_known_addresses() {
    let name = "stale-target";
    let mut bed = two_target_bed(name, 2);
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    let run = bed.run_config().expect("run config");
    let (log, first) = start_daemon(&mut bed, &run);
    let full_zone = bed.dns.zone().clone();

    let calls = 3000;
    let (started, mut uac) = place_calls(&bed, calls, Duration::from_secs(3));
    let cursor = log.cursor();
    let mut zone = full_zone.clone();
    zone.records
        .retain(|r| !matches!(r, Record::Addr { name, .. } if name == "b2"));
    let removed = bed.dns.reload(zone).expect("reload without b2's addresses");
    let stale = log
        .wait_message(
            cursor,
            EVENT_TIMEOUT,
            &[
                "target b2.example.net. A lookup failed",
                "keeping its last known",
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Several TTLs without b2's addresses while calls flow.
    uac.run_for(Duration::from_secs(3 * u64::from(ZONE_TTL)))
        .expect("calls flowing");
    let during = resolutions(&log, stale.index);
    let back_cursor = log.cursor();
    let restored = bed
        .dns
        .reload(full_zone)
        .expect("reload with b2's addresses");
    let again = log
        .wait_message(
            back_cursor,
            EVENT_TIMEOUT,
            &["target b2.example.net. A lookup answers again"],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    let out = bed.finish(uac).unwrap_or_else(|e| panic!("{e:#}"));

    let stale_lines = log.messages_with(&["target b2.example.net.", "lookup failed"]);
    let in_outage = Shares::of(out.between(removed.served.epoch(), restored.signalled.epoch()));
    let all = Shares::of(&out.calls);
    let failures = dns_failures(&out, cursor);
    report(
        name,
        format!(
            "b2's addresses gone {:.1} s into the run for {:.1} s; stale notice {:.3} s after \
             the zone was served: {:?}; {} resolution(s) in the outage (records, backends): \
             {during:?}; `answers again` {:.3} s after the zone reload was signalled; tables: {}",
            started.secs_to(removed.served.at),
            removed.served.secs_to(restored.served.at),
            removed.served.secs_to(stale.at),
            stale.event,
            during.len(),
            restored.signalled.secs_to(again.at),
            out.tables.len()
        ),
    );
    report(
        name,
        format!(
            "{} calls, {}; during the outage {} calls: b1 {}, b2 {}; in all:\n{}",
            out.calls.len(),
            out.failure_breakdown(),
            in_outage.total,
            in_outage.calls(b1),
            in_outage.calls(b2),
            all.render(&[(b1, 50), (b2, 50)])
        ),
    );

    let mut problems = out.basic_problems();
    if out.broken().count() != 0 || out.uac.successful != u64::from(calls) {
        problems.push(format!(
            "{}; UAC: {}",
            out.failure_breakdown(),
            out.uac.failure_summary()
        ));
    }
    if out.tables.len() != 1 || out.tables[0].event.event != first.event {
        problems.push(format!(
            "the table changed while b2's lookups failed ({} tables)",
            out.tables.len()
        ));
    }
    // One line per family for the whole outage, not one per resolution.
    if stale_lines.len() != 2 {
        problems.push(format!(
            "b2's failed lookups were logged {} times, not once per family: {stale_lines:?}",
            stale_lines.len()
        ));
    }
    if during.len() < 2 || during.iter().any(|&(_, backends)| backends != 4) {
        problems.push(format!(
            "resolutions in the outage should keep 4 addresses (b1 and b2, A and AAAA): {during:?}"
        ));
    }
    if failures != 0 {
        problems.push(format!("{failures} `dns {SRV_NAME} failed` line(s)"));
    }
    problems.extend(in_outage.problems(&[(b1, 50), (b2, 50)], tolerance_pp(in_outage.total)));
    problems.extend(all.problems(&[(b1, 50), (b2, 50)], tolerance_pp(all.total)));
    problems.extend(out.routing_problems(&[], 0.0));
    verdict(name, &out, &started, problems);
}

/// Targets whose addresses cannot be backends: 127.0.0.1, a multicast and a link-local
/// address, the dispatcher's own addresses (not its VIP), and a multicast address next to
/// b2's good one. Each is refused with one line naming the name, the target and the
/// address (not one per resolution); b1 and b2 take the calls 50/50.
#[test]
fn special_and_own_addresses_in_an_answer_are_refused() {
    let name = "refused-addresses";
    let mut bed = two_target_bed(name, 2);
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    let disp = bed.topology().dispatcher().expect("dispatcher");
    let (own4, own6) = (disp.ipv4.to_string(), disp.ipv6.to_string());
    let refused: Vec<(&str, String)> = vec![
        ("lo", "127.0.0.1".into()),
        ("mc", "224.0.0.1".into()),
        ("ll", "169.254.0.9".into()),
        ("self", own4.clone()),
        ("self", own6.clone()),
        ("b2", "239.1.1.1".into()),
    ];
    let mut zone = bed.dns.zone().clone();
    for target in ["lo", "mc", "ll", "self"] {
        zone.srv(SRV_OWNER, 10, 50, 5060, target);
    }
    for (target, address) in &refused {
        zone.host(target, &[address.parse().expect("an address")]);
    }
    bed.dns.reload(zone).expect("reload");
    let run = bed.run_config().expect("run config");
    let (log, first) = start_daemon(&mut bed, &run);

    let calls = 1600;
    let (started, uac) = place_calls(&bed, calls, Duration::ZERO);
    let out = bed.finish(uac).unwrap_or_else(|e| panic!("{e:#}"));
    let all = Shares::of(&out.calls);
    let lines: Vec<(String, Vec<String>)> = refused
        .iter()
        .map(|(target, address)| {
            let t = format!("target {target}.example.net.");
            let a = format!("address {address} refused");
            (
                format!("{target}/{address}"),
                log.messages_with(&[SRV_NAME, &t, &a]),
            )
        })
        .collect();
    let runs = resolutions(&log, 0);
    report(
        name,
        format!(
            "table {:?}; {} resolution(s) (records, backends): {runs:?}; refusal lines:\n    {}",
            first.event.backends,
            runs.len(),
            lines
                .iter()
                .map(|(what, l)| format!("{what}: {} x {:?}", l.len(), l.first()))
                .collect::<Vec<_>>()
                .join("\n    ")
        ),
    );
    report(
        name,
        format!(
            "{} calls, {}; shares:\n{}",
            out.calls.len(),
            out.failure_breakdown(),
            all.render(&[(b1, 50), (b2, 50)])
        ),
    );

    let mut problems = out.basic_problems();
    if out.broken().count() != 0 || out.uac.successful != u64::from(calls) {
        problems.push(format!(
            "{}; UAC: {}",
            out.failure_breakdown(),
            out.uac.failure_summary()
        ));
    }
    for t in &out.tables {
        if sorted(t.event.event.addresses()) != sorted(vec![b1, b2]) {
            problems.push(format!(
                "a table holds other backends than b1 and b2: {:?}",
                t.event.event.backends
            ));
        }
    }
    // Logged once, although the name is resolved again at every TTL.
    for (what, l) in &lines {
        if l.len() != 1 {
            problems.push(format!(
                "{what} refused {} times in the log: {l:?}",
                l.len()
            ));
        }
    }
    if runs.len() < 3 || runs.iter().any(|&(records, _)| records != 2) {
        problems.push(format!(
            "every resolution should keep exactly b1 and b2 (records=2): {runs:?}"
        ));
    }
    problems.extend(all.problems(&[(b1, 50), (b2, 50)], tolerance_pp(all.total)));
    problems.extend(out.routing_problems(&[], 0.0));
    verdict(name, &out, &started, problems);
}

/// Without a static backend, a lone "." leaves the service with nothing: an empty table
/// (priority none), and every INVITE gets a 503 from the slow path (at 4 calls/s, under
/// the per-source 503 rate limit of 5/s). The name keeps being resolved at its TTL, with
/// no `dns ... failed` line.
#[test]
fn dot_target_without_statics_answers_503() {
    let name = "dot-target-503";
    let mut bed = two_target_bed(name, 2);
    let run = bed.run_config().expect("run config");
    let (log, _) = start_daemon(&mut bed, &run);
    let cursor = log.cursor();
    let mut zone = bed.dns.zone().clone();
    zone.records.retain(|r| !matches!(r, Record::Srv { .. }));
    zone.srv(SRV_OWNER, 0, 0, 0, ".");
    let reload = bed.dns.reload(zone).expect("reload");
    let empty = log
        .wait_table(cursor, EVENT_TIMEOUT, "an empty table", |t| {
            t.priority.is_none() && t.backends.is_empty()
        })
        .unwrap_or_else(|e| panic!("{e:#}"));

    let calls = 24;
    let uac = bed.start_calls(calls, 4, "uac-503").expect("UAC");
    let started = Moment::now();
    let out = bed.finish(uac).unwrap_or_else(|e| panic!("{e:#}"));
    let answered_503 = out.exit_stats.raw["slow_path"]["answered_503"]
        .as_u64()
        .unwrap_or(0);
    let rate_limited = out.exit_stats.raw["slow_path"]["rate_limited_503"]
        .as_u64()
        .unwrap_or(0);
    let at_backends = Shares::of(&out.calls).total;
    let after_dot = resolutions(&log, empty.index);
    let failures = dns_failures(&out, cursor);
    report(
        name,
        format!(
            "empty table {:.3} s after the zone was served; {calls} calls: {}; 503s sent {answered_503}, \
             rate-limited {rate_limited}; calls completed at a backend: {at_backends}; \
             resolutions after \".\": {after_dot:?}; `dns ... failed` lines: {failures}",
            reload.served.secs_to(empty.at),
            out.uac.failure_summary()
        ),
    );
    let mut problems = Vec::new();
    if out.uac.created != u64::from(calls) || out.uac.successful != 0 {
        problems.push(format!(
            "every call should fail: {}",
            out.uac.failure_summary()
        ));
    }
    if answered_503 < u64::from(calls) {
        problems.push(format!(
            "{answered_503} 503s for {calls} INVITEs (slow path: {})",
            out.exit_stats.raw["slow_path"]
        ));
    }
    if at_backends != 0 {
        problems.push(format!("{at_backends} calls completed at a backend"));
    }
    if failures != 0 {
        problems.push(format!("{failures} `dns {SRV_NAME} failed` line(s)"));
    }
    if after_dot.len() < 2 || after_dot.iter().any(|&r| r != (0, 0)) {
        problems.push(format!(
            "resolutions after \".\" should be several, each records=0 backends=0: {after_dot:?}"
        ));
    }
    verdict(name, &out, &started, problems);
}

/// At start, a name whose only target is "." and no static backend: the daemon has
/// nothing to serve and refuses to start, saying why.
#[test]
fn start_with_only_a_dot_target_and_no_static_fails_saying_why() {
    let name = "dot-at-start";
    let mut bed = test_bed(workdir(), name, |cfg| {
        cfg.hosts = 1;
        cfg.targets = vec![];
    });
    let mut zone = bed.dns.zone().clone();
    zone.srv(SRV_OWNER, 0, 0, 0, ".");
    bed.dns.reload(zone).expect("reload");
    let run = bed.run_config().expect("run config");
    let (status, stderr) = bed
        .run_daemon_expecting_exit(&run, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    report(name, format!("exited {status}; last line: {last}"));
    assert!(
        !status.success(),
        "the daemon must not start without any backend"
    );
    assert!(
        last.contains("no backend known") && last.contains(SRV_NAME) && last.contains("\".\""),
        "the error names the SRV name and its \".\" target: {last}"
    );
    remove_logs(&bed.dir);
}

/// A record with port 0 beside b1's: b2's address with port 0 never becomes a backend.
/// The record is left out with one line naming the name and the target (not one per
/// resolution), the table holds b1 alone, and b1 takes every call.
#[test]
fn a_record_with_port_0_is_no_backend() {
    let name = "port-0-record";
    let mut bed = test_bed(workdir(), name, |cfg| {
        cfg.hosts = 2;
        cfg.targets = vec![Target::new(1, 10, 50)];
    });
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    let mut zone = bed.dns.zone().clone();
    zone.srv(SRV_OWNER, 10, 50, 0, "zero");
    zone.host("zero", &[b2.ip()]);
    bed.dns.reload(zone).expect("reload");
    let run = bed.run_config().expect("run config");
    let log = bed
        .start_daemon(&run)
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    let first = wait_for_set(&log, 0, EVENT_TIMEOUT, 10, &[b1]);

    let calls = 800;
    let (started, uac) = place_calls(&bed, calls, Duration::ZERO);
    let out = bed.finish(uac).unwrap_or_else(|e| panic!("{e:#}"));
    let all = Shares::of(&out.calls);
    let lines = log.messages_with(&[SRV_NAME, "target zero.example.net. has port 0: left out"]);
    let runs = resolutions(&log, 0);
    report(
        name,
        format!(
            "table {:?}; {} resolution(s) (records, backends): {runs:?}; port-0 lines: {} x {:?}",
            first.event.backends,
            runs.len(),
            lines.len(),
            lines.first()
        ),
    );
    report(
        name,
        format!(
            "{} calls, {}; shares:\n{}",
            out.calls.len(),
            out.failure_breakdown(),
            all.render(&[(b1, 100)])
        ),
    );

    let mut problems = out.basic_problems();
    if out.broken().count() != 0 || out.uac.successful != u64::from(calls) {
        problems.push(format!(
            "{}; UAC: {}",
            out.failure_breakdown(),
            out.uac.failure_summary()
        ));
    }
    for t in &out.tables {
        if t.event.event.addresses() != vec![b1] {
            problems.push(format!(
                "a table holds other backends than b1: {:?}",
                t.event.event.backends
            ));
        }
    }
    if lines.len() != 1 {
        problems.push(format!(
            "the port-0 record logged {} times: {lines:?}",
            lines.len()
        ));
    }
    // The zone's TTL is 2 s: the name was resolved again during the calls. (b1's
    // `backends` count its A and AAAA addresses.)
    if runs.len() < 2 || runs.iter().any(|&(records, _)| records != 1) {
        problems.push(format!(
            "every resolution should keep b1's record alone (records=1): {runs:?}"
        ));
    }
    if all.calls(b2) != 0 {
        problems.push(format!("{} calls reached b2", all.calls(b2)));
    }
    problems.extend(all.problems(&[(b1, 100)], tolerance_pp(all.total)));
    problems.extend(out.routing_problems(&[], 0.0));
    verdict(name, &out, &started, problems);
}
