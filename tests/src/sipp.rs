//! Driving SIPp 3.6: UAS backends (`-sn uas -aa`) and a UAC (`-sn uac`), and reading back
//! exact counts.
//!
//! How counting works (verified against SIPp 3.6.1 on this testbed):
//! - UAC: `-trace_stat -stf FILE -fd 1` writes a `;`-separated CSV; its last line, written
//!   when SIPp exits (at `-m` calls, or at `-timeout`), holds the cumulative counters
//!   `SuccessfulCall(C)` and `FailedCall(C)`. The exit code is 0 when every call succeeded,
//!   1 when at least one failed (97/99/255/254: internal exit, no call, fatal, bind error).
//! - UAS: its `SuccessfulCall(C)` is not usable as a per-backend count: the built-in `uas`
//!   scenario ends with a 4 s pause, so a call counts as successful only 4 s after its BYE,
//!   and an OPTIONS (a health check, answered 200 by `-aa`) creates an "incoming call" that
//!   waits for an INVITE forever (so SIGUSR1, which waits for running calls, never
//!   finishes). Instead the UAS runs with `-trace_shortmsg`, one line per SIP message with
//!   its Call-ID and CSeq; SIGTERM makes SIPp flush it (and a last stat line) and exit 0.
//!   A call counts for a UAS when the INVITE, the ACK and the BYE of one Call-ID all
//!   reached it; Call-IDs that only carried OPTIONS are health checks, not calls; any other
//!   mix is an incomplete (misrouted or lost) call.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cancel,
    process::{self, Process},
};

/// The SIP port of the backends and of the VIP.
pub const SIP_PORT: u16 = 5060;

/// `198.18.0.21:5060` or `[2001:db8::21]:5060`, the way SIPp wants a remote address.
pub fn host_port(addr: SocketAddr) -> String {
    addr.to_string()
}

/// The final row of a SIPp `-trace_stat` CSV: counter name → value.
#[derive(Debug, Clone, Default)]
pub struct StatRow {
    pub fields: BTreeMap<String, String>,
}

impl StatRow {
    /// Parses the header and the last data line of a stat file.
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header = lines.next().context("empty SIPp stat file")?;
        let last = lines
            .next_back()
            .context("SIPp stat file has no data line")?;
        let fields = header
            .split(';')
            .zip(last.split(';'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Ok(StatRow { fields })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// An integer counter such as `SuccessfulCall(C)`.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.fields.get(name)?.parse().ok()
    }

    fn require(&self, name: &str) -> Result<u64> {
        self.get(name)
            .with_context(|| format!("SIPp stat file has no integer column {name:?}"))
    }
}

/// Requests received for one Call-ID, as logged by `-trace_shortmsg`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallMessages {
    pub invite: bool,
    pub ack: bool,
    pub bye: bool,
    pub options: bool,
    pub other: bool,
}

impl CallMessages {
    pub fn complete(&self) -> bool {
        self.invite && self.ack && self.bye && !self.other
    }
    pub fn health_check(&self) -> bool {
        self.options && !(self.invite || self.ack || self.bye || self.other)
    }
}

/// One line of SIPp's `-trace_shortmsg` log: `date \t time \t epoch \t S|R \t Call-ID \t
/// CSeq:N METHOD \t first line`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShortMessage<'a> {
    /// Seconds since the Unix epoch; `None` if the field does not parse.
    pub at: Option<f64>,
    /// `S` (sent) or `R` (received).
    pub direction: &'a str,
    pub call_id: &'a str,
    /// The CSeq field as logged (`CSeq:N METHOD`).
    pub cseq: &'a str,
    /// The request or status line.
    pub first_line: &'a str,
}

impl<'a> ShortMessage<'a> {
    /// `None` for a line with fewer than seven fields.
    pub fn parse(line: &'a str) -> Option<ShortMessage<'a>> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 7 {
            return None;
        }
        Some(ShortMessage {
            at: f[2].parse().ok(),
            direction: f[3],
            call_id: f[4],
            cseq: f[5],
            first_line: f[6],
        })
    }

    pub fn sent(&self) -> bool {
        self.direction == "S"
    }

    pub fn received(&self) -> bool {
        self.direction == "R"
    }

    pub fn is_response(&self) -> bool {
        self.first_line.starts_with("SIP/2.0")
    }

    /// The CSeq's method (`INVITE`, `BYE`, ...), `""` if the field is empty.
    pub fn cseq_method(&self) -> &'a str {
        self.cseq.split_whitespace().last().unwrap_or_default()
    }
}

/// The lines of a `-trace_shortmsg` log that have every field.
pub fn short_messages(text: &str) -> impl Iterator<Item = ShortMessage<'_>> {
    text.lines().filter_map(ShortMessage::parse)
}

/// Parses a `-trace_shortmsg` log: `date \t time \t epoch \t S|R \t Call-ID \t CSeq:N METHOD
/// \t first line`, and collects the requests received (`R`) per Call-ID.
pub fn parse_short_messages(text: &str) -> BTreeMap<String, CallMessages> {
    let mut calls: BTreeMap<String, CallMessages> = BTreeMap::new();
    for m in short_messages(text) {
        if !m.received() || m.is_response() {
            continue;
        }
        let entry = calls.entry(m.call_id.to_owned()).or_default();
        match m.cseq_method() {
            "INVITE" => entry.invite = true,
            "ACK" => entry.ack = true,
            "BYE" => entry.bye = true,
            "OPTIONS" => entry.options = true,
            _ => entry.other = true,
        }
    }
    calls
}

/// One call as the UAC saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UacCall {
    /// When the UAC first sent the INVITE, in seconds since the Unix epoch.
    pub invite_at: f64,
    /// Whether the BYE was answered 200 (the built-in `uac` scenario then succeeded).
    pub ok: bool,
}

/// Parses the UAC's `-trace_shortmsg` log: per Call-ID, when the first INVITE went out
/// and whether a 200 to the BYE came back.
pub fn parse_uac_calls(text: &str) -> BTreeMap<String, UacCall> {
    let mut calls: BTreeMap<String, UacCall> = BTreeMap::new();
    for m in short_messages(text) {
        let Some(at) = m.at else {
            continue;
        };
        let entry = calls.entry(m.call_id.to_owned()).or_insert(UacCall {
            invite_at: f64::INFINITY,
            ok: false,
        });
        if m.sent() && m.first_line.starts_with("INVITE ") {
            entry.invite_at = entry.invite_at.min(at);
        } else if m.received()
            && m.cseq_method() == "BYE"
            && m.first_line.starts_with("SIP/2.0 200")
        {
            entry.ok = true;
        }
    }
    calls.retain(|_, c| c.invite_at.is_finite());
    calls
}

/// When the UAC first sent the INVITE and the BYE of one call (seconds since the Unix
/// epoch), to tell which calls were in progress at a given moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UacDialog {
    pub invite_at: f64,
    /// `None` if the UAC never sent a BYE (the call failed before).
    pub bye_at: Option<f64>,
}

impl UacDialog {
    /// Whether the call had begun (its INVITE sent) before `t` and not yet ended (its BYE
    /// not sent, or sent after `t`).
    pub fn in_progress_at(&self, t: f64) -> bool {
        self.invite_at < t && self.bye_at.is_none_or(|bye| bye > t)
    }
}

/// Parses the UAC's `-trace_shortmsg` log: per Call-ID, the first INVITE and the first
/// BYE it sent.
pub fn parse_uac_dialogs(text: &str) -> BTreeMap<String, UacDialog> {
    let mut dialogs: BTreeMap<String, UacDialog> = BTreeMap::new();
    for m in short_messages(text) {
        let (true, Some(at)) = (m.sent(), m.at) else {
            continue;
        };
        let entry = dialogs.entry(m.call_id.to_owned()).or_insert(UacDialog {
            invite_at: f64::INFINITY,
            bye_at: None,
        });
        if m.first_line.starts_with("INVITE ") {
            entry.invite_at = entry.invite_at.min(at);
        } else if m.first_line.starts_with("BYE ") {
            entry.bye_at = Some(entry.bye_at.map_or(at, |b| b.min(at)));
        }
    }
    dialogs.retain(|_, d| d.invite_at.is_finite());
    dialogs
}

/// One request a UAS received, from its `-trace_shortmsg` log.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub call_id: String,
    /// `INVITE`, `ACK`, `BYE`, `OPTIONS`, ...
    pub method: String,
}

/// The requests (not responses) received, in log order.
pub fn parse_received_requests(text: &str) -> Vec<Received> {
    short_messages(text)
        .filter(|m| m.received() && !m.is_response())
        .filter_map(|m| {
            Some(Received {
                at: m.at?,
                call_id: m.call_id.to_owned(),
                method: m.cseq.split_whitespace().last()?.to_owned(),
            })
        })
        .collect()
}

/// What one UAS saw.
#[derive(Debug, Clone)]
pub struct UasReport {
    pub address: SocketAddr,
    /// Call-IDs whose INVITE, ACK and BYE all reached this UAS.
    pub calls: BTreeSet<String>,
    /// Call-IDs with some but not all of INVITE/ACK/BYE (or other requests).
    pub incomplete: BTreeMap<String, CallMessages>,
    /// Call-IDs that carried only OPTIONS (health checks).
    pub health_checks: u64,
    /// SIPp's own final counters (informational: see the module documentation).
    pub stat: StatRow,
    pub exit_code: Option<i32>,
    /// Its `-trace_shortmsg` log (see [`UasReport::received`]).
    pub messages: PathBuf,
}

impl UasReport {
    /// Every request it received, with its time (see [`parse_received_requests`]).
    pub fn received(&self) -> Result<Vec<Received>> {
        let text = std::fs::read_to_string(&self.messages)
            .with_context(|| format!("reading {}", self.messages.display()))?;
        Ok(parse_received_requests(&text))
    }
}

/// Per Call-ID: the backends whose UAS logged any request of it (its INVITE, ACK or BYE).
pub fn backends_by_call(reports: &[UasReport]) -> BTreeMap<String, BTreeSet<SocketAddr>> {
    let mut by: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
    for r in reports {
        for id in r.calls.iter().chain(r.incomplete.keys()) {
            by.entry(id.clone()).or_default().insert(r.address);
        }
    }
    by
}

/// Every call of the UAC completed at exactly one backend (INVITE, ACK and BYE there)
/// and nowhere else; returns the problems.
pub fn exactly_one_backend(uac: &BTreeMap<String, UacCall>, reports: &[UasReport]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut complete: BTreeMap<&str, u32> = BTreeMap::new();
    for r in reports {
        for id in &r.calls {
            *complete.entry(id).or_default() += 1;
        }
    }
    let by = backends_by_call(reports);
    let mut bad = Vec::new();
    for id in uac.keys() {
        let ok = complete.get(id.as_str()) == Some(&1) && by.get(id).is_some_and(|s| s.len() == 1);
        if !ok {
            bad.push((id.clone(), by.get(id).cloned().unwrap_or_default()));
        }
    }
    if !bad.is_empty() {
        problems.push(format!(
            "{} of {} calls did not complete at exactly one backend, e.g. {:?}",
            bad.len(),
            uac.len(),
            &bad[..bad.len().min(3)]
        ));
    }
    problems
}

/// The files a SIPp run writes: statistics (a CSV line a second and one at exit), one
/// line per SIP message, and errors.
struct TraceFiles {
    stat: PathBuf,
    messages: PathBuf,
    errors: PathBuf,
}

impl TraceFiles {
    fn new(dir: &Path, label: &str) -> TraceFiles {
        TraceFiles {
            stat: dir.join(format!("{label}.stat.csv")),
            messages: dir.join(format!("{label}.messages.log")),
            errors: dir.join(format!("{label}.errors.log")),
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "-trace_stat".into(),
            "-stf".into(),
            path_arg(&self.stat),
            "-fd".into(),
            "1".into(),
            "-trace_shortmsg".into(),
            "-shortmessage_file".into(),
            path_arg(&self.messages),
            "-trace_err".into(),
            "-error_file".into(),
            path_arg(&self.errors),
        ]
    }
}

/// A SIPp UAS (`-sn uas -aa`) running in a namespace.
pub struct Uas {
    pub address: SocketAddr,
    process: Process,
    stat_path: PathBuf,
    messages_path: PathBuf,
}

impl Uas {
    /// Starts the UAS on `ip`:5060 in namespace `ns` and waits until its socket is bound.
    /// It quits by itself after `bound` at the latest.
    pub fn start(ns: &str, ip: IpAddr, dir: &Path, label: &str, bound: Duration) -> Result<Self> {
        Self::start_with(ns, ip, dir, label, bound, &["-sn", "uas", "-aa"])
    }

    /// Like [`Uas::start`], but runs the server scenario file `scenario` (`-sf`), e.g. a
    /// backend that answers OPTIONS oddly.
    pub fn start_scenario(
        ns: &str,
        ip: IpAddr,
        dir: &Path,
        label: &str,
        bound: Duration,
        scenario: &Path,
    ) -> Result<Self> {
        let scenario = path_arg(scenario);
        Self::start_with(ns, ip, dir, label, bound, &["-sf", &scenario])
    }

    fn start_with(
        ns: &str,
        ip: IpAddr,
        dir: &Path,
        label: &str,
        bound: Duration,
        scenario: &[&str],
    ) -> Result<Self> {
        crate::topology::check_test_address(ip)?;
        let logs = TraceFiles::new(dir, label);
        let mut args: Vec<String> = scenario.iter().map(|a| a.to_string()).collect();
        args.extend([
            "-i".into(),
            ip.to_string(),
            "-p".into(),
            SIP_PORT.to_string(),
            "-bind_local".into(),
            "-nostdin".into(),
            "-timeout".into(),
            format!("{}s", bound.as_secs().max(1)),
        ]);
        args.extend(logs.args());
        let mut process = Process::spawn(ns, "sipp", &args, dir, label)?;
        process::wait_udp_bound(&mut process, ip, SIP_PORT, Duration::from_secs(10))?;
        Ok(Uas {
            address: SocketAddr::new(ip, SIP_PORT),
            process,
            stat_path: logs.stat,
            messages_path: logs.messages,
        })
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// The first lines of the requests this UAS received so far (from its
    /// `-trace_shortmsg` log), e.g. `OPTIONS sip:ping@198.18.0.21:5060 SIP/2.0`.
    pub fn received_request_lines(&self) -> Result<Vec<String>> {
        let text = std::fs::read_to_string(&self.messages_path)
            .with_context(|| format!("reading {}", self.messages_path.display()))?;
        Ok(text
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                (f.len() >= 7 && f[3] == "R" && !f[6].starts_with("SIP/2.0"))
                    .then(|| f[6].trim().to_owned())
            })
            .collect())
    }

    /// Stops the UAS (SIGTERM: SIPp writes its last stat line and flushes its message log)
    /// and counts what reached it.
    pub fn stop(mut self) -> Result<UasReport> {
        let stopped = self.process.stop()?;
        if stopped.killed {
            bail!(
                "UAS {} ignored SIGTERM and was killed: its logs may be incomplete",
                self.address
            );
        }
        self.report(StatRow::read(&self.stat_path)?, stopped.status.code())
    }

    /// Kills the UAS with SIGKILL, like a crash: its socket closes at once (so probes
    /// get ICMP port unreachable). SIPp writes its message log line by line, so the
    /// report still counts what reached it before; its stat file may lack the last line.
    pub fn kill(mut self) -> Result<UasReport> {
        self.process.signal(libc::SIGKILL)?;
        let status = self
            .process
            .wait_timeout(Duration::from_secs(5))?
            .with_context(|| format!("UAS {} survived SIGKILL", self.address))?;
        let stat = StatRow::read(&self.stat_path).unwrap_or_default();
        self.report(stat, status.code())
    }

    fn report(&self, stat: StatRow, exit_code: Option<i32>) -> Result<UasReport> {
        let text = std::fs::read_to_string(&self.messages_path)
            .with_context(|| format!("reading {}", self.messages_path.display()))?;
        let mut report = UasReport {
            address: self.address,
            calls: BTreeSet::new(),
            incomplete: BTreeMap::new(),
            health_checks: 0,
            stat,
            exit_code,
            messages: self.messages_path.clone(),
        };
        for (call_id, msgs) in parse_short_messages(&text) {
            if msgs.complete() {
                report.calls.insert(call_id);
            } else if msgs.health_check() {
                report.health_checks += 1;
            } else {
                report.incomplete.insert(call_id, msgs);
            }
        }
        Ok(report)
    }
}

/// What to run as the UAC.
#[derive(Debug, Clone)]
pub struct UacSpec {
    /// Built-in scenario (`-sn`) or scenario file (`-sf`).
    pub scenario: Scenario,
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub target: SocketAddr,
    /// Total calls (`-m`).
    pub calls: u32,
    /// Calls per second (`-r`).
    pub rate: u32,
    /// SIPp's global timeout (`-timeout`, with `-timeout_error`); the harness kills it a
    /// little after that.
    pub bound: Duration,
    /// How long a call waits for an expected message before it fails (`-recv_timeout`).
    /// Without it a call whose backend died between its 180 and its 200 would wait for
    /// the 200 until the global timeout (a provisional response stops the INVITE
    /// retransmissions).
    pub recv_timeout: Duration,
    /// Call-ID pattern (`-cid_str`; `%u` call number, `%s` local address, `%p` PID).
    /// The default has no PID, so every run places the same Call-IDs and the per-backend
    /// shares of a run are reproducible (no statistical flakiness in the tests).
    pub call_id: String,
    /// Further SIPp arguments, appended as given (e.g. `-d` call length, `-t un`).
    pub extra: Vec<String>,
}

/// Call-IDs `<n>-sdt@<client address>`: reproducible from run to run.
pub const CALL_ID_PATTERN: &str = "%u-sdt@%s";

#[derive(Debug, Clone)]
pub enum Scenario {
    BuiltIn(&'static str),
    File(PathBuf),
}

impl UacSpec {
    /// The built-in `uac` scenario, with a time bound derived from calls and rate.
    pub fn calls(local_ip: IpAddr, target: SocketAddr, calls: u32, rate: u32) -> Self {
        let rate = rate.max(1);
        UacSpec {
            scenario: Scenario::BuiltIn("uac"),
            local_ip,
            local_port: 5070,
            target,
            calls,
            rate,
            bound: Duration::from_secs(u64::from(calls.div_ceil(rate)) + 20),
            recv_timeout: Duration::from_secs(10),
            call_id: CALL_ID_PATTERN.to_owned(),
            extra: Vec::new(),
        }
    }
}

/// What the UAC reported.
#[derive(Debug, Clone)]
pub struct UacReport {
    pub exit_code: Option<i32>,
    pub successful: u64,
    pub failed: u64,
    /// `OutgoingCall(C)`: calls started.
    pub created: u64,
    pub retransmissions: u64,
    pub stat: StatRow,
    pub elapsed: Duration,
    pub dir: PathBuf,
    pub label: String,
    /// Its `-trace_shortmsg` log (see [`parse_uac_calls`]).
    pub messages: PathBuf,
}

impl UacReport {
    /// Every call, from the message log.
    pub fn calls(&self) -> Result<BTreeMap<String, UacCall>> {
        let text = std::fs::read_to_string(&self.messages)
            .with_context(|| format!("reading {}", self.messages.display()))?;
        Ok(parse_uac_calls(&text))
    }

    /// When each call's INVITE and BYE were sent, from the message log.
    pub fn dialogs(&self) -> Result<BTreeMap<String, UacDialog>> {
        let text = std::fs::read_to_string(&self.messages)
            .with_context(|| format!("reading {}", self.messages.display()))?;
        Ok(parse_uac_dialogs(&text))
    }
}

impl UacReport {
    /// A one-line description of the failures (for assertion messages).
    pub fn failure_summary(&self) -> String {
        let cols = [
            "FailedMaxUDPRetrans(C)",
            "FailedUnexpectedMessage(C)",
            "FailedCannotSendMessage(C)",
            "FailedTimeoutOnRecv(C)",
            "FailedCallRejected(C)",
            "OutOfCallMsgs(C)",
            "DeadCallMsgs(C)",
            "Retransmissions(C)",
        ];
        let mut s = format!(
            "exit code {:?}, {} successful, {} failed of {} created",
            self.exit_code, self.successful, self.failed, self.created
        );
        for c in cols {
            if let Some(v) = self.stat.get(c).filter(|&v| v > 0) {
                s.push_str(&format!(", {c}={v}"));
            }
        }
        s.push_str(&format!(" (logs: {}/{}.*)", self.dir.display(), self.label));
        s
    }
}

/// Runs the UAC in namespace `ns` to completion (bounded by `spec.bound` plus a margin,
/// after which it is stopped) and reads its counters.
pub fn run_uac(ns: &str, spec: &UacSpec, dir: &Path, label: &str) -> Result<UacReport> {
    Uac::start(ns, spec, dir, label)?.finish()
}

/// A UAC running in the background (calls placed while the test changes things).
pub struct Uac {
    process: Process,
    spec: UacSpec,
    logs: TraceFiles,
    started: Instant,
    dir: PathBuf,
    label: String,
}

impl Uac {
    /// Starts the UAC in namespace `ns`; it places its calls while the caller goes on.
    pub fn start(ns: &str, spec: &UacSpec, dir: &Path, label: &str) -> Result<Uac> {
        crate::topology::check_test_address(spec.target.ip())?;
        crate::topology::check_test_address(spec.local_ip)?;
        let logs = TraceFiles::new(dir, label);
        let mut args: Vec<String> = match &spec.scenario {
            Scenario::BuiltIn(name) => vec!["-sn".into(), (*name).into()],
            Scenario::File(path) => vec!["-sf".into(), path_arg(path)],
        };
        args.extend([
            host_port(spec.target),
            "-i".into(),
            spec.local_ip.to_string(),
            "-p".into(),
            spec.local_port.to_string(),
            "-bind_local".into(),
            "-nostdin".into(),
            "-cid_str".into(),
            spec.call_id.clone(),
            "-m".into(),
            spec.calls.to_string(),
            "-r".into(),
            spec.rate.to_string(),
            "-timeout".into(),
            format!("{}s", spec.bound.as_secs().max(1)),
            "-timeout_error".into(),
            "-recv_timeout".into(),
            spec.recv_timeout.as_millis().to_string(),
        ]);
        args.extend(spec.extra.iter().cloned());
        args.extend(logs.args());
        let started = Instant::now();
        let process = Process::spawn(ns, "sipp", &args, dir, label)?;
        Ok(Uac {
            process,
            spec: spec.clone(),
            logs,
            started,
            dir: dir.to_owned(),
            label: label.to_owned(),
        })
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Fails if the UAC has already ended (it should still be placing calls).
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.process.try_wait()? {
            bail!(
                "the UAC ended early ({status}) after {:.1} s; stderr:\n{}",
                self.started.elapsed().as_secs_f64(),
                self.process.stderr_tail(20)
            );
        }
        Ok(())
    }

    /// Lets calls flow for `d` (a load phase of the test, not a synchronisation), failing
    /// early if the UAC ends or on cancellation.
    pub fn run_for(&mut self, d: Duration) -> Result<()> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.check_running()?;
            cancel::check()?;
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
        }
        self.check_running()
    }

    /// Waits for the UAC to finish (bounded by its `-timeout` plus a margin, after which
    /// it is stopped) and reads its counters.
    pub fn finish(mut self) -> Result<UacReport> {
        let limit = self.spec.bound + Duration::from_secs(10);
        let remaining = limit.saturating_sub(self.started.elapsed());
        let stopped = match self.process.wait_timeout(remaining) {
            Ok(Some(_)) => self.process.collect()?,
            Ok(None) => {
                let _ = self.process.stop();
                bail!(
                    "UAC did not finish within {limit:?} (`{}`)",
                    self.process.command_line()
                );
            }
            Err(e) => {
                let _ = self.process.stop();
                return Err(e);
            }
        };
        let elapsed = self.started.elapsed();
        let code = stopped.status.code();
        if matches!(code, Some(254 | 255) | None) {
            bail!(
                "UAC failed to run ({}): `{}`; stderr:\n{}\nstdout tail:\n{}",
                stopped.status,
                self.process.command_line(),
                self.process.stderr_tail(20),
                tail(&stopped.stdout, 20)
            );
        }
        let stat = StatRow::read(&self.logs.stat)?;
        Ok(UacReport {
            exit_code: code,
            successful: stat.require("SuccessfulCall(C)")?,
            failed: stat.require("FailedCall(C)")?,
            created: stat.require("OutgoingCall(C)")?,
            retransmissions: stat.get("Retransmissions(C)").unwrap_or(0),
            stat,
            elapsed,
            dir: self.dir,
            label: self.label,
            messages: self.logs.messages,
        })
    }
}

/// A scenario that sends one OPTIONS per "call" and expects 200, like a dispatcher's health
/// check; written to `dir/options.xml`.
pub fn write_options_scenario(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("options.xml");
    std::fs::write(&path, OPTIONS_XML).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

const OPTIONS_XML: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="OPTIONS health check">
  <send retrans="500">
    <![CDATA[

      OPTIONS sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:health@[local_ip]:[local_port]>;tag=[pid]hc[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 OPTIONS
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
</scenario>
"#;

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Fails unless `sipp` can be run.
pub fn check_installed() -> Result<()> {
    cancel::check()?;
    let out = std::process::Command::new("sipp").arg("-v").output();
    match out {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("SIPp v") => Ok(()),
        Ok(o) => bail!(
            "`sipp -v` printed no version: {}",
            String::from_utf8_lossy(&o.stdout)
        ),
        Err(e) => {
            bail!("SIPp is not installed (`sipp`: {e}); run `cargo xtask test` to install it")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: &str = "2026-11-22\t01:00:13.686811\t1795309213.686811\tR\thc-0@198.18.0.10\tCSeq:1 OPTIONS\tOPTIONS sip:198.18.0.21:5060 SIP/2.0
2026-11-22\t01:00:13.687244\t1795309213.687244\tS\thc-0@198.18.0.10\tCSeq:1 OPTIONS\tSIP/2.0 200 OK
2026-11-22\t01:00:13.710235\t1795309213.710235\tR\t1-5814@198.18.0.10\tCSeq:1 INVITE\tINVITE sip:service@198.18.0.21:5060 SIP/2.0
2026-11-22\t01:00:13.710235\t1795309213.710235\tS\t1-5814@198.18.0.10\tCSeq:1 INVITE\tSIP/2.0 180 Ringing
2026-11-22\t01:00:14.705769\t1795309214.705769\tR\t1-5814@198.18.0.10\tCSeq:1 ACK\tACK sip:service@198.18.0.21:5060 SIP/2.0
2026-11-22\t01:00:14.710160\t1795309214.710160\tR\t1-5814@198.18.0.10\tCSeq:2 BYE\tBYE sip:service@198.18.0.21:5060 SIP/2.0
2026-11-22\t01:00:14.710160\t1795309214.710160\tR\t2-5814@198.18.0.10\tCSeq:2 BYE\tBYE sip:service@198.18.0.21:5060 SIP/2.0
";

    #[test]
    fn short_messages_classify_calls() {
        let calls = parse_short_messages(SHORT);
        assert_eq!(calls.len(), 3);
        assert!(calls["1-5814@198.18.0.10"].complete());
        assert!(calls["hc-0@198.18.0.10"].health_check());
        let lone_bye = calls["2-5814@198.18.0.10"];
        assert!(!lone_bye.complete() && !lone_bye.health_check());
    }

    const UAC_SHORT: &str = "2026-11-22\t01:33:32.478398\t1795311212.478398\tS\t1-sdt@198.18.0.10\tCSeq:1 INVITE\tINVITE sip:service@198.18.0.21:5060 SIP/2.0
2026-11-22\t01:33:32.478469\t1795311212.478469\tR\t1-sdt@198.18.0.10\tCSeq:1 INVITE\tSIP/2.0 180 Ringing
2026-11-22\t01:33:32.479571\t1795311212.479571\tR\t1-sdt@198.18.0.10\tCSeq:1 INVITE\tSIP/2.0 200 OK
2026-11-22\t01:33:32.479604\t1795311212.479604\tS\t1-sdt@198.18.0.10\tCSeq:1 ACK\tACK sip:service@198.18.0.21:5060 SIP/2.0
2026-11-22\t01:33:32.486534\t1795311212.486534\tS\t1-sdt@198.18.0.10\tCSeq:2 BYE\tBYE sip:service@198.18.0.21:5060 SIP/2.0
2026-11-22\t01:33:32.486567\t1795311212.486567\tS\t2-sdt@198.18.0.10\tCSeq:1 INVITE\tINVITE sip:service@198.18.0.21:5060 SIP/2.0
2026-11-22\t01:33:32.486582\t1795311212.486582\tR\t1-sdt@198.18.0.10\tCSeq:2 BYE\tSIP/2.0 200 OK
2026-11-22\t01:33:32.986567\t1795311212.986567\tS\t2-sdt@198.18.0.10\tCSeq:1 INVITE\tINVITE sip:service@198.18.0.21:5060 SIP/2.0
";

    #[test]
    fn uac_calls_from_the_message_log() {
        let calls = parse_uac_calls(UAC_SHORT);
        assert_eq!(calls.len(), 2);
        let one = calls["1-sdt@198.18.0.10"];
        assert!(one.ok);
        assert!((one.invite_at - 1795311212.478398).abs() < 1e-6);
        // A retransmitted INVITE keeps the first send time; no 200 to a BYE: failed.
        let two = calls["2-sdt@198.18.0.10"];
        assert!(!two.ok);
        assert!((two.invite_at - 1795311212.486567).abs() < 1e-6);
    }

    #[test]
    fn uac_dialogs_from_the_message_log() {
        let d = parse_uac_dialogs(UAC_SHORT);
        assert_eq!(d.len(), 2);
        let one = d["1-sdt@198.18.0.10"];
        assert!((one.invite_at - 1795311212.478398).abs() < 1e-6);
        assert!((one.bye_at.unwrap() - 1795311212.486534).abs() < 1e-6);
        assert!(one.in_progress_at(1795311212.48));
        assert!(!one.in_progress_at(1795311212.47), "before its INVITE");
        assert!(!one.in_progress_at(1795311212.49), "after its BYE");
        // No BYE yet: in progress from its (first) INVITE on.
        let two = d["2-sdt@198.18.0.10"];
        assert_eq!(two.bye_at, None);
        assert!((two.invite_at - 1795311212.486567).abs() < 1e-6);
        assert!(two.in_progress_at(1795311299.0));
    }

    #[test]
    fn received_requests_with_times() {
        let r = parse_received_requests(SHORT);
        let methods: Vec<&str> = r.iter().map(|m| m.method.as_str()).collect();
        assert_eq!(methods, ["OPTIONS", "INVITE", "ACK", "BYE", "BYE"]);
        assert_eq!(r[1].call_id, "1-5814@198.18.0.10");
        assert!((r[3].at - 1795309214.71016).abs() < 1e-6);
    }

    #[test]
    fn stat_row_takes_last_line() {
        let text = "StartTime;SuccessfulCall(C);FailedCall(C);\n\
                    2026-11-22\t01:00:13;0;0;\n\
                    2026-11-22\t01:00:14;200;3;\n";
        let row = StatRow::parse(text).unwrap();
        assert_eq!(row.get("SuccessfulCall(C)"), Some(200));
        assert_eq!(row.get("FailedCall(C)"), Some(3));
        assert_eq!(row.get("Nope"), None);
        assert!(StatRow::parse("").is_err());
        assert!(StatRow::parse("A;B\n").is_err());
    }

    #[test]
    fn remote_addresses() {
        assert_eq!(
            host_port("[2001:db8::100]:5060".parse().unwrap()),
            "[2001:db8::100]:5060"
        );
        assert_eq!(
            host_port("198.18.0.100:5060".parse().unwrap()),
            "198.18.0.100:5060"
        );
    }
}
