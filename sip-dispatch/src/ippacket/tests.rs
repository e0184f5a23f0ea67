use super::*;

fn v6_octets(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = seed | 1;
    (0..len)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect()
}

const C4: &str = "198.18.0.10:5070";
const V4: &str = "198.18.0.100:5060";
const C6: &str = "[2001:db8::10]:5070";
const V6: &str = "[2001:db8::100]:5060";

/// Checks an IPv4 UDP datagram's headers and checksums; returns its payload.
fn check_v4(d: &[u8], src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    assert_eq!(d[0], 0x45);
    assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])), d.len());
    assert_eq!(
        u16::from_be_bytes([d[6], d[7]]) & !IPV4_DF,
        0,
        "unfragmented"
    );
    assert_eq!(d[9], PROTO_UDP);
    assert_eq!(checksum(0, &d[..20]), 0, "IPv4 header checksum");
    assert_eq!(&d[12..16], &v6_octets(src.ip())[12..]);
    assert_eq!(&d[16..20], &v6_octets(dst.ip())[12..]);
    check_udp(&d[20..], src, dst)
}

fn check_v6(d: &[u8], src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    assert_eq!(d[0] >> 4, 6);
    assert_eq!(usize::from(u16::from_be_bytes([d[4], d[5]])) + 40, d.len());
    assert_eq!(d[6], PROTO_UDP);
    assert_eq!(&d[8..24], &v6_octets(src.ip()));
    assert_eq!(&d[24..40], &v6_octets(dst.ip()));
    check_udp(&d[40..], src, dst)
}

/// Verifies the UDP header and its checksum (sum over all of it is all ones).
fn check_udp(u: &[u8], src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    assert_eq!(u16::from_be_bytes([u[0], u[1]]), src.port());
    assert_eq!(u16::from_be_bytes([u[2], u[3]]), dst.port());
    assert_eq!(usize::from(u16::from_be_bytes([u[4], u[5]])), u.len());
    assert_ne!(&u[6..8], &[0, 0], "a checksum is present");
    let mut pseudo = Vec::new();
    if src.is_ipv4() {
        pseudo.extend_from_slice(&v6_octets(src.ip())[12..]);
        pseudo.extend_from_slice(&v6_octets(dst.ip())[12..]);
        pseudo.extend_from_slice(&[0, PROTO_UDP]);
        pseudo.extend_from_slice(&(u.len() as u16).to_be_bytes());
    } else {
        pseudo.extend_from_slice(&v6_octets(src.ip()));
        pseudo.extend_from_slice(&v6_octets(dst.ip()));
        pseudo.extend_from_slice(&(u.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, PROTO_UDP]);
    }
    pseudo.extend_from_slice(u);
    assert_eq!(checksum(0, &pseudo), 0, "UDP checksum");
    u[8..].to_vec()
}

/// A test-only IPv4 reassembler that checks every rule a receiver relies on.
fn reassemble_v4(frags: &[Vec<u8>], mtu: usize) -> Vec<u8> {
    let mut data = Vec::new();
    let ident = &frags[0][4..6];
    for (i, f) in frags.iter().enumerate() {
        assert!(f.len() <= mtu, "fragment {i}: {} > MTU {mtu}", f.len());
        assert_eq!(checksum(0, &f[..20]), 0, "fragment {i}: header checksum");
        assert_eq!(usize::from(u16::from_be_bytes([f[2], f[3]])), f.len());
        assert_eq!(&f[4..6], ident, "one identification per datagram");
        let word = u16::from_be_bytes([f[6], f[7]]);
        assert_eq!(word & IPV4_DF, 0);
        let last = i + 1 == frags.len();
        assert_eq!(
            word & IPV4_MF == 0,
            last,
            "fragment {i}: MF on all but the last"
        );
        assert_eq!(
            usize::from(word & 0x1fff) * 8,
            data.len(),
            "fragment {i}: offset"
        );
        if !last {
            assert_eq!((f.len() - 20) % 8, 0, "fragment {i}: data a multiple of 8");
        }
        data.extend_from_slice(&f[20..]);
    }
    let mut whole = frags[0][..20].to_vec();
    let total = (20 + data.len()) as u16;
    whole[2..4].copy_from_slice(&total.to_be_bytes());
    whole[6..8].copy_from_slice(&[0, 0]);
    whole[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(0, &whole);
    whole[10..12].copy_from_slice(&c.to_be_bytes());
    whole.extend_from_slice(&data);
    whole
}

fn reassemble_v6(frags: &[Vec<u8>], mtu: usize, ident: u32) -> Vec<u8> {
    if frags.len() == 1 && frags[0][6] != NEXT_FRAGMENT {
        return frags[0].clone();
    }
    let mut data = Vec::new();
    let mut next = None;
    for (i, f) in frags.iter().enumerate() {
        assert!(f.len() <= mtu, "fragment {i}: {} > MTU {mtu}", f.len());
        assert_eq!(usize::from(u16::from_be_bytes([f[4], f[5]])) + 40, f.len());
        assert_eq!(f[6], NEXT_FRAGMENT);
        let fh = &f[40..48];
        assert!(next.is_none_or(|n| n == fh[0]));
        next = Some(fh[0]);
        assert_eq!(fh[1], 0);
        let word = u16::from_be_bytes([fh[2], fh[3]]);
        assert_eq!(word & 0b110, 0, "reserved bits");
        let last = i + 1 == frags.len();
        assert_eq!(word & 1 == 0, last, "fragment {i}: M on all but the last");
        assert_eq!(
            usize::from(word >> 3) * 8,
            data.len(),
            "fragment {i}: offset"
        );
        assert_eq!(u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]), ident);
        if !last {
            assert_eq!((f.len() - 48) % 8, 0, "fragment {i}: data a multiple of 8");
        }
        data.extend_from_slice(&f[48..]);
    }
    let mut whole = frags[0][..40].to_vec();
    whole[4..6].copy_from_slice(&(data.len() as u16).to_be_bytes());
    whole[6] = next.unwrap();
    whole.extend_from_slice(&data);
    whole
}

#[test]
fn datagrams_carry_addresses_ports_lengths_and_valid_checksums() {
    let (c4, v4, c6, v6) = (
        C4.parse().unwrap(),
        V4.parse().unwrap(),
        C6.parse().unwrap(),
        V6.parse().unwrap(),
    );
    for len in [0, 1, 2, 3, 7, 100, 1371, 1372, 1400, 4000, 9000, 65_507] {
        let p = payload(len, len as u64);
        let d = udp_datagram(c4, v4, &p, 0x1234).unwrap();
        assert_eq!(&d[4..6], &[0x12, 0x34]);
        assert_eq!(check_v4(&d, c4, v4), p, "v4 {len}");
        let d = udp_datagram(c6, v6, &p, 0).unwrap();
        assert_eq!(check_v6(&d, c6, v6), p, "v6 {len}");
    }
    // The length fields bound them.
    assert!(udp_datagram(c4, v4, &[0; 65_507], 0).is_some());
    assert!(udp_datagram(c4, v4, &[0; 65_508], 0).is_none());
    assert!(udp_datagram(c6, v6, &[0; 65_527], 0).is_some());
    assert!(udp_datagram(c6, v6, &[0; 65_528], 0).is_none());
    assert!(udp_datagram(c4, v6, b"x", 0).is_none(), "mixed families");
}

#[test]
fn a_computed_zero_udp_checksum_is_sent_as_all_ones() {
    for (c, v) in [(C4, V4), (C6, V6)] {
        let (c, v): (SocketAddr, SocketAddr) = (c.parse().unwrap(), v.parse().unwrap());
        let hl = if c.is_ipv4() { 20 } else { 40 };
        let d = udp_datagram(c, v, &[0, 0], 0).unwrap();
        // A payload word equal to the checksum makes the sum all ones: checksum 0.
        let word = [d[hl + 6], d[hl + 7]];
        let d = udp_datagram(c, v, &word, 0).unwrap();
        assert_eq!(&d[hl + 6..hl + 8], &[0xff, 0xff]);
        check_udp(&d[hl..], c, v);
    }
}

#[test]
fn ipv4_fragments_reassemble_to_the_datagram_for_many_sizes_and_mtus() {
    let (c, v) = (C4.parse().unwrap(), V4.parse().unwrap());
    let mut count = 0;
    for mtu in [
        68, 69, 75, 76, 576, 1000, 1280, 1500, 1501, 1507, 9000, 65_535,
    ] {
        for len in (0..10_000)
            .step_by(997)
            .chain([0, 1, 100, 1400, 1472, 1473, 4000, 8972, 8973, 9000, 65_507])
            .chain([mtu - 28, mtu - 27, mtu - 29].map(|l: usize| l.min(65_507)))
        {
            let d = udp_datagram(c, v, &payload(len, (mtu * len) as u64), 77).unwrap();
            let frags = fragment_v4(&d, mtu).unwrap();
            let expected = if d.len() <= mtu {
                1
            } else {
                (d.len() - 20).div_ceil((mtu - 20) & !7)
            };
            assert_eq!(frags.len(), expected, "len {len} mtu {mtu}");
            if frags.len() == 1 {
                assert_eq!(frags[0], d);
            }
            assert_eq!(reassemble_v4(&frags, mtu), d, "len {len} mtu {mtu}");
            count += 1;
        }
    }
    assert!(count > 200);
    // At the boundary: exactly the MTU is one packet, one byte more is two.
    let d = udp_datagram(c, v, &[1; 1472], 1).unwrap();
    assert_eq!(fragment_v4(&d, 1500).unwrap().len(), 1);
    let d = udp_datagram(c, v, &[1; 1473], 1).unwrap();
    let f = fragment_v4(&d, 1500).unwrap();
    assert_eq!(f.iter().map(Vec::len).collect::<Vec<_>>(), [1500, 21]);
}

#[test]
fn ipv6_fragments_reassemble_to_the_datagram_for_many_sizes_and_mtus() {
    let (c, v) = (C6.parse().unwrap(), V6.parse().unwrap());
    for mtu in [96, 97, 103, 104, 1280, 1281, 1500, 9000, 65_535] {
        for len in (0..10_000)
            .step_by(997)
            .chain([0, 1, 100, 1232, 1233, 1400, 1452, 1453, 4000, 9000, 65_527])
            .chain([mtu - 48, mtu - 47, mtu - 49].map(|l: usize| l.min(65_527)))
        {
            let d = udp_datagram(c, v, &payload(len, (mtu + len) as u64), 0).unwrap();
            let ident = 0xdead_0000 | len as u32;
            let frags = fragment_v6(&d, mtu, ident).unwrap();
            let expected = if d.len() <= mtu {
                1
            } else {
                (d.len() - 40).div_ceil((mtu - 48) & !7)
            };
            assert_eq!(frags.len(), expected, "len {len} mtu {mtu}");
            assert_eq!(reassemble_v6(&frags, mtu, ident), d, "len {len} mtu {mtu}");
        }
    }
    let d = udp_datagram(c, v, &[1; 1452], 1).unwrap();
    assert_eq!(fragment_v6(&d, 1500, 9).unwrap(), vec![d.clone()]);
    let d = udp_datagram(c, v, &[1; 1453], 1).unwrap();
    let f = fragment_v6(&d, 1500, 9).unwrap();
    // 1501 bytes: 1448 data bytes in the first (a multiple of 8), 13 in the second.
    assert_eq!(f.iter().map(Vec::len).collect::<Vec<_>>(), [1496, 61]);
}

#[test]
fn bad_input_and_tiny_mtus_are_errors() {
    let (c, v) = (C4.parse().unwrap(), V4.parse().unwrap());
    let d = udp_datagram(c, v, &[0; 100], 1).unwrap();
    assert_eq!(fragment_v4(&d, 27), Err(FragError::MtuTooSmall));
    assert_eq!(fragment_v4(&d, 0), Err(FragError::MtuTooSmall));
    assert_eq!(fragment_v4(&[], 1500), Err(FragError::Malformed));
    assert_eq!(fragment_v4(&d[..50], 40), Err(FragError::Malformed));
    let mut df = d.clone();
    df[6] = 0x40;
    assert_eq!(fragment_v4(&df, 40), Err(FragError::Malformed));
    let mut bad_ihl = d.clone();
    bad_ihl[0] = 0x4f;
    assert_eq!(fragment_v4(&bad_ihl[..30], 40), Err(FragError::Malformed));
    let (c, v) = (C6.parse().unwrap(), V6.parse().unwrap());
    let d = udp_datagram(c, v, &[0; 100], 1).unwrap();
    assert_eq!(fragment_v6(&d, 55, 1), Err(FragError::MtuTooSmall));
    assert_eq!(fragment_v6(&d[..39], 1500, 1), Err(FragError::Malformed));
    assert_eq!(fragment_v6(&d[..100], 60, 1), Err(FragError::Malformed));
    let frag = fragment_v6(&d, 96, 1).unwrap();
    assert_eq!(
        fragment_v6(&frag[0], 60, 1),
        Err(FragError::Malformed),
        "already a fragment"
    );
}
