//! The slow path: what the XDP program passes for a service (fragmented datagrams,
//! Call-IDs beyond its window, IPv6 extension headers, FIB misses) reaches the kernel
//! stack, which reassembles it and delivers it to a socket on the VIP. Here the same
//! Call-ID scanner and the same slot table pick the same backend, and the datagram is
//! sent on in the service's forwarding mode, with the client's source address and port
//! (one long-lived socket per service, see [`crate::forwarder`]), so the backend sees
//! what the fast path would have sent. Each wakeup handles at most [`BATCH`] datagrams,
//! then yields to the runtime.
//!
//! With no healthy backend, a request (other than ACK) gets a stateless
//! `503 Service Unavailable` with Retry-After (RFC 3261 8.2.6) and the client's address
//! in its top Via (RFC 3581), rate-limited per source and in total so that spoofed
//! traffic cannot turn the dispatcher into a reflector, and never larger than one
//! unfragmented datagram; responses and ACKs are dropped. Every outcome is counted.
//!
//! With call affinity on, the slow path reads and writes the same affinity map by the
//! same rules (`sip_dispatch_common::affinity::choose`) as the fast path, so a call's
//! messages go to one backend whichever path each takes.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context as _;
use serde::Serialize;
use sip_dispatch_common::{
    AffinityEntry, AffinityKey, BackendFlags, HashKey, MAX_BACKENDS, ScanOutcome,
    affinity::{EntryWrite, Route, choose, classify, created_flags_of},
    parse::{
        ToTag, scan_message,
        start_line::{StartLine, start_line},
        to_tag_of,
    },
    sip::{NoAnswer, service_unavailable},
    table::SlotTable,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::UdpSocket, sync::watch};

use crate::{
    cli::ForwardingMode,
    forwarder::{Forwarder, SendError},
};

/// Seconds a client is told to wait when no backend is available.
pub const RETRY_AFTER_SECS: u32 = 5;
/// Datagrams handled per wakeup before the slow path yields to the other tasks.
pub const BATCH: usize = 64;
/// The largest 503 sent: one unfragmented datagram on an Ethernet MTU (1500 - 20 - 8)
/// for IPv4, on the IPv6 minimum MTU (1280 - 40 - 8) for IPv6; less when the
/// interface's MTU is smaller (see [`max_503_len`]).
pub const MAX_503_V4: usize = 1472;
pub const MAX_503_V6: usize = 1232;
/// Ethernet header bytes, added to what the slow path forwards so that its byte count
/// reads like the fast path's (which counts frames).
const ETH_HLEN: u64 = 14;

/// The largest 503 that fits one unfragmented datagram on a link of `mtu`: the MTU
/// less the IP and UDP headers, at most the fixed cap of the family.
pub fn cap_for_mtu(mtu: u32, ipv6: bool) -> usize {
    let (headers, fixed) = if ipv6 {
        (40 + 8, MAX_503_V6)
    } else {
        (20 + 8, MAX_503_V4)
    };
    usize::try_from(mtu)
        .unwrap_or(usize::MAX)
        .saturating_sub(headers)
        .min(fixed)
}

/// The MTU of `iface`, from `/sys/class/net/<iface>/mtu`.
fn interface_mtu(iface: &str) -> anyhow::Result<u32> {
    if iface.is_empty() || iface.contains('/') || iface == "." || iface == ".." {
        anyhow::bail!("{iface:?} is not an interface name");
    }
    let path = std::path::Path::new("/sys/class/net")
        .join(iface)
        .join("mtu");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the MTU of {iface} from {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: not an MTU: {:?}", path.display(), text.trim()))
}

/// The largest 503 for a service of this family on `iface`, read once at start:
/// [`cap_for_mtu`] of the interface's MTU, or the fixed cap when it cannot be read.
pub fn max_503_len(iface: &str, ipv6: bool) -> usize {
    match interface_mtu(iface) {
        Ok(mtu) => {
            let cap = cap_for_mtu(mtu, ipv6);
            log::info!(
                "slow path: 503s up to {cap} bytes over {} (MTU {mtu} of {iface})",
                if ipv6 { "IPv6" } else { "IPv4" }
            );
            cap
        }
        Err(e) => {
            let cap = cap_for_mtu(u32::MAX, ipv6);
            log::warn!("slow path: {e:#}; 503s up to the fixed {cap} bytes");
            cap
        }
    }
}

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

/// A token bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Limits the 503s: per source address and in total.
pub struct RateLimiter {
    per_source: HashMap<IpAddr, Bucket>,
    total: Bucket,
    source_rate: f64,
    source_burst: f64,
    total_rate: f64,
    total_burst: f64,
}

/// Sources tracked at once; past that, idle ones are forgotten.
const MAX_SOURCES: usize = 10_000;

impl RateLimiter {
    pub fn new(source_rate: f64, total_rate: f64) -> RateLimiter {
        let now = Instant::now();
        RateLimiter {
            per_source: HashMap::new(),
            total: Bucket {
                tokens: total_rate * 2.0,
                last: now,
            },
            source_rate,
            source_burst: source_rate * 2.0,
            total_rate,
            total_burst: total_rate * 2.0,
        }
    }

    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        if self.per_source.len() >= MAX_SOURCES && !self.per_source.contains_key(&source) {
            let (rate, burst) = (self.source_rate, self.source_burst);
            self.per_source.retain(|_, b| {
                let mut probe = *b;
                probe.take(rate, burst, now);
                probe.tokens + 1.0 < burst
            });
            if self.per_source.len() >= MAX_SOURCES {
                return false;
            }
        }
        let burst = self.source_burst;
        let bucket = self.per_source.entry(source).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        if !bucket.take(self.source_rate, burst, now) {
            return false;
        }
        self.total.take(self.total_rate, self.total_burst, now)
    }
}

/// Counters of the slow path.
#[derive(Default, Debug)]
pub struct Counters {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    pub answered_503: AtomicU64,
    pub dropped_not_sip: AtomicU64,
    pub dropped_no_call_id: AtomicU64,
    pub dropped_no_backend: AtomicU64,
    pub rate_limited_503: AtomicU64,
    pub send_errors: AtomicU64,
    /// 503s not sent because they would not fit in one datagram (see [`max_503_len`]).
    pub too_large_503: AtomicU64,
    /// Messages that followed their call's affinity entry.
    pub affinity_followed: AtomicU64,
    /// Affinity entries created or rewritten.
    pub affinity_written: AtomicU64,
    /// l2dsr: datagrams dropped because their backend has no neighbour entry on the
    /// interface.
    pub not_on_link: AtomicU64,
    /// l2dsr, ipip: datagrams dropped because one IP datagram cannot carry them (a guard:
    /// the kernel reassembles nothing that large).
    pub too_big: AtomicU64,
    /// What was forwarded, per backend.
    per_backend: Mutex<HashMap<SocketAddr, Forwarded>>,
}

/// Packets and bytes the slow path forwarded to one backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub packets: u64,
    /// Counted as the fast path counts: the whole unfragmented frame (Ethernet, IP and
    /// UDP headers and the payload).
    pub bytes: u64,
}

/// Backends counted at once: every backend the tables can hold, twice over (removed
/// ones linger until the next stats snapshot forgets them).
const MAX_COUNTED_BACKENDS: usize = 2 * MAX_BACKENDS as usize;

#[derive(Serialize, serde::Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub received: u64,
    pub forwarded: u64,
    pub answered_503: u64,
    pub dropped_not_sip: u64,
    pub dropped_no_call_id: u64,
    pub dropped_no_backend: u64,
    pub rate_limited_503: u64,
    pub send_errors: u64,
    #[serde(default)]
    pub too_large_503: u64,
    #[serde(default)]
    pub affinity_followed: u64,
    #[serde(default)]
    pub affinity_written: u64,
    #[serde(default)]
    pub not_on_link: u64,
    #[serde(default)]
    pub too_big: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CountersSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            received: g(&self.received),
            forwarded: g(&self.forwarded),
            answered_503: g(&self.answered_503),
            dropped_not_sip: g(&self.dropped_not_sip),
            dropped_no_call_id: g(&self.dropped_no_call_id),
            dropped_no_backend: g(&self.dropped_no_backend),
            rate_limited_503: g(&self.rate_limited_503),
            send_errors: g(&self.send_errors),
            too_large_503: g(&self.too_large_503),
            affinity_followed: g(&self.affinity_followed),
            affinity_written: g(&self.affinity_written),
            not_on_link: g(&self.not_on_link),
            too_big: g(&self.too_big),
        }
    }

    fn count_forwarded(&self, backend: SocketAddr, payload_len: usize) {
        let ip_header: u64 = if backend.is_ipv6() { 40 } else { 20 };
        let bytes = ETH_HLEN + ip_header + 8 + payload_len as u64;
        let mut map = self
            .per_backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_COUNTED_BACKENDS && !map.contains_key(&backend) {
            // Only reachable with a churn of backends between two snapshots; the
            // datagram is still in `forwarded`.
            return;
        }
        let f = map.entry(backend).or_default();
        f.packets = f.packets.saturating_add(1);
        f.bytes = f.bytes.saturating_add(bytes);
    }

    /// What the slow path forwarded to `backend`.
    pub fn forwarded_to(&self, backend: SocketAddr) -> Forwarded {
        let map = self
            .per_backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(&backend).copied().unwrap_or_default()
    }

    /// Forgets the per-backend counts of backends no longer known.
    pub fn retain_backends(&self, known: &std::collections::HashSet<SocketAddr>) {
        let mut map = self
            .per_backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.retain(|b, _| known.contains(b));
    }
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

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The current table of a service, as the controller last published it.
pub type TableWatch = watch::Receiver<Option<Arc<InstalledTable>>>;

/// The sockets of one service's slow path: the one on the VIP that receives, and the
/// one that forwards as the client, in the service's forwarding mode.
pub struct Sockets {
    vip: UdpSocket,
    vip_addr: SocketAddr,
    forwarder: Forwarder,
}

/// Binds the service socket on the VIP and opens what forwards in `mode` (see
/// [`Forwarder::open`]: `iface` for l2dsr, `encap_source` for ipip).
pub async fn bind(
    vip: SocketAddr,
    mode: ForwardingMode,
    iface: &str,
    encap_source: Option<IpAddr>,
) -> anyhow::Result<Sockets> {
    let sock = Socket::new(Domain::for_address(vip), Type::DGRAM, Some(Protocol::UDP))?;
    if vip.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // No SO_REUSEADDR: with it, another local user could bind the same VIP:port and
    // take the datagrams.
    // Reassembled INVITEs can be large; keep bursts of them.
    let _ = sock.set_recv_buffer_size(4 << 20);
    sock.set_nonblocking(true)?;
    sock.bind(&vip.into()).with_context(|| {
        format!(
            "binding the slow-path socket on {vip} (is the VIP an address of this host, \
             and is nothing else bound to it?)"
        )
    })?;
    let forwarder = Forwarder::open(mode, vip, iface, encap_source)
        .with_context(|| format!("the slow path of {vip} ({mode} forwarding)"))?;
    Ok(Sockets {
        vip: UdpSocket::from_std(sock.into())?,
        vip_addr: vip,
        forwarder,
    })
}

/// Serves the slow path of one service until the task is dropped; its 503s are at most
/// `max_503` bytes long (see [`max_503_len`]).
///
/// `affinity`: the affinity maps, when call affinity is on.
pub async fn serve(
    sockets: Sockets,
    key: HashKey,
    tables: TableWatch,
    counters: Arc<Counters>,
    max_503: usize,
    mut affinity: Option<Box<dyn AffinityStore + Send>>,
) {
    let Sockets {
        vip: sock,
        vip_addr,
        mut forwarder,
    } = sockets;
    let mut limiter = RateLimiter::new(5.0, 200.0);
    let mut buf = vec![0u8; 65536];
    loop {
        if let Err(e) = sock.readable().await {
            log::debug!("slow path: waiting for datagrams: {e}");
            tokio::task::yield_now().await;
            continue;
        }
        for _ in 0..BATCH {
            let (n, client) = match sock.try_recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("slow path recv: {e}");
                    break;
                }
            };
            bump(&counters.received);
            let msg = &buf[..n];
            let installed = tables.borrow().clone();
            let decision = match affinity.as_deref_mut() {
                Some(store) => {
                    let (d, outcome) =
                        decide_with_affinity(msg, installed.as_deref(), key, store, monotonic_ns());
                    if outcome.followed {
                        bump(&counters.affinity_followed);
                    }
                    if outcome.written {
                        bump(&counters.affinity_written);
                    }
                    d
                }
                None => decide(msg, installed.as_ref().map(|i| &i.table), key),
            };
            match decision {
                Decision::Forward(backend) => {
                    match forwarder.send(client, vip_addr, backend, msg).await {
                        Ok(()) => {
                            bump(&counters.forwarded);
                            counters.count_forwarded(backend, n);
                        }
                        Err(SendError::NotOnLink) => bump(&counters.not_on_link),
                        Err(SendError::TooBig) => {
                            bump(&counters.too_big);
                            log::debug!(
                                "slow path: {n} bytes from {client} to {backend} \
                                 do not fit: dropped"
                            );
                        }
                        Err(SendError::Io(e)) => {
                            bump(&counters.send_errors);
                            log::debug!("slow path: forwarding from {client} to {backend}: {e}");
                        }
                    }
                }
                Decision::Reject => {
                    if !limiter.allow(client.ip(), Instant::now()) {
                        bump(&counters.rate_limited_503);
                        continue;
                    }
                    match service_unavailable(msg, client, RETRY_AFTER_SECS, max_503) {
                        Ok(resp) => match sock.try_send_to(&resp, client) {
                            Ok(_) => bump(&counters.answered_503),
                            Err(_) => bump(&counters.send_errors),
                        },
                        Err(NoAnswer::Incomplete) => bump(&counters.dropped_no_call_id),
                        Err(NoAnswer::TooLarge(len)) => {
                            bump(&counters.too_large_503);
                            log::debug!(
                                "slow path: no 503 to {client}: it would be {len} bytes (limit {max_503})"
                            );
                        }
                    }
                }
                Decision::Drop(DropReason::NotSip) => bump(&counters.dropped_not_sip),
                Decision::Drop(DropReason::NoCallId) => bump(&counters.dropped_no_call_id),
                Decision::Drop(DropReason::NoBackend) => bump(&counters.dropped_no_backend),
            }
        }
        // Bounded work per wakeup: let the control socket, health checks and the other
        // services run before the next batch.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sip_dispatch_common::{
        Backend,
        table::{Weighted, build_table},
    };

    fn table() -> SlotTable {
        let members: Vec<Weighted> = ["198.18.0.21:5060", "198.18.0.22:5060"]
            .iter()
            .map(|a| Weighted {
                backend: Backend::from_socket_addr(a.parse().unwrap()),
                weight: 1,
            })
            .collect();
        build_table(&members, HashKey::DEFAULT).unwrap()
    }

    const INVITE: &str = "INVITE sip:svc@198.18.0.100 SIP/2.0\r\n\
        Via: SIP/2.0/UDP 198.18.0.10:5070;branch=z9hG4bK-1\r\n\
        v: SIP/2.0/UDP 198.18.0.9:5060;branch=z9hG4bK-0\r\n\
        From: <sip:a@x>;tag=1\r\nTo: <sip:svc@198.18.0.100>\r\nCall-ID: abc@x\r\n\
        CSeq: 1 INVITE\r\nSubject: a\r\n folded\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn forwards_to_the_backend_of_the_table() {
        let t = table();
        let scan = scan_message(INVITE.as_bytes(), HashKey::DEFAULT);
        let want = t
            .member_for_hash(scan.hash)
            .unwrap()
            .backend
            .to_socket_addr();
        assert_eq!(
            decide(INVITE.as_bytes(), Some(&t), HashKey::DEFAULT),
            Decision::Forward(want)
        );
        let response = "SIP/2.0 200 OK\r\nCall-ID: abc@x\r\n\r\n";
        assert_eq!(
            decide(response.as_bytes(), Some(&t), HashKey::DEFAULT),
            Decision::Forward(want)
        );
    }

    #[test]
    fn no_backend_rejects_requests_and_drops_responses_and_acks() {
        let empty = build_table(&[], HashKey::DEFAULT).unwrap();
        for t in [None, Some(&empty)] {
            assert_eq!(
                decide(INVITE.as_bytes(), t, HashKey::DEFAULT),
                Decision::Reject
            );
            let ack = INVITE
                .replace("INVITE sip", "ACK sip")
                .replace("1 INVITE", "1 ACK");
            assert_eq!(
                decide(ack.as_bytes(), t, HashKey::DEFAULT),
                Decision::Drop(DropReason::NoBackend)
            );
            let resp = "SIP/2.0 180 Ringing\r\nCall-ID: abc@x\r\n\r\n";
            assert_eq!(
                decide(resp.as_bytes(), t, HashKey::DEFAULT),
                Decision::Drop(DropReason::NoBackend)
            );
        }
    }

    /// An affinity map in memory.
    #[derive(Default)]
    struct MemStore {
        entries: HashMap<(u64, u32), AffinityEntry>,
        flags: HashMap<u32, BackendFlags>,
        backends: HashMap<u32, SocketAddr>,
    }

    impl AffinityStore for MemStore {
        fn service(&self) -> u32 {
            3
        }
        fn entry(&self, key: &AffinityKey) -> Option<AffinityEntry> {
            self.entries.get(&(key.hash, key.service)).copied()
        }
        fn flags(&self, id: u32) -> BackendFlags {
            self.flags.get(&id).copied().unwrap_or_default()
        }
        fn backend(&self, id: u32) -> Option<SocketAddr> {
            self.backends.get(&id).copied()
        }
        fn write(&mut self, key: &AffinityKey, entry: &AffinityEntry, create: bool) {
            let k = (key.hash, key.service);
            if create != self.entries.contains_key(&k) {
                self.entries.insert(k, *entry);
            }
        }
    }

    fn installed(addrs: &[&str], ids: &[u32]) -> InstalledTable {
        let members: Vec<Weighted> = addrs
            .iter()
            .map(|a| Weighted {
                backend: Backend::from_socket_addr(a.parse().unwrap()),
                weight: 1,
            })
            .collect();
        InstalledTable {
            table: build_table(&members, HashKey::DEFAULT).unwrap(),
            ids: ids.to_vec(),
        }
    }

    #[test]
    fn with_affinity_a_call_keeps_its_backend_across_a_table_change() {
        use sip_dispatch_common::{AFF_BYE, BF_AFFINITY, BF_NEW, BF_UP};
        let first = installed(&["198.18.0.21:5060"], &[7]);
        let second = installed(&["198.18.0.22:5060"], &[8]);
        let mut store = MemStore::default();
        store
            .backends
            .insert(7, "198.18.0.21:5060".parse().unwrap());
        store
            .backends
            .insert(8, "198.18.0.22:5060".parse().unwrap());
        let all = BF_AFFINITY | BF_UP | BF_NEW;
        store.flags.insert(
            7,
            BackendFlags {
                generation: 4,
                flags: all,
            },
        );
        store.flags.insert(
            8,
            BackendFlags {
                generation: 0,
                flags: all,
            },
        );
        let k = HashKey::DEFAULT;
        let invite = INVITE.as_bytes();
        let bye = INVITE
            .replace("INVITE sip", "BYE sip")
            .replace("<sip:svc@198.18.0.100>", "<sip:svc@198.18.0.100>;tag=9");
        let hash = scan_message(invite, k).hash;

        // A BYE of an unknown call goes by the table and creates nothing.
        let (d, o) = decide_with_affinity(bye.as_bytes(), Some(&first), k, &mut store, 100);
        assert_eq!(d, Decision::Forward("198.18.0.21:5060".parse().unwrap()));
        assert_eq!(o, AffinityOutcome::default());
        assert!(store.entries.is_empty());

        let (d, o) = decide_with_affinity(invite, Some(&first), k, &mut store, 100);
        assert_eq!(d, Decision::Forward("198.18.0.21:5060".parse().unwrap()));
        assert!(o.written && !o.followed);
        let e = store.entries[&(hash, 3)];
        assert_eq!((e.backend, e.generation, e.last_seen_ns), (7, 4, 100));

        // The table moves the call's slot; its BYE stays, and is recorded.
        let now = 100 + 2_000_000_000;
        let (d, o) = decide_with_affinity(bye.as_bytes(), Some(&second), k, &mut store, now);
        assert_eq!(d, Decision::Forward("198.18.0.21:5060".parse().unwrap()));
        assert!(o.followed);
        let e = store.entries[&(hash, 3)];
        assert_eq!((e.flags & AFF_BYE, e.last_seen_ns), (AFF_BYE, now));

        // Disabled: the next message goes by the table and takes the entry along.
        store.flags.insert(
            7,
            BackendFlags {
                generation: 4,
                flags: 0,
            },
        );
        let (d, o) = decide_with_affinity(bye.as_bytes(), Some(&second), k, &mut store, now);
        assert_eq!(d, Decision::Forward("198.18.0.22:5060".parse().unwrap()));
        assert!(o.written && !o.followed);
        assert_eq!(store.entries[&(hash, 3)].backend, 8);

        // No table and no valid entry: a request gets a 503, as without affinity.
        store.entries.clear();
        let (d, _) = decide_with_affinity(invite, None, k, &mut store, now);
        assert_eq!(d, Decision::Reject);
    }

    #[test]
    fn non_sip_and_call_id_less_messages_are_dropped() {
        let t = table();
        let stun = [
            0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ];
        for msg in [
            &stun[..],
            b"\r\n\r\n",
            b"",
            b"\x00\xff garbage",
            b"hello world",
        ] {
            assert_eq!(
                decide(msg, Some(&t), HashKey::DEFAULT),
                Decision::Drop(DropReason::NotSip),
                "{msg:?}"
            );
        }
        let no_id = "OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\n";
        assert_eq!(
            decide(no_id.as_bytes(), Some(&t), HashKey::DEFAULT),
            Decision::Drop(DropReason::NoCallId)
        );
    }

    #[test]
    fn per_backend_counts_read_like_the_fast_path_and_stay_bounded() {
        let c = Counters::default();
        let b4: SocketAddr = "198.18.0.21:5060".parse().unwrap();
        let b6: SocketAddr = "[2001:db8::21]:5060".parse().unwrap();
        c.count_forwarded(b4, 3000);
        c.count_forwarded(b4, 100);
        c.count_forwarded(b6, 100);
        assert_eq!(
            c.forwarded_to(b4),
            Forwarded {
                packets: 2,
                bytes: (14 + 20 + 8) * 2 + 3100
            }
        );
        assert_eq!(c.forwarded_to(b6).bytes, 14 + 40 + 8 + 100);
        c.retain_backends(&[b6].into_iter().collect());
        assert_eq!(c.forwarded_to(b4), Forwarded::default());
        for i in 0..(MAX_COUNTED_BACKENDS as u32 + 10) {
            c.count_forwarded(SocketAddr::from((i.to_be_bytes(), 5060)), 1);
        }
        let counted = c.per_backend.lock().unwrap().len();
        assert_eq!(counted, MAX_COUNTED_BACKENDS);
    }

    #[test]
    fn the_503_cap_follows_a_smaller_mtu() {
        assert_eq!(cap_for_mtu(1500, false), 1472);
        assert_eq!(cap_for_mtu(9000, false), MAX_503_V4);
        assert_eq!(cap_for_mtu(1000, false), 972);
        assert_eq!(cap_for_mtu(1280, true), 1232);
        assert_eq!(cap_for_mtu(1500, true), MAX_503_V6);
        assert_eq!(cap_for_mtu(1100, true), 1052);
        assert_eq!(cap_for_mtu(20, false), 0);
        assert_eq!(cap_for_mtu(u32::MAX, true), MAX_503_V6);
    }

    #[test]
    fn the_503_cap_reads_the_interface_and_falls_back_to_the_fixed_one() {
        // lo's MTU (65536 by default) is above the fixed caps.
        let lo = interface_mtu("lo").unwrap();
        assert!(lo >= 1500, "{lo}");
        assert_eq!(max_503_len("lo", false), MAX_503_V4);
        for bad in ["no-such-if0", "", "..", "../../etc/passwd"] {
            assert!(interface_mtu(bad).is_err(), "{bad:?}");
            assert_eq!(max_503_len(bad, false), MAX_503_V4, "{bad:?}");
            assert_eq!(max_503_len(bad, true), MAX_503_V6, "{bad:?}");
        }
    }

    #[test]
    fn rate_limits_per_source_and_in_total() {
        let now = Instant::now();
        let mut l = RateLimiter::new(5.0, 20.0);
        let a: IpAddr = "198.18.0.10".parse().unwrap();
        let allowed = (0..100).filter(|_| l.allow(a, now)).count();
        assert_eq!(allowed, 10, "the burst of one source");
        assert!(
            l.allow(a, now + std::time::Duration::from_secs(1)),
            "refills at its rate"
        );
        // Many sources: the total bucket (burst 40, 1 already used above... 11) caps them.
        let total = (0..1000u32)
            .filter(|i| {
                l.allow(
                    IpAddr::from([198, 18, 1, (i % 250) as u8]),
                    now + std::time::Duration::from_secs(1),
                )
            })
            .count();
        assert!(total <= 40, "{total}");
    }
}
