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
    collections::{BTreeMap, HashMap},
    io,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Array, MapData};
use sip_dispatch_common::{MAX_BACKENDS, NH_ON_LINK, NH_VALID, NextHop};

use crate::{
    neighbours,
    netlink::{
        NDA_DST, NDA_LLADDR, NLMSG_DONE, NLMSG_ERROR, NUD_USABLE, NeighbourMessage, Socket,
        attribute, attributes, bad, ip_of, message, messages, u16_at, u32_at,
    },
};

/// How often every entry is resolved again without a notification.
pub const RESYNC: Duration = Duration::from_secs(3);

const RTMSG_LEN: usize = 12;
const IFINFOMSG_LEN: usize = 16;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_METRICS: u16 = 8;
const RTA_VIA: u16 = 18;
const RTAX_MTU: u16 = 2;
const IFLA_ADDRESS: u16 = 1;
const IFLA_MTU: u16 = 4;
const IFLA_AF_SPEC: u16 = 26;
const IFLA_INET6_CONF: u16 = 2;
/// Index of the IPv6 MTU in `IFLA_INET6_CONF` (linux/ipv6.h, `DEVCONF_MTU6`).
const DEVCONF_MTU6: usize = 2;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 1;
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_IPV6_RULE: u32 = 19;
/// `struct fib_rule_hdr`: family, dst_len, src_len, tos, table, res1, res2, action, flags.
const FIB_RULE_HDR_LEN: usize = 12;
/// The rule attributes that select nothing the cache's route lookup does not share with
/// the packet's (linux/fib_rules.h): FRA_DST, FRA_GOTO, FRA_PRIORITY,
/// FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN, FRA_TABLE, FRA_PAD, FRA_PROTOCOL.
const NEUTRAL_RULE_ATTRS: [u16; 8] = [1, 4, 6, 13, 14, 15, 18, 21];
/// The rtnetlink multicast groups followed, as `nl_groups` bits (group n is bit n - 1).
pub const GROUPS: u32 = 1 << (RTNLGRP_LINK - 1)
    | 1 << (RTNLGRP_NEIGH - 1)
    | 1 << (RTNLGRP_IPV4_ROUTE - 1)
    | 1 << (RTNLGRP_IPV6_ROUTE - 1)
    | 1 << (RTNLGRP_IPV4_RULE - 1)
    | 1 << (RTNLGRP_IPV6_RULE - 1);

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

/// `RTM_GETROUTE` for the route to `dst` (no source, no incoming interface).
pub fn route_request(seq: u32, dst: IpAddr) -> Vec<u8> {
    let (family, bits, addr): (i32, u8, Vec<u8>) = match dst {
        IpAddr::V4(a) => (libc::AF_INET, 32, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6, 128, a.octets().to_vec()),
    };
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
    let mut body = vec![family as u8, bits, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&0u32.to_ne_bytes());
    body.extend(attribute(RTA_DST, &addr));
    message(libc::RTM_GETROUTE, libc::NLM_F_REQUEST as u16, seq, &body)
}

/// `RTM_GETLINK` dump of every interface.
pub fn link_dump_request(seq: u32) -> Vec<u8> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    message(libc::RTM_GETLINK, flags, seq, &[0; IFINFOMSG_LEN])
}

/// `RTM_GETRULE` dump of the routing rules of both families.
pub fn rule_dump_request(seq: u32) -> Vec<u8> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    message(libc::RTM_GETRULE, flags, seq, &[0; FIB_RULE_HDR_LEN])
}

/// What in a routing rule (an `RTM_NEWRULE` body) selects by more than the destination,
/// if anything: then the fast path's FIB lookup may find another route than the cache.
pub fn selective_rule(body: &[u8]) -> io::Result<Option<String>> {
    let hdr = body
        .get(..FIB_RULE_HDR_LEN)
        .ok_or_else(|| bad("truncated fib_rule_hdr"))?;
    let (src_len, tos) = (hdr[2], hdr[3]);
    if src_len != 0 {
        return Ok(Some("a rule selects by source address".into()));
    }
    if tos != 0 {
        return Ok(Some("a rule selects by TOS".into()));
    }
    for (kind, _) in attributes(body, FIB_RULE_HDR_LEN)? {
        if !NEUTRAL_RULE_ATTRS.contains(&kind) {
            let what = match kind {
                3 => "incoming interface",
                10 | 16 => "firewall mark",
                17 => "outgoing interface",
                19 => "l3mdev (a VRF)",
                20 => "UID",
                22..=24 => "IP protocol or ports",
                _ => "an attribute the cache cannot follow",
            };
            return Ok(Some(format!("a rule selects by {what} (attribute {kind})")));
        }
    }
    Ok(None)
}

/// What a buffer holds of the answer to a [`route_request`].
#[derive(Debug, PartialEq, Eq)]
pub enum RouteAnswer {
    Route(Route),
    /// No unicast route: an error answer (ENETUNREACH), or a local, blackhole or
    /// unreachable route.
    NoRoute,
    /// Only messages of other requests.
    Elsewhere,
}

/// The answer to route request `seq` in `buf`.
pub fn parse_route(buf: &[u8], seq: u32) -> io::Result<RouteAnswer> {
    for m in messages(buf)? {
        if m.seq != seq {
            continue;
        }
        match m.kind {
            NLMSG_ERROR => {
                let errno = u32_at(m.body, 0).ok_or_else(|| bad("truncated error"))? as i32;
                if errno != 0 {
                    return Ok(RouteAnswer::NoRoute);
                }
            }
            libc::RTM_NEWROUTE => {
                return Ok(route(m.body)?.map_or(RouteAnswer::NoRoute, RouteAnswer::Route));
            }
            _ => {}
        }
    }
    Ok(RouteAnswer::Elsewhere)
}

/// One `RTM_NEWROUTE` body: None unless a unicast route with an output interface.
pub fn route(body: &[u8]) -> io::Result<Option<Route>> {
    if body.len() < RTMSG_LEN {
        return Err(bad("truncated rtmsg"));
    }
    let family = body[0];
    if body[7] != RTN_UNICAST {
        return Ok(None);
    }
    let (mut oif, mut gateway, mut mtu) = (None, None, None);
    for (kind, value) in attributes(body, RTMSG_LEN)? {
        match kind {
            RTA_OIF => oif = u32_at(value, 0),
            RTA_GATEWAY => gateway = ip_of(family, value),
            // struct rtvia: family (u16), address.
            RTA_VIA if value.len() >= 2 => {
                let via = u16_at(value, 0).unwrap_or(0);
                gateway = u8::try_from(via).ok().and_then(|f| ip_of(f, &value[2..]));
                if gateway.is_none() {
                    return Ok(None);
                }
            }
            RTA_METRICS => {
                for (metric, v) in attributes(value, 0)? {
                    if metric == RTAX_MTU {
                        mtu = u32_at(v, 0).filter(|&m| m > 0);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(oif
        .filter(|&i| i > 0)
        .map(|oif| Route { oif, gateway, mtu }))
}

/// One `RTM_NEWLINK` body: the index and, when it has a 6-byte address and an MTU, the
/// link.
pub fn link(body: &[u8]) -> io::Result<(u32, Option<Link>)> {
    if body.len() < IFINFOMSG_LEN {
        return Err(bad("truncated ifinfomsg"));
    }
    let index = u32_at(body, 4).ok_or_else(|| bad("truncated ifinfomsg"))?;
    let flags = u32_at(body, 8).ok_or_else(|| bad("truncated ifinfomsg"))?;
    let (mut mac, mut mtu, mut mtu6) = (None, None, None);
    for (kind, value) in attributes(body, IFINFOMSG_LEN)? {
        match kind {
            IFLA_ADDRESS => mac = <[u8; 6]>::try_from(value).ok(),
            IFLA_MTU => mtu = u32_at(value, 0),
            IFLA_AF_SPEC => {
                for (family, spec) in attributes(value, 0)? {
                    if i32::from(family) != libc::AF_INET6 {
                        continue;
                    }
                    for (k, conf) in attributes(spec, 0)? {
                        if k == IFLA_INET6_CONF {
                            mtu6 = u32_at(conf, DEVCONF_MTU6 * 4).filter(|&m| m > 0);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let link = match (mac, mtu) {
        (Some(mac), Some(mtu)) => Some(Link {
            mac,
            mtu,
            mtu6,
            up: flags & IFF_UP != 0,
        }),
        _ => None,
    };
    Ok((index, link))
}

/// A neighbour notification's interface, address and usable link-layer address.
pub type NeighbourChange = (u32, IpAddr, Option<[u8; 6]>);

/// A neighbour notification: interface, address, and the link-layer address if the
/// entry is usable (None: not usable, or deleted).
pub fn neighbour_event(kind: u16, body: &[u8]) -> io::Result<Option<NeighbourChange>> {
    let m = NeighbourMessage::parse(body)?;
    let (mut addr, mut mac) = (None, None);
    for (k, value) in m.attributes {
        match k {
            NDA_DST => addr = ip_of(m.family, value),
            NDA_LLADDR => mac = <[u8; 6]>::try_from(value).ok(),
            _ => {}
        }
    }
    let usable = kind == libc::RTM_NEWNEIGH && m.state & NUD_USABLE != 0;
    Ok(addr.map(|a| (m.ifindex, a, mac.filter(|_| usable))))
}

/// What a notification may change.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A neighbour entry: interface, address, usable link-layer address (None: gone or
    /// not usable).
    Neighbour(u32, IpAddr, Option<[u8; 6]>),
    /// An interface changed (index, what it is now; None: gone or without an address).
    Link(u32, Option<Link>),
    /// A route was added or removed.
    Route,
}

/// The events of a buffer of notifications; messages of other kinds are skipped.
pub fn events(buf: &[u8]) -> io::Result<Vec<Event>> {
    let mut out = Vec::new();
    for m in messages(buf)? {
        match m.kind {
            libc::RTM_NEWNEIGH | libc::RTM_DELNEIGH => {
                if let Some((i, a, mac)) = neighbour_event(m.kind, m.body)? {
                    out.push(Event::Neighbour(i, a, mac));
                }
            }
            libc::RTM_NEWLINK => {
                let (i, l) = link(m.body)?;
                out.push(Event::Link(i, l));
            }
            libc::RTM_DELLINK => out.push(Event::Link(link(m.body)?.0, None)),
            // A rule may change every route: as a route change.
            libc::RTM_NEWROUTE | libc::RTM_DELROUTE | libc::RTM_NEWRULE | libc::RTM_DELRULE => {
                out.push(Event::Route)
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The entry for a backend, from its route, the interfaces and the usable neighbours
/// (by interface and address); None when something is missing (no valid entry).
pub fn entry_for(
    backend: IpAddr,
    route: Option<Route>,
    links: &HashMap<u32, Link>,
    neighbours: &HashMap<(u32, IpAddr), [u8; 6]>,
) -> Option<NextHop> {
    let route = route?;
    let link = links.get(&route.oif).filter(|l| l.up)?;
    let hop = route.gateway.unwrap_or(backend);
    let dmac = *neighbours.get(&(route.oif, hop))?;
    Some(NextHop {
        ifindex: route.oif,
        mtu: route.mtu.unwrap_or(match backend {
            IpAddr::V4(_) => link.mtu,
            IpAddr::V6(_) => link.mtu6.unwrap_or(link.mtu),
        }),
        dmac,
        smac: link.mac,
        generation: 0,
        flags: NH_VALID
            | if route.gateway.is_none() {
                NH_ON_LINK
            } else {
                0
            },
    })
}

/// Whether a notification may make `entry` (valid, for next-hop address `hop`) wrong.
pub fn concerns(event: &Event, entry: &NextHop, hop: IpAddr) -> bool {
    match event {
        Event::Route => true,
        Event::Link(index, link) => {
            // (An entry with a route MTU differs from the link's: such entries are made
            // invalid by any change of their interface, and resolved again at once.)
            *index == entry.ifindex
                && link.is_none_or(|l| {
                    !l.up
                        || l.mac != entry.smac
                        || (l.mtu != entry.mtu && l.mtu6 != Some(entry.mtu))
                })
        }
        Event::Neighbour(index, addr, mac) => {
            *index == entry.ifindex && *addr == hop && *mac != Some(entry.dmac)
        }
    }
}

/// Same data and flags (the generation aside).
fn same(a: &NextHop, b: &NextHop) -> bool {
    NextHop {
        generation: 0,
        ..*a
    } == NextHop {
        generation: 0,
        ..*b
    }
}

/// Reads the kernel's routes, interfaces and neighbours.
pub struct Resolver {
    sock: Socket,
    neighbours: neighbours::Netlink,
    seq: u32,
    buf: Vec<u8>,
}

impl Resolver {
    pub fn new() -> io::Result<Resolver> {
        Ok(Resolver {
            sock: Socket::open(0, Duration::from_secs(1))?,
            neighbours: neighbours::Netlink::open()?,
            seq: 0,
            // Larger than any dump message the kernel builds (it sizes them to fit
            // the largest link's attributes): a cut datagram would not parse.
            buf: vec![0; 1 << 20],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub fn route(&mut self, dst: IpAddr) -> io::Result<Option<Route>> {
        let seq = self.next_seq();
        self.sock.send(&route_request(seq, dst))?;
        // Bounded: answers to earlier, abandoned requests are skipped.
        for _ in 0..100 {
            let n = self.sock.recv(&mut self.buf, 0)?;
            match parse_route(&self.buf[..n], seq)? {
                RouteAnswer::Route(r) => return Ok(Some(r)),
                RouteAnswer::NoRoute => return Ok(None),
                RouteAnswer::Elsewhere => {}
            }
        }
        Err(bad("the route request got no answer"))
    }

    /// Sends dump `request` (sequence `seq`) and hands each answer message's kind and
    /// body to `each`, up to the end of the dump.
    fn dump(
        &mut self,
        request: &[u8],
        seq: u32,
        mut each: impl FnMut(u16, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.sock.send(request)?;
        for _ in 0..10_000 {
            let n = self.sock.recv(&mut self.buf, 0)?;
            for m in messages(&self.buf[..n])? {
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = u32_at(m.body, 0).unwrap_or(0) as i32;
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(errno.saturating_neg()));
                        }
                    }
                    kind => each(kind, m.body)?,
                }
            }
        }
        Err(bad("a dump did not end"))
    }

    pub fn links(&mut self) -> io::Result<HashMap<u32, Link>> {
        let seq = self.next_seq();
        let mut out = HashMap::new();
        self.dump(&link_dump_request(seq), seq, |kind, body| {
            if kind == libc::RTM_NEWLINK
                && let (index, Some(l)) = link(body)?
            {
                out.insert(index, l);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The first routing rule that selects by more than the destination, described.
    pub fn selective_rule(&mut self) -> io::Result<Option<String>> {
        let seq = self.next_seq();
        let mut found = None;
        self.dump(&rule_dump_request(seq), seq, |kind, body| {
            if kind == libc::RTM_NEWRULE && found.is_none() {
                found = selective_rule(body)?;
            }
            Ok(())
        })?;
        Ok(found)
    }

    pub fn neighbours(&mut self) -> io::Result<HashMap<(u32, IpAddr), [u8; 6]>> {
        Ok(self
            .neighbours
            .dump()?
            .into_iter()
            .map(|n| ((n.ifindex, n.addr), n.mac))
            .collect())
    }

    /// The entries (None: no valid one) and next-hop addresses (gateway or backend) for
    /// `targets`, from one reading of the tables.
    pub fn resolve(
        &mut self,
        targets: &BTreeMap<u32, IpAddr>,
    ) -> io::Result<BTreeMap<u32, (Option<NextHop>, IpAddr)>> {
        let links = self.links()?;
        let neighbours = self.neighbours()?;
        let mut out = BTreeMap::new();
        for (&id, &addr) in targets {
            let route = self.route(addr)?;
            let hop = route.and_then(|r| r.gateway).unwrap_or(addr);
            out.insert(id, (entry_for(addr, route, &links, &neighbours), hop));
        }
        Ok(out)
    }
}

/// Writes entries in the order that keeps a reader from seeing a mix (see `NextHop`).
pub struct Writer {
    map: Array<MapData, NextHop>,
}

impl Writer {
    pub fn new(map: MapData) -> anyhow::Result<Writer> {
        Ok(Writer {
            map: Array::try_from(aya::maps::Map::Array(map))
                .context("the next-hop map is not an array of NextHop")?,
        })
    }

    pub fn get(&self, id: u32) -> anyhow::Result<NextHop> {
        self.map
            .get(&id, 0)
            .with_context(|| format!("reading the next hop of backend {id}"))
    }

    fn put(&mut self, id: u32, e: NextHop) -> anyhow::Result<()> {
        self.map
            .set(id, e, 0)
            .with_context(|| format!("writing the next hop of backend {id}"))
    }

    /// Clears the valid bit (the data stays); nothing if it is clear.
    pub fn invalidate(&mut self, id: u32) -> anyhow::Result<()> {
        let e = self.get(id)?;
        if e.flags & NH_VALID != 0 {
            self.put(
                id,
                NextHop {
                    flags: e.flags & !NH_VALID,
                    ..e
                },
            )?;
        }
        Ok(())
    }

    /// Makes the entry `want` (None: invalid) by [`steps`]; whether it changed.
    pub fn set(&mut self, id: u32, want: Option<NextHop>) -> anyhow::Result<bool> {
        let writes = steps(self.get(id)?, want);
        for &w in &writes {
            self.put(id, w)?;
        }
        Ok(!writes.is_empty())
    }
}

/// The writes that turn entry `now` into `want` (None: invalid), each changing either
/// the data or only the valid bit: the bit cleared, the new data written with the bit
/// clear (generation bumped), the bit set. None when it already is `want`.
pub fn steps(now: NextHop, want: Option<NextHop>) -> Vec<NextHop> {
    let mut out = Vec::new();
    let valid = now.flags & NH_VALID != 0;
    if valid && want.is_some_and(|w| same(&now, &w)) {
        return out;
    }
    let cleared = NextHop {
        flags: now.flags & !NH_VALID,
        ..now
    };
    if valid {
        out.push(cleared);
    }
    if let Some(want) = want {
        let data = NextHop {
            generation: now.generation.wrapping_add(1),
            flags: want.flags & !NH_VALID,
            ..want
        };
        if data != cleared {
            out.push(data);
        }
        out.push(NextHop {
            flags: want.flags,
            ..data
        });
    }
    out
}

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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::netlink::{NLMSG_HDRLEN, RTA_HDRLEN, attribute as attr, ndmsg};
    use std::net::Ipv6Addr;

    fn nlmsg(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        message(kind, 0, seq, body)
    }

    fn rtmsg(family: i32, kind: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![family as u8, 32, 0, 0, 254, 0, 0, kind, 0, 0, 0, 0];
        for a in attrs {
            b.extend_from_slice(a);
        }
        b
    }

    #[test]
    fn rules_that_select_by_more_than_the_destination_are_told_apart() {
        let rule = |src_len: u8, tos: u8, attrs: &[Vec<u8>]| {
            let mut b = vec![
                libc::AF_INET as u8,
                0,
                src_len,
                tos,
                254,
                0,
                0,
                1,
                0,
                0,
                0,
                0,
            ];
            for a in attrs {
                b.extend_from_slice(a);
            }
            b
        };
        let table = attr(15, &254u32.to_ne_bytes());
        let prio = attr(6, &32766u32.to_ne_bytes());
        let proto = attr(21, &[2]);
        // `from all lookup main`, and `to 198.18.0.0/15 lookup main`: neutral.
        let dst = attr(1, &[198, 18, 0, 0]);
        assert_eq!(
            selective_rule(&rule(0, 0, &[table.clone(), prio.clone(), proto])).unwrap(),
            None
        );
        assert_eq!(
            selective_rule(&rule(0, 0, &[table.clone(), dst])).unwrap(),
            None
        );
        // By source, TOS, incoming interface, mark, a VRF's l3mdev: selective.
        let src = attr(2, &[198, 18, 0, 0]);
        assert!(
            selective_rule(&rule(15, 0, &[src, table.clone()]))
                .unwrap()
                .is_some()
        );
        assert!(
            selective_rule(&rule(0, 0x10, std::slice::from_ref(&table)))
                .unwrap()
                .is_some()
        );
        for (kind, value) in [
            (3u16, &b"eth1\0"[..]),
            (10, &[1, 0, 0, 0][..]),
            (19, &[1][..]),
        ] {
            let why = selective_rule(&rule(0, 0, &[prio.clone(), attr(kind, value)])).unwrap();
            assert!(
                why.is_some_and(|w| w.contains(&kind.to_string())),
                "attribute {kind}"
            );
        }
        // Bad data is an error, never a panic.
        assert!(selective_rule(&[0; 4]).is_err());
        assert!(selective_rule(&rule(0, 0, &[vec![200, 0, 15, 0]])).is_err());
        let m = rule_dump_request(3);
        assert_eq!(u16_at(&m, 4), Some(libc::RTM_GETRULE));
        assert_eq!(m.len(), NLMSG_HDRLEN + FIB_RULE_HDR_LEN);
    }

    #[test]
    fn route_request_asks_for_the_host_route_to_the_backend() {
        let m = route_request(7, "198.18.1.21".parse().unwrap());
        assert_eq!(u32_at(&m, 0), Some(m.len() as u32));
        assert_eq!(u16_at(&m, 4), Some(libc::RTM_GETROUTE));
        assert_eq!(u16_at(&m, 6), Some(libc::NLM_F_REQUEST as u16));
        assert_eq!(u32_at(&m, 8), Some(7));
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], 32, "dst_len");
        let attrs = attributes(&m[NLMSG_HDRLEN..], RTMSG_LEN).unwrap();
        assert_eq!(attrs, vec![(RTA_DST, &[198, 18, 1, 21][..])]);
        let m6 = route_request(8, "2001:db8::5".parse().unwrap());
        assert_eq!((m6[16], m6[17]), (libc::AF_INET6 as u8, 128));
        assert_eq!(m6.len(), NLMSG_HDRLEN + RTMSG_LEN + RTA_HDRLEN + 16);
    }

    #[test]
    fn link_dump_request_is_a_dump() {
        let m = link_dump_request(3);
        assert_eq!(m.len(), NLMSG_HDRLEN + IFINFOMSG_LEN);
        assert_eq!(u16_at(&m, 4), Some(libc::RTM_GETLINK));
        assert_eq!(
            u16_at(&m, 6),
            Some((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16)
        );
    }

    #[test]
    fn a_route_answer_gives_interface_gateway_and_mtu() {
        let metrics = attr(RTA_METRICS, &attr(RTAX_MTU, &1400u32.to_ne_bytes()));
        let body = rtmsg(
            libc::AF_INET,
            RTN_UNICAST,
            &[
                attr(RTA_DST, &[198, 18, 7, 7]),
                attr(RTA_OIF, &5u32.to_ne_bytes()),
                attr(RTA_GATEWAY, &[198, 18, 1, 21]),
                metrics,
            ],
        );
        let buf = nlmsg(libc::RTM_NEWROUTE, 9, &body);
        assert_eq!(
            parse_route(&buf, 9).unwrap(),
            RouteAnswer::Route(Route {
                oif: 5,
                gateway: Some("198.18.1.21".parse().unwrap()),
                mtu: Some(1400)
            })
        );
        // On the link, no metric.
        let body = rtmsg(
            libc::AF_INET6,
            RTN_UNICAST,
            &[attr(RTA_OIF, &2u32.to_ne_bytes())],
        );
        assert_eq!(
            parse_route(&nlmsg(libc::RTM_NEWROUTE, 1, &body), 1).unwrap(),
            RouteAnswer::Route(Route {
                oif: 2,
                gateway: None,
                mtu: None
            })
        );
        // An IPv4 route via an IPv6 next hop (RTA_VIA).
        let mut via = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        via.extend_from_slice(&"fe80::1".parse::<Ipv6Addr>().unwrap().octets());
        let body = rtmsg(
            libc::AF_INET,
            RTN_UNICAST,
            &[attr(RTA_OIF, &2u32.to_ne_bytes()), attr(RTA_VIA, &via)],
        );
        let r = route(&body).unwrap().unwrap();
        assert_eq!(r.gateway, Some("fe80::1".parse().unwrap()));
    }

    #[test]
    fn no_usable_route_is_none_and_bad_data_an_error() {
        // ENETUNREACH as the kernel answers it.
        let mut err = (-libc::ENETUNREACH).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0; 16]);
        assert_eq!(
            parse_route(&nlmsg(libc::NLMSG_ERROR as u16, 4, &err), 4).unwrap(),
            RouteAnswer::NoRoute
        );
        // A local route (RTN_LOCAL) is not a next hop.
        let body = rtmsg(libc::AF_INET, 2, &[attr(RTA_OIF, &1u32.to_ne_bytes())]);
        assert_eq!(route(&body).unwrap(), None);
        // No output interface.
        assert_eq!(
            route(&rtmsg(libc::AF_INET, RTN_UNICAST, &[])).unwrap(),
            None
        );
        // Answers to another request are not this one's.
        let body = rtmsg(
            libc::AF_INET,
            RTN_UNICAST,
            &[attr(RTA_OIF, &1u32.to_ne_bytes())],
        );
        assert_eq!(
            parse_route(&nlmsg(libc::RTM_NEWROUTE, 1, &body), 2).unwrap(),
            RouteAnswer::Elsewhere
        );
        // Truncated and inconsistent lengths: errors, no panic.
        let good = nlmsg(libc::RTM_NEWROUTE, 1, &body);
        for cut in 0..good.len() {
            let _ = parse_route(&good[..cut], 1);
            let _ = events(&good[..cut]);
        }
        let mut long = good.clone();
        long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_route(&long, 1).is_err());
        let mut attr_long = good.clone();
        // The RTA_OIF attribute claims more than its message holds.
        attr_long[NLMSG_HDRLEN + RTMSG_LEN..NLMSG_HDRLEN + RTMSG_LEN + 2]
            .copy_from_slice(&500u16.to_ne_bytes());
        assert!(parse_route(&attr_long, 1).is_err());
        assert!(route(&[0; 5]).is_err());
    }

    fn ifinfo(index: u32, flags: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![0, 0, 1, 0];
        b.extend_from_slice(&index.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        for a in attrs {
            b.extend_from_slice(a);
        }
        b
    }

    const MAC: [u8; 6] = [2, 0, 0, 0, 1, 21];
    const NEW_MAC: [u8; 6] = [2, 0, 0, 0, 2, 21];

    #[test]
    fn notifications_become_events() {
        let mut buf = nlmsg(
            libc::RTM_NEWNEIGH,
            0,
            &ndmsg(
                libc::AF_INET,
                3,
                0x02,
                &[attr(NDA_DST, &[198, 18, 1, 21]), attr(NDA_LLADDR, &NEW_MAC)],
            ),
        );
        // FAILED (0x20): not usable.
        buf.extend(nlmsg(
            libc::RTM_NEWNEIGH,
            0,
            &ndmsg(
                libc::AF_INET,
                3,
                0x20,
                &[attr(NDA_DST, &[198, 18, 1, 22]), attr(NDA_LLADDR, &MAC)],
            ),
        ));
        buf.extend(nlmsg(
            libc::RTM_DELNEIGH,
            0,
            &ndmsg(
                libc::AF_INET6,
                3,
                0x02,
                &[attr(
                    NDA_DST,
                    &"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
                )],
            ),
        ));
        buf.extend(nlmsg(
            libc::RTM_NEWLINK,
            0,
            &ifinfo(
                3,
                IFF_UP,
                &[
                    attr(IFLA_ADDRESS, &MAC),
                    attr(IFLA_MTU, &1500u32.to_ne_bytes()),
                    // AF_SPEC { AF_INET6 { INET6_CONF [forwarding, hoplimit, mtu6] } }
                    attr(
                        IFLA_AF_SPEC,
                        &attr(
                            libc::AF_INET6 as u16,
                            &attr(
                                IFLA_INET6_CONF,
                                &[0u32, 64, 1280]
                                    .iter()
                                    .flat_map(|w| w.to_ne_bytes())
                                    .collect::<Vec<u8>>(),
                            ),
                        ),
                    ),
                ],
            ),
        ));
        buf.extend(nlmsg(libc::RTM_DELLINK, 0, &ifinfo(4, 0, &[])));
        buf.extend(nlmsg(
            libc::RTM_DELROUTE,
            0,
            &rtmsg(libc::AF_INET, RTN_UNICAST, &[]),
        ));
        buf.extend(nlmsg(libc::RTM_NEWADDR, 0, &[0; 8]));
        assert_eq!(
            events(&buf).unwrap(),
            vec![
                Event::Neighbour(3, "198.18.1.21".parse().unwrap(), Some(NEW_MAC)),
                Event::Neighbour(3, "198.18.1.22".parse().unwrap(), None),
                Event::Neighbour(3, "2001:db8::1".parse().unwrap(), None),
                Event::Link(
                    3,
                    Some(Link {
                        mac: MAC,
                        mtu: 1500,
                        mtu6: Some(1280),
                        up: true
                    })
                ),
                Event::Link(4, None),
                Event::Route,
            ]
        );
    }

    fn valid(ifindex: u32, dmac: [u8; 6], smac: [u8; 6]) -> NextHop {
        NextHop {
            ifindex,
            mtu: 1500,
            dmac,
            smac,
            generation: 1,
            flags: NH_VALID | NH_ON_LINK,
        }
    }

    #[test]
    fn only_a_change_of_the_next_hop_concerns_an_entry() {
        let hop: IpAddr = "198.18.1.21".parse().unwrap();
        let other: IpAddr = "198.18.1.22".parse().unwrap();
        let smac = [2, 0, 0, 0, 0, 0xaa];
        let e = valid(3, MAC, smac);
        // The same MAC again (a state change between usable states): no.
        assert!(!concerns(&Event::Neighbour(3, hop, Some(MAC)), &e, hop));
        assert!(concerns(&Event::Neighbour(3, hop, Some(NEW_MAC)), &e, hop));
        assert!(concerns(&Event::Neighbour(3, hop, None), &e, hop));
        assert!(!concerns(&Event::Neighbour(3, other, None), &e, hop));
        assert!(!concerns(&Event::Neighbour(4, hop, None), &e, hop));
        let up = Link {
            mac: smac,
            mtu: 1500,
            mtu6: None,
            up: true,
        };
        assert!(!concerns(&Event::Link(3, Some(up)), &e, hop));
        assert!(concerns(
            &Event::Link(3, Some(Link { up: false, ..up })),
            &e,
            hop
        ));
        assert!(concerns(
            &Event::Link(3, Some(Link { mac: MAC, ..up })),
            &e,
            hop
        ));
        assert!(concerns(
            &Event::Link(3, Some(Link { mtu: 9000, ..up })),
            &e,
            hop
        ));
        assert!(concerns(&Event::Link(3, None), &e, hop));
        assert!(!concerns(&Event::Link(9, None), &e, hop));
        assert!(concerns(&Event::Route, &e, hop));
    }

    #[test]
    fn each_write_changes_the_data_or_only_the_valid_bit() {
        let old = valid(3, MAC, [2, 0, 0, 0, 0, 0xaa]);
        let new = NextHop {
            dmac: NEW_MAC,
            ..old
        };
        let invalid = NextHop {
            flags: NH_ON_LINK,
            ..old
        };
        let cases = [
            (old, Some(new)),
            (old, None),
            (invalid, Some(new)),
            (invalid, Some(old)),
            (NextHop::default(), Some(new)),
        ];
        for (now, want) in cases {
            let writes = steps(now, want);
            let mut at = now;
            for w in &writes {
                // A reader sees `at` or `w`: if both are valid, their data must agree.
                let valid_both = at.flags & NH_VALID != 0 && w.flags & NH_VALID != 0;
                assert!(
                    !valid_both || same(&at, w),
                    "{now:?} -> {want:?}: {writes:?}"
                );
                at = *w;
            }
            match want {
                Some(w) => assert!(same(&at, &w) && at.flags & NH_VALID != 0),
                None => assert_eq!(at.flags & NH_VALID, 0),
            }
        }
        // Nothing to write when the entry already is what is wanted.
        assert!(steps(old, Some(old)).is_empty());
        assert!(steps(invalid, None).is_empty());
        // New data bumps the generation.
        assert_eq!(
            steps(old, Some(new)).last().unwrap().generation,
            old.generation + 1
        );
    }

    #[test]
    fn an_entry_needs_route_link_and_usable_neighbour() {
        let backend: IpAddr = "198.18.1.21".parse().unwrap();
        let gw: IpAddr = "198.18.1.1".parse().unwrap();
        let smac = [2, 0, 0, 0, 0, 0xaa];
        let links = HashMap::from([(
            3,
            Link {
                mac: smac,
                mtu: 1500,
                mtu6: Some(1400),
                up: true,
            },
        )]);
        let neigh = HashMap::from([((3, backend), MAC), ((3, gw), NEW_MAC)]);
        let on_link = Route {
            oif: 3,
            gateway: None,
            mtu: None,
        };
        let e = entry_for(backend, Some(on_link), &links, &neigh).unwrap();
        assert_eq!(
            e,
            NextHop {
                ifindex: 3,
                mtu: 1500,
                dmac: MAC,
                smac,
                generation: 0,
                flags: NH_VALID | NH_ON_LINK
            }
        );
        // Behind a gateway: the gateway's MAC, not on the link; the route's MTU.
        let routed = Route {
            oif: 3,
            gateway: Some(gw),
            mtu: Some(1400),
        };
        let e = entry_for(backend, Some(routed), &links, &neigh).unwrap();
        assert_eq!((e.dmac, e.flags, e.mtu), (NEW_MAC, NH_VALID, 1400));
        // Missing pieces: no entry.
        assert_eq!(entry_for(backend, None, &links, &neigh), None);
        assert_eq!(
            entry_for(backend, Some(on_link), &HashMap::new(), &neigh),
            None
        );
        assert_eq!(
            entry_for(backend, Some(on_link), &links, &HashMap::new()),
            None
        );
        let down = HashMap::from([(
            3,
            Link {
                up: false,
                ..links[&3]
            },
        )]);
        assert_eq!(entry_for(backend, Some(on_link), &down, &neigh), None);
        // A neighbour on another interface is not this route's.
        let elsewhere = HashMap::from([((4, backend), MAC)]);
        assert_eq!(entry_for(backend, Some(on_link), &links, &elsewhere), None);
        // IPv6: the interface's IPv6 MTU, as the FIB takes it.
        let v6: IpAddr = "2001:db8::21".parse().unwrap();
        let neigh6 = HashMap::from([((3, v6), MAC)]);
        let e = entry_for(v6, Some(on_link), &links, &neigh6).unwrap();
        assert_eq!(e.mtu, 1400);
    }
}
