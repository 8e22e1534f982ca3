//! The `rate_limit` section and the per-key limit overrides of `api_keys`: request and token
//! rates and concurrency per scope, optionally shared through Redis. Parsed, defaulted and
//! validated here into plain data; `crate::limits` counts against it.
//!
//! It must not connect to Redis: the URL is kept as a [`Secret`] for `crate::limits` to use.

use std::time::Duration;

use serde::Deserialize;

use super::types::Secret;
use super::units::DurationValue;
use super::Issue;

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
    /// `storage: redis`: request and token rates, concurrency and quota consumption shared by
    /// every instance using this Redis.
    pub redis: Option<SharedLimits>,
}

/// `rate_limit.redis`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedLimits {
    pub url: Secret,
    /// Prepended to every Redis key, so several deployments can share one Redis.
    pub prefix: String,
    /// How often each instance sends the tokens it metered and reads the shared totals: the
    /// staleness bound of token rates and quotas across instances.
    pub sync_interval: Duration,
}

/// `rate_limit.sync_interval` when unset.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawRateLimit {
    enabled: Option<bool>,
    storage: Option<String>,
    redis: RawSharedLimits,
    per_key: LimitSpec,
    global: LimitSpec,
    queue_timeout: Option<DurationValue>,
    sync_interval: Option<DurationValue>,
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

pub(super) fn check_spec(spec: &LimitSpec, at: &str, issues: &mut Vec<Issue>) {
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

/// Validates `rate_limit`; `enabled: false` means no limits at all.
pub(super) fn build(rate: RawRateLimit, issues: &mut Vec<Issue>) -> RateLimitConfig {
    if rate.enabled == Some(false) {
        return RateLimitConfig::default();
    }
    check_spec(&rate.per_key, "rate_limit.per_key", issues);
    check_spec(&rate.global, "rate_limit.global", issues);
    let sync_interval = rate.sync_interval.map_or(DEFAULT_SYNC_INTERVAL, |d| d.0);
    if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&sync_interval) {
        issues.push(Issue::new(
            "rate_limit.sync_interval",
            "must be between 10ms and 10s (it bounds how stale shared token counts may be)",
        ));
    }
    let redis = match rate.storage.as_deref() {
        None | Some("memory") => None,
        Some("redis") => Some(SharedLimits {
            url: Secret(rate.redis.url),
            prefix: rate.redis.prefix,
            sync_interval,
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
}
