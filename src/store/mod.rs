//! Block stores: where a LUN's bytes live.
//!
//! The trait and the in-memory test store live in the replication crate (which wraps stores
//! and so sits below this crate); this module adds the io_uring store for files and block
//! devices and re-exports the shared pieces.

mod aligned;
mod uring;

pub use aligned::AlignedBuf;
pub use twinsan_replication::store::{
    check_range, BlockStore, IoFuture, MemStore, StoreError, StoreResult, WriteMode,
};
pub use uring::{FileStore, FileStoreOptions};
