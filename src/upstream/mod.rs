//! Upstream: the backends, their health and load, the choice of one per request, and each
//! worker's keep-alive connections to them.
//!
//! [`Backends`] is shared by every worker (atomics only: health, passive ejection, requests in
//! flight across workers, scraped load). [`WorkerUpstreams`] is one worker's private view: its
//! balancer state (round-robin position, latency estimates) and its connection pools, touched only
//! by that worker's thread. Health checks and load scraping run on one background thread per
//! process ([`checker`]), never on a worker. This module picks and connects; it never parses
//! client HTTP or decides what a client sees.

mod balance;
mod checker;
mod hash;
mod pool;
mod preempt;
mod prefix;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

pub use balance::{InFlight, PickError, PickRequest, WorkerUpstreams};
pub use checker::spawn_checker;
pub use pool::{ConnectError, UpstreamConn};
pub use prefix::{PrefixRoute, Reason as PrefixReason};

use crate::schedule::Scheduler;

use crate::config::{Config, EnginePriority, HealthCheck, Secret, Strategy};
use prefix::BlockIndex;

/// Milliseconds since the process started: a clock every thread can compare through atomics.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One configured backend, shared by all workers.
#[derive(Debug)]
pub struct Backend {
    pub url: String,
    /// The same URL, shared cheaply with usage events.
    pub url_shared: Arc<str>,
    pub host_header: String,
    pub path_prefix: String,
    pub weight: u32,
    /// Models served; empty means any.
    pub models: Vec<String>,
    /// `backends[].headers`, preformatted as header lines for the upstream request.
    pub extra_headers: Vec<u8>,
    pub max_in_flight: Option<u32>,
    /// `Bearer <backends[].api_key>`, sent instead of any client credential.
    pub authorization: Option<Secret>,
    /// Set for an https backend.
    pub tls: Option<crate::tls::Upstream>,
    /// Spillover tier (`backends[].tier`).
    pub tier: u8,
    /// `backends[].model_map`: request model -> the name sent to this backend.
    model_map: Vec<(String, String)>,
    /// `backends[].engine_priority`: how its engine reads a request's `priority` field.
    pub engine_priority: Option<EnginePriority>,
    /// Its requests in flight by engine priority level, when its engine preempts on arrival;
    /// shared with the next config generation like `in_flight`.
    levels: Option<Arc<preempt::Levels>>,
    host: String,
    port: u16,
    /// Resolved once at start; re-resolved off the worker cores while unresolved.
    addr: RwLock<Option<SocketAddr>>,
    /// Verdict of the active health check (true until a check says otherwise).
    healthy: AtomicBool,
    /// Passive ejection: consecutive failed requests, and until when the backend rests.
    failures: AtomicU32,
    ejected_until: AtomicU64,
    /// The last failure was a connection that could not be made (not a bad answer).
    unreachable: AtomicBool,
    /// Requests in flight to this backend from all workers, of every config generation: a
    /// reload that keeps the backend (same URL) shares the count, so requests still running
    /// on the old config keep counting against `max_in_flight`.
    in_flight: Arc<AtomicU32>,
    /// `least_load` score from the backend's metrics (f64 bits); lower is less loaded.
    load: AtomicU64,
    /// Scraped `vllm:num_requests_waiting` and KV-cache use (per mille), for `scheduling`.
    waiting: AtomicU32,
    kv_milli: AtomicU32,
    /// `scheduling.saturation`: at or past either, the backend takes no new request
    /// (`u32::MAX`: that check is off). Both off without scheduling.
    max_waiting: u32,
    max_kv_milli: u32,
    /// The prompt blocks `cache_aware` sent here; empty with other strategies.
    blocks: BlockIndex,
}

impl Backend {
    /// The same for this backend in every config generation that kept it (its shared count),
    /// so a request waiting under one config is handed a slot freed under another.
    pub fn id(&self) -> u64 {
        Arc::as_ptr(&self.in_flight) as u64
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        *self.addr.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Resting after consecutive failures (passive health); read by metrics and the admin API.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    pub fn serves(&self, model: Option<&str>) -> bool {
        match model {
            Some(m) if !self.models.is_empty() => {
                self.models.iter().any(|s| s == m) || self.mapped_model(m).is_some()
            }
            _ => true,
        }
    }

    /// The name `model` is sent under to this backend, when its `model_map` renames it.
    pub fn mapped_model(&self, model: &str) -> Option<&str> {
        self.model_map
            .iter()
            .find(|(from, _)| from == model)
            .map(|(_, to)| to.as_str())
    }

    fn full(&self) -> bool {
        self.max_in_flight
            .is_some_and(|max| self.in_flight() >= max)
    }

    /// Its scraped queue or KV-cache use reached `scheduling.saturation`.
    fn saturated_by_metrics(&self) -> bool {
        // Without thresholds (scheduling off) nothing is loaded: the pick costs what it did.
        (self.max_waiting, self.max_kv_milli) != (u32::MAX, u32::MAX)
            && (self.waiting.load(Ordering::Relaxed) >= self.max_waiting
                || self.kv_milli.load(Ordering::Relaxed) >= self.max_kv_milli)
    }

    /// No room for another request: at `max_in_flight`, or saturated by its metrics.
    fn saturated(&self) -> bool {
        self.full() || self.saturated_by_metrics()
    }

    fn load_score(&self) -> f64 {
        f64::from_bits(self.load.load(Ordering::Relaxed))
    }

    /// Resolved, passing its active checks and not saturated: passive ejection aside, able to
    /// take a request.
    fn available(&self) -> bool {
        self.up() && !self.saturated()
    }

    /// Resolved and passing its active checks, full or not.
    fn up(&self) -> bool {
        self.addr().is_some() && self.is_healthy()
    }

    /// Ejected for bad answers, not for refusing connections: it is up, only failing.
    fn answers(&self) -> bool {
        self.available() && !self.unreachable.load(Ordering::Relaxed)
    }

    /// Whether a request may go here now. After an ejection has rested, exactly one caller wins
    /// the trial request (half-open); the others see the backend as ejected for another period.
    fn admits(&self, ejection: Duration) -> bool {
        if !self.available() {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = now_ms();
        now >= until
            && self
                .ejected_until
                .compare_exchange(
                    until,
                    now + ejection.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Passive health: the outcome of one request.
    pub fn record(&self, outcome: Passive, policy: &HealthCheck) {
        if outcome == Passive::Ok {
            self.failures.store(0, Ordering::Relaxed);
            if self.ejected_until.swap(0, Ordering::Relaxed) != 0 {
                tracing::info!(backend = %self.url, "backend recovered; taking traffic again");
            }
            return;
        }
        self.unreachable
            .store(outcome == Passive::Unreachable, Ordering::Relaxed);
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if policy.max_failures > 0 && failures >= policy.max_failures {
            let until = now_ms() + policy.ejection_time.as_millis() as u64;
            if self.ejected_until.swap(until, Ordering::Relaxed) == 0 {
                tracing::warn!(backend = %self.url, failures, "backend ejected after consecutive failures");
                // It may come back restarted, its cache empty.
                self.blocks.clear();
            }
        }
    }

    fn resolve(&self) -> bool {
        let found = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut it| it.next());
        if let Some(a) = found {
            *self.addr.write().unwrap_or_else(|e| e.into_inner()) = Some(a);
        }
        found.is_some()
    }
}

/// What one request says about its backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passive {
    Ok,
    /// It answered, badly: a 5xx, a broken or malformed response, a timeout.
    Failed,
    /// No connection could be made.
    Unreachable,
}

/// All backends of the running config, plus what the checker threads learn about them.
#[derive(Debug)]
pub struct Backends {
    pub list: Vec<Backend>,
    /// Public model name -> served name.
    pub aliases: Vec<(String, String)>,
    /// Merged `/v1/models` answer, refreshed by the model-list thread; `None` until it has one.
    models_json: RwLock<Option<Arc<[u8]>>>,
    /// Set when a reload replaced this set: its checker and resolver threads end.
    retired: AtomicBool,
    /// Requests waiting for a slot when every backend for them is saturated: the process's
    /// one queue, from the first config with `scheduling` on, kept by every later set (a
    /// config that turns it off only lets the queue drain).
    pub scheduler: Option<Arc<Scheduler<InFlight>>>,
    /// The sets of this process still alive, in the order they were built, shared by them all:
    /// a slot that a request of a replaced set frees is handed over under the newest set's
    /// limits.
    generations: Arc<Mutex<Vec<Weak<Backends>>>>,
}

impl Backends {
    /// Builds the backend list and resolves host names. Names that do not resolve yet are retried
    /// on a background thread (never on a worker) until they do; meanwhile they take no traffic.
    /// Fails when an https backend's certificate files do not load.
    pub fn new(config: &Config) -> Result<Arc<Backends>, String> {
        Backends::after(config, None)
    }

    /// [`Backends::new`] for a reload: a backend a set still alive also has (same URL: the
    /// running set's, or one an earlier reload dropped that still has requests running) shares
    /// its count of requests in flight (and by level), so the requests still running on the
    /// old config count against the limits of the new one.
    pub fn after(config: &Config, previous: Option<&Backends>) -> Result<Arc<Backends>, String> {
        // Newest set first, each backend's count once.
        let alive: Vec<Arc<Backends>> = previous.map_or_else(Vec::new, |p| {
            let sets = p.generations.lock().unwrap_or_else(|e| e.into_inner());
            sets.iter().rev().filter_map(Weak::upgrade).collect()
        });
        let mut carried: Vec<&Backend> = Vec::new();
        for b in alive.iter().flat_map(|set| &set.list) {
            if !carried.iter().any(|c| c.id() == b.id()) {
                carried.push(b);
            }
        }
        let index_blocks = match config.routing.strategy {
            Strategy::CacheAware => config.routing.cache_aware.index_blocks,
            _ => 0,
        };
        let scheduling = config.scheduling.as_ref();
        let max_waiting = scheduling.and_then(|s| s.max_waiting).unwrap_or(u32::MAX);
        let max_kv_milli = scheduling
            .and_then(|s| s.max_kv_cache)
            .map_or(u32::MAX, |k| (k * 1000.0).round() as u32);
        let list = config
            .backends
            .iter()
            .enumerate()
            .map(|(index, b)| {
                let tls = b
                    .tls
                    .as_ref()
                    .map(|tls| crate::tls::upstream(index, &b.host, tls))
                    .transpose()?;
                let mut extra_headers = Vec::new();
                for (n, v) in &b.headers {
                    crate::http::push_header(&mut extra_headers, n.as_bytes(), v.as_bytes());
                }
                // The same backend in a set still alive, the newest first (each matched once).
                let same = carried.iter().position(|old| old.url == b.url);
                let same = same.map(|i| carried.remove(i));
                let shared_in_flight =
                    same.map_or_else(Default::default, |old| old.in_flight.clone());
                let shared_levels = same.and_then(|old| old.levels.clone());
                Ok(Backend {
                    url: b.url.clone(),
                    url_shared: Arc::from(b.url.as_str()),
                    host_header: b.host_header.clone(),
                    path_prefix: b.path_prefix.clone(),
                    weight: b.weight,
                    models: b.models.clone(),
                    extra_headers,
                    authorization: b
                        .api_key
                        .as_ref()
                        .map(|k| Secret(format!("Bearer {}", k.0))),
                    max_in_flight: b.max_in_flight,
                    host: b.host.clone(),
                    port: b.port,
                    addr: RwLock::new(None),
                    healthy: AtomicBool::new(true),
                    failures: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                    unreachable: AtomicBool::new(false),
                    in_flight: shared_in_flight,
                    load: AtomicU64::new(0f64.to_bits()),
                    waiting: AtomicU32::new(0),
                    kv_milli: AtomicU32::new(0),
                    max_waiting,
                    max_kv_milli,
                    blocks: BlockIndex::new(index_blocks),
                    tls,
                    tier: b.tier,
                    model_map: b.model_map.clone(),
                    engine_priority: b.engine_priority,
                    levels: b.engine_priority.filter(|e| e.preempts()).map(|_| {
                        shared_levels.unwrap_or_else(|| Arc::new(preempt::Levels::default()))
                    }),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        // The running queue, when there is one (its `max_queue` is set when this set is
        // published: a refused reload changes nothing).
        let scheduler = previous
            .and_then(|p| p.scheduler.clone())
            .or_else(|| scheduling.map(|s| Arc::new(Scheduler::new(s.max_queue))));
        let backends = Arc::new(Backends {
            list,
            aliases: config.model_aliases.clone(),
            models_json: RwLock::new(None),
            retired: AtomicBool::new(false),
            scheduler,
            generations: previous.map_or_else(Default::default, |p| p.generations.clone()),
        });
        backends
            .generations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&backends));
        let unresolved: Vec<usize> = (0..backends.list.len())
            .filter(|&i| !backends.list[i].resolve())
            .collect();
        if !unresolved.is_empty() {
            for &i in &unresolved {
                tracing::warn!(backend = %backends.list[i].url, "backend host does not resolve yet; retrying in the background");
            }
            let shared = backends.clone();
            let spawned = std::thread::Builder::new()
                .name("llmproxy-resolve".into())
                .spawn(move || {
                    let mut pending = unresolved;
                    while !pending.is_empty() && !shared.is_retired() {
                        std::thread::sleep(Duration::from_secs(2));
                        pending.retain(|&i| {
                            let ok = shared.list[i].resolve();
                            if ok {
                                tracing::info!(backend = %shared.list[i].url, "backend resolved");
                            }
                            !ok
                        });
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start resolver thread: {e}");
            }
        }
        Ok(backends)
    }

    /// The newest set of this process that has backend `index` of this one (the same backend,
    /// kept by the reloads since), and its index there: whose limits a slot of it is handed
    /// over under.
    fn newest_with(self: &Arc<Self>, index: usize) -> (Arc<Backends>, usize) {
        let id = self.list[index].id();
        let mut sets = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        sets.retain(|s| s.strong_count() > 0);
        sets.iter()
            .rev()
            .filter_map(Weak::upgrade)
            .find_map(|set| {
                let j = set.list.iter().position(|b| b.id() == id)?;
                Some((set, j))
            })
            .unwrap_or_else(|| (self.clone(), index))
    }

    /// Ends this set's background threads (a reload published a new one).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// The served name for a public model name, when it is an alias.
    pub fn alias(&self, model: &str) -> Option<&str> {
        self.aliases
            .iter()
            .find(|(public, _)| public == model)
            .map(|(_, served)| served.as_str())
    }

    /// Whether some backend could serve `model` (ignoring health): otherwise it is unknown.
    pub fn knows_model(&self, model: &str) -> bool {
        self.list.iter().any(|b| b.serves(Some(model)))
    }

    /// The gateway's own `/v1/models` answer, once the checker has merged the backends' lists.
    pub fn models_json(&self) -> Option<Arc<[u8]>> {
        self.models_json
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_models_json(&self, json: Vec<u8>) {
        *self.models_json.write().unwrap_or_else(|e| e.into_inner()) = Some(json.into());
    }
}
