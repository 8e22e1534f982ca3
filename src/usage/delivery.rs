//! One reporter's delivery thread: takes the batches the ingest thread hands over in memory,
//! delivers them to the sink in `batch_size` pieces, and moves the reporter's cursor in the
//! spool. It reads the spool only to catch up: rows after its cursor that it does not hold
//! (a previous run's backlog, an outage longer than its queue, a reload's overlap).
//!
//! Threads, not a scheduler: the clients (ureq, postgres, mysql, rusqlite) block, so a reporter
//! stuck in a timeout or a long backoff holds only its own thread; another reporter's delivery
//! never waits on it. It must not write records: the ingest thread owns the spool's rows.
//!
//! The cursor is written at most every [`ACK_EVERY`] while busy and before every idle wait, in
//! a transaction of its own connection, which never runs a WAL checkpoint. A kill can lose the
//! last [`ACK_EVERY`] of cursor moves: those rows are delivered again after the restart (the
//! webhook's `Idempotency-Key` and the tables' unique `request_id` absorb that).
//!
//! One cursor, one thread: every thread of a reporter name holds that name's lease while it
//! runs, so a reporter replaced by a reload ([`Delivery::stop`]) stops before the new one of the
//! same name reads the cursor and delivers. Otherwise the old sink could still be sent records
//! of the new config.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::batch::{self, Batch, Span};
use super::reporter::UsageStats;
use super::spool::{Rows, Spool};
use super::sql::SqlSink;
use super::webhook::WebhookSink;
use crate::config::{Reporter as ReporterConfig, ReporterKind};

/// At shutdown, delivery threads keep delivering the backlog for at most this long.
pub const FINAL_DELIVERY: Duration = Duration::from_secs(5);
/// First wait after a failed delivery; doubles per consecutive failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// An idle thread looks at the spool this often for rows it was not handed (another
/// generation's, during a reload).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Rows held in memory for delivery, at most; batches beyond are read back from the spool
/// when their turn comes.
const MAX_QUEUED: usize = 16_384;
/// Batches waiting in the inbox, at most (the ingest thread never waits for a delivery thread).
const INBOX: usize = 64;
/// How often a busy thread writes its cursor.
const ACK_EVERY: Duration = Duration::from_millis(100);

enum Sink {
    Webhook(WebhookSink),
    Sql(SqlSink),
}

impl Sink {
    fn deliver(&mut self, spans: &[Span]) -> Result<(), String> {
        match self {
            Sink::Webhook(w) => w.deliver(spans),
            Sink::Sql(s) => s.deliver(spans),
        }
    }
}

/// A running delivery thread.
pub struct Delivery {
    handle: JoinHandle<()>,
    stop: Sender<()>,
}

impl Delivery {
    /// Starts the thread of reporter `index`; with the sender of its inbox. `last_id`: the
    /// newest row spooled, as the ingest thread keeps it.
    pub fn start(
        config: ReporterConfig,
        spool_path: &Path,
        spool: Spool,
        stats: Arc<UsageStats>,
        index: usize,
        last_id: Arc<AtomicI64>,
    ) -> io::Result<(Delivery, Sender<Arc<Batch>>)> {
        let (inbox_tx, inbox) = crossbeam_channel::bounded(INBOX);
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let lease = lease(spool_path, &config.name);
        let handle = std::thread::Builder::new()
            .name(format!("llmproxy-usage-{index}"))
            .spawn(move || {
                // Held for the thread's life: see the module comment.
                let _held = lease.lock().unwrap_or_else(|e| e.into_inner());
                let sink = match config.kind.clone() {
                    ReporterKind::Webhook(w) => {
                        Sink::Webhook(WebhookSink::new(w, config.batch_size))
                    }
                    ReporterKind::Database(d) => Sink::Sql(SqlSink::new(d)),
                };
                let mut thread = Thread {
                    config,
                    spool,
                    sink,
                    stats,
                    index,
                    last_id,
                    inbox,
                    stopped,
                    queue: VecDeque::new(),
                    head: 0,
                    queued: 0,
                    cursor: 0,
                    acked: 0,
                    acked_at: Instant::now(),
                    final_deadline: None,
                };
                thread.run();
            })?;
        Ok((Delivery { handle, stop }, inbox_tx))
    }

    /// Stops the thread after the delivery in progress; it writes its cursor first.
    pub fn stop(&self) {
        let _ = self.stop.try_send(());
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// The lease of one cursor (spool file and reporter name) in this process.
fn lease(spool: &Path, name: &str) -> Arc<Mutex<()>> {
    type Leases = Mutex<HashMap<(PathBuf, String), Arc<Mutex<()>>>>;
    static LEASES: OnceLock<Leases> = OnceLock::new();
    let mut leases = LEASES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    leases
        .entry((spool.to_path_buf(), name.to_owned()))
        .or_default()
        .clone()
}

/// What ended a wait.
/// What [`Thread::next_batch`] found.
enum Next {
    Spans(Vec<Span>),
    /// Nothing to deliver now: look again.
    Again,
    /// [`Delivery::stop`], or the end of the final delivery.
    Stop,
}

enum Woken {
    Batch,
    Timeout,
    /// [`Delivery::stop`]: end now.
    Stop,
}

struct Thread {
    config: ReporterConfig,
    spool: Spool,
    sink: Sink,
    stats: Arc<UsageStats>,
    index: usize,
    last_id: Arc<AtomicI64>,
    inbox: Receiver<Arc<Batch>>,
    stopped: Receiver<()>,
    /// Batches handed over and not yet delivered, oldest first; `head` rows of the first one
    /// are delivered already.
    queue: VecDeque<Arc<Batch>>,
    head: usize,
    /// Rows in `queue` (from `head` on).
    queued: usize,
    /// The last row delivered.
    cursor: i64,
    /// The last row the spool's cursor says, and when it was written.
    acked: i64,
    acked_at: Instant,
    /// Set once the ingest thread has exited: deliver what is left until then.
    final_deadline: Option<Instant>,
}

impl Thread {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn run(&mut self) {
        // Read under the lease: a replaced thread of the same name has written its last move.
        self.cursor = loop {
            match self.spool.cursor(&self.config.name) {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(reporter = self.name(), "usage cursor read failed: {e}");
                    if matches!(self.wait(IDLE_POLL, false), Woken::Stop) {
                        return;
                    }
                }
            }
        };
        self.acked = self.cursor;
        let mut rng = (super::spool::now_ms() as u64)
            ^ (std::process::id() as u64).rotate_left(32)
            ^ (self.index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            | 1;
        let mut failures = 0u32;
        // The batch whose delivery failed, to be sent again as it was.
        let mut retry: Option<Vec<Span>> = None;
        // Since when a batch short of `batch_size` has been waiting for more records.
        let mut short_since: Option<Instant> = None;
        let mut read_back = Rows::default();
        // Held apart from `self`, which the loop borrows mutably.
        let all_stats = Arc::clone(&self.stats);
        loop {
            if self.final_deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            self.take_inbox();
            self.trim();
            let last_id = self.last_id.load(Ordering::Acquire);
            let backlog = (last_id - self.cursor).max(0) as u64;
            let stats = &all_stats.reporters[self.index];
            stats
                .backlog
                .store(backlog.max(self.queued as u64), Ordering::Relaxed);
            let spans = match retry.take() {
                // A failed batch is sent again as it was, not grown by what was spooled since:
                // its Idempotency-Key (the first record's id) names the same records each time.
                Some(spans) => spans,
                None => match self.next_batch(last_id, backlog, &mut short_since, &mut read_back) {
                    Next::Spans(spans) => spans,
                    Next::Again => continue,
                    Next::Stop => break,
                },
            };
            match self.sink.deliver(&spans) {
                Ok(()) => {
                    let last = spans
                        .last()
                        .map_or(self.cursor, |s| s.batch.rows.id(s.end - 1));
                    self.cursor = self.cursor.max(last);
                    stats
                        .delivered
                        .fetch_add(batch::count(&spans) as u64, Ordering::Relaxed);
                    if failures > 0 {
                        tracing::info!(reporter = self.name(), "usage delivery recovered");
                    }
                    failures = 0;
                    if self.acked_at.elapsed() >= ACK_EVERY {
                        self.ack();
                    }
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    failures += 1;
                    let wait = backoff(failures, &mut rng);
                    tracing::warn!(
                        reporter = self.name(),
                        records = batch::count(&spans),
                        failures,
                        retry_in_ms = wait.as_millis() as u64,
                        "usage delivery failed: {e}"
                    );
                    retry = Some(spans);
                    // During a backoff at shutdown, give up: the rows stay spooled.
                    if self.final_deadline.is_some() {
                        break;
                    }
                    self.ack();
                    // Only a stop or the shutdown ends a backoff; batches keep queueing.
                    if matches!(self.wait(wait, true), Woken::Stop) || self.final_deadline.is_some()
                    {
                        break;
                    }
                }
            }
        }
        self.ack();
    }

    /// The next batch to deliver once no failed one waits: the queued rows that follow the
    /// cursor, else rows read back from the spool; or why there is none yet.
    fn next_batch(
        &mut self,
        last_id: i64,
        backlog: u64,
        short_since: &mut Option<Instant>,
        read_back: &mut Rows,
    ) -> Next {
        let batch_size = self.config.batch_size;
        let in_memory = self.contiguous(batch_size);
        let available = if in_memory > 0 {
            in_memory
        } else {
            backlog.min(batch_size as u64) as usize
        };
        if available == 0 {
            if self.final_deadline.is_some() {
                return Next::Stop;
            }
            self.ack();
            match self.wait(IDLE_POLL, false) {
                Woken::Stop => return Next::Stop,
                Woken::Batch => {}
                // Rows this thread was not handed: a previous run's, another generation's.
                Woken::Timeout => match self.spool.last_id() {
                    Ok(last) => {
                        self.last_id.fetch_max(last, Ordering::AcqRel);
                    }
                    Err(e) => {
                        tracing::error!(reporter = self.name(), "usage spool read failed: {e}")
                    }
                },
            }
            return Next::Again;
        }
        if available < batch_size && self.final_deadline.is_none() {
            let since = *short_since.get_or_insert_with(Instant::now);
            let linger = self.config.batch_timeout.saturating_sub(since.elapsed());
            if !linger.is_zero() {
                if matches!(self.wait(linger, false), Woken::Stop) {
                    return Next::Stop;
                }
                return Next::Again;
            }
        }
        *short_since = None;
        if in_memory > 0 {
            return Next::Spans(self.spans(batch_size));
        }
        if let Err(e) = self.spool.read_after(self.cursor, batch_size, read_back) {
            tracing::error!(reporter = self.name(), "usage spool read failed: {e}");
            if matches!(self.wait(IDLE_POLL, true), Woken::Stop) {
                return Next::Stop;
            }
            return Next::Again;
        }
        if read_back.is_empty() {
            // Pruned or never there (a stale `last_id`): nothing to catch up on,
            // unless the ingest thread spooled more meanwhile.
            let _ = self.last_id.compare_exchange(
                last_id,
                self.cursor,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            return Next::Again;
        }
        let rows = std::mem::take(read_back);
        let end = rows.len();
        Next::Spans(vec![Span {
            batch: Arc::new(Batch::read_back(rows)),
            start: 0,
            end,
        }])
    }

    /// Moves every batch in the inbox to the queue, without waiting.
    fn take_inbox(&mut self) {
        loop {
            match self.inbox.try_recv() {
                Ok(batch) => self.enqueue(batch),
                Err(crossbeam_channel::TryRecvError::Empty) => return,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.ingest_gone();
                    return;
                }
            }
        }
    }

    fn enqueue(&mut self, batch: Arc<Batch>) {
        // Beyond the bound the batch stays in the spool only; it is read back in turn.
        if self.queued + batch.len() <= MAX_QUEUED {
            self.queued += batch.len();
            self.queue.push_back(batch);
        }
    }

    fn ingest_gone(&mut self) {
        if self.final_deadline.is_none() {
            self.final_deadline = Some(Instant::now() + FINAL_DELIVERY);
        }
    }

    /// Drops queued rows at or before the cursor (delivered, or read back from the spool).
    fn trim(&mut self) {
        while let Some(front) = self.queue.front() {
            if front.last_id() <= self.cursor {
                self.queued -= front.len() - self.head;
                self.queue.pop_front();
                self.head = 0;
                continue;
            }
            while front.rows.id(self.head) <= self.cursor {
                self.head += 1;
                self.queued -= 1;
            }
            return;
        }
    }

    /// Queued rows that follow the cursor without a gap, up to `limit`.
    fn contiguous(&self, limit: usize) -> usize {
        let mut next = self.cursor + 1;
        let mut n = 0;
        let mut head = self.head;
        for b in &self.queue {
            if n >= limit || b.rows.id(head) != next {
                break;
            }
            n += b.len() - head;
            next = b.last_id() + 1;
            head = 0;
        }
        n.min(limit)
    }

    /// The spans of the next `limit` contiguous queued rows (see [`Thread::contiguous`]).
    fn spans(&self, limit: usize) -> Vec<Span> {
        let mut spans = Vec::new();
        let mut left = self.contiguous(limit);
        let mut head = self.head;
        for b in &self.queue {
            if left == 0 {
                break;
            }
            let end = b.len().min(head + left);
            spans.push(Span {
                batch: b.clone(),
                start: head,
                end,
            });
            left -= end - head;
            head = 0;
        }
        spans
    }

    /// Writes the cursor when it moved.
    fn ack(&mut self) {
        if self.cursor == self.acked {
            return;
        }
        match self.spool.ack(&self.config.name, self.cursor) {
            Ok(()) => self.acked = self.cursor,
            // Delivered but not recorded: it will be re-sent (idempotently).
            Err(e) => tracing::error!(reporter = self.name(), "usage cursor update failed: {e}"),
        }
        self.acked_at = Instant::now();
    }

    /// Waits up to `wait` for a batch (taken into the queue), a stop or the ingest thread's
    /// exit. With `whole`, batches do not end the wait.
    fn wait(&mut self, wait: Duration, whole: bool) -> Woken {
        let until = Instant::now() + wait;
        loop {
            crossbeam_channel::select! {
                recv(self.stopped) -> _ => return Woken::Stop,
                recv(self.inbox) -> batch => match batch {
                    Ok(batch) => {
                        self.enqueue(batch);
                        if !whole {
                            return Woken::Batch;
                        }
                    }
                    Err(_) => {
                        self.ingest_gone();
                        return Woken::Batch;
                    }
                },
                default(until.saturating_duration_since(Instant::now())) => return Woken::Timeout,
            }
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
