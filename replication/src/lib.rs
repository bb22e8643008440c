//! twinsan peer replication.
//!
//! For now this crate holds [`drbd`]: reading and writing DRBD-format on-disk
//! metadata (superblock, activity log, out-of-sync bitmap, generation UUIDs), so
//! that twinsan can adopt a DRBD resource without a full resync and hand it back.

pub mod drbd;
