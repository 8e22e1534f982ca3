//! The request head parser (`llmproxy::http::parse_request`) and its smuggling checks.
//!
//! Beyond "no panic": an accepted head has one unambiguous body framing, its spans lie inside the
//! head, no dot segment survives in its path, and every shorter prefix of it (a head still
//! arriving) asks for more bytes instead of being accepted or refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmproxy::http::{parse_request, Framing, RequestHead};

/// The gateway's default `max_header_size` is 64 KiB; a smaller bound lets the fuzzer reach it.
const MAX_HEAD: usize = 4096;

fuzz_target!(|buf: &[u8]| {
    // Reused like a connection reuses it: a second parse must not see the first one's state.
    let mut head = RequestHead::default();
    let _ = parse_request(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n",
        MAX_HEAD,
        &mut head,
    );
    let Ok(true) = parse_request(buf, MAX_HEAD, &mut head) else {
        return;
    };
    assert!(head.head_len <= buf.len() && head.head_len <= MAX_HEAD);
    for span in [head.method, head.target]
        .into_iter()
        .chain(head.headers.iter().flat_map(|&(n, v)| [n, v]))
    {
        assert!(span.start <= span.end && span.end as usize <= head.head_len);
    }

    let named = |name: &[u8]| -> Vec<&[u8]> {
        head.headers
            .iter()
            .filter(|(n, _)| n.of(buf).eq_ignore_ascii_case(name))
            .map(|(_, v)| v.of(buf).trim_ascii())
            .collect()
    };
    let transfer_encodings = named(b"transfer-encoding");
    let lengths = named(b"content-length");
    match head.framing() {
        Framing::Chunked => {
            assert_eq!(transfer_encodings.len(), 1, "one Transfer-Encoding");
            assert!(transfer_encodings[0].eq_ignore_ascii_case(b"chunked"));
            assert!(lengths.is_empty(), "Content-Length beside chunked");
            assert!(!head.http10, "chunked in HTTP/1.0");
        }
        Framing::Length(n) => {
            assert!(transfer_encodings.is_empty());
            assert!(n > 0);
            for v in &lengths {
                assert_eq!(
                    std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()),
                    Some(n)
                );
            }
        }
        Framing::Empty => {
            assert!(transfer_encodings.is_empty());
            for v in &lengths {
                assert!(v.iter().all(|&d| d == b'0') && !v.is_empty());
            }
        }
        Framing::UntilClose => panic!("a request body cannot be delimited by close"),
    }
    assert!(head.http10 || named(b"host").len() == 1, "one Host");

    let path = head.path(buf);
    for segment in path.split(|&b| b == b'/') {
        let unescaped = String::from_utf8_lossy(&segment.to_ascii_lowercase()).replace("%2e", ".");
        assert!(
            unescaped != "." && unescaped != "..",
            "dot segment in {path:?}"
        );
    }

    // The same head arriving in pieces: a prefix is never judged before its end arrives.
    let len = head.head_len;
    let probe = usize::from(buf[0]) % len;
    for prefix in [probe, len / 2, len.saturating_sub(1), len.saturating_sub(2)] {
        let mut partial = RequestHead::default();
        assert_eq!(
            parse_request(&buf[..prefix], MAX_HEAD, &mut partial),
            Ok(false),
            "prefix of {prefix} bytes out of {len}"
        );
    }
});
