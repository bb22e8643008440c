//! A block store over a regular file or a block device, doing all data I/O through io_uring.
//!
//! # Design
//!
//! * **One ring per store.** A LUN's ring dies with the LUN, so a store that is being torn
//!   down never delays another LUN, fixed-file slots need no global allocator, and the
//!   completion queue is sized from this store's own queue depth. Targets serve a handful
//!   of LUNs, so the extra ring fds cost nothing worth sharing.
//! * **Ownership of buffers.** Every buffer the kernel may touch is moved into a slot of the
//!   in-flight table before the SQE is pushed, and leaves that slot only when its CQE has
//!   been reaped. A dropped (cancelled) future merely marks its slot orphaned; the reaper
//!   frees the buffer when the kernel is done with it. If the whole store goes away while
//!   orphaned ops are still in the kernel, the last owner blocks in `Drop` until they
//!   complete, so no buffer is ever freed under the kernel's feet.
//! * **Completions.** The ring fd itself is pollable; a reaper task registers it with the
//!   tokio reactor (`AsyncFd`) and drains the CQ when it becomes readable. For a tokio worker
//!   sleeping in `epoll_wait`, the kernel's task-work that posts the CQE runs on that very
//!   thread, so a completion costs no extra thread hop. Submitters also reap right after
//!   `io_uring_enter`, so requests the kernel finishes inline (page-cache hits) complete on
//!   their first poll without a reactor round trip.
//! * **No overflow by construction.** In-flight ops are capped (semaphore) at the SQ size and
//!   the CQ has twice as many entries, so the SQ can never be full and the CQ never overflows.
//! * **Batching.** The first submitter becomes the leader and calls `io_uring_enter` outside
//!   the lock; others that push SQEs meanwhile just leave them for the leader's next enter.
//! * **Lifetime.** The reaper is started lazily by the first request, on the runtime that
//!   polls it (or on a thread when there is none), and restarted if that runtime goes away.
//!   It holds the ring, so the ring and the file's fds are closed when it exits, shortly
//!   after the `UringStore` is dropped and the last orphaned op has completed, not inside
//!   `drop` itself.

use super::aligned::AlignedBuf;
use super::backing::{
    Backing, DiscardStep, FileStoreOptions, OpenError, OpenHooks, MAIN, MAX_CHUNK, MAX_RETRIES,
    ZERO_CHUNK,
};
use super::{check_range, BlockStore, IoFuture, StoreError, StoreResult, WriteMode};
use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{Notify, Semaphore};

/// Fixed-file slots: the same indices as `Backing::files`.
fn fixed(index: usize) -> types::Fixed {
    types::Fixed(index as u32)
}

/// Memory the kernel may be reading or writing for one op.
enum Keep {
    Nothing,
    Buf(AlignedBuf),
    Bytes(Bytes),
}

impl Keep {
    fn base(&self) -> *const u8 {
        match self {
            Keep::Nothing => std::ptr::null(),
            Keep::Buf(b) => b.as_ptr(),
            Keep::Bytes(b) => b.as_ptr(),
        }
    }

    fn into_buf(self) -> AlignedBuf {
        match self {
            Keep::Buf(b) => b,
            _ => unreachable!("a read op always carries an AlignedBuf"),
        }
    }
}

enum Slot {
    Free,
    /// Owned by the kernel; a future is waiting.
    InFlight {
        waker: Option<Waker>,
        keep: Keep,
    },
    /// Owned by the kernel; the future was dropped, so the reaper frees `keep`.
    Orphaned {
        keep: Keep,
    },
    /// The kernel is done; the future has not collected the result yet.
    Done {
        res: i32,
        keep: Keep,
    },
}

struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Slots the kernel still references (`InFlight` + `Orphaned`).
    kernel_owned: usize,
    /// A thread is inside the leader loop and will submit whatever is pushed meanwhile.
    submitting: bool,
}

impl State {
    fn alloc(&mut self, slot: Slot) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn release(&mut self, idx: u32) -> Slot {
        self.free.push(idx);
        std::mem::replace(&mut self.slots[idx as usize], Slot::Free)
    }
}

/// Wakers and buffers collected under the lock, woken and freed after it is released.
#[derive(Default)]
struct Scratch {
    wakers: Vec<Waker>,
    garbage: Vec<Keep>,
    freed: usize,
}

struct Shared {
    ring: IoUring,
    state: Mutex<State>,
    /// One permit per op the kernel may hold; bounded by the SQ size so neither queue can
    /// overflow.
    permits: Semaphore,
    depth: usize,
    closed: AtomicBool,
    shutdown: Notify,
    reaper_running: AtomicBool,
    /// The ring holds its own references to the fds through the fixed-file table; the
    /// backing keeps them open (and visible in /proc) for as long as the store is.
    backing: Backing,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under this lock cannot leave the slab inconsistent in a way that matters
        // more than refusing all further I/O would.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether every pushed SQE has been handed to the kernel. Needs the state lock.
    fn sq_empty(&self, _st: &mut State) -> bool {
        // SAFETY: the SQ is only accessed with the state lock held (proved by `_st`).
        unsafe { self.ring.submission_shared().is_empty() }
    }

    /// Moves finished CQEs into their slots. Needs the state lock.
    fn reap_locked(&self, st: &mut State, scratch: &mut Scratch) {
        // SAFETY: the CQ is only accessed with the state lock held.
        let mut cq = unsafe { self.ring.completion_shared() };
        loop {
            cq.sync();
            if cq.is_empty() {
                break;
            }
            for cqe in &mut cq {
                let idx = cqe.user_data() as u32;
                let Some(slot) = st.slots.get_mut(idx as usize) else {
                    tracing::error!(idx, "io_uring completion for an unknown slot");
                    continue;
                };
                match std::mem::replace(slot, Slot::Free) {
                    Slot::InFlight { waker, keep } => {
                        *slot = Slot::Done {
                            res: cqe.result(),
                            keep,
                        };
                        st.kernel_owned -= 1;
                        scratch.wakers.extend(waker);
                    }
                    Slot::Orphaned { keep } => {
                        st.free.push(idx);
                        st.kernel_owned -= 1;
                        scratch.garbage.push(keep);
                        scratch.freed += 1;
                    }
                    other => {
                        *slot = other;
                        tracing::error!(idx, "io_uring completion for a slot not in flight");
                    }
                }
            }
        }
    }

    /// Wakes and frees what `reap_locked` collected; must run without the lock.
    fn finish(&self, scratch: &mut Scratch) {
        if scratch.freed > 0 {
            self.permits.add_permits(scratch.freed);
            scratch.freed = 0;
        }
        scratch.garbage.clear();
        for w in scratch.wakers.drain(..) {
            w.wake();
        }
    }

    /// Hands pushed SQEs to the kernel unless another thread is already doing so; that
    /// thread re-checks the SQ after each enter, so nothing pushed meanwhile is stranded.
    fn lead_submission<'a>(&'a self, mut st: MutexGuard<'a, State>, scratch: &mut Scratch) {
        if st.submitting || self.sq_empty(&mut st) {
            return;
        }
        st.submitting = true;
        let mut busy = 0u32;
        loop {
            drop(st);
            let r = self.ring.submit();
            st = self.lock();
            // Requests the kernel finished inline (page-cache hits) complete right here.
            self.reap_locked(&mut st, scratch);
            if let Err(e) = r {
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::EBUSY) if busy < 1000 => {
                        // Transient kernel memory shortage; it cannot be CQ backlog since
                        // in-flight ops never exceed half the CQ.
                        busy += 1;
                        drop(st);
                        std::thread::sleep(Duration::from_micros(100));
                        st = self.lock();
                    }
                    _ => {
                        // Left in the SQ; the reaper retries after the next completion.
                        tracing::error!(path = %self.backing.path.display(), error = %e, "io_uring_enter failed");
                        break;
                    }
                }
            }
            if self.sq_empty(&mut st) {
                break;
            }
        }
        st.submitting = false;
        drop(st);
        self.finish(scratch);
    }

    /// Reaps completions and retries any submission a failed enter left behind.
    fn reap(&self, scratch: &mut Scratch) {
        let mut st = self.lock();
        self.reap_locked(&mut st, scratch);
        if !st.submitting && !self.sq_empty(&mut st) {
            self.lead_submission(st, scratch);
        } else {
            drop(st);
        }
        self.finish(scratch);
    }

    fn finished(&self) -> bool {
        self.closed.load(Ordering::Acquire) && self.lock().kernel_owned == 0
    }

    /// Starts a completion reaper if none is running: a tokio task when called inside a
    /// runtime, a thread otherwise. Called lazily so a store can be opened outside a runtime
    /// and outlive the runtime it was first used in.
    fn ensure_reaper(self: &Arc<Self>) {
        if self.reaper_running.load(Ordering::Acquire)
            || self
                .reaper_running
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let guard = ReaperGuard(self.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(reap_task(guard));
            }
            Err(_) => spawn_reaper_thread(guard),
        }
    }

    async fn acquire(&self) -> StoreResult<()> {
        match self.permits.try_acquire() {
            Ok(p) => p.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => self
                .permits
                .acquire()
                .await
                .map_err(|_| StoreError::Closed)?
                .forget(),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(StoreError::Closed),
        }
        Ok(())
    }

    /// Pushes `entry` with its memory parked in a fresh slot and submits it.
    ///
    /// Entering right away (rather than deferring the enter until other runnable tasks have
    /// pushed theirs) measured faster on virtio: keeping the device queue full matters more
    /// than saving syscalls and kicks.
    ///
    /// # Safety
    /// Every address in `entry` must point into the heap allocation owned by `keep` (or into
    /// static memory), and the caller must hold a permit from `acquire`.
    unsafe fn start(&self, entry: squeue::Entry, keep: Keep) -> StoreResult<u32> {
        let mut st = self.lock();
        let idx = st.alloc(Slot::InFlight { waker: None, keep });
        let entry = entry.user_data(u64::from(idx));
        // The permit guarantees room in the SQ, but not at once: the kernel posts the
        // completions of an enter before it commits the SQ head for the entries it took
        // (io_submit_sqes), so a completion reaped meanwhile frees a permit while its entry
        // still counts as queued. The room appears when that enter returns: wait for it,
        // bounded (about 100 ms at least).
        let mut tries = 0u32;
        let pushed = loop {
            // SAFETY: the SQ is only accessed with the state lock held.
            if unsafe { self.ring.submission_shared().push(&entry).is_ok() } {
                break true;
            }
            if tries == 10_000 {
                break false;
            }
            tries += 1;
            drop(st);
            std::thread::sleep(Duration::from_micros(10));
            st = self.lock();
        };
        if !pushed {
            // Fail the request rather than lose it. The kernel never saw `keep`, so
            // dropping it is fine.
            let slot = st.release(idx);
            drop(st);
            drop(slot);
            self.permits.add_permits(1);
            return Err(StoreError::Io(io::Error::from_raw_os_error(libc::EBUSY)));
        }
        st.kernel_owned += 1;
        let mut scratch = Scratch::default();
        self.lead_submission(st, &mut scratch);
        Ok(idx)
    }
}

impl Drop for Shared {
    /// Normally nothing is in flight here. If the reaper was killed (its runtime shut down)
    /// with orphaned ops still in the kernel, their buffers must outlive the kernel's use, so
    /// this blocks until they complete.
    fn drop(&mut self) {
        let mut scratch = Scratch::default();
        loop {
            let mut st = self.lock();
            self.reap_locked(&mut st, &mut scratch);
            let owned = st.kernel_owned;
            drop(st);
            scratch.wakers.clear();
            scratch.garbage.clear();
            if owned == 0 {
                return;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    _ => {
                        tracing::error!(path = %self.backing.path.display(), error = %e,
                            "cannot wait for in-flight io_uring ops; leaking their buffers");
                        std::mem::forget(std::mem::take(&mut self.lock().slots));
                        return;
                    }
                }
            }
        }
    }
}

/// Marks the reaper as gone however it ends (normal exit, runtime shutdown, thread failure).
struct ReaperGuard(Arc<Shared>);

impl Drop for ReaperGuard {
    fn drop(&mut self) {
        self.0.reaper_running.store(false, Ordering::Release);
    }
}

struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

async fn reap_task(guard: ReaperGuard) {
    let sh = guard.0.clone();
    // Registration panics (rather than failing) on a runtime without the IO driver.
    let fd = sh.ring.as_raw_fd();
    let registered = std::panic::catch_unwind(move || {
        // SAFETY: the ring fd stays open while `guard` holds the Arc, and `afd` is dropped
        // before `guard`.
        unsafe { AsyncFd::register_with_interest(RingFd(fd), Interest::READABLE) }
            .map_err(|e| e.to_string())
    });
    let afd = match registered {
        Ok(Ok(afd)) => afd,
        failed => {
            let error = match failed {
                Ok(Err(e)) => e,
                _ => "tokio runtime has no IO driver".to_owned(),
            };
            tracing::warn!(path = %sh.backing.path.display(), %error,
                "cannot poll io_uring from the tokio reactor; reaping on a thread");
            spawn_reaper_thread(guard);
            return;
        }
    };
    let mut scratch = Scratch::default();
    loop {
        sh.reap(&mut scratch);
        if sh.finished() {
            return;
        }
        tokio::select! {
            biased;
            ready = afd.readable() => match ready {
                Ok(mut g) => g.clear_ready(),
                Err(e) => {
                    tracing::warn!(path = %sh.backing.path.display(), error = %e,
                        "io_uring poll failed; reaping on a thread");
                    break;
                }
            },
            _ = sh.shutdown.notified() => {}
        }
    }
    drop(afd);
    spawn_reaper_thread(guard);
}

fn spawn_reaper_thread(guard: ReaperGuard) {
    let path = guard.0.backing.path.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("twinsan-uring".into())
        .spawn(move || reap_thread(guard))
    {
        tracing::error!(path = %path.display(), error = %e, "cannot start io_uring reaper thread");
    }
}

/// Fallback reaper for use outside tokio: blocks in io_uring_enter, waking periodically to
/// notice that the store was closed.
fn reap_thread(guard: ReaperGuard) {
    let sh = &guard.0;
    let ts = types::Timespec::new().nsec(20_000_000);
    let args = types::SubmitArgs::new().timespec(&ts);
    let mut scratch = Scratch::default();
    loop {
        sh.reap(&mut scratch);
        if sh.finished() {
            return;
        }
        if let Err(e) = sh.ring.submitter().submit_with_args(1, &args) {
            if !matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EAGAIN | libc::EBUSY)
            ) {
                tracing::warn!(path = %sh.backing.path.display(), error = %e, "io_uring wait failed");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// The future side of one op. Dropping it before completion orphans the slot instead of
/// freeing the buffer the kernel is using.
struct Op<'a> {
    shared: &'a Arc<Shared>,
    idx: u32,
    done: bool,
}

impl Future for Op<'_> {
    type Output = (i32, Keep);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        assert!(!this.done, "io_uring op polled after completion");
        let mut st = this.shared.lock();
        match &mut st.slots[this.idx as usize] {
            Slot::Done { .. } => {
                let Slot::Done { res, keep } = st.release(this.idx) else {
                    unreachable!()
                };
                drop(st);
                this.done = true;
                this.shared.permits.add_permits(1);
                Poll::Ready((res, keep))
            }
            Slot::InFlight { waker, .. } => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                drop(st);
                // The reaper dies with the runtime it ran on; a store used from another
                // runtime afterwards needs a new one.
                this.shared.ensure_reaper();
                Poll::Pending
            }
            _ => unreachable!("io_uring op slot in an impossible state"),
        }
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.shared.lock();
        let idx = self.idx;
        match std::mem::replace(&mut st.slots[idx as usize], Slot::Free) {
            Slot::InFlight { keep, .. } => st.slots[idx as usize] = Slot::Orphaned { keep },
            Slot::Done { keep, .. } => {
                st.free.push(idx);
                drop(st);
                drop(keep);
                self.shared.permits.add_permits(1);
            }
            other => st.slots[idx as usize] = other,
        }
    }
}

/// A [`BlockStore`] over a file or block device with all data I/O going through io_uring.
pub struct UringStore {
    shared: Arc<Shared>,
}

impl UringStore {
    /// Opens (and with `create_size`, creates) the backing file or device.
    pub fn open(opts: FileStoreOptions) -> Result<UringStore, OpenError> {
        Self::open_with(opts, OpenHooks::default())
    }

    pub(super) fn open_with(
        opts: FileStoreOptions,
        hooks: OpenHooks,
    ) -> Result<UringStore, OpenError> {
        let backing = Backing::open(&opts, hooks)?;
        let path = backing.path.as_path();
        let depth = opts.queue_depth;
        let ring = IoUring::builder()
            .setup_clamp()
            .setup_cqsize(depth.saturating_mul(2))
            .build(depth)
            .map_err(|source| OpenError::RingSetup {
                path: path.to_owned(),
                source,
            })?;
        let fds: Vec<RawFd> = backing.files.iter().map(|f| f.as_raw_fd()).collect();
        ring.submitter()
            .register_files(&fds)
            .map_err(|source| OpenError::Io {
                path: path.to_owned(),
                what: "io_uring register files",
                source,
            })?;
        // The CQ must hold every op that can be in flight, so cap in-flight ops by both.
        let sq = ring.params().sq_entries();
        let cq = ring.params().cq_entries();
        let max_in_flight = sq.min(cq / 2).max(1) as usize;

        let store = UringStore {
            shared: Arc::new(Shared {
                ring,
                state: Mutex::new(State {
                    slots: Vec::with_capacity(max_in_flight),
                    free: Vec::with_capacity(max_in_flight),
                    kernel_owned: 0,
                    submitting: false,
                }),
                permits: Semaphore::new(max_in_flight),
                depth: max_in_flight,
                closed: AtomicBool::new(false),
                shutdown: Notify::new(),
                reaper_running: AtomicBool::new(false),
                backing,
            }),
        };
        tracing::info!("opened store {}", store.describe());
        Ok(store)
    }

    #[cfg(test)]
    pub(super) fn backing(&self) -> &Backing {
        &self.shared.backing
    }

    /// Requests the kernel still owns (including those whose futures were dropped).
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> usize {
        self.shared.lock().kernel_owned
    }

    /// Runs one SQE to completion and hands back the memory it used.
    ///
    /// # Safety
    /// Every address in `entry` must point into the heap allocation owned by `keep` (or into
    /// static memory); moving `keep` into the slot must not move that allocation.
    async unsafe fn run(&self, entry: squeue::Entry, keep: Keep) -> StoreResult<(i32, Keep)> {
        self.shared.ensure_reaper();
        self.shared.acquire().await?;
        // SAFETY: forwarded from the caller; the permit was just acquired.
        let idx = unsafe { self.shared.start(entry, keep) }?;
        Ok(Op {
            shared: &self.shared,
            idx,
            done: false,
        }
        .await)
    }

    async fn read_impl(&self, offset: u64, len: usize) -> StoreResult<Bytes> {
        let sh = &self.shared;
        check_range(offset, len as u64, sh.backing.size)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        // Every byte is overwritten by the read, or zeroed below when the file ends early.
        let mut buf = AlignedBuf::recycled(len);
        let mut done = sh.backing.read_cached(offset, buf.as_mut_slice());
        let mut retries = 0u32;
        while done < len {
            let pos = offset + done as u64;
            let want = (len - done).min(MAX_CHUNK);
            let entry = {
                // SAFETY: done < len, so the pointer stays inside the allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(done) };
                opcode::Read::new(
                    fixed(sh.backing.route(pos, want, ptr as usize)),
                    ptr,
                    want as u32,
                )
                .offset(pos)
                .build()
            };
            // SAFETY: the entry points into `buf`'s heap allocation, which the op owns.
            let (res, keep) = unsafe { self.run(entry, Keep::Buf(buf)) }.await?;
            buf = keep.into_buf();
            match res {
                // EOF: the file shrank underneath us. The rest reads as zeroes.
                0 => {
                    buf.as_mut_slice()[done..].fill(0);
                    break;
                }
                n if n > 0 => {
                    done += n as usize;
                    retries = 0;
                }
                n => retry_or_fail(-n, &mut retries).await?,
            }
        }
        Ok(buf.into_bytes())
    }

    async fn write_impl(&self, offset: u64, data: Bytes, mode: WriteMode) -> StoreResult<()> {
        let sh = &self.shared;
        if sh.backing.read_only {
            return Err(StoreError::ReadOnly);
        }
        check_range(offset, data.len() as u64, sh.backing.size)?;
        let len = data.len();
        if len == 0 {
            return Ok(());
        }
        if let Some(r) = sh.backing.write_cached(offset, &data, mode) {
            return r;
        }
        let flags = match mode {
            WriteMode::Cached => 0,
            WriteMode::Durable => libc::RWF_DSYNC,
        };
        // Network buffers are rarely aligned; O_DIRECT needs a copy unless they happen to be.
        let mut keep = if sh.backing.direct_mem_aligned(data.as_ptr() as usize) {
            Keep::Bytes(data)
        } else {
            Keep::Buf(AlignedBuf::from_slice(&data))
        };
        let mut done = 0usize;
        let mut retries = 0u32;
        while done < len {
            let pos = offset + done as u64;
            let want = (len - done).min(MAX_CHUNK);
            let entry = {
                // SAFETY: done < len, so the pointer stays inside the allocation.
                let ptr = unsafe { keep.base().add(done) };
                opcode::Write::new(
                    fixed(sh.backing.route(pos, want, ptr as usize)),
                    ptr,
                    want as u32,
                )
                .offset(pos)
                .rw_flags(flags)
                .build()
            };
            // SAFETY: the entry points into `keep`'s heap allocation, which the op owns.
            let (res, k) = unsafe { self.run(entry, keep) }.await?;
            keep = k;
            match res {
                0 => {
                    return Err(StoreError::Io(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "backing store accepted no bytes",
                    )))
                }
                n if n > 0 => {
                    done += n as usize;
                    retries = 0;
                }
                n => retry_or_fail(-n, &mut retries).await?,
            }
        }
        Ok(())
    }

    async fn flush_impl(&self) -> StoreResult<()> {
        if self.shared.backing.read_only {
            return Ok(());
        }
        let mut retries = 0;
        loop {
            // One fsync covers both fds: dirty pages belong to the inode, not the fd.
            let entry = opcode::Fsync::new(fixed(MAIN))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            // SAFETY: fsync references no memory.
            let (res, _) = unsafe { self.run(entry, Keep::Nothing) }.await?;
            if res >= 0 {
                return Ok(());
            }
            retry_or_fail(-res, &mut retries).await?;
        }
    }

    /// fallocate through the ring; returns 0 or the errno.
    async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> StoreResult<i32> {
        let mut retries = 0;
        loop {
            let entry = opcode::Fallocate::new(fixed(MAIN), len)
                .offset(offset)
                .mode(mode)
                .build();
            // SAFETY: fallocate references no memory.
            let (res, _) = unsafe { self.run(entry, Keep::Nothing) }.await?;
            match -res {
                libc::EINTR | libc::EAGAIN if retries < MAX_RETRIES => retries += 1,
                e => return Ok(e.max(0)),
            }
        }
    }

    /// Deallocates where the backing store can (punch hole; on block devices this is a
    /// write-zeroes/unmap that guarantees zeroes), else zeroes the range some other way.
    async fn discard_impl(&self, offset: u64, len: u64) -> StoreResult<()> {
        let b = &self.shared.backing;
        if b.read_only {
            return Err(StoreError::ReadOnly);
        }
        check_range(offset, len, b.size)?;
        if len == 0 {
            return Ok(());
        }
        for (method, mode) in b.discard_modes() {
            let errno = self.fallocate(offset, len, mode).await?;
            if let DiscardStep::Done = b.discard_step(method, mode, errno)? {
                return Ok(());
            }
        }
        let zeroes = b.zeroes();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK as u64) as usize;
            self.write_impl(pos, zeroes.slice(..n), WriteMode::Cached)
                .await?;
            pos += n as u64;
        }
        Ok(())
    }
}

async fn retry_or_fail(errno: i32, retries: &mut u32) -> StoreResult<()> {
    if matches!(errno, libc::EINTR | libc::EAGAIN) && *retries < MAX_RETRIES {
        *retries += 1;
        tokio::task::yield_now().await;
        return Ok(());
    }
    Err(StoreError::from_errno(errno))
}

impl Drop for UringStore {
    /// Lets the reaper exit once orphaned ops have drained; it owns the last reference.
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.shutdown.notify_one();
    }
}

impl BlockStore for UringStore {
    fn size(&self) -> u64 {
        self.shared.backing.size
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(self.read_impl(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, mode: WriteMode) -> IoFuture<'_, ()> {
        Box::pin(self.write_impl(offset, data, mode))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.flush_impl())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.discard_impl(offset, len))
    }

    fn describe(&self) -> String {
        self.shared
            .backing
            .describe(&format!("io_uring depth {}", self.shared.depth))
    }

    fn engine(&self) -> &'static str {
        "io_uring"
    }
}
