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
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
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
use tokio::{
    sync::{Notify, Semaphore, mpsc},
    task::{JoinHandle, JoinSet},
};

use crate::{addrs, select::Candidate};

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

fn family_name(ipv6: bool) -> &'static str {
    if ipv6 { "AAAA" } else { "A" }
}

/// What was logged about a name's answers, so that each episode is logged once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    /// Target (lowercase) and family (true: IPv6) kept on their last known addresses.
    stale: BTreeSet<(String, bool)>,
    /// Targets without any address.
    unresolved: BTreeSet<String>,
    /// Target (lowercase) and address refused.
    refused: BTreeSet<(String, IpAddr)>,
    /// Targets (lowercase) of records left out for port 0.
    port_zero: BTreeSet<String>,
    no_service: bool,
    capped: bool,
}

/// What a watcher remembers about its name between resolutions: the last good answer
/// (for the last known addresses) and what it already logged.
#[derive(Debug, Default)]
pub struct NameState {
    last: Option<SrvAnswer>,
    reported: Reported,
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
async fn resolve_within(
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

/// What the SRV task reports to the controller.
#[derive(Debug)]
pub enum SrvEvent {
    Resolved {
        name: String,
        answer: SrvAnswer,
    },
    /// The first failure of an episode (later ones are only counted).
    Failed {
        name: String,
        error: String,
    },
    /// Another failure of the same episode.
    StillFailing {
        name: String,
    },
}

/// The next delay after a failure: 1 s, doubling, at most `max`.
pub fn backoff(previous: Option<Duration>, max: Duration) -> Duration {
    match previous {
        None => Duration::from_secs(1).min(max),
        Some(d) => d.saturating_mul(2).min(max),
    }
}

/// Resolves `name` now and then whenever its TTL (clamped) runs out, or `reload` is
/// notified, until the receiver is gone. `first` is the answer already in hand at start-up, if any.
pub async fn watch(
    resolver: TokioResolver,
    name: String,
    cfg: DnsConfig,
    first: Option<SrvAnswer>,
    tx: mpsc::Sender<SrvEvent>,
    reload: Arc<Notify>,
) {
    let mut wait = match &first {
        Some(a) => cfg.wait_for(a.ttl),
        None => Duration::ZERO,
    };
    let mut failing: Option<Duration> = if first.is_none() {
        Some(Duration::ZERO)
    } else {
        None
    };
    let mut state = NameState::new(first);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = reload.notified() => {}
        }
        let event = match resolve_with(&resolver, &name, &mut state).await {
            Ok(answer) => {
                wait = cfg.wait_for(answer.ttl);
                failing = None;
                SrvEvent::Resolved {
                    name: name.clone(),
                    answer,
                }
            }
            Err(e) => {
                let first_failure = failing.is_none();
                let next = backoff(failing.filter(|d| !d.is_zero()), cfg.max_ttl);
                failing = Some(next);
                wait = next;
                if first_failure {
                    SrvEvent::Failed {
                        name: name.clone(),
                        error: format!("{e:#}"),
                    }
                } else {
                    SrvEvent::StillFailing { name: name.clone() }
                }
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// One [`watch`] task per SRV name, all answering on one channel.
pub struct Watchers {
    cfg: DnsConfig,
    resolver: Option<TokioResolver>,
    tasks: BTreeMap<String, JoinHandle<()>>,
    tx: mpsc::Sender<SrvEvent>,
    /// Where the answers arrive.
    pub rx: mpsc::Receiver<SrvEvent>,
    wake: Arc<Notify>,
}

impl Watchers {
    /// `resolver` may be given when one was built already (for the start-up lookups).
    pub fn new(cfg: DnsConfig, resolver: Option<TokioResolver>) -> Watchers {
        let (tx, rx) = mpsc::channel(64);
        Watchers {
            cfg,
            resolver,
            tasks: BTreeMap::new(),
            tx,
            rx,
            wake: Arc::default(),
        }
    }

    /// Watches exactly `names`: watchers of names no longer wanted stop, new names get
    /// one (resolving at once unless `first` holds an answer already in hand).
    pub fn sync(
        &mut self,
        names: &BTreeSet<String>,
        first: &BTreeMap<String, SrvAnswer>,
    ) -> anyhow::Result<()> {
        self.tasks.retain(|name, task| {
            let keep = names.contains(name);
            if !keep {
                task.abort();
            }
            keep
        });
        if names.is_empty() {
            return Ok(());
        }
        let resolver = self.resolver()?;
        for name in names {
            if !self.tasks.contains_key(name) {
                let task = watch(
                    resolver.clone(),
                    name.clone(),
                    self.cfg,
                    first.get(name).cloned(),
                    self.tx.clone(),
                    self.wake.clone(),
                );
                self.tasks.insert(name.clone(), tokio::spawn(task));
            }
        }
        Ok(())
    }

    /// The resolver, built on first use.
    pub fn resolver(&mut self) -> anyhow::Result<TokioResolver> {
        Ok(match &self.resolver {
            Some(r) => r.clone(),
            None => self.resolver.insert(resolver(&self.cfg)?).clone(),
        })
    }

    /// Takes a new DNS configuration: a new resolver, and every watcher stopped (the
    /// next [`Watchers::sync`] starts them again). Nothing changes when it fails.
    pub fn reconfigure(&mut self, cfg: DnsConfig) -> anyhow::Result<bool> {
        if cfg == self.cfg {
            return Ok(false);
        }
        let resolver = resolver(&cfg)?;
        self.stop();
        self.cfg = cfg;
        self.resolver = Some(resolver);
        Ok(true)
    }

    /// Every waiting watcher resolves its name now.
    pub fn resolve_now(&self) {
        self.wake.notify_waiters();
    }

    pub fn stop(&mut self) {
        for (_, task) in std::mem::take(&mut self.tasks) {
            task.abort();
        }
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A DNS responder on 127.0.0.1 for the unit tests of DNS resolution (here and in
/// `run.rs`): any SRV query gets `targets` records `t0.test.`, `t1.test.`, ... (no
/// additional section; the first `port_zero` of them with port 0, the others 5060), an A
/// query for `tN.test.` gets 198.18.1.(N+1), an AAAA query no record. SRV answers wait
/// `srv_delay`, address answers `addr_delay` (never, for `None`); it counts the most
/// delayed answers it held at once.
#[cfg(test)]
pub(crate) mod test_dns {
    use std::{
        net::SocketAddr,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use hickory_resolver::{
        TokioResolver,
        proto::{
            op::{Message, OpCode},
            rr::{Name, RData, Record, RecordType, rdata},
        },
    };
    use tokio::task::JoinHandle;

    use super::{DnsConfig, resolver};

    pub(crate) struct Answers {
        pub targets: u8,
        pub port_zero: u8,
        pub srv_delay: Duration,
        pub addr_delay: Option<Duration>,
    }

    impl Default for Answers {
        fn default() -> Answers {
            Answers {
                targets: 1,
                port_zero: 0,
                srv_delay: Duration::ZERO,
                addr_delay: Some(Duration::ZERO),
            }
        }
    }

    pub(crate) struct SlowDns {
        pub addr: SocketAddr,
        pub max_in_flight: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    fn reply_to(query: &Message, answers: &Answers) -> Option<(Message, Option<Duration>)> {
        let q = query.queries.first()?.clone();
        let mut reply = Message::response(query.metadata.id, OpCode::Query);
        reply.metadata.authoritative = true;
        reply.add_query(q.clone());
        let delay = match q.query_type() {
            RecordType::SRV => {
                for i in 0..answers.targets {
                    let target = Name::from_ascii(format!("t{i}.test.")).ok()?;
                    let port = if i < answers.port_zero { 0 } else { 5060 };
                    let srv = RData::SRV(rdata::SRV::new(10, 1, port, target));
                    reply.add_answer(Record::from_rdata(q.name().clone(), 60, srv));
                }
                Some(answers.srv_delay)
            }
            RecordType::A => {
                let i: u8 = q
                    .name()
                    .to_ascii()
                    .get(1..)?
                    .split('.')
                    .next()?
                    .parse()
                    .ok()?;
                let a = RData::A(rdata::A::new(198, 18, 1, i.checked_add(1)?));
                reply.add_answer(Record::from_rdata(q.name().clone(), 60, a));
                answers.addr_delay
            }
            _ => answers.addr_delay,
        };
        Some((reply, delay))
    }

    impl SlowDns {
        pub(crate) async fn start(answers: Answers) -> SlowDns {
            let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
            let addr = sock.local_addr().unwrap();
            let max_in_flight = Arc::new(AtomicUsize::new(0));
            let in_flight = Arc::new(AtomicUsize::new(0));
            let max = max_in_flight.clone();
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                    let Ok(query) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    let Some((reply, Some(delay))) = reply_to(&query, &answers) else {
                        continue;
                    };
                    let (sock, in_flight, max) = (sock.clone(), in_flight.clone(), max.clone());
                    tokio::spawn(async move {
                        if !delay.is_zero() {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            max.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                        }
                        let _ = sock.send_to(&reply.to_vec().unwrap(), from).await;
                    });
                }
            });
            SlowDns {
                addr,
                max_in_flight,
                task,
            }
        }

        pub(crate) fn resolver(&self) -> TokioResolver {
            resolver(&DnsConfig {
                server: Some(self.addr),
                min_ttl: Duration::from_secs(1),
                max_ttl: Duration::from_secs(60),
            })
            .unwrap()
        }
    }

    impl Drop for SlowDns {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_dns::{Answers, SlowDns};
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let max = Duration::from_secs(10);
        let mut d = None;
        let mut seen = Vec::new();
        for _ in 0..6 {
            let next = backoff(d, max);
            seen.push(next.as_secs());
            d = Some(next);
        }
        assert_eq!(seen, [1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn every_address_of_a_target_is_a_backend_sharing_its_weight() {
        let answer = SrvAnswer {
            targets: vec![
                SrvTarget {
                    priority: 10,
                    weight: 60,
                    port: 5060,
                    target: "a.example.net.".into(),
                    addrs: vec!["198.18.0.21".parse().unwrap()],
                },
                SrvTarget {
                    priority: 10,
                    weight: 20,
                    port: 5062,
                    target: "b.example.net.".into(),
                    addrs: vec![
                        "198.18.0.22".parse().unwrap(),
                        "2001:db8::22".parse().unwrap(),
                    ],
                },
            ],
            ttl: Duration::from_secs(30),
            reported: Reported::default(),
        };
        // Only addresses of the VIP's family take part, and share the weight among
        // themselves.
        let v4 = answer.candidates(false);
        assert_eq!(v4.len(), 2);
        assert_eq!(v4[0].addr, "198.18.0.21:5060".parse().unwrap());
        assert_eq!((v4[0].weight, v4[0].sharing), (60, 1));
        assert_eq!(v4[1].addr, "198.18.0.22:5062".parse().unwrap());
        assert_eq!((v4[1].weight, v4[1].sharing, v4[1].priority), (20, 1, 10));
        let v6 = answer.candidates(true);
        assert_eq!(v6.len(), 1);
        assert_eq!(v6[0].addr, "[2001:db8::22]:5062".parse().unwrap());
        assert_eq!((v6[0].weight, v6[0].sharing), (20, 1));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rec(priority: u16, target: &str) -> SrvRecord {
        SrvRecord {
            priority,
            weight: 10,
            port: 5060,
            target: target.into(),
        }
    }

    #[test]
    fn a_lone_dot_target_means_no_service() {
        assert_eq!(
            plan("_sip._udp.x.", vec![rec(0, ".")]).unwrap(),
            Plan::NoService
        );
        // "." among real targets is left out; several "." records are not a usable set.
        match plan("_sip._udp.x.", vec![rec(0, "."), rec(10, "b1.x.")]).unwrap() {
            Plan::Targets(t, 0, _) => assert_eq!(t.len(), 1),
            other => panic!("{other:?}"),
        }
        let e = plan("_sip._udp.x.", vec![rec(0, "."), rec(0, ".")]).unwrap_err();
        assert!(format!("{e}").contains("no usable target"), "{e}");
        let e = plan("_sip._udp.x.", vec![]).unwrap_err();
        assert!(format!("{e}").contains("no records"), "{e}");
    }

    #[test]
    fn records_with_port_0_are_left_out() {
        let mut zero = rec(10, "B0.x.");
        zero.port = 0;
        match plan("n", vec![zero.clone(), rec(10, "b1.x.")]).unwrap() {
            Plan::Targets(t, 0, port_zero) => {
                assert_eq!(t.len(), 1);
                assert_eq!((t[0].target.as_str(), t[0].port), ("b1.x.", 5060));
                assert_eq!(port_zero, BTreeSet::from(["b0.x.".to_string()]));
            }
            other => panic!("{other:?}"),
        }
        // Only port-0 records: an error naming them, not "no service" and no backend.
        let e = plan("n", vec![zero.clone()]).unwrap_err().to_string();
        assert!(e.contains("port 0 for b0.x."), "{e}");
        // A lone "." (RFC 2782 writes it with port 0) still means no service.
        let mut dot = rec(0, ".");
        dot.port = 0;
        assert_eq!(plan("n", vec![dot]).unwrap(), Plan::NoService);
    }

    #[tokio::test]
    async fn a_port_0_target_is_no_backend_and_is_reported_once() {
        let dns = SlowDns::start(Answers {
            targets: 3,
            port_zero: 1,
            ..Answers::default()
        })
        .await;
        let resolver = dns.resolver();
        let mut state = NameState::default();
        for _ in 0..2 {
            let answer = resolve_with(&resolver, "_sip._udp.test.", &mut state)
                .await
                .unwrap();
            let targets: Vec<&str> = answer.targets.iter().map(|t| t.target.as_str()).collect();
            assert_eq!(targets, ["t1.test.", "t2.test."]);
            assert!(
                answer
                    .candidates(false)
                    .iter()
                    .all(|c| c.addr.port() == 5060)
            );
            // Remembered, so the next resolution does not log it again.
            assert_eq!(
                state.reported.port_zero,
                BTreeSet::from(["t0.test.".to_string()])
            );
        }
    }

    #[test]
    fn targets_are_capped_keeping_the_lowest_priorities() {
        let mut records: Vec<SrvRecord> = (0..100u16)
            .map(|i| rec(100 - i, &format!("t{i}.x.")))
            .collect();
        records.push(rec(1, &format!("{}.x.", "a".repeat(300))));
        match plan("n", records).unwrap() {
            Plan::Targets(t, capped, _) => {
                assert_eq!(t.len(), MAX_TARGETS);
                assert_eq!(capped, 100 - MAX_TARGETS);
                // Priorities 1..=64 kept, in order; the over-long name is gone.
                assert_eq!(t[0].priority, 1);
                assert_eq!(t[0].target, "t99.x.");
                assert_eq!(t[MAX_TARGETS - 1].priority, MAX_TARGETS as u16);
                assert!(t.iter().all(|t| t.target.len() <= MAX_NAME_LEN));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn special_and_local_addresses_are_refused_one_by_one() {
        let local = [ip("198.18.0.2"), ip("198.18.0.100")];
        let (kept, refused) = admit(
            &[
                ip("198.18.0.21"),
                ip("127.0.0.1"),
                ip("224.0.0.1"),
                ip("0.0.0.0"),
                ip("169.254.0.9"),
                ip("255.255.255.255"),
                ip("198.18.0.2"),
                ip("fe80::1"),
                ip("2001:db8::21"),
                ip("198.18.0.21"),
            ],
            &local,
        );
        assert_eq!(kept, [ip("198.18.0.21"), ip("2001:db8::21")]);
        let refused: Vec<IpAddr> = refused.into_iter().map(|(a, _)| a).collect();
        assert_eq!(refused.len(), 7, "{refused:?}");
        for bad in [
            "127.0.0.1",
            "224.0.0.1",
            "198.18.0.2",
            "fe80::1",
            "255.255.255.255",
        ] {
            assert!(refused.contains(&ip(bad)), "{bad}");
        }
    }

    #[test]
    fn addresses_per_target_and_family_are_capped() {
        let many: Vec<IpAddr> = (1..=40u8)
            .map(|i| IpAddr::from([198, 18, 1, i]))
            .chain([ip("2001:db8::21")])
            .collect();
        let (kept, refused) = admit(&many, &[]);
        assert_eq!(
            kept.iter().filter(|a| a.is_ipv4()).count(),
            MAX_ADDRS_PER_FAMILY
        );
        assert!(kept.contains(&ip("2001:db8::21")));
        assert_eq!(refused.len(), 40 - MAX_ADDRS_PER_FAMILY);
        assert!(refused[0].1.contains("cap"), "{:?}", refused[0]);
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_known_addresses() {
        let last = SrvAnswer {
            targets: vec![
                SrvTarget {
                    priority: 10,
                    weight: 50,
                    port: 5060,
                    target: "B2.example.net.".into(),
                    addrs: vec![ip("198.18.0.22"), ip("2001:db8::22")],
                },
                SrvTarget {
                    priority: 20,
                    weight: 0,
                    port: 5070,
                    target: "b2.example.net.".into(),
                    addrs: vec![ip("198.18.0.22")],
                },
            ],
            ttl: Duration::from_secs(2),
            reported: Reported::default(),
        };
        let v4 = last.addrs_of("b2.example.net.", false);
        assert_eq!(v4, [ip("198.18.0.22")]);
        assert_eq!(last.addrs_of("b2.example.net.", true), [ip("2001:db8::22")]);
        assert!(last.addrs_of("b3.example.net.", false).is_empty());
        let failed = Lookup::Failed("NXDOMAIN".into());
        assert_eq!(with_last_known(&failed, &v4), (v4.clone(), true));
        assert_eq!(with_last_known(&failed, &[]), (vec![], false));
        let found = Lookup::Found(vec![ip("198.18.0.23")]);
        assert_eq!(
            with_last_known(&found, &v4),
            (vec![ip("198.18.0.23")], false)
        );
    }

    #[test]
    fn ttl_bounds_never_panic() {
        let cfg = DnsConfig {
            server: None,
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
        };
        assert_eq!(
            cfg.wait_for(Duration::from_secs(u64::from(u32::MAX))),
            Duration::from_secs(300)
        );
        assert_eq!(cfg.wait_for(Duration::ZERO), Duration::from_secs(5));
        // Inverted bounds (a bad configuration) give the maximum, not a panic.
        let inverted = DnsConfig {
            min_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(5),
            ..cfg
        };
        assert_eq!(
            inverted.wait_for(Duration::from_secs(60)),
            Duration::from_secs(5)
        );
        assert_eq!(backoff(Some(Duration::MAX), Duration::MAX), Duration::MAX);
    }

    #[tokio::test]
    async fn address_lookups_run_concurrently_within_the_bound() {
        let dns = SlowDns::start(Answers {
            targets: 20,
            addr_delay: Some(Duration::from_millis(200)),
            ..Answers::default()
        })
        .await;
        let started = std::time::Instant::now();
        let answer = resolve(&dns.resolver(), "_sip._udp.test.").await.unwrap();
        let took = started.elapsed();
        let most = dns.max_in_flight.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(answer.targets.len(), 20);
        assert!(
            answer
                .targets
                .iter()
                .all(|t| t.addrs.len() == 1 && t.addrs[0].is_ipv4())
        );
        // 40 lookups (A and AAAA of 20 targets) of 200 ms each: one by one 8 s, eight at
        // a time about 1 s.
        assert!(
            (LOOKUP_CONCURRENCY / 2..=LOOKUP_CONCURRENCY).contains(&most),
            "{most} at once"
        );
        assert!(took < Duration::from_secs(4), "took {took:?}");
        eprintln!("20 targets resolved in {took:?}, at most {most} lookups at once");
    }

    #[tokio::test]
    async fn a_resolution_ends_in_time_and_unanswered_targets_keep_their_addresses() {
        let dns = SlowDns::start(Answers {
            targets: 3,
            addr_delay: None,
            ..Answers::default()
        })
        .await;
        let last = SrvAnswer {
            targets: vec![SrvTarget {
                priority: 10,
                weight: 1,
                port: 5060,
                target: "t1.test.".into(),
                addrs: vec![ip("198.18.1.1")],
            }],
            ttl: Duration::from_secs(60),
            reported: Reported::default(),
        };
        let mut state = NameState::new(Some(last));
        let started = std::time::Instant::now();
        let limit = Duration::from_millis(700);
        let answer = resolve_within(&dns.resolver(), "_sip._udp.test.", &mut state, limit)
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(took < limit + Duration::from_millis(300), "took {took:?}");
        // t0 and t2 never answered and were not known: left out; t1 keeps its address.
        assert_eq!(answer.targets.len(), 1);
        assert_eq!(answer.targets[0].target, "t1.test.");
        assert_eq!(answer.targets[0].addrs, [ip("198.18.1.1")]);
        assert!(
            state
                .reported
                .stale
                .contains(&("t1.test.".to_string(), false))
        );
    }
}
