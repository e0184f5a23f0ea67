//! Builds the XDP program (the `sip-dispatch-ebpf` crate) for the BPF target with the
//! nightly toolchain and bpf-linker; `src/dataplane/load.rs` embeds the object.
//! `cargo xtask` installs that toolchain on a fresh machine.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "sip-dispatch-ebpf")
        .context("sip-dispatch-ebpf package not found in the workspace")?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .context("sip-dispatch-ebpf manifest has no parent directory")?;
    let package = Package {
        name: "sip-dispatch-ebpf",
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default()).map_err(|e| anyhow!("{e:#}"))
}
