//! Worker runtimes and connections: accept, read requests with the `crate::http` codec, route,
//! apply the fault knobs, and pace token events on monoio timers.
//!
//! Buffers live per connection and are reused across requests and events, so a streamed token
//! costs one render into `ev`, one framing copy into `out` and one write.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};
use rustls::ServerConnection;

use super::anthropic::{self, Message};
use super::kv_cache::PromptBlocks;
use super::openai::{self, ApiError, Generation, TokenKnobs};
use super::responses::Response;
use super::scheduler::Slot;
use super::{metrics, Shared};
use crate::error::GatewayError;
use crate::http::{
    parse_request, write_response, ChunkedDecoder, Framing, RequestError, RequestHead,
};

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 32 << 20;
/// Long waits are cut into slices this long, with a check after each that the client is still there.
const WATCH_SLICE: Duration = Duration::from_millis(20);
const JSON: &[u8] = b"application/json";

pub(super) fn worker(
    addr: SocketAddr,
    sh: &'static Shared,
    ready: mpsc::Sender<std::io::Result<SocketAddr>>,
) {
    let rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build();
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        let opts = ListenerOpts::new().reuse_port(true).backlog(4096);
        let listener = match TcpListener::bind_with_config(addr, &opts) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(listener.local_addr());
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    sh.connections.fetch_add(1, Ordering::Relaxed);
                    if !sh.opts.refuse {
                        monoio::spawn(serve(stream, sh));
                    }
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    eprintln!("mock-llm: accept: {e}");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Messages,
    CountTokens,
    Responses,
}

impl Endpoint {
    /// Its errors take the shape vLLM gives them on the Anthropic routes.
    fn anthropic(self) -> bool {
        matches!(self, Endpoint::Messages | Endpoint::CountTokens)
    }
}

/// One generation of any API, as [`Conn`] paces it: a stream is its opening events (sent with the
/// head), the events due with the first token (after the time to first token), one event per
/// token (the inter-token latency apart), then its closing events; otherwise one JSON body.
pub(super) trait Generated {
    /// Index of the served model.
    fn model(&self) -> usize;
    /// The request's `priority` (0 where the API has none).
    fn priority(&self) -> i64 {
        0
    }
    fn stream(&self) -> bool;
    /// Completion tokens (events that carry one).
    fn steps(&self) -> u64;
    fn opening_events(&self) -> usize {
        0
    }
    fn opening_event(&self, _k: usize, _ev: &mut Vec<u8>) {}
    fn first_events(&self) -> usize;
    fn first_event(&self, k: usize, ev: &mut Vec<u8>);
    fn step_event(&self, i: u64, ev: &mut Vec<u8>);
    fn closing_events(&self) -> usize;
    fn closing_event(&self, k: usize, ev: &mut Vec<u8>);
    fn full_body(&self, out: &mut Vec<u8>);
}

/// Per-request knobs: `x-mock-*` headers over the process flags.
#[derive(Clone, Copy)]
struct Knobs {
    ttft_ms: u64,
    itl_ms: u64,
    delay_ms: u64,
    status: Option<u16>,
    cut_after: Option<u64>,
    close: bool,
    tokens: TokenKnobs,
}

impl Knobs {
    fn read(head: &RequestHead, buf: &[u8], sh: &Shared) -> Knobs {
        let o = &sh.opts;
        let mut k = Knobs {
            ttft_ms: o.ttft_ms,
            itl_ms: o.itl_ms,
            delay_ms: o.delay_ms,
            status: None,
            cut_after: o.cut_after,
            close: false,
            tokens: TokenKnobs {
                tokens: o.tokens,
                cached_tokens: None,
                reasoning_tokens: None,
            },
        };
        for (n, v) in &head.headers {
            let name = n.of(buf);
            if name.len() <= 7 || !name[..7].eq_ignore_ascii_case(b"x-mock-") {
                continue;
            }
            // Unparsable values are ignored: the flag's value stays in force.
            let Some(num) = std::str::from_utf8(v.of(buf))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            else {
                continue;
            };
            let key = name[7..].to_ascii_lowercase();
            match key.as_slice() {
                b"ttft-ms" => k.ttft_ms = num,
                b"itl-ms" => k.itl_ms = num,
                b"delay-ms" => k.delay_ms = num,
                b"tokens" => k.tokens.tokens = num,
                b"status" if (400..=599).contains(&num) => k.status = Some(num as u16),
                b"cut-after" => k.cut_after = Some(num),
                b"close" => k.close = num != 0,
                b"cached-tokens" => k.tokens.cached_tokens = Some(num),
                b"reasoning-tokens" => k.tokens.reasoning_tokens = Some(num),
                _ => {}
            }
        }
        k
    }
}

/// What an inference request is answered with: a JSON body at once, or a generation.
enum Answer {
    Json(Vec<u8>),
    OpenAi(Generation),
    Messages(Message),
    Responses(Response),
}

/// Counts a generation in `vllm:num_requests_running` while it lives (from its admission when the
/// scheduler is on).
struct Running(&'static Shared, usize);

impl Running {
    fn new(sh: &'static Shared, model: usize) -> Running {
        sh.running[model].fetch_add(1, Ordering::Relaxed);
        Running(sh, model)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A generation the scheduler admitted: its running slot and KV blocks, held until the response
/// ends or the client leaves. `running` is None while it is preempted.
struct Scheduled {
    slot: Slot,
    model: usize,
    running: Option<Running>,
}

struct Conn {
    rd: crate::tls::Reader<ServerConnection>,
    wr: crate::tls::Writer<ServerConnection>,
    /// The socket under `rd` and `wr`, peeked to notice a client that left.
    fd: RawFd,
    sh: &'static Shared,
    /// Received bytes; the current request starts at index 0.
    buf: Vec<u8>,
    head: RequestHead,
    /// Bytes of `buf` the current request occupies (head and body framing).
    consumed: usize,
    body: Vec<u8>,
    /// Bytes for the next write.
    out: Vec<u8>,
    /// One rendered SSE event (or a whole JSON body) before framing.
    ev: Vec<u8>,
}

/// A TLS handshake taking longer than this ends the connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve(stream: TcpStream, sh: &'static Shared) {
    // Without it keep-alive requests stall 40 ms on Nagle + delayed ACK.
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    let (rd, wr) = match &sh.tls {
        None => crate::tls::Reader::plain(stream),
        Some(config) => {
            let accept = crate::tls::stream::accept(stream, config.clone());
            match monoio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok((rd, wr))) => (crate::tls::Reader::Tls(rd), crate::tls::Writer::Tls(wr)),
                Ok(Err(e)) => {
                    eprintln!("mock-llm: TLS handshake failed: {e}");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let mut c = Conn {
        rd,
        wr,
        fd,
        sh,
        buf: Vec::with_capacity(8192),
        head: RequestHead::default(),
        consumed: 0,
        body: Vec::new(),
        out: Vec::with_capacity(4096),
        ev: Vec::with_capacity(1024),
    };
    loop {
        match c.read_request().await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let e = GatewayError::Request(e);
                let body = ApiError::new(e.status(), e.message()).body(false);
                write_response(&mut c.out, e.status(), JSON, &[], &body, false);
                c.flush().await;
                return;
            }
        }
        if !c.respond().await {
            return;
        }
        c.buf.drain(..c.consumed);
    }
}

impl Conn {
    /// Reads until `buf` holds one whole request; `Ok(false)` when the peer closed or failed first.
    async fn read_request(&mut self) -> Result<bool, RequestError> {
        loop {
            if !self.buf.is_empty() && parse_request(&self.buf, MAX_HEAD, &mut self.head)? {
                break;
            }
            if !self.fill().await {
                return Ok(false);
            }
        }
        let head_len = self.head.head_len;
        self.body.clear();
        match self.head.framing() {
            Framing::Length(n) => {
                if n > MAX_BODY as u64 {
                    return Err(RequestError::BodyTooLarge);
                }
                let end = head_len + n as usize;
                if self.buf.len() < end {
                    self.send_continue().await;
                }
                while self.buf.len() < end {
                    if !self.fill().await {
                        return Ok(false);
                    }
                }
                self.body.extend_from_slice(&self.buf[head_len..end]);
                self.consumed = end;
            }
            Framing::Chunked => {
                let mut decoder = ChunkedDecoder::default();
                let mut pos = head_len;
                let mut asked = false;
                loop {
                    let body = &mut self.body;
                    pos += decoder
                        .feed(&self.buf[pos..], |d| body.extend_from_slice(d))
                        .map_err(|_| RequestError::Malformed("invalid chunked body"))?;
                    if body.len() > MAX_BODY {
                        return Err(RequestError::BodyTooLarge);
                    }
                    if decoder.is_done() {
                        break;
                    }
                    if !asked {
                        asked = true;
                        self.send_continue().await;
                    }
                    if !self.fill().await {
                        return Ok(false);
                    }
                }
                self.consumed = pos;
            }
            Framing::Empty | Framing::UntilClose => self.consumed = head_len,
        }
        Ok(true)
    }

    async fn send_continue(&mut self) {
        if self.head.expect_continue {
            self.out.clear();
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            self.flush().await;
        }
    }

    /// Appends what the socket has to `buf`; false on end of stream or error.
    async fn fill(&mut self) -> bool {
        if self.buf.len() == self.buf.capacity() {
            self.buf.reserve(self.buf.capacity().max(8192));
        }
        let buf = std::mem::take(&mut self.buf);
        let (len, cap) = (buf.len(), buf.capacity());
        // A read fills from index 0 of what it is given, so it gets the unused tail only.
        let (res, slice) = self.rd.read(buf.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        matches!(res, Ok(n) if n > 0)
    }

    /// Writes and clears `out`; false when the peer is gone.
    async fn flush(&mut self) -> bool {
        let out = std::mem::take(&mut self.out);
        let (res, mut out) = self.wr.write_all(out).await;
        out.clear();
        self.out = out;
        res.is_ok()
    }

    /// Answers the parsed request; false when the connection must close afterwards.
    async fn respond(&mut self) -> bool {
        let sh = self.sh;
        let (buf, head) = (&self.buf, &self.head);
        let method = head.method.of(buf);
        let path = head.path(buf);
        let k = Knobs::read(head, buf, sh);
        let keep = head.keep_alive && !k.close;
        let get = method == b"GET";
        if get && (path == b"/health" || path == b"/metrics") {
            let mut body = Vec::new();
            let ctype: &[u8] = if path == b"/metrics" {
                metrics::render(sh, &mut body);
                b"text/plain; version=0.0.4; charset=utf-8"
            } else {
                b"text/plain; charset=utf-8"
            };
            return self.reply(200, ctype, &[], &body, keep).await;
        }
        // Gateways poll the model list; counting it would blur how traffic was balanced.
        if !(get && path == b"/v1/models") {
            sh.requests.fetch_add(1, Ordering::Relaxed);
        }
        let endpoint = match path {
            b"/v1/chat/completions" => Some(Endpoint::Chat),
            b"/v1/completions" => Some(Endpoint::Completions),
            b"/v1/embeddings" => Some(Endpoint::Embeddings),
            b"/v1/messages" => Some(Endpoint::Messages),
            b"/v1/messages/count_tokens" => Some(Endpoint::CountTokens),
            b"/v1/responses" => Some(Endpoint::Responses),
            _ => None,
        };
        if path.starts_with(b"/v1/debug/echo") {
            let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let headers: Vec<[String; 2]> = head
                .headers
                .iter()
                .map(|(n, v)| [lossy(n.of(buf)), lossy(v.of(buf))])
                .collect();
            let body = serde_json::json!({
                "method": lossy(method),
                "target": lossy(head.target.of(buf)),
                "headers": headers,
                "body": lossy(&self.body),
            })
            .to_string();
            return self
                .reply(200, JSON, &[(b"x-mock-echo", b"1")], body.as_bytes(), keep)
                .await;
        }
        match (endpoint, method) {
            (Some(ep), b"POST") => self.inference(ep, k, keep).await,
            (None, b"GET") if path == b"/v1/models" => {
                let body = openai::models(sh);
                self.reply(200, JSON, &[], &body, keep).await
            }
            // FastAPI's answers, as vLLM gives them.
            _ if endpoint.is_some() || matches!(path, b"/v1/models" | b"/health" | b"/metrics") => {
                self.reply(405, JSON, &[], br#"{"detail":"Method Not Allowed"}"#, keep)
                    .await
            }
            _ => {
                self.reply(404, JSON, &[], br#"{"detail":"Not Found"}"#, keep)
                    .await
            }
        }
    }

    async fn reply(
        &mut self,
        status: u16,
        ctype: &[u8],
        extra: &[(&[u8], &[u8])],
        body: &[u8],
        keep: bool,
    ) -> bool {
        write_response(&mut self.out, status, ctype, extra, body, keep);
        self.flush().await && keep
    }

    async fn reply_error(&mut self, e: ApiError, ep: Endpoint, keep: bool) -> bool {
        let body = e.body(ep.anthropic());
        self.reply(e.status, JSON, &[], &body, keep).await
    }

    async fn inference(&mut self, ep: Endpoint, k: Knobs, keep: bool) -> bool {
        let sh = self.sh;
        if k.delay_ms > 0 && !self.wait(k.delay_ms, true).await {
            return self.cancelled();
        }
        if let Some(status) = sh.forced_failure(k.status) {
            let e = ApiError::new(status, format!("Simulated failure (status {status})."));
            return self.reply_error(e, ep, keep).await;
        }
        let body = &self.body;
        let answer = match ep {
            Endpoint::Embeddings => openai::embeddings(sh, body).map(Answer::Json),
            Endpoint::CountTokens => anthropic::count_tokens(sh, body).map(Answer::Json),
            Endpoint::Chat | Endpoint::Completions => {
                Generation::parse(sh, ep == Endpoint::Chat, body, k.tokens).map(Answer::OpenAi)
            }
            Endpoint::Messages => Message::parse(sh, body, k.tokens).map(Answer::Messages),
            Endpoint::Responses => Response::parse(sh, body, k.tokens).map(Answer::Responses),
        };
        match answer {
            Ok(Answer::Json(json)) => self.reply(200, JSON, &[], &json, keep).await,
            Ok(Answer::OpenAi(g)) => self.generate(&g, k, ep, keep).await,
            Ok(Answer::Messages(g)) => self.generate(&g, k, ep, keep).await,
            Ok(Answer::Responses(g)) => self.generate(&g, k, ep, keep).await,
            Err(e) => self.reply_error(e, ep, keep).await,
        }
    }

    /// A generation, counted in `vllm:num_requests_running` while it runs. With the scheduler
    /// its prompt is read in blocks first (a prompt the KV cache cannot hold is refused).
    async fn generate<G: Generated>(&mut self, g: &G, k: Knobs, ep: Endpoint, keep: bool) -> bool {
        let prompt = match &self.sh.scheduler {
            Some(s) => match s.prompt(g.model(), &self.body) {
                Ok(p) => Some(p),
                Err(e) => return self.reply_error(e, ep, keep).await,
            },
            None => None,
        };
        // Without the scheduler a generation runs from its start.
        let _running = prompt.is_none().then(|| Running::new(self.sh, g.model()));
        if g.stream() {
            self.stream(g, k, prompt, keep).await
        } else {
            self.complete(g, k, prompt, keep).await
        }
    }

    /// Waits until the first token is due: with the scheduler, for admission and the prefill
    /// of the uncached prompt (again if preempted meanwhile); then `after` more. None when the
    /// client left meanwhile; otherwise what keeps the generation admitted (None without the
    /// scheduler).
    async fn first_token(
        &self,
        model: usize,
        priority: i64,
        prompt: Option<PromptBlocks>,
        after: Duration,
        check_end: bool,
    ) -> Option<Option<Scheduled>> {
        let Some((p, sched)) = prompt.zip(self.sh.scheduler.as_ref()) else {
            return self
                .wait_until(Instant::now() + after, check_end)
                .await
                .then_some(None);
        };
        let mut s = Scheduled {
            slot: sched.admit(model, p, priority),
            model,
            running: None,
        };
        let mut from = self.resume(&mut s, 0).await?;
        loop {
            if !self.wait_until(from + after, check_end).await {
                return None;
            }
            if !s.slot.preempted() {
                return Some(Some(s));
            }
            from = self.resume(&mut s, 0).await?;
        }
    }

    /// Waits for the generation's (re)admission, having generated `generated` tokens, while
    /// watching the client; returns when its prefill ends, None when the client left. Out of
    /// `vllm:num_requests_running` meanwhile.
    async fn resume(&self, s: &mut Scheduled, generated: u64) -> Option<Instant> {
        s.running = None;
        let fd = self.fd;
        let mut start = std::pin::pin!(s.slot.start(generated));
        let at = loop {
            monoio::select! {
                at = &mut start => break at,
                _ = monoio::time::sleep(WATCH_SLICE) => if peer_gone(fd) {
                    return None;
                },
            }
        };
        s.running = Some(Running::new(self.sh, s.model));
        Some(at)
    }

    /// At a token boundary: a preempted generation waits to be readmitted and for its
    /// recompute; false when the client left meanwhile.
    async fn unless_preempted(&self, s: &mut Option<Scheduled>, generated: u64) -> bool {
        match s {
            Some(s) if s.slot.preempted() => match self.resume(s, generated).await {
                Some(at) => self.wait_until(at, false).await,
                None => false,
            },
            _ => true,
        }
    }

    /// A streamed generation: head, then each SSE event as its own chunk in its own write.
    async fn stream<G: Generated>(
        &mut self,
        g: &G,
        k: Knobs,
        prompt: Option<PromptBlocks>,
        keep: bool,
    ) -> bool {
        // `ev` may still hold the previous response's body on a kept-alive connection.
        self.ev.clear();
        self.out.clear();
        self.out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache\r\n",
        );
        if !keep {
            self.out.extend_from_slice(b"Connection: close\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        // The head leaves at once, as uvicorn sends it; when an event is due now anyway it rides
        // in the same write.
        for n in 0..g.opening_events() {
            g.opening_event(n, &mut self.ev);
            if !self.send_event(false).await {
                return self.cancelled();
            }
        }
        let mut scheduled = None;
        if prompt.is_some() || k.ttft_ms > 0 {
            if !(self.out.is_empty() || self.flush().await) {
                return self.cancelled();
            }
            let ttft = Duration::from_millis(k.ttft_ms);
            match self
                .first_token(g.model(), g.priority(), prompt, ttft, false)
                .await
            {
                Some(s) => scheduled = s,
                None => return self.cancelled(),
            }
        }
        for n in 0..g.first_events() {
            g.first_event(n, &mut self.ev);
            if !self.send_event(false).await {
                return self.cancelled();
            }
        }
        let steps = g.steps();
        for i in 0..steps {
            if k.cut_after == Some(i) {
                return self.cut().await;
            }
            if i > 0 && k.itl_ms > 0 && !self.wait(k.itl_ms, false).await {
                return self.cancelled();
            }
            if !self.unless_preempted(&mut scheduled, i).await {
                return self.cancelled();
            }
            g.step_event(i, &mut self.ev);
            if !self.send_event(false).await {
                return self.cancelled();
            }
        }
        if k.cut_after == Some(steps) {
            return self.cut().await;
        }
        let closing = g.closing_events();
        for n in 0..closing {
            g.closing_event(n, &mut self.ev);
            if !self.send_event(n + 1 == closing).await {
                return self.cancelled();
            }
        }
        self.sh.streams_completed.fetch_add(1, Ordering::Relaxed);
        keep
    }

    /// A non-streamed generation: the whole body after the simulated generation time.
    async fn complete<G: Generated>(
        &mut self,
        g: &G,
        k: Knobs,
        prompt: Option<PromptBlocks>,
        keep: bool,
    ) -> bool {
        let ms = k
            .ttft_ms
            .saturating_add(k.itl_ms.saturating_mul(g.steps().saturating_sub(1)));
        let preemptible = prompt.is_some()
            && self
                .sh
                .scheduler
                .as_ref()
                .is_some_and(|s| s.preempts_on_arrival());
        // When preemptible it goes token by token after the first, so that a preemption delays
        // the rest by its recompute.
        let first = if preemptible { k.ttft_ms } else { ms };
        let mut scheduled = None;
        if prompt.is_some() || first > 0 {
            let first = Duration::from_millis(first);
            match self
                .first_token(g.model(), g.priority(), prompt, first, !preemptible)
                .await
            {
                Some(s) => scheduled = s,
                None => return self.cancelled(),
            }
        }
        if preemptible {
            for i in 1..g.steps() {
                if !(self.wait(k.itl_ms, false).await
                    && self.unless_preempted(&mut scheduled, i).await)
                {
                    return self.cancelled();
                }
            }
            if peer_gone(self.fd) {
                return self.cancelled();
            }
        }
        self.ev.clear();
        g.full_body(&mut self.ev);
        write_response(&mut self.out, 200, JSON, &[], &self.ev, keep);
        if k.cut_after.is_some() {
            let unsent = self.ev.len() - self.ev.len() / 2;
            self.out.truncate(self.out.len() - unsent);
            return self.cut().await;
        }
        if !self.flush().await {
            return self.cancelled();
        }
        keep
    }

    /// Frames `ev` as one chunk (plus the last chunk when `last`) and writes it with anything
    /// pending in `out`.
    async fn send_event(&mut self, last: bool) -> bool {
        push_hex(&mut self.out, self.ev.len());
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(&self.ev);
        self.out.extend_from_slice(b"\r\n");
        if last {
            self.out.extend_from_slice(b"0\r\n\r\n");
        }
        self.ev.clear();
        self.flush().await
    }

    /// `--cut-after`: sends what is pending, then the caller drops the socket mid-body.
    async fn cut(&mut self) -> bool {
        if !self.out.is_empty() {
            self.flush().await;
        }
        false
    }

    fn cancelled(&self) -> bool {
        self.sh.cancelled.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Sleeps `ms` on the runtime's timer; false when the client has gone meanwhile.
    ///
    /// Waits longer than a slice peek at the socket after each slice, and `check_end` peeks once
    /// more at the end: a non-streamed response's single write would otherwise succeed into the
    /// kernel buffer of a closed connection and the cancel would go uncounted. Streams notice on
    /// their next failed write. A peek consumes nothing, so pipelined requests stay queued.
    async fn wait(&self, ms: u64, check_end: bool) -> bool {
        self.wait_until(Instant::now() + Duration::from_millis(ms), check_end)
            .await
    }

    /// [`Conn::wait`] until `deadline`.
    async fn wait_until(&self, deadline: Instant, check_end: bool) -> bool {
        let fd = self.fd;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return !check_end || !peer_gone(fd);
            }
            let step = left.min(WATCH_SLICE);
            monoio::time::sleep(step).await;
            if step == WATCH_SLICE && peer_gone(fd) {
                return false;
            }
        }
    }
}

/// True when the client closed or reset the connection. HTTP clients do not half-close while
/// waiting for a response, so end of stream means they left.
fn peer_gone(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local; the fd is owned by the connection's live halves.
    // With TLS the peeked byte is ciphertext: only whether there is one matters.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(
            std::io::Error::last_os_error().kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

/// `n` in hexadecimal without leading zeros: a chunk size.
fn push_hex(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0; 2 * size_of::<usize>()];
    hex::encode_to_slice(n.to_be_bytes(), &mut digits).expect("two digits per byte");
    let leading_zeros = (n.leading_zeros() / 4) as usize;
    out.extend_from_slice(&digits[leading_zeros.min(digits.len() - 1)..]);
}
