//! `sip-dispatch run` and `sip-dispatch xdp-pass`.
use std::{ffi::CString, io::Write as _, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use sip_dispatch_common::{
    Backend, HashKey,
    table::{Weighted, build_table},
};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::{RunArgs, XdpPassArgs},
    dataplane::{Dataplane, attach_pass},
    health, stats,
    sysctl::Forwarding,
};

/// Re-probe interval: keeps the backends' neighbour entries fresh for the FIB lookup.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

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
    for b in &args.backends {
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
    }
    if args.iface == "lo" {
        bail!("refusing to attach to lo: XDP dispatch needs a real or veth interface");
    }
    Ok(())
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let key = args.hash_key.unwrap_or(HashKey::DEFAULT);
    let pin_dir = args
        .pin_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/sip-dispatch/{}", args.iface)));

    let members: Vec<Weighted> = args
        .backends
        .iter()
        .map(|b| Weighted {
            backend: Backend::from_socket_addr(b.addr),
            weight: b.weight,
        })
        .collect();
    let table = build_table(&members, key).context("building the slot table")?;
    let index = ifindex(&args.iface)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;

    let _forwarding = Forwarding::enable(&args.iface, args.vip.is_ipv6())?;
    let mut dp = Dataplane::load(&pin_dir, &args.iface, args.reset, key)?;
    let known = dp.install_service(0, args.vip, &table)?;
    for (name, i) in tx_ports() {
        if let Err(e) = dp.add_tx_port(i) {
            log::warn!("interface {name} cannot be a redirect target: {e:#}");
        }
    }

    let addrs: Vec<SocketAddr> = known.iter().map(|(_, a, _)| *a).collect();
    runtime.block_on(probe_all(&addrs, 0));

    let mode = dp.attach(args.xdp_mode)?;
    log::info!(
        "dispatching {} to {} backend(s) on {} (ifindex {index}) in {} mode",
        args.vip,
        known.len(),
        args.iface,
        mode.name()
    );
    ready(&format!(
        "iface={} mode={} backends={}",
        args.iface,
        mode.name(),
        known.len()
    ));

    runtime.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.tick().await;
        let mut seq = 1;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => {
                    probe_all(&addrs, seq).await;
                    seq += 1;
                }
            }
        }
        anyhow::Ok(())
    })?;

    let snap = stats::snapshot(&dp, &known)?;
    drop(dp);
    println!("sip-dispatch: exit-stats {}", serde_json::to_string(&snap)?);
    log::info!("detached from {}", args.iface);
    Ok(())
}

/// Probes every backend once, concurrently; logs the ones that do not answer.
async fn probe_all(backends: &[SocketAddr], round: u64) {
    let mut probes = tokio::task::JoinSet::new();
    for (i, b) in backends.iter().copied().enumerate() {
        let seq = round * backends.len() as u64 + i as u64;
        probes.spawn(async move { (b, health::probe(b, seq, PROBE_TIMEOUT).await) });
    }
    while let Some(Ok((b, result))) = probes.join_next().await {
        match result {
            Ok(Some(_)) => {}
            Ok(None) if round == 0 => log::warn!("backend {b} did not answer OPTIONS"),
            Ok(None) => log::debug!("backend {b} did not answer OPTIONS"),
            Err(e) => log::warn!("probing backend {b}: {e:#}"),
        }
    }
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
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })?;
    drop(ebpf);
    Ok(())
}
