//! DRBD-format on-disk metadata (DRBD 8.4 "v08" and DRBD 9 "v09").
//!
//! The layout facts come from LINBIT's public sources: drbd-utils
//! `user/shared/drbdmeta.c`, drbd-headers `drbd_meta_data.h`, and the DRBD 8.4
//! kernel driver (`drbd_int.h`, `drbd_main.c`, `drbd_actlog.c`,
//! `drbd_receiver.c`). Everything was checked against `drbdmeta` 9.22 on plain
//! files; see `tests/drbdmeta_oracle.rs`.
//!
//! * [`superblock`]: the 4 KiB metadata superblock, v08 and v09.
//! * [`layout`]: where superblock, activity log and bitmap live (internal,
//!   flexible external, indexed external) and how big the data area is.
//! * [`bitmap`]: the out-of-sync bitmap, one bit per 4 KiB block.
//! * [`activity_log`]: activity-log transactions (read, replay, write).
//! * [`uuid`]: generation UUIDs and DRBD 8.4's `drbd_uuid_compare`.
//! * [`metadata`]: all of the above over a file or block device.
//! * [`adopt`]: checking and adopting an existing DRBD resource's metadata.

pub mod activity_log;
pub mod adopt;
pub mod bitmap;
pub mod layout;
pub mod metadata;
pub mod superblock;
pub mod uuid;

pub use activity_log::{ActivityLog, AlReplay, AlTransaction, AlWrite};
pub use bitmap::OutOfSyncBitmap;
pub use layout::{AlGeometry, Geometry, Layout};
pub use metadata::{AlApplyReport, CreateOptions, Metadata, MetadataError};
pub use superblock::{MdFlags, MdVersion, MetaState, PeerFlags, PeerMd, Superblock};
pub use uuid::{
    uuid_compare, CompareContext, CompareOutcome, GenerationUuids, Role, SyncDecision,
    UuidCorrection,
};

/// Bytes per sector, the unit of most on-disk sizes and offsets.
pub const SECTOR_SIZE: u64 = 512;

/// Size of one metadata I/O block (superblock, AL transaction, bitmap page).
pub const MD_BLOCK_SIZE: u64 = 4096;
