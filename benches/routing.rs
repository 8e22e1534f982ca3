//! Per-request cost of choosing a backend: `round_robin` against `cache_aware` over 4 backends,
//! for a small request (shorter than one block: no hashing work) and for a 24 KB prompt (about
//! 6k tokens: 96 blocks hashed as a chain, matched against each backend's index and recorded),
//! either repeated (the conversation's prefix is found) or new each time (nothing matches, every
//! block is written). The JSON scan that finds the prompt is the request's one scan either way.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use llmproxy::config::{parse, Format};
use llmproxy::upstream::{Backends, PickRequest, WorkerUpstreams};

fn upstreams(strategy: &str) -> WorkerUpstreams {
    let yaml = format!(
        "backends: [{{url: 'http://127.0.0.1:9001'}}, {{url: 'http://127.0.0.1:9002'}}, \
         {{url: 'http://127.0.0.1:9003'}}, {{url: 'http://127.0.0.1:9004'}}]\n\
         load_balance: {strategy}\n"
    );
    let config = parse(&yaml, Format::Yaml).unwrap();
    WorkerUpstreams::new(Backends::new(&config).expect("backends"), &config, 0)
}

fn pick(c: &mut Criterion) {
    let small: [&[u8]; 1] = [br#"[{"role":"user","content":"hi"}]"#];
    let system = "You are a careful assistant. Follow the policy below. ".repeat(160);
    let history = r#",{"role":"user","content":"What does clause 7 mean for us?"},{"role":"assistant","content":"It means the renewal is automatic unless you object in writing."}"#.repeat(102);
    let long_text = format!(r#"[{{"role":"system","content":"{system}"}}{history}]"#);
    assert!(
        (24_000..26_000).contains(&long_text.len()),
        "{}",
        long_text.len()
    );
    let long: [&[u8]; 1] = [long_text.as_bytes()];
    let models: Vec<String> = (0..4096).map(|i| format!("model-{i}")).collect();

    let mut g = c.benchmark_group("pick");
    g.throughput(Throughput::Elements(1));
    for (strategy, name, prompt) in [
        ("round_robin", "round_robin/small", &small[..]),
        ("cache_aware", "cache_aware/small", &small[..]),
        ("round_robin", "round_robin/24k", &long[..]),
        ("cache_aware", "cache_aware/24k_repeated", &long[..]),
    ] {
        let up = upstreams(strategy);
        let req = PickRequest {
            model: Some("m"),
            prompt,
            ..Default::default()
        };
        g.bench_function(name, |b| b.iter(|| black_box(up.pick(black_box(&req)))));
    }
    // A new prompt every time: another model gives the same text another chain.
    let up = upstreams("cache_aware");
    let mut i = 0;
    g.bench_function("cache_aware/24k_new", |b| {
        b.iter(|| {
            i = (i + 1) % models.len();
            let req = PickRequest {
                model: Some(&models[i]),
                prompt: &long[..],
                ..Default::default()
            };
            black_box(up.pick(black_box(&req)))
        })
    });
    g.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
