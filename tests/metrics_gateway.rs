//! The gateway's Prometheus metrics and access log after known traffic, over real sockets.

mod common;

use common::*;
use serde_json::{json, Value};

fn chat(stream: bool) -> Value {
    json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
    })
}

fn gateway(backend: &Proc, extra: &str) -> Proc {
    spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{}\"\n{extra}",
        backend.addr
    ))
}

/// The value of one exact series line (`name{labels}`), 0 when absent.
fn series(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn known_traffic_gives_matching_counters_and_histograms() {
    let mock = spawn_mock(&["--tokens", "6", "--itl-ms", "5"]);
    let gw = gateway(&mock, "");
    for _ in 0..5 {
        let r = post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]);
        assert_eq!(r.status, 200);
    }
    for _ in 0..3 {
        let r = post_json(gw.addr, "/v1/chat/completions", &chat(true), &[]);
        assert_eq!(r.status, 200);
        assert!(r.text().contains("[DONE]"));
    }
    assert_eq!(get(gw.addr, "/nope").status, 404);
    let big = "x".repeat(100);
    let r = post_json(
        gw.addr,
        "/v1/embeddings",
        &json!({"model": "mock-model", "input": big}),
        &[],
    );
    assert_eq!(r.status, 200);

    // A request is counted just after its last byte is written, and leaves the in-flight gauge
    // just after that, so the client can see the response a moment before the metrics move:
    // wait for all ten requests to be counted and done (the scrape itself is in flight).
    // The scrape checked is the one that saw that: a scrape after it could still count the
    // previous scrape as in flight on another worker.
    let mut settled = None;
    assert!(wait_until(std::time::Duration::from_secs(5), || {
        let r = get(gw.addr, "/metrics");
        let text = r.text();
        let counted: f64 = text
            .lines()
            .filter(|l| l.starts_with("llmproxy_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let done = counted >= 10.0 && series(&text, "llmproxy_in_flight_requests") == 1.0;
        if done {
            settled = Some(r);
        }
        done
    }));
    let r = settled.expect("a settled scrape");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text();
    let backend = format!("backend=\"http://{}\"", mock.addr);
    let chat_series = |stream: bool| {
        format!(
            "llmproxy_requests_total{{path=\"/v1/chat/completions\",stream=\"{stream}\",{backend},status=\"200\"}}"
        )
    };
    assert_eq!(series(&text, &chat_series(false)), 5.0, "{text}");
    assert_eq!(series(&text, &chat_series(true)), 3.0, "{text}");
    assert_eq!(
        series(
            &text,
            &format!("llmproxy_requests_total{{path=\"/v1/embeddings\",stream=\"false\",{backend},status=\"200\"}}")
        ),
        1.0
    );
    assert_eq!(
        series(
            &text,
            "llmproxy_requests_total{path=\"other\",stream=\"false\",backend=\"none\",status=\"404\"}"
        ),
        1.0
    );
    assert_eq!(metric(gw.addr, "llmproxy_requests_total"), 10.0);
    // Every request is in the latency histogram; TTFT, upstream latency and overhead only for
    // the 9 relayed ones; inter-token gaps only for streams (several per stream).
    assert_eq!(series(&text, "llmproxy_latency_ms_count"), 10.0);
    assert_eq!(
        series(&text, "llmproxy_latency_ms_bucket{le=\"+Inf\"}"),
        10.0
    );
    assert_eq!(series(&text, "llmproxy_ttft_ms_count"), 9.0);
    assert_eq!(series(&text, "llmproxy_upstream_latency_ms_count"), 9.0);
    assert_eq!(series(&text, "llmproxy_gateway_overhead_us_count"), 9.0);
    let gaps = series(&text, "llmproxy_inter_token_ms_count");
    assert!(gaps >= 3.0, "inter-token observations: {gaps}");
    assert!(series(&text, "llmproxy_latency_ms_sum") > 0.0);
    assert_eq!(
        series(&text, "llmproxy_rejections_total{reason=\"not_found\"}"),
        1.0
    );
    for reason in [
        "auth",
        "rate",
        "quota",
        "concurrency",
        "body_size",
        "no_backend",
    ] {
        assert!(
            text.contains(&format!(
                "llmproxy_rejections_total{{reason=\"{reason}\"}} 0\n"
            )),
            "{reason}"
        );
    }
    // The scrape itself is one request in flight.
    assert_eq!(series(&text, "llmproxy_in_flight_requests"), 1.0);
    assert_eq!(
        series(&text, &format!("llmproxy_backend_in_flight{{{backend}}}")),
        0.0
    );
    assert_eq!(
        series(&text, &format!("llmproxy_backend_up{{{backend}}}")),
        1.0
    );
    assert_eq!(series(&text, "llmproxy_client_cancels_total"), 0.0);
    for name in [
        "llmproxy_webhook_success_total",
        "llmproxy_webhook_failure_total",
        "llmproxy_upstream_errors_total",
        "llmproxy_usage_tokens_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name} counter")), "{name}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        text.contains(&format!(
            "llmproxy_info{{version=\"{version}\",io_driver=\""
        )),
        "{text}"
    );
    // Every sample line is `name{labels} value` or `name value`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
    }
}

#[test]
fn upstream_errors_and_rejections_are_counted() {
    let dead = closed_port();
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 1\nmax_request_body: 1KiB\nbackends:\n  - url: \"http://{}\"\n",
        dead.addr
    ));
    let r = post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]);
    assert_eq!(r.status, 502);
    let big = json!({"model": "m", "input": "x".repeat(2000)});
    assert_eq!(post_json(gw.addr, "/v1/embeddings", &big, &[]).status, 413);
    let text = get(gw.addr, "/metrics").text();
    assert_eq!(
        series(&text, "llmproxy_upstream_errors_total{kind=\"connect\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        series(&text, "llmproxy_rejections_total{reason=\"body_size\"}"),
        1.0
    );
}

#[test]
fn metrics_path_is_configurable_and_can_be_disabled() {
    let mock = spawn_mock(&[]);
    let gw = gateway(&mock, "metrics:\n  path: /internal/metrics\n");
    assert_eq!(get(gw.addr, "/metrics").status, 404);
    let r = get(gw.addr, "/internal/metrics");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("llmproxy_requests_total"));

    let off = gateway(&mock, "metrics:\n  enabled: false\n");
    assert_eq!(get(off.addr, "/metrics").status, 404);
}

#[test]
fn keep_alive_requests_after_a_proxied_one_are_relayed() {
    let mock = spawn_mock(&[]);
    let gw = gateway(&mock, "");
    let mut c = Client::connect(gw.addr);
    let body = chat(false).to_string();
    for _ in 0..3 {
        c.send(&raw_request(
            "POST",
            "/v1/chat/completions",
            body.as_bytes(),
            &[],
        ));
        let r = c.read_response();
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

#[test]
fn dashboards_use_only_exported_metric_names() {
    let mock = spawn_mock(&[]);
    let gw = gateway(&mock, "");
    let text = get(gw.addr, "/metrics").text();
    let exported: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let dir = env!("CARGO_MANIFEST_DIR");
    for file in [
        "dashboards/grafana-llmproxy.json",
        "dashboards/prometheus.yml",
    ] {
        let body = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        if file.ends_with(".json") {
            serde_json::from_str::<Value>(&body).expect("dashboard is JSON");
        }
        let mut used = 0;
        for (at, _) in body.match_indices("llmproxy_") {
            let name: String = body[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(exported.contains(&base), "{file} uses {name}, not exported");
            used += 1;
        }
        assert!(used > 0, "{file} names no metric");
    }
}

#[test]
fn cancels_cuts_and_retries_are_counted() {
    use std::io::Read;
    let mock = spawn_mock(&[]);
    let gw = gateway(&mock, "");
    // The client leaves mid-stream.
    let mut c = Client::connect(gw.addr);
    c.send(&raw_request(
        "POST",
        "/v1/chat/completions",
        chat(true).to_string().as_bytes(),
        &[("x-mock-itl-ms", "50"), ("x-mock-tokens", "100")],
    ));
    let mut buf = [0u8; 1024];
    assert!(c.stream().read(&mut buf).unwrap() > 0);
    drop(c);
    // The backend dies mid-stream.
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &chat(true),
        &[("x-mock-cut-after", "2"), ("x-mock-tokens", "10")],
    );
    assert_eq!(r.status, 200);
    // Both requests are over once the cancel is counted and only the scrape itself is in flight
    // (another worker may still be between the two when it is scraped).
    assert!(wait_until(std::time::Duration::from_secs(5), || {
        metric(gw.addr, "llmproxy_client_cancels_total") == 1.0
            && metric(gw.addr, "llmproxy_in_flight_requests") == 1.0
    }));
    let text = get(gw.addr, "/metrics").text();
    assert_eq!(
        series(
            &text,
            "llmproxy_upstream_errors_total{kind=\"mid_response\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(series(&text, "llmproxy_in_flight_requests"), 1.0);

    // A pooled connection the backend closed while idle is retried on a fresh one.
    let up = spawn_fixed_upstream();
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 1\nbackends:\n  - url: \"http://{}\"\n",
        up.addr
    ));
    let mut c = Client::connect(gw.addr);
    for closed in 1..=3 {
        c.send(&raw_request("POST", "/v1/fixed/idle", b"{}", &[]));
        assert_eq!(c.read_response().status, 200);
        assert!(wait_until(std::time::Duration::from_secs(5), || {
            fixed_stat(up.addr, "idle_closed") == closed
        }));
    }
    // Counted just after the response is written.
    assert!(
        wait_until(std::time::Duration::from_secs(10), || metric(
            gw.addr,
            "llmproxy_retries_total"
        ) == 2.0),
        "retries: {}",
        metric(gw.addr, "llmproxy_retries_total")
    );
}

#[test]
fn usage_reporter_counters_reach_metrics() {
    let mock = spawn_mock(&["--tokens", "4"]);
    let dir = std::env::temp_dir().join(format!("llmproxy-metrics-usage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let gw = gateway(
        &mock,
        &format!(
            "usage_hook:\n  enabled: true\n  spool_path: \"{0}/spool.db\"\n  reporters:\n    - name: local\n      type: database\n      database:\n        driver: sqlite\n        dsn: \"{0}/usage.db\"\n",
            dir.display()
        ),
    );
    for _ in 0..3 {
        assert_eq!(
            post_json(gw.addr, "/v1/chat/completions", &chat(false), &[]).status,
            200
        );
    }
    // Delivery waits up to batch_timeout (1 s) for a fuller batch; a loaded machine adds more.
    let delivered = wait_until(std::time::Duration::from_secs(30), || {
        let text = get(gw.addr, "/metrics").text();
        series(
            &text,
            "llmproxy_usage_delivered_total{reporter=\"local\",type=\"database\"}",
        ) == 3.0
    });
    let text = get(gw.addr, "/metrics").text();
    assert!(delivered, "{text}");
    assert_eq!(
        series(&text, "llmproxy_usage_tokens_total{type=\"completion\"}"),
        12.0
    );
    assert_eq!(
        series(&text, "llmproxy_usage_spool_backlog{reporter=\"local\"}"),
        0.0
    );
    assert_eq!(series(&text, "llmproxy_usage_events_dropped_total"), 0.0);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
