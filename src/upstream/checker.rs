//! The checker threads, off the worker cores: one per backend, each on its own schedule, so a
//! backend that hangs until the timeout delays no other backend's verdict. Each round it
//! - runs the active health check (`health_check`) and publishes the backend's verdict,
//! - scrapes vLLM's `/metrics` for `least_load`, `cache_aware` and `scheduling`'s saturation
//!   thresholds (waiting and running requests, KV-cache use), and hands the slots of a backend
//!   that is no longer saturated to the requests waiting for it,
//! - forgets the prompt blocks `cache_aware` sent to a backend that turns unhealthy.
//!
//! With several backends or aliases, one more thread merges the backends' `/v1/models` lists
//! into the gateway's own answer.
//!
//! Workers only read what they publish (atomics, one RwLock read per `/v1/models`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Backend, Backends};
use crate::config::{Config, HealthCheck, Strategy};
use crate::http::{parse_response, BodyTracker, Framing};

/// How often the merged `/v1/models` answer is refreshed.
const MODELS_EVERY: Duration = Duration::from_secs(10);
/// How soon the model-list thread notices its generation was retired.
const RETIRED_POLL: Duration = Duration::from_millis(250);

/// Starts the checker threads the config asks for. They end once `backends` is retired.
pub fn spawn_checker(backends: Arc<Backends>, config: &Config) {
    let health = config.health_check.clone();
    let scrape_load = matches!(
        config.routing.strategy,
        Strategy::LeastLoad | Strategy::CacheAware
    ) || config.routing.saturation > 0.0
        || config
            .scheduling
            .as_ref()
            .is_some_and(|s| s.max_waiting.is_some() || s.max_kv_cache.is_some());
    let merge_models = backends.list.len() > 1 || !backends.aliases.is_empty();
    if health.active || scrape_load {
        let mut period = if health.active {
            health.interval
        } else {
            Duration::from_secs(10)
        };
        if scrape_load {
            period = period.min(config.routing.load_interval);
        }
        for index in 0..backends.list.len() {
            let watch = BackendWatch {
                backends: Arc::clone(&backends),
                index,
                health: health.clone(),
                load_path: scrape_load.then(|| config.routing.load_path.clone()),
                period,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("llmproxy-chk-{index}"))
                .spawn(move || watch.run());
            if let Err(e) = spawned {
                tracing::error!("cannot start a backend checker thread: {e}");
            }
        }
    }
    if merge_models {
        let timeout = health.timeout;
        let spawned = std::thread::Builder::new()
            .name("llmproxy-models".into())
            .spawn(move || {
                let mut next = Instant::now();
                while !backends.is_retired() {
                    if Instant::now() >= next {
                        backends.set_models_json(merged_models(&backends, timeout));
                        next = Instant::now() + MODELS_EVERY;
                    }
                    // Short naps, so a retired generation's thread ends soon after a reload.
                    std::thread::sleep(RETIRED_POLL);
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the model list thread: {e}");
        }
    }
}

/// One backend's checks.
struct BackendWatch {
    backends: Arc<Backends>,
    index: usize,
    health: HealthCheck,
    /// The metrics path to scrape, with `least_load` and `cache_aware`.
    load_path: Option<String>,
    period: Duration,
}

impl BackendWatch {
    fn run(self) {
        let health = &self.health;
        let (mut ok_streak, mut fail_streak) = (0u32, 0u32);
        let mut next_health = Instant::now();
        while !self.backends.is_retired() {
            let b = &self.backends.list[self.index];
            let now = Instant::now();
            if health.active && now >= next_health {
                next_health = now + health.interval;
                let ok = get(
                    b,
                    &health.path,
                    &health.headers,
                    health.timeout,
                    Wanted::Status,
                )
                .is_some_and(|(status, _)| status == health.expected_status);
                if ok {
                    ok_streak += 1;
                    fail_streak = 0;
                } else {
                    fail_streak += 1;
                    ok_streak = 0;
                }
                publish_health(b, ok, ok_streak, fail_streak, health);
            }
            if let Some(path) = &self.load_path {
                let load = match get(b, path, &[], health.timeout, Wanted::Body) {
                    Some((200, body)) => Some(Load::parse(&body)),
                    _ => None,
                };
                self.publish_load(load);
            }
            std::thread::sleep(self.period);
        }
    }
}

impl BackendWatch {
    /// Publishes a scrape. With none (the backend did not answer), the last score stays for
    /// balancing, but saturation is forgotten: a stale verdict must not hold requests back.
    fn publish_load(&self, load: Option<Load>) {
        let b = &self.backends.list[self.index];
        if let Some(load) = &load {
            b.load.store(load.score().to_bits(), Ordering::Relaxed);
        }
        let (waiting, kv) = load.map_or((0.0, 0.0), |l| (l.waiting, l.kv));
        set(&b.waiting, waiting as u32);
        set(&b.kv_milli, (kv * 1000.0).round() as u32);
        // Room again: hand it to the waiting requests, as many as its queue threshold allows
        // (an in-flight cap, when set, is enforced by each hand-over).
        if self.backends.scheduler.is_some() && !b.saturated_by_metrics() {
            let room = b.max_waiting.saturating_sub(waiting as u32).clamp(1, 64);
            for _ in 0..room {
                if !Backends::offer(&self.backends, self.index) {
                    break;
                }
            }
        }
    }
}

fn set(a: &AtomicU32, v: u32) {
    a.store(v, Ordering::Relaxed);
}

fn publish_health(b: &Backend, ok: bool, ok_streak: u32, fail_streak: u32, policy: &HealthCheck) {
    let was = b.healthy.load(Ordering::Relaxed);
    // A passing check ends a passive ejection (Envoy's default): a restarted backend is given
    // traffic as soon as it answers, even when requests ejected it before the checks saw it
    // down. The price: a backend that passes its checks while failing requests is let back in
    // once per interval rather than once per `ejection_time`.
    if ok && b.ejected_until.swap(0, Ordering::Relaxed) != 0 {
        b.failures.store(0, Ordering::Relaxed);
        tracing::info!(backend = %b.url, "backend passes its health check: ejection ended");
    }
    if ok && !was && ok_streak >= policy.healthy_threshold {
        b.healthy.store(true, Ordering::Relaxed);
        // A backend that answers its health check again is given traffic at once.
        b.failures.store(0, Ordering::Relaxed);
        b.ejected_until.store(0, Ordering::Relaxed);
        tracing::info!(backend = %b.url, "backend healthy");
    } else if !ok && was && fail_streak >= policy.unhealthy_threshold {
        b.healthy.store(false, Ordering::Relaxed);
        tracing::warn!(backend = %b.url, "backend unhealthy: removed from rotation");
        b.blocks.clear();
    }
}

/// vLLM's load signals, from its `/metrics` text.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Load {
    waiting: f64,
    running: f64,
    /// KV-cache use, 0..1.
    kv: f64,
}

impl Load {
    fn parse(metrics: &[u8]) -> Load {
        let text = String::from_utf8_lossy(metrics);
        let mut load = Load::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            let value: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            match name {
                "vllm:num_requests_waiting" => load.waiting += value,
                "vllm:num_requests_running" => load.running += value,
                "vllm:gpu_cache_usage_perc" | "vllm:kv_cache_usage_perc" => {
                    load.kv = load.kv.max(value)
                }
                _ => {}
            }
        }
        load
    }

    /// Folded into one number: queued requests weigh most (they wait for a slot), then running
    /// ones, then KV-cache pressure (0..1, scaled to a few requests' worth).
    fn score(&self) -> f64 {
        self.waiting * 4.0 + self.running + self.kv * 4.0
    }
}

/// The union of the backends' models (configured lists, else what `/v1/models` reports) plus
/// the aliases, as an OpenAI list.
fn merged_models(backends: &Backends, timeout: Duration) -> Vec<u8> {
    let mut ids: Vec<String> = Vec::new();
    for b in &backends.list {
        if !b.models.is_empty() {
            ids.extend(b.models.iter().cloned());
            continue;
        }
        let Some((200, body)) = get(b, "/v1/models", &[], timeout, Wanted::Body) else {
            continue;
        };
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
            for m in v["data"].as_array().into_iter().flatten() {
                if let Some(id) = m["id"].as_str() {
                    ids.push(id.to_string());
                }
            }
        }
    }
    ids.extend(backends.aliases.iter().map(|(public, _)| public.clone()));
    ids.sort();
    ids.dedup();
    let data: Vec<_> = ids
        .iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "llmproxy"}))
        .collect();
    serde_json::json!({"object": "list", "data": data})
        .to_string()
        .into_bytes()
}

/// Largest response head the checker reads.
const MAX_HEAD: usize = 16 * 1024;
/// Largest `/metrics` or `/v1/models` body the checker reads; a bigger one counts as no answer.
const MAX_BODY: usize = 1 << 20;

/// How much of a response the caller needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wanted {
    /// The status decides (health checks): nothing after the head is waited for.
    Status,
    Body,
}

/// A blocking GET, `timeout` bounding the whole exchange. Runs only here.
fn get(
    b: &Backend,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
    wanted: Wanted,
) -> Option<(u16, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut req = format!(
        "GET {}{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        b.path_prefix, path, b.host_header
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    exchange(b.addr()?, b.tls.as_ref(), req.as_bytes(), deadline, wanted)
}

/// A checker connection: plain, or TLS for an https backend (the same verification and client
/// certificate as the workers' connections).
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn socket(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &s.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => match s.read(buf) {
                // Backends often close without close_notify; the HTTP framing tells a cut body.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Sends `req` on a new connection and reads exactly one response, framed by its head: servers
/// may keep the connection open despite `Connection: close`, so the end is never awaited.
fn exchange(
    addr: SocketAddr,
    tls: Option<&crate::tls::Upstream>,
    req: &[u8],
    deadline: Instant,
    wanted: Wanted,
) -> Option<(u16, Vec<u8>)> {
    let tcp = TcpStream::connect_timeout(&addr, time_left(deadline)?).ok()?;
    tcp.set_write_timeout(Some(time_left(deadline)?)).ok()?;
    let mut s = match tls {
        None => Conn::Plain(tcp),
        Some(tls) => {
            // The handshake runs inside the first write, and reads: bound those too.
            tcp.set_read_timeout(Some(time_left(deadline)?)).ok()?;
            let conn = rustls::ClientConnection::new(tls.config.clone(), tls.name.clone()).ok()?;
            Conn::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
        }
    };
    s.write_all(req).ok()?;
    let mut buf = Vec::new();
    // parse_response also restates the head for a client; nothing here reads that.
    let mut restated = Vec::new();
    let head = loop {
        match parse_response(&buf, MAX_HEAD, false, &mut restated) {
            Ok(Some(h)) if h.is_interim() => {
                buf.drain(..h.head_len);
            }
            Ok(Some(h)) => break h,
            Ok(None) if read_some(&mut s, &mut buf, deadline)? > 0 => {}
            Ok(None) | Err(_) => return None,
        }
    };
    if wanted == Wanted::Status {
        return Some((head.status, Vec::new()));
    }
    if matches!(head.framing, Framing::Length(n) if n > MAX_BODY as u64) {
        return None;
    }
    let mut tracker = BodyTracker::new(head.framing);
    let mut body = Vec::new();
    let mut pending = buf.split_off(head.head_len);
    loop {
        tracker
            .advance(&pending, |d| body.extend_from_slice(d))
            .ok()?;
        if body.len() > MAX_BODY {
            return None;
        }
        if tracker.is_done() {
            return Some((head.status, body));
        }
        pending.clear();
        if read_some(&mut s, &mut pending, deadline)? == 0 {
            // Only a body without Content-Length or chunking ends with the connection.
            return matches!(tracker, BodyTracker::UntilClose).then_some((head.status, body));
        }
    }
}

fn time_left(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Appends what the peer has sent, waiting until `deadline` at most; `Some(0)` when it closed.
fn read_some(s: &mut Conn, buf: &mut Vec<u8>, deadline: Instant) -> Option<usize> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        s.socket()
            .set_read_timeout(Some(time_left(deadline)?))
            .ok()?;
        match s.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Some(n);
            }
            // A signal ends a read that has a timeout instead of restarting it.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_score_reads_vllm_metrics() {
        let text = b"# HELP x\nvllm:num_requests_running{model_name=\"m\"} 3.0\nvllm:num_requests_waiting{model_name=\"m\"} 2.0\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.5\n";
        assert_eq!(Load::parse(text).score(), 2.0 * 4.0 + 3.0 + 2.0);
        assert_eq!(Load::parse(b"").score(), 0.0);
    }

    /// A server for one exchange: reads the request head, then hands the connection to `answer`.
    fn serve(answer: impl FnOnce(&mut TcpStream) + Send + 'static) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8];
                if s.read(&mut byte).unwrap_or(0) == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            answer(&mut s);
        });
        addr
    }

    /// Writes `bytes`, then keeps the connection open until the client closes it.
    fn keep_open(bytes: Vec<u8>) -> impl FnOnce(&mut TcpStream) + Send + 'static {
        move |s| {
            let _ = s.write_all(&bytes);
            let _ = s.read_to_end(&mut Vec::new());
        }
    }

    fn fetch(addr: SocketAddr, wanted: Wanted) -> (Option<(u16, Vec<u8>)>, Duration) {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(5);
        let got = exchange(
            addr,
            None,
            b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
            deadline,
            wanted,
        );
        (got, start.elapsed())
    }

    #[test]
    fn one_response_is_read_without_waiting_for_the_close() {
        let quick = Duration::from_secs(2);
        let addr = serve(keep_open(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        ));
        let (got, took) = fetch(addr, Wanted::Body);
        assert_eq!(got, Some((200, b"hello".to_vec())));
        assert!(took < quick, "{took:?}");

        let chunked = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        let (got, took) = fetch(serve(keep_open(chunked.to_vec())), Wanted::Body);
        assert_eq!(got, Some((200, b"hello".to_vec())));
        assert!(took < quick, "{took:?}");

        // The status alone: a body announced but never sent is not waited for.
        let head = b"HTTP/1.1 503 Busy\r\nContent-Length: 10\r\n\r\n";
        let (got, took) = fetch(serve(keep_open(head.to_vec())), Wanted::Status);
        assert_eq!(got.map(|(status, _)| status), Some(503));
        assert!(took < quick, "{took:?}");

        let addr = serve(|s| s.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil close").unwrap());
        assert_eq!(
            fetch(addr, Wanted::Body).0,
            Some((200, b"until close".to_vec()))
        );
    }

    #[test]
    fn short_oversized_or_slow_answers_are_none() {
        // Closed before the announced length.
        let addr = serve(|s| {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort")
                .unwrap()
        });
        assert_eq!(fetch(addr, Wanted::Body).0, None);

        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(
            fetch(serve(keep_open(big.into_bytes())), Wanted::Body).0,
            None
        );
        let mut big = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..=MAX_BODY / 4096 {
            big.extend_from_slice(b"1000\r\n");
            big.extend_from_slice(&[b'x'; 4096]);
            big.extend_from_slice(b"\r\n");
        }
        assert_eq!(fetch(serve(keep_open(big)), Wanted::Body).0, None);

        // A server trickling bytes is cut at the deadline, not after each read's timeout.
        let addr = serve(|s| {
            for b in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
                .iter()
                .cycle()
            {
                std::thread::sleep(Duration::from_millis(20));
                if s.write_all(&[*b]).is_err() {
                    return;
                }
            }
        });
        let start = Instant::now();
        let deadline = start + Duration::from_millis(300);
        let req = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
        assert_eq!(exchange(addr, None, req, deadline, Wanted::Body), None);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
}
