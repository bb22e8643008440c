//! Resync (sync source side) and online verify walkers, with the rate controller.
//!
//! DRBD's equivalents live in `drbd_worker.c` (`w_make_resync_request`,
//! `w_make_ov_request`, the `c-plan-ahead` controller in `drbd_rs_controller`); twinsan
//! pushes data from the source instead of having the target request it, which saves a
//! round trip per chunk and keeps the interval lock on the side that serves writes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::{
    lock, ConnState, Pending, PendingKind, ReplicatedVolume, ReplicationError, Reply, Role, Track,
    VerifyProgress,
};
use crate::link::proto::VERIFY_BLOCK;
use crate::link::{DiskState, Message};

/// Largest resync / verify request (coalesced runs of out-of-sync bits).
pub const RESYNC_CHUNK: u64 = 1 << 20;
const IN_FLIGHT: usize = 4;
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// Token bucket at `rate` bytes/s, at half rate while application writes are in flight,
/// bursting at most 50 ms worth (or one request).
struct Bucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        Bucket {
            rate,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Waits for `n` bytes worth of tokens; false if connection `epoch` ended meanwhile.
    async fn take(&mut self, n: u64, vol: &ReplicatedVolume, epoch: u64) -> bool {
        if self.rate == 0 {
            return vol.epoch_alive(epoch);
        }
        loop {
            let busy = vol.ctr.app_inflight.load(Ordering::Relaxed) > 0;
            let rate = if busy {
                self.rate as f64 / 2.0
            } else {
                self.rate as f64
            };
            let now = Instant::now();
            let dt = now.duration_since(self.last).as_secs_f64();
            self.last = now;
            let cap = (n as f64).max(rate * 0.05);
            self.tokens = (self.tokens + dt * rate).min(cap);
            if self.tokens >= n as f64 {
                self.tokens -= n as f64;
                return true;
            }
            let wait = ((n as f64 - self.tokens) / rate).min(0.1);
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            if !vol.epoch_alive(epoch) {
                return false;
            }
        }
    }
}

impl ReplicatedVolume {
    fn conn_is(&self, epoch: u64, c: ConnState) -> bool {
        let st = lock(&self.st);
        st.epoch == epoch && st.link.is_some() && st.conn == c
    }

    /// Sends a request on connection `epoch`; `None` if it is gone.
    fn submit(
        &self,
        epoch: u64,
        kind: PendingKind,
        offset: u64,
        len: u64,
        make: impl FnOnce(u64) -> Message,
    ) -> Option<oneshot::Receiver<Reply>> {
        let mut st = lock(&self.st);
        let link = st.link.as_mut().filter(|l| l.epoch == epoch)?;
        let (tx, rx) = oneshot::channel();
        let seq = link.next_seq;
        link.next_seq += 1;
        link.pending.insert(
            seq,
            Pending {
                kind,
                offset,
                len,
                tx,
            },
        );
        link.tx.send(make(seq)).ok()?;
        Some(rx)
    }

    fn log_progress(&self, what: &str) {
        let st = lock(&self.st);
        if let Some(t) = &st.resync {
            let p = t.progress();
            info!(
                volume = %self.cfg.name,
                "{what}: {:.1}% ({} of {} bytes), {} KiB/s, ETA {}",
                p.percent,
                p.done_bytes,
                p.total_bytes,
                p.bytes_per_sec / 1024,
                p.eta_secs.map_or("unknown".to_string(), |s| format!("{s} s"))
            );
        }
    }

    /// The sync source: walks the bitmap until it is empty.
    pub(super) async fn resync_source(self: Arc<Self>, epoch: u64) {
        let bits_per_chunk = RESYNC_CHUNK / 4096;
        let mut bucket = Bucket::new(self.cfg.resync_rate);
        let sem = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut set = JoinSet::new();
        let mut cursor = 0u64;
        let mut passes = 0;
        let mut last_log = Instant::now();
        loop {
            if !self.conn_is(epoch, ConnState::SyncSource) {
                return;
            }
            while set.try_join_next().is_some() {}
            let next = {
                let m = lock(&self.md);
                let bm = m.md.bitmap();
                bm.next_set(cursor).map(|first| {
                    let mut n = 1;
                    while n < bits_per_chunk && first + n < bm.bits() && bm.test_bit(first + n) {
                        n += 1;
                    }
                    (first, n)
                })
            };
            let Some((first, n)) = next else {
                while set.join_next().await.is_some() {}
                if !self.conn_is(epoch, ConnState::SyncSource) {
                    return;
                }
                let left = lock(&self.md).md.bitmap().count();
                if left == 0 {
                    break;
                }
                passes += 1;
                if passes > 3 {
                    error!(volume = %self.cfg.name, "resync: {left} blocks still out of sync after {passes} passes (peer write errors?); staying SyncSource");
                    return;
                }
                cursor = 0;
                continue;
            };
            cursor = first + n;
            let offset = first * 4096;
            if offset >= self.usable {
                continue;
            }
            let len = (n * 4096).min(self.usable - offset);
            if !bucket.take(len, &self, epoch).await {
                return;
            }
            let Ok(permit) = sem.clone().acquire_owned().await else {
                return;
            };
            let guard = self.locks.lock(offset, offset + len).await;
            let v = self.clone();
            set.spawn(async move {
                v.resync_chunk(epoch, offset, len).await;
                drop(guard);
                drop(permit);
            });
            if last_log.elapsed() >= PROGRESS_EVERY {
                last_log = Instant::now();
                self.log_progress("resync progress");
                self.persist("resync progress").await;
            }
        }
        self.finish_resync_source(epoch).await;
    }

    async fn resync_chunk(&self, epoch: u64, offset: u64, len: u64) {
        let data = match self.data.read(offset, len as usize).await {
            Ok(d) => d,
            Err(e) => {
                error!(volume = %self.cfg.name, offset, len, "resync: local read failed: {e}");
                return;
            }
        };
        let Some(rx) = self.submit(epoch, PendingKind::Resync, offset, len, |seq| {
            Message::ResyncData { seq, offset, data }
        }) else {
            return;
        };
        self.ctr.sent.fetch_add(len, Ordering::Relaxed);
        self.ctr.resync_sent.fetch_add(len, Ordering::Relaxed);
        match rx.await {
            Ok(Reply::Ok) => {
                let _ = lock(&self.md).md.bitmap_mut().clear_range(offset, len);
                if let Some(t) = lock(&self.st).resync.as_mut() {
                    t.done += len;
                }
            }
            Ok(Reply::Failed(e)) => {
                self.ctr.write_errors.fetch_add(1, Ordering::Relaxed);
                warn!(volume = %self.cfg.name, offset, len, "resync: {e}");
            }
            _ => {}
        }
    }

    async fn finish_resync_source(&self, epoch: u64) {
        let r = self
            .md_blocking(|m| {
                let mut u = m.md.uuids();
                u.resync_finished_as_source();
                m.md.set_uuids(&u)?;
                m.md.write_bitmap(false)?;
                m.md.write_superblock()?;
                Ok(u)
            })
            .await;
        let u = match r {
            Ok(u) => u,
            Err(e) => {
                error!(volume = %self.cfg.name, "metadata update at resync end failed: {e}");
                return;
            }
        };
        let mut st = lock(&self.st);
        if st.epoch != epoch {
            return;
        }
        let Some(link) = st.link.as_ref() else { return };
        let _ = link.tx.send(Message::ResyncDone { uuids: u });
        if let Some(p) = st.resync.take().map(|t| t.progress()) {
            info!(
                volume = %self.cfg.name,
                bytes = p.done_bytes,
                "resync finished (sync source): {} bytes at {} KiB/s",
                p.done_bytes,
                p.bytes_per_sec / 1024
            );
        }
        st.peer_disk = Some(DiskState::UpToDate);
        self.set_conn(&mut st, ConnState::Connected, "resync finished");
        drop(st);
        self.notify();
    }

    /// Starts online verify (`drbdadm verify`): compares every 4 KiB block of the data area
    /// with the peer by digest. Must run on the primary (or on either host when both are
    /// secondary), while Connected. Mismatches are marked out of sync on both hosts,
    /// counted in [`super::VolumeStatus::verify`] and logged; at the end, if any were found
    /// and this host is UpToDate, a resync from this host repairs them automatically.
    pub fn start_verify(self: &Arc<Self>) -> Result<(), ReplicationError> {
        let epoch = {
            let mut st = lock(&self.st);
            let Some(link) = st.link.as_ref() else {
                return Err(ReplicationError::NotConnected);
            };
            let epoch = link.epoch;
            if st.conn != ConnState::Connected {
                return Err(ReplicationError::NotAllowed(format!(
                    "verify needs state Connected, not {}",
                    st.conn
                )));
            }
            if st.role == Role::Secondary && st.peer_role == Some(Role::Primary) {
                return Err(ReplicationError::NotAllowed(
                    "run verify on the primary".into(),
                ));
            }
            st.verify = Some(VerifyProgress {
                done_bytes: 0,
                total_bytes: self.usable,
                mismatched_blocks: 0,
                finished: false,
                aborted: false,
            });
            self.set_conn(&mut st, ConnState::VerifySource, "online verify started");
            epoch
        };
        self.notify();
        self.spawn(self.clone().verify_source(epoch));
        Ok(())
    }

    async fn verify_source(self: Arc<Self>, epoch: u64) {
        let alg = self.cfg.verify_digest;
        let mut bucket = Bucket::new(self.cfg.resync_rate);
        let mut offset = 0u64;
        let mut mismatches = 0u64;
        let mut last_log = Instant::now();
        let started = Instant::now();
        while offset < self.usable {
            if !self.conn_is(epoch, ConnState::VerifySource) {
                return;
            }
            let len = RESYNC_CHUNK.min(self.usable - offset);
            if !bucket.take(len, &self, epoch).await {
                return;
            }
            let guard = self.locks.lock(offset, offset + len).await;
            let data = match self.data.read(offset, len as usize).await {
                Ok(d) => d,
                Err(e) => {
                    error!(volume = %self.cfg.name, offset, len, "verify: local read failed: {e}");
                    offset += len;
                    continue;
                }
            };
            let mut digests =
                BytesMut::with_capacity((len / VERIFY_BLOCK + 1) as usize * alg.len());
            for block in data.chunks(VERIFY_BLOCK as usize) {
                digests.extend_from_slice(&alg.digest(block));
            }
            let digests = digests.freeze();
            let Some(rx) = self.submit(epoch, PendingKind::Verify, offset, len, |seq| {
                Message::VerifyRequest {
                    seq,
                    offset,
                    len: len as u32,
                    alg,
                    digests,
                }
            }) else {
                return;
            };
            let reply = rx.await;
            drop(guard);
            match reply {
                Ok(Reply::Verify(m)) => {
                    for off in m {
                        if off < offset || off >= offset + len {
                            continue;
                        }
                        let l = VERIFY_BLOCK.min(self.usable - off);
                        let _ = lock(&self.md).md.bitmap_mut().set_range(off, l);
                        mismatches += 1;
                        warn!(volume = %self.cfg.name, offset = off, "online verify: block differs from the peer; marked out of sync");
                    }
                }
                _ => return,
            }
            offset += len;
            if let Some(v) = lock(&self.st).verify.as_mut() {
                v.done_bytes = offset;
                v.mismatched_blocks = mismatches;
            }
            if last_log.elapsed() >= PROGRESS_EVERY {
                last_log = Instant::now();
                info!(volume = %self.cfg.name, "online verify: {:.1}% done, {mismatches} blocks differ so far",
                    offset as f64 * 100.0 / self.usable as f64);
            }
        }
        let can_repair = {
            let mut st = lock(&self.st);
            if st.epoch != epoch || st.link.is_none() {
                return;
            }
            if let Some(v) = st.verify.as_mut() {
                v.finished = true;
                v.done_bytes = self.usable;
                v.mismatched_blocks = mismatches;
            }
            info!(volume = %self.cfg.name, "online verify finished in {:.1} s: {mismatches} blocks ({} bytes) differ",
                started.elapsed().as_secs_f64(), mismatches * VERIFY_BLOCK);
            self.set_conn(&mut st, ConnState::Connected, "online verify finished");
            st.disk == DiskState::UpToDate
                && (st.role == Role::Primary || st.peer_role != Some(Role::Primary))
        };
        self.notify();
        self.persist("verify").await;
        if mismatches == 0 {
            return;
        }
        if !can_repair {
            warn!(volume = %self.cfg.name, "verify found differences, but this host cannot be sync source; start a resync from the peer");
            return;
        }
        info!(volume = %self.cfg.name, "starting a resync to repair the {mismatches} differing blocks");
        self.begin_resync_source(epoch).await;
    }

    /// Starts a resync to the peer on an established connection (after verify).
    async fn begin_resync_source(self: &Arc<Self>, epoch: u64) {
        let r = self
            .md_blocking(|m| {
                let mut u = m.md.uuids();
                let s = u.start_resync_as_source();
                m.md.set_uuids(&u)?;
                m.md.write_bitmap(false)?;
                m.md.write_superblock()?;
                Ok(s)
            })
            .await;
        let sync_uuid = match r {
            Ok(s) => s,
            Err(e) => {
                error!(volume = %self.cfg.name, "metadata update at resync start failed: {e}");
                return;
            }
        };
        let weight = lock(&self.md).md.bitmap().count();
        {
            let mut st = lock(&self.st);
            if st.epoch != epoch || st.conn != ConnState::Connected {
                return;
            }
            let Some(link) = st.link.as_ref() else { return };
            let _ = link.tx.send(Message::SyncUuid { uuid: sync_uuid });
            st.peer_disk = Some(DiskState::Inconsistent);
            st.resync = Some(Track::start(weight * 4096));
            self.set_conn(
                &mut st,
                ConnState::SyncSource,
                "repairing verify mismatches",
            );
        }
        self.notify();
        self.spawn(self.clone().resync_source(epoch));
    }
}
