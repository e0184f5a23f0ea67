//! SIP OPTIONS probes of the backends.
//!
//! Today a probe at start-up and every few seconds makes sure the kernel has a neighbour
//! entry for each backend (the XDP program's FIB lookup needs one) and tells the
//! operator which backends answer.
use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use tokio::net::UdpSocket;

/// A well-formed OPTIONS request (RFC 3261 section 11): Via with a `z9hG4bK` branch,
/// Max-Forwards, From with a tag, To, Call-ID, CSeq and Content-Length: 0.
pub fn options_request(
    local: SocketAddr,
    target: SocketAddr,
    branch: &str,
    call_id: &str,
    tag: &str,
    cseq: u32,
) -> String {
    format!(
        "OPTIONS sip:{target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:sip-dispatch@{local}>;tag={tag}\r\n\
         To: <sip:{target}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} OPTIONS\r\n\
         Accept: application/sdp\r\n\
         User-Agent: sip-dispatch\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// The status code of a SIP response whose Call-ID is `call_id`, or None.
pub fn response_status(msg: &[u8], call_id: &str) -> Option<u16> {
    let text = std::str::from_utf8(msg).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()?
        .strip_prefix("SIP/2.0 ")?
        .get(..3)?
        .parse()
        .ok()?;
    let matches = lines.take_while(|l| !l.is_empty()).any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            let name = name.trim();
            (name.eq_ignore_ascii_case("call-id") || name.eq_ignore_ascii_case("i"))
                && value.trim() == call_id
        })
    });
    matches.then_some(status)
}

/// Sends one OPTIONS to `target` and waits up to `timeout` for a response.
/// Ok(Some(rtt)) when it answered, Ok(None) on timeout.
pub async fn probe(
    target: SocketAddr,
    seq: u64,
    timeout: Duration,
) -> anyhow::Result<Option<(u16, Duration)>> {
    let bind: SocketAddr = if target.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let sock = UdpSocket::bind(bind)
        .await
        .context("binding a probe socket")?;
    sock.connect(target)
        .await
        .with_context(|| format!("no route to backend {target}"))?;
    let local = sock.local_addr()?;
    let id = format!("{:x}{:x}", std::process::id(), seq);
    let call_id = format!("sd-probe-{id}@sip-dispatch");
    let msg = options_request(local, target, &id, &call_id, &id, 1);
    let start = std::time::Instant::now();
    sock.send(msg.as_bytes())
        .await
        .with_context(|| format!("sending OPTIONS to {target}"))?;
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => return Ok(None),
            // ICMP port unreachable and the like.
            Ok(Err(_)) => return Ok(None),
            Ok(Ok(n)) => {
                if let Some(code) = response_status(&buf[..n], &call_id)
                    && code >= 200
                {
                    return Ok(Some((code, start.elapsed())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_is_well_formed_and_matches_its_response() {
        let local: SocketAddr = "198.18.0.2:40000".parse().unwrap();
        let target: SocketAddr = "198.18.0.21:5060".parse().unwrap();
        let req = options_request(local, target, "abc", "cid-1@x", "t1", 7);
        assert!(req.starts_with("OPTIONS sip:198.18.0.21:5060 SIP/2.0\r\n"));
        assert!(req.contains("\r\nVia: SIP/2.0/UDP 198.18.0.2:40000;branch=z9hG4bKabc;rport\r\n"));
        assert!(req.contains("\r\nCSeq: 7 OPTIONS\r\n"));
        assert!(req.ends_with("Content-Length: 0\r\n\r\n"));
        let scan = sip_dispatch_common::parse::scan_message(
            req.as_bytes(),
            sip_dispatch_common::HashKey::DEFAULT,
        );
        assert_eq!(
            &req.as_bytes()[scan.start as usize..scan.end as usize],
            b"cid-1@x"
        );

        let resp = "SIP/2.0 200 OK\r\nVia: x\r\ni: cid-1@x\r\nCSeq: 7 OPTIONS\r\n\r\n";
        assert_eq!(response_status(resp.as_bytes(), "cid-1@x"), Some(200));
        assert_eq!(response_status(resp.as_bytes(), "other"), None);
        assert_eq!(
            response_status(
                b"OPTIONS sip:x SIP/2.0\r\nCall-ID: cid-1@x\r\n\r\n",
                "cid-1@x"
            ),
            None
        );
    }
}
