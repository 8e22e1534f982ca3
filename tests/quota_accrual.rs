//! Token limits and quotas accrue from real usage: the usage reporter charges each record's
//! tokens to the key, so `total_quota` and `tokens_per_minute` refuse once spent, even with
//! usage reporting itself switched off.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn chat(stream: bool) -> serde_json::Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "Hello"}], "stream": stream})
}

fn gateway(sim: &Proc, key_extra: &str, extra: &str) -> Proc {
    let dir = unique_path("llmproxy-quota");
    spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{}\"\nauth:\n  enabled: true\n  storage: \"file\"\n  quota_path: \"{}/quota.db\"\napi_keys:\n  - key: \"sk-quota-test-0001\"\n    name: \"quota\"\n{key_extra}{extra}",
        sim.addr,
        dir.display()
    ))
}

const KEY: (&str, &str) = ("Authorization", "Bearer sk-quota-test-0001");

#[test]
fn total_quota_is_spent_by_streamed_and_plain_requests() {
    let sim = spawn_mock(&["--tokens", "10"]);
    // Each request costs 10 completion tokens plus a few prompt tokens.
    let gw = gateway(&sim, "    total_quota: 30\n", "");
    assert_eq!(
        post_json(gw.addr, "/v1/chat/completions", &chat(true), &[KEY]).status,
        200
    );
    assert_eq!(
        post_json(gw.addr, "/v1/chat/completions", &chat(false), &[KEY]).status,
        200
    );
    // 2 x (10 + prompt) >= 22; the third may still pass, then the quota is spent.
    let refused = wait_until(Duration::from_secs(5), || {
        let r = post_json(gw.addr, "/v1/chat/completions", &chat(false), &[KEY]);
        r.status == 429 && r.json()["error"]["code"] == "insufficient_quota"
    });
    assert!(refused, "the quota was never spent");
}

#[test]
fn tokens_per_minute_counts_streamed_usage() {
    let sim = spawn_mock(&["--tokens", "50"]);
    let gw = gateway(
        &sim,
        "",
        "rate_limit:\n  per_key:\n    tokens_per_minute: 100\n",
    );
    let mut refused = None;
    for i in 0..6 {
        let r = post_json(gw.addr, "/v1/chat/completions", &chat(true), &[KEY]);
        if r.status == 429 {
            refused = Some((i, r));
            break;
        }
        assert_eq!(r.status, 200);
        // The reporter thread counts the record, then charges the key, just after the response.
        assert!(wait_until(Duration::from_secs(5), || metric(
            gw.addr,
            "llmproxy_usage_records_total"
        ) == (i + 1) as f64));
    }
    let (i, r) = refused.expect("tokens_per_minute never refused");
    assert!(i >= 2, "refused too early (request {i})");
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert!(r.header("retry-after").is_some());
}
