//! The To-tag scanner: does the first `To` header carry a `tag` parameter? A request
//! with one is in a dialog (RFC 3261 12.2), so call affinity follows its entry even to a
//! drained or health-down backend (see [`crate::affinity::choose`]).
//!
//! Rules, from the grammar of RFC 3261 section 25.1:
//! ```text
//! To        = ( "To" / "t" ) HCOLON ( name-addr / addr-spec ) *( SEMI to-param )
//! to-param  = tag-param / generic-param
//! tag-param = "tag" EQUAL token
//! HCOLON = *( SP / HTAB ) ":" SWS     SEMI = SWS ";" SWS     EQUAL = SWS "=" SWS
//! ```
//! - the header name (`To` or compact `t`, any case: ABNF strings are case-insensitive)
//!   counts only at the start of a line, with spaces or tabs before the colon and no line
//!   end there (HCOLON has no fold); lines and folds as in the Call-ID locator
//!   ([`super`]): CRLF, LF or a lone CR, and a line that starts with a space or tab
//!   continues the header (RFC 3261 7.3.1). The first empty line ends the headers; the
//!   first To header decides;
//! - a parameter starts at a `;` outside `<...>` and outside a quoted string. Inside
//!   `<...>`, `;tag=` is a URI parameter; a quoted string (the display name, or a quoted
//!   parameter value) ends at a `"` that is not escaped by `\` (quoted-pair);
//! - SEMI and EQUAL allow linear whitespace, folds included, so `To: <sip:a@b> ; tag = x`
//!   carries a tag. The parameter name is `tag` in any case (`;TAG=abc` counts); it is the
//!   run of bytes up to a blank, line end, `;`, `=`, `"`, `<` or `>`, so `;tagx=1` and
//!   `;ta g=1` do not count;
//! - a `tag` name counts only when `=` follows it: a valueless `;tag` is a generic-param
//!   (there is no tag without a value). The value itself is not checked: a routing
//!   decision only needs to know that the sender claims a dialog; the backend rejects a
//!   malformed one;
//! - without `<...>`, parameters after the URI belong to the header (RFC 3261 20), so
//!   `To: sip:a@b;tag=1` carries a tag.
//!
//! Like the Call-ID locator, the scanner is a state machine driven step by step over a
//! [`ByteWindow`], so the XDP program can run it from `bpf_loop`; every step moves on by
//! at least one byte, so `len` steps always suffice.
use super::{ByteWindow, eol_mask, first_flagged_byte, is_blank, is_eol};

/// The answer of the To-tag scanner.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToTag {
    /// The first To header has a `tag` parameter.
    Tagged = 0,
    /// The first To header has no `tag` parameter.
    Untagged,
    /// The headers (or the whole message) ended without a To header.
    NoTo,
    /// The scanned bytes end before the answer is known, and the message goes on.
    BeyondWindow,
}

/// What a step found: the answer, or where to go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToTagStep {
    Done(ToTag),
    /// Continue at this offset.
    Next(usize),
}

// Scanner states. Plain integers, as in the Call-ID locator.
/// At the first byte of a line.
const LINE_START: u64 = 0;
/// Inside a line that is not a To header: search its end.
const SKIP_LINE: u64 = 1;
/// `t` at the start of a line.
const NAME_T: u64 = 2;
/// `to` at the start of a line.
const NAME_TO: u64 = 3;
/// A complete name and blanks: more blanks, then ':'.
const NAME_END: u64 = 4;
/// In the value, outside `<...>`, quotes and parameter names.
const VALUE: u64 = 5;
/// Inside a quoted string.
const QUOTED: u64 = 6;
/// After a `\` inside a quoted string: the next byte is taken as it is.
const QUOTED_ESCAPE: u64 = 7;
/// Inside `<...>`.
const ANGLE: u64 = 8;
/// After a `;`: blanks, then the parameter name.
const PARAM: u64 = 9;
/// The name so far is `t`.
const PARAM_T: u64 = 10;
/// The name so far is `ta`.
const PARAM_TA: u64 = 11;
/// The name is `tag`: blanks, then `=`.
const PARAM_TAG: u64 = 12;

/// The state after byte `c` (not a line end) outside quotes and `<...>`.
#[inline(always)]
fn in_value(c: u8) -> u64 {
    match c {
        b'"' => QUOTED,
        b'<' => ANGLE,
        b';' => PARAM,
        _ => VALUE,
    }
}

/// The state after byte `c` (not a line end) in a value state.
#[inline(always)]
fn value_next(state: u64, c: u8) -> u64 {
    let folded = c | 0x20;
    match state {
        QUOTED => match c {
            b'\\' => QUOTED_ESCAPE,
            b'"' => VALUE,
            _ => QUOTED,
        },
        QUOTED_ESCAPE => QUOTED,
        ANGLE => {
            if c == b'>' {
                VALUE
            } else {
                ANGLE
            }
        }
        PARAM if is_blank(c) => PARAM,
        PARAM if folded == b't' => PARAM_T,
        PARAM_T if folded == b'a' => PARAM_TA,
        PARAM_TA if folded == b'g' => PARAM_TAG,
        // A blank after `tag` keeps it; any other name byte makes a longer name.
        PARAM_TAG if is_blank(c) => PARAM_TAG,
        // VALUE, and the byte that ends a parameter name that is not `tag`.
        _ => in_value(c),
    }
}

/// The scanner between two steps: one word, so the XDP program can keep it in map
/// memory (see `Scratch::xdp`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ToTagScanner {
    state: u64,
}

impl Default for ToTagScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl ToTagScanner {
    #[inline(always)]
    pub const fn new() -> ToTagScanner {
        ToTagScanner { state: LINE_START }
    }

    /// Takes bytes of `buf[..len]` from `at` on (`at < len`): up to 8 bytes of a line
    /// that is not a To header, otherwise one byte (To values are short).
    #[inline(always)]
    pub fn step<W: ByteWindow + ?Sized>(&mut self, buf: &W, at: usize, len: usize) -> ToTagStep {
        let state = self.state;
        let c = buf.byte_at(at);
        match state {
            LINE_START => {
                if is_eol(c) {
                    return ToTagStep::Done(ToTag::NoTo);
                }
                if c | 0x20 == b't' {
                    self.state = NAME_T;
                    return ToTagStep::Next(at + 1);
                }
                // Other names, and continuation lines (a blank first byte).
                self.skip_line(buf, at, len)
            }
            SKIP_LINE => self.skip_line(buf, at, len),
            NAME_T | NAME_TO | NAME_END => {
                if is_eol(c) {
                    return self.line_end(buf, at, len);
                }
                self.state = if c == b':' {
                    VALUE
                } else if is_blank(c) {
                    NAME_END
                } else if state == NAME_T && c | 0x20 == b'o' {
                    NAME_TO
                } else {
                    SKIP_LINE
                };
                ToTagStep::Next(at + 1)
            }
            _ => {
                if is_eol(c) {
                    return self.value_line_end(buf, at, len);
                }
                if c == b'=' && state == PARAM_TAG {
                    return ToTagStep::Done(ToTag::Tagged);
                }
                self.state = value_next(state, c);
                ToTagStep::Next(at + 1)
            }
        }
    }

    /// Searches the end of the line in the word at `at`.
    #[inline(always)]
    fn skip_line<W: ByteWindow + ?Sized>(&mut self, buf: &W, at: usize, len: usize) -> ToTagStep {
        let m = eol_mask(buf.word_at(at));
        if m != 0 {
            // A line end past `len` is ignored by `line_end`.
            return self.line_end(buf, at + first_flagged_byte(m), len);
        }
        self.state = SKIP_LINE;
        ToTagStep::Next(at + 8)
    }

    /// The offset after the line end at `e` (after the LF of a CRLF).
    #[inline(always)]
    fn next_line<W: ByteWindow + ?Sized>(buf: &W, e: usize, len: usize) -> usize {
        let crlf = buf.byte_at(e) == b'\r' && e + 1 < len && buf.byte_at(e + 1) == b'\n';
        e + 1 + crlf as usize
    }

    /// After the CR or LF at `e` (which may lie past the data) of a line that is not a
    /// To value: the next line starts.
    #[inline(always)]
    fn line_end<W: ByteWindow + ?Sized>(&mut self, buf: &W, e: usize, len: usize) -> ToTagStep {
        if e >= len {
            return ToTagStep::Next(len);
        }
        self.state = LINE_START;
        ToTagStep::Next(Self::next_line(buf, e, len))
    }

    /// A line end inside the To value: a fold continues the value in the same state
    /// (the blank that starts the next line is taken by the state as any blank);
    /// anything else ends the header without a tag.
    #[inline(always)]
    fn value_line_end<W: ByteWindow + ?Sized>(
        &mut self,
        buf: &W,
        e: usize,
        len: usize,
    ) -> ToTagStep {
        let q = Self::next_line(buf, e, len);
        if q >= len {
            return ToTagStep::Next(len);
        }
        if is_blank(buf.byte_at(q)) {
            return ToTagStep::Next(q);
        }
        ToTagStep::Done(ToTag::Untagged)
    }

    /// The answer when the bytes ran out. `complete`: they were the whole message.
    #[inline(always)]
    pub fn finish(self, complete: bool) -> ToTag {
        if !complete {
            return ToTag::BeyondWindow;
        }
        match self.state {
            LINE_START | SKIP_LINE | NAME_T | NAME_TO | NAME_END => ToTag::NoTo,
            _ => ToTag::Untagged,
        }
    }
}

/// Whether the first To header in `buf[..len]` has a tag.
///
/// `complete` says whether `buf[..len]` is the whole message: if it is not, running out
/// of bytes before the answer is known gives [`ToTag::BeyondWindow`].
#[inline(always)]
pub fn scan_to_tag<W: ByteWindow + ?Sized>(buf: &W, len: usize, complete: bool) -> ToTag {
    let mut scanner = ToTagScanner::new();
    let mut i = 0usize;
    while i < len {
        match scanner.step(buf, i, len) {
            ToTagStep::Done(t) => return t,
            ToTagStep::Next(next) => i = next,
        }
    }
    scanner.finish(complete)
}

/// Userspace convenience: scans a whole message.
pub fn to_tag_of(msg: &[u8]) -> ToTag {
    scan_to_tag(msg, msg.len(), true)
}

#[cfg(any(test, feature = "user"))]
pub mod reference;
#[cfg(any(test, feature = "user"))]
pub mod torture;

#[cfg(test)]
mod tests;
