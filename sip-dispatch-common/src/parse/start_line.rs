//! The start line of a SIP message (RFC 3261 7.1, 7.2): a request
//! (`Method SP Request-URI SP SIP/2.0`) or a response (`SIP/2.0 SP Status-Code ...`).
//!
//! [`start_line`] is the rule both paths use to tell SIP from other datagrams: the slow
//! path drops what it rejects (`dropped_not_sip`). The XDP program checks the quick
//! form [`start_line_fast`], which only ever says `Some` where [`start_line`] says the
//! same, and `None` (pass: the slow path decides) for anything else: not SIP, a method
//! that is not in upper case or longer than [`FAST_METHOD_MAX`] bytes, a start line
//! longer than [`FAST_LINE_MAX`] bytes. So the fast path never forwards a datagram the
//! slow path would drop as not SIP.
use super::{ByteWindow, HIGHS, LOWS, ONES, eol_mask, eq_mask, first_flagged_byte, low_bytes};

/// What the start line says a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartLine {
    /// `Method SP ... SP SIP/2.0`.
    Request,
    /// `SIP/2.0 SP ...`.
    Response,
}

/// Methods the fast path checks: upper-case letters, at most this long (`SUBSCRIBE` is
/// 9). Longer or other methods go to the slow path.
pub const FAST_METHOD_MAX: usize = 15;
/// Start lines the fast path looks at: the line end must lie within this many bytes.
pub const FAST_LINE_MAX: usize = 256;

const RESPONSE_PREFIX: u64 = u64::from_le_bytes(*b"SIP/2.0 ");
const REQUEST_SUFFIX: u64 = u64::from_le_bytes(*b" SIP/2.0");

/// RFC 3261 25.1: `token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`"
/// / "'" / "~")`.
pub fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// The rule: the first line (up to the first CR or LF) starts with `SIP/2.0 `, or is a
/// token, a space, anything, and ends with ` SIP/2.0`.
pub fn start_line(msg: &[u8]) -> Option<StartLine> {
    let line_end = msg
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(msg.len());
    let line = &msg[..line_end];
    if line.starts_with(b"SIP/2.0 ") {
        return Some(StartLine::Response);
    }
    let method_len = line.iter().position(|&b| b == b' ')?;
    let method = &line[..method_len];
    if method.is_empty() || !method.iter().all(|b| is_token_char(*b)) {
        return None;
    }
    if !line.ends_with(b" SIP/2.0") {
        return None;
    }
    Some(StartLine::Request)
}

/// High bit set in each byte of `w` that is an upper-case ASCII letter, exactly.
#[inline(always)]
fn upper_mask(w: u64) -> u64 {
    let low7 = w & LOWS;
    // Per byte, at most 0x7f + 0x3f: no carry crosses into the next byte.
    let from_a = low7.wrapping_add(ONES * (0x80 - b'A') as u64);
    let past_z = low7.wrapping_add(ONES * (0x80 - b'Z' - 1) as u64);
    from_a & !past_z & !w & HIGHS
}

/// The quick form of [`start_line`] over the first bytes of a message (`buf[..len]`),
/// branch-light and loop-free for the XDP program: `None` unless sure.
#[inline(always)]
pub fn start_line_fast<W: ByteWindow + ?Sized>(buf: &W, len: usize) -> Option<StartLine> {
    start_line_fast_at(buf, len, first_line_end(buf, len)?)
}

/// [`start_line_fast`] with the first line end already found by [`first_line_end`]
/// (the XDP program passes it through map memory, see there).
#[inline(always)]
pub fn start_line_fast_at<W: ByteWindow + ?Sized>(
    buf: &W,
    len: usize,
    line_end: usize,
) -> Option<StartLine> {
    if len < 8 || line_end >= len {
        return None;
    }
    let w0 = buf.aligned_word_at(0);
    if w0 == RESPONSE_PREFIX {
        return Some(StartLine::Response);
    }
    let w1 = if len >= 16 {
        buf.aligned_word_at(8)
    } else {
        buf.aligned_word_at(8) & low_bytes_or_none(len - 8)
    };
    // The method: upper-case letters up to the first space, within 16 bytes.
    let sp0 = eq_mask(w0, b' ');
    let method_len = if sp0 != 0 {
        let m = first_flagged_byte(sp0);
        if m == 0 || upper_mask(w0) & low_bytes_or_none(m) != low_bytes_or_none(m) & HIGHS {
            return None;
        }
        m
    } else {
        let sp1 = eq_mask(w1, b' ');
        if sp1 == 0 || upper_mask(w0) != HIGHS {
            return None;
        }
        let m = first_flagged_byte(sp1);
        if upper_mask(w1) & low_bytes_or_none(m) != low_bytes_or_none(m) & HIGHS {
            return None;
        }
        8 + m
    };
    // ` SIP/2.0` ends the line, after the method's space (it may be that very space).
    if line_end < method_len + 8 || buf.word_at(line_end - 8) != REQUEST_SUFFIX {
        return None;
    }
    Some(StartLine::Request)
}

/// The low `n` bytes of a word set, `n` in 0..8.
#[inline(always)]
fn low_bytes_or_none(n: usize) -> u64 {
    if n == 0 { 0 } else { low_bytes(n) }
}

/// The offset of the first CR or LF in `buf[..len]`, if it lies within the first
/// [`FAST_LINE_MAX`] bytes.
///
/// Verifier constraint: no loop (its counter would make the verifier walk the rest of
/// the program once per iteration); four unrolled blocks of eight words. Each way out
/// gives the offset another range, so a caller in the XDP program passes it on through
/// map memory: the ways then meet as one verifier state.
#[inline(always)]
#[allow(unused_assignments)] // the last block's `p += 8`
pub fn first_line_end<W: ByteWindow + ?Sized>(buf: &W, len: usize) -> Option<usize> {
    const { assert!(FAST_LINE_MAX == 4 * 8 * 8) };
    let mut p = 0usize;
    unroll!(4, {
        unroll!(8, {
            if p >= len {
                return None;
            }
            // Bytes past `len` may be searched: a line end there is refused below.
            let m = eol_mask(buf.aligned_word_at(p));
            if m != 0 {
                let e = p + first_flagged_byte(m);
                return if e < len { Some(e) } else { None };
            }
            p += 8;
        });
    });
    None
}

#[cfg(test)]
mod tests;
