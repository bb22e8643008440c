//! Block Limits (SBC-3 6.6.3; the atomic fields SBC-4 6.6.4): what one command may move or
//! cover, reported in the Block Limits VPD page and enforced by `sbc::check` before any data
//! moves.

/// Largest Data-In / Data-Out a single command may move (Block Limits MAXIMUM TRANSFER
/// LENGTH); also bounds the memory one command can pin.
const MAX_TRANSFER_BYTES: u64 = 32 << 20;
/// Largest range one WRITE SAME may cover (MAXIMUM WRITE SAME LENGTH).
const MAX_WRITE_SAME_BYTES: u64 = 256 << 20;
/// Largest range one UNMAP may cover, capped at 2^20 blocks.
const MAX_UNMAP_BYTES: u64 = 1 << 30;
const MAX_UNMAP_BLOCKS_CAP: u64 = 1 << 20;
const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// MAXIMUM COMPARE AND WRITE LENGTH (the CDB field is one byte).
const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 255;
/// Granularity the backing stores work best with (page size / filesystem block).
const PREFERRED_IO_BYTES: u32 = 4096;
/// Largest WRITE ATOMIC (MAXIMUM ATOMIC TRANSFER LENGTH): one replication message, and what
/// holds every other command of the LU off while it is written.
const MAX_ATOMIC_BYTES: u64 = 1 << 20;
/// Limits reported in the Block Limits VPD page (SBC-3 6.6.3) and enforced by [`super::sbc::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimits {
    pub max_transfer_blocks: u32,
    pub optimal_granularity: u16,
    pub max_write_same_blocks: u64,
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    pub max_compare_and_write_blocks: u8,
    /// MAXIMUM ATOMIC TRANSFER LENGTH (SBC-4 6.6.4).
    pub max_atomic_transfer_blocks: u32,
    /// ATOMIC ALIGNMENT and ATOMIC TRANSFER LENGTH GRANULARITY: atomic writes cover whole
    /// pages of the backing store ([`PREFERRED_IO_BYTES`]), never part of one.
    pub atomic_granularity: u32,
}

impl BlockLimits {
    pub fn for_block_size(block_size: u32) -> Self {
        let bs = u64::from(block_size.max(1));
        BlockLimits {
            max_transfer_blocks: (MAX_TRANSFER_BYTES / bs).max(1) as u32,
            optimal_granularity: (PREFERRED_IO_BYTES / block_size.max(1)).max(1) as u16,
            max_write_same_blocks: (MAX_WRITE_SAME_BYTES / bs).max(1),
            max_unmap_blocks: (MAX_UNMAP_BYTES / bs).clamp(1, MAX_UNMAP_BLOCKS_CAP) as u32,
            max_unmap_descriptors: MAX_UNMAP_DESCRIPTORS,
            max_compare_and_write_blocks: MAX_COMPARE_AND_WRITE_BLOCKS,
            max_atomic_transfer_blocks: (MAX_ATOMIC_BYTES / bs).max(1) as u32,
            atomic_granularity: (PREFERRED_IO_BYTES / block_size.max(1)).max(1),
        }
    }
}
