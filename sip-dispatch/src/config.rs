//! `sip-dispatch run --config FILE`: every `run` flag as a TOML key (same names), plus
//! several services, each with static backends and/or SRV names. Flags override the
//! file. Errors name the file, the line and the key.
//!
//! ```toml
//! iface = "eth1"
//! health-interval = "1s"
//! dns-server = "198.18.0.53:53"
//!
//! [[service]]
//! vip = "198.18.0.100:5060"
//! backends = ["198.18.0.21:5060,weight=2", "198.18.0.22:5060"]
//! srv = ["_sip._udp.example.net"]
//! ```
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use sip_dispatch_common::HashKey;
use toml::Spanned;

use crate::{
    cli::{BackendSpec, RunArgs, XdpModeArg, parse_duration, parse_socket_addr},
    health::{AliveCodes, HealthConfig, HealthUri},
    select::Candidate,
    srv::DnsConfig,
};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    iface: Option<Spanned<String>>,
    xdp_mode: Option<Spanned<String>>,
    hash_key: Option<Spanned<String>>,
    pin_path: Option<PathBuf>,
    control: Option<PathBuf>,
    metrics: Option<Spanned<String>>,
    dns_server: Option<Spanned<String>>,
    dns_min_ttl: Option<u64>,
    dns_max_ttl: Option<u64>,
    health_interval: Option<Spanned<String>>,
    health_timeout: Option<Spanned<String>>,
    down_after: Option<Spanned<u32>>,
    up_after: Option<Spanned<u32>>,
    alive_codes: Option<Spanned<String>>,
    health_uri: Option<Spanned<String>>,
    #[serde(default)]
    service: Vec<FileService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    vip: Spanned<String>,
    #[serde(default)]
    backends: Vec<Spanned<String>>,
    #[serde(default)]
    srv: Vec<String>,
}

/// One service to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: SocketAddr,
    pub backends: Vec<BackendSpec>,
    pub srv: Vec<String>,
}

/// A static backend as the table builder takes it (healthy until checked).
impl From<&BackendSpec> for Candidate {
    fn from(b: &BackendSpec) -> Candidate {
        Candidate {
            addr: b.addr,
            priority: b.priority,
            weight: b.weight,
            sharing: 1,
            healthy: true,
        }
    }
}

/// Everything `run` needs, flags and file merged, defaults applied.
#[derive(Clone, Debug)]
pub struct Settings {
    pub iface: String,
    pub xdp_mode: XdpModeArg,
    pub hash_key: HashKey,
    pub pin_path: PathBuf,
    pub reset: bool,
    pub keep_attached: bool,
    pub control: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub dns: DnsConfig,
    pub health: HealthConfig,
    pub services: Vec<ServiceSpec>,
}

/// Reads a value the file gave as text, naming file, line and key when it is wrong.
struct Reader<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Reader<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        line_of(self.text, span.start)
    }

    fn parse<T>(
        &self,
        key: &str,
        v: &Spanned<String>,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> anyhow::Result<T> {
        f(v.get_ref()).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: key `{key}`: {e}",
                self.path.display(),
                self.line(v.span())
            )
        })
    }

    fn at_least_one(&self, key: &str, v: &Spanned<u32>) -> anyhow::Result<u32> {
        match *v.get_ref() {
            0 => bail!(
                "{}:{}: key `{key}`: must be at least 1",
                self.path.display(),
                self.line(v.span())
            ),
            n => Ok(n),
        }
    }
}

/// The 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn parse_xdp_mode(s: &str) -> Result<XdpModeArg, String> {
    clap::ValueEnum::from_str(s, false)
        .map_err(|_| format!("invalid XDP mode {s:?} (auto, native or skb)"))
}

impl Settings {
    /// Merges the flags with the config file they name (if any).
    pub fn resolve(args: &RunArgs) -> anyhow::Result<Settings> {
        let (file, text, path) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let file: File = toml::from_str(&text).map_err(|e| {
                    let line = e.span().map_or(0, |s| line_of(&text, s.start));
                    anyhow::anyhow!("{}:{line}: {}", path.display(), e.message().trim())
                })?;
                (file, text, path.clone())
            }
            None => (
                File::default(),
                String::new(),
                PathBuf::from("(no config file)"),
            ),
        };
        let r = Reader {
            path: &path,
            text: &text,
        };

        let iface = match (&args.iface, &file.iface) {
            (Some(i), _) => i.clone(),
            (None, Some(i)) => i.get_ref().clone(),
            (None, None) => bail!("no interface: give --iface IF (or `iface` in the config file)"),
        };
        let xdp_mode = match (args.xdp_mode, &file.xdp_mode) {
            (Some(m), _) => m,
            (None, Some(m)) => r.parse("xdp-mode", m, parse_xdp_mode)?,
            (None, None) => XdpModeArg::Auto,
        };
        let hash_key = match (args.hash_key, &file.hash_key) {
            (Some(k), _) => k,
            (None, Some(k)) => r.parse("hash-key", k, |s| {
                HashKey::from_hex(s).ok_or_else(|| "expected 32 hex digits".into())
            })?,
            (None, None) => HashKey::DEFAULT,
        };
        let metrics = match (args.metrics, &file.metrics) {
            (Some(m), _) => Some(m),
            (None, Some(m)) => Some(r.parse("metrics", m, parse_socket_addr)?),
            (None, None) => None,
        };
        let dns_server = match (args.dns_server, &file.dns_server) {
            (Some(d), _) => Some(d),
            (None, Some(d)) => Some(r.parse("dns-server", d, parse_socket_addr)?),
            (None, None) => None,
        };
        let duration = |flag: Option<Duration>,
                        key: &str,
                        v: &Option<Spanned<String>>,
                        default: &str| match (flag, v) {
            (Some(d), _) => Ok(d),
            (None, Some(d)) => r.parse(key, d, parse_duration),
            (None, None) => Ok(parse_duration(default).expect("valid default")),
        };
        let count = |flag: Option<u32>, key: &str, v: &Option<Spanned<u32>>, default: u32| match (
            flag, v,
        ) {
            (Some(n), _) => Ok(n),
            (None, Some(n)) => r.at_least_one(key, n),
            (None, None) => Ok(default),
        };
        let health = HealthConfig {
            interval: duration(
                args.health_interval,
                "health-interval",
                &file.health_interval,
                "1s",
            )?,
            timeout: duration(
                args.health_timeout,
                "health-timeout",
                &file.health_timeout,
                "500ms",
            )?,
            down_after: count(args.down_after, "down-after", &file.down_after, 3)?,
            up_after: count(args.up_after, "up-after", &file.up_after, 2)?,
            alive: match (&args.alive_codes, &file.alive_codes) {
                (Some(a), _) => a.clone(),
                (None, Some(a)) => r.parse("alive-codes", a, str::parse)?,
                (None, None) => AliveCodes::DEFAULT.parse().map_err(anyhow::Error::msg)?,
            },
            uri: match (&args.health_uri, &file.health_uri) {
                (Some(u), _) => u.clone(),
                (None, Some(u)) => r.parse("health-uri", u, str::parse)?,
                (None, None) => HealthUri::default(),
            },
        };
        if health.timeout > health.interval {
            bail!(
                "health-timeout {:?} is longer than health-interval {:?}",
                health.timeout,
                health.interval
            );
        }
        let dns = DnsConfig {
            server: dns_server,
            min_ttl: Duration::from_secs(args.dns_min_ttl.or(file.dns_min_ttl).unwrap_or(5)),
            max_ttl: Duration::from_secs(args.dns_max_ttl.or(file.dns_max_ttl).unwrap_or(300)),
        };
        if dns.min_ttl > dns.max_ttl {
            bail!(
                "dns-min-ttl {}s is above dns-max-ttl {}s",
                dns.min_ttl.as_secs(),
                dns.max_ttl.as_secs()
            );
        }

        let mut services = Vec::new();
        for s in &file.service {
            let vip = r.parse("vip", &s.vip, parse_socket_addr)?;
            let backends = s
                .backends
                .iter()
                .map(|b| r.parse("backends", b, str::parse::<BackendSpec>))
                .collect::<anyhow::Result<Vec<_>>>()?;
            services.push(ServiceSpec {
                vip,
                backends,
                srv: s.srv.clone(),
            });
        }
        match args.vip {
            Some(vip) => {
                let flags = ServiceSpec {
                    vip,
                    backends: args.backends.clone(),
                    srv: args.srv.clone(),
                };
                match services.iter_mut().find(|s| s.vip == vip) {
                    Some(s) => *s = flags,
                    None => services.push(flags),
                }
            }
            None if !args.backends.is_empty() || !args.srv.is_empty() => {
                bail!("--backend and --srv need --vip (the service they belong to)")
            }
            None => {}
        }
        if services.is_empty() {
            bail!(
                "no service: give --vip ADDR:PORT with --backend or --srv (or [[service]] in a config file)"
            );
        }
        validate_services(&services)?;

        Ok(Settings {
            pin_path: args
                .pin_path
                .clone()
                .or(file.pin_path)
                .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/sip-dispatch/{iface}"))),
            control: args
                .control
                .clone()
                .or(file.control)
                .unwrap_or_else(|| crate::control::default_socket(&iface)),
            reset: args.reset,
            keep_attached: args.keep_attached,
            iface,
            xdp_mode,
            hash_key,
            metrics,
            dns,
            health,
            services,
        })
    }
}

/// Rules every service set must keep: no forwarding loops, one family per service, no
/// backend listed twice, every service with something to dispatch to.
pub fn validate_services(services: &[ServiceSpec]) -> anyhow::Result<()> {
    if services.len() > sip_dispatch_common::MAX_SERVICES as usize {
        bail!(
            "{} services: at most {}",
            services.len(),
            sip_dispatch_common::MAX_SERVICES
        );
    }
    for (i, s) in services.iter().enumerate() {
        if services[..i].iter().any(|o| o.vip == s.vip) {
            bail!("service {} is configured twice", s.vip);
        }
        if s.backends.is_empty() && s.srv.is_empty() {
            bail!("service {} has no --backend and no --srv", s.vip);
        }
        for (j, b) in s.backends.iter().enumerate() {
            if b.addr.is_ipv6() != s.vip.is_ipv6() {
                bail!(
                    "backend {} and VIP {} are of different address families",
                    b.addr,
                    s.vip
                );
            }
            if services.iter().any(|o| o.vip == b.addr) {
                bail!(
                    "backend {} is a VIP of this dispatcher (a forwarding loop)",
                    b.addr
                );
            }
            if s.backends[..j].iter().any(|o| o.addr == b.addr) {
                bail!("backend {} is listed twice for {}", b.addr, s.vip);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["sip-dispatch", "run"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sd-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const FILE: &str = r#"
iface = "eth1"
health-interval = "2s"
down-after = 4
dns-server = "198.18.0.53:53"

[[service]]
vip = "198.18.0.100:5060"
backends = ["198.18.0.21:5060,weight=2", "198.18.0.22:5060"]

[[service]]
vip = "[2001:db8::100]:5060"
srv = ["_sip._udp.example.net"]
"#;

    #[test]
    fn the_file_gives_settings_and_flags_override_it() {
        let p = write("good.toml", FILE);
        let s = Settings::resolve(&args(&[
            "--config",
            p.to_str().unwrap(),
            "--down-after",
            "5",
        ]))
        .unwrap();
        assert_eq!(s.iface, "eth1");
        assert_eq!(s.health.interval, Duration::from_secs(2));
        assert_eq!(s.health.down_after, 5, "the flag wins");
        assert_eq!(s.health.up_after, 2, "the default stays");
        assert_eq!(s.dns.server, Some("198.18.0.53:53".parse().unwrap()));
        assert_eq!(s.services.len(), 2);
        assert_eq!(s.services[0].backends[0].weight, 2);
        assert_eq!(s.services[1].srv, ["_sip._udp.example.net"]);
        assert_eq!(s.control, PathBuf::from("/run/sip-dispatch/eth1.sock"));
        // A --vip replaces the file's service with the same VIP.
        let s = Settings::resolve(&args(&[
            "--config",
            p.to_str().unwrap(),
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.23:5060",
        ]))
        .unwrap();
        assert_eq!(s.services[0].backends.len(), 1);
        assert_eq!(
            s.services[0].backends[0].addr,
            "198.18.0.23:5060".parse().unwrap()
        );
    }

    #[test]
    fn health_uri_from_the_file_or_the_flag_is_checked() {
        let p = write(
            "health-uri.toml",
            &FILE.replace("down-after = 4", "health-uri = \"sip:ping@{backend}\""),
        );
        let s = Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap();
        assert_eq!(s.health.uri.template(), "sip:ping@{backend}");
        let s = Settings::resolve(&args(&[
            "--config",
            p.to_str().unwrap(),
            "--health-uri",
            "sip:health@{backend};transport=udp",
        ]))
        .unwrap();
        assert_eq!(
            s.health.uri.template(),
            "sip:health@{backend};transport=udp"
        );
        let s = Settings::resolve(&args(&[
            "--config",
            write("plain.toml", FILE).to_str().unwrap(),
        ]))
        .unwrap();
        assert_eq!(s.health.uri, HealthUri::default());

        let p = write(
            "bad-health-uri.toml",
            &FILE.replace("down-after = 4", "health-uri = \"ping@{backend}\""),
        );
        let e = format!(
            "{:#}",
            Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap_err()
        );
        assert!(
            e.contains(
                "bad-health-uri.toml:4: key `health-uri`: invalid health URI \"ping@{backend}\""
            ),
            "{e}"
        );
        let e = crate::cli::Cli::try_parse_from([
            "sip-dispatch",
            "run",
            "--health-uri",
            "sip:a b@{backend}",
        ])
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("invalid health URI \"sip:a b@{backend}\": character ' ' not allowed"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let p = write(
            "bad-vip.toml",
            &FILE.replace("198.18.0.100:5060", "198.18.0.100"),
        );
        let e = format!(
            "{:#}",
            Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap_err()
        );
        assert!(
            e.contains("bad-vip.toml:8: key `vip`: invalid address"),
            "{e}"
        );
        let p = write("bad-key.toml", &FILE.replace("down-after", "down-afterr"));
        let e = format!(
            "{:#}",
            Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap_err()
        );
        assert!(
            e.contains("bad-key.toml:4:") && e.contains("down-afterr"),
            "{e}"
        );
        let p = write(
            "bad-backend.toml",
            &FILE.replace("198.18.0.22:5060\"", "198.18.0.22:5060,weight=x\""),
        );
        let e = format!(
            "{:#}",
            Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap_err()
        );
        assert!(
            e.contains("bad-backend.toml:9: key `backends`: invalid weight"),
            "{e}"
        );
        let p = write(
            "bad-count.toml",
            &FILE.replace("down-after = 4", "down-after = 0"),
        );
        let e = format!(
            "{:#}",
            Settings::resolve(&args(&["--config", p.to_str().unwrap()])).unwrap_err()
        );
        assert!(
            e.contains("bad-count.toml:4: key `down-after`: must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn services_are_validated() {
        let e = Settings::resolve(&args(&["--iface", "x", "--backend", "198.18.0.21:5060"]))
            .unwrap_err();
        assert!(e.to_string().contains("need --vip"), "{e}");
        let e = Settings::resolve(&args(&[
            "--iface",
            "x",
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.100:5060",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("forwarding loop"), "{e}");
        let e = Settings::resolve(&args(&[
            "--vip",
            "198.18.0.100:5060",
            "--backend",
            "198.18.0.21:5060",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("no interface"), "{e}");
    }
}
