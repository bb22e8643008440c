//! Sessions, their command windows and task tables (RFC 7143 §4.2.2, §11.5 task management).
//!
//! A task is registered when its command is accepted and leaves the table when its response
//! has been queued or it was aborted. Completion and abort are decided under one lock, so a
//! task is either answered or reported aborted, never both (libiscsi's TMF tests check this).

use super::budget::SessionBudget;
use super::negotiation::SessionParams;
use super::pdu::serial;
use crate::scsi::{NexusId, ScsiTarget};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A target as the iSCSI layer serves it.
pub struct TargetEntry {
    pub iqn: String,
    pub scsi: Arc<ScsiTarget>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting for Data-Out.
    Gathering,
    Running,
    /// Response queued for sending.
    Completed,
    Aborted,
}

pub struct Task {
    pub itt: u32,
    pub lun: u64,
    pub cmd_sn: u32,
    pub immediate: bool,
    state: Mutex<TaskState>,
    done_tx: watch::Sender<bool>,
    /// Cancelled when the task is aborted (ABORT TASK, ABORT TASK SET, resets): a command
    /// whose work the logical unit owns (SANITIZE) stops waiting for it then.
    aborted: CancellationToken,
}

impl Task {
    pub fn state(&self) -> TaskState {
        *self.state.lock().unwrap()
    }

    pub fn set_running(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        if *s == TaskState::Gathering {
            *s = TaskState::Running;
            true
        } else {
            false
        }
    }

    /// Runs `send` (queueing the response) unless the task was aborted. Returns whether it ran.
    pub fn complete_with(&self, send: impl FnOnce()) -> bool {
        let mut s = self.state.lock().unwrap();
        if *s == TaskState::Aborted {
            return false;
        }
        *s = TaskState::Completed;
        send();
        true
    }

    /// Marks the task aborted. Returns a waiter that resolves when the task has stopped
    /// touching the store, or None when the task had already completed.
    fn abort(&self) -> Option<watch::Receiver<bool>> {
        let mut s = self.state.lock().unwrap();
        if *s != TaskState::Completed {
            self.aborted.cancel();
        }
        match *s {
            TaskState::Completed => None,
            TaskState::Gathering => {
                *s = TaskState::Aborted;
                let _ = self.done_tx.send(true);
                Some(self.done_tx.subscribe())
            }
            TaskState::Running | TaskState::Aborted => {
                *s = TaskState::Aborted;
                Some(self.done_tx.subscribe())
            }
        }
    }

    /// Resolves once the task is aborted.
    pub async fn aborted(&self) {
        self.aborted.cancelled().await
    }

    /// Called when the task's execution has finished (answered or not).
    pub fn finished(&self) {
        let _ = self.done_tx.send(true);
    }
}

/// Waits until every aborted task has stopped.
pub async fn wait_stopped(waiters: Vec<watch::Receiver<bool>>) {
    for mut w in waiters {
        let _ = w.wait_for(|d| *d).await;
    }
}

pub struct Session {
    pub tsih: u16,
    pub nexus: NexusId,
    pub initiator: String,
    pub isid: [u8; 6],
    /// None for a discovery session.
    pub target: Option<Arc<TargetEntry>>,
    pub queue_depth: u32,
    /// Negotiated parameters, kept for connection reinstatement.
    pub params: SessionParams,
    /// The connection ID of the session's one connection.
    pub cid: u16,
    exp_cmd_sn: AtomicU32,
    max_cmd_sn: AtomicU32,
    active: AtomicU32,
    tasks: Mutex<HashMap<u32, Arc<Task>>>,
    /// Cancelled to end the session's connection (reinstatement, cold reset, shutdown).
    pub shutdown: CancellationToken,
    /// This session's share of the memory for in-flight data.
    pub budget: Arc<SessionBudget>,
    /// Commands wait for memory: MaxCmdSN stops advancing until they run.
    window_closed: AtomicBool,
}

impl Session {
    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.load(Ordering::Acquire)
    }

    /// The MaxCmdSN to advertise now. It never moves backwards (libiscsi only ever raises
    /// its view of it), shrinks the window while commands are outstanding, and stops
    /// advancing while commands wait for memory ([`Session::close_window`]).
    pub fn max_cmd_sn(&self) -> u32 {
        if self.window_closed.load(Ordering::Acquire) {
            return self.max_cmd_sn.load(Ordering::Acquire);
        }
        let exp = self.exp_cmd_sn();
        let free = self
            .queue_depth
            .saturating_sub(self.active.load(Ordering::Acquire));
        let candidate = exp.wrapping_add(free).wrapping_sub(1);
        let mut cur = self.max_cmd_sn.load(Ordering::Acquire);
        while serial::gt(candidate, cur) {
            match self.max_cmd_sn.compare_exchange(
                cur,
                candidate,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return candidate,
                Err(c) => cur = c,
            }
        }
        cur
    }

    /// Stops (or lets again) MaxCmdSN advance: over the memory budget new commands wait at
    /// the initiator rather than here (issue 13: the CmdSN window closes).
    pub fn close_window(&self, closed: bool) {
        self.window_closed.store(closed, Ordering::Release);
    }

    /// Whether a non-immediate CmdSN is in the window [ExpCmdSN, MaxCmdSN] (§4.2.2.1).
    pub fn in_window(&self, cmd_sn: u32) -> bool {
        let exp = self.exp_cmd_sn();
        let max = self.max_cmd_sn.load(Ordering::Acquire);
        serial::le(exp, cmd_sn) && serial::le(cmd_sn, max)
    }

    /// Consumes `cmd_sn` if it is the next expected one.
    pub fn advance(&self, cmd_sn: u32) -> bool {
        self.exp_cmd_sn
            .compare_exchange(
                cmd_sn,
                cmd_sn.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Registers a task; None when the ITT is already in use (§11.2.1.8: tags are unique).
    pub fn add_task(&self, itt: u32, lun: u64, cmd_sn: u32, immediate: bool) -> Option<Arc<Task>> {
        let mut tasks = self.tasks.lock().unwrap();
        if tasks.contains_key(&itt) {
            return None;
        }
        let (done_tx, _) = watch::channel(false);
        let t = Arc::new(Task {
            itt,
            lun,
            cmd_sn,
            immediate,
            state: Mutex::new(TaskState::Gathering),
            done_tx,
            aborted: CancellationToken::new(),
        });
        tasks.insert(itt, t.clone());
        self.active.fetch_add(1, Ordering::AcqRel);
        Some(t)
    }

    pub fn remove_task(&self, itt: u32) {
        if self.tasks.lock().unwrap().remove(&itt).is_some() {
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
    }

    pub fn task(&self, itt: u32) -> Option<Arc<Task>> {
        self.tasks.lock().unwrap().get(&itt).cloned()
    }

    pub fn active_tasks(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    /// ABORT TASK (§11.5.1): Some(waiter) if the task existed and was not answered yet.
    pub fn abort_task(&self, itt: u32) -> Option<watch::Receiver<bool>> {
        let t = self.task(itt)?;
        let w = t.abort();
        if w.is_some() {
            self.remove_task(itt);
        }
        w
    }

    /// Aborts every task matching `pred` (ABORT TASK SET, CLEAR TASK SET, resets).
    pub fn abort_where(&self, pred: impl Fn(&Task) -> bool) -> Vec<watch::Receiver<bool>> {
        let victims: Vec<Arc<Task>> = self
            .tasks
            .lock()
            .unwrap()
            .values()
            .filter(|t| pred(t))
            .cloned()
            .collect();
        let mut waiters = Vec::new();
        for t in victims {
            if let Some(w) = t.abort() {
                self.remove_task(t.itt);
                waiters.push(w);
            }
        }
        waiters
    }
}

/// How many sessions the server takes (issue 13: every table a client can grow is bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub max_sessions: usize,
    pub max_sessions_per_initiator: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_sessions: 4096,
            max_sessions_per_initiator: 256,
        }
    }
}

/// All sessions of this server: TSIH allocation, reinstatement and target-wide TMFs.
#[derive(Default)]
pub struct SessionRegistry {
    next_tsih: AtomicU16,
    next_nexus: AtomicU64,
    sessions: Mutex<HashMap<u16, Arc<Session>>>,
}

pub struct NewSession {
    pub initiator: String,
    pub isid: [u8; 6],
    pub target: Option<Arc<TargetEntry>>,
    pub exp_cmd_sn: u32,
    pub queue_depth: u32,
    pub params: SessionParams,
    pub cid: u16,
    pub budget: Arc<SessionBudget>,
}

impl SessionRegistry {
    /// A TSIH not in use; never 0 (§11.12.6).
    pub fn allocate_tsih(&self) -> u16 {
        let sessions = self.sessions.lock().unwrap();
        loop {
            let t = self
                .next_tsih
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if t != 0 && !sessions.contains_key(&t) {
                return t;
            }
        }
    }

    /// Registers a session. An existing session of the same initiator port (name + ISID)
    /// to the same target is reinstated (§6.3.5): its connection is closed and its tasks
    /// aborted; the returned waiters resolve when they stopped.
    pub fn register(&self, tsih: u16, s: NewSession) -> (Arc<Session>, Vec<watch::Receiver<bool>>) {
        let nexus = self.next_nexus.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session {
            tsih,
            nexus: stable_nexus_id(
                &s.initiator,
                &s.isid,
                s.target.as_ref().map(|t| t.iqn.as_str()),
                nexus,
            ),
            initiator: s.initiator,
            isid: s.isid,
            target: s.target,
            queue_depth: s.queue_depth,
            params: s.params,
            cid: s.cid,
            exp_cmd_sn: AtomicU32::new(s.exp_cmd_sn),
            max_cmd_sn: AtomicU32::new(s.exp_cmd_sn.wrapping_add(s.queue_depth).wrapping_sub(1)),
            active: AtomicU32::new(0),
            tasks: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            budget: s.budget,
            window_closed: AtomicBool::new(false),
        });
        let mut sessions = self.sessions.lock().unwrap();
        let same_port: Vec<u16> = sessions
            .values()
            .filter(|o| {
                o.target.is_some()
                    && o.initiator.eq_ignore_ascii_case(&session.initiator)
                    && o.isid == session.isid
                    && o.target.as_ref().map(|t| &t.iqn) == session.target.as_ref().map(|t| &t.iqn)
            })
            .map(|o| o.tsih)
            .collect();
        let mut waiters = Vec::new();
        for tsih in same_port {
            if let Some(old) = sessions.remove(&tsih) {
                tracing::info!(initiator = %old.initiator, old_tsih = old.tsih, new_tsih = session.tsih,
                    "session reinstatement: closing the previous session of this initiator port");
                old.shutdown.cancel();
                waiters.extend(old.abort_where(|_| true));
            }
        }
        sessions.insert(session.tsih, session.clone());
        (session, waiters)
    }

    /// Removes the session; false when it was not registered any more (reinstated).
    pub fn unregister(&self, session: &Session) -> bool {
        let mut sessions = self.sessions.lock().unwrap();
        if sessions
            .get(&session.tsih)
            .is_some_and(|s| std::ptr::eq(&**s, session))
        {
            sessions.remove(&session.tsih);
            return true;
        }
        false
    }

    pub fn get(&self, tsih: u16) -> Option<Arc<Session>> {
        self.sessions.lock().unwrap().get(&tsih).cloned()
    }

    /// Sessions logged in to `iqn`.
    pub fn of_target(&self, iqn: &str) -> Vec<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.target.as_ref().is_some_and(|t| t.iqn == iqn))
            .cloned()
            .collect()
    }

    /// Every session, ordered by TSIH.
    pub fn list(&self) -> Vec<Arc<Session>> {
        let mut v: Vec<_> = self.sessions.lock().unwrap().values().cloned().collect();
        v.sort_by_key(|s| s.tsih);
        v
    }

    /// Whether a new session of `initiator` / `isid` stays within `limits`. A session of the
    /// same initiator port is not counted: the new one reinstates it (§6.3.5).
    pub fn admits(&self, initiator: &str, isid: [u8; 6], limits: &SessionLimits) -> bool {
        let sessions = self.sessions.lock().unwrap();
        let mut total = 0;
        let mut of_initiator = 0;
        for s in sessions.values() {
            let same_name = s.initiator.eq_ignore_ascii_case(initiator);
            if same_name && s.isid == isid {
                continue;
            }
            total += 1;
            of_initiator += usize::from(same_name);
        }
        total < limits.max_sessions && of_initiator < limits.max_sessions_per_initiator
    }

    pub fn count(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }
}

/// The I_T nexus id for unit attentions: stable across reconnects of the same initiator
/// port, so a reconnect neither loses a pending UA nor creates a spurious one.
fn stable_nexus_id(
    initiator: &str,
    isid: &[u8; 6],
    target: Option<&str>,
    fallback: u64,
) -> NexusId {
    use sha2::{Digest, Sha256};
    let Some(target) = target else {
        return fallback | (1 << 63);
    };
    let mut h = Sha256::new();
    h.update(initiator.to_ascii_lowercase().as_bytes());
    h.update([0]);
    h.update(isid);
    h.update(target.to_ascii_lowercase().as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().unwrap()) & !(1 << 63)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(reg: &SessionRegistry) -> Arc<Session> {
        let target = Arc::new(TargetEntry {
            iqn: "iqn.x:t".into(),
            scsi: Arc::new(ScsiTarget::new(vec![])),
        });
        let tsih = reg.allocate_tsih();
        reg.register(
            tsih,
            NewSession {
                initiator: "iqn.x:i".into(),
                isid: [1, 2, 3, 4, 5, 6],
                target: Some(target),
                exp_cmd_sn: 10,
                queue_depth: 4,
                params: SessionParams::default(),
                cid: 0,
                budget: crate::iscsi::budget::SessionBudget::unlimited(),
            },
        )
        .0
    }

    #[test]
    fn window_shrinks_but_never_moves_back() {
        let reg = SessionRegistry::default();
        let s = session(&reg);
        assert_eq!(s.max_cmd_sn(), 13);
        assert!(s.in_window(13) && !s.in_window(14) && !s.in_window(9));
        assert!(s.advance(10));
        s.add_task(1, 0, 10, false).unwrap();
        // One active task: 11 + 3 free - 1 = 13, unchanged.
        assert_eq!(s.max_cmd_sn(), 13);
        s.remove_task(1);
        assert_eq!(s.max_cmd_sn(), 14);
        assert!(!s.advance(12));
    }

    #[test]
    fn abort_versus_completion_is_exclusive() {
        let reg = SessionRegistry::default();
        let s = session(&reg);
        let t = s.add_task(7, 0, 10, false).unwrap();
        t.set_running();
        let w = s.abort_task(7).expect("running task is abortable");
        let mut sent = false;
        assert!(!t.complete_with(|| sent = true));
        assert!(!sent);
        t.finished();
        assert!(*w.borrow());
        let t2 = s.add_task(8, 0, 11, false).unwrap();
        assert!(t2.complete_with(|| {}));
        assert!(s.abort_task(8).is_none());
    }

    #[test]
    fn session_limits_count_others_but_not_the_port_being_reinstated() {
        let reg = SessionRegistry::default();
        let _a = session(&reg);
        let limits = SessionLimits {
            max_sessions: 2,
            max_sessions_per_initiator: 1,
        };
        assert!(
            reg.admits("IQN.X:I", [1, 2, 3, 4, 5, 6], &limits),
            "reinstatement"
        );
        assert!(
            !reg.admits("iqn.x:i", [9; 6], &limits),
            "a second port of iqn.x:i"
        );
        assert!(reg.admits("iqn.x:other", [9; 6], &limits));
        let all_full = SessionLimits {
            max_sessions: 1,
            max_sessions_per_initiator: 10,
        };
        assert!(!reg.admits("iqn.x:other", [9; 6], &all_full));
    }

    #[test]
    fn reinstatement_closes_previous_session() {
        let reg = SessionRegistry::default();
        let a = session(&reg);
        let b = session(&reg);
        assert!(a.shutdown.is_cancelled());
        assert!(!b.shutdown.is_cancelled());
        assert_eq!(a.nexus, b.nexus, "same initiator port keeps its nexus id");
        assert_eq!(reg.count(), 1);
    }
}
