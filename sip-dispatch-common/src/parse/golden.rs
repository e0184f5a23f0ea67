//! Whole SIP messages and the Call-ID the locator must find in each. The unit tests pin
//! their hashes under [`crate::HashKey::DEFAULT`]; the XDP program's kernel test sends the
//! same messages through the real data path and checks it picks the same Call-ID.
//!
//! Every message's `Content-Length` matches its body.

/// `(message, Call-ID)` pairs.
pub const GOLDEN_MESSAGES: &[(&str, &str)] = &[
    // RFC 3261 section 24.2, F1 (the SDP body, not shown there, is ours).
    (
        concat!(
            "INVITE sip:bob@biloxi.com SIP/2.0\r\n",
            "Via: SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bKnashds8\r\n",
            "Max-Forwards: 70\r\n",
            "To: Bob <sip:bob@biloxi.com>\r\n",
            "From: Alice <sip:alice@atlanta.com>;tag=1928301774\r\n",
            "Call-ID: a84b4c76e66710\r\n",
            "CSeq: 314159 INVITE\r\n",
            "Contact: <sip:alice@pc33.atlanta.com>\r\n",
            "Content-Type: application/sdp\r\n",
            "Content-Length: 142\r\n",
            "\r\n",
            "v=0\r\n",
            "o=alice 2890844526 2890844526 IN IP4 pc33.atlanta.com\r\n",
            "s=Talk\r\n",
            "c=IN IP4 192.0.2.1\r\n",
            "t=0 0\r\n",
            "m=audio 49172 RTP/AVP 0\r\n",
            "a=rtpmap:0 PCMU/8000\r\n",
        ),
        "a84b4c76e66710",
    ),
    // The 200 OK of RFC 3261 section 4 (F6, without its body): a response, three Vias.
    (
        concat!(
            "SIP/2.0 200 OK\r\n",
            "Via: SIP/2.0/UDP server10.biloxi.com;branch=z9hG4bKnashds8;received=192.0.2.3\r\n",
            "Via: SIP/2.0/UDP bigbox3.site3.atlanta.com;branch=z9hG4bK77ef4c2312983.1;received=192.0.2.2\r\n",
            "Via: SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds;received=192.0.2.1\r\n",
            "To: Bob <sip:bob@biloxi.com>;tag=a6c85cf\r\n",
            "From: Alice <sip:alice@atlanta.com>;tag=1928301774\r\n",
            "Call-ID: a84b4c76e66710@pc33.atlanta.com\r\n",
            "CSeq: 314159 INVITE\r\n",
            "Contact: <sip:bob@192.0.2.4>\r\n",
            "Content-Length: 0\r\n",
            "\r\n",
        ),
        "a84b4c76e66710@pc33.atlanta.com",
    ),
    // Compact header forms throughout.
    (
        concat!(
            "BYE sip:bob@192.0.2.4 SIP/2.0\r\n",
            "v: SIP/2.0/UDP 198.18.0.10:5060;branch=z9hG4bK-4242-1\r\n",
            "f: <sip:alice@atlanta.com>;tag=1928301774\r\n",
            "t: <sip:bob@biloxi.com>;tag=a6c85cf\r\n",
            "i: 1-4242@198.18.0.10\r\n",
            "CSeq: 231 BYE\r\n",
            "l: 0\r\n",
            "\r\n",
        ),
        "1-4242@198.18.0.10",
    ),
    // In the spirit of RFC 4475's torture tests: odd case, tabs around the colon, the
    // value folded onto the next line with trailing blanks, and lookalikes before it.
    (
        concat!(
            "OPTIONS sip:user@example.com SIP/2.0\r\n",
            "To: sip:user@example.com\r\n",
            "From: <sip:caller@example.net>;tag=323\r\n",
            "Subject: Call-ID: not-this-one\r\n",
            "X-Call-ID: nor-this\r\n",
            "Via: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK390skdjuw\r\n",
            " Call-ID: a-folded-line\r\n",
            "Call-IDX: wrong-name\r\n",
            "cALL-iD\t :\r\n",
            " \twsinv.ndaksdj@192.0.2.1 \t\r\n",
            "Max-Forwards: 70\r\n",
            "CSeq: 8 OPTIONS\r\n",
            "Content-Length: 0\r\n",
            "\r\n",
        ),
        "wsinv.ndaksdj@192.0.2.1",
    ),
    // LF-only line ends, and a message/sipfrag body that carries another Call-ID.
    (
        concat!(
            "NOTIFY sip:alice@pc33.atlanta.com SIP/2.0\n",
            "Via: SIP/2.0/UDP 192.0.2.4;branch=z9hG4bK-notify-7\n",
            "To: <sip:alice@atlanta.com>;tag=1928301774\n",
            "From: <sip:bob@biloxi.com>;tag=a6c85cf\n",
            "I:notify-77@192.0.2.4\n",
            "CSeq: 2 NOTIFY\n",
            "Event: refer\n",
            "Subscription-State: terminated;reason=noresource\n",
            "Content-Type: message/sipfrag\n",
            "Content-Length: 41\n",
            "\n",
            "SIP/2.0 200 OK\n",
            "Call-ID: frag-1@192.0.2.9\n",
        ),
        "notify-77@192.0.2.4",
    ),
];
