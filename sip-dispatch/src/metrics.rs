//! `--metrics ADDR:PORT`: Prometheus text exposition (format 0.0.4) over plain HTTP.
//! A scrape asks the controller for a snapshot through the control channel, so the
//! numbers are the ones `sip-dispatch stats` shows; the rendered page is kept for
//! [`CACHE_FOR`], so a storm of scrapes costs one snapshot a second.
//!
//! At most [`MAX_CONNECTIONS`] connections are open at once, each with [`IO_TIMEOUT`]
//! to send its request and to take the answer. When all are taken, the one that has
//! waited longest for its request is closed to make room: idle connections cannot keep
//! a scraper out.
use std::{
    collections::VecDeque,
    fmt::Write as _,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
};

use crate::{
    control::{AcceptBackoff, Command},
    protocol::{
        BackendSnapshot, BackendState, Reply, Request, Snapshot, TableSnapshot, slow_path_counters,
    },
};

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client has to send its request, and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a rendered page is served again before a new snapshot is taken.
pub const CACHE_FOR: Duration = Duration::from_secs(1);

pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr}"))
}

/// Connections still waiting for their request, oldest first: whom to close when every
/// connection slot is taken.
#[derive(Default)]
struct Waiting {
    next_id: u64,
    queue: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Waiting {
    fn add(&mut self) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.queue.push_back((id, tx));
        (id, rx)
    }

    fn remove(&mut self, id: u64) {
        self.queue.retain(|(i, _)| *i != id);
    }

    /// Tells the oldest waiting connection to close; false when none waits.
    fn evict_oldest(&mut self) -> bool {
        while let Some((_, close)) = self.queue.pop_front() {
            if close.send(()).is_ok() {
                return true;
            }
        }
        false
    }
}

/// The last page rendered, and when.
type Cache = tokio::sync::Mutex<Option<(Instant, Option<String>)>>;

/// Serves scrapes until the task is dropped.
pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Command>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let waiting = Arc::new(Mutex::new(Waiting::default()));
    let cache: Arc<Cache> = Arc::default();
    let mut backoff = AcceptBackoff::new();
    loop {
        let Some(stream) = backoff
            .accepted("metrics listener", listener.accept().await)
            .await
        else {
            continue;
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let evicted = waiting
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .evict_oldest();
                if !evicted {
                    // Every connection is busy answering (each within IO_TIMEOUT).
                    log::debug!("metrics: {MAX_CONNECTIONS} connections busy, closing a new one");
                    continue;
                }
                match permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        let (id, evicted) = waiting.lock().unwrap_or_else(PoisonError::into_inner).add();
        let (tx, waiting, cache) = (tx.clone(), waiting.clone(), cache.clone());
        tokio::spawn(async move {
            let got_request = tokio::select! {
                r = read_request(&stream) => r,
                _ = evicted => false,
            };
            waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(id);
            if got_request {
                scrape(stream, &tx, &cache).await;
            }
            drop(permit);
        });
    }
}

/// Waits up to [`IO_TIMEOUT`] for the request; the request line is all we look at (any
/// path serves the metrics), so its first bytes are enough.
async fn read_request(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(IO_TIMEOUT, stream.readable()).await {
            Ok(Ok(())) => match stream.try_read(&mut buf) {
                Ok(0) => return false,
                Ok(_) => return true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return false,
            },
            _ => return false,
        }
    }
}

async fn scrape(mut stream: TcpStream, tx: &mpsc::Sender<Command>, cache: &Cache) {
    let body = cached_page(tx, cache).await;
    let response = match body {
        Some(body) => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        None => {
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .into()
        }
    };
    let _ = tokio::time::timeout(IO_TIMEOUT, stream.write_all(response.as_bytes())).await;
}

/// The page of the last [`CACHE_FOR`], else a fresh one. Scrapes that arrive while a
/// snapshot is taken wait for it rather than asking again.
async fn cached_page(tx: &mpsc::Sender<Command>, cache: &Cache) -> Option<String> {
    let mut cached = cache.lock().await;
    if let Some((at, page)) = cached.as_ref()
        && at.elapsed() < CACHE_FOR
    {
        return page.clone();
    }
    let (reply, answer) = oneshot::channel();
    let page = match tx.send((Request::Stats, reply)).await {
        Ok(()) => match answer.await {
            Ok(Ok(Reply::Stats(s))) => Some(render(&s)),
            _ => None,
        },
        Err(_) => None,
    };
    *cached = Some((Instant::now(), page.clone()));
    page
}

/// A per-backend metric family: name, type, help, and how to read its value.
type BackendFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&BackendSnapshot) -> String,
);

/// A per-service table metric family: name, type, help, and how to read its value.
type TableFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&TableSnapshot) -> u64,
);

/// The snapshot in Prometheus text format.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(
            out,
            "# HELP sip_dispatch_{name} {help}\n# TYPE sip_dispatch_{name} {kind}"
        );
    };
    family(
        "fastpath_packets_total",
        "counter",
        "Packets seen by the XDP program, by outcome.",
    );
    let mut lines = String::new();
    let mut affinity = String::new();
    let mut fib_fallbacks = None;
    for (reason, v) in s.counters.iter() {
        // Not an outcome either: how a dispatched or passed packet found its next hop.
        if reason == sip_dispatch_common::Counter::FibFallback.name() {
            fib_fallbacks = Some(v);
            continue;
        }
        // Affinity events are not packet outcomes (a packet has one of each).
        if let Some(event) = reason.strip_prefix("affinity_") {
            let _ = writeln!(
                affinity,
                "sip_dispatch_affinity_events_total{{path=\"fast\",event=\"{event}\"}} {v}"
            );
            continue;
        }
        let _ = writeln!(
            lines,
            "sip_dispatch_fastpath_packets_total{{outcome=\"{reason}\"}} {v}"
        );
    }
    out.push_str(&lines);
    if let Some(n) = fib_fallbacks {
        let _ = writeln!(
            out,
            "# HELP sip_dispatch_fastpath_fib_fallbacks_total Packets whose next hop came from a FIB lookup (the backend's next-hop entry was not valid).\n\
             # TYPE sip_dispatch_fastpath_fib_fallbacks_total counter\n\
             sip_dispatch_fastpath_fib_fallbacks_total {n}"
        );
    }
    let per_backend: [BackendFamily; 9] = [
        (
            "backend_packets_total",
            "counter",
            "Packets dispatched to the backend (fast path and slow path).",
            |b| b.packets.to_string(),
        ),
        (
            "backend_bytes_total",
            "counter",
            "Bytes dispatched to the backend (fast path and slow path).",
            |b| b.bytes.to_string(),
        ),
        (
            "backend_up",
            "gauge",
            "1 when the backend takes calls (healthy and enabled).",
            |b| u8::from(b.state == BackendState::Up).to_string(),
        ),
        (
            "backend_rtt_seconds",
            "gauge",
            "Smoothed round trip of the OPTIONS health checks.",
            |b| {
                b.rtt_ms
                    .map_or("NaN".into(), |ms| (ms / 1000.0).to_string())
            },
        ),
        (
            "backend_effective_weight",
            "gauge",
            "The weight the table gives the backend for new calls, in its weight's units, after RFC 7339 overload and --latency-aware; 0 when it takes none.",
            |b| {
                b.load
                    .effective_weight
                    .map_or("NaN".into(), |w| w.to_string())
            },
        ),
        (
            "backend_overload_percent",
            "gauge",
            "The RFC 7339 overload feedback in force (oc: percent of new calls sent elsewhere); 0 when none.",
            |b| b.load.overload.unwrap_or(0).to_string(),
        ),
        (
            "backend_latency_factor",
            "gauge",
            "The share of its weight the backend's probe round trip leaves it (--latency-aware; 1 otherwise).",
            |b| b.load.latency_factor.to_string(),
        ),
        (
            "health_checks_total",
            "counter",
            "OPTIONS health checks sent.",
            |b| b.checks.to_string(),
        ),
        (
            "health_check_failures_total",
            "counter",
            "Failed OPTIONS health checks.",
            |b| b.check_failures.to_string(),
        ),
    ];
    for (name, kind, help, value) in per_backend {
        let _ = writeln!(
            out,
            "# HELP sip_dispatch_{name} {help}\n# TYPE sip_dispatch_{name} {kind}"
        );
        for b in &s.backends {
            let _ = writeln!(
                out,
                "sip_dispatch_{name}{{service=\"{}\",backend=\"{}\",source=\"{}\"}} {}",
                b.service,
                b.address,
                b.source,
                value(b)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP sip_dispatch_overload_feedback_total RFC 7339 overload feedback in health-check answers, by result (accepted; stale: an older oc-seq; malformed).\n\
         # TYPE sip_dispatch_overload_feedback_total counter"
    );
    for b in &s.backends {
        for (result, n) in [
            ("accepted", b.load.oc_accepted),
            ("stale", b.load.oc_stale),
            ("malformed", b.load.oc_malformed),
        ] {
            let _ = writeln!(
                out,
                "sip_dispatch_overload_feedback_total{{service=\"{}\",backend=\"{}\",source=\"{}\",result=\"{result}\"}} {n}",
                b.service, b.address, b.source
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP sip_dispatch_backend_state 1 for the backend's state (up, down: failing its health checks, drained, disabled), 0 for the others.\n\
         # TYPE sip_dispatch_backend_state gauge"
    );
    for b in &s.backends {
        for state in [
            BackendState::Up,
            BackendState::Down,
            BackendState::Drained,
            BackendState::Disabled,
        ] {
            let _ = writeln!(
                out,
                "sip_dispatch_backend_state{{service=\"{}\",backend=\"{}\",source=\"{}\",state=\"{state}\"}} {}",
                b.service,
                b.address,
                b.source,
                u8::from(b.state == state)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP sip_dispatch_slowpath_datagrams_total Datagrams handled by the userspace slow path, by outcome.\n\
         # TYPE sip_dispatch_slowpath_datagrams_total counter"
    );
    for (outcome, v) in slow_path_counters(&s.slow_path) {
        if let Some(event) = outcome.strip_prefix("affinity_") {
            let _ = writeln!(
                affinity,
                "sip_dispatch_affinity_events_total{{path=\"slow\",event=\"{event}\"}} {v}"
            );
            continue;
        }
        let _ = writeln!(
            out,
            "sip_dispatch_slowpath_datagrams_total{{outcome=\"{outcome}\"}} {v}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP sip_dispatch_affinity_events_total Call affinity: fast path hit, miss, insert, \
         overridden, insert_failed; slow path followed, written.\n\
         # TYPE sip_dispatch_affinity_events_total counter"
    );
    out.push_str(&affinity);
    let _ = writeln!(
        out,
        "# HELP sip_dispatch_dns_failures_total Failed DNS SRV resolutions.\n\
         # TYPE sip_dispatch_dns_failures_total counter\nsip_dispatch_dns_failures_total {}",
        s.dns_failures
    );
    let _ = writeln!(
        out,
        "# HELP sip_dispatch_config_reloads_total Reloads (sip-dispatch reload, SIGHUP), by result.\n\
         # TYPE sip_dispatch_config_reloads_total counter\n\
         sip_dispatch_config_reloads_total{{result=\"ok\"}} {}\n\
         sip_dispatch_config_reloads_total{{result=\"failed\"}} {}\n\
         # HELP sip_dispatch_config_last_reload_successful 0 when the last reload was refused.\n\
         # TYPE sip_dispatch_config_last_reload_successful gauge\n\
         sip_dispatch_config_last_reload_successful {}",
        s.reloads.ok,
        s.reloads.failed,
        u8::from(!s.reloads.last_failed)
    );
    let _ = writeln!(
        out,
        "# HELP sip_dispatch_affinity_entries Calls in the affinity map, held or not yet evicted (0 with --affinity off).\n\
         # TYPE sip_dispatch_affinity_entries gauge\nsip_dispatch_affinity_entries {}\n\
         # HELP sip_dispatch_affinity_capacity Entries the affinity map holds at most (--affinity-entries; 0 with --affinity off).\n\
         # TYPE sip_dispatch_affinity_capacity gauge\nsip_dispatch_affinity_capacity {}",
        s.affinity_entries, s.affinity_capacity
    );
    let tables: [TableFamily; 3] = [
        (
            "table_generation",
            "gauge",
            "Slot tables of the service swapped in since the daemon started.",
            |t| t.generation,
        ),
        (
            "table_publish_failures_total",
            "counter",
            "Slot tables that could not be built or swapped in (the one before stayed in force).",
            |t| t.publish_failures,
        ),
        (
            "table_last_publish_successful",
            "gauge",
            "0 when the service's last table could not be built or swapped in: the table in force is stale until a later change publishes one.",
            |t| u64::from(!t.last_publish_failed),
        ),
    ];
    for (name, kind, help, value) in tables {
        let _ = writeln!(
            out,
            "# HELP sip_dispatch_{name} {help}\n# TYPE sip_dispatch_{name} {kind}"
        );
        for t in &s.tables {
            let _ = writeln!(
                out,
                "sip_dispatch_{name}{{service=\"{}\"}} {}",
                t.service,
                value(t)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let counters = crate::protocol::FastPathCounters(vec![
            ("xdp_tx".into(), 42),
            ("affinity_hit".into(), 5),
            ("fib_fallback".into(), 3),
        ]);
        let s = Snapshot {
            counters,
            // Service 198.18.0.100:5060, source _sip._udp.example.net, up, rtt 1.5 ms,
            // 9 checks, 1 failed, 7 packets.
            backends: vec![crate::protocol::sample_backend(
                "198.18.0.21:5060",
                BackendState::Up,
            )],
            dns_failures: 3,
            reloads: crate::protocol::Reloads {
                ok: 2,
                failed: 1,
                last_failed: true,
            },
            slow_path: Default::default(),
            affinity_entries: 1500,
            affinity_capacity: 262_144,
            tables: vec![TableSnapshot {
                service: "198.18.0.100:5060".parse().unwrap(),
                generation: 4,
                publish_failures: 1,
                last_publish_failed: true,
            }],
        };
        let text = render(&s);
        let labels = r#"{service="198.18.0.100:5060",backend="198.18.0.21:5060",source="_sip._udp.example.net"}"#;
        let state_labels = labels.trim_end_matches('}');
        for line in [
            "sip_dispatch_fastpath_packets_total{outcome=\"xdp_tx\"} 42".to_string(),
            format!("sip_dispatch_backend_packets_total{labels} 7"),
            format!("sip_dispatch_backend_up{labels} 1"),
            format!("sip_dispatch_backend_rtt_seconds{labels} 0.0015"),
            format!("sip_dispatch_health_check_failures_total{labels} 1"),
            "sip_dispatch_slowpath_datagrams_total{outcome=\"forwarded\"} 0".to_string(),
            "sip_dispatch_affinity_events_total{path=\"fast\",event=\"hit\"} 5".to_string(),
            "sip_dispatch_affinity_events_total{path=\"slow\",event=\"followed\"} 0".to_string(),
            "sip_dispatch_dns_failures_total 3".to_string(),
            "sip_dispatch_config_reloads_total{result=\"failed\"} 1".to_string(),
            "sip_dispatch_config_last_reload_successful 0".to_string(),
            "sip_dispatch_affinity_entries 1500".to_string(),
            "sip_dispatch_affinity_capacity 262144".to_string(),
            "sip_dispatch_fastpath_fib_fallbacks_total 3".to_string(),
            format!("sip_dispatch_backend_state{state_labels},state=\"up\"}} 1"),
            format!("sip_dispatch_backend_state{state_labels},state=\"down\"}} 0"),
            "sip_dispatch_table_generation{service=\"198.18.0.100:5060\"} 4".to_string(),
            "sip_dispatch_table_publish_failures_total{service=\"198.18.0.100:5060\"} 1"
                .to_string(),
            "sip_dispatch_table_last_publish_successful{service=\"198.18.0.100:5060\"} 0"
                .to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        // Not a packet outcome: a packet that fell back also has one.
        assert!(!text.contains("outcome=\"fib_fallback\""), "{text}");
        for family in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = family.split(' ').nth(2).unwrap();
            assert!(
                text.lines()
                    .filter(|l| l.starts_with(&format!("# TYPE {name} ")))
                    .count()
                    == 1,
                "{name} twice"
            );
        }
    }

    /// A controller that answers Stats with an empty snapshot and counts the requests.
    fn fake_controller() -> (mpsc::Sender<Command>, Arc<std::sync::atomic::AtomicU64>) {
        let (tx, mut rx) = mpsc::channel::<Command>(16);
        let asked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let s = Snapshot {
                    counters: Default::default(),
                    backends: Vec::new(),
                    dns_failures: 0,
                    reloads: Default::default(),
                    slow_path: Default::default(),
                    affinity_entries: 0,
                    affinity_capacity: 0,
                    tables: Vec::new(),
                };
                let _ = reply.send(Ok(Reply::Stats(Box::new(s))));
            }
        });
        (tx, asked)
    }

    async fn scrape_once(addr: std::net::SocketAddr) -> String {
        use tokio::io::AsyncReadExt as _;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn idle_connections_past_the_limit_do_not_keep_a_scrape_out() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, asked) = fake_controller();
        tokio::spawn(serve(listener, tx));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 50 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let started = Instant::now();
        let page = tokio::time::timeout(IO_TIMEOUT / 2, scrape_once(addr))
            .await
            .expect("the scrape is answered before any idle connection times out");
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        assert!(page.contains("sip_dispatch_dns_failures_total 0"));
        eprintln!(
            "scrape past {} idle connections answered in {:?}",
            idle.len(),
            started.elapsed()
        );
        // A storm of scrapes costs one snapshot per CACHE_FOR (one, unless the machine
        // is so loaded that the storm outlasts it), not one per scrape.
        let storm = Instant::now();
        for _ in 0..50 {
            assert!(scrape_once(addr).await.starts_with("HTTP/1.1 200 OK"));
        }
        let most = 1 + 1 + (storm.elapsed().as_secs_f64() / CACHE_FOR.as_secs_f64()) as u64;
        let snapshots = asked.load(std::sync::atomic::Ordering::SeqCst);
        assert!(snapshots <= most, "{snapshots} snapshots for 51 scrapes");
        // Past CACHE_FOR the next scrape takes a fresh one.
        tokio::time::sleep(CACHE_FOR).await;
        scrape_once(addr).await;
        assert_eq!(
            asked.load(std::sync::atomic::Ordering::SeqCst),
            snapshots + 1
        );
    }
}
