//! twinsan: a two-host highly available iSCSI storage server.
//!
//! This crate is the iSCSI target: the iSCSI protocol (`iscsi`), SCSI command handling
//! (`scsi`), configuration and the server; `store` is the `twinsan-store` crate (block stores
//! over io_uring or I/O threads), re-exported.

pub mod adopt;
pub mod config;
pub mod control;
pub mod ha;
pub mod identity;
pub mod import;
pub mod iscsi;
pub mod logbuf;
pub mod metrics;
pub mod scsi;
pub mod sdnotify;
pub mod server;
pub mod volumes;

pub use twinsan_store as store;
