//! A DNS responder on 127.0.0.1 for the unit tests of DNS resolution (here and in
//! `run.rs`): any SRV query gets `targets` records `t0.test.`, `t1.test.`, ... (no
//! additional section; the first `port_zero` of them with port 0, the others 5060), an A
//! query for `tN.test.` gets 198.18.1.(N+1), an AAAA query no record. SRV answers wait
//! `srv_delay`, address answers `addr_delay` (never, for `None`); it counts the most
//! delayed answers it held at once.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    proto::{
        op::{Message, OpCode},
        rr::{Name, RData, Record, RecordType, rdata},
    },
};
use tokio::task::JoinHandle;

use super::{DnsConfig, resolver};

pub(crate) struct Answers {
    pub targets: u8,
    pub port_zero: u8,
    pub srv_delay: Duration,
    pub addr_delay: Option<Duration>,
}

impl Default for Answers {
    fn default() -> Answers {
        Answers {
            targets: 1,
            port_zero: 0,
            srv_delay: Duration::ZERO,
            addr_delay: Some(Duration::ZERO),
        }
    }
}

pub(crate) struct SlowDns {
    pub addr: SocketAddr,
    pub max_in_flight: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

fn reply_to(query: &Message, answers: &Answers) -> Option<(Message, Option<Duration>)> {
    let q = query.queries.first()?.clone();
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.add_query(q.clone());
    let delay = match q.query_type() {
        RecordType::SRV => {
            for i in 0..answers.targets {
                let target = Name::from_ascii(format!("t{i}.test.")).ok()?;
                let port = if i < answers.port_zero { 0 } else { 5060 };
                let srv = RData::SRV(rdata::SRV::new(10, 1, port, target));
                reply.add_answer(Record::from_rdata(q.name().clone(), 60, srv));
            }
            Some(answers.srv_delay)
        }
        RecordType::A => {
            let i: u8 = q
                .name()
                .to_ascii()
                .get(1..)?
                .split('.')
                .next()?
                .parse()
                .ok()?;
            let a = RData::A(rdata::A::new(198, 18, 1, i.checked_add(1)?));
            reply.add_answer(Record::from_rdata(q.name().clone(), 60, a));
            answers.addr_delay
        }
        _ => answers.addr_delay,
    };
    Some((reply, delay))
}

impl SlowDns {
    pub(crate) async fn start(answers: Answers) -> SlowDns {
        let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = sock.local_addr().unwrap();
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max = max_in_flight.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some((reply, Some(delay))) = reply_to(&query, &answers) else {
                    continue;
                };
                let (sock, in_flight, max) = (sock.clone(), in_flight.clone(), max.clone());
                tokio::spawn(async move {
                    if !delay.is_zero() {
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        max.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                    let _ = sock.send_to(&reply.to_vec().unwrap(), from).await;
                });
            }
        });
        SlowDns {
            addr,
            max_in_flight,
            task,
        }
    }

    pub(crate) fn resolver(&self) -> TokioResolver {
        resolver(&DnsConfig {
            server: Some(self.addr),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(60),
        })
        .unwrap()
    }
}

impl Drop for SlowDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}
