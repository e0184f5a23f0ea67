//! The slow path's sending side in the direct-server-return modes, with real kernel
//! networking: a dispatcher namespace and a backend namespace joined by a veth (MTU
//! 1500). The backend holds the VIP on `lo` (`arp_ignore=1`, `arp_announce=2`,
//! `rp_filter=0`) and a UDP socket on VIP:5060; the dispatcher's
//! [`Forwarder`](sip_dispatch::forwarder::Forwarder) hands on datagrams of 100, 1400,
//! 4000 and 9000 bytes from a client address that exists nowhere. Each must reach the
//! backend's socket intact, from the client's address and port, in l2dsr and ipip, IPv4
//! and IPv6; the fragments on the way are counted from the namespaces' SNMP counters.
//!
//! ipip backends decapsulate with `sip-dispatch decap --from` the dispatcher's addresses
//! (the XDP program that ships; this kernel has no ipip or ip6tnl devices), which hands
//! each inner fragment to the stack as it came, counted by the backend's `ReasmReqds`.
//! Needs root and the binary (`SIP_DISPATCH_BIN`); fails loudly without them.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use sip_dispatch::{
    cli::ForwardingMode,
    forwarder::{Forwarder, SendError},
    slowpath::{self, Counters, InstalledTable},
};
use sip_dispatch_common::{
    Backend, HashKey,
    table::{Weighted, build_table},
};
use sip_dispatch_testbed::{
    dispatcher::{self, Dispatcher},
    netns::{self, Netns, unique_tag},
    preflight, rawnet, scenario,
};

const DISP_IF: &str = "sdf0";
const BACKEND_IF: &str = "sdf1";
const BACKEND_MAC: &str = "02:00:00:00:0f:02";
const DISP4: &str = "198.18.0.1";
const DISP6: &str = "2001:db8::1";
const BACKEND4: &str = "198.18.0.2";
const BACKEND6: &str = "2001:db8::2";
const VIP4: &str = "198.18.0.150:5060";
const VIP6: &str = "[2001:db8::150]:5060";
/// Outside the veth's subnets and on no interface: only the datagrams carry it.
const CLIENT4: &str = "198.18.0.200:5070";
const CLIENT6: &str = "[2001:db8::1:200]:5070";
const SIZES: [usize; 4] = [100, 1400, 4000, 9000];
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Fields drop in order: `sip-dispatch decap` before the namespaces.
/// The VIP, the client, the backend and the dispatcher (the encapsulation source) of a
/// family.
fn addresses(v6: bool) -> (SocketAddr, SocketAddr, IpAddr, IpAddr) {
    let parse = |vip: &str, client: &str, backend: &str, disp: &str| {
        (
            vip.parse().unwrap(),
            client.parse().unwrap(),
            backend.parse().unwrap(),
            disp.parse().unwrap(),
        )
    };
    match v6 {
        true => parse(VIP6, CLIENT6, BACKEND6, DISP6),
        false => parse(VIP4, CLIENT4, BACKEND4, DISP4),
    }
}

struct Pair {
    decap: Option<Dispatcher>,
    disp: Netns,
    backend: Netns,
}

/// What the ipip backends' `sip-dispatch decap --from` accepts: the dispatcher's
/// addresses, the forwarder's outer sources.
fn dispatcher_sources() -> Vec<IpAddr> {
    [DISP4, DISP6].map(|a| a.parse().unwrap()).to_vec()
}

fn sysctl(ns: &Netns, setting: &str) {
    ns.exec("sysctl", ["-qw", setting])
        .unwrap_or_else(|e| panic!("{setting}: {e:#}"));
}

impl Pair {
    /// With `ipip`, the backend runs `sip-dispatch decap --from` the dispatcher's
    /// addresses.
    fn new(ipip: bool) -> Pair {
        Pair::with_decap(ipip.then(dispatcher_sources))
    }

    /// With `decap_from`, the backend runs `sip-dispatch decap` accepting those sources.
    fn with_decap(decap_from: Option<Vec<IpAddr>>) -> Pair {
        preflight::require_root().expect("these tests need root");
        let tag = unique_tag();
        let disp = Netns::create(&format!("{tag}-disp")).unwrap();
        let backend = Netns::create(&format!("{tag}-be")).unwrap();
        sip_dispatch_testbed::cmd::run(
            "ip",
            [
                "link",
                "add",
                DISP_IF,
                "netns",
                disp.name(),
                "type",
                "veth",
                "peer",
                "name",
                BACKEND_IF,
                "netns",
                backend.name(),
            ],
        )
        .unwrap();
        for s in [
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
        ] {
            sysctl(&backend, s);
        }
        backend
            .ip(["link", "set", BACKEND_IF, "address", BACKEND_MAC, "up"])
            .unwrap();
        backend
            .ip(["addr", "add", &format!("{BACKEND4}/25"), "dev", BACKEND_IF])
            .unwrap();
        backend
            .ip([
                "addr",
                "add",
                &format!("{BACKEND6}/112"),
                "dev",
                BACKEND_IF,
                "nodad",
            ])
            .unwrap();
        for vip in [VIP4, VIP6] {
            let ip = vip.parse::<SocketAddr>().unwrap().ip();
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            backend
                .ip(["addr", "add", &format!("{ip}/{prefix}"), "dev", "lo"])
                .unwrap();
        }
        sysctl(&backend, &format!("net.ipv4.conf.{BACKEND_IF}.rp_filter=0"));
        disp.ip(["link", "set", DISP_IF, "up"]).unwrap();
        disp.ip(["addr", "add", &format!("{DISP4}/25"), "dev", DISP_IF])
            .unwrap();
        disp.ip([
            "addr",
            "add",
            &format!("{DISP6}/112"),
            "dev",
            DISP_IF,
            "nodad",
        ])
        .unwrap();
        // The dispatcher knows the backend's MAC (a daemon learns it from health checks).
        for ip in [BACKEND4, BACKEND6] {
            disp.ip([
                "neigh",
                "replace",
                ip,
                "lladdr",
                BACKEND_MAC,
                "dev",
                DISP_IF,
                "nud",
                "permanent",
            ])
            .unwrap();
        }
        let decap = decap_from.map(|from| {
            let binary = dispatcher::binary_path().expect("sip-dispatch binary");
            let workdir =
                PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-slowpath-forwarding");
            let dir = scenario::run_dir(&workdir, "decap").expect("run dir");
            let d = Dispatcher::decap(&binary, backend.name(), BACKEND_IF, &from, &dir)
                .unwrap_or_else(|e| panic!("sip-dispatch decap: {e:#}"));
            let accepted: Vec<String> = from.iter().map(ToString::to_string).collect();
            let logged = format!("from {} only", accepted.join(", "));
            d.log()
                .wait_message(0, RECEIVE_TIMEOUT, &["decapsulating IP-in-IP on", &logged])
                .expect("decap logs the sources it accepts");
            d
        });
        Pair {
            decap,
            disp,
            backend,
        }
    }

    /// Stops `sip-dispatch decap`, which must still run and exit cleanly.
    fn stop_decap(&mut self) {
        if let Some(d) = self.decap.take() {
            d.stop()
                .unwrap_or_else(|e| panic!("sip-dispatch decap: {e:#}"));
        }
    }

    /// A UDP socket on `vip` in the backend namespace, for tokio.
    fn backend_socket(&self, vip: SocketAddr) -> std::net::UdpSocket {
        let sock = rawnet::in_netns(self.backend.name(), move || std::net::UdpSocket::bind(vip))
            .unwrap()
            .unwrap_or_else(|e| panic!("binding {vip} in the backend: {e}"));
        sock.set_nonblocking(true).unwrap();
        sock
    }
}

/// One SNMP counter of a namespace: `Ip: NAME` from /proc/net/snmp (IPv4) or `NAME`
/// from /proc/net/snmp6.
fn snmp(ns: &Netns, v6: bool, name: &str) -> u64 {
    snmp_in(ns.name(), v6, "Ip", name)
}

/// [`snmp`] by namespace name; `group` is the /proc/net/snmp line prefix (`Ip`, `Icmp`)
/// for IPv4.
fn snmp_in(ns: &str, v6: bool, group: &str, name: &str) -> u64 {
    if v6 {
        let text = netns::exec(ns, "cat", ["/proc/net/snmp6"]).unwrap();
        return text
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(name)).then(|| f.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("{name} in snmp6"));
    }
    let text = netns::exec(ns, "cat", ["/proc/net/snmp"]).unwrap();
    let prefix = format!("{group}: ");
    let ip: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    let names = ip[0].split_whitespace();
    let values = ip[1].split_whitespace();
    names
        .zip(values)
        .find_map(|(n, v)| (n == name).then(|| v.parse().ok())?)
        .unwrap_or_else(|| panic!("{group}: {name} in snmp"))
}

fn payload(len: usize) -> Vec<u8> {
    // Distinct per size and position, so a mixed-up or shifted fragment shows.
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ len.wrapping_mul(7) ^ (i >> 8)) as u8)
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sends every size through a forwarder of `mode` in the dispatcher namespace and
/// checks what the backend's socket receives. Returns one line per size.
fn forward_every_size(mode: ForwardingMode, v6: bool) -> Vec<String> {
    let mut pair = Pair::new(mode == ForwardingMode::Ipip);
    let (vip, client, backend, encap) = addresses(v6);
    let received = pair.backend_socket(vip);
    let (frag_creates, reasm_oks, reasm_reqds) = if v6 {
        ("Ip6FragCreates", "Ip6ReasmOKs", "Ip6ReasmReqds")
    } else {
        ("FragCreates", "ReasmOKs", "ReasmReqds")
    };
    let mut lines = Vec::new();
    let disp = pair.disp.name().to_owned();
    let mut sender = rawnet::in_netns(&disp, move || {
        let rt = runtime();
        let fwd = rt.block_on(async { Forwarder::open(mode, vip, DISP_IF, Some(encap)) });
        (rt, fwd)
    })
    .unwrap();
    let fwd = sender
        .1
        .as_mut()
        .unwrap_or_else(|e| panic!("open {mode}: {e:#}"));
    for size in SIZES {
        let data = payload(size);
        let (created0, reasm0, fragments0) = (
            snmp(&pair.disp, v6, frag_creates),
            snmp(&pair.backend, v6, reasm_oks),
            snmp(&pair.backend, v6, reasm_reqds),
        );
        let got = sender.0.block_on(async {
            let sock = tokio::net::UdpSocket::from_std(received.try_clone().unwrap()).unwrap();
            fwd.send(client, vip, SocketAddr::new(backend, 5060), &data)
                .await
                .unwrap_or_else(|e| panic!("{mode} {size} bytes: {e:?}"));
            let mut buf = vec![0u8; 65_536];
            let (n, from) = tokio::time::timeout(RECEIVE_TIMEOUT, sock.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{mode} v6={v6}: {size} bytes never arrived"))
                .unwrap();
            buf.truncate(n);
            (buf, from)
        });
        assert_eq!(got.1, client, "{mode}: the source is the client's");
        assert_eq!(got.0.len(), size, "{mode}: length");
        assert!(got.0 == data, "{mode}: {size} bytes arrive intact");
        let created = snmp(&pair.disp, v6, frag_creates) - created0;
        let reassembled = snmp(&pair.backend, v6, reasm_oks) - reasm0;
        let fragments = snmp(&pair.backend, v6, reasm_reqds) - fragments0;
        // Fragmented exactly when the datagram (ipip: with the outer header) exceeds
        // the veth's MTU of 1500.
        let ip = if v6 { 40 } else { 20 };
        let outer = if mode == ForwardingMode::Ipip { ip } else { 0 };
        let fragmented = ip + 8 + size + outer > 1500;
        assert_eq!(
            reassembled,
            u64::from(fragmented),
            "{mode} {size}: reassembled"
        );
        // Our own fragments, of the inner datagram in ipip: the kernel fragments nothing.
        assert_eq!(created, 0, "{mode} {size}: fragments the kernel made");
        let frames = own_fragments(client, vip, &data, 1500 - outer);
        // ipip: one outer packet per fragment, each decapsulated on its own and
        // reassembled by the backend's stack.
        assert_eq!(
            fragments,
            if fragmented { frames as u64 } else { 0 },
            "{mode} {size}: fragments the backend received"
        );
        lines.push(format!(
            "{mode} IPv{}: {size} bytes -> {frames} frame(s), reassembled by the backend: \
             {reassembled}",
            if v6 { 6 } else { 4 }
        ));
    }
    // The runtime and its sockets belong to the dispatcher namespace's thread; dropping
    // them here is fine (sockets keep their namespace).
    drop(sender);
    pair.stop_decap();
    for l in &lines {
        eprintln!("{l}");
    }
    lines
}

#[test]
fn l2dsr_ipv4_delivers_every_size_from_the_client() {
    forward_every_size(ForwardingMode::L2dsr, false);
}

#[test]
fn l2dsr_ipv6_delivers_every_size_from_the_client() {
    forward_every_size(ForwardingMode::L2dsr, true);
}

#[test]
fn ipip_ipv4_delivers_every_size_from_the_client() {
    forward_every_size(ForwardingMode::Ipip, false);
}

#[test]
fn ipip_ipv6_delivers_every_size_from_the_client() {
    forward_every_size(ForwardingMode::Ipip, true);
}

const INVITE: &str = "INVITE sip:svc@198.18.0.150 SIP/2.0\r\n\
    Via: SIP/2.0/UDP 198.18.0.1:5070;branch=z9hG4bK-1\r\n\
    From: <sip:a@x>;tag=1\r\nTo: <sip:svc@198.18.0.150>\r\nCall-ID: slowfwd@x\r\n\
    CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";

fn installed(backend: &str, id: u32) -> Option<Arc<InstalledTable>> {
    let members = [Weighted {
        backend: Backend::from_socket_addr(backend.parse().unwrap()),
        weight: 1,
    }];
    Some(Arc::new(InstalledTable {
        table: build_table(&members, HashKey::DEFAULT).unwrap(),
        ids: vec![id],
    }))
}

/// The slow path itself (bind + serve) in l2dsr: a backend without a neighbour entry is
/// counted `not_on_link` and nothing is sent; once the table names the on-link backend,
/// the same INVITE reaches it, to the VIP, from the client.
#[test]
fn l2dsr_slow_path_counts_a_backend_without_a_neighbour_as_not_on_link() {
    let pair = Pair::new(false);
    let vip: SocketAddr = VIP4.parse().unwrap();
    // The dispatcher holds the VIP too (the slow path's socket is bound on it).
    pair.disp
        .ip(["addr", "add", &format!("{}/32", vip.ip()), "dev", "lo"])
        .unwrap();
    let received = pair.backend_socket(vip);
    let disp = pair.disp.name().to_owned();
    let (counters, got, not_sent) = rawnet::in_netns(&disp, move || {
        let rt = runtime();
        rt.block_on(async move {
            let counters = Arc::new(Counters::default());
            // 198.18.0.77 is in the veth's subnet but nobody has it: no neighbour entry.
            let (tables, watch) = tokio::sync::watch::channel(installed("198.18.0.77:5060", 1));
            let sockets = slowpath::bind(vip, ForwardingMode::L2dsr, DISP_IF, None)
                .await
                .unwrap();
            tokio::spawn(slowpath::serve(
                sockets,
                HashKey::DEFAULT,
                watch,
                counters.clone(),
                1472,
                None,
            ));
            let client = tokio::net::UdpSocket::bind((DISP4, 5070)).await.unwrap();
            let backend = tokio::net::UdpSocket::from_std(received).unwrap();
            let mut buf = vec![0u8; 65_536];
            client.send_to(INVITE.as_bytes(), vip).await.unwrap();
            let deadline = Instant::now() + RECEIVE_TIMEOUT;
            while counters.snapshot().not_on_link == 0 {
                assert!(Instant::now() < deadline, "not_on_link never counted");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let not_sent =
                tokio::time::timeout(Duration::from_millis(200), backend.recv_from(&mut buf))
                    .await
                    .is_err();
            tables.send_replace(installed(&format!("{BACKEND4}:5060"), 2));
            client.send_to(INVITE.as_bytes(), vip).await.unwrap();
            let (n, from) = tokio::time::timeout(RECEIVE_TIMEOUT, backend.recv_from(&mut buf))
                .await
                .expect("the INVITE never reached the on-link backend")
                .unwrap();
            buf.truncate(n);
            (counters.snapshot(), (buf, from), not_sent)
        })
    })
    .unwrap();
    assert!(
        not_sent,
        "nothing reached the backend while it was not on the link"
    );
    assert_eq!(counters.not_on_link, 1);
    assert_eq!(counters.received, 2);
    assert_eq!(counters.forwarded, 1);
    assert_eq!((counters.send_errors, counters.too_big), (0, 0));
    assert_eq!(got.0, INVITE.as_bytes());
    assert_eq!(got.1, format!("{DISP4}:5070").parse().unwrap());
}

/// The forwarder's own answer for a backend without a neighbour, in both families.
#[test]
fn l2dsr_forwarder_refuses_a_backend_without_a_neighbour_entry() {
    let pair = Pair::new(false);
    let disp = pair.disp.name().to_owned();
    let results = rawnet::in_netns(&disp, move || {
        let rt = runtime();
        rt.block_on(async {
            let mut out = Vec::new();
            for (vip, client, missing) in [
                (VIP4, CLIENT4, "198.18.0.77:5060"),
                (VIP6, CLIENT6, "[2001:db8::77]:5060"),
            ] {
                let vip: SocketAddr = vip.parse().unwrap();
                let mut fwd = Forwarder::open(ForwardingMode::L2dsr, vip, DISP_IF, None).unwrap();
                let r = fwd
                    .send(client.parse().unwrap(), vip, missing.parse().unwrap(), b"x")
                    .await;
                out.push(matches!(r, Err(SendError::NotOnLink)));
            }
            out
        })
    })
    .unwrap();
    assert_eq!(results, [true, true]);
}

/// The fragments the forwarder makes of a datagram at `mtu`.
fn own_fragments(client: SocketAddr, vip: SocketAddr, data: &[u8], mtu: usize) -> usize {
    let d = sip_dispatch::ippacket::udp_datagram(client, vip, data, 0).unwrap();
    if vip.is_ipv6() {
        sip_dispatch::ippacket::fragment_v6(&d, mtu, 0)
            .unwrap()
            .len()
    } else {
        sip_dispatch::ippacket::fragment_v4(&d, mtu).unwrap().len()
    }
}

/// The largest datagrams: both modes hand on the largest UDP datagram of each family
/// (l2dsr in 45 and 46 fragments; ipip in fragments that fit the MTU with their outer
/// header), and count one byte more as too big, sending nothing.
#[test]
fn the_largest_datagrams_arrive_and_one_byte_more_is_too_big() {
    let mut pair = Pair::new(true);
    for v6 in [false, true] {
        let (vip, client, backend, encap) = addresses(v6);
        let received = pair.backend_socket(vip);
        let disp = pair.disp.name().to_owned();
        let backend_ns = pair.backend.name().to_owned();
        let reasm_reqds = if v6 { "Ip6ReasmReqds" } else { "ReasmReqds" };
        let outcomes = rawnet::in_netns(&disp, move || {
            let rt = runtime();
            rt.block_on(async move {
                let sock = tokio::net::UdpSocket::from_std(received).unwrap();
                let largest_udp = if v6 { 65_527 } else { 65_507 };
                let mut out = Vec::new();
                for (mode, size) in [
                    (ForwardingMode::L2dsr, largest_udp),
                    (ForwardingMode::L2dsr, largest_udp + 1),
                    (ForwardingMode::Ipip, largest_udp),
                    (ForwardingMode::Ipip, largest_udp + 1),
                ] {
                    let mut fwd = Forwarder::open(mode, vip, DISP_IF, Some(encap)).unwrap();
                    let data = payload(size);
                    let fragments0 = snmp_in(&backend_ns, v6, "Ip", reasm_reqds);
                    let sent = fwd
                        .send(client, vip, SocketAddr::new(backend, 5060), &data)
                        .await;
                    let mut buf = vec![0u8; 65_536];
                    let wait = if sent.is_ok() {
                        RECEIVE_TIMEOUT
                    } else {
                        Duration::from_millis(200)
                    };
                    let got = tokio::time::timeout(wait, sock.recv_from(&mut buf))
                        .await
                        .ok()
                        .map(|r| {
                            let (n, from) = r.unwrap();
                            (buf[..n] == data[..], from)
                        });
                    // Counted before the reassembled datagram is delivered.
                    let fragments = snmp_in(&backend_ns, v6, "Ip", reasm_reqds) - fragments0;
                    out.push((mode, size, sent, got, fragments));
                }
                out
            })
        })
        .unwrap();
        for (mode, size, sent, got, fragments) in outcomes {
            eprintln!(
                "{mode} IPv{}: {size} bytes: {sent:?}, received: {got:?} in {fragments} fragments",
                if v6 { 6 } else { 4 }
            );
            if size == if v6 { 65_528 } else { 65_508 } {
                assert!(
                    matches!(sent, Err(SendError::TooBig)),
                    "{mode} {size}: {sent:?}"
                );
                assert_eq!(got, None, "{mode} {size}: nothing is sent");
                assert_eq!(fragments, 0, "{mode} {size}: nothing is sent");
            } else {
                assert!(sent.is_ok(), "{mode} {size}: {sent:?}");
                assert_eq!(
                    got,
                    Some((true, client)),
                    "{mode} {size}: intact, from the client"
                );
                // ipip: one outer packet per fragment, each decapsulated on its own.
                let ip = if v6 { 40 } else { 20 };
                let outer = if mode == ForwardingMode::Ipip { ip } else { 0 };
                assert_eq!(
                    fragments as usize,
                    own_fragments(client, vip, &payload(size), 1500 - outer),
                    "{mode} {size}: fragments the backend received"
                );
            }
        }
    }
    pair.stop_decap();
}

/// IP-in-IP from a source not given to `decap --from` passes the XDP program untouched:
/// the backend's stack, which has no tunnel device, drops it with an ICMP error, and the
/// datagram never reaches the VIP's socket.
#[test]
fn ipip_from_a_source_not_given_to_decap_is_not_delivered() {
    let others = ["198.18.0.3", "2001:db8::3"].map(|a| a.parse().unwrap());
    let mut pair = Pair::with_decap(Some(others.to_vec()));
    for v6 in [false, true] {
        let (vip, client, backend, encap) = addresses(v6);
        let received = pair.backend_socket(vip);
        let backend_ns = pair.backend.name().to_owned();
        // Without a tunnel device the stack answers IP-in-IP with destination unreachable
        // (a tunnel4/tunnel6 handler without tunnels) or, for IPv6 without one, a
        // parameter problem (unknown next header).
        let icmp_errors = move || {
            if v6 {
                snmp_in(&backend_ns, true, "", "Icmp6OutDestUnreachs")
                    + snmp_in(&backend_ns, true, "", "Icmp6OutParmProblems")
            } else {
                snmp_in(&backend_ns, false, "Icmp", "OutDestUnreachs")
            }
        };
        let before = icmp_errors();
        let disp = pair.disp.name().to_owned();
        rawnet::in_netns(&disp, move || {
            runtime().block_on(async {
                let mut fwd = Forwarder::open(ForwardingMode::Ipip, vip, DISP_IF, Some(encap))
                    .expect("open ipip");
                fwd.send(client, vip, SocketAddr::new(backend, 5060), &payload(100))
                    .await
                    .expect("send");
            })
        })
        .unwrap();
        let deadline = Instant::now() + RECEIVE_TIMEOUT;
        while icmp_errors() == before {
            assert!(
                Instant::now() < deadline,
                "v6 {v6}: the backend's stack never refused the IP-in-IP packet"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut buf = [0u8; 2048];
        let got = received.recv_from(&mut buf);
        assert!(
            matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "v6 {v6}: IP-in-IP from {encap} was decapsulated and delivered: {got:?}"
        );
    }
    pair.stop_decap();
}
