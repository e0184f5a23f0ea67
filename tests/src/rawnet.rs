//! Raw network plumbing for test threads (the flood, slow-path and endpoint tests, the
//! responder) and the benchmark (`sd-bench`): entering a namespace (or running a closure on
//! a thread inside one), pinning to a CPU, socket options, and an AF_PACKET socket that
//! writes frames straight into a veth.
use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context as _, Result, anyhow, bail};

/// Moves the calling thread into the named network namespace (`/run/netns/NAME`).
pub fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on an open namespace file; it affects the calling thread only.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({path}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a short-lived thread inside the network namespace `ns` and returns what it
/// returns. Sockets `f` creates belong to `ns`, whichever thread uses them later.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || -> Result<T> {
        enter_netns(&ns)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("the thread in the namespace panicked"))?
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_setaffinity(0) is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `setsockopt(fd, level, name, value)` for a plain-data option value.
pub fn set_option<T>(
    fd: &impl AsRawFd,
    level: i32,
    name: i32,
    value: &T,
    what: &str,
) -> Result<()> {
    // SAFETY: `value` points at a live `T` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("setsockopt {what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// An AF_PACKET socket that writes whole frames into interface `dev` (of the calling
/// thread's namespace), bypassing the qdisc, and the address to send them to. Blocked
/// sends give up after 100 ms, so that the sender sees a stop request or a deadline.
pub fn packet_socket(dev: &str) -> Result<(OwnedFd, libc::sockaddr_ll)> {
    // Protocol 0: the socket sends only and never receives a copy of the traffic.
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("interface {dev} not found");
    }
    let one: libc::c_int = 1;
    set_option(
        &fd,
        libc::SOL_PACKET,
        libc::PACKET_QDISC_BYPASS,
        &one,
        "PACKET_QDISC_BYPASS",
    )?;
    // Blocked sends give up after 100 ms, so that a stop request is seen.
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    set_option(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_SNDTIMEO,
        &timeout,
        "SO_SNDTIMEO",
    )?;
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    Ok((fd, addr))
}
