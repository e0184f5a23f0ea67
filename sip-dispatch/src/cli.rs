//! Command line: subcommands, flags and the address formats operators' scripts use.
use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

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
    /// Every backend: address, source, priority, weight, state, reason, RTT, share, packets.
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
    /// No new calls (weight 0); health checks go on.
    Drain {
        #[arg(value_parser = parse_socket_addr)]
        address: SocketAddr,
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
    /// Re-resolve SRV names no sooner than this many seconds, whatever their TTL [default: 5].
    #[arg(long)]
    pub dns_min_ttl: Option<u64>,
    /// Re-resolve SRV names at least this often, in seconds, whatever their TTL [default: 300].
    #[arg(long)]
    pub dns_max_ttl: Option<u64>,
    /// Time between two OPTIONS health checks of a backend (e.g. 1s, 500ms) [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    pub health_interval: Option<Duration>,
    /// How long a health check waits for its response [default: 500ms].
    #[arg(long, value_parser = parse_duration)]
    pub health_timeout: Option<Duration>,
    /// Consecutive failed health checks that take a backend down [default: 3].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub down_after: Option<u32>,
    /// Consecutive successful health checks that bring a backend back up [default: 2].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
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
    /// the same key. Default: 7369702d64697370617463682d763121 ("sip-dispatch-v1!").
    #[arg(long, value_parser = parse_hash_key)]
    pub hash_key: Option<HashKey>,
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

/// `500ms`, `1s`, `2.5s`.
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
    Ok(Duration::from_secs_f64(value * unit))
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
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        for bad in ["", "1", "s", "-1s", "0s", "1m", "NaNs"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
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
