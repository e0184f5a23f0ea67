//! How a dispatched frame reaches its backend, by the service's forwarding mode
//! (`ServiceInfo::flags`): `rewrite` (destination address and port become the
//! backend's, see `rewrite` in main), `l2dsr` (only the Ethernet addresses change) and
//! `ipip` (encapsulated in IP to the backend). In `l2dsr` and `ipip` the backend holds the
//! VIP and answers from it.
use super::*;
use aya_ebpf::helpers::generated::bpf_xdp_adjust_head;
use sip_dispatch_common::{IPPROTO_IPIP, IPPROTO_IPV6};

/// Bytes the outer header of `ipip` adds.
#[inline(always)]
pub(super) fn outer_len(family: u8) -> usize {
    if family == FAMILY_V4 {
        Ipv4Hdr::LEN
    } else {
        Ipv6Hdr::LEN
    }
}

/// `l2dsr` reaches only backends on the link: the FIB's next hop must be the backend
/// itself (after a lookup, the destination field holds the gateway of a routed path).
#[inline(always)]
pub(super) fn on_link(fib: *const FibLookup, backend: &Backend, family: u8) -> bool {
    unsafe {
        if family == FAMILY_V4 {
            (*fib).__bindgen_anon_4.ipv4_dst == backend.addr[0]
        } else {
            (*fib).__bindgen_anon_4.ipv6_dst == backend.addr
        }
    }
}

/// Whether `ipip` has an outer source address for this family (none configured passes).
#[inline(always)]
pub(super) fn check_encap_source(family: u8) -> Result<(), Counter> {
    let src = ENCAP.get(0).ok_or(Counter::PassEncap)?;
    let none = if family == FAMILY_V4 {
        src.v4 == 0
    } else {
        src.v6 == [0; 4]
    };
    if none {
        return Err(Counter::PassEncap);
    }
    Ok(())
}

/// Only the Ethernet addresses change: to the next hop's (the backend's) from the FIB.
#[inline(always)]
pub(super) fn set_macs(ctx: &XdpContext, fib: *const FibLookup) -> Result<(), Counter> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassTruncated)?;
    unsafe {
        (*eth).dst_addr = core::ptr::read_volatile(&raw const (*fib).dmac);
        (*eth).src_addr = core::ptr::read_volatile(&raw const (*fib).smac);
    }
    Ok(())
}

/// Puts an outer IPv4 or IPv6 header (protocol 4 or 41) from the encapsulation source
/// to the backend in front of the IP packet, behind the Ethernet header (and VLAN tag,
/// kept), with the FIB's MACs. The outer header carries the inner one's DSCP and ECN
/// (RFC 6040's normal mode) and, in IPv4, DF with ID 0 (an atomic datagram, RFC 6864:
/// the FIB said it fits the egress MTU). The frame is unchanged when it fails up to the
/// head adjustment; the failures after it cannot happen (the frame only grew) and pass
/// what is left.
///
/// Verifier constraint: the program's stack and a bpf_loop callback's share 512 bytes, so
/// nothing here is built on the stack: the Ethernet header waits in scratch, and the
/// outer header is written field by field into the frame.
#[inline(always)]
pub(super) fn encapsulate(
    ctx: &XdpContext,
    scratch: *mut Scratch,
    dg: &Datagram,
    backend: &Backend,
    fib: *const FibLookup,
) -> Result<(), Counter> {
    let src = ENCAP.get_ptr(0).ok_or(Counter::PassEncap)?;
    let outer = outer_len(dg.family);
    let inner_len = dg.l4 - dg.l3 + UdpHdr::LEN + dg.payload_len;
    // The Ethernet header and a VLAN tag, if any: 18 bytes are always there (the frame
    // holds an IP and a UDP header after them).
    let head = head_of(scratch);
    let eth = ptr_at::<[u64; 2]>(ctx, 0).ok_or(Counter::PassTruncated)?;
    let tag = ptr_at::<[u8; 4]>(ctx, 14).ok_or(Counter::PassTruncated)?;
    unsafe {
        (*head)[0] = core::ptr::read_unaligned(eth)[0];
        (*head)[1] = core::ptr::read_unaligned(eth)[1];
        (*head)[2] = u64::from(u32::from_ne_bytes(*tag));
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer as i32)) } != 0 {
        return Err(Counter::PassEncap);
    }
    // Verifier constraint: adjust_head invalidates every packet pointer taken before it;
    // everything below is derived anew from ctx.
    if dg.family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, dg.l3) else {
            return undo(ctx, outer);
        };
        let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, dg.l3 + outer) else {
            return undo(ctx, outer);
        };
        unsafe {
            (*ip).vihl = 0x45;
            (*ip).tos = (*inner).tos;
            (*ip).tot_len = ((outer + inner_len) as u16).to_be_bytes();
            (*ip).id = [0; 2];
            (*ip).frags = IPV4_DF;
            (*ip).ttl = 64;
            (*ip).proto = IPPROTO_IPIP;
            (*ip).check = [0; 2];
            (*ip).src_addr = (*src).v4.to_ne_bytes();
            (*ip).dst_addr = backend.addr[0].to_ne_bytes();
            (*ip).check = ipv4_header_checksum(ip).to_ne_bytes();
        }
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, dg.l3) else {
            return undo(ctx, outer);
        };
        let Some(inner) = ptr_at::<Ipv6Hdr>(ctx, dg.l3 + outer) else {
            return undo(ctx, outer);
        };
        unsafe {
            // Version 6 and the inner traffic class; no flow label.
            let vcf = (*inner).vcf;
            (*ip).vcf = [vcf[0], vcf[1] & 0xf0, 0, 0];
            (*ip).payload_len = (inner_len as u16).to_be_bytes();
            (*ip).next_hdr = IPPROTO_IPV6;
            (*ip).hop_limit = 64;
            let s = (&raw mut (*ip).src_addr).cast::<[u32; 4]>();
            let d = (&raw mut (*ip).dst_addr).cast::<[u32; 4]>();
            for i in 0..4 {
                core::ptr::write_unaligned(s.cast::<u32>().add(i), (*src).v6[i]);
                core::ptr::write_unaligned(d.cast::<u32>().add(i), backend.addr[i]);
            }
        }
    }
    // The Ethernet header (and tag) at the new start, in front of the outer header
    // (bytes 14..18 belong to the outer header when there is no tag).
    let Some(eth) = ptr_at::<[u64; 2]>(ctx, 0) else {
        return undo(ctx, outer);
    };
    let Some(tag) = ptr_at::<[u8; 4]>(ctx, 14) else {
        return undo(ctx, outer);
    };
    unsafe {
        // The first 16 bytes: the Ethernet header, and the tag's first 2 bytes or the
        // outer header's first 2; the latter are written back right after.
        let outer_start = *tag;
        core::ptr::write_unaligned(eth, [(*head)[0], (*head)[1]]);
        if dg.l3 == 18 {
            *tag = ((*head)[2] as u32).to_ne_bytes();
        } else {
            *tag = outer_start;
        }
    }
    set_macs(ctx, fib)
}

/// Where the Ethernet header waits across `bpf_xdp_adjust_head` (three words of scratch).
#[inline(always)]
fn head_of(scratch: *mut Scratch) -> *mut [u64; 3] {
    unsafe { &raw mut (*private(scratch)).head }
}

/// Takes the headroom back (the frame is as it came) and passes it.
#[inline(always)]
fn undo(ctx: &XdpContext, outer: usize) -> Result<(), Counter> {
    unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) };
    Err(Counter::PassEncap)
}

/// Don't fragment, offset 0 (network byte order).
const IPV4_DF: [u8; 2] = [0x40, 0];

/// The header checksum of an IPv4 header without options (its `check` zero).
#[inline(always)]
fn ipv4_header_checksum(h: *const Ipv4Hdr) -> u16 {
    let words = h.cast::<[u8; 2]>();
    let mut sum = 0u32;
    for i in 0..10 {
        sum += u32::from(u16::from_ne_bytes(unsafe { *words.add(i) }));
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
