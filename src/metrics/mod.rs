//! Metrics: counters, gauges and histograms for Prometheus, kept per worker and merged at scrape.
//!
//! Each worker owns one [`WorkerMetrics`] block and is its only writer, so an update is a Relaxed
//! load and store (no lock-prefixed read-modify-write) on a cache line no other core writes. The
//! worker that serves the scrape reads every block and renders the text format by hand
//! ([`Registry::render`]). Label sets are fixed arrays indexed by small enums, so cardinality is
//! bounded by construction: no per-model labels, backends limited to [`BACKEND_SLOTS`], and
//! the one per-key series (tokens served, with scheduling on) names at most ten keys.
//!
//! This module must not allocate, lock or make a syscall on the record path; only scrapes and
//! backend (re)registration take the registry's lock.

mod render;

pub use render::CONTENT_TYPE;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::upstream::{PrefixReason, PrefixRoute};

/// Backend label slots, slot 0 being "none" (the request never reached the pick phase) and the
/// last one "other" (more distinct backend URLs than slots were ever configured, across reloads).
pub const BACKEND_SLOTS: usize = 32;
const NO_BACKEND: usize = 0;

/// The `path` label: the API endpoints the gateway knows (OpenAI's, Anthropic's Messages, vLLM's
/// rerank and score), everything else is "other".
pub const PATHS: [&str; 12] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/responses",
    "/v1/messages",
    "/v1/rerank",
    "/v1/score",
    "/v1/moderations",
    "/v1/audio",
    "/v1/images",
    "other",
];

/// Index into [`PATHS`]; `/v1/models/x` counts as `/v1/models`, `/v1/audio/...` as `/v1/audio`.
pub fn path_index(path: &[u8]) -> usize {
    let path = crate::http::path_of(path);
    PATHS[..PATHS.len() - 1]
        .iter()
        .position(|p| {
            path.strip_prefix(p.as_bytes())
                .is_some_and(|rest| rest.is_empty() || rest[0] == b'/')
        })
        .unwrap_or(PATHS.len() - 1)
}

/// Status codes with their own label value; any other code is labelled by its class ("2xx").
const STATUSES: [u16; 23] = [
    200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 408, 409, 413, 422, 429, 431, 499,
    500, 502, 503, 504,
];
const STATUS_SLOTS: usize = STATUSES.len() + 5;

fn status_index(status: u16) -> usize {
    match STATUSES.iter().position(|&s| s == status) {
        Some(i) => i,
        // 1xx..5xx classes; anything odd is counted as 5xx.
        None => STATUSES.len() + usize::from(status / 100).clamp(1, 5) - 1,
    }
}

/// Why the gateway answered a request itself instead of relaying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Auth,
    Rate,
    Quota,
    Concurrency,
    BodySize,
    HeaderSize,
    Timeout,
    BadRequest,
    NotFound,
    NoBackend,
    /// `scheduling`: the wait for a saturated backend timed out, or the queue had no room.
    Overloaded,
}

impl Rejection {
    /// Every reason, so each is exported (as 0) before it first happens.
    pub const ALL: [Rejection; 11] = [
        Rejection::Auth,
        Rejection::Rate,
        Rejection::Quota,
        Rejection::Concurrency,
        Rejection::BodySize,
        Rejection::HeaderSize,
        Rejection::Timeout,
        Rejection::BadRequest,
        Rejection::NotFound,
        Rejection::NoBackend,
        Rejection::Overloaded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Auth => "auth",
            Rejection::Rate => "rate",
            Rejection::Quota => "quota",
            Rejection::Concurrency => "concurrency",
            Rejection::BodySize => "body_size",
            Rejection::HeaderSize => "header_size",
            Rejection::Timeout => "timeout",
            Rejection::BadRequest => "bad_request",
            Rejection::NotFound => "not_found",
            Rejection::NoBackend => "no_backend",
            Rejection::Overloaded => "overloaded",
        }
    }
}

/// The `band` label of the scheduling metrics: priorities above 0, 0, and below 0 (sheddable).
/// Three values whatever priorities the keys use, so the label stays bounded.
pub const BANDS: [&str; 3] = ["high", "default", "sheddable"];

/// The [`BANDS`] index of a priority.
pub fn band(priority: i32) -> usize {
    match priority {
        1.. => 0,
        0 => 1,
        _ => 2,
    }
}

/// How talking to a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    ConnectTimeout,
    /// Closed before any response byte.
    Closed,
    /// An unparsable response head or framing.
    Protocol,
    /// Failed after the response had started reaching the client.
    MidResponse,
    /// No response head in time, or silent past `timeouts.idle` / `total` mid-response.
    Timeout,
    /// Only retryable statuses (`retry.on_status`) on every attempt.
    Status,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 7] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::ConnectTimeout,
        UpstreamErrorKind::Closed,
        UpstreamErrorKind::Protocol,
        UpstreamErrorKind::MidResponse,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Status,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::ConnectTimeout => "connect_timeout",
            UpstreamErrorKind::Closed => "closed",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::MidResponse => "mid_response",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Status => "status",
        }
    }
}

/// A counter with exactly one writing thread.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Plain load + store: correct because only the owning worker writes, and readers on other
    /// threads only need a value that was true at some point.
    #[inline]
    pub fn add(&self, n: u64) {
        let c = &self.0;
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Gauges are counters that also go down; summing wrapped values across workers still
    /// gives the right total.
    #[inline]
    pub fn dec(&self) {
        self.add(u64::MAX);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency histograms, in milliseconds.
pub const LATENCY_BOUNDS_MS: [u64; 16] = [
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 20_000, 30_000, 60_000, 120_000,
    300_000,
];
/// Upper bounds of the inter-token histogram, in milliseconds.
pub const INTER_TOKEN_BOUNDS_MS: [u64; 12] = [1, 2, 5, 10, 20, 30, 50, 75, 100, 250, 500, 1000];
/// Upper bounds of the gateway-overhead histogram, in microseconds.
pub const OVERHEAD_BOUNDS_US: [u64; 12] = [
    10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 250_000,
];

/// A fixed-bucket histogram with one writer. Observations are kept in microseconds so the sum
/// keeps sub-millisecond precision; `bounds` are in the exported unit (`unit_us` microseconds).
pub struct Histogram<const N: usize> {
    bounds: &'static [u64; N],
    unit_us: u64,
    /// Per-bucket (not cumulative) counts; the last slot is +Inf.
    buckets: [Counter; N],
    inf: Counter,
    sum_us: Counter,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: &'static [u64; N], unit_us: u64) -> Self {
        Histogram {
            bounds,
            unit_us,
            buckets: std::array::from_fn(|_| Counter::default()),
            inf: Counter::default(),
            sum_us: Counter::default(),
        }
    }

    #[inline]
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.add(us);
        // Linear scan: at most 16 compares, cheaper than a branchy binary search at this size.
        match self.bounds.iter().position(|&b| us <= b * self.unit_us) {
            Some(i) => self.buckets[i].inc(),
            None => self.inf.inc(),
        }
    }
}

/// Counters grouped by 128 bytes (two cache lines, what the adjacent-line prefetcher pulls), so
/// a heap-allocated table never shares a line with another worker's data.
#[repr(align(128))]
#[derive(Default)]
struct Line([Counter; 16]);

/// One worker's metrics. Aligned so two workers' blocks never share a cache line.
#[repr(align(128))]
pub struct WorkerMetrics {
    /// `[path][stream][backend slot][status slot]`, flattened, 16 per [`Line`].
    requests: Box<[Line]>,
    pub latency: Histogram<16>,
    pub ttft: Histogram<16>,
    pub upstream_latency: Histogram<16>,
    pub inter_token: Histogram<12>,
    pub overhead: Histogram<12>,
    pub in_flight: Counter,
    rejections: [Counter; Rejection::ALL.len()],
    upstream_errors: [Counter; UpstreamErrorKind::ALL.len()],
    pub client_cancels: Counter,
    pub retries: Counter,
    /// Client connections open on this worker (a gauge).
    pub connections: Counter,
    /// Connections closed at accept because the process had `max_connections` open.
    pub connections_refused: Counter,
    /// Client TLS handshakes that failed or timed out.
    pub tls_handshake_failures: Counter,
    /// `cache_aware` decisions by [`PrefixReason`], and the share of the prompt the chosen
    /// backend held: its sum in thousandths and its count (prompts of at least one block).
    prefix_routes: [Counter; PrefixReason::ALL.len()],
    prefix_share_milli: Counter,
    prefix_share_count: Counter,
    /// `scheduling`: how long requests waited for a saturated backend, and those refused after
    /// waiting or for want of room, by [`BANDS`].
    queue_wait: [Histogram<16>; BANDS.len()],
    queue_refused: [Counter; BANDS.len()],
    /// Requests sent past a backend's `max_in_flight` because its engine preempts for them.
    past_limit: [Counter; BANDS.len()],
}

const REQUEST_SLOTS: usize = PATHS.len() * 2 * BACKEND_SLOTS * STATUS_SLOTS;

fn request_slot(path: usize, stream: bool, backend: usize, status: usize) -> usize {
    ((path * 2 + usize::from(stream)) * BACKEND_SLOTS + backend) * STATUS_SLOTS + status
}

impl WorkerMetrics {
    fn new() -> Self {
        WorkerMetrics {
            requests: (0..REQUEST_SLOTS.div_ceil(16))
                .map(|_| Line::default())
                .collect(),
            latency: Histogram::new(&LATENCY_BOUNDS_MS, 1000),
            ttft: Histogram::new(&LATENCY_BOUNDS_MS, 1000),
            upstream_latency: Histogram::new(&LATENCY_BOUNDS_MS, 1000),
            inter_token: Histogram::new(&INTER_TOKEN_BOUNDS_MS, 1000),
            overhead: Histogram::new(&OVERHEAD_BOUNDS_US, 1),
            in_flight: Counter::default(),
            rejections: std::array::from_fn(|_| Counter::default()),
            upstream_errors: std::array::from_fn(|_| Counter::default()),
            client_cancels: Counter::default(),
            retries: Counter::default(),
            connections: Counter::default(),
            connections_refused: Counter::default(),
            tls_handshake_failures: Counter::default(),
            prefix_routes: std::array::from_fn(|_| Counter::default()),
            prefix_share_milli: Counter::default(),
            prefix_share_count: Counter::default(),
            queue_wait: std::array::from_fn(|_| Histogram::new(&LATENCY_BOUNDS_MS, 1000)),
            queue_refused: std::array::from_fn(|_| Counter::default()),
            past_limit: std::array::from_fn(|_| Counter::default()),
        }
    }

    /// Counts one finished request. `backend` is a slot from [`Registry::backend_slot`], or
    /// `None` when the request was answered before a backend was picked.
    pub fn request(&self, path: usize, stream: bool, backend: Option<usize>, status: u16) {
        let slot = request_slot(
            path,
            stream,
            backend.unwrap_or(NO_BACKEND),
            status_index(status),
        );
        self.requests(slot).inc();
    }

    fn requests(&self, slot: usize) -> &Counter {
        &self.requests[slot / 16].0[slot % 16]
    }

    pub fn reject(&self, why: Rejection) {
        self.rejections[why as usize].inc();
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].inc();
    }

    /// One wait for a saturated backend ended, in band `band` ([`band`]).
    pub fn queue_wait(&self, band: usize, waited: Duration) {
        self.queue_wait[band].observe(waited);
    }

    /// One request of band `band` refused by the scheduler (timed out, shed or no room).
    pub fn queue_refused(&self, band: usize) {
        self.queue_refused[band].inc();
    }

    /// One request of band `band` sent past a saturated backend's limit, for its engine to
    /// preempt a less urgent one.
    pub fn past_limit(&self, band: usize) {
        self.past_limit[band].inc();
    }

    /// Counts one `cache_aware` decision.
    pub fn prefix_route(&self, route: PrefixRoute) {
        self.prefix_routes[route.reason as usize].inc();
        if route.blocks > 0 {
            self.prefix_share_milli
                .add(u64::from(route.matched) * 1000 / u64::from(route.blocks));
            self.prefix_share_count.inc();
        }
    }
}

/// All workers' blocks plus what is needed to label them; shared by every worker.
pub struct Registry {
    workers: Box<[WorkerMetrics]>,
    /// Backend URL per slot; index 0 is "none". Grows at start and reload only.
    slots: Mutex<Vec<Arc<str>>>,
    version: &'static str,
    io_driver: Mutex<&'static str>,
    /// The usage reporter's counters, when usage reporting runs (replaced when a reload starts
    /// a new reporter).
    usage: Mutex<Option<Arc<crate::usage::UsageStats>>>,
    /// Shared token accounting's state, with `rate_limit.storage: redis`.
    ledger: Mutex<Option<Arc<crate::auth::ledger::LedgerStats>>>,
}

impl Registry {
    pub fn new(workers: usize) -> Arc<Registry> {
        Arc::new(Registry {
            workers: (0..workers).map(|_| WorkerMetrics::new()).collect(),
            slots: Mutex::new(vec![Arc::from("none")]),
            version: env!("CARGO_PKG_VERSION"),
            io_driver: Mutex::new("unknown"),
            usage: Mutex::new(None),
            ledger: Mutex::new(None),
        })
    }

    /// Exposes the usage reporter's delivery and token counters on `/metrics`.
    pub fn attach_usage(&self, stats: Option<Arc<crate::usage::UsageStats>>) {
        *self.usage.lock().unwrap_or_else(|e| e.into_inner()) = stats;
    }

    /// Exposes shared token accounting's state on `/metrics`.
    pub fn attach_ledger(&self, stats: Option<Arc<crate::auth::ledger::LedgerStats>>) {
        *self.ledger.lock().unwrap_or_else(|e| e.into_inner()) = stats;
    }

    pub fn worker(&self, index: usize) -> &WorkerMetrics {
        &self.workers[index]
    }

    /// Client connections open in the process: one relaxed load per worker.
    pub fn open_connections(&self) -> u64 {
        self.workers
            .iter()
            .fold(0u64, |n, w| n.wrapping_add(w.connections.get()))
    }

    /// The label slot for a backend URL, stable across reloads so counters keep their series.
    pub fn backend_slot(&self, url: &str) -> usize {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = slots.iter().position(|s| &**s == url) {
            return i;
        }
        if slots.len() == BACKEND_SLOTS - 1 {
            slots.push(Arc::from("other"));
        }
        if slots.len() == BACKEND_SLOTS {
            return BACKEND_SLOTS - 1;
        }
        slots.push(Arc::from(url));
        slots.len() - 1
    }

    pub fn set_io_driver(&self, driver: &'static str) {
        *self.io_driver.lock().unwrap_or_else(|e| e.into_inner()) = driver;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_bounded() {
        assert_eq!(
            PATHS[path_index(b"/v1/chat/completions")],
            "/v1/chat/completions"
        );
        assert_eq!(PATHS[path_index(b"/v1/models/llama?x=1")], "/v1/models");
        assert_eq!(PATHS[path_index(b"/v1/chat/completionsX")], "other");
        assert_eq!(PATHS[path_index(b"/admin")], "other");
    }

    #[test]
    fn statuses_are_bounded() {
        assert_eq!(STATUSES[status_index(502)], 502);
        assert_eq!(status_index(299), STATUSES.len() + 1);
        assert_eq!(status_index(999), STATUSES.len() + 4);
        assert_eq!(status_index(0), STATUSES.len());
    }

    #[test]
    fn gauges_sum_across_workers() {
        let r = Registry::new(2);
        r.worker(0).in_flight.inc();
        r.worker(1).in_flight.inc();
        r.worker(1).in_flight.dec();
        r.worker(1).in_flight.dec();
        let sum = r
            .workers
            .iter()
            .fold(0u64, |a, w| a.wrapping_add(w.in_flight.get()));
        assert_eq!(sum as i64, 0);
    }

    #[test]
    fn backend_slots_are_stable_and_bounded() {
        let r = Registry::new(1);
        assert_eq!(r.backend_slot("http://a"), 1);
        assert_eq!(r.backend_slot("http://b"), 2);
        assert_eq!(r.backend_slot("http://a"), 1);
        for i in 0..100 {
            assert!(r.backend_slot(&format!("http://x{i}")) < BACKEND_SLOTS);
        }
        assert_eq!(r.backend_slot("http://new"), BACKEND_SLOTS - 1);
    }
}
