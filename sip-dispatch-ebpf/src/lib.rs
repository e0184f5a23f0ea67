#![no_std]
// The XDP program is the `sip-dispatch` binary target (src/main.rs), built for
// bpfel-unknown-none by aya-build. This library exists so that the userspace crate can
// name this package as a build dependency and be rebuilt when it changes.
