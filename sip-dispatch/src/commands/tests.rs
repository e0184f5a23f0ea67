use serde_json::Value;

use super::*;
use crate::protocol::{BackendSnapshot, BackendView, FastPathCounters, sample_backend};

const B: &str = "198.18.0.22:5060";

/// A `backends list` answer, as the daemon writes it: a backend of one service, and
/// `rows` in another. Rows are JSON with the fields a test cares about.
fn list(rows: &[Value]) -> BackendsList {
    let row = |fields: &Value| {
        let mut row = serde_json::to_value(BackendView {
            backend: sample_backend("198.18.0.1:5060", BackendState::Up),
            share: 0.0,
        })
        .unwrap();
        row.as_object_mut().unwrap().remove("calls");
        for (k, v) in fields.as_object().unwrap() {
            row[k] = v.clone();
        }
        row
    };
    let service = |vip: &str, rows: Vec<Value>| {
        serde_json::json!({"vip": vip, "forwarding": "rewrite", "generation": 1,
            "priority": 0, "backends": rows})
    };
    serde_json::from_value(serde_json::json!({"services": [
        service("198.18.0.100:5060", vec![row(&serde_json::json!(
            {"address": "198.18.0.21:5060", "state": "up", "calls": 9}
        ))]),
        service("198.18.0.101:5060", rows.iter().map(row).collect()),
    ]}))
    .unwrap()
}

#[test]
fn what_a_poll_sees_of_the_draining_backend() {
    let b = B.parse().unwrap();
    let row = |state: &str, calls: Option<u64>| match calls {
        Some(c) => serde_json::json!({"address": B, "state": state, "calls": c}),
        None => serde_json::json!({"address": B, "state": state}),
    };
    assert_eq!(
        seen_in(&list(&[row("drained", Some(12))]), b).unwrap(),
        Seen::Drained { calls: 12 }
    );
    assert_eq!(
        seen_in(&list(&[row("up", Some(3))]), b).unwrap(),
        Seen::Other {
            state: BackendState::Up
        }
    );
    assert_eq!(seen_in(&list(&[]), b).unwrap(), Seen::Gone);
    let e = seen_in(&list(&[row("drained", None)]), b).unwrap_err();
    assert!(format!("{e}").contains("--affinity off"), "{e}");
    // IPv6 addresses compare as addresses, not as text.
    let v6: std::net::SocketAddr = "[2001:db8::22]:5060".parse().unwrap();
    let l = list(&[
        serde_json::json!({"address": "[2001:db8:0::22]:5060", "state": "drained", "calls": 0}),
    ]);
    assert_eq!(seen_in(&l, v6).unwrap(), Seen::Drained { calls: 0 });
}

#[test]
fn a_refused_drain_wait_command_line_exits_1_not_2() {
    let status = |line: &str| {
        let args: Vec<String> = line.split(' ').map(String::from).collect();
        usage_error_status(&args)
    };
    assert_eq!(status("sip-dispatch backends drain nope --wait"), 1);
    assert_eq!(
        status("sip-dispatch backends --control=/x drain 198.18.0.22:5060 --wait --timeout 0s"),
        1
    );
    assert_eq!(
        status("sip-dispatch backends drain 198.18.0.22:5060 --wait --timeout 0s"),
        1
    );
    assert_eq!(status("sip-dispatch backends drain nope"), 2);
    assert_eq!(status("sip-dispatch run --iface x --wait"), 2);
}

#[test]
fn drain_wait_exit_statuses() {
    let s = Duration::from_secs;
    let held = |calls| Seen::Drained { calls };
    let cases = [
        (held(0), s(0), None, Some(DrainEnd::Done)),
        (held(0), s(99), Some(s(1)), Some(DrainEnd::Done)),
        (held(5), s(0), None, None),
        (held(5), s(3600), None, None),
        (held(5), s(0), Some(s(1)), None),
        (held(5), s(1), Some(s(1)), Some(DrainEnd::TimedOut)),
        (
            Seen::Other {
                state: BackendState::Up,
            },
            s(0),
            None,
            Some(DrainEnd::Ended),
        ),
        (
            Seen::Other {
                state: BackendState::Disabled,
            },
            s(0),
            Some(s(9)),
            Some(DrainEnd::Ended),
        ),
        (Seen::Gone, s(0), None, Some(DrainEnd::Ended)),
    ];
    for (seen, elapsed, timeout, want) in cases {
        assert_eq!(
            drain_end(&seen, elapsed, timeout),
            want,
            "{seen:?} {elapsed:?} {timeout:?}"
        );
    }
    assert_eq!(
        [DrainEnd::Done, DrainEnd::TimedOut, DrainEnd::Ended].map(|e| e as u8),
        [0, 2, 3]
    );
}

#[test]
fn stats_of_backends_at_the_top_of_the_counter_range_do_not_overflow() {
    let backend = |a: &str| BackendSnapshot {
        packets: u64::MAX,
        bytes: u64::MAX,
        ..sample_backend(a, BackendState::Up)
    };
    let v = Snapshot {
        counters: FastPathCounters(vec![("rx".into(), u64::MAX)]),
        backends: vec![backend("198.18.0.21:5060"), backend("198.18.0.22:5060")],
        dns_failures: 0,
        reloads: Default::default(),
        slow_path: Default::default(),
        affinity_entries: 0,
        affinity_capacity: 0,
        tables: Vec::new(),
    };
    let out = stats_table(&v, Some(&v), Duration::from_secs(1));
    assert!(out.contains("198.18.0.22:5060"), "{out}");
    // The total saturates: each shows 100% rather than the CLI panicking.
    assert!(out.contains("100.0%"), "{out}");
}
/// What people see, pinned: the same text as when the CLI read the replies as
/// untyped JSON.
#[test]
fn human_renderings_are_pinned() {
    let mut b2 = sample_backend("[2001:db8::22]:5060", BackendState::Drained);
    b2.calls = None;
    b2.rtt_ms = None;
    b2.last_code = None;
    b2.last_rtt_ms = None;
    b2.added_by = "cli".into();
    b2.weight_from = "cli".into();
    b2.state_from = "cli".into();
    b2.reason = "set by the operator".into();
    b2.load.effective_weight = 0.0;
    b2.load.load_reason = "oc=100 for 2.0s".into();
    b2.source = "static".into();
    let list = BackendsList {
        services: vec![crate::protocol::ServiceView {
            vip: "198.18.0.100:5060".parse().unwrap(),
            forwarding: "rewrite".into(),
            generation: 3,
            priority: None,
            backends: vec![
                BackendView {
                    backend: sample_backend("198.18.0.21:5060", BackendState::Up),
                    share: 0.25,
                },
                BackendView {
                    backend: b2.clone(),
                    share: 0.0,
                },
            ],
        }],
    };
    assert_eq!(backends_table(&list), BACKENDS_TABLE);
    let which = WhichReply {
        call_id: "a\"b@c".into(),
        service: "198.18.0.100:5060".parse().unwrap(),
        slot: 7,
        backend: None,
        affinity: None,
    };
    assert_eq!(which_line(&which), WHICH_LINE);
    let reload = ReloadReply {
        reloaded: vec!["a".into(), "b".into()],
        config: None,
        changes: vec![],
        warning: None,
    };
    assert_eq!(reload_lines(&reload), RELOAD_LINES);
    let s = Snapshot {
        counters: FastPathCounters(vec![("rx".into(), 10), ("xdp_tx".into(), 4)]),
        backends: vec![sample_backend("198.18.0.21:5060", BackendState::Up), b2],
        dns_failures: 1,
        reloads: crate::protocol::Reloads {
            ok: 2,
            failed: 1,
            last_failed: true,
        },
        slow_path: Default::default(),
        affinity_entries: 3,
        affinity_capacity: 262_144,
        tables: Vec::new(),
    };
    let mut before = s.clone();
    before.counters.0[0].1 = 5;
    before.backends[0].packets = 3;
    assert_eq!(
        stats_table(&s, Some(&before), Duration::from_secs(2)),
        STATS_TABLE
    );
}

const BACKENDS_TABLE: &str = concat!(
    "service 198.18.0.100:5060  forwarding rewrite  table generation 3  priority in use -\n",
    "backend                    source                   prio      weight effective state            rtt ms last  last ms   share    packets  calls  reason\n",
    "198.18.0.21:5060           _sip._udp.example.net      10      2(dns)       2.0 up                 1.50  200     1.20   25.0%          7      4  \n",
    "[2001:db8::22]:5060        static(cli)                10      2(cli)       0.0 drained(cli)          -    -        -    0.0%          7      -  set by the operator; load: oc=100 for 2.0s",
);
const WHICH_LINE: &str = "\"a\\\"b@c\" -> - (slot 7)";
const RELOAD_LINES: &str = concat!("no configuration change\n", "resolving 2 SRV name(s) now",);
const STATS_TABLE: &str = concat!(
    "fast path\n",
    "  rx                                       10          2/s\n",
    "  xdp_tx                                    4          0/s\n",
    "backends\n",
    "  198.18.0.21:5060           up                   7 pkts            700 bytes   50.0%        2/s\n",
    "  [2001:db8::22]:5060        drained              7 pkts            700 bytes   50.0%        0/s\n",
    "slow path\n",
    "  received                                  0\n",
    "  forwarded                                 0\n",
    "  answered_503                              0\n",
    "  dropped_not_sip                           0\n",
    "  dropped_no_call_id                        0\n",
    "  dropped_no_backend                        0\n",
    "  rate_limited_503                          0\n",
    "  send_errors                               0\n",
    "  too_large_503                             0\n",
    "  affinity_followed                         0\n",
    "  affinity_written                          0\n",
    "  not_on_link                               0\n",
    "  too_big                                   0\n",
    "affinity map 3 of 262144 entries\n",
    "dns failures 1\n",
    "reloads ok 2 failed 1 (the last one failed)",
);
