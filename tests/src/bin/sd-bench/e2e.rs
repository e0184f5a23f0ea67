//! Part 3: end to end with SIPp. Three SIPp UAS backends (`-sn uas -aa`); the SIPp UAC
//! (`-sn uac`) places calls at a fixed rate: directly to backend 1, through sip-dispatch
//! (native XDP), through Kamailio and directly again (the two direct runs bracket the
//! others and show the run-to-run noise), one after the other on the same topology.
//!
//! Response time of a call: from the UAC sending the INVITE to it receiving the 200 OK,
//! taken from the UAC's `-trace_shortmsg` log (microsecond timestamps). SIPp's own
//! `-trace_rtt` figures (whole milliseconds) are reported next to them.
use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use sip_dispatch_testbed::{
    dispatcher::XdpMode,
    process::Process,
    sipp::{StatRow, Uas, short_messages},
};

use crate::{
    Plan, brief, kamailio,
    live::{Bed, SUT_CPU},
    note,
};

#[derive(Clone, Debug, Serialize)]
pub struct E2eRun {
    pub key: &'static str,
    pub label: &'static str,
    pub target: String,
    pub calls: u32,
    pub successful: u64,
    pub failed: u64,
    /// Calls with both an INVITE and its 200 in the log.
    pub samples: usize,
    /// Calls whose 180 arrived after their 200 (SIPp fails them as unexpected).
    pub reordered: usize,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
    /// SIPp's `-trace_rtt` (whole ms).
    pub rtt_csv_samples: usize,
    pub rtt_csv_median_ms: Option<f64>,
    pub rtt_csv_p99_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct E2eResults {
    pub rate: u32,
    pub calls: u32,
    pub runs: Vec<E2eRun>,
    pub failed: Vec<String>,
}

impl E2eResults {
    pub fn get(&self, key: &str) -> Option<&E2eRun> {
        self.runs.iter().find(|r| r.key == key)
    }

    /// The direct median: the mean of the two direct runs (before and after the others).
    pub fn direct_median(&self) -> Option<f64> {
        let v: Vec<f64> = ["direct", "direct-again"]
            .iter()
            .filter_map(|k| self.get(k))
            .map(|r| r.median_ms)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// What the UAC's `-trace_shortmsg` log says: INVITE-to-200 times (ms, sorted), and the
/// calls whose provisional response came after the 200 (replies reordered on the way).
#[derive(Debug, Default, PartialEq)]
pub struct Timings {
    pub times: Vec<f64>,
    pub reordered: usize,
}

/// Reads a `-trace_shortmsg` log: `date \t time \t epoch \t S|R \t Call-ID \t CSeq:N METHOD
/// \t first line`.
pub fn response_times(log: &str) -> Timings {
    let mut sent: BTreeMap<&str, f64> = BTreeMap::new();
    let mut answered: BTreeMap<&str, f64> = BTreeMap::new();
    let mut reordered = std::collections::BTreeSet::new();
    for m in short_messages(log) {
        let Some(at) = m.at else {
            continue;
        };
        let invite_response = m.received() && m.cseq.ends_with(" INVITE");
        if m.sent() && m.first_line.starts_with("INVITE ") {
            sent.entry(m.call_id).or_insert(at);
        } else if invite_response && m.first_line.starts_with("SIP/2.0 200") {
            answered.entry(m.call_id).or_insert(at);
        } else if invite_response
            && m.first_line.starts_with("SIP/2.0 1")
            && answered.contains_key(m.call_id)
        {
            reordered.insert(m.call_id);
        }
    }
    let mut times: Vec<f64> = answered
        .iter()
        .filter_map(|(id, ok)| sent.get(id).map(|s| (ok - s) * 1e3))
        .collect();
    times.sort_by(f64::total_cmp);
    Timings {
        times,
        reordered: reordered.len(),
    }
}

/// The response times (ms) of SIPp's `-trace_rtt` file.
fn rtt_csv(path: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut v: Vec<f64> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split(';').nth(1)?.trim().parse().ok())
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

struct Variant {
    key: &'static str,
    label: &'static str,
    target: SocketAddr,
    port: u16,
}

fn uac(bed: &Bed, plan: &Plan, v: &Variant) -> Result<E2eRun> {
    let calls = plan.call_rate * plan.call_seconds;
    let label = format!("uac-{}", v.key);
    let dir = &bed.logs;
    let stat = dir.join(format!("{label}.stat.csv"));
    let messages = dir.join(format!("{label}.messages.log"));
    let bound = Duration::from_secs(u64::from(plan.call_seconds) + 20);
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let args: Vec<String> = vec![
        "-sn".into(),
        "uac".into(),
        v.target.to_string(),
        "-i".into(),
        bed.client.ip().to_string(),
        "-p".into(),
        v.port.to_string(),
        "-bind_local".into(),
        "-nostdin".into(),
        "-cid_str".into(),
        format!("%u-{}-sdbench@%s", v.key),
        "-m".into(),
        calls.to_string(),
        "-r".into(),
        plan.call_rate.to_string(),
        "-timeout".into(),
        format!("{}s", bound.as_secs()),
        "-timeout_error".into(),
        "-trace_stat".into(),
        "-stf".into(),
        path(&stat),
        "-fd".into(),
        "1".into(),
        "-trace_shortmsg".into(),
        "-shortmessage_file".into(),
        path(&messages),
        "-trace_rtt".into(),
        "-rtt_freq".into(),
        "1".into(),
    ];
    let mut proc = Process::spawn(&bed.client_ns, "sipp", &args, dir, &label)?;
    let status = match proc.wait_timeout(bound + Duration::from_secs(10))? {
        Some(s) => s,
        None => {
            proc.stop()?;
            bail!("the UAC did not finish within {bound:?}");
        }
    };
    if matches!(status.code(), Some(254 | 255) | None) {
        bail!("the UAC failed ({status}): {}", proc.stderr_tail(10));
    }
    let row = StatRow::read(&stat)?;
    let log = std::fs::read_to_string(&messages)
        .with_context(|| format!("reading {}", messages.display()))?;
    let Timings { times, reordered } = response_times(&log);
    let rtt = rtt_csv(&dir.join(format!("uac_{}_rtt.csv", proc.pid())));
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let run = E2eRun {
        key: v.key,
        label: v.label,
        target: v.target.to_string(),
        calls,
        successful: row.get("SuccessfulCall(C)").unwrap_or(0),
        failed: row.get("FailedCall(C)").unwrap_or(0),
        samples: times.len(),
        reordered,
        median_ms: percentile(&times, 0.5),
        p99_ms: percentile(&times, 0.99),
        mean_ms: mean,
        max_ms: times.last().copied().unwrap_or(f64::NAN),
        rtt_csv_samples: rtt.len(),
        rtt_csv_median_ms: (!rtt.is_empty()).then(|| percentile(&rtt, 0.5)),
        rtt_csv_p99_ms: (!rtt.is_empty()).then(|| percentile(&rtt, 0.99)),
    };
    note(format!(
        "{:<34} {} of {} calls ok; response time median {:.3} ms, p99 {:.3} ms (trace_rtt: {} / {} ms)",
        run.label,
        run.successful,
        run.calls,
        run.median_ms,
        run.p99_ms,
        run.rtt_csv_median_ms
            .map_or("-".into(), |x| format!("{x:.0}")),
        run.rtt_csv_p99_ms.map_or("-".into(), |x| format!("{x:.0}")),
    ));
    Ok(run)
}

pub fn run(bed: &Bed, plan: &Plan) -> Result<E2eResults> {
    let bound = Duration::from_secs(4 * (u64::from(plan.call_seconds) + 40));
    let servers = bed
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            Uas::start(
                &b.ns,
                b.addr.ip(),
                &bed.logs,
                &format!("uas-b{}", i + 1),
                bound,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let variants = [
        Variant {
            key: "direct",
            label: "directly to backend 1",
            target: bed.backends[0].addr,
            port: 5071,
        },
        Variant {
            key: "sip-dispatch",
            label: "through sip-dispatch (native XDP)",
            target: bed.vip,
            port: 5072,
        },
        Variant {
            key: "kamailio",
            label: "through Kamailio",
            target: bed.vip,
            port: 5073,
        },
        // Direct once more: the spread of the two direct runs shows the run-to-run noise.
        Variant {
            key: "direct-again",
            label: "directly to backend 1, again",
            target: bed.backends[0].addr,
            port: 5074,
        },
    ];
    let mut runs = Vec::new();
    let mut failed = Vec::new();
    for v in &variants {
        let result = match v.key {
            "sip-dispatch" => (|| {
                let pass = bed.hold_xdp_pass()?;
                let daemon = bed.start_daemon(XdpMode::Native, &[], "sip-dispatch-e2e")?;
                let r = uac(bed, plan, v);
                daemon.stop_with_stats()?;
                pass.stop()?;
                r
            })(),
            "kamailio" => (|| {
                let mut k = kamailio::start(
                    &bed.disp_ns,
                    bed.vip,
                    &bed.backend_addrs(),
                    &bed.logs,
                    "kamailio-e2e",
                    SUT_CPU,
                )?;
                let r = uac(bed, plan, v);
                k.stop()?;
                r
            })(),
            _ => uac(bed, plan, v),
        };
        match result {
            Ok(r) => runs.push(r),
            Err(e) => {
                sip_dispatch_testbed::cancel::check()?;
                eprintln!("sd-bench: e2e {}: {}", v.label, brief(&e));
                failed.push(format!("{}: {}", v.label, brief(&e)));
            }
        }
    }
    for s in servers {
        let _ = s.stop();
    }
    Ok(E2eResults {
        rate: plan.call_rate,
        calls: plan.call_rate * plan.call_seconds,
        runs,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_times_from_the_message_log() {
        let log = "d\t01:33:32.478398\t100.000000\tS\t1-x\tCSeq:1 INVITE\tINVITE sip:s@h SIP/2.0\n\
                   d\tt\t100.000500\tR\t1-x\tCSeq:1 INVITE\tSIP/2.0 180 Ringing\n\
                   d\tt\t100.001250\tR\t1-x\tCSeq:1 INVITE\tSIP/2.0 200 OK\n\
                   d\tt\t100.002000\tR\t1-x\tCSeq:2 BYE\tSIP/2.0 200 OK\n\
                   d\tt\t101.000000\tS\t2-x\tCSeq:1 INVITE\tINVITE sip:s@h SIP/2.0\n\
                   d\tt\t102.000000\tS\t3-x\tCSeq:1 INVITE\tINVITE sip:s@h SIP/2.0\n\
                   d\tt\t102.002000\tR\t3-x\tCSeq:1 INVITE\tSIP/2.0 200 OK\n\
                   d\tt\t102.003000\tR\t3-x\tCSeq:1 INVITE\tSIP/2.0 180 Ringing\n";
        let t = response_times(log);
        assert_eq!(t.times.len(), 2);
        assert!((t.times[0] - 1.25).abs() < 1e-6, "{t:?}");
        assert!((t.times[1] - 2.0).abs() < 1e-6, "{t:?}");
        assert_eq!(t.reordered, 1);
    }

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }
}
