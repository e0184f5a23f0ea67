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
//!   time). A single run's figure carries costs the loop spreads or avoids: a clock read,
//!   toggling softirqs, the call without the XDP dispatcher (set up only for `repeat` >
//!   1), and caches and branch predictors cooled by the syscall around each run, which
//!   cost the dispatcher (many maps, a large program) far more than the MAC swap (first
//!   quick run: single runs put `rewrite` and `l2dsr` about 170 ns above their loop
//!   figure, the MAC swap 40 ns). So every mode's single runs are timed in turn, trial
//!   by trial, and `ipip` is set against `l2dsr`, which runs the same program the same way
//!   up to the last step (parse, Call-ID scan, lookups, FIB lookup) and whose loop figure
//!   is valid: ipip = l2dsr's loop figure + (ipip's single runs - l2dsr's single runs).
//!   The same estimate for `rewrite`, whose loop figure is known too, checks the method.
//!
//! The choice is not only read from the source: a short loop of [`LOOP_PROBE`]
//! repetitions is run first for every mode, and the loop is used only if the `xdp_tx`
//! counter grew by all of them.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use aya::programs::Xdp;
use serde::Serialize;
use sip_dispatch::{
    dataplane::{Affinity, Dataplane, load_program},
    frames::{self, FrameSpec},
};
use sip_dispatch_common::{
    BF_AFFINITY, BF_NEW, BF_UP, Counter, EncapSource, FWD_IPIP, FWD_L2DSR, FWD_REWRITE, HashKey,
    PROG_MAC_SWAP, table::build_table,
};
use sip_dispatch_testbed::cancel;

use super::{
    BACKENDS, BACKENDS6, CLIENT, CLIENT6, OWN4, OWN6, Runner, VETH, VIP, VIP6, XDP_TX, counter,
    median, neighbour_mac, weighted,
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

/// Single runs of one program before switching to the other.
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
    /// ns/packet of sip_dispatch and of the MAC swap (the kernel's loop, median of the
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
    /// `reference_ns + single_ns - reference_single_ns`.
    pub single_estimate_ns: f64,
    /// `xdp_tx` grew by exactly the runs and repetitions timed: every one dispatched.
    pub every_run_counted: bool,
}

pub(super) fn measure(plan: &Plan, ifindex: u32) -> Result<(Vec<ModeCost>, Vec<String>)> {
    let mac_obj = load_program(PROG_MAC_SWAP)?;
    let mac: &Xdp = mac_obj
        .program(PROG_MAC_SWAP)
        .context("mac_swap missing")?
        .try_into()?;
    let mut costs = Vec::new();
    let mut failed = Vec::new();
    let mut dps = Vec::new();
    for (name, mode) in MODES {
        match load_mode(ifindex, mode) {
            Ok(dp) => dps.push((name, mode, dp)),
            Err(e) => failed.push(format!("{name}: {}", brief(&e))),
        }
    }
    for v6 in [false, true] {
        let family = if v6 { "IPv6" } else { "IPv4" };
        match measure_family(plan, ifindex, &mut dps, mac, v6) {
            Ok((rows, not)) => {
                for c in &rows {
                    note(format!(
                        "{:<7} {family}  {:>4} -> {:>4} B  sip_dispatch {:>5.0} ns  mac_swap {:>3.0} ns  ratio {:>5.1}x  ({}; single runs {:.0} ns, estimate {:.0} ns)",
                        c.mode,
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
            Err(e) => {
                if cancel::requested() {
                    return Err(e);
                }
                let msg = format!("{family}: {}", brief(&e));
                note(format!("not measured: {msg}"));
                failed.push(msg);
            }
        }
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
    dp.set_encap_source(EncapSource {
        v4: u32::from_ne_bytes(OWN4.parse::<Ipv4Addr>()?.octets()),
        v6: words(OWN6.parse()?),
    })?;
    let mut id = 0;
    for (vip, backends) in [(VIP, BACKENDS), (VIP6, BACKENDS6)] {
        dp.set_forwarding(id, mode);
        let table = build_table(&weighted(&backends)?, HashKey::DEFAULT)?;
        dp.install_service(id, vip.parse()?, &table)?;
        id += 1;
        if mode == FWD_REWRITE {
            let back = build_table(&weighted(&[vip])?, HashKey::DEFAULT)?;
            for b in backends {
                dp.install_service(id, b.parse()?, &back)?;
                id += 1;
            }
        }
    }
    for (_, bid) in dp.backend_ids() {
        dp.set_backend_flags(bid, BF_AFFINITY | BF_UP | BF_NEW)?;
    }
    dp.add_tx_port(ifindex)?;
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

/// One mode in one family while it is measured.
struct Subject<'a> {
    name: &'static str,
    dp: &'a mut Dataplane,
    out_bytes: usize,
    probed: u64,
    /// The kernel's loop, if every repetition dispatches: repeat count and trials.
    repeat: Option<u32>,
    loop_ns: Vec<u64>,
    single_ns: Vec<f64>,
    single_runs: usize,
    every: bool,
}

/// Checks the mode's frame and probes the kernel's loop.
fn prepare<'a>(
    plan: &Plan,
    run: &Runner,
    entry: &'a mut (&'static str, u32, Dataplane),
    v6: bool,
    frame: &[u8],
) -> Result<Subject<'a>> {
    let (name, mode, dp) = (entry.0, entry.1, &mut entry.2);
    let out_bytes = check_mode(run, dp.dispatch_program()?, mode, v6, frame)?;
    let before = counter(dp, Counter::Tx)?;
    run.timed(dp.dispatch_program()?, frame, LOOP_PROBE)?;
    let probed = counter(dp, Counter::Tx)? - before;
    let repeat = if probed == u64::from(LOOP_PROBE) {
        Some(run.repeat_for(dp.dispatch_program()?, frame, plan.testrun_trial)?)
    } else {
        None
    };
    Ok(Subject {
        name,
        dp,
        out_bytes,
        probed,
        repeat,
        loop_ns: Vec::new(),
        single_ns: Vec::new(),
        single_runs: 0,
        every: true,
    })
}

/// Single runs of `prog`, `SINGLE_CHUNK` of them: the kernel's ns of each.
fn single_runs(run: &Runner, prog: &Xdp, frame: &[u8], into: &mut Vec<u64>) -> Result<()> {
    for _ in 0..SINGLE_CHUNK {
        let (_, ns, verdict) = run.timed(prog, frame, 1)?;
        ensure!(verdict == XDP_TX, "a single run answered {verdict}");
        into.push(ns);
    }
    Ok(())
}

/// Every mode of one family, and the MAC swap, trial by trial in turn; a mode whose
/// frame is not as it should be is left out (and said why).
fn measure_family(
    plan: &Plan,
    ifindex: u32,
    dps: &mut [(&'static str, u32, Dataplane)],
    mac: &Xdp,
    v6: bool,
) -> Result<(Vec<ModeCost>, Vec<String>)> {
    let family = if v6 { "IPv6" } else { "IPv4" };
    let frame = invite_frame(v6)?;
    let run = Runner::new(ifindex, frame.len());
    let (v, _) = run.once(mac, &frame)?;
    ensure!(v == XDP_TX, "mac_swap answered {v}, not XDP_TX");
    let repeat_mac = run.repeat_for(mac, &frame, plan.testrun_trial)?;
    let mut failed = Vec::new();
    let mut subjects = Vec::new();
    for entry in dps.iter_mut() {
        let name = entry.0;
        match prepare(plan, &run, entry, v6, &frame) {
            Ok(s) => subjects.push(s),
            Err(e) => {
                cancel::check()?;
                failed.push(format!("{name} {family}: {}", brief(&e)));
            }
        }
    }
    let (mut mac_loop, mut mac_single) = (Vec::new(), Vec::new());
    for _ in 0..plan.testrun_trials {
        let mut timed = vec![0u64; subjects.len()];
        let mut before = Vec::new();
        for s in &subjects {
            before.push(counter(s.dp, Counter::Tx)?);
        }
        for (s, timed) in subjects.iter_mut().zip(&mut timed) {
            if let Some(repeat) = s.repeat {
                s.loop_ns
                    .push(run.timed(s.dp.dispatch_program()?, &frame, repeat)?.1);
                *timed += u64::from(repeat);
            }
        }
        mac_loop.push(run.timed(mac, &frame, repeat_mac)?.1);
        let mut samples = vec![Vec::new(); subjects.len()];
        let mut swap = Vec::new();
        let started = Instant::now();
        while swap.is_empty() || started.elapsed() < plan.testrun_trial {
            for (s, into) in subjects.iter_mut().zip(&mut samples) {
                single_runs(&run, s.dp.dispatch_program()?, &frame, into)?;
            }
            single_runs(&run, mac, &frame, &mut swap)?;
        }
        for (i, (s, sd)) in subjects.iter_mut().zip(samples).enumerate() {
            let runs = timed[i] + sd.len() as u64;
            s.every &= counter(s.dp, Counter::Tx)? - before[i] == runs;
            s.single_runs += sd.len();
            s.single_ns.push(interquartile_mean(sd));
        }
        mac_single.push(interquartile_mean(swap));
    }
    let mac_swap_ns = median(mac_loop) as f64;
    let mac_swap_single_ns = median_f64(mac_single);
    let figures: Vec<(Option<f64>, f64)> = subjects
        .iter()
        .map(|s| {
            let loop_ns = s.repeat.map(|_| median(s.loop_ns.clone()) as f64);
            (loop_ns, median_f64(s.single_ns.clone()))
        })
        .collect();
    let (reference, reference_ns, reference_single_ns) = subjects
        .iter()
        .zip(&figures)
        .find_map(|(s, (loop_ns, single))| {
            (s.name == "l2dsr").then_some(())?;
            Some(("l2dsr", (*loop_ns)?, *single))
        })
        .unwrap_or(("mac_swap", mac_swap_ns, mac_swap_single_ns));
    let rows = subjects
        .iter()
        .zip(figures)
        .map(|(s, (loop_ns, single_ns))| {
            let single_estimate_ns = reference_ns + single_ns - reference_single_ns;
            let dispatch_ns = loop_ns.unwrap_or(single_estimate_ns);
            ModeCost {
                mode: s.name,
                family,
                frame_bytes: frame.len(),
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
                repeat: [s.repeat.unwrap_or(0), repeat_mac],
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
    Ok((rows, failed))
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
