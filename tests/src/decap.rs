//! A userspace stand-in for the `tunl0` / `ip6tnl0` device of an ipip backend. The
//! kernel of this project's machines is built without IP-in-IP tunnels
//! (`CONFIG_NET_IPIP` and `CONFIG_IPV6_TUNNEL` unset: `ip link add type ipip` answers
//! "Unknown device type"), so a backend namespace cannot decapsulate by itself. A thread
//! in the backend's namespace receives IP-in-IP packets (protocol 4, next header 41) on
//! raw sockets, after the kernel reassembled the outer packet, strips the outer header
//! and writes the inner datagram unchanged into a TUN device, from which the backend's
//! stack receives it as from the tunnel device (with `rp_filter` off on it).
use std::{
    fs::OpenOptions,
    io::Write as _,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{cmd, rawnet};

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

pub struct Decapsulator {
    stop: Arc<AtomicBool>,
    decapsulated: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Decapsulator {
    /// Creates TUN device `tun` in namespace `ns` (up, `rp_filter` 0) and starts
    /// decapsulating IPv4-in-IPv4 and IPv6-in-IPv6 into it.
    pub fn start(ns: &str, tun: &str) -> Result<Decapsulator> {
        anyhow::ensure!(
            tun.len() < libc::IFNAMSIZ,
            "{tun:?}: interface name too long"
        );
        let (ns, tun) = (ns.to_owned(), tun.to_owned());
        let stop = Arc::new(AtomicBool::new(false));
        let decapsulated = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, decapsulated) = (stop.clone(), decapsulated.clone());
            std::thread::spawn(move || -> Result<()> {
                let setup = (|| {
                    rawnet::enter_netns(&ns)?;
                    let dev = open_tun(&tun)?;
                    cmd::run("ip", ["link", "set", &tun, "mtu", "65535", "up"])?;
                    cmd::run(
                        "sysctl",
                        ["-qw", &format!("net.ipv4.conf.{tun}.rp_filter=0")],
                    )?;
                    let v4 = raw_socket(libc::AF_INET, libc::IPPROTO_IPIP)?;
                    let v6 = raw_socket(libc::AF_INET6, libc::IPPROTO_IPV6)?;
                    anyhow::Ok((dev, v4, v6))
                })();
                let (mut dev, v4, v6) = match setup {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    let mut fds = [
                        libc::pollfd {
                            fd: v4.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: v6.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: `fds` is an array of two pollfd for the call.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 20) };
                    if n <= 0 {
                        continue;
                    }
                    for (i, fd) in fds.iter().enumerate() {
                        if fd.revents & libc::POLLIN == 0 {
                            continue;
                        }
                        // SAFETY: `buf` is valid for writes of its length.
                        let got = unsafe {
                            libc::recv(
                                fd.fd,
                                buf.as_mut_ptr().cast(),
                                buf.len(),
                                libc::MSG_DONTWAIT,
                            )
                        };
                        let Ok(got) = usize::try_from(got) else {
                            continue;
                        };
                        let packet = &buf[..got];
                        // An IPv4 raw socket hands over the outer header, an IPv6 one
                        // only the payload (the inner datagram).
                        let inner = if i == 0 {
                            let hlen = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
                            packet.get(hlen..).unwrap_or_default()
                        } else {
                            packet
                        };
                        if !inner.is_empty() {
                            dev.write_all(inner)
                                .context("writing into the TUN device")?;
                            decapsulated.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(())
            })
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("starting the decapsulator: {e}"),
            Err(_) => return Err(anyhow!("the decapsulator thread ended before it was ready")),
        }
        Ok(Decapsulator {
            stop,
            decapsulated,
            thread: Some(thread),
        })
    }

    /// Inner datagrams written into the TUN device so far.
    pub fn decapsulated(&self) -> u64 {
        self.decapsulated.load(Ordering::Relaxed)
    }
}

impl Drop for Decapsulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("testbed: decapsulator: {e:#}"),
                Err(_) => eprintln!("testbed: decapsulator thread panicked"),
            }
        }
    }
}

fn open_tun(name: &str) -> Result<std::fs::File> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    // struct ifreq: the name, then (in the union) the flags.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `ifr` is large enough for.
    if unsafe { libc::ioctl(dev.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } != 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(dev)
}

fn raw_socket(family: i32, proto: i32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        bail!(
            "raw socket of protocol {proto}: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a new fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    rawnet::set_option(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        &(4i32 << 20),
        "SO_RCVBUF",
    )?;
    Ok(fd)
}
