//! What a 503 may cost: at most one unfragmented datagram, and a rate per source and in
//! total.
use std::{collections::HashMap, net::IpAddr, time::Instant};

use anyhow::Context as _;

/// The largest 503 sent: one unfragmented datagram on an Ethernet MTU (1500 - 20 - 8)
/// for IPv4, on the IPv6 minimum MTU (1280 - 40 - 8) for IPv6; less when the
/// interface's MTU is smaller (see [`max_503_len`]).
pub const MAX_503_V4: usize = 1472;
pub const MAX_503_V6: usize = 1232;

/// The largest 503 that fits one unfragmented datagram on a link of `mtu`: the MTU
/// less the IP and UDP headers, at most the fixed cap of the family.
pub fn cap_for_mtu(mtu: u32, ipv6: bool) -> usize {
    let (headers, fixed) = if ipv6 {
        (40 + 8, MAX_503_V6)
    } else {
        (20 + 8, MAX_503_V4)
    };
    usize::try_from(mtu)
        .unwrap_or(usize::MAX)
        .saturating_sub(headers)
        .min(fixed)
}

/// The MTU of `iface`, from `/sys/class/net/<iface>/mtu`.
pub(super) fn interface_mtu(iface: &str) -> anyhow::Result<u32> {
    if iface.is_empty() || iface.contains('/') || iface == "." || iface == ".." {
        anyhow::bail!("{iface:?} is not an interface name");
    }
    let path = std::path::Path::new("/sys/class/net")
        .join(iface)
        .join("mtu");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the MTU of {iface} from {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: not an MTU: {:?}", path.display(), text.trim()))
}

/// The largest 503 for a service of this family on `iface`, read once at start:
/// [`cap_for_mtu`] of the interface's MTU, or the fixed cap when it cannot be read.
pub fn max_503_len(iface: &str, ipv6: bool) -> usize {
    match interface_mtu(iface) {
        Ok(mtu) => {
            let cap = cap_for_mtu(mtu, ipv6);
            log::info!(
                "slow path: 503s up to {cap} bytes over {} (MTU {mtu} of {iface})",
                if ipv6 { "IPv6" } else { "IPv4" }
            );
            cap
        }
        Err(e) => {
            let cap = cap_for_mtu(u32::MAX, ipv6);
            log::warn!("slow path: {e:#}; 503s up to the fixed {cap} bytes");
            cap
        }
    }
}

/// A token bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Limits the 503s: per source address and in total.
pub struct RateLimiter {
    per_source: HashMap<IpAddr, Bucket>,
    total: Bucket,
    source_rate: f64,
    source_burst: f64,
    total_rate: f64,
    total_burst: f64,
}

/// Sources tracked at once; past that, idle ones are forgotten.
const MAX_SOURCES: usize = 10_000;

impl RateLimiter {
    pub fn new(source_rate: f64, total_rate: f64) -> RateLimiter {
        let now = Instant::now();
        RateLimiter {
            per_source: HashMap::new(),
            total: Bucket {
                tokens: total_rate * 2.0,
                last: now,
            },
            source_rate,
            source_burst: source_rate * 2.0,
            total_rate,
            total_burst: total_rate * 2.0,
        }
    }

    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        if self.per_source.len() >= MAX_SOURCES && !self.per_source.contains_key(&source) {
            let (rate, burst) = (self.source_rate, self.source_burst);
            self.per_source.retain(|_, b| {
                let mut probe = *b;
                probe.take(rate, burst, now);
                probe.tokens + 1.0 < burst
            });
            if self.per_source.len() >= MAX_SOURCES {
                return false;
            }
        }
        let burst = self.source_burst;
        let bucket = self.per_source.entry(source).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        if !bucket.take(self.source_rate, burst, now) {
            return false;
        }
        self.total.take(self.total_rate, self.total_burst, now)
    }
}
