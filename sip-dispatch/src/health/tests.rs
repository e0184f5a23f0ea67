use super::*;

fn ids() -> ProbeIds {
    ProbeIds {
        branch: "z9hG4bKabc".into(),
        call_id: "cid-1@x".into(),
        tag: "t1".into(),
    }
}

#[test]
fn options_is_well_formed_and_its_response_matches() {
    let local: SocketAddr = "198.18.0.2:40000".parse().unwrap();
    let target: SocketAddr = "198.18.0.21:5060".parse().unwrap();
    let uri = HealthUri::default().for_backend(target);
    let req = options_request(local, &uri, &ids(), 7);
    assert!(req.starts_with("OPTIONS sip:198.18.0.21:5060 SIP/2.0\r\n"));
    assert!(req.contains(
        "\r\nVia: SIP/2.0/UDP 198.18.0.2:40000;branch=z9hG4bKabc;rport;oc;oc-algo=\"loss\"\r\n"
    ));
    assert!(req.contains("\r\nMax-Forwards: 70\r\n"));
    assert!(req.contains("\r\nFrom: <sip:sip-dispatch@198.18.0.2:40000>;tag=t1\r\n"));
    assert!(req.contains("\r\nTo: <sip:198.18.0.21:5060>\r\n"));
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

    let resp = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 198.18.0.2:40000;branch=z9hG4bKabc\r\ni: cid-1@x\r\n\r\n";
    let r = parse_response(resp.as_bytes()).unwrap();
    assert_eq!(
        (r.status, r.call_id.as_str(), r.branch.as_str()),
        (200, "cid-1@x", "z9hG4bKabc")
    );
}

#[test]
fn the_health_uri_is_the_request_uri_and_the_to() {
    let local: SocketAddr = "[2001:db8::2]:40000".parse().unwrap();
    let target: SocketAddr = "[2001:db8::21]:5060".parse().unwrap();
    let uri: HealthUri = "sip:ping@{backend}".parse().unwrap();
    let req = options_request(local, &uri.for_backend(target), &ids(), 1);
    assert!(
        req.starts_with("OPTIONS sip:ping@[2001:db8::21]:5060 SIP/2.0\r\n"),
        "{req}"
    );
    assert!(
        req.contains("\r\nTo: <sip:ping@[2001:db8::21]:5060>\r\n"),
        "{req}"
    );
}

#[test]
fn probe_ids_are_random_per_probe() {
    let a = ProbeIds::random().unwrap();
    let b = ProbeIds::random().unwrap();
    assert!(
        a.branch.starts_with("z9hG4bK") && a.branch.len() == 7 + 32,
        "{a:?}"
    );
    assert!(a.call_id.starts_with("sd-health-") && a.call_id.ends_with("@sip-dispatch"));
    assert_eq!(a.tag.len(), 16);
    assert_ne!(a.branch, b.branch);
    assert_ne!(a.call_id, b.call_id);
    assert_ne!(a.tag, b.tag);
    // No part of one probe's ids is derived from another's (not a counter, not the pid).
    assert_ne!(&a.branch[7..23], &b.branch[7..23]);
    assert_ne!(&a.call_id[10..26], &b.call_id[10..26]);
}

#[test]
fn deadlines_never_overflow() {
    let now = tokio::time::Instant::now();
    assert_eq!(
        deadline(now, Duration::from_secs(1)),
        now + Duration::from_secs(1)
    );
    assert!(deadline(now, Duration::MAX) > now + Duration::from_secs(86_400));
    assert!(deadline(now, Duration::from_secs(u64::MAX)) > now);
}

#[test]
fn a_clamped_retry_after_is_logged_once_per_run() {
    let target: SocketAddr = "198.18.0.21:5060".parse().unwrap();
    let busy = |secs| ProbeOutcome::Answered {
        status: 503,
        rtt: Duration::from_millis(1),
        retry_after: Some(Duration::from_secs(secs)),
        overload: sip_dispatch_common::load::OcFeedback::None,
    };
    let mut logged = false;
    log_clamped_retry_after(target, &busy(10), &mut logged);
    assert!(!logged);
    log_clamped_retry_after(target, &busy(u64::MAX), &mut logged);
    assert!(logged);
    log_clamped_retry_after(target, &ProbeOutcome::Timeout, &mut logged);
    assert!(!logged, "armed again once the backend stops asking");
}

/// A minimal responder on loopback: answers each OPTIONS with `first` (when given)
/// and then `status`, echoing Via and Call-ID, and reports the Request-URIs it saw.
async fn responder(
    first: Option<&'static str>,
    status: &'static str,
    extra: String,
) -> (SocketAddr, mpsc::Receiver<String>) {
    responder_with(first, status, extra, |via, _| via.to_string()).await
}

/// [`responder`], with the Via line of the answer to the n-th request (from 1) made by
/// `via` from the request's.
async fn responder_with(
    first: Option<&'static str>,
    status: &'static str,
    extra: String,
    via: impl Fn(&str, usize) -> String + Send + 'static,
) -> (SocketAddr, mpsc::Receiver<String>) {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let mut requests = 0;
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            requests += 1;
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let header = |name: &str| {
                req.lines()
                    .find(|l| l.starts_with(name))
                    .unwrap_or_default()
                    .to_string()
            };
            let _ = tx.try_send(req.lines().next().unwrap_or_default().to_string());
            for line in first.into_iter().chain([status]) {
                let resp = format!(
                    "SIP/2.0 {line}\r\n{}\r\n{}\r\nCSeq: 1 OPTIONS\r\n{extra}\r\n",
                    via(&header("Via:"), requests),
                    header("Call-ID:")
                );
                let _ = server.send_to(resp.as_bytes(), from).await;
            }
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn one_probe_reads_odd_answers_with_one_buffer() {
    // 100 Trying, then a 503 with the largest Retry-After there is and a long header.
    let (addr, mut seen) = responder(
        Some("100 Trying"),
        "503 Service Unavailable",
        format!(
            "Retry-After: 18446744073709551615 (gone fishing)\r\nX-Pad: {}\r\n",
            "a".repeat(2000)
        ),
    )
    .await;
    let uri: HealthUri = "sip:ping@{backend}".parse().unwrap();
    let mut probe = Probe::new(addr, &uri);
    let buffer = probe.buf.as_ptr();
    for _ in 0..3 {
        let outcome = probe.once(Duration::from_secs(2)).await;
        assert_eq!(
            outcome.retry_after_beyond_limit(),
            Some(Duration::from_secs(u64::MAX)),
            "{outcome:?}"
        );
        assert!(
            matches!(outcome, ProbeOutcome::Answered { status: 503, .. }),
            "the final response, not the 100: {outcome:?}"
        );
        assert_eq!(
            seen.recv().await.unwrap(),
            format!("OPTIONS sip:ping@{addr} SIP/2.0")
        );
    }
    assert_eq!(
        probe.buf.as_ptr(),
        buffer,
        "the same buffer for every probe"
    );
    assert_eq!(probe.buf.len(), RECEIVE_BUFFER);
}

#[tokio::test]
async fn an_answer_beyond_the_buffer_is_read_up_to_its_last_whole_line() {
    // A 503 padded so that the buffer ends inside `Retry-After: 1234|5678`: read as
    // it stands, that would be a hold of 1234 s; only whole lines count, so none.
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let Ok((n, from)) = server.recv_from(&mut buf).await else {
            return;
        };
        let req = String::from_utf8_lossy(&buf[..n]).to_string();
        let header = |name: &str| {
            req.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default()
                .to_string()
        };
        let head = format!(
            "SIP/2.0 503 Service Unavailable\r\n{}\r\n{}\r\nCSeq: 1 OPTIONS\r\n",
            header("Via:"),
            header("Call-ID:")
        );
        let pad = RECEIVE_BUFFER - head.len() - "X-Pad: \r\nRetry-After: 1234".len();
        let resp = format!(
            "{head}X-Pad: {}\r\nRetry-After: 12345678\r\n\r\n",
            "p".repeat(pad)
        );
        assert_eq!(&resp[RECEIVE_BUFFER - 4..RECEIVE_BUFFER + 4], "12345678");
        let _ = server.send_to(resp.as_bytes(), from).await;
    });
    let mut probe = Probe::new(addr, &HealthUri::default());
    let outcome = probe.once(Duration::from_secs(2)).await;
    assert!(
        matches!(
            outcome,
            ProbeOutcome::Answered {
                status: 503,
                retry_after: None,
                ..
            }
        ),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn probes_a_real_udp_responder_and_sees_icmp_unreachable() {
    // A minimal responder on loopback answering OPTIONS with 200, echoing Via and Call-ID.
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let header = |name: &str| {
                req.lines()
                    .find(|l| l.starts_with(name))
                    .unwrap_or_default()
                    .to_string()
            };
            let resp = format!(
                "SIP/2.0 200 OK\r\n{}\r\n{}\r\nCSeq: 1 OPTIONS\r\n\r\n",
                header("Via:"),
                header("Call-ID:")
            );
            let _ = server.send_to(resp.as_bytes(), from).await;
        }
    });
    let mut probe = Probe::new(addr, &HealthUri::default());
    let outcome = probe.once(Duration::from_secs(2)).await;
    assert!(
        matches!(outcome, ProbeOutcome::Answered { status: 200, .. }),
        "{outcome:?}"
    );

    // Nothing listens on this port: the kernel answers with ICMP port unreachable.
    let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let mut probe = Probe::new(closed_addr, &HealthUri::default());
    let buffer = probe.buf.as_ptr();
    for _ in 0..3 {
        let outcome = probe.once(Duration::from_secs(2)).await;
        assert!(
            matches!(outcome, ProbeOutcome::Unreachable(_)),
            "{outcome:?}"
        );
        assert!(probe.sock.is_none(), "a fresh socket for the next probe");
    }
    assert_eq!(probe.buf.as_ptr(), buffer, "one buffer across reconnects");
}

/// A backend under load answers the probe with RFC 7339 feedback in our Via; one that
/// echoes the Via as it came gives none.
#[tokio::test]
async fn the_probe_offers_overload_control_and_reads_the_answer() {
    // As RFC 7339 has it, the first answer gives our bare `oc` its value.
    let (addr, _seen) = responder_with(None, "200 OK", String::new(), |via, n| match n {
        1 => format!(
            "{};oc-validity=2000;oc-seq=7.1",
            via.replace(";oc;", ";oc=50;")
        ),
        _ => via.to_string(),
    })
    .await;
    let mut probe = Probe::new(addr, &HealthUri::default());
    let outcome = probe.once(Duration::from_secs(2)).await;
    let ProbeOutcome::Answered { overload, .. } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(
        overload,
        sip_dispatch_common::load::OcFeedback::Valid(sip_dispatch_common::load::Oc {
            percent: 50,
            validity: Duration::from_secs(2),
            seq: Some(710_000),
        })
    );
    // The offer echoed back: `oc` without a value is no feedback.
    let outcome = probe.once(Duration::from_secs(2)).await;
    assert!(
        matches!(
            outcome,
            ProbeOutcome::Answered {
                overload: sip_dispatch_common::load::OcFeedback::None,
                ..
            }
        ),
        "{outcome:?}"
    );
}
