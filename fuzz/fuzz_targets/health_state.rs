//! The health checks on hostile input: arbitrary bytes as a backend's answer go through
//! `parse_response`, and the outcome (or one made up directly, with any timing) goes to
//! `Health::record`, for a sequence of probes at arbitrary, possibly huge, times.
//!
//! Checked: nothing panics (no overflow on Retry-After, round trips or the clock); the
//! state changes only by the rules (down after `down_after` failures in a row or at once
//! by a 503 with Retry-After, up after `up_after` successes in a row and not while held;
//! the first probe alone decides); a hold never ends more than `MAX_RETRY_AFTER` after
//! the latest `now`; the counters add up; `record` says true exactly when the state moved.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sip_dispatch_common::{
    health::{
        Admin, AliveCodes, Health, HealthConfig, HealthUri, MAX_RETRY_AFTER, ProbeOutcome, State,
    },
    sip::parse_response,
};

/// Clock offsets beyond this are cut to it: `Instant` cannot hold u64::MAX seconds.
const LONGEST_RUN: Duration = Duration::from_secs(1000 * 365 * 86_400);

const ALIVE: &[&str] = &[AliveCodes::DEFAULT, "200", "2xx,5xx,!503", "2xx,3xx,4xx,5xx,6xx"];

#[derive(Arbitrary, Debug)]
enum Answer {
    /// Bytes a backend sent, read as the prober reads them.
    Bytes { message: Vec<u8>, rtt: (u64, u32) },
    /// A final response with any status and Retry-After (the parser caps neither).
    Made {
        status: u16,
        rtt: (u64, u32),
        retry_after: Option<(u64, u32)>,
    },
    Timeout,
    Unreachable,
}

#[derive(Arbitrary, Debug)]
struct Step {
    /// How far the clock moves before this probe: forward, or back (to test that a hold
    /// never outlives its bound whatever the order of `now`s).
    advance: (u64, u32),
    back: bool,
    answer: Answer,
}

#[derive(Arbitrary, Debug)]
struct Input {
    down_after: u32,
    up_after: u32,
    alive: u8,
    unprobed: bool,
    admin: u8,
    steps: Vec<Step>,
}

fn duration((secs, nanos): (u64, u32)) -> Duration {
    // Duration::new panics when the nanoseconds carry over u64::MAX seconds.
    Duration::new(secs, 0).saturating_add(Duration::from_nanos(u64::from(nanos)))
}

fn outcome(answer: &Answer) -> ProbeOutcome {
    match answer {
        Answer::Bytes { message, rtt } => match parse_response(message) {
            // The prober skips provisional responses and waits on: a timeout, unless a
            // final response follows.
            Some(r) if r.status >= 200 => ProbeOutcome::Answered {
                status: r.status,
                rtt: duration(*rtt),
                retry_after: r.retry_after,
                overload: r.overload,
            },
            _ => ProbeOutcome::Timeout,
        },
        Answer::Made {
            status,
            rtt,
            retry_after,
        } => ProbeOutcome::Answered {
            status: *status,
            rtt: duration(*rtt),
            retry_after: retry_after.map(duration),
            overload: sip_dispatch_common::load::OcFeedback::None,
        },
        Answer::Timeout => ProbeOutcome::Timeout,
        Answer::Unreachable => ProbeOutcome::Unreachable("port unreachable".into()),
    }
}

fuzz_target!(|input: Input| {
    let cfg = HealthConfig {
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        down_after: input.down_after.max(1),
        up_after: input.up_after.max(1),
        alive: ALIVE[usize::from(input.alive) % ALIVE.len()]
            .parse()
            .expect("valid alive codes"),
        uri: HealthUri::default(),
    };
    let admin = [Admin::Enabled, Admin::Drained, Admin::Disabled][usize::from(input.admin) % 3];
    let start = Instant::now();
    let mut offset = Duration::ZERO;
    let mut latest = start;
    let mut h = if input.unprobed {
        Health::unprobed()
    } else {
        Health::new(State::Up, "start")
    };
    h.admin = admin;

    for step in input.steps.iter().take(256) {
        let advance = duration(step.advance);
        offset = if step.back {
            offset.saturating_sub(advance)
        } else {
            offset.saturating_add(advance).min(LONGEST_RUN)
        };
        let now = start + offset;
        latest = latest.max(now);
        let outcome = outcome(&step.answer);
        let alive = matches!(&outcome, ProbeOutcome::Answered { status, .. } if cfg.alive.alive(*status));
        let held_503 = matches!(
            &outcome,
            ProbeOutcome::Answered { status: 503, retry_after: Some(_), .. }
        ) && !alive;

        let before = h.clone();
        let changed = h.record(&outcome, &cfg, now);

        assert!(h.probed);
        assert_eq!(h.admin, admin, "record never touches the operator's state");
        assert_eq!(h.checks, before.checks.saturating_add(1));
        assert_eq!(
            h.check_failures,
            before.check_failures.saturating_add(u64::from(!alive))
        );
        assert!(h.check_failures <= h.checks);
        assert!(h.consecutive_failures == 0 || h.consecutive_successes == 0);
        if let Some(until) = h.held_until {
            assert!(
                until <= latest + MAX_RETRY_AFTER,
                "held {:?} past the latest now",
                until - latest
            );
        }
        match &outcome {
            ProbeOutcome::Answered { status, rtt, .. } => {
                assert_eq!((h.last_code, h.last_rtt), (Some(*status), Some(*rtt)));
            }
            _ => assert_eq!((h.last_code, h.last_rtt), (None, None)),
        }
        if h.takes_traffic() {
            assert_eq!((h.state, h.admin), (State::Up, Admin::Enabled));
        }

        if !before.probed {
            // The first probe alone decides: up if and only if it was alive.
            assert!(changed);
            assert_eq!(h.state == State::Up, alive, "first probe {outcome:?}");
            continue;
        }
        assert_eq!(changed, before.state != h.state, "record's answer");
        match (before.state, h.state) {
            (State::Up, State::Down) => {
                assert!(!alive, "down on an alive answer {outcome:?}");
                assert!(
                    held_503 || h.consecutive_failures >= cfg.down_after,
                    "down after {} failures, down_after {}",
                    h.consecutive_failures,
                    cfg.down_after
                );
            }
            (State::Down, State::Up) => {
                assert!(alive, "up on a failed check {outcome:?}");
                assert!(h.consecutive_successes >= cfg.up_after);
                assert!(
                    before.held_until.is_none_or(|t| now >= t),
                    "up while held by Retry-After"
                );
                assert_eq!(h.held_until, None);
            }
            _ => {}
        }
        if held_503 {
            assert_eq!(h.state, State::Down, "a 503 with Retry-After takes it down at once");
            assert!(h.held_until.is_some_and(|t| t <= now + MAX_RETRY_AFTER));
        }
    }
});
