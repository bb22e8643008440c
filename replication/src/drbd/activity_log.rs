//! The activity log: a ring of 4 KiB transactions recording which 4 MiB
//! extents may have writes in flight, so that after a crash of a primary only
//! those extents need a resync.
//!
//! Format: `struct al_transaction_on_disk` in drbd-headers `drbd_meta_data.h`
//! (DRBD 8.4 and 9). Replay follows drbd-utils `drbdmeta.c` (`replay_al_84`,
//! `apply_al`, `meta_apply_al`); the writer follows the 8.4 kernel's
//! `__al_write_transaction` in `drbd_actlog.c`.

use std::collections::HashMap;

use thiserror::Error;

use super::layout::AlGeometry;

/// Magic of every AL transaction block (base64 of "actlog==").
pub const DRBD_AL_MAGIC: u32 = 0x69cb_65a2;
/// Update slots per transaction.
pub const AL_UPDATES_PER_TRANSACTION: usize = 64;
/// Context slots per transaction: (4096 - 420) / 4.
pub const AL_CONTEXT_PER_TRANSACTION: usize = 919;
/// `transaction_type` of a normal transaction.
pub const AL_TR_UPDATE: u16 = 0;
/// `transaction_type` of a block written by `drbdmeta create-md` / `apply-al`.
pub const AL_TR_INITIALIZED: u16 = 0xffff;
/// Most AL extents DRBD 8.4 allows (`DRBD_AL_EXTENTS_MAX`); also the size of
/// drbdmeta's replay table.
pub const AL_EXTENTS_MAX: u32 = 65534;
/// Fewest AL extents this writer allows (`DRBD_AL_EXTENTS_MIN` of DRBD 8.3).
pub const AL_EXTENTS_MIN: u32 = 7;
/// "No extent" marker (`LC_FREE`).
pub const LC_FREE: u32 = u32::MAX;
/// Size of a transaction block.
pub const AL_BLOCK_SIZE: usize = 4096;

const OFF_UPDATE_SLOTS: usize = 36;
const OFF_UPDATE_EXTENTS: usize = OFF_UPDATE_SLOTS + 2 * AL_UPDATES_PER_TRANSACTION; // 164
const OFF_CONTEXT: usize = OFF_UPDATE_EXTENTS + 4 * AL_UPDATES_PER_TRANSACTION; // 420

/// DRBD's AL checksum: CRC-32C (Castagnoli) with seed 0 and no final xor, as
/// the kernel's `crc32c(0, buf, 4096)` computes it (`drbd_actlog.c`). This is
/// not the standard CRC-32C value (which starts from and finally inverts with
/// `0xffffffff`); in terms of the standard function it is
/// `!crc32c_append(!0, data)`.
pub fn drbd_crc32c(data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!0, data)
}

/// Activity log errors.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AlError {
    /// A transaction block is not 4096 bytes.
    #[error("AL transaction block is {0} bytes, expected 4096")]
    BadLength(usize),
    /// Wrong magic.
    #[error("AL transaction magic (byte 0) is 0x{found:08x}, expected 0x69cb65a2")]
    BadMagic {
        /// Value found.
        found: u32,
    },
    /// Checksum mismatch.
    #[error(
        "AL transaction {tr_number}: crc32c (byte 8) is 0x{stored:08x}, computed 0x{computed:08x}"
    )]
    BadCrc {
        /// Transaction number in the block.
        tr_number: u32,
        /// Stored checksum.
        stored: u32,
        /// Computed checksum.
        computed: u32,
    },
    /// The AL area is not the size the striping implies.
    #[error("activity log area is {have} bytes, striping {stripes} x {stripe_size_4k} blocks needs {need}")]
    BadAreaSize {
        /// Bytes given.
        have: u64,
        /// Bytes needed.
        need: u64,
        /// Stripes.
        stripes: u32,
        /// Stripe size in 4 KiB blocks.
        stripe_size_4k: u32,
    },
    /// No block of the ring is a valid transaction (drbdmeta: "No usable
    /// activity log found. Do you need to create-md?", `-ENODATA`).
    #[error("no valid activity log transaction found; was the metadata ever initialised?")]
    NoValidTransaction,
    /// Some blocks are valid, but none is an update and more than the first is
    /// corrupt (drbdmeta: "No valid AL update transaction found.", `-EINVAL`).
    #[error("no valid AL update transaction found and {corrupt} corrupt blocks")]
    NoUpdateTransaction {
        /// Corrupt blocks.
        corrupt: u64,
    },
    /// Bad `al-extents` for the writer.
    #[error("al-extents = {al_extents} is outside {min} .. {max} for an activity log of {blocks} blocks")]
    BadAlExtents {
        /// Requested.
        al_extents: u32,
        /// Minimum.
        min: u32,
        /// Maximum for this AL size: (blocks - 1) * 919, at most 65534.
        max: u32,
        /// AL blocks.
        blocks: u64,
    },
    /// Every AL slot holds an extent with I/O in flight.
    #[error("all {al_extents} activity log extents are busy; cannot activate extent {extent}")]
    AllExtentsBusy {
        /// Extent asked for.
        extent: u32,
        /// Slots in the AL.
        al_extents: u32,
    },
    /// More new extents than one transaction can carry.
    #[error("{0} new extents do not fit in one AL transaction (at most 64)")]
    TooManyUpdates(usize),
    /// `release` of an extent that holds no reference.
    #[error("extent {0} is not active in the activity log")]
    NotActive(u32),
    /// The extent number is the reserved free marker.
    #[error("extent number 0xffffffff is reserved")]
    BadExtent,
}

/// One parsed AL transaction (`struct al_transaction_on_disk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTransaction {
    /// Transaction number; the ring's newest has the highest (wrapping).
    pub tr_number: u32,
    /// Stored checksum (ignored by [`AlTransaction::to_bytes`], which computes it).
    pub crc32c: u32,
    /// [`AL_TR_UPDATE`] or [`AL_TR_INITIALIZED`].
    pub transaction_type: u16,
    /// Number of used update slots.
    pub n_updates: u16,
    /// Number of AL slots (`al-extents`) of the writer.
    pub context_size: u16,
    /// AL slot of `context[0]`.
    pub context_start_slot_nr: u16,
    /// Reserved words (kept for round trips).
    pub reserved: [u32; 4],
    /// AL slot of each update.
    pub update_slot_nr: [u16; AL_UPDATES_PER_TRANSACTION],
    /// New extent of each update.
    pub update_extent_nr: [u32; AL_UPDATES_PER_TRANSACTION],
    /// Extents of slots `context_start_slot_nr ..`.
    pub context: Box<[u32; AL_CONTEXT_PER_TRANSACTION]>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}

impl AlTransaction {
    /// An empty update transaction.
    pub fn empty(tr_number: u32) -> AlTransaction {
        AlTransaction {
            tr_number,
            crc32c: 0,
            transaction_type: AL_TR_UPDATE,
            n_updates: 0,
            context_size: 0,
            context_start_slot_nr: 0,
            reserved: [0; 4],
            update_slot_nr: [u16::MAX; AL_UPDATES_PER_TRANSACTION],
            update_extent_nr: [LC_FREE; AL_UPDATES_PER_TRANSACTION],
            context: Box::new([LC_FREE; AL_CONTEXT_PER_TRANSACTION]),
        }
    }

    /// The block `drbdmeta create-md` and `apply-al` write into every ring slot
    /// (drbdmeta.c `initialize_al`): magic, type [`AL_TR_INITIALIZED`], all
    /// other fields zero.
    pub fn initialized() -> AlTransaction {
        AlTransaction {
            tr_number: 0,
            crc32c: 0,
            transaction_type: AL_TR_INITIALIZED,
            n_updates: 0,
            context_size: 0,
            context_start_slot_nr: 0,
            reserved: [0; 4],
            update_slot_nr: [0; AL_UPDATES_PER_TRANSACTION],
            update_extent_nr: [0; AL_UPDATES_PER_TRANSACTION],
            context: Box::new([0; AL_CONTEXT_PER_TRANSACTION]),
        }
    }

    /// Parses and verifies (magic, checksum) one 4 KiB block.
    pub fn parse(buf: &[u8]) -> Result<AlTransaction, AlError> {
        if buf.len() != AL_BLOCK_SIZE {
            return Err(AlError::BadLength(buf.len()));
        }
        let magic = be32(buf, 0);
        if magic != DRBD_AL_MAGIC {
            return Err(AlError::BadMagic { found: magic });
        }
        let tr_number = be32(buf, 4);
        let stored = be32(buf, 8);
        let mut copy = [0u8; AL_BLOCK_SIZE];
        copy.copy_from_slice(buf);
        copy[8..12].fill(0);
        let computed = drbd_crc32c(&copy);
        if computed != stored {
            return Err(AlError::BadCrc {
                tr_number,
                stored,
                computed,
            });
        }
        let mut t = AlTransaction::empty(tr_number);
        t.crc32c = stored;
        t.transaction_type = be16(buf, 12);
        t.n_updates = be16(buf, 14);
        t.context_size = be16(buf, 16);
        t.context_start_slot_nr = be16(buf, 18);
        for i in 0..4 {
            t.reserved[i] = be32(buf, 20 + 4 * i);
        }
        for i in 0..AL_UPDATES_PER_TRANSACTION {
            t.update_slot_nr[i] = be16(buf, OFF_UPDATE_SLOTS + 2 * i);
            t.update_extent_nr[i] = be32(buf, OFF_UPDATE_EXTENTS + 4 * i);
        }
        for i in 0..AL_CONTEXT_PER_TRANSACTION {
            t.context[i] = be32(buf, OFF_CONTEXT + 4 * i);
        }
        Ok(t)
    }

    /// Serializes, computing the checksum.
    pub fn to_bytes(&self) -> Box<[u8; AL_BLOCK_SIZE]> {
        let mut b = Box::new([0u8; AL_BLOCK_SIZE]);
        b[0..4].copy_from_slice(&DRBD_AL_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.tr_number.to_be_bytes());
        b[12..14].copy_from_slice(&self.transaction_type.to_be_bytes());
        b[14..16].copy_from_slice(&self.n_updates.to_be_bytes());
        b[16..18].copy_from_slice(&self.context_size.to_be_bytes());
        b[18..20].copy_from_slice(&self.context_start_slot_nr.to_be_bytes());
        for i in 0..4 {
            b[20 + 4 * i..24 + 4 * i].copy_from_slice(&self.reserved[i].to_be_bytes());
        }
        for i in 0..AL_UPDATES_PER_TRANSACTION {
            let o = OFF_UPDATE_SLOTS + 2 * i;
            b[o..o + 2].copy_from_slice(&self.update_slot_nr[i].to_be_bytes());
            let o = OFF_UPDATE_EXTENTS + 4 * i;
            b[o..o + 4].copy_from_slice(&self.update_extent_nr[i].to_be_bytes());
        }
        for i in 0..AL_CONTEXT_PER_TRANSACTION {
            let o = OFF_CONTEXT + 4 * i;
            b[o..o + 4].copy_from_slice(&self.context[i].to_be_bytes());
        }
        let crc = drbd_crc32c(&b[..]);
        b[8..12].copy_from_slice(&crc.to_be_bytes());
        b
    }
}

/// Result of replaying an activity log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AlReplay {
    /// Extents active at the newest transaction, sorted and deduplicated.
    pub hot_extents: Vec<u32>,
    /// Valid blocks (update or initialized).
    pub valid_blocks: u64,
    /// Valid update transactions.
    pub update_transactions: u64,
    /// Blocks with bad magic or checksum.
    pub corrupt_blocks: u64,
    /// Transaction number of the oldest and newest valid update, if any.
    pub tr_range: Option<(u32, u32)>,
    /// Slot numbers >= [`AL_EXTENTS_MAX`] that were skipped (drbdmeta warns
    /// "slot number out of range").
    pub skipped_slots: u64,
}

impl AlReplay {
    /// True if there is something to apply (drbdmeta's `err > 0`).
    pub fn has_updates(&self) -> bool {
        self.update_transactions > 0
    }
}

/// Replays the activity log area (`al_stripes * al_stripe_size_4k` blocks in
/// on-disk order) like drbdmeta.c `replay_al_84`: valid update transactions
/// are ordered by transaction number (wrap-around safe), and from the oldest
/// to the newest the context and then the updates of each are applied to a
/// slot -> extent table. The extents left in the table are the hot ones.
///
/// Returns `Ok` with no updates when all blocks are initialized (clean), or
/// when only the first transaction is corrupt and the others are initialized.
pub fn replay(area: &[u8], geometry: AlGeometry) -> Result<AlReplay, AlError> {
    let mx = geometry.size_4k();
    let need = mx * AL_BLOCK_SIZE as u64;
    if area.len() as u64 != need || mx == 0 {
        return Err(AlError::BadAreaSize {
            have: area.len() as u64,
            need,
            stripes: geometry.stripes,
            stripe_size_4k: geometry.stripe_size_4k,
        });
    }
    // al[b] is transaction-order slot b, read from on-disk block block_of(b).
    let mut al: Vec<Option<AlTransaction>> = Vec::with_capacity(mx as usize);
    let mut out = AlReplay::default();
    // (transaction-order index, tr_number) of the oldest and newest update (drbdmeta `struct al_cursor`).
    let mut oldest: Option<(u64, u32)> = None;
    let mut newest: Option<(u64, u32)> = None;
    for b in 0..mx {
        let o = geometry.block_of(b as u32) as usize;
        let block = &area[o * AL_BLOCK_SIZE..(o + 1) * AL_BLOCK_SIZE];
        let t = AlTransaction::parse(block).ok();
        if let Some(t) = &t {
            out.valid_blocks += 1;
            if t.transaction_type != AL_TR_INITIALIZED {
                // drbdmeta only d_expect()s AL_TR_UPDATE here and treats any
                // other type as an update.
                out.update_transactions += 1;
                let tr = t.tr_number;
                match (oldest, newest) {
                    (Some((_, otr)), Some((_, ntr))) => {
                        if (tr as i32).wrapping_sub(otr as i32) < 0 {
                            oldest = Some((b, tr));
                        }
                        if (tr as i32).wrapping_sub(ntr as i32) > 0 {
                            newest = Some((b, tr));
                        }
                    }
                    _ => {
                        oldest = Some((b, tr));
                        newest = Some((b, tr));
                    }
                }
            }
        } else {
            out.corrupt_blocks += 1;
        }
        al.push(t);
    }
    if out.valid_blocks == 0 {
        return Err(AlError::NoValidTransaction);
    }
    let (Some((oi, otr)), Some((ni, ntr))) = (oldest, newest) else {
        if out.valid_blocks == mx || (al[0].is_none() && out.valid_blocks == mx - 1) {
            return Ok(out);
        }
        return Err(AlError::NoUpdateTransaction {
            corrupt: out.corrupt_blocks,
        });
    };
    out.tr_range = Some((otr, ntr));
    let mut hot = vec![LC_FREE; AL_EXTENTS_MAX as usize];
    let end = if ni < oi { ni + mx } else { ni };
    for b in oi..=end {
        let Some(t) = &al[(b % mx) as usize] else {
            continue;
        };
        if t.transaction_type == AL_TR_INITIALIZED {
            continue;
        }
        for (i, &extent) in t.context.iter().enumerate() {
            let slot = u32::from(t.context_start_slot_nr) + i as u32;
            if extent == LC_FREE && slot >= u32::from(t.context_size) {
                continue;
            }
            if slot >= AL_EXTENTS_MAX {
                out.skipped_slots += 1;
                continue;
            }
            hot[slot as usize] = extent;
        }
        for i in 0..AL_UPDATES_PER_TRANSACTION {
            let slot = t.update_slot_nr[i];
            if i >= usize::from(t.n_updates) && slot == u16::MAX {
                continue;
            }
            if u32::from(slot) >= AL_EXTENTS_MAX {
                out.skipped_slots += 1;
                continue;
            }
            hot[usize::from(slot)] = t.update_extent_nr[i];
        }
    }
    let mut extents: Vec<u32> = hot.into_iter().filter(|&e| e != LC_FREE).collect();
    extents.sort_unstable();
    extents.dedup();
    out.hot_extents = extents;
    Ok(out)
}

/// A transaction block to write: `bytes` go to AL block `block` (byte offset
/// `al_offset + block * 4096`, see [`crate::drbd::Geometry::al_block_offset`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlWrite {
    /// Transaction number.
    pub tr_number: u32,
    /// 4 KiB block within the AL area.
    pub block: u64,
    /// The block.
    pub bytes: Box<[u8; AL_BLOCK_SIZE]>,
}

/// The AL extent (4 MiB) holding data byte `offset`.
pub fn extent_of(offset: u64) -> u64 {
    offset >> super::bitmap::AL_EXTENT_SHIFT
}

/// The in-memory activity log of a primary, writing transactions in DRBD's
/// format: a fixed set of `al_extents` slots, each holding one hot 4 MiB
/// extent. Before a write may go to an extent that is not hot, a transaction
/// recording the change must be on stable storage ([`ActivityLog::activate`]
/// returns it). Evicts the least recently used extent without I/O in flight.
///
/// After a crash, [`replay`] of the on-disk ring gives a superset of the
/// extents that may have had writes in flight.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    geometry: AlGeometry,
    slots: Vec<u32>,
    refcnt: Vec<u32>,
    last_used: Vec<u64>,
    index: HashMap<u32, u32>,
    clock: u64,
    tr_number: u32,
    tr_cycle: u32,
}

impl ActivityLog {
    /// Largest `al_extents` for an AL of `blocks` transaction blocks: the ring
    /// must hold a full context cycle plus one (kernel `drbd_al_extents_max`).
    pub fn max_al_extents(geometry: AlGeometry) -> u32 {
        let blocks = geometry.size_4k();
        (blocks.saturating_sub(1) * AL_CONTEXT_PER_TRANSACTION as u64)
            .min(u64::from(AL_EXTENTS_MAX)) as u32
    }

    /// An empty activity log with `al_extents` slots (DRBD 8.4 default 1237,
    /// older 257). `first_tr_number` is the number of the first transaction;
    /// after re-initialising the ring any value works.
    pub fn new(
        al_extents: u32,
        geometry: AlGeometry,
        first_tr_number: u32,
    ) -> Result<Self, AlError> {
        let max = Self::max_al_extents(geometry);
        if al_extents < AL_EXTENTS_MIN || al_extents > max {
            return Err(AlError::BadAlExtents {
                al_extents,
                min: AL_EXTENTS_MIN,
                max,
                blocks: geometry.size_4k(),
            });
        }
        let n = al_extents as usize;
        Ok(ActivityLog {
            geometry,
            slots: vec![LC_FREE; n],
            refcnt: vec![0; n],
            last_used: vec![0; n],
            index: HashMap::new(),
            clock: 0,
            tr_number: first_tr_number,
            tr_cycle: 0,
        })
    }

    /// Number of slots.
    pub fn al_extents(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Number of the next transaction.
    pub fn next_tr_number(&self) -> u32 {
        self.tr_number
    }

    /// True if `extent` is hot (writes to it need no transaction).
    pub fn is_hot(&self, extent: u32) -> bool {
        self.index.contains_key(&extent)
    }

    /// References held on `extent`.
    pub fn refs(&self, extent: u32) -> u32 {
        self.index
            .get(&extent)
            .map_or(0, |&s| self.refcnt[s as usize])
    }

    /// Hot extents, sorted.
    pub fn hot_extents(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.index.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Takes a reference on `extent` for a write about to be issued. Returns
    /// the transaction that must be written (and made durable) before the
    /// data write, or `None` if the extent was already hot. The transaction
    /// number is consumed: if writing it fails, the log must be re-initialised.
    pub fn activate(&mut self, extent: u32) -> Result<Option<AlWrite>, AlError> {
        self.activate_many(&[extent])
    }

    /// Like [`ActivityLog::activate`] for several extents (e.g. a write crossing
    /// an extent boundary): all of them get a reference, and the new ones go
    /// into one transaction (at most 64).
    pub fn activate_many(&mut self, extents: &[u32]) -> Result<Option<AlWrite>, AlError> {
        if extents.contains(&LC_FREE) {
            return Err(AlError::BadExtent);
        }
        let mut new: Vec<u32> = extents
            .iter()
            .copied()
            .filter(|e| !self.index.contains_key(e))
            .collect();
        new.sort_unstable();
        new.dedup();
        if new.len() > AL_UPDATES_PER_TRANSACTION {
            return Err(AlError::TooManyUpdates(new.len()));
        }
        // Hot extents of this request take their reference first, so they
        // cannot be evicted for its new ones.
        for e in extents {
            if let Some(&s) = self.index.get(e) {
                self.refcnt[s as usize] += 1;
                self.clock += 1;
                self.last_used[s as usize] = self.clock;
            }
        }
        if new.is_empty() {
            return Ok(None);
        }
        let mut victims: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s] == LC_FREE || self.refcnt[s] == 0)
            .collect();
        if victims.len() < new.len() {
            // roll back
            for e in extents {
                if let Some(&s) = self.index.get(e) {
                    self.refcnt[s as usize] -= 1;
                }
            }
            return Err(AlError::AllExtentsBusy {
                extent: new.first().copied().unwrap_or(0),
                al_extents: self.al_extents(),
            });
        }
        // Free slots first (lowest number first), then least recently used;
        // only the first new.len() are needed.
        let key = |s: &usize| (self.slots[*s] != LC_FREE, self.last_used[*s], *s);
        if victims.len() > new.len() {
            victims.select_nth_unstable_by_key(new.len() - 1, key);
            victims.truncate(new.len());
        }
        victims.sort_unstable_by_key(key);
        let mut tr = self.base_transaction();
        for (i, &extent) in new.iter().enumerate() {
            let s = victims[i];
            tr.update_slot_nr[i] = s as u16;
            tr.update_extent_nr[i] = extent;
        }
        tr.n_updates = new.len() as u16;
        // Commit in memory (lc_committed) after the context was captured.
        for (i, &extent) in new.iter().enumerate() {
            let s = victims[i];
            let old = self.slots[s];
            if old != LC_FREE {
                self.index.remove(&old);
            }
            self.slots[s] = extent;
            self.refcnt[s] = 0;
            self.index.insert(extent, s as u32);
        }
        for e in extents {
            if new.contains(e) {
                if let Some(&s) = self.index.get(e) {
                    self.refcnt[s as usize] += 1;
                    self.clock += 1;
                    self.last_used[s as usize] = self.clock;
                }
            }
        }
        Ok(Some(self.emit(tr)))
    }

    /// Drops a reference taken by [`ActivityLog::activate`]; the extent stays
    /// hot until evicted.
    pub fn release(&mut self, extent: u32) -> Result<(), AlError> {
        match self.index.get(&extent) {
            Some(&s) if self.refcnt[s as usize] > 0 => {
                self.refcnt[s as usize] -= 1;
                Ok(())
            }
            _ => Err(AlError::NotActive(extent)),
        }
    }

    /// A transaction without updates that only carries the next context
    /// chunk (the kernel writes these when initialising the ring on attach).
    pub fn context_transaction(&mut self) -> AlWrite {
        let tr = self.base_transaction();
        self.emit(tr)
    }

    /// One transaction per ring block carrying the full context, as the
    /// kernel's `drbd_al_initialize` does after attach; replaying the ring
    /// afterwards gives exactly the current hot set.
    pub fn initialize_ring(&mut self) -> Vec<AlWrite> {
        (0..self.geometry.size_4k())
            .map(|_| self.context_transaction())
            .collect()
    }

    fn base_transaction(&self) -> AlTransaction {
        let mut tr = AlTransaction::empty(self.tr_number);
        tr.context_size = self.slots.len() as u16;
        tr.context_start_slot_nr = self.tr_cycle as u16;
        let start = self.tr_cycle as usize;
        let n = AL_CONTEXT_PER_TRANSACTION.min(self.slots.len() - start);
        tr.context[..n].copy_from_slice(&self.slots[start..start + n]);
        tr
    }

    fn emit(&mut self, tr: AlTransaction) -> AlWrite {
        let block = self.geometry.block_of(tr.tr_number);
        let w = AlWrite {
            tr_number: tr.tr_number,
            block,
            bytes: tr.to_bytes(),
        };
        self.tr_number = self.tr_number.wrapping_add(1);
        self.tr_cycle += AL_CONTEXT_PER_TRANSACTION as u32;
        if self.tr_cycle as usize >= self.slots.len() {
            self.tr_cycle = 0;
        }
        w
    }
}

/// The blocks drbdmeta writes into a fresh or applied activity log
/// (drbdmeta.c `initialize_al`): every block an initialized transaction.
pub fn initialized_area(geometry: AlGeometry) -> Vec<u8> {
    let block = AlTransaction::initialized().to_bytes();
    let mut v = Vec::with_capacity(geometry.size_4k() as usize * AL_BLOCK_SIZE);
    for _ in 0..geometry.size_4k() {
        v.extend_from_slice(&block[..]);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    const GEO: AlGeometry = AlGeometry {
        stripes: 1,
        stripe_size_4k: 8,
    };

    #[test]
    fn crc_matches_drbdmeta_initialized_block() {
        // drbdmeta 9.22 create-md writes crc32c 0x709cc651 into each
        // initialized block (checked with xxd on a fresh file).
        let b = AlTransaction::initialized().to_bytes();
        assert_eq!(&b[0..4], &[0x69, 0xcb, 0x65, 0xa2]);
        assert_eq!(&b[8..12], &0x709c_c651u32.to_be_bytes());
        assert_eq!(&b[12..14], &[0xff, 0xff]);
        assert!(b[14..].iter().all(|&x| x == 0));
        // and it is not the standard CRC-32C
        let mut z = *b;
        z[8..12].fill(0);
        assert_ne!(crc32c::crc32c(&z), 0x709c_c651);
        let t = AlTransaction::parse(&b[..]).unwrap();
        assert_eq!(t.transaction_type, AL_TR_INITIALIZED);
    }

    #[test]
    fn parse_errors() {
        let mut b = *AlTransaction::initialized().to_bytes();
        b[100] ^= 1;
        let e = AlTransaction::parse(&b).unwrap_err();
        assert!(
            matches!(
                e,
                AlError::BadCrc {
                    stored: 0x709c_c651,
                    ..
                }
            ),
            "{e}"
        );
        b[0] = 0;
        assert!(matches!(
            AlTransaction::parse(&b),
            Err(AlError::BadMagic { .. })
        ));
        assert_eq!(AlTransaction::parse(&b[..10]), Err(AlError::BadLength(10)));
    }

    #[test]
    fn round_trip() {
        let mut t = AlTransaction::empty(77);
        t.n_updates = 2;
        t.update_slot_nr[0] = 3;
        t.update_extent_nr[0] = 99;
        t.update_slot_nr[1] = 4;
        t.update_extent_nr[1] = 100;
        t.context_size = 257;
        t.context[5] = 1234;
        t.reserved[2] = 5;
        let b = t.to_bytes();
        let mut p = AlTransaction::parse(&b[..]).unwrap();
        p.crc32c = 0;
        assert_eq!(p, t);
    }

    #[test]
    fn clean_ring_has_nothing_to_replay() {
        let area = initialized_area(GEO);
        let r = replay(&area, GEO).unwrap();
        assert!(!r.has_updates());
        assert_eq!(r.valid_blocks, 8);
        assert_eq!(
            replay(&vec![0u8; 8 * 4096], GEO),
            Err(AlError::NoValidTransaction)
        );
        let mut area2 = area.clone();
        area2[0] = 0; // first corrupt: tolerated
        assert!(!replay(&area2, GEO).unwrap().has_updates());
        let mut area3 = area;
        area3[4096] = 0; // second corrupt: refused
        assert_eq!(
            replay(&area3, GEO),
            Err(AlError::NoUpdateTransaction { corrupt: 1 })
        );
        assert!(matches!(
            replay(&[0u8; 100], GEO),
            Err(AlError::BadAreaSize { .. })
        ));
    }

    fn write_all(area: &mut [u8], ws: &[AlWrite]) {
        for w in ws {
            let o = w.block as usize * 4096;
            area[o..o + 4096].copy_from_slice(&w.bytes[..]);
        }
    }

    /// Runs the writer through random activity, "crashing" at random points,
    /// and checks that replay gives a superset of the extents with references
    /// and exactly the writer's hot set.
    fn writer_replay_roundtrip(geo: AlGeometry, al_extents: u32, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut area = initialized_area(geo);
        let mut al = ActivityLog::new(al_extents, geo, rng.gen()).unwrap();
        let mut held: Vec<u32> = Vec::new();
        for step in 0..3000 {
            if !held.is_empty() && rng.gen_bool(0.5) {
                let i = rng.gen_range(0..held.len());
                al.release(held.swap_remove(i)).unwrap();
            } else {
                let e = rng.gen_range(0..al_extents * 3);
                match al.activate(e) {
                    Ok(w) => {
                        if let Some(w) = w {
                            write_all(&mut area, &[w]);
                        }
                        held.push(e);
                    }
                    Err(AlError::AllExtentsBusy { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            if step % 97 == 0 {
                let r = replay(&area, geo).unwrap();
                let mut hot = al.hot_extents();
                hot.sort_unstable();
                if r.has_updates() {
                    assert_eq!(r.hot_extents, hot, "step {step}");
                }
                for e in &held {
                    assert!(
                        r.hot_extents.binary_search(e).is_ok(),
                        "held extent {e} lost"
                    );
                }
            }
        }
    }

    #[test]
    fn writer_and_replay_agree() {
        writer_replay_roundtrip(GEO, 257, 1);
        writer_replay_roundtrip(GEO, 1237, 2);
        writer_replay_roundtrip(GEO, 31, 3);
        let striped = AlGeometry {
            stripes: 3,
            stripe_size_4k: 4,
        };
        writer_replay_roundtrip(striped, 2000, 4);
        writer_replay_roundtrip(GEO, ActivityLog::max_al_extents(GEO), 5);
    }

    #[test]
    fn tr_number_wraps() {
        let mut area = initialized_area(GEO);
        let mut al = ActivityLog::new(61, GEO, u32::MAX - 3).unwrap();
        for e in 0..20 {
            if let Some(w) = al.activate(e).unwrap() {
                write_all(&mut area, &[w]);
            }
            al.release(e).unwrap();
        }
        let r = replay(&area, GEO).unwrap();
        assert_eq!(r.tr_range, Some((8, 15)));
        assert_eq!(r.hot_extents, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn activation_semantics() {
        let mut al = ActivityLog::new(7, GEO, 0).unwrap();
        let w = al.activate(5).unwrap().unwrap();
        assert_eq!((w.tr_number, w.block), (0, 0));
        assert!(al.activate(5).unwrap().is_none());
        assert_eq!(al.refs(5), 2);
        al.release(5).unwrap();
        al.release(5).unwrap();
        assert_eq!(al.release(5), Err(AlError::NotActive(5)));
        assert!(al.is_hot(5));
        for e in 10..16 {
            al.activate(e).unwrap();
        }
        // 7 slots: 5 (unreferenced) + 10..16 (referenced) -> 5 is evicted
        assert!(al.activate(20).unwrap().is_some());
        assert!(!al.is_hot(5));
        assert!(matches!(
            al.activate(21),
            Err(AlError::AllExtentsBusy { .. })
        ));
        assert_eq!(al.refs(20), 1);
        let w = al.activate_many(&[30, 20]);
        assert!(matches!(w, Err(AlError::AllExtentsBusy { .. })));
        assert_eq!(al.refs(20), 1, "rolled back");
        al.release(20).unwrap();
        assert!(matches!(
            al.activate_many(&[20, 31]),
            Err(AlError::AllExtentsBusy { .. })
        ));
        assert_eq!(al.refs(20), 0, "rolled back");
        al.release(10).unwrap();
        let w = al.activate_many(&[20, 31, 31]).unwrap().unwrap();
        assert_eq!(w.tr_number, 8);
        assert!(!al.is_hot(10));
        assert_eq!((al.refs(20), al.refs(31)), (1, 2));
        assert!(matches!(al.activate(LC_FREE), Err(AlError::BadExtent)));
        assert!(ActivityLog::new(6, GEO, 0).is_err());
        assert!(ActivityLog::new(6434, GEO, 0).is_err());
        assert_eq!(ActivityLog::max_al_extents(GEO), 6433);
    }

    #[test]
    fn random_blocks_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        let mut area = vec![0u8; 8 * 4096];
        for i in 0..1000 {
            let mut b = [0u8; 4096];
            rng.fill_bytes(&mut b);
            if i % 2 == 0 {
                b[0..4].copy_from_slice(&DRBD_AL_MAGIC.to_be_bytes());
                if i % 4 == 0 {
                    b[8..12].fill(0);
                    let c = drbd_crc32c(&b);
                    b[8..12].copy_from_slice(&c.to_be_bytes());
                }
            }
            let _ = AlTransaction::parse(&b);
            let k = rng.gen_range(0..8);
            area[k * 4096..(k + 1) * 4096].copy_from_slice(&b);
            let _ = replay(&area, GEO);
        }
    }
}
