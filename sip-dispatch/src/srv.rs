//! DNS SRV backends (RFC 2782, RFC 3263): every SRV target is a backend, resolved to its
//! A and AAAA addresses (from the additional section when the server sent them), and
//! the name is resolved again when its TTL runs out. A failed lookup keeps the last
//! known set: the table is never emptied because DNS blinked.
//!
//! Nothing in an answer is trusted: a name uses at most [`MAX_TARGETS`] SRV records and
//! [`MAX_ADDRS_PER_FAMILY`] addresses per target and family; addresses that cannot be a
//! backend (unspecified, loopback, link-local, multicast, broadcast, or this host's own)
//! are refused one by one; a target whose address lookup fails keeps its last known
//! addresses; a lone "." target means "no service here" (an empty set). The targets'
//! lookups run [`LOOKUP_CONCURRENCY`] at a time, a whole resolution within
//! [`RESOLVE_TIMEOUT`].
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::select::Candidate;

mod answers;
mod resolve;
mod watch;

pub use answers::{Lookup, Plan, SrvRecord, admit, plan, with_last_known};
pub use resolve::{NameState, Reported, resolve, resolve_with, resolver};
pub use watch::{SrvEvent, Watchers, backoff, watch};

/// At most this many SRV records of one name are used: those of the lowest priorities.
pub const MAX_TARGETS: usize = 64;
/// At most this many addresses of one family are used per target.
pub const MAX_ADDRS_PER_FAMILY: usize = 16;
/// The address lookups of one name run at most this many at a time.
pub const LOOKUP_CONCURRENCY: usize = 8;
/// One resolution of a name (its SRV records, then its targets' addresses) takes at
/// most this long; lookups still running then count as failed.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest name written out (RFC 1035: 255 octets on the wire).
pub const MAX_NAME_LEN: usize = 254;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    pub server: Option<SocketAddr>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

impl DnsConfig {
    /// How long an answer with `ttl` is used before the name is resolved again:
    /// `ttl` within [min_ttl, max_ttl] (never panics, whatever the bounds).
    pub fn wait_for(&self, ttl: Duration) -> Duration {
        ttl.max(self.min_ttl).min(self.max_ttl)
    }
}

/// One SRV record with the addresses of its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvTarget {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
    pub addrs: Vec<IpAddr>,
}

/// A successful resolution. No targets means "no service here" (a lone "." target).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvAnswer {
    pub targets: Vec<SrvTarget>,
    /// The smallest TTL of the records used, before clamping.
    pub ttl: Duration,
    /// What was logged while resolving it (a watcher taking this answer over does not
    /// log it again).
    pub reported: Reported,
}

impl SrvAnswer {
    /// The backends of one address family: each address of each target, sharing the
    /// target's weight with the other addresses of that family.
    pub fn candidates(&self, ipv6: bool) -> Vec<Candidate> {
        let mut out = Vec::new();
        for t in &self.targets {
            let addrs: Vec<&IpAddr> = t.addrs.iter().filter(|ip| ip.is_ipv6() == ipv6).collect();
            let sharing = u32::try_from(addrs.len()).unwrap_or(u32::MAX);
            for ip in &addrs {
                out.push(Candidate {
                    addr: SocketAddr::new(**ip, t.port),
                    priority: t.priority,
                    weight: u32::from(t.weight),
                    sharing,
                    healthy: true,
                    latency_percent: 100,
                    overload_percent: 0,
                });
            }
        }
        out
    }

    /// The addresses of `family` this answer has for `target` (any record naming it).
    fn addrs_of(&self, target: &str, ipv6: bool) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .targets
            .iter()
            .filter(|t| t.target.eq_ignore_ascii_case(target))
            .flat_map(|t| t.addrs.iter().copied())
            .filter(|ip| ip.is_ipv6() == ipv6)
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
pub(crate) mod test_dns;

#[cfg(test)]
mod tests;
