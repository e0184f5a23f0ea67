//! The CLI commands that talk to a running daemon over its control socket, and how they
//! print: a table for people, `--json` for scripts.
use std::{collections::HashMap, fmt::Display, io::Write as _, net::SocketAddr, time::Duration};

use anyhow::bail;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    cli::{BackendsCommand, ClientArgs, Command},
    control::{call, resolve_socket},
    protocol::{
        Added, AdminAction, AdminChanged, BackendState, BackendsList, ReloadReply, Removed,
        Request, Snapshot, WeightSet, WhichReply, slow_path_counters,
    },
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
            let reply: WhichReply = request(&client, &Request::Which { call_id, service })?;
            print(&client, &reply, which_line)
        }
        Command::Reload { client } => {
            let reply: ReloadReply = request(&client, &Request::Reload)?;
            print(&client, &reply, reload_lines)
        }
        Command::Run(_)
        | Command::XdpPass(_)
        | Command::Decap(_)
        | Command::Detach(_)
        | Command::GenerateDocs { .. } => {
            bail!("not a client command")
        }
    }
}

/// Sends `req` to the daemon `client` names; `R` is the reply type of the request.
fn request<R: DeserializeOwned>(client: &ClientArgs, req: &Request) -> anyhow::Result<R> {
    let socket = resolve_socket(client.control.as_deref())?;
    call(&socket, req)
}

/// A reply as `--json` asks (pretty JSON), else as `human` puts it.
fn print<R: Serialize>(
    client: &ClientArgs,
    reply: &R,
    human: impl Fn(&R) -> String,
) -> anyhow::Result<()> {
    if client.json {
        println!("{}", serde_json::to_string_pretty(reply)?);
    } else {
        println!("{}", human(reply));
    }
    Ok(())
}

/// A reply on one line of JSON.
fn compact<R: Serialize>(reply: &R) -> String {
    serde_json::to_string(reply).unwrap_or_default()
}

/// A value, or `-` when there is none.
fn or_dash<T: Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// `which` for people: the Call-ID quoted as in JSON, its backend, its slot.
fn which_line(w: &WhichReply) -> String {
    format!(
        "{} -> {} (slot {})",
        compact(&w.call_id),
        or_dash(w.backend),
        w.slot
    )
}

/// `reload` for people: what changed, and how many SRV names are resolved again.
fn reload_lines(r: &ReloadReply) -> String {
    let mut lines = r.changes.clone();
    if lines.is_empty() {
        lines.push("no configuration change".into());
    }
    lines.push(format!("resolving {} SRV name(s) now", r.reloaded.len()));
    lines.join("\n")
}

/// Sends a change and prints its reply (`ok: JSON` for people).
fn change<R: Serialize + DeserializeOwned>(
    client: &ClientArgs,
    req: &Request,
) -> anyhow::Result<()> {
    let reply: R = request(client, req)?;
    print(client, &reply, |r| format!("ok: {}", compact(r)))
}

fn backends(command: BackendsCommand, client: &ClientArgs) -> anyhow::Result<()> {
    let admin = |address, admin| Request::BackendAdmin { address, admin };
    match command {
        BackendsCommand::List => {
            let list: BackendsList = request(client, &Request::BackendsList)?;
            print(client, &list, backends_table)
        }
        BackendsCommand::Add {
            address,
            weight,
            priority,
            service,
        } => change::<Added>(
            client,
            &Request::BackendAdd {
                address,
                weight: weight.into(),
                priority,
                service,
            },
        ),
        BackendsCommand::Remove { address } => {
            change::<Removed>(client, &Request::BackendRemove { address })
        }
        BackendsCommand::Drain {
            address,
            wait: true,
            timeout,
        } => drain_and_wait(client, address, timeout),
        BackendsCommand::Drain { address, .. } => {
            change::<AdminChanged>(client, &admin(address, AdminAction::Drain))
        }
        BackendsCommand::Enable { address } => {
            change::<AdminChanged>(client, &admin(address, AdminAction::Enable))
        }
        BackendsCommand::Disable { address } => {
            change::<AdminChanged>(client, &admin(address, AdminAction::Disable))
        }
        BackendsCommand::SetWeight { address, weight } => change::<WeightSet>(
            client,
            &Request::BackendWeight {
                address,
                weight: weight.into(),
            },
        ),
    }
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
        state: BackendState,
    },
    /// Listed by no service any more.
    Gone,
}

/// `address` in a `backends list` answer. Calls are per address, whatever the service
/// (every row of it shows the same count). An error when the daemon counts no calls.
pub fn seen_in(list: &BackendsList, address: SocketAddr) -> anyhow::Result<Seen> {
    let rows: Vec<_> = list
        .services
        .iter()
        .flat_map(|s| &s.backends)
        .map(|b| &b.backend)
        .filter(|b| b.address == address)
        .collect();
    if rows.is_empty() {
        return Ok(Seen::Gone);
    }
    let Some(calls) = rows.iter().filter_map(|b| b.calls).max() else {
        bail!(
            "the daemon counts no calls of {address} (with --affinity off it cannot see calls; \
             otherwise its log says why): --wait cannot wait for them"
        );
    };
    if let Some(other) = rows.iter().find(|b| b.state != BackendState::Drained) {
        return Ok(Seen::Other { state: other.state });
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
    address: SocketAddr,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // Refused before anything changes when the daemon cannot count calls.
    seen_in(&request(client, &Request::BackendsList)?, address)?;
    change::<AdminChanged>(
        client,
        &Request::BackendAdmin {
            address,
            admin: AdminAction::Drain,
        },
    )?;
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
fn with_origin(value: impl Display, origin: &str, usual: &str) -> String {
    if !origin.is_empty() && origin != usual {
        format!("{value}({origin})")
    } else {
        value.to_string()
    }
}

/// Milliseconds with two decimals, or `-`.
fn millis(ms: Option<f64>) -> String {
    ms.map_or("-".into(), |r| format!("{r:.2}"))
}

fn backends_table(list: &BackendsList) -> String {
    let mut out = String::new();
    for s in &list.services {
        out += &format!(
            "service {}  forwarding {}  table generation {}  priority in use {}\n",
            s.vip,
            s.forwarding,
            s.generation,
            or_dash(s.priority)
        );
        out += &format!(
            "{:<26} {:<24} {:>4} {:>11} {:>9} {:<14} {:>8} {:>4} {:>8} {:>7} {:>10} {:>6}  {}\n",
            "backend",
            "source",
            "prio",
            "weight",
            "effective",
            "state",
            "rtt ms",
            "last",
            "last ms",
            "share",
            "packets",
            "calls",
            "reason"
        );
        for row in &s.backends {
            let b = &row.backend;
            out += &format!(
                "{:<26} {:<24} {:>4} {:>11} {:>9.1} {:<14} {:>8} {:>4} {:>8} {:>6.1}% {:>10} {:>6}  {}\n",
                b.address.to_string(),
                with_origin(&b.source, &b.added_by, "config"),
                b.priority.to_string(),
                with_origin(b.weight, &b.weight_from, "config"),
                b.load.effective_weight,
                with_origin(b.state, &b.state_from, "health"),
                millis(b.rtt_ms),
                or_dash(b.last_code),
                millis(b.last_rtt_ms),
                row.share * 100.0,
                b.packets.to_string(),
                or_dash(b.calls),
                if b.load.load_reason.is_empty() {
                    b.reason.clone()
                } else {
                    format!("{}; load: {}", b.reason, b.load.load_reason)
                },
            );
        }
    }
    out.trim_end().to_string()
}

fn stats(watch: bool, client: &ClientArgs) -> anyhow::Result<()> {
    if !watch {
        let snapshot: Snapshot = request(client, &Request::Stats)?;
        return print(client, &snapshot, |s| stats_table(s, None, Duration::ZERO));
    }
    let mut previous: Option<Snapshot> = None;
    let mut last = std::time::Instant::now();
    loop {
        let snapshot: Snapshot = request(client, &Request::Stats)?;
        let elapsed = last.elapsed();
        last = std::time::Instant::now();
        if client.json {
            println!("{}", serde_json::to_string(&snapshot)?);
        } else {
            // Clear the screen and go home, like top.
            println!(
                "\x1b[2J\x1b[H{}",
                stats_table(&snapshot, previous.as_ref(), elapsed)
            );
            std::io::stdout().flush()?;
        }
        previous = Some(snapshot);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Counters as a table; with a previous sample, rates per second too.
fn stats_table(s: &Snapshot, previous: Option<&Snapshot>, elapsed: Duration) -> String {
    let rate = |now: u64, before: Option<u64>| match before {
        Some(b) if !elapsed.is_zero() => format!(
            "{:.0}/s",
            now.saturating_sub(b) as f64 / elapsed.as_secs_f64()
        ),
        _ => String::new(),
    };
    let mut out = String::from("fast path\n");
    let before: HashMap<&str, u64> = previous
        .map(|p| p.counters.iter().collect())
        .unwrap_or_default();
    for (name, n) in s.counters.iter() {
        out += &format!(
            "  {name:<28} {n:>14} {:>12}\n",
            rate(n, before.get(name).copied())
        );
    }
    let total: u64 = s
        .backends
        .iter()
        .map(|b| b.packets)
        .fold(0, u64::saturating_add);
    out += "backends\n";
    for (i, b) in s.backends.iter().enumerate() {
        let packets = b.packets;
        let before = previous.and_then(|p| p.backends.get(i)).map(|b| b.packets);
        out += &format!(
            "  {:<26} {:<9} {:>12} pkts {:>14} bytes {:>6.1}% {:>10}\n",
            b.address.to_string(),
            b.state.name(),
            packets,
            b.bytes,
            if total > 0 {
                packets as f64 * 100.0 / total as f64
            } else {
                0.0
            },
            rate(packets, before),
        );
    }
    out += "slow path\n";
    for (name, value) in slow_path_counters(&s.slow_path) {
        out += &format!("  {name:<28} {value:>14}\n");
    }
    if s.affinity_capacity > 0 {
        out += &format!(
            "affinity map {} of {} entries\n",
            s.affinity_entries, s.affinity_capacity
        );
    }
    out += &format!("dns failures {}\n", s.dns_failures);
    let r = &s.reloads;
    out += &format!(
        "reloads ok {} failed {}{}",
        r.ok,
        r.failed,
        if r.last_failed {
            " (the last one failed)"
        } else {
            ""
        }
    );
    out
}

#[cfg(test)]
mod tests;
