//! Conversions between the map address types and `std::net::SocketAddr`.
//!
//! [`Backend`] and [`ServiceKey`] hold the address as four `u32` words whose in-memory
//! bytes are the wire bytes (IPv4 in `addr[0]`, the rest zero) and the port in network
//! byte order, so the conversions copy bytes and never swap words.
use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::maps::{Backend, DecapSource, EncapSource, FAMILY_V4, FAMILY_V6, ServiceKey};

fn words_from_ip(ip: IpAddr) -> ([u32; 4], u8) {
    let mut addr = [0u32; 4];
    match ip {
        IpAddr::V4(v4) => {
            addr[0] = u32::from_ne_bytes(v4.octets());
            (addr, FAMILY_V4)
        }
        IpAddr::V6(v6) => {
            for (word, chunk) in addr.iter_mut().zip(v6.octets().chunks_exact(4)) {
                *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            (addr, FAMILY_V6)
        }
    }
}

/// The address as wire bytes: `addr[0]` alone for IPv4, all 16 bytes for IPv6.
fn ip_from_words(addr: &[u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        return IpAddr::V4(Ipv4Addr::from(addr[0].to_ne_bytes()));
    }
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(octets))
}

fn port_to_wire(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

fn port_from_wire(port: u16) -> u16 {
    u16::from_be_bytes(port.to_ne_bytes())
}

/// `from_socket_addr` / `to_socket_addr` for the two address types of the maps, which
/// share one layout (network-order address words, network-order port, family).
macro_rules! socket_addr_conversions {
    ($($ty:ident),+) => {$(
        impl $ty {
            /// From a socket address. IPv6 scope id and flow label are dropped.
            pub fn from_socket_addr(sa: SocketAddr) -> $ty {
                let (addr, family) = words_from_ip(sa.ip());
                $ty { addr, port: port_to_wire(sa.port()), family, _pad: 0 }
            }

            /// The socket address. Any family other than [`FAMILY_V4`] is read as IPv6.
            pub fn to_socket_addr(&self) -> SocketAddr {
                SocketAddr::new(ip_from_words(&self.addr, self.family), port_from_wire(self.port))
            }
        }
    )+};
}

socket_addr_conversions!(Backend, ServiceKey);

impl EncapSource {
    /// The entry for these sources (a missing one stays all zero: `ipip` of that family
    /// passes to the stack).
    pub fn new(v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> EncapSource {
        EncapSource {
            v4: v4.map_or(0, |a| words_from_ip(a.into()).0[0]),
            v6: v6.map_or([0; 4], |a| words_from_ip(a.into()).0),
        }
    }
}

impl DecapSource {
    /// The key of an outer source address.
    pub fn new(ip: IpAddr) -> DecapSource {
        let (addr, family) = words_from_ip(ip);
        DecapSource {
            addr,
            family,
            _pad: [0; 3],
        }
    }
}

/// Formats a backend as `198.18.0.21:5060` or `[2001:db8::21]:5060`.
pub fn backend_display(b: &Backend) -> impl fmt::Display + use<> {
    b.to_socket_addr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;

    #[test]
    fn decap_sources_are_wire_words_and_family() {
        let v4 = DecapSource::new("198.18.0.2".parse().unwrap());
        assert_eq!(v4.addr[0].to_ne_bytes(), [198, 18, 0, 2]);
        assert_eq!(v4.addr[1..], [0; 3]);
        assert_eq!(v4.family, FAMILY_V4);
        let v6 = DecapSource::new("c612:2::".parse().unwrap());
        assert_eq!((v6.addr[0], v6.family), (v4.addr[0], FAMILY_V6));
        assert_ne!(v4, v6, "the family tells them apart");
    }

    #[test]
    fn v4_layout_is_wire_bytes() {
        let b = Backend::from_socket_addr("198.18.0.21:5060".parse().unwrap());
        assert_eq!(b.family, FAMILY_V4);
        assert_eq!(b.addr[0].to_ne_bytes(), [198, 18, 0, 21]);
        assert_eq!(b.addr[1..], [0, 0, 0]);
        assert_eq!(b.port.to_ne_bytes(), 5060u16.to_be_bytes());
        assert_eq!(format!("{}", backend_display(&b)), "198.18.0.21:5060");
    }

    #[test]
    fn encap_sources_are_wire_bytes_and_zero_when_missing() {
        let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        let e = EncapSource::new(Some(Ipv4Addr::new(198, 18, 0, 1)), Some(v6));
        assert_eq!(e.v4.to_ne_bytes(), [198, 18, 0, 1]);
        assert_eq!(bytemuck::bytes_of(&e.v6), v6.octets());
        assert_eq!(EncapSource::new(None, None), EncapSource::default());
    }

    #[test]
    fn v6_layout_is_wire_bytes() {
        let sa: SocketAddr = "[2001:db8::21]:5060".parse().unwrap();
        let b = Backend::from_socket_addr(sa);
        assert_eq!(b.family, FAMILY_V6);
        let bytes: &[u8] = bytemuck::bytes_of(&b.addr);
        assert_eq!(
            bytes,
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x21).octets()
        );
        assert_eq!(format!("{}", backend_display(&b)), "[2001:db8::21]:5060");
    }

    #[test]
    fn round_trips() {
        for s in [
            "198.18.0.21:5060",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:5061",
        ] {
            let sa: SocketAddr = s.parse().unwrap();
            assert_eq!(Backend::from_socket_addr(sa).to_socket_addr(), sa);
            assert_eq!(ServiceKey::from_socket_addr(sa).to_socket_addr(), sa);
        }
        let sa: SocketAddr = "[2001:db8:1:2:3:4:5:6]:5060".parse().unwrap();
        assert_eq!(Backend::from_socket_addr(sa).to_socket_addr(), sa);
        assert_eq!(ServiceKey::from_socket_addr(sa).to_socket_addr(), sa);
    }
}
