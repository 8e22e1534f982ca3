//! Choosing a backend for one request, on one worker: model routing, affinity, then the
//! configured strategy over the backends that can take the request now (`cache_aware` decides
//! over the shared prefix index of [`super::prefix`]).

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::hash;
use super::pool::{self, ConnectError, UpstreamConn};
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
}

/// A request counted in flight on a backend, across workers, until dropped.
pub struct InFlight {
    backends: Arc<Backends>,
    pub index: usize,
    /// How `cache_aware` chose the backend, when it did.
    pub route: Option<PrefixRoute>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backends.list[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
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
            backends,
        }
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
            return Err(PickError::NoneAvailable);
        }
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
        })
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
        let addr = self.backend(idx).addr().ok_or(ConnectError::Unresolved)?;
        UpstreamConn::connect(addr, self.connect_timeout).await
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
