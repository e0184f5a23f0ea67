//! Work done inside the test bed's network namespaces by threads of this process: a
//! thread that enters a namespace (`setns`) creates its sockets and XDP attachments
//! there. Used for the backends' OPTIONS responders, the UDP socket on the VIP, and for
//! holding XDP programs attached (MAC swap, XDP_PASS on the veth peer).
//!
//! Every thread is stopped (and joined) by its handle, also on drop, so nothing outlives
//! the namespace it was started in.
use std::{
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
pub use sip_dispatch_testbed::rawnet::{enter_netns as enter, pin_to_cpu, set_option};

/// The kernel's id of the calling thread.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Datagram buffers with the iovecs and headers `recvmmsg`/`sendmmsg` take. The headers
/// point into the buffers (whose storage never moves) and at `name` if given.
pub struct MsgBatch {
    pub bufs: Vec<Vec<u8>>,
    _iovs: Vec<libc::iovec>,
    pub msgs: Vec<libc::mmsghdr>,
}

impl MsgBatch {
    pub fn new(mut bufs: Vec<Vec<u8>>, name: Option<&mut libc::sockaddr_ll>) -> MsgBatch {
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let name: *mut libc::sockaddr_ll = name.map_or(std::ptr::null_mut(), |n| n);
        let msgs = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; a zeroed one is valid before the fields are set.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                if !name.is_null() {
                    m.msg_hdr.msg_name = name.cast();
                    m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
                }
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        MsgBatch {
            bufs,
            _iovs: iovs,
            msgs,
        }
    }
}

/// What a namespace thread's body gets: its stop flag and the way to say it is ready.
pub struct Ctl {
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<u64>,
}

impl Ctl {
    /// Tells the starter that the thread is set up, with one value (an id) for it.
    pub fn ready(&self, value: u64) {
        let _ = self.ready.send(value);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Waits until asked to stop.
    pub fn park(&self) {
        while !self.stopped() {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A thread running inside a network namespace until stopped.
pub struct NsThread<T> {
    name: String,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<T>>>,
    /// The value the body passed to [`Ctl::ready`].
    pub value: u64,
}

impl<T: Send + 'static> NsThread<T> {
    /// Starts `body` in a new thread that entered `ns`, and waits (up to 10 s) until the
    /// body calls [`Ctl::ready`]; an error of the body before that is returned here.
    pub fn spawn(
        ns: &str,
        name: &str,
        body: impl FnOnce(&Ctl) -> Result<T> + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let ctl = Ctl {
            stop: stop.clone(),
            ready: tx,
        };
        let ns_name = ns.to_owned();
        let handle = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                enter(&ns_name)?;
                body(&ctl)
            })
            .with_context(|| format!("starting thread {name}"))?;
        let mut t = NsThread {
            name: name.to_owned(),
            stop,
            handle: Some(handle),
            value: 0,
        };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(v) => {
                t.value = v;
                Ok(t)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => match t.join() {
                Err(e) => Err(e),
                Ok(_) => bail!("{name} ended before it was ready"),
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("{name} was not ready within 10 s")
            }
        }
    }

    /// Whether the body is still running.
    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Asks the thread to stop and returns what its body returned.
    pub fn stop(mut self) -> Result<T> {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }

    fn join(&mut self) -> Result<T> {
        let handle = self.handle.take().context("thread already joined")?;
        handle
            .join()
            .map_err(|_| anyhow!("thread {} panicked", self.name))?
            .with_context(|| format!("thread {}", self.name))
    }
}

impl<T> Drop for NsThread<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A classic BPF socket filter that keeps only datagrams whose payload starts with
/// "OPTI": a backend's responder then never wakes up for the flood of INVITEs, which the
/// kernel drops at the socket (UDP socket filters see the datagram from its UDP header,
/// so the payload starts at byte 8).
fn keep_only_options(sock: &UdpSocket) -> Result<()> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let mut code = [
        op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 8),
        op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            1,
            u32::from_be_bytes(*b"OPTI"),
        ),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
    ];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // The kernel copies the program.
    set_option(
        sock,
        libc::SOL_SOCKET,
        libc::SO_ATTACH_FILTER,
        &prog,
        "SO_ATTACH_FILTER",
    )
}

/// The 200 OK to an OPTIONS (a health check), echoing Via, From, To, Call-ID and CSeq.
pub fn options_response(request: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(request).ok()?;
    if !text.starts_with("OPTIONS ") {
        return None;
    }
    let mut out = String::from("SIP/2.0 200 OK\r\n");
    for line in text.lines().skip(1) {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "via" | "v" | "from" | "f" | "call-id" | "i" | "cseq" => {
                out.push_str(line);
                out.push_str("\r\n");
            }
            "to" | "t" if !value.contains(";tag=") => {
                out.push_str(&format!("{line};tag=sd-bench\r\n"));
            }
            "to" | "t" => {
                out.push_str(line);
                out.push_str("\r\n");
            }
            _ => {}
        }
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    Some(out.into_bytes())
}

/// A backend for the throughput runs: answers the dispatcher's OPTIONS on `addr`, while
/// its socket filter lets the kernel drop everything else. Returns the OPTIONS answered.
pub fn options_responder(ns: &str, addr: SocketAddr) -> Result<NsThread<u64>> {
    NsThread::spawn(ns, &format!("responder-{addr}"), move |ctl| {
        let sock = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
        keep_only_options(&sock)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        ctl.ready(0);
        let mut buf = vec![0u8; 65536];
        let mut answered = 0;
        while !ctl.stopped() {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(resp) = options_response(&buf[..n]) {
                        sock.send_to(&resp, from)?;
                        answered += 1;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context("receiving"),
            }
        }
        Ok(answered)
    })
}

/// A UDP socket on `addr` that only counts what the kernel stack delivers to it, read in
/// batches (recvmmsg) on a thread pinned to `cpu`. `count` is updated as it goes; the
/// thread's value is its thread id (for CPU accounting).
pub fn udp_sink(
    ns: &str,
    addr: SocketAddr,
    cpu: usize,
    count: Arc<AtomicU64>,
) -> Result<NsThread<()>> {
    NsThread::spawn(ns, &format!("sink-{addr}"), move |ctl| {
        pin_to_cpu(cpu)?;
        let sock = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
        let size: libc::c_int = 8 << 20;
        set_option(
            &sock,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size,
            "SO_RCVBUFFORCE",
        )?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        ctl.ready(gettid() as u64);
        const BATCH: usize = 64;
        let mut batch = MsgBatch::new(vec![vec![0u8; 2048]; BATCH], None);
        while !ctl.stopped() {
            // SAFETY: `msgs` points at BATCH headers with live buffers.
            let n = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    batch.msgs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if n > 0 {
                count.fetch_add(n as u64, Ordering::Relaxed);
            } else if n < 0 {
                let e = std::io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) {
                    return Err(e).context("recvmmsg");
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_get_a_matching_200() {
        let req = b"OPTIONS sip:198.18.0.21:5060 SIP/2.0\r\n\
            Via: SIP/2.0/UDP 198.18.0.2:40000;branch=z9hG4bK-abc\r\n\
            Max-Forwards: 70\r\n\
            From: <sip:sip-dispatch@198.18.0.2>;tag=x1\r\n\
            To: <sip:198.18.0.21:5060>\r\n\
            Call-ID: hc-1@198.18.0.2\r\n\
            CSeq: 7 OPTIONS\r\n\
            Content-Length: 0\r\n\r\n";
        let resp = String::from_utf8(options_response(req).unwrap()).unwrap();
        assert!(resp.starts_with("SIP/2.0 200 OK\r\n"));
        assert!(resp.contains("Via: SIP/2.0/UDP 198.18.0.2:40000;branch=z9hG4bK-abc\r\n"));
        assert!(resp.contains("To: <sip:198.18.0.21:5060>;tag=sd-bench\r\n"));
        assert!(resp.contains("Call-ID: hc-1@198.18.0.2\r\n"));
        assert!(resp.contains("CSeq: 7 OPTIONS\r\n"));
        assert!(!resp.contains("Max-Forwards"));
        assert!(resp.ends_with("Content-Length: 0\r\n\r\n"));
        assert!(options_response(b"INVITE sip:x SIP/2.0\r\n\r\n").is_none());
    }
}
