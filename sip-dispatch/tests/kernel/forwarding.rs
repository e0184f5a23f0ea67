//! The forwarding modes of a service in the kernel: `l2dsr` changes only the MACs,
//! `ipip` puts an outer IP header to the backend in front; both keep the VIP as the
//! packet's destination, so the backend answers from it.
use std::net::{IpAddr, SocketAddr};

use sip_dispatch_common::{Counter, EncapSource, FWD_IPIP, FWD_L2DSR, HashKey, table::build_table};
use sip_dispatch_testbed::{
    frames::{FrameSpec, parse},
    testrun::{XDP_PASS, XDP_TX},
};

use crate::harness::{
    CLIENT4, CLIENT6, Harness, VETH_MAC, VIP_NO_NEIGH, VIP4, VIP6, backend_mac, delta, invite, sh,
    weighted,
};

fn with_mode(mode: u32) -> Harness {
    let mut h = Harness::new();
    let (v4, v6) = (h.v4.clone(), h.v6.clone());
    h.dp.set_forwarding(0, mode);
    h.dp.set_forwarding(1, mode);
    h.dp.install_service(&mut h.ids, 0, VIP4.parse().unwrap(), &v4)
        .unwrap();
    h.dp.install_service(&mut h.ids, 1, VIP6.parse().unwrap(), &v6)
        .unwrap();
    h
}

fn frame(v6: bool, payload: &[u8]) -> Vec<u8> {
    let (src, dst) = if v6 { (CLIENT6, VIP6) } else { (CLIENT4, VIP4) };
    FrameSpec::udp(src.parse().unwrap(), dst.parse().unwrap(), payload).build()
}

/// `f` is passed untouched and counted under `reason`.
fn passed(h: &mut Harness, f: &[u8], reason: Counter) {
    let before = h.counters();
    let (verdict, out) = h.run(f, true);
    assert_eq!((verdict, out == f), (XDP_PASS, true), "{reason:?}");
    assert_eq!(
        delta(&before, &h.counters()),
        vec![(Counter::Seen, 1), (reason, 1)]
    );
}

#[test]
fn l2dsr_changes_only_the_ethernet_addresses() {
    let mut h = with_mode(FWD_L2DSR);
    for v6 in [false, true] {
        let msg = invite(&format!("Call-ID: dsr-{v6}@198.18.1.10"));
        let f = frame(v6, &msg);
        let (verdict, out) = h.run(&f, true);
        assert_eq!(verdict, XDP_TX, "v6 {v6}");
        let p = parse(&out).expect("output parses");
        let vip: SocketAddr = if v6 { VIP6 } else { VIP4 }.parse().unwrap();
        assert_eq!(p.dst, vip, "the destination stays the VIP");
        assert_eq!(p.dst_mac, backend_mac(h.predicted(v6, &msg).ip()));
        assert_eq!(p.src_mac, VETH_MAC);
        assert_eq!(out[12..], f[12..], "only the MACs changed");
    }
}

#[test]
fn l2dsr_passes_a_backend_behind_a_gateway() {
    let mut h = Harness::new();
    sh(&["ip", "route", "add", "198.18.7.0/24", "via", "198.18.1.21"]);
    let far = build_table(&weighted(&[("198.18.7.7:5060", 1)]), HashKey::DEFAULT).unwrap();
    h.dp.set_forwarding(2, FWD_L2DSR);
    h.dp.install_service(&mut h.ids, 2, VIP_NO_NEIGH.parse().unwrap(), &far)
        .unwrap();
    let f = FrameSpec::udp(
        CLIENT4.parse().unwrap(),
        VIP_NO_NEIGH.parse().unwrap(),
        &invite("Call-ID: far@198.18.1.10"),
    )
    .build();
    passed(&mut h, &f, Counter::PassNotOnLink);
}

#[test]
fn ipip_puts_an_outer_header_to_the_backend_in_front() {
    let mut h = with_mode(FWD_IPIP);
    let src4: std::net::Ipv4Addr = "198.18.1.1".parse().unwrap();
    let src6: std::net::Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    // No source address yet: passed, untouched.
    let msg = invite("Call-ID: ipip-0@198.18.1.10");
    let f = frame(false, &msg);
    passed(&mut h, &f, Counter::PassEncap);
    h.dp.set_encap_source(EncapSource::new(Some(src4), Some(src6)))
        .unwrap();
    for v6 in [false, true] {
        let msg = invite(&format!("Call-ID: ipip-{v6}@198.18.1.10"));
        let f = frame(v6, &msg);
        let (verdict, out) = h.run(&f, true);
        assert_eq!(verdict, XDP_TX, "v6 {v6}");
        let backend = h.predicted(v6, &msg);
        let outer = if v6 { 40 } else { 20 };
        assert_eq!(out.len(), f.len() + outer, "v6 {v6}");
        assert_eq!(out[0..6], backend_mac(backend.ip()));
        assert_eq!(out[6..12], VETH_MAC);
        assert_eq!(out[12..14], f[12..14], "the EtherType stays");
        assert_eq!(
            out[14 + outer..],
            f[14..],
            "the inner packet is the original"
        );
        let o = &out[14..14 + outer];
        if v6 {
            assert_eq!(o[0] >> 4, 6);
            assert_eq!(u16::from_be_bytes([o[4], o[5]]) as usize, f.len() - 14);
            assert_eq!(o[6], 41, "next header IPv6");
            assert_eq!(o[8..24], src6.octets());
            assert_eq!(
                IpAddr::from(<[u8; 16]>::try_from(&o[24..40]).unwrap()),
                backend.ip()
            );
        } else {
            assert_eq!(o[0], 0x45);
            assert_eq!(u16::from_be_bytes([o[2], o[3]]) as usize, f.len() - 14 + 20);
            assert_eq!(o[9], 4, "protocol IPIP");
            assert_eq!(o[12..16], src4.octets());
            assert_eq!(
                IpAddr::from(<[u8; 4]>::try_from(&o[16..20]).unwrap()),
                backend.ip()
            );
            let sum: u32 = o
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .sum();
            let folded = (sum & 0xffff) + (sum >> 16);
            assert_eq!(
                (folded & 0xffff) + (folded >> 16),
                0xffff,
                "header checksum"
            );
        }
    }
    // A VLAN tag stays in front of the outer header.
    let msg = invite("Call-ID: ipip-tagged@198.18.1.10");
    let mut spec = FrameSpec::udp(CLIENT4.parse().unwrap(), VIP4.parse().unwrap(), &msg);
    spec.vlan = Some((0x8100, 42));
    let f = spec.build();
    let (verdict, out) = h.run(&f, true);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), f.len() + 20);
    assert_eq!(out[12..18], f[12..18], "the tag and the EtherType stay");
    assert_eq!(out[18], 0x45);
    assert_eq!(out[18 + 20..], f[18..], "the inner packet is the original");
    // A packet that would not fit the egress MTU (1500) with the outer header.
    let mut big = invite("Call-ID: ipip-big@198.18.1.10");
    big.resize(1500 - 20 - 8 - 10, b' ');
    let f = frame(false, &big);
    passed(&mut h, &f, Counter::PassEncap);
}
