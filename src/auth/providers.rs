//! Key providers outside the config file: Redis, SQL databases (SQLite, PostgreSQL, MySQL) and an
//! HTTP webhook. Every call here blocks, so it runs only on the look-up threads ([`super::cache`]),
//! never on a worker. Each look-up thread keeps its own connections and reconnects after errors.
//! The SQL look-up query is built here from the table and columns the config names; connections
//! are opened by [`crate::db`].

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::config::{ApiKeyConfig, KeyStatus, LimitSpec, ProviderConfig};
use crate::db::{self, DbDriver};
use crate::redact::mask_key;

/// How long a Redis connect, or one read or write of a Redis or MySQL look-up, may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// A failed look-up (the provider is down or answered nonsense): never "unknown key".
#[derive(Debug)]
pub struct ProviderError(pub String);

/// One look-up thread's connections, one slot per pipeline provider.
#[derive(Default)]
pub struct Conns {
    slots: HashMap<usize, Conn>,
}

enum Conn {
    Redis(redis::Connection),
    /// With its look-up query.
    Database(db::Conn, String),
    KeyStore(db::Conn),
    Http(ureq::Agent),
}

/// What the client sent, for providers that decide per request (the webhook).
pub struct Request<'a> {
    pub api_key: &'a str,
    pub ip: &'a str,
    pub method: &'a str,
    pub path: &'a str,
}

/// Looks `req.api_key` up in provider `index`: `Ok(None)` when it does not know the key.
pub fn lookup(
    index: usize,
    provider: &ProviderConfig,
    conns: &mut Conns,
    req: &Request<'_>,
) -> Result<Option<ApiKeyConfig>, ProviderError> {
    let result = match provider {
        ProviderConfig::Static => return Ok(None),
        ProviderConfig::Redis { url, key_pattern } => {
            let conn = match conns.slots.get_mut(&index) {
                Some(Conn::Redis(c)) => c,
                _ => {
                    let client = redis::Client::open(url.0.as_str()).map_err(err)?;
                    let c = client
                        .get_connection_with_timeout(LOOKUP_TIMEOUT)
                        .map_err(err)?;
                    let _ = c.set_read_timeout(Some(LOOKUP_TIMEOUT));
                    conns.slots.insert(index, Conn::Redis(c));
                    let Some(Conn::Redis(c)) = conns.slots.get_mut(&index) else {
                        unreachable!()
                    };
                    c
                }
            };
            redis_lookup(
                conn,
                &key_pattern.replace("{api_key}", req.api_key),
                req.api_key,
            )
        }
        ProviderConfig::Database {
            driver,
            dsn,
            table,
            key_column,
            columns,
        } => {
            if let std::collections::hash_map::Entry::Vacant(slot) = conns.slots.entry(index) {
                let conn =
                    db::connect(*driver, &dsn.0, Some(LOOKUP_TIMEOUT)).map_err(ProviderError)?;
                let query = select_query(*driver, table, key_column, columns);
                slot.insert(Conn::Database(conn, query));
            }
            let Some(Conn::Database(conn, query)) = conns.slots.get_mut(&index) else {
                unreachable!("opened above")
            };
            sql_lookup(conn, query, columns, req.api_key)
        }
        ProviderConfig::KeyStore { location } => {
            if let std::collections::hash_map::Entry::Vacant(slot) = conns.slots.entry(index) {
                slot.insert(Conn::KeyStore(
                    super::store::open(&location.0).map_err(ProviderError)?,
                ));
            }
            let Some(Conn::KeyStore(c)) = conns.slots.get_mut(&index) else {
                unreachable!("opened above")
            };
            match super::store::lookup(c, req.api_key).map_err(ProviderError)? {
                None => Ok(None),
                Some(fields) => Ok(Some(record(req.api_key, |f| {
                    fields
                        .iter()
                        .find(|(name, _)| *name == f)
                        .map(|(_, v)| Value::String(v.clone()))
                })?)),
            }
        }
        ProviderConfig::Webhook { url, timeout } => {
            let agent = match conns.slots.get(&index) {
                Some(Conn::Http(a)) => a.clone(),
                _ => {
                    let a: ureq::Agent = ureq::Agent::config_builder()
                        .timeout_global(Some(*timeout))
                        .http_status_as_error(false)
                        .build()
                        .into();
                    conns.slots.insert(index, Conn::Http(a.clone()));
                    a
                }
            };
            webhook_lookup(&agent, url, req)
        }
    };
    if result.is_err() {
        // Reconnect next time: the connection may be what failed.
        conns.slots.remove(&index);
    }
    result
}

fn err(e: impl std::fmt::Display) -> ProviderError {
    ProviderError(e.to_string())
}

/// A hash (`HGETALL`) or a JSON string (`GET`) at `key`.
fn redis_lookup(
    conn: &mut redis::Connection,
    key: &str,
    api_key: &str,
) -> Result<Option<ApiKeyConfig>, ProviderError> {
    let kind: String = redis::cmd("TYPE").arg(key).query(conn).map_err(err)?;
    match kind.as_str() {
        "none" => Ok(None),
        "hash" => {
            let map: HashMap<String, String> =
                redis::cmd("HGETALL").arg(key).query(conn).map_err(err)?;
            Ok(Some(record(api_key, |f| {
                map.get(f).map(|v| Value::String(v.clone()))
            })?))
        }
        "string" => {
            let text: String = redis::cmd("GET").arg(key).query(conn).map_err(err)?;
            let v: Value = serde_json::from_str(&text).map_err(err)?;
            Ok(Some(record(api_key, |f| v.get(f).cloned())?))
        }
        other => Err(ProviderError(format!("unexpected redis type {other}"))),
    }
}

/// The look-up of one key: every column selected as text, so one reader fits all drivers.
fn select_query(
    driver: DbDriver,
    table: &str,
    key_column: &str,
    columns: &[(String, String)],
) -> String {
    let select: Vec<String> = columns
        .iter()
        .map(|(_, column)| match driver {
            DbDriver::Sqlite => format!("CAST({column} AS TEXT)"),
            DbDriver::Postgres => format!("{column}::text"),
            DbDriver::Mysql => format!("CAST({column} AS CHAR)"),
        })
        .collect();
    let placeholder = match driver {
        DbDriver::Postgres => "$1",
        DbDriver::Sqlite | DbDriver::Mysql => "?",
    };
    format!(
        "SELECT {} FROM {table} WHERE {key_column} = {placeholder}",
        select.join(", ")
    )
}

/// Runs the look-up `query`; `columns` are the (record field, column) pairs it selects.
fn sql_lookup(
    conn: &mut db::Conn,
    query: &str,
    columns: &[(String, String)],
    api_key: &str,
) -> Result<Option<ApiKeyConfig>, ProviderError> {
    // Every column is selected as text (the query casts it), so one reader fits all drivers.
    let row: Option<Vec<Option<String>>> = match conn {
        db::Conn::Sqlite(c) => {
            let mut stmt = c.prepare_cached(query).map_err(err)?;
            let mut rows = stmt.query([api_key]).map_err(err)?;
            match rows.next().map_err(err)? {
                None => None,
                Some(r) => Some(
                    (0..columns.len())
                        .map(|i| r.get::<_, Option<String>>(i))
                        .collect::<Result<_, _>>()
                        .map_err(err)?,
                ),
            }
        }
        db::Conn::Postgres(c) => c
            .query_opt(query, &[&api_key])
            .map_err(err)?
            .map(|r| (0..columns.len()).map(|i| r.get(i)).collect()),
        db::Conn::Mysql(c) => {
            use mysql::prelude::Queryable;
            let row: Option<mysql::Row> = c.exec_first(query, (api_key,)).map_err(err)?;
            row.map(|r| {
                (0..columns.len())
                    .map(|i| r.get::<Option<String>, _>(i).flatten())
                    .collect()
            })
        }
    };
    let Some(row) = row else { return Ok(None) };
    let by_name: HashMap<&str, String> = columns
        .iter()
        .zip(row)
        .filter_map(|((field, _), v)| Some((field.as_str(), v?)))
        .collect();
    Ok(Some(record(api_key, |f| {
        by_name.get(f).map(|v| Value::String(v.clone()))
    })?))
}

/// POSTs the request facts; a 2xx JSON answer with `allow: true` (or a key record) lets it in,
/// `allow: false` or 401/403/404 means "not a key we know".
fn webhook_lookup(
    agent: &ureq::Agent,
    url: &str,
    req: &Request<'_>,
) -> Result<Option<ApiKeyConfig>, ProviderError> {
    let body = serde_json::json!({
        "api_key": req.api_key,
        "ip": req.ip,
        "method": req.method,
        "path": req.path,
        "model": null,
    });
    let mut resp = agent.post(url).send_json(&body).map_err(err)?;
    let status = resp.status().as_u16();
    if matches!(status, 401 | 403 | 404) {
        return Ok(None);
    }
    if !(200..300).contains(&status) {
        return Err(ProviderError(format!("webhook answered {status}")));
    }
    let v: Value = resp.body_mut().read_json().map_err(err)?;
    if v.get("allow") == Some(&Value::Bool(false)) {
        return Ok(None);
    }
    Ok(Some(record(req.api_key, |f| v.get(f).cloned())?))
}

/// Builds a key record from named fields (strings, numbers, arrays or comma-separated lists).
fn record(
    api_key: &str,
    field: impl Fn(&str) -> Option<Value>,
) -> Result<ApiKeyConfig, ProviderError> {
    let text = |f: &str| match field(f) {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let list = |f: &str| -> Vec<String> {
        match field(f) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect(),
            Some(Value::String(s)) if s.trim_start().starts_with('[') => {
                serde_json::from_str(&s).unwrap_or_default()
            }
            Some(Value::String(s)) => s
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    };
    let number = |f: &str| -> Result<Option<u64>, ProviderError> {
        text(f)
            .map(|s| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| ProviderError(format!("{f} is not a number")))
            })
            .transpose()
    };
    let status = match text("status") {
        None => KeyStatus::Active,
        Some(s) => {
            KeyStatus::parse(&s).ok_or_else(|| ProviderError(format!("unknown status {s:?}")))?
        }
    };
    let allowed_ips = list("allowed_ips")
        .iter()
        .map(|s| {
            crate::config::parse_net(s)
                .ok_or_else(|| ProviderError(format!("bad allowed_ips {s:?}")))
        })
        .collect::<Result<_, _>>()?;
    let expires_at = match field("expires_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(v) => Some(
            crate::time::parse_unix_seconds(&v)
                .ok_or_else(|| ProviderError("bad expires_at".into()))?,
        ),
    };
    let signed = |f: &str| -> Result<Option<i32>, ProviderError> {
        text(f)
            .map(|s| {
                s.trim()
                    .parse::<i32>()
                    .map_err(|_| ProviderError(format!("{f} is not an integer")))
            })
            .transpose()
    };
    let priority = signed("priority")?.unwrap_or(0);
    Ok(ApiKeyConfig {
        key: api_key.to_string(),
        name: text("name").unwrap_or_else(|| mask_key(api_key)),
        user_id: text("user_id"),
        status,
        total_quota: number("total_quota")?,
        allowed_ips,
        allowed_models: list("allowed_models"),
        expires_at,
        rate_limit: LimitSpec {
            requests_per_minute: number("requests_per_minute")?,
            tokens_per_minute: number("tokens_per_minute")?,
            max_concurrent: number("max_concurrent")?.map(|n| n as u32),
        },
        priority,
        max_priority: signed("max_priority")?.unwrap_or(priority).max(priority),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_queries_per_driver() {
        let columns = [
            ("name".to_string(), "name".to_string()),
            ("tokens_per_minute".to_string(), "tpm".to_string()),
        ];
        assert_eq!(
            select_query(DbDriver::Sqlite, "api_keys", "api_key", &columns),
            "SELECT CAST(name AS TEXT), CAST(tpm AS TEXT) FROM api_keys WHERE api_key = ?"
        );
        assert_eq!(
            select_query(DbDriver::Postgres, "keys", "k", &columns),
            "SELECT name::text, tpm::text FROM keys WHERE k = $1"
        );
        assert_eq!(
            select_query(DbDriver::Mysql, "keys", "k", &columns),
            "SELECT CAST(name AS CHAR), CAST(tpm AS CHAR) FROM keys WHERE k = ?"
        );
    }
}
