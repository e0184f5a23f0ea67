//! The embedded XDP object, loading it, and which dispatcher program the kernel gets.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::Xdp,
};
use sip_dispatch_common::{
    DecapSource, GLOBAL_AFFINITY_ON, HashKey, MAP_AFFINITY, MAP_DECAP_FROM, MAX_BACKENDS,
    MAX_DECAP_SOURCES, PROG_DECAP, PROG_DISPATCH, PROG_DISPATCH_CALLBACK, PROG_MAY_GOTO_PROBE,
};

use super::{Affinity, Dataplane};

/// The XDP object built from the sip-dispatch-ebpf crate by build.rs.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sip-dispatch"));

/// The benchmarks' MAC-swap baseline, an object of its own built beside [`OBJECT`].
#[cfg(feature = "mac-swap")]
pub(super) static MAC_SWAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mac-swap"));

/// Setting this environment variable to `1` makes the daemon load the `bpf_loop`
/// dispatcher even on a kernel that knows `may_goto` (tests of the fallback).
pub const ENV_FORCE_BPF_LOOP: &str = "SIP_DISPATCH_FORCE_BPF_LOOP";

/// How the dispatcher's Call-ID and To-tag scans loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanLoop {
    /// Inside the program, bounded by `may_goto` (kernel 6.9+): no call per step.
    MayGoto,
    /// In `bpf_loop` callbacks, a few scanner steps per call (kernel 5.17+).
    BpfLoop,
}

impl ScanLoop {
    pub fn name(self) -> &'static str {
        match self {
            ScanLoop::MayGoto => "may_goto",
            ScanLoop::BpfLoop => "bpf_loop",
        }
    }

    pub(super) fn program(self) -> &'static str {
        match self {
            ScanLoop::MayGoto => PROG_DISPATCH,
            ScanLoop::BpfLoop => PROG_DISPATCH_CALLBACK,
        }
    }

    /// `may_goto` when the kernel loads the probe program, unless [`ENV_FORCE_BPF_LOOP`]
    /// is `1`.
    fn choose(ebpf: &mut Ebpf) -> ScanLoop {
        if std::env::var(ENV_FORCE_BPF_LOOP).is_ok_and(|v| v == "1") {
            log::info!("{ENV_FORCE_BPF_LOOP}=1: the scans loop with bpf_loop");
            return ScanLoop::BpfLoop;
        }
        let probe = ebpf
            .program_mut(PROG_MAY_GOTO_PROBE)
            .and_then(|p| <&mut Xdp>::try_from(p).ok());
        let Some(probe) = probe else {
            log::warn!("program {PROG_MAY_GOTO_PROBE} missing: the scans loop with bpf_loop");
            return ScanLoop::BpfLoop;
        };
        match load_retrying(probe) {
            Ok(()) => {
                // Only a probe: its fd is not needed any more.
                let _ = probe.unload();
                ScanLoop::MayGoto
            }
            Err(e) => {
                log::info!("the kernel does not load may_goto ({e}): the scans loop with bpf_loop");
                ScanLoop::BpfLoop
            }
        }
    }
}

impl Dataplane {
    /// Loads the object with private, unpinned maps (kernel tests, benchmarks). Its
    /// link, once attached, goes when the value is dropped.
    pub fn load_unpinned(key: HashKey, affinity: Affinity) -> anyhow::Result<Self> {
        let on = u8::from(affinity.on);
        let ebpf = EbpfLoader::new()
            .map_max_entries(MAP_AFFINITY, affinity.map_entries())
            .override_global(GLOBAL_AFFINITY_ON, &on, true)
            .load(OBJECT)
            .context("loading the XDP object")?;
        let mut dp = Self::init(ebpf, None, "", key, affinity)?;
        dp.write_hash_key()?;
        Ok(dp)
    }

    pub(super) fn init(
        ebpf: Ebpf,
        pin_dir: Option<PathBuf>,
        iface: &str,
        key: HashKey,
        affinity: Affinity,
    ) -> anyhow::Result<Self> {
        let mut dp = Dataplane {
            ebpf,
            pin_dir,
            iface: iface.to_string(),
            link: None,
            key,
            _pin_lock: None,
            found_pins: Vec::new(),
            affinity,
            forwarding: BTreeMap::new(),
            flags_written: vec![None; MAX_BACKENDS as usize],
            scan_loop: ScanLoop::BpfLoop,
            next_hop_targets: Default::default(),
        };
        dp.scan_loop = ScanLoop::choose(&mut dp.ebpf);
        log::info!(
            "loading {} (the scans loop with {})",
            dp.scan_loop.program(),
            dp.scan_loop.name()
        );
        load_retrying(dp.dispatch_program()?)
            .context("the kernel verifier rejected the XDP program")?;
        // Loaded for the held-call census (`crate::census`), never attached.
        load_retrying(census_program(&mut dp.ebpf)?)
            .context("the kernel verifier rejected the census program")?;
        Ok(dp)
    }

    /// The dispatcher program (loaded into the kernel by `load`): `sip_dispatch`, or
    /// `sip_dispatch_cb` on kernels without `may_goto` (see [`ScanLoop`]).
    pub fn dispatch_program(&mut self) -> anyhow::Result<&mut Xdp> {
        let name = self.scan_loop.program();
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
            .try_into()?)
    }

    /// How the loaded dispatcher's scans loop.
    pub fn scan_loop(&self) -> ScanLoop {
        self.scan_loop
    }
}

pub(super) fn census_program(ebpf: &mut Ebpf) -> anyhow::Result<&mut Xdp> {
    use sip_dispatch_common::census::PROG_CENSUS;
    Ok(ebpf
        .program_mut(PROG_CENSUS)
        .ok_or_else(|| anyhow!("program {PROG_CENSUS} missing from the XDP object"))?
        .try_into()?)
}

/// Loads the object with private, unpinned maps and loads only the XDP program `name`
/// into the kernel. Get it back with `ebpf.program_mut(name)` to test-run or attach it.
pub fn load_program(name: &str) -> anyhow::Result<Ebpf> {
    load_program_of(OBJECT, name)
}

/// Loads the benchmarks' MAC-swap baseline ([`PROG_MAC_SWAP`], from its own object) into
/// the kernel; get it back with `ebpf.program_mut(PROG_MAC_SWAP)`.
///
/// [`PROG_MAC_SWAP`]: sip_dispatch_common::PROG_MAC_SWAP
#[cfg(feature = "mac-swap")]
pub fn load_mac_swap() -> anyhow::Result<Ebpf> {
    load_program_of(MAC_SWAP_OBJECT, sip_dispatch_common::PROG_MAC_SWAP)
}

fn load_program_of(object: &[u8], name: &str) -> anyhow::Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .load(object)
        .context("loading the XDP object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
        .try_into()?;
    load_retrying(prog).with_context(|| format!("loading {name}"))?;
    Ok(ebpf)
}

/// Loads `ipip_decap` with private, unpinned maps and fills its accepted outer sources
/// (`decap --from`; at most [`MAX_DECAP_SOURCES`] distinct ones). Attach it with
/// [`attach_loaded`], or get it back with `ebpf.program_mut(PROG_DECAP)` to test-run it.
pub fn load_decap(from: &[IpAddr]) -> anyhow::Result<Ebpf> {
    let from: BTreeSet<IpAddr> = from.iter().copied().collect();
    if from.len() > MAX_DECAP_SOURCES as usize {
        bail!(
            "{} decap sources given, at most {MAX_DECAP_SOURCES} are accepted",
            from.len()
        );
    }
    let mut ebpf = load_program(PROG_DECAP)?;
    let map = ebpf
        .map_mut(MAP_DECAP_FROM)
        .ok_or_else(|| anyhow!("map {MAP_DECAP_FROM} missing from the XDP object"))?;
    let mut map: HashMap<&mut MapData, DecapSource, u8> = HashMap::try_from(map)?;
    for ip in from {
        map.insert(DecapSource::new(ip), 1, 0)
            .with_context(|| format!("adding decap source {ip} to {MAP_DECAP_FROM}"))?;
    }
    Ok(ebpf)
}

/// Loads `prog` into the kernel, again when the verifier was interrupted: it gives up
/// with EAGAIN when a signal is pending for the loading thread (a child process of
/// another thread exiting, say), which a long verification (hundreds of ms for the
/// `bpf_loop` dispatcher) meets now and then. libbpf retries the same way, 5 attempts.
pub(super) fn load_retrying(prog: &mut Xdp) -> Result<(), aya::programs::ProgramError> {
    let mut attempts = 5;
    loop {
        match prog.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts > 1 =>
            {
                attempts -= 1;
                log::debug!("the verifier was interrupted (EAGAIN): loading again");
            }
            other => return other,
        }
    }
}
