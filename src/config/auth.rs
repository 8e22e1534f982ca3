//! The client authentication sections, `auth` and `api_keys`: header names, refusal responses,
//! quota period, the provider pipeline (which providers, which table and columns, the Lua stage)
//! and the static keys. Parsed, defaulted and validated here into plain data; `crate::auth`
//! acts on it.
//!
//! It must not connect to a provider nor build its queries (that is `crate::auth::providers`):
//! table and column names are only checked to be plain SQL identifiers.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::address::parse_net;
use super::limits::{check_spec, LimitSpec};
use super::types::Secret;
use super::units::DurationValue;
use super::Issue;
use crate::db::DbDriver;
use crate::redact::mask_key;
use crate::time::parse_unix_seconds;

/// `auth` when present and enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Lowercased header names tried in order; `authorization` takes `Bearer <key>`.
    pub header_names: Vec<String>,
    /// Status and message per refusal, indexed by [`Denial`] as usize.
    pub responses: Vec<DenialResponse>,
    /// Where per-key quota consumption outlives restarts: a SQLite file, or a `postgres://` or
    /// `mysql://` URL several instances share. Shown masked.
    pub quota_path: Secret,
    pub quota_period: Option<QuotaPeriod>,
    pub mode: PipelineMode,
    /// Providers asked in order; `[Static]` when `auth.pipeline` is not set.
    pub pipeline: Vec<ProviderConfig>,
    pub cache: CacheConfig,
    /// Threads that run provider look-ups (never the workers).
    pub lookup_threads: usize,
    /// A `type: lua` pipeline entry: runs after the key is known, on each worker.
    pub lua: Option<LuaConfig>,
}

/// The Lua policy stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuaConfig {
    /// Inline script; empty when `file` names it (read at start, not here).
    pub source: String,
    pub file: Option<PathBuf>,
    pub max_instructions: u64,
    /// Bytes.
    pub max_memory: usize,
}

/// `auth.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineMode {
    /// The first provider that knows the key decides.
    FirstMatch,
    /// Every provider must know the key and let the request in.
    All,
}

/// `auth.cache`: how long provider answers are reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    /// How long past its TTL an answer may still be used while the provider fails.
    pub stale_if_error: Duration,
}

/// One `auth.pipeline` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderConfig {
    /// The top-level `api_keys` list.
    Static,
    Redis {
        url: Secret,
        /// `{api_key}` is replaced by the client's key.
        key_pattern: String,
    },
    Database {
        driver: DbDriver,
        dsn: Secret,
        table: String,
        /// The column holding the key.
        key_column: String,
        /// (record field, column) pairs to select, in record-field order.
        columns: Vec<(String, String)>,
    },
    Webhook {
        url: String,
        timeout: Duration,
    },
    /// Keys created through the admin API (`admin.key_store`, stored hashed); appended to the
    /// pipeline when the admin API is enabled.
    KeyStore {
        /// A SQLite path, or a `postgres://` or `mysql://` URL.
        location: Secret,
    },
}

/// Why a key is refused; each has a configurable status and message (`auth.status_codes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    MissingKey,
    InvalidKey,
    Disabled,
    Expired,
    QuotaExceeded,
    IpNotAllowed,
    ModelNotAllowed,
    /// The Lua policy said no (its own status and message win).
    Policy,
}

impl Denial {
    pub const ALL: [Denial; 8] = [
        Denial::MissingKey,
        Denial::InvalidKey,
        Denial::Disabled,
        Denial::Expired,
        Denial::QuotaExceeded,
        Denial::IpNotAllowed,
        Denial::ModelNotAllowed,
        Denial::Policy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Denial::MissingKey => "missing_key",
            Denial::InvalidKey => "invalid_key",
            Denial::Disabled => "disabled",
            Denial::Expired => "expired",
            Denial::QuotaExceeded => "quota_exceeded",
            Denial::IpNotAllowed => "ip_not_allowed",
            Denial::ModelNotAllowed => "model_not_allowed",
            Denial::Policy => "policy",
        }
    }

    fn default_response(self) -> DenialResponse {
        let (status, message) = match self {
            Denial::MissingKey => (
                401,
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            ),
            Denial::InvalidKey => (401, "Incorrect API key provided."),
            Denial::Disabled => (403, "This API key has been disabled."),
            Denial::Expired => (401, "This API key has expired."),
            Denial::QuotaExceeded => (429, "You exceeded your current quota for this API key."),
            Denial::IpNotAllowed => (403, "This API key may not be used from your IP address."),
            Denial::ModelNotAllowed => (403, "This API key may not use the requested model."),
            Denial::Policy => (403, "Request denied by policy."),
        };
        DenialResponse {
            status,
            message: message.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenialResponse {
    pub status: u16,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    Daily,
    Monthly,
}

/// Key status as stored by the original gateway: a number (0..=3) or its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Disabled,
    QuotaExceeded,
    Expired,
}

impl KeyStatus {
    /// Numbers follow the original's `KeyStatus` enum (0 active, 1 disabled, 2 quota_exceeded,
    /// 3 expired); names are case-insensitive.
    pub fn parse(text: &str) -> Option<KeyStatus> {
        match text.trim().to_ascii_lowercase().as_str() {
            "0" | "active" | "enabled" => Some(KeyStatus::Active),
            "1" | "disabled" => Some(KeyStatus::Disabled),
            "2" | "quota_exceeded" => Some(KeyStatus::QuotaExceeded),
            "3" | "expired" => Some(KeyStatus::Expired),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for KeyStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyStatus;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("active, disabled, expired, quota_exceeded or 0..=3")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyStatus, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyStatus, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyStatus, E> {
                KeyStatus::parse(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// One entry of `api_keys`. `Debug` masks the key so a config dump never leaks it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeyConfig {
    pub key: String,
    pub name: String,
    pub user_id: Option<String>,
    pub status: KeyStatus,
    /// Tokens this key may consume (per `quota_period` when set).
    pub total_quota: Option<u64>,
    /// Empty: any address.
    pub allowed_ips: Vec<IpNet>,
    /// Empty: any model.
    pub allowed_models: Vec<String>,
    /// Unix seconds.
    pub expires_at: Option<u64>,
    /// Overrides `rate_limit.per_key` field by field.
    pub rate_limit: LimitSpec,
    /// Scheduling band when backends are saturated: higher is served first; below 0 is shed
    /// first (503).
    pub priority: i32,
    /// The highest priority the key may ask for in `scheduling.priority_header`.
    pub max_priority: i32,
}

impl fmt::Debug for ApiKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyConfig")
            .field("key", &mask_key(&self.key))
            .field("name", &self.name)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawAuth {
    enabled: bool,
    storage: String,
    header_names: Vec<String>,
    status_codes: std::collections::BTreeMap<String, RawDenialResponse>,
    quota_path: String,
    quota_period: Option<QuotaPeriod>,
    mode: PipelineMode,
    pipeline: Option<Vec<RawProvider>>,
    cache: RawCache,
    lookup_threads: usize,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawCache {
    ttl: DurationValue,
    negative_ttl: DurationValue,
    stale_if_error: DurationValue,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            ttl: DurationValue(Duration::from_secs(60)),
            negative_ttl: DurationValue(Duration::from_secs(10)),
            stale_if_error: DurationValue(Duration::from_secs(300)),
        }
    }
}

/// Unknown keys are already reported by the schema check; `name` only labels the entry.
#[derive(Deserialize)]
pub(super) struct RawProvider {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    key_pattern: Option<String>,
    #[serde(default)]
    driver: Option<DbDriver>,
    #[serde(default)]
    dsn: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    columns: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    timeout: Option<DurationValue>,
    #[serde(default)]
    script: Option<String>,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    max_instructions: Option<u64>,
    #[serde(default)]
    max_memory: Option<super::units::SizeValue>,
}

/// Record fields a database row may carry, with their default column names.
const RECORD_FIELDS: [&str; 12] = [
    "name",
    "user_id",
    "status",
    "total_quota",
    "allowed_ips",
    "allowed_models",
    "expires_at",
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent",
    "priority",
    "max_priority",
];
/// Selected unless `columns` maps them to "" (the rest only when mapped).
const DEFAULT_COLUMNS: usize = 7;

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            // Writing an `auth` section at all asks for authentication.
            enabled: true,
            storage: "file".to_string(),
            header_names: vec!["Authorization".to_string(), "X-API-Key".to_string()],
            status_codes: Default::default(),
            quota_path: "./data/quota.db".to_string(),
            quota_period: None,
            mode: PipelineMode::FirstMatch,
            pipeline: None,
            cache: RawCache::default(),
            lookup_threads: 4,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDenialResponse {
    status: Option<u16>,
    message: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApiKey {
    key: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    status: Option<KeyStatus>,
    #[serde(default)]
    total_quota: Option<u64>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    #[serde(default)]
    allowed_models: Vec<String>,
    #[serde(default)]
    expires_at: Option<serde_json::Value>,
    #[serde(default)]
    rate_limit: LimitSpec,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    max_priority: Option<i32>,
}

/// Validates `auth` and `api_keys` together: keys without `auth` would never be checked.
pub(super) fn build(
    auth: Option<RawAuth>,
    keys: Vec<RawApiKey>,
    issues: &mut Vec<Issue>,
) -> (Option<AuthConfig>, Vec<ApiKeyConfig>) {
    let auth = auth.filter(|a| a.enabled).map(|a| build_auth(a, issues));
    let mut api_keys = Vec::with_capacity(keys.len());
    let mut seen = std::collections::HashSet::new();
    for (index, raw) in keys.into_iter().enumerate() {
        let at = format!("api_keys[{index}]");
        if raw.key.is_empty() {
            issues.push(Issue::new(&format!("{at}.key"), "must not be empty"));
            continue;
        }
        if !seen.insert(raw.key.clone()) {
            issues.push(Issue::new(&format!("{at}.key"), "duplicate key"));
        }
        let mut allowed_ips = Vec::new();
        for (i, text) in raw.allowed_ips.iter().enumerate() {
            match parse_net(text) {
                Some(net) => allowed_ips.push(net),
                None => issues.push(Issue::new(
                    &format!("{at}.allowed_ips[{i}]"),
                    format!("{text:?} is not an IP address or CIDR block"),
                )),
            }
        }
        let expires_at = match &raw.expires_at {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => match parse_unix_seconds(v) {
                Some(t) => Some(t),
                None => {
                    issues.push(Issue::new(
                        &format!("{at}.expires_at"),
                        "expected RFC 3339 (2026-01-31T00:00:00Z) or unix seconds",
                    ));
                    None
                }
            },
        };
        check_spec(&raw.rate_limit, &format!("{at}.rate_limit"), issues);
        api_keys.push(ApiKeyConfig {
            name: raw.name.unwrap_or_else(|| mask_key(&raw.key)),
            key: raw.key,
            user_id: raw.user_id,
            status: raw.status.unwrap_or(KeyStatus::Active),
            total_quota: raw.total_quota,
            allowed_ips,
            allowed_models: raw.allowed_models,
            expires_at,
            rate_limit: raw.rate_limit,
            priority: raw.priority,
            max_priority: raw.max_priority.unwrap_or(raw.priority).max(raw.priority),
        });
    }
    let uses_static = auth
        .as_ref()
        .is_some_and(|a| a.pipeline.contains(&ProviderConfig::Static));
    if uses_static && api_keys.is_empty() {
        issues.push(Issue::new(
            "api_keys",
            "auth is enabled with storage \"file\" but no api_keys are configured",
        ));
    }
    (auth, api_keys)
}

fn build_auth(raw: RawAuth, issues: &mut Vec<Issue>) -> AuthConfig {
    if raw.storage != "file" && raw.pipeline.is_none() {
        issues.push(Issue::new(
            "auth.storage",
            format!(
                "{:?} is not supported yet; use \"file\" with top-level api_keys",
                raw.storage
            ),
        ));
    }
    if raw.header_names.is_empty() {
        issues.push(Issue::new(
            "auth.header_names",
            "must name at least one header",
        ));
    }
    let mut responses: Vec<DenialResponse> =
        Denial::ALL.iter().map(|d| d.default_response()).collect();
    for (name, custom) in raw.status_codes {
        let Some(i) = Denial::ALL.iter().position(|d| d.name() == name) else {
            let known: Vec<&str> = Denial::ALL.iter().map(|d| d.name()).collect();
            issues.push(Issue::new(
                &format!("auth.status_codes.{name}"),
                format!("unknown outcome; expected one of {}", known.join(", ")),
            ));
            continue;
        };
        if let Some(status) = custom.status {
            if !(400..=599).contains(&status) {
                issues.push(Issue::new(
                    &format!("auth.status_codes.{name}.status"),
                    "must be a 4xx or 5xx status",
                ));
            }
            responses[i].status = status;
        }
        if let Some(message) = custom.message {
            responses[i].message = message;
        }
    }
    let mut lua = None;
    let pipeline = match raw.pipeline {
        None => vec![ProviderConfig::Static],
        Some(items) => {
            let mut providers = Vec::new();
            for (i, p) in items.into_iter().enumerate() {
                let at = format!("auth.pipeline[{i}]");
                if p.enabled == Some(false) {
                    continue;
                }
                if p.kind == "lua" {
                    if lua.is_some() {
                        issues.push(Issue::new(&at, "only one lua stage is supported"));
                    }
                    lua = build_lua(p, &at, issues);
                } else if let Some(provider) = build_provider(p, &at, issues) {
                    providers.push(provider);
                }
            }
            if providers.is_empty() {
                issues.push(Issue::new(
                    "auth.pipeline",
                    "needs at least one key provider (static, redis, database or webhook)",
                ));
            }
            providers
        }
    };
    AuthConfig {
        header_names: raw
            .header_names
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        responses,
        quota_path: Secret(raw.quota_path),
        quota_period: raw.quota_period,
        mode: raw.mode,
        pipeline,
        lua,
        cache: CacheConfig {
            ttl: raw.cache.ttl.0,
            negative_ttl: raw.cache.negative_ttl.0,
            stale_if_error: raw.cache.stale_if_error.0,
        },
        lookup_threads: raw.lookup_threads.max(1),
    }
}

fn build_provider(p: RawProvider, at: &str, issues: &mut Vec<Issue>) -> Option<ProviderConfig> {
    let mut need = |value: Option<String>, key: &str| {
        if value.is_none() {
            issues.push(Issue::new(
                &format!("{at}.{key}"),
                format!("required for type {:?}", p.kind),
            ));
        }
        value
    };
    match p.kind.as_str() {
        "static" | "file" => Some(ProviderConfig::Static),
        "redis" => Some(ProviderConfig::Redis {
            url: Secret(need(p.url, "url")?),
            key_pattern: p
                .key_pattern
                .unwrap_or_else(|| "llmproxy:key:{api_key}".to_string()),
        }),
        "webhook" => Some(ProviderConfig::Webhook {
            url: need(p.url, "url")?,
            timeout: p.timeout.map_or(Duration::from_secs(3), |d| d.0),
        }),
        "database" => {
            let dsn = need(p.dsn, "dsn")?;
            let Some(driver) = p.driver else {
                issues.push(Issue::new(
                    &format!("{at}.driver"),
                    "required: sqlite, postgres or mysql",
                ));
                return None;
            };
            let table = p.table.unwrap_or_else(|| "api_keys".to_string());
            let mut columns = p.columns;
            let key_column = columns
                .remove("key")
                .unwrap_or_else(|| "api_key".to_string());
            for field in columns.keys() {
                if !RECORD_FIELDS.contains(&field.as_str()) {
                    issues.push(Issue::new(
                        &format!("{at}.columns.{field}"),
                        format!(
                            "unknown field; expected key or one of {}",
                            RECORD_FIELDS.join(", ")
                        ),
                    ));
                }
            }
            let mut selected = Vec::new();
            for (i, field) in RECORD_FIELDS.iter().enumerate() {
                let column = match columns.get(*field) {
                    Some(c) if c.is_empty() => continue,
                    Some(c) => c.clone(),
                    None if i < DEFAULT_COLUMNS => field.to_string(),
                    None => continue,
                };
                selected.push((field.to_string(), column));
            }
            // Names go into SQL text: only plain identifiers, never anything quoted or spaced.
            for name in std::iter::once(&table)
                .chain(std::iter::once(&key_column))
                .chain(columns.values())
            {
                if !name.is_empty()
                    && !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
                {
                    issues.push(Issue::new(
                        at,
                        format!("{name:?} is not a plain SQL identifier"),
                    ));
                    return None;
                }
            }
            Some(ProviderConfig::Database {
                driver,
                dsn: Secret(dsn),
                table,
                key_column,
                columns: selected,
            })
        }
        other => {
            issues.push(Issue::new(
                &format!("{at}.type"),
                format!("unknown provider {other:?}; expected static, redis, database or webhook"),
            ));
            None
        }
    }
}

fn build_lua(p: RawProvider, at: &str, issues: &mut Vec<Issue>) -> Option<LuaConfig> {
    let (source, file) = match (p.script, p.file) {
        (Some(s), None) => (s, None),
        (None, Some(f)) => (String::new(), Some(PathBuf::from(f))),
        _ => {
            issues.push(Issue::new(
                at,
                "a lua stage needs exactly one of `script` or `file`",
            ));
            return None;
        }
    };
    Some(LuaConfig {
        source,
        file,
        max_instructions: p.max_instructions.unwrap_or(1_000_000).max(1),
        max_memory: p.max_memory.map_or(16 << 20, |m| m.0).max(64 << 10),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed README's OpenCode scenario, verbatim (config/seed-opencode.yaml).
    #[test]
    fn opencode_scenario_loads_as_written() {
        let text = include_str!("../../config/seed-opencode.yaml");
        let c = crate::config::parse(text, crate::config::Format::Yaml).unwrap();
        let auth = c.auth.as_ref().unwrap();
        assert_eq!(auth.header_names, ["authorization", "x-api-key"]);
        assert_eq!(auth.pipeline, [ProviderConfig::Static]);
        let key = &c.api_keys[0];
        assert_eq!(
            (key.name.as_str(), key.total_quota),
            ("Dev Team", Some(1_000_000))
        );
        assert_eq!(key.allowed_ips, [parse_net("10.0.0.0/8").unwrap()]);
        assert_eq!(key.status, KeyStatus::Active);
        assert_eq!(c.rate_limit.per_key.requests_per_minute, Some(60));
        assert_eq!(c.rate_limit.per_key.max_concurrent, Some(3));
        assert_eq!(c.rate_limit.per_key.tokens_per_minute, None);
        assert!(
            !format!("{c:?}").contains("sk-llmproxy-dev-001"),
            "key in Debug output"
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(KeyStatus::parse("Disabled"), Some(KeyStatus::Disabled));
        assert_eq!(KeyStatus::parse("3"), Some(KeyStatus::Expired));
        assert_eq!(KeyStatus::parse("bogus"), None);
    }

    #[test]
    fn a_key_without_a_name_is_named_by_its_masked_form() {
        let text =
            "backends: [{url: 'http://b'}]\nauth: {}\napi_keys: [{key: sk-llmproxy-dev-001}]";
        let c = crate::config::parse(text, crate::config::Format::Yaml).unwrap();
        assert_eq!(c.api_keys[0].name, "sk-ll...001");
    }

    #[test]
    fn database_providers_name_their_table_and_columns() {
        let text = "backends: [{url: 'http://b'}]\nauth:\n  pipeline:\n    \
                    - {type: database, driver: postgres, dsn: 'host=h', table: keys, \
                    columns: {key: k, user_id: '', tokens_per_minute: tpm}}\n";
        let c = crate::config::parse(text, crate::config::Format::Yaml).unwrap();
        let ProviderConfig::Database {
            table,
            key_column,
            columns,
            ..
        } = &c.auth.unwrap().pipeline[0]
        else {
            panic!("not a database provider")
        };
        assert_eq!((table.as_str(), key_column.as_str()), ("keys", "k"));
        let fields: Vec<(&str, &str)> = columns
            .iter()
            .map(|(f, c)| (f.as_str(), c.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("name", "name"),
                ("status", "status"),
                ("total_quota", "total_quota"),
                ("allowed_ips", "allowed_ips"),
                ("allowed_models", "allowed_models"),
                ("expires_at", "expires_at"),
                ("tokens_per_minute", "tpm"),
            ]
        );
        let bad = text.replace("table: keys", "table: 'keys; drop'");
        let error = crate::config::parse(&bad, crate::config::Format::Yaml).unwrap_err();
        assert!(
            error.to_string().contains("is not a plain SQL identifier"),
            "{error}"
        );
    }
}
