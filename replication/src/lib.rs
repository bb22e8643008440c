//! twinsan peer replication.
//!
//! - [`store`]: the `twinsan-store` crate (the `BlockStore` trait the target shares), re-exported.
//! - [`drbd`]: reading and writing DRBD-format on-disk metadata (superblock, activity log,
//!   out-of-sync bitmap, generation UUIDs), so that twinsan can adopt a DRBD resource
//!   without a full resync and hand it back.
//! - [`link`]: the peer protocol (frames, messages, authentication).
//! - [`latency`]: a lock-free latency histogram (write-ack latency; the target's per-LUN
//!   command latencies).
//! - [`policy`]: the pure sync-handshake decision (UUID comparison + split-brain policies).
//! - [`volume`]: [`volume::ReplicatedVolume`], the protocol-C replicated block volume.

pub mod drbd;
pub mod interval;
pub mod latency;
pub mod link;
pub mod policy;
pub use twinsan_store as store;
pub mod volume;
