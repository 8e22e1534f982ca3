//! Limits: owns request rates, token rates and concurrency caps of one scope (a key, or all
//! traffic), exact across worker threads, plus the `x-ratelimit-*` headers that describe them.
//!
//! Rates are GCRA on one `AtomicU64` "theoretical arrival time" per scope, updated by CAS, so
//! two workers can never both take the last request of a window. Concurrency is an atomic count
//! whose [`Permit`] gives the slot back on drop, on every exit path. Nothing here blocks: a
//! request that waits (`rate_limit.queue_timeout`) awaits a timer or a slot-free wake-up.
//!
//! With `rate_limit.storage: redis`, request rates and concurrency are also shared by every
//! instance ([`shared`]); token rates are raised to the shared totals by `auth::ledger`
//! ([`Rate::raise`]).
//!
//! It must not know about keys, HTTP or configuration files beyond [`LimitSpec`].

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::config::LimitSpec;
pub(crate) use shared::connect;
use shared::Remote;
pub use shared::{Lease, RedisRates};

mod shared;

const MINUTE_NS: u64 = 60_000_000_000;

/// Nanoseconds on a process-wide monotonic clock; never 0, so a fresh rate (TAT 0) is "idle".
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// A per-minute rate as GCRA: `tat` is when the scope would be idle again if nothing more came.
/// A full minute of allowance may be spent at once (burst = the limit), then it refills evenly.
#[derive(Debug)]
pub struct Rate {
    tat: AtomicU64,
    /// Nanoseconds of allowance one unit costs.
    interval: u64,
    pub limit: u64,
}

/// What a rate looks like after an operation, for the response headers.
#[derive(Debug, Clone, Copy)]
pub struct RateState {
    pub limit: u64,
    pub remaining: u64,
    /// Until the allowance is full again.
    pub reset: Duration,
}

impl Rate {
    pub fn per_minute(limit: u64) -> Rate {
        Rate {
            tat: AtomicU64::new(0),
            interval: (MINUTE_NS / limit.max(1)).max(1),
            limit,
        }
    }

    fn state(&self, tat: u64, now: u64) -> RateState {
        let tat = tat.max(now);
        RateState {
            limit: self.limit,
            remaining: (now + MINUTE_NS).saturating_sub(tat) / self.interval,
            reset: Duration::from_nanos(tat - now),
        }
    }

    /// Takes `cost` units if they fit; else how long until they would.
    pub fn try_take(&self, now: u64, cost: u64) -> Result<RateState, Duration> {
        let step = self.interval * cost;
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = tat.max(now) + step;
            if next - now > MINUTE_NS {
                return Err(Duration::from_nanos(next - now - MINUTE_NS));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(self.state(next, now)),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Gives back units taken by [`Rate::try_take`] when a later check refused the request.
    pub fn refund(&self, cost: u64) {
        let step = self.interval * cost;
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(step))
            });
    }

    /// Admits while at least one unit is left, without taking any: token rates are charged
    /// afterwards, from real usage ([`Rate::charge`]).
    pub fn check(&self, now: u64) -> Result<RateState, Duration> {
        let tat = self.tat.load(Ordering::Acquire);
        let state = self.state(tat, now);
        if state.remaining >= 1 {
            Ok(state)
        } else {
            let room_at = tat + self.interval;
            Err(Duration::from_nanos(
                room_at.saturating_sub(now + MINUTE_NS),
            ))
        }
    }

    /// Charges `cost` units unconditionally (may go into debt, which delays later requests).
    pub fn charge(&self, now: u64, cost: u64) {
        let step = self.interval.saturating_mul(cost);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.max(now).saturating_add(step))
            });
    }

    /// Raises the debt to at least `debt` nanoseconds past `now`: the shared debt read from
    /// Redis. Never lowers what this process charged itself.
    pub fn raise(&self, now: u64, debt: u64) {
        self.tat
            .fetch_max(now.saturating_add(debt), Ordering::AcqRel);
    }

    /// Nanoseconds of allowance one unit costs.
    pub fn interval(&self) -> u64 {
        self.interval
    }

    pub fn peek(&self, now: u64) -> RateState {
        self.state(self.tat.load(Ordering::Acquire), now)
    }
}

/// A concurrency cap: an atomic count plus the wakers of requests queued for a slot.
#[derive(Debug)]
pub struct Slots {
    used: AtomicU32,
    pub max: u32,
    waiters: Mutex<Vec<Waker>>,
}

impl Slots {
    pub fn new(max: u32) -> Slots {
        Slots {
            used: AtomicU32::new(0),
            max,
            waiters: Mutex::new(Vec::new()),
        }
    }

    fn try_acquire(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < self.max).then_some(u + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
        // Wake every waiter: each retries, the losers register again. Waiters are few (only
        // requests queued under `queue_timeout`), and the wake may cross threads (monoio `sync`).
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|e| e.into_inner()));
        for w in waiters {
            w.wake();
        }
    }

    pub fn in_use(&self) -> u32 {
        self.used.load(Ordering::Acquire)
    }

    /// Resolves once a slot looks free (the caller must still win it).
    fn freed(&self) -> SlotFreed<'_> {
        SlotFreed { slots: self }
    }
}

struct SlotFreed<'a> {
    slots: &'a Slots,
}

impl Future for SlotFreed<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let s = self.slots;
        if s.in_use() < s.max {
            return Poll::Ready(());
        }
        s.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cx.waker().clone());
        // A release between the check and the registration would otherwise be missed.
        if s.in_use() < s.max {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The limits of one scope.
#[derive(Debug)]
pub struct LimitSet {
    /// Names the scope in shared storage ("global", "key:<hash>").
    pub id: String,
    pub requests: Option<Rate>,
    pub tokens: Option<Rate>,
    pub slots: Option<Slots>,
}

impl LimitSet {
    pub fn new(spec: &LimitSpec, id: String) -> LimitSet {
        LimitSet {
            id,
            requests: spec.requests_per_minute.map(Rate::per_minute),
            tokens: spec.tokens_per_minute.map(Rate::per_minute),
            slots: spec.max_concurrent.map(Slots::new),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none() && self.slots.is_none()
    }

    /// Charges tokens actually used (from the usage record) to the token rate.
    pub fn charge_tokens(&self, tokens: u64) {
        if let Some(t) = &self.tokens {
            t.charge(now_ns(), tokens);
        }
    }
}

/// Concurrency slots held by one request; returned on drop, whatever ended the request.
#[derive(Default)]
pub struct Permit {
    held: Vec<Arc<LimitSet>>,
    /// The same slots in Redis, when they are shared across instances.
    lease: Option<Lease>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        for set in &self.held {
            if let Some(s) = &set.slots {
                s.release();
            }
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
}

/// A refused admission: what to tell the client.
#[derive(Debug)]
pub struct Limited {
    pub kind: LimitKind,
    pub retry_after: Duration,
    /// Preformatted `x-ratelimit-*` header lines.
    pub headers: String,
}

/// An admitted request: hold `permit` for the whole exchange, send `headers` with the response.
pub struct Admitted {
    pub permit: Permit,
    pub headers: String,
}

/// Acquires a request's permits against `scopes` (most specific first: the key, then global). Checks cost
/// nothing when refused: slots are given back and request units refunded. With `shared`, request
/// rates are taken from Redis (all instances together) instead of this process's counters.
pub async fn acquire(
    scopes: &[&Arc<LimitSet>],
    queue_timeout: Option<Duration>,
    shared: Option<&Arc<RedisRates>>,
) -> Result<Admitted, Limited> {
    let deadline = queue_timeout.map(|t| Instant::now() + t);
    loop {
        let refused = match try_admit(scopes, shared).await {
            Ok(admitted) => return Ok(admitted),
            Err(refused) => refused,
        };
        let Some(deadline) = deadline else {
            return Err(refused.limited);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match refused.full_slots {
            Some(set) => {
                let slots = set.slots.as_ref().expect("full_slots has slots");
                if monoio::time::timeout(left, slots.freed()).await.is_err() {
                    return Err(refused.limited);
                }
            }
            None if refused.limited.retry_after < left => {
                monoio::time::sleep(refused.limited.retry_after).await;
            }
            None => return Err(refused.limited),
        }
    }
}

struct Refused {
    limited: Limited,
    /// The scope whose slots were all taken, to wait on.
    full_slots: Option<Arc<LimitSet>>,
}

fn refuse(
    scopes: &[&Arc<LimitSet>],
    kind: LimitKind,
    retry_after: Duration,
    full_slots: Option<Arc<LimitSet>>,
) -> Refused {
    Refused {
        limited: Limited {
            kind,
            retry_after,
            headers: headers(scopes, now_ns(), None),
        },
        full_slots,
    }
}

async fn try_admit(
    scopes: &[&Arc<LimitSet>],
    shared: Option<&Arc<RedisRates>>,
) -> Result<Admitted, Refused> {
    let now = now_ns();
    let mut permit = take_capacity(scopes, now)?;
    // Without Redis nothing is awaited: one clock reading serves every check.
    let Some(shared) = shared else {
        take_requests(scopes, now)?;
        return Ok(Admitted {
            permit,
            headers: headers(scopes, now, None),
        });
    };
    let slot_scopes: Vec<(&str, u32)> = scopes
        .iter()
        .filter_map(|s| Some((s.id.as_str(), s.slots.as_ref()?.max)))
        .collect();
    if !slot_scopes.is_empty() {
        // Unavailable Redis leaves the local slots as the only cap.
        match shared.acquire(&slot_scopes).await {
            Ok(lease) => permit.lease = lease,
            // Another instance holds the slots: retried (queueing) every 100 ms.
            Err(()) => {
                return Err(refuse(
                    scopes,
                    LimitKind::Concurrency,
                    Duration::from_millis(100),
                    None,
                ))
            }
        }
    }
    let remote_scopes: Vec<(&str, u64)> = scopes
        .iter()
        .filter_map(|s| Some((s.id.as_str(), s.requests.as_ref()?.limit)))
        .collect();
    let remote = if remote_scopes.is_empty() {
        Remote::Unavailable
    } else {
        shared.take(&remote_scopes).await
    };
    // Redis took a while: the local rates are checked at the time they are taken.
    let now = now_ns();
    let requests = match remote {
        Remote::Taken(state) => Some(state),
        // `permit` drops with the refusal and gives its slots back.
        Remote::Refused(wait) => return Err(refuse(scopes, LimitKind::Requests, wait, None)),
        Remote::Unavailable => {
            take_requests(scopes, now)?;
            None
        }
    };
    Ok(Admitted {
        permit,
        headers: headers(scopes, now, requests),
    })
}

/// Token-rate room and concurrency slots.
fn take_capacity(scopes: &[&Arc<LimitSet>], now: u64) -> Result<Permit, Refused> {
    for set in scopes {
        if let Some(Err(wait)) = set.tokens.as_ref().map(|t| t.check(now)) {
            return Err(refuse(scopes, LimitKind::Tokens, wait, None));
        }
    }
    let mut permit = Permit::default();
    for set in scopes {
        if let Some(s) = &set.slots {
            if !s.try_acquire() {
                // `permit` drops here and gives back the slots already taken.
                return Err(refuse(
                    scopes,
                    LimitKind::Concurrency,
                    Duration::from_secs(1),
                    Some(Arc::clone(set)),
                ));
            }
            permit.held.push(Arc::clone(set));
        }
    }
    Ok(permit)
}

/// One request from each scope's local rate, or from none.
fn take_requests(scopes: &[&Arc<LimitSet>], now: u64) -> Result<(), Refused> {
    for (i, set) in scopes.iter().enumerate() {
        if let Some(Err(wait)) = set.requests.as_ref().map(|r| r.try_take(now, 1)) {
            for earlier in &scopes[..i] {
                if let Some(r) = &earlier.requests {
                    r.refund(1);
                }
            }
            return Err(refuse(scopes, LimitKind::Requests, wait, None));
        }
    }
    Ok(())
}

/// OpenAI's rate-limit headers, for the first scope that has each rate; `requests` is the
/// shared (Redis) state when that decided.
fn headers(scopes: &[&Arc<LimitSet>], now: u64, requests: Option<RateState>) -> String {
    // Room for all six lines: one allocation per request.
    let mut out = String::with_capacity(256);
    let requests = requests.or_else(|| {
        scopes
            .iter()
            .find_map(|s| s.requests.as_ref().map(|r| r.peek(now)))
    });
    let tokens = scopes
        .iter()
        .find_map(|s| s.tokens.as_ref().map(|r| r.peek(now)));
    for (what, state) in [("requests", requests), ("tokens", tokens)] {
        if let Some(st) = state {
            let _ = write!(
                out,
                "x-ratelimit-limit-{what}: {}\r\nx-ratelimit-remaining-{what}: {}\r\nx-ratelimit-reset-{what}: ",
                st.limit,
                st.remaining,
            );
            write_reset(&mut out, st.reset);
            out.push_str("\r\n");
        }
    }
    out
}

/// OpenAI's reset format: "20ms", "1s", "6m0s", "1.5s".
fn write_reset(out: &mut String, d: Duration) {
    let ms = d.as_millis() as u64;
    let _ = if ms < 1000 {
        write!(out, "{ms}ms")
    } else if ms < 60_000 {
        let (secs, frac) = (ms / 1000, ms % 1000);
        match frac {
            0 => write!(out, "{secs}s"),
            f if f % 100 == 0 => write!(out, "{secs}.{}s", f / 100),
            f if f % 10 == 0 => write!(out, "{secs}.{:02}s", f / 10),
            f => write!(out, "{secs}.{f:03}s"),
        }
    } else {
        write!(out, "{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn set(rpm: Option<u64>, tpm: Option<u64>, conc: Option<u32>) -> Arc<LimitSet> {
        Arc::new(LimitSet::new(
            &LimitSpec {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                max_concurrent: conc,
            },
            "test".into(),
        ))
    }

    #[test]
    fn gcra_allows_burst_then_refills_evenly() {
        let r = Rate::per_minute(60);
        let t0 = 1_000;
        for i in 0..60 {
            let st = r.try_take(t0, 1).unwrap();
            assert_eq!(st.remaining, 59 - i);
        }
        let wait = r.try_take(t0, 1).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(r.try_take(t0 + 999_000_000, 1).is_err());
        assert!(r.try_take(t0 + 1_000_000_000, 1).is_ok());
    }

    #[test]
    fn exact_across_threads() {
        let r = Arc::new(Rate::per_minute(100));
        let now = now_ns();
        let ok = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if r.try_take(now, 1).is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(ok.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn tokens_are_checked_then_charged() {
        let r = Rate::per_minute(1000);
        let now = 1;
        assert!(r.check(now).is_ok());
        r.charge(now, 1500);
        let wait = r.check(now).unwrap_err();
        // 500 tokens of debt plus one token of room: 30.06 s.
        assert_eq!(wait.as_millis(), 30_060);
    }

    #[test]
    fn refusals_give_back_what_they_took() {
        let key = set(Some(10), None, Some(1));
        let global = set(Some(1), None, None);
        let a = run(try_admit(&[&key, &global], None))
            .map_err(|_| ())
            .unwrap();
        let b = run(try_admit(&[&key, &global], None)).err().unwrap();
        assert_eq!(b.limited.kind, LimitKind::Concurrency);
        drop(a);
        assert_eq!(key.slots.as_ref().unwrap().in_use(), 0);
        let c = run(try_admit(&[&key, &global], None)).err().unwrap();
        assert_eq!(c.limited.kind, LimitKind::Requests);
        assert_eq!(key.slots.as_ref().unwrap().in_use(), 0);
        // The key's request unit was refunded: 9 of 10 left after the one admitted.
        assert_eq!(key.requests.as_ref().unwrap().peek(now_ns()).remaining, 9);
    }

    #[test]
    fn header_format() {
        let key = set(Some(60), Some(1000), None);
        let a = run(try_admit(&[&key], None)).map_err(|_| ()).unwrap();
        assert!(a.headers.contains("x-ratelimit-limit-requests: 60\r\n"));
        assert!(a.headers.contains("x-ratelimit-remaining-requests: 59\r\n"));
        assert!(a.headers.contains("x-ratelimit-reset-requests: 1s\r\n"));
        assert!(a.headers.contains("x-ratelimit-remaining-tokens: 1000\r\n"));
        let reset = |d| {
            let mut s = String::new();
            write_reset(&mut s, d);
            s
        };
        assert_eq!(reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(reset(Duration::from_millis(1050)), "1.05s");
        assert_eq!(reset(Duration::from_millis(1234)), "1.234s");
        assert_eq!(reset(Duration::from_millis(2000)), "2s");
        assert_eq!(reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset(Duration::from_millis(20)), "20ms");
    }
}
