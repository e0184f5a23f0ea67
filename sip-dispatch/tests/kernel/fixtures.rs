//! The fixture table: one frame in, the verdict, the counters that move and the output
//! frame out; and the hostile and truncated frames the fast path must handle by rule.
use sip_dispatch_common::Counter;
use sip_dispatch_testbed::{
    frames::{FrameSpec, parse},
    testrun::{XDP_PASS, XDP_REDIRECT, XDP_TX},
};

use crate::harness::{
    CLIENT4, CLIENT6, Harness, VETH_MAC, VIP_NO_NEIGH, VIP4, VIP6, backend_mac, delta, invite,
};

enum Expect {
    /// Dispatched with this verdict to the backend userspace predicts.
    Dispatched(u32),
    /// Passed untouched, counted under this reason.
    Passed(Counter),
}

struct Fixture {
    name: &'static str,
    frame: FrameSpec,
    ingress_veth: bool,
    expect: Expect,
}

fn fixture(name: &'static str, src: &str, dst: &str, payload: &[u8], expect: Expect) -> Fixture {
    Fixture {
        name,
        frame: FrameSpec::udp(src.parse().unwrap(), dst.parse().unwrap(), payload),
        ingress_veth: true,
        expect,
    }
}

fn fixtures() -> Vec<Fixture> {
    use Counter::*;
    use Expect::*;
    let long = invite("Call-ID: a84b4c76e66710@pc33.atlanta.com");
    let mut v = vec![
        fixture("ipv4 long form", CLIENT4, VIP4, &long, Dispatched(XDP_TX)),
        fixture("ipv6 long form", CLIENT6, VIP6, &long, Dispatched(XDP_TX)),
        fixture("compact form", CLIENT4, VIP4, &invite("i: compact-1@198.18.1.10"), Dispatched(XDP_TX)),
        fixture("lower case, spaces around colon", CLIENT4, VIP4, &invite("call-id \t:  lower-1@x  "), Dispatched(XDP_TX)),
        fixture("upper case", CLIENT6, VIP6, &invite("CALL-ID:UPPER-1@x"), Dispatched(XDP_TX)),
        fixture(
            "lookalike headers only",
            CLIENT4,
            VIP4,
            &invite("X-Call-ID: fake-1\r\nCall-IDX: fake-2\r\ni-foo: fake-3\r\nSubject: Call-ID: fake-4"),
            Passed(PassNoCallId),
        ),
        fixture(
            "Call-ID only in the body",
            CLIENT4,
            VIP4,
            b"MESSAGE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 198.18.1.10\r\nContent-Type: message/sipfrag\r\n\r\nCall-ID: in-body@x\r\n",
            Passed(PassNoCallId),
        ),
        fixture("no Call-ID", CLIENT4, VIP4, &invite("Subject: hello"), Passed(PassNoCallId)),
        fixture("empty Call-ID", CLIENT4, VIP4, &invite("Call-ID:   "), Passed(PassNoCallId)),
        fixture("non-SIP UDP to the service port", CLIENT4, VIP4, &[0x17u8; 200], Passed(PassNoCallId)),
        fixture(
            "not SIP, with a line that reads as a Call-ID header",
            CLIENT4,
            VIP4,
            b"\x17\x03\x03junk\ni: x\r\n\r\n",
            Passed(PassStartLine),
        ),
        fixture(
            "a Call-ID header as the first line",
            CLIENT4,
            VIP4,
            b"Call-ID: first-line@x\r\n\r\n",
            Passed(PassStartLine),
        ),
        fixture(
            "another SIP version",
            CLIENT4,
            VIP4,
            &String::from_utf8(long.clone()).unwrap().replacen("SIP/2.0\r\n", "SIP/3.0\r\n", 1).into_bytes(),
            Passed(PassStartLine),
        ),
        fixture(
            "a method in lower case (SIP, for the slow path)",
            CLIENT4,
            VIP4,
            &long[..].iter().enumerate().map(|(i, b)| if i < 6 { b.to_ascii_lowercase() } else { *b }).collect::<Vec<u8>>(),
            Passed(PassStartLine),
        ),
        fixture("UDP to another port", CLIENT4, "198.18.1.100:5080", &long, Passed(NotService)),
        fixture("UDP to another address", CLIENT4, "198.18.1.99:5060", &long, Passed(NotService)),
        fixture("backend without neighbour entry", CLIENT4, VIP_NO_NEIGH, &long, Passed(PassFibMiss)),
    ];

    let mut headers = String::new();
    while headers.len() < 1400 {
        headers.push_str("X-Padding: 0123456789abcdefghijklmnopqrstuvwxyz0123456789\r\n");
    }
    // The Call-ID is the last header, after 1400 bytes, and the frame still fits a
    // 1500-byte MTU (a larger one would be FRAG_NEEDED for the FIB).
    let late = format!("OPTIONS sip:x SIP/2.0\r\n{headers}Call-ID: late-1@198.18.1.10\r\n\r\n");
    assert!(late.find("Call-ID").unwrap() > 1400 && late.len() < 1472);
    v.push(fixture(
        "Call-ID after 1400 bytes of headers",
        CLIENT4,
        VIP4,
        late.as_bytes(),
        Dispatched(XDP_TX),
    ));
    let far = invite(&format!("{headers}{headers}Call-ID: beyond-1@198.18.1.10"));
    v.push(fixture(
        "Call-ID beyond the scan window",
        CLIENT4,
        VIP4,
        &far,
        Passed(PassCallIdBeyondWindow),
    ));

    let mut f = fixture(
        "via lo: XDP_REDIRECT to the veth",
        CLIENT4,
        VIP4,
        &long,
        Dispatched(XDP_REDIRECT),
    );
    f.ingress_veth = false;
    v.push(f);
    let mut f = fixture(
        "ipv6 via lo: XDP_REDIRECT",
        CLIENT6,
        VIP6,
        &long,
        Dispatched(XDP_REDIRECT),
    );
    f.ingress_veth = false;
    v.push(f);
    let mut f = fixture("802.1Q tag", CLIENT4, VIP4, &long, Dispatched(XDP_TX));
    f.frame.vlan = Some((0x8100, 42));
    v.push(f);
    let mut f = fixture(
        "802.1ad tag, ipv6",
        CLIENT6,
        VIP6,
        &long,
        Dispatched(XDP_TX),
    );
    f.frame.vlan = Some((0x88a8, 42));
    v.push(f);
    let mut f = fixture("IPv4 options", CLIENT4, VIP4, &long, Dispatched(XDP_TX));
    f.frame.ip_options = vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00]; // router alert, NOPs, EOL
    v.push(f);
    let mut f = fixture(
        "IPv4 UDP checksum 0",
        CLIENT4,
        VIP4,
        &long,
        Dispatched(XDP_TX),
    );
    f.frame.zero_udp_checksum = true;
    v.push(f);
    let mut f = fixture(
        "first fragment (MF)",
        CLIENT4,
        VIP4,
        &long,
        Passed(PassFragment),
    );
    f.frame.fragment = Some((true, 0));
    v.push(f);
    let mut f = fixture("later fragment", CLIENT4, VIP4, &long, Passed(PassFragment));
    f.frame.fragment = Some((false, 185));
    v.push(f);
    let mut f = fixture(
        "IPv6 hop-by-hop header",
        CLIENT6,
        VIP6,
        &long,
        Passed(PassIpv6Ext),
    );
    f.frame.ipv6_ext = Some(0);
    v.push(f);
    let mut f = fixture(
        "IPv6 fragment header",
        CLIENT6,
        VIP6,
        &long,
        Passed(PassFragment),
    );
    f.frame.ipv6_ext = Some(44);
    v.push(f);
    v
}

#[test]
fn fixture_table() {
    let mut h = Harness::new();
    let mut failures = Vec::new();
    for f in fixtures() {
        let frame = f.frame.build();
        let before = h.counters();
        let (verdict, out) = h.run(&frame, f.ingress_veth);
        let after = h.counters();
        let counted = delta(&before, &after);
        let mut check = |ok: bool, what: String| {
            if !ok {
                failures.push(format!("{}: {what}", f.name));
            }
        };
        match f.expect {
            Expect::Passed(reason) => {
                check(
                    verdict == XDP_PASS,
                    format!("verdict {verdict}, want XDP_PASS"),
                );
                check(out == frame, "a passed frame was modified".into());
                check(
                    counted == vec![(Counter::Seen, 1), (reason, 1)],
                    format!("counters {counted:?}, want seen and {}", reason.name()),
                );
            }
            Expect::Dispatched(want) => {
                check(verdict == want, format!("verdict {verdict}, want {want}"));
                let want_counter = if want == XDP_TX {
                    Counter::Tx
                } else {
                    Counter::Redirect
                };
                check(
                    counted == vec![(Counter::Seen, 1), (want_counter, 1)],
                    format!("counters {counted:?}"),
                );
                let Some(p) = parse(&out) else {
                    check(false, "output does not parse".into());
                    continue;
                };
                let backend = h.predicted(f.frame.dst.is_ipv6(), &f.frame.payload);
                check(
                    p.dst == backend,
                    format!("sent to {}, userspace predicts {backend}", p.dst),
                );
                check(p.src == f.frame.src, format!("source changed to {}", p.src));
                check(
                    p.dst_mac == backend_mac(backend.ip()),
                    format!("dst MAC {:x?}", p.dst_mac),
                );
                check(p.src_mac == VETH_MAC, format!("src MAC {:x?}", p.src_mac));
                check(p.vlan == f.frame.vlan, format!("VLAN tag {:?}", p.vlan));
                check(p.payload == f.frame.payload, "payload changed".into());
                check(p.ip_checksum_ok, "IPv4 header checksum wrong".into());
                check(p.udp_checksum_ok, "UDP checksum wrong".into());
                if f.frame.zero_udp_checksum {
                    check(
                        p.udp_checksum == 0,
                        "a zero IPv4 UDP checksum did not stay zero".into(),
                    );
                }
                check(out.len() == frame.len(), "frame length changed".into());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Hostile and odd input the fast path must handle (or pass) by rule.
#[test]
fn hostile_input() {
    let mut h = Harness::new();
    let dispatched = |h: &mut Harness, name: &str, spec: &FrameSpec| {
        let frame = spec.build();
        let (verdict, out) = h.run(&frame, true);
        assert_eq!(verdict, XDP_TX, "{name}");
        let p = parse(&out).unwrap_or_else(|| panic!("{name}: output does not parse"));
        assert_eq!(
            p.dst,
            h.predicted(spec.dst.is_ipv6(), &spec.payload),
            "{name}"
        );
        assert!(p.ip_checksum_ok && p.udp_checksum_ok, "{name}: checksums");
        p
    };
    let passed = |h: &mut Harness, name: &str, frame: &[u8], reason: Counter| {
        let before = h.counters();
        let (verdict, out) = h.run(frame, true);
        assert_eq!(verdict, XDP_PASS, "{name}");
        assert_eq!(out, frame, "{name}: modified");
        assert_eq!(
            delta(&before, &h.counters()),
            vec![(Counter::Seen, 1), (reason, 1)],
            "{name}"
        );
    };
    let udp =
        |payload: &[u8]| FrameSpec::udp(CLIENT4.parse().unwrap(), VIP4.parse().unwrap(), payload);

    // A Call-ID over 255 bytes, NUL bytes in headers and in the Call-ID, and the
    // characters <>:"[]{} with an IPv6 literal: all bytes of the value count.
    let long_id = format!("Call-ID: {}@198.18.1.10", "a".repeat(300));
    dispatched(&mut h, "300-byte Call-ID", &udp(&invite(&long_id)));
    dispatched(
        &mut h,
        "NUL bytes",
        &udp(&invite("Subject: a\0b\r\nCall-ID: nul\0inside@x")),
    );
    dispatched(
        &mut h,
        "special characters",
        &udp(&invite("Call-ID: <>:\"[]{}@[2001:db8::1]")),
    );
    // A SIP response sent to the VIP goes where its Call-ID goes.
    dispatched(
        &mut h,
        "response to the VIP",
        &udp(b"SIP/2.0 200 OK\r\nCall-ID: resp-1@x\r\nCSeq: 1 INVITE\r\n\r\n"),
    );
    // TTL 1: the dispatcher is not a router hop; the TTL is left as it came.
    let mut ttl1 = udp(&invite("Call-ID: ttl-1@x"));
    ttl1.ttl = 1;
    let out = h.run(&ttl1.build(), true).1;
    assert_eq!(out[22], 1, "TTL unchanged");
    dispatched(&mut h, "TTL 1", &ttl1);

    // Two messages in one datagram: the scan stops at the first blank line.
    let first_has_none = [invite("Subject: first"), invite("Call-ID: second@x")].concat();
    passed(
        &mut h,
        "second message's Call-ID",
        &udp(&first_has_none).build(),
        Counter::PassNoCallId,
    );
    let both = [invite("Call-ID: first@x"), invite("Call-ID: second@x")].concat();
    let p = dispatched(&mut h, "two messages", &udp(&both));
    assert_eq!(p.dst, h.predicted(false, &invite("Call-ID: first@x")));

    // QinQ (two tags) is not parsed: passed untouched as not ours.
    let mut qinq = udp(&invite("Call-ID: qinq@x"));
    qinq.vlan = Some((0x88a8, 100));
    let mut frame = qinq.build();
    frame.splice(16..16, [0x81, 0x00, 0x00, 0x07]);
    passed(&mut h, "QinQ", &frame, Counter::NotService);

    // A rewritten UDP checksum that computes to 0 is sent as 0xffff. The X-Adjust value
    // (after the Call-ID, so the backend stays) is chosen to make it so.
    let base = invite("Call-ID: adjust-1@x\r\nX-Adjust: ??");
    let backend = h.predicted(false, &base);
    let at = base.windows(2).position(|w| w == b"??").unwrap();
    let mut payload = base.clone();
    let mut found = None;
    for tweak in 0..=0xffffu32 {
        let hi = (tweak >> 8) as u8;
        let lo = tweak as u8;
        if [hi, lo].iter().any(|b| *b == b'\r' || *b == b'\n') {
            continue;
        }
        payload[at] = hi;
        payload[at + 1] = lo;
        let rewritten = FrameSpec::udp(CLIENT4.parse().unwrap(), backend, &payload).build();
        if parse(&rewritten).unwrap().udp_checksum == 0xffff {
            found = Some(payload.clone());
            break;
        }
    }
    let payload = found.expect("some adjust value yields a computed checksum of 0");
    let p = dispatched(&mut h, "checksum 0xffff", &udp(&payload));
    assert_eq!(p.udp_checksum, 0xffff);
}

#[test]
fn truncated_frames_are_passed_and_counted() {
    let mut h = Harness::new();
    let long = invite("Call-ID: a84b4c76e66710@pc33.atlanta.com");
    let full = FrameSpec::udp(CLIENT4.parse().unwrap(), VIP4.parse().unwrap(), &long).build();
    // Cut inside the IPv4 header, inside the UDP header, and inside the payload (the
    // UDP and IP lengths then claim more than the frame holds).
    for cut in [20, 14 + 20 + 4, 14 + 20 + 8 + 100] {
        let frame = &full[..cut];
        let before = h.counters();
        let (verdict, out) = h.run(frame, true);
        let counted = delta(&before, &h.counters());
        assert_eq!(verdict, XDP_PASS, "cut at {cut}");
        assert_eq!(out, frame, "cut at {cut}: frame modified");
        assert_eq!(
            counted,
            vec![(Counter::Seen, 1), (Counter::PassTruncated, 1)],
            "cut at {cut}"
        );
    }
}
