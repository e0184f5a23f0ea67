//! The controller's SIP helpers on arbitrary bytes: `parse_response` (health-check
//! answers) and `service_unavailable` (the slow path's stateless 503).
//!
//! Checked: neither panics; a parsed response has a status in 100..=999 and started
//! with `SIP/2.0 `; a 503 is well-formed, never longer than the limit it was given (a
//! refusal for size names a length past the limit), names the source in its top Via
//! when it is due, and reads back through `parse_response` as status 503 with the
//! Call-ID value it copied and the Retry-After it was given. The first input byte picks
//! the source (IPv4 or IPv6) and the limit, so both families and small limits are hit.
#![no_main]

use std::{net::SocketAddr, time::Duration};

use libfuzzer_sys::fuzz_target;
use sip_dispatch_common::sip::{NoAnswer, parse_response, service_unavailable};

const RETRY_AFTER: u32 = 5;

fuzz_target!(|msg: &[u8]| {
    if let Some(r) = parse_response(msg) {
        assert!((100..=999).contains(&r.status), "status {}", r.status);
        assert!(msg.starts_with(b"SIP/2.0 "));
    }

    let Some((&selector, request)) = msg.split_first() else {
        return;
    };
    let source: SocketAddr = if selector & 1 == 0 {
        "198.18.0.10:5070".parse().unwrap()
    } else {
        "[2001:db8::10]:5070".parse().unwrap()
    };
    let max_len = [1472, 1232, 512, 64][usize::from(selector >> 1) % 4];
    let resp = match service_unavailable(request, source, RETRY_AFTER, max_len) {
        Ok(resp) => resp,
        Err(NoAnswer::TooLarge(n)) => {
            assert!(n > max_len, "refused {n} bytes under the limit {max_len}");
            return;
        }
        Err(NoAnswer::Incomplete) => return,
    };
    assert!(resp.len() <= max_len, "{} bytes over {max_len}", resp.len());
    let text = std::str::from_utf8(&resp).expect("the 503 is UTF-8");
    assert!(text.starts_with("SIP/2.0 503 Service Unavailable\r\n"));
    // One header per CRLF-terminated line, then the blank line that ends the message.
    let head = text
        .strip_suffix("\r\n\r\n")
        .expect("the 503 ends with a blank line");
    assert!(
        head.split("\r\n")
            .all(|l| !l.is_empty() && !l.contains('\n')),
        "an empty line or a bare LF inside the 503"
    );
    // The Call-ID value it copied: exactly one Call-ID header, written by name.
    let copied: Vec<&str> = head
        .split("\r\n")
        .filter_map(|l| l.strip_prefix("Call-ID: "))
        .collect();
    let [call_id] = copied[..] else {
        panic!("{} Call-ID headers in the 503", copied.len());
    };
    assert!(!call_id.is_empty());

    // The top via-parm carries the source when it asked with rport.
    let top_via = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("Via: "))
        .expect("a Via in the 503");
    // The first via-parm of the first Via header (one header may hold several).
    let top_parm = outside_quotes(top_via);
    let top_parm = top_parm.split(',').next().unwrap_or_default();
    if top_parm.contains(";rport=") {
        assert!(
            top_parm.contains(&format!(";rport={}", source.port()))
                && top_parm.contains(&format!(";received={}", source.ip())),
            "rport without the source: {top_via}"
        );
    }

    let parsed = parse_response(&resp).expect("the 503 parses");
    assert_eq!(parsed.status, 503);
    assert_eq!(parsed.call_id, call_id);
    assert_eq!(
        parsed.retry_after,
        Some(Duration::from_secs(RETRY_AFTER.into()))
    );
});

/// `text` without its quoted-strings (which may hold anything, `;rport=` included).
fn outside_quotes(text: &str) -> String {
    let (mut out, mut quoted, mut escaped) = (String::new(), false, false);
    for c in text.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if !quoted => out.push(c),
            _ => {}
        }
    }
    out
}
