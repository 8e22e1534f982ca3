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

/// Inserted columns, in order.
const COLUMNS: [&str; 20] = [
    "request_id",
    "client_request_id",
    "timestamp",
    "key_name",
    "user_id",
    "api_key",
    "model",
    "endpoint",
    "is_stream",
    "backend_url",
    "status_code",
    "latency_ms",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "usage_estimated",
    "status",
];

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
    let (id, short, text, int, boolean) = match driver {
        DbDriver::Sqlite => (
            "id INTEGER PRIMARY KEY",
            "TEXT",
            "TEXT",
            "INTEGER",
            "INTEGER",
        ),
        DbDriver::Postgres => (
            "id BIGSERIAL PRIMARY KEY",
            "TEXT",
            "TEXT",
            "BIGINT",
            "BOOLEAN",
        ),
        DbDriver::Mysql => (
            "id BIGINT AUTO_INCREMENT PRIMARY KEY",
            "VARCHAR(191)",
            "TEXT",
            "BIGINT",
            "BOOLEAN",
        ),
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            {id},
            request_id {short} NOT NULL UNIQUE,
            client_request_id {text},
            timestamp {short} NOT NULL,
            key_name {text},
            user_id {text},
            api_key {text},
            model {text},
            endpoint {text} NOT NULL,
            is_stream {boolean} NOT NULL,
            backend_url {text} NOT NULL,
            status_code {int} NOT NULL,
            latency_ms {int} NOT NULL,
            ttft_ms {int},
            prompt_tokens {int} NOT NULL,
            completion_tokens {int} NOT NULL,
            total_tokens {int} NOT NULL,
            cached_tokens {int} NOT NULL,
            reasoning_tokens {int} NOT NULL,
            usage_estimated {boolean} NOT NULL,
            status {short} NOT NULL
        )"
    )
}

/// PostgreSQL's idempotent INSERT of a whole batch: one array parameter per column.
pub fn postgres_insert_sql(table: &str) -> String {
    let arrays: Vec<String> = values(&UsageRecord::default())
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let kind = match v {
                Val::Text(_) => "text",
                Val::Int(_) => "int8",
                Val::Bool(_) => "bool",
            };
            format!("${}::{kind}[]", i + 1)
        })
        .collect();
    format!(
        "INSERT INTO {table} ({}) SELECT * FROM unnest({}) ON CONFLICT (request_id) DO NOTHING",
        COLUMNS.join(", "),
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
    let mut sql = format!("{verb} {table} ({}) VALUES ", COLUMNS.join(", "));
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

    fn connect(&self) -> Result<Conn, String> {
        let create = create_table_sql(self.config.driver, &self.config.table);
        let dsn = &self.config.dsn;
        match self.config.driver {
            DbDriver::Sqlite => {
                let conn = rusqlite::Connection::open(dsn).map_err(|e| e.to_string())?;
                conn.busy_timeout(std::time::Duration::from_secs(10))
                    .and_then(|_| conn.execute_batch(&create))
                    .map_err(|e| e.to_string())?;
                Ok(Conn::Sqlite(conn))
            }
            DbDriver::Postgres => {
                let mut client =
                    postgres::Client::connect(dsn, postgres::NoTls).map_err(|e| e.to_string())?;
                client.batch_execute(&create).map_err(|e| e.to_string())?;
                Ok(Conn::Postgres(Box::new(client), None))
            }
            DbDriver::Mysql => {
                use mysql::prelude::Queryable;
                let opts = mysql::Opts::from_url(dsn).map_err(|e| e.to_string())?;
                let mut conn = mysql::Conn::new(opts).map_err(|e| e.to_string())?;
                conn.query_drop(&create).map_err(|e| e.to_string())?;
                Ok(Conn::Mysql(Box::new(conn)))
            }
        }
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
        let mut columns: Vec<PgColumn> = values(&UsageRecord::default())
            .iter()
            .map(|v| match v {
                Val::Text(_) => PgColumn::Text(Vec::with_capacity(records.len())),
                Val::Int(_) => PgColumn::Int(Vec::with_capacity(records.len())),
                Val::Bool(_) => PgColumn::Bool(Vec::with_capacity(records.len())),
            })
            .collect();
        for r in records {
            for (column, value) in columns.iter_mut().zip(values(r)) {
                match (column, value) {
                    (PgColumn::Text(c), Val::Text(v)) => c.push(v),
                    (PgColumn::Int(c), Val::Int(v)) => c.push(v),
                    (PgColumn::Bool(c), Val::Bool(v)) => c.push(v),
                    _ => unreachable!("values() gives every record the same column kinds"),
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
