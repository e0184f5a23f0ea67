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

use sip_dispatch_common::load::{Latency, OcFeedback, Overload, Taken};

use super::Controller;
use crate::{
    health::{Health, ProbeOutcome},
    protocol::LoadView,
};

/// The shortest time between two table changes that load alone causes.
pub const LOAD_REPUBLISH_EVERY: Duration = Duration::from_millis(500);

/// A backend's load, from its probe answers.
#[derive(Clone, Debug, Default)]
pub(super) struct BackendLoad {
    pub(super) overload: Overload,
    pub(super) latency: Latency,
    /// The factors last taken (see [`BackendLoad::factors`]): a change asks for a
    /// republish.
    taken: Option<(u8, u8)>,
    /// The last answer's feedback was malformed (one warning per run of them).
    malformed_run: bool,
}

impl BackendLoad {
    /// The RFC 7339 overload in force (percent of its share of new calls it sheds) and
    /// the share of its weight its latency leaves it (percent; 100 unless
    /// `latency_aware`).
    pub(super) fn factors(&self, now: Instant, latency_aware: bool) -> (u8, u8) {
        let latency = if latency_aware {
            self.latency.percent()
        } else {
            100
        };
        (self.overload.percent(now), latency)
    }

    /// Why new calls see less of it ("" when they do not).
    pub(super) fn reason(
        &self,
        now: Instant,
        latency_aware: bool,
        srtt: Option<Duration>,
    ) -> String {
        let (oc, latency) = self.factors(now, latency_aware);
        let mut reasons = Vec::new();
        if oc > 0 {
            let left = self.overload.remaining(now).unwrap_or_default();
            reasons.push(format!("oc={oc} for {:.1}s", left.as_secs_f64()));
        }
        if latency < 100 {
            reasons.push(format!(
                "rtt {:.1} ms against a baseline of {:.1} ms: {latency}% of its weight",
                ms(srtt),
                ms(self.latency.baseline())
            ));
        }
        reasons.join(", ")
    }

    /// Takes one probe outcome (after `health` took it); returns whether the factors
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
                    if let OcFeedback::Malformed(why) = overload {
                        log::warn!("backend {addr}: overload feedback ignored: {why}");
                    }
                }
                Taken::Stale => {
                    log::debug!("backend {addr}: overload feedback with an older oc-seq ignored")
                }
                Taken::Malformed => {}
                Taken::Accepted | Taken::Nothing => self.malformed_run = false,
            }
            if let Some(srtt) = health.srtt {
                self.latency.record(*rtt, srtt, now);
            }
        }
        let factors = self.factors(now, latency_aware);
        let changed = self.taken.is_some_and(|t| t != factors)
            || (self.taken.is_none() && factors != (0, 100));
        self.taken = Some(factors);
        if changed {
            match self.reason(now, latency_aware, health.srtt) {
                r if r.is_empty() => {
                    log::info!("backend {addr}: load back to normal for new calls")
                }
                r => log::info!("backend {addr}: fewer new calls ({r})"),
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
        self.request_at(now);
    }

    /// A republish is wanted at `at` (when an overload feedback runs out), or at the
    /// earliest the spacing allows after it.
    fn request_at(&mut self, at: Instant) {
        let earliest = self
            .last
            .and_then(|l| l.checked_add(LOAD_REPUBLISH_EVERY))
            .map_or(at, |e| e.max(at));
        self.due = Some(self.due.map_or(earliest, |d| d.min(earliest)));
    }

    fn fired(&mut self, now: Instant) {
        self.due = None;
        self.last = Some(now);
    }
}

impl Controller {
    /// Takes what a probe outcome says of `addr`'s load. A changed factor asks for a
    /// republish (throttled), and so does the end of the overload feedback in force
    /// (`republish` false: the caller publishes itself). Returns whether the factors
    /// changed.
    pub(super) fn observe_load(
        &mut self,
        addr: SocketAddr,
        outcome: &ProbeOutcome,
        republish: bool,
    ) -> bool {
        let min_hold = self
            .health_cfg
            .interval
            .saturating_add(self.health_cfg.timeout);
        let now = Instant::now();
        let latency_aware = self.latency_aware;
        let Some(k) = self.backends.get_mut(&addr) else {
            return false;
        };
        let changed = k
            .load
            .observe(addr, outcome, &k.health, now, min_hold, latency_aware);
        let ends = k
            .load
            .overload
            .remaining(now)
            .and_then(|d| now.checked_add(d));
        if changed {
            // At 100 % overload a backend keeps its calls but takes no new ones: the
            // flags say so.
            self.flags_stale = true;
        }
        if republish {
            if changed {
                self.load_throttle.request(now);
            }
            if let Some(at) = ends {
                self.load_throttle.request_at(at);
            }
        }
        changed
    }

    /// The throttled republish is due: the tables take the load factors as they are now.
    pub(super) fn load_republish_due(&mut self) {
        self.load_throttle.fired(Instant::now());
        self.flags_stale = true;
        self.republish();
    }

    /// The load factors of `k` now (overload %, latency %).
    pub(super) fn load_factors(&self, k: &super::Known) -> (u8, u8) {
        k.load.factors(Instant::now(), self.latency_aware)
    }

    /// What `backends list`, `stats` and the metrics show of a backend's load;
    /// `effective_weight` is what the table gives it for new calls (its selection's).
    pub(super) fn load_view(&self, k: &super::Known, effective_weight: f64) -> LoadView {
        let now = Instant::now();
        let load = &k.load;
        let (overload, latency) = load.factors(now, self.latency_aware);
        LoadView {
            effective_weight: Some(effective_weight),
            overload: Some(overload).filter(|p| *p > 0),
            overload_expires_ms: load
                .overload
                .remaining(now)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            rtt_baseline_ms: load.latency.baseline().map(|d| d.as_secs_f64() * 1000.0),
            latency_factor: f64::from(latency) / 100.0,
            load_reason: load.reason(now, self.latency_aware, k.health.srtt),
            oc_accepted: load.overload.accepted,
            oc_malformed: load.overload.malformed,
            oc_stale: load.overload.stale,
        }
    }

    /// `--latency-aware` (at start, and on reload): the tables take the change at the
    /// next republish, which it asks for.
    pub fn set_latency_aware(&mut self, on: bool) {
        if self.latency_aware != on {
            self.latency_aware = on;
            self.load_throttle.request(Instant::now());
        }
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
    fn overload_and_latency_are_read_from_the_answers() {
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
        assert_eq!(load.factors(now, true), (50, 100));
        assert_eq!(load.reason(now, true, None), "oc=50 for 10.0s");
        // Malformed feedback changes nothing and is counted.
        assert!(!take(&mut load, answer(1, ";oc=150"), true));
        assert_eq!(
            (load.factors(now, true), load.overload.malformed),
            ((50, 100), 1)
        );
        // Slow answers (srtt climbs past 7 ms): the latency factor too.
        for _ in 0..30 {
            take(&mut load, answer(60, ""), true);
        }
        assert_eq!(load.factors(now, true), (50, 10));
        assert!(
            load.reason(now, true, Some(Duration::from_millis(59)))
                .contains("rtt 59.0 ms")
        );
        // Without --latency-aware only the overload counts.
        assert!(take(&mut load, answer(60, ""), false));
        assert_eq!(load.factors(now, false), (50, 100));
        assert!(take(&mut load, answer(1, ";oc=0"), false));
        assert_eq!(load.factors(now, false), (0, 100));
        assert_eq!(load.reason(now, false, None), "");
        // The feedback runs out by itself.
        take(&mut load, answer(1, ";oc=70;oc-validity=100"), false);
        assert_eq!(load.factors(now + Duration::from_millis(1999), false).0, 70);
        assert_eq!(load.factors(now + hold, false).0, 0);
    }

    #[test]
    fn an_expiry_is_republished_when_it_comes_and_a_change_before_it() {
        let t0 = Instant::now();
        let mut t = LoadThrottle::default();
        t.request_at(t0 + Duration::from_secs(3));
        assert_eq!(t.due, Some(t0 + Duration::from_secs(3)));
        t.request(t0 + Duration::from_secs(1));
        assert_eq!(t.due, Some(t0 + Duration::from_secs(1)), "the earlier one");
        t.fired(t0 + Duration::from_secs(1));
        // An expiry right after a republish waits for the spacing.
        t.request_at(t0 + Duration::from_millis(1100));
        assert_eq!(
            t.due,
            Some(t0 + Duration::from_secs(1) + LOAD_REPUBLISH_EVERY)
        );
    }
}
