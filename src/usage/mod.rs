//! Usage metering: what each request consumed, captured on the relay path and delivered to the
//! reporters (spool, webhook, SQL) by one reporter thread.
//!
//! Worker side ([`Meter`], [`UsageEvent`], [`UsageSender`]): capture bytes while relaying and hand
//! one event per request to a bounded channel; never parse, never block, never do I/O. With
//! `durability: sync` a request also gets a [`Committed`] future to await before its last bytes
//! (`commit`). Everything else happens on the reporter's threads ([`Reporter`]): parsing usage
//! into a [`Record`] (`record`), the SQLite outbox (`spool`), and delivery (`batch`, `webhook`,
//! `sql`).

mod batch;
mod commit;
mod delivery;
mod meter;
mod record;
mod reporter;
pub mod spool;
mod sql;
mod webhook;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::api::Api;

pub use commit::{Commits, Committed, Ticket};
pub use meter::{Captured, Meter};
pub use record::{parse_usage, Accounted, Billed, Record, Tokens, UsageRecord};
pub use reporter::{QuotaHook, Reporter, ReporterStats, UsageStats};
pub use spool::Spool;

/// The status of a request whose client left before the backend answered: nginx's "client
/// closed request". Such a request is not an error answer: it is billed what was relayed.
pub const CLIENT_CLOSED: u16 = 499;

/// How the request ended, as billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response reached the client completely.
    Completed,
    /// The client disconnected first; tokens relayed so far are billed.
    Cancelled,
    /// The backend failed (mid-response or before it).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "ok",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "error",
        }
    }
}

/// The authenticated key behind a request, as the reporter needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    pub name: String,
    pub user_id: Option<String>,
    /// The raw key: what quotas charge, and what records show with `include_raw_key`.
    pub api_key: String,
    /// What records show otherwise: masked once per key, not once per request.
    masked_key: String,
}

impl KeyRef {
    pub fn new(name: String, user_id: Option<String>, api_key: String) -> KeyRef {
        KeyRef {
            masked_key: crate::redact::mask_key(&api_key),
            name,
            user_id,
            api_key,
        }
    }

    pub fn masked_key(&self) -> &str {
        &self.masked_key
    }
}

/// Everything a worker knows about one finished request that reached a backend.
#[derive(Debug, Clone)]
pub struct UsageEvent {
    /// The gateway's id for the request: unique, whatever the client sent.
    pub request_id: String,
    /// The client's `X-Request-Id`, when it sent one.
    pub client_request_id: Option<String>,
    pub started_at: SystemTime,
    pub key: Option<Arc<KeyRef>>,
    pub model: Option<String>,
    pub endpoint: String,
    /// The API of `endpoint`: how its usage is read and its output estimated.
    pub api: Api,
    pub is_stream: bool,
    pub backend_url: Arc<str>,
    /// The backend's spillover tier.
    pub tier: u8,
    /// The backend's status, or [`CLIENT_CLOSED`] when the client left before it answered.
    pub status_code: u16,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub outcome: Outcome,
    pub captured: Captured,
    /// SSE events relayed that carried generated output: the completion estimate of a stream
    /// whose backend reports no usage.
    pub content_events: u32,
    /// Request body size: the prompt estimate (bytes / 4) when the backend reports no usage.
    pub request_bytes: u64,
    /// With `scheduling`: the estimate its key's fair-share counter was charged when the
    /// request was dispatched, which its billed tokens replace.
    pub fair_share_charged: f64,
}

/// What travels from a worker to the ingest thread: the event, and its number when the worker
/// waits for its commit.
pub type Sent = (UsageEvent, Option<Ticket>);

/// The workers' end of the channel to the reporter thread.
#[derive(Clone)]
pub struct UsageSender {
    tx: crossbeam_channel::Sender<Sent>,
    dropped: Arc<AtomicU64>,
    /// `durability: sync` with a spool: the commit marks requests wait on.
    commits: Option<Arc<Commits>>,
}

impl UsageSender {
    pub fn new(
        tx: crossbeam_channel::Sender<Sent>,
        dropped: Arc<AtomicU64>,
        commits: Option<Arc<Commits>>,
    ) -> Self {
        UsageSender {
            tx,
            dropped,
            commits,
        }
    }

    /// `durability: sync`: [`UsageSender::send`] gives a future to wait on.
    pub fn waits_for_commit(&self) -> bool {
        self.commits.is_some()
    }

    /// Never blocks: a full channel drops the event, counts it and logs (every 1000th drop).
    /// With `durability: sync`, the future that completes once the record is committed to the
    /// spool (`worker`: the sending worker's index); `None` when there is nothing to wait for.
    pub fn send(&self, worker: usize, event: UsageEvent) -> Option<Committed> {
        let ticket = self.commits.as_ref().map(|c| c.next(worker));
        if self.tx.try_send((event, ticket)).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            if n % 1000 == 0 {
                tracing::error!(dropped = n + 1, "usage channel full: usage events dropped");
            }
            return None;
        }
        Some(self.commits.as_ref()?.wait(ticket?))
    }
}
