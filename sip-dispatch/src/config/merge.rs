//! Flags over the file over the defaults: the settings `run` uses, each value from the
//! first of the flag, the file's key and the default that has one.
use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use sip_dispatch_common::HashKey;
use toml::Spanned;

use super::{
    ServiceSpec, Settings,
    file::{File, Reader, line_of, parse_forwarding, parse_xdp_mode},
    validate_services,
};
use crate::{
    addrs::{SourceAddrs, check_backend, check_source, check_vip},
    cli::{
        BackendSpec, ForwardingMode, MAX_CHECK_COUNT, MAX_TTL_SECS, RunArgs, XdpModeArg,
        check_count, parse_health_interval, parse_health_timeout, parse_socket_addr,
    },
    hashkey::{self, KeyOrigin},
    health::{AliveCodes, HealthConfig, HealthUri},
    srv::DnsConfig,
};

impl Settings {
    pub(super) fn resolve_with(
        args: &RunArgs,
        local: Option<&[IpAddr]>,
    ) -> anyhow::Result<Settings> {
        let no_local: &[IpAddr] = &[];
        let backend_rule = |ip: IpAddr| check_backend(ip, local.unwrap_or(no_local));
        let vip_rule = |ip: IpAddr| match local {
            Some(local) => check_vip(ip, local),
            None => Ok(()),
        };
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
        // A key given as such beats a key file, wherever each is given.
        let (hash_key, hash_key_origin) = match (args.hash_key, &file.hash_key) {
            (Some(k), _) => (k, KeyOrigin::Flag),
            (None, Some(k)) => (
                r.parse("hash-key", k, |s| {
                    HashKey::from_hex(s).ok_or_else(|| "expected 32 hex digits".into())
                })?,
                KeyOrigin::ConfigFile,
            ),
            (None, None) => {
                let path = args
                    .hash_key_file
                    .clone()
                    .or_else(|| file.hash_key_file.clone())
                    .unwrap_or_else(|| PathBuf::from(hashkey::DEFAULT_KEY_FILE));
                match hashkey::read(&path)? {
                    Some(k) => (k, KeyOrigin::KeyFile(path)),
                    None => (hashkey::generate()?, KeyOrigin::NewKeyFile(path)),
                }
            }
        };
        let affinity_on = match (args.affinity, &file.affinity) {
            (Some(a), _) => a,
            (None, Some(a)) => r.parse("affinity", a, |s| {
                clap::ValueEnum::from_str(s, false)
                    .map_err(|_| format!("invalid affinity {s:?} (on or off)"))
            })?,
            (None, None) => crate::cli::OnOff::On,
        };
        let affinity_entries = match (args.affinity_entries, &file.affinity_entries) {
            (Some(n), _) => n,
            (None, Some(n)) => crate::cli::parse_affinity_entries(&n.get_ref().to_string())
                .map_err(|e| {
                    let line = r.line(n.span());
                    anyhow::anyhow!("{}:{line}: key `affinity-entries`: {e}", r.path.display())
                })?,
            (None, None) => sip_dispatch_common::AFFINITY_ENTRIES_DEFAULT,
        };
        let affinity = crate::dataplane::Affinity {
            on: affinity_on == crate::cli::OnOff::On,
            entries: affinity_entries,
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
                        parse: fn(&str) -> Result<Duration, String>,
                        default: Duration| match (flag, v) {
            (Some(d), _) => Ok(d),
            (None, Some(d)) => r.parse(key, d, parse),
            (None, None) => Ok(default),
        };
        let count = |flag: Option<u32>, key: &str, v: &Option<Spanned<u32>>, default: u32| match (
            flag, v,
        ) {
            (Some(n), _) => Ok(n),
            (None, Some(n)) => r.count(key, n, MAX_CHECK_COUNT.into()),
            (None, None) => Ok(default),
        };
        let ttl = |flag: Option<u64>, key: &str, v: &Option<Spanned<u64>>, default: u64| match (
            flag, v,
        ) {
            (Some(n), _) => check_count(key, n, MAX_TTL_SECS).map_err(anyhow::Error::msg),
            (None, Some(n)) => r.count(key, n, MAX_TTL_SECS),
            (None, None) => Ok(default),
        };
        let interval = duration(
            args.health_interval,
            "health-interval",
            &file.health_interval,
            parse_health_interval,
            Duration::from_secs(1),
        )?;
        let call_idle = duration(
            args.call_idle,
            "call-idle",
            &file.call_idle,
            crate::cli::parse_call_idle,
            crate::cli::CALL_IDLE_DEFAULT,
        )?;
        let health = HealthConfig {
            interval,
            // The default timeout shrinks with a shorter interval; a given one must fit.
            timeout: duration(
                args.health_timeout,
                "health-timeout",
                &file.health_timeout,
                parse_health_timeout,
                Duration::from_millis(500).min(interval),
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
            min_ttl: Duration::from_secs(ttl(
                args.dns_min_ttl,
                "dns-min-ttl",
                &file.dns_min_ttl,
                5,
            )?),
            max_ttl: Duration::from_secs(ttl(
                args.dns_max_ttl,
                "dns-max-ttl",
                &file.dns_max_ttl,
                300,
            )?),
        };
        if dns.min_ttl > dns.max_ttl {
            bail!(
                "dns-min-ttl {}s is above dns-max-ttl {}s",
                dns.min_ttl.as_secs(),
                dns.max_ttl.as_secs()
            );
        }

        // The flag beats the file's top-level key; a service's own key beats both.
        let forwarding = match (args.forwarding, &file.forwarding) {
            (Some(f), _) => f,
            (None, Some(f)) => r.parse("forwarding", f, parse_forwarding)?,
            (None, None) => ForwardingMode::default(),
        };
        let sources = |what: &str,
                       flags: &[IpAddr],
                       keys: &[Spanned<String>]|
         -> anyhow::Result<SourceAddrs> {
            let mut list = Vec::new();
            if flags.is_empty() {
                for k in keys {
                    let ip = r.parse(what, k, crate::cli::parse_ip)?;
                    if let Some(local) = local {
                        r.check(what, k, check_source(what, ip, local))?;
                    }
                    list.push(ip);
                }
            } else {
                for &ip in flags {
                    if let Some(local) = local {
                        check_source(&format!("--{what}"), ip, local)
                            .map_err(anyhow::Error::msg)?;
                    }
                    list.push(ip);
                }
            }
            SourceAddrs::from_list(what, &list).map_err(anyhow::Error::msg)
        };
        let probe_source = sources("probe-source", &args.probe_source, &file.probe_source)?;
        let encap_source = sources("encap-source", &args.encap_source, &file.encap_source)?;

        let mut services = Vec::new();
        for s in &file.service {
            let vip = r.parse("vip", &s.vip, parse_socket_addr)?;
            r.check("vip", &s.vip, vip_rule(vip.ip()))?;
            let mut backends = Vec::new();
            for b in &s.backends {
                let spec = r.parse("backends", b, str::parse::<BackendSpec>)?;
                r.check("backends", b, backend_rule(spec.addr.ip()))?;
                backends.push(spec);
            }
            let own = match &s.forwarding {
                Some(f) => r.parse("forwarding", f, parse_forwarding)?,
                None => forwarding,
            };
            services.push(ServiceSpec {
                vip,
                backends,
                srv: s.srv.clone(),
                forwarding: own,
            });
        }
        match args.vip {
            Some(vip) => {
                vip_rule(vip.ip()).map_err(|e| anyhow::anyhow!("--vip {vip}: {e}"))?;
                for b in &args.backends {
                    backend_rule(b.addr.ip())
                        .map_err(|e| anyhow::anyhow!("--backend {}: {e}", b.addr))?;
                }
                let flags = ServiceSpec {
                    vip,
                    backends: args.backends.clone(),
                    srv: args.srv.clone(),
                    forwarding,
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
        for ip in probe_source.iter() {
            if let Some(s) = services.iter().find(|s| s.vip.ip() == ip) {
                bail!(
                    "probe-source {ip} is the VIP of service {}: health checks must come from another address",
                    s.vip
                );
            }
        }
        for ip in encap_source.iter() {
            if let Some(s) = services.iter().find(|s| s.vip.ip() == ip) {
                bail!(
                    "encap-source {ip} is the VIP of service {}: the backends hold the VIP too, and drop packets from their own address",
                    s.vip
                );
            }
        }

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
            state_file: args
                .state_file
                .clone()
                .or(file.state_file)
                .unwrap_or_else(|| crate::state::default_path(&iface)),
            reset: args.reset,
            keep_attached: args.keep_attached,
            iface,
            xdp_mode,
            hash_key,
            hash_key_origin,
            metrics,
            dns,
            health,
            services,
            affinity,
            call_idle,
            latency_aware: args
                .latency_aware
                .map(|v| v == crate::cli::OnOff::On)
                .or(file.latency_aware)
                .unwrap_or(false),
            probe_source,
            encap_source,
        })
    }
}
