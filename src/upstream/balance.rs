//! Choosing a backend for one request, on one worker: model routing, affinity, then the
//! configured strategy over the backends that can take the request now (`cache_aware` decides
//! over the shared prefix index of [`super::prefix`]).

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::hash;
use super::pool::{self, ConnectError, UpstreamConn};
use super::preempt;
use super::prefix::{self, PrefixRoute, Reason};
use super::{now_ms, Backend, Backends};
use crate::config::{Affinity, CacheAware, Config, HealthCheck, Strategy};

/// Latency estimates decay with this time constant when a backend gets no traffic, so a backend
/// that was slow once is probed again rather than starved forever.
const LATENCY_DECAY: Duration = Duration::from_secs(10);

/// What the balancer needs to know about a request.
#[derive(Default)]
pub struct PickRequest<'a> {
    pub model: Option<&'a str>,
    pub affinity_key: Option<&'a [u8]>,
    /// Backends already tried by this request (bit i = backend i); avoided while others exist.
    pub tried: u64,
    /// The prompt's raw JSON values in the order a backend renders them, for `cache_aware`.
    pub prompt: &'a [&'a [u8]],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// No backend serves this model at all.
    UnknownModel,
    /// Backends serve it, but none can take a request now (unhealthy, ejected or full).
    NoneAvailable,
    /// With `scheduling`: the backends in the mask are up and serve it, but are saturated;
    /// the request may wait for one of them ([`Backends::scheduler`]).
    Saturated(u64),
}

/// A request counted in flight on a backend, across workers, until dropped.
pub struct InFlight {
    backends: Arc<Backends>,
    pub index: usize,
    /// How `cache_aware` chose the backend, when it did.
    pub route: Option<PrefixRoute>,
    /// Its engine priority level, counted on a backend whose engine preempts ([`preempt`]).
    level: Option<i64>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let b = &self.backends.list[self.index];
        if let (Some(level), Some(levels)) = (self.level, &b.levels) {
            levels.remove(level);
        }
        // Sequentially consistent with the scheduler's count of waiters: either this release
        // sees a request that just started waiting, or that request's offer sees the slot.
        b.in_flight.fetch_sub(1, Ordering::SeqCst);
        Backends::offer(&self.backends, self.index);
    }
}

impl InFlight {
    /// A slot handed over under another config generation's set as the slot of the same
    /// backend in `set`, the set the request was routed by (and is relayed by). `None` when
    /// `set` lacks the backend, which a waiter's grant never does: it waits only for its own.
    pub fn rebase(mut self, set: &Arc<Backends>) -> Option<InFlight> {
        if Arc::ptr_eq(&self.backends, set) {
            return Some(self);
        }
        let id = self.backends.list[self.index].id();
        let index = set.list.iter().position(|b| b.id() == id)?;
        // A grant carries no level (it is counted at one after this), and the count is the
        // same object in both sets: only where the slot is released from changes.
        debug_assert!(self.level.is_none());
        self.backends = set.clone();
        self.index = index;
        Some(self)
    }

    /// Counts the request at engine priority `level` on a backend whose engine preempts, so a
    /// more urgent arrival knows there is something to preempt.
    pub fn at_level(&mut self, level: i64) {
        if let Some(levels) = &self.backends.list[self.index].levels {
            if self.level.is_none() {
                levels.add(level);
                self.level = Some(level);
            }
        }
    }
}

impl Backends {
    /// A slot past `max_in_flight` on one of the backends in `mask` whose engine preempts on
    /// arrival, for a request at engine priority `level` that it would run at once by
    /// preempting a less urgent one ([`preempt::take_past_limit`]).
    pub fn past_limit(backends: &Arc<Backends>, mask: u64, level: i64) -> Option<InFlight> {
        let index = (0..backends.list.len().min(64)).find(|&i| {
            let b = &backends.list[i];
            mask & (1 << i) != 0
                && b.up()
                && b.levels
                    .as_ref()
                    .is_some_and(|levels| preempt::take_past_limit(b, levels, level))
        })?;
        Some(InFlight {
            backends: backends.clone(),
            index,
            route: None,
            level: Some(level),
        })
    }

    /// Hands a free slot of backend `index` to the first request waiting for one (with
    /// `scheduling`); whether one was handed over. The slot is taken here, for the waiter, so no
    /// newcomer can take it in between; for a set a reload replaced, under the limits of the
    /// newest set that kept the backend.
    pub fn offer(backends: &Arc<Backends>, index: usize) -> bool {
        let Some(scheduler) = &backends.scheduler else {
            return false;
        };
        if scheduler.backlog() == 0 {
            return false;
        }
        let newest;
        let (backends, index) = if backends.is_retired() {
            newest = backends.newest_with(index);
            (&newest.0, newest.1)
        } else {
            (backends, index)
        };
        let b = &backends.list[index];
        scheduler.grant(b.id(), || {
            if !b.up() || b.saturated_by_metrics() {
                return None;
            }
            let max = b.max_in_flight.unwrap_or(u32::MAX);
            b.in_flight
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < max).then_some(n + 1)
                })
                .ok()?;
            Some(InFlight {
                backends: backends.clone(),
                index,
                route: None,
                level: None,
            })
        })
    }
}

/// One worker's balancer and pools.
pub struct WorkerUpstreams {
    pub backends: Arc<Backends>,
    strategy: Strategy,
    affinity: Option<Affinity>,
    cache_aware: CacheAware,
    /// The current request's prompt blocks (kept to reuse its allocation).
    blocks: RefCell<Vec<u64>>,
    pub health: HealthCheck,
    pools: Vec<pool::Pool>,
    connect_timeout: Duration,
    /// Smooth weighted round-robin state (nginx's algorithm): one running weight per backend.
    current: RefCell<Vec<i64>>,
    next: Cell<usize>,
    /// Peak-EWMA time to first byte in microseconds, and when it was last updated.
    latency: RefCell<Vec<(f64, Instant)>>,
    rng: Cell<u64>,
    /// Some backend has a tier above 0, or saturation is set: picks go through [`Self::lowest_tier`].
    tiered: bool,
    saturation: f64,
    /// Some backend has `engine_priority`.
    engine_priority: bool,
    /// `scheduling` is on: a request may wait for a saturated backend.
    scheduling: bool,
}

impl WorkerUpstreams {
    pub fn new(backends: Arc<Backends>, config: &Config, worker: usize) -> Self {
        let n = backends.list.len();
        WorkerUpstreams {
            strategy: config.routing.strategy,
            affinity: config.routing.affinity.clone(),
            cache_aware: config.routing.cache_aware.clone(),
            blocks: RefCell::new(Vec::new()),
            health: config.health_check.clone(),
            pools: (0..n)
                .map(|_| {
                    pool::Pool::new(
                        config.upstream.max_idle_per_backend,
                        config.upstream.idle_timeout,
                    )
                })
                .collect(),
            connect_timeout: config.timeouts.connect,
            current: RefCell::new(vec![0; n]),
            next: Cell::new(worker % n.max(1)),
            latency: RefCell::new(vec![(0.0, Instant::now()); n]),
            rng: Cell::new(
                0x9e37_79b9_7f4a_7c15 ^ (worker as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
            ),
            tiered: backends.list.iter().any(|b| b.tier != 0) || config.routing.saturation > 0.0,
            saturation: config.routing.saturation,
            engine_priority: backends.list.iter().any(|b| b.engine_priority.is_some()),
            scheduling: config.scheduling.is_some(),
            backends,
        }
    }

    /// With `cache_aware`: records the request's prompt blocks as sent to backend `index`, for
    /// a request that got there without a pick (a slot handed over after a wait, or one past
    /// the limit), so its conversation's next turn finds the prefix where it is.
    pub fn record_prompt(&self, req: &PickRequest<'_>, index: usize) {
        if self.strategy != Strategy::CacheAware {
            return;
        }
        let blocks = &mut *self.blocks.borrow_mut();
        blocks.clear();
        let model = req.model.unwrap_or_default().as_bytes();
        prefix::chain(model, req.prompt, self.cache_aware.block_bytes, blocks);
        if !blocks.is_empty() {
            self.backends.list[index]
                .blocks
                .record(blocks, prefix::tick(now_ms()));
        }
    }

    /// Some backend schedules by the `priority` the gateway writes (`engine_priority`).
    pub fn engine_priority(&self) -> bool {
        self.engine_priority
    }

    pub fn affinity(&self) -> Option<&Affinity> {
        self.affinity.as_ref()
    }

    pub fn backend(&self, idx: usize) -> &Backend {
        &self.backends.list[idx]
    }

    /// Picks a backend and counts the request in flight on it.
    pub fn pick(&self, req: &PickRequest<'_>) -> Result<InFlight, PickError> {
        let list = &self.backends.list;
        if let Some(model) = req.model {
            if !self.backends.knows_model(model) {
                return Err(PickError::UnknownModel);
            }
        }
        let ejection = self.health.ejection_time;
        let eligible = |i: usize, b: &Backend| {
            b.serves(req.model) && req.tried & (1 << (i % 64)) == 0 && b.admits(ejection)
        };
        let mut candidates: u64 = 0;
        for (i, b) in list.iter().enumerate().take(64) {
            if eligible(i, b) {
                candidates |= 1 << i;
            }
        }
        if candidates == 0 && req.tried != 0 {
            // Every other backend is out: trying one of the same ones again beats failing.
            for (i, b) in list.iter().enumerate().take(64) {
                if b.serves(req.model) && b.admits(ejection) {
                    candidates |= 1 << i;
                }
            }
        }
        if candidates == 0 {
            // Panic mode: every backend for the model rests after failed requests. Resting all
            // of them turns a burst of errors into an outage (with a single backend, the first
            // few 5xx would refuse every client), so those that still answer take traffic
            // anyway; ones refusing connections stay out.
            for (i, b) in list.iter().enumerate().take(64) {
                if b.serves(req.model) && b.answers() {
                    candidates |= 1 << i;
                }
            }
        }
        if candidates == 0 {
            return Err(self.none_available(req));
        }
        let candidates = self.lowest_tier(candidates);
        let blocks = &mut *self.blocks.borrow_mut();
        blocks.clear();
        let cache_aware = self.strategy == Strategy::CacheAware;
        if cache_aware {
            let model = req.model.unwrap_or_default().as_bytes();
            prefix::chain(model, req.prompt, self.cache_aware.block_bytes, blocks);
        }
        let (chosen, route) = match req
            .affinity_key
            .and_then(|key| self.by_affinity(key, candidates))
        {
            Some(chosen) => (chosen, None),
            None => self.by_strategy(candidates, blocks),
        };
        if cache_aware && !blocks.is_empty() {
            list[chosen].blocks.record(blocks, prefix::tick(now_ms()));
        }
        list[chosen].in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(InFlight {
            backends: self.backends.clone(),
            index: chosen,
            route,
            level: None,
        })
    }

    /// Spillover: of `candidates` (all able to take the request), those of the lowest tier that
    /// has one below the saturation score; when every one is saturated, the lowest tier's.
    fn lowest_tier(&self, candidates: u64) -> u64 {
        if !self.tiered {
            return candidates;
        }
        let list = &self.backends.list;
        let saturated = |i: usize| self.saturation > 0.0 && list[i].load_score() >= self.saturation;
        let (mut open, mut open_tier) = (0u64, u8::MAX);
        let (mut any, mut any_tier) = (0u64, u8::MAX);
        for i in (0..list.len().min(64)).filter(|&i| candidates & (1 << i) != 0) {
            let tier = list[i].tier;
            if !saturated(i) {
                if tier < open_tier {
                    (open, open_tier) = (0, tier);
                }
                if tier == open_tier {
                    open |= 1 << i;
                }
            }
            if tier < any_tier {
                (any, any_tier) = (0, tier);
            }
            if tier == any_tier {
                any |= 1 << i;
            }
        }
        if open != 0 {
            open
        } else {
            any
        }
    }

    /// Why no backend could take the request: with `scheduling`, the backends it could wait
    /// for (up, serving its model, not ejected, only saturated).
    fn none_available(&self, req: &PickRequest<'_>) -> PickError {
        if !self.scheduling {
            return PickError::NoneAvailable;
        }
        match self.waitable(req) {
            0 => PickError::NoneAvailable,
            saturated => PickError::Saturated(saturated),
        }
    }

    /// The backends a request may wait for a slot on: up, serving its model, not ejected.
    pub fn waitable(&self, req: &PickRequest<'_>) -> u64 {
        let mut mask = 0u64;
        for (i, b) in self.backends.list.iter().enumerate().take(64) {
            if b.serves(req.model) && b.up() && !b.is_ejected() {
                mask |= 1 << i;
            }
        }
        mask
    }

    /// sgl-router's rule: the least loaded when load is imbalanced; else the backend holding the
    /// longest prefix when it covers `threshold` of the prompt; else the least loaded. Load is
    /// in flight across workers plus the scraped `least_load` score.
    fn by_prefix(&self, blocks: &[u64], candidates: u64) -> (usize, PrefixRoute) {
        let tuning = &self.cache_aware;
        let list = &self.backends.list;
        let load = |i: usize| list[i].load_score() + f64::from(list[i].in_flight());
        let ids = || (0..list.len()).filter(move |&i| candidates & (1 << i) != 0);
        let (min, max) = ids().fold((f64::MAX, 0f64), |(lo, hi), i| {
            (lo.min(load(i)), hi.max(load(i)))
        });
        let route = |reason, chosen: usize, matched: Option<usize>| PrefixRoute {
            reason,
            blocks: blocks.len() as u32,
            matched: matched.unwrap_or_else(|| list[chosen].blocks.matched(blocks)) as u32,
        };
        if prefix::imbalanced(min, max, tuning) {
            let chosen = self.least_by(candidates, load);
            return (chosen, route(Reason::LoadGuard, chosen, None));
        }
        let mut longest = 0;
        let mut holders = 0u64;
        for i in ids() {
            let matched = list[i].blocks.matched(blocks);
            if matched > longest {
                (longest, holders) = (matched, 0);
            }
            if matched == longest {
                holders |= 1 << i;
            }
        }
        if prefix::match_wins(longest, blocks.len(), tuning) {
            let chosen = self.least_by(holders, load);
            (chosen, route(Reason::PrefixMatch, chosen, Some(longest)))
        } else {
            let chosen = self.least_by(candidates, load);
            (chosen, route(Reason::NoMatch, chosen, None))
        }
    }

    /// Rendezvous hashing: the same key maps to the same backend while it stays a candidate, and
    /// only the keys of a backend that leaves move. Yields when that backend is already busier
    /// than the others on average (twice their mean in flight, plus slack).
    fn by_affinity(&self, key: &[u8], candidates: u64) -> Option<usize> {
        let list = &self.backends.list;
        let chosen = (0..list.len())
            .filter(|&i| candidates & (1 << i) != 0)
            .max_by_key(|&i| hash::rendezvous(key, i))?;
        let (sum, n) = (0..list.len())
            .filter(|&i| candidates & (1 << i) != 0)
            .fold((0u32, 0u32), |(s, n), i| (s + list[i].in_flight(), n + 1));
        let mean = sum / n.max(1);
        (list[chosen].in_flight() <= 2 * mean + 2).then_some(chosen)
    }

    /// The strategy's choice, and how `cache_aware` made it. `blocks` are the prompt's.
    fn by_strategy(&self, candidates: u64, blocks: &[u64]) -> (usize, Option<PrefixRoute>) {
        let list = &self.backends.list;
        let ids = || (0..list.len()).filter(move |&i| candidates & (1 << i) != 0);
        let chosen = match self.strategy {
            Strategy::CacheAware => {
                let (chosen, route) = self.by_prefix(blocks, candidates);
                return (chosen, Some(route));
            }
            Strategy::RoundRobin => self.round_robin(candidates),
            Strategy::Weighted => {
                let mut current = self.current.borrow_mut();
                let mut total = 0i64;
                let mut best = usize::MAX;
                for i in ids() {
                    current[i] += i64::from(list[i].weight);
                    total += i64::from(list[i].weight);
                    if best == usize::MAX || current[i] > current[best] {
                        best = i;
                    }
                }
                current[best] -= total;
                best
            }
            Strategy::LeastConnections => {
                self.least_by(candidates, |i| f64::from(list[i].in_flight()))
            }
            Strategy::LeastLoad => {
                // The scrape is up to an interval old: the gateway's own in-flight count keeps a
                // burst from landing on one backend between scrapes.
                self.least_by(candidates, |i| {
                    list[i].load_score() + f64::from(list[i].in_flight())
                })
            }
            Strategy::Latency => {
                // Power of two choices: two distinct candidates, the cheaper wins.
                let n = u64::from(candidates.count_ones());
                let nth = |k: u64| ids().nth(k as usize).unwrap_or(0);
                let first = self.random() % n;
                let a = nth(first);
                let b = nth((first + 1 + self.random() % n.saturating_sub(1).max(1)) % n);
                let cost = |i: usize| self.latency_us(i) * f64::from(list[i].in_flight() + 1);
                if cost(b) < cost(a) {
                    b
                } else {
                    a
                }
            }
        };
        (chosen, None)
    }

    fn round_robin(&self, candidates: u64) -> usize {
        let n = self.backends.list.len();
        let start = self.next.get();
        let chosen = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| candidates & (1 << i) != 0)
            .unwrap_or(0);
        self.next.set(chosen + 1);
        chosen
    }

    /// Lowest score wins; ties rotate so equal backends share the traffic.
    fn least_by(&self, candidates: u64, score: impl Fn(usize) -> f64) -> usize {
        let n = self.backends.list.len();
        let start = self.next.get();
        let mut best = usize::MAX;
        for i in (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| candidates & (1 << i) != 0)
        {
            if best == usize::MAX || score(i) < score(best) {
                best = i;
            }
        }
        self.next.set(best + 1);
        best
    }

    /// The decayed peak-EWMA time to first byte of backend `i`.
    fn latency_us(&self, i: usize) -> f64 {
        let (ewma, at) = self.latency.borrow()[i];
        ewma * (-at.elapsed().as_secs_f64() / LATENCY_DECAY.as_secs_f64()).exp()
    }

    /// Records a time to first byte: a slower sample takes over at once (peak), a faster one
    /// pulls the estimate down gradually.
    pub fn observe_latency(&self, i: usize, ttfb: Duration) {
        let sample = ttfb.as_secs_f64() * 1e6;
        let decayed = self.latency_us(i);
        let ewma = if sample > decayed {
            sample
        } else {
            decayed * 0.7 + sample * 0.3
        };
        self.latency.borrow_mut()[i] = (ewma, Instant::now());
    }

    pub fn random(&self) -> u64 {
        // xorshift64*: plenty for picking two backends.
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A pooled connection when one is fresh, else a new one.
    pub async fn checkout(&self, idx: usize) -> Result<UpstreamConn, ConnectError> {
        if let Some(conn) = self.pools[idx].take() {
            return Ok(conn);
        }
        self.connect(idx).await
    }

    /// Always a new connection (the retry after a stale pooled one failed).
    pub async fn connect(&self, idx: usize) -> Result<UpstreamConn, ConnectError> {
        let backend = self.backend(idx);
        let addr = backend.addr().ok_or(ConnectError::Unresolved)?;
        let conn = UpstreamConn::connect(addr, self.connect_timeout, backend.tls.as_ref()).await;
        if let Err(ConnectError::Tls(e)) = &conn {
            tracing::warn!(backend = %backend.url, "TLS handshake with the backend failed: {e}");
        }
        conn
    }

    /// Returns a connection whose response ended cleanly to its pool.
    pub fn checkin(&self, idx: usize, conn: UpstreamConn) {
        self.pools[idx].put(conn);
    }

    /// Drops pooled connections the backend has probably closed by now.
    pub fn sweep_idle(&self) {
        for p in &self.pools {
            p.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Format};

    /// One worker's balancer over backends `127.0.0.1:9001..` with these weights, and `extra`
    /// config (the strategy, say). Nothing connects: picking is bookkeeping only.
    fn balancer(weights: &[u32], extra: &str) -> WorkerUpstreams {
        let mut yaml = format!("{extra}\nbackends:\n");
        for (i, w) in weights.iter().enumerate() {
            yaml.push_str(&format!(
                "  - url: \"http://127.0.0.1:{}\"\n    weight: {w}\n",
                9001 + i
            ));
        }
        let config = config::parse(&yaml, Format::Yaml).expect("test config");
        WorkerUpstreams::new(Backends::new(&config).unwrap(), &config, 0)
    }

    /// The backend index of one pick, its in-flight count released at once.
    fn pick(up: &WorkerUpstreams, req: &PickRequest<'_>) -> usize {
        up.pick(req).expect("a backend").index
    }

    /// How many of `n` picks (each released at once) went to each backend.
    fn spread(up: &WorkerUpstreams, n: usize) -> Vec<usize> {
        let mut counts = vec![0; up.backends.list.len()];
        for _ in 0..n {
            counts[pick(up, &PickRequest::default())] += 1;
        }
        counts
    }

    fn set_healthy(up: &WorkerUpstreams, i: usize, healthy: bool) {
        up.backends.list[i]
            .healthy
            .store(healthy, Ordering::Relaxed);
    }

    #[test]
    fn weighted_spreads_exactly_by_weight_and_smoothly() {
        let up = balancer(&[5, 3, 1], "load_balance: weighted");
        // Every cycle of 9 picks gives 5, 3 and 1: exact, not just on average.
        for _ in 0..10 {
            assert_eq!(spread(&up, 9), [5, 3, 1]);
        }
        // Smooth: the heavy backend never takes more than two picks in a row here.
        let order: Vec<usize> = (0..9).map(|_| pick(&up, &PickRequest::default())).collect();
        assert!(
            order.windows(3).all(|w| w != [0, 0, 0]),
            "bursty order {order:?}"
        );
    }

    #[test]
    fn weighted_leaves_out_an_unhealthy_backend() {
        let up = balancer(&[5, 3, 1], "load_balance: weighted");
        set_healthy(&up, 0, false);
        assert_eq!(spread(&up, 8), [0, 6, 2]);
    }

    #[test]
    fn round_robin_takes_turns_and_skips_an_unavailable_backend() {
        let up = balancer(&[1, 1, 1], "load_balance: round_robin");
        let order: Vec<usize> = (0..6).map(|_| pick(&up, &PickRequest::default())).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
        set_healthy(&up, 1, false);
        let order: Vec<usize> = (0..4).map(|_| pick(&up, &PickRequest::default())).collect();
        assert_eq!(order, [0, 2, 0, 2]);
    }

    #[test]
    fn a_retry_avoids_the_backends_it_tried() {
        let up = balancer(&[1, 1, 1], "load_balance: round_robin");
        let tried = PickRequest {
            tried: 0b011,
            ..PickRequest::default()
        };
        assert!((0..5).all(|_| pick(&up, &tried) == 2));
    }

    /// Holds a request in flight on backend `i` (every other backend marked tried).
    fn hold(up: &WorkerUpstreams, i: usize) -> InFlight {
        let all = (1u64 << up.backends.list.len()) - 1;
        let held = up
            .pick(&PickRequest {
                tried: all & !(1 << i),
                ..PickRequest::default()
            })
            .expect("a backend");
        assert_eq!(held.index, i);
        held
    }

    #[test]
    fn least_connections_goes_where_fewest_requests_run() {
        let up = balancer(&[1, 1, 1], "load_balance: least_connections");
        let mut held = vec![hold(&up, 0), hold(&up, 0), hold(&up, 1)];
        assert_eq!(spread(&up, 6), [0, 0, 6]);
        // A tie between 1 and 2: they take turns, the busier 0 gets nothing.
        held.push(hold(&up, 2));
        assert_eq!(spread(&up, 6), [0, 3, 3]);
        drop(held);
        assert!(up.backends.list.iter().all(|b| b.in_flight() == 0));
        assert_eq!(spread(&up, 6), [2, 2, 2]);
    }

    #[test]
    fn latency_sends_traffic_to_the_faster_backend() {
        let up = balancer(&[1, 1], "load_balance: latency");
        up.observe_latency(0, Duration::from_millis(200));
        up.observe_latency(1, Duration::from_millis(2));
        // With two candidates both are compared every time: the slow one never wins.
        assert_eq!(spread(&up, 100), [0, 100]);
        // A slow sample takes over at once (peak), so traffic moves the other way.
        up.observe_latency(1, Duration::from_millis(900));
        assert_eq!(spread(&up, 100), [100, 0]);
    }

    fn keyed(key: &[u8]) -> PickRequest<'_> {
        PickRequest {
            affinity_key: Some(key),
            ..PickRequest::default()
        }
    }

    #[test]
    fn affinity_is_stable_for_a_key_and_falls_back_when_its_backend_is_out() {
        let up = balancer(&[1, 1, 1], "load_balance: round_robin");
        let home = pick(&up, &keyed(b"alice"));
        assert!((0..20).all(|_| pick(&up, &keyed(b"alice")) == home));
        // Keys that differ only in their last characters still spread evenly over the backends.
        let keys: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
        let homes: Vec<usize> = keys
            .iter()
            .map(|k| pick(&up, &keyed(k.as_bytes())))
            .collect();
        let per_backend: Vec<usize> = (0..3)
            .map(|b| homes.iter().filter(|&&h| h == b).count())
            .collect();
        assert!(per_backend.iter().all(|&n| n >= 60), "{per_backend:?}");

        // Its backend out: the key moves, and only the keys of that backend move.
        set_healthy(&up, home, false);
        let away = pick(&up, &keyed(b"alice"));
        assert_ne!(away, home);
        assert!((0..5).all(|_| pick(&up, &keyed(b"alice")) == away));
        for (k, &h) in keys.iter().zip(&homes) {
            let now = pick(&up, &keyed(k.as_bytes()));
            if h != home {
                assert_eq!(now, h, "{k} moved although its backend stayed");
            }
        }
        // Back in: the key returns home.
        set_healthy(&up, home, true);
        assert_eq!(pick(&up, &keyed(b"alice")), home);
    }

    #[test]
    fn affinity_yields_when_its_backend_is_far_busier_than_the_others() {
        let up = balancer(&[1, 1, 1], "load_balance: least_connections");
        let key = keyed(b"alice");
        let home = pick(&up, &key);
        // Held requests pile up on the key's backend until it is over twice the mean plus 2.
        let mut held = Vec::new();
        while up.backends.list[home].in_flight() <= 4 {
            let f = up.pick(&key).unwrap();
            assert_eq!(f.index, home);
            held.push(f);
        }
        // 5 in flight against a mean of 1: the key goes to the least busy backend instead.
        assert_ne!(pick(&up, &key), home);
        drop(held);
        assert_eq!(pick(&up, &key), home);
    }

    #[test]
    fn past_the_limit_only_while_a_less_urgent_request_runs_for_each() {
        let config = config::parse(
            "scheduling: {enabled: true}\nbackends:\n  - {url: 'http://127.0.0.1:9001', max_in_flight: 2, engine_priority: sglang}\n  - {url: 'http://127.0.0.1:9002', max_in_flight: 2, engine_priority: vllm}\n",
            Format::Yaml,
        )
        .unwrap();
        let up = WorkerUpstreams::new(Backends::new(&config).unwrap(), &config, 0);
        let backends = &up.backends;
        let fill = |i: usize, level: i64| {
            let mut f = hold(&up, i);
            f.at_level(level);
            f
        };
        // Full with one fresh (50) and one backlogged (0) request each.
        let mut held = vec![fill(0, 50), fill(0, 0), fill(1, 50), fill(1, 0)];
        // vLLM never preempts for an arrival; on SGLang's backend one request of level 0 can
        // make room for one more urgent arrival, and only one.
        assert!(Backends::past_limit(backends, 0b10, 50).is_none());
        assert!(Backends::past_limit(backends, 0b01, 0).is_none());
        let past = Backends::past_limit(backends, 0b11, 50).expect("a slot past the limit");
        assert_eq!((past.index, backends.list[0].in_flight()), (0, 3));
        assert!(Backends::past_limit(backends, 0b01, 50).is_none());
        // A higher band outranks the three below it, two of which still run.
        let high = [0, 1].map(|_| Backends::past_limit(backends, 0b01, 150).expect("room"));
        assert!(Backends::past_limit(backends, 0b01, 150).is_none());
        // Ended requests are uncounted: the backlogged one's end leaves nothing to preempt.
        drop((past, high));
        held.remove(1);
        assert_eq!(backends.list[0].in_flight(), 1);
        assert!(Backends::past_limit(backends, 0b01, 50).is_none());
    }
}
