use super::*;

use super::{entry::same, wire::*};
use crate::netlink::{
    NDA_DST, NDA_LLADDR, NLMSG_HDRLEN, RTA_HDRLEN, attribute as attr, attributes, message, ndmsg,
    u16_at, u32_at,
};
use sip_dispatch_common::{NH_ON_LINK, NH_VALID, NextHop};
use std::{collections::HashMap, net::Ipv6Addr};

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
