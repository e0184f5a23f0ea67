//! What `ip -j link show` says of an interface in a namespace: its MAC address and the
//! XDP program attached to it.
use std::process::Command;

use anyhow::{Context as _, Result, anyhow};
use serde_json::Value;

use crate::cmd;

/// The `ip -s -j link show dev IFACE` object of `iface` in namespace `ns` (with counters).
pub fn link_json(ns: &str, iface: &str) -> Result<Value> {
    let out =
        cmd::stdout(Command::new("ip").args(["-n", ns, "-s", "-j", "link", "show", "dev", iface]))?;
    let v: Value =
        serde_json::from_str(&out).with_context(|| format!("`ip -j link show` printed {out}"))?;
    v.get(0).cloned().context("`ip -j link` returned nothing")
}

/// The MAC address of `iface` in namespace `ns`.
pub fn mac_address(ns: &str, iface: &str) -> Result<[u8; 6]> {
    let v = link_json(ns, iface)?;
    let text = v["address"]
        .as_str()
        .with_context(|| format!("no address for {iface} in {ns}: {v}"))?;
    parse_mac(text).with_context(|| format!("MAC address {text:?} of {iface} in {ns}"))
}

/// The id of the XDP program attached to `iface` in namespace `ns`, if any.
pub fn xdp_prog_id(ns: &str, iface: &str) -> Result<Option<u32>> {
    let v = link_json(ns, iface)?;
    Ok(v["xdp"]["prog"]["id"].as_u64().map(|id| id as u32))
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bytes = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<Vec<u8>, _>>()?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| anyhow!("{} bytes, not 6", b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse() {
        assert_eq!(
            parse_mac("02:00:0a:ff:00:01").unwrap(),
            [2, 0, 10, 255, 0, 1]
        );
        assert!(parse_mac("02:00").is_err());
        assert!(parse_mac("zz:00:00:00:00:00").is_err());
    }
}
