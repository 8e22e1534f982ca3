//! The simulator over real sockets: vLLM's wire format, event framing and the fault knobs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

fn chat(stream: bool, extra: Value) -> Value {
    let mut v = json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": "Hello there, mock!"}], // 18 chars -> 5 tokens
        "stream": stream,
    });
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    v
}

fn events_json(r: &Response) -> (Vec<Value>, Vec<String>) {
    let events = sse_events(&r.body);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "stream ends with [DONE]"
    );
    let parsed = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    (parsed, events)
}

#[test]
fn streamed_chat_has_vllm_shape_and_one_chunk_per_event() {
    let m = spawn_mock(&[]);
    let r = post_json(
        m.addr,
        CHAT,
        &chat(true, json!({})),
        &[("x-mock-tokens", "4")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));

    let (chunks, terminated) = r.chunks();
    assert!(terminated);
    for c in &chunks {
        let text = std::str::from_utf8(c).unwrap();
        assert!(
            text.starts_with("data: ") && text.ends_with("\n\n"),
            "{text:?}"
        );
        assert_eq!(
            text.matches("data: ").count(),
            1,
            "one event per chunk: {text:?}"
        );
    }
    assert_eq!(chunks.last().unwrap(), b"data: [DONE]\n\n");

    let (events, _) = events_json(&r);
    assert_eq!(events.len(), 5, "role + 4 tokens");
    let id = events[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for e in &events {
        assert_eq!(e["id"], id);
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["model"], "mock-model");
        assert!(e["created"].as_u64().unwrap() > 1_600_000_000);
        assert!(e.get("usage").is_none(), "no usage without include_usage");
        assert_eq!(e["choices"][0]["index"], 0);
        assert!(e["choices"][0]["logprobs"].is_null());
    }
    assert_eq!(
        events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = events[1..]
        .iter()
        .map(|e| e["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "hello world this is ");
    assert!(events[3]["choices"][0]["finish_reason"].is_null());
    let last = &events[4]["choices"][0];
    assert_eq!(last["finish_reason"], "stop");
    assert!(last.get("stop_reason").is_some_and(Value::is_null));
}

#[test]
fn include_usage_adds_one_final_usage_chunk() {
    let m = spawn_mock(&[]);
    let body = chat(
        true,
        json!({"max_tokens": 3, "stream_options": {"include_usage": true}}),
    );
    let r = post_json(
        m.addr,
        CHAT,
        &body,
        &[
            ("x-mock-cached-tokens", "2"),
            ("x-mock-reasoning-tokens", "1"),
        ],
    );
    let (events, _) = events_json(&r);
    let (usage_chunk, rest) = events.split_last().unwrap();
    assert!(rest.iter().all(|e| e.get("usage").is_none()));
    assert_eq!(
        rest.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
               "prompt_tokens_details": {"cached_tokens": 2},
               "completion_tokens_details": {"reasoning_tokens": 1}})
    );

    let off = chat(true, json!({"stream_options": {"include_usage": false}}));
    let r = post_json(m.addr, CHAT, &off, &[]);
    assert!(!r.text().contains("usage"));
}

#[test]
fn continuous_usage_rides_every_chunk() {
    let m = spawn_mock(&["--tokens", "3"]);
    let body = chat(
        true,
        json!({"stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
    );
    let (events, _) = events_json(&post_json(m.addr, CHAT, &body, &[]));
    let completions: Vec<u64> = events
        .iter()
        .map(|e| e["usage"]["completion_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(completions, [0, 1, 2, 3, 3]);
    assert!(events.iter().all(|e| e["usage"]["prompt_tokens"] == 5));

    // vLLM only honours continuous_usage_stats together with include_usage.
    let alone = chat(
        true,
        json!({"stream_options": {"continuous_usage_stats": true}}),
    );
    assert!(!post_json(m.addr, CHAT, &alone, &[])
        .text()
        .contains("usage"));
}

#[test]
fn non_stream_always_has_usage_and_finish_reason() {
    let m = spawn_mock(&[]);
    let r = post_json(m.addr, CHAT, &chat(false, json!({})), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.header("content-length").unwrap(),
        r.body.len().to_string()
    );
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21})
    );

    for (extra, n, finish) in [
        (json!({"max_tokens": 5}), 5, "length"),
        (json!({"max_completion_tokens": 2}), 2, "length"),
        (json!({"max_tokens": 100}), 16, "stop"),
    ] {
        let v = post_json(m.addr, CHAT, &chat(false, extra), &[]).json();
        assert_eq!(v["usage"]["completion_tokens"], n);
        assert_eq!(v["choices"][0]["finish_reason"], finish);
        let words = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count();
        assert_eq!(words as u64, n);
    }

    let v = post_json(
        m.addr,
        CHAT,
        &chat(false, json!({})),
        &[("x-mock-cached-tokens", "4")],
    )
    .json();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
}

fn weather_tools() -> Value {
    json!({"tools": [{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                       "required": ["location"]}}}]})
}

#[test]
fn tool_call_deltas_concatenate_to_json_arguments() {
    let m = spawn_mock(&[]);
    let (events, _) = events_json(&post_json(m.addr, CHAT, &chat(true, weather_tools()), &[]));
    let call = &events[1]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(call["index"], 0);
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("chatcmpl-tool-"));
    assert_eq!(
        call["function"],
        json!({"name": "get_weather", "arguments": ""})
    );
    let args: String = events[2..]
        .iter()
        .map(|e| {
            e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert!(events.len() > 3, "arguments arrive in several fragments");
    let args: Value = serde_json::from_str(&args).unwrap();
    assert!(args["location"].is_string());
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    let v = post_json(m.addr, CHAT, &chat(false, weather_tools()), &[]).json();
    let msg = &v["choices"][0]["message"];
    assert!(msg["content"].is_null());
    assert_eq!(msg["tool_calls"][0]["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(
        msg["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(args["location"].is_string());
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");

    let mut none = weather_tools();
    none["tool_choice"] = json!("none");
    let v = post_json(m.addr, CHAT, &chat(false, none), &[]).json();
    assert!(v["choices"][0]["message"]["content"].is_string());
}

#[test]
fn text_completions_stream_and_not() {
    let m = spawn_mock(&[]);
    let body = json!({"model": "mock-model", "prompt": "Say hi", "max_tokens": 2, "stream": true,
                      "stream_options": {"include_usage": true}});
    let (events, _) = events_json(&post_json(m.addr, "/v1/completions", &body, &[]));
    assert_eq!(events.len(), 3, "2 tokens + usage, no role chunk");
    assert!(events[0]["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(events[0]["object"], "text_completion");
    assert_eq!(events[0]["choices"][0]["text"], "hello ");
    assert_eq!(events[1]["choices"][0]["finish_reason"], "length");
    assert_eq!(events[2]["usage"]["completion_tokens"], 2);
    assert_eq!(events[2]["usage"]["prompt_tokens"], 2);

    let body = json!({"model": "mock-model", "prompt": "Say hi"});
    let v = post_json(m.addr, "/v1/completions", &body, &[("x-mock-tokens", "3")]).json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "hello world this ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["total_tokens"], 5);
}

#[test]
fn embeddings_float_and_base64_agree() {
    let m = spawn_mock(&["--embedding-dim", "4"]);
    let float = post_json(
        m.addr,
        "/v1/embeddings",
        &json!({"model": "mock-model", "input": ["abc", "defgh"]}),
        &[],
    )
    .json();
    assert_eq!(float["object"], "list");
    assert_eq!(float["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        float["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0})
    );
    let floats: Vec<f32> = float["data"][1]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(floats.len(), 4);

    let b64 = post_json(
        m.addr,
        "/v1/embeddings",
        &json!({"model": "mock-model", "input": ["abc", "defgh"], "encoding_format": "base64"}),
        &[],
    )
    .json();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][1]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, floats);

    let single = post_json(m.addr, "/v1/embeddings", &json!({"input": "defgh"}), &[]).json();
    assert_eq!(
        single["data"][0]["embedding"], float["data"][1]["embedding"],
        "deterministic"
    );
}

#[test]
fn models_health_and_unknown_model() {
    let m = spawn_mock(&["--model", "a", "--model", "b"]);
    let v = get(m.addr, "/v1/models").json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(v["data"][0]["owned_by"], "vllm");
    assert_eq!(v["data"][0]["max_model_len"], 8192);

    let h = get(m.addr, "/health");
    assert_eq!((h.status, h.body.len()), (200, 0));

    let r = post_json(m.addr, CHAT, &json!({"model": "zzz", "messages": []}), &[]);
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json(),
        json!({"error": {"message": "The model `zzz` does not exist.", "type": "NotFoundError", "param": null, "code": 404}})
    );
    let r = request(m.addr, &raw_request("POST", CHAT, b"{not json", &[]));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "BadRequestError");
}

#[test]
fn status_and_fail_first_knobs() {
    let m = spawn_mock(&["--fail-first", "2", "--fail-status", "503"]);
    let statuses: Vec<u16> = (0..3)
        .map(|_| post_json(m.addr, CHAT, &chat(false, json!({})), &[]).status)
        .collect();
    assert_eq!(statuses, [503, 503, 200]);

    let r = post_json(
        m.addr,
        CHAT,
        &chat(true, json!({})),
        &[("x-mock-status", "429")],
    );
    assert_eq!(r.status, 429);
    let e = r.json();
    assert!(e["error"]["message"].is_string());
    assert_eq!(e["error"]["code"], 429);
}

#[test]
fn cut_after_ends_the_body_without_its_end() {
    let m = spawn_mock(&[]);
    let r = post_json(
        m.addr,
        CHAT,
        &chat(true, json!({})),
        &[("x-mock-cut-after", "2")],
    );
    let (chunks, terminated) = r.chunks();
    assert!(!terminated, "no terminating chunk");
    assert_eq!(chunks.len(), 3, "role + 2 tokens");

    let r = post_json(
        m.addr,
        CHAT,
        &chat(false, json!({})),
        &[("x-mock-cut-after", "0")],
    );
    let announced: usize = r.header("content-length").unwrap().parse().unwrap();
    assert_eq!(r.body.len(), announced / 2);

    let refusing = spawn_refusing();
    let mut s = TcpStream::connect(refusing.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&raw_request("GET", "/v1/models", b"", &[]));
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty());
}

fn spawn_refusing() -> Proc {
    spawn_mock(&["--refuse"])
}

#[test]
fn ttft_delays_the_first_event() {
    let m = spawn_mock(&[]);
    let mut c = Client::connect(m.addr);
    let body = chat(true, json!({})).to_string();
    let start = Instant::now();
    c.send(&raw_request(
        "POST",
        CHAT,
        body.as_bytes(),
        &[("x-mock-ttft-ms", "300")],
    ));
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == b"data: ") {
        let n = c.stream().read(&mut buf).unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "first event after {took:?}"
    );
    assert!(took < Duration::from_secs(3));
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let m = spawn_mock(&[]);
    let before = metric(m.addr, "mock_connections_total");
    let mut c = Client::connect(m.addr);
    for stream in [true, false] {
        let body = chat(stream, json!({})).to_string();
        c.send(&raw_request("POST", CHAT, body.as_bytes(), &[]));
        let r = c.read_response();
        assert_eq!(r.status, 200);
        assert!(r.header("connection").is_none());
    }
    // Chunked request body with Expect: 100-continue on the same connection.
    c.send(b"POST /v1/debug/echo?x=1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n");
    c.send(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.header("x-mock-echo"), Some("1"));
    let v = r.json();
    assert_eq!(
        (
            v["method"].as_str(),
            v["target"].as_str(),
            v["body"].as_str()
        ),
        (Some("POST"), Some("/v1/debug/echo?x=1"), Some("abcde"))
    );
    assert!(v["headers"]
        .as_array()
        .unwrap()
        .contains(&json!(["Host", "t"])));

    c.send(&raw_request(
        "GET",
        "/v1/models",
        b"",
        &[("x-mock-close", "1")],
    ));
    assert_eq!(c.read_response().header("connection"), Some("close"));
    // This scrape's own connection plus the one above.
    assert_eq!(metric(m.addr, "mock_connections_total") - before, 2.0);
}

#[test]
fn client_leaving_mid_stream_is_counted_as_cancelled() {
    let m = spawn_mock(&["--itl-ms", "50", "--tokens", "100"]);
    let mut c = Client::connect(m.addr);
    let body = chat(true, json!({})).to_string();
    c.send(&raw_request("POST", CHAT, body.as_bytes(), &[]));
    let mut buf = [0u8; 1024];
    assert!(c.stream().read(&mut buf).unwrap() > 0);
    assert!(wait_until(Duration::from_secs(2), || metric(
        m.addr,
        "vllm:num_requests_running"
    ) == 1.0));
    drop(c);
    assert!(wait_until(Duration::from_secs(5), || metric(
        m.addr,
        "mock_requests_cancelled_total"
    ) == 1.0));
    assert_eq!(metric(m.addr, "vllm:num_requests_running"), 0.0);
    assert_eq!(metric(m.addr, "mock_streams_completed_total"), 0.0);

    // A non-streamed generation notices too, while it is still "generating".
    let mut c = Client::connect(m.addr);
    let body = chat(false, json!({})).to_string();
    c.send(&raw_request(
        "POST",
        CHAT,
        body.as_bytes(),
        &[("x-mock-ttft-ms", "2000")],
    ));
    assert!(wait_until(Duration::from_secs(2), || metric(
        m.addr,
        "vllm:num_requests_running"
    ) == 1.0));
    drop(c);
    assert!(wait_until(Duration::from_secs(1), || metric(
        m.addr,
        "mock_requests_cancelled_total"
    ) == 2.0));
}

#[test]
fn stream_after_a_non_stream_response_on_one_connection_starts_clean() {
    let sim = spawn_mock(&["--tokens", "3"]);
    let mut c = Client::connect(sim.addr);
    let body = |stream: bool| {
        json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream}).to_string()
    };
    c.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        body(false).as_bytes(),
        &[],
    ));
    assert_eq!(c.read_response().status, 200);
    c.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        body(true).as_bytes(),
        &[],
    ));
    let events = sse_events(&c.read_response().body);
    let first: serde_json::Value = serde_json::from_str(&events[0]).expect("first event is JSON");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
}

/// The `event:` name and the JSON of each chunk of a named-event stream (one event per chunk).
fn named_chunks(r: &Response) -> (Vec<(String, Value)>, bool) {
    let (chunks, terminated) = r.chunks();
    let events = chunks
        .iter()
        .map(|c| {
            let text = std::str::from_utf8(c).unwrap();
            let rest = text.strip_prefix("event: ").expect(text);
            let (name, data) = rest.split_once("\ndata: ").expect(text);
            assert_eq!(
                data.matches("\n\n").count(),
                1,
                "one event per chunk: {text:?}"
            );
            let json: Value = serde_json::from_str(data.strip_suffix("\n\n").expect(text)).unwrap();
            assert_eq!(json["type"], name, "{text}");
            (name.to_string(), json)
        })
        .collect();
    (events, terminated)
}

fn messages(stream: bool, max_tokens: u64) -> Value {
    json!({"model": "mock-model", "max_tokens": max_tokens, "stream": stream,
        "messages": [{"role": "user", "content": "Hello there, mock!"}]}) // 5 tokens
}

#[test]
fn messages_stream_and_json_have_vllm_shape_and_usage() {
    let m = spawn_mock(&[]);
    let r = post_json(
        m.addr,
        "/v1/messages",
        &messages(true, 100),
        &[("x-mock-tokens", "3")],
    );
    assert_eq!(
        r.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    let (events, terminated) = named_chunks(&r);
    assert!(terminated);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let start = &events[0].1["message"];
    assert!(start["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(
        start["usage"],
        json!({"input_tokens": 5, "output_tokens": 0})
    );
    assert_eq!(
        events[6].1["usage"],
        json!({"input_tokens": 5, "output_tokens": 3})
    );
    assert_eq!(events[6].1["delta"]["stop_reason"], "end_turn");
    let text: String = events[2..5]
        .iter()
        .map(|(_, e)| e["delta"]["text"].as_str().unwrap())
        .collect();

    let r = post_json(
        m.addr,
        "/v1/messages",
        &messages(false, 100),
        &[("x-mock-tokens", "3")],
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["content"], json!([{"type": "text", "text": text}]));
    assert_eq!(
        (&body["type"], &body["role"]),
        (&json!("message"), &json!("assistant"))
    );
    assert_eq!(
        body["usage"],
        json!({"input_tokens": 5, "output_tokens": 3})
    );
    assert!(
        body.get("stop_sequence").is_none(),
        "vLLM leaves out nulls: {body}"
    );

    let body: Value =
        serde_json::from_slice(&post_json(m.addr, "/v1/messages", &messages(false, 2), &[]).body)
            .unwrap();
    assert_eq!(
        (&body["stop_reason"], &body["usage"]["output_tokens"]),
        (&json!("max_tokens"), &json!(2))
    );
    // No tokens: no content block at all.
    let r = post_json(
        m.addr,
        "/v1/messages",
        &messages(true, 100),
        &[("x-mock-tokens", "0")],
    );
    let names: Vec<String> = named_chunks(&r).0.into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["message_start", "message_delta", "message_stop"]);

    let count = post_json(
        m.addr,
        "/v1/messages/count_tokens",
        &messages(false, 1),
        &[],
    );
    let count: Value = serde_json::from_slice(&count.body).unwrap();
    assert_eq!(
        count,
        json!({"input_tokens": 5, "context_management": {"original_input_tokens": 5}})
    );
}

#[test]
fn messages_errors_take_the_anthropic_shape_vllm_gives_them() {
    let m = spawn_mock(&[]);
    let mut unknown = messages(false, 5);
    unknown["model"] = json!("other");
    let cases = [
        ("/v1/messages", unknown.clone(), vec![], 404),
        (
            "/v1/messages",
            json!({"model": "mock-model", "messages": []}),
            vec![],
            400,
        ),
        (
            "/v1/messages",
            messages(true, 5),
            vec![("x-mock-status", "429")],
            429,
        ),
        ("/v1/messages/count_tokens", unknown, vec![], 404),
    ];
    for (path, body, headers, status) in cases {
        let r = post_json(m.addr, path, &body, &headers);
        assert_eq!(r.status, status, "{path} {body}");
        let e: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(e["type"], "error", "{e}");
        assert!(
            e["error"]["type"].is_string() && e["error"]["message"].is_string(),
            "{e}"
        );
    }
    // The OpenAI routes keep OpenAI's shape.
    let r = post_json(
        m.addr,
        "/v1/responses",
        &json!({"model": "other", "input": "x"}),
        &[],
    );
    assert_eq!(r.status, 404);
    let e: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e["error"]["code"], 404);
}

#[test]
fn responses_stream_and_json_have_vllm_shape_and_usage() {
    let m = spawn_mock(&[]);
    let body = json!({"model": "mock-model", "input": "Hello there, mock!", "stream": true});
    let knobs = [("x-mock-tokens", "2"), ("x-mock-cached-tokens", "1")];
    let r = post_json(m.addr, "/v1/responses", &body, &knobs);
    assert_eq!(
        r.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    let (events, terminated) = named_chunks(&r);
    assert!(terminated);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    for (i, (_, e)) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i, "{e}");
    }
    assert_eq!(events[0].1["response"]["usage"], Value::Null);
    let done = &events[9].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(events[0].1["response"]["id"], done["id"]);
    let usage = &done["usage"];
    assert_eq!(
        (&usage["input_tokens"], &usage["output_tokens"]),
        (&json!(5), &json!(2))
    );
    assert_eq!(
        (
            &usage["total_tokens"],
            &usage["input_tokens_details"]["cached_tokens"]
        ),
        (&json!(7), &json!(1))
    );
    assert_eq!(usage["output_tokens_details"]["reasoning_tokens"], 0);

    let body = json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello there, mock!"}]}], "max_output_tokens": 1});
    let r = post_json(m.addr, "/v1/responses", &body, &[]);
    let json: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(json["object"], "response");
    assert_eq!(
        (&json["status"], &json["incomplete_details"]["reason"]),
        (&json!("incomplete"), &json!("max_output_tokens"))
    );
    assert_eq!(
        (
            &json["usage"]["input_tokens"],
            &json["usage"]["output_tokens"]
        ),
        (&json!(5), &json!(1))
    );
    assert_eq!(json["output"][0]["content"][0]["text"], "hello ");
}

#[test]
fn responses_lifecycle_events_precede_the_time_to_first_token() {
    let m = spawn_mock(&[]);
    let mut c = Client::connect(m.addr);
    let body = json!({"model": "mock-model", "input": "hi", "stream": true}).to_string();
    let start = Instant::now();
    c.send(&raw_request(
        "POST",
        "/v1/responses",
        body.as_bytes(),
        &[("x-mock-ttft-ms", "400")],
    ));
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(24).any(|w| w == b"event: response.in_progr") {
        let n = c.stream().read(&mut buf).unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "created/in_progress wait for no token"
    );
    while !seen.windows(26).any(|w| w == b"response.output_text.delta") {
        let n = c.stream().read(&mut buf).unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(start.elapsed() >= Duration::from_millis(400));
}

/// Sends a streamed chat request and returns the time until its first `data:` event.
fn time_to_first_event(addr: std::net::SocketAddr, body: &Value) -> Duration {
    let mut c = Client::connect(addr);
    let start = Instant::now();
    c.send(&raw_request("POST", CHAT, body.to_string().as_bytes(), &[]));
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == b"data: ") {
        let n = c.stream().read(&mut buf).unwrap();
        assert!(n > 0, "stream ended before its first event");
        seen.extend_from_slice(&buf[..n]);
    }
    start.elapsed()
}

/// A conversation turn: a long system prompt (4,000 bytes, about 1,000 tokens) and `user`.
fn long_prefix_chat(user: &str) -> Value {
    json!({
        "model": "mock-model",
        "stream": true,
        "messages": [
            {"role": "system", "content": "You are a careful assistant. ".repeat(138)},
            {"role": "user", "content": user},
        ],
    })
}

#[test]
fn a_cached_prefix_cuts_the_time_to_first_token_and_counts_as_hits() {
    // 1,000 uncached tokens at 300 us each: 300 ms of prefill for the first request.
    let m = spawn_mock(&["--kv-blocks", "256", "--prefill-us-per-token", "300"]);
    assert_eq!(metric(m.addr, "vllm:prefix_cache_queries_total"), 0.0);
    let cold = time_to_first_event(m.addr, &long_prefix_chat("What is a KV cache?"));
    let queried = metric(m.addr, "vllm:prefix_cache_queries_total");
    assert!(queried > 1000.0, "{queried} tokens queried");
    assert_eq!(metric(m.addr, "vllm:prefix_cache_hits_total"), 0.0);

    let warm = time_to_first_event(m.addr, &long_prefix_chat("And a prefix cache?"));
    let hits = metric(m.addr, "vllm:prefix_cache_hits_total");
    // The system prompt's full blocks hit; the user turn after them is computed.
    assert!(hits >= 1000.0 - 16.0, "{hits} tokens hit");
    assert!(metric(m.addr, "vllm:prefix_cache_queries_total") > queried + hits);
    assert!(
        cold >= Duration::from_millis(300),
        "cold first token {cold:?}"
    );
    assert!(warm * 4 < cold, "warm {warm:?} against cold {cold:?}");
    // The blocks were released with the responses; they stay cached but count as free.
    assert!(wait_until(Duration::from_secs(2), || metric(
        m.addr,
        "vllm:kv_cache_usage_perc"
    ) == 0.0));
}

#[test]
fn every_generating_api_reuses_the_prefix_it_sent_before() {
    let m = spawn_mock(&["--kv-blocks", "512", "--prefill-us-per-token", "1"]);
    let system = "Answer in French. ".repeat(60);
    let requests = [
        (
            CHAT,
            json!({"model": "mock-model", "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/completions",
            json!({"model": "mock-model", "prompt": format!("{system} hi")}),
        ),
        (
            "/v1/messages",
            json!({"model": "mock-model", "max_tokens": 8, "system": system, "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/responses",
            json!({"model": "mock-model", "instructions": system, "input": "hi"}),
        ),
    ];
    for (path, body) in &requests {
        let hits = metric(m.addr, "vllm:prefix_cache_hits_total");
        for _ in 0..2 {
            assert_eq!(post_json(m.addr, path, body, &[]).status, 200, "{path}");
        }
        let gained = metric(m.addr, "vllm:prefix_cache_hits_total") - hits;
        assert!(gained >= 240.0, "{path}: the repeat hit {gained} tokens");
    }
}

#[test]
fn a_prompt_larger_than_the_kv_cache_is_refused() {
    let m = spawn_mock(&["--kv-blocks", "4", "--block-tokens", "16"]);
    let r = post_json(m.addr, CHAT, &long_prefix_chat("hi"), &[]);
    assert_eq!(r.status, 400);
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("maximum context length is 64 tokens"),
        "{message}"
    );
}

#[test]
fn max_running_makes_the_rest_wait_first_come_first_served() {
    let m = spawn_mock(&["--max-running", "1", "--itl-ms", "20", "--tokens", "500"]);
    let body = chat(true, json!({})).to_string();
    let mut first = Client::connect(m.addr);
    first.send(&raw_request("POST", CHAT, body.as_bytes(), &[]));
    assert!(wait_until(Duration::from_secs(5), || metric(
        m.addr,
        "vllm:num_requests_running"
    ) == 1.0));
    let mut second = Client::connect(m.addr);
    second.send(&raw_request(
        "POST",
        CHAT,
        body.as_bytes(),
        &[("x-mock-tokens", "2")],
    ));
    assert!(wait_until(Duration::from_secs(5), || metric(
        m.addr,
        "vllm:num_requests_waiting"
    ) == 1.0));
    assert_eq!(metric(m.addr, "vllm:num_requests_running"), 1.0);
    // The first leaving frees its slot: the second runs to its end.
    drop(first);
    let r = second.read_response();
    assert_eq!(r.status, 200);
    assert!(r.chunks().1, "the waiting stream completes");
    assert_eq!(metric(m.addr, "vllm:num_requests_waiting"), 0.0);

    // A client that leaves while waiting leaves the queue.
    let mut holder = Client::connect(m.addr);
    holder.send(&raw_request("POST", CHAT, body.as_bytes(), &[]));
    assert!(wait_until(Duration::from_secs(5), || metric(
        m.addr,
        "vllm:num_requests_running"
    ) == 1.0));
    let mut quitter = Client::connect(m.addr);
    quitter.send(&raw_request("POST", CHAT, body.as_bytes(), &[]));
    assert!(wait_until(Duration::from_secs(5), || metric(
        m.addr,
        "vllm:num_requests_waiting"
    ) == 1.0));
    drop(quitter);
    assert!(wait_until(Duration::from_secs(5), || metric(
        m.addr,
        "vllm:num_requests_waiting"
    ) == 0.0));
    assert_eq!(metric(m.addr, "vllm:num_requests_running"), 1.0);
}

#[test]
fn without_scheduling_flags_no_prefix_cache_is_reported() {
    let m = spawn_mock(&["--waiting", "3", "--kv-cache-usage", "0.5"]);
    let text = get(m.addr, "/metrics").text();
    assert!(!text.contains("prefix_cache"), "{text}");
    assert_eq!(metric(m.addr, "vllm:num_requests_waiting"), 3.0);
    assert_eq!(metric(m.addr, "vllm:kv_cache_usage_perc"), 0.5);
}

/// Sends a streamed chat request with `priority` on its own connection.
fn send_prioritized(addr: std::net::SocketAddr, priority: i64, tokens: &str) -> Client {
    let body = chat(
        true,
        json!({"priority": priority, "stream_options": {"include_usage": true}}),
    );
    let mut c = Client::connect(addr);
    c.send(&raw_request(
        "POST",
        CHAT,
        body.to_string().as_bytes(),
        &[("x-mock-tokens", tokens)],
    ));
    c
}

/// The concatenated content deltas of a streamed chat and its usage.
fn streamed_text_and_usage(r: &Response) -> (String, Value) {
    assert_eq!(r.status, 200);
    assert!(r.chunks().1, "the stream completes");
    let (events, _) = events_json(r);
    let text = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    (text, events.last().unwrap()["usage"].clone())
}

#[test]
fn sglang_priority_preempts_a_running_generation_above_the_threshold() {
    let m = spawn_mock(&[
        "--enable-priority-scheduling",
        "--max-running",
        "1",
        "--itl-ms",
        "20",
    ]);
    let running = || metric(m.addr, "vllm:num_requests_running");
    let waiting = || metric(m.addr, "vllm:num_requests_waiting");
    let completed = || metric(m.addr, "mock_streams_completed_total");
    let preemptions = || metric(m.addr, "vllm:num_preemptions_total");
    assert_eq!(preemptions(), 0.0);

    // 100 tokens 20 ms apart: at least 2 s unpreempted.
    let mut low = send_prioritized(m.addr, 0, "100");
    assert!(wait_until(Duration::from_secs(5), || running() == 1.0));
    let mut high = send_prioritized(m.addr, 100, "30");
    // While the urgent one runs, the preempted one waits (out of the running gauge once it
    // notices, at its next token).
    assert!(wait_until(Duration::from_secs(5), || preemptions() == 1.0));
    assert!(wait_until(Duration::from_secs(1), || (
        running(),
        waiting()
    ) == (1.0, 1.0)));
    let r = high.read_response();
    assert_eq!(streamed_text_and_usage(&r).1["completion_tokens"], 30);
    assert_eq!(completed(), 1.0, "the urgent one finished first");
    let (text, usage) = streamed_text_and_usage(&low.read_response());
    assert_eq!(completed(), 2.0);
    assert_eq!((running(), waiting(), preemptions()), (0.0, 0.0, 1.0));
    // Every token and the same usage as without the preemption.
    let mut again = send_prioritized(m.addr, 0, "100");
    assert_eq!(usage["completion_tokens"], 100);
    assert_eq!(
        (text, usage),
        streamed_text_and_usage(&again.read_response())
    );

    // 5 over 0 is not above the default threshold of 10: it waits for the running one.
    let mut low = send_prioritized(m.addr, 0, "30");
    assert!(wait_until(Duration::from_secs(5), || running() == 1.0));
    let mut mid = send_prioritized(m.addr, 5, "2");
    assert!(wait_until(Duration::from_secs(5), || waiting() == 1.0));
    assert_eq!(
        streamed_text_and_usage(&mid.read_response()).1["completion_tokens"],
        2
    );
    assert_eq!(completed(), 5.0, "the running one finished first");
    assert_eq!(preemptions(), 1.0);
    streamed_text_and_usage(&low.read_response());

    // A preempted client that leaves is gone from the queue.
    let low = send_prioritized(m.addr, 0, "100");
    assert!(wait_until(Duration::from_secs(5), || running() == 1.0));
    let mut high = send_prioritized(m.addr, 100, "50");
    assert!(wait_until(Duration::from_secs(5), || preemptions() == 2.0));
    drop(low);
    assert!(wait_until(Duration::from_secs(5), || waiting() == 0.0));
    assert_eq!(
        streamed_text_and_usage(&high.read_response()).1["completion_tokens"],
        50
    );
    assert!(wait_until(Duration::from_secs(5), || running() == 0.0));

    // A preempted non-streamed generation just finishes later, whole.
    let body = chat(false, json!({})).to_string();
    let send = |c: &mut Client| {
        c.send(&raw_request(
            "POST",
            CHAT,
            body.as_bytes(),
            &[("x-mock-tokens", "50")],
        ))
    };
    let mut low = Client::connect(m.addr);
    send(&mut low);
    assert!(wait_until(Duration::from_secs(5), || running() == 1.0));
    let mut high = send_prioritized(m.addr, 100, "10");
    assert!(wait_until(Duration::from_secs(5), || preemptions() == 3.0));
    streamed_text_and_usage(&high.read_response());
    let preempted = low.read_response().json();
    let mut again = Client::connect(m.addr);
    send(&mut again);
    let unpreempted = again.read_response().json();
    assert_eq!(preempted["usage"]["completion_tokens"], 50);
    assert_eq!(preempted["usage"], unpreempted["usage"]);
    assert_eq!(preempted["choices"], unpreempted["choices"]);
}

#[test]
fn vllm_priority_orders_the_queue_without_preempting() {
    let m = spawn_mock(&[
        "--scheduling-policy",
        "priority",
        "--max-running",
        "1",
        "--itl-ms",
        "20",
    ]);
    let waiting = || metric(m.addr, "vllm:num_requests_waiting");
    let mut holder = send_prioritized(m.addr, 10, "30");
    assert!(wait_until(Duration::from_secs(5), || metric(
        m.addr,
        "vllm:num_requests_running"
    ) == 1.0));
    let mut five = send_prioritized(m.addr, 5, "10");
    assert!(wait_until(Duration::from_secs(5), || waiting() == 1.0));
    let mut one = send_prioritized(m.addr, 1, "10");
    assert!(wait_until(Duration::from_secs(5), || waiting() == 2.0));
    let completed = || metric(m.addr, "mock_streams_completed_total");
    // The more urgent arrivals wait for the running one.
    assert_eq!(
        streamed_text_and_usage(&holder.read_response()).1["completion_tokens"],
        30
    );
    assert_eq!(
        streamed_text_and_usage(&one.read_response()).1["completion_tokens"],
        10
    );
    assert_eq!(completed(), 2.0, "priority 1 ran before priority 5");
    streamed_text_and_usage(&five.read_response());
    assert_eq!(metric(m.addr, "vllm:num_preemptions_total"), 0.0);
}

#[test]
fn priority_without_priority_scheduling_is_vllms_400() {
    let m = spawn_mock(&[]);
    for (path, body) in [
        (CHAT, chat(false, json!({"priority": 3}))),
        ("/v1/completions", json!({"prompt": "hi", "priority": 3})),
        ("/v1/responses", json!({"input": "hi", "priority": 3})),
    ] {
        let r = post_json(m.addr, path, &body, &[]);
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(
            r.json()["error"]["message"],
            "Got priority 3 but Priority scheduling is not enabled.",
            "{path}"
        );
        assert_eq!(r.json()["error"]["type"], "BadRequestError");
    }
    let r = post_json(m.addr, CHAT, &chat(false, json!({"priority": 0})), &[]);
    assert_eq!(r.status, 200);
    let r = post_json(m.addr, CHAT, &chat(false, json!({"priority": "high"})), &[]);
    assert_eq!(r.status, 400);
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.starts_with("Invalid request body: invalid type"),
        "{message}"
    );
    // No preemption counter without a priority policy.
    assert!(!get(m.addr, "/metrics").text().contains("preemptions"));

    let m = spawn_mock(&["--scheduling-policy", "priority"]);
    let r = post_json(m.addr, CHAT, &chat(false, json!({"priority": -3})), &[]);
    assert_eq!(r.status, 200);
}
