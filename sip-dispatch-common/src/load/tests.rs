use std::format;

use super::*;

const VIA: &str = "SIP/2.0/UDP 198.18.0.1:40000;branch=z9hG4bKabc;rport=40000";

fn oc(params: &str) -> OcFeedback {
    parse_oc(&format!("{VIA}{params}"))
}

fn valid(percent: u8, validity_ms: u64, seq: Option<u64>) -> OcFeedback {
    OcFeedback::Valid(Oc {
        percent,
        validity: Duration::from_millis(validity_ms),
        seq,
    })
}

#[test]
fn no_oc_value_is_no_feedback() {
    assert_eq!(parse_oc(VIA), OcFeedback::None);
    // Our own offer, echoed back by a backend without overload control.
    assert_eq!(oc(";oc;oc-algo=\"loss\""), OcFeedback::None);
    assert_eq!(oc(";oc-validity=1000"), OcFeedback::None);
}

#[test]
fn a_full_feedback_is_read() {
    assert_eq!(
        oc(";oc=50;oc-validity=30000;oc-seq=1282321615.782;oc-algo=\"loss\""),
        valid(50, 30_000, Some(1_282_321_615 * 100_000 + 78_200))
    );
    // Names are case-insensitive, blanks around "=" allowed; the default validity.
    assert_eq!(oc("; OC = 20 ;OC-ALGO=\"Loss\""), valid(20, 500, None));
    assert_eq!(oc(";oc=0"), valid(0, 500, None));
    assert_eq!(oc(";oc=100;oc-validity=0"), valid(100, 0, None));
    // A list naming loss among others; quoted commas do not end the Via value.
    assert_eq!(oc(";oc=10;oc-algo=\"rate,loss\""), valid(10, 500, None));
    // The fraction of oc-seq is decimal: 7.5 is 7.50000, after 7.40.
    assert_eq!(oc(";oc=5;oc-seq=7.5"), valid(5, 500, Some(750_000)));
    assert_eq!(oc(";oc=5;oc-seq=7.40"), valid(5, 500, Some(740_000)));
    assert_eq!(oc(";oc=5;oc-seq=7.00001"), valid(5, 500, Some(700_001)));
    // Appended next to our offer instead of giving it a value: the same feedback.
    assert_eq!(
        oc(";oc;oc-algo=\"loss\";oc=50;oc-algo=\"loss\";oc-validity=1000"),
        valid(50, 1000, None)
    );
    // Only the first Via value counts.
    assert_eq!(
        parse_oc("SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;oc=50"),
        OcFeedback::None
    );
    // A validity beyond the limit is clamped.
    assert_eq!(
        oc(";oc=30;oc-validity=99999999999"),
        OcFeedback::Valid(Oc {
            percent: 30,
            validity: MAX_OC_VALIDITY,
            seq: None
        })
    );
}

#[test]
fn malformed_values_are_refused() {
    for bad in [
        ";oc=101",
        ";oc=150",
        ";oc=5x",
        ";oc=-1",
        ";oc=",
        ";oc=0100",
        ";oc=50;oc=60",
        ";oc=50;oc-validity=1.5",
        ";oc=50;oc-validity",
        ";oc=50;oc-validity=-3",
        ";oc=50;oc-seq=12",
        ";oc=50;oc-seq=1.123456",
        ";oc=50;oc-seq=1234567890123.1",
        ";oc=50;oc-algo=\"rate\"",
        ";oc=50;oc-algo=loss",
        ";oc=50;oc-algo",
        ";oc=50;oc-validity=100;oc-validity=200",
    ] {
        assert!(
            matches!(oc(bad), OcFeedback::Malformed(_)),
            "{bad}: {:?}",
            oc(bad)
        );
    }
}

fn at(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

#[test]
fn feedback_holds_for_its_validity_or_until_the_next_answer() {
    let t0 = Instant::now();
    let hold = Duration::from_millis(1500);
    let mut o = Overload::default();
    assert_eq!(o.take(&valid(50, 5000, None), t0, hold), Taken::Accepted);
    assert_eq!(o.percent(at(t0, 4999)), 50);
    assert_eq!(o.percent(at(t0, 5000)), 0);
    // A short validity lasts until the next probe answer is due.
    assert_eq!(o.take(&valid(40, 500, None), t0, hold), Taken::Accepted);
    assert_eq!(o.percent(at(t0, 1499)), 40);
    assert_eq!(o.remaining(at(t0, 1000)), Some(Duration::from_millis(500)));
    assert_eq!(o.percent(at(t0, 1500)), 0);
    assert_eq!(o.remaining(at(t0, 1500)), None);
    // Validity 0 (and oc=0) end it at once.
    o.take(&valid(40, 60_000, None), t0, hold);
    assert_eq!(
        o.take(&valid(40, 0, None), at(t0, 10), hold),
        Taken::Accepted
    );
    assert_eq!(o.percent(at(t0, 10)), 0);
    o.take(&valid(40, 60_000, None), t0, hold);
    o.take(&valid(0, 60_000, None), t0, hold);
    assert_eq!(o.percent(t0), 0);
    assert_eq!(o.accepted, 6);
}

#[test]
fn older_sequence_numbers_and_malformed_values_change_nothing() {
    let t0 = Instant::now();
    let hold = Duration::from_millis(100);
    let mut o = Overload::default();
    o.take(&valid(50, 10_000, Some(10000002)), t0, hold);
    assert_eq!(
        o.take(&valid(90, 10_000, Some(10000001)), t0, hold),
        Taken::Stale
    );
    assert_eq!(
        o.take(&valid(90, 10_000, Some(9900009)), t0, hold),
        Taken::Stale
    );
    assert_eq!(o.percent(t0), 50);
    // The same number again is a refresh; a newer one replaces it.
    assert_eq!(
        o.take(&valid(50, 10_000, Some(10000002)), t0, hold),
        Taken::Accepted
    );
    assert_eq!(
        o.take(&valid(20, 10_000, Some(10100000)), t0, hold),
        Taken::Accepted
    );
    assert_eq!(o.percent(t0), 20);
    let junk = OcFeedback::Malformed("oc=150 is not 0 to 100".into());
    assert_eq!(o.take(&junk, t0, hold), Taken::Malformed);
    assert_eq!(o.take(&OcFeedback::None, t0, hold), Taken::Nothing);
    assert_eq!(o.percent(t0), 20);
    assert_eq!((o.accepted, o.stale, o.malformed), (3, 2, 1));
    // Once it has expired, a restarted backend's lower numbers count again.
    let later = at(t0, 20_000);
    assert_eq!(
        o.take(&valid(30, 10_000, Some(100000)), later, hold),
        Taken::Accepted
    );
    assert_eq!(o.percent(later), 30);
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn latency_against_the_baseline_with_hysteresis() {
    let t0 = Instant::now();
    let mut l = Latency::default();
    assert_eq!((l.percent(), l.baseline()), (100, None));
    l.record(ms(1), ms(1), t0);
    assert_eq!(l.baseline(), Some(ms(1)));
    // Slow line: 2 x 1 + 5 = 7 ms. Below it nothing changes.
    l.record(ms(6), ms(7), at(t0, 100));
    assert_eq!(l.percent(), 100);
    // 14 ms: 7 / 14 = 50 %.
    l.record(ms(14), ms(14), at(t0, 200));
    assert_eq!(l.percent(), 50);
    // 52 ms: 7 / 52 = 13 % -> 10 %; 500 ms: the floor.
    l.record(ms(52), ms(52), at(t0, 300));
    assert_eq!(l.percent(), 10);
    l.record(ms(500), ms(500), at(t0, 400));
    assert_eq!(l.percent(), MIN_LATENCY_PERCENT);
    // Between the recovered line (1.5 + 2 = 3.5 ms) and the slow line: it stays.
    l.record(ms(5), ms(5), at(t0, 500));
    assert_eq!(l.percent(), MIN_LATENCY_PERCENT);
    l.record(ms(1), ms(3), at(t0, 600));
    assert_eq!(l.percent(), 100);
    // And does not come back until the slow line is crossed again.
    l.record(ms(6), ms(6), at(t0, 700));
    assert_eq!(l.percent(), 100);
}

#[test]
fn the_baseline_forgets_minima_older_than_its_window() {
    let t0 = Instant::now();
    let mut l = Latency::default();
    l.record(ms(1), ms(1), t0);
    // A lasting 50 ms from a minute on: slow while the 1 ms is in the window...
    for s in 1..=4u64 {
        l.record(ms(50), ms(50), t0 + Duration::from_secs(60 * s));
        assert_eq!(l.percent(), 10, "minute {s}");
    }
    assert_eq!(l.baseline(), Some(ms(1)));
    // ...and once it is out, 50 ms is the backend's normal.
    l.record(ms(50), ms(50), t0 + BASELINE_WINDOW);
    assert_eq!(l.baseline(), Some(ms(50)));
    assert_eq!(l.percent(), 100);
}
