//! The control socket: a Unix stream socket (mode 0600, in a 0700 directory, root only:
//! each peer's credentials are checked) on which the CLI sends one JSON request per
//! connection and reads one JSON response (the types are in [`crate::protocol`]). The daemon applies every change through the
//! controller, so each one is a table swap with the minimal disruption property.
//! Connections are bounded in number and in time.
use std::{
    io::{BufRead as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
};

use crate::protocol::{Answer, Reply, Request, Response};

/// Where daemons put their sockets: `<dir>/<iface>.sock`.
pub const SOCKET_DIR: &str = "/run/sip-dispatch";
/// Requests longer than this are refused.
const MAX_REQUEST: usize = 64 * 1024;
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a peer has to send its request, and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub fn default_socket(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// A request on its way to the controller, with where its answer goes.
pub type Command = (Request, oneshot::Sender<Answer>);

/// The line the daemon writes for an answer (with its newline).
fn wire(answer: Answer) -> Option<String> {
    let mut text = serde_json::to_string(&Response::<Reply>::from(answer)).ok()?;
    text.push('\n');
    Some(text)
}

/// Sleeps after a failed `accept` so that a full file table (EMFILE, ENFILE) or any
/// other persistent error does not spin the runtime thread: 10 ms, doubling up to 1 s,
/// back to the start after an accept that works.
pub struct AcceptBackoff {
    delay: Duration,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> AcceptBackoff {
        AcceptBackoff { delay: Self::FIRST }
    }

    pub fn succeeded(&mut self) {
        self.delay = Self::FIRST;
    }

    /// The pause after this failure; the next one is twice as long, up to 1 s.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.delay;
        self.delay = (self.delay * 2).min(Self::MAX);
        d
    }

    async fn failed(&mut self, listener: &str, e: &std::io::Error) {
        let d = self.next_delay();
        log::warn!("{listener}: accept failed: {e} (retrying in {d:?})");
        tokio::time::sleep(d).await;
    }

    /// What an accept gave: the connection, or None after the pause a failure earns.
    pub async fn accepted<T, A>(
        &mut self,
        listener: &str,
        result: std::io::Result<(T, A)>,
    ) -> Option<T> {
        match result {
            Ok((stream, _)) => {
                self.succeeded();
                Some(stream)
            }
            Err(e) => {
                self.failed(listener, &e).await;
                None
            }
        }
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Refused peers answered at once and then given a moment to finish writing (see
/// [`refuse`]); more refused peers than this are answered and closed at once.
const MAX_REFUSED_LINGERING: usize = 4;
/// How long a refused peer has to finish writing its request before it is closed.
const REFUSED_LINGER: Duration = Duration::from_millis(500);

/// The daemon's effective uid.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a peer with this uid may use the control socket: root, or the daemon's own
/// user (the same when it runs as root).
fn peer_allowed(uid: u32) -> bool {
    uid == 0 || uid == euid()
}

/// Why a peer may not use the control socket, or `None` when it may.
fn refusal(stream: &UnixStream) -> Option<String> {
    match stream.peer_cred() {
        Ok(cred) if peer_allowed(cred.uid()) => None,
        Ok(cred) => Some(format!(
            "refused: the control socket is for root only (you are uid {})",
            cred.uid()
        )),
        Err(e) => Some(format!("refused: cannot read the peer's credentials: {e}")),
    }
}

/// Listens on `path` until the task is dropped, handing requests to the controller.
/// Peers are checked before they take one of the [`MAX_CONNECTIONS`] slots, so refused
/// peers cannot keep root out.
pub async fn serve(listener: UnixListener, tx: mpsc::Sender<Command>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let lingering = Arc::new(Semaphore::new(MAX_REFUSED_LINGERING));
    let mut backoff = AcceptBackoff::new();
    loop {
        let Some(stream) = backoff
            .accepted("control socket", listener.accept().await)
            .await
        else {
            continue;
        };
        if let Some(why) = refusal(&stream) {
            refuse(stream, why, &lingering);
            continue;
        }
        // While every slot is busy, further peers wait in the listen backlog.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            answer(stream, tx).await;
            drop(permit);
        });
    }
}

/// Answers a refused peer at once, without waiting for its request (one non-blocking
/// write: a fresh socket's buffer takes the short line). With a lingering slot free the
/// connection then stays open for up to [`REFUSED_LINGER`] while the peer writes (its
/// request is read and ignored), so that its write does not fail before it reads why;
/// otherwise it is closed at once.
fn refuse(stream: UnixStream, why: String, lingering: &Arc<Semaphore>) {
    let Ok(stream) = stream.into_std() else {
        return;
    };
    if let Some(text) = wire(Err(why)) {
        let _ = (&stream).write_all(text.as_bytes());
    }
    let Ok(permit) = lingering.clone().try_acquire_owned() else {
        return;
    };
    let Ok(stream) = UnixStream::from_std(stream) else {
        return;
    };
    tokio::spawn(async move {
        let mut line = String::new();
        let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64));
        let _ = tokio::time::timeout(REFUSED_LINGER, reader.read_line(&mut line)).await;
        drop(permit);
    });
}

/// Reads one request, has the controller answer it, and writes the answer, each step
/// within [`IO_TIMEOUT`].
async fn answer(stream: UnixStream, tx: mpsc::Sender<Command>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let received = tokio::time::timeout(IO_TIMEOUT, reader.read_line(&mut line)).await;
    let shutting_down = || Err("the daemon is shutting down".to_string());
    let answer = match received {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (reply, answer) = oneshot::channel();
                if tx.send((req, reply)).await.is_err() {
                    shutting_down()
                } else {
                    answer.await.unwrap_or_else(|_| shutting_down())
                }
            }
            Err(e) => Err(format!("bad request: {e}")),
        },
        _ => Err("no request received".to_string()),
    };
    if let Some(text) = wire(answer) {
        let _ = tokio::time::timeout(IO_TIMEOUT, write.write_all(text.as_bytes())).await;
    }
}

/// Makes sure the socket's directory exists and is private: missing directories are
/// created with mode 0700, and the default directory is set to 0700 and must belong to
/// us. A directory given with `--control` is left as it is, with a warning when others
/// may write to it (the socket itself is 0600 and peers are checked anyway).
fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let meta =
        std::fs::metadata(dir).with_context(|| format!("reading the mode of {}", dir.display()))?;
    if dir == Path::new(SOCKET_DIR) {
        let me = euid();
        if meta.uid() != me {
            bail!(
                "{} belongs to uid {}, not to this daemon (uid {me}): remove it or give --control",
                dir.display(),
                meta.uid()
            );
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {} to 0700", dir.display()))?;
    } else if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
        log::warn!(
            "the control socket's directory {} is writable by others (mode {:o}): prefer a 0700 directory",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Binds the control socket, replacing a stale one, with mode 0600.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another daemon is listening on {} (give this one another --control)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// The socket a CLI command talks to: `--control`, else the only socket in the
/// default directory.
pub fn resolve_socket(control: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = control {
        return Ok(p.to_path_buf());
    }
    let found: Vec<PathBuf> = std::fs::read_dir(SOCKET_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "the daemon is not running (no control socket in {SOCKET_DIR}; give --control PATH)"
        ),
        many => bail!(
            "several daemons run ({}): choose one with --control PATH",
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Sends one request and returns the daemon's reply, or its error as an error. `R` is
/// the reply type of the request.
pub fn call<R: DeserializeOwned>(socket: &Path, request: &Request) -> anyhow::Result<R> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                anyhow::anyhow!(
                    "the daemon is not running (nothing listens on {})",
                    socket.display()
                )
            }
            std::io::ErrorKind::PermissionDenied => {
                anyhow::anyhow!(
                    "permission denied on {} (the control socket is root only)",
                    socket.display()
                )
            }
            _ => anyhow::anyhow!("connecting to {}: {e}", socket.display()),
        })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    stream
        .write_all(text.as_bytes())
        .with_context(|| format!("writing to {}", socket.display()))?;
    let mut line = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut line)
        .with_context(|| format!("reading from {}", socket.display()))?;
    let response: Response<serde_json::Value> =
        serde_json::from_str(&line).context("the daemon's answer is not JSON")?;
    if response.ok {
        let result = response.result.unwrap_or_default();
        serde_json::from_value(result).context("the daemon's answer is not the reply expected")
    } else {
        bail!(
            "{}",
            response
                .error
                .unwrap_or_else(|| "the daemon refused".into())
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::protocol::WeightSet;

    /// A reply that carries a number the test can check (`weight`).
    fn seen(n: u32) -> Answer {
        Ok(Reply::WeightSet(WeightSet {
            address: "198.18.0.21:5060".parse().unwrap(),
            weight: n,
            warning: None,
        }))
    }

    fn stats(path: &Path) -> anyhow::Result<WeightSet> {
        call(path, &Request::Stats)
    }

    #[tokio::test]
    async fn a_request_round_trips_through_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("sd-control-test-{}", std::process::id()));
        let path = dir.join("t.sock");
        let listener = bind(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700,
            "a directory the daemon creates is private"
        );
        let (tx, mut rx) = mpsc::channel::<Command>(1);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(match req {
                    Request::Stats => seen(7),
                    _ => Err("unknown backend 198.18.0.99:5060".into()),
                });
            }
        });
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || stats(&p))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.weight, 7);
        let p = path.clone();
        let err = tokio::task::spawn_blocking(move || call::<WeightSet>(&p, &Request::Reload))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.to_string(), "unknown backend 198.18.0.99:5060");
        assert!(
            bind(&path).is_err(),
            "a second daemon on the same socket is refused"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let err = stats(&path).unwrap_err().to_string();
        assert!(err.contains("the daemon is not running"), "{err}");
    }

    /// Runs `f` on a thread whose effective uid is 65534 (nobody): the raw syscall
    /// changes the credentials of the calling thread only (glibc's `setresuid` would
    /// change every thread), and SO_PEERCRED reports the connecting thread's.
    fn as_nobody<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            // SAFETY: a plain system call on integers; it affects only this thread,
            // which ends with `f`.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_setresuid,
                    -1 as libc::c_long,
                    65534 as libc::c_long,
                    -1 as libc::c_long,
                )
            };
            assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_peers_are_answered_at_once_and_cannot_keep_root_out() {
        let dir = std::env::temp_dir().join(format!("sd-control-refused-{}", std::process::id()));
        let path = dir.join("t.sock");
        let listener = bind(&path).unwrap();
        // Let others reach the socket, so that only the credential check stands.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (tx, mut rx) = mpsc::channel::<Command>(1);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                let _ = reply.send(seen(1));
            }
        });
        // A refused CLI reads why, not a broken pipe.
        let p = path.clone();
        let err = tokio::task::spawn_blocking(move || as_nobody(move || stats(&p)))
            .await
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(err.contains("root only (you are uid 65534)"), "{err}");
        // Twice as many refused peers as there are slots, sending nothing.
        let p = path.clone();
        let idle = tokio::task::spawn_blocking(move || {
            as_nobody(move || {
                (0..2 * MAX_CONNECTIONS)
                    .map(|_| std::os::unix::net::UnixStream::connect(&p).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .await
        .unwrap();
        let started = Instant::now();
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || stats(&p))
            .await
            .unwrap()
            .unwrap();
        let waited = started.elapsed();
        assert_eq!(got.weight, 1);
        // Before the fix root waited for the refused peers' slots to time out (5 s).
        assert!(waited < IO_TIMEOUT / 5, "root answered after {waited:?}");
        let started = Instant::now();
        for peer in idle {
            peer.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&peer).read_line(&mut line).unwrap();
            assert!(line.contains("you are uid 65534"), "{line}");
        }
        let refused_in = started.elapsed();
        assert!(
            refused_in < IO_TIMEOUT / 5,
            "refusals read in {refused_in:?}"
        );
        eprintln!(
            "root answered in {waited:?} past {} refused idle peers; their refusals read in {refused_in:?}",
            2 * MAX_CONNECTIONS
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::new();
        let delays: Vec<u64> = (0..10).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_and_idle_ones_time_out() {
        let dir = std::env::temp_dir().join(format!("sd-control-limit-{}", std::process::id()));
        let path = dir.join("t.sock");
        let listener = bind(&path).unwrap();
        let (tx, mut rx) = mpsc::channel::<Command>(1);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                let _ = reply.send(seen(1));
            }
        });
        // Every slot taken by a peer that sends nothing.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(UnixStream::connect(&path).await.unwrap());
        }
        let started = Instant::now();
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || stats(&p))
            .await
            .unwrap()
            .unwrap();
        let waited = started.elapsed();
        assert_eq!(got.weight, 1);
        // It waited in the backlog until the idle peers timed out, not longer.
        assert!(
            waited >= IO_TIMEOUT - Duration::from_millis(500) && waited < IO_TIMEOUT * 3,
            "answered after {waited:?}"
        );
        // The idle peers were told so and closed.
        let mut line = String::new();
        let mut first = BufReader::new(idle.remove(0));
        first.read_line(&mut line).await.unwrap();
        assert!(line.contains("no request received"), "{line}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
