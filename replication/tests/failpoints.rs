//! Interleavings that timing cannot produce reliably, forced with fail points (the `fail`
//! crate, compiled in only for tests). Fail points are process-wide: this file is its own
//! test binary so that no other test's promotion or handshake stops at them.

mod common;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use twinsan_replication::volume::Role;

const SIZE: u64 = 8 * MIB;
const T: Duration = Duration::from_secs(20);

/// Holds the threads that reach a fail point until released; says whether one arrived.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<(bool, bool)>, Condvar)>);

impl Gate {
    /// The fail point's callback (runs on a blocking-pool thread: it may block).
    fn arrive(&self) {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap();
        g.0 = true;
        cv.notify_all();
        while !g.1 {
            g = cv.wait(g).unwrap();
        }
    }

    fn arrived_within(&self, d: Duration) -> bool {
        let (m, cv) = &*self.0;
        let g = m.lock().unwrap();
        cv.wait_timeout_while(g, d, |g| !g.0).unwrap().0 .0
    }

    fn release(&self) {
        let (m, cv) = &*self.0;
        m.lock().unwrap().1 = true;
        cv.notify_all();
    }
}

fn gate_at(name: &str) -> Gate {
    let g = Gate::default();
    let h = g.clone();
    fail::cfg_callback(name, move || h.arrive()).unwrap();
    g
}

/// A promotion that passed its checks before the link came back, and a reconnect: the
/// handshake must not run in between. It would send the old role, the promotion's update
/// would be dropped for want of an attached link, and the peer would keep the old role for
/// the connection's life (an ALUA test saw the standby report both port groups as
/// transitioning). Role changes and handshakes serialize, as DRBD's state mutex does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_and_a_reconnect_handshake_do_not_interleave() {
    let p = Pair::new(SIZE, skip(), skip(), Role::Secondary, |_| {}).await;
    wait_until("both Connected", T, || connected(&p.a) && connected(&p.b)).await;
    p.cut();
    wait_until("apart", T, || !connected(&p.a) && !connected(&p.b)).await;

    let promoting = gate_at("promote-metadata");
    let a = p.a.vol.clone();
    let promote = tokio::spawn(async move { a.promote(false).await });
    assert!(
        promoting.arrived_within(T),
        "the promotion never reached its metadata write"
    );
    let verdict = gate_at("verdict-metadata");
    p.restore();
    // Two dial attempts' worth (the back-off starts at 100 ms): time for a handshake to run
    // up to its verdict, had it not waited for the promotion.
    let interleaved = verdict.arrived_within(Duration::from_secs(2));
    promoting.release();
    verdict.release();
    promote.await.unwrap().unwrap();
    fail::remove("promote-metadata");
    fail::remove("verdict-metadata");
    assert!(
        !interleaved,
        "a handshake ran while a promotion was between its check and its new role"
    );
    wait_until("B connected and sees A primary", T, || {
        connected(&p.b) && p.b.vol.status().peer_role == Some(Role::Primary)
    })
    .await;
    p.shutdown().await;
}
