//! The admin key store: API keys created through the admin API, kept in SQLite as SHA-256
//! hashes (a key is shown once, at creation, and never stored). The admin thread writes it; the
//! auth look-up threads read it as one more pipeline provider. Blocking: never on a worker.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS api_keys (
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

/// Fields of a stored key as the auth providers read them (never the key itself).
const FIELDS: [&str; 6] = [
    "name",
    "user_id",
    "status",
    "total_quota",
    "allowed_models",
    "allowed_ips",
];

pub fn open(path: &str) -> rusqlite::Result<Connection> {
    if let Some(dir) = std::path::Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        let _ = std::fs::create_dir_all(dir);
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Creates a key from the admin API's JSON (`name` required; `user_id`, `total_quota`,
/// `allowed_models`, `allowed_ips`, `expires_at` optional). Returns the new key: the only time
/// it exists outside the client's hands.
pub fn create(conn: &Connection, spec: &Value) -> Result<String, String> {
    let name = spec["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or("`name` is required")?;
    let key = format!("sk-llmproxy-{}", random_hex(24).map_err(|e| e.to_string())?);
    let list = |f: &str| spec.get(f).filter(|v| v.is_array()).map(Value::to_string);
    conn.execute(
        "INSERT INTO api_keys (name, key_hash, key_prefix, user_id, total_quota, allowed_models,
             allowed_ips, expires_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, strftime('%s','now'))",
        params![
            name,
            hash(&key),
            &key[..16],
            spec["user_id"].as_str(),
            spec["total_quota"].as_u64().map(|q| q as i64),
            list("allowed_models"),
            list("allowed_ips"),
            spec["expires_at"].as_str(),
        ],
    )
    .map_err(|e| match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            format!("a key named {name:?} exists")
        }
        e => e.to_string(),
    })?;
    Ok(key)
}

/// Every stored key's metadata (name, prefix, owner, limits), never the key or its hash.
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<Value>> {
    let mut stmt = conn.prepare(
        "SELECT name, key_prefix, user_id, status, total_quota, allowed_models, created_at
         FROM api_keys ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(json!({
            "name": r.get::<_, String>(0)?,
            "key_prefix": r.get::<_, String>(1)?,
            "user_id": r.get::<_, Option<String>>(2)?,
            "status": r.get::<_, String>(3)?,
            "total_quota": r.get::<_, Option<i64>>(4)?,
            "allowed_models": r.get::<_, Option<String>>(5)?.and_then(|s| serde_json::from_str::<Value>(&s).ok()),
            "created_at": r.get::<_, i64>(6)?,
        }))
    })?;
    rows.collect()
}

pub fn delete(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    Ok(conn.execute("DELETE FROM api_keys WHERE name = ?1", [name])? > 0)
}

/// The stored fields of `api_key`, by hash, as text (lists as JSON arrays).
pub fn lookup(
    conn: &Connection,
    api_key: &str,
) -> rusqlite::Result<Option<Vec<(&'static str, String)>>> {
    conn.query_row(
        "SELECT name, user_id, status, CAST(total_quota AS TEXT), allowed_models, allowed_ips
         FROM api_keys WHERE key_hash = ?1",
        [hash(api_key)],
        |r| {
            let mut fields = Vec::with_capacity(FIELDS.len());
            for (i, f) in FIELDS.iter().enumerate() {
                if let Some(v) = r.get::<_, Option<String>>(i)? {
                    fields.push((*f, v));
                }
            }
            Ok(fields)
        },
    )
    .optional()
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
        let conn = open(":memory:").unwrap();
        let key = create(
            &conn,
            &json!({"name": "team-a", "user_id": "u1", "total_quota": 5}),
        )
        .unwrap();
        assert!(key.starts_with("sk-llmproxy-") && key.len() == 12 + 48);
        let stored: Vec<String> = conn
            .prepare("SELECT name || key_hash || key_prefix FROM api_keys")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!stored[0].contains(&key), "the key is stored in the clear");
        let fields = lookup(&conn, &key).unwrap().unwrap();
        assert!(
            fields.contains(&("name", "team-a".into()))
                && fields.contains(&("total_quota", "5".into()))
        );
        assert!(lookup(&conn, "sk-other").unwrap().is_none());
        assert!(create(&conn, &json!({"name": "team-a"}))
            .unwrap_err()
            .contains("exists"));
        assert_eq!(list(&conn).unwrap().len(), 1);
        assert!(delete(&conn, "team-a").unwrap());
        assert!(lookup(&conn, &key).unwrap().is_none());
    }
}
