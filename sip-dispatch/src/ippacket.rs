//! Whole IP datagrams for the slow path's l2dsr and ipip modes, which hand the kernel
//! an IP packet rather than a payload: an IPv4 or IPv6 UDP datagram with every checksum
//! filled in, and its fragments for a given MTU (RFC 791 for IPv4, RFC 8200 section 4.5
//! for IPv6). Pure functions over byte buffers.
use std::net::{IpAddr, SocketAddr};

use sip_dispatch_common::csum::{checksum, udp_checksum};

pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const UDP_HLEN: usize = 8;
/// The IPv6 Fragment extension header.
pub const FRAG_HLEN: usize = 8;
/// The largest IPv4 datagram (total length field) and IPv6 payload (payload length).
pub const MAX_IP_LEN: usize = 65_535;
const PROTO_UDP: u8 = 17;
const NEXT_FRAGMENT: u8 = 44;
const TTL: u8 = 64;
/// IPv4 flags: More Fragments, Don't Fragment (in the flags/offset word).
const IPV4_MF: u16 = 0x2000;
const IPV4_DF: u16 = 0x4000;

/// The IP datagram carrying `payload` as UDP from `src` to `dst`, with the IP header
/// (IPv4: `ident` as its identification, no DF, header checksum) and the UDP checksum.
/// None when the families differ or it would exceed the length fields.
pub fn udp_datagram(
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    ident: u16,
) -> Option<Vec<u8>> {
    let udp_len = u16::try_from(payload.len().checked_add(UDP_HLEN)?).ok()?;
    let mut udp = [0u8; UDP_HLEN];
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    let mut out;
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(usize::from(udp_len) + IPV4_HLEN).ok()?;
            out = Vec::with_capacity(usize::from(total));
            let mut h = [0u8; IPV4_HLEN];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&total.to_be_bytes());
            h[4..6].copy_from_slice(&ident.to_be_bytes());
            h[8] = TTL;
            h[9] = PROTO_UDP;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let c = checksum(0, &h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out = Vec::with_capacity(IPV6_HLEN + usize::from(udp_len));
            let mut h = [0u8; IPV6_HLEN];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&udp_len.to_be_bytes());
            h[6] = PROTO_UDP;
            h[7] = TTL;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            out.extend_from_slice(&h);
        }
        _ => return None,
    }
    let c = udp_checksum(src.ip(), dst.ip(), &udp, payload);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&udp);
    out.extend_from_slice(payload);
    Some(out)
}

/// Why a datagram cannot be fragmented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragError {
    /// Not a well-formed IPv4 datagram (header, lengths), or its DF bit is set, or it
    /// is already a fragment.
    Malformed,
    /// The MTU leaves no room for 8 bytes of data after the headers.
    MtuTooSmall,
}

/// `datagram` (one IPv4 datagram, as [`udp_datagram`] builds it) as fragments of at
/// most `mtu` bytes: every fragment but the last has MF set and carries a multiple of
/// 8 data bytes; each header keeps the datagram's identification and gets its own
/// length, offset and checksum. A datagram that fits is returned whole.
pub fn fragment_v4(datagram: &[u8], mtu: usize) -> Result<Vec<Vec<u8>>, FragError> {
    let first = *datagram.first().ok_or(FragError::Malformed)?;
    let hlen = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || hlen < IPV4_HLEN || datagram.len() < hlen {
        return Err(FragError::Malformed);
    }
    let total = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    if total != datagram.len() {
        return Err(FragError::Malformed);
    }
    if total <= mtu {
        return Ok(vec![datagram.to_vec()]);
    }
    let flags_offset = u16::from_be_bytes([datagram[6], datagram[7]]);
    if flags_offset & (IPV4_DF | IPV4_MF | 0x1fff) != 0 {
        return Err(FragError::Malformed);
    }
    let chunk = mtu.saturating_sub(hlen) & !7;
    if chunk == 0 {
        return Err(FragError::MtuTooSmall);
    }
    // Options, if any, are copied into every fragment (the datagrams built here have
    // none).
    let (header, data) = datagram.split_at(hlen);
    let mut out = Vec::with_capacity(data.len().div_ceil(chunk));
    for (i, part) in data.chunks(chunk).enumerate() {
        let offset = i * chunk;
        let last = offset + part.len() == data.len();
        let mut f = Vec::with_capacity(hlen + part.len());
        f.extend_from_slice(header);
        let len = (hlen + part.len()) as u16;
        f[2..4].copy_from_slice(&len.to_be_bytes());
        let word = ((offset / 8) as u16) | if last { 0 } else { IPV4_MF };
        f[6..8].copy_from_slice(&word.to_be_bytes());
        f[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(0, &f);
        f[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(part);
        out.push(f);
    }
    Ok(out)
}

/// `datagram` (one IPv6 datagram without extension headers, as [`udp_datagram`]
/// builds it) as fragments of at most `mtu` bytes, each with a Fragment header carrying
/// `ident`; every fragment but the last has M set and a multiple of 8 data bytes. A
/// datagram that fits is returned whole.
pub fn fragment_v6(datagram: &[u8], mtu: usize, ident: u32) -> Result<Vec<Vec<u8>>, FragError> {
    if datagram.len() < IPV6_HLEN || datagram[0] >> 4 != 6 {
        return Err(FragError::Malformed);
    }
    let payload_len = usize::from(u16::from_be_bytes([datagram[4], datagram[5]]));
    if payload_len + IPV6_HLEN != datagram.len() {
        return Err(FragError::Malformed);
    }
    if datagram.len() <= mtu {
        return Ok(vec![datagram.to_vec()]);
    }
    let next_header = datagram[6];
    if next_header == NEXT_FRAGMENT {
        return Err(FragError::Malformed);
    }
    let chunk = mtu.saturating_sub(IPV6_HLEN + FRAG_HLEN) & !7;
    if chunk == 0 {
        return Err(FragError::MtuTooSmall);
    }
    let (header, data) = datagram.split_at(IPV6_HLEN);
    let mut out = Vec::with_capacity(data.len().div_ceil(chunk));
    for (i, part) in data.chunks(chunk).enumerate() {
        let offset = i * chunk;
        let last = offset + part.len() == data.len();
        let mut f = Vec::with_capacity(IPV6_HLEN + FRAG_HLEN + part.len());
        f.extend_from_slice(header);
        f[4..6].copy_from_slice(&((FRAG_HLEN + part.len()) as u16).to_be_bytes());
        f[6] = NEXT_FRAGMENT;
        let word = ((offset / 8) as u16) << 3 | u16::from(!last);
        f.extend_from_slice(&[next_header, 0]);
        f.extend_from_slice(&word.to_be_bytes());
        f.extend_from_slice(&ident.to_be_bytes());
        f.extend_from_slice(part);
        out.push(f);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
