//! Database reporters against real servers (`common::POSTGRES` and `common::MARIADB`; skipped
//! when unreachable unless `LLMPROXY_REQUIRE_SERVICES=1`): the gateway creates its table and,
//! after concurrent traffic, holds every request once with exact token sums.

mod common;
#[path = "support/usage.rs"]
mod usage;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    check_service, closed_port, post_json, service_up, spawn_gateway, spawn_mock, wait_until,
    Service, MARIADB, POSTGRES,
};
use llmproxy::usage::Spool;
use mysql::prelude::Queryable;
use serde_json::json;
use usage::{gateway_yaml, temp_dir, unique_table};

/// Runs a gateway on the same spool with a new reporter on the same table: it re-sends every
/// spooled record, which the table must absorb (idempotent inserts). Returns once it has.
fn resend_everything(
    backend: SocketAddr,
    spool: &std::path::Path,
    driver: &str,
    dsn: &str,
    table: &str,
) {
    let _gw = spawn_gateway(&gateway_yaml(
        backend,
        spool,
        &database_reporter("sql-again", driver, dsn, table),
    ));
    let reader = Spool::open(spool).unwrap();
    let caught_up = wait_until(Duration::from_secs(20), || {
        reader.cursor("sql-again").unwrap() > 0 && reader.backlog("sql-again").unwrap() == 0
    });
    assert!(caught_up, "the second reporter did not re-send the spool");
}

/// PostgreSQL's key-value DSN, as the `postgres` crate and the gateway take it.
fn pg_dsn() -> String {
    format!(
        "host={} port={} user=postgres dbname=test",
        POSTGRES.host, POSTGRES.port
    )
}

fn pg_url() -> String {
    format!("postgres://postgres@{}/test", POSTGRES.addr())
}

fn mysql_url() -> String {
    format!("mysql://root@{}/test", MARIADB.addr())
}

/// Sums the client saw: (requests, prompt, completion, total).
type Sums = (u64, u64, u64, u64);

/// `requests` non-streaming chat requests over `threads` threads, with varying token counts.
fn traffic(gateway: SocketAddr, requests: usize, threads: usize, prefix: &str) -> Sums {
    let per = requests / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let prefix = prefix.to_string();
            std::thread::spawn(move || {
                let mut sums = (0, 0, 0, 0);
                for i in 0..per {
                    let id = format!("{prefix}-{t}-{i}");
                    let tokens = ((t * 7 + i) % 13 + 1).to_string();
                    let body = json!({
                        "model": "mock-model",
                        "messages": [{"role": "user", "content": format!("request {i} of thread {t}")}],
                    });
                    let r = post_json(
                        gateway,
                        "/v1/chat/completions",
                        &body,
                        &[("X-Request-Id", &id), ("x-mock-tokens", &tokens)],
                    );
                    assert_eq!(r.status, 200);
                    let u = &r.json()["usage"];
                    sums.0 += 1;
                    sums.1 += u["prompt_tokens"].as_u64().unwrap();
                    sums.2 += u["completion_tokens"].as_u64().unwrap();
                    sums.3 += u["total_tokens"].as_u64().unwrap();
                }
                sums
            })
        })
        .collect();
    handles.into_iter().fold((0, 0, 0, 0), |acc, h| {
        let s = h.join().unwrap();
        (acc.0 + s.0, acc.1 + s.1, acc.2 + s.2, acc.3 + s.3)
    })
}

fn database_reporter(name: &str, driver: &str, dsn: &str, table: &str) -> String {
    format!(
        "\n    - name: {name}\n      type: database\n      batch_size: 50\n      \
         database: {{driver: {driver}, dsn: \"{dsn}\", table: {table}}}\n"
    )
}

#[test]
fn postgres_reporter_holds_exact_sums() {
    if !service_up(&POSTGRES) {
        return;
    }
    let mut pg = postgres::Client::connect(&pg_dsn(), postgres::NoTls).expect("PostgreSQL");
    let table = unique_table("usage_pg");
    // Strings with the characters COPY's text format and JSON escape must arrive as sent.
    let (odd_id, odd_model) = (r#"odd\"id\\N"#, "odd\tmodel\\N\nline\r");
    let mock = spawn_mock(&["--model", "mock-model", "--model", odd_model]);
    let dir = temp_dir("pg");
    let gw = spawn_gateway(&gateway_yaml(
        mock.addr,
        &dir.join("usage.db"),
        &database_reporter("sql", "postgres", &pg_url(), &table),
    ));
    let expected = traffic(gw.addr, 200, 8, "pg");
    let body = json!({"model": odd_model, "messages": [{"role": "user", "content": "x"}]});
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &body,
        &[("X-Request-Id", odd_id)],
    );
    assert_eq!(r.status, 200);
    let query = format!(
        "SELECT COUNT(*), COUNT(DISTINCT request_id), SUM(prompt_tokens)::BIGINT, \
         SUM(completion_tokens)::BIGINT, SUM(total_tokens)::BIGINT, \
         bool_or(usage_estimated), bool_or(is_stream) FROM {table} WHERE model = 'mock-model'"
    );
    let mut got = None;
    let complete = wait_until(Duration::from_secs(20), || {
        let Ok(row) = pg.query_one(&query, &[]) else {
            return false;
        };
        let count: i64 = row.get(0);
        got = Some(row);
        count == 200
    });
    let odd = format!("SELECT model, COUNT(*) OVER () FROM {table} WHERE client_request_id = $1");
    let stored = wait_until(Duration::from_secs(20), || {
        pg.query_opt(&odd, &[&odd_id]).is_ok_and(|r| r.is_some())
    });
    assert!(stored, "the record with odd strings is missing");
    let row = pg.query_one(&odd, &[&odd_id]).unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i64>(1)),
        (odd_model.to_string(), 1)
    );
    assert!(complete, "rows: {:?}", got.map(|r| r.get::<_, i64>(0)));
    let row = got.unwrap();
    assert_eq!(row.get::<_, i64>(1), 200);
    let sums = (
        row.get::<_, i64>(0) as u64,
        row.get::<_, i64>(2) as u64,
        row.get::<_, i64>(3) as u64,
        row.get::<_, i64>(4) as u64,
    );
    assert_eq!(sums, expected);
    assert!(!row.get::<_, bool>(5) && !row.get::<_, bool>(6));
    drop(gw);
    // The re-sent batch holding this row also holds rows the table has: both kinds are handled.
    let deleted = pg
        .execute(
            &format!("DELETE FROM {table} WHERE client_request_id = 'pg-0-0'"),
            &[],
        )
        .unwrap();
    assert_eq!(deleted, 1);
    resend_everything(
        mock.addr,
        &dir.join("usage.db"),
        "postgres",
        &pg_url(),
        &table,
    );
    let row = pg.query_one(&query, &[]).unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(4) as u64),
        (200, expected.3)
    );
    let all: i64 = pg
        .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
        .unwrap()
        .get(0);
    assert_eq!(
        all, 201,
        "the re-sent spool stored rows twice or missed one"
    );
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn mariadb_reporter_holds_exact_sums() {
    if !service_up(&MARIADB) {
        return;
    }
    let mut my = mysql::Conn::new(mysql::Opts::from_url(&mysql_url()).unwrap()).expect("MariaDB");
    let table = unique_table("usage_my");
    let mock = spawn_mock(&[]);
    let dir = temp_dir("mysql");
    // The seed's Go DSN form.
    let gw = spawn_gateway(&gateway_yaml(
        mock.addr,
        &dir.join("usage.db"),
        &database_reporter(
            "sql",
            "mysql",
            &format!("root@tcp({})/test", MARIADB.addr()),
            &table,
        ),
    ));
    let expected = traffic(gw.addr, 200, 8, "my");
    let query = format!(
        "SELECT COUNT(*), COUNT(DISTINCT request_id), CAST(SUM(prompt_tokens) AS SIGNED), \
         CAST(SUM(completion_tokens) AS SIGNED), CAST(SUM(total_tokens) AS SIGNED) FROM {table}"
    );
    let mut got = None;
    let complete = wait_until(Duration::from_secs(20), || {
        let Ok(Some(row)) =
            my.query_first::<(i64, i64, Option<i64>, Option<i64>, Option<i64>), _>(&query)
        else {
            return false;
        };
        got = Some(row);
        row.0 == 200
    });
    assert!(complete, "rows: {got:?}");
    let (count, distinct, prompt, completion, total) = got.unwrap();
    assert_eq!(distinct, 200);
    assert_eq!(
        (
            count as u64,
            prompt.unwrap() as u64,
            completion.unwrap() as u64,
            total.unwrap() as u64
        ),
        expected
    );
    drop(gw);
    resend_everything(
        mock.addr,
        &dir.join("usage.db"),
        "mysql",
        &mysql_url(),
        &table,
    );
    let row = my
        .query_first::<(i64, i64, Option<i64>, Option<i64>, Option<i64>), _>(&query)
        .unwrap()
        .unwrap();
    assert_eq!((row.0, row.4.unwrap() as u64), (200, expected.3));
    my.query_drop(format!("DROP TABLE {table}")).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A table made by an older llmproxy, without the columns added since (`client_request_id`,
/// `api`).
const OLD_COLUMNS: &str = "request_id VARCHAR(191) NOT NULL UNIQUE, timestamp VARCHAR(191) NOT NULL, \
    key_name TEXT, user_id TEXT, api_key TEXT, model TEXT, endpoint TEXT NOT NULL, \
    is_stream BOOLEAN NOT NULL, backend_url TEXT NOT NULL, status_code BIGINT NOT NULL, \
    latency_ms BIGINT NOT NULL, ttft_ms BIGINT, prompt_tokens BIGINT NOT NULL, \
    completion_tokens BIGINT NOT NULL, total_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL, \
    reasoning_tokens BIGINT NOT NULL, usage_estimated BOOLEAN NOT NULL, status VARCHAR(191) NOT NULL";

#[test]
fn an_older_table_gets_the_new_columns_and_keeps_its_rows() {
    if !service_up(&POSTGRES) || !service_up(&MARIADB) {
        return;
    }
    let mock = spawn_mock(&[]);
    let dir = temp_dir("old-table");
    let sqlite = dir.join("warehouse.db");
    let (pg_table, my_table) = (unique_table("usage_old_pg"), unique_table("usage_old_my"));
    let mut pg = postgres::Client::connect(&pg_dsn(), postgres::NoTls).unwrap();
    let mut my = mysql::Conn::new(mysql::Opts::from_url(&mysql_url()).unwrap()).unwrap();
    let old_row =
        "('old-1', '2026-01-01T00:00:00.000Z', NULL, NULL, NULL, 'm', '/v1/chat/completions', \
        false, 'http://b', 200, 1, NULL, 1, 1, 2, 0, 0, false, 'ok')";
    let columns = "(request_id, timestamp, key_name, user_id, api_key, model, endpoint, is_stream, \
        backend_url, status_code, latency_ms, ttft_ms, prompt_tokens, completion_tokens, total_tokens, \
        cached_tokens, reasoning_tokens, usage_estimated, status)";
    pg.batch_execute(&format!(
        "CREATE TABLE {pg_table} (id BIGSERIAL PRIMARY KEY, {OLD_COLUMNS}); \
         INSERT INTO {pg_table} {columns} VALUES {old_row}"
    ))
    .unwrap();
    my.query_drop(format!(
        "CREATE TABLE {my_table} (id BIGINT AUTO_INCREMENT PRIMARY KEY, {OLD_COLUMNS})"
    ))
    .unwrap();
    my.query_drop(format!("INSERT INTO {my_table} {columns} VALUES {old_row}"))
        .unwrap();
    rusqlite::Connection::open(&sqlite)
        .unwrap()
        .execute_batch(&format!(
            "CREATE TABLE usage_records (id INTEGER PRIMARY KEY, {OLD_COLUMNS}); \
             INSERT INTO usage_records {columns} VALUES {old_row}"
        ))
        .unwrap();

    let reporters = database_reporter("pg", "postgres", &pg_dsn(), &pg_table)
        + &database_reporter("my", "mysql", &mysql_url(), &my_table)
        + &database_reporter("lite", "sqlite", sqlite.to_str().unwrap(), "usage_records");
    let gw = spawn_gateway(&gateway_yaml(mock.addr, &dir.join("usage.db"), &reporters));
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]});
    let r = post_json(
        gw.addr,
        "/v1/chat/completions",
        &body,
        &[("X-Request-Id", "new-1")],
    );
    assert_eq!(r.status, 200);

    type Row = (Option<String>, Option<String>);
    let q = |t: &str| format!("SELECT client_request_id, api FROM {t} ORDER BY id");
    let expected: Vec<Row> = vec![
        (None, None),
        (Some("new-1".into()), Some("chat_completions".into())),
    ];
    let delivered = wait_until(Duration::from_secs(20), || {
        let pg_rows: Vec<Row> = pg
            .query(&q(&pg_table), &[])
            .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            .unwrap_or_default();
        let my_rows: Vec<Row> = my.query(q(&my_table)).unwrap_or_default();
        let lite_rows: Vec<Row> = rusqlite::Connection::open(&sqlite)
            .ok()
            .and_then(|c| {
                let mut stmt = c.prepare(&q("usage_records")).ok()?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).ok()?;
                rows.collect::<Result<Vec<_>, _>>().ok()
            })
            .unwrap_or_default();
        pg_rows == expected && my_rows == expected && lite_rows == expected
    });
    assert!(delivered, "the older tables did not take the new record");
    pg.batch_execute(&format!("DROP TABLE {pg_table}")).unwrap();
    my.query_drop(format!("DROP TABLE {my_table}")).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// The check every service test starts with: an unreachable service skips the test, or fails it
/// when services are required; a reachable one lets it run either way.
#[test]
fn an_unreachable_service_skips_or_fails_as_required() {
    let closed = closed_port();
    let nowhere = Service {
        name: "A closed port (expected: this test checks the skip)",
        host: "127.0.0.1",
        port: closed.addr.port(),
    };
    assert!(!check_service(&nowhere, false));
    let required = std::panic::catch_unwind(|| check_service(&nowhere, true));
    assert!(required.is_err(), "an unreachable required service passed");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let here = Service {
        name: "Listener",
        host: "127.0.0.1",
        port: listener.local_addr().unwrap().port(),
    };
    assert!(check_service(&here, false));
    assert!(check_service(&here, true));
}
