//! Provider look-ups off the worker cores, and their cache.
//!
//! A worker that misses the cache marks the key pending, hands the job to a small pool of std
//! threads and awaits the answer as a future; the thread fills the cache and wakes every waiter
//! (monoio's `sync` feature lets a foreign thread wake a worker). Concurrent misses for one key
//! share one look-up. Answers are cached with TTLs (shorter for unknown keys); while a provider
//! fails, the last answer is used for `stale_if_error`, and with nothing to fall back on the
//! request gets "unavailable" (503), never "unknown key".

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::KeyEntry;
use crate::config::CacheConfig;

/// What the pipeline found for a key: one entry per deciding provider; empty: unknown key.
pub type Found = Arc<[Arc<KeyEntry>]>;

/// How soon a failed look-up is tried again.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);
/// A look-up pending this long is presumed hung and started again.
const STALLED: Duration = Duration::from_secs(3);
/// Above this many cached keys, expired ones are dropped (bounds memory under random keys).
const MAX_ENTRIES: usize = 100_000;

pub struct Job {
    /// Where the answer is cached: the key, plus the client IP when a provider decides per IP.
    pub slot: String,
    pub key: String,
    pub ip: String,
    pub method: String,
    pub path: String,
}

enum Slot {
    Ready {
        value: Found,
        fresh_until: Instant,
        stale_until: Instant,
    },
    Pending {
        waiters: Vec<Waker>,
        stale: Option<(Found, Instant)>,
        started: Instant,
    },
    Failed {
        until: Instant,
    },
}

pub struct Cache {
    map: Mutex<HashMap<String, Slot>>,
    config: CacheConfig,
}

impl Cache {
    pub fn new(config: CacheConfig) -> Cache {
        Cache {
            map: Mutex::new(HashMap::new()),
            config,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets every cached answer (a key was deleted: it must stop working now, not at its TTL).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The cached answer for `slot` while it is fresh: the common case, answered without
    /// building a look-up job.
    pub fn fresh(&self, slot: &str) -> Option<Found> {
        match self.lock().get(slot) {
            Some(Slot::Ready {
                value, fresh_until, ..
            }) if Instant::now() < *fresh_until => Some(value.clone()),
            _ => None,
        }
    }

    /// Resolves to the cached or looked-up answer; `None` when the providers are unavailable.
    pub fn resolve<'a>(&'a self, jobs: &'a Sender<Job>, job: Job) -> Resolve<'a> {
        Resolve {
            cache: self,
            jobs,
            job: Some(job),
            key: String::new(),
        }
    }

    /// Called by a look-up thread with the pipeline's answer (or its failure) for `key` (a slot).
    pub fn complete(&self, key: &str, result: Result<Found, String>) {
        let now = Instant::now();
        let mut map = self.lock();
        let (waiters, stale) = match map.remove(key) {
            Some(Slot::Pending { waiters, stale, .. }) => (waiters, stale),
            _ => (Vec::new(), None),
        };
        let slot = match result {
            Ok(value) => {
                let ttl = if value.is_empty() {
                    self.config.negative_ttl
                } else {
                    self.config.ttl
                };
                Slot::Ready {
                    value,
                    fresh_until: now + ttl,
                    stale_until: now + ttl + self.config.stale_if_error,
                }
            }
            Err(e) => {
                tracing::warn!(
                    key = %crate::redact::mask_key(key),
                    serving_stale = stale.is_some(),
                    "auth provider look-up failed: {e}"
                );
                match stale {
                    Some((value, stale_until)) => Slot::Ready {
                        value,
                        fresh_until: now + RETRY_AFTER_ERROR,
                        stale_until,
                    },
                    None => Slot::Failed {
                        until: now + RETRY_AFTER_ERROR,
                    },
                }
            }
        };
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, s| match s {
                Slot::Ready { stale_until, .. } => *stale_until > now,
                Slot::Pending { .. } => true,
                Slot::Failed { until } => *until > now,
            });
        }
        map.insert(key.to_string(), slot);
        drop(map);
        for w in waiters {
            w.wake();
        }
    }
}

pub struct Resolve<'a> {
    cache: &'a Cache,
    jobs: &'a Sender<Job>,
    /// Sent on the first miss; afterwards only `key` is needed.
    job: Option<Job>,
    key: String,
}

impl Future for Resolve<'_> {
    type Output = Option<Found>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Found>> {
        let this = self.get_mut();
        let key = this
            .job
            .as_ref()
            .map_or(this.key.as_str(), |j| j.slot.as_str());
        let now = Instant::now();
        let mut map = this.cache.lock();
        let stale = match map.get_mut(key) {
            Some(Slot::Ready {
                value, fresh_until, ..
            }) if now < *fresh_until => return Poll::Ready(Some(value.clone())),
            Some(Slot::Failed { until }) if now < *until => return Poll::Ready(None),
            // A look-up stuck past STALLED (a hung connection) is started again by a new
            // request; the old thread's answer, if it ever comes, still completes the slot.
            Some(Slot::Pending {
                waiters, started, ..
            }) if this.job.is_none() || now.duration_since(*started) < STALLED => {
                if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    waiters.push(cx.waker().clone());
                }
                return Poll::Pending;
            }
            Some(Slot::Pending { stale, .. }) => stale.take(),
            Some(Slot::Ready {
                value, stale_until, ..
            }) if now < *stale_until => Some((value.clone(), *stale_until)),
            _ => None,
        };
        // A miss (or an expired answer): this request starts the one look-up for the key.
        let Some(job) = this.job.take() else {
            // Our look-up finished and its answer already expired: report it unavailable
            // rather than loop.
            return Poll::Ready(stale.map(|(v, _)| v));
        };
        let mut waiters = vec![cx.waker().clone()];
        if let Some(Slot::Pending {
            waiters: earlier, ..
        }) = map.remove(&job.slot)
        {
            waiters.extend(earlier);
        }
        map.insert(
            job.slot.clone(),
            Slot::Pending {
                waiters,
                stale,
                started: now,
            },
        );
        this.key = job.slot.clone();
        drop(map);
        if let Err(e) = this.jobs.send(job) {
            this.cache
                .complete(&e.0.slot, Err("look-up threads are gone".into()));
        }
        Poll::Pending
    }
}
