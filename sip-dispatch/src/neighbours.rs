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
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::netlink::{
    self, Message, Messages, NDA_DST, NDA_LLADDR, NDMSG_LEN, NLMSG_DONE, NLMSG_ERROR, NUD_USABLE,
    NeighbourMessage, bad, u32_at,
};

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

/// Parses one buffer of the answer to dump request `seq` (host byte order, as the
/// kernel writes it): the usable entries with a 6-byte link-layer address, and whether
/// the dump ended. Messages of another sequence number (a late answer to an earlier,
/// abandoned dump) are skipped. A truncated or malformed message ends the parse with an
/// error; an `NLMSG_ERROR` becomes the error it carries.
pub fn parse(buf: &[u8], seq: u32) -> io::Result<Parsed> {
    let mut out = Parsed::default();
    for m in Messages::new(buf) {
        let Message {
            kind,
            seq: this_seq,
            body,
        } = m?;
        if this_seq != seq {
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
                if let Some(n) = neighbour(body)? {
                    out.neighbours.push(n);
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// One `RTM_NEWNEIGH` body: None for an entry that is not usable (state, no address,
/// not a 6-byte link-layer address, not IPv4/IPv6).
fn neighbour(body: &[u8]) -> io::Result<Option<Neighbour>> {
    let m = NeighbourMessage::parse(body)?;
    let (mut addr, mut mac) = (None, None);
    for (kind, value) in m.attributes {
        match kind {
            NDA_DST => addr = netlink::ip_of(m.family, value).or(addr),
            NDA_LLADDR if value.len() == 6 => mac = <[u8; 6]>::try_from(value).ok(),
            _ => {}
        }
    }
    let (ifindex, state) = (m.ifindex, m.state);
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
    sock: netlink::Socket,
    seq: u32,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        // A dump takes microseconds; bound the wait anyway.
        let sock = netlink::Socket::open(0, Duration::from_secs(1))?;
        Ok(Netlink { sock, seq: 0 })
    }

    /// Dumps the neighbour table (every interface, both families).
    pub fn dump(&mut self) -> io::Result<Vec<Neighbour>> {
        self.seq = self.seq.wrapping_add(1);
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        // ndmsg: family AF_UNSPEC (both), everything else 0.
        let req = netlink::message(libc::RTM_GETNEIGH, flags, self.seq, &[0; NDMSG_LEN]);
        self.sock.send(&req)?;
        let mut all = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        // Bounded: a dump of a table of any sane size ends long before this.
        for _ in 0..10_000 {
            let n = self.sock.recv(&mut buf, 0)?;
            if n == 0 {
                break;
            }
            let parsed = parse(&buf[..n], self.seq)?;
            all.extend(parsed.neighbours);
            if parsed.done {
                return Ok(all);
            }
        }
        Err(bad("the neighbour dump did not end"))
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

    use crate::netlink::{NLMSG_HDRLEN, attribute as attr, ndmsg};
    use std::net::Ipv6Addr;

    fn nlmsg(kind: u16, body: &[u8]) -> Vec<u8> {
        netlink::message(kind, 0, SEQ, body)
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
