//! End-to-end runs: build a topology, start the SIPp backends (and the dispatcher), place
//! calls with the SIPp UAC, stop everything in order and summarise who took which call.
//! Used by the integration tests and by `cargo xtask run`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    dispatcher::{self, BackendArg, Dispatcher, ExitStats, RunConfig, XdpMode},
    netns, preflight,
    sipp::{self, Scenario, UacReport, UacSpec, Uas, UasReport},
    topology::{Family, Topology, TopologySpec},
};

/// A dispatcher run.
#[derive(Debug, Clone)]
pub struct ScenarioConfig {
    pub family: Family,
    pub mode: XdpMode,
    /// One weight per backend (backend i gets address .2i / ::2i).
    pub weights: Vec<u32>,
    /// Calls the UAC places.
    pub calls: u32,
    /// Calls per second.
    pub rate: u32,
    /// The `sip-dispatch` binary.
    pub binary: PathBuf,
    /// Directory under which this run's logs go (a subdirectory per run).
    pub workdir: PathBuf,
    /// Print progress lines on stderr.
    pub verbose: bool,
}

impl ScenarioConfig {
    pub fn new(family: Family, mode: XdpMode, weights: &[u32], binary: PathBuf) -> Self {
        ScenarioConfig {
            family,
            mode,
            weights: weights.to_vec(),
            calls: 2000,
            rate: 200,
            binary,
            workdir: std::env::temp_dir().join("sip-dispatch-testbed"),
            verbose: false,
        }
    }

    /// An upper bound of how long the whole run may take.
    pub fn time_bound(&self) -> Duration {
        Duration::from_secs(u64::from(self.calls.div_ceil(self.rate.max(1))) + 60)
    }
}

/// What one backend took.
#[derive(Debug, Clone)]
pub struct BackendResult {
    pub address: SocketAddr,
    pub weight: u32,
    /// weight / sum of weights, 0..=1.
    pub expected_share: f64,
    /// Complete calls (INVITE, ACK and BYE of one Call-ID) that reached this backend.
    pub calls: u64,
    /// calls / all backends' calls, 0..=1.
    pub share: f64,
    /// Calls that reached it only in part (misrouted or lost messages).
    pub incomplete: u64,
    /// OPTIONS-only Call-IDs (health checks) it answered.
    pub health_checks: u64,
    /// Packets the dispatcher says it sent there.
    pub dispatcher_packets: Option<u64>,
}

/// The result of [`run_scenario`].
#[derive(Debug, Clone)]
pub struct ScenarioSummary {
    pub family: Family,
    pub mode: XdpMode,
    pub calls_requested: u32,
    pub rate: u32,
    pub vip: SocketAddr,
    pub backends: Vec<BackendResult>,
    pub uac: UacReport,
    pub exit_stats: ExitStats,
    pub ready_line: String,
    /// Call-IDs that completed at more than one backend (must be empty).
    pub duplicated_calls: Vec<String>,
    pub dir: PathBuf,
}

impl ScenarioSummary {
    pub fn backend_calls(&self) -> u64 {
        self.backends.iter().map(|b| b.calls).sum()
    }

    /// Every property a correct dispatcher run has that this run violates.
    /// `tolerance_pp`: allowed distance of each share from its weight's share, in
    /// percentage points.
    pub fn problems(&self, tolerance_pp: f64) -> Vec<String> {
        let mut problems = Vec::new();
        let requested = u64::from(self.calls_requested);
        if self.uac.failed != 0 || self.uac.exit_code != Some(0) {
            problems.push(format!("UAC had failures: {}", self.uac.failure_summary()));
        }
        if self.uac.successful != requested {
            problems.push(format!(
                "UAC completed {} of {requested} calls: {}",
                self.uac.successful,
                self.uac.failure_summary()
            ));
        }
        if self.backend_calls() != self.uac.successful {
            problems.push(format!(
                "backends saw {} complete calls but the UAC completed {}",
                self.backend_calls(),
                self.uac.successful
            ));
        }
        if !self.duplicated_calls.is_empty() {
            problems.push(format!(
                "{} calls completed at several backends, e.g. {:?}",
                self.duplicated_calls.len(),
                &self.duplicated_calls[..self.duplicated_calls.len().min(3)]
            ));
        }
        for b in &self.backends {
            if b.incomplete != 0 {
                problems.push(format!(
                    "backend {} saw {} incomplete calls (INVITE/ACK/BYE split or lost)",
                    b.address, b.incomplete
                ));
            }
            let off = (b.share - b.expected_share).abs() * 100.0;
            if off > tolerance_pp {
                problems.push(format!(
                    "backend {} (weight {}) took {:.1} % of the calls, expected {:.1} % ± {tolerance_pp}",
                    b.address,
                    b.weight,
                    b.share * 100.0,
                    b.expected_share * 100.0
                ));
            }
        }
        let xdp_tx = self.exit_stats.counter("xdp_tx");
        if xdp_tx == 0 {
            problems.push(format!(
                "the dispatcher's xdp_tx counter is 0: the traffic did not go through XDP \
                 (counters {:?})",
                self.exit_stats.counters
            ));
        }
        problems
    }

    /// [`problems`](Self::problems) as an error listing all of them, with the table.
    pub fn check(&self, tolerance_pp: f64) -> Result<()> {
        let problems = self.problems(tolerance_pp);
        if problems.is_empty() {
            Ok(())
        } else {
            bail!(
                "{} {} run failed:\n  - {}\n{}\nlogs: {}",
                self.family,
                self.mode,
                problems.join("\n  - "),
                self.table(),
                self.dir.display()
            )
        }
    }

    /// A human-readable table of the run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} calls to {} ({}, XDP mode {}, {} cps requested)",
            self.calls_requested, self.vip, self.family, self.mode, self.rate
        );
        let _ = writeln!(
            s,
            "{:<24} {:>6} {:>9} {:>7} {:>8} {:>7} {:>8} {:>10}",
            "backend", "weight", "expected", "calls", "share", "failed", "options", "xdp pkts"
        );
        for b in &self.backends {
            let _ = writeln!(
                s,
                "{:<24} {:>6} {:>7.1} % {:>7} {:>6.1} % {:>7} {:>8} {:>10}",
                b.address.to_string(),
                b.weight,
                b.expected_share * 100.0,
                b.calls,
                b.share * 100.0,
                b.incomplete,
                b.health_checks,
                b.dispatcher_packets
                    .map_or_else(|| "-".to_owned(), |p| p.to_string()),
            );
        }
        let _ = writeln!(
            s,
            "{:<24} {:>6} {:>9} {:>7} {:>8} {:>7}",
            "total",
            "",
            "",
            self.backend_calls(),
            "",
            self.backends.iter().map(|b| b.incomplete).sum::<u64>()
        );
        let _ = writeln!(
            s,
            "UAC: {} successful, {} failed, {} retransmissions, exit code {:?}, {:.1} s",
            self.uac.successful,
            self.uac.failed,
            self.uac.retransmissions,
            self.uac.exit_code,
            self.uac.elapsed.as_secs_f64()
        );
        let counters: Vec<String> = self
            .exit_stats
            .counters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = write!(s, "dispatcher counters: {}", counters.join(" "));
        s
    }
}

pub fn progress(verbose: bool, msg: impl AsRef<str>) {
    if verbose {
        eprintln!("testbed: {}", msg.as_ref());
    }
}

/// A fresh directory for one run's logs.
pub fn run_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let dir = parent.join(format!("{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Runs calls through the dispatcher (see the module documentation).
pub fn run_scenario(cfg: &ScenarioConfig) -> Result<ScenarioSummary> {
    ensure!(
        !cfg.weights.is_empty() && cfg.weights.len() <= 30,
        "1 to 30 backends"
    );
    ensure!(
        cfg.calls > 0 && cfg.rate > 0,
        "calls and rate must be positive"
    );
    ensure!(
        cfg.weights.iter().any(|&w| w > 0),
        "at least one backend needs a weight above 0"
    );
    preflight::require_all()?;
    if !cfg.binary.is_file() {
        bail!(
            "the sip-dispatch binary is missing at {}",
            cfg.binary.display()
        );
    }
    let dir = run_dir(
        &cfg.workdir,
        &format!("{}-{}", cfg.family, cfg.mode).to_lowercase(),
    )?;
    netns::cleanup_leftovers()?;

    progress(cfg.verbose, "building the topology");
    let topo = Topology::build(TopologySpec::dispatcher(cfg.weights.len() as u8))?;
    let bound = cfg.time_bound();

    progress(cfg.verbose, "starting the SIPp UAS backends");
    let servers = start_backends(&topo, cfg.family, &dir, bound)?;
    let disp = topo.dispatcher()?;
    let vip = SocketAddr::new(topo.vip(cfg.family), sipp::SIP_PORT);
    let mut run = RunConfig::new(&disp.iface, vip, cfg.mode);
    run.control = Some(dispatcher::control_socket(topo.tag())?);
    run.backends = servers
        .iter()
        .zip(&cfg.weights)
        .map(|(s, &weight)| BackendArg::new(s.address, weight))
        .collect();

    let xdp_pass = start_xdp_pass(&topo, &cfg.binary, cfg.mode, &dir, cfg.verbose)?;
    progress(
        cfg.verbose,
        format!(
            "starting sip-dispatch run on {} (VIP {vip}, mode {})",
            disp.iface, cfg.mode
        ),
    );
    let mut daemon = Dispatcher::run(&cfg.binary, disp.ns_name(), &run, &dir)?;
    progress(cfg.verbose, format!("dispatcher: {}", daemon.ready_line));
    let ready_line = daemon.ready_line.clone();

    progress(
        cfg.verbose,
        format!(
            "placing {} calls at {} cps from {} to {vip}",
            cfg.calls,
            cfg.rate,
            topo.client().ip(cfg.family)
        ),
    );
    let spec = UacSpec::calls(topo.client().ip(cfg.family), vip, cfg.calls, cfg.rate);
    let uac = sipp::run_uac(topo.client().ns_name(), &spec, &dir, "uac");

    progress(cfg.verbose, "stopping the dispatcher and the backends");
    let running = daemon.check_running();
    let stats = daemon.stop_with_stats();
    let pass_stopped = xdp_pass.map(Dispatcher::stop).transpose();
    let reports: Vec<Result<UasReport>> = servers.into_iter().map(Uas::stop).collect();
    drop(topo);

    running?;
    let uac = uac?;
    let exit_stats = stats?;
    pass_stopped?;
    let reports = reports.into_iter().collect::<Result<Vec<_>>>()?;
    Ok(summarise(
        cfg, vip, reports, uac, exit_stats, ready_line, dir,
    ))
}

/// Starts a SIPp UAS on every backend host of `topo` (`uas-b1`, `uas-b2`, ...), each
/// quitting by itself after `bound`.
pub fn start_backends(
    topo: &Topology,
    family: Family,
    dir: &Path,
    bound: Duration,
) -> Result<Vec<Uas>> {
    topo.backends()
        .enumerate()
        .map(|(i, b)| {
            Uas::start(
                b.ns_name(),
                b.ip(family),
                dir,
                &format!("uas-b{}", i + 1),
                bound,
            )
        })
        .collect()
}

/// For native (and auto) XDP mode on veth: an XDP_PASS program on the dispatcher's peer
/// in the switch, without which the kernel drops XDP_TX frames. `None` in skb mode.
pub fn start_xdp_pass(
    topo: &Topology,
    binary: &Path,
    mode: XdpMode,
    dir: &Path,
    verbose: bool,
) -> Result<Option<Dispatcher>> {
    if mode == XdpMode::Skb {
        return Ok(None);
    }
    let disp = topo.dispatcher()?;
    progress(
        verbose,
        format!(
            "attaching an XDP_PASS program to {} (the dispatcher's peer) for native XDP_TX on veth",
            disp.switch_iface
        ),
    );
    Dispatcher::xdp_pass(binary, topo.switch().name(), &disp.switch_iface, dir).map(Some)
}

fn summarise(
    cfg: &ScenarioConfig,
    vip: SocketAddr,
    reports: Vec<UasReport>,
    uac: UacReport,
    exit_stats: ExitStats,
    ready_line: String,
    dir: PathBuf,
) -> ScenarioSummary {
    let total: u64 = reports.iter().map(|r| r.calls.len() as u64).sum();
    let weight_sum: u32 = cfg.weights.iter().sum();
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    for r in &reports {
        for id in &r.calls {
            *seen.entry(id).or_default() += 1;
        }
    }
    let duplicated_calls = seen
        .into_iter()
        .filter(|&(_, n)| n > 1)
        .map(|(id, _)| id.to_owned())
        .collect();
    let backends = reports
        .iter()
        .zip(&cfg.weights)
        .map(|(r, &weight)| BackendResult {
            address: r.address,
            weight,
            expected_share: f64::from(weight) / f64::from(weight_sum),
            calls: r.calls.len() as u64,
            share: if total == 0 {
                0.0
            } else {
                r.calls.len() as f64 / total as f64
            },
            incomplete: r.incomplete.len() as u64,
            health_checks: r.health_checks,
            dispatcher_packets: exit_stats.backend(r.address).map(|b| b.packets),
        })
        .collect();
    ScenarioSummary {
        family: cfg.family,
        mode: cfg.mode,
        calls_requested: cfg.calls,
        rate: cfg.rate,
        vip,
        backends,
        uac,
        exit_stats,
        ready_line,
        duplicated_calls,
        dir,
    }
}

/// What [`run_direct`] observed.
#[derive(Debug, Clone)]
pub struct DirectSummary {
    pub uac: UacReport,
    pub options: UacReport,
    pub uas: UasReport,
    pub dir: PathBuf,
}

/// The harness without a dispatcher: the UAC calls one UAS directly, and a few OPTIONS
/// (like a dispatcher's health checks) go to the same UAS from another port.
pub fn run_direct(
    family: Family,
    calls: u32,
    rate: u32,
    options: u32,
    workdir: &Path,
) -> Result<DirectSummary> {
    preflight::require_all()?;
    let dir = run_dir(workdir, &format!("direct-{family}").to_lowercase())?;
    netns::cleanup_leftovers()?;
    let topo = Topology::build(TopologySpec {
        dispatchers: 0,
        backends: 1,
        dns: false,
    })?;
    let backend = topo.backends().next().context("one backend")?;
    let client = topo.client();
    let bound = Duration::from_secs(u64::from(calls.div_ceil(rate.max(1))) + 60);
    let uas = Uas::start(backend.ns_name(), backend.ip(family), &dir, "uas-b1", bound)?;

    let mut probe = UacSpec::calls(client.ip(family), uas.address, options.max(1), 50);
    probe.scenario = Scenario::File(sipp::write_options_scenario(&dir)?);
    probe.local_port = 5080;
    probe.call_id = "%u-health@%s".to_owned();
    let options_report = sipp::run_uac(client.ns_name(), &probe, &dir, "options");

    let spec = UacSpec::calls(client.ip(family), uas.address, calls, rate);
    let uac = sipp::run_uac(client.ns_name(), &spec, &dir, "uac");
    let uas = uas.stop();
    drop(topo);
    Ok(DirectSummary {
        uac: uac?,
        options: options_report?,
        uas: uas?,
        dir,
    })
}
/// A SIPp scenario like the built-in `uac` whose INVITE carries an SDP body of about
/// `sdp_bytes` bytes (padding attributes), so it leaves the client fragmented.
pub fn big_invite(dir: &Path, sdp_bytes: usize) -> Result<PathBuf> {
    let mut pad = String::new();
    let mut i = 0;
    while pad.len() < sdp_bytes {
        let _ = writeln!(pad, "a=x-pad-{i:04}:{}", "0123456789abcdef".repeat(4));
        i += 1;
    }
    let xml = format!(
        r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="large INVITE">
  <send retrans="500">
    <![CDATA[

      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: [service] <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Subject: Large INVITE
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
{pad}
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true"/>
  <send>
    <![CDATA[

      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: [service] <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <pause/>
  <send retrans="500">
    <![CDATA[

      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: [service] <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
"#
    );
    let path = dir.join("large-invite.xml");
    std::fs::write(&path, xml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
