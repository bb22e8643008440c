//! twinsan: a two-host highly available iSCSI storage server.
//!
//! This crate is the iSCSI target: the iSCSI protocol (`iscsi`), SCSI command handling
//! (`scsi`), block stores over io_uring (`store`), configuration and the server.

pub mod adopt;
pub mod config;
pub mod control;
pub mod ha;
pub mod identity;
pub mod import;
pub mod iscsi;
pub mod logbuf;
pub mod scsi;
pub mod sdnotify;
pub mod server;
pub mod store;
pub mod volumes;
