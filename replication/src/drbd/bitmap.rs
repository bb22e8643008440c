//! The out-of-sync bitmap: one bit per 4 KiB block of the data device, set
//! when the block may differ from the peer.
//!
//! On disk the bitmap is an array of little-endian 64-bit words (kernel
//! `drbd_bitmap.c`, drbdmeta.c `fprintf_bm`): bit `n` lives in byte `n / 8`
//! under mask `1 << (n % 8)`. v09 metadata with more than one bitmap slot
//! interleaves the slots word by word; with one slot it is byte-identical to
//! v08. Only single-slot bitmaps are supported for now.

use thiserror::Error;

use super::MD_BLOCK_SIZE;

/// Bytes of data per bit (`BM_BLOCK_SIZE`).
pub const BM_BLOCK_SIZE: u64 = 4096;
/// log2 of [`BM_BLOCK_SIZE`].
pub const BM_BLOCK_SHIFT: u32 = 12;
/// log2 of the activity log extent size, 4 MiB (`AL_EXTENT_SHIFT`).
pub const AL_EXTENT_SHIFT: u32 = 22;
/// Bits per activity log extent: 4 MiB / 4 KiB = 1024.
pub const BITS_PER_AL_EXTENT: u64 = 1 << (AL_EXTENT_SHIFT - BM_BLOCK_SHIFT);
/// Most bits a bitmap may have: 1 PiB of data, DRBD's limit.
pub const MAX_BITS: u64 = 1 << (50 - BM_BLOCK_SHIFT);
/// Bitmap bytes per 4 KiB page, used for dirty tracking.
const PAGE_BYTES: u64 = MD_BLOCK_SIZE;
const WORDS_PER_PAGE: usize = (PAGE_BYTES / 8) as usize;

/// Bitmap errors.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BitmapError {
    /// A byte range reaches past the end of the data device.
    #[error("range {offset}+{len} is beyond the {size}-byte data area covered by the bitmap")]
    OutOfRange {
        /// Byte offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Bytes the bitmap covers.
        size: u64,
    },
    /// A bit number is past the end of the bitmap.
    #[error("bit {bit} is beyond the bitmap's {bits} bits")]
    BitOutOfRange {
        /// Bit asked for.
        bit: u64,
        /// Bits in the bitmap.
        bits: u64,
    },
    /// Too few bytes to load the bitmap from.
    #[error("bitmap needs {need} bytes on disk, got {have}")]
    ShortBuffer {
        /// Bytes needed.
        need: u64,
        /// Bytes given.
        have: u64,
    },
    /// v09 metadata with several interleaved bitmap slots.
    #[error("bitmap has {max_peers} interleaved peer slots; only single-slot bitmaps (max-peers 1) are supported")]
    MultiplePeerSlots {
        /// `bm_max_peers` of the metadata.
        max_peers: u32,
    },
    /// The bitmap would cover more than DRBD's 1 PiB limit, or not fit in memory.
    #[error("a bitmap of {0} bits is too large (more than 1 PiB of data)")]
    TooLarge(u64),
}

/// A run of consecutive set bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitRun {
    /// First set bit.
    pub first_bit: u64,
    /// Number of set bits.
    pub len: u64,
}

impl BitRun {
    /// Byte offset of the run on the data device.
    pub fn byte_offset(&self) -> u64 {
        self.first_bit * BM_BLOCK_SIZE
    }

    /// Length of the run in bytes (the last block may extend past the end of
    /// the data device when its size is not a multiple of 4 KiB).
    pub fn byte_len(&self) -> u64 {
        self.len * BM_BLOCK_SIZE
    }
}

/// The out-of-sync bitmap of one peer.
#[derive(Clone, PartialEq, Eq)]
pub struct OutOfSyncBitmap {
    words: Vec<u64>,
    bits: u64,
    data_bytes: u64,
    set: u64,
    dirty: Vec<u64>,
}

impl std::fmt::Debug for OutOfSyncBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutOfSyncBitmap")
            .field("bits", &self.bits)
            .field("data_bytes", &self.data_bytes)
            .field("set", &self.set)
            .finish_non_exhaustive()
    }
}

impl OutOfSyncBitmap {
    /// An all-clear bitmap for a data area of `data_bytes` (one bit per
    /// started 4 KiB block).
    pub fn new(data_bytes: u64) -> Result<Self, BitmapError> {
        let bits = data_bytes.div_ceil(BM_BLOCK_SIZE);
        if bits > MAX_BITS {
            return Err(BitmapError::TooLarge(bits));
        }
        let n_words =
            usize::try_from(bits.div_ceil(64)).map_err(|_| BitmapError::TooLarge(bits))?;
        let pages = n_words.div_ceil(WORDS_PER_PAGE);
        Ok(OutOfSyncBitmap {
            words: vec![0; n_words],
            bits,
            data_bytes,
            set: 0,
            dirty: vec![0; pages.div_ceil(64)],
        })
    }

    /// An all-clear bitmap for `sectors` of 512 bytes (DRBD sizes are in sectors).
    pub fn for_sectors(sectors: u64) -> Result<Self, BitmapError> {
        Self::new(sectors.saturating_mul(512))
    }

    /// Number of bits (4 KiB blocks).
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// Size of the data area this bitmap covers, in bytes.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Number of set (out-of-sync) bits.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// Out-of-sync bytes (set bits times 4 KiB).
    pub fn out_of_sync_bytes(&self) -> u64 {
        self.set * BM_BLOCK_SIZE
    }

    /// Bytes of the on-disk image of one slot: whole 64-bit words.
    pub fn word_bytes(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// Bytes occupied on disk by a single-slot bitmap, rounded up to 4 KiB
    /// (drbdmeta.c `bm_bytes`).
    pub fn on_disk_bytes(&self) -> u64 {
        self.word_bytes().div_ceil(MD_BLOCK_SIZE) * MD_BLOCK_SIZE
    }

    fn mark_dirty_word(&mut self, w: usize) {
        let page = w / WORDS_PER_PAGE;
        if let Some(d) = self.dirty.get_mut(page / 64) {
            *d |= 1 << (page % 64);
        }
    }

    /// Tests one bit.
    pub fn test_bit(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Sets one bit; returns whether it was clear before.
    pub fn set_bit(&mut self, bit: u64) -> Result<bool, BitmapError> {
        Ok(self.set_bits(bit, bit.saturating_add(1))? == 1)
    }

    /// Clears one bit; returns whether it was set before.
    pub fn clear_bit(&mut self, bit: u64) -> Result<bool, BitmapError> {
        Ok(self.clear_bits(bit, bit.saturating_add(1))? == 1)
    }

    fn check_bits(&self, first: u64, end: u64) -> Result<(), BitmapError> {
        if end > self.bits || first > end {
            return Err(BitmapError::BitOutOfRange {
                bit: end.max(first).saturating_sub(1),
                bits: self.bits,
            });
        }
        Ok(())
    }

    /// Applies `op` to the masked words covering bits `[first, end)`;
    /// `op(word, mask) -> (new_word)`. Returns the change in set bits.
    fn apply(&mut self, first: u64, end: u64, set: bool) -> u64 {
        let mut changed = 0u64;
        let mut bit = first;
        while bit < end {
            let w = (bit / 64) as usize;
            let lo = bit % 64;
            let hi = (end - (bit - lo)).min(64);
            let mask = if hi - lo == 64 {
                !0u64
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.words[w];
            let new = if set { old | mask } else { old & !mask };
            if new != old {
                changed += u64::from((old ^ new).count_ones());
                self.words[w] = new;
                self.mark_dirty_word(w);
            }
            bit = bit - lo + hi;
        }
        changed
    }

    /// Sets bits `[first, end)`; returns how many were newly set.
    pub fn set_bits(&mut self, first: u64, end: u64) -> Result<u64, BitmapError> {
        self.check_bits(first, end)?;
        let n = self.apply(first, end, true);
        self.set += n;
        Ok(n)
    }

    /// Clears bits `[first, end)`; returns how many were set before.
    pub fn clear_bits(&mut self, first: u64, end: u64) -> Result<u64, BitmapError> {
        self.check_bits(first, end)?;
        let n = self.apply(first, end, false);
        self.set -= n;
        Ok(n)
    }

    /// Number of set bits in `[first, end)`.
    pub fn count_bits(&self, first: u64, end: u64) -> Result<u64, BitmapError> {
        self.check_bits(first, end)?;
        let mut n = 0;
        let mut bit = first;
        while bit < end {
            let w = (bit / 64) as usize;
            let lo = bit % 64;
            let hi = (end - (bit - lo)).min(64);
            let mask = if hi - lo == 64 {
                !0u64
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            n += u64::from((self.words[w] & mask).count_ones());
            bit = bit - lo + hi;
        }
        Ok(n)
    }

    fn byte_range_check(&self, offset: u64, len: u64) -> Result<u64, BitmapError> {
        let end = offset.checked_add(len).filter(|&e| e <= self.data_bytes);
        end.ok_or(BitmapError::OutOfRange {
            offset,
            len,
            size: self.data_bytes,
        })
    }

    /// Marks the data range `[offset, offset + len)` out of sync: every 4 KiB
    /// block it touches is set (rounds outward, like the kernel's
    /// `drbd_set_out_of_sync`). Returns how many bits were newly set.
    pub fn set_range(&mut self, offset: u64, len: u64) -> Result<u64, BitmapError> {
        let end = self.byte_range_check(offset, len)?;
        if len == 0 {
            return Ok(0);
        }
        self.set_bits(offset / BM_BLOCK_SIZE, end.div_ceil(BM_BLOCK_SIZE))
    }

    /// Marks the data range in sync: only blocks it covers completely are
    /// cleared (rounds inward, like the kernel's `drbd_set_in_sync` in
    /// `drbd_actlog.c`), except that the device's last, partial block counts
    /// as covered when the range reaches the end of the device. Returns how
    /// many bits were cleared.
    pub fn clear_range(&mut self, offset: u64, len: u64) -> Result<u64, BitmapError> {
        let end = self.byte_range_check(offset, len)?;
        let first = offset.div_ceil(BM_BLOCK_SIZE);
        let last = if end == self.data_bytes {
            self.bits
        } else {
            end / BM_BLOCK_SIZE
        };
        if last <= first {
            return Ok(0);
        }
        self.clear_bits(first, last)
    }

    /// True if any block touched by `[offset, offset + len)` is out of sync.
    pub fn test_range(&self, offset: u64, len: u64) -> Result<bool, BitmapError> {
        let end = self.byte_range_check(offset, len)?;
        if len == 0 {
            return Ok(false);
        }
        Ok(self.count_bits(offset / BM_BLOCK_SIZE, end.div_ceil(BM_BLOCK_SIZE))? > 0)
    }

    /// Sets every bit of activity log extent `extent` (4 MiB, 1024 bits) that
    /// lies inside the bitmap; returns how many were newly set. Extents
    /// beyond the end are ignored (drbdmeta.c `apply_al` skips them too).
    pub fn set_al_extent(&mut self, extent: u32) -> u64 {
        let first = u64::from(extent) * BITS_PER_AL_EXTENT;
        if first >= self.bits {
            return 0;
        }
        let end = (first + BITS_PER_AL_EXTENT).min(self.bits);
        let n = self.apply(first, end, true);
        self.set += n;
        n
    }

    /// Sets every bit (full sync).
    pub fn set_all(&mut self) {
        let bits = self.bits;
        let n = self.apply(0, bits, true);
        self.set += n;
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        let bits = self.bits;
        let n = self.apply(0, bits, false);
        self.set -= n;
    }

    /// Runs of set bits in ascending order, each run maximal; for resync
    /// request coalescing.
    pub fn runs(&self) -> Runs<'_> {
        Runs { bm: self, next: 0 }
    }

    /// First set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        self.next_with(from, false)
    }

    /// First clear bit at or after `from` (or `bits()` if none).
    fn next_clear(&self, from: u64) -> u64 {
        self.next_with(from, true).unwrap_or(self.bits)
    }

    fn next_with(&self, from: u64, clear: bool) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = if clear { !self.words[w] } else { self.words[w] };
        word &= !0u64 << (from % 64);
        loop {
            if word != 0 {
                let bit = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (bit < self.bits).then_some(bit);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = if clear { !self.words[w] } else { self.words[w] };
        }
    }

    /// The single-slot on-disk image: `word_bytes()` bytes of little-endian
    /// words, surplus bits past `bits()` zero.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Copies bytes `[start, start + buf.len())` of the on-disk image into
    /// `buf` (zero past the end).
    pub fn read_image(&self, start: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let pos = start + i as u64;
            let w = (pos / 8) as usize;
            *b = self
                .words
                .get(w)
                .map_or(0, |word| word.to_le_bytes()[(pos % 8) as usize]);
        }
    }

    /// Loads a single-slot bitmap for `data_bytes` of data from its on-disk
    /// bytes. Bits past the end of the data (the padding of the last word) are
    /// ignored, like the kernel's `bm_clear_surplus`.
    pub fn from_le_bytes(data_bytes: u64, bytes: &[u8]) -> Result<Self, BitmapError> {
        let mut bm = Self::new(data_bytes)?;
        let need = bm.word_bytes();
        if (bytes.len() as u64) < need {
            return Err(BitmapError::ShortBuffer {
                need,
                have: bytes.len() as u64,
            });
        }
        for (w, chunk) in bm.words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(chunk);
            *w = u64::from_le_bytes(a);
        }
        let surplus = bm.bits % 64;
        if surplus != 0 {
            if let Some(last) = bm.words.last_mut() {
                *last &= (1u64 << surplus) - 1;
            }
        }
        bm.set = bm.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(bm)
    }

    /// Loads bitmap slot `slot` of an on-disk bitmap with `max_peers` slots.
    /// Several slots interleave their words; that is refused for now.
    pub fn from_slot(
        data_bytes: u64,
        bytes: &[u8],
        max_peers: u32,
        slot: u32,
    ) -> Result<Self, BitmapError> {
        if max_peers != 1 || slot != 0 {
            return Err(BitmapError::MultiplePeerSlots { max_peers });
        }
        Self::from_le_bytes(data_bytes, bytes)
    }

    /// Indexes of the 4 KiB pages of the on-disk image changed since the last
    /// [`OutOfSyncBitmap::take_dirty_pages`] (or since creation/load).
    pub fn dirty_pages(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for (i, &d) in self.dirty.iter().enumerate() {
            let mut d = d;
            while d != 0 {
                let b = d.trailing_zeros();
                v.push(i as u64 * 64 + u64::from(b));
                d &= d - 1;
            }
        }
        v
    }

    /// Returns the dirty pages and forgets them.
    pub fn take_dirty_pages(&mut self) -> Vec<u64> {
        let v = self.dirty_pages();
        self.dirty.iter_mut().for_each(|d| *d = 0);
        v
    }

    /// Marks every page dirty (forces a full write on the next flush).
    pub fn mark_all_dirty(&mut self) {
        for w in (0..self.words.len()).step_by(WORDS_PER_PAGE) {
            self.mark_dirty_word(w);
        }
    }
}

/// Iterator over runs of set bits; see [`OutOfSyncBitmap::runs`].
pub struct Runs<'a> {
    bm: &'a OutOfSyncBitmap,
    next: u64,
}

impl Iterator for Runs<'_> {
    type Item = BitRun;

    fn next(&mut self) -> Option<BitRun> {
        let first = self.bm.next_set(self.next)?;
        let end = self.bm.next_clear(first);
        self.next = end;
        Some(BitRun {
            first_bit: first,
            len: end - first,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn layout_is_little_endian_bytes() {
        let mut bm = OutOfSyncBitmap::new(1 << 20).unwrap(); // 256 bits
        bm.set_bit(0).unwrap();
        bm.set_bit(9).unwrap();
        bm.set_bit(63).unwrap();
        bm.set_bit(64).unwrap();
        let img = bm.to_le_bytes();
        assert_eq!(img.len(), 32);
        assert_eq!(img[0], 0x01);
        assert_eq!(img[1], 0x02);
        assert_eq!(img[7], 0x80);
        assert_eq!(img[8], 0x01);
        let back = OutOfSyncBitmap::from_le_bytes(1 << 20, &img).unwrap();
        assert_eq!(back.count(), 4);
        assert!(back.test_bit(9) && !back.test_bit(10));
        let mut part = [0u8; 3];
        bm.read_image(7, &mut part);
        assert_eq!(part, [0x80, 0x01, 0]);
    }

    #[test]
    fn ranges_round_outward_on_set_inward_on_clear() {
        let mut bm = OutOfSyncBitmap::new(64 * 4096).unwrap();
        assert_eq!(bm.set_range(4095, 2).unwrap(), 2); // touches blocks 0 and 1
        assert!(bm.test_range(0, 1).unwrap());
        assert!(bm.test_range(4096, 4096).unwrap());
        assert!(!bm.test_range(8192, 4096).unwrap());
        assert_eq!(bm.clear_range(100, 8000).unwrap(), 0); // covers no block completely
        assert_eq!(bm.clear_range(0, 8192).unwrap(), 2);
        assert_eq!(bm.count(), 0);
        assert!(bm.set_range(64 * 4096 - 1, 2).is_err());
        assert!(bm.set_range(u64::MAX, 2).is_err());
        assert_eq!(bm.set_range(5, 0).unwrap(), 0);
    }

    #[test]
    fn partial_last_block() {
        // 10 sectors: two blocks, the second one partial.
        let mut bm = OutOfSyncBitmap::for_sectors(10).unwrap();
        assert_eq!(bm.bits(), 2);
        bm.set_range(0, 5120).unwrap();
        assert_eq!(bm.count(), 2);
        assert_eq!(bm.clear_range(4096, 1024).unwrap(), 1);
        // surplus bits in the on-disk image are ignored when loading
        let img = [0xffu8; 8];
        let b = OutOfSyncBitmap::from_le_bytes(5120, &img).unwrap();
        assert_eq!(b.count(), 2);
    }

    #[test]
    fn runs_and_counts_match_naive() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let bits = 5000u64;
        let mut bm = OutOfSyncBitmap::new(bits * 4096).unwrap();
        let mut naive = vec![false; bits as usize];
        for _ in 0..300 {
            let a = rng.gen_range(0..bits);
            let b = rng.gen_range(a..=bits.min(a + 200));
            if rng.gen_bool(0.6) {
                bm.set_bits(a, b).unwrap();
                naive[a as usize..b as usize]
                    .iter_mut()
                    .for_each(|x| *x = true);
            } else {
                bm.clear_bits(a, b).unwrap();
                naive[a as usize..b as usize]
                    .iter_mut()
                    .for_each(|x| *x = false);
            }
            assert_eq!(bm.count(), naive.iter().filter(|&&x| x).count() as u64);
        }
        let mut expect = Vec::new();
        let mut i = 0;
        while i < naive.len() {
            if naive[i] {
                let s = i;
                while i < naive.len() && naive[i] {
                    i += 1;
                }
                expect.push(BitRun {
                    first_bit: s as u64,
                    len: (i - s) as u64,
                });
            } else {
                i += 1;
            }
        }
        assert_eq!(bm.runs().collect::<Vec<_>>(), expect);
        let a = rng.gen_range(0..bits);
        let b = rng.gen_range(a..bits);
        assert_eq!(
            bm.count_bits(a, b).unwrap(),
            naive[a as usize..b as usize].iter().filter(|&&x| x).count() as u64
        );
        let back = OutOfSyncBitmap::from_le_bytes(bits * 4096, &bm.to_le_bytes()).unwrap();
        assert_eq!(back.runs().collect::<Vec<_>>(), expect);
    }

    #[test]
    fn al_extents_and_dirty_pages() {
        let mut bm = OutOfSyncBitmap::new(1 << 30).unwrap(); // 262144 bits, 8 pages
        assert_eq!(bm.set_al_extent(3), 1024);
        assert_eq!(bm.set_al_extent(3), 0);
        assert_eq!(bm.set_al_extent(300), 0); // beyond 1 GiB
        assert_eq!(
            bm.runs().next(),
            Some(BitRun {
                first_bit: 3072,
                len: 1024
            })
        );
        assert_eq!(bm.take_dirty_pages(), vec![0]);
        bm.set_bit(262_143).unwrap();
        assert_eq!(bm.dirty_pages(), vec![7]);
        bm.set_all();
        assert_eq!(bm.count(), 262_144);
        assert_eq!(bm.dirty_pages().len(), 8);
        bm.clear_all();
        assert_eq!(bm.count(), 0);
    }

    #[test]
    fn refuses_absurd_sizes() {
        assert!(matches!(
            OutOfSyncBitmap::new(u64::MAX),
            Err(BitmapError::TooLarge(_))
        ));
        assert!(OutOfSyncBitmap::for_sectors(u64::MAX).is_err());
        let mut bm = OutOfSyncBitmap::new(4096).unwrap();
        assert!(bm.set_bit(u64::MAX).is_err());
        assert!(bm.clear_bits(1, 0).is_err());
        assert!(!bm.test_bit(u64::MAX));
        assert_eq!(bm.next_set(u64::MAX), None);
    }

    #[test]
    fn refuses_multiple_slots() {
        let e = OutOfSyncBitmap::from_slot(4096, &[0u8; 16], 2, 0).unwrap_err();
        assert_eq!(e, BitmapError::MultiplePeerSlots { max_peers: 2 });
        assert!(e.to_string().contains("max-peers 1"));
        assert!(OutOfSyncBitmap::from_slot(4096, &[0u8; 8], 1, 0).is_ok());
        assert!(matches!(
            OutOfSyncBitmap::from_le_bytes(1 << 20, &[0u8; 8]),
            Err(BitmapError::ShortBuffer { .. })
        ));
    }
}
