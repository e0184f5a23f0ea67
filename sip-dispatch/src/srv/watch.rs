//! The watcher tasks: each SRV name resolved again when its TTL runs out, answers and
//! failures reported to the controller on one channel.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use hickory_resolver::TokioResolver;
use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
};

use super::{DnsConfig, NameState, SrvAnswer, resolve_with, resolver};

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
