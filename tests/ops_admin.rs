//! The admin API over real sockets: bearer token, backends, reload, metrics.

mod common;

use std::net::SocketAddr;

use common::*;

const TOKEN: &str = "test-admin-token-0123456789";

/// The gateway config with the admin API on port 0 (its address comes from the ready file).
fn config(backends: &[SocketAddr]) -> String {
    let mut y = format!(
        "listen: \"{{listen}}\"\nworkers: 1\nadmin:\n  enabled: true\n  listen: \"127.0.0.1:0\"\n  token: \"{TOKEN}\"\nbackends:\n"
    );
    for b in backends {
        y.push_str(&format!("  - url: \"http://{b}\"\n"));
    }
    y
}

fn admin(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Response {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("Authorization", b)])
        .unwrap_or_default();
    request(addr, &raw_request(method, path, b"", &headers))
}

#[test]
fn admin_api_needs_the_token_lists_backends_and_reloads() {
    let one = spawn_mock(&[]);
    let two = spawn_mock(&[]);
    let gw = spawn_gateway(&config(&[one.addr]));
    let admin_addr = gw.admin.expect("the admin API's address in the ready file");
    let cfg = gw.config.clone().unwrap();

    let r = admin(admin_addr, "GET", "/admin/backends", None);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = admin(
        admin_addr,
        "GET",
        "/admin/backends",
        Some("test-admin-token-012345678X"),
    );
    assert_eq!(r.status, 401);
    let r = admin(admin_addr, "GET", "/admin/backends", Some("short"));
    assert_eq!(r.status, 401);

    let r = admin(admin_addr, "GET", "/admin/backends", Some(TOKEN));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["generation"], 0);
    assert_eq!(v["backends"][0]["url"], format!("http://{}", one.addr));
    assert_eq!(v["backends"][0]["up"], true);
    assert_eq!(v["backends"][0]["in_flight"], 0);

    // An invalid file is refused with its errors; nothing changes.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("workers: 1", "workers: 1\nnot_a_key: 1")).unwrap();
    let r = admin(admin_addr, "POST", "/admin/reload", Some(TOKEN));
    assert_eq!(r.status, 422);
    assert!(r.text().contains("not_a_key"), "{}", r.text());
    let v = admin(admin_addr, "GET", "/admin/backends", Some(TOKEN)).json();
    assert_eq!(v["generation"], 0);

    // A valid one swaps the backends. One worker, so round robin splits 4 requests 2/2.
    let text = config(&[one.addr, two.addr]).replace("{listen}", "127.0.0.1:0");
    std::fs::write(&cfg, text).unwrap();
    let r = admin(admin_addr, "POST", "/admin/reload", Some(TOKEN));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["generation"], 1);
    let v = admin(admin_addr, "GET", "/admin/backends", Some(TOKEN)).json();
    assert_eq!(v["backends"].as_array().unwrap().len(), 2);

    let body =
        serde_json::json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..4 {
        assert_eq!(
            post_json(gw.addr, "/v1/chat/completions", &body, &[]).status,
            200
        );
    }
    // Requests are counted just after their last byte is written: wait until all four are.
    let mut text = String::new();
    let counted = wait_until(std::time::Duration::from_secs(2), || {
        let r = admin(admin_addr, "GET", "/admin/metrics", Some(TOKEN));
        assert_eq!(r.status, 200);
        text = r.text();
        [one.addr, two.addr]
            .iter()
            .all(|b| text.contains(&format!("backend=\"http://{b}\",status=\"200\"}} 2")))
    });
    assert!(counted, "{text}");
    for b in [one.addr, two.addr] {
        assert!(
            text.contains(&format!("backend=\"http://{b}\",status=\"200\"}} 2")),
            "{text}"
        );
    }
    assert_eq!(
        admin(admin_addr, "GET", "/admin/nope", Some(TOKEN)).status,
        404
    );
}

#[test]
fn admin_is_off_by_default_and_needs_a_long_token() {
    let mock = spawn_mock(&[]);
    let admin_port = closed_port();
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nadmin:\n  listen: \"{}\"\nbackends:\n  - url: \"http://{}\"\n",
        admin_port.addr, mock.addr
    ));
    assert_eq!(gw.admin, None, "an admin listener without admin.enabled");
    assert!(std::net::TcpStream::connect(admin_port.addr).is_err());

    let path =
        std::env::temp_dir().join(format!("llmproxy-admin-short-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        "admin:\n  enabled: true\n  token: short\nbackends:\n  - url: \"http://127.0.0.1:1\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin.token: must be at least 16 characters"),
        "{err}"
    );
}
