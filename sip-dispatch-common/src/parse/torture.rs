//! A torture corpus modelled on the cases of RFC 4475 (SIP torture test messages) and
//! RFC 5118 (their IPv6 counterparts): our own messages, each exercising what the RFC
//! case exercises, with the Call-ID a dispatcher must find (or `None` where it must not
//! find one). The messages marked invalid by those RFCs are still dispatched when their
//! Call-ID is well formed: a stateless dispatcher forwards, the backend rejects.

/// (RFC case, message, the Call-ID value the scanner must return).
pub const TORTURE: &[(&str, &str, Option<&str>)] = &[
    (
        "4475 3.1.1.1 wsinv: short tortuous INVITE (folding, odd spacing, case, compact forms)",
        "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\r\n\
         TO :\r\n sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\r\n\
         from   : \"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8\r\n\
         MaX-fOrWaRdS: 0068\r\n\
         Call-ID: wsinv.ndaksdj@192.0.2.1\r\n\
         Content-Length   : 0\r\n\
         cseq: 0009\r\n  INVITE\r\n\
         Via  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw\r\n\
         s :\r\n\
         NewFangledHeader:   newfangled value\r\n continued newfangled value\r\n\
         UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n\
         Route:\r\n <sip:services.example.com;lr;unknownwith=value;unknown-no-value>\r\n\
         v:  SIP  / 2.0  / TCP     spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8  ,\r\n \
         SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n z9hG4bK30239\r\n\
         m:\"Quoted string \\\"\\\"\" <sip:jdrosen@example.com> ; newparam =\r\n      newvalue ;\r\n  secondparam ; q = 0.33\r\n\r\n",
        Some("wsinv.ndaksdj@192.0.2.1"),
    ),
    (
        "4475 3.1.1.2 intmeth: wide range of valid characters in tokens and the Call-ID",
        "!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0\r\n\
         Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~\r\n\
         To: \"BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f\" <sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com>\r\n\
         From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%=\"работающий\";tag=_token~1'+`*%!-.\r\n\
         Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{\r\n\
         CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~\r\n\
         Max-Forwards: 255\r\n\
         extensionHeader-!.%*+_`'~:﻿大停電\r\n\
         Content-Length: 0\r\n\r\n",
        Some("intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"),
    ),
    (
        "4475 3.1.1.3 esc01: escaped characters in URIs",
        "INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0\r\n\
         To: sip:%75se%72@example.com\r\n\
         From: <sip:I%20have%20spaces@example.net>;tag=938\r\n\
         Max-Forwards: 87\r\n\
         i: esc01.239409asdfakjkn23onasd0-3234\r\n\
         CSeq: 234234 INVITE\r\n\
         Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKkdjuw\r\n\
         C: application/sdp\r\n\
         Contact:\r\n  <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>\r\n\
         Content-Length: 0\r\n\r\n",
        Some("esc01.239409asdfakjkn23onasd0-3234"),
    ),
    (
        "4475 3.1.1.4 escnull: escaped NUL in a URI",
        "REGISTER sip:example.com SIP/2.0\r\nTo: sip:null-%00-null@example.com\r\n\
         From: sip:null-%00-null@example.com;tag=839923423\r\nMax-Forwards: 70\r\n\
         Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd\r\nCSeq: 14398234 REGISTER\r\n\
         Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw\r\nL:0\r\n\r\n",
        Some("escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd"),
    ),
    (
        "4475 3.1.1.6 lwsdisp: no LWS between display name and <",
        "OPTIONS sip:user@example.com SIP/2.0\r\nTo: sip:user@example.com\r\n\
         From: caller<sip:caller@example.com>;tag=323\r\nMax-Forwards: 70\r\n\
         Call-ID: lwsdisp.1234abcd@funky.example.com\r\nCSeq: 60 OPTIONS\r\n\
         Via: SIP/2.0/UDP funky.example.com;branch=z9hG4bKkdjuw\r\nl: 0\r\n\r\n",
        Some("lwsdisp.1234abcd@funky.example.com"),
    ),
    (
        "4475 3.1.1.7 longreq: long values in header fields (Call-ID after long headers)",
        "INVITE sip:user@example.com SIP/2.0\r\n\
         To: \"I have a user name of extremeextremeextremeextremeextremeextremeextremeextremeextremeextreme proportion\"<sip:user@example.com:6000;unknownparam1=verylonngvalueverylonngvalueverylonngvalueverylonngvalue;longparamnamelongparamnamelongparamnamelongparamname=shortvalue>\r\n\
         From: sip:caller@example.net;tag=12982982198219829821982198219829821982198219829821982198219829821982198219829821982198219829821982198219829821982198219829821982198219829821982198219829821982198219829\r\n\
         Call-ID: longreq.onereallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallylongcallid\r\n\
         CSeq: 3882340 INVITE\r\nMax-Forwards: 70\r\n\
         Via: SIP/2.0/TCP sip33.example.com\r\nv: SIP/2.0/TCP sip32.example.com\r\nV: SIP/2.0/TCP sip31.example.com\r\n\
         Content-Length: 0\r\n\r\n",
        Some(
            "longreq.onereallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallylongcallid",
        ),
    ),
    (
        "4475 3.1.1.8 dblreq: extra trailing octets after the message (a second request)",
        "REGISTER sip:example.com SIP/2.0\r\nTo: sip:j.user@example.com\r\nFrom: sip:j.user@example.com;tag=43251j3j324\r\n\
         Max-Forwards: 8\r\nI: dblreq.0ha0isndaksdj99sdfafnl3lk233412\r\nContact: sip:j.user@host.example.com\r\n\
         CSeq: 8 REGISTER\r\nVia: SIP/2.0/UDP 192.0.2.125;branch=z9hG4bKkdjuw23492\r\nContent-Length: 0\r\n\r\n\
         INVITE sip:joe@example.com SIP/2.0\r\nt: sip:joe@example.com\r\nFrom: sip:caller@example.net;tag=141334\r\n\
         Max-Forwards: 8\r\nCall-ID: dblreq.0ha0isndaksdj99sdfafnl3lk233412\r\nCSeq: 8 INVITE\r\n\r\n",
        Some("dblreq.0ha0isndaksdj99sdfafnl3lk233412"),
    ),
    (
        "4475 3.1.1.9 semiuri: semicolons in the user part",
        "OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0\r\nTo: sip:j_user@example.com\r\n\
         From: sip:caller@example.org;tag=33242\r\nMax-Forwards: 3\r\nCall-ID: semiuri.0ha0isndaksdj\r\n\
         CSeq: 8 OPTIONS\r\nAccept: application/sdp, application/pkcs7-mime,\r\n        multipart/mixed, multipart/signed,\r\n  message/sip, message/sipfrag\r\n\
         Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKkdjuw\r\nl: 0\r\n\r\n",
        Some("semiuri.0ha0isndaksdj"),
    ),
    (
        "4475 3.1.1.11 mpart01: multipart body containing a Call-ID",
        "MESSAGE sip:kumiko@example.org SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-;rport\r\n\
         Max-Forwards: 70\r\nRoute: <sip:127.0.0.1:5080>\r\nIdentity: r5mwreLuyDRYBi/0TiPwEsY3rEVsk/G2WxhgTV1PF7hHuL\r\n\
         To: <sip:kumiko@example.org>\r\nFrom: <sip:fluffy@example.com>;tag=2fb0dcc9\r\n\
         Call-ID: mpart01.3c26700.a15d3f0b\r\nCSeq: 1 MESSAGE\r\n\
         Content-Type: multipart/mixed;boundary=7a9cbec02ceef655\r\nContent-Length: 183\r\n\r\n\
         --7a9cbec02ceef655\r\nContent-Type: message/sipfrag\r\n\r\nCall-ID: in-the-body-1\r\n\
         --7a9cbec02ceef655\r\nContent-Type: text/plain\r\n\r\nCall-ID: in-the-body-2\r\n--7a9cbec02ceef655--\r\n",
        Some("mpart01.3c26700.a15d3f0b"),
    ),
    (
        "4475 3.1.1.12 unreason: unusual reason phrase (a response)",
        "SIP/2.0 200 = 2**3 * 5**2 но сто девяносто девять - आ\r\n\
         Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923\r\n\
         Call-ID: unreason.1234ksdfak3j2erwedfsASdf\r\nCSeq: 35 INVITE\r\n\
         From: sip:user@example.com;tag=11141343\r\nTo: sip:user@example.edu;tag=2229\r\nContent-Length: 0\r\n\r\n",
        Some("unreason.1234ksdfak3j2erwedfsASdf"),
    ),
    (
        "4475 3.1.1.13 noreason: empty reason phrase",
        "SIP/2.0 100 \r\nVia: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe\r\n\
         Call-ID: noreason.asndj203insdf99223ndf\r\nCSeq: 35 INVITE\r\n\
         From: <sip:user@example.com>;tag=39ansfi3\r\nTo: <sip:user@example.edu>;tag=902jndnke3\r\n\
         Content-Length: 0\r\n\r\n",
        Some("noreason.asndj203insdf99223ndf"),
    ),
    (
        "4475 3.1.2.2 clerr: Content-Length larger than the message (dispatched; the backend rejects)",
        "INVITE sip:user@example.com SIP/2.0\r\nMax-Forwards: 80\r\nTo: sip:j.user@example.com\r\n\
         From: sip:caller@example.net;tag=93942939o2\r\nContact: <sip:caller@hungry.example.net>\r\n\
         Call-ID: clerr.0ha0isndaksdjweiafasdk3\r\nCSeq: 8 INVITE\r\n\
         Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bK-39234-23523\r\n\
         Content-Type: application/sdp\r\nContent-Length: 9999\r\n\r\nv=0\r\n",
        Some("clerr.0ha0isndaksdjweiafasdk3"),
    ),
    (
        "4475 3.1.2.4 ncl: negative Content-Length",
        "INVITE sip:user@example.com SIP/2.0\r\nMax-Forwards: 254\r\nTo: sip:j.user@example.com\r\n\
         From: sip:caller@example.net;tag=32394234\r\nCall-ID: ncl.0ha0isndaksdj2193423r542w35\r\n\
         CSeq: 0 INVITE\r\nVia: SIP/2.0/UDP 192.0.2.53;branch=z9hG4bKkdjuw\r\n\
         Content-Type: application/sdp\r\nContent-Length: -999\r\n\r\n",
        Some("ncl.0ha0isndaksdj2193423r542w35"),
    ),
    (
        "4475 3.1.2.8 quotbal: unterminated quoted string in a display name",
        "INVITE sip:user@example.com SIP/2.0\r\nTo: \"Mr. J. User <sip:j.user@example.com>\r\n\
         From: sip:caller@example.net;tag=93334\r\nMax-Forwards: 10\r\nCall-ID: quotbal.aksdj\r\n\
         Contact: <sip:caller@host59.example.net>\r\nCSeq: 8 INVITE\r\n\
         Via: SIP/2.0/UDP 192.0.2.59:5050;branch=z9hG4bKkdjuw39234\r\nContent-Length: 0\r\n\r\n",
        Some("quotbal.aksdj"),
    ),
    (
        "4475 3.1.2.11 mcl01: multiple Content-Length values",
        "OPTIONS sip:user@example.com SIP/2.0\r\nVia: SIP/2.0/UDP host5.example.net;branch=z9hG4bK293423\r\n\
         To: sip:user@example.com\r\nFrom: sip:other@example.net;tag=3923942\r\n\
         Call-ID: mcl01.fhn2323orihawfdoa3o4r52o3irsdf\r\nCSeq: 15932 OPTIONS\r\n\
         Content-Length: 13\r\nMax-Forwards: 60\r\nContent-Length: 5\r\n\r\n",
        Some("mcl01.fhn2323orihawfdoa3o4r52o3irsdf"),
    ),
    (
        "4475 3.1.2.13 bcast: SIP/2.0 in a line of its own, no Call-ID anywhere",
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923\r\nCSeq: 353 INVITE\r\n\
         From: sip:user@example.com;tag=11141343\r\nTo: sip:user@example.edu;tag=2229\r\n\r\n",
        None,
    ),
    (
        "4475 3.1.2.14 bext01: unknown Require, a Call-ID in compact form in lower case",
        "OPTIONS sip:user@example.com SIP/2.0\r\nTo: sip:j_user@example.com\r\n\
         From: sip:caller@example.net;tag=242etr\r\nMax-Forwards: 6\r\ni: bext01.0ha0isndaksdj\r\n\
         Require: nothingSupportsThis, nothingSupportsThisEither\r\nProxy-Require: noProxiesSupportThis\r\n\
         CSeq: 8 OPTIONS\r\nVia: SIP/2.0/TLS fold-and-staple.example.com;branch=z9hG4bKkdjuw\r\nContent-Length: 0\r\n\r\n",
        Some("bext01.0ha0isndaksdj"),
    ),
    (
        "4475 3.3.15 sdp01: Call-ID-like text only in the SDP body, header missing",
        "INVITE sip:user@example.com SIP/2.0\r\nTo: sip:j_user@example.com\r\nContact: <sip:caller@host15.example.net>\r\n\
         From: sip:caller@example.net;tag=234\r\nMax-Forwards: 5\r\nCSeq: 8 INVITE\r\n\
         Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw\r\nContent-Type: application/sdp\r\n\r\n\
         v=0\r\no=- 1 1 IN IP4 192.0.2.5\r\nCall-ID: sdp-body-only\r\n",
        None,
    ),
    (
        "5118 4.1 ipv6-good: IPv6 reference in the Request-URI and Via",
        "REGISTER sip:[2001:db8::10] SIP/2.0\r\nTo: sip:user@example.com\r\n\
         From: sip:user@example.com;tag=81x2\r\nVia: SIP/2.0/UDP [2001:db8::9:1];branch=z9hG4bKas3-111\r\n\
         Call-ID: SSG9559905523997077@hlau_4100\r\nMax-Forwards: 70\r\n\
         Contact: \"Caller\" <sip:caller@[2001:db8::1]>\r\nCSeq: 98176 REGISTER\r\nContent-Length: 0\r\n\r\n",
        Some("SSG9559905523997077@hlau_4100"),
    ),
    (
        "5118 4.5 port-ambiguous IPv6 reference, IPv6 literal in the Call-ID",
        "REGISTER sip:[2001:db8::10:5070] SIP/2.0\r\nTo: sip:user@example.com\r\n\
         From: sip:user@example.com;tag=81x2\r\nVia: SIP/2.0/UDP [2001:db8::9:1];branch=z9hG4bKas3-111\r\n\
         Call-ID: SSG9559905523997077@[2001:db8::9:1]\r\nMax-Forwards: 70\r\nCSeq: 98176 REGISTER\r\n\
         Content-Length: 0\r\n\r\n",
        Some("SSG9559905523997077@[2001:db8::9:1]"),
    ),
    (
        "5118 4.8 mult-ip-in-header: several IPv6 addresses in Via, LF-only line ends",
        "BYE sip:user@host.example.net SIP/2.0\n\
         Via: SIP/2.0/UDP [2001:db8::9:1]:6050;branch=z9hG4bKas3-111\n\
         Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKjhja8781hjuaij65144\n\
         Via: SIP/2.0/TCP [2001:db8::9:255];branch=z9hG4bK451jj;received=192.0.2.200\n\
         Call-ID: 997077@lau_4100\nMax-Forwards: 70\nCSeq: 89187 BYE\n\
         To: sip:user@example.net;tag=9817--94\nFrom: sip:user@example.com;tag=81x2\nContent-Length: 0\n\n",
        Some("997077@lau_4100"),
    ),
];
