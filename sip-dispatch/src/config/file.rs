//! The config file's format: its keys as TOML, and reading a value the file gave as
//! text with errors that name the file, the line and the key.
use std::path::{Path, PathBuf};

use anyhow::bail;
use serde::Deserialize;
use toml::Spanned;

use crate::cli::{ForwardingMode, XdpModeArg};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct File {
    pub(super) iface: Option<Spanned<String>>,
    pub(super) xdp_mode: Option<Spanned<String>>,
    pub(super) hash_key: Option<Spanned<String>>,
    pub(super) hash_key_file: Option<PathBuf>,
    pub(super) pin_path: Option<PathBuf>,
    pub(super) control: Option<PathBuf>,
    pub(super) state_file: Option<PathBuf>,
    pub(super) metrics: Option<Spanned<String>>,
    pub(super) dns_server: Option<Spanned<String>>,
    pub(super) dns_min_ttl: Option<Spanned<u64>>,
    pub(super) dns_max_ttl: Option<Spanned<u64>>,
    pub(super) health_interval: Option<Spanned<String>>,
    pub(super) health_timeout: Option<Spanned<String>>,
    pub(super) down_after: Option<Spanned<u32>>,
    pub(super) up_after: Option<Spanned<u32>>,
    pub(super) alive_codes: Option<Spanned<String>>,
    pub(super) health_uri: Option<Spanned<String>>,
    pub(super) affinity: Option<Spanned<String>>,
    pub(super) affinity_entries: Option<Spanned<u64>>,
    pub(super) call_idle: Option<Spanned<String>>,
    pub(super) latency_aware: Option<bool>,
    pub(super) forwarding: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) probe_source: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) encap_source: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) service: Vec<FileService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileService {
    pub(super) vip: Spanned<String>,
    #[serde(default)]
    pub(super) backends: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) srv: Vec<String>,
    pub(super) forwarding: Option<Spanned<String>>,
}

/// Reads a value the file gave as text, naming file, line and key when it is wrong.
pub(super) struct Reader<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
}

impl Reader<'_> {
    pub(super) fn line(&self, span: std::ops::Range<usize>) -> usize {
        line_of(self.text, span.start)
    }

    pub(super) fn parse<T>(
        &self,
        key: &str,
        v: &Spanned<String>,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> anyhow::Result<T> {
        f(v.get_ref()).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: key `{key}`: {e}",
                self.path.display(),
                self.line(v.span())
            )
        })
    }

    /// A count (or seconds) from 1 to `max`.
    pub(super) fn count<T: Copy + Into<u64>>(
        &self,
        key: &str,
        v: &Spanned<T>,
        max: u64,
    ) -> anyhow::Result<T> {
        let n = (*v.get_ref()).into();
        if !(1..=max).contains(&n) {
            bail!(
                "{}:{}: key `{key}`: must be at least 1 and at most {max}, not {n}",
                self.path.display(),
                self.line(v.span())
            );
        }
        Ok(*v.get_ref())
    }

    /// `check` (an address rule) for the value at `v`, naming file, line and key.
    pub(super) fn check<T>(
        &self,
        key: &str,
        v: &Spanned<T>,
        check: Result<(), String>,
    ) -> anyhow::Result<()> {
        check.map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: key `{key}`: {e}",
                self.path.display(),
                self.line(v.span())
            )
        })
    }
}

/// The 1-based line of byte `offset`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

pub(super) fn parse_forwarding(s: &str) -> Result<ForwardingMode, String> {
    clap::ValueEnum::from_str(s, false)
        .map_err(|_| format!("invalid forwarding {s:?} (rewrite, l2dsr or ipip)"))
}

pub(super) fn parse_xdp_mode(s: &str) -> Result<XdpModeArg, String> {
    clap::ValueEnum::from_str(s, false)
        .map_err(|_| format!("invalid XDP mode {s:?} (auto, native or skb)"))
}
