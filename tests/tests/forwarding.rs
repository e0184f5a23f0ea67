//! Forwarding modes (README "Forwarding modes"): with `--forwarding l2dsr` and `ipip`
//! the backends answer from the VIP. Each backend holds the VIP on `lo` (SIPp's UAS is
//! bound to it) and answers the health checks on its own address (a second listener);
//! an `ipip` backend decapsulates with `sip-dispatch decap`.
//!
//! For each mode and family, with a real XDP dispatcher and real SIPp:
//! - the client's namespace drops SIP from any source but the VIP (a stand-in for an
//!   address-restricted NAT), and every call completes, at exactly one backend;
//! - sipsak (a connected UDP socket) gets its OPTIONS answered through the VIP;
//! - b1 is drained while calls are in progress: they end on b1 (call affinity), new
//!   calls go to b2;
//! - with a route MTU of 1280 towards the backends: INVITEs of about 3 kB leave the client
//!   in fragments, and INVITEs of about 1.3 kB exceed the route MTU (ipip: with the
//!   outer header); both reach the backends through the slow path, which forwards them
//!   in the same mode, in fragments that fit.
//!
//! In `rewrite` mode the same client sees the answers come from the backends: sipsak
//! gets no answer and the NAT stand-in drops them (so these checks can fail).
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sip_dispatch_testbed::{
    Family, XdpMode,
    bed::{uac_problems, verdict},
    dispatcher::{self, BackendArg, Dispatcher, ExitStats, RunConfig},
    dsr::{DsrBackend, OnlyFromVip, prepare_backend},
    netns, preflight,
    responder::{Responder, udp_socket_in},
    scenario,
    sipp::{self, Scenario, UacSpec, Uas, UasReport, exactly_one_backend},
    topology::{Topology, TopologySpec},
};

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-forwarding")
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Two backends answering from the VIP (fields drop in order: the namespaces last).
struct DsrBed {
    uas: Vec<Option<Uas>>,
    /// Each backend's own address (where its health checks go).
    own: Vec<SocketAddr>,
    _health: Vec<Responder>,
    _dsr: Vec<DsrBackend>,
    _xdp_pass: Option<Dispatcher>,
    binary: PathBuf,
    dir: PathBuf,
    vip: SocketAddr,
    control: PathBuf,
    family: Family,
    topo: Topology,
}

impl DsrBed {
    fn build(name: &str, family: Family, decap: bool, bound: Duration) -> DsrBed {
        preflight::require_forwarding().expect("preflight");
        let binary = dispatcher::binary_path().expect("sip-dispatch binary");
        let dir = scenario::run_dir(&workdir(), name).expect("run dir");
        netns::cleanup_leftovers().expect("cleaning up leftovers");
        let topo = Topology::build(TopologySpec::dispatcher(2)).expect("topology");
        let vip = SocketAddr::new(topo.vip(family), sipp::SIP_PORT);
        let mut dsr = Vec::new();
        let mut uas = Vec::new();
        let mut own = Vec::new();
        let mut health = Vec::new();
        for (i, b) in topo.backends().enumerate() {
            dsr.push(
                prepare_backend(b, vip.ip(), decap, &binary, &dir)
                    .unwrap_or_else(|e| panic!("preparing {}: {e:#}", b.ns_name())),
            );
            let label = format!("uas-b{}", i + 1);
            uas.push(Some(
                Uas::start(b.ns_name(), vip.ip(), &dir, &label, bound).expect("UAS on the VIP"),
            ));
            let addr = SocketAddr::new(b.ip(family), sipp::SIP_PORT);
            health.push(Responder::start(b.ns_name(), &[addr]).expect("health listener"));
            own.push(addr);
        }
        let xdp_pass = scenario::start_xdp_pass(&topo, &binary, XdpMode::Native, &dir, true)
            .expect("xdp-pass on the peer");
        let control = dispatcher::control_socket(topo.tag()).expect("control socket path");
        DsrBed {
            uas,
            own,
            _health: health,
            _dsr: dsr,
            _xdp_pass: xdp_pass,
            binary,
            dir,
            vip,
            control,
            family,
            topo,
        }
    }

    fn start_daemon(&self, mode: &str) -> Dispatcher {
        let disp = self.topo.dispatcher().expect("dispatcher host");
        let mut run = RunConfig::new(&disp.iface, self.vip, XdpMode::Native);
        run.control = Some(self.control.clone());
        run.backends = self.own.iter().map(|a| BackendArg::new(*a, 1)).collect();
        run.extra = ["--forwarding", mode, "--health-interval", "200ms"]
            .map(str::to_owned)
            .to_vec();
        Dispatcher::run(&self.binary, disp.ns_name(), &run, &self.dir)
            .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"))
    }

    fn client_ns(&self) -> &str {
        self.topo.client().ns_name()
    }

    fn uac_spec(&self, calls: u32, rate: u32) -> UacSpec {
        UacSpec::calls(self.topo.client().ip(self.family), self.vip, calls, rate)
    }

    /// Stops the UASes; each report carries its backend's own address (every UAS is
    /// bound to the same VIP).
    fn stop_backends(&mut self) -> Vec<UasReport> {
        let own = self.own.clone();
        self.uas
            .iter_mut()
            .zip(own)
            .filter_map(|(u, addr)| u.take().map(|u| (u, addr)))
            .map(|(u, addr)| {
                let mut r = u.stop().expect("stopping a UAS");
                r.address = addr;
                r
            })
            .collect()
    }

    /// INVITEs backend `n` (from 1) received so far.
    fn invites_at(&self, n: usize) -> usize {
        self.uas[n - 1]
            .as_ref()
            .expect("UAS running")
            .received_request_lines()
            .unwrap_or_default()
            .iter()
            .filter(|l| l.starts_with("INVITE "))
            .count()
    }

    /// A route of MTU `mtu` from the dispatcher to each backend.
    fn limit_route_mtu(&self, mtu: u32) {
        let disp = self.topo.dispatcher().expect("dispatcher host");
        for b in &self.own {
            let prefix = if b.is_ipv6() { 128 } else { 32 };
            let route = format!("{}/{prefix}", b.ip());
            let mtu = mtu.to_string();
            disp.ns
                .ip([
                    "route",
                    "add",
                    &route,
                    "dev",
                    &disp.iface,
                    "mtu",
                    "lock",
                    &mtu,
                ])
                .unwrap_or_else(|e| panic!("route {route} mtu {mtu}: {e:#}"));
        }
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        dispatcher::cli(&self.binary, &self.control, args).expect("running the CLI")
    }
}

/// sipsak's OPTIONS to the VIP from a connected socket: Ok(output) when answered 200.
fn sipsak_options(ns: &str, vip: SocketAddr) -> Result<String, String> {
    let uri = format!("sip:ping@{}", sipp::host_port(vip));
    let out = Command::new("timeout")
        .args(["10", "ip", "netns", "exec", ns, "sipsak", "-vv", "-s", &uri])
        .output()
        .map_err(|e| format!("running sipsak: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.success() && text.contains("SIP/2.0 200") {
        true => Ok(text),
        false => Err(format!("sipsak {uri} ({}): {text}", out.status)),
    }
}

/// An OPTIONS from a connected UDP socket of the client (port 5080) to the VIP, sent
/// again after 0.5, 1, 2 and 4 s as a SIP client would (Timer A): Ok(time to the answer)
/// when a 200 comes back within 8 s. The kernel delivers a connected socket only
/// datagrams from the address it is connected to.
fn connected_options(ns: &str, local: IpAddr, vip: SocketAddr) -> Result<Duration, String> {
    let sock = udp_socket_in(ns, SocketAddr::new(local, 5080)).map_err(|e| format!("{e:#}"))?;
    sock.connect(vip).map_err(|e| format!("connect: {e}"))?;
    let host = |a: SocketAddr| sipp::host_port(a);
    let msg = format!(
        "OPTIONS sip:ping@{vip} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-sdt-connected\r\n\
         From: <sip:probe@{me}>;tag=sdt\r\nTo: <sip:ping@{vip}>\r\nCall-ID: connected-{me}\r\n\
         CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        vip = host(vip),
        me = host(SocketAddr::new(local, 5080)),
    );
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let mut wait = Duration::from_millis(500);
    for _ in 0..5 {
        sock.send(msg.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        sock.set_read_timeout(Some(wait))
            .map_err(|e| e.to_string())?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                let answer = String::from_utf8_lossy(&buf[..n]);
                return match answer.starts_with("SIP/2.0 200") {
                    true => Ok(started.elapsed()),
                    false => Err(format!("answered {:?}", answer.lines().next())),
                };
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                wait *= 2;
            }
            Err(e) => return Err(format!("receiving: {e}")),
        }
    }
    Err(format!("no answer within {:?}", started.elapsed()))
}

/// Waits until `cond` holds, up to `within`.
fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The whole check of one mode and family (see the module documentation).
fn answers_come_from_the_vip(mode: &str, family: Family) {
    let name = format!("{mode}-{}", if family == Family::V4 { "v4" } else { "v6" });
    let calls = 150;
    let big_calls = 20;
    let mid_calls = 10;
    let mut bed = DsrBed::build(&name, family, mode == "ipip", Duration::from_secs(90));
    let daemon = bed.start_daemon(mode);
    let nat = OnlyFromVip::install(bed.client_ns(), bed.vip.ip()).expect("NAT stand-in");
    let mut problems = Vec::new();
    let list = bed.cli(&["backends", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap_or_default();
    if list["services"][0]["forwarding"] != mode {
        problems.push(format!(
            "backends list shows forwarding {}",
            list["services"][0]["forwarding"]
        ));
    }

    // Connected sockets: only an answer from the VIP reaches them. sipsak takes no IPv6
    // address in its URI, so IPv6 has the test's own connected socket only.
    let client_ip = bed.topo.client().ip(family);
    match connected_options(bed.client_ns(), client_ip, bed.vip) {
        Ok(took) => eprintln!("[{name}] connected OPTIONS answered in {took:?}"),
        Err(e) => problems.push(format!("OPTIONS from a connected socket: {e}")),
    }
    if family == Family::V4
        && let Err(e) = sipsak_options(bed.client_ns(), bed.vip)
    {
        problems.push(format!("sipsak through the VIP: {e}"));
    }

    // Calls of 2 s; b1 is drained once it has taken 20 of them.
    let mut spec = bed.uac_spec(calls, 30);
    spec.extra = ["-d", "2000"].map(str::to_owned).to_vec();
    spec.bound += Duration::from_secs(5);
    let uac = sipp::Uac::start(bed.client_ns(), &spec, &bed.dir, "uac").expect("UAC");
    wait_until(Duration::from_secs(20), "b1 taking 20 calls", || {
        bed.invites_at(1) >= 20
    });
    let b1 = bed.own[0];
    let out = bed.cli(&["backends", "drain", &b1.to_string()]);
    let drained_at = now_epoch();
    assert!(
        out.status.success(),
        "drain {b1}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uac = uac.finish().expect("UAC");
    let per_call = uac.calls().expect("UAC calls");

    // A route MTU of 1280 towards the backends, smaller than the client's 1500: the
    // fast path's FIB lookup sees it, and so must the slow path's fragments.
    bed.limit_route_mtu(1280);

    // Large INVITEs: fragments, reassembled by the dispatcher's stack, forwarded by the
    // slow path (b1 is drained: they all go to b2).
    let mut big = bed.uac_spec(big_calls, 10);
    big.scenario = Scenario::File(scenario::big_invite(&bed.dir, 3000).expect("scenario"));
    big.call_id = "%u-big@%s".to_owned();
    let big_uac = sipp::run_uac(bed.client_ns(), &big, &bed.dir, "uac-big").expect("big UAC");
    let big_per_call = big_uac.calls().expect("big UAC calls");

    // INVITEs of about 1.3 kB: whole from the client, but over the route MTU (ipip: with
    // the outer header). The fast path passes them (ipip `pass_encap`, l2dsr
    // `pass_fib_miss`); the slow path fragments them to fit.
    let mut mid = bed.uac_spec(mid_calls, 10);
    mid.scenario = Scenario::File(scenario::big_invite(&bed.dir, 800).expect("scenario"));
    mid.call_id = "%u-mid@%s".to_owned();
    let mid_uac = sipp::run_uac(bed.client_ns(), &mid, &bed.dir, "uac-mid").expect("mid UAC");
    let mid_per_call = mid_uac.calls().expect("mid UAC calls");

    let dropped = nat.dropped().expect("NAT stand-in counter");
    let exit: ExitStats = daemon.stop_with_stats().expect("exit stats");
    let reports = bed.stop_backends();

    problems.extend(uac_problems(&uac, calls));
    problems.extend(exactly_one_backend(&per_call, &reports));
    problems.extend(
        uac_problems(&big_uac, big_calls)
            .into_iter()
            .map(|p| format!("large INVITEs: {p}")),
    );
    problems.extend(
        exactly_one_backend(&big_per_call, &reports)
            .into_iter()
            .map(|p| format!("large INVITEs: {p}")),
    );
    problems.extend(
        uac_problems(&mid_uac, mid_calls)
            .into_iter()
            .map(|p| format!("INVITEs over the route MTU: {p}")),
    );
    problems.extend(
        exactly_one_backend(&mid_per_call, &reports)
            .into_iter()
            .map(|p| format!("INVITEs over the route MTU: {p}")),
    );
    // The fast path carried the calls: every INVITE, ACK and BYE of the 2 s calls.
    let fast = exit.counter("xdp_tx") + exit.counter("xdp_redirect");
    if fast < u64::from(3 * calls) {
        problems.push(format!(
            "the fast path sent {fast} frames, fewer than the {} INVITEs, ACKs and BYEs: {:?}",
            3 * calls,
            exit.counters
        ));
    }
    if exit.counter("pass_not_on_link") != 0 {
        problems.push(format!("pass_not_on_link: {:?}", exit.counters));
    }
    let over_mtu = match mode {
        "ipip" => exit.counter("pass_encap"),
        _ => exit.counter("pass_fib_miss"),
    };
    if over_mtu < u64::from(mid_calls) {
        problems.push(format!(
            "{} INVITEs over the route MTU, but the fast path passed {over_mtu} as too big: {:?}",
            mid_calls, exit.counters
        ));
    }
    if dropped != 0 {
        problems.push(format!(
            "the NAT stand-in dropped {dropped} answers not from the VIP"
        ));
    }
    // The drain: calls in progress on b1 ended there, no new call went to b1.
    let at_b1 = reports[0].received().expect("b1's requests");
    let before: BTreeSet<&str> = at_b1
        .iter()
        .filter(|r| r.method == "INVITE" && r.at < drained_at)
        .map(|r| r.call_id.as_str())
        .collect();
    let new_after: Vec<&str> = at_b1
        .iter()
        .filter(|r| r.method == "INVITE" && r.at > drained_at + 0.5)
        .map(|r| r.call_id.as_str())
        .filter(|id| !before.contains(id))
        .collect();
    let byes_after = at_b1
        .iter()
        .filter(|r| r.method == "BYE" && r.at > drained_at)
        .count();
    if !new_after.is_empty() {
        problems.push(format!(
            "b1 took {} new calls after its drain, e.g. {:?}",
            new_after.len(),
            &new_after[..new_after.len().min(3)]
        ));
    }
    if byes_after == 0 {
        problems.push("no BYE reached b1 after its drain: its calls in progress moved".into());
    }
    let slow = exit.raw["slow_path"]["forwarded"].as_u64().unwrap_or(0);
    if slow < u64::from(big_calls + mid_calls) {
        problems.push(format!(
            "slow_path.forwarded = {slow}, expected at least {}: {}",
            big_calls + mid_calls,
            exit.raw["slow_path"]
        ));
    }
    if exit.counter("pass_fragment") == 0 {
        problems.push(format!("pass_fragment is 0: {:?}", exit.counters));
    }
    eprintln!(
        "[{name}] UAC {} ok / {} failed; large {} ok; over the route MTU {} ok ({over_mtu} passed as too big); calls per backend {:?}; b1: {} calls before the drain, {byes_after} BYEs after; NAT drops {dropped}; xdp_tx {} slow path {}",
        uac.successful,
        uac.failed,
        big_uac.successful,
        mid_uac.successful,
        reports
            .iter()
            .map(|r| (r.address.to_string(), r.calls.len()))
            .collect::<Vec<_>>(),
        before.len(),
        exit.counter("xdp_tx"),
        exit.raw["slow_path"]
    );
    verdict(&name, &bed.dir.clone(), problems);
}

#[test]
fn l2dsr_ipv4_answers_come_from_the_vip() {
    answers_come_from_the_vip("l2dsr", Family::V4);
}

#[test]
fn l2dsr_ipv6_answers_come_from_the_vip() {
    answers_come_from_the_vip("l2dsr", Family::V6);
}

#[test]
fn ipip_ipv4_answers_come_from_the_vip() {
    answers_come_from_the_vip("ipip", Family::V4);
}

#[test]
fn ipip_ipv6_answers_come_from_the_vip() {
    answers_come_from_the_vip("ipip", Family::V6);
}

/// In rewrite mode (backends listening on their own address, as usual) answers come
/// from the backends: the connected client gets none, and the NAT stand-in drops them.
#[test]
fn rewrite_answers_come_from_the_backends() {
    const NAME: &str = "rewrite-sipsak";
    let mut bed =
        sip_dispatch_testbed::bed::Bed::build(&workdir(), NAME, 2, Duration::from_secs(60));
    preflight::require_forwarding().expect("preflight");
    let daemon = bed.start_daemon(&bed.run_config(2));
    let client = bed.topo.client().ns_name().to_owned();
    let mut problems = Vec::new();
    match sipsak_options(&client, bed.vip) {
        Ok(out) => problems.push(format!("sipsak got an answer in rewrite mode: {out}")),
        Err(e) => eprintln!("[{NAME}] as expected: {}", e.lines().next().unwrap_or("")),
    }
    let nat = OnlyFromVip::install(&client, bed.vip.ip()).expect("NAT stand-in");
    let mut spec = bed.uac_spec(5, 5);
    spec.recv_timeout = Duration::from_secs(2);
    spec.bound = Duration::from_secs(15);
    let uac = bed.start_uac(&spec, "uac").finish().expect("UAC");
    let dropped = nat.dropped().expect("NAT counter");
    drop(nat);
    let _ = daemon.stop();
    let _ = bed.stop_backends();
    if uac.successful != 0 {
        problems.push(format!(
            "{} calls completed behind the NAT stand-in",
            uac.successful
        ));
    }
    if dropped == 0 {
        problems.push("the NAT stand-in dropped no answer from a backend".into());
    }
    eprintln!(
        "[{NAME}] UAC {} ok / {} failed; NAT drops {dropped}",
        uac.successful, uac.failed
    );
    verdict(NAME, Path::new(&bed.dir), problems);
}
