//! Phase 7, pick and relay under a retry policy: runs once per relayed request after its body is
//! ready. Picks a backend, relays, and on a failure before any response byte reached the client
//! tries another backend after a jittered backoff, within `retry.max_attempts` and the worker's
//! [`RetryBudget`]. Each attempt's ending is reported to the backend's passive health. Returns
//! the last attempt's result with the backend it went to, still counted in flight.

use std::cell::Cell;
use std::io::Write;
use std::ops::Range;
use std::time::Instant;

use super::client_watch::ClientWatch;
use super::conn::ClientWriter;
use super::forward::{self, Origin};
use super::pick;
use super::relay::{self, Exchange, Plan, Progress, Relayed};
use super::{Context, Generation};
use crate::error::GatewayError;
use crate::http::RequestHead;
use crate::upstream::{InFlight, PickRequest};

use super::inspect::PROMPT_FIELDS;

/// Retries allowed as a share of requests, per worker: each request deposits a fraction of a
/// token, each retry spends one. During an outage, retries stay a bounded fraction of traffic
/// instead of multiplying it; a small reserve allows retries right after start.
pub struct RetryBudget {
    tokens: Cell<f64>,
}

impl RetryBudget {
    const RESERVE: f64 = 10.0;

    pub fn new() -> Self {
        RetryBudget {
            tokens: Cell::new(Self::RESERVE),
        }
    }

    fn deposit(&self, percent: u32) {
        self.tokens
            .set((self.tokens.get() + f64::from(percent) / 100.0).min(Self::RESERVE));
    }

    /// Whether a retry could be paid for now (without paying for it).
    fn has_one(&self) -> bool {
        self.tokens.get() >= 1.0
    }

    fn withdraw(&self) -> bool {
        let t = self.tokens.get();
        if t >= 1.0 {
            self.tokens.set(t - 1.0);
            true
        } else {
            false
        }
    }
}

/// The client's request as every attempt sends it.
pub struct Request<'a> {
    /// The client's read buffer, which starts with the request head.
    pub buf: &'a [u8],
    pub head: &'a RequestHead,
    /// The body as rewritten for the backend.
    pub body: &'a [u8],
    pub client_ip: &'a str,
    pub model: Option<&'a str>,
    /// Where `body` holds the model's name (between the quotes), for a backend's `model_map`.
    pub model_at: Option<std::ops::Range<usize>>,
    /// Where a backend's `engine_priority` value goes; `None` unless some backend has one and
    /// the body is a JSON object: a generation's, or another API's that carries a `priority`
    /// of the client's (replaced, never added).
    pub priority_at: Option<PriorityAt>,
    pub affinity_key: Option<&'a [u8]>,
    /// The prompt's raw JSON values, for `cache_aware` routing.
    pub prompt: [&'a [u8]; PROMPT_FIELDS.len()],
    /// With `scheduling`: its place when it must wait for a saturated backend.
    pub queueing: Option<pick::Queueing>,
}

/// Where the `priority` sent to an `engine_priority` backend goes in the body.
pub enum PriorityAt {
    /// Over the value of the client's own `priority` member (the gateway's replaces it; a
    /// strict parser would refuse a second member).
    Value(Range<usize>),
    /// A new last member, before the object's closing brace at `end` (after a comma when the
    /// object has members).
    Append { end: usize, comma: bool },
}

/// The last attempt's ending, and the backend it went to (still counted in flight).
pub struct Attempted {
    pub result: Result<Relayed, GatewayError>,
    pub progress: Progress,
    pub in_flight: Option<InFlight>,
    /// Backends tried, this one included.
    pub attempts: u32,
}

#[allow(clippy::too_many_arguments)]
pub async fn relay_with_retries(
    ctx: &Context,
    generation: &Generation,
    watch: &mut ClientWatch<'_>,
    wr: &mut ClientWriter,
    out: &mut Vec<u8>,
    resp_head: &mut Vec<u8>,
    req: &Request<'_>,
    plan: &Plan<'_>,
) -> Attempted {
    let retry = &generation.config.retry;
    ctx.retry_budget.deposit(retry.budget_percent);
    let mut tried = 0u64;
    let mut attempt = 1;
    loop {
        let pick_request = PickRequest {
            model: req.model,
            affinity_key: req.affinity_key,
            tried,
            prompt: &req.prompt,
        };
        let picked = pick::pick_or_wait(
            generation,
            ctx.metrics(),
            &pick_request,
            req.queueing.as_ref(),
            watch,
        )
        .await;
        let in_flight = match picked {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Attempted {
                    result: Ok(Relayed::ClientGone),
                    progress: Progress::default(),
                    in_flight: None,
                    attempts: attempt,
                }
            }
            Err(e) => {
                return Attempted {
                    result: Err(e),
                    progress: Progress::default(),
                    in_flight: None,
                    attempts: attempt,
                }
            }
        };
        let idx = in_flight.index;
        tried |= 1 << (idx % 64);
        let backend = generation.upstreams.backend(idx);
        // This backend's name for the model, when its model_map renames it.
        let renamed = req
            .model
            .and_then(|m| backend.mapped_model(m))
            .zip(req.model_at.clone());
        // This backend's engine schedules by `priority`: the request's level, in place of any
        // the client sent.
        let mut member = [0u8; 32];
        let priority = backend
            .engine_priority
            .zip(req.queueing.as_ref())
            .zip(req.priority_at.as_ref())
            .map(|((engine, q), at)| {
                let mut w = std::io::Cursor::new(&mut member[..]);
                let value = engine.value(q.level);
                // 32 bytes hold `,"priority":` and any i64.
                let at = match at {
                    PriorityAt::Value(range) => {
                        let _ = write!(w, "{value}");
                        range.clone()
                    }
                    PriorityAt::Append { end, comma } => {
                        let sep = if *comma { "," } else { "" };
                        let _ = write!(w, "{sep}\"priority\":{value}");
                        *end..*end
                    }
                };
                (at, w.position() as usize)
            });
        let renamed = renamed.map(|(name, at)| (at, name.as_bytes()));
        let priority = priority.map(|(at, n)| (at, &member[..n]));
        let body_len = [&renamed, &priority]
            .into_iter()
            .flatten()
            .fold(req.body.len(), |len, (at, bytes)| {
                len - at.len() + bytes.len()
            });
        forward::write_upstream_head(
            out,
            req.buf,
            req.head,
            backend,
            Origin {
                client_ip: req.client_ip,
                request_id: plan.request_id,
                request_id_header: generation.config.upstream.request_id_header.as_deref(),
                credentials: generation
                    .auth
                    .as_ref()
                    .map_or(&[][..], |a| a.header_names()),
                priority_header: generation
                    .config
                    .scheduling
                    .as_ref()
                    .and_then(|s| s.priority_header.as_deref()),
            },
            body_len as u64,
        );
        push_body(out, req.body, [renamed, priority]);
        // With no retry left (attempts or budget), a retryable status is relayed as the
        // backend sent it rather than replaced by the gateway's own error.
        let last = attempt >= retry.max_attempts || !ctx.retry_budget.has_one();
        let first_byte = generation
            .config
            .timeouts
            .first_byte
            .map(|t| Instant::now() + t);
        let ex = Exchange {
            plan,
            backend: idx,
            retry_status: if last { &[] } else { &retry.on_status },
            head_deadline: first_byte.into_iter().chain(plan.deadline).min(),
            fair_share: req.queueing.as_ref(),
        };
        let mut progress = Progress::default();
        let result = relay::exchange(
            ctx,
            &generation.upstreams,
            watch,
            wr,
            out,
            resp_head,
            ex,
            &mut progress,
        )
        .await;
        let passive = match &result {
            Ok(relayed) => relayed.passive(progress.status),
            Err(e) => Some(e.passive()),
        };
        if let Some(verdict) = passive {
            backend.record(verdict, &generation.upstreams.health);
        }
        match result {
            Err(e) if e.is_retryable() && !last && ctx.retry_budget.withdraw() => {
                tracing::debug!(request_id = %String::from_utf8_lossy(plan.request_id), backend = %backend.url, attempt, code = e.code(), "retrying on another backend");
                drop(in_flight);
                let cap = retry
                    .max_backoff
                    .min(retry.initial_backoff * 2u32.saturating_pow(attempt - 1));
                let backoff = cap.mul_f64((generation.upstreams.random() % 1024) as f64 / 1024.0);
                if watch.race(monoio::time::sleep(backoff)).await.is_none() {
                    return Attempted {
                        result: Ok(Relayed::ClientGone),
                        progress,
                        in_flight: None,
                        attempts: attempt,
                    };
                }
                attempt += 1;
            }
            result => {
                return Attempted {
                    result,
                    progress,
                    in_flight: Some(in_flight),
                    attempts: attempt,
                }
            }
        }
    }
}

/// Writes `body` as one backend receives it: each edit replaces a range of it (the model's name
/// for `model_map`, the `priority` for `engine_priority`). The edits are members of one object,
/// so they never overlap.
fn push_body(out: &mut Vec<u8>, body: &[u8], mut edits: [Option<(Range<usize>, &[u8])>; 2]) {
    edits.sort_by_key(|e| e.as_ref().map(|(at, _)| at.start));
    let mut from = 0;
    for (at, bytes) in edits.into_iter().flatten() {
        out.extend_from_slice(&body[from..at.start]);
        out.extend_from_slice(bytes);
        from = at.end;
    }
    out.extend_from_slice(&body[from..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_pays_for_a_share_of_requests_after_its_reserve() {
        let budget = RetryBudget::new();
        // The reserve: ten retries right after start, then none.
        for _ in 0..10 {
            assert!(budget.has_one());
            assert!(budget.withdraw());
        }
        assert!(!budget.has_one());
        assert!(!budget.withdraw());
        // 20% of requests: five requests pay for one retry.
        for _ in 0..4 {
            budget.deposit(20);
            assert!(!budget.has_one());
        }
        budget.deposit(20);
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
    }

    #[test]
    fn the_budget_never_saves_more_than_its_reserve() {
        let budget = RetryBudget::new();
        for _ in 0..1000 {
            budget.deposit(100);
        }
        let mut paid = 0;
        while budget.withdraw() {
            paid += 1;
        }
        assert_eq!(paid, 10);
    }

    fn pushed(body: &str, edits: [Option<(std::ops::Range<usize>, &str)>; 2]) -> String {
        let mut out = Vec::new();
        push_body(
            &mut out,
            body.as_bytes(),
            edits.map(|e| e.map(|(at, b)| (at, b.as_bytes()))),
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_backend_gets_its_model_name_and_priority_in_one_pass() {
        let body = r#"{"priority":-9,"model":"pub","messages":[]}"#;
        assert_eq!(pushed(body, [None, None]), body);
        // The client's priority (before the model) replaced, the model renamed.
        assert_eq!(
            pushed(body, [Some((24..27, "served")), Some((12..14, "150"))]),
            r#"{"priority":150,"model":"served","messages":[]}"#
        );
        let end = body.len() - 1;
        assert_eq!(
            pushed(body, [Some((end..end, r#","x":1"#)), Some((24..27, "m"))]),
            r#"{"priority":-9,"model":"m","messages":[],"x":1}"#
        );
    }
}
