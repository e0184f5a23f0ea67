//! A SIP endpoint for many addresses at once, inside a namespace: it answers every
//! OPTIONS with `200 OK` from the address it was sent to (one socket per address, so a
//! connected health-check socket accepts the answer) and records when each other
//! request arrived, by Call-ID. SIPp binds one address; the table-build test needs
//! hundreds of healthy backends.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::rawnet;

/// A UDP socket bound to `addr` inside namespace `ns` (made on a short-lived thread).
pub fn udp_socket_in(ns: &str, addr: SocketAddr) -> Result<UdpSocket> {
    let name = ns.to_owned();
    rawnet::in_netns(ns, move || {
        UdpSocket::bind(addr).with_context(|| format!("binding {addr} in {name}"))
    })?
}

/// What the responder saw.
#[derive(Default)]
pub struct Seen {
    /// OPTIONS answered.
    pub options: AtomicU64,
    /// Other requests: Call-ID → (arrival, address it arrived at).
    pub requests: Mutex<BTreeMap<String, (Instant, SocketAddr)>>,
}

/// A running responder; stopped on drop.
pub struct Responder {
    pub seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

/// Longest time the serving loop waits before checking for stop.
const POLL_MS: i32 = 50;

impl Responder {
    /// Binds `addrs` (port included) inside `ns` and serves them on a thread.
    pub fn start(ns: &str, addrs: &[SocketAddr]) -> Result<Responder> {
        let ns = ns.to_owned();
        let addrs = addrs.to_vec();
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let bound = bind_all(&ns, &addrs);
                let sockets = match bound {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                serve(&sockets, &seen, &stop)
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Responder {
                seen,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => bail!("responder: {e}"),
            Err(_) => bail!("responder: not bound within 10 s"),
        }
    }

    /// Stops serving; returns an error the serving loop hit.
    pub fn stop(mut self) -> Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the responder thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// Non-blocking UDP sockets bound to `addrs` in namespace `ns` (the calling thread
/// enters it for good: a responder's own thread).
pub(crate) fn bind_all(ns: &str, addrs: &[SocketAddr]) -> Result<Vec<UdpSocket>> {
    rawnet::enter_netns(ns)?;
    addrs
        .iter()
        .map(|a| {
            let s = UdpSocket::bind(a).with_context(|| format!("binding {a} in {ns}"))?;
            s.set_nonblocking(true)
                .with_context(|| format!("making {a}'s socket non-blocking"))?;
            Ok(s)
        })
        .collect()
}

/// One `pollfd` per socket, waiting for input.
pub(crate) fn poll_set(sockets: &[UdpSocket]) -> Vec<libc::pollfd> {
    sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect()
}

/// Waits up to `ms` for input on `fds`; false when a signal interrupted the wait.
pub(crate) fn poll_wait(fds: &mut [libc::pollfd], ms: i32) -> Result<bool> {
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        bail!("poll: {e}");
    }
    Ok(true)
}

fn serve(sockets: &[UdpSocket], seen: &Seen, stop: &AtomicBool) -> Result<()> {
    let mut fds = poll_set(sockets);
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        if !poll_wait(&mut fds, POLL_MS)? {
            continue;
        }
        for (pfd, sock) in fds.iter_mut().zip(sockets) {
            if pfd.revents == 0 {
                continue;
            }
            pfd.revents = 0;
            // A bounded number of datagrams per socket and wakeup.
            for _ in 0..64 {
                let Ok((len, from)) = sock.recv_from(&mut buf) else {
                    break;
                };
                let msg = String::from_utf8_lossy(&buf[..len]);
                if msg.starts_with("OPTIONS ") {
                    seen.options.fetch_add(1, Ordering::Relaxed);
                    let _ = sock.send_to(ok_response(&msg).as_bytes(), from);
                } else if let Some(call_id) = header(&msg, "call-id") {
                    let at = sock.local_addr().unwrap_or(from);
                    if let Ok(mut requests) = seen.requests.lock() {
                        requests.insert(call_id.to_owned(), (Instant::now(), at));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The value of the first header `name` (lower case; compact `i` for Call-ID).
fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        let n = n.trim().to_ascii_lowercase();
        (n == name || (name == "call-id" && n == "i")).then(|| v.trim())
    })
}

/// `200 OK` to an OPTIONS: its Via, From, To, Call-ID and CSeq copied.
fn ok_response(request: &str) -> String {
    let mut out = String::from("SIP/2.0 200 OK\r\n");
    for line in request.split("\r\n").skip(1) {
        let name = line
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if ["via", "v", "from", "f", "to", "t", "call-id", "i", "cseq"].contains(&name.as_str()) {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_options_with_its_headers() {
        let req = "OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\n\
                   Max-Forwards: 70\r\nFrom: <sip:a>;tag=1\r\nTo: <sip:x>\r\n\
                   Call-ID: c1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
        let r = ok_response(req);
        assert!(r.starts_with("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\n"));
        assert!(r.contains("\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\n"));
        assert!(!r.contains("Max-Forwards"));
        assert_eq!(header(req, "call-id"), Some("c1"));
        assert_eq!(
            header("INVITE x SIP/2.0\r\ni: c2\r\n\r\n", "call-id"),
            Some("c2")
        );
    }
}
