//! The operations test bed: SIPp backends behind a dispatcher namespace with the XDP_PASS
//! peer program, a private bpf filesystem for pins, and the verdict helpers shared by the
//! operations and crash tests.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

use crate::{
    Family, XdpMode,
    dispatcher::{self, BackendArg, Dispatcher, RunConfig},
    netns, preflight,
    process::{Line, Process},
    scenario,
    sipp::{self, UacReport, UacSpec, Uas, UasReport},
    topology::{Topology, TopologySpec},
    uas::ScriptedUas,
};

/// Lossy UTF-8 of a command's output.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A test network with backends b1..bN (SIPp UASes, or scripted ones) and the XDP_PASS
/// peer program.
/// Fields drop in order: the daemon slot is the caller's; here backends, then the pass
/// program, then the namespaces.
pub struct Bed {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub uas: Vec<Option<Uas>>,
    /// The backends of a bed built with [`Bed::build_scripted`] (else empty).
    pub scripted: Vec<ScriptedUas>,
    /// Backend addresses b1..bN.
    addresses: Vec<SocketAddr>,
    pub xdp_pass: Option<Dispatcher>,
    pub vip: SocketAddr,
    pub control: PathBuf,
    pub topo: Topology,
}

impl Bed {
    /// `workdir`: where the run directories go (a test binary's `CARGO_TARGET_TMPDIR`).
    pub fn build(workdir: &Path, name: &str, backends: u8, bound: Duration) -> Bed {
        Bed::build_family(workdir, name, backends, bound, Family::V4)
    }

    /// A bed whose VIP and SIPp backends are of `family`.
    pub fn build_family(
        workdir: &Path,
        name: &str,
        backends: u8,
        bound: Duration,
        family: Family,
    ) -> Bed {
        Bed::build_with(workdir, name, backends, family, |topo, dir| {
            let uas: Vec<Uas> =
                scenario::start_backends(topo, family, dir, bound).expect("UAS backends");
            (uas.into_iter().map(Some).collect(), Vec::new())
        })
    }

    /// A bed whose backends are [`ScriptedUas`]es (IPv4), one per backend host, in
    /// `scripted` (none in `uas`).
    pub fn build_scripted(workdir: &Path, name: &str, backends: u8) -> Bed {
        Bed::build_with(workdir, name, backends, Family::V4, |topo, _| {
            let scripted = topo
                .backends()
                .map(|h| {
                    let addr = SocketAddr::new(h.ip(Family::V4), sipp::SIP_PORT);
                    ScriptedUas::start(h.ns_name(), &[addr]).expect("scripted UAS")
                })
                .collect();
            (Vec::new(), scripted)
        })
    }

    fn build_with(
        workdir: &Path,
        name: &str,
        backends: u8,
        family: Family,
        start: impl FnOnce(&Topology, &Path) -> (Vec<Option<Uas>>, Vec<ScriptedUas>),
    ) -> Bed {
        preflight::require_all().expect("preflight");
        let binary = dispatcher::binary_path().expect("sip-dispatch binary");
        let dir = scenario::run_dir(workdir, name).expect("run dir");
        netns::cleanup_leftovers().expect("cleaning up leftovers");
        let topo = Topology::build(TopologySpec::dispatcher(backends)).expect("topology");
        let addresses = topo
            .backends()
            .map(|h| SocketAddr::new(h.ip(family), sipp::SIP_PORT))
            .collect();
        let (uas, scripted) = start(&topo, &dir);
        let xdp_pass = scenario::start_xdp_pass(&topo, &binary, XdpMode::Native, &dir, true)
            .expect("xdp-pass on the peer");
        let vip = SocketAddr::new(topo.vip(family), sipp::SIP_PORT);
        let control = dispatcher::control_socket(topo.tag()).expect("control socket path");
        Bed {
            binary,
            dir,
            uas,
            scripted,
            addresses,
            xdp_pass,
            vip,
            control,
            topo,
        }
    }

    /// Backend `n` (from 1).
    pub fn backend(&self, n: usize) -> SocketAddr {
        self.addresses[n - 1]
    }

    /// The daemon's metrics page at `addr` (one GET from inside the dispatcher's
    /// namespace), HTTP header included; panics with the reason when it cannot be read.
    pub fn scrape_metrics(&self, addr: SocketAddr) -> String {
        let get = move || -> std::io::Result<String> {
            use std::io::{Read as _, Write as _};
            let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: sd\r\n\r\n")?;
            let mut out = String::new();
            stream.read_to_string(&mut out)?;
            Ok(out)
        };
        crate::rawnet::in_netns(&self.disp_ns(), get)
            .expect("a thread in the namespace")
            .unwrap_or_else(|e| panic!("scraping the metrics at {addr}: {e}"))
    }

    pub fn disp_ns(&self) -> String {
        self.topo.dispatcher().unwrap().ns_name().to_owned()
    }

    pub fn iface(&self) -> String {
        self.topo.dispatcher().unwrap().iface.clone()
    }

    /// A run configuration with backends `1..=n`, weight 1 each, and the control socket.
    pub fn run_config(&self, n: usize) -> RunConfig {
        let mut run = RunConfig::new(&self.iface(), self.vip, XdpMode::Native);
        run.control = Some(self.control.clone());
        run.backends = (1..=n)
            .map(|i| BackendArg::new(self.backend(i), 1))
            .collect();
        run
    }

    pub fn start_daemon(&self, run: &RunConfig) -> Dispatcher {
        Dispatcher::run(&self.binary, &self.disp_ns(), run, &self.dir)
            .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"))
    }

    pub fn uac_spec(&self, calls: u32, rate: u32) -> UacSpec {
        UacSpec::calls(self.topo.client().ip(Family::V4), self.vip, calls, rate)
    }

    pub fn start_uac(&self, spec: &UacSpec, label: &str) -> sipp::Uac {
        sipp::Uac::start(self.topo.client().ns_name(), spec, &self.dir, label).expect("UAC")
    }

    /// Stops every backend and returns what each saw.
    pub fn stop_backends(&mut self) -> Vec<UasReport> {
        self.uas
            .iter_mut()
            .filter_map(Option::take)
            .map(|u| u.stop().expect("stopping a UAS"))
            .collect()
    }

    /// The CLI (from the root namespace: the control socket is a file path).
    pub fn cli(&self, args: &[&str]) -> Output {
        dispatcher::cli(&self.binary, &self.control, args).expect("running the CLI")
    }

    /// The CLI run in the background (from the dispatcher's namespace), e.g. `backends
    /// drain ADDR --wait`, which returns only when the backend's calls are done. It is
    /// stopped if it still runs after `bound`.
    pub fn cli_background(&self, args: &[&str], label: &str, bound: Duration) -> BackgroundCli {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        all.insert(1, format!("--control={}", self.control.display()));
        let binary = self.binary.to_string_lossy().into_owned();
        let (ns, dir, label) = (self.disp_ns(), self.dir.clone(), label.to_owned());
        let started = Instant::now();
        let thread = std::thread::spawn(move || -> Result<BackgroundExit> {
            let mut cli = Process::spawn(&ns, &binary, &all, &dir, &label)?;
            let status = cli.wait_timeout(bound)?;
            let ended = Instant::now();
            let Some(status) = status else {
                let _ = cli.stop();
                bail!("`{}` still ran after {bound:?}", cli.command_line());
            };
            let stdout = cli.stdout_lines();
            cli.collect()?;
            Ok(BackgroundExit {
                status,
                ended,
                stdout: stdout.lines(),
                stderr: cli.stderr_tail(20),
            })
        });
        BackgroundCli { started, thread }
    }

    /// The CLI, expecting success and JSON on stdout.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`sip-dispatch {}` failed ({}): {}",
            args.join(" "),
            out.status,
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`sip-dispatch {}` printed no JSON ({e}): {}",
                args.join(" "),
                text(&out.stdout)
            )
        })
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for u in self.uas.iter_mut().filter_map(Option::take) {
            let _ = u.stop();
        }
        self.scripted.clear();
        if let Some(p) = self.xdp_pass.take() {
            let _ = p.stop();
        }
    }
}

/// A CLI command running in the background (see [`Bed::cli_background`]).
pub struct BackgroundCli {
    /// When it was started.
    pub started: Instant,
    thread: std::thread::JoinHandle<Result<BackgroundExit>>,
}

/// How a background CLI command ended.
#[derive(Debug)]
pub struct BackgroundExit {
    pub status: std::process::ExitStatus,
    /// When it ended (seen within 10 ms).
    pub ended: Instant,
    /// Its stdout lines, each stamped when read.
    pub stdout: Vec<Line>,
    /// The end of its stderr.
    pub stderr: String,
}

impl BackgroundCli {
    /// Waits for it (bounded by the `bound` it was started with).
    pub fn finish(self) -> Result<BackgroundExit> {
        self.thread
            .join()
            .map_err(|_| anyhow!("the thread running the CLI panicked"))?
    }
}

/// A bpf filesystem mounted on a fresh directory of the root namespace; unmounted (and
/// the directory removed) on drop.
pub struct BpfFs(PathBuf);

impl BpfFs {
    pub fn mount(tag: &str) -> BpfFs {
        let dir = PathBuf::from(format!("/run/sdt-bpffs-{tag}"));
        std::fs::create_dir_all(&dir).expect("creating the bpffs mount point");
        let fs = BpfFs(dir);
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&fs.0)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mount -t bpf bpf {}: {}",
            fs.0.display(),
            text(&out.stderr)
        );
        fs
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// How long a daemon may take to adopt a pinned XDP link.
const TAKEOVER_WITHIN: Duration = Duration::from_secs(10);

/// Waits (bounded) until `daemon` logs that it took over the pinned XDP link.
pub fn wait_takeover(daemon: &Dispatcher, label: &str) {
    daemon
        .log()
        .wait_message(0, TAKEOVER_WITHIN, &["took over the XDP link"])
        .unwrap_or_else(|e| panic!("{label}: {e:#}"));
}

/// What is wrong with a UAC run that should have completed `calls` calls.
pub fn uac_problems(uac: &UacReport, calls: u32) -> Vec<String> {
    let mut p = Vec::new();
    if uac.failed != 0 || uac.exit_code != Some(0) || uac.successful != u64::from(calls) {
        p.push(format!("UAC: {}", uac.failure_summary()));
    }
    p
}

/// Fails with every problem listed (and where the logs are); removes the logs on success.
pub fn verdict(name: &str, dir: &Path, problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{name}:\n  - {}\nlogs: {}",
        problems.join("\n  - "),
        dir.display()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The backends of the first service in `backends list --json`: address → entry.
pub fn listed(list: &Value) -> BTreeMap<SocketAddr, Value> {
    list["services"][0]["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no services[0].backends in {list}"))
        .iter()
        .map(|b| {
            let a = b["address"].as_str().expect("address").parse().unwrap();
            (a, b.clone())
        })
        .collect()
}

pub fn share_sum(list: &BTreeMap<SocketAddr, Value>) -> f64 {
    list.values()
        .map(|b| b["share"].as_f64().unwrap_or(0.0))
        .sum()
}

/// Polls `backends list --json` until `accept` likes it (bounded).
pub fn wait_list(
    bed: &Bed,
    timeout: Duration,
    what: &str,
    accept: impl Fn(&BTreeMap<SocketAddr, Value>) -> bool,
) -> BTreeMap<SocketAddr, Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = listed(&bed.cli_json(&["backends", "list", "--json"]));
        if accept(&list) {
            return list;
        }
        if Instant::now() >= deadline {
            panic!("backends list never showed {what} within {timeout:?}: {list:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn state(list: &BTreeMap<SocketAddr, Value>, a: SocketAddr) -> Option<&str> {
    list.get(&a).and_then(|b| b["state"].as_str())
}
