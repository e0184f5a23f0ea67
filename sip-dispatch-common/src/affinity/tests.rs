use super::*;
use core::cell::Cell;
use std::vec::Vec;

use EntryWrite::{Insert, Keep, Rewrite, Touch};
use MessageClass::{Ack, Bye, Cancel, Request, Response};
use Route::{Follow, Table};

const SEC: u64 = 1_000_000_000;
const NOW: u64 = 3600 * SEC;
const GEN: u32 = 7;
const BACKEND: u32 = 42;

fn entry(age: u64, flags: u32) -> AffinityEntry {
    AffinityEntry {
        backend: BACKEND,
        generation: GEN,
        last_seen_ns: NOW - age,
        flags,
        _zero: 0,
    }
}

fn bflags(flags: u32) -> BackendFlags {
    BackendFlags {
        generation: GEN,
        flags,
    }
}

const UP_NEW: u32 = BF_AFFINITY | BF_UP | BF_NEW;
const DRAINED: u32 = BF_AFFINITY | BF_UP;
const DOWN: u32 = BF_AFFINITY;

/// Runs `choose` and returns its answer and how often it asked for the To tag.
fn run(
    class: MessageClass,
    e: Option<AffinityEntry>,
    f: BackendFlags,
    tag: bool,
) -> (Choice, usize) {
    let asked = Cell::new(0);
    let c = choose(class, e.as_ref(), f, NOW, || {
        asked.set(asked.get() + 1);
        tag
    });
    (c, asked.get())
}

#[track_caller]
fn expect(
    row: &str,
    class: MessageClass,
    e: Option<AffinityEntry>,
    f: BackendFlags,
    tag: bool,
    route: Route,
    write: EntryWrite,
) {
    let (c, _) = run(class, e, f, tag);
    assert_eq!(
        c,
        Choice { route, write },
        "{row}: {class:?} {e:?} {f:?} tag={tag}"
    );
}

const OLD: u64 = 5 * SEC; // touched long enough ago to be written again
const YOUNG_IDLE: u64 = 31 * SEC; // inside Timer B
const LONG_IDLE: u64 = 32 * SEC; // Timer B over

/// The table of the module docs, row by row (this table goes into the README).
#[test]
fn rules_table_row_by_row() {
    // 1. response, valid e -> e.backend, touch.
    for f in [UP_NEW, DRAINED, DOWN] {
        expect(
            "1",
            Response,
            Some(entry(OLD, 0)),
            bflags(f),
            false,
            Follow(BACKEND),
            Touch { set_flags: 0 },
        );
    }
    // 2. response, none or invalid -> table, nothing written.
    expect("2 none", Response, None, bflags(UP_NEW), false, Table, Keep);
    expect(
        "2 gen",
        Response,
        Some(entry(OLD, 0)),
        BackendFlags {
            generation: GEN + 1,
            flags: UP_NEW,
        },
        false,
        Table,
        Keep,
    );
    expect(
        "2 disabled",
        Response,
        Some(entry(OLD, 0)),
        bflags(0),
        false,
        Table,
        Keep,
    );
    // 3. ACK/BYE/CANCEL or To tag, valid e (even drained or down) -> e.backend, touch; BYE
    //    and CANCEL set their flag.
    for f in [UP_NEW, DRAINED, DOWN] {
        for age in [0, OLD, LONG_IDLE, 3600 * SEC] {
            let e = Some(entry(age, 0));
            expect(
                "3 ack",
                Ack,
                e,
                bflags(f),
                false,
                Follow(BACKEND),
                if age >= SEC {
                    Touch { set_flags: 0 }
                } else {
                    Keep
                },
            );
            expect(
                "3 bye",
                Bye,
                e,
                bflags(f),
                false,
                Follow(BACKEND),
                Touch { set_flags: AFF_BYE },
            );
            expect(
                "3 cancel",
                Cancel,
                e,
                bflags(f),
                false,
                Follow(BACKEND),
                Touch {
                    set_flags: AFF_CANCEL,
                },
            );
            expect(
                "3 tag",
                Request,
                e,
                bflags(f),
                true,
                Follow(BACKEND),
                if age >= SEC {
                    Touch { set_flags: 0 }
                } else {
                    Keep
                },
            );
        }
    }
    // 4. initial request, valid e, UP and (NEW or young) -> e.backend (a retransmission).
    expect(
        "4 new",
        Request,
        Some(entry(OLD, 0)),
        bflags(UP_NEW),
        false,
        Follow(BACKEND),
        Touch { set_flags: 0 },
    );
    expect(
        "4 new idle",
        Request,
        Some(entry(3600 * SEC, 0)),
        bflags(UP_NEW),
        false,
        Follow(BACKEND),
        Touch { set_flags: 0 },
    );
    expect(
        "4 drained young",
        Request,
        Some(entry(YOUNG_IDLE, 0)),
        bflags(DRAINED),
        false,
        Follow(BACKEND),
        Touch { set_flags: 0 },
    );
    // 5. initial request, valid e otherwise (down, or drained and idle >= 32 s) -> table,
    //    rewritten.
    expect(
        "5 drained old",
        Request,
        Some(entry(LONG_IDLE, 0)),
        bflags(DRAINED),
        false,
        Table,
        Rewrite { flags: 0 },
    );
    expect(
        "5 down young",
        Request,
        Some(entry(0, 0)),
        bflags(DOWN),
        false,
        Table,
        Rewrite { flags: 0 },
    );
    expect(
        "5 down new",
        Request,
        Some(entry(0, 0)),
        bflags(BF_AFFINITY | BF_NEW),
        false,
        Table,
        Rewrite { flags: 0 },
    );
    // 6. ACK/BYE/CANCEL or other request, invalid e -> table, rewritten.
    for (what, f) in [
        (
            "gen",
            BackendFlags {
                generation: GEN + 1,
                flags: UP_NEW,
            },
        ),
        (
            "gen wrapped",
            BackendFlags {
                generation: GEN.wrapping_sub(1),
                flags: UP_NEW,
            },
        ),
        (
            "disabled",
            BackendFlags {
                generation: GEN,
                flags: 0,
            },
        ),
        (
            "affinity cleared",
            BackendFlags {
                generation: GEN,
                flags: BF_UP | BF_NEW,
            },
        ),
        ("no such id", BackendFlags::default()),
    ] {
        for tag in [false, true] {
            expect(
                what,
                Ack,
                Some(entry(OLD, 0)),
                f,
                tag,
                Table,
                Rewrite { flags: 0 },
            );
            expect(
                what,
                Bye,
                Some(entry(OLD, 0)),
                f,
                tag,
                Table,
                Rewrite { flags: AFF_BYE },
            );
            expect(
                what,
                Cancel,
                Some(entry(OLD, 0)),
                f,
                tag,
                Table,
                Rewrite { flags: AFF_CANCEL },
            );
            expect(
                what,
                Request,
                Some(entry(OLD, 0)),
                f,
                tag,
                Table,
                Rewrite { flags: 0 },
            );
        }
    }
    // 7. request other than ACK/BYE/CANCEL, no entry -> table, inserted.
    for tag in [false, true] {
        expect("7", Request, None, bflags(UP_NEW), tag, Table, Insert);
        // 8. ACK/BYE/CANCEL, no entry -> table, nothing (never inserts).
        for class in [Ack, Bye, Cancel] {
            expect("8", class, None, bflags(UP_NEW), tag, Table, Keep);
        }
    }
}

#[test]
fn timer_b_boundary_for_a_drained_backend() {
    let f = bflags(DRAINED);
    let at = |age| run(Request, Some(entry(age, 0)), f, false).0.route;
    assert_eq!(at(RETRANSMIT_WINDOW_NS - 1), Follow(BACKEND));
    assert_eq!(at(RETRANSMIT_WINDOW_NS), Table);
    // A health-down backend gets no retransmission even when young; a tag still follows.
    assert_eq!(
        run(Request, Some(entry(0, 0)), bflags(DOWN), false).0.route,
        Table
    );
    assert_eq!(
        run(Request, Some(entry(0, 0)), bflags(DOWN), true).0.route,
        Follow(BACKEND)
    );
    // Drained and old, but in-dialog: follows.
    assert_eq!(
        run(Request, Some(entry(LONG_IDLE, 0)), f, true).0.route,
        Follow(BACKEND)
    );
    assert_eq!(
        run(Bye, Some(entry(LONG_IDLE, 0)), f, false).0.route,
        Follow(BACKEND)
    );
}

#[test]
fn the_to_tag_is_asked_only_when_it_decides() {
    let classes = MessageClass::ALL;
    let entries = [
        None,
        Some(entry(0, 0)),
        Some(entry(OLD, AFF_BYE)),
        Some(entry(LONG_IDLE, 0)),
    ];
    let gens = [GEN, GEN + 1];
    for class in classes {
        for e in entries {
            for g in gens {
                for bits in 0..8 {
                    let f = BackendFlags {
                        generation: g,
                        flags: bits,
                    };
                    for tag in [false, true] {
                        let (c, asked) = run(class, e, f, tag);
                        let valid = e.is_some() && g == GEN && bits & BF_AFFINITY != 0;
                        let retransmission = bits & BF_UP != 0
                            && (bits & BF_NEW != 0
                                || e.is_some_and(|e| NOW - e.last_seen_ns < RETRANSMIT_WINDOW_NS));
                        let decides = class == Request && valid && !retransmission;
                        assert_eq!(asked, decides as usize, "{class:?} {e:?} {f:?}");
                        // Invariants that hold in every cell of the table.
                        assert!(asked <= 1);
                        match c.route {
                            Follow(b) => assert!(valid && b == BACKEND, "{c:?}"),
                            Table => {}
                        }
                        if class != Request {
                            assert_ne!(c.write, Insert, "{class:?} inserted");
                        }
                        if class == Response {
                            assert!(matches!(c.write, Keep | Touch { set_flags: 0 }), "{c:?}");
                        }
                        if e.is_none() {
                            assert!(matches!(c.write, Keep | Insert), "{c:?}");
                        } else {
                            assert_ne!(c.write, Insert, "{c:?}: an entry is never inserted over");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn touch_writes_only_when_old_or_a_flag_is_new() {
    let f = bflags(UP_NEW);
    for (class, e, want) in [
        (Ack, entry(0, 0), Keep),
        (Ack, entry(SEC - 1, 0), Keep),
        (Ack, entry(SEC, 0), Touch { set_flags: 0 }),
        (Response, entry(0, 0), Keep),
        (Request, entry(0, 0), Keep),
        (Bye, entry(0, 0), Touch { set_flags: AFF_BYE }),
        (Bye, entry(0, AFF_BYE), Keep),
        (Bye, entry(0, AFF_CANCEL), Touch { set_flags: AFF_BYE }),
        (Bye, entry(2 * SEC, AFF_BYE), Touch { set_flags: AFF_BYE }),
        (Cancel, entry(0, AFF_CANCEL), Keep),
        (
            Cancel,
            entry(0, 0),
            Touch {
                set_flags: AFF_CANCEL,
            },
        ),
    ] {
        assert_eq!(
            run(class, Some(e), f, false).0.write,
            want,
            "{class:?} {e:?}"
        );
    }
}

#[test]
fn a_clock_behind_the_entry_counts_as_age_zero() {
    let e = AffinityEntry {
        last_seen_ns: u64::MAX,
        ..entry(0, 0)
    };
    let c = choose(Request, Some(&e), bflags(DRAINED), 0, || false);
    assert_eq!(
        c,
        Choice {
            route: Follow(BACKEND),
            write: Keep
        }
    );
    let c = choose(Ack, Some(&entry(0, 0)), bflags(UP_NEW), u64::MAX, || false);
    assert_eq!(c.route, Follow(BACKEND));
}

#[test]
fn classifier_reads_the_first_word() {
    let cases: &[(&[u8], MessageClass)] = &[
        (b"SIP/2.0 200 OK\r\n", Response),
        (b"SIP/", Response),
        (b"ACK sip:a@b SIP/2.0\r\n", Ack),
        (b"ACK ", Ack),
        (b"BYE sip:a@b SIP/2.0\r\n", Bye),
        (b"CANCEL sip:a@b SIP/2.0\r\n", Cancel),
        (b"CANCEL ", Cancel),
        (b"INVITE sip:a@b SIP/2.0\r\n", Request),
        (b"OPTIONS sip:a@b SIP/2.0\r\n", Request),
        (b"INFO sip:a@b SIP/2.0\r\n", Request),
        (b"ACKX sip:a@b SIP/2.0\r\n", Request),
        (b"ack sip:a@b SIP/2.0\r\n", Request),
        (b"bye sip:a@b SIP/2.0\r\n", Request),
        (b"CANCELLED sip:a@b SIP/2.0\r\n", Request),
        (b"CANCEL", Request),
        (b"SIP", Request),
        (b"ACK", Request),
        (b"BYE\t", Request),
        (b"sip/2.0 200 OK", Request),
        (b"SIPX2.0 200 OK", Request),
        (b"", Request),
    ];
    for &(msg, want) in cases {
        assert_eq!(
            classify(msg),
            want,
            "{:?}",
            std::string::String::from_utf8_lossy(msg)
        );
    }
    // Bytes past the message never complete a match.
    let junk = u64::from_le_bytes(*b"CANCEL  ");
    for len in 0..7 {
        assert_eq!(classify_word(junk, len), Request, "len {len}");
    }
    assert_eq!(classify_word(junk, 7), Cancel);
    let junk = u64::from_le_bytes(*b"SIP/2.0 ");
    for len in 0..4 {
        assert_eq!(classify_word(junk, len), Request, "len {len}");
    }
    assert_eq!(classify_word(junk, 4), Response);
    assert_eq!(classify_word(junk, usize::MAX), Response);
    // A prefix of a longer message classifies like the message.
    let all: Vec<&[u8]> = cases.iter().map(|c| c.0).collect();
    for msg in all {
        let mut b = [0u8; 8];
        let n = msg.len().min(8);
        b[..n].copy_from_slice(&msg[..n]);
        assert_eq!(
            classify_word(u64::from_le_bytes(b), msg.len()),
            classify(msg)
        );
    }
}

#[test]
fn only_an_invite_makes_an_entry_that_counts_as_a_call() {
    for (msg, flags) in [
        (&b"INVITE sip:a@b SIP/2.0\r\n"[..], AFF_INVITE),
        (b"INVITE ", AFF_INVITE),
        (b"INVITE", 0),
        (b"INVITEX sip:a@b SIP/2.0\r\n", 0),
        (b"invite sip:a@b SIP/2.0\r\n", 0),
        (b"OPTIONS sip:a@b SIP/2.0\r\n", 0),
        (b"REGISTER sip:b SIP/2.0\r\n", 0),
        (b"SIP/2.0 200 OK\r\n", 0),
        (b"", 0),
    ] {
        assert_eq!(created_flags_of(msg), flags, "{msg:?}");
    }
    // Bytes past the message never complete the word.
    let word = u64::from_le_bytes(*b"INVITE \0");
    assert_eq!(created_flags(word, 6), 0);
    assert_eq!(created_flags(word, 7), AFF_INVITE);
}
