//! The request path: every request on a client connection passes the same phases, in this order
//! and never backwards. Each phase lives in the file named for it and says there when it runs and
//! what its result means.
//!
//! 1. [`read`]: read a complete, valid request head from the client.
//! 2. [`route`]: decide once, from method and path, who answers: the gateway itself (`/health`,
//!    metrics, the merged model list) or a backend, and in which API ([`Api`]); else a 404.
//! 3. [`admit`]: who is calling (key, status, IP) and may they start a request now (rates,
//!    concurrency). Before the body: refusing here costs no upstream work.
//! 4. [`body`]: read the body, bounded by `max_request_body`, and inspect it once (model, stream).
//! 5. [`authorize`]: now that the body names the model: model allowed, quota left, Lua policy.
//! 6. [`forward`]: the upstream request: model alias, streaming usage asked for, head rewritten.
//! 7. [`pick`] and [`relay`], under [`retry`]: choose a backend, send the request and stream the
//!    response back while [`client_watch`] notices a client that leaves; retry on another backend
//!    while nothing reached the client.
//! 8. [`account`]: the request's one [`RequestOutcome`] feeds the metrics, the access log and the
//!    usage event; then the connection is kept for the next request or closed.
//!
//! Each request runs on the config [`Generation`] current when it started (hot reload swaps it
//! between requests, never under one). Errors decided in any phase are typed ([`GatewayError`]),
//! carried in the outcome, and written by [`conn::respond_error`] only. This module owns the
//! per-connection loop; nothing here may block the worker thread.

mod account;
mod admit;
mod authorize;
mod body;
mod client_watch;
mod conn;
mod forward;
pub(crate) mod inspect;
mod outcome;
mod pick;
mod read;
mod relay;
mod request_id;
mod retry;
mod route;
mod worker;

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use monoio::net::TcpStream;

use crate::api::Api;
use crate::error::GatewayError;
use crate::http::Framing;
use crate::metrics;
use client_watch::Armed;
use conn::{respond_error, ClientConn, ClientReader, ClientWriter, Next};
use outcome::RequestOutcome;
use request_id::RequestId;
use route::Route;
use worker::{ActiveGuard, ConnectionGuard, OpeningGuard};
pub use worker::{Context, Generation};

/// How long a draining worker waits between checks that its requests have finished.
pub const DRAIN_POLL: Duration = Duration::from_millis(20);

/// The task serving one accepted connection. The connection counts for the drain from this
/// call on, not from the task's first poll.
pub fn serve_connection(
    ctx: Rc<Context>,
    stream: TcpStream,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> {
    let opening = OpeningGuard::enter(&ctx);
    let open = ConnectionGuard::enter(&ctx);
    serve(ctx, stream, peer, opening, open)
}

async fn serve(
    ctx: Rc<Context>,
    stream: TcpStream,
    peer: SocketAddr,
    opening: OpeningGuard,
    _open: ConnectionGuard,
) {
    // Without it, a small response waits for the client's delayed ACK.
    let _ = stream.set_nodelay(true);
    let tls = ctx.current().tls.clone();
    let (mut rd, mut wr) = match tls {
        None => ClientReader::plain(stream),
        // Boxed: the handshake's state (a rustls connection) would otherwise enlarge every
        // connection's task, plain ones too.
        Some(config) => match Box::pin(handshake(&ctx, stream, config)).await {
            Some(halves) => halves,
            None => return,
        },
    };
    let mut c = ClientConn::new(peer);
    let mut opening = Some(opening);
    loop {
        let head = read::request_head(&ctx, &mut rd, &mut c).await;
        drop(opening.take());
        match head {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _active = ActiveGuard::enter(&ctx);
                account::unparsed(&ctx, &e);
                respond_error(&mut wr, &mut c.out, &e, None, b"", false).await;
                return;
            }
        }
        let (next, armed) = {
            let _active = ActiveGuard::enter(&ctx);
            handle_request(&ctx, &mut rd, &mut wr, &mut c).await
        };
        c.release_large_buffers();
        if matches!(next, Next::Close) || ctx.draining() {
            return;
        }
        if let Some(armed) = armed {
            if !read::next_bytes(&ctx, armed, &mut c).await {
                return;
            }
        }
    }
}

/// The TLS handshake, bounded by `timeouts.client_header` like a request head. `None` when it
/// failed: the client is told by the TLS alert, counted, and the connection closes.
async fn handshake(
    ctx: &Context,
    stream: TcpStream,
    config: std::sync::Arc<rustls::ServerConfig>,
) -> Option<(ClientReader, ClientWriter)> {
    let timeout = ctx.current().config.timeouts.client_header;
    let failed =
        match monoio::time::timeout(timeout, crate::tls::stream::accept(stream, config)).await {
            Ok(Ok((rd, wr))) => {
                return Some((crate::tls::Reader::Tls(rd), crate::tls::Writer::Tls(wr)))
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
    ctx.metrics().tls_handshake_failures.inc();
    tracing::debug!("TLS handshake failed: {failed}");
    None
}

/// Phases 2 to 8 for one request whose head is in `c.buf`. With the next action, the watch's read
/// when it is still in flight (the client sent nothing since). The head leaves `c.buf` here, at
/// the end: every phase before reads it in place.
async fn handle_request<'r>(
    ctx: &Context,
    rd: &'r mut ClientReader,
    wr: &mut ClientWriter,
    c: &mut ClientConn,
) -> (Next, Option<Armed<'r>>) {
    let generation = ctx.current();
    let request_id = RequestId::for_request(c.head.header(&c.buf, b"x-request-id"), &ctx.ids);
    let keep_alive = c.head.keep_alive && !ctx.draining();
    let mut armed = None;
    let next = match route::decide(&generation, &c.head, &c.buf) {
        Route::Health => {
            local(
                wr,
                c,
                200,
                b"application/json",
                br#"{"status":"ok"}"#,
                keep_alive,
            )
            .await
        }
        Route::Metrics => {
            let text = ctx
                .registry
                .render(&generation.upstreams.backends, generation.auth.as_deref());
            local(
                wr,
                c,
                200,
                metrics::CONTENT_TYPE,
                text.as_bytes(),
                keep_alive,
            )
            .await
        }
        Route::NotFound => {
            let mut outcome = RequestOutcome::new(None);
            let err = GatewayError::NotFound {
                method: String::from_utf8_lossy(c.head.method.of(&c.buf)).into_owned(),
                path: String::from_utf8_lossy(c.head.path(&c.buf)).into_owned(),
            };
            outcome.fail(&err);
            // A body we did not read would be taken for the next request.
            let keep = keep_alive && c.head.framing() == Framing::Empty;
            let next = respond_error(wr, &mut c.out, &err, None, request_id.as_bytes(), keep).await;
            // Nothing reached a backend: no record to wait for.
            drop(account::finish(ctx, &generation, c, &request_id, outcome));
            next
        }
        route @ (Route::ModelList | Route::Proxy(_)) => {
            let mut outcome = RequestOutcome::new(route.api());
            let next = proxy(
                ctx,
                &generation,
                rd,
                wr,
                c,
                &request_id,
                keep_alive,
                route == Route::ModelList,
                &mut outcome,
                &mut armed,
            )
            .await;
            let held = outcome.progress.held;
            if let Some(committed) = account::finish(ctx, &generation, c, &request_id, outcome) {
                committed.await;
            }
            if held {
                // `durability: sync`: the response's last bytes, now that its record is spooled.
                let keep = matches!(next, Next::KeepAlive);
                conn::write_out(wr, &mut c.resp_head, keep).await
            } else {
                next
            }
        }
    };
    c.consume_head();
    (next, armed)
}

/// Answers a request the gateway serves itself (`/health`, metrics); not accounted.
async fn local(
    wr: &mut ClientWriter,
    c: &mut ClientConn,
    status: u16,
    content_type: &[u8],
    body: &[u8],
    keep_alive: bool,
) -> Next {
    let body = if c.head.method.of(&c.buf) == b"HEAD" {
        b""
    } else {
        body
    };
    let keep = keep_alive && c.head.framing() == Framing::Empty;
    crate::http::write_response(&mut c.out, status, content_type, &[], body, keep);
    conn::write_out(wr, &mut c.out, keep).await
}

/// With `scheduling`: who the request is when it must wait for a saturated backend. Its key's
/// priority, or the one it asks for in `scheduling.priority_header`, up to the key's
/// `max_priority`; without a key, priority 0 and one shared flow.
fn queueing(
    generation: &Generation,
    c: &ClientConn,
    key: Option<&crate::auth::KeyEntry>,
    prioritized: bool,
) -> Option<pick::Queueing> {
    let settings = generation.config.scheduling.as_ref()?;
    let scheduler = generation.upstreams.backends.scheduler.as_ref()?;
    let estimate = c.body.len() as f64 / 4.0;
    let class = match key {
        None => crate::schedule::Class {
            priority: 0,
            service: None,
        },
        Some(key) => {
            let asked = settings
                .priority_header
                .as_deref()
                .and_then(|name| c.head.header(&c.buf, name.as_bytes()))
                .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<i32>().ok());
            crate::schedule::Class {
                priority: asked.map_or(key.priority, |p| p.min(key.max_priority)),
                service: Some(key.live.service.clone()),
            }
        }
    };
    let flow = scheduler.flow(&class).clone();
    Some(pick::Queueing::new(
        class,
        estimate,
        settings.completion_weight,
        flow,
        prioritized,
    ))
}

/// Phases 3 to 7 for a relayed request; what the account phase needs goes into `outcome`.
#[allow(clippy::too_many_arguments)]
async fn proxy<'r>(
    ctx: &Context,
    generation: &Generation,
    rd: &'r mut ClientReader,
    wr: &mut ClientWriter,
    c: &mut ClientConn,
    request_id: &RequestId,
    keep_alive: bool,
    model_list: bool,
    outcome: &mut RequestOutcome,
    armed: &mut Option<Armed<'r>>,
) -> Next {
    let api = outcome.api;
    let id = request_id.as_bytes();
    // Held until this function returns, whichever way: the concurrency slots go back then.
    let admission = match admit::admit(ctx, generation, c).await {
        Ok(a) => a,
        // The body is read anyway: closing on unread bytes resets the connection, and the
        // client may lose the 401/429 with it; refused clients also retry on the same connection.
        Err(e) => {
            outcome.fail(&e);
            if let Err(read) = body::read(generation, rd, wr, c).await {
                return respond_error(wr, &mut c.out, &read, api, id, false).await;
            }
            return respond_error(wr, &mut c.out, &e, api, id, keep_alive).await;
        }
    };
    outcome.key = admission.key.clone();

    if model_list {
        if let Some(json) = generation.upstreams.backends.models_json() {
            let keep = keep_alive && c.head.framing() == Framing::Empty;
            let echo: [(&[u8], &[u8]); 1] = [(b"X-Request-Id", id)];
            crate::http::write_response(&mut c.out, 200, b"application/json", &echo, &json, keep);
            outcome.status = 200;
            return conn::write_out(wr, &mut c.out, keep).await;
        }
    }

    if let Err(e) = body::read(generation, rd, wr, c).await {
        outcome.fail(&e);
        return respond_error(wr, &mut c.out, &e, api, id, false).await;
    }
    let started = std::time::Instant::now();
    outcome.body_read = Some(started);
    let api_or_other = api.unwrap_or(Api::Other);
    let mut info = body::inspect(api_or_other, c);
    outcome.has_model = info.model.is_some();
    outcome.stream = info.stream;
    let model = outcome.has_model.then_some(c.model.as_str());
    if let Some(key) = &admission.key {
        if let Err(e) = authorize::authorize(generation, c, key, model) {
            outcome.fail(&e);
            return respond_error(wr, &mut c.out, &e, api, id, keep_alive).await;
        }
    }
    // The gateway decides the priority an `engine_priority` backend schedules by; a body it
    // cannot read would carry the client's own to the engine's lenient parser.
    let generates = matches!(
        api_or_other,
        Api::ChatCompletions | Api::Completions | Api::Responses
    );
    let readable = info.end > 0 && !info.form;
    let engine_priority = generation.upstreams.engine_priority();
    if generates && !readable && engine_priority {
        let e = GatewayError::Request(crate::http::RequestError::Malformed(
            "the body is not a UTF-8 JSON object, which a backend scheduling by priority needs",
        ));
        outcome.fail(&e);
        return respond_error(wr, &mut c.out, &e, api, id, keep_alive).await;
    }
    // The request carries the priority the gateway writes.
    let prioritized = generates && readable && engine_priority;
    let strip_usage = forward::rewrite_body(generation, api_or_other, c, &mut info);

    let canceller = monoio::io::Canceller::new();
    let watch_buf = std::mem::take(&mut c.watch_buf);
    let read = rd.boxed_cancelable_read(watch_buf, canceller.handle());
    let mut watch = client_watch::ClientWatch::new(read, canceller);
    let plan = relay::Plan {
        request_id: id,
        head_request: c.head.method.of(&c.buf) == b"HEAD",
        client_http10: c.head.http10,
        client_keep_alive: keep_alive,
        strip_usage,
        api: api_or_other,
        extra_headers: admission.headers.as_bytes(),
        idle: generation.config.timeouts.idle,
        deadline: generation.config.timeouts.total.map(|t| started + t),
        hold_last: generation
            .usage
            .as_ref()
            .is_some_and(|u| u.waits_for_commit()),
    };
    let request = retry::Request {
        buf: &c.buf,
        head: &c.head,
        body: &c.body,
        client_ip: &c.ip,
        model: outcome.has_model.then_some(c.model.as_str()),
        model_at: info.model.clone().filter(|_| outcome.has_model),
        // Other APIs (embeddings, pooling) take a `priority` in vLLM too: a client's own is
        // replaced, none is added.
        priority_at: match info.priority.clone() {
            _ if !(readable && engine_priority) => None,
            Some(value) => Some(retry::PriorityAt::Value(value)),
            None if prioritized => Some(retry::PriorityAt::Append {
                end: info.end,
                comma: info.has_members,
            }),
            None => None,
        },
        affinity_key: pick::affinity_key(generation, &c.buf, &c.head, &c.body, &info),
        prompt: pick::prompt(&c.body, &info),
        queueing: queueing(generation, c, admission.key.as_deref(), prioritized),
    };
    let attempted = retry::relay_with_retries(
        ctx,
        generation,
        &mut watch,
        wr,
        &mut c.out,
        &mut c.resp_head,
        &request,
        &plan,
    )
    .await;
    outcome.fair_share_charged = request.queueing.as_ref().map_or(0.0, |q| q.charged());
    drop(request);
    let client_still_there = match watch.finish() {
        client_watch::WatchEnd::Quiet(read) => {
            *armed = Some(read);
            true
        }
        client_watch::WatchEnd::Pipelined(buf, n) => {
            c.buf.extend_from_slice(&buf[..n]);
            c.watch_buf = buf;
            true
        }
        client_watch::WatchEnd::Gone => false,
    };

    let retry::Attempted {
        result,
        progress,
        in_flight,
        attempts,
    } = attempted;
    outcome.in_flight = in_flight;
    outcome.retries = attempts - 1 + progress.retries;
    outcome.progress = progress;
    let rid = request_id.as_str();
    let backend_url = outcome
        .backend()
        .map_or("-", |b| generation.upstreams.backend(b).url.as_str());
    match result {
        Ok(relayed) => {
            outcome.relayed(&relayed);
            match relayed {
                relay::Relayed::Complete { client_reusable } => {
                    tracing::debug!(request_id = %rid, status = outcome.status, backend = %backend_url, "relayed");
                    if client_reusable && client_still_there {
                        Next::KeepAlive
                    } else {
                        Next::Close
                    }
                }
                relay::Relayed::Broken { timed_out } => {
                    tracing::warn!(request_id = %rid, status = outcome.status, timed_out, backend = %backend_url, "backend failed mid-response; client connection cut");
                    Next::Close
                }
                relay::Relayed::ClientGone => {
                    tracing::debug!(request_id = %rid, backend = %backend_url, "client left; upstream closed");
                    Next::Close
                }
            }
        }
        Err(e) => {
            outcome.fail(&e);
            outcome.ending = Some(crate::usage::Outcome::Failed);
            if client_still_there {
                respond_error(wr, &mut c.out, &e, api, id, keep_alive).await
            } else {
                Next::Close
            }
        }
    }
}
