//! The keyed Call-ID hash: SipHash-1-3 with a 128-bit key, fed in pieces of up to 8
//! bytes.
//!
//! Streaming lets the XDP program hash the Call-ID value in the same pass that finds it
//! (one bounded loop for the verifier instead of two), a word at a time between the
//! blanks it skips. The result equals SipHash-1-3 over the fed bytes, so it is checked
//! against a reference implementation.

/// The 128-bit hash key. Every dispatcher of one farm must use the same key (and the same
/// backends) to send a Call-ID to the same backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashKey {
    pub k0: u64,
    pub k1: u64,
}

impl HashKey {
    /// The documented default key: the ASCII bytes of `sip-dispatch-v1!`, i.e.
    /// `7369702d64697370617463682d763121` in hex.
    pub const DEFAULT: HashKey = HashKey::from_bytes(*b"sip-dispatch-v1!");

    /// Key from 16 bytes: k0 is the first 8 bytes and k1 the last 8, little-endian
    /// (the convention of the SipHash reference code).
    pub const fn from_bytes(b: [u8; 16]) -> HashKey {
        HashKey {
            k0: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            k1: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }

    pub const fn to_bytes(self) -> [u8; 16] {
        let a = self.k0.to_le_bytes();
        let b = self.k1.to_le_bytes();
        [
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1], b[2], b[3], b[4], b[5],
            b[6], b[7],
        ]
    }

    /// Parses 32 hex digits. Returns `None` for anything else.
    pub fn from_hex(s: &str) -> Option<HashKey> {
        let s = s.as_bytes();
        if s.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 16 {
            out[i] = (hex_digit(s[2 * i])? << 4) | hex_digit(s[2 * i + 1])?;
            i += 1;
        }
        Some(HashKey::from_bytes(out))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// SipHash-1-3 state, fed in pieces. `repr(C)` without padding: see [`crate::Scanner`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CallIdHasher {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
    /// Bytes of the current, incomplete 8-byte word.
    tail: u64,
    /// Bytes fed so far.
    len: u64,
}

impl CallIdHasher {
    #[inline(always)]
    pub const fn new(key: HashKey) -> Self {
        CallIdHasher {
            v0: key.k0 ^ 0x736f6d6570736575,
            v1: key.k1 ^ 0x646f72616e646f6d,
            v2: key.k0 ^ 0x6c7967656e657261,
            v3: key.k1 ^ 0x7465646279746573,
            tail: 0,
            len: 0,
        }
    }

    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13);
        self.v1 ^= self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16);
        self.v3 ^= self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21);
        self.v3 ^= self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17);
        self.v1 ^= self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    #[inline(always)]
    fn compress(&mut self, m: u64) {
        self.v3 ^= m;
        self.round();
        self.v0 ^= m;
    }

    #[inline(always)]
    pub fn write_byte(&mut self, b: u8) {
        let shift = (self.len & 7) * 8;
        self.tail |= (b as u64) << shift;
        self.len += 1;
        if self.len & 7 == 0 {
            let m = self.tail;
            self.compress(m);
            self.tail = 0;
        }
    }

    /// Feeds the low `n` bytes of `w` (`n` is 0..=8; the bytes above them must be 0),
    /// as `n` calls of `write_byte` would.
    #[inline(always)]
    pub fn write_word(&mut self, w: u64, n: usize) {
        let fill = self.len & 7;
        let shift = fill * 8;
        self.tail |= w << shift;
        self.len += n as u64;
        if fill + n as u64 >= 8 {
            let m = self.tail;
            self.compress(m);
            // The bytes that did not fit (none when the word started aligned): two
            // shifts, because a shift by 64 is not defined.
            self.tail = (w >> (63 - shift)) >> 1;
        }
    }

    /// Feeds the 8 bytes of `w`, without a branch.
    #[inline(always)]
    pub fn write_full_word(&mut self, w: u64) {
        let shift = (self.len & 7) * 8;
        let m = self.tail | (w << shift);
        self.compress(m);
        self.tail = (w >> (63 - shift)) >> 1;
        self.len += 8;
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }

    /// Bytes fed so far.
    #[inline(always)]
    pub const fn len(&self) -> u64 {
        self.len
    }

    #[inline(always)]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline(always)]
    pub fn finish(mut self) -> u64 {
        let b = ((self.len & 0xff) << 56) | self.tail;
        self.compress(b);
        self.v2 ^= 0xff;
        self.round();
        self.round();
        self.round();
        self.v0 ^ self.v1 ^ self.v2 ^ self.v3
    }
}

/// SipHash-1-3 of `bytes` under `key`.
pub fn siphash13(key: HashKey, bytes: &[u8]) -> u64 {
    let mut h = CallIdHasher::new(key);
    h.write(bytes);
    h.finish()
}

/// The hash of a Call-ID value as the scanner computes it: SipHash-1-3 under `key` of the
/// value without its spaces and tabs (the scanner drops them as it reads). Userspace's one
/// form of it: the controller's `which`, the reference scanner and the tests.
pub fn call_id_hash(key: HashKey, value: &[u8]) -> u64 {
    let mut h = CallIdHasher::new(key);
    for &b in value {
        if b != b' ' && b != b'\t' {
            h.write_byte(b);
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use siphasher::sip::SipHasher13;

    fn reference(key: HashKey, bytes: &[u8]) -> u64 {
        SipHasher13::new_with_keys(key.k0, key.k1).hash(bytes)
    }

    #[test]
    fn matches_the_reference_siphash13_for_every_length() {
        let keys = [
            HashKey::DEFAULT,
            HashKey { k0: 0, k1: 0 },
            HashKey::from_bytes([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]),
        ];
        let data: [u8; 600] = core::array::from_fn(|i| (i * 7 + 3) as u8);
        for key in keys {
            for n in 0..data.len() {
                assert_eq!(
                    siphash13(key, &data[..n]),
                    reference(key, &data[..n]),
                    "len {n}"
                );
            }
        }
    }

    #[test]
    fn a_call_id_hash_covers_the_value_without_its_blanks() {
        use std::vec::Vec;
        let values: [&[u8]; 5] = [
            b"",
            b"a84b4c76e66710@pc33",
            b" \t x y\t",
            b"\t\t",
            b"a\r\nb  c",
        ];
        for v in values {
            let kept: Vec<u8> = v
                .iter()
                .copied()
                .filter(|&b| b != b' ' && b != b'\t')
                .collect();
            assert_eq!(
                call_id_hash(HashKey::DEFAULT, v),
                reference(HashKey::DEFAULT, &kept),
                "{v:?}"
            );
        }
    }

    #[test]
    fn word_writes_equal_byte_writes() {
        let data: [u8; 100] = core::array::from_fn(|i| (i * 13 + 5) as u8);
        // Every split of the data into chunks of 0..=8 bytes from a simple generator.
        for seed in 0..200u64 {
            let mut h = CallIdHasher::new(HashKey::DEFAULT);
            let mut at = 0;
            let mut x = seed;
            while at < data.len() {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let n = ((x >> 33) % 9) as usize;
                let n = n.min(data.len() - at);
                let mut w = [0u8; 8];
                w[..n].copy_from_slice(&data[at..at + n]);
                let w = u64::from_le_bytes(w);
                if n == 8 && x & (1 << 40) != 0 {
                    h.write_full_word(w);
                } else {
                    h.write_word(w, n);
                }
                at += n;
                assert_eq!(h.len(), at as u64);
                assert_eq!(
                    h.finish(),
                    siphash13(HashKey::DEFAULT, &data[..at]),
                    "seed {seed} at {at}"
                );
            }
        }
    }

    /// Golden vectors: the XDP program's kernel test checks the same numbers.
    #[test]
    fn golden_vectors() {
        for (input, want) in GOLDEN {
            assert_eq!(
                siphash13(HashKey::DEFAULT, input.as_bytes()),
                *want,
                "{input:?}"
            );
        }
    }

    /// The same vectors are checked against the kernel in the XDP program's tests.
    pub(crate) const GOLDEN: &[(&str, u64)] = &[
        ("", 0xb1e1204f5e851eba),
        ("a84b4c76e66710@pc33.atlanta.com", 0x8ccb167c1fc71768),
        ("1-4242@198.18.0.10", 0xd388c586b2cc11ba),
    ];

    #[test]
    fn hex_keys() {
        assert_eq!(
            HashKey::from_hex("7369702d64697370617463682d763121"),
            Some(HashKey::DEFAULT)
        );
        assert_eq!(
            HashKey::from_hex("7369702D64697370617463682D763121"),
            Some(HashKey::DEFAULT)
        );
        assert_eq!(HashKey::from_hex("7369702d64697370617463682d7631"), None);
        assert_eq!(HashKey::from_hex("7369702d64697370617463682d76312g"), None);
        let k = HashKey::from_bytes(*b"0123456789abcdef");
        assert_eq!(HashKey::from_bytes(k.to_bytes()), k);
    }
}
