//! The database reporter: inserts records into a table (created if missing, `request_id`
//! unique) of SQLite, PostgreSQL or MySQL/MariaDB, one transaction per batch: multi-row INSERTs,
//! or for PostgreSQL one prepared INSERT ... SELECT FROM unnest(arrays) whatever the batch size
//! (the server parses and plans it once per connection, not once per batch). Inserts are idempotent (`INSERT OR IGNORE`, `ON CONFLICT DO NOTHING`,
//! `INSERT IGNORE`), so a batch re-sent after a crash or a lost acknowledgement stores nothing
//! twice. Placeholders follow each driver (`?` or `$n`).
//!
//! Blocking clients by design: it runs on its reporter's own delivery thread, never on a worker.
//! It must not log the DSN (it may carry a password) nor record contents.

use crate::config::{Database, DbDriver};

use super::spool::Spooled;
use super::UsageRecord;

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

/// Inserted columns, in order, and whether they may be NULL.
const COLUMNS: [(&str, Kind, bool); 20] = [
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
enum Val {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(bool),
}

fn values(r: &UsageRecord) -> [Val; 20] {
    use Val::{Bool, Int, Text};
    let int = |v: u64| Int(Some(v as i64));
    [
        Text(Some(r.request_id.clone())),
        Text(r.client_request_id.clone()),
        Text(Some(r.timestamp.clone())),
        Text(r.key_name.clone()),
        Text(r.user_id.clone()),
        Text(r.api_key.clone()),
        Text(r.model.clone()),
        Text(Some(r.endpoint.clone())),
        Bool(r.is_stream),
        Text(Some(r.backend_url.clone())),
        int(u64::from(r.status_code)),
        int(r.latency_ms),
        Int(r.ttft_ms.map(|v| v as i64)),
        int(r.prompt_tokens),
        int(r.completion_tokens),
        int(r.total_tokens),
        int(r.cached_tokens),
        int(r.reasoning_tokens),
        Bool(r.usage_estimated),
        Text(Some(r.status.clone())),
    ]
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

enum Conn {
    Sqlite(rusqlite::Connection),
    /// With the batch INSERT, prepared on first use.
    Postgres(Box<postgres::Client>, Option<postgres::Statement>),
    Mysql(Box<mysql::Conn>),
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
        let (conn, existing): (Conn, Vec<String>) = match driver {
            DbDriver::Sqlite => {
                let conn = rusqlite::Connection::open(dsn).map_err(|e| err(&e))?;
                conn.busy_timeout(std::time::Duration::from_secs(10))
                    .and_then(|_| conn.execute_batch(&create))
                    .map_err(|e| err(&e))?;
                let existing = conn
                    .prepare(columns_query(driver))
                    .and_then(|mut q| {
                        q.query_map([table], |r| r.get(0))?
                            .collect::<rusqlite::Result<_>>()
                    })
                    .map_err(|e| err(&e))?;
                (Conn::Sqlite(conn), existing)
            }
            DbDriver::Postgres => {
                let mut client =
                    postgres::Client::connect(dsn, postgres::NoTls).map_err(|e| err(&e))?;
                client.batch_execute(&create).map_err(|e| err(&e))?;
                let existing = client
                    .query(columns_query(driver), &[&table])
                    .map_err(|e| err(&e))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                (Conn::Postgres(Box::new(client), None), existing)
            }
            DbDriver::Mysql => {
                use mysql::prelude::Queryable;
                let opts = mysql::Opts::from_url(dsn).map_err(|e| err(&e))?;
                let mut conn = mysql::Conn::new(opts).map_err(|e| err(&e))?;
                conn.query_drop(&create).map_err(|e| err(&e))?;
                let existing = conn
                    .exec(columns_query(driver), (table,))
                    .map_err(|e| err(&e))?;
                (Conn::Mysql(Box::new(conn)), existing)
            }
        };
        let mut conn = conn;
        for alter in missing_columns_sql(driver, table, &existing) {
            tracing::warn!(table, "usage table predates a column; adding it: {alter}");
            match &mut conn {
                Conn::Sqlite(c) => c.execute_batch(&alter).map_err(|e| err(&e))?,
                Conn::Postgres(c, _) => c.batch_execute(&alter).map_err(|e| err(&e))?,
                Conn::Mysql(c) => {
                    use mysql::prelude::Queryable;
                    c.query_drop(&alter).map_err(|e| err(&e))?
                }
            }
        }
        Ok(conn)
    }

    pub fn deliver(&mut self, rows: &[Spooled]) -> Result<(), String> {
        let records: Vec<UsageRecord> = rows
            .iter()
            .filter_map(|row| match row.record() {
                Ok(r) => Some(r),
                // Only a hand-edited spool gets here; skipping beats blocking the reporter forever.
                Err(e) => {
                    tracing::error!(row = row.id, "unreadable spool row skipped: {e}");
                    None
                }
            })
            .collect();
        if records.is_empty() {
            return Ok(());
        }
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => self.connect()?,
        };
        let result = insert(&mut conn, self.config.driver, &self.config.table, &records);
        if result.is_ok() {
            self.conn = Some(conn);
        }
        result
    }
}

/// Rows per INSERT statement: keeps a large `batch_size` under every driver's parameter limit
/// (PostgreSQL and MySQL: 65535).
const MAX_ROWS_PER_STATEMENT: usize = 1000;

/// Inserts all `records` in one transaction.
fn insert(
    conn: &mut Conn,
    driver: DbDriver,
    table: &str,
    records: &[UsageRecord],
) -> Result<(), String> {
    let chunks = || {
        records.chunks(MAX_ROWS_PER_STATEMENT).map(|chunk| {
            (
                insert_sql(driver, table, chunk.len()),
                chunk.iter().flat_map(values),
            )
        })
    };
    match conn {
        Conn::Sqlite(c) => {
            use rusqlite::types::Value;
            let tx = c.transaction().map_err(|e| e.to_string())?;
            for (sql, vals) in chunks() {
                let params = vals.map(|v| match v {
                    Val::Text(t) => t.map_or(Value::Null, Value::Text),
                    Val::Int(i) => i.map_or(Value::Null, Value::Integer),
                    Val::Bool(b) => Value::Integer(i64::from(b)),
                });
                tx.execute(&sql, rusqlite::params_from_iter(params))
                    .map_err(|e| e.to_string())?;
            }
            tx.commit().map_err(|e| e.to_string())
        }
        Conn::Postgres(c, prepared) => {
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
            let columns = PgColumns::from_records(records);
            let params: Vec<&(dyn ToSql + Sync)> = columns.0.iter().map(PgColumn::param).collect();
            let mut tx = c.transaction().map_err(|e| e.to_string())?;
            tx.execute(&stmt, &params).map_err(|e| e.to_string())?;
            tx.commit().map_err(|e| e.to_string())
        }
        Conn::Mysql(c) => {
            use mysql::prelude::Queryable;
            use mysql::Value;
            let mut tx = c
                .start_transaction(mysql::TxOpts::default())
                .map_err(|e| e.to_string())?;
            for (sql, vals) in chunks() {
                let params: Vec<Value> = vals
                    .map(|v| match v {
                        Val::Text(t) => t.map_or(Value::NULL, |s| Value::Bytes(s.into_bytes())),
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

/// One array per column, for PostgreSQL's unnest INSERT.
enum PgColumn {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Bool(Vec<bool>),
}

struct PgColumns(Vec<PgColumn>);

impl PgColumns {
    fn from_records(records: &[UsageRecord]) -> PgColumns {
        let n = records.len();
        let mut columns: Vec<PgColumn> = COLUMNS
            .iter()
            .map(|(_, kind, _)| match kind {
                Kind::Key | Kind::Short | Kind::Text => PgColumn::Text(Vec::with_capacity(n)),
                Kind::Int => PgColumn::Int(Vec::with_capacity(n)),
                Kind::Bool => PgColumn::Bool(Vec::with_capacity(n)),
            })
            .collect();
        for r in records {
            for (column, value) in columns.iter_mut().zip(values(r)) {
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

impl PgColumn {
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
    fn placeholders_per_driver() {
        let pg = postgres_insert_sql("t");
        assert!(pg.contains("unnest($1::text[], $2::text[],"), "{pg}");
        assert!(
            pg.contains("$9::bool[]") && pg.contains("$20::text[])"),
            "{pg}"
        );
        assert!(pg.ends_with("ON CONFLICT (request_id) DO NOTHING"));
        assert!(!pg.contains('?'));
        let my = insert_sql(DbDriver::Mysql, "t", 1);
        assert!(my.starts_with("INSERT IGNORE INTO t (request_id, client_request_id, timestamp,"));
        assert_eq!(my.matches('?').count(), 20);
        let lite = insert_sql(DbDriver::Sqlite, "t", 3);
        assert!(lite.starts_with("INSERT OR IGNORE INTO"));
        assert_eq!(lite.matches('?').count(), 60);
    }
}
