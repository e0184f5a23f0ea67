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

/// Parses a `-trace_shortmsg` log: `date \t time \t epoch \t S|R \t Call-ID \t CSeq:N METHOD
/// \t first line`, and collects the requests received (`R`) per Call-ID.
pub fn parse_short_messages(text: &str) -> BTreeMap<String, CallMessages> {
    let mut calls: BTreeMap<String, CallMessages> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 7 || f[3] != "R" || f[6].starts_with("SIP/2.0") {
            continue;
        }
        let method = f[5].split_whitespace().last().unwrap_or_default();
        let entry = calls.entry(f[4].to_owned()).or_default();
        match method {
            "INVITE" => entry.invite = true,
            "ACK" => entry.ack = true,
            "BYE" => entry.bye = true,
            "OPTIONS" => entry.options = true,
            _ => entry.other = true,
        }
    }
    calls
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
        crate::topology::check_test_address(ip)?;
        let logs = TraceFiles::new(dir, label);
        let mut args: Vec<String> = vec![
            "-sn".into(),
            "uas".into(),
            "-aa".into(),
            "-i".into(),
            ip.to_string(),
            "-p".into(),
            SIP_PORT.to_string(),
            "-bind_local".into(),
            "-nostdin".into(),
            "-timeout".into(),
            format!("{}s", bound.as_secs().max(1)),
        ];
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
        let text = std::fs::read_to_string(&self.messages_path)
            .with_context(|| format!("reading {}", self.messages_path.display()))?;
        let mut report = UasReport {
            address: self.address,
            calls: BTreeSet::new(),
            incomplete: BTreeMap::new(),
            health_checks: 0,
            stat: StatRow::read(&self.stat_path)?,
            exit_code: stopped.status.code(),
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
    /// Call-ID pattern (`-cid_str`; `%u` call number, `%s` local address, `%p` PID).
    /// The default has no PID, so every run places the same Call-IDs and the per-backend
    /// shares of a run are reproducible (no statistical flakiness in the tests).
    pub call_id: String,
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
            call_id: CALL_ID_PATTERN.to_owned(),
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
    ]);
    args.extend(logs.args());
    let started = Instant::now();
    let mut process = Process::spawn(ns, "sipp", &args, dir, label)?;
    let limit = spec.bound + Duration::from_secs(10);
    let stopped = match process.wait_timeout(limit) {
        Ok(Some(_)) => process.collect()?,
        Ok(None) => {
            let _ = process.stop();
            bail!(
                "UAC did not finish within {limit:?} (`{}`)",
                process.command_line()
            );
        }
        Err(e) => {
            let _ = process.stop();
            return Err(e);
        }
    };
    let elapsed = started.elapsed();
    let code = stopped.status.code();
    if matches!(code, Some(254 | 255) | None) {
        bail!(
            "UAC failed to run ({}): `{}`; stderr:\n{}\nstdout tail:\n{}",
            stopped.status,
            process.command_line(),
            process.stderr_tail(20),
            tail(&stopped.stdout, 20)
        );
    }
    let stat = StatRow::read(&logs.stat)?;
    Ok(UacReport {
        exit_code: code,
        successful: stat.require("SuccessfulCall(C)")?,
        failed: stat.require("FailedCall(C)")?,
        created: stat.require("OutgoingCall(C)")?,
        retransmissions: stat.get("Retransmissions(C)").unwrap_or(0),
        stat,
        elapsed,
        dir: dir.to_owned(),
        label: label.to_owned(),
    })
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
