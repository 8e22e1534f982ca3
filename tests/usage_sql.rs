//! Database reporters against the real servers on this machine (PostgreSQL 127.0.0.1:5432 user
//! postgres, MariaDB 127.0.0.1:3306 root, database `test`): the gateway creates its table and,
//! after concurrent traffic, holds every request once with exact token sums.

mod common;
#[path = "support/usage.rs"]
mod usage;

use std::net::SocketAddr;
use std::time::Duration;

use common::{post_json, spawn_gateway, spawn_mock, wait_until};
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

const PG_DSN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";
const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

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
    let mut pg =
        postgres::Client::connect(PG_DSN, postgres::NoTls).expect("PostgreSQL on 127.0.0.1:5432");
    let table = unique_table("usage_pg");
    let mock = spawn_mock(&[]);
    let dir = temp_dir("pg");
    let gw = spawn_gateway(&gateway_yaml(
        mock.addr,
        &dir.join("usage.db"),
        &database_reporter(
            "sql",
            "postgres",
            "postgres://postgres@127.0.0.1:5432/test",
            &table,
        ),
    ));
    let expected = traffic(gw.addr, 200, 8, "pg");
    let query = format!(
        "SELECT COUNT(*), COUNT(DISTINCT request_id), SUM(prompt_tokens)::BIGINT, \
         SUM(completion_tokens)::BIGINT, SUM(total_tokens)::BIGINT, \
         bool_or(usage_estimated), bool_or(is_stream) FROM {table}"
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
    let pg_url = "postgres://postgres@127.0.0.1:5432/test";
    resend_everything(mock.addr, &dir.join("usage.db"), "postgres", pg_url, &table);
    let row = pg.query_one(&query, &[]).unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(4) as u64),
        (200, expected.3)
    );
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn mariadb_reporter_holds_exact_sums() {
    let mut my = mysql::Conn::new(mysql::Opts::from_url(MYSQL_URL).unwrap())
        .expect("MariaDB on 127.0.0.1:3306");
    let table = unique_table("usage_my");
    let mock = spawn_mock(&[]);
    let dir = temp_dir("mysql");
    // The seed's Go DSN form.
    let gw = spawn_gateway(&gateway_yaml(
        mock.addr,
        &dir.join("usage.db"),
        &database_reporter("sql", "mysql", "root@tcp(127.0.0.1:3306)/test", &table),
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
    let dsn = "mysql://root@127.0.0.1:3306/test";
    resend_everything(mock.addr, &dir.join("usage.db"), "mysql", dsn, &table);
    let row = my
        .query_first::<(i64, i64, Option<i64>, Option<i64>, Option<i64>), _>(&query)
        .unwrap()
        .unwrap();
    assert_eq!((row.0, row.4.unwrap() as u64), (200, expected.3));
    my.query_drop(format!("DROP TABLE {table}")).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
