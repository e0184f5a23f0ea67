//! The results of a run, the targets evaluated on them (pass or miss, with the ratio and,
//! for a miss, by how much and what dominates), and the Markdown report.
use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use serde::Serialize;
use sip_dispatch_common::SLOTS;

use crate::{
    e2e::E2eResults,
    live::{SystemRun, Throughput},
    tables::TableResults,
    testrun::TestRunResults,
};

#[derive(Clone, Debug, Serialize)]
pub struct Stamp {
    /// The run's directory name (UTC time).
    pub id: String,
    pub date: String,
    pub mode: &'static str,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub commit: String,
    pub load_average: String,
    pub tools: Vec<String>,
}

fn capture(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Stamp {
    pub fn collect(workspace: &Path, quick: bool) -> Stamp {
        let ws = workspace.to_string_lossy();
        let commit = capture("git", &["-C", &ws, "rev-parse", "--short=12", "HEAD"])
            .unwrap_or_else(|| "unknown".into());
        let dirty = capture(
            "git",
            &["-C", &ws, "status", "--porcelain", "--untracked-files=no"],
        )
        .is_some_and(|s| !s.is_empty());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let first_line = |program: &str, args: &[&str]| {
            let out = Command::new(program).args(args).output().ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_owned)
        };
        let tools = [
            first_line("kamailio", &["-v"]),
            first_line("sipp", &["-v"]),
            first_line("bpftool", &["--version"]),
        ]
        .into_iter()
        .flatten()
        .collect();
        Stamp {
            id: capture("date", &["-u", "+%Y%m%dT%H%M%SZ"]).unwrap_or_else(|| {
                format!(
                    "run-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or_default()
                )
            }),
            date: capture("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default(),
            mode: if quick { "quick" } else { "full" },
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            commit: if dirty {
                format!("{commit}+uncommitted changes")
            } else {
                commit
            },
            load_average: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            tools,
        }
    }
}

/// One target of the brief: `value` against `limit` (`at_most` or at least).
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub value: f64,
    pub limit: f64,
    pub at_most: bool,
    pub pass: bool,
    /// How the value was obtained, and for a miss: by how much and what dominates.
    pub note: String,
}

impl Target {
    fn new(name: impl Into<String>, value: f64, limit: f64, at_most: bool) -> Target {
        let pass = value.is_finite()
            && if at_most {
                value <= limit
            } else {
                value >= limit
            };
        Target {
            name: name.into(),
            value,
            limit,
            at_most,
            pass,
            note: String::new(),
        }
    }

    fn verdict(&self) -> &'static str {
        if self.pass { "pass" } else { "MISS" }
    }

    /// "by 1.4x", "by 3 %" (over an upper limit) or "by 29 %" (short of a lower one).
    fn shortfall_text(&self) -> String {
        let x = self.shortfall();
        if x >= 1.5 {
            format!("by {x:.1}x")
        } else if self.at_most {
            format!("by {:.0} %", (x - 1.0) * 100.0)
        } else {
            format!(
                "by {:.0} % (reaches {:.0} % of the limit)",
                (1.0 - 1.0 / x) * 100.0,
                100.0 / x
            )
        }
    }

    fn shortfall(&self) -> f64 {
        if self.at_most {
            self.value / self.limit
        } else {
            self.limit / self.value
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub stamp: Stamp,
    pub duration_s: f64,
    pub testrun: Option<TestRunResults>,
    pub throughput: Option<Throughput>,
    pub e2e: Option<E2eResults>,
    pub tables: Option<TableResults>,
    pub targets: Vec<Target>,
    pub errors: Vec<String>,
}

fn ratio_text(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x >= 100.0 {
        format!("{x:.0}x")
    } else if x >= 10.0 {
        format!("{x:.1}x")
    } else {
        format!("{x:.2}x")
    }
}

/// How far the single-run estimate lands from the loop figure, for the modes that have
/// both (other than the reference itself).
fn estimate_check(tr: &TestRunResults) -> String {
    let checks: Vec<String> = tr
        .forwarding
        .iter()
        .filter(|c| c.mode != c.reference)
        .filter_map(|c| {
            let loop_ns = c.loop_ns?;
            Some(format!(
                "{} {}: {:.0} ns against {loop_ns:.0} ({:+.0} %)",
                c.mode,
                c.family,
                c.single_estimate_ns,
                (c.single_estimate_ns / loop_ns - 1.0) * 100.0
            ))
        })
        .collect();
    if checks.is_empty() {
        String::new()
    } else {
        format!(" Estimate against loop: {}.", checks.join("; "))
    }
}

fn pps_text(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

impl Report {
    pub fn new(stamp: Stamp) -> Report {
        Report {
            stamp,
            duration_s: 0.0,
            testrun: None,
            throughput: None,
            e2e: None,
            tables: None,
            targets: Vec::new(),
            errors: Vec::new(),
        }
    }

    pub fn finish(&mut self, took: Duration) {
        self.duration_s = took.as_secs_f64();
        self.targets = self.evaluate();
    }

    fn evaluate(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        if let Some(tr) = &self.testrun
            && let (Some(inv), Some(long), Some(other)) =
                (tr.get("invite"), tr.get("invite_1400"), tr.get("non_sip"))
        {
            // The scan runs up to the end of the Call-ID line (about 60 bytes here).
            let scanned =
                |p: &crate::testrun::PacketCost| p.packet.call_id_offset.unwrap_or(0) as f64 + 60.0;
            let lines =
                |p: &crate::testrun::PacketCost| p.packet.lines_before_call_id.unwrap_or(0) as f64;
            let per_byte =
                (long.dispatch_ns - inv.dispatch_ns) / (scanned(long) - scanned(inv)).max(1.0);
            let per_line =
                (long.dispatch_ns - inv.dispatch_ns) / (lines(long) - lines(inv)).max(1.0);
            let options = tr.get("options").map_or(String::new(), |o| {
                format!(
                    " the OPTIONS ({:.0} lines) {:.0} ns;",
                    lines(o),
                    o.dispatch_ns
                )
            });
            let mut t = Target::new(
                "INVITE ns/packet <= 3x MAC-swap (BPF_PROG_TEST_RUN)",
                inv.ratio,
                3.0,
                true,
            );
            t.note = format!("{:.0} ns vs {:.0} ns.", inv.dispatch_ns, inv.mac_swap_ns);
            if !t.pass {
                t.note.push_str(&format!(
                    " Missed {}. Dominated by the Call-ID scan, whose cost follows what precedes \
                     the Call-ID: the typical INVITE ({:.0} header lines, ~{:.0} bytes up to the \
                     end of the Call-ID) takes {:.0} ns;{options} from the typical INVITE to \
                     the 1400-byte one ({:.0} lines) each extra line costs {per_line:.0} ns \
                     ({per_byte:.1} ns per byte). A non-SIP datagram (parse and one inlined \
                     array lookup) costs {:.0} ns. The scan loops inside the program (may_goto) \
                     over the per-CPU copy of the payload (bpf_xdp_load_bytes): a step per \
                     header line (its end searched two words per test) and per two words of \
                     the Call-ID value. A dispatched packet also pays for helper calls (the \
                     service hash lookup, the payload copy, the affinity LRU lookup), each \
                     returning through the SRSO return thunk on this CPU, the start-line \
                     check, the slot, backend, next-hop and tx-port lookups, the rewrite and \
                     the counters. The target, {:.0} ns for the whole packet, leaves the scan \
                     ~{:.1} ns per scanned byte.",
                    t.shortfall_text(),
                    lines(inv),
                    scanned(inv),
                    inv.dispatch_ns,
                    lines(long),
                    other.dispatch_ns,
                    3.0 * inv.mac_swap_ns,
                    (3.0 * inv.mac_swap_ns - other.dispatch_ns).max(0.0) / scanned(inv)
                ));
            }
            targets.push(t);
            let mut t = Target::new(
                "non-SIP datagram to another port <= 1.5x MAC-swap (BPF_PROG_TEST_RUN)",
                other.ratio,
                1.5,
                true,
            );
            t.note = format!(
                "{:.0} ns vs {:.0} ns: the frame is parsed and its UDP port looked up in the \
                 ports bitmap (an array lookup the verifier inlines); a port no service uses \
                 stops there.",
                other.dispatch_ns, other.mac_swap_ns
            );
            targets.push(t);
            let mut t = Target::new(
                "1400-byte worst case <= 3x typical INVITE",
                long.dispatch_ns / inv.dispatch_ns,
                3.0,
                true,
            );
            t.note = format!(
                "{:.0} ns (Call-ID at byte {}) vs {:.0} ns (byte {}).",
                long.dispatch_ns,
                long.packet.call_id_offset.unwrap_or(0),
                inv.dispatch_ns,
                inv.packet.call_id_offset.unwrap_or(0)
            );
            if !t.pass {
                t.note.push_str(&format!(
                    " Missed {}: the cost grows with the bytes scanned ({per_byte:.1} \
                     ns/byte), with no fixed part large enough to dilute it: {:.1}x the bytes \
                     cost {:.1}x the time.",
                    t.shortfall_text(),
                    scanned(long) / scanned(inv),
                    t.value
                ));
            }
            targets.push(t);
        }
        if let Some(th) = &self.throughput {
            if let (Some(native), Some(ceiling)) = (th.get("native"), th.get("ceiling")) {
                let mut t = Target::new(
                    "delivered pps >= 0.85 of the MAC-swap ceiling (native XDP)",
                    native.delivered_pps / ceiling.delivered_pps,
                    0.85,
                    false,
                );
                let skb = th.get("skb").map_or(String::new(), |r| {
                    format!(
                        " (skb mode: {})",
                        ratio_text(r.delivered_pps / ceiling.delivered_pps)
                    )
                });
                t.note = format!(
                    "{} pps vs {} pps{skb}; the generator alone makes {} pps.",
                    pps_text(native.delivered_pps),
                    pps_text(ceiling.delivered_pps),
                    pps_text(th.generator.pps)
                );
                if !t.pass {
                    let live = match (native.live_ns_per_packet, ceiling.live_ns_per_packet) {
                        (Some(a), Some(b)) => format!(
                            " Under load the program takes {a:.0} ns/packet against {b:.0} ns \
                             for the MAC swap;"
                        ),
                        _ => String::new(),
                    };
                    t.note.push_str(&format!(
                        " Missed {}.{live} on veth the XDP program runs in softirq on \
                         the generator's CPU, so every ns it adds (mostly the Call-ID scan) is \
                         taken from sending; net CPU per million delivered: {:.2} s vs {:.2} s.",
                        t.shortfall_text(),
                        native.net_cpu_s_per_mpkt,
                        ceiling.net_cpu_s_per_mpkt
                    ));
                }
                targets.push(t);
            }
            if let (Some(native), Some(ceiling)) = (th.get("native"), th.get("ceiling"))
                && let (Some(sd), Some(swap)) =
                    (native.live_ns_per_packet, ceiling.live_ns_per_packet)
            {
                let mut t = Target::new(
                    "INVITE live ns/packet <= 3x MAC-swap under load (bpf_stats)",
                    sd / swap,
                    3.0,
                    true,
                );
                let off = th
                    .get("native_affinity_off")
                    .and_then(|r| r.live_ns_per_packet)
                    .map_or(String::new(), |ns| {
                        format!(" ({ns:.0} ns with --affinity off, {:.1}x)", ns / swap)
                    });
                t.note = format!(
                    "{sd:.0} ns{off} vs {swap:.0} ns. Every packet of this load is a new \
                     call: with affinity on, each inserts an entry into the full LRU map, \
                     which evicts one."
                );
                if !t.pass {
                    t.note.push_str(&format!(" Missed {}.", t.shortfall_text()));
                }
                targets.push(t);
            }
            if let (Some(native), Some(kam), Some(floor)) =
                (th.get("native"), th.get("kamailio"), th.get("ceiling"))
            {
                // On veth every system pays the same floor (receiving, the bridge, the
                // backends' stacks): the MAC swap, which does nothing, costs it too. What
                // each system adds above it is what it costs to dispatch.
                let above = |r: &SystemRun| r.net_cpu_s_per_mpkt - floor.net_cpu_s_per_mpkt;
                let (sd, kamailio) = (above(native), above(kam));
                let ratio = if sd > 0.0 {
                    kamailio / sd
                } else {
                    f64::INFINITY
                };
                let mut t = Target::new(
                    "CPU per delivered packet above the MAC-swap floor: Kamailio / sip-dispatch >= 100 (native XDP)",
                    ratio,
                    100.0,
                    false,
                );
                // An immeasurably small cost above the floor is a pass, not a failure.
                t.pass = t.pass || sd <= 0.0;
                let skb = th.get("skb").map_or(String::new(), |r| {
                    format!(" (skb mode adds {:.2})", above(r))
                });
                t.note = format!(
                    "Above the floor of {:.2} CPU-s per million delivered (the MAC swap's, \
                     generator's share subtracted), sip-dispatch adds {sd:.2}{skb} and \
                     Kamailio {kamailio:.2}. Per CPU-second overall: {} vs {} packets \
                     ({:.1}x; the floor itself reaches {:.1}x).",
                    floor.net_cpu_s_per_mpkt,
                    pps_text(native.delivered_per_cpu_s),
                    pps_text(kam.delivered_per_cpu_s),
                    native.delivered_per_cpu_s / kam.delivered_per_cpu_s,
                    floor.delivered_per_cpu_s / kam.delivered_per_cpu_s
                );
                if !t.pass {
                    let program = native.live_ns_per_packet.map_or(String::new(), |ns| {
                        format!(
                            " The XDP program alone takes {ns:.0} ns/packet under load \
                             (bpf_stats), {:.2} CPU-s per million: the Call-ID scan and the \
                             affinity insert of a new call dominate.",
                            ns / 1e3
                        )
                    });
                    t.note
                        .push_str(&format!(" Missed {}.{program}", t.shortfall_text()));
                }
                targets.push(t);
            }
        }
        if let Some(e2e) = &self.e2e
            && let (Some(sd), Some(direct)) = (e2e.get("sip-dispatch"), e2e.direct_median())
        {
            let mut t = Target::new(
                "SIPp median response time through sip-dispatch <= 1.05x direct",
                sd.median_ms / direct,
                1.05,
                true,
            );
            let spread = match (e2e.get("direct"), e2e.get("direct-again")) {
                (Some(a), Some(b)) => format!(
                    " The two direct runs (before and after) gave {:.3} and {:.3} ms: \
                     {:.1} % apart.",
                    a.median_ms,
                    b.median_ms,
                    (a.median_ms - b.median_ms).abs() / direct * 100.0
                ),
                _ => String::new(),
            };
            t.note = format!(
                "{:.3} ms vs {direct:.3} ms (direct, mean of the direct runs) at {} calls/s.{spread}",
                sd.median_ms, e2e.rate
            );
            if !t.pass {
                let program = self
                    .throughput
                    .as_ref()
                    .and_then(|th| th.get("native"))
                    .and_then(|r| r.live_ns_per_packet)
                    .map_or(String::new(), |ns| {
                        format!(" the XDP program takes {:.1} µs per message,", ns / 1e3)
                    });
                t.note.push_str(&format!(
                    " Missed {} ({:+.3} ms): the dispatched INVITE takes one more hop \
                     (the dispatcher's veth and a second pass through the bridge);{program} \
                     SIPp's own event loop (1 ms timer) makes up most of the {direct:.1} ms.",
                    t.shortfall_text(),
                    sd.median_ms - direct
                ));
            }
            targets.push(t);
        }
        if let Some(tables) = &self.tables {
            for s in &tables.sizes {
                let n = s.backends;
                let mut t = Target::new(
                    format!("{n} backends (weights 1..=4): shares within 2% of the weights"),
                    1.0 + s.max_share_deviation,
                    1.02,
                    true,
                );
                t.note = format!(
                    "largest |share / weight share - 1| over the {SLOTS} slots: {:.4}.",
                    s.max_share_deviation
                );
                targets.push(t);
                let mut t = Target::new(
                    format!("{n} backends, one removed: moved <= 1.1 x its share"),
                    s.moved_over_share_max,
                    1.1,
                    true,
                );
                t.note = format!(
                    "moved {:.5} of the slots at worst ({} removals; calls: {:.5}); 1/N = {:.5}.",
                    s.moved_slots_max, s.removals, s.moved_calls_max, s.ideal_moved
                );
                if !t.pass {
                    t.note.push_str(&format!(
                        " Missed {}: with exact shares (Maglev), the other backends' walks \
                         claim slots in a different order once one is gone, and each backend \
                         owns only about {:.0} of the {SLOTS} slots at N = {n}; rendezvous \
                         hashing moves exactly 1x but misses the share and survivor targets.",
                        t.shortfall_text(),
                        SLOTS as f64 / n as f64
                    ));
                }
                targets.push(t);
                let mut t = Target::new(
                    format!("{n} backends, one removed: largest survivor load <= 1.05 x ideal"),
                    s.largest_survivor_load,
                    1.05,
                    true,
                );
                t.note = format!(
                    "most loaded survivor's slot share / its new weight share: {:.4}; largest \
                     share of the moved slots one survivor took {:.4} (calls: {:.4}); Kamailio \
                     hash % n puts {:.0} % of them on one neighbour.",
                    s.largest_survivor_load,
                    s.largest_survivor_share,
                    s.largest_survivor_share_calls,
                    s.kamailio_inactive_largest_share * 100.0
                );
                targets.push(t);
            }
            if let Some(s) = tables.sizes.iter().find(|s| s.backends == 512) {
                let mut t = Target::new(
                    "512 backends: build_table <= 50 ms (x 50 ms)",
                    s.build_ms / 50.0,
                    1.0,
                    true,
                );
                t.note = format!("median of the builds, release build: {:.2} ms.", s.build_ms);
                targets.push(t);
            }
        }
        targets
    }

    /// The targets, one line each, for the terminal.
    pub fn targets_text(&self) -> String {
        let mut s = String::from("targets:\n");
        for t in &self.targets {
            let _ = writeln!(
                s,
                "    {:<4} {:<68} {:>8} (limit {}{})",
                t.verdict(),
                t.name,
                ratio_text(t.value),
                if t.at_most { "<= " } else { ">= " },
                t.limit
            );
        }
        s
    }

    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let st = &self.stamp;
        let _ = writeln!(m, "# sip-dispatch benchmark ({} run)\n", st.mode);
        let _ = writeln!(
            m,
            "| | |\n|---|---|\n| date | {} |\n| kernel | {} |\n| CPU | {} ({} CPUs) |\n\
             | commit | {} |\n| load average at start | {} |\n| tools | {} |\n| took | {:.0} s |\n",
            st.date,
            st.kernel,
            st.cpu,
            st.cpus,
            st.commit,
            st.load_average,
            st.tools.join("; "),
            self.duration_s
        );
        self.md_targets(&mut m);
        self.md_testrun(&mut m);
        self.md_throughput(&mut m);
        self.md_e2e(&mut m);
        self.md_tables(&mut m);
        if !self.errors.is_empty() {
            let _ = writeln!(m, "## Parts that failed\n");
            for e in &self.errors {
                let _ = writeln!(m, "- {}", e.replace('\n', " "));
            }
            m.push('\n');
        }
        m.push_str(METHOD);
        m
    }

    fn md_targets(&self, m: &mut String) {
        let _ = writeln!(m, "## Targets\n");
        let _ = writeln!(
            m,
            "| target | measured | limit | verdict | notes |\n|---|---|---|---|---|"
        );
        for t in &self.targets {
            let _ = writeln!(
                m,
                "| {} | {} | {} {} | **{}** | {} |",
                t.name,
                ratio_text(t.value),
                if t.at_most { "≤" } else { "≥" },
                t.limit,
                t.verdict(),
                t.note
            );
        }
        m.push('\n');
    }

    fn md_testrun(&self, m: &mut String) {
        let Some(tr) = &self.testrun else { return };
        let _ = writeln!(m, "## 1. Per-packet cost (BPF_PROG_TEST_RUN)\n");
        let _ = writeln!(
            m,
            "| packet | frame B | Call-ID at | verdict | sip_dispatch ns | mac_swap ns | ratio | wall-clock ns (sd / swap) | repeat (sd / swap) | every repeat counted |\n\
             |---|---|---|---|---|---|---|---|---|---|"
        );
        for p in &tr.packets {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {:.0} / {:.0} | {} / {} | {} |",
                p.packet.label,
                p.packet.frame_bytes,
                p.packet
                    .call_id_offset
                    .map_or("-".into(), |o| o.to_string()),
                p.verdict,
                p.dispatch_ns,
                p.mac_swap_ns,
                ratio_text(p.ratio),
                p.dispatch_wall_ns,
                p.mac_swap_wall_ns,
                p.repeat[0],
                p.repeat[1],
                if p.every_repeat_counted { "yes" } else { "NO" }
            );
        }
        if let Some(a) = &tr.affinity {
            let _ = writeln!(
                m,
                "\nCall affinity, the typical INVITE (same tables, every backend up):\n\n\
                 | program | ns/packet | vs affinity off |\n|---|---|---|\n\
                 | `--affinity off` | {:.0} | 1.00x |\n\
                 | on, the call's entry followed (hit) | {:.0} | {} |\n\
                 | on, a BYE of an unknown call (miss, nothing created) | {:.0} | {} |",
                a.off_ns,
                a.hit_ns,
                ratio_text(a.hit_ratio),
                a.miss_ns,
                ratio_text(a.miss_ratio)
            );
        }
        if !tr.load.is_empty() {
            let _ = writeln!(
                m,
                "\nLoading the dispatcher (the object, its maps and the verifier; `sip_dispatch`'s \
                 program info):\n\n| affinity | load ms | verified instructions | xlated B | jited B |\n\
                 |---|---|---|---|---|"
            );
            let opt = |v: Option<u32>| v.map_or("-".to_owned(), |n| n.to_string());
            for l in &tr.load {
                let _ = writeln!(
                    m,
                    "| {} | {:.0} | {} | {} | {} |",
                    if l.affinity { "on" } else { "off" },
                    l.load_ms,
                    opt(l.verified_insns),
                    opt(l.xlated_bytes),
                    opt(l.jited_bytes)
                );
            }
        }
        self.md_forwarding(m, tr);
        if let Some(th) = &self.throughput {
            let _ = writeln!(
                m,
                "\nUnder live load (`kernel.bpf_stats_enabled`, run_time_ns / run_cnt, the \
                 same 900-byte INVITE with changing Call-IDs; the kernel's timing of each run \
                 adds its own few tens of ns):\n"
            );
            let _ = writeln!(
                m,
                "| program | live ns/packet | runs counted | TestRun ns/packet |\n|---|---|---|---|"
            );
            let inv = tr.get("invite");
            for key in ["native", "native_affinity_off", "skb", "ceiling"] {
                if let Some(r) = th.get(key)
                    && let Some(ns) = r.live_ns_per_packet
                {
                    let test = inv.map_or(f64::NAN, |i| {
                        if key == "ceiling" {
                            i.mac_swap_ns
                        } else {
                            i.dispatch_ns
                        }
                    });
                    let _ = writeln!(
                        m,
                        "| {} | {ns:.1} | {} | {test:.1} |",
                        r.label,
                        r.live_runs.unwrap_or(0)
                    );
                }
            }
        }
        m.push('\n');
    }

    fn md_forwarding(&self, m: &mut String, tr: &TestRunResults) {
        if tr.forwarding.is_empty() && tr.forwarding_failed.is_empty() {
            return;
        }
        let _ = writeln!(
            m,
            "\nForwarding modes, the typical INVITE (affinity on, the call's entry followed), \
             next to the MAC swap on the same frame:\n"
        );
        let _ = writeln!(
            m,
            "| mode | family | frame B (out) | method | sip_dispatch ns | mac_swap ns | ratio | loop probe | single runs ns | single-run estimate ns | every run counted |\n\
             |---|---|---|---|---|---|---|---|---|---|---|"
        );
        for c in &tr.forwarding {
            let _ = writeln!(
                m,
                "| {} | {} | {} ({}) | {} | {:.0} | {:.0} | {} | {} / {} | {:.0} | {:.0} | {} |",
                c.mode,
                c.family,
                c.frame_bytes,
                c.out_bytes,
                c.method,
                c.dispatch_ns,
                c.mac_swap_ns,
                ratio_text(c.ratio),
                c.loop_probe[0],
                c.loop_probe[1],
                c.single_ns,
                c.single_estimate_ns,
                if c.every_run_counted { "yes" } else { "NO" }
            );
        }
        for f in &tr.forwarding_failed {
            let _ = writeln!(m, "- not measured: {}", f.replace('\n', " "));
        }
        if let Some(c) = tr.forwarding.first() {
            let _ = writeln!(
                m,
                "\n*method*: `repeat` is the kernel's loop, as above; the *loop probe* ({} \
                 repetitions) counts those that dispatched. In `ipip` only the first does (the \
                 next sees an IP-in-IP packet), so its figure comes from single runs (`repeat` \
                 1), timed for every mode in turn: the *single-run estimate* is {}'s loop \
                 figure plus the mode's single runs minus {}'s, taken within each trial \
                 (the programs are loaded anew for every trial). Single runs cost more than \
                 the loop for a fixed part (the MAC swap: {:.0} ns against {:.0}) and for \
                 caches and branch predictors cooled by the syscall around each run, which \
                 cost the dispatch program far more than the MAC swap and about the same in \
                 every mode; where the loop is valid the estimate is shown next to it as a \
                 check.{}",
                c.loop_probe[1],
                c.reference,
                c.reference,
                c.mac_swap_single_ns,
                c.mac_swap_ns,
                estimate_check(tr)
            );
        }
    }

    fn md_throughput(&self, m: &mut String) {
        let Some(th) = &self.throughput else { return };
        let _ = writeln!(
            m,
            "## 2. Forwarding throughput (veth, generator on CPU 0)\n"
        );
        let _ = writeln!(
            m,
            "{}-byte INVITEs with distinct Call-IDs, {:.1} s per system, best of {} round(s) \
             (delivered pps of every round in the JSON). The generator alone (frames dropped \
             at once): {} pps at {:.3} CPU-s per million frames; that share is subtracted for \
             the *net* CPU figures. Plot: `throughput.svg`.\n",
            th.frame_bytes,
            th.runs.first().map_or(0.0, |r| r.window_s),
            th.rounds,
            pps_text(th.generator.pps),
            th.generator.cpu_s_per_mpkt
        );
        let _ = writeln!(
            m,
            "| system | offered pps | delivered pps | loss | per backend pps | CPU-s (net) | CPU-s / M delivered (gross / net) | delivered per net CPU-s | other load (CPUs) |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        for r in &th.runs {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {:.1} % | {} | {:.2} ({:.2}) | {:.2} / {:.2} | {} | {:.2} |",
                r.label,
                pps_text(r.offered_pps),
                pps_text(r.delivered_pps),
                r.loss * 100.0,
                r.per_backend_pps
                    .iter()
                    .map(|p| pps_text(*p))
                    .collect::<Vec<_>>()
                    .join(" / "),
                r.cpu_s,
                r.net_cpu_s,
                r.gross_cpu_s_per_mpkt,
                r.net_cpu_s_per_mpkt,
                pps_text(r.delivered_per_cpu_s),
                r.other_load_cpus
            );
        }
        let kam = th.get("kamailio");
        let ceil = th.get("ceiling");
        let _ = writeln!(
            m,
            "\nRatios (delivered pps; delivered per net CPU-second):\n"
        );
        let _ = writeln!(
            m,
            "| system | pps vs ceiling | pps vs Kamailio | per CPU-s vs ceiling | per CPU-s vs Kamailio | net CPU-s / M above the ceiling's |\n|---|---|---|---|---|---|"
        );
        let r2 = |a: f64, b: Option<f64>| b.map_or("-".into(), |b| ratio_text(a / b));
        for r in &th.runs {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} |",
                r.label,
                r2(r.delivered_pps, ceil.map(|c| c.delivered_pps)),
                r2(r.delivered_pps, kam.map(|k| k.delivered_pps)),
                r2(r.delivered_per_cpu_s, ceil.map(|c| c.delivered_per_cpu_s)),
                r2(r.delivered_per_cpu_s, kam.map(|k| k.delivered_per_cpu_s)),
                match ceil {
                    // The stack's packets end at a socket on the dispatcher: no path to compare.
                    Some(_) if r.key == "stack" => "n/a (not forwarded)".to_owned(),
                    Some(c) => format!("{:.2}", r.net_cpu_s_per_mpkt - c.net_cpu_s_per_mpkt),
                    None => "-".to_owned(),
                },
            );
        }
        let _ = writeln!(
            m,
            "\n- *no XDP* is what the kernel stack delivers to a UDP socket on the VIP with \
             nothing attached (counted at the socket): the ceiling of any userspace \
             dispatcher on this path. It is **not** sip-dispatch's slow path (the daemon has no \
             way to run without XDP attached), which handles only the exceptions.\n\
             - The ceiling's frames bounce back to the source MAC, which the generator sets to \
             backend 1's: they take the same bridge and backend path as dispatched frames.\n\
             - Health-check OPTIONS answered by the backends during the runs: {}.",
            th.options_answered
        );
        for r in &th.runs {
            for n in &r.notes {
                let _ = writeln!(m, "- {}: {n}", r.label);
            }
        }
        for f in &th.failed {
            let _ = writeln!(m, "- not measured: {}", f.replace('\n', " "));
        }
        m.push('\n');
    }

    fn md_e2e(&self, m: &mut String) {
        let Some(e) = &self.e2e else { return };
        let _ = writeln!(
            m,
            "## 3. End to end (SIPp, {} calls at {} calls/s per variant)\n",
            e.calls, e.rate
        );
        let _ = writeln!(
            m,
            "| path | ok / failed | samples | 180 after 200 | median ms | p99 ms | mean ms | max ms | trace_rtt median / p99 ms | median vs direct |\n\
             |---|---|---|---|---|---|---|---|---|---|"
        );
        let direct = e.direct_median();
        for r in &e.runs {
            let _ = writeln!(
                m,
                "| {} | {} / {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} / {} | {} |",
                r.label,
                r.successful,
                r.failed,
                r.samples,
                r.reordered,
                r.median_ms,
                r.p99_ms,
                r.mean_ms,
                r.max_ms,
                r.rtt_csv_median_ms
                    .map_or("-".into(), |x| format!("{x:.0}")),
                r.rtt_csv_p99_ms.map_or("-".into(), |x| format!("{x:.0}")),
                direct.map_or("-".into(), |d| ratio_text(r.median_ms / d))
            );
        }
        for f in &e.failed {
            let _ = writeln!(m, "- not measured: {}", f.replace('\n', " "));
        }
        let _ = writeln!(
            m,
            "\nResponse time: INVITE sent to 200 OK received, from the UAC's `-trace_shortmsg` \
             log (µs timestamps); SIPp's `-trace_rtt` file has whole milliseconds only. \
             *median vs direct* compares with the mean of the two direct runs. *180 after 200*: \
             calls whose replies arrived out of order (SIPp fails them as unexpected messages); \
             through Kamailio this happens when its two children forward the UAS's 180 and \
             200 concurrently. sip-dispatch is not in the response path.\n"
        );
    }

    fn md_tables(&self, m: &mut String) {
        let Some(t) = &self.tables else { return };
        let _ = writeln!(m, "## 4. Table work\n");
        let _ = writeln!(
            m,
            "| backends | build ms | swap ms | rebuild + swap ms | first install ms | share deviation (max) | moved (mean / worst) | 1/N | moved / own share (worst) | largest survivor load | largest share of the moved | 1/(N-1) | calls moved (worst) | Kamailio: inactive moved / largest share; reload moved |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for s in &t.sizes {
            let _ = writeln!(
                m,
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.4} | {:.5} / {:.5} | {:.5} | {:.2} | {:.4} | {:.4} | {:.4} | {:.5} | {:.4} / {:.2}; {:.3} |",
                s.backends,
                s.build_ms,
                s.swap_ms,
                s.rebuild_and_swap_ms,
                s.first_install_ms,
                s.max_share_deviation,
                s.moved_slots_mean,
                s.moved_slots_max,
                s.ideal_moved,
                s.moved_over_share_max,
                s.largest_survivor_load,
                s.largest_survivor_share,
                s.ideal_survivor_share,
                s.moved_calls_max,
                s.kamailio_inactive_moved,
                s.kamailio_inactive_largest_share,
                s.kamailio_reload_moved
            );
        }
        let _ = writeln!(
            m,
            "\nWeights 1, 2, 3, 4 cycling. Share deviation: the largest |share / weight share - 1| \
             over the {SLOTS} slots. Moved fractions are over the {SLOTS} slots (and over {} \
             synthetic Call-IDs hashed with the dispatcher's SipHash key), one backend removed at \
             a time from the full set; *moved / own share* divides by the removed backend's \
             weight share, *largest survivor load* is the most loaded survivor's share over its \
             new weight share. Kamailio's columns model `ds_select_dst(set, \"0\")` (`hash % n`, \
             unweighted) on the same Call-IDs: a destination gone inactive sends all its calls \
             to the next index; a reload without it remaps through `hash % (n-1)`.\n",
            t.sizes.first().map_or(0, |s| s.call_ids)
        );
    }
}

const METHOD: &str = "## How it was measured\n\n\
- **Per-packet cost**: the compiled `sip_dispatch` program and a minimal `mac_swap` (swap \
the Ethernet addresses, XDP_TX) run through BPF_PROG_TEST_RUN (aya `TestRun`) with a \
repeat count sized for a fixed time per trial, in a private network namespace with a veth, \
permanent neighbours and forwarding on, so that every repetition does the whole dispatch \
(including the next hop, from `sd_nexthop_v1` filled as the daemon fills it, and the \
rewrite; the row \"next hop by FIB lookup\" leaves it empty, so that `bpf_fib_lookup` \
answers). Since a repeated run sees the frame as the \
previous repetition left it, the VIP's backends are themselves services pointing back at \
the VIP: the frame bounces, and the `xdp_tx` counter proves every repetition dispatched. \
ns/packet is the kernel's own figure (median of the trials; the kernel stops its clock \
while the test thread is rescheduled, so other load does not count); the wall clock \
around the syscall, divided by the repeat count, is shown next to it. The forwarding \
modes (same namespace, IPv6 too): `rewrite` bounces as above and `l2dsr` keeps the VIP, so \
the loop dispatches every time; `ipip` grows the frame that the next repetition would see, \
so every mode is also timed by single runs (`repeat` 1, the frame copied in each time), \
in turn, and `ipip`'s ns/packet is `l2dsr`'s loop figure plus the difference of their \
single runs (the same program up to the last step, so the single runs' extra costs cancel; \
the same estimate for `rewrite` checks it against its loop figure). The modes' programs \
and maps are loaded anew for every trial, so their medians are over several loads.\n\
- **Throughput**: a generator thread pinned to CPU 0 writes the INVITE (each with its own \
Call-ID) into the dispatcher's veth peer through an AF_PACKET socket, 64 frames per \
`sendmmsg`, qdisc bypassed, blocking when the receiver backs up (trafgen was tried first: it \
dies with EAGAIN as soon as the veth's XDP ring backs up, see `generator.rs`); delivered = \
receive counters of the backends' veths (of the socket for *no XDP*), offered = transmit + \
drop counters of the sending veth. CPU = utime + stime from /proc of the generator, \
ksoftirqd and every process in the dispatcher's namespace (and the socket reader), so other \
load on the machine is left out; *net* subtracts the generator's own cost per offered \
frame, measured first by sending into a veth whose peer is down. On veth the whole \
receive path (XDP, stack, bridge, backends) runs in softirq on the generator's CPU; Kamailio \
and the socket reader are pinned to CPU 1. The XDP program's live ns/packet: \
`kernel.bpf_stats_enabled=1` for a short window after the measured one (so the counting \
overhead does not lower the throughput figures), then restored.\n\
- **End to end**: SIPp's built-in `uac` at a fixed rate against three SIPp `uas -aa` \
backends; response time = INVITE to 200 OK per call from the UAC's message log.\n\
- **Tables**: `build_table` and `Dataplane::install_service` (a new inner map filled and \
swapped in) on an unpinned `Dataplane`, medians of several runs; backends weighted 1, 2, 3, \
4 cycling, the removed ones spread over the set and over the weights.\n";
