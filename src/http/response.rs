//! Upstream response heads: parse, validate framing, and write the head the client receives
//! (hop-by-hop headers removed, framing restated). [`BodyTracker`] then follows the body as it is
//! relayed so the proxy knows where the response ends without buffering it.

use super::{
    has_token, is_hop_by_hop, parse_content_length, push_decimal, ChunkedDecoder, ChunkedError,
    Framing, MAX_HEADERS,
};

/// A backend answered with something that is not a usable HTTP/1.1 response (502).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    Malformed,
    HeadTooLarge,
    AmbiguousFraming,
    BadChunk(ChunkedError),
}

#[derive(Debug, Clone, Copy)]
pub struct ResponseHead {
    pub status: u16,
    pub head_len: usize,
    pub framing: Framing,
    /// The backend allows this connection to be reused after the body.
    pub reusable: bool,
    /// `Content-Type: text/event-stream`: the body is a sequence of SSE events.
    pub event_stream: bool,
    /// The `Content-Length` a bodiless response states (HEAD and 304 keep the resource's).
    empty_length: Option<u64>,
}

/// How the client receives the body, which decides the framing its head states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientBody {
    /// The backend's bytes, framing included.
    AsIs,
    /// Re-framed by the gateway as chunks (it removes events from the body).
    Chunked,
    /// The payload only, ended by closing the connection (an HTTP/1.0 client cannot take
    /// chunks).
    UntilClose,
}

impl ResponseHead {
    /// 1xx responses precede the real one; the gateway consumes them.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status)
    }

    /// Appends the framing header of the body as the client receives it.
    pub fn push_framing(&self, out: &mut Vec<u8>, body: ClientBody) {
        let length = match (body, self.framing) {
            (ClientBody::Chunked, _) | (ClientBody::AsIs, Framing::Chunked) => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
                return;
            }
            (ClientBody::UntilClose, _) | (ClientBody::AsIs, Framing::UntilClose) => return,
            (ClientBody::AsIs, Framing::Length(n)) => Some(n),
            (ClientBody::AsIs, Framing::Empty) => self.empty_length,
        };
        if let Some(n) = length {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Parses the response head at the start of `buf`. On success, `client_head` holds the status
/// line and forwarded headers, without framing ([`ResponseHead::push_framing`]) or the
/// terminating blank line: the caller appends its own headers.
/// Returns `Ok(None)` when the head is still incomplete.
pub fn parse_response(
    buf: &[u8],
    max_head: usize,
    head_request: bool,
    client_head: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, UpstreamError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut storage);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Err(UpstreamError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(UpstreamError::HeadTooLarge),
        Err(_) => return Err(UpstreamError::Malformed),
    };
    let (Some(status), Some(version)) = (res.code, res.version) else {
        return Err(UpstreamError::Malformed);
    };
    // httparse takes any three digits; a status below 100 is no HTTP status (RFC 9110 §15), and
    // the client would receive it restated without its leading zeros: "HTTP/1.1 2 OK".
    if status < 100 {
        return Err(UpstreamError::Malformed);
    }

    let mut content_length = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = version == 0;
    let mut connection_tokens: &[u8] = b"";
    let mut event_stream = false;
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-type") {
            event_stream =
                h.value.len() >= 17 && h.value[..17].eq_ignore_ascii_case(b"text/event-stream");
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(h.value).ok_or(UpstreamError::Malformed)?;
            if content_length.is_some_and(|p| p != n) {
                return Err(UpstreamError::AmbiguousFraming);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= has_token(h.value, b"close");
            connection_tokens = h.value;
        }
    }
    if transfer_encoding && content_length.is_some() {
        return Err(UpstreamError::AmbiguousFraming);
    }
    let no_body = head_request || status == 204 || status == 304 || (100..200).contains(&status);
    let framing = if no_body {
        Framing::Empty
    } else if transfer_encoding {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match content_length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };

    client_head.clear();
    client_head.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(client_head, u64::from(status));
    client_head.push(b' ');
    client_head.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    client_head.extend_from_slice(b"\r\n");
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        let forwarded = !is_hop_by_hop(name)
            && !name.eq_ignore_ascii_case(b"x-request-id")
            && !has_token(connection_tokens, name)
            // Restated below from the framing the gateway actually relays.
            && !name.eq_ignore_ascii_case(b"content-length");
        if forwarded {
            super::push_header(client_head, name, h.value);
        }
    }
    // HEAD and 304 keep the length the resource would have; other bodiless ones say zero.
    let empty_length = if no_body { content_length } else { Some(0) }.filter(|_| status >= 200);
    Ok(Some(ResponseHead {
        status,
        head_len,
        framing,
        reusable: !close && framing != Framing::UntilClose,
        event_stream,
        empty_length,
    }))
}

/// Follows a response body through the relay to find where it ends.
#[derive(Debug, Clone)]
pub enum BodyTracker {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

impl BodyTracker {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => BodyTracker::Length(0),
            Framing::Length(n) => BodyTracker::Length(n),
            Framing::Chunked => BodyTracker::Chunked(ChunkedDecoder::default()),
            Framing::UntilClose => BodyTracker::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        match self {
            BodyTracker::Length(n) => *n == 0,
            BodyTracker::Chunked(d) => d.is_done(),
            BodyTracker::UntilClose => false,
        }
    }

    /// Returns how many leading bytes of `bytes` belong to the body, handing the body's payload
    /// (chunk framing removed) to `payload`.
    #[inline]
    pub fn advance(
        &mut self,
        bytes: &[u8],
        mut payload: impl FnMut(&[u8]),
    ) -> Result<usize, UpstreamError> {
        let taken = match self {
            BodyTracker::Length(n) => {
                let take = (*n).min(bytes.len() as u64);
                *n -= take;
                take as usize
            }
            BodyTracker::Chunked(d) => {
                return d.feed(bytes, payload).map_err(UpstreamError::BadChunk)
            }
            BodyTracker::UntilClose => bytes.len(),
        };
        payload(&bytes[..taken]);
        Ok(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> (ResponseHead, String) {
        let mut out = Vec::new();
        let h = parse_response(raw.as_bytes(), 8192, false, &mut out)
            .unwrap()
            .unwrap();
        h.push_framing(&mut out, ClientBody::AsIs);
        (h, String::from_utf8(out).unwrap())
    }

    #[test]
    fn framing_follows_what_the_client_receives() {
        let (h, _) = parse("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n");
        let stated = |body| {
            let mut out = Vec::new();
            h.push_framing(&mut out, body);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(stated(ClientBody::AsIs), "Content-Length: 9\r\n");
        assert_eq!(
            stated(ClientBody::Chunked),
            "Transfer-Encoding: chunked\r\n"
        );
        assert_eq!(stated(ClientBody::UntilClose), "");
        let (_, head) = parse("HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n");
        assert!(head.ends_with("Content-Length: 12\r\n"), "{head}");
    }

    #[test]
    fn sse_head_keeps_headers_and_chunking() {
        let (h, out) = parse(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nx-request-id: up\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.reusable);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n"
        );
    }

    #[test]
    fn length_close_and_until_close() {
        let (h, out) =
            parse("HTTP/1.1 404 Not Found\r\nContent-Length: 7\r\nConnection: close\r\n\r\n");
        assert_eq!(
            (h.status, h.framing, h.reusable),
            (404, Framing::Length(7), false)
        );
        assert!(out.ends_with("Content-Length: 7\r\n"));
        let (h, _) = parse("HTTP/1.0 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.reusable), (Framing::UntilClose, false));
        let (h, _) = parse("HTTP/1.1 100 Continue\r\n\r\n");
        assert!(h.is_interim());
    }

    #[test]
    fn ambiguous_upstream_framing_is_an_error() {
        let mut out = Vec::new();
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            parse_response(raw, 8192, false, &mut out).unwrap_err(),
            UpstreamError::AmbiguousFraming
        );
    }

    #[test]
    fn status_below_100_is_malformed() {
        // Found by fuzz/fuzz_targets/response.rs: "002" was relayed to the client as "2".
        let mut out = Vec::new();
        for raw in [
            "HTTP/1.1 002 Me\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 099 X\r\n\r\n",
        ] {
            assert_eq!(
                parse_response(raw.as_bytes(), 8192, false, &mut out).unwrap_err(),
                UpstreamError::Malformed,
                "{raw:?}"
            );
        }
        assert!(parse_response(b"HTTP/1.1 100 Continue\r\n\r\n", 8192, false, &mut out).is_ok());
    }

    #[test]
    fn tracker_stops_at_body_end() {
        let mut t = BodyTracker::new(Framing::Length(5));
        assert_eq!(t.advance(b"abc", |_| {}).unwrap(), 3);
        assert_eq!(t.advance(b"defg", |_| {}).unwrap(), 2);
        assert!(t.is_done());
        let mut t = BodyTracker::new(Framing::Chunked);
        let mut payload = Vec::new();
        assert_eq!(
            t.advance(b"2\r\nab\r\n0\r\n\r\nextra", |d| payload
                .extend_from_slice(d))
                .unwrap(),
            12
        );
        assert!(t.is_done());
        assert_eq!(payload, b"ab");
    }
}
