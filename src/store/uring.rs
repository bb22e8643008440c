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
//!   after the `FileStore` is dropped and the last orphaned op has completed, not inside
//!   `drop` itself.

use super::aligned::{AlignedBuf, IO_ALIGN};
use super::{check_range, BlockStore, IoFuture, StoreError, StoreResult, WriteMode};
use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{Notify, Semaphore};

/// How a [`FileStore`] is opened.
#[derive(Debug, Clone)]
pub struct FileStoreOptions {
    pub path: PathBuf,
    pub read_only: bool,
    /// Try O_DIRECT; falls back to buffered I/O (with a warning) where the filesystem refuses.
    pub direct: bool,
    /// Create a sparse file of this size if `path` does not exist. An existing file is used
    /// as it is, whatever its size.
    pub create_size: Option<u64>,
    /// Ring entries, which is also the cap on requests in flight.
    pub queue_depth: u32,
}

impl FileStoreOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileStoreOptions {
            path: path.into(),
            ..Default::default()
        }
    }
}

impl Default for FileStoreOptions {
    fn default() -> Self {
        FileStoreOptions {
            path: PathBuf::new(),
            read_only: false,
            direct: true,
            create_size: None,
            queue_depth: 256,
        }
    }
}

/// Why a store could not be opened; always names the path so the config error is findable.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{}: {what}: {source}", .path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: size {size} bytes is not a non-zero multiple of 512", .path.display())]
    BadSize { path: PathBuf, size: u64 },
    #[error("{}: not a regular file or block device", .path.display())]
    NotFileOrDevice { path: PathBuf },
    #[error("{}: queue_depth {depth} is out of range 1..=32768", .path.display())]
    BadQueueDepth { path: PathBuf, depth: u32 },
}

/// Lets callers that only know `StoreError` use `?`; the path context stays in the message.
impl From<OpenError> for StoreError {
    fn from(e: OpenError) -> Self {
        let kind = match &e {
            OpenError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidInput,
        };
        StoreError::Io(io::Error::new(kind, e))
    }
}

/// Fixed-file slot of the fd opened as requested (O_DIRECT when available).
const MAIN: types::Fixed = types::Fixed(0);
/// Fixed-file slot of the buffered fd that serves requests O_DIRECT cannot take.
const BUFFERED: types::Fixed = types::Fixed(1);
/// Linux caps one read/write at MAX_RW_COUNT; asking for more only produces short counts.
const MAX_CHUNK: usize = 0x7fff_f000;
/// EINTR/EAGAIN completions are retried this many times in a row before giving up.
const MAX_RETRIES: u32 = 1000;
/// Size of the shared zero buffer used when the backing store cannot deallocate.
const ZERO_CHUNK: usize = 1 << 20;

/// Discard methods in order of preference; a store only ever moves down the list.
const DISCARD_PUNCH: u8 = 0;
const DISCARD_ZERO_RANGE: u8 = 1;
const DISCARD_WRITE: u8 = 2;

#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const IOC_READ: u32 = 2 << 29;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const IOC_READ: u32 = 2 << 30;
/// `_IOR(0x12, 114, u64)`; libc does not export it.
const BLKGETSIZE64: u32 = IOC_READ | (8 << 16) | (0x12 << 8) | 114;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    RegularFile,
    BlockDevice,
}

#[derive(Debug)]
enum IoMode {
    /// Requests aligned to these go to the O_DIRECT fd, others to the buffered one.
    Direct {
        offset_align: u32,
        mem_align: u32,
        /// The filesystem did not report its alignment (statx), so it is a guess.
        guessed: bool,
    },
    Buffered {
        reason: String,
    },
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
    discard_method: AtomicU8,
    warned_unaligned: AtomicBool,
    zeroes: OnceLock<Bytes>,
    path: PathBuf,
    kind: Kind,
    size: u64,
    read_only: bool,
    io_mode: IoMode,
    logical_block_size: u32,
    /// The ring holds its own references through the fixed-file table; these are kept so
    /// the fds stay visible (e.g. in /proc) for as long as the store is.
    files: Vec<File>,
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
                        tracing::error!(path = %self.path.display(), error = %e, "io_uring_enter failed");
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
        // SAFETY: the SQ is only accessed with the state lock held.
        let pushed = unsafe { self.ring.submission_shared().push(&entry).is_ok() };
        if !pushed {
            // Cannot happen (in-flight ops never exceed the SQ size), but fail the request
            // rather than lose it. The kernel never saw `keep`, so dropping it is fine.
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

    /// Picks the fd for one request: O_DIRECT needs offset, length and memory aligned.
    fn target(&self, pos: u64, len: usize, addr: usize) -> types::Fixed {
        match self.io_mode {
            IoMode::Buffered { .. } => MAIN,
            IoMode::Direct {
                offset_align,
                mem_align,
                ..
            } => {
                let a = u64::from(offset_align);
                if pos % a != 0 || len as u64 % a != 0 {
                    if !self.warned_unaligned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            path = %self.path.display(),
                            offset = pos,
                            len,
                            align = offset_align,
                            "request not aligned to the device's direct-I/O block size; \
                             such requests use a buffered fd (logged once per store)"
                        );
                    }
                    BUFFERED
                } else if addr % mem_align as usize != 0 {
                    BUFFERED
                } else {
                    MAIN
                }
            }
        }
    }

    /// Reads what the page cache already holds of `[pos, pos + buf.len())` with one
    /// `preadv2(RWF_NOWAIT)`, which never waits for the device: a cache hit costs one
    /// syscall instead of a ring round trip. Only for buffered stores (O_DIRECT reads always
    /// go to the device). Returns the bytes read (0 on a miss or any error; the ring then
    /// does the read and reports real errors).
    fn read_cached(&self, pos: u64, buf: &mut [u8]) -> usize {
        if !matches!(self.io_mode, IoMode::Buffered { .. }) || buf.is_empty() {
            return 0;
        }
        let Ok(pos) = libc::off_t::try_from(pos) else {
            return 0;
        };
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len().min(MAX_CHUNK),
        };
        // SAFETY: the iovec points into `buf`, valid for writes for its length; the fd is
        // the store's buffered fd (the only one in buffered mode), open while `self` lives.
        let n = unsafe { libc::preadv2(self.files[0].as_raw_fd(), &iov, 1, pos, libc::RWF_NOWAIT) };
        usize::try_from(n).unwrap_or(0)
    }

    fn direct_mem_aligned(&self, addr: usize) -> bool {
        match self.io_mode {
            IoMode::Direct { mem_align, .. } => addr % mem_align as usize == 0,
            IoMode::Buffered { .. } => true,
        }
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
                        tracing::error!(path = %self.path.display(), error = %e,
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
            tracing::warn!(path = %sh.path.display(), %error,
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
                    tracing::warn!(path = %sh.path.display(), error = %e,
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
    let path = guard.0.path.clone();
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
                tracing::warn!(path = %sh.path.display(), error = %e, "io_uring wait failed");
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

/// Test-only knobs that reproduce conditions this machine cannot (a filesystem refusing
/// O_DIRECT, a 4 KiB-sector device, an fd the kernel rejects).
#[derive(Default)]
struct OpenHooks {
    refuse_direct: bool,
    offset_align: Option<u32>,
    rdonly_main_fd: bool,
}

/// A [`BlockStore`] over a file or block device with all data I/O going through io_uring.
pub struct FileStore {
    shared: Arc<Shared>,
}

fn open_err(path: &Path, what: &'static str, source: io::Error) -> OpenError {
    OpenError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

fn open_fd(path: &Path, read_only: bool, flags: i32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags)
        .open(path)
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP".into(),
        Some(n) => format!("errno {n}"),
        None => e.to_string(),
    }
}

fn blk_size(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    let rc = unsafe { libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn blk_logical_block_size(fd: RawFd) -> io::Result<u32> {
    let mut ssz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer.
    let rc = unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut ssz as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ssz.max(512) as u32)
}

/// `(mem_align, offset_align)` from statx(STATX_DIOALIGN), or None if the kernel or
/// filesystem does not report it. `offset_align == 0` means "no direct I/O on this file".
fn statx_dio(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: all-zero is a valid statx.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid C string and stx is writable.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

fn create_sparse(path: &Path, size: u64) -> Result<(), OpenError> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        // Backing files hold a whole disk's data; keep them private.
        .mode(0o600)
        .open(path)
    {
        Ok(f) => {
            f.set_len(size)
                .map_err(|e| open_err(path, "size new file", e))?;
            tracing::info!(path = %path.display(), size, "created sparse backing file");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(open_err(path, "create", e)),
    }
}

impl FileStore {
    /// Opens (and with `create_size`, creates) the backing file or device.
    pub fn open(opts: FileStoreOptions) -> Result<FileStore, OpenError> {
        Self::open_with(opts, OpenHooks::default())
    }

    fn open_with(opts: FileStoreOptions, hooks: OpenHooks) -> Result<FileStore, OpenError> {
        let path = opts.path.as_path();
        if !(1..=32768).contains(&opts.queue_depth) {
            return Err(OpenError::BadQueueDepth {
                path: path.to_owned(),
                depth: opts.queue_depth,
            });
        }
        if let Some(size) = opts.create_size {
            if size == 0 || size % 512 != 0 {
                return Err(OpenError::BadSize {
                    path: path.to_owned(),
                    size,
                });
            }
            create_sparse(path, size)?;
        }
        let meta = std::fs::metadata(path).map_err(|e| open_err(path, "stat", e))?;
        let kind = if meta.file_type().is_block_device() {
            Kind::BlockDevice
        } else if meta.is_file() {
            Kind::RegularFile
        } else {
            return Err(OpenError::NotFileOrDevice {
                path: path.to_owned(),
            });
        };
        let ro = opts.read_only;
        let open_buffered = || open_fd(path, ro, 0).map_err(|e| open_err(path, "open", e));

        let (mut main, refused) = if opts.direct {
            let r = if hooks.refuse_direct {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                open_fd(path, ro, libc::O_DIRECT)
            };
            match r {
                Ok(f) => (f, None),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(path = %path.display(), errno = %errno_name(&e),
                        "O_DIRECT refused by the filesystem; using buffered I/O");
                    (
                        open_buffered()?,
                        Some(format!(
                            "O_DIRECT refused by filesystem: {}",
                            errno_name(&e)
                        )),
                    )
                }
                Err(e) => return Err(open_err(path, "open", e)),
            }
        } else {
            (open_buffered()?, Some("O_DIRECT not requested".to_owned()))
        };

        let (size, lbs) = match kind {
            Kind::BlockDevice => (
                blk_size(main.as_raw_fd()).map_err(|e| open_err(path, "BLKGETSIZE64", e))?,
                blk_logical_block_size(main.as_raw_fd())
                    .map_err(|e| open_err(path, "BLKSSZGET", e))?,
            ),
            Kind::RegularFile => (
                main.metadata()
                    .map_err(|e| open_err(path, "stat", e))?
                    .len(),
                512,
            ),
        };
        if size == 0 || size % 512 != 0 {
            return Err(OpenError::BadSize {
                path: path.to_owned(),
                size,
            });
        }

        let io_mode = match refused {
            Some(reason) => IoMode::Buffered { reason },
            None => match statx_dio(main.as_raw_fd()) {
                Some((_, 0)) => {
                    let reason = "filesystem reports no direct I/O for this file".to_owned();
                    tracing::warn!(path = %path.display(), "{reason}; using buffered I/O");
                    main = open_buffered()?;
                    IoMode::Buffered { reason }
                }
                Some((mem, off)) => IoMode::Direct {
                    offset_align: off.max(lbs),
                    mem_align: mem.max(1),
                    guessed: false,
                },
                // Not reported: the fs block size is the safe guess for files, the logical
                // block size for devices.
                None => IoMode::Direct {
                    offset_align: match kind {
                        Kind::BlockDevice => lbs,
                        Kind::RegularFile => (meta.blksize() as u32).max(512),
                    },
                    mem_align: IO_ALIGN as u32,
                    guessed: true,
                },
            },
        };
        let io_mode = match (io_mode, hooks.offset_align) {
            (IoMode::Direct { mem_align, .. }, Some(offset_align)) => IoMode::Direct {
                offset_align,
                mem_align,
                guessed: false,
            },
            (m, _) => m,
        };
        let logical_block_size = match (&io_mode, kind) {
            (_, Kind::BlockDevice) => lbs,
            (IoMode::Direct { offset_align, .. }, Kind::RegularFile) => *offset_align,
            (IoMode::Buffered { .. }, Kind::RegularFile) => 512,
        };

        if hooks.rdonly_main_fd {
            let flags = match io_mode {
                IoMode::Direct { .. } => libc::O_DIRECT,
                IoMode::Buffered { .. } => 0,
            };
            main = open_fd(path, true, flags).map_err(|e| open_err(path, "open", e))?;
        }
        let mut files = vec![main];
        if let IoMode::Direct { .. } = io_mode {
            files.push(open_buffered()?);
        }

        let depth = opts.queue_depth;
        let ring = IoUring::builder()
            .setup_clamp()
            .setup_cqsize(depth.saturating_mul(2))
            .build(depth)
            .map_err(|e| open_err(path, "io_uring setup", e))?;
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        ring.submitter()
            .register_files(&fds)
            .map_err(|e| open_err(path, "io_uring register files", e))?;
        // The CQ must hold every op that can be in flight, so cap in-flight ops by both.
        let sq = ring.params().sq_entries();
        let cq = ring.params().cq_entries();
        let max_in_flight = sq.min(cq / 2).max(1) as usize;

        let store = FileStore {
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
                discard_method: AtomicU8::new(DISCARD_PUNCH),
                warned_unaligned: AtomicBool::new(false),
                zeroes: OnceLock::new(),
                path: path.to_owned(),
                kind,
                size,
                read_only: ro,
                io_mode,
                logical_block_size,
                files,
            }),
        };
        tracing::info!("opened store {}", store.describe());
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The smallest block the device addresses with direct I/O; a LUN block size below this
    /// makes unaligned requests take the (slower) buffered path.
    pub fn logical_block_size(&self) -> u32 {
        self.shared.logical_block_size
    }

    pub fn is_direct(&self) -> bool {
        matches!(self.shared.io_mode, IoMode::Direct { .. })
    }

    pub fn is_read_only(&self) -> bool {
        self.shared.read_only
    }

    #[cfg(test)]
    fn kernel_owned(&self) -> usize {
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
        check_range(offset, len as u64, sh.size)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        // Every byte is overwritten by the read, or zeroed below when the file ends early.
        let mut buf = AlignedBuf::recycled(len);
        let mut done = sh.read_cached(offset, buf.as_mut_slice());
        let mut retries = 0u32;
        while done < len {
            let pos = offset + done as u64;
            let want = (len - done).min(MAX_CHUNK);
            let entry = {
                // SAFETY: done < len, so the pointer stays inside the allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(done) };
                opcode::Read::new(sh.target(pos, want, ptr as usize), ptr, want as u32)
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
        if sh.read_only {
            return Err(StoreError::ReadOnly);
        }
        check_range(offset, data.len() as u64, sh.size)?;
        let len = data.len();
        if len == 0 {
            return Ok(());
        }
        let flags = match mode {
            WriteMode::Cached => 0,
            WriteMode::Durable => libc::RWF_DSYNC,
        };
        // Network buffers are rarely aligned; O_DIRECT needs a copy unless they happen to be.
        let mut keep = if sh.direct_mem_aligned(data.as_ptr() as usize) {
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
                opcode::Write::new(sh.target(pos, want, ptr as usize), ptr, want as u32)
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
        if self.shared.read_only {
            return Ok(());
        }
        let mut retries = 0;
        loop {
            // One fsync covers both fds: dirty pages belong to the inode, not the fd.
            let entry = opcode::Fsync::new(MAIN)
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
            let entry = opcode::Fallocate::new(MAIN, len)
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
        let sh = &self.shared;
        if sh.read_only {
            return Err(StoreError::ReadOnly);
        }
        check_range(offset, len, sh.size)?;
        if len == 0 {
            return Ok(());
        }
        let attempts = [
            (
                DISCARD_PUNCH,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            (
                DISCARD_ZERO_RANGE,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ),
        ];
        for (method, mode) in attempts {
            if sh.discard_method.load(Ordering::Relaxed) > method {
                continue;
            }
            match self.fallocate(offset, len, mode).await? {
                0 => return Ok(()),
                libc::EOPNOTSUPP => {
                    tracing::info!(path = %sh.path.display(), mode,
                        "fallocate mode not supported; discard falls back to the next method");
                    let next = match method {
                        DISCARD_PUNCH => DISCARD_ZERO_RANGE,
                        _ => DISCARD_WRITE,
                    };
                    sh.discard_method.fetch_max(next, Ordering::Relaxed);
                }
                // Misaligned for this device: only this request takes the slow path.
                libc::EINVAL => {}
                e => return Err(StoreError::Io(io::Error::from_raw_os_error(e))),
            }
        }
        let zeroes = sh
            .zeroes
            .get_or_init(|| AlignedBuf::zeroed(ZERO_CHUNK).into_bytes())
            .clone();
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
    Err(StoreError::Io(io::Error::from_raw_os_error(errno)))
}

impl Drop for FileStore {
    /// Lets the reaper exit once orphaned ops have drained; it owns the last reference.
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.shutdown.notify_one();
    }
}

impl BlockStore for FileStore {
    fn size(&self) -> u64 {
        self.shared.size
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
        let sh = &self.shared;
        let mut s = format!("{}: ", sh.path.display());
        match sh.kind {
            Kind::RegularFile => s.push_str("regular file"),
            Kind::BlockDevice => {
                let _ = write!(s, "block device (logical block {})", sh.logical_block_size);
            }
        }
        let _ = write!(s, ", {} bytes, ", sh.size);
        match &sh.io_mode {
            IoMode::Direct {
                offset_align,
                guessed,
                ..
            } => {
                let _ = write!(
                    s,
                    "O_DIRECT (requests not aligned to {offset_align} bytes use buffered I/O{})",
                    if *guessed {
                        "; alignment not reported by the filesystem, guessed"
                    } else {
                        ""
                    }
                );
            }
            IoMode::Buffered { reason } => {
                let _ = write!(s, "buffered I/O ({reason})");
            }
        }
        if sh.read_only {
            s.push_str(", read-only");
        }
        let _ = write!(s, ", io_uring depth {}", sh.depth);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::os::unix::fs::MetadataExt;
    use tempfile::TempDir;

    const MIB: u64 = 1 << 20;

    fn init_tracing() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("debug")
            .try_init();
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut v = vec![0u8; len.next_multiple_of(8)];
        for chunk in v.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        v.truncate(len);
        v
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn opts(dir: &TempDir, size: u64) -> FileStoreOptions {
        FileStoreOptions {
            create_size: Some(size),
            ..FileStoreOptions::new(dir.path().join("disk.img"))
        }
    }

    fn temp_store(size: u64, direct: bool) -> (TempDir, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(FileStoreOptions {
            direct,
            ..opts(&dir, size)
        })
        .unwrap();
        (dir, store)
    }

    async fn wait_idle(store: &FileStore) {
        for _ in 0..2000 {
            if store.kernel_owned() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("ops still in flight after 10 s");
    }

    fn is_errno(e: &StoreError, errno: i32) -> bool {
        matches!(e, StoreError::Io(io) if io.raw_os_error() == Some(errno))
    }

    /// Random sizes and offsets (512-byte granularity), checked against a shadow copy.
    async fn random_io_against_shadow(store: &FileStore, ops: usize, seed: u64) {
        let size = store.size();
        let mut shadow = vec![0u8; size as usize];
        let mut rng = Rng(seed | 1);
        for i in 0..ops {
            let len = (rng.below(128) + 1) * 512;
            let off = rng.below((size - len) / 512 + 1) * 512;
            if rng.below(2) == 0 {
                let data = pattern(i as u64 + seed, len as usize);
                shadow[off as usize..(off + len) as usize].copy_from_slice(&data);
                store
                    .write(off, Bytes::from(data), WriteMode::Cached)
                    .await
                    .unwrap();
            } else {
                let got = store.read(off, len as usize).await.unwrap();
                assert_eq!(
                    &got[..],
                    &shadow[off as usize..(off + len) as usize],
                    "op {i}"
                );
            }
        }
        let all = store.read(0, size as usize).await.unwrap();
        assert!(all == shadow[..], "final contents differ");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_io_direct_multi_thread() {
        let (_dir, store) = temp_store(8 * MIB, true);
        println!("{}", store.describe());
        assert!(store.is_direct(), "{}", store.describe());
        random_io_against_shadow(&store, 2000, 7).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn random_io_buffered_current_thread() {
        let (_dir, store) = temp_store(8 * MIB, false);
        assert!(!store.is_direct());
        assert!(store
            .describe()
            .contains("buffered I/O (O_DIRECT not requested)"));
        random_io_against_shadow(&store, 2000, 11).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn buffered_cache_hits_are_read_without_the_ring() {
        let (_dir, store) = temp_store(MIB, false);
        let data = pattern(5, 64 * 1024);
        store
            .write(4096, Bytes::from(data.clone()), WriteMode::Cached)
            .await
            .unwrap();
        // Just written, so cached: the fast path reads all of it.
        let mut buf = vec![0u8; data.len()];
        assert_eq!(store.shared.read_cached(4096, &mut buf), data.len());
        assert!(buf == data);
        assert_eq!(&store.read(4096, data.len()).await.unwrap()[..], &data[..]);
        // Direct stores never take it.
        let (_dir2, direct) = temp_store(MIB, true);
        assert!(direct.is_direct());
        assert_eq!(direct.shared.read_cached(0, &mut buf), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn random_io_direct_current_thread() {
        let (_dir, store) = temp_store(8 * MIB, true);
        random_io_against_shadow(&store, 2000, 13).await;
    }

    /// 64 tasks, each with its own region, so the expected contents are deterministic while
    /// 64 requests are in flight at once.
    async fn concurrent_64(store: Arc<FileStore>) {
        let region = store.size() / 64;
        let mut tasks = Vec::new();
        for t in 0..64u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let base = t * region;
                let mut shadow = vec![0u8; region as usize];
                let mut rng = Rng(t * 977 + 5);
                for i in 0..60u64 {
                    let len = (rng.below(16) + 1) * 4096;
                    let off = rng.below((region - len) / 512 + 1) * 512;
                    let data = pattern(t << 32 | i, len as usize);
                    shadow[off as usize..(off + len) as usize].copy_from_slice(&data);
                    let mode = if i % 5 == 0 {
                        WriteMode::Durable
                    } else {
                        WriteMode::Cached
                    };
                    store
                        .write(base + off, Bytes::from(data), mode)
                        .await
                        .unwrap();
                    let roff = rng.below((region - len) / 512 + 1) * 512;
                    let got = store.read(base + roff, len as usize).await.unwrap();
                    assert_eq!(&got[..], &shadow[roff as usize..(roff + len) as usize]);
                }
                let got = store.read(base, region as usize).await.unwrap();
                assert!(got == shadow[..]);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        store.flush().await.unwrap();
        assert_eq!(store.kernel_owned(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrency_64_in_flight() {
        let (_dir, store) = temp_store(64 * MIB, true);
        concurrent_64(Arc::new(store)).await;
    }

    /// A queue depth far below the concurrency makes requests wait for a slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrency_above_queue_depth() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(FileStoreOptions {
            queue_depth: 4,
            ..opts(&dir, 16 * MIB)
        })
        .unwrap();
        assert!(
            store.describe().contains("io_uring depth 4"),
            "{}",
            store.describe()
        );
        concurrent_64(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fua_writes_and_flush_reach_the_file() {
        let (dir, store) = temp_store(4 * MIB, true);
        let a = pattern(1, 64 * 1024);
        let b = pattern(2, 4096);
        store
            .write(0, Bytes::from(a.clone()), WriteMode::Durable)
            .await
            .unwrap();
        store
            .write(MIB, Bytes::from(b.clone()), WriteMode::Cached)
            .await
            .unwrap();
        store.flush().await.unwrap();
        let on_disk = std::fs::read(dir.path().join("disk.img")).unwrap();
        assert_eq!(&on_disk[..a.len()], &a[..]);
        assert_eq!(&on_disk[MIB as usize..MIB as usize + b.len()], &b[..]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn discard_reads_back_zeroes_and_frees_space() {
        let (dir, store) = temp_store(4 * MIB, true);
        let data = pattern(3, 4 * MIB as usize);
        store
            .write(0, Bytes::from(data.clone()), WriteMode::Cached)
            .await
            .unwrap();
        store.flush().await.unwrap();
        let path = dir.path().join("disk.img");
        let before = std::fs::metadata(&path).unwrap().blocks();
        store.discard(MIB, 2 * MIB).await.unwrap();
        // Not 4 KiB aligned: ext4 zeroes the partial blocks itself.
        store.discard(512, 1024).await.unwrap();
        let after = std::fs::metadata(&path).unwrap().blocks();
        assert!(
            after < before,
            "hole not punched: {before} -> {after} blocks"
        );
        let got = store.read(0, 4 * MIB as usize).await.unwrap();
        let mut want = data;
        want[MIB as usize..3 * MIB as usize].fill(0);
        want[512..1536].fill(0);
        assert!(got == want[..]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn discard_falls_back_to_writing_zeroes() {
        let (_dir, store) = temp_store(MIB, true);
        store
            .write(0, Bytes::from(pattern(4, MIB as usize)), WriteMode::Cached)
            .await
            .unwrap();
        store
            .shared
            .discard_method
            .store(DISCARD_WRITE, Ordering::Relaxed);
        store.discard(4096, 8192).await.unwrap();
        let got = store.read(4096, 8192).await.unwrap();
        assert!(got.iter().all(|&b| b == 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sparse_create_and_existing_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let store = FileStore::open(opts(&dir, 64 * MIB)).unwrap();
        assert_eq!(store.size(), 64 * MIB);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 * MIB);
        assert_eq!(meta.blocks(), 0, "not sparse");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(store.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
        drop(store);
        // Existing file: create_size is ignored, size comes from the file.
        let store = FileStore::open(opts(&dir, 128 * MIB)).unwrap();
        assert_eq!(store.size(), 64 * MIB);
        // Invalid create sizes are refused before anything is created.
        let err = FileStore::open(FileStoreOptions {
            create_size: Some(1000),
            ..FileStoreOptions::new(dir.path().join("other.img"))
        })
        .err()
        .unwrap();
        assert!(
            matches!(err, OpenError::BadSize { size: 1000, .. }),
            "{err}"
        );
        assert!(!dir.path().join("other.img").exists());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn open_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.img");
        let err = FileStore::open(FileStoreOptions::new(&missing))
            .err()
            .unwrap();
        assert!(err.to_string().contains("missing.img"), "{err}");
        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let err = FileStore::open(FileStoreOptions::new(&odd)).err().unwrap();
        assert!(
            matches!(err, OpenError::BadSize { size: 1000, .. }),
            "{err}"
        );
        let err = FileStore::open(FileStoreOptions::new(dir.path()))
            .err()
            .unwrap();
        assert!(matches!(err, OpenError::NotFileOrDevice { .. }), "{err}");
        let err = StoreError::from(
            FileStore::open(FileStoreOptions::new(&missing))
                .err()
                .unwrap(),
        );
        assert!(err.to_string().contains("missing.img"), "{err}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn read_only_refuses_writes_and_discards() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, pattern(5, MIB as usize)).unwrap();
        let store = FileStore::open(FileStoreOptions {
            read_only: true,
            ..FileStoreOptions::new(&path)
        })
        .unwrap();
        assert!(store.describe().contains("read-only"));
        assert!(matches!(
            store
                .write(0, Bytes::from_static(&[0; 512]), WriteMode::Cached)
                .await,
            Err(StoreError::ReadOnly)
        ));
        assert!(matches!(
            store.discard(0, 512).await,
            Err(StoreError::ReadOnly)
        ));
        store.flush().await.unwrap();
        let got = store.read(0, MIB as usize).await.unwrap();
        assert!(got == pattern(5, MIB as usize)[..]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn out_of_range_is_an_error() {
        let (_dir, store) = temp_store(MIB, true);
        let oor = |r: StoreResult<()>| matches!(r, Err(StoreError::OutOfRange { .. }));
        assert!(oor(store.read(MIB - 512, 1024).await.map(|_| ())));
        assert!(oor(store.read(u64::MAX - 10, 512).await.map(|_| ())));
        assert!(oor(store
            .write(MIB, Bytes::from_static(&[1; 512]), WriteMode::Cached)
            .await));
        assert!(oor(store.discard(u64::MAX, 2).await));
        assert!(store.read(MIB, 0).await.unwrap().is_empty());
        assert_eq!(store.read(MIB - 512, 512).await.unwrap().len(), 512);
    }

    /// A file that shrinks after open reads as zeroes past its new end, including the
    /// unaligned tail of an O_DIRECT short read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_read_at_eof_returns_zeroes() {
        for direct in [true, false] {
            let (dir, store) = temp_store(MIB, direct);
            let data = pattern(6, MIB as usize);
            store
                .write(0, Bytes::from(data.clone()), WriteMode::Cached)
                .await
                .unwrap();
            store.flush().await.unwrap();
            let f = OpenOptions::new()
                .write(true)
                .open(dir.path().join("disk.img"))
                .unwrap();
            f.set_len(512 * 1024 + 512).unwrap();
            let got = store.read(512 * 1024 - 4096, 16384).await.unwrap();
            assert_eq!(got.len(), 16384);
            assert_eq!(
                &got[..4096 + 512],
                &data[512 * 1024 - 4096..512 * 1024 + 512]
            );
            assert!(got[4096 + 512..].iter().all(|&b| b == 0), "direct={direct}");
        }
    }

    /// A ring op that fails (EBADF from an fd opened read-only) surfaces as StoreError::Io
    /// and leaves the store usable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn io_errors_surface_and_store_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, pattern(7, MIB as usize)).unwrap();
        let hooks = OpenHooks {
            rdonly_main_fd: true,
            ..Default::default()
        };
        let store = FileStore::open_with(FileStoreOptions::new(&path), hooks).unwrap();
        for _ in 0..3 {
            let err = store
                .write(0, Bytes::from(vec![0u8; 4096]), WriteMode::Cached)
                .await
                .unwrap_err();
            assert!(is_errno(&err, libc::EBADF), "{err:?}");
            let err = store.discard(0, 4096).await.unwrap_err();
            assert!(is_errno(&err, libc::EBADF), "{err:?}");
            let got = store.read(0, 8192).await.unwrap();
            assert_eq!(&got[..], &pattern(7, MIB as usize)[..8192]);
        }
        assert_eq!(store.kernel_owned(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_refused_falls_back_to_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = OpenHooks {
            refuse_direct: true,
            ..Default::default()
        };
        let store = FileStore::open_with(opts(&dir, 8 * MIB), hooks).unwrap();
        assert!(!store.is_direct());
        let d = store.describe();
        assert!(
            d.contains("buffered I/O (O_DIRECT refused by filesystem: EINVAL)"),
            "{d}"
        );
        random_io_against_shadow(&store, 500, 17).await;
    }

    /// A device whose direct-I/O block is larger than the request alignment: 512-byte
    /// requests go through the buffered fd and stay coherent with direct ones.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unaligned_requests_use_buffered_fd() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = OpenHooks {
            offset_align: Some(4096),
            ..Default::default()
        };
        let store = FileStore::open_with(opts(&dir, 8 * MIB), hooks).unwrap();
        assert_eq!(store.logical_block_size(), 4096);
        assert!(store.describe().contains("not aligned to 4096 bytes"));
        random_io_against_shadow(&store, 2000, 19).await;
    }

    /// Futures dropped while the kernel owns their buffers: nothing crashes, every write
    /// lands either entirely or not at all (per sector), and the slots drain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_ops_do_not_corrupt() {
        const BLOCK: usize = 256 * 1024;
        const BLOCKS: u64 = 64;
        let (dir, store) = temp_store(2 * BLOCKS * BLOCK as u64, true);
        let store = Arc::new(store);
        // Background load on the upper half, checked for integrity.
        let bg = {
            let store = store.clone();
            tokio::spawn(async move {
                let base = BLOCKS * BLOCK as u64;
                for i in 0..200u64 {
                    let off = base + (i % BLOCKS) * BLOCK as u64;
                    let data = pattern(1000 + i, BLOCK);
                    store
                        .write(off, Bytes::from(data.clone()), WriteMode::Cached)
                        .await
                        .unwrap();
                    assert!(store.read(off, BLOCK).await.unwrap() == data[..]);
                }
            })
        };
        let mut dropped = 0;
        for round in 0..4u64 {
            for b in 0..BLOCKS {
                let off = b * BLOCK as u64;
                let w = store.write(off, Bytes::from(pattern(b, BLOCK)), WriteMode::Cached);
                if w.now_or_never().is_none() {
                    dropped += 1;
                }
                let r = store.read(off, BLOCK);
                if r.now_or_never().is_none() {
                    dropped += 1;
                }
            }
            if round % 2 == 1 {
                wait_idle(&store).await;
            }
        }
        println!("{dropped} futures dropped mid-flight");
        assert!(dropped > 0, "no future was dropped mid-flight");
        bg.await.unwrap();
        wait_idle(&store).await;
        let check = |contents: &[u8]| {
            for b in 0..BLOCKS as usize {
                let want = pattern(b as u64, BLOCK);
                for (s, sector) in contents[b * BLOCK..(b + 1) * BLOCK].chunks(512).enumerate() {
                    let new = &want[s * 512..(s + 1) * 512];
                    assert!(
                        sector == new || sector.iter().all(|&x| x == 0),
                        "block {b} sector {s} torn"
                    );
                }
            }
        };
        check(&store.read(0, BLOCKS as usize * BLOCK).await.unwrap());
        // Now drop the store itself while orphaned ops are in the kernel.
        for b in 0..BLOCKS {
            let off = b * BLOCK as u64;
            let _ = store
                .write(off, Bytes::from(pattern(b, BLOCK)), WriteMode::Cached)
                .now_or_never();
            let _ = store.read(off, BLOCK).now_or_never();
        }
        drop(Arc::try_unwrap(store).ok().expect("sole owner"));
        // Give the reaper time to drain and exit; then the file must be consistent.
        tokio::time::sleep(Duration::from_millis(200)).await;
        check(&std::fs::read(dir.path().join("disk.img")).unwrap());
    }

    /// The reaper task dies with its runtime while ops are orphaned in the kernel; the
    /// store then works outside any runtime (reaper thread) and its drop waits for the
    /// kernel.
    #[test]
    fn survives_runtime_shutdown_with_ops_in_flight() {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(opts(&dir, 32 * MIB)).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for b in 0..32u64 {
                let _ = store
                    .write(
                        b * MIB,
                        Bytes::from(pattern(b, MIB as usize)),
                        WriteMode::Cached,
                    )
                    .now_or_never();
            }
        });
        drop(rt);
        let got = futures::executor::block_on(store.read(0, 4096)).unwrap();
        assert_eq!(got.len(), 4096);
        futures::executor::block_on(store.write(
            0,
            Bytes::from(pattern(0, MIB as usize)),
            WriteMode::Durable,
        ))
        .unwrap();
        // Orphans again, then drop with no runtime and no reaper running afterwards.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for b in 0..32u64 {
                let _ = store
                    .write(
                        b * MIB,
                        Bytes::from(pattern(b, MIB as usize)),
                        WriteMode::Cached,
                    )
                    .now_or_never();
            }
        });
        drop(rt);
        drop(store);
        let on_disk = std::fs::read(dir.path().join("disk.img")).unwrap();
        assert_eq!(&on_disk[..MIB as usize], &pattern(0, MIB as usize)[..]);
    }

    /// Loop device with 4 KiB sectors: BLKGETSIZE64/BLKSSZGET, direct and buffered paths,
    /// discard. Needs root and losetup: `cargo test -- --ignored block_device`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn block_device_loop() {
        let dir = tempfile::tempdir_in("/work").unwrap();
        let img = dir.path().join("loop.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--sector-size", "4096"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        struct Detach(String);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = std::process::Command::new("losetup")
                    .args(["-d", &self.0])
                    .status();
            }
        }
        let _detach = Detach(dev.clone());
        let store = FileStore::open(FileStoreOptions::new(&dev)).unwrap();
        println!("{}", store.describe());
        assert_eq!(store.size(), 64 * MIB);
        assert_eq!(store.logical_block_size(), 4096);
        assert!(store.is_direct());
        random_io_against_shadow(&store, 1000, 23).await;
        store
            .write(0, Bytes::from(pattern(9, MIB as usize)), WriteMode::Durable)
            .await
            .unwrap();
        store.discard(4096, 8192).await.unwrap();
        store.discard(512, 512).await.unwrap();
        let got = store.read(0, 16384).await.unwrap();
        let mut want = pattern(9, MIB as usize)[..16384].to_vec();
        want[4096..12288].fill(0);
        want[512..1024].fill(0);
        assert!(got == want[..]);
        store.flush().await.unwrap();
    }

    /// `cargo test --release -- --ignored --nocapture bench_4k_random_qd32`
    /// Env: TWINSAN_BENCH_DIR (default /work), TWINSAN_BENCH_DEV (a block device
    /// or file to use instead of a temp file; it is overwritten), TWINSAN_BENCH_SECS,
    /// TWINSAN_BENCH_QD, TWINSAN_BENCH_MODES ("direct,buffered"), TWINSAN_BENCH_NOFILL.
    #[test]
    #[ignore]
    fn bench_4k_random_qd32() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let base = std::env::var("TWINSAN_BENCH_DIR").unwrap_or_else(|_| "/work".into());
        let dir = tempfile::tempdir_in(base).unwrap();
        let size = 1024 * MIB;
        let secs = std::env::var("TWINSAN_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5u64);
        let qd: u64 = std::env::var("TWINSAN_BENCH_QD")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(32);
        let modes = std::env::var("TWINSAN_BENCH_MODES").unwrap_or("direct,buffered".into());
        let fill = std::env::var_os("TWINSAN_BENCH_NOFILL").is_none();
        rt.block_on(async {
            for direct in [true, false] {
                if !modes.contains(if direct { "direct" } else { "buffered" }) {
                    continue;
                }
                let o = match std::env::var("TWINSAN_BENCH_DEV") {
                    Ok(dev) => FileStoreOptions::new(dev),
                    Err(_) => opts(&dir, size),
                };
                let store = Arc::new(FileStore::open(FileStoreOptions { direct, ..o }).unwrap());
                let size = store.size();
                if direct && fill {
                    // Fill so reads hit real blocks, not holes.
                    let chunk = 4 * MIB as usize;
                    let data = Bytes::from(pattern(1, chunk));
                    let mut tasks = Vec::new();
                    for t in 0..4u64 {
                        let (store, data) = (store.clone(), data.clone());
                        tasks.push(tokio::spawn(async move {
                            let mut off = t * chunk as u64;
                            while off < size {
                                store
                                    .write(off, data.clone(), WriteMode::Cached)
                                    .await
                                    .unwrap();
                                off += 4 * chunk as u64;
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.unwrap();
                    }
                    store.flush().await.unwrap();
                }
                println!("{}", store.describe());
                for write in [false, true] {
                    let stop = Arc::new(AtomicBool::new(false));
                    let mut tasks = Vec::new();
                    for q in 0..qd {
                        let (store, stop) = (store.clone(), stop.clone());
                        tasks.push(tokio::spawn(async move {
                            let mut rng = Rng(q * 7919 + 1);
                            let data = Bytes::from(pattern(q, 4096));
                            let mut n = 0u64;
                            while !stop.load(Ordering::Relaxed) {
                                let off = rng.below(size / 4096) * 4096;
                                if write {
                                    store
                                        .write(off, data.clone(), WriteMode::Cached)
                                        .await
                                        .unwrap();
                                } else {
                                    store.read(off, 4096).await.unwrap();
                                }
                                n += 1;
                            }
                            n
                        }));
                    }
                    let start = std::time::Instant::now();
                    let (mut samples, mut sum) = (0u64, 0u64);
                    while start.elapsed() < Duration::from_secs(secs) {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        samples += 1;
                        sum += store.kernel_owned() as u64;
                    }
                    println!("avg in kernel {:.1}", sum as f64 / samples as f64);
                    stop.store(true, Ordering::Relaxed);
                    let mut total = 0;
                    for t in tasks {
                        total += t.await.unwrap();
                    }
                    let iops = total as f64 / start.elapsed().as_secs_f64();
                    println!(
                        "{} 4k random {} QD{qd}: {:.0} IOPS",
                        if direct { "O_DIRECT" } else { "buffered" },
                        if write { "write" } else { "read" },
                        iops
                    );
                }
            }
        });
    }
}
