//! Request rates shared by several gateway instances through Redis (`rate_limit.storage: redis`).
//!
//! The same GCRA as [`super::Rate`], run as one Lua script in Redis so that every instance takes
//! from one allowance atomically (all scopes of a request or none), timed by Redis's own clock.
//! Redis calls block, so they run on a few std threads; the worker awaits the answer as a future.
//! While Redis is unreachable, each instance falls back to its local rates (logged). A Redis
//! that hangs instead of refusing costs each call its 1 s timeout, so after a failure the
//! [`Breaker`] answers locally at once and lets one call a second probe Redis: requests never
//! queue behind a dead Redis.
//!
//! Concurrency caps are shared as leases: one sorted-set member per running request, scored by
//! its expiry. A renewal thread extends the leases this instance holds; a crashed instance's
//! leases simply expire, so it leaks no slots.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::RateState;

const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = 60000000
local news = {}
for i, key in ipairs(KEYS) do
  local interval = period / tonumber(ARGV[i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new = tat + interval
  if new - now > period then
    return {0, math.ceil(new - now - period), 0}
  end
  news[i] = new
end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, string.format('%.0f', news[i]), 'PX', math.ceil((news[i] - now) / 1000) + 1000)
end
local interval = period / tonumber(ARGV[1])
return {1, math.floor((now + period - news[1]) / interval), math.ceil(news[1] - now)}
"#;

const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
  return 1
end
return 0
"#;

const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', key, tonumber(ARGV[1]) * 2)
end
return 1
"#;

/// How long a lease lives without renewal (a crashed instance's slots free up after this).
const LEASE_TTL_MS: u64 = 15_000;
/// After a failed Redis call, how long calls fall back to local limits before one probes again.
const PROBE_EVERY_MS: u64 = 1_000;

/// Shared by the Redis threads: open (answering locally) from a failure until one probe call
/// succeeds.
struct Breaker {
    since: Instant,
    /// Milliseconds since `since` until which calls answer locally; 0: closed (use Redis).
    open_until: AtomicU64,
}

impl Breaker {
    fn now(&self) -> u64 {
        self.since.elapsed().as_millis() as u64 + 1
    }

    /// Whether this call may go to Redis: always while closed; while open, only the one call
    /// that claims the next probe.
    fn admit(&self) -> bool {
        let until = self.open_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = self.now();
        now >= until
            && self
                .open_until
                .compare_exchange(
                    until,
                    now + PROBE_EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    fn failed(&self) {
        self.open_until
            .store(self.now() + PROBE_EVERY_MS, Ordering::Relaxed);
    }

    fn succeeded(&self) {
        self.open_until.store(0, Ordering::Relaxed);
    }
}

/// What Redis said about one request.
pub enum Remote {
    Taken(RateState),
    Refused(Duration),
    /// Redis could not answer: use the local rates.
    Unavailable,
}

enum Job {
    Take {
        /// (Redis key, limit per minute), most specific scope first.
        scopes: Vec<(String, u64)>,
        reply: Arc<Reply>,
    },
    /// Concurrency leases: one per (Redis key, max), all or none.
    Acquire {
        slots: Vec<(String, u32)>,
        lease: String,
        reply: Arc<Reply>,
    },
    Release {
        keys: Vec<String>,
        lease: String,
    },
}

#[derive(Default)]
struct Reply {
    state: Mutex<(Option<Remote>, Option<Waker>)>,
}

pub struct RedisRates {
    tx: Sender<Job>,
    prefix: String,
    /// Leases this instance holds, by lease id: renewed until released.
    held: Arc<Mutex<HashMap<String, Vec<String>>>>,
    next_lease: AtomicU64,
    instance: u64,
}

/// Shared concurrency slots held by one request; released (off the worker) on drop.
pub struct Lease {
    rates: Arc<RedisRates>,
    lease: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let keys = self
            .rates
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.lease)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _ = self.rates.tx.send(Job::Release {
                keys,
                lease: std::mem::take(&mut self.lease),
            });
        }
    }
}

impl RedisRates {
    pub fn start(url: &str, prefix: &str, threads: usize) -> std::io::Result<RedisRates> {
        let client = redis::Client::open(url).map_err(std::io::Error::other)?;
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let held: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
        {
            let (client, held) = (client.clone(), held.clone());
            std::thread::Builder::new()
                .name("llmproxy-rl-renew".into())
                .spawn(move || renew_loop(&client, &held))?;
        }
        let breaker = Arc::new(Breaker {
            since: Instant::now(),
            open_until: AtomicU64::new(0),
        });
        for i in 0..threads.max(1) {
            let (client, rx, breaker) = (client.clone(), rx.clone(), breaker.clone());
            std::thread::Builder::new()
                .name(format!("llmproxy-rl{i}"))
                .spawn(move || serve(&client, &rx, &breaker))?;
        }
        let instance = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Ok(RedisRates {
            tx,
            prefix: prefix.to_string(),
            held,
            next_lease: AtomicU64::new(0),
            instance,
        })
    }

    /// Takes one request from every scope (id, limit) or from none.
    pub fn take(&self, scopes: &[(&str, u64)]) -> TakeFuture {
        let reply = Arc::new(Reply::default());
        let job = Job::Take {
            scopes: scopes
                .iter()
                .map(|(id, limit)| (format!("{}{id}", self.prefix), *limit))
                .collect(),
            reply: reply.clone(),
        };
        if self.tx.send(job).is_err() {
            reply.state.lock().unwrap_or_else(|e| e.into_inner()).0 = Some(Remote::Unavailable);
        }
        TakeFuture { reply }
    }
}

impl RedisRates {
    /// One shared slot in every (id, max) scope, or none (`Remote::Refused`).
    pub async fn acquire(self: &Arc<Self>, slots: &[(&str, u32)]) -> Result<Option<Lease>, ()> {
        let n = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let lease = format!("{:016x}-{n}", self.instance);
        let keys: Vec<(String, u32)> = slots
            .iter()
            .map(|(id, max)| (format!("{}{id}:slots", self.prefix), *max))
            .collect();
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(lease.clone(), keys.iter().map(|(k, _)| k.clone()).collect());
        let guard = Lease {
            rates: self.clone(),
            lease: lease.clone(),
        };
        let reply = Arc::new(Reply::default());
        let job = Job::Acquire {
            slots: keys,
            lease,
            reply: reply.clone(),
        };
        if self.tx.send(job).is_err() {
            return Ok(None);
        }
        match (TakeFuture { reply }).await {
            Remote::Taken(_) => Ok(Some(guard)),
            // `guard` drops: whatever was taken is released.
            Remote::Refused(_) => Err(()),
            Remote::Unavailable => Ok(None),
        }
    }
}

pub struct TakeFuture {
    reply: Arc<Reply>,
}

impl Future for TakeFuture {
    type Output = Remote;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Remote> {
        let mut state = self.reply.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.0.take() {
            Some(r) => Poll::Ready(r),
            None => {
                state.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn serve(client: &redis::Client, jobs: &Receiver<Job>, breaker: &Breaker) {
    let script = redis::Script::new(SCRIPT);
    let mut conn: Option<redis::Connection> = None;
    // Logged once per outage per thread, not once per request.
    let mut down = false;
    let acquire = redis::Script::new(ACQUIRE);
    for job in jobs {
        if !breaker.admit() {
            match job {
                Job::Take { reply, .. } | Job::Acquire { reply, .. } => {
                    answer(&reply, Remote::Unavailable);
                }
                // Unreleased leases expire on their own within LEASE_TTL_MS.
                Job::Release { .. } => {}
            }
            continue;
        }
        let (result, reply) = match job {
            Job::Take { scopes, reply } => (run(client, &mut conn, &script, &scopes), reply),
            Job::Acquire {
                slots,
                lease,
                reply,
            } => (
                acquire_all(client, &mut conn, &acquire, &slots, &lease),
                reply,
            ),
            Job::Release { keys, lease } => {
                let released = connect(client, &mut conn).and_then(|c| {
                    let mut pipe = redis::pipe();
                    for k in &keys {
                        pipe.zrem(k, &lease).ignore();
                    }
                    pipe.query::<()>(c)
                });
                if released.is_err() {
                    // Unreleased leases expire on their own within LEASE_TTL_MS.
                    conn = None;
                    breaker.failed();
                }
                continue;
            }
        };
        let remote = match result {
            Ok(a) => {
                if down {
                    tracing::info!("redis rate limit available again");
                }
                down = false;
                breaker.succeeded();
                a
            }
            Err(e) => {
                conn = None;
                breaker.failed();
                if !down {
                    tracing::warn!("redis rate limit unavailable, using local limits: {e}");
                }
                down = true;
                Remote::Unavailable
            }
        };
        answer(&reply, remote);
    }
}

fn answer(reply: &Reply, remote: Remote) {
    let waker = {
        let mut state = reply.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 = Some(remote);
        state.1.take()
    };
    if let Some(w) = waker {
        w.wake();
    }
}

/// The thread's connection, opened (with 1 s connect and read timeouts) when it has none.
pub(crate) fn connect<'a>(
    client: &redis::Client,
    conn: &'a mut Option<redis::Connection>,
) -> redis::RedisResult<&'a mut redis::Connection> {
    if conn.is_none() {
        let c = client.get_connection_with_timeout(Duration::from_secs(1))?;
        c.set_read_timeout(Some(Duration::from_secs(1)))?;
        *conn = Some(c);
    }
    Ok(conn.as_mut().expect("connected above"))
}

/// A lease in every scope; on a refusal, the ones already taken are given back.
fn acquire_all(
    client: &redis::Client,
    conn: &mut Option<redis::Connection>,
    script: &redis::Script,
    slots: &[(String, u32)],
    lease: &str,
) -> redis::RedisResult<Remote> {
    let c = connect(client, conn)?;
    for (i, (key, max)) in slots.iter().enumerate() {
        let ok: i64 = script
            .key(key)
            .arg(*max)
            .arg(lease)
            .arg(LEASE_TTL_MS)
            .invoke(c)?;
        if ok != 1 {
            for (taken, _) in &slots[..i] {
                redis::cmd("ZREM").arg(taken).arg(lease).query::<()>(c)?;
            }
            return Ok(Remote::Refused(Duration::from_millis(100)));
        }
    }
    Ok(Remote::Taken(RateState {
        limit: 0,
        remaining: 0,
        reset: Duration::ZERO,
    }))
}

/// Extends every lease this instance holds, a few times per TTL.
fn renew_loop(client: &redis::Client, held: &Mutex<HashMap<String, Vec<String>>>) {
    let script = redis::Script::new(RENEW);
    let mut conn = None;
    loop {
        std::thread::sleep(Duration::from_millis(LEASE_TTL_MS / 3));
        let leases: Vec<(String, Vec<String>)> = held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(l, k)| (l.clone(), k.clone()))
            .collect();
        for (lease, keys) in leases {
            let renewed = connect(client, &mut conn).and_then(|c| {
                let mut inv = script.prepare_invoke();
                inv.arg(LEASE_TTL_MS);
                for k in &keys {
                    inv.key(k).arg(&lease);
                }
                inv.invoke::<i64>(c)
            });
            if renewed.is_err() {
                conn = None;
            }
        }
    }
}

fn run(
    client: &redis::Client,
    conn: &mut Option<redis::Connection>,
    script: &redis::Script,
    scopes: &[(String, u64)],
) -> redis::RedisResult<Remote> {
    let c = connect(client, conn)?;
    let mut inv = script.prepare_invoke();
    for (key, limit) in scopes {
        inv.key(key).arg(*limit);
    }
    let (ok, a, b): (i64, i64, i64) = inv.invoke(c)?;
    Ok(if ok == 1 {
        Remote::Taken(RateState {
            limit: scopes[0].1,
            remaining: a.max(0) as u64,
            reset: Duration::from_micros(b.max(0) as u64),
        })
    } else {
        Remote::Refused(Duration::from_micros(a.max(0) as u64))
    })
}
