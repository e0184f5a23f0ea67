//! Kamailio 5.6 as the stateless dispatcher sip-dispatch replaces: `ds_select_dst("1",
//! "0")` (hash over the Call-ID) then `forward()`, two UDP children, started with
//! `-DD -E -f cfg` inside the dispatcher's namespace, on the VIP, and running as `nobody`.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use sip_dispatch_testbed::process::{self, Process};

/// Where Debian puts Kamailio's modules.
fn module_path() -> Result<PathBuf> {
    let mut candidates = vec![PathBuf::from("/usr/lib/kamailio/modules")];
    if let Ok(dir) = std::fs::read_dir("/usr/lib") {
        for e in dir.flatten() {
            candidates.push(e.path().join("kamailio/modules"));
        }
    }
    candidates
        .into_iter()
        .find(|p| p.join("dispatcher.so").is_file() && p.join("sl.so").is_file())
        .context("Kamailio's dispatcher.so and sl.so not found under /usr/lib")
}

/// The configuration: stateless, no DNS, one listen address.
pub fn config(vip: SocketAddr, modules: &Path, list: &Path) -> String {
    format!(
        r#"#!KAMAILIO
# Written by sd-bench: Kamailio as a stateless SIP dispatcher.
debug=0
log_stderror=yes
children=2
disable_tcp=yes
auto_aliases=no
dns=no
rev_dns=no
listen=udp:{vip}
mpath="{modules}/"
loadmodule "sl.so"
loadmodule "dispatcher.so"
modparam("dispatcher", "list_file", "{list}")
request_route {{
    if (!ds_select_dst("1", "0")) {{
        sl_send_reply("503", "No destination");
        exit;
    }}
    forward();
    exit;
}}
"#,
        modules = modules.display(),
        list = list.display()
    )
}

/// Starts Kamailio in `ns`, pinned to CPU `cpu`, and waits until it listens on `vip`.
pub fn start(
    ns: &str,
    vip: SocketAddr,
    backends: &[SocketAddr],
    dir: &Path,
    label: &str,
    cpu: usize,
) -> Result<Process> {
    let conf_dir = dir.join(label);
    let run_dir = conf_dir.join("run");
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let list = conf_dir.join("dispatcher.list");
    let entries: String = backends.iter().map(|b| format!("1 sip:{b}\n")).collect();
    std::fs::write(&list, entries).with_context(|| format!("writing {}", list.display()))?;
    let cfg = conf_dir.join("kamailio.cfg");
    std::fs::write(&cfg, config(vip, &module_path()?, &list))
        .with_context(|| format!("writing {}", cfg.display()))?;
    let args = [
        "-c".to_owned(),
        cpu.to_string(),
        "kamailio".to_owned(),
        "-DD".to_owned(),
        "-E".to_owned(),
        "-f".to_owned(),
        cfg.to_string_lossy().into_owned(),
        "-Y".to_owned(),
        run_dir.to_string_lossy().into_owned(),
        "-m".to_owned(),
        "128".to_owned(),
        // It needs no privilege once its socket is bound.
        "-u".to_owned(),
        "nobody".to_owned(),
        "-g".to_owned(),
        "nogroup".to_owned(),
    ];
    let mut proc = Process::spawn(ns, "taskset", args, dir, label)?;
    if let Err(e) =
        process::wait_udp_bound(&mut proc, vip.ip(), vip.port(), Duration::from_secs(15))
    {
        bail!("Kamailio did not start: {e:#}");
    }
    Ok(proc)
}
