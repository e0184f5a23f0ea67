//! The held-call census behind `backends list` (calls), `stats` and the metrics
//! (affinity occupancy) and `drain --wait`.
//!
//! The census walks the affinity map in the kernel: the `affinity_census` program is
//! run through BPF_PROG_TEST_RUN, and its per-id counts are read back from `sd_held_v1`.
//! Measured on a full default map (262144 entries, `tests/kernel/affinity.rs`): 31 ms in the
//! kernel, against 430 ms for a userspace walk (aya `HashMap::iter`: a next-key and a
//! lookup syscall per entry; release build, 614 ms in a debug build). It runs on tokio's
//! blocking pool (never on the
//! controller's thread), only when something asks, at most once a second: a result
//! answers for [`FRESH_FOR`].
use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, MapData};
use sip_dispatch_common::census::{CensusInput, HELD_ENTRIES, HELD_STALE};
use tokio::task::JoinHandle;

use crate::control;

/// How long a census answers for.
pub const FRESH_FOR: Duration = Duration::from_secs(1);

/// What one census found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Per backend id asked about: the calls it holds.
    pub held: BTreeMap<u32, u64>,
    /// Entries in the affinity map.
    pub entries: u64,
    /// Entries that hold no call (ended, idle, or of an earlier or disabled backend).
    pub stale: u64,
    /// How long the kernel walk took.
    pub took: Duration,
}

/// The census program and its output map, on fds of their own, so that a census runs
/// on another thread than the controller's.
pub struct Runner {
    program: OwnedFd,
    held: aya::maps::Map,
}

const XDP_PASS: u32 = 2;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// The kernel refuses an attr whose bytes past the last field are not zero: no
    /// implicit padding.
    _pad: u32,
}

impl Runner {
    pub fn new(program: OwnedFd, held: MapData) -> Runner {
        Runner {
            program,
            held: aya::maps::Map::Array(held),
        }
    }

    /// Runs the census (blocking): counts per id in `ids` the calls held with `idle`.
    pub fn run(&self, ids: &[u32], idle: Duration) -> anyhow::Result<Census> {
        let input = CensusInput {
            idle_ns: u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX),
            _pad: [0],
        }
        .to_bytes();
        let mut attr = TestRunAttr {
            prog_fd: self.program.as_raw_fd() as u32,
            data_size_in: input.len() as u32,
            data_in: input.as_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        let started = Instant::now();
        // SAFETY: `attr` is a valid `bpf_attr` test member of the size passed; the
        // kernel reads `input` (alive for the call) and writes only `attr` (no output
        // buffers are given).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                std::ptr::from_mut(&mut attr),
                std::mem::size_of::<TestRunAttr>(),
            )
        };
        let took = started.elapsed();
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("running the census program");
        }
        if attr.retval != XDP_PASS {
            bail!("the census program failed (verdict {})", attr.retval);
        }
        let held: Array<&MapData, u64> = Array::try_from(&self.held)?;
        let read = |i: u32| held.get(&i, 0).context("reading the census counts");
        let mut census = Census {
            entries: read(HELD_ENTRIES)?,
            stale: read(HELD_STALE)?,
            took,
            ..Default::default()
        };
        for &id in ids {
            census.held.insert(id, read(id)?);
        }
        Ok(census)
    }
}

/// Duplicates an fd (the program's or a map's) for a [`Runner`].
pub fn dup(fd: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<OwnedFd> {
    fd.try_clone_to_owned().context("duplicating an fd")
}

/// The census as the controller keeps it: the last result, the one running, and the
/// requests waiting for it.
#[derive(Default)]
pub struct Censuses {
    last: Option<(Instant, Census)>,
    /// A census started before this no longer answers (a backend changed state).
    valid_after: Option<Instant>,
    running: Option<(Instant, JoinHandle<anyhow::Result<Census>>)>,
    waiting: Vec<control::Command>,
}

impl Censuses {
    /// Whether the last census answers now: taken less than [`FRESH_FOR`] ago, and
    /// after the last [`Censuses::invalidate`].
    pub fn fresh(&self) -> bool {
        self.current()
            && self
                .last
                .as_ref()
                .is_some_and(|(at, _)| at.elapsed() < FRESH_FOR)
    }

    /// Whether the last census was started after the last [`Censuses::invalidate`].
    pub fn current(&self) -> bool {
        self.last
            .as_ref()
            .is_some_and(|(at, _)| self.valid_after.is_none_or(|v| *at >= v))
    }

    /// The last census however old (None before the first).
    pub fn last(&self) -> Option<&Census> {
        self.last.as_ref().map(|(_, c)| c)
    }

    /// Backend states changed: the next request waits for a census started after now.
    pub fn invalidate(&mut self) {
        self.valid_after = Some(Instant::now());
    }

    pub fn running(&self) -> bool {
        self.running.is_some()
    }

    pub fn start(&mut self, census: JoinHandle<anyhow::Result<Census>>) {
        self.running = Some((Instant::now(), census));
    }

    /// Keeps `command` until the running census is back.
    pub fn wait(&mut self, command: control::Command) {
        self.waiting.push(command);
    }

    /// Waits for the running census (forever when none runs) and records it. Returns
    /// the requests that waited, and whether it worked.
    pub async fn finished(&mut self) -> (Vec<control::Command>, bool) {
        let Some((_, handle)) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let result = handle.await;
        let started = self.running.take().map_or_else(Instant::now, |(at, _)| at);
        let ok = match result {
            Ok(Ok(census)) => {
                log::debug!(
                    "affinity census: {} entries, {} stale, {:?} in the kernel",
                    census.entries,
                    census.stale,
                    census.took
                );
                self.last = Some((started, census));
                true
            }
            Ok(Err(e)) => {
                log::warn!("affinity census: {e:#}");
                false
            }
            Err(e) => {
                log::warn!("affinity census: {e}");
                false
            }
        };
        (std::mem::take(&mut self.waiting), ok)
    }
}
