//! Delivery through the spool: a webhook that fails and recovers, batching, signatures, a
//! gateway killed with SIGKILL while its reporters are down, SIGTERM draining, and the
//! `llmproxy usage` command.

mod common;
#[path = "support/usage.rs"]
mod usage;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{closed_port, post_json, spawn_gateway, spawn_mock, wait_until};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use usage::{gateway_yaml, spool_records, temp_dir, Receiver};

fn chat(stream: bool) -> Value {
    json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": "How many tokens is this?"}],
        "stream": stream,
    })
}

/// Accepted (2xx) deliveries per client request id (the tests' X-Request-Id), from every POST
/// body (object or array).
fn accepted(posts: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for p in posts.iter().filter(|p| p["status"] == 200) {
        let records = match &p["body"] {
            Value::Array(items) => items.clone(),
            one => vec![one.clone()],
        };
        for r in records {
            *counts
                .entry(r["client_request_id"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
    }
    counts
}

fn webhook_reporter(url: &str, extra: &str) -> String {
    format!(
        "\n    - name: hook\n      type: webhook\n      url: \"{url}\"\n      timeout: 2s\n{extra}"
    )
}

#[test]
fn failing_webhook_recovers_with_one_delivery_per_request() {
    let mock = spawn_mock(&["--tokens", "5"]);
    let dir = temp_dir("webhook");
    let receiver = Receiver::start(&dir.join("posts.jsonl"), 3);
    let reporters = webhook_reporter(
        &receiver.url(),
        "      retry: 1\n      secret: \"s3cret\"\n      headers:\n        Authorization: \"Bearer t0k\"\n",
    );
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &dir.join("usage.db"), &reporters));
    let ids: Vec<String> = (0..5).map(|i| format!("w-{i}")).collect();
    for id in &ids {
        let r = post_json(
            gw.addr,
            "/v1/chat/completions",
            &chat(true),
            &[("X-Request-Id", id)],
        );
        assert_eq!(r.status, 200);
    }
    let done = wait_until(Duration::from_secs(20), || {
        accepted(&receiver.posts()).len() == ids.len()
    });
    assert!(done, "posts: {:?}", receiver.posts());
    // Nothing more arrives later: once the reporter's cursor is past every record, nothing is
    // left to send, and each accepted record stays accepted once.
    assert!(wait_until(Duration::from_secs(10), || common::metric(
        gw.addr,
        "llmproxy_usage_spool_backlog"
    ) == 0.0));
    let posts = receiver.posts();
    let counts = accepted(&posts);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id}: {counts:?}");
    }
    assert_eq!(posts.iter().filter(|p| p["status"] == 500).count(), 3);

    for p in &posts {
        let h = &p["headers"];
        assert_eq!(h["idempotency-key"], p["body"]["request_id"]);
        assert_eq!(h["authorization"], "Bearer t0k");
        assert_eq!(h["content-type"], "application/json");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(p["raw"].as_str().unwrap().as_bytes());
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(h["x-llmproxy-signature"], expected.as_str());
        let body = &p["body"];
        for field in [
            "request_id",
            "user_id",
            "api_key",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "is_stream",
            "endpoint",
            "timestamp",
            "backend_url",
            "key_name",
            "status_code",
            "latency_ms",
            "ttft_ms",
            "cached_tokens",
            "reasoning_tokens",
            "usage_estimated",
            "status",
        ] {
            assert!(body.get(field).is_some(), "missing {field}: {body}");
        }
        assert_eq!(body["completion_tokens"], 5);
        assert_eq!(body["is_stream"], true);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A batch whose delivery failed is sent again as it was, though more records were spooled
/// during the backoff: its `Idempotency-Key` (the first record's id) always names the same
/// records, so a receiver that deduplicates by it loses none.
#[test]
fn a_failed_batch_is_sent_again_as_it_was() {
    let mock = spawn_mock(&["--tokens", "2"]);
    let dir = temp_dir("retry-batch");
    let receiver = Receiver::start(&dir.join("posts.jsonl"), 1);
    let reporters = webhook_reporter(
        &receiver.url(),
        "      retry: 0\n      batch_size: 50\n      batch_timeout: 200ms\n",
    );
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &dir.join("usage.db"), &reporters));
    let send = |prefix: &str| {
        for i in 0..3 {
            let id = format!("{prefix}-{i}");
            let r = post_json(
                gw.addr,
                "/v1/chat/completions",
                &chat(false),
                &[("X-Request-Id", &id)],
            );
            assert_eq!(r.status, 200);
        }
    };
    send("before");
    assert!(wait_until(Duration::from_secs(20), || !receiver
        .posts()
        .is_empty()));
    // Spooled during the backoff (at least half a second after the failure).
    send("during");
    assert!(
        wait_until(Duration::from_secs(20), || accepted(&receiver.posts())
            .len()
            == 6),
        "posts: {:?}",
        receiver.posts()
    );
    let ids = |p: &Value| -> Vec<String> {
        p["body"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["client_request_id"].as_str().unwrap().to_string())
            .collect()
    };
    let posts = receiver.posts();
    assert_eq!(posts[0]["status"], 500);
    let mut by_key: HashMap<&str, Vec<String>> = HashMap::new();
    for p in &posts {
        let key = p["headers"]["idempotency-key"].as_str().unwrap();
        let first = by_key.entry(key).or_insert_with(|| ids(p));
        assert_eq!(*first, ids(p), "{key} named two batches");
    }
    let failed_key = posts[0]["headers"]["idempotency-key"].as_str().unwrap();
    assert!(
        posts[1..]
            .iter()
            .any(|p| p["status"] == 200 && p["headers"]["idempotency-key"] == failed_key),
        "the failed batch was never accepted"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn batched_webhook_sends_arrays() {
    let mock = spawn_mock(&["--tokens", "2"]);
    let dir = temp_dir("batch");
    let receiver = Receiver::start(&dir.join("posts.jsonl"), 0);
    // Short batches wait up to batch_timeout for more: ten quick requests go as 4 + 4 + 2.
    let reporters = webhook_reporter(
        &receiver.url(),
        "      batch_size: 4\n      batch_timeout: 3s\n",
    );
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &dir.join("usage.db"), &reporters));
    for i in 0..10 {
        let id = format!("b-{i}");
        post_json(
            gw.addr,
            "/v1/chat/completions",
            &chat(false),
            &[("X-Request-Id", &id)],
        );
    }
    assert!(wait_until(Duration::from_secs(10), || accepted(
        &receiver.posts()
    )
    .len()
        == 10));
    let posts = receiver.posts();
    assert!(accepted(&posts).values().all(|&n| n == 1));
    let mut sizes = Vec::new();
    for p in &posts {
        let items = p["body"].as_array().expect("a JSON array");
        sizes.push(items.len());
        assert_eq!(p["headers"]["idempotency-key"], items[0]["request_id"]);
    }
    assert_eq!(sizes, [4, 4, 2]);
    let _ = std::fs::remove_dir_all(dir);
}

fn sqlite_ids(path: &Path, table: &str) -> Vec<String> {
    let Ok(conn) = rusqlite::Connection::open(path) else {
        return Vec::new();
    };
    let Ok(mut stmt) = conn.prepare(&format!("SELECT client_request_id FROM {table}")) else {
        return Vec::new();
    };
    stmt.query_map([], |r| r.get(0))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

#[test]
fn records_survive_sigkill_while_the_webhook_is_down() {
    let mock = spawn_mock(&["--tokens", "4"]);
    let dir = temp_dir("kill");
    let spool = dir.join("usage.db");
    let db = dir.join("warehouse.db");
    // Down until the receiver takes over the port.
    let webhook_port = closed_port();
    let url = format!("http://{}/usage", webhook_port.addr);
    let reporters = format!(
        "{}    - name: warehouse\n      type: database\n      batch_size: 7\n      \
         database: {{driver: sqlite, dsn: \"{}\", table: usage_kill}}\n",
        webhook_reporter(&url, "      retry: 0\n"),
        db.display()
    );
    let config = gateway_yaml(mock.addr, &spool, &reporters);
    let ids: Vec<String> = (0..20).map(|i| format!("k-{i}")).collect();
    {
        let gw = spawn_gateway(&config);
        for id in &ids {
            let r = post_json(
                gw.addr,
                "/v1/chat/completions",
                &chat(false),
                &[("X-Request-Id", id)],
            );
            assert_eq!(r.status, 200);
        }
        assert!(wait_until(Duration::from_secs(10), || spool_records(
            &spool
        )
        .len()
            == ids.len()));
        // Dropping the process handle sends SIGKILL.
    }
    let receiver = Receiver::start_on(webhook_port.addr.port(), &dir.join("posts.jsonl"), 0);
    let _gw = spawn_gateway(&config);
    let delivered = wait_until(Duration::from_secs(20), || {
        accepted(&receiver.posts()).len() == ids.len()
            && sqlite_ids(&db, "usage_kill").len() == ids.len()
    });
    assert!(
        delivered,
        "webhook: {:?}, sql: {:?}",
        accepted(&receiver.posts()),
        sqlite_ids(&db, "usage_kill")
    );
    let mut in_sql = sqlite_ids(&db, "usage_kill");
    in_sql.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(in_sql, expected);
    assert!(accepted(&receiver.posts()).values().all(|&n| n == 1));
    let _ = std::fs::remove_dir_all(dir);
}

/// `durability: sync`: a request's record is in the spool before its last byte
/// reaches the client, so a SIGKILL right after the last answer loses nothing. Several clients
/// at once, streams and plain bodies, so that commits are grouped across connections.
#[test]
fn every_answered_request_survives_sigkill_right_after_its_answer() {
    let mock = spawn_mock(&["--tokens", "3"]);
    let dir = temp_dir("kill-sync");
    let spool = dir.join("usage.db");
    let webhook_port = closed_port();
    let url = format!("http://{}/usage", webhook_port.addr);
    let config = gateway_yaml(
        mock.addr,
        &spool,
        &webhook_reporter(&url, "      retry: 0\n      batch_size: 50\n"),
    )
    .replace("  enabled: true\n", "  enabled: true\n  durability: sync\n");
    assert!(config.contains("durability: sync"));
    let (clients, per_client) = (4, 60);
    let mut ids = Vec::new();
    {
        let gw = spawn_gateway(&config);
        std::thread::scope(|s| {
            let answered: Vec<_> = (0..clients)
                .map(|t| {
                    s.spawn(move || {
                        (0..per_client)
                            .map(|i| {
                                let id = format!("s-{t}-{i}");
                                let r = post_json(
                                    gw.addr,
                                    "/v1/chat/completions",
                                    &chat(i % 2 == 0),
                                    &[("X-Request-Id", &id)],
                                );
                                assert_eq!(r.status, 200, "{id}");
                                id
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for a in answered {
                ids.extend(a.join().unwrap());
            }
        });
        // Dropping the process handle sends SIGKILL, right after the last answer.
    }
    let receiver = Receiver::start_on(webhook_port.addr.port(), &dir.join("posts.jsonl"), 0);
    let _gw = spawn_gateway(&config);
    let delivered = wait_until(Duration::from_secs(30), || {
        accepted(&receiver.posts()).len() == ids.len()
    });
    let counts = accepted(&receiver.posts());
    let missing: Vec<&String> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    assert!(delivered, "{} records lost: {missing:?}", missing.len());
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A reload that points the reporter at another webhook: the replaced reporter's delivery
/// stops before the new one delivers, so the old sink gets no record of a request answered
/// after the reload, and every record reaches one of the two exactly once.
#[test]
fn a_reload_sends_no_new_record_to_the_old_sink() {
    let mock = spawn_mock(&["--tokens", "2"]);
    let dir = temp_dir("reload");
    let spool = dir.join("usage.db");
    let old = Receiver::start(&dir.join("old.jsonl"), 0);
    let new = Receiver::start(&dir.join("new.jsonl"), 0);
    let notes = common::Notifications::new();
    let gw = common::spawn_gateway_notifying(
        &gateway_yaml(mock.addr, &spool, &webhook_reporter(&old.url(), "")),
        &notes,
    );
    notes.expect("READY=1");
    let send = |prefix: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                let id = format!("{prefix}-{i}");
                let r = post_json(
                    gw.addr,
                    "/v1/chat/completions",
                    &chat(i % 2 == 0),
                    &[("X-Request-Id", &id)],
                );
                assert_eq!(r.status, 200, "{id}");
                id
            })
            .collect()
    };
    let before = send("before", 30);
    let file = gw.config.as_ref().unwrap();
    let text = std::fs::read_to_string(file).unwrap();
    std::fs::write(file, text.replace(&old.url(), &new.url())).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(gw.child.id() as i32, libc::SIGHUP) }, 0);
    notes.expect("RELOADING=1");
    notes.expect("READY=1");
    // Requests keep coming while the replaced reporter winds down.
    let after: Vec<String> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..2)
            .map(|t| s.spawn(move || send(&format!("after-{t}"), 60)))
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    });
    let all = before.len() + after.len();
    let delivered = wait_until(Duration::from_secs(30), || {
        accepted(&old.posts()).len() + accepted(&new.posts()).len() >= all
    });
    let (to_old, to_new) = (accepted(&old.posts()), accepted(&new.posts()));
    assert!(delivered, "old: {to_old:?}, new: {to_new:?}");
    let late: Vec<&String> = after.iter().filter(|id| to_old.contains_key(*id)).collect();
    assert!(
        late.is_empty(),
        "records of the new config sent to the old sink: {late:?}"
    );
    for id in before.iter().chain(&after) {
        let n = to_old.get(id).unwrap_or(&0) + to_new.get(id).unwrap_or(&0);
        assert_eq!(n, 1, "{id}: old {to_old:?}, new {to_new:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_drains_into_the_spool_and_usage_prints_totals() {
    let mock = spawn_mock(&["--tokens", "6"]);
    let dir = temp_dir("term");
    let spool = dir.join("usage.db");
    let webhook_port = closed_port();
    let url = format!("http://{}/usage", webhook_port.addr);
    let mut gw = spawn_gateway(&gateway_yaml(
        mock.addr,
        &spool,
        &webhook_reporter(&url, "      retry: 0\n"),
    ));
    for i in 0..12 {
        let model_body = chat(i % 2 == 0);
        post_json(
            gw.addr,
            "/v1/chat/completions",
            &model_body,
            &[("X-Request-Id", &format!("t-{i}"))],
        );
    }
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(gw.child.id() as i32, libc::SIGTERM) };
    let exited = wait_until(Duration::from_secs(15), || {
        matches!(gw.child.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "gateway did not exit on SIGTERM");
    let records = spool_records(&spool);
    assert_eq!(records.len(), 12);
    assert!(records.iter().all(|r| r.completion_tokens == 6));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args(["usage", "--since", "1h", "--by", "model", "--spool"])
        .arg(&spool)
        .output()
        .expect("run llmproxy usage");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("mock-model"))
        .unwrap_or_else(|| panic!("{text}"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap())
        .collect();
    let prompt: u64 = records.iter().map(|r| r.prompt_tokens).sum();
    assert_eq!(numbers, [12, prompt, 72, prompt + 72, 0]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_reused_client_request_id_is_billed_every_time() {
    let mock = spawn_mock(&["--tokens", "3"]);
    let dir = temp_dir("dup-id");
    let db = dir.join("warehouse.db");
    let reporters = format!(
        "\n    - name: warehouse\n      type: database\n      batch_timeout: 0s\n      \
         database: {{driver: sqlite, dsn: \"{}\", table: usage_dup}}\n",
        db.display()
    );
    let spool = dir.join("usage.db");
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &spool, &reporters));
    for _ in 0..3 {
        let r = post_json(
            gw.addr,
            "/v1/chat/completions",
            &chat(false),
            &[("X-Request-Id", "same-id")],
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-request-id"), Some("same-id"));
    }
    // Three requests, three rows: the client's id is kept beside a unique billing id.
    assert!(
        wait_until(Duration::from_secs(10), || sqlite_ids(&db, "usage_dup")
            .len()
            == 3),
        "{:?}",
        sqlite_ids(&db, "usage_dup")
    );
    assert!(sqlite_ids(&db, "usage_dup")
        .iter()
        .all(|id| id == "same-id"));
    let records = spool_records(&spool);
    let mut ids: Vec<&str> = records.iter().map(|r| r.request_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let _ = std::fs::remove_dir_all(dir);
}
