//! An async interval lock: holders of overlapping byte ranges exclude each other, disjoint
//! ranges proceed in parallel.
//!
//! The primary takes it for every application write (until local completion *and* the
//! peer's ack) and for every resync chunk (read, send, ack), so overlapping requests reach
//! the peer in the order they are applied locally, and a resync chunk never races an
//! application write to the same blocks (DRBD's conflict detection, `drbd_req.c`
//! `complete_conflicting_writes`, and resync/application interval handling in
//! `drbd_interval.c`).

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
struct Inner {
    held: Vec<(u64, u64, u64)>,
    next_id: u64,
    /// Callers waiting for a release: a release with none skips the notify (which locks the
    /// `Notify`), the common case on every application write.
    waiting: usize,
}

/// The lock. Cheap to clone.
#[derive(Clone, Default)]
pub struct IntervalLock {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

/// Holds `[start, end)` until dropped.
pub struct IntervalGuard {
    lock: IntervalLock,
    id: u64,
}

impl IntervalLock {
    /// A new, empty lock.
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `[start, end)` if no holder overlaps it; otherwise counts the caller as waiting
    /// (under the same lock, so the release it waits for sees it).
    fn try_take(&self, start: u64, end: u64, wait: &mut Option<Waiting>) -> Option<u64> {
        let mut g = self.inner();
        if g.held.iter().any(|&(_, s, e)| s < end && start < e) {
            if wait.is_none() {
                g.waiting += 1;
                *wait = Some(Waiting(self.clone()));
            }
            return None;
        }
        g.next_id += 1;
        let id = g.next_id;
        g.held.push((id, start, end));
        Some(id)
    }

    /// Waits until no holder overlaps `[start, end)` and takes it.
    pub async fn lock(&self, start: u64, end: u64) -> IntervalGuard {
        let end = end.max(start + 1);
        let mut wait = None;
        loop {
            // Before the check, so a release in between still wakes it (releases are
            // `notify_waiters`, which needs no `enable`: that would lock the Notify twice).
            let notified = self.notify.notified();
            tokio::pin!(notified);
            if let Some(id) = self.try_take(start, end, &mut wait) {
                return IntervalGuard {
                    lock: self.clone(),
                    id,
                };
            }
            notified.await;
        }
    }

    /// Number of ranges held.
    pub fn held(&self) -> usize {
        self.inner().held.len()
    }
}

/// Counts a caller in [`Inner::waiting`] until it has the range or gives up (its `lock`
/// future dropped).
struct Waiting(IntervalLock);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.inner().waiting -= 1;
    }
}

impl Drop for IntervalGuard {
    fn drop(&mut self) {
        let waiting = {
            let mut g = self.lock.inner();
            g.held.retain(|&(id, _, _)| id != self.id);
            g.waiting
        };
        if waiting > 0 {
            self.lock.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_waits_disjoint_does_not() {
        let l = IntervalLock::new();
        let a = l.lock(0, 100).await;
        let _b = tokio::time::timeout(Duration::from_millis(100), l.lock(100, 200))
            .await
            .expect("disjoint range must not wait");
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            let _c = l2.lock(50, 60).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.inner().waiting, 0);
    }

    /// A waiter that gives up is no longer counted; many waiters on one range all get it in
    /// turn.
    #[tokio::test]
    async fn waiters_are_counted_until_they_take_the_range_or_give_up() {
        let l = IntervalLock::new();
        let a = l.lock(0, 100).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(20), l.lock(10, 20)).await;
        assert!(gave_up.is_err());
        assert_eq!(l.inner().waiting, 0);
        let waiters: Vec<_> = (0..4)
            .map(|i| {
                let l = l.clone();
                tokio::spawn(async move {
                    let _g = l.lock(i * 10, i * 10 + 50).await;
                    tokio::task::yield_now().await;
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(l.inner().waiting, 4);
        drop(a);
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .expect("every waiter gets the range")
                .unwrap();
        }
        assert_eq!(l.inner().waiting, 0);
        assert_eq!(l.held(), 0);
    }
}
