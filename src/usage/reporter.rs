//! The reporter: owns the threads behind the usage channel. Never runs on a worker core.
//!
//! - One ingest thread receives [`UsageEvent`]s in batches, bills them, counts tokens, calls the
//!   quota hook, and writes the batch's records (borrowed from the events) to the spool in one
//!   transaction: a group commit for every worker's records of the moment. Then it raises the
//!   workers' commit marks (`durability: sync`, [`super::commit`]) and hands the batch, in
//!   memory, to every delivery thread. It also prunes the spool.
//! - One delivery thread per reporter ([`super::delivery`]) delivers those batches and reads the
//!   spool only to catch up (after an outage, a restart, a batch it had no room for).
//! - One checkpoint thread copies the WAL into the database file every [`CHECKPOINT_RECORDS`]
//!   records (with an fsync): a checkpoint on the ingest thread would hold every commit, and
//!   with `durability: sync` every response, for its duration.
//!
//! Records are delivered at least once: a crash between delivery and cursor update re-sends,
//! which the webhook's `Idempotency-Key` and the database's unique `request_id` absorb.
//!
//! What a spooled record survives: the spool runs in WAL mode with `synchronous=NORMAL`, so a
//! commit is a write(2) into the WAL, in the OS page cache, and no fsync: it survives the
//! process being killed (kill -9, OOM, panic) but not an OS crash or power loss, which can lose
//! the commits since the last checkpoint (the database itself stays consistent).

use std::io;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::batch::Batch;
use super::commit::Commits;
use super::delivery::{self, Delivery};
use super::record::{Accounted, Billed};
use super::spool::{Rows, Spool};
use super::{Sent, UsageSender};
use crate::api::Api;
use crate::config::{Durability, ReporterKind, UsageHook};

/// Called on the ingest thread with each request's raw key, billed tokens and what the
/// request was charged against its key's fair share when dispatched, before its record is
/// spooled (quota, token-rate and fair-share accounting). Must be quick: it runs once per
/// request.
pub type QuotaHook = Box<dyn Fn(&str, &super::Tokens, f64) + Send>;

/// With `durability: async`, how often the ingest thread collects events from the channel:
/// each collection is one spool transaction, whose fixed cost is worth spreading over a
/// hundred records or more at load, and a worker's send never has a sleeping thread to wake.
/// With `sync` it waits on the channel instead: a response's last bytes wait for the commit.
const INGEST_TICK: Duration = Duration::from_millis(20);
/// Events taken from the channel per spool transaction, at most.
const MAX_BATCH: usize = 4096;
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Records spooled between two checkpoints: about SQLite's 10,000 WAL pages (~40 MiB).
const CHECKPOINT_RECORDS: usize = 40_000;

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

/// The running reporter. [`Reporter::shutdown`] after the workers have stopped, or
/// [`Reporter::retire`] when a reload replaces it.
pub struct Reporter {
    tx: Sender<Sent>,
    stats: Arc<UsageStats>,
    commits: Option<Arc<Commits>>,
    ingest: JoinHandle<()>,
    delivery: Vec<Delivery>,
}

impl Reporter {
    /// Opens the spool (failing start-up if it cannot) and starts the threads; `workers`: how
    /// many workers send (one commit mark each). With `hook.enabled` false the reporter only
    /// charges keys through `quota` (authentication's token rates and quotas need usage even
    /// when reporting is off): nothing is spooled or delivered.
    pub fn start(
        hook: &UsageHook,
        workers: usize,
        quota: Option<QuotaHook>,
    ) -> io::Result<Reporter> {
        let spool_error = |e: rusqlite::Error| {
            io::Error::other(format!("usage spool {}: {e}", hook.spool_path.display()))
        };
        let spool = hook
            .enabled
            .then(|| {
                Spool::open(&hook.spool_path)
                    .and_then(Spool::without_checkpoints)
                    .map_err(spool_error)
            })
            .transpose()?;
        let checkpoints = match &spool {
            Some(_) => {
                let spool = Spool::open(&hook.spool_path).map_err(spool_error)?;
                // Capacity 1: a pending request already says "checkpoint".
                let (tx, rx) = crossbeam_channel::bounded(1);
                std::thread::Builder::new()
                    .name("llmproxy-spool".into())
                    .spawn(move || checkpoint_loop(spool, rx))?;
                Some(tx)
            }
            None => None,
        };
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
        let last_id = Arc::new(AtomicI64::new(match &spool {
            Some(s) => s.last_id().map_err(spool_error)?,
            None => 0,
        }));

        let mut batches = Vec::new();
        let mut delivery = Vec::new();
        for (index, config) in reporters.iter().enumerate() {
            let spool = Spool::open(&hook.spool_path)
                .and_then(Spool::without_checkpoints)
                .map_err(spool_error)?;
            let (d, tx) = Delivery::start(
                config.clone(),
                &hook.spool_path,
                spool,
                stats.clone(),
                index,
                last_id.clone(),
            )?;
            batches.push(tx);
            delivery.push(d);
        }

        let commits =
            (spool.is_some() && hook.durability == Durability::Sync).then(|| Commits::new(workers));
        let (tx, rx) = crossbeam_channel::bounded(hook.channel_capacity);
        let ingest = Ingest {
            wait: commits.is_some(),
            rx,
            spool,
            batches,
            checkpoints,
            spooled: 0,
            commits: commits.clone(),
            marks: vec![0; workers.max(1)],
            last_id,
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
            commits,
            ingest,
            delivery,
        })
    }

    /// A sender for one worker's [`crate::proxy::Context`].
    pub fn sender(&self) -> UsageSender {
        UsageSender::new(
            self.tx.clone(),
            self.stats.dropped.clone(),
            self.commits.clone(),
        )
    }

    pub fn stats(&self) -> &Arc<UsageStats> {
        &self.stats
    }

    /// Call once every sender is gone (the workers have joined): the ingest thread drains the
    /// channel into the spool and exits; delivery threads then deliver what they can within
    /// [`delivery::FINAL_DELIVERY`]. One still inside a slow delivery after that is left behind
    /// (the process is exiting); its rows stay spooled for the next start.
    pub fn shutdown(self) {
        drop(self.tx);
        if self.ingest.join().is_err() {
            tracing::error!("usage ingest thread panicked");
        }
        let deadline = Instant::now() + delivery::FINAL_DELIVERY + Duration::from_secs(1);
        while Instant::now() < deadline && !self.delivery.iter().all(Delivery::is_finished) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A reload replaced this reporter: its delivery threads stop now (after the delivery in
    /// progress, if any) and hand their cursors over to the new reporter's threads of the same
    /// name, which deliver everything after them, this reporter's last records included. A
    /// reporter the new config no longer has stops delivering here too. The ingest thread goes
    /// on spooling the records of requests still running on the old config until their
    /// senders are gone (call from a thread that may wait for that).
    pub fn retire(self) {
        for d in &self.delivery {
            d.stop();
        }
        self.shutdown();
    }
}

struct Ingest {
    rx: Receiver<Sent>,
    /// `None` when records only charge keys.
    spool: Option<Spool>,
    /// Each delivery thread's inbox of freshly spooled batches.
    batches: Vec<Sender<Arc<Batch>>>,
    /// Asks the checkpoint thread for a checkpoint.
    checkpoints: Option<Sender<()>>,
    /// Records spooled since the last checkpoint request.
    spooled: usize,
    commits: Option<Arc<Commits>>,
    /// Per worker, the highest event number in the batch being written.
    marks: Vec<u64>,
    /// The newest row this reporter spooled (the delivery threads' backlog gauge).
    last_id: Arc<AtomicI64>,
    quota: Option<QuotaHook>,
    stats: Arc<UsageStats>,
    include_raw_key: bool,
    reporters: Vec<String>,
    retention: Duration,
    /// `durability: sync`: wait on the channel rather than tick.
    wait: bool,
}

impl Ingest {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // Prune soon after start (checked_sub: an Instant cannot go back before boot).
        let mut last_prune = Instant::now()
            .checked_sub(PRUNE_EVERY)
            .unwrap_or_else(Instant::now);
        loop {
            let mut disconnected = false;
            if self.wait {
                // Group commit: whatever arrived while the last batch was being written goes
                // into the next one. A wake-up costs the sender only when this thread sleeps.
                match self.rx.recv_timeout(PRUNE_EVERY) {
                    Ok(sent) => self.take(sent, &mut batch),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => disconnected = true,
                }
            } else {
                // Polled, never waited on: a worker's send then never has a sleeping thread
                // to wake, so metering costs the request path no syscall, and batches grow
                // with the load.
                std::thread::sleep(INGEST_TICK);
            }
            while !disconnected && batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(sent) => self.take(sent, &mut batch),
                    Err(TryRecvError::Empty) => break,
                    // Every sender is gone and the channel is empty: shutdown.
                    Err(TryRecvError::Disconnected) => disconnected = true,
                }
            }
            if !batch.is_empty() {
                self.spool_batch(std::mem::take(&mut batch));
                batch.reserve(MAX_BATCH);
            }
            self.release_marks();
            self.prune(&mut last_prune);
            if disconnected {
                break;
            }
        }
        // Dropping the batch senders tells the delivery threads to finish.
    }

    /// Bills one event and keeps it for the batch when records are spooled.
    fn take(&mut self, (event, ticket): Sent, batch: &mut Vec<Accounted>) {
        if let Some(t) = ticket {
            let mark = &mut self.marks[t.worker];
            *mark = (*mark).max(t.seq);
        }
        if let Some(accounted) = self.bill(event) {
            batch.push(accounted);
        }
    }

    /// The events taken so far are committed (or were not to be spooled): their requests go on.
    fn release_marks(&mut self) {
        let Some(commits) = &self.commits else {
            return;
        };
        for (worker, mark) in self.marks.iter_mut().enumerate() {
            if *mark > 0 {
                commits.committed(worker, *mark);
                *mark = 0;
            }
        }
    }

    /// Counts and charges one request; the event to spool, when records are spooled.
    fn bill(&self, event: super::UsageEvent) -> Option<Accounted> {
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
            quota(&key.api_key, &billed.tokens, event.fair_share_charged);
        }
        self.spool.is_some().then(|| Accounted::new(event, billed))
    }

    /// Retries until the batch is written: these records exist nowhere else. Meanwhile the
    /// channel fills and further events are dropped (and counted) rather than held in memory,
    /// and requests waiting for a commit are let go. Then the batch goes to the delivery
    /// threads; one whose inbox is full catches up from the spool later.
    fn spool_batch(&mut self, batch: Vec<Accounted>) {
        let Some(spool) = &mut self.spool else {
            return;
        };
        let mut rows = Rows::default();
        {
            let records: Vec<_> = batch
                .iter()
                .map(|a| a.record(self.include_raw_key))
                .collect();
            let mut logged = false;
            while let Err(e) = spool.insert_rows(&records, &mut rows) {
                self.stats.spool_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(commits) = &self.commits {
                    commits.set_failing(true);
                }
                if !logged {
                    tracing::error!(
                        records = batch.len(),
                        "usage spool write failed, retrying: {e}"
                    );
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            if logged {
                tracing::info!("usage spool writes work again");
                if let Some(commits) = &self.commits {
                    commits.set_failing(false);
                }
            }
        }
        self.last_id
            .fetch_max(rows.id(rows.len() - 1), Ordering::AcqRel);
        self.spooled += rows.len();
        if self.spooled >= CHECKPOINT_RECORDS {
            if let Some(c) = &self.checkpoints {
                let _ = c.try_send(());
            }
            self.spooled = 0;
        }
        if self.batches.is_empty() {
            return;
        }
        let batch = Arc::new(Batch::spooled(rows, batch, self.include_raw_key));
        for inbox in &self.batches {
            let _ = inbox.try_send(batch.clone());
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

/// The checkpoint thread: a checkpoint when the ingest thread asks, and one a minute (an idle
/// spool's WAL goes into the file too); a last one when the ingest thread has exited.
fn checkpoint_loop(spool: Spool, requests: Receiver<()>) {
    loop {
        let last = matches!(
            requests.recv_timeout(PRUNE_EVERY),
            Err(RecvTimeoutError::Disconnected)
        );
        if let Err(e) = spool.checkpoint() {
            tracing::warn!("usage spool checkpoint failed: {e}");
        }
        if last {
            return;
        }
    }
}
