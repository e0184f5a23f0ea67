//! The subcommands besides `run`: `detach`, and `xdp-pass` and `decap`, which hold one
//! XDP program on an interface until SIGINT/SIGTERM.
use anyhow::{Context as _, bail};

use super::{ifindex, ready, stop_signal};
use crate::{
    cli::{DecapArgs, DetachArgs, XdpPassArgs},
    dataplane::{attach_loaded, attach_program, load_decap},
};

/// `sip-dispatch detach`: removes the pinned link (detaching the program) and the maps.
pub fn detach(args: DetachArgs) -> anyhow::Result<()> {
    let dir = args.pin_path.unwrap_or_else(|| {
        std::path::PathBuf::from(format!("/sys/fs/bpf/sip-dispatch/{}", args.iface))
    });
    crate::bpffs::prepare_pin_dir(&dir)?;
    // Not from under a running daemon: its link fd would keep the program attached.
    let _lock = crate::bpffs::lock_pin_dir(&dir)?;
    match crate::dataplane::remove_pins(&dir) {
        0 => bail!("nothing is pinned in {}", dir.display()),
        n => println!(
            "removed {n} pins from {}; XDP is detached from {}",
            dir.display(),
            args.iface
        ),
    }
    Ok(())
}

pub fn xdp_pass(args: XdpPassArgs) -> anyhow::Result<()> {
    hold_program(&args.iface, sip_dispatch_common::PROG_PASS)
}

pub fn decap(args: DecapArgs) -> anyhow::Result<()> {
    if args.iface == "lo" {
        bail!(
            "refusing to attach to lo: decapsulate on the interface the tunnel packets arrive on"
        );
    }
    let iface = &args.iface;
    let name = sip_dispatch_common::PROG_DECAP;
    ifindex(iface)?;
    let mut ebpf = load_decap(&args.from)?;
    let _link = attach_loaded(&mut ebpf, iface, name)?;
    let from: Vec<String> = args.from.iter().map(ToString::to_string).collect();
    log::info!(
        "decapsulating IP-in-IP on {iface} from {} only; from any other source it passes untouched",
        from.join(", ")
    );
    ready(&format!("iface={iface} program={name}"));
    wait_for_stop()?;
    drop(ebpf);
    Ok(())
}

/// Attaches XDP program `name` to `iface` and holds it until SIGINT/SIGTERM.
fn hold_program(iface: &str, name: &str) -> anyhow::Result<()> {
    ifindex(iface)?;
    let (ebpf, _link) = attach_program(iface, name)?;
    ready(&format!("iface={iface} program={name}"));
    wait_for_stop()?;
    drop(ebpf);
    Ok(())
}

/// Returns at SIGINT/SIGTERM.
fn wait_for_stop() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        stop_signal()?.await;
        anyhow::Ok(())
    })
}
