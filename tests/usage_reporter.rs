//! The reporter on its own (no gateway): quota hook, stats, key masking, shutdown draining, and
//! isolation between reporters (one stuck on a black-hole webhook, one healthy).

#[path = "support/usage.rs"]
mod usage;

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use llmproxy::api::Api;
use llmproxy::config::{self, Format, UsageHook};
use llmproxy::usage::{Captured, KeyRef, Outcome, Reporter, UsageEvent};
use usage::{spool_records, temp_dir, Receiver};

fn hook(spool: &std::path::Path, extra: &str) -> UsageHook {
    let yaml = format!(
        "backends: [{{url: 'http://127.0.0.1:9'}}]\nusage_hook:\n  enabled: true\n  spool_path: \"{}\"\n{extra}",
        spool.display()
    );
    config::parse(&yaml, Format::Yaml).unwrap().usage_hook
}

fn event(id: &str, captured: Captured) -> UsageEvent {
    UsageEvent {
        request_id: id.into(),
        client_request_id: None,
        started_at: SystemTime::now(),
        key: Some(Arc::new(KeyRef::new(
            "team-a".into(),
            Some("user_alice".into()),
            "sk-test-key-001".into(),
        ))),
        model: Some("m".into()),
        endpoint: "/v1/chat/completions".into(),
        api: Api::ChatCompletions,
        is_stream: false,
        backend_url: Arc::from("http://b:8000"),
        tier: 0,
        status_code: 200,
        latency: Duration::from_millis(120),
        ttft: None,
        outcome: Outcome::Completed,
        captured,
        content_events: 0,
        request_bytes: 400,
        fair_share_charged: 0.0,
    }
}

fn body(prompt: u64, completion: u64) -> Captured {
    Captured::Body {
        bytes: format!(
            r#"{{"choices":[],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
            prompt + completion
        )
        .into_bytes(),
        truncated: false,
    }
}

#[test]
fn quota_hook_stats_masking_and_drain_on_shutdown() {
    let dir = temp_dir("reporter");
    let spool = dir.join("usage.db");
    let charged = Arc::new(AtomicU64::new(0));
    let seen = charged.clone();
    let reporter = Reporter::start(
        &hook(&spool, ""),
        1,
        Some(Box::new(move |key, tokens: &llmproxy::usage::Tokens, _| {
            // The hook gets the key itself even though the record carries it masked.
            assert_eq!(key, "sk-test-key-001");
            seen.fetch_add(tokens.total, Ordering::Relaxed);
        })),
    )
    .unwrap();
    let sender = reporter.sender();
    for i in 0..1000 {
        sender.send(0, event(&format!("r-{i}"), body(3, 4)));
    }
    sender.send(0, event("r-estimated", Captured::Nothing));
    let stats = reporter.stats().clone();
    drop(sender);
    reporter.shutdown();

    let records = spool_records(&spool);
    assert_eq!(records.len(), 1001);
    assert_eq!(records[0].api_key.as_deref(), Some("sk-te...001"));
    assert_eq!(records[0].key_name.as_deref(), Some("team-a"));
    assert_eq!(records[0].user_id.as_deref(), Some("user_alice"));
    let last = &records[1000];
    assert!(last.usage_estimated);
    assert_eq!((last.prompt_tokens, last.completion_tokens), (100, 0));
    assert_eq!(charged.load(Ordering::Relaxed), 1000 * 7 + 100);
    assert_eq!(stats.records.load(Ordering::Relaxed), 1001);
    assert_eq!(stats.prompt_tokens.load(Ordering::Relaxed), 3000 + 100);
    assert_eq!(stats.completion_tokens.load(Ordering::Relaxed), 4000);
    assert_eq!(stats.estimated.load(Ordering::Relaxed), 1);
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);

    // include_raw_key: the key as the client sent it.
    let raw_spool = dir.join("raw.db");
    let reporter =
        Reporter::start(&hook(&raw_spool, "  include_raw_key: true\n"), 1, None).unwrap();
    reporter.sender().send(0, event("raw", body(1, 1)));
    reporter.shutdown();
    assert_eq!(
        spool_records(&raw_spool)[0].api_key.as_deref(),
        Some("sk-test-key-001")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn full_channel_drops_and_counts() {
    let dir = temp_dir("drops");
    let reporter = Reporter::start(
        &hook(&dir.join("usage.db"), "  channel_capacity: 1\n"),
        1,
        None,
    )
    .unwrap();
    let sender = reporter.sender();
    for i in 0..20_000 {
        sender.send(0, event(&format!("d-{i}"), body(1, 1)));
    }
    let stats = reporter.stats().clone();
    drop(sender);
    reporter.shutdown();
    let dropped = stats.dropped.load(Ordering::Relaxed);
    let spooled = stats.records.load(Ordering::Relaxed);
    assert!(dropped > 0);
    assert_eq!(dropped + spooled, 20_000);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_stuck_reporter_does_not_delay_another() {
    let dir = temp_dir("isolation");
    // Accepts connections and never answers: every POST to it runs into its timeout.
    let black_hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let stuck_url = format!("http://{}/usage", black_hole.local_addr().unwrap());
    let receiver = Receiver::start(&dir.join("posts.jsonl"), 0);
    let extra = format!(
        "  reporters:\n    - {{name: stuck, type: webhook, url: \"{stuck_url}\", timeout: 3s, retry: 2}}\n    \
         - {{name: live, type: webhook, url: \"{}\", batch_size: 50}}\n",
        receiver.url()
    );
    let reporter = Reporter::start(&hook(&dir.join("usage.db"), &extra), 1, None).unwrap();
    let start = Instant::now();
    let sender = reporter.sender();
    for i in 0..100 {
        sender.send(0, event(&format!("i-{i}"), body(2, 2)));
    }
    let stats = reporter.stats().clone();
    let live = &stats.reporters[1];
    assert_eq!(live.name, "live");
    while live.delivered.load(Ordering::Relaxed) < 100 || live.backlog.load(Ordering::Relaxed) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "live reporter was held up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let stuck = &stats.reporters[0];
    assert_eq!(stuck.delivered.load(Ordering::Relaxed), 0);
    assert!(stuck.backlog.load(Ordering::Relaxed) > 0);
    drop(sender);
    drop(black_hole);
    reporter.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}
