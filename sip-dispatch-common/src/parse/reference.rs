//! A reference Call-ID locator: slow and line-based, written from the rules in the
//! `parse` module docs rather than from the state machine. The unit tests and the fuzz
//! target compare the scanner with it.
use std::vec::Vec;

use super::{Scan, ScanOutcome, is_blank, is_eol};
use crate::hash::{HashKey, call_id_hash};

use ScanOutcome::{Empty, Found, NoCallId};

/// A window full of Call-ID headers: whatever a scanner reads past `len` shows.
pub const DECOYS: [u8; crate::maps::SCAN_WINDOW] = {
    let decoy = b"\r\nCall-ID: decoy\r\n";
    let mut w = [0u8; crate::maps::SCAN_WINDOW];
    let mut i = 0;
    while i < w.len() {
        w[i] = decoy[i % decoy.len()];
        i += 1;
    }
    w
};

/// One line: its text is `msg[start..end]`; the next line starts at `next`.
#[derive(Clone, Copy, Debug)]
pub struct Line {
    pub start: usize,
    pub end: usize,
    pub next: usize,
}

/// Splits at CRLF, LF or a lone CR. A final line without a line end is still a line.
pub fn split_lines(msg: &[u8]) -> Vec<Line> {
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
        lines.push(Line { start, end, next });
        start = next;
    }
    lines
}

/// The answer for a whole message, and `decided_at`: the offset of the byte that settles
/// it (`msg.len()` when only the end of the message does). A window that ends at or
/// before that byte cannot know the answer yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    pub outcome: ScanOutcome,
    pub start: usize,
    pub end: usize,
    pub decided_at: usize,
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
        outcome: Found,
        start: first,
        end: last + 1,
        decided_at: end,
    })
}

/// The answer for a whole message.
pub fn reference(msg: &[u8]) -> Expect {
    let lines = split_lines(msg);
    for (n, line) in lines.iter().enumerate() {
        let text = &msg[line.start..line.end];
        let Some(&first) = text.first() else {
            // The empty line ends the headers.
            return Expect::miss(NoCallId, line.start);
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
                return Expect::miss(Empty, cont.start);
            }
            if let Some(found) = value_in(msg, cont.start, cont.end) {
                return found;
            }
        }
        return Expect::miss(Empty, msg.len());
    }
    Expect::miss(NoCallId, msg.len())
}

/// The `Scan` the scanner must give for `msg` (under `key`) when `want` is the
/// reference answer.
pub fn expected_scan(msg: &[u8], want: Expect, key: HashKey) -> Scan {
    if want.outcome != Found {
        return Scan::miss(want.outcome);
    }
    let hash = call_id_hash(key, &msg[want.start..want.end]);
    Scan {
        outcome: Found,
        hash,
        start: want.start as u32,
        end: want.end as u32,
    }
}
