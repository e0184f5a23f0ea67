use super::golden::GOLDEN_MESSAGES;
use super::*;
use crate::hash::call_id_hash;
use crate::maps::{FAST_PATH_PROMISE, SCAN_WINDOW};
use crate::test_rng::Rng;
use std::{format, string::String, vec::Vec};

use super::reference::{DECOYS, expected_scan, reference, split_lines};
use ScanOutcome::{BeyondWindow, Empty, Found, NoCallId};

const KEY: HashKey = HashKey::DEFAULT;
const START: &str = "INVITE sip:bob@biloxi.com SIP/2.0\r\n";

// ---------------------------------------------------------------------------------------
// Running the scanner.

fn lossy(msg: &[u8]) -> String {
    String::from_utf8_lossy(msg).into_owned()
}

/// Scans `msg[..len]` through the slice and the fixed-size array windows, checks that they
/// agree, and returns the result.
fn scan_both(msg: &[u8], len: usize, complete: bool) -> Scan {
    let by_slice = scan_call_id(msg, len, complete, KEY);
    if len <= SCAN_WINDOW {
        let mut window = DECOYS;
        window[..len].copy_from_slice(&msg[..len]);
        let by_array = scan_call_id(&window, len, complete, KEY);
        assert_eq!(
            by_array,
            by_slice,
            "array and slice differ on {:?}[..{len}]",
            lossy(msg)
        );
    }
    by_slice
}

/// Scans a whole message; checks both windows and the reference agree.
#[track_caller]
fn check(msg: &[u8]) -> Scan {
    let got = scan_both(msg, msg.len(), true);
    assert_eq!(scan_message(msg, KEY), got);
    assert_eq!(
        got,
        expected_scan(msg, reference(msg), KEY),
        "reference disagrees on {:?}",
        lossy(msg)
    );
    got
}

#[track_caller]
fn found(msg: &str, want: &str) {
    let m = msg.as_bytes();
    let s = check(m);
    assert_eq!(s.outcome, Found, "{msg:?}");
    assert_eq!(&msg[s.start as usize..s.end as usize], want, "{msg:?}");
    assert_eq!(s.hash, call_id_hash(KEY, want.as_bytes()), "{msg:?}");
}

#[track_caller]
fn outcome(msg: &str, want: ScanOutcome) {
    assert_eq!(check(msg.as_bytes()).outcome, want, "{msg:?}");
}

// ---------------------------------------------------------------------------------------
// Hand-written cases.

#[test]
fn long_and_compact_forms_in_any_case() {
    for name in [
        "Call-ID", "call-id", "CALL-ID", "cAlL-iD", "Call-Id", "i", "I",
    ] {
        found(
            &format!("{START}Via: SIP/2.0/UDP a\r\n{name}: abc@host\r\nCSeq: 1 INVITE\r\n\r\n"),
            "abc@host",
        );
    }
}

#[test]
fn blanks_around_the_colon() {
    for sep in [
        ":",
        " :",
        "\t:",
        " \t :",
        ": ",
        ":\t",
        ":  \t ",
        " \t:\t ",
        "\t\t:\t\t",
    ] {
        for name in ["Call-ID", "i", "I"] {
            found(&format!("{START}{name}{sep}abc@host\r\n\r\n"), "abc@host");
        }
    }
}

#[test]
fn blanks_in_the_value_are_trimmed_and_skipped_by_the_hash() {
    found(&format!("{START}Call-ID: abc@host \t \r\n\r\n"), "abc@host");
    found(&format!("{START}Call-ID: abc@host\t\n\n"), "abc@host");
    found(&format!("{START}i:abc@host  "), "abc@host");
    found(
        &format!("{START}Call-ID: abc @\thost \r\n\r\n"),
        "abc @\thost",
    );
    let spaced = scan_message(
        format!("{START}Call-ID: abc @\thost \r\n\r\n").as_bytes(),
        KEY,
    );
    let plain = scan_message(format!("{START}Call-ID: abc@host\r\n\r\n").as_bytes(), KEY);
    assert_eq!(spaced.hash, plain.hash);
}

#[test]
fn lookalike_headers_do_not_match() {
    let lookalikes = [
        "X-Call-ID: x",
        "Call-IDX: x",
        "Call-ID-Foo: x",
        "Callid: x",
        "CallID: x",
        "Call_ID: x",
        "Call-I: x",
        "Call: x",
        "C: x",
        "c: application/sdp",
        "Call-ID x: y",
        "i-foo: x",
        "ix: x",
        "i x: y",
        "Call-ID",
        "i",
        ": x",
        "Subject: Call-ID: fake",
        "Subject: i: fake",
        "To: <sip:a@b>;Call-ID: x",
        "Info: x",
    ];
    for line in lookalikes {
        outcome(
            &format!("{START}{line}\r\nCSeq: 1 INVITE\r\n\r\n"),
            NoCallId,
        );
        found(&format!("{START}{line}\r\nCall-ID: real\r\n\r\n"), "real");
    }
}

#[test]
fn continuation_lines_are_not_headers() {
    for fold in [
        " Call-ID: fake",
        "\tCall-ID: fake",
        "   i: fake",
        " \t call-id:fake",
    ] {
        for eol in ["\r\n", "\n", "\r"] {
            let head = format!("INVITE sip:b SIP/2.0{eol}Subject: hello{eol}{fold}{eol}");
            outcome(&format!("{head}{eol}"), NoCallId);
            found(&format!("{head}Call-ID: real{eol}{eol}"), "real");
        }
    }
}

#[test]
fn a_call_id_in_the_body_is_not_found() {
    outcome(
        &format!("{START}CSeq: 1 INVITE\r\nContent-Length: 18\r\n\r\nCall-ID: in-body\r\n"),
        NoCallId,
    );
    outcome(
        "INVITE sip:b SIP/2.0\nCSeq: 1 INVITE\n\nCall-ID: in-body\n",
        NoCallId,
    );
    outcome(
        "INVITE sip:b SIP/2.0\rCSeq: 1 INVITE\r\rCall-ID: in-body\r",
        NoCallId,
    );
    outcome(
        "INVITE sip:b SIP/2.0\r\nCSeq: 1 INVITE\r\n\nCall-ID: in-body\r\n",
        NoCallId,
    );
    outcome(
        "INVITE sip:b SIP/2.0\nCSeq: 1 INVITE\n\rCall-ID: in-body\r\n",
        NoCallId,
    );
    let sipfrag = concat!(
        "NOTIFY sip:alice@pc33.atlanta.com SIP/2.0\r\n",
        "Event: refer\r\n",
        "Content-Type: message/sipfrag\r\n",
        "Content-Length: 47\r\n",
        "\r\n",
        "SIP/2.0 200 OK\r\n",
        "Call-ID: frag@192.0.2.9\r\n",
        "\r\n",
    );
    outcome(sipfrag, NoCallId);
    // An empty first line (a keepalive, or a stray line end) ends the headers at once.
    outcome("\r\nCall-ID: abc\r\n\r\n", NoCallId);
}

#[test]
fn every_line_end_style() {
    let lines = [
        "INVITE sip:bob@biloxi.com SIP/2.0",
        "Via: SIP/2.0/UDP a",
        "Call-ID: abc@host",
        "CSeq: 1 INVITE",
        "",
        "v=0",
    ];
    for eol in ["\r\n", "\n", "\r"] {
        found(&lines.join(eol), "abc@host");
        found(&lines[..3].join(eol), "abc@host");
        let cut = [
            "INVITE sip:bob@biloxi.com SIP/2.0",
            "Via: SIP/2.0/UDP a",
            "",
            "Call-ID: abc@host",
            "",
        ];
        outcome(&cut.join(eol), NoCallId);
    }
    found(
        "INVITE sip:b SIP/2.0\r\nVia: a\nTo: b\rCall-ID: abc\r\nX: y\n\r\n",
        "abc",
    );
    found(
        "INVITE sip:b SIP/2.0\rVia: a\r\nCall-ID: abc\rX: y\r\r",
        "abc",
    );
    found(
        "INVITE sip:b SIP/2.0\nVia: a\rCall-ID: abc\nX: y\n\n",
        "abc",
    );
    // LF then CR is a line end and an empty line.
    outcome("INVITE sip:b SIP/2.0\nVia: a\n\rCall-ID: abc\r\n", NoCallId);
    // A line end inside a name ends the line: these are "Call" and "ID: abc", "i" and ": abc".
    for eol in ["\r\n", "\n", "\r"] {
        outcome(
            &format!("INVITE sip:b SIP/2.0{eol}Call{eol}ID: abc{eol}{eol}"),
            NoCallId,
        );
        outcome(
            &format!("INVITE sip:b SIP/2.0{eol}Call-{eol}ID: abc{eol}{eol}"),
            NoCallId,
        );
        outcome(
            &format!("INVITE sip:b SIP/2.0{eol}i{eol}: abc{eol}{eol}"),
            NoCallId,
        );
    }
}

#[test]
fn folded_headers_before_the_call_id() {
    for eol in ["\r\n", "\n", "\r"] {
        let msg = format!(
            "INVITE sip:b SIP/2.0{eol}Via: SIP/2.0/UDP a{eol} ;branch=z9hG4bK1{eol}\t;received=192.0.2.1{eol}\
             Subject: lunch{eol}   Call-ID: not-me{eol}Call-ID: abc@host{eol}{eol}"
        );
        found(&msg, "abc@host");
    }
}

#[test]
fn value_folded_onto_the_next_line() {
    found(
        &format!("{START}Call-ID:\r\n  abc@host\r\n\r\n"),
        "abc@host",
    );
    found(
        &format!("{START}Call-ID: \t\r\n\tabc@host\r\n\r\n"),
        "abc@host",
    );
    found(&format!("{START}i:\n abc@host\n\n"), "abc@host");
    found(&format!("{START}Call-ID :\r abc@host \r\r"), "abc@host");
    found(&format!("{START}Call-ID:\r\n abc@host"), "abc@host");
    // A blank continuation line before the value is skipped as well.
    found(
        &format!("{START}Call-ID:\r\n \r\n abc@host\r\n\r\n"),
        "abc@host",
    );
}

#[test]
fn empty_values() {
    for msg in [
        format!("{START}Call-ID: \r\n"),
        format!("{START}Call-ID:"),
        format!("{START}Call-ID:\r"),
        format!("{START}i:\t\r\n\r\n"),
        format!("{START}Call-ID: \r\nCSeq: 1 INVITE\r\n\r\n"),
        format!("{START}Call-ID:\r\nNext: x\r\n\r\n"),
        format!("{START}Call-ID:\nNext: x\n\n"),
        format!("{START}Call-ID:\rNext: x\r\r"),
        format!("{START}Call-ID:  \r\n\r\nabc@body"),
        format!("{START}Call-ID:\r\n \r\nNext: x\r\n\r\n"),
    ] {
        outcome(&msg, Empty);
    }
}

#[test]
fn the_first_call_id_wins() {
    found(
        &format!("{START}Call-ID: first\r\ni: second\r\n\r\n"),
        "first",
    );
    found(&format!("{START}i: first\r\nCall-ID: second"), "first");
    outcome(
        &format!("{START}Call-ID: \r\nCall-ID: second\r\n\r\n"),
        Empty,
    );
}

/// At least `len` bytes of header lines: a start line, then `X-Filler` headers.
fn filler(len: usize) -> String {
    let mut msg = String::from(START);
    let mut n = 0;
    while msg.len() < len {
        msg.push_str(&format!("X-Filler-{n}: {}\r\n", "f".repeat(40)));
        n += 1;
    }
    msg
}

/// Exactly `len` bytes of header lines.
fn filler_exact(len: usize) -> String {
    let mut msg = filler(len - 120);
    let pad = len - msg.len() - "X-Pad: \r\n".len();
    msg.push_str(&format!("X-Pad: {}\r\n", "p".repeat(pad)));
    assert_eq!(msg.len(), len);
    msg
}

#[test]
fn a_call_id_after_1400_bytes_is_found_in_a_2048_byte_window() {
    let mut msg = filler(1400);
    let at = msg.len();
    msg.push_str("Call-ID: late@192.0.2.1\r\nCSeq: 1 INVITE\r\nContent-Length: 2000\r\n\r\n");
    msg.push_str(&"b".repeat(2000));
    assert!((1400..FAST_PATH_PROMISE).contains(&at) && msg.len() > SCAN_WINDOW);

    let mut window = [0u8; SCAN_WINDOW];
    window.copy_from_slice(&msg.as_bytes()[..SCAN_WINDOW]);
    let want = check(msg.as_bytes());
    assert_eq!(
        &msg[want.start as usize..want.end as usize],
        "late@192.0.2.1"
    );
    assert_eq!(scan_call_id(&window, SCAN_WINDOW, false, KEY), want);
    assert_eq!(scan_call_id(&window, SCAN_WINDOW, true, KEY), want);

    // The same headers without the body fit the window whole.
    let short = &msg[..msg.find("\r\n\r\n").unwrap() + 4];
    let mut window = [0u8; SCAN_WINDOW];
    window[..short.len()].copy_from_slice(short.as_bytes());
    assert_eq!(scan_call_id(&window, short.len(), true, KEY), want);
    assert_eq!(scan_call_id(&window, short.len(), false, KEY), want);
}

#[test]
fn window_semantics() {
    let w = SCAN_WINDOW;
    let window_of = |msg: &str| {
        let mut window = [0u8; SCAN_WINDOW];
        window.copy_from_slice(&msg.as_bytes()[..w]);
        window
    };

    // The Call-ID starts beyond the window.
    let msg = format!("{}Call-ID: far@host\r\n\r\n", filler(2100));
    let window = window_of(&msg);
    assert_eq!(scan_call_id(&window, w, false, KEY).outcome, BeyondWindow);
    assert_eq!(scan_call_id(&window, w, true, KEY).outcome, NoCallId);
    found(&msg, "far@host");

    // The value is cut by the end of the window.
    let head = filler_exact(w - 20);
    let cut = w - head.len() - "Call-ID: ".len();
    let msg = format!("{head}Call-ID: abcdefghijklmnopqrstuvwxyz@host\r\n\r\n");
    let window = window_of(&msg);
    assert_eq!(scan_call_id(&window, w, false, KEY).outcome, BeyondWindow);
    let truncated = scan_call_id(&window, w, true, KEY);
    assert_eq!(truncated.outcome, Found);
    assert_eq!(
        &msg[truncated.start as usize..truncated.end as usize],
        &"abcdefghijklmnopqrstuvwxyz@host"[..cut]
    );

    // The window ends in the blanks before the value, or right after the colon.
    for tail in ["Call-ID:  ", "Call-ID:\r", "Call-ID:\r\n", "i:"] {
        let msg = format!("{START}{tail}");
        let n = msg.len();
        assert_eq!(
            scan_call_id(msg.as_bytes(), n, false, KEY).outcome,
            BeyondWindow,
            "{msg:?}"
        );
        assert_eq!(
            scan_call_id(msg.as_bytes(), n, true, KEY).outcome,
            Empty,
            "{msg:?}"
        );
    }

    // A line end right at the window end settles the value.
    let msg = format!("{START}Call-ID: abc\r");
    assert_eq!(
        scan_call_id(msg.as_bytes(), msg.len(), false, KEY).outcome,
        Found
    );

    // Headers that do not end: more may come in a partial look, none in a whole message.
    let msg = format!("{START}Via: SIP/2.0/UDP a\r\nCSeq: 1 INVITE\r\n");
    assert_eq!(
        scan_call_id(msg.as_bytes(), msg.len(), false, KEY).outcome,
        BeyondWindow
    );
    outcome(&msg, NoCallId);
    outcome("", NoCallId);
    assert_eq!(
        scan_call_id(&[0u8; SCAN_WINDOW], 0, false, KEY).outcome,
        BeyondWindow
    );
}

/// Every prefix of every hand-written message, through both windows (checked in
/// `scan_both`), both complete and partial, against the reference.
#[test]
fn every_prefix_of_the_golden_messages() {
    for (msg, _) in GOLDEN_MESSAGES {
        check_prefixes(msg.as_bytes());
    }
}

fn check_prefixes(msg: &[u8]) {
    let full = reference(msg);
    for w in 0..=msg.len() {
        let want = if full.decided_at < w {
            expected_scan(msg, full, KEY)
        } else {
            Scan::miss(BeyondWindow)
        };
        assert_eq!(
            scan_both(msg, w, false),
            want,
            "{:?}[..{w}] partial",
            lossy(msg)
        );
        let prefix = &msg[..w];
        let want = expected_scan(prefix, reference(prefix), KEY);
        assert_eq!(
            scan_both(msg, w, true),
            want,
            "{:?}[..{w}] complete",
            lossy(msg)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Generated messages, checked against the reference.

const START_LINES: &[&str] = &[
    "INVITE sip:bob@biloxi.com SIP/2.0",
    "SIP/2.0 200 OK",
    "ACK sip:bob@192.0.2.4 SIP/2.0",
    "INFO sip:carol@chicago.com SIP/2.0",
    "CANCEL sip:bob@biloxi.com SIP/2.0",
];

const NAMES: &[&str] = &[
    "Call-ID",
    "Call-ID",
    "Call-ID",
    "i",
    "i",
    "X-Call-ID",
    "Call-IDX",
    "Call-ID-Foo",
    "Callid",
    "CallID",
    "Call-I",
    "Call-",
    "Call",
    "C",
    "c",
    "Ca",
    "i-foo",
    "ix",
    "I-",
    "Via",
    "v",
    "To",
    "From",
    "CSeq",
    "Subject",
    "Contact",
    "Content-Length",
    "l",
    "",
];

const PIECES: &[&str] = &[
    "Call", "CALL", "-", "ID", "id", "-iD", "i", "I", "c", "x", ":", ": ", " ", "\t", "\r", "\n",
    "\r\n", "v@h", "Call-ID",
];

const VALUE_BYTES: &[u8] = b"abcxyz0189@.-_:;<>=\"' \t%\xc3\xa9";

const EOLS: &[&str] = &["\r\n", "\n", "\r"];

fn blanks(rng: &mut Rng, max: usize, out: &mut Vec<u8>) {
    for _ in 0..rng.below(max + 1) {
        out.push(*rng.pick(b" \t"));
    }
}

fn header_line(rng: &mut Rng, eol: &[u8], out: &mut Vec<u8>) {
    if rng.percent(10) {
        // A continuation line.
        out.push(*rng.pick(b" \t"));
        blanks(rng, 2, out);
    }
    let name = rng.pick(NAMES);
    let flip_case = rng.percent(50);
    for c in name.bytes() {
        let flip = flip_case && c.is_ascii_alphabetic() && rng.percent(50);
        out.push(if flip { c ^ 0x20 } else { c });
    }
    if rng.percent(30) {
        blanks(rng, 2, out);
    }
    if !rng.percent(5) {
        out.push(b':');
    }
    blanks(rng, 3, out);
    if rng.percent(15) {
        // Fold before the value, sometimes with a blank line in between.
        for _ in 0..=rng.below(2) {
            out.extend_from_slice(eol);
            out.push(*rng.pick(b" \t"));
            blanks(rng, 2, out);
        }
    }
    if rng.percent(5) {
        out.extend_from_slice(b"Call-ID: inner");
    }
    for _ in 0..rng.below(12) {
        out.push(*rng.pick(VALUE_BYTES));
    }
}

fn message(rng: &mut Rng) -> Vec<u8> {
    if rng.percent(20) {
        // Pieces of names, separators and line ends strung together at random: these
        // reach the odd corners (a line end inside a name, a fold without a name, ...).
        let mut out = Vec::new();
        for _ in 0..rng.below(24) {
            out.extend_from_slice(rng.pick(PIECES).as_bytes());
        }
        return out;
    }
    // One line end style for the whole message, or a random one per line.
    let style = if rng.percent(60) {
        Some(*rng.pick(EOLS))
    } else {
        None
    };
    let eol = |rng: &mut Rng| style.unwrap_or_else(|| *rng.pick(EOLS)).as_bytes();
    let mut out = Vec::new();
    out.extend_from_slice(rng.pick(START_LINES).as_bytes());
    let headers = rng.below(10);
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
        // The blank line, and a body that looks like headers.
        out.extend_from_slice(eol(rng));
        for _ in 0..rng.below(3) {
            let e = eol(rng);
            header_line(rng, e, &mut out);
            out.extend_from_slice(e);
        }
    }
    out
}

#[test]
fn generated_messages_match_the_reference() {
    let mut rng = Rng(0x5eed_0001);
    let mut seen = [0usize; 4];
    for _ in 0..30_000 {
        let msg = message(&mut rng);
        let s = check(&msg);
        seen[s.outcome as usize] += 1;
    }
    // The generator must reach every outcome of a complete scan often.
    let [found, no_call_id, empty, beyond] = seen;
    assert!(
        found > 5000 && no_call_id > 5000 && empty > 500 && beyond == 0,
        "{seen:?}"
    );
}

#[test]
fn generated_message_prefixes_match_the_reference() {
    let mut rng = Rng(0x5eed_0002);
    for _ in 0..3_000 {
        check_prefixes(&message(&mut rng));
    }
}

// ---------------------------------------------------------------------------------------
// Golden vectors, shared with the kernel test.

fn content_length(msg: &[u8]) -> Option<(usize, usize)> {
    let lines = split_lines(msg);
    let blank = lines.iter().find(|l| l.start == l.end)?;
    let declared = lines.iter().find_map(|l| {
        let text = std::str::from_utf8(&msg[l.start..l.end]).ok()?;
        let (name, value) = text.split_once(':')?;
        let name = name.trim_end();
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l") {
            value.trim().parse().ok()
        } else {
            None
        }
    })?;
    Some((declared, msg.len() - blank.next))
}

#[test]
fn golden_messages() {
    // Pinned: the XDP program must arrive at exactly these numbers. The second and third
    // are also in the hash module's golden vectors.
    let hashes = [
        0x113cbd7f9f13a32e,
        0x8ccb167c1fc71768,
        0xd388c586b2cc11ba,
        0x0e0b5f0ad041655a,
        0x37c1ce587f1568a0,
    ];
    assert_eq!(GOLDEN_MESSAGES.len(), hashes.len());
    for (&(msg, call_id), want) in GOLDEN_MESSAGES.iter().zip(hashes) {
        found(msg, call_id);
        let s = scan_message(msg.as_bytes(), KEY);
        assert_eq!(s.hash, want, "{call_id}: {:#018x}", s.hash);
        let (declared, body) =
            content_length(msg.as_bytes()).expect("Content-Length and a blank line");
        assert_eq!(declared, body, "{call_id}: Content-Length");
        assert!(
            msg.len() <= FAST_PATH_PROMISE,
            "{call_id}: fits the fast path"
        );
    }
}

/// Every message of the torture corpus gives its expected Call-ID (or none), as a whole
/// message and through a 2048-byte window.
#[test]
fn torture_corpus() {
    use crate::parse::torture::TORTURE;
    for (case, msg, want) in TORTURE {
        let bytes = msg.as_bytes();
        let scan = scan_message(bytes, HashKey::DEFAULT);
        match want {
            Some(id) => {
                assert_eq!(scan.outcome, ScanOutcome::Found, "{case}");
                assert_eq!(
                    &bytes[scan.start as usize..scan.end as usize],
                    id.as_bytes(),
                    "{case}"
                );
                assert_eq!(
                    scan.hash,
                    call_id_hash(HashKey::DEFAULT, id.as_bytes()),
                    "{case}"
                );
            }
            None => assert_ne!(scan.outcome, ScanOutcome::Found, "{case}"),
        }
        let mut window = [0u8; 2048];
        let n = bytes.len().min(2048);
        window[..n].copy_from_slice(&bytes[..n]);
        assert_eq!(
            scan_call_id(&window, n, bytes.len() <= 2048, HashKey::DEFAULT),
            scan,
            "{case}"
        );
    }
}

#[test]
fn first_flagged_byte_finds_the_lowest_high_bit() {
    for k in 0..8 {
        let m = 0x80u64 << (8 * k);
        assert_eq!(super::first_flagged_byte(m), k);
        // Higher flagged bytes do not matter.
        assert_eq!(super::first_flagged_byte(m | 0x8000_0000_0000_0000), k);
    }
}

#[test]
fn byte_masks_are_exact() {
    let mut rng = Rng(0x5eed);
    let interesting = [
        b' ', b'\t', b'\r', b'\n', b'!', 0x08, 0x0c, 0x0b, 0, 0x80, 0xa0, 0xff,
    ];
    for _ in 0..20_000 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = if rng.percent(70) {
                *rng.pick(&interesting)
            } else {
                rng.next() as u8
            };
        }
        let w = u64::from_le_bytes(b);
        let want = |f: fn(u8) -> bool| {
            (0..8)
                .filter(|&k| f(b[k]))
                .fold(0u64, |m, k| m | 0x80 << (8 * k))
        };
        assert_eq!(super::blank_mask(w), want(is_blank), "{b:?}");
        let eol = super::eol_mask(w);
        if let Some(k) = b.iter().position(|&c| is_eol(c)) {
            assert_eq!(super::first_flagged_byte(eol), k, "{b:?}");
        } else {
            assert_eq!(eol, 0, "{b:?}");
        }
    }
    for n in 1..=8 {
        assert_eq!(super::low_bytes(n).count_ones() as usize, 8 * n);
    }
}

#[test]
fn control_bytes_are_ordinary_bytes() {
    // Bytes below 0x21 other than blanks and line ends, in skipped lines and in values,
    // at every offset within a word.
    for pad in 0..16 {
        let p = "p".repeat(pad);
        for ctl in ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x0e", "\x1f"] {
            let value = format!("{p}a{ctl}b{ctl}{ctl}cdefghijklmnopqrstu{ctl}");
            found(
                &format!("{START}X-{p}: {ctl}{p}{ctl}x\r\nVia: {ctl}\r\nCall-ID: {value}\r\n\r\n"),
                &value,
            );
            found(&format!("{START}i:{value}"), &value);
        }
    }
}
