//! A real DNS server for the tests: BIND 9 (`named`, Debian package bind9) in a namespace
//! of the topology, authoritative for one zone written by the test, and `dig`
//! (bind9-dnsutils) to see what it answers.
//!
//! How named runs here (checked with BIND 9.18 on Debian 12):
//! - in the foreground with its log on stderr (`-g`), as root (no `-u`: it keeps root,
//!   which may read the run directory), one worker thread (`-n 1`), with a `named.conf`
//!   of its own in the run directory: `directory`, `pid-file`, `session-keyfile` and
//!   `managed-keys-directory` all point there, `recursion no`, no DNSSEC validation, no
//!   NOTIFY, no control channel (`controls { };`, so no rndc key is needed), listening
//!   only on the DNS host's addresses;
//! - it logs `running` once it serves, and `zone NAME/IN: loaded serial N` after each
//!   (re)load: the harness waits for those lines, then confirms with `dig`;
//! - SIGHUP reloads the configuration and the zones whose files changed; SIGTERM stops it.
//!
//! AppArmor: Debian's `usr.sbin.named` profile would forbid reading a configuration
//! outside /etc/bind and /var/cache/bind; on a machine where it is enforced the server
//! cannot start and [`check_apparmor`] says so.
use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    events::Moment,
    netns,
    process::{Process, Wait},
    topology::check_test_address,
};

/// How long named may take to start or to reload.
pub const NAMED_TIMEOUT: Duration = Duration::from_secs(10);

/// One record of the test zone (names relative to the origin, or absolute with a dot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Srv {
        name: String,
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    /// An A or AAAA record, depending on the address.
    Addr { name: String, address: IpAddr },
}

/// A zone file: SOA, NS, the name server's address, and the test's records. Every
/// record gets the zone's TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// Without the final dot, e.g. `example.net`.
    pub origin: String,
    pub ttl: u32,
    pub serial: u32,
    /// The address of `ns.<origin>`, the name server.
    pub ns_address: IpAddr,
    pub records: Vec<Record>,
}

impl Zone {
    pub fn new(origin: &str, ttl: u32, ns_address: IpAddr) -> Self {
        Zone {
            origin: origin.trim_end_matches('.').to_owned(),
            ttl,
            serial: 1,
            ns_address,
            records: Vec::new(),
        }
    }

    /// Adds `name IN SRV priority weight port target`.
    pub fn srv(&mut self, name: &str, priority: u16, weight: u16, port: u16, target: &str) {
        self.records.push(Record::Srv {
            name: name.to_owned(),
            priority,
            weight,
            port,
            target: target.to_owned(),
        });
    }

    /// Adds an A or AAAA record per address.
    pub fn host(&mut self, name: &str, addresses: &[IpAddr]) {
        for &address in addresses {
            self.records.push(Record::Addr {
                name: name.to_owned(),
                address,
            });
        }
    }

    /// Removes the SRV records pointing at `target`.
    pub fn remove_srv_target(&mut self, target: &str) {
        self.records
            .retain(|r| !matches!(r, Record::Srv { target: t, .. } if t == target));
    }

    /// Sets the weight of the SRV records pointing at `target`.
    pub fn set_srv_weight(&mut self, target: &str, weight: u16) {
        for r in &mut self.records {
            if let Record::Srv {
                target: t,
                weight: w,
                ..
            } = r
                && t == target
            {
                *w = weight;
            }
        }
    }

    /// `name` as an absolute name without the final dot: names ending in a dot or in
    /// the origin are taken as absolute, others as relative to the origin.
    pub fn fqdn(&self, name: &str) -> String {
        if let Some(abs) = name.strip_suffix('.') {
            abs.to_owned()
        } else if name == "@" {
            self.origin.clone()
        } else if name == self.origin || name.ends_with(&format!(".{}", self.origin)) {
            name.to_owned()
        } else {
            format!("{name}.{}", self.origin)
        }
    }

    /// The SRV records of `name` the way `dig +short` prints them, sorted.
    pub fn srv_answer(&self, name: &str) -> Vec<String> {
        let owner = self.fqdn(name);
        let mut v: Vec<String> = self
            .records
            .iter()
            .filter_map(|r| match r {
                Record::Srv {
                    name: n,
                    priority,
                    weight,
                    port,
                    target,
                } if self.fqdn(n) == owner => {
                    Some(format!("{priority} {weight} {port} {}.", self.fqdn(target)))
                }
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    /// The zone file.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "$ORIGIN {}.", self.origin);
        let _ = writeln!(s, "$TTL {}", self.ttl);
        let _ = writeln!(
            s,
            "@ IN SOA ns hostmaster {} 60 60 600 {}",
            self.serial, self.ttl
        );
        let _ = writeln!(s, "@ IN NS ns");
        let _ = writeln!(
            s,
            "ns IN {} {}",
            addr_type(self.ns_address),
            self.ns_address
        );
        for r in &self.records {
            match r {
                Record::Srv {
                    name,
                    priority,
                    weight,
                    port,
                    target,
                } => {
                    let _ = writeln!(s, "{name} IN SRV {priority} {weight} {port} {target}");
                }
                Record::Addr { name, address } => {
                    let _ = writeln!(s, "{name} IN {} {address}", addr_type(*address));
                }
            }
        }
        s
    }
}

fn addr_type(a: IpAddr) -> &'static str {
    if a.is_ipv4() { "A" } else { "AAAA" }
}

/// The named.conf of the test server.
pub fn named_conf(dir: &Path, zone: &Zone, zone_file: &Path, listen: &[IpAddr]) -> String {
    let v4: Vec<String> = listen
        .iter()
        .filter(|a| a.is_ipv4())
        .map(|a| format!("{a};"))
        .collect();
    let v6: Vec<String> = listen
        .iter()
        .filter(|a| a.is_ipv6())
        .map(|a| format!("{a};"))
        .collect();
    let list = |v: &[String]| {
        if v.is_empty() {
            "none;".to_owned()
        } else {
            v.join(" ")
        }
    };
    let d = dir.display();
    format!(
        r#"// Written by the sip-dispatch testbed: an authoritative-only server for one zone.
options {{
    directory "{d}";
    pid-file "{d}/named.pid";
    session-keyfile "{d}/session.key";
    managed-keys-directory "{d}";
    listen-on port 53 {{ {v4} }};
    listen-on-v6 port 53 {{ {v6} }};
    recursion no;
    dnssec-validation no;
    notify no;
    allow-query {{ any; }};
}};
controls {{ }};
zone "{origin}" {{
    type primary;
    file "{zone_file}";
}};
"#,
        v4 = list(&v4),
        v6 = list(&v6),
        origin = zone.origin,
        zone_file = zone_file.display(),
    )
}

/// Fails when AppArmor enforces Debian's named profile (named could not read its
/// configuration from the run directory).
pub fn check_apparmor() -> Result<()> {
    let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y");
    if !enabled {
        return Ok(());
    }
    let profiles =
        std::fs::read_to_string("/sys/kernel/security/apparmor/profiles").unwrap_or_default();
    if let Some(p) = profiles
        .lines()
        .find(|l| l.contains("named") && l.contains("(enforce)"))
    {
        bail!(
            "AppArmor enforces {p:?}: named could not read the test configuration; \
             put the profile in complain mode (aa-complain /usr/sbin/named) to run these tests"
        );
    }
    Ok(())
}

/// When a zone reload was asked for (SIGHUP) and when `dig` first got the new zone.
#[derive(Debug, Clone, Copy)]
pub struct Reload {
    pub signalled: Moment,
    pub served: Moment,
}

/// `named` serving a [`Zone`] in namespace `ns`; stopped on drop.
pub struct DnsServer {
    ns: String,
    address: IpAddr,
    dir: PathBuf,
    conf: PathBuf,
    zone_file: PathBuf,
    zone: Zone,
    process: Option<Process>,
    starts: u32,
}

impl DnsServer {
    /// Writes the configuration and the zone under `dir/named`, starts named in `ns`
    /// listening on `address`, and waits until `dig` gets the zone's SOA from it.
    pub fn start(ns: &str, address: IpAddr, dir: &Path, zone: Zone) -> Result<Self> {
        check_test_address(address)?;
        check_apparmor()?;
        let dir = dir.join("named");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = dir.join("named.conf");
        let zone_file = dir.join(format!("{}.zone", zone.origin));
        std::fs::write(&conf, named_conf(&dir, &zone, &zone_file, &[address]))
            .with_context(|| format!("writing {}", conf.display()))?;
        let mut server = DnsServer {
            ns: ns.to_owned(),
            address,
            dir,
            conf,
            zone_file,
            zone,
            process: None,
            starts: 0,
        };
        server.write_zone()?;
        server.resume()?;
        Ok(server)
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::new(self.address, 53)
    }

    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    pub fn running(&self) -> bool {
        self.process.is_some()
    }

    fn write_zone(&self) -> Result<()> {
        std::fs::write(&self.zone_file, self.zone.render())
            .with_context(|| format!("writing {}", self.zone_file.display()))
    }

    /// Starts named again (after [`stop`](Self::stop)) with the current zone and waits
    /// until it answers; returns when `dig` first got the answer.
    pub fn resume(&mut self) -> Result<Moment> {
        ensure!(self.process.is_none(), "named is already running");
        self.starts += 1;
        let label = format!("named-{}", self.starts);
        let mut process = Process::spawn(
            &self.ns,
            "named",
            ["-g", "-n", "1", "-c", &self.conf.to_string_lossy()],
            &self.dir,
            &label,
        )?;
        let log = process.stderr_lines();
        match log.wait_for(0, NAMED_TIMEOUT, |l| l.ends_with(" running").then_some(()))? {
            Wait::Found(..) => {}
            Wait::Eof => {
                let status = process.wait_timeout(Duration::from_secs(2))?;
                bail!(
                    "named exited ({status:?}) before serving; `{}`; log:\n{}",
                    process.command_line(),
                    process.stderr_tail(30)
                );
            }
            Wait::TimedOut => bail!(
                "named did not log `running` within {NAMED_TIMEOUT:?}; log:\n{}",
                process.stderr_tail(30)
            ),
        }
        self.process = Some(process);
        self.wait_serving(self.zone.serial, &self.ns.clone())
    }

    /// Stops named (SIGTERM, bounded wait). Returns when it is gone.
    pub fn stop(&mut self) -> Result<Moment> {
        let mut process = self.process.take().context("named is not running")?;
        let stopped = process.stop()?;
        ensure!(
            !stopped.killed,
            "named ignored SIGTERM and was killed; log:\n{}",
            process.stderr_tail(20)
        );
        Ok(Moment::now())
    }

    /// Serves `zone` instead (its serial is set above the current one): writes the
    /// file, sends SIGHUP and waits until named logs the new serial and `dig` sees it.
    pub fn reload(&mut self, mut zone: Zone) -> Result<Reload> {
        zone.serial = self.zone.serial + 1;
        self.zone = zone;
        self.write_zone()?;
        let process = self.process.as_mut().context("named is not running")?;
        let log = process.stderr_lines();
        let wanted = format!(
            "zone {}/IN: loaded serial {}",
            self.zone.origin, self.zone.serial
        );
        let mut from = log.len();
        // named skips a zone whose file looks unchanged: at most a few tries.
        let mut loaded = false;
        let mut signalled = Moment::now();
        for _ in 0..3 {
            signalled = Moment::now();
            process.signal(libc::SIGHUP)?;
            match log.wait_for(from, Duration::from_secs(2), |l| {
                l.contains(&wanted).then_some(())
            })? {
                Wait::Found(..) => {
                    loaded = true;
                    break;
                }
                Wait::Eof => bail!("named exited on SIGHUP; log:\n{}", process.stderr_tail(30)),
                Wait::TimedOut => from = log.len(),
            }
        }
        ensure!(
            loaded,
            "named did not log {wanted:?} after three SIGHUPs; log:\n{}",
            process.stderr_tail(30)
        );
        let served = self.wait_serving(self.zone.serial, &self.ns.clone())?;
        Ok(Reload { signalled, served })
    }

    /// Polls with `dig` (from namespace `ns`) until the SOA serial is `serial`; returns
    /// when it was.
    pub fn wait_serving(&self, serial: u32, ns: &str) -> Result<Moment> {
        let deadline = Instant::now() + NAMED_TIMEOUT;
        let origin = self.zone.origin.clone();
        loop {
            let soa = self.dig(ns, &origin, "SOA");
            if let Ok(answer) = &soa
                && answer
                    .first()
                    .and_then(|l| l.split_whitespace().nth(2))
                    .is_some_and(|s| s == serial.to_string())
            {
                return Ok(Moment::now());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not serve serial {serial} of {origin} within {NAMED_TIMEOUT:?}: {soa:?}",
                    self.address
                );
            }
            crate::cancel::check()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `dig +short NAME TYPE` against this server, run in namespace `ns`: the answer
    /// lines.
    pub fn dig(&self, ns: &str, name: &str, rtype: &str) -> Result<Vec<String>> {
        let server = format!("@{}", self.address);
        let out = netns::exec(
            ns,
            "dig",
            [
                "+short", "+norec", "+tries=1", "+time=1", &server, name, rtype,
            ],
        )?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with(";;"))
            .map(str::to_owned)
            .collect())
    }

    /// The SRV answer for `name` as `dig +short` prints it, sorted.
    pub fn srv_answer(&self, ns: &str, name: &str) -> Result<Vec<String>> {
        let mut v = self.dig(ns, name, "SRV")?;
        v.sort();
        Ok(v)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.stop_with(Duration::from_secs(3));
        }
    }
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("ns", &self.ns)
            .field("address", &self.address)
            .field("running", &self.process.is_some())
            .field("serial", &self.zone.serial)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        let mut z = Zone::new("example.net.", 2, "198.18.0.53".parse().unwrap());
        z.srv("_sip._udp", 10, 60, 5060, "b1");
        z.srv("_sip._udp", 20, 0, 5060, "b2");
        z.host(
            "b1",
            &[
                "198.18.0.21".parse().unwrap(),
                "2001:db8::21".parse().unwrap(),
            ],
        );
        z
    }

    #[test]
    fn zone_file() {
        let text = zone().render();
        assert!(text.starts_with("$ORIGIN example.net.\n$TTL 2\n"), "{text}");
        assert!(text.contains("@ IN SOA ns hostmaster 1 60 60 600 2\n"));
        assert!(text.contains("ns IN A 198.18.0.53\n"));
        assert!(text.contains("_sip._udp IN SRV 10 60 5060 b1\n"));
        assert!(text.contains("b1 IN A 198.18.0.21\nb1 IN AAAA 2001:db8::21\n"));
    }

    #[test]
    fn zone_edits_and_answers() {
        let mut z = zone();
        assert_eq!(z.fqdn("_sip._udp"), "_sip._udp.example.net");
        assert_eq!(z.fqdn("other.org."), "other.org");
        assert_eq!(z.fqdn("_sip._udp.example.net"), "_sip._udp.example.net");
        assert_eq!(
            z.srv_answer("_sip._udp"),
            vec!["10 60 5060 b1.example.net.", "20 0 5060 b2.example.net."]
        );
        z.set_srv_weight("b1", 5);
        z.remove_srv_target("b2");
        assert_eq!(
            z.srv_answer("_sip._udp.example.net."),
            vec!["10 5 5060 b1.example.net."]
        );
    }

    #[test]
    fn conf_listens_where_asked() {
        let dir = Path::new("/run/x");
        let conf = named_conf(
            dir,
            &zone(),
            &dir.join("example.net.zone"),
            &["198.18.0.53".parse().unwrap()],
        );
        assert!(
            conf.contains("listen-on port 53 { 198.18.0.53; };"),
            "{conf}"
        );
        assert!(conf.contains("listen-on-v6 port 53 { none; };"));
        assert!(conf.contains("recursion no;"));
        assert!(conf.contains(r#"zone "example.net" {"#));
        assert!(conf.contains(r#"file "/run/x/example.net.zone";"#));
    }
}
