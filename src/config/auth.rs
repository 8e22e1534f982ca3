//! Config sections for client authentication and limits: `auth`, `api_keys` and `rate_limit`.
//! Parsed and validated here into plain data; `crate::auth` and `crate::limits` act on it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::units::DurationValue;
use super::Issue;

/// `auth` when present and enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Lowercased header names tried in order; `authorization` takes `Bearer <key>`.
    pub header_names: Vec<String>,
    /// Status and message per refusal, indexed by [`Denial`] as usize.
    pub responses: Vec<DenialResponse>,
    /// SQLite file holding per-key quota consumption across restarts.
    pub quota_path: PathBuf,
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
        /// Built from `table` and `columns` with the driver's placeholder.
        query: String,
        /// Record fields, in the query's column order.
        columns: Vec<String>,
    },
    Webhook {
        url: String,
        timeout: Duration,
    },
    /// Keys created through the admin API (`admin.key_store`, stored hashed); appended to the
    /// pipeline when the admin API is enabled.
    KeyStore {
        path: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DbDriver {
    Sqlite,
    Postgres,
    Mysql,
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
}

impl fmt::Debug for ApiKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyConfig")
            .field("key", &mask(&self.key))
            .field("name", &self.name)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// A key as it may appear in logs: its first 6 characters and its length.
pub fn mask(key: &str) -> String {
    let shown: String = key.chars().take(6).collect();
    format!("{shown}…({} chars)", key.chars().count())
}

/// A credential from the config; `Debug` shows it masked.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask(&self.0))
    }
}

/// Limits of one scope (a key, or all traffic). `None`: unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSpec {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
}

impl LimitSpec {
    pub fn is_empty(&self) -> bool {
        *self == LimitSpec::default()
    }

    /// `self` with unset fields taken from `base`.
    pub fn or(self, base: LimitSpec) -> LimitSpec {
        LimitSpec {
            requests_per_minute: self.requests_per_minute.or(base.requests_per_minute),
            tokens_per_minute: self.tokens_per_minute.or(base.tokens_per_minute),
            max_concurrent: self.max_concurrent.or(base.max_concurrent),
        }
    }
}

/// `rate_limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Applies to every key unless the key overrides it.
    pub per_key: LimitSpec,
    /// Applies to all traffic together.
    pub global: LimitSpec,
    /// Wait up to this long for a slot or a request token instead of answering 429 at once.
    pub queue_timeout: Option<Duration>,
    /// `storage: redis`: request rates shared by every instance using this Redis.
    pub redis: Option<SharedLimits>,
}

/// `rate_limit.redis`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedLimits {
    pub url: Secret,
    /// Prepended to every Redis key, so several deployments can share one Redis.
    pub prefix: String,
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
const RECORD_FIELDS: [&str; 10] = [
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
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawRateLimit {
    enabled: Option<bool>,
    storage: Option<String>,
    redis: RawSharedLimits,
    per_key: LimitSpec,
    global: LimitSpec,
    queue_timeout: Option<DurationValue>,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawSharedLimits {
    url: String,
    prefix: String,
}

impl Default for RawSharedLimits {
    fn default() -> Self {
        RawSharedLimits {
            url: "redis://127.0.0.1:6379/".to_string(),
            prefix: "llmproxy:rl:".to_string(),
        }
    }
}

/// Validates the three sections together: keys without `auth` would never be checked.
pub(super) fn build(
    auth: Option<RawAuth>,
    keys: Vec<RawApiKey>,
    rate: RawRateLimit,
    issues: &mut Vec<Issue>,
) -> (Option<AuthConfig>, Vec<ApiKeyConfig>, RateLimitConfig) {
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
            Some(v) => match parse_time(v) {
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
            name: raw.name.unwrap_or_else(|| mask(&raw.key)),
            key: raw.key,
            user_id: raw.user_id,
            status: raw.status.unwrap_or(KeyStatus::Active),
            total_quota: raw.total_quota,
            allowed_ips,
            allowed_models: raw.allowed_models,
            expires_at,
            rate_limit: raw.rate_limit,
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
    let rate = if rate.enabled == Some(false) {
        RateLimitConfig::default()
    } else {
        check_spec(&rate.per_key, "rate_limit.per_key", issues);
        check_spec(&rate.global, "rate_limit.global", issues);
        let redis = match rate.storage.as_deref() {
            None | Some("memory") => None,
            Some("redis") => Some(SharedLimits {
                url: Secret(rate.redis.url),
                prefix: rate.redis.prefix,
            }),
            Some(other) => {
                issues.push(Issue::new(
                    "rate_limit.storage",
                    format!("{other:?}: expected memory or redis"),
                ));
                None
            }
        };
        RateLimitConfig {
            per_key: rate.per_key,
            global: rate.global,
            queue_timeout: rate.queue_timeout.map(|d| d.0),
            redis,
        }
    };
    (auth, api_keys, rate)
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
        quota_path: PathBuf::from(raw.quota_path),
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
            let mut fields = Vec::new();
            let mut select = Vec::new();
            for (i, field) in RECORD_FIELDS.iter().enumerate() {
                let column = match columns.get(*field) {
                    Some(c) if c.is_empty() => continue,
                    Some(c) => c.clone(),
                    None if i < DEFAULT_COLUMNS => field.to_string(),
                    None => continue,
                };
                fields.push(field.to_string());
                select.push(match driver {
                    DbDriver::Sqlite => format!("CAST({column} AS TEXT)"),
                    DbDriver::Postgres => format!("{column}::text"),
                    DbDriver::Mysql => format!("CAST({column} AS CHAR)"),
                });
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
            let placeholder = if driver == DbDriver::Postgres {
                "$1"
            } else {
                "?"
            };
            Some(ProviderConfig::Database {
                driver,
                dsn: Secret(dsn),
                query: format!(
                    "SELECT {} FROM {table} WHERE {key_column} = {placeholder}",
                    select.join(", ")
                ),
                columns: fields,
            })
        }
        "lua" => {
            issues.push(Issue::new(
                &format!("{at}.type"),
                "lua providers are not supported yet",
            ));
            None
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

fn check_spec(spec: &LimitSpec, at: &str, issues: &mut Vec<Issue>) {
    for (name, value) in [
        ("requests_per_minute", spec.requests_per_minute),
        ("tokens_per_minute", spec.tokens_per_minute),
        ("max_concurrent", spec.max_concurrent.map(u64::from)),
    ] {
        if value == Some(0) {
            issues.push(Issue::new(
                &format!("{at}.{name}"),
                "must be greater than 0 (leave it out for no limit)",
            ));
        }
    }
}

/// A CIDR block, or a plain address as a single-host block.
pub fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// Unix seconds from a number or an RFC 3339 string.
pub fn parse_time(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s
            .trim()
            .parse::<u64>()
            .ok()
            .or_else(|| parse_rfc3339(s.trim())),
        _ => None,
    }
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.frac](Z|±HH:MM)`, or a bare date as midnight UTC.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
    {
        return None;
    }
    let days = days_from_civil(y, m as u32, d as u32);
    if b.len() == 10 {
        return u64::try_from(days * 86400).ok();
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' '))
        || b.get(13) != Some(&b':')
        || b.get(16) != Some(&b':')
    {
        return None;
    }
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    // "Z", or ±HH:MM, ±HHMM, ±HH (PostgreSQL's `timestamptz::text` writes "+00").
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.starts_with('+') || rest.starts_with('-') => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let digits: String = rest[1..].chars().filter(|c| *c != ':').collect();
            if !matches!(digits.len(), 2 | 4) || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let h: i64 = digits[..2].parse().ok()?;
            let m: i64 = digits
                .get(2..)
                .filter(|m| !m.is_empty())
                .map_or(Some(0), |m| m.parse().ok())?;
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    u64::try_from(days * 86400 + hh * 3600 + mm * 60 + ss - offset).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// (year, month) of a day count since 1970-01-01.
pub fn year_month(days: i64) -> (i64, u32) {
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-01-14T10:30:00Z"), Some(1768386600));
        assert_eq!(
            parse_rfc3339("2026-01-14T12:30:00.5+02:00"),
            Some(1768386600)
        );
        assert_eq!(parse_rfc3339("2026-01-14"), Some(1768348800));
        assert_eq!(
            parse_rfc3339("2026-01-14 10:30:00.123+00"),
            Some(1768386600)
        );
        assert_eq!(parse_rfc3339("2026-01-14T11:30:00+0100"), Some(1768386600));
        assert_eq!(parse_rfc3339("2026-13-14"), None);
        assert_eq!(parse_time(&serde_json::json!(17)), Some(17));
        assert_eq!(parse_time(&serde_json::json!("17")), Some(17));
        assert_eq!(year_month(days_from_civil(2024, 2, 29)), (2024, 2));
        assert_eq!(year_month(days_from_civil(2026, 12, 31)), (2026, 12));
    }

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
    fn statuses_and_nets() {
        assert_eq!(KeyStatus::parse("Disabled"), Some(KeyStatus::Disabled));
        assert_eq!(KeyStatus::parse("3"), Some(KeyStatus::Expired));
        assert_eq!(KeyStatus::parse("bogus"), None);
        assert!(parse_net("10.0.0.0/8")
            .unwrap()
            .contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
        assert!(parse_net("::1").is_some());
        assert!(parse_net("nope").is_none());
        assert_eq!(mask("sk-llmproxy-dev-001"), "sk-llm…(19 chars)");
    }
}
