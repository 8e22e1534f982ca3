//! Per-request and per-chunk costs of the relay's own work, without sockets: parsing a request
//! head, and following a relayed SSE stream (chunk framing + usage meter), the only work the
//! relay loop does per upstream read besides its two syscalls; and the meter alone on each API's
//! stream, per byte (a Messages or Responses stream must cost within 10% of a chat stream).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use llmproxy::api::Api;
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
            let mut m = Meter::new(Api::ChatCompletions, true, false);
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
            let mut m = Meter::new(Api::ChatCompletions, true, true);
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

/// Bytes of each API's stream in [`meter_per_api`]: about 64 KiB, vLLM's events as it sends them.
const STREAM_BYTES: usize = 64 * 1024;

/// An API's stream as vLLM sends it: events before the tokens, token `i`'s event, and events
/// after them (with usage).
struct StreamShape {
    open: &'static [&'static str],
    token: fn(usize) -> String,
    close: &'static [&'static str],
}

/// A stream of `api` as vLLM sends it, one event per read: its opening events, token events until
/// [`STREAM_BYTES`], and its closing events with usage.
fn api_stream(api: Api) -> Vec<Vec<u8>> {
    let StreamShape { open, token, close } = match api {
        Api::Messages => StreamShape {
            open: &[
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"chatcmpl-5f0d\",\"content\":[],\"model\":\"qwen\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":12,\"output_tokens\":0}}}\n\n",
                "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"content_block\":{\"type\":\"text\",\"text\":\"\"},\"index\":0}\n\n",
            ],
            token: |i| format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"delta\":{{\"type\":\"text_delta\",\"text\":\"tok{i} \"}},\"index\":0}}\n\n"),
            close: &[
                "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
                "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":12,\"output_tokens\":600}}\n\n",
                "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            ],
        },
        Api::Responses => StreamShape {
            open: &[
                "event: response.created\ndata: {\"response\":{\"id\":\"resp_5f0d\",\"created_at\":1732700000,\"model\":\"qwen\",\"object\":\"response\",\"output\":[],\"status\":\"in_progress\",\"usage\":null},\"sequence_number\":0,\"type\":\"response.created\"}\n\n",
            ],
            token: |i| format!("event: response.output_text.delta\ndata: {{\"content_index\":0,\"delta\":\"tok{i} \",\"item_id\":\"msg_5f0d\",\"logprobs\":[],\"output_index\":0,\"sequence_number\":{i},\"type\":\"response.output_text.delta\"}}\n\n"),
            close: &[
                "event: response.completed\ndata: {\"response\":{\"id\":\"resp_5f0d\",\"created_at\":1732700000,\"model\":\"qwen\",\"object\":\"response\",\"output\":[],\"status\":\"completed\",\"usage\":{\"input_tokens\":12,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":600,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":612}},\"sequence_number\":601,\"type\":\"response.completed\"}\n\n",
            ],
        },
        _ => StreamShape {
            open: &["data: {\"id\":\"chatcmpl-5f0d\",\"object\":\"chat.completion.chunk\",\"created\":1732700000,\"model\":\"qwen\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n"],
            token: |i| format!("data: {{\"id\":\"chatcmpl-5f0d\",\"object\":\"chat.completion.chunk\",\"created\":1732700000,\"model\":\"qwen\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"),
            close: &[
                "data: {\"id\":\"chatcmpl-5f0d\",\"object\":\"chat.completion.chunk\",\"created\":1732700000,\"model\":\"qwen\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"total_tokens\":612,\"completion_tokens\":600}}\n\n",
                "data: [DONE]\n\n",
            ],
        },
    };
    let mut events: Vec<Vec<u8>> = open.iter().map(|e| e.as_bytes().to_vec()).collect();
    let closing: usize = close.iter().map(|e| e.len()).sum();
    let mut bytes: usize = events.iter().map(Vec::len).sum::<usize>() + closing;
    let mut i = 0;
    while bytes < STREAM_BYTES {
        let event = token(i).into_bytes();
        bytes += event.len();
        events.push(event);
        i += 1;
    }
    events.extend(close.iter().map(|e| e.as_bytes().to_vec()));
    events
}

fn meter_per_api(c: &mut Criterion) {
    let mut g = c.benchmark_group("meter_per_api");
    for api in [Api::ChatCompletions, Api::Messages, Api::Responses] {
        let events = api_stream(api);
        let bytes: usize = events.iter().map(Vec::len).sum();
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(api.as_str(), |b| {
            b.iter(|| {
                let mut m = Meter::new(api, true, false);
                for e in &events {
                    m.observe(black_box(e));
                }
                black_box(m.finish())
            })
        });
        eprintln!(
            "meter_per_api/{}: {} events, {bytes} bytes",
            api.as_str(),
            events.len()
        );
    }
    g.finish();
}

criterion_group!(benches, request_head, relay_chunks, meter_per_api);
criterion_main!(benches);
