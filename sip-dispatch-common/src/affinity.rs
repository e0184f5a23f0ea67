//! Call affinity: which backend a message of a known call goes to, and what happens to
//! the call's entry in the affinity map. One function, [`choose`], holds the rules; the
//! XDP program and the userspace slow path both call it.
//!
//! `e` is the call's entry, valid when `e.generation` equals the generation of `e.backend` and
//! that backend has [`BF_AFFINITY`] set; `age` is `now - e.last_seen_ns`.
//!
//! | message | entry state | goes to | entry |
//! |---|---|---|---|
//! | response | valid `e` | `e.backend` | touch |
//! | response | none or invalid | table | nothing |
//! | ACK/BYE/CANCEL, or To tag | valid `e` (even drained or health-down) | `e.backend` | touch; BYE sets `AFF_BYE`, CANCEL sets `AFF_CANCEL` |
//! | initial request (no tag) | valid `e`, `BF_UP`, and (`BF_NEW` or `age` < 32 s) | `e.backend` (a retransmission) | touch |
//! | initial request | valid `e` otherwise (down, or drained and idle >= 32 s) | table | rewritten |
//! | ACK/BYE/CANCEL or other request | invalid `e` (generation differs, or disabled/removed) | table | rewritten (BYE/CANCEL flag set) |
//! | request other than ACK/BYE/CANCEL | no entry | table | inserted |
//! | ACK/BYE/CANCEL | no entry | table | nothing |
//!
//! "Touch" writes `last_seen_ns` only when it is at least [`TOUCH_AFTER_NS`] old (or a
//! flag is new): an in-place write per message would bounce the entry's cache line
//! between CPUs for nothing.
use crate::maps::{
    AFF_BYE, AFF_CANCEL, AFF_INVITE, AffinityEntry, BF_AFFINITY, BF_NEW, BF_UP, BackendFlags,
};

/// RFC 3261 Timer B (64 x T1): an INVITE is retransmitted for this long, so a drained
/// backend still gets the retransmissions of a call it was given, but not a Call-ID
/// reused later.
pub const RETRANSMIT_WINDOW_NS: u64 = 32_000_000_000;
/// A touch rewrites `last_seen_ns` only once it is this old.
pub const TOUCH_AFTER_NS: u64 = 1_000_000_000;

/// What kind of message, from the first word of the UDP payload.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageClass {
    /// Starts with `SIP/`.
    Response = 0,
    /// `ACK `: in-dialog, never creates an entry.
    Ack,
    /// `BYE `: in-dialog, never creates an entry, marks it ended.
    Bye,
    /// `CANCEL `: in-dialog, never creates an entry, marks it ended.
    Cancel,
    /// Any other request (INVITE, OPTIONS, re-INVITE, INFO, ...).
    Request,
}

impl MessageClass {
    pub const ALL: [MessageClass; 5] = [
        MessageClass::Response,
        MessageClass::Ack,
        MessageClass::Bye,
        MessageClass::Cancel,
        MessageClass::Request,
    ];
}

const fn word_of(s: &[u8]) -> u64 {
    let mut w = 0u64;
    let mut i = 0;
    while i < s.len() {
        w |= (s[i] as u64) << (8 * i);
        i += 1;
    }
    w
}

const RESPONSE_WORD: u64 = word_of(b"SIP/");
const ACK_WORD: u64 = word_of(b"ACK ");
const BYE_WORD: u64 = word_of(b"BYE ");
const CANCEL_WORD: u64 = word_of(b"CANCEL ");
const LOW4: u64 = 0xffff_ffff;
const LOW7: u64 = 0x00ff_ffff_ffff_ffff;

/// Classifies a message by its first 8 payload bytes as a little-endian word (byte 0 in
/// the low bits), of which the first `len` are the message (`len` may exceed 8). Method
/// names are case-sensitive (RFC 3261 7.1), so no case folding.
#[inline(always)]
pub fn classify_word(word: u64, len: usize) -> MessageClass {
    // Bytes past the message must not complete a match.
    let valid = if len >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * len)) - 1
    };
    let w = word & valid;
    if w & LOW4 == RESPONSE_WORD && len >= 4 {
        MessageClass::Response
    } else if w & LOW4 == ACK_WORD && len >= 4 {
        MessageClass::Ack
    } else if w & LOW4 == BYE_WORD && len >= 4 {
        MessageClass::Bye
    } else if w & LOW7 == CANCEL_WORD && len >= 7 {
        MessageClass::Cancel
    } else {
        MessageClass::Request
    }
}

const INVITE_WORD: u64 = word_of(b"INVITE ");

/// The flags an entry created or rewritten by this message starts with: [`AFF_INVITE`]
/// for an INVITE (same word and length as [`classify_word`]), else none.
#[inline(always)]
pub fn created_flags(word: u64, len: usize) -> u32 {
    if len >= 7 && word & LOW7 == INVITE_WORD {
        AFF_INVITE
    } else {
        0
    }
}

/// [`created_flags`] over the start of a payload.
pub fn created_flags_of(payload: &[u8]) -> u32 {
    let mut b = [0u8; 8];
    let n = payload.len().min(8);
    b[..n].copy_from_slice(&payload[..n]);
    created_flags(u64::from_le_bytes(b), payload.len())
}

/// [`classify_word`] over the start of a payload.
pub fn classify(payload: &[u8]) -> MessageClass {
    let mut b = [0u8; 8];
    let n = payload.len().min(8);
    b[..n].copy_from_slice(&payload[..n]);
    classify_word(u64::from_le_bytes(b), payload.len())
}

/// Where the message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To this backend id (the entry's), without looking at the slot table.
    Follow(u32),
    /// To the slot table's pick.
    Table,
}

/// What the caller writes to the call's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryWrite {
    /// Nothing.
    Keep,
    /// In place: `last_seen_ns = now`, `flags |= set_flags`.
    Touch { set_flags: u32 },
    /// Overwrite the entry with the table's pick, its current generation, `now` and
    /// `flags` (counted as overridden). Not when the table has no backend.
    Rewrite { flags: u32 },
    /// Create an entry for the table's pick (`BPF_ANY`). Not when the table has no
    /// backend.
    Insert,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub route: Route,
    pub write: EntryWrite,
}

/// The entry flag a message of this class sets.
#[inline(always)]
fn class_flags(class: MessageClass) -> u32 {
    match class {
        MessageClass::Bye => AFF_BYE,
        MessageClass::Cancel => AFF_CANCEL,
        _ => 0,
    }
}

/// The rules table of the module docs.
///
/// `entry` is the call's entry, if any; `flags` are those of `entry.backend` (all zero
/// when the id has none, e.g. out of range: the entry is then invalid). `now_ns` is on
/// the clock of `last_seen_ns`; a `last_seen_ns` in the future counts as age 0.
/// `to_tag` says whether the message's To header has a tag; it is called at most once,
/// and only for a request other than ACK/BYE/CANCEL whose valid entry is not a
/// retransmission's.
#[inline(always)]
pub fn choose(
    class: MessageClass,
    entry: Option<&AffinityEntry>,
    flags: BackendFlags,
    now_ns: u64,
    to_tag: impl FnOnce() -> bool,
) -> Choice {
    let set_flags = class_flags(class);
    let Some(e) = entry else {
        let write = if class == MessageClass::Request {
            EntryWrite::Insert
        } else {
            EntryWrite::Keep
        };
        return Choice {
            route: Route::Table,
            write,
        };
    };
    let valid = e.generation == flags.generation && flags.flags & BF_AFFINITY != 0;
    let age = now_ns.saturating_sub(e.last_seen_ns);
    let follow = valid
        && (class != MessageClass::Request
            || (flags.flags & BF_UP != 0
                && (flags.flags & BF_NEW != 0 || age < RETRANSMIT_WINDOW_NS))
            || to_tag());
    if follow {
        let stale = age >= TOUCH_AFTER_NS || set_flags & !e.flags != 0;
        let write = if stale {
            EntryWrite::Touch { set_flags }
        } else {
            EntryWrite::Keep
        };
        return Choice {
            route: Route::Follow(e.backend),
            write,
        };
    }
    let write = if class == MessageClass::Response {
        EntryWrite::Keep
    } else {
        EntryWrite::Rewrite { flags: set_flags }
    };
    Choice {
        route: Route::Table,
        write,
    }
}

#[cfg(test)]
mod tests;
