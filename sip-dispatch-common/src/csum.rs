//! Incremental Internet checksum update (RFC 1624, eqn. 3): HC' = ~(~HC + ~m + m').
//!
//! Words are taken as they sit in memory (two bytes each, either byte order, as long as
//! the checksum field is read the same way): one's-complement sums commute with byte
//! swapping.

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
