//! The entry a backend gets from the tables, whether a notification concerns it, and
//! writing it so that the fast path never reads a mix of old and new.
use std::{collections::HashMap, net::IpAddr};

use anyhow::Context as _;
use aya::maps::{Array, MapData};
use sip_dispatch_common::{NH_ON_LINK, NH_VALID, NextHop};

use super::{Link, Route, wire::Event};

/// The entry for a backend, from its route, the interfaces and the usable neighbours
/// (by interface and address); None when something is missing (no valid entry).
pub fn entry_for(
    backend: IpAddr,
    route: Option<Route>,
    links: &HashMap<u32, Link>,
    neighbours: &HashMap<(u32, IpAddr), [u8; 6]>,
) -> Option<NextHop> {
    let route = route?;
    let link = links.get(&route.oif).filter(|l| l.up)?;
    let hop = route.gateway.unwrap_or(backend);
    let dmac = *neighbours.get(&(route.oif, hop))?;
    Some(NextHop {
        ifindex: route.oif,
        mtu: route.mtu.unwrap_or(match backend {
            IpAddr::V4(_) => link.mtu,
            IpAddr::V6(_) => link.mtu6.unwrap_or(link.mtu),
        }),
        dmac,
        smac: link.mac,
        generation: 0,
        flags: NH_VALID
            | if route.gateway.is_none() {
                NH_ON_LINK
            } else {
                0
            },
    })
}

/// Whether a notification may make `entry` (valid, for next-hop address `hop`) wrong.
pub fn concerns(event: &Event, entry: &NextHop, hop: IpAddr) -> bool {
    match event {
        Event::Route => true,
        Event::Link(index, link) => {
            // (An entry with a route MTU differs from the link's: such entries are made
            // invalid by any change of their interface, and resolved again at once.)
            *index == entry.ifindex
                && link.is_none_or(|l| {
                    !l.up
                        || l.mac != entry.smac
                        || (l.mtu != entry.mtu && l.mtu6 != Some(entry.mtu))
                })
        }
        Event::Neighbour(index, addr, mac) => {
            *index == entry.ifindex && *addr == hop && *mac != Some(entry.dmac)
        }
    }
}

/// Same data and flags (the generation aside).
pub(super) fn same(a: &NextHop, b: &NextHop) -> bool {
    NextHop {
        generation: 0,
        ..*a
    } == NextHop {
        generation: 0,
        ..*b
    }
}

/// Writes entries in the order that keeps a reader from seeing a mix (see `NextHop`).
pub struct Writer {
    map: Array<MapData, NextHop>,
}

impl Writer {
    pub fn new(map: MapData) -> anyhow::Result<Writer> {
        Ok(Writer {
            map: Array::try_from(aya::maps::Map::Array(map))
                .context("the next-hop map is not an array of NextHop")?,
        })
    }

    pub fn get(&self, id: u32) -> anyhow::Result<NextHop> {
        self.map
            .get(&id, 0)
            .with_context(|| format!("reading the next hop of backend {id}"))
    }

    fn put(&mut self, id: u32, e: NextHop) -> anyhow::Result<()> {
        self.map
            .set(id, e, 0)
            .with_context(|| format!("writing the next hop of backend {id}"))
    }

    /// Clears the valid bit (the data stays); nothing if it is clear.
    pub fn invalidate(&mut self, id: u32) -> anyhow::Result<()> {
        let e = self.get(id)?;
        if e.flags & NH_VALID != 0 {
            self.put(
                id,
                NextHop {
                    flags: e.flags & !NH_VALID,
                    ..e
                },
            )?;
        }
        Ok(())
    }

    /// Makes the entry `want` (None: invalid) by [`steps`]; whether it changed.
    pub fn set(&mut self, id: u32, want: Option<NextHop>) -> anyhow::Result<bool> {
        let writes = steps(self.get(id)?, want);
        for &w in &writes {
            self.put(id, w)?;
        }
        Ok(!writes.is_empty())
    }
}

/// The writes that turn entry `now` into `want` (None: invalid), each changing either
/// the data or only the valid bit: the bit cleared, the new data written with the bit
/// clear (generation bumped), the bit set. None when it already is `want`.
pub fn steps(now: NextHop, want: Option<NextHop>) -> Vec<NextHop> {
    let mut out = Vec::new();
    let valid = now.flags & NH_VALID != 0;
    if valid && want.is_some_and(|w| same(&now, &w)) {
        return out;
    }
    let cleared = NextHop {
        flags: now.flags & !NH_VALID,
        ..now
    };
    if valid {
        out.push(cleared);
    }
    if let Some(want) = want {
        let data = NextHop {
            generation: now.generation.wrapping_add(1),
            flags: want.flags & !NH_VALID,
            ..want
        };
        if data != cleared {
            out.push(data);
        }
        out.push(NextHop {
            flags: want.flags,
            ..data
        });
    }
    out
}
