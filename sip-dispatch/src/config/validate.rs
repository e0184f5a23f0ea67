//! The rules a set of services must keep, wherever it came from.
use anyhow::bail;

use super::ServiceSpec;

/// Rules every service set must keep: no forwarding loops, one family per service, no
/// backend listed twice, every service with something to dispatch to, at most
/// `MAX_BACKENDS_IN_ALL` static backends in all.
pub fn validate_services(services: &[ServiceSpec]) -> anyhow::Result<()> {
    if services.len() > sip_dispatch_common::MAX_SERVICES as usize {
        bail!(
            "{} services: at most {}",
            services.len(),
            sip_dispatch_common::MAX_SERVICES
        );
    }
    for (i, s) in services.iter().enumerate() {
        if services[..i].iter().any(|o| o.vip == s.vip) {
            bail!("service {} is configured twice", s.vip);
        }
        if s.backends.is_empty() && s.srv.is_empty() {
            bail!("service {} has no --backend and no --srv", s.vip);
        }
        for (j, b) in s.backends.iter().enumerate() {
            if b.addr.is_ipv6() != s.vip.is_ipv6() {
                bail!(
                    "backend {} and VIP {} are of different address families",
                    b.addr,
                    s.vip
                );
            }
            if services.iter().any(|o| o.vip == b.addr) {
                bail!(
                    "backend {} is a VIP of this dispatcher (a forwarding loop)",
                    b.addr
                );
            }
            if s.backends[..j].iter().any(|o| o.addr == b.addr) {
                bail!("backend {} is listed twice for {}", b.addr, s.vip);
            }
        }
    }
    let distinct: std::collections::HashSet<std::net::SocketAddr> = services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.addr))
        .collect();
    let limit = crate::controller::MAX_BACKENDS_IN_ALL;
    if distinct.len() > limit {
        bail!(
            "{} backends in all services: at most {limit}",
            distinct.len()
        );
    }
    Ok(())
}
