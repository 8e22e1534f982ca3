//! Relay: send the request upstream, then stream the response to the client as each upstream read
//! arrives. Response bytes are forwarded unchanged (chunked stays chunked); the only per-read work
//! is the framing tracker skipping over chunk sizes and one write to the client.

use std::future::Future;
use std::mem;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedWriteHalf};
use monoio::net::TcpStream;
use monoio::BufResult;

use super::client_watch::ClientWatch;
use super::Context;
use crate::error::GatewayError;
use crate::http::{self, parse_response, BodyTracker, Framing, ResponseHead, UpstreamError};
use crate::upstream::{ConnectError, UpstreamConn};

/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How an exchange that got past the point of no return ended.
pub enum Relayed {
    /// The whole response reached the client.
    Complete { status: u16, client_reusable: bool },
    /// The client left; the upstream connection was closed so the backend stops generating.
    ClientGone,
    /// The backend failed after the response started; the client connection must be cut so it
    /// cannot mistake a partial body for a complete one.
    Broken { status: u16 },
}

/// What the caller of [`exchange`] needs to describe the request.
pub struct Exchange<'a> {
    pub backend: usize,
    pub head_request: bool,
    pub request_id: &'a [u8],
    pub client_keep_alive: bool,
}

enum HeadError {
    /// Closed or reset before any byte: the request may not have been seen at all.
    Closed,
    Protocol(UpstreamError),
}

impl From<ConnectError> for GatewayError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Unresolved => GatewayError::NoBackend,
            ConnectError::Timeout => GatewayError::UpstreamConnectTimeout,
            ConnectError::Io(_) => GatewayError::UpstreamConnect,
        }
    }
}

/// Sends `request` (a complete upstream request) and relays the response to `client`.
///
/// Errors are returned only while nothing has been written to the client, so the caller can still
/// answer with a proper error response. A request that fails on a reused pooled connection before
/// any response byte is sent once more on a fresh connection: the backend most likely closed the
/// idle connection as we wrote to it.
pub async fn exchange<R>(
    ctx: &Context,
    watch: &mut ClientWatch<'_, R>,
    client: &mut OwnedWriteHalf<TcpStream>,
    request: &mut Vec<u8>,
    resp_head: &mut Vec<u8>,
    ex: Exchange<'_>,
) -> Result<Relayed, GatewayError>
where
    R: Future<Output = BufResult<usize, Vec<u8>>>,
{
    let mut fresh_only = false;
    let (mut up, head) = loop {
        let conn = if fresh_only {
            watch.race(ctx.upstreams.connect(ex.backend)).await
        } else {
            watch.race(ctx.upstreams.checkout(ex.backend)).await
        };
        let Some(conn) = conn else {
            return Ok(Relayed::ClientGone);
        };
        let mut up = conn?;
        let may_retry = up.reused && !fresh_only;
        let (sent, req) = up.stream.write_all(mem::take(request)).await;
        *request = req;
        if sent.is_err() {
            if may_retry {
                fresh_only = true;
                continue;
            }
            return Err(GatewayError::UpstreamConnect);
        }
        match read_head(&mut up, watch, ex.head_request, resp_head).await {
            None => return Ok(Relayed::ClientGone),
            Some(Ok(h)) => break (up, h),
            Some(Err(HeadError::Closed)) if may_retry => fresh_only = true,
            Some(Err(HeadError::Closed)) => return Err(GatewayError::UpstreamClosed),
            Some(Err(HeadError::Protocol(e))) => return Err(GatewayError::UpstreamProtocol(e)),
        }
    };

    let mut tracker = BodyTracker::new(head.framing);
    let initial = &up.buf[head.head_len..];
    let first = tracker
        .advance(initial)
        .map_err(GatewayError::UpstreamProtocol)?;
    let mut upstream_reusable = head.reusable && first == initial.len();
    let client_reusable = ex.client_keep_alive && head.framing != Framing::UntilClose;
    http::push_header(resp_head, b"X-Request-Id", ex.request_id);
    if !client_reusable {
        resp_head.extend_from_slice(b"Connection: close\r\n");
    }
    resp_head.extend_from_slice(b"\r\n");
    resp_head.extend_from_slice(&initial[..first]);
    let (sent, h) = client.write_all(mem::take(resp_head)).await;
    *resp_head = h;
    if sent.is_err() {
        return Ok(Relayed::ClientGone);
    }

    let status = head.status;
    while !tracker.is_done() {
        let mut buf = mem::take(&mut up.buf);
        buf.clear();
        let Some((read, buf)) = watch.race(up.stream.read(buf)).await else {
            return Ok(Relayed::ClientGone);
        };
        up.buf = buf;
        let n = match read {
            Ok(0) if head.framing == Framing::UntilClose => break,
            Ok(0) | Err(_) => return Ok(Relayed::Broken { status }),
            Ok(n) => n,
        };
        let Ok(body) = tracker.advance(&up.buf[..n]) else {
            return Ok(Relayed::Broken { status });
        };
        // Bytes past the end of the response mean the backend is out of step: never reuse it.
        upstream_reusable &= body == n;
        let (sent, slice) = client.write_all(mem::take(&mut up.buf).slice(..body)).await;
        up.buf = slice.into_inner();
        if sent.is_err() {
            return Ok(Relayed::ClientGone);
        }
    }
    if upstream_reusable {
        ctx.upstreams.checkin(ex.backend, up);
    }
    Ok(Relayed::Complete {
        status,
        client_reusable,
    })
}

/// Reads until a final (non-1xx) response head is complete. `None` means the client left.
async fn read_head<R>(
    up: &mut UpstreamConn,
    watch: &mut ClientWatch<'_, R>,
    head_request: bool,
    resp_head: &mut Vec<u8>,
) -> Option<Result<ResponseHead, HeadError>>
where
    R: Future<Output = BufResult<usize, Vec<u8>>>,
{
    let mut seen_any = false;
    up.buf.clear();
    loop {
        if !up.buf.is_empty() {
            match parse_response(&up.buf, MAX_RESPONSE_HEAD, head_request, resp_head) {
                Ok(None) => {}
                Ok(Some(h)) if h.is_interim() => {
                    up.buf.drain(..h.head_len);
                    continue;
                }
                Ok(Some(h)) => return Some(Ok(h)),
                Err(e) => return Some(Err(HeadError::Protocol(e))),
            }
        }
        let mut buf = mem::take(&mut up.buf);
        let len = buf.len();
        if len == buf.capacity() {
            buf.reserve(len.max(4096));
        }
        let cap = buf.capacity();
        let (read, slice) = watch.race(up.stream.read(buf.slice_mut(len..cap))).await?;
        up.buf = slice.into_inner();
        match read {
            Ok(0) | Err(_) if !seen_any => return Some(Err(HeadError::Closed)),
            Ok(0) | Err(_) => return Some(Err(HeadError::Protocol(UpstreamError::Malformed))),
            Ok(_) => seen_any = true,
        }
    }
}
