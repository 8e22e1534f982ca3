//! Usage records through the real gateway and simulator: exact tokens for streams (with and
//! without the client asking for usage) and non-streams, cached and reasoning tokens, estimated
//! and cancelled records, and client-visible bytes equal to what the backend sends directly.

mod common;
#[path = "support/usage.rs"]
mod usage;

use std::io::Read;
use std::time::Duration;

use common::{post_json, raw_request, spawn_gateway, spawn_mock, sse_events, wait_until, Client};
use llmproxy::usage::UsageRecord;
use serde_json::{json, Value};
use usage::{gateway_yaml, spool_records, temp_dir};

fn chat(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": "Tell me about metering, please"}],
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// The record of the request sent with this X-Request-Id, once spooled.
fn record_for(spool: &std::path::Path, request_id: &str) -> UsageRecord {
    let mut found = None;
    let ok = wait_until(Duration::from_secs(10), || {
        found = spool_records(spool)
            .into_iter()
            .find(|r| r.client_request_id.as_deref() == Some(request_id));
        found.is_some()
    });
    assert!(ok, "no usage record for {request_id}");
    found.unwrap()
}

/// SSE payloads with the per-response fields (id, created) removed.
fn normalized_events(body: &[u8]) -> Vec<Value> {
    sse_events(body)
        .into_iter()
        .map(|e| match serde_json::from_str::<Value>(&e) {
            Ok(mut v) => {
                if let Some(o) = v.as_object_mut() {
                    o.remove("id");
                    o.remove("created");
                }
                v
            }
            Err(_) => Value::String(e),
        })
        .collect()
}

fn usage_of_events(body: &[u8]) -> Value {
    let events = normalized_events(body);
    let last = events
        .iter()
        .rev()
        .find(|e| e.get("usage").is_some_and(|u| u.is_object()))
        .expect("a usage event");
    last["usage"].clone()
}

fn assert_tokens(record: &UsageRecord, usage: &Value) {
    assert_eq!(
        record.prompt_tokens,
        usage["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        record.completion_tokens,
        usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(record.total_tokens, usage["total_tokens"].as_u64().unwrap());
    assert!(!record.usage_estimated);
}

#[test]
fn streams_are_metered_exactly_and_relayed_unchanged() {
    let mock = spawn_mock(&["--tokens", "12"]);
    let dir = temp_dir("stream");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &spool, " []"));
    let path = "/v1/chat/completions";

    // The client did not ask for usage: the gateway asks, meters it and strips it.
    let direct = post_json(mock.addr, path, &chat(true, false), &[]);
    let via = post_json(
        gw.addr,
        path,
        &chat(true, false),
        &[("X-Request-Id", "s-plain")],
    );
    assert_eq!(via.status, 200);
    assert_eq!(
        normalized_events(&via.body),
        normalized_events(&direct.body)
    );
    assert!(!via.text().contains("\"usage\":{"), "{}", via.text());
    let reference = post_json(mock.addr, path, &chat(true, true), &[]);
    let record = record_for(&spool, "s-plain");
    assert_tokens(&record, &usage_of_events(&reference.body));
    assert_eq!(record.completion_tokens, 12);
    assert!(record.is_stream);
    assert_eq!(record.status, "ok");
    assert_eq!(record.status_code, 200);
    assert_eq!(record.endpoint, path);
    assert_eq!(record.model.as_deref(), Some("mock-model"));
    assert_eq!(record.backend_url, format!("http://{}", mock.addr));
    assert!(record.ttft_ms.is_some());
    assert!(record.timestamp.ends_with('Z') && record.timestamp.contains('T'));

    // The client asked: it gets the usage event untouched, and the record matches it.
    let direct = post_json(mock.addr, path, &chat(true, true), &[]);
    let via = post_json(
        gw.addr,
        path,
        &chat(true, true),
        &[("X-Request-Id", "s-usage")],
    );
    assert_eq!(
        normalized_events(&via.body),
        normalized_events(&direct.body)
    );
    let record = record_for(&spool, "s-usage");
    assert_tokens(&record, &usage_of_events(&via.body));

    // Completions endpoint too.
    let body = json!({"model": "mock-model", "prompt": "Once upon a time", "stream": true});
    let direct = post_json(mock.addr, "/v1/completions", &body, &[]);
    let via = post_json(
        gw.addr,
        "/v1/completions",
        &body,
        &[("X-Request-Id", "s-compl")],
    );
    assert_eq!(
        normalized_events(&via.body),
        normalized_events(&direct.body)
    );
    let record = record_for(&spool, "s-compl");
    assert_eq!(record.completion_tokens, 12);
    assert!(!record.usage_estimated);
    drop(gw);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn non_stream_records_carry_cached_and_reasoning_tokens() {
    let mock = spawn_mock(&["--tokens", "9"]);
    let dir = temp_dir("nonstream");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &spool, " []"));
    let path = "/v1/chat/completions";

    let knobs = [
        ("x-mock-cached-tokens", "5"),
        ("x-mock-reasoning-tokens", "3"),
    ];
    let mut headers = vec![("X-Request-Id", "n-3")];
    headers.extend(knobs);
    let r = post_json(gw.addr, path, &chat(true, false), &headers);
    assert!(!r.text().contains("cached_tokens"), "{}", r.text());
    let record = record_for(&spool, "n-3");
    assert_eq!((record.cached_tokens, record.reasoning_tokens), (5, 3));
    assert_eq!(record.completion_tokens, 9);
    let r = post_json(
        gw.addr,
        path,
        &chat(false, false),
        &[("X-Request-Id", "n-1")],
    );
    assert_eq!(r.status, 200);
    let record = record_for(&spool, "n-1");
    assert_tokens(&record, &r.json()["usage"]);
    assert!(!record.is_stream);
    assert_eq!((record.cached_tokens, record.reasoning_tokens), (0, 0));

    let mut headers = vec![("X-Request-Id", "n-2")];
    headers.extend(knobs);
    let r = post_json(gw.addr, path, &chat(false, false), &headers);
    let record = record_for(&spool, "n-2");
    assert_tokens(&record, &r.json()["usage"]);
    assert_eq!((record.cached_tokens, record.reasoning_tokens), (5, 3));

    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cancelled_stream_bills_what_was_relayed() {
    let mock = spawn_mock(&["--tokens", "200", "--itl-ms", "50"]);
    let dir = temp_dir("cancel");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &spool, " []"));
    let body = chat(true, false).to_string();
    let mut client = Client::connect(gw.addr);
    client.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[("X-Request-Id", "c-1")],
    ));
    // Read some events, then hang up.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(6).filter(|w| w == b"data: ").count() < 5 {
        let n = client.stream().read(&mut buf).expect("read stream");
        assert!(n > 0, "stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    drop(client);
    let record = record_for(&spool, "c-1");
    assert_eq!(record.status, "cancelled");
    assert!(record.usage_estimated);
    assert!(
        record.completion_tokens >= 4 && record.completion_tokens < 200,
        "{record:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_client_gone_before_the_answer_is_recorded_as_499() {
    let mock = spawn_mock(&[]);
    let dir = temp_dir("early-cancel");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &spool, " []"));
    let body = chat(false, false).to_string();
    let mut client = Client::connect(gw.addr);
    client.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[("X-Request-Id", "early-1"), ("x-mock-ttft-ms", "3000")],
    ));
    assert!(wait_until(Duration::from_secs(5), || common::metric(
        mock.addr,
        "vllm:num_requests_running"
    ) == 1.0));
    drop(client);
    let record = record_for(&spool, "early-1");
    assert_eq!(
        (record.status.as_str(), record.status_code),
        ("cancelled", 499)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// An upstream that streams three content events and never any usage, whatever it is asked.
const NO_USAGE_UPSTREAM: &str = r#"
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for word in ["one", "two", "three"]:
            ev = ('data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % word).encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
        ev = b"data: [DONE]\n\n"
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(ev), ev))
    def log_message(self, *a): pass
s = HTTPServer(("127.0.0.1", 0), H)
print("ready %s:%d" % s.server_address, flush=True)
s.serve_forever()
"#;

#[test]
fn missing_usage_is_estimated() {
    let mut python = std::process::Command::new("python3");
    python.args(["-c", NO_USAGE_UPSTREAM]);
    let upstream = common::spawn_reporting(python);
    let dir = temp_dir("estimate");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_yaml(upstream.addr, &spool, " []"));
    let body = chat(true, false);
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &body,
        &[("X-Request-Id", "e-1")],
    );
    assert_eq!(sse_events(&r.body).len(), 4);
    let record = record_for(&spool, "e-1");
    assert!(record.usage_estimated);
    assert_eq!(record.completion_tokens, 3);
    // The gateway added `stream_options` upstream; the estimate uses the body it sent.
    let sent = body.to_string().len() as u64;
    assert!(
        (sent / 4..=sent / 4 + 15).contains(&record.prompt_tokens),
        "{record:?}"
    );
    assert_eq!(
        record.total_tokens,
        record.prompt_tokens + record.completion_tokens
    );
    drop(gw);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn oversized_body_is_metered_from_its_tail() {
    let mock = spawn_mock(&[]);
    let dir = temp_dir("big");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &spool, " []"));
    // Past the meter's 1 MiB body copy: only the tail is kept, and usage is read from it.
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &chat(false, false),
        &[
            ("X-Request-Id", "big-1"),
            ("x-mock-tokens", "300000"),
            ("x-mock-cached-tokens", "11"),
        ],
    );
    assert!(r.body.len() > 1 << 20, "{}", r.body.len());
    let record = record_for(&spool, "big-1");
    assert_tokens(&record, &r.json()["usage"]);
    assert_eq!(
        (record.completion_tokens, record.cached_tokens),
        (300_000, 11)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// What [`cutting_upstream`] generates: five tokens, 20 characters.
const CUT_TOKENS: [&str; 5] = ["Hello", " world", ",", " how", " are"];

/// The events [`cutting_upstream`] streams with line ending `eol`: vLLM's role-only first chunk,
/// five content tokens, the finish chunk, the usage-only chunk when `usage`, and `[DONE]`.
fn cut_stream_events(eol: &str, usage: bool) -> Vec<String> {
    let mut events = vec![
        r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#.to_string(),
    ];
    for word in CUT_TOKENS {
        events.push(format!(
            r#"data: {{"choices":[{{"index":0,"delta":{{"content":"{word}"}}}}]}}"#
        ));
    }
    events.push(r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#.into());
    if usage {
        events.push(
            r#"data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}}"#
                .into(),
        );
    }
    events.push("data: [DONE]".into());
    events
        .into_iter()
        .map(|e| format!("{e}{eol}{eol}"))
        .collect()
}

/// A chunked SSE upstream on a real socket that cuts every event the way the request's `x-cut`
/// header says (`back-N`: all but the last N bytes, then those; `pieces-N`: N bytes at a time)
/// and sends each piece as its own chunk in its own write, so the gateway's meter sees the cuts
/// whatever TCP coalesces. `x-eol` picks the line ending (`crlf`, `lf`, `cr`); usage is sent
/// when the request asks for it, unless `x-no-usage` is set. A request that does not stream gets
/// the same tokens as one JSON completion without usage.
fn cutting_upstream() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};

    fn serve(conn: TcpStream) -> std::io::Result<()> {
        conn.set_nodelay(true)?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut w = conn;
        loop {
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                let line = line.trim_end().to_ascii_lowercase();
                if line.is_empty() {
                    break;
                }
                headers.push(line);
            }
            let header = |name: &str| {
                headers
                    .iter()
                    .find_map(|h| h.strip_prefix(name)?.strip_prefix(':'))
                    .map(|v| v.trim().to_string())
            };
            let mut body = vec![0; header("content-length").map_or(0, |v| v.parse().unwrap())];
            reader.read_exact(&mut body)?;
            if !headers[0].starts_with("post") {
                w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")?;
                continue;
            }
            let request: Value = serde_json::from_slice(&body).unwrap();
            if request["stream"] != json!(true) {
                let body = json!({"choices": [{"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": CUT_TOKENS.concat()}}]})
                .to_string();
                w.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )?;
                continue;
            }
            let usage = request["stream_options"]["include_usage"] == json!(true)
                && header("x-no-usage").is_none();
            let eol = match header("x-eol").as_deref() {
                Some("crlf") => "\r\n",
                Some("cr") => "\r",
                _ => "\n",
            };
            let cut = header("x-cut").unwrap_or_default();
            let (how, n) = cut.split_once('-').unwrap();
            let n: usize = n.parse().unwrap();
            w.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            )?;
            for event in cut_stream_events(eol, usage) {
                let event = event.as_bytes();
                let pieces: Vec<&[u8]> = match how {
                    "back" => {
                        let (a, b) = event.split_at(event.len() - n);
                        vec![a, b]
                    }
                    _ => event.chunks(n).collect(),
                };
                for piece in pieces {
                    w.write_all(format!("{:x}\r\n", piece.len()).as_bytes())?;
                    w.write_all(piece)?;
                    w.write_all(b"\r\n")?;
                    w.flush()?;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            w.write_all(b"0\r\n\r\n")?;
        }
    }

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve(conn));
        }
    });
    addr
}

#[test]
fn events_cut_anywhere_with_any_line_ending_are_metered_and_stripped_exactly() {
    let upstream = cutting_upstream();
    let dir = temp_dir("cuts");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_yaml(upstream, &spool, " []"));
    for (eol_name, eol) in [("crlf", "\r\n"), ("lf", "\n"), ("cr", "\r")] {
        for cut in ["back-1", "back-2", "back-3", "back-4", "pieces-3"] {
            for asked in [false, true] {
                let id = format!("cut-{eol_name}-{cut}-{asked}");
                let r = post_json(
                    gw.addr,
                    "/v1/chat/completions",
                    &chat(true, asked),
                    &[("X-Request-Id", &id), ("x-eol", eol_name), ("x-cut", cut)],
                );
                assert_eq!(r.status, 200, "{id}");
                // Stripped or not, the client gets the backend's bytes: every event, [DONE] last.
                let expected = cut_stream_events(eol, asked).concat();
                assert_eq!(r.text(), expected, "{id}");
                let record = record_for(&spool, &id);
                assert!(!record.usage_estimated, "{id}: {record:?}");
                assert_eq!(
                    (record.prompt_tokens, record.completion_tokens),
                    (11, 5),
                    "{id}"
                );
            }
        }
    }
    drop(gw);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn estimates_count_only_generated_output() {
    let upstream = cutting_upstream();
    let dir = temp_dir("cut-estimate");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_yaml(upstream, &spool, " []"));
    for (eol_name, eol) in [("crlf", "\r\n"), ("lf", "\n"), ("cr", "\r")] {
        for cut in ["back-2", "pieces-3"] {
            let id = format!("est-{eol_name}-{cut}");
            let r = post_json(
                gw.addr,
                "/v1/chat/completions",
                &chat(true, false),
                &[
                    ("X-Request-Id", &id),
                    ("x-eol", eol_name),
                    ("x-cut", cut),
                    ("x-no-usage", "1"),
                ],
            );
            assert_eq!(r.text(), cut_stream_events(eol, false).concat(), "{id}");
            let record = record_for(&spool, &id);
            assert!(record.usage_estimated, "{id}");
            // Five tokens; the role-only first chunk and the finish chunk carry no output.
            assert_eq!(record.completion_tokens, 5, "{id}");
        }
    }
    // Not streamed: the body's 20 output characters / 4.
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &chat(false, false),
        &[("X-Request-Id", "est-json")],
    );
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "Hello world, how are"
    );
    let record = record_for(&spool, "est-json");
    assert!(record.usage_estimated && !record.is_stream);
    assert_eq!(record.completion_tokens, 5);
    drop(gw);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_upstream_error_answer_is_recorded_as_an_error_and_bills_nothing() {
    let mock = spawn_mock(&[]);
    let dir = temp_dir("upstream-error");
    let spool = dir.join("usage.db");
    // No retries on status: every answer below is the backend's, relayed.
    let config = gateway_yaml(mock.addr, &spool, " []") + "retry:\n  on_status: []\n";
    let gw = spawn_gateway(&config);
    for status in ["400", "429", "500", "503"] {
        for stream in [false, true] {
            let id = format!("err-{status}-{stream}");
            let r = post_json(
                gw.addr,
                "/v1/chat/completions",
                &chat(stream, false),
                &[("X-Request-Id", &id), ("x-mock-status", status)],
            );
            assert_eq!(r.status.to_string(), status, "{id}");
            let record = record_for(&spool, &id);
            assert_eq!(record.status, "error", "{id}");
            assert_eq!(record.status_code.to_string(), status, "{id}");
            assert!(!record.usage_estimated, "{id}");
            let tokens = [
                record.prompt_tokens,
                record.completion_tokens,
                record.total_tokens,
            ];
            assert_eq!(tokens, [0; 3], "{id}");
        }
    }
    drop(gw);
    let _ = std::fs::remove_dir_all(dir);
}

/// Messages and Responses, streamed and not, through the gateway: every record exact, named by
/// its api, with the numbers the simulator (vLLM's format) reported to the client.
#[test]
fn messages_and_responses_are_metered_exactly_in_their_own_dialect() {
    let mock = spawn_mock(&["--tokens", "7"]);
    let dir = temp_dir("dialects");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &spool, " []"));
    let text = "Tell me about metering, please"; // 30 chars -> 8 tokens
    let cached = [("x-mock-cached-tokens", "3")];
    for stream in [false, true] {
        let id = format!("messages-{stream}");
        let body = json!({"model": "mock-model", "max_tokens": 100, "stream": stream,
            "messages": [{"role": "user", "content": text}]});
        let r = post_json(gw.addr, "/v1/messages", &body, &[("X-Request-Id", &id)]);
        assert_eq!(r.status, 200, "{}", r.text());
        let record = record_for(&spool, &id);
        let tokens = (
            record.prompt_tokens,
            record.completion_tokens,
            record.total_tokens,
        );
        assert_eq!(tokens, (8, 7, 15), "{id}");
        assert!(!record.usage_estimated, "{id}");
        assert_eq!(
            (record.api.as_str(), record.is_stream),
            ("messages", stream)
        );

        let id = format!("responses-{stream}");
        let body = json!({"model": "mock-model", "input": text, "stream": stream});
        let headers = [cached[0], ("X-Request-Id", &id)];
        let r = post_json(gw.addr, "/v1/responses", &body, &headers);
        assert_eq!(r.status, 200, "{}", r.text());
        let record = record_for(&spool, &id);
        let tokens = (
            record.prompt_tokens,
            record.completion_tokens,
            record.total_tokens,
        );
        assert_eq!((tokens, record.cached_tokens), ((8, 7, 15), 3), "{id}");
        assert!(!record.usage_estimated, "{id}");
        assert_eq!(
            (record.api.as_str(), record.is_stream),
            ("responses", stream)
        );
    }
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &chat(false, false),
        &[("X-Request-Id", "chat-api")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(record_for(&spool, "chat-api").api, "chat_completions");
    let _ = std::fs::remove_dir_all(dir);
}
