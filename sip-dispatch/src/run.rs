//! `sip-dispatch run` and `sip-dispatch xdp-pass`.
use std::{collections::BTreeMap, ffi::CString, io::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use sip_dispatch_common::HashKey;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::{RunArgs, XdpPassArgs},
    control,
    controller::{self, Controller, Service},
    dataplane::{Dataplane, attach_pass},
    health::HealthConfig,
    metrics,
    select::Candidate,
    slowpath,
    srv::{self, DnsConfig},
    sysctl::Forwarding,
};

fn ifindex(iface: &str) -> anyhow::Result<u32> {
    let name = CString::new(iface).with_context(|| format!("invalid interface name {iface:?}"))?;
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => bail!("interface {iface:?} not found"),
        i => Ok(i),
    }
}

/// Interfaces XDP_REDIRECT may send to: every interface of this namespace but loopback.
fn tx_ports() -> Vec<(String, u32)> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name != "lo")
        .filter_map(|name| ifindex(&name).ok().map(|i| (name, i)))
        .collect()
}

fn validate(args: &RunArgs) -> anyhow::Result<()> {
    for (i, b) in args.backends.iter().enumerate() {
        if b.addr.is_ipv6() != args.vip.is_ipv6() {
            bail!(
                "backend {} and VIP {} are of different address families",
                b.addr,
                args.vip
            );
        }
        if b.addr == args.vip {
            bail!("backend {} is the VIP itself (a forwarding loop)", b.addr);
        }
        if args.backends[..i].iter().any(|o| o.addr == b.addr) {
            bail!("backend {} is listed twice", b.addr);
        }
    }
    if args.iface == "lo" {
        bail!("refusing to attach to lo: XDP dispatch needs a real or veth interface");
    }
    if args.dns_min_ttl > args.dns_max_ttl {
        bail!(
            "--dns-min-ttl {} is above --dns-max-ttl {}",
            args.dns_min_ttl,
            args.dns_max_ttl
        );
    }
    if args.health_timeout > args.health_interval {
        bail!(
            "--health-timeout {:?} is longer than --health-interval {:?}",
            args.health_timeout,
            args.health_interval
        );
    }
    Ok(())
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    validate(&args)?;
    ifindex(&args.iface)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_daemon(args))
}

async fn run_daemon(args: RunArgs) -> anyhow::Result<()> {
    let key = args.hash_key.unwrap_or(HashKey::DEFAULT);
    let pin_dir = args
        .pin_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/sip-dispatch/{}", args.iface)));
    let health = HealthConfig {
        interval: args.health_interval,
        timeout: args.health_timeout,
        down_after: args.down_after,
        up_after: args.up_after,
        alive: args.alive_codes.clone(),
    };
    let dns = DnsConfig {
        server: args.dns_server,
        min_ttl: Duration::from_secs(args.dns_min_ttl),
        max_ttl: Duration::from_secs(args.dns_max_ttl),
    };
    let mut service = Service {
        id: 0,
        vip: args.vip,
        statics: args
            .backends
            .iter()
            .map(|b| Candidate {
                addr: b.addr,
                priority: b.priority,
                weight: b.weight,
                sharing: 1,
                healthy: true,
            })
            .collect(),
        srv: BTreeMap::new(),
    };

    // DNS first: starting needs at least one known backend.
    let resolver = if args.srv.is_empty() {
        None
    } else {
        Some(srv::resolver(&dns)?)
    };
    let mut first_answers = BTreeMap::new();
    let mut dns_errors = Vec::new();
    if let Some(resolver) = &resolver {
        for name in &args.srv {
            match srv::resolve(resolver, name).await {
                Ok(answer) => {
                    controller::log_answer(name, &answer);
                    service.set_srv(name, &answer);
                    first_answers.insert(name.clone(), answer);
                }
                Err(e) => {
                    log::warn!("dns {name} failed: {e:#} (retrying in the background)");
                    dns_errors.push(format!("{e:#}"));
                }
            }
        }
    }
    if service.statics.is_empty() && service.srv.values().all(Vec::is_empty) {
        bail!("no backend known: {}", dns_errors.join("; "));
    }

    let _forwarding = Forwarding::enable(&args.iface, args.vip.is_ipv6())?;
    let mut dp = Dataplane::load(&pin_dir, &args.iface, args.reset, key)?;
    for (name, i) in tx_ports() {
        if let Err(e) = dp.add_tx_port(i) {
            log::warn!("interface {name} cannot be a redirect target: {e:#}");
        }
    }
    let slow_socket = slowpath::bind(args.vip).await?;
    let control_path = args
        .control
        .clone()
        .unwrap_or_else(|| control::default_socket(&args.iface));
    let control_listener = control::bind(&control_path)?;
    let metrics_listener = match args.metrics {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let mut ctl = Controller::new(dp, key, health, service);
    ctl.initial_probe().await;
    ctl.republish();
    let slow = tokio::spawn(slowpath::serve(
        slow_socket,
        key,
        ctl.tables(),
        ctl.slow_path.clone(),
    ));
    let mode = ctl.dataplane().attach(args.xdp_mode)?;
    let infos = ctl.backend_infos();
    log::info!(
        "dispatching {} on {} in {} mode",
        args.vip,
        args.iface,
        mode.name()
    );
    ready(&format!(
        "iface={} mode={} backends={}",
        args.iface,
        mode.name(),
        infos.len()
    ));

    let (srv_tx, srv_rx) = tokio::sync::mpsc::channel(64);
    let watchers: Vec<_> = match resolver {
        Some(resolver) => args
            .srv
            .iter()
            .map(|name| {
                let first = first_answers.get(name).cloned();
                tokio::spawn(srv::watch(
                    resolver.clone(),
                    name.clone(),
                    dns,
                    first,
                    srv_tx.clone(),
                    ctl.reload.clone(),
                ))
            })
            .collect(),
        None => Vec::new(),
    };
    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::channel(16);
    let metrics_task =
        metrics_listener.map(|l| tokio::spawn(metrics::serve(l, args.vip, cmd_tx.clone())));
    let control_task = tokio::spawn(control::serve(control_listener, cmd_tx));
    ctl.run(srv_rx, cmd_rx, stop_signal()?).await;
    control_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&control_path);
    for w in watchers {
        w.abort();
    }
    slow.abort();

    let snap = ctl.snapshot()?;
    drop(ctl);
    println!("sip-dispatch: exit-stats {}", serde_json::to_string(&snap)?);
    log::info!("detached from {}", args.iface);
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// The one line on stdout that scripts and tests wait for.
fn ready(details: &str) {
    println!("sip-dispatch: ready {details}");
    let _ = std::io::stdout().flush();
}

pub fn xdp_pass(args: XdpPassArgs) -> anyhow::Result<()> {
    ifindex(&args.iface)?;
    let (ebpf, _link) = attach_pass(&args.iface)?;
    ready(&format!("iface={} program=xdp_pass", args.iface));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        stop_signal()?.await;
        anyhow::Ok(())
    })?;
    drop(ebpf);
    Ok(())
}
