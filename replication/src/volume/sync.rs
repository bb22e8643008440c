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

use super::machine::{Action, Event};
use super::{lock, ConnState, PendingKind, ReplicatedVolume, ReplicationError, Reply};
use crate::link::proto::VERIFY_BLOCK;
use crate::link::Message;

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
        st.m.conn_is(epoch, c) && st.link.is_some()
    }

    /// Sends a request on connection `epoch`; `None` if it is gone. The request is
    /// registered under the lock and sent after it (the queue may be full).
    async fn submit(
        &self,
        epoch: u64,
        kind: PendingKind,
        offset: u64,
        len: u64,
        make: impl FnOnce(u64) -> Message,
    ) -> Option<oneshot::Receiver<Reply>> {
        let (tx, msg, rx) = {
            let mut st = lock(&self.st);
            let link = st.link.as_mut().filter(|l| l.epoch == epoch)?;
            let (seq, rx) = link.register(kind, offset, len);
            (link.tx.clone(), make(seq), rx)
        };
        tx.send(msg).await.ok()?;
        Some(rx)
    }

    fn log_progress(&self, what: &str) {
        let p = lock(&self.st).m.resync();
        if let Some(p) = p {
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
        let Some(rx) = self
            .submit(epoch, PendingKind::Resync, offset, len, |seq| {
                Message::ResyncData { seq, offset, data }
            })
            .await
        else {
            return;
        };
        self.ctr.sent.fetch_add(len, Ordering::Relaxed);
        self.ctr.resync_sent.fetch_add(len, Ordering::Relaxed);
        match rx.await {
            Ok(Reply::Ok) => {
                let _ = lock(&self.md).md.bitmap_mut().clear_range(offset, len);
                let _ = self.step_sync(Event::ResyncBlockDone { bytes: len });
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
        let deferred = {
            let mut st = lock(&self.st);
            match self.run_step(
                &mut st,
                Event::ResyncFinishedSource { epoch, uuids: u },
                None,
            ) {
                Ok(d) => d,
                Err(_) => return,
            }
        };
        self.notify();
        self.perform(deferred).await;
    }

    /// Starts online verify (`drbdadm verify`): compares every 4 KiB block of the data area
    /// with the peer by digest. Must run on the primary (or on either host when both are
    /// secondary), while Connected. Mismatches are marked out of sync on both hosts,
    /// counted in [`super::VolumeStatus::verify`] and logged; at the end, if any were found
    /// and this host is UpToDate, a resync from this host repairs them automatically.
    pub fn start_verify(self: &Arc<Self>) -> Result<(), ReplicationError> {
        let deferred = {
            let mut st = lock(&self.st);
            self.run_step(&mut st, Event::StartVerify { total: self.usable }, None)?
        };
        self.notify();
        for d in deferred {
            if let super::Deferred::Act(a) = d {
                self.spawn_tasks(vec![a]);
            }
        }
        Ok(())
    }

    pub(super) async fn verify_source(self: Arc<Self>, epoch: u64) {
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
            let Some(rx) = self
                .submit(epoch, PendingKind::Verify, offset, len, |seq| {
                    Message::VerifyRequest {
                        seq,
                        offset,
                        len: len as u32,
                        alg,
                        digests,
                    }
                })
                .await
            else {
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
            let _ = self.step_sync(Event::VerifyProgress {
                done: offset,
                mismatches,
            });
            if last_log.elapsed() >= PROGRESS_EVERY {
                last_log = Instant::now();
                info!(volume = %self.cfg.name, "online verify: {:.1}% done, {mismatches} blocks differ so far",
                    offset as f64 * 100.0 / self.usable as f64);
            }
        }
        let ev = Event::VerifyFinished {
            epoch,
            total: self.usable,
            mismatches,
            secs: started.elapsed().as_secs_f64(),
        };
        let Ok(left) = self.step(ev).await else {
            return;
        };
        for a in left {
            match a {
                Action::CannotRepair => {
                    warn!(volume = %self.cfg.name, "verify found differences, but this host cannot be sync source; start a resync from the peer");
                }
                Action::RepairAfterVerify { epoch, mismatches } => {
                    info!(volume = %self.cfg.name, "starting a resync to repair the {mismatches} differing blocks");
                    self.begin_resync_source(epoch).await;
                }
                _ => {}
            }
        }
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
        let ev = Event::RepairStart {
            epoch,
            sync_uuid,
            oos_bytes: weight * 4096,
        };
        if let Ok(left) = self.step(ev).await {
            self.spawn_tasks(left);
        }
    }
}
