//! The test network: a "switch" namespace holding a Linux bridge, and hosts (client,
//! dispatcher, backends), each in its own namespace with one veth into the bridge.
//!
//! ```text
//!  client ns            switch ns (br0)             dispatcher ns
//!  v-client ─────── s-client    s-disp ─────────── v-disp (198.18.0.2 + VIP .100)
//!                      s-b1  s-b2  ...
//!                       │     │
//!  backend ns:        v-b1  v-b2  (198.18.0.21, .22, ...)   s-dns ── v-dns (198.18.0.53)
//! ```
//!
//! The DNS host (optional) is where the tests run a real DNS server for the dispatcher.
//! A second dispatcher (optional, `v-disp2`, 198.18.0.3, with the same VIP) is for the
//! scale-out tests, where the client reaches the VIP through an ECMP route.
//!
//! Both ends of each veth are created directly inside their namespaces, so nothing ever
//! appears in the root namespace; interface names only need to be unique per namespace.
//! Every host gets both an IPv4 (198.18.0.0/24) and an IPv6 (2001:db8::/64) address.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::netns::{self, Netns};

/// Address family of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

impl FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "v4" | "ipv4" | "4" => Ok(Family::V4),
            "v6" | "ipv6" | "6" => Ok(Family::V6),
            _ => Err(format!("unknown address family {s:?} (v4 or v6)")),
        }
    }
}

/// What a host does in the topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Dispatcher,
    /// A second dispatcher with the same VIP (scale-out).
    SecondDispatcher,
    /// Backend number `n`, counted from 1.
    Backend(u8),
    /// The DNS server host.
    Dns,
}

impl Role {
    /// Short name used in namespace and interface names.
    pub fn short(&self) -> String {
        match self {
            Role::Client => "client".into(),
            Role::Dispatcher => "disp".into(),
            Role::SecondDispatcher => "disp2".into(),
            Role::Backend(n) => format!("b{n}"),
            Role::Dns => "dns".into(),
        }
    }

    /// Last number of the host's addresses: 198.18.0.X and 2001:db8::X (X written the
    /// same way in both, so backend 1 is 198.18.0.21 and 2001:db8::21).
    fn host_number(&self) -> u16 {
        match self {
            Role::Client => 10,
            Role::Dispatcher => 2,
            Role::SecondDispatcher => 3,
            Role::Backend(n) => 20 + u16::from(*n),
            Role::Dns => 53,
        }
    }
}

/// The IPv4 address 198.18.0.`n`.
fn v4(n: u16) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, n as u8)
}

/// The IPv6 address 2001:db8::`n`, `n` read as hex digits (so `21` is `2001:db8::21`).
fn v6(n: u16) -> Ipv6Addr {
    let last = u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex digits");
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)
}

/// The service address number on the dispatcher (198.18.0.100, 2001:db8::100).
const VIP_NUMBER: u16 = 100;
/// The bridge in the switch namespace.
pub const BRIDGE: &str = "br0";

/// One host: its namespace and its veth into the bridge.
#[derive(Debug)]
pub struct Host {
    pub role: Role,
    pub ns: Netns,
    /// Interface inside the host's namespace (`v-<role>`).
    pub iface: String,
    /// Its peer, a port of the bridge in the switch namespace (`s-<role>`).
    pub switch_iface: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Host {
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.ipv4.into(),
            Family::V6 => self.ipv6.into(),
        }
    }

    pub fn ns_name(&self) -> &str {
        self.ns.name()
    }
}

/// What to build.
#[derive(Clone, Copy, Debug)]
pub struct TopologySpec {
    /// How many dispatcher hosts to add (0, 1 or 2), each with the VIP.
    pub dispatchers: u8,
    /// Number of backend hosts (1..=30).
    pub backends: u8,
    /// Whether to add the DNS server host (198.18.0.53, 2001:db8::53).
    pub dns: bool,
}

impl TopologySpec {
    /// A client, the dispatcher and `backends` backends.
    pub fn dispatcher(backends: u8) -> Self {
        TopologySpec {
            dispatchers: 1,
            backends,
            dns: false,
        }
    }
}

/// A built topology. Dropping it kills every process in its namespaces, then deletes them.
#[derive(Debug)]
pub struct Topology {
    tag: String,
    // Hosts are declared (and so dropped) before the switch.
    hosts: Vec<Host>,
    switch: Netns,
}

impl Topology {
    /// Builds the namespaces, the bridge, the veths and the addresses.
    pub fn build(spec: TopologySpec) -> Result<Self> {
        ensure!(
            (1..=30).contains(&spec.backends),
            "1 to 30 backends, not {}",
            spec.backends
        );
        let tag = netns::unique_tag();
        let switch = Netns::create(&format!("{tag}-sw"))?;
        let mut topo = Topology {
            tag,
            hosts: Vec::new(),
            switch,
        };
        topo.switch.ip([
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        topo.switch.ip(["link", "set", BRIDGE, "up"])?;

        ensure!(spec.dispatchers <= 2, "at most 2 dispatchers");
        let mut roles = vec![Role::Client];
        roles.extend(
            [Role::Dispatcher, Role::SecondDispatcher]
                .into_iter()
                .take(spec.dispatchers.into()),
        );
        roles.extend((1..=spec.backends).map(Role::Backend));
        if spec.dns {
            roles.push(Role::Dns);
        }
        for role in roles {
            let host = topo.add_host(role)?;
            topo.hosts.push(host);
        }
        Ok(topo)
    }

    fn add_host(&self, role: Role) -> Result<Host> {
        let short = role.short();
        let ns = Netns::create(&format!("{}-{short}", self.tag))?;
        let iface = format!("v-{short}");
        let switch_iface = format!("s-{short}");
        ensure!(iface.len() <= 15 && switch_iface.len() <= 15);
        crate::cmd::run(
            "ip",
            [
                "link",
                "add",
                &iface,
                "netns",
                ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &switch_iface,
                "netns",
                self.switch.name(),
            ],
        )
        .with_context(|| format!("creating the veth of {short}"))?;
        self.switch
            .ip(["link", "set", &switch_iface, "master", BRIDGE, "up"])?;
        tx_checksum_off(&self.switch, &switch_iface)?;

        let n = role.host_number();
        let host = Host {
            role,
            ns,
            iface,
            switch_iface,
            ipv4: v4(n),
            ipv6: v6(n),
        };
        let mut addrs = vec![(IpAddr::from(host.ipv4), 24), (IpAddr::from(host.ipv6), 64)];
        if matches!(role, Role::Dispatcher | Role::SecondDispatcher) {
            addrs.push((v4(VIP_NUMBER).into(), 24));
            addrs.push((v6(VIP_NUMBER).into(), 64));
        }
        for (addr, len) in addrs {
            let cidr = format!("{addr}/{len}");
            let mut args = vec!["addr", "add", &cidr, "dev", &host.iface];
            if addr.is_ipv6() {
                args.push("nodad");
            }
            host.ns.ip(args)?;
        }
        host.ns.ip(["link", "set", &host.iface, "up"])?;
        tx_checksum_off(&host.ns, &host.iface)?;
        Ok(host)
    }

    /// The tag shared by this topology's namespace names.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    fn host(&self, role: Role) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.role == role)
            .with_context(|| format!("no {role:?} host in this topology"))
    }

    pub fn client(&self) -> &Host {
        self.host(Role::Client)
            .expect("every topology has a client")
    }

    pub fn dispatcher(&self) -> Result<&Host> {
        self.host(Role::Dispatcher)
    }

    pub fn second_dispatcher(&self) -> Result<&Host> {
        self.host(Role::SecondDispatcher)
    }

    pub fn dns(&self) -> Result<&Host> {
        self.host(Role::Dns)
    }

    pub fn backends(&self) -> impl Iterator<Item = &Host> {
        self.hosts
            .iter()
            .filter(|h| matches!(h.role, Role::Backend(_)))
    }

    /// The service address (a second address of the dispatcher's interface).
    pub fn vip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => v4(VIP_NUMBER).into(),
            Family::V6 => v6(VIP_NUMBER).into(),
        }
    }

    /// All namespace names, hosts first.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.hosts.iter().map(|h| h.ns.name().to_owned()).collect();
        v.push(self.switch.name().to_owned());
        v
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Processes first (all namespaces), then the namespaces (fields drop after this).
        for host in &self.hosts {
            host.ns.kill_processes(Duration::from_secs(3));
        }
        self.switch.kill_processes(Duration::from_secs(3));
    }
}

/// `ethtool -K IF tx off`: veth senders otherwise leave UDP checksums partial.
fn tx_checksum_off(ns: &Netns, iface: &str) -> Result<()> {
    ns.exec("ethtool", ["-K", iface, "tx", "off"])
        .map(drop)
        .with_context(|| {
            format!(
                "turning TX checksum offload off on {iface} in {}",
                ns.name()
            )
        })
}

/// Checks that `addr` is one this testbed may use (198.18.0.0/15 or 2001:db8::/32).
pub fn check_test_address(addr: IpAddr) -> Result<()> {
    let ok = match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] == 198 && (o[1] & 0xfe) == 18
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            s[0] == 0x2001 && s[1] == 0xdb8
        }
    };
    if !ok {
        bail!("{addr} is outside the test ranges 198.18.0.0/15 and 2001:db8::/32");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_plan() {
        assert_eq!(
            v4(Role::Backend(1).host_number()).to_string(),
            "198.18.0.21"
        );
        assert_eq!(
            v6(Role::Backend(3).host_number()).to_string(),
            "2001:db8::23"
        );
        assert_eq!(v6(Role::Client.host_number()).to_string(), "2001:db8::10");
        assert_eq!(
            v6(Role::Dispatcher.host_number()).to_string(),
            "2001:db8::2"
        );
        assert_eq!(v6(VIP_NUMBER).to_string(), "2001:db8::100");
        assert_eq!(v4(VIP_NUMBER).to_string(), "198.18.0.100");
        assert_eq!(v4(Role::Dns.host_number()).to_string(), "198.18.0.53");
        assert_eq!(v6(Role::Dns.host_number()).to_string(), "2001:db8::53");
        for role in [
            Role::Client,
            Role::Dispatcher,
            Role::Backend(1),
            Role::Backend(30),
            Role::Dns,
        ] {
            check_test_address(v4(role.host_number()).into()).unwrap();
            check_test_address(v6(role.host_number()).into()).unwrap();
        }
        assert!(check_test_address("10.0.0.1".parse().unwrap()).is_err());
        assert!(check_test_address("2001:db9::1".parse().unwrap()).is_err());
        assert!(check_test_address("198.20.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn family_parses() {
        assert_eq!("v6".parse::<Family>().unwrap(), Family::V6);
        assert_eq!("IPv4".parse::<Family>().unwrap(), Family::V4);
        assert!("v5".parse::<Family>().is_err());
    }
}
