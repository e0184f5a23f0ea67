//! The To-tag scanner (`sip_dispatch_common::parse::scan_to_tag`) on arbitrary bytes:
//! over the whole input as a slice, and through the XDP program's fixed-size window.
//!
//! Checked: no panic; every step moves on and `len` steps suffice; the slice answer
//! equals the slow line-based reference (`parse::to_tag::reference`); the window agrees
//! with the slice whenever it holds the whole message or the byte that settles the
//! answer, and says `BeyondWindow` otherwise; every cut of the input likewise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sip_dispatch_common::{
    SCAN_WINDOW,
    parse::{
        ToTag, ToTagScanner, ToTagStep, scan_to_tag,
        to_tag::reference::{DECOYS, reference},
    },
};

fuzz_target!(|msg: &[u8]| {
    let len = msg.len();
    let want = reference(msg);
    let by_slice = scan_to_tag(msg, len, true);
    assert_eq!(by_slice, want.outcome, "slice vs reference");

    // Step by step, as the XDP program drives it.
    let mut scanner = ToTagScanner::new();
    let (mut at, mut steps) = (0, 0);
    let mut stepped = None;
    while at < len {
        steps += 1;
        match scanner.step(msg, at, len) {
            ToTagStep::Done(t) => {
                stepped = Some(t);
                break;
            }
            ToTagStep::Next(next) => {
                assert!(next > at, "stuck at {at}");
                at = next;
            }
        }
    }
    assert!(steps <= len, "{steps} steps for {len} bytes");
    assert_eq!(stepped.unwrap_or_else(|| scanner.finish(true)), by_slice);

    // What the XDP program sees: the first SCAN_WINDOW bytes.
    let seen = len.min(SCAN_WINDOW);
    let mut window = DECOYS;
    window[..seen].copy_from_slice(&msg[..seen]);
    let by_window = scan_to_tag(&window, seen, len <= SCAN_WINDOW);
    if len <= SCAN_WINDOW || want.decided_at < SCAN_WINDOW {
        assert_eq!(by_window, by_slice, "window vs slice");
    } else {
        assert_eq!(by_window, ToTag::BeyondWindow, "cut by the window");
    }

    // A cut of the input that does not hold the deciding byte cannot know the answer.
    for cut in [len / 2, len.saturating_sub(1), want.decided_at.min(len)] {
        let expected = if want.decided_at < cut {
            want.outcome
        } else {
            ToTag::BeyondWindow
        };
        assert_eq!(scan_to_tag(msg, cut, false), expected, "cut at {cut}");
    }
});
