//! Command line: subcommands, flags and the address formats operators' scripts use.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use sip_dispatch_common::HashKey;

use crate::health::{AliveCodes, HealthUri};

mod values;

use values::parse_hash_key;
pub use values::{
    BackendSpec, CALL_IDLE, CALL_IDLE_DEFAULT, HEALTH_INTERVAL, HEALTH_TIMEOUT, MAX_CHECK_COUNT,
    MAX_TTL_SECS, check_count, parse_affinity_entries, parse_call_idle, parse_decap_source,
    parse_duration, parse_duration_in, parse_health_interval, parse_health_timeout, parse_ip,
    parse_socket_addr, parse_wait_timeout, show_duration,
};

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
    /// Packaging: write the man pages and shell completions (from these definitions)
    /// into a directory; `cargo xtask package` runs it.
    #[command(hide = true)]
    GenerateDocs {
        /// Directory to write `man/` and `completions/` into.
        #[arg(long)]
        out: PathBuf,
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
    /// Fewer new calls for a backend whose health checks answer well above its own
    /// baseline round trip (the smallest of the last 5 minutes): above 2 x baseline +
    /// 5 ms its weight is scaled by (2 x baseline + 5 ms) / smoothed RTT, in 10 % steps,
    /// at least 10 %, until the RTT is below 1.5 x baseline + 2 ms again (reloadable;
    /// `--latency-aware` alone means on; default off). RFC 7339 overload feedback (`oc`
    /// in a probe answer's Via) is always followed.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "on")]
    pub latency_aware: Option<OnOff>,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
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

#[cfg(test)]
mod tests;
