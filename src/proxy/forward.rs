//! Phase 6, forward: the request as it goes upstream. Runs after authorization, once for the body
//! ([`rewrite_body`]: the model alias, streaming usage asked for) and once per attempt for the
//! head ([`write_upstream_head`]: the client's method, target and end-to-end headers, minus
//! hop-by-hop ones and the client's credentials, plus the gateway's own `Host`,
//! `X-Forwarded-For`, `X-Request-Id`, framing and the backend's own key).

use super::conn::ClientConn;
use super::inspect::{request_stream_usage, RequestInfo};
use super::Generation;
use crate::api::Api;
use crate::http::{has_token, is_hop_by_hop, push_decimal, push_header, RequestHead};
use crate::upstream::Backend;

/// Rewrites `c.body` for the backend: a public model name becomes the served one (`c.model`
/// follows), and a stream the gateway meters asks for its usage when the client did not.
/// Returns whether the gateway asked for usage, so the relay keeps the usage-only event from the
/// client.
pub fn rewrite_body(
    generation: &Generation,
    api: Api,
    c: &mut ClientConn,
    info: &mut RequestInfo,
) -> bool {
    if info.model.is_some() {
        if let Some(served) = generation.upstreams.backends.alias(&c.model) {
            info.replace_model(&mut c.body, served);
            c.model.clear();
            c.model.push_str(served);
        }
    }
    // Only OpenAI's generation endpoints stream usage on request; the others always send it.
    generation.usage.is_some()
        && generation.config.usage_hook.inject_stream_usage
        && info.stream
        && matches!(api, Api::ChatCompletions | Api::Completions)
        && request_stream_usage(&mut c.body, info)
}

/// Headers the gateway sets itself, so the client's copies are dropped. The client's
/// `X-Request-Id` is the request id the gateway sends under `upstream.request_id_header`.
fn replaced_by_gateway(name: &[u8], id_header: Option<&str>) -> bool {
    const OWN: [&[u8]; 5] = [
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-request-id",
    ];
    OWN.iter().any(|h| name.eq_ignore_ascii_case(h))
        || id_header.is_some_and(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Who the request came from, as far as the upstream head cares.
pub struct Origin<'a> {
    pub client_ip: &'a str,
    pub request_id: &'a [u8],
    /// `upstream.request_id_header`; `None`: the id is not sent.
    pub request_id_header: Option<&'a str>,
    /// Lowercased header names carrying the client's gateway key (empty when auth is off).
    pub credentials: &'a [Vec<u8>],
    /// `scheduling.priority_header`: the gateway's to read, not the backend's.
    pub priority_header: Option<&'a str>,
}

/// Writes the upstream request head (through the blank line) into `out`, cleared first.
/// `body_len` is the exact body that follows; the gateway always sends a known length upstream.
pub fn write_upstream_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    backend: &Backend,
    origin: Origin<'_>,
    body_len: u64,
) {
    let Origin {
        client_ip,
        request_id,
        request_id_header,
        credentials,
        priority_header,
    } = origin;
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
    if let Some(name) = request_id_header {
        push_header(out, name.as_bytes(), request_id);
    }
    if let Some(auth) = &backend.authorization {
        push_header(out, b"Authorization", auth.0.as_bytes());
    }

    // With gateway auth on, the client's key is ours, never the backend's; a backend key
    // replaces any client `Authorization`.
    let strip_credentials = !credentials.is_empty();
    let strip_authorization = strip_credentials || backend.authorization.is_some();
    for (n, v) in &head.headers {
        let name = n.of(buf);
        if is_hop_by_hop(name)
            || replaced_by_gateway(name, request_id_header)
            || has_token(connection_tokens, name)
            || priority_header.is_some_and(|h| name.eq_ignore_ascii_case(h.as_bytes()))
        {
            continue;
        }
        if (strip_authorization && name.eq_ignore_ascii_case(b"authorization"))
            || (strip_credentials
                && (name.eq_ignore_ascii_case(b"x-api-key")
                    || credentials.iter().any(|c| name.eq_ignore_ascii_case(c))))
        {
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
