//! A process-wide "stop now" flag: a SIGINT handler (the demo's) sets it, and every wait
//! of the testbed (ready lines, SIPp runs, sockets) checks it and returns an error, so the
//! normal unwinding (Drop guards) tears the topology down.
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};

static CANCELLED: AtomicBool = AtomicBool::new(false);

/// Asks every running wait to give up (safe to call from a signal-handling thread).
pub fn request() {
    CANCELLED.store(true, Ordering::SeqCst);
}

/// Whether [`request`] was called.
pub fn requested() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// Errors out if [`request`] was called.
pub fn check() -> Result<()> {
    if requested() {
        bail!("interrupted");
    }
    Ok(())
}
