//! llmproxy: a thread-per-core gateway for OpenAI-compatible inference servers.
//!
//! A request moves through named phases, each owned by one module, and data flows one way:
//! `server` (runtimes, listeners, lifecycle) accepts connections; `http` parses the wire format;
//! `api` names the dialect of each path; `proxy` reads, routes and relays each request; `upstream` picks backends and owns their
//! connections; errors decided anywhere are rendered by `error`. `auth` decides who is calling
//! and may they (keys, providers, quota); `limits` counts rates and concurrency; `schedule` orders
//! requests that wait for a saturated backend. `config` loads and validates the
//! configuration and `live` holds its running generation (hot reload); `metrics` keeps
//! per-worker counters for Prometheus; `logging` writes log lines off the workers; `busy_poll`
//! optionally keeps an active worker polling instead of sleeping; `mock` is the OpenAI-compatible simulator used by tests, the demo and benchmarks.
//! Shared helpers exist once: `db` opens SQL connections (auth providers, usage sinks), `time`
//! does calendar arithmetic and RFC 3339, `redact` masks keys wherever they are shown.

pub mod api;
pub mod auth;
pub mod busy_poll;
pub mod config;
pub mod db;
pub mod error;
pub mod http;
pub mod limits;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod redact;
pub mod schedule;
pub mod server;
pub mod time;
pub mod tls;
pub mod upstream;
pub mod usage;

/// Internals the fuzz targets (`fuzz/`) drive directly, compiled only with the `fuzzing` feature:
/// the product's public API stays as it is, and what fuzzing reaches into is listed here, once.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::proxy::inspect::{inspect, inspect_form, request_stream_usage, RequestInfo};
}
