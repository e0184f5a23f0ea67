#![no_std]
// The XDP programs are the binary targets, built for bpfel-unknown-none by aya-build (one
// object each, in the userspace crate's OUT_DIR): `sip-dispatch` (src/main.rs), the
// daemon's, and `mac-swap` (src/bin/mac_swap.rs), the benchmarks' baseline. This library
// exists so that the userspace crate can name this package as a build dependency and be
// rebuilt when it changes.
