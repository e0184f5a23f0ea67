//! The follower thread: resolves every entry, listens to the notifications, makes what
//! they may concern invalid at once and resolves again.
use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::MapData;
use sip_dispatch_common::{MAX_BACKENDS, NextHop};

use super::{
    RESYNC, Targets,
    dump::Resolver,
    entry::{Writer, concerns},
    wire::{Event, GROUPS, events},
};
use crate::netlink::Socket;

/// Stops the follower thread when dropped, and waits for it (its receive timeout and one
/// resync at most): it leaves every entry invalid, so that a program left attached
/// (`--keep-attached`) asks the FIB while no daemon follows the tables.
pub struct Follower {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("next hops: the follower thread panicked");
        }
    }
}

/// Starts the follower thread on `map` (the dataplane's `sd_nexthop_v1`) for `targets`.
pub fn follow(map: MapData, targets: Targets) -> anyhow::Result<Follower> {
    let mut writer = Writer::new(map)?;
    let events = Socket::open(GROUPS, Duration::from_millis(200))
        .context("joining the rtnetlink neighbour, route and link groups")?;
    let mut resolver = Resolver::new().context("opening a netlink route socket")?;
    // Entries a previous daemon left may be stale: none is used until resolved anew.
    for id in 0..MAX_BACKENDS {
        writer.invalidate(id)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
        .name("nexthops".into())
        .spawn(move || {
            let mut state = State::default();
            while !stopped.load(Ordering::Relaxed) {
                state.step(&mut writer, &mut resolver, &events, &targets);
            }
            for id in 0..MAX_BACKENDS {
                if let Err(e) = writer.invalidate(id) {
                    log::warn!("next hops: {e:#}");
                    break;
                }
            }
        })
        .context("starting the next-hop thread")?;
    Ok(Follower {
        stop,
        thread: Some(thread),
    })
}

/// The follower's memory between steps.
#[derive(Default)]
struct State {
    /// Per id written valid: the next-hop address it was resolved for, and the entry
    /// (so that a notification is matched without reading the map).
    hops: HashMap<u32, (IpAddr, NextHop)>,
    /// The next-hop addresses (gateway or backend) of ids without a valid entry: a
    /// neighbour entry of one of them becoming usable is worth resolving again for.
    waiting: std::collections::HashSet<IpAddr>,
    last_resync: Option<Instant>,
    buf: Vec<u8>,
    resync_failures: u32,
    /// Why no entry is valid while a routing rule selects by more than the destination.
    selective: Option<String>,
    /// Reading the notifications failed last time (warned once).
    read_failing: bool,
}

impl State {
    /// Waits for notifications (at most the socket's timeout), invalidates what they
    /// may concern, and resolves everything again after one, or every [`RESYNC`].
    fn step(
        &mut self,
        writer: &mut Writer,
        resolver: &mut Resolver,
        events: &Socket,
        targets: &Targets,
    ) {
        if self.buf.is_empty() {
            self.buf = vec![0; 256 * 1024];
        }
        let mut changed = false;
        let mut flags = 0;
        loop {
            match events.recv(&mut self.buf, flags) {
                Ok(n) => {
                    if std::mem::take(&mut self.read_failing) {
                        log::info!("next hops: rtnetlink notifications are read again");
                    }
                    let got = events_or_all(&self.buf[..n]);
                    // Neighbour entries change state all the time (REACHABLE, STALE,
                    // DELAY, ...): only those of a next hop in use or awaited count.
                    changed |= self.invalidate(writer, &got) || self.awaited(&got);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // Notifications were lost: anything may have changed.
                    self.invalidate(writer, &[Event::Route]);
                    changed = true;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    break;
                }
                Err(e) => {
                    // Once per run of failures, not every 200 ms.
                    if !self.read_failing {
                        log::warn!("next hops: reading rtnetlink notifications: {e}");
                        self.read_failing = true;
                    }
                    self.invalidate(writer, &[Event::Route]);
                    changed = true;
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
            }
            // Drain what else is queued without waiting, then resolve once.
            flags = libc::MSG_DONTWAIT;
        }
        let due = self.last_resync.is_none_or(|t| t.elapsed() >= RESYNC);
        if changed || due {
            self.resync(writer, resolver, targets);
        }
    }

    /// Makes the valid entries `events` may concern invalid; whether there were any.
    fn invalidate(&mut self, writer: &mut Writer, events: &[Event]) -> bool {
        let mut any = false;
        if events.is_empty() {
            return any;
        }
        let concerned: Vec<u32> = self
            .hops
            .iter()
            .filter(|(_, (hop, entry))| events.iter().any(|e| concerns(e, entry, *hop)))
            .map(|(&id, _)| id)
            .collect();
        for id in concerned {
            any = true;
            // Invalid until the resync that follows resolves it again.
            self.hops.remove(&id);
            if let Err(e) = writer.invalidate(id) {
                log::warn!("next hops: {e:#}");
            }
        }
        any
    }

    /// Whether `events` may give an id without a valid entry one: a route or link
    /// change, or a usable neighbour entry of an awaited next hop.
    fn awaited(&self, events: &[Event]) -> bool {
        events.iter().any(|e| match e {
            Event::Route | Event::Link(..) => true,
            Event::Neighbour(_, addr, mac) => mac.is_some() && self.waiting.contains(addr),
        })
    }

    fn resync(&mut self, writer: &mut Writer, resolver: &mut Resolver, targets: &Targets) {
        self.last_resync = Some(Instant::now());
        let snapshot = targets.lock().clone();
        let rules = resolver.selective_rule();
        match (&rules, &self.selective) {
            (Ok(Some(why)), None) => log::warn!(
                "next hops: {why}: the cache cannot follow it, so every packet asks the FIB \
                 while the rule is there"
            ),
            (Ok(None), Some(_)) => {
                log::info!("next hops: no routing rule selects by more than the destination now")
            }
            _ => {}
        }
        if let Ok(r) = &rules {
            self.selective = r.clone();
        }
        let resolved = match rules.and_then(|r| match r {
            // As a failed reading: every entry invalid (the warning above says why).
            Some(_) => Err(io::Error::other("selective routing rules")),
            None => resolver.resolve(&snapshot),
        }) {
            Ok(r) => {
                self.resync_failures = 0;
                r
            }
            Err(e) => {
                self.resync_failures = self.resync_failures.saturating_add(1);
                if self.resync_failures == 1 && self.selective.is_none() {
                    log::warn!(
                        "next hops: reading the routing tables: {e}; the fast path asks the FIB"
                    );
                }
                // Nothing known is trusted: every entry goes invalid.
                snapshot.iter().map(|(&id, &ip)| (id, (None, ip))).collect()
            }
        };
        let listed = targets.lock();
        // Ids no longer listed: the dataplane made their entries invalid.
        self.hops.retain(|id, _| listed.contains_key(id));
        self.waiting.clear();
        for (id, got) in resolved {
            // Written only for an id that still has the address resolved for.
            if listed.get(&id) != snapshot.get(&id) {
                continue;
            }
            let (want, hop) = got;
            match writer.set(id, want) {
                Ok(_) if let Some(entry) = want => {
                    self.hops.insert(id, (hop, entry));
                }
                Ok(_) => {
                    self.hops.remove(&id);
                    self.waiting.insert(hop);
                }
                Err(e) => {
                    self.hops.remove(&id);
                    log::warn!("next hops: {e:#}");
                }
            }
        }
    }
}

/// The events of a buffer; a buffer that does not parse counts as "anything changed".
fn events_or_all(buf: &[u8]) -> Vec<Event> {
    events(buf).unwrap_or_else(|e| {
        log::warn!("next hops: {e}");
        vec![Event::Route]
    })
}
