//! The next-hop cache (README "Forwarding modes", `sd_nexthop_v1`) under SIPp load
//! through a real XDP dispatcher in rewrite mode:
//! - in steady state the fast path takes every backend's next hop from the cache: the
//!   `fib_fallback` counter does not move while thousands of packets are dispatched;
//! - backend b1 changes its MAC address (`ip link set dev X address NEW`); it announces
//!   the change the way a real host does (gratuitous ARP, `arp_notify=1`), the
//!   dispatcher's kernel updates its neighbour entry, and the cache follows within a
//!   second: the entry holds the new MAC, and b1's UAS (which only receives frames sent
//!   to its current MAC: others are dropped as PACKET_OTHERHOST) gets requests again
//!   within a second;
//! - the dispatcher's neighbour entry for b1 is deleted: the entry becomes invalid and
//!   packets take the FIB lookup (`fib_fallback` rises) instead of a stale entry, until
//!   the stack resolved b1 again and the entry is valid again;
//! - no call is lost: every Call-ID completes, at exactly one backend.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use sip_dispatch_testbed::{
    bed::{Bed, BpfFs, state, text, uac_problems, verdict, wait_list},
    dispatcher, netns,
    sipp::exactly_one_backend,
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

#[test]
fn forwarding_follows_a_backend_mac_change_under_load() {
    const NAME: &str = "nexthop-mac-change";
    let mut bed = Bed::build(&workdir(), NAME, 2, Duration::from_secs(90));
    let bpffs = BpfFs::mount(bed.topo.tag());
    let pins = bpffs.path().join(bed.iface());
    let mut run = bed.run_config(2);
    run.extra = vec!["--pin-path".into(), pins.to_string_lossy().into_owned()];
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    let (b1_ns, b1_iface) = {
        let h = bed.topo.backends().next().expect("backend 1");
        (h.ns_name().to_owned(), h.iface.clone())
    };
    // b1 announces a new MAC with a gratuitous ARP (as hosts do with arp_notify).
    sh(
        &b1_ns,
        "sysctl",
        &["-qw", &format!("net.ipv4.conf.{b1_iface}.arp_notify=1")],
    );
    let old_mac = sh(
        &b1_ns,
        "cat",
        &[&format!("/sys/class/net/{b1_iface}/address")],
    )
    .trim()
    .to_owned();

    let daemon = bed.start_daemon(&run);
    let mut problems = Vec::new();
    wait_list(&bed, Duration::from_secs(10), "both backends up", |l| {
        [b1, b2].iter().all(|&a| state(l, a) == Some("up"))
    });
    // The health checks resolved both neighbours: the cache has both.
    if wait_for(Duration::from_secs(5), || valid_next_hops(&pins).len() == 2).is_none() {
        problems.push(format!(
            "the cache never held 2 valid entries: {:?}",
            valid_next_hops(&pins)
        ));
    }

    let spec = bed.uac_spec(CALLS, RATE);
    let uac = bed.start_uac(&spec, "uac");
    let tx = |c: &Value| counter(c, "xdp_tx") + counter(c, "xdp_redirect");

    // Steady state: a window of at least 400 dispatched packets.
    let c0 = counters(&bed.control);
    let mut c1 = c0.clone();
    wait_for(Duration::from_secs(10), || {
        c1 = counters(&bed.control);
        tx(&c1) >= tx(&c0) + 400
    });
    let steady_tx = tx(&c1) - tx(&c0);
    let steady_fallback = counter(&c1, "fib_fallback") - counter(&c0, "fib_fallback");
    eprintln!(
        "[{NAME}] steady state: {steady_tx} packets dispatched, {steady_fallback} FIB fallbacks"
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

    // b1 changes its MAC.
    let changed_at = now_epoch();
    sh(
        &b1_ns,
        "ip",
        &["link", "set", "dev", &b1_iface, "address", NEW_MAC],
    );
    let followed = wait_for(Duration::from_secs(5), || {
        let hops = valid_next_hops(&pins);
        hops.iter().any(|(m, _)| m == NEW_MAC) && !hops.iter().any(|(m, _)| *m == old_mac)
    });
    eprintln!("[{NAME}] b1 {old_mac} -> {NEW_MAC}: the cache followed in {followed:?}");
    match followed {
        Some(t) if t <= FOLLOW_WITHIN => {}
        other => problems.push(format!(
            "the cache did not follow b1's new MAC within {FOLLOW_WITHIN:?}: {other:?}, entries {:?}",
            valid_next_hops(&pins)
        )),
    }

    // The dispatcher forgets b1's neighbour: the entry goes invalid, the fast path falls
    // back to the FIB (and the stack resolves b1 again), then the entry is valid again.
    let c2 = counters(&bed.control);
    let b1_ip = b1.ip().to_string();
    let disp_ns = bed.disp_ns();
    sh(
        &disp_ns,
        "ip",
        &["neigh", "del", &b1_ip, "dev", &bed.iface()],
    );
    let fell_back = wait_for(Duration::from_secs(3), || {
        counter(&counters(&bed.control), "fib_fallback") > counter(&c2, "fib_fallback")
    });
    let valid_again = wait_for(Duration::from_secs(5), || {
        valid_next_hops(&pins).iter().any(|(m, _)| m == NEW_MAC)
    });
    let c3 = counters(&bed.control);
    eprintln!(
        "[{NAME}] neighbour deleted: FIB fallback after {fell_back:?} ({} packets), entry valid again after {valid_again:?}",
        counter(&c3, "fib_fallback") - counter(&c2, "fib_fallback")
    );
    if fell_back.is_none() {
        problems.push("no FIB fallback after b1's neighbour entry was deleted".into());
    }
    if valid_again.is_none() {
        problems.push("b1's entry never became valid again".into());
    }

    let report = uac.finish().expect("UAC");
    let stopped = daemon.stop();
    let reports = bed.stop_backends();
    problems.extend(uac_problems(&report, CALLS));
    match report.calls() {
        Ok(calls) => problems.extend(exactly_one_backend(&calls, &reports)),
        Err(e) => problems.push(format!("UAC log: {e:#}")),
    }
    // b1 got requests again (at its new MAC) within a second of the change.
    let b1_report = reports
        .iter()
        .find(|r| r.address == b1)
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
        "[{NAME}] b1: {} requests after the change, the first {:.3} s after it; UAC {} ok / {} failed",
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
    if let Err(e) = stopped {
        problems.push(format!("daemon: {e:#}"));
    }
    drop(bpffs);
    verdict(NAME, &bed.dir.clone(), problems);
}
