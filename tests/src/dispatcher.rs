//! Starting the `sip-dispatch` binary (`run` and `xdp-pass`) in a namespace and reading
//! the exit statistics it prints when stopped.
use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::process::Process;

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

/// A backend as given to `--backend ADDR:PORT,weight=N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendArg {
    pub address: SocketAddr,
    pub weight: u32,
}

impl fmt::Display for BackendArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},weight={}", self.address, self.weight)
    }
}

/// The arguments of `sip-dispatch run`.
pub fn run_args(
    iface: &str,
    vip: SocketAddr,
    backends: &[BackendArg],
    mode: XdpMode,
) -> Vec<String> {
    let mut args = vec![
        "run".to_owned(),
        "--iface".to_owned(),
        iface.to_owned(),
        "--vip".to_owned(),
        vip.to_string(),
    ];
    for b in backends {
        args.push("--backend".to_owned());
        args.push(b.to_string());
    }
    args.push("--xdp-mode".to_owned());
    args.push(mode.to_string());
    args
}

/// A running `sip-dispatch` (either subcommand).
#[derive(Debug)]
pub struct Dispatcher {
    process: Process,
    /// The ready line it printed.
    pub ready_line: String,
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
        let program = binary.to_string_lossy();
        let mut process = Process::spawn(ns, &program, args, dir, label)?;
        let ready_line = process.wait_for_line(READY_PREFIX, READY_TIMEOUT)?;
        Ok(Dispatcher {
            process,
            ready_line,
        })
    }

    /// `sip-dispatch run ...` in `ns`.
    pub fn run(
        binary: &Path,
        ns: &str,
        iface: &str,
        vip: SocketAddr,
        backends: &[BackendArg],
        mode: XdpMode,
        dir: &Path,
    ) -> Result<Self> {
        Self::start(
            binary,
            ns,
            &run_args(iface, vip, backends, mode),
            dir,
            "sip-dispatch-run",
        )
    }

    /// `sip-dispatch xdp-pass --iface IF` in `ns`.
    pub fn xdp_pass(binary: &Path, ns: &str, iface: &str, dir: &Path) -> Result<Self> {
        let args = ["xdp-pass", "--iface", iface].map(str::to_owned);
        Self::start(binary, ns, &args, dir, "sip-dispatch-xdp-pass")
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
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
        let args = run_args(
            "v-disp",
            "[2001:db8::100]:5060".parse().unwrap(),
            &[
                BackendArg {
                    address: "[2001:db8::21]:5060".parse().unwrap(),
                    weight: 2,
                },
                BackendArg {
                    address: "[2001:db8::22]:5060".parse().unwrap(),
                    weight: 1,
                },
            ],
            XdpMode::Native,
        );
        assert_eq!(
            args.join(" "),
            "run --iface v-disp --vip [2001:db8::100]:5060 \
             --backend [2001:db8::21]:5060,weight=2 --backend [2001:db8::22]:5060,weight=1 \
             --xdp-mode native"
        );
    }
}
