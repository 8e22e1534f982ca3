//! `backends[].engine_priority`: the gateway writes each request's place in its scheduling order
//! into the `priority` field the engine schedules by, and sends a more urgent request past
//! `max_in_flight` to an engine that preempts on arrival. Against the simulator in vLLM's mode
//! (`--scheduling-policy priority`: ordering only) and SGLang's (`--enable-priority-scheduling`:
//! preemption on arrival). States are awaited through both processes' metrics, never slept on.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn gateway(mock: SocketAddr, engine: &str, max_in_flight: u32, log: &Path) -> Proc {
    spawn_gateway(&config(mock, engine, max_in_flight, log))
}

fn config(mock: SocketAddr, engine: &str, max_in_flight: u32, log: &Path) -> String {
    format!(
        "listen: \"{{listen}}\"\nworkers: 1\nbackends:\n  - url: \"http://{mock}\"\n    max_in_flight: {max_in_flight}\n    engine_priority: {engine}\n\
         scheduling:\n  enabled: true\n  queue_timeout: 120s\n  saturation: {{waiting_requests: 0, kv_cache: 0}}\n\
         log:\n  format: json\n  access_path: \"{}\"\n  flush_interval: 50ms\n\
         auth:\n  quota_path: \"{}\"\n\
         api_keys:\n  - {{key: sk-flood-0000001, name: flood}}\n  - {{key: sk-light-0000001, name: light}}\n  - {{key: sk-vip-000000001, name: vip, priority: 1}}\n",
        log.display(),
        unique_path("sched-engine-quota").display()
    )
}

fn log_path() -> PathBuf {
    unique_path("sched-engine-access").with_extension("log")
}

fn chat(key: &str, id: &str, extra: Value) -> Vec<u8> {
    let mut body = json!({"model": "mock-model", "max_tokens": 1,
        "messages": [{"role": "user", "content": id}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    raw_request(
        "POST",
        "/v1/chat/completions",
        body.to_string().as_bytes(),
        &[
            ("Authorization", &format!("Bearer {key}")),
            ("X-Request-Id", id),
        ],
    )
}

/// Starts a flood stream of `tokens` tokens, 20 ms apart, and returns once its head arrived.
fn start_stream(addr: SocketAddr, id: &str, tokens: u64) -> TcpStream {
    let mut raw = chat(
        "sk-flood-0000001",
        id,
        json!({"stream": true, "max_tokens": tokens, "stream_options": {"include_usage": true}}),
    );
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
    raw.splice(
        at..at,
        format!("x-mock-itl-ms: 20\r\nx-mock-tokens: {tokens}\r\nconnection: close\r\n")
            .into_bytes(),
    );
    open_stream(addr, &raw)
}

fn send(addr: SocketAddr, raw: Vec<u8>) -> JoinHandle<Response> {
    std::thread::spawn(move || request(addr, &raw))
}

#[test]
fn the_priority_sent_is_the_requests_level_whatever_the_client_asked() {
    // A vLLM without priority scheduling names the priority it got in its 400.
    let mock = spawn_mock(&[]);
    let gw = gateway(mock.addr, "vllm", 8, &log_path());
    let cases = [
        // A key with nothing in flight: band 0, fresh (50); vLLM runs lower values first.
        ("sk-light-0000001", json!({}), "-50"),
        // What the client sends is replaced. (Each key's first request: all fresh.)
        ("sk-flood-0000001", json!({"priority": 7}), "-50"),
        // Band 1.
        ("sk-vip-000000001", json!({"priority": -1000}), "-150"),
    ];
    for (key, extra, sent) in cases {
        let r = request(gw.addr, &chat(key, "p", extra));
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(
            r.json()["error"]["message"],
            format!("Got priority {sent} but Priority scheduling is not enabled.")
        );
    }
    // A body the gateway cannot read (UTF-16, which Python's json.loads would) could carry the
    // client's own priority: refused.
    let utf16: Vec<u8> = r#"{"model":"mock-model","messages":[],"priority":-9999}"#
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let r = request(
        gw.addr,
        &raw_request(
            "POST",
            "/v1/chat/completions",
            &utf16,
            &[("Authorization", "Bearer sk-light-0000001")],
        ),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    // Embeddings get no priority added...
    let r = post_json(
        gw.addr,
        "/v1/embeddings",
        &json!({"model": "mock-model", "input": "x"}),
        &[("Authorization", "Bearer sk-light-0000001")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // ...but vLLM reads one there too: a client's own is replaced.
    let r = post_json(
        gw.addr,
        "/v1/embeddings",
        &json!({"model": "mock-model", "input": "x", "priority": -9999}),
        &[("Authorization", "Bearer sk-light-0000001")],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.json()["error"]["message"],
        "Got priority -50 but Priority scheduling is not enabled."
    );
}

#[test]
fn vllm_runs_a_fresh_request_before_a_backlogged_key_queued_earlier() {
    let mock = spawn_mock(&["--scheduling-policy", "priority", "--max-running", "1"]);
    let log = log_path();
    let gw = gateway(mock.addr, "vllm", 3, &log);
    let held = start_stream(gw.addr, "flood-1", 1000);
    // The flood key's second request waits in vLLM's queue, then the light key's first.
    let flood = send(gw.addr, chat("sk-flood-0000001", "flood-2", json!({})));
    assert!(wait_until(Duration::from_secs(30), || metric(
        mock.addr,
        "vllm:num_requests_waiting"
    ) == 1.0));
    let light = send(gw.addr, chat("sk-light-0000001", "light-1", json!({})));
    assert!(wait_until(Duration::from_secs(30), || metric(
        mock.addr,
        "vllm:num_requests_waiting"
    ) == 2.0));
    // Nothing is preempted in vLLM's mode: both wait for the stream's slot.
    assert_eq!(metric(mock.addr, "vllm:num_preemptions_total"), 0.0);
    drop(held);
    assert_eq!(light.join().unwrap().status, 200);
    assert_eq!(flood.join().unwrap().status, 200);
    let order = logged_request_ids(&log, 3);
    assert_eq!(order[1..], ["light-1", "flood-2"], "{order:?}");
    assert_eq!(metric(gw.addr, "llmproxy_preemptive_dispatches_total"), 0.0);
}

/// Reads a stream to its end: its completion tokens from its usage chunk, and whether it ended
/// with `[DONE]`.
fn finish(mut s: TcpStream) -> (u64, bool) {
    let mut body = Vec::new();
    s.read_to_end(&mut body).unwrap();
    let events = sse_events(&body);
    let usage: Vec<u64> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["usage"]["completion_tokens"].as_u64())
        .collect();
    assert_eq!(usage.len(), 1, "{}", String::from_utf8_lossy(&body));
    (usage[0], events.last().is_some_and(|e| e == "[DONE]"))
}

#[test]
fn sglang_preempts_for_a_fresh_request_and_the_flood_waits_its_turn() {
    let mock = spawn_mock(&["--enable-priority-scheduling", "--max-running", "2"]);
    let log = log_path();
    let gw = gateway(mock.addr, "sglang", 2, &log);
    // Long enough (5 s) that light-1 is answered while both streams still run, even on a
    // loaded machine.
    let tokens = 250;
    // The flood key's first stream is fresh; its second is not, and its third waits here.
    let first = start_stream(gw.addr, "flood-1", tokens);
    let second = start_stream(gw.addr, "flood-2", tokens);
    let third = send(gw.addr, chat("sk-flood-0000001", "flood-3", json!({})));
    assert!(wait_until(Duration::from_secs(30), || metric(
        gw.addr,
        "llmproxy_queue_depth"
    ) == 1.0));
    // The light key's request goes past max_in_flight; the engine preempts the flood's
    // less urgent stream for it.
    let light = request(gw.addr, &chat("sk-light-0000001", "light-1", json!({})));
    assert_eq!(light.status, 200, "{}", light.text());
    assert_eq!(metric(gw.addr, "llmproxy_preemptive_dispatches_total"), 1.0);
    assert_eq!(metric(mock.addr, "vllm:num_preemptions_total"), 1.0);
    // Answered while the flood's streams still run and its next request still waits.
    assert_eq!(metric(gw.addr, "llmproxy_queue_depth"), 1.0);
    // Both streams end whole, the preempted one too.
    assert_eq!(finish(first), (tokens, true));
    assert_eq!(finish(second), (tokens, true));
    assert_eq!(third.join().unwrap().status, 200);
    // The log is in order of completion: flood-3 ran only once a flood stream had ended. (It
    // may end before the preempted stream, which lost its place for light-1's turn.)
    let order = logged_request_ids(&log, 4);
    assert_eq!(order[0], "light-1", "{order:?}");
    let third_at = order.iter().position(|id| id == "flood-3").unwrap();
    assert!(third_at >= 2, "{order:?}");
}

#[test]
fn a_reload_keeps_each_keys_flow_so_a_backlogged_key_stays_backlogged() {
    let mock = spawn_mock(&["--enable-priority-scheduling", "--max-running", "2"]);
    let (gw, notifications) =
        spawn_gateway_reloadable(&config(mock.addr, "sglang", 2, &log_path()));
    let first = start_stream(gw.addr, "flood-1", 1000);
    let second = start_stream(gw.addr, "flood-2", 1000);
    reload(&gw, &notifications, &config_text(&gw));
    // The flood key still has two requests at the backend: under the new config its next one
    // is not fresh, so it waits instead of preempting its own.
    let third = send(gw.addr, chat("sk-flood-0000001", "flood-3", json!({})));
    assert!(wait_until(Duration::from_secs(30), || metric(
        gw.addr,
        "llmproxy_queue_depth"
    ) == 1.0));
    assert_eq!(metric(gw.addr, "llmproxy_preemptive_dispatches_total"), 0.0);
    drop((first, second));
    assert_eq!(third.join().unwrap().status, 200);
    assert_eq!(metric(mock.addr, "vllm:num_preemptions_total"), 0.0);
}
