//! SIP OPTIONS health checks: the request, the response matcher, and the prober task
//! that feeds the per-backend state machine.
//!
//! The state machine itself (what a response means, Retry-After holds, up/down rules) is
//! pure logic and lives in `sip_dispatch_common::health`, where the fuzz crate drives it;
//! it is the one place that decides whether a backend takes traffic.
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

pub use sip_dispatch_common::health::{
    Admin, AliveCodes, Health, HealthConfig, HealthUri, MAX_RETRY_AFTER, ProbeOutcome, State,
};
use sip_dispatch_common::sip::parse_response;
use tokio::{net::UdpSocket, sync::mpsc};

/// Receive buffer of one prober, reused for every probe. Answers to OPTIONS are far
/// smaller; a larger datagram is read up to its last whole line within this size.
pub const RECEIVE_BUFFER: usize = 8192;

/// What a deadline becomes when `now + d` does not fit the clock: far enough to be never.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86_400);

/// `now + d`, without the overflow panic of `+` for durations from outside.
fn deadline(now: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// The identifiers of one probe: random (128 bits each, from the OS random source), so
/// that nobody off the path can forge an answer to a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeIds {
    /// The Via branch, with the RFC 3261 magic cookie.
    pub branch: String,
    pub call_id: String,
    pub tag: String,
}

impl ProbeIds {
    pub fn random() -> Result<ProbeIds, getrandom::Error> {
        let mut bytes = [0u8; 40];
        getrandom::fill(&mut bytes)?;
        let hex = crate::hashkey::hex;
        Ok(ProbeIds {
            branch: format!("z9hG4bK{}", hex(&bytes[..16])),
            call_id: format!("sd-health-{}@sip-dispatch", hex(&bytes[16..32])),
            tag: hex(&bytes[32..]),
        })
    }
}

/// A well-formed OPTIONS request (RFC 3261 section 11) to `uri` (Request-URI and To):
/// Via with the probe's branch and the offer of RFC 7339 loss-based overload control
/// (`oc`, `oc-algo="loss"`: a backend under load answers with `oc=N`), Max-Forwards,
/// From with a tag, To, Call-ID, CSeq and Content-Length: 0.
pub fn options_request(local: SocketAddr, uri: &str, ids: &ProbeIds, cseq: u32) -> String {
    let ProbeIds {
        branch,
        call_id,
        tag,
    } = ids;
    format!(
        "OPTIONS {uri} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch={branch};rport;oc;oc-algo=\"loss\"\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:sip-dispatch@{local}>;tag={tag}\r\n\
         To: <{uri}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} OPTIONS\r\n\
         Accept: application/sdp\r\n\
         User-Agent: sip-dispatch\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// One backend's prober state: the Request-URI for it, a socket connected to it (made
/// again after an error), and the receive buffer every probe reuses.
pub struct Probe {
    target: SocketAddr,
    /// The address probes come from (None: the one the kernel's routing picks).
    source: Option<IpAddr>,
    uri: String,
    sock: Option<UdpSocket>,
    buf: Vec<u8>,
}

/// A UDP socket from an ephemeral port of `source` (or of the address routing picks),
/// connected to `target`.
async fn connect(target: SocketAddr, source: Option<IpAddr>) -> std::io::Result<UdpSocket> {
    let ip = match (source, target.is_ipv6()) {
        (Some(ip), _) if ip.is_ipv6() == target.is_ipv6() => ip,
        (_, true) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        (_, false) => std::net::Ipv4Addr::UNSPECIFIED.into(),
    };
    let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
    sock.connect(target).await?;
    Ok(sock)
}

impl Probe {
    pub fn new(target: SocketAddr, uri: &HealthUri) -> Probe {
        Probe {
            target,
            source: None,
            uri: uri.for_backend(target),
            sock: None,
            buf: vec![0u8; RECEIVE_BUFFER],
        }
    }

    /// Probes from `source` (of the target's family; None: the address routing picks).
    pub fn with_source(mut self, source: Option<IpAddr>) -> Probe {
        self.source = source;
        self
    }

    /// Sends one OPTIONS and waits up to `timeout` for the final response that matches
    /// its branch and Call-ID. After an error the next probe uses a fresh socket: a
    /// connected socket keeps reporting the old error.
    pub async fn once(&mut self, timeout: Duration) -> ProbeOutcome {
        if self.sock.is_none() {
            match connect(self.target, self.source).await {
                Ok(sock) => self.sock = Some(sock),
                Err(e) => return ProbeOutcome::Unreachable(format!("probe socket: {e}")),
            }
        }
        let outcome = self.exchange(timeout).await;
        if matches!(outcome, ProbeOutcome::Unreachable(_)) {
            self.sock = None;
        }
        outcome
    }

    async fn exchange(&mut self, timeout: Duration) -> ProbeOutcome {
        let Some(sock) = &self.sock else {
            return ProbeOutcome::Unreachable("no probe socket".into());
        };
        let local = match sock.local_addr() {
            Ok(l) => l,
            Err(e) => return ProbeOutcome::Unreachable(format!("probe socket: {e}")),
        };
        let ids = match ProbeIds::random() {
            Ok(ids) => ids,
            Err(e) => return ProbeOutcome::Unreachable(format!("OS random source: {e}")),
        };
        let msg = options_request(local, &self.uri, &ids, 1);
        let start = Instant::now();
        if let Err(e) = sock.send(msg.as_bytes()).await {
            return ProbeOutcome::Unreachable(format!("send: {e}"));
        }
        let until = deadline(tokio::time::Instant::now(), timeout);
        loop {
            match tokio::time::timeout_at(until, sock.recv(&mut self.buf)).await {
                Err(_) => return ProbeOutcome::Timeout,
                Ok(Err(e)) => return ProbeOutcome::Unreachable(format!("{e}")),
                Ok(Ok(n)) => {
                    let mut received = &self.buf[..n];
                    if n == self.buf.len() {
                        // Possibly cut short: only whole lines count.
                        let whole = received.iter().rposition(|&b| b == b'\n').unwrap_or(0);
                        received = &received[..whole];
                    }
                    // Provisional responses and answers to earlier, timed-out probes are
                    // skipped.
                    if let Some(r) = parse_response(received)
                        && r.status >= 200
                        && r.branch == ids.branch
                        && r.call_id == ids.call_id
                    {
                        return ProbeOutcome::Answered {
                            status: r.status,
                            rtt: start.elapsed(),
                            retry_after: r.retry_after,
                            overload: r.overload,
                        };
                    }
                }
            }
        }
    }
}

/// Logs a response whose Retry-After is beyond [`MAX_RETRY_AFTER`]; `already` keeps a
/// prober from repeating it every interval while the backend keeps asking.
pub fn log_clamped_retry_after(target: SocketAddr, outcome: &ProbeOutcome, already: &mut bool) {
    match outcome.retry_after_beyond_limit() {
        Some(after) if !*already => {
            *already = true;
            log::warn!(
                "backend {target}: Retry-After {}s clamped to {}s",
                after.as_secs(),
                MAX_RETRY_AFTER.as_secs()
            );
        }
        Some(_) => {}
        None => *already = false,
    }
}

/// Probes `target` every interval until the receiver is gone, reporting each outcome.
pub async fn prober(
    target: SocketAddr,
    cfg: HealthConfig,
    source: Option<IpAddr>,
    tx: mpsc::Sender<(SocketAddr, ProbeOutcome)>,
) {
    let mut next = tokio::time::Instant::now();
    let mut probe = Probe::new(target, &cfg.uri).with_source(source);
    let mut clamp_logged = false;
    loop {
        tokio::time::sleep_until(next).await;
        // Ticks keep their rhythm; one missed (a slow runtime) restarts it from now.
        let now = tokio::time::Instant::now();
        // The configuration refuses intervals this short; the floor only keeps a zero
        // from spinning.
        let interval = cfg.interval.max(Duration::from_millis(1));
        next = deadline(next, interval);
        if next <= now {
            next = deadline(now, interval);
        }
        let outcome = probe.once(cfg.timeout).await;
        log_clamped_retry_after(target, &outcome, &mut clamp_logged);
        if tx.send((target, outcome)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
