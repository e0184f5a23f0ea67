//! The kernel against userspace: the backend the kernel picks is the one the userspace
//! table predicts (random Call-IDs, the golden messages), and the slow path decides as
//! the fast path does (a corpus of odd messages, the torture corpus).
use sip_dispatch_common::{
    Counter, HashKey,
    parse::{golden::GOLDEN_MESSAGES, scan_message},
};
use sip_dispatch_testbed::{
    frames::{FrameSpec, parse},
    testrun::{XDP_PASS, XDP_TX},
};

use crate::harness::{CLIENT4, CLIENT6, Harness, VIP4, VIP6, delta, invite};

/// The backend chosen in the kernel equals the one the userspace table predicts, for
/// 1000 random Call-IDs over IPv4 and IPv6, and every backend gets some.
#[test]
fn kernel_agrees_with_userspace_for_1000_call_ids() {
    let mut h = Harness::new();
    let mut rng = 0x5eed_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut seen = std::collections::HashMap::new();
    for i in 0..1000 {
        let len = 8 + (next() % 40) as usize;
        let id: String = (0..len)
            .map(|_| {
                b"abcdefghijklmnopqrstuvwxyz0123456789-.!%*_+`'~"[(next() % 46) as usize] as char
            })
            .collect();
        let v6 = i % 2 == 1;
        let msg = invite(&format!("Call-ID: {id}@198.18.1.10"));
        let (src, dst) = if v6 { (CLIENT6, VIP6) } else { (CLIENT4, VIP4) };
        let frame = FrameSpec::udp(src.parse().unwrap(), dst.parse().unwrap(), &msg).build();
        let (verdict, out) = h.run(&frame, true);
        assert_eq!(verdict, XDP_TX, "Call-ID {id}");
        let got = parse(&out).expect("output parses").dst;
        let want = h.predicted(v6, &msg);
        assert_eq!(got, want, "Call-ID {id}");
        *seen.entry(got).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        6,
        "every backend of both services was chosen: {seen:?}"
    );
    let ids: Vec<u32> = h.v4_ids.iter().chain(&h.v6_ids).copied().collect();
    let total: u64 = ids
        .iter()
        .map(|id| h.dp.backend_stats(*id).unwrap().packets)
        .sum();
    assert_eq!(total, 1000, "per-backend packet counters add up");
}

/// Fast path and slow path agree: a corpus of messages (golden ones, lookalikes, folded
/// and compact headers, odd line ends, messages without a Call-ID) goes through the XDP
/// program and through the slow path's decision function with the same table. Whatever
/// the kernel dispatches, the slow path sends to the same backend; whatever it passes for
/// want of a Call-ID, the slow path does not forward either.
#[test]
fn fast_path_and_slow_path_agree() {
    use sip_dispatch::slowpath::{Decision, decide};
    let mut h = Harness::new();
    let mut corpus: Vec<Vec<u8>> = GOLDEN_MESSAGES
        .iter()
        .map(|(m, _)| m.as_bytes().to_vec())
        .collect();
    let headers = [
        "Call-ID: plain-1@198.18.1.10",
        "i:compact-2",
        "call-id \t : spaced-3@x \t",
        "CALL-ID:\r\n folded-4@x",
        "X-Call-ID: fake\r\nCall-ID: after-lookalike-5",
        "Subject: x\r\n Call-ID: not-a-header\r\nCall-ID: real-6",
        "Call-ID: first-7\r\nCall-ID: second-7",
        "Call-ID: <>:\"[]{}@[2001:db8::1]",
        "Subject: none",
        "Call-ID:",
    ];
    // Start lines the fast path leaves to the slow path: not SIP, or SIP in an unusual
    // form (which the slow path forwards where its rule says SIP).
    corpus.extend([
        b"junk\r\ni: junk-1\r\n\r\n".to_vec(),
        b"Call-ID: first-line-2\r\n\r\n".to_vec(),
        b"SIP/2.0 200 OK\r\nCall-ID: response-3\r\n\r\n".to_vec(),
        b"NEW-METHOD sip:x SIP/2.0\r\nCall-ID: extension-4\r\n\r\n".to_vec(),
        b"invite sip:x SIP/2.0\r\nCall-ID: lower-5\r\n\r\n".to_vec(),
        b"INVITE sip:x SIP/2.1\r\nCall-ID: version-6\r\n\r\n".to_vec(),
        format!(
            "INVITE sip:{} SIP/2.0\r\nCall-ID: long-line-7\r\n\r\n",
            "u".repeat(300)
        )
        .into_bytes(),
    ]);
    for header in headers {
        let msg = invite(header);
        corpus.push(msg.clone());
        let lf_only = String::from_utf8(msg.clone())
            .unwrap()
            .replace("\r\n", "\n");
        corpus.push(lf_only.into_bytes());
        let cr_only = String::from_utf8(msg).unwrap().replace("\r\n", "\r");
        corpus.push(cr_only.into_bytes());
    }
    let mut dispatched = 0;
    for msg in &corpus {
        let frame = FrameSpec::udp(CLIENT4.parse().unwrap(), VIP4.parse().unwrap(), msg).build();
        let before = h.counters();
        let (verdict, out) = h.run(&frame, true);
        let counted = delta(&before, &h.counters());
        let slow = decide(msg, Some(&h.v4), HashKey::DEFAULT);
        let text = String::from_utf8_lossy(msg);
        if verdict == XDP_TX {
            dispatched += 1;
            let fast = parse(&out).unwrap().dst;
            assert_eq!(slow, Decision::Forward(fast), "{text:?}");
        } else {
            assert_eq!(verdict, XDP_PASS, "{text:?}");
            // The slow path forwards only SIP whose start line the fast path leaves to it.
            if matches!(slow, Decision::Forward(_)) {
                assert_eq!(
                    counted,
                    vec![(Counter::Seen, 1), (Counter::PassStartLine, 1)],
                    "the slow path forwards what the fast path passed: {text:?}"
                );
            }
        }
    }
    // Passed: 6 without a (non-empty) Call-ID, 6 for their start line.
    assert!(
        dispatched >= corpus.len() - 12,
        "only {dispatched} of {} dispatched",
        corpus.len()
    );
}

/// The torture corpus (modelled on RFC 4475 and RFC 5118): each message's outcome in
/// the kernel and in the slow path, over IPv4 and IPv6.
#[test]
fn torture_corpus() {
    use sip_dispatch::slowpath::{Decision, DropReason, decide};
    use sip_dispatch_common::parse::torture::TORTURE;
    let mut h = Harness::new();
    let mut left_to_slow_path = Vec::new();
    for (case, msg, want) in TORTURE {
        for v6 in [false, true] {
            let (src, dst, table) = if v6 {
                (CLIENT6, VIP6, &h.v6)
            } else {
                (CLIENT4, VIP4, &h.v4)
            };
            let slow = decide(msg.as_bytes(), Some(table), HashKey::DEFAULT);
            let frame =
                FrameSpec::udp(src.parse().unwrap(), dst.parse().unwrap(), msg.as_bytes()).build();
            let before = h.counters();
            let (verdict, out) = h.run(&frame, true);
            let counted = delta(&before, &h.counters());
            match want {
                Some(_) if verdict == XDP_PASS => {
                    // SIP in a form the fast path leaves to the slow path, which forwards it.
                    assert_eq!(
                        counted,
                        vec![(Counter::Seen, 1), (Counter::PassStartLine, 1)],
                        "{case}"
                    );
                    let predicted = h.predicted(v6, msg.as_bytes());
                    assert_eq!(slow, Decision::Forward(predicted), "{case}");
                    left_to_slow_path.push(*case);
                }
                Some(_) => {
                    assert_eq!(verdict, XDP_TX, "{case}");
                    let fast = parse(&out).unwrap().dst;
                    assert_eq!(fast, h.predicted(v6, msg.as_bytes()), "{case}");
                    assert_eq!(slow, Decision::Forward(fast), "{case}");
                }
                None => {
                    assert_eq!(verdict, XDP_PASS, "{case}");
                    assert_eq!(slow, Decision::Drop(DropReason::NoCallId), "{case}");
                }
            }
        }
    }
    // Only the method of exotic token characters (`!interesting-Method0123456789_*+...`).
    left_to_slow_path.dedup();
    assert_eq!(
        left_to_slow_path,
        ["4475 3.1.1.2 intmeth: wide range of valid characters in tokens and the Call-ID"],
        "left to the slow path"
    );
}

/// The golden messages of sip-dispatch-common reach the backend their golden hash
/// selects in userspace.
#[test]
fn golden_messages_hash_the_same_in_the_kernel() {
    let mut h = Harness::new();
    for (msg, call_id) in GOLDEN_MESSAGES {
        let scan = scan_message(msg.as_bytes(), HashKey::DEFAULT);
        assert_eq!(
            &msg.as_bytes()[scan.start as usize..scan.end as usize],
            call_id.as_bytes()
        );
        let frame = FrameSpec::udp(
            CLIENT4.parse().unwrap(),
            VIP4.parse().unwrap(),
            msg.as_bytes(),
        )
        .build();
        let (verdict, out) = h.run(&frame, true);
        assert_eq!(verdict, XDP_TX, "{call_id}");
        let want =
            h.v4.member_for_hash(scan.hash)
                .unwrap()
                .backend
                .to_socket_addr();
        assert_eq!(parse(&out).unwrap().dst, want, "{call_id}");
    }
}
