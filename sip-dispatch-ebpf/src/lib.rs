#![no_std]
// The XDP programs are the binary targets, built for bpfel-unknown-none by aya-build (one
// object each, in the userspace crate's OUT_DIR): `sip-dispatch` (src/main.rs), the
// daemon's, and `mac-swap` (src/bin/mac_swap.rs), the benchmarks' baseline. This library
// exists so that the userspace crate can name this package as a build dependency and be
// rebuilt when it changes.

/// What every XDP object of this crate holds besides its programs (each binary is an
/// object of its own): the panic handler a `no_std` binary needs, and the license the
/// kernel reads (GPL-compatible, for the GPL-only helpers).
#[macro_export]
macro_rules! object_essentials {
    () => {
        #[cfg(not(test))]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
    };
}
