//! Preemptive dispatch to a backend whose engine preempts on arrival (`engine_priority:
//! sglang`): owns the count of this backend's requests in flight by engine priority level, and
//! the decision to send a request past `max_in_flight` because the engine will preempt a
//! less urgent running request to make room for it.
//!
//! It must not compute levels (the scheduling class does) or touch request bodies. One lock per
//! dispatch and release, on such backends only: their requests already go through the
//! scheduler, and a level count must be exact to bound how far past the limit it sends.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

use super::Backend;

/// A preempting backend's requests in flight, counted by level.
#[derive(Debug, Default)]
pub struct Levels {
    /// (level, requests), a few entries: one per band and freshness in use.
    counts: Mutex<Vec<(i64, u32)>>,
}

impl Levels {
    fn lock(&self) -> MutexGuard<'_, Vec<(i64, u32)>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request dispatched at `level`.
    pub fn add(&self, level: i64) {
        add(&mut self.lock(), level);
    }

    /// Uncounts a request of `level` that ended.
    pub fn remove(&self, level: i64) {
        let mut counts = self.lock();
        if let Some(i) = counts.iter().position(|&(l, _)| l == level) {
            counts[i].1 -= 1;
            if counts[i].1 == 0 {
                counts.swap_remove(i);
            }
        }
    }
}

fn add(counts: &mut Vec<(i64, u32)>, level: i64) {
    match counts.iter_mut().find(|(l, _)| *l == level) {
        Some((_, n)) => *n += 1,
        None => counts.push((level, 1)),
    }
}

/// Takes a slot on `backend` past its `max_in_flight` for a request at `level`, counted at that
/// level, when the engine will preempt for it: more requests of a lower level are in flight
/// than requests already sent past the limit (each of which displaced one of them). Whether it
/// took one.
pub fn take_past_limit(backend: &Backend, levels: &Levels, level: i64) -> bool {
    let mut counts = levels.lock();
    let below: u32 = counts
        .iter()
        .filter(|&&(l, _)| l < level)
        .map(|&(_, n)| n)
        .sum();
    // Under the lock, so two arrivals never count the same victim.
    let past = backend
        .in_flight()
        .saturating_sub(backend.max_in_flight.unwrap_or(u32::MAX));
    if below <= past {
        return false;
    }
    backend.in_flight.fetch_add(1, Ordering::SeqCst);
    add(&mut counts, level);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_count_and_uncount() {
        let l = Levels::default();
        l.add(0);
        l.add(0);
        l.add(50);
        l.remove(0);
        assert_eq!(*l.lock(), [(0, 1), (50, 1)]);
        l.remove(0);
        l.remove(50);
        assert!(l.lock().is_empty());
    }
}
