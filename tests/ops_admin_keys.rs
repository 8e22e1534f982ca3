//! The admin key store and usage totals: a key created through the admin API is shown once,
//! stored hashed, works at once and stops working when deleted; usage totals by key and model
//! come from the spool.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;

const TOKEN: &str = "test-admin-token-0123456789";

fn admin(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Response {
    let bearer = format!("Bearer {TOKEN}");
    request(
        addr,
        &raw_request(method, path, body, &[("Authorization", &bearer)]),
    )
}

fn chat(gw: &Proc, key: &str) -> u16 {
    let auth = format!("Bearer {key}");
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    post_json(
        gw.addr,
        "/v1/chat/completions",
        &body,
        &[("Authorization", &auth)],
    )
    .status
}

#[test]
fn keys_created_through_the_admin_api_work_and_are_stored_hashed() {
    let sim = spawn_mock(&[]);
    let dir = std::env::temp_dir().join(format!("llmproxy-admin-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{sim}\"\n\
         admin:\n  enabled: true\n  listen: \"127.0.0.1:0\"\n  token: \"{TOKEN}\"\n  key_store: \"{d}/keys.db\"\n\
         auth:\n  enabled: true\n  storage: \"file\"\n  quota_path: \"{d}/quota.db\"\n\
         api_keys:\n  - key: \"sk-static-key-000001\"\n    name: \"static\"\n\
         usage_hook:\n  enabled: true\n  spool_path: \"{d}/spool.db\"\n",
        sim = sim.addr,
        d = dir.display()
    ));
    let admin_addr = gw.admin.expect("the admin API's address in the ready file");
    assert_eq!(chat(&gw, "sk-static-key-000001"), 200);

    let r = admin(
        admin_addr,
        "POST",
        "/admin/keys",
        br#"{"name": "team-a", "user_id": "alice"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let key = r.json()["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("sk-llmproxy-"));
    assert_eq!(chat(&gw, &key), 200, "a created key is refused");
    assert_eq!(
        admin(admin_addr, "POST", "/admin/keys", br#"{"name": "team-a"}"#).status,
        422
    );

    // Listed without the key; stored only as a hash.
    let listed = admin(admin_addr, "GET", "/admin/keys", b"").text();
    assert!(
        listed.contains("team-a") && !listed.contains(&key),
        "{listed}"
    );
    let raw_db = std::fs::read(dir.join("keys.db")).unwrap();
    let wal = std::fs::read(dir.join("keys.db-wal")).unwrap_or_default();
    for bytes in [&raw_db, &wal] {
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "the key is stored in the clear"
        );
    }

    // Usage totals from the spool, by key.
    let totals = wait_until(Duration::from_secs(5), || {
        let r = admin(admin_addr, "GET", "/admin/usage?since=1h&by=key", b"");
        r.status == 200
            && r.json()["totals"].as_array().unwrap().iter().any(|t| {
                t["group"] == "team-a" && t["requests"] == 1 && t["completion_tokens"] == 3
            })
    });
    assert!(
        totals,
        "{}",
        admin(admin_addr, "GET", "/admin/usage?since=1h&by=key", b"").text()
    );
    assert_eq!(
        admin(admin_addr, "GET", "/admin/usage?by=nothing", b"").status,
        400
    );

    // Deleted: refused at once (the auth cache is cleared).
    assert_eq!(
        admin(admin_addr, "DELETE", "/admin/keys/team-a", b"").status,
        200
    );
    assert_eq!(chat(&gw, &key), 401, "a deleted key still works");
    assert_eq!(
        admin(admin_addr, "DELETE", "/admin/keys/team-a", b"").status,
        404
    );
    assert_eq!(chat(&gw, "sk-static-key-000001"), 200);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
