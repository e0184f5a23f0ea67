//! The fast path's next-hop cache (`sd_nexthop_v1`): per backend id, the egress
//! interface, MACs, MTU and whether the backend is on the link, as the kernel's routing
//! and neighbour tables say, so that the XDP program needs no `bpf_fib_lookup` per
//! packet.
//!
//! A follower thread resolves each backend with rtnetlink (`RTM_GETROUTE` to the
//! backend, the interfaces' addresses and MTUs, the neighbour table) and writes the
//! entries. It listens to the kernel's neighbour, route and link notifications: an
//! entry a change may concern is made invalid at once (the fast path then asks the FIB,
//! never uses a stale MAC), then everything is resolved again. It resolves again every
//! [`RESYNC`] anyway. A backend without a usable neighbour entry has no valid entry: the
//! FIB lookup and the stack resolve it (the health checks keep neighbours fresh).
//!
//! The route is looked up as the host's own output route to the backend (no source
//! address, no incoming interface), which is what the fast path's FIB lookup finds only
//! while no routing rule selects by anything else than the destination. So while the
//! host has such a rule (by source, incoming or outgoing interface, mark, a VRF's l3mdev
//! rule, TOS, protocol or ports, ...), no entry is valid and every packet asks the FIB.
//!
//! The thread runs in the daemon's network namespace, the one of `--iface`.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

mod dump;
mod entry;
mod follower;
mod wire;

pub use dump::Resolver;
pub use entry::{Writer, concerns, entry_for, steps};
pub use follower::{Follower, follow};
pub use wire::{
    Event, GROUPS, NeighbourChange, RouteAnswer, events, link, link_dump_request, neighbour_event,
    parse_route, route, route_request, rule_dump_request, selective_rule,
};

/// How often every entry is resolved again without a notification.
pub const RESYNC: Duration = Duration::from_secs(3);

/// The backend ids the cache keeps entries for, and their addresses. The dataplane
/// changes it as ids are allocated and freed (and writes such an id's entry invalid
/// under the lock); the follower writes a valid entry only under the lock, for an id
/// that still has the address it resolved.
#[derive(Clone, Default)]
pub struct Targets(Arc<Mutex<BTreeMap<u32, IpAddr>>>);

impl Targets {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, IpAddr>> {
        // A panic elsewhere while holding it left a plain map: still usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A route as `RTM_GETROUTE` answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub oif: u32,
    pub gateway: Option<IpAddr>,
    /// The route's MTU metric, if set.
    pub mtu: Option<u32>,
}

/// What the cache needs of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Its IPv6 MTU (`net.ipv6.conf.IFACE.mtu`), when the kernel says.
    pub mtu6: Option<u32>,
    pub up: bool,
}

#[cfg(test)]
mod tests;
