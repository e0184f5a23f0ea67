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

    /// The word at `i`, a multiple of 8: the eBPF implementation loads it in one piece.
    #[inline(always)]
    fn aligned_word_at(&self, i: usize) -> u64 {
        self.word_at(i)
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

/// `$body` `$n` times in a row. Verifier constraint: in a loop with a counter, the
/// verifier tracks the counter exactly and walks what follows the loop once per
/// iteration; LLVM unrolls some loops but not others (it did not unroll the value loop).
macro_rules! unroll {
    (2, $body:block) => {{
        $body
        $body
    }};
    (4, $body:block) => {{
        $body
        $body
        $body
        $body
    }};
    (8, $body:block) => {
        unroll!(4, { unroll!(2, $body) })
    };
}

const ONES: u64 = 0x0101_0101_0101_0101;
const LOWS: u64 = 0x7f7f_7f7f_7f7f_7f7f;
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

/// High bit set in each byte of `w` that equals `c`, exactly (no borrow crosses bytes).
#[inline(always)]
fn eq_mask(w: u64, c: u8) -> u64 {
    let x = w ^ (ONES * c as u64);
    !(((x & LOWS).wrapping_add(LOWS)) | x) & HIGHS
}

/// High bit set in each byte of `w` that is CR or LF. Exact up to and including the
/// lowest such byte (higher bytes may be flagged falsely), which is all the scanner uses.
#[inline(always)]
fn eol_mask(w: u64) -> u64 {
    let lf = w ^ (ONES * b'\n' as u64);
    let cr = w ^ (ONES * b'\r' as u64);
    (lf.wrapping_sub(ONES) & !lf & HIGHS) | (cr.wrapping_sub(ONES) & !cr & HIGHS)
}

/// High bit set in each byte of `w` below `n` (at most 0x80). Exact up to and including
/// the lowest such byte. Cheaper than `eol_mask` and `blank_mask`, so the scanner
/// filters words with it: below 0x0e are CR, LF and tab, up to 0x20 the blanks too.
#[inline(always)]
fn below_mask(w: u64, n: u8) -> u64 {
    w.wrapping_sub(ONES * n as u64) & !w & HIGHS
}

/// High bit set in each byte of `w` that is a space or a tab, exactly.
#[inline(always)]
fn blank_mask(w: u64) -> u64 {
    eq_mask(w, b' ') | eq_mask(w, b'\t')
}

/// The low `n` bytes of a word set (`n` is 1..=8).
#[inline(always)]
fn low_bytes(n: usize) -> u64 {
    u64::MAX >> (64 - 8 * n)
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
/// At the first byte of a line.
const LINE_START: u64 = 0;
/// Inside a line that is not a Call-ID header: search its end.
const SKIP_LINE: u64 = 1;
/// A complete header name (`call-id` or `i`) matched: spaces/tabs, then ':'.
const NAME_END: u64 = 2;
/// After the colon: spaces/tabs, or a line end that may be a fold.
const VALUE_LEADING: u64 = 3;
/// A CR inside the leading whitespace of the value.
const VALUE_LEADING_CR: u64 = 4;
/// A line end inside the leading whitespace: a space or tab continues (folding).
const VALUE_LEADING_EOL: u64 = 5;
const VALUE: u64 = 6;

/// `call-id` as a little-endian word, its length, and the bits that fold the case of its
/// letters (not of the `-`: CR | 0x20 is `-`).
const CALL_ID_WORD: u64 = u64::from_le_bytes(*b"call-id\0");
const CALL_ID_LEN: usize = 7;
const CALL_ID_FOLD: u64 = 0x0020_2000_2020_2020;

#[inline(always)]
fn is_blank(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

#[inline(always)]
fn is_eol(c: u8) -> bool {
    c == b'\r' || c == b'\n'
}

/// The scanner between two steps. A step takes a line that is not a Call-ID header (up
/// to 136 bytes of it: most lines are shorter), two words of the Call-ID value, or what
/// lies between name and value up to the next non-blank byte. The XDP program runs the
/// steps from `bpf_loop` (whose callback the verifier checks once), userspace in a plain
/// loop ([`scan_call_id`]). Every step but one moves on by at least one byte: `len + 1`
/// steps always suffice.
///
/// `repr(C)` without padding, whole words: the XDP program stores a new scanner into
/// map memory a word at a time (LLVM would merge its zero fields into a `memset` call,
/// which BPF runs byte by byte).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Scanner {
    hasher: CallIdHasher,
    start: u32,
    end: u32,
    state: u64,
}

const _: () = assert!(size_of::<Scanner>() == 8 * 8, "Scanner has padding");

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

    /// Takes bytes of `buf[..len]` from `at` on (`at < len`).
    #[inline(always)]
    pub fn step<W: ByteWindow + ?Sized>(&mut self, buf: &W, at: usize, len: usize) -> Step {
        let state = self.state;
        match state {
            LINE_START => self.line_start(buf, at, len),
            SKIP_LINE => self.skip_line(buf, at, buf.word_at(at), len),
            NAME_END => {
                let c = buf.byte_at(at);
                if c == b':' {
                    self.state = VALUE_LEADING;
                } else if is_eol(c) {
                    return self.line_end(buf, at, len);
                } else if !is_blank(c) {
                    self.state = SKIP_LINE;
                }
                Step::Next(at + 1)
            }
            VALUE_LEADING => self.value_leading(buf, at, len),
            VALUE => self.value(buf, at, len),
            // VALUE_LEADING_CR, VALUE_LEADING_EOL
            _ => {
                let c = buf.byte_at(at);
                if is_blank(c) {
                    self.state = VALUE_LEADING;
                } else if !(c == b'\n' && state == VALUE_LEADING_CR) {
                    return Step::Done(Scan::miss(ScanOutcome::Empty));
                } else {
                    self.state = VALUE_LEADING_EOL;
                }
                Step::Next(at + 1)
            }
        }
    }

    /// At the first byte of a line: the end of the headers, a Call-ID name, or a line to
    /// skip.
    #[inline(always)]
    fn line_start<W: ByteWindow + ?Sized>(&mut self, buf: &W, at: usize, len: usize) -> Step {
        let w = buf.word_at(at);
        let c = w as u8;
        if is_eol(c) {
            return Step::Done(Scan::miss(ScanOutcome::NoCallId));
        }
        if at + CALL_ID_LEN <= len && (w | CALL_ID_FOLD) << 8 == CALL_ID_WORD << 8 {
            self.state = NAME_END;
            return Step::Next(at + CALL_ID_LEN);
        }
        if c | 0x20 == b'i' {
            self.state = NAME_END;
            return Step::Next(at + 1);
        }
        // The first byte is no line end, so the search may start with it.
        self.skip_line(buf, at, w, len)
    }

    /// Searches the end of the line in the word at `at` (`w`), then in up to 16 aligned
    /// words, two at a time.
    #[inline(always)]
    fn skip_line<W: ByteWindow + ?Sized>(
        &mut self,
        buf: &W,
        at: usize,
        w: u64,
        len: usize,
    ) -> Step {
        let m = eol_mask(w);
        if m != 0 {
            return self.line_end(buf, at + first_flagged_byte(m), len);
        }
        let mut p = (at & !7) + 8;
        unroll!(8, {
            if p >= len {
                return Step::Next(len);
            }
            // Bytes past `len` may be searched: a line end there is ignored.
            let a = buf.aligned_word_at(p);
            let b = buf.aligned_word_at(p + 8);
            if below_mask(a, 0x0e) | below_mask(b, 0x0e) != 0 {
                let m = eol_mask(a);
                if m != 0 {
                    return self.line_end(buf, p + first_flagged_byte(m), len);
                }
                let m = eol_mask(b);
                if m != 0 {
                    return self.line_end(buf, p + 8 + first_flagged_byte(m), len);
                }
            }
            p += 16;
        });
        self.state = SKIP_LINE;
        Step::Next(p)
    }

    /// After the CR or LF at `e` (which may lie past the data): the next line starts
    /// after it, or after the LF of a CRLF.
    #[inline(always)]
    fn line_end<W: ByteWindow + ?Sized>(&mut self, buf: &W, e: usize, len: usize) -> Step {
        if e >= len {
            return Step::Next(len);
        }
        self.state = LINE_START;
        let crlf = buf.byte_at(e) == b'\r' && e + 1 < len && buf.byte_at(e + 1) == b'\n';
        Step::Next(e + 1 + crlf as usize)
    }

    /// Blanks before the value, a word at a time; then a line end (a fold, or an empty
    /// value) or the first byte of the value.
    #[inline(always)]
    fn value_leading<W: ByteWindow + ?Sized>(&mut self, buf: &W, at: usize, len: usize) -> Step {
        let w = buf.word_at(at);
        let n = (len - at).min(8);
        let other = !blank_mask(w) & HIGHS & low_bytes(n);
        if other == 0 {
            return Step::Next(at + n);
        }
        let i = first_flagged_byte(other);
        let c = (w >> (8 * i)) as u8;
        let p = at + i;
        if c == b'\r' {
            self.state = VALUE_LEADING_CR;
        } else if c == b'\n' {
            self.state = VALUE_LEADING_EOL;
        } else {
            // The one step that may not move on.
            self.state = VALUE;
            self.start = p as u32;
            return Step::Next(p);
        }
        Step::Next(p + 1)
    }

    /// Hashes the value up to a blank, the line end or two words.
    #[inline(always)]
    fn value<W: ByteWindow + ?Sized>(&mut self, buf: &W, at: usize, len: usize) -> Step {
        let mut p = at;
        let mut w;
        // Whole words without a blank or line end; the first other word goes on below
        // (one copy of that code, so the verifier walks it once).
        'partial: {
            unroll!(2, {
                w = buf.word_at(p);
                if p + 8 > len || below_mask(w, 0x21) != 0 {
                    break 'partial;
                }
                self.hasher.write_full_word(w);
                p += 8;
                self.end = p as u32;
                if p >= len {
                    break 'partial;
                }
            });
            return Step::Next(p);
        }
        if p >= len {
            return Step::Next(p);
        }
        let n = (len - p).min(8);
        let special = (eol_mask(w) | blank_mask(w)) & low_bytes(n);
        if special == 0 {
            // The data ends inside this word, or `below_mask` flagged another byte.
            self.hasher.write_word(w & low_bytes(n), n);
            self.end = (p + n) as u32;
            return Step::Next(p + n);
        }
        let i = first_flagged_byte(special);
        if i > 0 {
            self.hasher.write_word(w & low_bytes(i), i);
            self.end = (p + i) as u32;
        }
        if is_eol((w >> (8 * i)) as u8) {
            return Step::Done(self.found());
        }
        Step::Next(p + i + 1)
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

pub mod start_line;
pub mod to_tag;
pub use to_tag::{ToTag, ToTagScanner, ToTagStep, scan_to_tag, to_tag_of};

#[cfg(any(test, feature = "user"))]
pub mod golden;
#[cfg(any(test, feature = "user"))]
pub mod reference;
#[cfg(any(test, feature = "user"))]
pub mod torture;

#[cfg(test)]
mod tests;
