//! The kernel's neighbour table (ARP and NDP entries) of one interface, read with a
//! netlink `RTM_GETNEIGH` dump: the l2dsr slow path sends each frame to the backend's
//! link-layer address from it. The dump is cached briefly so that a flood of datagrams
//! for a backend without an entry does not dump the table per packet.
//!
//! The kernel keeps an on-link backend's entry alive because the health checks send it
//! an OPTIONS every second (by default), which resolves and refreshes the entry.
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

const NLMSG_HDRLEN: usize = 16;
const NDMSG_LEN: usize = 12;
const RTA_HDRLEN: usize = 4;
const NDA_DST: u16 = 1;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NDA_LLADDR: u16 = 2;
/// Entries whose link-layer address can be used (linux/neighbour.h): not INCOMPLETE,
/// not FAILED, not NONE.
const NUD_USABLE: u16 = 0x02 /* REACHABLE */
    | 0x04 /* STALE */
    | 0x08 /* DELAY */
    | 0x10 /* PROBE */
    | 0x40 /* NOARP */
    | 0x80 /* PERMANENT */;

/// One usable neighbour entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub mac: [u8; 6],
}

/// What a buffer of netlink messages held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub neighbours: Vec<Neighbour>,
    /// NLMSG_DONE was seen: the dump is complete.
    pub done: bool,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// Parses one buffer of the answer to dump request `seq` (host byte order, as the
/// kernel writes it): the usable entries with a 6-byte link-layer address, and whether
/// the dump ended. Messages of another sequence number (a late answer to an earlier,
/// abandoned dump) are skipped. A truncated or malformed message ends the parse with an
/// error; an `NLMSG_ERROR` becomes the error it carries.
pub fn parse(buf: &[u8], seq: u32) -> io::Result<Parsed> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"));
    let mut out = Parsed::default();
    let mut at = 0;
    while at < buf.len() {
        let len = u32_at(buf, at).ok_or_else(|| bad("truncated message header"))? as usize;
        let kind = u16_at(buf, at + 4).ok_or_else(|| bad("truncated message header"))?;
        if len < NLMSG_HDRLEN || len > buf.len() - at {
            return Err(bad(&format!("message length {len} out of bounds")));
        }
        let body = &buf[at + NLMSG_HDRLEN..at + len];
        let this_seq = u32_at(buf, at + 8).ok_or_else(|| bad("truncated message header"))?;
        if this_seq != seq {
            at = at.saturating_add(align4(len));
            continue;
        }
        match kind {
            NLMSG_DONE => {
                out.done = true;
                return Ok(out);
            }
            NLMSG_ERROR => {
                let errno = u32_at(body, 0).ok_or_else(|| bad("truncated error"))? as i32;
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(errno.saturating_neg()));
                }
            }
            libc::RTM_NEWNEIGH => {
                if let Some(n) = neighbour(body).map_err(bad)? {
                    out.neighbours.push(n);
                }
            }
            _ => {}
        }
        at = at.saturating_add(align4(len));
    }
    Ok(out)
}

/// One `RTM_NEWNEIGH` body: None for an entry that is not usable (state, no address,
/// not a 6-byte link-layer address, not IPv4/IPv6).
fn neighbour(body: &[u8]) -> Result<Option<Neighbour>, &'static str> {
    if body.len() < NDMSG_LEN {
        return Err("truncated ndmsg");
    }
    let family = i32::from(body[0]);
    let ifindex = u32_at(body, 4).ok_or("truncated ndmsg")?;
    let state = u16_at(body, 8).ok_or("truncated ndmsg")?;
    let (mut addr, mut mac) = (None, None);
    let mut at = NDMSG_LEN;
    while at + RTA_HDRLEN <= body.len() {
        let len = usize::from(u16_at(body, at).ok_or("truncated attribute")?);
        let kind = u16_at(body, at + 2).ok_or("truncated attribute")? & 0x3fff;
        if len < RTA_HDRLEN || len > body.len() - at {
            return Err("attribute length out of bounds");
        }
        let value = &body[at + RTA_HDRLEN..at + len];
        match (kind, family, value.len()) {
            (NDA_DST, libc::AF_INET, 4) => {
                let octets = <[u8; 4]>::try_from(value).map_err(|_| "address")?;
                addr = Some(IpAddr::V4(Ipv4Addr::from(octets)));
            }
            (NDA_DST, libc::AF_INET6, 16) => {
                let octets = <[u8; 16]>::try_from(value).map_err(|_| "address")?;
                addr = Some(IpAddr::V6(Ipv6Addr::from(octets)));
            }
            (NDA_LLADDR, _, 6) => mac = <[u8; 6]>::try_from(value).ok(),
            _ => {}
        }
        at = at.saturating_add(align4(len));
    }
    Ok(match (addr, mac) {
        (Some(addr), Some(mac)) if state & NUD_USABLE != 0 => {
            Some(Neighbour { ifindex, addr, mac })
        }
        _ => None,
    })
}

/// A netlink route socket, opened in the network namespace whose neighbour table it
/// reads (the one of the thread that opens it).
pub struct Netlink {
    sock: OwnedFd,
    seq: u32,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new socket that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // A dump takes microseconds; bound the wait anyway.
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a timeval on the stack and its size is what is passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink { sock, seq: 0 })
    }

    /// Dumps the neighbour table (every interface, both families).
    pub fn dump(&mut self) -> io::Result<Vec<Neighbour>> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = [0u8; NLMSG_HDRLEN + NDMSG_LEN];
        req[0..4].copy_from_slice(&((NLMSG_HDRLEN + NDMSG_LEN) as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&libc::RTM_GETNEIGH.to_ne_bytes());
        req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
        req[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        // ndmsg: family AF_UNSPEC (both), everything else 0.
        // SAFETY: `req` is valid for its length during the call; no address (the kernel).
        let sent = unsafe { libc::send(self.sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut all = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        // Bounded: a dump of a table of any sane size ends long before this.
        for _ in 0..10_000 {
            // SAFETY: `buf` is valid for writes of its length during the call.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                break;
            }
            let parsed = parse(&buf[..n], self.seq)?;
            all.extend(parsed.neighbours);
            if parsed.done {
                return Ok(all);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "netlink: the neighbour dump did not end",
        ))
    }
}

/// The link-layer addresses of one interface's neighbours, from dumps at most every
/// `MISS_REFRESH` on a miss and every `MAX_AGE` on a hit.
pub struct NeighbourCache {
    netlink: Netlink,
    ifindex: u32,
    entries: HashMap<IpAddr, [u8; 6]>,
    dumped: Option<Instant>,
}

/// The least time between two dumps caused by misses.
const MISS_REFRESH: Duration = Duration::from_millis(100);
/// How long a cached address is used before the table is read again (a backend may
/// have changed its MAC).
const MAX_AGE: Duration = Duration::from_secs(1);

impl NeighbourCache {
    /// A cache of interface `ifindex` of the calling thread's network namespace.
    pub fn new(ifindex: u32) -> io::Result<NeighbourCache> {
        Ok(NeighbourCache {
            netlink: Netlink::open()?,
            ifindex,
            entries: HashMap::new(),
            dumped: None,
        })
    }

    /// The link-layer address of `addr` on the interface, if the kernel has a usable
    /// entry for it. A failed dump keeps the previous entries (and is retried after
    /// `MISS_REFRESH`).
    pub fn lookup(&mut self, addr: IpAddr, now: Instant) -> Option<[u8; 6]> {
        let age = self.dumped.map(|t| now.saturating_duration_since(t));
        let hit = self.entries.get(&addr).copied();
        let stale = match (hit, age) {
            (_, None) => true,
            (Some(_), Some(age)) => age >= MAX_AGE,
            (None, Some(age)) => age >= MISS_REFRESH,
        };
        if !stale {
            return hit;
        }
        self.dumped = Some(now);
        // A blocking dump on the event loop: microseconds for a table of hundreds of
        // entries, bounded by the socket's 1 s receive timeout.
        match self.netlink.dump() {
            Ok(all) => {
                self.entries = all
                    .into_iter()
                    .filter(|n| n.ifindex == self.ifindex)
                    .map(|n| (n.addr, n.mac))
                    .collect();
            }
            Err(e) => log::warn!("slow path: reading the neighbour table: {e}"),
        }
        self.entries.get(&addr).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 2]);
        m.extend_from_slice(&SEQ.to_ne_bytes());
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((RTA_HDRLEN + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn ndmsg(family: i32, ifindex: u32, state: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![family as u8, 0, 0, 0];
        b.extend_from_slice(&ifindex.to_ne_bytes());
        b.extend_from_slice(&state.to_ne_bytes());
        b.extend_from_slice(&[0, 1]);
        for a in attrs {
            b.extend_from_slice(a);
        }
        b
    }

    const MAC: [u8; 6] = [2, 0, 0, 0, 1, 21];
    const SEQ: u32 = 7;

    fn sample() -> Vec<u8> {
        let mut buf = Vec::new();
        // Usable v4 (REACHABLE), with a cache-info attribute in between.
        buf.extend(nlmsg(
            libc::RTM_NEWNEIGH,
            &ndmsg(
                libc::AF_INET,
                3,
                0x02,
                &[
                    attr(NDA_DST, &[198, 18, 0, 21]),
                    attr(3, &[0; 16]),
                    attr(NDA_LLADDR, &MAC),
                ],
            ),
        ));
        // Usable v6 (STALE).
        let v6: Ipv6Addr = "2001:db8::21".parse().unwrap();
        buf.extend(nlmsg(
            libc::RTM_NEWNEIGH,
            &ndmsg(
                libc::AF_INET6,
                3,
                0x04,
                &[attr(NDA_DST, &v6.octets()), attr(NDA_LLADDR, &MAC)],
            ),
        ));
        // FAILED, INCOMPLETE (no lladdr), and a non-Ethernet lladdr: not usable.
        buf.extend(nlmsg(
            libc::RTM_NEWNEIGH,
            &ndmsg(
                libc::AF_INET,
                3,
                0x20,
                &[attr(NDA_DST, &[198, 18, 0, 22]), attr(NDA_LLADDR, &MAC)],
            ),
        ));
        buf.extend(nlmsg(
            libc::RTM_NEWNEIGH,
            &ndmsg(libc::AF_INET, 3, 0x01, &[attr(NDA_DST, &[198, 18, 0, 23])]),
        ));
        buf.extend(nlmsg(
            libc::RTM_NEWNEIGH,
            &ndmsg(
                libc::AF_INET,
                3,
                0x80,
                &[attr(NDA_DST, &[198, 18, 0, 24]), attr(NDA_LLADDR, &[1; 4])],
            ),
        ));
        buf
    }

    #[test]
    fn usable_entries_with_an_ethernet_address_are_kept() {
        let mut buf = sample();
        buf.extend(nlmsg(NLMSG_DONE, &[0; 4]));
        let p = parse(&buf, SEQ).unwrap();
        assert!(p.done);
        assert_eq!(
            p.neighbours,
            [
                Neighbour {
                    ifindex: 3,
                    addr: "198.18.0.21".parse().unwrap(),
                    mac: MAC
                },
                Neighbour {
                    ifindex: 3,
                    addr: "2001:db8::21".parse().unwrap(),
                    mac: MAC
                },
            ]
        );
        // Without DONE: a partial dump, more to read.
        assert!(!parse(&sample(), SEQ).unwrap().done);
        // The answer to another request is skipped, its DONE too.
        let p = parse(&buf, SEQ + 1).unwrap();
        assert_eq!(p, Parsed::default());
    }

    #[test]
    fn netlink_errors_are_returned() {
        let body = (-libc::EPERM).to_ne_bytes();
        let e = parse(&nlmsg(NLMSG_ERROR, &body), SEQ).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        // An acknowledgement (error 0) is not an error.
        assert_eq!(
            parse(&nlmsg(NLMSG_ERROR, &[0; 4]), SEQ).unwrap(),
            Parsed::default()
        );
    }

    #[test]
    fn truncated_and_garbage_input_is_an_error_never_a_panic() {
        let buf = sample();
        // Every truncation: an error or fewer entries, never a panic or an invented entry.
        for cut in 0..buf.len() {
            if let Ok(p) = parse(&buf[..cut], SEQ) {
                assert!(p.neighbours.len() <= 2);
                for n in p.neighbours {
                    assert_eq!(n.mac, MAC);
                }
            }
        }
        // Lengths that point outside the buffer or below the header.
        let mut m = nlmsg(libc::RTM_NEWNEIGH, &ndmsg(libc::AF_INET, 3, 2, &[]));
        m[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse(&m, SEQ).is_err());
        m[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse(&m, SEQ).is_err());
        let mut a = ndmsg(libc::AF_INET, 3, 2, &[attr(NDA_DST, &[1, 2, 3, 4])]);
        a[NDMSG_LEN..NDMSG_LEN + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(parse(&nlmsg(libc::RTM_NEWNEIGH, &a), SEQ).is_err());
        a[NDMSG_LEN..NDMSG_LEN + 2].copy_from_slice(&2u16.to_ne_bytes());
        assert!(parse(&nlmsg(libc::RTM_NEWNEIGH, &a), SEQ).is_err());
        assert!(parse(&nlmsg(libc::RTM_NEWNEIGH, &[0; 5]), SEQ).is_err());
        // Pseudo-random garbage.
        let mut rng = 0x1234_5678_9abc_def1u64;
        for _ in 0..2000 {
            let len = (rng % 300) as usize;
            let g: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            let _ = parse(&g, SEQ);
            let mut framed = nlmsg(libc::RTM_NEWNEIGH, &g);
            framed.truncate(NLMSG_HDRLEN + len);
            let _ = parse(&framed, SEQ);
        }
    }

    #[test]
    fn the_kernel_dump_parses() {
        // This thread's namespace: whatever it holds, the dump must complete, twice on
        // one socket.
        let mut nl = Netlink::open().unwrap();
        nl.dump().unwrap();
        nl.dump().unwrap();
    }
}
