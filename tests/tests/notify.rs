//! The daemon under systemd (`Type=notify`, stderr to the journal): given a
//! `NOTIFY_SOCKET`, it sends `READY=1` once forwarding is in place, `RELOADING=1` then
//! `READY=1` around a SIGHUP reload, and `STOPPING=1` on SIGTERM; with `JOURNAL_STREAM`
//! naming its stderr, its log lines carry a `<N>` priority and no time. The test plays
//! the service manager: it binds the unix datagram socket itself and reads what arrives,
//! each with a deadline, and sets `JOURNAL_STREAM` to the device and inode of the
//! daemon's stderr pipe as systemd does for the journal's stream.
//!
//! Real XDP (native, on veth) in the operations test bed. Needs root, SIPp and the
//! sip-dispatch binary (`$SIP_DISPATCH_BIN`, else `target/debug/sip-dispatch`); fails,
//! never skips. Run with `--test-threads=1`.
use std::{
    os::unix::net::UnixDatagram,
    path::PathBuf,
    time::{Duration, Instant},
};

use sip_dispatch_testbed::{
    bed::Bed,
    dispatcher::{self, READY_PREFIX},
    link,
    process::{Process, Wait},
};

/// How long the daemon may take to become ready (it attaches and probes first).
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// How long a reload or a stop may take to be announced.
const STATE_DEADLINE: Duration = Duration::from_secs(10);

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-notify")
}

/// The service manager's end: a bound unix datagram socket, removed on drop.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        // sun_path holds 107 bytes: the target directory may be deeper than that allows.
        let path = std::env::temp_dir().join(format!("sd-notify-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock =
            UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        NotifySocket { sock, path }
    }

    /// Datagrams until one has the line `wanted`, within `deadline`; all of them, in order.
    fn await_line(&self, wanted: &str, deadline: Duration) -> Vec<String> {
        let until = Instant::now() + deadline;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {wanted} within {deadline:?}; received {seen:?}"
            );
            self.sock
                .set_read_timeout(Some(left))
                .expect("read timeout");
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let done = msg.lines().any(|l| l == wanted);
                    seen.push(msg);
                    if done {
                        return seen;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("reading {}: {e}", self.path.display()),
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lines(datagrams: &[String]) -> Vec<&str> {
    datagrams.iter().flat_map(|d| d.lines()).collect()
}

fn attached(ns: &str, iface: &str) -> Option<u32> {
    link::xdp_prog_id(ns, iface).unwrap_or_else(|e| panic!("xdp of {iface}: {e:#}"))
}

#[test]
fn readiness_reload_and_stop_reach_the_notify_socket() {
    let bed = Bed::build(&workdir(), "notify", 2, Duration::from_secs(60));
    let (ns, iface) = (bed.disp_ns(), bed.iface());
    let notify = NotifySocket::bind();
    dispatcher::write_test_key_file().expect("test key file");
    let args = dispatcher::with_private_state_file(&bed.run_config(2).args(), &bed.dir);
    let mut argv = vec![
        "-c".to_owned(),
        // stat runs with the same stderr: its /proc/self/fd/2 is the pipe the daemon gets.
        "export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) && exec env \"$@\"".to_owned(),
        "sh".to_owned(),
        format!("NOTIFY_SOCKET={}", notify.path.display()),
        bed.binary.to_string_lossy().into_owned(),
    ];
    argv.extend(args);
    assert_eq!(
        attached(&ns, &iface),
        None,
        "XDP on {iface} before the start"
    );

    let started = Instant::now();
    let mut daemon = Process::spawn(&ns, "sh", &argv, &bed.dir, "sip-dispatch-notify")
        .expect("starting the daemon");
    let ready = notify.await_line("READY=1", READY_DEADLINE);
    // Observed the moment READY=1 arrived: the program is attached, the ready line is out
    // and the control socket answers.
    let prog = attached(&ns, &iface);
    assert!(prog.is_some(), "READY=1 before XDP was attached to {iface}");
    let ready_lines = lines(&ready);
    assert_eq!(
        ready_lines.iter().filter(|l| **l == "READY=1").count(),
        1,
        "{ready:?}"
    );
    assert!(
        ready_lines
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains(&format!("iface={iface}"))),
        "READY=1 comes with a STATUS naming the interface: {ready:?}"
    );
    let stats = bed.cli(&["stats", "--json"]);
    assert!(
        stats.status.success(),
        "the control socket does not answer after READY=1: {}",
        String::from_utf8_lossy(&stats.stderr)
    );
    daemon
        .wait_for_line(READY_PREFIX, STATE_DEADLINE)
        .expect("the stdout ready line too");
    eprintln!("READY=1 after {:?}, program {prog:?}", started.elapsed());

    // Written before READY=1 was sent; the harness's reader thread may not have it yet.
    let stderr = daemon.stderr_lines();
    let info = stderr
        .wait_for(0, STATE_DEADLINE, |l| {
            l.starts_with("<6>dispatching ").then_some(())
        })
        .expect("reading the daemon's stderr");
    let log: Vec<String> = stderr.lines().into_iter().map(|l| l.text).collect();
    assert!(
        matches!(info, Wait::Found(..)),
        "an info line with priority 6 and no time: {log:?}"
    );
    assert!(
        log.iter()
            .all(|l| l.len() > 3 && l.starts_with('<') && !l[3..].starts_with('[')),
        "every line is a journal line: {log:?}"
    );

    daemon.signal(libc::SIGHUP).expect("SIGHUP");
    let reload = notify.await_line("READY=1", STATE_DEADLINE);
    let reload_lines = lines(&reload);
    let reloading = reload_lines.iter().position(|l| *l == "RELOADING=1");
    assert!(
        reloading.is_some_and(|r| reload_lines[r + 1..].contains(&"READY=1")),
        "RELOADING=1 then READY=1 around the SIGHUP reload: {reload:?}"
    );
    assert!(
        reload_lines
            .iter()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "RELOADING=1 carries MONOTONIC_USEC: {reload:?}"
    );
    assert!(
        reload_lines.contains(&"STATUS=reloaded"),
        "the reload was applied: {reload:?}"
    );
    assert_eq!(attached(&ns, &iface), prog, "the reload kept the program");

    let stopped = daemon.stop().expect("stopping the daemon");
    assert!(
        stopped.status.success() && !stopped.killed,
        "clean stop: {stopped:?}"
    );
    let stop = notify.await_line("STOPPING=1", STATE_DEADLINE);
    assert!(
        !lines(&stop).contains(&"READY=1"),
        "nothing but STOPPING=1 after the reload: {stop:?}"
    );
    assert_eq!(
        attached(&ns, &iface),
        None,
        "a stop without --keep-attached detaches"
    );
    let _ = std::fs::remove_dir_all(&bed.dir);
}
