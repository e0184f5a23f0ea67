//! The resolver and one resolution of a name: its SRV records, then its targets'
//! addresses, at most [`LOOKUP_CONCURRENCY`] at a time within [`RESOLVE_TIMEOUT`].
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, RecordType},
};
use tokio::{sync::Semaphore, task::JoinSet};

use super::{
    DnsConfig, LOOKUP_CONCURRENCY, MAX_NAME_LEN, MAX_TARGETS, RESOLVE_TIMEOUT, SrvAnswer,
    answers::{Lookup, Plan, SrvRecord, admit, plan, with_last_known},
};
use crate::addrs;

pub fn resolver(cfg: &DnsConfig) -> anyhow::Result<TokioResolver> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = match cfg.server {
        Some(server) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            let ns = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![ns]),
                provider,
            )
        }
        None => {
            TokioResolver::builder(provider).context("reading the system resolver configuration")?
        }
    };
    let opts = builder.options_mut();
    // We schedule re-resolution by TTL ourselves: a cache would only hide changes.
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    Ok(builder.build()?)
}

fn family_name(ipv6: bool) -> &'static str {
    if ipv6 { "AAAA" } else { "A" }
}

/// What was logged about a name's answers, so that each episode is logged once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    /// Target (lowercase) and family (true: IPv6) kept on their last known addresses.
    pub(super) stale: BTreeSet<(String, bool)>,
    /// Targets without any address.
    pub(super) unresolved: BTreeSet<String>,
    /// Target (lowercase) and address refused.
    pub(super) refused: BTreeSet<(String, IpAddr)>,
    /// Targets (lowercase) of records left out for port 0.
    pub(super) port_zero: BTreeSet<String>,
    pub(super) no_service: bool,
    pub(super) capped: bool,
}

/// What a watcher remembers about its name between resolutions: the last good answer
/// (for the last known addresses) and what it already logged.
#[derive(Debug, Default)]
pub struct NameState {
    pub(super) last: Option<SrvAnswer>,
    pub(super) reported: Reported,
}

impl NameState {
    /// Goes on from `last` (e.g. the start-up answer): what was logged with it is not
    /// logged again.
    pub fn new(last: Option<SrvAnswer>) -> NameState {
        let reported = last
            .as_ref()
            .map(|a| a.reported.clone())
            .unwrap_or_default();
        NameState { last, reported }
    }
}

/// Resolves `name` to its SRV targets and their addresses (a first resolution: no last
/// known addresses).
pub async fn resolve(resolver: &TokioResolver, name: &str) -> anyhow::Result<SrvAnswer> {
    resolve_with(resolver, name, &mut NameState::default()).await
}

/// Looks up the addresses of one family of `target`; the smallest TTL with them.
async fn lookup_family(resolver: TokioResolver, target: String, ipv6: bool) -> (Lookup, u32) {
    let rtype = if ipv6 {
        RecordType::AAAA
    } else {
        RecordType::A
    };
    match resolver.lookup(target.as_str(), rtype).await {
        Ok(lookup) => {
            let mut ttl = u32::MAX;
            let mut found = Vec::new();
            for r in lookup.answers() {
                let ip = match &r.data {
                    RData::A(a) if !ipv6 => IpAddr::V4(a.0),
                    RData::AAAA(a) if ipv6 => IpAddr::V6(a.0),
                    _ => continue,
                };
                ttl = ttl.min(r.ttl);
                found.push(ip);
            }
            if found.is_empty() {
                (
                    Lookup::Failed(format!("no {} records", family_name(ipv6))),
                    u32::MAX,
                )
            } else {
                (Lookup::Found(found), ttl)
            }
        }
        Err(e) => (Lookup::Failed(e.to_string()), u32::MAX),
    }
}

/// Resolves `name` with what `state` remembers: targets whose address lookup fails keep
/// their addresses from `state`'s last answer; `state` takes the new answer.
pub async fn resolve_with(
    resolver: &TokioResolver,
    name: &str,
    state: &mut NameState,
) -> anyhow::Result<SrvAnswer> {
    resolve_within(resolver, name, state, RESOLVE_TIMEOUT).await
}

/// [`resolve_with`] within `limit`.
pub(super) async fn resolve_within(
    resolver: &TokioResolver,
    name: &str,
    state: &mut NameState,
    limit: Duration,
) -> anyhow::Result<SrvAnswer> {
    if name.len() > MAX_NAME_LEN {
        bail!(
            "SRV name of {} characters is longer than {MAX_NAME_LEN}",
            name.len()
        );
    }
    let deadline = tokio::time::Instant::now() + limit;
    let lookup = tokio::time::timeout_at(deadline, resolver.lookup(name, RecordType::SRV))
        .await
        .map_err(|_| anyhow!("SRV lookup of {name}: no answer within {limit:?}"))?
        .with_context(|| format!("SRV lookup of {name}"))?;
    let mut ttl = u32::MAX;
    let mut records = Vec::new();
    for record in lookup.answers() {
        if let RData::SRV(srv) = &record.data {
            ttl = ttl.min(record.ttl);
            records.push(SrvRecord {
                priority: srv.priority,
                weight: srv.weight,
                port: srv.port,
                target: srv.target.to_ascii(),
            });
        }
    }
    let mut targets = match plan(name, records)? {
        Plan::NoService => {
            if !state.reported.no_service {
                log::warn!(
                    "dns {name}: its only target is \".\": no service here (RFC 2782); \
                     the name has no backends now"
                );
            }
            state.reported = Reported {
                no_service: true,
                ..Reported::default()
            };
            let answer = SrvAnswer {
                targets: Vec::new(),
                ttl: Duration::from_secs(u64::from(ttl)),
                reported: state.reported.clone(),
            };
            state.last = Some(answer.clone());
            return Ok(answer);
        }
        Plan::Targets(targets, capped, port_zero) => {
            if capped > 0 && !state.reported.capped {
                log::warn!(
                    "dns {name}: {} SRV records; only the {MAX_TARGETS} of lowest priority are used",
                    capped.saturating_add(MAX_TARGETS)
                );
            }
            state.reported.capped = capped > 0;
            for target in port_zero.difference(&state.reported.port_zero) {
                log::warn!("dns {name}: target {target} has port 0: left out");
            }
            state.reported.port_zero = port_zero;
            targets
        }
    };
    if state.reported.no_service {
        log::info!("dns {name}: has targets again");
    }

    // Addresses from the additional section, then lookups for the families it lacks.
    let mut lookups: BTreeMap<(String, bool), Lookup> = BTreeMap::new();
    let wanted: BTreeSet<String> = targets
        .iter()
        .map(|t| t.target.to_ascii_lowercase())
        .collect();
    for record in lookup.additionals() {
        let owner = record.name.to_ascii().to_ascii_lowercase();
        if !wanted.contains(&owner) {
            continue;
        }
        let (ip, v6) = match &record.data {
            RData::A(a) => (IpAddr::V4(a.0), false),
            RData::AAAA(a) => (IpAddr::V6(a.0), true),
            _ => continue,
        };
        ttl = ttl.min(record.ttl);
        match lookups
            .entry((owner, v6))
            .or_insert_with(|| Lookup::Found(Vec::new()))
        {
            Lookup::Found(v) => v.push(ip),
            Lookup::Failed(_) => {}
        }
    }
    let permits = Arc::new(Semaphore::new(LOOKUP_CONCURRENCY));
    let mut jobs = JoinSet::new();
    for target in &wanted {
        for v6 in [false, true] {
            if lookups.contains_key(&(target.clone(), v6)) {
                continue;
            }
            let (resolver, target, permits) = (resolver.clone(), target.clone(), permits.clone());
            jobs.spawn(async move {
                // The semaphore is never closed: a permit always comes.
                let _permit = permits.acquire_owned().await;
                let (found, ttl) = lookup_family(resolver, target.clone(), v6).await;
                (target, v6, found, ttl)
            });
        }
    }
    loop {
        match tokio::time::timeout_at(deadline, jobs.join_next()).await {
            Ok(Some(Ok((target, v6, found, found_ttl)))) => {
                ttl = ttl.min(found_ttl);
                lookups.insert((target, v6), found);
            }
            // A lookup task that did not finish counts as a failed lookup (below).
            Ok(Some(Err(_))) => {}
            Ok(None) => break,
            Err(_) => {
                jobs.abort_all();
                break;
            }
        }
    }

    let local = addrs::local_addresses().unwrap_or_else(|e| {
        log::warn!("dns {name}: cannot read this host's addresses ({e}); only the address classes are checked");
        Vec::new()
    });
    let mut stale = BTreeSet::new();
    let mut unresolved = BTreeSet::new();
    let mut refused = BTreeSet::new();
    let mut resolved_per_target: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for target in &wanted {
        let mut addrs_found = Vec::new();
        let mut errors = Vec::new();
        for v6 in [false, true] {
            let lookup = lookups
                .remove(&(target.clone(), v6))
                .unwrap_or_else(|| Lookup::Failed(format!("no answer within {limit:?}")));
            let last_known = state
                .last
                .as_ref()
                .map(|a| a.addrs_of(target, v6))
                .unwrap_or_default();
            let (addrs, kept) = with_last_known(&lookup, &last_known);
            let error = match &lookup {
                Lookup::Failed(e) => e.as_str(),
                Lookup::Found(_) => "",
            };
            if !error.is_empty() {
                errors.push(format!("{}: {error}", family_name(v6)));
            }
            let key = (target.clone(), v6);
            if kept {
                if !state.reported.stale.contains(&key) {
                    let list: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
                    log::warn!(
                        "dns {name}: target {target} {} lookup failed: {} (keeping its last known address(es) {})",
                        family_name(v6),
                        error,
                        list.join(",")
                    );
                }
                stale.insert(key);
            } else if state.reported.stale.contains(&key) {
                log::info!(
                    "dns {name}: target {target} {} lookup answers again",
                    family_name(v6)
                );
            }
            addrs_found.extend(addrs);
        }
        let (kept, refusals) = admit(&addrs_found, &local);
        for (ip, why) in refusals {
            if !state.reported.refused.contains(&(target.clone(), ip)) {
                log::warn!("dns {name}: target {target} address {ip} refused: {why}");
            }
            refused.insert((target.clone(), ip));
        }
        if addrs_found.is_empty() {
            if !state.reported.unresolved.contains(target) {
                log::warn!(
                    "dns {name}: target {target} has no address: {}",
                    errors.join("; ")
                );
            }
            unresolved.insert(target.clone());
        }
        resolved_per_target.insert(target.clone(), kept);
    }
    for t in &mut targets {
        if let Some(a) = resolved_per_target.get(&t.target.to_ascii_lowercase()) {
            t.addrs = a.clone();
        }
    }
    targets.retain(|t| !t.addrs.is_empty());
    state.reported.stale = stale;
    state.reported.unresolved = unresolved;
    state.reported.refused = refused;
    state.reported.no_service = false;
    if targets.is_empty() {
        bail!("SRV lookup of {name}: no target has a usable address");
    }
    let answer = SrvAnswer {
        targets,
        ttl: Duration::from_secs(u64::from(ttl)),
        reported: state.reported.clone(),
    };
    state.last = Some(answer.clone());
    Ok(answer)
}
