//! The request head sent upstream: the client's method, target and end-to-end headers, minus
//! hop-by-hop ones, plus the gateway's own `Host`, `X-Forwarded-For`, `X-Request-Id` and framing.

use crate::http::{has_token, is_hop_by_hop, push_decimal, push_header, RequestHead};
use crate::upstream::Backend;

/// Headers the gateway sets itself, so the client's copies are dropped.
fn replaced_by_gateway(name: &[u8]) -> bool {
    const OWN: [&[u8]; 5] = [
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-request-id",
    ];
    OWN.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Writes the upstream request head (through the blank line) into `out`, cleared first.
/// `body_len` is the exact body that follows; the gateway always sends a known length upstream.
pub fn write_upstream_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    backend: &Backend,
    client_ip: &str,
    request_id: &[u8],
    body_len: u64,
) {
    let connection_tokens = head.header(buf, b"connection").unwrap_or(b"");
    out.clear();
    out.extend_from_slice(head.method.of(buf));
    out.push(b' ');
    out.extend_from_slice(backend.path_prefix.as_bytes());
    out.extend_from_slice(head.target.of(buf));
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(backend.host_header.as_bytes());
    out.extend_from_slice(b"\r\n");

    // Earlier proxies' addresses first, then the peer this gateway saw.
    out.extend_from_slice(b"X-Forwarded-For: ");
    for (n, v) in &head.headers {
        if n.of(buf).eq_ignore_ascii_case(b"x-forwarded-for") {
            out.extend_from_slice(v.of(buf));
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    push_header(out, b"X-Request-Id", request_id);

    for (n, v) in &head.headers {
        let name = n.of(buf);
        if is_hop_by_hop(name) || replaced_by_gateway(name) || has_token(connection_tokens, name) {
            continue;
        }
        push_header(out, name, v.of(buf));
    }
    out.extend_from_slice(&backend.extra_headers);
    if body_len > 0
        || !matches!(
            head.method.of(buf),
            b"GET" | b"HEAD" | b"DELETE" | b"OPTIONS"
        )
    {
        out.extend_from_slice(b"Content-Length: ");
        push_decimal(out, body_len);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}
