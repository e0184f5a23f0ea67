//! SIP OPTIONS health checks: the request, the response matcher, the per-backend state
//! machine, and the prober task that feeds it.
//!
//! The state machine is the one place that decides whether a backend takes traffic;
//! administrative states (drained, disabled) slot in here.
use std::{
    net::SocketAddr,
    str::FromStr,
    time::{Duration, Instant, SystemTime},
};

use sip_dispatch_common::sip::parse_response;
use tokio::{net::UdpSocket, sync::mpsc};

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

/// Which final response codes mean "alive": a comma-separated list of codes (`200`),
/// classes (`2xx`) and exclusions (`!408`, `!5xx`). An exclusion wins over an inclusion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AliveCodes {
    include: Vec<(u16, u16)>,
    exclude: Vec<(u16, u16)>,
}

impl AliveCodes {
    /// Any final response except 408, 480 and 5xx.
    pub const DEFAULT: &'static str = "2xx,3xx,4xx,6xx,!408,!480";

    pub fn alive(&self, code: u16) -> bool {
        let within =
            |ranges: &[(u16, u16)]| ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&code));
        code >= 200 && within(&self.include) && !within(&self.exclude)
    }
}

impl FromStr for AliveCodes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut codes = AliveCodes {
            include: Vec::new(),
            exclude: Vec::new(),
        };
        for item in s.split(',').map(str::trim) {
            let (negated, spec) = match item.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, item),
            };
            let range = match spec.as_bytes() {
                [d @ b'2'..=b'6', b'x' | b'X', b'x' | b'X'] => {
                    let base = (*d - b'0') as u16 * 100;
                    (base, base + 99)
                }
                _ => match spec.parse::<u16>() {
                    Ok(c) if (200..=699).contains(&c) => (c, c),
                    _ => {
                        return Err(format!(
                            "invalid response code {item:?} in {s:?} (expected e.g. 200, 2xx or !408)"
                        ));
                    }
                },
            };
            if negated {
                codes.exclude.push(range)
            } else {
                codes.include.push(range)
            }
        }
        if codes.include.is_empty() {
            return Err(format!("{s:?} names no alive response code"));
        }
        Ok(codes)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub down_after: u32,
    pub up_after: u32,
    pub alive: AliveCodes,
}

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// A final response; alive or not is for [`AliveCodes`] to say.
    Answered {
        status: u16,
        rtt: Duration,
        retry_after: Option<Duration>,
    },
    Timeout,
    /// ICMP unreachable, no route, or a send error.
    Unreachable(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Up,
    Down,
}

/// What the operator decided, on top of what the health checks found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admin {
    Enabled,
    /// No new calls (weight 0): keeps being probed.
    Drained,
    /// Out of service: not probed, no calls.
    Disabled,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
        }
    }
}

/// A backend's health and what the operator wants to see of it.
#[derive(Clone, Debug)]
pub struct Health {
    pub state: State,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub last_rtt: Option<Duration>,
    /// Smoothed RTT, as TCP does it (RFC 6298: 7/8 old + 1/8 new).
    pub srtt: Option<Duration>,
    pub last_change: SystemTime,
    pub reason: String,
    /// A 503 with Retry-After keeps the backend down until then.
    pub held_until: Option<Instant>,
    /// False until the first probe, which alone decides the first state.
    pub probed: bool,
    pub admin: Admin,
    /// Health checks done, and how many of them failed.
    pub checks: u64,
    pub check_failures: u64,
}

impl Health {
    pub fn new(state: State, reason: impl Into<String>) -> Health {
        Health {
            state,
            consecutive_failures: 0,
            consecutive_successes: 0,
            last_rtt: None,
            srtt: None,
            last_change: SystemTime::now(),
            reason: reason.into(),
            held_until: None,
            probed: true,
            admin: Admin::Enabled,
            checks: 0,
            check_failures: 0,
        }
    }

    /// A backend not probed yet: down until its first probe says otherwise.
    pub fn unprobed() -> Health {
        Health {
            probed: false,
            ..Health::new(State::Down, "not probed yet")
        }
    }

    /// Whether the backend may take calls.
    pub fn takes_traffic(&self) -> bool {
        self.probed && self.state == State::Up && self.admin == Admin::Enabled
    }

    /// What an operator sees: up, down, drained or disabled.
    pub fn display_state(&self) -> &'static str {
        match self.admin {
            Admin::Disabled => "disabled",
            Admin::Drained => "drained",
            Admin::Enabled => self.state.name(),
        }
    }

    /// The state a backend starts in: its first probe alone decides.
    pub fn from_first_probe(outcome: &ProbeOutcome, cfg: &HealthConfig, now: Instant) -> Health {
        let mut h = Health::new(State::Up, "answered the first probe");
        let once = HealthConfig {
            down_after: 1,
            ..cfg.clone()
        };
        if h.record(outcome, &once, now) {
            h.reason = format!("first probe: {}", h.reason);
        }
        h
    }

    /// Takes one probe's outcome; returns true when the state changed. The first
    /// outcome of an unprobed backend decides its state on its own.
    pub fn record(&mut self, outcome: &ProbeOutcome, cfg: &HealthConfig, now: Instant) -> bool {
        if !self.probed {
            let (admin, checks, failures) = (self.admin, self.checks, self.check_failures);
            *self = Health {
                admin,
                ..Health::from_first_probe(outcome, cfg, now)
            };
            self.checks += checks;
            self.check_failures += failures;
            return true;
        }
        self.checks += 1;
        let failure = match outcome {
            ProbeOutcome::Answered {
                status,
                rtt,
                retry_after,
            } => {
                self.last_rtt = Some(*rtt);
                self.srtt = Some(match self.srtt {
                    Some(s) => (s * 7 + *rtt) / 8,
                    None => *rtt,
                });
                if cfg.alive.alive(*status) {
                    None
                } else if let (503, Some(after)) = (*status, retry_after) {
                    self.check_failures += 1;
                    self.held_until = Some(now + *after);
                    return self.change(
                        State::Down,
                        format!("503 with Retry-After {}s", after.as_secs()),
                    );
                } else {
                    Some(format!("response {status}"))
                }
            }
            ProbeOutcome::Timeout => {
                Some(format!("no response within {}ms", cfg.timeout.as_millis()))
            }
            ProbeOutcome::Unreachable(why) => Some(why.clone()),
        };
        match failure {
            Some(why) => {
                self.check_failures += 1;
                self.consecutive_successes = 0;
                self.consecutive_failures += 1;
                if self.state == State::Up && self.consecutive_failures >= cfg.down_after {
                    let n = self.consecutive_failures;
                    return self.change(
                        State::Down,
                        format!("{n} consecutive failures, last: {why}"),
                    );
                }
                false
            }
            None => {
                self.consecutive_failures = 0;
                self.consecutive_successes += 1;
                let held = self.held_until.is_some_and(|t| now < t);
                if self.state == State::Down && !held && self.consecutive_successes >= cfg.up_after
                {
                    self.held_until = None;
                    let n = self.consecutive_successes;
                    return self.change(State::Up, format!("{n} consecutive successes"));
                }
                false
            }
        }
    }

    fn change(&mut self, state: State, reason: String) -> bool {
        let changed = self.state != state;
        self.state = state;
        self.reason = reason;
        if changed {
            self.last_change = SystemTime::now();
        }
        changed
    }
}

/// Sends one OPTIONS over `sock` (connected to the backend) and waits for the response
/// that matches its branch and Call-ID.
pub async fn probe_once(sock: &UdpSocket, seq: u64, timeout: Duration) -> ProbeOutcome {
    let (local, target) = match (sock.local_addr(), sock.peer_addr()) {
        (Ok(l), Ok(t)) => (l, t),
        (Err(e), _) | (_, Err(e)) => {
            return ProbeOutcome::Unreachable(format!("probe socket: {e}"));
        }
    };
    let id = format!("{:x}-{seq:x}", std::process::id());
    let branch = format!("z9hG4bK{id}");
    let call_id = format!("sd-health-{id}@sip-dispatch");
    let msg = options_request(local, target, &id, &call_id, &id, 1);
    let start = Instant::now();
    if let Err(e) = sock.send(msg.as_bytes()).await {
        return ProbeOutcome::Unreachable(format!("send: {e}"));
    }
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => return ProbeOutcome::Timeout,
            Ok(Err(e)) => return ProbeOutcome::Unreachable(format!("{e}")),
            Ok(Ok(n)) => {
                // Provisional responses and answers to earlier, timed-out probes are skipped.
                if let Some(r) = parse_response(&buf[..n])
                    && r.status >= 200
                    && r.branch == branch
                    && r.call_id == call_id
                {
                    return ProbeOutcome::Answered {
                        status: r.status,
                        rtt: start.elapsed(),
                        retry_after: r.retry_after,
                    };
                }
            }
        }
    }
}

/// A connected probe socket for `target`.
pub async fn probe_socket(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if target.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(target).await?;
    Ok(sock)
}

/// Probes `target` every interval until the receiver is gone, reporting each outcome.
pub async fn prober(
    target: SocketAddr,
    cfg: HealthConfig,
    tx: mpsc::Sender<(SocketAddr, ProbeOutcome)>,
) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut sock = None;
    loop {
        tick.tick().await;
        seq += 1;
        if sock.is_none() {
            sock = probe_socket(target).await.ok();
        }
        let outcome = match &sock {
            Some(s) => probe_once(s, seq, cfg.timeout).await,
            None => ProbeOutcome::Unreachable("no route".into()),
        };
        if matches!(outcome, ProbeOutcome::Unreachable(_)) {
            // A fresh socket next time: a connected socket keeps reporting the old error.
            sock = None;
        }
        if tx.send((target, outcome)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            down_after: 3,
            up_after: 2,
            alive: AliveCodes::DEFAULT.parse().unwrap(),
        }
    }

    fn ok(status: u16) -> ProbeOutcome {
        ProbeOutcome::Answered {
            status,
            rtt: Duration::from_millis(2),
            retry_after: None,
        }
    }

    #[test]
    fn options_is_well_formed_and_its_response_matches() {
        let local: SocketAddr = "198.18.0.2:40000".parse().unwrap();
        let target: SocketAddr = "198.18.0.21:5060".parse().unwrap();
        let req = options_request(local, target, "abc", "cid-1@x", "t1", 7);
        assert!(req.starts_with("OPTIONS sip:198.18.0.21:5060 SIP/2.0\r\n"));
        assert!(req.contains("\r\nVia: SIP/2.0/UDP 198.18.0.2:40000;branch=z9hG4bKabc;rport\r\n"));
        assert!(req.contains("\r\nMax-Forwards: 70\r\n"));
        assert!(req.contains("\r\nFrom: <sip:sip-dispatch@198.18.0.2:40000>;tag=t1\r\n"));
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
    fn alive_codes() {
        let d: AliveCodes = AliveCodes::DEFAULT.parse().unwrap();
        for code in [200, 202, 302, 404, 405, 486, 600, 603] {
            assert!(d.alive(code), "{code}");
        }
        for code in [100, 180, 408, 480, 500, 503, 504] {
            assert!(!d.alive(code), "{code}");
        }
        let only_200: AliveCodes = "200".parse().unwrap();
        assert!(only_200.alive(200) && !only_200.alive(404));
        let classes: AliveCodes = "2xx,4xx,!404".parse().unwrap();
        assert!(classes.alive(403) && !classes.alive(404) && !classes.alive(302));
        for bad in ["", "abc", "7xx", "99", "!408", "2xx,,3xx"] {
            assert!(bad.parse::<AliveCodes>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn down_after_consecutive_failures_and_up_after_consecutive_successes() {
        let cfg = cfg();
        let now = Instant::now();
        let mut h = Health::new(State::Up, "start");
        assert!(!h.record(&ProbeOutcome::Timeout, &cfg, now));
        assert!(!h.record(&ok(500), &cfg, now));
        assert!(
            !h.record(&ok(200), &cfg, now),
            "a success resets the failure count"
        );
        assert!(!h.record(&ProbeOutcome::Timeout, &cfg, now));
        assert!(!h.record(
            &ProbeOutcome::Unreachable("port unreachable".into()),
            &cfg,
            now
        ));
        assert!(h.record(&ok(408), &cfg, now));
        assert_eq!(h.state, State::Down);
        assert!(
            h.reason
                .contains("3 consecutive failures, last: response 408"),
            "{}",
            h.reason
        );
        assert!(!h.record(&ok(200), &cfg, now));
        assert!(h.record(&ok(404), &cfg, now), "404 is alive by default");
        assert_eq!(h.state, State::Up);
        assert_eq!(h.consecutive_failures, 0);
    }

    #[test]
    fn retry_after_503_takes_the_backend_out_for_that_long() {
        let cfg = cfg();
        let now = Instant::now();
        let mut h = Health::new(State::Up, "start");
        let busy = ProbeOutcome::Answered {
            status: 503,
            rtt: Duration::from_millis(1),
            retry_after: Some(Duration::from_secs(10)),
        };
        assert!(h.record(&busy, &cfg, now), "down at once");
        assert_eq!(h.state, State::Down);
        assert!(!h.record(&ok(200), &cfg, now + Duration::from_secs(1)));
        assert!(
            !h.record(&ok(200), &cfg, now + Duration::from_secs(2)),
            "held by Retry-After"
        );
        assert!(h.record(&ok(200), &cfg, now + Duration::from_secs(11)));
        assert_eq!(h.state, State::Up);
    }

    #[test]
    fn the_first_probe_alone_decides_the_initial_state() {
        let cfg = cfg();
        let now = Instant::now();
        assert_eq!(
            Health::from_first_probe(&ok(200), &cfg, now).state,
            State::Up
        );
        let h = Health::from_first_probe(&ProbeOutcome::Timeout, &cfg, now);
        assert_eq!(h.state, State::Down);
        assert!(h.reason.starts_with("first probe: "), "{}", h.reason);
        let mut h = Health::from_first_probe(&ok(500), &cfg, now);
        assert!(!h.record(&ok(200), &cfg, now));
        assert!(
            h.record(&ok(200), &cfg, now),
            "up after up-after successes as usual"
        );
    }

    #[test]
    fn smoothed_rtt() {
        let cfg = cfg();
        let mut h = Health::new(State::Up, "start");
        let at = |ms| ProbeOutcome::Answered {
            status: 200,
            rtt: Duration::from_millis(ms),
            retry_after: None,
        };
        h.record(&at(8), &cfg, Instant::now());
        assert_eq!(h.srtt, Some(Duration::from_millis(8)));
        h.record(&at(16), &cfg, Instant::now());
        assert_eq!(h.srtt, Some(Duration::from_millis(9)));
        assert_eq!(h.last_rtt, Some(Duration::from_millis(16)));
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
        let sock = probe_socket(addr).await.unwrap();
        let outcome = probe_once(&sock, 1, Duration::from_secs(2)).await;
        assert!(
            matches!(outcome, ProbeOutcome::Answered { status: 200, .. }),
            "{outcome:?}"
        );

        // Nothing listens on this port: the kernel answers with ICMP port unreachable.
        let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let sock = probe_socket(closed_addr).await.unwrap();
        let outcome = probe_once(&sock, 2, Duration::from_secs(2)).await;
        assert!(
            matches!(outcome, ProbeOutcome::Unreachable(_)),
            "{outcome:?}"
        );
    }
}
