//! The top-level config types and their defaults: [`Config`] and the general sections
//! (`listen`, `workers`, `timeouts`, `upstream`, `backends`, `log`, `metrics`, `admin`), plus
//! [`RawConfig`], the file as serde reads it, whose `Default` impls hold every default.
//!
//! Plain data only: it must not validate (that is [`super::validate`]) nor do any I/O. Sections
//! with their own rules (routing, auth, rate limits, usage reporters) keep their types in their
//! own files.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::auth::{self, ApiKeyConfig, AuthConfig};
use super::limits::{self, RateLimitConfig};
use super::routing::{self, HealthCheck, Retry, Routing, Strategy};
use super::scheduling::{self, EnginePriority, Scheduling};
use super::tls::{self, BackendTls, ListenerTls};
use super::units::{DurationValue, SizeValue};
use super::usage::{self, UsageHook};
use crate::redact::mask_key;

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
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address to accept clients on. Go style ":8000" means 0.0.0.0:8000.
    pub listen: SocketAddr,
    /// Clients connect with TLS when set (key `tls`).
    pub tls: Option<ListenerTls>,
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
    /// Client connections open at once in the process; more are closed at accept. 0 in the
    /// file: half the open-file limit, so accepting never runs the process out of descriptors.
    pub max_connections: usize,
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
    /// `None` unless `scheduling.enabled`: requests never wait for a saturated backend.
    pub scheduling: Option<Scheduling>,
    pub metrics: MetricsConfig,
    pub admin: AdminConfig,
    pub usage_hook: UsageHook,
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
    /// From the start of the request's write to the response head (then 504); `None`: no limit.
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
    /// The header that carries the request id upstream (the client's own id, or the gateway's
    /// UUIDv7); `None` sends none.
    pub request_id_header: Option<String>,
}

/// One inference server (items of `backends`), `http://` or `https://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// As written, e.g. "http://vllm:8000".
    pub url: String,
    /// Relative share of requests for weighted round robin; at least 1.
    pub weight: u32,
    /// Hostname or IP literal; IPv6 without brackets. Not resolved here.
    pub host: String,
    /// 80 (443 for https) when the URL has none.
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
    /// Set for an `https://` URL: how to verify it and what to present.
    pub tls: Option<BackendTls>,
    /// Spillover tier: requests go to the lowest tier with a backend able to take them.
    pub tier: u8,
    /// Model name in the request -> the name this backend serves it under (rewritten in the
    /// body sent to this backend only). Its keys count as models the backend serves.
    pub model_map: Vec<(String, String)>,
    /// The engine schedules by a request's `priority` field (needs `scheduling`).
    pub engine_priority: Option<EnginePriority>,
}

/// Logging (key `log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A level ("info") or `tracing` filter directives ("info,llmproxy=debug").
    pub level: String,
    pub format: LogFormat,
    /// One `access` line per request (target `access`, level info).
    pub access: bool,
    /// The file access lines are appended to; `None`: stderr, with the other log lines.
    pub access_path: Option<PathBuf>,
    /// A worker hands its access lines on once this many bytes are buffered.
    pub buffer_size: usize,
    /// ... or at the latest this long after they were written.
    pub flush_interval: Duration,
}

/// Defaults of [`RawLog`]: for commands that log before (or without) a config file.
impl Default for LogConfig {
    fn default() -> Self {
        RawLog::default().into()
    }
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
    /// Where the keys created through the admin API are stored (hashed): a SQLite file, or a
    /// `postgres://` or `mysql://` URL shared by several instances. Shown masked.
    pub key_store: Secret,
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

/// A credential from the config; `Debug` shows it masked.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_key(&self.0))
    }
}

/// The file as serde sees it, after [`super::schema::check`] removed unknown and unsupported keys.
/// Defaults live in the `Default` impls below and nowhere else.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: String,
    pub(super) tls: Option<tls::RawListenerTls>,
    pub(super) workers: usize,
    pub(super) io_driver: IoDriver,
    pub(super) cpu_affinity: bool,
    pub(super) busy_poll: DurationValue,
    pub(super) max_request_body: SizeValue,
    pub(super) max_header_size: SizeValue,
    pub(super) max_connections: usize,
    pub(super) shutdown_timeout: DurationValue,
    pub(super) timeouts: RawTimeouts,
    pub(super) upstream: RawUpstream,
    pub(super) backends: Vec<RawBackend>,
    pub(super) load_balance: Option<Strategy>,
    pub(super) routing: routing::RawRouting,
    pub(super) health_check: Option<routing::RawHealthCheck>,
    pub(super) retry: routing::RawRetry,
    pub(super) model_aliases: BTreeMap<String, String>,
    pub(super) log: RawLog,
    pub(super) auth: Option<auth::RawAuth>,
    pub(super) api_keys: Vec<auth::RawApiKey>,
    pub(super) rate_limit: limits::RawRateLimit,
    pub(super) scheduling: scheduling::RawScheduling,
    pub(super) metrics: RawMetrics,
    pub(super) admin: RawAdmin,
    pub(super) usage_hook: usage::RawUsageHook,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen: ":8000".to_string(),
            tls: None,
            workers: 0,
            io_driver: IoDriver::Auto,
            cpu_affinity: false,
            busy_poll: DurationValue(Duration::ZERO),
            max_request_body: SizeValue(32 << 20),
            max_header_size: SizeValue(64 << 10),
            max_connections: 0,
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
            rate_limit: limits::RawRateLimit::default(),
            scheduling: scheduling::RawScheduling::default(),
            metrics: RawMetrics::default(),
            admin: RawAdmin::default(),
            usage_hook: usage::RawUsageHook::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub(super) connect: DurationValue,
    pub(super) client_header: DurationValue,
    pub(super) client_body: DurationValue,
    pub(super) keepalive: DurationValue,
    pub(super) first_byte: Option<DurationValue>,
    pub(super) idle: Option<DurationValue>,
    pub(super) total: Option<DurationValue>,
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
pub(super) struct RawUpstream {
    pub(super) max_idle_per_backend: usize,
    pub(super) idle_timeout: DurationValue,
    pub(super) request_id_header: String,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            max_idle_per_backend: 256,
            idle_timeout: DurationValue(Duration::from_secs(4)),
            request_id_header: "X-Request-Id".to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) url: String,
    #[serde(default = "default_weight")]
    pub(super) weight: u32,
    #[serde(default)]
    pub(super) api_key: Option<String>,
    #[serde(default)]
    pub(super) models: Vec<String>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) max_in_flight: Option<u32>,
    #[serde(default)]
    pub(super) tls: Option<tls::RawBackendTls>,
    #[serde(default)]
    pub(super) tier: u8,
    #[serde(default)]
    pub(super) model_map: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) engine_priority: scheduling::RawEnginePriority,
}

fn default_weight() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: String,
    pub(super) format: LogFormat,
    pub(super) access: bool,
    pub(super) access_path: Option<String>,
    pub(super) buffer_size: SizeValue,
    pub(super) flush_interval: DurationValue,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".to_string(),
            format: LogFormat::Text,
            access: true,
            access_path: None,
            buffer_size: SizeValue(64 << 10),
            flush_interval: DurationValue(Duration::from_secs(1)),
        }
    }
}

impl From<RawLog> for LogConfig {
    fn from(raw: RawLog) -> LogConfig {
        LogConfig {
            level: raw.level,
            format: raw.format,
            access: raw.access,
            access_path: raw.access_path.filter(|p| !p.is_empty()).map(PathBuf::from),
            buffer_size: raw.buffer_size.0,
            flush_interval: raw.flush_interval.0,
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) enabled: bool,
    pub(super) path: String,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) enabled: bool,
    pub(super) listen: String,
    pub(super) token: String,
    pub(super) key_store: String,
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
