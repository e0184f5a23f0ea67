//! The forms flag values take (and the config file's keys, which reuse them): addresses,
//! backends, durations, counts and the hash key, each with its bounds.
use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use sip_dispatch_common::HashKey;

/// An IPv4 or IPv6 address (no port).
pub fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("invalid address {s:?}: expected 198.18.0.1 or 2001:db8::1"))
}

/// Allowed `--call-idle` (and `call-idle`).
pub const CALL_IDLE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(86_400));
/// `--call-idle` unless given.
pub const CALL_IDLE_DEFAULT: Duration = Duration::from_secs(600);

/// A duration that may be given in minutes or hours too: `90s`, `10m`, `1.5h`, `500ms`.
/// `None` unless it is a finite number with one of those units.
fn parse_long_duration(s: &str) -> Option<Duration> {
    let (number, unit) = [("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]
        .into_iter()
        .find_map(|(u, scale)| Some((s.strip_suffix(u)?, scale)))?;
    let value: f64 = number.parse().ok().filter(|v: &f64| v.is_finite())?;
    if value < 0.0 {
        return Some(Duration::ZERO);
    }
    Some(Duration::try_from_secs_f64(value * unit).unwrap_or(Duration::MAX))
}

/// A duration of `name` in minutes or hours too, within `range` (both ends allowed);
/// `range_text` says the range in the error.
fn parse_long_duration_in(
    name: &str,
    s: &str,
    (min, max): (Duration, Duration),
    range_text: &str,
) -> Result<Duration, String> {
    match parse_long_duration(s) {
        Some(d) if d >= min && d <= max => Ok(d),
        Some(_) => Err(format!("{name} {s:?} is out of range: {range_text}")),
        None => Err(format!(
            "{name} {s:?} is not a duration: expected {range_text}, e.g. 90s, 10m or 2h"
        )),
    }
}

pub fn parse_call_idle(s: &str) -> Result<Duration, String> {
    parse_long_duration_in("call-idle", s, CALL_IDLE, "10s to 24h")
}

/// `drain --wait --timeout`: 1s to 7 days.
pub fn parse_wait_timeout(s: &str) -> Result<Duration, String> {
    parse_long_duration_in(
        "timeout",
        s,
        (Duration::from_secs(1), Duration::from_secs(7 * 86_400)),
        "1s to 168h",
    )
}

pub fn parse_affinity_entries(s: &str) -> Result<u32, String> {
    use sip_dispatch_common::{AFFINITY_ENTRIES_MAX, AFFINITY_ENTRIES_MIN};
    let n: u64 = match s.parse() {
        Ok(n) => n,
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => u64::MAX,
        Err(_) => return Err(format!("affinity-entries {s:?} is not a number")),
    };
    if !(u64::from(AFFINITY_ENTRIES_MIN)..=u64::from(AFFINITY_ENTRIES_MAX)).contains(&n) {
        return Err(format!(
            "affinity-entries {s} is out of range: must be at least {AFFINITY_ENTRIES_MIN} and at \
             most {AFFINITY_ENTRIES_MAX}"
        ));
    }
    Ok(n as u32)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub weight: u32,
    pub priority: u16,
}

impl FromStr for BackendSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let addr = parse_socket_addr(parts.next().unwrap_or_default())?;
        let mut weight = 1;
        let mut priority = 0;
        for opt in parts {
            match opt.split_once('=') {
                Some(("weight", n)) => {
                    weight = n
                        .parse::<u16>()
                        .map_err(|_| format!("invalid weight {n:?} in backend {s:?} (0 to 65535)"))?
                        .into();
                }
                Some(("priority", n)) => {
                    priority = n.parse::<u16>().map_err(|_| {
                        format!("invalid priority {n:?} in backend {s:?} (0 to 65535)")
                    })?;
                }
                _ => {
                    return Err(format!(
                        "unknown backend option {opt:?} in {s:?} (expected weight=N or priority=N)"
                    ));
                }
            }
        }
        Ok(BackendSpec {
            addr,
            weight,
            priority,
        })
    }
}

pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!("invalid address {s:?}: expected 198.18.0.21:5060 or [2001:db8::21]:5060")
    })?;
    if addr.port() == 0 {
        return Err(format!("invalid address {s:?}: port 0"));
    }
    Ok(addr)
}

/// A `decap --from` address: a unicast IPv4 or IPv6 address.
pub fn parse_decap_source(s: &str) -> Result<IpAddr, String> {
    let ip = parse_ip(s)?;
    crate::addrs::check_unicast("decap source", ip)?;
    Ok(ip)
}

/// `500ms`, `1s`, `2.5s`: a positive duration that fits a `Duration`. Never panics.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?}: expected e.g. 500ms, 1s or 2.5s");
    let (number, unit) = match s.strip_suffix("ms") {
        Some(n) => (n, 0.001),
        None => (s.strip_suffix('s').ok_or_else(err)?, 1.0),
    };
    let value: f64 = number.parse().map_err(|_| err())?;
    if !(value.is_finite() && value > 0.0) {
        return Err(err());
    }
    match Duration::try_from_secs_f64(value * unit) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(err()),
    }
}

/// Allowed `--health-interval` (and `health-interval`).
pub const HEALTH_INTERVAL: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));
/// Allowed `--health-timeout`; it may also not exceed the health interval.
pub const HEALTH_TIMEOUT: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(3600));
/// Most `--down-after` and `--up-after` (at least 1).
pub const MAX_CHECK_COUNT: u32 = 100;
/// Most `--dns-min-ttl` and `--dns-max-ttl`, in seconds: one day (at least 1 s).
pub const MAX_TTL_SECS: u64 = 86_400;

/// A duration of `name`, within `range` (both ends allowed). The error names the value
/// and the range.
pub fn parse_duration_in(
    name: &str,
    s: &str,
    (min, max): (Duration, Duration),
) -> Result<Duration, String> {
    let range = format!("{} to {}", show_duration(min), show_duration(max));
    // A number with a unit that is no duration (0, negative, too large) is out of range.
    let numeric = s
        .strip_suffix("ms")
        .or_else(|| s.strip_suffix('s'))
        .and_then(|n| n.parse::<f64>().ok())
        .is_some_and(f64::is_finite);
    match parse_duration(s) {
        Ok(d) if d >= min && d <= max => Ok(d),
        Err(_) if !numeric => Err(format!(
            "{name} {s:?} is not a duration: expected {range}, e.g. 500ms, 1s or 2.5s"
        )),
        _ => Err(format!("{name} {s:?} is out of range: {range}")),
    }
}

pub fn parse_health_interval(s: &str) -> Result<Duration, String> {
    parse_duration_in("health-interval", s, HEALTH_INTERVAL)
}

pub fn parse_health_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_in("health-timeout", s, HEALTH_TIMEOUT)
}

/// A count or a number of seconds of `name`: at least 1 and at most `max`.
pub fn check_count(name: &str, n: u64, max: u64) -> Result<u64, String> {
    if !(1..=max).contains(&n) {
        return Err(format!(
            "{name} {n} is out of range: must be at least 1 and at most {max}"
        ));
    }
    Ok(n)
}

/// `500ms`, `1s`, `3600s`: the form parse_duration reads.
pub fn show_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

pub(super) fn parse_hash_key(s: &str) -> Result<HashKey, String> {
    HashKey::from_hex(s).ok_or_else(|| format!("invalid hash key {s:?}: expected 32 hex digits"))
}
