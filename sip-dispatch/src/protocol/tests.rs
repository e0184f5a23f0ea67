use super::*;

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

/// Serializes, checks the text, and reads it back to the same value.
fn pinned<T>(v: &T, text: &str)
where
    T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
{
    assert_eq!(json(v), text);
    assert_eq!(&serde_json::from_str::<T>(text).unwrap(), v);
}

#[test]
fn requests_have_a_stable_wire_form() {
    let r = Request::BackendAdmin {
        address: a("198.18.0.21:5060"),
        admin: AdminAction::Drain,
    };
    pinned(
        &r,
        r#"{"op":"backend-admin","address":"198.18.0.21:5060","admin":"drain"}"#,
    );
    pinned(&Request::BackendsList, r#"{"op":"backends-list"}"#);
    pinned(
        &Request::BackendAdd {
            address: a("198.18.0.77:5060"),
            weight: 70000,
            priority: 0,
            service: None,
        },
        r#"{"op":"backend-add","address":"198.18.0.77:5060","weight":70000,"priority":0,"service":null}"#,
    );
    pinned(
        &Request::Which {
            call_id: "a@b".into(),
            service: Some(a("198.18.0.100:5060")),
        },
        r#"{"op":"which","call_id":"a@b","service":"198.18.0.100:5060"}"#,
    );
    for (action, word) in [
        (AdminAction::Enable, "enable"),
        (AdminAction::Drain, "drain"),
        (AdminAction::Disable, "disable"),
    ] {
        assert_eq!(json(&action), format!("\"{word}\""));
    }
}

#[test]
fn an_unknown_admin_state_is_refused_naming_the_known_ones() {
    let e = serde_json::from_str::<Request>(
        r#"{"op":"backend-admin","address":"198.18.0.21:5060","admin":"sleep"}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(r#"unknown admin state "sleep" (enable, drain or disable)"#),
        "{e}"
    );
}

#[test]
fn weights_above_65535_are_refused_with_the_documented_text() {
    assert!(check_weight(0).is_ok());
    assert!(check_weight(65535).is_ok());
    assert_eq!(
        check_weight(70000).unwrap_err().to_string(),
        "weight 70000 is above 65535"
    );
}

#[test]
fn states_are_the_words_operators_see() {
    use sip_dispatch_common::health::Health;
    let with = |state, admin| Health {
        admin,
        ..Health::new(state, "test")
    };
    for (health, word) in [
        (with(State::Up, Admin::Enabled), "up"),
        (with(State::Down, Admin::Enabled), "down"),
        (with(State::Up, Admin::Drained), "drained"),
        (with(State::Up, Admin::Disabled), "disabled"),
        (Health::unprobed(), "down"),
    ] {
        let state = BackendState::of(&health);
        assert_eq!(state.to_string(), word);
        assert_eq!(json(&state), format!("\"{word}\""));
    }
}

#[test]
fn responses_wrap_replies_and_errors() {
    let ok: Response<Reply> = Ok(Reply::Removed(Removed {
        removed: a("198.18.0.21:5060"),
        warning: None,
    }))
    .into();
    assert_eq!(
        json(&ok),
        r#"{"ok":true,"result":{"removed":"198.18.0.21:5060"}}"#
    );
    let err: Response<Reply> = Err::<Reply, _>("unknown backend 198.18.0.99:5060".into()).into();
    assert_eq!(
        json(&err),
        r#"{"ok":false,"error":"unknown backend 198.18.0.99:5060","result":null}"#
    );
    let back: Response<Removed> = serde_json::from_str(&json(&err)).unwrap();
    assert!(!back.ok && back.result.is_none());
}

#[test]
fn change_replies_have_a_stable_wire_form() {
    pinned(
        &Added {
            added: a("198.18.0.24:5060"),
            service: a("198.18.0.100:5060"),
            warning: None,
        },
        r#"{"added":"198.18.0.24:5060","service":"198.18.0.100:5060"}"#,
    );
    pinned(
        &Removed {
            removed: a("[2001:db8::22]:5060"),
            warning: None,
        },
        r#"{"removed":"[2001:db8::22]:5060"}"#,
    );
    pinned(
        &AdminChanged {
            address: a("198.18.0.21:5060"),
            state: BackendState::Drained,
            warning: None,
        },
        r#"{"address":"198.18.0.21:5060","state":"drained"}"#,
    );
    pinned(
        &WeightSet {
            address: a("198.18.0.21:5060"),
            weight: 3,
            warning: None,
        },
        r#"{"address":"198.18.0.21:5060","weight":3}"#,
    );
    pinned(
        &ReloadReply {
            reloaded: vec!["_sip._udp.example.net".into()],
            config: None,
            changes: vec![],
            warning: None,
        },
        r#"{"reloaded":["_sip._udp.example.net"],"config":null,"changes":[]}"#,
    );
    // A change the state file could not keep says so last.
    let mut reply = Reply::WeightSet(WeightSet {
        address: a("198.18.0.21:5060"),
        weight: 0,
        warning: None,
    });
    reply.warn("applied, but not saved".into());
    assert_eq!(
        json(&reply),
        r#"{"address":"198.18.0.21:5060","weight":0,"warning":"applied, but not saved"}"#
    );
    let mut reply = Reply::Reload(ReloadReply {
        reloaded: vec![],
        config: Some("/etc/sip-dispatch.toml".into()),
        changes: vec!["198.18.0.100:5060: backend 198.18.0.23:5060 added".into()],
        warning: None,
    });
    reply.warn("w".into());
    assert_eq!(
        json(&reply),
        r#"{"reloaded":[],"config":"/etc/sip-dispatch.toml","changes":["198.18.0.100:5060: backend 198.18.0.23:5060 added"],"warning":"w"}"#
    );
}

#[test]
fn which_has_a_stable_wire_form() {
    pinned(
        &WhichReply {
            call_id: "a84b4c76e66710@pc33.atlanta.example.com".into(),
            service: a("198.18.0.100:5060"),
            slot: 4242,
            backend: Some(a("198.18.0.21:5060")),
            affinity: Some(AffinityView {
                backend: Some(a("198.18.0.22:5060")),
                valid: true,
                idle_s: 12,
                bye_seen: false,
                cancel_seen: true,
            }),
        },
        r#"{"call_id":"a84b4c76e66710@pc33.atlanta.example.com","service":"198.18.0.100:5060","slot":4242,"backend":"198.18.0.21:5060","affinity":{"backend":"198.18.0.22:5060","valid":true,"idle_s":12,"bye_seen":false,"cancel_seen":true}}"#,
    );
    pinned(
        &WhichReply {
            call_id: "x".into(),
            service: a("198.18.0.100:5060"),
            slot: 0,
            backend: None,
            affinity: None,
        },
        r#"{"call_id":"x","service":"198.18.0.100:5060","slot":0,"backend":null,"affinity":null}"#,
    );
}

/// What every backend row ends with: its load (see `LoadView`).
const LOAD: &str = r#""effective_weight":2.0,"overload":null,"overload_expires_ms":null,"rtt_baseline_ms":null,"latency_factor":1.0,"load_reason":"","oc_accepted":0,"oc_malformed":0,"oc_stale":0"#;

const BACKEND: &str = r#""service":"198.18.0.100:5060","address":"198.18.0.21:5060","weight":2,"priority":10,"source":"_sip._udp.example.net","added_by":"config","weight_from":"dns","state_from":"health","state":"up","reason":"","rtt_ms":1.5,"last_code":200,"last_rtt_ms":1.2,"consecutive_failures":0,"last_change":0,"checks":9,"check_failures":1,"packets":7,"bytes":700"#;

#[test]
fn backends_list_has_a_stable_wire_form() {
    let mut unknown_calls = sample_backend("198.18.0.21:5060", BackendState::Up);
    unknown_calls.calls = None;
    unknown_calls.rtt_ms = None;
    unknown_calls.last_code = None;
    unknown_calls.last_rtt_ms = None;
    let list = BackendsList {
        services: vec![ServiceView {
            vip: a("198.18.0.100:5060"),
            forwarding: "rewrite".into(),
            generation: 3,
            priority: Some(10),
            backends: vec![
                BackendView {
                    backend: sample_backend("198.18.0.21:5060", BackendState::Up),
                    share: 0.5,
                },
                BackendView {
                    backend: unknown_calls,
                    share: 0.0,
                },
            ],
        }],
    };
    let unknown = BACKEND
        .replace(r#""rtt_ms":1.5"#, r#""rtt_ms":null"#)
        .replace(r#""last_code":200"#, r#""last_code":null"#)
        .replace(r#""last_rtt_ms":1.2"#, r#""last_rtt_ms":null"#);
    pinned(
        &list,
        &format!(
            r#"{{"services":[{{"vip":"198.18.0.100:5060","forwarding":"rewrite","generation":3,"priority":10,"backends":[{{{BACKEND},"calls":4,{LOAD},"share":0.5}},{{{unknown},{LOAD},"share":0.0}}]}}]}}"#
        ),
    );
    let empty = BackendsList {
        services: vec![ServiceView {
            vip: a("[2001:db8::100]:5060"),
            forwarding: "ipip".into(),
            generation: 0,
            priority: None,
            backends: vec![],
        }],
    };
    pinned(
        &empty,
        r#"{"services":[{"vip":"[2001:db8::100]:5060","forwarding":"ipip","generation":0,"priority":null,"backends":[]}]}"#,
    );
}

#[test]
fn stats_have_a_stable_wire_form() {
    let s = Snapshot {
        counters: FastPathCounters(vec![("rx".into(), 10), ("xdp_tx".into(), 4)]),
        backends: vec![sample_backend("198.18.0.21:5060", BackendState::Up)],
        dns_failures: 1,
        reloads: Reloads {
            ok: 2,
            failed: 1,
            last_failed: false,
        },
        slow_path: CountersSnapshot {
            received: 5,
            too_big: 1,
            ..Default::default()
        },
        affinity_entries: 3,
        affinity_capacity: 262_144,
        tables: vec![TableSnapshot {
            service: "198.18.0.100:5060".parse().unwrap(),
            generation: 3,
            publish_failures: 1,
            last_publish_failed: false,
        }],
    };
    pinned(
        &s,
        &format!(
            r#"{{"counters":{{"rx":10,"xdp_tx":4}},"backends":[{{{BACKEND},"calls":4,{LOAD}}}],"dns_failures":1,"reloads":{{"ok":2,"failed":1,"last_failed":false}},"slow_path":{{"received":5,"forwarded":0,"answered_503":0,"dropped_not_sip":0,"dropped_no_call_id":0,"dropped_no_backend":0,"rate_limited_503":0,"send_errors":0,"too_large_503":0,"affinity_followed":0,"affinity_written":0,"not_on_link":0,"too_big":1}},"affinity_entries":3,"affinity_capacity":262144,"tables":[{{"service":"198.18.0.100:5060","generation":3,"publish_failures":1,"last_publish_failed":false}}]}}"#
        ),
    );
    // The untagged reply writes the snapshot as it is.
    assert_eq!(json(&Reply::Stats(Box::new(s.clone()))), json(&s));
    assert_eq!(s.counters.get("xdp_tx"), Some(4));
    assert_eq!(s.counters.get("nope"), None);
}

#[test]
fn the_slow_path_counters_are_named_as_in_their_json() {
    let c = CountersSnapshot {
        received: 1,
        forwarded: 2,
        answered_503: 3,
        dropped_not_sip: 4,
        dropped_no_call_id: 5,
        dropped_no_backend: 6,
        rate_limited_503: 7,
        send_errors: 8,
        too_large_503: 9,
        affinity_followed: 10,
        affinity_written: 11,
        not_on_link: 12,
        too_big: 13,
    };
    let serde_json::Value::Object(map) = serde_json::to_value(&c).unwrap() else {
        panic!("not an object");
    };
    let from_json: Vec<(String, u64)> = map
        .into_iter()
        .map(|(k, v)| (k, v.as_u64().unwrap()))
        .collect();
    let named: Vec<(String, u64)> = slow_path_counters(&c)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(named, from_json);
}
