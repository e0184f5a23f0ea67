//! The benchmarks' baseline, an XDP object of its own (`mac-swap`) so that the daemon's
//! object does not carry it: the least an XDP forwarder does. Swaps the Ethernet
//! addresses and sends the frame back out (XDP_TX); `cargo xtask bench` compares the
//! dispatcher's per-packet cost and throughput against it. The sip-dispatch library
//! embeds it only with its `mac-swap` feature.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};
use network_types::eth::EthHdr;

#[xdp]
pub fn mac_swap(ctx: XdpContext) -> u32 {
    let eth = ctx.data() as *mut EthHdr;
    if ctx.data() + size_of::<EthHdr>() > ctx.data_end() {
        return XDP_PASS;
    }
    // SAFETY: the Ethernet header lies within [data, data_end), checked above.
    unsafe {
        let dst = (*eth).dst_addr;
        (*eth).dst_addr = (*eth).src_addr;
        (*eth).src_addr = dst;
    }
    XDP_TX
}

sip_dispatch_ebpf::object_essentials!();
