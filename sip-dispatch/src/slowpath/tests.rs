use super::*;
use super::{counters::MAX_COUNTED_BACKENDS, reject::interface_mtu};
use sip_dispatch_common::{
    AffinityEntry, AffinityKey, Backend, BackendFlags,
    parse::scan_message,
    table::{SlotTable, Weighted, build_table},
};
use std::collections::HashMap;

fn table() -> SlotTable {
    let members: Vec<Weighted> = ["198.18.0.21:5060", "198.18.0.22:5060"]
        .iter()
        .map(|a| Weighted {
            backend: Backend::from_socket_addr(a.parse().unwrap()),
            weight: 1,
        })
        .collect();
    build_table(&members, HashKey::DEFAULT).unwrap()
}

const INVITE: &str = "INVITE sip:svc@198.18.0.100 SIP/2.0\r\n\
    Via: SIP/2.0/UDP 198.18.0.10:5070;branch=z9hG4bK-1\r\n\
    v: SIP/2.0/UDP 198.18.0.9:5060;branch=z9hG4bK-0\r\n\
    From: <sip:a@x>;tag=1\r\nTo: <sip:svc@198.18.0.100>\r\nCall-ID: abc@x\r\n\
    CSeq: 1 INVITE\r\nSubject: a\r\n folded\r\nContent-Length: 0\r\n\r\n";

#[test]
fn forwards_to_the_backend_of_the_table() {
    let t = table();
    let scan = scan_message(INVITE.as_bytes(), HashKey::DEFAULT);
    let want = t
        .member_for_hash(scan.hash)
        .unwrap()
        .backend
        .to_socket_addr();
    assert_eq!(
        decide(INVITE.as_bytes(), Some(&t), HashKey::DEFAULT),
        Decision::Forward(want)
    );
    let response = "SIP/2.0 200 OK\r\nCall-ID: abc@x\r\n\r\n";
    assert_eq!(
        decide(response.as_bytes(), Some(&t), HashKey::DEFAULT),
        Decision::Forward(want)
    );
}

#[test]
fn no_backend_rejects_requests_and_drops_responses_and_acks() {
    let empty = build_table(&[], HashKey::DEFAULT).unwrap();
    for t in [None, Some(&empty)] {
        assert_eq!(
            decide(INVITE.as_bytes(), t, HashKey::DEFAULT),
            Decision::Reject
        );
        let ack = INVITE
            .replace("INVITE sip", "ACK sip")
            .replace("1 INVITE", "1 ACK");
        assert_eq!(
            decide(ack.as_bytes(), t, HashKey::DEFAULT),
            Decision::Drop(DropReason::NoBackend)
        );
        let resp = "SIP/2.0 180 Ringing\r\nCall-ID: abc@x\r\n\r\n";
        assert_eq!(
            decide(resp.as_bytes(), t, HashKey::DEFAULT),
            Decision::Drop(DropReason::NoBackend)
        );
    }
}

/// An affinity map in memory.
#[derive(Default)]
struct MemStore {
    entries: HashMap<(u64, u32), AffinityEntry>,
    flags: HashMap<u32, BackendFlags>,
    backends: HashMap<u32, SocketAddr>,
}

impl AffinityStore for MemStore {
    fn service(&self) -> u32 {
        3
    }
    fn entry(&self, key: &AffinityKey) -> Option<AffinityEntry> {
        self.entries.get(&(key.hash, key.service)).copied()
    }
    fn flags(&self, id: u32) -> BackendFlags {
        self.flags.get(&id).copied().unwrap_or_default()
    }
    fn backend(&self, id: u32) -> Option<SocketAddr> {
        self.backends.get(&id).copied()
    }
    fn write(&mut self, key: &AffinityKey, entry: &AffinityEntry, create: bool) {
        let k = (key.hash, key.service);
        if create != self.entries.contains_key(&k) {
            self.entries.insert(k, *entry);
        }
    }
}

fn installed(addrs: &[&str], ids: &[u32]) -> InstalledTable {
    let members: Vec<Weighted> = addrs
        .iter()
        .map(|a| Weighted {
            backend: Backend::from_socket_addr(a.parse().unwrap()),
            weight: 1,
        })
        .collect();
    InstalledTable {
        table: build_table(&members, HashKey::DEFAULT).unwrap(),
        ids: ids.to_vec(),
    }
}

#[test]
fn with_affinity_a_call_keeps_its_backend_across_a_table_change() {
    use sip_dispatch_common::{AFF_BYE, BF_AFFINITY, BF_NEW, BF_UP};
    let first = installed(&["198.18.0.21:5060"], &[7]);
    let second = installed(&["198.18.0.22:5060"], &[8]);
    let mut store = MemStore::default();
    store
        .backends
        .insert(7, "198.18.0.21:5060".parse().unwrap());
    store
        .backends
        .insert(8, "198.18.0.22:5060".parse().unwrap());
    let all = BF_AFFINITY | BF_UP | BF_NEW;
    store.flags.insert(
        7,
        BackendFlags {
            generation: 4,
            flags: all,
        },
    );
    store.flags.insert(
        8,
        BackendFlags {
            generation: 0,
            flags: all,
        },
    );
    let k = HashKey::DEFAULT;
    let invite = INVITE.as_bytes();
    let bye = INVITE
        .replace("INVITE sip", "BYE sip")
        .replace("<sip:svc@198.18.0.100>", "<sip:svc@198.18.0.100>;tag=9");
    let hash = scan_message(invite, k).hash;

    // A BYE of an unknown call goes by the table and creates nothing.
    let (d, o) = decide_with_affinity(bye.as_bytes(), Some(&first), k, &mut store, 100);
    assert_eq!(d, Decision::Forward("198.18.0.21:5060".parse().unwrap()));
    assert_eq!(o, AffinityOutcome::default());
    assert!(store.entries.is_empty());

    let (d, o) = decide_with_affinity(invite, Some(&first), k, &mut store, 100);
    assert_eq!(d, Decision::Forward("198.18.0.21:5060".parse().unwrap()));
    assert!(o.written && !o.followed);
    let e = store.entries[&(hash, 3)];
    assert_eq!((e.backend, e.generation, e.last_seen_ns), (7, 4, 100));

    // The table moves the call's slot; its BYE stays, and is recorded.
    let now = 100 + 2_000_000_000;
    let (d, o) = decide_with_affinity(bye.as_bytes(), Some(&second), k, &mut store, now);
    assert_eq!(d, Decision::Forward("198.18.0.21:5060".parse().unwrap()));
    assert!(o.followed);
    let e = store.entries[&(hash, 3)];
    assert_eq!((e.flags & AFF_BYE, e.last_seen_ns), (AFF_BYE, now));

    // Disabled: the next message goes by the table and takes the entry along.
    store.flags.insert(
        7,
        BackendFlags {
            generation: 4,
            flags: 0,
        },
    );
    let (d, o) = decide_with_affinity(bye.as_bytes(), Some(&second), k, &mut store, now);
    assert_eq!(d, Decision::Forward("198.18.0.22:5060".parse().unwrap()));
    assert!(o.written && !o.followed);
    assert_eq!(store.entries[&(hash, 3)].backend, 8);

    // No table and no valid entry: a request gets a 503, as without affinity.
    store.entries.clear();
    let (d, _) = decide_with_affinity(invite, None, k, &mut store, now);
    assert_eq!(d, Decision::Reject);
}

#[test]
fn non_sip_and_call_id_less_messages_are_dropped() {
    let t = table();
    let stun = [
        0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    for msg in [
        &stun[..],
        b"\r\n\r\n",
        b"",
        b"\x00\xff garbage",
        b"hello world",
    ] {
        assert_eq!(
            decide(msg, Some(&t), HashKey::DEFAULT),
            Decision::Drop(DropReason::NotSip),
            "{msg:?}"
        );
    }
    let no_id = "OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\n";
    assert_eq!(
        decide(no_id.as_bytes(), Some(&t), HashKey::DEFAULT),
        Decision::Drop(DropReason::NoCallId)
    );
}

#[test]
fn per_backend_counts_read_like_the_fast_path_and_stay_bounded() {
    let c = Counters::default();
    let b4: SocketAddr = "198.18.0.21:5060".parse().unwrap();
    let b6: SocketAddr = "[2001:db8::21]:5060".parse().unwrap();
    c.count_forwarded(b4, 3000);
    c.count_forwarded(b4, 100);
    c.count_forwarded(b6, 100);
    assert_eq!(
        c.forwarded_to(b4),
        Forwarded {
            packets: 2,
            bytes: (14 + 20 + 8) * 2 + 3100
        }
    );
    assert_eq!(c.forwarded_to(b6).bytes, 14 + 40 + 8 + 100);
    c.retain_backends(&[b6].into_iter().collect());
    assert_eq!(c.forwarded_to(b4), Forwarded::default());
    for i in 0..(MAX_COUNTED_BACKENDS as u32 + 10) {
        c.count_forwarded(SocketAddr::from((i.to_be_bytes(), 5060)), 1);
    }
    let counted = c.per_backend.lock().unwrap().len();
    assert_eq!(counted, MAX_COUNTED_BACKENDS);
}

#[test]
fn the_503_cap_follows_a_smaller_mtu() {
    assert_eq!(cap_for_mtu(1500, false), 1472);
    assert_eq!(cap_for_mtu(9000, false), MAX_503_V4);
    assert_eq!(cap_for_mtu(1000, false), 972);
    assert_eq!(cap_for_mtu(1280, true), 1232);
    assert_eq!(cap_for_mtu(1500, true), MAX_503_V6);
    assert_eq!(cap_for_mtu(1100, true), 1052);
    assert_eq!(cap_for_mtu(20, false), 0);
    assert_eq!(cap_for_mtu(u32::MAX, true), MAX_503_V6);
}

#[test]
fn the_503_cap_reads_the_interface_and_falls_back_to_the_fixed_one() {
    // lo's MTU (65536 by default) is above the fixed caps.
    let lo = interface_mtu("lo").unwrap();
    assert!(lo >= 1500, "{lo}");
    assert_eq!(max_503_len("lo", false), MAX_503_V4);
    for bad in ["no-such-if0", "", "..", "../../etc/passwd"] {
        assert!(interface_mtu(bad).is_err(), "{bad:?}");
        assert_eq!(max_503_len(bad, false), MAX_503_V4, "{bad:?}");
        assert_eq!(max_503_len(bad, true), MAX_503_V6, "{bad:?}");
    }
}

#[test]
fn rate_limits_per_source_and_in_total() {
    let now = Instant::now();
    let mut l = RateLimiter::new(5.0, 20.0);
    let a: IpAddr = "198.18.0.10".parse().unwrap();
    let allowed = (0..100).filter(|_| l.allow(a, now)).count();
    assert_eq!(allowed, 10, "the burst of one source");
    assert!(
        l.allow(a, now + std::time::Duration::from_secs(1)),
        "refills at its rate"
    );
    // Many sources: the total bucket (burst 40, 1 already used above... 11) caps them.
    let total = (0..1000u32)
        .filter(|i| {
            l.allow(
                IpAddr::from([198, 18, 1, (i % 250) as u8]),
                now + std::time::Duration::from_secs(1),
            )
        })
        .count();
    assert!(total <= 40, "{total}");
}
