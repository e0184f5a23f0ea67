//! `sip-dispatch run --config FILE`: every `run` flag as a TOML key (same names), plus
//! several services, each with static backends and/or SRV names. Flags override the
//! file. Errors name the file, the line and the key.
//!
//! ```toml
//! iface = "eth1"
//! health-interval = "1s"
//! dns-server = "198.18.0.53:53"
//!
//! [[service]]
//! vip = "198.18.0.100:5060"
//! backends = ["198.18.0.21:5060,weight=2", "198.18.0.22:5060"]
//! srv = ["_sip._udp.example.net"]
//! ```
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use sip_dispatch_common::HashKey;

use crate::{
    addrs::SourceAddrs,
    cli::{BackendSpec, ForwardingMode, RunArgs, XdpModeArg},
    hashkey::KeyOrigin,
    health::HealthConfig,
    select::Candidate,
    srv::DnsConfig,
};

mod file;
mod merge;
mod validate;

pub use validate::validate_services;

/// One service to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: SocketAddr,
    pub backends: Vec<BackendSpec>,
    pub srv: Vec<String>,
    pub forwarding: ForwardingMode,
}

/// A static backend as the table builder takes it (healthy until checked).
impl From<&BackendSpec> for Candidate {
    fn from(b: &BackendSpec) -> Candidate {
        Candidate {
            addr: b.addr,
            priority: b.priority,
            weight: b.weight,
            sharing: 1,
            healthy: true,
            latency_percent: 100,
            overload_percent: 0,
        }
    }
}

/// Everything `run` needs, flags and file merged, defaults applied.
#[derive(Clone, Debug)]
pub struct Settings {
    pub iface: String,
    pub xdp_mode: XdpModeArg,
    pub hash_key: HashKey,
    /// Where `hash_key` came from (for the warnings at start, and to create a key file).
    pub hash_key_origin: KeyOrigin,
    pub pin_path: PathBuf,
    pub reset: bool,
    pub keep_attached: bool,
    pub control: PathBuf,
    /// Where the operator's changes are kept ([`crate::state`]).
    pub state_file: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub dns: DnsConfig,
    pub health: HealthConfig,
    pub services: Vec<ServiceSpec>,
    pub affinity: crate::dataplane::Affinity,
    /// `--call-idle`: how long a call without messages still counts as held.
    pub call_idle: Duration,
    /// `--latency-aware`: a slow backend's weight shrinks for new calls.
    pub latency_aware: bool,
    /// `--probe-source` as given (the daemon picks the missing ones at start).
    pub probe_source: SourceAddrs,
    /// `--encap-source` as given (default: the probe source of the family).
    pub encap_source: SourceAddrs,
}

impl Settings {
    /// What `run` and `reload` use: [`Settings::resolve_on_host`] with the addresses of
    /// this host (network namespace).
    pub fn load(args: &RunArgs) -> anyhow::Result<Settings> {
        let local = crate::addrs::local_addresses().context("listing this host's addresses")?;
        Self::resolve_on_host(args, &local)
    }

    /// [`Settings::resolve`], and every VIP must be one of `local` (this host's
    /// addresses) and no static backend may be.
    pub fn resolve_on_host(args: &RunArgs, local: &[IpAddr]) -> anyhow::Result<Settings> {
        Self::resolve_with(args, Some(local))
    }

    /// Merges the flags with the config file they name (if any). Address rules that do
    /// not depend on the host apply (a backend must be unicast); VIPs are not checked.
    pub fn resolve(args: &RunArgs) -> anyhow::Result<Settings> {
        Self::resolve_with(args, None)
    }
}

#[cfg(test)]
mod tests;
