//! The XDP fast path of sip-dispatch.
//!
//! For a UDP datagram sent to a configured service (VIP, port): find and hash the
//! Call-ID (the shared `sip_dispatch_common::scan_call_id`), pick the backend from the
//! service's slot table, rewrite destination IP/port/MACs, patch the checksums and send
//! it out (XDP_TX, or XDP_REDIRECT through the tx ports devmap). Everything else passes
//! to the kernel stack untouched; what was meant for a service but could not be handled
//! is counted by reason.
//!
//! With call affinity on, a message of a call the affinity map knows follows the call's
//! entry instead of the table, by the rules of `sip_dispatch_common::affinity::choose`.
//!
//! The maps are declared here and in the modules (`#[btf_map(name = "...")]` takes only a
//! string literal); their names and layouts are the table `sip_dispatch_common::MAPS`,
//! which a unit test of the daemon compares with this object.
//!
//! # How accesses are proven to the verifier
//!
//! Every `unsafe` dereference in this crate is of a pointer that one of these checks
//! produced, in a form the verifier follows:
//! - Frame bytes: only through `ptr_at::<T>(ctx, offset)`, which compares
//!   `data + offset + size_of::<T>()` with `data_end` and gives `None` past it. Offsets
//!   read from the frame (IHL, IPv6 extension header lengths) go through it again at
//!   each use. `bpf_xdp_adjust_head` invalidates every frame pointer: code after it
//!   takes them anew from `ctx`.
//! - The UDP payload is not read in place: `bpf_xdp_load_bytes` copies it into per-CPU
//!   scratch (a map value of a fixed size) with a length proven to lie in
//!   `1..=SCAN_WINDOW`, and the scanners read it through `Window`, whose indices are
//!   masked with `SCAN_WINDOW - 1` (a power of two): in bounds whatever the index.
//!   Scratch has 8 bytes of padding so that the second load of an unaligned word stays
//!   inside it.
//! - Map values: `get`, `get_ptr` and `get_ptr_mut` give an `Option` (the verifier's
//!   null check); `None` takes another way (pass with a counted reason, or skip a
//!   counter), never a dereference.
//! - Loops: bounded by `may_goto` or run as `bpf_loop` callbacks; what crosses from one
//!   step to the next lives in scratch and is read volatile, so the verifier tracks no
//!   value across the back edge and walks the body once.
//!
//! Comments starting "Verifier constraint" say why a piece of code has the shape it has.
#![no_std]
#![no_main]
// `may_goto` through inline asm (the BPF target's asm is unstable).
#![feature(asm_experimental_arch)]

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibLookup,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    btf_maps::{Array, ArrayOfMaps, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    helpers::generated::{
        bpf_fib_lookup, bpf_for_each_map_elem, bpf_ktime_get_coarse_ns, bpf_loop,
        bpf_xdp_load_bytes,
    },
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vlan::VlanHdr,
};
use sip_dispatch_common::{
    AFFINITY_ENTRIES_MIN, AffinityEntry, AffinityKey, BACKEND_FLAGS_MAP_FLAGS, Backend,
    BackendFlags, BackendStats, Config, Counter, EncapSource, FAMILY_V4, FAMILY_V6, FWD_IPIP,
    FWD_L2DSR, FWD_MASK, HashKey, MAX_BACKENDS, MAX_SERVICES, MAX_TX_PORTS, NO_BACKEND,
    SCAN_WINDOW, SCRATCH_XDP_WORDS, SERVICE_PORT_WORDS, SERVICES_MAP_FLAGS, SLOTS, Scan,
    ScanOutcome, Scanner, Scratch, ServiceInfo, ServiceKey, TABLE_MAP_FLAGS,
    affinity::{EntryWrite, Route, choose, classify_word, created_flags},
    census::{CensusInput, HELD_ENTRIES, HELD_SLOTS, HELD_STALE, holds_call},
    csum::CsumDelta,
    parse::{
        ByteWindow, Step, ToTag, ToTagScanner, ToTagStep,
        start_line::{first_line_end, start_line_fast_at},
    },
    service_port_bit, slot_of,
};

mod affinity;
mod census;
mod decap;
mod forward;
mod nexthop;

use affinity::{ToTagJob, pick_with_affinity};

const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[btf_map(name = "sd_services_v1")]
static SERVICES: HashMap<
    ServiceKey,
    ServiceInfo,
    { MAX_SERVICES as usize },
    { SERVICES_MAP_FLAGS as usize },
> = HashMap::new();
#[btf_map(name = "sd_ports_v1")]
static SERVICE_PORTS: Array<u64, { SERVICE_PORT_WORDS as usize }> = Array::new();
#[btf_map(name = "sd_tables_v2")]
static TABLES: ArrayOfMaps<
    Array<u32, SLOTS, { TABLE_MAP_FLAGS as usize }>,
    { MAX_SERVICES as usize },
> = ArrayOfMaps::new();
#[btf_map(name = "sd_backends_v1")]
static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();
#[btf_map(name = "sd_bstats_v1")]
static BACKEND_STATS: PerCpuArray<BackendStats, { MAX_BACKENDS as usize }> = PerCpuArray::new();
#[btf_map(name = "sd_counters_v5")]
static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();
#[btf_map(name = "sd_config_v1")]
static CONFIG: Array<Config, 1> = Array::new();
#[btf_map(name = "sd_txports_v1")]
static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();
#[btf_map(name = "sd_encap_v1")]
static ENCAP: Array<EncapSource, 1> = Array::new();
#[btf_map(name = "sd_scratch_v2")]
static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();
/// The size here is a placeholder: the loader sets it (`--affinity-entries`).
#[btf_map(name = "sd_affinity_v1")]
static AFFINITY: LruHashMap<AffinityKey, AffinityEntry, { AFFINITY_ENTRIES_MIN as usize }> =
    LruHashMap::new();
#[btf_map(name = "sd_bflags_v1")]
static BACKEND_FLAGS: Array<
    BackendFlags,
    { MAX_BACKENDS as usize },
    { BACKEND_FLAGS_MAP_FLAGS as usize },
> = Array::new();

/// Output of the held-call census (`affinity_census`).
#[btf_map(name = "sd_held_v1")]
static HELD: Array<u64, { HELD_SLOTS as usize }> = Array::new();

/// 1: call affinity on (`--affinity on`), set by the loader. It lives in `.rodata`, which
/// the loader freezes, so the verifier knows its value and drops the branch not taken:
/// with affinity off the program is today's stateless one.
#[unsafe(no_mangle)]
static AFFINITY_ON: u8 = 1;

/// The dispatcher: the scans loop inside the program, bounded by `may_goto` (kernel
/// 6.9 and later).
#[xdp]
pub fn sip_dispatch(ctx: XdpContext) -> u32 {
    run::<MAY_GOTO>(&ctx)
}

/// The same dispatcher with the scans driven by `bpf_loop` callbacks, for kernels
/// without `may_goto` (the loader picks it, see `PROG_DISPATCH_CALLBACK`).
#[xdp]
pub fn sip_dispatch_cb(ctx: XdpContext) -> u32 {
    run::<BPF_LOOP>(&ctx)
}

/// Whether the kernel knows `may_goto`: the loader loads this first (older kernels
/// reject the unknown instruction) and picks `sip_dispatch` or `sip_dispatch_cb`.
#[xdp]
pub fn may_goto_probe(_ctx: XdpContext) -> u32 {
    if may_goto_exhausted() {
        return XDP_DROP;
    }
    XDP_PASS
}

/// How the scans loop: within the program (`may_goto`), or a `bpf_loop` callback.
type LoopKind = bool;
const MAY_GOTO: LoopKind = true;
const BPF_LOOP: LoopKind = false;

#[inline(always)]
fn run<const LOOP: LoopKind>(ctx: &XdpContext) -> u32 {
    count(Counter::Seen);
    match dispatch::<LOOP>(ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            XDP_PASS
        }
    }
}

/// Passes everything. Attach it to the peer of a veth that runs `sip_dispatch` in native
/// mode: veth drops XDP_TX/XDP_REDIRECT frames unless the receiving peer runs XDP.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter as u32) {
        unsafe { *c += 1 };
    }
}

/// A pointer to a `T` at `offset` in the frame, if the frame is long enough.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The parsed headers of a UDP datagram for a service.
struct Datagram {
    family: u8,
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the UDP header.
    l4: usize,
    /// UDP payload length from the UDP header.
    payload_len: usize,
    key: ServiceKey,
    src: [u32; 4],
    /// Why the fast path leaves this datagram to the stack, if it does.
    unhandled: Option<Counter>,
}

/// Ok(action) when dispatched; Ok(XDP_PASS) for traffic that is not ours (counted as
/// such); Err(reason) for service traffic the fast path leaves to the stack.
#[inline(always)]
fn dispatch<const LOOP: LoopKind>(ctx: &XdpContext) -> Result<u32, Counter> {
    let Some(dg) = parse(ctx)? else {
        count(Counter::NotService);
        return Ok(XDP_PASS);
    };
    let Some(service) = (unsafe { SERVICES.get(&dg.key) }) else {
        count(Counter::NotService);
        return Ok(XDP_PASS);
    };
    let service_id = service.id;
    let mode = service.flags & FWD_MASK;
    if let Some(reason) = dg.unhandled {
        return Err(reason);
    }

    let scratch = SCRATCH.get_ptr_mut(0).ok_or(Counter::PassNoCallId)?;
    let hash = call_id_hash::<LOOP>(ctx, scratch, &dg)?;
    // Volatile: a plain read of a `static` is folded to its initial value at compile
    // time, and `--affinity off` would run affinity. Read from the frozen `.rodata` map,
    // the value is a known constant to the verifier, which drops the other branch.
    let backend_id = if unsafe { core::ptr::read_volatile(&AFFINITY_ON) } != 0 {
        pick_with_affinity::<LOOP>(scratch, service_id, hash)?
    } else {
        table_pick(service_id, hash)?
    };
    let backend = *BACKENDS.get(backend_id).ok_or(Counter::PassNoBackend)?;
    if backend.family != dg.family {
        return Err(Counter::PassNoBackend);
    }

    // Everything that can refuse the frame comes before the first write to it.
    let extra = if mode == FWD_IPIP {
        forward::check_encap_source(dg.family)?;
        forward::outer_len(dg.family)
    } else {
        0
    };
    let fib = nexthop::next_hop(ctx, scratch, &dg, &backend, backend_id, extra, mode)?;
    let ingress = ctx.ingress_ifindex() as u32;
    let egress = unsafe { (*fib).ifindex };
    if egress != ingress && TX_PORTS.get_ifindex(egress).is_none() {
        return Err(Counter::PassNoTxPort);
    }

    match mode {
        FWD_L2DSR => forward::set_macs(ctx, fib)?,
        FWD_IPIP => forward::encapsulate(ctx, scratch, &dg, &backend, fib)?,
        _ => rewrite(ctx, &dg, &backend, fib)?,
    }

    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        let len = (ctx.data_end() - ctx.data()) as u64;
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len;
        }
    }
    if egress == ingress {
        count(Counter::Tx);
        return Ok(XDP_TX);
    }
    match TX_PORTS.redirect(egress, 0) {
        Ok(action) => {
            count(Counter::Redirect);
            Ok(action)
        }
        // The port vanished between the check and now; the frame is already rewritten,
        // so passing it would deliver it to the stack with the backend's address: drop.
        Err(_) => {
            count(Counter::DropRedirectFailed);
            Ok(XDP_DROP)
        }
    }
}

/// Whether a service listens on this UDP port (network order), on any VIP.
#[inline(always)]
fn service_port(port_be: u16) -> bool {
    let (word, bit) = service_port_bit(u16::from_be(port_be));
    SERVICE_PORTS.get(word).is_some_and(|w| w & bit != 0)
}

/// The slot table's backend for a Call-ID hash.
#[inline(always)]
fn table_pick(service_id: u32, hash: u64) -> Result<u32, Counter> {
    let id = *TABLES
        .get_value(service_id, &slot_of(hash))
        .ok_or(Counter::PassNoBackend)?;
    if id == NO_BACKEND {
        return Err(Counter::PassNoBackend);
    }
    Ok(id)
}

#[inline(always)]
fn backend_flags(id: u32) -> BackendFlags {
    BACKEND_FLAGS.get(id).copied().unwrap_or_default()
}

/// IPv6 extension headers walked to find the UDP header. Longer chains are passed.
const MAX_IPV6_EXT: usize = 4;

/// Ethernet (at most one 802.1Q/802.1ad tag), IPv4 (any header length) or IPv6, UDP.
/// `Ok(None)` for frames that are not UDP at all, or not to a port a service uses. A datagram the fast path cannot
/// dispatch (IPv6 extension headers, a first fragment, bad lengths) still comes back
/// with its service key, so that only service traffic is counted by reason.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Option<Datagram>, Counter> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassTruncated)?;
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = EthHdr::LEN;
    if ether_type == EtherType::Ieee8021q as u16 || ether_type == EtherType::Ieee8021ad as u16 {
        let vlan: *const VlanHdr = ptr_at(ctx, l3).ok_or(Counter::PassTruncated)?;
        ether_type = unsafe { (*vlan).ether_type };
        l3 += VlanHdr::LEN;
    }
    let frame_len = ctx.data_end() - ctx.data();

    let mut key = ServiceKey::default();
    let mut src = [0u32; 4];
    let mut unhandled = None;
    let (family, l4, ip_end) = if ether_type == EtherType::Ipv4 as u16 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(Counter::PassTruncated)?;
        let ip = unsafe { &*ip };
        if ip.proto != IPPROTO_UDP {
            return Ok(None);
        }
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ihl < Ipv4Hdr::LEN {
            return Err(Counter::PassTruncated);
        }
        let frags = u16::from_be_bytes(ip.frags);
        if frags & 0x1fff != 0 {
            // A later fragment carries no UDP header, so no port to tell the service by.
            return Err(Counter::PassFragment);
        }
        if frags & 0x2000 != 0 {
            // First fragment: reassembly is the stack's job.
            unhandled = Some(Counter::PassFragment);
        }
        key.addr[0] = u32::from_ne_bytes(ip.dst_addr);
        src[0] = u32::from_ne_bytes(ip.src_addr);
        let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
        (FAMILY_V4, l3 + ihl, l3 + tot_len)
    } else if ether_type == EtherType::Ipv6 as u16 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(Counter::PassTruncated)?;
        let ip = unsafe { &*ip };
        key.addr = words(&ip.dst_addr);
        src = words(&ip.src_addr);
        let ip_end = l3 + Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize;
        let mut next = ip.next_hdr;
        let mut l4 = l3 + Ipv6Hdr::LEN;
        for _ in 0..MAX_IPV6_EXT {
            let ext_len = match next {
                IPPROTO_UDP => break,
                // Hop-by-hop, routing, destination options: (length + 1) * 8 bytes.
                0 | 43 | 60 => {
                    let h: *const [u8; 2] = ptr_at(ctx, l4).ok_or(Counter::PassTruncated)?;
                    (unsafe { (*h)[1] } as usize + 1) * 8
                }
                44 => {
                    let h: *const [u8; 4] = ptr_at(ctx, l4).ok_or(Counter::PassTruncated)?;
                    if u16::from_be_bytes(unsafe { [(*h)[2], (*h)[3]] }) & 0xfff8 != 0 {
                        return Err(Counter::PassFragment);
                    }
                    unhandled = Some(Counter::PassFragment);
                    8
                }
                // Authentication header: (length + 2) * 4 bytes.
                51 => {
                    let h: *const [u8; 2] = ptr_at(ctx, l4).ok_or(Counter::PassTruncated)?;
                    (unsafe { (*h)[1] } as usize + 2) * 4
                }
                _ => return Ok(None),
            };
            let h: *const u8 = ptr_at(ctx, l4).ok_or(Counter::PassTruncated)?;
            next = unsafe { *h };
            l4 += ext_len;
            if unhandled.is_none() {
                unhandled = Some(Counter::PassIpv6Ext);
            }
        }
        if next != IPPROTO_UDP {
            return Ok(None);
        }
        (FAMILY_V6, l4, ip_end)
    } else {
        return Ok(None);
    };
    key.family = family;

    let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(Counter::PassTruncated)?;
    let udp = unsafe { &*udp };
    key.port = u16::from_ne_bytes(udp.dst);
    if !service_port(key.port) {
        return Ok(None);
    }
    let udp_len = u16::from_be_bytes(udp.len) as usize;
    // Lengths that claim more than the frame holds, or less than a UDP header, or a UDP
    // datagram that does not end where the IP packet does (what the frame carries is
    // then not what the lengths say: the stack trims it). A first fragment's UDP length
    // covers the reassembled datagram: it stays a fragment.
    if unhandled.is_none()
        && (udp_len < UdpHdr::LEN || l4 + udp_len != ip_end || ip_end > frame_len)
    {
        unhandled = Some(Counter::PassTruncated);
    }
    Ok(Some(Datagram {
        family,
        l3,
        l4,
        payload_len: udp_len.saturating_sub(UdpHdr::LEN),
        key,
        src,
        unhandled,
    }))
}

#[inline(always)]
fn words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// Copies the start of the UDP payload into per-CPU scratch and hashes the Call-ID.
#[inline(always)]
fn call_id_hash<const LOOP: LoopKind>(
    ctx: &XdpContext,
    scratch: *mut Scratch,
    dg: &Datagram,
) -> Result<u64, Counter> {
    let config = CONFIG.get(0).ok_or(Counter::PassNoBackend)?;
    let key = HashKey {
        k0: config.hash_key[0],
        k1: config.hash_key[1],
    };
    let complete = dg.payload_len <= SCAN_WINDOW;
    let len = if complete {
        dg.payload_len
    } else {
        SCAN_WINDOW
    };
    // The verifier needs the copy length proven to lie in 1..=SCAN_WINDOW.
    if len == 0 || len > SCAN_WINDOW {
        return Err(Counter::PassNoCallId);
    }
    let offset = (dg.l4 + UdpHdr::LEN) as u32;
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            offset,
            (*scratch).bytes.as_mut_ptr().cast(),
            len as u32,
        )
    };
    if rc != 0 {
        return Err(Counter::PassTruncated);
    }
    let job = job_of(scratch);
    unsafe {
        store_words(&raw mut (*job).scanner, Scanner::new(key));
        (*job).at = 0;
        (*job).len = len;
        (*job).complete = complete;
        (*job).done = None;
    }
    // Verifier constraint: a loop bounded by its count over up to 2048 bytes with a
    // branchy body exceeds the verifier's limits (8192 pending branches). `may_goto`
    // bounds the loop instead, and the verifier walks its body until the states at the
    // `may_goto` repeat: they do, because every step reads the scan's state from map
    // memory (unknown values) and keeps nothing in registers across the back edge.
    // bpf_loop's callback is verified once too. A step takes at least one byte but for
    // one (`Scanner::step`): `len + 1` steps reach every answer.
    if LOOP == MAY_GOTO {
        loop {
            if !scan_once(scratch) || may_goto_exhausted() {
                break;
            }
        }
    } else {
        unsafe {
            bpf_loop(
                (len as u32).div_ceil(STEPS_PER_CALL as u32) + 1,
                scan_step as *mut c_void,
                core::ptr::null_mut(),
                0,
            )
        };
    }
    let scan = match unsafe { (*job).done } {
        Some(scan) => scan,
        None => unsafe { (*job).scanner }.finish(complete),
    };
    match scan.outcome {
        // Only what the slow path too takes for SIP is forwarded: junk with a line that
        // reads as a Call-ID header goes to the stack (and the slow path drops it).
        ScanOutcome::Found if !sip_start_line(scratch, len) => Err(Counter::PassStartLine),
        ScanOutcome::Found => Ok(scan.hash),
        ScanOutcome::BeyondWindow => Err(Counter::PassCallIdBeyondWindow),
        ScanOutcome::NoCallId | ScanOutcome::Empty => Err(Counter::PassNoCallId),
    }
}

/// Whether the payload in scratch starts with a start line the fast path accepts
/// (`start_line_fast`).
#[inline(always)]
fn sip_start_line(scratch: *mut Scratch, len: usize) -> bool {
    // Verifier constraint: the search's many ways out each narrow the range of the
    // length it compares with, and give the offset it finds a range of its own. Both go
    // through map memory (values the verifier does not know), so that the ways meet as
    // one state and the program after this is walked once, not once per way.
    let line = unsafe { &raw mut (*private(scratch)).line };
    unsafe { core::ptr::write_volatile(&raw mut (*line)[0], len) };
    let len = unsafe { core::ptr::read_volatile(&raw const (*line)[0]) };
    let window = Window(scratch);
    let Some(line_end) = first_line_end(&window, len) else {
        return false;
    };
    unsafe { core::ptr::write_volatile(&raw mut (*line)[1], line_end) };
    let line_end = unsafe { core::ptr::read_volatile(&raw const (*line)[1]) };
    start_line_fast_at(&window, len, line_end).is_some()
}

/// The per-CPU copy of the payload, as the shared scanner reads it.
struct Window(*mut Scratch);

impl ByteWindow for Window {
    #[inline(always)]
    fn byte_at(&self, i: usize) -> u8 {
        // The mask keeps every access provably inside the map value.
        unsafe { (*self.0).bytes[i & (SCAN_WINDOW - 1)] }
    }

    /// Two aligned loads, shifted together: LLVM splits an unaligned 8-byte load into
    /// eight byte loads. Scratch is padded so that the second stays inside the value.
    #[inline(always)]
    fn word_at(&self, i: usize) -> u64 {
        let lo = self.aligned_word_at(i);
        let hi = self.aligned_word_at(i + 8);
        let shift = (i & 7) * 8;
        (lo >> shift) | ((hi << (63 - shift)) << 1)
    }

    /// The word at `i & !7`. The map value, and so `bytes` at its start, is 8-aligned.
    #[inline(always)]
    fn aligned_word_at(&self, i: usize) -> u64 {
        unsafe {
            let p = (*self.0).bytes.as_ptr().add(i & (SCAN_WINDOW - 8));
            core::ptr::read(p.cast::<u64>())
        }
    }
}

/// The state of one scan, kept in scratch (see `Scratch::job`).
struct ScanJob {
    scanner: Scanner,
    /// Next offset to scan, and the bytes in scratch.
    at: usize,
    len: usize,
    /// The bytes in scratch are the whole payload.
    complete: bool,
    done: Option<Scan>,
}

/// What the program keeps in `Scratch::xdp`.
struct Private {
    job: ScanJob,
    tag: ToTagJob,
    fib: FibLookup,
    /// The Ethernet header (and VLAN tag) across an `ipip` encapsulation.
    head: [u64; 3],
    /// The payload length and the end of its start line (`sip_start_line`).
    line: [usize; 2],
}

#[inline(always)]
fn private(scratch: *mut Scratch) -> *mut Private {
    const { assert!(size_of::<Private>() <= size_of::<[u64; SCRATCH_XDP_WORDS]>()) };
    unsafe { (&raw mut (*scratch).xdp).cast() }
}

#[inline(always)]
fn job_of(scratch: *mut Scratch) -> *mut ScanJob {
    unsafe { &raw mut (*private(scratch)).job }
}

/// True when the `may_goto` budget of this program run (the kernel's, millions of
/// iterations) is spent: the loop must stop.
#[inline(always)]
fn may_goto_exhausted() -> bool {
    let mut exhausted = false;
    // SAFETY: `may_goto` only jumps (to the label) or falls through; the kernel
    // rewrites it into a counter on the stack that it reserves itself.
    unsafe { core::arch::asm!("may_goto {}", label { exhausted = true; }) };
    exhausted
}

/// One step of the Call-ID scan (a line, a few words of the value, or a byte between
/// name and value) on the job in scratch; false once the scan is over.
///
/// Verifier constraint: `at` and `len` are read (volatile) from map memory at every step,
/// and the next `at` written back, so that no value the verifier tracks crosses from
/// one step into the next: the loops around this converge after one walk of the body.
#[inline(always)]
fn scan_once(scratch: *mut Scratch) -> bool {
    let job = unsafe { &mut *job_of(scratch) };
    let at = unsafe { core::ptr::read_volatile(&job.at) };
    let len = unsafe { core::ptr::read_volatile(&job.len) };
    if at >= len {
        return false;
    }
    match job.scanner.step(&Window(scratch), at, len) {
        Step::Done(scan) => {
            job.done = Some(scan);
            false
        }
        Step::Next(next) => {
            unsafe { core::ptr::write_volatile(&mut job.at, next) };
            true
        }
    }
}

/// `bpf_loop` callback: [`STEPS_PER_CALL`] steps of the Call-ID scan; 0 continues the
/// loop, 1 stops it. The loop count is only an upper bound.
///
/// Verifier constraint: this callback's stack counts on top of `sip_dispatch_cb`'s, and
/// the two must stay within 512 bytes; see `bpftool prog load` with `-d` ("stack depth").
#[inline(never)]
extern "C" fn scan_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    for _ in 0..STEPS_PER_CALL {
        if !scan_once(scratch) {
            return 1;
        }
    }
    0
}

/// Scanner steps per `bpf_loop` callback. On CPUs whose return thunk (SRSO mitigation)
/// makes every callback cost tens of ns, the callbacks were most of the scan's cost.
/// Verifier: it walks the inner loop once per step. Measured here (affinity off / on):
/// 4 steps, 220 k / 320 k instructions processed and 0.35 / 0.7 s to load; 8 steps,
/// 480 k / 700 k and 0.9 / 1.9 s, for no measurable gain over 4.
const STEPS_PER_CALL: usize = 4;

/// `*dst = v` a word at a time, for a `T` of whole words without padding (`Scanner`).
/// Volatile, because LLVM turns runs of zero stores into a call of a `memset` that BPF
/// runs byte by byte.
#[inline(always)]
fn store_words<T: Copy>(dst: *mut T, v: T) {
    const { assert!(size_of::<T>() % 8 == 0 && align_of::<T>() == 8) };
    let src = (&raw const v).cast::<u64>();
    for i in 0..size_of::<T>() / 8 {
        unsafe { core::ptr::write_volatile(dst.cast::<u64>().add(i), *src.add(i)) };
    }
}

/// Zeroes `*p` (a multiple of 8 bytes) a word at a time. Volatile, because LLVM turns
/// the zeroing of a struct into a call of a `memset` that BPF runs byte by byte.
#[inline(always)]
fn zero<T>(p: *mut T) {
    const { assert!(size_of::<T>() % 8 == 0 && align_of::<T>() <= 8) };
    let words = p.cast::<u64>();
    for i in 0..size_of::<T>() / 8 {
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// Route and next hop for the backend, seen from the ingress interface. The parameters
/// and the answer live in scratch (they would take 64 bytes of stack).
#[inline(always)]
fn fib_lookup(
    ctx: &XdpContext,
    scratch: *mut Scratch,
    dg: &Datagram,
    backend: &Backend,
    extra: usize,
) -> Result<*const FibLookup, Counter> {
    let fib = unsafe { &raw mut (*private(scratch)).fib };
    zero(fib);
    // SAFETY: scratch is this CPU's, and all zeroes is a valid FibLookup.
    let f = unsafe { &mut *fib };
    f.ifindex = ctx.ingress_ifindex() as u32;
    // With `extra` (an outer header), the FIB says whether the packet still fits the
    // egress MTU, and looks up the packet as it will leave: from the encapsulation
    // source, protocol 4 or 41, no ports (policy routing sees what it will route).
    f.__bindgen_anon_1.tot_len = (dg.l4 - dg.l3 + UdpHdr::LEN + dg.payload_len + extra) as u16;
    let mut src = dg.src;
    if extra > 0 {
        let encap = ENCAP.get(0).ok_or(Counter::PassEncap)?;
        src = if dg.family == FAMILY_V4 {
            [encap.v4, 0, 0, 0]
        } else {
            encap.v6
        };
        f.l4_protocol = if dg.family == FAMILY_V4 {
            sip_dispatch_common::IPPROTO_IPIP
        } else {
            sip_dispatch_common::IPPROTO_IPV6
        };
    } else {
        f.l4_protocol = IPPROTO_UDP;
        f.dport = backend.port;
    }
    if dg.family == FAMILY_V4 {
        f.family = AF_INET;
        f.__bindgen_anon_3.ipv4_src = src[0];
        f.__bindgen_anon_4.ipv4_dst = backend.addr[0];
    } else {
        f.family = AF_INET6;
        f.__bindgen_anon_3.ipv6_src = src;
        f.__bindgen_anon_4.ipv6_dst = backend.addr;
    }
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), fib, size_of::<FibLookup>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 && extra > 0 {
        return Err(Counter::PassEncap);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Err(Counter::PassFibMiss);
    }
    Ok(fib)
}

/// Destination address, port and MACs to the backend's; checksums patched in place.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    dg: &Datagram,
    backend: &Backend,
    fib: *const FibLookup,
) -> Result<(), Counter> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassTruncated)?;
    let udp: *mut UdpHdr = ptr_at(ctx, dg.l4).ok_or(Counter::PassTruncated)?;
    let mut udp_delta = CsumDelta::default();
    unsafe {
        if dg.family == FAMILY_V4 {
            let ip: *mut Ipv4Hdr = ptr_at(ctx, dg.l3).ok_or(Counter::PassTruncated)?;
            let old = u32::from_ne_bytes((*ip).dst_addr);
            let new = backend.addr[0];
            let mut ip_delta = CsumDelta::default();
            ip_delta.replace_u32(old, new);
            (*ip).dst_addr = new.to_ne_bytes();
            let check = u16::from_ne_bytes((*ip).check);
            (*ip).check = ip_delta.apply(check).to_ne_bytes();
            udp_delta.replace_u32(old, new);
        } else {
            let ip: *mut Ipv6Hdr = ptr_at(ctx, dg.l3).ok_or(Counter::PassTruncated)?;
            let old = words(&(*ip).dst_addr);
            for i in 0..4 {
                udp_delta.replace_u32(old[i], backend.addr[i]);
            }
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                let w = backend.addr[i].to_ne_bytes();
                bytes[i * 4] = w[0];
                bytes[i * 4 + 1] = w[1];
                bytes[i * 4 + 2] = w[2];
                bytes[i * 4 + 3] = w[3];
            }
            (*ip).dst_addr = bytes;
        }
        udp_delta.replace(u16::from_ne_bytes((*udp).dst), backend.port);
        (*udp).dst = backend.port.to_ne_bytes();
        let check = u16::from_ne_bytes((*udp).check);
        // A zero field stays zero: "no checksum" in IPv4, invalid (and dropped by the
        // receiver, as it would have been) in IPv6.
        (*udp).check = udp_delta.apply_udp(check).to_ne_bytes();
        // Volatile reads: a plain copy between two pointers that may alias becomes a
        // call of a byte-by-byte `memmove`.
        (*eth).dst_addr = core::ptr::read_volatile(&raw const (*fib).dmac);
        (*eth).src_addr = core::ptr::read_volatile(&raw const (*fib).smac);
    }
    Ok(())
}

sip_dispatch_ebpf::object_essentials!();
