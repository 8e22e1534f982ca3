//! The `usage_hook` section: metering switches, the spool, and the reporters (webhooks and
//! database sinks) that records are delivered to. Parsed, defaulted and validated here into
//! plain data; `crate::usage` acts on it.
//!
//! It must not connect to anything: a database DSN is only checked for shape (and a Go-style
//! MySQL DSN converted, by [`crate::db::mysql_url`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::DurationValue;
use crate::db::DbDriver;

/// Usage metering and reporting (key `usage_hook`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageHook {
    /// Master switch: off means no metering at all, whatever the reporters say.
    pub enabled: bool,
    /// Ask streaming backends for usage on the client's behalf (the client never sees it).
    pub inject_stream_usage: bool,
    /// Report the raw client key instead of the masked `sk-te...001`.
    pub include_raw_key: bool,
    /// The SQLite outbox every record is written to before delivery.
    pub spool_path: PathBuf,
    /// Rows delivered by every reporter are deleted after this.
    pub retention: Duration,
    /// Bound of the worker -> reporter channel; a full channel drops (and counts) records.
    pub channel_capacity: usize,
    /// When a response's last bytes may leave relative to its record's spool commit.
    pub durability: Durability,
    /// Enabled reporters only; disabled ones are validated and then left out.
    pub reporters: Vec<Reporter>,
}

/// `usage_hook.durability`: what a response's last bytes wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// The last bytes wait until the record is committed to the spool (group commit across
    /// workers): an answered request's record survives a process kill.
    Sync,
    /// The last bytes leave at once; the record reaches the spool within the ingest tick
    /// (20 ms), and a process kill in between loses it.
    Async,
}

/// One usage reporter (items of `usage_hook.reporters`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporter {
    /// Unique; also the reporter's cursor name in the spool.
    pub name: String,
    pub kind: ReporterKind,
    /// Records per delivery (webhook: >1 sends a JSON array; database: rows per transaction).
    pub batch_size: usize,
    /// How long a batch smaller than `batch_size` waits for more records before it is sent.
    pub batch_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReporterKind {
    Webhook(Webhook),
    Database(Database),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    /// Whole-request timeout of one POST.
    pub timeout: Duration,
    /// Immediate attempts of one delivery before it waits for the backoff schedule.
    pub retry: u32,
    /// Extra request headers, e.g. `Authorization`.
    pub headers: BTreeMap<String, String>,
    /// When set, bodies are signed: `X-LLMProxy-Signature: sha256=<hex HMAC-SHA256>`.
    pub secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    pub driver: DbDriver,
    /// Connection string as the driver's client takes it: a file path for sqlite, a URL or
    /// key=value string for postgres, a `mysql://` URL for mysql (Go DSNs are converted).
    pub dsn: String,
    pub table: String,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawUsageHook {
    enabled: bool,
    inject_stream_usage: bool,
    include_raw_key: bool,
    spool_path: PathBuf,
    retention: DurationValue,
    channel_capacity: usize,
    durability: Durability,
    reporters: Vec<RawReporter>,
}

impl Default for RawUsageHook {
    fn default() -> Self {
        RawUsageHook {
            enabled: false,
            inject_stream_usage: true,
            include_raw_key: false,
            spool_path: PathBuf::from("./data/usage.db"),
            retention: DurationValue(Duration::from_secs(7 * 86_400)),
            // Over 2 s of records at 100k req/s: rides out a slow spool fsync without drops.
            channel_capacity: 262_144,
            durability: Durability::Async,
            reporters: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReporter {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "default_true")]
    enabled: bool,
    url: Option<String>,
    timeout: Option<DurationValue>,
    retry: Option<u32>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    batch_size: Option<usize>,
    batch_timeout: Option<DurationValue>,
    secret: Option<String>,
    database: Option<RawDatabase>,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    driver: DbDriver,
    dsn: String,
    table: Option<String>,
}

/// Validates one reporter; `Err((key under the reporter, message))`.
fn build_reporter(raw: RawReporter) -> Result<Reporter, (&'static str, String)> {
    let only_for = |key: &'static str, present: bool, kind: &str| {
        if present {
            Err((key, format!("not used by a {kind} reporter")))
        } else {
            Ok(())
        }
    };
    let kind = match raw.kind.as_str() {
        "webhook" => {
            only_for("database", raw.database.is_some(), "webhook")?;
            let url = raw
                .url
                .ok_or(("url", "required for a webhook reporter".to_string()))?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err((
                    "url",
                    format!("expected an http:// or https:// URL, got {url:?}"),
                ));
            }
            let timeout = raw.timeout.map_or(Duration::from_secs(5), |t| t.0);
            if timeout.is_zero() {
                return Err(("timeout", "must be greater than 0".into()));
            }
            ReporterKind::Webhook(Webhook {
                url,
                timeout,
                retry: raw.retry.unwrap_or(3),
                headers: raw.headers,
                secret: raw.secret.filter(|s| !s.is_empty()),
            })
        }
        "database" => {
            only_for("url", raw.url.is_some(), "database")?;
            only_for("headers", !raw.headers.is_empty(), "database")?;
            only_for("secret", raw.secret.is_some(), "database")?;
            let db = raw.database.ok_or((
                "database",
                "required for a database reporter: {driver, dsn, table}".to_string(),
            ))?;
            let table = db.table.unwrap_or_else(|| "usage_records".to_string());
            let valid_table = !table.is_empty()
                && table.len() <= 64
                && !table.starts_with(|c: char| c.is_ascii_digit())
                && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_table {
                // It is spliced into SQL: only plain identifiers.
                return Err((
                    "database",
                    format!("table {table:?}: use letters, digits and `_` only"),
                ));
            }
            let dsn = match db.driver {
                DbDriver::Mysql => crate::db::mysql_url(&db.dsn).map_err(|e| ("database", e))?,
                _ => db.dsn,
            };
            if dsn.is_empty() {
                return Err(("database", "dsn must not be empty".into()));
            }
            ReporterKind::Database(Database {
                driver: db.driver,
                dsn,
                table,
            })
        }
        other => {
            return Err((
                "type",
                format!("unknown reporter type {other:?}; expected \"webhook\" or \"database\""),
            ))
        }
    };
    let batch_size = raw.batch_size.unwrap_or(match kind {
        ReporterKind::Webhook(_) => 1,
        ReporterKind::Database(_) => 500,
    });
    if batch_size == 0 {
        return Err(("batch_size", "must be at least 1".into()));
    }
    Ok(Reporter {
        name: raw.name,
        kind,
        batch_size,
        batch_timeout: raw.batch_timeout.map_or(Duration::from_secs(1), |t| t.0),
    })
}

/// Validates the section; disabled reporters are checked, then left out.
pub(super) fn build(
    raw: RawUsageHook,
    report: &mut dyn FnMut(&str, Result<(), String>),
) -> UsageHook {
    if raw.channel_capacity == 0 {
        report(
            "usage_hook.channel_capacity",
            Err("must be greater than 0".into()),
        );
    }
    let mut reporters: Vec<Reporter> = Vec::new();
    for (index, reporter) in raw.reporters.into_iter().enumerate() {
        let enabled = reporter.enabled;
        let name = reporter.name.clone();
        if name.is_empty() || reporters.iter().any(|r| r.name == name) {
            report(
                &format!("usage_hook.reporters[{index}].name"),
                Err(format!("must be unique and not empty: {name:?}")),
            );
        }
        match build_reporter(reporter) {
            Ok(r) if enabled => reporters.push(r),
            Ok(_) => {}
            Err((key, message)) => report(
                &format!("usage_hook.reporters[{index}].{key}"),
                Err(message),
            ),
        }
    }
    UsageHook {
        enabled: raw.enabled,
        inject_stream_usage: raw.inject_stream_usage,
        include_raw_key: raw.include_raw_key,
        spool_path: raw.spool_path,
        retention: raw.retention.0,
        channel_capacity: raw.channel_capacity,
        durability: raw.durability,
        reporters,
    }
}
