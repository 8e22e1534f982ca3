//! TLS on the client listener (`tls`): requests and streams over https with a certificate chain
//! from a private CA, ALPN, client certificates required by `tls.client_ca` (accepted and
//! refused), a certificate swapped by SIGHUP under a running stream, and the `openai` Python SDK
//! over https. Certificates are made by the tests (`common::tls`).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::tls::{client, client_config, connect, versioned_client_config, Pki};
use common::*;
use serde_json::json;

fn gateway_yaml(backend: std::net::SocketAddr, cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "listen: \"{{listen}}\"\nworkers: 2\ntls:\n  cert: \"{}\"\n  key: \"{}\"\n{extra}backends:\n  - url: \"http://{backend}\"\n",
        cert.display(),
        key.display()
    )
}

/// Sends `raw` and reads the response.
fn exchange<S: Read + Write>(c: &mut Client<S>, raw: &[u8]) -> Response {
    c.send(raw);
    c.read_response()
}

/// A chat request asking for the simulator's whole stream.
fn whole_stream() -> Vec<u8> {
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    raw_request(
        "POST",
        "/v1/chat/completions",
        body.to_string().as_bytes(),
        &[],
    )
}

fn chat(stream: bool) -> Vec<u8> {
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": 4});
    raw_request(
        "POST",
        "/v1/chat/completions",
        body.to_string().as_bytes(),
        &[],
    )
}

#[test]
fn https_clients_get_requests_and_streams_on_kept_alive_connections() {
    let pki = Pki::new("tls-listener");
    let (cert, key) = pki.issue("server", &["localhost", "127.0.0.1"], false);
    let sim = spawn_mock(&["--tokens", "6"]);
    let gw = spawn_gateway(&gateway_yaml(sim.addr, &cert, &key, ""));

    let mut c = client(gw.addr, pki.client_config(None));
    assert_eq!(
        c.stream().conn.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN http/1.1"
    );
    let r = exchange(&mut c, &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
    // The same TLS connection carries the stream, then another request.
    let r = exchange(&mut c, &chat(true));
    assert_eq!(r.status, 200);
    let events = sse_events(&r.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events.len() >= 5, "{events:?}");
    let r = exchange(&mut c, &raw_request("GET", "/health", b"", &[]));
    assert_eq!(r.status, 200);
    // TLS 1.2 clients too.
    let tls12 = versioned_client_config(&pki.ca, None, &[&rustls::version::TLS12]);
    let mut c = client(gw.addr, tls12);
    assert_eq!(
        c.stream().conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(exchange(&mut c, &chat(false)).status, 200);

    // Plain HTTP on the TLS port gets no HTTP answer, and counts as a failed handshake.
    let before = tls_metric(&gw, &pki);
    let mut plain = std::net::TcpStream::connect(gw.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    plain.write_all(&chat(false)).unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP got an HTTP answer"
    );
    assert!(wait_until(Duration::from_secs(10), || tls_metric(
        &gw, &pki
    ) > before));
}

/// `llmproxy_tls_handshake_failures_total`, scraped over https.
fn tls_metric(gw: &Proc, pki: &Pki) -> f64 {
    let mut c = client(gw.addr, pki.client_config(None));
    metric_text(&exchange(&mut c, &raw_request("GET", "/metrics", b"", &[])).text())
}

fn metric_text(text: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix("llmproxy_tls_handshake_failures_total "))
        .and_then(|v| v.parse().ok())
        .expect("llmproxy_tls_handshake_failures_total in /metrics")
}

#[test]
fn client_certificates_are_required_with_client_ca() {
    let pki = Pki::new("tls-mtls");
    let (cert, key) = pki.issue("server", &["localhost"], false);
    let (client_cert, client_key) = pki.issue("client", &["client.test"], true);
    let stranger = Pki::new("tls-stranger");
    let (other_cert, other_key) = stranger.issue("client", &["client.test"], true);
    let sim = spawn_mock(&[]);
    let gw = spawn_gateway(&gateway_yaml(
        sim.addr,
        &cert,
        &key,
        &format!("  client_ca: \"{}\"\n", pki.ca.display()),
    ));

    let mut c = client(
        gw.addr,
        pki.client_config(Some((&client_cert, &client_key))),
    );
    let r = exchange(&mut c, &chat(false));
    assert_eq!(r.status, 200, "a client with a certificate the CA signed");

    // Without a certificate, or with one another CA signed, no request gets through. With TLS 1.3
    // the refusal can come after the client's side of the handshake, so a request is tried.
    let no_identity = pki.client_config(None);
    let foreign = client_config(&pki.ca, Some((&other_cert, &other_key)));
    for config in [no_identity, foreign] {
        if let Ok(stream) = connect(gw.addr, config, "localhost") {
            let mut c = Client::over(stream);
            c.send(&chat(false));
            let mut rest = Vec::new();
            let read = c.stream().read_to_end(&mut rest);
            assert!(
                read.is_err() || rest.is_empty(),
                "a refused client read {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
    }
    let mut c = client(
        gw.addr,
        pki.client_config(Some((&client_cert, &client_key))),
    );
    let text = exchange(&mut c, &raw_request("GET", "/metrics", b"", &[])).text();
    assert!(metric_text(&text) >= 2.0, "both refusals counted");
}

#[test]
fn sighup_swaps_the_certificate_under_a_running_stream() {
    let old_pki = Pki::new("tls-old");
    let new_pki = Pki::new("tls-new");
    let (cert, key) = old_pki.issue("server", &["localhost"], false);
    let sim = spawn_mock(&["--tokens", "40", "--itl-ms", "50"]);
    let gw = spawn_gateway(&gateway_yaml(sim.addr, &cert, &key, ""));

    let mut stream = client(gw.addr, old_pki.client_config(None));
    stream.send(&whole_stream());
    let mut first = [0u8; 64];
    assert!(
        stream.stream().read(&mut first).unwrap() > 0,
        "stream started"
    );

    // The files are replaced in place (as certbot's renewal does), then SIGHUP.
    let (new_cert, new_key) = new_pki.issue("server", &["localhost"], false);
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    assert_eq!(
        unsafe { libc::kill(gw.child.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
    assert!(
        wait_until(Duration::from_secs(20), || connect(
            gw.addr,
            new_pki.client_config(None),
            "localhost"
        )
        .is_ok()),
        "new connections never got the new certificate"
    );
    assert!(
        connect(gw.addr, old_pki.client_config(None), "localhost").is_err(),
        "new connections still get the old certificate"
    );

    // The stream that began before the swap runs to its end on its old session.
    let mut rest = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        let n = stream.stream().read(&mut buf).expect("stream read");
        assert!(n > 0, "the stream was cut");
        rest.extend_from_slice(&buf[..n]);
        if rest.ends_with(b"0\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("data: [DONE]"), "{text}");
}

#[test]
fn openai_python_sdk_over_https_with_a_private_ca() {
    if !python_has(&["openai"]) {
        return;
    }
    let pki = Pki::new("tls-sdk");
    let (cert, key) = pki.issue("server", &["localhost"], false);
    let sim = spawn_mock(&["--tokens", "8"]);
    let gw = spawn_gateway(&gateway_yaml(sim.addr, &cert, &key, ""));
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/sdk_tls.py"
        ))
        .arg(format!("https://localhost:{}/v1", gw.addr.port()))
        .arg(&pki.ca)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all TLS SDK checks passed"), "{stdout}");
}
