//! A simple file-backed store (`pread`/`pwrite` on a blocking thread), for tests and tools
//! that need data on a real file (e.g. internal DRBD metadata at the end of the same file).

use super::{check_range, BlockStore, IoFuture, StoreError, WriteMode};
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A store over a regular file or block device via `std::fs`.
pub struct StdFileStore {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
}

impl StdFileStore {
    /// Opens `path` read-write; the store covers the whole file as it is now.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_owned();
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(StdFileStore {
            file: Arc::new(file),
            path,
            size,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
            .map_err(StoreError::io)
    }
}

impl BlockStore for StdFileStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            check_range(offset, len as u64, self.size)?;
            self.blocking(move |f| {
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, offset)?;
                Ok(Bytes::from(buf))
            })
            .await
        })
    }

    fn write(&self, offset: u64, data: Bytes, mode: WriteMode) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(offset, data.len() as u64, self.size)?;
            self.blocking(move |f| {
                f.write_all_at(&data, offset)?;
                if mode == WriteMode::Durable {
                    f.sync_data()?;
                }
                Ok(())
            })
            .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.blocking(|f| f.sync_data()).await })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(offset, len, self.size)?;
            self.blocking(move |f| {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut pos = 0;
                while pos < len {
                    let n = (len - pos).min(zeros.len() as u64) as usize;
                    f.write_all_at(&zeros[..n], offset + pos)?;
                    pos += n as u64;
                }
                Ok(())
            })
            .await
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} (std::fs, buffered, {} bytes)",
            self.path.display(),
            self.size
        )
    }

    fn engine(&self) -> &'static str {
        "std::fs"
    }
}
