//! `sip-dispatch run`: the CLI's side of the daemon - settings, signals, the wait for a
//! stop and the stop itself; the start-up sequence is [`Controller::start`]. `detach`,
//! `xdp-pass` and `decap` are in `run/programs.rs`.
use std::{ffi::CString, io::Write as _};

use anyhow::{Context as _, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::{RunArgs, XdpModeArg},
    config::Settings,
    control,
    controller::{Controller, Started},
    dataplane::{AttachMode, ModeChoice},
    metrics, notify,
    sysctl::Forwarding,
};

mod programs;

pub use programs::{decap, detach, xdp_pass};

pub(crate) fn ifindex(iface: &str) -> anyhow::Result<u32> {
    let name = CString::new(iface).with_context(|| format!("invalid interface name {iface:?}"))?;
    // SAFETY: `name` is a NUL-terminated string that lives across the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => bail!("interface {iface:?} not found"),
        i => Ok(i),
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = Settings::load(&args)?;
    if settings.iface == "lo" {
        bail!("refusing to attach to lo: XDP dispatch needs a real or veth interface");
    }
    ifindex(&settings.iface)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_daemon(settings, args))
}

async fn run_daemon(settings: Settings, args: RunArgs) -> anyhow::Result<()> {
    // Handlers first: SIGTERM or SIGINT during start-up then means a clean stop as soon as
    // the daemon runs (not death by the default action, half started), and SIGHUP (say a
    // `systemctl reload` right after start) does not kill it.
    let stop = stop_signal()?;
    let _hangup_before_run =
        signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let iface = settings.iface.clone();
    let control_path = settings.control.clone();
    let keep_attached = settings.keep_attached;
    let xdp_mode = mode_choice(settings.xdp_mode);
    let Started {
        controller: mut ctl,
        control_listener,
        metrics_listener,
        slow_path: slow,
        next_hops,
        ip_forwarding,
        state_lock: _state_lock,
    } = Controller::start(settings, args, xdp_mode).await?;
    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::channel(16);
    let metrics_task = metrics_listener.map(|l| tokio::spawn(metrics::serve(l, cmd_tx.clone())));
    let control_task = tokio::spawn(control::serve(control_listener, cmd_tx));
    ctl.run(cmd_rx, async move {
        tokio::select! {
            () = stop => {}
            () = injected_panic() => {}
        }
    })
    .await;
    notify::stopping();
    control_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&control_path);
    for task in slow {
        task.abort();
    }

    // The follower leaves every entry invalid; it stops while this daemon still holds the
    // pin directory's lock, so that it never writes over a next daemon's entries.
    drop(next_hops);
    // A clean stop: the only place that detaches (a crash or a failed start never does).
    let snap = ctl.snapshot();
    if keep_attached {
        log::info!(
            "leaving XDP attached on {iface} with the last tables (sip-dispatch detach --iface {iface} removes it)"
        );
    } else {
        ctl.dataplane().detach();
        ip_forwarding.into_iter().for_each(Forwarding::restore);
        log::info!("detached from {iface}");
    }
    drop(ctl);
    println!(
        "sip-dispatch: exit-stats {}",
        serde_json::to_string(&snap?)?
    );
    Ok(())
}

/// The dataplane's attach mode for `--xdp-mode`.
fn mode_choice(arg: XdpModeArg) -> ModeChoice {
    match arg {
        XdpModeArg::Auto => ModeChoice::Auto,
        XdpModeArg::Native => ModeChoice::Only(AttachMode::Native),
        XdpModeArg::Skb => ModeChoice::Only(AttachMode::Skb),
    }
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

/// Debug builds only (tests): with `SIP_DISPATCH_TEST_PANIC_AFTER_MS=N` in the
/// environment, the daemon panics in its controller task N ms after it is ready, so a
/// test can check that a panic at run time leaves forwarding running. Release builds
/// have no such switch: this never resolves there.
async fn injected_panic() {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("SIP_DISPATCH_TEST_PANIC_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        panic!("injected by SIP_DISPATCH_TEST_PANIC_AFTER_MS={ms}");
    }
    std::future::pending::<()>().await
}

/// The one line on stdout that scripts and tests wait for, and READY=1 to systemd.
pub(crate) fn ready(details: &str) {
    println!("sip-dispatch: ready {details}");
    let _ = std::io::stdout().flush();
    notify::ready(details);
}
