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
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use anyhow::Context as _;
use sip_dispatch_common::{
    HashKey,
    sip::{NoAnswer, service_unavailable},
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::UdpSocket, sync::watch};

use crate::{
    cli::ForwardingMode,
    forwarder::{Forwarder, SendError},
};

mod counters;
mod decide;
mod reject;

use counters::bump;
pub use counters::{Counters, CountersSnapshot, Forwarded};
pub use decide::{
    AffinityOutcome, AffinityStore, Decision, DropReason, InstalledTable, decide,
    decide_with_affinity, monotonic_ns,
};
pub use reject::{MAX_503_V4, MAX_503_V6, RateLimiter, cap_for_mtu, max_503_len};

/// Seconds a client is told to wait when no backend is available.
pub const RETRY_AFTER_SECS: u32 = 5;
/// Datagrams handled per wakeup before the slow path yields to the other tasks.
pub const BATCH: usize = 64;

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
mod tests;
