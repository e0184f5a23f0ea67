//! Backends of the direct-server-return modes (`--forwarding l2dsr|ipip`), set up the way
//! the README tells operators: the VIP on `lo` (IPv6 without DAD), ARP kept off it
//! (`arp_ignore=1`, `arp_announce=2`; Linux answers neighbour solicitations only for the
//! addresses of the receiving interface, so IPv6 needs nothing), strict `rp_filter`, and for
//! `ipip` the decapsulation: `sip-dispatch decap` on the backend's interface (this kernel
//! has no ipip or ip6tnl module).
//!
//! The client side has the stand-in for an address-restricted NAT: nftables in the
//! client's namespace drops SIP (UDP from port 5060) from every source but the VIP.
use std::{net::IpAddr, path::Path};

use anyhow::{Context as _, Result};

use crate::{dispatcher::Dispatcher, netns, nft::InputRule, topology::Host};

/// One backend's DSR setup; `sip-dispatch decap` (ipip) stops on drop, the namespace's
/// settings go with it.
pub struct DsrBackend {
    pub decap: Option<Dispatcher>,
}

/// Prepares `host` to take packets for `vip` without a rewrite; with `decap`, also runs
/// `sip-dispatch decap` on its interface.
pub fn prepare_backend(
    host: &Host,
    vip: IpAddr,
    decap: bool,
    binary: &Path,
    dir: &Path,
) -> Result<DsrBackend> {
    let ns = host.ns_name();
    let prefix = if vip.is_ipv6() { 128 } else { 32 };
    let mut add = vec![
        "addr".to_owned(),
        "add".to_owned(),
        format!("{vip}/{prefix}"),
    ];
    add.extend(["dev", "lo"].map(str::to_owned));
    if vip.is_ipv6() {
        add.push("nodad".to_owned());
    }
    netns::exec(ns, "ip", &add).with_context(|| format!("the VIP on lo in {ns}"))?;
    // Strict reverse-path filtering stays on: the client's datagrams (l2dsr, and ipip
    // after `sip-dispatch decap`) arrive on the interface the backend routes the client
    // through.
    for setting in [
        "net.ipv4.conf.all.arp_ignore=1",
        "net.ipv4.conf.all.arp_announce=2",
        "net.ipv4.conf.all.rp_filter=1",
        &format!("net.ipv4.conf.{}.rp_filter=1", host.iface),
    ] {
        netns::exec(ns, "sysctl", ["-qw", setting])
            .with_context(|| format!("{setting} in {ns}"))?;
    }
    if vip.is_ipv6() {
        wait_link_local_ready(ns, &host.iface)?;
    }
    let decap = match decap {
        false => None,
        true => {
            // The dispatcher's addresses: the outer sources of its ipip (the default).
            let from = ["198.18.0.2", "2001:db8::2"].map(|a| a.parse::<IpAddr>().expect("address"));
            Some(Dispatcher::decap(binary, ns, &host.iface, &from, dir)?)
        }
    };
    Ok(DsrBackend { decap })
}

/// Waits (up to 10 s) until `iface` in `ns` has a link-local IPv6 address that passed
/// duplicate address detection. The VIP is on `lo`, so Linux solicits the client's
/// neighbour entry from the link-local address; while that is still tentative (the first
/// second or two after the interface came up) it sends no solicitation, and the
/// backend's first answers wait for the retry.
fn wait_link_local_ready(ns: &str, iface: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let all = netns::exec(
            ns,
            "ip",
            ["-6", "addr", "show", "dev", iface, "scope", "link"],
        )?;
        let tentative = netns::exec(
            ns,
            "ip",
            [
                "-6",
                "addr",
                "show",
                "dev",
                iface,
                "scope",
                "link",
                "tentative",
            ],
        )?;
        if all.contains("inet6") && !tentative.contains("inet6") {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{iface} in {ns}: no link-local IPv6 address out of DAD within 10 s:\n{all}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl Drop for DsrBackend {
    fn drop(&mut self) {
        if let Some(d) = self.decap.take() {
            let _ = d.stop();
        }
    }
}

/// The NAT stand-in: SIP from any source but `vip` is dropped in namespace `ns` (and
/// counted). Removed on drop.
pub struct OnlyFromVip(InputRule);

impl OnlyFromVip {
    pub fn install(ns: &str, vip: IpAddr) -> Result<OnlyFromVip> {
        let family = if vip.is_ipv6() { "ip6" } else { "ip" };
        let rule = format!("udp sport 5060 {family} saddr != {vip} counter drop");
        InputRule::install(ns, "sdt_nat", &rule).map(OnlyFromVip)
    }

    /// SIP datagrams dropped so far (answers that did not come from the VIP).
    pub fn dropped(&self) -> Result<u64> {
        self.0.matched()
    }
}
