//! Shared token accounting (`rate_limit.storage: redis`): owns the tokens this instance metered
//! but has not yet added to the shared totals in Redis, the thread that sends them, and the raising
//! of each key's local view (its `tokens_per_minute` debt and quota consumption) to those totals.
//!
//! Admission never waits on Redis: it reads the local view, which misses at most the other
//! instances' charges of the last `sync_interval` plus one round trip. Each round sends every
//! key's charges since the last one and reads back the shared values of the keys used lately, in
//! one script call. A batch carries a sequence number Redis remembers per instance, and it is
//! resent as is until Redis answers, so a batch whose answer was lost is not applied twice. While
//! Redis is down, charges keep accruing to the local view (each instance limits on its own) and
//! to the unsent batch, which goes once Redis is back: nothing charged twice, nothing forgotten.
//!
//! It must not block a worker (everything here runs on the ledger thread, or under a short lock
//! on the usage reporter's thread) nor decide admissions (that is `limits` and `auth`).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};

use super::{period_of, roll_period, unix_now, KeyLive};
use crate::config::{QuotaPeriod, SharedLimits};
use crate::limits::now_ns;

/// Keys used on this instance are read back this long after their last request: a token
/// rate's window.
const WATCH_FOR: Duration = Duration::from_secs(60);
/// Token-rate charges older than this when finally sent are dropped: they no longer weigh on
/// the current minute (quota charges are always sent).
const RATE_RELEVANT: Duration = Duration::from_secs(60);
/// How long Redis remembers an instance's last applied batch.
const MARKER_TTL_SECS: u64 = 86_400;

/// Applies a batch once (by sequence number), then returns every key's shared value: for a
/// token rate (`r`, interval in us, cost) the debt in us; for a quota (`q`, delta, expiry in s)
/// the period's total.
const SYNC: &str = r#"
local seq = tonumber(ARGV[1])
local fresh = false
if seq > 0 then
  fresh = seq > tonumber(redis.call('GET', KEYS[1]) or '0')
  if fresh then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i = 2, #KEYS do
  local j = 3 + (i - 2) * 3
  local a, b = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  if ARGV[j] == 'r' then
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < now then tat = now end
    if fresh and b > 0 then
      tat = tat + a * b
      redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
    end
    out[#out + 1] = math.floor(tat - now)
  else
    local total
    if fresh and a > 0 then
      total = redis.call('INCRBY', KEYS[i], a)
      if b > 0 then redis.call('EXPIRE', KEYS[i], b) end
    else
      total = tonumber(redis.call('GET', KEYS[i]) or '0')
    end
    out[#out + 1] = total
  end
end
return out
"#;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// 1 while the last round reached Redis.
    pub up: AtomicBool,
    /// Rounds that could not reach Redis.
    pub failures: AtomicU64,
    /// Tokens metered here that Redis has not acknowledged yet.
    pub unsent: AtomicU64,
}

/// One key's charges since the last batch.
struct Pending {
    live: Arc<KeyLive>,
    rate: u64,
    /// (quota period, tokens); more than one entry only across a period change.
    quota: Vec<(u64, u64)>,
}

/// Charges taken for sending: resent unchanged until Redis answers.
struct Batch {
    seq: u64,
    taken: Instant,
    keys: HashMap<String, Pending>,
    tokens: u64,
}

pub struct Ledger {
    pending: Mutex<HashMap<String, Pending>>,
    /// Every key state made while the ledger runs; those with requests lately are read back.
    watched: Mutex<Vec<Weak<KeyLive>>>,
    pub stats: Arc<LedgerStats>,
    stop: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
}

impl Ledger {
    pub fn start(config: &SharedLimits) -> std::io::Result<Arc<Ledger>> {
        let client = redis::Client::open(config.url.0.as_str()).map_err(std::io::Error::other)?;
        let ledger = Arc::new(Ledger {
            pending: Mutex::default(),
            watched: Mutex::default(),
            stats: Arc::default(),
            stop: Mutex::default(),
        });
        let instance = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        let weak = Arc::downgrade(&ledger);
        let (prefix, interval) = (config.prefix.clone(), config.sync_interval);
        let thread = std::thread::Builder::new()
            .name("llmproxy-ledger".into())
            .spawn(move || {
                let mut sync = Sync {
                    client,
                    conn: None,
                    script: redis::Script::new(SYNC),
                    marker: format!("{prefix}ledger:{instance:016x}"),
                    prefix,
                    seq: 0,
                    batch: None,
                    reads: HashMap::new(),
                };
                loop {
                    let stopping =
                        !matches!(rx.recv_timeout(interval), Err(RecvTimeoutError::Timeout));
                    let Some(ledger) = weak.upgrade() else { return };
                    sync.round(&ledger);
                    if stopping {
                        return;
                    }
                }
            })?;
        *ledger.stop.lock().unwrap_or_else(|e| e.into_inner()) = Some((tx, thread));
        Ok(ledger)
    }

    /// Sends what is still unsent (one last round) and stops the thread: at shutdown, after
    /// the usage reporter charged its last records.
    pub fn shutdown(&self) {
        let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((tx, thread)) = stop {
            let _ = tx.send(());
            let _ = thread.join();
        }
    }

    /// A new key state: from now on read back whenever it has requests.
    pub(super) fn watch(&self, live: &Arc<KeyLive>) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if watched.len() == watched.capacity() {
            // Before growing, drop the states of keys no configuration holds any more.
            watched.retain(|w| w.strong_count() > 0);
        }
        watched.push(Arc::downgrade(live));
    }

    /// Adds `tokens` metered for `live` in quota period `period` to the next batch (on the usage
    /// reporter's thread).
    pub(super) fn charge(&self, live: &Arc<KeyLive>, period: u64, tokens: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let entry = match pending.get_mut(&live.key_id) {
            Some(e) => e,
            None => pending.entry(live.key_id.clone()).or_insert(Pending {
                live: live.clone(),
                rate: 0,
                quota: Vec::with_capacity(1),
            }),
        };
        entry.rate += tokens;
        match entry.quota.iter_mut().find(|(p, _)| *p == period) {
            Some((_, t)) => *t += tokens,
            None => entry.quota.push((period, tokens)),
        }
        drop(pending);
        self.stats.unsent.fetch_add(tokens, Ordering::Relaxed);
    }
}

/// The ledger thread's state.
struct Sync {
    client: redis::Client,
    conn: Option<redis::Connection>,
    script: redis::Script,
    /// Where Redis keeps this instance's last applied batch number.
    marker: String,
    prefix: String,
    seq: u64,
    batch: Option<Batch>,
    /// Keys with requests lately, by key id: their shared values are read every round.
    reads: HashMap<String, (Arc<KeyLive>, Instant)>,
}

/// One value the script reads (and maybe charges), and where its answer goes.
enum Slot {
    Rate(Arc<KeyLive>),
    Quota(Arc<KeyLive>, u64),
}

impl Sync {
    fn round(&mut self, ledger: &Ledger) {
        let now = Instant::now();
        self.refresh_reads(ledger, now);
        if self.batch.is_none() {
            let keys =
                std::mem::take(&mut *ledger.pending.lock().unwrap_or_else(|e| e.into_inner()));
            if !keys.is_empty() {
                self.seq += 1;
                let tokens = keys.values().map(|p| p.rate).sum();
                self.batch = Some(Batch {
                    seq: self.seq,
                    taken: now,
                    keys,
                    tokens,
                });
            }
        }
        // Idle: nothing to send or read, but an instance not known to reach Redis (at start,
        // in an outage) still tries, so that `up` says how it is.
        if self.batch.is_none() && self.reads.is_empty() && ledger.stats.up.load(Ordering::Relaxed)
        {
            return;
        }
        let mut conn = self.conn.take();
        let (inv, slots) = self.invocation(now);
        let answer =
            crate::limits::connect(&self.client, &mut conn).and_then(|c| inv.invoke::<Vec<i64>>(c));
        drop(inv);
        self.conn = conn;
        let stats = &ledger.stats;
        match answer {
            Ok(values) => {
                if !stats.up.swap(true, Ordering::Relaxed)
                    && stats.failures.load(Ordering::Relaxed) > 0
                {
                    tracing::info!("redis token accounting available again; local charges sent");
                }
                if let Some(b) = self.batch.take() {
                    stats.unsent.fetch_sub(b.tokens, Ordering::Relaxed);
                }
                apply(
                    &slots,
                    &values,
                    &ledger.pending.lock().unwrap_or_else(|e| e.into_inner()),
                );
            }
            Err(e) => {
                self.conn = None;
                stats.failures.fetch_add(1, Ordering::Relaxed);
                // Logged once per outage, not once per round.
                if stats.up.swap(false, Ordering::Relaxed)
                    || stats.failures.load(Ordering::Relaxed) == 1
                {
                    tracing::warn!(
                        "redis token accounting unavailable, token rates and quotas are per instance until it is back: {e}"
                    );
                }
            }
        }
    }

    /// Adds the keys that had requests since the last round; forgets those idle for a window.
    fn refresh_reads(&mut self, ledger: &Ledger, now: Instant) {
        let watched = ledger.watched.lock().unwrap_or_else(|e| e.into_inner());
        for live in watched.iter().filter_map(Weak::upgrade) {
            if live.active.load(Ordering::Relaxed) && live.active.swap(false, Ordering::Relaxed) {
                self.reads.insert(live.key_id.clone(), (live, now));
            }
        }
        drop(watched);
        self.reads
            .retain(|_, (_, seen)| now.duration_since(*seen) < WATCH_FOR);
    }

    /// The script call for this round: the batch's charges (if any) and the reads.
    fn invocation(&self, now: Instant) -> (redis::ScriptInvocation<'_>, Vec<Slot>) {
        let mut inv = self.script.prepare_invoke();
        let seq = self.batch.as_ref().map_or(0, |b| b.seq);
        inv.key(&self.marker).arg(seq).arg(MARKER_TTL_SECS);
        let mut slots = Vec::new();
        let unix = unix_now();
        let batch = self.batch.as_ref();
        let rate_stale = batch.is_some_and(|b| now.duration_since(b.taken) > RATE_RELEVANT);
        let charged = batch.map(|b| &b.keys);
        let read = self
            .reads
            .iter()
            .filter(|(id, _)| !charged.is_some_and(|c| c.contains_key(*id)))
            .map(|(_, (live, _))| (live, 0, &[][..]));
        let charges = charged
            .into_iter()
            .flatten()
            .map(|(_, p)| (&p.live, if rate_stale { 0 } else { p.rate }, &p.quota[..]));
        for (live, rate_cost, quota) in charges.chain(read) {
            if let Some(rate) = live
                .limits
                .as_ref()
                .and_then(|l| l.tokens.as_ref().map(|t| (l, t)))
            {
                inv.key(format!("{}{}:tokens", self.prefix, rate.0.id))
                    .arg("r")
                    .arg(rate.1.interval() as f64 / 1000.0)
                    .arg(rate_cost);
                slots.push(Slot::Rate(live.clone()));
            }
            let current = period_of(live.quota_period, unix);
            let expiry = expiry_secs(live.quota_period);
            let mut has_current = false;
            for &(period, tokens) in quota {
                has_current |= period == current;
                inv.key(self.quota_key(live, period))
                    .arg("q")
                    .arg(tokens)
                    .arg(expiry);
                slots.push(Slot::Quota(live.clone(), period));
            }
            if !has_current {
                inv.key(self.quota_key(live, current))
                    .arg("q")
                    .arg(0)
                    .arg(expiry);
                slots.push(Slot::Quota(live.clone(), current));
            }
        }
        (inv, slots)
    }

    fn quota_key(&self, live: &KeyLive, period: u64) -> String {
        format!("{}quota:{}:{period}", self.prefix, live.key_id)
    }
}

/// Raises each key's local view to the shared values plus what this instance charged since the
/// batch was taken (`pending`): never lowers what this instance charged itself.
fn apply(slots: &[Slot], values: &[i64], pending: &HashMap<String, Pending>) {
    let now = now_ns();
    let current = unix_now();
    for (slot, &value) in slots.iter().zip(values) {
        let value = value.max(0) as u64;
        match slot {
            Slot::Rate(live) => {
                if let Some(t) = live.limits.as_ref().and_then(|l| l.tokens.as_ref()) {
                    let unsent = pending.get(&live.key_id).map_or(0, |p| p.rate);
                    let debt = value
                        .saturating_mul(1000)
                        .saturating_add(unsent.saturating_mul(t.interval()));
                    t.raise(now, debt);
                }
            }
            Slot::Quota(live, period) => {
                if *period == period_of(live.quota_period, current) {
                    let unsent = pending.get(&live.key_id).map_or(0, |p| {
                        p.quota
                            .iter()
                            .filter(|(q, _)| q == period)
                            .map(|(_, t)| t)
                            .sum()
                    });
                    roll_period(live, *period);
                    if live.period.load(Ordering::Acquire) == *period {
                        live.used
                            .fetch_max(value.saturating_add(unsent), Ordering::AcqRel);
                    }
                }
            }
        }
    }
}

/// How long a period's shared total outlives its last charge: past the period's end, so a
/// reset comes from the period-stamped key name, and the expiry only clears old periods away.
fn expiry_secs(period: Option<QuotaPeriod>) -> u64 {
    match period {
        None => 0,
        Some(QuotaPeriod::Daily) => 2 * 86_400,
        Some(QuotaPeriod::Monthly) => 63 * 86_400,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitSpec;
    use crate::limits::LimitSet;
    use std::io::Write as _;

    fn live(key_id: &str, tpm: u64) -> Arc<KeyLive> {
        let spec = LimitSpec {
            tokens_per_minute: Some(tpm),
            ..LimitSpec::default()
        };
        Arc::new(KeyLive {
            limits: Some(Arc::new(LimitSet::new(&spec, format!("key:{key_id}")))),
            used: AtomicU64::new(0),
            period: AtomicU64::new(0),
            name: "test".into(),
            key_id: key_id.into(),
            quota_period: None,
            shared: true,
            active: AtomicBool::new(false),
            service: Arc::default(),
            served: AtomicU64::new(0),
        })
    }

    fn ledger() -> Ledger {
        Ledger {
            pending: Mutex::default(),
            watched: Mutex::default(),
            stats: Arc::default(),
            stop: Mutex::default(),
        }
    }

    fn sync(url: &str, prefix: &str, instance: &str) -> Sync {
        Sync {
            client: redis::Client::open(url).unwrap(),
            conn: None,
            script: redis::Script::new(SYNC),
            marker: format!("{prefix}ledger:{instance}"),
            prefix: prefix.into(),
            seq: 0,
            batch: None,
            reads: HashMap::new(),
        }
    }

    /// A batch whose answer was lost is resent unchanged: Redis applies it once. Another
    /// instance reading the key sees the shared total and debt.
    #[test]
    fn a_batch_resent_after_a_lost_answer_is_applied_once() {
        let url = "redis://127.0.0.1:6379/";
        let reached = redis::Client::open(url)
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)));
        let Ok(mut conn) = reached else {
            let required = std::env::var("LLMPROXY_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
            assert!(!required, "Redis at 127.0.0.1:6379 is unreachable");
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED ledger test: no Redis at 127.0.0.1:6379"
            );
            return;
        };
        let prefix = format!("llmproxy-ledger-test-{}-{}:", std::process::id(), now_ns());
        let (one, two) = (ledger(), ledger());
        let (mut sync_one, mut sync_two) = (sync(url, &prefix, "one"), sync(url, &prefix, "two"));
        // One token a second: the 42 tokens charged stay visible as debt for 42 s.
        let here = live("k", 60);
        one.charge(&here, 0, 40);
        sync_one.round(&one);
        assert_eq!(one.stats.unsent.load(Ordering::Relaxed), 0);
        // The same batch again, as after an answer lost on the way back.
        let mut keys = HashMap::new();
        keys.insert(
            "k".to_string(),
            Pending {
                live: here.clone(),
                rate: 40,
                quota: vec![(0, 40)],
            },
        );
        sync_one.batch = Some(Batch {
            seq: sync_one.seq,
            taken: Instant::now(),
            keys,
            tokens: 0,
        });
        sync_one.round(&one);
        let total: u64 = redis::cmd("GET")
            .arg(format!("{prefix}quota:k:0"))
            .query(&mut conn)
            .unwrap();
        assert_eq!(total, 40, "a resent batch was applied twice");
        one.charge(&here, 0, 2);
        sync_one.round(&one);

        // The other instance has served the key but charged nothing: it reads the totals.
        let there = live("k", 60);
        two.watch(&there);
        there.active.store(true, Ordering::Relaxed);
        sync_two.round(&two);
        assert_eq!(there.used.load(Ordering::Relaxed), 42);
        // Both instances see the same debt: the shared one.
        let left = |l: &KeyLive| {
            let rate = l.limits.as_ref().unwrap().tokens.as_ref().unwrap();
            rate.peek(now_ns()).remaining
        };
        let (left_here, left_there) = (left(&here), left(&there));
        assert!(
            left_there < 40 && left_here.abs_diff(left_there) <= 1,
            "tokens left: {left_here} here, {left_there} there"
        );

        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(&mut conn)
            .unwrap();
        redis::cmd("DEL").arg(keys).query::<()>(&mut conn).unwrap();
    }
}
