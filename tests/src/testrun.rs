//! BPF_PROG_TEST_RUN for XDP programs, shared by the kernel tests
//! (`sip-dispatch/tests/kernel/`) and the benchmark's per-packet cost (`sd-bench`): a
//! private network namespace for the calling thread with one veth, permanent neighbour
//! entries and forwarding on (so that `bpf_fib_lookup` answers as on a dispatcher), the
//! typed `xdp_md` context, and single and timed runs.
use std::{
    fs::File,
    marker::PhantomData,
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, bail};
#[cfg(feature = "testrun")]
pub use runner::{Runner, Timed, run_once};

use crate::{cmd, frames::mac_text};

/// XDP verdicts (`enum xdp_action`).
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The calling thread in a network namespace of its own (`unshare`), and back in the one
/// it came from on drop. What the thread spawns meanwhile (`ip`) runs in it too. Not
/// `Send`: it belongs to the thread that entered.
pub struct PrivateNetns {
    original: OwnedFd,
    _this_thread: PhantomData<*const ()>,
}

impl PrivateNetns {
    pub fn enter() -> Result<PrivateNetns> {
        let original = File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?;
        // SAFETY: unshare affects this thread (and what it spawns) only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        Ok(PrivateNetns {
            original: OwnedFd::from(original),
            _this_thread: PhantomData,
        })
    }
}

impl Drop for PrivateNetns {
    fn drop(&mut self) {
        // SAFETY: setns on an open namespace descriptor; it affects this thread only.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        // A thread left in the private namespace would run whatever comes next there.
        if rc != 0 && !std::thread::panicking() {
            panic!(
                "setns back to the original network namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// One veth (`name`, peer `peer`) in a [`PrivateNetns`]: its MAC, its own addresses
/// (`198.18.1.1/24`, `2001:db8:1::1/64`), permanent neighbour entries, forwarding on.
pub struct TestVeth<'a> {
    pub name: &'a str,
    pub peer: &'a str,
    pub mac: [u8; 6],
    pub neighbours: Vec<(IpAddr, [u8; 6])>,
}

/// The veth's own addresses: the outer source of `ipip`.
pub const OWN4: &str = "198.18.1.1";
pub const OWN6: &str = "2001:db8:1::1";

/// The calling thread's private namespace, set up; the veth's ifindex with it.
pub struct TestNet {
    pub ifindex: u32,
    _netns: PrivateNetns,
}

impl TestVeth<'_> {
    /// Moves the calling thread into a new namespace and builds the veth there.
    pub fn build(&self) -> Result<TestNet> {
        let netns = PrivateNetns::enter()?;
        cmd::run("ip", ["link", "set", "lo", "up"])?;
        cmd::run(
            "ip",
            [
                "link", "add", self.name, "type", "veth", "peer", "name", self.peer,
            ],
        )?;
        cmd::run(
            "ip",
            [
                "link",
                "set",
                self.name,
                "address",
                &mac_text(self.mac),
                "up",
            ],
        )?;
        cmd::run("ip", ["link", "set", self.peer, "up"])?;
        cmd::run(
            "ip",
            ["addr", "add", &format!("{OWN4}/24"), "dev", self.name],
        )?;
        cmd::run(
            "ip",
            [
                "-6",
                "addr",
                "add",
                &format!("{OWN6}/64"),
                "dev",
                self.name,
                "nodad",
            ],
        )?;
        for (ip, mac) in &self.neighbours {
            cmd::run(
                "ip",
                [
                    "neigh",
                    "add",
                    &ip.to_string(),
                    "lladdr",
                    &mac_text(*mac),
                    "dev",
                    self.name,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1")
            .context("turning forwarding on in the private namespace")?;
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
            .context("turning IPv6 forwarding on in the private namespace")?;
        let ifindex = if_index(self.name)?;
        Ok(TestNet {
            ifindex,
            _netns: netns,
        })
    }
}

/// The interface index of `name` in the calling thread's namespace.
pub fn if_index(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface {name}: {}", std::io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it (`ctx_in`). `data` and `data_meta` must
/// be 0, `data_end` the frame's length; the kernel rejects a set `egress_ifindex`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct XdpMd {
    pub data: u32,
    pub data_end: u32,
    pub data_meta: u32,
    pub ingress_ifindex: u32,
    pub rx_queue_index: u32,
    pub egress_ifindex: u32,
}

impl XdpMd {
    /// A frame of `len` bytes received on interface `ingress_ifindex`.
    pub fn frame(len: usize, ingress_ifindex: u32) -> XdpMd {
        XdpMd {
            data_end: len as u32,
            ingress_ifindex,
            ..XdpMd::default()
        }
    }

    pub fn to_bytes(self) -> Vec<u8> {
        [
            self.data,
            self.data_end,
            self.data_meta,
            self.ingress_ifindex,
            self.rx_queue_index,
            self.egress_ifindex,
        ]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
    }
}

/// Single and timed runs (the `testrun` feature: aya).
#[cfg(feature = "testrun")]
mod runner {
    use std::time::{Duration, Instant};

    use anyhow::{Context as _, Result};
    use aya::programs::{TestRun as _, TestRunOptions, Xdp};

    use super::XdpMd;
    use crate::cancel;

    /// Runs XDP programs on frames of one length arriving on one interface.
    pub struct Runner {
        ctx: Vec<u8>,
    }

    /// What `repeat` runs in the kernel took.
    #[derive(Clone, Copy, Debug)]
    pub struct Timed {
        /// Wall-clock ns per run around the syscall (includes time the thread was preempted).
        pub wall_ns: f64,
        /// ns per run as the kernel measures it.
        pub kernel_ns: u64,
        pub verdict: u32,
    }

    impl Runner {
        pub fn new(ifindex: u32, frame_len: usize) -> Runner {
            Runner {
                ctx: XdpMd::frame(frame_len, ifindex).to_bytes(),
            }
        }

        /// One run, returning the verdict and the frame it leaves.
        pub fn once(&self, prog: &Xdp, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
            run_once(prog, frame, &self.ctx)
        }

        /// `repeat` runs in the kernel.
        pub fn timed(&self, prog: &Xdp, frame: &[u8], repeat: u32) -> Result<Timed> {
            cancel::check()?;
            let started = Instant::now();
            let res = prog
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&self.ctx),
                    repeat,
                    ..Default::default()
                })
                .context("BPF_PROG_TEST_RUN")?;
            Ok(Timed {
                wall_ns: started.elapsed().as_nanos() as f64 / f64::from(repeat),
                kernel_ns: res.duration.as_nanos() as u64,
                verdict: res.return_value,
            })
        }

        /// The repeat count that makes one trial last about `target`.
        pub fn repeat_for(&self, prog: &Xdp, frame: &[u8], target: Duration) -> Result<u32> {
            let probe = 20_000;
            let ns = self.timed(prog, frame, probe)?.wall_ns;
            let want = target.as_nanos() as f64 / ns.max(0.1);
            Ok(want.clamp(f64::from(probe), 200_000_000.0) as u32)
        }
    }

    /// One run of `prog` on `frame` with the context `ctx` ([`XdpMd::to_bytes`]): the verdict
    /// and the frame it leaves.
    pub fn run_once(prog: &Xdp, frame: &[u8], ctx: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(ctx),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_md_is_six_words_in_the_kernel_order() {
        let bytes = XdpMd::frame(915, 7).to_bytes();
        assert_eq!(bytes.len(), 24);
        let words: Vec<u32> = bytes
            .chunks(4)
            .map(|w| u32::from_ne_bytes(w.try_into().unwrap()))
            .collect();
        assert_eq!(words, [0, 915, 0, 7, 0, 0]);
    }
}
