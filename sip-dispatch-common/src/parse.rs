//! The Call-ID locator: one pass over the SIP header block that finds the `Call-ID`
//! header (long form `Call-ID` or compact `i`, any case, optional spaces or tabs around
//! the colon, line folding after the colon) and hashes its value as it goes.
//!
//! Rules (RFC 3261 section 7.3.1, RFC 4475):
//! - a header name only counts at the start of a line; a line that starts with a space
//!   or tab continues the previous header, so it is never a header start;
//! - `X-Call-ID:`, `Call-IDX:`, `i-foo:` are other headers;
//! - lines end with CRLF, LF or a lone CR; the first empty line ends the headers, and
//!   nothing in the body is looked at;
//! - the value ends at CR or LF; spaces and tabs in it are not part of the Call-ID (the
//!   grammar has none), so they are skipped by the hash, which also trims both ends;
//! - the first Call-ID header wins.
//!
//! The same function runs in the XDP program (over a per-CPU copy of the first
//! [`crate::SCAN_WINDOW`] bytes of the UDP payload) and in userspace (over whole
//! datagrams), so both pick the same backend for every message.
use crate::hash::{CallIdHasher, HashKey};

/// Byte access for the scanner. The fixed-size array form masks the index, which lets
/// the eBPF verifier prove every access in bounds without a branch.
pub trait ByteWindow {
    fn byte_at(&self, i: usize) -> u8;

    /// The 8 bytes from `i` on as a little-endian word (byte `i` in the low bits).
    /// Bytes past the end of the data may hold anything: callers ignore them.
    #[inline(always)]
    fn word_at(&self, i: usize) -> u64 {
        let mut w = 0u64;
        let mut k = 0;
        while k < 8 {
            w |= (self.byte_at(i + k) as u64) << (8 * k);
            k += 1;
        }
        w
    }

    /// Returns `x`. The eBPF implementation passes it through map memory, so that the
    /// verifier sees an unknown value instead of a constant.
    ///
    /// Verifier constraint: the scan loop carries small integers (the scanner state, the
    /// hasher's byte count) that are constants on every path the verifier walks. A
    /// constant that decides a branch becomes "precise", and states that differ in a
    /// precise value are never merged, so the verifier would walk the loop once per
    /// distinct (position, state, length) and exceed its 1M-instruction limit. Laundered
    /// once per byte, these values stay imprecise and the loop verifies in one pass.
    #[inline(always)]
    fn opaque(&self, x: u64) -> u64 {
        x
    }
}

impl<const N: usize> ByteWindow for [u8; N] {
    #[inline(always)]
    fn byte_at(&self, i: usize) -> u8 {
        const { assert!(N.is_power_of_two()) };
        self[i & (N - 1)]
    }
}

impl ByteWindow for [u8] {
    #[inline(always)]
    fn byte_at(&self, i: usize) -> u8 {
        self[i]
    }

    #[inline(always)]
    fn word_at(&self, i: usize) -> u64 {
        let mut b = [0u8; 8];
        let tail = self.get(i..).unwrap_or_default();
        let n = tail.len().min(8);
        b[..n].copy_from_slice(&tail[..n]);
        u64::from_le_bytes(b)
    }
}

/// What a scanner step found: the answer, or where to go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Done(Scan),
    /// Continue at this offset.
    Next(usize),
}

/// Words a skip step searches before it yields. Verifier constraint: the bpf_loop
/// callback must converge; with 3 or more words it exceeds the 1M-instruction budget,
/// with 2 it passes but doubles the load time, so one word per step.
const SKIP_WORDS: usize = 1;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The index of the lowest byte whose high bit is set in `m` (which is not 0).
///
/// Verifier constraint: BPF has no count-trailing-zeros instruction and LLVM expands
/// `trailing_zeros` into a tree of branches; this multiply is branch-free. The lowest set
/// bit is bit 8k+7; shifted down it is 1 << 8k, and multiplying spreads the constant's
/// bytes (7 - j at byte j) so that byte k of it lands in the top byte.
#[inline(always)]
fn first_flagged_byte(m: u64) -> usize {
    let lowest = m & m.wrapping_neg();
    ((lowest >> 7).wrapping_mul(0x0001_0203_0405_0607) >> 56) as usize
}

/// High bit set in each byte of `w` that is CR or LF. Exact up to and including the
/// lowest such byte (higher bytes may be flagged falsely), which is all the scanner uses.
#[inline(always)]
fn eol_mask(w: u64) -> u64 {
    let lf = w ^ (ONES * b'\n' as u64);
    let cr = w ^ (ONES * b'\r' as u64);
    (lf.wrapping_sub(ONES) & !lf & HIGHS) | (cr.wrapping_sub(ONES) & !cr & HIGHS)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanOutcome {
    /// A Call-ID with a non-empty value: `hash`, `start` and `end` are set.
    Found,
    /// The headers (or the whole message) ended without a Call-ID header.
    NoCallId,
    /// The first Call-ID header has an empty value.
    Empty,
    /// The scanned bytes end before the headers (or the Call-ID value) do, and the
    /// message goes on: a longer look is needed (the userspace slow path).
    BeyondWindow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scan {
    pub outcome: ScanOutcome,
    /// SipHash-1-3 of the value bytes (spaces and tabs skipped). Valid when `Found`.
    pub hash: u64,
    /// Offset of the first value byte. Valid when `Found`.
    pub start: u32,
    /// Offset one past the last non-blank value byte. Valid when `Found`.
    pub end: u32,
}

// Scanner states. Plain integers: a `match` on them compiles to a short chain of
// compares that the verifier handles well.
const LINE_START: u8 = 0;
const SKIP_LINE: u8 = 1;
/// After a CR that ended a line: an LF here belongs to the same line end.
const AFTER_CR: u8 = 2;
/// `NAME_CALL_ID + k`: the first k bytes of `call-id` matched at a line start.
const NAME_CALL_ID: u8 = 10;
/// A complete header name (`call-id` or `i`) matched: spaces/tabs, then ':'.
const NAME_END: u8 = 20;
/// After the colon: spaces/tabs, or a line end that may be a fold.
const VALUE_LEADING: u8 = 21;
/// A CR inside the leading whitespace of the value.
const VALUE_LEADING_CR: u8 = 22;
/// A line end inside the leading whitespace: a space or tab continues (folding).
const VALUE_LEADING_EOL: u8 = 23;
const VALUE: u8 = 24;

/// `call-id`, padded to 8 bytes so that a masked index is provably in bounds.
const CALL_ID: &[u8; 8] = b"call-id\0";
const CALL_ID_LEN: usize = 7;

#[inline(always)]
fn is_blank(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

#[inline(always)]
fn is_eol(c: u8) -> bool {
    c == b'\r' || c == b'\n'
}

/// State after the first byte of a line. `None`: the line is empty, the headers end.
#[inline(always)]
fn line_start(c: u8) -> Option<u8> {
    if is_eol(c) {
        None
    } else if c | 0x20 == b'c' {
        Some(NAME_CALL_ID + 1)
    } else if c | 0x20 == b'i' {
        Some(NAME_END)
    } else {
        Some(SKIP_LINE)
    }
}

/// State after a byte that ends a line in any state but the value.
#[inline(always)]
fn line_end(c: u8) -> u8 {
    if c == b'\r' { AFTER_CR } else { LINE_START }
}

/// The scanner between two bytes: one step per byte, so that the XDP program can run
/// the steps from `bpf_loop` (whose callback the verifier checks once) while userspace
/// runs them in a plain loop ([`scan_call_id`]).
#[derive(Clone, Copy, Debug)]
pub struct Scanner {
    state: u8,
    start: u32,
    end: u32,
    hasher: CallIdHasher,
}

impl Scanner {
    #[inline(always)]
    pub fn new(key: HashKey) -> Scanner {
        Scanner {
            state: LINE_START,
            start: 0,
            end: 0,
            hasher: CallIdHasher::new(key),
        }
    }

    /// Takes the bytes of `buf[..len]` from `i` on: one byte, or in the rest of a line
    /// that is not a Call-ID header, up to [`SKIP_WORDS`] words at once (the line end is
    /// searched a word at a time).
    #[inline(always)]
    pub fn step<W: ByteWindow + ?Sized>(&mut self, buf: &W, i: usize, len: usize) -> Step {
        match self.byte_step(buf, i) {
            Some(scan) => Step::Done(scan),
            None if self.state == SKIP_LINE => {
                let mut at = i + 1;
                // A fixed, small bound: the verifier sees straight-line code.
                let mut w = 0;
                while w < SKIP_WORDS {
                    if at >= len {
                        return Step::Next(len);
                    }
                    let m = eol_mask(buf.word_at(at));
                    if m != 0 {
                        let eol = at + first_flagged_byte(m);
                        if eol >= len {
                            return Step::Next(len);
                        }
                        self.state = line_end(buf.byte_at(eol));
                        return Step::Next(eol + 1);
                    }
                    at += 8;
                    w += 1;
                }
                Step::Next(at.min(len))
            }
            None => Step::Next(i + 1),
        }
    }

    /// Consumes byte `i` of `buf`. `Some` once the answer is known.
    #[inline(always)]
    fn byte_step<W: ByteWindow + ?Sized>(&mut self, buf: &W, i: usize) -> Option<Scan> {
        let c = buf.byte_at(i);
        let state = buf.opaque(self.state as u64) as u8;
        self.hasher.set_len(buf.opaque(self.hasher.len()));
        self.state = match state {
            LINE_START => match line_start(c) {
                Some(s) => s,
                None => return Some(Scan::miss(ScanOutcome::NoCallId)),
            },
            AFTER_CR => {
                if c == b'\n' {
                    LINE_START
                } else {
                    match line_start(c) {
                        Some(s) => s,
                        None => return Some(Scan::miss(ScanOutcome::NoCallId)),
                    }
                }
            }
            SKIP_LINE => {
                if is_eol(c) {
                    line_end(c)
                } else {
                    SKIP_LINE
                }
            }
            NAME_END => {
                if c == b':' {
                    VALUE_LEADING
                } else if is_blank(c) {
                    NAME_END
                } else if is_eol(c) {
                    line_end(c)
                } else {
                    SKIP_LINE
                }
            }
            VALUE_LEADING => {
                if is_blank(c) {
                    VALUE_LEADING
                } else if c == b'\r' {
                    VALUE_LEADING_CR
                } else if c == b'\n' {
                    VALUE_LEADING_EOL
                } else {
                    self.start = i as u32;
                    self.end = i as u32 + 1;
                    self.hasher.write_byte(c);
                    VALUE
                }
            }
            VALUE_LEADING_CR => {
                if c == b'\n' {
                    VALUE_LEADING_EOL
                } else if is_blank(c) {
                    VALUE_LEADING
                } else {
                    return Some(Scan::miss(ScanOutcome::Empty));
                }
            }
            VALUE_LEADING_EOL => {
                if is_blank(c) {
                    VALUE_LEADING
                } else {
                    return Some(Scan::miss(ScanOutcome::Empty));
                }
            }
            VALUE => {
                if is_eol(c) {
                    return Some(self.found());
                }
                if !is_blank(c) {
                    self.hasher.write_byte(c);
                    self.end = i as u32 + 1;
                }
                VALUE
            }
            // NAME_CALL_ID + 1 ..= NAME_CALL_ID + 6
            s => {
                let k = s.wrapping_sub(NAME_CALL_ID) as usize;
                let want = CALL_ID[k & 7];
                let matched = if want == b'-' {
                    c == b'-'
                } else {
                    c | 0x20 == want
                };
                if matched {
                    if k + 1 == CALL_ID_LEN {
                        NAME_END
                    } else {
                        s.wrapping_add(1)
                    }
                } else if is_eol(c) {
                    line_end(c)
                } else {
                    SKIP_LINE
                }
            }
        };
        None
    }

    /// The answer when the bytes ran out. `complete`: they were the whole message.
    #[inline(always)]
    pub fn finish(self, complete: bool) -> Scan {
        if !complete {
            return Scan::miss(ScanOutcome::BeyondWindow);
        }
        match self.state {
            // The message ends right after the value, with no line end.
            VALUE => self.found(),
            VALUE_LEADING | VALUE_LEADING_CR | VALUE_LEADING_EOL => Scan::miss(ScanOutcome::Empty),
            _ => Scan::miss(ScanOutcome::NoCallId),
        }
    }

    #[inline(always)]
    fn found(&self) -> Scan {
        Scan {
            outcome: ScanOutcome::Found,
            hash: self.hasher.finish(),
            start: self.start,
            end: self.end,
        }
    }
}

/// Finds and hashes the first Call-ID header in `buf[..len]`.
///
/// `complete` says whether `buf[..len]` is the whole message: if it is not, running out
/// of bytes before the answer is known gives [`ScanOutcome::BeyondWindow`].
#[inline(always)]
pub fn scan_call_id<W: ByteWindow + ?Sized>(
    buf: &W,
    len: usize,
    complete: bool,
    key: HashKey,
) -> Scan {
    let mut scanner = Scanner::new(key);
    let mut i = 0usize;
    while i < len {
        match scanner.step(buf, i, len) {
            Step::Done(scan) => return scan,
            Step::Next(next) => i = next,
        }
    }
    scanner.finish(complete)
}

impl Scan {
    /// An answer without a Call-ID: hash and span are zero.
    #[inline(always)]
    pub const fn miss(outcome: ScanOutcome) -> Scan {
        Scan {
            outcome,
            hash: 0,
            start: 0,
            end: 0,
        }
    }
}

/// Userspace convenience: scans a whole message.
pub fn scan_message(msg: &[u8], key: HashKey) -> Scan {
    scan_call_id(msg, msg.len(), true, key)
}

#[cfg(any(test, feature = "user"))]
pub mod golden;
#[cfg(any(test, feature = "user"))]
pub mod reference;
#[cfg(any(test, feature = "user"))]
pub mod torture;

#[cfg(test)]
mod tests;
