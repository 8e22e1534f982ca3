//! `scheduling`: the order in which waiting requests get a freed slot. Strict priority bands
//! first (the key's `priority`, or the header up to its `max_priority`), then within a band the
//! key that has received the fewest tokens (Virtual Token Counter). One worker, so the access
//! log's order is the order in which slots were granted (a request is logged before its slot is
//! handed on). Orders are asserted, never timings.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use serde_json::json;

const KEYS: &str = "api_keys:
  - {key: sk-hold-00000001, name: hold}
  - {key: sk-low-000000001, name: low}
  - {key: sk-vip-000000001, name: vip, max_priority: 5}
  - {key: sk-shed-00000001, name: shed, priority: -1}
  - {key: sk-big-000000001, name: big}
  - {key: sk-small-0000001, name: small}
";

fn gateway(mock: SocketAddr, log: &Path) -> Proc {
    spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 1\nbackends:\n  - url: \"http://{mock}\"\n    max_in_flight: 1\n\
         scheduling:\n  enabled: true\n  queue_timeout: 120s\n  saturation: {{waiting_requests: 0, kv_cache: 0}}\n\
         log:\n  format: json\n  access_path: \"{}\"\n  flush_interval: 50ms\n\
         auth:\n  quota_path: \"{}\"\n{KEYS}",
        log.display(),
        unique_path("sched-order-quota").display()
    ))
}

fn log_path() -> PathBuf {
    unique_path("sched-order-access").with_extension("log")
}

/// Takes the one slot with a long stream, until the returned connection is dropped.
fn hold(addr: SocketAddr) -> TcpStream {
    let body = json!({"model": "mock-model", "stream": true, "messages": [{"role": "user", "content": "hold"}]});
    let raw = raw_request(
        "POST",
        "/v1/chat/completions",
        body.to_string().as_bytes(),
        &[
            ("x-mock-itl-ms", "100"),
            ("x-mock-tokens", "1000"),
            ("Authorization", "Bearer sk-hold-00000001"),
            ("X-Request-Id", "hold"),
        ],
    );
    open_stream(addr, &raw)
}

/// Sends a request in the background once the queue holds `before` requests, and returns when
/// it is queued too, so arrivals are in a known order.
fn enqueue(
    addr: SocketAddr,
    id: &str,
    key: &str,
    priority: Option<&str>,
    content: usize,
    before: usize,
) -> JoinHandle<Response> {
    let (id, key, priority) = (id.to_owned(), key.to_owned(), priority.map(str::to_owned));
    let handle = std::thread::spawn(move || {
        let body = json!({"model": "mock-model", "max_tokens": 1,
            "messages": [{"role": "user", "content": "x".repeat(content)}]});
        let auth = format!("Bearer {key}");
        let mut headers = vec![
            ("Authorization", auth.as_str()),
            ("X-Request-Id", id.as_str()),
        ];
        if let Some(p) = &priority {
            headers.push(("X-LLMProxy-Priority", p));
        }
        post_json(addr, "/v1/chat/completions", &body, &headers)
    });
    assert!(
        wait_until(
            Duration::from_secs(30),
            || metric(addr, "llmproxy_queue_depth") as usize == before + 1
        ),
        "request {before} never queued"
    );
    handle
}

#[test]
fn higher_priority_bands_go_first_and_the_header_is_capped_by_the_key() {
    let mock = spawn_mock(&[]);
    let log = log_path();
    let gw = gateway(mock.addr, &log);
    let held = hold(gw.addr);
    let waiting = vec![
        enqueue(gw.addr, "shed-1", "sk-shed-00000001", None, 8, 0),
        enqueue(gw.addr, "low-1", "sk-low-000000001", None, 8, 1),
        // Asks for 9; the key may not go above its priority (0).
        enqueue(gw.addr, "low-2", "sk-low-000000001", Some("9"), 8, 2),
        // May go up to 5.
        enqueue(gw.addr, "vip-1", "sk-vip-000000001", Some("5"), 8, 3),
    ];
    drop(held);
    for w in waiting {
        assert_eq!(w.join().unwrap().status, 200);
    }
    assert_eq!(
        logged_request_ids(&log, 5),
        ["hold", "vip-1", "low-1", "low-2", "shed-1"]
    );
}

#[test]
fn within_a_band_a_key_gets_its_share_of_tokens_not_of_arrivals() {
    let mock = spawn_mock(&[]);
    let log = log_path();
    let gw = gateway(mock.addr, &log);
    let held = hold(gw.addr);
    // Six big requests (~3x the prompt tokens) queue before six small ones. First come first
    // served would run every big one first; by tokens the small key gets about three turns for
    // each of the big key's.
    let mut waiting = Vec::new();
    for i in 0..6 {
        waiting.push(enqueue(
            gw.addr,
            &format!("big-{i}"),
            "sk-big-000000001",
            None,
            1200,
            i,
        ));
    }
    for i in 0..6 {
        waiting.push(enqueue(
            gw.addr,
            &format!("small-{i}"),
            "sk-small-0000001",
            None,
            400,
            6 + i,
        ));
    }
    drop(held);
    for w in waiting {
        assert_eq!(w.join().unwrap().status, 200);
    }
    let order = logged_request_ids(&log, 13);
    assert_eq!(order[0], "hold");
    let first8 = &order[1..9];
    let small = first8.iter().filter(|id| id.starts_with("small")).count();
    assert!(
        (5..=7).contains(&small),
        "small got {small} of the first 8 slots: {order:?}"
    );
    // The tokens served per key reach the metrics (from the usage records), by key name.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let text = get(gw.addr, "/metrics").text();
            ["big", "small"]
                .iter()
                .all(|k| text.contains(&format!("llmproxy_key_tokens_total{{key=\"{k}\"}} ")))
        }),
        "{}",
        get(gw.addr, "/metrics").text()
    );
    // Each key's own requests keep their arrival order.
    for key in ["big", "small"] {
        let mine: Vec<&String> = order.iter().filter(|id| id.starts_with(key)).collect();
        let expected: Vec<String> = (0..6).map(|i| format!("{key}-{i}")).collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>());
    }
}

#[test]
fn a_streamed_answer_counts_against_its_key_as_it_is_relayed() {
    let mock = spawn_mock(&[]);
    let log = log_path();
    let gw = gateway(mock.addr, &log);
    // The big key has been served a 100-token prompt.
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &json!({"model": "mock-model", "max_tokens": 1,
            "messages": [{"role": "user", "content": "x".repeat(400)}]}),
        &[
            ("Authorization", "Bearer sk-big-000000001"),
            ("X-Request-Id", "big-0"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The hold key's stream takes the slot, and 150 of its tokens reach the client: charged at
    // completion_weight 2, they put its key past the big one while the stream still runs.
    let body = json!({"model": "mock-model", "stream": true,
        "messages": [{"role": "user", "content": "hold"}]});
    let mut held = open_stream(
        gw.addr,
        &raw_request(
            "POST",
            "/v1/chat/completions",
            body.to_string().as_bytes(),
            &[
                ("x-mock-itl-ms", "5"),
                ("x-mock-tokens", "100000"),
                ("Authorization", "Bearer sk-hold-00000001"),
                ("X-Request-Id", "hold"),
            ],
        ),
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while memchr::memmem::find_iter(&seen, b"data: ").count() < 150 {
        let n = held.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    let waiting = vec![
        enqueue(gw.addr, "hold-2", "sk-hold-00000001", None, 8, 0),
        enqueue(gw.addr, "big-1", "sk-big-000000001", None, 8, 1),
    ];
    drop(held);
    for w in waiting {
        assert_eq!(w.join().unwrap().status, 200);
    }
    // Counted only when its record is read, the stream would leave the hold key at its
    // prompt's estimate, below the big key: hold-2 would go first.
    assert_eq!(
        logged_request_ids(&log, 4),
        ["big-0", "hold", "big-1", "hold-2"]
    );
}

#[test]
fn the_priority_header_is_read_by_the_gateway_and_not_sent_upstream() {
    // An upstream that records the head it gets and answers once.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = upstream.local_addr().unwrap();
    let seen = std::thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while memchr::memmem::find(&got, b"\r\n\r\n").is_none() {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the request ended before its head");
            got.extend_from_slice(&buf[..n]);
        }
        let body = r#"{"id":"x","object":"chat.completion","model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        std::io::Write::write_all(&mut s, answer.as_bytes()).unwrap();
        String::from_utf8_lossy(&got).to_lowercase()
    });
    let gw = gateway(addr, &log_path());
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &json!({"model": "mock-model", "messages": [{"role": "user", "content": "x"}]}),
        &[
            ("Authorization", "Bearer sk-vip-000000001"),
            ("X-LLMProxy-Priority", "5"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let head = seen.join().unwrap();
    assert!(head.contains("x-forwarded-for: "), "{head}");
    assert!(!head.contains("x-llmproxy-priority"), "{head}");
}
