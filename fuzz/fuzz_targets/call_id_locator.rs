//! The Call-ID locator (`sip_dispatch_common::parse::scan_call_id`) on arbitrary bytes:
//! over the whole input as a slice, and through the XDP program's fixed-size window.
//!
//! Checked: no panic; the two agree whenever the window holds the whole message (and
//! otherwise the window answers `BeyondWindow` unless the answer was settled inside it);
//! a `Found` span is in bounds, on one line, trimmed, and its hash is SipHash-1-3 of its
//! bytes without blanks; and everything equals the slow line-based reference below.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sip_dispatch_common::{
    HashKey, SCAN_WINDOW, Scan, ScanOutcome, hash::siphash13, parse::scan_message, scan_call_id,
};

const KEY: HashKey = HashKey::DEFAULT;

/// The window's bytes past the message: Call-ID headers, which show if the scanner reads
/// past `len`.
const DECOYS: [u8; SCAN_WINDOW] = {
    let decoy = b"\r\nCall-ID: decoy\r\n";
    let mut w = [0u8; SCAN_WINDOW];
    let mut i = 0;
    while i < SCAN_WINDOW {
        w[i] = decoy[i % decoy.len()];
        i += 1;
    }
    w
};

fuzz_target!(|msg: &[u8]| {
    let len = msg.len();
    let by_slice = scan_call_id(msg, len, true, KEY);
    assert_eq!(scan_message(msg, KEY), by_slice);

    // What the XDP program sees: the first SCAN_WINDOW bytes.
    let seen = len.min(SCAN_WINDOW);
    let mut window = DECOYS;
    window[..seen].copy_from_slice(&msg[..seen]);
    let by_window = scan_call_id(&window, seen, len <= SCAN_WINDOW, KEY);

    let want = reference(msg);
    assert_eq!(by_slice, expected_scan(msg, want), "slice vs reference");
    if len <= SCAN_WINDOW {
        assert_eq!(by_window, by_slice, "window vs slice");
    } else if want.decided_at < SCAN_WINDOW {
        assert_eq!(
            by_window, by_slice,
            "window vs slice (settled in the window)"
        );
    } else {
        assert_eq!(
            by_window,
            miss(ScanOutcome::BeyondWindow),
            "cut by the window"
        );
        // The window taken as a whole message is a message of its own.
        let head = &msg[..SCAN_WINDOW];
        assert_eq!(
            scan_call_id(&window, SCAN_WINDOW, true, KEY),
            expected_scan(head, reference(head)),
            "window as a whole message"
        );
    }

    if by_slice.outcome == ScanOutcome::Found {
        let (start, end) = (by_slice.start as usize, by_slice.end as usize);
        assert!(start < end && end <= len, "span {start}..{end} of {len}");
        let value = &msg[start..end];
        assert!(!value.iter().copied().any(is_eol), "line end in the value");
        assert!(!is_blank(value[0]) && !is_blank(value[value.len() - 1]));
        assert_eq!(by_slice.hash, siphash13(KEY, &strip_blanks(value)));
    } else {
        assert_eq!(by_slice, miss(by_slice.outcome));
        assert_ne!(by_slice.outcome, ScanOutcome::BeyondWindow);
    }
});

fn is_blank(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

fn is_eol(c: u8) -> bool {
    c == b'\r' || c == b'\n'
}

fn miss(outcome: ScanOutcome) -> Scan {
    Scan {
        outcome,
        hash: 0,
        start: 0,
        end: 0,
    }
}

fn strip_blanks(v: &[u8]) -> Vec<u8> {
    v.iter().copied().filter(|&c| !is_blank(c)).collect()
}

// ---------------------------------------------------------------------------------------
// The reference locator, copied from `sip-dispatch-common/src/parse/tests.rs` (test code
// cannot be imported): slow and line-based, written from the rules in the module docs
// of `parse` rather than from the state machine.

/// One line: its text is `msg[start..end]`.
#[derive(Clone, Copy, Debug)]
struct Line {
    start: usize,
    end: usize,
}

/// Splits at CRLF, LF or a lone CR. A final line without a line end is still a line.
fn split_lines(msg: &[u8]) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut start = 0;
    while start < msg.len() {
        let end = msg[start..]
            .iter()
            .position(|&c| is_eol(c))
            .map_or(msg.len(), |p| start + p);
        let next = if msg[end..].starts_with(b"\r\n") {
            end + 2
        } else {
            end + 1
        };
        lines.push(Line { start, end });
        start = next;
    }
    lines
}

/// The answer for a whole message, and `decided_at`: the offset of the byte that settles
/// it (`msg.len()` when only the end of the message does). A window that ends at or
/// before that byte cannot know the answer yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Expect {
    outcome: ScanOutcome,
    start: usize,
    end: usize,
    decided_at: usize,
}

impl Expect {
    fn miss(outcome: ScanOutcome, decided_at: usize) -> Expect {
        Expect {
            outcome,
            start: 0,
            end: 0,
            decided_at,
        }
    }
}

fn trim_end_blanks(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., last] = s {
        if !is_blank(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// The non-blank stretch of `msg[start..end]`, as a Found answer settled by the line end.
fn value_in(msg: &[u8], start: usize, end: usize) -> Option<Expect> {
    let first = (start..end).find(|&i| !is_blank(msg[i]))?;
    let last = (start..end).rfind(|&i| !is_blank(msg[i]))?;
    Some(Expect {
        outcome: ScanOutcome::Found,
        start: first,
        end: last + 1,
        decided_at: end,
    })
}

fn reference(msg: &[u8]) -> Expect {
    let lines = split_lines(msg);
    for (n, line) in lines.iter().enumerate() {
        let text = &msg[line.start..line.end];
        let Some(&first) = text.first() else {
            // The empty line ends the headers.
            return Expect::miss(ScanOutcome::NoCallId, line.start);
        };
        if is_blank(first) {
            // A continuation of the previous header.
            continue;
        }
        let Some(colon) = text.iter().position(|&c| c == b':') else {
            continue;
        };
        let name = trim_end_blanks(&text[..colon]);
        if !name.eq_ignore_ascii_case(b"call-id") && !name.eq_ignore_ascii_case(b"i") {
            continue;
        }
        if let Some(found) = value_in(msg, line.start + colon + 1, line.end) {
            return found;
        }
        // Nothing after the colon: the value may sit on continuation lines.
        for cont in &lines[n + 1..] {
            let text = &msg[cont.start..cont.end];
            if text.first().is_none_or(|&c| !is_blank(c)) {
                return Expect::miss(ScanOutcome::Empty, cont.start);
            }
            if let Some(found) = value_in(msg, cont.start, cont.end) {
                return found;
            }
        }
        return Expect::miss(ScanOutcome::Empty, msg.len());
    }
    Expect::miss(ScanOutcome::NoCallId, msg.len())
}

/// The `Scan` that `want` stands for.
fn expected_scan(msg: &[u8], want: Expect) -> Scan {
    if want.outcome != ScanOutcome::Found {
        return miss(want.outcome);
    }
    Scan {
        outcome: ScanOutcome::Found,
        hash: siphash13(KEY, &strip_blanks(&msg[want.start..want.end])),
        start: want.start as u32,
        end: want.end as u32,
    }
}
