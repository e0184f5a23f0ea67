//! The backend's next hop (egress interface, MACs, MTU, on-link) from the controller's
//! entry in `sd_nexthop_v1`, so that a packet costs no `bpf_fib_lookup` call (a helper
//! call is expensive on CPUs with the SRSO return thunk). An entry that is not valid
//! (not resolved yet, neighbour not usable, or being rewritten after a change) falls
//! back to the FIB lookup, with the same rules: the MTU check, l2dsr's on-link rule.
use super::*;
use sip_dispatch_common::{NH_ON_LINK, NH_VALID, NextHop};

#[btf_map(name = "sd_nexthop_v1")]
static NEXTHOP: Array<NextHop, { MAX_BACKENDS as usize }> = Array::new();

/// The next hop of backend `backend_id`: its egress `ifindex`, `smac` and `dmac` in the
/// FIB lookup's answer in scratch, from the backend's valid entry or else from a FIB
/// lookup. `extra` is the outer header `ipip` adds (0 otherwise): the packet plus it
/// must fit the egress MTU.
#[inline(always)]
pub(super) fn next_hop(
    ctx: &XdpContext,
    scratch: *mut Scratch,
    dg: &Datagram,
    backend: &Backend,
    backend_id: u32,
    extra: usize,
    mode: u32,
) -> Result<*const FibLookup, Counter> {
    if let Some(entry) = NEXTHOP.get_ptr(backend_id) {
        // The valid bit first, then the data, then the bit and the generation again: the
        // controller changes either the data (with the bit clear, the generation bumped)
        // or only the bit (see `NextHop`), so an entry whose bit and generation did not
        // change meanwhile was read whole, however long this CPU stalled in between.
        let flags = unsafe { core::ptr::read_volatile(&raw const (*entry).flags) };
        let generation = unsafe { core::ptr::read_volatile(&raw const (*entry).generation) };
        if flags & NH_VALID != 0 {
            let mtu = unsafe { core::ptr::read_volatile(&raw const (*entry).mtu) };
            let len = dg.l4 - dg.l3 + UdpHdr::LEN + dg.payload_len + extra;
            // As the FIB's FRAG_NEEDED: too long for the egress path.
            if len > mtu as usize {
                return Err(if extra > 0 {
                    Counter::PassEncap
                } else {
                    Counter::PassFibMiss
                });
            }
            if mode == FWD_L2DSR && flags & NH_ON_LINK == 0 {
                return Err(Counter::PassNotOnLink);
            }
            let fib = unsafe { &raw mut (*private(scratch)).fib };
            // SAFETY: scratch is this CPU's; the entry is map memory of the right type.
            // Volatile reads: a plain copy of the MACs becomes a byte-by-byte `memcpy`.
            unsafe {
                (*fib).ifindex = core::ptr::read_volatile(&raw const (*entry).ifindex);
                (*fib).smac = core::ptr::read_volatile(&raw const (*entry).smac);
                (*fib).dmac = core::ptr::read_volatile(&raw const (*entry).dmac);
            }
            let unchanged = unsafe {
                core::ptr::read_volatile(&raw const (*entry).flags) == flags
                    && core::ptr::read_volatile(&raw const (*entry).generation) == generation
            };
            if unchanged {
                return Ok(fib);
            }
        }
    }
    count(Counter::FibFallback);
    let fib = fib_lookup(ctx, scratch, dg, backend, extra)?;
    if mode == FWD_L2DSR && !forward::on_link(fib, backend, dg.family) {
        return Err(Counter::PassNotOnLink);
    }
    Ok(fib)
}
