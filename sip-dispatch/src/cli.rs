//! Command line: subcommands, flags and the address formats operators' scripts use.
use std::{net::SocketAddr, path::PathBuf, str::FromStr};

use clap::{Args, Parser, Subcommand, ValueEnum};
use sip_dispatch_common::HashKey;

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
    Run(RunArgs),
    /// Attach an XDP program that passes everything (for the peer of a veth that runs the
    /// dispatcher in native mode) and hold it until SIGINT/SIGTERM.
    XdpPass(XdpPassArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Interface to attach to.
    #[arg(long)]
    pub iface: String,
    /// Service address: 198.18.0.100:5060 or [2001:db8::100]:5060.
    #[arg(long, value_parser = parse_socket_addr)]
    pub vip: SocketAddr,
    /// Backend ADDR:PORT[,weight=N] (weight defaults to 1). Repeat for each backend.
    #[arg(long = "backend", required = true)]
    pub backends: Vec<BackendSpec>,
    /// XDP attach mode: auto tries native (driver) and falls back to skb (generic).
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
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
}

impl FromStr for BackendSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let addr = parse_socket_addr(parts.next().unwrap_or_default())?;
        let mut weight = 1;
        for opt in parts {
            match opt.split_once('=') {
                Some(("weight", n)) => {
                    weight = n
                        .parse::<u32>()
                        .map_err(|_| format!("invalid weight {n:?} in backend {s:?}"))?;
                }
                _ => {
                    return Err(format!(
                        "unknown backend option {opt:?} in {s:?} (expected weight=N)"
                    ));
                }
            }
        }
        Ok(BackendSpec { addr, weight })
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
        assert_eq!(b.weight, 1);
        assert_eq!(b.addr.port(), 5062);
        for bad in [
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
        assert_eq!(args.xdp_mode, XdpModeArg::Skb);
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
