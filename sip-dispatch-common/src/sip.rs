//! SIP message helpers of the controller (userspace only): reading the responses to
//! health checks, and building the stateless 503 of the slow path. Both read untrusted
//! bytes, so both are fuzzed (see `fuzz/`).
use core::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};
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
    /// RFC 7339 overload feedback in the top Via.
    pub overload: crate::load::OcFeedback,
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
        overload: crate::load::OcFeedback::None,
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
            response.overload = crate::load::parse_oc(value);
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

/// Why [`service_unavailable`] builds no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoAnswer {
    /// The request lacks a Via, From, To, Call-ID or CSeq (or is not UTF-8).
    Incomplete,
    /// The 503 would be this many bytes, more than the limit it was given.
    TooLarge(usize),
}

/// A stateless `503 Service Unavailable` for `request`, which came from `source` (RFC
/// 3261 8.2.6.2): its Via headers in order, From, To (with a tag added when it has
/// none), Call-ID and CSeq. The top Via gets `received=<source IP>` when its host is not
/// that address (RFC 3261 18.2.1), and `rport=<source port>` plus `received` when it
/// asks with `rport` (RFC 3581), so that the answer finds a client behind NAT. A 503
/// longer than `max_len` bytes is not built: it would be fragmented.
pub fn service_unavailable(
    request: &[u8],
    source: SocketAddr,
    retry_after: u32,
    max_len: usize,
) -> Result<Vec<u8>, NoAnswer> {
    let text = normalize_line_ends(std::str::from_utf8(request).map_err(|_| NoAnswer::Incomplete)?);
    let head = text.split("\n\n").next().ok_or(NoAnswer::Incomplete)?;
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
    let mut vias = named("via", "v");
    let from = named("from", "f")
        .into_iter()
        .next()
        .ok_or(NoAnswer::Incomplete)?;
    let mut to = named("to", "t")
        .into_iter()
        .next()
        .ok_or(NoAnswer::Incomplete)?;
    let call_id = named("call-id", "i")
        .into_iter()
        .next()
        .ok_or(NoAnswer::Incomplete)?;
    let cseq = named("cseq", "cseq")
        .into_iter()
        .next()
        .ok_or(NoAnswer::Incomplete)?;
    if call_id.is_empty() {
        return Err(NoAnswer::Incomplete);
    }
    let top = vias.first_mut().ok_or(NoAnswer::Incomplete)?;
    *top = with_source(top, source).ok_or(NoAnswer::Incomplete)?;
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
    if out.len() > max_len {
        return Err(NoAnswer::TooLarge(out.len()));
    }
    Ok(out.into_bytes())
}

/// Splits `s` at every `sep` outside double quotes (a quoted-string may hold `,` or `;`);
/// None when a quoted-string is not closed.
fn split_unquoted(s: &str, sep: char) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    (!quoted).then_some(parts)
}

/// The host of a via-parm's sent-by (`SIP/2.0/UDP host:port;params`), without brackets.
fn sent_by_host(sent: &str) -> &str {
    // After the two slashes of the sent-protocol and its transport token comes sent-by.
    let after_version = sent.splitn(3, '/').nth(2).unwrap_or_default().trim_start();
    let sent_by = after_version
        .split_once(char::is_whitespace)
        .map_or("", |(_, rest)| rest.trim());
    if let Some(v6) = sent_by.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        sent_by.split(':').next().unwrap_or_default().trim()
    }
}

/// The top via-parm of the Via header value `via` with `received` and `rport` filled in
/// from `source` (RFC 3261 18.2.1, RFC 3581 4); the other via-parms are kept as they are.
/// None for a Via with an unclosed quoted-string: where its parameters end is unknown.
fn with_source(via: &str, source: SocketAddr) -> Option<String> {
    let parms = split_unquoted(via, ',')?;
    let (top, rest) = parms.split_first().map_or((via, &[][..]), |(t, r)| (*t, r));
    let mut fields = split_unquoted(top, ';')?.into_iter();
    let sent = fields.next().unwrap_or_default().trim();
    let params: Vec<&str> = fields.map(str::trim).collect();
    let name_of = |p: &str| {
        p.split('=')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    };
    let wants_rport = params.iter().any(|p| name_of(p) == "rport");
    let host_is_source = sent_by_host(sent)
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip == source.ip());
    let received = (wants_rport || !host_is_source).then(|| format!("received={}", source.ip()));
    let mut out = String::from(sent);
    let mut received_written = false;
    for p in params {
        match name_of(p).as_str() {
            "rport" => out.push_str(&format!(";rport={}", source.port())),
            "received" => match &received {
                Some(r) if !received_written => {
                    out.push(';');
                    out.push_str(r);
                    received_written = true;
                }
                Some(_) => {}
                None => {
                    out.push(';');
                    out.push_str(p);
                }
            },
            _ => {
                out.push(';');
                out.push_str(p);
            }
        }
    }
    if let Some(r) = received.filter(|_| !received_written) {
        out.push(';');
        out.push_str(&r);
    }
    for r in rest {
        out.push(',');
        out.push_str(r);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:svc@198.18.0.100 SIP/2.0\r\n\
        Via: SIP/2.0/UDP 198.18.0.10:5070;branch=z9hG4bK-1\r\n\
        v: SIP/2.0/UDP 198.18.0.9:5060;branch=z9hG4bK-0\r\n\
        From: <sip:a@x>;tag=1\r\nTo: <sip:svc@198.18.0.100>\r\nCall-ID: abc@x\r\n\
        CSeq: 1 INVITE\r\nSubject: a\r\n folded\r\nContent-Length: 0\r\n\r\n";
    /// Where INVITE came from: the address and port its top Via names.
    const CLIENT: &str = "198.18.0.10:5070";

    #[test]
    fn a_lone_cr_ends_a_line_here_as_it_does_for_the_scanner() {
        let req = "INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\rCall-ID: injected\r\n\
                   From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: real@x\r\nCSeq: 1 INVITE\r\n\r\n";
        let scan = crate::parse::scan_message(req.as_bytes(), HashKey::DEFAULT);
        assert_eq!(
            &req.as_bytes()[scan.start as usize..scan.end as usize],
            b"injected"
        );
        let resp = String::from_utf8(
            service_unavailable(req.as_bytes(), CLIENT.parse().unwrap(), 5, 1472).unwrap(),
        )
        .unwrap();
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
        let resp = String::from_utf8(
            service_unavailable(INVITE.as_bytes(), CLIENT.parse().unwrap(), 5, 1472).unwrap(),
        )
        .unwrap();
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
        let resp = String::from_utf8(
            service_unavailable(tagged.as_bytes(), CLIENT.parse().unwrap(), 5, 1472).unwrap(),
        )
        .unwrap();
        assert!(resp.contains("\r\nTo: <sip:svc@x>;tag=99\r\n"));
        assert_eq!(
            service_unavailable(
                INVITE.replace("From:", "X-From:").as_bytes(),
                CLIENT.parse().unwrap(),
                5,
                1472
            ),
            Err(NoAnswer::Incomplete)
        );
    }

    /// The top Via of the 503 that `request` from `source` gets.
    fn top_via(request: &str, source: &str) -> String {
        let resp =
            service_unavailable(request.as_bytes(), source.parse().unwrap(), 5, 1472).unwrap();
        let resp = String::from_utf8(resp).unwrap();
        resp.lines()
            .find_map(|l| l.strip_prefix("Via: "))
            .unwrap()
            .to_string()
    }

    fn with_top_via(via: &str) -> String {
        INVITE.replace("SIP/2.0/UDP 198.18.0.10:5070;branch=z9hG4bK-1", via)
    }

    #[test]
    fn the_503_fills_in_rport_and_received_rfc_3581() {
        // rport asked: rport and received, even when the host is the source.
        let req = with_top_via("SIP/2.0/UDP 198.18.0.10:5070;rport;branch=z9hG4bK-1");
        assert_eq!(
            top_via(&req, "198.18.0.10:5070"),
            "SIP/2.0/UDP 198.18.0.10:5070;rport=5070;branch=z9hG4bK-1;received=198.18.0.10"
        );
        // Behind a NAT: the source differs from what the client wrote.
        let req = with_top_via("SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK-1;rport");
        assert_eq!(
            top_via(&req, "198.18.0.10:40001"),
            "SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK-1;rport=40001;received=198.18.0.10"
        );
        // An existing received (and an rport value) is replaced, in place.
        let req = with_top_via("SIP/2.0/UDP 10.0.0.5;received=10.9.9.9;rport=1;branch=z9hG4bK-1");
        assert_eq!(
            top_via(&req, "198.18.0.10:40001"),
            "SIP/2.0/UDP 10.0.0.5;received=198.18.0.10;rport=40001;branch=z9hG4bK-1"
        );
        // The second Via and a second via-parm in the same header stay as they were.
        let req = with_top_via("SIP/2.0/UDP a.example;rport;branch=z9hG4bK-1, SIP/2.0/UDP b;rport");
        let resp = String::from_utf8(
            service_unavailable(req.as_bytes(), "198.18.0.10:7".parse().unwrap(), 5, 1472).unwrap(),
        )
        .unwrap();
        assert!(
            resp.contains(
                "\r\nVia: SIP/2.0/UDP a.example;rport=7;branch=z9hG4bK-1;received=198.18.0.10, SIP/2.0/UDP b;rport\r\n\
                 Via: SIP/2.0/UDP 198.18.0.9:5060;branch=z9hG4bK-0\r\n"
            ),
            "{resp}"
        );
    }

    #[test]
    fn the_503_adds_received_only_when_the_host_is_not_the_source_rfc_3261_18_2_1() {
        let same = "SIP/2.0/UDP 198.18.0.10:5070;branch=z9hG4bK-1";
        assert_eq!(top_via(INVITE, "198.18.0.10:5070"), same);
        // The port alone differs: no rport asked, so nothing to add.
        assert_eq!(top_via(INVITE, "198.18.0.10:9999"), same);
        assert_eq!(
            top_via(INVITE, "198.18.0.11:5070"),
            "SIP/2.0/UDP 198.18.0.10:5070;branch=z9hG4bK-1;received=198.18.0.11"
        );
        // A host name is never the source address; LWS inside the sent-protocol.
        let req = with_top_via("SIP / 2.0 / UDP client.example.net ; branch=z9hG4bK-1");
        assert_eq!(
            top_via(&req, "198.18.0.10:5070"),
            "SIP / 2.0 / UDP client.example.net;branch=z9hG4bK-1;received=198.18.0.10"
        );
        // A received the client wrote is kept when none is due.
        let req = with_top_via("SIP/2.0/UDP 198.18.0.10:5070;received=1.2.3.4;branch=z9hG4bK-1");
        assert_eq!(
            top_via(&req, "198.18.0.10:5070"),
            "SIP/2.0/UDP 198.18.0.10:5070;received=1.2.3.4;branch=z9hG4bK-1"
        );
    }

    #[test]
    fn the_503_for_ipv6_clients_writes_received_without_brackets_rfc_5118() {
        let req = with_top_via("SIP/2.0/UDP [2001:db8::10]:5070;rport;branch=z9hG4bK-1");
        assert_eq!(
            top_via(&req, "[2001:db8::10]:5070"),
            "SIP/2.0/UDP [2001:db8::10]:5070;rport=5070;branch=z9hG4bK-1;received=2001:db8::10"
        );
        let req = with_top_via("SIP/2.0/UDP [2001:db8::10]:5070;branch=z9hG4bK-1");
        assert_eq!(
            top_via(&req, "[2001:db8::10]:5070"),
            "SIP/2.0/UDP [2001:db8::10]:5070;branch=z9hG4bK-1"
        );
        assert_eq!(
            top_via(&req, "[2001:db8::99]:5070"),
            "SIP/2.0/UDP [2001:db8::10]:5070;branch=z9hG4bK-1;received=2001:db8::99"
        );
    }

    #[test]
    fn a_quoted_comma_or_semicolon_does_not_split_the_top_via() {
        let req = with_top_via(r#"SIP/2.0/UDP 10.0.0.5;x="a,b;c\"d";rport;branch=z9hG4bK-1"#);
        assert_eq!(
            top_via(&req, "198.18.0.10:5"),
            r#"SIP/2.0/UDP 10.0.0.5;x="a,b;c\"d";rport=5;branch=z9hG4bK-1;received=198.18.0.10"#
        );
    }

    #[test]
    fn a_top_via_with_an_unclosed_quote_gets_no_503() {
        // Found by the sip_response fuzz target: `rport` after an unclosed quote.
        let req = with_top_via(r#"SIP/2.0/UDP 10.0.0.5;x="a;rport=;branch=z9hG4bK-1"#);
        assert_eq!(
            service_unavailable(req.as_bytes(), CLIENT.parse().unwrap(), 5, 1472),
            Err(NoAnswer::Incomplete)
        );
    }

    #[test]
    fn a_503_larger_than_the_limit_is_not_built() {
        let source = CLIENT.parse().unwrap();
        let fits = service_unavailable(INVITE.as_bytes(), source, 5, 1472).unwrap();
        assert_eq!(
            service_unavailable(INVITE.as_bytes(), source, 5, fits.len()).map(|r| r.len()),
            Ok(fits.len()),
            "exactly at the limit is sent"
        );
        assert_eq!(
            service_unavailable(INVITE.as_bytes(), source, 5, fits.len() - 1),
            Err(NoAnswer::TooLarge(fits.len()))
        );
        // A request that fits in a reassembled datagram but whose copied headers do not
        // fit in one frame: 40 Via headers of 100 bytes.
        let many_vias: String = (0..40)
            .map(|i| format!("Via: SIP/2.0/UDP 198.18.0.{i}:5060;branch=z9hG4bK-{i:0>70}\r\n"))
            .collect();
        let big = INVITE.replacen("From:", &format!("{many_vias}From:"), 1);
        assert!(matches!(
            service_unavailable(big.as_bytes(), source, 5, 1472),
            Err(NoAnswer::TooLarge(n)) if n > 4000
        ));
    }
}
