//! `--metrics ADDR:PORT`: Prometheus text exposition (format 0.0.4) over plain HTTP.
//! A scrape asks the controller for a snapshot through the control channel, so the
//! numbers are the ones `sip-dispatch stats` shows.
use std::fmt::Write as _;

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::{
    control::{Command, Request},
    stats::{BackendSnapshot, Snapshot},
};

pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr}"))
}

/// Serves scrapes until the task is dropped.
pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Command>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            // The request line is all we look at; any path serves the metrics.
            let mut buf = [0u8; 4096];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
                .await;
            let (reply, answer) = oneshot::channel();
            let body = match tx.send((Request::Stats, reply)).await {
                Ok(()) => match answer.await {
                    Ok(r) if r.ok => serde_json::from_value::<Snapshot>(r.result)
                        .map(|s| render(&s))
                        .ok(),
                    _ => None,
                },
                Err(_) => None,
            };
            let response = match body {
                Some(body) => format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                ),
                None => "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
            };
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// A per-backend metric family: name, type, help, and how to read its value.
type BackendFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&BackendSnapshot) -> String,
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
    for (reason, v) in &s.counters {
        let _ = writeln!(
            lines,
            "sip_dispatch_fastpath_packets_total{{outcome=\"{reason}\"}} {}",
            v.as_u64().unwrap_or(0)
        );
    }
    out.push_str(&lines);
    let per_backend: [BackendFamily; 6] = [
        (
            "backend_packets_total",
            "counter",
            "Packets dispatched to the backend by the fast path.",
            |b| b.packets.to_string(),
        ),
        (
            "backend_bytes_total",
            "counter",
            "Bytes dispatched to the backend by the fast path.",
            |b| b.bytes.to_string(),
        ),
        (
            "backend_up",
            "gauge",
            "1 when the backend takes calls (healthy and enabled).",
            |b| u8::from(b.state == "up").to_string(),
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
        "# HELP sip_dispatch_slowpath_datagrams_total Datagrams handled by the userspace slow path, by outcome.\n\
         # TYPE sip_dispatch_slowpath_datagrams_total counter"
    );
    if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(&s.slow_path) {
        for (outcome, v) in map {
            let _ = writeln!(
                out,
                "sip_dispatch_slowpath_datagrams_total{{outcome=\"{outcome}\"}} {v}"
            );
        }
    }
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
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let mut counters = serde_json::Map::new();
        counters.insert("xdp_tx".into(), 42.into());
        let s = Snapshot {
            counters,
            backends: vec![BackendSnapshot {
                service: "198.18.0.100:5060".into(),
                address: "198.18.0.21:5060".into(),
                weight: 2,
                priority: 10,
                source: "_sip._udp.example.net".into(),
                state: "up".into(),
                reason: String::new(),
                rtt_ms: Some(1.5),
                last_code: Some(200),
                last_rtt_ms: Some(1.2),
                consecutive_failures: 0,
                last_change: 0,
                checks: 9,
                check_failures: 1,
                packets: 7,
                bytes: 700,
            }],
            dns_failures: 3,
            reloads: crate::stats::Reloads {
                ok: 2,
                failed: 1,
                last_failed: true,
            },
            slow_path: Default::default(),
        };
        let text = render(&s);
        let labels = r#"{service="198.18.0.100:5060",backend="198.18.0.21:5060",source="_sip._udp.example.net"}"#;
        for line in [
            "sip_dispatch_fastpath_packets_total{outcome=\"xdp_tx\"} 42".to_string(),
            format!("sip_dispatch_backend_packets_total{labels} 7"),
            format!("sip_dispatch_backend_up{labels} 1"),
            format!("sip_dispatch_backend_rtt_seconds{labels} 0.0015"),
            format!("sip_dispatch_health_check_failures_total{labels} 1"),
            "sip_dispatch_slowpath_datagrams_total{outcome=\"forwarded\"} 0".to_string(),
            "sip_dispatch_dns_failures_total 3".to_string(),
            "sip_dispatch_config_reloads_total{result=\"failed\"} 1".to_string(),
            "sip_dispatch_config_last_reload_successful 0".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
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
}
