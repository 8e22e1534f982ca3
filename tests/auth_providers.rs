//! Every auth provider against the real thing: Redis (hash and JSON), PostgreSQL, MariaDB,
//! SQLite and an HTTP webhook process; pipeline modes; cache, stale-if-error and 503 when a
//! provider is down with nothing cached.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn chat() -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]})
}

/// A prefix no other test (or earlier run) uses.
fn unique(tag: &str) -> String {
    unique_name(&format!("t{tag}"))
}

fn call(gw: SocketAddr, key: &str) -> Response {
    let auth = format!("Bearer {key}");
    post_json(
        gw,
        "/v1/chat/completions",
        &chat(),
        &[("Authorization", &auth)],
    )
}

fn code(r: &Response) -> String {
    r.json()["error"]["code"].as_str().unwrap_or("").to_string()
}

fn gateway(mock: SocketAddr, auth_yaml: &str) -> Proc {
    let db = std::env::temp_dir().join(format!("{}.db", unique("quota")));
    spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends: [{{url: \"http://{mock}\"}}]\n\
         auth:\n  quota_path: \"{}\"\n{auth_yaml}",
        db.display()
    ))
}

fn redis(args: &[&str]) {
    let out = Command::new("redis-cli")
        .args(["-h", REDIS.host, "-p", &REDIS.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn redis_hash_and_json_keys() {
    if !service_up(&REDIS) {
        return;
    }
    let mock = spawn_mock(&[]);
    let p = unique("redis");
    redis(&[
        "HSET",
        &format!("{p}:k-hash"),
        "name",
        "Hash",
        "status",
        "active",
        "allowed_models",
        "mock-model",
    ]);
    redis(&[
        "SET",
        &format!("{p}:k-json"),
        r#"{"name":"Json","status":1}"#,
    ]);
    redis(&["HSET", &format!("{p}:k-ip"), "allowed_ips", "10.0.0.0/8"]);
    let gw = gateway(
        mock.addr,
        &format!(
            "  pipeline:\n    - {{type: redis, url: \"redis://{}/\", key_pattern: \"{p}:{{api_key}}\"}}\n",
            REDIS.addr()
        ),
    );
    assert_eq!(call(gw.addr, "k-hash").status, 200);
    let r = call(gw.addr, "k-json");
    assert_eq!((r.status, code(&r).as_str()), (403, "api_key_disabled"));
    let r = call(gw.addr, "k-ip");
    assert_eq!((r.status, code(&r).as_str()), (403, "ip_not_allowed"));
    let r = call(gw.addr, "k-none");
    assert_eq!((r.status, code(&r).as_str()), (401, "invalid_api_key"));
    redis(&[
        "DEL",
        &format!("{p}:k-hash"),
        &format!("{p}:k-json"),
        &format!("{p}:k-ip"),
    ]);
}

#[test]
fn postgres_table_with_custom_columns() {
    if !service_up(&POSTGRES) {
        return;
    }
    let mock = spawn_mock(&[]);
    let table = unique("pg");
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args([
                "-h",
                POSTGRES.host,
                "-p",
                &POSTGRES.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "test",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(out.status.success(), "{out:?}");
    };
    psql(&format!(
        "CREATE TABLE {table} (secret text PRIMARY KEY, label text, state int, quota bigint, ends timestamptz)"
    ));
    psql(&format!(
        "INSERT INTO {table} VALUES ('pg-ok', 'PG', 0, 1000, now() + interval '1 day'), \
         ('pg-off', 'Off', 1, NULL, NULL), ('pg-old', 'Old', 0, NULL, now() - interval '1 day')"
    ));
    let gw = gateway(
        mock.addr,
        &format!(
            "  pipeline:\n    - type: database\n      driver: postgres\n      \
             dsn: \"host={} port={} user=postgres dbname=test\"\n      table: {table}\n      \
             columns: {{key: secret, name: label, status: state, total_quota: quota, expires_at: ends, \
             user_id: \"\", allowed_ips: \"\", allowed_models: \"\"}}\n",
            POSTGRES.host, POSTGRES.port
        ),
    );
    let results: Vec<_> = ["pg-ok", "pg-off", "pg-old", "pg-none"]
        .iter()
        .map(|k| call(gw.addr, k).status)
        .collect();
    psql(&format!("DROP TABLE {table}"));
    assert_eq!(results, [200, 403, 401, 401]);
}

#[test]
fn mariadb_table() {
    if !service_up(&MARIADB) {
        return;
    }
    let mock = spawn_mock(&[]);
    let table = unique("my");
    let mysql = |sql: &str| {
        let out = Command::new("mysql")
            .args(["-h", MARIADB.host, "-P", &MARIADB.port.to_string()])
            .args(["-uroot", "test", "-e", sql])
            .output()
            .expect("mysql");
        assert!(out.status.success(), "{out:?}");
    };
    mysql(&format!(
        "CREATE TABLE {table} (api_key varchar(64) PRIMARY KEY, name text, user_id text, status varchar(20), \
         total_quota bigint, allowed_ips text, allowed_models text, expires_at bigint)"
    ));
    mysql(&format!(
        "INSERT INTO {table} VALUES ('my-ok', 'My', 'u1', 'active', NULL, '127.0.0.1/32,::1', NULL, NULL), \
         ('my-ip', 'Ip', NULL, '0', NULL, '10.0.0.0/8', NULL, NULL)"
    ));
    let gw = gateway(
        mock.addr,
        &format!(
            "  pipeline:\n    - {{type: database, driver: mysql, dsn: \"mysql://root@{}/test\", table: {table}}}\n",
            MARIADB.addr()
        ),
    );
    let results: Vec<_> = ["my-ok", "my-ip", "my-none"]
        .iter()
        .map(|k| call(gw.addr, k).status)
        .collect();
    mysql(&format!("DROP TABLE {table}"));
    assert_eq!(results, [200, 403, 401]);
}

#[test]
fn sqlite_then_static_first_match_and_all() {
    let mock = spawn_mock(&[]);
    let file = std::env::temp_dir().join(format!("{}.sqlite", unique("keys")));
    {
        let db = rusqlite::Connection::open(&file).unwrap();
        db.execute_batch(
            "CREATE TABLE api_keys (api_key TEXT PRIMARY KEY, name TEXT, user_id TEXT, status TEXT, \
             total_quota INTEGER, allowed_ips TEXT, allowed_models TEXT, expires_at TEXT);
             INSERT INTO api_keys VALUES ('sq-ok', 'Sq', NULL, 'active', 5, NULL, '[\"mock-model\"]', '2999-01-01T00:00:00Z');
             INSERT INTO api_keys VALUES ('both', 'Both', NULL, 'disabled', NULL, NULL, NULL, NULL);",
        )
        .unwrap();
    }
    let pipeline = format!(
        "  pipeline:\n    - {{type: database, driver: sqlite, dsn: \"{}\"}}\n    - {{type: static}}\n",
        file.display()
    );
    let keys = "api_keys: [{key: st-ok}, {key: both}]\n";
    // first_match: the database decides `both` (disabled) before the static list would.
    let gw = gateway(mock.addr, &format!("{pipeline}{keys}"));
    let statuses: Vec<_> = ["sq-ok", "st-ok", "both", "none"]
        .iter()
        .map(|k| call(gw.addr, k).status)
        .collect();
    assert_eq!(statuses, [200, 200, 403, 401]);
    drop(gw);
    // all: a key must be known to every provider, and every one must let it in.
    let gw = gateway(mock.addr, &format!("  mode: all\n{pipeline}{keys}"));
    let statuses: Vec<_> = ["sq-ok", "st-ok", "both"]
        .iter()
        .map(|k| call(gw.addr, k).status)
        .collect();
    assert_eq!(statuses, [401, 401, 403]);
    let _ = std::fs::remove_file(file);
}

/// A tiny HTTP auth server: allows keys starting with "wh-ok", counts requests.
fn webhook_server(down: Arc<AtomicU32>) -> (SocketAddr, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU32::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break Value::Null;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break serde_json::from_str(body).unwrap_or(Value::Null);
                    }
                }
            };
            let answer = if down.load(Ordering::SeqCst) > 0 {
                ("500 Internal Server Error", "{}".to_string())
            } else {
                let key = body["api_key"].as_str().unwrap_or("");
                assert_eq!(body["ip"], "127.0.0.1");
                assert_eq!(body["path"], "/v1/chat/completions");
                let allow = key.starts_with("wh-ok");
                (
                    "200 OK",
                    json!({"allow": allow, "name": "Hooked", "user_id": "u-wh"}).to_string(),
                )
            };
            let _ = write!(
                s,
                "HTTP/1.1 {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                answer.0,
                answer.1.len(),
                answer.1
            );
        }
    });
    (addr, hits)
}

#[test]
fn webhook_decides_and_cache_coalesces_serves_stale_and_fails_closed() {
    let mock = spawn_mock(&[]);
    let down = Arc::new(AtomicU32::new(0));
    let (hook, hits) = webhook_server(down.clone());
    let gw = gateway(
        mock.addr,
        &format!(
            "  pipeline:\n    - {{type: webhook, url: \"http://{hook}/auth\"}}\n  \
             cache: {{ttl: 1s, negative_ttl: 1s, stale_if_error: 30s}}\n"
        ),
    );
    // 20 concurrent first requests for one key: one look-up.
    std::thread::scope(|s| {
        for _ in 0..20 {
            s.spawn(|| assert_eq!(call(gw.addr, "wh-ok-1").status, 200));
        }
    });
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "concurrent misses not coalesced"
    );
    assert_eq!(call(gw.addr, "wh-no").status, 401);
    assert_eq!(call(gw.addr, "wh-no").status, 401);
    assert_eq!(hits.load(Ordering::SeqCst), 2, "negative answer not cached");

    // Provider down: once its answer is past the 1 s ttl, the known key asks the provider again
    // and keeps working from the stale answer; a new key gets 503.
    down.store(1, Ordering::SeqCst);
    let asked_again = wait_until(Duration::from_secs(5), || {
        assert_eq!(call(gw.addr, "wh-ok-1").status, 200);
        hits.load(Ordering::SeqCst) == 3
    });
    assert!(asked_again, "the cached answer never expired");
    let r = call(gw.addr, "wh-ok-2");
    assert_eq!((r.status, code(&r).as_str()), (503, "auth_unavailable"));
    // Back up: the new key gets in once the failure's retry delay passed.
    down.store(0, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(3), || call(
        gw.addr, "wh-ok-2"
    )
    .status
        == 200));
}

#[test]
fn redis_down_with_nothing_cached_is_503_not_401() {
    let mock = spawn_mock(&[]);
    let redis = closed_port();
    let gw = gateway(
        mock.addr,
        &format!(
            "  pipeline:\n    - {{type: redis, url: \"redis://{}/\"}}\n",
            redis.addr
        ),
    );
    let r = call(gw.addr, "any");
    assert_eq!((r.status, code(&r).as_str()), (503, "auth_unavailable"));
    // The worker is fine: health still answers.
    assert_eq!(get(gw.addr, "/health").status, 200);
}
