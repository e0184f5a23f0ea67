//! What a backend's health-check answers say about its load, for new calls only:
//!
//! - RFC 7339 overload control: the probe's Via offers `oc` with `oc-algo="loss"`; a
//!   backend under load answers with `oc=N` in that Via, asking that N % of the new
//!   requests it would get go elsewhere, for `oc-validity` milliseconds;
//! - with `--latency-aware`, the probe round trip against the backend's own baseline.
//!
//! Each gives a factor in percent; the controller multiplies the configured weight by
//! both. Probe answers are all the dispatcher sees of a backend (call responses bypass
//! it), so the feedback is as fresh as the health checks.
use std::{
    collections::VecDeque,
    format,
    string::String,
    time::{Duration, Instant},
};

/// `oc-validity` when the answer has none (the default RFC 7339 gives).
pub const DEFAULT_OC_VALIDITY: Duration = Duration::from_millis(500);

/// A longer `oc-validity` is taken as this: feedback from a backend that stops
/// answering must not outlive it by hours.
pub const MAX_OC_VALIDITY: Duration = Duration::from_secs(3600);

/// What the top Via of a probe's answer says about overload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OcFeedback {
    /// No `oc` value: the backend does not do overload control (it echoed our bare
    /// `oc` back) or has nothing to say.
    None,
    Valid(Oc),
    /// An `oc` parameter outside the grammar: ignored, and counted.
    Malformed(String),
}

/// One valid overload feedback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Oc {
    /// The share of new requests to send elsewhere, 0 to 100 %.
    pub percent: u8,
    /// How long it holds ([`DEFAULT_OC_VALIDITY`] when absent); zero ends overload
    /// control now.
    pub validity: Duration,
    /// `oc-seq` as one number: its digits before the dot times 10^5, plus its fraction
    /// (a decimal fraction: `7.5` is `7.50000`, later than `7.40`); None when absent.
    pub seq: Option<u64>,
}

/// The parameters of a Via header's first value (`;` separated, after the sent-by),
/// with quoted strings kept whole.
fn via_params(via: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let first = via
        .split(|c: char| {
            if c == '"' {
                quoted = !quoted;
            }
            c == ',' && !quoted
        })
        .next()
        .unwrap_or_default();
    let mut quoted = false;
    first
        .split(move |c: char| {
            if c == '"' {
                quoted = !quoted;
            }
            c == ';' && !quoted
        })
        .skip(1)
        .map(str::trim)
}

/// 1 to `max_len` ASCII digits as a number.
fn digits(s: &str, max_len: usize) -> Option<u64> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The overload feedback in the value of a response's top Via header (strict RFC 7339
/// grammar: `oc` 0 to 100, `oc-validity` digits, `oc-seq` digits "." digits, `oc-algo`
/// a quoted list naming `loss`; each with one value).
pub fn parse_oc(via: &str) -> OcFeedback {
    let (mut oc, mut validity, mut seq, mut algo) = (None, None, None, None);
    for param in via_params(via) {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (param, None),
        };
        let slot = if name.eq_ignore_ascii_case("oc") {
            &mut oc
        } else if name.eq_ignore_ascii_case("oc-validity") {
            &mut validity
        } else if name.eq_ignore_ascii_case("oc-seq") {
            &mut seq
        } else if name.eq_ignore_ascii_case("oc-algo") {
            &mut algo
        } else {
            continue;
        };
        // A backend should give our bare `oc` its value, but one that appends
        // `oc=N` (or repeats `oc-algo`) next to our offer still means one thing; two
        // different values do not.
        match (&*slot, value) {
            (None, _) | (Some(None), Some(_)) => *slot = Some(value),
            (Some(_), None) => {}
            (Some(Some(old)), Some(new)) if old.eq_ignore_ascii_case(new) => {}
            (Some(Some(_)), Some(_)) => {
                return OcFeedback::Malformed(format!("{name} given twice"));
            }
        }
    }
    // Our own bare `oc` echoed back, or no `oc` at all: no feedback.
    let Some(Some(oc)) = oc else {
        return OcFeedback::None;
    };
    let percent = match digits(oc, 3) {
        Some(p) if p <= 100 => p as u8,
        _ => return OcFeedback::Malformed(format!("oc={oc} is not 0 to 100")),
    };
    let validity = match validity {
        None => DEFAULT_OC_VALIDITY,
        Some(v) => match v.and_then(|v| digits(v, 12)) {
            Some(ms) => Duration::from_millis(ms).min(MAX_OC_VALIDITY),
            None => {
                return OcFeedback::Malformed(format!(
                    "oc-validity={} is not milliseconds",
                    v.unwrap_or_default()
                ));
            }
        },
    };
    let seq = match seq {
        None => None,
        Some(v) => {
            let parsed = v.and_then(|v| v.split_once('.')).and_then(|(a, b)| {
                // At most 12 + 5 digits: below 10^17, far from u64's end.
                let fraction = digits(b, 5)? * 10u64.pow(5 - b.len() as u32);
                Some(digits(a, 12)? * 100_000 + fraction)
            });
            match parsed {
                Some(s) => Some(s),
                None => {
                    return OcFeedback::Malformed(format!(
                        "oc-seq={} is not digits.digits",
                        v.unwrap_or_default()
                    ));
                }
            }
        }
    };
    if let Some(a) = algo {
        let names = a
            .and_then(|a| a.strip_prefix('"'))
            .and_then(|a| a.strip_suffix('"'));
        let loss =
            names.is_some_and(|n| n.split(',').any(|t| t.trim().eq_ignore_ascii_case("loss")));
        if !loss {
            return OcFeedback::Malformed(format!(
                "oc-algo={} does not name \"loss\"",
                a.unwrap_or_default()
            ));
        }
    }
    OcFeedback::Valid(Oc {
        percent,
        validity,
        seq,
    })
}

/// What [`Overload::take`] did with a feedback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    Nothing,
    Accepted,
    /// An `oc-seq` older than the last accepted one: ignored.
    Stale,
    Malformed,
}

/// A backend's overload state: the feedback in force, and counts of what came.
#[derive(Clone, Debug, Default)]
pub struct Overload {
    /// Percent and until when.
    in_force: Option<(u8, Instant)>,
    last_seq: Option<u64>,
    pub accepted: u64,
    pub stale: u64,
    pub malformed: u64,
}

impl Overload {
    /// Takes one answer's feedback. It holds for its validity, and at least `min_hold`
    /// (a probe interval and timeout: the next answer is the next chance to hear more).
    pub fn take(&mut self, feedback: &OcFeedback, now: Instant, min_hold: Duration) -> Taken {
        let oc = match feedback {
            OcFeedback::None => return Taken::Nothing,
            OcFeedback::Malformed(_) => {
                self.malformed = self.malformed.saturating_add(1);
                return Taken::Malformed;
            }
            OcFeedback::Valid(oc) => oc,
        };
        // Sequence numbers order feedback within one period of overload; once it has
        // ended, a restarted backend may count from anywhere.
        if self.percent(now) > 0
            && let (Some(seq), Some(last)) = (oc.seq, self.last_seq)
            && seq < last
        {
            self.stale = self.stale.saturating_add(1);
            return Taken::Stale;
        }
        self.accepted = self.accepted.saturating_add(1);
        self.last_seq = oc.seq.or(self.last_seq);
        self.in_force = if oc.validity.is_zero() || oc.percent == 0 {
            None
        } else {
            let hold = oc.validity.max(min_hold);
            now.checked_add(hold).map(|until| (oc.percent, until))
        };
        Taken::Accepted
    }

    /// The share of new calls to send elsewhere now, in percent.
    pub fn percent(&self, now: Instant) -> u8 {
        match self.in_force {
            Some((p, until)) if now < until => p,
            _ => 0,
        }
    }

    /// How long the feedback in force still holds.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        match self.in_force {
            Some((_, until)) if now < until => Some(until - now),
            _ => None,
        }
    }
}

/// How far back the latency baseline looks: the smallest round trip seen in it.
pub const BASELINE_WINDOW: Duration = Duration::from_secs(300);
const BASELINE_BUCKET: Duration = Duration::from_secs(60);

/// The lowest latency factor: a slow backend still gets some new calls (and keeps being
/// measured by them); the health checks, not latency, take a backend out.
pub const MIN_LATENCY_PERCENT: u8 = 10;

/// A backend's round trips against its own baseline (`--latency-aware`).
///
/// Baseline: the smallest probe round trip of the last [`BASELINE_WINDOW`] (a windowed
/// minimum, as BBR keeps its min RTT). Slow: the smoothed round trip (`srtt`, RFC 6298)
/// rises above `2 x baseline + 5 ms`; the factor is then `(2 x baseline + 5 ms) / srtt`,
/// rounded down to 10 % steps, at least [`MIN_LATENCY_PERCENT`]. Back to 100 % once
/// `srtt` is below `1.5 x baseline + 2 ms` (the gap is the hysteresis: a round trip near
/// the line does not flip the tables).
#[derive(Clone, Debug)]
pub struct Latency {
    /// Per minute: its start and its smallest round trip.
    minima: VecDeque<(Instant, Duration)>,
    percent: u8,
}

impl Default for Latency {
    fn default() -> Latency {
        Latency {
            minima: VecDeque::new(),
            percent: 100,
        }
    }
}

const SLOW_MARGIN: Duration = Duration::from_millis(5);
const RECOVERED_MARGIN: Duration = Duration::from_millis(2);

impl Latency {
    /// Takes one probe's round trip and the smoothed one after it.
    pub fn record(&mut self, rtt: Duration, srtt: Duration, now: Instant) {
        match self.minima.back_mut() {
            Some((start, min)) if now.saturating_duration_since(*start) < BASELINE_BUCKET => {
                *min = (*min).min(rtt);
            }
            _ => self.minima.push_back((now, rtt)),
        }
        while self
            .minima
            .front()
            .is_some_and(|(start, _)| now.saturating_duration_since(*start) >= BASELINE_WINDOW)
        {
            self.minima.pop_front();
        }
        let Some(base) = self.baseline() else {
            return;
        };
        let slow_line = base.saturating_mul(2).saturating_add(SLOW_MARGIN);
        let recovered_line = base
            .saturating_add(base / 2)
            .saturating_add(RECOVERED_MARGIN);
        if srtt > slow_line {
            let ratio = slow_line.as_secs_f64() / srtt.as_secs_f64();
            let percent = ((ratio * 10.0).floor() as u8).saturating_mul(10);
            self.percent = percent.clamp(MIN_LATENCY_PERCENT, 100);
        } else if srtt < recovered_line {
            self.percent = 100;
        }
    }

    /// The smallest round trip of the window; None before the first answer.
    pub fn baseline(&self) -> Option<Duration> {
        self.minima.iter().map(|(_, m)| *m).min()
    }

    /// The share of its weight the backend keeps, in percent.
    pub fn percent(&self) -> u8 {
        self.percent
    }
}

#[cfg(test)]
mod tests;
