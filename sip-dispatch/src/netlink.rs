//! The rtnetlink wire format and socket: constants, bounds-checked readers, message and
//! attribute builders and walkers, and a `NETLINK_ROUTE` socket. Messages are in host
//! byte order, as the kernel writes them. What the messages mean (neighbours, routes,
//! links) is for the modules that send them.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
pub const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
pub const RTA_HDRLEN: usize = 4;
pub const NDMSG_LEN: usize = 12;
pub const NDA_DST: u16 = 1;
pub const NDA_LLADDR: u16 = 2;
/// Neighbour entries whose link-layer address can be used (linux/neighbour.h): not
/// INCOMPLETE, not FAILED, not NONE.
pub const NUD_USABLE: u16 = 0x02 /* REACHABLE */
    | 0x04 /* STALE */
    | 0x08 /* DELAY */
    | 0x10 /* PROBE */
    | 0x40 /* NOARP */
    | 0x80 /* PERMANENT */;

/// A malformed-data error, "netlink: {what}".
pub fn bad(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"))
}

pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

pub fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// An address attribute of address family `family`; None for another family or a
/// length that is not the family's.
pub fn ip_of(family: u8, value: &[u8]) -> Option<IpAddr> {
    match (i32::from(family), value.len()) {
        (libc::AF_INET, 4) => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(value).ok()?))),
        (libc::AF_INET6, 16) => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(value).ok()?,
        ))),
        _ => None,
    }
}

/// One netlink message: type, sequence number, body.
#[derive(Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    pub body: &'a [u8],
}

/// The messages of a netlink buffer, in order; a length that does not fit is an error
/// that ends the walk.
pub struct Messages<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Messages<'a> {
    pub fn new(buf: &'a [u8]) -> Messages<'a> {
        Messages { buf, at: 0 }
    }

    fn next_message(&mut self) -> io::Result<Message<'a>> {
        let (buf, at) = (self.buf, self.at);
        let len = u32_at(buf, at).ok_or_else(|| bad("truncated message header"))? as usize;
        let kind = u16_at(buf, at + 4).ok_or_else(|| bad("truncated message header"))?;
        let seq = u32_at(buf, at + 8).ok_or_else(|| bad("truncated message header"))?;
        if len < NLMSG_HDRLEN || len > buf.len() - at {
            return Err(bad(format!("message length {len} out of bounds")));
        }
        self.at = at.saturating_add(align4(len));
        Ok(Message {
            kind,
            seq,
            body: &buf[at + NLMSG_HDRLEN..at + len],
        })
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = io::Result<Message<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.buf.len() {
            return None;
        }
        let next = self.next_message();
        if next.is_err() {
            self.at = self.buf.len();
        }
        Some(next)
    }
}

/// Every message of a netlink buffer, or the error of the first that does not fit.
pub fn messages(buf: &[u8]) -> io::Result<Vec<Message<'_>>> {
    Messages::new(buf).collect()
}

/// The attributes (type without the nested/byte-order bits, value) of `body` from `at`
/// on; a length that does not fit is an error.
pub fn attributes(body: &[u8], at: usize) -> io::Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    let mut at = at;
    while at.saturating_add(RTA_HDRLEN) <= body.len() {
        let len = usize::from(u16_at(body, at).ok_or_else(|| bad("truncated attribute"))?);
        let kind = u16_at(body, at + 2).ok_or_else(|| bad("truncated attribute"))? & 0x3fff;
        if len < RTA_HDRLEN || len > body.len() - at {
            return Err(bad(format!("attribute length {len} out of bounds")));
        }
        out.push((kind, &body[at + RTA_HDRLEN..at + len]));
        at = at.saturating_add(align4(len));
    }
    Ok(out)
}

/// The fixed part of a neighbour message (`ndmsg`) and its attributes.
pub struct NeighbourMessage<'a> {
    pub family: u8,
    pub ifindex: u32,
    /// The entry's NUD state bits.
    pub state: u16,
    pub attributes: Vec<(u16, &'a [u8])>,
}

impl<'a> NeighbourMessage<'a> {
    /// Reads the body of an `RTM_NEWNEIGH` or `RTM_DELNEIGH`.
    pub fn parse(body: &'a [u8]) -> io::Result<NeighbourMessage<'a>> {
        if body.len() < NDMSG_LEN {
            return Err(bad("truncated ndmsg"));
        }
        Ok(NeighbourMessage {
            family: body[0],
            ifindex: u32_at(body, 4).ok_or_else(|| bad("truncated ndmsg"))?,
            state: u16_at(body, 8).ok_or_else(|| bad("truncated ndmsg"))?,
            attributes: attributes(body, NDMSG_LEN)?,
        })
    }
}

/// A message: header (length without the padding, `kind`, `flags`, `seq`, port 0) and
/// `body`, padded to 4 bytes.
pub fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + body.len();
    let mut m = Vec::with_capacity(align4(len));
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m.resize(align4(len), 0);
    m
}

/// An attribute: header (length without the padding, `kind`) and `value`, padded to 4
/// bytes.
pub fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = RTA_HDRLEN + value.len();
    let mut a = Vec::with_capacity(align4(len));
    a.extend_from_slice(&(len as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize(align4(len), 0);
    a
}

/// A neighbour message body for tests: ndmsg (`family`, `ifindex`, `state`, flags 0,
/// type 1) and `attrs`.
#[cfg(test)]
pub fn ndmsg(family: i32, ifindex: u32, state: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut b = vec![family as u8, 0, 0, 0];
    b.extend_from_slice(&ifindex.to_ne_bytes());
    b.extend_from_slice(&state.to_ne_bytes());
    b.extend_from_slice(&[0, 1]);
    for a in attrs {
        b.extend_from_slice(a);
    }
    b
}

/// A netlink route socket of the calling thread's network namespace, joined to
/// `groups` (0: requests only).
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// Opens it; a receive waits at most `timeout`.
    pub fn open(groups: u32, timeout: Duration) -> io::Result<Socket> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new socket that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all zeroes is a valid sockaddr_nl.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = groups;
        // SAFETY: `addr` is a sockaddr_nl on the stack and its size is what is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        set_option(&fd, libc::SO_RCVTIMEO, &tv)?;
        if groups != 0 {
            // A burst of notifications (a link going down) should not overflow the
            // queue; an overflow still only causes a full resync. Best effort: a
            // smaller queue still works.
            let size: libc::c_int = 1 << 20;
            let _ = set_option(&fd, libc::SO_RCVBUF, &size);
        }
        Ok(Socket { fd })
    }

    /// Sends `msg` to the kernel.
    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: `msg` is valid for its length during the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram into `buf` (bytes received), waiting at most the socket's timeout.
    /// One datagram into `buf`. A signal for this thread (the daemon's handlers run on
    /// any thread) interrupts the wait: it is waited again, a few times at most.
    pub fn recv(&self, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
        let mut tries = 0;
        loop {
            // SAFETY: `buf` is valid for writes of its length during the call.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags,
                )
            };
            if n >= 0 {
                return Ok(usize::try_from(n).unwrap_or(0));
            }
            let e = io::Error::last_os_error();
            tries += 1;
            if e.kind() != io::ErrorKind::Interrupted || tries >= 5 {
                return Err(e);
            }
        }
    }
}

/// Sets socket option `name` (level `SOL_SOCKET`) of `fd` to `value`.
fn set_option<T>(fd: &OwnedFd, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live T and its size is what is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_write_what_the_walkers_read() {
        let body = [attribute(0x8000 | 4, &[9; 4]), attribute(3, &[1, 2, 3])].concat();
        assert_eq!(body.len(), 8 + 8, "the 3-byte value is padded");
        assert_eq!(
            u16_at(&body, 8),
            Some(7),
            "the length leaves the padding out"
        );
        let mut buf = message(libc::RTM_NEWNEIGH, 0x300, 5, &body[..15]);
        buf.extend(message(NLMSG_DONE, 0, 6, &[0; 4]));
        let all = messages(&buf).unwrap();
        assert_eq!(
            all,
            vec![
                Message {
                    kind: libc::RTM_NEWNEIGH,
                    seq: 5,
                    body: &body[..15]
                },
                Message {
                    kind: NLMSG_DONE,
                    seq: 6,
                    body: &[0; 4]
                },
            ]
        );
        assert_eq!(u16_at(&buf, 6), Some(0x300), "flags");
        assert_eq!(u32_at(&buf, 0), Some(16 + 15));
        assert_eq!(
            attributes(all[0].body, 0).unwrap(),
            vec![(4, &[9; 4][..]), (3, &[1, 2, 3][..])],
            "the nested bit is dropped; a last attribute without padding is read"
        );
        assert_eq!(attributes(&body, 8).unwrap(), vec![(3, &[1, 2, 3][..])]);
    }

    #[test]
    fn the_message_walk_stops_at_the_first_bad_length() {
        let mut buf = message(libc::RTM_NEWNEIGH, 0, 1, &[0; 4]);
        let mut bad_len = message(libc::RTM_NEWNEIGH, 0, 2, &[0; 4]);
        bad_len[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        buf.extend(bad_len);
        buf.extend(message(NLMSG_DONE, 0, 3, &[]));
        let mut walk = Messages::new(&buf);
        assert_eq!(walk.next().unwrap().unwrap().seq, 1);
        assert!(walk.next().unwrap().is_err());
        assert!(walk.next().is_none(), "nothing after an error");
        assert!(messages(&buf).is_err());
        // Below the header's length, and a cut header.
        let mut short = message(NLMSG_DONE, 0, 1, &[]);
        short[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(messages(&short).is_err());
        for cut in 1..NLMSG_HDRLEN {
            assert!(messages(&message(NLMSG_DONE, 0, 1, &[])[..cut]).is_err());
        }
        assert_eq!(messages(&[]).unwrap(), vec![]);
    }

    #[test]
    fn attribute_lengths_outside_the_body_are_errors() {
        let mut a = attribute(1, &[1, 2, 3, 4]);
        a[0..2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(attributes(&a, 0).is_err());
        a[0..2].copy_from_slice(&2u16.to_ne_bytes());
        assert!(attributes(&a, 0).is_err());
        // Fewer bytes than a header left: the walk ends.
        assert_eq!(attributes(&[1, 2, 3], 0).unwrap(), vec![]);
        assert_eq!(attributes(&a, usize::MAX).unwrap(), vec![]);
    }

    #[test]
    fn a_neighbour_message_gives_its_fixed_part_and_attributes() {
        let body = ndmsg(
            libc::AF_INET6,
            7,
            0x04,
            &[attribute(NDA_DST, &[0; 16]), attribute(NDA_LLADDR, &[2; 6])],
        );
        let m = NeighbourMessage::parse(&body).unwrap();
        assert_eq!(
            (m.family, m.ifindex, m.state),
            (libc::AF_INET6 as u8, 7, 0x04)
        );
        assert_eq!(
            m.attributes,
            vec![(NDA_DST, &[0; 16][..]), (NDA_LLADDR, &[2; 6][..])]
        );
        for cut in 0..NDMSG_LEN {
            assert!(NeighbourMessage::parse(&body[..cut]).is_err());
        }
    }

    #[test]
    fn readers_are_bounds_checked() {
        let b = [1u8, 0, 0, 0, 2];
        assert_eq!(u32_at(&b, 0), Some(u32::from_ne_bytes([1, 0, 0, 0])));
        assert_eq!(u32_at(&b, 2), None);
        assert_eq!(u16_at(&b, 4), None);
        assert_eq!(u16_at(&b, usize::MAX), None);
        assert_eq!(u32_at(&b, usize::MAX - 1), None);
        assert_eq!((align4(0), align4(1), align4(4), align4(5)), (0, 4, 4, 8));
        assert_eq!(
            ip_of(libc::AF_INET as u8, &[198, 18, 0, 1]),
            Some("198.18.0.1".parse().unwrap())
        );
        assert_eq!(ip_of(libc::AF_INET as u8, &[0; 16]), None);
        assert_eq!(
            ip_of(libc::AF_INET6 as u8, &[0; 16]),
            Some("::".parse().unwrap())
        );
        assert_eq!(ip_of(0, &[0; 4]), None);
    }
}
