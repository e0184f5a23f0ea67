//! Classification: what to do with one datagram (forward it to which backend, answer it
//! with a 503, or drop it), by the same rules and table as the fast path.
use std::net::SocketAddr;

use sip_dispatch_common::{
    AffinityEntry, AffinityKey, BackendFlags, HashKey, ScanOutcome,
    affinity::{EntryWrite, Route, choose, classify, created_flags_of},
    parse::{
        ToTag, scan_message,
        start_line::{StartLine, start_line},
        to_tag_of,
    },
    table::SlotTable,
};

/// What to do with one datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Forward(SocketAddr),
    /// No healthy backend: answer this request with a 503.
    Reject,
    Drop(DropReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// STUN, CRLF keep-alives, anything that does not start like a SIP message.
    NotSip,
    /// A SIP message without a (non-empty) Call-ID.
    NoCallId,
    /// No healthy backend, and the message is a response or an ACK (never answered).
    NoBackend,
}

/// The decision for one datagram, given the service's current table. The fast path
/// makes the same choice for every message it can handle (a kernel test checks that).
pub fn decide(msg: &[u8], table: Option<&SlotTable>, key: HashKey) -> Decision {
    let Some(kind) = sip_kind(msg) else {
        return Decision::Drop(DropReason::NotSip);
    };
    let scan = scan_message(msg, key);
    if scan.outcome != ScanOutcome::Found {
        return Decision::Drop(DropReason::NoCallId);
    }
    match table.and_then(|t| t.member_for_hash(scan.hash)) {
        Some(m) => Decision::Forward(m.backend.to_socket_addr()),
        None => no_backend(kind),
    }
}

fn no_backend(kind: SipKind) -> Decision {
    match kind {
        SipKind::Request => Decision::Reject,
        SipKind::NoAnswer => Decision::Drop(DropReason::NoBackend),
    }
}

/// A service's table as installed in the kernel: the table, and the backend id of each
/// member (by member index).
#[derive(Debug)]
pub struct InstalledTable {
    pub table: SlotTable,
    pub ids: Vec<u32>,
}

impl InstalledTable {
    /// The backend and its id for a Call-ID hash.
    fn pick(&self, hash: u64) -> Option<(SocketAddr, u32)> {
        let slot = *self
            .table
            .slots
            .get(sip_dispatch_common::slot_of(hash) as usize)?;
        let member = self.table.members.get(slot as usize)?;
        Some((
            member.backend.to_socket_addr(),
            *self.ids.get(slot as usize)?,
        ))
    }
}

/// What the slow path needs of the affinity maps: the fast path's map in the daemon,
/// an in-memory one in unit tests.
pub trait AffinityStore {
    /// The service id the entries are keyed with.
    fn service(&self) -> u32;
    fn entry(&self, key: &AffinityKey) -> Option<AffinityEntry>;
    /// The flags of a backend id (all zero when unknown).
    fn flags(&self, id: u32) -> BackendFlags;
    /// The address of a backend id.
    fn backend(&self, id: u32) -> Option<SocketAddr>;
    /// Writes an entry; `create` says whether it may create one (else only replace).
    fn write(&mut self, key: &AffinityKey, entry: &AffinityEntry, create: bool);
}

/// What happened to a message's affinity entry in the slow path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityOutcome {
    /// It followed its call's entry.
    pub followed: bool,
    /// The entry was created or rewritten.
    pub written: bool,
}

/// [`decide`] with call affinity: the rules of `affinity::choose` over `store`, the table
/// for what they leave to it. `now_ns` is CLOCK_MONOTONIC, the clock of the entries.
pub fn decide_with_affinity(
    msg: &[u8],
    installed: Option<&InstalledTable>,
    key: HashKey,
    store: &mut dyn AffinityStore,
    now_ns: u64,
) -> (Decision, AffinityOutcome) {
    let mut outcome = AffinityOutcome::default();
    let Some(kind) = sip_kind(msg) else {
        return (Decision::Drop(DropReason::NotSip), outcome);
    };
    let scan = scan_message(msg, key);
    if scan.outcome != ScanOutcome::Found {
        return (Decision::Drop(DropReason::NoCallId), outcome);
    }
    let akey = AffinityKey {
        hash: scan.hash,
        service: store.service(),
        _zero: 0,
    };
    let entry = store.entry(&akey);
    let flags = entry.map_or_else(BackendFlags::default, |e| store.flags(e.backend));
    let choice = choose(classify(msg), entry.as_ref(), flags, now_ns, || {
        to_tag_of(msg) == ToTag::Tagged
    });
    if let (Route::Follow(id), Some(e)) = (choice.route, entry)
        && let Some(backend) = store.backend(id)
    {
        outcome.followed = true;
        if let EntryWrite::Touch { set_flags } = choice.write
            // The fast path may have rewritten it since it was read: keep its write.
            && let Some(now) = store.entry(&akey)
            && (now.backend, now.generation) == (e.backend, e.generation)
        {
            let touched = AffinityEntry {
                last_seen_ns: now_ns,
                flags: now.flags | set_flags,
                ..now
            };
            store.write(&akey, &touched, false);
        }
        return (Decision::Forward(backend), outcome);
    }
    let Some((backend, id)) = installed.and_then(|t| t.pick(scan.hash)) else {
        return (no_backend(kind), outcome);
    };
    let created = created_flags_of(msg);
    let fresh = |flags: u32| AffinityEntry {
        backend: id,
        generation: store.flags(id).generation,
        last_seen_ns: now_ns,
        flags: flags | created,
        _zero: 0,
    };
    match choice.write {
        EntryWrite::Rewrite { flags } => {
            store.write(&akey, &fresh(flags), false);
            outcome.written = true;
        }
        EntryWrite::Insert => {
            store.write(&akey, &fresh(0), true);
            outcome.written = true;
        }
        EntryWrite::Keep | EntryWrite::Touch { .. } => {}
    }
    (Decision::Forward(backend), outcome)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SipKind {
    Request,
    /// A response, or an ACK (which gets no response either).
    NoAnswer,
}

/// Whether `msg` starts like a SIP request or response (the rule the fast path checks
/// too, see `sip_dispatch_common::parse::start_line`).
fn sip_kind(msg: &[u8]) -> Option<SipKind> {
    Some(match start_line(msg)? {
        StartLine::Response => SipKind::NoAnswer,
        StartLine::Request if msg.starts_with(b"ACK ") => SipKind::NoAnswer,
        StartLine::Request => SipKind::Request,
    })
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}
