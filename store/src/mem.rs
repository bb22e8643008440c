//! An in-memory store for tests, with fault injection so tests can prove that an I/O error
//! becomes MEDIUM ERROR sense and never a crash, and that a full pool (ENOSPC) becomes
//! DATA PROTECT sense.

use super::{check_range, BlockStore, IoFuture, StoreError, WriteMode};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

pub struct MemStore {
    data: Mutex<Vec<u8>>,
    /// Requests touching `[fail_from, fail_to)` fail with EIO; empty range = no faults.
    fail_from: AtomicU64,
    fail_to: AtomicU64,
    flushes: AtomicU64,
    /// Writes fail with ENOSPC (a full thin pool); reads still work.
    full: AtomicBool,
}

impl MemStore {
    pub fn new(size: usize) -> Self {
        MemStore {
            data: Mutex::new(vec![0; size]),
            fail_from: AtomicU64::new(0),
            fail_to: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            full: AtomicBool::new(false),
        }
    }

    /// Makes every request overlapping `[from, to)` fail with an I/O error.
    pub fn inject_fault(&self, from: u64, to: u64) {
        self.fail_from.store(from, Ordering::SeqCst);
        self.fail_to.store(to, Ordering::SeqCst);
    }

    /// Makes every write fail with ENOSPC (`true`) as a full thin pool does, or lets writes
    /// through again (`false`).
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }

    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        check_range(offset, len, self.size())?;
        let (from, to) = (
            self.fail_from.load(Ordering::SeqCst),
            self.fail_to.load(Ordering::SeqCst),
        );
        if from < to && offset < to && offset + len > from {
            return Err(StoreError::from_errno(libc::EIO));
        }
        Ok(())
    }
}

impl BlockStore for MemStore {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            self.check(offset, len as u64)?;
            let d = self.data.lock().unwrap();
            Ok(Bytes::copy_from_slice(
                &d[offset as usize..offset as usize + len],
            ))
        })
    }

    fn write(&self, offset: u64, data: Bytes, _mode: WriteMode) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, data.len() as u64)?;
            if self.full.load(Ordering::SeqCst) {
                return Err(StoreError::from_errno(libc::ENOSPC));
            }
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, len)?;
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        })
    }

    fn describe(&self) -> String {
        format!("memory store, {} bytes", self.size())
    }

    fn engine(&self) -> &'static str {
        "memory"
    }
}
