//! Incremental Internet checksum update (RFC 1624, eqn. 3): HC' = ~(~HC + ~m + m').
//!
//! Words are taken as they sit in memory (two bytes each, either byte order, as long as
//! the checksum field is read the same way): one's-complement sums commute with byte
//! swapping.
use core::net::IpAddr;

const PROTO_UDP: u8 = 17;

/// The running sum of `~m + m'` over the replaced words.
#[derive(Clone, Copy, Debug, Default)]
pub struct CsumDelta(u32);

impl CsumDelta {
    #[inline(always)]
    pub fn replace(&mut self, old: u16, new: u16) {
        self.0 += (!old) as u32 + new as u32;
    }

    #[inline(always)]
    pub fn replace_u32(&mut self, old: u32, new: u32) {
        self.replace(old as u16, new as u16);
        self.replace((old >> 16) as u16, (new >> 16) as u16);
    }

    /// The updated checksum field.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        let mut s = (!check) as u32 + self.0;
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }

    /// The updated UDP checksum field: an IPv4 checksum of 0 means "none" and stays 0
    /// (RFC 768); a computed 0 is sent as 0xffff.
    #[inline(always)]
    pub fn apply_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        match self.apply(check) {
            0 => 0xffff,
            c => c,
        }
    }
}

/// The full Internet checksum of `data` plus an initial sum (host tests and userspace).
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut s = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        s += (*last as u64) << 8;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The one's-complement sum (not inverted) of the UDP pseudo-header for `src` -> `dst`
/// and `udp_len` bytes of UDP (header and payload). IPv4 addresses in a mixed pair count
/// as IPv4-mapped IPv6 (host tests and userspace).
pub fn udp_pseudo_header_sum(src: IpAddr, dst: IpAddr, udp_len: usize) -> u32 {
    fn v6_octets(a: IpAddr) -> [u8; 16] {
        match a {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        }
    }
    let sum = |bytes: &[u8]| u32::from(!checksum(0, bytes));
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = [0u8; 12];
            p[0..4].copy_from_slice(&s.octets());
            p[4..8].copy_from_slice(&d.octets());
            p[9] = PROTO_UDP;
            p[10..12].copy_from_slice(&(udp_len as u16).to_be_bytes());
            sum(&p)
        }
        _ => {
            let mut p = [0u8; 40];
            p[0..16].copy_from_slice(&v6_octets(src));
            p[16..32].copy_from_slice(&v6_octets(dst));
            p[32..36].copy_from_slice(&(udp_len as u32).to_be_bytes());
            p[39] = PROTO_UDP;
            sum(&p)
        }
    }
}

/// The UDP checksum over the pseudo-header of `src` -> `dst`, the UDP header (checksum
/// field 0, even length) and the payload; a computed 0 is sent as all ones (RFC 768,
/// RFC 8200 8.1) (host tests and userspace).
pub fn udp_checksum(src: IpAddr, dst: IpAddr, udp_header: &[u8], payload: &[u8]) -> u16 {
    let pseudo = udp_pseudo_header_sum(src, dst, udp_header.len() + payload.len());
    // The pseudo-header and the UDP header are of even length, so the running sum
    // carries over unchanged into the payload's.
    let header_sum = u32::from(!checksum(pseudo, udp_header));
    match checksum(header_sum, payload) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_update_equals_recomputation() {
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..10_000 {
            let mut data: [u8; 20] = core::array::from_fn(|_| next() as u8);
            data[10] = 0;
            data[11] = 0;
            let check = checksum(0, &data);
            let old = u16::from_be_bytes([data[16], data[17]]);
            let new = next() as u16;
            data[16..18].copy_from_slice(&new.to_be_bytes());
            let mut d = CsumDelta::default();
            d.replace(old, new);
            let want = checksum(0, &data);
            let got = d.apply(check);
            // 0x0000 and 0xffff are both zero in one's complement.
            assert!(got == want || (got == 0xffff && want == 0) || (got == 0 && want == 0xffff));
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_is_ffff() {
        let mut d = CsumDelta::default();
        d.replace(0x1111, 0x2222);
        assert_eq!(d.apply_udp(0), 0);
        // Find a check value whose update yields 0.
        let hit = (1..=0xffffu16)
            .find(|&c| d.apply(c) == 0)
            .expect("some check updates to 0");
        assert_eq!(d.apply_udp(hit), 0xffff);
    }
}
