//! The kernel tests' harness: a private network namespace with a veth and neighbour
//! entries for the backends, the dispatcher's program loaded with a v4, a v6 and a
//! backend-without-neighbour service, and the helpers the tests share (test messages,
//! counter deltas).
use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
};

use sip_dispatch::{
    backend_ids::BackendIds,
    dataplane::{Affinity, Dataplane, ENV_FORCE_BPF_LOOP, ScanLoop},
};
use sip_dispatch_common::{
    Backend, Counter, HashKey, MAX_BACKENDS, ScanOutcome,
    parse::scan_message,
    table::{SlotTable, Weighted, build_table},
};
use sip_dispatch_testbed::testrun::{TestNet, TestVeth, XdpMd, run_once};

pub const VETH: &str = "kt0";
pub const VETH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
pub const CLIENT4: &str = "198.18.1.10:5070";
pub const CLIENT6: &str = "[2001:db8:1::10]:5070";
pub const VIP4: &str = "198.18.1.100:5060";
pub const VIP6: &str = "[2001:db8:1::100]:5060";
/// A service whose only backend has no neighbour entry.
pub const VIP_NO_NEIGH: &str = "198.18.1.101:5060";

pub fn backend_mac(ip: IpAddr) -> [u8; 6] {
    let last = match ip {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    [0x02, 0, 0, 0, 0x01, last]
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Harness {
    pub dp: Dataplane,
    /// The backend ids of `dp`'s maps (the daemon's controller owns them).
    pub ids: BackendIds,
    pub ifindex: u32,
    pub v4: SlotTable,
    pub v4_ids: Vec<u32>,
    pub v6: SlotTable,
    pub v6_ids: Vec<u32>,
    /// The private namespace; the thread leaves it when the harness is dropped.
    _net: TestNet,
}

pub fn weighted(addrs: &[(&str, u32)]) -> Vec<Weighted> {
    addrs
        .iter()
        .map(|(a, w)| Weighted {
            backend: Backend::from_socket_addr(a.parse().unwrap()),
            weight: *w,
        })
        .collect()
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_affinity(Default::default())
    }

    pub fn with_affinity(affinity: Affinity) -> Harness {
        assert_eq!(
            // SAFETY: geteuid has no preconditions and cannot fail.
            unsafe { libc::geteuid() },
            0,
            "kernel tests load XDP programs and need root: run them through `cargo xtask test`"
        );
        // This thread (and the commands it spawns) gets a network namespace of its own.
        let neighbours = [
            "198.18.1.21",
            "198.18.1.22",
            "198.18.1.23",
            "2001:db8:1::21",
            "2001:db8:1::22",
            "2001:db8:1::23",
        ]
        .map(|ip| {
            let ip: IpAddr = ip.parse().unwrap();
            (ip, backend_mac(ip))
        });
        let net = TestVeth {
            name: VETH,
            peer: "kt1",
            mac: VETH_MAC,
            neighbours: neighbours.to_vec(),
        }
        .build()
        .unwrap_or_else(|e| panic!("the test namespace: {e:#}"));
        let ifindex = net.ifindex;

        let mut dp = Dataplane::load_unpinned(HashKey::DEFAULT, affinity)
            .unwrap_or_else(|e| panic!("loading the XDP program: {e:#}"));
        let mut ids = BackendIds::new(MAX_BACKENDS);
        // Both loop modes run these tests (`cargo xtask test` runs them again with the
        // fallback forced); this kernel (6.9+) has may_goto, so the default must use it.
        let forced = std::env::var(ENV_FORCE_BPF_LOOP).is_ok_and(|v| v == "1");
        let expected = if forced {
            ScanLoop::BpfLoop
        } else {
            ScanLoop::MayGoto
        };
        assert_eq!(
            dp.scan_loop(),
            expected,
            "{ENV_FORCE_BPF_LOOP} set: {forced}"
        );
        let v4 = build_table(
            &weighted(&[
                ("198.18.1.21:5060", 2),
                ("198.18.1.22:5062", 1),
                ("198.18.1.23:5064", 1),
            ]),
            HashKey::DEFAULT,
        )
        .unwrap();
        let v6 = build_table(
            &weighted(&[
                ("[2001:db8:1::21]:5060", 1),
                ("[2001:db8:1::22]:5060", 1),
                ("[2001:db8:1::23]:5060", 1),
            ]),
            HashKey::DEFAULT,
        )
        .unwrap();
        let no_neigh =
            build_table(&weighted(&[("198.18.1.50:5060", 1)]), HashKey::DEFAULT).unwrap();
        let v4_ids = dp
            .install_service(&mut ids, 0, VIP4.parse().unwrap(), &v4)
            .unwrap()
            .iter()
            .map(|m| m.0)
            .collect();
        let v6_ids = dp
            .install_service(&mut ids, 1, VIP6.parse().unwrap(), &v6)
            .unwrap()
            .iter()
            .map(|m| m.0)
            .collect();
        dp.install_service(&mut ids, 2, VIP_NO_NEIGH.parse().unwrap(), &no_neigh)
            .unwrap();
        dp.add_tx_port(ifindex).unwrap();
        // The next-hop cache as the daemon's follower fills it: every backend with a
        // neighbour entry (all but the one of VIP_NO_NEIGH) is reached without the FIB.
        assert_eq!(dp.resolve_next_hops().unwrap(), 6, "valid next-hop entries");
        Harness {
            dp,
            ids,
            ifindex,
            v4,
            v4_ids,
            v6,
            v6_ids,
            _net: net,
        }
    }

    /// Runs one frame; `ingress_veth` makes the frame arrive on the veth (so a backend
    /// behind it is reached with XDP_TX), otherwise it arrives on lo (XDP_REDIRECT).
    pub fn run(&mut self, frame: &[u8], ingress_veth: bool) -> (u32, Vec<u8>) {
        let ctx = XdpMd::frame(frame.len(), if ingress_veth { self.ifindex } else { 1 });
        let prog = self.dp.dispatch_program().unwrap();
        run_once(prog, frame, &ctx.to_bytes()).expect("BPF_PROG_TEST_RUN")
    }

    pub fn counters(&self) -> Vec<(Counter, u64)> {
        self.dp.counters().unwrap()
    }

    /// The backend userspace predicts for a message on the v4 or v6 service.
    pub fn predicted(&self, v6: bool, msg: &[u8]) -> SocketAddr {
        let scan = scan_message(msg, HashKey::DEFAULT);
        assert_eq!(scan.outcome, ScanOutcome::Found, "fixture has no Call-ID");
        let table = if v6 { &self.v6 } else { &self.v4 };
        table
            .member_for_hash(scan.hash)
            .expect("table has members")
            .backend
            .to_socket_addr()
    }
}

pub fn invite(call_id_header: &str) -> Vec<u8> {
    format!(
        "INVITE sip:service@198.18.1.100:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 198.18.1.10:5070;branch=z9hG4bK-1\r\n\
         From: sipp <sip:sipp@198.18.1.10:5070>;tag=1\r\n\
         To: <sip:service@198.18.1.100:5060>\r\n\
         {call_id_header}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:sipp@198.18.1.10:5070>\r\n\
         Max-Forwards: 70\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// The change in each dispatch counter between two snapshots, non-zero ones only (the
/// affinity counters are checked by the affinity tests, and `fib_fallback`, which says
/// how the next hop was found, by the next_hop tests, with [`all_delta`]).
pub fn delta(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> Vec<(Counter, u64)> {
    all_delta(before, after)
        .into_iter()
        .filter(|(c, _)| !c.name().starts_with("affinity_") && *c != Counter::FibFallback)
        .collect()
}

/// The change in every counter between two snapshots, non-zero ones only.
pub fn all_delta(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> Vec<(Counter, u64)> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.1 != b.1)
        .map(|(b, a)| (a.0, a.1 - b.1))
        .collect()
}
