//! The packets of the benchmark: an OPTIONS, a typical INVITE with SDP, an INVITE whose
//! Call-ID is the last header after 1400 bytes, and a non-SIP datagram to another port.
use std::net::SocketAddr;

use serde::Serialize;
use sip_dispatch_testbed::frames::FrameSpec;

/// Placeholder in a Call-ID that the throughput generator replaces by counters.
pub const CALL_ID_VARIABLE: &str = "VVVVVVVV";

/// One benchmark packet.
#[derive(Clone, Debug, Serialize)]
pub struct Packet {
    pub key: &'static str,
    pub label: &'static str,
    /// The whole Ethernet frame.
    #[serde(skip)]
    pub frame: Vec<u8>,
    pub frame_bytes: usize,
    pub payload_bytes: usize,
    /// Where the Call-ID header starts in the UDP payload (SIP packets).
    pub call_id_offset: Option<usize>,
    /// Header lines before it (the request line included).
    pub lines_before_call_id: Option<usize>,
    /// Whether the dispatcher is meant to dispatch it (else it passes it to the stack).
    pub dispatched: bool,
}

fn sdp(client: SocketAddr) -> String {
    let ip = client.ip();
    let family = if ip.is_ipv4() { "IP4" } else { "IP6" };
    format!(
        "v=0\r\n\
         o=sdbench 2890844526 2890844526 IN {family} {ip}\r\n\
         s=sd-bench call\r\n\
         c=IN {family} {ip}\r\n\
         t=0 0\r\n\
         m=audio 49170 RTP/AVP 0 8 9 18 101\r\n\
         a=rtpmap:0 PCMU/8000\r\n\
         a=rtpmap:8 PCMA/8000\r\n\
         a=rtpmap:9 G722/8000\r\n\
         a=rtpmap:18 G729/8000\r\n\
         a=fmtp:18 annexb=no\r\n\
         a=rtpmap:101 telephone-event/8000\r\n\
         a=fmtp:101 0-16\r\n\
         a=ptime:20\r\n\
         a=sendrecv\r\n"
    )
}

/// An OPTIONS of about 400 bytes on the wire.
pub fn options(client: SocketAddr, vip: SocketAddr) -> String {
    let c = client.ip();
    format!(
        "OPTIONS sip:service@{vip} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {client};branch=z9hG4bK-sdbench-opt-77f1;rport\r\n\
         Max-Forwards: 70\r\n\
         From: \"sd-bench\" <sip:monitor@{client}>;tag=8a7c3f21\r\n\
         To: <sip:service@{vip}>\r\n\
         Call-ID: options-4f1c2a9e7b@{c}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Contact: <sip:monitor@{client}>\r\n\
         Accept: application/sdp\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// The first lines of the benchmark's INVITEs, up to the Contact header.
fn invite_head(client: SocketAddr, vip: SocketAddr) -> String {
    format!(
        "INVITE sip:service@{vip} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {client};branch=z9hG4bK-sdbench-5c1e0a2d77;rport\r\n\
         Max-Forwards: 70\r\n\
         From: \"sd-bench caller\" <sip:caller@{client}>;tag=1928301774\r\n\
         To: <sip:service@{vip}>\r\n\
         Contact: <sip:caller@{client};transport=udp>\r\n"
    )
}

/// A typical INVITE with SDP: about 900 bytes on the wire, the Call-ID near byte 300.
pub fn invite(client: SocketAddr, vip: SocketAddr, call_id: &str) -> String {
    let body = sdp(client);
    format!(
        "{}Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, UPDATE\r\n\
         Supported: replaces, timer\r\n\
         User-Agent: sd-bench/1.0\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{body}",
        invite_head(client, vip),
        body.len()
    )
}

/// An INVITE whose Call-ID is the last header and starts after 1400 bytes of headers
/// (no body, so that the frame still fits a 1500-byte MTU).
pub fn invite_long(client: SocketAddr, vip: SocketAddr, call_id: &str) -> String {
    let mut msg = invite_head(client, vip) + "CSeq: 1 INVITE\r\nContent-Length: 0\r\n";
    let hop = "Record-Route: <sip:proxy-hop.carrier.example.net;lr;ftag=1928301774>\r\n";
    // Record-Routes, then one X-Pad header that ends exactly at byte 1400.
    while 1400 - msg.len() >= hop.len() + 10 {
        msg.push_str(hop);
    }
    let fill = 1400 - msg.len() - "X-Pad: \r\n".len();
    msg.push_str(&format!("X-Pad: {}\r\n", "p".repeat(fill)));
    msg.push_str(&format!("Call-ID: {call_id}\r\n\r\n"));
    msg
}

/// 12 bytes of RTP header and 160 bytes of G.711 silence: not SIP, and to another port.
fn rtp() -> Vec<u8> {
    let mut p = vec![
        0x80, 0x00, 0x1c, 0x2d, 0, 0, 0x0a, 0x00, 0x5e, 0x11, 0x22, 0x33,
    ];
    p.extend(std::iter::repeat_n(0xffu8, 160));
    p
}

fn call_id_offset(payload: &[u8]) -> Option<usize> {
    payload
        .windows(b"\r\nCall-ID:".len())
        .position(|w| w == b"\r\nCall-ID:")
        .map(|p| p + 2)
}

/// The four packets, as frames from `client` (MAC `src_mac`) to `vip` (MAC `dst_mac`).
pub fn packets(
    client: SocketAddr,
    vip: SocketAddr,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> Vec<Packet> {
    let other_port = SocketAddr::new(vip.ip(), 4000);
    let call_id = format!("f81d4fae-7dec-11d0-a765-00a0c91e6bf6@{}", client.ip());
    let specs: [(&str, &str, Vec<u8>, SocketAddr, bool); 4] = [
        (
            "options",
            "OPTIONS",
            options(client, vip).into_bytes(),
            vip,
            true,
        ),
        (
            "invite",
            "INVITE with SDP",
            invite(client, vip, &call_id).into_bytes(),
            vip,
            true,
        ),
        (
            "invite_1400",
            "INVITE, Call-ID after 1400 B",
            invite_long(client, vip, &call_id).into_bytes(),
            vip,
            true,
        ),
        (
            "non_sip",
            "non-SIP (RTP) to port 4000",
            rtp(),
            other_port,
            false,
        ),
    ];
    specs
        .into_iter()
        .map(|(key, label, payload, dst, dispatched)| {
            let mut spec = FrameSpec::udp(client, dst, &payload);
            spec.src_mac = src_mac;
            spec.dst_mac = dst_mac;
            let frame = spec.build();
            let at = dispatched.then(|| call_id_offset(&payload)).flatten();
            Packet {
                key,
                label,
                frame_bytes: frame.len(),
                payload_bytes: payload.len(),
                call_id_offset: at,
                lines_before_call_id: at
                    .map(|at| payload[..at].windows(2).filter(|w| w == b"\r\n").count()),
                frame,
                dispatched,
            }
        })
        .collect()
}

/// The throughput generator's frame: the typical INVITE with [`CALL_ID_VARIABLE`] in
/// its Call-ID and a zero ("none") UDP checksum, so that the generator can change the
/// Call-ID of every frame without recomputing anything. Returns the frame and the
/// offset of the placeholder in it.
pub fn generator_frame(
    client: SocketAddr,
    vip: SocketAddr,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> (Vec<u8>, usize) {
    let call_id = format!("{CALL_ID_VARIABLE}-sdbench@{}", client.ip());
    let payload = invite(client, vip, &call_id).into_bytes();
    let mut spec = FrameSpec::udp(client, vip, &payload);
    spec.src_mac = src_mac;
    spec.dst_mac = dst_mac;
    spec.zero_udp_checksum = true;
    let frame = spec.build();
    let at = frame
        .windows(CALL_ID_VARIABLE.len())
        .position(|w| w == CALL_ID_VARIABLE.as_bytes())
        .expect("the placeholder is in the frame");
    (frame, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_brief() {
        let c: SocketAddr = "198.18.1.10:5070".parse().unwrap();
        let v: SocketAddr = "198.18.1.100:5060".parse().unwrap();
        let p = packets(c, v, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let by = |k: &str| p.iter().find(|x| x.key == k).unwrap();
        let opt = by("options").frame_bytes;
        assert!((380..=440).contains(&opt), "{opt}");
        let inv = by("invite");
        assert!(
            (850..=950).contains(&inv.frame_bytes),
            "{}",
            inv.frame_bytes
        );
        let at = inv.call_id_offset.unwrap();
        assert!((270..=330).contains(&at), "{at}");
        let long = by("invite_1400");
        assert!(long.call_id_offset.unwrap() >= 1400);
        assert!(long.frame_bytes <= 1514);
        assert_eq!(by("non_sip").call_id_offset, None);
    }
}
