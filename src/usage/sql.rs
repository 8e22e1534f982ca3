//! The database reporter: inserts records into a table (created if missing, `request_id`
//! unique) of SQLite, PostgreSQL or MySQL/MariaDB, one transaction per batch. Inserts are
//! idempotent, so a batch re-sent after a crash or a lost acknowledgement stores nothing twice:
//! - SQLite and MySQL: multi-row `INSERT OR IGNORE` / `INSERT IGNORE`, placeholders `?`;
//! - PostgreSQL: a `COPY`, the cheapest load for the server. A re-sent row fails it with a unique
//!   violation; the batch then goes again as one prepared `INSERT ... SELECT FROM unnest(arrays)
//!   ON CONFLICT DO NOTHING`, the same statement whatever the batch size.
//!
//! Records handed over in memory are inserted as they are; records read back from the spool
//! have their strings borrowed from its JSON.
//!
//! Blocking clients by design: it runs on its reporter's own delivery thread, never on a worker.
//! It must not log the DSN (it may carry a password) nor record contents.

use crate::config::Database;
use crate::db::{self, DbDriver};

use super::batch::{self, Span};
use super::{Record, UsageRecord};

/// What a column holds, which decides its SQL type per driver.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `request_id`: unique, so a bounded type where MySQL requires one.
    Key,
    /// Short text, indexed or compared (a bounded type in MySQL).
    Short,
    Text,
    Int,
    Bool,
}

/// Inserted columns, in order, and whether they may be NULL. Columns added after the first
/// release go last: `ALTER TABLE ... ADD COLUMN` appends, so new and upgraded tables agree.
/// Bounds each read and write of a delivery (MySQL) or unacknowledged data (PostgreSQL): a sink
/// lost mid-batch fails the batch, which is retried with backoff, instead of holding its
/// reporter forever. A batch of `MAX_ROWS_PER_STATEMENT` rows takes well under a second.
const SINK_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

const COLUMNS: [(&str, Kind, bool); 22] = [
    ("request_id", Kind::Key, false),
    ("client_request_id", Kind::Text, true),
    ("timestamp", Kind::Short, false),
    ("key_name", Kind::Text, true),
    ("user_id", Kind::Text, true),
    ("api_key", Kind::Text, true),
    ("model", Kind::Text, true),
    ("endpoint", Kind::Text, false),
    ("is_stream", Kind::Bool, false),
    ("backend_url", Kind::Text, false),
    ("status_code", Kind::Int, false),
    ("latency_ms", Kind::Int, false),
    ("ttft_ms", Kind::Int, true),
    ("prompt_tokens", Kind::Int, false),
    ("completion_tokens", Kind::Int, false),
    ("total_tokens", Kind::Int, false),
    ("cached_tokens", Kind::Int, false),
    ("reasoning_tokens", Kind::Int, false),
    ("usage_estimated", Kind::Bool, false),
    ("status", Kind::Short, false),
    ("api", Kind::Short, false),
    ("tier", Kind::Int, false),
];

fn column_names() -> String {
    COLUMNS.map(|(name, _, _)| name).join(", ")
}

fn sql_type(driver: DbDriver, kind: Kind) -> &'static str {
    match (driver, kind) {
        (DbDriver::Mysql, Kind::Key | Kind::Short) => "VARCHAR(191)",
        (_, Kind::Key | Kind::Short | Kind::Text) => "TEXT",
        (DbDriver::Sqlite, Kind::Int | Kind::Bool) => "INTEGER",
        (_, Kind::Int) => "BIGINT",
        (_, Kind::Bool) => "BOOLEAN",
    }
}

/// One column value, converted to each driver's parameter type.
enum Val<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Bool(bool),
}

fn values<S: AsRef<str>>(r: &Record<S>) -> [Val<'_>; 22] {
    use Val::{Bool, Int, Text};
    let int = |v: u64| Int(Some(v as i64));
    fn text<S: AsRef<str>>(v: &S) -> Val<'_> {
        Text(Some(v.as_ref()))
    }
    fn opt<S: AsRef<str>>(v: &Option<S>) -> Val<'_> {
        Text(v.as_ref().map(AsRef::as_ref))
    }
    [
        text(&r.request_id),
        opt(&r.client_request_id),
        text(&r.timestamp),
        opt(&r.key_name),
        opt(&r.user_id),
        opt(&r.api_key),
        opt(&r.model),
        text(&r.endpoint),
        Bool(r.is_stream),
        text(&r.backend_url),
        int(u64::from(r.status_code)),
        int(r.latency_ms),
        Int(r.ttft_ms.map(|v| v as i64)),
        int(r.prompt_tokens),
        int(r.completion_tokens),
        int(r.total_tokens),
        int(r.cached_tokens),
        int(r.reasoning_tokens),
        Bool(r.usage_estimated),
        text(&r.status),
        text(&r.api),
        int(u64::from(r.tier)),
    ]
}

/// A record for insertion: in memory, or read back with its strings borrowed from the
/// spooled JSON, or owned when one of them holds a JSON escape (a client's `X-Request-Id` with
/// a quote, say).
enum Row<'a> {
    Borrowed(Record<&'a str>),
    Owned(UsageRecord),
}

impl<'a> Row<'a> {
    fn read(row: batch::Row<'a>) -> Option<Row<'a>> {
        if let Some(r) = row.record {
            return Some(Row::Borrowed(r));
        }
        if let Ok(r) = serde_json::from_str(row.json) {
            return Some(Row::Borrowed(r));
        }
        match serde_json::from_str::<UsageRecord>(row.json) {
            Ok(r) => Some(Row::Owned(r)),
            // Only a hand-edited spool gets here; skipping beats blocking the reporter forever.
            Err(e) => {
                tracing::error!(row = row.id, "unreadable spool row skipped: {e}");
                None
            }
        }
    }

    fn values(&self) -> [Val<'_>; 22] {
        match self {
            Row::Borrowed(r) => values(r),
            Row::Owned(r) => values(r),
        }
    }
}

/// `CREATE TABLE IF NOT EXISTS` for the driver. Indexed text columns get a bounded VARCHAR
/// where MySQL requires one.
pub fn create_table_sql(driver: DbDriver, table: &str) -> String {
    let id = match driver {
        DbDriver::Sqlite => "id INTEGER PRIMARY KEY",
        DbDriver::Postgres => "id BIGSERIAL PRIMARY KEY",
        DbDriver::Mysql => "id BIGINT AUTO_INCREMENT PRIMARY KEY",
    };
    let mut sql = format!("CREATE TABLE IF NOT EXISTS {table} ({id}");
    for (name, kind, nullable) in COLUMNS {
        let constraint = match (kind, nullable) {
            (Kind::Key, _) => " NOT NULL UNIQUE",
            (_, false) => " NOT NULL",
            (_, true) => "",
        };
        sql.push_str(&format!(", {name} {}{constraint}", sql_type(driver, kind)));
    }
    sql.push(')');
    sql
}

/// The query listing a table's columns (one text column, the name; one parameter, the table).
fn columns_query(driver: DbDriver) -> &'static str {
    match driver {
        DbDriver::Sqlite => "SELECT name FROM pragma_table_info(?1)",
        DbDriver::Postgres => {
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1"
        }
        DbDriver::Mysql => {
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?"
        }
    }
}

/// `ALTER TABLE`s adding the columns an existing table lacks (made by an older llmproxy), as
/// nullable columns: rows already there have no value for them.
fn missing_columns_sql(driver: DbDriver, table: &str, existing: &[String]) -> Vec<String> {
    COLUMNS
        .iter()
        .filter(|(name, _, _)| !existing.iter().any(|e| e.eq_ignore_ascii_case(name)))
        .map(|(name, kind, _)| {
            format!(
                "ALTER TABLE {table} ADD COLUMN {name} {}",
                sql_type(driver, *kind)
            )
        })
        .collect()
}

/// PostgreSQL's idempotent INSERT of a whole batch: one array parameter per column.
pub fn postgres_insert_sql(table: &str) -> String {
    let arrays: Vec<String> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (_, kind, _))| {
            let element = match kind {
                Kind::Key | Kind::Short | Kind::Text => "text",
                Kind::Int => "int8",
                Kind::Bool => "bool",
            };
            format!("${}::{element}[]", i + 1)
        })
        .collect();
    format!(
        "INSERT INTO {table} ({}) SELECT * FROM unnest({}) ON CONFLICT (request_id) DO NOTHING",
        column_names(),
        arrays.join(", ")
    )
}

/// The idempotent multi-row INSERT for `rows` records (SQLite and MySQL).
pub fn insert_sql(driver: DbDriver, table: &str, rows: usize) -> String {
    let verb = match driver {
        DbDriver::Sqlite => "INSERT OR IGNORE INTO",
        DbDriver::Postgres => unreachable!("PostgreSQL inserts with postgres_insert_sql"),
        DbDriver::Mysql => "INSERT IGNORE INTO",
    };
    let mut sql = format!("{verb} {table} ({}) VALUES ", column_names());
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for col in 0..COLUMNS.len() {
            if col > 0 {
                sql.push_str(", ");
            }
            sql.push('?');
        }
        sql.push(')');
    }
    sql
}

/// An open connection, and for PostgreSQL the batch INSERT, prepared on first use.
struct Conn {
    db: db::Conn,
    postgres_insert: Option<postgres::Statement>,
}

/// Connects lazily and reconnects after any error: a database restart costs one failed batch.
pub struct SqlSink {
    config: Database,
    conn: Option<Conn>,
}

impl SqlSink {
    pub fn new(config: Database) -> SqlSink {
        SqlSink { config, conn: None }
    }

    /// Connects, creates the table if missing, and adds the columns an older table lacks.
    fn connect(&self) -> Result<Conn, String> {
        let (driver, table) = (self.config.driver, self.config.table.as_str());
        let create = create_table_sql(driver, table);
        let dsn = &self.config.dsn;
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let mut conn = db::connect(driver, dsn, Some(SINK_IO_TIMEOUT))?;
        let existing: Vec<String> = match &mut conn {
            db::Conn::Sqlite(conn) => {
                conn.busy_timeout(std::time::Duration::from_secs(10))
                    .and_then(|_| conn.execute_batch(&create))
                    .map_err(|e| err(&e))?;
                conn.prepare(columns_query(driver))
                    .and_then(|mut q| {
                        q.query_map([table], |r| r.get(0))?
                            .collect::<rusqlite::Result<_>>()
                    })
                    .map_err(|e| err(&e))?
            }
            db::Conn::Postgres(client) => {
                client.batch_execute(&create).map_err(|e| err(&e))?;
                client
                    .query(columns_query(driver), &[&table])
                    .map_err(|e| err(&e))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect()
            }
            db::Conn::Mysql(conn) => {
                use mysql::prelude::Queryable;
                conn.query_drop(&create).map_err(|e| err(&e))?;
                conn.exec(columns_query(driver), (table,))
                    .map_err(|e| err(&e))?
            }
        };
        for alter in missing_columns_sql(driver, table, &existing) {
            tracing::warn!(table, "usage table predates a column; adding it: {alter}");
            match &mut conn {
                db::Conn::Sqlite(c) => c.execute_batch(&alter).map_err(|e| err(&e))?,
                db::Conn::Postgres(c) => c.batch_execute(&alter).map_err(|e| err(&e))?,
                db::Conn::Mysql(c) => {
                    use mysql::prelude::Queryable;
                    c.query_drop(&alter).map_err(|e| err(&e))?
                }
            }
        }
        Ok(Conn {
            db: conn,
            postgres_insert: None,
        })
    }

    pub fn deliver(&mut self, spans: &[Span]) -> Result<(), String> {
        let rows: Vec<Row> = batch::rows(spans).filter_map(Row::read).collect();
        if rows.is_empty() {
            return Ok(());
        }
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => self.connect()?,
        };
        let result = insert(&mut conn, self.config.driver, &self.config.table, &rows);
        if result.is_ok() {
            self.conn = Some(conn);
        }
        result
    }
}

/// Rows per INSERT statement: keeps a large `batch_size` under every driver's parameter limit
/// (PostgreSQL and MySQL: 65535).
const MAX_ROWS_PER_STATEMENT: usize = 1000;

/// Inserts all `rows` in one transaction.
fn insert(conn: &mut Conn, driver: DbDriver, table: &str, rows: &[Row]) -> Result<(), String> {
    let chunks = || {
        rows.chunks(MAX_ROWS_PER_STATEMENT).map(|chunk| {
            (
                insert_sql(driver, table, chunk.len()),
                chunk.iter().flat_map(Row::values),
            )
        })
    };
    match &mut conn.db {
        db::Conn::Sqlite(c) => {
            use rusqlite::types::{ToSqlOutput, ValueRef};
            let tx = c.transaction().map_err(|e| e.to_string())?;
            for (sql, vals) in chunks() {
                let params = vals.map(|v| {
                    ToSqlOutput::Borrowed(match v {
                        Val::Text(t) => t.map_or(ValueRef::Null, |s| ValueRef::Text(s.as_bytes())),
                        Val::Int(i) => i.map_or(ValueRef::Null, ValueRef::Integer),
                        Val::Bool(b) => ValueRef::Integer(i64::from(b)),
                    })
                });
                tx.execute(&sql, rusqlite::params_from_iter(params))
                    .map_err(|e| e.to_string())?;
            }
            tx.commit().map_err(|e| e.to_string())
        }
        db::Conn::Postgres(c) => match copy_in(c, table, rows) {
            Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                // A batch re-sent after a crash or a lost acknowledgement: insert what is new.
                insert_new_postgres(c, &mut conn.postgres_insert, table, rows)
            }
            result => result.map_err(|e| e.to_string()),
        },
        db::Conn::Mysql(c) => {
            use mysql::prelude::Queryable;
            use mysql::Value;
            let mut tx = c
                .start_transaction(mysql::TxOpts::default())
                .map_err(|e| e.to_string())?;
            for (sql, vals) in chunks() {
                let params: Vec<Value> = vals
                    .map(|v| match v {
                        Val::Text(t) => t.map_or(Value::NULL, |s| Value::Bytes(s.into())),
                        Val::Int(i) => i.map_or(Value::NULL, Value::Int),
                        Val::Bool(b) => Value::Int(i64::from(b)),
                    })
                    .collect();
                tx.exec_drop(sql, params).map_err(|e| e.to_string())?;
            }
            tx.commit().map_err(|e| e.to_string())
        }
    }
}

/// PostgreSQL's fast path: the batch as one `COPY ... FROM STDIN`, which costs the server about
/// two thirds of the CPU of the idempotent INSERT (BENCHMARKS.md). A row already in the table
/// fails it with a unique violation, and nothing of the batch is stored.
fn copy_in(c: &mut postgres::Client, table: &str, rows: &[Row]) -> Result<(), postgres::Error> {
    use std::io::Write;
    let mut text = Vec::with_capacity(rows.len() * 256);
    for row in rows {
        push_copy_line(row.values(), &mut text);
    }
    let mut tx = c.transaction()?;
    let mut writer = tx.copy_in(&format!("COPY {table} ({}) FROM STDIN", column_names()))?;
    // A write error ends the COPY; finish() then reports the server's reason.
    let _ = writer.write_all(&text);
    writer.finish()?;
    tx.commit()
}

/// The idempotent INSERT of a whole batch (`ON CONFLICT DO NOTHING`), prepared on first use.
fn insert_new_postgres(
    c: &mut postgres::Client,
    prepared: &mut Option<postgres::Statement>,
    table: &str,
    rows: &[Row],
) -> Result<(), String> {
    use postgres::types::ToSql;
    let stmt = match prepared {
        Some(stmt) => stmt.clone(),
        None => {
            let stmt = c
                .prepare(&postgres_insert_sql(table))
                .map_err(|e| e.to_string())?;
            prepared.insert(stmt).clone()
        }
    };
    let columns = PgColumns::from_rows(rows);
    let params: Vec<&(dyn ToSql + Sync)> = columns.0.iter().map(PgColumn::param).collect();
    let mut tx = c.transaction().map_err(|e| e.to_string())?;
    tx.execute(&stmt, &params).map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}

/// One row of COPY's text format: tab-separated, `\N` for NULL, `t`/`f` for booleans, and
/// backslash escapes for the characters the format gives a meaning to.
fn push_copy_line(values: [Val<'_>; 22], out: &mut Vec<u8>) {
    use std::io::Write;
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match value {
            Val::Text(None) | Val::Int(None) => out.extend_from_slice(b"\\N"),
            Val::Text(Some(s)) => {
                for &b in s.as_bytes() {
                    match b {
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b'\t' => out.extend_from_slice(b"\\t"),
                        b'\n' => out.extend_from_slice(b"\\n"),
                        b'\r' => out.extend_from_slice(b"\\r"),
                        _ => out.push(b),
                    }
                }
            }
            Val::Int(Some(n)) => {
                let _ = write!(out, "{n}");
            }
            Val::Bool(b) => out.push(if b { b't' } else { b'f' }),
        }
    }
    out.push(b'\n');
}

/// One array per column, for PostgreSQL's unnest INSERT.
enum PgColumn<'a> {
    Text(Vec<Option<&'a str>>),
    Int(Vec<Option<i64>>),
    Bool(Vec<bool>),
}

struct PgColumns<'a>(Vec<PgColumn<'a>>);

impl<'a> PgColumns<'a> {
    fn from_rows(rows: &'a [Row]) -> PgColumns<'a> {
        let n = rows.len();
        let mut columns: Vec<PgColumn> = COLUMNS
            .iter()
            .map(|(_, kind, _)| match kind {
                Kind::Key | Kind::Short | Kind::Text => PgColumn::Text(Vec::with_capacity(n)),
                Kind::Int => PgColumn::Int(Vec::with_capacity(n)),
                Kind::Bool => PgColumn::Bool(Vec::with_capacity(n)),
            })
            .collect();
        for row in rows {
            for (column, value) in columns.iter_mut().zip(row.values()) {
                match (column, value) {
                    (PgColumn::Text(c), Val::Text(v)) => c.push(v),
                    (PgColumn::Int(c), Val::Int(v)) => c.push(v),
                    (PgColumn::Bool(c), Val::Bool(v)) => c.push(v),
                    _ => unreachable!("values() follows COLUMNS"),
                }
            }
        }
        PgColumns(columns)
    }
}

impl PgColumn<'_> {
    fn param(&self) -> &(dyn postgres::types::ToSql + Sync) {
        match self {
            PgColumn::Text(c) => c,
            PgColumn::Int(c) => c,
            PgColumn::Bool(c) => c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_lines_escape_what_the_text_format_reads() {
        let record = Record {
            request_id: "req-1",
            client_request_id: Some("tab\there\\slash\nline\rend"),
            timestamp: "2026-01-14T10:30:00.000Z",
            key_name: Some("team"),
            user_id: None,
            api_key: None,
            model: Some("m"),
            endpoint: "/v1/chat/completions",
            api: "chat_completions",
            is_stream: true,
            backend_url: "http://b",
            tier: 0,
            status_code: 200,
            latency_ms: 1,
            ttft_ms: None,
            prompt_tokens: 7,
            completion_tokens: 1,
            total_tokens: 8,
            cached_tokens: 0,
            reasoning_tokens: 0,
            usage_estimated: false,
            status: "ok",
        };
        let mut line = Vec::new();
        push_copy_line(values(&record), &mut line);
        let line = String::from_utf8(line).unwrap();
        let fields: Vec<&str> = line.strip_suffix('\n').unwrap().split('\t').collect();
        assert_eq!(fields.len(), COLUMNS.len(), "{line:?}");
        assert_eq!(fields[0], "req-1");
        assert_eq!(fields[1], r"tab\there\\slash\nline\rend");
        assert_eq!(fields[3], "team");
        assert_eq!((fields[4], fields[8], fields[12]), (r"\N", "t", r"\N"));
        assert_eq!(fields[13], "7");
        assert_eq!(fields[20], "chat_completions");
    }

    #[test]
    fn placeholders_per_driver() {
        let pg = postgres_insert_sql("t");
        assert!(pg.contains("unnest($1::text[], $2::text[],"), "{pg}");
        assert!(
            pg.contains("$9::bool[]") && pg.contains("$22::int8[])"),
            "{pg}"
        );
        assert!(pg.ends_with("ON CONFLICT (request_id) DO NOTHING"));
        assert!(!pg.contains('?'));
        let my = insert_sql(DbDriver::Mysql, "t", 1);
        assert!(my.starts_with("INSERT IGNORE INTO t (request_id, client_request_id, timestamp,"));
        assert_eq!(my.matches('?').count(), 22);
        let lite = insert_sql(DbDriver::Sqlite, "t", 3);
        assert!(lite.starts_with("INSERT OR IGNORE INTO"));
        assert_eq!(lite.matches('?').count(), 66);
    }
}
