//! Several gateway instances sharing one admin key store (`admin.key_store` a `postgres://` or
//! `mysql://` URL): a key created through one instance's admin API authenticates at the other
//! within `auth.cache.ttl`, and a key deleted through one is refused by both within it. The quota
//! store (`auth.quota_path`) in such a database hands a new instance the consumption another
//! one saved. Each test makes its own database on the shared server and drops it afterwards.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const TOKEN: &str = "test-admin-token-0123456789";
/// `auth.cache.ttl` in these tests.
const TTL: Duration = Duration::from_secs(2);

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

fn gateway(sim: &Proc, key_store: &str) -> Proc {
    let dir = unique_path("llmproxy-instances-keys");
    spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nbackends:\n  - url: \"http://{sim}\"\n\
         admin:\n  enabled: true\n  listen: \"127.0.0.1:0\"\n  token: \"{TOKEN}\"\n  key_store: \"{key_store}\"\n\
         auth:\n  enabled: true\n  storage: \"file\"\n  quota_path: \"{d}/quota.db\"\n  \
         cache: {{ttl: {ttl}s, negative_ttl: 1s}}\n\
         api_keys:\n  - key: \"sk-static-key-000001\"\n    name: \"static\"\n",
        sim = sim.addr,
        d = dir.display(),
        ttl = TTL.as_secs()
    ))
}

/// Creates through `a`'s admin API, uses at `b`, deletes through `b`, checks both refuse.
fn shared_store(key_store: &str) {
    let sim = spawn_mock(&[]);
    let (a, b) = (gateway(&sim, key_store), gateway(&sim, key_store));
    let (admin_a, admin_b) = (a.admin.unwrap(), b.admin.unwrap());

    let r = admin(admin_a, "POST", "/admin/keys", br#"{"name": "team-a"}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    let key = r.json()["key"].as_str().unwrap().to_string();
    // Never asked before, so neither instance has it cached as unknown: it works at once.
    assert_eq!(chat(&b, &key), 200, "instance 2 refuses a key made on 1");
    assert_eq!(chat(&a, &key), 200);
    let listed = admin(admin_b, "GET", "/admin/keys", b"").text();
    assert!(
        listed.contains("team-a") && !listed.contains(&key),
        "{listed}"
    );
    assert_eq!(
        admin(admin_b, "POST", "/admin/keys", br#"{"name": "team-a"}"#).status,
        422,
        "the name is taken in the shared store"
    );

    let deleted = Instant::now();
    assert_eq!(
        admin(admin_b, "DELETE", "/admin/keys/team-a", b"").status,
        200
    );
    // The deleting instance drops its cache at once; the other one within the TTL.
    assert_eq!(chat(&b, &key), 401, "a key deleted here still works here");
    let refused = wait_until(TTL * 10, || chat(&a, &key) == 401);
    assert!(refused, "instance 1 still takes a key deleted through 2");
    eprintln!(
        "a key deleted through instance 2 was refused by instance 1 after {:?} (auth.cache.ttl {TTL:?})",
        deleted.elapsed()
    );
    assert_eq!(chat(&a, "sk-static-key-000001"), 200);
}

/// A key spends its quota at one instance; one started afterwards on the same store refuses it.
fn shared_quota_store(location: &str, saved: impl Fn() -> Option<i64>) {
    let sim = spawn_mock(&["--tokens", "10"]);
    let config = format!(
        "listen: \"{{listen}}\"\nbackends:\n  - url: \"http://{}\"\n\
         auth:\n  enabled: true\n  storage: \"file\"\n  quota_path: \"{location}\"\n\
         api_keys:\n  - key: \"sk-quota-store-0001\"\n    name: \"q\"\n    total_quota: 30\n",
        sim.addr
    );
    let first = spawn_gateway(&config);
    let spent = wait_until(Duration::from_secs(20), || {
        chat(&first, "sk-quota-store-0001") == 429
    });
    assert!(spent, "the quota was never spent");
    // A request answered just before the refusal may still be on its way to the meter: the
    // store and the instance's own count must agree once both have settled.
    let used = || metric(first.addr, "llmproxy_usage_tokens_total") as i64;
    assert!(
        wait_until(Duration::from_secs(20), || saved() == Some(used())),
        "the store holds {:?}, the instance used {}",
        saved(),
        used()
    );
    let used = used();
    assert!(used >= 30, "{used} tokens used");
    drop(first);
    let second = spawn_gateway(&config);
    assert_eq!(
        chat(&second, "sk-quota-store-0001"),
        429,
        "a new instance hands the key its quota back"
    );
}

#[test]
fn a_key_store_in_postgres_is_shared_by_two_instances() {
    if !service_up(&POSTGRES) {
        return;
    }
    let db = unique_name("llmproxy_keys");
    let base = format!(
        "host={} port={} user=postgres",
        POSTGRES.host, POSTGRES.port
    );
    let mut admin_conn = postgres::Client::connect(&format!("{base} dbname=test"), postgres::NoTls)
        .expect("connect to PostgreSQL");
    admin_conn
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    shared_store(&format!(
        "postgres://postgres@{}:{}/{db}",
        POSTGRES.host, POSTGRES.port
    ));
    admin_conn
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .unwrap();
}

#[test]
fn a_quota_store_in_postgres_outlives_the_instance_that_saved_it() {
    if !service_up(&POSTGRES) {
        return;
    }
    let db = unique_name("llmproxy_quota");
    let base = format!(
        "host={} port={} user=postgres",
        POSTGRES.host, POSTGRES.port
    );
    let mut admin_conn = postgres::Client::connect(&format!("{base} dbname=test"), postgres::NoTls)
        .expect("connect to PostgreSQL");
    admin_conn
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    let dsn = format!("{base} dbname={db}");
    shared_quota_store(
        &format!(
            "postgres://postgres@{}:{}/{db}",
            POSTGRES.host, POSTGRES.port
        ),
        || {
            let mut c = postgres::Client::connect(&dsn, postgres::NoTls).ok()?;
            c.query_opt("SELECT used FROM key_quota", &[])
                .ok()??
                .get::<_, Option<i64>>(0)
        },
    );
    admin_conn
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .unwrap();
}

#[test]
fn a_quota_store_in_mariadb_outlives_the_instance_that_saved_it() {
    if !service_up(&MARIADB) {
        return;
    }
    use mysql::prelude::Queryable;
    let db = unique_name("llmproxy_quota");
    let url = format!("mysql://root@{}/{db}", MARIADB.addr());
    let mut admin_conn = mysql::Conn::new(
        mysql::Opts::from_url(&format!("mysql://root@{}/test", MARIADB.addr())).unwrap(),
    )
    .expect("connect to MariaDB");
    admin_conn
        .query_drop(format!("CREATE DATABASE {db}"))
        .unwrap();
    shared_quota_store(&url, || {
        let mut c = mysql::Conn::new(mysql::Opts::from_url(&url).ok()?).ok()?;
        c.query_first::<i64, _>("SELECT used FROM key_quota").ok()?
    });
    admin_conn
        .query_drop(format!("DROP DATABASE {db}"))
        .unwrap();
}

#[test]
fn a_key_store_in_mariadb_is_shared_by_two_instances() {
    if !service_up(&MARIADB) {
        return;
    }
    use mysql::prelude::Queryable;
    let db = unique_name("llmproxy_keys");
    let mut admin_conn = mysql::Conn::new(
        mysql::Opts::from_url(&format!("mysql://root@{}/test", MARIADB.addr())).unwrap(),
    )
    .expect("connect to MariaDB");
    admin_conn
        .query_drop(format!("CREATE DATABASE {db}"))
        .unwrap();
    shared_store(&format!("mysql://root@{}/{db}", MARIADB.addr()));
    admin_conn
        .query_drop(format!("DROP DATABASE {db}"))
        .unwrap();
}
