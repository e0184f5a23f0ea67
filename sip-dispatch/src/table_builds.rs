//! Slot tables are built off the async runtime's thread, so that no build holds the
//! control socket, the health checks or the slow path: weighted Maglev takes a few ms for
//! 512 backends in a release build (tens of ms in a debug one), and the per-slot
//! rendezvous builder before it took hundreds of ms, long enough to stall them inline.
//!
//! One build runs at a time, on tokio's blocking pool. Requests queue per service and a
//! newer selection replaces a queued one, so a burst of changes costs one build per
//! service; the oldest request goes first. A service's results therefore come back in
//! the order its selections were made, and the controller never installs an older table
//! over a newer one.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use sip_dispatch_common::{
    Backend, HashKey, NO_BACKEND,
    table::{SlotTable, Weighted, build_table},
};
use tokio::task::JoinHandle;

use crate::select::Selection;

/// A finished build.
pub struct Built {
    /// Index of the service in the controller.
    pub service: usize,
    /// The request's number (increasing over all requests).
    pub seq: u64,
    pub selection: Selection,
    pub table: anyhow::Result<SlotTable>,
    pub took: Duration,
}

struct Request {
    seq: u64,
    selection: Selection,
}

struct Running {
    service: usize,
    seq: u64,
    selection: Selection,
    handle: JoinHandle<(anyhow::Result<SlotTable>, Duration)>,
}

pub struct TableBuilds {
    key: HashKey,
    last_seq: u64,
    queued: BTreeMap<usize, Request>,
    running: Option<Running>,
}

impl TableBuilds {
    pub fn new(key: HashKey) -> TableBuilds {
        TableBuilds {
            key,
            last_seq: 0,
            queued: BTreeMap::new(),
            running: None,
        }
    }

    /// Asks for a table of `selection` for service `service`; returns the request's number.
    /// Must be called from within the runtime.
    pub fn request(&mut self, service: usize, selection: Selection) -> u64 {
        self.last_seq += 1;
        let seq = self.last_seq;
        self.queued.insert(service, Request { seq, selection });
        self.start_next();
        seq
    }

    /// Whether a request for `service` newer than request `seq` is queued or running:
    /// its table comes back after the one of `seq`.
    pub fn newer_pending(&self, service: usize, seq: u64) -> bool {
        let queued = self.queued.get(&service).is_some_and(|r| r.seq > seq);
        let running = self
            .running
            .as_ref()
            .is_some_and(|r| r.service == service && r.seq > seq);
        queued || running
    }

    /// Nothing queued or running.
    pub fn idle(&self) -> bool {
        self.running.is_none() && self.queued.is_empty()
    }

    /// The next finished build (pending forever when idle). Cancel-safe: a build that
    /// has not finished when the future is dropped is still there for the next call.
    pub async fn finished(&mut self) -> Built {
        let Some(running) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let joined = (&mut running.handle).await;
        let (service, seq) = (running.service, running.seq);
        let selection = std::mem::take(&mut running.selection);
        self.running = None;
        self.start_next();
        let (table, took) = match joined {
            Ok(done) => done,
            Err(e) => (
                Err(anyhow::anyhow!("the table build did not finish: {e}")),
                Duration::ZERO,
            ),
        };
        Built {
            service,
            seq,
            selection,
            table,
            took,
        }
    }

    fn start_next(&mut self) {
        if self.running.is_some() {
            return;
        }
        let Some(service) = self
            .queued
            .iter()
            .min_by_key(|(_, r)| r.seq)
            .map(|(s, _)| *s)
        else {
            return;
        };
        let Some(Request { seq, selection }) = self.queued.remove(&service) else {
            return;
        };
        let (members, shed) = (selection.weighted(), selection.shed);
        let key = self.key;
        let handle = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            injected_build_delay();
            let table = build_with_shed(members, shed, key);
            (table, started.elapsed())
        });
        self.running = Some(Running {
            service,
            seq,
            selection,
            handle,
        });
    }
}

/// Debug builds only (tests): `SIP_DISPATCH_TEST_BUILD_DELAY_MS=N` makes every build take
/// N ms (at most 10 s) longer, so that a test can tell a build that holds the runtime
/// thread from one that does not (a real build of 512 backends takes milliseconds).
fn injected_build_delay() {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("SIP_DISPATCH_TEST_BUILD_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms.min(10_000)));
    }
}

/// The slot table of `members`, with a share of weight `shed` owned by no backend (the
/// new calls RFC 7339 overload sheds with nowhere to go; the slow path answers them with
/// 503). The shed share is a member without an address while the table is built, so its
/// slots are as deterministic as everyone else's; it sorts first (family 0).
pub fn build_with_shed(
    mut members: Vec<Weighted>,
    shed: u32,
    key: HashKey,
) -> anyhow::Result<SlotTable> {
    if shed == 0 {
        return Ok(build_table(&members, key)?);
    }
    members.push(Weighted {
        backend: Backend::default(),
        weight: shed,
    });
    let mut table = build_table(&members, key)?;
    let Some(nobody) = table.members.iter().position(|m| m.backend.family == 0) else {
        anyhow::bail!("the shed share is missing from the built table");
    };
    table.members.remove(nobody);
    let nobody = nobody as u32;
    for slot in &mut table.slots {
        *slot = match *slot {
            s if s == nobody => NO_BACKEND,
            s if s != NO_BACKEND && s > nobody => s - 1,
            s => s,
        };
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn selection(backends: &[u8]) -> Selection {
        Selection {
            priority: Some(0),
            members: backends
                .iter()
                .map(|n| (SocketAddr::from(([198, 18, 0, *n], 5060)), 1))
                .collect(),
            shed: 0,
            divisor: 1,
        }
    }

    #[test]
    fn a_shed_share_is_slots_of_no_backend_and_the_rest_keep_their_members() {
        let key = HashKey::DEFAULT;
        let members: Vec<Weighted> = (21..=22u8)
            .map(|n| Weighted {
                backend: Backend::from_socket_addr(SocketAddr::from(([198, 18, 0, n], 5060))),
                weight: 1,
            })
            .collect();
        let plain = build_with_shed(members.clone(), 0, key).unwrap();
        let shed = build_with_shed(members.clone(), 2, key).unwrap();
        assert_eq!(shed.members, plain.members, "the same members, same order");
        let nobody = shed.slots.iter().filter(|&&s| s == NO_BACKEND).count();
        let half = sip_dispatch_common::SLOTS / 2;
        assert!(nobody.abs_diff(half) <= 1, "{nobody} slots of no backend");
        let counts = shed.slot_counts();
        assert!(
            counts.iter().all(|&c| c.abs_diff(half / 2) <= 1),
            "{counts:?}"
        );
        // Deterministic: the same table again.
        assert_eq!(build_with_shed(members, 2, key).unwrap().slots, shed.slots);
    }

    #[tokio::test]
    async fn newest_selection_per_service_in_request_order() {
        let mut builds = TableBuilds::new(HashKey { k0: 1, k1: 2 });
        assert!(builds.idle());
        let s1 = builds.request(1, selection(&[1, 2])); // starts at once
        let _superseded = builds.request(0, selection(&[1]));
        let s3 = builds.request(2, selection(&[3]));
        let s4 = builds.request(0, selection(&[1, 2, 3]));
        let mut done = Vec::new();
        while !builds.idle() {
            let b = builds.finished().await;
            assert!(b.table.is_ok());
            done.push((b.service, b.seq, b.selection.members.len()));
        }
        // Service 0's first request was replaced by its second; service 2 asked earlier.
        assert_eq!(done, vec![(1, s1, 2), (2, s3, 1), (0, s4, 3)]);
    }

    #[tokio::test]
    async fn a_build_knows_whether_a_newer_one_for_its_service_follows() {
        let mut builds = TableBuilds::new(HashKey { k0: 1, k1: 2 });
        let first = builds.request(0, selection(&[1, 2])); // starts at once
        let other = builds.request(1, selection(&[3]));
        let second = builds.request(0, selection(&[1])); // queued behind service 1
        assert!(builds.newer_pending(0, first), "queued");
        assert!(!builds.newer_pending(1, other));
        assert!(!builds.newer_pending(0, second));
        let b = builds.finished().await;
        assert_eq!((b.service, b.seq), (0, first));
        assert!(builds.newer_pending(0, first), "still queued");
        let b = builds.finished().await;
        assert_eq!((b.service, b.seq), (1, other));
        // Service 0's newer request is running now.
        assert!(builds.newer_pending(0, first), "running");
        assert!(!builds.newer_pending(1, other));
        let b = builds.finished().await;
        assert_eq!((b.service, b.seq), (0, second));
        assert!(
            !builds.newer_pending(0, first),
            "nothing follows once it is back"
        );
        assert!(builds.idle());
    }

    #[tokio::test]
    async fn a_failed_build_is_reported() {
        let mut builds = TableBuilds::new(HashKey { k0: 1, k1: 2 });
        let mut twice = selection(&[1]);
        twice.members.push(twice.members[0]);
        builds.request(0, twice);
        let b = builds.finished().await;
        let e = b.table.expect_err("a backend listed twice");
        assert!(e.to_string().contains("listed twice"), "{e}");
        assert!(builds.idle());
    }
}
