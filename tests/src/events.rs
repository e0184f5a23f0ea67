//! The daemon's log (stderr) read as events, as the lines arrive.
//!
//! `sip-dispatch run` logs with env_logger (`[2026-11-22T01:05:38Z INFO ] message`, the
//! bracket may also name the module); the messages the tests observe begin like this,
//! with `key=value` fields:
//!
//! - `backend 198.18.0.21:5060 state=down reason=...` / `state=up reason=...`: a health
//!   state change;
//! - `table 198.18.0.100:5060 generation=N priority=P backends=ADDR/W,ADDR/W` (or
//!   `priority=none backends=`): a new slot table was swapped in;
//! - `dns NAME records=N backends=M ttl=Ss`: a successful resolution;
//! - `dns NAME failed: ...`: the first failure of a failure episode.
//!
//! Each event carries the time the harness read its line (monotonic, and wall-clock to
//! compare with SIPp's message logs), so the tests measure reaction times from it instead
//! of sleeping.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Result, bail};

use crate::process::{LineLog, Wait};

/// A new slot table of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEvent {
    pub vip: SocketAddr,
    pub generation: u64,
    /// `None` for `priority=none` (no healthy backend: the table is empty).
    pub priority: Option<u32>,
    /// The backends that own slots, with their weights, as logged.
    pub backends: Vec<(SocketAddr, u32)>,
}

impl TableEvent {
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self.backends.iter().map(|b| b.0).collect();
        v.sort();
        v
    }

    pub fn weight_of(&self, addr: SocketAddr) -> Option<u32> {
        self.backends.iter().find(|b| b.0 == addr).map(|b| b.1)
    }
}

/// One recognised log message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Backend {
        address: SocketAddr,
        up: bool,
        reason: String,
    },
    Table(TableEvent),
    Dns {
        name: String,
        records: u32,
        backends: u32,
        ttl: Duration,
    },
    DnsFailed {
        name: String,
        error: String,
    },
}

/// The message of an env_logger line: what follows the `[...]` prefix.
pub fn message(line: &str) -> &str {
    if line.starts_with('[')
        && let Some(end) = line.find("] ")
    {
        return line[end + 2..].trim_start();
    }
    line
}

/// The value of `key=` among whitespace-separated fields.
fn field<'a>(fields: &[&'a str], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
}

/// `198.18.0.21:5060/60` or `[2001:db8::21]:5060/60`; a load factor below 100 %
/// follows the weight (`/60@50%`).
fn weighted_backend(s: &str) -> Option<(SocketAddr, u32)> {
    let (addr, weight) = s.rsplit_once('/')?;
    let weight = weight.split_once('@').map_or(weight, |(w, _)| w);
    Some((addr.parse().ok()?, weight.parse().ok()?))
}

/// Parses one stderr line of the daemon; `None` for lines that are not one of the events.
pub fn parse(line: &str) -> Option<Event> {
    let msg = message(line);
    let fields: Vec<&str> = msg.split_whitespace().collect();
    match *fields.first()? {
        "backend" => {
            let address = fields.get(1)?.parse().ok()?;
            let up = match field(&fields, "state")? {
                "up" => true,
                "down" => false,
                _ => return None,
            };
            let reason = msg
                .split_once(" reason=")
                .map_or("", |(_, r)| r.trim_matches('"'))
                .to_owned();
            Some(Event::Backend {
                address,
                up,
                reason,
            })
        }
        "table" => {
            let vip = fields.get(1)?.parse().ok()?;
            let generation = field(&fields, "generation")?.parse().ok()?;
            let priority = match field(&fields, "priority")? {
                "none" => None,
                p => Some(p.parse().ok()?),
            };
            let list = field(&fields, "backends")?;
            let backends = if list.is_empty() {
                Vec::new()
            } else {
                list.split(',')
                    .map(weighted_backend)
                    .collect::<Option<Vec<_>>>()?
            };
            Some(Event::Table(TableEvent {
                vip,
                generation,
                priority,
                backends,
            }))
        }
        "dns" => {
            let name = *fields.get(1)?;
            if fields.get(2) == Some(&"failed:") {
                let error = msg.split_once(" failed:").map_or("", |(_, e)| e.trim());
                return Some(Event::DnsFailed {
                    name: name.to_owned(),
                    error: error.to_owned(),
                });
            }
            let ttl = field(&fields, "ttl")?;
            let ttl = ttl.strip_suffix('s').unwrap_or(ttl).parse().ok()?;
            Some(Event::Dns {
                name: name.to_owned(),
                records: field(&fields, "records")?.parse().ok()?,
                backends: field(&fields, "backends")?.parse().ok()?,
                ttl: Duration::from_secs(ttl),
            })
        }
        _ => None,
    }
}

/// An instant, on both clocks: monotonic for durations, wall-clock to compare with the
/// timestamps of SIPp's message logs.
#[derive(Debug, Clone, Copy)]
pub struct Moment {
    pub at: Instant,
    pub wall: SystemTime,
}

impl Moment {
    pub fn now() -> Self {
        Moment {
            at: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn epoch(&self) -> f64 {
        epoch_secs(self.wall)
    }

    /// Seconds from this moment to `later` (negative if `later` is earlier).
    pub fn secs_to(&self, later: Instant) -> f64 {
        if later >= self.at {
            (later - self.at).as_secs_f64()
        } else {
            -(self.at - later).as_secs_f64()
        }
    }
}

/// An event and when its line was read.
#[derive(Debug, Clone)]
pub struct Timed<T> {
    /// Index of the line in the log (a cursor: waits from `index + 1` see later lines).
    pub index: usize,
    pub at: Instant,
    pub wall: SystemTime,
    pub event: T,
}

impl<T> Timed<T> {
    /// Seconds since the Unix epoch of the wall-clock stamp.
    pub fn epoch(&self) -> f64 {
        epoch_secs(self.wall)
    }

    /// The line after this one (where a following wait starts).
    pub fn next(&self) -> usize {
        self.index + 1
    }

    pub fn moment(&self) -> Moment {
        Moment {
            at: self.at,
            wall: self.wall,
        }
    }
}

/// Seconds since the Unix epoch (SIPp's message logs use the same clock).
pub fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A daemon's stderr, as events.
#[derive(Debug, Clone)]
pub struct DaemonLog {
    lines: LineLog,
    path: PathBuf,
}

impl DaemonLog {
    pub fn new(lines: LineLog, path: &Path) -> Self {
        DaemonLog {
            lines,
            path: path.to_owned(),
        }
    }

    /// The current end of the log: a wait from here sees only lines still to come.
    pub fn cursor(&self) -> usize {
        self.lines.len()
    }

    /// Every recognised event so far.
    pub fn events(&self) -> Vec<Timed<Event>> {
        self.lines
            .lines()
            .into_iter()
            .enumerate()
            .filter_map(|(index, l)| {
                parse(&l.text).map(|event| Timed {
                    index,
                    at: l.at,
                    wall: l.wall,
                    event,
                })
            })
            .collect()
    }

    /// Every table event so far.
    pub fn tables(&self) -> Vec<Timed<TableEvent>> {
        self.events()
            .into_iter()
            .filter_map(|t| match t.event {
                Event::Table(table) => Some(Timed {
                    index: t.index,
                    at: t.at,
                    wall: t.wall,
                    event: table,
                }),
                _ => None,
            })
            .collect()
    }

    /// The messages (without the log prefix) of the lines that contain every one of
    /// `needles`, for lines that are no events (e.g. the DNS warnings).
    pub fn messages_with(&self, needles: &[&str]) -> Vec<String> {
        self.lines
            .lines()
            .iter()
            .map(|l| message(&l.text).to_owned())
            .filter(|m| needles.iter().all(|n| m.contains(n)))
            .collect()
    }

    /// Waits for a line at `from` or later containing every one of `needles`.
    pub fn wait_message(
        &self,
        from: usize,
        timeout: Duration,
        needles: &[&str],
    ) -> Result<Timed<String>> {
        match self.lines.wait_for(from, timeout, |text| {
            let m = message(text);
            needles.iter().all(|n| m.contains(n)).then(|| m.to_owned())
        })? {
            Wait::Found(index, line, text) => Ok(Timed {
                index,
                at: line.at,
                wall: line.wall,
                event: text,
            }),
            Wait::Eof => bail!(
                "the daemon exited before logging {needles:?}; its log ({}) ends:\n{}",
                self.path.display(),
                self.tail(40)
            ),
            Wait::TimedOut => bail!(
                "the daemon did not log {needles:?} within {timeout:?}; its log ({}) ends:\n{}",
                self.path.display(),
                self.tail(40)
            ),
        }
    }

    /// The last `n` lines (for error messages).
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.lines();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for the first event at line `from` or later that `pick` accepts. Fails on
    /// timeout or when the daemon exits first, quoting `what` and the end of its log.
    pub fn wait<T>(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> Result<Timed<T>> {
        match self
            .lines
            .wait_for(from, timeout, |text| parse(text).and_then(|e| pick(&e)))?
        {
            Wait::Found(index, line, event) => Ok(Timed {
                index,
                at: line.at,
                wall: line.wall,
                event,
            }),
            Wait::Eof => bail!(
                "the daemon exited before logging {what}; its log ({}) ends:\n{}",
                self.path.display(),
                self.tail(40)
            ),
            Wait::TimedOut => bail!(
                "the daemon did not log {what} within {timeout:?}; its log ({}) ends:\n{}",
                self.path.display(),
                self.tail(40)
            ),
        }
    }

    /// Waits for a table of `vip` that `accept` likes.
    pub fn wait_table(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        mut accept: impl FnMut(&TableEvent) -> bool,
    ) -> Result<Timed<TableEvent>> {
        self.wait(from, timeout, what, |e| match e {
            Event::Table(t) if accept(t) => Some(t.clone()),
            _ => None,
        })
    }

    /// Waits for a health state change of `address` to `up`.
    pub fn wait_backend_state(
        &self,
        from: usize,
        timeout: Duration,
        address: SocketAddr,
        up: bool,
    ) -> Result<Timed<String>> {
        let state = if up { "up" } else { "down" };
        self.wait(
            from,
            timeout,
            &format!("`backend {address} state={state}`"),
            |e| match e {
                Event::Backend {
                    address: a,
                    up: u,
                    reason,
                } if *a == address && *u == up => Some(reason.clone()),
                _ => None,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_lines() {
        assert_eq!(
            parse(
                "[2026-11-22T01:05:38Z INFO ] backend 198.18.0.21:5060 state=down reason=3 consecutive failures (timeout)"
            ),
            Some(Event::Backend {
                address: "198.18.0.21:5060".parse().unwrap(),
                up: false,
                reason: "3 consecutive failures (timeout)".into()
            })
        );
        assert_eq!(
            parse(
                "[2026-11-22T01:05:38.123Z INFO  sip_dispatch::health] backend [2001:db8::21]:5060 state=up reason=\"ok\""
            ),
            Some(Event::Backend {
                address: "[2001:db8::21]:5060".parse().unwrap(),
                up: true,
                reason: "ok".into()
            })
        );
        assert_eq!(
            parse("[2026-11-22T01:05:38Z WARN ] backend 198.18.0.21:5060 did not answer OPTIONS"),
            None
        );
    }

    #[test]
    fn table_lines() {
        let Some(Event::Table(t)) = parse(
            "[2026-11-22T01:05:38Z INFO ] table 198.18.0.100:5060 generation=3 priority=10 \
             backends=198.18.0.21:5060/60,198.18.0.22:5060/20",
        ) else {
            panic!("not a table")
        };
        assert_eq!(t.generation, 3);
        assert_eq!(t.priority, Some(10));
        assert_eq!(t.weight_of("198.18.0.22:5060".parse().unwrap()), Some(20));
        assert_eq!(t.backends.len(), 2);
        let Some(Event::Table(t)) =
            parse("[x INFO ] table [2001:db8::100]:5060 generation=9 priority=none backends=")
        else {
            panic!("not a table")
        };
        assert_eq!(t.priority, None);
        assert!(t.backends.is_empty());
        assert_eq!(
            parse("[x INFO ] table 198.18.0.100:5060 generation=1 priority=10 backends=[2001:db8::21]:5060/1")
                .map(|e| matches!(e, Event::Table(t) if t.backends[0].1 == 1)),
            Some(true)
        );
    }

    #[test]
    fn dns_lines() {
        assert_eq!(
            parse("[x INFO ] dns _sip._udp.example.net records=5 backends=5 ttl=2s"),
            Some(Event::Dns {
                name: "_sip._udp.example.net".into(),
                records: 5,
                backends: 5,
                ttl: Duration::from_secs(2)
            })
        );
        assert_eq!(
            parse("[x WARN ] dns _sip._udp.example.net failed: timed out (keeping 5 backends)"),
            Some(Event::DnsFailed {
                name: "_sip._udp.example.net".into(),
                error: "timed out (keeping 5 backends)".into()
            })
        );
        // Other dns lines are not events.
        assert_eq!(
            parse(
                "[x WARN ] dns _sip._udp.example.net: target b9.example.net. has no address: failed: x"
            ),
            None
        );
        assert_eq!(message("no prefix"), "no prefix");
        assert_eq!(parse("[x INFO ] dispatching 198.18.0.100:5060"), None);
    }
}
