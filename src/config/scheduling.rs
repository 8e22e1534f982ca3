//! The `scheduling` section: whether requests wait in the gateway when every backend that could
//! take them is saturated, for how long, how many, and what saturated means (`saturation`:
//! vLLM's scraped queue and KV-cache use). Parsed, defaulted and validated here into plain data;
//! `crate::schedule` orders the waiting requests by it.
//!
//! It must not know about keys or backends beyond these numbers.

use std::time::Duration;

use serde::Deserialize;

use super::units::DurationValue;
use super::Issue;

/// `backends[].engine_priority`: the backend's engine schedules by the request's `priority`
/// field, which llmproxy then sets to the request's place in its own order (band, and whether
/// its key has nothing else in flight), overriding any the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnginePriority {
    /// vLLM started with `--scheduling-policy priority`: a lower value runs first. It orders
    /// vLLM's waiting queue (and picks the victim when KV blocks run out); a request never
    /// preempts on arrival, so llmproxy never sends past `max_in_flight` for it.
    Vllm,
    /// SGLang started with `--enable-priority-scheduling`: a higher value runs first, and an
    /// arrival that beats a running request by more than
    /// `--priority-scheduling-preemption-threshold` (default 10; llmproxy's levels are 50
    /// apart) preempts it. llmproxy sends such a request past `max_in_flight`, since the engine
    /// makes room for it.
    Sglang,
}

/// `backends[].engine_priority` as written: `none` (the default) or an engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawEnginePriority {
    #[default]
    None,
    Vllm,
    Sglang,
}

impl RawEnginePriority {
    pub(super) fn build(self) -> Option<EnginePriority> {
        match self {
            RawEnginePriority::None => None,
            RawEnginePriority::Vllm => Some(EnginePriority::Vllm),
            RawEnginePriority::Sglang => Some(EnginePriority::Sglang),
        }
    }
}

impl EnginePriority {
    /// The `priority` value for a request at `level` (higher: more urgent).
    pub fn value(self, level: i64) -> i64 {
        match self {
            EnginePriority::Vllm => -level,
            EnginePriority::Sglang => level,
        }
    }

    /// The engine preempts a running request for a more urgent arrival.
    pub fn preempts(self) -> bool {
        self == EnginePriority::Sglang
    }
}

/// `scheduling`, when enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduling {
    /// Longest a request waits for a backend; then 429 (503 for a sheddable priority).
    pub queue_timeout: Duration,
    /// Requests waiting at once in the process; an arrival beyond it sheds a waiter of a lower
    /// priority, or is refused.
    pub max_queue: usize,
    /// What one completion token costs against a key's fair share, in prompt tokens.
    pub completion_weight: f64,
    /// A backend whose scraped `vllm:num_requests_waiting` reaches this is saturated.
    pub max_waiting: Option<u32>,
    /// A backend whose scraped `vllm:kv_cache_usage_perc` reaches this (0..1) is saturated.
    pub max_kv_cache: Option<f64>,
    /// The request header a key may set its priority with (up to its `max_priority`); lower
    /// case. `None`: priority comes from the key only.
    pub priority_header: Option<String>,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawScheduling {
    enabled: bool,
    queue_timeout: DurationValue,
    max_queue: usize,
    completion_weight: f64,
    saturation: RawSaturation,
    priority_header: String,
}

impl Default for RawScheduling {
    fn default() -> Self {
        RawScheduling {
            enabled: false,
            queue_timeout: DurationValue(Duration::from_secs(30)),
            max_queue: 1024,
            completion_weight: 2.0,
            saturation: RawSaturation::default(),
            priority_header: "X-LLMProxy-Priority".to_string(),
        }
    }
}

/// The thresholds of the Gateway API Inference Extension's saturation detector by default.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawSaturation {
    waiting_requests: u32,
    kv_cache: f64,
}

impl Default for RawSaturation {
    fn default() -> Self {
        RawSaturation {
            waiting_requests: 5,
            kv_cache: 0.8,
        }
    }
}

/// Validates `scheduling`; `None` when it is off (the default: no request ever waits here).
pub(super) fn build(raw: RawScheduling, issues: &mut Vec<Issue>) -> Option<Scheduling> {
    if !raw.enabled {
        return None;
    }
    if raw.queue_timeout.0.is_zero() {
        issues.push(Issue::new(
            "scheduling.queue_timeout",
            "must be greater than 0",
        ));
    }
    if raw.max_queue == 0 {
        issues.push(Issue::new("scheduling.max_queue", "must be at least 1"));
    }
    if !(0.0..=100.0).contains(&raw.completion_weight) {
        issues.push(Issue::new(
            "scheduling.completion_weight",
            "must be between 0 and 100 (a completion token's cost in prompt tokens)",
        ));
    }
    let kv = raw.saturation.kv_cache;
    if !(0.0..=1.0).contains(&kv) {
        issues.push(Issue::new(
            "scheduling.saturation.kv_cache",
            "must be between 0 and 1 (a share of the KV cache; 0 turns the check off)",
        ));
    }
    let header = raw.priority_header.trim();
    if !header
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        issues.push(Issue::new(
            "scheduling.priority_header",
            format!("`{header}` is not a header name"),
        ));
    }
    Some(Scheduling {
        queue_timeout: raw.queue_timeout.0,
        max_queue: raw.max_queue,
        completion_weight: raw.completion_weight,
        max_waiting: Some(raw.saturation.waiting_requests).filter(|&n| n > 0),
        max_kv_cache: Some(kv).filter(|&k| k > 0.0),
        priority_header: Some(header.to_ascii_lowercase()).filter(|h| !h.is_empty()),
    })
}
