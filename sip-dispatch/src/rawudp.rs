//! Sending UDP datagrams from any source address and port (the client's) through one
//! long-lived raw socket: `SOCK_RAW` + `IPPROTO_UDP` with `IP_TRANSPARENT` /
//! `IPV6_TRANSPARENT`. We write the UDP header; the kernel writes the IP header with the
//! source given per datagram (`IP_PKTINFO` / `IPV6_PKTINFO`) and fragments datagrams
//! larger than the path MTU. A UDP socket cannot do this: its source port is the one it
//! is bound to, so it would take a socket per client.
//!
//! A raw `IPPROTO_UDP` socket also receives a copy of every UDP datagram the host
//! delivers; a socket filter that accepts nothing drops each copy before it is queued.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, RawFd},
};

use anyhow::Context as _;
use sip_dispatch_common::csum::checksum;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{Interest, unix::AsyncFd};

const UDP_HEADER_LEN: usize = 8;
/// Offset of the checksum in the UDP header (for `IPV6_CHECKSUM`).
const UDP_CHECKSUM_OFFSET: libc::c_int = 6;
/// The largest UDP payload: the 16-bit length fields of UDP and of the IPv4 header.
pub const MAX_PAYLOAD_V4: usize = 65_535 - 20 - UDP_HEADER_LEN;
pub const MAX_PAYLOAD_V6: usize = 65_535 - UDP_HEADER_LEN;

/// The UDP header for `payload` from `src` to `dst`. For IPv4 it carries the checksum
/// (RFC 768, over the pseudo-header); for IPv6 the checksum field is 0 and the kernel
/// fills it in (`IPV6_CHECKSUM`). None when the families differ or the payload is too
/// large for a UDP datagram.
pub fn udp_header(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Option<[u8; 8]> {
    let max = if src.is_ipv4() {
        MAX_PAYLOAD_V4
    } else {
        MAX_PAYLOAD_V6
    };
    if src.is_ipv4() != dst.is_ipv4() || payload.len() > max {
        return None;
    }
    let udp_len = u16::try_from(payload.len() + UDP_HEADER_LEN).ok()?;
    let mut h = [0u8; UDP_HEADER_LEN];
    h[0..2].copy_from_slice(&src.port().to_be_bytes());
    h[2..4].copy_from_slice(&dst.port().to_be_bytes());
    h[4..6].copy_from_slice(&udp_len.to_be_bytes());
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) {
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&s.octets());
        pseudo[4..8].copy_from_slice(&d.octets());
        pseudo[9] = libc::IPPROTO_UDP as u8;
        pseudo[10..12].copy_from_slice(&udp_len.to_be_bytes());
        // Both parts start on an even offset, so the one's-complement sum carries over:
        // !checksum(..) is the folded running sum.
        let head_sum = !checksum(0, &pseudo) as u32 + !checksum(0, &h) as u32;
        let check = match checksum(head_sum, payload) {
            // RFC 768: a computed 0 is sent as all ones (0 means "no checksum").
            0 => 0xffff,
            c => c,
        };
        h[6..8].copy_from_slice(&check.to_be_bytes());
    }
    Some(h)
}

/// One raw UDP socket of one family, sending with any source address and port.
pub struct RawUdp {
    fd: AsyncFd<Socket>,
    v6: bool,
}

impl RawUdp {
    pub fn open(v6: bool) -> anyhow::Result<RawUdp> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let sock = Socket::new(domain, Type::RAW, Some(Protocol::UDP))
            .context("opening the slow path's raw UDP socket (needs CAP_NET_RAW)")?;
        drop_everything_received(&sock).context("filtering the raw socket's receive side")?;
        // The smallest receive buffer the kernel allows: nothing is ever queued anyway.
        let _ = sock.set_recv_buffer_size(0);
        // Bursts of reassembled INVITEs: room for several of the largest.
        let _ = sock.set_send_buffer_size(4 << 20);
        if v6 {
            sock.set_ip_transparent_v6(true)
                .context("IPV6_TRANSPARENT on the raw socket (needs CAP_NET_ADMIN)")?;
            set_int(
                sock.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_CHECKSUM,
                UDP_CHECKSUM_OFFSET,
            )
            .context("IPV6_CHECKSUM on the raw socket")?;
        } else {
            sock.set_ip_transparent_v4(true)
                .context("IP_TRANSPARENT on the raw socket (needs CAP_NET_ADMIN)")?;
            // Fragment locally (no DF bit), as the stack did for the client's datagram.
            set_int(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DONT,
            )
            .context("IP_MTU_DISCOVER on the raw socket")?;
        }
        sock.set_nonblocking(true)?;
        // SAFETY: the AsyncFd owns the socket, so its fd stays open and the same until
        // the AsyncFd is dropped; socket2's as_raw_fd always returns that fd.
        let fd = unsafe { AsyncFd::register_with_interest(sock, Interest::WRITABLE) }
            .map_err(io::Error::from)
            .context("registering the raw socket with the runtime")?;
        Ok(RawUdp { fd, v6 })
    }

    /// Sends `payload` to `dst` as a UDP datagram from `src`; waits while the socket's
    /// send buffer is full.
    pub async fn send(&self, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> io::Result<()> {
        if src.is_ipv6() != self.v6 || dst.is_ipv6() != self.v6 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{src} -> {dst} on the IPv{} raw socket",
                    if self.v6 { 6 } else { 4 }
                ),
            ));
        }
        let header = udp_header(src, dst, payload).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {}-byte payload does not fit in a UDP datagram",
                    payload.len()
                ),
            )
        })?;
        self.fd
            .async_io(Interest::WRITABLE, |sock| {
                send_from(sock.as_raw_fd(), src.ip(), dst.ip(), &header, payload)
            })
            .await
    }
}

/// Attaches a classic BPF filter that accepts no packet (`ret #0`).
pub(crate) fn drop_everything_received(sock: &Socket) -> io::Result<()> {
    let mut reject_all = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let program = libc::sock_fprog {
        len: 1,
        filter: reject_all.as_mut_ptr(),
    };
    // SAFETY: `program` points at `reject_all`, which lives until setsockopt returns
    // (the kernel copies the filter); the length passed is the size of `program`.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const program).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a c_int on the stack, and its size is what is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One `sendmsg` of header + payload to `dst`, with `src` as the source address.
fn send_from(
    fd: RawFd,
    src: IpAddr,
    dst: IpAddr,
    header: &[u8; 8],
    payload: &[u8],
) -> io::Result<()> {
    // The port of a raw socket's destination must be 0 (IPv6) and is ignored (IPv4).
    let dst = SockAddr::from(SocketAddr::new(dst, 0));
    let mut iov = [
        libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        },
    ];
    // Room for one cmsg with an in6_pktinfo (the larger one), aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is a plain C struct for which all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = dst.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = dst.len();
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_* only compute sizes and pointers inside `control`, which is large
    // enough (64 bytes) for one cmsghdr plus an in6_pktinfo (16 + 20 bytes, padded);
    // the data is written unaligned. `msg` and everything it points at (dst, iov,
    // control, header, payload) outlive the sendmsg call.
    let rc = unsafe {
        let (level, kind, len) = match src {
            IpAddr::V4(_) => (
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                std::mem::size_of::<libc::in_pktinfo>(),
            ),
            IpAddr::V6(_) => (
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                std::mem::size_of::<libc::in6_pktinfo>(),
            ),
        };
        msg.msg_controllen = libc::CMSG_SPACE(len as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
        let data = libc::CMSG_DATA(cmsg);
        match src {
            IpAddr::V4(a) => std::ptr::write_unaligned(
                data.cast::<libc::in_pktinfo>(),
                libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                },
            ),
            IpAddr::V6(a) => std::ptr::write_unaligned(
                data.cast::<libc::in6_pktinfo>(),
                libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    ipi6_ifindex: 0,
                },
            ),
        }
        libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
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

    /// The one's-complement sum of pseudo-header, header and payload is all ones when
    /// the checksum is right (RFC 1071).
    fn verifies(src: SocketAddr, dst: SocketAddr, h: &[u8; 8], payload: &[u8]) -> bool {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
            unreachable!()
        };
        let mut all = Vec::new();
        all.extend_from_slice(&s.octets());
        all.extend_from_slice(&d.octets());
        all.extend_from_slice(&[0, 17]);
        all.extend_from_slice(&h[4..6]);
        all.extend_from_slice(h);
        all.extend_from_slice(payload);
        checksum(0, &all) == 0
    }

    #[test]
    fn ipv4_header_carries_ports_length_and_a_valid_checksum() {
        let src: SocketAddr = "198.18.0.10:5070".parse().unwrap();
        let dst: SocketAddr = "198.18.0.21:5060".parse().unwrap();
        let h = udp_header(src, dst, b"hello").unwrap();
        assert_eq!(&h[..6], &[0x13, 0xce, 0x13, 0xc4, 0x00, 0x0d]);
        // Summed by hand over 16-bit words: c612 000a c612 0015 0011 000d (pseudo-header)
        // 13ce 13c4 000d 0000 (header) 6865 6c6c 6f00 ("hello", padded): !0xf7d3.
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), 0x082c);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0, 1, 2, 3, 1471, 1472, 3000, MAX_PAYLOAD_V4] {
            let payload: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            let h = udp_header(src, dst, &payload).unwrap();
            assert_eq!(usize::from(u16::from_be_bytes([h[4], h[5]])), len + 8);
            assert!(verifies(src, dst, &h, &payload), "length {len}");
            assert_ne!(&h[6..8], &[0, 0], "0 means no checksum");
        }
    }

    #[test]
    fn a_computed_zero_checksum_is_sent_as_all_ones() {
        let src: SocketAddr = "198.18.0.10:5070".parse().unwrap();
        let dst: SocketAddr = "198.18.0.21:5060".parse().unwrap();
        let h = udp_header(src, dst, &[0, 0]).unwrap();
        // Choose the payload word so that the sum comes to all ones: checksum 0.
        let word = u16::from_be_bytes([h[6], h[7]]);
        let h = udp_header(src, dst, &word.to_be_bytes()).unwrap();
        assert_eq!(&h[6..8], &[0xff, 0xff]);
        assert!(verifies(src, dst, &h, &word.to_be_bytes()));
    }

    #[test]
    fn ipv6_header_leaves_the_checksum_to_the_kernel_and_sizes_are_bounded() {
        let src: SocketAddr = "[2001:db8::10]:5070".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::21]:5060".parse().unwrap();
        let h = udp_header(src, dst, &[7; 100]).unwrap();
        assert_eq!(h, [0x13, 0xce, 0x13, 0xc4, 0, 108, 0, 0]);
        assert!(udp_header(src, dst, &vec![0; MAX_PAYLOAD_V6]).is_some());
        assert!(udp_header(src, dst, &vec![0; MAX_PAYLOAD_V6 + 1]).is_none());
        let v4: SocketAddr = "198.18.0.21:5060".parse().unwrap();
        assert!(udp_header(v4, v4, &vec![0; MAX_PAYLOAD_V4 + 1]).is_none());
        assert!(udp_header(src, v4, b"x").is_none(), "mixed families");
    }
}
