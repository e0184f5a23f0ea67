//! Reading the kernel's tables over rtnetlink: the route to each backend, the
//! interfaces, the routing rules and the neighbours.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::IpAddr,
    time::Duration,
};

use sip_dispatch_common::NextHop;

use super::{
    Link, Route,
    entry::entry_for,
    wire::{
        RouteAnswer, link, link_dump_request, parse_route, route_request, rule_dump_request,
        selective_rule,
    },
};
use crate::{
    neighbours,
    netlink::{NLMSG_DONE, NLMSG_ERROR, Socket, bad, messages, u32_at},
};

/// Reads the kernel's routes, interfaces and neighbours.
pub struct Resolver {
    sock: Socket,
    neighbours: neighbours::Netlink,
    seq: u32,
    buf: Vec<u8>,
}

impl Resolver {
    pub fn new() -> io::Result<Resolver> {
        Ok(Resolver {
            sock: Socket::open(0, Duration::from_secs(1))?,
            neighbours: neighbours::Netlink::open()?,
            seq: 0,
            // Larger than any dump message the kernel builds (it sizes them to fit
            // the largest link's attributes): a cut datagram would not parse.
            buf: vec![0; 1 << 20],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub fn route(&mut self, dst: IpAddr) -> io::Result<Option<Route>> {
        let seq = self.next_seq();
        self.sock.send(&route_request(seq, dst))?;
        // Bounded: answers to earlier, abandoned requests are skipped.
        for _ in 0..100 {
            let n = self.sock.recv(&mut self.buf, 0)?;
            match parse_route(&self.buf[..n], seq)? {
                RouteAnswer::Route(r) => return Ok(Some(r)),
                RouteAnswer::NoRoute => return Ok(None),
                RouteAnswer::Elsewhere => {}
            }
        }
        Err(bad("the route request got no answer"))
    }

    /// Sends dump `request` (sequence `seq`) and hands each answer message's kind and
    /// body to `each`, up to the end of the dump.
    fn dump(
        &mut self,
        request: &[u8],
        seq: u32,
        mut each: impl FnMut(u16, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.sock.send(request)?;
        for _ in 0..10_000 {
            let n = self.sock.recv(&mut self.buf, 0)?;
            for m in messages(&self.buf[..n])? {
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = u32_at(m.body, 0).unwrap_or(0) as i32;
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(errno.saturating_neg()));
                        }
                    }
                    kind => each(kind, m.body)?,
                }
            }
        }
        Err(bad("a dump did not end"))
    }

    pub fn links(&mut self) -> io::Result<HashMap<u32, Link>> {
        let seq = self.next_seq();
        let mut out = HashMap::new();
        self.dump(&link_dump_request(seq), seq, |kind, body| {
            if kind == libc::RTM_NEWLINK
                && let (index, Some(l)) = link(body)?
            {
                out.insert(index, l);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The first routing rule that selects by more than the destination, described.
    pub fn selective_rule(&mut self) -> io::Result<Option<String>> {
        let seq = self.next_seq();
        let mut found = None;
        self.dump(&rule_dump_request(seq), seq, |kind, body| {
            if kind == libc::RTM_NEWRULE && found.is_none() {
                found = selective_rule(body)?;
            }
            Ok(())
        })?;
        Ok(found)
    }

    pub fn neighbours(&mut self) -> io::Result<HashMap<(u32, IpAddr), [u8; 6]>> {
        Ok(self
            .neighbours
            .dump()?
            .into_iter()
            .map(|n| ((n.ifindex, n.addr), n.mac))
            .collect())
    }

    /// The entries (None: no valid one) and next-hop addresses (gateway or backend) for
    /// `targets`, from one reading of the tables.
    pub fn resolve(
        &mut self,
        targets: &BTreeMap<u32, IpAddr>,
    ) -> io::Result<BTreeMap<u32, (Option<NextHop>, IpAddr)>> {
        let links = self.links()?;
        let neighbours = self.neighbours()?;
        let mut out = BTreeMap::new();
        for (&id, &addr) in targets {
            let route = self.route(addr)?;
            let hop = route.and_then(|r| r.gateway).unwrap_or(addr);
            out.insert(id, (entry_for(addr, route, &links, &neighbours), hop));
        }
        Ok(out)
    }
}
