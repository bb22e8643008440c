//! The peer link: a framed, CRC-checked, HMAC-authenticated TCP protocol between the two
//! hosts of a replicated volume.
//!
//! * [`proto`]: messages and the tokio-util frame codec (pure, unit-tested).
//! * [`auth`]: `Hello`, the connection direction rule and challenge-response authentication.

pub mod auth;
pub mod proto;
pub mod sender;

pub use auth::{establish, Established, LinkError, LocalHello, PeerHello};
pub use proto::{DiskState, FrameCodec, FrameError, Message, VerifyDigest};
pub use sender::{link_channel, LinkSender, LinkWriter, SendError};
