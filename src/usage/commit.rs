//! `usage_hook.durability: sync`: how a worker learns that the records it sent are committed to
//! the spool, without blocking and without a thread wake-up per request. Owns the per-worker
//! commit marks and the future a request awaits; it must not touch the spool or the channel.
//!
//! Each worker numbers the events it sends to one reporter (1, 2, ...); one worker's events
//! reach the ingest thread in that order (one channel, one sender thread). After each spool
//! commit the ingest thread raises the worker's mark to the highest number it committed and
//! wakes one waiting request of that worker: one cross-thread wake per worker per batch. That
//! request, polled on its worker, wakes (locally, no syscall) every other request the mark now
//! covers. A spool that fails to commit releases every waiter (`failing`): responses are never
//! held hostage by a full disk; the records then wait in the ingest thread's retry loop.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// One reporter's commit marks, one slot per worker.
pub struct Commits {
    slots: Box<[Slot]>,
    /// Set while spool writes fail: waits end at once.
    failing: AtomicBool,
}

struct Slot {
    /// The last number this worker gave an event (written by the worker only).
    sent: AtomicU64,
    /// Every event numbered up to this one is committed (written by the ingest thread).
    committed: AtomicU64,
    /// This worker's waiting requests: (number, waker). Locked by the worker per poll and by the
    /// ingest thread once per batch; never contended on the request path in practice.
    waiting: Mutex<Vec<(u64, Waker)>>,
}

impl Slot {
    fn waiting(&self) -> MutexGuard<'_, Vec<(u64, Waker)>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Commits {
    pub fn new(workers: usize) -> Arc<Commits> {
        Arc::new(Commits {
            slots: (0..workers.max(1))
                .map(|_| Slot {
                    sent: AtomicU64::new(0),
                    committed: AtomicU64::new(0),
                    waiting: Mutex::new(Vec::new()),
                })
                .collect(),
            failing: AtomicBool::new(false),
        })
    }

    /// The number of `worker`'s next event (worker side, before the send). Workers beyond the
    /// slots (none in practice: slots are made per configured worker) share the last slot's
    /// numbering, which only makes their waits end early or late, never hang.
    pub fn next(&self, worker: usize) -> Ticket {
        let worker = worker.min(self.slots.len() - 1);
        let seq = self.slots[worker].sent.fetch_add(1, Ordering::Relaxed) + 1;
        Ticket { worker, seq }
    }

    /// Ingest side: `worker`'s events up to `seq` are committed. Wakes one of its waiting
    /// requests, which wakes the others the mark covers.
    pub fn committed(&self, worker: usize, seq: u64) {
        let slot = &self.slots[worker];
        slot.committed.fetch_max(seq, Ordering::Release);
        // Under the lock: a request registering now either is seen here or sees the new mark.
        if let Some((_, waker)) = slot.waiting().last() {
            waker.wake_by_ref();
        }
    }

    /// Ingest side: spool writes fail (`true`) or work again. Failing releases every waiter.
    pub fn set_failing(&self, failing: bool) {
        if self.failing.swap(failing, Ordering::AcqRel) == failing || !failing {
            return;
        }
        for slot in self.slots.iter() {
            if let Some((_, waker)) = slot.waiting().last() {
                waker.wake_by_ref();
            }
        }
    }

    /// The future that completes once `ticket`'s event is committed.
    pub fn wait(self: &Arc<Self>, ticket: Ticket) -> Committed {
        Committed {
            commits: self.clone(),
            ticket,
            registered: false,
        }
    }
}

/// One event's place in its worker's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub worker: usize,
    pub seq: u64,
}

/// Completes when its event is committed to the spool (or the spool is failing).
pub struct Committed {
    commits: Arc<Commits>,
    ticket: Ticket,
    registered: bool,
}

impl Future for Committed {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Ticket { worker, seq } = self.ticket;
        let slot = &self.commits.slots[worker];
        let mut waiting = slot.waiting();
        // Read under the lock (see `Commits::committed`).
        let committed = slot.committed.load(Ordering::Acquire);
        let failing = self.commits.failing.load(Ordering::Acquire);
        // Hand the news on to the other requests it covers: local wakes, no syscall.
        waiting.retain(|(s, waker)| {
            let done = *s <= committed || failing;
            if done && *s != seq {
                waker.wake_by_ref();
            }
            !done
        });
        if seq <= committed || failing {
            drop(waiting);
            self.registered = false;
            return Poll::Ready(());
        }
        match waiting.iter_mut().find(|(s, _)| *s == seq) {
            Some((_, waker)) => waker.clone_from(cx.waker()),
            None => waiting.push((seq, cx.waker().clone())),
        }
        drop(waiting);
        self.registered = true;
        Poll::Pending
    }
}

impl Drop for Committed {
    fn drop(&mut self) {
        if !self.registered {
            return;
        }
        let Ticket { worker, seq } = self.ticket;
        let mut waiting = self.commits.slots[worker].waiting();
        waiting.retain(|(s, _)| *s != seq);
        // The ingest thread wakes the last one; any that is left will do.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Count(AtomicU64);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn one_wake_per_batch_covers_every_waiter() {
        let commits = Commits::new(2);
        let counts: Vec<Arc<Count>> = (0..3).map(|_| Arc::new(Count(AtomicU64::new(0)))).collect();
        let wakers: Vec<Waker> = counts.iter().map(|c| Waker::from(c.clone())).collect();
        let tickets: Vec<Ticket> = (0..3).map(|_| commits.next(1)).collect();
        assert_eq!(tickets[2], Ticket { worker: 1, seq: 3 });
        let mut futures: Vec<Committed> = tickets.iter().map(|t| commits.wait(*t)).collect();
        for (f, w) in futures.iter_mut().zip(&wakers) {
            let mut cx = Context::from_waker(w);
            assert!(Pin::new(f).poll(&mut cx).is_pending());
        }
        // Another worker's commit wakes nobody here.
        commits.committed(0, 5);
        assert!(counts.iter().all(|c| c.0.load(Ordering::Relaxed) == 0));
        // The batch holding events 1 and 2: one wake, of the last registered request.
        commits.committed(1, 2);
        let woken: Vec<u64> = counts.iter().map(|c| c.0.load(Ordering::Relaxed)).collect();
        assert_eq!(woken, [0, 0, 1]);
        // It is not covered yet; polling it wakes the two that are.
        let mut cx = Context::from_waker(&wakers[2]);
        assert!(Pin::new(&mut futures[2]).poll(&mut cx).is_pending());
        let woken: Vec<u64> = counts.iter().map(|c| c.0.load(Ordering::Relaxed)).collect();
        assert_eq!(woken, [1, 1, 1]);
        for i in 0..2 {
            let mut cx = Context::from_waker(&wakers[i]);
            assert!(Pin::new(&mut futures[i]).poll(&mut cx).is_ready());
        }
        // A failing spool releases the rest.
        commits.set_failing(true);
        assert_eq!(counts[2].0.load(Ordering::Relaxed), 2);
        assert!(Pin::new(&mut futures[2]).poll(&mut cx).is_ready());
        commits.set_failing(false);
        let late = commits.next(1);
        let mut f = commits.wait(late);
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        drop(f);
        assert!(commits.slots[1].waiting().is_empty());
    }
}
