//! A flood generator for the robustness test: one thread, pinned to one CPU, that enters a
//! namespace and writes Ethernet frames straight into its veth through an AF_PACKET
//! socket (qdisc bypassed), as fast as the receivers take them, until a frame count or a
//! time limit is reached.
//!
//! Why not trafgen: it flushes its TX ring with MSG_DONTWAIT and treats EAGAIN as fatal.
//! With native XDP on a receiving veth, frames wait in the veth's XDP ring (holding the
//! socket's send buffer) whenever softirq work is deferred to ksoftirqd, and trafgen dies
//! within a second. A blocking socket simply waits instead: full speed, with the
//! receiver's backpressure. (The same reasoning as the benchmark's generator, `sd-bench`.)
//!
//! The frames are random and malformed datagrams for the service (see [`Kind`]), each
//! from a fresh source (an address of 198.19.0.0/16, inside the test range 198.18.0.0/15,
//! and a random port), addressed to the dispatcher's MAC so that they reach its XDP
//! program. Each frame is classified as it is built: the [`Outcome`] the XDP program must
//! give it, found with the very Call-ID scanner the program runs. The [`FloodReport`]
//! counts frames by outcome and kind, so that a test can bound the daemon's counters.
//!
//! Every payload that carries a Call-ID uses one that starts with [`FLOOD_CALL_ID`], and
//! only methods a SIPp UAS discards at once (MESSAGE, responses): an INVITE or OPTIONS
//! would make it hold a call for each, and the test would measure SIPp, not the
//! dispatcher.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use sip_dispatch_common::{HashKey, ScanOutcome, parse::scan_message};

use crate::{
    link::mac_address,
    rawnet::{enter_netns, packet_socket, pin_to_cpu},
    topology::{Family, Topology, check_test_address},
};

/// The start of every Call-ID the flood sends.
pub const FLOOD_CALL_ID: &str = "flood-";
/// The largest frame: a 1500-byte MTU plus the Ethernet header.
pub const MAX_FRAME: usize = 1514;
/// Frames per `sendmmsg`.
const BATCH: usize = 64;
const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const MAX_PAYLOAD: usize = MAX_FRAME - ETH_LEN - IP_LEN - UDP_LEN;
/// Payload variants built in advance per kind (building them per frame would cost more
/// than sending them, in a debug build).
const VARIANTS: usize = 64;
const IPPROTO_UDP: u8 = 17;
/// IPv4 "more fragments" flag, in the flags/offset field.
const MF: u16 = 0x2000;

/// What the XDP program must do with a frame (its counter in parentheses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Not UDP to the VIP's port: passed untouched (`not_service`).
    NotService,
    /// An IPv4 fragment (`pass_fragment`).
    Fragment,
    /// A header or length field that does not fit the frame (`pass_truncated`).
    Truncated,
    /// A datagram to the VIP without a non-empty Call-ID (`pass_no_call_id`).
    NoCallId,
    /// A datagram to the VIP with a Call-ID: dispatched to a backend (`xdp_tx`).
    Dispatch,
}

/// The kinds of frames the flood mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Random bytes of random length (0 to 1400), none of which happens to hold a Call-ID.
    RandomBytes,
    /// A SIP request cut at a random byte (before, inside or after its Call-ID).
    TruncatedRequest,
    /// An INVITE without a Call-ID header, with lookalikes (`X-Call-ID:`, one in the body).
    NoCallId,
    /// An INVITE whose first Call-ID is empty (also compact, blank, folded), followed by
    /// a non-empty one: the first wins.
    EmptyCallId,
    /// A request with a 300-byte Call-ID.
    LongCallId,
    /// Requests with NUL bytes, with and without a Call-ID.
    NulBytes,
    /// A STUN binding request.
    Stun,
    /// CRLF keep-alives.
    Crlf,
    /// A SIP response to the VIP.
    Response,
    /// An IPv4 header length below 5 words, or one past the end of the frame.
    BadIpHeaderLength,
    /// A UDP length below 8 or beyond the IP payload.
    BadUdpLength,
    /// An IPv4 total length beyond the frame.
    BadIpTotalLength,
    /// A frame that ends inside the IPv4 header.
    Runt,
    /// A lone IPv4 fragment (a first one to the VIP, or a later one), never reassembled.
    LoneFragment,
    /// Both fragments of a datagram to the VIP: the stack reassembles it for the slow
    /// path. Half of them carry a Call-ID.
    FragmentPair,
    /// UDP with a Call-ID to another port of the VIP, or to the dispatcher's own address.
    OtherPort,
}

/// How often each kind is picked (relative weights). Frames that reach the backends
/// (those with a Call-ID) stay under a tenth of the flood.
const MIX: &[(Kind, u32)] = &[
    (Kind::RandomBytes, 10),
    (Kind::TruncatedRequest, 3),
    (Kind::NoCallId, 5),
    (Kind::EmptyCallId, 4),
    (Kind::LongCallId, 1),
    (Kind::NulBytes, 2),
    (Kind::Stun, 5),
    (Kind::Crlf, 5),
    (Kind::Response, 1),
    (Kind::BadIpHeaderLength, 3),
    (Kind::BadUdpLength, 3),
    (Kind::BadIpTotalLength, 3),
    (Kind::Runt, 1),
    (Kind::LoneFragment, 4),
    (Kind::FragmentPair, 2),
    (Kind::OtherPort, 5),
];

/// Where the frames go.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// The sender's MAC (the client's veth, so the bridge learns nothing new).
    pub src_mac: [u8; 6],
    /// The dispatcher veth's MAC.
    pub dst_mac: [u8; 6],
    pub vip: SocketAddrV4,
    /// An address of the dispatcher that is not the VIP.
    pub other: Ipv4Addr,
}

impl Target {
    /// From the client to the IPv4 VIP of `topo`'s dispatcher, on `port`.
    pub fn for_topology(topo: &Topology, port: u16) -> Result<Target> {
        let client = topo.client();
        let disp = topo.dispatcher()?;
        let std::net::IpAddr::V4(vip) = topo.vip(Family::V4) else {
            bail!("the IPv4 VIP is not an IPv4 address");
        };
        Ok(Target {
            src_mac: mac_address(client.ns_name(), &client.iface)?,
            dst_mac: mac_address(disp.ns_name(), &disp.iface)?,
            vip: SocketAddrV4::new(vip, port),
            other: disp.ipv4,
        })
    }
}

/// What the generator is asked to do.
#[derive(Clone, Debug)]
pub struct FloodSpec {
    /// The namespace and interface the frames are written into.
    pub ns: String,
    pub iface: String,
    pub target: Target,
    /// The CPU the generator thread is pinned to.
    pub cpu: usize,
    /// It stops after this many frames, or after `max_time`, whichever comes first.
    pub max_frames: u64,
    pub max_time: Duration,
    /// Seed of the pseudo-random mix (a run is reproducible up to the timing).
    pub seed: u64,
}

/// What the generator sent.
#[derive(Clone, Debug, Default)]
pub struct FloodReport {
    pub frames: u64,
    pub by_outcome: BTreeMap<Outcome, u64>,
    pub by_kind: BTreeMap<Kind, u64>,
    /// Fragmented datagrams whose both fragments went out, with a Call-ID in the
    /// reassembled payload: the only flood datagrams the slow path may forward.
    pub reassemblable_with_call_id: u64,
    /// The same, without a Call-ID.
    pub reassemblable_without_call_id: u64,
    pub elapsed: Duration,
    /// Sends that had to wait for the receiver (EAGAIN, ENOBUFS, EINTR).
    pub stalls: u64,
}

impl FloodReport {
    /// Frames sent with this outcome.
    pub fn outcome(&self, o: Outcome) -> u64 {
        self.by_outcome.get(&o).copied().unwrap_or(0)
    }

    /// Frames per second.
    pub fn rate(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn count(&mut self, frame: &FrameInfo) {
        self.frames += 1;
        *self.by_outcome.entry(frame.outcome).or_default() += 1;
        *self.by_kind.entry(frame.kind).or_default() += 1;
        match frame.completes_pair {
            Some(true) => self.reassemblable_with_call_id += 1,
            Some(false) => self.reassemblable_without_call_id += 1,
            None => {}
        }
    }
}

/// A running generator. Dropping it stops it (within 100 ms) and waits for its thread.
pub struct Flood {
    stop: Arc<AtomicBool>,
    events: mpsc::Receiver<Event>,
    handle: Option<JoinHandle<()>>,
}

enum Event {
    Ready,
    Done(Result<FloodReport>),
}

impl Flood {
    /// Starts the generator and waits (up to 10 s) until its socket is open.
    pub fn start(spec: FloodSpec) -> Result<Flood> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, events) = mpsc::channel();
        let flag = stop.clone();
        let handle = thread::Builder::new()
            .name("flood".into())
            .spawn(move || {
                let result = generate(&spec, &flag, || {
                    let _ = tx.send(Event::Ready);
                });
                let _ = tx.send(Event::Done(result));
            })
            .context("starting the flood thread")?;
        // Dropped on error: stopped and joined.
        let flood = Flood {
            stop,
            events,
            handle: Some(handle),
        };
        match flood.events.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Ready) => Ok(flood),
            Ok(Event::Done(Err(e))) => Err(e.context("the flood generator failed to start")),
            Ok(Event::Done(Ok(_))) => bail!("the flood generator ended before it was ready"),
            Err(e) => bail!("the flood generator was not ready within 10 s ({e})"),
        }
    }

    /// Waits up to `timeout` for the generator to end: `None` while it still runs.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<FloodReport>> {
        match self.events.recv_timeout(timeout) {
            Ok(Event::Done(result)) => {
                self.join();
                result.map(Some)
            }
            Ok(Event::Ready) => bail!("the flood generator said ready twice"),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.join();
                bail!("the flood generator thread ended without a report (it panicked)")
            }
        }
    }

    fn join(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.join();
    }
}

/// The generator thread's body.
fn generate(spec: &FloodSpec, stop: &AtomicBool, ready: impl FnOnce()) -> Result<FloodReport> {
    enter_netns(&spec.ns)?;
    pin_to_cpu(spec.cpu)?;
    let socket = PacketSocket::open(&spec.iface)?;
    let mut factory = Factory::new(spec.target, spec.seed);
    let mut batch = Batch::new();
    let mut report = FloodReport::default();
    ready();
    let started = Instant::now();
    let deadline = started + spec.max_time;
    while !stop.load(Ordering::Relaxed)
        && report.frames < spec.max_frames
        && Instant::now() < deadline
    {
        let n = (spec.max_frames - report.frames).min(BATCH as u64) as usize;
        batch.fill(&mut factory, n);
        let sent = socket.send_all(&mut batch, deadline, stop, &mut report.stalls)?;
        batch.infos[..sent].iter().for_each(|f| report.count(f));
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// An AF_PACKET socket that writes whole frames into one interface, bypassing the qdisc.
struct PacketSocket {
    fd: OwnedFd,
    addr: libc::sockaddr_ll,
    iface: String,
}

impl PacketSocket {
    fn open(iface: &str) -> Result<PacketSocket> {
        let (fd, addr) = packet_socket(iface)?;
        Ok(PacketSocket {
            fd,
            addr,
            iface: iface.to_owned(),
        })
    }

    /// Sends the batch, waiting while the receiver is busy; returns how many frames went
    /// out (all of them, unless the deadline passed or a stop was asked for).
    fn send_all(
        &self,
        batch: &mut Batch,
        deadline: Instant,
        stop: &AtomicBool,
        stalls: &mut u64,
    ) -> Result<usize> {
        let mut msgs = batch.headers(&self.addr);
        let mut sent = 0;
        while sent < msgs.len() {
            let rest = &mut msgs[sent..];
            // SAFETY: headers pointing at live buffers in `batch` and at `self.addr`.
            let n = unsafe {
                libc::sendmmsg(self.fd.as_raw_fd(), rest.as_mut_ptr(), rest.len() as u32, 0)
            };
            if n > 0 {
                sent += n as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR) => *stalls += 1,
                _ => bail!("sendmmsg on {}: {e}", self.iface),
            }
            if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break;
            }
        }
        Ok(sent)
    }
}

/// One frame as built.
#[derive(Clone, Copy, Debug)]
struct FrameInfo {
    len: usize,
    kind: Kind,
    outcome: Outcome,
    /// On the second fragment of a pair: whether the datagram has a Call-ID.
    completes_pair: Option<bool>,
}

/// Frame buffers for one `sendmmsg`.
struct Batch {
    bufs: Vec<[u8; MAX_FRAME]>,
    infos: Vec<FrameInfo>,
    iovs: Vec<libc::iovec>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            bufs: vec![[0u8; MAX_FRAME]; BATCH],
            infos: Vec::with_capacity(BATCH),
            iovs: Vec::with_capacity(BATCH),
        }
    }

    fn fill(&mut self, factory: &mut Factory, n: usize) {
        self.infos.clear();
        for buf in &mut self.bufs[..n] {
            self.infos.push(factory.next(buf));
        }
    }

    /// The `sendmmsg` headers of the filled frames. They point into `self` (whose
    /// buffers never move) and at `addr`.
    fn headers(&mut self, addr: &libc::sockaddr_ll) -> Vec<libc::mmsghdr> {
        self.iovs.clear();
        for (buf, info) in self.bufs.iter_mut().zip(&self.infos) {
            self.iovs.push(libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: info.len,
            });
        }
        self.iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; a zeroed one is valid before the fields are set.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (addr as *const libc::sockaddr_ll).cast_mut().cast();
                m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect()
    }
}

/// A xorshift64* pseudo-random generator: reproducible, and cheap in a debug build.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

/// A UDP payload built in advance, with its checksum contribution and outcome.
struct Payload {
    bytes: Vec<u8>,
    /// One's-complement sum of the bytes (as 16-bit big-endian words).
    sum: u64,
    /// `NoCallId` or `Dispatch`, by the shared Call-ID scanner.
    outcome: Outcome,
}

impl Payload {
    fn new(bytes: Vec<u8>) -> Payload {
        assert!(
            bytes.len() <= MAX_PAYLOAD,
            "payload of {} bytes",
            bytes.len()
        );
        let outcome = match scan_message(&bytes, HashKey::DEFAULT).outcome {
            ScanOutcome::Found => Outcome::Dispatch,
            // Payloads fit in the window (at most 1472 bytes of 2048), so the fast
            // path settles every one: no Call-ID, or an empty one.
            _ => Outcome::NoCallId,
        };
        Payload {
            sum: sum16(&bytes),
            bytes,
            outcome,
        }
    }
}

/// One's-complement sum of `bytes` as big-endian 16-bit words (odd end padded with 0).
fn sum16(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The UDP checksum of a datagram whose payload sums to `payload_sum`.
fn udp_checksum(src: SocketAddrV4, dst: SocketAddrV4, udp_len: u16, payload_sum: u64) -> u16 {
    let pseudo = sum16(&src.ip().octets())
        + sum16(&dst.ip().octets())
        + u64::from(IPPROTO_UDP)
        + u64::from(udp_len);
    let header = u64::from(src.port()) + u64::from(dst.port()) + u64::from(udp_len);
    match !fold(pseudo + header + payload_sum) {
        0 => 0xffff,
        c => c,
    }
}

/// The IPv4 header fields the flood varies.
#[derive(Clone, Copy)]
struct Ip {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    /// Flags and fragment offset (in 8-byte units).
    frag: u16,
    tot_len: u16,
}

/// Writes the Ethernet header and a 20-byte IPv4 header (with its checksum).
fn write_eth_ip(out: &mut [u8], t: &Target, ip: Ip) {
    out[0..6].copy_from_slice(&t.dst_mac);
    out[6..12].copy_from_slice(&t.src_mac);
    out[12..14].copy_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    let h = &mut out[ETH_LEN..ETH_LEN + IP_LEN];
    h[0] = 0x45;
    h[1] = 0;
    h[2..4].copy_from_slice(&ip.tot_len.to_be_bytes());
    h[4..6].copy_from_slice(&ip.id.to_be_bytes());
    h[6..8].copy_from_slice(&ip.frag.to_be_bytes());
    h[8] = 64;
    h[9] = IPPROTO_UDP;
    h[10..12].fill(0);
    h[12..16].copy_from_slice(&ip.src.octets());
    h[16..20].copy_from_slice(&ip.dst.octets());
    set_ip_checksum(out);
}

fn set_ip_checksum(out: &mut [u8]) {
    let h = &mut out[ETH_LEN..ETH_LEN + IP_LEN];
    h[10..12].fill(0);
    let c = !fold(sum16(h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

fn write_udp(out: &mut [u8], src: u16, dst: u16, len: u16, checksum: u16) {
    let u = &mut out[ETH_LEN + IP_LEN..ETH_LEN + IP_LEN + UDP_LEN];
    u[0..2].copy_from_slice(&src.to_be_bytes());
    u[2..4].copy_from_slice(&dst.to_be_bytes());
    u[4..6].copy_from_slice(&len.to_be_bytes());
    u[6..8].copy_from_slice(&checksum.to_be_bytes());
}

/// Builds the frames of the mix, one after the other.
struct Factory {
    target: Target,
    rng: Rng,
    pools: BTreeMap<Kind, Vec<Payload>>,
    /// Datagrams built so far (for fresh source addresses and IP ids).
    datagrams: u64,
    /// The second fragment of a pair, sent as the next frame.
    pending: Option<(Vec<u8>, FrameInfo)>,
    weight_sum: u64,
}

impl Factory {
    fn new(target: Target, seed: u64) -> Factory {
        let mut rng = Rng::new(seed);
        let pools = [
            Kind::RandomBytes,
            Kind::TruncatedRequest,
            Kind::NoCallId,
            Kind::EmptyCallId,
            Kind::LongCallId,
            Kind::NulBytes,
            Kind::Stun,
            Kind::Crlf,
            Kind::Response,
        ]
        .into_iter()
        .map(|k| {
            let pool = (0..VARIANTS)
                .map(|i| payload(k, i, &target, &mut rng))
                .collect();
            (k, pool)
        })
        .collect();
        Factory {
            target,
            rng,
            pools,
            datagrams: 0,
            pending: None,
            weight_sum: MIX.iter().map(|(_, w)| u64::from(*w)).sum(),
        }
    }

    fn pick_kind(&mut self) -> Kind {
        let mut r = self.rng.below(self.weight_sum);
        for &(kind, w) in MIX {
            if r < u64::from(w) {
                return kind;
            }
            r -= u64::from(w);
        }
        unreachable!("the weights sum to weight_sum")
    }

    fn pick<'a>(pools: &'a BTreeMap<Kind, Vec<Payload>>, rng: &mut Rng, kind: Kind) -> &'a Payload {
        let pool = &pools[&kind];
        &pool[rng.below(pool.len() as u64) as usize]
    }

    /// A fresh source: the next address of 198.19.0.0/16 (skipping .0 and .255), and a
    /// random port above 1023.
    fn fresh_source(&mut self) -> SocketAddrV4 {
        let k = self.datagrams;
        self.datagrams += 1;
        let host = (k % (256 * 254)) as u32;
        let addr = Ipv4Addr::new(198, 19, (host / 254) as u8, (host % 254 + 1) as u8);
        SocketAddrV4::new(addr, 1024 + self.rng.below(64512) as u16)
    }

    /// Writes the next frame into `out`.
    fn next(&mut self, out: &mut [u8; MAX_FRAME]) -> FrameInfo {
        if let Some((bytes, info)) = self.pending.take() {
            out[..bytes.len()].copy_from_slice(&bytes);
            return info;
        }
        let kind = self.pick_kind();
        match kind {
            Kind::BadIpHeaderLength => self.bad_ip_header_length(out),
            Kind::BadUdpLength => self.bad_udp_length(out),
            Kind::BadIpTotalLength => self.bad_ip_total_length(out),
            Kind::Runt => self.runt(out),
            Kind::LoneFragment => self.lone_fragment(out),
            Kind::FragmentPair => self.fragment_pair(out),
            Kind::OtherPort => self.other_port(out),
            _ => {
                let vip = self.target.vip;
                let (len, outcome) = self.datagram(out, vip, kind);
                Self::info(len, kind, outcome)
            }
        }
    }

    /// A well-formed datagram to `dst` with a payload of `pool`; returns the frame length
    /// and the payload's outcome.
    fn datagram(&mut self, out: &mut [u8], dst: SocketAddrV4, pool: Kind) -> (usize, Outcome) {
        let src = self.fresh_source();
        let p = Self::pick(&self.pools, &mut self.rng, pool);
        let udp_len = (UDP_LEN + p.bytes.len()) as u16;
        let ip = Ip {
            src: *src.ip(),
            dst: *dst.ip(),
            id: self.datagrams as u16,
            frag: 0,
            tot_len: IP_LEN as u16 + udp_len,
        };
        write_eth_ip(out, &self.target, ip);
        write_udp(
            out,
            src.port(),
            dst.port(),
            udp_len,
            udp_checksum(src, dst, udp_len, p.sum),
        );
        let start = ETH_LEN + IP_LEN + UDP_LEN;
        out[start..start + p.bytes.len()].copy_from_slice(&p.bytes);
        (start + p.bytes.len(), p.outcome)
    }

    fn info(len: usize, kind: Kind, outcome: Outcome) -> FrameInfo {
        FrameInfo {
            len,
            kind,
            outcome,
            completes_pair: None,
        }
    }

    /// IHL below 5, or 15 words on a frame too short for them (a CRLF keep-alive: 60
    /// header bytes from offset 14 end past its at most 14 + 20 + 8 + 8 bytes).
    fn bad_ip_header_length(&mut self, out: &mut [u8]) -> FrameInfo {
        let vip = self.target.vip;
        let (len, _) = self.datagram(out, vip, Kind::Crlf);
        let ihl = [0, 1, 2, 3, 4, 15][self.rng.below(6) as usize];
        out[ETH_LEN] = 0x40 | ihl;
        set_ip_checksum(out);
        Self::info(len, Kind::BadIpHeaderLength, Outcome::Truncated)
    }

    /// A UDP length below the header's 8 bytes, or beyond the IP payload.
    fn bad_udp_length(&mut self, out: &mut [u8]) -> FrameInfo {
        let vip = self.target.vip;
        let (len, _) = self.datagram(out, vip, Kind::NoCallId);
        let actual = (len - ETH_LEN - IP_LEN) as u16;
        let claimed = if self.rng.below(2) == 0 {
            self.rng.below(UDP_LEN as u64) as u16
        } else {
            actual + 1 + self.rng.below(64) as u16
        };
        out[ETH_LEN + IP_LEN + 4..ETH_LEN + IP_LEN + 6].copy_from_slice(&claimed.to_be_bytes());
        Self::info(len, Kind::BadUdpLength, Outcome::Truncated)
    }

    /// An IPv4 total length that claims more bytes than the frame has.
    fn bad_ip_total_length(&mut self, out: &mut [u8]) -> FrameInfo {
        let vip = self.target.vip;
        let (len, _) = self.datagram(out, vip, Kind::Response);
        let claimed = (len - ETH_LEN) as u16 + 1 + self.rng.below(200) as u16;
        out[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&claimed.to_be_bytes());
        set_ip_checksum(out);
        Self::info(len, Kind::BadIpTotalLength, Outcome::Truncated)
    }

    /// An Ethernet header and the first 10 bytes of an IPv4 header.
    fn runt(&mut self, out: &mut [u8]) -> FrameInfo {
        let vip = self.target.vip;
        self.datagram(out, vip, Kind::Crlf);
        Self::info(ETH_LEN + 10, Kind::Runt, Outcome::Truncated)
    }

    /// A first fragment to the VIP (its UDP length counts bytes that never come), or a
    /// later fragment at a random offset.
    fn lone_fragment(&mut self, out: &mut [u8]) -> FrameInfo {
        let src = self.fresh_source();
        let vip = self.target.vip;
        let id = self.datagrams as u16;
        let mut body = vec![0u8; 8 * (1 + self.rng.below(150) as usize)];
        self.rng.fill(&mut body);
        let frag = if self.rng.below(2) == 0 {
            let claimed = (body.len() + 800) as u16;
            body[0..2].copy_from_slice(&src.port().to_be_bytes());
            body[2..4].copy_from_slice(&vip.port().to_be_bytes());
            body[4..6].copy_from_slice(&claimed.to_be_bytes());
            MF
        } else {
            let more = if self.rng.below(2) == 0 { MF } else { 0 };
            more | (1 + self.rng.below(1000) as u16)
        };
        let ip = Ip {
            src: *src.ip(),
            dst: *vip.ip(),
            id,
            frag,
            tot_len: (IP_LEN + body.len()) as u16,
        };
        write_eth_ip(out, &self.target, ip);
        out[ETH_LEN + IP_LEN..ETH_LEN + IP_LEN + body.len()].copy_from_slice(&body);
        Self::info(
            ETH_LEN + IP_LEN + body.len(),
            Kind::LoneFragment,
            Outcome::Fragment,
        )
    }

    /// Both fragments of one datagram to the VIP: the first now, the second next.
    fn fragment_pair(&mut self, out: &mut [u8]) -> FrameInfo {
        let src = self.fresh_source();
        let vip = self.target.vip;
        let id = self.datagrams as u16;
        let pool = if self.rng.below(2) == 0 {
            Kind::LongCallId
        } else {
            Kind::NoCallId
        };
        let p = Self::pick(&self.pools, &mut self.rng, pool);
        let with_call_id = p.outcome == Outcome::Dispatch;
        let udp_len = (UDP_LEN + p.bytes.len()) as u16;
        let mut datagram = Vec::with_capacity(usize::from(udp_len));
        datagram.extend_from_slice(&src.port().to_be_bytes());
        datagram.extend_from_slice(&vip.port().to_be_bytes());
        datagram.extend_from_slice(&udp_len.to_be_bytes());
        datagram.extend_from_slice(&udp_checksum(src, vip, udp_len, p.sum).to_be_bytes());
        datagram.extend_from_slice(&p.bytes);
        // The first fragment's length must be a multiple of 8 bytes.
        let split = (datagram.len() / 2) & !7;
        let mut second = vec![0u8; ETH_LEN + IP_LEN + datagram.len() - split];
        let ip = |frag: u16, len: usize| Ip {
            src: *src.ip(),
            dst: *vip.ip(),
            id,
            frag,
            tot_len: (IP_LEN + len) as u16,
        };
        write_eth_ip(out, &self.target, ip(MF, split));
        out[ETH_LEN + IP_LEN..ETH_LEN + IP_LEN + split].copy_from_slice(&datagram[..split]);
        write_eth_ip(
            &mut second,
            &self.target,
            ip((split / 8) as u16, datagram.len() - split),
        );
        second[ETH_LEN + IP_LEN..].copy_from_slice(&datagram[split..]);
        let second_info = FrameInfo {
            len: second.len(),
            kind: Kind::FragmentPair,
            outcome: Outcome::Fragment,
            completes_pair: Some(with_call_id),
        };
        self.pending = Some((second, second_info));
        Self::info(
            ETH_LEN + IP_LEN + split,
            Kind::FragmentPair,
            Outcome::Fragment,
        )
    }

    /// A request with a Call-ID to another port of the VIP, or to the dispatcher's own
    /// address on the service port.
    fn other_port(&mut self, out: &mut [u8]) -> FrameInfo {
        let vip = self.target.vip;
        let dst = if self.rng.below(4) == 0 {
            SocketAddrV4::new(self.target.other, vip.port())
        } else {
            let port = 1 + self.rng.below(65535) as u16;
            let port = if port == vip.port() { port + 1 } else { port };
            SocketAddrV4::new(*vip.ip(), port)
        };
        let (len, _) = self.datagram(out, dst, Kind::LongCallId);
        Self::info(len, Kind::OtherPort, Outcome::NotService)
    }
}

/// Payload variant `i` of `kind`.
fn payload(kind: Kind, i: usize, t: &Target, rng: &mut Rng) -> Payload {
    let p = match kind {
        Kind::RandomBytes => return no_call_id(rng, random_bytes),
        Kind::Stun => return no_call_id(rng, stun_binding),
        Kind::TruncatedRequest => {
            let full = message_request(t, &format!("{FLOOD_CALL_ID}trunc-{i}"), "");
            let cut = 1 + rng.below(full.len() as u64 - 1) as usize;
            full[..cut].to_vec()
        }
        Kind::NoCallId => no_call_id_invite(t, i),
        Kind::EmptyCallId => empty_call_id_invite(t, i),
        Kind::LongCallId => {
            let mut id = format!("{FLOOD_CALL_ID}long-{i}-");
            while id.len() < 300 {
                id.push(char::from(b'a' + (id.len() % 26) as u8));
            }
            message_request(t, &id, "")
        }
        Kind::NulBytes => nul_bytes(t, i),
        Kind::Crlf => [&b"\r\n\r\n"[..], b"\r\n", b"\n", b"\r\n\r\n\r\n\r\n"][i % 4].to_vec(),
        Kind::Response => response(t, i),
        other => unreachable!("{other:?} has no payload pool"),
    };
    Payload::new(p)
}

/// A payload drawn until it has no Call-ID (almost always the first draw).
fn no_call_id(rng: &mut Rng, draw: fn(&mut Rng) -> Vec<u8>) -> Payload {
    loop {
        let p = Payload::new(draw(rng));
        if p.outcome == Outcome::NoCallId {
            return p;
        }
    }
}

fn random_bytes(rng: &mut Rng) -> Vec<u8> {
    let mut b = vec![0u8; rng.below(1401) as usize];
    rng.fill(&mut b);
    b
}

/// A STUN binding request (RFC 5389), with a SOFTWARE attribute half of the time.
fn stun_binding(rng: &mut Rng) -> Vec<u8> {
    let software = rng.below(2) == 0;
    let mut b = vec![0x00, 0x01];
    b.extend_from_slice(&(if software { 12u16 } else { 0 }).to_be_bytes());
    b.extend_from_slice(&0x2112_a442u32.to_be_bytes());
    let mut txn = [0u8; 12];
    rng.fill(&mut txn);
    b.extend_from_slice(&txn);
    if software {
        b.extend_from_slice(&[0x80, 0x22, 0x00, 0x08]);
        b.extend_from_slice(b"sdt-fl00");
    }
    b
}

fn crlf_lines(lines: &[String]) -> Vec<u8> {
    let mut s = String::new();
    for l in lines {
        let _ = write!(s, "{l}\r\n");
    }
    s.into_bytes()
}

/// A MESSAGE with Call-ID `call_id`, `extra` header lines, and a short body.
fn message_request(t: &Target, call_id: &str, extra: &str) -> Vec<u8> {
    let body = "flood";
    let mut lines = vec![
        format!("MESSAGE sip:service@{} SIP/2.0", t.vip),
        "Via: SIP/2.0/UDP 198.19.0.1:5070;branch=z9hG4bK-flood".into(),
        "Max-Forwards: 70".into(),
        "From: <sip:flood@198.19.0.1>;tag=fl".into(),
        format!("To: <sip:service@{}>", t.vip.ip()),
    ];
    lines.extend(extra.lines().map(str::to_owned));
    lines.extend([
        format!("Call-ID: {call_id}"),
        "CSeq: 1 MESSAGE".into(),
        "Content-Type: text/plain".into(),
        format!("Content-Length: {}", body.len()),
        String::new(),
    ]);
    let mut b = crlf_lines(&lines);
    b.extend_from_slice(body.as_bytes());
    b
}

/// An INVITE without a Call-ID header: only lookalikes, and one in the body.
fn no_call_id_invite(t: &Target, i: usize) -> Vec<u8> {
    let body = "v=0\r\nCall-ID: in-the-body@flood\r\n";
    let lines = [
        format!("INVITE sip:service@{} SIP/2.0", t.vip),
        format!("Via: SIP/2.0/UDP 198.19.0.1:5070;branch=z9hG4bK-nocid-{i}"),
        "From: <sip:flood@198.19.0.1>;tag=nc".into(),
        format!("To: <sip:service@{}>", t.vip.ip()),
        "X-Call-ID: lookalike@flood".into(),
        "Call-IDX: lookalike@flood".into(),
        "i-foo: lookalike@flood".into(),
        "Subject: Call-ID: inside a value".into(),
        "CSeq: 1 INVITE".into(),
        "Content-Type: application/sdp".into(),
        format!("Content-Length: {}", body.len()),
        String::new(),
    ];
    let mut b = crlf_lines(&lines);
    b.extend_from_slice(body.as_bytes());
    b
}

/// An INVITE whose first Call-ID header is empty (long, compact, blank, folded).
fn empty_call_id_invite(t: &Target, i: usize) -> Vec<u8> {
    let empty = ["Call-ID:", "i:   ", "Call-ID: \t ", "call-id:\r\n \r\n\t"][i % 4];
    let lines = [
        format!("INVITE sip:service@{} SIP/2.0", t.vip),
        format!("Via: SIP/2.0/UDP 198.19.0.1:5070;branch=z9hG4bK-empty-{i}"),
        empty.into(),
        format!("Call-ID: {FLOOD_CALL_ID}second-{i}"),
        "CSeq: 1 INVITE".into(),
        "Content-Length: 0".into(),
        String::new(),
    ];
    crlf_lines(&lines)
}

/// NUL bytes in a header before the Call-ID, in the Call-ID value, or in a request
/// without one.
fn nul_bytes(t: &Target, i: usize) -> Vec<u8> {
    match i % 3 {
        0 => message_request(t, &format!("{FLOOD_CALL_ID}nul-{i}"), "Subject: a\0b\0\0c"),
        1 => message_request(t, &format!("{FLOOD_CALL_ID}nul\0\0-{i}"), ""),
        _ => {
            let mut b = no_call_id_invite(t, i);
            for k in (0..b.len()).step_by(37) {
                b[k] = 0;
            }
            b
        }
    }
}

/// A response to the VIP (200 to an INVITE, or a 180).
fn response(t: &Target, i: usize) -> Vec<u8> {
    let status = if i.is_multiple_of(2) {
        "200 OK"
    } else {
        "180 Ringing"
    };
    let lines = [
        format!("SIP/2.0 {status}"),
        format!("Via: SIP/2.0/UDP {};branch=z9hG4bK-resp-{i}", t.vip),
        "From: <sip:flood@198.19.0.1>;tag=fr".into(),
        format!("To: <sip:service@{}>;tag=to{i}", t.vip.ip()),
        format!("Call-ID: {FLOOD_CALL_ID}resp-{i}"),
        "CSeq: 1 INVITE".into(),
        "Content-Length: 0".into(),
        String::new(),
    ];
    crlf_lines(&lines)
}

/// Checks that the flood's source range is inside the test range.
pub fn check_source_range() -> Result<()> {
    check_test_address(Ipv4Addr::new(198, 19, 0, 1).into())?;
    check_test_address(Ipv4Addr::new(198, 19, 255, 254).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            vip: "198.18.0.100:5060".parse().unwrap(),
            other: Ipv4Addr::new(198, 18, 0, 2),
        }
    }

    #[test]
    fn payload_kinds_have_the_intended_outcomes() {
        let t = target();
        let mut rng = Rng::new(7);
        for i in 0..VARIANTS {
            for kind in [
                Kind::RandomBytes,
                Kind::Stun,
                Kind::NoCallId,
                Kind::EmptyCallId,
                Kind::Crlf,
            ] {
                let p = payload(kind, i, &t, &mut rng);
                assert_eq!(p.outcome, Outcome::NoCallId, "{kind:?} {i}: {:?}", p.bytes);
            }
            for kind in [Kind::LongCallId, Kind::Response] {
                let p = payload(kind, i, &t, &mut rng);
                assert_eq!(p.outcome, Outcome::Dispatch, "{kind:?} {i}");
            }
            let nul = payload(Kind::NulBytes, i, &t, &mut rng);
            let want = if i % 3 == 2 {
                Outcome::NoCallId
            } else {
                Outcome::Dispatch
            };
            assert_eq!(nul.outcome, want, "NUL variant {i}");
        }
        let long = payload(Kind::LongCallId, 0, &t, &mut rng);
        let scan = scan_message(&long.bytes, HashKey::DEFAULT);
        assert_eq!(scan.end - scan.start, 300);
    }

    #[test]
    fn checksums_verify() {
        let mut f = Factory::new(target(), 1);
        let mut buf = [0u8; MAX_FRAME];
        let vip = f.target.vip;
        let (len, _) = f.datagram(&mut buf, vip, Kind::Response);
        // A correct IPv4 header sums to 0xffff, checksum included.
        assert_eq!(fold(sum16(&buf[ETH_LEN..ETH_LEN + IP_LEN])), 0xffff);
        // So does the UDP datagram with its pseudo-header.
        let udp = &buf[ETH_LEN + IP_LEN..len];
        let pseudo =
            sum16(&buf[ETH_LEN + 12..ETH_LEN + 20]) + u64::from(IPPROTO_UDP) + udp.len() as u64;
        assert_eq!(fold(pseudo + sum16(udp)), 0xffff);
    }

    #[test]
    fn fragment_pairs_come_in_order() {
        let mut f = Factory::new(target(), 3);
        let mut buf = [0u8; MAX_FRAME];
        let first = f.fragment_pair(&mut buf);
        assert_eq!(first.completes_pair, None);
        assert_eq!(u16::from_be_bytes([buf[20], buf[21]]), MF);
        let second = f.next(&mut buf);
        assert!(second.completes_pair.is_some());
        let frag = u16::from_be_bytes([buf[20], buf[21]]);
        assert_eq!(frag & MF, 0);
        assert_eq!(usize::from(frag) * 8, first.len - ETH_LEN - IP_LEN);
    }

    #[test]
    fn sources_are_fresh_and_in_range() {
        check_source_range().unwrap();
        let mut f = Factory::new(target(), 5);
        let a = f.fresh_source();
        let b = f.fresh_source();
        assert_ne!(a.ip(), b.ip());
        for _ in 0..70_000 {
            let s = f.fresh_source();
            let o = s.ip().octets();
            assert!(o[0] == 198 && o[1] == 19 && o[3] != 0 && o[3] != 255, "{s}");
            assert!(s.port() >= 1024);
        }
    }
}
