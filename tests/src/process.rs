//! A child process started inside a namespace (`ip netns exec NS ...`, which execs the
//! program, so the child's PID is the program's), with stdout and stderr captured to files
//! and also observable line by line as they arrive (each line stamped with the time the
//! harness read it: to wait for a "ready" line, or to watch a daemon's log as events), and
//! a stop (SIGTERM, bounded wait, SIGKILL) that also runs on drop.
use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{cancel, cmd, netns};

/// How long a stop waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

/// One line of a child's output, stamped when the harness read it.
#[derive(Debug, Clone)]
pub struct Line {
    /// For durations (monotonic).
    pub at: Instant,
    /// For comparing with the timestamps other programs write (SIPp's message logs).
    pub wall: SystemTime,
    pub text: String,
}

#[derive(Default)]
struct Lines {
    lines: Vec<Line>,
    eof: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<Lines>,
    changed: Condvar,
}

/// What [`LineLog::wait_for`] found.
#[derive(Debug)]
pub enum Wait<T> {
    /// The index of the matching line, the line, and what the matcher made of it.
    Found(usize, Line, T),
    /// The stream ended (the process exited) first.
    Eof,
    TimedOut,
}

/// The lines of one output stream of a child, as they arrive. Cloning gives another
/// handle on the same lines.
#[derive(Clone, Default)]
pub struct LineLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LineLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineLog")
            .field("lines", &self.len())
            .finish()
    }
}

impl LineLog {
    /// Number of lines read so far: a cursor for [`wait_for`](Self::wait_for).
    pub fn len(&self) -> usize {
        self.shared.state.lock().expect("lines lock").lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the lines read so far.
    pub fn lines(&self) -> Vec<Line> {
        self.shared.state.lock().expect("lines lock").lines.clone()
    }

    fn push(&self, text: String) {
        let line = Line {
            at: Instant::now(),
            wall: SystemTime::now(),
            text,
        };
        self.shared
            .state
            .lock()
            .expect("lines lock")
            .lines
            .push(line);
        self.shared.changed.notify_all();
    }

    fn close(&self) {
        self.shared.state.lock().expect("lines lock").eof = true;
        self.shared.changed.notify_all();
    }

    /// Waits until a line at index `from` or later makes `matcher` return `Some`, the
    /// stream ends, or `timeout` passes (cancellable: errors out on [`cancel::request`]).
    /// Lines that arrived before the call count too, so nothing is missed between two
    /// waits that pass on the cursor.
    pub fn wait_for<T>(
        &self,
        from: usize,
        timeout: Duration,
        mut matcher: impl FnMut(&str) -> Option<T>,
    ) -> Result<Wait<T>> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        let mut state = self.shared.state.lock().expect("lines lock");
        loop {
            while next < state.lines.len() {
                let line = &state.lines[next];
                if let Some(found) = matcher(&line.text) {
                    return Ok(Wait::Found(next, line.clone(), found));
                }
                next += 1;
            }
            if state.eof {
                return Ok(Wait::Eof);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Wait::TimedOut);
            }
            if cancel::requested() {
                bail!("interrupted");
            }
            let slice = (deadline - now).min(Duration::from_millis(100));
            state = self
                .shared
                .changed
                .wait_timeout(state, slice)
                .expect("lines lock")
                .0;
        }
    }
}

/// Copies `pipe` to `file` and, line by line, to `log`; closes `log` at EOF.
fn spawn_reader(
    name: String,
    pipe: impl Read + Send + 'static,
    mut file: File,
    log: LineLog,
) -> Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut pipe = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match pipe.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let _ = file.write_all(&buf);
                        log.push(
                            String::from_utf8_lossy(&buf)
                                .trim_end_matches(['\n', '\r'])
                                .to_owned(),
                        );
                    }
                }
            }
            let _ = file.flush();
            log.close();
        })
        .context("starting an output reader thread")
}

/// A running child process.
pub struct Process {
    label: String,
    command_line: String,
    child: Child,
    stdout: LineLog,
    stderr: LineLog,
    readers: Vec<JoinHandle<()>>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    status: Option<ExitStatus>,
}

/// What a stopped process left.
#[derive(Debug, Clone)]
pub struct Stopped {
    pub status: ExitStatus,
    /// Whether it had to be killed with SIGKILL.
    pub killed: bool,
    pub stdout: String,
    pub stderr_path: PathBuf,
}

impl Process {
    /// Starts `program args...` inside namespace `ns`; its output goes to
    /// `dir/<label>.stdout` and `dir/<label>.stderr`. The child gets its own process group,
    /// so a Ctrl-C on the terminal reaches only the harness, which then stops it in order.
    pub fn spawn<I, S>(ns: &str, program: &str, args: I, dir: &Path, label: &str) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        cancel::check()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stdout_path = dir.join(format!("{label}.stdout"));
        let stderr_path = dir.join(format!("{label}.stderr"));
        let stderr_file = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let stdout_file = File::create(&stdout_path)
            .with_context(|| format!("creating {}", stdout_path.display()))?;

        let mut command = netns::command(ns, program);
        command
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let command_line = cmd::display(&command);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start `{command_line}`"))?;

        let stdout = LineLog::default();
        let stderr = LineLog::default();
        let mut readers = Vec::new();
        let out_pipe = child.stdout.take().expect("stdout is piped");
        let err_pipe = child.stderr.take().expect("stderr is piped");
        for (pipe, file, log, stream) in [
            (
                Box::new(out_pipe) as Box<dyn Read + Send>,
                stdout_file,
                &stdout,
                "stdout",
            ),
            (Box::new(err_pipe), stderr_file, &stderr, "stderr"),
        ] {
            match spawn_reader(format!("{label}-{stream}"), pipe, file, log.clone()) {
                Ok(handle) => readers.push(handle),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            }
        }

        Ok(Process {
            label: label.to_owned(),
            command_line,
            child,
            stdout,
            stderr,
            readers,
            stdout_path,
            stderr_path,
            status: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// The last `n` lines of the captured stderr (for error messages).
    pub fn stderr_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Its stdout lines as they arrive.
    pub fn stdout_lines(&self) -> LineLog {
        self.stdout.clone()
    }

    /// Its stderr lines as they arrive (a daemon's log).
    pub fn stderr_lines(&self) -> LineLog {
        self.stderr.clone()
    }

    /// Waits until a stdout line starts with `prefix` and returns it. Fails if the process
    /// closes stdout (exits) first, on timeout, or on cancellation.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let found = self
            .stdout
            .wait_for(0, timeout, |l| l.starts_with(prefix).then(|| l.to_owned()));
        match found {
            Ok(Wait::Found(_, _, line)) => Ok(line),
            Ok(Wait::Eof) => {
                let status = self.wait_timeout(Duration::from_secs(2))?;
                bail!(
                    "{} ended ({}) before printing {prefix:?}; `{}`; stderr:\n{}",
                    self.label,
                    status.map_or("still running".into(), |s| s.to_string()),
                    self.command_line,
                    self.stderr_tail(30)
                );
            }
            Ok(Wait::TimedOut) => bail!(
                "{} did not print {prefix:?} within {timeout:?}; `{}`; stderr:\n{}",
                self.label,
                self.command_line,
                self.stderr_tail(30)
            ),
            Err(e) => Err(e).with_context(|| format!("waiting for {}", self.label)),
        }
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.label))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to end (cancellable).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            cancel::check()?;
            thread::sleep(POLL);
        }
    }

    /// Sends `signal` to the process (if it still runs).
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        if self.try_wait()?.is_none() {
            // SAFETY: kill(2) on the PID of our own, not yet reaped, child.
            if unsafe { libc::kill(self.pid(), signal) } != 0 {
                return Err(anyhow!(std::io::Error::last_os_error()))
                    .with_context(|| format!("signalling {}", self.label));
            }
        }
        Ok(())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the status and captured stdout.
    pub fn stop_with(&mut self, grace: Duration) -> Result<Stopped> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + grace;
        let mut killed = false;
        let status = loop {
            if let Some(s) = self.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                killed = true;
                let _ = self.child.kill();
                break self
                    .child
                    .wait()
                    .with_context(|| format!("reaping {}", self.label))?;
            }
            thread::sleep(POLL);
        };
        self.status = Some(status);
        self.finish(status, killed)
    }

    /// [`stop_with`](Self::stop_with) with [`STOP_GRACE`].
    pub fn stop(&mut self) -> Result<Stopped> {
        self.stop_with(STOP_GRACE)
    }

    /// For a process that ended by itself: collects its status and stdout.
    pub fn collect(&mut self) -> Result<Stopped> {
        let status = match self.try_wait()? {
            Some(s) => s,
            None => bail!("{} is still running", self.label),
        };
        self.finish(status, false)
    }

    fn finish(&mut self, status: ExitStatus, killed: bool) -> Result<Stopped> {
        self.join_readers();
        let stdout = self
            .stdout
            .lines()
            .into_iter()
            .map(|l| l.text)
            .collect::<Vec<_>>()
            .join("\n");
        Ok(Stopped {
            status,
            killed,
            stdout,
            stderr_path: self.stderr_path.clone(),
        })
    }

    /// Waits for the output readers: the pipes reach EOF once the process (and anything
    /// it forked) is gone.
    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.try_wait(), Ok(None)) {
            let _ = self.stop_with(Duration::from_secs(3));
        } else {
            self.join_readers();
        }
    }
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("label", &self.label)
            .field("pid", &self.child.id())
            .field("command", &self.command_line)
            .finish()
    }
}

/// Whether the process `pid` (in its own network namespace) has a UDP socket bound to
/// `port` (on `addr` or on the wildcard address of its family), read from
/// `/proc/<pid>/net/udp{,6}`, which shows that process's namespace.
pub fn udp_bound(pid: i32, addr: std::net::IpAddr, port: u16) -> bool {
    let file = if addr.is_ipv4() { "udp" } else { "udp6" };
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
        return false;
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(parse_proc_net_addr)
        .any(|(a, p)| p == port && (a == addr || a.is_unspecified()))
}

/// Parses a local address column of /proc/net/udp{,6}: `0100007F:13C4` (the address in
/// the byte order of the machine, as 32-bit words) into an address and a port.
pub fn parse_proc_net_addr(field: &str) -> Option<(std::net::IpAddr, u16)> {
    let (hex, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = (0..hex.len() / 8)
        .map(|i| {
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()
                .map(u32::to_ne_bytes)
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let addr = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some((addr, port))
}

/// Waits (polling, cancellable) until `process` has a UDP socket on `addr`:`port`.
pub fn wait_udp_bound(
    process: &mut Process,
    addr: std::net::IpAddr,
    port: u16,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if udp_bound(process.pid(), addr, port) {
            return Ok(());
        }
        if let Some(status) = process.try_wait()? {
            bail!(
                "{} exited ({status}) before binding {addr} port {port}; `{}`; stderr:\n{}\nstdout:\n{}",
                process.label(),
                process.command_line(),
                process.stderr_tail(20),
                std::fs::read_to_string(process.stdout_path()).unwrap_or_default()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not bind {addr} port {port} within {timeout:?}",
                process.label()
            );
        }
        cancel::check()?;
        thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_net_addr("0100007F:13C4"),
                Some(("127.0.0.1".parse().unwrap(), 5060))
            );
            assert_eq!(
                parse_proc_net_addr("B80D0120000000000000000021000000:13C4"),
                Some(("2001:db8::21".parse().unwrap(), 5060))
            );
        }
        assert_eq!(
            parse_proc_net_addr("00000000:0035"),
            Some(("0.0.0.0".parse().unwrap(), 53))
        );
        assert_eq!(parse_proc_net_addr("zz"), None);
    }
}
