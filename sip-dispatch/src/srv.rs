//! DNS SRV backends (RFC 2782, RFC 3263): every SRV target is a backend, resolved to its
//! A and AAAA addresses (from the additional section when the server sent them), and
//! the name is resolved again when its TTL runs out. A failed lookup keeps the last
//! known set: the table is never emptied because DNS blinked.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, RecordType},
};
use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
};

use crate::select::Candidate;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    pub server: Option<SocketAddr>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
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

/// A successful resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvAnswer {
    pub targets: Vec<SrvTarget>,
    /// The smallest TTL of the records used, before clamping.
    pub ttl: Duration,
}

impl SrvAnswer {
    /// The backends of one address family: each address of each target, sharing the
    /// target's weight with the other addresses of that family.
    pub fn candidates(&self, ipv6: bool) -> Vec<Candidate> {
        let mut out = Vec::new();
        for t in &self.targets {
            let addrs: Vec<&IpAddr> = t.addrs.iter().filter(|ip| ip.is_ipv6() == ipv6).collect();
            for ip in &addrs {
                out.push(Candidate {
                    addr: SocketAddr::new(**ip, t.port),
                    priority: t.priority,
                    weight: t.weight as u32,
                    sharing: addrs.len() as u32,
                    healthy: true,
                });
            }
        }
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

/// Resolves `name` to its SRV targets and their addresses.
pub async fn resolve(resolver: &TokioResolver, name: &str) -> anyhow::Result<SrvAnswer> {
    let lookup = resolver
        .lookup(name, RecordType::SRV)
        .await
        .with_context(|| format!("SRV lookup of {name}"))?;
    let mut ttl = u32::MAX;
    let mut targets = Vec::new();
    for record in lookup.answers() {
        if let RData::SRV(srv) = &record.data {
            ttl = ttl.min(record.ttl);
            targets.push(SrvTarget {
                priority: srv.priority,
                weight: srv.weight,
                port: srv.port,
                target: srv.target.to_ascii(),
                addrs: Vec::new(),
            });
        }
    }
    if targets.is_empty() {
        bail!("SRV lookup of {name}: no records");
    }
    for t in &mut targets {
        // RFC 2782: a target of "." means the service is decidedly not available.
        if t.target == "." {
            continue;
        }
        for record in lookup.additionals() {
            if !record.name.to_ascii().eq_ignore_ascii_case(&t.target) {
                continue;
            }
            match &record.data {
                RData::A(a) => t.addrs.push(IpAddr::V4(a.0)),
                RData::AAAA(a) => t.addrs.push(IpAddr::V6(a.0)),
                _ => continue,
            }
            ttl = ttl.min(record.ttl);
        }
        if t.addrs.is_empty() {
            match resolver.lookup_ip(t.target.as_str()).await {
                Ok(ips) => {
                    t.addrs.extend(ips.iter());
                    let left = ips
                        .valid_until()
                        .saturating_duration_since(std::time::Instant::now());
                    ttl = ttl.min(left.as_secs() as u32);
                }
                Err(e) => log::warn!("dns {name}: target {} has no address: {e}", t.target),
            }
        }
        t.addrs.sort();
        t.addrs.dedup();
    }
    targets.retain(|t| !t.addrs.is_empty());
    if targets.is_empty() {
        bail!("SRV lookup of {name}: no target has an address");
    }
    targets.sort_by(|a, b| (a.priority, &a.target, a.port).cmp(&(b.priority, &b.target, b.port)));
    Ok(SrvAnswer {
        targets,
        ttl: Duration::from_secs(ttl as u64),
    })
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
        Some(d) => (d * 2).min(max),
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
        Some(a) => a.ttl.clamp(cfg.min_ttl, cfg.max_ttl),
        None => Duration::ZERO,
    };
    let mut failing: Option<Duration> = if first.is_none() {
        Some(Duration::ZERO)
    } else {
        None
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = reload.notified() => {}
        }
        let event = match resolve(&resolver, &name).await {
            Ok(answer) => {
                wait = answer.ttl.clamp(cfg.min_ttl, cfg.max_ttl);
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

#[cfg(test)]
mod tests {
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
}
