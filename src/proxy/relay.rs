//! Phase 7b, relay: runs once per attempt, after [`super::pick`] chose a backend. Sends the
//! request upstream, then stream the response to the client as each upstream read
//! arrives. Response bytes are forwarded unchanged (chunked stays chunked); the only per-read work
//! is the framing tracker skipping over chunk sizes, the meter, and one write to the client (and
//! with `scheduling`, a streamed answer's new tokens charged to its key's fair share).
//! Two cases re-frame the body instead, still one write per read: the usage-only event the
//! gateway asked for is left out (sent as chunks, whatever the backend's framing), and an
//! HTTP/1.0 client gets the payload without chunking, ended by the close.

use std::mem;
use std::time::{Duration, Instant};

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

use super::client_watch::ClientWatch;
use super::pick::Queueing;
use super::Context;
use crate::api::Api;
use crate::error::GatewayError;
use crate::http::{
    self, parse_response, BodyTracker, ClientBody, Framing, ResponseHead, UpstreamError,
};
use crate::upstream::{ConnectError, Passive, UpstreamConn, WorkerUpstreams};
use crate::usage::Meter;

/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How an exchange that got past the point of no return ended (the status is in [`Progress`]).
pub enum Relayed {
    /// The whole response reached the client.
    Complete { client_reusable: bool },
    /// The client left; the upstream connection was closed so the backend stops generating.
    ClientGone,
    /// The backend failed (or went silent past `timeouts.idle` / `total`) after the response
    /// started; the client connection must be cut so it cannot mistake a partial body for a
    /// complete one.
    Broken { timed_out: bool },
}

impl Relayed {
    /// What this ending says about the backend's health (`status`: what it answered); `None`
    /// when it says nothing (the client left).
    pub fn passive(&self, status: u16) -> Option<Passive> {
        match self {
            Relayed::ClientGone => None,
            Relayed::Complete { .. } if status >= 500 => Some(Passive::Failed),
            Relayed::Complete { .. } => Some(Passive::Ok),
            Relayed::Broken { .. } => Some(Passive::Failed),
        }
    }
}

/// What stays the same across the attempts of one request.
pub struct Plan<'a> {
    pub request_id: &'a [u8],
    pub head_request: bool,
    /// An HTTP/1.0 client: it cannot take a chunked body.
    pub client_http10: bool,
    pub client_keep_alive: bool,
    /// The gateway added `include_usage` to the request: keep the usage-only event from the client.
    pub strip_usage: bool,
    /// The API of the request path: how the meter reads the response.
    pub api: Api,
    /// Complete header lines added to the client's response head (`x-ratelimit-*`).
    pub extra_headers: &'a [u8],
    /// `timeouts.idle`: longest gap between body reads.
    pub idle: Option<Duration>,
    /// `timeouts.total`: end of the whole exchange.
    pub deadline: Option<Instant>,
    /// `usage_hook.durability: sync`: the response's last bytes are not written but left in
    /// `resp_head` ([`Progress::held`]), to go out once the usage record is committed.
    pub hold_last: bool,
}

/// One attempt: the request's plan, the backend and what this attempt may hand back.
pub struct Exchange<'a> {
    pub plan: &'a Plan<'a>,
    pub backend: usize,
    /// Response statuses to hand back (as [`GatewayError::UpstreamStatus`]) instead of relaying,
    /// so the caller can retry elsewhere. Empty on the last attempt.
    pub retry_status: &'a [u16],
    /// Latest time for the response head (`timeouts.first_byte`, `timeouts.total`).
    pub head_deadline: Option<Instant>,
    /// With `scheduling`: charged for a streamed answer's tokens as they are relayed.
    pub fair_share: Option<&'a Queueing>,
}

/// What the relay observed, filled in as it goes so every exit path can be accounted for.
/// The timestamps cost one vDSO clock read each (no syscall), a handful per request.
#[derive(Default)]
pub struct Progress {
    pub status: u16,
    /// When the first body byte reached the client (time to first token for streams).
    pub first_byte: Option<Instant>,
    pub meter: Option<Meter>,
    /// Response bytes written to the client (head included).
    pub bytes: u64,
    /// When the request was handed to an upstream connection, set once the whole request was
    /// written (last attempt); `None`: no backend received it.
    pub sent_upstream: Option<Instant>,
    /// When the backend's response head was complete.
    pub upstream_head: Option<Instant>,
    /// When the response head was handed to the client socket.
    pub head_written: Option<Instant>,
    /// When the last response byte was read from the backend.
    pub upstream_done: Option<Instant>,
    /// Times the request was sent again on a fresh connection after a stale pooled one failed.
    pub retries: u32,
    /// The response is complete but its last bytes wait in `resp_head` ([`Plan::hold_last`]).
    pub held: bool,
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
            ConnectError::Io(_) | ConnectError::Tls(_) => GatewayError::UpstreamConnect,
        }
    }
}

/// Sends `request` (a complete upstream request) and relays the response to `client`.
///
/// Errors are returned only while nothing has been written to the client, so the caller can still
/// answer with a proper error response. A request that fails on a reused pooled connection before
/// any response byte is sent once more on a fresh connection: the backend most likely closed the
/// idle connection as we wrote to it.
#[allow(clippy::too_many_arguments)]
pub async fn exchange(
    ctx: &Context,
    upstreams: &WorkerUpstreams,
    watch: &mut ClientWatch<'_>,
    client: &mut super::conn::ClientWriter,
    request: &mut Vec<u8>,
    resp_head: &mut Vec<u8>,
    ex: Exchange<'_>,
    progress: &mut Progress,
) -> Result<Relayed, GatewayError> {
    let plan = ex.plan;
    let mut fresh_only = false;
    let (mut up, head) = loop {
        let conn = if fresh_only {
            watch.race(upstreams.connect(ex.backend)).await
        } else {
            watch.race(upstreams.checkout(ex.backend)).await
        };
        let Some(conn) = conn else {
            return Ok(Relayed::ClientGone);
        };
        let mut up = conn?;
        let may_retry = up.reused && !fresh_only;
        let sent_at = Instant::now();
        // The request's write and the head's read share one deadline and are raced with the
        // client: a backend that stops reading must not hold the request once the socket
        // buffers fill. Given up, the buffer goes with the write (a retry writes a new one).
        let attempt = async {
            let (sent, req) = watch.race(up.stream.write_all(mem::take(request))).await?;
            *request = req;
            if sent.is_err() {
                return Some(Err(()));
            }
            // From here the backend has the request: whatever happens next, it is accounted.
            progress.sent_upstream = Some(sent_at);
            Some(Ok(read_response_head(
                &mut up,
                watch,
                plan.head_request,
                resp_head,
            )
            .await))
        };
        let attempt = match ex.head_deadline {
            None => attempt.await,
            Some(at) => match monoio::time::timeout_at(at.into(), attempt).await {
                Ok(a) => a,
                Err(_) => return Err(GatewayError::UpstreamTimeout),
            },
        };
        let head = match attempt {
            None => return Ok(Relayed::ClientGone),
            Some(Err(())) if may_retry => {
                fresh_only = true;
                progress.retries += 1;
                continue;
            }
            Some(Err(())) => return Err(GatewayError::UpstreamConnect),
            Some(Ok(head)) => head,
        };
        if let Some(Ok(_)) = &head {
            upstreams.observe_latency(ex.backend, sent_at.elapsed());
        }
        match head {
            None => return Ok(Relayed::ClientGone),
            Some(Ok(h)) => break (up, h),
            Some(Err(HeadError::Closed)) if may_retry => {
                fresh_only = true;
                progress.retries += 1;
            }
            Some(Err(HeadError::Closed)) => return Err(GatewayError::UpstreamClosed),
            Some(Err(HeadError::Protocol(e))) => return Err(GatewayError::UpstreamProtocol(e)),
        }
    };

    let status = head.status;
    if ex.retry_status.contains(&status) {
        // Dropping `up` closes it: its unread body makes it unusable.
        return Err(GatewayError::UpstreamStatus(status));
    }
    progress.status = status;
    progress.upstream_head = Some(Instant::now());
    // The body goes out as the backend framed it, unless the gateway must change it: leave out
    // the usage-only event it asked for (re-framed as chunks), or undo chunking for an HTTP/1.0
    // client (sent until close).
    let strip = plan.strip_usage && head.event_stream && status == 200;
    let client_body = if head.framing == Framing::Empty {
        ClientBody::AsIs
    } else if plan.client_http10 && (strip || head.framing == Framing::Chunked) {
        ClientBody::UntilClose
    } else if strip {
        ClientBody::Chunked
    } else {
        ClientBody::AsIs
    };
    let reframe = client_body != ClientBody::AsIs;
    let meter = progress
        .meter
        .insert(Meter::new(plan.api, head.event_stream, strip));
    let mut tracker = BodyTracker::new(head.framing);
    let ends_with_close = match client_body {
        ClientBody::UntilClose => true,
        ClientBody::AsIs => head.framing == Framing::UntilClose,
        ClientBody::Chunked => false,
    };
    let client_reusable = plan.client_keep_alive && !ends_with_close;
    head.push_framing(resp_head, client_body);
    http::push_header(resp_head, b"X-Request-Id", plan.request_id);
    resp_head.extend_from_slice(plan.extra_headers);
    if !client_reusable {
        resp_head.extend_from_slice(b"Connection: close\r\n");
    }
    resp_head.extend_from_slice(b"\r\n");
    let chunked_out = client_body == ClientBody::Chunked;

    // The head and the body bytes that came with it leave in one write.
    let initial = &up.buf[head.head_len..];
    let head_len = resp_head.len();
    let first = if reframe {
        let mut out = mem::take(request);
        out.clear();
        let k = tracker
            .advance(initial, |d| pass(meter, strip, d, &mut out))
            .map_err(GatewayError::UpstreamProtocol)?;
        let end = tracker.is_done();
        if end && strip {
            meter.flush(&mut out);
        }
        if chunked_out {
            push_chunk(resp_head, &out, end);
        } else {
            resp_head.extend_from_slice(&out);
        }
        *request = out;
        k
    } else {
        let k = tracker
            .advance(initial, |d| meter.observe(d))
            .map_err(GatewayError::UpstreamProtocol)?;
        resp_head.extend_from_slice(&initial[..k]);
        k
    };
    let fair_share = ex.fair_share.filter(|_| head.event_stream);
    if let Some(q) = fair_share {
        q.charge_streamed(meter.content_events());
    }
    let mut upstream_reusable = head.reusable && first == initial.len();
    let written = Instant::now();
    progress.head_written = Some(written);
    if resp_head.len() > head_len {
        progress.first_byte = Some(written);
    }
    progress.bytes += resp_head.len() as u64;
    if plan.hold_last && tracker.is_done() {
        // The whole response came with its head: all of it waits for the record.
        progress.held = true;
    } else {
        let (sent, h) = client.write_all(mem::take(resp_head)).await;
        *resp_head = h;
        if sent.is_err() {
            return Ok(Relayed::ClientGone);
        }
    }
    // Inter-token gaps: one clock read per relayed write of an event stream. It is a vDSO call
    // (no syscall), small next to the write itself, and the only way to see the backend's pacing.
    let metrics = ctx.metrics();
    let mut last_write = progress.first_byte.filter(|_| head.event_stream);

    while !tracker.is_done() {
        let mut buf = mem::take(&mut up.buf);
        buf.clear();
        let read = watch.race(up.stream.read(buf));
        let limit = match (plan.idle, plan.deadline) {
            (None, None) => None,
            (idle, deadline) => {
                let until_deadline = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                idle.into_iter().chain(until_deadline).min()
            }
        };
        let read = match limit {
            None => read.await,
            Some(limit) => match monoio::time::timeout(limit, read).await {
                Ok(r) => r,
                Err(_) => return Ok(Relayed::Broken { timed_out: true }),
            },
        };
        let Some((read, buf)) = read else {
            return Ok(Relayed::ClientGone);
        };
        up.buf = buf;
        let (n, end_of_body) = match read {
            // A body delimited by the close ends here; a re-framed one still needs its end.
            Ok(0) if head.framing == Framing::UntilClose && !reframe => break,
            Ok(0) if head.framing == Framing::UntilClose => (0, true),
            Ok(0) | Err(_) => return Ok(Relayed::Broken { timed_out: false }),
            Ok(n) => {
                crate::busy_poll::mark_activity();
                (n, false)
            }
        };
        let sent = if reframe {
            // One chunk (or stretch of payload) per read, usage-only events left out.
            let mut out = mem::take(request);
            out.clear();
            out.resize(CHUNK_PREFIX, 0);
            let Ok(body) = tracker.advance(&up.buf[..n], |d| pass(meter, strip, d, &mut out))
            else {
                return Ok(Relayed::Broken { timed_out: false });
            };
            if let Some(q) = fair_share {
                q.charge_streamed(meter.content_events());
            }
            upstream_reusable &= body == n;
            let end = end_of_body || tracker.is_done();
            if end && strip {
                meter.flush(&mut out);
            }
            let start = if chunked_out {
                frame_chunk_in_place(&mut out, end)
            } else {
                (out.len() > CHUNK_PREFIX).then_some(CHUNK_PREFIX)
            };
            let Some(start) = start else {
                *request = out;
                // The close ended a body that owes the client nothing more: reading on would
                // only see the close again.
                if end_of_body {
                    break;
                }
                continue;
            };
            progress.bytes += (out.len() - start) as u64;
            if plan.hold_last && end {
                resp_head.clear();
                resp_head.extend_from_slice(&out[start..]);
                *request = out;
                progress.held = true;
                progress.first_byte.get_or_insert_with(Instant::now);
                break;
            }
            let (sent, slice) = client.write_all(out.slice(start..)).await;
            *request = slice.into_inner();
            if end_of_body {
                if sent.is_err() {
                    return Ok(Relayed::ClientGone);
                }
                break;
            }
            sent
        } else {
            let Ok(body) = tracker.advance(&up.buf[..n], |d| meter.observe(d)) else {
                return Ok(Relayed::Broken { timed_out: false });
            };
            if let Some(q) = fair_share {
                q.charge_streamed(meter.content_events());
            }
            // Bytes past the end of the response mean the backend is out of step: never reuse it.
            upstream_reusable &= body == n;
            progress.bytes += body as u64;
            if plan.hold_last && tracker.is_done() {
                resp_head.clear();
                resp_head.extend_from_slice(&up.buf[..body]);
                progress.held = true;
                progress.first_byte.get_or_insert_with(Instant::now);
                break;
            }
            let (sent, slice) = client.write_all(mem::take(&mut up.buf).slice(..body)).await;
            up.buf = slice.into_inner();
            sent
        };
        if head.event_stream {
            let now = Instant::now();
            if let Some(prev) = last_write {
                metrics.inter_token.observe(now - prev);
            }
            last_write = Some(now);
            progress.first_byte.get_or_insert(now);
        } else if progress.first_byte.is_none() {
            progress.first_byte = Some(Instant::now());
        }
        if sent.is_err() {
            return Ok(Relayed::ClientGone);
        }
    }
    progress.upstream_done = Some(Instant::now());
    if upstream_reusable {
        upstreams.checkin(ex.backend, up);
    }
    Ok(Relayed::Complete { client_reusable })
}

/// Re-framed payload: metered, and appended to `out` (without the usage-only events when
/// `strip`).
fn pass(meter: &mut Meter, strip: bool, payload: &[u8], out: &mut Vec<u8>) {
    if strip {
        meter.filter(payload, out);
    } else {
        meter.observe(payload);
        out.extend_from_slice(payload);
    }
}

/// Room reserved in front of a re-framed chunk for its size line (8 hex digits and CRLF).
const CHUNK_PREFIX: usize = 10;

/// Turns `out` = [CHUNK_PREFIX reserved bytes][payload] into one chunk (plus the last chunk when
/// `end`), returning where the bytes to send start; `None` when there is nothing to send.
fn frame_chunk_in_place(out: &mut Vec<u8>, end: bool) -> Option<usize> {
    let payload = out.len() - CHUNK_PREFIX;
    let mut start = CHUNK_PREFIX;
    if payload > 0 {
        let mut size = [0u8; 8];
        let hex = hex_size(payload, &mut size);
        start = CHUNK_PREFIX - 2 - hex.len();
        out[start..CHUNK_PREFIX - 2].copy_from_slice(hex);
        out[CHUNK_PREFIX - 2..CHUNK_PREFIX].copy_from_slice(b"\r\n");
        out.extend_from_slice(b"\r\n");
    }
    if end {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    (out.len() > start).then_some(start)
}

/// Appends `payload` as one chunk (and the last chunk when `end`).
fn push_chunk(out: &mut Vec<u8>, payload: &[u8], end: bool) {
    if !payload.is_empty() {
        let mut size = [0u8; 8];
        out.extend_from_slice(hex_size(payload.len(), &mut size));
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
    }
    if end {
        out.extend_from_slice(b"0\r\n\r\n");
    }
}

fn hex_size(n: usize, buf: &mut [u8; 8]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Reads until a final (non-1xx) response head is complete. `None` means the client left.
async fn read_response_head(
    up: &mut UpstreamConn,
    watch: &mut ClientWatch<'_>,
    head_request: bool,
    resp_head: &mut Vec<u8>,
) -> Option<Result<ResponseHead, HeadError>> {
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
            Ok(_) => {
                crate::busy_poll::mark_activity();
                seen_any = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_framed_in_place() {
        let mut out = vec![0u8; CHUNK_PREFIX];
        out.extend_from_slice(&[b'x'; 26]);
        let start = frame_chunk_in_place(&mut out, true).unwrap();
        assert_eq!(
            &out[start..],
            &b"1a\r\nxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n0\r\n\r\n"[..]
        );
        let mut empty = vec![0u8; CHUNK_PREFIX];
        assert_eq!(frame_chunk_in_place(&mut empty, false), None);
        let mut v = Vec::new();
        push_chunk(&mut v, b"abc", false);
        assert_eq!(v, b"3\r\nabc\r\n");
    }
}
