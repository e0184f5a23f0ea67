//! The streaming Call-ID hasher: fed one byte at a time, with the XDP program's
//! `set_len(len())` round trips in between (see `parse::ByteWindow::opaque`), it must
//! equal `siphash13` and the `siphasher` crate's SipHash-1-3 for any key and data.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sip_dispatch_common::{CallIdHasher, HashKey, hash::siphash13};
use siphasher::sip::SipHasher13;

#[derive(Arbitrary, Debug)]
struct Input {
    key: [u8; 16],
    data: Vec<u8>,
    /// Bit i (cycled): round-trip the byte count after byte i.
    set_len_mask: u64,
}

fuzz_target!(|input: Input| {
    let Input {
        key,
        data,
        set_len_mask,
    } = input;
    let key = HashKey::from_bytes(key);
    assert_eq!(HashKey::from_bytes(key.to_bytes()), key);

    let mut h = CallIdHasher::new(key);
    assert!(h.is_empty());
    for (i, &b) in data.iter().enumerate() {
        h.write_byte(b);
        if set_len_mask >> (i % 64) & 1 == 1 {
            h.set_len(h.len());
        }
        assert_eq!(h.len(), i as u64 + 1);
    }
    let streamed = h.finish();

    let reference = SipHasher13::new_with_keys(key.k0, key.k1).hash(&data);
    assert_eq!(siphash13(key, &data), reference, "siphash13 vs siphasher");
    assert_eq!(streamed, reference, "byte-by-byte vs siphasher");
});
