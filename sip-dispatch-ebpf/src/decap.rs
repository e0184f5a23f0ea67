//! The backend's side of `ipip` for hosts whose kernel has no ipip/ip6tnl tunnel
//! (`sip-dispatch decap`): an IPv4-in-IPv4 or IPv6-in-IPv6 packet loses its outer header
//! and goes on to the stack, which delivers the inner datagram to the VIP on `lo`. A
//! fragmented outer packet, a VLAN-tagged frame and anything else pass unchanged (the
//! dispatcher never fragments the outer packet: its slow path fragments the inner one).
use super::*;
use aya_ebpf::helpers::generated::bpf_xdp_adjust_head;

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;

#[xdp]
pub fn ipip_decap(ctx: XdpContext) -> u32 {
    let _ = decapsulate(&ctx);
    XDP_PASS
}

#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> Option<()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ether_type = unsafe { (*eth).ether_type };
    let outer = if ether_type == EtherType::Ipv4 as u16 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
        let ip = unsafe { &*ip };
        // Options or fragments (MF or an offset): left to the stack.
        if ip.vihl != 0x45 || ip.proto != IPPROTO_IPIP || u16::from_be_bytes(ip.frags) & 0x3fff != 0
        {
            return None;
        }
        Ipv4Hdr::LEN
    } else if ether_type == EtherType::Ipv6 as u16 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
        if unsafe { (*ip).next_hdr } != IPPROTO_IPV6 {
            return None;
        }
        Ipv6Hdr::LEN
    } else {
        return None;
    };
    // The inner header must be there, of the outer's family.
    let inner: *const u8 = ptr_at(ctx, EthHdr::LEN + outer)?;
    let version = unsafe { *inner } >> 4;
    if (outer == Ipv4Hdr::LEN && version != 4) || (outer == Ipv6Hdr::LEN && version != 6) {
        return None;
    }
    let (dst, src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) } != 0 {
        return None;
    }
    // Verifier constraint: adjust_head invalidates every packet pointer taken before it.
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
        (*eth).ether_type = ether_type;
    }
    Some(())
}
