//! The controller test bed: backends found through DNS SRV records served by a real
//! DNS server, health-checked by the daemon, with SIPp calls through the dispatcher while
//! the test kills and restarts backends, edits the zone or stops the DNS server.
//!
//! ```text
//!  client (UAC) ── VIP 198.18.0.100 (sip-dispatch run --srv _sip._udp.example.net)
//!  backends b1..bN (SIPp UAS, 198.18.0.21...)     dns (named, 198.18.0.53)
//! ```
//!
//! What the tests check comes from three sources, joined per Call-ID:
//! - the UAC's message log: when each call's first INVITE left, and whether it succeeded;
//! - the UAS message logs: which backend completed it (INVITE, ACK and BYE);
//! - the daemon's `table` log lines (read as they arrive, stamped with the wall clock):
//!   the harness rebuilds each logged table with `sip-dispatch-common`'s `build_table` and
//!   hashes the Call-ID like the XDP program, so it knows where each call had to go.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use sip_dispatch_common::{
    Backend, HashKey,
    hash::call_id_hash,
    table::{SlotTable, Weighted, build_table},
};

use crate::{
    dispatcher::{self, Dispatcher, ExitStats, RunConfig, XdpMode},
    dns::{DnsServer, Zone},
    events::{DaemonLog, Event, Moment, TableEvent, Timed},
    netns, preflight,
    scenario::{progress, run_dir, start_backends, start_xdp_pass},
    sipp::{self, Uac, UacReport, UacSpec, Uas, UasReport},
    topology::{Family, Topology, TopologySpec},
};

/// The zone the tests serve.
pub const ZONE: &str = "example.net";
/// The SRV name the daemon resolves.
pub const SRV_NAME: &str = "_sip._udp.example.net";
/// TTL of every record of the zone, in seconds.
pub const ZONE_TTL: u32 = 2;
/// `--dns-min-ttl` given to the daemon (below the zone's TTL, so the TTL rules).
pub const DNS_MIN_TTL: u32 = 1;
/// The daemon's default health settings (`--health-interval`, `--down-after`,
/// `--up-after`), which the tests do not change.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
pub const DOWN_AFTER: u32 = 3;
pub const UP_AFTER: u32 = 2;

/// One SRV target: backend host `host` (1-based: 198.18.0.2`host`) as `b<host>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: u8,
    pub priority: u16,
    pub weight: u16,
}

impl Target {
    pub const fn new(host: u8, priority: u16, weight: u16) -> Self {
        Target {
            host,
            priority,
            weight,
        }
    }

    pub fn name(&self) -> String {
        format!("b{}", self.host)
    }
}

/// RFC 2782's shape: four targets at priority 10 weighted 60/20/10/10, and one at
/// priority 20 with weight 0 (a backup, used only when no priority-10 target is up).
pub const RFC2782_TARGETS: [Target; 5] = [
    Target::new(1, 10, 60),
    Target::new(2, 10, 20),
    Target::new(3, 10, 10),
    Target::new(4, 10, 10),
    Target::new(5, 20, 0),
];

/// The test zone: `_sip._udp` SRV records for `targets`, and an A and an AAAA record for
/// every backend host of the topology (targets or not), named `b<n>`.
pub fn srv_zone(topo: &Topology, targets: &[Target]) -> Result<Zone> {
    let dns = topo.dns()?;
    let mut zone = Zone::new(ZONE, ZONE_TTL, dns.ipv4.into());
    let srv = SRV_NAME
        .strip_suffix(&format!(".{ZONE}"))
        .expect("the SRV name is in the zone");
    for t in targets {
        zone.srv(srv, t.priority, t.weight, sipp::SIP_PORT, &t.name());
    }
    for (i, b) in topo.backends().enumerate() {
        zone.host(
            &format!("b{}", i + 1),
            &[IpAddr::from(b.ipv4), IpAddr::from(b.ipv6)],
        );
    }
    Ok(zone)
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BedConfig {
    pub family: Family,
    pub mode: XdpMode,
    /// Backend hosts (each gets a SIPp UAS at start).
    pub hosts: u8,
    /// The SRV records served at start.
    pub targets: Vec<Target>,
    pub binary: PathBuf,
    pub workdir: PathBuf,
    /// Name of this run (its log directory).
    pub name: String,
    /// How long the UASs live at most.
    pub bound: Duration,
    pub verbose: bool,
}

impl BedConfig {
    pub fn new(name: &str, binary: PathBuf, workdir: PathBuf) -> Self {
        BedConfig {
            family: Family::V4,
            mode: XdpMode::Native,
            hosts: RFC2782_TARGETS.len() as u8,
            targets: RFC2782_TARGETS.to_vec(),
            binary,
            workdir,
            name: name.to_owned(),
            bound: Duration::from_secs(120),
            verbose: true,
        }
    }
}

/// The running bed. Dropping it stops everything (daemon first) and removes the
/// namespaces.
pub struct ControllerBed {
    // Fields drop in this order: the daemon, its XDP_PASS helper, the backends, the DNS
    // server, then the namespaces.
    daemon: Option<Dispatcher>,
    xdp_pass: Option<Dispatcher>,
    /// The running UAS of each backend host (index 0 is b1).
    uas: Vec<Option<Uas>>,
    /// UASs already killed or stopped, with what they saw.
    reports: Vec<UasReport>,
    restarts: u32,
    pub dns: DnsServer,
    pub vip: SocketAddr,
    pub dir: PathBuf,
    pub cfg: BedConfig,
    topo: Topology,
}

impl ControllerBed {
    /// Builds the topology (client, dispatcher, `cfg.hosts` backends, DNS host), starts
    /// a UAS on every backend, named with [`srv_zone`] of `cfg.targets`, and the XDP_PASS
    /// helper; the daemon is started by [`start_daemon`](Self::start_daemon).
    pub fn build(cfg: BedConfig) -> Result<Self> {
        crate::preflight::require_dns()?;
        let dir = run_dir(&cfg.workdir, &cfg.name)?;
        netns::cleanup_leftovers()?;
        progress(cfg.verbose, format!("{}: building the topology", cfg.name));
        let topo = Topology::build(TopologySpec {
            dispatchers: 1,
            backends: cfg.hosts,
            dns: true,
        })?;
        let uas = start_backends(&topo, cfg.family, &dir, cfg.bound)?
            .into_iter()
            .map(Some)
            .collect();
        let zone = srv_zone(&topo, &cfg.targets)?;
        let dns_host = topo.dns()?;
        let dns = DnsServer::start(dns_host.ns_name(), dns_host.ipv4.into(), &dir, zone)?;
        // The dispatcher's host must reach it, and get the records the zone has.
        let disp_ns = topo.dispatcher()?.ns_name().to_owned();
        let answer = dns.srv_answer(&disp_ns, SRV_NAME)?;
        ensure!(
            answer == dns.zone().srv_answer(SRV_NAME),
            "dig from the dispatcher's namespace got {answer:?}"
        );
        progress(
            cfg.verbose,
            format!(
                "{}: named serves {SRV_NAME}: {}",
                cfg.name,
                answer.join(", ")
            ),
        );
        let xdp_pass = start_xdp_pass(&topo, &cfg.binary, cfg.mode, &dir, false)?;
        let vip = SocketAddr::new(topo.vip(cfg.family), sipp::SIP_PORT);
        Ok(ControllerBed {
            daemon: None,
            xdp_pass,
            uas,
            reports: Vec::new(),
            restarts: 0,
            dns,
            vip,
            dir,
            cfg,
            topo,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// The SIP address of backend host `host` (1-based).
    pub fn backend(&self, host: u8) -> SocketAddr {
        let b = self
            .topo
            .backends()
            .nth(usize::from(host) - 1)
            .expect("a backend host of the topology");
        SocketAddr::new(b.ip(self.cfg.family), sipp::SIP_PORT)
    }

    /// The addresses and weights of `targets` (for share checks).
    pub fn weights(&self, targets: &[Target]) -> Vec<(SocketAddr, u32)> {
        targets
            .iter()
            .map(|t| (self.backend(t.host), u32::from(t.weight)))
            .collect()
    }

    /// `sip-dispatch run` with the SRV name, this DNS server and `--dns-min-ttl 1`, and
    /// the default health settings.
    pub fn run_config(&self) -> Result<RunConfig> {
        let disp = self.topo.dispatcher()?;
        let mut run = RunConfig::new(&disp.iface, self.vip, self.cfg.mode);
        run.srv.push(SRV_NAME.to_owned());
        run.dns_server = Some(self.dns.address());
        run.dns_min_ttl = Some(DNS_MIN_TTL);
        run.control = Some(dispatcher::control_socket(self.topo.tag())?);
        Ok(run)
    }

    /// Starts the daemon and waits for its ready line.
    pub fn start_daemon(&mut self, run: &RunConfig) -> Result<DaemonLog> {
        ensure!(self.daemon.is_none(), "the daemon already runs");
        let disp = self.topo.dispatcher()?;
        progress(
            self.cfg.verbose,
            format!("{}: sip-dispatch {}", self.cfg.name, run.args().join(" ")),
        );
        let daemon = Dispatcher::run(&self.cfg.binary, disp.ns_name(), run, &self.dir)?;
        progress(
            self.cfg.verbose,
            format!("{}: {}", self.cfg.name, daemon.ready_line),
        );
        let log = daemon.log();
        self.daemon = Some(daemon);
        Ok(log)
    }

    /// Runs the daemon expecting it to refuse to start: returns its exit status and
    /// stderr. Fails if it gets ready or is still running after `timeout`.
    pub fn run_daemon_expecting_exit(
        &self,
        run: &RunConfig,
        timeout: Duration,
    ) -> Result<(std::process::ExitStatus, String)> {
        let disp = self.topo.dispatcher()?;
        let label = "sip-dispatch-refused";
        let ended = dispatcher::run_to_exit(
            &self.cfg.binary,
            disp.ns_name(),
            &run.args(),
            &self.dir,
            label,
            timeout,
        )?
        .never_ready(label)?;
        Ok((ended.status, ended.stderr))
    }

    /// Starts a UAC placing `calls` calls at `rate` cps to the VIP.
    pub fn start_calls(&self, calls: u32, rate: u32, label: &str) -> Result<Uac> {
        let client = self.topo.client();
        let spec = UacSpec::calls(client.ip(self.cfg.family), self.vip, calls, rate);
        progress(
            self.cfg.verbose,
            format!(
                "{}: placing {calls} calls at {rate} cps to {}",
                self.cfg.name, self.vip
            ),
        );
        Uac::start(client.ns_name(), &spec, &self.dir, label)
    }

    /// Kills backend `host`'s UAS with SIGKILL (by its PID, like a crash). Returns when
    /// the signal was sent.
    pub fn kill_backend(&mut self, host: u8) -> Result<Moment> {
        let uas = self.uas[usize::from(host) - 1]
            .take()
            .with_context(|| format!("backend b{host} is not running"))?;
        let pid = uas.pid();
        let killed_at = Moment::now();
        let report = uas.kill()?;
        progress(
            self.cfg.verbose,
            format!(
                "{}: killed the UAS of b{host} ({}, PID {pid})",
                self.cfg.name, report.address
            ),
        );
        self.reports.push(report);
        Ok(killed_at)
    }

    /// Starts a new UAS on backend `host`'s address; returns when its socket is bound.
    pub fn restart_backend(&mut self, host: u8) -> Result<Moment> {
        let slot = usize::from(host) - 1;
        ensure!(self.uas[slot].is_none(), "backend b{host} still runs");
        self.restarts += 1;
        let b = self
            .topo
            .backends()
            .nth(slot)
            .context("a backend host of the topology")?;
        let uas = Uas::start(
            b.ns_name(),
            b.ip(self.cfg.family),
            &self.dir,
            &format!("uas-b{host}-restart{}", self.restarts),
            self.cfg.bound,
        )?;
        let at = Moment::now();
        progress(
            self.cfg.verbose,
            format!(
                "{}: restarted the UAS of b{host} ({})",
                self.cfg.name, uas.address
            ),
        );
        self.uas[slot] = Some(uas);
        Ok(at)
    }

    /// Waits for the UAC, stops the daemon (exit statistics), the backends and the DNS
    /// server, and joins what everyone saw per call.
    pub fn finish(mut self, uac: Uac) -> Result<Outcome> {
        let uac = uac.finish();
        let mut daemon = self.daemon.take().context("the daemon was not started")?;
        let log = daemon.log();
        let running = daemon.check_running();
        let stats = daemon.stop_with_stats();
        let pass = self.xdp_pass.take().map(Dispatcher::stop).transpose();
        let stopped: Vec<Result<UasReport>> = self
            .uas
            .iter_mut()
            .filter_map(Option::take)
            .map(Uas::stop)
            .collect();
        running?;
        let uac = uac?;
        let exit_stats = stats?;
        pass?;
        let mut reports = std::mem::take(&mut self.reports);
        for r in stopped {
            reports.push(r?);
        }
        Outcome::join(uac, reports, log, exit_stats, self.dir.clone())
    }
}

/// How long a `table` log line may follow the swap it reports (the daemon swaps, then
/// logs), in seconds: calls started that long before a line may already follow the new
/// table. About 15 ms were seen with a debug build; this leaves a margin.
pub const LOG_LAG: f64 = 0.1;

/// One call, joined from the UAC's and the UASs' logs and the daemon's tables.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub id: String,
    /// When the UAC first sent its INVITE (seconds since the Unix epoch).
    pub invite_at: f64,
    /// The UAC saw it succeed.
    pub ok: bool,
    /// The backend where INVITE, ACK and BYE all arrived.
    pub backend: Option<SocketAddr>,
    /// The Call-ID's SipHash-1-3 (default key): where each table sends it.
    pub hash: u64,
}

impl CallRecord {
    /// Failed at the UAC, or split between backends: a SIPp UAS answers a BYE it does
    /// not know with 200, so a call whose BYE went to another backend than its INVITE
    /// looks successful to the UAC but completed nowhere.
    pub fn broken(&self) -> bool {
        !self.ok || self.backend.is_none()
    }
}

/// A logged table, rebuilt.
#[derive(Debug, Clone)]
pub struct TableAt {
    pub event: Timed<TableEvent>,
    pub table: SlotTable,
}

impl TableAt {
    /// Rebuilds the slot table the log line describes. When every weight of the logged
    /// priority is 0, they share equally (the daemon's rule for weight-0 SRV records).
    pub fn new(event: Timed<TableEvent>) -> Result<Self> {
        let all_zero = event.event.backends.iter().all(|b| b.1 == 0);
        let members: Vec<Weighted> = event
            .event
            .backends
            .iter()
            .map(|&(addr, weight)| Weighted {
                backend: Backend::from_socket_addr(addr),
                weight: if all_zero { 1 } else { weight },
            })
            .collect();
        let table = build_table(&members, HashKey::DEFAULT)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("rebuilding table generation {}", event.event.generation))?;
        Ok(TableAt { event, table })
    }

    /// Where this table sends a Call-ID hash.
    pub fn route(&self, hash: u64) -> Option<SocketAddr> {
        self.table
            .member_for_hash(hash)
            .map(|m| m.backend.to_socket_addr())
    }
}

/// Everything a run left, joined per call.
pub struct Outcome {
    pub uac: UacReport,
    /// Sorted by INVITE time.
    pub calls: Vec<CallRecord>,
    pub tables: Vec<TableAt>,
    pub events: Vec<Timed<Event>>,
    pub reports: Vec<UasReport>,
    pub exit_stats: ExitStats,
    /// Call-IDs completed at more than one backend.
    pub duplicated: Vec<String>,
    /// Call-IDs that reached a backend only in part (split or lost messages).
    pub incomplete: BTreeMap<String, SocketAddr>,
    pub dir: PathBuf,
}

impl Outcome {
    fn join(
        uac: UacReport,
        reports: Vec<UasReport>,
        log: DaemonLog,
        exit_stats: ExitStats,
        dir: PathBuf,
    ) -> Result<Self> {
        let mut done_at: BTreeMap<&str, Vec<SocketAddr>> = BTreeMap::new();
        let mut incomplete = BTreeMap::new();
        for r in &reports {
            for id in &r.calls {
                done_at.entry(id).or_default().push(r.address);
            }
            for id in r.incomplete.keys() {
                incomplete.insert(id.clone(), r.address);
            }
        }
        let duplicated = done_at
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(id, _)| (*id).to_owned())
            .collect();
        let mut calls: Vec<CallRecord> = uac
            .calls()?
            .into_iter()
            .map(|(id, c)| CallRecord {
                backend: done_at.get(id.as_str()).and_then(|v| v.first().copied()),
                hash: call_id_hash(HashKey::DEFAULT, id.as_bytes()),
                invite_at: c.invite_at,
                ok: c.ok,
                id,
            })
            .collect();
        calls.sort_by(|a, b| a.invite_at.total_cmp(&b.invite_at));
        let tables = log
            .tables()
            .into_iter()
            .map(TableAt::new)
            .collect::<Result<Vec<_>>>()?;
        Ok(Outcome {
            uac,
            calls,
            tables,
            events: log.events(),
            reports,
            exit_stats,
            duplicated,
            incomplete,
            dir,
        })
    }

    /// The table in force at `t` (epoch seconds): the last one logged before it.
    pub fn table_at(&self, t: f64) -> Option<&TableAt> {
        self.tables.iter().rev().find(|x| x.event.epoch() <= t)
    }

    /// Where the table in force when the call started sent it.
    pub fn expected(&self, call: &CallRecord) -> Option<SocketAddr> {
        self.table_at(call.invite_at)?.route(call.hash)
    }

    /// Calls whose INVITE left in `[from, to)` (epoch seconds).
    pub fn between(&self, from: f64, to: f64) -> impl Iterator<Item = &CallRecord> {
        self.calls
            .iter()
            .filter(move |c| c.invite_at >= from && c.invite_at < to)
    }

    /// Calls that failed or were split (see [`CallRecord::broken`]).
    pub fn broken(&self) -> impl Iterator<Item = &CallRecord> {
        self.calls.iter().filter(|c| c.broken())
    }

    /// Successful calls that completed somewhere else than the table in force at their
    /// INVITE says. Left out: calls the table sent to a backend that was dead then
    /// (`dead`: backend, from, to in epoch seconds; their INVITE retransmissions follow
    /// the next table), and calls that started within 50 ms of a table change (the log
    /// line and the swap are not one instant).
    pub fn misrouted(&self, dead: &[Outage]) -> Vec<(&CallRecord, Option<SocketAddr>)> {
        self.calls
            .iter()
            .filter(|c| c.ok && !self.near_change(c.invite_at, LOG_LAG))
            .filter_map(|c| {
                let want = self.expected(c);
                let excused = want.is_some_and(|w| dead.iter().any(|o| o.covers(w, c.invite_at)));
                (c.backend != want && !excused).then_some((c, want))
            })
            .collect()
    }

    /// Broken calls not explained by `dead` (the table sent them to a dead backend) nor
    /// by a table change while they ran (started at most `in_flight` seconds before it).
    pub fn unexplained_broken(&self, dead: &[Outage], in_flight: f64) -> Vec<&CallRecord> {
        self.broken()
            .filter(|c| {
                let want = self.expected(c);
                let excused = want.is_some_and(|w| dead.iter().any(|o| o.covers(w, c.invite_at)));
                !excused && !self.near_change(c.invite_at, in_flight)
            })
            .collect()
    }

    /// The routing checks of a run: every broken call is explained by `dead` or by a
    /// table change while it ran (see [`unexplained_broken`](Self::unexplained_broken);
    /// `in_flight` 0 for a run without planned changes), and every successful call
    /// completed where the table in force said (see [`misrouted`](Self::misrouted)).
    pub fn routing_problems(&self, dead: &[Outage], in_flight: f64) -> Vec<String> {
        let mut p = Vec::new();
        let unexplained = self.unexplained_broken(dead, in_flight);
        if !unexplained.is_empty() {
            p.push(format!(
                "{} broken calls were neither sent to a dead backend nor in flight at a table \
                 change, e.g. {:?}",
                unexplained.len(),
                unexplained
                    .iter()
                    .take(3)
                    .map(|c| &c.id)
                    .collect::<Vec<_>>()
            ));
        }
        let misrouted = self.misrouted(dead);
        if !misrouted.is_empty() {
            p.push(format!(
                "{} calls completed elsewhere than the logged table says, e.g. {:?}",
                misrouted.len(),
                misrouted
                    .iter()
                    .take(3)
                    .map(|(c, w)| (&c.id, c.backend, w))
                    .collect::<Vec<_>>()
            ));
        }
        p
    }

    /// Whether a table change was logged less than `guard` (at least [`LOG_LAG`])
    /// seconds after `t`, or at most [`LOG_LAG`] before it.
    pub fn near_change(&self, t: f64, guard: f64) -> bool {
        let guard = guard.max(LOG_LAG);
        self.tables
            .iter()
            .skip(1)
            .any(|x| x.event.epoch() >= t - LOG_LAG && x.event.epoch() < t + guard)
    }

    /// Calls that started while one table was in force: after the line of `from`, and
    /// [`LOG_LAG`] before the line of `to` (which may already have been swapped in).
    pub fn steady(&self, from: f64, to: f64) -> impl Iterator<Item = &CallRecord> {
        self.between(from, to - LOG_LAG)
    }

    /// A one-line summary of broken calls: count, and per backend they mapped to.
    pub fn failure_breakdown(&self) -> String {
        let mut by: BTreeMap<String, u64> = BTreeMap::new();
        for c in self.broken() {
            let key = self
                .expected(c)
                .map_or_else(|| "no table".to_owned(), |a| a.to_string());
            *by.entry(key).or_default() += 1;
        }
        let parts: Vec<String> = by.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!(
            "{} broken calls (failed, or split between backends; by the backend their \
             Call-ID mapped to when they started: {})",
            self.broken().count(),
            if parts.is_empty() {
                "-".to_owned()
            } else {
                parts.join(", ")
            }
        )
    }

    /// Checks that hold for every run: the UAC placed every call, no call completed
    /// twice, and traffic went through XDP. (Broken calls are the tests' business: see
    /// [`unexplained_broken`](Self::unexplained_broken).)
    pub fn basic_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.uac.created != self.calls.len() as u64 {
            p.push(format!(
                "the UAC created {} calls but its message log has {}",
                self.uac.created,
                self.calls.len()
            ));
        }
        if !self.duplicated.is_empty() {
            p.push(format!(
                "{} calls completed at several backends, e.g. {:?}",
                self.duplicated.len(),
                &self.duplicated[..self.duplicated.len().min(3)]
            ));
        }
        if self.exit_stats.counter("xdp_tx") == 0 {
            p.push(format!(
                "the dispatcher's xdp_tx counter is 0 (counters {:?})",
                self.exit_stats.counters
            ));
        }
        p
    }

    /// For each table after the first: its generation and the seconds from the log line
    /// that caused it (the last `backend` or `dns` line before it) to the table line:
    /// how long the daemon took to build and swap it in.
    pub fn swap_latencies(&self) -> Vec<(u64, f64)> {
        self.tables
            .iter()
            .skip(1)
            .filter_map(|t| {
                let cause = self
                    .events
                    .iter()
                    .filter(|e| e.index < t.event.index)
                    .rfind(|e| matches!(e.event, Event::Backend { .. } | Event::Dns { .. }))?;
                Some((t.event.event.generation, cause.moment().secs_to(t.event.at)))
            })
            .collect()
    }

    /// The tables the daemon logged, one per line, with the build-and-swap time of each
    /// (see [`swap_latencies`](Self::swap_latencies)).
    pub fn table_history(&self, since: Instant) -> String {
        let latencies = self.swap_latencies();
        let mut s = String::new();
        for t in &self.tables {
            let e = &t.event.event;
            let list: Vec<String> = e.backends.iter().map(|(a, w)| format!("{a}/{w}")).collect();
            let when = if t.event.at >= since {
                format!("+{:.3} s", (t.event.at - since).as_secs_f64())
            } else {
                format!("-{:.3} s", (since - t.event.at).as_secs_f64())
            };
            let swap = latencies
                .iter()
                .find(|l| l.0 == e.generation)
                .map_or(String::new(), |l| {
                    format!(" (built {:.3} s after its cause)", l.1)
                });
            let _ = writeln!(
                s,
                "  {when:>10}  generation {} priority {} backends {}{swap}",
                e.generation,
                e.priority.map_or("none".to_owned(), |p| p.to_string()),
                list.join(",")
            );
        }
        s
    }
}

/// A backend that did not answer from `from` to `to` (epoch seconds).
#[derive(Debug, Clone, Copy)]
pub struct Outage {
    pub backend: SocketAddr,
    pub from: f64,
    pub to: f64,
}

impl Outage {
    pub fn new(backend: SocketAddr, from: &Moment, to: Option<&Moment>) -> Self {
        Outage {
            backend,
            from: from.epoch(),
            to: to.map_or(f64::INFINITY, Moment::epoch),
        }
    }

    /// Whether a call that started at `t` and was sent to `b` met this outage. A call
    /// that started up to 1 s before it may still have had messages to send.
    pub fn covers(&self, b: SocketAddr, t: f64) -> bool {
        b == self.backend && t >= self.from - 1.0 && t < self.to
    }
}

/// Calls per backend among a set of calls.
#[derive(Debug, Clone, Default)]
pub struct Shares {
    pub counts: BTreeMap<SocketAddr, u64>,
    /// Successful calls counted.
    pub total: u64,
}

impl Shares {
    /// Counts the successful calls by the backend that completed them.
    pub fn of<'a>(calls: impl IntoIterator<Item = &'a CallRecord>) -> Self {
        let mut s = Shares::default();
        for c in calls {
            if let (true, Some(b)) = (c.ok, c.backend) {
                *s.counts.entry(b).or_default() += 1;
                s.total += 1;
            }
        }
        s
    }

    pub fn calls(&self, b: SocketAddr) -> u64 {
        self.counts.get(&b).copied().unwrap_or(0)
    }

    /// 0..=100.
    pub fn percent(&self, b: SocketAddr) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.calls(b) as f64 * 100.0 / self.total as f64
        }
    }

    /// Each backend's share against its weight's share (percentage points), and no call
    /// at a backend that is not in `weights`.
    pub fn problems(&self, weights: &[(SocketAddr, u32)], tolerance_pp: f64) -> Vec<String> {
        let sum: u32 = weights.iter().map(|w| w.1).sum();
        let mut p = Vec::new();
        for &(b, w) in weights {
            let want = f64::from(w) * 100.0 / f64::from(sum.max(1));
            let got = self.percent(b);
            if (got - want).abs() > tolerance_pp {
                p.push(format!(
                    "{b} took {got:.1} % ({} of {}), its weight {w} is {want:.1} % ± {tolerance_pp:.1}",
                    self.calls(b),
                    self.total
                ));
            }
        }
        let known: BTreeSet<SocketAddr> = weights.iter().map(|w| w.0).collect();
        for (&b, &n) in &self.counts {
            if !known.contains(&b) {
                p.push(format!("{b} took {n} calls but should take none"));
            }
        }
        p
    }

    /// A problem unless there were calls and `b` took them all (`when`: which calls).
    pub fn all_at(&self, b: SocketAddr, when: &str) -> Option<String> {
        (self.total == 0 || self.calls(b) != self.total).then(|| {
            format!(
                "{when}, {b} took {} of {} calls, not all",
                self.calls(b),
                self.total
            )
        })
    }

    /// A table of calls, shares and expected shares.
    pub fn render(&self, weights: &[(SocketAddr, u32)]) -> String {
        let sum: u32 = weights.iter().map(|w| w.1).sum();
        let mut all: BTreeSet<SocketAddr> = self.counts.keys().copied().collect();
        all.extend(weights.iter().map(|w| w.0));
        let mut s = format!(
            "    {:<22} {:>6} {:>9} {:>7} {:>8}\n",
            "backend", "weight", "expected", "calls", "share"
        );
        for b in all {
            let w = weights.iter().find(|x| x.0 == b).map_or(0, |x| x.1);
            let _ = writeln!(
                s,
                "    {:<22} {:>6} {:>7.1} % {:>7} {:>6.1} %",
                b.to_string(),
                w,
                f64::from(w) * 100.0 / f64::from(sum.max(1)),
                self.calls(b),
                self.percent(b)
            );
        }
        let _ = write!(
            s,
            "    {:<22} {:>6} {:>9} {:>7}",
            "total", "", "", self.total
        );
        s
    }
}

/// Allowed distance of a share from its weight's share for `n` calls, in points: 4, or
/// four standard deviations of the worst case (p = 1/2) when `n` is small.
pub fn tolerance_pp(n: u64) -> f64 {
    (200.0 / (n.max(1) as f64).sqrt()).max(4.0)
}

/// Keeps the run directory only if the test failed: call at the end of a passing test.
pub fn remove_logs(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// Calls per second of [`place_calls`]: SIPp on 2 cores keeps this without
/// retransmissions.
pub const CALL_RATE: u32 = 200;

/// Builds the bed of test `name` under `workdir` (RFC 2782's five targets unless
/// `configure` changes the configuration). Fails the test when the bed cannot be built.
pub fn test_bed(
    workdir: PathBuf,
    name: &str,
    configure: impl FnOnce(&mut BedConfig),
) -> ControllerBed {
    preflight::require_dns().expect("preflight");
    let binary = dispatcher::binary_path().expect("sip-dispatch binary");
    let mut cfg = BedConfig::new(name, binary, workdir);
    configure(&mut cfg);
    ControllerBed::build(cfg).unwrap_or_else(|e| panic!("{name}: building the bed: {e:#}"))
}

/// Starts `calls` calls at [`CALL_RATE`] and lets them flow for `lead` before the test
/// acts; returns when the calls started, and the UAC.
pub fn place_calls(bed: &ControllerBed, calls: u32, lead: Duration) -> (Moment, Uac) {
    let started = Moment::now();
    let mut uac = bed.start_calls(calls, CALL_RATE, "uac").expect("UAC");
    uac.run_for(lead).expect("calls flowing");
    (started, uac)
}

/// `v` sorted.
pub fn sorted(mut v: Vec<SocketAddr>) -> Vec<SocketAddr> {
    v.sort();
    v
}

/// Waits for a table of `priority` made of exactly `members`.
pub fn wait_for_set(
    log: &DaemonLog,
    from: usize,
    timeout: Duration,
    priority: u16,
    members: &[SocketAddr],
) -> Timed<TableEvent> {
    let want = sorted(members.to_vec());
    log.wait_table(
        from,
        timeout,
        &format!("a priority-{priority} table of {want:?}"),
        |t| t.priority == Some(u32::from(priority)) && t.addresses() == want,
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Fails the test with everything needed to understand a failed check; removes the
/// logs of a passing one.
pub fn verdict(name: &str, out: &Outcome, since: &Moment, problems: Vec<String>) {
    if !problems.is_empty() {
        panic!(
            "{name}:\n  - {}\ntables (relative to the start of the calls):\n{}{}\nlogs: {}",
            problems.join("\n  - "),
            out.table_history(since.at),
            out.failure_breakdown(),
            out.dir.display()
        );
    }
    remove_logs(&out.dir);
}

/// Prints a measured number of test `name` (seen with `--nocapture`).
pub fn report(name: &str, line: String) {
    eprintln!("[{name}] {line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_tolerance() {
        let a: SocketAddr = "198.18.0.21:5060".parse().unwrap();
        let b: SocketAddr = "198.18.0.22:5060".parse().unwrap();
        let c: SocketAddr = "198.18.0.23:5060".parse().unwrap();
        let call = |backend, ok| CallRecord {
            id: String::new(),
            invite_at: 0.0,
            ok,
            backend: Some(backend),
            hash: 0,
        };
        let calls: Vec<CallRecord> = (0..75)
            .map(|_| call(a, true))
            .chain((0..25).map(|_| call(b, true)))
            .chain([call(c, false)])
            .collect();
        let s = Shares::of(&calls);
        assert_eq!(s.total, 100);
        assert_eq!(s.percent(a), 75.0);
        assert!(s.problems(&[(a, 3), (b, 1)], 4.0).is_empty());
        assert_eq!(s.problems(&[(a, 1), (b, 1)], 4.0).len(), 2);
        assert_eq!(s.problems(&[(a, 3)], 4.0).len(), 2, "b is not expected");
        assert!(s.render(&[(a, 3), (b, 1)]).contains("75.0 %"));
        assert_eq!(tolerance_pp(10_000), 4.0);
        assert!((tolerance_pp(1600) - 5.0).abs() < 1e-9);
    }

    #[test]
    fn rebuilt_tables_route_like_the_common_crate() {
        let a: SocketAddr = "198.18.0.21:5060".parse().unwrap();
        let b: SocketAddr = "198.18.0.22:5060".parse().unwrap();
        let event = |backends: Vec<(SocketAddr, u32)>| Timed {
            index: 0,
            at: Instant::now(),
            wall: std::time::SystemTime::now(),
            event: TableEvent {
                vip: "198.18.0.100:5060".parse().unwrap(),
                generation: 1,
                priority: Some(10),
                backends,
            },
        };
        let t = TableAt::new(event(vec![(a, 3), (b, 1)])).unwrap();
        let shares = t.table.shares();
        assert!((shares[0] - 0.75).abs() < 0.01, "{shares:?}");
        let h = call_id_hash(HashKey::DEFAULT, b"1-sdt@198.18.0.10");
        assert!(t.route(h).is_some());
        // All weights 0: they share equally.
        let z = TableAt::new(event(vec![(a, 0), (b, 0)])).unwrap();
        assert!((z.table.shares()[0] - 0.5).abs() < 0.01);
        let none = TableAt::new(event(vec![])).unwrap();
        assert_eq!(none.route(h), None);
    }
}
