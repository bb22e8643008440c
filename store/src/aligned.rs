//! Page-aligned heap buffers, needed for O_DIRECT I/O, recycled through a bounded pool.
//!
//! Every READ allocates its Data-In buffer and every gathered WRITE its Data-Out buffer; for
//! 1 MiB requests, fresh allocations cost more than the copy itself (mmap, page faults,
//! zeroing, munmap). Dropped buffers therefore go back to a process-wide pool, by
//! power-of-two size class, up to [`POOL_BUDGET_BYTES`] in total; beyond that they are freed.
//!
//! Memory handed out is always initialised (zeroed when first allocated), so safe code can
//! never see uninitialised bytes. A recycled buffer does hold an earlier request's bytes:
//! [`AlignedBuf::recycled`] is only for callers that overwrite all of it before exposing it.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Alignment that satisfies O_DIRECT on every device with logical blocks up to 4 KiB.
pub const IO_ALIGN: usize = 4096;

/// Smallest pooled size class (one page); smaller requests use this class too.
const MIN_CLASS_SHIFT: u32 = 12;
/// Largest pooled size class (32 MiB, the largest transfer a command may move); bigger
/// buffers are allocated and freed each time.
const MAX_CLASS_SHIFT: u32 = 25;
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
/// Bytes the pool may keep idle across all classes.
pub const POOL_BUDGET_BYTES: usize = 64 << 20;
/// Idle buffers kept per class at most, so small classes do not hoard the budget.
const MAX_IDLE_PER_CLASS: usize = 256;

/// Idle buffers by size class (capacity `1 << (MIN_CLASS_SHIFT + i)`).
struct Pool {
    classes: [Mutex<Vec<FreeBuf>>; CLASSES],
    idle_bytes: AtomicUsize,
}

/// An idle allocation of exactly its class's capacity.
struct FreeBuf(NonNull<u8>);

// SAFETY: an idle buffer is owned by the pool alone; it is plain memory.
unsafe impl Send for FreeBuf {}

static POOL: Pool = Pool::new();

/// Size class index and capacity for a request of `len` bytes, None when not pooled.
fn class_of(len: usize) -> Option<(usize, usize)> {
    let cap = len.max(1).checked_next_power_of_two()?;
    let shift = cap.trailing_zeros().max(MIN_CLASS_SHIFT);
    (shift <= MAX_CLASS_SHIFT).then(|| ((shift - MIN_CLASS_SHIFT) as usize, 1usize << shift))
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            classes: [const { Mutex::new(Vec::new()) }; CLASSES],
            idle_bytes: AtomicUsize::new(0),
        }
    }

    fn take(&self, class: usize, cap: usize) -> Option<NonNull<u8>> {
        let buf = self.classes[class]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()?;
        self.idle_bytes.fetch_sub(cap, Ordering::Relaxed);
        Some(buf.0)
    }

    /// Keeps `ptr` for reuse if the budget allows; gives it back to the caller otherwise.
    fn put(&self, class: usize, cap: usize, ptr: NonNull<u8>) -> Result<(), NonNull<u8>> {
        if self.idle_bytes.fetch_add(cap, Ordering::Relaxed) + cap > POOL_BUDGET_BYTES {
            self.idle_bytes.fetch_sub(cap, Ordering::Relaxed);
            return Err(ptr);
        }
        let mut idle = self.classes[class]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_IDLE_PER_CLASS {
            drop(idle);
            self.idle_bytes.fetch_sub(cap, Ordering::Relaxed);
            return Err(ptr);
        }
        idle.push(FreeBuf(ptr));
        Ok(())
    }
}

/// An `IO_ALIGN`-aligned byte buffer that owns its memory.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    /// Size class the allocation belongs to, so `Drop` can recycle it.
    class: Option<usize>,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes whose contents are whatever its previous user left (zeroes
    /// when freshly allocated). The caller must overwrite every byte it exposes.
    pub fn recycled(len: usize) -> Self {
        match class_of(len) {
            Some((class, cap)) => {
                let layout = Layout::from_size_align(cap, IO_ALIGN).expect("valid layout");
                let ptr = POOL
                    .take(class, cap)
                    .unwrap_or_else(|| Self::allocate(layout));
                AlignedBuf {
                    ptr,
                    len,
                    layout,
                    class: Some(class),
                }
            }
            None => {
                let cap = len.next_multiple_of(IO_ALIGN);
                let layout = Layout::from_size_align(cap, IO_ALIGN).expect("valid layout");
                AlignedBuf {
                    ptr: Self::allocate(layout),
                    len,
                    layout,
                    class: None,
                }
            }
        }
    }

    fn allocate(layout: Layout) -> NonNull<u8> {
        // SAFETY: layout has non-zero size. Zeroed so that no byte is ever uninitialised.
        let raw = unsafe { alloc_zeroed(layout) };
        NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
    }

    pub fn zeroed(len: usize) -> Self {
        let mut buf = Self::recycled(len);
        buf.as_mut_slice().fill(0);
        buf
    }

    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::recycled(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid (and initialised) for len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid (and initialised) for len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Shortens the visible length (used when a read returns fewer bytes).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Converts into `Bytes` without copying; the buffer returns to the pool when the last
    /// `Bytes` referring to it is dropped.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.layout.size())
            .finish()
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is valid (and initialised) for len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(class) = self.class {
            if POOL.put(class, self.layout.size(), self.ptr).is_ok() {
                return;
            }
        }
        // SAFETY: allocated with this layout in `allocate`.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let b = AlignedBuf::zeroed(5000);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(b.len(), 5000);
        assert!(b.as_ref().iter().all(|&x| x == 0));
        let bytes = AlignedBuf::from_slice(b"abc").into_bytes();
        assert_eq!(&bytes[..], b"abc");
    }

    #[test]
    fn size_classes() {
        assert_eq!(class_of(0), Some((0, 4096)));
        assert_eq!(class_of(4096), Some((0, 4096)));
        assert_eq!(class_of(4097), Some((1, 8192)));
        assert_eq!(class_of(1 << 20), Some((8, 1 << 20)));
        assert_eq!(class_of(32 << 20), Some((CLASSES - 1, 32 << 20)));
        assert_eq!(class_of((32 << 20) + 1), None);
    }

    #[test]
    fn pool_reuses_within_budget() {
        let pool = Pool::new();
        let (class, cap) = class_of(1 << 20).unwrap();
        let layout = Layout::from_size_align(cap, IO_ALIGN).unwrap();
        assert!(pool.take(class, cap).is_none());
        let a = AlignedBuf::allocate(layout);
        assert!(pool.put(class, cap, a).is_ok());
        assert_eq!(pool.take(class, cap), Some(a), "same allocation reused");
        assert_eq!(pool.idle_bytes.load(Ordering::Relaxed), 0);
        // The budget bounds what is kept idle.
        let mut kept = Vec::new();
        let mut refused = None;
        for _ in 0..=POOL_BUDGET_BYTES / cap {
            let p = AlignedBuf::allocate(layout);
            match pool.put(class, cap, p) {
                Ok(()) => kept.push(p),
                Err(p) => refused = Some(p),
            }
        }
        assert_eq!(kept.len(), POOL_BUDGET_BYTES / cap);
        assert!(refused.is_some());
        for p in kept.into_iter().chain(refused) {
            // SAFETY: allocated above with `layout`; the local pool is dropped without
            // freeing, so each pointer is freed exactly once here.
            unsafe { dealloc(p.as_ptr(), layout) };
        }
    }

    #[test]
    fn recycled_then_zeroed() {
        let len = (2 << 20) + 123;
        let mut a = AlignedBuf::recycled(len);
        a.as_mut_slice().fill(0xa5);
        drop(a.into_bytes());
        let z = AlignedBuf::zeroed(len - 1000);
        assert_eq!(z.len(), len - 1000);
        assert!(z.as_ref().iter().all(|&x| x == 0));
    }

    #[test]
    fn unpooled_sizes_still_work() {
        let b = AlignedBuf::zeroed((32 << 20) + 1);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(b.len(), (32 << 20) + 1);
    }
}
