//! How the slow path hands a datagram on to its backend, in the service's forwarding
//! mode, so that the backend receives what the fast path would have sent it:
//! - `rewrite`: a UDP datagram from the client to the backend's address and port
//!   ([`RawUdp`]).
//! - `ipip`: the client's datagram, unchanged (to the VIP), inside an outer IP header
//!   from the encapsulation source to the backend: a raw `IPPROTO_IPIP` (IPv6:
//!   `IPPROTO_IPV6`) socket, for which we build the inner datagram, in fragments that
//!   fit the path MTU with their outer header, and the kernel adds the outer header.
//! - `l2dsr`: the client's datagram, unchanged (to the VIP), in Ethernet frames to the
//!   backend's MAC address on the dispatcher's interface: an `AF_PACKET` socket, for
//!   which we build the datagram and fragment it to the path MTU.
//!
//! The path MTU towards a backend is the smaller of the interface's MTU and the route's
//! (a route `mtu`, or what path MTU discovery learnt), as the fast path's FIB lookup
//! sees it.
use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    time::Instant,
};

use anyhow::{Context as _, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    cli::ForwardingMode,
    ippacket::{self, IPV4_HLEN, IPV6_HLEN},
    neighbours::NeighbourCache,
    rawudp::{RawUdp, drop_everything_received, set_int},
};

/// Why a datagram was not handed on.
#[derive(Debug)]
pub enum SendError {
    /// l2dsr: the backend has no usable entry in the interface's neighbour table.
    NotOnLink,
    /// A payload longer than one IP datagram can carry (a guard: the kernel delivers
    /// no such datagram to the slow path).
    TooBig,
    Io(io::Error),
}

impl From<io::Error> for SendError {
    fn from(e: io::Error) -> SendError {
        SendError::Io(e)
    }
}

pub enum Forwarder {
    Rewrite(RawUdp),
    L2dsr(L2dsr),
    Ipip(Ipip),
}

impl Forwarder {
    /// Opens what `mode` sends with, for a service on `vip`: `iface` is the dispatcher's
    /// interface (l2dsr), `encap_source` the outer source (ipip: required, of the VIP's
    /// family).
    pub fn open(
        mode: ForwardingMode,
        vip: SocketAddr,
        iface: &str,
        encap_source: Option<IpAddr>,
    ) -> anyhow::Result<Forwarder> {
        Ok(match mode {
            ForwardingMode::Rewrite => Forwarder::Rewrite(RawUdp::open(vip.is_ipv6())?),
            ForwardingMode::L2dsr => Forwarder::L2dsr(L2dsr::open(vip, iface)?),
            ForwardingMode::Ipip => {
                let Some(source) = encap_source else {
                    bail!("ipip forwarding for {vip} needs an encapsulation source address");
                };
                Forwarder::Ipip(Ipip::open(vip, source, iface)?)
            }
        })
    }

    /// Sends `payload`, received from `client` on `vip`, on to `backend`.
    pub async fn send(
        &mut self,
        client: SocketAddr,
        vip: SocketAddr,
        backend: SocketAddr,
        payload: &[u8],
    ) -> Result<(), SendError> {
        if backend.is_ipv6() != vip.is_ipv6() {
            return Err(SendError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("backend {backend} is not of the VIP {vip}'s family"),
            )));
        }
        match self {
            Forwarder::Rewrite(raw) => Ok(raw.send(client, backend, payload).await?),
            Forwarder::L2dsr(l2) => l2.send(client, vip, backend.ip(), payload).await,
            Forwarder::Ipip(ipip) => ipip.send(client, vip, backend.ip(), payload).await,
        }
    }
}

/// A starting point for IP identifications that differs between runs.
fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // A fixed start is only less tidy after a restart, not wrong.
    let _ = getrandom::fill(&mut b);
    u32::from_ne_bytes(b)
}

fn async_fd(sock: Socket, what: &str) -> anyhow::Result<AsyncFd<Socket>> {
    sock.set_nonblocking(true)
        .with_context(|| format!("making the {what} non-blocking"))?;
    // SAFETY: the AsyncFd owns the socket, so its fd stays open and the same until the
    // AsyncFd is dropped; socket2's as_raw_fd always returns that fd.
    unsafe { AsyncFd::register_with_interest(sock, Interest::WRITABLE) }
        .map_err(io::Error::from)
        .with_context(|| format!("registering the {what} with the runtime"))
}

/// ipip: a raw socket of protocol IPIP (4) or IPv6 (41) bound to the encapsulation
/// source. A datagram whose encapsulation would exceed the interface's MTU is
/// fragmented before it is encapsulated, and each fragment travels in an outer packet
/// of its own: the backend decapsulates every packet as it comes and reassembles the
/// inner datagram, as it would the client's own fragments (many tunnel endpoints, XDP
/// decapsulation among them, cannot reassemble outer fragments).
pub struct Ipip {
    fd: AsyncFd<Socket>,
    v6: bool,
    mtu: InterfaceMtu,
    /// The identification of the next inner datagram (IPv4, IPv6).
    ident4: u16,
    ident6: u32,
}

impl Ipip {
    pub fn open(vip: SocketAddr, source: IpAddr, iface: &str) -> anyhow::Result<Ipip> {
        let v6 = vip.is_ipv6();
        if source.is_ipv6() != v6 {
            bail!("ipip for {vip}: the encapsulation source {source} is not of the VIP's family");
        }
        let (domain, proto) = if v6 {
            (Domain::IPV6, libc::IPPROTO_IPV6)
        } else {
            (Domain::IPV4, libc::IPPROTO_IPIP)
        };
        let sock = Socket::new(domain, Type::RAW, Some(Protocol::from(proto)))
            .context("opening the slow path's raw IP-in-IP socket (needs CAP_NET_RAW)")?;
        // It would also get a copy of every IP-in-IP packet the host receives.
        drop_everything_received(&sock).context("filtering the raw socket's receive side")?;
        let _ = sock.set_recv_buffer_size(0);
        let _ = sock.set_send_buffer_size(4 << 20);
        sock.bind(&SocketAddr::new(source, 0).into())
            .with_context(|| {
                format!(
                    "binding the IP-in-IP socket to the encapsulation source {source} \
                     (is it an address of this host?)"
                )
            })?;
        // No DF on the outer packet: each fits the interface's MTU, but a smaller MTU on
        // the way may still need the kernel (IPv4 routers) to fragment it. Measured on Linux 6.18 with a
        // protocol-41 raw socket and a 9000-byte packet over MTU 1500: the default
        // (IPV6_PMTUDISC_WANT) and IPV6_PMTUDISC_DONT fragment locally (7 fragments),
        // DO and PROBE fail with EMSGSIZE, and IPV6_DONTFRAG changes nothing (the
        // kernel applies it to UDP, ICMPv6 and IPPROTO_RAW sockets only). DONT, set
        // here, keeps it so whatever the path MTU cache says.
        let (level, name, value) = if v6 {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DONT,
            )
        } else {
            (
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DONT,
            )
        };
        set_int(sock.as_raw_fd(), level, name, value)
            .context("turning path MTU discovery off on the IP-in-IP socket")?;
        let mtu = InterfaceMtu::read(iface, vip.is_ipv6())
            .with_context(|| format!("ipip for {vip}: reading the MTU of {iface}"))?;
        log::info!(
            "slow path: ipip for {vip} from {source} (fragments above the MTU {} of {iface})",
            mtu.mtu
        );
        Ok(Ipip {
            fd: async_fd(sock, "IP-in-IP socket")?,
            v6,
            mtu,
            ident4: random_u32() as u16,
            ident6: random_u32(),
        })
    }

    /// Bytes the outer header adds.
    pub fn outer_len(v6: bool) -> usize {
        if v6 { IPV6_HLEN } else { IPV4_HLEN }
    }

    async fn send(
        &mut self,
        client: SocketAddr,
        vip: SocketAddr,
        backend: IpAddr,
        payload: &[u8],
    ) -> Result<(), SendError> {
        let room = self
            .mtu
            .towards(backend)
            .saturating_sub(Ipip::outer_len(self.v6));
        let pieces = fragments(
            client,
            vip,
            payload,
            room,
            &mut self.ident4,
            &mut self.ident6,
        )?;
        // A raw socket's destination port must be 0 (IPv6) and is ignored (IPv4).
        let to = SockAddr::from(SocketAddr::new(backend, 0));
        for inner in &pieces {
            self.fd
                .async_io(Interest::WRITABLE, |sock| sock.send_to(inner, &to))
                .await?;
        }
        Ok(())
    }
}

/// Backends warned about at once (a warning is given again once the set is cleared).
const MAX_WARNED: usize = 1024;

/// l2dsr: an `AF_PACKET` datagram socket (the kernel writes the Ethernet header, with
/// the interface's MAC as source) on the dispatcher's interface.
pub struct L2dsr {
    fd: AsyncFd<Socket>,
    iface: String,
    ifindex: u32,
    mtu: InterfaceMtu,
    neighbours: NeighbourCache,
    ident4: u16,
    ident6: u32,
    /// Backends already warned about as not on the link.
    warned: HashSet<IpAddr>,
}

impl L2dsr {
    pub fn open(vip: SocketAddr, iface: &str) -> anyhow::Result<L2dsr> {
        let name = CString::new(iface).with_context(|| format!("{iface:?}: not an interface"))?;
        // SAFETY: `name` is a NUL-terminated string that lives across the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("l2dsr for {vip}: no interface {iface}"));
        }
        let mtu = InterfaceMtu::read(iface, vip.is_ipv6())
            .with_context(|| format!("l2dsr for {vip}: reading the MTU of {iface}"))?;
        // Protocol 0: the socket sends only, nothing is ever queued to it.
        let sock = Socket::new(Domain::PACKET, Type::DGRAM, None)
            .context("opening the slow path's packet socket (needs CAP_NET_RAW)")?;
        let _ = sock.set_send_buffer_size(4 << 20);
        log::info!("slow path: l2dsr for {vip} on {iface} (MTU {})", mtu.mtu);
        Ok(L2dsr {
            fd: async_fd(sock, "packet socket")?,
            iface: iface.to_string(),
            ifindex,
            mtu,
            neighbours: NeighbourCache::new(ifindex)
                .context("opening a netlink socket for the neighbour table")?,
            ident4: random_u32() as u16,
            ident6: random_u32(),
            warned: HashSet::new(),
        })
    }

    async fn send(
        &mut self,
        client: SocketAddr,
        vip: SocketAddr,
        backend: IpAddr,
        payload: &[u8],
    ) -> Result<(), SendError> {
        let Some(mac) = self.neighbours.lookup(backend, Instant::now()) else {
            if self.warned.len() >= MAX_WARNED {
                self.warned.clear();
            }
            if self.warned.insert(backend) {
                log::warn!(
                    "slow path (l2dsr): backend {backend} has no neighbour entry on {} \
                     (not on the link, or not resolved yet): its datagrams are dropped \
                     (not_on_link)",
                    self.iface
                );
            }
            return Err(SendError::NotOnLink);
        };
        if !self.warned.is_empty() {
            self.warned.remove(&backend);
        }
        let v6 = vip.is_ipv6();
        let mtu = self.mtu.towards(backend);
        let frames = fragments(
            client,
            vip,
            payload,
            mtu,
            &mut self.ident4,
            &mut self.ident6,
        )?;
        let ethertype = if v6 { libc::ETH_P_IPV6 } else { libc::ETH_P_IP };
        // SAFETY: sockaddr_ll is a plain C struct for which all zeroes is valid.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = (ethertype as u16).to_be();
        to.sll_ifindex = i32::try_from(self.ifindex).unwrap_or(0);
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&mac);
        for frame in &frames {
            self.fd
                .async_io(Interest::WRITABLE, |sock| send_frame(sock, frame, &to))
                .await?;
        }
        Ok(())
    }
}

/// The IP datagram from `client` to `vip` carrying `payload`, in fragments of at most
/// `mtu` bytes (one piece when it fits), with the next identification of its family.
fn fragments(
    client: SocketAddr,
    vip: SocketAddr,
    payload: &[u8],
    mtu: usize,
    ident4: &mut u16,
    ident6: &mut u32,
) -> Result<Vec<Vec<u8>>, SendError> {
    let pieces = if vip.is_ipv6() {
        *ident6 = ident6.wrapping_add(1);
        let d = ippacket::udp_datagram(client, vip, payload, 0).ok_or(SendError::TooBig)?;
        ippacket::fragment_v6(&d, mtu, *ident6)
    } else {
        *ident4 = ident4.wrapping_add(1);
        let d = ippacket::udp_datagram(client, vip, payload, *ident4).ok_or(SendError::TooBig)?;
        ippacket::fragment_v4(&d, mtu)
    };
    pieces.map_err(|e| {
        SendError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fragmenting for an MTU of {mtu}: {e:?}"),
        ))
    })
}

/// An interface's MTU and the route MTUs towards backends, each read again at most every
/// [`MTU_MAX_AGE`].
struct InterfaceMtu {
    iface: String,
    mtu: usize,
    read_at: Instant,
    routes: HashMap<IpAddr, (usize, Instant)>,
    /// A UDP socket of the service's family, opened with the forwarder (so in its
    /// network namespace) and connected to each backend in turn to read the route MTU.
    probe: Socket,
}

/// Backends whose route MTU is kept at once (the map is emptied when full).
const MAX_ROUTE_MTUS: usize = 4096;

impl InterfaceMtu {
    fn read(iface: &str, v6: bool) -> io::Result<InterfaceMtu> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        Ok(InterfaceMtu {
            iface: iface.to_owned(),
            mtu: interface_mtu(iface)?,
            read_at: Instant::now(),
            routes: HashMap::new(),
            probe: Socket::new(domain, Type::DGRAM, None)?,
        })
    }

    /// The path MTU towards `backend`: the interface's, or the route's when smaller.
    fn towards(&mut self, backend: IpAddr) -> usize {
        let iface = self.current();
        let now = Instant::now();
        if let Some(&(mtu, at)) = self.routes.get(&backend)
            && now.saturating_duration_since(at) < MTU_MAX_AGE
        {
            return mtu.min(iface);
        }
        match route_mtu(&self.probe, backend) {
            Ok(mtu) => {
                if self.routes.len() >= MAX_ROUTE_MTUS {
                    self.routes.clear();
                }
                self.routes.insert(backend, (mtu, now));
                mtu.min(iface)
            }
            Err(e) => {
                log::debug!("slow path: the route MTU towards {backend}: {e}");
                iface
            }
        }
    }

    fn current(&mut self) -> usize {
        let now = Instant::now();
        if now.saturating_duration_since(self.read_at) >= MTU_MAX_AGE {
            self.read_at = now;
            match interface_mtu(&self.iface) {
                Ok(mtu) => self.mtu = mtu,
                Err(e) => log::debug!("slow path: the MTU of {}: {e}", self.iface),
            }
        }
        self.mtu
    }
}

/// How long the interface's MTU is used before it is read again.
const MTU_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// The route's MTU towards `to` (`IP_MTU` / `IPV6_MTU` of UDP socket `sock` once
/// connected to it: the route's `mtu`, or the path MTU the kernel learnt, else the egress
/// interface's). Connecting a UDP socket sends nothing.
fn route_mtu(sock: &Socket, to: IpAddr) -> io::Result<usize> {
    sock.connect(&SocketAddr::new(to, 9).into())?;
    let (level, name) = match to {
        IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `mtu` and `len` are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw mut mtu).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(mtu)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("route MTU {mtu}")))
}

/// The MTU of `iface` in this thread's network namespace (`SIOCGIFMTU`; sysfs shows the
/// namespace sysfs was mounted in).
fn interface_mtu(iface: &str) -> io::Result<usize> {
    if iface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{iface:?}: interface name too long"),
        ));
    }
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    // SAFETY: ifreq is a plain C struct for which all zeroes is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into `ifr`, which
    // lives across the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut ifr) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFMTU the union holds the MTU.
    let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
    usize::try_from(mtu)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("MTU {mtu} of {iface}")))
}

fn send_frame(sock: &Socket, frame: &[u8], to: &libc::sockaddr_ll) -> io::Result<()> {
    // SAFETY: `frame` and `to` are valid for reads of the lengths passed during the
    // call; sockaddr_ll is the address type of an AF_PACKET socket.
    let rc = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIP4: &str = "198.18.0.150:5060";

    fn open_error(mode: ForwardingMode, vip: &str, iface: &str, src: Option<&str>) -> String {
        let src = src.map(|s| s.parse().unwrap());
        match Forwarder::open(mode, vip.parse().unwrap(), iface, src) {
            Ok(_) => panic!("{mode} {vip} {iface} {src:?} opened"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn ipip_needs_an_encapsulation_source_of_the_vips_family() {
        let e = open_error(ForwardingMode::Ipip, VIP4, "lo", None);
        assert!(e.contains("needs an encapsulation source"), "{e}");
        let e = open_error(ForwardingMode::Ipip, VIP4, "lo", Some("2001:db8::1"));
        assert!(e.contains("2001:db8::1 is not of the VIP's family"), "{e}");
        let e = open_error(
            ForwardingMode::Ipip,
            "[2001:db8::150]:5060",
            "lo",
            Some("198.18.0.1"),
        );
        assert!(e.contains("198.18.0.1 is not of the VIP's family"), "{e}");
    }

    #[test]
    fn l2dsr_names_an_interface_that_does_not_exist() {
        for bad in ["no-such-if0", "", "a-name-far-too-long-for-linux"] {
            let e = open_error(ForwardingMode::L2dsr, VIP4, bad, None);
            assert!(e.contains(&format!("no interface {bad}")), "{e}");
        }
        assert!(interface_mtu("a-name-far-too-long-for-linux").is_err());
        assert!(interface_mtu("lo").unwrap() >= 1280);
    }

    #[test]
    fn ipip_fragments_the_inner_datagram_to_fit_the_mtu_with_its_outer_header() {
        let (c, v): (SocketAddr, SocketAddr) =
            ("198.18.0.200:5070".parse().unwrap(), VIP4.parse().unwrap());
        let (mut i4, mut i6) = (7, 7);
        let room = 1500 - Ipip::outer_len(false);
        let pieces = fragments(c, v, &[0; 3000], room, &mut i4, &mut i6).unwrap();
        assert_eq!(pieces.len(), 3);
        assert!(pieces.iter().all(|p| p.len() <= room));
        assert_eq!(i4, 8, "one identification per datagram");
        let one = fragments(c, v, &[0; 100], room, &mut i4, &mut i6).unwrap();
        assert_eq!(one.len(), 1);
        assert!(matches!(
            fragments(c, v, &[0; 65_508], room, &mut i4, &mut i6),
            Err(SendError::TooBig)
        ));
    }
}
