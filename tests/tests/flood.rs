//! The flood test (issue 5): while SIPp places 2000 calls at 100 calls/s through the
//! dispatcher, a packet generator in the client's namespace writes random and malformed
//! datagrams to the VIP at full speed for 10 s (`sip_dispatch_testbed::flood`: random
//! bytes, truncated requests, requests with no, an empty or a 300-byte Call-ID or with NUL
//! bytes, STUN binding requests, CRLF keep-alives, SIP responses, bad IPv4 header, total
//! and UDP lengths, runts, lone and paired IPv4 fragments, UDP to other ports; each from a
//! fresh source in 198.19.0.0/16). It proves that:
//!
//! - the daemon stays up: its process lives throughout, its control socket answers
//!   `stats --json` during the flood and after, no backend is ever taken down, and it
//!   exits cleanly on SIGTERM;
//! - its memory stays bounded: VmRSS grows by less than [`RSS_GROWTH_BOUND`] from just
//!   before the flood to its peak;
//! - the counters add up ([`fast_path_checks`], [`slow_path_checks`],
//!   [`backend_checks`]): every frame the XDP program saw has exactly one outcome, every
//!   datagram the slow path received has exactly one, each pass reason is bounded by what
//!   the generator sent of that kind, the slow path received exactly what the stack
//!   delivered of the passed datagrams, nothing without a Call-ID reached a backend, and
//!   every message a backend received is a SIPp call's, a health check, or a flood
//!   message with a Call-ID;
//! - at least 99.9 % of the SIPp calls succeed ([`MIN_SUCCESSFUL`] of [`CALLS`]), each
//!   at exactly one backend.
//!
//! Seen on every run: the lone fragments fill the dispatcher's reassembly memory
//! (`ipfrag_high_thresh`, 4 MiB) within the first second, after which its stack
//! reassembles nothing more (`Ip.ReasmFails`), so only the first ~1100 fragment pairs
//! reach the slow path; the checks hold either way.
//!
//! The bridge of the switch namespace runs with `bridge-nf-call-iptables` off (set here):
//! otherwise br_netfilter checks IPv4 headers and drops the malformed frames before they
//! reach the dispatcher, which a plain switch would not do.
//!
//! Needs root, SIPp and the sip-dispatch binary (`$SIP_DISPATCH_BIN`, else
//! `target/debug/sip-dispatch`): without them the test fails, it never skips. Run with
//! `--test-threads=1`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use sip_dispatch_testbed::{
    Family, XdpMode,
    dispatcher::{self, BackendArg, Dispatcher, RunConfig},
    events::{Event, epoch_secs},
    flood::{FLOOD_CALL_ID, Flood, FloodReport, FloodSpec, Outcome, Target, check_source_range},
    link, netns, preflight, scenario,
    sipp::{self, SIP_PORT, UacCall, UacReport, UacSpec, Uas, UasReport, backends_by_call},
    topology::{Topology, TopologySpec},
};

const CALLS: u32 = 2000;
const RATE: u32 = 100;
/// 99.9 % of [`CALLS`], rounded up: at most 2 calls may fail.
const MIN_SUCCESSFUL: u64 = (CALLS as u64 * 999).div_ceil(1000);
const BACKENDS: u8 = 3;
/// Calls flow this long before the flood starts, and about 6 s after it ends.
const CALLS_BEFORE_FLOOD: Duration = Duration::from_secs(4);
const FLOOD_TIME: Duration = Duration::from_secs(10);
/// A bound on frames far above what one CPU sends in [`FLOOD_TIME`] (about 0.1 million
/// per second here): the time is what ends the flood.
const FLOOD_MAX_FRAMES: u64 = 20_000_000;
/// How often the control socket is asked for stats during the flood.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// The daemon's VmRSS may grow this much from before the flood to its peak. It runs at
/// about 17 MiB; what the flood may legitimately add is a few buffers (the slow path's
/// 64 KiB datagram buffer, allocator arenas, the control connections), well under
/// 32 MiB. A leak of 60 bytes per datagram the slow path handles (over half a million in
/// the 10 s here) would exceed it.
const RSS_GROWTH_BOUND: u64 = 32 << 20;
/// How long one `sip-dispatch stats --json` may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
const SEED: u64 = 0x5d_f100d;
/// Turns br_netfilter's IPv4 checks off for the bridges of the namespace it runs in (if
/// br_netfilter is there at all).
const BRIDGE_NF_OFF: &str = "f=/proc/sys/net/bridge/bridge-nf-call-iptables; \
                             if [ -e $f ]; then echo 0 > $f; fi";

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-flood")
}

/// The test network: client, dispatcher (with the XDP_PASS program on its veth peer),
/// and SIPp UAS backends b1..b3. Fields drop in order: the backends, the pass program,
/// then the namespaces.
struct Bed {
    binary: PathBuf,
    dir: PathBuf,
    control: PathBuf,
    uas: Vec<Uas>,
    xdp_pass: Option<Dispatcher>,
    topo: Topology,
}

impl Bed {
    fn build(bound: Duration) -> Bed {
        preflight::require_all().expect("preflight");
        check_source_range().expect("the flood's source range");
        let binary = dispatcher::binary_path().expect("sip-dispatch binary");
        let dir = scenario::run_dir(&workdir(), "flood").expect("run dir");
        netns::cleanup_leftovers().expect("cleaning up leftovers");
        let topo = Topology::build(TopologySpec::dispatcher(BACKENDS)).expect("topology");
        topo.switch()
            .exec("sh", ["-c", BRIDGE_NF_OFF])
            .expect("turning br_netfilter off in the switch namespace");
        let uas = scenario::start_backends(&topo, Family::V4, &dir, bound).expect("UAS backends");
        let xdp_pass = scenario::start_xdp_pass(&topo, &binary, XdpMode::Native, &dir, true)
            .expect("xdp-pass on the peer");
        let control = dispatcher::control_socket(topo.tag()).expect("control socket path");
        Bed {
            binary,
            dir,
            control,
            uas,
            xdp_pass,
            topo,
        }
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip(Family::V4), SIP_PORT)
    }

    fn start_daemon(&self) -> Dispatcher {
        let disp = self.topo.dispatcher().expect("a dispatcher host");
        let mut run = RunConfig::new(&disp.iface, self.vip(), XdpMode::Native);
        run.control = Some(self.control.clone());
        run.backends = self
            .uas
            .iter()
            .map(|u| BackendArg::new(u.address, 1))
            .collect();
        Dispatcher::run(&self.binary, disp.ns_name(), &run, &self.dir)
            .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"))
    }

    fn start_uac(&self) -> sipp::Uac {
        let spec = UacSpec::calls(self.topo.client().ip(Family::V4), self.vip(), CALLS, RATE);
        sipp::Uac::start(self.topo.client().ns_name(), &spec, &self.dir, "uac").expect("UAC")
    }

    fn start_flood(&self) -> Flood {
        let client = self.topo.client();
        let target = Target::for_topology(&self.topo, SIP_PORT).expect("flood target");
        let cpus = thread::available_parallelism().map_or(1, usize::from);
        Flood::start(FloodSpec {
            ns: client.ns_name().to_owned(),
            iface: client.iface.clone(),
            target,
            cpu: cpus - 1,
            max_frames: FLOOD_MAX_FRAMES,
            max_time: FLOOD_TIME,
            seed: SEED,
        })
        .unwrap_or_else(|e| panic!("starting the flood: {e:#}"))
    }

    /// `sip-dispatch stats --json`, bounded by [`CLI_TIMEOUT`]; returns it and how long
    /// it took.
    fn stats(&self) -> Result<(Value, Duration), String> {
        let started = Instant::now();
        let mut child = Command::new(&self.binary)
            .args([
                "stats",
                &format!("--control={}", self.control.display()),
                "--json",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running the CLI: {e}"))?;
        while child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if started.elapsed() > CLI_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`stats --json` took more than {CLI_TIMEOUT:?}"));
            }
            thread::sleep(Duration::from_millis(10));
        }
        let took = started.elapsed();
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "`stats --json` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let v = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("`stats --json` printed no JSON ({e})"))?;
        Ok((v, took))
    }

    /// Stats read until both balances hold and the slow path has drained its socket
    /// (`received` unchanged since the previous read): the counters are read one by one
    /// while packets (health checks, ARP) still arrive, so one read may catch a frame
    /// between its `seen` and its outcome. A real imbalance stays; the last read is
    /// returned.
    fn settled_stats(&self) -> Value {
        let mut last = Value::Null;
        for _ in 0..20 {
            let v = self
                .stats()
                .unwrap_or_else(|e| panic!("after the flood: {e}"))
                .0;
            let drained = last != Value::Null && slow(&v, "received") == slow(&last, "received");
            last = v;
            if drained && fast_path_imbalance(&last) == 0 && slow_path_imbalance(&last) == 0 {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        last
    }

    /// What each backend's SIPp logged receiving (`-trace_shortmsg`; the UAS of backend
    /// N logs to `uas-bN.messages.log`, see `scenario::start_backends`).
    fn backend_logs(&self, uac_calls: &BTreeMap<String, UacCall>) -> Vec<BackendLog> {
        (1..=BACKENDS)
            .map(|n| {
                let path = self.dir.join(format!("uas-b{n}.messages.log"));
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                BackendLog::parse(&text, uac_calls)
            })
            .collect()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for u in self.uas.drain(..) {
            let _ = u.stop();
        }
        if let Some(p) = self.xdp_pass.take() {
            let _ = p.stop();
        }
    }
}

/// A process's resident set size, from `/proc/PID/status`; `None` once it is gone.
fn vm_rss(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Samples a process's VmRSS every [`SAMPLE_EVERY`] until stopped; a `None` sample means
/// the process was gone.
struct RssSampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Option<u64>>>>,
    handle: Option<JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: i32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (flag, out) = (stop.clone(), samples.clone());
        let handle = thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    out.lock().expect("samples").push(vm_rss(pid));
                    thread::sleep(SAMPLE_EVERY);
                }
            })
            .expect("starting the RSS sampler");
        RssSampler {
            stop,
            samples,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<Option<u64>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        std::mem::take(&mut *self.samples.lock().expect("samples"))
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn counter(stats: &Value, name: &str) -> u64 {
    stats["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no fast-path counter {name} in {stats}"))
}

fn slow(stats: &Value, name: &str) -> u64 {
    stats["slow_path"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no slow-path counter {name} in {stats}"))
}

/// The `pass_*` counters (every reason the fast path leaves a frame to the stack).
fn pass_counters(stats: &Value) -> BTreeMap<String, u64> {
    stats["counters"]
        .as_object()
        .unwrap_or_else(|| panic!("no counters in {stats}"))
        .iter()
        .filter(|(k, _)| k.starts_with("pass_"))
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect()
}

/// `seen` minus the sum of the outcomes (each frame gets exactly one).
fn fast_path_imbalance(stats: &Value) -> i128 {
    let outcomes = counter(stats, "not_service")
        + counter(stats, "xdp_tx")
        + counter(stats, "xdp_redirect")
        + counter(stats, "drop_redirect_failed")
        + pass_counters(stats).values().sum::<u64>();
    i128::from(counter(stats, "seen")) - i128::from(outcomes)
}

/// `received` minus the sum of the slow path's outcomes (each datagram gets exactly one).
fn slow_path_imbalance(stats: &Value) -> i128 {
    let all = stats["slow_path"]
        .as_object()
        .unwrap_or_else(|| panic!("no slow_path in {stats}"));
    let outcomes: u64 = all
        .iter()
        // Affinity events (followed, written) come on top of a datagram's one outcome.
        .filter(|(k, _)| k.as_str() != "received" && !k.starts_with("affinity_"))
        .map(|(_, v)| v.as_u64().unwrap_or(0))
        .sum();
    i128::from(slow(stats, "received")) - i128::from(outcomes)
}

fn backend_packets(stats: &Value) -> u64 {
    stats["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends in {stats}"))
        .iter()
        .map(|b| b["packets"].as_u64().unwrap_or(0))
        .sum()
}

/// Datagrams the UAC sent (to the VIP: every INVITE, ACK and BYE, retransmissions
/// included), from its `-trace_shortmsg` log.
fn uac_sent(uac: &UacReport) -> u64 {
    let text = std::fs::read_to_string(&uac.messages)
        .unwrap_or_else(|e| panic!("reading {}: {e}", uac.messages.display()));
    text.lines()
        .filter(|l| l.split('\t').nth(3) == Some("S"))
        .count() as u64
}

/// The messages one backend's SIPp received, by origin.
#[derive(Debug, Default)]
struct BackendLog {
    /// Of the UAC's calls.
    calls: u64,
    /// Health checks (OPTIONS).
    health_checks: u64,
    /// Flood messages (see [`is_flood_call_id`]).
    flood: u64,
    /// Anything else: a message no one sent (must stay empty).
    unknown: Vec<String>,
}

impl BackendLog {
    /// From a `-trace_shortmsg` log: `date \t time \t epoch \t S|R \t Call-ID \t CSeq \t
    /// first line`.
    fn parse(text: &str, uac_calls: &BTreeMap<String, UacCall>) -> BackendLog {
        let mut log = BackendLog::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() < 7 || f[3] != "R" {
                continue;
            }
            if uac_calls.contains_key(f[4]) {
                log.calls += 1;
            } else if is_flood_call_id(f[4]) {
                log.flood += 1;
            } else if f[6].starts_with("OPTIONS ") {
                log.health_checks += 1;
            } else {
                log.unknown.push(line.to_owned());
            }
        }
        log
    }
}

/// A Call-ID the flood sent: it starts with [`FLOOD_CALL_ID`], or is cut short inside
/// that prefix (a truncated request, or a NUL byte in the value, ends it early).
fn is_flood_call_id(id: &str) -> bool {
    id.starts_with(FLOOD_CALL_ID) || (!id.is_empty() && FLOOD_CALL_ID.starts_with(id))
}

/// UAC calls that did not stay on one backend (messages at two, or a successful call at
/// none), and successful calls whose INVITE, ACK and BYE did not all arrive at their one
/// backend (incomplete).
fn split_calls(
    uac: &BTreeMap<String, UacCall>,
    reports: &[UasReport],
) -> (Vec<String>, Vec<String>) {
    let seen_at = backends_by_call(reports);
    let mut complete: BTreeMap<&str, u32> = BTreeMap::new();
    for id in reports.iter().flat_map(|r| &r.calls) {
        *complete.entry(id).or_default() += 1;
    }
    let (mut split, mut incomplete) = (Vec::new(), Vec::new());
    for (id, c) in uac {
        let at = seen_at.get(id.as_str()).map_or(0, BTreeSet::len);
        if at > 1 || (c.ok && at == 0) {
            split.push(id.clone());
        } else if c.ok && complete.get(id.as_str()) != Some(&1) {
            incomplete.push(id.clone());
        }
    }
    (split, incomplete)
}

/// One invariant: what it says, and whether it held (with the numbers).
struct Check {
    what: String,
    ok: bool,
}

fn check(checks: &mut Vec<Check>, ok: bool, what: String) {
    checks.push(Check { what, ok });
}

/// The XDP program's counters: each frame has one outcome, each pass reason is bounded
/// by what the generator sent of that kind, and only datagrams with a Call-ID went to a
/// backend.
fn fast_path_checks(run: &Run) -> Vec<Check> {
    let (stats, flood) = (&run.stats, &run.flood);
    let g = |o| flood.outcome(o);
    let mut c = Vec::new();
    let imbalance = fast_path_imbalance(stats);
    check(
        &mut c,
        imbalance == 0,
        format!(
            "fast path: seen = not_service + xdp_tx + xdp_redirect + sum(pass_*) \
             (seen - sum = {imbalance})"
        ),
    );
    // Nothing but the flood sends fragments, bad lengths or Call-ID-less datagrams to the
    // VIP; the flood may lose frames on the way (ring and backlog drops), never add any.
    for (name, outcome) in [
        ("pass_fragment", Outcome::Fragment),
        ("pass_truncated", Outcome::Truncated),
        ("pass_no_call_id", Outcome::NoCallId),
    ] {
        let v = counter(stats, name);
        check(
            &mut c,
            v > 0 && v <= g(outcome),
            format!(
                "0 < {name} = {v} <= {} frames of that kind sent",
                g(outcome)
            ),
        );
    }
    let reached = counter(stats, "pass_fragment")
        + counter(stats, "pass_truncated")
        + counter(stats, "pass_no_call_id");
    let of = g(Outcome::Fragment) + g(Outcome::Truncated) + g(Outcome::NoCallId);
    check(
        &mut c,
        2 * reached >= of,
        format!(
            "the flood reached the XDP program: {reached} of {of} frames of those kinds \
             (at least half)"
        ),
    );
    let dispatched = counter(stats, "xdp_tx") + counter(stats, "xdp_redirect");
    let sent = uac_sent(&run.uac);
    check(
        &mut c,
        dispatched <= sent + g(Outcome::Dispatch),
        format!(
            "xdp_tx + xdp_redirect = {dispatched} <= {sent} UAC datagrams + {} flood frames \
             with a Call-ID (nothing else was dispatched)",
            g(Outcome::Dispatch)
        ),
    );
    let forwarded = slow(stats, "forwarded");
    check(
        &mut c,
        dispatched + forwarded >= 3 * run.uac.successful,
        format!(
            "xdp_tx + xdp_redirect + slow forwarded = {} >= 3 x {} successful calls",
            dispatched + forwarded,
            run.uac.successful
        ),
    );
    let packets = backend_packets(stats);
    // Per-backend counts hold what both paths forwarded (README "The slow path").
    check(
        &mut c,
        packets == dispatched + forwarded,
        format!(
            "per-backend packets {packets} = xdp_tx + xdp_redirect {dispatched} + slow forwarded {forwarded}"
        ),
    );
    // Backends stayed routable and in the table; nothing sent needs the other reasons.
    for name in [
        "pass_fib_miss",
        "pass_no_backend",
        "pass_no_tx_port",
        "pass_ipv6_ext_header",
        "pass_call_id_beyond_window",
    ] {
        let v = counter(stats, name);
        check(&mut c, v == 0, format!("{name} = {v} = 0"));
    }
    c
}

/// The slow path's counters: each datagram has one outcome, every one came through an
/// XDP_PASS (the kernel's counters close the account), only reassembled flood datagrams
/// with a Call-ID were forwarded, and no 503 was ever due.
fn slow_path_checks(run: &Run) -> Vec<Check> {
    let (stats, flood) = (&run.stats, &run.flood);
    let mut c = Vec::new();
    let imbalance = slow_path_imbalance(stats);
    check(
        &mut c,
        imbalance == 0,
        format!("slow path: received = sum of its outcomes (received - sum = {imbalance})"),
    );
    let passed: u64 = pass_counters(stats).values().sum();
    let received = slow(stats, "received");
    check(
        &mut c,
        received > 0 && received <= passed,
        format!("0 < slow received = {received} <= sum(pass_*) = {passed}"),
    );
    // The stack delivers to the VIP's socket the Call-ID-less datagrams the fast path
    // passed and the datagrams it reassembled (only flood pairs are fragmented); what
    // the socket had no room for it counts as a receive-buffer error.
    let (no_call_id, reassembled, overflow) = (
        counter(stats, "pass_no_call_id"),
        snmp(&run.snmp, "Ip", "ReasmOKs"),
        snmp(&run.snmp, "Udp", "RcvbufErrors"),
    );
    check(
        &mut c,
        received + overflow == no_call_id + reassembled,
        format!(
            "slow received {received} + socket overflows {overflow} = pass_no_call_id \
             {no_call_id} + datagrams reassembled by the stack {reassembled}"
        ),
    );
    let forwarded = slow(stats, "forwarded");
    check(
        &mut c,
        forwarded <= flood.reassemblable_with_call_id,
        format!(
            "slow forwarded = {forwarded} <= {} reassemblable flood datagrams with a Call-ID",
            flood.reassemblable_with_call_id
        ),
    );
    for name in ["dropped_not_sip", "dropped_no_call_id"] {
        let v = slow(stats, name);
        check(&mut c, v > 0, format!("slow {name} = {v} > 0"));
    }
    for name in [
        "answered_503",
        "rate_limited_503",
        "dropped_no_backend",
        "send_errors",
    ] {
        let v = slow(stats, name);
        check(&mut c, v == 0, format!("slow {name} = {v} = 0"));
    }
    c
}

/// What the backends' SIPp received: flood messages only as many as were sent with a
/// Call-ID, and nothing no one sent.
fn backend_checks(run: &Run) -> Vec<Check> {
    let mut c = Vec::new();
    let flood = &run.flood;
    let at_backends: u64 = run.backends.iter().map(|b| b.flood).sum();
    let may_reach = flood.outcome(Outcome::Dispatch) + flood.reassemblable_with_call_id;
    check(
        &mut c,
        at_backends > 0 && at_backends <= may_reach,
        format!(
            "0 < flood messages at the backends = {at_backends} <= {may_reach} sent with a \
             Call-ID"
        ),
    );
    let unknown: Vec<&String> = run.backends.iter().flat_map(|b| &b.unknown).collect();
    check(
        &mut c,
        unknown.is_empty(),
        format!(
            "messages at the backends that no one sent: {} (e.g. {:?})",
            unknown.len(),
            &unknown[..unknown.len().min(3)]
        ),
    );
    c
}

/// The kernel's SNMP counters of a namespace (`/proc/net/snmp`), as `Ip.ReasmOKs` etc.
impl Bed {
    /// Per backend: datagrams dropped on the backend's veth and bridge port, plus those
    /// its sockets dropped for a full receive buffer (`Udp.RcvbufErrors`).
    fn downstream_drops(&self) -> Vec<u64> {
        self.topo
            .backends()
            .map(|h| {
                let dropped = |ns: &str, iface: &str, dir: &str| {
                    link::link_json(ns, iface)
                        .ok()
                        .and_then(|v| v["stats64"][dir]["dropped"].as_u64())
                        .unwrap_or(0)
                };
                let socket = snmp(&read_snmp(h.ns_name()), "Udp", "RcvbufErrors");
                dropped(h.ns_name(), &h.iface, "rx")
                    + dropped(self.topo.switch().name(), &h.switch_iface, "tx")
                    + socket
            })
            .collect()
    }
}

fn read_snmp(ns: &str) -> BTreeMap<String, u64> {
    let text = netns::exec(ns, "cat", ["/proc/net/snmp"])
        .unwrap_or_else(|e| panic!("reading /proc/net/snmp in {ns}: {e:#}"));
    let lines: Vec<&str> = text.lines().collect();
    let mut out = BTreeMap::new();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((group, names)), Some((_, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = v.parse() {
                out.insert(format!("{group}.{n}"), v);
            }
        }
    }
    out
}

fn snmp(counters: &BTreeMap<String, u64>, group: &str, name: &str) -> u64 {
    counters
        .get(&format!("{group}.{name}"))
        .copied()
        .unwrap_or_else(|| panic!("no {group}.{name} in /proc/net/snmp: {counters:?}"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// During the flood: the daemon runs and its control socket answers.
struct Probes {
    answered: u32,
    slowest: Duration,
    failures: Vec<String>,
}

impl Probes {
    fn new() -> Probes {
        Probes {
            answered: 0,
            slowest: Duration::ZERO,
            failures: Vec::new(),
        }
    }

    fn probe(&mut self, bed: &Bed, daemon: &mut Dispatcher, when: &str) {
        if let Err(e) = daemon.check_running() {
            self.failures.push(format!("{when}: {e:#}"));
            return;
        }
        match bed.stats() {
            Ok((v, took)) if v["counters"]["seen"].is_u64() => {
                self.answered += 1;
                self.slowest = self.slowest.max(took);
            }
            Ok((v, _)) => self
                .failures
                .push(format!("{when}: stats without counters: {v}")),
            Err(e) => self.failures.push(format!("{when}: {e}")),
        }
    }
}

/// Everything one run observed.
struct Run {
    flood: FloodReport,
    /// When the flood ran, in seconds since the Unix epoch (to compare with SIPp's logs).
    flood_window: (f64, f64),
    probes: Probes,
    uac: UacReport,
    uac_calls: BTreeMap<String, UacCall>,
    /// The daemon's stats once the flood and the calls are over.
    stats: Value,
    /// The dispatcher namespace's `/proc/net/snmp`, read just after `stats`.
    snmp: BTreeMap<String, u64>,
    rss_before: u64,
    rss_samples: Vec<Option<u64>>,
    went_down: Vec<String>,
    exit: Result<(), String>,
    reports: Vec<UasReport>,
    backends: Vec<BackendLog>,
    /// Per backend, datagrams lost after the dispatcher sent them: dropped on the way
    /// into the backend's namespace (its veth and the bridge port) or by the backend's
    /// own socket (its receive buffer overflowed under the flood it was sent).
    downstream_drops: Vec<u64>,
}

/// Starts the daemon and the calls, floods while they flow, then stops everything in
/// order and collects what each part saw.
fn run(bed: &mut Bed) -> Run {
    let mut daemon = bed.start_daemon();
    let log = daemon.log();
    let sampler = RssSampler::start(daemon.pid());
    let (before, _) = bed
        .stats()
        .unwrap_or_else(|e| panic!("before the flood: {e}"));
    let all_up = before["backends"]
        .as_array()
        .is_some_and(|b| b.len() == usize::from(BACKENDS) && b.iter().all(|b| b["state"] == "up"));
    assert!(
        all_up,
        "the backends are not all up at the start: {before:#}"
    );

    let mut uac = bed.start_uac();
    uac.run_for(CALLS_BEFORE_FLOOD).expect("calls flowing");
    let rss_before = vm_rss(daemon.pid()).expect("the daemon's VmRSS before the flood");
    let (flood, flood_window, probes) = flood_with_probes(bed, &mut daemon);
    if let Err(e) = uac.check_running() {
        panic!("the UAC ended during the flood: {e:#}");
    }
    let uac = uac.finish().expect("UAC");
    let uac_calls = uac.calls().expect("UAC calls");
    let downstream_drops = bed.downstream_drops();
    let stats = bed.settled_stats();
    let snmp = read_snmp(bed.topo.dispatcher().expect("a dispatcher").ns_name());
    let rss_samples = sampler.finish();
    let went_down = log
        .events()
        .into_iter()
        .filter_map(|e| match e.event {
            Event::Backend {
                address,
                up: false,
                reason,
            } => Some(format!("{address}: {reason}")),
            _ => None,
        })
        .collect();
    let exit = daemon
        .stop_with_stats()
        .map(drop)
        .map_err(|e| format!("{e:#}"));
    let reports: Vec<UasReport> = bed
        .uas
        .drain(..)
        .map(|u| u.stop().expect("stopping a UAS"))
        .collect();
    let backends = bed.backend_logs(&uac_calls);
    Run {
        flood,
        flood_window,
        probes,
        uac,
        uac_calls,
        stats,
        snmp,
        rss_before,
        rss_samples,
        went_down,
        exit,
        reports,
        backends,
        downstream_drops,
    }
}

/// Runs the flood to its end, asking the daemon for stats every [`PROBE_EVERY`] while
/// it runs, and once right after.
fn flood_with_probes(bed: &Bed, daemon: &mut Dispatcher) -> (FloodReport, (f64, f64), Probes) {
    let mut probes = Probes::new();
    let from = epoch_secs(SystemTime::now());
    let mut flood = bed.start_flood();
    let report = loop {
        match flood.wait(PROBE_EVERY) {
            Ok(Some(report)) => break report,
            Ok(None) => probes.probe(bed, daemon, "during the flood"),
            Err(e) => panic!("the flood generator: {e:#}"),
        }
    };
    let to = epoch_secs(SystemTime::now());
    probes.probe(bed, daemon, "right after the flood");
    (report, (from, to), probes)
}

/// The daemon stayed up, answered, kept its backends and its memory.
fn daemon_checks(run: &Run) -> Vec<Check> {
    let mut c = Vec::new();
    let samples = &run.rss_samples;
    let peak = samples.iter().flatten().copied().max().unwrap_or(0);
    let gone = samples.iter().filter(|s| s.is_none()).count();
    check(
        &mut c,
        gone == 0 && !samples.is_empty(),
        format!(
            "the daemon ran throughout ({} RSS samples, {gone} without it)",
            samples.len()
        ),
    );
    check(
        &mut c,
        peak.saturating_sub(run.rss_before) < RSS_GROWTH_BOUND,
        format!(
            "VmRSS {:.1} MiB before the flood, peak {:.1} MiB: growth below {:.0} MiB",
            mib(run.rss_before),
            mib(peak),
            mib(RSS_GROWTH_BOUND)
        ),
    );
    let p = &run.probes;
    check(
        &mut c,
        p.failures.is_empty() && p.answered >= 2,
        format!(
            "the control socket answered {} stats requests during and after the flood \
             (slowest {:.0} ms), failures: {:?}",
            p.answered,
            p.slowest.as_secs_f64() * 1000.0,
            p.failures
        ),
    );
    check(
        &mut c,
        run.went_down.is_empty(),
        format!("no backend went down: {:?}", run.went_down),
    );
    check(
        &mut c,
        run.exit.is_ok(),
        format!("the daemon exited cleanly on SIGTERM: {:?}", run.exit),
    );
    c
}

/// The flood ran its full time while calls flowed, and the calls succeeded.
fn call_checks(run: &Run) -> Vec<Check> {
    let mut c = Vec::new();
    let f = &run.flood;
    check(
        &mut c,
        f.elapsed >= FLOOD_TIME,
        format!(
            "the flood lasted {:.2} s ({} frames, {:.0}/s)",
            f.elapsed.as_secs_f64(),
            f.frames,
            f.rate()
        ),
    );
    let (from, to) = run.flood_window;
    let during = run
        .uac_calls
        .values()
        .filter(|c| (from..to).contains(&c.invite_at))
        .count() as u64;
    let nominal = u64::from(RATE) * FLOOD_TIME.as_secs();
    check(
        &mut c,
        2 * during >= nominal,
        format!("calls started during the flood: {during} (at least half of {nominal})"),
    );
    let uac = &run.uac;
    check(
        &mut c,
        uac.created == u64::from(CALLS) && uac.successful >= MIN_SUCCESSFUL,
        format!(
            "calls: {} successful, {} failed of {} created (at least {MIN_SUCCESSFUL} of {CALLS} \
             must succeed): {}",
            uac.successful,
            uac.failed,
            uac.created,
            uac.failure_summary()
        ),
    );
    let (split, incomplete) = split_calls(&run.uac_calls, &run.reports);
    check(
        &mut c,
        split.is_empty() && run.uac_calls.len() == CALLS as usize,
        format!(
            "no call reached two backends ({} in the UAC log; split: {:?})",
            run.uac_calls.len(),
            &split[..split.len().min(5)]
        ),
    );
    // A successful call with a request missing at its one backend (an ACK, say) was
    // dispatched (every UAC datagram is in xdp_tx, checked above) and lost after the
    // dispatcher: at most one such call per datagram the backends' links and sockets
    // dropped.
    let drops: u64 = run.downstream_drops.iter().sum();
    check(
        &mut c,
        incomplete.len() as u64 <= drops,
        format!(
            "successful calls incomplete at their backend: {} ({:?}) <= datagrams dropped \
             after the dispatcher, per backend {:?}",
            incomplete.len(),
            &incomplete[..incomplete.len().min(5)],
            run.downstream_drops
        ),
    );
    c
}

#[test]
fn flood_of_bad_datagrams_leaves_calls_and_daemon_intact() {
    let mut bed = Bed::build(Duration::from_secs(120));
    let run = run(&mut bed);
    let mut checks = fast_path_checks(&run);
    checks.extend(slow_path_checks(&run));
    checks.extend(backend_checks(&run));
    checks.extend(daemon_checks(&run));
    checks.extend(call_checks(&run));
    report_run(&run, &checks);
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.what.as_str())
        .collect();
    assert!(
        failed.is_empty(),
        "flood:\n  - {}\nlogs: {}",
        failed.join("\n  - "),
        bed.dir.display()
    );
    let _ = std::fs::remove_dir_all(&bed.dir);
}

/// Prints what was sent, what the daemon counted, and every check.
fn report_run(run: &Run, checks: &[Check]) {
    let (flood, stats, uac) = (&run.flood, &run.stats, &run.uac);
    eprintln!(
        "[flood] {} frames in {:.2} s ({:.0}/s, {} stalls); by outcome {:?}; \
         reassemblable with/without Call-ID {}/{}",
        flood.frames,
        flood.elapsed.as_secs_f64(),
        flood.rate(),
        flood.stalls,
        flood.by_outcome,
        flood.reassemblable_with_call_id,
        flood.reassemblable_without_call_id
    );
    eprintln!("[flood] by kind {:?}", flood.by_kind);
    eprintln!(
        "[flood] fast path {}\n[flood] slow path {}",
        stats["counters"], stats["slow_path"]
    );
    let kernel: Vec<String> = [
        "Ip.InHdrErrors",
        "Ip.ReasmReqds",
        "Ip.ReasmOKs",
        "Ip.ReasmFails",
        "Udp.InDatagrams",
        "Udp.NoPorts",
        "Udp.InErrors",
        "Udp.RcvbufErrors",
    ]
    .iter()
    .map(|k| format!("{k}={}", run.snmp.get(*k).copied().unwrap_or(0)))
    .collect();
    eprintln!("[flood] dispatcher's stack {}", kernel.join(" "));
    for (i, b) in run.backends.iter().enumerate() {
        eprintln!(
            "[flood] backend b{}: {} call messages, {} health checks, {} flood messages, {} unknown",
            i + 1,
            b.calls,
            b.health_checks,
            b.flood,
            b.unknown.len()
        );
    }
    eprintln!(
        "[flood] UAC: {} ok / {} failed of {}, {} retransmissions, {:.1} s",
        uac.successful,
        uac.failed,
        uac.created,
        uac.retransmissions,
        uac.elapsed.as_secs_f64()
    );
    for c in checks {
        eprintln!("[flood] {} {}", if c.ok { "ok  " } else { "FAIL" }, c.what);
    }
}
