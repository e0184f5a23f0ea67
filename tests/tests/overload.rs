//! Load-aware dispatch (issue 16): backends that say they are overloaded (RFC 7339 `oc`
//! in their answers to the health probes) or answer them slowly (`--latency-aware`) get
//! fewer new calls; calls in progress stay where they are; malformed feedback changes
//! nothing and is counted.
//!
//! Real SIPp calls (the built-in `uac` scenario: INVITE, ACK and BYE all to the VIP) through
//! a real daemon in native XDP mode, to two scripted backends (`uas::ScriptedUas`) whose
//! answers to the probes the test changes while it runs. Every backend logs where and when
//! each Call-ID's requests arrived: the shares are counted there, per phase, and every call
//! must have its INVITE, ACK and BYE at one backend. Each change is awaited through
//! `backends list --json` (its `share` is the table in force), never slept on.
//!
//! Tolerances: Call-IDs hash to the table's slots like independent draws, so a phase of n
//! calls gives a backend whose table share is p a count share within
//! `SIGMAS` x sqrt(p(1-p)/n) of p (about +-6.2 points at 600 calls and p = 1/4).
//!
//! The 50 ms of extra delay comes from the backend (its scripted UAS holds everything it
//! sends): this machine kind's kernel has neither `sch_netem` nor `fq`, so `tc qdisc add
//! ... netem delay 50ms` fails with "Specified qdisc kind is unknown".
//!
//! Needs root, SIPp and the sip-dispatch binary (`$SIP_DISPATCH_BIN`, else
//! `target/debug/sip-dispatch`): without them the tests fail, they never skip.
//! Run with `--test-threads=1`.
use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use sip_dispatch_testbed::{
    bed::{Bed, listed, uac_problems, verdict, wait_list},
    uas::{Arrival, Landing, ProbeAnswer, landings},
};

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-overload")
}

/// Calls per second the UAC places.
const RATE: u32 = 100;
/// Standard deviations a share may be off (see the module documentation).
const SIGMAS: f64 = 3.5;
/// Fewer calls than this in a phase say too little about a share.
const MIN_PHASE_CALLS: usize = 300;
/// The daemon's probe interval: quick feedback and RTT samples.
const HEALTH_INTERVAL: &str = "100ms";
/// How long a change may take to show in `backends list`: the feedback's validity (1 s)
/// or the RTT smoothing, plus the limit of two table changes a second, with margin.
const CHANGE_WITHIN: Duration = Duration::from_secs(10);
const METRICS: &str = "127.0.0.1:9464";

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn num(list: &BTreeMap<SocketAddr, Value>, a: SocketAddr, key: &str) -> Option<f64> {
    list.get(&a)?.get(key)?.as_f64()
}

fn share(list: &BTreeMap<SocketAddr, Value>, a: SocketAddr) -> f64 {
    num(list, a, "share").unwrap_or(-1.0)
}

/// Whether `a` runs at its configured weight by every load field of `backends list`.
fn unloaded(list: &BTreeMap<SocketAddr, Value>, a: SocketAddr) -> bool {
    reports_no_load(list, a) && num(list, a, "effective_weight") == num(list, a, "weight")
}

/// Whether `a` is up and reports no load of its own (its effective weight may take what
/// an overloaded backend sheds).
fn reports_no_load(list: &BTreeMap<SocketAddr, Value>, a: SocketAddr) -> bool {
    let Some(b) = list.get(&a) else {
        return false;
    };
    b["state"] == "up"
        && b["overload"].is_null()
        && b["overload_expires_ms"].is_null()
        && b["latency_factor"].as_f64() == Some(1.0)
        && b["load_reason"] == ""
}

/// The value of series `name` whose labels include `backend="ADDR"` and every one of
/// `labels` (`key="value"` strings).
fn series(page: &str, name: &str, backend: SocketAddr, labels: &[&str]) -> Option<f64> {
    let b = format!("backend=\"{backend}\"");
    page.lines().find_map(|l| {
        let (head, value) = l.rsplit_once(' ')?;
        let set = head.strip_prefix(name)?.strip_prefix('{')?;
        (set.contains(&b) && labels.iter().all(|x| set.contains(x))).then(|| value.parse().ok())?
    })
}

/// Calls per backend among `calls` (by the backend where each completed).
struct Phase {
    name: &'static str,
    calls: usize,
    at: BTreeMap<SocketAddr, usize>,
}

impl Phase {
    /// The calls whose first INVITE arrived in `[from, to)` (epoch seconds).
    fn of(name: &'static str, land: &BTreeMap<String, Landing>, from: f64, to: f64) -> Phase {
        let mut at: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        let mut calls = 0;
        for l in land
            .values()
            .filter(|l| l.invite_at >= from && l.invite_at < to)
        {
            calls += 1;
            if let Some(b) = l.one_backend() {
                *at.entry(b).or_default() += 1;
            }
        }
        Phase { name, calls, at }
    }

    fn share(&self, a: SocketAddr) -> f64 {
        self.at.get(&a).copied().unwrap_or(0) as f64 / self.calls.max(1) as f64
    }

    /// The problem, if `a`'s share is not within the tolerance of `expected`.
    fn check(&self, a: SocketAddr, expected: f64) -> Option<String> {
        let tol = SIGMAS * (expected * (1.0 - expected) / self.calls.max(1) as f64).sqrt();
        let got = self.share(a);
        eprintln!(
            "[{}] {a}: {} of {} calls = {:.1} % (expected {:.1} +- {:.1} %)",
            self.name,
            self.at.get(&a).copied().unwrap_or(0),
            self.calls,
            got * 100.0,
            expected * 100.0,
            tol * 100.0
        );
        if self.calls < MIN_PHASE_CALLS {
            return Some(format!(
                "{}: only {} calls (at least {MIN_PHASE_CALLS} needed)",
                self.name, self.calls
            ));
        }
        ((got - expected).abs() > tol).then(|| {
            format!(
                "{}: {a} got {:.1} % of {} calls, expected {:.1} +- {:.1} %",
                self.name,
                got * 100.0,
                self.calls,
                expected * 100.0,
                tol * 100.0
            )
        })
    }
}

/// Every call the UAC placed has its INVITE, ACK and BYE at one backend, nothing
/// elsewhere; returns the problems.
fn no_split(uac_calls: &[String], land: &BTreeMap<String, Landing>) -> Vec<String> {
    let bad: Vec<(&String, Option<&Landing>)> = uac_calls
        .iter()
        .map(|id| (id, land.get(id)))
        .filter(|(_, l)| l.is_none_or(|l| l.one_backend().is_none()))
        .collect();
    if bad.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "{} of {} calls did not land whole at one backend, e.g. {:?}",
        bad.len(),
        uac_calls.len(),
        &bad[..bad.len().min(3)]
    )]
}

/// Stops the scripted backends and returns every request they saw.
fn all_arrivals(bed: &mut Bed) -> Vec<Arrival> {
    bed.scripted
        .drain(..)
        .flat_map(|u| u.stop().expect("a scripted backend"))
        .collect()
}

/// Starts the daemon on a two-backend scripted bed with `extra` flags and waits until
/// both are up at their configured weight with half the slots each.
fn start(bed: &Bed, extra: &[&str]) -> sip_dispatch_testbed::dispatcher::Dispatcher {
    let mut run = bed.run_config(2);
    run.extra = ["--health-interval", HEALTH_INTERVAL, "--metrics", METRICS]
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect();
    let daemon = bed.start_daemon(&run);
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    wait_list(bed, CHANGE_WITHIN, "both backends up and unloaded", |l| {
        [b1, b2]
            .iter()
            .all(|&b| unloaded(l, b) && (share(l, b) - 0.5).abs() < 0.01)
    });
    daemon
}

/// A backend answering its probes with `oc=50` gets half its share of new calls: a
/// quarter instead of half (RFC 7339: what it sheds goes to the other backend, whose
/// effective weight is then 1.5); at `oc=100` none, while it stays up and its calls
/// end there (like drain); after it stops, half again. Calls are held 3 s, so they run
/// across every switch at their backend, and none splits. The probe advertises `oc` and
/// `oc-algo="loss"`; the metrics show the overload and count the feedback as accepted;
/// feedback with an older `oc-seq` is counted as stale and ignored.
#[test]
fn oc_feedback_cuts_a_backends_share_of_new_calls() {
    const NAME: &str = "oc";
    const CALLS: u32 = 1600;
    let mut bed = Bed::build_scripted(&workdir(), NAME, 2);
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    let daemon = start(&bed, &[]);
    let mut problems = Vec::new();

    let via = bed.scripted[0].last_probe_via().unwrap_or_default();
    let params: Vec<&str> = via.split(';').skip(1).map(str::trim).collect();
    if !(params.contains(&"oc") && params.contains(&"oc-algo=\"loss\"")) {
        problems.push(format!("the probe's Via does not advertise oc: {via:?}"));
    }

    bed.scripted[0].answer_probes(ProbeAnswer::Overload {
        oc: 50,
        validity_ms: 1000,
    });
    let list = wait_list(&bed, CHANGE_WITHIN, "b1 at oc=50 with a quarter", |l| {
        num(l, b1, "overload") == Some(50.0) && (share(l, b1) - 0.25).abs() < 0.01
    });
    let b = &list[&b1];
    if b["effective_weight"].as_f64() != Some(0.5)
        || !b["overload_expires_ms"].is_u64()
        || b["load_reason"].as_str().is_none_or(str::is_empty)
        || !reports_no_load(&list, b2)
        || num(&list, b2, "effective_weight") != Some(1.5)
    {
        problems.push(format!("backends list at oc=50: {list:#?}"));
    }
    let page = bed.scrape_metrics(METRICS.parse().expect("metrics address"));
    let accepted = series(
        &page,
        "sip_dispatch_overload_feedback_total",
        b1,
        &["result=\"accepted\""],
    );
    let m = (
        series(&page, "sip_dispatch_backend_overload_percent", b1, &[]),
        series(&page, "sip_dispatch_backend_effective_weight", b1, &[]),
        series(&page, "sip_dispatch_backend_effective_weight", b2, &[]),
    );
    if m != (Some(50.0), Some(0.5), Some(1.5)) || accepted.is_none_or(|n| n < 1.0) {
        problems.push(format!(
            "metrics at oc=50: overload, effective weights {m:?}, accepted {accepted:?}"
        ));
    }

    // Feedback with an older sequence is stale: counted, ignored (b1 stays at oc=50
    // until that runs out, never 80).
    let stale = RefCell::new(Vec::new());
    bed.scripted[0].answer_probes(ProbeAnswer::Raw(vec![
        "oc=80;oc-validity=1000;oc-seq=1.00000;oc-algo=\"loss\"".into(),
    ]));
    wait_list(&bed, CHANGE_WITHIN, "stale feedback counted", |l| {
        if num(l, b1, "overload") == Some(80.0) {
            stale
                .borrow_mut()
                .push(format!("stale feedback accepted: {:#?}", l[&b1]));
        }
        num(l, b1, "oc_stale").is_some_and(|n| n >= 2.0)
    });
    problems.extend(stale.into_inner());
    bed.scripted[0].answer_probes(ProbeAnswer::Overload {
        oc: 50,
        validity_ms: 1000,
    });
    wait_list(&bed, CHANGE_WITHIN, "b1 at oc=50 again", |l| {
        num(l, b1, "overload") == Some(50.0) && (share(l, b1) - 0.25).abs() < 0.01
    });

    let mut spec = bed.uac_spec(CALLS, RATE);
    spec.extra = vec!["-d".into(), "3000".into()];
    let mut uac = bed.start_uac(&spec, "uac");
    let uac_started = now_epoch();
    // About 600 calls under oc=50: a load phase, not a synchronisation.
    uac.run_for(Duration::from_secs(6)).expect("the UAC runs");
    let full_from = now_epoch();
    bed.scripted[0].answer_probes(ProbeAnswer::Overload {
        oc: 100,
        validity_ms: 1000,
    });
    let list = wait_list(&bed, CHANGE_WITHIN, "b1 at oc=100 without slots", |l| {
        num(l, b1, "overload") == Some(100.0) && share(l, b1) == 0.0
    });
    let full = now_epoch();
    if list[&b1]["state"] != "up" || num(&list, b1, "effective_weight") != Some(0.0) {
        problems.push(format!("b1 at oc=100: {:#?}", list[&b1]));
    }
    // About 200 calls under oc=100.
    uac.run_for(Duration::from_secs(2)).expect("the UAC runs");
    let cleared = now_epoch();
    bed.scripted[0].answer_probes(ProbeAnswer::Echo);
    wait_list(&bed, CHANGE_WITHIN, "b1 back to half", |l| {
        unloaded(l, b1) && (share(l, b1) - 0.5).abs() < 0.01
    });
    let back = now_epoch();
    if let Err(e) = uac.check_running() {
        problems.push(format!("the UAC ended before b1 was back: {e:#}"));
    }
    let uac = uac.finish().expect("UAC");
    problems.extend(uac_problems(&uac, CALLS));
    let uac_calls: Vec<String> = uac.calls().expect("UAC calls").into_keys().collect();
    let land = landings(&all_arrivals(&mut bed));
    problems.extend(no_split(&uac_calls, &land));

    let half = Phase::of("oc=50", &land, uac_started, full_from);
    let none = Phase::of("oc=100", &land, full, cleared);
    let after = Phase::of("after oc", &land, back, f64::INFINITY);
    problems.extend(half.check(b1, 0.25));
    problems.extend(after.check(b1, 0.5));
    let at_b1 = none.at.get(&b1).copied().unwrap_or(0);
    eprintln!(
        "[oc=100] {b1}: {at_b1} of {} new calls; b1 at oc=100 {:.2} s after its probes said \
         so, back {:.2} s after they stopped",
        none.calls,
        full - full_from,
        back - cleared
    );
    if at_b1 != 0 || none.calls < 100 {
        problems.push(format!(
            "oc=100: {at_b1} of {} new calls reached b1 (none expected)",
            none.calls
        ));
    }
    // b1 keeps its calls at oc=100: calls it took under oc=50 end there after oc=100 is
    // in force; and calls keep running across the switch back.
    let kept = land
        .values()
        .filter(|l| l.one_backend() == Some(b1) && l.invite_at < full_from)
        .filter(|l| l.bye_at.is_some_and(|t| t > full))
        .count();
    let across = land
        .values()
        .filter(|l| l.invite_at < cleared && l.bye_at.is_some_and(|t| t > back))
        .count();
    eprintln!(
        "[{NAME}] {kept} calls at b1 ended there after oc=100 was in force; {across} calls ran \
         across the switch back"
    );
    if kept == 0 || across == 0 {
        problems.push(format!(
            "{kept} calls at b1 across oc=100, {across} across the switch back (some expected)"
        ));
    }
    if let Err(e) = daemon.stop() {
        problems.push(format!("daemon: {e:#}"));
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// With `--latency-aware`, a backend whose answers come 50 ms late gets a latency factor
/// of at most 0.2 and less than a quarter of the new calls of two equal backends; without
/// the delay it is back at 1.0 and half. No call splits.
#[test]
fn latency_aware_shrinks_a_slow_backends_share() {
    const NAME: &str = "latency";
    const CALLS: u32 = 500;
    let mut bed = Bed::build_scripted(&workdir(), NAME, 2);
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    let daemon = start(&bed, &["--latency-aware"]);
    let mut problems = Vec::new();
    let list = wait_list(&bed, CHANGE_WITHIN, "b1's RTT baseline", |l| {
        num(l, b1, "rtt_baseline_ms").is_some()
    });
    let baseline = num(&list, b1, "rtt_baseline_ms");
    if baseline.is_none_or(|ms| !(0.0..5.0).contains(&ms)) {
        problems.push(format!("b1's RTT baseline on a veth: {baseline:?}"));
    }

    bed.scripted[0].set_delay(Duration::from_millis(50));
    let slowed = now_epoch();
    let list = wait_list(&bed, CHANGE_WITHIN, "b1's latency factor down", |l| {
        num(l, b1, "latency_factor").is_some_and(|f| f <= 0.2) && share(l, b1) < 0.2
    });
    eprintln!(
        "[{NAME}] 50 ms on b1: latency factor {:?}, effective weight {:?}, share {:.3} after \
         {:.2} s; reason {}",
        num(&list, b1, "latency_factor"),
        num(&list, b1, "effective_weight"),
        share(&list, b1),
        now_epoch() - slowed,
        list[&b1]["load_reason"]
    );
    if list[&b1]["load_reason"].as_str().is_none_or(str::is_empty) || !unloaded(&list, b2) {
        problems.push(format!("backends list with b1 slow: {list:#?}"));
    }
    let mut spec = bed.uac_spec(CALLS, RATE);
    spec.call_id = "%u-slow@%s".into();
    let slow_from = now_epoch();
    let uac = bed.start_uac(&spec, "uac-slow").finish().expect("UAC");
    problems.extend(uac_problems(&uac, CALLS));
    let mut uac_calls: Vec<String> = uac.calls().expect("UAC calls").into_keys().collect();
    let slow_to = now_epoch();

    bed.scripted[0].set_delay(Duration::ZERO);
    let fast = now_epoch();
    wait_list(&bed, CHANGE_WITHIN, "b1 back at full weight", |l| {
        unloaded(l, b1) && (share(l, b1) - 0.5).abs() < 0.01
    });
    eprintln!(
        "[{NAME}] b1 back {:.2} s after the delay ended",
        now_epoch() - fast
    );
    let fast_from = now_epoch();
    spec.call_id = "%u-fast@%s".into();
    let uac = bed.start_uac(&spec, "uac-fast").finish().expect("UAC");
    problems.extend(uac_problems(&uac, CALLS));
    uac_calls.extend(uac.calls().expect("UAC calls").into_keys());

    let land = landings(&all_arrivals(&mut bed));
    problems.extend(no_split(&uac_calls, &land));
    let slow = Phase::of("b1 slow", &land, slow_from, slow_to);
    let share_slow = slow.share(b1);
    eprintln!(
        "[{NAME}] b1 slow: {:.1} % of {} calls",
        share_slow * 100.0,
        slow.calls
    );
    if share_slow >= 0.25 || slow.calls < MIN_PHASE_CALLS {
        problems.push(format!(
            "b1 slow: {:.1} % of {} calls (less than 25 % expected)",
            share_slow * 100.0,
            slow.calls
        ));
    }
    problems.extend(Phase::of("b1 fast again", &land, fast_from, f64::INFINITY).check(b1, 0.5));
    if let Err(e) = daemon.stop() {
        problems.push(format!("daemon: {e:#}"));
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// Malformed `oc` values (out of range, not digits, another algorithm, the parameter
/// with two values) change no weight and are counted, each one in turn, in `backends
/// list` and the metrics; a bare `oc` echoed back (b2) is no feedback and not counted;
/// with all of them in turn the shares of new calls stay half and half.
#[test]
fn malformed_oc_values_change_nothing_and_are_counted() {
    const NAME: &str = "oc-malformed";
    const CALLS: u32 = 500;
    let mut bed = Bed::build_scripted(&workdir(), NAME, 2);
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    let daemon = start(&bed, &[]);
    let problems = RefCell::new(Vec::new());
    let malformed = |l: &BTreeMap<SocketAddr, Value>| num(l, b1, "oc_malformed").unwrap_or(0.0);
    // Every list seen while malformed feedback comes: nothing may change.
    let steady = |l: &BTreeMap<SocketAddr, Value>| {
        if !(unloaded(l, b1) && unloaded(l, b2) && (share(l, b1) - 0.5).abs() < 0.01) {
            problems
                .borrow_mut()
                .push(format!("a weight changed under malformed feedback: {l:#?}"));
        }
    };

    let variants = [
        "oc=150;oc-validity=1000;oc-algo=\"loss\"",
        "oc=5x;oc-validity=1000;oc-algo=\"loss\"",
        "oc=50;oc-validity=1000;oc-algo=\"rate\"",
        // Two different values (the same one twice, or our bare `oc` next to a value,
        // still means one thing: see the parser's unit tests).
        "oc=50;oc=60;oc-validity=1000;oc-algo=\"loss\"",
    ];
    for v in variants {
        let before = malformed(&listed(&bed.cli_json(&["backends", "list", "--json"])));
        bed.scripted[0].answer_probes(ProbeAnswer::Raw(vec![v.to_owned()]));
        let counted = format!("{v:?} counted as malformed");
        wait_list(&bed, CHANGE_WITHIN, &counted, |l| {
            steady(l);
            malformed(l) >= before + 2.0
        });
    }
    bed.scripted[0].answer_probes(ProbeAnswer::Raw(
        variants.iter().map(|v| (*v).to_owned()).collect(),
    ));
    let from = now_epoch();
    let mut uac = bed.start_uac(&bed.uac_spec(CALLS, RATE), "uac");
    // While the calls run, twice a second: still nothing changed.
    for _ in 0..40 {
        if uac.check_running().is_err() {
            break;
        }
        steady(&listed(&bed.cli_json(&["backends", "list", "--json"])));
        std::thread::sleep(Duration::from_millis(500));
    }
    let uac = uac.finish().expect("UAC");
    let mut problems = problems.into_inner();
    problems.extend(uac_problems(&uac, CALLS));

    let list = listed(&bed.cli_json(&["backends", "list", "--json"]));
    let page = bed.scrape_metrics(METRICS.parse().expect("metrics address"));
    let count = |a: SocketAddr, key: &str| num(&list, a, key).unwrap_or(-1.0);
    let metric = |a: SocketAddr, result: &str| {
        series(
            &page,
            "sip_dispatch_overload_feedback_total",
            a,
            &[&format!("result=\"{result}\"")],
        )
        .unwrap_or(0.0)
    };
    eprintln!(
        "[{NAME}] b1: {} malformed, {} stale in the list; metric malformed {}, accepted {}",
        count(b1, "oc_malformed"),
        count(b1, "oc_stale"),
        metric(b1, "malformed"),
        metric(b1, "accepted")
    );
    if count(b1, "oc_malformed") < 8.0
        || count(b1, "oc_stale") != 0.0
        || metric(b1, "malformed") < count(b1, "oc_malformed")
        || metric(b1, "accepted") != 0.0
    {
        problems.push(format!("b1's feedback counts: {:#?}", list[&b1]));
    }
    if count(b2, "oc_malformed") != 0.0 || metric(b2, "malformed") != 0.0 {
        problems.push(format!("b2's bare oc counted: {:#?}", list[&b2]));
    }
    let uac_calls: Vec<String> = uac.calls().expect("UAC calls").into_keys().collect();
    let land = landings(&all_arrivals(&mut bed));
    problems.extend(no_split(&uac_calls, &land));
    problems.extend(Phase::of("malformed oc", &land, from, f64::INFINITY).check(b1, 0.5));
    if let Err(e) = daemon.stop() {
        problems.push(format!("daemon: {e:#}"));
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// Every backend of the priority overloaded (both at `oc=50`): each keeps half its share
/// and the other half of the slots belongs to no backend (RFC 7339: what cannot go
/// elsewhere is rejected). `which` names no backend for those Call-IDs, and a request
/// with one of them gets a 503 from the slow path; a Call-ID with a backend is
/// forwarded to it.
#[test]
fn every_backend_overloaded_sheds_new_calls_with_503() {
    const NAME: &str = "oc-all";
    const PROBES: usize = 400;
    let mut bed = Bed::build_scripted(&workdir(), NAME, 2);
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    let daemon = start(&bed, &[]);
    let mut problems = Vec::new();
    for u in &bed.scripted {
        u.answer_probes(ProbeAnswer::Overload {
            oc: 50,
            validity_ms: 1000,
        });
    }
    let list = wait_list(&bed, CHANGE_WITHIN, "both at oc=50 with a quarter", |l| {
        [b1, b2]
            .iter()
            .all(|&b| num(l, b, "overload") == Some(50.0) && (share(l, b) - 0.25).abs() < 0.01)
    });
    for b in [b1, b2] {
        if num(&list, b, "effective_weight") != Some(0.5) {
            problems.push(format!("{b} at oc=50 of two: {:#?}", list[&b]));
        }
    }

    // Where Call-IDs go now: about half to no backend.
    let vip = bed.vip.to_string();
    let mut shed = Vec::new();
    let mut placed = Vec::new();
    for i in 0..PROBES {
        let call_id = format!("shed-{i}@198.18.0.10");
        let w = bed.cli_json(&["which", &call_id, "--service", &vip, "--json"]);
        match w["backend"].as_str() {
            None => shed.push(call_id),
            Some(b) => placed.push((call_id, b.to_owned())),
        }
    }
    let ratio = shed.len() as f64 / PROBES as f64;
    let tol = SIGMAS * (0.25 / PROBES as f64).sqrt();
    eprintln!(
        "[{NAME}] {} of {PROBES} Call-IDs go to no backend: {:.1} % (expected 50 +- {:.1} %)",
        shed.len(),
        ratio * 100.0,
        tol * 100.0
    );
    if (ratio - 0.5).abs() > tol {
        problems.push(format!("{} of {PROBES} Call-IDs shed", shed.len()));
    }

    // A request of a shed Call-ID is answered 503 by the slow path; one with a backend
    // reaches that backend.
    let client = SocketAddr::new(bed.topo.client().ip(sip_dispatch_testbed::Family::V4), 0);
    let sock = sip_dispatch_testbed::rawnet::in_netns(bed.topo.client().ns_name(), move || {
        std::net::UdpSocket::bind(client).expect("client socket")
    })
    .expect("a thread in the namespace");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout");
    let from = sock.local_addr().expect("client address");
    let invite = |call_id: &str| {
        format!(
            "INVITE sip:svc@{vip} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK-{i}\r\n\
             From: <sip:test@{from}>;tag=1\r\nTo: <sip:svc@{vip}>\r\nCall-ID: {call_id}\r\n\
             CSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
            i = call_id.len()
        )
    };
    if let Some(call_id) = shed.first() {
        sock.send_to(invite(call_id).as_bytes(), bed.vip)
            .expect("sending");
        let mut buf = vec![0u8; 4096];
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if buf[..n].starts_with(b"SIP/2.0 503 ") => {}
            other => problems.push(format!(
                "a shed Call-ID's INVITE: wanted a 503, got {:?}",
                other.map(|(n, a)| (String::from_utf8_lossy(&buf[..n]).into_owned(), a))
            )),
        }
    }
    if let Some((call_id, _)) = placed.first() {
        sock.send_to(invite(call_id).as_bytes(), bed.vip)
            .expect("sending");
        // The backend's answer (100 or 200) says the INVITE arrived.
        let mut buf = vec![0u8; 4096];
        match sock.recv_from(&mut buf) {
            Ok((n, _))
                if buf[..n].starts_with(b"SIP/2.0 1") || buf[..n].starts_with(b"SIP/2.0 2") => {}
            other => problems.push(format!(
                "a placed Call-ID's INVITE: wanted its backend's answer, got {:?}",
                other.map(|(n, a)| (String::from_utf8_lossy(&buf[..n]).into_owned(), a))
            )),
        }
    }
    drop(daemon);
    let arrivals = all_arrivals(&mut bed);
    let land = landings(&arrivals);
    if let Some(call_id) = shed.first()
        && land.contains_key(call_id)
    {
        problems.push(format!("shed Call-ID {call_id} reached a backend"));
    }
    if let Some((call_id, backend)) = placed.first() {
        let at: Vec<String> = land
            .get(call_id)
            .map(|l| l.backends.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        if at != [backend.clone()] {
            problems.push(format!(
                "{call_id}: `which` said {backend}, it reached {at:?}"
            ));
        }
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// Load that changes at every probe answer (10 a second) republishes the table at most
/// twice a second, and does republish.
#[test]
fn load_changes_republish_at_most_twice_a_second() {
    const NAME: &str = "oc-flap";
    const WATCH: Duration = Duration::from_secs(4);
    let bed = Bed::build_scripted(&workdir(), NAME, 2);
    let b1 = bed.backend(1);
    let daemon = start(&bed, &[]);
    let mut problems = Vec::new();
    bed.scripted[0].answer_probes(ProbeAnswer::Raw(
        [10, 20, 30, 40]
            .iter()
            .map(|oc| format!("oc={oc};oc-validity=1000;oc-algo=\"loss\""))
            .collect(),
    ));
    wait_list(&bed, CHANGE_WITHIN, "b1 overloaded", |l| {
        num(l, b1, "overload").is_some()
    });
    let generation = || {
        bed.cli_json(&["backends", "list", "--json"])["services"][0]["generation"]
            .as_u64()
            .unwrap_or(0)
    };
    let (g0, t0) = (generation(), std::time::Instant::now());
    // A window to count in: nothing to wait for.
    std::thread::sleep(WATCH);
    let (g1, took) = (generation(), t0.elapsed());
    let tables = g1.saturating_sub(g0);
    // Two a second, plus one that may have been due as the window opened.
    let most = (took.as_secs_f64() * 2.0).floor() as u64 + 1;
    eprintln!("[{NAME}] {tables} tables in {took:.1?} while b1's oc changed at every answer");
    if !(2..=most).contains(&tables) {
        problems.push(format!(
            "{tables} tables in {took:?} (wanted 2 to {most}) while the load changed 10 times a second"
        ));
    }
    drop(daemon);
    verdict(NAME, &bed.dir.clone(), problems);
}
