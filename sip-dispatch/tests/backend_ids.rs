//! Backend ids against the kernel's maps: the ids a swapped-in slot table references stay
//! allocated (and are never given to another address) until the table is replaced, even
//! when no service lists their address any more.
//!
//! Needs root (CAP_BPF): fails loudly without it.
use std::net::SocketAddr;

use sip_dispatch::{backend_ids::BackendIds, dataplane::Dataplane};
use sip_dispatch_common::{
    Backend, HashKey, MAX_BACKENDS,
    table::{Weighted, build_table},
};

const VIP: &str = "198.18.1.100:5060";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn weighted(addrs: &[SocketAddr]) -> Vec<Weighted> {
    addrs
        .iter()
        .map(|a| Weighted {
            backend: Backend::from_socket_addr(*a),
            weight: 1,
        })
        .collect()
}

#[test]
fn an_id_in_the_installed_table_is_kept_until_the_table_is_replaced() {
    let mut dp = Dataplane::load_unpinned(HashKey::DEFAULT, Default::default())
        .expect("loading the XDP object");
    let mut ids = BackendIds::new(MAX_BACKENDS);
    let (a, b, c, d) = (
        addr("198.18.1.21:5060"),
        addr("198.18.1.22:5060"),
        addr("198.18.1.23:5060"),
        addr("198.18.1.24:5060"),
    );
    let first = build_table(&weighted(&[a, b]), HashKey::DEFAULT).unwrap();
    dp.install_service(&mut ids, 0, addr(VIP), &first).unwrap();
    let id_b = ids.get(b).expect("b has an id");

    // b is no longer listed (say its service's next publish failed): the table in the
    // kernel still sends calls to id_b, so it stays b's.
    assert!(
        dp.release_unlisted(&mut ids, |x| x == a || x == c)
            .is_empty()
    );
    assert_eq!(ids.get(b), Some(id_b));
    let id_c = dp.backend_id(&mut ids, c).unwrap();
    assert_ne!(
        id_c, id_b,
        "a new address got the id the installed table uses"
    );

    // The replacement table does not reference b: now its id goes, and is reused.
    let second = build_table(&weighted(&[a, c]), HashKey::DEFAULT).unwrap();
    dp.install_service(&mut ids, 0, addr(VIP), &second).unwrap();
    assert_eq!(
        dp.release_unlisted(&mut ids, |x| x == a || x == c),
        vec![(b, id_b)]
    );
    assert_eq!(ids.get(b), None);
    assert_eq!(dp.backend_id(&mut ids, d).unwrap(), id_b);
}
