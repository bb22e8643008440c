//! Persistent reservation state carried for the SCSI layer (SPC-4 5.13).
//!
//! The volume does not know what a reservation is: the state is an opaque blob the SCSI
//! layer encodes. The rules are the data's:
//! * **Protocol C**: on the primary, [`ReplicatedVolume::replicate_pr_state`] completes once
//!   the connected peer has stored the blob (its `PrStateAck`), so a PR OUT is not reported
//!   done before both hosts hold the new state and a failover keeps the reservation.
//! * **Degraded**: without the peer (or when the link drops before the ack) the change
//!   completes locally and the state is marked to be sent, like an out-of-sync block;
//!   during a handshake, or while `Fencing::SuspendIo` holds writes, it waits like a write.
//! * **Connect**: after every handshake the primary (with no primary on either side, the
//!   sync source, i.e. the split-brain winner) sends its whole current state, whatever the
//!   flag says: a restarted peer holds nothing (or an older APTPL copy).
//! * The secondary keeps the latest blob received in memory and hands it to the sink the
//!   SCSI layer set ([`ReplicatedVolume::set_pr_sink`]), in order, newest wins; after a
//!   promotion the logical unit's reservations are the last ones the old primary sent.

use std::sync::Arc;

use bytes::Bytes;

use tracing::{error, info, warn};

use super::machine::WriteGate;
use super::{lock, PendingKind, ReplicatedVolume, Reply, Role};
use crate::link::{LinkSender, Message};
use crate::volume::ReplicationError;

/// Receives the reservation state the peer sent (the secondary's logical unit): stores it
/// (in memory, and on disk when the SCSI layer persists it) or says why it could not.
/// Called from a blocking thread, one call at a time.
pub type PrSink = Arc<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// Where a reservation change stands once [`ReplicatedVolume::replicate_pr_state`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrReplicated {
    /// The peer stored it.
    Peer,
    /// The peer is not connected (or did not store it): it is sent at the next connect.
    Deferred,
}

/// The reservation state as this host knows it.
#[derive(Default)]
pub(crate) struct PrRepl {
    /// The latest state: set by a local change (primary) or received from the peer.
    current: Option<Bytes>,
    /// Changed while the peer could not store it.
    dirty: bool,
    /// Blobs received from the peer, and the number of the one last given to the sink.
    received: u64,
    applied: u64,
}

impl ReplicatedVolume {
    /// Sets where the reservation state received from the peer goes. The first sink stays;
    /// a state received before it was set is given to it now.
    pub fn set_pr_sink(self: &Arc<Self>, sink: PrSink) {
        let _ = self.pr_sink.set(sink);
        let p = lock(&self.pr);
        if p.received > p.applied {
            let v = self.clone();
            tokio::task::spawn_blocking(move || v.apply_pr());
        }
    }

    /// The state this host starts with (e.g. reloaded from an APTPL file), sent to the peer
    /// at connect if this host is primary (or sync source). Ignored once the peer sent one
    /// (the peer's is newer); sent now if this host is primary and already connected.
    pub fn seed_pr_state(self: &Arc<Self>, blob: Bytes) {
        {
            let mut p = lock(&self.pr);
            if p.received > 0 {
                return;
            }
            p.current = Some(blob);
        }
        let st = lock(&self.st);
        if st.m.role() == Role::Primary && st.link.is_some() {
            self.spawn(self.clone().send_pr_at_connect());
        }
    }

    /// The latest reservation state on this host (local or received).
    pub fn pr_state(&self) -> Option<Bytes> {
        lock(&self.pr).current.clone()
    }

    /// Whether a change waits for the next connect to reach the peer.
    pub fn pr_state_pending(&self) -> bool {
        lock(&self.pr).dirty
    }

    /// Primary: makes `blob` the reservation state and, with the peer connected, waits until
    /// the peer stored it (protocol C). Refused on a secondary, which must not change
    /// reservations (its writes are refused too).
    pub async fn replicate_pr_state(&self, blob: Bytes) -> Result<PrReplicated, ReplicationError> {
        if self.shutdown.is_cancelled() {
            return Err(ReplicationError::ShutDown);
        }
        let _gate = self.pr_gate.lock().await;
        // The data's gate: during a handshake, or while fencing suspends I/O, a change waits
        // like a write (completing it locally would let a failover lose it).
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match lock(&self.st).m.write_gate(self.cfg.fencing) {
                WriteGate::ReadOnly => {
                    return Err(ReplicationError::NotAllowed(
                        "only the primary changes reservations".into(),
                    ))
                }
                WriteGate::Closed => return Err(ReplicationError::ShutDown),
                WriteGate::Wait => {}
                WriteGate::Replicate { .. } | WriteGate::Degraded => break,
            }
            notified.await;
        }
        lock(&self.pr).current = Some(blob.clone());
        Ok(self.send_pr(blob).await)
    }

    /// Sends `blob` on the attached link and waits for the ack; marks the state dirty when
    /// it cannot. The caller holds `pr_gate`, so blobs go out in the order they were made.
    async fn send_pr(&self, blob: Bytes) -> PrReplicated {
        let queued = {
            let mut st = lock(&self.st);
            st.link.as_mut().map(|link| {
                let (seq, rx) = link.register(PendingKind::PrState, 0, 0);
                (link.tx.clone(), seq, rx)
            })
        };
        let Some((tx, seq, rx)) = queued else {
            lock(&self.pr).dirty = true;
            return PrReplicated::Deferred;
        };
        // A closed queue means the link is going; teardown answers the pending entry.
        let _ = tx.send(Message::PrState { seq, blob }).await;
        match rx.await {
            Ok(Reply::Ok) => {
                lock(&self.pr).dirty = false;
                PrReplicated::Peer
            }
            Ok(Reply::Failed(e)) => {
                error!(volume = %self.cfg.name, "the peer could not store the reservation state: {e}; sent again at the next connect");
                lock(&self.pr).dirty = true;
                PrReplicated::Deferred
            }
            _ => {
                warn!(volume = %self.cfg.name, "link lost before the peer stored the reservation state; sent again at the next connect");
                lock(&self.pr).dirty = true;
                PrReplicated::Deferred
            }
        }
    }

    /// After a handshake, on the side whose state wins (see the module docs): sends the
    /// whole current state.
    pub(super) async fn send_pr_at_connect(self: Arc<Self>) {
        let _gate = self.pr_gate.lock().await;
        let Some(blob) = lock(&self.pr).current.clone() else {
            return;
        };
        let was_dirty = lock(&self.pr).dirty;
        if self.send_pr(blob).await == PrReplicated::Peer {
            info!(volume = %self.cfg.name, changed_while_disconnected = was_dirty,
                "reservation state sent to the peer");
        }
    }

    /// A `PrState` from the peer: kept in memory now (in arrival order), given to the sink
    /// off the receive loop (newest first: an older blob still queued is skipped), then
    /// acked.
    pub(super) fn receive_pr(
        self: &Arc<Self>,
        seq: u64,
        blob: Bytes,
        tx: &LinkSender,
    ) -> Result<(), String> {
        if lock(&self.st).m.role() == Role::Primary {
            return Err("the peer sent reservation state to the primary".into());
        }
        {
            let mut p = lock(&self.pr);
            p.current = Some(blob);
            p.dirty = false;
            p.received += 1;
        }
        let v = self.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let v2 = v.clone();
            let ok = tokio::task::spawn_blocking(move || v2.apply_pr())
                .await
                .unwrap_or(false);
            let _ = tx.send(Message::PrStateAck { seq, ok }).await;
        });
        Ok(())
    }

    /// Gives the newest received blob to the sink unless it already has it.
    fn apply_pr(&self) -> bool {
        let _one = lock(&self.pr_apply);
        let (blob, n) = {
            let p = lock(&self.pr);
            if p.applied >= p.received {
                return true;
            }
            (p.current.clone().unwrap_or_default(), p.received)
        };
        // Without a sink yet the blob waits in memory: `set_pr_sink` gives it.
        let Some(sink) = self.pr_sink.get() else {
            return true;
        };
        match sink(&blob) {
            Ok(()) => {
                lock(&self.pr).applied = n;
                true
            }
            Err(e) => {
                error!(volume = %self.cfg.name, "storing the peer's reservation state failed: {e}");
                false
            }
        }
    }
}
