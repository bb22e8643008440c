//! What both I/O engines share about a backing file or block device: opening it (O_DIRECT
//! with a buffered fallback, alignment from statx, block-device size and sector size), which
//! fd serves a request, the page-cache fast path for reads, the discard fallbacks, and the
//! description for the log and `twinsan status`. The engines ([`super::uring`],
//! [`super::threads`]) differ only in how a request reaches the kernel.

use super::aligned::{AlignedBuf, IO_ALIGN};
use super::sys::{self, errno_name};
use super::{StoreError, StoreResult, WriteMode};
use bytes::Bytes;
use rustix::fs::StatxFlags;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How a file store is opened.
#[derive(Debug, Clone)]
pub struct FileStoreOptions {
    pub path: PathBuf,
    pub read_only: bool,
    /// Try O_DIRECT; falls back to buffered I/O (with a warning) where the filesystem refuses.
    pub direct: bool,
    /// Create a sparse file of this size if `path` does not exist. An existing file is used
    /// as it is, whatever its size.
    pub create_size: Option<u64>,
    /// Requests in flight at most (io_uring: ring entries).
    pub queue_depth: u32,
    /// I/O threads at most (threads engine); 0 = the engine's default for this store.
    pub io_threads: usize,
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
            io_threads: 0,
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
    /// The kernel refused to set up an io_uring for this store.
    #[error("{}: io_uring setup: {source}", .path.display())]
    RingSetup {
        path: PathBuf,
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
            OpenError::Io { source, .. } | OpenError::RingSetup { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidInput,
        };
        StoreError::Io(io::Error::new(kind, e))
    }
}

/// Index in [`Backing::files`] of the fd opened as requested (O_DIRECT when available).
pub const MAIN: usize = 0;
/// Index of the buffered fd that serves requests O_DIRECT cannot take.
pub const BUFFERED: usize = 1;
/// Linux caps one read/write at MAX_RW_COUNT; asking for more only produces short counts.
pub const MAX_CHUNK: usize = 0x7fff_f000;
/// EINTR/EAGAIN results are retried this many times in a row before giving up.
pub const MAX_RETRIES: u32 = 1000;
/// Size of the shared zero buffer used when the backing store cannot deallocate.
pub const ZERO_CHUNK: usize = 1 << 20;

/// Discard methods in order of preference; a store only ever moves down the list.
const DISCARD_PUNCH: u8 = 0;
const DISCARD_ZERO_RANGE: u8 = 1;
#[cfg(test)]
const DISCARD_WRITE: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    RegularFile,
    BlockDevice,
}

#[derive(Debug)]
pub enum IoMode {
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

/// Test-only knobs that reproduce conditions this machine cannot (a filesystem refusing
/// O_DIRECT, a 4 KiB-sector device, an fd the kernel rejects).
#[derive(Default)]
pub struct OpenHooks {
    pub refuse_direct: bool,
    pub offset_align: Option<u32>,
    pub rdonly_main_fd: bool,
    /// The main fd is `/dev/full`: every write fails with ENOSPC as on a full filesystem,
    /// reads return zeroes.
    pub full_main_fd: bool,
}

/// What happens after one fallocate attempt of a discard.
pub enum DiscardStep {
    /// The range is deallocated (or zeroed): done.
    Done,
    /// Try the next method.
    Next,
}

/// An open backing file or device and the facts both engines route requests by.
pub struct Backing {
    pub path: PathBuf,
    pub kind: Kind,
    pub size: u64,
    pub read_only: bool,
    pub io_mode: IoMode,
    pub logical_block_size: u32,
    /// `files[MAIN]`, and in direct mode `files[BUFFERED]`.
    pub files: Vec<File>,
    discard_method: AtomicU8,
    warned_unaligned: AtomicBool,
    /// How [`Backing::read_cached`] reads: `CACHED_READ_*`. Moves from NOWAIT to MEMORY or
    /// ENGINE when the file refuses `preadv2(RWF_NOWAIT)`, so that is not tried again.
    cached_reads: AtomicU8,
    /// The file lives in memory (tmpfs, ramfs): reading it copies memory, never waits for a
    /// device (unless its pages were swapped out, which the stall back-off covers).
    memory_backed: bool,
    /// Until when (nanoseconds on [`clock_ns`]) I/O skips the inline paths
    /// ([`Backing::write_cached`], memory reads): set when an inline call stalled.
    inline_off_until: AtomicU64,
    /// The back-off set by the last stall, in nanoseconds: doubled when stalls recur soon
    /// after one ends, so a store under sustained pressure stays on the engine.
    inline_backoff_ns: AtomicU64,
    zeroes: OnceLock<Bytes>,
}

/// Largest write [`Backing::write_cached`] does on the calling thread.
pub const INLINE_WRITE_MAX: usize = 64 * 1024;
/// An inline write that slept (a voluntary context switch) for longer than this was
/// throttled or waited for the device (dirty-page limits, a journal commit, reclaim): the
/// store's writes go through the engine for [`INLINE_BACKOFF`].
pub const INLINE_STALL: Duration = Duration::from_millis(1);
/// How long a store's writes avoid the inline path after a stall.
pub const INLINE_BACKOFF: Duration = Duration::from_secs(5);
/// The longest back-off, reached when stall follows stall.
pub const INLINE_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Inline writes (and memory reads) running now, in the whole process (see
/// [`inline_slot_limit`]).
static INLINE_SLOTS: AtomicUsize = AtomicUsize::new(0);

/// [`Backing::read_cached`] tries `preadv2(RWF_NOWAIT)` (Linux 4.14; ext4, xfs, block devices).
const CACHED_READ_NOWAIT: u8 = 0;
/// The file refuses `RWF_NOWAIT` but lives in memory: a plain `pread`, bounded like the
/// inline writes.
const CACHED_READ_MEMORY: u8 = 1;
/// Neither: every read goes through the engine.
const CACHED_READ_ENGINE: u8 = 2;

/// Monotonic nanoseconds since the first call.
fn clock_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
}

/// How many inline writes may run at once: all but one of the runtime's workers, so one
/// carries on however long a write blocks; with one worker (the default on a 2-CPU host)
/// that one, because there the hop to the engine costs more than the rare stall, which the
/// back-off then keeps from recurring.
fn inline_slot_limit() -> usize {
    tokio::runtime::Handle::try_current()
        .map_or(1, |h| h.metrics().num_workers().saturating_sub(1).max(1))
}

/// Voluntary context switches of the calling thread so far: they count the times it slept.
pub(crate) fn voluntary_switches() -> i64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the buffer it is given.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: zero-initialised and, on success, filled by the kernel.
    unsafe { ru.assume_init() }.ru_nvcsw
}

/// Whether `file` is on a filesystem that keeps its data only in memory.
fn is_memory_backed(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes one statfs into the buffer it is given; the fd is open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: zero-initialised and, on success, filled by the kernel.
    let f_type = unsafe { st.assume_init() }.f_type;
    // ramfs's magic (0x858458f6, linux/magic.h) is not in the libc crate.
    f_type == libc::TMPFS_MAGIC || f_type as u32 == 0x8584_58f6
}

/// One slot of [`INLINE_SLOTS`], released on drop.
struct InlineSlot;

impl InlineSlot {
    fn try_acquire() -> Option<InlineSlot> {
        let limit = inline_slot_limit();
        INLINE_SLOTS
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| InlineSlot)
    }
}

impl Drop for InlineSlot {
    fn drop(&mut self) {
        INLINE_SLOTS.fetch_sub(1, Ordering::Release);
    }
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

/// A block device's size: its end, as `lseek(SEEK_END)` reports it (the same value as
/// BLKGETSIZE64, without an ioctl). The stores use positioned I/O, so the offset is unused.
fn blk_size(dev: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut dev = dev;
    dev.seek(SeekFrom::End(0))
}

/// A block device's logical block size (BLKSSZGET), at least 512.
fn blk_logical_block_size(dev: &File) -> io::Result<u32> {
    Ok(rustix::fs::ioctl_blksszget(dev)?.max(512))
}

/// `(mem_align, offset_align)` from statx(STATX_DIOALIGN), or None if the kernel (before 6.1)
/// or filesystem does not report it. `offset_align == 0` means "no direct I/O on this file".
fn statx_dio(fd: &File) -> Option<(u32, u32)> {
    let stx = sys::statx(fd, StatxFlags::DIOALIGN).ok()?;
    if stx.stx_mask & StatxFlags::DIOALIGN.bits() == 0 {
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

impl Backing {
    /// Opens (and with `create_size`, creates) the backing file or device.
    pub fn open(opts: &FileStoreOptions, hooks: OpenHooks) -> Result<Backing, OpenError> {
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
                blk_size(&main).map_err(|e| open_err(path, "BLKGETSIZE64", e))?,
                blk_logical_block_size(&main).map_err(|e| open_err(path, "BLKSSZGET", e))?,
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
            None => match statx_dio(&main) {
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
        if hooks.full_main_fd {
            let full = Path::new("/dev/full");
            main = open_fd(full, false, 0).map_err(|e| open_err(full, "open", e))?;
        }
        let mut files = vec![main];
        if let IoMode::Direct { .. } = io_mode {
            files.push(open_buffered()?);
        }
        let memory_backed = is_memory_backed(&files[MAIN]);
        Ok(Backing {
            path: path.to_owned(),
            kind,
            size,
            read_only: ro,
            io_mode,
            logical_block_size,
            files,
            discard_method: AtomicU8::new(DISCARD_PUNCH),
            warned_unaligned: AtomicBool::new(false),
            cached_reads: AtomicU8::new(CACHED_READ_NOWAIT),
            memory_backed,
            inline_off_until: AtomicU64::new(0),
            inline_backoff_ns: AtomicU64::new(0),
            zeroes: OnceLock::new(),
        })
    }

    pub fn is_direct(&self) -> bool {
        matches!(self.io_mode, IoMode::Direct { .. })
    }

    /// The open file `index` (MAIN or the O_DIRECT one), for the system calls in `sys`.
    pub fn file(&self, index: usize) -> &File {
        &self.files[index]
    }

    /// Picks the fd for one request: O_DIRECT needs offset, length and memory aligned.
    pub fn route(&self, pos: u64, len: usize, addr: usize) -> usize {
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

    /// Whether a write buffer at `addr` can go to the O_DIRECT fd without a copy.
    pub fn direct_mem_aligned(&self, addr: usize) -> bool {
        match self.io_mode {
            IoMode::Direct { mem_align, .. } => addr % mem_align as usize == 0,
            IoMode::Buffered { .. } => true,
        }
    }

    /// Reads what the page cache already holds of `[pos, pos + buf.len())` with one
    /// `preadv2(RWF_NOWAIT)` (Linux 4.14), which never waits for the device: a cache hit
    /// costs one syscall on the calling thread instead of a trip through the engine. A file
    /// that refuses `RWF_NOWAIT` (tmpfs does, with EOPNOTSUPP) but lives in memory is read
    /// with a plain `pread` instead, bounded like [`Backing::write_cached`]. Only for
    /// buffered stores (O_DIRECT reads always go to the device). Returns the bytes read (0 on
    /// a miss or any error; the engine then does the read and reports real errors).
    pub fn read_cached(&self, pos: u64, buf: &mut [u8]) -> usize {
        if !matches!(self.io_mode, IoMode::Buffered { .. }) || buf.is_empty() {
            return 0;
        }
        let len = buf.len().min(MAX_CHUNK);
        match self.cached_reads.load(Ordering::Relaxed) {
            CACHED_READ_NOWAIT => {
                match sys::preadv2(self.file(MAIN), &mut buf[..len], pos, libc::RWF_NOWAIT) {
                    Ok(n) => n,
                    Err(e) => {
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                        ) {
                            self.nowait_refused(&e);
                        }
                        0
                    }
                }
            }
            CACHED_READ_MEMORY => self.read_memory(pos, &mut buf[..len]),
            _ => 0,
        }
    }

    /// The kernel (before 4.14) or the filesystem refuses `preadv2(RWF_NOWAIT)`.
    fn nowait_refused(&self, e: &io::Error) {
        let next = if self.memory_backed {
            CACHED_READ_MEMORY
        } else {
            CACHED_READ_ENGINE
        };
        if self.cached_reads.swap(next, Ordering::Relaxed) != CACHED_READ_NOWAIT {
            return;
        }
        if self.memory_backed {
            tracing::info!(path = %self.path.display(), errno = %errno_name(e),
                "file is in memory (tmpfs) and refuses preadv2(RWF_NOWAIT); reads copy it on the runtime thread");
        } else {
            tracing::info!(path = %self.path.display(), errno = %errno_name(e),
                "kernel or filesystem refuses preadv2(RWF_NOWAIT); page-cache reads go through the engine");
        }
    }

    /// A plain `pread` of a memory-backed file on the calling thread, in an inline slot and
    /// outside a back-off; a read that slept (swapped-out pages) counts as a stall.
    fn read_memory(&self, pos: u64, buf: &mut [u8]) -> usize {
        if self.inline_backed_off() {
            return 0;
        }
        let Some(_slot) = InlineSlot::try_acquire() else {
            return 0;
        };
        let slept_before = voluntary_switches();
        let start = Instant::now();
        let n = sys::pread(self.file(MAIN), buf, pos).unwrap_or(0);
        self.inline_call_took(start, slept_before);
        n
    }

    /// Whether a stall's back-off is running.
    fn inline_backed_off(&self) -> bool {
        let off_until = self.inline_off_until.load(Ordering::Relaxed);
        off_until != 0 && clock_ns() < off_until
    }

    /// Judges one inline call that started at `start` with `slept_before` voluntary switches:
    /// only a call that slept is a stall; one that was merely preempted (the CPUs are busy)
    /// would be as slow on the engine's thread.
    fn inline_call_took(&self, start: Instant, slept_before: i64) {
        let took = start.elapsed();
        if took > INLINE_STALL && voluntary_switches() > slept_before {
            self.inline_io_stalled(took);
        }
    }

    /// Writes a small buffered write straight into the page cache on the calling thread: one
    /// `pwrite` instead of a hop to the engine's worker thread and back, which costs more
    /// CPU and latency than the copy itself (benches/results/replication-2026-12-07-inline-*.md
    /// and README). This kernel has no non-blocking buffered write (`RWF_NOWAIT` is
    /// EOPNOTSUPP on ext4 and tmpfs), so the write may block; it is bounded instead: whole
    /// pages only (no read of a partly written page from the device), at most
    /// [`INLINE_WRITE_MAX`], at most [`inline_slot_limit`] at once, and a write that slept
    /// longer than [`INLINE_STALL`] sends this store's writes through the engine for a
    /// back-off of [`INLINE_BACKOFF`], doubled up to [`INLINE_BACKOFF_MAX`] while stalls
    /// recur. `None`: not taken, the engine does the write (and reports errors). FUA writes
    /// (`WriteMode::Durable`) are always the engine's.
    pub fn write_cached(&self, pos: u64, data: &[u8], mode: WriteMode) -> Option<StoreResult<()>> {
        let page = page_size();
        if mode != WriteMode::Cached
            || !matches!(self.io_mode, IoMode::Buffered { .. })
            || self.read_only
            || data.is_empty()
            || data.len() > INLINE_WRITE_MAX
            || pos % page != 0
            || data.len() as u64 % page != 0
            || self.inline_backed_off()
        {
            return None;
        }
        let _slot = InlineSlot::try_acquire()?;
        let slept_before = voluntary_switches();
        let start = Instant::now();
        let mut done = 0usize;
        let mut result = Ok(());
        while done < data.len() {
            match sys::pwrite(self.file(MAIN), &data[done..], pos + done as u64) {
                Ok(0) => {
                    result = Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "backing store accepted no bytes",
                    ));
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.inline_call_took(start, slept_before);
        Some(result.map_err(StoreError::io))
    }

    /// Backs off from inline I/O after a call that stalled: for [`INLINE_BACKOFF`], or twice
    /// the last back-off (at most [`INLINE_BACKOFF_MAX`]) when the stall came within one
    /// back-off of the end of the last.
    pub(crate) fn inline_io_stalled(&self, took: Duration) {
        let now = clock_ns();
        let last_until = self.inline_off_until.load(Ordering::Relaxed);
        let last = self.inline_backoff_ns.load(Ordering::Relaxed);
        let backoff = if last_until != 0 && now < last_until.saturating_add(last) {
            last.saturating_mul(2)
                .min(INLINE_BACKOFF_MAX.as_nanos() as u64)
        } else {
            INLINE_BACKOFF.as_nanos() as u64
        };
        self.inline_backoff_ns.store(backoff, Ordering::Relaxed);
        self.inline_off_until
            .store(now + backoff, Ordering::Relaxed);
        let max = INLINE_BACKOFF_MAX.as_nanos() as u64;
        if backoff == max && last != max {
            // Sustained: the device does not keep up with its dirty pages (or memory is
            // short). Worth one line; the shorter back-offs before it are routine.
            tracing::info!(path = %self.path.display(), took_us = took.as_micros() as u64,
                "page-cache I/O keeps stalling; small writes (and memory reads) go through the I/O engine for {} s",
                INLINE_BACKOFF_MAX.as_secs());
        } else {
            tracing::debug!(path = %self.path.display(), took_us = took.as_micros() as u64,
                backoff_s = backoff / 1_000_000_000,
                "an inline page-cache write or read stalled; they go through the I/O engine for a while");
        }
    }

    /// Whether the file is on tmpfs or ramfs.
    #[cfg(test)]
    pub(crate) fn is_memory_backed(&self) -> bool {
        self.memory_backed
    }

    /// The back-off the last stall set (zero before any).
    #[cfg(test)]
    pub(crate) fn inline_backoff(&self) -> Duration {
        Duration::from_nanos(self.inline_backoff_ns.load(Ordering::Relaxed))
    }

    /// The fallocate modes a discard should try now, best first, with their method number.
    pub fn discard_modes(&self) -> impl Iterator<Item = (u8, i32)> + '_ {
        [
            (
                DISCARD_PUNCH,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            (
                DISCARD_ZERO_RANGE,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ),
        ]
        .into_iter()
        .filter(|(method, _)| self.discard_method.load(Ordering::Relaxed) <= *method)
    }

    /// Judges one fallocate result (`errno`, 0 for success) of discard method `method`.
    /// Punch hole on a block device is a write-zeroes/unmap that guarantees zeroes.
    pub fn discard_step(
        &self,
        method: u8,
        mode: i32,
        errno: i32,
    ) -> Result<DiscardStep, StoreError> {
        match errno {
            0 => Ok(DiscardStep::Done),
            libc::EOPNOTSUPP => {
                tracing::info!(path = %self.path.display(), mode,
                    "fallocate mode not supported; discard falls back to the next method");
                self.discard_method.fetch_max(method + 1, Ordering::Relaxed);
                Ok(DiscardStep::Next)
            }
            // Misaligned for this device: only this request takes the slow path.
            libc::EINVAL => Ok(DiscardStep::Next),
            e => Err(StoreError::from_errno(e)),
        }
    }

    #[cfg(test)]
    pub fn force_discard_by_writing(&self) {
        self.discard_method.store(DISCARD_WRITE, Ordering::Relaxed);
    }

    /// A shared buffer of [`ZERO_CHUNK`] zero bytes, aligned for O_DIRECT.
    pub fn zeroes(&self) -> Bytes {
        self.zeroes
            .get_or_init(|| AlignedBuf::zeroed(ZERO_CHUNK).into_bytes())
            .clone()
    }

    /// The log and status line: path, kind, size, direct or buffered and why, then `engine`.
    pub fn describe(&self, engine: &str) -> String {
        let mut s = format!("{}: ", self.path.display());
        match self.kind {
            Kind::RegularFile => s.push_str("regular file"),
            Kind::BlockDevice => {
                let _ = write!(
                    s,
                    "block device (logical block {})",
                    self.logical_block_size
                );
            }
        }
        let _ = write!(s, ", {} bytes, ", self.size);
        match &self.io_mode {
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
        if self.read_only {
            s.push_str(", read-only");
        }
        let _ = write!(s, ", {engine}");
        s
    }
}
