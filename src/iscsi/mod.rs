//! iSCSI (RFC 7143), split by what each part implements.

pub mod budget;
pub mod chap;
pub mod connection;
pub mod context;
pub mod ffp;
pub mod listener;
pub mod login;
pub mod login_driver;
pub mod negotiation;
pub mod pdu;
pub mod sequencer;
pub mod session;
pub mod text;
