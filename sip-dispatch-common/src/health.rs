//! The health-check state machine of the controller (userspace only): which response
//! codes mean "alive", the probe's Request-URI template, and the per-backend state fed
//! with each probe's outcome. Pure logic on values from outside (response codes,
//! Retry-After, round trips, the clock), so it lives here, where the fuzz crate can
//! drive it together with the response parser (`fuzz/fuzz_targets/health_state.rs`).
use core::{fmt, str::FromStr, time::Duration};
use std::{
    format,
    net::SocketAddr,
    string::{String, ToString},
    time::{Instant, SystemTime},
    vec::Vec,
};

/// The longest a `503` with `Retry-After` holds a backend down. A backend asking for
/// more is held this long and probed again after it: one answer must not take a backend
/// out for days (or overflow the clock).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

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

/// The Request-URI of the OPTIONS probe (also its To URI): a `sip:` URI in which
/// `{backend}` stands for the backend's `ADDR:PORT` (an IPv6 address in brackets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthUri(String);

impl HealthUri {
    /// `sip:ADDR:PORT`, no user part.
    pub const DEFAULT: &'static str = "sip:{backend}";
    pub const PLACEHOLDER: &'static str = "{backend}";
    /// Longest template accepted, in bytes.
    pub const MAX_LEN: usize = 256;

    /// The URI for one backend.
    pub fn for_backend(&self, backend: SocketAddr) -> String {
        self.0.replace(Self::PLACEHOLDER, &backend.to_string())
    }

    pub fn template(&self) -> &str {
        &self.0
    }
}

impl Default for HealthUri {
    fn default() -> Self {
        HealthUri(Self::DEFAULT.to_string())
    }
}

impl fmt::Display for HealthUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for HealthUri {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid health URI {s:?}: {why}");
        if s.len() > Self::MAX_LEN {
            return Err(bad(&format!(
                "{} bytes, at most {} allowed",
                s.len(),
                Self::MAX_LEN
            )));
        }
        let Some(rest) = s
            .get(..4)
            .filter(|scheme| scheme.eq_ignore_ascii_case("sip:"))
            .map(|_| &s[4..])
        else {
            return Err(bad("must be a sip: URI, e.g. sip:ping@{backend}"));
        };
        if rest.is_empty() {
            return Err(bad("nothing after sip:"));
        }
        // Outside the placeholder, only printable ASCII that may stand in a SIP URI
        // written inside <...> on a header line: no space, CR, LF, control characters,
        // angle brackets, quotes or braces.
        let others = s.replace(Self::PLACEHOLDER, "");
        if let Some(c) = others
            .chars()
            .find(|c| !c.is_ascii_graphic() || matches!(c, '<' | '>' | '"' | '{' | '}'))
        {
            return Err(bad(&format!(
                "character {c:?} not allowed (only {} may stand in braces)",
                Self::PLACEHOLDER
            )));
        }
        Ok(HealthUri(s.to_string()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub down_after: u32,
    pub up_after: u32,
    pub alive: AliveCodes,
    /// Request-URI template of the OPTIONS probe.
    pub uri: HealthUri,
}

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// A final response; alive or not is for [`AliveCodes`] to say.
    Answered {
        status: u16,
        rtt: Duration,
        retry_after: Option<Duration>,
        /// RFC 7339 feedback in its top Via (see [`crate::load`]).
        overload: crate::load::OcFeedback,
    },
    Timeout,
    /// ICMP unreachable, no route, or a send error.
    Unreachable(String),
}

impl ProbeOutcome {
    /// The Retry-After of a response that asks for more than [`MAX_RETRY_AFTER`].
    pub fn retry_after_beyond_limit(&self) -> Option<Duration> {
        match self {
            ProbeOutcome::Answered {
                retry_after: Some(after),
                ..
            } if *after > MAX_RETRY_AFTER => Some(*after),
            _ => None,
        }
    }
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
    /// Round trip of the last probe; None when it got no final response.
    pub last_rtt: Option<Duration>,
    /// Status code of the last probe's final response; None when it got none.
    pub last_code: Option<u16>,
    /// Smoothed RTT, as TCP does it (RFC 6298: 7/8 old + 1/8 new).
    pub srtt: Option<Duration>,
    pub last_change: SystemTime,
    pub reason: String,
    /// A 503 with Retry-After keeps the backend down until then (at most
    /// [`MAX_RETRY_AFTER`] after that response).
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
            last_code: None,
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
            self.checks = self.checks.saturating_add(checks);
            self.check_failures = self.check_failures.saturating_add(failures);
            return true;
        }
        self.checks = self.checks.saturating_add(1);
        self.last_code = None;
        self.last_rtt = None;
        let failure = match outcome {
            ProbeOutcome::Answered {
                status,
                rtt,
                retry_after,
                ..
            } => {
                self.last_code = Some(*status);
                self.last_rtt = Some(*rtt);
                self.srtt = Some(match self.srtt {
                    Some(s) => smooth(s, *rtt),
                    None => *rtt,
                });
                if cfg.alive.alive(*status) {
                    None
                } else if let (503, Some(after)) = (*status, retry_after) {
                    self.check_failures = self.check_failures.saturating_add(1);
                    self.consecutive_successes = 0;
                    self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                    let held_for = (*after).min(MAX_RETRY_AFTER);
                    self.held_until = now.checked_add(held_for);
                    let reason = if held_for < *after {
                        format!(
                            "held for {}s by 503 with Retry-After {}s (clamped at {}s)",
                            held_for.as_secs(),
                            after.as_secs(),
                            MAX_RETRY_AFTER.as_secs()
                        )
                    } else {
                        format!(
                            "held for {0}s by 503 with Retry-After {0}s",
                            after.as_secs()
                        )
                    };
                    return self.change(State::Down, reason);
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
                self.check_failures = self.check_failures.saturating_add(1);
                self.consecutive_successes = 0;
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
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
                self.consecutive_successes = self.consecutive_successes.saturating_add(1);
                if self.state == State::Down
                    && !self.held_at(now)
                    && self.consecutive_successes >= cfg.up_after
                {
                    self.held_until = None;
                    let n = self.consecutive_successes;
                    return self.change(State::Up, format!("{n} consecutive successes"));
                }
                false
            }
        }
    }

    /// Whether a 503's Retry-After still holds the backend down at `now`.
    pub fn held_at(&self, now: Instant) -> bool {
        self.held_until.is_some_and(|t| now < t)
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

/// 7/8 of the old smoothed RTT plus 1/8 of the new sample, without overflow for any
/// pair of durations.
fn smooth(srtt: Duration, rtt: Duration) -> Duration {
    srtt.checked_mul(7)
        .and_then(|s| s.checked_add(rtt))
        .map(|sum| sum / 8)
        .unwrap_or_else(|| (srtt / 8).saturating_mul(7).saturating_add(rtt / 8))
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
            uri: HealthUri::default(),
        }
    }

    fn ok(status: u16) -> ProbeOutcome {
        ProbeOutcome::Answered {
            status,
            rtt: Duration::from_millis(2),
            retry_after: None,
            overload: crate::load::OcFeedback::None,
        }
    }

    fn busy(retry_after: Duration) -> ProbeOutcome {
        ProbeOutcome::Answered {
            status: 503,
            rtt: Duration::from_millis(1),
            retry_after: Some(retry_after),
            overload: crate::load::OcFeedback::None,
        }
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
    fn health_uri_template() {
        let v4: SocketAddr = "198.18.0.21:5060".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::21]:5062".parse().unwrap();
        let default = HealthUri::default();
        assert_eq!(default.for_backend(v4), "sip:198.18.0.21:5060");
        assert_eq!(default.for_backend(v6), "sip:[2001:db8::21]:5062");
        let ping: HealthUri = "sip:ping@{backend}".parse().unwrap();
        assert_eq!(ping.for_backend(v4), "sip:ping@198.18.0.21:5060");
        assert_eq!(ping.for_backend(v6), "sip:ping@[2001:db8::21]:5062");
        let fixed: HealthUri = "SIP:health@example.net;transport=udp".parse().unwrap();
        assert_eq!(
            fixed.for_backend(v4),
            "SIP:health@example.net;transport=udp"
        );
        let long = format!("sip:{}@{{backend}}", "a".repeat(300));
        for bad in [
            "",
            "sip:",
            "ping@{backend}",
            "sips:{backend}",
            "tel:+15551234",
            "sip:ping @{backend}",
            "sip:ping@{backend}\r\nX-Injected: 1",
            "sip:ping\n@{backend}",
            "sip:\u{7f}@{backend}",
            "sip:p\u{e9}@{backend}",
            "sip:<x>@{backend}",
            "sip:{host}",
            "sip:{backend",
            long.as_str(),
        ] {
            let err = bad.parse::<HealthUri>().expect_err(bad);
            assert!(err.starts_with("invalid health URI "), "{err}");
            assert!(
                !err.contains('\n') && !err.contains('\r'),
                "one line: {err}"
            );
        }
    }

    #[test]
    fn down_after_consecutive_failures_and_up_after_consecutive_successes() {
        let cfg = cfg();
        let now = Instant::now();
        let mut h = Health::new(State::Up, "start");
        assert!(!h.record(&ProbeOutcome::Timeout, &cfg, now));
        assert_eq!((h.last_code, h.last_rtt), (None, None));
        assert!(!h.record(&ok(500), &cfg, now));
        assert_eq!(
            (h.last_code, h.last_rtt),
            (Some(500), Some(Duration::from_millis(2)))
        );
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
        assert_eq!((h.checks, h.check_failures), (8, 5));
    }

    #[test]
    fn retry_after_503_takes_the_backend_out_for_that_long() {
        let cfg = cfg();
        let now = Instant::now();
        let mut h = Health::new(State::Up, "start");
        assert!(
            h.record(&busy(Duration::from_secs(10)), &cfg, now),
            "down at once"
        );
        assert_eq!(h.state, State::Down);
        assert_eq!(h.reason, "held for 10s by 503 with Retry-After 10s");
        assert!(!h.record(&ok(200), &cfg, now + Duration::from_secs(1)));
        assert!(
            !h.record(&ok(200), &cfg, now + Duration::from_secs(2)),
            "held by Retry-After"
        );
        assert!(h.record(&ok(200), &cfg, now + Duration::from_secs(11)));
        assert_eq!(h.state, State::Up);
    }

    #[test]
    fn a_huge_retry_after_is_clamped_at_one_hour() {
        let cfg = cfg();
        let now = Instant::now();
        let hour = Duration::from_secs(3600);
        for secs in [3601, 1 << 63, u64::MAX] {
            let after = Duration::from_secs(secs);
            for first in [true, false] {
                let mut h = if first {
                    Health::unprobed()
                } else {
                    Health::new(State::Up, "start")
                };
                assert!(h.record(&busy(after), &cfg, now), "{secs}: down at once");
                assert_eq!(h.state, State::Down);
                assert_eq!(h.held_until, Some(now + hour), "{secs}");
                assert!(
                    h.reason.contains(&format!(
                        "held for 3600s by 503 with Retry-After {secs}s (clamped at 3600s)"
                    )),
                    "{}",
                    h.reason
                );
                assert!(
                    !h.record(&ok(200), &cfg, now + hour - Duration::from_secs(1)),
                    "still held"
                );
                let back = now + hour;
                assert!(
                    h.record(&ok(200), &cfg, back),
                    "up after the clamped hold and up-after successes"
                );
                assert_eq!(h.state, State::Up);
            }
        }
        // The largest duration there is: no overflow anywhere.
        let mut h = Health::new(State::Up, "start");
        let max = ProbeOutcome::Answered {
            status: 503,
            rtt: Duration::MAX,
            retry_after: Some(Duration::MAX),
            overload: crate::load::OcFeedback::None,
        };
        assert!(h.record(&max, &cfg, now));
        assert_eq!(h.held_until, Some(now + hour));
        assert!(!h.record(&max, &cfg, now));
        assert!(h.srtt.is_some());
        assert_eq!(
            max.retry_after_beyond_limit(),
            Some(Duration::MAX),
            "the prober logs this one"
        );
        assert_eq!(busy(hour).retry_after_beyond_limit(), None);
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
            overload: crate::load::OcFeedback::None,
        };
        h.record(&at(8), &cfg, Instant::now());
        assert_eq!(h.srtt, Some(Duration::from_millis(8)));
        h.record(&at(16), &cfg, Instant::now());
        assert_eq!(h.srtt, Some(Duration::from_millis(9)));
        assert_eq!(h.last_rtt, Some(Duration::from_millis(16)));
        // No overflow at the top of the range, and the result stays between the two.
        let top = smooth(Duration::MAX, Duration::MAX);
        assert!(top > Duration::MAX - Duration::from_secs(1), "{top:?}");
        let mixed = smooth(Duration::MAX, Duration::ZERO);
        assert!(
            mixed < Duration::MAX && mixed > Duration::MAX / 2,
            "{mixed:?}"
        );
    }
}
