use super::*;
use crate::test_rng::Rng;
use std::{format, string::String, vec::Vec};

/// The message in a 2048-byte window whose bytes past the message are `fill`, as the
/// XDP program's scratch may hold anything there.
fn window(msg: &[u8], fill: u8) -> [u8; 2048] {
    let mut w = [fill; 2048];
    w[..msg.len()].copy_from_slice(msg);
    w
}

/// Checks the fast form against the rule on `msg`, with several fillers past its end;
/// returns what the fast form said.
fn check(msg: &[u8]) -> Option<StartLine> {
    let rule = start_line(msg);
    let fast = start_line_fast(msg, msg.len());
    for fill in [0u8, b' ', b'\r', b'\n', b'A', 0xff] {
        let w = window(msg, fill);
        assert_eq!(
            start_line_fast(&w, msg.len()),
            fast,
            "fill {fill:#x} changes the answer for {:?}",
            String::from_utf8_lossy(msg)
        );
    }
    if fast.is_some() {
        assert_eq!(fast, rule, "{:?}", String::from_utf8_lossy(msg));
    }
    fast
}

const METHODS: &[&str] = &[
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "SUBSCRIBE",
    "NOTIFY",
    "PRACK",
    "UPDATE",
    "REFER",
    "INFO",
    "MESSAGE",
    "PUBLISH",
    "A",
    "ABCDEFGH",
    "ABCDEFGHIJKLMNO",
];

#[test]
fn usual_requests_and_responses_are_recognised_as_the_rule_says() {
    for method in METHODS {
        for uri_len in [0usize, 1, 5, 20, 100, 200, 256 - 8 - 2 - method.len()] {
            let uri = "u".repeat(uri_len);
            for eol in ["\r\n", "\n", "\r"] {
                let line = if uri_len == 0 {
                    format!("{method} SIP/2.0")
                } else {
                    format!("{method} sip:{uri} SIP/2.0")
                };
                if line.len() >= FAST_LINE_MAX {
                    continue;
                }
                let msg = format!("{line}{eol}Call-ID: x\r\n\r\n");
                assert_eq!(check(msg.as_bytes()), Some(StartLine::Request), "{msg:?}");
            }
        }
    }
    for line in [
        "SIP/2.0 200 OK",
        "SIP/2.0 ",
        "SIP/2.0 100 Trying",
        "SIP/2.0 999",
    ] {
        let msg = format!("{line}\r\nCall-ID: x\r\n\r\n");
        assert_eq!(check(msg.as_bytes()), Some(StartLine::Response), "{msg:?}");
    }
}

#[test]
fn what_the_fast_form_leaves_to_the_slow_path() {
    let cases: &[&[u8]] = &[
        // Not SIP at all.
        b"\x17\x17\x17\x17\x17\x17\x17\x17\x17\x17",
        b"junk\r\ni: x\r\n\r\n",
        b"\ni: x\r\n\r\n",
        b"Call-ID: x\r\n\r\n",
        b"\r\n\r\n",
        b"",
        b"SIP/2.0",
        b"SIP/2.00 200 OK\r\n",
        b"sip/2.0 200 OK\r\n",
        b"INVITE sip:x SIP/2.1\r\n",
        b"INVITE sip:x sip/2.0\r\n",
        b"INVITE sip:xSIP/2.0\r\n",
        b"INVITE sip:x SIP/2.0 \r\n",
        b"INV ITE\r\n",
        b" INVITE sip:x SIP/2.0\r\n",
        b"INVITE\tsip:x SIP/2.0\r\n",
        b"INVITE sip:x SIP/2.0",
        // SIP, but not in the fast form: the slow path takes them.
        b"invite sip:x SIP/2.0\r\n",
        b"NEW-METHOD sip:x SIP/2.0\r\n",
        b"ABCDEFGHIJKLMNOP sip:x SIP/2.0\r\n",
    ];
    for msg in cases {
        assert_eq!(check(msg), None, "{:?}", String::from_utf8_lossy(msg));
    }
    let long = format!("INVITE sip:{} SIP/2.0\r\n", "u".repeat(FAST_LINE_MAX));
    assert_eq!(check(long.as_bytes()), None);
    assert_eq!(start_line(long.as_bytes()), Some(StartLine::Request));
    assert_eq!(
        start_line(b"NEW-METHOD sip:x SIP/2.0\r\n"),
        Some(StartLine::Request)
    );
}

/// Random start lines built from the pieces that matter (letters, spaces, the version,
/// line ends, token and other characters), and random bytes: the fast form never
/// disagrees with the rule.
#[test]
fn the_fast_form_never_contradicts_the_rule() {
    const PIECES: &[&[u8]] = &[
        b"INVITE",
        b"A",
        b"SIP/2.0",
        b" SIP/2.0",
        b"SIP/2.0 ",
        b" ",
        b"  ",
        b"\r",
        b"\n",
        b"\r\n",
        b"sip:",
        b"u",
        b"uuuuuuuu",
        b"-",
        b"\t",
        b"Z",
        b"[",
        b"@",
        b"\0",
        b"\xff",
        b"i: x",
        b"Call-ID: y",
    ];
    let mut rng = Rng(0x5eed_57a7);
    let mut some = 0;
    for _ in 0..200_000 {
        let mut msg = Vec::new();
        let pieces = 1 + rng.below(12);
        for _ in 0..pieces {
            msg.extend_from_slice(PIECES[rng.below(PIECES.len())]);
        }
        if rng.percent(25) {
            for _ in 0..rng.below(24) {
                msg.push(rng.next() as u8);
            }
        }
        if check(&msg).is_some() {
            some += 1;
        }
    }
    assert!(some > 1000, "only {some} random lines were recognised");
}

#[test]
fn upper_mask_flags_exactly_the_capitals() {
    for b in 0..=255u8 {
        let w = u64::from_le_bytes([b'a', b, 0, b'Z', b'A', 0xc1, b'@', b'[']);
        let m = upper_mask(w);
        assert_eq!(m & 0xff00 != 0, b.is_ascii_uppercase(), "{b:#x}");
        assert_eq!(m & !0xff00, 0x0000_0080_8000_0000, "{b:#x}");
    }
}
