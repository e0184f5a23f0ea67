//! Ethernet/IP/UDP frames built and checked from scratch: the fixtures of the kernel
//! tests and the packets of the benchmarks.
use std::net::{IpAddr, SocketAddr};

use sip_dispatch_common::csum::{checksum, udp_checksum, udp_pseudo_header_sum};

#[derive(Clone, Debug)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// (TPID, VLAN id): 0x8100 (802.1Q) or 0x88a8 (802.1ad).
    pub vlan: Option<(u16, u16)>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv4 (more fragments, fragment offset in 8-byte units).
    pub fragment: Option<(bool, u16)>,
    /// IPv6: put one 8-byte extension header of this type before UDP.
    pub ipv6_ext: Option<u8>,
    /// IPv4 only: send a zero ("no") UDP checksum.
    pub zero_udp_checksum: bool,
    /// IPv4 TTL / IPv6 hop limit.
    pub ttl: u8,
    pub payload: Vec<u8>,
}

impl FrameSpec {
    pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> FrameSpec {
        FrameSpec {
            src_mac: [0x02, 0, 0, 0, 0, 0x10],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            src,
            dst,
            ip_options: Vec::new(),
            fragment: None,
            ipv6_ext: None,
            zero_udp_checksum: false,
            ttl: 64,
            payload: payload.to_vec(),
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(64 + self.payload.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some((tpid, vid)) = self.vlan {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        let udp_len = (8 + self.payload.len()) as u16;
        let mut udp = Vec::with_capacity(udp_len as usize);
        udp.extend_from_slice(&self.src.port().to_be_bytes());
        udp.extend_from_slice(&self.dst.port().to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&self.payload);
        let check = udp_checksum(self.src.ip(), self.dst.ip(), &udp[..8], &udp[8..]);
        if !(self.zero_udp_checksum && self.src.is_ipv4()) {
            udp[6..8].copy_from_slice(&check.to_be_bytes());
        }
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let ihl = 20 + self.ip_options.len();
                let mut ip = vec![0u8; 20];
                ip[0] = 0x40 | (ihl / 4) as u8;
                ip[2..4].copy_from_slice(&((ihl + udp.len()) as u16).to_be_bytes());
                ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
                if let Some((mf, off)) = self.fragment {
                    let v = (if mf { 0x2000 } else { 0 }) | (off & 0x1fff);
                    ip[6..8].copy_from_slice(&v.to_be_bytes());
                }
                ip[8] = self.ttl;
                ip[9] = 17;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                ip.extend_from_slice(&self.ip_options);
                let c = checksum(0, &ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                let ext_len = if self.ipv6_ext.is_some() { 8 } else { 0 };
                let mut ip = vec![0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&((ext_len + udp.len()) as u16).to_be_bytes());
                ip[6] = self.ipv6_ext.unwrap_or(17);
                ip[7] = self.ttl;
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&d.octets());
                f.extend_from_slice(&ip);
                if self.ipv6_ext.is_some() {
                    f.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0, 0]);
                }
            }
            _ => panic!("source and destination of different families"),
        }
        f.extend_from_slice(&udp);
        f
    }
}

/// A MAC address as `ip` writes it: `02:00:00:00:00:aa`.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What a dispatched frame says, with its checksums verified from scratch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedFrame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<(u16, u16)>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
    /// The IPv4 header checksum verifies (always true for IPv6).
    pub ip_checksum_ok: bool,
    /// The UDP checksum verifies, or is 0 in IPv4.
    pub udp_checksum_ok: bool,
    pub udp_checksum: u16,
}

/// Parses an Ethernet/IP/UDP frame built like [`FrameSpec::build`] (no fragments).
pub fn parse(frame: &[u8]) -> Option<ParsedFrame> {
    let dst_mac: [u8; 6] = frame.get(0..6)?.try_into().ok()?;
    let src_mac: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
    let mut off = 12;
    let mut ether_type = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
    let mut vlan = None;
    if ether_type == 0x8100 || ether_type == 0x88a8 {
        let vid = u16::from_be_bytes(frame.get(off + 2..off + 4)?.try_into().ok()?);
        vlan = Some((ether_type, vid));
        off += 4;
        ether_type = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
    }
    off += 2;
    let (src_ip, dst_ip, l4, ip_checksum_ok): (IpAddr, IpAddr, usize, bool) = match ether_type {
        0x0800 => {
            let ihl = ((*frame.get(off)? & 0x0f) as usize) * 4;
            let ip = frame.get(off..off + ihl)?;
            let s: [u8; 4] = ip[12..16].try_into().ok()?;
            let d: [u8; 4] = ip[16..20].try_into().ok()?;
            (s.into(), d.into(), off + ihl, checksum(0, ip) == 0)
        }
        0x86dd => {
            let ip = frame.get(off..off + 40)?;
            let s: [u8; 16] = ip[8..24].try_into().ok()?;
            let d: [u8; 16] = ip[24..40].try_into().ok()?;
            let l4 = if ip[6] == 17 { off + 40 } else { off + 48 };
            (s.into(), d.into(), l4, true)
        }
        _ => return None,
    };
    let udp = frame.get(l4..)?;
    let udp_len = u16::from_be_bytes(udp.get(4..6)?.try_into().ok()?) as usize;
    let udp = udp.get(..udp_len)?;
    let sport = u16::from_be_bytes(udp[0..2].try_into().ok()?);
    let dport = u16::from_be_bytes(udp[2..4].try_into().ok()?);
    let check = u16::from_be_bytes(udp[6..8].try_into().ok()?);
    let udp_checksum_ok = if check == 0 && src_ip.is_ipv4() {
        true
    } else {
        checksum(udp_pseudo_header_sum(src_ip, dst_ip, udp.len()), udp) == 0
    };
    Some(ParsedFrame {
        src_mac,
        dst_mac,
        vlan,
        src: SocketAddr::new(src_ip, sport),
        dst: SocketAddr::new(dst_ip, dport),
        payload: udp[8..].to_vec(),
        ip_checksum_ok,
        udp_checksum_ok,
        udp_checksum: check,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        for (src, dst) in [
            ("198.18.0.10:5070", "198.18.0.100:5060"),
            ("[2001:db8::10]:5070", "[2001:db8::100]:5060"),
        ] {
            let mut spec = FrameSpec::udp(
                src.parse().unwrap(),
                dst.parse().unwrap(),
                b"OPTIONS sip:x SIP/2.0\r\n\r\n",
            );
            spec.vlan = Some((0x8100, 7));
            let p = parse(&spec.build()).unwrap();
            assert_eq!(p.src, spec.src);
            assert_eq!(p.dst, spec.dst);
            assert_eq!(p.vlan, Some((0x8100, 7)));
            assert!(p.ip_checksum_ok && p.udp_checksum_ok);
            assert_eq!(p.payload, spec.payload);
        }
    }
}
