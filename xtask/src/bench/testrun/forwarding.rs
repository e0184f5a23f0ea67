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
//!   time), interleaved with single runs of the MAC swap. A single run's figure includes
//!   a fixed cost the loop spreads over its repetitions (a clock read, toggling softirqs,
//!   and the call without the XDP dispatcher that the kernel sets up only for `repeat` >
//!   1): it is the same for both programs, so their difference is the mode's cost above
//!   the MAC swap, and that difference is added to the MAC swap's loop figure. For
//!   `rewrite` and `l2dsr` both methods run, which checks the estimate against the loop.
//!
//! The choice is not only read from the source: a short loop of [`LOOP_PROBE`]
//! repetitions is run first for every mode, and the loop is used only if the `xdp_tx`
//! counter grew by all of them.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
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
    /// Single runs (`repeat` 1): the kernel's ns per run (mean of the middle half of a
    /// trial's runs, median of the trials), fixed cost of a single run included.
    pub single_ns: f64,
    pub mac_swap_single_ns: f64,
    /// Single runs per program, all trials.
    pub single_runs: usize,
    /// `mac_swap_ns + single_ns - mac_swap_single_ns`.
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
    for (mode, flags) in MODES {
        let mut dp = match load_mode(ifindex, flags) {
            Ok(dp) => dp,
            Err(e) => {
                failed.push(format!("{mode}: {}", brief(&e)));
                continue;
            }
        };
        for v6 in [false, true] {
            let family = if v6 { "IPv6" } else { "IPv4" };
            match measure_mode(plan, ifindex, &mut dp, mac, (mode, flags), v6) {
                Ok(c) => {
                    note(format!(
                        "{mode:<7} {family}  {:>4} -> {:>4} B  sip_dispatch {:>5.0} ns  mac_swap {:>3.0} ns  ratio {:>5.1}x  ({}; single runs {:.0} / {:.0} ns, estimate {:.0} ns)",
                        c.frame_bytes,
                        c.out_bytes,
                        c.dispatch_ns,
                        c.mac_swap_ns,
                        c.ratio,
                        c.method,
                        c.single_ns,
                        c.mac_swap_single_ns,
                        c.single_estimate_ns
                    ));
                    costs.push(c);
                }
                Err(e) => {
                    if cancel::requested() {
                        return Err(e);
                    }
                    let msg = format!("{mode} {family}: {}", brief(&e));
                    note(format!("not measured: {msg}"));
                    failed.push(msg);
                }
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

/// One trial of single runs, sip_dispatch and the MAC swap in turn by chunks, for about
/// `budget`: the kernel's ns of each run.
fn single_trial(
    run: &Runner,
    dp: &mut Dataplane,
    mac: &Xdp,
    frame: &[u8],
    budget: Duration,
) -> Result<(Vec<u64>, Vec<u64>)> {
    let started = Instant::now();
    let (mut sd, mut swap) = (Vec::new(), Vec::new());
    while sd.is_empty() || started.elapsed() < budget {
        let prog = dp.dispatch_program()?;
        for _ in 0..SINGLE_CHUNK {
            let (_, ns, verdict) = run.timed(prog, frame, 1)?;
            ensure!(verdict == XDP_TX, "a single run answered {verdict}");
            sd.push(ns);
        }
        for _ in 0..SINGLE_CHUNK {
            let (_, ns, verdict) = run.timed(mac, frame, 1)?;
            ensure!(
                verdict == XDP_TX,
                "a single run of mac_swap answered {verdict}"
            );
            swap.push(ns);
        }
    }
    Ok((sd, swap))
}

fn measure_mode(
    plan: &Plan,
    ifindex: u32,
    dp: &mut Dataplane,
    mac: &Xdp,
    (name, mode): (&'static str, u32),
    v6: bool,
) -> Result<ModeCost> {
    let frame = invite_frame(v6)?;
    let run = Runner::new(ifindex, frame.len());
    let out_bytes = check_mode(&run, dp.dispatch_program()?, mode, v6, &frame)?;
    let (v, _) = run.once(mac, &frame)?;
    ensure!(v == XDP_TX, "mac_swap answered {v}, not XDP_TX");

    let before = counter(dp, Counter::Tx)?;
    run.timed(dp.dispatch_program()?, &frame, LOOP_PROBE)?;
    let probed = counter(dp, Counter::Tx)? - before;
    let use_loop = probed == u64::from(LOOP_PROBE);
    let repeat_dp = if use_loop {
        run.repeat_for(dp.dispatch_program()?, &frame, plan.testrun_trial)?
    } else {
        0
    };
    let repeat_mac = run.repeat_for(mac, &frame, plan.testrun_trial)?;

    let (mut loop_sd, mut loop_mac) = (Vec::new(), Vec::new());
    let (mut single_sd, mut single_mac) = (Vec::new(), Vec::new());
    let mut single_runs = 0;
    let mut every = true;
    for _ in 0..plan.testrun_trials {
        let before = counter(dp, Counter::Tx)?;
        let mut timed = 0;
        if use_loop {
            loop_sd.push(run.timed(dp.dispatch_program()?, &frame, repeat_dp)?.1);
            timed += u64::from(repeat_dp);
        }
        loop_mac.push(run.timed(mac, &frame, repeat_mac)?.1);
        let (sd, swap) = single_trial(&run, dp, mac, &frame, plan.testrun_trial)?;
        timed += sd.len() as u64;
        single_runs += sd.len();
        single_sd.push(interquartile_mean(sd));
        single_mac.push(interquartile_mean(swap));
        every &= counter(dp, Counter::Tx)? - before == timed;
    }
    let mac_swap_ns = median(loop_mac) as f64;
    let (single_ns, mac_swap_single_ns) = (median_f64(single_sd), median_f64(single_mac));
    let single_estimate_ns = mac_swap_ns + single_ns - mac_swap_single_ns;
    let loop_ns = use_loop.then(|| median(loop_sd) as f64);
    let dispatch_ns = loop_ns.unwrap_or(single_estimate_ns);
    Ok(ModeCost {
        mode: name,
        family: if v6 { "IPv6" } else { "IPv4" },
        frame_bytes: frame.len(),
        out_bytes,
        method: if use_loop { "repeat" } else { "single runs" },
        dispatch_ns,
        mac_swap_ns,
        ratio: dispatch_ns / mac_swap_ns.max(1.0),
        loop_probe: [probed, u64::from(LOOP_PROBE)],
        loop_ns,
        repeat: [repeat_dp, repeat_mac],
        trials: plan.testrun_trials,
        single_ns,
        mac_swap_single_ns,
        single_runs,
        single_estimate_ns,
        every_run_counted: every,
    })
}
