//! Load-aware weights: what each probe answer says of a backend's load (RFC 7339
//! overload feedback, and with `--latency-aware` its round trip against its baseline)
//! becomes a factor on its weight for new calls. Calls in progress follow affinity
//! whatever the weights; a backend at 0 % keeps its calls, as a drained one does.
//!
//! Load changes republish the tables at most every [`LOAD_REPUBLISH_EVERY`], however
//! many backends report and however often; health changes republish at once, as before.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use sip_dispatch_common::load::{Latency, Overload, Taken};

use super::Controller;
use crate::{
    health::{Health, ProbeOutcome},
    protocol::LoadView,
};

/// The shortest time between two table changes that load alone causes.
pub const LOAD_REPUBLISH_EVERY: Duration = Duration::from_millis(500);

/// A backend's load, from its probe answers.
#[derive(Clone, Debug)]
pub(super) struct BackendLoad {
    pub(super) overload: Overload,
    pub(super) latency: Latency,
    /// The factor in force on its weight, in percent: what the tables were last asked to
    /// use (it changes only when a probe answer is taken).
    pub(super) percent: u32,
    /// Why `percent` is below 100 ("" when it is not).
    pub(super) reason: String,
    /// The last answer's feedback was malformed (one warning per run of them).
    malformed_run: bool,
}

impl Default for BackendLoad {
    fn default() -> BackendLoad {
        BackendLoad {
            overload: Overload::default(),
            latency: Latency::default(),
            percent: 100,
            reason: String::new(),
            malformed_run: false,
        }
    }
}

impl BackendLoad {
    /// Takes one probe outcome (after `health` took it); returns whether the factor
    /// changed. `min_hold`: how long any overload feedback holds at least.
    fn observe(
        &mut self,
        addr: SocketAddr,
        outcome: &ProbeOutcome,
        health: &Health,
        now: Instant,
        min_hold: Duration,
        latency_aware: bool,
    ) -> bool {
        if let ProbeOutcome::Answered { rtt, overload, .. } = outcome {
            match self.overload.take(overload, now, min_hold) {
                Taken::Malformed if !self.malformed_run => {
                    self.malformed_run = true;
                    if let sip_dispatch_common::load::OcFeedback::Malformed(why) = overload {
                        log::warn!("backend {addr}: overload feedback ignored: {why}");
                    }
                }
                Taken::Stale => {
                    log::debug!("backend {addr}: overload feedback with an older oc-seq ignored")
                }
                Taken::Malformed => {}
                _ => self.malformed_run = false,
            }
            if let Some(srtt) = health.srtt {
                self.latency.record(*rtt, srtt, now);
            }
        }
        let oc = u32::from(self.overload.percent(now));
        let latency = if latency_aware {
            u32::from(self.latency.percent())
        } else {
            100
        };
        let percent = (100 - oc.min(100)) * latency / 100;
        let mut reasons = Vec::new();
        if oc > 0 {
            let left = self.overload.remaining(now).unwrap_or_default();
            reasons.push(format!("oc={oc} for {:.1}s", left.as_secs_f64()));
        }
        if latency < 100 {
            reasons.push(format!(
                "rtt {:.1} ms against a baseline of {:.1} ms",
                ms(health.srtt),
                ms(self.latency.baseline())
            ));
        }
        let changed = percent != self.percent;
        self.percent = percent;
        self.reason = reasons.join(", ");
        if changed {
            if percent == 100 {
                log::info!("backend {addr}: load back to normal, full weight for new calls");
            } else {
                log::info!(
                    "backend {addr}: {percent}% of its weight for new calls ({})",
                    self.reason
                );
            }
        }
        changed
    }
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// When the next load-driven republish may run.
#[derive(Debug, Default)]
pub(super) struct LoadThrottle {
    last: Option<Instant>,
    /// A republish is waiting for this moment.
    pub(super) due: Option<Instant>,
}

impl LoadThrottle {
    /// A load factor changed at `now`: the republish is due now, or once
    /// [`LOAD_REPUBLISH_EVERY`] has passed since the last one.
    fn request(&mut self, now: Instant) {
        if self.due.is_none() {
            let earliest = self
                .last
                .and_then(|l| l.checked_add(LOAD_REPUBLISH_EVERY))
                .unwrap_or(now);
            self.due = Some(earliest.max(now));
        }
    }

    fn fired(&mut self, now: Instant) {
        self.due = None;
        self.last = Some(now);
    }
}

impl Controller {
    /// Takes what a probe outcome says of `addr`'s load; a changed factor asks for a
    /// republish (throttled; `republish` false: the caller publishes itself).
    pub(super) fn observe_load(
        &mut self,
        addr: SocketAddr,
        outcome: &ProbeOutcome,
        republish: bool,
    ) {
        let min_hold = self
            .health_cfg
            .interval
            .saturating_add(self.health_cfg.timeout);
        let now = Instant::now();
        let latency_aware = self.latency_aware;
        let Some(k) = self.backends.get_mut(&addr) else {
            return;
        };
        let changed = k
            .load
            .observe(addr, outcome, &k.health, now, min_hold, latency_aware);
        if changed {
            // 0 % ends affinity for new calls only: the flags say so.
            self.flags_stale = true;
            if republish {
                self.load_throttle.request(now);
            }
        }
    }

    /// The throttled republish is due: the tables take the load factors as they are now.
    pub(super) fn load_republish_due(&mut self) {
        self.load_throttle.fired(Instant::now());
        self.republish();
    }

    /// What `backends list`, `stats` and the metrics show of a backend's load; `weight`
    /// is its weight now, `healthy` whether it takes new calls by its health and state.
    pub(super) fn load_view(&self, k: &super::Known, weight: u32, healthy: bool) -> LoadView {
        let now = Instant::now();
        let load = &k.load;
        let percent = if healthy { load.percent } else { 0 };
        LoadView {
            effective_weight: f64::from(weight) * f64::from(percent) / 100.0,
            overload: Some(load.overload.percent(now)).filter(|p| *p > 0),
            overload_expires_ms: load
                .overload
                .remaining(now)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            rtt_baseline_ms: load.latency.baseline().map(|d| d.as_secs_f64() * 1000.0),
            latency_factor: if self.latency_aware {
                f64::from(load.latency.percent()) / 100.0
            } else {
                1.0
            },
            load_reason: load.reason.clone(),
            oc_accepted: load.overload.accepted,
            oc_malformed: load.overload.malformed,
            oc_stale: load.overload.stale,
        }
    }

    /// `--latency-aware` (at start, and on reload): off puts every latency factor back
    /// to 100 % at the next probe answers.
    pub fn set_latency_aware(&mut self, on: bool) {
        self.latency_aware = on;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_republishes_are_at_least_the_interval_apart() {
        let t0 = Instant::now();
        let mut t = LoadThrottle::default();
        t.request(t0);
        assert_eq!(t.due, Some(t0), "the first one at once");
        t.request(t0 + Duration::from_millis(10));
        assert_eq!(t.due, Some(t0), "a second request joins the waiting one");
        t.fired(t0);
        let soon = t0 + Duration::from_millis(100);
        t.request(soon);
        assert_eq!(t.due, Some(t0 + LOAD_REPUBLISH_EVERY));
        t.fired(t0 + LOAD_REPUBLISH_EVERY);
        let later = t0 + Duration::from_secs(5);
        t.request(later);
        assert_eq!(t.due, Some(later));
    }

    fn answer(rtt_ms: u64, oc: &str) -> ProbeOutcome {
        ProbeOutcome::Answered {
            status: 200,
            rtt: Duration::from_millis(rtt_ms),
            retry_after: None,
            overload: sip_dispatch_common::load::parse_oc(&format!(
                "SIP/2.0/UDP 198.18.0.1:5060;branch=z9hG4bK1{oc}"
            )),
        }
    }

    #[test]
    fn overload_and_latency_multiply() {
        let addr: SocketAddr = "198.18.0.9:5060".parse().unwrap();
        let cfg = crate::health::HealthConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            down_after: 3,
            up_after: 2,
            alive: crate::health::AliveCodes::DEFAULT.parse().unwrap(),
            uri: Default::default(),
        };
        let now = Instant::now();
        let hold = Duration::from_secs(2);
        let mut health = Health::unprobed();
        let mut load = BackendLoad::default();
        let mut take = |load: &mut BackendLoad, o: ProbeOutcome, aware: bool| {
            health.record(&o, &cfg, now);
            load.observe(addr, &o, &health, now, hold, aware)
        };
        assert!(!take(&mut load, answer(1, ""), true));
        assert!(take(&mut load, answer(1, ";oc=50;oc-validity=10000"), true));
        assert_eq!(
            (load.percent, load.reason.as_str()),
            (50, "oc=50 for 10.0s")
        );
        // Malformed feedback changes nothing and is counted.
        assert!(!take(&mut load, answer(1, ";oc=150"), true));
        assert_eq!((load.percent, load.overload.malformed), (50, 1));
        // A slow answer (srtt climbs past 7 ms): latency's factor on top.
        for _ in 0..30 {
            take(&mut load, answer(60, ""), true);
        }
        assert_eq!(load.percent, 5, "50 % x 10 %: {}", load.reason);
        assert!(load.reason.contains("rtt"), "{}", load.reason);
        // Without --latency-aware only the overload counts.
        assert!(take(&mut load, answer(60, ""), false));
        assert_eq!(load.percent, 50);
        assert!(take(&mut load, answer(1, ";oc=0"), false));
        assert_eq!((load.percent, load.reason.as_str()), (100, ""));
    }
}
