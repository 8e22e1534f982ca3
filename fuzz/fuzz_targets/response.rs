//! The upstream response head parser (`llmproxy::http::parse_response`) and the body tracker
//! (`llmproxy::http::BodyTracker`) that follows the body behind it.
//!
//! The head the client receives (status line, forwarded headers, restated framing) parses again
//! to the same status, content type and framing, and carries no hop-by-hop header. The tracker
//! finds the same end of the body however reads cut it, and a length-delimited or close-delimited
//! body's payload is its bytes unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmproxy::http::{
    is_hop_by_hop, parse_response, BodyTracker, ClientBody, Framing, UpstreamError, MAX_HEADERS,
};
use llmproxy_fuzz::{reads, split_plan};

const MAX_HEAD: usize = 4096;

/// Follows `reads` as the relay does. Returns the payload, the bytes that belonged to the body and
/// whether it ended, or the first error.
fn track<'a>(
    framing: Framing,
    reads: impl Iterator<Item = &'a [u8]>,
) -> Result<(Vec<u8>, usize, bool), UpstreamError> {
    let mut tracker = BodyTracker::new(framing);
    let mut payload = Vec::new();
    let mut taken = 0;
    for read in reads {
        if tracker.is_done() {
            break;
        }
        let n = tracker.advance(read, |p| payload.extend_from_slice(p))?;
        assert!(n <= read.len());
        taken += n;
    }
    Ok((payload, taken, tracker.is_done()))
}

fuzz_target!(|input: &[u8]| {
    // The first byte's high bit: the request was a HEAD (its low bits belong to the cut plan).
    let head_request = input.first().is_some_and(|b| b & 0x80 != 0);
    let (plan, buf) = split_plan(input);
    let mut client_head = Vec::new();
    let Ok(Some(head)) = parse_response(buf, MAX_HEAD, head_request, &mut client_head) else {
        return;
    };
    assert!(head.head_len <= buf.len());
    let status_line = format!("HTTP/1.1 {} ", head.status);
    assert!(client_head.starts_with(status_line.as_bytes()) && client_head.ends_with(b"\r\n"));
    for line in client_head.split(|&b| b == b'\n').skip(1) {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        assert!(
            !is_hop_by_hop(name) && !name.eq_ignore_ascii_case(b"content-length"),
            "{:?} forwarded",
            String::from_utf8_lossy(name)
        );
    }

    // The restated head has one header more than the backend's forwarded ones: at the parser's
    // limit it could not be parsed again here (a client's own limit is its own business).
    if client_head.split(|&b| b == b'\n').count() > MAX_HEADERS {
        return;
    }
    let bodiless = head_request || matches!(head.status, 100..=199 | 204 | 304);
    for body in [
        ClientBody::AsIs,
        ClientBody::Chunked,
        ClientBody::UntilClose,
    ] {
        let mut sent = client_head.clone();
        head.push_framing(&mut sent, body);
        sent.extend_from_slice(b"\r\n");
        let mut reparsed_head = Vec::new();
        let again = parse_response(&sent, usize::MAX, head_request, &mut reparsed_head)
            .unwrap_or_else(|e| panic!("{body:?} head refused: {e:?}"))
            .expect("a complete head");
        assert_eq!((again.status, again.head_len), (head.status, sent.len()));
        assert_eq!(again.event_stream, head.event_stream);
        let expected = match body {
            _ if bodiless => Framing::Empty,
            ClientBody::AsIs => head.framing,
            ClientBody::Chunked => Framing::Chunked,
            ClientBody::UntilClose => Framing::UntilClose,
        };
        assert_eq!(again.framing, expected, "{body:?}");
    }

    let body = &buf[head.head_len..];
    let whole = track(head.framing, std::iter::once(body));
    assert_eq!(
        whole,
        track(head.framing, reads(plan, body)),
        "the reads' cuts changed the verdict"
    );
    match (head.framing, whole) {
        (Framing::Empty, Ok(found)) => assert_eq!(found, (Vec::new(), 0, true)),
        (Framing::Length(n), Ok((payload, taken, done))) => {
            let len = body.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            assert_eq!(
                (&payload[..], taken, done),
                (&body[..len], len, len as u64 == n)
            );
        }
        (Framing::UntilClose, Ok((payload, taken, done))) => {
            assert_eq!((&payload[..], taken, done), (body, body.len(), false))
        }
        (Framing::Chunked, _) => {}
        (framing, Err(e)) => panic!("{framing:?} body failed: {e:?}"),
    }
});
