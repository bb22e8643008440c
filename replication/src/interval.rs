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

    fn try_take(&self, start: u64, end: u64) -> Option<u64> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.held.iter().any(|&(_, s, e)| s < end && start < e) {
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
        loop {
            // Before the check, so a release in between still wakes it (releases are
            // `notify_waiters`, which needs no `enable`: that would lock the Notify twice).
            let notified = self.notify.notified();
            tokio::pin!(notified);
            if let Some(id) = self.try_take(start, end) {
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
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .held
            .len()
    }
}

impl Drop for IntervalGuard {
    fn drop(&mut self) {
        {
            let mut g = self.lock.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.held.retain(|&(id, _, _)| id != self.id);
        }
        self.lock.notify.notify_waiters();
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
    }
}
