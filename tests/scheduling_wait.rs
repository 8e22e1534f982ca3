//! `scheduling`: a request whose backends are all saturated (here: at `max_in_flight`) waits in
//! the gateway for a slot instead of failing; past `queue_timeout` it gets 429 (503 when its
//! priority is sheddable) with `Retry-After`, in its API's error shape. Off, nothing waits.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::json;

const KEYS: &str = "api_keys:\n  - {key: sk-normal-0000001, name: normal}\n  - {key: sk-shed-00000001, name: shed, priority: -1}\n";

fn gateway(mock: SocketAddr, scheduling: &str, keys: bool) -> Proc {
    let auth = if keys {
        format!(
            "auth:\n  quota_path: \"{}\"\n{KEYS}",
            unique_path("sched-quota").display()
        )
    } else {
        String::new()
    };
    spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{mock}\"\n    max_in_flight: 1\n{scheduling}{auth}"
    ))
}

fn scheduling(timeout: &str) -> String {
    format!(
        "scheduling:\n  enabled: true\n  queue_timeout: {timeout}\n  saturation: {{waiting_requests: 0, kv_cache: 0}}\n"
    )
}

/// Takes the backend's one slot with a long stream and returns once its head arrived; the slot
/// is held until the returned connection is dropped.
fn hold(addr: SocketAddr, key: &str) -> TcpStream {
    let body = json!({"model": "mock-model", "stream": true, "messages": [{"role": "user", "content": "hold"}]});
    let auth = format!("Bearer {key}");
    let raw = raw_request(
        "POST",
        "/v1/chat/completions",
        body.to_string().as_bytes(),
        &[
            ("x-mock-itl-ms", "100"),
            ("x-mock-tokens", "1000"),
            ("Authorization", &auth),
        ],
    );
    open_stream(addr, &raw)
}

fn chat(addr: SocketAddr, key: &str) -> Response {
    let body = json!({"model": "mock-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    post_json(
        addr,
        "/v1/chat/completions",
        &body,
        &[("Authorization", &format!("Bearer {key}"))],
    )
}

fn messages(addr: SocketAddr, key: &str) -> Response {
    let body = json!({"model": "mock-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    post_json(
        addr,
        "/v1/messages",
        &body,
        &[("x-api-key", key), ("anthropic-version", "2023-06-01")],
    )
}

fn queued(addr: SocketAddr) -> f64 {
    metric(addr, "llmproxy_queue_depth")
}

#[test]
fn a_queued_request_proceeds_when_the_slot_frees() {
    let mock = spawn_mock(&[]);
    let gw = gateway(mock.addr, &scheduling("60s"), false);
    let held = hold(gw.addr, "-");
    let addr = gw.addr;
    let waiting = std::thread::spawn(move || chat(addr, "-"));
    assert!(
        wait_until(Duration::from_secs(30), || queued(addr) == 1.0),
        "the second request never queued"
    );
    // Still waiting: nothing freed the slot.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!waiting.is_finished(), "answered while the slot was taken");
    assert_eq!(queued(addr), 1.0);
    drop(held);
    let r = waiting.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(queued(addr), 0.0);
    assert_eq!(metric(addr, "llmproxy_queue_wait_ms_count"), 1.0);
    assert_eq!(metric(addr, "llmproxy_queue_refused_total"), 0.0);
}

#[test]
fn a_wait_past_queue_timeout_gets_429_or_503_with_retry_after_in_the_api_shape() {
    let mock = spawn_mock(&[]);
    let gw = gateway(mock.addr, &scheduling("300ms"), true);
    let _held = hold(gw.addr, "sk-normal-0000001");

    let r = chat(gw.addr, "sk-normal-0000001");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let e = r.json();
    assert_eq!(e["error"]["code"], "queue_timeout", "{e}");
    assert_eq!(e["error"]["type"], "requests");
    assert!(e["error"]["param"].is_null());

    let r = messages(gw.addr, "sk-normal-0000001");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let e = r.json();
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"]["type"], "rate_limit_error");

    // A sheddable priority (below 0) is told the service is overloaded instead.
    let r = chat(gw.addr, "sk-shed-00000001");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "queue_timeout");
    assert_eq!(r.json()["error"]["type"], "server_error");
    let r = messages(gw.addr, "sk-shed-00000001");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "overloaded_error");

    assert_eq!(metric(gw.addr, "llmproxy_queue_refused_total"), 4.0);
    let text = get(gw.addr, "/metrics").text();
    assert!(
        text.contains("llmproxy_queue_refused_total{band=\"sheddable\"} 2\n")
            && text.contains("llmproxy_rejections_total{reason=\"overloaded\"} 4\n"),
        "{text}"
    );
    assert_eq!(queued(gw.addr), 0.0);
}

#[test]
fn without_scheduling_a_full_backend_is_refused_at_once_as_before() {
    let mock = spawn_mock(&[]);
    for section in ["", "scheduling:\n  enabled: false\n  queue_timeout: 60s\n"] {
        let gw = gateway(mock.addr, section, false);
        let held = hold(gw.addr, "-");
        let r = chat(gw.addr, "-");
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "no_healthy_backend");
        assert!(!get(gw.addr, "/metrics")
            .text()
            .contains("llmproxy_queue_depth"));
        drop(held);
        assert!(wait_until(Duration::from_secs(30), || chat(gw.addr, "-")
            .status
            == 200));
    }
}

#[test]
fn a_backend_whose_scraped_queue_passes_the_threshold_is_saturated() {
    // vLLM reports 10 requests waiting: past `waiting_requests: 5`, so once a scrape has seen
    // it no request goes there; they wait, and time out.
    let busy = spawn_mock(&["--waiting", "10"]);
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{}\"\n\
         routing:\n  least_load: {{interval: 100ms}}\n\
         scheduling:\n  enabled: true\n  queue_timeout: 200ms\n  saturation: {{waiting_requests: 5, kv_cache: 0}}\n",
        busy.addr
    ));
    let mut last = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let r = chat(gw.addr, "-");
            let refused = r.status == 429;
            last = Some((r.status, r.text()));
            refused
        }),
        "never refused: {last:?}"
    );
    let (_, body) = last.unwrap();
    assert!(body.contains("queue_timeout"), "{body}");
}

#[test]
fn a_reload_keeps_counting_the_requests_still_running_and_hands_their_slots_on() {
    let mock = spawn_mock(&[]);
    let yaml = format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{}\"\n    max_in_flight: 1\n{}",
        mock.addr,
        scheduling("20s")
    );
    let (gw, notifications) = spawn_gateway_reloadable(&yaml);
    // The same file again: a new config generation.
    let same = config_text(&gw);
    let reload = || reload(&gw, &notifications, &same);
    let held = hold(gw.addr, "-");
    // Two reloads with the stream running on the first generation: the third has nobody on
    // the second.
    reload();
    reload();
    // The stream still holds the backend's one slot: the next request waits.
    let addr = gw.addr;
    let waiting = std::thread::spawn(move || chat(addr, "-"));
    assert!(
        wait_until(Duration::from_secs(30), || queued(addr) == 1.0),
        "the request after the reload was not held back by the one before it"
    );
    assert_eq!(metric(mock.addr, "vllm:num_requests_running"), 1.0);
    // And one more, so that it waits on a generation that is no longer the newest: it keeps
    // its place in the one queue, and a newcomer lines up behind it.
    reload();
    assert_eq!(queued(addr), 1.0);
    let newcomer = std::thread::spawn(move || chat(addr, "-"));
    assert!(
        wait_until(Duration::from_secs(30), || queued(addr) == 2.0),
        "the newcomer did not line up behind the request waiting since the last config"
    );
    // The first generation's request ends: its slot goes to the waiter two generations on.
    drop(held);
    for w in [waiting, newcomer] {
        let r = w.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(metric(addr, "llmproxy_queue_refused_total"), 0.0);
}

#[test]
fn a_reload_that_raises_max_in_flight_lets_the_waiters_in_at_once() {
    let mock = spawn_mock(&[]);
    let yaml = format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{}\"\n    max_in_flight: 1\n{}",
        mock.addr,
        scheduling("60s")
    );
    let (gw, notifications) = spawn_gateway_reloadable(&yaml);
    let held = hold(gw.addr, "-");
    let addr = gw.addr;
    let waiting: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || chat(addr, "-")))
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || queued(addr) == 2.0),
        "the requests never queued"
    );
    let raised = config_text(&gw).replace("max_in_flight: 1", "max_in_flight: 3");
    reload(&gw, &notifications, &raised);
    // Both are answered while the stream still holds its slot: the new limit has room for them.
    for w in waiting {
        let r = w.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(queued(addr), 0.0);
    assert_eq!(metric(mock.addr, "vllm:num_requests_running"), 1.0);
    drop(held);
}

#[test]
fn a_backend_dropped_and_added_back_by_reloads_keeps_counting_its_requests() {
    let (first, second) = (spawn_mock(&[]), spawn_mock(&[]));
    let yaml = format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{}\"\n    max_in_flight: 1\n",
        first.addr
    );
    let (gw, notifications) = spawn_gateway_reloadable(&yaml);
    let held = hold(gw.addr, "-");
    let text = config_text(&gw);
    let (at_first, at_second) = (
        format!("http://{}", first.addr),
        format!("http://{}", second.addr),
    );
    for text in [text.replace(&at_first, &at_second), text] {
        reload(&gw, &notifications, &text);
    }
    // Back in the config, the first backend still has the stream: it is at its limit.
    assert_eq!(
        metric(gw.addr, "llmproxy_backend_in_flight"),
        1.0,
        "{}",
        get(gw.addr, "/metrics").text()
    );
    let r = chat(gw.addr, "-");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(metric(first.addr, "vllm:num_requests_running"), 1.0);
    drop(held);
}
