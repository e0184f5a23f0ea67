//! The Call-ID locator (`sip_dispatch_common::parse::scan_call_id`) on arbitrary bytes:
//! over the whole input as a slice, and through the XDP program's fixed-size window.
//!
//! Checked: no panic; the two agree whenever the window holds the whole message (and
//! otherwise the window answers `BeyondWindow` unless the answer was settled inside it);
//! a `Found` span is in bounds, on one line, trimmed, and its hash is SipHash-1-3 of its
//! bytes without blanks; and everything equals the slow line-based reference
//! (`sip_dispatch_common::parse::reference`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sip_dispatch_common::{
    HashKey, SCAN_WINDOW, Scan, ScanOutcome,
    hash::call_id_hash,
    parse::{
        reference::{DECOYS, expected_scan, reference},
        scan_message,
    },
    scan_call_id,
};

const KEY: HashKey = HashKey::DEFAULT;

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
    assert_eq!(
        by_slice,
        expected_scan(msg, want, KEY),
        "slice vs reference"
    );
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
            Scan::miss(ScanOutcome::BeyondWindow),
            "cut by the window"
        );
        // The window taken as a whole message is a message of its own.
        let head = &msg[..SCAN_WINDOW];
        assert_eq!(
            scan_call_id(&window, SCAN_WINDOW, true, KEY),
            expected_scan(head, reference(head), KEY),
            "window as a whole message"
        );
    }

    if by_slice.outcome == ScanOutcome::Found {
        let (start, end) = (by_slice.start as usize, by_slice.end as usize);
        assert!(start < end && end <= len, "span {start}..{end} of {len}");
        let value = &msg[start..end];
        assert!(!value.iter().copied().any(is_eol), "line end in the value");
        assert!(!is_blank(value[0]) && !is_blank(value[value.len() - 1]));
        assert_eq!(by_slice.hash, call_id_hash(KEY, value));
    } else {
        assert_eq!(by_slice, Scan::miss(by_slice.outcome));
        assert_ne!(by_slice.outcome, ScanOutcome::BeyondWindow);
    }
});

fn is_blank(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

fn is_eol(c: u8) -> bool {
    c == b'\r' || c == b'\n'
}
