//! A scripted SIP UAS for the load-aware dispatch tests: one thread serving one or more
//! addresses inside a namespace. It answers OPTIONS (the dispatcher's health probes) with
//! `200 OK` echoing the Via, and, as the test sets it at run time, with RFC 7339 overload
//! feedback (`oc=N;oc-validity=V;oc-seq=S`) or raw Via parameters (malformed feedback);
//! it answers INVITE with `100 Trying` and `200 OK` (To tag, Contact, SDP) so that SIPp's
//! built-in `uac` scenario completes, absorbs ACK, and answers BYE (and any other request)
//! with `200 OK`. Every non-OPTIONS request is logged with its Call-ID, method, the
//! address it arrived at and when, so a test can tell where each call's messages landed.
//!
//! It can also hold everything it sends for a while (`set_delay`): a slow link on the
//! backend's side. The kernels this testbed runs on have no `sch_netem` (nor `fq`, which
//! honours BPF-set departure times), so `tc qdisc ... netem delay` is not available; a
//! delay line at the sender is what netem on the backend's egress would do for the
//! dispatcher, which sees only the probe round trips.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, anyhow, bail};

/// How the UAS answers health probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// The Via as it came (a bare `oc` stays bare: no feedback).
    Echo,
    /// `oc=N;oc-validity=V;oc-seq=S;oc-algo="loss"`, with a sequence that grows with
    /// every answer.
    Overload { oc: u32, validity_ms: u32 },
    /// These Via parameters (each a `;`-separated string without the leading `;`),
    /// one per answer in turn, in place of the request's `oc` parameters.
    Raw(Vec<String>),
}

/// One request that arrived (OPTIONS excepted).
#[derive(Clone, Debug, PartialEq)]
pub struct Arrival {
    /// Seconds since the Unix epoch.
    pub at: f64,
    /// The address it was sent to (which of the UAS's sockets got it).
    pub local: SocketAddr,
    pub call_id: String,
    /// `INVITE`, `ACK`, `BYE`, ...
    pub method: String,
}

/// What the test changes while the UAS runs.
struct Script {
    answer: ProbeAnswer,
    delay: Duration,
}

/// What the UAS saw.
#[derive(Default)]
struct Seen {
    probes: AtomicU64,
    last_probe_via: Mutex<Option<String>>,
    arrivals: Mutex<Vec<Arrival>>,
}

/// A running scripted UAS; stopped on drop.
pub struct ScriptedUas {
    pub addresses: Vec<SocketAddr>,
    script: Arc<Mutex<Script>>,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

/// Longest time the serving loop waits before checking for stop.
const POLL_MS: i32 = 20;

impl ScriptedUas {
    /// Binds `addrs` (port included) inside namespace `ns` and serves them on a thread.
    pub fn start(ns: &str, addrs: &[SocketAddr]) -> Result<ScriptedUas> {
        for a in addrs {
            crate::topology::check_test_address(a.ip())?;
        }
        let script = Arc::new(Mutex::new(Script {
            answer: ProbeAnswer::Echo,
            delay: Duration::ZERO,
        }));
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (ns, addrs) = (ns.to_owned(), addrs.to_vec());
            let (script, seen, stop) = (script.clone(), seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let sockets = match crate::responder::bind_all(&ns, &addrs) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                Server {
                    sockets,
                    script: &script,
                    seen: &seen,
                    stop: &stop,
                    seq_base: epoch_secs() as u64,
                    held: Vec::new(),
                }
                .serve()
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(ScriptedUas {
                addresses: addrs.to_vec(),
                script,
                seen,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => bail!("scripted UAS: {e}"),
            Err(_) => bail!("scripted UAS: not bound within 10 s"),
        }
    }

    /// How the following probes are answered.
    pub fn answer_probes(&self, answer: ProbeAnswer) {
        if let Ok(mut s) = self.script.lock() {
            s.answer = answer;
        }
    }

    /// Holds every datagram sent from now on for `d` (zero: sent at once).
    pub fn set_delay(&self, d: Duration) {
        if let Ok(mut s) = self.script.lock() {
            s.delay = d;
        }
    }

    /// Probes (OPTIONS) answered so far.
    pub fn probes(&self) -> u64 {
        self.seen.probes.load(Ordering::Relaxed)
    }

    /// The top Via of the last probe, as received.
    pub fn last_probe_via(&self) -> Option<String> {
        self.seen.last_probe_via.lock().ok()?.clone()
    }

    /// The requests (OPTIONS excepted) that arrived so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.seen
            .arrivals
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// Stops serving; returns what arrived, or an error the serving loop hit.
    pub fn stop(mut self) -> Result<Vec<Arrival>> {
        self.halt()?;
        Ok(self.arrivals())
    }

    fn halt(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("the scripted UAS thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for ScriptedUas {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A datagram waiting in the delay line.
struct Held {
    due: Instant,
    socket: usize,
    to: SocketAddr,
    bytes: Vec<u8>,
}

struct Server<'a> {
    sockets: Vec<UdpSocket>,
    script: &'a Mutex<Script>,
    seen: &'a Seen,
    stop: &'a AtomicBool,
    /// The integer part of every `oc-seq` (the start, in seconds since the epoch).
    seq_base: u64,
    held: Vec<Held>,
}

impl Server<'_> {
    fn serve(mut self) -> Result<()> {
        let mut fds = crate::responder::poll_set(&self.sockets);
        let mut buf = vec![0u8; 65536];
        while !self.stop.load(Ordering::SeqCst) {
            self.send_due();
            let wait = self
                .held
                .iter()
                .map(|h| h.due.saturating_duration_since(Instant::now()))
                .min()
                .map_or(POLL_MS, |d| (d.as_millis() as i32 + 1).min(POLL_MS));
            if !crate::responder::poll_wait(&mut fds, wait)? {
                continue;
            }
            for (i, pfd) in fds.iter_mut().enumerate() {
                if pfd.revents == 0 {
                    continue;
                }
                pfd.revents = 0;
                // A bounded number of datagrams per socket and wakeup.
                for _ in 0..64 {
                    let Ok((len, from)) = self.sockets[i].recv_from(&mut buf) else {
                        break;
                    };
                    let msg = String::from_utf8_lossy(&buf[..len]).into_owned();
                    self.handle(i, &msg, from);
                }
            }
        }
        Ok(())
    }

    fn handle(&mut self, socket: usize, msg: &str, from: SocketAddr) {
        let Some(method) = msg.split(' ').next().filter(|m| !m.starts_with("SIP/")) else {
            return;
        };
        let local = self.sockets[socket].local_addr().unwrap_or(from);
        if method == "OPTIONS" {
            let n = self.seen.probes.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut via) = self.seen.last_probe_via.lock() {
                *via = header(msg, "via").map(str::to_owned);
            }
            let answer = self
                .script
                .lock()
                .map(|s| s.answer.clone())
                .unwrap_or(ProbeAnswer::Echo);
            let oc = oc_params(&answer, self.seq_base, n);
            self.send(socket, from, probe_answer(msg, from, oc.as_deref()));
            return;
        }
        if let Some(call_id) = header(msg, "call-id")
            && let Ok(mut arrivals) = self.seen.arrivals.lock()
        {
            arrivals.push(Arrival {
                at: epoch_secs(),
                local,
                call_id: call_id.to_owned(),
                method: method.to_owned(),
            });
        }
        match method {
            "ACK" => {}
            "INVITE" => {
                self.send(socket, from, response(msg, 100, "Trying", None));
                self.send(socket, from, response(msg, 200, "OK", Some(local)));
            }
            _ => self.send(socket, from, response(msg, 200, "OK", None)),
        }
    }

    fn send(&mut self, socket: usize, to: SocketAddr, text: String) {
        let delay = self.script.lock().map(|s| s.delay).unwrap_or_default();
        if delay.is_zero() {
            let _ = self.sockets[socket].send_to(text.as_bytes(), to);
        } else {
            self.held.push(Held {
                due: Instant::now() + delay,
                socket,
                to,
                bytes: text.into_bytes(),
            });
        }
    }

    fn send_due(&mut self) {
        let now = Instant::now();
        let sockets = &self.sockets;
        self.held.retain(|h| {
            if h.due > now {
                return true;
            }
            let _ = sockets[h.socket].send_to(&h.bytes, h.to);
            false
        });
    }
}

/// The Via parameters that stand for the request's `oc` ones in the `n`-th probe answer
/// (`None`: echo the Via unchanged).
fn oc_params(answer: &ProbeAnswer, seq_base: u64, n: u64) -> Option<String> {
    match answer {
        ProbeAnswer::Echo => None,
        // Fixed-width fraction: the sequence grows whether it is read as a decimal number
        // or as a pair of integers.
        ProbeAnswer::Overload { oc, validity_ms } => Some(format!(
            "oc={oc};oc-validity={validity_ms};oc-seq={seq_base}.{:05};oc-algo=\"loss\"",
            n % 100_000
        )),
        ProbeAnswer::Raw(list) if list.is_empty() => None,
        ProbeAnswer::Raw(list) => Some(list[(n % list.len() as u64) as usize].clone()),
    }
}

/// The value of the first header `name` (lower case), compact forms included.
pub fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split("\r\n")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .find_map(|line| {
            let (n, v) = line.split_once(':')?;
            (canonical(n) == name).then(|| v.trim())
        })
}

/// A header name in lower case, compact forms expanded.
fn canonical(name: &str) -> String {
    let n = name.trim().to_ascii_lowercase();
    match n.as_str() {
        "v" => "via".into(),
        "f" => "from".into(),
        "t" => "to".into(),
        "i" => "call-id".into(),
        "m" => "contact".into(),
        _ => n,
    }
}

/// `200 OK` to a probe: the Vias, From, To, Call-ID and CSeq copied; the top Via gets
/// `received` and the `rport` value (RFC 3581) of `source`, and, when `oc` is given, loses
/// its `oc` parameters for `oc` (RFC 7339 section 5.2: the server sets the value).
pub fn probe_answer(request: &str, source: SocketAddr, oc: Option<&str>) -> String {
    let mut out = String::from("SIP/2.0 200 OK\r\n");
    let mut top = true;
    for line in head(request) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        match canonical(name).as_str() {
            "via" if top => {
                top = false;
                out.push_str(&format!(
                    "Via: {}\r\n",
                    answer_via(value.trim(), source, oc)
                ));
            }
            "to" => out.push_str(&format!("{}\r\n", with_to_tag(line, request))),
            "via" | "from" | "call-id" | "cseq" => {
                out.push_str(line);
                out.push_str("\r\n");
            }
            _ => {}
        }
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

/// The header lines of a request (after the request line, before the blank line).
fn head(request: &str) -> impl Iterator<Item = &str> {
    request.split("\r\n").skip(1).take_while(|l| !l.is_empty())
}

/// The top Via of a probe's answer (see [`probe_answer`]). Only the first of several
/// comma-separated Vias is changed.
fn answer_via(via: &str, source: SocketAddr, oc: Option<&str>) -> String {
    let (first, rest) = match via.split_once(',') {
        Some((f, r)) => (f, Some(r)),
        None => (via, None),
    };
    let mut parts = first.split(';');
    let mut out = parts.next().unwrap_or_default().trim().to_owned();
    for p in parts {
        let key = p.split('=').next().unwrap_or_default().trim();
        let key = key.to_ascii_lowercase();
        if oc.is_some() && (key == "oc" || key.starts_with("oc-")) {
            continue;
        }
        match key.as_str() {
            "rport" => out.push_str(&format!(";rport={}", source.port())),
            "received" => {}
            _ => {
                out.push(';');
                out.push_str(p);
            }
        }
    }
    out.push_str(&format!(";received={}", source.ip()));
    if let Some(oc) = oc {
        out.push(';');
        out.push_str(oc);
    }
    if let Some(rest) = rest {
        out.push(',');
        out.push_str(rest);
    }
    out
}

/// A tag for the UAS's side of the dialog, the same for every answer to one Call-ID.
fn to_tag(request: &str) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    header(request, "call-id").unwrap_or_default().hash(&mut h);
    format!("uas{:x}", h.finish() & 0xffff_ffff)
}

/// A To header line with a tag (its own if it has one).
fn with_to_tag(line: &str, request: &str) -> String {
    if line.to_ascii_lowercase().contains(";tag=") {
        line.to_owned()
    } else {
        format!("{line};tag={}", to_tag(request))
    }
}

/// A response to `request`: its Vias, From, To (tagged unless `100`), Call-ID and CSeq;
/// with `contact`, a Contact and a minimal SDP answer on that address (a `200` to an
/// INVITE).
pub fn response(request: &str, code: u16, reason: &str, contact: Option<SocketAddr>) -> String {
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for line in head(request) {
        let Some((name, _)) = line.split_once(':') else {
            continue;
        };
        match canonical(name).as_str() {
            "to" if code > 100 => out.push_str(&format!("{}\r\n", with_to_tag(line, request))),
            "via" | "from" | "to" | "call-id" | "cseq" => {
                out.push_str(line);
                out.push_str("\r\n");
            }
            _ => {}
        }
    }
    match contact {
        Some(local) => {
            let family = if local.is_ipv6() { "IP6" } else { "IP4" };
            let ip = local.ip();
            let sdp = format!(
                "v=0\r\no=uas 1 1 IN {family} {ip}\r\ns=-\r\nc=IN {family} {ip}\r\nt=0 0\r\n\
                 m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
            );
            let uri_host = match local {
                SocketAddr::V4(a) => a.to_string(),
                SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
            };
            out.push_str(&format!(
                "Contact: <sip:uas@{uri_host}>\r\nContent-Type: application/sdp\r\n\
                 Content-Length: {}\r\n\r\n{sdp}",
                sdp.len()
            ));
        }
        None => out.push_str("Content-Length: 0\r\n\r\n"),
    }
    out
}

/// Where one call's requests landed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Landing {
    /// Every address any of its requests arrived at.
    pub backends: BTreeSet<SocketAddr>,
    /// Methods that arrived, with how often.
    pub methods: BTreeMap<String, u32>,
    /// When its first INVITE arrived (epoch seconds; infinite if none did).
    pub invite_at: f64,
    /// When its first BYE arrived (epoch seconds), if one did.
    pub bye_at: Option<f64>,
}

impl Landing {
    /// The one backend where its INVITE, ACK and BYE all arrived, and nothing elsewhere.
    pub fn one_backend(&self) -> Option<SocketAddr> {
        let all = ["INVITE", "ACK", "BYE"]
            .iter()
            .all(|m| self.methods.contains_key(*m));
        match (all, self.backends.len()) {
            (true, 1) => self.backends.first().copied(),
            _ => None,
        }
    }
}

/// Per Call-ID, where its requests landed (the arrivals of every UAS, in any order).
pub fn landings(arrivals: &[Arrival]) -> BTreeMap<String, Landing> {
    let mut out: BTreeMap<String, Landing> = BTreeMap::new();
    for a in arrivals {
        let l = out.entry(a.call_id.clone()).or_insert_with(|| Landing {
            invite_at: f64::INFINITY,
            ..Landing::default()
        });
        l.backends.insert(a.local);
        *l.methods.entry(a.method.clone()).or_default() += 1;
        match a.method.as_str() {
            "INVITE" => l.invite_at = l.invite_at.min(a.at),
            "BYE" => l.bye_at = Some(l.bye_at.map_or(a.at, |b| b.min(a.at))),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE: &str = "OPTIONS sip:198.18.0.21:5060 SIP/2.0\r\n\
        Via: SIP/2.0/UDP 198.18.0.2:40000;branch=z9hG4bKp1;rport;oc;oc-algo=\"loss\"\r\n\
        Max-Forwards: 70\r\nFrom: <sip:sip-dispatch@198.18.0.2>;tag=f1\r\n\
        To: <sip:198.18.0.21:5060>\r\nCall-ID: hc1\r\nCSeq: 7 OPTIONS\r\n\
        Content-Length: 0\r\n\r\n";

    fn src() -> SocketAddr {
        "198.18.0.2:40000".parse().unwrap()
    }

    #[test]
    fn probe_echo_keeps_the_bare_oc() {
        let r = probe_answer(PROBE, src(), None);
        assert!(
            r.starts_with(
                "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 198.18.0.2:40000;branch=z9hG4bKp1;\
                 rport=40000;oc;oc-algo=\"loss\";received=198.18.0.2\r\n"
            ),
            "{r}"
        );
        assert!(r.contains("\r\nFrom: <sip:sip-dispatch@198.18.0.2>;tag=f1\r\n"));
        assert!(r.contains("\r\nTo: <sip:198.18.0.21:5060>;tag=uas"));
        assert!(r.contains("\r\nCall-ID: hc1\r\nCSeq: 7 OPTIONS\r\n"));
        assert!(r.ends_with("Content-Length: 0\r\n\r\n"));
        assert!(!r.contains("Max-Forwards"));
    }

    #[test]
    fn probe_overload_replaces_the_oc_parameters() {
        let oc = oc_params(
            &ProbeAnswer::Overload {
                oc: 50,
                validity_ms: 1000,
            },
            1_800_000_000,
            7,
        );
        let r = probe_answer(PROBE, src(), oc.as_deref());
        let via = header(&r, "via").unwrap();
        assert_eq!(
            via,
            "SIP/2.0/UDP 198.18.0.2:40000;branch=z9hG4bKp1;rport=40000;\
             received=198.18.0.2;oc=50;oc-validity=1000;oc-seq=1800000000.00007;oc-algo=\"loss\""
        );
        // Raw parameters in turn, one per answer.
        let raw = ProbeAnswer::Raw(vec!["oc=150".into(), "oc=5x".into()]);
        assert_eq!(oc_params(&raw, 1, 0).as_deref(), Some("oc=150"));
        assert_eq!(oc_params(&raw, 1, 3).as_deref(), Some("oc=5x"));
        assert_eq!(oc_params(&ProbeAnswer::Raw(vec![]), 1, 3), None);
        assert_eq!(oc_params(&ProbeAnswer::Echo, 1, 3), None);
        let r = probe_answer(PROBE, src(), Some("oc=50;oc=50"));
        assert!(
            header(&r, "via")
                .unwrap()
                .ends_with(";received=198.18.0.2;oc=50;oc=50"),
            "{r}"
        );
    }

    #[test]
    fn only_the_top_via_changes() {
        let req = "OPTIONS sip:x SIP/2.0\r\nv: SIP/2.0/UDP a:1;branch=z9hG4bK1;oc, \
                   SIP/2.0/UDP b:2;branch=z9hG4bK2;oc\r\nVia: SIP/2.0/UDP c:3;branch=z9hG4bK3\r\n\
                   i: c1\r\n\r\n";
        let r = probe_answer(req, src(), Some("oc=10"));
        assert!(
            r.contains(
                "Via: SIP/2.0/UDP a:1;branch=z9hG4bK1;received=198.18.0.2;oc=10, \
                 SIP/2.0/UDP b:2;branch=z9hG4bK2;oc\r\nVia: SIP/2.0/UDP c:3;branch=z9hG4bK3\r\n"
            ),
            "{r}"
        );
        assert!(r.contains("\r\ni: c1\r\n"));
    }

    const INVITE: &str = "INVITE sip:service@198.18.0.100:5060 SIP/2.0\r\n\
        Via: SIP/2.0/UDP 198.18.0.10:5070;branch=z9hG4bK-1\r\n\
        From: sipp <sip:sipp@198.18.0.10:5070>;tag=1SIPpTag001\r\n\
        To: service <sip:service@198.18.0.100:5060>\r\nCall-ID: 1-sdt@198.18.0.10\r\n\
        CSeq: 1 INVITE\r\nContact: sip:sipp@198.18.0.10:5070\r\nMax-Forwards: 70\r\n\
        Content-Type: application/sdp\r\nContent-Length: 3\r\n\r\nv=0";

    #[test]
    fn invite_answers() {
        let local: SocketAddr = "198.18.0.21:5060".parse().unwrap();
        let trying = response(INVITE, 100, "Trying", None);
        assert!(trying.starts_with("SIP/2.0 100 Trying\r\nVia: SIP/2.0/UDP 198.18.0.10:5070"));
        assert!(trying.contains("\r\nTo: service <sip:service@198.18.0.100:5060>\r\n"));
        assert!(trying.ends_with("\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"));

        let ok = response(INVITE, 200, "OK", Some(local));
        let tag = to_tag(INVITE);
        assert!(ok.starts_with("SIP/2.0 200 OK\r\n"));
        assert!(ok.contains(&format!(
            "\r\nTo: service <sip:service@198.18.0.100:5060>;tag={tag}\r\n"
        )));
        assert!(ok.contains("\r\nContact: <sip:uas@198.18.0.21:5060>\r\n"));
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.ends_with(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("c=IN IP4 198.18.0.21\r\n"));
        // A retransmitted INVITE gets the same tag; another call another.
        assert_eq!(to_tag(INVITE), tag);
        assert_ne!(to_tag(&INVITE.replace("1-sdt", "2-sdt")), tag);

        let v6: SocketAddr = "[2001:db8::21]:5060".parse().unwrap();
        let ok6 = response(INVITE, 200, "OK", Some(v6));
        assert!(ok6.contains("Contact: <sip:uas@[2001:db8::21]:5060>"));
        assert!(ok6.contains("c=IN IP6 2001:db8::21\r\n"));

        // A BYE (To already tagged) keeps its tag.
        let bye = INVITE
            .replace("INVITE sip", "BYE sip")
            .replace("CSeq: 1 INVITE", "CSeq: 2 BYE")
            .replace("0:5060>\r\n", "0:5060>;tag=abc\r\n");
        let r = response(&bye, 200, "OK", None);
        assert!(r.contains("0:5060>;tag=abc\r\nCall-ID"), "{r}");
        assert!(!r.contains("tag=uas"));
    }

    #[test]
    fn landings_per_call() {
        let b1: SocketAddr = "198.18.0.21:5060".parse().unwrap();
        let b2: SocketAddr = "198.18.0.22:5060".parse().unwrap();
        let a = |at: f64, local, id: &str, m: &str| Arrival {
            at,
            local,
            call_id: id.into(),
            method: m.into(),
        };
        let l = landings(&[
            a(2.0, b1, "c1", "INVITE"),
            a(1.0, b1, "c1", "INVITE"),
            a(3.0, b1, "c1", "ACK"),
            a(4.0, b1, "c1", "BYE"),
            a(1.0, b1, "c2", "INVITE"),
            a(2.0, b1, "c2", "ACK"),
            a(3.0, b2, "c2", "BYE"),
            a(1.0, b2, "c3", "INVITE"),
        ]);
        assert_eq!(l["c1"].one_backend(), Some(b1));
        assert_eq!(l["c1"].invite_at, 1.0);
        assert_eq!(l["c1"].bye_at, Some(4.0));
        assert_eq!(l["c1"].methods["INVITE"], 2);
        assert_eq!(l["c2"].one_backend(), None, "split across backends");
        assert_eq!(l["c3"].one_backend(), None, "no ACK, no BYE");
    }
}
