//! The bpf filesystem the maps are pinned in.
use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path};

use anyhow::{Context as _, bail};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data; an all-zero value is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statfs.
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
        // SAFETY: valid NUL-terminated strings; a null data pointer is allowed.
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

/// An exclusive `flock` on the pin directory, held for the daemon's life: a second
/// daemon (or `detach`) on the same pins refuses to start. The kernel releases it when
/// the holder exits, however it exits (SIGKILL, abort), so a crash leaves no stale lock.
#[derive(Debug)]
pub struct PinDirLock {
    _dir: std::os::fd::OwnedFd,
}

/// Takes the lock on `dir` (which must exist) without waiting; the error names the
/// directory and, when /proc/locks tells, the pid that holds it.
pub fn lock_pin_dir(dir: &Path) -> anyhow::Result<PinDirLock> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let c = CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("invalid pin path {}", dir.display()))?;
    // O_CLOEXEC: a child process (ip, ...) must not inherit and outlive the lock.
    // SAFETY: `c` is a valid NUL-terminated path; the result is checked below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening the pin directory {}", dir.display()));
    }
    // SAFETY: `fd` was just opened by us and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: flock on a valid fd we own.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let holder = lock_holder(dir).map_or(String::new(), |pid| format!(" (pid {pid})"));
            bail!(
                "the pin directory {} is locked by another sip-dispatch{holder}: one daemon per pin directory (stop it first, or give this one another --pin-path)",
                dir.display()
            );
        }
        return Err(err).with_context(|| format!("locking the pin directory {}", dir.display()));
    }
    Ok(PinDirLock { _dir: fd })
}

/// The pid holding a flock on `dir`, from /proc/locks (`N: FLOCK ADVISORY WRITE PID
/// MAJ:MIN:INODE ...`, device numbers in hex).
fn lock_holder(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(dir).ok()?;
    let dev = meta.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    parse_lock_holder(&locks, &want)
}

fn parse_lock_holder(locks: &str, inode: &str) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1:" "FLOCK" "ADVISORY" "WRITE" pid dev:ino ...; blocked waiters have "->" first.
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, id, ..] if *id == inode => pid.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:28:53903 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 24380 00:28:53903 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 99 00:28:1 0 EOF\n";
        assert_eq!(parse_lock_holder(locks, "00:28:53903"), Some(24380));
        assert_eq!(parse_lock_holder(locks, "00:28:2"), None);
        assert_eq!(parse_lock_holder("garbage\n\n1:", "00:28:1"), None);
    }

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_and_names_it() {
        let dir = std::env::temp_dir().join(format!("sd-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let first = lock_pin_dir(&dir).expect("first lock");
        let err = lock_pin_dir(&dir).expect_err("second lock must fail");
        let msg = format!("{err:#}");
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        drop(first);
        let again = lock_pin_dir(&dir).expect("lock after release");
        drop(again);
        let _ = std::fs::remove_dir(&dir);
    }
}
