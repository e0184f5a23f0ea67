//! The fixture table (in the manner of Katran's `katran/lib/testing/` fixtures): each row
//! is a description, one input frame, and what must come out of the program for it: the
//! verdict, the counters that move, and the output frame (untouched when passed; for a
//! dispatched frame, the backend userspace predicts, with only the MACs changed and the
//! checksums right). Cases that need state or a sequence of frames are tests of their own.
use sip_dispatch_common::Counter;
use sip_dispatch_testbed::{
    frames::{FrameSpec, parse},
    testrun::{XDP_PASS, XDP_REDIRECT, XDP_TX},
};

use crate::harness::{
    CLIENT4, CLIENT6, Harness, VETH_MAC, VIP_NO_NEIGH, VIP4, VIP6, backend_mac, delta, invite,
};

/// The Call-ID header of most rows.
const LONG: &str = "Call-ID: a84b4c76e66710@pc33.atlanta.com";

enum Expect {
    /// Dispatched with this verdict to the backend userspace predicts.
    Dispatched(u32),
    /// Passed untouched, counted under this reason.
    Passed(Counter),
}

/// A change to the built frame that `FrameSpec` cannot express.
enum Edit {
    /// Only the first n bytes are sent.
    Truncate(usize),
    /// These bytes are inserted at this offset.
    Insert(usize, Vec<u8>),
}

struct Row {
    name: String,
    frame: FrameSpec,
    edit: Option<Edit>,
    /// The frame arrives on the veth (a backend behind it is reached with XDP_TX),
    /// otherwise on lo (XDP_REDIRECT).
    ingress_veth: bool,
    expect: Option<Expect>,
    /// Dispatched: also to the backend userspace predicts for this message.
    same_backend_as: Option<Vec<u8>>,
    /// Dispatched: the output's UDP checksum field.
    udp_checksum: Option<u16>,
    /// Dispatched: the output's IPv4 TTL or IPv6 hop limit.
    ttl: Option<u8>,
}

impl Row {
    /// `payload` from the client to the IPv4 service, arriving on the veth.
    fn message(name: &str, payload: &[u8]) -> Row {
        Row {
            name: name.to_string(),
            frame: FrameSpec::udp(CLIENT4.parse().unwrap(), VIP4.parse().unwrap(), payload),
            edit: None,
            ingress_veth: true,
            expect: None,
            same_backend_as: None,
            udp_checksum: None,
            ttl: None,
        }
    }

    /// An INVITE with this line where its Call-ID header goes (see [`invite`]).
    fn invite(name: &str, call_id_header: &str) -> Row {
        Row::message(name, &invite(call_id_header))
    }

    /// From the IPv6 client to the IPv6 service.
    fn v6(mut self) -> Row {
        self.frame.src = CLIENT6.parse().unwrap();
        self.frame.dst = VIP6.parse().unwrap();
        self
    }

    fn to(mut self, dst: &str) -> Row {
        self.frame.dst = dst.parse().unwrap();
        self
    }

    fn via_lo(mut self) -> Row {
        self.ingress_veth = false;
        self
    }

    fn vlan(mut self, tpid: u16, id: u16) -> Row {
        self.frame.vlan = Some((tpid, id));
        self
    }

    /// A second tag after the one of [`Row::vlan`].
    fn inner_vlan(mut self, tpid: u16, id: u16) -> Row {
        let tag = [tpid.to_be_bytes(), id.to_be_bytes()].concat();
        self.edit = Some(Edit::Insert(16, tag));
        self
    }

    fn ip_options(mut self, options: &[u8]) -> Row {
        self.frame.ip_options = options.to_vec();
        self
    }

    fn zero_udp_checksum(mut self) -> Row {
        self.frame.zero_udp_checksum = true;
        self
    }

    fn fragment(mut self, more: bool, offset: u16) -> Row {
        self.frame.fragment = Some((more, offset));
        self
    }

    fn ipv6_ext(mut self, next_header: u8) -> Row {
        self.frame.ipv6_ext = Some(next_header);
        self
    }

    fn ttl(mut self, ttl: u8) -> Row {
        self.frame.ttl = ttl;
        self
    }

    fn truncated_at(mut self, len: usize) -> Row {
        self.edit = Some(Edit::Truncate(len));
        self
    }

    fn expect_tx(mut self) -> Row {
        self.expect = Some(Expect::Dispatched(XDP_TX));
        self
    }

    fn expect_redirect(mut self) -> Row {
        self.expect = Some(Expect::Dispatched(XDP_REDIRECT));
        self
    }

    fn expect_pass(mut self, reason: Counter) -> Row {
        self.expect = Some(Expect::Passed(reason));
        self
    }

    fn expect_same_backend_as(mut self, msg: &[u8]) -> Row {
        self.same_backend_as = Some(msg.to_vec());
        self
    }

    fn expect_udp_checksum(mut self, checksum: u16) -> Row {
        self.udp_checksum = Some(checksum);
        self
    }

    fn expect_ttl(mut self, ttl: u8) -> Row {
        self.ttl = Some(ttl);
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut frame = self.frame.build();
        match &self.edit {
            None => {}
            Some(Edit::Truncate(len)) => frame.truncate(*len),
            Some(Edit::Insert(at, bytes)) => {
                frame.splice(*at..*at, bytes.iter().copied());
            }
        }
        frame
    }
}

/// How a message is framed: addresses, ingress, tags, IP options, fragments and cuts.
fn frame_rows() -> Vec<Row> {
    use Counter::*;
    vec![
        Row::invite("ipv4 long form", LONG).expect_tx(),
        Row::invite("ipv6 long form", LONG).v6().expect_tx(),
        Row::invite("compact form", "i: compact-1@198.18.1.10").expect_tx(),
        Row::invite(
            "lower case, spaces around colon",
            "call-id \t:  lower-1@x  ",
        )
        .expect_tx(),
        Row::invite("upper case", "CALL-ID:UPPER-1@x")
            .v6()
            .expect_tx(),
        Row::invite("UDP to another port", LONG)
            .to("198.18.1.100:5080")
            .expect_pass(NotService),
        Row::invite("UDP to another address", LONG)
            .to("198.18.1.99:5060")
            .expect_pass(NotService),
        Row::invite("backend without neighbour entry", LONG)
            .to(VIP_NO_NEIGH)
            .expect_pass(PassFibMiss),
        Row::invite("via lo: XDP_REDIRECT to the veth", LONG)
            .via_lo()
            .expect_redirect(),
        Row::invite("ipv6 via lo: XDP_REDIRECT", LONG)
            .v6()
            .via_lo()
            .expect_redirect(),
        Row::invite("802.1Q tag", LONG).vlan(0x8100, 42).expect_tx(),
        Row::invite("802.1ad tag, ipv6", LONG)
            .v6()
            .vlan(0x88a8, 42)
            .expect_tx(),
        // QinQ (two tags) is not parsed: passed untouched as not ours.
        Row::invite("QinQ", "Call-ID: qinq@x")
            .vlan(0x88a8, 100)
            .inner_vlan(0x8100, 7)
            .expect_pass(NotService),
        // Router alert, NOPs, EOL.
        Row::invite("IPv4 options", LONG)
            .ip_options(&[0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00])
            .expect_tx(),
        Row::invite("IPv4 UDP checksum 0", LONG)
            .zero_udp_checksum()
            .expect_tx(),
        // TTL 1: the dispatcher is not a router hop; the TTL is left as it came.
        Row::invite("TTL 1", "Call-ID: ttl-1@x")
            .ttl(1)
            .expect_tx()
            .expect_ttl(1),
        Row::invite("first fragment (MF)", LONG)
            .fragment(true, 0)
            .expect_pass(PassFragment),
        Row::invite("later fragment", LONG)
            .fragment(false, 185)
            .expect_pass(PassFragment),
        Row::invite("IPv6 hop-by-hop header", LONG)
            .v6()
            .ipv6_ext(0)
            .expect_pass(PassIpv6Ext),
        Row::invite("IPv6 fragment header", LONG)
            .v6()
            .ipv6_ext(44)
            .expect_pass(PassFragment),
        // Cut inside the IPv4 header, inside the UDP header, and inside the payload (the
        // UDP and IP lengths then claim more than the frame holds).
        Row::invite("cut at 20", LONG)
            .truncated_at(20)
            .expect_pass(PassTruncated),
        Row::invite("cut at 38", LONG)
            .truncated_at(14 + 20 + 4)
            .expect_pass(PassTruncated),
        Row::invite("cut at 142", LONG)
            .truncated_at(14 + 20 + 8 + 100)
            .expect_pass(PassTruncated),
    ]
}

/// What the scanner and the start-line rule make of a message, odd or hostile.
fn message_rows(h: &Harness) -> Vec<Row> {
    use Counter::*;
    let long = invite(LONG);
    let mut headers = String::new();
    while headers.len() < 1400 {
        headers.push_str("X-Padding: 0123456789abcdefghijklmnopqrstuvwxyz0123456789\r\n");
    }
    // The Call-ID is the last header, after 1400 bytes, and the frame still fits a
    // 1500-byte MTU (a larger one would be FRAG_NEEDED for the FIB).
    let late = format!("OPTIONS sip:x SIP/2.0\r\n{headers}Call-ID: late-1@198.18.1.10\r\n\r\n");
    assert!(late.find("Call-ID").unwrap() > 1400 && late.len() < 1472);
    let sip3 = String::from_utf8(long.clone())
        .unwrap()
        .replacen("SIP/2.0\r\n", "SIP/3.0\r\n", 1);
    let lower_method: Vec<u8> = long
        .iter()
        .enumerate()
        .map(|(i, b)| if i < 6 { b.to_ascii_lowercase() } else { *b })
        .collect();
    vec![
        Row::invite(
            "lookalike headers only",
            "X-Call-ID: fake-1\r\nCall-IDX: fake-2\r\ni-foo: fake-3\r\nSubject: Call-ID: fake-4",
        )
        .expect_pass(PassNoCallId),
        Row::message(
            "Call-ID only in the body",
            b"MESSAGE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 198.18.1.10\r\nContent-Type: message/sipfrag\r\n\r\nCall-ID: in-body@x\r\n",
        )
        .expect_pass(PassNoCallId),
        Row::invite("no Call-ID", "Subject: hello").expect_pass(PassNoCallId),
        Row::invite("empty Call-ID", "Call-ID:   ").expect_pass(PassNoCallId),
        Row::message("non-SIP UDP to the service port", &[0x17u8; 200])
            .expect_pass(PassNoCallId),
        Row::message(
            "not SIP, with a line that reads as a Call-ID header",
            b"\x17\x03\x03junk\ni: x\r\n\r\n",
        )
        .expect_pass(PassStartLine),
        Row::message(
            "a Call-ID header as the first line",
            b"Call-ID: first-line@x\r\n\r\n",
        )
        .expect_pass(PassStartLine),
        Row::message("another SIP version", sip3.as_bytes()).expect_pass(PassStartLine),
        Row::message(
            "a method in lower case (SIP, for the slow path)",
            &lower_method,
        )
        .expect_pass(PassStartLine),
        Row::message("Call-ID after 1400 bytes of headers", late.as_bytes()).expect_tx(),
        Row::invite(
            "Call-ID beyond the scan window",
            &format!("{headers}{headers}Call-ID: beyond-1@198.18.1.10"),
        )
        .expect_pass(PassCallIdBeyondWindow),
        // A Call-ID over 255 bytes, NUL bytes in headers and in the Call-ID, and the
        // characters <>:"[]{} with an IPv6 literal: all bytes of the value count.
        Row::invite(
            "300-byte Call-ID",
            &format!("Call-ID: {}@198.18.1.10", "a".repeat(300)),
        )
        .expect_tx(),
        Row::invite("NUL bytes", "Subject: a\0b\r\nCall-ID: nul\0inside@x").expect_tx(),
        Row::invite("special characters", "Call-ID: <>:\"[]{}@[2001:db8::1]").expect_tx(),
        // A SIP response sent to the VIP goes where its Call-ID goes.
        Row::message(
            "response to the VIP",
            b"SIP/2.0 200 OK\r\nCall-ID: resp-1@x\r\nCSeq: 1 INVITE\r\n\r\n",
        )
        .expect_tx(),
        // Two messages in one datagram: the scan stops at the first blank line.
        Row::message(
            "second message's Call-ID",
            &[invite("Subject: first"), invite("Call-ID: second@x")].concat(),
        )
        .expect_pass(PassNoCallId),
        Row::message(
            "two messages",
            &[invite("Call-ID: first@x"), invite("Call-ID: second@x")].concat(),
        )
        .expect_tx()
        .expect_same_backend_as(&invite("Call-ID: first@x")),
        Row::message("checksum 0xffff", &checksum_ffff_payload(h))
            .expect_tx()
            .expect_udp_checksum(0xffff),
    ]
}

/// A rewritten UDP checksum that computes to 0 is sent as 0xffff: an INVITE whose
/// X-Adjust value (after the Call-ID, so the backend stays) is chosen to make it so.
fn checksum_ffff_payload(h: &Harness) -> Vec<u8> {
    let base = invite("Call-ID: adjust-1@x\r\nX-Adjust: ??");
    let backend = h.predicted(false, &base);
    let at = base.windows(2).position(|w| w == b"??").unwrap();
    let mut payload = base.clone();
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
            return payload;
        }
    }
    panic!("no adjust value yields a computed checksum of 0");
}

#[test]
fn fixture_table() {
    let mut h = Harness::new();
    let mut failures = Vec::new();
    let rows = frame_rows().into_iter().chain(message_rows(&h));
    for row in rows {
        let frame = row.build();
        let before = h.counters();
        let (verdict, out) = h.run(&frame, row.ingress_veth);
        let after = h.counters();
        let counted = delta(&before, &after);
        let mut check = |ok: bool, what: String| {
            if !ok {
                failures.push(format!("{}: {what}", row.name));
            }
        };
        let spec = &row.frame;
        match row.expect {
            None => check(false, "the row expects nothing".into()),
            Some(Expect::Passed(reason)) => {
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
            Some(Expect::Dispatched(_)) if row.edit.is_some() => {
                check(false, "an edited frame can only be expected to pass".into());
            }
            Some(Expect::Dispatched(want)) => {
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
                let backend = h.predicted(spec.dst.is_ipv6(), &spec.payload);
                check(
                    p.dst == backend,
                    format!("sent to {}, userspace predicts {backend}", p.dst),
                );
                if let Some(msg) = &row.same_backend_as {
                    let other = h.predicted(spec.dst.is_ipv6(), msg);
                    check(
                        p.dst == other,
                        format!("sent to {}, not with its first message ({other})", p.dst),
                    );
                }
                check(p.src == spec.src, format!("source changed to {}", p.src));
                check(
                    p.dst_mac == backend_mac(backend.ip()),
                    format!("dst MAC {:x?}", p.dst_mac),
                );
                check(p.src_mac == VETH_MAC, format!("src MAC {:x?}", p.src_mac));
                check(p.vlan == spec.vlan, format!("VLAN tag {:?}", p.vlan));
                check(p.payload == spec.payload, "payload changed".into());
                check(p.ip_checksum_ok, "IPv4 header checksum wrong".into());
                check(p.udp_checksum_ok, "UDP checksum wrong".into());
                if spec.zero_udp_checksum {
                    check(
                        p.udp_checksum == 0,
                        "a zero IPv4 UDP checksum did not stay zero".into(),
                    );
                }
                if let Some(want) = row.udp_checksum {
                    check(
                        p.udp_checksum == want,
                        format!("UDP checksum {:#06x}, want {want:#06x}", p.udp_checksum),
                    );
                }
                if let Some(want) = row.ttl {
                    let ip = 14 + if spec.vlan.is_some() { 4 } else { 0 };
                    let at = ip + if spec.dst.is_ipv6() { 7 } else { 8 };
                    check(
                        out.get(at) == Some(&want),
                        format!("TTL {:?}, want {want}", out.get(at)),
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
