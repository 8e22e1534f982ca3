//! The usage-only event the gateway asks for is removed whatever framing the backend uses for its
//! event stream (chunked, Content-Length, or until close), and an HTTP/1.0 client never gets a
//! chunked body. The backend is a literal one in this file, so the framing is exactly known.

mod common;
#[path = "support/usage.rs"]
mod usage;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{raw_request, spawn_gateway, sse_events, wait_until, Client};
use serde_json::{json, Value};
use usage::{gateway_yaml, spool_records, temp_dir};

const CONTENT: [&str; 3] = ["Hel", "lo", "!"];
const USAGE: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}"#;

/// vLLM's events for CONTENT; the usage event only when the request asked for it.
fn events(include_usage: bool) -> Vec<String> {
    let mut out: Vec<String> = CONTENT
        .iter()
        .map(|c| {
            format!(
                r#"{{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"content":"{c}"}},"finish_reason":null}}]}}"#
            )
        })
        .collect();
    if include_usage {
        out.push(USAGE.to_string());
    }
    out.push("[DONE]".to_string());
    out
}

/// Answers every request with an SSE stream framed as its `x-framing` header says: `chunked`
/// (one chunk per event), `length` (Content-Length) or `close` (HTTP/1.0 style).
fn spawn_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve(conn));
        }
    });
    addr
}

fn serve(conn: TcpStream) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut framing = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "x-framing" => framing = value.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let asked = String::from_utf8_lossy(&body).contains(r#""include_usage":true"#);
        let payloads: Vec<String> = events(asked)
            .iter()
            .map(|e| format!("data: {e}\n\n"))
            .collect();
        let sse = "content-type: text/event-stream; charset=utf-8";
        match framing.as_str() {
            "chunked" => {
                let mut wire =
                    format!("HTTP/1.1 200 OK\r\n{sse}\r\ntransfer-encoding: chunked\r\n\r\n");
                for p in &payloads {
                    wire.push_str(&format!("{:x}\r\n{p}\r\n", p.len()));
                }
                wire.push_str("0\r\n\r\n");
                let _ = out.write_all(wire.as_bytes());
            }
            "length" => {
                let all = payloads.concat();
                let wire = format!(
                    "HTTP/1.1 200 OK\r\n{sse}\r\ncontent-length: {}\r\n\r\n{all}",
                    all.len()
                );
                let _ = out.write_all(wire.as_bytes());
            }
            _ => {
                let wire = format!("HTTP/1.1 200 OK\r\n{sse}\r\nconnection: close\r\n\r\n");
                let _ = out.write_all(wire.as_bytes());
                for p in &payloads {
                    let _ = out.write_all(p.as_bytes());
                    std::thread::sleep(Duration::from_millis(5));
                }
                return;
            }
        }
    }
}

fn stream_request(framing: &str) -> Vec<u8> {
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true})
            .to_string();
    raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[("x-framing", framing), ("x-request-id", framing)],
    )
}

#[test]
fn injected_usage_is_removed_from_every_framing() {
    let backend = spawn_backend();
    let dir = temp_dir("framing");
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_yaml(backend, &spool, " []"));
    for framing in ["chunked", "length", "close"] {
        let mut client = Client::connect(gw.addr);
        client.send(&stream_request(framing));
        let r = client.read_response();
        assert_eq!(r.status, 200, "{framing}");
        // The client did not ask for usage: it sees exactly what the backend would have sent it.
        assert_eq!(sse_events(&r.body), events(false), "{framing}");
        if framing != "close" {
            assert!(r.chunks().1, "{framing}: the re-framed body ends cleanly");
        }
        let mut record = None;
        assert!(wait_until(Duration::from_secs(10), || {
            record = spool_records(&spool)
                .into_iter()
                .find(|r| r.client_request_id.as_deref() == Some(framing));
            record.is_some()
        }));
        let record = record.unwrap();
        assert_eq!(
            (
                record.prompt_tokens,
                record.completion_tokens,
                record.total_tokens
            ),
            (11, 3, 14),
            "{framing}"
        );
        assert!(!record.usage_estimated, "{framing}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_http10_client_gets_the_stream_unchunked() {
    let backend = spawn_backend();
    let dir = temp_dir("http10");
    // Metering on: a client that does not ask for usage gets the stream re-framed without it.
    let gw = spawn_gateway(&gateway_yaml(backend, &dir.join("usage.db"), " []"));
    for (framing, asked) in ["chunked", "length", "close"]
        .into_iter()
        .flat_map(|f| [(f, true), (f, false)])
    {
        let mut body = json!({"model": "m", "messages": [], "stream": true});
        if asked {
            body["stream_options"] = json!({"include_usage": true});
        }
        let body = body.to_string();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nx-framing: {framing}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut conn = TcpStream::connect(gw.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.write_all(head.as_bytes()).unwrap();
        let mut raw = Vec::new();
        // The body ends with the connection (or its length): read_to_end returns either way.
        conn.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
        let case = format!("{framing}, usage asked: {asked}");
        assert!(head.starts_with("HTTP/1.1 200"), "{case}: {head}");
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "{case}: chunked to an HTTP/1.0 client: {head}"
        );
        assert_eq!(sse_events(body.as_bytes()), events(asked), "{case}");
        let parsed: Vec<Value> = sse_events(body.as_bytes())
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect();
        assert_eq!(parsed.len(), 3 + usize::from(asked), "{case}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
