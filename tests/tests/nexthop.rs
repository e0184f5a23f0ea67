//! The next-hop cache (README "How dispatch works", `sd_nexthop_v1`) under SIPp load
//! through a real XDP dispatcher, in `rewrite` and in `l2dsr` (where the backends hold
//! the VIP, as in tests/tests/forwarding.rs):
//! - in steady state the fast path takes every backend's next hop from the cache: the
//!   `fib_fallback` counter does not move while thousands of packets are dispatched;
//! - backend b1 changes its MAC address (`ip link set dev X address NEW`); it announces
//!   the change the way a real host does (gratuitous ARP, `arp_notify=1`), the
//!   dispatcher's kernel updates its neighbour entry, and the cache follows within a
//!   second: the entry holds the new MAC, and b1's UAS (which only receives frames sent
//!   to its current MAC: others are dropped as PACKET_OTHERHOST) gets requests again
//!   within a second;
//! - in `rewrite`, the dispatcher's neighbour entry for b1 is deleted: the entry becomes
//!   invalid and packets take the FIB lookup (`fib_fallback` rises) instead of a stale
//!   entry, until the stack resolved b1 again and the entry is valid again. Not in
//!   `l2dsr`: there the FIB's miss passes the packet to the slow path, which drops it
//!   (`not_on_link`, README) until the kernel has resolved b1 again, so calls in
//!   progress would lose messages by design; the kernel tests cover l2dsr's fallback;
//! - in `rewrite`, a routing rule by source is added: the cache cannot follow it, so its
//!   entries go invalid and the fast path asks the FIB; they come back once it is gone;
//! - no call is lost: every Call-ID completes, at exactly one backend.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use sip_dispatch_testbed::{
    Family, XdpMode,
    bed::{Bed, BpfFs, listed, state, text, uac_problems, verdict, wait_list},
    dispatcher::{self, BackendArg, Dispatcher, RunConfig},
    dsr::{DsrBackend, prepare_backend},
    netns, preflight,
    responder::Responder,
    scenario,
    sipp::{self, UacSpec, Uas, UasReport, exactly_one_backend},
    topology::{Topology, TopologySpec},
};

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-nexthop")
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Calls and rate of the load: long enough for the three phases.
const CALLS: u32 = 1500;
const RATE: u32 = 100;
/// The MAC b1 takes.
const NEW_MAC: &str = "02:00:5e:10:00:b1";
/// How fast the cache must follow a change.
const FOLLOW_WITHIN: Duration = Duration::from_secs(1);

/// The fast path's counters (`stats`).
fn counters(control: &Path) -> Value {
    let v = dispatcher::control_request(control, &json!({"op": "stats"}))
        .unwrap_or_else(|e| panic!("stats: {e:#}"));
    v["result"]["counters"].clone()
}

fn counter(c: &Value, name: &str) -> u64 {
    c[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {c}"))
}

/// Polls `cond` every 10 ms until it holds or `within` passed; how long it took.
fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The valid entries of the pinned `sd_nexthop_v1`: (dmac, ifindex).
fn valid_next_hops(pins: &Path) -> Vec<(String, u64)> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pins.join("sd_nexthop_v1"))
        .output()
        .expect("running bpftool");
    assert!(out.status.success(), "bpftool: {}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool: not JSON ({e}): {}", text(&out.stdout)));
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|e| &e["formatted"]["value"])
        .filter(|e| e["flags"].as_u64().unwrap_or(0) & 1 != 0)
        .map(|e| (mac_text(&e["dmac"]), e["ifindex"].as_u64().unwrap_or(0)))
        .collect()
}

/// bpftool prints a `[u8; 6]` as numbers.
fn mac_text(v: &Value) -> String {
    v.as_array()
        .map(|bytes| {
            bytes
                .iter()
                .map(|b| format!("{:02x}", b.as_u64().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(":")
        })
        .unwrap_or_default()
}

fn sh(ns: &str, program: &str, args: &[&str]) -> String {
    netns::exec(ns, program, args).unwrap_or_else(|e| panic!("{program} {args:?} in {ns}: {e:#}"))
}

/// What the phases need to know of a bed whose daemon runs with its pins in `pins`.
struct Net<'a> {
    name: &'a str,
    control: &'a Path,
    pins: &'a Path,
    /// Backend 1: its own address, namespace and interface.
    b1: SocketAddr,
    b1_ns: String,
    b1_iface: String,
    disp_ns: String,
    disp_iface: String,
}

/// b1 announces a new MAC with a gratuitous ARP (as hosts do with arp_notify); its MAC
/// now.
fn prepare_b1(ns: &str, iface: &str) -> String {
    sh(
        ns,
        "sysctl",
        &["-qw", &format!("net.ipv4.conf.{iface}.arp_notify=1")],
    );
    sh(ns, "cat", &[&format!("/sys/class/net/{iface}/address")])
        .trim()
        .to_owned()
}

/// With the daemon running and both backends up, the UAC `start`ed: the steady window,
/// b1's MAC change, the deleted neighbour entry. Returns when b1's MAC changed.
/// What the test does to the dispatcher's neighbour entry of b1 after the MAC change.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NeighbourPhase {
    /// Delete it: the fast path must fall back to the FIB, then use the cache again.
    Delete,
    /// Leave it (l2dsr: the slow path drops what it cannot send to a known MAC).
    Keep,
}

fn phases(net: &Net, old_mac: &str, neighbour: NeighbourPhase, problems: &mut Vec<String>) -> f64 {
    let name = net.name;
    let pins = net.pins;
    // The health checks resolved both neighbours: the cache has both.
    if wait_for(Duration::from_secs(5), || valid_next_hops(pins).len() == 2).is_none() {
        problems.push(format!(
            "the cache never held 2 valid entries: {:?}",
            valid_next_hops(pins)
        ));
    }
    let tx = |c: &Value| counter(c, "xdp_tx") + counter(c, "xdp_redirect");

    // Steady state: a window of at least 400 dispatched packets.
    let c0 = counters(net.control);
    let mut c1 = c0.clone();
    wait_for(Duration::from_secs(10), || {
        c1 = counters(net.control);
        tx(&c1) >= tx(&c0) + 400
    });
    let steady_tx = tx(&c1) - tx(&c0);
    let steady_fallback = counter(&c1, "fib_fallback") - counter(&c0, "fib_fallback");
    eprintln!(
        "[{name}] steady state: {steady_tx} packets dispatched, {steady_fallback} FIB fallbacks"
    );
    if steady_tx < 400 {
        problems.push(format!(
            "only {steady_tx} packets dispatched in the steady window"
        ));
    }
    if steady_fallback != 0 {
        problems.push(format!(
            "{steady_fallback} FIB fallbacks in steady state ({steady_tx} dispatched)"
        ));
    }

    // (How long one look at the map takes: the resolution of the times below.)
    let looked = Instant::now();
    valid_next_hops(pins);
    eprintln!(
        "[{name}] one bpftool dump of sd_nexthop_v1: {:?}",
        looked.elapsed()
    );

    // b1 changes its MAC.
    let changed_at = now_epoch();
    sh(
        &net.b1_ns,
        "ip",
        &["link", "set", "dev", &net.b1_iface, "address", NEW_MAC],
    );
    let followed = wait_for(Duration::from_secs(5), || {
        let hops = valid_next_hops(pins);
        hops.iter().any(|(m, _)| m == NEW_MAC) && !hops.iter().any(|(m, _)| m == old_mac)
    });
    eprintln!("[{name}] b1 {old_mac} -> {NEW_MAC}: the cache followed in {followed:?}");
    match followed {
        Some(t) if t <= FOLLOW_WITHIN => {}
        other => problems.push(format!(
            "the cache did not follow b1's new MAC within {FOLLOW_WITHIN:?}: {other:?}, entries {:?}",
            valid_next_hops(pins)
        )),
    }

    if neighbour == NeighbourPhase::Keep {
        return changed_at;
    }
    // The dispatcher forgets b1's neighbour: the entry goes invalid, the fast path falls
    // back to the FIB (and the stack resolves b1 again), then the entry is valid again.
    let c2 = counters(net.control);
    let b1_ip = net.b1.ip().to_string();
    sh(
        &net.disp_ns,
        "ip",
        &["neigh", "del", &b1_ip, "dev", &net.disp_iface],
    );
    let fell_back = wait_for(Duration::from_secs(3), || {
        counter(&counters(net.control), "fib_fallback") > counter(&c2, "fib_fallback")
    });
    let valid_again = wait_for(Duration::from_secs(5), || {
        valid_next_hops(pins).iter().any(|(m, _)| m == NEW_MAC)
    });
    let c3 = counters(net.control);
    eprintln!(
        "[{name}] neighbour deleted: FIB fallback after {fell_back:?} ({} packets), entry valid again after {valid_again:?}",
        counter(&c3, "fib_fallback") - counter(&c2, "fib_fallback")
    );
    if fell_back.is_none() {
        problems.push("no FIB fallback after b1's neighbour entry was deleted".into());
    }
    if valid_again.is_none() {
        problems.push("b1's entry never became valid again".into());
    }

    // A routing rule that selects by source: the cache cannot follow it (the FIB lookup
    // sees the client's source), so no entry stays valid and the fast path asks the FIB;
    // once the rule is gone, the entries come back.
    let c4 = counters(net.control);
    let rule = [
        "rule",
        "add",
        "from",
        "198.18.0.0/15",
        "lookup",
        "main",
        "priority",
        "100",
    ];
    sh(&net.disp_ns, "ip", &rule);
    let emptied = wait_for(Duration::from_secs(5), || valid_next_hops(pins).is_empty());
    let fell_back = wait_for(Duration::from_secs(3), || {
        counter(&counters(net.control), "fib_fallback") > counter(&c4, "fib_fallback")
    });
    sh(&net.disp_ns, "ip", &["rule", "del", "priority", "100"]);
    let back = wait_for(Duration::from_secs(5), || valid_next_hops(pins).len() == 2);
    eprintln!(
        "[{name}] a rule by source: entries invalid after {emptied:?}, FIB fallback after {fell_back:?}; rule removed: valid again after {back:?}"
    );
    if emptied.is_none() || fell_back.is_none() {
        problems.push(format!(
            "with a rule by source the cache kept valid entries ({:?}) or the FIB was not asked ({fell_back:?})",
            valid_next_hops(pins)
        ));
    }
    if back.is_none() {
        problems.push("the entries did not come back once the rule was removed".into());
    }
    changed_at
}

/// Every call completed at exactly one backend, and b1 got call requests again (at its
/// new MAC) within a second of the change.
fn calls_followed(
    net: &Net,
    report: &sipp::UacReport,
    reports: &[UasReport],
    changed_at: f64,
    problems: &mut Vec<String>,
) {
    problems.extend(uac_problems(report, CALLS));
    match report.calls() {
        Ok(calls) => problems.extend(exactly_one_backend(&calls, reports)),
        Err(e) => problems.push(format!("UAC log: {e:#}")),
    }
    let b1_report = reports
        .iter()
        .find(|r| r.address == net.b1)
        .expect("b1's report");
    let after: Vec<f64> = b1_report
        .received()
        .expect("b1's log")
        .iter()
        .filter(|r| r.method != "OPTIONS" && r.at > changed_at)
        .map(|r| r.at)
        .collect();
    let first = after.iter().copied().fold(f64::INFINITY, f64::min);
    eprintln!(
        "[{}] b1: {} requests after the change, the first {:.3} s after it; UAC {} ok / {} failed",
        net.name,
        after.len(),
        first - changed_at,
        report.successful,
        report.failed
    );
    // (No request at all: the first is at infinity.)
    if first - changed_at > FOLLOW_WITHIN.as_secs_f64() {
        problems.push(format!(
            "b1 received no call request within {FOLLOW_WITHIN:?} of its MAC change (first after {:.3} s)",
            first - changed_at
        ));
    }
}

#[test]
fn rewrite_follows_a_backend_mac_change_under_load() {
    const NAME: &str = "nexthop-rewrite";
    let mut bed = Bed::build(&workdir(), NAME, 2, Duration::from_secs(90));
    let bpffs = BpfFs::mount(bed.topo.tag());
    let pins = bpffs.path().join(bed.iface());
    let mut run = bed.run_config(2);
    run.extra = vec!["--pin-path".into(), pins.to_string_lossy().into_owned()];
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    let b1_host = bed.topo.backends().next().expect("backend 1");
    let control = bed.control.clone();
    let net = Net {
        name: NAME,
        control: &control,
        pins: &pins,
        b1,
        b1_ns: b1_host.ns_name().to_owned(),
        b1_iface: b1_host.iface.clone(),
        disp_ns: bed.disp_ns(),
        disp_iface: bed.iface(),
    };
    let old_mac = prepare_b1(&net.b1_ns, &net.b1_iface);

    let daemon = bed.start_daemon(&run);
    let mut problems = Vec::new();
    wait_list(&bed, Duration::from_secs(10), "both backends up", |l| {
        [b1, b2].iter().all(|&a| state(l, a) == Some("up"))
    });
    let uac = bed.start_uac(&bed.uac_spec(CALLS, RATE), "uac");
    let changed_at = phases(&net, &old_mac, NeighbourPhase::Delete, &mut problems);
    let report = uac.finish().expect("UAC");
    let stopped = daemon.stop();
    let reports = bed.stop_backends();
    calls_followed(&net, &report, &reports, changed_at, &mut problems);
    if let Err(e) = stopped {
        problems.push(format!("daemon: {e:#}"));
    }
    drop(bpffs);
    verdict(NAME, &bed.dir.clone(), problems);
}

/// `l2dsr`: each backend holds the VIP on `lo` (SIPp's UAS bound to it) and answers the
/// health checks on its own address; only the MACs change on the way.
#[test]
fn l2dsr_follows_a_backend_mac_change_under_load() {
    const NAME: &str = "nexthop-l2dsr";
    preflight::require_forwarding().expect("preflight");
    let binary = dispatcher::binary_path().expect("sip-dispatch binary");
    let dir = scenario::run_dir(&workdir(), NAME).expect("run dir");
    netns::cleanup_leftovers().expect("cleaning up leftovers");
    let topo = Topology::build(TopologySpec::dispatcher(2)).expect("topology");
    let vip = SocketAddr::new(topo.vip(Family::V4), sipp::SIP_PORT);
    let bound = Duration::from_secs(90);
    let mut dsr: Vec<DsrBackend> = Vec::new();
    let mut uas: Vec<Option<Uas>> = Vec::new();
    let mut own = Vec::new();
    let mut health = Vec::new();
    for (i, b) in topo.backends().enumerate() {
        dsr.push(
            prepare_backend(b, vip.ip(), false, &binary, &dir)
                .unwrap_or_else(|e| panic!("preparing {}: {e:#}", b.ns_name())),
        );
        let label = format!("uas-b{}", i + 1);
        uas.push(Some(
            Uas::start(b.ns_name(), vip.ip(), &dir, &label, bound).expect("UAS on the VIP"),
        ));
        let addr = SocketAddr::new(b.ip(Family::V4), sipp::SIP_PORT);
        health.push(Responder::start(b.ns_name(), &[addr]).expect("health listener"));
        own.push(addr);
    }
    let xdp_pass = scenario::start_xdp_pass(&topo, &binary, XdpMode::Native, &dir, true)
        .expect("xdp-pass on the peer");
    let control = dispatcher::control_socket(topo.tag()).expect("control socket path");
    let bpffs = BpfFs::mount(topo.tag());
    let disp = topo.dispatcher().expect("dispatcher host");
    let pins = bpffs.path().join(&disp.iface);
    let b1_host = topo.backends().next().expect("backend 1");
    let net = Net {
        name: NAME,
        control: &control,
        pins: &pins,
        b1: own[0],
        b1_ns: b1_host.ns_name().to_owned(),
        b1_iface: b1_host.iface.clone(),
        disp_ns: disp.ns_name().to_owned(),
        disp_iface: disp.iface.clone(),
    };
    let old_mac = prepare_b1(&net.b1_ns, &net.b1_iface);

    let mut run = RunConfig::new(&disp.iface, vip, XdpMode::Native);
    run.control = Some(control.clone());
    run.backends = own.iter().map(|a| BackendArg::new(*a, 1)).collect();
    run.extra = [
        "--forwarding",
        "l2dsr",
        "--pin-path",
        &pins.to_string_lossy(),
    ]
    .map(str::to_owned)
    .to_vec();
    let daemon = Dispatcher::run(&binary, disp.ns_name(), &run, &dir)
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    let mut problems = Vec::new();
    let up = wait_for(Duration::from_secs(10), || {
        dispatcher::control_request(&control, &json!({"op": "backends-list"})).is_ok_and(|v| {
            let list = listed(&v["result"]);
            own.iter().all(|&a| state(&list, a) == Some("up"))
        })
    });
    if up.is_none() {
        problems.push("the backends were not both up within 10 s".into());
    }
    let spec = UacSpec::calls(topo.client().ip(Family::V4), vip, CALLS, RATE);
    let uac = sipp::Uac::start(topo.client().ns_name(), &spec, &dir, "uac").expect("UAC");
    let changed_at = phases(&net, &old_mac, NeighbourPhase::Keep, &mut problems);
    let report = uac.finish().expect("UAC");
    let stopped = daemon.stop();
    // Each report carries its backend's own address (every UAS is bound to the VIP).
    let reports: Vec<UasReport> = uas
        .iter_mut()
        .zip(&own)
        .filter_map(|(u, addr)| u.take().map(|u| (u, *addr)))
        .map(|(u, addr)| {
            let mut r = u.stop().expect("stopping a UAS");
            r.address = addr;
            r
        })
        .collect();
    calls_followed(&net, &report, &reports, changed_at, &mut problems);
    if let Err(e) = stopped {
        problems.push(format!("daemon: {e:#}"));
    }
    drop(health);
    drop(dsr);
    drop(xdp_pass);
    drop(bpffs);
    verdict(NAME, &dir, problems);
}
