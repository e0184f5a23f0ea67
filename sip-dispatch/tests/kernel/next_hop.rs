//! The next-hop cache (`sd_nexthop_v1`): a valid entry replaces the FIB lookup with
//! the same rules (MTU, l2dsr's on-link rule); an invalid one falls back to the FIB.
use sip_dispatch_common::{
    Counter, FWD_IPIP, FWD_L2DSR, HashKey, NH_ON_LINK, NH_VALID, NextHop, table::build_table,
};
use sip_dispatch_testbed::{
    frames::{FrameSpec, parse},
    testrun::{XDP_PASS, XDP_TX},
};

use crate::harness::{
    CLIENT4, Harness, VETH, VETH_MAC, VIP_NO_NEIGH, VIP4, all_delta, backend_mac, invite, sh,
    weighted,
};

fn id_of(h: &Harness, addr: &str) -> u32 {
    h.ids.get(addr.parse().unwrap()).expect("backend has an id")
}

/// Sends `msg` to the v4 VIP from the veth: verdict, output, counters that moved.
fn send(h: &mut Harness, msg: &[u8]) -> (u32, Vec<u8>, Vec<(Counter, u64)>) {
    let f = FrameSpec::udp(CLIENT4.parse().unwrap(), VIP4.parse().unwrap(), msg).build();
    let before = h.counters();
    let (verdict, out) = h.run(&f, true);
    let moved = all_delta(&before, &h.counters())
        .into_iter()
        .filter(|(c, _)| !c.name().starts_with("affinity_"))
        .collect();
    (verdict, out, moved)
}

#[test]
fn the_resolver_fills_what_the_fib_says() {
    let h = Harness::new();
    let ifindex = h.ifindex;
    for (addr, ip) in [
        ("198.18.1.21:5060", "198.18.1.21"),
        ("198.18.1.22:5062", "198.18.1.22"),
        ("[2001:db8:1::23]:5060", "2001:db8:1::23"),
    ] {
        let e = h.dp.next_hop(id_of(&h, addr)).unwrap();
        assert_eq!(
            (e.ifindex, e.mtu, e.dmac, e.smac, e.flags),
            (
                ifindex,
                1500,
                backend_mac(ip.parse().unwrap()),
                VETH_MAC,
                NH_VALID | NH_ON_LINK
            ),
            "{addr}"
        );
    }
    // No neighbour entry: not valid (the FIB path, and the stack, resolve it).
    let e = h.dp.next_hop(id_of(&h, "198.18.1.50:5060")).unwrap();
    assert_eq!(e.flags & NH_VALID, 0, "{e:?}");
    // The interface's IPv6 MTU applies to IPv6 backends only, as in the FIB.
    let mut h = h;
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{VETH}/mtu"), "1400").unwrap();
    h.dp.resolve_next_hops().unwrap();
    let mtu = |h: &Harness, addr: &str| h.dp.next_hop(id_of(h, addr)).unwrap().mtu;
    assert_eq!(mtu(&h, "[2001:db8:1::23]:5060"), 1400);
    assert_eq!(mtu(&h, "198.18.1.21:5060"), 1500);
}

#[test]
fn a_valid_entry_is_used_instead_of_the_fib() {
    let mut h = Harness::new();
    let msg = invite("Call-ID: nh-1@198.18.1.10");
    let backend = h.predicted(false, &msg);
    let id = id_of(&h, &backend.to_string());
    let (verdict, out, moved) = send(&mut h, &msg);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out[0..6], backend_mac(backend.ip()));
    assert_eq!(
        moved,
        vec![(Counter::Seen, 1), (Counter::Tx, 1)],
        "no FIB lookup"
    );

    // The entry, not the FIB, decides: a MAC only the entry has is the one used.
    let known = h.dp.next_hop(id).unwrap();
    let moved_mac = [0x02, 0, 0, 0, 0x77, 0x77];
    for write in sip_dispatch::nexthops::steps(
        known,
        Some(NextHop {
            dmac: moved_mac,
            ..known
        }),
    ) {
        h.dp.set_next_hop(id, write).unwrap();
    }
    let (verdict, out, moved) = send(&mut h, &msg);
    assert_eq!((verdict, &out[0..6]), (XDP_TX, &moved_mac[..]));
    assert_eq!(moved, vec![(Counter::Seen, 1), (Counter::Tx, 1)]);

    // Invalid: the FIB's answer (the neighbour table's MAC), counted as a fallback.
    for write in sip_dispatch::nexthops::steps(h.dp.next_hop(id).unwrap(), None) {
        h.dp.set_next_hop(id, write).unwrap();
    }
    let (verdict, out, moved) = send(&mut h, &msg);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out[0..6], backend_mac(backend.ip()));
    assert_eq!(
        moved,
        vec![
            (Counter::Seen, 1),
            (Counter::Tx, 1),
            (Counter::FibFallback, 1)
        ]
    );
}

#[test]
fn a_valid_entry_keeps_the_mtu_and_on_link_rules() {
    let mut h = Harness::new();
    let msg = invite("Call-ID: nh-mtu@198.18.1.10");
    let backend = h.predicted(false, &msg);
    let id = id_of(&h, &backend.to_string());
    let known = h.dp.next_hop(id).unwrap();
    let write = |h: &mut Harness, e: NextHop| {
        for w in sip_dispatch::nexthops::steps(h.dp.next_hop(id).unwrap(), Some(e)) {
            h.dp.set_next_hop(id, w).unwrap();
        }
    };
    let ip_len = 20 + 8 + msg.len() as u32;
    // Rewrite: exactly the MTU fits, one byte less does not (as FRAG_NEEDED).
    write(
        &mut h,
        NextHop {
            mtu: ip_len,
            ..known
        },
    );
    assert_eq!(send(&mut h, &msg).0, XDP_TX);
    write(
        &mut h,
        NextHop {
            mtu: ip_len - 1,
            ..known
        },
    );
    let (verdict, _, moved) = send(&mut h, &msg);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(moved, vec![(Counter::Seen, 1), (Counter::PassFibMiss, 1)]);
    // ipip: the outer header counts.
    h.dp.set_encap_source(sip_dispatch_common::EncapSource::new(
        Some("198.18.1.1".parse().unwrap()),
        None,
    ))
    .unwrap();
    let v4 = h.v4.clone();
    h.dp.set_forwarding(0, FWD_IPIP);
    h.dp.install_service(&mut h.ids, 0, VIP4.parse().unwrap(), &v4)
        .unwrap();
    write(
        &mut h,
        NextHop {
            mtu: ip_len + 20,
            ..known
        },
    );
    assert_eq!(send(&mut h, &msg).0, XDP_TX);
    write(
        &mut h,
        NextHop {
            mtu: ip_len + 19,
            ..known
        },
    );
    let (verdict, _, moved) = send(&mut h, &msg);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(moved, vec![(Counter::Seen, 1), (Counter::PassEncap, 1)]);
    // l2dsr: an entry behind a gateway is not on the link.
    h.dp.set_forwarding(0, FWD_L2DSR);
    h.dp.install_service(&mut h.ids, 0, VIP4.parse().unwrap(), &v4)
        .unwrap();
    write(&mut h, known);
    assert_eq!(send(&mut h, &msg).0, XDP_TX);
    write(
        &mut h,
        NextHop {
            flags: NH_VALID,
            ..known
        },
    );
    let (verdict, _, moved) = send(&mut h, &msg);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(moved, vec![(Counter::Seen, 1), (Counter::PassNotOnLink, 1)]);
}

#[test]
fn a_backend_behind_a_gateway_gets_the_gateways_mac() {
    let mut h = Harness::new();
    sh(&[
        "ip",
        "route",
        "add",
        "198.18.7.0/24",
        "via",
        "198.18.1.21",
        "mtu",
        "1400",
    ]);
    let far = build_table(&weighted(&[("198.18.7.7:5060", 1)]), HashKey::DEFAULT).unwrap();
    h.dp.install_service(&mut h.ids, 2, VIP_NO_NEIGH.parse().unwrap(), &far)
        .unwrap();
    assert_eq!(h.dp.resolve_next_hops().unwrap(), 7);
    let e = h.dp.next_hop(id_of(&h, "198.18.7.7:5060")).unwrap();
    let gw_mac = backend_mac("198.18.1.21".parse().unwrap());
    assert_eq!((e.dmac, e.mtu, e.flags), (gw_mac, 1400, NH_VALID));
    let f = FrameSpec::udp(
        CLIENT4.parse().unwrap(),
        VIP_NO_NEIGH.parse().unwrap(),
        &invite("Call-ID: far@198.18.1.10"),
    )
    .build();
    let before = h.counters();
    let (verdict, out) = h.run(&f, true);
    assert_eq!((verdict, &out[0..6]), (XDP_TX, &gw_mac[..]));
    let p = parse(&out).expect("output parses");
    assert_eq!(p.dst, "198.18.7.7:5060".parse().unwrap());
    let moved: Vec<_> = all_delta(&before, &h.counters())
        .into_iter()
        .filter(|(c, _)| !c.name().starts_with("affinity_"))
        .collect();
    assert_eq!(moved, vec![(Counter::Seen, 1), (Counter::Tx, 1)]);
}
