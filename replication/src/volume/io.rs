//! The data-area view the target serves, and the protocol-C write path (`drbd_req.c`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::error;

use super::machine::{Event, WriteGate};
use super::{lock, split_parts, PendingKind, ReplicatedVolume, Reply, Role};
use crate::drbd::activity_log::{extent_of, AlError};
use crate::drbd::MetadataError;
use crate::link::proto::MAX_DATA;
use crate::link::Message;
use crate::store::{check_range, BlockStore, IoFuture, StoreError, StoreResult, WriteMode};

/// Counts an application request in flight (the resync controller backs off while > 0).
struct Inflight<'a>(&'a ReplicatedVolume);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.ctr.app_inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a write in `al_waiting` while it waits for an activity-log extent.
struct AlWaiting<'a>(&'a AtomicUsize);

impl<'a> AlWaiting<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        AlWaiting(n)
    }
}

impl Drop for AlWaiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn eio(msg: String) -> StoreError {
    StoreError::Io(std::io::Error::other(msg))
}

/// A metadata (activity log, bitmap) write that failed, as the write's error: a full backing
/// filesystem stays [`StoreError::NoSpace`] (the initiator gets DATA PROTECT / SPACE
/// ALLOCATION FAILED, not a medium error), anything else is an I/O error.
fn md_error(what: &str, e: MetadataError) -> StoreError {
    let msg = format!("{what}: {e}");
    match &e {
        MetadataError::Io { source, .. }
            if StoreError::from_errno(source.raw_os_error().unwrap_or(0)).is_no_space() =>
        {
            StoreError::NoSpace(std::io::Error::new(source.kind(), msg))
        }
        _ => eio(msg),
    }
}

/// The [`BlockStore`] a primary serves: `[0, usable)` of the backing store, replicated.
pub struct VolumeStore {
    vol: Arc<ReplicatedVolume>,
}

impl ReplicatedVolume {
    /// The data-area view for the iSCSI target. Reads are local; writes are replicated
    /// with protocol C. On a secondary, writes fail with `ReadOnly` and reads with `Closed`
    /// (a secondary never serves).
    pub fn store(self: &Arc<Self>) -> Arc<dyn BlockStore> {
        Arc::new(VolumeStore { vol: self.clone() })
    }

    fn inflight(&self) -> Inflight<'_> {
        self.ctr.app_inflight.fetch_add(1, Ordering::SeqCst);
        Inflight(self)
    }

    /// Activates the AL extents of `[offset, offset+len)`, writing the AL transaction (and,
    /// first, the dirty bitmap pages of any extent it evicts) durably before returning
    /// (`drbd_actlog.c` `drbd_al_begin_io`). Returns the extents to release.
    async fn al_begin(&self, offset: u64, len: u64) -> StoreResult<Vec<u32>> {
        let first = extent_of(offset);
        let last = extent_of(offset + len - 1);
        if last - first >= 64 {
            return Err(eio(format!(
                "write of {len} bytes spans too many AL extents"
            )));
        }
        let extents: Vec<u32> = (first..=last).map(|e| e as u32).collect();
        {
            let mut g = lock(&self.md);
            if extents.iter().all(|e| g.al.is_hot(*e)) {
                match g.al.activate_many(&extents) {
                    Ok(None) => return Ok(extents),
                    // Cannot happen for hot extents; write it anyway rather than lose it.
                    Ok(Some(w)) => {
                        g.md.write_bitmap(false)
                            .and_then(|_| g.md.write_al(&w))
                            .map_err(|e| md_error("activity log", e))?;
                        return Ok(extents);
                    }
                    Err(e) => return Err(eio(format!("activity log: {e}"))),
                }
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        // Counted before the first attempt, which takes the metadata lock: a release after
        // that attempt sees the count (it reads it after its own turn with the lock).
        let _waiting = AlWaiting::new(&self.al_waiting);
        loop {
            // Enabled before the attempt: a release between the attempt and the wait wakes it.
            let idle = self.al_idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let md = self.md.clone();
            let ex = extents.clone();
            let r = tokio::task::spawn_blocking(move || -> Result<bool, MetadataError> {
                let mut g = lock(&md);
                match g.al.activate_many(&ex) {
                    Ok(None) => Ok(true),
                    Ok(Some(w)) => {
                        // Bits of evicted extents must be on disk before the AL forgets them.
                        g.md.write_bitmap(false)?;
                        if let Err(e) = g.md.write_al(&w) {
                            for x in &ex {
                                let _ = g.al.release(*x);
                            }
                            return Err(e);
                        }
                        Ok(true)
                    }
                    Err(AlError::AllExtentsBusy { .. }) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            })
            .await
            .map_err(|e| eio(format!("activity log task: {e}")))?;
            match r {
                Ok(true) => return Ok(extents),
                // Every extent is in use: wait until a write releases one.
                Ok(false) => {
                    if tokio::time::timeout_at(deadline, idle).await.is_err() {
                        return Err(eio("activity log: all extents busy for 30 s".into()));
                    }
                }
                Err(e) => {
                    error!(volume = %self.cfg.name, "activity log write failed: {e}");
                    return Err(md_error("activity log", e));
                }
            }
        }
    }

    fn al_end(&self, extents: &[u32]) {
        let freed = {
            let mut g = lock(&self.md);
            let mut freed = false;
            for e in extents {
                let _ = g.al.release(*e);
                freed |= g.al.refs(*e) == 0;
            }
            freed
        };
        if freed && self.al_waiting.load(Ordering::SeqCst) > 0 {
            self.al_idle.notify_waiters();
        }
    }

    /// A machine step whose actions are all immediate (write-path failures).
    fn event_now(&self, ev: Event) {
        let _ = self.step_sync(ev);
    }

    pub(super) fn mark_oos(&self, offset: u64, len: u64) {
        let _ = lock(&self.md).md.bitmap_mut().set_range(offset, len);
    }

    /// Replicated write: see the module docs of [`super`].
    pub(crate) async fn app_write(
        &self,
        offset: u64,
        data: Bytes,
        mode: WriteMode,
    ) -> StoreResult<()> {
        let len = data.len() as u64;
        check_range(offset, len, self.usable)?;
        if len == 0 {
            return Ok(());
        }
        let _inflight = self.inflight();
        if lock(&self.st).m.role() != Role::Primary {
            return Err(StoreError::ReadOnly);
        }
        let _range = self.locks.lock(offset, offset + len).await;
        let extents = self.al_begin(offset, len).await?;
        let r = self.write_locked(offset, data, mode).await;
        self.al_end(&extents);
        r
    }

    async fn write_locked(&self, offset: u64, data: Bytes, mode: WriteMode) -> StoreResult<()> {
        let len = data.len() as u64;
        let parts = split_parts(offset, &data, MAX_DATA);
        // Gate: decide "replicate" or "degraded" under the state lock, so the decision and
        // the bitmap agree with what a concurrent handshake or teardown sees.
        let replies: Option<Vec<(u64, u64, oneshot::Receiver<Reply>)>> = loop {
            // Created before the gate is read, so a change in between still wakes it:
            // `changed` is only ever `notify_waiters`, which reaches every `Notified` created
            // before it without `enable` (enabling would take the Notify's lock twice per
            // write, to register and to deregister).
            let notified = self.changed.notified();
            tokio::pin!(notified);
            let queued = {
                let mut st = lock(&self.st);
                match st.m.write_gate(self.cfg.fencing) {
                    WriteGate::ReadOnly => return Err(StoreError::ReadOnly),
                    WriteGate::Closed => return Err(StoreError::Closed),
                    WriteGate::Wait => None,
                    WriteGate::Degraded => {
                        self.mark_oos(offset, len);
                        break None;
                    }
                    WriteGate::Replicate { epoch } => {
                        let Some(link) = st.link.as_mut().filter(|l| l.epoch == epoch) else {
                            // The link and `Connected` change together under this lock.
                            debug_assert!(false, "Connected without its link");
                            self.mark_oos(offset, len);
                            break None;
                        };
                        // Registered under the lock: a teardown from here on answers
                        // them `Lost` and marks their ranges out of sync.
                        let mut v = Vec::with_capacity(parts.len());
                        let mut frames = Vec::with_capacity(parts.len());
                        for (off, d) in &parts {
                            let (seq, rx) = link.register(PendingKind::Write, *off, d.len() as u64);
                            frames.push(Message::Write {
                                seq,
                                offset: *off,
                                data: d.clone(),
                                fua: mode == WriteMode::Durable,
                            });
                            v.push((*off, d.len() as u64, rx));
                        }
                        // Other writes in flight: their frames and acks are about to
                        // share the link, so let the writer gather them.
                        let busy = link.pending.len() > v.len();
                        Some((link.tx.clone(), frames, v, busy))
                    }
                }
            };
            if let Some((tx, frames, v, busy)) = queued {
                // Outside the lock: a full queue waits for the writer, which never needs
                // this lock; if the link dies meanwhile the send fails and teardown has
                // answered the pending entries.
                for f in frames {
                    let n = match &f {
                        Message::Write { data, .. } => data.len() as u64,
                        _ => 0,
                    };
                    self.ctr.sent.fetch_add(n, Ordering::Relaxed);
                    let sent = if busy {
                        tx.send_batched(f).await
                    } else {
                        tx.send(f).await
                    };
                    if sent.is_err() {
                        break;
                    }
                }
                break Some(v);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = self.shutdown.cancelled() => return Err(StoreError::Closed),
            }
        };
        let local = self.data.write(offset, data, mode);
        let (lres, peer) = match replies {
            None => (local.await, Vec::new()),
            Some(v) => {
                // Write-ack latency: from the frames' queueing to each part's ack.
                let sent_at = Instant::now();
                let waits =
                    futures::future::join_all(v.into_iter().map(|(off, l, rx)| async move {
                        let r = rx.await;
                        if matches!(r, Ok(Reply::Ok)) {
                            self.ctr.write_ack.observe(sent_at.elapsed());
                        }
                        (off, l, r)
                    }));
                tokio::join!(local, waits)
            }
        };
        let mut all_ok = !peer.is_empty();
        for (off, l, r) in peer {
            match r {
                Ok(Reply::Ok) => {}
                Ok(Reply::Failed(e)) => {
                    all_ok = false;
                    self.ctr.write_errors.fetch_add(1, Ordering::Relaxed);
                    error!(volume = %self.cfg.name, offset = off, len = l,
                        "peer failed to write replicated data: {e}; range marked out of sync");
                    self.event_now(Event::PeerWriteFailed {
                        offset: off,
                        len: l,
                    });
                }
                // Teardown already marked the range out of sync.
                _ => all_ok = false,
            }
        }
        match lres {
            Err(e) => {
                self.ctr.write_errors.fetch_add(1, Ordering::Relaxed);
                error!(volume = %self.cfg.name, offset, len, "local write failed: {e}; range marked out of sync");
                self.event_now(Event::LocalWriteFailed { offset, len });
                Err(e)
            }
            Ok(()) => {
                if all_ok {
                    // Both replicas hold this data now (drbd_set_in_sync on completion).
                    let _ = lock(&self.md).md.bitmap_mut().clear_range(offset, len);
                }
                Ok(())
            }
        }
    }

    pub(crate) async fn app_flush(&self) -> StoreResult<()> {
        let _inflight = self.inflight();
        let queued = {
            let mut st = lock(&self.st);
            if st.m.role() != Role::Primary {
                return Err(StoreError::ReadOnly);
            }
            match st.link.as_mut() {
                Some(link) => {
                    let (seq, rx) = link.register(PendingKind::Flush, 0, 0);
                    Some((link.tx.clone(), seq, rx))
                }
                None => None,
            }
        };
        let rx = match queued {
            Some((tx, seq, rx)) => {
                let _ = tx.send(Message::Flush { seq }).await;
                Some(rx)
            }
            None => None,
        };
        let local = self.data.flush();
        let (lres, pres) = match rx {
            Some(rx) => {
                let (l, p) = tokio::join!(local, rx);
                (l, Some(p))
            }
            None => (local.await, None),
        };
        if let Some(Ok(Reply::Failed(e))) = pres {
            self.ctr.write_errors.fetch_add(1, Ordering::Relaxed);
            error!(volume = %self.cfg.name, "peer failed to flush: {e}");
        }
        lres
    }

    pub(crate) async fn app_read(&self, offset: u64, len: usize) -> StoreResult<Bytes> {
        check_range(offset, len as u64, self.usable)?;
        if lock(&self.st).m.role() != Role::Primary {
            return Err(StoreError::Closed);
        }
        self.data.read(offset, len).await
    }

    /// Discard is replicated as zero writes (so both replicas read back zeroes).
    pub(crate) async fn app_discard(&self, offset: u64, len: u64) -> StoreResult<()> {
        check_range(offset, len, self.usable)?;
        const CHUNK: u64 = 1 << 20;
        let zeros = Bytes::from(vec![0u8; CHUNK.min(len) as usize]);
        let mut pos = 0;
        while pos < len {
            let n = CHUNK.min(len - pos);
            self.app_write(offset + pos, zeros.slice(..n as usize), WriteMode::Cached)
                .await?;
            pos += n;
        }
        Ok(())
    }
}

impl BlockStore for VolumeStore {
    fn size(&self) -> u64 {
        self.vol.usable
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(self.vol.app_read(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, mode: WriteMode) -> IoFuture<'_, ()> {
        Box::pin(self.vol.app_write(offset, data, mode))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.vol.app_flush())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.vol.app_discard(offset, len))
    }

    fn describe(&self) -> String {
        format!(
            "replicated volume {} ({} bytes, peer {}) over {}",
            self.vol.cfg.name,
            self.vol.usable,
            self.vol.cfg.peer,
            self.vol.data.describe()
        )
    }

    fn engine(&self) -> &'static str {
        self.vol.data.engine()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md_io(errno: i32) -> MetadataError {
        MetadataError::Io {
            path: "/dev/x".into(),
            op: "write",
            offset: 4096,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// A metadata write that found the filesystem full is `NoSpace` (DATA PROTECT 27/07 for
    /// the initiator), any other metadata failure an I/O error (MEDIUM ERROR).
    #[test]
    fn metadata_enospc_is_no_space() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = md_error("activity log", md_io(errno));
            assert!(e.is_no_space(), "{e:?}");
            assert!(e.to_string().contains("activity log"), "{e}");
        }
        assert!(matches!(
            md_error("activity log", md_io(libc::EIO)),
            StoreError::Io(_)
        ));
    }
}
