//! The backend's side of `ipip` for hosts whose kernel has no ipip/ip6tnl tunnel
//! (`sip-dispatch decap`): an IPv4-in-IPv4 or IPv6-in-IPv6 packet from one of the
//! accepted outer sources (the dispatchers', in [`DECAP_FROM`]) loses its outer header and
//! goes on to the stack, which delivers the inner datagram to the VIP on `lo`. IP-in-IP
//! from any other source, a fragmented outer packet, an outer IPv4 header with options,
//! an inner header of another family, a VLAN-tagged frame and anything else pass
//! unchanged (without a tunnel device the stack drops IP-in-IP; the dispatcher never
//! fragments the outer packet: its slow path fragments the inner one).
use super::*;
use aya_ebpf::helpers::generated::bpf_xdp_adjust_head;
use sip_dispatch_common::{DecapSource, IPPROTO_IPIP, IPPROTO_IPV6, MAX_DECAP_SOURCES};

/// The accepted outer sources, filled by `sip-dispatch decap` before it attaches.
#[btf_map(name = "sd_decapsrc_v1")]
static DECAP_FROM: HashMap<DecapSource, u8, { MAX_DECAP_SOURCES as usize }> = HashMap::new();

#[xdp]
pub fn ipip_decap(ctx: XdpContext) -> u32 {
    let _ = decapsulate(&ctx);
    XDP_PASS
}

#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> Option<()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ether_type = unsafe { (*eth).ether_type };
    let mut from = DecapSource::default();
    let outer = if ether_type == EtherType::Ipv4 as u16 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
        let ip = unsafe { &*ip };
        // Options or fragments (MF or an offset): left to the stack.
        if ip.vihl != 0x45 || ip.proto != IPPROTO_IPIP || u16::from_be_bytes(ip.frags) & 0x3fff != 0
        {
            return None;
        }
        from.addr[0] = u32::from_ne_bytes(ip.src_addr);
        from.family = FAMILY_V4;
        Ipv4Hdr::LEN
    } else if ether_type == EtherType::Ipv6 as u16 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
        // A fragment header (or any other extension header) in front of the inner
        // packet makes the next header something else than 41: left to the stack.
        if unsafe { (*ip).next_hdr } != IPPROTO_IPV6 {
            return None;
        }
        let src = unsafe { (*ip).src_addr };
        for (i, word) in from.addr.iter_mut().enumerate() {
            *word =
                u32::from_ne_bytes([src[4 * i], src[4 * i + 1], src[4 * i + 2], src[4 * i + 3]]);
        }
        from.family = FAMILY_V6;
        Ipv6Hdr::LEN
    } else {
        return None;
    };
    // Only the dispatchers' encapsulation: anyone else could inject packets with any
    // inner source, and netfilter, which runs after XDP, would never see the outer one.
    unsafe { DECAP_FROM.get(from) }?;
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
