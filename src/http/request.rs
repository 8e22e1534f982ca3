//! Request heads: parse with httparse, then apply the framing rules that keep a proxy safe from
//! request smuggling (RFC 9112 §6.3): one unambiguous body length or nothing.

use super::{has_token, parse_content_length, Framing, Span, MAX_HEADERS};

/// Why a request was refused before it reached any backend. Each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Syntax the parser cannot accept (400).
    Malformed(&'static str),
    /// Ambiguous body framing, the classic smuggling vector (400).
    AmbiguousFraming(&'static str),
    /// Request line and headers exceed the configured size or header count (431).
    HeaderTooLarge,
    /// Body larger than `max_request_body` (413).
    BodyTooLarge,
    /// The head or body did not arrive in time (408).
    Timeout,
}

/// `.` or `..`, also percent-encoded (`%2e`).
fn is_dot_segment(segment: &[u8]) -> bool {
    let mut rest = segment;
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && rest[2] | 0x20 == b'e' {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// A parsed request head. Spans point into the buffer that was parsed; the struct is reused
/// across requests on a connection so its header vector allocates once.
#[derive(Debug, Default)]
pub struct RequestHead {
    pub method: Span,
    pub target: Span,
    pub http10: bool,
    pub headers: Vec<(Span, Span)>,
    /// Bytes taken by the request line and headers, including the blank line.
    pub head_len: usize,
    pub framing: Option<Framing>,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl RequestHead {
    pub fn framing(&self) -> Framing {
        self.framing.unwrap_or(Framing::Empty)
    }

    /// First value of header `name` (case-insensitive).
    pub fn header<'a>(&self, buf: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.of(buf).eq_ignore_ascii_case(name))
            .map(|(_, v)| v.of(buf))
    }

    /// The request path without its query string.
    pub fn path<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        path_of(self.target.of(buf))
    }
}

/// A request target without its query string: everything before the first `?`.
pub fn path_of(target: &[u8]) -> &[u8] {
    &target[..memchr::memchr(b'?', target).unwrap_or(target.len())]
}

/// Parses a request head from the start of `buf` into `out`.
///
/// Returns `Ok(false)` when more bytes are needed, `Ok(true)` when `out` holds a complete, validated
/// head. `max_head` bounds the head size: an incomplete head already that long is refused.
pub fn parse_request(
    buf: &[u8],
    max_head: usize,
    out: &mut RequestHead,
) -> Result<bool, RequestError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut storage);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max_head {
                Err(RequestError::HeaderTooLarge)
            } else {
                Ok(false)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::HeaderTooLarge),
        Err(httparse::Error::Version) => {
            return Err(RequestError::Malformed("unsupported HTTP version"))
        }
        Err(_) => return Err(RequestError::Malformed("malformed request head")),
    };
    if head_len > max_head {
        return Err(RequestError::HeaderTooLarge);
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(RequestError::Malformed("incomplete request line"));
    };
    let target = path.as_bytes();
    let path_only = path_of(target);
    // Most paths have neither a dot nor an escape: one scan and done.
    let maybe_dots = memchr::memchr2(b'.', b'%', path_only).is_some();
    if maybe_dots && path_only.split(|&b| b == b'/').any(is_dot_segment) {
        // `/v1/../metrics` would leave the proxied prefix at a backend that resolves it.
        return Err(RequestError::Malformed("dot segment in the request path"));
    }
    out.method = Span::within(buf, method.as_bytes());
    out.target = Span::within(buf, path.as_bytes());
    out.http10 = version == 0;
    out.head_len = head_len;
    out.headers.clear();

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut host = false;
    out.expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        out.headers
            .push((Span::within(buf, name), Span::within(buf, h.value)));
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(h.value)
                .ok_or(RequestError::Malformed("invalid Content-Length"))?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(RequestError::AmbiguousFraming(
                    "conflicting Content-Length headers",
                ));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if transfer_encoding {
                return Err(RequestError::AmbiguousFraming("repeated Transfer-Encoding"));
            }
            transfer_encoding = true;
            // Only plain `chunked` is accepted: anything layered on it is a framing the backend
            // might read differently.
            chunked = h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
            if !chunked {
                return Err(RequestError::AmbiguousFraming(
                    "unsupported Transfer-Encoding",
                ));
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= has_token(h.value, b"close");
            keep_alive_token |= has_token(h.value, b"keep-alive");
        } else if name.eq_ignore_ascii_case(b"expect") {
            if !h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                return Err(RequestError::Malformed("unsupported Expect value"));
            }
            out.expect_continue = !out.http10;
        } else if name.eq_ignore_ascii_case(b"host") {
            if host {
                return Err(RequestError::Malformed("repeated Host header"));
            }
            host = true;
        }
    }
    if !out.http10 && !host {
        return Err(RequestError::Malformed("missing Host header"));
    }
    if transfer_encoding && content_length.is_some() {
        return Err(RequestError::AmbiguousFraming(
            "both Content-Length and Transfer-Encoding present",
        ));
    }
    if transfer_encoding && out.http10 {
        return Err(RequestError::AmbiguousFraming(
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    out.framing = Some(if chunked {
        Framing::Chunked
    } else {
        match content_length {
            Some(0) | None => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    });
    out.keep_alive = if out.http10 {
        keep_alive_token && !close
    } else {
        !close
    };
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RequestHead, RequestError> {
        let mut h = RequestHead::default();
        assert!(parse_request(s.as_bytes(), 8192, &mut h)?, "incomplete");
        Ok(h)
    }

    #[test]
    fn path_of_drops_the_query() {
        assert_eq!(path_of(b"/v1/models?x=1&y=?"), b"/v1/models");
        assert_eq!(path_of(b"/v1/models"), b"/v1/models");
        assert_eq!(path_of(b"?q"), b"");
    }

    #[test]
    fn simple_post_with_length() {
        let raw = "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n";
        let h = parse(raw).unwrap();
        assert_eq!(h.framing(), Framing::Length(12));
        assert_eq!(h.path(raw.as_bytes()), b"/v1/chat/completions");
        assert_eq!(h.target.of(raw.as_bytes()), b"/v1/chat/completions?x=1");
        assert_eq!(h.head_len, raw.len());
        assert!(h.keep_alive);
        assert_eq!(h.header(raw.as_bytes(), b"HOST"), Some(&b"a"[..]));
    }

    #[test]
    fn partial_then_too_large() {
        let mut h = RequestHead::default();
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHo", 8192, &mut h),
            Ok(false)
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHo", 10, &mut h),
            Err(RequestError::HeaderTooLarge)
        );
    }

    #[test]
    fn dot_segments_are_refused() {
        for path in [
            "/v1/../metrics",
            "/v1/%2e%2E/metrics",
            "/v1/./models",
            "/v1/.%2e",
        ] {
            let raw = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
            assert!(
                matches!(parse(&raw), Err(RequestError::Malformed(_))),
                "{path}"
            );
        }
        for path in ["/v1/models/...x", "/v1/a.b/c", "/v1/models?x=/../y"] {
            let raw = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
            assert!(parse(&raw).is_ok(), "{path}");
        }
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for raw in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw), Err(RequestError::AmbiguousFraming(_))),
                "{raw:?}"
            );
        }
        // The same length twice is unambiguous.
        let h =
            parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
                .unwrap();
        assert_eq!(h.framing(), Framing::Length(3));
    }

    #[test]
    fn malformed_heads() {
        assert!(matches!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
            Err(RequestError::Malformed(_))
        ));
        assert!(matches!(
            parse("GET / HTTP/1.1\r\n\r\n"),
            Err(RequestError::Malformed(_))
        ));
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
            Err(RequestError::Malformed(_))
        ));
    }

    #[test]
    fn connection_semantics() {
        assert!(
            !parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        assert!(
            parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        let h = parse(
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .unwrap();
        assert!(h.expect_continue);
    }
}
