//! Block stores: where a LUN's bytes live, and the `BlockStore` abstraction every layer of
//! twinsan shares: the iSCSI target serves a `BlockStore`, a replicated volume wraps one.
//!
//! The stores for files and block devices have two engines: io_uring ([`UringStore`], Linux
//! 5.6+) and a bounded pool of I/O threads ([`ThreadStore`], for kernels without io_uring such
//! as XenServer / XCP-ng dom0's 4.19). [`choose_engine`] picks one at start;
//! [`open_file_store`] opens a LUN with it. [`MemStore`] and [`StdFileStore`] serve tests and
//! tools.
//!
//! A store is a flat array of bytes addressed by byte offset. Callers guarantee that every
//! request is inside `size()` and a multiple of the LUN's block size.

mod aligned;
mod backing;
mod engine;
mod file;
mod mem;
mod sys;
mod threads;
mod uring;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;

pub use aligned::AlignedBuf;
pub use backing::{FileStoreOptions, OpenError};
pub use engine::{
    choose_engine, open_file_store, EngineChoice, EngineError, IoEngine, IoEngineSetting,
};
pub use file::StdFileStore;
pub use mem::MemStore;
pub use threads::ThreadStore;
pub use uring::UringStore;

/// Errors a store reports for one request. The SCSI layer turns `Io` into MEDIUM ERROR sense
/// and `NoSpace` into DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT.
///
/// Build them from an `io::Error` with [`StoreError::io`] (or `From`/`?`), never with the
/// variants directly: that is what sorts ENOSPC and EDQUOT into `NoSpace`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error on backing store: {0}")]
    Io(std::io::Error),
    /// The backing store has no space for the write (ENOSPC, or EDQUOT: the owner's quota is
    /// used up). The medium is fine; a thin LUN's pool is full.
    #[error("backing store is full: {0}")]
    NoSpace(std::io::Error),
    #[error("request at offset {offset} length {len} is outside the store (size {size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("store is read-only")]
    ReadOnly,
    #[error("store is shut down")]
    Closed,
}

impl StoreError {
    /// Classifies an I/O error: ENOSPC and EDQUOT are [`StoreError::NoSpace`], every other
    /// error is [`StoreError::Io`].
    pub fn io(e: std::io::Error) -> Self {
        if is_no_space_errno(e.raw_os_error()) {
            StoreError::NoSpace(e)
        } else {
            StoreError::Io(e)
        }
    }

    /// [`StoreError::io`] of a raw errno.
    pub fn from_errno(errno: i32) -> Self {
        Self::io(std::io::Error::from_raw_os_error(errno))
    }

    /// The errno of an I/O failure (`Io` or `NoSpace`), when the OS gave one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StoreError::Io(e) | StoreError::NoSpace(e) => e.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the store failed for want of space (a full thin pool), not a medium error.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace(_))
    }
}

fn is_no_space_errno(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::ENOSPC | libc::EDQUOT))
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::io(e)
    }
}

pub type StoreResult<T> = Result<T, StoreError>;
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'a>>;

/// Durability of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// May sit in a volatile cache until the next flush (SCSI WCE=1 semantics).
    Cached,
    /// Stable on media when the future resolves (FUA: RWF_DSYNC).
    Durable,
}

pub trait BlockStore: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, bytes::Bytes>;
    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: bytes::Bytes, mode: WriteMode) -> IoFuture<'_, ()>;
    /// Makes every completed write stable (SYNCHRONIZE CACHE).
    fn flush(&self) -> IoFuture<'_, ()>;
    /// Tells the store the range is unused; later reads return zeroes.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// A line for the log: path, direct or buffered, and why.
    fn describe(&self) -> String;
    /// The I/O engine under this store (`io_uring`, `threads`, ...), for `twinsan status`.
    fn engine(&self) -> &'static str;
}

/// Checks that `[offset, offset+len)` lies within a store of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> StoreResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StoreError::OutOfRange { offset, len, size }),
    }
}
