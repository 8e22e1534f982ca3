//! Static-key auth end to end: the seed README's OpenCode scenario as written, refusals in
//! OpenAI's error shape, and what reaches the backend (never the client's key).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn chat(stream: bool) -> Value {
    json!({"model": "mock-model", "stream": stream,
           "messages": [{"role": "user", "content": "hi"}]})
}

fn temp_db(tag: &str) -> String {
    std::env::temp_dir()
        .join(format!("llmproxy-auth-{tag}-{}.db", std::process::id()))
        .display()
        .to_string()
}

/// The seed README's OpenCode config, verbatim (the tests change the backend address and
/// add `listen`).
const OPENCODE: &str = include_str!("../config/seed-opencode.yaml");

fn opencode(backend: SocketAddr, extra_ip: bool) -> String {
    let mut c = format!("listen: \"{{listen}}\"\n{OPENCODE}")
        .replace("http://vllm-coder:8000", &format!("http://{backend}"));
    if extra_ip {
        // Lets the same key in from the test's loopback address.
        c = c.replace(r#"["10.0.0.0/8"]"#, r#"["10.0.0.0/8", "127.0.0.1"]"#);
    }
    c
}

fn assert_error(r: &Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string());
    assert!(v["error"]["param"].is_null());
    assert!(v["error"]["type"].is_string());
}

#[test]
fn opencode_scenario_refuses_missing_unknown_keys_and_foreign_ips() {
    let mock = spawn_mock(&[]);
    let gw = spawn_gateway(&opencode(mock.addr, false));
    let path = "/v1/chat/completions";

    let r = post_json(gw.addr, path, &chat(false), &[]);
    assert_error(&r, 401, "invalid_api_key");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = post_json(
        gw.addr,
        path,
        &chat(false),
        &[("Authorization", "Bearer sk-wrong")],
    );
    assert_error(&r, 401, "invalid_api_key");
    // The right key from 127.0.0.1, outside 10.0.0.0/8.
    for header in [
        ("Authorization", "Bearer sk-llmproxy-dev-001"),
        ("x-api-key", "sk-llmproxy-dev-001"),
    ] {
        let r = post_json(gw.addr, path, &chat(false), &[header]);
        assert_error(&r, 403, "ip_not_allowed");
    }
    // Health stays open.
    assert_eq!(get(gw.addr, "/health").status, 200);
}

/// Reads from a raw socket until the response head is complete; returns its status.
fn read_status(s: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).expect("read head"),
            1,
            "closed before head"
        );
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Starts a slow stream (`x-mock-itl-ms`) and returns its socket once the head arrived.
fn open_stream(gw: SocketAddr, key: &str) -> (TcpStream, u16) {
    let mut s = TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = format!("Bearer {key}");
    let raw = raw_request(
        "POST",
        "/v1/chat/completions",
        chat(true).to_string().as_bytes(),
        &[
            ("Authorization", &auth),
            ("x-mock-itl-ms", "200"),
            ("x-mock-tokens", "50"),
        ],
    );
    s.write_all(&raw).unwrap();
    let status = read_status(&mut s);
    (s, status)
}

#[test]
fn opencode_concurrency_cap_and_slots_come_back() {
    let mock = spawn_mock(&[]);
    let gw = spawn_gateway(&opencode(mock.addr, true));
    let key = "sk-llmproxy-dev-001";

    let streams: Vec<_> = (0..3).map(|_| open_stream(gw.addr, key)).collect();
    assert!(streams.iter().all(|(_, s)| *s == 200));
    let auth = format!("Bearer {key}");
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &chat(true),
        &[("Authorization", &auth)],
    );
    assert_error(&r, 429, "rate_limit_exceeded");
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("60"));

    // Client cancels: the three slots come back.
    drop(streams);
    assert!(wait_until(Duration::from_secs(5), || {
        post_json(
            gw.addr,
            "/v1/chat/completions",
            &chat(false),
            &[("Authorization", &auth)],
        )
        .status
            == 200
    }));

    // Backend errors (before and in the middle of the response) give their slots back too.
    // Two of each: five failures in a row would eject the only backend (passive health).
    for h in [("x-mock-status", "500"), ("x-mock-cut-after", "2")] {
        for _ in 0..2 {
            let mut c = Client::connect(gw.addr);
            c.send(&raw_request(
                "POST",
                "/v1/chat/completions",
                chat(true).to_string().as_bytes(),
                &[("Authorization", &auth), h],
            ));
            let _ = c.read_response();
        }
    }
    let streams: Vec<_> = (0..3).map(|_| open_stream(gw.addr, key)).collect();
    let statuses: Vec<u16> = streams.iter().map(|(_, s)| *s).collect();
    assert_eq!(statuses, [200, 200, 200], "slots leaked");
}

#[test]
fn opencode_requests_per_minute_with_openai_headers() {
    let mock = spawn_mock(&[]);
    let gw = spawn_gateway(&opencode(mock.addr, true));
    let auth = "Bearer sk-llmproxy-dev-001";
    let mut c = Client::connect(gw.addr);
    let body = chat(false).to_string();
    for i in 0..60 {
        c.send(&raw_request(
            "POST",
            "/v1/chat/completions",
            body.as_bytes(),
            &[("Authorization", auth)],
        ));
        let r = c.read_response();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("60"));
        let remaining: u64 = r
            .header("x-ratelimit-remaining-requests")
            .unwrap()
            .parse()
            .unwrap();
        assert!(remaining <= 59 - i);
        assert!(r.header("x-ratelimit-reset-requests").is_some());
    }
    c.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[("Authorization", auth)],
    ));
    let r = c.read_response();
    assert_error(&r, 429, "rate_limit_exceeded");
    assert_eq!(r.json()["error"]["type"], "requests");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
}

#[test]
fn key_states_models_and_custom_status_codes() {
    let mock = spawn_mock(&[]);
    let config = format!(
        r#"
listen: "{{listen}}"
backends: [{{url: "http://{}"}}]
auth:
  quota_path: "{}"
  header_names: ["X-Gateway-Key"]
  status_codes:
    disabled: {{status: 402, message: "Pay up."}}
api_keys:
  - {{key: "k-ok", allowed_models: ["mock-model"], allowed_ips: ["127.0.0.0/8", "::1/128"]}}
  - {{key: "k-off", status: 1}}
  - {{key: "k-old", expires_at: 1000}}
  - {{key: "k-spent", status: "quota_exceeded"}}
"#,
        mock.addr,
        temp_db("states")
    );
    let gw = spawn_gateway(&config);
    let path = "/v1/chat/completions";
    let send = |key: &str, body: &Value| post_json(gw.addr, path, body, &[("x-gateway-key", key)]);
    assert_eq!(send("k-ok", &chat(false)).status, 200);
    // Only the configured header counts.
    let r = post_json(
        gw.addr,
        path,
        &chat(false),
        &[("Authorization", "Bearer k-ok")],
    );
    assert_error(&r, 401, "invalid_api_key");
    let r = send("k-off", &chat(false));
    assert_error(&r, 402, "api_key_disabled");
    assert_eq!(r.json()["error"]["message"], "Pay up.");
    assert_error(&send("k-old", &chat(false)), 401, "invalid_api_key");
    let r = send("k-spent", &chat(false));
    assert_error(&r, 429, "insufficient_quota");
    assert_eq!(r.json()["error"]["type"], "insufficient_quota");
    let other = json!({"model": "other-model", "messages": []});
    assert_error(&send("k-ok", &other), 403, "model_not_allowed");
    // The connection survives a refusal after the body was read.
    let mut c = Client::connect(gw.addr);
    for (body, status) in [
        (&other, 403),
        (&chat(false), 200),
        (&other, 403),
        (&chat(false), 200),
    ] {
        c.send(&raw_request(
            "POST",
            path,
            body.to_string().as_bytes(),
            &[("X-Gateway-Key", "k-ok")],
        ));
        assert_eq!(c.read_response().status, status);
    }
    // Refused before the body (unknown key): the body is still consumed, the connection kept.
    for (key, status) in [("nope", 401), ("k-ok", 200), ("k-off", 402), ("k-ok", 200)] {
        c.send(&raw_request(
            "POST",
            path,
            chat(false).to_string().as_bytes(),
            &[("X-Gateway-Key", key)],
        ));
        assert_eq!(c.read_response().status, status);
    }
}

/// A one-shot backend that records the request head it gets.
fn capture_backend() -> (SocketAddr, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).into_owned();
            let body = r#"{"object":"list","data":[]}"#;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = tx.send(head);
        }
    });
    (addr, rx)
}

#[test]
fn client_key_never_reaches_the_backend_and_backend_key_does() {
    for backend_key in [None, Some("sk-backend-secret")] {
        let (backend, heads) = capture_backend();
        let key_line = backend_key.map_or(String::new(), |k| format!(", api_key: \"{k}\""));
        let config = format!(
            "listen: \"{{listen}}\"\nbackends: [{{url: \"http://{backend}\"{key_line}}}]\n\
             auth: {{quota_path: \"{}\", header_names: [Authorization, X-API-Key, X-Team-Key]}}\n\
             api_keys: [{{key: sk-client}}]\n",
            temp_db("hygiene")
        );
        let gw = spawn_gateway(&config);
        let r = request(
            gw.addr,
            &raw_request(
                "GET",
                "/v1/models",
                b"",
                &[
                    ("Authorization", "Bearer sk-client"),
                    ("X-API-Key", "sk-client"),
                    ("X-Team-Key", "sk-client"),
                    ("X-Other", "kept"),
                ],
            ),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let head = heads.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(!head.contains("sk-client"), "client key forwarded: {head}");
        assert!(head.contains("X-Other: kept"), "{head}");
        match backend_key {
            Some(k) => assert!(
                head.contains(&format!("Authorization: Bearer {k}\r\n")),
                "{head}"
            ),
            None => assert!(
                !head.to_ascii_lowercase().contains("authorization"),
                "{head}"
            ),
        }
    }
}

#[test]
fn auth_off_needs_no_key_and_sends_no_rate_headers() {
    let mock = spawn_mock(&[]);
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nbackends: [{{url: \"http://{}\"}}]\nauth: {{enabled: false}}\n",
        mock.addr
    ));
    let r = post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]);
    assert_eq!(r.status, 200);
    assert!(r.header("x-ratelimit-limit-requests").is_none());
}
