//! Part 2: forwarding throughput on veths in network namespaces, and the shared test bed
//! of parts 2 and 3.
//!
//! The test bed is the testbed crate's topology: a client, the dispatcher (VIP
//! 198.18.0.100 on `v-disp`) and three backends, each in its own namespace with a veth
//! into one bridge (the "switch" namespace). Static bridge entries keep unknown-unicast
//! flooding out of the counts.
//!
//! The generator (`generator.rs`), pinned to CPU 0 in the switch namespace, writes
//! INVITEs (the typical 900-byte INVITE, a zero UDP checksum, every Call-ID different)
//! straight into the dispatcher's veth peer `s-disp`, at full speed. What reaches the
//! backends is read from the receive counters of their veths; what was offered from the
//! transmit (and drop) counters of `s-disp`. Per system under test:
//! - `ceiling`: the MAC-swap program in native mode: frames bounce to the source MAC,
//!   which the generator sets to backend 1's, so they reach backend 1 like dispatched
//!   frames reach theirs;
//! - `native` / `skb`: `sip-dispatch run` in native mode (with XDP_PASS on `s-disp`,
//!   which veth needs) and in skb mode;
//! - `stack`: no XDP at all, the kernel stack delivers to a UDP socket on the VIP (read by
//!   a thread pinned to CPU 1): what a userspace dispatcher gets to see at most;
//! - `kamailio`: Kamailio 5.6 (pinned to CPU 1) forwarding statelessly.
//!
//! The backends answer the dispatcher's OPTIONS health checks from a thread each; a
//! socket filter lets the kernel drop the INVITEs at their sockets.
//!
//! CPU: on veth, the receive side (XDP, the stack, the bridge, the backends) runs in
//! softirq on the sending CPU, i.e. inside the generator's time on CPU 0; userspace
//! receivers (Kamailio, the UDP socket reader) run on CPU 1. CPU time is summed over the
//! tasks involved (the generator, ksoftirqd, every process in the dispatcher's namespace,
//! the socket reader) from /proc, so other load on the machine does not count. The
//! generator's own cost is measured first (into a veth whose peer is down, where frames
//! are dropped at once) and subtracted per offered frame: what remains is the cost of
//! receiving, dispatching and delivering. The program's ns/packet under load comes from
//! `kernel.bpf_stats_enabled=1` (run_time_ns / run_cnt), set only for a short extra
//! window after the measured one, and restored.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::programs::{Xdp, XdpMode};
use serde::Serialize;
use serde_json::Value;
use sip_dispatch::dataplane::{attach_pass, load_mac_swap};
use sip_dispatch_common::PROG_MAC_SWAP;
use sip_dispatch_testbed::{
    cmd,
    dispatcher::{BackendArg, Dispatcher, RunConfig, XdpMode as DaemonMode},
    frames::mac_text,
    link::{link_json, mac_address, xdp_prog_id},
    netns,
    process::Process,
    sipp::SIP_PORT,
    topology::{Family, Topology, TopologySpec},
};

use crate::{
    Plan, brief, generator, kamailio, messages, note,
    nsthread::{self, NsThread},
    sleep,
};

/// The generator's CPU, and the CPU of userspace systems under test.
pub const GEN_CPU: usize = 0;
pub const SUT_CPU: usize = 1;

pub struct BackendHost {
    pub ns: String,
    pub iface: String,
    pub addr: SocketAddr,
    pub mac: [u8; 6],
}

/// The topology shared by the throughput and end-to-end parts.
pub struct Bed {
    pub topo: Topology,
    pub logs: PathBuf,
    pub daemon: PathBuf,
    pub vip: SocketAddr,
    pub client: SocketAddr,
    pub client_ns: String,
    pub disp_ns: String,
    pub disp_if: String,
    pub disp_mac: [u8; 6],
    pub switch_ns: String,
    pub switch_disp_if: String,
    pub backends: Vec<BackendHost>,
}

impl Bed {
    pub fn build(daemon: &Path, logs: &Path) -> Result<Bed> {
        netns::cleanup_leftovers()?;
        let topo = Topology::build(TopologySpec::dispatcher(3))?;
        let disp = topo.dispatcher()?;
        let switch_ns = topo.switch().name().to_owned();
        let client = topo.client();
        let mut backends = Vec::new();
        for b in topo.backends() {
            backends.push(BackendHost {
                ns: b.ns_name().to_owned(),
                iface: b.iface.clone(),
                addr: SocketAddr::new(b.ip(Family::V4), SIP_PORT),
                mac: mac_address(b.ns_name(), &b.iface)?,
            });
        }
        // Static entries: the bridge never floods a unicast frame to every port.
        let mut ports: Vec<([u8; 6], &str)> = vec![
            (
                mac_address(disp.ns_name(), &disp.iface)?,
                &disp.switch_iface,
            ),
            (
                mac_address(client.ns_name(), &client.iface)?,
                &client.switch_iface,
            ),
        ];
        for (b, host) in backends.iter().zip(topo.backends()) {
            ports.push((b.mac, &host.switch_iface));
        }
        for (mac, port) in ports {
            cmd::run(
                "bridge",
                [
                    "-n",
                    &switch_ns,
                    "fdb",
                    "replace",
                    &mac_text(mac),
                    "dev",
                    port,
                    "master",
                    "static",
                ],
            )?;
        }
        let bed = Bed {
            vip: SocketAddr::new(topo.vip(Family::V4), SIP_PORT),
            client: SocketAddr::new(client.ip(Family::V4), 5070),
            client_ns: client.ns_name().to_owned(),
            disp_ns: disp.ns_name().to_owned(),
            disp_if: disp.iface.clone(),
            disp_mac: mac_address(disp.ns_name(), &disp.iface)?,
            switch_disp_if: disp.switch_iface.clone(),
            switch_ns,
            backends,
            logs: logs.to_owned(),
            daemon: daemon.to_owned(),
            topo,
        };
        note(format!(
            "namespaces {}; VIP {} on {}",
            bed.topo.tag(),
            bed.vip,
            bed.disp_if
        ));
        Ok(bed)
    }

    pub fn backend_addrs(&self) -> Vec<SocketAddr> {
        self.backends.iter().map(|b| b.addr).collect()
    }

    /// `sip-dispatch run` on the dispatcher's veth, waiting for its ready line and for
    /// every backend in its table.
    pub fn start_daemon(
        &self,
        mode: DaemonMode,
        extra: &[&str],
        label: &str,
    ) -> Result<Dispatcher> {
        let mut run = RunConfig::new(&self.disp_if, self.vip, mode);
        run.extra = extra.iter().map(|a| a.to_string()).collect();
        run.backends = self
            .backends
            .iter()
            .map(|b| BackendArg::new(b.addr, 1))
            .collect();
        let d = Dispatcher::start(&self.daemon, &self.disp_ns, &run.args(), &self.logs, label)?;
        let want = format!("backends={}", self.backends.len());
        ensure!(
            d.ready_line.contains(&want),
            "the dispatcher started without every backend up: {}",
            d.ready_line
        );
        Ok(d)
    }

    /// XDP_PASS on the switch side of the dispatcher's veth: veth drops native XDP_TX
    /// frames unless the receiving peer runs XDP.
    pub fn hold_xdp_pass(&self) -> Result<NsThread<()>> {
        let iface = self.switch_disp_if.clone();
        NsThread::spawn(&self.switch_ns, "xdp-pass", move |ctl| {
            let held = attach_pass(&iface)?;
            ctl.ready(0);
            ctl.park();
            drop(held);
            Ok(())
        })
    }
}

/// The MAC-swap program attached natively to `iface` in `ns`; the value is its id.
fn hold_mac_swap(ns: &str, iface: &str) -> Result<NsThread<()>> {
    let iface = iface.to_owned();
    NsThread::spawn(ns, "mac-swap", move |ctl| {
        let mut ebpf = load_mac_swap()?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROG_MAC_SWAP)
            .context("mac_swap missing")?
            .try_into()?;
        let link = prog
            .attach(&iface, XdpMode::Driver)
            .with_context(|| format!("attaching mac_swap to {iface}"))?;
        ctl.ready(u64::from(prog.info()?.id()));
        ctl.park();
        prog.detach(link)?;
        Ok(())
    })
}

struct LinkCounters {
    rx_packets: u64,
    tx_packets: u64,
    tx_dropped: u64,
}

fn link_counters(ns: &str, iface: &str) -> Result<LinkCounters> {
    let v = link_json(ns, iface)?;
    let s = &v["stats64"];
    let n = |x: &Value| x.as_u64().unwrap_or(0);
    Ok(LinkCounters {
        rx_packets: n(&s["rx"]["packets"]),
        tx_packets: n(&s["tx"]["packets"]),
        tx_dropped: n(&s["tx"]["dropped"]),
    })
}

/// `kernel.bpf_stats_enabled=1` until dropped, then the previous value again.
struct BpfStats {
    old: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let old = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_owned();
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(BpfStats { old })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS, &self.old) {
            eprintln!("sd-bench: cannot restore {BPF_STATS} to {}: {e}", self.old);
        }
    }
}

/// (run_time_ns, run_cnt) of a program, from `bpftool prog show id N`.
fn prog_run_stats(id: u32) -> Result<(u64, u64)> {
    let out =
        cmd::stdout(Command::new("bpftool").args(["prog", "show", "id", &id.to_string(), "-j"]))?;
    let v: Value = serde_json::from_str(&out).context("parsing bpftool's JSON")?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok((n("run_time_ns"), n("run_cnt")))
}

/// Clock ticks per second of the /proc CPU times.
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// utime + stime of a task, from its `stat` file.
fn task_ticks(stat: &Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(stat) else {
        return 0;
    };
    let Some((_, rest)) = text.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Busy ticks of the whole machine (everything but idle and iowait), /proc/stat.
fn machine_busy_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    line.split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse::<u64>().ok())
        .enumerate()
        .filter(|(i, _)| !matches!(i, 3 | 4))
        .take(8)
        .map(|(_, v)| v)
        .sum()
}

/// The kernel's softirq threads (they take over packet processing under load).
fn ksoftirqd_stats() -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .map(|e| e.path().join("stat"))
        .collect()
}

/// The tasks whose CPU time is counted.
struct Tasks(Vec<PathBuf>);

impl Tasks {
    fn collect(namespaces: &[&str], threads: &[i32]) -> Tasks {
        let mut stats = ksoftirqd_stats();
        for ns in namespaces {
            stats.extend(
                netns::pids(ns)
                    .into_iter()
                    .map(|p| PathBuf::from(format!("/proc/{p}/stat"))),
            );
        }
        stats.extend(
            threads
                .iter()
                .map(|t| PathBuf::from(format!("/proc/self/task/{t}/stat"))),
        );
        Tasks(stats)
    }

    fn ticks(&self) -> u64 {
        self.0.iter().map(|p| task_ticks(p)).sum()
    }
}

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sut {
    Ceiling,
    Native,
    NativeAffinityOff,
    Skb,
    Stack,
    Kamailio,
}

impl Sut {
    pub const ALL: [Sut; 6] = [
        Sut::Ceiling,
        Sut::Native,
        Sut::NativeAffinityOff,
        Sut::Skb,
        Sut::Stack,
        Sut::Kamailio,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Sut::Ceiling => "ceiling",
            Sut::Native => "native",
            Sut::NativeAffinityOff => "native_affinity_off",
            Sut::Skb => "skb",
            Sut::Stack => "stack",
            Sut::Kamailio => "kamailio",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Sut::Ceiling => "MAC-swap XDP_TX (ceiling)",
            Sut::Native => "sip-dispatch, native XDP",
            Sut::NativeAffinityOff => "sip-dispatch, native XDP, --affinity off",
            Sut::Skb => "sip-dispatch, skb XDP",
            Sut::Stack => "no XDP: stack to a UDP socket (not forwarded)",
            Sut::Kamailio => "Kamailio 5.6 ds_select_dst + forward",
        }
    }
}

/// What a system under test holds while it is measured.
#[derive(Default)]
struct Running {
    xdp: Vec<NsThread<()>>,
    daemon: Option<Dispatcher>,
    kamailio: Option<Process>,
    sink: Option<NsThread<()>>,
    sink_count: Arc<AtomicU64>,
    prog_id: Option<u32>,
    threads: Vec<i32>,
}

impl Running {
    fn start(bed: &Bed, sut: Sut) -> Result<Running> {
        let mut r = Running::default();
        match sut {
            Sut::Ceiling => {
                r.xdp.push(bed.hold_xdp_pass()?);
                let mac = hold_mac_swap(&bed.disp_ns, &bed.disp_if)?;
                r.prog_id = Some(mac.value as u32);
                r.xdp.push(mac);
            }
            Sut::Native | Sut::NativeAffinityOff | Sut::Skb => {
                let mode = if sut == Sut::Skb {
                    DaemonMode::Skb
                } else {
                    r.xdp.push(bed.hold_xdp_pass()?);
                    DaemonMode::Native
                };
                let extra: &[&str] = if sut == Sut::NativeAffinityOff {
                    &["--affinity", "off"]
                } else {
                    &[]
                };
                r.daemon =
                    Some(bed.start_daemon(mode, extra, &format!("sip-dispatch-{}", sut.key()))?);
                r.prog_id = Some(
                    xdp_prog_id(&bed.disp_ns, &bed.disp_if)?
                        .context("no XDP program on the dispatcher's interface")?,
                );
            }
            Sut::Stack => {
                let sink =
                    nsthread::udp_sink(&bed.disp_ns, bed.vip, SUT_CPU, r.sink_count.clone())?;
                r.threads.push(sink.value as i32);
                r.sink = Some(sink);
            }
            Sut::Kamailio => {
                r.kamailio = Some(kamailio::start(
                    &bed.disp_ns,
                    bed.vip,
                    &bed.backend_addrs(),
                    &bed.logs,
                    "kamailio-throughput",
                    SUT_CPU,
                )?);
            }
        }
        Ok(r)
    }

    /// Stops everything; returns notes (the dispatcher's counters).
    fn finish(mut self) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        if let Some(d) = self.daemon.take() {
            let stats = d.stop_with_stats()?;
            let counters: Vec<String> = stats
                .counters
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            notes.push(format!("dispatcher counters: {}", counters.join(" ")));
        }
        if let Some(mut k) = self.kamailio.take() {
            k.stop()?;
        }
        if let Some(s) = self.sink.take() {
            s.stop()?;
        }
        for t in self.xdp.drain(..) {
            t.stop()?;
        }
        Ok(notes)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct GeneratorFloor {
    /// Frames per second the generator sends when the receiver costs nothing.
    pub pps: f64,
    /// Its CPU-seconds per million frames.
    pub cpu_s_per_mpkt: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SystemRun {
    pub key: &'static str,
    pub label: &'static str,
    pub window_s: f64,
    /// Frames the generator put on the dispatcher's veth (sent or dropped there), per second.
    pub offered_pps: f64,
    /// Frames that reached the backends (the socket, for `stack`), per second.
    pub delivered_pps: f64,
    /// 1 - delivered / offered.
    pub loss: f64,
    pub per_backend_pps: Vec<f64>,
    /// CPU-seconds of the tasks involved in the window (generator included).
    pub cpu_s: f64,
    /// Of which the generator's own share (its floor cost times the frames offered).
    pub generator_cpu_s: f64,
    /// cpu_s - generator_cpu_s: receiving, dispatching, delivering.
    pub net_cpu_s: f64,
    /// Busy CPU-seconds of the whole machine in the window, and the CPUs' worth of it
    /// that other load took (not counted above).
    pub machine_cpu_s: f64,
    pub other_load_cpus: f64,
    pub gross_cpu_s_per_mpkt: f64,
    pub net_cpu_s_per_mpkt: f64,
    /// Delivered packets per net CPU-second.
    pub delivered_per_cpu_s: f64,
    /// The XDP program's ns/packet under this load (bpf_stats), and the runs counted.
    pub live_ns_per_packet: Option<f64>,
    pub live_runs: Option<u64>,
    /// Delivered pps of every round (the best one is reported).
    pub rounds_delivered_pps: Vec<f64>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub frame_bytes: usize,
    /// Rounds over all systems; each system's best round is reported.
    pub rounds: usize,
    pub generator: GeneratorFloor,
    pub runs: Vec<SystemRun>,
    /// Systems that could not be measured, with why.
    pub failed: Vec<String>,
    pub options_answered: u64,
}

impl Throughput {
    pub fn get(&self, key: &str) -> Option<&SystemRun> {
        self.runs.iter().find(|r| r.key == key)
    }
}

struct Sample {
    at: Instant,
    offered: u64,
    backend_rx: Vec<u64>,
    sink: u64,
    task_ticks: u64,
    machine_ticks: u64,
}

fn sample(bed: &Bed, dev_ns: &str, dev: &str, tasks: &Tasks, sink: &AtomicU64) -> Result<Sample> {
    let start = Instant::now();
    let task_ticks = tasks.ticks();
    let machine_ticks = machine_busy_ticks();
    let sink = sink.load(Ordering::Relaxed);
    let mut backend_rx = Vec::new();
    for b in &bed.backends {
        backend_rx.push(link_counters(&b.ns, &b.iface)?.rx_packets);
    }
    let out = link_counters(dev_ns, dev)?;
    Ok(Sample {
        at: start + start.elapsed() / 2,
        offered: out.tx_packets + out.tx_dropped,
        backend_rx,
        sink,
        task_ticks,
        machine_ticks,
    })
}

/// The generator's frame: (frame, offset of the Call-ID letters).
type Frame = (Vec<u8>, usize);

/// Starts the generator on `dev` of the switch namespace for at most `bound`.
fn start_generator(bed: &Bed, frame: &Frame, dev: &str, bound: Duration) -> Result<NsThread<u64>> {
    // At most 5 Mpps for the whole bound: it stops by count even if not stopped.
    let max_frames = 5_000_000 * bound.as_secs().max(1);
    generator::start(
        &bed.switch_ns,
        dev,
        frame.0.clone(),
        frame.1,
        GEN_CPU,
        max_frames,
        bound,
    )
}

fn check_running(generator: &NsThread<u64>) -> Result<()> {
    ensure!(generator.is_running(), "the generator stopped early");
    Ok(())
}

/// The generator alone: into a veth whose peer is down (frames dropped at once).
fn calibrate(bed: &Bed, plan: &Plan, frame: &Frame) -> Result<GeneratorFloor> {
    let (dev, peer) = ("sdb-floor", "sdb-floor-p");
    let sw = &bed.switch_ns;
    cmd::run(
        "ip",
        [
            "-n", sw, "link", "add", dev, "type", "veth", "peer", "name", peer,
        ],
    )?;
    let result = (|| {
        cmd::run("ip", ["-n", sw, "link", "set", dev, "up"])?;
        let generator = start_generator(bed, frame, dev, plan.calibrate * 3)?;
        sleep(plan.warmup)?;
        check_running(&generator)?;
        let tasks = Tasks::collect(&[], &[generator.value as i32]);
        let none = AtomicU64::new(0);
        let a = sample(bed, sw, dev, &tasks, &none)?;
        sleep(plan.calibrate)?;
        let b = sample(bed, sw, dev, &tasks, &none)?;
        check_running(&generator)?;
        generator.stop()?;
        let secs = (b.at - a.at).as_secs_f64();
        let frames = (b.offered - a.offered).max(1) as f64;
        let cpu = (b.task_ticks - a.task_ticks) as f64 / clk_tck();
        Ok(GeneratorFloor {
            pps: frames / secs,
            cpu_s_per_mpkt: cpu / frames * 1e6,
        })
    })();
    let _ = cmd::run("ip", ["-n", sw, "link", "del", dev]);
    result
}

fn measure(
    bed: &Bed,
    plan: &Plan,
    sut: Sut,
    frame: &Frame,
    floor: &GeneratorFloor,
) -> Result<SystemRun> {
    let running = Running::start(bed, sut)?;
    let bound = plan.warmup + plan.window + plan.stats_window + Duration::from_secs(10);
    let generator = start_generator(bed, frame, &bed.switch_disp_if, bound)?;
    sleep(plan.warmup)?;
    check_running(&generator)?;
    let mut threads = running.threads.clone();
    threads.push(generator.value as i32);
    let tasks = Tasks::collect(&[&bed.switch_ns, &bed.disp_ns], &threads);
    let sink = running.sink_count.clone();
    let a = sample(bed, &bed.switch_ns, &bed.switch_disp_if, &tasks, &sink)?;
    sleep(plan.window)?;
    let b = sample(bed, &bed.switch_ns, &bed.switch_disp_if, &tasks, &sink)?;
    check_running(&generator)?;
    let live = match running.prog_id {
        Some(id) => {
            let _stats = BpfStats::enable()?;
            let (t0, n0) = prog_run_stats(id)?;
            sleep(plan.stats_window)?;
            let (t1, n1) = prog_run_stats(id)?;
            let runs = n1.saturating_sub(n0);
            Some(((t1.saturating_sub(t0)) as f64 / runs.max(1) as f64, runs))
        }
        None => None,
    };
    generator.stop()?;
    let notes = running.finish()?;

    let secs = (b.at - a.at).as_secs_f64();
    let offered = b.offered.saturating_sub(a.offered) as f64;
    let per_backend: Vec<f64> = b
        .backend_rx
        .iter()
        .zip(&a.backend_rx)
        .map(|(x, y)| x.saturating_sub(*y) as f64)
        .collect();
    let delivered = if sut == Sut::Stack {
        b.sink.saturating_sub(a.sink) as f64
    } else {
        per_backend.iter().sum()
    };
    let tck = clk_tck();
    let cpu_s = b.task_ticks.saturating_sub(a.task_ticks) as f64 / tck;
    let machine_cpu_s = b.machine_ticks.saturating_sub(a.machine_ticks) as f64 / tck;
    let generator_cpu_s = floor.cpu_s_per_mpkt * offered / 1e6;
    let net_cpu_s = (cpu_s - generator_cpu_s).max(1e-9);
    let per_m = |cpu: f64| cpu / delivered.max(1.0) * 1e6;
    let run = SystemRun {
        key: sut.key(),
        label: sut.label(),
        window_s: secs,
        offered_pps: offered / secs,
        delivered_pps: delivered / secs,
        loss: if offered > 0.0 {
            (1.0 - delivered / offered).max(0.0)
        } else {
            0.0
        },
        per_backend_pps: per_backend.iter().map(|p| p / secs).collect(),
        cpu_s,
        generator_cpu_s,
        net_cpu_s,
        machine_cpu_s,
        other_load_cpus: ((machine_cpu_s - cpu_s) / secs).max(0.0),
        gross_cpu_s_per_mpkt: per_m(cpu_s),
        net_cpu_s_per_mpkt: per_m(net_cpu_s),
        delivered_per_cpu_s: delivered / net_cpu_s,
        live_ns_per_packet: live.map(|l| l.0),
        live_runs: live.map(|l| l.1),
        rounds_delivered_pps: Vec::new(),
        notes,
    };
    note(format!(
        "{:<46} offered {:>9.0} pps  delivered {:>9.0} pps  loss {:>5.1} %  CPU {:>5.2} s (net {:>5.2} s, {:.2} s/M){}",
        run.label,
        run.offered_pps,
        run.delivered_pps,
        run.loss * 100.0,
        run.cpu_s,
        run.net_cpu_s,
        run.net_cpu_s_per_mpkt,
        run.live_ns_per_packet
            .map_or(String::new(), |ns| format!("  live {ns:.0} ns/pkt"))
    ));
    Ok(run)
}

pub fn run(bed: &Bed, plan: &Plan) -> Result<Throughput> {
    // The source MAC is backend 1's: what the MAC swap bounces goes there.
    let frame = messages::generator_frame(bed.client, bed.vip, bed.backends[0].mac, bed.disp_mac);
    let frame_bytes = frame.0.len();
    let responders = bed
        .backends
        .iter()
        .map(|b| nsthread::options_responder(&b.ns, b.addr))
        .collect::<Result<Vec<_>>>()?;
    let floor = calibrate(bed, plan, &frame)?;
    note(format!(
        "generator alone: {:.0} pps, {:.3} CPU-s per million frames ({} B frames)",
        floor.pps, floor.cpu_s_per_mpkt, frame_bytes
    ));
    // Rounds interleave the systems; each keeps its best round (other load on the
    // machine only ever lowers a throughput figure).
    let mut rounds: Vec<Vec<SystemRun>> = vec![Vec::new(); Sut::ALL.len()];
    let mut failed = Vec::new();
    for round in 0..plan.rounds {
        if plan.rounds > 1 {
            note(format!("round {} of {}", round + 1, plan.rounds));
        }
        for (i, sut) in Sut::ALL.into_iter().enumerate() {
            match measure(bed, plan, sut, &frame, &floor) {
                Ok(r) => rounds[i].push(r),
                Err(e) => {
                    sip_dispatch_testbed::cancel::check()?;
                    eprintln!("sd-bench: {}: {}", sut.label(), brief(&e));
                    failed.push(format!(
                        "{} (round {}): {}",
                        sut.label(),
                        round + 1,
                        brief(&e)
                    ));
                }
            }
        }
    }
    let runs = rounds
        .into_iter()
        .filter_map(|tries| {
            let all: Vec<f64> = tries.iter().map(|r| r.delivered_pps).collect();
            let mut best = tries
                .into_iter()
                .max_by(|a, b| a.delivered_pps.total_cmp(&b.delivered_pps))?;
            best.rounds_delivered_pps = all;
            Some(best)
        })
        .collect();
    let mut options_answered = 0;
    for r in responders {
        options_answered += r.stop()?;
    }
    Ok(Throughput {
        frame_bytes,
        rounds: plan.rounds,
        generator: floor,
        runs,
        failed,
        options_answered,
    })
}
