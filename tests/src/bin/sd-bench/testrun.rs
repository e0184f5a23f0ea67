//! Part 1: the per-packet cost of the XDP program, measured by the kernel itself through
//! BPF_PROG_TEST_RUN with a large repeat count, next to the minimal MAC-swap program on
//! the same packets.
//!
//! The run happens on a thread with a private network namespace (`unshare`) holding a
//! veth with permanent neighbour entries and forwarding on, so that the next-hop cache
//! (`sd_nexthop_v1`, filled as the daemon fills it) and `bpf_fib_lookup` answer and every
//! repetition goes the whole way (parse, service lookup, payload copy, Call-ID scan and
//! hash, slot and backend lookups, next hop, rewrite, XDP_TX). One row (the typical
//! INVITE, next hop by FIB lookup) runs with the cache empty.
//!
//! A repeated test run feeds the program the frame as the previous repetition left it.
//! So that every repetition dispatches (instead of seeing an already rewritten frame
//! that is no longer for the service), the backends of the service are themselves
//! services whose only backend is the first service: the frame bounces between the VIP
//! and one backend address, and each repetition does the full work. The counters check it:
//! `xdp_tx` must grow by exactly the number of repetitions.
//!
//! The forwarding modes (rewrite, l2dsr, ipip) are measured in [`forwarding`], IPv4 and
//! IPv6, in the same namespace.
mod forwarding;

use std::{net::SocketAddr, thread};

use anyhow::{Context as _, Result, anyhow, ensure};
use aya::programs::Xdp;
use serde::Serialize;
use sip_dispatch::{
    backend_ids::BackendIds,
    dataplane::{Affinity, Dataplane, load_mac_swap},
};
use sip_dispatch_common::{
    BF_AFFINITY, BF_NEW, BF_UP, Backend, Counter, HashKey, MAX_BACKENDS, PROG_MAC_SWAP,
    table::{Weighted, build_table},
};
use sip_dispatch_testbed::{
    cancel, frames,
    testrun::{Runner, TestNet, TestVeth, XDP_PASS, XDP_TX},
};

use crate::{
    Plan, brief,
    messages::{self, Packet},
    note,
};

/// The private namespace: the VIP, its backends and the client behind one veth.
const VIP: &str = "198.18.1.100:5060";
const BACKENDS: [&str; 3] = ["198.18.1.21:5060", "198.18.1.22:5060", "198.18.1.23:5060"];
const CLIENT: &str = "198.18.1.10:5070";
const VIP6: &str = "[2001:db8:1::100]:5060";
const BACKENDS6: [&str; 3] = [
    "[2001:db8:1::21]:5060",
    "[2001:db8:1::22]:5060",
    "[2001:db8:1::23]:5060",
];
const CLIENT6: &str = "[2001:db8:1::10]:5070";
const VETH: (&str, [u8; 6]) = ("sdb0", [0x02, 0, 0, 0, 0, 0xaa]);

#[derive(Clone, Debug, Serialize)]
pub struct PacketCost {
    #[serde(flatten)]
    pub packet: Packet,
    /// What sip_dispatch answered (XDP_TX or XDP_PASS).
    pub verdict: &'static str,
    /// Repetitions per trial (sip_dispatch, mac_swap).
    pub repeat: [u32; 2],
    pub trials: usize,
    /// ns/packet as the kernel measures it (median of the trials). The kernel stops its
    /// clock while the test thread is rescheduled, so other load on the machine does
    /// not count; it reports whole nanoseconds.
    pub dispatch_ns: f64,
    pub mac_swap_ns: f64,
    /// The wall clock around the syscall divided by the repeat count (best trial):
    /// includes time the thread was preempted.
    pub dispatch_wall_ns: f64,
    pub mac_swap_wall_ns: f64,
    /// dispatch_ns / mac_swap_ns.
    pub ratio: f64,
    /// The fast-path counters grew by exactly the repetitions (every one dispatched, or
    /// passed for the non-SIP packet).
    pub every_repeat_counted: bool,
}

/// The typical INVITE's cost with call affinity off and on, side by side.
#[derive(Clone, Debug, Serialize)]
pub struct AffinityCost {
    /// `--affinity off`: the stateless program.
    pub off_ns: f64,
    /// On, the call's entry valid (a retransmitted INVITE): followed, no table lookup.
    pub hit_ns: f64,
    /// On, a BYE of a call without an entry: looked up, not created, table.
    pub miss_ns: f64,
    pub hit_ratio: f64,
    pub miss_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TestRunResults {
    pub packets: Vec<PacketCost>,
    /// Loading the dispatcher (object, maps, verifier), with affinity off and on.
    pub load: Vec<LoadCost>,
    pub affinity: Option<AffinityCost>,
    /// The typical INVITE in each forwarding mode, IPv4 and IPv6.
    pub forwarding: Vec<forwarding::ModeCost>,
    /// Modes that could not be measured, and why.
    pub forwarding_failed: Vec<String>,
}

impl TestRunResults {
    pub fn get(&self, key: &str) -> Option<&PacketCost> {
        self.packets.iter().find(|p| p.packet.key == key)
    }
}

/// What loading the dispatcher costs: wall time of the whole load (object, maps, the
/// verifier) and what the verifier saw and the JIT made of `sip_dispatch`.
#[derive(Debug, Clone, Serialize)]
pub struct LoadCost {
    pub affinity: bool,
    pub load_ms: f64,
    /// Instructions the verifier processed (`verified_insns`).
    pub verified_insns: Option<u32>,
    /// Size of the translated (xlated) and JIT-compiled program, bytes.
    pub xlated_bytes: Option<u32>,
    pub jited_bytes: Option<u32>,
}

/// Loads the dispatcher with affinity off and on and reads the program's info.
fn measure_load() -> Result<Vec<LoadCost>> {
    let mut out = Vec::new();
    for on in [false, true] {
        let started = std::time::Instant::now();
        let mut dp = Dataplane::load_unpinned(
            HashKey::DEFAULT,
            Affinity {
                on,
                ..Default::default()
            },
        )?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let info = dp.dispatch_program()?.info()?;
        let cost = LoadCost {
            affinity: on,
            load_ms,
            verified_insns: info.verified_instruction_count(),
            xlated_bytes: info.size_translated(),
            jited_bytes: Some(info.size_jitted()),
        };
        note(format!(
            "load, affinity {}: {:.0} ms, verifier {} instructions, {} B xlated, {} B jited",
            if on { "on" } else { "off" },
            cost.load_ms,
            cost.verified_insns.map_or("?".into(), |n| n.to_string()),
            cost.xlated_bytes.map_or("?".into(), |n| n.to_string()),
            cost.jited_bytes.map_or("?".into(), |n| n.to_string()),
        ));
        out.push(cost);
    }
    Ok(out)
}

pub fn run(plan: &Plan) -> Result<TestRunResults> {
    let plan = plan.clone();
    thread::Builder::new()
        .name("testrun".into())
        .spawn(move || measure(&plan))
        .context("starting the test-run thread")?
        .join()
        .map_err(|_| anyhow!("the test-run thread panicked"))?
}

/// This thread's own network namespace with a veth, neighbours (the VIP, its backends,
/// then the same for IPv6) and forwarding on.
fn private_netns() -> Result<TestNet> {
    let v4 = std::iter::once(VIP).chain(BACKENDS);
    let v6 = std::iter::once(VIP6).chain(BACKENDS6);
    let neighbours = v4
        .chain(v6)
        .enumerate()
        .map(|(i, addr)| Ok((addr.parse::<SocketAddr>()?.ip(), neighbour_mac(i))))
        .collect::<Result<_>>()?;
    TestVeth {
        name: VETH.0,
        peer: "sdb1",
        mac: VETH.1,
        neighbours,
    }
    .build()
}

/// The MAC of the `i`th neighbour entry: the VIP, its three backends, then the same for
/// IPv6.
fn neighbour_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x01, i as u8 + 1]
}

fn weighted(addrs: &[&str]) -> Result<Vec<Weighted>> {
    addrs
        .iter()
        .map(|a| {
            Ok(Weighted {
                backend: Backend::from_socket_addr(a.parse()?),
                weight: 1,
            })
        })
        .collect()
}

/// The VIP's backends are services that send everything back to the VIP. Every
/// backend is up and takes calls (as the controller's flags say for healthy backends).
fn load_dispatcher(ifindex: u32, affinity: Affinity) -> Result<Dataplane> {
    load_dispatcher_with(ifindex, affinity, true)
}

/// [`load_dispatcher`], with the next-hop cache filled or (`next_hops` false) left
/// empty, so that every packet takes the FIB lookup.
fn load_dispatcher_with(ifindex: u32, affinity: Affinity, next_hops: bool) -> Result<Dataplane> {
    let mut dp = Dataplane::load_unpinned(HashKey::DEFAULT, affinity)?;
    let mut ids = BackendIds::new(MAX_BACKENDS);
    let table = build_table(&weighted(&BACKENDS)?, HashKey::DEFAULT)?;
    dp.install_service(&mut ids, 0, VIP.parse()?, &table)?;
    let back = build_table(&weighted(&[VIP])?, HashKey::DEFAULT)?;
    for (i, b) in BACKENDS.iter().enumerate() {
        dp.install_service(&mut ids, i as u32 + 1, b.parse()?, &back)?;
    }
    for (_, id) in ids.assigned().collect::<Vec<_>>() {
        dp.set_backend_flags(&mut ids, id, BF_AFFINITY | BF_UP | BF_NEW)?;
    }
    dp.add_tx_port(ifindex)?;
    if next_hops {
        fill_next_hops(&mut dp, &ids)?;
    }
    Ok(dp)
}

/// The next-hop cache (`sd_nexthop_v1`) filled the way the daemon's follower fills it
/// (every backend has a neighbour entry here): the fast path needs no FIB lookup.
fn fill_next_hops(dp: &mut Dataplane, ids: &BackendIds) -> Result<()> {
    let want = ids.assigned().count();
    let valid = dp.resolve_next_hops()?;
    ensure!(valid == want, "{valid} of {want} next-hop entries valid");
    Ok(())
}

/// The packet whose row measures the FIB path (the next-hop cache left empty).
const INVITE_FIB: &str = "invite_fib";

/// The typical INVITE through the program with affinity off and on (a hit), and a BYE
/// of an unknown call with affinity on (a miss), trial by trial in turn.
fn measure_affinity(plan: &Plan, ifindex: u32, invite: &Packet) -> Result<AffinityCost> {
    let mut off = load_dispatcher(
        ifindex,
        Affinity {
            on: false,
            ..Default::default()
        },
    )?;
    let mut on = load_dispatcher(ifindex, Affinity::default())?;
    // The same frame with the method made a BYE (same length and Call-ID; the padding
    // spaces do not matter to the program). A BYE never creates an entry, so each
    // repetition misses.
    let bye_frame = {
        let mut f = invite.frame.clone();
        let at = f
            .windows(b"INVITE sip:".len())
            .position(|w| w == b"INVITE sip:")
            .context("no INVITE request line in the frame")?;
        f[at..at + 6].copy_from_slice(b"BYE   ");
        f
    };
    let mut miss = load_dispatcher(ifindex, Affinity::default())?;
    let run = Runner::new(ifindex, invite.frame.len());
    let mut medians = Vec::new();
    for (dp, frame) in [
        (&mut off, &invite.frame),
        (&mut on, &invite.frame),
        (&mut miss, &bye_frame),
    ] {
        let prog = dp.dispatch_program()?;
        let (v, _) = run.once(prog, frame)?;
        ensure!(v == XDP_TX, "affinity case {}: verdict {v}", medians.len());
        let repeat = run.repeat_for(prog, frame, plan.testrun_trial)?;
        let mut kernel = Vec::new();
        for _ in 0..plan.testrun_trials {
            kernel.push(run.timed(prog, frame, repeat)?.kernel_ns);
        }
        medians.push(median(kernel) as f64);
    }
    ensure!(
        counter(&miss, Counter::AffinityInsert)? == 0,
        "a BYE created an affinity entry"
    );
    let hits = counter(&on, Counter::AffinityHit)?;
    ensure!(hits > 0, "the affinity-on INVITE never followed its entry");
    let (off_ns, hit_ns, miss_ns) = (medians[0], medians[1], medians[2]);
    let cost = AffinityCost {
        off_ns,
        hit_ns,
        miss_ns,
        hit_ratio: hit_ns / off_ns.max(1.0),
        miss_ratio: miss_ns / off_ns.max(1.0),
    };
    note(format!(
        "affinity: INVITE off {off_ns:.0} ns, on (hit) {hit_ns:.0} ns ({:.2}x), BYE on (miss) {miss_ns:.0} ns ({:.2}x)",
        cost.hit_ratio, cost.miss_ratio
    ));
    Ok(cost)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn counter(dp: &Dataplane, c: Counter) -> Result<u64> {
    Ok(dp
        .counters()?
        .into_iter()
        .find(|(k, _)| *k == c)
        .map_or(0, |(_, v)| v))
}

/// Checks the packet does what the measurement assumes, before timing it.
fn check_path(run: &Runner, prog: &Xdp, p: &Packet) -> Result<&'static str> {
    let (verdict, out) = run.once(prog, &p.frame)?;
    if !p.dispatched {
        ensure!(
            verdict == XDP_PASS,
            "{}: expected XDP_PASS, got {verdict}",
            p.key
        );
        return Ok("XDP_PASS");
    }
    ensure!(
        verdict == XDP_TX,
        "{}: expected XDP_TX, got {verdict}",
        p.key
    );
    let first = frames::parse(&out).context("the dispatched frame does not parse")?;
    let backends: Vec<SocketAddr> = BACKENDS
        .iter()
        .map(|b| b.parse())
        .collect::<Result<_, _>>()?;
    ensure!(
        backends.contains(&first.dst) && first.udp_checksum_ok && first.ip_checksum_ok,
        "{}: dispatched to {} (checksums ok: {}/{})",
        p.key,
        first.dst,
        first.ip_checksum_ok,
        first.udp_checksum_ok
    );
    let (verdict, back) = run.once(prog, &out)?;
    let back = frames::parse(&back).context("the bounced frame does not parse")?;
    ensure!(
        verdict == XDP_TX && back.dst == VIP.parse()?,
        "{}: the second repetition did not come back to the VIP ({verdict}, {})",
        p.key,
        back.dst
    );
    Ok("XDP_TX")
}

fn measure(plan: &Plan) -> Result<TestRunResults> {
    let net = private_netns()?;
    let ifindex = net.ifindex;
    let mut dp_cached = load_dispatcher(ifindex, Affinity::default())?;
    let mut dp_fib = load_dispatcher_with(ifindex, Affinity::default(), false)?;
    let mac_obj = load_mac_swap()?;
    let mut packets = messages::packets(
        CLIENT.parse()?,
        VIP.parse()?,
        [0x02, 0, 0, 0, 0, 0x10],
        VETH.1,
    );
    if let Some(invite) = packets.iter().find(|p| p.key == "invite") {
        packets.push(Packet {
            key: INVITE_FIB,
            label: "INVITE with SDP, next hop by FIB lookup",
            ..invite.clone()
        });
    }
    let mut results = Vec::new();
    for p in packets {
        let by_fib = p.key == INVITE_FIB;
        let dp = if by_fib { &mut dp_fib } else { &mut dp_cached };
        let run = Runner::new(ifindex, p.frame.len());
        let verdict = check_path(&run, dp.dispatch_program()?, &p)?;
        let mac: &Xdp = mac_obj
            .program(PROG_MAC_SWAP)
            .context("mac_swap missing")?
            .try_into()?;
        let (v, _) = run.once(mac, &p.frame)?;
        ensure!(v == XDP_TX, "mac_swap answered {v}, not XDP_TX");
        let repeat_mac = run.repeat_for(mac, &p.frame, plan.testrun_trial)?;
        let repeat_dp = run.repeat_for(dp.dispatch_program()?, &p.frame, plan.testrun_trial)?;

        let watched = if p.dispatched {
            Counter::Tx
        } else {
            Counter::NotService
        };
        let mut dp_wall = Vec::new();
        let mut dp_kernel = Vec::new();
        let mut mac_wall = Vec::new();
        let mut mac_kernel = Vec::new();
        let mut every = true;
        for _ in 0..plan.testrun_trials {
            let before = counter(dp, watched)?;
            let fallbacks = counter(dp, Counter::FibFallback)?;
            let t = run.timed(dp.dispatch_program()?, &p.frame, repeat_dp)?;
            every &= counter(dp, watched)? - before == u64::from(repeat_dp);
            // Dispatched rows take the path they are meant to: the cache, or the FIB.
            let fell_back = counter(dp, Counter::FibFallback)? - fallbacks;
            if p.dispatched {
                every &= fell_back == if by_fib { u64::from(repeat_dp) } else { 0 };
            }
            dp_wall.push(t.wall_ns);
            dp_kernel.push(t.kernel_ns);
            let t = run.timed(mac, &p.frame, repeat_mac)?;
            mac_wall.push(t.wall_ns);
            mac_kernel.push(t.kernel_ns);
        }
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let (dispatch_ns, mac_swap_ns) = (median(dp_kernel) as f64, median(mac_kernel) as f64);
        let cost = PacketCost {
            verdict,
            repeat: [repeat_dp, repeat_mac],
            trials: plan.testrun_trials,
            dispatch_ns,
            mac_swap_ns,
            dispatch_wall_ns: best(&dp_wall),
            mac_swap_wall_ns: best(&mac_wall),
            ratio: dispatch_ns / mac_swap_ns.max(1.0),
            every_repeat_counted: every,
            packet: p,
        };
        note(format!(
            "{:<30} {:>5} B  sip_dispatch {:>7.0} ns  mac_swap {:>4.0} ns  ratio {:>6.1}x  ({}; wall clock {:.0} / {:.0} ns)",
            cost.packet.label,
            cost.packet.frame_bytes,
            cost.dispatch_ns,
            cost.mac_swap_ns,
            cost.ratio,
            cost.verdict,
            cost.dispatch_wall_ns,
            cost.mac_swap_wall_ns
        ));
        results.push(cost);
    }
    let invite = results
        .iter()
        .find(|c| c.packet.key == "invite")
        .map(|c| c.packet.clone())
        .context("no INVITE among the packets")?;
    let affinity = Some(measure_affinity(plan, ifindex, &invite)?);
    let load = measure_load()?;
    // A failure there leaves the rows above standing.
    let (forwarding, forwarding_failed) = match forwarding::measure(plan, ifindex) {
        Ok(done) => done,
        Err(e) => {
            cancel::check()?;
            note(format!("forwarding modes not measured: {}", brief(&e)));
            (Vec::new(), vec![brief(&e)])
        }
    };
    Ok(TestRunResults {
        packets: results,
        load,
        affinity,
        forwarding,
        forwarding_failed,
    })
}
