//! Per-request and per-chunk costs of the relay's own work, without sockets: parsing a request
//! head, and following a relayed SSE stream (chunk framing + usage meter), the only work the
//! relay loop does per upstream read besides its two syscalls.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use llmproxy::http::{parse_request, BodyTracker, Framing, RequestHead};
use llmproxy::usage::Meter;

const HEAD: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway.internal:8000\r\n\
Accept: application/json\r\nContent-Type: application/json\r\nUser-Agent: OpenAI/Python 1.55.0\r\n\
X-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.55.0\r\nX-Stainless-OS: Linux\r\n\
X-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\nX-Stainless-Runtime-Version: 3.11.7\r\n\
Authorization: Bearer sk-llmproxy-dev-001\r\nX-Stainless-Async: false\r\nContent-Length: 118\r\n\r\n";

/// One vLLM-style token event framed as one chunk, as a backend writes it.
fn sse_chunk(i: usize) -> Vec<u8> {
    let event = format!(
        "data: {{\"id\":\"chatcmpl-5f0d\",\"object\":\"chat.completion.chunk\",\"created\":1732700000,\"model\":\"qwen\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
    );
    let mut c = format!("{:x}\r\n", event.len()).into_bytes();
    c.extend_from_slice(event.as_bytes());
    c.extend_from_slice(b"\r\n");
    c
}

fn request_head(c: &mut Criterion) {
    let mut head = RequestHead::default();
    let mut g = c.benchmark_group("request_head");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_openai_sdk_head", |b| {
        b.iter(|| parse_request(black_box(HEAD), 64 * 1024, &mut head).unwrap())
    });
    g.finish();
}

fn relay_chunks(c: &mut Criterion) {
    let chunks: Vec<Vec<u8>> = (0..256).map(sse_chunk).collect();
    let bytes: usize = chunks.iter().map(Vec::len).sum();
    let mut g = c.benchmark_group("relay_loop");
    g.throughput(Throughput::Elements(chunks.len() as u64));
    g.bench_function("chunk_tracking_only", |b| {
        b.iter(|| {
            let mut t = BodyTracker::new(Framing::Chunked);
            for ch in &chunks {
                black_box(t.advance(ch, |_| {}).unwrap());
            }
        })
    });
    g.bench_function("chunk_tracking_and_sse_meter", |b| {
        b.iter(|| {
            let mut t = BodyTracker::new(Framing::Chunked);
            let mut m = Meter::new(true, false);
            for ch in &chunks {
                black_box(t.advance(ch, |d| m.observe(d)).unwrap());
            }
            black_box(m.content_events())
        })
    });
    g.bench_function("strip_mode_reframing", |b| {
        let mut out = Vec::with_capacity(4096);
        b.iter(|| {
            let mut t = BodyTracker::new(Framing::Chunked);
            let mut m = Meter::new(true, true);
            for ch in &chunks {
                out.clear();
                black_box(t.advance(ch, |d| m.filter(d, &mut out)).unwrap());
            }
        })
    });
    g.finish();
    eprintln!(
        "relay_loop: {} chunks, {bytes} bytes per iteration",
        chunks.len()
    );
}

criterion_group!(benches, request_head, relay_chunks);
criterion_main!(benches);
