//! Which addresses may be a VIP or a backend, one rule set for flags, the config file,
//! `reload`, the control socket and DNS answers.
//!
//! A backend must be a unicast address that is not this host: unspecified, loopback,
//! link-local, multicast and broadcast addresses, and any address of this host, would
//! make the dispatcher send calls nowhere or back to itself. A VIP must be a unicast
//! address of this host: the slow path binds it, and XDP only sees traffic the host
//! receives.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address cannot serve.
fn special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => special_v4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => special_v4(v4).or(Some("an IPv4-mapped IPv6 address")),
            None => special_v6(a),
        },
    }
}

fn special_v4(a: Ipv4Addr) -> Option<&'static str> {
    if a.is_unspecified() {
        Some("the unspecified address")
    } else if a.is_loopback() {
        Some("a loopback address")
    } else if a.is_link_local() {
        Some("a link-local address")
    } else if a.is_multicast() {
        Some("a multicast address")
    } else if a.is_broadcast() {
        Some("the broadcast address")
    } else if a.octets()[0] == 0 {
        Some("in 0.0.0.0/8 (\"this network\")")
    } else {
        None
    }
}

fn special_v6(a: Ipv6Addr) -> Option<&'static str> {
    if a.is_unspecified() {
        Some("the unspecified address")
    } else if a.is_loopback() {
        Some("a loopback address")
    } else if a.is_unicast_link_local() {
        Some("a link-local address")
    } else if a.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

/// Checks that `ip` may be a backend: a unicast address that is not one of `local`
/// (this host's addresses). The error names the address and what it is.
pub fn check_backend(ip: IpAddr, local: &[IpAddr]) -> Result<(), String> {
    if let Some(what) = special(ip) {
        return Err(format!("backend {ip} is {what}, not a unicast address"));
    }
    if local.contains(&ip) {
        return Err(format!(
            "backend {ip} is an address of this host (a forwarding loop)"
        ));
    }
    Ok(())
}

/// Checks that `ip` may be a VIP: a unicast address that is one of `local`.
pub fn check_vip(ip: IpAddr, local: &[IpAddr]) -> Result<(), String> {
    if let Some(what) = special(ip) {
        return Err(format!("VIP {ip} is {what}, not a unicast address"));
    }
    if !local.contains(&ip) {
        return Err(format!(
            "VIP {ip} is not an address of this host (add it to an interface first)"
        ));
    }
    Ok(())
}

/// A source address per family (`--probe-source`, `--encap-source`): at most one each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceAddrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl SourceAddrs {
    /// The addresses given, at most one per family; `what` names them in the error.
    pub fn from_list(what: &str, list: &[IpAddr]) -> Result<SourceAddrs, String> {
        let mut out = SourceAddrs::default();
        for ip in list {
            let taken = match *ip {
                IpAddr::V4(a) => out.v4.replace(a).is_some(),
                IpAddr::V6(a) => out.v6.replace(a).is_some(),
            };
            if taken {
                return Err(format!(
                    "{what} {ip}: one address per family (IPv4 and IPv6) at most"
                ));
            }
        }
        Ok(out)
    }

    /// The address of the family of `v6`.
    pub fn get(&self, v6: bool) -> Option<IpAddr> {
        match v6 {
            false => self.v4.map(IpAddr::V4),
            true => self.v6.map(IpAddr::V6),
        }
    }

    /// Sets the address of its family.
    pub fn set(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => self.v4 = Some(a),
            IpAddr::V6(a) => self.v6 = Some(a),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = IpAddr> {
        [self.get(false), self.get(true)].into_iter().flatten()
    }
}

/// Whether `ip` is a unicast address a host may use as its own: not unspecified,
/// loopback, link-local, multicast or broadcast.
pub fn is_unicast(ip: IpAddr) -> bool {
    special(ip).is_none()
}

/// Checks that `ip` may be a source address of this host (`what` names the setting).
pub fn check_source(what: &str, ip: IpAddr, local: &[IpAddr]) -> Result<(), String> {
    if let Some(kind) = special(ip) {
        return Err(format!("{what} {ip} is {kind}, not a unicast address"));
    }
    if !local.contains(&ip) {
        return Err(format!("{what} {ip} is not an address of this host"));
    }
    Ok(())
}

/// Checks that `ip` is a unicast address that may be a host's on a network (`what`
/// names the setting).
pub fn check_unicast(what: &str, ip: IpAddr) -> Result<(), String> {
    match special(ip) {
        Some(kind) => Err(format!("{what} {ip} is {kind}, not a unicast address")),
        None => Ok(()),
    }
}

/// Every address configured on an interface of this host (this network namespace).
pub fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = interface_addresses()?
        .into_iter()
        .map(|(_, ip)| ip)
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// The addresses of interface `iface`, in the order the kernel lists them.
pub fn addresses_of(iface: &str) -> std::io::Result<Vec<IpAddr>> {
    Ok(interface_addresses()?
        .into_iter()
        .filter(|(name, _)| name == iface)
        .map(|(_, ip)| ip)
        .collect())
}

/// Every (interface name, address) of this host (this network namespace).
fn interface_addresses() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own and free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says its real type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                let ip = IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                out.push((name_of(ifa), ip));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                out.push((
                    name_of(ifa),
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                ));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

fn name_of(ifa: &libc::ifaddrs) -> String {
    if ifa.ifa_name.is_null() {
        return String::new();
    }
    // SAFETY: a non-null ifa_name is a NUL-terminated string that lives as long as the
    // list (we copy it out before freeifaddrs).
    unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn backends_must_be_unicast_and_not_local() {
        let local = [ip("198.18.0.2"), ip("198.18.0.100"), ip("2001:db8::2")];
        for good in ["198.18.0.21", "2001:db8::21", "203.0.113.9"] {
            assert_eq!(check_backend(ip(good), &local), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("0.1.2.3", "this network"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:198.18.0.21", "IPv4-mapped"),
            ("198.18.0.2", "this host"),
            ("198.18.0.100", "this host"),
            ("2001:db8::2", "this host"),
        ] {
            let e = check_backend(ip(bad), &local).unwrap_err();
            assert!(e.contains(bad) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn vips_must_be_unicast_addresses_of_this_host() {
        let local = [ip("198.18.0.100"), ip("2001:db8::100"), ip("127.0.0.1")];
        assert_eq!(check_vip(ip("198.18.0.100"), &local), Ok(()));
        assert_eq!(check_vip(ip("2001:db8::100"), &local), Ok(()));
        for (bad, why) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("239.1.1.1", "multicast"),
            ("127.0.0.1", "loopback"),
            ("198.18.0.101", "not an address of this host"),
        ] {
            let e = check_vip(ip(bad), &local).unwrap_err();
            assert!(e.contains(bad) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn this_host_has_a_loopback_address() {
        let all = local_addresses().unwrap();
        assert!(all.iter().any(|a| a.is_loopback()), "{all:?}");
    }
}
