//! A backend ejected by failed requests comes back as soon as its active health check passes
//! again, not only after `ejection_time`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;

fn backend_up(gw: &Proc, backend: SocketAddr) -> bool {
    let series = format!("llmproxy_backend_up{{backend=\"http://{backend}\"}} ");
    let text = get(gw.addr, "/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .is_some_and(|v| v == "1")
}

#[test]
fn a_restarted_backend_ejected_by_requests_returns_when_its_check_passes() {
    // Held for the whole test, so that no one else takes the port while its backend is down.
    let port = closed_port();
    let addr = port.addr;
    let a = spawn_mock_on(addr, &[]);
    let b = spawn_mock(&[]);
    // The checker needs 50 failed checks (10 s) to call `a` down; one refused request ejects it
    // for a minute.
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 1\nbackends:\n  - url: \"http://{}\"\n  - url: \"http://{}\"\n\
         health_check:\n  interval: 200ms\n  timeout: 200ms\n  unhealthy_threshold: 50\n  healthy_threshold: 1\n  max_failures: 1\n  ejection_time: 60s\n",
        a.addr, b.addr
    ));
    let chat = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    drop(a);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let r = post_json(gw.addr, "/v1/chat/completions", &chat, &[]);
            assert_eq!(r.status, 200, "{}", r.text());
            !backend_up(&gw, addr)
        }),
        "the stopped backend was never ejected"
    );
    let a = spawn_mock_on(addr, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || backend_up(&gw, addr)),
        "the restarted backend stays out although its health check passes"
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            post_json(gw.addr, "/v1/chat/completions", &chat, &[]);
            metric(a.addr, "mock_requests_total") > 0.0
        }),
        "the restarted backend takes no traffic"
    );
}
