//! The reporter: owns the threads behind the usage channel. Never runs on a worker core.
//!
//! - One ingest thread receives [`UsageEvent`]s in batches, bills them, counts tokens, calls the
//!   quota hook, writes the batch's records (borrowed from the events) to the spool in one
//!   transaction and nudges the delivery threads. It also prunes the spool.
//! - One delivery thread per reporter reads its backlog from the spool after its own cursor,
//!   delivers, and advances the cursor. Threads, not a scheduler: the clients (ureq, postgres,
//!   mysql, rusqlite) block, so a reporter stuck in a timeout or a long backoff must hold only
//!   its own thread; another reporter's delivery never waits on it.
//!
//! Records are delivered at least once: a crash between delivery and cursor update re-sends,
//! which the webhook's `Idempotency-Key` and the database's unique `request_id` absorb.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::record::{Accounted, Billed};
use super::spool::{Spool, Spooled};
use super::sql::SqlSink;
use super::webhook::WebhookSink;
use super::{UsageEvent, UsageSender};
use crate::api::Api;
use crate::config::{Reporter as ReporterConfig, ReporterKind, UsageHook};

/// Called on the ingest thread with each request's raw key, billed tokens and request body size,
/// before its record is spooled (quota, token-rate and fair-share accounting). Must be quick: it
/// runs once per request.
pub type QuotaHook = Box<dyn Fn(&str, &super::Tokens, u64) + Send>;

/// How often the ingest thread collects events from the channel: each collection is one spool
/// transaction, whose fixed cost is worth spreading over a hundred records or more at load.
const INGEST_TICK: Duration = Duration::from_millis(20);
/// Events taken from the channel per spool transaction, at most.
const MAX_BATCH: usize = 4096;
/// First wait after a failed delivery; doubles per consecutive failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// An idle delivery thread re-reads the spool this often even without a nudge (a row spooled
/// by a previous run, a missed nudge).
const IDLE_POLL: Duration = Duration::from_secs(1);
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// At shutdown, delivery threads keep delivering the backlog for at most this long.
const FINAL_DELIVERY: Duration = Duration::from_secs(5);

/// Counters for the metrics endpoint; all monotonic except `backlog`.
#[derive(Debug, Default)]
pub struct UsageStats {
    /// Records made (and spooled, when reporting is on).
    pub records: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Records with estimated tokens (the backend reported none).
    pub estimated: AtomicU64,
    /// The same counts per API, by [`Api::index`].
    pub by_api: [ApiUsage; Api::ALL.len()],
    /// Events dropped because the channel was full (the counter the workers' senders share).
    pub dropped: Arc<AtomicU64>,
    /// Failed spool writes (each retried until it succeeds).
    pub spool_errors: AtomicU64,
    pub reporters: Vec<ReporterStats>,
}

/// One API's records and tokens.
#[derive(Debug, Default)]
pub struct ApiUsage {
    pub records: AtomicU64,
    pub estimated: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
}

/// One reporter's counters. For webhooks these are the seed's `llmproxy_webhook_success_total`
/// and `llmproxy_webhook_failure_total`.
#[derive(Debug)]
pub struct ReporterStats {
    pub name: String,
    /// "webhook" | "database".
    pub kind: &'static str,
    /// Records delivered.
    pub delivered: AtomicU64,
    /// Failed delivery attempts (one per batch that ended in backoff).
    pub failed: AtomicU64,
    /// Spooled records this reporter has not delivered yet.
    pub backlog: AtomicU64,
}

/// The running reporter. [`Reporter::shutdown`] after the workers have stopped.
pub struct Reporter {
    tx: Sender<UsageEvent>,
    stats: Arc<UsageStats>,
    ingest: JoinHandle<()>,
    delivery: Vec<JoinHandle<()>>,
}

enum Sink {
    Webhook(WebhookSink),
    Sql(SqlSink),
}

impl Sink {
    fn deliver(&mut self, rows: &[Spooled]) -> Result<(), String> {
        match self {
            Sink::Webhook(w) => w.deliver(rows),
            Sink::Sql(s) => s.deliver(rows),
        }
    }
}

impl Reporter {
    /// Opens the spool (failing start-up if it cannot) and starts the threads. With
    /// `hook.enabled` false the reporter only charges keys through `quota` (authentication's
    /// token rates and quotas need usage even when reporting is off): nothing is spooled or
    /// delivered.
    pub fn start(hook: &UsageHook, quota: Option<QuotaHook>) -> io::Result<Reporter> {
        let spool_error = |e: rusqlite::Error| {
            io::Error::other(format!("usage spool {}: {e}", hook.spool_path.display()))
        };
        let spool = hook
            .enabled
            .then(|| Spool::open(&hook.spool_path).map_err(spool_error))
            .transpose()?;
        let reporters = if hook.enabled {
            &hook.reporters[..]
        } else {
            &[]
        };
        let stats = Arc::new(UsageStats {
            reporters: reporters
                .iter()
                .map(|r| ReporterStats {
                    name: r.name.clone(),
                    kind: match r.kind {
                        ReporterKind::Webhook(_) => "webhook",
                        ReporterKind::Database(_) => "database",
                    },
                    delivered: AtomicU64::new(0),
                    failed: AtomicU64::new(0),
                    backlog: AtomicU64::new(0),
                })
                .collect(),
            ..UsageStats::default()
        });

        let mut nudges = Vec::new();
        let mut delivery = Vec::new();
        for (index, config) in reporters.iter().enumerate() {
            let spool = Spool::open(&hook.spool_path).map_err(spool_error)?;
            // Capacity 1: a pending nudge already says "look again".
            let (nudge_tx, nudge_rx) = crossbeam_channel::bounded(1);
            nudges.push(nudge_tx);
            let (config, stats) = (config.clone(), stats.clone());
            delivery.push(
                std::thread::Builder::new()
                    .name(format!("llmproxy-usage-{index}"))
                    .spawn(move || deliver_loop(config, spool, nudge_rx, stats, index))?,
            );
        }

        let (tx, rx) = crossbeam_channel::bounded(hook.channel_capacity);
        let ingest = Ingest {
            rx,
            spool,
            nudges,
            quota,
            stats: stats.clone(),
            include_raw_key: hook.include_raw_key,
            reporters: reporters.iter().map(|r| r.name.clone()).collect(),
            retention: hook.retention,
        };
        let ingest = std::thread::Builder::new()
            .name("llmproxy-usage".into())
            .spawn(move || ingest.run())?;
        Ok(Reporter {
            tx,
            stats,
            ingest,
            delivery,
        })
    }

    /// A sender for one worker's [`crate::proxy::Context`].
    pub fn sender(&self) -> UsageSender {
        UsageSender::new(self.tx.clone(), self.stats.dropped.clone())
    }

    pub fn stats(&self) -> &Arc<UsageStats> {
        &self.stats
    }

    /// Call once every sender is gone (the workers have joined): the ingest thread drains the
    /// channel into the spool and exits; delivery threads then deliver what they can within
    /// [`FINAL_DELIVERY`]. One still inside a slow delivery after that is left behind (the
    /// process is exiting); its rows stay spooled for the next start.
    pub fn shutdown(self) {
        drop(self.tx);
        if self.ingest.join().is_err() {
            tracing::error!("usage ingest thread panicked");
        }
        let deadline = Instant::now() + FINAL_DELIVERY + Duration::from_secs(1);
        while Instant::now() < deadline && !self.delivery.iter().all(JoinHandle::is_finished) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

struct Ingest {
    rx: Receiver<UsageEvent>,
    /// `None` when records only charge keys.
    spool: Option<Spool>,
    nudges: Vec<Sender<()>>,
    quota: Option<QuotaHook>,
    stats: Arc<UsageStats>,
    include_raw_key: bool,
    reporters: Vec<String>,
    retention: Duration,
}

impl Ingest {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // Prune soon after start (checked_sub: an Instant cannot go back before boot).
        let mut last_prune = Instant::now()
            .checked_sub(PRUNE_EVERY)
            .unwrap_or_else(Instant::now);
        loop {
            // Polled, never waited on: a worker's send then never has a sleeping thread to wake,
            // so metering costs the request path no syscall, and batches grow with the load.
            std::thread::sleep(INGEST_TICK);
            let mut disconnected = false;
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(event) => {
                        if let Some(accounted) = self.bill(event) {
                            batch.push(accounted);
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    // Every sender is gone and the channel is empty: shutdown.
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                self.spool_batch(&batch);
                // Exact counts come from the delivery threads; this keeps the gauge current
                // while one is stuck in a slow delivery.
                for r in &self.stats.reporters {
                    r.backlog.fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                batch.clear();
                for nudge in &self.nudges {
                    let _ = nudge.try_send(());
                }
            }
            self.prune(&mut last_prune);
            if disconnected {
                break;
            }
        }
        // Dropping the nudge senders tells the delivery threads to finish.
    }

    /// Counts and charges one request; the event to spool, when records are spooled.
    fn bill(&self, event: UsageEvent) -> Option<Accounted> {
        let billed = Billed::of(&event);
        let s = &self.stats;
        s.records.fetch_add(1, Ordering::Relaxed);
        s.prompt_tokens
            .fetch_add(billed.tokens.prompt, Ordering::Relaxed);
        s.completion_tokens
            .fetch_add(billed.tokens.completion, Ordering::Relaxed);
        let api = &s.by_api[event.api.index()];
        api.records.fetch_add(1, Ordering::Relaxed);
        api.prompt_tokens
            .fetch_add(billed.tokens.prompt, Ordering::Relaxed);
        api.completion_tokens
            .fetch_add(billed.tokens.completion, Ordering::Relaxed);
        if billed.estimated {
            s.estimated.fetch_add(1, Ordering::Relaxed);
            api.estimated.fetch_add(1, Ordering::Relaxed);
        }
        // The record may carry the key masked; charging needs the key itself.
        if let (Some(quota), Some(key)) = (&self.quota, &event.key) {
            quota(&key.api_key, &billed.tokens, event.request_bytes);
        }
        self.spool.is_some().then(|| Accounted::new(event, billed))
    }

    /// Retries until the batch is written: these records exist nowhere else. Meanwhile the
    /// channel fills and further events are dropped (and counted) rather than held in memory.
    fn spool_batch(&mut self, batch: &[Accounted]) {
        let Some(spool) = &mut self.spool else {
            return;
        };
        let records: Vec<_> = batch
            .iter()
            .map(|a| a.record(self.include_raw_key))
            .collect();
        let mut logged = false;
        while let Err(e) = spool.insert(&records) {
            self.stats.spool_errors.fetch_add(1, Ordering::Relaxed);
            if !logged {
                tracing::error!(
                    records = batch.len(),
                    "usage spool write failed, retrying: {e}"
                );
                logged = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn prune(&self, last: &mut Instant) {
        let Some(spool) = &self.spool else {
            return;
        };
        if last.elapsed() < PRUNE_EVERY {
            return;
        }
        *last = Instant::now();
        let names: Vec<&str> = self.reporters.iter().map(String::as_str).collect();
        match spool.prune(&names, self.retention) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "usage spool pruned"),
            Err(e) => tracing::warn!("usage spool prune failed: {e}"),
        }
    }
}

/// `FIRST_BACKOFF * 2^(failures-1)`, capped, with "equal jitter" (a random half of it) so that
/// reporters failing together do not retry in lockstep.
fn backoff(failures: u32, rng: &mut u64) -> Duration {
    let full = FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    // xorshift64: jitter needs no cryptographic randomness.
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let half = full / 2;
    half + half.mul_f64((*rng % 1_000_000) as f64 / 1_000_000.0)
}

fn deliver_loop(
    config: ReporterConfig,
    spool: Spool,
    nudges: Receiver<()>,
    stats: Arc<UsageStats>,
    index: usize,
) {
    let name = config.name.as_str();
    let batch_size = config.batch_size;
    let mut sink = match config.kind {
        ReporterKind::Webhook(w) => Sink::Webhook(WebhookSink::new(w, batch_size)),
        ReporterKind::Database(d) => Sink::Sql(SqlSink::new(d)),
    };
    let stats = &stats.reporters[index];
    let mut rng = (super::spool::now_ms() as u64)
        ^ (std::process::id() as u64).rotate_left(32)
        ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        | 1;
    let mut failures = 0u32;
    // Set once the ingest thread has exited: deliver what is left until then.
    let mut final_deadline: Option<Instant> = None;
    // Since when a batch short of `batch_size` has been waiting for more records.
    let mut short_since: Option<Instant> = None;
    loop {
        if final_deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let backlog = spool.backlog(name).unwrap_or(0);
        stats.backlog.store(backlog, Ordering::Relaxed);
        let linger = if backlog > 0 && backlog < batch_size as u64 && final_deadline.is_none() {
            let since = *short_since.get_or_insert_with(Instant::now);
            config.batch_timeout.saturating_sub(since.elapsed())
        } else {
            Duration::ZERO
        };
        let rows = if linger.is_zero() {
            short_since = None;
            match spool.pending(name, batch_size) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(reporter = name, "usage spool read failed: {e}");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let wait = if !linger.is_zero() {
            linger
        } else if rows.is_empty() {
            if final_deadline.is_some() {
                break;
            }
            IDLE_POLL
        } else {
            match sink.deliver(&rows) {
                Ok(()) => {
                    let last = rows[rows.len() - 1].id;
                    if let Err(e) = spool.ack(name, last) {
                        // Delivered but not recorded: it will be re-sent (idempotently).
                        tracing::error!(reporter = name, "usage cursor update failed: {e}");
                    }
                    stats
                        .delivered
                        .fetch_add(rows.len() as u64, Ordering::Relaxed);
                    if failures > 0 {
                        tracing::info!(reporter = name, "usage delivery recovered");
                    }
                    failures = 0;
                    continue;
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    failures += 1;
                    let wait = backoff(failures, &mut rng);
                    tracing::warn!(
                        reporter = name,
                        records = rows.len(),
                        failures,
                        retry_in_ms = wait.as_millis() as u64,
                        "usage delivery failed: {e}"
                    );
                    if final_deadline.is_some() {
                        break;
                    }
                    wait
                }
            }
        };
        // Sleep until `wait` is over. A nudge (records were spooled) ends an idle wait, and a
        // short batch's wait once the batch is full; never a backoff.
        let until = Instant::now() + wait;
        loop {
            match nudges.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(()) if failures > 0 => continue,
                Ok(()) if linger.is_zero() => break,
                Ok(()) if spool.backlog(name).unwrap_or(0) >= batch_size as u64 => break,
                Ok(()) => continue,
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    if final_deadline.is_none() {
                        final_deadline = Some(Instant::now() + FINAL_DELIVERY);
                    }
                    // During a backoff at shutdown, give up: the rows stay spooled.
                    if failures > 0 {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut rng = 0x1234_5678_9abc_def1;
        for failures in 1..40 {
            let full = FIRST_BACKOFF
                .saturating_mul(1 << (failures - 1).min(16))
                .min(MAX_BACKOFF);
            let d = backoff(failures, &mut rng);
            assert!(d >= full / 2 && d <= full, "{failures}: {d:?}");
        }
    }
}
