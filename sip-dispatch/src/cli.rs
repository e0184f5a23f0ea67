//! Command line: subcommands, flags and the address formats operators' scripts use.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use sip_dispatch_common::HashKey;

use crate::health::{AliveCodes, HealthUri};

#[derive(Parser, Debug)]
#[command(
    name = "sip-dispatch",
    version,
    about = "Kernel-accelerated stateless SIP dispatcher"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach the XDP dispatcher to an interface and keep its tables filled.
    Run(Box<RunArgs>),
    /// Attach an XDP program that passes everything (for the peer of a veth that runs the
    /// dispatcher in native mode) and hold it until SIGINT/SIGTERM.
    XdpPass(XdpPassArgs),
    /// On a backend of an `ipip` service whose kernel has no ipip/ip6tnl tunnel device:
    /// attach an XDP program that strips the outer header of IPv4-in-IPv4 and
    /// IPv6-in-IPv6 packets from the `--from` sources, and hold it until SIGINT/SIGTERM.
    Decap(DecapArgs),
    /// Detach what a daemon left attached (--keep-attached, or a crash) and remove its
    /// pins.
    Detach(DetachArgs),
    /// Show or change the backends of a running daemon.
    Backends {
        #[command(subcommand)]
        command: BackendsCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Fast-path, per-backend and slow-path counters of a running daemon.
    Stats {
        /// Refresh once a second, with rates, like top.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Which backend a Call-ID goes to now.
    Which {
        /// The Call-ID value.
        call_id: String,
        /// The service (VIP:PORT), if the daemon serves several.
        #[arg(long, value_parser = parse_socket_addr)]
        service: Option<SocketAddr>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Read the flags and the config file again and resolve the SRV names now (SIGHUP
    /// to the daemon does the same).
    Reload {
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// How CLI commands reach the daemon.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The daemon's control socket. Default: the only one in /run/sip-dispatch.
    #[arg(long, global = true)]
    pub control: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum BackendsCommand {
    /// Every backend: address, source, priority, weight, state, reason, RTT, share, packets,
    /// and the calls it holds (none shown when the daemon runs with --affinity off).
    List,
    /// Add a static backend.
    Add {
        #[arg(value_parser = parse_socket_addr)]
        address: SocketAddr,
        #[arg(long, default_value_t = 1)]
        weight: u16,
        #[arg(long, default_value_t = 0)]
        priority: u16,
        #[arg(long, value_parser = parse_socket_addr)]
        service: Option<SocketAddr>,
    },
    /// Remove a static backend.
    Remove {
        #[arg(value_parser = parse_socket_addr)]
        address: SocketAddr,
    },
    /// No new calls (weight 0); calls in progress continue; health checks go on.
    Drain {
        #[arg(value_parser = parse_socket_addr)]
        address: SocketAddr,
        /// Then print the calls the backend still holds about once a second until there
        /// are none. Exit status: 0 none held, 2 timeout, 3 the drain ended meanwhile
        /// (enabled, disabled or removed), 1 error. Needs call affinity (not with
        /// `run --affinity off`: the dispatcher then cannot see calls).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (e.g. 30s, 10m, 2h) [default: wait
        /// forever].
        #[arg(long, requires = "wait", value_parser = parse_wait_timeout)]
        timeout: Option<Duration>,
    },
    /// Back in service after drain or disable.
    Enable {
        #[arg(value_parser = parse_socket_addr)]
        address: SocketAddr,
    },
    /// Out of service: no calls, no health checks.
    Disable {
        #[arg(value_parser = parse_socket_addr)]
        address: SocketAddr,
    },
    /// Change a backend's weight.
    SetWeight {
        #[arg(value_parser = parse_socket_addr)]
        address: SocketAddr,
        weight: u16,
    },
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// TOML config file: every flag below as a key (same names), plus [[service]]
    /// tables with `vip`, `backends` and `srv`. Flags override the file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Interface to attach to.
    #[arg(long)]
    pub iface: Option<String>,
    /// Service address: 198.18.0.100:5060 or [2001:db8::100]:5060.
    #[arg(long, value_parser = parse_socket_addr)]
    pub vip: Option<SocketAddr>,
    /// Static backend ADDR:PORT[,weight=N][,priority=N] (weight 1 and priority 0 unless
    /// given; lower priorities are preferred, as in SRV). Repeat for each backend.
    #[arg(long = "backend")]
    pub backends: Vec<BackendSpec>,
    /// DNS SRV name whose targets are backends (e.g. _sip._udp.example.net); repeatable,
    /// and may be combined with --backend.
    #[arg(long = "srv")]
    pub srv: Vec<String>,
    /// DNS server ADDR:PORT for SRV lookups. Default: the system resolver configuration.
    #[arg(long, value_parser = parse_socket_addr)]
    pub dns_server: Option<SocketAddr>,
    /// Re-resolve SRV names no sooner than this many seconds, whatever their TTL
    /// (1 to 86400) [default: 5].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_TTL_SECS))]
    pub dns_min_ttl: Option<u64>,
    /// Re-resolve SRV names at least this often, in seconds, whatever their TTL
    /// (1 to 86400) [default: 300].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_TTL_SECS))]
    pub dns_max_ttl: Option<u64>,
    /// Time between two OPTIONS health checks of a backend (e.g. 1s, 500ms; 100ms to
    /// 3600s) [default: 1s].
    #[arg(long, value_parser = parse_health_interval)]
    pub health_interval: Option<Duration>,
    /// How long a health check waits for its response (10ms up to the health interval)
    /// [default: 500ms, or the health interval when shorter].
    #[arg(long, value_parser = parse_health_timeout)]
    pub health_timeout: Option<Duration>,
    /// Consecutive failed health checks that take a backend down (1 to 100) [default: 3].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CHECK_COUNT)))]
    pub down_after: Option<u32>,
    /// Consecutive successful health checks that bring a backend back up (1 to 100)
    /// [default: 2].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CHECK_COUNT)))]
    pub up_after: Option<u32>,
    /// Response codes that mean "alive": codes, classes and exclusions
    /// [default: 2xx,3xx,4xx,6xx,!408,!480].
    #[arg(long)]
    pub alive_codes: Option<AliveCodes>,
    /// Request-URI (and To) of the OPTIONS health check; `{backend}` stands for the
    /// backend's ADDR:PORT, e.g. sip:ping@{backend} [default: sip:{backend}].
    #[arg(long)]
    pub health_uri: Option<HealthUri>,
    /// XDP attach mode: auto tries native (driver) and falls back to skb (generic)
    /// [default: auto].
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpModeArg>,
    /// 128-bit Call-ID hash key, 32 hex digits. Every dispatcher of one farm must use
    /// the same key. Prefer --hash-key-file: a key on the command line is visible to
    /// every local user (/proc/PID/cmdline). Takes precedence over --hash-key-file.
    #[arg(long, value_parser = parse_hash_key)]
    pub hash_key: Option<HashKey>,
    /// File with the 128-bit Call-ID hash key (32 hex digits), mode 0600. Created with a
    /// random key at first start when missing, reused after; dispatchers that must agree
    /// share it. Default: /var/lib/sip-dispatch/hash-key
    #[arg(long)]
    pub hash_key_file: Option<PathBuf>,
    /// Directory (on a bpf filesystem) for the pinned maps.
    /// Default: /sys/fs/bpf/sip-dispatch/<iface>
    #[arg(long)]
    pub pin_path: Option<PathBuf>,
    /// Remove pins left by an earlier run before starting.
    #[arg(long)]
    pub reset: bool,
    /// Control socket for the CLI. Default: /run/sip-dispatch/<iface>.sock
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on ADDR:PORT (e.g. 127.0.0.1:9464).
    #[arg(long, value_parser = parse_socket_addr)]
    pub metrics: Option<SocketAddr>,
    /// On SIGINT/SIGTERM, leave the XDP program attached and the maps pinned:
    /// forwarding goes on with the last tables until a new daemon takes over.
    #[arg(long)]
    pub keep_attached: bool,
    /// File where drain, disable, set-weight and backends added or removed with the CLI
    /// are kept across restarts (JSON, mode 0600).
    /// Default: /var/lib/sip-dispatch/<iface>.state.json
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Call affinity: messages of a call in progress keep going to the backend it started
    /// on across table changes (on), or every message goes by the table (off: purely
    /// stateless). A change needs a restart.
    #[arg(long, value_enum)]
    pub affinity: Option<OnOff>,
    /// Calls the affinity map holds (about 104 bytes each, charged to the daemon's
    /// cgroup; default 262144 = about 26 MiB). Make it at least peak calls per second x
    /// (longest call + call-idle) seconds.
    #[arg(long, value_parser = parse_affinity_entries)]
    pub affinity_entries: Option<u32>,
    /// A call counts as held by its backend (`backends list` CALLS, `drain --wait`) until
    /// its BYE or CANCEL passes the dispatcher, or until none of its messages did for
    /// this long (10s to 24h, e.g. 90s, 10m, 2h; reloadable) [default: 10m]. With
    /// --affinity off no calls are counted.
    #[arg(long, value_parser = parse_call_idle)]
    pub call_idle: Option<Duration>,
    /// How packets reach the backends: rewrite (the destination becomes the backend's;
    /// it answers from its own address), l2dsr (only the Ethernet addresses change; the
    /// backend holds the VIP on lo and answers from it) or ipip (IP-in-IP to the
    /// backend's address; it answers from the VIP). For --vip's service and for every
    /// [[service]] without its own `forwarding`. A change needs a restart
    /// [default: rewrite].
    #[arg(long, value_enum)]
    pub forwarding: Option<ForwardingMode>,
    /// Address of this host the OPTIONS health checks come from, one per family
    /// (repeat for IPv4 and IPv6); never a VIP. Default: for a family with an l2dsr or
    /// ipip service, the first address of --iface that is not a VIP; otherwise the one
    /// the kernel's routing picks.
    #[arg(long = "probe-source", value_parser = parse_ip)]
    pub probe_source: Vec<IpAddr>,
    /// Outer source address of ipip, one per family (repeat for IPv4 and IPv6); an
    /// address of this host. Default: the health checks' source of that family.
    #[arg(long = "encap-source", value_parser = parse_ip)]
    pub encap_source: Vec<IpAddr>,
}

/// An IPv4 or IPv6 address (no port).
pub fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("invalid address {s:?}: expected 198.18.0.1 or 2001:db8::1"))
}

/// Allowed `--call-idle` (and `call-idle`).
pub const CALL_IDLE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(86_400));
/// `--call-idle` unless given.
pub const CALL_IDLE_DEFAULT: Duration = Duration::from_secs(600);

/// A duration that may be given in minutes or hours too: `90s`, `10m`, `1.5h`, `500ms`.
/// `None` unless it is a finite number with one of those units.
fn parse_long_duration(s: &str) -> Option<Duration> {
    let (number, unit) = [("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]
        .into_iter()
        .find_map(|(u, scale)| Some((s.strip_suffix(u)?, scale)))?;
    let value: f64 = number.parse().ok().filter(|v: &f64| v.is_finite())?;
    if value < 0.0 {
        return Some(Duration::ZERO);
    }
    Some(Duration::try_from_secs_f64(value * unit).unwrap_or(Duration::MAX))
}

/// A duration of `name` in minutes or hours too, within `range` (both ends allowed);
/// `range_text` says the range in the error.
fn parse_long_duration_in(
    name: &str,
    s: &str,
    (min, max): (Duration, Duration),
    range_text: &str,
) -> Result<Duration, String> {
    match parse_long_duration(s) {
        Some(d) if d >= min && d <= max => Ok(d),
        Some(_) => Err(format!("{name} {s:?} is out of range: {range_text}")),
        None => Err(format!(
            "{name} {s:?} is not a duration: expected {range_text}, e.g. 90s, 10m or 2h"
        )),
    }
}

pub fn parse_call_idle(s: &str) -> Result<Duration, String> {
    parse_long_duration_in("call-idle", s, CALL_IDLE, "10s to 24h")
}

/// `drain --wait --timeout`: 1s to 7 days.
pub fn parse_wait_timeout(s: &str) -> Result<Duration, String> {
    parse_long_duration_in(
        "timeout",
        s,
        (Duration::from_secs(1), Duration::from_secs(7 * 86_400)),
        "1s to 168h",
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

pub fn parse_affinity_entries(s: &str) -> Result<u32, String> {
    use sip_dispatch_common::{AFFINITY_ENTRIES_MAX, AFFINITY_ENTRIES_MIN};
    let n: u64 = match s.parse() {
        Ok(n) => n,
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => u64::MAX,
        Err(_) => return Err(format!("affinity-entries {s:?} is not a number")),
    };
    if !(u64::from(AFFINITY_ENTRIES_MIN)..=u64::from(AFFINITY_ENTRIES_MAX)).contains(&n) {
        return Err(format!(
            "affinity-entries {s} is out of range: must be at least {AFFINITY_ENTRIES_MIN} and at \
             most {AFFINITY_ENTRIES_MAX}"
        ));
    }
    Ok(n as u32)
}

#[derive(Args, Debug)]
pub struct DetachArgs {
    /// The interface a daemon ran on.
    #[arg(long)]
    pub iface: String,
    /// The pin directory it used. Default: /sys/fs/bpf/sip-dispatch/<iface>
    #[arg(long)]
    pub pin_path: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct XdpPassArgs {
    /// Interface to attach to.
    #[arg(long)]
    pub iface: String,
}

#[derive(Args, Debug)]
pub struct DecapArgs {
    /// Interface to attach to: the one the encapsulated packets arrive on.
    #[arg(long)]
    pub iface: String,
    /// An outer source address to accept (a dispatcher's encapsulation source, IPv4 or
    /// IPv6); repeat for more (at most 64). IP-in-IP from any other source passes to the
    /// stack untouched.
    #[arg(long = "from", value_name = "ADDR", required = true, value_parser = parse_decap_source)]
    pub from: Vec<IpAddr>,
}

/// How a service's packets reach its backends (`--forwarding`, config key `forwarding`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ForwardingMode {
    /// The destination address and port become the backend's; it answers from its own.
    #[default]
    Rewrite,
    /// Only the Ethernet addresses change, to the backend's on the same L2 segment; the
    /// backend holds the VIP on a loopback and answers from it.
    L2dsr,
    /// IP-in-IP (IPv4-in-IPv4, IPv6-in-IPv6) to the backend's address; the backend
    /// decapsulates and answers from the VIP.
    Ipip,
}

impl ForwardingMode {
    /// The mode's bits in `ServiceInfo.flags` (`FWD_*`).
    pub fn fwd_flags(self) -> u32 {
        match self {
            ForwardingMode::Rewrite => sip_dispatch_common::FWD_REWRITE,
            ForwardingMode::L2dsr => sip_dispatch_common::FWD_L2DSR,
            ForwardingMode::Ipip => sip_dispatch_common::FWD_IPIP,
        }
    }

    /// The name operators write (`rewrite`, `l2dsr`, `ipip`).
    pub fn name(self) -> &'static str {
        match self {
            ForwardingMode::Rewrite => "rewrite",
            ForwardingMode::L2dsr => "l2dsr",
            ForwardingMode::Ipip => "ipip",
        }
    }

    /// Whether backends answer from the VIP (so health checks must not come from it).
    pub fn answers_from_vip(self) -> bool {
        self != ForwardingMode::Rewrite
    }
}

impl std::fmt::Display for ForwardingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    Auto,
    Native,
    Skb,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub weight: u32,
    pub priority: u16,
}

impl FromStr for BackendSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let addr = parse_socket_addr(parts.next().unwrap_or_default())?;
        let mut weight = 1;
        let mut priority = 0;
        for opt in parts {
            match opt.split_once('=') {
                Some(("weight", n)) => {
                    weight = n
                        .parse::<u16>()
                        .map_err(|_| format!("invalid weight {n:?} in backend {s:?} (0 to 65535)"))?
                        .into();
                }
                Some(("priority", n)) => {
                    priority = n.parse::<u16>().map_err(|_| {
                        format!("invalid priority {n:?} in backend {s:?} (0 to 65535)")
                    })?;
                }
                _ => {
                    return Err(format!(
                        "unknown backend option {opt:?} in {s:?} (expected weight=N or priority=N)"
                    ));
                }
            }
        }
        Ok(BackendSpec {
            addr,
            weight,
            priority,
        })
    }
}

pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!("invalid address {s:?}: expected 198.18.0.21:5060 or [2001:db8::21]:5060")
    })?;
    if addr.port() == 0 {
        return Err(format!("invalid address {s:?}: port 0"));
    }
    Ok(addr)
}

/// A `decap --from` address: a unicast IPv4 or IPv6 address.
pub fn parse_decap_source(s: &str) -> Result<IpAddr, String> {
    let ip = parse_ip(s)?;
    crate::addrs::check_unicast("decap source", ip)?;
    Ok(ip)
}

/// `500ms`, `1s`, `2.5s`: a positive duration that fits a `Duration`. Never panics.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?}: expected e.g. 500ms, 1s or 2.5s");
    let (number, unit) = match s.strip_suffix("ms") {
        Some(n) => (n, 0.001),
        None => (s.strip_suffix('s').ok_or_else(err)?, 1.0),
    };
    let value: f64 = number.parse().map_err(|_| err())?;
    if !(value.is_finite() && value > 0.0) {
        return Err(err());
    }
    match Duration::try_from_secs_f64(value * unit) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(err()),
    }
}

/// Allowed `--health-interval` (and `health-interval`).
pub const HEALTH_INTERVAL: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));
/// Allowed `--health-timeout`; it may also not exceed the health interval.
pub const HEALTH_TIMEOUT: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(3600));
/// Most `--down-after` and `--up-after` (at least 1).
pub const MAX_CHECK_COUNT: u32 = 100;
/// Most `--dns-min-ttl` and `--dns-max-ttl`, in seconds: one day (at least 1 s).
pub const MAX_TTL_SECS: u64 = 86_400;

/// A duration of `name`, within `range` (both ends allowed). The error names the value
/// and the range.
pub fn parse_duration_in(
    name: &str,
    s: &str,
    (min, max): (Duration, Duration),
) -> Result<Duration, String> {
    let range = format!("{} to {}", show_duration(min), show_duration(max));
    // A number with a unit that is no duration (0, negative, too large) is out of range.
    let numeric = s
        .strip_suffix("ms")
        .or_else(|| s.strip_suffix('s'))
        .and_then(|n| n.parse::<f64>().ok())
        .is_some_and(f64::is_finite);
    match parse_duration(s) {
        Ok(d) if d >= min && d <= max => Ok(d),
        Err(_) if !numeric => Err(format!(
            "{name} {s:?} is not a duration: expected {range}, e.g. 500ms, 1s or 2.5s"
        )),
        _ => Err(format!("{name} {s:?} is out of range: {range}")),
    }
}

pub fn parse_health_interval(s: &str) -> Result<Duration, String> {
    parse_duration_in("health-interval", s, HEALTH_INTERVAL)
}

pub fn parse_health_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_in("health-timeout", s, HEALTH_TIMEOUT)
}

/// A count or a number of seconds of `name`: at least 1 and at most `max`.
pub fn check_count(name: &str, n: u64, max: u64) -> Result<u64, String> {
    if !(1..=max).contains(&n) {
        return Err(format!(
            "{name} {n} is out of range: must be at least 1 and at most {max}"
        ));
    }
    Ok(n)
}

/// `500ms`, `1s`, `3600s`: the form parse_duration reads.
pub fn show_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

fn parse_hash_key(s: &str) -> Result<HashKey, String> {
    HashKey::from_hex(s).ok_or_else(|| format!("invalid hash key {s:?}: expected 32 hex digits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_specs() {
        let b: BackendSpec = "198.18.0.21:5060,weight=2".parse().unwrap();
        assert_eq!(b.addr, "198.18.0.21:5060".parse().unwrap());
        assert_eq!(b.weight, 2);
        let b: BackendSpec = "[2001:db8::21]:5062".parse().unwrap();
        assert_eq!((b.weight, b.priority), (1, 0));
        assert_eq!(b.addr.port(), 5062);
        let b: BackendSpec = "198.18.0.21:5060,priority=20,weight=0".parse().unwrap();
        assert_eq!((b.weight, b.priority), (0, 20));
        for bad in [
            "198.18.0.21:5060,priority=-1",
            "198.18.0.21:5060,weight=70000",
            "198.18.0.21",
            "198.18.0.21:5060,weight=x",
            "198.18.0.21:5060,w=2",
            "host:5060",
            "198.18.0.21:0",
        ] {
            assert!(bad.parse::<BackendSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn decap_needs_unicast_from_addresses() {
        let parse = |argv: &[&str]| {
            let mut all = vec!["sip-dispatch", "decap", "--iface", "eth1"];
            all.extend_from_slice(argv);
            Cli::try_parse_from(all).map(|c| match c.command {
                Command::Decap(a) => a.from,
                _ => unreachable!(),
            })
        };
        assert_eq!(
            parse(&["--from", "198.18.0.2", "--from", "2001:db8::2"]).unwrap(),
            ["198.18.0.2", "2001:db8::2"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        assert!(parse(&[]).is_err(), "--from is required");
        for bad in [
            "198.18.0.2:5060",
            "decap.example",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "127.0.0.1",
            "::ffff:0.0.0.0",
        ] {
            let e = parse(&["--from", bad]).unwrap_err().to_string();
            let first = e.lines().next().unwrap_or_default();
            assert!(first.contains(bad), "{bad}: {first}");
        }
        let e = parse_decap_source("224.0.0.1").unwrap_err();
        assert_eq!(
            e,
            "decap source 224.0.0.1 is a multicast address, not a unicast address"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        for bad in ["", "1", "s", "-1s", "0s", "1m", "NaNs"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_never_panic_and_name_the_value() {
        for bad in [
            "1e20s",
            "1e30s",
            "1e308s",
            "1e400s",
            "NaNs",
            "nans",
            "-nans",
            "infs",
            "-infs",
            "infinitys",
            "0s",
            "0ms",
            "-1s",
            "-0s",
            "1e-12ms",
            "ms",
            "",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(
                e.contains(&format!("{bad:?}")) && !e.contains('\n'),
                "{bad:?}: {e}"
            );
            assert!(parse_health_interval(bad).is_err(), "{bad:?}");
            assert!(parse_health_timeout(bad).is_err(), "{bad:?}");
        }
        // Parses, but outside the range: the message names the value and the range.
        assert_eq!(
            parse_health_interval("1e15s").unwrap_err(),
            "health-interval \"1e15s\" is out of range: 100ms to 3600s"
        );
        assert_eq!(
            parse_health_interval("99ms").unwrap_err(),
            "health-interval \"99ms\" is out of range: 100ms to 3600s"
        );
        assert_eq!(
            parse_health_timeout("9ms").unwrap_err(),
            "health-timeout \"9ms\" is out of range: 10ms to 3600s"
        );
        assert_eq!(
            parse_health_interval("100ms"),
            Ok(Duration::from_millis(100))
        );
        assert_eq!(
            parse_health_interval("3600s"),
            Ok(Duration::from_secs(3600))
        );
        assert!(parse_health_interval("3600.001s").is_err());
        assert_eq!(parse_health_timeout("10ms"), Ok(Duration::from_millis(10)));
        for (bad, why) in [
            ("1e20s", "is out of range: 100ms to 3600s"),
            ("1e308s", "is out of range: 100ms to 3600s"),
            ("0s", "is out of range: 100ms to 3600s"),
            ("-1s", "is out of range: 100ms to 3600s"),
            (
                "NaNs",
                "is not a duration: expected 100ms to 3600s, e.g. 500ms",
            ),
            (
                "infs",
                "is not a duration: expected 100ms to 3600s, e.g. 500ms",
            ),
            (
                "1h",
                "is not a duration: expected 100ms to 3600s, e.g. 500ms",
            ),
        ] {
            let e = parse_health_interval(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("health-interval {bad:?} {why}")),
                "{e}"
            );
        }
        assert_eq!(
            parse_health_timeout("1e30s").unwrap_err(),
            "health-timeout \"1e30s\" is out of range: 10ms to 3600s"
        );
    }

    #[test]
    fn call_idle_is_bounded_and_takes_minutes_and_hours() {
        let s = Duration::from_secs;
        for (given, want) in [
            ("10s", s(10)),
            ("10m", s(600)),
            ("1.5h", s(5400)),
            ("24h", s(86_400)),
            ("86400s", s(86_400)),
            ("10000ms", s(10)),
        ] {
            assert_eq!(parse_call_idle(given), Ok(want), "{given}");
        }
        for bad in ["9s", "9999ms", "24.001h", "0m", "-1m", "1e300h", "1e20s"] {
            assert_eq!(
                parse_call_idle(bad).unwrap_err(),
                format!("call-idle {bad:?} is out of range: 10s to 24h")
            );
        }
        for bad in [
            "", "10", "m", "10 m", "tenm", "NaNh", "infm", "10d", "1h30m",
        ] {
            let e = parse_call_idle(bad).unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "call-idle {bad:?} is not a duration: expected 10s to 24h"
                )),
                "{e}"
            );
        }
        let run = |args: &[&str]| {
            Cli::try_parse_from(
                [["sip-dispatch", "run", "--iface", "d0"].as_slice(), args].concat(),
            )
            .map_err(|e| e.to_string())
        };
        let Ok(Cli {
            command: Command::Run(a),
            ..
        }) = run(&["--call-idle", "2h"])
        else {
            panic!("--call-idle 2h")
        };
        assert_eq!(a.call_idle, Some(s(7200)));
        let e = run(&["--call-idle", "5s"]).unwrap_err();
        assert!(
            e.contains("call-idle \"5s\" is out of range: 10s to 24h"),
            "{e}"
        );
    }

    #[test]
    fn drain_takes_wait_and_a_timeout_only_with_it() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(
                [
                    ["sip-dispatch", "backends", "drain", "198.18.0.22:5060"].as_slice(),
                    args,
                ]
                .concat(),
            )
            .map_err(|e| e.to_string())
        };
        let drain = |args: &[&str]| match parse(args) {
            Ok(Cli {
                command:
                    Command::Backends {
                        command: BackendsCommand::Drain { wait, timeout, .. },
                        ..
                    },
                ..
            }) => (wait, timeout),
            other => panic!("{args:?}: {:?}", other.err()),
        };
        assert_eq!(drain(&[]), (false, None));
        assert_eq!(drain(&["--wait"]), (true, None));
        assert_eq!(
            drain(&["--wait", "--timeout", "30s"]),
            (true, Some(Duration::from_secs(30)))
        );
        assert!(
            parse(&["--timeout", "30s"]).is_err(),
            "--timeout needs --wait"
        );
        let e = parse(&["--wait", "--timeout", "0s"]).unwrap_err();
        assert!(e.contains("timeout \"0s\" is out of range"), "{e}");
    }

    #[test]
    fn counts_and_ttls_are_bounded_on_the_command_line() {
        let run = |flag: &str, value: &str| {
            Cli::try_parse_from(["sip-dispatch", "run", "--iface", "d0", flag, value])
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        for flag in ["--down-after", "--up-after"] {
            assert_eq!(run(flag, "1"), Ok(()));
            assert_eq!(run(flag, "100"), Ok(()));
            for bad in ["0", "101", "4294967296", "-1"] {
                let e = run(flag, bad).unwrap_err();
                assert!(e.contains(bad), "{flag} {bad}: {e}");
            }
        }
        for flag in ["--dns-min-ttl", "--dns-max-ttl"] {
            assert_eq!(run(flag, "1"), Ok(()));
            assert_eq!(run(flag, "86400"), Ok(()));
            for bad in ["0", "86401", "18446744073709551616"] {
                let e = run(flag, bad).unwrap_err();
                assert!(e.contains(bad), "{flag} {bad}: {e}");
            }
        }
        let e = run("--health-interval", "1e20s").unwrap_err();
        assert!(e.contains("1e20s"), "{e}");
        let e = run("--health-timeout", "1e30s").unwrap_err();
        assert!(e.contains("1e30s"), "{e}");
        assert_eq!(
            check_count("down-after", 0, MAX_CHECK_COUNT.into()).unwrap_err(),
            "down-after 0 is out of range: must be at least 1 and at most 100"
        );
    }

    #[test]
    fn cli_parses_the_documented_form() {
        let cli = Cli::try_parse_from([
            "sip-dispatch",
            "run",
            "--iface",
            "d0",
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.21:5060,weight=2",
            "--backend",
            "198.18.0.22:5060",
            "--xdp-mode",
            "skb",
            "--hash-key",
            "7369702d64697370617463682d763121",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.backends.len(), 2);
        assert_eq!(args.xdp_mode, Some(XdpModeArg::Skb));
        assert_eq!(args.hash_key, Some(HashKey::DEFAULT));
        let err = Cli::try_parse_from([
            "sip-dispatch",
            "run",
            "--iface",
            "d0",
            "--vip",
            "nope",
            "--backend",
            "198.18.0.21:5060",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("invalid address \"nope\""), "{err}");
    }
}
