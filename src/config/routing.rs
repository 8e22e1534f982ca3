//! Backend-pool keys: load balancing and affinity (`load_balance`, `routing`), active and passive
//! health checks (`health_check`), retries (`retry`) and model aliases (`model_aliases`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::units::DurationValue;

/// How a backend is chosen for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    RoundRobin,
    /// Smooth weighted round robin honouring `weight` (the default).
    #[serde(alias = "weighted_round_robin")]
    Weighted,
    /// Fewest requests in flight, counted across all workers.
    #[serde(alias = "least_conn")]
    LeastConnections,
    /// Peak-EWMA of time to first byte, power of two choices.
    Latency,
    /// Least loaded by each backend's vLLM `/metrics` (queue, running, KV cache).
    LeastLoad,
    /// The backend that probably holds the prompt's prefix in its KV cache, unless load is
    /// imbalanced (sgl-router's `cache_aware` rule); tuned by `routing.cache_aware`.
    CacheAware,
}

/// Requests with the same affinity key go to the same backend (to keep prefix caches warm).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affinity {
    /// The value of this request header.
    Header(String),
    /// The request body's `user` field.
    User,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub strategy: Strategy,
    pub affinity: Option<Affinity>,
    /// How often `least_load` and `cache_aware` scrape each backend's metrics, and where.
    pub load_interval: Duration,
    pub load_path: String,
    /// A backend whose scraped load score is at least this is saturated: requests spill over
    /// to the next tier. 0: never (only down or full backends spill over).
    pub saturation: f64,
    pub cache_aware: CacheAware,
}

/// `routing.cache_aware`: how prompts are cut into blocks, how many blocks each backend's index
/// remembers, and when load overrides a prefix match. The decision rule is sgl-router's, and so
/// are `threshold` (0.3) and `balance_rel` (1.5); `balance_abs` is 8, not its 64: with 64 the
/// guard never trips on backends that run a few dozen sequences, and one hot prefix piles its
/// traffic onto one backend (loadtest/routing.sh, skewed); at hundreds of sequences the relative
/// condition decides anyway.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheAware {
    /// Bytes of prompt JSON per block (a multiple of 8); about 4 bytes make a token.
    pub block_bytes: usize,
    /// Blocks remembered per backend: its KV cache in tokens × 4 / `block_bytes`, roughly.
    pub index_blocks: usize,
    /// The smallest share of the prompt's blocks a backend must hold to win on its match.
    pub threshold: f64,
    /// Load is imbalanced when max − min exceeds this ...
    pub balance_abs: f64,
    /// ... and max exceeds this many times min; then the least loaded backend wins.
    pub balance_rel: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Active checks run only when the `health_check` section is present.
    pub active: bool,
    pub interval: Duration,
    pub path: String,
    pub timeout: Duration,
    pub expected_status: u16,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub headers: Vec<(String, String)>,
    /// Passive ejection: consecutive connect errors or 5xx before a backend is taken out.
    pub max_failures: u32,
    /// How long an ejected backend rests before one trial request (half-open).
    pub ejection_time: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in total, the first included; 1 disables retries.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Response statuses that are retried (before any byte reached the client).
    pub on_status: Vec<u16>,
    /// Retries allowed as a percentage of requests, so an outage cannot multiply load.
    pub budget_percent: u32,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawRouting {
    pub load_balance: Option<Strategy>,
    pub affinity: Option<RawAffinity>,
    pub least_load: RawLeastLoad,
    pub cache_aware: RawCacheAware,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawCacheAware {
    pub block_bytes: usize,
    pub index_blocks: usize,
    pub threshold: f64,
    pub balance_abs: u32,
    pub balance_rel: f64,
}

impl Default for RawCacheAware {
    fn default() -> Self {
        RawCacheAware {
            // 64 tokens or so; vLLM's KV blocks hold 16.
            block_bytes: 256,
            // 2 MiB of prompt text, about 500k tokens: one large GPU's KV cache for an 8B model.
            index_blocks: 8192,
            threshold: 0.3,
            balance_abs: 8,
            balance_rel: 1.5,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAffinity {
    pub header: Option<String>,
    pub field: Option<String>,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawLeastLoad {
    pub interval: DurationValue,
    pub path: String,
    pub saturation: f64,
}

impl Default for RawLeastLoad {
    fn default() -> Self {
        RawLeastLoad {
            interval: DurationValue(Duration::from_secs(1)),
            path: "/metrics".into(),
            saturation: 0.0,
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    /// Defaults to true: naming the section turns active checks on.
    pub enabled: bool,
    pub interval: DurationValue,
    pub path: String,
    pub timeout: DurationValue,
    pub expected_status: u16,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub headers: BTreeMap<String, String>,
    pub max_failures: u32,
    pub ejection_time: DurationValue,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        RawHealthCheck {
            enabled: true,
            interval: DurationValue(Duration::from_secs(10)),
            path: "/health".into(),
            timeout: DurationValue(Duration::from_secs(2)),
            expected_status: 200,
            healthy_threshold: 1,
            unhealthy_threshold: 2,
            headers: BTreeMap::new(),
            max_failures: 5,
            ejection_time: DurationValue(Duration::from_secs(10)),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawRetry {
    pub max_attempts: u32,
    pub initial_backoff: DurationValue,
    pub max_backoff: DurationValue,
    pub on_status: Vec<u16>,
    pub budget_percent: u32,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            max_attempts: 2,
            initial_backoff: DurationValue(Duration::from_millis(25)),
            max_backoff: DurationValue(Duration::from_secs(1)),
            on_status: vec![502, 503, 504],
            budget_percent: 20,
        }
    }
}

/// `load_balance` at the top level (this gateway's spelling) or `routing.load_balance` (the
/// seed's); the default is weighted round robin.
pub(super) fn routing(
    top: Option<Strategy>,
    raw: RawRouting,
    report: &mut dyn FnMut(&str, Result<(), String>),
) -> Routing {
    if top.is_some() && raw.load_balance.is_some() && top != raw.load_balance {
        report(
            "routing.load_balance",
            Err("conflicts with the top-level `load_balance`; set one of them".into()),
        );
    }
    // Empty strings count as unset, so the example file can list both keys.
    let set = |v: Option<String>| v.filter(|s| !s.is_empty());
    let affinity = match raw.affinity.map(|a| (set(a.header), set(a.field))) {
        None | Some((None, None)) => None,
        Some((Some(h), None)) => Some(Affinity::Header(h)),
        Some((None, Some(f))) if f == "user" => Some(Affinity::User),
        Some(_) => {
            report(
                "routing.affinity",
                Err("set exactly one of `header: NAME` or `field: user`".into()),
            );
            None
        }
    };
    let saturation = raw.least_load.saturation;
    if !(saturation.is_finite() && saturation >= 0.0) {
        report(
            "routing.least_load.saturation",
            Err("must be a load score of 0 (off) or more".into()),
        );
    }
    Routing {
        strategy: top.or(raw.load_balance).unwrap_or(Strategy::Weighted),
        affinity,
        load_interval: raw.least_load.interval.0,
        load_path: raw.least_load.path,
        saturation,
        cache_aware: cache_aware(raw.cache_aware, report),
    }
}

fn cache_aware(raw: RawCacheAware, report: &mut dyn FnMut(&str, Result<(), String>)) -> CacheAware {
    if raw.block_bytes == 0 || raw.block_bytes % 8 != 0 || raw.block_bytes > 1 << 20 {
        report(
            "routing.cache_aware.block_bytes",
            Err("must be a multiple of 8 from 8 to 1048576".into()),
        );
    }
    if !(8..=1 << 30).contains(&raw.index_blocks) {
        report(
            "routing.cache_aware.index_blocks",
            Err("must be from 8 to 1073741824".into()),
        );
    }
    if !(0.0..=1.0).contains(&raw.threshold) {
        report(
            "routing.cache_aware.threshold",
            Err("must be a share from 0 to 1".into()),
        );
    }
    if raw.balance_rel.is_nan() || raw.balance_rel < 1.0 {
        report(
            "routing.cache_aware.balance_rel",
            Err("must be at least 1".into()),
        );
    }
    CacheAware {
        block_bytes: raw.block_bytes.clamp(8, 1 << 20) / 8 * 8,
        index_blocks: raw.index_blocks.clamp(8, 1 << 30),
        threshold: raw.threshold,
        balance_abs: f64::from(raw.balance_abs),
        balance_rel: raw.balance_rel,
    }
}

pub(super) fn health_check(raw: Option<RawHealthCheck>) -> HealthCheck {
    let active = raw.as_ref().is_some_and(|r| r.enabled);
    let raw = raw.unwrap_or_default();
    HealthCheck {
        active,
        interval: raw.interval.0,
        path: raw.path,
        timeout: raw.timeout.0,
        expected_status: raw.expected_status,
        healthy_threshold: raw.healthy_threshold.max(1),
        unhealthy_threshold: raw.unhealthy_threshold.max(1),
        headers: raw.headers.into_iter().collect(),
        max_failures: raw.max_failures,
        ejection_time: raw.ejection_time.0,
    }
}

pub(super) fn retry(raw: RawRetry, report: &mut dyn FnMut(&str, Result<(), String>)) -> Retry {
    if raw.max_attempts == 0 {
        report(
            "retry.max_attempts",
            Err("must be at least 1 (1 means no retries)".into()),
        );
    }
    Retry {
        max_attempts: raw.max_attempts.max(1),
        initial_backoff: raw.initial_backoff.0,
        max_backoff: raw.max_backoff.0.max(raw.initial_backoff.0),
        on_status: raw.on_status,
        budget_percent: raw.budget_percent,
    }
}
