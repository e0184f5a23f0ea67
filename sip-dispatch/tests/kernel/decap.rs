//! `ipip_decap` (`sip-dispatch decap`), the backend's side of `ipip`: IP-in-IP from an
//! accepted source loses its outer header, everything else passes untouched. No
//! namespace: the program only reads the frame and its map of accepted sources.
use std::net::{IpAddr, SocketAddr};

use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use sip_dispatch::dataplane::load_decap;
use sip_dispatch_common::{PROG_DECAP, csum::checksum};
use sip_dispatch_testbed::{
    frames::{FrameSpec, parse},
    testrun::XDP_PASS,
};

use crate::harness::{CLIENT4, CLIENT6, VIP4, VIP6, invite};

/// The dispatchers' encapsulation sources given to `--from`.
const FROM4: &str = "198.18.0.2";
const FROM6: &str = "2001:db8::2";
/// The backend the outer header goes to.
const BACKEND4: &str = "198.18.0.21";
const BACKEND6: &str = "2001:db8::21";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn load() -> Ebpf {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "kernel tests load XDP programs and need root: run them through `cargo xtask test`"
    );
    load_decap(&[ip(FROM4), ip(FROM6)]).expect("loading ipip_decap")
}

fn run(ebpf: &mut Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
    let prog: &mut Xdp = ebpf.program_mut(PROG_DECAP).unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

/// The outer header of a test frame.
struct Outer {
    src: IpAddr,
    /// IPv4: flags and fragment offset; IPv6: a fragment header with these bits.
    frags: u16,
    /// IPv4 options (a multiple of 4 bytes).
    options: Vec<u8>,
}

impl Outer {
    fn from(src: &str) -> Outer {
        Outer {
            src: ip(src),
            frags: 0,
            options: Vec::new(),
        }
    }
}

/// The UDP frame `inner` as a dispatcher's `ipip` sends it: an outer header from
/// `outer.src` to the backend (its family's protocol: 4 or 41, whatever the inner
/// packet is) after the Ethernet header and any VLAN tag, whose EtherType becomes the
/// outer's.
fn encapsulated(inner: &[u8], outer: &Outer) -> Vec<u8> {
    let l3 = if matches!(inner[12..14], [0x81, 0x00] | [0x88, 0xa8]) {
        18
    } else {
        14
    };
    let packet = &inner[l3..];
    let mut head = Vec::new();
    let ether_type: u16 = match outer.src {
        IpAddr::V4(s) => {
            let ihl = 20 + outer.options.len();
            let mut h = vec![0u8; 20];
            h[0] = 0x40 | (ihl / 4) as u8;
            h[2..4].copy_from_slice(&((ihl + packet.len()) as u16).to_be_bytes());
            h[6..8].copy_from_slice(&outer.frags.to_be_bytes());
            h[8] = 64;
            h[9] = 4;
            h[12..16].copy_from_slice(&s.octets());
            let IpAddr::V4(d) = ip(BACKEND4) else {
                unreachable!()
            };
            h[16..20].copy_from_slice(&d.octets());
            h.extend_from_slice(&outer.options);
            let c = checksum(0, &h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            head.extend_from_slice(&h);
            0x0800
        }
        IpAddr::V6(s) => {
            let frag_len = if outer.frags != 0 { 8 } else { 0 };
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&((frag_len + packet.len()) as u16).to_be_bytes());
            h[6] = if outer.frags != 0 { 44 } else { 41 };
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            let IpAddr::V6(d) = ip(BACKEND6) else {
                unreachable!()
            };
            h[24..40].copy_from_slice(&d.octets());
            head.extend_from_slice(&h);
            if outer.frags != 0 {
                let [a, b] = outer.frags.to_be_bytes();
                head.extend_from_slice(&[41, 0, a, b, 0, 0, 0x12, 0x34]);
            }
            0x86dd
        }
    };
    let mut f = inner[..l3].to_vec();
    f[l3 - 2..l3].copy_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(&head);
    f.extend_from_slice(packet);
    f
}

fn udp_frame(v6: bool) -> Vec<u8> {
    let (src, dst) = if v6 { (CLIENT6, VIP6) } else { (CLIENT4, VIP4) };
    let msg = invite(&format!("Call-ID: decap-{v6}@198.18.1.10"));
    FrameSpec::udp(src.parse().unwrap(), dst.parse().unwrap(), &msg).build()
}

/// `f` comes out as it went in.
fn untouched(ebpf: &mut Ebpf, f: &[u8], what: &str) {
    let (verdict, out) = run(ebpf, f);
    assert_eq!(verdict, XDP_PASS, "{what}");
    assert!(out == f, "{what}: the frame changed");
}

#[test]
fn ip_in_ip_from_an_accepted_source_loses_its_outer_header() {
    let mut ebpf = load();
    for (v6, from) in [(false, FROM4), (true, FROM6)] {
        let inner = udp_frame(v6);
        let f = encapsulated(&inner, &Outer::from(from));
        let outer = if v6 { 40 } else { 20 };
        assert_eq!(f.len(), inner.len() + outer);
        let (verdict, out) = run(&mut ebpf, &f);
        assert_eq!(verdict, XDP_PASS, "v6 {v6}");
        assert_eq!(out.len(), inner.len(), "v6 {v6}: the outer header is gone");
        assert_eq!(out[0..12], f[0..12], "v6 {v6}: the MACs stay");
        assert_eq!(out[12..14], f[12..14], "v6 {v6}: the EtherType stays");
        assert!(out == inner, "v6 {v6}: the inner frame, byte for byte");
        let p = parse(&out).expect("the inner datagram parses, checksums right");
        let vip: SocketAddr = if v6 { VIP6 } else { VIP4 }.parse().unwrap();
        assert_eq!(p.dst, vip, "v6 {v6}");
    }
}

#[test]
fn ip_in_ip_from_another_source_passes_untouched() {
    let mut ebpf = load();
    for (v6, from) in [
        (false, "198.18.0.3"),
        (false, BACKEND4),
        (true, "2001:db8::3"),
        // Its first word is 198.18.0.2's: only the family tells them apart.
        (true, "c612:2::"),
    ] {
        let f = encapsulated(&udp_frame(v6), &Outer::from(from));
        untouched(&mut ebpf, &f, &format!("from {from}"));
    }
}

#[test]
fn outer_fragments_options_and_a_wrong_inner_version_pass_untouched() {
    let mut ebpf = load();
    for (frags, what) in [
        (0x2000, "first fragment (MF)"),
        (0x0010, "last fragment (offset)"),
        (0x2010, "middle fragment"),
    ] {
        let mut outer = Outer::from(FROM4);
        outer.frags = frags;
        untouched(&mut ebpf, &encapsulated(&udp_frame(false), &outer), what);
        let mut outer = Outer::from(FROM6);
        // The fragment header's offset/flags field: offset << 3, M in bit 0.
        outer.frags = if frags & 0x2000 != 0 { 1 } else { 0 } | (frags & 0x1fff) << 3;
        untouched(
            &mut ebpf,
            &encapsulated(&udp_frame(true), &outer),
            &format!("IPv6 {what}"),
        );
    }
    let mut outer = Outer::from(FROM4);
    outer.options = vec![1, 1, 1, 0]; // NOP, NOP, NOP, end of options
    untouched(
        &mut ebpf,
        &encapsulated(&udp_frame(false), &outer),
        "outer IPv4 header with options",
    );
    // IPv6 inside protocol 4, IPv4 inside next header 41.
    untouched(
        &mut ebpf,
        &encapsulated(&udp_frame(true), &Outer::from(FROM4)),
        "IPv6 in IPv4",
    );
    untouched(
        &mut ebpf,
        &encapsulated(&udp_frame(false), &Outer::from(FROM6)),
        "IPv4 in IPv6",
    );
}

#[test]
fn tagged_frames_plain_udp_and_truncated_headers_pass_untouched() {
    let mut ebpf = load();
    for v6 in [false, true] {
        let (src, dst, from) = if v6 {
            (CLIENT6, VIP6, FROM6)
        } else {
            (CLIENT4, VIP4, FROM4)
        };
        let mut spec = FrameSpec::udp(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            &invite("Call-ID: decap-tagged@198.18.1.10"),
        );
        spec.vlan = Some((0x8100, 42));
        let tagged = encapsulated(&spec.build(), &Outer::from(from));
        assert_eq!(tagged[12..14], [0x81, 0x00]);
        untouched(&mut ebpf, &tagged, &format!("VLAN-tagged, v6 {v6}"));
        untouched(&mut ebpf, &udp_frame(v6), &format!("plain UDP, v6 {v6}"));
        // The outer header and the inner one's first byte cut short.
        let f = encapsulated(&udp_frame(v6), &Outer::from(from));
        let outer = if v6 { 40 } else { 20 };
        for len in [14 + outer - 1, 14 + outer] {
            untouched(&mut ebpf, &f[..len], &format!("cut at {len}, v6 {v6}"));
        }
    }
}

#[test]
fn more_than_64_sources_are_refused() {
    let many: Vec<IpAddr> = (1..=65u8).map(|i| IpAddr::from([198, 18, 0, i])).collect();
    let e = load_decap(&many).unwrap_err().to_string();
    assert!(e.contains("65 decap sources"), "{e}");
    // Repeats count once.
    let repeated: Vec<IpAddr> = many[..64].iter().chain(&many[..64]).copied().collect();
    load_decap(&repeated).expect("64 distinct sources");
}
