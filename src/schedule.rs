//! Scheduling: owns the order in which requests wait for a saturated backend when `scheduling`
//! is on. Strict priority bands first (higher first); within a band, the flow (a key) that has
//! received the least weighted service goes first: the Virtual Token Counter of Sheng et al.,
//! "Fairness in Serving Large Language Models" (OSDI 2024). A flow that starts waiting is lifted
//! to the least counter among the flows waiting in its band (or to the counter of the last flow
//! served when none wait), so idle time earns no credit and a flooding key gets its share and
//! no more.
//!
//! One [`Scheduler`] per process, shared by every worker and by every config generation since
//! scheduling was turned on: a request that waits under a replaced config keeps its place among
//! those that arrive under the new one. A small mutex-protected list of waiters, touched only
//! when a request must wait or a slot frees while some wait (one atomic load tells whether any
//! do). A freed slot is handed to the chosen waiter directly: the grant carries it (`T`, the
//! upstream's in-flight count), so a waiter woken on another core never races newcomers for
//! it, and a grant its waiter no longer wants is dropped, which frees the slot again for the
//! next one.
//!
//! It must not know backends, HTTP or keys: backends are opaque ids (the same for a backend
//! across config generations), the grant is opaque, flows are [`Service`] counters.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

/// A flow's service received, in milli-tokens (prompt + weighted completion), for the Virtual
/// Token Counter. Charged a request's estimated prompt when it is dispatched and each token of a
/// streamed answer as it is relayed, then corrected with its metered tokens when its usage
/// record is read.
#[derive(Debug, Default)]
pub struct Service {
    milli: AtomicI64,
    /// Requests of the flow at a backend now: a flow with none is fresh (an interactive
    /// user's next turn), which an engine that preempts serves at once.
    dispatched: AtomicU32,
}

impl Service {
    /// Whether the flow has no request at a backend now.
    pub fn is_idle(&self) -> bool {
        self.dispatched.load(Ordering::Relaxed) == 0
    }

    /// Counts one of its requests at a backend until the guard is dropped.
    pub fn dispatch(self: &Arc<Self>) -> Dispatched {
        self.dispatched.fetch_add(1, Ordering::Relaxed);
        Dispatched(self.clone())
    }

    /// Adds `tokens` (negative to correct an estimate that was too high).
    pub fn charge(&self, tokens: f64) {
        self.milli
            .fetch_add((tokens * 1000.0) as i64, Ordering::Relaxed);
    }

    fn value(&self) -> i64 {
        self.milli.load(Ordering::Relaxed)
    }

    fn lift(&self, floor: i64) {
        self.milli.fetch_max(floor, Ordering::Relaxed);
    }
}

/// The flow of the key with id `key_id`, the same for every config generation that knows the
/// key: a reload keeps its counter and its count of requests at a backend. Held weakly here, so
/// a key no generation knows any more is forgotten.
pub fn flow_of(key_id: &str) -> Arc<Service> {
    static FLOWS: LazyLock<Mutex<HashMap<String, Weak<Service>>>> = LazyLock::new(Default::default);
    let mut flows = lock(&FLOWS);
    if let Some(flow) = flows.get(key_id).and_then(Weak::upgrade) {
        return flow;
    }
    // Forget the dead now and then: the map stays within twice the keys alive.
    if flows.len() >= 64 && flows.len().is_power_of_two() {
        flows.retain(|_, f| f.strong_count() > 0);
    }
    let flow = Arc::new(Service::default());
    flows.insert(key_id.to_owned(), Arc::downgrade(&flow));
    flow
}

/// One request of a flow at a backend ([`Service::dispatch`]).
#[derive(Debug)]
pub struct Dispatched(Arc<Service>);

impl Drop for Dispatched {
    fn drop(&mut self) {
        self.0.dispatched.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a request stopped waiting without a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_queue` requests wait and none of them has a lower priority.
    Full,
    /// A request of higher priority took its place in a full queue.
    Shed,
}

/// Who a waiting request is, for its place in the order.
pub struct Class {
    pub priority: i32,
    /// The flow's counter; `None` for requests without a key (one flow: first come first served).
    pub service: Option<Arc<Service>>,
}

/// The waiters of the process, shared by every worker and config generation.
pub struct Scheduler<T> {
    /// `scheduling.max_queue` of the running config.
    max_queue: AtomicUsize,
    /// Waiters in `queue`, readable without the lock.
    queued: AtomicUsize,
    queue: Mutex<Queue<T>>,
    /// The flow of requests without a key.
    anonymous: Arc<Service>,
}

impl<T> std::fmt::Debug for Scheduler<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("max_queue", &self.max_queue.load(Ordering::Relaxed))
            .field("queued", &self.backlog())
            .finish_non_exhaustive()
    }
}

struct Queue<T> {
    /// In arrival order; at most `max_queue`.
    waiting: Vec<Arc<Ticket<T>>>,
    next_seq: u64,
    /// The counter of the flow served last: where a flow is lifted to when none waits.
    last_served: i64,
}

struct Ticket<T> {
    priority: i32,
    service: Arc<Service>,
    /// Ids of the backends that could take the request.
    backends: Box<[u64]>,
    seq: u64,
    state: Mutex<State<T>>,
}

enum State<T> {
    Waiting(Option<Waker>),
    Granted(T),
    Refused(Refusal),
    /// The waiter took its grant or refusal.
    Done,
}

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T> Ticket<T> {
    /// Order of service: higher priority, then the least service received, then arrival.
    fn rank(&self) -> (i64, i64, u64) {
        (-i64::from(self.priority), self.service.value(), self.seq)
    }

    /// Ends the wait with `state`; the waker to call once every lock is released.
    fn settle(&self, state: State<T>) -> Option<Waker> {
        match std::mem::replace(&mut *lock(&self.state), state) {
            State::Waiting(waker) => waker,
            _ => None,
        }
    }
}

impl<T> Scheduler<T> {
    pub fn new(max_queue: usize) -> Scheduler<T> {
        Scheduler {
            max_queue: AtomicUsize::new(max_queue),
            queued: AtomicUsize::new(0),
            queue: Mutex::new(Queue {
                waiting: Vec::new(),
                next_seq: 0,
                last_served: 0,
            }),
            anonymous: Arc::new(Service::default()),
        }
    }

    /// A reload's `scheduling.max_queue`: waiters beyond it stay, newcomers find the queue full.
    pub fn set_max_queue(&self, max_queue: usize) {
        self.max_queue.store(max_queue, Ordering::Relaxed);
    }

    /// Requests waiting now. Sequentially consistent with the slot counts it guards: a slot
    /// freed just before a request starts waiting is seen by one side or the other.
    pub fn backlog(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// The flow a request of `class` belongs to.
    pub fn flow<'a>(&'a self, class: &'a Class) -> &'a Arc<Service> {
        class.service.as_ref().unwrap_or(&self.anonymous)
    }

    /// The highest priority among the requests waiting now, if any wait.
    pub fn highest_waiting(&self) -> Option<i32> {
        if self.backlog() == 0 {
            return None;
        }
        lock(&self.queue).waiting.iter().map(|t| t.priority).max()
    }

    /// Requests waiting now by priority, highest first (for the metrics).
    pub fn depth_by_priority(&self) -> Vec<(i32, usize)> {
        let q = lock(&self.queue);
        let mut depth: Vec<(i32, usize)> = Vec::new();
        for t in &q.waiting {
            match depth.iter_mut().find(|(p, _)| *p == t.priority) {
                Some((_, n)) => *n += 1,
                None => depth.push((t.priority, 1)),
            }
        }
        depth.sort_by_key(|&(p, _)| std::cmp::Reverse(p));
        depth
    }

    /// Starts waiting for a slot on one of `backends` (ids). The caller must then offer those
    /// backends' free slots (a slot freed while it was deciding to wait would otherwise go
    /// unnoticed). A full queue sheds its newest waiter of the lowest priority below this one,
    /// or refuses this one.
    pub fn enqueue(
        &self,
        class: &Class,
        backends: impl IntoIterator<Item = u64>,
    ) -> Result<Wait<'_, T>, Refusal> {
        let service = self.flow(class);
        let backends = backends.into_iter().collect();
        let mut shed = None;
        let ticket = {
            let mut q = lock(&self.queue);
            if q.waiting.len() >= self.max_queue.load(Ordering::Relaxed) {
                let victim = q
                    .waiting
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.priority < class.priority)
                    .min_by_key(|(_, t)| (t.priority, std::cmp::Reverse(t.seq)))
                    .map(|(i, _)| i)
                    .ok_or(Refusal::Full)?;
                let victim = q.waiting.remove(victim);
                self.queued.fetch_sub(1, Ordering::SeqCst);
                shed = victim.settle(State::Refused(Refusal::Shed));
            }
            // Newly backlogged: lifted so that time spent idle earns no credit. Just below the
            // least counter waiting, so a light key that was idle goes next rather than after
            // one more request of the flow it ties with.
            let band = q.waiting.iter().filter(|t| t.priority == class.priority);
            if !band.clone().any(|t| Arc::ptr_eq(&t.service, service)) {
                let floor = band.map(|t| t.service.value() - 1).min();
                service.lift(floor.unwrap_or(q.last_served));
            }
            let ticket = Arc::new(Ticket {
                priority: class.priority,
                service: service.clone(),
                backends,
                seq: q.next_seq,
                state: Mutex::new(State::Waiting(None)),
            });
            q.next_seq += 1;
            q.waiting.push(ticket.clone());
            self.queued.fetch_add(1, Ordering::SeqCst);
            ticket
        };
        if let Some(w) = shed {
            w.wake();
        }
        Ok(Wait {
            scheduler: self,
            ticket,
        })
    }

    /// Hands a slot of the backend with id `backend` to the first waiter in order that could
    /// use it: `take` claims the slot (`None`: there is none after all). Whether a waiter got
    /// one.
    pub fn grant(&self, backend: u64, take: impl FnOnce() -> Option<T>) -> bool {
        if self.backlog() == 0 {
            return false;
        }
        let waker = {
            let mut q = lock(&self.queue);
            let Some(first) = q
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, t)| t.backends.contains(&backend))
                .min_by_key(|(_, t)| t.rank())
                .map(|(i, _)| i)
            else {
                return false;
            };
            let Some(slot) = take() else {
                return false;
            };
            let ticket = q.waiting.remove(first);
            self.queued.fetch_sub(1, Ordering::SeqCst);
            q.last_served = ticket.service.value();
            ticket.settle(State::Granted(slot))
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }
}

/// One request's wait: resolves with a slot, or the reason it got none. Dropped early (timeout,
/// the client left), it leaves the queue, and a slot granted meanwhile is dropped, which frees
/// it for the next waiter.
pub struct Wait<'a, T> {
    scheduler: &'a Scheduler<T>,
    ticket: Arc<Ticket<T>>,
}

impl<T> Future for Wait<'_, T> {
    type Output = Result<T, Refusal>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = lock(&self.ticket.state);
        match std::mem::replace(&mut *state, State::Done) {
            State::Granted(slot) => Poll::Ready(Ok(slot)),
            State::Refused(why) => Poll::Ready(Err(why)),
            State::Waiting(_) => {
                *state = State::Waiting(Some(cx.waker().clone()));
                Poll::Pending
            }
            State::Done => Poll::Pending,
        }
    }
}

impl<T> Drop for Wait<'_, T> {
    fn drop(&mut self) {
        {
            let mut q = lock(&self.scheduler.queue);
            if let Some(i) = q.waiting.iter().position(|t| Arc::ptr_eq(t, &self.ticket)) {
                q.waiting.remove(i);
                self.scheduler.queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
        // Outside every lock: dropping the slot may grant it to the next waiter.
        let unclaimed = std::mem::replace(&mut *lock(&self.ticket.state), State::Done);
        drop(unclaimed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls `w` once: `Some` once it has ended.
    fn poll<T>(w: &mut Wait<'_, T>, waker: &Waker) -> Option<Result<T, Refusal>> {
        match Pin::new(w).poll(&mut Context::from_waker(waker)) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    fn class(priority: i32, service: &Arc<Service>) -> Class {
        Class {
            priority,
            service: Some(service.clone()),
        }
    }

    #[test]
    fn a_freed_slot_goes_to_the_waiter_that_can_use_it_and_wakes_it() {
        let s: Scheduler<&str> = Scheduler::new(8);
        let (a, b) = (Arc::new(Service::default()), Arc::new(Service::default()));
        let counter = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut on_1 = s.enqueue(&class(0, &a), [1]).unwrap();
        let mut on_0 = s.enqueue(&class(0, &b), [0]).unwrap();
        assert!(poll(&mut on_1, &waker).is_none() && poll(&mut on_0, &waker).is_none());
        assert_eq!(s.backlog(), 2);
        // No slot after all: nobody is granted.
        assert!(!s.grant(0, || None));
        assert!(s.grant(0, || Some("slot on 0")));
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert_eq!(poll(&mut on_0, &waker), Some(Ok("slot on 0")));
        assert!(poll(&mut on_1, &waker).is_none());
        assert!(!s.grant(0, || Some("nobody wants it")));
        assert_eq!(s.backlog(), 1);
    }

    #[test]
    fn higher_priority_first_then_least_service_then_arrival() {
        let s: Scheduler<u32> = Scheduler::new(16);
        let (heavy, light) = (Arc::new(Service::default()), Arc::new(Service::default()));
        heavy.charge(10_000.0);
        let waker = Waker::noop();
        let mut low = s.enqueue(&class(-1, &light), [0]).unwrap();
        let mut heavy1 = s.enqueue(&class(0, &heavy), [0]).unwrap();
        let mut heavy2 = s.enqueue(&class(0, &heavy), [0]).unwrap();
        // Lifted to just below the least counter waiting in its band (heavy's): no credit for
        // idling beyond going next.
        let mut light1 = s.enqueue(&class(0, &light), [0]).unwrap();
        let mut high = s.enqueue(&class(5, &heavy), [0]).unwrap();
        let mut order = Vec::new();
        for slot in 0..5u32 {
            assert!(s.grant(0, || Some(slot)));
            for (name, w) in [
                ("low", &mut low),
                ("heavy1", &mut heavy1),
                ("heavy2", &mut heavy2),
                ("light1", &mut light1),
                ("high", &mut high),
            ] {
                if let Some(Ok(_)) = poll(w, waker) {
                    order.push(name);
                    // What a dispatched request is charged.
                    if name.starts_with("heavy") {
                        heavy.charge(100.0);
                    } else if name == "light1" {
                        light.charge(100.0);
                    }
                }
            }
        }
        assert_eq!(order, ["high", "light1", "heavy1", "heavy2", "low"]);
        // Lifted, not reset: its counter is the heavy key's, less a milli-token.
        assert_eq!(light.value(), 10_000_000 - 1 + 100_000);
    }

    #[test]
    fn two_backlogged_keys_share_slots_by_tokens_not_by_requests() {
        // Key a's requests cost 3x key b's: over many grants b gets about 3 requests per a's one,
        // so their tokens served stay about equal, however many each has waiting.
        let s: Scheduler<()> = Scheduler::new(1000);
        let (a, b) = (Arc::new(Service::default()), Arc::new(Service::default()));
        let mut waits: Vec<(char, Wait<'_, ()>)> = Vec::new();
        for i in 0..300 {
            waits.push(('a', s.enqueue(&class(0, &a), [0]).unwrap()));
            if i % 3 == 0 {
                waits.push(('b', s.enqueue(&class(0, &b), [0]).unwrap()));
            }
        }
        let (mut tokens_a, mut tokens_b) = (0.0, 0.0);
        let waker = Waker::noop();
        for _ in 0..120 {
            assert!(s.grant(0, || Some(())));
            let i = waits
                .iter_mut()
                .position(|(_, w)| poll(w, waker).is_some())
                .unwrap();
            let (who, _) = waits.remove(i);
            if who == 'a' {
                a.charge(300.0);
                tokens_a += 300.0;
            } else {
                b.charge(100.0);
                tokens_b += 100.0;
            }
        }
        let share = tokens_a / (tokens_a + tokens_b);
        assert!((0.45..=0.55).contains(&share), "a's share {share}");
    }

    #[test]
    fn a_full_queue_sheds_the_newest_lowest_priority_waiter_or_refuses() {
        let s: Scheduler<()> = Scheduler::new(2);
        let k = Arc::new(Service::default());
        let waker = Waker::noop();
        let mut old_low = s.enqueue(&class(-1, &k), [0]).unwrap();
        let mut new_low = s.enqueue(&class(-1, &k), [0]).unwrap();
        assert_eq!(s.enqueue(&class(-1, &k), [0]).err(), Some(Refusal::Full));
        let _normal = s.enqueue(&class(0, &k), [0]).unwrap();
        assert_eq!(poll(&mut new_low, waker), Some(Err(Refusal::Shed)));
        assert!(poll(&mut old_low, waker).is_none());
        assert_eq!(s.backlog(), 2);
        assert_eq!(s.depth_by_priority(), [(0, 1), (-1, 1)]);
    }

    #[test]
    fn a_waiter_that_leaves_frees_its_place_and_drops_an_unclaimed_slot() {
        struct Slot(Arc<AtomicUsize>);
        impl Drop for Slot {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let freed = Arc::new(AtomicUsize::new(0));
        let s: Scheduler<Slot> = Scheduler::new(4);
        let k = Arc::new(Service::default());
        let gone = s.enqueue(&class(0, &k), [0]).unwrap();
        drop(gone);
        assert_eq!(s.backlog(), 0);
        let granted = s.enqueue(&class(0, &k), [0]).unwrap();
        assert!(s.grant(0, || Some(Slot(freed.clone()))));
        assert_eq!(freed.load(Ordering::SeqCst), 0);
        drop(granted);
        assert_eq!(freed.load(Ordering::SeqCst), 1);
    }
}
