//! The request path. Each client connection runs [`serve_connection`], which takes every request
//! through the same phases, in order and never backwards:
//!
//! 1. **read**: read and validate the request head ([`read_head`]);
//! 2. **route**: `/health` and the metrics path are answered here, `/v1/*` is proxied, anything
//!    else is a 404; **admit**: who is calling (key, status, IP) and may they start a request
//!    now (rates, concurrency; the permit is held to the end of the exchange) ([`admit`]);
//! 3. **body**: read the request body, bounded by `max_request_body` ([`read_body`]);
//!    **authorize**: once the body names the model: model allowed, quota left, Lua policy;
//! 4. **pick**: choose a backend ([`crate::upstream`]);
//! 5. **relay**: send the request and stream the response back ([`relay::exchange`]);
//! 6. **finish**: account for the request ([`account`]: metrics, access log, usage event), then
//!    keep the connection for the next request or close it.
//!
//! Each request runs on the config [`Generation`] current when it started (hot reload swaps it
//! between requests, never under one).
//!
//! Errors decided in any phase are typed ([`GatewayError`]) and written by [`respond_error`] only.
//! This module owns per-connection buffers; it must never block the worker thread.

mod client_watch;
mod forward;
mod inspect;
mod relay;

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::hash::{BuildHasher, Hasher};
use std::mem;
use std::net::{IpAddr, SocketAddr};
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

use crate::api::Api;
use crate::auth::{Auth, KeyEntry};
use crate::config::Affinity;
use crate::config::Config;
use crate::error::{write_error, GatewayError};
use crate::http::{self, ChunkedDecoder, Framing, RequestError, RequestHead};
use crate::limits::{self, LimitSet, Permit};
use crate::live::{Live, Snapshot};
use crate::metrics::{self, Registry, Rejection, UpstreamErrorKind, WorkerMetrics};
use crate::upstream::{InFlight, Passive, PickError, PickRequest, WorkerUpstreams};
use crate::usage::{Captured, Outcome, UsageEvent, UsageSender};
use client_watch::{Armed, ClientWatch, WatchEnd};
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
    /// Request rates kept in Redis (`rate_limit.storage: redis`), shared by all instances.
    /// Built at start; keys and local limits live in the config [`Generation`].
    pub shared_rates: Option<Arc<crate::limits::RedisRates>>,
    live: Arc<Live>,
    current: RefCell<Rc<Generation>>,
    registry: Arc<Registry>,
    worker: usize,
    shutdown: Arc<AtomicBool>,
    active: Cell<usize>,
    opening: Cell<usize>,
    ids: RequestIds,
    retry_budget: RetryBudget,
}

/// Retries allowed as a share of requests, per worker: each request deposits a fraction of a
/// token, each retry spends one. During an outage, retries stay a bounded fraction of traffic
/// instead of multiplying it; a small reserve allows retries right after start.
struct RetryBudget {
    tokens: Cell<f64>,
}

impl RetryBudget {
    const RESERVE: f64 = 10.0;

    fn deposit(&self, percent: u32) {
        self.tokens
            .set((self.tokens.get() + f64::from(percent) / 100.0).min(Self::RESERVE));
    }

    /// Whether a retry could be paid for now (without paying for it).
    fn has_one(&self) -> bool {
        self.tokens.get() >= 1.0
    }

    fn withdraw(&self) -> bool {
        let t = self.tokens.get();
        if t >= 1.0 {
            self.tokens.set(t - 1.0);
            true
        } else {
            false
        }
    }
}

/// One config generation as a worker runs it. A request holds its `Rc` until it ends, so a
/// reload swaps the config and the upstream pools for new requests only.
pub struct Generation {
    pub number: u64,
    pub config: Arc<Config>,
    pub upstreams: WorkerUpstreams,
    pub auth: Option<Arc<Auth>>,
    pub global_limits: Option<Arc<LimitSet>>,
    /// Present when metering is on (usage reporting, or auth charging tokens).
    usage: Option<UsageSender>,
    /// This worker's Lua state for the generation's policy script (Lua states are not `Send`).
    lua: Option<crate::auth::LuaPolicy>,
    lua_failed: bool,
    /// Metrics label slot of each backend, by backend index.
    slots: Vec<usize>,
}

impl Generation {
    fn new(number: u64, snapshot: &Snapshot, registry: &Registry, worker: usize) -> Rc<Generation> {
        let backends = snapshot.backends.clone();
        let slots = backends
            .list
            .iter()
            .map(|b| registry.backend_slot(&b.url))
            .collect();
        // The reloader compiled the script before publishing, so this only fails on a worker
        // that cannot allocate a Lua state; requests then get the policy's 500 rather than a pass.
        let lua = match snapshot.auth.as_ref().and_then(|a| a.lua_policy()) {
            Some(Ok(lua)) => Some(lua),
            Some(Err(e)) => {
                tracing::error!(worker, "lua policy unavailable: {e}");
                None
            }
            None => None,
        };
        let lua_failed =
            lua.is_none() && snapshot.auth.as_ref().is_some_and(|a| a.has_lua_policy());
        Rc::new(Generation {
            number,
            config: snapshot.config.clone(),
            upstreams: WorkerUpstreams::new(backends, &snapshot.config, worker),
            auth: snapshot.auth.clone(),
            global_limits: snapshot.global_limits.clone(),
            usage: snapshot.usage.clone(),
            lua,
            lua_failed,
            slots,
        })
    }
}

impl Context {
    pub fn new(
        live: Arc<Live>,
        registry: Arc<Registry>,
        shutdown: Arc<AtomicBool>,
        worker: usize,
    ) -> Self {
        let (number, snapshot) = live.snapshot();
        let current = Generation::new(number, &snapshot, &registry, worker);
        Context {
            shared_rates: None,
            live,
            current: RefCell::new(current),
            registry,
            worker,
            shutdown,
            active: Cell::new(0),
            opening: Cell::new(0),
            ids: RequestIds::new(worker),
            retry_budget: RetryBudget {
                tokens: Cell::new(RetryBudget::RESERVE),
            },
        }
    }

    /// The config generation for a new request: one atomic load, plus a lock and new upstream
    /// pools only right after a reload.
    pub fn current(&self) -> Rc<Generation> {
        if self.live.generation() != self.current.borrow().number {
            let (number, snapshot) = self.live.snapshot();
            let next = Generation::new(number, &snapshot, &self.registry, self.worker);
            tracing::debug!(
                worker = self.worker,
                generation = number,
                "worker picked up new config"
            );
            *self.current.borrow_mut() = next;
        }
        self.current.borrow().clone()
    }

    /// This worker's metrics block (written only by this thread).
    pub fn metrics(&self) -> &WorkerMetrics {
        self.registry.worker(self.worker)
    }

    /// Requests currently being handled on this worker (idle keep-alive connections excluded).
    pub fn active_requests(&self) -> usize {
        self.active.get()
    }

    /// Connections accepted that have not sent (all of) their first request head yet.
    pub fn opening_connections(&self) -> usize {
        self.opening.get()
    }

    fn draining(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }
}

/// Counts a connection that has not yet sent its first request, for the drain. Taken when the
/// connection is accepted, before its task first runs: a drain that starts in between must
/// still wait for it.
struct OpeningGuard(Rc<Context>);

impl OpeningGuard {
    fn enter(ctx: &Rc<Context>) -> Self {
        ctx.opening.set(ctx.opening.get() + 1);
        OpeningGuard(ctx.clone())
    }
}

impl Drop for OpeningGuard {
    fn drop(&mut self) {
        self.0.opening.set(self.0.opening.get() - 1);
    }
}

/// Counts a request as in progress for the graceful-shutdown drain and the in-flight gauge, on
/// every exit path.
struct ActiveGuard<'a>(&'a Context);

impl<'a> ActiveGuard<'a> {
    fn enter(ctx: &'a Context) -> Self {
        ctx.active.set(ctx.active.get() + 1);
        ctx.metrics().in_flight.inc();
        ActiveGuard(ctx)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
        self.0.metrics().in_flight.dec();
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

/// The task serving one accepted connection. The connection counts for the drain from this
/// call on, not from the task's first poll.
pub fn serve_connection(
    ctx: Rc<Context>,
    stream: TcpStream,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> {
    let opening = OpeningGuard::enter(&ctx);
    serve(ctx, stream, peer, opening)
}

async fn serve(ctx: Rc<Context>, stream: TcpStream, peer: SocketAddr, opening: OpeningGuard) {
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
    let mut opening = Some(opening);
    loop {
        let head = read_head(&ctx, &mut rd, &mut c).await;
        drop(opening.take());
        match head {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _active = ActiveGuard::enter(&ctx);
                let m = ctx.metrics();
                m.request(metrics::PATHS.len() - 1, false, None, e.status());
                if let Some(why) = rejection(&e) {
                    m.reject(why);
                }
                respond_error(&mut wr, &mut c.out, &e, b"", false).await;
                return;
            }
        }
        let (next, armed) = {
            let _active = ActiveGuard::enter(&ctx);
            handle_request(&ctx, &mut rd, &mut wr, &mut c).await
        };
        if c.out.capacity() > KEEP_BUF {
            c.out = Vec::new();
        }
        if c.body.capacity() > KEEP_BUF {
            c.body = Vec::new();
        }
        if matches!(next, Next::Close) || ctx.draining() {
            return;
        }
        if let Some(armed) = armed {
            if !next_bytes(&ctx, armed, &mut c).await {
                return;
            }
        }
    }
}

/// Before phase 1, when the request's watch left its read in flight: appends what it brings of
/// the next request to `c.buf`, waiting up to the keep-alive timeout unless a pipelined request is
/// already there. False when the connection ended.
async fn next_bytes(ctx: &Context, armed: Armed<'_>, c: &mut Client) -> bool {
    let got = if c.buf.is_empty() {
        let keepalive = ctx.current().config.timeouts.keepalive;
        armed.next_bytes(keepalive).await
    } else {
        armed.stop().await
    };
    let Some((buf, n)) = got else {
        return false;
    };
    if n > 0 {
        crate::busy_poll::mark_activity();
    }
    c.buf.extend_from_slice(&buf[..n]);
    c.watch_buf = buf;
    true
}

/// Phase 1: reads until `c.buf` starts with a complete, valid request head. `Ok(false)` means the
/// connection ended quietly (closed, or idle past the keep-alive timeout).
async fn read_head(
    ctx: &Context,
    rd: &mut ClientReader,
    c: &mut Client,
) -> Result<bool, GatewayError> {
    // Copied out so an idle keep-alive connection does not pin an old generation's pools.
    let (max_head, header_timeout, keepalive) = {
        let gen = ctx.current();
        let t = &gen.config.timeouts;
        (gen.config.max_header_size, t.client_header, t.keepalive)
    };
    let mut deadline: Option<Instant> = None;
    loop {
        if !c.buf.is_empty() {
            if http::parse_request(&c.buf, max_head, &mut c.head)? {
                return Ok(true);
            }
            deadline.get_or_insert_with(|| Instant::now() + header_timeout);
        }
        let mut buf = mem::take(&mut c.buf);
        let len = buf.len();
        if len == buf.capacity() {
            buf.reserve(len.min(max_head));
        }
        let cap = buf.capacity();
        let wait = match deadline {
            None => keepalive,
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
            Ok(n) if n > 0 => crate::busy_poll::mark_activity(),
            _ => return Ok(false),
        }
    }
}

/// Phases 2 to 6 for one request whose head is in `c.buf`. With the next action, the watch's read
/// when it is still in flight (the client sent nothing since).
async fn handle_request<'r>(
    ctx: &Context,
    rd: &'r mut ClientReader,
    wr: &mut ClientWriter,
    c: &mut Client,
) -> (Next, Option<Armed<'r>>) {
    let gen = ctx.current();
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
        return (
            write_local(wr, c, 200, b"application/json", body, keep_alive).await,
            None,
        );
    }
    let exposition = &gen.config.metrics;
    if exposition.enabled
        && path == exposition.path.as_bytes()
        && matches!(method, b"GET" | b"HEAD")
    {
        let text = ctx.registry.render(&gen.upstreams.backends);
        let body = if head_request { b"" } else { text.as_bytes() };
        return (
            write_local(wr, c, 200, metrics::CONTENT_TYPE, body, keep_alive).await,
            None,
        );
    }

    let mut trace = Trace {
        path: metrics::path_index(path),
        started: Instant::now(),
        body_read: None,
        backend: None,
        info: inspect::RequestInfo::default(),
        status: 0,
        rejected: None,
        upstream_error: None,
        outcome: None,
        progress: Progress::default(),
        retries: 0,
        in_flight: None,
        key: None,
    };
    let mut armed = None;
    let next = proxy_request(
        ctx,
        &gen,
        rd,
        wr,
        c,
        &request_id,
        keep_alive,
        &mut trace,
        &mut armed,
    )
    .await;
    let relayed = trace.body_read.is_some();
    account(ctx, &gen, c, &request_id, trace);
    if relayed {
        // The head stayed in `c.buf` for forwarding and accounting; what follows it is the
        // next request.
        let consumed = c.head.head_len;
        c.buf.drain(..consumed);
    }
    (next, armed)
}

/// Answers a request the gateway serves itself (`/health`, metrics); not accounted.
async fn write_local(
    wr: &mut ClientWriter,
    c: &mut Client,
    status: u16,
    content_type: &[u8],
    body: &[u8],
    keep_alive: bool,
) -> Next {
    let keep = keep_alive && c.head.framing() == Framing::Empty;
    http::write_response(&mut c.out, status, content_type, &[], body, keep);
    let consumed = c.head.head_len;
    c.buf.drain(..consumed);
    write_out(wr, &mut c.out, keep).await
}

/// What happened to a proxied request, collected on every path for the account phase.
struct Trace {
    path: usize,
    /// Request head parsed; the request's latency starts here.
    started: Instant,
    /// Request body read: the relay (TTFT, overhead) starts here.
    body_read: Option<Instant>,
    backend: Option<usize>,
    info: inspect::RequestInfo,
    /// The status the client saw (0: none, the connection was cut or the client left first).
    status: u16,
    rejected: Option<Rejection>,
    upstream_error: Option<UpstreamErrorKind>,
    outcome: Option<Outcome>,
    progress: Progress,
    /// Attempts after the first, on other backends or on a fresh connection.
    retries: u32,
    /// Keeps the chosen backend counted in flight until the request is accounted.
    in_flight: Option<InFlight>,
    /// The authenticated key, for the usage event and the access log.
    key: Option<Arc<KeyEntry>>,
}
/// Phases 2 to 5 for a request to be proxied; everything the account phase needs goes to `t`.
#[allow(clippy::too_many_arguments)]
async fn proxy_request<'r>(
    ctx: &Context,
    gen: &Generation,
    rd: &'r mut ClientReader,
    wr: &mut ClientWriter,
    c: &mut Client,
    request_id: &RequestId,
    keep_alive: bool,
    t: &mut Trace,
    armed: &mut Option<Armed<'r>>,
) -> Next {
    let path = c.head.path(&c.buf);
    let method = c.head.method.of(&c.buf);
    let head_request = method == b"HEAD";
    if !path.starts_with(b"/v1/") {
        let err = GatewayError::NotFound {
            method: String::from_utf8_lossy(method).into_owned(),
            path: String::from_utf8_lossy(path).into_owned(),
        };
        // A body we did not read would be taken for the next request.
        return reject_unread_body(wr, c, &err, request_id, keep_alive, t).await;
    }

    // Held until this function returns, whichever way: the concurrency slots go back then.
    let admission = match admit(ctx, gen, c).await {
        Ok(a) => a,
        // The body is read anyway: closing on unread bytes resets the connection, and the
        // client may lose the 401/429 with it; refused clients also retry on the same connection.
        Err(e) => {
            t.note_error(&e);
            if let Err(read) = read_body(gen, rd, wr, c).await {
                return respond_error(wr, &mut c.out, &read, request_id.as_bytes(), false).await;
            }
            let consumed = c.head.head_len;
            c.buf.drain(..consumed);
            return respond_error(wr, &mut c.out, &e, request_id.as_bytes(), keep_alive).await;
        }
    };
    t.key = admission.key.clone();

    if path == b"/v1/models" && method == b"GET" {
        if let Some(json) = gen.upstreams.backends.models_json() {
            let keep = keep_alive && c.head.framing() == Framing::Empty;
            let id: [(&[u8], &[u8]); 1] = [(b"X-Request-Id", request_id.as_bytes())];
            http::write_response(&mut c.out, 200, b"application/json", &id, &json, keep);
            let consumed = c.head.head_len;
            c.buf.drain(..consumed);
            t.status = 200;
            return write_out(wr, &mut c.out, keep).await;
        }
    }

    if let Err(e) = read_body(gen, rd, wr, c).await {
        t.note_error(&e);
        return respond_error(wr, &mut c.out, &e, request_id.as_bytes(), false).await;
    }
    let started = Instant::now();
    t.body_read = Some(started);
    let mut info = inspect::inspect(&c.body).unwrap_or_default();
    // Decided on the model the client asked for, before any alias rewrite.
    if let (Some(auth), Some(key)) = (&gen.auth, &admission.key) {
        let decided = auth
            .authorize(key, info.model(&c.body).as_deref())
            .and_then(|()| run_policy(gen, c, key, info.model(&c.body).as_deref()));
        if let Err(e) = decided {
            t.note_error(&e);
            return respond_error(wr, &mut c.out, &e, request_id.as_bytes(), keep_alive).await;
        }
    }
    let alias = info
        .model(&c.body)
        .and_then(|m| gen.upstreams.backends.alias(&m))
        .map(str::to_owned);
    if let (Some(served), Some(at)) = (alias, info.model.clone()) {
        c.body.splice(at, served.bytes());
        info = inspect::inspect(&c.body).unwrap_or_default();
    }
    let strip_usage = gen.usage.is_some()
        && gen.config.usage_hook.inject_stream_usage
        && info.stream
        && is_generation_endpoint(c.head.path(&c.buf))
        && inspect::request_stream_usage(&mut c.body, &info);
    if strip_usage {
        info = inspect::inspect(&c.body).unwrap_or_default();
    }

    let canceller = Canceller::new();
    let watch_buf = mem::take(&mut c.watch_buf);
    let read = Box::pin(rd.cancelable_read(watch_buf, canceller.handle()));
    let mut watch = ClientWatch::new(read, canceller);
    let plan = Plan {
        request_id: request_id.as_bytes(),
        head_request,
        client_http10: c.head.http10,
        keep_alive,
        strip_usage,
        started,
        extra_headers: admission.headers.as_bytes(),
    };
    let attempted = relay_with_retries(ctx, gen, &mut watch, wr, c, &info, &plan).await;
    let client_still_there = match watch.finish() {
        WatchEnd::Quiet(read) => {
            *armed = Some(read);
            true
        }
        WatchEnd::Pipelined(buf, n) => {
            c.buf.extend_from_slice(&buf[..n]);
            c.watch_buf = buf;
            true
        }
        WatchEnd::Gone => false,
    };

    let Attempted {
        result,
        progress,
        in_flight,
        attempts,
    } = attempted;
    t.info = info;
    t.backend = in_flight.as_ref().map(|f| f.index);
    t.in_flight = in_flight;
    t.retries = attempts - 1 + progress.retries;
    t.progress = progress;
    let rid = request_id.as_str();
    let backend_url = t
        .backend
        .map_or("-", |b| gen.upstreams.backend(b).url.as_str());
    match result {
        Ok(Relayed::Complete {
            status,
            client_reusable,
        }) => {
            tracing::debug!(request_id = %rid, status, backend = %backend_url, "relayed");
            t.status = status;
            t.outcome = Some(Outcome::Completed);
            if client_reusable && client_still_there {
                Next::KeepAlive
            } else {
                Next::Close
            }
        }
        Ok(Relayed::Broken { status, timed_out }) => {
            tracing::warn!(request_id = %rid, status, timed_out, backend = %backend_url, "backend failed mid-response; client connection cut");
            t.status = status;
            t.upstream_error = Some(if timed_out {
                UpstreamErrorKind::Timeout
            } else {
                UpstreamErrorKind::MidResponse
            });
            t.outcome = Some(Outcome::Failed);
            Next::Close
        }
        Ok(Relayed::ClientGone) => {
            tracing::debug!(request_id = %rid, backend = %backend_url, "client left; upstream closed");
            // Gone before the backend answered: nginx's "client closed request".
            t.status = match t.progress.status {
                0 => CLIENT_CLOSED,
                s => s,
            };
            t.outcome = Some(Outcome::Cancelled);
            Next::Close
        }
        Err(e) => {
            t.note_error(&e);
            t.outcome = Some(Outcome::Failed);
            if client_still_there {
                respond_error(wr, &mut c.out, &e, request_id.as_bytes(), keep_alive).await
            } else {
                Next::Close
            }
        }
    }
}

/// What stays the same across the attempts of one request.
struct Plan<'a> {
    request_id: &'a [u8],
    head_request: bool,
    client_http10: bool,
    keep_alive: bool,
    strip_usage: bool,
    started: Instant,
    /// `x-ratelimit-*` lines for the client's response head.
    extra_headers: &'a [u8],
}

/// The last attempt's outcome, and the backend it went to (still counted in flight).
struct Attempted {
    result: Result<Relayed, GatewayError>,
    progress: Progress,
    in_flight: Option<InFlight>,
    /// Backends tried, this one included.
    attempts: u32,
}

/// Phases 4 and 5: pick a backend, relay, and on a failure before any response byte reached the
/// client, try another backend after a jittered backoff, within `retry.max_attempts` and the
/// worker's retry budget.
#[allow(clippy::too_many_arguments)]
async fn relay_with_retries(
    ctx: &Context,
    gen: &Generation,
    watch: &mut ClientWatch<'_>,
    wr: &mut ClientWriter,
    c: &mut Client,
    info: &inspect::RequestInfo,
    plan: &Plan<'_>,
) -> Attempted {
    let model = info.model(&c.body);
    let model = model.as_deref();
    let affinity_key = match gen.upstreams.affinity() {
        Some(Affinity::Header(name)) => c.head.header(&c.buf, name.as_bytes()),
        Some(Affinity::User) => info.user.clone().map(|r| &c.body[r]),
        None => None,
    };
    let retry = &gen.config.retry;
    let timeouts = &gen.config.timeouts;
    let deadline = timeouts.total.map(|t| plan.started + t);
    ctx.retry_budget.deposit(retry.budget_percent);
    let mut tried = 0u64;
    let mut attempt = 1;
    loop {
        let request = PickRequest {
            model,
            affinity_key,
            tried,
        };
        let in_flight = match gen.upstreams.pick(&request) {
            Ok(f) => f,
            Err(e) => {
                let err = match e {
                    PickError::UnknownModel => GatewayError::UnknownModel {
                        model: model.unwrap_or_default().to_owned(),
                    },
                    PickError::NoneAvailable => GatewayError::NoBackend,
                };
                return Attempted {
                    result: Err(err),
                    progress: Progress::default(),
                    in_flight: None,
                    attempts: attempt,
                };
            }
        };
        let idx = in_flight.index;
        tried |= 1 << (idx % 64);
        let backend = gen.upstreams.backend(idx);
        forward::write_upstream_head(
            &mut c.out,
            &c.buf,
            &c.head,
            backend,
            forward::Origin {
                client_ip: &c.ip,
                request_id: plan.request_id,
                credentials: gen.auth.as_ref().map_or(&[][..], |a| a.header_names()),
            },
            c.body.len() as u64,
        );
        c.out.extend_from_slice(&c.body);
        // With no retry left (attempts or budget), a retryable status is relayed as the
        // backend sent it rather than replaced by the gateway's own error.
        let last = attempt >= retry.max_attempts || !ctx.retry_budget.has_one();
        let first_byte = timeouts.first_byte.map(|t| Instant::now() + t);
        let ex = Exchange {
            backend: idx,
            head_request: plan.head_request,
            client_http10: plan.client_http10,
            request_id: plan.request_id,
            client_keep_alive: plan.keep_alive,
            strip_usage: plan.strip_usage,
            api: Api::of_path(c.head.path(&c.buf)).unwrap_or(Api::Other),
            extra_headers: plan.extra_headers,
            retry_status: if last { &[] } else { &retry.on_status },
            head_deadline: first_byte.into_iter().chain(deadline).min(),
            idle: timeouts.idle,
            deadline,
        };
        let mut progress = Progress::default();
        let result = relay::exchange(
            ctx,
            &gen.upstreams,
            watch,
            wr,
            &mut c.out,
            &mut c.resp_head,
            ex,
            &mut progress,
        )
        .await;
        let passive = match &result {
            Ok(Relayed::ClientGone) => None,
            Ok(Relayed::Complete { status, .. }) if *status >= 500 => Some(Passive::Failed),
            Ok(Relayed::Complete { .. }) => Some(Passive::Ok),
            Ok(Relayed::Broken { .. }) => Some(Passive::Failed),
            Err(GatewayError::UpstreamConnect | GatewayError::UpstreamConnectTimeout) => {
                Some(Passive::Unreachable)
            }
            Err(e) if e.is_retryable() || matches!(e, GatewayError::UpstreamTimeout) => {
                Some(Passive::Failed)
            }
            Err(_) => Some(Passive::Ok),
        };
        if let Some(outcome) = passive {
            backend.record(outcome, &gen.upstreams.health);
        }
        match result {
            Err(e) if e.is_retryable() && !last && ctx.retry_budget.withdraw() => {
                tracing::debug!(request_id = %String::from_utf8_lossy(plan.request_id), backend = %backend.url, attempt, code = e.code(), "retrying on another backend");
                drop(in_flight);
                let cap = retry
                    .max_backoff
                    .min(retry.initial_backoff * 2u32.saturating_pow(attempt - 1));
                let backoff = cap.mul_f64((gen.upstreams.random() % 1024) as f64 / 1024.0);
                if watch.race(monoio::time::sleep(backoff)).await.is_none() {
                    return Attempted {
                        result: Ok(Relayed::ClientGone),
                        progress,
                        in_flight: None,
                        attempts: attempt,
                    };
                }
                attempt += 1;
            }
            result => {
                return Attempted {
                    result,
                    progress,
                    in_flight: Some(in_flight),
                    attempts: attempt,
                }
            }
        }
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

/// Admission, before the body is read: refusing here costs no upstream work. Free when auth is
/// off and no global limit is set.
async fn admit(ctx: &Context, gen: &Generation, c: &Client) -> Result<Admission, GatewayError> {
    let key = match &gen.auth {
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
    // At most two scopes (the key's, the global one): kept on the stack.
    let (both, one);
    let scopes: &[&Arc<LimitSet>] = match (key_limits, gen.global_limits.as_ref()) {
        (Some(k), Some(g)) => {
            both = [k, g];
            &both
        }
        (Some(s), None) | (None, Some(s)) => {
            one = [s];
            &one
        }
        (None, None) => &[],
    };
    if scopes.is_empty() {
        return Ok(Admission {
            key,
            ..Admission::default()
        });
    }
    let queue = gen.config.rate_limit.queue_timeout;
    let admitted = limits::admit(scopes, queue, ctx.shared_rates.as_ref())
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
    gen: &Generation,
    c: &Client,
    key: &KeyEntry,
    model: Option<&str>,
) -> Result<(), GatewayError> {
    let Some(policy) = &gen.lua else {
        return if gen.lua_failed {
            Err(GatewayError::PolicyFailed)
        } else {
            Ok(())
        };
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

impl Trace {
    fn note_error(&mut self, e: &GatewayError) {
        self.status = e.status();
        self.rejected = rejection(e);
        self.upstream_error = match e {
            GatewayError::UpstreamConnect => Some(UpstreamErrorKind::Connect),
            GatewayError::UpstreamConnectTimeout => Some(UpstreamErrorKind::ConnectTimeout),
            GatewayError::UpstreamClosed => Some(UpstreamErrorKind::Closed),
            GatewayError::UpstreamProtocol(_) => Some(UpstreamErrorKind::Protocol),
            GatewayError::UpstreamTimeout => Some(UpstreamErrorKind::Timeout),
            GatewayError::UpstreamStatus(_) => Some(UpstreamErrorKind::Status),
            _ => None,
        };
    }
}

/// The rejection reason of an error the gateway decided on its own, if it is one.
fn rejection(e: &GatewayError) -> Option<Rejection> {
    Some(match e {
        GatewayError::Request(r) => match r {
            RequestError::Malformed(_) | RequestError::AmbiguousFraming(_) => Rejection::BadRequest,
            RequestError::HeaderTooLarge => Rejection::HeaderSize,
            RequestError::BodyTooLarge => Rejection::BodySize,
            RequestError::Timeout => Rejection::Timeout,
        },
        GatewayError::NotFound { .. } | GatewayError::UnknownModel { .. } => Rejection::NotFound,
        GatewayError::NoBackend => Rejection::NoBackend,
        GatewayError::Denied {
            denial: crate::config::Denial::QuotaExceeded,
            ..
        } => Rejection::Quota,
        GatewayError::Denied { .. }
        | GatewayError::AuthUnavailable
        | GatewayError::PolicyFailed => Rejection::Auth,
        GatewayError::RateLimited(l) => match l.kind {
            limits::LimitKind::Concurrency => Rejection::Concurrency,
            limits::LimitKind::Requests | limits::LimitKind::Tokens => Rejection::Rate,
        },
        _ => return None,
    })
}

/// Phase 6: what the request cost, for the metrics, the access log and the usage reporters.
fn account(ctx: &Context, gen: &Generation, c: &Client, request_id: &RequestId, t: Trace) {
    let now = Instant::now();
    let m = ctx.metrics();
    let p = &t.progress;
    let slot = t.backend.map(|b| gen.slots[b]);
    m.request(t.path, t.info.stream, slot, t.status);
    if let Some(why) = t.rejected {
        m.reject(why);
    }
    if let Some(kind) = t.upstream_error {
        m.upstream_error(kind);
    }
    if t.outcome == Some(Outcome::Cancelled) {
        m.client_cancels.inc();
    }
    m.retries.add(u64::from(t.retries));
    m.latency.observe(now - t.started);
    let ttft = t.body_read.zip(p.first_byte).map(|(s, f)| f - s);
    if let Some(ttft) = ttft {
        m.ttft.observe(ttft);
    }
    if let (Some(sent), Some(done)) = (p.sent_upstream, p.upstream_done) {
        m.upstream_latency.observe(done - sent);
    }
    // Gateway time on the way in (body read to upstream write) and out (upstream head to
    // client write); connect time counts as the backend's, retries as the gateway's.
    if let (Some(read), Some(sent), Some(head), Some(written)) = (
        t.body_read,
        p.sent_upstream,
        p.upstream_head,
        p.head_written,
    ) {
        m.overhead.observe((sent - read) + (written - head));
    }

    if gen.config.log.access {
        let ms = |d: std::time::Duration| d.as_micros() as f64 / 1000.0;
        let backend = t
            .backend
            .map_or("-", |b| gen.upstreams.backend(b).url.as_str());
        tracing::info!(
            target: "access",
            request_id = request_id.as_str(),
            key = t.key.as_ref().map_or("-", |k| k.key_ref.name.as_str()),
            model = t.info.model(&c.body).as_deref().unwrap_or("-"),
            path = metrics::PATHS[t.path],
            stream = t.info.stream,
            status = t.status,
            bytes = p.bytes,
            ttft_ms = ttft.map_or(-1.0, ms),
            total_ms = ms(now - t.started),
            backend,
            retries = t.retries,
            "request"
        );
    }

    let (Some(usage), Some(outcome), Some(backend)) = (&gen.usage, t.outcome, t.backend) else {
        return;
    };
    // Requests that never reached a backend cost nothing.
    if p.status == 0 && outcome == Outcome::Failed {
        return;
    }
    let Trace { info, progress, .. } = t;
    let (captured, content_events) = match progress.meter {
        Some(m) => {
            let events = m.content_events();
            (m.finish(), events)
        }
        None => (Captured::Nothing, 0),
    };
    let started = t.body_read.unwrap_or(t.started);
    // The record's id is the billing key (the webhook's Idempotency-Key, the table's unique
    // column): a client's id may repeat, so it is kept beside the gateway's own.
    let (billing_id, client_request_id) = if request_id.from_client {
        let own = RequestId::generate(&ctx.ids);
        (
            own.as_str().to_owned(),
            Some(request_id.as_str().to_owned()),
        )
    } else {
        (request_id.as_str().to_owned(), None)
    };
    usage.send(UsageEvent {
        request_id: billing_id,
        client_request_id,
        started_at: SystemTime::now() - started.elapsed(),
        key: t.key.as_ref().map(|k| k.key_ref.clone()),
        model: info.model(&c.body).map(Cow::into_owned),
        endpoint: String::from_utf8_lossy(c.head.path(&c.buf)).into_owned(),
        api: Api::of_path(c.head.path(&c.buf)).unwrap_or(Api::Other),
        is_stream: info.stream,
        backend_url: gen.upstreams.backend(backend).url_shared.clone(),
        status_code: progress.status,
        latency: started.elapsed(),
        ttft,
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
    gen: &Generation,
    rd: &mut ClientReader,
    wr: &mut ClientWriter,
    c: &mut Client,
) -> Result<(), GatewayError> {
    let limit = gen.config.max_request_body;
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
                let (res, slice) = monoio::time::timeout(gen.config.timeouts.client_body, read)
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
        Framing::Chunked => read_chunked(gen, rd, c, head_len, limit).await?,
    }
    Ok(())
}

/// Decodes a chunked body that starts at `c.buf[head_len..]` into `c.body`, dropping its framing
/// from `c.buf` so that the head and any bytes after the body remain.
async fn read_chunked(
    gen: &Generation,
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
            gen.config.timeouts.client_body,
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
    t: &mut Trace,
) -> Next {
    t.note_error(err);
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
    /// The client's `X-Request-Id`, not one the gateway made.
    from_client: bool,
}

impl RequestId {
    fn for_request(client: Option<&[u8]>, ids: &RequestIds) -> Self {
        match client {
            Some(v)
                if !v.is_empty()
                    && v.len() <= 128
                    && v.iter().all(|b| (0x21..0x7f).contains(b)) =>
            {
                let mut id = RequestId {
                    bytes: [0; 128],
                    len: v.len(),
                    from_client: true,
                };
                id.bytes[..v.len()].copy_from_slice(v);
                id
            }
            _ => RequestId::generate(ids),
        }
    }

    /// A new id, unique per process (and, by its random prefix, across restarts and instances).
    fn generate(ids: &RequestIds) -> Self {
        let mut id = RequestId {
            bytes: [0; 128],
            len: 28,
            from_client: false,
        };
        let n = ids.next.get();
        ids.next.set(n + 1);
        const HEX: &[u8; 16] = b"0123456789abcdef";
        id.bytes[..4].copy_from_slice(b"req_");
        let value = (u128::from(ids.prefix) << 64) | u128::from(n);
        for i in 0..24 {
            id.bytes[4 + i] = HEX[((value >> (4 * (23 - i))) & 0xf) as usize];
        }
        id
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Ids are printable ASCII by construction, so this never falls back.
    fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("-")
    }
}

/// The status counted and logged for a request whose client left before any response.
const CLIENT_CLOSED: u16 = 499;

/// How long a draining worker waits between checks that its requests have finished.
pub const DRAIN_POLL: Duration = Duration::from_millis(20);
