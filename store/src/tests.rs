//! Behaviour tests every file-store engine passes alike: the same functions run against
//! io_uring ([`UringStore`]) and the I/O threads ([`ThreadStore`]).

use super::backing::{self, Backing, OpenHooks};
use super::*;
use bytes::Bytes;
use futures::FutureExt;
use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

/// What the tests need of an engine beyond [`BlockStore`].
trait TestEngine: BlockStore + Sized {
    /// Part of `describe()` for a store opened with queue depth 4.
    const DEPTH_4: &'static str;
    fn open(opts: FileStoreOptions) -> Result<Self, OpenError> {
        Self::open_with(opts, OpenHooks::default())
    }
    fn open_with(opts: FileStoreOptions, hooks: OpenHooks) -> Result<Self, OpenError>;
    fn backing(&self) -> &Backing;
    /// Requests the kernel (or a pool thread) still owns.
    fn in_flight(&self) -> usize;
}

impl TestEngine for UringStore {
    const DEPTH_4: &'static str = "io_uring depth 4";
    fn open_with(opts: FileStoreOptions, hooks: OpenHooks) -> Result<Self, OpenError> {
        UringStore::open_with(opts, hooks)
    }
    fn backing(&self) -> &Backing {
        UringStore::backing(self)
    }
    fn in_flight(&self) -> usize {
        UringStore::in_flight(self)
    }
}

impl TestEngine for ThreadStore {
    const DEPTH_4: &'static str = "I/O threads (up to 4, 4 requests queued at most)";
    fn open_with(opts: FileStoreOptions, hooks: OpenHooks) -> Result<Self, OpenError> {
        ThreadStore::open_with(opts, hooks)
    }
    fn backing(&self) -> &Backing {
        ThreadStore::backing(self)
    }
    fn in_flight(&self) -> usize {
        ThreadStore::in_flight(self)
    }
}

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

fn temp_store<E: TestEngine>(size: u64, direct: bool) -> (TempDir, E) {
    let dir = tempfile::tempdir().unwrap();
    let store = E::open(FileStoreOptions {
        direct,
        ..opts(&dir, size)
    })
    .unwrap();
    (dir, store)
}

async fn wait_idle<E: TestEngine>(store: &E) {
    for _ in 0..2000 {
        if store.in_flight() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("ops still in flight after 10 s");
}

fn is_errno(e: &StoreError, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
}

/// Random sizes and offsets (512-byte granularity), checked against a shadow copy.
async fn random_io_against_shadow<E: TestEngine>(store: &E, ops: usize, seed: u64) {
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

async fn random_io_direct_multi_thread<E: TestEngine>() {
    let (_dir, store) = temp_store::<E>(8 * MIB, true);
    println!("{}", store.describe());
    assert!(store.backing().is_direct(), "{}", store.describe());
    random_io_against_shadow::<E>(&store, 2000, 7).await;
}

async fn random_io_buffered_current_thread<E: TestEngine>() {
    let (_dir, store) = temp_store::<E>(8 * MIB, false);
    assert!(!store.backing().is_direct());
    assert!(store
        .describe()
        .contains("buffered I/O (O_DIRECT not requested)"));
    random_io_against_shadow::<E>(&store, 2000, 11).await;
}

async fn buffered_cache_hits_are_read_without_the_ring<E: TestEngine>() {
    let (_dir, store) = temp_store::<E>(MIB, false);
    let data = pattern(5, 64 * 1024);
    store
        .write(4096, Bytes::from(data.clone()), WriteMode::Cached)
        .await
        .unwrap();
    // Just written, so cached: the fast path reads all of it.
    let mut buf = vec![0u8; data.len()];
    assert_eq!(store.backing().read_cached(4096, &mut buf), data.len());
    assert!(buf == data);
    assert_eq!(&store.read(4096, data.len()).await.unwrap()[..], &data[..]);
    // Direct stores never take it.
    let (_dir2, direct) = temp_store::<E>(MIB, true);
    assert!(direct.backing().is_direct());
    assert_eq!(direct.backing().read_cached(0, &mut buf), 0);
}

/// Calls `f` until it gives `Some`, at most 1000 times 1 ms apart: the inline slots are
/// shared by every test in the process, so one may be taken for a moment.
fn retry_until_some<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    (0..1000).find_map(|_| {
        let r = f();
        if r.is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        r
    })
}

/// Small whole-page buffered writes go straight into the page cache on the calling thread;
/// the others, and every write on a store that just stalled, go through the engine. Data is
/// the same either way.
async fn small_buffered_writes_are_written_inline<E: TestEngine>() {
    let (_dir, store) = temp_store::<E>(MIB, false);
    let b = store.backing();
    let data = pattern(9, 8192);
    // The inline slots are process-wide: another test may hold them for a moment.
    let taken = retry_until_some(|| b.write_cached(4096, &data, WriteMode::Cached));
    taken.expect("never written inline").unwrap();
    assert_eq!(&store.read(4096, data.len()).await.unwrap()[..], &data[..]);
    // Not whole pages, too large or empty: the engine's.
    assert!(b
        .write_cached(512, &data[..4096], WriteMode::Cached)
        .is_none());
    assert!(b.write_cached(0, &data[..512], WriteMode::Cached).is_none());
    assert!(b
        .write_cached(
            0,
            &vec![1u8; backing::INLINE_WRITE_MAX + 4096],
            WriteMode::Cached
        )
        .is_none());
    assert!(b.write_cached(0, &[], WriteMode::Cached).is_none());
    // FUA writes: the engine's.
    assert!(b.write_cached(0, &data, WriteMode::Durable).is_none());
    // A stall sends the store's writes through the engine for a while; they still land.
    assert_eq!(b.inline_backoff(), Duration::ZERO);
    b.inline_io_stalled(backing::INLINE_STALL * 2);
    assert_eq!(b.inline_backoff(), backing::INLINE_BACKOFF);
    assert!(b.write_cached(0, &data, WriteMode::Cached).is_none());
    // Stall after stall: the back-off doubles, up to its bound.
    b.inline_io_stalled(backing::INLINE_STALL * 2);
    assert_eq!(b.inline_backoff(), backing::INLINE_BACKOFF * 2);
    for _ in 0..20 {
        b.inline_io_stalled(backing::INLINE_STALL * 2);
    }
    assert_eq!(b.inline_backoff(), backing::INLINE_BACKOFF_MAX);
    let other = pattern(10, 8192);
    store
        .write(0, Bytes::from(other.clone()), WriteMode::Cached)
        .await
        .unwrap();
    assert_eq!(&store.read(0, other.len()).await.unwrap()[..], &other[..]);
    // Direct stores never take it.
    let (_dir2, direct) = temp_store::<E>(MIB, true);
    assert!(direct
        .backing()
        .write_cached(0, &data, WriteMode::Cached)
        .is_none());
}

/// A runtime with one thread writes inline too (its one writer slot): there the hop to the
/// engine costs more than a rare stall, which the back-off keeps from recurring.
async fn inline_writes_on_a_single_thread_runtime<E: TestEngine>() {
    let (_dir, store) = temp_store::<E>(MIB, false);
    let data = pattern(3, 4096);
    // The slot is process-wide: another test may hold it for a moment.
    let taken = retry_until_some(|| store.backing().write_cached(0, &data, WriteMode::Cached));
    taken.expect("never written inline").unwrap();
    assert_eq!(&store.read(0, data.len()).await.unwrap()[..], &data[..]);
}

/// A file in memory (tmpfs refuses `preadv2(RWF_NOWAIT)`) is read on the calling thread
/// with a plain `pread`; after a stall its reads go through the engine for a while.
#[test]
fn memory_backed_files_are_read_inline() {
    let shm = std::path::Path::new("/dev/shm");
    let Ok(dir) = tempfile::tempdir_in(shm) else {
        eprintln!("no /dev/shm here; skipped");
        return;
    };
    let path = dir.path().join("lun.img");
    let data = pattern(8, 3 * 4096);
    std::fs::write(&path, &data).unwrap();
    let b = Backing::open(
        &FileStoreOptions {
            direct: false,
            ..FileStoreOptions::new(&path)
        },
        OpenHooks::default(),
    )
    .unwrap();
    if !b.is_memory_backed() {
        eprintln!("/dev/shm is not tmpfs here; skipped");
        return;
    }
    // The first call finds RWF_NOWAIT refused (or taken, on a kernel whose tmpfs has it);
    // from then on a read is served without the engine.
    let mut buf = vec![0u8; data.len()];
    let _ = b.read_cached(0, &mut buf);
    let got = retry_until_some(|| Some(b.read_cached(4096, &mut buf[..8192])).filter(|&n| n > 0));
    assert_eq!(got, Some(8192), "never read inline");
    assert!(buf[..8192] == data[4096..]);
    // After a stall: the engine's, until the back-off ends.
    b.inline_io_stalled(backing::INLINE_STALL * 2);
    assert_eq!(b.read_cached(0, &mut buf), 0);
}

/// The stall signal counts the times the thread slept, not the time it was preempted.
#[test]
fn voluntary_switches_count_sleeps() {
    let before = backing::voluntary_switches();
    std::thread::sleep(Duration::from_millis(2));
    assert!(backing::voluntary_switches() > before);
}

async fn random_io_direct_current_thread<E: TestEngine>() {
    let (_dir, store) = temp_store::<E>(8 * MIB, true);
    random_io_against_shadow::<E>(&store, 2000, 13).await;
}

/// 64 tasks, each with its own region, so the expected contents are deterministic while
/// 64 requests are in flight at once.
async fn concurrent_64<E: TestEngine>(store: Arc<E>) {
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
    assert_eq!(store.in_flight(), 0);
}

async fn concurrency_64_in_flight<E: TestEngine>() {
    let (_dir, store) = temp_store::<E>(64 * MIB, true);
    concurrent_64::<E>(Arc::new(store)).await;
}

/// A queue depth far below the concurrency makes requests wait for a slot.
async fn concurrency_above_queue_depth<E: TestEngine>() {
    let dir = tempfile::tempdir().unwrap();
    let store = E::open(FileStoreOptions {
        queue_depth: 4,
        ..opts(&dir, 16 * MIB)
    })
    .unwrap();
    assert!(
        store.describe().contains(E::DEPTH_4),
        "{}",
        store.describe()
    );
    concurrent_64::<E>(Arc::new(store)).await;
}

async fn fua_writes_and_flush_reach_the_file<E: TestEngine>() {
    let (dir, store) = temp_store::<E>(4 * MIB, true);
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

async fn discard_reads_back_zeroes_and_frees_space<E: TestEngine>() {
    let (dir, store) = temp_store::<E>(4 * MIB, true);
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

async fn discard_falls_back_to_writing_zeroes<E: TestEngine>() {
    let (_dir, store) = temp_store::<E>(MIB, true);
    store
        .write(0, Bytes::from(pattern(4, MIB as usize)), WriteMode::Cached)
        .await
        .unwrap();
    store.backing().force_discard_by_writing();
    store.discard(4096, 8192).await.unwrap();
    let got = store.read(4096, 8192).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
}

async fn sparse_create_and_existing_file_kept<E: TestEngine>() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let store = E::open(opts(&dir, 64 * MIB)).unwrap();
    assert_eq!(store.size(), 64 * MIB);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 64 * MIB);
    assert_eq!(meta.blocks(), 0, "not sparse");
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert!(store.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
    drop(store);
    // Existing file: create_size is ignored, size comes from the file.
    let store = E::open(opts(&dir, 128 * MIB)).unwrap();
    assert_eq!(store.size(), 64 * MIB);
    // Invalid create sizes are refused before anything is created.
    let err = E::open(FileStoreOptions {
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

async fn open_errors_name_the_path<E: TestEngine>() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let err = E::open(FileStoreOptions::new(&missing)).err().unwrap();
    assert!(err.to_string().contains("missing.img"), "{err}");
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let err = E::open(FileStoreOptions::new(&odd)).err().unwrap();
    assert!(
        matches!(err, OpenError::BadSize { size: 1000, .. }),
        "{err}"
    );
    let err = E::open(FileStoreOptions::new(dir.path())).err().unwrap();
    assert!(matches!(err, OpenError::NotFileOrDevice { .. }), "{err}");
    let err = StoreError::from(E::open(FileStoreOptions::new(&missing)).err().unwrap());
    assert!(err.to_string().contains("missing.img"), "{err}");
}

async fn read_only_refuses_writes_and_discards<E: TestEngine>() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, pattern(5, MIB as usize)).unwrap();
    let store = E::open(FileStoreOptions {
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

async fn out_of_range_is_an_error<E: TestEngine>() {
    let (_dir, store) = temp_store::<E>(MIB, true);
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
async fn short_read_at_eof_returns_zeroes<E: TestEngine>() {
    for direct in [true, false] {
        let (dir, store) = temp_store::<E>(MIB, direct);
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
async fn io_errors_surface_and_store_keeps_working<E: TestEngine>() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, pattern(7, MIB as usize)).unwrap();
    let hooks = OpenHooks {
        rdonly_main_fd: true,
        ..Default::default()
    };
    let store = E::open_with(FileStoreOptions::new(&path), hooks).unwrap();
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
    assert_eq!(store.in_flight(), 0);
}

/// ENOSPC from the write (a full filesystem: the fd is /dev/full) is `NoSpace`, not a
/// medium error, on every engine; reads keep working.
async fn full_filesystem_is_no_space<E: TestEngine>() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = OpenHooks {
        full_main_fd: true,
        ..Default::default()
    };
    let opts = FileStoreOptions {
        direct: false,
        ..opts(&dir, MIB)
    };
    let store = E::open_with(opts, hooks).unwrap();
    for mode in [WriteMode::Cached, WriteMode::Durable] {
        let err = store
            .write(4096, Bytes::from(pattern(3, 8192)), mode)
            .await
            .unwrap_err();
        assert!(err.is_no_space(), "{mode:?}: {err:?}");
        assert!(matches!(err, StoreError::NoSpace(_)), "{err:?}");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(&store.read(0, 8192).await.unwrap()[..], &[0u8; 8192][..]);
    }
    assert_eq!(store.in_flight(), 0);
}

/// The classification itself: ENOSPC and EDQUOT are `NoSpace`, everything else `Io`.
#[test]
fn enospc_and_edquot_are_no_space() {
    for errno in [libc::ENOSPC, libc::EDQUOT] {
        assert!(StoreError::from_errno(errno).is_no_space());
        let e: StoreError = std::io::Error::from_raw_os_error(errno).into();
        assert!(matches!(e, StoreError::NoSpace(_)));
    }
    for errno in [libc::EIO, libc::EBADF, libc::EFBIG, libc::EROFS] {
        let e = StoreError::from_errno(errno);
        assert!(matches!(e, StoreError::Io(_)), "{errno}: {e:?}");
        assert_eq!(e.raw_os_error(), Some(errno));
    }
    let other = StoreError::io(std::io::Error::other("no errno"));
    assert!(!other.is_no_space());
    assert!(!StoreError::ReadOnly.is_no_space());
}

async fn direct_refused_falls_back_to_buffered<E: TestEngine>() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = OpenHooks {
        refuse_direct: true,
        ..Default::default()
    };
    let store = E::open_with(opts(&dir, 8 * MIB), hooks).unwrap();
    assert!(!store.backing().is_direct());
    let d = store.describe();
    assert!(
        d.contains("buffered I/O (O_DIRECT refused by filesystem: EINVAL)"),
        "{d}"
    );
    random_io_against_shadow::<E>(&store, 500, 17).await;
}

/// A device whose direct-I/O block is larger than the request alignment: 512-byte
/// requests go through the buffered fd and stay coherent with direct ones.
async fn unaligned_requests_use_buffered_fd<E: TestEngine>() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = OpenHooks {
        offset_align: Some(4096),
        ..Default::default()
    };
    let store = E::open_with(opts(&dir, 8 * MIB), hooks).unwrap();
    assert_eq!(store.backing().logical_block_size, 4096);
    assert!(store.describe().contains("not aligned to 4096 bytes"));
    random_io_against_shadow::<E>(&store, 2000, 19).await;
}

/// Futures dropped while the kernel owns their buffers: nothing crashes, every write
/// lands either entirely or not at all (per sector), and the slots drain.
async fn cancelled_ops_do_not_corrupt<E: TestEngine>() {
    const BLOCK: usize = 256 * 1024;
    const BLOCKS: u64 = 64;
    let (dir, store) = temp_store::<E>(2 * BLOCKS * BLOCK as u64, true);
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
            wait_idle::<E>(&store).await;
        }
    }
    println!("{dropped} futures dropped mid-flight");
    assert!(dropped > 0, "no future was dropped mid-flight");
    bg.await.unwrap();
    wait_idle::<E>(&store).await;
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
fn survives_runtime_shutdown_with_ops_in_flight<E: TestEngine>() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let store = E::open(opts(&dir, 32 * MIB)).unwrap();
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
async fn block_device_loop<E: TestEngine>() {
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
    let store = E::open(FileStoreOptions::new(&dev)).unwrap();
    println!("{}", store.describe());
    assert_eq!(store.size(), 64 * MIB);
    assert_eq!(store.backing().logical_block_size, 4096);
    assert!(store.backing().is_direct());
    random_io_against_shadow::<E>(&store, 1000, 23).await;
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
fn bench_4k_random_qd32<E: TestEngine>() {
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
            let store = Arc::new(E::open(FileStoreOptions { direct, ..o }).unwrap());
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
                    sum += store.in_flight() as u64;
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

/// Test functions calling the generic function of the same name with engine `$E`.
macro_rules! engine_test_fns {
    ($E:ty; multi_thread: [$($m:ident),*]; current_thread: [$($c:ident),*]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $m() {
                super::$m::<$E>().await
            }
        )*
        $(
            #[tokio::test(flavor = "current_thread")]
            async fn $c() {
                super::$c::<$E>().await
            }
        )*
    };
}

/// One module of tests per engine.
macro_rules! engine_tests {
    ($module:ident, $E:ty) => {
        mod $module {
            use super::*;

            engine_test_fns!($E;
                multi_thread: [random_io_direct_multi_thread, concurrency_64_in_flight, concurrency_above_queue_depth, fua_writes_and_flush_reach_the_file, small_buffered_writes_are_written_inline, discard_reads_back_zeroes_and_frees_space, short_read_at_eof_returns_zeroes, io_errors_surface_and_store_keeps_working, full_filesystem_is_no_space, direct_refused_falls_back_to_buffered, unaligned_requests_use_buffered_fd, cancelled_ops_do_not_corrupt];
                current_thread: [random_io_buffered_current_thread, buffered_cache_hits_are_read_without_the_ring, inline_writes_on_a_single_thread_runtime, random_io_direct_current_thread, discard_falls_back_to_writing_zeroes, sparse_create_and_existing_file_kept, open_errors_name_the_path, read_only_refuses_writes_and_discards, out_of_range_is_an_error]);

            #[test]
            fn survives_runtime_shutdown_with_ops_in_flight() {
                super::survives_runtime_shutdown_with_ops_in_flight::<$E>()
            }

            /// Needs root and losetup: `cargo test -- --ignored block_device`.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore]
            async fn block_device_loop() {
                super::block_device_loop::<$E>().await
            }

            /// `cargo test --release -- --ignored --nocapture bench_4k_random_qd32`
            #[test]
            #[ignore]
            fn bench_4k_random_qd32() {
                super::bench_4k_random_qd32::<$E>()
            }
        }
    };
}

engine_tests!(on_io_uring, UringStore);
engine_tests!(on_threads, ThreadStore);
