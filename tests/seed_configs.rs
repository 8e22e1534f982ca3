//! The seed README's configs, verbatim from config/seed-*.yaml (only the port is changed so tests
//! can run side by side), start and behave as written.

mod common;

use common::*;
use serde_json::json;

fn seed(file: &str) -> Proc {
    let text =
        std::fs::read_to_string(format!("{}/config/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let text = if text.contains("listen:") {
        text.replace("listen: \":8000\"", "listen: \"{listen}\"")
    } else {
        format!("listen: \"{{listen}}\"\n{text}")
    };
    spawn_gateway(&text)
}

fn chat() -> serde_json::Value {
    json!({"model": "qwen-coder", "messages": [{"role": "user", "content": "hi"}]})
}

#[test]
fn seed_configuration_block_serves_and_reports_unreachable_backends() {
    // Backends vllm:8000 and tgi:8081 do not resolve here; the reporters' targets are never
    // contacted because no request reaches a backend.
    let gw = seed("seed-readme.yaml");
    assert_eq!(get(gw.addr, "/health").status, 200);
    let r = post_json(gw.addr, "/v1/chat/completions", &chat(), &[]);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "no_healthy_backend");
    assert!(get(gw.addr, "/metrics")
        .text()
        .contains("llmproxy_webhook_failure_total 0"));
}

#[test]
fn seed_opencode_scenario_checks_keys_and_addresses() {
    let gw = seed("seed-opencode.yaml");
    let r = post_json(gw.addr, "/v1/chat/completions", &chat(), &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    // The key is valid, but 127.0.0.1 is outside allowed_ips 10.0.0.0/8.
    for header in [
        ("Authorization", "Bearer sk-llmproxy-dev-001"),
        ("X-API-Key", "sk-llmproxy-dev-001"),
    ] {
        let r = post_json(gw.addr, "/v1/chat/completions", &chat(), &[header]);
        assert_eq!(r.status, 403, "{}", r.text());
    }
}
