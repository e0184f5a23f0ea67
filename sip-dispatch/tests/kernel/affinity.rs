//! Call affinity in the kernel: which backend a message goes to once the call has an
//! entry, across table swaps and backend state changes (the rules of
//! `sip_dispatch_common::affinity::choose`), and what the counters say.
use std::net::SocketAddr;

use sip_dispatch::dataplane::Affinity;
use sip_dispatch_common::{
    AffinityEntry, AffinityKey, BF_AFFINITY, BF_NEW, BF_UP, Counter, HashKey,
    affinity::RETRANSMIT_WINDOW_NS,
    parse::scan_message,
    table::{SlotTable, build_table},
};
use sip_dispatch_testbed::{
    frames::{FrameSpec, parse},
    testrun::XDP_TX,
};

use crate::harness::{CLIENT4, Harness, VIP4, all_delta, weighted};

const A: &str = "198.18.1.21:5060";
const ALL: u32 = BF_AFFINITY | BF_UP | BF_NEW;

fn request(method: &str, call_id: &str, to_tag: Option<&str>) -> Vec<u8> {
    let tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
    format!(
        "{method} sip:service@198.18.1.100:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 198.18.1.10:5070;branch=z9hG4bK-{method}\r\n\
         From: <sip:sipp@198.18.1.10:5070>;tag=1\r\n\
         To: <sip:service@198.18.1.100:5060>{tag}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 {method}\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn response(call_id: &str) -> Vec<u8> {
    format!(
        "SIP/2.0 200 OK\r\n\
         Via: SIP/2.0/UDP 198.18.1.10:5070;branch=z9hG4bK-1\r\n\
         To: <sip:service@198.18.1.100:5060>;tag=9\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// Sends `msg` to the v4 VIP; returns where it went and the counters that moved.
fn send(h: &mut Harness, msg: &[u8]) -> (SocketAddr, Vec<(Counter, u64)>) {
    let frame = FrameSpec::udp(CLIENT4.parse().unwrap(), VIP4.parse().unwrap(), msg).build();
    let before = h.counters();
    let (verdict, out) = h.run(&frame, true);
    let moved = all_delta(&before, &h.counters())
        .into_iter()
        .filter(|(c, _)| c.name().starts_with("affinity_"))
        .collect();
    assert_eq!(verdict, XDP_TX, "{}", String::from_utf8_lossy(msg));
    (parse(&out).expect("output parses").dst, moved)
}

fn id_of(h: &Harness, addr: &str) -> u32 {
    h.ids.get(addr.parse().unwrap()).unwrap()
}

fn set_flags(h: &mut Harness, addr: &str, flags: u32) {
    let id = id_of(h, addr);
    h.dp.set_backend_flags(&mut h.ids, id, flags).unwrap();
}

/// A harness whose v4 backends all take calls, and a Call-ID the v4 table sends to A.
fn with_call_on_a() -> (Harness, String) {
    let mut h = Harness::new();
    for b in ["198.18.1.21:5060", "198.18.1.22:5062", "198.18.1.23:5064"] {
        set_flags(&mut h, b, ALL);
    }
    let call_id = call_on_a(&h, "affinity");
    (h, call_id)
}

/// The v4 service's table without A: every call of A's slots moves.
fn swap_in_table_without_a(h: &mut Harness) -> SlotTable {
    let t = build_table(
        &weighted(&[("198.18.1.22:5062", 1), ("198.18.1.23:5064", 1)]),
        HashKey::DEFAULT,
    )
    .unwrap();
    h.dp.install_service(&mut h.ids, 0, VIP4.parse().unwrap(), &t)
        .unwrap();
    t
}

fn key(h: &Harness, call_id: &str) -> AffinityKey {
    let scan = scan_message(&request("INVITE", call_id, None), HashKey::DEFAULT);
    let _ = h;
    AffinityKey {
        hash: scan.hash,
        service: 0,
        _zero: 0,
    }
}

fn entry(h: &Harness, call_id: &str) -> Option<AffinityEntry> {
    h.dp.affinity_entry(&key(h, call_id)).unwrap()
}

fn a() -> SocketAddr {
    A.parse().unwrap()
}

/// Where the table `t` sends the call `call_id` (its INVITE's hash).
fn picked(t: &SlotTable, call_id: &str) -> SocketAddr {
    let hash = scan_message(&request("INVITE", call_id, None), HashKey::DEFAULT).hash;
    t.member_for_hash(hash).unwrap().backend.to_socket_addr()
}

/// A Call-ID (`PREFIX-N@...`) the harness's v4 table sends to A.
fn call_on_a(h: &Harness, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}@198.18.1.10"))
        .find(|c| h.predicted(false, &request("INVITE", c, None)) == a())
        .unwrap()
}

#[test]
fn in_dialog_messages_follow_the_call_across_a_table_swap() {
    use Counter::*;
    let (mut h, call) = with_call_on_a();
    let (to, moved) = send(&mut h, &request("INVITE", &call, None));
    assert_eq!(to, a());
    assert_eq!(moved, vec![(AffinityMiss, 1), (AffinityInsert, 1)]);
    let e = entry(&h, &call).expect("the INVITE created an entry");
    assert_eq!(e.backend, id_of(&h, A));
    let moved_to = picked(&swap_in_table_without_a(&mut h), &call);
    assert_ne!(moved_to, a());
    for msg in [
        request("ACK", &call, Some("9")),
        response(&call),
        request("INFO", &call, Some("9")),
        request("INVITE", &call, None),
        request("BYE", &call, Some("9")),
    ] {
        let (to, moved) = send(&mut h, &msg);
        let text = String::from_utf8_lossy(&msg[..8]).to_string();
        assert_eq!(to, a(), "{text} left its call's backend");
        assert_eq!(moved, vec![(AffinityHit, 1)], "{text}");
    }
    assert_ne!(
        entry(&h, &call).unwrap().flags & 1,
        0,
        "the BYE is recorded"
    );
    // A new call in the same slot goes by the new table.
    let other = call_on_a(&h, "new");
    assert_eq!(send(&mut h, &request("INVITE", &other, None)).0, moved_to);
}

#[test]
fn a_drained_or_down_backend_keeps_its_dialogs_but_not_new_calls() {
    use Counter::*;
    let (mut h, call) = with_call_on_a();
    send(&mut h, &request("INVITE", &call, None));
    let moved_to = picked(&swap_in_table_without_a(&mut h), &call);
    // Drained: a retransmitted INVITE still reaches A (within Timer B).
    set_flags(&mut h, A, BF_AFFINITY | BF_UP);
    assert_eq!(send(&mut h, &request("INVITE", &call, None)).0, a());
    // ... but not once the entry is idle past the retransmission window: the
    // Call-ID is a new call then.
    let mut e = entry(&h, &call).unwrap();
    e.last_seen_ns = 0;
    h.dp.set_affinity_entry(&key(&h, &call), &e).unwrap();
    assert!(
        now_ns() > RETRANSMIT_WINDOW_NS,
        "the machine is up for 32 s"
    );
    // A re-INVITE (To tag) is in-dialog: it stays, idle or not.
    assert_eq!(send(&mut h, &request("INVITE", &call, Some("9"))).0, a());
    e.last_seen_ns = 0;
    h.dp.set_affinity_entry(&key(&h, &call), &e).unwrap();
    let (to, moved) = send(&mut h, &request("INVITE", &call, None));
    assert_eq!(to, moved_to);
    assert_eq!(moved, vec![(AffinityOverridden, 1)]);
    assert_eq!(
        entry(&h, &call).unwrap().backend,
        id_of(&h, &moved_to.to_string())
    );

    // Down: in-dialog messages stay with A, a retransmitted INVITE goes to the table.
    let (mut h, call) = with_call_on_a();
    send(&mut h, &request("INVITE", &call, None));
    swap_in_table_without_a(&mut h);
    set_flags(&mut h, A, BF_AFFINITY);
    assert_eq!(send(&mut h, &request("BYE", &call, Some("9"))).0, a());
    assert_eq!(send(&mut h, &request("ACK", &call, Some("9"))).0, a());
    let (to, moved) = send(&mut h, &request("INVITE", &call, None));
    assert_ne!(to, a());
    assert_eq!(moved, vec![(AffinityOverridden, 1)]);
}

#[test]
fn disable_and_a_reused_id_end_affinity() {
    use Counter::*;
    // Disabled: the flags say no affinity; the BYE goes by the table and the entry is
    // rewritten to the table's pick.
    let (mut h, call) = with_call_on_a();
    send(&mut h, &request("INVITE", &call, None));
    swap_in_table_without_a(&mut h);
    set_flags(&mut h, A, 0);
    let (to, moved) = send(&mut h, &request("BYE", &call, Some("9")));
    assert_ne!(to, a());
    assert_eq!(moved, vec![(AffinityOverridden, 1)]);

    // Removed and the id reused by another address: the entry's generation is old.
    let (mut h, call) = with_call_on_a();
    send(&mut h, &request("INVITE", &call, None));
    let a_id = id_of(&h, A);
    swap_in_table_without_a(&mut h);
    let freed = h.dp.release_unlisted(&mut h.ids, |x| x != a());
    assert_eq!(freed, vec![(a(), a_id)]);
    let newcomer = "198.18.1.22:5099";
    let t = build_table(
        &weighted(&[(newcomer, 1), ("198.18.1.23:5064", 1)]),
        HashKey::DEFAULT,
    )
    .unwrap();
    h.dp.install_service(&mut h.ids, 0, VIP4.parse().unwrap(), &t)
        .unwrap();
    assert_eq!(id_of(&h, newcomer), a_id, "the lowest free id is reused");
    set_flags(&mut h, newcomer, ALL);
    let (to, moved) = send(&mut h, &request("BYE", &call, Some("9")));
    assert_eq!(to, picked(&t, &call));
    assert_eq!(moved, vec![(AffinityOverridden, 1)]);
}

#[test]
fn responses_and_in_dialog_requests_never_create_entries() {
    use Counter::*;
    let (mut h, _) = with_call_on_a();
    for (i, msg) in [
        response("r-1@x"),
        request("ACK", "r-2@x", Some("9")),
        request("BYE", "r-3@x", Some("9")),
        request("CANCEL", "r-4@x", None),
    ]
    .into_iter()
    .enumerate()
    {
        let (to, moved) = send(&mut h, &msg);
        assert_eq!(to, h.predicted(false, &msg), "message {i}");
        assert_eq!(moved, vec![(AffinityMiss, 1)], "message {i}");
    }
    for c in ["r-1@x", "r-2@x", "r-3@x", "r-4@x"] {
        assert_eq!(entry(&h, c), None, "{c}");
    }
}

#[test]
fn with_affinity_off_every_message_goes_by_the_table() {
    let mut h = Harness::with_affinity(Affinity {
        on: false,
        ..Default::default()
    });
    for b in ["198.18.1.21:5060", "198.18.1.22:5062", "198.18.1.23:5064"] {
        set_flags(&mut h, b, ALL);
    }
    let call = call_on_a(&h, "off");
    let (to, moved) = send(&mut h, &request("INVITE", &call, None));
    assert_eq!((to, moved), (a(), vec![]));
    let t = swap_in_table_without_a(&mut h);
    let (to, moved) = send(&mut h, &request("BYE", &call, Some("9")));
    assert_eq!(to, picked(&t, &call));
    assert!(moved.is_empty());
    assert_eq!(entry(&h, &call), None);
}

/// Calls started on the first table, the table swapped, backends in every state:
/// each message goes to the same backend through the XDP program and through the
/// slow path's decision over the same maps.
#[test]
fn fast_and_slow_path_agree_with_affinity() {
    use sip_dispatch::slowpath::{Decision, InstalledTable, decide_with_affinity};
    let (mut h, _) = with_call_on_a();
    let calls: Vec<String> = (0..60).map(|i| format!("agree-{i}@198.18.1.10")).collect();
    for c in &calls {
        send(&mut h, &request("INVITE", c, None));
    }
    let t = build_table(
        &weighted(&[("198.18.1.22:5062", 1), ("198.18.1.23:5064", 1)]),
        HashKey::DEFAULT,
    )
    .unwrap();
    let members =
        h.dp.install_service(&mut h.ids, 0, VIP4.parse().unwrap(), &t)
            .unwrap();
    let installed = InstalledTable {
        table: t,
        ids: members.iter().map(|m| m.0).collect(),
    };
    let mut store = h.dp.affinity_maps(0).unwrap().expect("affinity is on");
    let states = [ALL, BF_AFFINITY | BF_UP, BF_AFFINITY, 0];
    let mut followed = 0;
    for (i, c) in calls.iter().enumerate() {
        set_flags(&mut h, A, states[i % states.len()]);
        for msg in [
            request("INVITE", c, None),
            request("ACK", c, Some("9")),
            response(c),
            request("UPDATE", c, Some("9")),
            request("BYE", c, Some("9")),
        ] {
            // Each path decides from the same entry, and leaves the same one.
            let text = String::from_utf8_lossy(&msg[..10]).to_string();
            let k = key(&h, c);
            let before = h.dp.affinity_entry(&k).unwrap();
            let now = sip_dispatch::slowpath::monotonic_ns();
            let (slow, outcome) =
                decide_with_affinity(&msg, Some(&installed), HashKey::DEFAULT, &mut store, now);
            let after_slow = h.dp.affinity_entry(&k).unwrap();
            match before {
                Some(e) => h.dp.set_affinity_entry(&k, &e).unwrap(),
                None => h.dp.remove_affinity_entry(&k).unwrap(),
            }
            let (fast, _) = send(&mut h, &msg);
            let after_fast = h.dp.affinity_entry(&k).unwrap();
            assert_eq!(slow, Decision::Forward(fast), "{c}: {text}");
            let routed = |e: Option<AffinityEntry>| e.map(|e| (e.backend, e.generation, e.flags));
            assert_eq!(
                routed(after_slow),
                routed(after_fast),
                "{c}: {text}: entries differ"
            );
            followed += usize::from(outcome.followed);
        }
    }
    assert!(followed > 0, "no message followed an entry");
}

/// The held-call census (the `affinity_census` program, run through
/// BPF_PROG_TEST_RUN) counts per backend the entries that hold a call, as
/// `census::holds_call` says; and messages through the fast path move the count.
#[test]
fn the_census_counts_held_calls_per_backend() {
    use sip_dispatch_common::{AFF_BYE, AFF_CANCEL, AFF_INVITE, census::holds_call};
    const IDLE: std::time::Duration = std::time::Duration::from_secs(10);
    let (mut h, call) = with_call_on_a();
    let a = id_of(&h, A);
    let b = id_of(&h, "198.18.1.22:5062");
    let c = id_of(&h, "198.18.1.23:5064");
    let census = |h: &mut Harness| {
        h.dp.census_runner()
            .unwrap()
            .run(&[a, b, c], IDLE)
            .unwrap_or_else(|e| panic!("census: {e:#}"))
    };
    let empty = census(&mut h);
    assert_eq!((empty.entries, empty.stale), (0, 0));
    assert_eq!(empty.held.values().sum::<u64>(), 0);

    // A call through the fast path holds A until its BYE.
    send(&mut h, &request("INVITE", &call, None));
    let one = census(&mut h);
    assert_eq!(one.held[&a], 1);
    assert_eq!((one.entries, one.stale), (1, 0));
    send(&mut h, &request("BYE", &call, Some("t")));
    let ended = census(&mut h);
    assert_eq!((ended.held[&a], ended.entries, ended.stale), (0, 1, 1));

    // Crafted entries, one of each kind.
    let now = now_ns();
    assert!(now > 60_000_000_000, "the test needs a minute of uptime");
    let fresh = now - 1_000_000_000;
    let idle = now - 60_000_000_000;
    // No id was freed yet: every one is at generation 0.
    let generation = 0u32;
    let mut n = 0u64;
    let mut put = |h: &mut Harness, backend: u32, id_gen: u32, last_seen_ns: u64, flags: u32| {
        n += 1;
        let key = AffinityKey {
            hash: n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            service: 0,
            _zero: 0,
        };
        let e = AffinityEntry {
            backend,
            generation: id_gen,
            last_seen_ns,
            flags,
            _zero: 0,
        };
        h.dp.set_affinity_entry(&key, &e).unwrap();
    };
    const I: u32 = AFF_INVITE;
    for _ in 0..3 {
        put(&mut h, a, generation, fresh, I);
    }
    put(&mut h, a, generation, fresh, I | AFF_BYE);
    put(&mut h, a, generation, fresh, I | AFF_CANCEL);
    put(&mut h, a, generation, idle, I);
    put(&mut h, a, generation + 1, fresh, I);
    put(&mut h, a, generation, fresh, 0); // made by an OPTIONS: not a call
    put(&mut h, b, generation, fresh, I);
    put(&mut h, b, generation, now + 5_000_000, I); // the coarse clock lags
    put(&mut h, c, generation, fresh, I);
    put(&mut h, 9999, generation, fresh, I); // no such id
    let got = census(&mut h);
    assert_eq!(got.entries, 13, "{got:?}");
    assert_eq!(
        (got.held[&a], got.held[&b], got.held[&c]),
        (3, 2, 1),
        "{got:?}"
    );
    assert_eq!(got.stale, 13 - 6);
    // Disabling C ends its calls' affinity: it holds none.
    set_flags(&mut h, "198.18.1.23:5064", 0);
    assert_eq!(census(&mut h).held[&c], 0);

    // A full map of the default size: the kernel agrees with a userspace walk of
    // the same map, and costs far less (numbers in the output).
    let full = h.dp.affinity().map_entries() as u64;
    let filled = std::time::Instant::now();
    for i in 0..full + 100 {
        let backend = [a, b, c][(i % 3) as usize];
        let last_seen = if i % 5 == 0 { idle } else { fresh };
        let flags = match (i % 7, i % 11) {
            (0, _) => AFF_INVITE | AFF_BYE,
            (_, 0) => 0,
            _ => AFF_INVITE,
        };
        put(&mut h, backend, generation, last_seen, flags);
    }
    eprintln!("wrote {} entries in {:?}", full + 100, filled.elapsed());
    let got = census(&mut h);
    let walked = std::time::Instant::now();
    let map = h.dp.affinity_entries().unwrap();
    let walk_took = walked.elapsed();
    assert_eq!(got.entries, map.len() as u64);
    // The LRU evicts a little before it is full (its free lists are per CPU).
    assert!(
        got.entries <= full && got.entries > full * 99 / 100,
        "{}",
        got.entries
    );
    let flags_of = |id: u32| sip_dispatch_common::BackendFlags {
        generation,
        flags: if id == c { 0 } else { ALL },
    };
    for id in [a, b, c] {
        let want = map
            .iter()
            .filter(|e| {
                e.backend == id && holds_call(e, flags_of(id), now_ns(), IDLE.as_nanos() as u64)
            })
            .count() as u64;
        assert_eq!(got.held[&id], want, "backend {id}");
    }
    let kernel = (0..5).map(|_| census(&mut h).took).min().unwrap();
    eprintln!(
        "census of {full} entries: kernel walk {kernel:?} (best of 5), userspace walk {walk_took:?}"
    );
}

fn now_ns() -> u64 {
    sip_dispatch::slowpath::monotonic_ns()
}
