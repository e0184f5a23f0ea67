//! What an answer may hold: the SRV records a name's targets come from, and the
//! addresses a target may give as backends.
use std::{collections::BTreeSet, net::IpAddr};

use anyhow::bail;

use super::{MAX_ADDRS_PER_FAMILY, MAX_NAME_LEN, MAX_TARGETS, SrvTarget};
use crate::addrs;

/// One SRV record as it came from the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvRecord {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

/// What a name's SRV records ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// RFC 2782: a lone "." target means the service is decidedly not available here.
    NoService,
    /// The targets to resolve (without addresses yet), how many records were left out
    /// by [`MAX_TARGETS`], and the targets (lowercase) of records left out for port 0.
    Targets(Vec<SrvTarget>, usize, BTreeSet<String>),
}

/// The targets of a name's SRV records: "." records, records with port 0 (no backend
/// listens there; flags, the file and `backends add` refuse it too) and names too long
/// left out (a lone "." means no service), sorted by priority, at most [`MAX_TARGETS`].
pub fn plan(name: &str, records: Vec<SrvRecord>) -> anyhow::Result<Plan> {
    if records.is_empty() {
        bail!("SRV lookup of {name}: no records");
    }
    let all = records.len();
    if all == 1 && records[0].target == "." {
        return Ok(Plan::NoService);
    }
    let mut port_zero = BTreeSet::new();
    let mut targets: Vec<SrvTarget> = records
        .into_iter()
        .filter(|r| r.target != ".")
        .filter(|r| {
            if r.port == 0 {
                port_zero.insert(r.target.to_ascii_lowercase());
            }
            r.port != 0
        })
        .filter(|r| {
            let ok = r.target.len() <= MAX_NAME_LEN;
            if !ok {
                log::warn!(
                    "dns {name}: a target name of {} characters is longer than {MAX_NAME_LEN}: left out",
                    r.target.len()
                );
            }
            ok
        })
        .map(|r| SrvTarget {
            priority: r.priority,
            weight: r.weight,
            port: r.port,
            target: r.target,
            addrs: Vec::new(),
        })
        .collect();
    if targets.is_empty() {
        if port_zero.is_empty() {
            bail!("SRV lookup of {name}: no usable target in {all} records");
        }
        bail!(
            "SRV lookup of {name}: no usable target in {all} records (port 0 for {})",
            port_zero.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    targets.sort_by(|a, b| (a.priority, &a.target, a.port).cmp(&(b.priority, &b.target, b.port)));
    let capped = targets.len().saturating_sub(MAX_TARGETS);
    targets.truncate(MAX_TARGETS);
    Ok(Plan::Targets(targets, capped, port_zero))
}

/// The outcome of looking up one family of one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Found(Vec<IpAddr>),
    Failed(String),
}

/// The addresses a target's family gets: the ones found, or when the lookup failed,
/// the last known ones (the bool says they are kept from before).
pub fn with_last_known(lookup: &Lookup, last_known: &[IpAddr]) -> (Vec<IpAddr>, bool) {
    match lookup {
        Lookup::Found(found) => (found.clone(), false),
        Lookup::Failed(_) => (last_known.to_vec(), !last_known.is_empty()),
    }
}

/// Splits `addrs` into those that may be backends (at most [`MAX_ADDRS_PER_FAMILY`] of
/// each family, sorted) and the refused ones with why.
pub fn admit(addrs: &[IpAddr], local: &[IpAddr]) -> (Vec<IpAddr>, Vec<(IpAddr, String)>) {
    let mut sorted = addrs.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut kept: Vec<IpAddr> = Vec::new();
    let mut refused = Vec::new();
    for ip in sorted {
        match addrs::check_backend(ip, local) {
            Ok(()) => {
                let same_family = kept.iter().filter(|k| k.is_ipv6() == ip.is_ipv6()).count();
                if same_family < MAX_ADDRS_PER_FAMILY {
                    kept.push(ip);
                } else {
                    refused.push((
                        ip,
                        format!("backend {ip} is over the cap of {MAX_ADDRS_PER_FAMILY} addresses per target and family"),
                    ));
                }
            }
            Err(why) => refused.push((ip, why)),
        }
    }
    (kept, refused)
}
