//! Map names and the Pod types stored in them.
//!
//! Names carry a version suffix: a daemon must never reuse a pinned map whose layout
//! differs from the one it was built with. The kernel cuts names at 15 characters.
use bytemuck::{Pod, Zeroable};

/// Service address (VIP, UDP port) -> [`ServiceInfo`].
pub const MAP_SERVICES: &str = "sd_services_v1";
/// Flags of [`MAP_SERVICES`]: `BPF_F_NO_PREALLOC` (a hash map that allocates entries as
/// they are added).
pub const SERVICES_MAP_FLAGS: u32 = 1;
/// Array of maps, indexed by service id; each inner map is a slot table (see [`SLOTS`]),
/// created with [`TABLE_MAP_FLAGS`]. (v2: the inner maps became mmap-able.)
pub const MAP_TABLES: &str = "sd_tables_v2";
/// Array of [`Backend`], indexed by backend id.
pub const MAP_BACKENDS: &str = "sd_backends_v1";
/// Per-CPU array of [`BackendStats`], indexed by backend id.
pub const MAP_BACKEND_STATS: &str = "sd_bstats_v1";
/// Per-CPU array of u64, indexed by [`Counter`]. (v2: `drop_redirect_failed` added; v3:
/// the `affinity_*` counters; v4: `pass_not_on_link`, `pass_encap`; v5: `pass_start_line`,
/// `fib_fallback`.)
pub const MAP_COUNTERS: &str = "sd_counters_v5";
/// Single-entry array holding [`Config`].
pub const MAP_CONFIG: &str = "sd_config_v1";
/// Device map (hash by ifindex) used for XDP_REDIRECT to another interface.
pub const MAP_TX_PORTS: &str = "sd_txports_v1";
/// Entries of [`MAP_TX_PORTS`]: the interfaces XDP_REDIRECT may send to.
pub const MAX_TX_PORTS: u32 = 64;
/// Per-CPU scratch space the XDP program copies the UDP payload into.
pub const MAP_SCRATCH: &str = "sd_scratch_v2";

/// LRU hash [`AffinityKey`] -> [`AffinityEntry`]: which backend a call went to. Its
/// size is set at load (`--affinity-entries`).
pub const MAP_AFFINITY: &str = "sd_affinity_v1";
/// Mmap-able array of [`BackendFlags`], indexed by backend id ([`MAX_BACKENDS`] entries).
pub const MAP_BACKEND_FLAGS: &str = "sd_bflags_v1";
/// Flags of [`MAP_BACKEND_FLAGS`]: `BPF_F_MMAPABLE`, so that a reader can map all 4096
/// entries at once (the daemon writes them one map update at a time, on change only).
pub const BACKEND_FLAGS_MAP_FLAGS: u32 = 1 << 10;

/// Entries of [`MAP_AFFINITY`] unless `--affinity-entries` says otherwise.
pub const AFFINITY_ENTRIES_DEFAULT: u32 = 262_144;
/// The range `--affinity-entries` accepts.
pub const AFFINITY_ENTRIES_MIN: u32 = 1024;
pub const AFFINITY_ENTRIES_MAX: u32 = 8_388_608;
/// The program's `.rodata` switch (1: affinity on), set at load.
pub const GLOBAL_AFFINITY_ON: &str = "AFFINITY_ON";

/// Array of [`NextHop`], indexed by backend id: the controller's copy of each backend's
/// route and neighbour, which the fast path uses instead of a FIB lookup when valid.
pub const MAP_NEXTHOP: &str = "sd_nexthop_v1";

/// Single-entry array holding [`EncapSource`]: the outer source address of `ipip`.
pub const MAP_ENCAP: &str = "sd_encap_v1";

/// Hash [`DecapSource`] -> u8 (1): the outer sources whose IP-in-IP packets `ipip_decap`
/// decapsulates (`sip-dispatch decap --from`). Only `sip-dispatch decap` fills it, in its
/// own unpinned copy of the object: it is not one of [`crate::ALL_MAPS`].
pub const MAP_DECAP_FROM: &str = "sd_decapsrc_v1";
/// Entries of [`MAP_DECAP_FROM`]: the `--from` addresses one `decap` accepts.
pub const MAX_DECAP_SOURCES: u32 = 64;
/// IP protocol number of IPv4-in-IP (the outer header of IPv4 `ipip`).
pub const IPPROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6-in-IP (the outer header of IPv6 `ipip`).
pub const IPPROTO_IPV6: u8 = 41;

/// [`ServiceInfo::flags`]: the bits that hold the service's forwarding mode.
pub const FWD_MASK: u32 = 3;
/// Destination address and port rewritten to the backend's (the backend answers from its
/// own address).
pub const FWD_REWRITE: u32 = 0;
/// Only the Ethernet addresses change, to the backend's on the same link: the backend
/// holds the VIP and answers from it (direct server return).
pub const FWD_L2DSR: u32 = 1;
/// Encapsulated in IP (IPv4-in-IPv4, IPv6-in-IPv6) to the backend, which holds the VIP
/// and answers from it; the backend may be on another subnet.
pub const FWD_IPIP: u32 = 2;

/// Array of [`SERVICE_PORT_WORDS`] u64 bitmaps: bit `port % 64` of word `port / 64` is set
/// while a service listens on UDP `port` (any VIP, either family). The fast path passes
/// other UDP traffic after this array lookup, which the verifier inlines, instead of a
/// lookup in [`MAP_SERVICES`], a hash map and so a helper call.
pub const MAP_SERVICE_PORTS: &str = "sd_ports_v1";
/// Entries of [`MAP_SERVICE_PORTS`]: 65536 ports, 64 to a word.
pub const SERVICE_PORT_WORDS: u32 = 1024;

/// The word of [`MAP_SERVICE_PORTS`] that holds UDP `port` (host order), and its bit.
#[inline(always)]
pub fn service_port_bit(port: u16) -> (u32, u64) {
    (u32::from(port >> 6), 1u64 << (port & 63))
}

/// The XDP program that dispatches SIP (its scans loop with `may_goto`, kernel 6.9+).
pub const PROG_DISPATCH: &str = "sip_dispatch";
/// The same dispatcher with its scans in `bpf_loop` callbacks, for kernels without
/// `may_goto`; the loader picks it when [`PROG_MAY_GOTO_PROBE`] does not load.
pub const PROG_DISPATCH_CALLBACK: &str = "sip_dispatch_cb";
/// A minimal XDP program with one `may_goto`: whether it loads tells whether the
/// kernel knows the instruction.
pub const PROG_MAY_GOTO_PROBE: &str = "may_goto_probe";
/// An XDP program that passes everything: attached to veth peers so that native-mode
/// XDP_TX/XDP_REDIRECT frames are received (veth needs NAPI on the peer).
pub const PROG_PASS: &str = "xdp_pass";
/// An XDP program for backends of `ipip` services whose kernel has no tunnel device:
/// strips the outer IPv4/IPv6 header (`sip-dispatch decap`).
pub const PROG_DECAP: &str = "ipip_decap";
/// The benchmarks' baseline XDP program: swaps the MAC addresses and returns XDP_TX. It
/// lives in an object of its own (the eBPF crate's `mac-swap` binary), not the daemon's.
pub const PROG_MAC_SWAP: &str = "mac_swap";

/// Slots per service table. A power of two: the slot is the low bits of the Call-ID hash.
/// 65536 slots keep every backend's share within 0.02 of its weight share even for
/// thousands of backends, and a table is 256 KiB.
pub const SLOTS: usize = 1 << 16;
/// Flags of every slot-table map: `BPF_F_MMAPABLE`, so that userspace fills a new table
/// with one copy instead of 65536 map updates. The kernel requires the inner maps of
/// [`MAP_TABLES`] to have exactly the flags of the template the program declares.
pub const TABLE_MAP_FLAGS: u32 = 1 << 10;
/// Slot value meaning "no backend": the packet is passed to the stack (counted).
pub const NO_BACKEND: u32 = u32::MAX;
/// Services one dispatcher can serve.
pub const MAX_SERVICES: u32 = 64;
/// Backends across all services.
pub const MAX_BACKENDS: u32 = 4096;
/// Bytes of UDP payload the XDP program scans for the Call-ID. A power of two so that
/// masked indices are provably in bounds for the verifier.
pub const SCAN_WINDOW: usize = 2048;
/// The fast path promises to find a Call-ID header that starts in the first this-many
/// bytes of the UDP payload (the rest of the window leaves room for the value).
pub const FAST_PATH_PROMISE: usize = 1500;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// A service or backend address. IPv4 addresses sit in `addr[0]`, the rest zero.
/// Address words and the port are in network byte order, as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    /// UDP port, network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceInfo {
    /// Index into the tables map.
    pub id: u32,
    /// The forwarding mode in [`FWD_MASK`]: [`FWD_REWRITE`], [`FWD_L2DSR`], [`FWD_IPIP`].
    pub flags: u32,
}

/// The outer source address of `ipip` encapsulation, per family (network byte order
/// words, as [`Backend::addr`]; all zero: none configured, and `ipip` passes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EncapSource {
    pub v4: u32,
    pub v6: [u32; 4],
}

/// A key of [`MAP_DECAP_FROM`]: an outer source address (network byte order words as
/// [`Backend::addr`], IPv4 in `addr[0]`) and its family, so that an IPv4 source never
/// matches an IPv6 one whose first word it shares.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct DecapSource {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Where the XDP program sends a message. Written once per id: a backend whose address
/// changes gets a new id, so a table never points at a half-written entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    /// Network byte order words; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    /// UDP port, network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// The 128-bit SipHash key, as two little-endian words (k0, k1).
    pub hash_key: [u64; 2],
}

/// Size of [`Scratch::xdp`] in words.
pub const SCRATCH_XDP_WORDS: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct Scratch {
    /// The window, plus 8 bytes so that a word read at any offset stays inside.
    pub bytes: [u8; SCAN_WINDOW + 8],
    /// Room for the XDP program's own per-packet state: the Call-ID scan between
    /// `bpf_loop` steps, and the FIB lookup's parameters.
    ///
    /// Verifier constraints: the verifier does not track what map memory holds, so scan
    /// state kept here is an unknown value at every step. Kept on the stack, the small
    /// constants the scanner stores (its state, counts) would be tracked exactly, and the
    /// verifier would walk the loop body once per combination of them. And the program's
    /// stack and the bpf_loop callback's must fit 512 bytes together.
    pub xdp: [u64; SCRATCH_XDP_WORDS],
}

/// Key of the affinity map: the full 64-bit Call-ID hash (not the slot) and the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub hash: u64,
    pub service: u32,
    pub _zero: u32,
}

/// [`AffinityEntry::flags`]: a BYE of the call was seen.
pub const AFF_BYE: u32 = 1;
/// [`AffinityEntry::flags`]: a CANCEL of the call was seen.
pub const AFF_CANCEL: u32 = 2;
/// [`AffinityEntry::flags`]: an INVITE made the entry (a call, not an OPTIONS, REGISTER
/// or other out-of-dialog request): only such entries count as held calls.
pub const AFF_INVITE: u32 = 4;

/// Where a call went. `backend` and `generation` share one aligned word (see
/// [`AffinityEntry::target_word`]): writers store them together, so no CPU reads a new
/// id with an old generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityEntry {
    pub backend: u32,
    /// The generation of `backend` when the entry was written ([`BackendFlags::generation`]).
    pub generation: u32,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC) of the last message that touched it.
    pub last_seen_ns: u64,
    /// [`AFF_BYE`], [`AFF_CANCEL`], [`AFF_INVITE`].
    pub flags: u32,
    pub _zero: u32,
}

impl AffinityEntry {
    /// `backend` and `generation` as the one word at offset 0 (little-endian: `backend` in the
    /// low half), for a single aligned 8-byte store or load.
    #[inline(always)]
    pub const fn target_word(backend: u32, generation: u32) -> u64 {
        backend as u64 | (generation as u64) << 32
    }
}

/// [`BackendFlags::flags`]: entries pointing at this backend are valid (cleared by
/// disable and by removal from every service).
pub const BF_AFFINITY: u32 = 1;
/// [`BackendFlags::flags`]: the backend passes its health checks.
pub const BF_UP: u32 = 2;
/// [`BackendFlags::flags`]: the backend takes new calls (cleared by drain and weight 0).
pub const BF_NEW: u32 = 4;

/// What the controller tells the fast path about one backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendFlags {
    /// Bumped each time the id is freed: an entry written for an earlier user of the id
    /// no longer matches.
    pub generation: u32,
    /// [`BF_AFFINITY`], [`BF_UP`], [`BF_NEW`].
    pub flags: u32,
}

const _: () = assert!(size_of::<AffinityKey>() == 16, "AffinityKey has padding");
const _: () = assert!(
    size_of::<AffinityEntry>() == 24,
    "AffinityEntry has padding"
);
const _: () = assert!(size_of::<BackendFlags>() == 8, "BackendFlags has padding");
const _: () = assert!(size_of::<EncapSource>() == 20, "EncapSource has padding");
const _: () = assert!(core::mem::offset_of!(AffinityEntry, generation) == 4);

/// [`NextHop::flags`]: the entry may be used (clear: the fast path asks the FIB).
pub const NH_VALID: u32 = 1;
/// [`NextHop::flags`]: the backend is on the link (its route has no gateway): `l2dsr`
/// may reach it.
pub const NH_ON_LINK: u32 = 2;

/// How one backend is reached, as the controller resolved it: the route (egress
/// interface, gateway or on-link, MTU) and the next hop's link-layer address.
///
/// The controller changes an entry in steps that each change either the data or only
/// the [`NH_VALID`] bit: clear the bit (data unchanged), write the new data (bit still
/// clear, generation bumped), set the bit (data unchanged). The XDP program reads the bit
/// and the generation, then the data, then the bit and the generation again, and uses
/// the data only if neither changed: the data it read was then that of one valid entry,
/// never a mix, however long it stalled between the reads (x86's load order; BPF has no
/// load-acquire before Linux 6.15).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHop {
    /// The egress interface.
    pub ifindex: u32,
    /// Bytes an IP packet (with `ipip`'s outer header) may have on the egress path: the
    /// route's MTU if it has one, else the interface's.
    pub mtu: u32,
    /// The next hop's (backend's or gateway's) link-layer address.
    pub dmac: [u8; 6],
    /// The egress interface's link-layer address.
    pub smac: [u8; 6],
    /// Bumped by the controller each time it writes new data (for operators and tests).
    pub generation: u32,
    /// [`NH_VALID`], [`NH_ON_LINK`].
    pub flags: u32,
}

const _: () = assert!(size_of::<NextHop>() == 28, "NextHop has padding");

/// Per-CPU counters of the fast path, indexed by the enum value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets seen by the program (every frame).
    Seen = 0,
    /// Not for a configured service: passed untouched.
    NotService,
    /// Dispatched with XDP_TX (egress = ingress interface).
    Tx,
    /// Dispatched with XDP_REDIRECT.
    Redirect,
    /// Passed: IPv4 fragment (first or later) or IPv6 fragment header.
    PassFragment,
    /// Passed: IPv6 with extension headers.
    PassIpv6Ext,
    /// Passed: no Call-ID header within the scan window.
    PassNoCallId,
    /// Passed: the FIB has no route or no neighbour entry for the backend.
    PassFibMiss,
    /// Passed: the service has no backend for this slot (empty table).
    PassNoBackend,
    /// Passed: a header or length field points past the end of the frame.
    PassTruncated,
    /// Passed: the Call-ID value runs past the scan window.
    PassCallIdBeyondWindow,
    /// Passed: the egress interface is not in the tx ports map.
    PassNoTxPort,
    /// Dropped: XDP_REDIRECT failed after the frame was rewritten for its backend (the
    /// port left the redirect map between the check and the redirect).
    DropRedirectFailed,
    /// Affinity: the message followed its call's entry (not the slot table).
    AffinityHit,
    /// Affinity: the call had no entry.
    AffinityMiss,
    /// Affinity: an entry was created for the table's pick.
    AffinityInsert,
    /// Affinity: an entry was rewritten with the table's pick (its backend was disabled,
    /// removed, down, or drained and idle).
    AffinityOverridden,
    /// Affinity: creating an entry failed (the message still went to the table's pick).
    AffinityInsertFailed,
    /// Passed: `l2dsr` to a backend that is not on the link (the route has a gateway).
    PassNotOnLink,
    /// Passed: `ipip` could not encapsulate (the packet would exceed the egress MTU, no
    /// headroom, or no outer source address).
    PassEncap,
    /// Passed: a Call-ID was found but the start line is not one the fast path accepts
    /// (`parse::start_line::start_line_fast`): not SIP, or SIP in an unusual form.
    PassStartLine,
    /// The backend's next-hop entry was not valid: the route and neighbour came from a
    /// FIB lookup (`bpf_fib_lookup`) instead (whatever the outcome).
    FibFallback,
}

impl Counter {
    pub const COUNT: u32 = 22;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Seen,
        Counter::NotService,
        Counter::Tx,
        Counter::Redirect,
        Counter::PassFragment,
        Counter::PassIpv6Ext,
        Counter::PassNoCallId,
        Counter::PassFibMiss,
        Counter::PassNoBackend,
        Counter::PassTruncated,
        Counter::PassCallIdBeyondWindow,
        Counter::PassNoTxPort,
        Counter::DropRedirectFailed,
        Counter::AffinityHit,
        Counter::AffinityMiss,
        Counter::AffinityInsert,
        Counter::AffinityOverridden,
        Counter::AffinityInsertFailed,
        Counter::PassNotOnLink,
        Counter::PassEncap,
        Counter::PassStartLine,
        Counter::FibFallback,
    ];

    /// Stable snake_case name, used in logs, JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Seen => "seen",
            Counter::NotService => "not_service",
            Counter::Tx => "xdp_tx",
            Counter::Redirect => "xdp_redirect",
            Counter::PassFragment => "pass_fragment",
            Counter::PassIpv6Ext => "pass_ipv6_ext_header",
            Counter::PassNoCallId => "pass_no_call_id",
            Counter::PassFibMiss => "pass_fib_miss",
            Counter::PassNoBackend => "pass_no_backend",
            Counter::PassTruncated => "pass_truncated",
            Counter::PassCallIdBeyondWindow => "pass_call_id_beyond_window",
            Counter::PassNoTxPort => "pass_no_tx_port",
            Counter::DropRedirectFailed => "drop_redirect_failed",
            Counter::AffinityHit => "affinity_hit",
            Counter::AffinityMiss => "affinity_miss",
            Counter::AffinityInsert => "affinity_insert",
            Counter::AffinityOverridden => "affinity_overridden",
            Counter::AffinityInsertFailed => "affinity_insert_failed",
            Counter::PassNotOnLink => "pass_not_on_link",
            Counter::PassEncap => "pass_encap",
            Counter::PassStartLine => "pass_start_line",
            Counter::FibFallback => "fib_fallback",
        }
    }
}

// aya needs its own marker trait on every map key and value it reads or writes.
#[cfg(feature = "user")]
mod aya_pod {
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceInfo {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityEntry {}
    unsafe impl aya::Pod for super::BackendFlags {}
    unsafe impl aya::Pod for super::EncapSource {}
    unsafe impl aya::Pod for super::DecapSource {}
    unsafe impl aya::Pod for super::NextHop {}
}

/// Index of a Call-ID hash in a service's slot table.
#[inline(always)]
pub const fn slot_of(hash: u64) -> u32 {
    (hash as u32) & (SLOTS as u32 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_dense_and_named_uniquely() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            for d in &Counter::ALL[..i] {
                assert_ne!(c.name(), d.name());
            }
        }
    }

    #[test]
    fn pod_sizes_have_no_padding() {
        assert_eq!(core::mem::size_of::<ServiceKey>(), 20);
        assert_eq!(core::mem::size_of::<Backend>(), 20);
        assert_eq!(core::mem::size_of::<ServiceInfo>(), 8);
        assert_eq!(core::mem::size_of::<BackendStats>(), 16);
        assert_eq!(core::mem::size_of::<Config>(), 16);
        assert_eq!(core::mem::size_of::<AffinityKey>(), 16);
        assert_eq!(core::mem::size_of::<AffinityEntry>(), 24);
        assert_eq!(core::mem::size_of::<BackendFlags>(), 8);
        assert_eq!(core::mem::size_of::<DecapSource>(), 20);
        assert_eq!(core::mem::size_of::<NextHop>(), 28);
    }

    #[test]
    fn affinity_target_word_is_backend_then_generation() {
        let e = AffinityEntry {
            backend: 0x0102_0304,
            generation: 0x0a0b_0c0d,
            ..AffinityEntry::default()
        };
        let word = u64::from_le_bytes(bytemuck::bytes_of(&e)[..8].try_into().unwrap());
        assert_eq!(word, AffinityEntry::target_word(e.backend, e.generation));
    }
}
