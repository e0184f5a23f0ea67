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

fn nft(ns: &str, args: &[&str]) -> Result<String> {
    netns::exec(ns, "nft", args).with_context(|| format!("`nft {}` in {ns}", args.join(" ")))
}

/// One counted rule in an input chain of a table of its own, in a namespace; the table
/// is removed on drop (also on failure).
#[derive(Debug)]
pub struct InputRule {
    ns: String,
    table: &'static str,
    removed: bool,
}

impl InputRule {
    /// Installs `rule` (words separated by single spaces, with a `counter`) in `ns`, in
    /// table `table` and its input chain.
    pub fn install(ns: &str, table: &'static str, rule: &str) -> Result<InputRule> {
        nft(ns, &["add", "table", "inet", table])?;
        // From here on the guard removes the table, also if a later step fails.
        let guard = InputRule {
            ns: ns.to_owned(),
            table,
            removed: false,
        };
        nft(
            ns,
            &[
                "add",
                "chain",
                "inet",
                table,
                "input",
                "{ type filter hook input priority 0; policy accept; }",
            ],
        )?;
        let mut args = vec!["add", "rule", "inet", table, "input"];
        args.extend(rule.split(' '));
        nft(ns, &args)?;
        Ok(guard)
    }

    /// Packets the rule matched so far.
    pub fn matched(&self) -> Result<u64> {
        let listing = nft(&self.ns, &["list", "chain", "inet", self.table, "input"])?;
        counter_packets(&listing)
            .with_context(|| format!("no `counter packets N` in the chain:\n{listing}"))
    }

    /// Removes the rule; returns how many packets it matched.
    pub fn remove(mut self) -> Result<u64> {
        let matched = self.matched()?;
        nft(&self.ns, &["delete", "table", "inet", self.table])?;
        self.removed = true;
        Ok(matched)
    }
}

impl Drop for InputRule {
    fn drop(&mut self) {
        if !self.removed {
            let _ = nft(&self.ns, &["delete", "table", "inet", self.table]);
        }
    }
}

/// The blocking rule, installed in namespace `ns`; removed on drop (also on failure).
#[derive(Debug)]
pub struct OptionsBlock(InputRule);

impl OptionsBlock {
    /// Installs the rule in `ns` (a table and an input chain of its own).
    pub fn install(ns: &str) -> Result<OptionsBlock> {
        InputRule::install(ns, TABLE, RULE).map(OptionsBlock)
    }

    /// Packets the rule dropped so far.
    pub fn dropped(&self) -> Result<u64> {
        self.0.matched()
    }

    /// Removes the rule; returns how many packets it dropped.
    pub fn remove(self) -> Result<u64> {
        self.0.remove()
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
