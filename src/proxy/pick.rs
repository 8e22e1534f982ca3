//! Phase 7a, pick: runs before each attempt and chooses the backend for it among those that serve
//! the request's model and have not been tried yet ([`crate::upstream`] holds the strategies).
//! The [`InFlight`] it returns counts the request on that backend until it is dropped; its error
//! is what the client gets when no backend can take the request. A `cache_aware` decision is
//! counted in the worker's metrics.
//!
//! With `scheduling`, a request whose backends are all saturated waits here, in its place in
//! the generation's [`crate::schedule::Scheduler`], until a slot is handed to it, its
//! `queue_timeout` passes or its client leaves.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Affinity;
use crate::error::{GatewayError, Overload};
use crate::metrics::{self, WorkerMetrics};
use crate::schedule::{Class, Dispatched, Refusal, Service};
use crate::upstream::{Backends, InFlight, PickError, PickRequest};

use super::client_watch::ClientWatch;

use super::inspect::{RequestInfo, PROMPT_FIELDS};
use super::Generation;
use crate::http::RequestHead;

/// The routing key of `routing.affinity` for this request, if it has one.
pub fn affinity_key<'a>(
    generation: &Generation,
    buf: &'a [u8],
    head: &RequestHead,
    body: &'a [u8],
    info: &RequestInfo,
) -> Option<&'a [u8]> {
    match generation.upstreams.affinity()? {
        Affinity::Header(name) => head.header(buf, name.as_bytes()),
        Affinity::User => info.user.clone().map(|r| &body[r]),
    }
}

/// The raw JSON values of the request's prompt, in [`PROMPT_FIELDS`] order (empty when absent).
pub fn prompt<'a>(body: &'a [u8], info: &RequestInfo) -> [&'a [u8]; PROMPT_FIELDS.len()] {
    std::array::from_fn(|i| &body[info.prompt[i].clone()])
}

/// A backend for the request's model not in its `tried` (a bit per backend index, modulo 64).
pub fn pick(
    generation: &Generation,
    metrics: &WorkerMetrics,
    request: &PickRequest<'_>,
) -> Result<InFlight, GatewayError> {
    let picked = generation
        .upstreams
        .pick(request)
        .map_err(|e| refusal(e, request))?;
    if let Some(route) = picked.route {
        metrics.prefix_route(route);
    }
    Ok(picked)
}

/// What the client gets when no backend can take the request now.
fn refusal(e: PickError, request: &PickRequest<'_>) -> GatewayError {
    match e {
        PickError::UnknownModel => GatewayError::UnknownModel {
            model: request.model.unwrap_or_default().to_owned(),
        },
        PickError::NoneAvailable | PickError::Saturated(_) => GatewayError::NoBackend,
    }
}

/// With `scheduling`: the request's place in the wait for a saturated backend, what it is
/// charged against its key's fair share (its prompt, estimated from its bytes, when dispatched;
/// its answer as it streams; the usage record corrects both), and its engine priority level.
pub struct Queueing {
    pub class: Class,
    /// Charged to its key's counter when first dispatched: its prompt, estimated from its bytes
    /// (its usage record replaces it with what it cost). Its answer is not guessed at: a key
    /// that starts waiting is lifted to the counters of those waiting, so an estimate charged
    /// ahead would count a head start against every key behind it.
    pub estimate: f64,
    /// `scheduling.completion_weight`: what one token of its answer is charged.
    completion_weight: f64,
    /// Content events of its streamed answer charged so far ([`Queueing::charge_streamed`]).
    streamed: Cell<u32>,
    /// For `backends[].engine_priority`: its band, [`LEVEL_FRESH`] above the rest of the band
    /// when its key had nothing at a backend as it arrived (an interactive user's next turn),
    /// which is what a flooding key's requests never are.
    pub level: i64,
    /// Some backend has `engine_priority`, and the request's API and body take the `priority`
    /// it schedules by (chat, completions, responses): only then is it counted at its level, or
    /// sent past a limit.
    prioritized: bool,
    /// Its flow ([`Class::service`], or the scheduler's flow of requests without a key).
    flow: Arc<Service>,
    /// Counts it among its flow's requests at a backend, from its first dispatch.
    dispatched: RefCell<Option<Dispatched>>,
}

/// Levels of one band are [`LEVEL_BAND`] apart; a fresh request is [`LEVEL_FRESH`] above its
/// band. SGLang preempts for a difference above `--priority-scheduling-preemption-threshold`
/// (10 by default), so a fresh request preempts a backlogged one of its band.
const LEVEL_BAND: i64 = 100;
const LEVEL_FRESH: i64 = 50;

impl Queueing {
    pub fn new(
        class: Class,
        estimate: f64,
        completion_weight: f64,
        flow: Arc<Service>,
        prioritized: bool,
    ) -> Queueing {
        let level =
            i64::from(class.priority) * LEVEL_BAND + if flow.is_idle() { LEVEL_FRESH } else { 0 };
        Queueing {
            class,
            estimate,
            completion_weight,
            streamed: Cell::new(0),
            level,
            prioritized,
            flow,
            dispatched: RefCell::new(None),
        }
    }

    /// What its key's counter was charged (0 until dispatched, and for a request without a key).
    pub fn charged(&self) -> f64 {
        match (&self.class.service, self.dispatched.borrow().is_some()) {
            (Some(_), true) => {
                self.estimate + self.completion_weight * f64::from(self.streamed.get())
            }
            _ => 0.0,
        }
    }

    /// Its answer streams and `content_events` of it have been relayed: the ones not charged
    /// yet are charged to its key's counter, one token each (what vLLM sends per event; the
    /// usage record corrects it). As VTC counts each token when it is generated, a key's
    /// running answers rank it behind the others before they end, not seconds after.
    pub fn charge_streamed(&self, content_events: u32) {
        let new = content_events.saturating_sub(self.streamed.get());
        if new == 0 {
            return;
        }
        self.streamed.set(content_events);
        if let Some(service) = &self.class.service {
            service.charge(self.completion_weight * f64::from(new));
        }
    }

    /// The request goes to a backend: its first dispatch charges its estimate to its key's
    /// counter and counts it at a backend (a retry does neither again).
    fn dispatch(&self, in_flight: &mut InFlight) {
        if self.prioritized {
            in_flight.at_level(self.level);
        }
        let mut dispatched = self.dispatched.borrow_mut();
        if dispatched.is_none() {
            if let Some(service) = &self.class.service {
                service.charge(self.estimate);
            }
            *dispatched = Some(self.flow.dispatch());
        }
    }
}

/// [`pick`], or with `scheduling` and every backend for the request saturated, the wait for one
/// of them. `Ok(None)`: the client left while waiting.
pub async fn pick_or_wait(
    generation: &Generation,
    metrics: &WorkerMetrics,
    request: &PickRequest<'_>,
    queueing: Option<&Queueing>,
    watch: &mut ClientWatch<'_>,
) -> Result<Option<InFlight>, GatewayError> {
    let backends = &generation.upstreams.backends;
    let (Some(scheduler), Some(settings), Some(q)) =
        (&backends.scheduler, &generation.config.scheduling, queueing)
    else {
        return pick(generation, metrics, request).map(Some);
    };
    let (mask, returned) = match generation.upstreams.pick(request) {
        // Nobody waits: the common case, as cheap as without scheduling.
        Ok(mut picked) if scheduler.backlog() == 0 => {
            if let Some(route) = picked.route {
                metrics.prefix_route(route);
            }
            q.dispatch(&mut picked);
            return Ok(Some(picked));
        }
        // Room, but others wait (a backend that just looked unsaturated again, or a slot freed
        // an instant ago): the slot goes back to them, and this request takes its place in line.
        Ok(picked) => {
            let mask = generation.upstreams.waitable(request) | 1 << (picked.index % 64);
            (mask, Some(picked))
        }
        Err(PickError::Saturated(mask)) => {
            // An engine that preempts runs a more urgent request at once, unless a request of a
            // higher band waits here: it would go first.
            let first = || {
                scheduler
                    .highest_waiting()
                    .is_none_or(|p| p <= q.class.priority)
            };
            if let Some(mut past) = (q.prioritized && first())
                .then(|| Backends::past_limit(backends, mask, q.level))
                .flatten()
            {
                metrics.past_limit(metrics::band(q.class.priority));
                generation.upstreams.record_prompt(request, past.index);
                q.dispatch(&mut past);
                return Ok(Some(past));
            }
            (mask, None)
        }
        Err(e) => return Err(refusal(e, request)),
    };
    let sheddable = q.class.priority < 0;
    let overloaded = |why| GatewayError::Overloaded {
        why,
        sheddable,
        // A hint only: the queue turns over as requests finish, which nothing here predicts.
        retry_after: settings
            .queue_timeout
            .clamp(Duration::from_secs(1), Duration::from_secs(10)),
    };
    let band = metrics::band(q.class.priority);
    let started = Instant::now();
    let ids = (0..backends.list.len().min(64))
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| backends.list[i].id());
    let wait = match scheduler.enqueue(&q.class, ids) {
        Ok(wait) => wait,
        Err(refusal) => {
            metrics.queue_refused(band);
            return Err(overloaded(refused(refusal)));
        }
    };
    // The slot it had, and any freed while it decided to wait, go to the first in order.
    drop(returned);
    for i in (0..64).filter(|i| mask & (1 << i) != 0) {
        Backends::offer(backends, i);
    }
    let ended = watch
        .race(monoio::time::timeout(settings.queue_timeout, wait))
        .await;
    metrics.queue_wait(band, started.elapsed());
    match ended {
        None => Ok(None),
        Some(Ok(Ok(granted))) => {
            // Handed over under a later config's limits, it is still relayed by this one.
            let mut in_flight = granted.rebase(backends).ok_or(GatewayError::NoBackend)?;
            generation.upstreams.record_prompt(request, in_flight.index);
            q.dispatch(&mut in_flight);
            Ok(Some(in_flight))
        }
        Some(Ok(Err(refusal))) => {
            metrics.queue_refused(band);
            Err(overloaded(refused(refusal)))
        }
        Some(Err(_)) => {
            metrics.queue_refused(band);
            Err(overloaded(Overload::TimedOut))
        }
    }
}

fn refused(refusal: Refusal) -> Overload {
    match refusal {
        Refusal::Full => Overload::QueueFull,
        Refusal::Shed => Overload::Shed,
    }
}
