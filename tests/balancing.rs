//! The backend pool with several simulator processes: strategies, health, retries, timeouts and
//! model routing.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
}

/// A gateway over `backends` (each with its extra YAML lines) with `extra` top-level config.
/// Request counts need no settling time: the simulators do not count health checks, metric
/// scrapes or model-list polls.
fn gateway(backends: &[(SocketAddr, &str)], extra: &str) -> Proc {
    let mut yaml = "listen: \"{listen}\"\nworkers: 2\nbackends:\n".to_string();
    for (addr, more) in backends {
        yaml.push_str(&format!("  - url: \"http://{addr}\"\n"));
        for line in more.lines() {
            yaml.push_str(&format!("    {line}\n"));
        }
    }
    yaml.push_str(extra);
    spawn_gateway(&yaml)
}

/// Waits until the gateway's `GET /v1/models` lists `expected`: its merged list is fetched from
/// the backends by a background thread after start.
fn assert_models_listed(gw: &Proc, expected: &[&str]) {
    let mut ids = Vec::new();
    let listed = wait_until(Duration::from_secs(5), || {
        ids = model_ids(gw);
        ids == expected
    });
    assert!(listed, "models listed: {ids:?}, expected {expected:?}");
}

/// The model ids the gateway's `GET /v1/models` lists.
fn model_ids(gw: &Proc) -> Vec<String> {
    get(gw.addr, "/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// Requests a simulator answered (model-list polls excluded).
fn served(sim: &Proc) -> f64 {
    metric(sim.addr, "mock_requests_total")
}

fn send(gw: &Proc, n: usize) {
    for _ in 0..n {
        let r = post_json(gw.addr, "/v1/chat/completions", &chat("mock-model"), &[]);
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

#[test]
fn weighted_shares_follow_weights() {
    let (a, b) = (spawn_mock(&[]), spawn_mock(&[]));
    let gw = gateway(
        &[(a.addr, "weight: 3"), (b.addr, "weight: 1")],
        "load_balance: weighted\n",
    );
    send(&gw, 200);
    let (na, nb) = (served(&a), served(&b));
    assert_eq!(na + nb, 200.0);
    // Smooth WRR per worker: exact 3:1 within each worker's sequence.
    assert!((140.0..=160.0).contains(&na), "a={na} b={nb}");
}

#[test]
fn seed_routing_key_selects_round_robin() {
    let (a, b) = (spawn_mock(&[]), spawn_mock(&[]));
    let gw = gateway(
        &[(a.addr, "weight: 5"), (b.addr, "weight: 1")],
        "routing:\n  load_balance: round_robin\n",
    );
    send(&gw, 100);
    assert!(
        (40.0..=60.0).contains(&served(&a)),
        "round robin ignores weights"
    );
}

#[test]
fn least_connections_prefers_the_idle_backend() {
    let (a, b) = (spawn_mock(&[]), spawn_mock(&[]));
    let gw = gateway(
        &[(a.addr, ""), (b.addr, "")],
        "workers: 1\nload_balance: least_connections\n"
            .replace("workers: 1\n", "")
            .as_str(),
    );
    // A long stream occupies one backend ...
    let mut long = Client::connect(gw.addr);
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": true}).to_string();
    long.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[("x-mock-itl-ms", "100"), ("x-mock-tokens", "30")],
    ));
    assert!(
        wait_until(Duration::from_secs(5), || served(&a) + served(&b) == 1.0),
        "the long stream reached no backend"
    );
    let (a0, b0) = (served(&a), served(&b));
    // ... so short requests all go to the other.
    send(&gw, 10);
    // A finished request leaves the in-flight count a moment after its client has the answer,
    // so the next one may now and then see a tie; the idle backend still takes nearly all.
    let (da, db) = (served(&a) - a0, served(&b) - b0);
    let to_idle = if a0 == 1.0 { db } else { da };
    assert!(to_idle >= 8.0, "a+{da} b+{db} (a0={a0})");
}

#[test]
fn latency_strategy_moves_traffic_off_a_slow_backend() {
    let slow = spawn_mock(&["--delay-ms", "200"]);
    let fast = spawn_mock(&[]);
    let gw = gateway(
        &[(slow.addr, ""), (fast.addr, "")],
        "load_balance: latency\n",
    );
    send(&gw, 60);
    assert!(
        served(&slow) <= 8.0,
        "slow backend got {} of 60",
        served(&slow)
    );
}

#[test]
fn least_load_follows_backend_metrics() {
    let queued = spawn_mock(&["--waiting", "12", "--kv-cache-usage", "0.9"]);
    let idle = spawn_mock(&[]);
    let gw = gateway(
        &[(queued.addr, ""), (idle.addr, "")],
        "load_balance: least_load\nrouting:\n  least_load:\n    interval: 100ms\n",
    );
    wait_for_scrape(&queued);
    send(&gw, 30);
    assert_eq!(served(&queued), 0.0, "the queued backend got traffic");
}

#[test]
fn affinity_keeps_a_user_on_one_backend() {
    let (a, b) = (spawn_mock(&[]), spawn_mock(&[]));
    let gw = gateway(
        &[(a.addr, ""), (b.addr, "")],
        "routing:\n  affinity:\n    field: user\n",
    );
    for _ in 0..20 {
        let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "user": "alice"});
        assert_eq!(
            post_json(gw.addr, "/v1/chat/completions", &body, &[]).status,
            200
        );
    }
    let (na, nb) = (served(&a), served(&b));
    assert!(na == 20.0 || nb == 20.0, "a={na} b={nb}");
}

#[test]
fn dead_backend_leaves_rotation_and_comes_back() {
    // Held for the whole test, so that no one else takes the port while its backend is down.
    let port = closed_port();
    let a = spawn_mock_on(port.addr, &[]);
    let b = spawn_mock(&[]);
    let gw = gateway(
        &[(a.addr, ""), (b.addr, "")],
        "health_check:\n  interval: 200ms\n  timeout: 200ms\n  unhealthy_threshold: 1\n",
    );
    send(&gw, 10);
    assert!(served(&a) > 0.0);
    drop(a);
    assert!(
        wait_until(Duration::from_secs(5), || !backend_up(&gw, port.addr)),
        "the stopped backend stayed up"
    );
    // Every request succeeds: the dead one is out of rotation (or retried elsewhere).
    let b0 = served(&b);
    send(&gw, 10);
    assert_eq!(served(&b) - b0, 10.0);
    let a = spawn_mock_on(port.addr, &[]);
    assert!(
        wait_until(Duration::from_secs(5), || backend_up(&gw, port.addr)),
        "the restarted backend stayed down"
    );
    send(&gw, 10);
    assert!(served(&a) > 0.0, "the restarted backend takes no traffic");
}

/// A backend that accepts connections and never answers keeps its checks waiting for the whole
/// timeout; another backend's verdict must not wait behind it.
#[test]
fn a_hanging_backend_does_not_delay_another_backends_health_verdict() {
    let hang = TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_addr = hang.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in hang.incoming().flatten() {
            held.push(conn);
        }
    });
    let dead = closed_port();
    let gw = gateway(
        &[(hang_addr, ""), (dead.addr, "")],
        "health_check:\n  interval: 200ms\n  timeout: 5s\n  unhealthy_threshold: 1\n",
    );
    let started = Instant::now();
    let down = wait_until(Duration::from_secs(3), || !backend_up(&gw, dead.addr));
    assert!(
        down,
        "the dead backend was still up {:?} after start",
        started.elapsed()
    );
}

#[test]
fn every_backend_down_is_503_at_once() {
    let dead = [closed_port(), closed_port()];
    let gw = gateway(
        &[(dead[0].addr, ""), (dead[1].addr, "")],
        "health_check:\n  interval: 100ms\n  timeout: 100ms\n  unhealthy_threshold: 1\n",
    );
    assert!(
        wait_until(Duration::from_secs(5), || dead
            .iter()
            .all(|d| !backend_up(&gw, d.addr))),
        "the dead backends stayed up"
    );
    let start = Instant::now();
    let r = post_json(gw.addr, "/v1/chat/completions", &chat("mock-model"), &[]);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "no_healthy_backend");
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn retries_go_to_another_backend_on_503_and_refused_connections() {
    let failing = spawn_mock(&["--fail-status", "503"]);
    let good = spawn_mock(&[]);
    let gw = gateway(
        &[(failing.addr, ""), (good.addr, "")],
        "retry:\n  max_attempts: 2\n  initial_backoff: 10ms\n",
    );
    send(&gw, 20);
    assert!(
        served(&failing) > 0.0,
        "the failing backend was never tried"
    );
    assert_eq!(served(&good), 20.0);

    let dead = closed_port();
    let good = spawn_mock(&[]);
    let gw = gateway(&[(dead.addr, ""), (good.addr, "")], "");
    send(&gw, 20);

    // A single backend failing once: the retry (same backend, after a backoff) succeeds.
    let once = spawn_mock(&["--fail-first", "1", "--fail-status", "503"]);
    let gw = gateway(&[(once.addr, "")], "retry:\n  initial_backoff: 50ms\n");
    send(&gw, 1);
    assert_eq!(served(&once), 2.0);
}

#[test]
fn no_retry_after_the_first_byte() {
    let sim = spawn_mock(&[]);
    let other = spawn_mock(&[]);
    let gw = gateway(
        &[(sim.addr, ""), (other.addr, "")],
        "load_balance: round_robin\n",
    );
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &body,
        &[("x-mock-cut-after", "2")],
    );
    assert!(!r.chunks().1, "cut stream must stay cut");
    assert_eq!(
        served(&sim) + served(&other),
        1.0,
        "a started response was retried"
    );
}

#[test]
fn timeouts_give_their_status() {
    let sim = spawn_mock(&[]);
    let gw = gateway(
        &[(sim.addr, "")],
        "retry:\n  max_attempts: 1\ntimeouts:\n  first_byte: 200ms\n  idle: 300ms\n",
    );
    let start = Instant::now();
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &chat("mock-model"),
        &[("x-mock-delay-ms", "1000")],
    );
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert!(start.elapsed() < Duration::from_millis(800));
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &body,
        &[("x-mock-itl-ms", "600"), ("x-mock-tokens", "3")],
    );
    assert_eq!(r.status, 200);
    assert!(!r.chunks().1, "an idle-timed-out stream must be cut");

    let gw = gateway(&[(sim.addr, "")], "timeouts:\n  total: 400ms\n");
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &body,
        &[("x-mock-itl-ms", "100"), ("x-mock-tokens", "20")],
    );
    assert!(!r.chunks().1, "a stream past timeouts.total must be cut");

    // Connect timeout: a listener whose accept queue is full drops further SYNs.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    full.listen(0).unwrap();
    let addr = full.local_addr().unwrap().as_socket().unwrap();
    let _fill: Vec<_> = (0..3)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok())
        .collect();
    let gw = gateway(
        &[(addr, "")],
        "retry:\n  max_attempts: 1\ntimeouts:\n  connect: 200ms\n",
    );
    let start = Instant::now();
    let r = post_json(gw.addr, "/v1/chat/completions", &chat("mock-model"), &[]);
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_connect_timeout");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn models_route_to_their_backends() {
    let a = spawn_mock(&["--model", "alpha"]);
    let b = spawn_mock(&["--model", "beta"]);
    let gw = gateway(
        &[(a.addr, "models: [alpha]"), (b.addr, "models: [beta]")],
        "model_aliases:\n  public-alpha: alpha\n",
    );
    for _ in 0..5 {
        assert_eq!(
            post_json(gw.addr, "/v1/chat/completions", &chat("alpha"), &[]).status,
            200
        );
        assert_eq!(
            post_json(gw.addr, "/v1/chat/completions", &chat("beta"), &[]).status,
            200
        );
    }
    let r = post_json(gw.addr, "/v1/chat/completions", &chat("public-alpha"), &[]);
    assert_eq!(r.status, 200, "alias not rewritten: {}", r.text());
    assert_eq!(served(&a), 6.0);
    assert_eq!(served(&b), 5.0);
    let r = post_json(gw.addr, "/v1/chat/completions", &chat("gamma"), &[]);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    assert_models_listed(&gw, &["alpha", "beta", "public-alpha"]);
}

#[test]
fn a_lone_backend_answering_5xx_is_not_ejected_into_an_outage() {
    // Eight 500s in a row eject the only backend (max_failures 5), yet requests keep reaching
    // it: refusing every client for ejection_time would be worse than its errors.
    let sim = spawn_mock(&["--fail-first", "8", "--fail-status", "500"]);
    let gw = gateway(&[(sim.addr, "")], "");
    let statuses: Vec<u16> = (0..10)
        .map(|_| post_json(gw.addr, "/v1/chat/completions", &chat("mock-model"), &[]).status)
        .collect();
    assert_eq!(statuses, [500, 500, 500, 500, 500, 500, 500, 500, 200, 200]);
}

#[test]
fn a_lone_backend_refusing_connections_is_still_ejected() {
    let dead = closed_port();
    let gw = gateway(&[(dead.addr, "")], "retry:\n  max_attempts: 1\n");
    let codes: Vec<String> = (0..7)
        .map(|_| {
            let r = post_json(gw.addr, "/v1/chat/completions", &chat("mock-model"), &[]);
            r.json()["error"]["code"].as_str().unwrap_or("").to_string()
        })
        .collect();
    // Five refused connects (502), then it rests: 503 at once, no connect attempt.
    assert!(
        codes[..5].iter().all(|c| c != "no_healthy_backend"),
        "{codes:?}"
    );
    assert_eq!(
        codes[5..],
        ["no_healthy_backend", "no_healthy_backend"],
        "{codes:?}"
    );
}

/// Waits until the gateway has applied one scrape of simulator `sim`'s `/metrics`. The simulator
/// counts connections; the gateway opens one per scrape and one for its model list, and each
/// poll here opens one. Three beyond the polls mean a second scrape began, and the backend's
/// checker thread scrapes in turn, so the first one's figures are in.
fn wait_for_scrape(sim: &Proc) {
    let mut polls = 0.0;
    let scraped = wait_until(Duration::from_secs(5), || {
        polls += 1.0;
        metric(sim.addr, "mock_connections_total") - polls >= 3.0
    });
    assert!(scraped, "the gateway never scraped {}", sim.addr);
}

/// A backend that frames every response (Content-Length, or chunked) and keeps each connection
/// open whatever the client asked for, as many HTTP/1.1 servers do. Threads in the test process,
/// so it can change its answer mid-test and count what it served.
struct KeepOpen {
    addr: SocketAddr,
    state: Arc<KeepOpenState>,
}

struct KeepOpenState {
    models: Vec<&'static str>,
    chunked_models: bool,
    waiting: u32,
    healthy: AtomicBool,
    chats: AtomicU32,
    /// `GET /metrics` requests answered.
    scrapes: AtomicU32,
}

impl KeepOpen {
    fn start(models: &[&'static str], chunked_models: bool, waiting: u32) -> KeepOpen {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(KeepOpenState {
            models: models.to_vec(),
            chunked_models,
            waiting,
            healthy: AtomicBool::new(true),
            chats: AtomicU32::new(0),
            scrapes: AtomicU32::new(0),
        });
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = shared.clone();
                std::thread::spawn(move || st.serve(conn));
            }
        });
        KeepOpen { addr, state }
    }

    fn chats(&self) -> u32 {
        self.state.chats.load(Ordering::Relaxed)
    }
}

impl KeepOpenState {
    fn serve(&self, mut conn: TcpStream) {
        let mut buf = Vec::new();
        let mut scratch = [0u8; 8192];
        loop {
            let head_len = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match conn.read(&mut scratch) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&scratch[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_len]).to_ascii_lowercase();
            let header = |name: &str| {
                head.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .map(str::trim)
            };
            let body_len: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
            while buf.len() < head_len + body_len {
                match conn.read(&mut scratch) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&scratch[..n]),
                }
            }
            buf.drain(..head_len + body_len);
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            let answer = if head.contains(" http/1.1\r\n") && header("host").is_none() {
                // What a strict HTTP/1.1 server does with a request that names no host.
                framed(400, "text/plain", "")
            } else if path == "/health" {
                if header("authorization") != Some("bearer health-token") {
                    framed(401, "text/plain", "")
                } else if self.healthy.load(Ordering::Relaxed) {
                    framed(200, "text/plain", "")
                } else {
                    framed(503, "text/plain", "")
                }
            } else if path == "/v1/models" {
                let data: Vec<Value> = self.models.iter().map(|m| json!({"id": m})).collect();
                let body = json!({"object": "list", "data": data}).to_string();
                if self.chunked_models {
                    let (a, b) = body.split_at(body.len() / 2);
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
                        a.len(),
                        b.len()
                    )
                } else {
                    framed(200, "application/json", &body)
                }
            } else if path == "/metrics" {
                self.scrapes.fetch_add(1, Ordering::Relaxed);
                let body = format!(
                    "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"m\"}} {}.0\nvllm:num_requests_running{{model_name=\"m\"}} 0.0\n",
                    self.waiting
                );
                framed(200, "text/plain; version=0.0.4", &body)
            } else if path == "/v1/chat/completions" {
                self.chats.fetch_add(1, Ordering::Relaxed);
                let body = json!({"id": "c", "object": "chat.completion", "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
                framed(200, "application/json", &body.to_string())
            } else {
                framed(404, "text/plain", "")
            };
            if conn.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    }
}

fn framed(status: u16, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Whether the gateway's `llmproxy_backend_up` says `backend` takes traffic.
fn backend_up(gw: &Proc, backend: SocketAddr) -> bool {
    let series = format!("llmproxy_backend_up{{backend=\"http://{backend}\"}} ");
    let text = get(gw.addr, "/metrics").text();
    let line = text.lines().find_map(|l| l.strip_prefix(series.as_str()));
    line.unwrap_or_else(|| panic!("no {series}in the gateway's metrics")) == "1"
}

#[test]
fn keep_open_backends_pass_health_checks_and_list_their_models() {
    let a = KeepOpen::start(&["alpha"], false, 0);
    let b = KeepOpen::start(&["beta", "gamma"], true, 0);
    a.state.healthy.store(false, Ordering::Relaxed);
    let gw = gateway(
        &[(a.addr, ""), (b.addr, "")],
        "health_check:\n  interval: 250ms\n  timeout: 1s\n  unhealthy_threshold: 1\n  headers:\n    Authorization: Bearer health-token\n",
    );
    // The checks reach the backend: its 503 takes it out of rotation ...
    assert!(
        wait_until(Duration::from_secs(2), || !backend_up(&gw, a.addr)),
        "a backend answering 503 stayed up"
    );
    // ... and once it answers 200 again it is back within an interval (plus slack for a busy
    // machine), while the other has passed every check meanwhile.
    a.state.healthy.store(true, Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_millis(750), || backend_up(&gw, a.addr)),
        "a healthy keep-alive backend was not marked up"
    );
    assert!(
        backend_up(&gw, b.addr),
        "a healthy keep-alive backend is down"
    );
    send(&gw, 20);
    assert_eq!(a.chats() + b.chats(), 20);
    assert!(
        a.chats() > 0 && b.chats() > 0,
        "a={} b={}",
        a.chats(),
        b.chats()
    );

    // One list with Content-Length, one chunked: both merged.
    assert_models_listed(&gw, &["alpha", "beta", "gamma"]);
}

#[test]
fn least_load_reads_metrics_from_keep_open_backends() {
    let queued = KeepOpen::start(&["m"], false, 12);
    let idle = KeepOpen::start(&["m"], false, 0);
    let gw = gateway(
        &[(queued.addr, ""), (idle.addr, "")],
        "load_balance: least_load\nrouting:\n  least_load:\n    interval: 100ms\n",
    );
    // The gateway scrapes each backend in turn on one thread: a second scrape begun means the
    // first one's figures are in.
    assert!(
        wait_until(Duration::from_secs(5), || queued
            .state
            .scrapes
            .load(Ordering::Relaxed)
            >= 2),
        "the queued backend was never scraped"
    );
    send(&gw, 30);
    assert_eq!(queued.chats(), 0, "the queued backend got traffic");
    assert_eq!(idle.chats(), 30);
}

#[test]
fn with_the_retry_budget_spent_the_backends_own_answer_is_relayed() {
    // Every answer is a retryable 503: the first requests are retried until the budget is
    // spent; after that the client gets the backend's answer, not a gateway error in its place.
    let sim = spawn_mock(&["--fail-status", "503"]);
    let gw = gateway(&[(sim.addr, "")], "");
    // Each worker holds 10 retries in reserve and earns 0.2 per request; each request here
    // spends 1 (max_attempts 2): 60 requests over 2 workers run both dry.
    let messages: Vec<String> = (0..60)
        .map(|_| {
            let r = post_json(gw.addr, "/v1/chat/completions", &chat("mock-model"), &[]);
            assert_eq!(r.status, 503);
            r.json()["error"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        messages[50..]
            .iter()
            .all(|m| m.starts_with("Simulated failure")),
        "{messages:?}"
    );
}
