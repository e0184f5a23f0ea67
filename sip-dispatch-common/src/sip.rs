//! SIP message helpers of the controller (userspace only): reading the responses to
//! health checks, and building the stateless 503 of the slow path. Both read untrusted
//! bytes, so both are fuzzed (see `fuzz/`).
use core::time::Duration;
use std::{
    format,
    string::{String, ToString},
    vec::Vec,
};

use crate::hash::HashKey;

/// The parts of a SIP response a health check looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub call_id: String,
    /// The branch parameter of the top Via.
    pub branch: String,
    pub retry_after: Option<Duration>,
}

/// Parses a SIP response (status line and headers; compact forms understood).
/// CRLF, LF and a lone CR all end a line, as they do for the Call-ID scanner: one view
/// of where headers start, so that nothing read here hides inside another line.
fn normalize_line_ends(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

pub fn parse_response(msg: &[u8]) -> Option<Response> {
    let text = normalize_line_ends(std::str::from_utf8(msg).ok()?);
    let mut lines = text.split('\n');
    let status_line = lines.next()?;
    let status = status_line
        .strip_prefix("SIP/2.0 ")?
        .get(..3)?
        .parse()
        .ok()
        // Three digits, 1xx and up: `parse` alone takes "020" as 20 and "+99" as 99.
        .filter(|s| (100..=999).contains(s))?;
    let mut response = Response {
        status,
        call_id: String::new(),
        branch: String::new(),
        retry_after: None,
    };
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        let value = value.trim();
        if name.eq_ignore_ascii_case("call-id") || name.eq_ignore_ascii_case("i") {
            if response.call_id.is_empty() {
                response.call_id = value.to_string();
            }
        } else if (name.eq_ignore_ascii_case("via") || name.eq_ignore_ascii_case("v"))
            && response.branch.is_empty()
        {
            let top = value.split(',').next().unwrap_or_default();
            response.branch = top
                .split(';')
                .skip(1)
                .filter_map(|p| p.trim().split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("branch"))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default();
        } else if name.eq_ignore_ascii_case("retry-after") && response.retry_after.is_none() {
            response.retry_after = parse_retry_after(value);
        }
    }
    Some(response)
}

/// The value of a Retry-After header (RFC 3261 20.33): `delta-seconds [ comment ] *( ;
/// retry-param )`. Seconds beyond the range of u64 saturate at u64::MAX (the caller
/// clamps the hold anyway); anything else (no digits, a sign, a fraction, text after the
/// digits that is neither a comment nor a parameter) is no Retry-After at all.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, rest) = value.split_at(digits_end);
    if digits.is_empty() {
        return None;
    }
    let rest = rest.trim_start();
    if !(rest.is_empty() || rest.starts_with('(') || rest.starts_with(';')) {
        return None;
    }
    let secs = digits.bytes().fold(0u64, |acc, d| {
        acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Some(Duration::from_secs(secs))
}

/// A stateless `503 Service Unavailable` for `request` (RFC 3261 8.2.6.2): its Via
/// headers in order, From, To (with a tag added when it has none), Call-ID and CSeq.
/// None when the request lacks one of them.
pub fn service_unavailable(request: &[u8], retry_after: u32) -> Option<Vec<u8>> {
    let text = normalize_line_ends(std::str::from_utf8(request).ok()?);
    let head = text.split("\n\n").next()?;
    // Unfold continuation lines first (RFC 3261 7.3.1).
    let mut headers: Vec<String> = Vec::new();
    for line in head.split('\n').skip(1) {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = headers.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else {
            headers.push(line.to_string());
        }
    }
    let named = |long: &str, short: &str| -> Vec<String> {
        headers
            .iter()
            .filter_map(|h| {
                let (name, value) = h.split_once(':')?;
                let name = name.trim();
                (name.eq_ignore_ascii_case(long) || name.eq_ignore_ascii_case(short))
                    .then(|| value.trim().to_string())
            })
            .collect()
    };
    let vias = named("via", "v");
    let from = named("from", "f").into_iter().next()?;
    let mut to = named("to", "t").into_iter().next()?;
    let call_id = named("call-id", "i").into_iter().next()?;
    let cseq = named("cseq", "cseq").into_iter().next()?;
    if vias.is_empty() || call_id.is_empty() {
        return None;
    }
    if !to.to_ascii_lowercase().contains(";tag=") {
        to.push_str(&format!(
            ";tag=sd{:x}",
            crate::hash::siphash13(HashKey::DEFAULT, call_id.as_bytes()) as u32
        ));
    }
    let mut out = String::from("SIP/2.0 503 Service Unavailable\r\n");
    for v in &vias {
        out.push_str(&format!("Via: {v}\r\n"));
    }
    out.push_str(&format!(
        "From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq}\r\nRetry-After: {retry_after}\r\n\
         Server: sip-dispatch\r\nContent-Length: 0\r\n\r\n"
    ));
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:svc@198.18.0.100 SIP/2.0\r\n\
        Via: SIP/2.0/UDP 198.18.0.10:5070;branch=z9hG4bK-1\r\n\
        v: SIP/2.0/UDP 198.18.0.9:5060;branch=z9hG4bK-0\r\n\
        From: <sip:a@x>;tag=1\r\nTo: <sip:svc@198.18.0.100>\r\nCall-ID: abc@x\r\n\
        CSeq: 1 INVITE\r\nSubject: a\r\n folded\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn a_lone_cr_ends_a_line_here_as_it_does_for_the_scanner() {
        let req = "INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\rCall-ID: injected\r\n\
                   From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: real@x\r\nCSeq: 1 INVITE\r\n\r\n";
        let scan = crate::parse::scan_message(req.as_bytes(), HashKey::DEFAULT);
        assert_eq!(
            &req.as_bytes()[scan.start as usize..scan.end as usize],
            b"injected"
        );
        let resp = String::from_utf8(service_unavailable(req.as_bytes(), 5).unwrap()).unwrap();
        assert!(resp.contains("\r\nCall-ID: injected\r\n"), "{resp}");
        assert!(
            !resp.contains('\r') || !resp.replace("\r\n", "").contains('\r'),
            "no lone CR copied"
        );
        assert_eq!(parse_response(resp.as_bytes()).unwrap().call_id, "injected");
    }

    #[test]
    fn responses_are_parsed_with_compact_forms_and_retry_after() {
        let resp = "SIP/2.0 200 OK\r\nv: SIP/2.0/UDP 198.18.0.2:40000;rport=40000;branch=z9hG4bKabc;received=198.18.0.2\r\n\
                    Via: SIP/2.0/UDP other;branch=z9hG4bKother\r\ni: cid-1@x\r\nCSeq: 7 OPTIONS\r\n\r\n";
        let r = parse_response(resp.as_bytes()).unwrap();
        assert_eq!(
            (r.status, r.call_id.as_str(), r.branch.as_str()),
            (200, "cid-1@x", "z9hG4bKabc")
        );
        assert_eq!(r.retry_after, None);
        let r = parse_response(
            b"SIP/2.0 503 Busy\r\nRetry-After: 30 (maintenance);duration=60\r\nCall-ID: x\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.retry_after, Some(Duration::from_secs(30)));
        assert_eq!(
            parse_response(b"OPTIONS sip:x SIP/2.0\r\nCall-ID: x\r\n\r\n"),
            None
        );
        assert_eq!(parse_response(b"\xff\xfe"), None);
        // Found by the sip_response fuzz target: status codes below 100.
        assert_eq!(parse_response(b"SIP/2.0 020 OK\r\n\r\n"), None);
        assert_eq!(parse_response(b"SIP/2.0 +99 OK\r\n\r\n"), None);
    }

    #[test]
    fn retry_after_is_parsed_strictly_and_saturates() {
        let secs = |v: &str| parse_retry_after(v).map(|d| d.as_secs());
        assert_eq!(secs("30"), Some(30));
        assert_eq!(secs(" 0 "), Some(0));
        assert_eq!(secs("120 (I'm in a meeting)"), Some(120));
        assert_eq!(secs("18000;duration=3600"), Some(18000));
        assert_eq!(secs("5 ;duration=1"), Some(5));
        assert_eq!(secs("18446744073709551615"), Some(u64::MAX));
        assert_eq!(secs("9223372036854775808"), Some(1 << 63));
        assert_eq!(secs("99999999999999999999999"), Some(u64::MAX), "saturates");
        assert_eq!(
            secs("18446744073709551616 (one past u64)"),
            Some(u64::MAX),
            "saturates, not wraps"
        );
        for garbage in [
            "", " ", "abc", "-5", "+5", "1.5", "0x10", "12abc", "12 abc", "(30)", ";30", "\u{661}",
        ] {
            assert_eq!(parse_retry_after(garbage), None, "{garbage:?}");
        }
        let r = parse_response(
            b"SIP/2.0 503 Busy\r\nRetry-After: 18446744073709551615 (maintenance)\r\nCall-ID: x\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.retry_after, Some(Duration::from_secs(u64::MAX)));
        let r = parse_response(b"SIP/2.0 503 Busy\r\nRetry-After: soon\r\n\r\n").unwrap();
        assert_eq!(r.retry_after, None, "garbage is no Retry-After");
    }

    #[test]
    fn the_503_copies_the_dialog_headers_and_adds_a_to_tag() {
        let resp = String::from_utf8(service_unavailable(INVITE.as_bytes(), 5).unwrap()).unwrap();
        assert!(resp.starts_with("SIP/2.0 503 Service Unavailable\r\n"));
        let vias: Vec<&str> = resp.lines().filter(|l| l.starts_with("Via: ")).collect();
        assert_eq!(
            vias,
            [
                "Via: SIP/2.0/UDP 198.18.0.10:5070;branch=z9hG4bK-1",
                "Via: SIP/2.0/UDP 198.18.0.9:5060;branch=z9hG4bK-0"
            ]
        );
        assert!(resp.contains("\r\nFrom: <sip:a@x>;tag=1\r\n"));
        assert!(resp.contains("\r\nTo: <sip:svc@198.18.0.100>;tag=sd"));
        assert!(resp.contains("\r\nCall-ID: abc@x\r\nCSeq: 1 INVITE\r\nRetry-After: 5\r\n"));
        assert!(resp.ends_with("Content-Length: 0\r\n\r\n"));
        // The response parser of the health checks reads it back.
        let parsed = parse_response(resp.as_bytes()).unwrap();
        assert_eq!((parsed.status, parsed.call_id.as_str()), (503, "abc@x"));
        assert_eq!(parsed.retry_after, Some(Duration::from_secs(5)));
        // A To with a tag keeps it; a request missing From gets no answer.
        let tagged = INVITE.replace("To: <sip:svc@198.18.0.100>", "To: <sip:svc@x>;tag=99");
        let resp = String::from_utf8(service_unavailable(tagged.as_bytes(), 5).unwrap()).unwrap();
        assert!(resp.contains("\r\nTo: <sip:svc@x>;tag=99\r\n"));
        assert_eq!(
            service_unavailable(INVITE.replace("From:", "X-From:").as_bytes(), 5),
            None
        );
    }
}
