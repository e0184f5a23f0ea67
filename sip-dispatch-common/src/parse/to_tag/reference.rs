//! A reference To-tag finder: slow and line-based, written from the rules in the
//! `to_tag` module docs rather than from the state machine. The unit tests and the fuzz
//! target compare the scanner with it.
use std::vec::Vec;

use super::ToTag::{self, NoTo, Tagged, Untagged};
use crate::parse::reference::split_lines;
use crate::parse::{is_blank, is_eol};

/// A window full of tagged To headers: whatever a scanner reads past `len` shows.
pub const DECOYS: [u8; crate::maps::SCAN_WINDOW] = {
    let decoy = b"\r\nTo: <sip:d@e>;tag=decoy\r\n";
    let mut w = [0u8; crate::maps::SCAN_WINDOW];
    let mut i = 0;
    while i < w.len() {
        w[i] = decoy[i % decoy.len()];
        i += 1;
    }
    w
};

/// The answer for a whole message, and `decided_at`: the offset of the byte that settles
/// it (`msg.len()` when only the end of the message does). A window that ends at or
/// before that byte cannot know the answer yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    pub outcome: ToTag,
    pub decided_at: usize,
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

/// A byte that may be part of a parameter name.
fn in_name(c: u8) -> bool {
    !is_blank(c) && !is_eol(c) && !b";=\"<>".contains(&c)
}

/// The offset of the `=` of a `tag` parameter in the header value made of the bytes
/// `msg[i]` for `i` in `value` (the line ends of folds left out).
fn tag_in(msg: &[u8], value: &[usize]) -> Option<usize> {
    let at = |i: usize| msg[value[i]];
    let n = value.len();
    let skip_blanks = |mut j: usize| {
        while j < n && is_blank(at(j)) {
            j += 1;
        }
        j
    };
    let mut i = 0;
    while i < n {
        match at(i) {
            b'"' => {
                // A quoted string: up to the closing quote; `\` takes the next byte.
                i += 1;
                while i < n && at(i) != b'"' {
                    i += if at(i) == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'<' => {
                while i < n && at(i) != b'>' {
                    i += 1;
                }
                i += 1;
            }
            b';' => {
                let start = skip_blanks(i + 1);
                let mut end = start;
                while end < n && in_name(at(end)) {
                    end += 1;
                }
                let name: Vec<u8> = (start..end).map(at).collect();
                let eq = skip_blanks(end);
                if name.eq_ignore_ascii_case(b"tag") && eq < n && at(eq) == b'=' {
                    return Some(value[eq]);
                }
                // Go on with the byte after the name (which may start something).
                i = end;
            }
            _ => i += 1,
        }
    }
    None
}

/// The answer for a whole message.
pub fn reference(msg: &[u8]) -> Expect {
    let lines = split_lines(msg);
    for (n, line) in lines.iter().enumerate() {
        let text = &msg[line.start..line.end];
        let Some(&first) = text.first() else {
            // The empty line ends the headers.
            return Expect {
                outcome: NoTo,
                decided_at: line.start,
            };
        };
        if is_blank(first) {
            // A continuation of the previous header.
            continue;
        }
        let Some(colon) = text.iter().position(|&c| c == b':') else {
            continue;
        };
        let name = trim_end_blanks(&text[..colon]);
        if !name.eq_ignore_ascii_case(b"to") && !name.eq_ignore_ascii_case(b"t") {
            continue;
        }
        // The value: the rest of the line and every continuation line.
        let mut value: Vec<usize> = (line.start + colon + 1..line.end).collect();
        let mut ends_at = msg.len();
        for cont in &lines[n + 1..] {
            if cont.start == cont.end || !is_blank(msg[cont.start]) {
                ends_at = cont.start;
                break;
            }
            value.extend(cont.start..cont.end);
        }
        return match tag_in(msg, &value) {
            Some(eq) => Expect {
                outcome: Tagged,
                decided_at: eq,
            },
            None => Expect {
                outcome: Untagged,
                decided_at: ends_at,
            },
        };
    }
    Expect {
        outcome: NoTo,
        decided_at: msg.len(),
    }
}
