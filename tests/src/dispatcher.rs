//! Starting the `sip-dispatch` binary (`run` and `xdp-pass`) in a namespace and reading
//! the exit statistics it prints when stopped.
use std::{
    collections::BTreeMap,
    fmt,
    io::{BufRead as _, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use sip_dispatch_common::HashKey;

use crate::{events::DaemonLog, process::Process};

/// The line `sip-dispatch` prints on stdout once attached and serving.
pub const READY_PREFIX: &str = "sip-dispatch: ready";
/// The line it prints on stdout when stopped, followed by a JSON object.
pub const EXIT_STATS_PREFIX: &str = "sip-dispatch: exit-stats ";
/// How long attaching may take.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The binary under test: `$SIP_DISPATCH_BIN`, else `<workspace>/target/debug/sip-dispatch`
/// (honouring `$CARGO_TARGET_DIR`).
pub fn binary_path() -> Result<PathBuf> {
    let path = match std::env::var_os("SIP_DISPATCH_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_dir().join("debug").join("sip-dispatch"),
    };
    if !path.is_file() {
        bail!(
            "the sip-dispatch binary is missing at {} (build it with `cargo build -p sip-dispatch`, \
             or point SIP_DISPATCH_BIN at it)",
            path.display()
        );
    }
    Ok(path)
}

/// Where `cargo xtask test` puts the binary the upgrade test starts from.
pub const UPGRADE_FROM_DIR: &str = "upgrade-from";

/// The binary an upgrade starts from: `$SIP_DISPATCH_PREVIOUS_BIN`, else
/// `<target>/upgrade-from/sip-dispatch`, which `cargo xtask test` builds (the same source
/// rebuilt with other code generation, so a different executable).
pub fn previous_binary_path() -> Result<PathBuf> {
    let path = match std::env::var_os("SIP_DISPATCH_PREVIOUS_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_dir().join(UPGRADE_FROM_DIR).join("sip-dispatch"),
    };
    if !path.is_file() {
        bail!(
            "the binary to upgrade from is missing at {} (`cargo xtask test` builds it, or \
             point SIP_DISPATCH_PREVIOUS_BIN at an earlier build)",
            path.display()
        );
    }
    Ok(path)
}

/// `sip-dispatch GROUP --control PATH REST...` run from here (`--control` is an option
/// of the command groups `backends`, `stats`, `which`, `reload`).
pub fn cli(binary: &Path, control: &Path, args: &[&str]) -> Result<std::process::Output> {
    let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    all.insert(1, format!("--control={}", control.display()));
    std::process::Command::new(binary)
        .args(&all)
        .output()
        .with_context(|| format!("running {}", binary.display()))
}

/// How long [`control_request`] waits for the daemon's answer (a table build at 512
/// backends in a debug build takes seconds).
const CONTROL_ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// One request written as JSON straight to the control socket at `path` (bypassing the
/// CLI); the daemon's whole answer (`ok`, `result` or `error`), whatever `ok` says.
pub fn control_request(path: &Path, request: &serde_json::Value) -> Result<serde_json::Value> {
    let stream = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("connecting {}", path.display()))?;
    stream
        .set_read_timeout(Some(CONTROL_ANSWER_WITHIN))
        .context("setting the read timeout")?;
    writeln!(&stream, "{request}").with_context(|| format!("sending {request}"))?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("reading the answer to {request}"))?;
    serde_json::from_str(answer.trim())
        .with_context(|| format!("the answer to {request} is not JSON: {answer:?}"))
}

/// The workspace root (the parent of this crate).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testbed crate lives inside the workspace")
        .to_owned()
}

/// Cargo's target directory for this workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => workspace_dir().join(d),
        None => workspace_dir().join("target"),
    }
}

/// `--xdp-mode` of `sip-dispatch run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Auto,
    Native,
    Skb,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Skb => "skb",
        })
    }
}

impl FromStr for XdpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(XdpMode::Auto),
            "native" | "driver" => Ok(XdpMode::Native),
            "skb" | "generic" => Ok(XdpMode::Skb),
            _ => Err(format!("unknown XDP mode {s:?} (auto, native or skb)")),
        }
    }
}

/// A backend as given to `--backend ADDR:PORT,weight=N[,priority=P]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendArg {
    pub address: SocketAddr,
    pub weight: u32,
    /// `None`: left to the daemon's default (0).
    pub priority: Option<u32>,
}

impl BackendArg {
    pub fn new(address: SocketAddr, weight: u32) -> Self {
        BackendArg {
            address,
            weight,
            priority: None,
        }
    }
}

impl fmt::Display for BackendArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},weight={}", self.address, self.weight)?;
        if let Some(p) = self.priority {
            write!(f, ",priority={p}")?;
        }
        Ok(())
    }
}

/// What `sip-dispatch run` is started with.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub iface: String,
    pub vip: SocketAddr,
    pub mode: XdpMode,
    /// Static backends (`--backend`).
    pub backends: Vec<BackendArg>,
    /// SRV names (`--srv`).
    pub srv: Vec<String>,
    /// `--dns-server ADDR:PORT`.
    pub dns_server: Option<SocketAddr>,
    /// `--dns-min-ttl SECS`.
    pub dns_min_ttl: Option<u32>,
    /// `--control PATH`: the daemon's control socket. Its default depends only on the
    /// interface name (`/run/sip-dispatch/<iface>.sock`, outside the namespaces), so
    /// daemons of concurrent test runs would share it; see [`control_socket`].
    pub control: Option<PathBuf>,
    /// `--hash-key-file PATH`: by default [`test_key_file`], which holds
    /// [`TEST_HASH_KEY`], so tests know where each Call-ID lands without depending on
    /// the machine's `/var/lib/sip-dispatch`. A `--hash-key` in `extra` overrides it.
    pub hash_key_file: Option<PathBuf>,
    /// `--state-file PATH`. When None, [`Dispatcher::start`] passes a private one in
    /// its directory (see [`private_state_file`]).
    pub state_file: Option<PathBuf>,
    /// Further arguments, appended as given (health-check settings and the like).
    pub extra: Vec<String>,
    /// `NAME=VALUE` settings for the daemon's environment (through `env`).
    pub env: Vec<String>,
}

/// The key of the testbed's key file: the built-in public key, which the tests'
/// predictions (`siphash13(HashKey::DEFAULT, ...)`) assume. The daemon warns about it.
pub const TEST_HASH_KEY: HashKey = HashKey::DEFAULT;

/// The testbed's hash key file (in the target directory, shared by every test daemon).
/// [`Dispatcher::start`] writes it (mode 0600) when a daemon's arguments name it.
pub fn test_key_file() -> PathBuf {
    target_dir().join("testbed").join("hash-key")
}

/// Writes [`test_key_file`] with [`TEST_HASH_KEY`] unless it already holds it: atomically
/// (concurrent tests write the same bytes), mode 0600.
pub fn write_test_key_file() -> Result<PathBuf> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let path = test_key_file();
    let text = format!("{}\n", key_hex(TEST_HASH_KEY));
    let mode_ok =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o077 == 0);
    if std::fs::read_to_string(&path).is_ok_and(|t| t == text) && mode_ok(&path) {
        return Ok(path);
    }
    let dir = path.parent().context("the key file has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".hash-key.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(path)
}

/// A key as the 32 hex digits of `--hash-key` and key files.
pub fn key_hex(key: HashKey) -> String {
    key.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

impl RunConfig {
    pub fn new(iface: &str, vip: SocketAddr, mode: XdpMode) -> Self {
        RunConfig {
            iface: iface.to_owned(),
            vip,
            mode,
            backends: Vec::new(),
            srv: Vec::new(),
            dns_server: None,
            dns_min_ttl: None,
            control: None,
            hash_key_file: Some(test_key_file()),
            state_file: None,
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The arguments of `sip-dispatch run`.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "run".to_owned(),
            "--iface".to_owned(),
            self.iface.clone(),
            "--vip".to_owned(),
            self.vip.to_string(),
        ];
        for b in &self.backends {
            args.push("--backend".to_owned());
            args.push(b.to_string());
        }
        for name in &self.srv {
            args.push("--srv".to_owned());
            args.push(name.clone());
        }
        if let Some(server) = self.dns_server {
            args.push("--dns-server".to_owned());
            args.push(server.to_string());
        }
        if let Some(ttl) = self.dns_min_ttl {
            args.push("--dns-min-ttl".to_owned());
            args.push(ttl.to_string());
        }
        if let Some(path) = &self.control {
            args.push("--control".to_owned());
            args.push(path.to_string_lossy().into_owned());
        }
        if let Some(path) = &self.hash_key_file {
            args.push("--hash-key-file".to_owned());
            args.push(path.to_string_lossy().into_owned());
        }
        if let Some(path) = &self.state_file {
            args.push("--state-file".to_owned());
            args.push(path.to_string_lossy().into_owned());
        }
        args.push("--xdp-mode".to_owned());
        args.push(self.mode.to_string());
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// Directory of the testbed's daemon control sockets (short: a socket path has at most
/// 107 bytes).
pub const CONTROL_DIR: &str = "/run/sip-dispatch-testbed";

/// A control socket path of its own for the daemon of the topology tagged `tag`
/// (creates [`CONTROL_DIR`]; the daemon removes the socket when it exits).
pub fn control_socket(tag: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(CONTROL_DIR).with_context(|| format!("creating {CONTROL_DIR}"))?;
    Ok(Path::new(CONTROL_DIR).join(format!("{tag}.sock")))
}

/// The state file a test daemon started with `args` in `dir` uses unless its arguments
/// name one: one per control socket (`<dir>/state-<socket name>.json`, else
/// `<dir>/state.json`), so that daemons running at once in one test (each has its own
/// control socket) do not share one, and a restart with the same socket finds its
/// predecessor's.
pub fn private_state_file(dir: &Path, args: &[String]) -> PathBuf {
    let control = args.iter().enumerate().find_map(|(i, a)| match a.as_str() {
        "--control" => args.get(i + 1).map(String::as_str),
        _ => a.strip_prefix("--control="),
    });
    match control.and_then(|c| Path::new(c).file_stem()) {
        Some(stem) => dir.join(format!("state-{}.json", stem.to_string_lossy())),
        None => dir.join("state.json"),
    }
}

/// `args`, with `--state-file` [`private_state_file`] appended when they are a `run`
/// that names no state file: its default (`/var/lib/sip-dispatch/<iface>.state.json`)
/// depends only on the interface name, which many tests share in their own namespaces,
/// so no test daemon may use it.
pub fn with_private_state_file(args: &[String], dir: &Path) -> Vec<String> {
    let mut all = args.to_vec();
    let names_one = args
        .iter()
        .any(|a| a == "--state-file" || a.starts_with("--state-file="));
    // `run` is the subcommand, also behind `env VAR=VALUE BINARY` (the tests that set a
    // debug switch start the daemon so).
    let is_run = args
        .iter()
        .take_while(|a| !a.starts_with('-'))
        .any(|a| a == "run");
    if is_run && !names_one {
        all.push("--state-file".to_owned());
        all.push(private_state_file(dir, args).to_string_lossy().into_owned());
    }
    all
}

/// A running `sip-dispatch` (either subcommand).
#[derive(Debug)]
pub struct Dispatcher {
    process: Process,
    /// The ready line it printed.
    pub ready_line: String,
    /// Dropped after the process (declared after it).
    _control: Option<ControlSocket>,
}

/// A control socket under [`CONTROL_DIR`]: removed on drop (after the daemon stopped,
/// which removes it itself when it exits cleanly), with the directory once empty.
#[derive(Debug)]
struct ControlSocket(PathBuf);

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir(CONTROL_DIR);
    }
}

impl Dispatcher {
    /// Starts `binary args...` in `ns` and waits for its ready line.
    pub fn start(
        binary: &Path,
        ns: &str,
        args: &[String],
        dir: &Path,
        label: &str,
    ) -> Result<Self> {
        if args.iter().any(|a| Path::new(a) == test_key_file()) {
            write_test_key_file()?;
        }
        let program = binary.to_string_lossy();
        let args = with_private_state_file(args, dir);
        let mut process = Process::spawn(ns, &program, &args, dir, label)?;
        let ready_line = process.wait_for_line(READY_PREFIX, READY_TIMEOUT)?;
        Ok(Dispatcher {
            process,
            ready_line,
            _control: None,
        })
    }

    /// `sip-dispatch run ...` in `ns`.
    pub fn run(binary: &Path, ns: &str, config: &RunConfig, dir: &Path) -> Result<Self> {
        let control = config
            .control
            .as_ref()
            .filter(|p| p.starts_with(CONTROL_DIR))
            .map(|p| ControlSocket(p.clone()));
        let mut daemon = if config.env.is_empty() {
            Self::start(binary, ns, &config.args(), dir, "sip-dispatch-run")?
        } else {
            let mut args = config.env.clone();
            args.push(binary.to_string_lossy().into_owned());
            args.extend(config.args());
            Self::start(Path::new("env"), ns, &args, dir, "sip-dispatch-run")?
        };
        daemon._control = control;
        Ok(daemon)
    }

    /// `sip-dispatch xdp-pass --iface IF` in `ns`.
    pub fn xdp_pass(binary: &Path, ns: &str, iface: &str, dir: &Path) -> Result<Self> {
        let args = ["xdp-pass", "--iface", iface].map(str::to_owned);
        Self::start(binary, ns, &args, dir, "sip-dispatch-xdp-pass")
    }

    /// `sip-dispatch decap` on `iface` in namespace `ns` (a backend of an ipip service),
    /// accepting IP-in-IP from the outer sources `from` only.
    pub fn decap(
        binary: &Path,
        ns: &str,
        iface: &str,
        from: &[IpAddr],
        dir: &Path,
    ) -> Result<Self> {
        let mut args = ["decap", "--iface", iface].map(str::to_owned).to_vec();
        for ip in from {
            args.extend(["--from".to_owned(), ip.to_string()]);
        }
        Self::start(binary, ns, &args, dir, &format!("sip-dispatch-decap-{ns}"))
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Its log (stderr) as events, from the first line on.
    pub fn log(&self) -> DaemonLog {
        DaemonLog::new(self.process.stderr_lines(), self.process.stderr_path())
    }

    /// Whether it is still running (it should be, while it serves).
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.process.try_wait()? {
            bail!(
                "{} exited early ({status}); stderr:\n{}",
                self.process.label(),
                self.process.stderr_tail(30)
            );
        }
        Ok(())
    }

    /// SIGTERM; expects a clean exit (status 0) and returns its stdout.
    pub fn stop(mut self) -> Result<String> {
        let stopped = self.process.stop()?;
        if !stopped.status.success() || stopped.killed {
            bail!(
                "{} did not exit cleanly on SIGTERM ({}{}); stderr:\n{}",
                self.process.label(),
                stopped.status,
                if stopped.killed { ", killed" } else { "" },
                self.process.stderr_tail(30)
            );
        }
        Ok(stopped.stdout)
    }

    /// Sends `signal` (SIGKILL, SIGABRT: a crash) and waits (bounded) until it has ended
    /// by that signal; fails if it ended otherwise or not at all.
    pub fn kill(mut self, signal: i32) -> Result<()> {
        use std::os::unix::process::ExitStatusExt as _;
        self.process.signal(signal)?;
        let status = self.process.wait_timeout(Duration::from_secs(10))?;
        match status {
            Some(s) if s.signal() == Some(signal) => Ok(()),
            Some(s) => bail!(
                "{} ended with {s} after signal {signal}",
                self.process.label()
            ),
            None => {
                let _ = self.process.stop();
                bail!(
                    "{} still ran 10 s after signal {signal}",
                    self.process.label()
                )
            }
        }
    }

    /// Waits (bounded) for it to end by itself, e.g. by aborting; returns how it ended.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        match self.process.wait_timeout(timeout)? {
            Some(status) => Ok(status),
            None => {
                let _ = self.process.stop();
                bail!("{} still ran after {timeout:?}", self.process.label())
            }
        }
    }

    /// Stops `sip-dispatch run` and parses its exit statistics.
    pub fn stop_with_stats(self) -> Result<ExitStats> {
        let stderr = self.process.stderr_path().to_owned();
        let stdout = self.stop()?;
        ExitStats::from_stdout(&stdout).with_context(|| {
            format!(
                "reading the exit statistics (stderr in {})",
                stderr.display()
            )
        })
    }
}

/// How a `sip-dispatch` that was expected to refuse to start ended.
#[derive(Debug)]
pub struct FailedStart {
    pub status: std::process::ExitStatus,
    /// Its stderr lines that start with `sip-dispatch: error:` (or clap's `error:`).
    pub errors: Vec<String>,
    /// Its whole stderr.
    pub stderr: String,
    /// Its whole stdout.
    pub stdout: String,
}

/// Runs `binary args...` in `ns`, expecting it to exit (bounded by [`READY_TIMEOUT`])
/// without ever printing its ready line; fails if it becomes ready or does not exit.
pub fn run_failing(
    binary: &Path,
    ns: &str,
    args: &[String],
    dir: &Path,
    label: &str,
) -> Result<FailedStart> {
    run_to_exit(binary, ns, args, dir, label, READY_TIMEOUT)?.never_ready(label)
}

impl FailedStart {
    /// Itself, or an error if it printed its ready line (it should not have started).
    pub fn never_ready(self, label: &str) -> Result<FailedStart> {
        if self.stdout.contains(READY_PREFIX) {
            bail!(
                "{label} became ready ({}) although it should not start",
                self.status
            );
        }
        Ok(self)
    }
}

/// Runs `binary args...` in `ns` and waits (at most `within`) for it to exit; stops it
/// and fails if it does not. Judging how it ended is the caller's.
pub fn run_to_exit(
    binary: &Path,
    ns: &str,
    args: &[String],
    dir: &Path,
    label: &str,
    within: Duration,
) -> Result<FailedStart> {
    let args = with_private_state_file(args, dir);
    let mut process = Process::spawn(ns, &binary.to_string_lossy(), &args, dir, label)?;
    let Some(status) = process.wait_timeout(within)? else {
        let _ = process.stop();
        bail!("{label} did not exit within {within:?}");
    };
    let stopped = process.collect()?;
    let stderr = std::fs::read_to_string(process.stderr_path())
        .with_context(|| format!("reading {}", process.stderr_path().display()))?;
    let errors = stderr
        .lines()
        .filter(|l| l.starts_with("sip-dispatch: error:") || l.starts_with("error:"))
        .map(str::to_owned)
        .collect();
    Ok(FailedStart {
        status,
        errors,
        stderr,
        stdout: stopped.stdout,
    })
}

/// `sip-dispatch: exit-stats {JSON}`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ExitStats {
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    #[serde(default)]
    pub backends: Vec<BackendStats>,
    /// The whole object, for fields not modelled here.
    #[serde(skip)]
    pub raw: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BackendStats {
    pub address: String,
    #[serde(default)]
    pub packets: u64,
    #[serde(default)]
    pub bytes: u64,
    /// Health state (`up`, `down`), with health checks.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub priority: Option<u32>,
    /// `static` or the SRV name the backend came from.
    #[serde(default)]
    pub source: Option<String>,
    /// Round-trip time of the last answered health check.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
}

impl ExitStats {
    /// Finds the exit-stats line in a daemon's stdout and parses it.
    pub fn from_stdout(stdout: &str) -> Result<Self> {
        let line = stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(EXIT_STATS_PREFIX))
            .with_context(|| {
                format!("no {EXIT_STATS_PREFIX:?} line in the daemon's stdout:\n{stdout}")
            })?;
        Self::parse(line)
    }

    pub fn parse(json: &str) -> Result<Self> {
        let raw: serde_json::Value = serde_json::from_str(json)
            .with_context(|| format!("invalid exit-stats JSON {json}"))?;
        let mut stats: ExitStats = serde_json::from_value(raw.clone())
            .with_context(|| format!("unexpected exit-stats JSON shape {json}"))?;
        stats.raw = raw;
        Ok(stats)
    }

    /// A counter, 0 when absent.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// The statistics of the backend at `address`.
    pub fn backend(&self, address: SocketAddr) -> Option<&BackendStats> {
        self.backends
            .iter()
            .find(|b| b.address.parse::<SocketAddr>().ok() == Some(address))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_gets_a_private_state_file_per_control_socket() {
        let dir = Path::new("/tmp/run");
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let run = args(&[
            "run",
            "--iface",
            "v-disp",
            "--control",
            "/run/x/sdt1n0.sock",
        ]);
        let with = with_private_state_file(&run, dir);
        assert_eq!(
            with[run.len()..],
            args(&["--state-file", "/tmp/run/state-sdt1n0.json"])
        );
        let plain = with_private_state_file(&args(&["run", "--iface", "v-disp"]), dir);
        assert_eq!(plain[3..], args(&["--state-file", "/tmp/run/state.json"]));
        let wrapped = args(&["X=1", "/bin/sip-dispatch", "run", "--iface", "v-disp"]);
        assert_eq!(
            with_private_state_file(&wrapped, dir)[5..],
            args(&["--state-file", "/tmp/run/state.json"]),
            "behind env too"
        );
        // Named already, or not `run`: unchanged.
        let named = args(&["run", "--state-file", "/elsewhere.json"]);
        assert_eq!(with_private_state_file(&named, dir), named);
        let pass = args(&["xdp-pass", "--iface", "v-disp"]);
        assert_eq!(with_private_state_file(&pass, dir), pass);
    }

    #[test]
    fn exit_stats_parse() {
        let out = "sip-dispatch: ready iface=v-disp mode=native backends=2\n\
            sip-dispatch: exit-stats {\"counters\":{\"seen\":10,\"xdp_tx\":9,\"pass\":1},\
            \"backends\":[{\"address\":\"198.18.0.21:5060\",\"packets\":6,\"bytes\":600},\
            {\"address\":\"[2001:db8::22]:5060\",\"packets\":3,\"bytes\":300}],\"extra\":1}";
        let s = ExitStats::from_stdout(out).unwrap();
        assert_eq!(s.counter("xdp_tx"), 9);
        assert_eq!(s.counter("missing"), 0);
        assert_eq!(
            s.backend("198.18.0.21:5060".parse().unwrap())
                .unwrap()
                .packets,
            6
        );
        assert_eq!(
            s.backend("[2001:db8::22]:5060".parse().unwrap())
                .unwrap()
                .bytes,
            300
        );
        assert_eq!(s.raw["extra"], 1);
        assert!(ExitStats::from_stdout("sip-dispatch: ready\n").is_err());
        assert!(ExitStats::parse("{not json").is_err());
    }

    #[test]
    fn run_arguments() {
        let mut cfg = RunConfig::new(
            "v-disp",
            "[2001:db8::100]:5060".parse().unwrap(),
            XdpMode::Native,
        );
        cfg.backends = vec![
            BackendArg::new("[2001:db8::21]:5060".parse().unwrap(), 2),
            BackendArg::new("[2001:db8::22]:5060".parse().unwrap(), 1),
        ];
        assert_eq!(cfg.hash_key_file, Some(test_key_file()));
        cfg.hash_key_file = None;
        assert_eq!(
            cfg.args().join(" "),
            "run --iface v-disp --vip [2001:db8::100]:5060 \
             --backend [2001:db8::21]:5060,weight=2 --backend [2001:db8::22]:5060,weight=1 \
             --xdp-mode native"
        );
        cfg.backends[1].priority = Some(20);
        cfg.srv.push("_sip._udp.example.net".to_owned());
        cfg.dns_server = Some("198.18.0.53:53".parse().unwrap());
        cfg.dns_min_ttl = Some(1);
        cfg.control = Some("/run/x/c.sock".into());
        cfg.hash_key_file = Some("/run/x/key".into());
        cfg.extra = vec!["--down-after".to_owned(), "2".to_owned()];
        assert_eq!(
            cfg.args().join(" "),
            "run --iface v-disp --vip [2001:db8::100]:5060 \
             --backend [2001:db8::21]:5060,weight=2 \
             --backend [2001:db8::22]:5060,weight=1,priority=20 \
             --srv _sip._udp.example.net --dns-server 198.18.0.53:53 --dns-min-ttl 1 \
             --control /run/x/c.sock --hash-key-file /run/x/key --xdp-mode native --down-after 2"
        );
    }
}
