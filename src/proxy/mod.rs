//! The request path. Each client connection runs [`serve_connection`], which takes every request
//! through the same phases, in order and never backwards:
//!
//! 1. **read**: read and validate the request head ([`read_head`]);
//! 2. **route**: `/health` is answered here, `/v1/*` is proxied, anything else is a 404;
//!    **admit**: who is calling (key, status, IP) and may they start a request now (rates,
//!    concurrency; the permit is held to the end of the exchange) ([`admit`]);
//! 3. **body**: read the request body, bounded by `max_request_body` ([`read_body`]);
//!    **authorize**: once the body names the model: model allowed, quota left;
//! 4. **pick**: choose a backend ([`crate::upstream`]);
//! 5. **relay**: send the request and stream the response back ([`relay::exchange`]);
//! 6. **finish**: keep the connection for the next request or close it.
//!
//! Errors decided in any phase are typed ([`GatewayError`]) and written by [`respond_error`] only.
//! This module owns per-connection buffers; it must never block the worker thread.

mod client_watch;
mod forward;
mod inspect;
mod relay;

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use monoio::buf::IoBufMut;
use monoio::io::{
    AsyncReadRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller, OwnedReadHalf,
    OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;

use crate::auth::{Auth, KeyEntry};
use crate::config::Config;
use crate::error::{write_error, GatewayError};
use crate::http::{self, ChunkedDecoder, Framing, RequestError, RequestHead};
use crate::limits::{self, LimitSet, Permit};
use crate::upstream::WorkerUpstreams;
use crate::usage::{Captured, Outcome, UsageEvent, UsageSender};
use client_watch::{ClientWatch, WatchEnd};
use relay::{Exchange, Progress, Relayed};

type ClientReader = OwnedReadHalf<TcpStream>;
type ClientWriter = OwnedWriteHalf<TcpStream>;

/// Initial client read buffer; grows up to `max_header_size` for large heads.
const CLIENT_BUF: usize = 4096;
/// The watch read only ever sees the start of a pipelined request.
const WATCH_BUF: usize = 512;
/// Request buffers larger than this are released after the request instead of kept for the next.
const KEEP_BUF: usize = 64 * 1024;

/// One worker's state shared by all of its connections (single-threaded: `Rc`, `Cell`).
pub struct Context {
    pub config: Arc<Config>,
    pub upstreams: WorkerUpstreams,
    /// Present when usage reporting is enabled.
    pub usage: Option<UsageSender>,
    /// Ask streaming backends for usage on the client's behalf (`usage_hook.inject_stream_usage`).
    pub inject_stream_usage: bool,
    /// Present when `auth` is enabled; shared by all workers.
    pub auth: Option<Arc<Auth>>,
    /// This worker's Lua policy state (a Lua state is not `Send`).
    pub lua: Option<crate::auth::LuaPolicy>,
    /// Request rates kept in Redis (`rate_limit.storage: redis`), shared by all instances.
    pub shared_rates: Option<Arc<crate::limits::RedisRates>>,
    /// `rate_limit.global`, shared by all workers; `None` when it sets no limit.
    pub global_limits: Option<Arc<LimitSet>>,
    shutdown: Arc<AtomicBool>,
    active: Cell<usize>,
    ids: RequestIds,
}

impl Context {
    pub fn new(
        config: Arc<Config>,
        upstreams: WorkerUpstreams,
        shutdown: Arc<AtomicBool>,
        worker: usize,
    ) -> Self {
        Context {
            config,
            upstreams,
            usage: None,
            inject_stream_usage: true,
            auth: None,
            lua: None,
            shared_rates: None,
            global_limits: None,
            shutdown,
            active: Cell::new(0),
            ids: RequestIds::new(worker),
        }
    }

    /// Requests currently being handled on this worker (idle keep-alive connections excluded).
    pub fn active_requests(&self) -> usize {
        self.active.get()
    }

    fn draining(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }
}

/// Counts a request as in progress for the graceful-shutdown drain, on every exit path.
struct ActiveGuard<'a>(&'a Cell<usize>);

impl<'a> ActiveGuard<'a> {
    fn enter(c: &'a Cell<usize>) -> Self {
        c.set(c.get() + 1);
        ActiveGuard(c)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Per-connection buffers, allocated once and reused by every request on the connection.
struct Client {
    /// Bytes read from the client and not yet consumed (a head, body bytes, a pipelined request).
    buf: Vec<u8>,
    head: RequestHead,
    /// The request body, decoded.
    body: Vec<u8>,
    /// The upstream request, or an error response.
    out: Vec<u8>,
    resp_head: Vec<u8>,
    watch_buf: Vec<u8>,
    peer: IpAddr,
    ip: String,
}

/// What to do with the connection after a request.
enum Next {
    KeepAlive,
    Close,
}

pub async fn serve_connection(ctx: Rc<Context>, stream: TcpStream, peer: SocketAddr) {
    // Without it, a small response waits for the client's delayed ACK.
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut c = Client {
        buf: Vec::with_capacity(CLIENT_BUF),
        head: RequestHead::default(),
        body: Vec::new(),
        out: Vec::new(),
        resp_head: Vec::with_capacity(1024),
        watch_buf: Vec::with_capacity(WATCH_BUF),
        peer: peer.ip().to_canonical(),
        ip: peer.ip().to_canonical().to_string(),
    };
    loop {
        match read_head(&ctx, &mut rd, &mut c).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _active = ActiveGuard::enter(&ctx.active);
                respond_error(&mut wr, &mut c.out, &e, b"", false).await;
                return;
            }
        }
        let _active = ActiveGuard::enter(&ctx.active);
        let next = handle_request(&ctx, &mut rd, &mut wr, &mut c).await;
        if c.out.capacity() > KEEP_BUF {
            c.out = Vec::new();
        }
        if c.body.capacity() > KEEP_BUF {
            c.body = Vec::new();
        }
        if matches!(next, Next::Close) || ctx.draining() {
            return;
        }
    }
}

/// Phase 1: reads until `c.buf` starts with a complete, valid request head. `Ok(false)` means the
/// connection ended quietly (closed, or idle past the keep-alive timeout).
async fn read_head(
    ctx: &Context,
    rd: &mut ClientReader,
    c: &mut Client,
) -> Result<bool, GatewayError> {
    let max_head = ctx.config.max_header_size;
    let mut deadline: Option<Instant> = None;
    loop {
        if !c.buf.is_empty() {
            if http::parse_request(&c.buf, max_head, &mut c.head)? {
                return Ok(true);
            }
            deadline.get_or_insert_with(|| Instant::now() + ctx.config.timeouts.client_header);
        }
        let mut buf = mem::take(&mut c.buf);
        let len = buf.len();
        if len == buf.capacity() {
            buf.reserve(len.min(max_head));
        }
        let cap = buf.capacity();
        let wait = match deadline {
            None => ctx.config.timeouts.keepalive,
            Some(d) => d.saturating_duration_since(Instant::now()),
        };
        let Ok((read, slice)) = monoio::time::timeout(wait, rd.read(buf.slice_mut(len..cap))).await
        else {
            return if deadline.is_some() {
                Err(RequestError::Timeout.into())
            } else {
                Ok(false)
            };
        };
        c.buf = slice.into_inner();
        match read {
            Ok(n) if n > 0 => {}
            _ => return Ok(false),
        }
    }
}

/// Phases 2 to 6 for one request whose head is in `c.buf`.
async fn handle_request(
    ctx: &Context,
    rd: &mut ClientReader,
    wr: &mut ClientWriter,
    c: &mut Client,
) -> Next {
    let request_id = RequestId::for_request(c.head.header(&c.buf, b"x-request-id"), &ctx.ids);
    let keep_alive = c.head.keep_alive && !ctx.draining();
    let path = c.head.path(&c.buf);
    let method = c.head.method.of(&c.buf);
    let head_request = method == b"HEAD";

    if path == b"/health" && matches!(method, b"GET" | b"HEAD") {
        let body: &[u8] = if head_request {
            b""
        } else {
            br#"{"status":"ok"}"#
        };
        let keep = keep_alive && c.head.framing() == Framing::Empty;
        http::write_response(&mut c.out, 200, b"application/json", &[], body, keep);
        let consumed = c.head.head_len;
        c.buf.drain(..consumed);
        return write_out(wr, &mut c.out, keep).await;
    }
    if !path.starts_with(b"/v1/") {
        let err = GatewayError::NotFound {
            method: String::from_utf8_lossy(method).into_owned(),
            path: String::from_utf8_lossy(path).into_owned(),
        };
        // A body we did not read would be taken for the next request.
        return reject_unread_body(wr, c, &err, &request_id, keep_alive).await;
    }

    // Held until this function returns, whichever way: the concurrency slots go back then.
    let admission = match admit(ctx, c).await {
        Ok(a) => a,
        // The body is read anyway: closing on unread bytes resets the connection, and the
        // client may lose the 401/429 with it; refused clients also retry on the same connection.
        Err(e) => {
            if let Err(read) = read_body(ctx, rd, wr, c).await {
                return respond_error(wr, &mut c.out, &read, request_id.as_bytes(), false).await;
            }
            let head_len = c.head.head_len;
            c.buf.drain(..head_len);
            return respond_error(wr, &mut c.out, &e, request_id.as_bytes(), keep_alive).await;
        }
    };
    let Some(backend) = ctx.upstreams.pick() else {
        return reject_unread_body(wr, c, &GatewayError::NoBackend, &request_id, keep_alive).await;
    };
    if let Err(e) = read_body(ctx, rd, wr, c).await {
        return respond_error(wr, &mut c.out, &e, request_id.as_bytes(), false).await;
    }
    let started = Instant::now();
    let info = inspect::inspect(&c.body).unwrap_or_default();
    if let (Some(auth), Some(key)) = (&ctx.auth, &admission.key) {
        let decided = auth
            .authorize(key, info.model(&c.body))
            .and_then(|()| run_policy(ctx, c, key, info.model(&c.body)));
        if let Err(e) = decided {
            let head_len = c.head.head_len;
            c.buf.drain(..head_len);
            return respond_error(wr, &mut c.out, &e, request_id.as_bytes(), keep_alive).await;
        }
    }
    let strip_usage = ctx.usage.is_some()
        && ctx.inject_stream_usage
        && info.stream
        && is_generation_endpoint(c.head.path(&c.buf))
        && inspect::request_stream_usage(&mut c.body, &info);

    forward::write_upstream_head(
        &mut c.out,
        &c.buf,
        &c.head,
        ctx.upstreams.backend(backend),
        forward::Origin {
            client_ip: &c.ip,
            request_id: request_id.as_bytes(),
            credentials: ctx.auth.as_ref().map_or(&[][..], |a| a.header_names()),
        },
        c.body.len() as u64,
    );
    c.out.extend_from_slice(&c.body);

    let canceller = Canceller::new();
    let watch_buf = mem::take(&mut c.watch_buf);
    let read = pin!(rd.cancelable_read(watch_buf, canceller.handle()));
    let mut watch = ClientWatch::new(read, canceller);
    let ex = Exchange {
        backend,
        head_request,
        request_id: request_id.as_bytes(),
        client_keep_alive: keep_alive,
        strip_usage,
        extra_headers: admission.headers.as_bytes(),
    };
    let mut progress = Progress::default();
    let result = relay::exchange(
        ctx,
        &mut watch,
        wr,
        &mut c.out,
        &mut c.resp_head,
        ex,
        &mut progress,
    )
    .await;
    let client_still_there = match watch.finish().await {
        WatchEnd::Quiet(buf) => {
            c.watch_buf = buf;
            true
        }
        WatchEnd::Pipelined(buf, n) => {
            c.buf.extend_from_slice(&buf[..n]);
            c.watch_buf = buf;
            true
        }
        WatchEnd::Gone => false,
    };

    let done = Finished {
        key: admission.key.as_deref(),
        request_id: &request_id,
        backend,
        info: &info,
        started,
        result: &result,
        progress,
    };
    account(ctx, c, done);
    // The head stayed in the buffer for the phases above; what follows it is the next request.
    let head_len = c.head.head_len;
    c.buf.drain(..head_len);
    match result {
        Ok(Relayed::Complete {
            client_reusable, ..
        }) if client_reusable && client_still_there => Next::KeepAlive,
        Ok(_) => Next::Close,
        Err(e) if client_still_there => {
            respond_error(wr, &mut c.out, &e, request_id.as_bytes(), keep_alive).await
        }
        Err(_) => Next::Close,
    }
}

/// A request let in: who it is (when auth is on) and what it holds.
#[derive(Default)]
struct Admission {
    key: Option<Arc<KeyEntry>>,
    /// Concurrency slots, given back on drop.
    _permit: Permit,
    /// `x-ratelimit-*` lines for the response head.
    headers: String,
}

/// Admission, before the body is read: refusing here costs no body read. Free when auth is off
/// and no global limit is set.
async fn admit(ctx: &Context, c: &Client) -> Result<Admission, GatewayError> {
    let key = match &ctx.auth {
        Some(auth) => {
            let caller = crate::auth::Caller {
                ip: c.peer,
                ip_text: &c.ip,
                method: c.head.method.of(&c.buf),
                path: c.head.path(&c.buf),
            };
            Some(
                auth.identify(auth.extract_key(&c.head, &c.buf), &caller)
                    .await?,
            )
        }
        None => None,
    };
    let key_limits = key.as_ref().and_then(|k| k.live.limits.as_ref());
    let scopes: Vec<&Arc<LimitSet>> = key_limits.into_iter().chain(&ctx.global_limits).collect();
    if scopes.is_empty() {
        return Ok(Admission {
            key,
            ..Admission::default()
        });
    }
    let queue = ctx.config.rate_limit.queue_timeout;
    let admitted = limits::admit(&scopes, queue, ctx.shared_rates.as_deref())
        .await
        .map_err(GatewayError::RateLimited)?;
    Ok(Admission {
        key,
        _permit: admitted.permit,
        headers: admitted.headers,
    })
}

/// The Lua stage of `authorize`, when configured.
fn run_policy(
    ctx: &Context,
    c: &Client,
    key: &KeyEntry,
    model: Option<&str>,
) -> Result<(), GatewayError> {
    let Some(policy) = &ctx.lua else {
        return Ok(());
    };
    fn text(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap_or("")
    }
    let req = crate::auth::LuaRequest {
        api_key: &key.key_ref.api_key,
        ip: &c.ip,
        method: text(c.head.method.of(&c.buf)),
        path: text(c.head.path(&c.buf)),
        headers: c
            .head
            .headers
            .iter()
            .map(|(n, v)| (text(n.of(&c.buf)), text(v.of(&c.buf))))
            .collect(),
        model,
    };
    match policy.decide(&req, key) {
        Ok(crate::auth::Verdict::Allow) => Ok(()),
        Ok(crate::auth::Verdict::Deny { status, message }) => Err(GatewayError::Denied {
            denial: crate::config::Denial::Policy,
            status,
            message,
        }),
        Err(e) => {
            tracing::warn!(key = %key.key_ref.name, "lua policy failed: {e}");
            Err(GatewayError::PolicyFailed)
        }
    }
}

/// Endpoints whose streams carry token usage (and may be asked for it).
fn is_generation_endpoint(path: &[u8]) -> bool {
    path == b"/v1/chat/completions" || path == b"/v1/completions"
}

/// A relayed request, as the account phase sees it.
struct Finished<'a> {
    key: Option<&'a KeyEntry>,
    request_id: &'a RequestId,
    backend: usize,
    info: &'a inspect::RequestInfo,
    started: Instant,
    result: &'a Result<Relayed, GatewayError>,
    progress: Progress,
}

/// Phase 6: what the request cost, for the usage reporters and the log.
fn account(ctx: &Context, c: &Client, done: Finished<'_>) {
    let Finished {
        key,
        request_id,
        backend,
        info,
        started,
        result,
        progress,
    } = done;
    let backend_url = &ctx.upstreams.backend(backend).url;
    let rid = String::from_utf8_lossy(request_id.as_bytes());
    let outcome = match result {
        Ok(Relayed::Complete { status, .. }) => {
            tracing::debug!(request_id = %rid, status, backend = %backend_url, "relayed");
            Outcome::Completed
        }
        Ok(Relayed::Broken { status }) => {
            tracing::warn!(request_id = %rid, status, backend = %backend_url, "backend failed mid-response; client connection cut");
            Outcome::Failed
        }
        Ok(Relayed::ClientGone) => {
            tracing::debug!(request_id = %rid, backend = %backend_url, "client left; upstream closed");
            Outcome::Cancelled
        }
        Err(_) => Outcome::Failed,
    };
    let Some(usage) = &ctx.usage else { return };
    // Requests that never reached a backend cost nothing.
    if progress.status == 0 && outcome == Outcome::Failed {
        return;
    }
    let (captured, content_events) = match progress.meter {
        Some(m) => {
            let events = m.content_events();
            (m.finish(), events)
        }
        None => (Captured::Nothing, 0),
    };
    usage.send(UsageEvent {
        request_id: rid.into_owned(),
        started_at: SystemTime::now() - started.elapsed(),
        key: key.map(|k| k.key_ref.clone()),
        model: info.model(&c.body).map(str::to_owned),
        endpoint: String::from_utf8_lossy(c.head.path(&c.buf)).into_owned(),
        is_stream: info.stream,
        backend_url: ctx.upstreams.backend(backend).url_shared.clone(),
        status_code: progress.status,
        latency: started.elapsed(),
        ttft: progress.first_byte.map(|t| t - started),
        outcome,
        captured,
        content_events,
        request_bytes: c.body.len() as u64,
    });
}

/// Phase 3: reads the request body into `c.body`, removing its bytes from `c.buf` (the head stays
/// until the request is done; what follows the body stays for the next request). Chunked bodies are decoded: the gateway always
/// sends a known length upstream, and needs the whole body anyway to route and meter it.
async fn read_body(
    ctx: &Context,
    rd: &mut ClientReader,
    wr: &mut ClientWriter,
    c: &mut Client,
) -> Result<(), GatewayError> {
    let limit = ctx.config.max_request_body;
    let framing = c.head.framing();
    if let Framing::Length(n) = framing {
        if n > limit as u64 {
            return Err(RequestError::BodyTooLarge.into());
        }
    }
    if c.head.expect_continue && framing != Framing::Empty {
        let (sent, _) = wr.write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]).await;
        sent.map_err(|_| RequestError::Malformed("client closed"))?;
    }
    let head_len = c.head.head_len;
    c.body.clear();
    match framing {
        Framing::Empty | Framing::UntilClose => {}
        Framing::Length(n) => {
            let n = n as usize;
            let in_buf = (c.buf.len() - head_len).min(n);
            c.body.reserve_exact(n);
            c.body
                .extend_from_slice(&c.buf[head_len..head_len + in_buf]);
            while c.body.len() < n {
                let body = mem::take(&mut c.body);
                let len = body.len();
                let read = rd.read(body.slice_mut(len..n));
                let (res, slice) = monoio::time::timeout(ctx.config.timeouts.client_body, read)
                    .await
                    .map_err(|_| RequestError::Timeout)?;
                c.body = slice.into_inner();
                match res {
                    Ok(k) if k > 0 => {}
                    _ => return Err(RequestError::Malformed("body ended early").into()),
                }
            }
            c.buf.drain(head_len..head_len + in_buf);
        }
        Framing::Chunked => read_chunked(ctx, rd, c, head_len, limit).await?,
    }
    Ok(())
}

/// Decodes a chunked body that starts at `c.buf[head_len..]` into `c.body`, dropping its framing
/// from `c.buf` so that the head and any bytes after the body remain.
async fn read_chunked(
    ctx: &Context,
    rd: &mut ClientReader,
    c: &mut Client,
    head_len: usize,
    limit: usize,
) -> Result<(), GatewayError> {
    let mut decoder = ChunkedDecoder::default();
    let mut too_large = false;
    let pos = head_len;
    loop {
        let body = &mut c.body;
        let used = decoder
            .feed(&c.buf[pos..], |d| {
                too_large |= body.len() + d.len() > limit;
                if !too_large {
                    body.extend_from_slice(d);
                }
            })
            .map_err(|_| RequestError::Malformed("invalid chunked body"))?;
        if too_large {
            return Err(RequestError::BodyTooLarge.into());
        }
        c.buf.drain(pos..pos + used);
        if decoder.is_done() {
            return Ok(());
        }
        let mut buf = mem::take(&mut c.buf);
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = monoio::time::timeout(
            ctx.config.timeouts.client_body,
            rd.read(buf.slice_mut(len..cap)),
        )
        .await
        .map_err(|_| RequestError::Timeout)?;
        c.buf = slice.into_inner();
        match res {
            Ok(k) if k > 0 => {}
            _ => return Err(RequestError::Malformed("body ended early").into()),
        }
    }
}

/// Answers before the body was read: the connection is closed unless there was no body.
async fn reject_unread_body(
    wr: &mut ClientWriter,
    c: &mut Client,
    err: &GatewayError,
    request_id: &RequestId,
    keep_alive: bool,
) -> Next {
    let keep = keep_alive && c.head.framing() == Framing::Empty;
    let consumed = c.head.head_len;
    c.buf.drain(..consumed);
    respond_error(wr, &mut c.out, err, request_id.as_bytes(), keep).await
}

/// The one place where a [`GatewayError`] becomes bytes on the wire.
async fn respond_error(
    wr: &mut ClientWriter,
    out: &mut Vec<u8>,
    err: &GatewayError,
    request_id: &[u8],
    keep_alive: bool,
) -> Next {
    if err.status() >= 500 {
        tracing::warn!(request_id = %String::from_utf8_lossy(request_id), status = err.status(), code = err.code(), "request failed");
    } else {
        tracing::debug!(status = err.status(), code = err.code(), "request refused");
    }
    write_error(out, err, request_id, keep_alive);
    write_out(wr, out, keep_alive && !err.closes_connection()).await
}

async fn write_out(wr: &mut ClientWriter, out: &mut Vec<u8>, keep_alive: bool) -> Next {
    let (sent, buf) = wr.write_all(mem::take(out)).await;
    *out = buf;
    if sent.is_ok() && keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// Request ids: the client's `X-Request-Id` when it is sane, else a new one, unique per process.
struct RequestIds {
    prefix: u64,
    next: Cell<u64>,
}

impl RequestIds {
    fn new(worker: usize) -> Self {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        RequestIds {
            prefix: (random & 0xffff_ffff_ff00) | (worker as u64 & 0xff),
            next: Cell::new(0),
        }
    }
}

struct RequestId {
    bytes: [u8; 128],
    len: usize,
}

impl RequestId {
    fn for_request(client: Option<&[u8]>, ids: &RequestIds) -> Self {
        let mut id = RequestId {
            bytes: [0; 128],
            len: 0,
        };
        match client {
            Some(v)
                if !v.is_empty()
                    && v.len() <= 128
                    && v.iter().all(|b| (0x21..0x7f).contains(b)) =>
            {
                id.bytes[..v.len()].copy_from_slice(v);
                id.len = v.len();
            }
            _ => {
                let n = ids.next.get();
                ids.next.set(n + 1);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                id.bytes[..4].copy_from_slice(b"req_");
                let value = (u128::from(ids.prefix) << 64) | u128::from(n);
                for i in 0..24 {
                    id.bytes[4 + i] = HEX[((value >> (4 * (23 - i))) & 0xf) as usize];
                }
                id.len = 28;
            }
        }
        id
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// How long a draining worker waits between checks that its requests have finished.
pub const DRAIN_POLL: Duration = Duration::from_millis(20);
