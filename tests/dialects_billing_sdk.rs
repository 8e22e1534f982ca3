//! The `anthropic` and `openai` Python SDKs through the gateway with auth, limits and metering on:
//! every API is billed exactly what the client was told it used, refusals raise the SDK's own
//! exception classes, and a spent quota is refused on every dialect. Needs
//! `pip install anthropic openai` (CI installs both).

mod common;
#[path = "support/usage.rs"]
mod usage;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use usage::*;

#[test]
fn sdks_are_billed_exactly_on_every_dialect() {
    if !python_has(&["anthropic", "openai"]) {
        return;
    }
    let mock = spawn_mock(&[]);
    let dir = temp_dir("dialects-sdk");
    let spool = dir.join("spool.db");
    let config = format!(
        "{}auth: {{quota_path: \"{}\"}}\napi_keys:\n  - {{key: sk-good}}\n  \
         - {{key: sk-limited, rate_limit: {{requests_per_minute: 1}}}}\n  \
         - {{key: sk-quota, total_quota: 1}}\n",
        gateway_yaml(mock.addr, &spool, " []"),
        dir.join("quota.db").display()
    );
    let gw = spawn_gateway(&config);
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/sdk_billing_dialects.py"
        ))
        .arg(format!("http://{}", gw.addr))
        .args(["sk-good", "sk-limited", "sk-quota"])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all dialect SDK checks passed"), "{stdout}");

    let reported: Vec<(String, Value)> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("usage "))
        .map(|l| {
            let (id, json) = l.split_once(' ').unwrap();
            (id.to_string(), serde_json::from_str(json).unwrap())
        })
        .collect();
    assert_eq!(reported.len(), 5, "{stdout}");
    let record = |id: &str| {
        let mut found = None;
        let seen = wait_until(Duration::from_secs(10), || {
            found = spool_records(&spool)
                .into_iter()
                .find(|r| r.client_request_id.as_deref() == Some(id));
            found.is_some()
        });
        assert!(seen, "no record for {id}");
        found.unwrap()
    };
    for (id, usage) in &reported {
        let r = record(id);
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let (api, prompt, completion, cached) = match id.as_str() {
            "t-messages-json" | "t-messages-stream" => (
                "messages",
                n(&usage["input_tokens"])
                    + n(&usage["cache_read_input_tokens"])
                    + n(&usage["cache_creation_input_tokens"]),
                n(&usage["output_tokens"]),
                n(&usage["cache_read_input_tokens"]),
            ),
            "t-responses-json" | "t-responses-stream" => (
                "responses",
                n(&usage["input_tokens"]),
                n(&usage["output_tokens"]),
                n(&usage["input_tokens_details"]["cached_tokens"]),
            ),
            "t-embeddings" => ("embeddings", n(&usage["prompt_tokens"]), 0, 0),
            other => panic!("unexpected id {other}"),
        };
        assert!(!r.usage_estimated, "{id}: {r:?}");
        assert_eq!(r.api, api, "{id}");
        assert_eq!(
            (r.prompt_tokens, r.completion_tokens, r.cached_tokens),
            (prompt, completion, cached),
            "{id}: the record differs from what the SDK was told ({usage})"
        );
        assert_eq!(r.total_tokens, prompt + completion, "{id}");
        assert!(prompt > 0, "{id}: {usage}");
    }
    // The metrics count records by API: every record above is exact, none for count_tokens.
    let text = get(gw.addr, "/metrics").text();
    let records = |api: &str, estimated: bool| {
        let series = format!(
            "llmproxy_usage_records_by_api_total{{api=\"{api}\",estimated=\"{estimated}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {series}in {text}"))
    };
    assert!(records("messages", false) >= 2, "{text}");
    assert!(records("responses", false) >= 2, "{text}");
    assert!(records("embeddings", false) >= 1, "{text}");
    assert_eq!(
        records("count_tokens", false) + records("count_tokens", true),
        0
    );
    // Counting tokens generates nothing: relayed, never billed.
    assert!(!spool_records(&spool)
        .iter()
        .any(|r| r.client_request_id.as_deref() == Some("t-count-tokens")));
}
