//! One worker's state, shared by all of its connections: the running config [`Generation`], the
//! metrics block, request ids, the retry budget, and the counts the graceful drain waits on.
//! Single-threaded by design (`Rc`, `Cell`); it must never hold anything another worker writes
//! except through atomics.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::auth::Auth;
use crate::config::Config;
use crate::limits::LimitSet;
use crate::live::{Live, Snapshot};
use crate::metrics::{Registry, WorkerMetrics};
use crate::upstream::WorkerUpstreams;
use crate::usage::UsageSender;

use super::request_id::RequestIds;
use super::retry::RetryBudget;

/// One worker's state shared by all of its connections.
pub struct Context {
    /// Request rates kept in Redis (`rate_limit.storage: redis`), shared by all instances.
    /// Built at start; keys and local limits live in the config [`Generation`].
    pub shared_rates: Option<Arc<crate::limits::RedisRates>>,
    live: Arc<Live>,
    current: RefCell<Rc<Generation>>,
    pub(super) registry: Arc<Registry>,
    worker: usize,
    shutdown: Arc<AtomicBool>,
    active: Cell<usize>,
    opening: Cell<usize>,
    pub(super) ids: RequestIds,
    pub(super) retry_budget: RetryBudget,
}

/// One config generation as a worker runs it. A request holds its `Rc` until it ends, so a
/// reload swaps the config and the upstream pools for new requests only.
pub struct Generation {
    pub number: u64,
    pub config: Arc<Config>,
    pub upstreams: WorkerUpstreams,
    pub auth: Option<Arc<Auth>>,
    pub global_limits: Option<Arc<LimitSet>>,
    /// Present when metering is on (usage reporting, or auth charging tokens).
    pub(super) usage: Option<UsageSender>,
    /// New connections handshake with this (`tls`); `None`: plain HTTP.
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
    /// This worker's Lua state for the generation's policy script (Lua states are not `Send`).
    pub(super) lua: Option<crate::auth::LuaPolicy>,
    /// A policy is configured but this worker has no state for it: requests are refused.
    pub(super) lua_failed: bool,
    /// Metrics label slot of each backend, by backend index.
    pub(super) slots: Vec<usize>,
}

impl Generation {
    fn new(number: u64, snapshot: &Snapshot, registry: &Registry, worker: usize) -> Rc<Generation> {
        let backends = snapshot.backends.clone();
        let slots = backends
            .list
            .iter()
            .map(|b| registry.backend_slot(&b.url))
            .collect();
        // The reloader compiled the script before publishing, so this only fails on a worker
        // that cannot allocate a Lua state; requests then get the policy's 500 rather than a pass.
        let lua = match snapshot.auth.as_ref().and_then(|a| a.lua_policy()) {
            Some(Ok(lua)) => Some(lua),
            Some(Err(e)) => {
                tracing::error!(worker, "lua policy unavailable: {e}");
                None
            }
            None => None,
        };
        let lua_failed =
            lua.is_none() && snapshot.auth.as_ref().is_some_and(|a| a.has_lua_policy());
        Rc::new(Generation {
            number,
            config: snapshot.config.clone(),
            upstreams: WorkerUpstreams::new(backends, &snapshot.config, worker),
            auth: snapshot.auth.clone(),
            global_limits: snapshot.global_limits.clone(),
            usage: snapshot.usage.clone(),
            tls: snapshot.tls.clone(),
            lua,
            lua_failed,
            slots,
        })
    }
}

impl Context {
    pub fn new(
        live: Arc<Live>,
        registry: Arc<Registry>,
        shutdown: Arc<AtomicBool>,
        worker: usize,
    ) -> Self {
        let (number, snapshot) = live.snapshot();
        let current = Generation::new(number, &snapshot, &registry, worker);
        Context {
            shared_rates: None,
            live,
            current: RefCell::new(current),
            registry,
            worker,
            shutdown,
            active: Cell::new(0),
            opening: Cell::new(0),
            ids: RequestIds::new(worker),
            retry_budget: RetryBudget::new(),
        }
    }

    /// The config generation for a new request: one atomic load, plus a lock and new upstream
    /// pools only right after a reload.
    pub fn current(&self) -> Rc<Generation> {
        if self.live.generation() != self.current.borrow().number {
            let (number, snapshot) = self.live.snapshot();
            let next = Generation::new(number, &snapshot, &self.registry, self.worker);
            tracing::debug!(
                worker = self.worker,
                generation = number,
                "worker picked up new config"
            );
            *self.current.borrow_mut() = next;
        }
        self.current.borrow().clone()
    }

    /// This worker's index (0-based).
    pub(super) fn worker(&self) -> usize {
        self.worker
    }

    /// This worker's metrics block (written only by this thread).
    pub fn metrics(&self) -> &WorkerMetrics {
        self.registry.worker(self.worker)
    }

    /// Requests currently being handled on this worker (idle keep-alive connections excluded).
    pub fn active_requests(&self) -> usize {
        self.active.get()
    }

    /// Connections accepted that have not sent (all of) their first request head yet.
    pub fn opening_connections(&self) -> usize {
        self.opening.get()
    }

    /// Client connections open in the whole process (every worker's gauge).
    pub fn open_connections(&self) -> u64 {
        self.registry.open_connections()
    }

    pub(super) fn draining(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }
}

/// Counts an open client connection (the `max_connections` cap), for its whole life.
pub(super) struct ConnectionGuard(Rc<Context>);

impl ConnectionGuard {
    pub(super) fn enter(ctx: &Rc<Context>) -> Self {
        ctx.metrics().connections.inc();
        ConnectionGuard(ctx.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.metrics().connections.dec();
    }
}

/// Counts a connection that has not yet sent its first request, for the drain. Taken when the
/// connection is accepted, before its task first runs: a drain that starts in between must
/// still wait for it.
pub(super) struct OpeningGuard(Rc<Context>);

impl OpeningGuard {
    pub(super) fn enter(ctx: &Rc<Context>) -> Self {
        ctx.opening.set(ctx.opening.get() + 1);
        OpeningGuard(ctx.clone())
    }
}

impl Drop for OpeningGuard {
    fn drop(&mut self) {
        self.0.opening.set(self.0.opening.get() - 1);
    }
}

/// Counts a request as in progress for the graceful-shutdown drain and the in-flight gauge, on
/// every exit path.
pub(super) struct ActiveGuard<'a>(&'a Context);

impl<'a> ActiveGuard<'a> {
    pub(super) fn enter(ctx: &'a Context) -> Self {
        ctx.active.set(ctx.active.get() + 1);
        ctx.metrics().in_flight.inc();
        ActiveGuard(ctx)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
        self.0.metrics().in_flight.dec();
    }
}
