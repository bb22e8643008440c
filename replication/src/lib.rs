//! twinsan peer replication.
//!
//! - [`store`]: the `BlockStore` trait shared with the target, and an in-memory store.
//! - [`drbd`]: reading and writing DRBD-format on-disk metadata (superblock, activity log,
//!   out-of-sync bitmap, generation UUIDs), so that twinsan can adopt a DRBD resource
//!   without a full resync and hand it back.

pub mod drbd;
pub mod store;
