//! The control protocol: the requests the CLI (and the metrics endpoint) send the daemon
//! and the typed replies the controller answers with. On the control socket each is one
//! line of JSON: the request, then `{"ok":true,"result":REPLY}` or
//! `{"ok":false,"error":"...","result":null}` ([`Response`]).
//!
//! Field names, their order and which are left out when absent are the wire contract
//! (scripts read `--json`, the tests read the replies): the unit tests below pin each
//! reply's JSON.
use std::{fmt, net::SocketAddr};

use serde::{Deserialize, Serialize};
use sip_dispatch_common::health::{Admin, Health, State};

use crate::slowpath::CountersSnapshot;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    BackendsList,
    BackendAdd {
        address: SocketAddr,
        /// Checked by the daemon ([`check_weight`]), so that a raw request with a
        /// weight past the range is told why.
        weight: u32,
        priority: u16,
        service: Option<SocketAddr>,
    },
    BackendRemove {
        address: SocketAddr,
    },
    BackendAdmin {
        address: SocketAddr,
        admin: AdminAction,
    },
    BackendWeight {
        address: SocketAddr,
        weight: u32,
    },
    Stats,
    Which {
        call_id: String,
        service: Option<SocketAddr>,
    },
    Reload,
}

/// What `backends enable|drain|disable` asks for.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum AdminAction {
    Enable,
    Drain,
    Disable,
}

impl AdminAction {
    /// The operator's setting this action leaves the backend in.
    pub fn admin(self) -> Admin {
        match self {
            AdminAction::Enable => Admin::Enabled,
            AdminAction::Drain => Admin::Drained,
            AdminAction::Disable => Admin::Disabled,
        }
    }
}

/// Parsed by hand so that a raw request with another word is told which ones exist.
impl TryFrom<String> for AdminAction {
    type Error = String;

    fn try_from(s: String) -> Result<AdminAction, String> {
        match s.as_str() {
            "enable" => Ok(AdminAction::Enable),
            "drain" => Ok(AdminAction::Drain),
            "disable" => Ok(AdminAction::Disable),
            other => Err(format!(
                "unknown admin state {other:?} (enable, drain or disable)"
            )),
        }
    }
}

/// The highest weight a backend may have (weights are 16-bit in the tables).
pub const MAX_WEIGHT: u32 = u16::MAX as u32;

/// The weight range, for `backends add`, `set-weight` and the state file.
pub fn check_weight(weight: u32) -> anyhow::Result<()> {
    if weight > MAX_WEIGHT {
        anyhow::bail!("weight {weight} is above {MAX_WEIGHT}");
    }
    Ok(())
}

/// What an operator sees of a backend: its health, unless the operator drained or
/// disabled it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Up,
    Down,
    Drained,
    Disabled,
}

impl BackendState {
    pub fn of(health: &Health) -> BackendState {
        match (health.admin, health.state) {
            (Admin::Disabled, _) => BackendState::Disabled,
            (Admin::Drained, _) => BackendState::Drained,
            (Admin::Enabled, State::Up) => BackendState::Up,
            (Admin::Enabled, State::Down) => BackendState::Down,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Drained => "drained",
            BackendState::Disabled => "disabled",
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The envelope of every answer on the control socket. `result` is null on errors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response<R> {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Missing (as from an error of an older daemon) reads as null.
    pub result: Option<R>,
}

impl<R> From<Answer<R>> for Response<R> {
    fn from(answer: Answer<R>) -> Response<R> {
        match answer {
            Ok(result) => Response {
                ok: true,
                error: None,
                result: Some(result),
            },
            Err(e) => Response {
                ok: false,
                error: Some(e),
                result: None,
            },
        }
    }
}

/// What the controller answers a request with: its reply, or why it refused.
pub type Answer<R = Reply> = Result<R, String>;

/// Every reply the daemon sends, as the controller hands it over (the metrics endpoint
/// takes [`Reply::Stats`] as it is; the control socket writes its JSON, without a tag).
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Reply {
    BackendsList(BackendsList),
    Stats(Box<Snapshot>),
    Which(WhichReply),
    Reload(ReloadReply),
    Added(Added),
    Removed(Removed),
    AdminChanged(AdminChanged),
    WeightSet(WeightSet),
}

impl Reply {
    /// Tells a reply to a change that the change was not saved (in `warning`).
    pub fn warn(&mut self, warning: String) {
        match self {
            Reply::Reload(r) => r.warning = Some(warning),
            Reply::Added(r) => r.warning = Some(warning),
            Reply::Removed(r) => r.warning = Some(warning),
            Reply::AdminChanged(r) => r.warning = Some(warning),
            Reply::WeightSet(r) => r.warning = Some(warning),
            Reply::BackendsList(_) | Reply::Stats(_) | Reply::Which(_) => {}
        }
    }
}

/// `backends list`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendsList {
    pub services: Vec<ServiceView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceView {
    pub vip: SocketAddr,
    /// `rewrite`, `l2dsr` or `ipip`.
    pub forwarding: String,
    pub generation: u64,
    /// The priority level the table in force uses (null: no table, or no backend up).
    pub priority: Option<u16>,
    pub backends: Vec<BackendView>,
}

/// A backend of a service in `backends list`: its stats, and its share of the slots.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendView {
    #[serde(flatten)]
    pub backend: BackendSnapshot,
    pub share: f64,
}

/// `stats` (and the metrics page, and the exit line): counters and backend states.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub counters: FastPathCounters,
    pub backends: Vec<BackendSnapshot>,
    pub dns_failures: u64,
    #[serde(default)]
    pub reloads: Reloads,
    pub slow_path: CountersSnapshot,
    /// Entries in the affinity map (0 with `--affinity off`), and its size (0 then).
    #[serde(default)]
    pub affinity_entries: u64,
    #[serde(default)]
    pub affinity_capacity: u64,
    /// Each service's slot table: how many were published, and whether the last failed.
    #[serde(default)]
    pub tables: Vec<TableSnapshot>,
}

/// A service's slot tables, as the metrics show them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TableSnapshot {
    pub service: SocketAddr,
    /// Tables swapped in since the daemon started (`backends list`'s table generation).
    pub generation: u64,
    /// Tables that could not be built or swapped in (the one before stayed in force).
    pub publish_failures: u64,
    /// The last table could not be built or swapped in: the one in force is older than
    /// what the backends' states ask for, until a later change publishes.
    pub last_publish_failed: bool,
}

/// The fast path's counters by name, in the order of `sip_dispatch_common::Counter`
/// (a JSON object on the wire).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FastPathCounters(pub Vec<(String, u64)>);

impl FastPathCounters {
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(name, v)| (name.as_str(), *v))
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

impl Serialize for FastPathCounters {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de> Deserialize<'de> for FastPathCounters {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FastPathCounters;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of counters")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<FastPathCounters, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, u64>()? {
                    out.push(entry);
                }
                Ok(FastPathCounters(out))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// The slow path's counters by name, in their JSON order.
pub fn slow_path_counters(c: &CountersSnapshot) -> [(&'static str, u64); 13] {
    [
        ("received", c.received),
        ("forwarded", c.forwarded),
        ("answered_503", c.answered_503),
        ("dropped_not_sip", c.dropped_not_sip),
        ("dropped_no_call_id", c.dropped_no_call_id),
        ("dropped_no_backend", c.dropped_no_backend),
        ("rate_limited_503", c.rate_limited_503),
        ("send_errors", c.send_errors),
        ("too_large_503", c.too_large_503),
        ("affinity_followed", c.affinity_followed),
        ("affinity_written", c.affinity_written),
        ("not_on_link", c.not_on_link),
        ("too_big", c.too_big),
    ]
}

/// A backend of a service, as `stats` and `backends list` show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendSnapshot {
    pub service: SocketAddr,
    pub address: SocketAddr,
    pub weight: u32,
    pub priority: u16,
    /// `static`, or the SRV name it came from.
    pub source: String,
    /// Where the backend, its weight and its state came from (see
    /// [`crate::stats::BackendInfo`]); empty from a daemon too old to tell.
    #[serde(default)]
    pub added_by: String,
    #[serde(default)]
    pub weight_from: String,
    #[serde(default)]
    pub state_from: String,
    pub state: BackendState,
    pub reason: String,
    pub rtt_ms: Option<f64>,
    /// Of the last health check; null when it got no final response.
    #[serde(default)]
    pub last_code: Option<u16>,
    #[serde(default)]
    pub last_rtt_ms: Option<f64>,
    pub consecutive_failures: u32,
    pub last_change: u64,
    pub checks: u64,
    pub check_failures: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Calls it holds as far as the dispatcher can tell; left out when unknown
    /// (`--affinity off`, or no census since the last change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls: Option<u64>,
    #[serde(flatten)]
    pub load: LoadView,
}

/// What a backend's load does to its weight for new calls (see
/// `sip_dispatch_common::load`); the defaults are what a daemon too old to tell means.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LoadView {
    /// The weight the tables give it for new calls, in the units of `weight`: 0 when it
    /// takes none (down, drained, disabled, or overloaded at 100 %).
    #[serde(default)]
    pub effective_weight: f64,
    /// The RFC 7339 `oc` in force (percent of new calls sent elsewhere); null: none.
    #[serde(default)]
    pub overload: Option<u8>,
    /// How long that feedback still holds.
    #[serde(default)]
    pub overload_expires_ms: Option<u64>,
    /// The smallest probe round trip of the last 5 minutes.
    #[serde(default)]
    pub rtt_baseline_ms: Option<f64>,
    /// The share of its weight its latency leaves it (1.0 without `--latency-aware`).
    #[serde(default = "full")]
    pub latency_factor: f64,
    /// Why the effective weight is below the weight by load ("" when it is not).
    #[serde(default)]
    pub load_reason: String,
    /// Overload feedback taken; and ignored: malformed, or older than the last
    /// (`oc-seq`).
    #[serde(default)]
    pub oc_accepted: u64,
    #[serde(default)]
    pub oc_malformed: u64,
    #[serde(default)]
    pub oc_stale: u64,
}

fn full() -> f64 {
    1.0
}

impl Default for LoadView {
    fn default() -> LoadView {
        LoadView {
            effective_weight: 0.0,
            overload: None,
            overload_expires_ms: None,
            rtt_baseline_ms: None,
            latency_factor: 1.0,
            load_reason: String::new(),
            oc_accepted: 0,
            oc_malformed: 0,
            oc_stale: 0,
        }
    }
}

/// Outcomes of `reload` (and SIGHUP) since the daemon started.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reloads {
    pub ok: u64,
    pub failed: u64,
    /// Whether the last one failed (false before any).
    pub last_failed: bool,
}

/// `which`: where a Call-ID goes now.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WhichReply {
    pub call_id: String,
    pub service: SocketAddr,
    pub slot: u32,
    /// Null when the service has no table, or its table no backend.
    pub backend: Option<SocketAddr>,
    /// The call's entry in the affinity map; null when it has none.
    pub affinity: Option<AffinityView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AffinityView {
    /// Null when the entry's backend id is no longer any backend's.
    pub backend: Option<SocketAddr>,
    /// Whether the fast path would still follow it.
    pub valid: bool,
    pub idle_s: u64,
    pub bye_seen: bool,
    pub cancel_seen: bool,
}

/// `reload`: the SRV names resolved again, the configuration file read, what changed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadReply {
    pub reloaded: Vec<String>,
    pub config: Option<String>,
    pub changes: Vec<String>,
    /// Set when the change could not be saved to the state file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `backends add`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Added {
    pub added: SocketAddr,
    pub service: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `backends remove`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Removed {
    pub removed: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `backends enable|drain|disable`: the state the backend is in now.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminChanged {
    pub address: SocketAddr,
    pub state: BackendState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `backends set-weight`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WeightSet {
    pub address: SocketAddr,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// A backend row with every field set, for tests.
#[cfg(test)]
pub fn sample_backend(address: &str, state: BackendState) -> BackendSnapshot {
    BackendSnapshot {
        service: "198.18.0.100:5060".parse().unwrap(),
        address: address.parse().unwrap(),
        weight: 2,
        priority: 10,
        source: "_sip._udp.example.net".into(),
        added_by: "config".into(),
        weight_from: "dns".into(),
        state_from: "health".into(),
        state,
        reason: String::new(),
        rtt_ms: Some(1.5),
        last_code: Some(200),
        last_rtt_ms: Some(1.2),
        consecutive_failures: 0,
        last_change: 0,
        checks: 9,
        check_failures: 1,
        packets: 7,
        bytes: 700,
        calls: Some(4),
        load: LoadView {
            effective_weight: 2.0,
            ..LoadView::default()
        },
    }
}

#[cfg(test)]
mod tests;
