//! Calls in progress survive every planned change (issue 11; README "Call affinity",
//! "Graceful drain", "What survives a restart"): SIPp calls held 6 s, with their ACK and
//! BYE sent to the VIP (SIPp's built-in `uac` scenario sends every request to the remote
//! address it was given, never to the Contact), at 20 calls/s, while the operator adds a
//! backend, drains one (`--wait`), changes a weight, one backend's health checks are
//! blocked for 5 s (a false "down"), another backend is removed and the daemon restarts
//! with `--keep-attached`.
//!
//! SIPp's UAS answers a BYE for a call it does not know with 200, so the UAC's success
//! does not show a split dialog: every Call-ID's requests are counted where they landed.
//! With affinity each call completes at exactly one backend, except the calls that were
//! in progress at the removed backend (`remove` ends affinity), computed from where
//! their messages landed and when the UAC sent them. A control run with `--affinity off`
//! (a drain and a weight change only) must split calls: it shows the test can fail (and
//! that the ACK and BYE really go through the dispatcher).
//!
//! Both runs share one timeline runner and one analysis; only the plan and the verdict
//! differ. Needs root, SIPp, nft and the sip-dispatch binary (`$SIP_DISPATCH_BIN`, else
//! `target/debug/sip-dispatch`): without them the tests fail, they never skip.
//! Run with `--test-threads=1`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;
use sip_dispatch_testbed::{
    bed::{
        BackgroundCli, BackgroundExit, Bed, BpfFs, listed, state, text, uac_problems, verdict,
        wait_list, wait_takeover,
    },
    dispatcher::Dispatcher,
    events::{DaemonLog, Moment, Timed},
    netns,
    nft::OptionsBlock,
    preflight,
    sipp::{Uac, UacCall, UacDialog, UacReport, UasReport, backends_by_call, exactly_one_backend},
};

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-affinity")
}

/// Calls per second the UAC places.
const RATE: u32 = 20;
/// How long each call is held between its ACK and its BYE (SIPp `-d`).
const HOLD: Duration = Duration::from_secs(6);
/// `--wait` must return within this window after it was started: the drained backend's
/// last calls end about one hold time later.
const DRAIN_WAIT_WITHIN: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(15));
/// ... and not before the drained backend's last BYE arrived there, but within this after
/// it (one census a second, one poll a second, margin for the load: as in drain.rs).
const DRAIN_WAIT_AFTER_LAST_BYE: f64 = 3.5;

/// One planned change (backends are numbered from 1, as in the bed).
#[derive(Clone, Copy, Debug)]
enum Change {
    /// `backends add bN`.
    Add(usize),
    /// `backends drain bN`; with `wait`, `--wait --timeout 30s` running in the background.
    Drain { backend: usize, wait: bool },
    /// `backends set-weight bN W`.
    SetWeight(usize, u32),
    /// bN's incoming OPTIONS (its health checks) dropped for this long, then let through.
    HealthFlap(usize, Duration),
    /// `backends remove bN`.
    Remove(usize),
    /// SIGTERM (with `--keep-attached` forwarding goes on), this long with no daemon,
    /// then the same daemon with the same arguments.
    Restart { gap: Duration },
}

impl Change {
    fn describe(&self) -> String {
        match *self {
            Change::Add(n) => format!("add b{n}"),
            Change::Drain { backend, wait } => {
                format!("drain b{backend}{}", if wait { " --wait" } else { "" })
            }
            Change::SetWeight(n, w) => format!("set-weight b{n} {w}"),
            Change::HealthFlap(n, d) => format!("health flap of b{n} for {d:?}"),
            Change::Remove(n) => format!("remove b{n}"),
            Change::Restart { gap } => format!("restart ({gap:?} without a daemon)"),
        }
    }
}

/// A run: the daemon's affinity mode, the calls, and the changes at their offsets from
/// the UAC's start.
struct Plan {
    name: &'static str,
    affinity: bool,
    /// Backends in the bed; the daemon starts with b1..b`configured`.
    backends: u8,
    configured: usize,
    calls: u32,
    changes: Vec<(Duration, Change)>,
}

/// The run: an add, a drain, a weight change, a health flap, a remove and a
/// restart while about 800 held calls flow.
fn affinity_plan() -> Plan {
    let s = Duration::from_secs;
    Plan {
        name: "affinity",
        affinity: true,
        backends: 5,
        configured: 4,
        calls: 800,
        changes: vec![
            (s(4), Change::Add(5)),
            (
                s(8),
                Change::Drain {
                    backend: 2,
                    wait: true,
                },
            ),
            (s(12), Change::SetWeight(3, 3)),
            (s(16), Change::HealthFlap(1, s(5))),
            (s(24), Change::Remove(4)),
            (s(28), Change::Restart { gap: s(2) }),
        ],
    }
}

/// The control run: a drain and a weight change, affinity off.
fn control_plan() -> Plan {
    let s = Duration::from_secs;
    Plan {
        name: "affinity-off",
        affinity: false,
        backends: 4,
        configured: 4,
        calls: 200,
        changes: vec![
            (
                s(3),
                Change::Drain {
                    backend: 2,
                    wait: false,
                },
            ),
            (s(6), Change::SetWeight(3, 3)),
        ],
    }
}

/// The daemon's flags for `plan`: pins on the test's bpf filesystem, `--keep-attached`,
/// fast health checks, a short call-idle, and affinity on or off.
fn daemon_flags(plan: &Plan, pins: &std::path::Path) -> Vec<String> {
    let mode = if plan.affinity { "on" } else { "off" };
    [
        "--keep-attached",
        "--pin-path",
        &pins.to_string_lossy(),
        "--health-interval",
        "500ms",
        "--down-after",
        "3",
        "--call-idle",
        "10s",
        "--affinity",
        mode,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The health flap as the harness saw it.
struct FlapSeen {
    backend: SocketAddr,
    /// The rule was in force from `installed` until `removing` (epoch seconds).
    installed: f64,
    removing: f64,
    down: Result<Timed<String>, String>,
    up: Result<Timed<String>, String>,
    dropped: Result<u64, String>,
}

/// What the timeline recorded (moments as epoch seconds, to compare with SIPp's logs).
#[derive(Default)]
struct Recorded {
    /// One line per change: planned and actual offset, how long it took, what it said.
    steps: Vec<String>,
    problems: Vec<String>,
    /// The drained backend and when the drain was in force (reply, or seen in the list).
    drained: Option<(SocketAddr, f64)>,
    drain_wait: Option<BackgroundCli>,
    added: Option<(SocketAddr, f64)>,
    /// The backend whose weight was set, and the weight.
    reweighted: Option<(SocketAddr, u32)>,
    flap: Option<FlapSeen>,
    /// The removed backend, when the request was sent and when it was answered.
    removed: Option<(SocketAddr, f64, f64)>,
    /// When the restarted daemon had taken over the link.
    restarted: Option<f64>,
    list_after_restart: Option<BTreeMap<SocketAddr, Value>>,
}

/// Everything a run measured.
struct Outcome {
    name: &'static str,
    calls: u32,
    rec: Recorded,
    uac: UacReport,
    per_call: BTreeMap<String, UacCall>,
    dialogs: BTreeMap<String, UacDialog>,
    reports: Vec<UasReport>,
    stats: Value,
    logs: Vec<DaemonLog>,
    /// The `drain --wait` command: when it started and how it ended.
    drain_wait: Option<(Instant, Result<BackgroundExit, String>)>,
    elapsed: Duration,
    dir: PathBuf,
}

/// Lets calls flow until `at` (a load phase of the plan, not a synchronisation).
fn run_until(uac: &mut Uac, at: Instant) {
    uac.run_for(at.saturating_duration_since(Instant::now()))
        .expect("calls flowing");
}

/// Blocks `backend`'s health checks for `length` (awaiting the daemon's "down" meanwhile),
/// lets them through again and awaits "up"; returns what was seen and a report note.
fn health_flap(
    log: &DaemonLog,
    uac: &mut Uac,
    backend_ns: &str,
    backend: SocketAddr,
    length: Duration,
) -> (FlapSeen, String) {
    let cursor = log.cursor();
    let block = OptionsBlock::install(backend_ns)
        .unwrap_or_else(|e| panic!("blocking the health checks of {backend}: {e:#}"));
    let installed = Moment::now();
    let down = log
        .wait_backend_state(cursor, length, backend, false)
        .map_err(|e| format!("{e:#}"));
    run_until(uac, installed.at + length);
    let removing = Moment::now();
    let dropped = block.remove().map_err(|e| format!("{e:#}"));
    let from = down.as_ref().map_or(cursor, Timed::next);
    let up = log
        .wait_backend_state(from, Duration::from_secs(10), backend, true)
        .map_err(|e| format!("{e:#}"));
    let after = |r: &Result<Timed<String>, String>| {
        r.as_ref().map_or("never".to_owned(), |t| {
            format!("{:.2} s", installed.secs_to(t.at))
        })
    };
    let note = format!(
        "down after {}, rule removed after {:.2} s, up after {}; packets dropped {:?}",
        after(&down),
        installed.secs_to(removing.at),
        after(&up),
        dropped
    );
    let seen = FlapSeen {
        backend,
        installed: installed.epoch(),
        removing: removing.epoch(),
        down,
        up,
        dropped,
    };
    (seen, note)
}

/// Builds the bed, starts the daemon and the UAC, applies the plan's changes at their
/// offsets, and collects what every party saw.
fn run(plan: &Plan) -> Outcome {
    let began = Instant::now();
    preflight::require_nft().expect("preflight");
    let mut bed = Bed::build(
        &workdir(),
        plan.name,
        plan.backends,
        Duration::from_secs(120),
    );
    let bpffs = BpfFs::mount(bed.topo.tag());
    let pins = bpffs.path().join(bed.iface());
    let mut run = bed.run_config(plan.configured);
    run.extra = daemon_flags(plan, &pins);
    let args = run.args();
    let addrs: Vec<SocketAddr> = (1..=usize::from(plan.backends))
        .map(|n| bed.backend(n))
        .collect();
    let b = |n: usize| addrs[n - 1];
    let (ns, dir) = (bed.disp_ns(), bed.dir.clone());
    let start = |label: &str| {
        Dispatcher::start(&bed.binary, &ns, &args, &dir, label)
            .unwrap_or_else(|e| panic!("starting {label}: {e:#}"))
    };

    let mut daemon = start("daemon-a");
    let mut logs = vec![daemon.log()];
    wait_list(
        &bed,
        Duration::from_secs(10),
        "the configured backends up",
        |l| (1..=plan.configured).all(|n| state(l, b(n)) == Some("up")),
    );
    let mut spec = bed.uac_spec(plan.calls, RATE);
    spec.extra = vec!["-d".into(), HOLD.as_millis().to_string()];
    spec.bound += HOLD;
    let mut uac = bed.start_uac(&spec, "uac");
    let t0 = uac.started();
    let mut rec = Recorded::default();

    for &(offset, change) in &plan.changes {
        run_until(&mut uac, t0 + offset);
        let at = Moment::now();
        let note = match change {
            Change::Add(n) => {
                let reply = bed.cli_json(&["backends", "add", &b(n).to_string(), "--json"]);
                rec.added = Some((b(n), Moment::now().epoch()));
                reply.to_string()
            }
            Change::Drain { backend, wait } => {
                let addr = b(backend).to_string();
                let note = if wait {
                    let args = ["backends", "drain", &addr, "--wait", "--timeout", "30s"];
                    let cli = bed.cli_background(&args, "drain-wait", Duration::from_secs(45));
                    rec.drain_wait = Some(cli);
                    // Its reply goes to the background command: the drain is in force at
                    // the latest when the list shows it.
                    wait_list(&bed, Duration::from_secs(10), "the drain", |l| {
                        state(l, b(backend)) == Some("drained")
                    })[&b(backend)]
                        .to_string()
                } else {
                    bed.cli_json(&["backends", "drain", &addr, "--json"])
                        .to_string()
                };
                rec.drained = Some((b(backend), Moment::now().epoch()));
                note
            }
            Change::SetWeight(n, w) => {
                let reply = bed.cli_json(&[
                    "backends",
                    "set-weight",
                    &b(n).to_string(),
                    &w.to_string(),
                    "--json",
                ]);
                rec.reweighted = Some((b(n), w));
                reply.to_string()
            }
            Change::HealthFlap(n, length) => {
                let backend_ns = bed
                    .topo
                    .backends()
                    .nth(n - 1)
                    .expect("backend host")
                    .ns_name()
                    .to_owned();
                let (seen, note) = health_flap(&daemon.log(), &mut uac, &backend_ns, b(n), length);
                rec.flap = Some(seen);
                note
            }
            Change::Remove(n) => {
                let sent = Moment::now().epoch();
                let reply = bed.cli_json(&["backends", "remove", &b(n).to_string(), "--json"]);
                rec.removed = Some((b(n), sent, Moment::now().epoch()));
                reply.to_string()
            }
            Change::Restart { gap } => {
                if let Err(e) = daemon.stop() {
                    rec.problems
                        .push(format!("the daemon before the restart: {e:#}"));
                }
                uac.run_for(gap).expect("calls flowing without a daemon");
                daemon = start("daemon-b");
                wait_takeover(&daemon, "daemon-b");
                logs.push(daemon.log());
                rec.restarted = Some(Moment::now().epoch());
                let list = listed(&bed.cli_json(&["backends", "list", "--json"]));
                let note = format!(
                    "took over {:.2} s after SIGTERM",
                    at.at.elapsed().as_secs_f64()
                );
                rec.list_after_restart = Some(list);
                note
            }
        };
        rec.steps.push(format!(
            "t={:>4.1} s (planned {:>2} s) {:<36} {:>5.2} s: {note}",
            (at.at - t0).as_secs_f64(),
            offset.as_secs(),
            change.describe(),
            at.at.elapsed().as_secs_f64(),
        ));
    }

    let uac = uac.finish().expect("UAC");
    let per_call = uac.calls().expect("UAC calls");
    let dialogs = uac.dialogs().expect("UAC dialogs");
    let stats = bed.cli_json(&["stats", "--json"]);
    if let Err(e) = daemon.stop() {
        rec.problems.push(format!("the last daemon: {e:#}"));
    }
    // --keep-attached left the program on the interface: detach it.
    let detach = netns::command(&ns, &bed.binary.to_string_lossy())
        .args(["detach", "--iface", &bed.iface(), "--pin-path"])
        .arg(&pins)
        .output()
        .expect("running detach");
    if !detach.status.success() {
        rec.problems
            .push(format!("detach failed: {}", text(&detach.stderr)));
    }
    let drain_wait = rec
        .drain_wait
        .take()
        .map(|cli| (cli.started, cli.finish().map_err(|e| format!("{e:#}"))));
    let reports = bed.stop_backends();
    drop(bpffs);
    Outcome {
        name: plan.name,
        calls: plan.calls,
        rec,
        uac,
        per_call,
        dialogs,
        reports,
        stats,
        logs,
        drain_wait,
        elapsed: began.elapsed(),
        dir: bed.dir.clone(),
    }
}

/// Where the calls landed.
struct Landing {
    by_call: BTreeMap<String, BTreeSet<SocketAddr>>,
    /// Calls whose requests reached more than one backend.
    split: Vec<String>,
    /// Calls in progress at the removed backend when it was removed: their first INVITE
    /// reached it, it was sent before the remove was answered, and their BYE was sent
    /// after the remove was sent (or never).
    removed_in_progress: BTreeSet<String>,
    /// Calls whose first INVITE was sent after the drain was in force, and which of them
    /// touched the drained backend (also those started after the restart).
    started_after_drain: usize,
    new_on_drained: Vec<String>,
    new_on_drained_after_restart: usize,
    started_after_restart: usize,
    /// Calls started after the add that the added backend took.
    new_on_added: usize,
}

fn landing(o: &Outcome) -> Landing {
    let by_call = backends_by_call(&o.reports);
    let split = o
        .per_call
        .keys()
        .filter(|id| by_call.get(*id).is_some_and(|s| s.len() > 1))
        .cloned()
        .collect();
    let mut removed_in_progress = BTreeSet::new();
    if let Some((addr, sent, replied)) = o.rec.removed {
        let report = o.reports.iter().find(|r| r.address == addr);
        let invited = |id: &str| {
            report.is_some_and(|r| {
                r.calls.contains(id) || r.incomplete.get(id).is_some_and(|m| m.invite)
            })
        };
        removed_in_progress = o
            .dialogs
            .iter()
            .filter(|(id, d)| {
                invited(id) && d.invite_at < replied && d.bye_at.is_none_or(|bye| bye > sent)
            })
            .map(|(id, _)| id.clone())
            .collect();
    }
    let touched = |id: &str, addr: SocketAddr| by_call.get(id).is_some_and(|s| s.contains(&addr));
    let (mut started_after_drain, mut new_on_drained, mut new_on_drained_after_restart) =
        (0, Vec::new(), 0);
    let restarted = o.rec.restarted.unwrap_or(f64::INFINITY);
    if let Some((addr, at)) = o.rec.drained {
        for (id, c) in o.per_call.iter().filter(|(_, c)| c.invite_at > at) {
            started_after_drain += 1;
            if touched(id, addr) {
                new_on_drained.push(id.clone());
                if c.invite_at > restarted {
                    new_on_drained_after_restart += 1;
                }
            }
        }
    }
    let started_after_restart = o
        .per_call
        .values()
        .filter(|c| c.invite_at > restarted)
        .count();
    let new_on_added = o.rec.added.map_or(0, |(addr, at)| {
        o.per_call
            .iter()
            .filter(|(id, c)| c.invite_at > at && touched(id, addr))
            .count()
    });
    Landing {
        by_call,
        split,
        removed_in_progress,
        started_after_drain,
        new_on_drained,
        new_on_drained_after_restart,
        started_after_restart,
        new_on_added,
    }
}

/// A counter of `stats --json`.
fn counter(stats: &Value, name: &str) -> Option<u64> {
    stats["counters"][name].as_u64()
}

/// What the run printed, for the log of the test and the closing note.
fn summary(o: &Outcome, l: &Landing) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "[{}] {:.1} s in all; UAC {} ok / {} failed of {} ({} retransmissions), {} calls \
         split across backends, {} of them in progress at the removed backend ({} such calls)",
        o.name,
        o.elapsed.as_secs_f64(),
        o.uac.successful,
        o.uac.failed,
        o.calls,
        o.uac.retransmissions,
        l.split.len(),
        l.split
            .iter()
            .filter(|id| l.removed_in_progress.contains(*id))
            .count(),
        l.removed_in_progress.len(),
    );
    for step in &o.rec.steps {
        let _ = writeln!(s, "  {step}");
    }
    let per_backend: Vec<String> = o
        .reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "b{} {}: {} complete, {} partial",
                i + 1,
                r.address,
                r.calls.len(),
                r.incomplete.len()
            )
        })
        .collect();
    let _ = writeln!(s, "  calls per backend: {}", per_backend.join("; "));
    let _ = writeln!(
        s,
        "  started after the drain: {} ({} reached the drained backend); after the restart: \
         {} ({} at the drained backend); the added backend took {} new calls",
        l.started_after_drain,
        l.new_on_drained.len(),
        l.started_after_restart,
        l.new_on_drained_after_restart,
        l.new_on_added
    );
    if let Some((started, exit)) = &o.drain_wait {
        let _ = match exit {
            Ok(e) => writeln!(
                s,
                "  drain --wait: {} after {:.2} s, {:.2} s after the drained backend's last \
                 BYE, printed {:?}",
                e.status,
                (e.ended - *started).as_secs_f64(),
                drain_wait_after_last_bye(o, e).unwrap_or(f64::NAN),
                e.stdout.iter().map(|l| l.text.as_str()).collect::<Vec<_>>()
            ),
            Err(e) => writeln!(s, "  drain --wait: {e}"),
        };
    }
    let counters: Vec<String> = [
        "affinity_hit",
        "affinity_miss",
        "affinity_insert",
        "affinity_overridden",
        "affinity_insert_failed",
        "xdp_tx",
    ]
    .iter()
    .map(|c| format!("{c}={:?}", counter(&o.stats, c)))
    .collect();
    let tables: Vec<usize> = o.logs.iter().map(|log| log.tables().len()).collect();
    let _ = write!(
        s,
        "  tables installed per daemon {tables:?}; stats: {}",
        counters.join(" ")
    );
    s
}

/// The last BYE that reached the drained backend (epoch seconds, by its message log).
fn last_bye_at_drained(o: &Outcome) -> Option<f64> {
    let (addr, _) = o.rec.drained?;
    let received = o
        .reports
        .iter()
        .find(|r| r.address == addr)?
        .received()
        .ok()?;
    received
        .iter()
        .filter(|r| r.method == "BYE")
        .map(|r| r.at)
        .reduce(f64::max)
}

/// Seconds from the drained backend's last BYE to the end of `drain --wait` (negative:
/// it returned before).
fn drain_wait_after_last_bye(o: &Outcome, exit: &BackgroundExit) -> Option<f64> {
    let now = Moment::now();
    let returned = now.epoch() + now.secs_to(exit.ended);
    Some(returned - last_bye_at_drained(o)?)
}

/// The health flap's own checks: the rule dropped the health checks and nothing else
/// (the backend got no OPTIONS but did get call requests while it stood), and the log
/// shows the backend going down, then up.
fn flap_problems(o: &Outcome, flap: &FlapSeen) -> Vec<String> {
    let mut p = Vec::new();
    if let Err(e) = &flap.down {
        p.push(format!(
            "{} never went down during the flap: {e}",
            flap.backend
        ));
    }
    if let Err(e) = &flap.up {
        p.push(format!(
            "{} never came back up after the flap: {e}",
            flap.backend
        ));
    }
    match &flap.dropped {
        Ok(0) => p.push("the flap's nft rule dropped nothing".to_owned()),
        Ok(_) => {}
        Err(e) => p.push(format!("reading the flap's nft counter: {e}")),
    }
    let report = o.reports.iter().find(|r| r.address == flap.backend);
    let received = report.map(UasReport::received).transpose();
    match received {
        Ok(Some(received)) => {
            // An OPTIONS in flight when the rule went in may still be logged just after.
            let during: Vec<_> = received
                .iter()
                .filter(|r| r.at > flap.installed + 0.05 && r.at < flap.removing)
                .collect();
            let options = during.iter().filter(|r| r.method == "OPTIONS").count();
            let others = during.len() - options;
            if options > 0 {
                p.push(format!(
                    "{} got {options} OPTIONS while the rule dropped them",
                    flap.backend
                ));
            }
            if others == 0 {
                p.push(format!(
                    "{} got no call request while its health checks were blocked: the rule \
                     dropped more than OPTIONS",
                    flap.backend
                ));
            }
        }
        Ok(None) => p.push(format!("no report of {}", flap.backend)),
        Err(e) => p.push(format!("reading {}'s messages: {e:#}", flap.backend)),
    }
    p
}

/// The verdict on the affinity run.
fn affinity_problems(o: &Outcome, l: &Landing) -> Vec<String> {
    let mut p = o.rec.problems.clone();
    p.extend(uac_problems(&o.uac, o.calls));
    if o.per_call.len() != o.calls as usize {
        p.push(format!(
            "UAC log has {} calls of {}",
            o.per_call.len(),
            o.calls
        ));
    }
    // Every call at exactly one backend, except those of the removed backend.
    let kept: BTreeMap<String, UacCall> = o
        .per_call
        .iter()
        .filter(|(id, _)| !l.removed_in_progress.contains(*id))
        .map(|(id, c)| (id.clone(), *c))
        .collect();
    p.extend(exactly_one_backend(&kept, &o.reports));
    // The drained backend takes no new call, before or after the restart.
    if !l.new_on_drained.is_empty() {
        p.push(format!(
            "{} of {} calls started after the drain reached the drained backend ({} of them \
             after the restart), e.g. {:?}",
            l.new_on_drained.len(),
            l.started_after_drain,
            l.new_on_drained_after_restart,
            &l.new_on_drained[..l.new_on_drained.len().min(3)]
        ));
    }
    if l.started_after_restart == 0 {
        p.push("no call started after the restart".to_owned());
    }
    if l.new_on_added == 0 {
        p.push("the added backend took no new call".to_owned());
    }
    match &o.rec.flap {
        Some(flap) => p.extend(flap_problems(o, flap)),
        None => p.push("no health flap happened".to_owned()),
    }
    // `drain --wait` returns with 0 once the drained backend's calls are done.
    match &o.drain_wait {
        Some((started, Ok(exit))) => {
            let took = exit.ended - *started;
            let (min, max) = DRAIN_WAIT_WITHIN;
            if exit.status.code() != Some(0) || took < min || took > max {
                p.push(format!(
                    "`drain --wait` ended with {} after {:.2} s, expected 0 within {min:?} to \
                     {max:?}; stdout {:?}; stderr {}",
                    exit.status,
                    took.as_secs_f64(),
                    exit.stdout.iter().map(|l| &l.text).collect::<Vec<_>>(),
                    exit.stderr
                ));
            }
        }
        Some((_, Err(e))) => p.push(format!("`drain --wait`: {e}")),
        None => p.push("no `drain --wait` ran".to_owned()),
    }
    // Not before the drained backend's last BYE arrived there, and soon after it.
    if let Some((_, Ok(exit))) = &o.drain_wait {
        match drain_wait_after_last_bye(o, exit) {
            Some(after) if after < 0.0 => p.push(format!(
                "`drain --wait` returned {:.2} s before the drained backend's last BYE",
                -after
            )),
            Some(after) if after > DRAIN_WAIT_AFTER_LAST_BYE => p.push(format!(
                "`drain --wait` returned {after:.2} s after the drained backend's last BYE, \
                 expected within {DRAIN_WAIT_AFTER_LAST_BYE} s"
            )),
            Some(_) => {}
            None => p.push("no BYE reached the drained backend".to_owned()),
        }
    }
    // After the restart the operator's drain and weight are back, from the CLI.
    match (&o.rec.list_after_restart, o.rec.drained, o.rec.reweighted) {
        (Some(list), Some((drained, _)), Some((reweighted, weight))) => {
            let field = |a: SocketAddr, f: &str| list.get(&a).map_or(Value::Null, |b| b[f].clone());
            for (addr, f, want) in [
                (drained, "state", Value::from("drained")),
                (drained, "state_from", Value::from("cli")),
                (reweighted, "weight", Value::from(weight)),
                (reweighted, "weight_from", Value::from("cli")),
            ] {
                if field(addr, f) != want {
                    p.push(format!(
                        "after the restart {addr} has {f} {}, expected {want}",
                        field(addr, f)
                    ));
                }
            }
        }
        _ => p.push("no restart after a drain and a weight change happened".to_owned()),
    }
    for (name, at_least) in [("affinity_hit", 1), ("affinity_overridden", 1)] {
        match counter(&o.stats, name) {
            Some(n) if n >= at_least => {}
            other => p.push(format!(
                "stats counter {name} is {other:?}, expected at least {at_least}: {}",
                o.stats["counters"]
            )),
        }
    }
    p
}

/// Calls in progress keep to their backend through an add, a drain (`--wait` returns
/// when its calls are done), a weight change, a false health "down" of a live backend, a
/// remove and a `--keep-attached` restart.
#[test]
fn affinity_keeps_calls_on_their_backend_through_changes_and_a_restart() {
    let outcome = run(&affinity_plan());
    let landing = landing(&outcome);
    eprintln!("{}", summary(&outcome, &landing));
    let problems = affinity_problems(&outcome, &landing);
    verdict(outcome.name, &outcome.dir, problems);
}

/// The control: without affinity a drain and a weight change split calls in progress
/// (their BYE reaches another backend), so the per-Call-ID count above can fail.
#[test]
fn without_affinity_a_drain_and_a_weight_change_split_calls() {
    let outcome = run(&control_plan());
    let landing = landing(&outcome);
    eprintln!("{}", summary(&outcome, &landing));
    let mut problems = outcome.rec.problems.clone();
    if outcome.per_call.len() != outcome.calls as usize {
        problems.push(format!(
            "UAC log has {} calls of {}",
            outcome.per_call.len(),
            outcome.calls
        ));
    }
    if landing.split.is_empty() {
        problems.push(format!(
            "no call split across backends without affinity: the test cannot see split \
             dialogs (calls per backend: {:?})",
            landing
                .by_call
                .values()
                .fold(BTreeMap::<&SocketAddr, usize>::new(), |mut m, s| {
                    for a in s {
                        *m.entry(a).or_default() += 1;
                    }
                    m
                })
        ));
    }
    verdict(outcome.name, &outcome.dir, problems);
}
