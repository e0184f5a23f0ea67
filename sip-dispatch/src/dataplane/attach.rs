//! Attaching XDP programs to interfaces, and the pinned link a restart takes over.
use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, xdp::DevMapHash},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use sip_dispatch_common::{MAP_TX_PORTS, PROG_PASS};

use super::{
    Dataplane,
    load::load_program,
    pins::{LINK_PIN, remove_pins},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Native,
    Skb,
}

impl AttachMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Skb => "skb",
        }
    }
}

/// The mode asked for: exactly one, or `Auto` (native, else skb).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeChoice {
    Auto,
    Only(AttachMode),
}

impl Dataplane {
    /// Attaches the dispatcher and pins the link. If a previous daemon left its link
    /// pinned, this program replaces the old one in it atomically instead (and the mode
    /// stays what it was). `Auto` tries native first, then skb.
    pub fn attach(&mut self, mode: ModeChoice) -> anyhow::Result<AttachMode> {
        if let Some(dir) = self.pin_dir.clone()
            && dir.join(LINK_PIN).exists()
        {
            return self.replace_pinned(&dir.join(LINK_PIN));
        }
        let got = self.attach_new(mode)?;
        if let Some(dir) = self.pin_dir.clone()
            && let Some(id) = self.link.take()
        {
            let prog = self.dispatch_program()?;
            let link = prog.take_link(id)?;
            let fd_link = FdLink::try_from(link).context("the kernel gave no bpf_link for XDP")?;
            let pinned = fd_link
                .pin(dir.join(LINK_PIN))
                .with_context(|| format!("pinning the XDP link in {}", dir.display()))?;
            self.link = Some(
                self.dispatch_program()?
                    .attach_to_link(XdpLink::try_from(FdLink::from(pinned))?)?,
            );
        }
        Ok(got)
    }

    /// Whether the pinned link opens as an XDP link (what `attach` will replace the
    /// program in), checked before anything is written.
    pub fn check_pinned_link(&self) -> anyhow::Result<()> {
        let Some(pin) = self.pin_dir.as_ref().map(|d| d.join(LINK_PIN)) else {
            return Ok(());
        };
        let pinned = PinnedLink::from_pin(&pin)
            .with_context(|| format!("opening the pinned link {}", pin.display()))?;
        XdpLink::try_from(FdLink::from(pinned))
            .with_context(|| format!("the pinned link {} is not an XDP link", pin.display()))?;
        Ok(())
    }

    fn replace_pinned(&mut self, pin: &Path) -> anyhow::Result<AttachMode> {
        let pinned = PinnedLink::from_pin(pin)
            .with_context(|| format!("opening the pinned link {}", pin.display()))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .context("the pinned link is not an XDP link")?;
        let id = self
            .dispatch_program()?
            .attach_to_link(link)
            .context("replacing the program in the pinned XDP link")?;
        self.link = Some(id);
        let mode = attached_mode(&self.iface);
        log::info!(
            "took over the XDP link pinned at {} ({} mode)",
            pin.display(),
            mode.name()
        );
        Ok(mode)
    }

    fn attach_new(&mut self, mode: ModeChoice) -> anyhow::Result<AttachMode> {
        let iface = self.iface.clone();
        let prog = self.dispatch_program()?;
        let attempt = |prog: &mut Xdp, m: AttachMode| {
            let flags = match m {
                AttachMode::Native => XdpMode::Driver,
                AttachMode::Skb => XdpMode::Skb,
            };
            prog.attach(&iface, flags)
        };
        let (link, got) = match mode {
            ModeChoice::Only(m) => (attempt(prog, m), m),
            ModeChoice::Auto => match attempt(prog, AttachMode::Native) {
                Ok(l) => (Ok(l), AttachMode::Native),
                Err(e) => {
                    log::info!("native XDP on {iface} failed ({e}); falling back to skb mode");
                    (attempt(prog, AttachMode::Skb), AttachMode::Skb)
                }
            },
        };
        let link =
            link.with_context(|| format!("attaching XDP to {iface} in {} mode", got.name()))?;
        self.link = Some(link);
        Ok(got)
    }

    /// Detaches on purpose (a clean stop without --keep-attached; a failed start uses
    /// `abandon`): closes our link fd and removes the pins, the link pin last of all
    /// holders, which detaches the program.
    pub fn detach(&mut self) {
        self.drop_link();
        if let Some(dir) = &self.pin_dir {
            remove_pins(dir);
        }
    }

    /// Detaches our link, if we attached one.
    pub(super) fn drop_link(&mut self) {
        if let Some(link) = self.link.take()
            && let Some(p) = self.ebpf.program_mut(self.scan_loop.program())
            && let Ok(prog) = <&mut Xdp>::try_from(p)
            && let Err(e) = prog.detach(link)
        {
            log::warn!("detaching XDP from {}: {e}", self.iface);
        }
    }

    /// Lets XDP_REDIRECT reach this interface.
    pub fn add_tx_port(&mut self, ifindex: u32) -> anyhow::Result<()> {
        let mut ports: DevMapHash<&mut MapData> =
            DevMapHash::try_from(self.map_mut(MAP_TX_PORTS)?)?;
        ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }
}

/// The mode the XDP program on `iface` runs in, as `ip link` reports it.
fn attached_mode(iface: &str) -> AttachMode {
    let out = std::process::Command::new("ip")
        .args(["-d", "link", "show", "dev", iface])
        .output();
    match out {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("xdpgeneric") => AttachMode::Skb,
        _ => AttachMode::Native,
    }
}

/// Attaches the pass-everything program to `iface` (see [`attach_program`]).
pub fn attach_pass(iface: &str) -> anyhow::Result<(Ebpf, XdpLinkId)> {
    attach_program(iface, PROG_PASS)
}

/// Attaches XDP program `name` of the object (`xdp_pass`, `ipip_decap`: programs
/// without maps of their own) to `iface` (kernel's choice of mode) and returns what keeps
/// it attached.
pub fn attach_program(iface: &str, name: &str) -> anyhow::Result<(Ebpf, XdpLinkId)> {
    let mut ebpf = load_program(name)?;
    let link = attach_loaded(&mut ebpf, iface, name)?;
    Ok((ebpf, link))
}

/// Attaches the XDP program `name` of `ebpf`, loaded already, to `iface`.
pub fn attach_loaded(ebpf: &mut Ebpf, iface: &str, name: &str) -> anyhow::Result<XdpLinkId> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
        .try_into()?;
    prog.attach(iface, XdpMode::Default)
        .with_context(|| format!("attaching {name} to {iface}"))
}
