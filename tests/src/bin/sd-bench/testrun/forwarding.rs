//! The typical INVITE in each forwarding mode (`rewrite`, `l2dsr`, `ipip`), IPv4 and
//! IPv6, next to the MAC swap on the same frame, trial by trial in turn.
//!
//! How a repeated BPF_PROG_TEST_RUN treats the frame (net/bpf/test_run.c, Linux 6.x):
//! without `BPF_F_TEST_XDP_LIVE_FRAMES`, `bpf_prog_test_run_xdp` copies `data_in` once
//! into one `xdp_buff` and `bpf_test_run` calls the program `repeat` times on that same
//! buffer: neither the bytes nor the data/data_end pointers are reset between
//! repetitions, so each repetition sees the frame (and any `bpf_xdp_adjust_head`) the
//! previous one left. The live-frames mode (`bpf_test_run_xdp_live`) resets only the
//! pointers (`reset_ctx`); the bytes of a recycled page are copied in once, when the page
//! pool first hands it out (`xdp_test_run_init_page`), and its XDP_TX becomes a real
//! redirect out of the device, so it is no cleaner. Hence, per mode:
//! - `rewrite`: the frame bounces between the VIP and a backend address that is itself a
//!   service pointing back at the VIP (as for the per-packet rows), so every repetition
//!   dispatches: the kernel's loop is used.
//! - `l2dsr`: only the Ethernet addresses change, the frame still goes to the VIP, so
//!   every repetition dispatches again: the kernel's loop is used.
//! - `ipip`: the first repetition puts the outer header in front (20 or 40 bytes of
//!   headroom taken); the next one sees an IP-in-IP packet, not the service's, and passes
//!   it. So it is measured by single runs (`repeat` 1, the frame copied in anew each
//!   time). A single run's figure includes more than the program: a clock read and
//!   softirqs toggled around it, the call without the XDP dispatcher (the kernel sets that
//!   up only for `repeat` > 1), and caches and branch predictors cooled by the syscall
//!   around each run, which cost the sip_dispatch program (many maps, a large program)
//!   far more than the MAC swap (quick runs: single runs about 200 ns above the loop
//!   figure for `rewrite` and `l2dsr`, 40 ns for the MAC swap). So the single runs of
//!   every mode are timed in turn, and `ipip` is set against `l2dsr`, which runs the same
//!   program the same way up to the last step (parse, Call-ID scan, lookups, FIB lookup)
//!   and whose loop figure is valid: ipip = l2dsr's loop figure + ipip's single runs -
//!   l2dsr's single runs, taken within each trial. This figure is "as in the loop": it
//!   assumes the single runs' extra cost is the same in both modes. The same estimate for
//!   `rewrite`, whose loop figure is known too, checks that (within a few % in quick
//!   runs); the raw single-run figures are reported as well.
//!
//! The choice is not only read from the source: a short loop of [`LOOP_PROBE`]
//! repetitions is run first for every mode, and the loop is used only if the `xdp_tx`
//! counter grew by all of them. Every trial loads the programs and maps anew (where a
//! load's maps and code land moves its figures by some tens of ns), so the medians are
//! over several loads.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use aya::programs::Xdp;
use serde::Serialize;
use sip_dispatch::dataplane::{Affinity, Dataplane, load_mac_swap};
use sip_dispatch_common::{
    BF_AFFINITY, BF_NEW, BF_UP, Counter, EncapSource, FWD_IPIP, FWD_L2DSR, FWD_REWRITE, HashKey,
    PROG_MAC_SWAP, table::build_table,
};
use sip_dispatch_testbed::{
    cancel,
    frames::{self, FrameSpec},
    testrun::{OWN4, OWN6, Runner, XDP_TX},
};

use super::{
    BACKENDS, BACKENDS6, CLIENT, CLIENT6, VETH, VIP, VIP6, counter, median, neighbour_mac, weighted,
};
use crate::{Plan, brief, messages, note};

/// The modes, as `ServiceInfo.flags` carries them.
const MODES: [(&str, u32); 3] = [
    ("rewrite", FWD_REWRITE),
    ("l2dsr", FWD_L2DSR),
    ("ipip", FWD_IPIP),
];

/// Repetitions of the probe that tells whether the kernel's loop dispatches every time.
const LOOP_PROBE: u32 = 64;

/// Single runs of one program before the next program's turn.
const SINGLE_CHUNK: usize = 256;

/// One mode and family: the typical INVITE's cost next to the MAC swap's.
#[derive(Clone, Debug, Serialize)]
pub struct ModeCost {
    pub mode: &'static str,
    pub family: &'static str,
    pub frame_bytes: usize,
    /// The frame as the program leaves it (`ipip` adds the outer header).
    pub out_bytes: usize,
    /// How `dispatch_ns` was obtained: "repeat" (the kernel's loop) or "single runs"
    /// (`single_estimate_ns`).
    pub method: &'static str,
    /// ns/packet of sip_dispatch (`loop_ns`, or `single_estimate_ns` where the loop does
    /// not dispatch every time) and of the MAC swap (the kernel's loop, median of the
    /// trials), and their ratio.
    pub dispatch_ns: f64,
    pub mac_swap_ns: f64,
    pub ratio: f64,
    /// The probe of the kernel's loop: repetitions that dispatched, of how many.
    pub loop_probe: [u64; 2],
    /// The kernel's loop, when every repetition dispatches: ns/packet and the repeat
    /// counts per trial (sip_dispatch, mac_swap).
    pub loop_ns: Option<f64>,
    pub repeat: [u32; 2],
    pub trials: usize,
    /// Single runs (`repeat` 1), all modes and the MAC swap in turn: the kernel's ns per
    /// run (mean of the middle half of a trial's runs, median of the trials).
    pub single_ns: f64,
    pub mac_swap_single_ns: f64,
    /// Single runs per program, all trials.
    pub single_runs: usize,
    /// The mode whose loop figure anchors the single-run estimate ("l2dsr"; "mac_swap"
    /// if l2dsr's loop could not be used), its loop and single-run figures.
    pub reference: &'static str,
    pub reference_ns: f64,
    pub reference_single_ns: f64,
    /// The reference's loop figure + this mode's single runs - the reference's single
    /// runs, taken in each trial (side by side, on that trial's loads), median of the
    /// trials.
    pub single_estimate_ns: f64,
    /// `xdp_tx` grew by exactly the runs and repetitions timed: every one dispatched.
    pub every_run_counted: bool,
}

pub(super) fn measure(plan: &Plan, ifindex: u32) -> Result<(Vec<ModeCost>, Vec<String>)> {
    let mac_obj = load_mac_swap()?;
    let mac: &Xdp = mac_obj
        .program(PROG_MAC_SWAP)
        .context("mac_swap missing")?
        .try_into()?;
    let mut families = Vec::new();
    for v6 in [false, true] {
        families.push(Family::new(plan, ifindex, mac, v6)?);
    }
    let mut failed = Vec::new();
    for trial in 0..plan.testrun_trials {
        // Programs and maps loaded anew for every trial (see the module's comment).
        let mut dps = Vec::new();
        for (name, mode) in MODES {
            if families.iter().all(|f| f.gone(name)) {
                continue;
            }
            match load_mode(ifindex, mode) {
                Ok(dp) => dps.push((name, mode, dp)),
                Err(e) => {
                    cancel::check()?;
                    for f in &mut families {
                        f.fail(name, format!("{name} (trial {trial}): {}", brief(&e)));
                    }
                }
            }
        }
        for f in &mut families {
            f.trial(plan, mac, &mut dps)?;
        }
    }
    let mut costs = Vec::new();
    for f in families {
        let (rows, not) = f.results(plan);
        for c in &rows {
            note(format!(
                "{:<7} {}  {:>4} -> {:>4} B  sip_dispatch {:>5.0} ns  mac_swap {:>3.0} ns  ratio {:>5.1}x  ({}; single runs {:.0} ns, estimate {:.0} ns)",
                c.mode,
                c.family,
                c.frame_bytes,
                c.out_bytes,
                c.dispatch_ns,
                c.mac_swap_ns,
                c.ratio,
                c.method,
                c.single_ns,
                c.single_estimate_ns
            ));
        }
        for msg in not {
            note(format!("not measured: {msg}"));
            failed.push(msg);
        }
        costs.extend(rows);
    }
    Ok((costs, failed))
}

/// Network byte order words of an IPv6 address, as the maps hold it.
fn words(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    [0, 1, 2, 3].map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// A dispatcher whose IPv4 and IPv6 VIPs forward in `mode`, every backend up and taking
/// calls, affinity on (the default), the veth's addresses as the `ipip` source. In
/// `rewrite` the backends are services pointing back at their VIP (the bounce).
fn load_mode(ifindex: u32, mode: u32) -> Result<Dataplane> {
    let mut dp = Dataplane::load_unpinned(HashKey::DEFAULT, Affinity::default())?;
    let mut ids = sip_dispatch::backend_ids::BackendIds::new(sip_dispatch_common::MAX_BACKENDS);
    dp.set_encap_source(EncapSource {
        v4: u32::from_ne_bytes(OWN4.parse::<Ipv4Addr>()?.octets()),
        v6: words(OWN6.parse()?),
    })?;
    let mut id = 0;
    for (vip, backends) in [(VIP, BACKENDS), (VIP6, BACKENDS6)] {
        dp.set_forwarding(id, mode);
        let table = build_table(&weighted(&backends)?, HashKey::DEFAULT)?;
        dp.install_service(&mut ids, id, vip.parse()?, &table)?;
        id += 1;
        if mode == FWD_REWRITE {
            let back = build_table(&weighted(&[vip])?, HashKey::DEFAULT)?;
            for b in backends {
                dp.install_service(&mut ids, id, b.parse()?, &back)?;
                id += 1;
            }
        }
    }
    for (_, bid) in ids.assigned().collect::<Vec<_>>() {
        dp.set_backend_flags(&mut ids, bid, BF_AFFINITY | BF_UP | BF_NEW)?;
    }
    dp.add_tx_port(ifindex)?;
    super::fill_next_hops(&mut dp, &ids)?;
    Ok(dp)
}

/// The typical INVITE (with SDP) from the client to the VIP of the family.
fn invite_frame(v6: bool) -> Result<Vec<u8>> {
    let (client, vip) = if v6 { (CLIENT6, VIP6) } else { (CLIENT, VIP) };
    let (client, vip): (SocketAddr, SocketAddr) = (client.parse()?, vip.parse()?);
    let call_id = format!("f81d4fae-7dec-11d0-a765-00a0c91e6bf6@{}", client.ip());
    let msg = messages::invite(client, vip, &call_id);
    let mut spec = FrameSpec::udp(client, vip, msg.as_bytes());
    spec.src_mac = [0x02, 0, 0, 0, 0, 0x10];
    spec.dst_mac = VETH.1;
    Ok(spec.build())
}

/// Checks the frame leaves as the mode says, before timing it; returns its length.
fn check_mode(run: &Runner, prog: &Xdp, mode: u32, v6: bool, frame: &[u8]) -> Result<usize> {
    let (verdict, out) = run.once(prog, frame)?;
    ensure!(verdict == XDP_TX, "verdict {verdict}, not XDP_TX");
    let (vip, backends, first_mac): (SocketAddr, _, usize) = if v6 {
        (VIP6.parse()?, BACKENDS6, 5)
    } else {
        (VIP.parse()?, BACKENDS, 1)
    };
    let backends: Vec<SocketAddr> = backends
        .iter()
        .map(|b| b.parse())
        .collect::<Result<_, _>>()?;
    let backend_macs: Vec<[u8; 6]> = (first_mac..first_mac + 3).map(neighbour_mac).collect();
    match mode {
        FWD_REWRITE | FWD_L2DSR => {
            let p = frames::parse(&out).context("the dispatched frame does not parse")?;
            ensure!(
                p.ip_checksum_ok && p.udp_checksum_ok,
                "checksums ok: {}/{}",
                p.ip_checksum_ok,
                p.udp_checksum_ok
            );
            ensure!(
                backend_macs.contains(&p.dst_mac),
                "sent to MAC {:02x?}, no backend's",
                p.dst_mac
            );
            if mode == FWD_REWRITE {
                ensure!(backends.contains(&p.dst), "dispatched to {}", p.dst);
            } else {
                ensure!(
                    p.dst == vip && out[12..] == frame[12..],
                    "more than the MACs changed (to {})",
                    p.dst
                );
            }
            // What the kernel's loop feeds the next repetition must come to the VIP again.
            let (verdict, again) = run.once(prog, &out)?;
            let again = frames::parse(&again).context("the second frame does not parse")?;
            let expect = if mode == FWD_REWRITE { vip } else { p.dst };
            ensure!(
                verdict == XDP_TX && again.dst == expect,
                "the second repetition: {verdict}, to {}",
                again.dst
            );
        }
        _ => {
            let outer = if v6 { 40 } else { 20 };
            ensure!(
                out.len() == frame.len() + outer && out[14 + outer..] == frame[14..],
                "not the frame behind an outer header ({} -> {} bytes)",
                frame.len(),
                out.len()
            );
            ensure!(
                backend_macs.contains(&out[0..6].try_into()?),
                "sent to MAC {:02x?}, no backend's",
                &out[0..6]
            );
            let o = &out[14..14 + outer];
            let (protocol, dst) = if v6 {
                (o[6], IpAddr::from(<[u8; 16]>::try_from(&o[24..40])?))
            } else {
                (o[9], IpAddr::from(<[u8; 4]>::try_from(&o[16..20])?))
            };
            ensure!(
                protocol == if v6 { 41 } else { 4 } && backends.iter().any(|b| b.ip() == dst),
                "outer header: protocol {protocol}, to {dst}"
            );
        }
    }
    Ok(out.len())
}

/// The mean of the middle half (whole-ns samples of single runs; an interrupt inside
/// the timed window lands in the top quarter).
fn interquartile_mean(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    let q = v.len() / 4;
    let mid = &v[q..v.len() - q];
    if mid.is_empty() {
        return f64::NAN;
    }
    mid.iter().sum::<u64>() as f64 / mid.len() as f64
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// What is gathered for one mode in one family over the trials.
struct Subject {
    name: &'static str,
    out_bytes: usize,
    probed: u64,
    /// The kernel's loop, if every repetition dispatches: its repeat count.
    repeat: Option<u32>,
    loop_ns: Vec<u64>,
    single_ns: Vec<f64>,
    single_runs: usize,
    every: bool,
    /// Why it is left out, once something was not as it should be.
    failed: Option<String>,
}

/// One family's frame, the MAC swap's figures on it and each mode's.
struct Family {
    v6: bool,
    frame: Vec<u8>,
    run: Runner,
    repeat_mac: u32,
    mac_loop: Vec<u64>,
    mac_single: Vec<f64>,
    subjects: Vec<Subject>,
}

impl Family {
    fn new(plan: &Plan, ifindex: u32, mac: &Xdp, v6: bool) -> Result<Family> {
        let frame = invite_frame(v6)?;
        let run = Runner::new(ifindex, frame.len());
        let (v, _) = run.once(mac, &frame)?;
        ensure!(v == XDP_TX, "mac_swap answered {v}, not XDP_TX");
        let repeat_mac = run.repeat_for(mac, &frame, plan.testrun_trial)?;
        let subjects = MODES
            .iter()
            .map(|&(name, _)| Subject {
                name,
                out_bytes: 0,
                probed: 0,
                repeat: None,
                loop_ns: Vec::new(),
                single_ns: Vec::new(),
                single_runs: 0,
                every: true,
                failed: None,
            })
            .collect();
        Ok(Family {
            v6,
            frame,
            run,
            repeat_mac,
            mac_loop: Vec::new(),
            mac_single: Vec::new(),
            subjects,
        })
    }

    fn family(&self) -> &'static str {
        if self.v6 { "IPv6" } else { "IPv4" }
    }

    fn gone(&self, name: &str) -> bool {
        self.subjects
            .iter()
            .any(|s| s.name == name && s.failed.is_some())
    }

    fn fail(&mut self, name: &str, why: String) {
        let family = self.family();
        if let Some(s) = self.subjects.iter_mut().find(|s| s.name == name) {
            s.failed.get_or_insert(format!("{family}: {why}"));
        }
    }

    /// Checks each mode's frame on this load and probes the kernel's loop (the repeat
    /// count is sized on the first trial).
    fn prepare(&mut self, plan: &Plan, i: usize, mode: u32, dp: &mut Dataplane) -> Result<()> {
        let (run, frame, v6) = (&self.run, &self.frame, self.v6);
        let s = &mut self.subjects[i];
        let counted = dp.counters()?;
        s.out_bytes = match check_mode(run, dp.dispatch_program()?, mode, v6, frame) {
            Ok(n) => n,
            Err(e) => return Err(e.context(format!("counted: {}", grown(&counted, dp)))),
        };
        let before = counter(dp, Counter::Tx)?;
        run.timed(dp.dispatch_program()?, frame, LOOP_PROBE)?;
        let probed = counter(dp, Counter::Tx)? - before;
        let loops = probed == u64::from(LOOP_PROBE);
        if s.loop_ns.is_empty() && s.single_ns.is_empty() {
            s.probed = probed;
            if loops {
                s.repeat =
                    Some(run.repeat_for(dp.dispatch_program()?, frame, plan.testrun_trial)?);
            }
        } else {
            ensure!(
                loops == s.repeat.is_some(),
                "the loop probe changed between loads: {probed} of {LOOP_PROBE} dispatched"
            );
        }
        Ok(())
    }

    /// One trial: each mode's loop (where valid) and the MAC swap's, then single runs of
    /// every mode and the MAC swap in turn for about a trial's time.
    fn trial(
        &mut self,
        plan: &Plan,
        mac: &Xdp,
        dps: &mut [(&'static str, u32, Dataplane)],
    ) -> Result<()> {
        // The modes of this trial: index into `subjects` and the load.
        let mut here: Vec<(usize, &mut Dataplane)> = Vec::new();
        for (name, mode, dp) in dps.iter_mut() {
            let Some(i) = self.subjects.iter().position(|s| s.name == *name) else {
                continue;
            };
            if self.subjects[i].failed.is_some() {
                continue;
            }
            match self.prepare(plan, i, *mode, dp) {
                Ok(()) => here.push((i, dp)),
                Err(e) => {
                    cancel::check()?;
                    self.fail(name, format!("{name}: {}", brief(&e)));
                }
            }
        }
        let (run, frame) = (&self.run, &self.frame);
        let mut timed = vec![0u64; here.len()];
        let mut before = Vec::new();
        for (_, dp) in &here {
            before.push(counter(dp, Counter::Tx)?);
        }
        for ((i, dp), timed) in here.iter_mut().zip(&mut timed) {
            if let Some(repeat) = self.subjects[*i].repeat {
                let ns = run.timed(dp.dispatch_program()?, frame, repeat)?.kernel_ns;
                self.subjects[*i].loop_ns.push(ns);
                *timed += u64::from(repeat);
            }
        }
        self.mac_loop
            .push(run.timed(mac, frame, self.repeat_mac)?.kernel_ns);
        let mut samples = vec![Vec::new(); here.len()];
        let mut swap = Vec::new();
        let started = Instant::now();
        while swap.is_empty() || started.elapsed() < plan.testrun_trial {
            for ((_, dp), into) in here.iter_mut().zip(&mut samples) {
                single_runs(run, dp.dispatch_program()?, frame, into)?;
            }
            single_runs(run, mac, frame, &mut swap)?;
        }
        for (k, ((i, dp), sd)) in here.iter().zip(samples).enumerate() {
            let s = &mut self.subjects[*i];
            let runs = timed[k] + sd.len() as u64;
            s.every &= counter(dp, Counter::Tx)? - before[k] == runs;
            s.single_runs += sd.len();
            s.single_ns.push(interquartile_mean(sd));
        }
        self.mac_single.push(interquartile_mean(swap));
        Ok(())
    }

    /// The rows, and the modes left out with the reason.
    fn results(self, plan: &Plan) -> (Vec<ModeCost>, Vec<String>) {
        let family = self.family();
        let mac_swap_ns = median(self.mac_loop.clone()) as f64;
        let mac_swap_single_ns = median_f64(self.mac_single.clone());
        let (done, failed): (Vec<Subject>, Vec<Subject>) = self
            .subjects
            .into_iter()
            .partition(|s| s.failed.is_none() && !s.single_ns.is_empty());
        let failed = failed
            .into_iter()
            .map(|s| {
                s.failed
                    .unwrap_or_else(|| format!("{family}: {}: never measured", s.name))
            })
            .collect();
        let figures: Vec<(Option<f64>, f64)> = done
            .iter()
            .map(|s| {
                let loop_ns = s.repeat.map(|_| median(s.loop_ns.clone()) as f64);
                (loop_ns, median_f64(s.single_ns.clone()))
            })
            .collect();
        // The reference's figures of each trial: its loop, its single runs.
        let (reference, per_trial): (&'static str, Vec<(f64, f64)>) = done
            .iter()
            .find(|s| s.name == "l2dsr" && s.repeat.is_some())
            .map_or_else(
                || {
                    let t = self.mac_loop.iter().map(|&ns| ns as f64);
                    ("mac_swap", t.zip(self.mac_single.iter().copied()).collect())
                },
                |r| {
                    let t = r.loop_ns.iter().map(|&ns| ns as f64);
                    ("l2dsr", t.zip(r.single_ns.iter().copied()).collect())
                },
            );
        let reference_ns = median_f64(per_trial.iter().map(|t| t.0).collect());
        let reference_single_ns = median_f64(per_trial.iter().map(|t| t.1).collect());
        // Within a trial the modes ran side by side on the loads of that trial: the
        // estimate is taken trial by trial, then the median.
        let estimate = |s: &Subject| {
            median_f64(
                per_trial
                    .iter()
                    .zip(&s.single_ns)
                    .map(|((loop_ns, single), own)| loop_ns + own - single)
                    .collect(),
            )
        };
        let rows = done
            .iter()
            .zip(figures)
            .map(|(s, (loop_ns, single_ns))| {
                let single_estimate_ns = estimate(s);
                let dispatch_ns = loop_ns.unwrap_or(single_estimate_ns);
                ModeCost {
                    mode: s.name,
                    family,
                    frame_bytes: self.frame.len(),
                    out_bytes: s.out_bytes,
                    method: if loop_ns.is_some() {
                        "repeat"
                    } else {
                        "single runs"
                    },
                    dispatch_ns,
                    mac_swap_ns,
                    ratio: dispatch_ns / mac_swap_ns.max(1.0),
                    loop_probe: [s.probed, u64::from(LOOP_PROBE)],
                    loop_ns,
                    repeat: [s.repeat.unwrap_or(0), self.repeat_mac],
                    trials: plan.testrun_trials,
                    single_ns,
                    mac_swap_single_ns,
                    single_runs: s.single_runs,
                    reference,
                    reference_ns,
                    reference_single_ns,
                    single_estimate_ns,
                    every_run_counted: s.every,
                }
            })
            .collect();
        (rows, failed)
    }
}

/// The counters that grew since `before` (what a frame that was not dispatched met).
fn grown(before: &[(Counter, u64)], dp: &Dataplane) -> String {
    let Ok(after) = dp.counters() else {
        return "(counters unreadable)".into();
    };
    after
        .iter()
        .filter_map(|(c, n)| {
            let was = before.iter().find(|(b, _)| b == c).map_or(0, |(_, v)| *v);
            (*n > was).then(|| format!("{c:?} +{}", n - was))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Single runs of `prog`, `SINGLE_CHUNK` of them: the kernel's ns of each.
fn single_runs(run: &Runner, prog: &Xdp, frame: &[u8], into: &mut Vec<u64>) -> Result<()> {
    for _ in 0..SINGLE_CHUNK {
        let t = run.timed(prog, frame, 1)?;
        ensure!(t.verdict == XDP_TX, "a single run answered {}", t.verdict);
        into.push(t.kernel_ns);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interquartile_mean_leaves_out_both_outer_quarters() {
        // An interrupt inside a timed run and a run faster than any other: both ignored.
        let v = vec![500, 9000, 510, 490, 505, 495, 1, 500];
        assert_eq!(interquartile_mean(v), 500.0);
        assert!(interquartile_mean(Vec::new()).is_nan());
        assert_eq!(median_f64(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
