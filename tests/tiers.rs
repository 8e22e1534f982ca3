//! Spillover tiers (`backends[].tier`): requests go to the lowest tier with a backend able to take
//! them and overflow to the next one when tier 0 is at `max_in_flight` or down, and come back
//! once it can take them again; metrics and usage records name the tier.

mod common;
#[path = "support/usage.rs"]
mod usage;

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;
use usage::{spool_records, temp_dir};

fn chat(stream: bool) -> serde_json::Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

/// `mock_requests_total` of a simulator: the inference requests it received.
fn served(mock: SocketAddr) -> f64 {
    get(mock, "/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("mock_requests_total "))
        .and_then(|v| v.parse().ok())
        .expect("mock_requests_total")
}

#[test]
fn a_full_tier_zero_spills_over_and_takes_traffic_back() {
    let a = spawn_mock(&["--tokens", "4"]);
    let b = spawn_mock(&["--tokens", "4"]);
    let spool = temp_dir("tiers").join("usage.db");
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{}\"\n    max_in_flight: 1\n  - url: \"http://{}\"\n    tier: 1\nusage_hook:\n  enabled: true\n  spool_path: \"{}\"\n  reporters: []\n",
        a.addr,
        b.addr,
        spool.display()
    ));
    // A slow stream holds tier 0's only slot.
    let mut slow = Client::connect(gw.addr);
    let body = chat(true).to_string();
    slow.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[("X-Mock-Itl-Ms", "300"), ("X-Request-Id", "slow")],
    ));
    let mut first = [0u8; 64];
    assert!(slow.stream().read(&mut first).unwrap() > 0);
    assert_eq!(served(a.addr), 1.0);
    for i in 0..3 {
        let id = format!("spill-{i}");
        let r = post_json(
            gw.addr,
            "/v1/chat/completions",
            &chat(false),
            &[("X-Request-Id", &id)],
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!((served(a.addr), served(b.addr)), (1.0, 3.0));

    // The stream ends; tier 0 takes the next request again.
    let mut rest = Vec::new();
    while !rest.ends_with(b"0\r\n\r\n") {
        let mut buf = [0u8; 4096];
        let n = slow.stream().read(&mut buf).unwrap();
        assert!(n > 0, "the slow stream was cut");
        rest.extend_from_slice(&buf[..n]);
    }
    // Its slot is released just after its last byte is written.
    assert!(wait_until(Duration::from_secs(10), || {
        post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]).status == 200
            && served(a.addr) >= 2.0
    }));

    // Metrics name each backend's tier; usage records carry it.
    let text = get(gw.addr, "/metrics").text();
    assert!(
        text.contains(&format!(
            "llmproxy_backend_tier{{backend=\"http://{}\"}} 0\n",
            a.addr
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "llmproxy_backend_tier{{backend=\"http://{}\"}} 1\n",
            b.addr
        )),
        "{text}"
    );
    let mut tiers = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        tiers = spool_records(&spool)
            .into_iter()
            .filter_map(|r| Some((r.client_request_id?, r.tier, r.backend_url)))
            .collect();
        tiers.len() >= 4
    }));
    for (id, tier, url) in &tiers {
        let expected = if id == "slow" {
            (0, &a.addr)
        } else {
            (1, &b.addr)
        };
        assert_eq!(
            (*tier, url.as_str()),
            (expected.0, format!("http://{}", expected.1).as_str()),
            "{id}"
        );
    }
}

#[test]
fn a_down_tier_zero_spills_over_until_it_recovers() {
    let port = closed_port();
    let b = spawn_mock(&["--tokens", "3"]);
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nhealth_check:\n  interval: 100ms\n  unhealthy_threshold: 1\n  healthy_threshold: 1\nbackends:\n  - url: \"http://{}\"\n  - url: \"http://{}\"\n    tier: 1\n",
        port.addr, b.addr
    ));
    // Down: every request still succeeds, on tier 1 (a refused connection is retried there).
    for stream in [false, true, false] {
        let r = post_json(gw.addr, "/v1/chat/completions", &chat(stream), &[]);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(served(b.addr), 3.0);

    // Tier 0 comes up on its address: once its check passes, requests go there again.
    let a = spawn_mock_on(port.addr, &["--tokens", "3"]);
    assert!(
        wait_until(Duration::from_secs(20), || {
            post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]).status == 200
                && served(a.addr) >= 1.0
        }),
        "tier 0 never took traffic back"
    );
    let before = served(b.addr);
    for _ in 0..3 {
        assert_eq!(
            post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]).status,
            200
        );
    }
    assert_eq!(
        served(b.addr),
        before,
        "tier 1 took requests while tier 0 was up"
    );
}

#[test]
fn saturated_tier_zero_spills_over_by_its_load_score() {
    // 5 waiting requests score 20 (4 each): above a saturation of 10.
    let a = spawn_mock(&["--waiting", "5"]);
    let b = spawn_mock(&[]);
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nrouting:\n  least_load: {{interval: 100ms, saturation: 10}}\nbackends:\n  - url: \"http://{}\"\n  - url: \"http://{}\"\n    tier: 1\n",
        a.addr, b.addr
    ));
    assert!(
        wait_until(Duration::from_secs(20), || {
            post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]).status == 200
                && served(b.addr) >= 1.0
        }),
        "the saturated tier 0 kept the traffic"
    );
    let before = served(a.addr);
    for _ in 0..3 {
        assert_eq!(
            post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]).status,
            200
        );
    }
    assert_eq!(served(a.addr), before);
}

#[test]
fn each_backend_gets_its_own_model_name_and_key() {
    let port = closed_port();
    let b = spawn_mock(&["--model", "served-b"]);
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nbackends:\n  - url: \"http://{}\"\n    models: [mock-model]\n  - url: \"http://{}\"\n    tier: 1\n    models: [served-b]\n    api_key: sk-backend-b\n    model_map: {{mock-model: served-b}}\n",
        port.addr, b.addr
    ));
    // Tier 0 refuses connections: the retry goes to tier 1, under its name for the model (the
    // simulator answers 404 for a model it does not serve).
    let r = post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post_json(
        gw.addr,
        "/v1/debug/echo",
        &json!({"model": "mock-model", "n": 1}),
        &[("Authorization", "Bearer sk-client")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.json();
    let body: serde_json::Value =
        serde_json::from_str(echo["body"].as_str().expect("echoed body")).unwrap();
    assert_eq!(body, json!({"model": "served-b", "n": 1}));
    let authorization: Vec<_> = echo["headers"]
        .as_array()
        .expect("echoed headers")
        .iter()
        .filter(|h| {
            h[0].as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case("authorization"))
        })
        .map(|h| h[1].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(authorization, ["Bearer sk-backend-b"]);
}
