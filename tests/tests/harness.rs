//! Self-test of the harness, without the dispatcher: the SIPp UAC calls one SIPp UAS
//! directly, and the call accounting must be exact. Separates harness bugs from
//! dispatcher bugs. Needs root and SIPp: fails (never skips) without them.
//!
//! Run with `--test-threads=1`.
use std::path::PathBuf;

use sip_dispatch_testbed::{
    Family, netns, preflight, run_direct,
    topology::{Topology, TopologySpec},
};

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-testbed")
}

fn direct(family: Family) {
    preflight::require_all().expect("preflight");
    let calls = 300;
    let r = run_direct(family, calls, 150, 5, &workdir()).expect("direct run");
    eprintln!(
        "{family}: UAC {} ok / {} failed (exit {:?}); UAS {} calls, {} incomplete, {} health checks; \
         UAS SuccessfulCall(C)={:?} IncomingCall(C)={:?}; logs {}",
        r.uac.successful,
        r.uac.failed,
        r.uac.exit_code,
        r.uas.calls.len(),
        r.uas.incomplete.len(),
        r.uas.health_checks,
        r.uas.stat.get("SuccessfulCall(C)"),
        r.uas.stat.get("IncomingCall(C)"),
        r.dir.display()
    );
    assert_eq!(r.uac.exit_code, Some(0), "{}", r.uac.failure_summary());
    assert_eq!(r.uac.failed, 0, "{}", r.uac.failure_summary());
    assert_eq!(r.uac.successful, u64::from(calls));
    // OPTIONS (health checks) are answered 200 by `-aa` and are not counted as calls.
    assert_eq!(r.options.successful, 5, "{}", r.options.failure_summary());
    assert_eq!(r.options.failed, 0);
    assert_eq!(r.uas.health_checks, 5);
    assert_eq!(
        r.uas.calls.len() as u64,
        u64::from(calls),
        "every call counted once"
    );
    assert!(r.uas.incomplete.is_empty(), "{:?}", r.uas.incomplete);
    assert_eq!(r.uas.exit_code, Some(0), "UAS exits 0 on SIGTERM");
    // SIPp's own view agrees that OPTIONS create "incoming calls": that is why the harness
    // counts from the message log instead.
    assert_eq!(
        r.uas.stat.get("IncomingCall(C)"),
        Some(u64::from(calls) + 5)
    );
    // Keep the logs of failed runs only.
    let _ = std::fs::remove_dir_all(&r.dir);
}

#[test]
fn harness_direct_calls_ipv4() {
    direct(Family::V4);
}

#[test]
fn harness_direct_calls_ipv6() {
    direct(Family::V6);
}

#[test]
fn topology_is_removed_on_drop() {
    preflight::require_all().expect("preflight");
    let names = {
        let topo = Topology::build(TopologySpec::dispatcher(3)).expect("topology");
        let names = topo.namespaces();
        assert_eq!(names.len(), 6, "switch, client, dispatcher, 3 backends");
        let listed = netns::list().unwrap();
        for n in &names {
            assert!(listed.contains(n), "{n} exists");
        }
        // The dispatcher answers for the VIP on its interface, in both families.
        let disp = topo.dispatcher().unwrap();
        let addrs = disp
            .ns
            .exec("ip", ["-br", "addr", "show", "dev", &disp.iface])
            .unwrap();
        for a in [
            "198.18.0.2/24",
            "198.18.0.100/24",
            "2001:db8::2/64",
            "2001:db8::100/64",
        ] {
            assert!(addrs.contains(a), "{a} in {addrs}");
        }
        // A process left running inside is killed by the drop.
        topo.client()
            .ns
            .exec("sh", ["-c", "sleep 600 >/dev/null 2>&1 &"])
            .unwrap();
        assert_eq!(netns::pids(topo.client().ns_name()).len(), 1);
        names
    };
    let listed = netns::list().unwrap();
    for n in &names {
        assert!(!listed.contains(n), "{n} removed");
    }
}

#[test]
fn leftovers_of_dead_runs_are_removed() {
    preflight::require_all().expect("preflight");
    // A namespace named as if created by a process that no longer exists.
    let dead_pid = (1_000_000..4_000_000)
        .find(|&p| !netns::alive(p))
        .expect("a free pid");
    let name = format!("{}{dead_pid}n0-sw", netns::PREFIX);
    sip_dispatch_testbed::cmd::run("ip", ["netns", "add", &name]).unwrap();
    let removed = netns::cleanup_leftovers().unwrap();
    assert!(removed.contains(&name), "{removed:?}");
    assert!(!netns::list().unwrap().contains(&name));
}
