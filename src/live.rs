//! The running configuration and its generations: the one place where a reload becomes visible
//! to the workers.
//!
//! The reloader (the signal thread, later the admin API) validates a new config, prepares what is
//! shared by all workers (resolved [`Backends`]) and [`Live::publish`]es it. Each worker compares
//! [`Live::generation`] (one atomic load) with the generation it runs, between requests, and only
//! when they differ takes the lock to pick up the new [`Snapshot`]. Requests already running keep
//! the snapshot they started with, so a reload never cuts a connection or a stream.
//!
//! Keys, limits and the usage reporter are part of the snapshot too; Redis-backed rates are built
//! once at start (a change to them logs "restart needed"). This module must not do I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::auth::Auth;
use crate::config::Config;
use crate::limits::LimitSet;
use crate::upstream::Backends;
use crate::usage::UsageSender;

/// Everything a generation of the config shares across workers.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub backends: Arc<Backends>,
    /// Present when `auth` is enabled: keys, providers, quotas.
    pub auth: Option<Arc<Auth>>,
    /// `rate_limit.global`, when it limits anything.
    pub global_limits: Option<Arc<LimitSet>>,
    /// The running usage reporter's channel, when metering is on.
    pub usage: Option<UsageSender>,
    /// The listener's TLS config (`tls`), certificates as read when this generation was made.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

pub struct Live {
    generation: AtomicU64,
    current: Mutex<(u64, Arc<Snapshot>)>,
}

impl Live {
    pub fn new(first: Snapshot) -> Arc<Live> {
        Arc::new(Live {
            generation: AtomicU64::new(0),
            current: Mutex::new((0, Arc::new(first))),
        })
    }

    /// The newest generation number; workers poll this between requests.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The newest snapshot and its generation number, read together.
    pub fn snapshot(&self) -> (u64, Arc<Snapshot>) {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        (current.0, current.1.clone())
    }

    /// Makes `next` the config for new requests on every worker.
    pub fn publish(&self, next: Snapshot) -> u64 {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let generation = current.0 + 1;
        *current = (generation, Arc::new(next));
        self.generation.store(generation, Ordering::Release);
        generation
    }
}
