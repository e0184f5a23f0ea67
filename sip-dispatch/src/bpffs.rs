//! The bpf filesystem the maps are pinned in.
use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path};

use anyhow::{Context as _, bail};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure `dir` exists on a bpf filesystem, mounting one at /sys/fs/bpf when the
/// directory lies below it and nothing is mounted there yet (a fresh machine, or the
/// private /sys of `ip netns exec`).
pub fn prepare_pin_dir(dir: &Path) -> anyhow::Result<()> {
    let default = Path::new(DEFAULT_MOUNT);
    if dir.starts_with(default) && !is_bpffs(default) {
        let src = CString::new("bpf").expect("static string");
        let target = CString::new(DEFAULT_MOUNT).expect("static string");
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mounting a bpf filesystem at {DEFAULT_MOUNT}"));
        }
        log::info!("mounted a bpf filesystem at {DEFAULT_MOUNT}");
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating pin directory {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!(
            "pin path {} is not on a bpf filesystem (mount -t bpf bpf DIR)",
            dir.display()
        );
    }
    Ok(())
}
