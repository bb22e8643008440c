//! Starting and stopping the iSCSI target for the role loop: the portals are bound only while
//! this host is primary. Stopping is two steps (the role machine's DrainTarget / StopTarget):
//! first the portals close and in-flight commands get a bounded time to finish, then every
//! session is dropped (initiators reconnect to the VIP, which by then points at the new primary).

use crate::iscsi::context::IscsiContext;
use crate::iscsi::listener::{self, accept_loop};
use anyhow::Context;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The portals of every target, bound or not.
pub struct TargetControl {
    iscsi: Arc<IscsiContext>,
    listening: Mutex<Vec<(CancellationToken, JoinHandle<()>)>>,
}

impl TargetControl {
    pub fn new(iscsi: Arc<IscsiContext>) -> Self {
        TargetControl {
            iscsi,
            listening: Mutex::new(Vec::new()),
        }
    }

    /// Whether the portals are bound.
    pub fn serving(&self) -> bool {
        !self
            .listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Binds every portal and accepts logins. All or nothing.
    pub async fn start(&self) -> anyhow::Result<()> {
        if self.serving() {
            return Ok(());
        }
        let mut listeners = Vec::new();
        for a in &self.iscsi.portals {
            listeners.push(
                listener::bind(*a, true).with_context(|| format!("cannot listen on portal {a}"))?,
            );
        }
        let mut running = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        for l in listeners {
            let stop = CancellationToken::new();
            let task = tokio::spawn(accept_loop(l, self.iscsi.clone(), stop.clone()));
            running.push((stop, task));
        }
        info!(portals = ?self.iscsi.portals, "target serving");
        Ok(())
    }

    /// Closes the portals (no new logins); existing sessions go on.
    pub async fn stop_listening(&self) {
        let running =
            std::mem::take(&mut *self.listening.lock().unwrap_or_else(|e| e.into_inner()));
        for (stop, task) in running {
            stop.cancel();
            let _ = task.await;
        }
    }

    fn in_flight(&self) -> u32 {
        self.iscsi
            .sessions
            .list()
            .iter()
            .map(|s| s.active_tasks())
            .sum()
    }

    /// Closes the portals and waits up to `timeout` for in-flight commands to finish.
    /// Returns the commands still running when it gave up.
    pub async fn drain(&self, timeout: Duration) -> u32 {
        self.stop_listening().await;
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.in_flight();
            if n == 0 {
                return 0;
            }
            if Instant::now() >= deadline {
                warn!(
                    in_flight = n,
                    "drain timeout: dropping sessions with commands in flight"
                );
                return n;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Drops every session (their connections close) and waits briefly until they are gone.
    /// A connection accepted just before the portals closed may still finish its login: the
    /// sessions are cancelled again for a while so that such a late one goes too.
    pub async fn stop(&self) -> usize {
        self.stop_listening().await;
        let started = Instant::now();
        let mut dropped = std::collections::HashSet::new();
        loop {
            for s in self.iscsi.sessions.list() {
                s.shutdown.cancel();
                dropped.insert(s.tsih);
            }
            let elapsed = started.elapsed();
            let empty = self.iscsi.sessions.count() == 0;
            if (empty && elapsed >= Duration::from_millis(20)) || elapsed >= Duration::from_secs(1)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        info!(sessions = dropped.len(), "target stopped");
        dropped.len()
    }
}
