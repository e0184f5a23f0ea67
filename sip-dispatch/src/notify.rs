//! Readiness and state changes for systemd (`Type=notify`, sd_notify(3)): only when the
//! service manager gave a `NOTIFY_SOCKET`; without one every call does nothing.
use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    // The variable stays set: READY, RELOADING and STOPPING follow over the daemon's life.
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("sd_notify {states:?}: {e}");
    }
}

/// The start-up sequence is done: XDP forwards, the control socket listens.
pub fn ready(details: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(details)]);
}

/// A SIGHUP reload begins (systemd shows the unit "reloading" until [`reloaded`]).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The reload is over: applied, or refused with the running settings kept.
pub fn reloaded(applied: bool) {
    let status = if applied {
        "reloaded"
    } else {
        "reload refused, running with the previous settings"
    };
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A clean stop begins.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}
