//! https backends: the simulator serving TLS (`mock-llm --tls-cert`) behind the gateway, verified
//! against a private CA, by `server_name`, or not at all (`insecure_skip_verify`); mutual TLS;
//! connections pooled and kept alive; health checks and the model-list fetch over TLS.

mod common;

use std::path::Path;
use std::time::Duration;

use common::tls::{connect, Pki};
use common::*;
use serde_json::json;

/// The simulator over https with `cert`/`key` (and client certificates required by `client_ca`).
fn tls_mock(cert: &Path, key: &Path, client_ca: Option<&Path>, extra: &[&str]) -> Proc {
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let mut args = vec!["--tls-cert", cert, "--tls-key", key];
    let ca;
    if let Some(path) = client_ca {
        ca = path.to_str().unwrap().to_string();
        args.extend(["--tls-client-ca", ca.as_str()]);
    }
    args.extend_from_slice(extra);
    spawn_mock(&args)
}

fn chat(stream: bool) -> serde_json::Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": 3})
}

/// `mock_connections_total` of a simulator serving https as `name`.
fn mock_connections(mock: &Proc, pki: &Pki, name: &str) -> f64 {
    let stream = connect(mock.addr, pki.client_config(None), name).expect("TLS to the simulator");
    let mut c = Client::over(stream);
    c.send(&raw_request("GET", "/metrics", b"", &[]));
    c.read_response()
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("mock_connections_total "))
        .and_then(|v| v.parse().ok())
        .expect("mock_connections_total")
}

#[test]
fn https_backend_with_a_private_ca_is_pooled_and_verified_by_name() {
    let pki = Pki::new("tls-backend");
    // The certificate names a host, not the address the URL dials: `server_name` bridges them.
    let (cert, key) = pki.issue("backend", &["backend.internal"], false);
    let mock = tls_mock(&cert, &key, None, &[]);
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 1\nbackends:\n  - url: \"https://{}\"\n    tls:\n      ca: \"{}\"\n      server_name: backend.internal\n",
        mock.addr,
        pki.ca.display()
    ));
    for stream in [false, true, false, true, false] {
        let r = post_json(gw.addr, "/v1/chat/completions", &chat(stream), &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        if stream {
            assert!(r.text().contains("data: [DONE]"), "{}", r.text());
        } else {
            assert_eq!(r.json()["usage"]["completion_tokens"], 3);
        }
    }
    // Five requests, one kept-alive TLS connection; the scrape is the second.
    assert_eq!(mock_connections(&mock, &pki, "backend.internal"), 2.0);

    // Without the name, the certificate does not match the address: no request gets through.
    let wrong_name = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 1\nbackends:\n  - url: \"https://{}\"\n    tls:\n      ca: \"{}\"\n",
        mock.addr,
        pki.ca.display()
    ));
    let r = post_json(wrong_name.addr, "/v1/chat/completions", &chat(false), &[]);
    assert_eq!(r.status, 502, "{}", r.text());
}

#[test]
fn backend_certificates_from_unknown_cas_are_refused_unless_verification_is_off() {
    let pki = Pki::new("tls-backend-unknown");
    let (cert, key) = pki.issue("backend", &["127.0.0.1"], false);
    let mock = tls_mock(&cert, &key, None, &[]);
    // The Mozilla roots do not know the test CA.
    let strict = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nbackends:\n  - url: \"https://{}\"\n",
        mock.addr
    ));
    let r = post_json(strict.addr, "/v1/chat/completions", &chat(false), &[]);
    assert_eq!(r.status, 502, "{}", r.text());
    let insecure = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nbackends:\n  - url: \"https://{}\"\n    tls: {{insecure_skip_verify: true}}\n",
        mock.addr
    ));
    let r = post_json(insecure.addr, "/v1/chat/completions", &chat(true), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("data: [DONE]"));
}

#[test]
fn mutual_tls_to_a_backend_needs_the_client_certificate() {
    let pki = Pki::new("tls-backend-mtls");
    let (cert, key) = pki.issue("backend", &["127.0.0.1"], false);
    let (gw_cert, gw_key) = pki.issue("gateway", &["gateway.test"], true);
    let mock = tls_mock(&cert, &key, Some(&pki.ca), &[]);
    let with_cert = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nbackends:\n  - url: \"https://{}\"\n    tls:\n      ca: \"{}\"\n      cert: \"{}\"\n      key: \"{}\"\n",
        mock.addr,
        pki.ca.display(),
        gw_cert.display(),
        gw_key.display()
    ));
    for stream in [false, true] {
        let r = post_json(with_cert.addr, "/v1/chat/completions", &chat(stream), &[]);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let without = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nbackends:\n  - url: \"https://{}\"\n    tls:\n      ca: \"{}\"\n",
        mock.addr,
        pki.ca.display()
    ));
    let r = post_json(without.addr, "/v1/chat/completions", &chat(false), &[]);
    assert_eq!(r.status, 502, "{}", r.text());
}

#[test]
fn health_checks_and_the_model_list_speak_tls() {
    let pki = Pki::new("tls-backend-health");
    let stranger = Pki::new("tls-backend-stranger");
    let (cert, key) = pki.issue("backend", &["127.0.0.1"], false);
    let a = tls_mock(&cert, &key, None, &["--model", "model-a"]);
    let b = tls_mock(&cert, &key, None, &["--model", "model-b"]);
    // Backend b is checked against a CA that did not sign its certificate: it must go down;
    // a stays up and both model lists are fetched over TLS.
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nhealth_check:\n  interval: 100ms\n  unhealthy_threshold: 1\nbackends:\n  - url: \"https://{a}\"\n    tls: {{ca: \"{ca}\"}}\n  - url: \"https://{b}/\"\n    tls: {{ca: \"{wrong}\"}}\n  - url: \"https://{b}\"\n    tls: {{ca: \"{ca}\"}}\n",
        a = a.addr,
        b = b.addr,
        ca = pki.ca.display(),
        wrong = stranger.ca.display(),
    ));
    let up = |url: &str| {
        let text = get(gw.addr, "/metrics").text();
        let name = format!("llmproxy_backend_up{{backend=\"{url}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&name).map(str::to_string))
    };
    let (a_url, b_url, b_wrong) = (
        format!("https://{}", a.addr),
        format!("https://{}", b.addr),
        format!("https://{}/", b.addr),
    );
    let states = || [up(&a_url), up(&b_url), up(&b_wrong)];
    let expected = [
        Some("1".to_string()),
        Some("1".to_string()),
        Some("0".to_string()),
    ];
    assert!(
        wait_until(Duration::from_secs(20), || states() == expected),
        "{:?}",
        states()
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            let models = get(gw.addr, "/v1/models").text();
            models.contains("model-a") && models.contains("model-b")
        }),
        "{}",
        get(gw.addr, "/v1/models").text()
    );
}
