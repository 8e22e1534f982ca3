//! The core relay over real sockets: gateway processes in front of the simulator (and a literal
//! fixed-bytes upstream), checked byte for byte and in time.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn gateway_for(backend: SocketAddr, extra: &str) -> Proc {
    spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 1\nbackends:\n  - url: \"http://{backend}\"\n{extra}"
    ))
}

fn chat(stream: bool) -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "Hello there"}], "stream": stream})
}

/// Drops the fields that differ between two generations of the same request.
fn normalized(event: &str) -> Value {
    let mut v: Value = match serde_json::from_str(event) {
        Ok(v) => v,
        Err(_) => return Value::String(event.to_string()),
    };
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("created");
    }
    v
}

#[test]
fn wire_bytes_are_identical_to_the_backend() {
    let up = spawn_fixed_upstream();
    let gw = gateway_for(up.addr, "");
    for path in ["/v1/fixed/sse", "/v1/fixed/json", "/v1/fixed/close"] {
        let direct = request(up.addr, &raw_request("POST", path, b"{}", &[]));
        let proxied = request(gw.addr, &raw_request("POST", path, b"{}", &[]));
        assert_eq!(proxied.status, direct.status, "{path}");
        assert_eq!(
            proxied.raw_body, direct.raw_body,
            "{path}: relayed bytes differ"
        );
        assert_eq!(
            proxied.header("x-upstream"),
            direct.header("x-upstream"),
            "{path}"
        );
    }
    // The chunk extension and the trailer are relayed as sent.
    let r = request(gw.addr, &raw_request("POST", "/v1/fixed/sse", b"{}", &[]));
    let raw = String::from_utf8_lossy(&r.raw_body);
    assert!(
        raw.contains(";note=x") && raw.ends_with("0\r\nx-trailer: t\r\n\r\n"),
        "{raw}"
    );
}

#[test]
fn simulator_streams_and_bodies_match_direct() {
    let sim = spawn_mock(&["--tokens", "12"]);
    let gw = gateway_for(sim.addr, "");
    for stream in [true, false] {
        let direct = post_json(sim.addr, "/v1/chat/completions", &chat(stream), &[]);
        let proxied = post_json(gw.addr, "/v1/chat/completions", &chat(stream), &[]);
        assert_eq!(proxied.status, 200);
        assert_eq!(
            proxied.header("content-type"),
            direct.header("content-type")
        );
        if stream {
            let d: Vec<Value> = sse_events(&direct.body)
                .iter()
                .map(|e| normalized(e))
                .collect();
            let p: Vec<Value> = sse_events(&proxied.body)
                .iter()
                .map(|e| normalized(e))
                .collect();
            assert_eq!(p, d);
            assert_eq!(p.last(), Some(&Value::String("[DONE]".into())));
            // Chunked stays chunked, one chunk per event as the backend sent them.
            let (chunks, terminated) = proxied.chunks();
            assert!(terminated);
            assert_eq!(chunks.len(), d.len());
        } else {
            assert_eq!(normalized(&proxied.text()), normalized(&direct.text()));
        }
    }
}

#[test]
fn events_arrive_as_the_backend_sends_them() {
    let sim = spawn_mock(&[]);
    let gw = gateway_for(sim.addr, "");
    let mut c = Client::connect(gw.addr);
    let body = chat(true).to_string();
    c.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[("x-mock-itl-ms", "300"), ("x-mock-tokens", "3")],
    ));
    let start = Instant::now();
    let stream = c.stream();
    let mut seen = Vec::new();
    let mut arrivals = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("[DONE]") {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
        let events = String::from_utf8_lossy(&seen).matches("data: ").count();
        while arrivals.len() < events {
            arrivals.push(start.elapsed());
        }
    }
    // The role chunk and first token come at once; each later token 300 ms after the previous.
    // Each arrives on its own, well before the stream ends: relayed as produced, not held.
    assert!(
        arrivals[0] < Duration::from_millis(250),
        "first event after {:?}",
        arrivals[0]
    );
    for pair in arrivals[1..4].windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(250),
            "{arrivals:?}"
        );
    }
}

#[test]
fn keep_alive_on_both_legs() {
    let sim = spawn_mock(&[]);
    let gw = gateway_for(sim.addr, "");
    let before = metric(sim.addr, "mock_connections_total");
    let mut c = Client::connect(gw.addr);
    for _ in 0..20 {
        c.send(&raw_request(
            "POST",
            "/v1/chat/completions",
            chat(false).to_string().as_bytes(),
            &[],
        ));
        assert_eq!(c.read_response().status, 200);
    }
    let after = metric(sim.addr, "mock_connections_total");
    // One upstream connection for the 20 requests, plus the scrape itself.
    assert_eq!(after - before, 2.0, "upstream connections were not reused");
}

#[test]
fn forwarded_request_keeps_target_and_end_to_end_headers() {
    let sim = spawn_mock(&[]);
    let gw = gateway_for(sim.addr, "");
    let r = request(
        gw.addr,
        &raw_request(
            "POST",
            "/v1/debug/echo/x?a=1&b=%20two",
            b"{\"k\":1}",
            &[
                ("X-Custom", "kept"),
                ("Connection", "keep-alive, X-Hop-Listed"),
                ("X-Hop-Listed", "dropped"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Proxy-Authorization", "Basic abc"),
                ("X-Forwarded-For", "203.0.113.7"),
                ("X-Request-Id", "client-id-1"),
            ],
        ),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-mock-echo"),
        Some("1"),
        "upstream response headers are kept"
    );
    assert_eq!(r.header("x-request-id"), Some("client-id-1"));
    let echo = r.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["target"], "/v1/debug/echo/x?a=1&b=%20two");
    assert_eq!(echo["body"], "{\"k\":1}");
    let headers = echoed_headers(&r);
    let get = |n: &str| {
        headers
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("x-custom"), ["kept"]);
    assert_eq!(get("x-forwarded-for"), ["203.0.113.7, 127.0.0.1"]);
    assert_eq!(get("x-request-id"), ["client-id-1"]);
    for hop in [
        "connection",
        "x-hop-listed",
        "keep-alive",
        "te",
        "proxy-authorization",
    ] {
        assert!(get(hop).is_empty(), "{hop} was forwarded");
    }

    // Without a client id the gateway makes one, sends it upstream and returns it.
    let r = request(gw.addr, &raw_request("GET", "/v1/debug/echo", b"", &[]));
    let id = r.header("x-request-id").expect("generated id").to_string();
    // A UUIDv7: servers that validate the header (starlette-context's default) accept it.
    let groups: Vec<usize> = id.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
    assert!(id.as_bytes()[14] == b'7', "{id}");
    let sent = r.json()["headers"].as_array().unwrap().iter().any(|h| {
        h[0].as_str().unwrap().eq_ignore_ascii_case("x-request-id") && h[1] == id.as_str()
    });
    assert!(sent);
}

/// The headers of the request the echo route saw, names lowercased.
fn echoed_headers(r: &Response) -> Vec<(String, String)> {
    r.json()["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_ascii_lowercase(),
                h[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_upstream_request_id_header_is_configurable() {
    let sim = spawn_mock(&[]);
    let echo = |gw: &Proc, client_id: Option<&str>| {
        let headers: Vec<(&str, &str)> = client_id
            .map(|id| ("X-Request-Id", id))
            .into_iter()
            .collect();
        let r = request(
            gw.addr,
            &raw_request("GET", "/v1/debug/echo", b"", &headers),
        );
        assert_eq!(r.status, 200);
        let id = r.header("x-request-id").expect("id echoed").to_string();
        (id, echoed_headers(&r))
    };
    let renamed = gateway_for(
        sim.addr,
        "upstream: {request_id_header: X-Correlation-Id}\n",
    );
    let (id, sent) = echo(&renamed, None);
    assert!(sent.contains(&("x-correlation-id".into(), id)), "{sent:?}");
    assert!(!sent.iter().any(|(n, _)| n == "x-request-id"), "{sent:?}");
    // The client's own id travels unchanged under the configured name.
    let (id, sent) = echo(&renamed, Some("0190b9e6-1d3c-7f00-8000-000000000001"));
    assert_eq!(id, "0190b9e6-1d3c-7f00-8000-000000000001");
    assert!(sent.contains(&("x-correlation-id".into(), id)), "{sent:?}");

    let off = gateway_for(sim.addr, "upstream: {request_id_header: \"\"}\n");
    let (id, sent) = echo(&off, Some("client-7"));
    assert_eq!(id, "client-7", "the client still gets its id back");
    assert!(
        !sent
            .iter()
            .any(|(n, v)| n.contains("request-id") || v == "client-7"),
        "{sent:?}"
    );
}

fn assert_openai_error(r: &Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string());
    assert!(v["error"].get("param").is_some_and(Value::is_null));
}

#[test]
fn bad_requests_get_the_right_status() {
    let sim = spawn_mock(&[]);
    let gw = gateway_for(
        sim.addr,
        "max_request_body: 1024\nmax_header_size: 2048\ntimeouts:\n  client_header: 300ms\n",
    );
    let r = request(gw.addr, b"GARBAGE\r\n\r\n");
    assert_openai_error(&r, 400, "bad_request");
    let r = request(gw.addr, b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert_openai_error(&r, 400, "ambiguous_request_framing");
    let r = request(gw.addr, b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabc");
    assert_openai_error(&r, 400, "ambiguous_request_framing");
    let big = "x".repeat(4096);
    let r = request(
        gw.addr,
        &raw_request("GET", "/v1/models", b"", &[("X-Big", &big)]),
    );
    assert_openai_error(&r, 431, "request_header_too_large");
    let r = request(
        gw.addr,
        &raw_request("POST", "/v1/chat/completions", &[b'x'; 2000], &[]),
    );
    assert_openai_error(&r, 413, "request_too_large");
    let mut chunked =
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'x'; 512]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_openai_error(&request(gw.addr, &chunked), 413, "request_too_large");
    let r = request(gw.addr, &raw_request("GET", "/nope", b"", &[]));
    assert_openai_error(&r, 404, "unknown_url");

    // Slow headers: 408 once client_header passes.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n")
        .unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.read_to_end(&mut out);
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 408 "),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // The gateway itself answers /health.
    let r = get(gw.addr, "/health");
    assert_eq!(r.status, 200);
}

#[test]
fn chunked_and_expect_continue_bodies_are_forwarded() {
    let sim = spawn_mock(&[]);
    let gw = gateway_for(sim.addr, "");
    let r = request(gw.addr, b"POST /v1/debug/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nX-T: 1\r\n\r\n");
    assert_eq!(r.json()["body"], "abcdefg");

    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /v1/debug/echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").unwrap();
    let mut c = Client::from_stream(s);
    let r = c.read_response();
    assert_eq!(r.json()["body"], "hello");
}

#[test]
fn client_disconnect_aborts_the_generation() {
    let sim = spawn_mock(&[]);
    let gw = gateway_for(sim.addr, "");
    for (stream, tokens) in [(true, "200"), (false, "40")] {
        let before = metric(sim.addr, "mock_requests_cancelled_total");
        let mut c = Client::connect(gw.addr);
        c.send(&raw_request(
            "POST",
            "/v1/chat/completions",
            chat(stream).to_string().as_bytes(),
            &[("x-mock-itl-ms", "50"), ("x-mock-tokens", tokens)],
        ));
        if stream {
            let mut buf = [0u8; 1024];
            assert!(c.stream().read(&mut buf).unwrap() > 0);
        } else {
            assert!(wait_until(Duration::from_secs(5), || metric(
                sim.addr,
                "vllm:num_requests_running"
            ) == 1.0));
        }
        drop(c);
        let aborted = wait_until(Duration::from_millis(600), || {
            metric(sim.addr, "mock_requests_cancelled_total") > before
        });
        assert!(
            aborted,
            "stream={stream}: the backend kept generating after the client left"
        );
    }
    // The gateway is unharmed.
    assert_eq!(
        post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]).status,
        200
    );
}

#[test]
fn backend_dying_mid_stream_is_never_a_clean_end() {
    let sim = spawn_mock(&[]);
    let gw = gateway_for(sim.addr, "");
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &chat(true),
        &[("x-mock-cut-after", "2"), ("x-mock-tokens", "10")],
    );
    assert_eq!(r.status, 200);
    let (_, terminated) = r.chunks();
    assert!(!terminated, "a cut stream must not end with the last chunk");
    assert!(!r.text().contains("[DONE]"));
}

#[test]
fn backend_failures_before_the_response() {
    let dead = closed_port();
    let gw = gateway_for(dead.addr, "");
    let r = post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]);
    assert_openai_error(&r, 502, "upstream_connect_failed");

    let gw = spawn_gateway("listen: \"{listen}\"\nworkers: 1\nbackends:\n  - url: \"http://no-such-host.invalid:8000\"\n");
    let r = post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]);
    assert_openai_error(&r, 503, "no_healthy_backend");
}

#[test]
fn stale_pooled_connection_is_retried_once() {
    let up = spawn_fixed_upstream();
    let gw = gateway_for(up.addr, "");
    let mut c = Client::connect(gw.addr);
    // A connection the upstream keeps open is pooled and carries the next request.
    for _ in 0..2 {
        c.send(&raw_request("POST", "/v1/fixed/json", b"{}", &[]));
        assert_eq!(c.read_response().status, 200);
    }
    assert_eq!(fixed_stat(up.addr, "connections"), 1, "no pooled reuse");
    for closed in 1..=3 {
        c.send(&raw_request("POST", "/v1/fixed/idle", b"{}", &[]));
        let r = c.read_response();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        // The upstream closes the idle connection; the gateway's pooled one is now stale.
        assert!(wait_until(Duration::from_secs(5), || fixed_stat(
            up.addr,
            "idle_closed"
        ) == closed));
    }
    // The first idle request reused the open connection; each later one met a stale pooled
    // connection, was retried once on a new one, and reached the upstream only there.
    // Counted just after the response is written.
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            gw.addr,
            "llmproxy_retries_total"
        ) == 2.0),
        "retries: {}",
        metric(gw.addr, "llmproxy_retries_total")
    );
    assert_eq!(fixed_stat(up.addr, "requests"), 5);
    assert_eq!(fixed_stat(up.addr, "connections"), 3);
}

#[test]
fn sigterm_drains_a_running_stream_then_exits_zero() {
    let sim = spawn_mock(&[]);
    let mut gw = gateway_for(sim.addr, "");
    let mut c = Client::connect(gw.addr);
    c.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        chat(true).to_string().as_bytes(),
        &[("x-mock-itl-ms", "100"), ("x-mock-tokens", "10")],
    ));
    // The stream is running (its head is here) before the signal.
    c.stream().peek(&mut [0u8; 1]).unwrap();
    let pid = gw.child.id() as i32;
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let r = c.read_response();
    let (_, terminated) = r.chunks();
    assert!(
        terminated && r.text().contains("[DONE]"),
        "the running stream was cut"
    );
    let status = gw.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        TcpStream::connect(gw.addr).is_err(),
        "still accepting after shutdown"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let sim = spawn_mock(&[]);
    let gw = gateway_for(sim.addr, "");
    let mut c = Client::connect(gw.addr);
    let mut both = raw_request("POST", "/v1/debug/echo/1", b"one", &[]);
    both.extend(raw_request("POST", "/v1/debug/echo/2", b"two", &[]));
    c.send(&both);
    assert_eq!(c.read_response().json()["body"], "one");
    assert_eq!(c.read_response().json()["body"], "two");
}

/// The read left armed after a response is the next request's read: a request that comes late, or
/// in pieces, is served, and an idle connection is closed at the keep-alive timeout.
#[test]
fn keep_alive_serves_late_split_requests_and_idles_out() {
    let sim = spawn_mock(&[]);
    let gw = gateway_for(sim.addr, "timeouts:\n  keepalive: 400ms\n");
    let mut c = Client::connect(gw.addr);
    c.send(&raw_request("POST", "/v1/debug/echo/1", b"one", &[]));
    assert_eq!(c.read_response().json()["body"], "one");
    std::thread::sleep(Duration::from_millis(150));
    let second = raw_request("POST", "/v1/debug/echo/2", b"two", &[]);
    c.send(&second[..10]);
    std::thread::sleep(Duration::from_millis(50));
    c.send(&second[10..]);
    assert_eq!(c.read_response().json()["body"], "two");
    let idle = Instant::now();
    let mut byte = [0u8; 1];
    assert_eq!(
        c.stream().read(&mut byte).unwrap(),
        0,
        "expected the gateway to close"
    );
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
}

#[test]
fn epoll_driver_relays_streams_and_cancels() {
    let sim = spawn_mock(&[]);
    let gw = gateway_for(sim.addr, "io_driver: epoll\n");
    let r = post_json(gw.addr, "/v1/chat/completions", &chat(true), &[]);
    assert!(r.chunks().1 && r.text().contains("[DONE]"));
    let mut c = Client::connect(gw.addr);
    c.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        chat(true).to_string().as_bytes(),
        &[("x-mock-itl-ms", "50"), ("x-mock-tokens", "200")],
    ));
    let mut buf = [0u8; 1024];
    assert!(c.stream().read(&mut buf).unwrap() > 0);
    drop(c);
    assert!(wait_until(Duration::from_millis(600), || {
        metric(sim.addr, "mock_requests_cancelled_total") >= 1.0
    }));
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn busy_poll_keeps_timers_running_and_goes_idle() {
    let sim = spawn_mock(&[]);
    let gw = gateway_for(
        sim.addr,
        "busy_poll: 20ms\nretry:\n  max_attempts: 1\ntimeouts:\n  first_byte: 200ms\n",
    );
    // Back-to-back requests on one connection keep the worker spinning the whole time (the
    // window is long for the test, so that even a slow debug build never pauses).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let load = {
        let (stop, answered, addr) = (stop.clone(), answered.clone(), gw.addr);
        std::thread::spawn(move || {
            let mut c = Client::connect(addr);
            let raw = raw_request(
                "POST",
                "/v1/chat/completions",
                chat(false).to_string().as_bytes(),
                &[],
            );
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.send(&raw);
                assert_eq!(c.read_response().status, 200);
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let count = || answered.load(std::sync::atomic::Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(30), || count() >= 10));
    // The first-byte timer still fires while the worker spins: the answer is the 504 of the
    // 200 ms deadline, not the backend's 200 after 1.5 s.
    let during = count();
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &chat(false),
        &[("x-mock-delay-ms", "1500")],
    );
    let spun = count() - during;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(spun > 0, "the load stopped while the timer ran");

    // Without activity the spinning stops once the 20 ms window is over: after five of them, an
    // idle second costs next to nothing.
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ticks(gw.child.id());
    std::thread::sleep(Duration::from_secs(1));
    let idle = cpu_ticks(gw.child.id()) - before;
    assert!(idle <= 10, "an idle second took {idle} ticks of CPU");
}
