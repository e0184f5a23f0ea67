//! To-header torture cases, in the manner of RFC 4475 (and RFC 5118): our own messages,
//! each exercising what the RFC case does to the To header, with the answer the To-tag
//! scanner must give. The To lines of RFC 4475 3.1.1.1 (wsinv), 3.1.1.2 (intmeth),
//! 3.1.1.12 (unreason) and 3.1.2.8 (quotbal) are copied as the RFC has them.
use super::ToTag::{self, NoTo, Tagged, Untagged};

/// (case, message, the answer).
pub const TO_TORTURE: &[(&str, &str, ToTag)] = &[
    (
        "4475 3.1.1.1 wsinv: `TO :`, value on a folded line, LWS around ; and =",
        "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\r\n\
         TO :\r\n sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\r\n\
         from   : \"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8\r\n\
         Call-ID: wsinv.ndaksdj@192.0.2.1\r\n\r\n",
        Tagged,
    ),
    (
        "4475 3.1.1.1 wsinv, From only: a tag in From is not a To tag",
        "INVITE sip:vivekg@chair-dnrc.example.com SIP/2.0\r\n\
         from   : \"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8\r\n\
         To: sip:vivekg@chair-dnrc.example.com\r\nCall-ID: wsinv.2@192.0.2.1\r\n\r\n",
        Untagged,
    ),
    (
        "4475 3.1.1.2 intmeth: escaped quote, BEL, NUL and DEL in the display name",
        "!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0\r\n\
         To: \"BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f\" <sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com>\r\n\
         From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%=\"работающий\";tag=_token~1'+`*%!-.\r\n\
         Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{\r\n\r\n",
        Untagged,
    ),
    (
        "4475 3.1.1.12 unreason: a response, tag after an addr-spec without <>",
        "SIP/2.0 200 = 2**3 * 5**2 но сто девяносто девять - आ\r\n\
         Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923\r\n\
         Call-ID: unreason.1234ksdfak3j2erwedfsASdf\r\nCSeq: 35 INVITE\r\n\
         From: sip:user@example.com;tag=11141343\r\nTo: sip:user@example.edu;tag=2229\r\nContent-Length: 0\r\n\r\n",
        Tagged,
    ),
    (
        "4475 3.1.2.8 quotbal: unterminated quoted string; the header ends at its line",
        "INVITE sip:user@example.com SIP/2.0\r\nTo: \"Mr. J. User <sip:j.user@example.com>\r\n\
         From: sip:caller@example.net;tag=93334\r\nMax-Forwards: 10\r\nCall-ID: quotbal.aksdj\r\n\r\n",
        Untagged,
    ),
    (
        "4475 3.1.2.8 quotbal variant: the unterminated quote hides a tag",
        "INVITE sip:user@example.com SIP/2.0\r\nTo: \"Mr. J. User <sip:j.user@example.com>;tag=1\r\n\
         Call-ID: quotbal.2\r\n\r\n",
        Untagged,
    ),
    (
        "a tag inside a quoted display name is not a tag",
        "INVITE sip:a@b SIP/2.0\r\nTo: \"x;tag=1\" <sip:a@b>\r\nCall-ID: q1\r\n\r\n",
        Untagged,
    ),
    (
        "an escaped quote does not end the display name",
        "INVITE sip:a@b SIP/2.0\r\nTo: \"x\\\";tag=1\" <sip:a@b>\r\nCall-ID: q2\r\n\r\n",
        Untagged,
    ),
    (
        "an escaped backslash does end the display name",
        "BYE sip:a@b SIP/2.0\r\nTo: \"x\\\\\";tag=1 <sip:a@b>\r\nCall-ID: q3\r\n\r\n",
        Tagged,
    ),
    (
        "compact form, no blanks, tag inside <> is a URI parameter",
        "INVITE sip:a@b SIP/2.0\r\nt:<sip:a@b;tag=1>\r\nCall-ID: c1\r\n\r\n",
        Untagged,
    ),
    (
        "compact form, tag after <>",
        "INVITE sip:a@b SIP/2.0\r\nt:<sip:a@b>;tag=1\r\nCall-ID: c2\r\n\r\n",
        Tagged,
    ),
    (
        "the parameter name in upper case",
        "INVITE sip:a@b SIP/2.0\r\nTo: <sip:a@b>;TAG=abc\r\nCall-ID: u1\r\n\r\n",
        Tagged,
    ),
    (
        "SEMI and EQUAL allow LWS: `; tag = x`",
        "INVITE sip:a@b SIP/2.0\r\nTo: <sip:a@b> ; tag = x\r\nCall-ID: l1\r\n\r\n",
        Tagged,
    ),
    (
        "LWS with folds around ; and =",
        "INVITE sip:a@b SIP/2.0\r\nTo: <sip:a@b>\r\n ;\r\n\ttag\r\n =\r\n x\r\nCall-ID: l2\r\n\r\n",
        Tagged,
    ),
    (
        "a fold inside the name splits it",
        "INVITE sip:a@b SIP/2.0\r\nTo: <sip:a@b>;ta\r\n g=x\r\nCall-ID: l3\r\n\r\n",
        Untagged,
    ),
    (
        "a valueless tag is a generic-param",
        "INVITE sip:a@b SIP/2.0\r\nTo: <sip:a@b>;tag\r\nCall-ID: v1\r\n\r\n",
        Untagged,
    ),
    (
        "longer and shorter names",
        "INVITE sip:a@b SIP/2.0\r\nTo: <sip:a@b>;tagx=1;xtag=2;ta=3;t=4;tag-id=5\r\nCall-ID: n1\r\n\r\n",
        Untagged,
    ),
    (
        "tag after other parameters, one with a quoted value holding `;tag=`",
        "INVITE sip:a@b SIP/2.0\r\nTo: <sip:a@b>;p=\"v;tag=0\";q;tag=9\r\nCall-ID: n2\r\n\r\n",
        Tagged,
    ),
    (
        "only the quoted value holds `;tag=`",
        "INVITE sip:a@b SIP/2.0\r\nTo: <sip:a@b>;p=\"v;tag=0\"\r\nCall-ID: n3\r\n\r\n",
        Untagged,
    ),
    (
        "lookalike header names",
        "INVITE sip:a@b SIP/2.0\r\nTox: <sip:a@b>;tag=1\r\nX-To: <sip:a@b>;tag=1\r\nT o: x;tag=1\r\nCall-ID: h1\r\n\r\n",
        NoTo,
    ),
    (
        "blanks before the colon, name in odd case",
        "INVITE sip:a@b SIP/2.0\r\ntO \t : <sip:a@b>;tag=1\r\nCall-ID: h2\r\n\r\n",
        Tagged,
    ),
    (
        "a To header on a continuation line is not a header",
        "INVITE sip:a@b SIP/2.0\r\nSubject: x\r\n To: <sip:a@b>;tag=1\r\nCall-ID: h3\r\n\r\n",
        NoTo,
    ),
    (
        "the first To header decides",
        "INVITE sip:a@b SIP/2.0\r\nTo: <sip:a@b>\r\nTo: <sip:a@b>;tag=1\r\nCall-ID: h4\r\n\r\n",
        Untagged,
    ),
    (
        "a To header in the body does not count",
        "INVITE sip:a@b SIP/2.0\r\nCall-ID: b1\r\nContent-Type: message/sipfrag\r\n\r\nTo: <sip:a@b>;tag=1\r\n",
        NoTo,
    ),
    (
        "5118 4.8 mult-ip-in-header style: LF-only line ends, IPv6 in the URI",
        "BYE sip:user@host.example.net SIP/2.0\n\
         Via: SIP/2.0/UDP [2001:db8::9:1]:6050;branch=z9hG4bKas3-111\n\
         Call-ID: 997077@lau_4100\nMax-Forwards: 70\nCSeq: 89187 BYE\n\
         To: sip:user@[2001:db8::9:255];tag=9817--94\nFrom: sip:user@example.com;tag=81x2\nContent-Length: 0\n\n",
        Tagged,
    ),
    (
        "5118 style: IPv6 reference inside <> with a URI tag, lone CR line ends",
        "INVITE sip:[2001:db8::10] SIP/2.0\rTo: <sip:[2001:db8::10];tag=uri>\rCall-ID: v6\r\r",
        Untagged,
    ),
];
