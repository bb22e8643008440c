//! twinsan HA layer: role sources (pool.conf, XAPI, standalone heartbeats), the role state machine,
//! the floating IP (VIP) and alerts.
//!
//! The state machine ([`role::RoleMachine`]) is pure: it turns events into ordered actions, so every
//! safety rule is unit-tested without I/O. The I/O edges (pool.conf watcher, XAPI client, VIP via
//! rtnetlink and raw sockets, SMTP) live in their own modules and only report events or carry out actions.
//! [`replug`] plugs the iSCSI SRs that XenServer left unplugged after a boot.

pub mod alerts;
pub mod poolconf;
pub mod replug;
pub mod role;
#[cfg(feature = "test-xapi")]
pub mod testxapi;
pub mod tls;
pub mod vip;
pub mod xapi;
pub mod xmlrpc;
