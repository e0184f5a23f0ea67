//! The CLI commands that talk to a running daemon over its control socket, and how they
//! print: a table for people, `--json` for scripts.
use std::{collections::HashMap, io::Write as _, time::Duration};

use anyhow::bail;
use serde_json::Value;

use crate::{
    cli::{BackendsCommand, ClientArgs, Command},
    control::{Request, call, resolve_socket},
};

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Backends { command, client } => backends(command, &client),
        Command::Stats { watch, client } => stats(watch, &client),
        Command::Which {
            call_id,
            service,
            client,
        } => {
            let v = request(&client, &Request::Which { call_id, service })?;
            print(&client, &v, |v| {
                format!(
                    "{} -> {} (slot {})",
                    v["call_id"],
                    text(&v["backend"]),
                    v["slot"]
                )
            })
        }
        Command::Reload { client } => {
            let v = request(&client, &Request::Reload)?;
            print(&client, &v, |v| {
                let mut lines: Vec<String> = v["changes"]
                    .as_array()
                    .map(|c| c.iter().map(text).collect())
                    .unwrap_or_default();
                if lines.is_empty() {
                    lines.push("no configuration change".into());
                }
                let names = v["reloaded"].as_array().map_or(0, Vec::len);
                lines.push(format!("resolving {names} SRV name(s) now"));
                lines.join("\n")
            })
        }
        Command::Run(_) | Command::XdpPass(_) | Command::Decap(_) | Command::Detach(_) => {
            bail!("not a client command")
        }
    }
}

fn request(client: &ClientArgs, req: &Request) -> anyhow::Result<Value> {
    let socket = resolve_socket(client.control.as_deref())?;
    call(&socket, req)
}

fn print(client: &ClientArgs, v: &Value, human: impl Fn(&Value) -> String) -> anyhow::Result<()> {
    if client.json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        println!("{}", human(v));
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn backends(command: BackendsCommand, client: &ClientArgs) -> anyhow::Result<()> {
    let admin = |address, admin: &str| Request::BackendAdmin {
        address,
        admin: admin.into(),
    };
    let req = match command {
        BackendsCommand::List => {
            let v = request(client, &Request::BackendsList)?;
            return print(client, &v, backends_table);
        }
        BackendsCommand::Add {
            address,
            weight,
            priority,
            service,
        } => Request::BackendAdd {
            address,
            weight: weight.into(),
            priority,
            service,
        },
        BackendsCommand::Remove { address } => Request::BackendRemove { address },
        BackendsCommand::Drain {
            address,
            wait: true,
            timeout,
        } => return drain_and_wait(client, address, timeout),
        BackendsCommand::Drain { address, .. } => admin(address, "drain"),
        BackendsCommand::Enable { address } => admin(address, "enable"),
        BackendsCommand::Disable { address } => admin(address, "disable"),
        BackendsCommand::SetWeight { address, weight } => Request::BackendWeight {
            address,
            weight: weight.into(),
        },
    };
    let v = request(client, &req)?;
    print(client, &v, |v| format!("ok: {v}"))
}

/// A command's end that is no error but has its own exit status (`drain --wait`):
/// `main` prints the message, if any, and exits with the code.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// The exit status of a command line clap refuses: 2, except for `backends drain ...
/// --wait`, whose 2 means a timeout: there a bad address or option is an error like any
/// other (1).
pub fn usage_error_status(args: &[String]) -> u8 {
    let has = |word: &str| args.iter().skip(1).any(|a| a == word);
    if has("backends") && has("drain") && has("--wait") {
        1
    } else {
        2
    }
}

/// How `backends drain --wait` ends; the discriminant is the exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainEnd {
    /// The backend holds no call.
    Done = 0,
    /// `--timeout` passed with calls still held.
    TimedOut = 2,
    /// The drain ended: the backend was enabled, disabled or removed.
    Ended = 3,
}

/// What one look at `backends list` showed of the draining backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Drained {
        calls: u64,
    },
    /// Listed in another state (enabled: its health state; or disabled).
    Other {
        state: String,
    },
    /// Listed by no service any more.
    Gone,
}

/// `address` in a `backends list` answer. Calls are per address, whatever the service
/// (every row of it shows the same count). An error when the daemon counts no calls.
pub fn seen_in(list: &Value, address: std::net::SocketAddr) -> anyhow::Result<Seen> {
    let rows: Vec<&Value> = list["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["backends"].as_array().into_iter().flatten())
        .filter(|b| b["address"].as_str().and_then(|a| a.parse().ok()) == Some(address))
        .collect();
    if rows.is_empty() {
        return Ok(Seen::Gone);
    }
    let Some(calls) = rows.iter().filter_map(|b| b["calls"].as_u64()).max() else {
        bail!(
            "the daemon counts no calls of {address} (with --affinity off it cannot see calls; \
             otherwise its log says why): --wait cannot wait for them"
        );
    };
    if let Some(other) = rows.iter().find(|b| b["state"] != "drained") {
        return Ok(Seen::Other {
            state: text(&other["state"]),
        });
    }
    Ok(Seen::Drained { calls })
}

/// Whether `drain --wait` ends after a poll that saw `seen`, `elapsed` after it
/// started; None: poll again.
pub fn drain_end(seen: &Seen, elapsed: Duration, timeout: Option<Duration>) -> Option<DrainEnd> {
    match seen {
        Seen::Gone | Seen::Other { .. } => Some(DrainEnd::Ended),
        Seen::Drained { calls: 0 } => Some(DrainEnd::Done),
        Seen::Drained { .. } if timeout.is_some_and(|t| elapsed >= t) => Some(DrainEnd::TimedOut),
        Seen::Drained { .. } => None,
    }
}

/// `backends drain ADDR --wait`: drains (answered once the tables are in force), then
/// prints the calls the backend holds about once a second until none are left.
fn drain_and_wait(
    client: &ClientArgs,
    address: std::net::SocketAddr,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // Refused before anything changes when the daemon cannot count calls.
    seen_in(&request(client, &Request::BackendsList)?, address)?;
    let v = request(
        client,
        &Request::BackendAdmin {
            address,
            admin: "drain".into(),
        },
    )?;
    print(client, &v, |v| format!("ok: {v}"))?;
    loop {
        let seen = seen_in(&request(client, &Request::BackendsList)?, address)?;
        match &seen {
            Seen::Drained { calls } if client.json => {
                println!(
                    "{}",
                    serde_json::json!({"address": address, "calls": calls})
                );
            }
            Seen::Drained { calls } => println!("{address}: {calls} calls held"),
            _ => {}
        }
        std::io::stdout().flush()?;
        let elapsed = started.elapsed();
        let Some(end) = drain_end(&seen, elapsed, timeout) else {
            let pause = timeout.map_or(Duration::from_secs(1), |t| {
                t.saturating_sub(elapsed).min(Duration::from_secs(1))
            });
            std::thread::sleep(pause);
            continue;
        };
        let message = match (&seen, end) {
            (_, DrainEnd::Done) => return Ok(()),
            (Seen::Drained { calls }, DrainEnd::TimedOut) => format!(
                "{address}: still {calls} calls held after {}",
                crate::cli::show_duration(timeout.unwrap_or_default())
            ),
            (Seen::Other { state }, _) => {
                format!("{address} is no longer drained (now {state}): stopped waiting")
            }
            _ => format!("{address} is no longer listed: stopped waiting"),
        };
        return Err(Exit {
            code: end as u8,
            message,
        }
        .into());
    }
}

/// A value with where it came from, e.g. `3(cli)`, unless that is `usual` (or unknown,
/// from an older daemon).
fn with_origin(value: &Value, origin: &Value, usual: &str) -> String {
    match origin.as_str() {
        Some(o) if !o.is_empty() && o != usual => format!("{}({o})", text(value)),
        _ => text(value),
    }
}

fn backends_table(v: &Value) -> String {
    let mut out = String::new();
    for s in v["services"].as_array().into_iter().flatten() {
        out += &format!(
            "service {}  forwarding {}  table generation {}  priority in use {}\n",
            text(&s["vip"]),
            text(&s["forwarding"]),
            text(&s["generation"]),
            text(&s["priority"])
        );
        out += &format!(
            "{:<26} {:<24} {:>4} {:>11} {:<14} {:>8} {:>4} {:>8} {:>7} {:>10} {:>6}  {}\n",
            "backend",
            "source",
            "prio",
            "weight",
            "state",
            "rtt ms",
            "last",
            "last ms",
            "share",
            "packets",
            "calls",
            "reason"
        );
        for b in s["backends"].as_array().into_iter().flatten() {
            out += &format!(
                "{:<26} {:<24} {:>4} {:>11} {:<14} {:>8} {:>4} {:>8} {:>6.1}% {:>10} {:>6}  {}\n",
                text(&b["address"]),
                with_origin(&b["source"], &b["added_by"], "config"),
                text(&b["priority"]),
                with_origin(&b["weight"], &b["weight_from"], "config"),
                with_origin(&b["state"], &b["state_from"], "health"),
                b["rtt_ms"]
                    .as_f64()
                    .map_or("-".into(), |r| format!("{r:.2}")),
                text(&b["last_code"]),
                b["last_rtt_ms"]
                    .as_f64()
                    .map_or("-".into(), |r| format!("{r:.2}")),
                b["share"].as_f64().unwrap_or(0.0) * 100.0,
                text(&b["packets"]),
                text(&b["calls"]),
                text(&b["reason"]),
            );
        }
    }
    out.trim_end().to_string()
}

fn stats(watch: bool, client: &ClientArgs) -> anyhow::Result<()> {
    if !watch {
        let v = request(client, &Request::Stats)?;
        return print(client, &v, |v| stats_table(v, None, Duration::ZERO));
    }
    let mut previous: Option<Value> = None;
    let mut last = std::time::Instant::now();
    loop {
        let v = request(client, &Request::Stats)?;
        let elapsed = last.elapsed();
        last = std::time::Instant::now();
        if client.json {
            println!("{}", serde_json::to_string(&v)?);
        } else {
            // Clear the screen and go home, like top.
            println!(
                "\x1b[2J\x1b[H{}",
                stats_table(&v, previous.as_ref(), elapsed)
            );
            std::io::stdout().flush()?;
        }
        previous = Some(v);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Counters as a table; with a previous sample, rates per second too.
fn stats_table(v: &Value, previous: Option<&Value>, elapsed: Duration) -> String {
    let rate = |now: u64, before: Option<u64>| match before {
        Some(b) if !elapsed.is_zero() => format!(
            "{:.0}/s",
            now.saturating_sub(b) as f64 / elapsed.as_secs_f64()
        ),
        _ => String::new(),
    };
    let mut out = String::from("fast path\n");
    let before: HashMap<String, u64> = previous
        .and_then(|p| p["counters"].as_object())
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    for (name, value) in v["counters"].as_object().into_iter().flatten() {
        let n = value.as_u64().unwrap_or(0);
        out += &format!(
            "  {name:<28} {n:>14} {:>12}\n",
            rate(n, before.get(name).copied())
        );
    }
    let total: u64 = v["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| b["packets"].as_u64().unwrap_or(0))
        .fold(0, u64::saturating_add);
    out += "backends\n";
    for (i, b) in v["backends"].as_array().into_iter().flatten().enumerate() {
        let packets = b["packets"].as_u64().unwrap_or(0);
        let before = previous.and_then(|p| p["backends"][i]["packets"].as_u64());
        out += &format!(
            "  {:<26} {:<9} {:>12} pkts {:>14} bytes {:>6.1}% {:>10}\n",
            text(&b["address"]),
            text(&b["state"]),
            packets,
            text(&b["bytes"]),
            if total > 0 {
                packets as f64 * 100.0 / total as f64
            } else {
                0.0
            },
            rate(packets, before),
        );
    }
    out += "slow path\n";
    for (name, value) in v["slow_path"].as_object().into_iter().flatten() {
        out += &format!("  {name:<28} {:>14}\n", value.as_u64().unwrap_or(0));
    }
    if let (Some(n), Some(cap)) = (
        v["affinity_entries"].as_u64(),
        v["affinity_capacity"].as_u64().filter(|c| *c > 0),
    ) {
        out += &format!("affinity map {n} of {cap} entries\n");
    }
    out += &format!("dns failures {}\n", v["dns_failures"]);
    let r = &v["reloads"];
    out += &format!(
        "reloads ok {} failed {}{}",
        r["ok"],
        r["failed"],
        if r["last_failed"] == true {
            " (the last one failed)"
        } else {
            ""
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "198.18.0.22:5060";

    fn list(rows: &[serde_json::Value]) -> Value {
        serde_json::json!({"services": [
            {"vip": "198.18.0.100:5060", "backends": [{"address": "198.18.0.21:5060", "state": "up", "calls": 9}]},
            {"vip": "198.18.0.101:5060", "backends": rows},
        ]})
    }

    #[test]
    fn what_a_poll_sees_of_the_draining_backend() {
        let b = B.parse().unwrap();
        let row = |state: &str, calls: Option<u64>| match calls {
            Some(c) => serde_json::json!({"address": B, "state": state, "calls": c}),
            None => serde_json::json!({"address": B, "state": state}),
        };
        assert_eq!(
            seen_in(&list(&[row("drained", Some(12))]), b).unwrap(),
            Seen::Drained { calls: 12 }
        );
        assert_eq!(
            seen_in(&list(&[row("up", Some(3))]), b).unwrap(),
            Seen::Other { state: "up".into() }
        );
        assert_eq!(seen_in(&list(&[]), b).unwrap(), Seen::Gone);
        let e = seen_in(&list(&[row("drained", None)]), b).unwrap_err();
        assert!(format!("{e}").contains("--affinity off"), "{e}");
        // IPv6 addresses compare as addresses, not as text.
        let v6: std::net::SocketAddr = "[2001:db8::22]:5060".parse().unwrap();
        let l = list(&[
            serde_json::json!({"address": "[2001:db8:0::22]:5060", "state": "drained", "calls": 0}),
        ]);
        assert_eq!(seen_in(&l, v6).unwrap(), Seen::Drained { calls: 0 });
    }

    #[test]
    fn a_refused_drain_wait_command_line_exits_1_not_2() {
        let status = |line: &str| {
            let args: Vec<String> = line.split(' ').map(String::from).collect();
            usage_error_status(&args)
        };
        assert_eq!(status("sip-dispatch backends drain nope --wait"), 1);
        assert_eq!(
            status("sip-dispatch backends --control=/x drain 198.18.0.22:5060 --wait --timeout 0s"),
            1
        );
        assert_eq!(
            status("sip-dispatch backends drain 198.18.0.22:5060 --wait --timeout 0s"),
            1
        );
        assert_eq!(status("sip-dispatch backends drain nope"), 2);
        assert_eq!(status("sip-dispatch run --iface x --wait"), 2);
    }

    #[test]
    fn drain_wait_exit_statuses() {
        let s = Duration::from_secs;
        let held = |calls| Seen::Drained { calls };
        let cases = [
            (held(0), s(0), None, Some(DrainEnd::Done)),
            (held(0), s(99), Some(s(1)), Some(DrainEnd::Done)),
            (held(5), s(0), None, None),
            (held(5), s(3600), None, None),
            (held(5), s(0), Some(s(1)), None),
            (held(5), s(1), Some(s(1)), Some(DrainEnd::TimedOut)),
            (
                Seen::Other { state: "up".into() },
                s(0),
                None,
                Some(DrainEnd::Ended),
            ),
            (
                Seen::Other {
                    state: "disabled".into(),
                },
                s(0),
                Some(s(9)),
                Some(DrainEnd::Ended),
            ),
            (Seen::Gone, s(0), None, Some(DrainEnd::Ended)),
        ];
        for (seen, elapsed, timeout, want) in cases {
            assert_eq!(
                drain_end(&seen, elapsed, timeout),
                want,
                "{seen:?} {elapsed:?} {timeout:?}"
            );
        }
        assert_eq!(
            [DrainEnd::Done, DrainEnd::TimedOut, DrainEnd::Ended].map(|e| e as u8),
            [0, 2, 3]
        );
    }

    #[test]
    fn stats_of_backends_at_the_top_of_the_counter_range_do_not_overflow() {
        let backend = |a: &str| {
            serde_json::json!({
                "address": a, "state": "up", "packets": u64::MAX, "bytes": u64::MAX,
            })
        };
        let v = serde_json::json!({
            "counters": {"rx": u64::MAX},
            "backends": [backend("198.18.0.21:5060"), backend("198.18.0.22:5060")],
        });
        let out = stats_table(&v, Some(&v), Duration::from_secs(1));
        assert!(out.contains("198.18.0.22:5060"), "{out}");
        // The total saturates: each shows 100% rather than the CLI panicking.
        assert!(out.contains("100.0%"), "{out}");
    }
}
