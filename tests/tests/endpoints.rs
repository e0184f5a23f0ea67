//! The slow path's sockets and answers, and the daemon's endpoints under abuse (README
//! "The slow path", "Behaviour on bad or unusual input"): forwarding through a fixed set
//! of sockets with per-backend counts, the 503 with rport/received and its size cap (also
//! at a small interface MTU), the control socket's refusal of non-root peers, and the
//! metrics endpoint's limits (idle connections, no file descriptors left).
//!
//! Each test builds its own namespaces (client, dispatcher, SIPp UAS backends); the
//! daemon runs in native XDP mode. Needs root, SIPp and the sip-dispatch binary
//! (`$SIP_DISPATCH_BIN`, else `target/debug/sip-dispatch`): without them the tests fail,
//! they never skip. Run with `--test-threads=1`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use sip_dispatch_testbed::{
    Family,
    bed::{Bed, state, text, verdict, wait_list},
    netns, rawnet,
};

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-endpoints")
}

/// The socket inodes among the open files of process `pid`.
fn socket_inodes(pid: i32) -> BTreeSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The inodes of the raw sockets in the network namespace of process `pid`.
fn raw_socket_inodes(pid: i32) -> BTreeSet<u64> {
    ["raw", "raw6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(9)?.parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// Bytes waiting in the receive queue of the daemon's UDP socket on `vip`.
fn vip_receive_queue(pid: i32, vip: SocketAddr) -> Option<u64> {
    let file = if vip.is_ipv4() { "udp" } else { "udp6" };
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local = sip_dispatch_testbed::process::parse_proc_net_addr(f.get(1)?)?;
        (local == (vip.ip(), vip.port()))
            .then(|| u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok())?
    })
}

/// The UDP counters of namespace `ns` (`Udp:` of /proc/net/snmp, or `Udp6*` of
/// /proc/net/snmp6 with the prefix cut), by name.
fn udp_counters(ns: &str, family: Family) -> BTreeMap<String, u64> {
    let (file, prefix) = match family {
        Family::V4 => ("/proc/net/snmp", "Udp:"),
        Family::V6 => ("/proc/net/snmp6", "Udp6"),
    };
    let text =
        netns::exec(ns, "cat", [file]).unwrap_or_else(|e| panic!("reading {file} in {ns}: {e:#}"));
    match family {
        Family::V4 => {
            let rows: Vec<Vec<&str>> = text
                .lines()
                .filter(|l| l.starts_with(prefix))
                .map(|l| l.split_whitespace().skip(1).collect())
                .collect();
            match rows.as_slice() {
                [names, values, ..] => names
                    .iter()
                    .zip(values)
                    .filter_map(|(n, v)| Some(((*n).to_owned(), v.parse().ok()?)))
                    .collect(),
                _ => BTreeMap::new(),
            }
        }
        Family::V6 => text
            .lines()
            .filter_map(|l| {
                let (n, v) = l.split_once(char::is_whitespace)?;
                Some((n.strip_prefix(prefix)?.to_owned(), v.trim().parse().ok()?))
            })
            .collect(),
    }
}

/// The receive queue (bytes) and drop count of the raw socket `inode` in the network
/// namespace of process `pid`.
fn raw_socket_queue_and_drops(pid: i32, inode: u64) -> Option<(u64, u64)> {
    ["raw", "raw6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .find_map(|table| {
            table.lines().skip(1).find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.get(9)?.parse::<u64>().ok()? != inode {
                    return None;
                }
                let queue = u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?;
                Some((queue, f.last()?.parse().ok()?))
            })
        })
}

/// A SIP OPTIONS request of exactly `len` bytes (padded with an X-Pad header) from
/// `from` to `vip`, with Call-ID `call_id` and `via_params` after the top Via's sent-by.
fn padded_options(
    from: SocketAddr,
    vip: SocketAddr,
    call_id: &str,
    via_params: &str,
    len: usize,
) -> Vec<u8> {
    let head = format!(
        "OPTIONS sip:svc@{vip} SIP/2.0\r\nVia: SIP/2.0/UDP {from}{via_params};branch=z9hG4bK-{call_id}\r\n\
         From: <sip:test@{from}>;tag=1\r\nTo: <sip:svc@{vip}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n\
         Max-Forwards: 70\r\n"
    );
    let tail = "Content-Length: 0\r\n\r\n";
    let pad = len.saturating_sub(head.len() + tail.len() + "X-Pad: \r\n".len());
    let msg = format!("{head}X-Pad: {}\r\n{tail}", "p".repeat(pad));
    assert_eq!(msg.len(), len, "padding {call_id}");
    msg.into_bytes()
}

/// `count` datagrams of `len` bytes (fragmented on the way: larger than the MTU) from a
/// UDP socket on the client to the VIP, while another thread lists the daemon's sockets
/// as fast as it can. The slow path forwards all of them through the sockets it had
/// before (one raw socket per service): no socket appears, and the per-backend counters
/// hold exactly what it forwarded, bytes counted like the fast path's frames.
fn slow_path_sockets_and_counters(name: &str, family: Family) {
    const DATAGRAMS: usize = 2000;
    const LEN: usize = 3000;
    let mut bed = Bed::build_family(&workdir(), name, 2, Duration::from_secs(60), family);
    let mut run = bed.run_config(2);
    // No health-check sockets come and go during the measurement.
    run.extra = vec!["--health-interval".into(), "60s".into()];
    let daemon = bed.start_daemon(&run);
    let (b1, b2) = (bed.backend(1), bed.backend(2));
    wait_list(&bed, Duration::from_secs(10), "both backends up", |l| {
        [b1, b2].iter().all(|&a| state(l, a) == Some("up"))
    });
    let pid = daemon.pid();
    let before = socket_inodes(pid);
    let raw_before: BTreeSet<u64> = raw_socket_inodes(pid)
        .intersection(&before)
        .copied()
        .collect();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut seen, mut samples, mut most) = (BTreeSet::new(), 0u64, 0usize);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let now = socket_inodes(pid);
                most = most.max(now.len());
                seen.extend(now);
                samples += 1;
            }
            (seen, samples, most)
        })
    };
    let client = SocketAddr::new(bed.topo.client().ip(family), 0);
    let vip = bed.vip;
    let started = Instant::now();
    let (sock, from) = rawnet::in_netns(bed.topo.client().ns_name(), move || {
        let sock = std::net::UdpSocket::bind(client).expect("client socket");
        let from = sock.local_addr().expect("client address");
        (sock, from)
    })
    .expect("a thread in the namespace");
    rawnet::set_option(
        &sock,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        &(8i32 << 20),
        "SO_RCVBUF",
    )
    .expect("client receive buffer");
    // The backends (SIPp, -aa) answer each OPTIONS with 200 to where it came from: an
    // answer proves the backend got the datagram whole, with the client's address and
    // port as its source. The Via names another port, so only the source can lead there.
    let answers = {
        let sock = sock.try_clone().expect("client socket clone");
        std::thread::spawn(move || {
            sock.set_read_timeout(Some(Duration::from_secs(3)))
                .expect("read timeout");
            let mut ids = BTreeSet::new();
            let mut buf = vec![0u8; 65536];
            while ids.len() < DATAGRAMS {
                let Ok(n) = sock.recv(&mut buf) else { break };
                let msg = String::from_utf8_lossy(&buf[..n]);
                if msg.starts_with("SIP/2.0 200")
                    && let Some(id) = msg.lines().find_map(|l| l.strip_prefix("Call-ID: "))
                {
                    ids.insert(id.trim().to_owned());
                }
            }
            ids.len()
        })
    };
    let via_from = SocketAddr::new(from.ip(), 9);
    let mut sent = 0;
    for i in 0..DATAGRAMS {
        let msg = padded_options(via_from, vip, &format!("sockets-{i}"), "", LEN);
        if sock.send_to(&msg, vip).is_ok() {
            sent += 1;
        }
        // Paced (at most ~4000/s) so that the VIP socket's buffer never overflows.
        if i % 8 == 7 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // Wait (bounded) until the daemon has read every datagram from the VIP socket, with
    // no CLI call meanwhile (each would be a control connection: a socket of its own).
    let deadline = Instant::now() + Duration::from_secs(30);
    while vip_receive_queue(pid, vip) != Some(0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (seen, samples, most) = sampler.join().expect("sampler");
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = bed.cli_json(&["stats", "--json"]);
        if stats["slow_path"]["received"].as_u64() >= Some(sent as u64) || Instant::now() > deadline
        {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let after = socket_inodes(pid);
    let raw_queue: Vec<_> = raw_before
        .iter()
        .map(|&i| raw_socket_queue_and_drops(pid, i))
        .collect();
    let answered = answers.join().expect("answer counter");
    let udp: Vec<BTreeMap<String, u64>> = bed
        .topo
        .backends()
        .map(|b| udp_counters(b.ns_name(), family))
        .collect();
    drop(daemon);
    bed.stop_backends();

    let slow = &stats["slow_path"];
    let forwarded = slow["forwarded"].as_u64().unwrap_or(0);
    let packets: u64 = stats["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| b["packets"].as_u64().unwrap_or(0))
        .sum();
    let bytes: u64 = stats["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| b["bytes"].as_u64().unwrap_or(0))
        .sum();
    let ip_header = if family == Family::V4 { 20 } else { 40 };
    let frame = (14 + ip_header + 8 + LEN) as u64;
    let new_sockets: Vec<&u64> = seen.difference(&before).collect();
    eprintln!(
        "[{name}] {sent} datagrams of {LEN} bytes in {:.2}s; slow_path {slow}; backends: {packets} packets, {bytes} bytes; \
         daemon sockets {} before, {} after, at most {most} in {samples} samples, {} new; raw sockets {raw_before:?}",
        elapsed.as_secs_f64(),
        before.len(),
        after.len(),
        new_sockets.len()
    );
    let total = |k: &str| {
        udp.iter()
            .map(|c| c.get(k).copied().unwrap_or(0))
            .sum::<u64>()
    };
    eprintln!(
        "[{name}] the backends answered {answered} of the {sent} OPTIONS at the client's source port; \
         their kernels: InDatagrams {}, RcvbufErrors {}, InCsumErrors {}, InErrors {}",
        total("InDatagrams"),
        total("RcvbufErrors"),
        total("InCsumErrors"),
        total("InErrors")
    );
    let mut problems = Vec::new();
    if sent != DATAGRAMS {
        problems.push(format!("sent only {sent} of {DATAGRAMS}"));
    }
    // Every datagram reached a backend's kernel whole (reassembled, checksum right)...
    if total("InCsumErrors") != 0
        || total("InErrors") != 0
        || total("InDatagrams") + total("RcvbufErrors") < DATAGRAMS as u64
    {
        problems.push(format!(
            "not every datagram reached a backend intact: {udp:?}"
        ));
    }
    // ... from the client's address and port: SIPp answers there, and only there. (SIPp
    // itself may miss a few of a burst; the kernel counters above are exact.)
    if answered < DATAGRAMS * 99 / 100 {
        problems.push(format!(
            "the backends answered {answered} of {DATAGRAMS} at the client's source {from}"
        ));
    }
    if slow["received"].as_u64() != Some(DATAGRAMS as u64) || forwarded != DATAGRAMS as u64 {
        problems.push(format!(
            "the slow path did not forward every datagram: {slow}"
        ));
    }
    // Sockets may close (the CLI's last control connection), none may appear.
    if !new_sockets.is_empty() || !after.is_subset(&before) {
        problems.push(format!(
            "the daemon opened sockets while forwarding: {new_sockets:?} new in {samples} samples; {} before, {} after",
            before.len(),
            after.len()
        ));
    }
    // The copies of incoming datagrams the raw socket gets are dropped by its filter
    // before they are queued: without the filter one would sit in its receive queue and
    // the others would be counted as drops (receive buffer full).
    eprintln!("[{name}] raw socket (receive queue, drops): {raw_queue:?}");
    if raw_queue
        .iter()
        .any(|q| !q.is_some_and(|(queue, drops)| queue == 0 && drops == 0))
    {
        problems.push(format!(
            "the raw socket queued what it received (queue, drops): {raw_queue:?}"
        ));
    }
    if raw_before.len() != 1 {
        problems.push(format!(
            "expected one raw socket for the one service, found {raw_before:?}"
        ));
    }
    if samples < 100 {
        problems.push(format!("only {samples} samples of the daemon's sockets"));
    }
    if packets != forwarded || bytes != forwarded * frame {
        problems.push(format!(
            "per-backend counters {packets} packets, {bytes} bytes; the slow path forwarded {forwarded} of {frame}-byte frames: {}",
            stats["backends"]
        ));
    }
    verdict(name, &bed.dir.clone(), problems);
}

#[test]
fn slow_path_forwards_through_fixed_sockets_and_counts_per_backend_ipv4() {
    slow_path_sockets_and_counters("slow-sockets-v4", Family::V4);
}

#[test]
fn slow_path_forwards_through_fixed_sockets_and_counts_per_backend_ipv6() {
    slow_path_sockets_and_counters("slow-sockets-v6", Family::V6);
}

/// The first datagram on `sock` within `wait`, as text; None when none came.
fn receive_text(sock: &std::net::UdpSocket, wait: Duration) -> Option<String> {
    sock.set_read_timeout(Some(wait)).expect("read timeout");
    let mut buf = vec![0u8; 65536];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// With no healthy backend the slow path answers requests with a 503 whose top Via
/// carries the client's address and port (RFC 3581 rport and received) where the request
/// asked for them or named another host, and stays silent (counted) when the 503 would
/// not fit in one datagram.
fn no_backend_503(name: &str, family: Family) {
    let mut bed = Bed::build_family(&workdir(), name, 1, Duration::from_secs(60), family);
    let run = bed.run_config(1);
    // The only backend is gone before the daemon starts: its first probe fails.
    bed.stop_backends();
    let daemon = bed.start_daemon(&run);
    wait_list(&bed, Duration::from_secs(10), "the backend down", |l| {
        l.values().all(|b| b["state"] != "up")
    });
    let client = SocketAddr::new(bed.topo.client().ip(family), 0);
    let vip = bed.vip;
    let sock = rawnet::in_netns(bed.topo.client().ns_name(), move || {
        std::net::UdpSocket::bind(client).expect("client socket")
    })
    .expect("a thread in the namespace");
    let from = sock.local_addr().expect("client address");
    let nat: SocketAddr = match family {
        Family::V4 => "10.0.0.5:5060".parse().unwrap(),
        Family::V6 => "[fd00::5]:5060".parse().unwrap(),
    };
    let top_via = |answer: &str| {
        answer
            .lines()
            .find_map(|l| l.strip_prefix("Via: "))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let mut problems = Vec::new();

    // Behind a NAT: the Via names a private address and asks for rport.
    let req = padded_options(nat, vip, "nat-1", ";rport", 600);
    sock.send_to(&req, vip).expect("sending");
    let answer = receive_text(&sock, Duration::from_secs(5));
    let want = format!(
        "SIP/2.0/UDP {nat};rport={};branch=z9hG4bK-nat-1;received={}",
        from.port(),
        from.ip()
    );
    match &answer {
        Some(a) if a.starts_with("SIP/2.0 503 ") && top_via(a) == want => {}
        other => problems.push(format!(
            "rport request: wanted a 503 with Via {want}, got {other:?}"
        )),
    }

    // The Via is the source itself, without rport: nothing is added.
    let req = padded_options(from, vip, "plain-1", "", 600);
    sock.send_to(&req, vip).expect("sending");
    let answer = receive_text(&sock, Duration::from_secs(5));
    let want = format!("SIP/2.0/UDP {from};branch=z9hG4bK-plain-1");
    match &answer {
        Some(a) if a.starts_with("SIP/2.0 503 ") && top_via(a) == want => {}
        other => problems.push(format!(
            "plain request: wanted a 503 with Via {want}, got {other:?}"
        )),
    }

    // 40 Via headers of ~100 bytes: the 503 would be over 4 kB. No answer.
    let vias: String = (0..40)
        .map(|i| format!("Via: SIP/2.0/UDP {nat};branch=z9hG4bK-{i:0>70}\r\n"))
        .collect();
    let req = String::from_utf8(padded_options(from, vip, "big-1", "", 600))
        .unwrap()
        .replacen("From:", &format!("{vias}From:"), 1);
    sock.send_to(req.as_bytes(), vip).expect("sending");
    // Awaited below through the counters; this only checks nothing arrives meanwhile.
    let big_answer = receive_text(&sock, Duration::from_secs(2));
    if let Some(a) = &big_answer {
        problems.push(format!(
            "an answer to the request whose 503 is too large: {a}"
        ));
    }
    let exit = daemon.stop_with_stats().expect("exit stats");
    let slow = &exit.raw["slow_path"];
    eprintln!(
        "[{name}] slow_path {slow}; pass_no_backend={} pass_fragment={}",
        exit.counter("pass_no_backend"),
        exit.counter("pass_fragment")
    );
    if slow["answered_503"] != 2 || slow["too_large_503"] != 1 {
        problems.push(format!(
            "expected answered_503 2 and too_large_503 1: {slow}"
        ));
    }
    verdict(name, &bed.dir.clone(), problems);
}

#[test]
fn no_backend_503_fills_in_rport_and_received_and_fits_a_datagram_ipv4() {
    no_backend_503("503-v4", Family::V4);
}

#[test]
fn no_backend_503_fills_in_rport_and_received_and_fits_a_datagram_ipv6() {
    no_backend_503("503-v6", Family::V6);
}

/// `sip-dispatch COMMAND ARGS` run as user `nobody` against the bed's control socket.
/// The 503's size cap follows the MTU of the daemon's interface: with MTU 1000 on the
/// dispatcher's link (and the client's, which then fragments its larger requests), a 503
/// that fits an Ethernet MTU but not one of 1000 bytes is not sent; a smaller one is.
#[test]
fn no_backend_503_fits_the_interface_mtu() {
    const MTU: usize = 1000;
    let name = "503-mtu";
    let mut bed = Bed::build_family(&workdir(), name, 1, Duration::from_secs(60), Family::V4);
    for host in [
        bed.topo.dispatcher().expect("dispatcher"),
        bed.topo.client(),
    ] {
        host.ns
            .ip(["link", "set", &host.iface, "mtu", &MTU.to_string()])
            .unwrap_or_else(|e| panic!("MTU of {}: {e:#}", host.iface));
    }
    let run = bed.run_config(1);
    bed.stop_backends();
    let daemon = bed.start_daemon(&run);
    wait_list(&bed, Duration::from_secs(10), "the backend down", |l| {
        l.values().all(|b| b["state"] != "up")
    });
    let client = SocketAddr::new(bed.topo.client().ip(Family::V4), 0);
    let vip = bed.vip;
    let sock = rawnet::in_netns(bed.topo.client().ns_name(), move || {
        std::net::UdpSocket::bind(client).expect("client socket")
    })
    .expect("entering the client namespace");
    let from = sock.local_addr().expect("client address");
    let cap = MTU - 20 - 8;
    let size_503 = |req: &[u8]| {
        sip_dispatch_common::sip::service_unavailable(req, from, 5, usize::MAX)
            .expect("a 503")
            .len()
    };
    let small = padded_options(from, vip, "mtu-small", "", 600);
    // 8 more Via headers of ~100 bytes: a 503 of about 1.1 kB.
    let vias: String = (0..8)
        .map(|i| format!("Via: SIP/2.0/UDP {from};branch=z9hG4bK-{i:0>70}\r\n"))
        .collect();
    let big = String::from_utf8(padded_options(from, vip, "mtu-big", "", 600))
        .unwrap()
        .replacen("From:", &format!("{vias}From:"), 1)
        .into_bytes();
    let (small_503, big_503) = (size_503(&small), size_503(&big));
    assert!(
        small_503 <= cap && big_503 > cap && big_503 <= 1472,
        "the test's 503s would be {small_503} and {big_503} bytes; cap {cap}"
    );
    let mut problems = Vec::new();
    sock.send_to(&small, vip).expect("sending");
    match receive_text(&sock, Duration::from_secs(5)) {
        Some(a) if a.starts_with("SIP/2.0 503 ") => {}
        other => problems.push(format!(
            "a {small_503}-byte 503 within the cap: got {other:?}"
        )),
    }
    sock.send_to(&big, vip).expect("sending");
    // Awaited below through the counters; this only checks nothing arrives meanwhile.
    if let Some(a) = receive_text(&sock, Duration::from_secs(2)) {
        problems.push(format!(
            "an answer to the request whose 503 ({big_503} bytes) is over the cap {cap}: {a}"
        ));
    }
    let log = daemon.log();
    let cap_lines = log.messages_with(&[&format!("503s up to {cap} bytes"), &format!("MTU {MTU}")]);
    let exit = daemon.stop_with_stats().expect("exit stats");
    let slow = &exit.raw["slow_path"];
    eprintln!(
        "[{name}] 503s of {small_503} and {big_503} bytes at MTU {MTU}; slow_path {slow}; {cap_lines:?}"
    );
    if slow["answered_503"] != 1 || slow["too_large_503"] != 1 {
        problems.push(format!(
            "expected answered_503 1 and too_large_503 1: {slow}"
        ));
    }
    if cap_lines.is_empty() {
        problems.push(format!(
            "no log line `503s up to {cap} bytes ... (MTU {MTU} ...)`"
        ));
    }
    verdict(name, &bed.dir.clone(), problems);
}

fn cli_as_nobody(bed: &Bed, command: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bed.binary)
        .arg(command)
        .arg(format!("--control={}", bed.control.display()))
        .args(args)
        .output()
        .expect("running setpriv")
}

/// A non-root user cannot use the control socket: the file mode stops it, and where the
/// mode would let it through (a socket made world-writable by hand), the daemon checks
/// the peer's credentials and refuses in one line. Root is served throughout.
#[test]
fn control_socket_refuses_non_root_peers() {
    const NAME: &str = "control-peers";
    let bed = Bed::build(&workdir(), NAME, 1, Duration::from_secs(60));
    let daemon = bed.start_daemon(&bed.run_config(1));
    let mut problems = Vec::new();
    let mode = std::fs::metadata(&bed.control)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or(0);
    if mode != 0o600 {
        problems.push(format!("control socket mode {mode:o}, expected 600"));
    }
    let by_mode = cli_as_nobody(&bed, "stats", &["--json"]);
    let stderr = text(&by_mode.stderr);
    eprintln!(
        "[{NAME}] nobody, socket 0600: {} {stderr:?}",
        by_mode.status
    );
    if by_mode.status.success()
        || stderr.lines().count() != 1
        || !stderr.contains("permission denied")
    {
        problems.push(format!(
            "nobody on a 0600 socket: {} {stderr:?} {}",
            by_mode.status,
            text(&by_mode.stdout)
        ));
    }
    std::fs::set_permissions(
        &bed.control,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .expect("chmod 0666 on the control socket");
    let by_cred = cli_as_nobody(&bed, "stats", &["--json"]);
    let stderr = text(&by_cred.stderr);
    eprintln!(
        "[{NAME}] nobody, socket 0666: {} {stderr:?}",
        by_cred.status
    );
    if by_cred.status.success()
        || stderr.lines().count() != 1
        || !stderr.contains("refused: the control socket is for root only (you are uid 65534)")
    {
        problems.push(format!(
            "nobody on a 0666 socket: {} {stderr:?} {}",
            by_cred.status,
            text(&by_cred.stdout)
        ));
    }
    // The refused peers changed nothing, and root is still served.
    let stats = bed.cli_json(&["stats", "--json"]);
    if stats["backends"].as_array().map(Vec::len) != Some(1) {
        problems.push(format!("root's stats after the refusals: {stats}"));
    }
    drop(daemon);
    verdict(NAME, &bed.dir.clone(), problems);
}

/// One HTTP GET on `stream`; the whole answer (the server closes after it).
fn http_get(mut stream: std::net::TcpStream) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: sd\r\n\r\n")?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out)
}

/// 200 connections that send nothing do not keep a scrape out: it is answered at once,
/// and so is each of them once it sends its request; a burst of 100 scrapes is answered
/// from the cached page.
#[test]
fn metrics_answer_a_scrape_past_200_idle_connections() {
    const NAME: &str = "metrics-idle";
    const IDLE: usize = 200;
    let bed = Bed::build(&workdir(), NAME, 1, Duration::from_secs(60));
    let metrics: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let mut run = bed.run_config(1);
    run.extra = vec!["--metrics".into(), metrics.to_string()];
    let daemon = bed.start_daemon(&run);
    let (idle, scrape, idle_then_asked, burst) = rawnet::in_netns(&bed.disp_ns(), move || {
        let connect = || std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(5));
        let idle: Vec<_> = (0..IDLE)
            .map(|_| connect().expect("idle connection"))
            .collect();
        let started = Instant::now();
        let page = connect().and_then(http_get);
        let scrape = (started.elapsed(), page);
        // The idle ones were kept (not closed for the newcomer): they get pages too.
        let mut idle = idle.into_iter();
        let asked: Vec<_> = idle.by_ref().take(3).map(http_get).collect();
        let started = Instant::now();
        let burst_ok = (0..100)
            .filter(|_| {
                connect()
                    .and_then(http_get)
                    .is_ok_and(|p| p.starts_with("HTTP/1.1 200 OK"))
            })
            .count();
        (IDLE, scrape, asked, (burst_ok, started.elapsed()))
    })
    .expect("a thread in the namespace");
    drop(daemon);
    let (took, page) = scrape;
    eprintln!(
        "[{NAME}] a scrape past {idle} idle connections took {took:?}; 100 scrapes: {} answered in {:?}",
        burst.0, burst.1
    );
    let mut problems = Vec::new();
    match &page {
        Ok(p) if p.starts_with("HTTP/1.1 200 OK") && p.contains("sip_dispatch_backend_up{") => {}
        other => problems.push(format!("the scrape: {other:?}")),
    }
    // Well inside the idle connections' 5 s request timeout: nobody had to time out.
    if took > Duration::from_secs(2) {
        problems.push(format!("the scrape took {took:?}"));
    }
    for (i, p) in idle_then_asked.iter().enumerate() {
        if !p.as_ref().is_ok_and(|p| p.starts_with("HTTP/1.1 200 OK")) {
            problems.push(format!("idle connection {i} asking later: {p:?}"));
        }
    }
    if burst.0 != 100 {
        problems.push(format!("{} of 100 scrapes of the burst answered", burst.0));
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// CPU time (user + system, clock ticks) process `pid` has used.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// With its file descriptors used up (RLIMIT_NOFILE lowered to what it holds plus a
/// few), connections to the metrics port make `accept` fail with EMFILE: the daemon backs
/// off instead of spinning, and serves scrapes again once the connections are gone.
#[test]
fn metrics_accept_backs_off_when_file_descriptors_run_out() {
    const NAME: &str = "metrics-emfile";
    const CONNECTIONS: usize = 100;
    let bed = Bed::build(&workdir(), NAME, 1, Duration::from_secs(60));
    let metrics: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let mut run = bed.run_config(1);
    run.extra = vec!["--metrics".into(), metrics.to_string()];
    let daemon = bed.start_daemon(&run);
    let pid = daemon.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .expect("the daemon's fds");
    let limit = open + 8;
    let out = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .expect("running prlimit");
    assert!(out.status.success(), "prlimit: {}", text(&out.stderr));

    let (conns, ticks, busy) = rawnet::in_netns(&bed.disp_ns(), move || {
        let conns: Vec<_> = (0..CONNECTIONS)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(5)).ok()
            })
            .collect();
        // The kernel completes the handshakes; the daemon cannot accept most of them.
        let before = cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(2));
        let ticks = cpu_ticks(pid) - before;
        let busy = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        (conns, ticks, busy)
    })
    .expect("a thread in the namespace");
    let connected = conns.len();
    drop(conns);
    // Back to normal: the accepted connections time out, the others were closed by us.
    let closed = Instant::now();
    let deadline = closed + Duration::from_secs(20);
    let scrape = loop {
        let page = rawnet::in_netns(&bed.disp_ns(), move || {
            std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(5))
                .and_then(http_get)
        })
        .expect("a thread in the namespace");
        if page
            .as_ref()
            .is_ok_and(|p| p.starts_with("HTTP/1.1 200 OK"))
            || Instant::now() > deadline
        {
            break page;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let recovered = closed.elapsed();
    let log = daemon.log().tail(400);
    drop(daemon);
    let emfile_lines = log
        .lines()
        .filter(|l| {
            l.contains("metrics listener: accept failed") && l.contains("Too many open files")
        })
        .count();
    let ticks_per_sec = procfs_ticks_per_second();
    eprintln!(
        "[{NAME}] fd limit {limit} ({open} open at start, {busy} with {connected} connections waiting); \
         CPU over 2 s of EMFILE: {ticks} ticks ({:.0} %); {emfile_lines} accept-failure log lines; \
         a scrape answered {:.2} s after the connections closed",
        ticks as f64 * 100.0 / (2.0 * ticks_per_sec as f64),
        recovered.as_secs_f64()
    );
    let mut problems = Vec::new();
    if emfile_lines == 0 {
        problems.push(format!(
            "the daemon never ran out of file descriptors:\n{log}"
        ));
    }
    // Spinning on accept would burn a whole core (2 s of ticks); backing off, a few.
    if ticks * 10 > 2 * ticks_per_sec {
        problems.push(format!(
            "{ticks} ticks of CPU in 2 s of EMFILE: the accept loop spins"
        ));
    }
    if !scrape
        .as_ref()
        .is_ok_and(|p| p.starts_with("HTTP/1.1 200 OK"))
    {
        problems.push(format!(
            "no scrape answered after the connections closed: {scrape:?}"
        ));
    }
    verdict(NAME, &bed.dir.clone(), problems);
}

/// Clock ticks per second of /proc/PID/stat (sysconf(_SC_CLK_TCK)).
fn procfs_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).unwrap_or(100)
}
