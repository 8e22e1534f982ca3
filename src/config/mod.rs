//! Configuration: owns loading the config file (YAML or TOML), `${ENV}` substitution, key
//! checking (unknown and not-yet-supported keys), typed parsing, validation and defaults.
//! The result, [`Config`], is plain data that the rest of the gateway reads and never re-checks.
//!
//! It must not do I/O beyond reading the one file, nor networking: backend hostnames are
//! parsed, never resolved (that is the upstream module's job, at connect time); only
//! `localhost` in `listen` is mapped, to 127.0.0.1, without asking a resolver.
//!
//! Pipeline: env substitution on raw text -> generic tree -> [`schema`] key check (all problems
//! collected) -> serde into `Raw*` structs (type errors carry the key path) -> validation.

mod auth;
mod env;
mod routing;
mod schema;
mod units;

pub use routing::{Affinity, HealthCheck, Retry, Routing, Strategy};
pub use units::parse_duration;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

pub use auth::{
    days_from_civil, mask, parse_net, parse_time, year_month, ApiKeyConfig, AuthConfig,
    CacheConfig, DbDriver, Denial, DenialResponse, KeyStatus, LimitSpec, LuaConfig, PipelineMode,
    ProviderConfig, QuotaPeriod, RateLimitConfig, Secret, SharedLimits,
};
use units::{DurationValue, SizeValue};

/// The built-in demo config: one local backend on 127.0.0.1:8001.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.yaml");

/// Syntax of a config text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Toml,
}

/// Which I/O driver the per-core runtimes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    /// io_uring when the kernel (or a container's seccomp profile) allows it, else epoll.
    Auto,
    IoUring,
    Epoll,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// A loaded, validated configuration; every default is already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address to accept clients on. Go style ":8000" means 0.0.0.0:8000.
    pub listen: SocketAddr,
    /// Worker threads (one runtime each); `0` in the file is resolved here to the CPU count.
    pub workers: usize,
    pub io_driver: IoDriver,
    /// Pin worker `i` to CPU `i`.
    pub cpu_affinity: bool,
    /// How long a worker spins after socket activity instead of sleeping (0: never; see
    /// [`crate::busy_poll`]).
    pub busy_poll: Duration,
    /// Largest request body accepted, in bytes (larger gets 413).
    pub max_request_body: usize,
    /// Largest request line + headers accepted, in bytes (larger gets 431).
    pub max_header_size: usize,
    /// How long to let in-flight requests finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    pub timeouts: Timeouts,
    pub upstream: UpstreamConfig,
    /// Never empty.
    pub backends: Vec<Backend>,
    pub routing: Routing,
    pub health_check: HealthCheck,
    pub retry: Retry,
    /// Public model name -> the name the backends serve (rewritten in the request body).
    pub model_aliases: Vec<(String, String)>,
    pub log: LogConfig,
    /// `None` when there is no `auth` section or it says `enabled: false`.
    pub auth: Option<AuthConfig>,
    /// The static key list (`auth.storage: "file"`).
    pub api_keys: Vec<ApiKeyConfig>,
    pub rate_limit: RateLimitConfig,
    pub metrics: MetricsConfig,
    pub admin: AdminConfig,
    pub usage_hook: UsageHook,
}

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
    /// Enabled reporters only; disabled ones are validated and then left out.
    pub reporters: Vec<Reporter>,
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

/// Client- and upstream-side timeouts (key `timeouts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// Upstream TCP connect.
    pub connect: Duration,
    /// Time allowed to receive a full request head (then 408).
    pub client_header: Duration,
    /// Longest gap between reads of a request body.
    pub client_body: Duration,
    /// Idle time allowed between requests on a client keep-alive connection.
    pub keepalive: Duration,
    /// Request sent -> response head received (then 504); `None`: no limit.
    pub first_byte: Option<Duration>,
    /// Longest gap between two reads of a response body (then the stream is cut).
    pub idle: Option<Duration>,
    /// Whole exchange, first byte to last.
    pub total: Option<Duration>,
}

/// Upstream connection pooling (key `upstream`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Idle connections kept per backend, per worker.
    pub max_idle_per_backend: usize,
    /// A pooled connection idle longer than this is not reused. Below uvicorn's (vLLM's) 5 s
    /// keep-alive, so we never send on a connection the server is about to close.
    pub idle_timeout: Duration,
}

/// One inference server (items of `backends`). Only plain `http://` is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// As written, e.g. "http://vllm:8000".
    pub url: String,
    /// Relative share of requests for weighted round robin; at least 1.
    pub weight: u32,
    /// Hostname or IP literal; IPv6 without brackets. Not resolved here.
    pub host: String,
    /// 80 when the URL has none.
    pub port: u16,
    /// Value for the upstream `Host` header: the URL's authority as written ("vllm:8000").
    pub host_header: String,
    /// Prepended to request paths: "" or e.g. "/openai" (never a trailing slash).
    pub path_prefix: String,
    /// The backend's own key, sent upstream as `Authorization: Bearer` (never the client's).
    pub api_key: Option<Secret>,
    /// Models this backend serves; empty means any.
    pub models: Vec<String>,
    /// Extra headers sent with every request to this backend.
    pub headers: Vec<(String, String)>,
    /// Most requests in flight to this backend across all workers; `None`: unlimited.
    pub max_in_flight: Option<u32>,
}

/// Logging (key `log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A level ("info") or `tracing` filter directives ("info,llmproxy=debug").
    pub level: String,
    pub format: LogFormat,
    /// One `access` line per request (target `access`, level info).
    pub access: bool,
}

/// Prometheus exposition (key `metrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Served on the client listener; starts with `/`.
    pub path: String,
}

/// The admin API (key `admin`): its own listener, off by default.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// SQLite file of the keys created through the admin API (stored hashed).
    pub key_store: String,
    /// Bearer token every admin request must carry; at least 16 characters when enabled.
    pub token: String,
}

/// Never prints the token.
impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("key_store", &self.key_store)
            .finish_non_exhaustive()
    }
}

/// Why a config could not be loaded: every problem found, one per line, each as
/// `<file>: <key.path>: <message>`. Key problems come first (sorted by key within each
/// mapping), then a type error if any (serde stops at the first), then validation errors.
#[derive(Debug, Clone)]
pub struct ConfigError {
    file: Option<String>,
    issues: Vec<Issue>,
}

/// One problem at a location: a key path (`backends[1].weight`), `line N`, or nothing.
#[derive(Debug, Clone)]
struct Issue {
    at: String,
    message: String,
}

impl Issue {
    fn new(at: &str, message: impl Into<String>) -> Self {
        Issue {
            at: at.to_string(),
            message: message.into(),
        }
    }
}

impl ConfigError {
    fn single(at: &str, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            issues: vec![Issue::new(at, message)],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, issue) in self.issues.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            if let Some(file) = &self.file {
                write!(f, "{file}: ")?;
            }
            if !issue.at.is_empty() {
                write!(f, "{}: ", issue.at)?;
            }
            f.write_str(&issue.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads and parses the config file; `.yaml`/`.yml` is YAML, `.toml` is TOML.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let in_file = |mut error: ConfigError| {
        error.file = Some(path.display().to_string());
        error
    };
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let format = match extension.as_deref() {
        Some("yaml" | "yml") => Format::Yaml,
        Some("toml") => Format::Toml,
        _ => {
            return Err(in_file(ConfigError::single(
                "",
                "unknown config format: the file name must end in .yaml, .yml or .toml",
            )))
        }
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| in_file(ConfigError::single("", format!("cannot read: {e}"))))?;
    parse(&text, format).map_err(in_file)
}

/// Parses config text, substituting `${VAR}` from the process environment.
pub fn parse(text: &str, format: Format) -> Result<Config, ConfigError> {
    parse_with_env(text, format, |name| std::env::var(name).ok())
}

fn parse_with_env(
    text: &str,
    format: Format,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let text = env::substitute(text, lookup).map_err(|errors| ConfigError {
        file: None,
        issues: errors
            .into_iter()
            .map(|e| Issue::new(&format!("line {}", e.line), e.message))
            .collect(),
    })?;
    let tree: Value = match format {
        Format::Yaml => serde_norway::from_str(&text)
            .map_err(|e| ConfigError::single("", format!("invalid YAML: {e}")))?,
        Format::Toml => toml::from_str(&text)
            .map_err(|e| ConfigError::single("", format!("invalid TOML: {e}")))?,
    };
    let mut root = match tree {
        Value::Object(map) => map,
        // An empty YAML file; validation then says what is missing.
        Value::Null => Map::new(),
        _ => {
            return Err(ConfigError::single(
                "",
                "expected a mapping of keys at the top level",
            ))
        }
    };

    let mut issues = Vec::new();
    schema::check(&mut root, &mut issues);
    let config = match serde_path_to_error::deserialize::<_, RawConfig>(Value::Object(root)) {
        Ok(raw) => build(raw, &mut issues),
        Err(error) => {
            let path = error.path().to_string();
            let at = if path == "." { "" } else { path.as_str() };
            issues.push(Issue::new(at, error.inner().to_string()));
            None
        }
    };
    match config {
        Some(config) if issues.is_empty() => Ok(config),
        _ => Err(ConfigError { file: None, issues }),
    }
}

/// The file as serde sees it, after [`schema::check`] removed unknown and unsupported keys.
/// Defaults live in the `Default` impls below and nowhere else.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    listen: String,
    workers: usize,
    io_driver: IoDriver,
    cpu_affinity: bool,
    busy_poll: DurationValue,
    max_request_body: SizeValue,
    max_header_size: SizeValue,
    shutdown_timeout: DurationValue,
    timeouts: RawTimeouts,
    upstream: RawUpstream,
    backends: Vec<RawBackend>,
    load_balance: Option<Strategy>,
    routing: routing::RawRouting,
    health_check: Option<routing::RawHealthCheck>,
    retry: routing::RawRetry,
    model_aliases: BTreeMap<String, String>,
    log: RawLog,
    auth: Option<auth::RawAuth>,
    api_keys: Vec<auth::RawApiKey>,
    rate_limit: auth::RawRateLimit,
    metrics: RawMetrics,
    admin: RawAdmin,
    usage_hook: RawUsageHook,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen: ":8000".to_string(),
            workers: 0,
            io_driver: IoDriver::Auto,
            cpu_affinity: false,
            busy_poll: DurationValue(Duration::ZERO),
            max_request_body: SizeValue(32 << 20),
            max_header_size: SizeValue(64 << 10),
            shutdown_timeout: DurationValue(Duration::from_secs(30)),
            timeouts: RawTimeouts::default(),
            upstream: RawUpstream::default(),
            backends: Vec::new(),
            load_balance: None,
            routing: routing::RawRouting::default(),
            health_check: None,
            retry: routing::RawRetry::default(),
            model_aliases: BTreeMap::new(),
            log: RawLog::default(),
            auth: None,
            api_keys: Vec::new(),
            rate_limit: auth::RawRateLimit::default(),
            metrics: RawMetrics::default(),
            admin: RawAdmin::default(),
            usage_hook: RawUsageHook::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawTimeouts {
    connect: DurationValue,
    client_header: DurationValue,
    client_body: DurationValue,
    keepalive: DurationValue,
    first_byte: Option<DurationValue>,
    idle: Option<DurationValue>,
    total: Option<DurationValue>,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        let secs = |s| DurationValue(Duration::from_secs(s));
        RawTimeouts {
            connect: secs(5),
            client_header: secs(10),
            client_body: secs(60),
            keepalive: secs(75),
            first_byte: None,
            idle: None,
            total: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawUpstream {
    max_idle_per_backend: usize,
    idle_timeout: DurationValue,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            max_idle_per_backend: 256,
            idle_timeout: DurationValue(Duration::from_secs(4)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    url: String,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    max_in_flight: Option<u32>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawLog {
    level: String,
    format: LogFormat,
    access: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".to_string(),
            format: LogFormat::Text,
            access: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawMetrics {
    enabled: bool,
    path: String,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawAdmin {
    enabled: bool,
    listen: String,
    token: String,
    key_store: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            enabled: false,
            listen: "127.0.0.1:9091".to_string(),
            token: String::new(),
            key_store: "./data/keys.db".to_string(),
        }
    }
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            enabled: true,
            path: "/metrics".to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawUsageHook {
    enabled: bool,
    inject_stream_usage: bool,
    include_raw_key: bool,
    spool_path: PathBuf,
    retention: DurationValue,
    channel_capacity: usize,
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
                DbDriver::Mysql => mysql_url(&db.dsn).map_err(|e| ("database", e))?,
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

/// Accepts a `mysql://` URL as is and converts a Go DSN
/// (`user:pass@tcp(host:port)/db?param=value`, as in the seed config) into one, without the Go
/// driver's parameters.
fn mysql_url(dsn: &str) -> Result<String, String> {
    if dsn.starts_with("mysql://") {
        return Ok(dsn.to_string());
    }
    let bad = || {
        "cannot read MySQL DSN: expected \"mysql://user:pass@host:3306/db\" or \"user:pass@tcp(host:3306)/db\""
            .to_string()
    };
    let (creds, rest) = match dsn.rsplit_once('@') {
        Some((creds, rest)) => (Some(creds), rest),
        None => (None, dsn),
    };
    let (addr, path) = if let Some(after) = rest.strip_prefix("tcp(") {
        after.split_once(')').ok_or_else(bad)?
    } else if let Some(path) = rest.strip_prefix('/') {
        ("127.0.0.1:3306", path)
    } else {
        return Err(bad());
    };
    let path = path.strip_prefix('/').unwrap_or(path);
    // Go driver parameters (parseTime, charset, loc, ...) mean nothing to the Rust client,
    // which would refuse them at connect time.
    let path = path.split('?').next().unwrap_or_default();
    let addr = if addr.is_empty() {
        "127.0.0.1:3306"
    } else {
        addr
    };
    let mut url = String::from("mysql://");
    if let Some(creds) = creds {
        url.push_str(creds);
        url.push('@');
    }
    url.push_str(addr);
    url.push('/');
    url.push_str(path);
    Ok(url)
}

/// Validates `raw` and resolves what needs resolving; `None` once any issue is recorded.
fn build(raw: RawConfig, issues: &mut Vec<Issue>) -> Option<Config> {
    let mut report = |at: &str, result: Result<(), String>| {
        if let Err(message) = result {
            issues.push(Issue::new(at, message));
        }
    };
    let listen = parse_listen(&raw.listen);
    report("listen", listen.as_ref().map(|_| ()).map_err(Clone::clone));
    report("max_request_body", positive(raw.max_request_body.0));
    report("max_header_size", positive(raw.max_header_size.0));
    for (at, value) in [
        ("timeouts.connect", raw.timeouts.connect),
        ("timeouts.client_header", raw.timeouts.client_header),
        ("timeouts.client_body", raw.timeouts.client_body),
        ("timeouts.keepalive", raw.timeouts.keepalive),
        ("upstream.idle_timeout", raw.upstream.idle_timeout),
    ] {
        report(at, positive(value.0.as_nanos()));
    }
    report("log.level", check_log_level(&raw.log.level));
    report("metrics.path", check_metrics_path(&raw.metrics.path));
    let admin_listen = parse_listen(&raw.admin.listen);
    report(
        "admin.listen",
        admin_listen.as_ref().map(|_| ()).map_err(Clone::clone),
    );
    if raw.admin.enabled && raw.admin.token.chars().count() < 16 {
        report(
            "admin.token",
            Err("must be at least 16 characters when the admin API is enabled".into()),
        );
    }
    if raw.backends.is_empty() {
        report(
            "backends",
            Err("at least one backend is required, e.g. `- url: \"http://127.0.0.1:8001\"`".into()),
        );
    }
    if raw.backends.len() > 64 {
        report("backends", Err("at most 64 backends are supported".into()));
    }
    let mut backends = Vec::with_capacity(raw.backends.len());
    for (index, backend) in raw.backends.into_iter().enumerate() {
        if backend.weight == 0 {
            report(
                &format!("backends[{index}].weight"),
                Err("must be at least 1 (remove the backend to send it nothing)".into()),
            );
        }
        match parse_backend_url(&backend.url) {
            Ok(target) => backends.push(Backend {
                url: backend.url,
                weight: backend.weight,
                host: target.host,
                port: target.port,
                host_header: target.host_header,
                path_prefix: target.path_prefix,
                api_key: backend.api_key.filter(|k| !k.is_empty()).map(Secret),
                models: backend.models,
                headers: backend.headers.into_iter().collect(),
                max_in_flight: backend.max_in_flight.filter(|&n| n > 0),
            }),
            Err(message) => report(&format!("backends[{index}].url"), Err(message)),
        }
    }
    let hook = raw.usage_hook;
    if hook.channel_capacity == 0 {
        report(
            "usage_hook.channel_capacity",
            Err("must be greater than 0".into()),
        );
    }
    let mut reporters: Vec<Reporter> = Vec::new();
    for (index, reporter) in hook.reporters.into_iter().enumerate() {
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
    let routing = routing::routing(raw.load_balance, raw.routing, &mut report);
    let health_check = routing::health_check(raw.health_check);
    let retry = routing::retry(raw.retry, &mut report);
    let (mut auth, api_keys, rate_limit) =
        auth::build(raw.auth, raw.api_keys, raw.rate_limit, issues);
    // Keys created through the admin API authenticate like any other provider's (in
    // `first_match` mode; with `all`, every provider must know a key, so the store stays out).
    if let Some(auth) = auth
        .as_mut()
        .filter(|a| raw.admin.enabled && a.mode == PipelineMode::FirstMatch)
    {
        auth.pipeline.push(ProviderConfig::KeyStore {
            path: raw.admin.key_store.clone(),
        });
    }
    if !issues.is_empty() {
        return None;
    }
    let workers = match raw.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    Some(Config {
        listen: listen.ok()?,
        workers,
        io_driver: raw.io_driver,
        cpu_affinity: raw.cpu_affinity,
        busy_poll: raw.busy_poll.0,
        max_request_body: raw.max_request_body.0,
        max_header_size: raw.max_header_size.0,
        shutdown_timeout: raw.shutdown_timeout.0,
        timeouts: Timeouts {
            connect: raw.timeouts.connect.0,
            client_header: raw.timeouts.client_header.0,
            client_body: raw.timeouts.client_body.0,
            keepalive: raw.timeouts.keepalive.0,
            // 0 means no limit, so the example file can show these keys at their defaults.
            first_byte: raw
                .timeouts
                .first_byte
                .map(|d| d.0)
                .filter(|d| !d.is_zero()),
            idle: raw.timeouts.idle.map(|d| d.0).filter(|d| !d.is_zero()),
            total: raw.timeouts.total.map(|d| d.0).filter(|d| !d.is_zero()),
        },
        upstream: UpstreamConfig {
            max_idle_per_backend: raw.upstream.max_idle_per_backend,
            idle_timeout: raw.upstream.idle_timeout.0,
        },
        backends,
        routing,
        health_check,
        retry,
        model_aliases: raw.model_aliases.into_iter().collect(),
        log: LogConfig {
            level: raw.log.level,
            format: raw.log.format,
            access: raw.log.access,
        },
        metrics: MetricsConfig {
            enabled: raw.metrics.enabled,
            path: raw.metrics.path,
        },
        admin: AdminConfig {
            enabled: raw.admin.enabled,
            listen: admin_listen.ok()?,
            token: raw.admin.token,
            key_store: raw.admin.key_store,
        },
        usage_hook: UsageHook {
            enabled: hook.enabled,
            inject_stream_usage: hook.inject_stream_usage,
            include_raw_key: hook.include_raw_key,
            spool_path: hook.spool_path,
            retention: hook.retention.0,
            channel_capacity: hook.channel_capacity,
            reporters,
        },
        auth,
        api_keys,
        rate_limit,
    })
}

fn positive<T: Default + PartialEq>(value: T) -> Result<(), String> {
    if value == T::default() {
        Err("must be greater than 0".into())
    } else {
        Ok(())
    }
}

/// Accepts ":8000", "127.0.0.1:8000", "[::1]:8000" and "localhost:8000".
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let invalid = |why: &str| {
        format!(
            "invalid address {text:?}: {why}; expected \":PORT\", \"IP:PORT\", \"[IPv6]:PORT\" or \"localhost:PORT\""
        )
    };
    let parse_port = |port: &str| {
        port.parse::<u16>()
            .map_err(|_| invalid(&format!("bad port {port:?}")))
    };
    if let Some(port) = text.strip_prefix(':') {
        return Ok(SocketAddr::from(([0, 0, 0, 0], parse_port(port)?)));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match text.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => {
            Ok(SocketAddr::from(([127, 0, 0, 1], parse_port(port)?)))
        }
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            parse_port(port)?;
            Err(invalid(
                "hostnames other than localhost are not resolved; use an IP address",
            ))
        }
        _ => Err(invalid("not a host:port pair")),
    }
}

/// The connect target and request rewriting derived from a backend URL.
struct Target {
    host: String,
    port: u16,
    host_header: String,
    path_prefix: String,
}

/// Parses `http://host[:port][/prefix]`. Hand-rolled because the accepted form is this small
/// and a URL crate would accept (and need rejecting) much more.
fn parse_backend_url(url: &str) -> Result<Target, String> {
    let expected = "expected a URL like \"http://host:port\" or \"http://host:port/prefix\"";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("invalid URL {url:?}: {expected}"));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "http" => {}
        "https" => {
            return Err(format!(
                "https backends are not supported yet ({url:?}); use http://"
            ))
        }
        _ => {
            return Err(format!(
                "unsupported scheme {scheme:?} in {url:?}; {expected}"
            ))
        }
    }
    if url.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(format!("invalid URL {url:?}: contains whitespace"));
    }
    if rest.contains(['?', '#']) {
        return Err(format!(
            "invalid URL {url:?}: a backend URL cannot have a query or fragment"
        ));
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err(format!(
            "invalid URL {url:?}: credentials in backend URLs are not supported"
        ));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("invalid URL {url:?}: unclosed `[` in IPv6 address"))?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| format!("invalid URL {url:?}: bad IPv6 address {ip:?}"))?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| {
                format!("invalid URL {url:?}: unexpected {after:?} after the IPv6 address")
            })?),
        };
        (ip, port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        let valid = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid {
            let hint = if port.is_some_and(|p| p.contains(':')) {
                " (put IPv6 addresses in brackets: http://[::1]:8000)"
            } else {
                ""
            };
            return Err(format!("invalid URL {url:?}: bad host{hint}"));
        }
        (host, port)
    };
    let port = match port {
        None => 80,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("invalid URL {url:?}: bad port {port:?}"))?,
    };
    Ok(Target {
        host: host.to_string(),
        port,
        host_header: authority.to_string(),
        path_prefix: path.trim_end_matches('/').to_string(),
    })
}

/// The metrics path must not shadow the proxied API or the health check.
fn check_metrics_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
        return Err(format!(
            "invalid path {path:?}: expected an absolute path like \"/metrics\""
        ));
    }
    if path.starts_with("/v1/") || path == "/health" {
        return Err(format!("{path:?} is taken by the proxied API or /health"));
    }
    Ok(())
}

/// Catches typos like `inof`, which `tracing`'s filter syntax would silently read as a target
/// name (logging nothing). Accepts a level or comma-separated `target=level` directives.
fn check_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let ok = !level.trim().is_empty()
        && level.split(',').all(|directive| {
            let level = directive.rsplit('=').next().unwrap_or_default().trim();
            LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid log level {level:?}: expected one of {LEVELS:?} or directives like \"info,llmproxy=debug\""
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_TOML: &str = r#"
listen = ":8000"

[[backends]]
url = "http://vllm:8000"
weight = 5

[[backends]]
url = "http://tgi:8081"
weight = 3
"#;

    fn yaml(text: &str) -> Result<Config, ConfigError> {
        parse_with_env(text, Format::Yaml, |name| match name {
            "BACKEND" => Some("http://10.0.0.7:9000".into()),
            "WEIGHT" => Some("7".into()),
            _ => None,
        })
    }

    fn yaml_err(text: &str) -> String {
        yaml(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    fn example(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        std::fs::read_to_string(path).unwrap()
    }

    /// Key paths in a tree, list indices written `[]`, as [`schema::known_paths`] does.
    fn tree_paths(value: &Value, path: &str, out: &mut Vec<String>) {
        match value {
            // Header names are the user's, not config keys.
            Value::Object(_) if path.ends_with(".headers") => out.push(path.to_string()),
            Value::Object(map) if !map.is_empty() => {
                for (key, value) in map {
                    let at = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    tree_paths(value, &at, out);
                }
            }
            // Empty containers and lists of scalars are values of one key.
            Value::Object(map) if map.is_empty() => out.push(path.to_string()),
            Value::Array(items) if items.iter().all(|i| !i.is_object()) => {
                out.push(path.to_string())
            }
            Value::Array(items) => {
                for item in items {
                    tree_paths(item, &format!("{path}[]"), out);
                }
            }
            _ => out.push(path.to_string()),
        }
    }

    fn assert_seed_backends(config: &Config) {
        let got: Vec<_> = config
            .backends
            .iter()
            .map(|b| {
                (
                    b.url.as_str(),
                    b.weight,
                    b.host.as_str(),
                    b.port,
                    b.host_header.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("http://vllm:8000", 5, "vllm", 8000, "vllm:8000"),
                ("http://tgi:8081", 3, "tgi", 8081, "tgi:8081"),
            ]
        );
    }

    #[test]
    fn seed_listen_and_backends_load_as_written() {
        let from_yaml = yaml(&example("seed-minimal.yaml")).unwrap();
        assert_eq!(from_yaml.listen, "0.0.0.0:8000".parse().unwrap());
        assert_seed_backends(&from_yaml);
        let from_toml = parse_with_env(SEED_TOML, Format::Toml, |_| None).unwrap();
        assert_eq!(from_toml, from_yaml);
    }

    #[test]
    fn toml_gets_the_same_checks() {
        let toml = |text: &str| parse_with_env(text, Format::Toml, |_| None);
        assert!(toml(&format!("{SEED_TOML}\n[rate_limit]\nenabled = false\n")).is_ok());
        let error = toml(&format!("{SEED_TOML}\n[rate_limit]\nenabld = true\n"));
        let error = error.unwrap_err().to_string();
        assert!(
            error.starts_with("rate_limit.enabld: unknown key; did you mean `enabled`?"),
            "{error}"
        );
        let error = toml("[[backends]]\nurl = \"http://b\"\nweight = \"x\"\n");
        assert_eq!(
            error.unwrap_err().to_string(),
            "backends[0].weight: invalid type: string \"x\", expected u32"
        );
        let error = toml("listen = ").unwrap_err().to_string();
        assert!(error.starts_with("invalid TOML"), "{error}");
    }

    #[test]
    fn defaults() {
        let config = yaml("backends: [{url: 'http://b'}]").unwrap();
        assert_eq!(config.listen, "0.0.0.0:8000".parse().unwrap());
        assert!(config.workers >= 1);
        assert_eq!(config.io_driver, IoDriver::Auto);
        assert!(!config.cpu_affinity);
        assert_eq!(config.busy_poll, Duration::ZERO);
        assert_eq!(config.max_request_body, 32 << 20);
        assert_eq!(config.max_header_size, 64 << 10);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        let secs = Duration::from_secs;
        assert_eq!(
            config.timeouts,
            Timeouts {
                connect: secs(5),
                client_header: secs(10),
                client_body: secs(60),
                keepalive: secs(75),
                first_byte: None,
                idle: None,
                total: None,
            }
        );
        assert_eq!(config.upstream.max_idle_per_backend, 256);
        assert_eq!(config.upstream.idle_timeout, secs(4));
        assert_eq!(config.backends[0].weight, 1);
        assert_eq!(config.log.level, "info");
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn example_files_parse_and_document_every_key() {
        let mut full_yaml = yaml(&example("llmproxy.yaml")).unwrap();
        let mut full_toml =
            parse_with_env(&example("llmproxy.toml"), Format::Toml, |_| None).unwrap();
        assert_eq!(full_yaml, full_toml);
        // The sample key documents its fields; no key list is the default.
        assert_eq!(full_yaml.api_keys.len(), 1);
        full_yaml.api_keys.clear();
        full_toml.api_keys.clear();
        // "set to its default": same as a config naming only the backend.
        // Except the example reporters, which are disabled (left out).
        assert_eq!(
            full_yaml,
            yaml("backends: [{url: 'http://127.0.0.1:8001'}]").unwrap()
        );

        let mut known = schema::known_paths();
        known.sort();
        let yaml_tree: Value = serde_norway::from_str(&example("llmproxy.yaml")).unwrap();
        let toml_tree: Value = toml::from_str(&example("llmproxy.toml")).unwrap();
        for tree in [yaml_tree, toml_tree] {
            let mut paths = Vec::new();
            tree_paths(&tree, "", &mut paths);
            paths.sort();
            // Items of one list (usage_hook.reporters, auth.pipeline) share keys.
            paths.dedup();
            assert_eq!(paths, known);
        }

        let demo = parse(DEMO_CONFIG, Format::Yaml).unwrap();
        assert_eq!(demo.listen, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(demo.workers, 2);
        assert_eq!(demo.backends[0].port, 8001);
    }

    #[test]
    fn load_picks_format_by_extension() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        assert!(load(&dir.join("llmproxy.toml")).is_ok());
        assert!(load(&dir.join("seed-minimal.yaml")).is_ok());
        let error = load(&dir.join("nope.json")).unwrap_err().to_string();
        assert!(
            error.contains("nope.json: unknown config format"),
            "{error}"
        );
        let error = load(&dir.join("missing.yml")).unwrap_err().to_string();
        assert!(error.contains("missing.yml: cannot read"), "{error}");
    }

    #[test]
    fn listen_forms() {
        let listen = |text: &str| parse_listen(text).map(|a| a.to_string());
        assert_eq!(listen(":8000").unwrap(), "0.0.0.0:8000");
        assert_eq!(listen("127.0.0.1:9000").unwrap(), "127.0.0.1:9000");
        assert_eq!(listen("[::1]:8000").unwrap(), "[::1]:8000");
        assert_eq!(listen("localhost:8000").unwrap(), "127.0.0.1:8000");
        assert!(listen("vllm:8000").unwrap_err().contains("not resolved"));
        for bad in ["8000", ":http", ":70000", "", "1.2.3.4"] {
            assert!(listen(bad).is_err(), "{bad:?}");
        }
        let error = yaml_err("listen: 'x'\nbackends: [{url: 'http://b'}]");
        assert!(
            error.starts_with("listen: invalid address \"x\""),
            "{error}"
        );
    }

    #[test]
    fn durations_and_sizes_in_config() {
        let config = yaml(
            "max_request_body: 1MB\nmax_header_size: 10k\nshutdown_timeout: 1.5\nbusy_poll: 50us\n\
             timeouts: {connect: 500ms, client_header: 1m30s, client_body: 3, keepalive: 250us}\n\
             upstream: {idle_timeout: 1h}\nbackends: [{url: 'http://b'}]",
        )
        .unwrap();
        assert_eq!(config.max_request_body, 1_000_000);
        assert_eq!(config.max_header_size, 10 * 1024);
        assert_eq!(config.shutdown_timeout, Duration::from_millis(1500));
        assert_eq!(config.busy_poll, Duration::from_micros(50));
        assert_eq!(config.timeouts.connect, Duration::from_millis(500));
        assert_eq!(config.timeouts.client_header, Duration::from_secs(90));
        assert_eq!(config.timeouts.client_body, Duration::from_secs(3));
        assert_eq!(config.timeouts.keepalive, Duration::from_micros(250));
        assert_eq!(config.upstream.idle_timeout, Duration::from_secs(3600));

        let error = yaml_err("timeouts: {connect: fast}\nbackends: [{url: 'http://b'}]");
        assert!(
            error.starts_with("timeouts.connect: invalid duration \"fast\""),
            "{error}"
        );
        let error = yaml_err("timeouts: {connect: 0s}\nbackends: [{url: 'http://b'}]");
        assert_eq!(error, "timeouts.connect: must be greater than 0");
    }

    #[test]
    fn env_substitution() {
        let config = yaml(
            "listen: ${LISTEN:-127.0.0.1:7000}\nbackends:\n  - url: ${BACKEND}\n    weight: ${WEIGHT}\n",
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.backends[0].host, "10.0.0.7");
        assert_eq!(config.backends[0].weight, 7);

        let error = yaml_err("# ${IGNORED}\nbackends:\n  - url: ${UPSTREAM_URL}\n");
        assert!(
            error.starts_with("line 3: environment variable `UPSTREAM_URL` is not set"),
            "{error}"
        );
    }

    /// The seed README's "Configuration" block, verbatim.
    const SEED_README_CONFIG: &str = r#"
# Listen address
listen: ":8000"

# Backend server list
backends:
  - url: "http://vllm:8000"
    weight: 5
  - url: "http://tgi:8081"
    weight: 3

# Usage reporting (supports multiple reporters)
usage_hook:
  enabled: true
  reporters:
    - name: "billing"
      type: "webhook"
      enabled: true
      url: "https://your-billing.com/llm-usage"
      timeout: 3s
    - name: "database"
      type: "database"
      enabled: true
      database:
        driver: "mysql"
        dsn: "user:pass@tcp(localhost:3306)/llmproxy"

# Health check configuration
health_check:
  interval: 10s
  path: /health
"#;

    #[test]
    fn seed_readme_config_loads_as_written() {
        let config = yaml(SEED_README_CONFIG).unwrap();
        assert_seed_backends(&config);
        let hook = &config.usage_hook;
        assert!(hook.enabled && hook.inject_stream_usage && !hook.include_raw_key);
        assert_eq!(hook.reporters.len(), 2);
        let ReporterKind::Webhook(webhook) = &hook.reporters[0].kind else {
            panic!("{:?}", hook.reporters[0])
        };
        assert_eq!(hook.reporters[0].name, "billing");
        assert_eq!(webhook.url, "https://your-billing.com/llm-usage");
        assert_eq!(webhook.timeout, Duration::from_secs(3));
        let ReporterKind::Database(db) = &hook.reporters[1].kind else {
            panic!("{:?}", hook.reporters[1])
        };
        assert_eq!(db.driver, DbDriver::Mysql);
        assert_eq!(db.dsn, "mysql://user:pass@localhost:3306/llmproxy");
        assert_eq!(db.table, "usage_records");
    }

    #[test]
    fn usage_hook_defaults_and_checks() {
        let hook = yaml("backends: [{url: 'http://b'}]").unwrap().usage_hook;
        assert!(!hook.enabled && hook.inject_stream_usage && !hook.include_raw_key);
        assert_eq!(hook.spool_path, PathBuf::from("./data/usage.db"));
        assert_eq!(hook.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(hook.channel_capacity, 262_144);

        let config = yaml(
            "backends: [{url: 'http://b'}]\nusage_hook:\n  enabled: true\n  retention: 2h\n  reporters:\n    \
             - {name: a, type: webhook, url: 'http://h/x', retry: 2, batch_size: 10, secret: s, headers: {X-A: b}}\n    \
             - {name: b, type: database, enabled: false, database: {driver: sqlite, dsn: x.db}}\n    \
             - {name: c, type: database, database: {driver: postgres, dsn: 'host=127.0.0.1 user=postgres', table: t1}}\n",
        )
        .unwrap();
        let hook = config.usage_hook;
        assert_eq!(hook.retention, Duration::from_secs(7200));
        let names: Vec<_> = hook.reporters.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(hook.reporters[0].batch_size, 10);
        let ReporterKind::Webhook(w) = &hook.reporters[0].kind else {
            panic!()
        };
        assert_eq!((w.retry, w.secret.as_deref()), (2, Some("s")));
        assert_eq!(w.headers.get("X-A").map(String::as_str), Some("b"));

        let error = yaml_err(
            "backends: [{url: 'http://b'}]\nusage_hook:\n  reporters:\n    \
             - {name: a, type: webhok}\n    - {name: a, type: database, database: {driver: mysql, dsn: 'x', table: 'a;b'}}\n    \
             - {name: c, type: webhook}\n",
        );
        assert!(
            error.contains("usage_hook.reporters[0].type: unknown reporter type"),
            "{error}"
        );
        assert!(
            error.contains("usage_hook.reporters[1].database: table"),
            "{error}"
        );
        assert!(
            error.contains("usage_hook.reporters[2].url: required"),
            "{error}"
        );
    }

    #[test]
    fn mysql_dsns() {
        assert_eq!(
            mysql_url("user:pass@tcp(localhost:3306)/llmproxy").unwrap(),
            "mysql://user:pass@localhost:3306/llmproxy"
        );
        assert_eq!(
            mysql_url("root@tcp(127.0.0.1:3306)/test?parseTime=true").unwrap(),
            "mysql://root@127.0.0.1:3306/test"
        );
        assert_eq!(
            mysql_url("u:p@/db").unwrap(),
            "mysql://u:p@127.0.0.1:3306/db"
        );
        assert_eq!(mysql_url("mysql://r@h/d").unwrap(), "mysql://r@h/d");
        assert!(mysql_url("u:p@unix(/tmp/sock)/db").is_err());
    }

    #[test]
    fn disabled_unsupported_block_is_accepted() {
        let config = yaml(
            "backends: [{url: 'http://b'}]\nusage_hook: {enabled: false}\n\
             health_check: {enabled: false, interval: 10s}",
        );
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn unknown_key_suggests_the_known_one() {
        let error = yaml_err("listne: ':8000'\nbackends: [{url: 'http://b'}]");
        assert_eq!(error, "listne: unknown key; did you mean `listen`?");
        let error = yaml_err("backends: [{url: 'http://b', wieght: 2}]\ntimeouts: {zzz: 1}");
        assert_eq!(
            error,
            "backends[0].wieght: unknown key; did you mean `weight`?\ntimeouts.zzz: unknown key"
        );
    }

    #[test]
    fn every_problem_is_reported_together() {
        let error = yaml(
            "listne: 1\nusage_hook: {enabld: true}\nlisten: 'nowhere'\nbackends:\n  \
             - url: 'https://a'\n  - url: 'http://b'\n    weight: 0\n",
        )
        .unwrap_err();
        let lines: Vec<_> = error.to_string().lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        let starts = [
            "listne: unknown key",
            "usage_hook.enabld: unknown key",
            "listen: invalid address",
        ];
        for start in starts {
            assert!(
                lines.iter().any(|l| l.starts_with(start)),
                "{start} in {lines:#?}"
            );
        }
        assert!(lines.contains(
            &"backends[1].weight: must be at least 1 (remove the backend to send it nothing)"
                .to_string()
        ));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("backends[0].url: https backends are not supported yet")));

        let mut in_file = error;
        in_file.file = Some("gw.yaml".into());
        assert!(in_file
            .to_string()
            .lines()
            .all(|l| l.starts_with("gw.yaml: ")));
    }

    #[test]
    fn type_errors_carry_the_key_path() {
        let error = yaml_err("backends: [{url: 'http://b', weight: x}]");
        assert_eq!(
            error,
            "backends[0].weight: invalid type: string \"x\", expected u32"
        );
        let error = yaml_err("io_driver: uring\nbackends: [{url: 'http://b'}]");
        assert!(
            error.starts_with("io_driver: unknown variant `uring`"),
            "{error}"
        );
        assert_eq!(
            yaml_err("listen: ':1'"),
            "backends: at least one backend is required, e.g. `- url: \"http://127.0.0.1:8001\"`"
        );
        assert!(yaml_err("- a").contains("expected a mapping"));
        assert!(yaml_err("a: [").starts_with("invalid YAML"));
    }

    #[test]
    fn backend_urls() {
        let target = |url: &str| {
            parse_backend_url(url).map(|t| (t.host, t.port, t.host_header, t.path_prefix))
        };
        let owned = |h: &str, p: u16, hh: &str, pp: &str| {
            (h.to_string(), p, hh.to_string(), pp.to_string())
        };
        assert_eq!(
            target("http://vllm:8000"),
            Ok(owned("vllm", 8000, "vllm:8000", ""))
        );
        assert_eq!(target("http://vllm"), Ok(owned("vllm", 80, "vllm", "")));
        assert_eq!(
            target("http://10.1.2.3:9000/openai/"),
            Ok(owned("10.1.2.3", 9000, "10.1.2.3:9000", "/openai"))
        );
        assert_eq!(
            target("http://[::1]:8001"),
            Ok(owned("::1", 8001, "[::1]:8001", ""))
        );
        assert_eq!(target("HTTP://h/"), Ok(owned("h", 80, "h", "")));
        assert!(target("https://api.openai.com")
            .unwrap_err()
            .starts_with("https backends are not supported yet"));
        assert!(target("http://::1:8000").unwrap_err().contains("brackets"));
        for bad in [
            "vllm:8000",
            "ftp://h",
            "http://",
            "http://:80",
            "http://h:0",
            "http://h:99999",
            "http://h:",
            "http://u:p@h",
            "http://h/?q=1",
            "http://h h",
            "http://[::1",
            "http://[zz]:1",
            "http://[::1]x",
        ] {
            assert!(target(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn log_level_is_checked() {
        assert!(check_log_level("INFO").is_ok());
        assert!(check_log_level("info,llmproxy=debug").is_ok());
        assert!(check_log_level("inof").is_err());
        assert!(check_log_level("").is_err());
        let error = yaml_err("log: {level: verbose}\nbackends: [{url: 'http://b'}]");
        assert!(error.starts_with("log.level: invalid log level"), "{error}");
    }
}
