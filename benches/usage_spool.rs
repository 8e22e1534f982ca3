//! Spool write throughput: records per second into the SQLite outbox, in the reporter's batch
//! shape (one transaction per batch), alone and together with parsing each worker event into a
//! record (what the ingest thread does per request). Target: >= 50k records/s.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use llmproxy::api::Api;
use llmproxy::usage::{
    Accounted, Billed, Captured, KeyRef, Outcome, Record, Spool, UsageEvent, UsageRecord,
};

/// A streamed request's event as a worker sends it: the last SSE usage event captured.
fn event(i: usize) -> UsageEvent {
    UsageEvent {
        request_id: format!("req-{i:016x}"),
        client_request_id: None,
        started_at: SystemTime::now(),
        key: Some(Arc::new(KeyRef::new(
            format!("key-{}", i % 16),
            Some("user_alice".into()),
            "sk-prod-0123456789abcdef".into(),
        ))),
        model: Some("meta-llama/Llama-3-8b".into()),
        endpoint: "/v1/chat/completions".into(),
        api: Api::ChatCompletions,
        is_stream: true,
        backend_url: Arc::from("http://vllm:8000"),
        tier: 0,
        status_code: 200,
        latency: Duration::from_millis(812),
        ttft: Some(Duration::from_millis(95)),
        outcome: Outcome::Completed,
        captured: Captured::Event(
            br#"{"id":"chatcmpl-0123456789abcdef","object":"chat.completion.chunk","created":1768386600,"model":"meta-llama/Llama-3-8b","choices":[],"usage":{"prompt_tokens":15,"total_tokens":57,"completion_tokens":42}}"#
                .to_vec(),
        ),
        content_events: 42,
        request_bytes: 120,
        fair_share_charged: 0.0,
    }
}

fn record(i: usize) -> UsageRecord {
    UsageRecord {
        request_id: format!("req-{i:016x}"),
        client_request_id: None,
        timestamp: "2026-01-14T10:30:00.000Z".into(),
        key_name: Some(format!("key-{}", i % 16)),
        user_id: Some("user_alice".into()),
        api_key: Some("sk-te...001".into()),
        model: Some("meta-llama/Llama-3-8b".into()),
        endpoint: "/v1/chat/completions".into(),
        api: "chat_completions".into(),
        is_stream: true,
        backend_url: "http://vllm:8000".into(),
        tier: 0,
        status_code: 200,
        latency_ms: 812,
        ttft_ms: Some(95),
        prompt_tokens: 15,
        completion_tokens: 42,
        total_tokens: 57,
        cached_tokens: 0,
        reasoning_tokens: 0,
        usage_estimated: false,
        status: "ok".into(),
    }
}

fn spool_insert(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("llmproxy-bench-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut spool = Spool::open(&dir.join("usage.db")).expect("open spool");
    let mut group = c.benchmark_group("usage_spool");
    group.measurement_time(Duration::from_secs(5));
    for batch in [256usize, 4096] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("insert_batch_{batch}"), |b| {
            b.iter_batched(
                || (0..batch).map(record).collect::<Vec<_>>(),
                |records| spool.insert(&records).expect("insert"),
                BatchSize::LargeInput,
            )
        });
    }
    group.throughput(Throughput::Elements(4096));
    group.bench_function("parse_and_insert_batch_4096", |b| {
        b.iter_batched(
            || (0..4096).map(event).collect::<Vec<_>>(),
            |events| {
                let batch: Vec<Accounted> = events
                    .into_iter()
                    .map(|e| {
                        let billed = Billed::of(&e);
                        Accounted::new(e, billed)
                    })
                    .collect();
                let records: Vec<Record<&str>> = batch.iter().map(|a| a.record(false)).collect();
                spool.insert(&records).expect("insert")
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, spool_insert);
criterion_main!(benches);
