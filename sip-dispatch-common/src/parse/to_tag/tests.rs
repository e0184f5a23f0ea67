use super::reference::{DECOYS, Expect, reference};
use super::torture::TO_TORTURE;
use super::*;
use crate::maps::SCAN_WINDOW;
use crate::test_rng::Rng;
use std::{format, string::String, vec::Vec};

use ToTag::{BeyondWindow, NoTo, Tagged, Untagged};

const START: &str = "INVITE sip:bob@biloxi.com SIP/2.0\r\n";

fn lossy(msg: &[u8]) -> String {
    String::from_utf8_lossy(msg).into_owned()
}

/// Scans `msg[..len]` through the slice and the fixed-size array windows, checks that
/// they agree, and returns the result.
fn scan_both(msg: &[u8], len: usize, complete: bool) -> ToTag {
    let by_slice = scan_to_tag(msg, len, complete);
    if len <= SCAN_WINDOW {
        let mut window = DECOYS;
        window[..len].copy_from_slice(&msg[..len]);
        let by_array = scan_to_tag(&window, len, complete);
        assert_eq!(
            by_array,
            by_slice,
            "array and slice differ on {:?}[..{len}]",
            lossy(msg)
        );
    }
    by_slice
}

/// Scans a whole message; checks both windows and the reference agree; and that every
/// cut of it gives the answer when the cut holds the deciding byte, BeyondWindow
/// otherwise.
#[track_caller]
fn check(msg: &[u8]) -> ToTag {
    let got = scan_both(msg, msg.len(), true);
    let want = reference(msg);
    assert_eq!(got, want.outcome, "reference disagrees on {:?}", lossy(msg));
    check_cuts(msg, want);
    got
}

#[track_caller]
fn check_cuts(msg: &[u8], want: Expect) {
    for len in 0..msg.len() {
        let expected = if want.decided_at < len {
            want.outcome
        } else {
            BeyondWindow
        };
        assert_eq!(
            scan_both(msg, len, false),
            expected,
            "{:?} cut at {len} (decided at {})",
            lossy(msg),
            want.decided_at
        );
    }
}

#[track_caller]
fn answer(msg: &str, want: ToTag) {
    assert_eq!(check(msg.as_bytes()), want, "{msg:?}");
}

#[test]
fn names_in_any_case_and_compact_form() {
    for name in ["To", "to", "TO", "tO", "t", "T"] {
        for sep in [":", " :", "\t:", ": ", ":\t", " \t: \t"] {
            answer(
                &format!("{START}{name}{sep}<sip:a@b>;tag=1\r\n\r\n"),
                Tagged,
            );
            answer(&format!("{START}{name}{sep}<sip:a@b>\r\n\r\n"), Untagged);
            answer(&format!("{START}{name}{sep}sip:a@b;tag=1\r\n\r\n"), Tagged);
        }
    }
}

#[test]
fn lookalike_names_are_other_headers() {
    for line in [
        "Tox: <a>;tag=1",
        "X-To: <a>;tag=1",
        "T o: <a>;tag=1",
        "To x: <a>;tag=1",
        "Too: <a>;tag=1",
        "Ta: <a>;tag=1",
        "To",
        "t",
        ": <a>;tag=1",
        "Subject: To: <a>;tag=1",
        "From: <a>;tag=1",
        "f: <a>;tag=1",
    ] {
        answer(&format!("{START}{line}\r\nCSeq: 1 INVITE\r\n\r\n"), NoTo);
        answer(&format!("{START}{line}\r\nTo: <b>;tag=2\r\n\r\n"), Tagged);
        answer(&format!("{START}{line}\r\nTo: <b>\r\n\r\n"), Untagged);
    }
}

#[test]
fn quotes_and_angle_brackets_hide_tags() {
    for (value, want) in [
        ("\"x;tag=1\" <sip:a@b>", Untagged),
        ("\"x;tag=1\" <sip:a@b>;tag=2", Tagged),
        ("<sip:a@b;tag=1>", Untagged),
        ("<sip:a@b;tag=1>;tag=2", Tagged),
        ("\"<\" <sip:a@b>;tag=2", Tagged),
        ("\">;tag=1", Untagged),
        ("<sip:a@b;x=\">;tag=1", Tagged),
        ("\"a\\\"b;tag=1\" <sip:a@b>", Untagged),
        ("\"a\\\\\";tag=1", Tagged),
        ("\"a\\", Untagged),
        ("<sip:a@b", Untagged),
        ("<sip:a@b>;p=\"q;tag=1\"", Untagged),
        ("<sip:a@b>;p=\"q\";tag=1", Tagged),
        ("<sip:a@b>;tag=\"quoted\"", Tagged),
        ("<sip:a@b>;tag=", Tagged),
        ("<sip:a@b>;tag", Untagged),
        ("<sip:a@b>;tag;x=1", Untagged),
        ("<sip:a@b>;tag ;x=1", Untagged),
        ("<sip:a@b>;tag x=1", Untagged),
        ("<sip:a@b>;tag<x>=1", Untagged),
        ("<sip:a@b>;;tag=1", Tagged),
        ("<sip:a@b>; ;tag=1", Tagged),
        ("<sip:a@b>;=tag=1", Untagged),
        ("<sip:a@b>;x=tag=1", Untagged),
        ("<sip:a@b>;x=;tag=1", Tagged),
        ("<sip:a@b> ; TaG \t = 1", Tagged),
    ] {
        answer(&format!("{START}To: {value}\r\nCall-ID: x\r\n\r\n"), want);
        answer(&format!("{START}t:{value}"), want);
    }
}

#[test]
fn folds_continue_the_value() {
    for eol in ["\r\n", "\n", "\r"] {
        let head = format!("INVITE sip:b SIP/2.0{eol}");
        for (value, want) in [
            (format!("{eol} <sip:a@b>;tag=1"), Tagged),
            (format!("<sip:a@b>{eol} ;tag=1"), Tagged),
            (format!("<sip:a@b>;{eol}\ttag=1"), Tagged),
            (format!("<sip:a@b>;tag{eol} =1"), Tagged),
            (format!("<sip:a@b>;tag={eol} 1"), Tagged),
            (format!("<sip:a@b>;t{eol} ag=1"), Untagged),
            (format!("\"x{eol} ;tag=1\" <sip:a@b>"), Untagged),
            // The `\` escapes the blank after the fold, not the line end.
            (format!("\"x\\{eol} \";tag=1"), Tagged),
            (format!("\"x\\{eol} ;tag=1"), Untagged),
            (format!("<sip:a@b{eol} ;tag=1>"), Untagged),
            (format!("<sip:a@b>{eol};tag=1"), Untagged),
            (format!("<sip:a@b>{eol}{eol} ;tag=1"), Untagged),
        ] {
            answer(&format!("{head}To: {value}{eol}Call-ID: x{eol}{eol}"), want);
            answer(&format!("{head}To: {value}"), want);
        }
    }
}

#[test]
fn torture_corpus() {
    for (case, msg, want) in TO_TORTURE {
        assert_eq!(check(msg.as_bytes()), *want, "{case}");
    }
}

/// Every message of the Call-ID torture corpus: the scanner agrees with the reference.
#[test]
fn call_id_torture_messages_agree_with_the_reference() {
    let mut tagged = 0;
    for (case, msg, _) in crate::parse::torture::TORTURE {
        let got = check(msg.as_bytes());
        assert_ne!(got, NoTo, "{case}");
        tagged += (got == Tagged) as usize;
    }
    assert!(tagged >= 3, "{tagged}");
}

// ---------------------------------------------------------------------------------------
// A generated corpus.

const START_LINES: &[&str] = &[
    "INVITE sip:bob@biloxi.com SIP/2.0",
    "SIP/2.0 200 OK",
    "ACK sip:bob@192.0.2.4 SIP/2.0",
    "BYE sip:bob@192.0.2.4 SIP/2.0",
];

const NAMES: &[&str] = &[
    "To", "To", "To", "t", "t", "T", "TO", "Tox", "X-To", "Ta", "T o", "From", "f", "Via",
    "Call-ID", "Contact", "",
];

/// Pieces of To values.
const VALUE_PIECES: &[&str] = &[
    ";",
    ";",
    ";",
    "tag",
    "tag",
    "TAG",
    "Tag",
    "ta",
    "t",
    "g",
    "x",
    "=",
    "=",
    "\"",
    "\"",
    "\\",
    "<",
    ">",
    " ",
    "\t",
    "sip:a@b",
    "<sip:a@b>",
    "\"name\"",
    ";tag=",
    "; tag = ",
    "1",
];

const EOLS: &[&str] = &["\r\n", "\n", "\r"];

fn blanks(rng: &mut Rng, max: usize, out: &mut Vec<u8>) {
    for _ in 0..rng.below(max + 1) {
        out.push(*rng.pick(b" \t"));
    }
}

fn header_line(rng: &mut Rng, eol: &[u8], out: &mut Vec<u8>) {
    if rng.percent(8) {
        // A continuation line.
        out.push(*rng.pick(b" \t"));
    }
    let name = rng.pick(NAMES);
    let flip_case = rng.percent(50);
    for c in name.bytes() {
        let flip = flip_case && c.is_ascii_alphabetic() && rng.percent(50);
        out.push(if flip { c ^ 0x20 } else { c });
    }
    if rng.percent(20) {
        blanks(rng, 2, out);
    }
    if !rng.percent(5) {
        out.push(b':');
    }
    blanks(rng, 2, out);
    for _ in 0..rng.below(10) {
        if rng.percent(8) {
            // A fold (or, rarely, a line end that ends the header).
            out.extend_from_slice(eol);
            if !rng.percent(10) {
                out.push(*rng.pick(b" \t"));
            }
        }
        out.extend_from_slice(rng.pick(VALUE_PIECES).as_bytes());
    }
}

fn message(rng: &mut Rng) -> Vec<u8> {
    if rng.percent(15) {
        // Pieces strung together at random: the odd corners.
        let mut out = Vec::new();
        for _ in 0..rng.below(24) {
            let piece = if rng.percent(30) {
                *rng.pick(&["To", "t", ":", "\r", "\n", "\r\n", " "])
            } else {
                *rng.pick(VALUE_PIECES)
            };
            out.extend_from_slice(piece.as_bytes());
        }
        return out;
    }
    let style = if rng.percent(60) {
        Some(*rng.pick(EOLS))
    } else {
        None
    };
    let eol = |rng: &mut Rng| style.unwrap_or_else(|| *rng.pick(EOLS)).as_bytes();
    let mut out = Vec::new();
    out.extend_from_slice(rng.pick(START_LINES).as_bytes());
    let headers = rng.below(6);
    for h in 0..headers {
        out.extend_from_slice(eol(rng));
        let e = eol(rng);
        header_line(rng, e, &mut out);
        if h + 1 == headers && rng.percent(15) {
            return out;
        }
    }
    out.extend_from_slice(eol(rng));
    if rng.percent(70) {
        out.extend_from_slice(eol(rng));
        let e = eol(rng);
        header_line(rng, e, &mut out);
    }
    out
}

#[test]
fn generated_messages_match_the_reference() {
    let mut rng = Rng(0x70_7a65_0001);
    let mut seen = [0usize; 4];
    for _ in 0..20_000 {
        let msg = message(&mut rng);
        let got = scan_both(&msg, msg.len(), true);
        assert_eq!(got, reference(&msg).outcome, "{:?}", lossy(&msg));
        seen[got as usize] += 1;
    }
    // The generator must reach every outcome of a complete scan often.
    let [tagged, untagged, no_to, beyond] = seen;
    assert!(
        tagged > 1500 && untagged > 3000 && no_to > 3000 && beyond == 0,
        "{seen:?}"
    );
}

#[test]
fn generated_message_cuts_match_the_reference() {
    let mut rng = Rng(0x70_7a65_0002);
    for _ in 0..2_000 {
        let msg = message(&mut rng);
        check_cuts(&msg, reference(&msg));
    }
}

#[test]
fn every_step_moves_on() {
    let mut rng = Rng(0x70_7a65_0003);
    for _ in 0..5_000 {
        let msg = message(&mut rng);
        let mut s = ToTagScanner::new();
        let (mut at, mut steps) = (0, 0);
        while at < msg.len() {
            steps += 1;
            match s.step(msg.as_slice(), at, msg.len()) {
                ToTagStep::Done(_) => break,
                ToTagStep::Next(n) => {
                    assert!(n > at, "{:?} stuck at {at}", lossy(&msg));
                    at = n;
                }
            }
        }
        assert!(steps <= msg.len(), "{steps} steps for {} bytes", msg.len());
    }
}

#[test]
fn long_lines_before_the_to_header() {
    for pad in [0, 1, 7, 8, 9, 100, 1500] {
        let long = "x".repeat(pad);
        answer(
            &format!("{START}Subject: {long}\r\nTo: <a>;tag=1\r\n\r\n"),
            Tagged,
        );
        answer(&format!("{START}Via: {long}\nt: <a>\n\n"), Untagged);
    }
    // Past the window: the array scanner says BeyondWindow.
    let msg = format!(
        "{START}Subject: {}\r\nTo: <a>;tag=1\r\n\r\n",
        "x".repeat(3000)
    );
    let mut window = DECOYS;
    window.copy_from_slice(&msg.as_bytes()[..SCAN_WINDOW]);
    assert_eq!(scan_to_tag(&window, SCAN_WINDOW, false), BeyondWindow);
    assert_eq!(to_tag_of(msg.as_bytes()), Tagged);
}
