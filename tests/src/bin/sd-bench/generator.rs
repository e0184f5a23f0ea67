//! The throughput generator: a thread pinned to one CPU that writes copies of one frame
//! into a veth through an AF_PACKET socket (qdisc bypassed, as trafgen does), 64 frames
//! per `sendmmsg`, each with its own Call-ID (an 8-letter counter in place of
//! [`messages::CALL_ID_VARIABLE`]).
//!
//! Why not trafgen: it flushes its TX ring with MSG_DONTWAIT and treats EAGAIN as fatal.
//! With native XDP on the receiving veth, frames wait in the veth's XDP ring (holding
//! the socket's send buffer) whenever softirq work is deferred to ksoftirqd, and trafgen
//! dies within a second; raising the send buffer would take the machine-wide
//! `net.core.wmem_default`. A blocking socket simply waits instead: full speed, with the
//! receiver's backpressure.
use std::{
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use sip_dispatch_testbed::rawnet::packet_socket;

use crate::{
    messages,
    nsthread::{MsgBatch, NsThread, gettid, pin_to_cpu},
};

const BATCH: usize = 64;

/// Writes the 8 letters of `n` (base 26) into `out`.
fn call_id_letters(mut n: u64, out: &mut [u8]) {
    for b in out.iter_mut().rev() {
        *b = b'a' + (n % 26) as u8;
        n /= 26;
    }
}

/// Starts the generator in `ns` on `dev`, pinned to `cpu`. It stops when told, after
/// `max_frames` frames or after `max_time`, whichever comes first. The thread's value is
/// its thread id (for CPU accounting); it returns the frames sent.
pub fn start(
    ns: &str,
    dev: &str,
    frame: Vec<u8>,
    id_at: usize,
    cpu: usize,
    max_frames: u64,
    max_time: Duration,
) -> Result<NsThread<u64>> {
    let dev = dev.to_owned();
    NsThread::spawn(ns, &format!("generator-{dev}"), move |ctl| {
        pin_to_cpu(cpu)?;
        let (fd, mut addr) = packet_socket(&dev)?;
        let id_len = messages::CALL_ID_VARIABLE.len();
        let mut batch = MsgBatch::new(vec![frame.clone(); BATCH], Some(&mut addr));
        ctl.ready(gettid() as u64);
        let started = Instant::now();
        let mut next_id: u64 = 0;
        let mut sent: u64 = 0;
        while !ctl.stopped() && sent < max_frames && started.elapsed() < max_time {
            for (i, b) in batch.bufs.iter_mut().enumerate() {
                call_id_letters(next_id + i as u64, &mut b[id_at..id_at + id_len]);
            }
            // SAFETY: BATCH headers pointing at live buffers and the bound address.
            let n =
                unsafe { libc::sendmmsg(fd.as_raw_fd(), batch.msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent += n as u64;
                next_id += n as u64;
            } else if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR) => {}
                    _ => bail!("sendmmsg on {dev}: {e}"),
                }
            }
        }
        Ok(sent)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_count_in_letters() {
        let mut b = [0u8; 8];
        call_id_letters(0, &mut b);
        assert_eq!(&b, b"aaaaaaaa");
        call_id_letters(27, &mut b);
        assert_eq!(&b, b"aaaaaabb");
    }
}
