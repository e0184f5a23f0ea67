//! A false "down" of a live backend: an nftables rule in the backend's namespace that
//! drops the incoming SIP requests whose first word is `OPTIONS` (the dispatcher's health
//! checks) and nothing else, so its calls (INVITE, ACK, BYE) still reach it.
//!
//! The match is `udp dport 5060 @ih,0,56 0x4f5054494f4e53`: the first 56 bits after the
//! UDP header (`@ih`, the inner header base) are the ASCII bytes `OPTIONS`. Verified with
//! nft 1.0.6 on Linux 6.18: OPTIONS dropped, INVITE, ACK, BYE and responses passed.
use anyhow::{Context as _, Result};

use crate::netns;

/// The table the rule lives in (one per namespace: the backend's).
const TABLE: &str = "sdt_flap";

/// The rule, with a counter so a test can see that it dropped something.
const RULE: &str = "udp dport 5060 @ih,0,56 0x4f5054494f4e53 counter drop";

/// The blocking rule, installed in namespace `ns`; removed on drop (also on failure).
#[derive(Debug)]
pub struct OptionsBlock {
    ns: String,
    removed: bool,
}

fn nft(ns: &str, args: &[&str]) -> Result<String> {
    netns::exec(ns, "nft", args).with_context(|| format!("`nft {}` in {ns}", args.join(" ")))
}

impl OptionsBlock {
    /// Installs the rule in `ns` (a table and an input chain of its own).
    pub fn install(ns: &str) -> Result<OptionsBlock> {
        nft(ns, &["add", "table", "inet", TABLE])?;
        // From here on the guard removes the table, also if a later step fails.
        let block = OptionsBlock {
            ns: ns.to_owned(),
            removed: false,
        };
        nft(
            ns,
            &[
                "add",
                "chain",
                "inet",
                TABLE,
                "input",
                "{ type filter hook input priority 0; policy accept; }",
            ],
        )?;
        let mut rule = vec!["add", "rule", "inet", TABLE, "input"];
        rule.extend(RULE.split(' '));
        nft(ns, &rule)?;
        Ok(block)
    }

    /// Packets the rule dropped so far.
    pub fn dropped(&self) -> Result<u64> {
        let listing = nft(&self.ns, &["list", "chain", "inet", TABLE, "input"])?;
        counter_packets(&listing)
            .with_context(|| format!("no `counter packets N` in the chain:\n{listing}"))
    }

    /// Removes the rule; returns how many packets it dropped.
    pub fn remove(mut self) -> Result<u64> {
        let dropped = self.dropped()?;
        nft(&self.ns, &["delete", "table", "inet", TABLE])?;
        self.removed = true;
        Ok(dropped)
    }
}

impl Drop for OptionsBlock {
    fn drop(&mut self) {
        if !self.removed {
            let _ = nft(&self.ns, &["delete", "table", "inet", TABLE]);
        }
    }
}

/// The `N` of the first `counter packets N bytes M` in an `nft list` output.
pub fn counter_packets(listing: &str) -> Option<u64> {
    let (_, rest) = listing.split_once("counter packets ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_from_a_listing() {
        let listing = "table inet sdt_flap {\n\tchain input {\n\t\ttype filter hook input \
                       priority filter; policy accept;\n\t\tudp dport 5060 @ih,0,56 \
                       0x4f5054494f4e53 counter packets 7 bytes 3150 drop\n\t}\n}\n";
        assert_eq!(counter_packets(listing), Some(7));
        assert_eq!(counter_packets("table inet sdt_flap {}"), None);
    }
}
