//! Upstream: the backends, their addresses, and each worker's keep-alive connections to them.
//!
//! [`Backends`] is shared by every worker (read-mostly, behind an `Arc`); [`WorkerUpstreams`] is
//! one worker's private view: its balancer state and its connection pools, touched only by that
//! worker's thread, so nothing here takes a lock on the request path. This module picks and
//! connects; it never parses HTTP or decides what a client sees.

mod pool;

use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use pool::{ConnectError, UpstreamConn};

use crate::config::{Config, Secret};

/// One configured backend, shared by all workers.
#[derive(Debug)]
pub struct Backend {
    pub url: String,
    /// The same URL, shared cheaply with usage events.
    pub url_shared: Arc<str>,
    pub host_header: String,
    pub path_prefix: String,
    pub weight: u32,
    /// `Bearer <backends[].api_key>`, sent instead of any client credential.
    pub authorization: Option<Secret>,
    host: String,
    port: u16,
    /// Resolved once at start; re-resolved off the worker cores while unresolved.
    addr: RwLock<Option<SocketAddr>>,
}

impl Backend {
    pub fn addr(&self) -> Option<SocketAddr> {
        *self.addr.read().unwrap_or_else(|e| e.into_inner())
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

/// All backends of the running config.
#[derive(Debug)]
pub struct Backends {
    pub list: Vec<Backend>,
}

impl Backends {
    /// Builds the backend list and resolves host names. Names that do not resolve yet are retried
    /// on a background thread (never on a worker) until they do; meanwhile they take no traffic.
    pub fn new(config: &Config) -> Arc<Backends> {
        let list = config
            .backends
            .iter()
            .map(|b| Backend {
                url: b.url.clone(),
                url_shared: Arc::from(b.url.as_str()),
                host_header: b.host_header.clone(),
                path_prefix: b.path_prefix.clone(),
                weight: b.weight,
                authorization: b
                    .api_key
                    .as_ref()
                    .map(|k| Secret(format!("Bearer {}", k.0))),
                host: b.host.clone(),
                port: b.port,
                addr: RwLock::new(None),
            })
            .collect();
        let backends = Arc::new(Backends { list });
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
                    while !pending.is_empty() {
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
        backends
    }
}

/// One worker's balancer and pools.
pub struct WorkerUpstreams {
    pub backends: Arc<Backends>,
    /// Smooth weighted round-robin state (nginx's algorithm): one running weight per backend.
    current: RefCell<Vec<i64>>,
    pools: Vec<pool::Pool>,
    connect_timeout: Duration,
    rr_fallback: Cell<usize>,
}

impl WorkerUpstreams {
    pub fn new(backends: Arc<Backends>, config: &Config) -> Self {
        let n = backends.list.len();
        WorkerUpstreams {
            current: RefCell::new(vec![0; n]),
            pools: (0..n)
                .map(|_| {
                    pool::Pool::new(
                        config.upstream.max_idle_per_backend,
                        config.upstream.idle_timeout,
                    )
                })
                .collect(),
            backends,
            connect_timeout: config.timeouts.connect,
            rr_fallback: Cell::new(0),
        }
    }

    /// Picks the next backend by smooth weighted round-robin among those with an address.
    pub fn pick(&self) -> Option<usize> {
        let mut current = self.current.borrow_mut();
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, b) in self.backends.list.iter().enumerate() {
            if b.addr().is_none() {
                continue;
            }
            let w = i64::from(b.weight);
            current[i] += w;
            total += w;
            if best.is_none_or(|j| current[i] > current[j]) {
                best = Some(i);
            }
        }
        let chosen = best?;
        current[chosen] -= total;
        self.rr_fallback.set(chosen);
        Some(chosen)
    }

    pub fn backend(&self, idx: usize) -> &Backend {
        &self.backends.list[idx]
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
