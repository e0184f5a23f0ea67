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
        Command::Run(_) | Command::XdpPass(_) | Command::Detach(_) => bail!("not a client command"),
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
        BackendsCommand::Drain { address } => admin(address, "drain"),
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
            "service {}  table generation {}  priority in use {}\n",
            text(&s["vip"]),
            text(&s["generation"]),
            text(&s["priority"])
        );
        out += &format!(
            "{:<26} {:<24} {:>4} {:>11} {:<14} {:>8} {:>4} {:>8} {:>7} {:>10}  {}\n",
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
            "reason"
        );
        for b in s["backends"].as_array().into_iter().flatten() {
            out += &format!(
                "{:<26} {:<24} {:>4} {:>11} {:<14} {:>8} {:>4} {:>8} {:>6.1}% {:>10}  {}\n",
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
