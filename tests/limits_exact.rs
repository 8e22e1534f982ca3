//! Limits under real concurrency: exact request counts across worker threads, queueing with a
//! deadline instead of an immediate 429.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn db(tag: &str) -> String {
    std::env::temp_dir()
        .join(format!("llmproxy-limits-{tag}-{}.db", std::process::id()))
        .display()
        .to_string()
}

/// 1000 requests over 50 keep-alive connections and 2 workers against one key limited to 100 per
/// minute: exactly 100 get through, plus at most what the rate refilled while the test ran.
#[test]
fn thousand_requests_fifty_connections_admit_exactly_the_limit() {
    let mock = spawn_mock(&["--workers", "2"]);
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends: [{{url: \"http://{}\"}}]\n\
         auth: {{quota_path: \"{}\"}}\napi_keys: [{{key: k}}]\n\
         rate_limit: {{per_key: {{requests_per_minute: 100}}}}\n",
        mock.addr,
        db("exact")
    ));
    let ok = AtomicU32::new(0);
    let limited = AtomicU32::new(0);
    let body =
        json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let raw = raw_request(
        "POST",
        "/v1/chat/completions",
        body.as_bytes(),
        &[("Authorization", "Bearer k")],
    );
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..50 {
            s.spawn(|| {
                let mut c = Client::connect(gw.addr);
                for _ in 0..20 {
                    c.send(&raw);
                    match c.read_response().status {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        429 => limited.fetch_add(1, Ordering::Relaxed),
                        other => panic!("unexpected status {other}"),
                    };
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let ok = ok.load(Ordering::Relaxed);
    assert_eq!(ok + limited.load(Ordering::Relaxed), 1000);
    // One more request per 600 ms of test time is the limit working, not leaking.
    let refill = (elapsed.as_millis() / 600) as u32;
    assert!(
        (100..=100 + refill).contains(&ok),
        "admitted {ok} in {elapsed:?} (allowed 100..={})",
        100 + refill
    );
}

/// Waits until the simulator has received `n` requests in all: a request that reached it holds
/// its admission slot until the answer.
fn reached(mock: &Proc, n: f64) {
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            mock.addr,
            "mock_requests_total"
        ) == n),
        "the simulator did not get {n} requests"
    );
}

/// With `queue_timeout`, a request over `max_concurrent` waits for a slot instead of a 429, and
/// gets the 429 only once the deadline passes.
#[test]
fn queueing_waits_for_a_slot_until_the_deadline() {
    let mock = spawn_mock(&[]);
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends: [{{url: \"http://{}\"}}]\n\
         rate_limit: {{global: {{max_concurrent: 1}}, queue_timeout: 3s}}\n",
        mock.addr
    ));
    let slow = |ms: &str| {
        let body = json!({"model": "mock-model", "messages": []}).to_string();
        raw_request(
            "POST",
            "/v1/chat/completions",
            body.as_bytes(),
            &[("x-mock-delay-ms", ms)],
        )
    };
    // Holds the only slot for 500 ms.
    let mut first = TcpStream::connect(gw.addr).unwrap();
    first.write_all(&slow("500")).unwrap();
    reached(&mock, 1.0);
    let t = Instant::now();
    let r = request(gw.addr, &slow("0"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "did not wait: {:?}",
        t.elapsed()
    );
    let mut head = [0u8; 12];
    first.read_exact(&mut head).unwrap();
    assert_eq!(&head[9..12], b"200");
    drop(first);

    // Holds the slot past the deadline: the waiter gets 429 after ~3 s.
    let mut long = TcpStream::connect(gw.addr).unwrap();
    long.write_all(&slow("5000")).unwrap();
    reached(&mock, 3.0);
    let t = Instant::now();
    let r = request(gw.addr, &slow("0"));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert!(
        t.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        t.elapsed()
    );
}

/// Two gateway processes sharing Redis (`rate_limit.storage: redis`) admit exactly the limit
/// between them.
#[test]
fn two_instances_sharing_redis_admit_exactly_the_limit() {
    if !service_up(&REDIS) {
        return;
    }
    let mock = spawn_mock(&["--workers", "2"]);
    let prefix = format!("{}:", unique_name("llmproxy-test"));
    let config = format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends: [{{url: \"http://{}\"}}]\n\
         rate_limit:\n  global: {{requests_per_minute: 50}}\n  storage: redis\n  \
         redis: {{url: \"redis://{}/\", prefix: \"{prefix}\"}}\n",
        mock.addr,
        REDIS.addr()
    );
    let gateways = [spawn_gateway(&config), spawn_gateway(&config)];
    let ok = AtomicU32::new(0);
    let body = json!({"model": "mock-model", "messages": []}).to_string();
    let raw = raw_request("POST", "/v1/chat/completions", body.as_bytes(), &[]);
    let started = Instant::now();
    std::thread::scope(|s| {
        for i in 0..20 {
            let (gw, ok, raw) = (gateways[i % 2].addr, &ok, &raw);
            s.spawn(move || {
                let mut c = Client::connect(gw);
                for _ in 0..15 {
                    c.send(raw);
                    let r = c.read_response();
                    match r.status {
                        200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        429 => assert!(r.header("retry-after").is_some()),
                        other => panic!("unexpected {other}: {}", r.text()),
                    }
                }
            });
        }
    });
    let ok = ok.load(Ordering::Relaxed);
    let refill = (started.elapsed().as_millis() / 1200) as u32;
    assert!(
        (50..=50 + refill).contains(&ok),
        "admitted {ok} (allowed 50..={})",
        50 + refill
    );
}

/// With Redis unreachable, each instance keeps limiting on its own counters.
#[test]
fn shared_rates_fall_back_to_local_limits_when_redis_is_down() {
    let mock = spawn_mock(&[]);
    let redis = closed_port();
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nbackends: [{{url: \"http://{}\"}}]\n\
         rate_limit:\n  global: {{requests_per_minute: 3}}\n  storage: redis\n  \
         redis: {{url: \"redis://{}/\"}}\n",
        mock.addr, redis.addr
    ));
    let body = json!({"model": "mock-model", "messages": []});
    let statuses: Vec<u16> = (0..4)
        .map(|_| post_json(gw.addr, "/v1/chat/completions", &body, &[]).status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
}

/// Concurrency shared through Redis leases: slots held on one instance count on the other, and
/// come back when the streams end.
#[test]
fn two_instances_share_concurrency_slots_through_redis() {
    if !service_up(&REDIS) {
        return;
    }
    let mock = spawn_mock(&[]);
    let prefix = format!("{}:", unique_name("llmproxy-test"));
    let config = format!(
        "listen: \"{{listen}}\"\nbackends: [{{url: \"http://{}\"}}]\n\
         rate_limit:\n  global: {{max_concurrent: 2}}\n  storage: redis\n  \
         redis: {{url: \"redis://{}/\", prefix: \"{prefix}\"}}\n",
        mock.addr,
        REDIS.addr()
    );
    let (a, b) = (spawn_gateway(&config), spawn_gateway(&config));
    let slow = json!({"model": "mock-model", "messages": []}).to_string();
    let hold = |gw: std::net::SocketAddr| {
        let mut s = TcpStream::connect(gw).unwrap();
        s.write_all(&raw_request(
            "POST",
            "/v1/chat/completions",
            slow.as_bytes(),
            &[("x-mock-delay-ms", "1500")],
        ))
        .unwrap();
        s
    };
    let held = [hold(a.addr), hold(a.addr)];
    reached(&mock, 2.0);
    let body = json!({"model": "mock-model", "messages": []});
    let r = post_json(b.addr, "/v1/chat/completions", &body, &[]);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    drop(held);
    assert!(wait_until(Duration::from_secs(5), || {
        post_json(b.addr, "/v1/chat/completions", &body, &[]).status == 200
    }));
}
