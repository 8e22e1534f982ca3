//! The admin key store: API keys created through the admin API, kept as SHA-256 hashes (a key
//! is shown once, at creation, and never stored) in SQLite, or in PostgreSQL or MySQL/MariaDB
//! when `admin.key_store` is a `postgres://` or `mysql://` URL, so that every instance sharing the
//! database knows every key. The admin thread writes it; the auth look-up threads read it as one
//! more pipeline provider. Blocking: never on a worker. Connections come from [`crate::db`].

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::db::{self, Conn, DbDriver};

/// How long a read or write of a networked store may take.
const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

const SCHEMA_SQLITE: &str = "CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    user_id TEXT,
    status TEXT NOT NULL DEFAULT 'active',
    total_quota INTEGER,
    allowed_models TEXT,
    allowed_ips TEXT,
    expires_at TEXT,
    created_at INTEGER NOT NULL
)";

const SCHEMA_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    user_id TEXT,
    status TEXT NOT NULL DEFAULT 'active',
    total_quota BIGINT,
    allowed_models TEXT,
    allowed_ips TEXT,
    expires_at TEXT,
    created_at BIGINT NOT NULL
)";

/// MySQL indexes only bounded strings: names and hashes get a length.
const SCHEMA_MYSQL: &str = "CREATE TABLE IF NOT EXISTS api_keys (
    name VARCHAR(255) PRIMARY KEY,
    key_hash CHAR(64) NOT NULL UNIQUE,
    key_prefix VARCHAR(32) NOT NULL,
    user_id TEXT,
    status VARCHAR(32) NOT NULL DEFAULT 'active',
    total_quota BIGINT,
    allowed_models TEXT,
    allowed_ips TEXT,
    expires_at VARCHAR(64),
    created_at BIGINT NOT NULL
)";

/// Fields of a stored key as the auth providers read them (never the key itself).
const FIELDS: [&str; 6] = [
    "name",
    "user_id",
    "status",
    "total_quota",
    "allowed_models",
    "allowed_ips",
];

/// A statement parameter.
enum Param<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
}

/// Opens the store at `location` (a SQLite path, or a `postgres://` or `mysql://` URL) and makes
/// its table if missing. Errors never carry the location (it may hold a password).
pub fn open(location: &str) -> Result<Conn, String> {
    let driver = DbDriver::of(location);
    let mut conn = match driver {
        DbDriver::Sqlite => {
            if let Some(dir) = std::path::Path::new(location)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                let _ = std::fs::create_dir_all(dir);
            }
            let conn = rusqlite::Connection::open(location).map_err(|e| e.to_string())?;
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .and_then(|()| conn.pragma_update(None, "journal_mode", "WAL"))
                .map_err(|e| e.to_string())?;
            Conn::Sqlite(conn)
        }
        _ => db::connect(driver, location, Some(IO_TIMEOUT))?,
    };
    let schema = match driver {
        DbDriver::Sqlite => SCHEMA_SQLITE,
        DbDriver::Postgres => SCHEMA_POSTGRES,
        DbDriver::Mysql => SCHEMA_MYSQL,
    };
    if driver == DbDriver::Postgres {
        // PostgreSQL notes "already exists, skipping" on every open otherwise.
        execute(&mut conn, "SET client_min_messages TO WARNING", &[])
            .map_err(Failure::into_message)?;
    }
    // Two instances starting together may race to create the table; the loser's second try
    // finds it.
    execute(&mut conn, schema, &[])
        .or_else(|_| execute(&mut conn, schema, &[]))
        .map_err(|e| format!("key store: {}", e.into_message()))?;
    Ok(conn)
}

pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Creates a key from the admin API's JSON (`name` required; `user_id`, `total_quota`,
/// `allowed_models`, `allowed_ips`, `expires_at` optional). Returns the new key: the only time
/// it exists outside the client's hands.
pub fn create(conn: &mut Conn, spec: &Value) -> Result<String, String> {
    let name = spec["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or("`name` is required")?;
    let key = format!("sk-llmproxy-{}", random_hex(24).map_err(|e| e.to_string())?);
    let list = |f: &str| spec.get(f).filter(|v| v.is_array()).map(Value::to_string);
    let (models, ips) = (list("allowed_models"), list("allowed_ips"));
    let hash = hash(&key);
    let created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let inserted = execute(
        conn,
        "INSERT INTO api_keys (name, key_hash, key_prefix, user_id, total_quota, allowed_models,
             allowed_ips, expires_at, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        &[
            Param::Text(Some(name)),
            Param::Text(Some(&hash)),
            Param::Text(Some(&key[..16])),
            Param::Text(spec["user_id"].as_str()),
            Param::Int(spec["total_quota"].as_u64().map(|q| q as i64)),
            Param::Text(models.as_deref()),
            Param::Text(ips.as_deref()),
            Param::Text(spec["expires_at"].as_str()),
            Param::Int(Some(created_at)),
        ],
    );
    match inserted {
        Ok(_) => Ok(key),
        Err(Failure::Duplicate) => Err(format!("a key named {name:?} exists")),
        Err(Failure::Other(e)) => Err(e),
    }
}

/// Every stored key's metadata (name, prefix, owner, limits), never the key or its hash.
pub fn list(conn: &mut Conn) -> Result<Vec<Value>, String> {
    let text = text_cast(conn);
    let rows = query(
        conn,
        &format!(
            "SELECT name, key_prefix, user_id, status, CAST(total_quota AS {text}),
                 allowed_models, CAST(created_at AS {text})
             FROM api_keys ORDER BY name"
        ),
        7,
        &[],
    )?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let number = |v: &Option<String>| v.as_deref().and_then(|s| s.parse::<i64>().ok());
            json!({
                "name": r[0],
                "key_prefix": r[1],
                "user_id": r[2],
                "status": r[3],
                "total_quota": number(&r[4]),
                "allowed_models": r[5].as_deref().and_then(|s| serde_json::from_str::<Value>(s).ok()),
                "created_at": number(&r[6]),
            })
        })
        .collect())
}

pub fn delete(conn: &mut Conn, name: &str) -> Result<bool, String> {
    execute(
        conn,
        "DELETE FROM api_keys WHERE name = ?",
        &[Param::Text(Some(name))],
    )
    .map(|n| n > 0)
    .map_err(Failure::into_message)
}

/// The stored fields of `api_key`, by hash, as text (lists as JSON arrays).
pub fn lookup(
    conn: &mut Conn,
    api_key: &str,
) -> Result<Option<Vec<(&'static str, String)>>, String> {
    let text = text_cast(conn);
    let hash = hash(api_key);
    let rows = query(
        conn,
        &format!(
            "SELECT name, user_id, status, CAST(total_quota AS {text}), allowed_models, allowed_ips
             FROM api_keys WHERE key_hash = ?"
        ),
        FIELDS.len(),
        &[Param::Text(Some(&hash))],
    )?;
    Ok(rows.into_iter().next().map(|row| {
        FIELDS
            .iter()
            .zip(row)
            .filter_map(|(f, v)| Some((*f, v?)))
            .collect()
    }))
}

/// The type a number is cast to, to be read as text by every driver alike.
fn text_cast(conn: &Conn) -> &'static str {
    match conn {
        Conn::Mysql(_) => "CHAR",
        _ => "TEXT",
    }
}

/// Why a statement failed.
enum Failure {
    /// A unique constraint refused the row.
    Duplicate,
    Other(String),
}

impl Failure {
    fn into_message(self) -> String {
        match self {
            Failure::Duplicate => "duplicate key".into(),
            Failure::Other(e) => e,
        }
    }
}

/// PostgreSQL numbers its placeholders; the statements here are written with `?`.
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs a statement; the number of rows it changed.
fn execute(conn: &mut Conn, sql: &str, params: &[Param<'_>]) -> Result<u64, Failure> {
    match conn {
        Conn::Sqlite(c) => {
            let values = params.iter().map(|p| match p {
                Param::Text(t) => t.map_or(rusqlite::types::Value::Null, |t| t.to_string().into()),
                Param::Int(i) => i.map_or(rusqlite::types::Value::Null, Into::into),
            });
            c.execute(sql, rusqlite::params_from_iter(values))
                .map(|n| n as u64)
                .map_err(|e| match e {
                    rusqlite::Error::SqliteFailure(f, _)
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        Failure::Duplicate
                    }
                    e => Failure::Other(e.to_string()),
                })
        }
        Conn::Postgres(c) => {
            let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| match p {
                    Param::Text(t) => t as &(dyn postgres::types::ToSql + Sync),
                    Param::Int(i) => i as &(dyn postgres::types::ToSql + Sync),
                })
                .collect();
            c.execute(&numbered(sql), &refs).map_err(|e| {
                if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
                    Failure::Duplicate
                } else {
                    Failure::Other(e.to_string())
                }
            })
        }
        Conn::Mysql(c) => {
            use mysql::prelude::Queryable;
            let values: Vec<mysql::Value> = params
                .iter()
                .map(|p| match p {
                    Param::Text(t) => t.map_or(mysql::Value::NULL, |t| t.into()),
                    Param::Int(i) => i.map_or(mysql::Value::NULL, mysql::Value::Int),
                })
                .collect();
            let params = if values.is_empty() {
                mysql::Params::Empty
            } else {
                mysql::Params::Positional(values)
            };
            c.exec_drop(sql, params)
                .map(|()| c.affected_rows())
                .map_err(|e| match e {
                    // ER_DUP_ENTRY
                    mysql::Error::MySqlError(m) if m.code == 1062 => Failure::Duplicate,
                    e => Failure::Other(e.to_string()),
                })
        }
    }
}

/// Runs a query whose `columns` columns are all text (or NULL).
fn query(
    conn: &mut Conn,
    sql: &str,
    columns: usize,
    params: &[Param<'_>],
) -> Result<Vec<Vec<Option<String>>>, String> {
    let text = |p: &Param<'_>| match p {
        Param::Text(t) => t.map(str::to_string),
        Param::Int(i) => i.map(|i| i.to_string()),
    };
    match conn {
        Conn::Sqlite(c) => {
            let mut stmt = c.prepare_cached(sql).map_err(|e| e.to_string())?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(params.iter().map(text)), |r| {
                    (0..columns)
                        .map(|i| r.get::<_, Option<String>>(i))
                        .collect()
                })
                .map_err(|e| e.to_string())?;
            rows.collect::<Result<_, _>>().map_err(|e| e.to_string())
        }
        Conn::Postgres(c) => {
            let values: Vec<Option<String>> = params.iter().map(text).collect();
            let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = values
                .iter()
                .map(|v| v as &(dyn postgres::types::ToSql + Sync))
                .collect();
            let rows = c.query(&numbered(sql), &refs).map_err(|e| e.to_string())?;
            Ok(rows
                .iter()
                .map(|r| (0..columns).map(|i| r.get(i)).collect())
                .collect())
        }
        Conn::Mysql(c) => {
            use mysql::prelude::Queryable;
            let values: Vec<mysql::Value> = params
                .iter()
                .map(|p| text(p).map_or(mysql::Value::NULL, Into::into))
                .collect();
            let params = if values.is_empty() {
                mysql::Params::Empty
            } else {
                mysql::Params::Positional(values)
            };
            let rows: Vec<mysql::Row> = c.exec(sql, params).map_err(|e| e.to_string())?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    (0..columns)
                        .map(|i| r.get::<Option<String>, _>(i).flatten())
                        .collect()
                })
                .collect())
        }
    }
}

fn random_hex(bytes: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(hex::encode(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_hashed_and_found_by_hash() {
        let mut conn = open(":memory:").unwrap();
        let key = create(
            &mut conn,
            &json!({"name": "team-a", "user_id": "u1", "total_quota": 5}),
        )
        .unwrap();
        assert!(key.starts_with("sk-llmproxy-") && key.len() == 12 + 48);
        let Conn::Sqlite(c) = &conn else {
            unreachable!()
        };
        let stored: Vec<String> = c
            .prepare("SELECT name || key_hash || key_prefix FROM api_keys")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!stored[0].contains(&key), "the key is stored in the clear");
        let fields = lookup(&mut conn, &key).unwrap().unwrap();
        assert!(
            fields.contains(&("name", "team-a".into()))
                && fields.contains(&("total_quota", "5".into()))
        );
        assert!(lookup(&mut conn, "sk-other").unwrap().is_none());
        assert!(create(&mut conn, &json!({"name": "team-a"}))
            .unwrap_err()
            .contains("exists"));
        let listed = list(&mut conn).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0]["total_quota"], 5);
        assert!(delete(&mut conn, "team-a").unwrap());
        assert!(lookup(&mut conn, &key).unwrap().is_none());
    }

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            numbered("INSERT INTO t VALUES (?, ?)"),
            "INSERT INTO t VALUES ($1, $2)"
        );
    }
}
