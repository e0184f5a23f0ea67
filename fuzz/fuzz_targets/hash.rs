//! The streaming Call-ID hasher: fed in pieces of 0 to 8 bytes (`write_word`, and
//! `write_full_word` for whole words, as the XDP program's scanner feeds it) and byte by
//! byte, it must equal `siphash13` and the `siphasher` crate's SipHash-1-3 for any key
//! and data.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sip_dispatch_common::{CallIdHasher, HashKey, hash::siphash13};
use siphasher::sip::SipHasher13;

#[derive(Arbitrary, Debug)]
struct Input {
    key: [u8; 16],
    data: Vec<u8>,
    /// Nibble i (cycled) sizes piece i: 1 + (nibble & 7) bytes, after an empty piece
    /// when its high bit is set.
    pieces: u64,
}

fuzz_target!(|input: Input| {
    let Input { key, data, pieces } = input;
    let key = HashKey::from_bytes(key);
    assert_eq!(HashKey::from_bytes(key.to_bytes()), key);

    let mut by_byte = CallIdHasher::new(key);
    assert!(by_byte.is_empty());
    for (i, &b) in data.iter().enumerate() {
        by_byte.write_byte(b);
        assert_eq!(by_byte.len(), i as u64 + 1);
    }

    let mut by_piece = CallIdHasher::new(key);
    let (mut at, mut i) = (0, 0);
    while at < data.len() {
        let nibble = (pieces >> (4 * (i % 16))) & 15;
        if nibble & 8 != 0 {
            by_piece.write_word(0, 0);
        }
        let n = (1 + (nibble & 7) as usize).min(data.len() - at);
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&data[at..at + n]);
        let w = u64::from_le_bytes(b);
        if n == 8 && i % 2 == 0 {
            by_piece.write_full_word(w);
        } else {
            by_piece.write_word(w, n);
        }
        at += n;
        i += 1;
        assert_eq!(by_piece.len(), at as u64);
    }

    let reference = SipHasher13::new_with_keys(key.k0, key.k1).hash(&data);
    assert_eq!(siphash13(key, &data), reference, "siphash13 vs siphasher");
    assert_eq!(by_byte.finish(), reference, "byte by byte vs siphasher");
    assert_eq!(by_piece.finish(), reference, "in pieces vs siphasher");
});
