//! Busy polling (`busy_poll` in the config): after relay activity, a worker keeps its io_uring
//! loop turning for a short window instead of sleeping in the kernel, so that the next socket
//! event is seen without a wake-up. Owns the per-worker poller task and the activity mark the
//! relay sets; it must not do any I/O beyond the poller's own no-op reads.
//!
//! Why: on an idle core the runtime sleeps in `io_uring_enter`, and each wake-up (a scheduler
//! switch, on a VM an interrupt to a halted vCPU) costs tens of microseconds. A relay pays it
//! twice per request (the request arriving, the backend's answer arriving), which is most of
//! what a gateway adds at low concurrency. Spinning trades CPU for that latency, which is why
//! it is off by default and bounded by the window after the last activity.
//!
//! How: the poller keeps one read of `/dev/zero` in flight. The read completes as soon as it is
//! submitted, so the runtime's park (submit and wait for one completion) returns at once: it
//! reaps every other completion and runs expired timers on the way, exactly as a real park does,
//! but without sleeping. A task that merely re-woke itself would make the runtime skip its park
//! and with it the timer wheel. Only io_uring is served: with epoll the read would complete
//! inline and the loop would never reach the kernel.

use std::cell::{Cell, RefCell};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    /// Set by [`mark_activity`] on this worker's thread, cleared by the poller.
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    /// The idle poller, waiting for activity.
    static IDLE: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Something arrived on a socket (a request head, a backend read): another event is likely to
/// follow soon. Cheap enough for every read: a flag, and a wake only when the poller is idle.
pub fn mark_activity() {
    ACTIVE.with(|a| a.set(true));
    if let Some(waker) = IDLE.with(|w| w.borrow_mut().take()) {
        waker.wake();
    }
}

/// Runs on a worker's runtime for its lifetime: spins for `window` after each activity.
pub async fn poller(window: Duration) {
    let zero = match monoio::fs::File::open("/dev/zero").await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("busy_poll disabled: cannot open /dev/zero: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; 1];
    loop {
        std::future::poll_fn(|cx| {
            if ACTIVE.with(|a| a.replace(false)) {
                Poll::Ready(())
            } else {
                IDLE.with(|w| *w.borrow_mut() = Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        let mut until = Instant::now() + window;
        loop {
            let (read, b) = zero.read_at(buf, 0).await;
            buf = b;
            if read.is_err() {
                tracing::warn!("busy_poll disabled: reading /dev/zero failed");
                return;
            }
            let now = Instant::now();
            if ACTIVE.with(|a| a.replace(false)) {
                until = now + window;
            } else if now >= until {
                break;
            }
        }
    }
}
