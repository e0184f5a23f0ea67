//! Kernel tests: the compiled XDP program, run by the kernel through BPF_PROG_TEST_RUN
//! on a table of fixture frames. Each test runs in a private network namespace (its
//! thread unshares one) with a veth, permanent neighbour entries for the backends and
//! forwarding on, so that `bpf_fib_lookup` answers as it would on a dispatcher.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN); fails loudly without it.
use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
};

use aya::programs::{TestRun as _, TestRunOptions};
use sip_dispatch::dataplane::{Affinity, Dataplane, ENV_FORCE_BPF_LOOP, ScanLoop};
use sip_dispatch_common::{
    Backend, Counter, HashKey, ScanOutcome,
    parse::{golden::GOLDEN_MESSAGES, scan_message},
    table::{SlotTable, Weighted, build_table},
};
use sip_dispatch_testbed::{
    frames::{FrameSpec, parse},
    testrun::{TestNet, TestVeth, XDP_PASS, XDP_REDIRECT, XDP_TX, XdpMd, run_once},
};

const VETH: &str = "kt0";
const VETH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const CLIENT4: &str = "198.18.1.10:5070";
const CLIENT6: &str = "[2001:db8:1::10]:5070";
const VIP4: &str = "198.18.1.100:5060";
const VIP6: &str = "[2001:db8:1::100]:5060";
/// A service whose only backend has no neighbour entry.
const VIP_NO_NEIGH: &str = "198.18.1.101:5060";

fn backend_mac(ip: IpAddr) -> [u8; 6] {
    let last = match ip {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    [0x02, 0, 0, 0, 0x01, last]
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Harness {
    dp: Dataplane,
    ifindex: u32,
    v4: SlotTable,
    v4_ids: Vec<u32>,
    v6: SlotTable,
    v6_ids: Vec<u32>,
    /// The private namespace; the thread leaves it when the harness is dropped.
    _net: TestNet,
}

fn weighted(addrs: &[(&str, u32)]) -> Vec<Weighted> {
    addrs
        .iter()
        .map(|(a, w)| Weighted {
            backend: Backend::from_socket_addr(a.parse().unwrap()),
            weight: *w,
        })
        .collect()
}

impl Harness {
    fn new() -> Harness {
        Harness::with_affinity(Default::default())
    }

    fn with_affinity(affinity: Affinity) -> Harness {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "kernel tests load XDP programs and need root: run them through `cargo xtask test`"
        );
        // This thread (and the commands it spawns) gets a network namespace of its own.
        let neighbours = [
            "198.18.1.21",
            "198.18.1.22",
            "198.18.1.23",
            "2001:db8:1::21",
            "2001:db8:1::22",
            "2001:db8:1::23",
        ]
        .map(|ip| {
            let ip: IpAddr = ip.parse().unwrap();
            (ip, backend_mac(ip))
        });
        let net = TestVeth {
            name: VETH,
            peer: "kt1",
            mac: VETH_MAC,
            neighbours: neighbours.to_vec(),
        }
        .build()
        .unwrap_or_else(|e| panic!("the test namespace: {e:#}"));
        let ifindex = net.ifindex;

        let mut dp = Dataplane::load_unpinned(HashKey::DEFAULT, affinity)
            .unwrap_or_else(|e| panic!("loading the XDP program: {e:#}"));
        // Both loop modes run these tests (`cargo xtask test` runs them again with the
        // fallback forced); this kernel (6.9+) has may_goto, so the default must use it.
        let forced = std::env::var(ENV_FORCE_BPF_LOOP).is_ok_and(|v| v == "1");
        let expected = if forced {
            ScanLoop::BpfLoop
        } else {
            ScanLoop::MayGoto
        };
        assert_eq!(
            dp.scan_loop(),
            expected,
            "{ENV_FORCE_BPF_LOOP} set: {forced}"
        );
        let v4 = build_table(
            &weighted(&[
                ("198.18.1.21:5060", 2),
                ("198.18.1.22:5062", 1),
                ("198.18.1.23:5064", 1),
            ]),
            HashKey::DEFAULT,
        )
        .unwrap();
        let v6 = build_table(
            &weighted(&[
                ("[2001:db8:1::21]:5060", 1),
                ("[2001:db8:1::22]:5060", 1),
                ("[2001:db8:1::23]:5060", 1),
            ]),
            HashKey::DEFAULT,
        )
        .unwrap();
        let no_neigh =
            build_table(&weighted(&[("198.18.1.50:5060", 1)]), HashKey::DEFAULT).unwrap();
        let v4_ids = dp
            .install_service(0, VIP4.parse().unwrap(), &v4)
            .unwrap()
            .iter()
            .map(|m| m.0)
            .collect();
        let v6_ids = dp
            .install_service(1, VIP6.parse().unwrap(), &v6)
            .unwrap()
            .iter()
            .map(|m| m.0)
            .collect();
        dp.install_service(2, VIP_NO_NEIGH.parse().unwrap(), &no_neigh)
            .unwrap();
        dp.add_tx_port(ifindex).unwrap();
        // The next-hop cache as the daemon's follower fills it: every backend with a
        // neighbour entry (all but the one of VIP_NO_NEIGH) is reached without the FIB.
        assert_eq!(dp.resolve_next_hops().unwrap(), 6, "valid next-hop entries");
        Harness {
            dp,
            ifindex,
            v4,
            v4_ids,
            v6,
            v6_ids,
            _net: net,
        }
    }

    /// Runs one frame; `ingress_veth` makes the frame arrive on the veth (so a backend
    /// behind it is reached with XDP_TX), otherwise it arrives on lo (XDP_REDIRECT).
    fn run(&mut self, frame: &[u8], ingress_veth: bool) -> (u32, Vec<u8>) {
        let ctx = XdpMd::frame(frame.len(), if ingress_veth { self.ifindex } else { 1 });
        let prog = self.dp.dispatch_program().unwrap();
        run_once(prog, frame, &ctx.to_bytes()).expect("BPF_PROG_TEST_RUN")
    }

    fn counters(&self) -> Vec<(Counter, u64)> {
        self.dp.counters().unwrap()
    }

    /// The backend userspace predicts for a message on the v4 or v6 service.
    fn predicted(&self, v6: bool, msg: &[u8]) -> SocketAddr {
        let scan = scan_message(msg, HashKey::DEFAULT);
        assert_eq!(scan.outcome, ScanOutcome::Found, "fixture has no Call-ID");
        let table = if v6 { &self.v6 } else { &self.v4 };
        table
            .member_for_hash(scan.hash)
            .expect("table has members")
            .backend
            .to_socket_addr()
    }
}

fn invite(call_id_header: &str) -> Vec<u8> {
    format!(
        "INVITE sip:service@198.18.1.100:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 198.18.1.10:5070;branch=z9hG4bK-1\r\n\
         From: sipp <sip:sipp@198.18.1.10:5070>;tag=1\r\n\
         To: <sip:service@198.18.1.100:5060>\r\n\
         {call_id_header}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:sipp@198.18.1.10:5070>\r\n\
         Max-Forwards: 70\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// The change in each dispatch counter between two snapshots, non-zero ones only (the
/// affinity counters are checked by the affinity tests, and `fib_fallback`, which says
/// how the next hop was found, by the next_hop tests, with [`all_delta`]).
fn delta(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> Vec<(Counter, u64)> {
    all_delta(before, after)
        .into_iter()
        .filter(|(c, _)| !c.name().starts_with("affinity_") && *c != Counter::FibFallback)
        .collect()
}

/// The change in every counter between two snapshots, non-zero ones only.
fn all_delta(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> Vec<(Counter, u64)> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.1 != b.1)
        .map(|(b, a)| (a.0, a.1 - b.1))
        .collect()
}

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

mod affinity {
    //! Call affinity in the kernel: which backend a message goes to once the call has an
    //! entry, across table swaps and backend state changes (the rules of
    //! `sip_dispatch_common::affinity::choose`), and what the counters say.
    use super::*;
    use sip_dispatch_common::{
        AffinityEntry, AffinityKey, BF_AFFINITY, BF_NEW, BF_UP, affinity::RETRANSMIT_WINDOW_NS,
    };

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
        h.dp.known_backend_id(addr.parse().unwrap()).unwrap()
    }

    fn set_flags(h: &mut Harness, addr: &str, flags: u32) {
        let id = id_of(h, addr);
        h.dp.set_backend_flags(id, flags).unwrap();
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
        h.dp.install_service(0, VIP4.parse().unwrap(), &t).unwrap();
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
        let freed = h.dp.release_unlisted(|x| x != a());
        assert_eq!(freed, vec![(a(), a_id)]);
        let newcomer = "198.18.1.22:5099";
        let t = build_table(
            &weighted(&[(newcomer, 1), ("198.18.1.23:5064", 1)]),
            HashKey::DEFAULT,
        )
        .unwrap();
        h.dp.install_service(0, VIP4.parse().unwrap(), &t).unwrap();
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
        let members = h.dp.install_service(0, VIP4.parse().unwrap(), &t).unwrap();
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
                let routed =
                    |e: Option<AffinityEntry>| e.map(|e| (e.backend, e.generation, e.flags));
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
        let mut put =
            |h: &mut Harness, backend: u32, id_gen: u32, last_seen_ns: u64, flags: u32| {
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
}

mod forwarding {
    //! The forwarding modes of a service in the kernel: `l2dsr` changes only the MACs,
    //! `ipip` puts an outer IP header to the backend in front; both keep the VIP as the
    //! packet's destination, so the backend answers from it.
    use super::*;
    use sip_dispatch_common::{EncapSource, FWD_IPIP, FWD_L2DSR};

    fn with_mode(mode: u32) -> Harness {
        let mut h = Harness::new();
        let (v4, v6) = (h.v4.clone(), h.v6.clone());
        h.dp.set_forwarding(0, mode);
        h.dp.set_forwarding(1, mode);
        h.dp.install_service(0, VIP4.parse().unwrap(), &v4).unwrap();
        h.dp.install_service(1, VIP6.parse().unwrap(), &v6).unwrap();
        h
    }

    fn frame(v6: bool, payload: &[u8]) -> Vec<u8> {
        let (src, dst) = if v6 { (CLIENT6, VIP6) } else { (CLIENT4, VIP4) };
        FrameSpec::udp(src.parse().unwrap(), dst.parse().unwrap(), payload).build()
    }

    /// `f` is passed untouched and counted under `reason`.
    fn passed(h: &mut Harness, f: &[u8], reason: Counter) {
        let before = h.counters();
        let (verdict, out) = h.run(f, true);
        assert_eq!((verdict, out == f), (XDP_PASS, true), "{reason:?}");
        assert_eq!(
            delta(&before, &h.counters()),
            vec![(Counter::Seen, 1), (reason, 1)]
        );
    }

    #[test]
    fn l2dsr_changes_only_the_ethernet_addresses() {
        let mut h = with_mode(FWD_L2DSR);
        for v6 in [false, true] {
            let msg = invite(&format!("Call-ID: dsr-{v6}@198.18.1.10"));
            let f = frame(v6, &msg);
            let (verdict, out) = h.run(&f, true);
            assert_eq!(verdict, XDP_TX, "v6 {v6}");
            let p = parse(&out).expect("output parses");
            let vip: SocketAddr = if v6 { VIP6 } else { VIP4 }.parse().unwrap();
            assert_eq!(p.dst, vip, "the destination stays the VIP");
            assert_eq!(p.dst_mac, backend_mac(h.predicted(v6, &msg).ip()));
            assert_eq!(p.src_mac, VETH_MAC);
            assert_eq!(out[12..], f[12..], "only the MACs changed");
        }
    }

    #[test]
    fn l2dsr_passes_a_backend_behind_a_gateway() {
        let mut h = Harness::new();
        sh(&["ip", "route", "add", "198.18.7.0/24", "via", "198.18.1.21"]);
        let far = build_table(&weighted(&[("198.18.7.7:5060", 1)]), HashKey::DEFAULT).unwrap();
        h.dp.set_forwarding(2, FWD_L2DSR);
        h.dp.install_service(2, VIP_NO_NEIGH.parse().unwrap(), &far)
            .unwrap();
        let f = FrameSpec::udp(
            CLIENT4.parse().unwrap(),
            VIP_NO_NEIGH.parse().unwrap(),
            &invite("Call-ID: far@198.18.1.10"),
        )
        .build();
        passed(&mut h, &f, Counter::PassNotOnLink);
    }

    #[test]
    fn ipip_puts_an_outer_header_to_the_backend_in_front() {
        let mut h = with_mode(FWD_IPIP);
        let src4: std::net::Ipv4Addr = "198.18.1.1".parse().unwrap();
        let src6: std::net::Ipv6Addr = "2001:db8:1::1".parse().unwrap();
        // No source address yet: passed, untouched.
        let msg = invite("Call-ID: ipip-0@198.18.1.10");
        let f = frame(false, &msg);
        passed(&mut h, &f, Counter::PassEncap);
        h.dp.set_encap_source(EncapSource::new(Some(src4), Some(src6)))
            .unwrap();
        for v6 in [false, true] {
            let msg = invite(&format!("Call-ID: ipip-{v6}@198.18.1.10"));
            let f = frame(v6, &msg);
            let (verdict, out) = h.run(&f, true);
            assert_eq!(verdict, XDP_TX, "v6 {v6}");
            let backend = h.predicted(v6, &msg);
            let outer = if v6 { 40 } else { 20 };
            assert_eq!(out.len(), f.len() + outer, "v6 {v6}");
            assert_eq!(out[0..6], backend_mac(backend.ip()));
            assert_eq!(out[6..12], VETH_MAC);
            assert_eq!(out[12..14], f[12..14], "the EtherType stays");
            assert_eq!(
                out[14 + outer..],
                f[14..],
                "the inner packet is the original"
            );
            let o = &out[14..14 + outer];
            if v6 {
                assert_eq!(o[0] >> 4, 6);
                assert_eq!(u16::from_be_bytes([o[4], o[5]]) as usize, f.len() - 14);
                assert_eq!(o[6], 41, "next header IPv6");
                assert_eq!(o[8..24], src6.octets());
                assert_eq!(
                    IpAddr::from(<[u8; 16]>::try_from(&o[24..40]).unwrap()),
                    backend.ip()
                );
            } else {
                assert_eq!(o[0], 0x45);
                assert_eq!(u16::from_be_bytes([o[2], o[3]]) as usize, f.len() - 14 + 20);
                assert_eq!(o[9], 4, "protocol IPIP");
                assert_eq!(o[12..16], src4.octets());
                assert_eq!(
                    IpAddr::from(<[u8; 4]>::try_from(&o[16..20]).unwrap()),
                    backend.ip()
                );
                let sum: u32 = o
                    .chunks(2)
                    .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                    .sum();
                let folded = (sum & 0xffff) + (sum >> 16);
                assert_eq!(
                    (folded & 0xffff) + (folded >> 16),
                    0xffff,
                    "header checksum"
                );
            }
        }
        // A VLAN tag stays in front of the outer header.
        let msg = invite("Call-ID: ipip-tagged@198.18.1.10");
        let mut spec = FrameSpec::udp(CLIENT4.parse().unwrap(), VIP4.parse().unwrap(), &msg);
        spec.vlan = Some((0x8100, 42));
        let f = spec.build();
        let (verdict, out) = h.run(&f, true);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out.len(), f.len() + 20);
        assert_eq!(out[12..18], f[12..18], "the tag and the EtherType stay");
        assert_eq!(out[18], 0x45);
        assert_eq!(out[18 + 20..], f[18..], "the inner packet is the original");
        // A packet that would not fit the egress MTU (1500) with the outer header.
        let mut big = invite("Call-ID: ipip-big@198.18.1.10");
        big.resize(1500 - 20 - 8 - 10, b' ');
        let f = frame(false, &big);
        passed(&mut h, &f, Counter::PassEncap);
    }
}

mod next_hop {
    //! The next-hop cache (`sd_nexthop_v1`): a valid entry replaces the FIB lookup with
    //! the same rules (MTU, l2dsr's on-link rule); an invalid one falls back to the FIB.
    use super::*;
    use sip_dispatch_common::{FWD_IPIP, FWD_L2DSR, NH_ON_LINK, NH_VALID, NextHop};

    fn id_of(h: &Harness, addr: &str) -> u32 {
        h.dp.known_backend_id(addr.parse().unwrap())
            .expect("backend has an id")
    }

    /// Sends `msg` to the v4 VIP from the veth: verdict, output, counters that moved.
    fn send(h: &mut Harness, msg: &[u8]) -> (u32, Vec<u8>, Vec<(Counter, u64)>) {
        let f = FrameSpec::udp(CLIENT4.parse().unwrap(), VIP4.parse().unwrap(), msg).build();
        let before = h.counters();
        let (verdict, out) = h.run(&f, true);
        let moved = all_delta(&before, &h.counters())
            .into_iter()
            .filter(|(c, _)| !c.name().starts_with("affinity_"))
            .collect();
        (verdict, out, moved)
    }

    #[test]
    fn the_resolver_fills_what_the_fib_says() {
        let h = Harness::new();
        let ifindex = h.ifindex;
        for (addr, ip) in [
            ("198.18.1.21:5060", "198.18.1.21"),
            ("198.18.1.22:5062", "198.18.1.22"),
            ("[2001:db8:1::23]:5060", "2001:db8:1::23"),
        ] {
            let e = h.dp.next_hop(id_of(&h, addr)).unwrap();
            assert_eq!(
                (e.ifindex, e.mtu, e.dmac, e.smac, e.flags),
                (
                    ifindex,
                    1500,
                    backend_mac(ip.parse().unwrap()),
                    VETH_MAC,
                    NH_VALID | NH_ON_LINK
                ),
                "{addr}"
            );
        }
        // No neighbour entry: not valid (the FIB path, and the stack, resolve it).
        let e = h.dp.next_hop(id_of(&h, "198.18.1.50:5060")).unwrap();
        assert_eq!(e.flags & NH_VALID, 0, "{e:?}");
        // The interface's IPv6 MTU applies to IPv6 backends only, as in the FIB.
        let mut h = h;
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{VETH}/mtu"), "1400").unwrap();
        h.dp.resolve_next_hops().unwrap();
        let mtu = |h: &Harness, addr: &str| h.dp.next_hop(id_of(h, addr)).unwrap().mtu;
        assert_eq!(mtu(&h, "[2001:db8:1::23]:5060"), 1400);
        assert_eq!(mtu(&h, "198.18.1.21:5060"), 1500);
    }

    #[test]
    fn a_valid_entry_is_used_instead_of_the_fib() {
        let mut h = Harness::new();
        let msg = invite("Call-ID: nh-1@198.18.1.10");
        let backend = h.predicted(false, &msg);
        let id = id_of(&h, &backend.to_string());
        let (verdict, out, moved) = send(&mut h, &msg);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out[0..6], backend_mac(backend.ip()));
        assert_eq!(
            moved,
            vec![(Counter::Seen, 1), (Counter::Tx, 1)],
            "no FIB lookup"
        );

        // The entry, not the FIB, decides: a MAC only the entry has is the one used.
        let known = h.dp.next_hop(id).unwrap();
        let moved_mac = [0x02, 0, 0, 0, 0x77, 0x77];
        for write in sip_dispatch::nexthops::steps(
            known,
            Some(NextHop {
                dmac: moved_mac,
                ..known
            }),
        ) {
            h.dp.set_next_hop(id, write).unwrap();
        }
        let (verdict, out, moved) = send(&mut h, &msg);
        assert_eq!((verdict, &out[0..6]), (XDP_TX, &moved_mac[..]));
        assert_eq!(moved, vec![(Counter::Seen, 1), (Counter::Tx, 1)]);

        // Invalid: the FIB's answer (the neighbour table's MAC), counted as a fallback.
        for write in sip_dispatch::nexthops::steps(h.dp.next_hop(id).unwrap(), None) {
            h.dp.set_next_hop(id, write).unwrap();
        }
        let (verdict, out, moved) = send(&mut h, &msg);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out[0..6], backend_mac(backend.ip()));
        assert_eq!(
            moved,
            vec![
                (Counter::Seen, 1),
                (Counter::Tx, 1),
                (Counter::FibFallback, 1)
            ]
        );
    }

    #[test]
    fn a_valid_entry_keeps_the_mtu_and_on_link_rules() {
        let mut h = Harness::new();
        let msg = invite("Call-ID: nh-mtu@198.18.1.10");
        let backend = h.predicted(false, &msg);
        let id = id_of(&h, &backend.to_string());
        let known = h.dp.next_hop(id).unwrap();
        let write = |h: &mut Harness, e: NextHop| {
            for w in sip_dispatch::nexthops::steps(h.dp.next_hop(id).unwrap(), Some(e)) {
                h.dp.set_next_hop(id, w).unwrap();
            }
        };
        let ip_len = 20 + 8 + msg.len() as u32;
        // Rewrite: exactly the MTU fits, one byte less does not (as FRAG_NEEDED).
        write(
            &mut h,
            NextHop {
                mtu: ip_len,
                ..known
            },
        );
        assert_eq!(send(&mut h, &msg).0, XDP_TX);
        write(
            &mut h,
            NextHop {
                mtu: ip_len - 1,
                ..known
            },
        );
        let (verdict, _, moved) = send(&mut h, &msg);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(moved, vec![(Counter::Seen, 1), (Counter::PassFibMiss, 1)]);
        // ipip: the outer header counts.
        h.dp.set_encap_source(sip_dispatch_common::EncapSource::new(
            Some("198.18.1.1".parse().unwrap()),
            None,
        ))
        .unwrap();
        let v4 = h.v4.clone();
        h.dp.set_forwarding(0, FWD_IPIP);
        h.dp.install_service(0, VIP4.parse().unwrap(), &v4).unwrap();
        write(
            &mut h,
            NextHop {
                mtu: ip_len + 20,
                ..known
            },
        );
        assert_eq!(send(&mut h, &msg).0, XDP_TX);
        write(
            &mut h,
            NextHop {
                mtu: ip_len + 19,
                ..known
            },
        );
        let (verdict, _, moved) = send(&mut h, &msg);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(moved, vec![(Counter::Seen, 1), (Counter::PassEncap, 1)]);
        // l2dsr: an entry behind a gateway is not on the link.
        h.dp.set_forwarding(0, FWD_L2DSR);
        h.dp.install_service(0, VIP4.parse().unwrap(), &v4).unwrap();
        write(&mut h, known);
        assert_eq!(send(&mut h, &msg).0, XDP_TX);
        write(
            &mut h,
            NextHop {
                flags: NH_VALID,
                ..known
            },
        );
        let (verdict, _, moved) = send(&mut h, &msg);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(moved, vec![(Counter::Seen, 1), (Counter::PassNotOnLink, 1)]);
    }

    #[test]
    fn a_backend_behind_a_gateway_gets_the_gateways_mac() {
        let mut h = Harness::new();
        sh(&[
            "ip",
            "route",
            "add",
            "198.18.7.0/24",
            "via",
            "198.18.1.21",
            "mtu",
            "1400",
        ]);
        let far = build_table(&weighted(&[("198.18.7.7:5060", 1)]), HashKey::DEFAULT).unwrap();
        h.dp.install_service(2, VIP_NO_NEIGH.parse().unwrap(), &far)
            .unwrap();
        assert_eq!(h.dp.resolve_next_hops().unwrap(), 7);
        let e = h.dp.next_hop(id_of(&h, "198.18.7.7:5060")).unwrap();
        let gw_mac = backend_mac("198.18.1.21".parse().unwrap());
        assert_eq!((e.dmac, e.mtu, e.flags), (gw_mac, 1400, NH_VALID));
        let f = FrameSpec::udp(
            CLIENT4.parse().unwrap(),
            VIP_NO_NEIGH.parse().unwrap(),
            &invite("Call-ID: far@198.18.1.10"),
        )
        .build();
        let before = h.counters();
        let (verdict, out) = h.run(&f, true);
        assert_eq!((verdict, &out[0..6]), (XDP_TX, &gw_mac[..]));
        let p = parse(&out).expect("output parses");
        assert_eq!(p.dst, "198.18.7.7:5060".parse().unwrap());
        let moved: Vec<_> = all_delta(&before, &h.counters())
            .into_iter()
            .filter(|(c, _)| !c.name().starts_with("affinity_"))
            .collect();
        assert_eq!(moved, vec![(Counter::Seen, 1), (Counter::Tx, 1)]);
    }
}

mod decap {
    //! `ipip_decap` (`sip-dispatch decap`), the backend's side of `ipip`: IP-in-IP from an
    //! accepted source loses its outer header, everything else passes untouched. No
    //! namespace: the program only reads the frame and its map of accepted sources.
    use super::*;
    use aya::{Ebpf, programs::Xdp};
    use sip_dispatch::dataplane::load_decap;
    use sip_dispatch_common::{PROG_DECAP, csum::checksum};

    /// The dispatchers' encapsulation sources given to `--from`.
    const FROM4: &str = "198.18.0.2";
    const FROM6: &str = "2001:db8::2";
    /// The backend the outer header goes to.
    const BACKEND4: &str = "198.18.0.21";
    const BACKEND6: &str = "2001:db8::21";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn load() -> Ebpf {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "kernel tests load XDP programs and need root: run them through `cargo xtask test`"
        );
        load_decap(&[ip(FROM4), ip(FROM6)]).expect("loading ipip_decap")
    }

    fn run(ebpf: &mut Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = ebpf.program_mut(PROG_DECAP).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }

    /// The outer header of a test frame.
    struct Outer {
        src: IpAddr,
        /// IPv4: flags and fragment offset; IPv6: a fragment header with these bits.
        frags: u16,
        /// IPv4 options (a multiple of 4 bytes).
        options: Vec<u8>,
    }

    impl Outer {
        fn from(src: &str) -> Outer {
            Outer {
                src: ip(src),
                frags: 0,
                options: Vec::new(),
            }
        }
    }

    /// The UDP frame `inner` as a dispatcher's `ipip` sends it: an outer header from
    /// `outer.src` to the backend (its family's protocol: 4 or 41, whatever the inner
    /// packet is) after the Ethernet header and any VLAN tag, whose EtherType becomes the
    /// outer's.
    fn encapsulated(inner: &[u8], outer: &Outer) -> Vec<u8> {
        let l3 = if matches!(inner[12..14], [0x81, 0x00] | [0x88, 0xa8]) {
            18
        } else {
            14
        };
        let packet = &inner[l3..];
        let mut head = Vec::new();
        let ether_type: u16 = match outer.src {
            IpAddr::V4(s) => {
                let ihl = 20 + outer.options.len();
                let mut h = vec![0u8; 20];
                h[0] = 0x40 | (ihl / 4) as u8;
                h[2..4].copy_from_slice(&((ihl + packet.len()) as u16).to_be_bytes());
                h[6..8].copy_from_slice(&outer.frags.to_be_bytes());
                h[8] = 64;
                h[9] = 4;
                h[12..16].copy_from_slice(&s.octets());
                let IpAddr::V4(d) = ip(BACKEND4) else {
                    unreachable!()
                };
                h[16..20].copy_from_slice(&d.octets());
                h.extend_from_slice(&outer.options);
                let c = checksum(0, &h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                head.extend_from_slice(&h);
                0x0800
            }
            IpAddr::V6(s) => {
                let frag_len = if outer.frags != 0 { 8 } else { 0 };
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&((frag_len + packet.len()) as u16).to_be_bytes());
                h[6] = if outer.frags != 0 { 44 } else { 41 };
                h[7] = 64;
                h[8..24].copy_from_slice(&s.octets());
                let IpAddr::V6(d) = ip(BACKEND6) else {
                    unreachable!()
                };
                h[24..40].copy_from_slice(&d.octets());
                head.extend_from_slice(&h);
                if outer.frags != 0 {
                    let [a, b] = outer.frags.to_be_bytes();
                    head.extend_from_slice(&[41, 0, a, b, 0, 0, 0x12, 0x34]);
                }
                0x86dd
            }
        };
        let mut f = inner[..l3].to_vec();
        f[l3 - 2..l3].copy_from_slice(&ether_type.to_be_bytes());
        f.extend_from_slice(&head);
        f.extend_from_slice(packet);
        f
    }

    fn udp_frame(v6: bool) -> Vec<u8> {
        let (src, dst) = if v6 { (CLIENT6, VIP6) } else { (CLIENT4, VIP4) };
        let msg = invite(&format!("Call-ID: decap-{v6}@198.18.1.10"));
        FrameSpec::udp(src.parse().unwrap(), dst.parse().unwrap(), &msg).build()
    }

    /// `f` comes out as it went in.
    fn untouched(ebpf: &mut Ebpf, f: &[u8], what: &str) {
        let (verdict, out) = run(ebpf, f);
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert!(out == f, "{what}: the frame changed");
    }

    #[test]
    fn ip_in_ip_from_an_accepted_source_loses_its_outer_header() {
        let mut ebpf = load();
        for (v6, from) in [(false, FROM4), (true, FROM6)] {
            let inner = udp_frame(v6);
            let f = encapsulated(&inner, &Outer::from(from));
            let outer = if v6 { 40 } else { 20 };
            assert_eq!(f.len(), inner.len() + outer);
            let (verdict, out) = run(&mut ebpf, &f);
            assert_eq!(verdict, XDP_PASS, "v6 {v6}");
            assert_eq!(out.len(), inner.len(), "v6 {v6}: the outer header is gone");
            assert_eq!(out[0..12], f[0..12], "v6 {v6}: the MACs stay");
            assert_eq!(out[12..14], f[12..14], "v6 {v6}: the EtherType stays");
            assert!(out == inner, "v6 {v6}: the inner frame, byte for byte");
            let p = parse(&out).expect("the inner datagram parses, checksums right");
            let vip: SocketAddr = if v6 { VIP6 } else { VIP4 }.parse().unwrap();
            assert_eq!(p.dst, vip, "v6 {v6}");
        }
    }

    #[test]
    fn ip_in_ip_from_another_source_passes_untouched() {
        let mut ebpf = load();
        for (v6, from) in [
            (false, "198.18.0.3"),
            (false, BACKEND4),
            (true, "2001:db8::3"),
            // Its first word is 198.18.0.2's: only the family tells them apart.
            (true, "c612:2::"),
        ] {
            let f = encapsulated(&udp_frame(v6), &Outer::from(from));
            untouched(&mut ebpf, &f, &format!("from {from}"));
        }
    }

    #[test]
    fn outer_fragments_options_and_a_wrong_inner_version_pass_untouched() {
        let mut ebpf = load();
        for (frags, what) in [
            (0x2000, "first fragment (MF)"),
            (0x0010, "last fragment (offset)"),
            (0x2010, "middle fragment"),
        ] {
            let mut outer = Outer::from(FROM4);
            outer.frags = frags;
            untouched(&mut ebpf, &encapsulated(&udp_frame(false), &outer), what);
            let mut outer = Outer::from(FROM6);
            // The fragment header's offset/flags field: offset << 3, M in bit 0.
            outer.frags = if frags & 0x2000 != 0 { 1 } else { 0 } | (frags & 0x1fff) << 3;
            untouched(
                &mut ebpf,
                &encapsulated(&udp_frame(true), &outer),
                &format!("IPv6 {what}"),
            );
        }
        let mut outer = Outer::from(FROM4);
        outer.options = vec![1, 1, 1, 0]; // NOP, NOP, NOP, end of options
        untouched(
            &mut ebpf,
            &encapsulated(&udp_frame(false), &outer),
            "outer IPv4 header with options",
        );
        // IPv6 inside protocol 4, IPv4 inside next header 41.
        untouched(
            &mut ebpf,
            &encapsulated(&udp_frame(true), &Outer::from(FROM4)),
            "IPv6 in IPv4",
        );
        untouched(
            &mut ebpf,
            &encapsulated(&udp_frame(false), &Outer::from(FROM6)),
            "IPv4 in IPv6",
        );
    }

    #[test]
    fn tagged_frames_plain_udp_and_truncated_headers_pass_untouched() {
        let mut ebpf = load();
        for v6 in [false, true] {
            let (src, dst, from) = if v6 {
                (CLIENT6, VIP6, FROM6)
            } else {
                (CLIENT4, VIP4, FROM4)
            };
            let mut spec = FrameSpec::udp(
                src.parse().unwrap(),
                dst.parse().unwrap(),
                &invite("Call-ID: decap-tagged@198.18.1.10"),
            );
            spec.vlan = Some((0x8100, 42));
            let tagged = encapsulated(&spec.build(), &Outer::from(from));
            assert_eq!(tagged[12..14], [0x81, 0x00]);
            untouched(&mut ebpf, &tagged, &format!("VLAN-tagged, v6 {v6}"));
            untouched(&mut ebpf, &udp_frame(v6), &format!("plain UDP, v6 {v6}"));
            // The outer header and the inner one's first byte cut short.
            let f = encapsulated(&udp_frame(v6), &Outer::from(from));
            let outer = if v6 { 40 } else { 20 };
            for len in [14 + outer - 1, 14 + outer] {
                untouched(&mut ebpf, &f[..len], &format!("cut at {len}, v6 {v6}"));
            }
        }
    }

    #[test]
    fn more_than_64_sources_are_refused() {
        let many: Vec<IpAddr> = (1..=65u8).map(|i| IpAddr::from([198, 18, 0, i])).collect();
        let e = load_decap(&many).unwrap_err().to_string();
        assert!(e.contains("65 decap sources"), "{e}");
        // Repeats count once.
        let repeated: Vec<IpAddr> = many[..64].iter().chain(&many[..64]).copied().collect();
        load_decap(&repeated).expect("64 distinct sources");
    }
}
