//! The rtnetlink messages the cache reads and sends: route, link and rule requests,
//! their answers, and the neighbour, route, link and rule notifications as [`Event`]s.
use std::{io, net::IpAddr};

use super::{Link, Route};
use crate::netlink::{
    NDA_DST, NDA_LLADDR, NLMSG_ERROR, NUD_USABLE, NeighbourMessage, attribute, attributes, bad,
    ip_of, message, messages, u16_at, u32_at,
};

pub(super) const RTMSG_LEN: usize = 12;
pub(super) const IFINFOMSG_LEN: usize = 16;
pub(super) const RTA_DST: u16 = 1;
pub(super) const RTA_OIF: u16 = 4;
pub(super) const RTA_GATEWAY: u16 = 5;
pub(super) const RTA_METRICS: u16 = 8;
pub(super) const RTA_VIA: u16 = 18;
pub(super) const RTAX_MTU: u16 = 2;
pub(super) const IFLA_ADDRESS: u16 = 1;
pub(super) const IFLA_MTU: u16 = 4;
pub(super) const IFLA_AF_SPEC: u16 = 26;
pub(super) const IFLA_INET6_CONF: u16 = 2;
/// Index of the IPv6 MTU in `IFLA_INET6_CONF` (linux/ipv6.h, `DEVCONF_MTU6`).
pub(super) const DEVCONF_MTU6: usize = 2;
pub(super) const RTN_UNICAST: u8 = 1;
pub(super) const IFF_UP: u32 = 1;
pub(super) const RTNLGRP_LINK: u32 = 1;
pub(super) const RTNLGRP_NEIGH: u32 = 3;
pub(super) const RTNLGRP_IPV4_ROUTE: u32 = 7;
pub(super) const RTNLGRP_IPV4_RULE: u32 = 8;
pub(super) const RTNLGRP_IPV6_ROUTE: u32 = 11;
pub(super) const RTNLGRP_IPV6_RULE: u32 = 19;
/// `struct fib_rule_hdr`: family, dst_len, src_len, tos, table, res1, res2, action, flags.
pub(super) const FIB_RULE_HDR_LEN: usize = 12;
/// The rule attributes that select nothing the cache's route lookup does not share with
/// the packet's (linux/fib_rules.h): FRA_DST, FRA_GOTO, FRA_PRIORITY,
/// FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN, FRA_TABLE, FRA_PAD, FRA_PROTOCOL.
pub(super) const NEUTRAL_RULE_ATTRS: [u16; 8] = [1, 4, 6, 13, 14, 15, 18, 21];
/// The rtnetlink multicast groups followed, as `nl_groups` bits (group n is bit n - 1).
pub const GROUPS: u32 = 1 << (RTNLGRP_LINK - 1)
    | 1 << (RTNLGRP_NEIGH - 1)
    | 1 << (RTNLGRP_IPV4_ROUTE - 1)
    | 1 << (RTNLGRP_IPV6_ROUTE - 1)
    | 1 << (RTNLGRP_IPV4_RULE - 1)
    | 1 << (RTNLGRP_IPV6_RULE - 1);

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
